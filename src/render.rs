//! Renders the pipeline's reports: the human summary (stderr) and `--json` (stdout). Progress
//! lines while a deploy runs are `progress.rs`'s.

use crate::exit::{self, Code};
use crate::{error_text, output};
use flip_deploy::{Deployment, HostOutcome, HostReport, HostState, Target};
use serde_json::{json, Map, Value};

pub fn leftover_line(path: &str, error: &str) {
    note!(
        "flip: warning: cannot remove {}: {} (left over; removed at the next cleanup once that is possible)",
        output::printable(path),
        output::printable(error)
    );
}

/// A failed target's warnings and leftovers (stderr, in every mode): what its agent said before
/// the failure, a damaged release it skipped, ...
fn failure_notices(h: &HostOutcome) {
    for w in &h.warnings {
        note!("flip: warning: {}", output::printable(w));
    }
    for l in &h.leftovers {
        leftover_line(&l.path, &l.error);
    }
}

/// The JSON object of one target's deploy: today's single-target object.
fn report_json(r: &HostReport, itemize: bool) -> Map<String, Value> {
    let mut out = match serde_json::to_value(r) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    if itemize {
        out.insert("items".into(), output::items_json(&r.items));
    }
    out
}

/// The human lines of one target's deploy (stderr; itemized paths on stdout).
fn report_text(r: &HostReport, state: HostState, itemize: bool) {
    for w in &r.warnings {
        note!("flip: warning: {}", output::printable(w));
    }
    for l in &r.leftovers {
        leftover_line(&l.path, &l.error);
    }
    for x in &r.seeded {
        note!(
            "flip: {}: new shared path shared/{}, seeded from the source where it had one (later deploys leave it as it is)",
            output::printable(&r.target),
            output::printable(x)
        );
    }
    if itemize {
        output::print_items(&r.items);
    }
    // A label read back from the target is the target's text: shown escaped.
    let label = r
        .label
        .as_deref()
        .map(|l| format!(" ({})", output::escape(l)))
        .unwrap_or_default();
    if r.unchanged {
        note!(
            "flip: {}: unchanged, release {} is live",
            r.target,
            r.release
        );
        return;
    }
    let (verb, then) = match state {
        HostState::Live => ("deployed", ""),
        HostState::Staged => ("staged", " (not live)"),
        HostState::Discarded => ("staged", ", then discarded (not activated)"),
        HostState::SwitchedBack => ("deployed", ", then switched back"),
        HostState::Failed | HostState::Unchanged => ("failed", ""),
    };
    note!(
        "flip: {verb} release {} to {}{label}{then}: {}; sent {}, received {} in {:.2} s",
        r.release,
        r.target,
        output::counts_text(&r.counts),
        output::bytes(r.bytes.sent),
        output::bytes(r.bytes.received),
        r.duration_ms as f64 / 1000.0
    );
    for n in &r.notes {
        note!("flip: note: {}", output::printable(n));
    }
    if r.counts.files.resent > 0 {
        note!(
            "flip: {} file(s) the plan meant to reuse from the target were missing or altered there and were sent instead{}",
            r.counts.files.resent,
            if itemize { " (marked above)" } else { " (--itemize names them)" }
        );
    }
}

/// `flip deploy SRC TARGET`: today's object (or the error, as every command reports one).
pub fn single(mut d: Deployment, itemize: bool, json: bool) -> anyhow::Result<Code> {
    let h = d.hosts.remove(0);
    failure_notices(&h);
    let r = match (h.error, h.report) {
        (Some(e), None) => return Err(e.into()),
        // A hook failed: what the deploy did (with each hook's status) still goes out.
        (Some(e), Some(r)) => {
            let code = exit::code_of(&e);
            if json {
                let mut o = report_json(&r, itemize);
                o.insert("state".into(), json!(h.state));
                o.insert("live".into(), json!(h.live));
                o.insert(
                    "error".into(),
                    json!({"code": code, "message": e.to_string()}),
                );
                outln!("{}", Value::Object(o));
            }
            for w in &r.warnings {
                note!("flip: warning: {}", output::printable(w));
            }
            host_error(&r.target, &e.to_string(), "");
            eprintln!(
                "flip: {}: {} ({})",
                r.target,
                state_text(h.state),
                live_text(h.live, h.live_known)
            );
            return Ok(code);
        }
        (None, r) => r.expect("a target that did not fail has a report"),
    };
    if json {
        outln!("{}", Value::Object(report_json(&r, itemize)));
        for w in &r.warnings {
            note!("flip: warning: {}", output::printable(w));
        }
        for l in &r.leftovers {
            leftover_line(&l.path, &l.error);
        }
    } else {
        report_text(&r, h.state, itemize);
    }
    Ok(exit::OK)
}

/// One target's error line (stderr), escaped: `flip: TARGET: error: MESSAGE`, or
/// `flip: error: MESSAGE` when the message names the target already (a local target's path in
/// the agent's error), so no line names the same path twice.
pub fn host_error(target: &str, message: &str, after: &str) {
    host_line(target, "error", message, after);
}

/// `flip: TARGET: KIND: MESSAGE`, the target (or its path) left out when the message names it
/// already ([`flip_transfer::peer_prefix`]).
fn host_line(target: &str, kind: &str, message: &str, after: &str) {
    let message = output::printable(message);
    if kind != "error" && output::quiet() {
        return;
    }
    match flip_transfer::peer_prefix(target, &message) {
        None => eprintln!("flip: {kind}: {message}{after}"),
        Some(prefix) => eprintln!("flip: {prefix}: {kind}: {message}{after}"),
    }
}

/// A failed target's JSON entry: `{"target", "state": "failed", "error": {"code", "message"}}`.
pub fn failed_host(target: &str, e: &anyhow::Error) -> Value {
    json!({
        "target": target, "state": "failed",
        "error": {"code": exit::code_of(e.as_ref()), "message": error_text(e)},
    })
}

fn host_json(h: &HostOutcome, itemize: bool) -> Value {
    let mut o = h
        .report
        .as_ref()
        .map(|r| report_json(r, itemize))
        .unwrap_or_default();
    o.insert("target".into(), json!(h.target));
    o.insert("state".into(), json!(h.state));
    o.insert("live".into(), json!(h.live));
    if h.report.is_none() && !(h.warnings.is_empty() && h.leftovers.is_empty()) {
        o.insert("warnings".into(), json!(h.warnings));
        o.insert("leftovers".into(), json!(h.leftovers));
    }
    if let Some(e) = &h.error {
        o.insert(
            "error".into(),
            json!({"code": exit::code_of(e), "message": e.to_string()}),
        );
    }
    Value::Object(o)
}

/// What is live on a target that did not go live on the new release, as far as the client
/// read it.
fn live_text(live: Option<u64>, known: bool) -> String {
    match (live, known) {
        (Some(id), _) => format!("release {id} live"),
        (None, true) => "no release live".to_string(),
        (None, false) => "what is live there was not read".to_string(),
    }
}

/// `flip deploy ENV`: one line (or object) per target, then the summary. Exit 0 only when every
/// target is live on the new release; else [`exit::PARTIAL`].
pub fn environment(env: &str, d: &Deployment, itemize: bool, json: bool) -> Code {
    let live = d
        .hosts
        .iter()
        .filter(|h| matches!(h.state, HostState::Live | HostState::Unchanged))
        .count();
    let failed: Vec<&HostOutcome> = d.hosts.iter().filter(|h| h.error.is_some()).collect();
    let hook_failed = d
        .hosts
        .iter()
        .any(|h| matches!(h.error, Some(flip_deploy::DeployError::Hook { .. })));
    let code = if hook_failed {
        Code::Hook
    } else if d.succeeded() {
        exit::OK
    } else {
        exit::of_environment(d.hosts.iter().filter_map(|h| h.error.as_ref()))
    };
    if json {
        let hosts: Vec<Value> = d.hosts.iter().map(|h| host_json(h, itemize)).collect();
        let summary = json!({
            "env": env, "label": d.label, "targets": d.hosts.len(), "live": live,
            "failed": failed.len(), "ok": code == exit::OK, "unchanged":
                d.hosts.iter().all(|h| h.state == HostState::Unchanged),
            "duration_ms": d.duration_ms,
        });
        outln!("{}", json!({"hosts": hosts, "summary": summary}));
    } else {
        for h in &d.hosts {
            failure_notices(h);
            match (&h.report, &h.error) {
                (Some(r), Some(e)) => {
                    // A hook failed: what the target said meanwhile (switched back, or why it
                    // could not be) still goes out.
                    for w in &r.warnings {
                        note!("flip: warning: {}", output::printable(w));
                    }
                    host_error(&h.target, &e.to_string(), "")
                }
                (None, Some(e)) => host_error(&h.target, &e.to_string(), ""),
                (Some(r), None) => report_text(r, h.state, itemize),
                (None, None) => {}
            }
        }
        for h in &d.hosts {
            if h.state != HostState::Live && h.state != HostState::Unchanged {
                note!(
                    "flip: {}: {} ({})",
                    h.target,
                    state_text(h.state),
                    live_text(h.live, h.live_known)
                );
            }
        }
        let label = d
            .label
            .as_deref()
            .map(|l| format!(" {}", output::escape(l)))
            .unwrap_or_default();
        let all = match d.hosts.len() {
            1 => "its one target".to_string(),
            n => format!("all {n} targets"),
        };
        if d.hosts.iter().all(|h| h.state == HostState::Unchanged) {
            // No release was made: the new label names none.
            note!(
                "flip: {env}: unchanged on {all}, the live release already is this tree, in {:.2} s",
                d.duration_ms as f64 / 1000.0
            );
        } else if d.all_live() {
            // A failed after_activate hook (rollback_on_failure off) leaves it live: say so.
            let but = match failed.len() {
                0 => String::new(),
                n => format!(", but a hook failed on {n}"),
            };
            note!(
                "flip: {env}{label}: live on {all} in {:.2} s{but}",
                d.duration_ms as f64 / 1000.0
            );
        } else if d.succeeded() {
            note!(
                "flip: {env}{label}: staged on all {} targets, not live (`flip activate {env} LABEL` makes them live)",
                d.hosts.len()
            );
        } else {
            eprintln!(
                "flip: {env}{label}: FAILED on {} of {} targets; {} live on the new release",
                failed.len(),
                d.hosts.len(),
                live
            );
        }
    }
    code
}

fn state_text(s: HostState) -> &'static str {
    match s {
        HostState::Live => "live",
        HostState::Unchanged => "unchanged",
        HostState::Staged => "staged, not live",
        HostState::Discarded => "not activated, its new release discarded",
        HostState::SwitchedBack => "switched back",
        HostState::Failed => "failed",
    }
}

/// The live release `live` when the listing `list` left it out (its metadata damaged or gone:
/// the target's warning says which), for a row of its own in `flip releases`.
pub fn unlisted_live(list: &[flip_wire::ReleaseSummary], live: Option<u64>) -> Option<u64> {
    live.filter(|id| !list.iter().any(|r| r.id == *id))
}

/// `flip releases ENV`: a row per label (oldest first), a column per target with its release
/// of that label (`*`: live). A live release left out of a target's listing (its metadata
/// damaged or gone: the target's warning says which) gets a last row of its own, marked live,
/// its label and time unknown (JSON: `"damaged": true` on that row, `false` on the others).
/// `failed` are the targets that did not answer (`failed_host` objects): named on stderr
/// already, and in the JSON a last row of their own (`"failed": true`), each with its error.
pub fn release_table(
    env: &str,
    targets: &[Target],
    lists: &[Vec<flip_wire::ReleaseSummary>],
    lives: &[Option<u64>],
    failed: &[Value],
    json: bool,
) {
    let rows = flip_deploy::label_rows(lists);
    // Per target: its live release when the listing left it out.
    let unlisted: Vec<Option<u64>> = lists
        .iter()
        .zip(lives)
        .map(|(list, live)| unlisted_live(list, *live))
        .collect();
    let damaged = unlisted.iter().any(Option::is_some);
    let names: Vec<String> = targets.iter().map(Target::display).collect();
    if json {
        let cells = |ids: &[Option<u64>], live: &[bool]| -> Vec<Value> {
            names
                .iter()
                .zip(ids.iter().zip(live))
                .map(|(t, (id, live))| json!({"target": t, "id": id, "current": live}))
                .collect()
        };
        let mut arr: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"label": r.label, "created": output::iso_time(r.created),
                    "damaged": false, "failed": false, "releases": cells(&r.ids, &r.live)})
            })
            .collect();
        if damaged {
            let live: Vec<bool> = unlisted.iter().map(Option::is_some).collect();
            arr.push(
                json!({"label": null, "created": null, "damaged": true, "failed": false,
                "releases": cells(&unlisted, &live)}),
            );
        }
        if !failed.is_empty() {
            // The targets that did not answer (named on stderr too), each with its error.
            let cells: Vec<Value> = failed
                .iter()
                .map(|f| json!({"target": f["target"], "id": null, "current": null, "error": f["error"]}))
                .collect();
            arr.push(
                json!({"label": null, "created": null, "damaged": false, "failed": true,
                "releases": cells}),
            );
        }
        outln!("{}", Value::Array(arr));
        return;
    }
    if rows.is_empty() && !damaged {
        note!("flip: {env}: no releases on any target");
        return;
    }
    // As wide as the widest label (a time label to the millisecond is 24 characters).
    let labels: Vec<String> = rows
        .iter()
        .map(|r| output::escape(r.label.as_deref().unwrap_or("-")).into_owned())
        .collect();
    let w = labels
        .iter()
        .map(|l| l.chars().count())
        .chain([20, if damaged { 18 } else { 0 }])
        .max()
        .unwrap_or(20);
    out!("{:<w$}  {:<20}", "LABEL", "CREATED");
    for n in &names {
        out!("  {n}");
    }
    outln!();
    let cell = |id: &Option<u64>, live: bool| match id {
        Some(id) => format!("{id}{}", if live { "*" } else { "" }),
        None => "-".into(),
    };
    for (r, label) in rows.iter().zip(&labels) {
        out!("{label:<w$}  {:<20}", output::iso_time(r.created));
        for (n, (id, live)) in names.iter().zip(r.ids.iter().zip(&r.live)) {
            out!("  {:<w$}", cell(id, *live), w = n.len());
        }
        outln!();
    }
    if damaged {
        out!("{:<w$}  {:<20}", "(metadata damaged)", "?");
        for (n, id) in names.iter().zip(&unlisted) {
            out!("  {:<w$}", cell(id, true), w = n.len());
        }
        outln!();
    }
}

/// `flip rollback ENV` / `flip activate ENV ID`: a line (or object) per target.
pub fn switch(env: &str, verb: &str, out: Vec<flip_deploy::SwitchOutcome>, json: bool) -> Code {
    let ok = out.iter().all(|o| o.error.is_none());
    if json {
        let hosts: Vec<Value> = out
            .iter()
            .map(|o| {
                let mut v = serde_json::to_value(o).unwrap_or_default();
                if let (Some(e), Value::Object(m)) = (&o.error, &mut v) {
                    m.insert(
                        "error".into(),
                        json!({"code": exit::code_of(e), "message": e.to_string()}),
                    );
                }
                v
            })
            .collect();
        outln!(
            "{}",
            json!({"hosts": hosts, "summary": {"env": env, "ok": ok, "targets": out.len()}})
        );
    } else {
        for o in &out {
            for w in &o.warnings {
                host_line(&o.target, "warning", w, "");
            }
            for l in &o.leftovers {
                leftover_line(&l.path, &l.error);
            }
            match (&o.error, o.release) {
                (None, Some(id)) if o.previous == Some(id) => note!(
                    "flip: release {id} of {} is already live; nothing changed",
                    o.target
                ),
                (None, Some(id)) => note!(
                    "flip: {verb} {}: current -> releases/{id}{}{}",
                    o.target,
                    o.label
                        .as_deref()
                        .map(|l| format!(" ({})", output::escape(l)))
                        .unwrap_or_default(),
                    o.previous
                        .map(|p| format!(" (was {p})"))
                        .unwrap_or_default()
                ),
                (Some(e), _) => {
                    // Which release stays live, unless the message says so already (or
                    // nothing is known to be live: a missing target, a first deploy).
                    let e = e.to_string();
                    let live = match o.live {
                        Some(l)
                            if !e.contains(&format!("({l})"))
                                && !e.contains(&format!("release {l} ")) =>
                        {
                            format!(" (live: release {l})")
                        }
                        _ => String::new(),
                    };
                    host_error(&o.target, &e, &live)
                }
                (None, None) => {}
            }
        }
    }
    if ok {
        return exit::OK;
    }
    if out
        .iter()
        .any(|o| matches!(o.error, Some(flip_deploy::DeployError::Hook { .. })))
    {
        return Code::Hook;
    }
    // One target: its own exit code, as for a target given on the command line.
    match out.as_slice() {
        [only] => only.error.as_ref().map_or(exit::OK, |e| exit::code_of(e)),
        _ => exit::of_environment(out.iter().filter_map(|o| o.error.as_ref())),
    }
}
