//! Hooks around the swap: `before_activate` runs on every target once phase 1 committed
//! everywhere (every lock still held, nothing live yet), `after_activate` once phase 2 switched
//! every target. Each target's hooks run in order, the targets in parallel; a `once` hook runs
//! on the first target that made a release only. Hooks run through the agent
//! ([`flip_wire::Request::Hook`]) on the target's machine, inside the new release, and their
//! output reaches [`Events::hook_line`] line by line as it comes.
//!
//! A `before_activate` failure (or timeout) on any target aborts the deploy everywhere (the
//! committed releases are discarded, `current` untouched). An `after_activate` failure switches
//! every target back to its previous release with [`Hooks::rollback_on_failure`], else the new
//! release stays live and the deploy reports the failure.

use crate::{each_in_parallel, DeployError, Events, Host, Options, Phase, Prepared};
use flip_transfer::Session;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default timeout of a hook.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// While other targets still run hooks, a target that is done (or runs none: a `once` hook
/// runs elsewhere) tells its agent it is still there this often (a `Status` request), so the
/// agent's idle timeout (`flip agent --idle-timeout`, 10 minutes by default) never ends its
/// session while another target runs a long migration.
const KEEPALIVE: Duration = Duration::from_secs(1);

/// One hook: a shell command (`/bin/sh -c`), run inside the new release on the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    /// The command, run by `/bin/sh -c` in the release directory.
    pub run: String,
    /// Run on one target only (the first of the list that made a release): migrations.
    pub once: bool,
    /// Killed (SIGTERM to its process group, SIGKILL 5 s later) and failed past this.
    pub timeout: Duration,
}

/// The hooks of a deploy ([`Options::hooks`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hooks {
    /// Run in the new release once every target committed, before any swap; a failure on
    /// any target aborts the deploy everywhere (nothing activated).
    pub before_activate: Vec<Hook>,
    /// Run in the new release once every target switched to it.
    pub after_activate: Vec<Hook>,
    /// An `after_activate` failure switches every target back to its previous release.
    pub rollback_on_failure: bool,
    /// The environment's name, for the hooks' `FLIP_ENV` (empty for a single target).
    pub env: Option<String>,
}

/// When a hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookPhase {
    /// Before the swap of `current` (`before_activate`).
    BeforeActivate,
    /// After the swap (`after_activate`).
    AfterActivate,
}

impl HookPhase {
    /// `before_activate` or `after_activate`, as in `flip.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            HookPhase::BeforeActivate => "before_activate",
            HookPhase::AfterActivate => "after_activate",
        }
    }
}

/// How one hook went on one target ([`crate::HostReport::hooks`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HookReport {
    /// When it ran.
    pub phase: HookPhase,
    /// The command.
    pub run: String,
    /// Its exit status; `None` when a signal ended it.
    pub status: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Killed because it ran past its timeout.
    pub timed_out: bool,
    /// How long it ran, in milliseconds.
    pub duration_ms: u64,
}

impl HookReport {
    /// Exited 0 within its timeout.
    pub fn ok(&self) -> bool {
        self.status == Some(0) && !self.timed_out
    }

    /// How it failed: "exit status 3", "killed by signal 9", "timed out after 1 s (killed)".
    pub fn how(&self, timeout: Duration) -> String {
        if self.timed_out {
            format!(
                "timed out after {} (killed)",
                humantime::format_duration(timeout)
            )
        } else if let Some(s) = self.status {
            format!("exit status {s}")
        } else {
            format!("killed by signal {}", self.signal.unwrap_or(0))
        }
    }
}

/// Runs `phase`'s hooks on every target of `hosts` that `eligible` says made a release (for
/// after hooks: went live). Returns the indexes of the targets where a hook failed; such a
/// target's `hook_error` says which and how.
pub(crate) fn run_phase(
    hosts: &mut [Prepared],
    phase: HookPhase,
    o: &Options,
    events: &Arc<dyn Events>,
    eligible: &(dyn Fn(&Host) -> bool + Sync),
) -> Vec<usize> {
    let hooks = match phase {
        HookPhase::BeforeActivate => &o.hooks.before_activate,
        HookPhase::AfterActivate => &o.hooks.after_activate,
    };
    if hooks.is_empty() {
        return Vec::new();
    }
    let Some(first) = hosts.iter().position(|h| h.as_ref().is_ok_and(eligible)) else {
        return Vec::new();
    };
    let bound = bound(hooks);
    // A failure stops the hooks everywhere when it undoes the deploy everywhere (before the
    // swap, or after it with `rollback_on_failure`). After a swap that stays, every target is
    // live with the new release and still needs its own hooks (a PHP-FPM reload): each one
    // stops only at its own failure.
    let everywhere = phase == HookPhase::BeforeActivate || o.hooks.rollback_on_failure;
    let stop = AtomicBool::new(false);
    let stop = &stop;
    let failed = keeping_alive(
        hosts.iter_mut().enumerate().collect(),
        |(_, h)| h.as_mut().ok().map(|h| &mut h.session),
        |(i, h)| match h.as_mut() {
            Ok(h) if eligible(h) => {
                events.phase(h.index, Phase::Hooks);
                let target = h.target.clone();
                let own = AtomicBool::new(false);
                let stop = if everywhere { stop } else { &own };
                let (mut reports, error) = run_list(
                    &mut h.session,
                    Run {
                        release: h.release,
                        index: h.index,
                        target: &target,
                        first: *i == first,
                        bound,
                        stop,
                    },
                    hooks,
                    phase,
                    o.hooks.env.as_deref(),
                    &**events,
                );
                h.hooks.append(&mut reports);
                let failed = error.is_some();
                h.hook_error = error;
                if !failed {
                    events.phase(
                        h.index,
                        match phase {
                            HookPhase::BeforeActivate => Phase::Committed,
                            HookPhase::AfterActivate => Phase::Live,
                        },
                    );
                }
                failed
            }
            _ => false,
        },
    );
    failed
        .into_iter()
        .enumerate()
        .filter_map(|(i, f)| f.then_some(i))
        .collect()
}

/// The longest a target may run `hooks`: every one to its timeout and the kill grace, and a
/// minute more (what the agent is told to wait for the next request, at least).
pub(crate) fn bound(hooks: &[Hook]) -> Duration {
    hooks
        .iter()
        .map(|h| h.timeout + Duration::from_millis(flip_wire::HOOK_KILL_GRACE_MS))
        .sum::<Duration>()
        + Duration::from_secs(60)
}

/// `f` of every item, in parallel (see [`each_in_parallel`]); an item whose `f` is done keeps
/// its session (`session_of`) alive with a `Status` every [`KEEPALIVE`] until every `f` is.
pub(crate) fn keeping_alive<I: Send, R: Send>(
    items: Vec<I>,
    session_of: impl Fn(&mut I) -> Option<&mut Session> + Sync,
    f: impl Fn(&mut I) -> R + Sync,
) -> Vec<R> {
    let running = AtomicUsize::new(items.len());
    let running = &running;
    each_in_parallel(items, |mut item| {
        let r = f(&mut item);
        running.fetch_sub(1, Ordering::SeqCst);
        if let Some(s) = session_of(&mut item) {
            let mut last = Instant::now();
            while running.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(Duration::from_millis(50));
                if last.elapsed() >= KEEPALIVE {
                    last = Instant::now();
                    let _ = s.status();
                }
            }
        }
        r
    })
}

/// Where a list of hooks runs.
pub(crate) struct Run<'a> {
    /// The release the hooks run in (their working directory).
    pub release: u64,
    /// The target's index, for [`Events::hook_line`].
    pub index: usize,
    /// The target as displayed (`FLIP_TARGET`).
    pub target: &'a str,
    /// The first target: `once` hooks run here only.
    pub first: bool,
    /// How long the agent is to wait for the next request afterwards, at least ([`bound`]).
    pub bound: Duration,
    /// Set on a failure anywhere: no further hook starts.
    pub stop: &'a Stop,
}

/// Once a hook failed on one target, no further hook starts on any (one running goes to its
/// end): a migration does not run for a deploy that is being aborted.
pub(crate) type Stop = AtomicBool;

/// Runs `hooks` in order on one target (the `once` ones only on the first), stopping at the
/// first failure here or elsewhere (`stop`, set on a failure): what ran, and the failure.
pub(crate) fn run_list(
    session: &mut Session,
    at: Run,
    hooks: &[Hook],
    phase: HookPhase,
    env_name: Option<&str>,
    events: &dyn Events,
) -> (Vec<HookReport>, Option<DeployError>) {
    let (bound, stop) = (at.bound, at.stop);
    let mut env = vec![format!("FLIP_TARGET={}", at.target)];
    if let Some(e) = env_name {
        env.push(format!("FLIP_ENV={e}"));
    }
    let mut reports = Vec::new();
    for hook in hooks.iter().filter(|k| at.first || !k.once) {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let r = session.hook(
            at.release,
            &hook.run,
            hook.timeout.as_millis().max(1) as u64,
            env.clone(),
            bound.as_millis() as u64,
            &mut |stream, line| events.hook_line(at.index, stream, line),
        );
        match r {
            Ok(end) => {
                let rep = HookReport {
                    phase,
                    run: hook.run.clone(),
                    status: end.status,
                    signal: end.signal,
                    timed_out: end.timed_out,
                    duration_ms: end.duration_ms,
                };
                let ok = rep.ok();
                let how = rep.how(hook.timeout);
                reports.push(rep);
                if !ok {
                    stop.store(true, Ordering::SeqCst);
                    let e = DeployError::Hook {
                        target: at.target.to_string(),
                        phase: phase.as_str(),
                        run: hook.run.clone(),
                        how,
                    };
                    return (reports, Some(e));
                }
            }
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                return (reports, Some(e.into()));
            }
        }
    }
    (reports, None)
}
