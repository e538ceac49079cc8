//! flip: fast, atomic deploys. See README.md for the tour and ARCHITECTURE.md for the crates.

mod cli;
mod diff;
mod exit;
mod output;
mod target;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command, Common};
use flip_transfer::Session;
use flip_wire::Holder;
use rayon::prelude::*;
use serde_json::json;
use std::time::Instant;
use target::Target;

fn main() {
    limit_malloc_arenas();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let json = match &cli.command {
        Command::Deploy(a) => a.common.json,
        Command::Rollback(a) => a.common.json,
        Command::Activate(a) => a.common.json,
        Command::Prune(a) => a.common.json,
        Command::Releases(a) => a.json,
        Command::Verify(a) => a.json,
        Command::Diff(a) => a.json,
        Command::Agent(_) => false,
    };
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let code = exit::code_of(&e);
            let message = error_text(&e);
            eprintln!("flip: error: {}", output::printable(&message));
            if json {
                println!("{}", json!({"error": {"code": code, "message": message}}));
            }
            code
        }
    };
    std::process::exit(code);
}

/// The error and its causes, joined with ": ", leaving out a cause whose text an outer message
/// already includes (many error types repeat their source in their own message).
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if s.is_empty() || out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Deploy(a) => deploy(a),
        Command::Releases(a) => releases(a),
        Command::Rollback(a) => rollback(a),
        Command::Activate(a) => activate(a),
        Command::Prune(a) => prune(a),
        Command::Verify(a) => verify(a),
        Command::Diff(a) => diff::run(a),
        Command::Agent(a) => agent(a),
    }
}

fn agent(a: cli::AgentArgs) -> Result<i32> {
    // Raw descriptors: the protocol is binary, so no line buffering on stdout.
    let idle = (a.idle_timeout > 0).then(|| std::time::Duration::from_secs(a.idle_timeout));
    match flip_agent::serve_stdio(&a.root, idle) {
        Ok(()) => Ok(exit::OK),
        Err(e) if e.is_idle_timeout() => {
            eprintln!(
                "flip agent: no request from the client for {} s; gave up (staging removed, lock released)",
                a.idle_timeout
            );
            Ok(exit::CONNECTION)
        }
        // A client that went away (closed the connection, broken pipe) has no one left to tell:
        // an aborted session is silent (for a local target our stderr is the user's terminal).
        Err(e) if e.is_client_gone() => Ok(exit::CONNECTION),
        // A garbled connection has no one left to tell but our own stderr.
        Err(flip_agent::AgentError::Wire(e)) => {
            eprintln!("flip agent: {e}");
            Ok(exit::INTERNAL)
        }
        // The client has been sent the error and reports it.
        Err(_) => Ok(exit::INTERNAL),
    }
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

/// Opens a session and takes the lock for `what`.
fn locked_session(target: &Target, common: &Common, what: &str, compress: i32) -> Result<Session> {
    let mut s = target.connect(&common.ssh, compress)?;
    let holder = Holder {
        pid: std::process::id(),
        host: local_host(),
        user: whoami(),
        since: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
        what: what.to_string(),
    };
    let peer = target.display();
    s.lock(holder, common.wait, &mut |h| {
        eprintln!(
            "flip: {peer} is locked by {}; waiting",
            output::printable(h)
        );
    })?;
    Ok(s)
}

/// flip's cache directory: $XDG_CACHE_HOME/flip or ~/.cache/flip.
fn cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    Some(base.join("flip"))
}

fn hash_cache_path(source: &std::path::Path) -> Option<std::path::PathBuf> {
    let key = blake3::hash(source.as_os_str().as_encoded_bytes()).to_hex();
    Some(cache_dir()?.join("hashes").join(&key[..32]))
}

/// When flip's own cache directory is inside the source (`XDG_CACHE_HOME` in a CI workspace),
/// an exclude for it (gitignore syntax, anchored at the source root), with a note: it is flip's
/// state, not the application's, and it changes while flip deploys (a file of it gone by the
/// time it is sent would fail the deploy, and every deploy would ship the cache to the target).
fn own_cache_exclude(source: &std::path::Path) -> Option<String> {
    let cache = resolve(&cache_dir()?);
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
    eprintln!(
        "flip: note: flip's cache {} is inside the source; it is not deployed",
        cache.display()
    );
    Some(glob)
}

/// glibc gives every thread its own malloc arena (up to 8 per core), and memory freed in one
/// arena is not reused by another: with rayon workers allocating paths, buffers and frames, a
/// deploy of 100,000 files kept ~30 MB more resident than it used. Two arenas cost nothing
/// measurable in speed here.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands memory freed by a finished phase (the scan's walk, a decoded manifest) back to the
/// system, so the next phase's peak does not stack on top of it.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Upper bound of the local cache of deployed file versions (for patches of changed files).
const CONTENT_CACHE_BYTES: u64 = 1 << 30;

fn deploy(a: cli::DeployArgs) -> Result<i32> {
    let started = Instant::now();
    let target = Target::parse(&a.target)?;
    let source = match std::fs::metadata(&a.source) {
        Ok(m) if m.is_dir() => std::path::absolute(&a.source)?,
        Ok(_) => {
            return Err(exit::coded(
                exit::SOURCE,
                format!("source {} is not a directory", a.source.display()),
            ))
        }
        Err(e) => {
            return Err(exit::coded(
                exit::SOURCE,
                format!("source directory {}: {e}", a.source.display()),
            ))
        }
    };
    refuse_overlap(&source, &target)?;
    let hash_cache = if a.no_cache {
        None
    } else {
        hash_cache_path(&source)
    };
    if let Some(p) = hash_cache.as_ref().and_then(|p| p.parent()) {
        let _ = std::fs::create_dir_all(p);
    }
    // Connect and take the lock while the source is scanned: over SSH, the server's login shell
    // alone can take longer than scanning a cached tree. If the scan fails, returning drops the
    // connection (and with it the lock) whatever it is doing.
    let connecting = (!a.dry_run).then(|| {
        let (target, common) = (target.clone(), a.common.clone());
        let level = target.compress_level(a.compress_level);
        std::thread::spawn(move || locked_session(&target, &common, "deploy", level))
    });
    let mut excludes = a.exclude.clone();
    excludes.extend(own_cache_exclude(&source));
    let scan = match flip_scan::scan(
        &source,
        &flip_scan::ScanOptions {
            excludes,
            use_flipignore: !a.no_flipignore,
            hash_cache,
        },
    ) {
        Ok(scan) => scan,
        Err(e) => {
            // The agent may hold the lock already: end the session and wait (bounded) for the
            // agent to be gone, so that a retry right after never finds the target locked.
            if let Some(c) = connecting {
                abandon_session(c);
            }
            return Err(e.into());
        }
    };
    for w in &scan.warnings {
        eprintln!("flip: warning: {}", output::printable(w));
    }
    release_free_memory();
    if a.dry_run {
        return dry_run(&a, &target, &scan.manifest, started);
    }
    let mut s = match connecting.map(|c| c.join()) {
        Some(Ok(session)) => session?,
        Some(Err(panic)) => std::panic::resume_unwind(panic),
        None => unreachable!("a dry run returned above"),
    };
    let (current, releases) = s.status()?;
    // With the live manifest in the local cache, only the difference to it is sent.
    let caches = if a.no_cache { None } else { cache_dir() };
    let cache = caches
        .as_ref()
        .map(|d| flip_transfer::ManifestCache::new(d.join("manifests")));
    let content = caches
        .as_ref()
        .map(|d| flip_transfer::ContentCache::new(d.join("content"), CONTENT_CACHE_BYTES));
    let live = releases.iter().find(|r| Some(r.id) == current);
    let live_digest = live.and_then(|r| flip_manifest::Digest::from_hex(&r.manifest_digest));
    // An unchanged tree needs nothing of the live manifest: don't load it.
    let previous = live
        .filter(|_| live_digest != Some(scan.manifest.digest()))
        .and_then(|r| cache.as_ref()?.get(&r.manifest_digest));
    let report = s.stage(
        &source,
        &scan.manifest,
        previous,
        a.label.clone(),
        content.as_ref(),
        live_digest,
        a.itemize,
    );
    // A failed deploy still names what the target warned about (a damaged release, ...).
    let report = report.inspect_err(|_| {
        notices(&mut s);
    })?;
    if let Some(Err(e)) = cache.as_ref().map(|c| c.put(&scan.manifest)) {
        eprintln!("flip: warning: cannot cache the manifest: {e}");
    }
    if let Some(Err(e)) = content.as_ref().map(|c| c.finish()) {
        eprintln!("flip: warning: cannot keep deployed content in the cache: {e}");
    }
    let mut activated = false;
    if !a.no_activate {
        if let Err(e) = s.activate(report.release) {
            notices(&mut s);
            return Err(e.into());
        }
        activated = true;
    }
    // The deploy is live: a failed cleanup is a warning, never a failed deploy.
    let mut pruned = Vec::new();
    if activated {
        match s.prune(a.keep) {
            Ok(r) => pruned = r,
            Err(e) => eprintln!("flip: warning: deployed, but pruning old releases failed: {e}"),
        }
    }
    let (sent, received) = s.bytes();
    let (leftovers, warnings) = notices(&mut s);
    if let Err(e) = s.close() {
        eprintln!("flip: warning: {e}");
    }
    let ms = started.elapsed().as_millis() as u64;
    let r = &report;
    if a.common.json {
        let mut out = serde_json::Map::new();
        out.insert("release".into(), json!(r.release));
        out.insert("previous".into(), json!(r.previous));
        out.insert("target".into(), json!(target.display()));
        out.insert("label".into(), json!(a.label));
        out.insert("activated".into(), json!(activated));
        output::counts_json(&r.counts, &mut out);
        out.insert(
            "bytes".into(),
            json!({
                "sent": sent, "received": received,
                "literal": r.literal_bytes, "matched": r.matched_bytes, "delta": r.delta_bytes,
            }),
        );
        if a.itemize {
            out.insert("items".into(), output::items_json(&r.items));
        }
        out.insert("pruned".into(), json!(pruned));
        out.insert("leftovers".into(), json!(leftovers));
        out.insert("warnings".into(), json!(warnings));
        out.insert("duration_ms".into(), json!(ms));
        println!("{}", serde_json::Value::Object(out));
    } else {
        if a.itemize {
            output::print_items(&r.items);
        }
        eprintln!(
            "flip: {} release {} to {}{}: {}; sent {}, received {} in {:.2} s",
            if activated {
                "deployed"
            } else {
                "staged (not live)"
            },
            r.release,
            target.display(),
            a.label
                .as_deref()
                .map(|l| format!(" ({l})"))
                .unwrap_or_default(),
            output::counts_text(&r.counts),
            output::bytes(sent),
            output::bytes(received),
            ms as f64 / 1000.0
        );
        if r.counts.files.resent > 0 {
            eprintln!(
                "flip: {} file(s) the plan meant to reuse from the target were missing or altered there and were sent instead{}",
                r.counts.files.resent,
                if a.itemize { " (marked above)" } else { " (--itemize names them)" }
            );
        }
    }
    Ok(exit::OK)
}

/// Prints what the agent could not remove and its warnings (stderr, in every mode) and returns
/// them for `--json`: leftovers as `{"path", "error"}` objects.
fn notices(s: &mut Session) -> (Vec<serde_json::Value>, Vec<String>) {
    let warnings = s.take_warnings();
    for w in &warnings {
        eprintln!("flip: warning: {}", output::printable(w));
    }
    let leftovers: Vec<serde_json::Value> = s
        .leftovers()
        .unwrap_or_default()
        .iter()
        .map(|l| {
            eprintln!(
                "flip: warning: cannot remove {}: {} (left over; removed at the next cleanup once that is possible)",
                output::printable(&l.path),
                output::printable(&l.error)
            );
            json!({"path": l.path, "error": l.error})
        })
        .collect();
    (leftovers, warnings)
}

/// Ends a session that is still being opened on another thread (the scan failed): waits up to
/// [`SESSION_END`] for it, then closes it, which waits (bounded too) for the agent to exit.
fn abandon_session(c: std::thread::JoinHandle<Result<Session>>) {
    let deadline = Instant::now() + SESSION_END;
    while !c.is_finished() {
        if Instant::now() > deadline {
            // Still connecting or waiting for the lock: our exit closes the pipes, and the
            // agent ends on its own.
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if let Ok(Ok(session)) = c.join() {
        drop(session);
    }
}

/// How long the client waits for a session being opened when it has to give up on it.
const SESSION_END: std::time::Duration = std::time::Duration::from_secs(10);

/// `path` absolute, with symlinks resolved as far as it exists; the rest (what a deploy would
/// create) is appended with `.` and `..` resolved as the directories would be made.
fn resolve(path: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let comps: Vec<Component> = abs.components().collect();
    for k in (1..=comps.len()).rev() {
        let prefix: std::path::PathBuf = comps[..k].iter().collect();
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

/// Refuses, before anything is created, a local target inside the source (every deploy would
/// copy the target into itself) and a source inside the target's own directories (a release
/// deploying itself). `source` is absolute.
fn refuse_overlap(source: &std::path::Path, target: &Target) -> Result<()> {
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
        return Err(exit::coded(
            exit::USAGE,
            format!(
                "the target {} is inside the source {}{resolved}: the target would be deployed into itself; choose a target outside the source",
                t.display(),
                source.display(),
            ),
        ));
    }
    for own in ["releases", ".flip", "current"] {
        let d = resolve(&dst.join(own));
        if src.starts_with(&d) {
            return Err(exit::coded(
                exit::USAGE,
                format!(
                    "the source {} is inside the target's {} ({}): flip will not deploy a target's own releases or state into it; copy the tree elsewhere first",
                    source.display(),
                    own,
                    d.display()
                ),
            ));
        }
    }
    Ok(())
}

/// `deploy --dry-run`: plan against the live release's manifest; no lock, no change. Predicts
/// with the deploy's own rules and knowledge: the live manifest from the local cache when the
/// deploy would have it there (only then can changed files go as patches, from the content
/// cache), else fetched from the agent.
fn dry_run(
    a: &cli::DeployArgs,
    target: &Target,
    manifest: &flip_manifest::Manifest,
    started: Instant,
) -> Result<i32> {
    let mut s = target.connect(&a.common.ssh, target.compress_level(a.compress_level))?;
    let (current, releases) = match s.status() {
        Ok(st) => st,
        // A target that does not exist yet would simply get everything.
        Err(flip_transfer::TransferError::Remote {
            class: flip_wire::ErrorClass::Target,
            ..
        }) => (None, Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let caches = if a.no_cache { None } else { cache_dir() };
    let cached = releases
        .iter()
        .find(|r| Some(r.id) == current)
        .filter(|r| r.manifest_digest != manifest.digest().to_hex())
        .and_then(|r| {
            let c = flip_transfer::ManifestCache::new(caches.as_ref()?.join("manifests"));
            c.get(&r.manifest_digest)
        });
    let from_cache = cached.is_some();
    let unchanged = releases
        .iter()
        .any(|r| Some(r.id) == current && r.manifest_digest == manifest.digest().to_hex());
    let previous = match (cached, current) {
        (Some(m), _) => Some(m),
        // A no-op: the live manifest is this one.
        (None, Some(_)) if unchanged => Some(manifest.clone()),
        (None, Some(id)) => Some(s.manifest(id)?),
        (None, None) => None,
    };
    let _ = s.close();
    let content = caches
        .as_ref()
        .filter(|_| from_cache)
        .map(|d| flip_transfer::ContentCache::new(d.join("content"), CONTENT_CACHE_BYTES));
    let plan = flip_plan::plan(previous.as_ref(), manifest);
    let mut changes = flip_plan::report::changes(previous.as_ref(), manifest, &plan);
    // Patches are made here as the deploy would make them (this client has both versions); a
    // delta needs the target's signature, so it is predicted by the rule alone.
    let paths: Vec<&flip_manifest::RelPath> = manifest.files().map(|(p, ..)| p).collect();
    let transfers: Vec<_> = changes.transfers().collect();
    let sent: Vec<flip_plan::report::Sent> = transfers
        .par_iter()
        .map(|&(index, size, basis)| {
            use flip_plan::report::Via;
            let old = basis.and_then(|(b, _)| match previous.as_ref()?.get(b)? {
                flip_manifest::EntryKind::File { digest, .. } => Some(*digest),
                _ => None,
            });
            let patchable = flip_transfer::patchable(content.as_ref(), old.as_ref(), size);
            let chosen = flip_plan::report::choose(size, basis.map(|b| b.1), patchable);
            let via = match (chosen, content.as_ref(), old) {
                (Via::Patch, Some(cache), Some(old)) => {
                    let path = a.source.join(paths[index as usize].as_str());
                    if flip_transfer::patch_is_smaller(cache, &old, &path) {
                        Via::Patch
                    } else {
                        Via::Literal
                    }
                }
                _ => chosen,
            };
            flip_plan::report::Sent {
                index,
                via,
                note: flip_transfer::fallback_note(chosen, via),
            }
        })
        .collect();
    drop(transfers);
    changes.settle(&sent);
    let st = &plan.stats;
    if a.common.json {
        let mut out = serde_json::Map::new();
        out.insert("dry_run".into(), json!(true));
        out.insert("target".into(), json!(target.display()));
        out.insert("live".into(), json!(current));
        output::counts_json(&changes.counts, &mut out);
        out.insert(
            "bytes".into(),
            json!({"transfer": st.transfer_bytes, "matched": st.matched_bytes}),
        );
        out.insert("items".into(), output::items_json(&changes.items));
        out.insert(
            "duration_ms".into(),
            json!(started.elapsed().as_millis() as u64),
        );
        println!("{}", serde_json::Value::Object(out));
    } else {
        output::print_items(&changes.items);
        eprintln!(
            "flip: dry run against {} (live: {}): {}; {} to transfer before delta and compression",
            target.display(),
            current.map_or("none".to_string(), |c| format!("release {c}")),
            output::counts_text(&changes.counts),
            output::bytes(st.transfer_bytes)
        );
    }
    Ok(exit::OK)
}

fn releases(a: cli::ReleasesArgs) -> Result<i32> {
    let target = Target::parse(&a.target)?;
    let mut s = target.connect(&a.ssh, 0)?;
    let (_, list) = s.status()?;
    notices(&mut s);
    s.close()?;
    if a.json {
        let arr: Vec<_> = list
            .iter()
            .map(|r| {
                json!({
                    "id": r.id, "label": r.label, "created": output::iso_time(r.created),
                    "files": r.files, "bytes": r.bytes, "current": r.current,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(arr));
    } else if list.is_empty() {
        eprintln!("flip: {} has no releases", target.display());
    } else {
        println!(
            "{:>6}  {:<7}  {:<20}  {:>8}  {:>10}  LABEL",
            "ID", "CURRENT", "CREATED", "FILES", "BYTES"
        );
        for r in &list {
            println!(
                "{:>6}  {:<7}  {:<20}  {:>8}  {:>10}  {}",
                r.id,
                if r.current { "*" } else { "" },
                output::iso_time(r.created),
                r.files,
                output::bytes(r.bytes),
                output::escape(r.label.as_deref().unwrap_or(""))
            );
        }
    }
    Ok(exit::OK)
}

fn switched(target: &Target, json: bool, verb: &str, id: u64, previous: Option<u64>) {
    if json {
        println!(
            "{}",
            json!({"target": target.display(), "release": id, "previous": previous})
        );
    } else {
        let was = previous.map(|p| format!(" (was {p})")).unwrap_or_default();
        eprintln!(
            "flip: {verb} {}: current -> releases/{id}{was}",
            target.display()
        );
    }
}

fn rollback(a: cli::RollbackArgs) -> Result<i32> {
    let target = Target::parse(&a.target)?;
    let mut s = locked_session(&target, &a.common, "rollback", 0)?;
    let r = s.rollback(a.to);
    // Also on failure: "nothing to roll back to" must say which releases were skipped and why.
    notices(&mut s);
    let (id, previous) = r?;
    s.close()?;
    switched(&target, a.common.json, "rolled back", id, previous);
    Ok(exit::OK)
}

fn activate(a: cli::ActivateArgs) -> Result<i32> {
    let target = Target::parse(&a.target)?;
    let mut s = locked_session(&target, &a.common, "activate", 0)?;
    let r = s.activate(a.id);
    notices(&mut s);
    let previous = r?;
    s.close()?;
    switched(&target, a.common.json, "activated", a.id, previous);
    Ok(exit::OK)
}

fn prune(a: cli::PruneArgs) -> Result<i32> {
    let target = Target::parse(&a.target)?;
    let mut s = locked_session(&target, &a.common, "prune", 0)?;
    let r = s.prune(a.keep);
    let (leftovers, warnings) = notices(&mut s);
    let removed = r?;
    s.close()?;
    if a.common.json {
        println!(
            "{}",
            json!({
                "target": target.display(), "removed": removed,
                "leftovers": leftovers, "warnings": warnings,
            })
        );
    } else if removed.is_empty() {
        eprintln!("flip: nothing to prune in {}", target.display());
    } else {
        eprintln!(
            "flip: pruned {}: removed releases {:?}",
            target.display(),
            removed
        );
    }
    Ok(exit::OK)
}

fn verify(a: cli::VerifyArgs) -> Result<i32> {
    let target = Target::parse(&a.target)?;
    let mut s = target.connect(&a.ssh, 0)?;
    let (id, problems) = s.verify(a.id)?;
    s.close().context("closing the session")?;
    if a.json {
        println!(
            "{}",
            json!({"target": target.display(), "release": id, "ok": problems.is_empty(), "problems": problems})
        );
    } else if problems.is_empty() {
        eprintln!(
            "flip: release {id} of {} matches its manifest",
            target.display()
        );
    } else {
        for p in &problems {
            eprintln!("flip: release {id}: {}", output::printable(p));
        }
    }
    Ok(if problems.is_empty() {
        exit::OK
    } else {
        exit::INTEGRITY
    })
}
