//! flip: fast, atomic deploys. See README.md for the tour and ARCHITECTURE.md for the crates.
//!
//! The binary parses the command line and `flip.toml`, hands options to the pipeline in
//! `flip_deploy`, and renders its reports (human lines on stderr, `--json` on stdout).

mod cli;
mod config;
mod diff;
mod exit;
mod output;
mod render;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command, Common};
use config::Config;
use flip_deploy::{Options, SshSettings, SwitchPlan, Target};
use flip_transfer::Session;
use flip_wire::Purpose;
use rayon::prelude::*;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

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
        Command::Config(a) => a.json,
        Command::Init(_) | Command::Agent(_) | Command::Blake3(_) => false,
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
    if let Command::Agent(a) = cli.command {
        return agent(a);
    }
    if let Command::Blake3(a) = cli.command {
        return blake3_files(a);
    }
    if let Command::Init(a) = &cli.command {
        return init(a);
    }
    // `flip diff` needs no target and no settings: a broken flip.toml does not stop it.
    if let Command::Diff(a) = cli.command {
        return diff::run(a);
    }
    let cfg = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Deploy(a) => deploy(a, cfg.as_ref()),
        Command::Releases(a) => releases(a, cfg.as_ref()),
        Command::Rollback(a) => rollback(a, cfg.as_ref()),
        Command::Activate(a) => activate(a, cfg.as_ref()),
        Command::Prune(a) => prune(a, cfg.as_ref()),
        Command::Verify(a) => verify(a, cfg.as_ref()),
        Command::Config(a) => show_config(a, cfg.as_ref()),
        Command::Init(_) | Command::Agent(_) | Command::Diff(_) | Command::Blake3(_) => {
            unreachable!("handled above")
        }
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

fn init(a: &cli::InitArgs) -> Result<i32> {
    let path = std::path::Path::new(config::FILE);
    if path.exists() && !a.force {
        return Err(exit::coded(
            exit::USAGE,
            format!(
                "{} exists already; edit it, or pass --force to replace it",
                path.display()
            ),
        ));
    }
    std::fs::write(path, config::STARTER)
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!(
        "flip: wrote {}: set `source` and the targets of each environment, then `flip deploy prod`",
        path.display()
    );
    Ok(exit::OK)
}

/// `flip blake3 FILE...`: `HASH  FILE` lines, as b3sum prints them.
fn blake3_files(a: cli::Blake3Args) -> Result<i32> {
    for file in &a.files {
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_mmap(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        println!("{}  {}", hasher.finalize().to_hex(), file.display());
    }
    Ok(exit::OK)
}

/// The environment named `word` in the configuration, if it names one.
fn env_of<'c>(cfg: Option<&'c Config>, word: &str) -> Option<&'c Config> {
    cfg.filter(|c| c.has_env(word))
}

/// `word`'s targets: every target of the environment `word`, or the one target it is.
fn targets_of(cfg: Option<&Config>, word: &str) -> Result<(Option<config::Resolved>, Vec<Target>)> {
    match env_of(cfg, word) {
        Some(c) => {
            let r = c.env(word)?;
            let targets = r
                .targets
                .iter()
                .map(|t| {
                    Target::parse(t).map_err(|e| {
                        exit::coded(
                            exit::USAGE,
                            format!("{}: env.{word}.targets: {e}", c.path.display()),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((Some(r), targets))
        }
        None => Ok((None, vec![Target::parse(word)?])),
    }
}

fn ssh_settings(common: &Common) -> SshSettings {
    SshSettings {
        identity: common.ssh.identity.clone(),
        accept_new_host_key: common.ssh.accept_new_host_key,
        ssh_command: common.ssh.ssh_command.clone(),
        remote_flip: common.ssh.remote_flip.clone(),
        config_file: common.ssh.ssh_config.clone(),
        agent_binary: common.ssh.agent_binary.clone(),
    }
}

fn ssh_only(ssh: &cli::SshArgs) -> SshSettings {
    ssh_settings(&Common {
        json: false,
        wait: false,
        ssh: ssh.clone(),
    })
}

/// flip's cache directory: $XDG_CACHE_HOME/flip or ~/.cache/flip (the platform's, by `dirs`).
fn cache_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|base| base.join("flip"))
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

/// Options of a single-target or environment deploy, by precedence: flag > environment table >
/// top level > default.
fn deploy_options(
    a: &cli::DeployArgs,
    cfg: Option<&Config>,
) -> Result<(Options, Vec<Target>, Option<String>)> {
    let (source, targets, env, settings) = match &a.target {
        Some(t) => {
            let top = cfg.map(|c| c.top().clone()).unwrap_or_default();
            (PathBuf::from(&a.first), vec![Target::parse(t)?], None, top)
        }
        None => {
            let Some(c) = cfg else {
                return Err(exit::coded(
                    exit::USAGE,
                    format!(
                        "`flip deploy {}` names an environment, but there is no {} here (and no --config FILE); deploy a directory with `flip deploy SOURCE TARGET`, or write one with `flip init`",
                        a.first,
                        config::FILE
                    ),
                ));
            };
            let r = c.env(&a.first)?;
            let Some((source, _)) = r.source.clone() else {
                return Err(exit::coded(
                    exit::USAGE,
                    format!(
                        "{}: source: not set (at the top level or in env.{}): flip does not know what to deploy",
                        c.path.display(),
                        a.first
                    ),
                ));
            };
            let (_, targets) = targets_of(cfg, &a.first)?;
            let settings = config::Settings {
                source: Some(source.clone()),
                exclude: Some(r.exclude.0.clone()),
                keep: Some(r.keep.0),
                parallel: Some(r.parallel.0),
                compress_level: r.compress_level.0,
            };
            (source, targets, Some(a.first.clone()), settings)
        }
    };
    let label = match (&a.label, &env) {
        (Some(l), _) => Some(l.clone()),
        // An environment's deploy is one label across its targets.
        (None, Some(_)) => Some(flip_deploy::default_label(&source)),
        (None, None) => None,
    };
    let mut excludes = if a.exclude.is_empty() {
        settings.exclude.unwrap_or_default()
    } else {
        a.exclude.clone()
    };
    // flip's own cache inside the source (even with --no-cache: it is there all the same).
    if let Some(cache) = cache_dir() {
        if let Some(glob) = flip_deploy::own_cache_exclude(&source, &cache) {
            eprintln!(
                "flip: note: flip's cache {} is inside the source; it is not deployed",
                output::printable(&cache.display().to_string())
            );
            excludes.push(glob);
        }
    }
    let o = Options {
        source,
        excludes,
        flipignore: !a.no_flipignore,
        label,
        keep: a.keep.or(settings.keep).unwrap_or(config::KEEP),
        activate: !a.no_activate,
        itemize: a.itemize,
        cache_dir: if a.no_cache { None } else { cache_dir() },
        compress_level: a.compress_level.or(settings.compress_level),
        wait: a.common.wait,
        force_release: a.force_release,
        parallel: a.parallel.or(settings.parallel).unwrap_or(0),
        ssh: ssh_settings(&a.common),
    };
    Ok((o, targets, env))
}

fn deploy(a: cli::DeployArgs, cfg: Option<&Config>) -> Result<i32> {
    let started = Instant::now();
    let (o, targets, env) = deploy_options(&a, cfg)?;
    if a.dry_run {
        return dry_runs(&a, &o, &targets, env.as_deref(), started);
    }
    let progress = render::Progress::new(&targets);
    let d = flip_deploy::deploy(&o, &targets, progress.clone())?;
    progress.done();
    for w in &d.scan_warnings {
        eprintln!("flip: warning: {}", output::printable(w));
    }
    match env {
        None => render::single(d, a.itemize, a.common.json),
        Some(env) => Ok(render::environment(&env, &d, a.itemize, a.common.json)),
    }
}

/// `deploy --dry-run` on every target.
fn dry_runs(
    a: &cli::DeployArgs,
    o: &Options,
    targets: &[Target],
    env: Option<&str>,
    started: Instant,
) -> Result<i32> {
    let source = o.source.clone();
    if !source.is_dir() {
        return Err(exit::coded(
            exit::SOURCE,
            format!("source {} is not a directory", source.display()),
        ));
    }
    for t in targets {
        flip_deploy::refuse_overlap(&std::path::absolute(&source)?, t)?;
    }
    let scan = flip_scan::scan(
        &source,
        &flip_scan::ScanOptions {
            excludes: o.excludes.clone(),
            use_flipignore: o.flipignore,
            hash_cache: None,
        },
    )?;
    for w in &scan.warnings {
        eprintln!("flip: warning: {}", output::printable(w));
    }
    let mut hosts = Vec::new();
    for t in targets {
        hosts.push(dry_run(a, o, t, &scan.manifest, started, env.is_none())?);
    }
    if env.is_some() && a.common.json {
        println!("{}", json!({"hosts": hosts}));
    }
    Ok(exit::OK)
}
/// `deploy --dry-run`: plan against the live release's manifest; no lock, no change. Predicts
/// with the deploy's own rules and knowledge: the live manifest from the local cache when the
/// deploy would have it there (only then can changed files go as patches, from the content
/// cache), else fetched from the agent.
fn dry_run(
    a: &cli::DeployArgs,
    o: &Options,
    target: &Target,
    manifest: &flip_manifest::Manifest,
    started: Instant,
    print_json: bool,
) -> Result<serde_json::Value> {
    let mut s = target.connect(&o.ssh, target.compress_level(o.compress_level))?;
    let (current, releases) = match s.status() {
        Ok(st) => st,
        // A target that does not exist yet would simply get everything.
        Err(flip_transfer::TransferError::Remote {
            class: flip_wire::ErrorClass::Target,
            ..
        }) => (None, Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let caches = o.cache_dir.clone();
    let cached = releases
        .iter()
        .find(|r| Some(r.id) == current)
        .filter(|r| r.manifest_digest != manifest.digest())
        .and_then(|r| flip_deploy::Caches::open(caches.as_deref()).manifest(&r.manifest_digest));
    let from_cache = cached.is_some();
    let unchanged = releases
        .iter()
        .any(|r| Some(r.id) == current && r.manifest_digest == manifest.digest());
    let previous = match (cached, current) {
        (Some(m), _) => Some(m),
        // A no-op: the live manifest is this one.
        (None, Some(_)) if unchanged => Some(manifest.clone()),
        (None, Some(id)) => Some(s.manifest(id)?),
        (None, None) => None,
    };
    let _ = s.close();
    let content = caches.as_ref().filter(|_| from_cache).map(|d| {
        flip_transfer::ContentCache::new(d.join("content"), flip_deploy::CONTENT_CACHE_BYTES)
    });
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
            let cached = flip_transfer::in_cache(content.as_ref(), old.as_ref());
            let chosen = flip_transfer::send_policy(size, basis.map(|b| b.1), cached);
            let via = match (chosen, content.as_ref(), old) {
                (Via::Patch, Some(cache), Some(old)) => {
                    let path = o.source.join(paths[index as usize].as_str());
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
    let mut out = serde_json::Map::new();
    {
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
    }
    let out = serde_json::Value::Object(out);
    if a.common.json {
        if print_json {
            println!("{out}");
        }
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
    Ok(out)
}

/// Options for the commands other than deploy: connections and locking only.
fn command_options(common: &Common) -> Options {
    Options {
        source: PathBuf::new(),
        excludes: Vec::new(),
        flipignore: true,
        label: None,
        keep: config::KEEP,
        activate: true,
        itemize: false,
        cache_dir: None,
        compress_level: Some(0),
        wait: common.wait,
        force_release: false,
        parallel: 0,
        ssh: ssh_settings(common),
    }
}

/// Opens a session and takes the lock for `what`.
fn locked_session(target: &Target, common: &Common, what: Purpose) -> Result<Session> {
    let peer = target.display();
    Ok(flip_deploy::locked_session(
        target,
        &command_options(common),
        what,
        &mut |h| {
            eprintln!(
                "flip: {peer} is locked by {}; waiting",
                output::printable(h)
            )
        },
    )?)
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
            render::leftover_line(&l.path, &l.error);
            json!({"path": l.path, "error": l.error})
        })
        .collect();
    (leftovers, warnings)
}

fn releases(a: cli::ReleasesArgs, cfg: Option<&Config>) -> Result<i32> {
    let (env, targets) = targets_of(cfg, &a.target)?;
    let ssh = ssh_only(&a.ssh);
    let mut lists = Vec::new();
    for target in &targets {
        let mut s = target.connect(&ssh, 0)?;
        let (_, list) = s.status()?;
        notices(&mut s);
        s.close()?;
        lists.push(list);
    }
    if let Some(env) = env {
        render::release_table(&env.env, &targets, &lists, a.json);
        return Ok(exit::OK);
    }
    let (target, list) = (&targets[0], &lists[0]);
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
        for r in list {
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

fn rollback(a: cli::RollbackArgs, cfg: Option<&Config>) -> Result<i32> {
    let (env, targets) = targets_of(cfg, &a.target)?;
    if let Some(env) = env {
        if a.to.is_some() {
            return Err(exit::coded(
                exit::USAGE,
                "release ids differ between targets: for an environment, roll back to a label with `flip activate ENV LABEL`",
            ));
        }
        let out = flip_deploy::switch(
            &targets,
            &command_options(&a.common),
            &SwitchPlan::Rollback,
            Purpose::Rollback,
            &render::Progress::lines(&targets),
        );
        return Ok(render::switch(&env.env, "rolled back", out, a.common.json));
    }
    let target = &targets[0];
    let mut s = locked_session(target, &a.common, Purpose::Rollback)?;
    let r = s.rollback(a.to);
    // Also on failure: "nothing to roll back to" must say which releases were skipped and why.
    notices(&mut s);
    let (id, previous) = r?;
    s.close()?;
    switched(target, a.common.json, "rolled back", id, previous);
    Ok(exit::OK)
}

fn activate(a: cli::ActivateArgs, cfg: Option<&Config>) -> Result<i32> {
    let (env, targets) = targets_of(cfg, &a.target)?;
    let id = a.id.parse::<u64>();
    if let Some(env) = env {
        let plan = match id {
            Ok(id) => SwitchPlan::Id(id),
            Err(_) => SwitchPlan::Label(a.id.clone()),
        };
        let out = flip_deploy::switch(
            &targets,
            &command_options(&a.common),
            &plan,
            Purpose::Activate,
            &render::Progress::lines(&targets),
        );
        return Ok(render::switch(&env.env, "activated", out, a.common.json));
    }
    let Ok(id) = id else {
        return Err(exit::coded(
            exit::USAGE,
            format!("invalid release id {:?}: a number", a.id),
        ));
    };
    let target = &targets[0];
    let mut s = locked_session(target, &a.common, Purpose::Activate)?;
    let r = s.activate(id);
    notices(&mut s);
    let previous = r?;
    s.close()?;
    switched(target, a.common.json, "activated", id, previous);
    Ok(exit::OK)
}

fn prune(a: cli::PruneArgs, cfg: Option<&Config>) -> Result<i32> {
    let (env, targets) = targets_of(cfg, &a.target)?;
    let keep = a
        .keep
        .or(env.as_ref().map(|e| e.keep.0))
        .or(cfg.and_then(|c| c.top().keep))
        .unwrap_or(config::KEEP);
    let mut hosts = Vec::new();
    let mut code = exit::OK;
    for target in &targets {
        let r = (|| -> Result<serde_json::Value> {
            let mut s = locked_session(target, &a.common, Purpose::Prune)?;
            let removed = s.prune(keep)?;
            let (leftovers, warnings) = notices(&mut s);
            s.close()?;
            if !a.common.json {
                if removed.is_empty() {
                    eprintln!("flip: nothing to prune in {}", target.display());
                } else {
                    eprintln!(
                        "flip: pruned {}: removed releases {:?}",
                        target.display(),
                        removed
                    );
                }
            }
            Ok(json!({
                "target": target.display(), "removed": removed,
                "leftovers": leftovers, "warnings": warnings,
            }))
        })();
        match r {
            Ok(v) => hosts.push(v),
            Err(e) if env.is_none() => return Err(e),
            Err(e) => {
                code = exit::PARTIAL;
                hosts.push(render::failed_host(&target.display(), &e));
            }
        }
    }
    if a.common.json {
        match env {
            Some(_) => println!("{}", json!({"hosts": hosts})),
            None => println!("{}", hosts[0]),
        }
    }
    Ok(code)
}

fn verify(a: cli::VerifyArgs, cfg: Option<&Config>) -> Result<i32> {
    let (env, targets) = targets_of(cfg, &a.target)?;
    let ssh = ssh_only(&a.ssh);
    let mut hosts = Vec::new();
    let mut code = exit::OK;
    for target in &targets {
        let r = (|| -> Result<(u64, Vec<String>)> {
            let mut s = target.connect(&ssh, 0)?;
            let (id, problems) = s.verify(a.id)?;
            s.close().context("closing the session")?;
            Ok((id, problems))
        })();
        match r {
            Ok((id, problems)) => {
                if !a.json {
                    if problems.is_empty() {
                        eprintln!(
                            "flip: release {id} of {} matches its manifest",
                            target.display()
                        );
                    } else {
                        for p in &problems {
                            eprintln!(
                                "flip: {}: release {id}: {}",
                                target.display(),
                                output::printable(p)
                            );
                        }
                    }
                }
                if !problems.is_empty() {
                    code = if env.is_some() && targets.len() > 1 {
                        exit::PARTIAL
                    } else {
                        exit::INTEGRITY
                    };
                }
                hosts.push(json!({"target": target.display(), "release": id, "ok": problems.is_empty(), "problems": problems}));
            }
            Err(e) if env.is_none() => return Err(e),
            Err(e) => {
                render::host_error(&target.display(), &error_text(&e), "");
                code = exit::PARTIAL;
                hosts.push(render::failed_host(&target.display(), &e));
            }
        }
    }
    if a.json {
        match env {
            Some(_) => println!("{}", json!({"hosts": hosts})),
            None => println!("{}", hosts[0]),
        }
    }
    Ok(code)
}

fn show_config(a: cli::ConfigArgs, cfg: Option<&Config>) -> Result<i32> {
    let Some(c) = cfg else {
        return Err(exit::coded(
            exit::USAGE,
            format!(
                "no {} here (and no --config FILE); write one with `flip init`",
                config::FILE
            ),
        ));
    };
    let r = c.env(&a.env)?;
    let source = r
        .source
        .as_ref()
        .map(|(p, from)| (p.display().to_string(), *from));
    if a.json {
        println!(
            "{}",
            json!({
                "config": c.path.display().to_string(),
                "env": r.env,
                "targets": r.targets,
                "source": source.as_ref().map(|s| &s.0),
                "exclude": r.exclude.0,
                "keep": r.keep.0,
                "parallel": r.parallel.0,
                "compress_level": r.compress_level.0,
                "from": {
                    "source": source.as_ref().map(|s| s.1),
                    "exclude": r.exclude.1, "keep": r.keep.1, "parallel": r.parallel.1,
                    "compress_level": r.compress_level.1,
                },
            })
        );
    } else {
        println!("# {} [env.{}]", c.path.display(), r.env);
        println!("targets = {:?}", r.targets);
        match &source {
            Some((s, from)) => println!("source = {s:?}  # {from}"),
            None => println!("# source: not set"),
        }
        println!("exclude = {:?}  # {}", r.exclude.0, r.exclude.1);
        println!("keep = {}  # {}", r.keep.0, r.keep.1);
        println!(
            "parallel = {}  # {}{}",
            r.parallel.0,
            r.parallel.1,
            if r.parallel.0 == 0 {
                " (all targets at once)"
            } else {
                ""
            }
        );
        match r.compress_level.0 {
            Some(l) => println!("compress_level = {l}  # {}", r.compress_level.1),
            None => println!("# compress_level: default (3 over SSH, off locally)"),
        }
    }
    Ok(exit::OK)
}
