//! Commands on every target of an environment: a two-phase switch (rollback, activate) and the
//! listing of releases across targets, tied together by their labels.

use crate::{lock_queued, DeployError, Events, Options, Target};
use flip_manifest::Digest;
use flip_transfer::Session;
use flip_wire::{Leftover, Purpose, ReleaseSummary};
use serde::Serialize;

/// Where a [`switch`] moves each target.
#[derive(Clone, Debug)]
pub enum SwitchPlan {
    /// To the releases of the label before the live one (by creation time, across targets);
    /// targets whose live release has no label go to the newest release older than the live
    /// one.
    Rollback,
    /// To each target's newest release with this label.
    Label(String),
    /// To release `id` on every target.
    Id(u64),
}

/// What a [`switch`] did on one target.
#[derive(Debug, Serialize)]
pub struct SwitchOutcome {
    /// The target, as named.
    pub target: String,
    /// The release it was to go to (`None`: not resolved).
    pub release: Option<u64>,
    /// The release live before.
    pub previous: Option<u64>,
    /// The label of the release it was to go to.
    pub label: Option<String>,
    /// The release live now, as far as the client knows.
    pub live: Option<u64>,
    /// Why this target did not move (its own failure, or another target's).
    #[serde(skip)]
    pub error: Option<DeployError>,
    /// What the target warned about (a damaged release it skipped, ...), also when it failed.
    pub warnings: Vec<String>,
    /// What it could not remove.
    pub leftovers: Vec<Leftover>,
    /// The `after_activate` hooks run on it (when it moved), in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<crate::HookReport>,
}

struct Locked {
    session: Session,
    current: Option<u64>,
    releases: Vec<ReleaseSummary>,
}

/// Moves every target to another release in two phases: connect, lock, resolve the release and
/// check it (unless `force`: changed since it was committed, refused) everywhere first (any
/// failure: nothing moves), then activate everywhere with every lock held; if an activation
/// fails (the agent checks again), the targets already moved are switched back. Returns one
/// outcome per target, in order; all moved when none has an `error`. `events` hears who holds
/// a lock the switch waits for.
pub fn switch(
    targets: &[Target],
    o: &Options,
    plan: &SwitchPlan,
    force: bool,
    purpose: Purpose,
    events: &dyn Events,
) -> Vec<SwitchOutcome> {
    let locked = lock_everywhere(targets, o, purpose, events);
    let (mut out, mut sessions, failure) = resolve_everywhere(plan, locked, targets);
    if let Some(why) = failure {
        return none_moved(&why, sessions, out);
    }
    // Every release to go to checked before any target moves (unless forced).
    let refused = if force {
        Vec::new()
    } else {
        check_everywhere(&mut sessions, &mut out)
    };
    if !refused.is_empty() {
        return none_moved(&refused.join("; "), sessions, out);
    }
    // Phase 2: every target resolved, checked and locked.
    let moved: Vec<bool> = sessions
        .iter()
        .zip(&out)
        .map(|(s, o)| s.as_ref().is_some_and(|s| s.current != o.release))
        .collect();
    let failed = activate_everywhere(&mut sessions, &mut out, force);
    if failed.is_empty() {
        after_hooks(&mut sessions, &mut out, &moved, o, events);
    }
    // What is live now is what this client's next deploy stages ahead against.
    if let Some(dir) = &o.cache_dir {
        let caches = crate::Caches::open(Some(dir));
        for ((t, s), r) in targets.iter().zip(&sessions).zip(&out) {
            let live = s
                .as_ref()
                .and_then(|s| s.releases.iter().find(|x| Some(x.id) == r.live));
            if let Some(x) = live {
                caches.record_live(&t.display(), &x.manifest_digest);
            }
        }
    }
    close_all(sessions, &mut out);
    out
}

/// The outcome when a target failed before any moved (`why`): every other target is told so,
/// and every session is closed.
fn none_moved(
    why: &str,
    sessions: Vec<Option<Locked>>,
    mut out: Vec<SwitchOutcome>,
) -> Vec<SwitchOutcome> {
    for o in out.iter_mut().filter(|o| o.error.is_none()) {
        o.error = Some(DeployError::Aborted {
            target: o.target.clone(),
            why: format!("another target failed ({why}); nothing was changed"),
        });
    }
    close_all(sessions, &mut out);
    out
}

/// Phase 1: connect, lock and read the status of every target, in parallel (lock and status
/// in one round trip). With `--wait`, in the order of the targets' names as a deploy does
/// (`crate::order`): waiting for a target's lock while holding one named after it, every
/// lock is let go, that one is waited for alone, and all are taken again.
fn lock_everywhere(
    targets: &[Target],
    o: &Options,
    purpose: Purpose,
    events: &dyn Events,
) -> Vec<Result<Locked, DeployError>> {
    let names: Vec<String> = targets.iter().map(Target::display).collect();
    loop {
        let book = crate::order::LockBook::new(&names, o.wait);
        let locked = crate::each_in_parallel(targets.iter().enumerate(), |(i, t)| {
            // Lock and status in one round trip.
            let mut session = lock_queued(t, o, purpose)?;
            session.queue_status()?;
            book.locked(&mut session, i, &names[i], &mut |h| events.waiting(i, h))?;
            let (current, releases) = session.status_answer()?;
            Ok(Locked {
                session,
                current,
                releases,
            })
        });
        let Some(k) = book.gave_way() else {
            return locked;
        };
        for l in locked.into_iter().flatten() {
            let _ = l.session.close();
        }
        if let Err(e) = crate::lock_alone(&targets[k], o, purpose, &mut |h| events.waiting(k, h)) {
            let why = e.to_string();
            let mut failed = Some(e);
            return (0..targets.len())
                .map(|i| match i == k {
                    true => Err(failed.take().expect("one target waited for")),
                    false => Err(DeployError::Aborted {
                        target: names[i].clone(),
                        why: format!("another target failed ({why}); nothing was changed"),
                    }),
                })
                .collect();
        }
    }
}

/// Each target's outcome so far and its session, with the release `plan` names there; and the
/// first failure, if any target failed to lock or has no such release (then nothing moves).
fn resolve_everywhere(
    plan: &SwitchPlan,
    locked: Vec<Result<Locked, DeployError>>,
    targets: &[Target],
) -> (Vec<SwitchOutcome>, Vec<Option<Locked>>, Option<String>) {
    let mut out: Vec<SwitchOutcome> = targets
        .iter()
        .zip(&locked)
        .map(|(t, l)| SwitchOutcome {
            target: t.display(),
            release: None,
            previous: l.as_ref().ok().and_then(|l| l.current),
            label: None,
            live: l.as_ref().ok().and_then(|l| l.current),
            error: None,
            warnings: Vec::new(),
            leftovers: Vec::new(),
            hooks: Vec::new(),
        })
        .collect();
    let wanted = resolve(plan, &locked, targets);
    let mut failure: Option<String> = None;
    for ((o, l), w) in out.iter_mut().zip(&locked).zip(&wanted) {
        match (l, w) {
            (Err(_), _) => {}
            (Ok(_), Ok(id)) => o.release = Some(*id),
            (Ok(_), Err(e)) => {
                failure.get_or_insert_with(|| e.to_string());
            }
        }
    }
    for (i, l) in locked.iter().enumerate() {
        if let Err(e) = l {
            failure.get_or_insert_with(|| e.to_string());
            let _ = i;
        }
    }
    let mut sessions: Vec<Option<Locked>> = Vec::with_capacity(locked.len());
    for ((l, w), o) in locked.into_iter().zip(wanted).zip(out.iter_mut()) {
        match l {
            Err(e) => {
                o.error = Some(e);
                sessions.push(None);
            }
            Ok(mut l) => {
                take_notices(&mut l, o);
                if let Err(e) = w {
                    o.error = Some(e);
                }
                o.label = o
                    .release
                    .and_then(|id| l.releases.iter().find(|r| r.id == id))
                    .and_then(|r| r.label.clone());
                sessions.push(Some(l));
            }
        }
    }
    (out, sessions, failure)
}

/// Asks every target that is to move whether its release may be made live as it is (changed
/// since it was committed: refused), in parallel, one round trip. Returns the refusals'
/// messages; a refusing target's outcome has the error and its session is gone.
fn check_everywhere(sessions: &mut [Option<Locked>], out: &mut [SwitchOutcome]) -> Vec<String> {
    let results = each_moving(sessions, out, |s, id| {
        s.queue_check(id)?;
        Ok(s.checked()?)
    });
    let mut refused = Vec::new();
    for ((r, s), o) in results
        .into_iter()
        .zip(sessions.iter_mut())
        .zip(out.iter_mut())
    {
        if let Err(e) = r {
            refused.push(e.to_string());
            o.error = Some(e);
            if let Some(l) = s.as_mut() {
                take_notices(l, o);
            }
            *s = None;
        }
    }
    refused
}

/// `ask` (a request and its answer) with each target's session and the release it goes to, in
/// parallel, on every target that is to move (its release not live); the others answer `Ok`.
fn each_moving(
    sessions: &mut [Option<Locked>],
    out: &[SwitchOutcome],
    ask: impl Fn(&mut Session, u64) -> Result<(), DeployError> + Sync,
) -> Vec<Result<(), DeployError>> {
    crate::each_in_parallel(sessions.iter_mut().zip(out.iter()), |(s, o)| {
        let s = s.as_mut().expect("every target is locked");
        let id = o.release.expect("every target resolved");
        if s.current == Some(id) {
            return Ok(());
        }
        ask(&mut s.session, id)
    })
}

/// Phase 2: activates the resolved release on every target, in parallel; if any activation
/// failed, the others are switched back. Returns the failures' messages.
fn activate_everywhere(
    sessions: &mut [Option<Locked>],
    out: &mut [SwitchOutcome],
    force: bool,
) -> Vec<String> {
    let results = each_moving(sessions, out, |s, id| {
        s.queue_activate(id, force)?;
        s.activated()?;
        Ok(())
    });
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    for ((r, s), o) in results
        .into_iter()
        .zip(sessions.iter_mut())
        .zip(out.iter_mut())
    {
        match r {
            Ok(()) if failed.is_empty() => o.live = o.release,
            Ok(()) => {
                let s = s.as_mut().expect("every target is locked");
                o.live = o.release;
                if let Some(prev) = o.previous.filter(|p| Some(*p) != o.release) {
                    if s.session.activate(prev).is_ok() {
                        o.live = Some(prev);
                    }
                }
                o.error = Some(DeployError::Aborted {
                    target: o.target.clone(),
                    why: format!(
                        "another target failed ({}); switched back",
                        failed.join("; ")
                    ),
                });
            }
            Err(e) => {
                o.error = Some(e);
                if let Some(l) = s.as_mut() {
                    take_notices(l, o);
                }
                *s = None;
            }
        }
    }
    failed
}

/// Every target switched: `after_activate` on each that moved (a PHP-FPM reload is needed after
/// a rollback too). A failure is reported on its target; nothing is switched back (the release
/// switched away from is the one the command left).
fn after_hooks(
    sessions: &mut [Option<Locked>],
    out: &mut [SwitchOutcome],
    moved: &[bool],
    o: &Options,
    events: &dyn Events,
) {
    let hooks = &o.hooks.after_activate;
    let Some(first) = moved.iter().position(|m| *m) else {
        return;
    };
    if hooks.is_empty() {
        return;
    }
    let bound = crate::hooks::bound(hooks);
    crate::hooks::keeping_alive(
        sessions
            .iter_mut()
            .zip(out.iter_mut())
            .enumerate()
            .collect(),
        |(_, (s, _))| s.as_mut().map(|s| &mut s.session),
        |(i, (s, out))| {
            let (Some(s), true, Some(release)) = (s.as_mut(), moved[*i], out.release) else {
                return;
            };
            let target = out.target.clone();
            // Every target that moved needs its own hooks, whatever failed on another: each
            // one stops only at its own failure.
            let stop = &crate::hooks::Stop::new(false);
            let (reports, error) = crate::hooks::run_list(
                &mut s.session,
                crate::hooks::Run {
                    release,
                    index: *i,
                    target: &target,
                    first: *i == first,
                    bound,
                    stop,
                },
                hooks,
                crate::HookPhase::AfterActivate,
                o.hooks.env.as_deref(),
                events,
            );
            out.hooks = reports;
            if error.is_some() {
                out.error = error;
            }
        },
    );
}

/// Moves what a target's agent warned about and could not remove into its outcome.
fn take_notices(l: &mut Locked, o: &mut SwitchOutcome) {
    o.warnings.append(&mut l.session.take_warnings());
    if let Some(left) = l.session.leftovers() {
        o.leftovers = left.to_vec();
    }
}

fn close_all(sessions: Vec<Option<Locked>>, out: &mut [SwitchOutcome]) {
    std::thread::scope(|sc| {
        for (l, o) in sessions.into_iter().zip(out.iter_mut()) {
            let Some(mut l) = l else { continue };
            sc.spawn(move || {
                take_notices(&mut l, o);
                let _ = l.session.close();
            });
        }
    });
}

/// The release each target goes to.
fn resolve(
    plan: &SwitchPlan,
    locked: &[Result<Locked, DeployError>],
    targets: &[Target],
) -> Vec<Result<u64, DeployError>> {
    let no = |t: &Target, what: String| {
        Err(DeployError::TargetState(format!("{}: {what}", t.display())))
    };
    // The label to go back to: that of the newest labelled release (by creation) older than
    // the live one on its target. The live label again (the same commit deployed twice, or
    // two deploys in one second labelled by the time): each target goes to its newest release
    // of that label older than its live one, not past them all.
    let previous_label = match plan {
        SwitchPlan::Rollback => locked
            .iter()
            .filter_map(|l| l.as_ref().ok())
            .filter_map(|l| {
                let live = l.releases.iter().find(|r| Some(r.id) == l.current)?;
                live.label.as_ref()?;
                l.releases
                    .iter()
                    .filter(|r| r.id < live.id && r.label.is_some())
                    .max_by_key(|r| (r.created, r.id))
            })
            .max_by_key(|r| r.created)
            .and_then(|r| r.label.clone()),
        _ => None,
    };
    // On a target without a label, the release of a tree the label names elsewhere stands in
    // for it (see `trees_of`).
    let listed = || {
        locked
            .iter()
            .filter_map(|l| l.as_ref().ok())
            .flat_map(|l| &l.releases)
    };
    locked
        .iter()
        .zip(targets)
        .map(|(l, t)| {
            let Ok(l) = l else {
                return Err(DeployError::Usage(String::new()));
            };
            // This target's newest release of `label` below id `below`, else its newest one of
            // a tree the label names elsewhere.
            let labelled = |label: &str, below: u64| {
                let newest = |f: &dyn Fn(&ReleaseSummary) -> bool| {
                    l.releases
                        .iter()
                        .filter(|r| r.id < below && f(r))
                        .max_by_key(|r| r.id)
                        .map(|r| r.id)
                };
                newest(&|r| r.label.as_deref() == Some(label)).or_else(|| {
                    let trees = trees_of(label, listed());
                    newest(&|r| trees.contains(&r.manifest_digest))
                })
            };
            let newest_with = |label: &str| labelled(label, u64::MAX);
            match plan {
                SwitchPlan::Id(id) => match l.releases.iter().any(|r| r.id == *id) {
                    true => Ok(*id),
                    false => no(t, format!("no release {id}")),
                },
                SwitchPlan::Label(label) => match newest_with(label) {
                    Some(id) => Ok(id),
                    None => no(t, format!("no release labelled {label:?}")),
                },
                SwitchPlan::Rollback => {
                    let Some(live) = l.current else {
                        return no(t, "nothing is live: nothing to roll back".into());
                    };
                    let live_label = l
                        .releases
                        .iter()
                        .find(|r| r.id == live)
                        .and_then(|r| r.label.as_deref());
                    let older_with = |label: &str| labelled(label, live);
                    match (&previous_label, live_label) {
                        (Some(p), Some(_)) => match older_with(p) {
                            Some(id) => Ok(id),
                            None => no(
                                t,
                                format!("no release labelled {p:?} older than the live one ({live}) to roll back to"),
                            ),
                        },
                        _ => match l
                            .releases
                            .iter()
                            .filter(|r| r.id < live)
                            .max_by_key(|r| r.id)
                        {
                            Some(r) => Ok(r.id),
                            None => no(
                                t,
                                format!(
                                    "no release older than the live one ({live}) to roll back to"
                                ),
                            ),
                        },
                    }
                }
            }
        })
        .collect()
}

/// One row of `flip releases ENV`: the releases of one label (or one unlabelled release) on
/// every target.
#[derive(Debug, Serialize)]
pub struct LabelRow {
    /// The label (`None`: a release without one).
    pub label: Option<String>,
    /// The newest creation time of the row's releases (seconds since the epoch).
    pub created: i64,
    /// Per target (in order): the release id with this label, if any.
    pub ids: Vec<Option<u64>>,
    /// Per target: whether that release is live.
    pub live: Vec<bool>,
}

/// The releases of every target as rows by label, oldest first. A label's row holds each
/// target's live release of that label, else its newest, else (a target where the tree was
/// live already when the label was deployed) its release of a tree the label names elsewhere;
/// an unlabelled release gets a row of its own.
pub fn label_rows(lists: &[Vec<ReleaseSummary>]) -> Vec<LabelRow> {
    let n = lists.len();
    let mut rows: Vec<LabelRow> = Vec::new();
    for (i, list) in lists.iter().enumerate() {
        for r in list {
            let row = match &r.label {
                Some(l) => match rows.iter_mut().position(|x| x.label.as_ref() == Some(l)) {
                    Some(k) => &mut rows[k],
                    None => {
                        rows.push(empty_row(r.label.clone(), n));
                        rows.last_mut().unwrap()
                    }
                },
                None => {
                    rows.push(empty_row(None, n));
                    rows.last_mut().unwrap()
                }
            };
            row.created = row.created.max(r.created);
            // The live release of the label, else its newest.
            if !row.live[i] && (r.current || row.ids[i].is_none_or(|id| id < r.id)) {
                row.ids[i] = Some(r.id);
                row.live[i] = r.current;
            }
        }
    }
    // A target without the label: its release of a tree the label names elsewhere, if any
    // (the tree was live there already when the label was deployed: no release was made).
    for row in rows.iter_mut() {
        let Some(label) = &row.label else { continue };
        let trees = trees_of(label, lists.iter().flatten());
        for (i, list) in lists.iter().enumerate() {
            if row.ids[i].is_some() {
                continue;
            }
            let same = list
                .iter()
                .filter(|r| trees.contains(&r.manifest_digest))
                .max_by_key(|r| (r.current, r.id));
            if let Some(r) = same {
                row.ids[i] = Some(r.id);
                row.live[i] = r.current;
            }
        }
    }
    rows.sort_by_key(|r| (r.created, r.ids.iter().flatten().max().copied()));
    rows
}

/// The trees (manifest digests) `label` names among `releases` (of every target): a deploy
/// that found the tree already live on a target made no release there, so the label is not
/// recorded on it, and that target's release of one of these trees stands in for it.
fn trees_of<'a>(label: &str, releases: impl Iterator<Item = &'a ReleaseSummary>) -> Vec<Digest> {
    releases
        .filter(|r| r.label.as_deref() == Some(label))
        .map(|r| r.manifest_digest)
        .collect()
}

fn empty_row(label: Option<String>, n: usize) -> LabelRow {
    LabelRow {
        label,
        created: i64::MIN,
        ids: vec![None; n],
        live: vec![false; n],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flip_manifest::Digest;

    fn r(id: u64, label: Option<&str>, created: i64, current: bool) -> ReleaseSummary {
        ReleaseSummary {
            id,
            label: label.map(str::to_string),
            created,
            files: 1,
            bytes: 1,
            manifest_digest: Digest([0; 32]),
            current,
        }
    }

    #[test]
    fn label_rows_join_the_releases_of_one_label_across_targets() {
        let a = vec![
            r(1, Some("v1"), 10, false),
            r(2, Some("v2"), 20, true),
            r(3, None, 30, false),
        ];
        // Another target with other ids for the same labels, and a redeploy of v2.
        let b = vec![
            r(7, Some("v1"), 11, false),
            r(8, Some("v2"), 21, false),
            r(9, Some("v2"), 22, true),
        ];
        let rows = label_rows(&[a, b]);
        type Row<'a> = (Option<&'a str>, Vec<Option<u64>>, Vec<bool>);
        let view: Vec<Row> = rows
            .iter()
            .map(|r| (r.label.as_deref(), r.ids.clone(), r.live.clone()))
            .collect();
        assert_eq!(
            view,
            vec![
                (Some("v1"), vec![Some(1), Some(7)], vec![false, false]),
                (Some("v2"), vec![Some(2), Some(9)], vec![true, true]),
                (None, vec![Some(3), None], vec![false, false]),
            ]
        );
        // Rolled back to the older release of a label deployed twice: the row shows the live
        // one (it showed the newest, and no target was marked live).
        let c = vec![
            r(4, Some("L"), 40, false),
            r(5, Some("L"), 41, true),
            r(6, Some("L"), 42, false),
        ];
        let rows = label_rows(&[c]);
        assert_eq!(
            (rows[0].ids.clone(), rows[0].live.clone()),
            (vec![Some(5)], vec![true])
        );
    }
}
