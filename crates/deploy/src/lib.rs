//! The client's deploy pipeline, on one target or many: [`deploy`] reads as the deploy does.
//!
//! Options in ([`Options`], one list of [`Target`]s), serde reports out ([`Deployment`],
//! [`HostReport`]); the binary only renders them. Every target goes through the same phases:
//!
//! 1. **Phase 1**, on every target at once (at most [`Options::parallel`] at a time), while the
//!    source is scanned once: connect and lock, describe the manifest (the live release, and
//!    whether it already is this tree), stage, send, commit. Nothing is live yet.
//! 2. If any target failed in phase 1, every release committed elsewhere is discarded (the agent
//!    removes it: [`flip_wire::Request::Discard`]) and no target changes; the error names the
//!    target.
//! 3. **Phase 2**, with every lock still held: activate everywhere. If an activation fails, the
//!    targets already switched are switched back and their new releases discarded; the report
//!    says which target is on which release.
//! 4. Prune, once every target is live.
//!
//! A target whose live release already is the new tree (same manifest digest, intact) makes no
//! release ([`HostReport::unchanged`]) unless [`Options::force_release`].

#![warn(missing_docs, unreachable_pub)]

mod env;
mod hooks;
mod order;
mod stream;
mod target;

pub use env::{label_rows, switch, LabelRow, SwitchOutcome, SwitchPlan};
pub use flip_wire::HookStream;
pub use hooks::{Hook, HookPhase, HookReport, Hooks, DEFAULT_TIMEOUT as DEFAULT_HOOK_TIMEOUT};
pub use target::{SshSettings, Target};

use flip_manifest::{Digest, Manifest, RelPath};
use flip_plan::report::{Counts, Item};
use flip_plan::shared::SharedPaths;
use flip_transfer::{ContentAhead, ContentCache, ManifestCache, Session, TransferError};
use flip_wire::{Holder, Leftover, Purpose, ReleaseSummary};
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Why a deploy (or one target of it) failed. Every message names the target or path.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// A wrong invocation: a target inside the source, an unparsable target.
    #[error("{0}")]
    Usage(String),
    /// What the target holds does not allow the request: no such release, nothing to roll
    /// back to (the message names the target).
    #[error("{0}")]
    TargetState(String),
    /// The source is missing or not a directory.
    #[error("{0}")]
    Source(String),
    /// The scan of the source failed.
    #[error(transparent)]
    Scan(#[from] flip_scan::ScanError),
    /// The session with a target's agent failed (the agent's error, or the connection's).
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// A target could not be reached (SSH, or starting the local agent).
    #[error(transparent)]
    Transport(#[from] flip_transport::TransportError),
    /// The running flip executable, started as the agent of local targets, cannot be found.
    #[error("cannot find the flip executable: {0}")]
    Exe(std::io::Error),
    /// This target was ready, but the deploy stopped because of another target.
    #[error("{target}: not activated: {why}")]
    Aborted {
        /// The target, as given.
        target: String,
        /// Why the deploy stopped (the other target's failure).
        why: String,
    },
    /// With `--wait`, the deploy waited for this target's lock while it held the lock of a
    /// target named after it: it gave way (see the `order` module) and starts again once the
    /// lock is free. Only an attempt the deploy does not report ends with it.
    #[error("{target}: gave way to the deploy that holds its lock (locks are waited for in the order of the targets' names)")]
    GaveWay {
        /// The target, as given.
        target: String,
    },
    /// A hook failed or timed out on this target (`phase`: `before_activate` or
    /// `after_activate`; `how`: "exit status 3", "timed out after 1s (killed)", ...).
    #[error("{target}: {phase} hook `{run}` failed: {how}")]
    Hook {
        /// The target, as given.
        target: String,
        /// `before_activate` or `after_activate`.
        phase: &'static str,
        /// The hook's command.
        run: String,
        /// How it failed: "exit status 3", "timed out after 1s (killed)", ...
        how: String,
    },
}

/// What a deploy is asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// The directory deployed.
    pub source: PathBuf,
    /// Gitignore-style patterns left out, on top of the source's `.flipignore`.
    pub excludes: Vec<String>,
    /// Read `SOURCE/.flipignore`.
    pub flipignore: bool,
    /// Stored with each release; ties the releases of one deploy together across targets.
    pub label: Option<String>,
    /// Releases kept on each target after the deploy.
    pub keep: u32,
    /// Make the new releases live (`false`: stage and commit only).
    pub activate: bool,
    /// List every changed path in the reports.
    pub itemize: bool,
    /// flip's cache directory (hashes, manifests, content); `None`: no caches.
    pub cache_dir: Option<PathBuf>,
    /// zstd level of the connections; `None`: adaptive over SSH ([`flip_wire::ADAPTIVE`]), off
    /// locally ([`Target::compress_level`]).
    pub compress_level: Option<i32>,
    /// Every file goes whole (no patch, no rsync delta); `None`: yes for a local target, no
    /// over SSH ([`Target::whole_files`]).
    pub whole_file: Option<bool>,
    /// Wait for a target's lock instead of failing.
    pub wait: bool,
    /// Make a release even where the live one already is this tree.
    pub force_release: bool,
    /// Targets worked on at once in phase 1; 0 = all.
    pub parallel: usize,
    /// A deploy creates the target's missing parent directories too (`--mkpath`); otherwise
    /// only the target directory itself, when its parent exists.
    pub mkpath: bool,
    /// How SSH targets are reached (options, identity, agent path, timeouts).
    pub ssh: SshSettings,
    /// Shared paths and writable directories (`shared_dirs`, `shared_files`, `writable_dirs`,
    /// `writable_mode`); empty: none, and the agent is not asked about them.
    pub shared: SharedPaths,
    /// `writable_owner`: `user` or `user:group` of the writable directories, applied where the
    /// agent runs as root.
    pub writable_owner: Option<String>,
    /// Commands run on the targets around the swap (none by default).
    pub hooks: Hooks,
}

/// What the binary hears while a deploy runs (progress lines). Called from worker threads.
pub trait Events: Send + Sync {
    /// Target number `host` (index into the targets) reached `phase`.
    fn phase(&self, _host: usize, _phase: Phase) {}
    /// Target `host` is locked by `holder`; the deploy waits (`Options::wait`).
    fn waiting(&self, _host: usize, _holder: &str) {}
    /// The scan of the source starts; `meter` counts the files it looks at as it goes (read it
    /// on your own schedule: the scan only adds to atomics).
    fn scanning(&self, _meter: &flip_scan::ScanMeter) {}
    /// The scan of the source ended (done or failed).
    fn scanned(&self) {}
    /// Target `host` starts staging; `meter` counts the file content it sends as it goes.
    fn sending(&self, _host: usize, _meter: &flip_transfer::SendMeter) {}
    /// A hook running on target `host` wrote `line` (without its newline) to `stream`.
    fn hook_line(&self, _host: usize, _stream: flip_wire::HookStream, _line: &str) {}
}

/// No progress reporting.
pub struct Quiet;
impl Events for Quiet {}

/// Where one target is in the pipeline, for progress lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Connecting to the target and greeting its agent.
    Connecting,
    /// Connected, waiting for the scan of the source.
    Scanning,
    /// The scan done, waiting for the target's answers to the lock, the status and the check
    /// of its live release: on a server whose agent is still starting (the SSH login shell
    /// reads its startup files), that start too.
    Checking,
    /// A first deploy sending each file as the scan reads it (`stream`).
    Streaming,
    /// Staging the release and sending content.
    Staging,
    /// The release is committed; waiting for the other targets before activating.
    Committed,
    /// The live release already is this tree: nothing staged.
    Unchanged,
    /// Swapping `current` to the new release.
    Activating,
    /// The new release is live.
    Live,
    /// This target failed.
    Failed,
    /// Not activated because another target failed; its release was discarded.
    Discarded,
    /// Activated, then switched back because another target's activation failed.
    SwitchedBack,
    /// Running hooks.
    Hooks,
}

impl Phase {
    /// The phase as a progress line says it ("staging and sending", "live", ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Scanning => "waiting for the scan",
            Phase::Checking => "checking the target",
            Phase::Streaming => "sending as the scan reads",
            Phase::Staging => "staging and sending",
            Phase::Committed => "committed, waiting for the other targets",
            Phase::Unchanged => "unchanged",
            Phase::Activating => "activating",
            Phase::Live => "live",
            Phase::Failed => "failed",
            Phase::Discarded => "not activated (release discarded)",
            Phase::SwitchedBack => "switched back",
            Phase::Hooks => "running hooks",
        }
    }
}

/// Bytes of one target's deploy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Bytes {
    /// Crossed the connection to the agent, after compression.
    pub sent: u64,
    /// Crossed the connection from the agent, after compression.
    pub received: u64,
    /// Files sent whole, before compression.
    pub literal: u64,
    /// What the target already had (linked, copied, unchanged parts of deltas).
    pub matched: u64,
    /// Deltas and patches sent, before compression.
    pub delta: u64,
    /// The zstd level the stream to the agent ended at (0: uncompressed; over SSH it follows
    /// the link unless `--compress-level` fixed it).
    pub compress_level: i32,
}

/// What a deploy did on one target: the single-target `flip deploy --json` object.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostReport {
    /// The new release (the live one, when `unchanged`).
    pub release: u64,
    /// The release live before (the same as `release` when `unchanged`, as `flip activate`
    /// of the live release says).
    pub previous: Option<u64>,
    /// The target, as given.
    pub target: String,
    /// The deploy's label, stored with the release.
    pub label: Option<String>,
    /// Whether `release` is live on this target now (true when `unchanged`: it stays live).
    pub activated: bool,
    /// The live release already was this tree: no release was made.
    pub unchanged: bool,
    /// Files and directories by what happened to them (created, changed, linked, deleted, ...).
    #[serde(flatten)]
    pub counts: Counts,
    /// Unchanged files copied into a new inode rather than hard-linked from the live release
    /// (counted in `files.copied`): their inode there was not as flip recorded it (owner,
    /// group, mode, link count or last change), or the kernel refused the link.
    pub unchanged_copied: u64,
    /// Notes on what the deploy did otherwise than planned (absent from the JSON when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Bytes sent, received, matched and sent as deltas.
    pub bytes: Bytes,
    /// Every changed path with `Options::itemize`, else those the deploy deviated from the
    /// plan for. Rendered by the binary.
    #[serde(skip)]
    pub items: Vec<Item>,
    /// Releases pruned after the deploy.
    pub pruned: Vec<u64>,
    /// What the agent could not remove.
    pub leftovers: Vec<Leftover>,
    /// Problems that did not stop the deploy.
    pub warnings: Vec<String>,
    /// Shared paths this deploy seeded into the target's `shared/` (their source content was
    /// sent, and is counted with the files); absent from the JSON when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub seeded: Vec<String>,
    /// The hooks run on this target, in order (left out of the JSON when none ran).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<HookReport>,
    /// Wall time of this target's deploy, in milliseconds.
    pub duration_ms: u64,
    /// Round trips with the agent beyond opening the connection (the SSH login): each time
    /// the client waited for answers after sending all it could.
    pub round_trips: u64,
}

/// How one target ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// The new release is live.
    Live,
    /// The live release already was this tree.
    Unchanged,
    /// Committed, not activated, as asked (`Options::activate` off).
    Staged,
    /// Ready, but another target failed: its release was discarded, nothing changed.
    Discarded,
    /// Activated, then switched back because another target's activation failed.
    SwitchedBack,
    /// This target failed.
    Failed,
}

/// One target's outcome.
#[derive(Debug)]
pub struct HostOutcome {
    /// The target, as given.
    pub target: String,
    /// How it ended.
    pub state: HostState,
    /// What it did, as far as it got (`None`: it failed before staging).
    pub report: Option<HostReport>,
    /// Why it failed or was not activated, or the hook that failed on it; `None` when all went
    /// well.
    pub error: Option<DeployError>,
    /// The release live on it now, as far as the client knows.
    pub live: Option<u64>,
    /// Whether the client read what is live there (a target that failed before its status
    /// was read, on its lock say, has `live` `None` without knowing).
    pub live_known: bool,
    /// A failed target's warnings and what it could not remove, as its agent said before the
    /// failure (a damaged release it skipped, ...); a target that did not fail has them in its
    /// report.
    pub warnings: Vec<String>,
    /// What a failed target's agent could not remove (see `warnings`).
    pub leftovers: Vec<Leftover>,
}

/// The result of [`deploy`]: every target's outcome, in the order given.
#[derive(Debug)]
pub struct Deployment {
    /// The deploy's label, stored with each release.
    pub label: Option<String>,
    /// Every target's outcome, in the order given.
    pub hosts: Vec<HostOutcome>,
    /// The client's warnings: the scan's (files skipped, a cache that could not be used) and
    /// the local caches' (a manifest or content that could not be kept).
    pub scan_warnings: Vec<String>,
    /// Wall time of the whole deploy, in milliseconds.
    pub duration_ms: u64,
}

impl Deployment {
    /// Every target is live on the new release (or already was on this tree).
    pub fn all_live(&self) -> bool {
        self.hosts
            .iter()
            .all(|h| matches!(h.state, HostState::Live | HostState::Unchanged))
    }

    /// Every target did what was asked: live (or unchanged), or committed and left inactive
    /// when the deploy was asked not to activate.
    pub fn succeeded(&self) -> bool {
        self.hosts.iter().all(|h| {
            matches!(
                h.state,
                HostState::Live | HostState::Unchanged | HostState::Staged
            )
        })
    }
}

/// Deploys `o.source` to every target, in two phases (see the [crate docs](crate)).
///
/// `Err` only for what stops the deploy before any target is touched: a bad source, a target
/// inside the source, a failed scan. Everything else is per target, in [`Deployment::hosts`].
///
/// # Errors
/// [`DeployError`] for a bad source, a target inside the source, a failed scan.
pub fn deploy(
    o: &Options,
    targets: &[Target],
    events: Arc<dyn Events>,
) -> Result<Deployment, DeployError> {
    let names: Vec<String> = targets.iter().map(Target::display).collect();
    loop {
        let book = Arc::new(order::LockBook::new(&names, o.wait));
        let done = deploy_once(o, targets, events.clone(), &book)?;
        let Some(k) = book.gave_way() else {
            return Ok(done);
        };
        // Nothing of that attempt went live and its locks are released: wait for the lock it
        // gave way to, alone, then start again.
        lock_alone(&targets[k], o, Purpose::Deploy, &mut |h| {
            events.waiting(k, h)
        })?;
    }
}

/// Waits for `target`'s lock (for `purpose`) in a session of its own, holding no other, and
/// lets go of it at once: what an attempt that gave way to a lock holder does before it
/// starts again (see [`order`]); `on_wait` hears the holder.
///
/// # Errors
/// Connecting, the lock's answer, or closing the session.
pub(crate) fn lock_alone(
    target: &Target,
    o: &Options,
    purpose: Purpose,
    on_wait: &mut dyn FnMut(&str),
) -> Result<(), DeployError> {
    let mut s = lock_queued(target, o, purpose)?;
    s.locked(on_wait)?;
    Ok(s.close()?)
}

/// One attempt of [`deploy`]; with `--wait`, it may give way (see [`order`]).
fn deploy_once(
    o: &Options,
    targets: &[Target],
    events: Arc<dyn Events>,
    book: &Arc<order::LockBook>,
) -> Result<Deployment, DeployError> {
    let started = Instant::now();
    let source = check_source(&o.source, targets, &o.shared)?;
    let caches = Arc::new(Caches::open(o.cache_dir.as_deref()));
    // Phase 1 on every target (connect and lock, describe, stage, send, commit), its
    // connections opened while the source is scanned, once for all of them.
    let scanned = Arc::new(Shared::new());
    // One target this client never made a release live on: the scan may stream into it.
    let (feed, drain) = match targets {
        [t] if o.shared.is_empty() && caches.last_live(&t.display()).is_none() => {
            let (f, d) = stream::queue();
            (Some(f), Some(d))
        }
        _ => (None, None),
    };
    let drain = Arc::new(Mutex::new(drain));
    let workers = phase1(
        o,
        &source,
        targets,
        &caches,
        &scanned,
        events.clone(),
        drain,
        book.clone(),
    );
    let meter = flip_scan::ScanMeter::default();
    events.scanning(&meter);
    let scan = scan_source(&source, o, meter, feed);
    events.scanned();
    let scan = scan.inspect_err(|_| workers.abandon_after(&scanned))?;
    let scan = Arc::new(scan);
    scanned.set(Some(scan.clone()));
    patch_ahead(o, &source, targets, &caches, &scan.manifest, &workers);
    let mut hosts = workers.join();
    // Phase 2, every lock still held: all live together, or none.
    let mut warnings = scan.warnings.clone();
    let mut states = if hosts.iter().any(|h| h.is_err()) {
        abort(&mut hosts, targets, &events)
    } else {
        let mut manifests: Vec<&Manifest> = hosts
            .iter()
            .filter_map(|h| h.as_ref().ok())
            .map(|h| h.manifest.as_deref().unwrap_or(&scan.manifest))
            .collect();
        manifests.dedup_by(|a, b| a.digest() == b.digest());
        warnings.extend(caches.remember(&manifests));
        let made = |h: &Host| !h.unchanged && !h.skipped;
        match o.activate {
            // Every release committed, nothing live yet: the before hooks, anywhere failing
            // aborts everywhere.
            true if !hooks::run_phase(&mut hosts, HookPhase::BeforeActivate, o, &events, &made)
                .is_empty() =>
            {
                abort(&mut hosts, targets, &events)
            }
            true => {
                let mut states = activate_all(&mut hosts, targets, o, &events);
                after_hooks(&mut hosts, &mut states, o, &events);
                states
            }
            false => vec![HostState::Staged; hosts.len()],
        }
    };
    // A release staged without activation (`--no-activate`) prunes too: the live release and
    // its rollback target are kept whatever the count, and so is the staged one, the newest
    // (at least one kept).
    if states
        .iter()
        .all(|s| matches!(s, HostState::Live | HostState::Unchanged))
    {
        prune_all(&mut hosts, o.keep);
    } else if states.iter().all(|s| *s == HostState::Staged) {
        prune_all(&mut hosts, o.keep.max(1));
    }
    let live_digests: Vec<Option<Digest>> = hosts
        .iter()
        .map(|h| {
            let h = h.as_ref().ok()?;
            Some(h.manifest.as_deref().unwrap_or(&scan.manifest).digest())
        })
        .collect();
    let hosts = finish(hosts, &mut states, targets, o);
    for (h, d) in hosts.iter().zip(live_digests) {
        if let (HostState::Live | HostState::Unchanged, Some(d)) = (h.state, d) {
            caches.record_live(&h.target, &d);
        }
    }
    Ok(Deployment {
        label: o.label.clone(),
        hosts,
        scan_warnings: warnings,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Phase 2 switched every target: the after hooks on each target that went live; a failure
/// switches every target back with `rollback_on_failure`.
fn after_hooks(
    hosts: &mut [Prepared],
    states: &mut [HostState],
    o: &Options,
    events: &Arc<dyn Events>,
) {
    if !states
        .iter()
        .all(|s| *s == HostState::Live || *s == HostState::Unchanged)
    {
        return;
    }
    let live = |h: &Host| !h.unchanged && !h.skipped;
    let failed = hooks::run_phase(hosts, HookPhase::AfterActivate, o, events, &live);
    if failed.is_empty() {
        return;
    }
    // The targets by name: each one's own error says how its hook failed.
    let on: Vec<&str> = failed
        .iter()
        .filter_map(|&i| Some(hosts[i].as_ref().ok()?.target.as_str()))
        .collect();
    let why = format!("an after_activate hook failed on {}", on.join(", "));
    if o.hooks.rollback_on_failure {
        let switched = each_in_parallel(hosts.iter_mut().zip(states.iter()), |(h, st)| match h {
            Ok(h) if *st == HostState::Live => Some(switch_back(h, &why, events)),
            _ => None,
        });
        for (st, sw) in states.iter_mut().zip(switched) {
            if let Some(sw) = sw {
                *st = sw;
            }
        }
    } else {
        for h in hosts.iter_mut().filter_map(|h| h.as_mut().ok()) {
            if h.hook_error.is_none() && !h.unchanged {
                h.warnings.push(format!(
                    "release {} stays live although {why} (rollback_on_failure is off)",
                    h.release
                ));
            }
        }
    }
}

/// The round trip from which a stage ahead is prepared ([`flip_wire::Request::Prepare`]):
/// the agent's wait for the stage is about a round trip, and linking a release ahead, then
/// removing what the new one does not keep, cost it ~20-30 ms more than staging at once on the
/// benchmark's 2-core machine (12,000 files, client and server on it; measured at loopback,
/// where it made a vendor upgrade ~25 ms slower, and at 50 ms, where it made upgrades ~15 ms
/// faster).
const PREPARE_ROUND_TRIP: Duration = Duration::from_millis(20);

/// A target in the pipeline, past phase 1.
struct Host {
    index: usize,
    /// The target, as displayed (`FLIP_TARGET` of its hooks).
    target: String,
    /// The hooks run on it, in order.
    hooks: Vec<HookReport>,
    /// A hook failed on it ([`DeployError::Hook`]) or could not be run.
    hook_error: Option<DeployError>,
    session: Session,
    started: Instant,
    /// The release live before the deploy.
    previous: Option<u64>,
    /// The status was read: `previous` is known.
    status_read: bool,
    /// The release committed (the live one when `unchanged`).
    release: u64,
    unchanged: bool,
    /// Another target had failed before this one staged: nothing was staged here.
    skipped: bool,
    /// Regular files of the new manifest.
    files: u64,
    report: Option<flip_transfer::DeployReport>,
    pruned: Vec<u64>,
    warnings: Vec<String>,
    /// The shared paths the target's `shared/` already had.
    present: BTreeSet<RelPath>,
    /// The release's manifest when shared paths make it differ from the scan's.
    manifest: Option<Arc<Manifest>>,
    /// Shared paths seeded by this deploy.
    seeded: Vec<String>,
    /// A `Prune` is queued, to go with `Bye`.
    prune_queued: bool,
    /// One target without hooks: `Commit`, `Activate`, `Prune` and `Bye` were queued together
    /// after the content (one round trip); their answers are read in phase 2 and at the end.
    pipelined: bool,
    /// The agent ended the session in the status's round trip (`EndIfLive`: nothing changes):
    /// the ids it pruned, or why pruning failed. Its `Bye` is on its way.
    ended: Option<Result<Vec<u64>, String>>,
}

/// A failed target: the error, and the release live on it if the client saw it.
struct Failed {
    error: Box<DeployError>,
    live: Option<u64>,
    /// The status was read (`live` is known).
    live_known: bool,
    /// What the target warned about before it failed.
    warnings: Vec<String>,
    leftovers: Vec<Leftover>,
}

/// Phase 1's outcome of one target.
type Prepared = Result<Host, Failed>;

/// The source directory, absolute, checked as a deploy checks it before anything is sent: a
/// directory, not overlapping a local target, and (with shared paths) with none of them, nor a
/// writable directory, of the wrong kind. `flip deploy --dry-run` checks it the same way.
///
/// # Errors
/// [`DeployError::Source`] (exit 4) naming what is wrong, [`DeployError::Usage`] for invalid
/// shared-path settings or a target inside the source.
pub fn check_source(
    source: &Path,
    targets: &[Target],
    shared: &SharedPaths,
) -> Result<PathBuf, DeployError> {
    let source = checked_source(source, targets)?;
    if !shared.is_empty() {
        check_shared_source(&source, shared)?;
    }
    Ok(source)
}

/// The source directory, absolute, checked to be a directory not overlapping a local target.
fn checked_source(source: &Path, targets: &[Target]) -> Result<PathBuf, DeployError> {
    let abs = match std::fs::metadata(source) {
        Ok(m) if m.is_dir() => std::path::absolute(source)
            .map_err(|e| DeployError::Source(format!("source {}: {e}", source.display())))?,
        Ok(_) => {
            return Err(DeployError::Source(format!(
                "source {} is not a directory",
                source.display()
            )))
        }
        Err(e) => {
            return Err(DeployError::Source(format!(
                "source directory {}: {e}",
                source.display()
            )))
        }
    };
    for t in targets {
        refuse_overlap(&abs, t)?;
    }
    Ok(abs)
}

/// Refuses, before any connection, a source whose shared path is of the wrong kind (a file
/// where a directory is shared, a symlink) or sits below something that is not a directory.
fn check_shared_source(source: &Path, shared: &SharedPaths) -> Result<(), DeployError> {
    shared
        .validate()
        .map_err(|e| DeployError::Usage(e.to_string()))?;
    let mut checks: Vec<(RelPath, Option<flip_plan::shared::SharedKind>)> = shared
        .all()
        .into_iter()
        .map(|(p, k)| (p, Some(k)))
        .collect();
    // Every writable directory, those below a shared directory too: a first deploy seeds the
    // shared directory from the source, and one whose writable directory is a file there
    // failed after the seed was in place, then every later deploy refused the target.
    let mut writable = shared.writable_in_release();
    writable.extend(shared.writable_in_shared());
    checks.extend(writable.into_iter().map(|p| (p, None)));
    for (p, kind) in checks {
        let comps: Vec<&str> = p.components().collect();
        let mut cur = source.to_path_buf();
        for (i, c) in comps.iter().enumerate() {
            cur.push(c);
            let last = i + 1 == comps.len();
            let m = match std::fs::symlink_metadata(&cur) {
                Ok(m) => m,
                Err(_) => break,
            };
            let (ok, expected) = match (last, kind) {
                (true, Some(flip_plan::shared::SharedKind::File)) => {
                    (m.is_file(), "a regular file")
                }
                _ => (m.is_dir(), "a directory"),
            };
            if !ok {
                let found = if m.file_type().is_symlink() {
                    "a symlink"
                } else if m.is_dir() {
                    "a directory"
                } else if m.is_file() {
                    "a regular file"
                } else {
                    "a special file"
                };
                let why = match (last, kind) {
                    (true, Some(flip_plan::shared::SharedKind::Dir)) => {
                        "it is in shared_dirs".into()
                    }
                    (true, Some(flip_plan::shared::SharedKind::File)) => {
                        "it is in shared_files".into()
                    }
                    (true, None) => "it is in writable_dirs".into(),
                    _ => format!("{p} is below it"),
                };
                return Err(DeployError::Source(format!(
                    "{} is {found} in the source, but {why}: it must be {expected} (or absent); nothing was deployed",
                    cur.display()
                )));
            }
        }
    }
    Ok(())
}

fn scan_source(
    source: &Path,
    o: &Options,
    meter: flip_scan::ScanMeter,
    feed: Option<stream::Feed>,
) -> Result<flip_scan::ScanOutput, DeployError> {
    let hash_cache = o.cache_dir.as_ref().map(|d| {
        let key = blake3::hash(source.as_os_str().as_encoded_bytes()).to_hex();
        d.join("hashes").join(&key[..32])
    });
    if let Some(p) = hash_cache.as_ref().and_then(|p| p.parent()) {
        let _ = std::fs::create_dir_all(p);
    }
    let opts = flip_scan::ScanOptions {
        excludes: o.excludes.clone(),
        use_flipignore: o.flipignore,
        hash_cache,
        meter,
    };
    let scan = match &feed {
        Some(f) => flip_scan::scan_streaming(source, &opts, f),
        None => flip_scan::scan(source, &opts),
    };
    // The scan ended: its sender sends what is queued, then the manifest.
    drop(feed);
    let scan = scan?;
    release_free_memory();
    Ok(scan)
}

/// The local caches a deploy reads and feeds: manifests (to send only a difference) and file
/// content (to send patches). Shared by every target of a deploy.
pub struct Caches {
    manifests: Option<ManifestCache>,
    content: Option<ContentCache>,
    /// Per target (by the blake3 of its name), the digest of the manifest this client last
    /// made live there: the release it expects live next time (a guess; the agent checks).
    targets: Option<PathBuf>,
    /// The last manifest read from the cache: the targets of an environment most often have
    /// the same live release, whose manifest is then read and decoded once.
    last_manifest: Mutex<Option<Manifest>>,
}

/// Upper bound of the local cache of deployed file versions (for patches of changed files).
pub const CONTENT_CACHE_BYTES: u64 = 1 << 30;

impl Caches {
    /// The caches under `dir` (`None`: none).
    pub fn open(dir: Option<&Path>) -> Caches {
        Caches {
            manifests: dir.map(|d| ManifestCache::new(d.join("manifests"))),
            content: dir.map(|d| ContentCache::new(d.join("content"), CONTENT_CACHE_BYTES)),
            targets: dir.map(|d| d.join("targets")),
            last_manifest: Mutex::new(None),
        }
    }

    fn target_file(&self, target: &str) -> Option<PathBuf> {
        Some(
            self.targets
                .as_ref()?
                .join(Digest::of(target.as_bytes()).to_hex()),
        )
    }

    /// The digest of the manifest this client last made live on `target` (as displayed), if it
    /// recorded one.
    pub fn last_live(&self, target: &str) -> Option<Digest> {
        let text = std::fs::read_to_string(self.target_file(target)?).ok()?;
        Digest::from_hex(text.trim())
    }

    /// Records that the manifest of digest `d` is live on `target` now (best effort: a record
    /// that cannot be written only costs the next deploy a round trip).
    pub(crate) fn record_live(&self, target: &str, d: &Digest) {
        let Some(file) = self.target_file(target) else {
            return;
        };
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        let written = file
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, d.to_hex()))
            .and_then(|()| std::fs::rename(&tmp, &file));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// The manifest of digest `d`, if this client deployed it and kept it.
    pub fn manifest(&self, d: &Digest) -> Option<Manifest> {
        let mut last = self.last_manifest.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = last.as_ref().filter(|m| m.digest() == *d) {
            return Some(m.clone());
        }
        let m = self.manifests.as_ref()?.get(d)?;
        *last = Some(m.clone());
        Some(m)
    }

    /// This client most likely lacks the live manifest of a target (no manifest cache, or an
    /// empty one: a fresh CI runner): it probes the target's directories ahead of the status.
    pub fn likely_cold(&self) -> bool {
        self.manifests.as_ref().is_none_or(ManifestCache::is_empty)
    }

    /// The cache of file content deployed (bases of patches), if there are caches.
    pub fn content(&self) -> Option<&ContentCache> {
        self.content.as_ref()
    }

    /// [`Caches::content`] for what session `s` sends: none for a target taking whole files,
    /// which never gets a patch (the cache's only use).
    fn content_for(&self, s: &Session) -> Option<&ContentCache> {
        self.content().filter(|_| !s.whole_files())
    }

    /// Keeps the manifests deployed (the next deploy sends only their difference) and the
    /// content sent; returns what could not be kept, as warnings.
    fn remember(&self, ms: &[&Manifest]) -> Vec<String> {
        let mut warnings = Vec::new();
        for m in ms {
            if let Some(Err(e)) = self.manifests.as_ref().map(|c| c.put(m)) {
                warnings.push(format!("cannot cache the manifest: {e}"));
            }
        }
        if let Some(Err(e)) = self.content.as_ref().map(|c| c.finish()) {
            warnings.push(format!("cannot keep deployed content in the cache: {e}"));
        }
        warnings
    }
}

/// A value set once by one thread and awaited by others.
struct Shared<T> {
    value: Mutex<Option<Option<T>>>,
    ready: Condvar,
}

impl<T: Clone> Shared<T> {
    fn new() -> Self {
        Shared {
            value: Mutex::new(None),
            ready: Condvar::new(),
        }
    }

    fn set(&self, v: Option<T>) {
        *self.value.lock().unwrap() = Some(v);
        self.ready.notify_all();
    }

    /// Whether the value is set (without waiting for it).
    fn is_set(&self) -> bool {
        self.value.lock().unwrap().is_some()
    }

    fn wait(&self) -> Option<T> {
        let mut g = self.value.lock().unwrap();
        loop {
            if let Some(v) = g.as_ref() {
                return v.clone();
            }
            g = self.ready.wait(g).unwrap();
        }
    }
}

/// Phase 1's worker threads and the outcome of each target.
struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    results: Arc<Mutex<Vec<Option<Prepared>>>>,
    /// A target failed: no target will go live.
    failed: Arc<AtomicBool>,
    /// A target has staged and sends its content (its own encoding runs).
    sending: Arc<AtomicBool>,
}

/// How long a failed deploy waits for targets still being connected or locked to give up.
const SESSION_END: Duration = Duration::from_secs(10);

impl Workers {
    /// Whether work done for the targets ahead of them is of no more use: every worker is done,
    /// a target failed (none will go live), or one sends its content (its own encoding takes
    /// the cores, and the files' patches are made there, shared through the patch memo).
    fn settled(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
            || self.sending.load(Ordering::SeqCst)
            || self.threads.iter().all(|t| t.is_finished())
    }

    /// Every target's phase-1 result, in target order.
    fn join(self) -> Vec<Result<Host, Failed>> {
        for t in self.threads {
            if let Err(panic) = t.join() {
                std::panic::resume_unwind(panic);
            }
        }
        let mut r = self.results.lock().unwrap();
        std::mem::take(&mut *r)
            .into_iter()
            .map(|h| h.expect("every target was worked on"))
            .collect()
    }

    /// The scan failed: the workers hear it and drop their sessions (the agents remove their
    /// staging and release the locks); wait for that, bounded, so a retry right after finds no
    /// lock.
    fn abandon_after(&self, scanned: &Shared<Arc<flip_scan::ScanOutput>>) {
        scanned.set(None);
        let deadline = Instant::now() + SESSION_END;
        for t in &self.threads {
            while !t.is_finished() {
                if Instant::now() > deadline {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// While the workers still log in (on a real network, round trips in which this client's cores
/// wait), makes the patches they will most likely send (see [`flip_transfer::patch_ahead`]):
/// against the release this client last made live on each target that takes patches, once per
/// distinct release. Stops taking files once the workers are [settled](Workers::settled): a
/// wrong guess then costs at most the login's time, never the deploy's.
fn patch_ahead(
    o: &Options,
    source: &Path,
    targets: &[Target],
    caches: &Caches,
    manifest: &Manifest,
    workers: &Workers,
) {
    let Some(content) = caches.content() else {
        return;
    };
    let mut seen = BTreeSet::new();
    let done = || workers.settled();
    for t in targets.iter().filter(|t| !t.whole_files(o.whole_file)) {
        if done() {
            return;
        }
        let expected = caches
            .last_live(&t.display())
            .filter(|d| *d != manifest.digest() && seen.insert(*d))
            .and_then(|d| caches.manifest(&d));
        if let Some(live) = expected {
            flip_transfer::patch_ahead(source, manifest, &live, content, &done);
        }
    }
}

/// Starts phase 1: `parallel` workers take the targets in order; each connects and locks, waits
/// for the scan, then describes, stages, sends and commits.
#[allow(clippy::too_many_arguments)]
fn phase1(
    o: &Options,
    source: &Path,
    targets: &[Target],
    caches: &Arc<Caches>,
    scanned: &Arc<Shared<Arc<flip_scan::ScanOutput>>>,
    events: Arc<dyn Events>,
    drain: Arc<Mutex<Option<stream::Drain>>>,
    book: Arc<order::LockBook>,
) -> Workers {
    let n = targets.len();
    let width = if o.parallel == 0 {
        n
    } else {
        o.parallel.min(n)
    };
    // One target, activated, without hooks: commit, activate, prune and bye go together.
    let single = n == 1
        && o.activate
        && o.hooks.before_activate.is_empty()
        && o.hooks.after_activate.is_empty();
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let sending = Arc::new(AtomicBool::new(false));
    let results = Arc::new(Mutex::new((0..n).map(|_| None).collect::<Vec<_>>()));
    let threads = (0..width)
        .map(|_| {
            let (o, source, targets) = (o.clone(), source.to_path_buf(), targets.to_vec());
            let (caches, scanned, events) = (caches.clone(), scanned.clone(), events.clone());
            let (next, results, failed) = (next.clone(), results.clone(), failed.clone());
            let sending = sending.clone();
            let drain = drain.clone();
            let book = book.clone();
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(t) = targets.get(i) else { return };
                let drain = drain.lock().unwrap_or_else(|e| e.into_inner()).take();
                let r = prepare(
                    i, t, &o, &source, &caches, &scanned, &*events, &failed, &sending, single,
                    drain, &book,
                );
                if r.is_err() {
                    failed.store(true, Ordering::SeqCst);
                }
                events.phase(
                    i,
                    match &r {
                        Ok(h) if h.unchanged => Phase::Unchanged,
                        Ok(_) => Phase::Committed,
                        Err(_) => Phase::Failed,
                    },
                );
                results.lock().unwrap()[i] = Some(r);
            })
        })
        .collect();
    Workers {
        threads,
        results,
        failed,
        sending,
    }
}

/// Phase 1 on one target: connect and lock, describe the manifest, stage, send, commit.
#[allow(clippy::too_many_arguments)]
fn prepare(
    index: usize,
    target: &Target,
    o: &Options,
    source: &Path,
    caches: &Caches,
    scanned: &Shared<Arc<flip_scan::ScanOutput>>,
    events: &dyn Events,
    failed: &AtomicBool,
    sending: &AtomicBool,
    single: bool,
    drain: Option<stream::Drain>,
    book: &order::LockBook,
) -> Result<Host, Failed> {
    // Lock (and shared paths) go out at once; their answers are read with the status's, after
    // the scan: one round trip for all of them.
    // With the scan over already (a login slower than the scan, as on a real network), the
    // lock and status wait for the rest of the first batch: sent together, they ride in the
    // agent's command line (see `flip_transport`'s preamble).
    let mut host = Host::connect_and_lock(index, target, o, events, &|| !scanned.is_set())?;
    events.phase(index, Phase::Scanning);
    let checking = std::cell::Cell::new(false);
    let check = || {
        if !checking.replace(true) {
            events.phase(index, Phase::Checking);
        }
    };
    // Nothing live (the status read while the scan goes on): the files as the scan reads them.
    let early = match drain {
        Some(d) => {
            let content = caches.content_for(&host.session);
            let streaming = &mut || events.phase(index, Phase::Streaming);
            stream::stream_first(
                &mut host,
                d,
                &mut |h| events.waiting(index, h),
                &mut || check(),
                streaming,
                content,
            )?
        }
        None => None,
    };
    let streamed = early.as_ref().and_then(|e| e.streamed);
    let Some(scan) = scanned.wait() else {
        return Err(host.fail(DeployError::Aborted {
            target: target.display(),
            why: "the scan of the source failed".into(),
        }));
    };
    let checked = match early {
        Some(e) if e.streamed.is_some() => PipelinedStatus {
            current: e.status.0,
            live: None,
            intact: None,
            ended: None,
        },
        early => {
            check();
            host.pipelined_status(
                &scan.manifest,
                o,
                index,
                events,
                caches,
                single,
                early.map(|e| e.status),
                Ahead { source, sending },
                book,
            )
            .map_err(|e| host.fail(e))?
        }
    };
    // With shared paths, the release and what is staged (seeds included) follow from the scan
    // and what this target's shared/ has.
    let applied = match o.shared.is_empty() {
        true => None,
        false => Some(
            o.shared
                .apply(&scan.manifest, &host.present)
                .map_err(|e| host.fail(DeployError::Source(e.to_string())))?,
        ),
    };
    let (release, staged, seeding) = match &applied {
        Some(a) => (&a.release, &a.staged, !a.seeds.is_empty()),
        None => (&scan.manifest, &scan.manifest, false),
    };
    let live = host.describe(release, o, seeding, checked)?;
    // Another target failed already: no target will go live, so stage nothing here.
    host.skipped = failed.load(Ordering::SeqCst) && !host.unchanged;
    if host.unchanged || host.skipped {
        host.session.drop_ahead().map_err(|e| host.fail(e.into()))?;
    }
    if !host.unchanged && !host.skipped {
        sending.store(true, Ordering::SeqCst);
        events.phase(index, Phase::Staging);
        events.sending(index, &host.session.meter());
        host.pipelined = single;
        if single {
            host.session.defer_commit();
        }
        if let Some(a) = applied.as_ref().filter(|a| !a.seeds.is_empty()) {
            // The report counts the release as recorded, each seed a symlink.
            host.session.report_release(Arc::new(a.release.clone()));
        }
        host.stage_send_commit(source, staged, live, caches, o)?;
        if let (Some(r), Some(x)) = (host.report.as_mut(), streamed) {
            stream::account(r, x);
        }
        if single && !host.session.took_ahead() {
            // Nothing comes between commit and activation: all in the content's round trip.
            let s = &mut host.session;
            let queued = s
                .queue_activate(host.release, false)
                .and_then(|()| s.queue_prune(o.keep))
                .and_then(|()| s.queue_bye());
            queued.map_err(|e| host.fail(e.into()))?;
        }
        host.prune_queued = single;
        if let Some(a) = &applied {
            host.seeded = a.seeds.iter().map(|(p, _)| p.to_string()).collect();
        }
    }
    host.manifest = applied.map(|a| Arc::new(a.release));
    Ok(host)
}

impl Host {
    /// Connects, and queues the lock, the status (and the shared paths); sends them at once if
    /// `send_now` says so once connected, for the agent to take the lock while the source is
    /// scanned.
    fn connect_and_lock(
        index: usize,
        target: &Target,
        o: &Options,
        events: &dyn Events,
        send_now: &dyn Fn() -> bool,
    ) -> Result<Host, Failed> {
        events.phase(index, Phase::Connecting);
        let failed = |error: DeployError| Failed {
            error: Box::new(error),
            live: None,
            live_known: false,
            warnings: Vec::new(),
            leftovers: Vec::new(),
        };
        let mut session = connect(target, o, o.mkpath).map_err(failed)?;
        let queued = session
            .queue_lock(holder(Purpose::Deploy), o.wait)
            // The status before the shared paths: a refused shared path still names what is
            // live.
            .and_then(|()| session.queue_status())
            .and_then(|()| {
                if !o.shared.is_empty() {
                    session.queue_shared(&o.shared, o.writable_owner.as_deref())?;
                }
                match send_now() {
                    true => session.send_queued(),
                    false => Ok(()),
                }
            });
        queued.map_err(|e| failed(e.into()))?;
        Ok(Host {
            index,
            target: target.display(),
            hooks: Vec::new(),
            hook_error: None,
            session,
            started: Instant::now(),
            previous: None,
            status_read: false,
            release: 0,
            unchanged: false,
            skipped: false,
            files: 0,
            report: None,
            pruned: Vec::new(),
            warnings: Vec::new(),
            present: BTreeSet::new(),
            manifest: None,
            seeded: Vec::new(),
            prune_queued: false,
            pipelined: false,
            ended: None,
        })
    }

    /// This target's failure, with what is live on it and what it warned about.
    fn fail(&mut self, error: DeployError) -> Failed {
        let mut warnings = self.session.take_warnings();
        warnings.append(&mut self.warnings);
        Failed {
            error: Box::new(error),
            live: self.previous,
            live_known: self.status_read,
            warnings,
            leftovers: self.session.leftovers().unwrap_or_default().to_vec(),
        }
    }

    /// After the scan, in one round trip with the lock, status (and shared paths) queued at
    /// connect time: `CheckLive` for the release the scan most likely makes (with shared paths: as if
    /// `shared/` had them all). Reads every answer: sets what `shared/` has, returns the live
    /// release's id and manifest digest, and the digest checked with the answer. `early`: the
    /// lock's and status's answers, when read already (while the scan went on).
    #[allow(clippy::too_many_arguments)]
    fn pipelined_status(
        &mut self,
        scanned: &Manifest,
        o: &Options,
        index: usize,
        events: &dyn Events,
        caches: &Caches,
        single: bool,
        early: Option<(Option<u64>, Vec<ReleaseSummary>)>,
        ahead: Ahead,
        book: &order::LockBook,
    ) -> Result<PipelinedStatus, DeployError> {
        let cold = caches.likely_cold();
        let applied = match o.shared.is_empty() {
            true => None,
            false => {
                let all: BTreeSet<RelPath> = o
                    .shared
                    .dirs
                    .iter()
                    .chain(&o.shared.files)
                    .cloned()
                    .collect();
                o.shared.apply(scanned, &all).ok()
            }
        };
        let (guess, staged) = match (&applied, o.shared.is_empty()) {
            (_, true) => (Some(scanned.digest()), Some(scanned)),
            (Some(a), false) => (Some(a.release.digest()), Some(&a.staged)),
            (None, false) => (None, None),
        };
        let s = &mut self.session;
        let guess = guess.filter(|_| !o.force_release);
        if let Some(d) = guess {
            s.queue_live_intact(d)?;
        }
        // A client without the live manifest probes every directory now (answered as absent
        // when nothing is live), rather than in a round trip of its own after the status.
        let probe = cold && staged.is_some();
        if let Some(m) = staged.filter(|_| probe) {
            s.queue_probe(m)?;
        }
        // One target, no shared paths, a client that made a release live there and has its
        // manifest: the stage too, against that release (not done if another one is live).
        let expected = caches
            .last_live(&self.target)
            .filter(|d| single && !probe && o.shared.is_empty() && *d != scanned.digest())
            .and_then(|d| caches.manifest(&d));
        // Otherwise, on one target without shared paths, this deploy may change nothing: then
        // the agent prunes and ends the session in this round trip, instead of one more for a
        // `Prune` and a `Bye`.
        let end = single && o.shared.is_empty() && guess.is_some() && expected.is_none();
        if let Some(live) = expected {
            // And its content, commit, activation, prune and bye: the whole upgrade in this
            // round trip. Not while waiting for a lock (the wait's notices are read only once
            // the content is sent).
            let content = (!o.wait).then(|| ContentAhead {
                source: ahead.source,
                cache: caches.content_for(s),
                keep: o.keep,
            });
            if content.is_some() {
                ahead.sending.store(true, Ordering::SeqCst);
                events.phase(index, Phase::Staging);
                events.sending(index, &s.meter());
            }
            // Over SSH the stage reaches the agent a round trip after the requests before it
            // (the channel takes input only once the agent runs): on a link slow enough, the
            // agent links the unchanged files meanwhile.
            if s.round_trip().is_some_and(|rt| rt >= PREPARE_ROUND_TRIP) {
                s.queue_prepare(Some(live.digest()))?;
            }
            s.stage_ahead(scanned, &live, o.label.clone(), o.itemize, content)?;
        }
        if end {
            s.queue_end_if_live(o.keep)?;
        }
        let (current, releases) = match early {
            Some(status) => status,
            None => {
                book.locked(s, index, &self.target, &mut |h| events.waiting(index, h))?;
                s.status_answer()?
            }
        };
        self.previous = current;
        self.status_read = true;
        if !o.shared.is_empty() {
            self.present = self.session.shared_answer()?;
        }
        let s = &mut self.session;
        let live = live_of(current, &releases).map(|r| r.manifest_digest);
        let intact = match guess {
            Some(d) => Some((d, s.live_intact_answer()?)),
            None => None,
        };
        if probe {
            s.probe_answer()?;
        }
        let found_intact = matches!(intact, Some((_, Some(_))));
        let ended = match end {
            false => None,
            true => match s.end_if_live_answer() {
                Ok(None) => None,
                Ok(Some(removed)) => Some(Ok(removed)),
                // Only a prune fails there: the deploy changes nothing all the same.
                Err(e) if found_intact => Some(Err(e.to_string())),
                Err(e) => return Err(e.into()),
            },
        };
        Ok(PipelinedStatus {
            current,
            live,
            intact,
            ended,
        })
    }

    /// Decides whether the live release already is `manifest` (intact: then no release is
    /// made, unless forced or `seeding`: a shared path to seed), from what `checked` read (or
    /// one more `CheckLive` when it checked another digest). Returns the live manifest's digest.
    fn describe(
        &mut self,
        manifest: &Manifest,
        o: &Options,
        seeding: bool,
        checked: PipelinedStatus,
    ) -> Result<Option<Digest>, Failed> {
        let current = checked.current;
        self.previous = current;
        self.status_read = true;
        self.files = manifest.file_count() as u64;
        let live_digest = checked.live;
        if live_digest == Some(manifest.digest()) && !o.force_release && !seeding {
            let intact = match checked.intact {
                Some((d, id)) if d == manifest.digest() => Ok(id),
                _ => self.session.live_intact(manifest.digest()),
            };
            if let Some(id) = intact.map_err(|e| self.fail(e.into()))? {
                self.release = id;
                self.unchanged = true;
            }
        }
        if checked.ended.is_some() && !self.unchanged {
            return Err(self.fail(DeployError::Transfer(TransferError::Protocol {
                peer: self.target.clone(),
                phase: "checking the live release",
                message: "the agent ended the session of a deploy that changes the target".into(),
            })));
        }
        self.ended = checked.ended;
        Ok(live_digest)
    }

    /// Stages the release against the live one (`live_digest`), sends what the target lacks,
    /// commits. With the live manifest in the local cache, only the difference to it is sent.
    fn stage_send_commit(
        &mut self,
        source: &Path,
        manifest: &Manifest,
        live_digest: Option<Digest>,
        caches: &Caches,
        o: &Options,
    ) -> Result<(), Failed> {
        let previous = live_digest
            .filter(|d| *d != manifest.digest())
            .and_then(|d| caches.manifest(&d));
        let report = self
            .session
            .stage(
                source,
                manifest,
                previous,
                o.label.clone(),
                caches.content_for(&self.session),
                live_digest,
                o.itemize,
            )
            .map_err(|e| self.fail(e.into()))?;
        self.release = report.release;
        self.report = Some(report);
        Ok(())
    }
}

/// What [`Host::pipelined_status`] needs to send content ahead of the stage's answer: the
/// source, and the flag that tells `patch_ahead` a target started sending.
struct Ahead<'a> {
    source: &'a Path,
    sending: &'a AtomicBool,
}

/// What [`Host::pipelined_status`] read.
struct PipelinedStatus {
    /// The live release.
    current: Option<u64>,
    /// Its manifest's digest.
    live: Option<Digest>,
    /// The digest `CheckLive` asked about, and the answer (the live id when intact).
    intact: Option<(Digest, Option<u64>)>,
    /// The agent ended the session (`EndIfLive`): what it pruned, or why pruning failed.
    ended: Option<Result<Vec<u64>, String>>,
}

/// Records in the client caches under `cache_dir` that the release of manifest `digest` is live
/// on `target` now, as a deploy does: after a rollback or an activation, this client's next
/// deploy then stages and makes its patches ahead against that release, not the one it replaced
/// (which would cost it a round trip). Best effort: a record that cannot be written only costs
/// that round trip.
pub fn record_live(cache_dir: &Path, target: &Target, digest: &Digest) {
    Caches::open(Some(cache_dir)).record_live(&target.display(), digest);
}

/// Opens a session with `target` and takes its lock for `purpose`; `on_wait` hears the holder
/// when `o.wait` and the target is locked.
///
/// # Errors
/// What opening the session or taking the lock returns (a locked target, a failed
/// connection, ...).
pub fn locked_session(
    target: &Target,
    o: &Options,
    purpose: Purpose,
    on_wait: &mut dyn FnMut(&str),
) -> Result<Session, DeployError> {
    let mut s = lock_queued(target, o, purpose)?;
    s.locked(on_wait)?;
    Ok(s)
}

/// Opens a session with `target` and queues its lock for `purpose` (`o.wait`: waiting for a
/// holder), without waiting: what follows is sent with it, and
/// [`flip_transfer::Session::locked`] reads its answer first.
///
/// # Errors
/// What opening the session returns (a failed connection, ...).
pub fn lock_queued(target: &Target, o: &Options, purpose: Purpose) -> Result<Session, DeployError> {
    let mkpath = o.mkpath && purpose == Purpose::Deploy;
    let mut s = connect(target, o, mkpath)?;
    s.queue_lock(holder(purpose), o.wait)?;
    Ok(s)
}

/// A session with `target`'s agent as `o` asks: its compression level, and whole files or not
/// ([`Target::compress_level`], [`Target::whole_files`]).
fn connect(target: &Target, o: &Options, mkpath: bool) -> Result<Session, DeployError> {
    let mut s = target.connect_agent(&o.ssh, target.compress_level(o.compress_level), mkpath)?;
    if target.whole_files(o.whole_file) {
        s.send_whole_files();
    }
    Ok(s)
}

/// Who takes a lock: this process, user and host, for `purpose`, and this run ([`run_id`]).
pub fn holder(purpose: Purpose) -> Holder {
    Holder {
        pid: std::process::id(),
        host: clip(local_host()),
        user: clip(whoami()),
        since: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
        what: purpose,
        run: run_id().to_string(),
    }
}

/// `text` cut to [`flip_wire::HOLDER_TEXT_MAX`] bytes (whole characters), as the agent takes a
/// holder's texts: a long `$USER` must not stop every deploy.
fn clip(mut text: String) -> String {
    let mut end = text.len().min(flip_wire::HOLDER_TEXT_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

/// This process's run: 16 random hex digits, the same for every lock it takes, so that an
/// agent finding a lock held by the same run (one directory named twice) says so instead of
/// waiting on it. From the standard library's randomly seeded hasher, with the pid and the
/// time.
pub fn run_id() -> &'static str {
    use std::hash::{BuildHasher, Hasher};
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        h.write_u128(now.map_or(0, |d| d.as_nanos()));
        format!("{:016x}", h.finish())
    })
}

fn whoami() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        // SAFETY: getuid cannot fail.
        .unwrap_or_else(|_| format!("uid {}", unsafe { libc::getuid() }))
}

fn local_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// A target failed in phase 1: every release committed elsewhere is discarded; no target is
/// activated.
fn abort(
    hosts: &mut [Result<Host, Failed>],
    targets: &[Target],
    events: &Arc<dyn Events>,
) -> Vec<HostState> {
    // The targets by name: each one's own error says why it failed.
    let culprits: Vec<String> = hosts
        .iter()
        .zip(targets)
        .filter(|(h, _)| h.as_ref().map_or(true, |h| h.hook_error.is_some()))
        .map(|(_, t)| t.display())
        .collect();
    let why = format!("another target failed ({})", culprits.join(", "));
    each_in_parallel(hosts.iter_mut(), |h| match h {
        Err(_) => HostState::Failed,
        Ok(h) if h.unchanged => HostState::Unchanged,
        Ok(h) if h.skipped => {
            events.phase(h.index, Phase::Discarded);
            h.warnings.push(format!("nothing staged: {why}"));
            HostState::Discarded
        }
        Ok(h) => {
            if let Err(e) = h.session.discard(h.release) {
                h.warnings.push(format!(
                    "release {} was committed but could not be discarded (it is not live): {e}",
                    h.release
                ));
            }
            if h.hook_error.is_some() {
                events.phase(h.index, Phase::Failed);
                return HostState::Failed;
            }
            events.phase(h.index, Phase::Discarded);
            h.warnings.push(format!("not activated: {why}"));
            HostState::Discarded
        }
    })
}

/// Phase 2: activates every committed release; if one fails, the targets already switched go
/// back to their previous release and their new release is discarded.
fn activate_all(
    hosts: &mut [Result<Host, Failed>],
    targets: &[Target],
    o: &Options,
    events: &Arc<dyn Events>,
) -> Vec<HostState> {
    let results: Vec<Result<(), DeployError>> = each_in_parallel(hosts.iter_mut(), |h| {
        let h = h.as_mut().ok().expect("phase 1 succeeded everywhere");
        if h.unchanged {
            return Ok(());
        }
        events.phase(h.index, Phase::Activating);
        if h.pipelined {
            h.session.committed(h.release)?;
            h.session.activated()?;
        } else {
            h.session.activate(h.release)?;
        }
        events.phase(h.index, Phase::Live);
        Ok(())
    });
    // The targets by name: each one's own error says why its activation failed.
    let failed: Vec<String> = results
        .iter()
        .zip(targets)
        .filter(|(r, _)| r.is_err())
        .map(|(_, t)| t.display())
        .collect();
    let mut states = Vec::with_capacity(hosts.len());
    for (slot, r) in hosts.iter_mut().zip(results) {
        let h = slot.as_mut().ok().expect("phase 1 succeeded everywhere");
        match r {
            Ok(()) if h.unchanged => states.push(HostState::Unchanged),
            Ok(()) if failed.is_empty() => states.push(HostState::Live),
            Ok(()) => {
                let why = format!("another target's activation failed ({})", failed.join(", "));
                states.push(switch_back(h, &why, events))
            }
            Err(e) => {
                let (previous, release) = (h.previous, h.release);
                let failed = h.fail(e);
                // End the broken session first: its agent releases the lock as it goes.
                *slot = Err(failed);
                let live = recheck(&targets[states.len()], o, previous, release);
                if let Err(f) = slot {
                    f.live = live;
                }
                states.push(HostState::Failed);
            }
        }
    }
    states
}

/// After a failed activation: what is live on the target, seen through a new session; if the
/// new `release` went live after all (the agent died after the swap), it is switched back to
/// `previous`.
fn recheck(target: &Target, o: &Options, previous: Option<u64>, release: u64) -> Option<u64> {
    // This run's broken session of this target may still hold the lock while its agent
    // cleans up: waited for as any holder's, so the holder names no run (the same run's lock
    // is refused at once, as one directory named twice).
    let mut s = connect(target, o, false).ok()?;
    let me = Holder {
        run: String::new(),
        ..holder(Purpose::Deploy)
    };
    s.queue_lock(me, true).ok()?;
    s.queue_status().ok()?;
    s.locked(&mut |_| {}).ok()?;
    let (mut current, _) = s.status_answer().ok()?;
    if current == Some(release) {
        if let Some(p) = previous {
            if s.activate(p).is_ok() {
                current = Some(p);
            }
        }
    }
    let _ = s.close();
    current
}

/// Another target's activation failed: `h` goes back to the release live before (when there
/// was one) and its new release is discarded.
fn switch_back(h: &mut Host, why: &str, events: &Arc<dyn Events>) -> HostState {
    let Some(prev) = h.previous else {
        h.warnings.push(format!(
            "{why}, and this target had no release live before: release {} stays live",
            h.release
        ));
        return HostState::Live;
    };
    match h.session.activate(prev) {
        Ok(_) => {
            if let Err(e) = h.session.discard(h.release) {
                h.warnings
                    .push(format!("release {} could not be discarded: {e}", h.release));
            }
            h.warnings
                .push(format!("switched back to release {prev}: {why}"));
            events.phase(h.index, Phase::SwitchedBack);
            HostState::SwitchedBack
        }
        Err(e) => {
            h.warnings.push(format!(
                "{why} and switching back to release {prev} failed too ({e}): release {} stays live",
                h.release
            ));
            HostState::Live
        }
    }
}

fn prune_all(hosts: &mut [Result<Host, Failed>], keep: u32) {
    std::thread::scope(|sc| {
        for h in hosts.iter_mut().filter_map(|h| h.as_mut().ok()) {
            if h.prune_queued || h.ended.is_some() {
                continue;
            }
            sc.spawn(move || {
                // Sent with `Bye` (in `outcome`): one round trip for both. The deploy is live: a
                // failed cleanup is a warning, never a failed deploy.
                match h.session.queue_prune(keep) {
                    Ok(()) => h.prune_queued = true,
                    Err(e) => h
                        .warnings
                        .push(format!("deployed, but pruning old releases failed: {e}")),
                }
            });
        }
    });
}

/// Closes every session and turns what each target did into its outcome.
fn finish(
    hosts: Vec<Prepared>,
    states: &mut [HostState],
    targets: &[Target],
    o: &Options,
) -> Vec<HostOutcome> {
    // Sessions end in parallel: each close waits for its agent to exit.
    each_in_parallel(
        hosts.into_iter().zip(states.iter()).zip(targets),
        |((h, state), t)| outcome(h, *state, t, o),
    )
}

/// Closes a target's session and says how it ended.
fn outcome(h: Prepared, state: HostState, t: &Target, o: &Options) -> HostOutcome {
    match h {
        Err(f) => HostOutcome {
            target: t.display(),
            state: HostState::Failed,
            report: None,
            error: Some(*f.error),
            live: f.live,
            live_known: f.live_known,
            warnings: f.warnings,
            leftovers: f.leftovers,
        },
        Ok(mut h) => {
            // Queued with the content when pipelined; on its way when the agent ended the
            // session with the status.
            let bye = match h.pipelined || h.ended.is_some() {
                true => Ok(()),
                false => h.session.queue_bye(),
            };
            let mut closing = bye.is_ok();
            match h.ended.take() {
                Some(Ok(removed)) => h.pruned = removed,
                Some(Err(e)) => {
                    closing = false;
                    h.warnings
                        .push(format!("deployed, but pruning old releases failed: {e}"));
                }
                None => {}
            }
            if h.prune_queued {
                match h.session.pruned() {
                    Ok(r) => h.pruned = r,
                    Err(e) => {
                        // The agent answers the `Bye` after it "not done".
                        closing = false;
                        h.warnings
                            .push(format!("deployed, but pruning old releases failed: {e}"))
                    }
                }
            }
            let round_trips = h.session.round_trips();
            let (sent, received) = h.session.bytes();
            let compress_level = h.session.compress_level();
            let mut warnings = h.session.take_warnings();
            warnings.append(&mut h.warnings);
            let leftovers = h.session.leftovers().unwrap_or_default().to_vec();
            if let Err(e) = bye {
                warnings.push(e.to_string());
            } else if let Err(e) = h.session.closed() {
                if closing {
                    warnings.push(e.to_string());
                }
            }
            let activated = matches!(state, HostState::Live | HostState::Unchanged);
            let live = match state {
                HostState::Live | HostState::Unchanged => Some(h.release),
                _ => h.previous,
            };
            let mut r = h.report.unwrap_or_default();
            if h.unchanged {
                // Nothing changes: every file stays as the live release has it.
                r.counts.files.total = h.files;
                r.counts.files.unchanged = h.files;
            }
            let report = HostReport {
                release: h.release,
                previous: h.previous,
                target: t.display(),
                label: o.label.clone(),
                activated,
                unchanged: h.unchanged,
                counts: r.counts,
                unchanged_copied: r.not_linked,
                notes: unchanged_copied_note(r.not_linked).into_iter().collect(),
                bytes: Bytes {
                    sent,
                    received,
                    literal: r.literal_bytes,
                    matched: r.matched_bytes,
                    delta: r.delta_bytes,
                    compress_level,
                },
                items: r.items,
                pruned: h.pruned,
                leftovers,
                warnings,
                seeded: h.seeded,
                hooks: std::mem::take(&mut h.hooks),
                duration_ms: h.started.elapsed().as_millis() as u64,
                round_trips,
            };
            HostOutcome {
                target: t.display(),
                state,
                // Nothing was staged on a skipped target: nothing to report.
                report: (!h.skipped).then_some(report),
                error: h.hook_error.take(),
                live,
                live_known: true,
                warnings: Vec::new(),
                leftovers: Vec::new(),
            }
        }
    }
}

/// The default label of a deploy of `source`: `git rev-parse --short HEAD` (with `-dirty` when
/// the work tree has changes) when it is a git work tree, else the UTC time to the millisecond
/// (`2026-11-30T09:30:00.123Z`: two deploys within a second get labels of their own).
pub fn default_label(source: &Path) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(source)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]).filter(|s| !s.is_empty()) {
        Some(commit) => {
            let dirty = git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{commit}-dirty")
            } else {
                commit
            }
        }
        None => humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC, RFC 3339). Times before 1970 or
/// after 9999 (a damaged release record) show as the nearest of the two.
pub fn iso_time(secs: i64) -> String {
    const LAST: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z, humantime's last
    let secs = u64::try_from(secs).unwrap_or(0).min(LAST);
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Hands memory freed by the scan back to the system, so the next phase's peak does not stack
/// on top of it.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `path` absolute, with symlinks resolved as far as it exists; the rest (what a deploy would
/// create) is appended with `.` and `..` resolved as the directories would be made.
fn resolve(path: &Path) -> PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let comps: Vec<Component> = abs.components().collect();
    for k in (1..=comps.len()).rev() {
        let prefix: PathBuf = comps[..k].iter().collect();
        if let Ok(mut base) = std::fs::canonicalize(&prefix) {
            for c in &comps[k..] {
                match c {
                    Component::ParentDir => {
                        base.pop();
                    }
                    Component::Normal(n) => base.push(n),
                    _ => {}
                }
            }
            return base;
        }
    }
    abs
}

/// When flip's cache directory `cache` is inside the source (`XDG_CACHE_HOME` in a CI
/// workspace), an exclude for it (gitignore syntax, anchored at the source root): it is flip's
/// state, not the application's, and it changes while flip deploys (a file of it gone by the
/// time it is sent would fail the deploy, and every deploy would ship the cache to the target).
pub fn own_cache_exclude(source: &Path, cache: &Path) -> Option<String> {
    let cache = resolve(cache);
    let rel = cache.strip_prefix(resolve(source)).ok()?;
    let rel = rel.to_str().filter(|r| !r.is_empty())?;
    let mut glob = String::from("/");
    for c in rel.chars() {
        if matches!(c, '\\' | '*' | '?' | '[' | ']' | '!' | '#') {
            glob.push('\\');
        }
        glob.push(c);
    }
    glob.push('/');
    Some(glob)
}

/// Refuses, before anything is created, a local target inside the source (every deploy would
/// copy the target into itself) and a source inside the target's own directories (a release
/// deploying itself). `source` is absolute.
///
/// # Errors
/// [`DeployError`] naming the source and the target that overlap.
pub fn refuse_overlap(source: &Path, target: &Target) -> Result<(), DeployError> {
    let Target::Local(t) = target else {
        return Ok(());
    };
    let src = resolve(source);
    let dst = resolve(t);
    if dst.starts_with(&src) {
        // How the two resolve, only when that is not how they were given (a symlink, `..`).
        let resolved = if dst == *t && src == source {
            String::new()
        } else {
            format!(" (as {} in {})", dst.display(), src.display())
        };
        return Err(DeployError::Usage(format!(
            "the target {} is inside the source {}{resolved}: the target would be deployed into itself; choose a target outside the source",
            t.display(),
            source.display(),
        )));
    }
    for own in ["releases", ".flip", "current"] {
        let d = resolve(&dst.join(own));
        if src.starts_with(&d) {
            return Err(DeployError::Usage(format!(
                "the source {} is inside the target's {} ({}): flip will not deploy a target's own releases or state into it; copy the tree elsewhere first",
                source.display(),
                own,
                d.display()
            )));
        }
    }
    Ok(())
}

/// The live release of a listing and its summary.
pub fn live_of(current: Option<u64>, releases: &[ReleaseSummary]) -> Option<&ReleaseSummary> {
    releases.iter().find(|r| Some(r.id) == current)
}

/// `f` of every item, each on a thread of its own (one per target: the work is waiting on a
/// connection, not computing), results in the items' order. A panic in one is re-raised.
pub(crate) fn each_in_parallel<T: Send, R: Send>(
    items: impl IntoIterator<Item = T>,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let f = &f;
    std::thread::scope(|sc| {
        let jobs: Vec<_> = items
            .into_iter()
            .map(|item| sc.spawn(move || f(item)))
            .collect();
        jobs.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

/// The note of a deploy whose target copied `n` unchanged files instead of linking them.
pub fn unchanged_copied_note(n: u64) -> Option<String> {
    (n > 0).then(|| {
        format!(
            "{n} unchanged file(s) were copied into new inodes, not hard-linked: their inode in the live release was not as flip recorded it (see the warning); the content was checked, and the next deploy links the copies"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The patches made ahead stop once a target failed (no target goes live) or one sends
    /// its content (its own encoding needs the cores; a wrong guess would hold it up), not
    /// only once every worker is done: a worker still logging in does not keep them going.
    #[test]
    fn work_ahead_stops_once_a_target_failed_or_sends() {
        for flag in ["failed", "sending"] {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let w = Workers {
                // A target still logging in.
                threads: vec![std::thread::spawn(move || {
                    let _ = rx.recv();
                })],
                results: Arc::default(),
                failed: Arc::default(),
                sending: Arc::default(),
            };
            assert!(!w.settled(), "{flag}: a worker still logs in");
            match flag {
                "failed" => w.failed.store(true, Ordering::SeqCst),
                _ => w.sending.store(true, Ordering::SeqCst),
            }
            assert!(w.settled(), "{flag}");
            drop(tx);
            for t in w.threads {
                t.join().unwrap();
            }
        }
    }

    #[test]
    fn iso_time_formats_utc_seconds() {
        assert_eq!(iso_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_time(1_796_030_400), "2026-11-30T09:20:00Z");
        assert_eq!(iso_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso_time(-1), "1970-01-01T00:00:00Z");
        assert_eq!(iso_time(i64::MAX), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn the_default_label_of_a_plain_directory_is_a_timestamp() {
        let d = tempfile_dir();
        let l = default_label(&d);
        // 2026-11-30T09:30:00.123Z
        assert!(
            l.ends_with('Z') && l.len() == 24 && l.as_bytes()[19] == b'.',
            "{l}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_default_label_of_a_git_work_tree_is_its_commit_marked_dirty_when_changed() {
        let base = tempfile_dir();
        let d = base.join("repo");
        std::fs::create_dir_all(&d).unwrap();
        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .arg("-C")
                .arg(&d)
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .output()
                .expect("git")
                .status
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "-q"]);
        std::fs::write(d.join("index.php"), "<?php\n").unwrap();
        git(&["add", "."]);
        git(&["commit", "-qm", "one"]);
        let head = std::process::Command::new("git")
            .arg("-C")
            .arg(&d)
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .unwrap();
        let head = String::from_utf8(head.stdout).unwrap().trim().to_string();
        assert_eq!(default_label(&d), head);
        std::fs::write(d.join("index.php"), "<?php // edited\n").unwrap();
        assert_eq!(default_label(&d), format!("{head}-dirty"));
        // The whole temp directory, not only the repository in it (it was left behind).
        let _ = std::fs::remove_dir_all(&base);
    }

    fn tempfile_dir() -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "flip-deploy-label-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
