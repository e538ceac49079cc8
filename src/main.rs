//! flip: fast, atomic deploys. See README.md for the tour and ARCHITECTURE.md for the crates.
//!
//! The binary parses the command line and `flip.toml`, hands options to the pipeline in
//! `flip_deploy`, and renders its reports (human lines on stderr, `--json` on stdout).

#[macro_use]
mod output;
mod agent_cmd;
mod cli;
mod config;
mod config_hooks;
mod diff;
mod doctor;
mod exit;
mod progress;
mod render;

use anyhow::{Context, Result};
use cli::{Cli, Command, Common};
use config::Config;
use exit::Code;
use flip_deploy::{Options, SshSettings, SwitchPlan, Target};
use flip_transfer::Session;
use flip_wire::Purpose;
use rayon::prelude::*;
use serde_json::json;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    agent_cmd::limit_malloc_arenas();
    let args: Vec<OsString> = std::env::args_os().collect();
    let cli = match cli::parse(&args) {
        Ok(c) => c,
        Err(e) => return refused(&e, &args).into(),
    };
    output::set_verbosity(cli.quiet, cli.verbose);
    let json = match &cli.command {
        Command::Deploy(a) => a.common.json,
        Command::Rollback(a) => a.common.json,
        Command::Activate(a) => a.common.json,
        Command::Prune(a) => a.common.json,
        Command::Releases(a) => a.json,
        Command::Verify(a) => a.json,
        Command::Diff(a) => a.json,
        Command::Config(a) => a.json,
        Command::Doctor(a) => a.json,
        Command::Init(_)
        | Command::Agent(_)
        | Command::Blake3(_)
        | Command::Completions(_)
        | Command::Man => false,
    };
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let code = exit::code_of(e.as_ref());
            let message = error_text(&e);
            eprintln!("flip: error: {}", output::printable(&message));
            if json {
                outln!("{}", json!({"error": {"code": code, "message": message}}));
            }
            code
        }
    };
    if output::stdout_failed() && code == exit::OK {
        return Code::Output.into();
    }
    code.into()
}

/// A command line clap refused (or `--help`, `--version`): clap's text on stderr (the help on
/// stdout), and when the arguments ask for `--json`, the error as JSON on stdout too, as every
/// command's errors are.
fn refused(e: &clap::Error, args: &[OsString]) -> Code {
    let code = exit::code_of(e);
    let _ = e.print();
    let json = args
        .iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .any(|a| a == "--json");
    if json && code != Code::Ok {
        let message = clap_message(&e.render().to_string());
        outln!("{}", json!({"error": {"code": code, "message": message}}));
    }
    code
}

/// clap's error text as one line, without its usage and hint: `the following required
/// arguments were not provided: <TARGET>`, `unexpected argument '--jsno' found; tip: a
/// similar argument exists: '--json'`.
fn clap_message(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines().take_while(|l| !l.starts_with("Usage:")) {
        let line = line.trim().trim_start_matches("error: ");
        if line.is_empty() || line.starts_with("For more information") {
            continue;
        }
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') { " " } else { "; " });
        }
        out.push_str(line);
    }
    out
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

fn run(cli: Cli) -> Result<Code> {
    if let Command::Completions(a) = &cli.command {
        let mut script = Vec::new();
        cli::completions(a.shell, &mut script);
        out!("{}", String::from_utf8_lossy(&script));
        return Ok(exit::OK);
    }
    if let Command::Man = &cli.command {
        let mut page = Vec::new();
        cli::man(&mut page).context("cannot render the manual page")?;
        out!("{}", String::from_utf8_lossy(&page));
        return Ok(exit::OK);
    }
    if let Command::Agent(a) = cli.command {
        return agent(a);
    }
    if let Command::Blake3(a) = cli.command {
        return blake3_files(a);
    }
    if let Command::Init(a) = &cli.command {
        let path = cli.config.as_deref();
        return init(a, path.unwrap_or(std::path::Path::new(config::FILE)));
    }
    // `flip diff` needs no target and no settings: a broken flip.toml does not stop it.
    // Its shared paths are the file's top level's, when it has any (so shared paths, links in
    // every release by design, are no change).
    if let Command::Diff(a) = cli.command {
        let shared = Config::load(cli.config.as_deref())
            .ok()
            .flatten()
            .and_then(|c| c.top().shared(&c.path, "", None).ok())
            .map(|(s, _)| s)
            .filter(|s| !s.is_empty());
        return diff::run(a, shared.as_ref());
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
        Command::Doctor(a) => doctor::run(a, cfg.as_ref()),
        Command::Init(_)
        | Command::Agent(_)
        | Command::Diff(_)
        | Command::Blake3(_)
        | Command::Completions(_)
        | Command::Man => {
            unreachable!("handled above")
        }
    }
}

/// `flip agent`: the agent, as `flip-agent agent` serves it (src/agent_cmd.rs).
fn agent(a: cli::AgentArgs) -> Result<Code> {
    let preamble = agent_cmd::preamble(a.preamble.iter().map(String::as_str))
        .map_err(|e| exit::coded(exit::USAGE, e))?;
    Ok(
        match agent_cmd::serve(&a.root, a.idle_timeout, a.mkpath, preamble) {
            Ok(()) => exit::OK,
            Err(e) => exit::code_of(&e),
        },
    )
}

/// `flip init`: writes the starter configuration to `path` (flip.toml, or `--config FILE`).
fn init(a: &cli::InitArgs, path: &std::path::Path) -> Result<Code> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    // Never through a symlink (a dangling one planted in a shared directory included): a new
    // file, and with --force one renamed over whatever is there.
    let found = std::fs::symlink_metadata(path).ok();
    // Refused up front, as --force could not replace them either.
    if found.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(exit::coded(
            exit::USAGE,
            format!(
                "{} is a directory; name the file to write (--config FILE)",
                path.display()
            ),
        ));
    }
    // The path given cannot be written: the user's to choose another, not a bug.
    let cannot_write = |why: String| {
        exit::coded(
            exit::USAGE,
            format!("cannot write {}: {why}", path.display()),
        )
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    match std::fs::metadata(parent) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(cannot_write(format!(
                "{} is not a directory",
                parent.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(cannot_write(format!(
                "there is no directory {}",
                parent.display()
            )))
        }
        // Anything else (a directory that cannot be searched) is said by the write below.
        Err(_) => {}
    }
    let exists = found.is_some();
    if exists && !a.force {
        return Err(exit::coded(
            exit::USAGE,
            format!(
                "{} exists already; edit it, or pass --force to replace it",
                path.display()
            ),
        ));
    }
    let name = path
        .file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let new = if exists { tmp.as_path() } else { path };
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(new)
        .and_then(|mut f| f.write_all(config::STARTER.as_bytes()))
        .and_then(|()| match exists {
            true => std::fs::rename(new, path),
            false => Ok(()),
        });
    if let Err(e) = written {
        if exists {
            let _ = std::fs::remove_file(new);
        }
        // A directory this user may not write, a read-only or full file system.
        return Err(cannot_write(e.to_string()));
    }
    let with = match path == std::path::Path::new(config::FILE) {
        true => String::new(),
        false => format!(" --config {}", path.display()),
    };
    note!(
        "flip: wrote {}: set `source` and the targets of each environment, then `flip deploy prod{with}`",
        path.display()
    );
    Ok(exit::OK)
}

/// `flip blake3 FILE...`: `HASH  FILE` lines, as b3sum prints them (src/agent_cmd.rs).
fn blake3_files(a: cli::Blake3Args) -> Result<Code> {
    agent_cmd::blake3_files(&a.files, &mut std::io::stdout().lock())?;
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
                    config_target(t, &c.dir()).map_err(|e| {
                        exit::coded(
                            exit::USAGE,
                            format!("{}: env.{word}.targets: {e}", c.path.display()),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            // One target twice would wait on its own lock (for ever with --wait).
            for (i, t) in targets.iter().enumerate() {
                if let Some(j) = targets[..i].iter().position(|u| u.same_as(t)) {
                    return Err(exit::coded(
                        exit::USAGE,
                        format!(
                            "{}: env.{word}.targets: {:?} and {:?} name the same target",
                            c.path.display(),
                            r.targets[j],
                            r.targets[i]
                        ),
                    ));
                }
            }
            Ok((Some(r), targets))
        }
        None => Ok((None, vec![Target::parse(word)?])),
    }
}

/// A target as `flip.toml` writes it: a local one with a leading `~` or `~user` expanded as a
/// shell does (no shell read the file) and, when relative, relative to the file, as `source`
/// is (the file says where things are wherever flip runs); an SSH target as it is.
fn config_target(t: &str, dir: &std::path::Path) -> Result<Target> {
    match Target::parse(t)? {
        Target::Local(_) => {
            let path = dir.join(flip_agent::home_expanded(std::path::Path::new(t)));
            Ok(Target::parse(&path.to_string_lossy())?)
        }
        ssh => Ok(ssh),
    }
}

fn ssh_settings(common: &Common) -> SshSettings {
    // As OpenSSH does: a key file that is not there is said, and the other keys are tried.
    if let Some(key) = &common.ssh.identity {
        if let Err(e) = std::fs::metadata(key) {
            note!(
                "flip: warning: identity file {}: {e}; trying the other keys",
                output::printable(&key.display().to_string())
            );
        }
    }
    SshSettings {
        identity: common.ssh.identity.clone(),
        accept_new_host_key: common.ssh.accept_new_host_key,
        ssh_command: common.ssh.ssh_command.clone(),
        remote_flip: common.ssh.remote_flip.clone(),
        config_file: common.ssh.ssh_config.clone(),
        agent_binary: common.ssh.agent_binary.clone(),
        quiet: output::quiet(),
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

/// Whether to list every changed path: `--itemize`, or `-vv` without `--json` (whose output
/// `-v` never changes).
fn itemized(itemize: bool, json: bool) -> bool {
    itemize || (output::verbosity() >= 2 && !json)
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
                whole_file: r.whole_file.0,
                shared_dirs: Some(r.shared_dirs.0.clone()),
                shared_files: Some(r.shared_files.0.clone()),
                writable_dirs: Some(r.writable_dirs.0.clone()),
                writable_mode: Some(r.writable_mode.0.clone()),
                writable_owner: r.writable_owner.0.clone(),
                before_activate: Some(r.before_activate.0.clone()),
                after_activate: Some(r.after_activate.0.clone()),
                rollback_on_failure: Some(r.rollback_on_failure.0),
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
        settings.exclude.clone().unwrap_or_default()
    } else {
        a.exclude.clone()
    };
    // flip's own cache inside the source (even with --no-cache: it is there all the same).
    if let Some(cache) = cache_dir() {
        if let Some(glob) = flip_deploy::own_cache_exclude(&source, &cache) {
            note!(
                "flip: note: flip's cache {} is inside the source; it is not deployed",
                output::printable(&cache.display().to_string())
            );
            excludes.push(glob);
        }
    }
    let (shared, writable_owner) = match cfg {
        Some(c) => settings.shared(&c.path, "", None)?,
        None => Default::default(),
    };
    let o = Options {
        shared,
        writable_owner,
        source,
        excludes,
        flipignore: !a.no_flipignore,
        label,
        keep: a.keep.or(settings.keep).unwrap_or(config::KEEP),
        activate: !a.no_activate,
        itemize: itemized(a.itemize, a.common.json),
        cache_dir: if a.no_cache { None } else { cache_dir() },
        compress_level: a.compress_level.or(settings.compress_level),
        whole_file: match (a.whole_file, a.no_whole_file) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => settings.whole_file,
        },
        wait: a.common.wait,
        force_release: a.force_release,
        parallel: a.parallel.or(settings.parallel).unwrap_or(0),
        mkpath: a.mkpath,
        ssh: ssh_settings(&a.common),
        hooks: flip_deploy::Hooks {
            before_activate: settings.before_activate.unwrap_or_default().0,
            after_activate: settings.after_activate.unwrap_or_default().0,
            rollback_on_failure: settings.rollback_on_failure.unwrap_or(false),
            env: env.clone(),
        },
    };
    Ok((o, targets, env))
}

fn deploy(a: cli::DeployArgs, cfg: Option<&Config>) -> Result<Code> {
    let started = Instant::now();
    let (o, targets, env) = deploy_options(&a, cfg)?;
    if a.dry_run {
        return dry_runs(&a, &o, &targets, env.as_deref(), started);
    }
    let progress = progress::Progress::new(&targets, a.common.json);
    let d = flip_deploy::deploy(&o, &targets, progress.clone())?;
    progress.done();
    for w in &d.scan_warnings {
        note!("flip: warning: {}", output::printable(w));
    }
    match env {
        None => render::single(d, o.itemize, a.common.json),
        Some(env) => Ok(render::environment(&env, &d, o.itemize, a.common.json)),
    }
}

/// `deploy --dry-run` on every target.
fn dry_runs(
    a: &cli::DeployArgs,
    o: &Options,
    targets: &[Target],
    env: Option<&str>,
    started: Instant,
) -> Result<Code> {
    // Checked as the deploy checks it (shared paths of the wrong kind in the source too).
    let source = flip_deploy::check_source(&o.source, targets, &o.shared)?;
    let scan = flip_scan::scan(
        &source,
        &flip_scan::ScanOptions {
            excludes: o.excludes.clone(),
            use_flipignore: o.flipignore,
            hash_cache: None,
            meter: Default::default(),
        },
    )?;
    for w in &scan.warnings {
        note!("flip: warning: {}", output::printable(w));
    }
    // The release as the deploy records it: shared paths are symlinks whatever shared/ holds.
    let manifest = match o.shared.is_empty() {
        true => scan.manifest,
        false => shared_release(&o.shared, &scan.manifest)?,
    };
    let mut hosts = Vec::new();
    for t in targets {
        hosts.push(dry_run(a, o, t, &manifest, started, env.is_none())?);
    }
    if env.is_some() && a.common.json {
        outln!("{}", json!({"hosts": hosts}));
    }
    Ok(exit::OK)
}

/// The release a deploy of `scanned` records with shared paths `shared` (the same whatever the
/// target's `shared/` holds): every shared path a symlink into `shared/`.
///
/// # Errors
/// Exit code `SOURCE` (the [`flip_plan::shared::SharedError`]'s message) when the settings are
/// invalid or the source has a shared path, or a parent of one, of the wrong kind.
pub(crate) fn shared_release(
    shared: &flip_plan::shared::SharedPaths,
    scanned: &flip_manifest::Manifest,
) -> Result<flip_manifest::Manifest> {
    let all = shared.all().into_iter().map(|(p, _)| p).collect();
    Ok(shared
        .apply(scanned, &all)
        .map_err(|e| exit::coded(exit::SOURCE, e.to_string()))?
        .release)
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
    let level = target.compress_level(o.compress_level);
    let mut s = target.connect_agent(&o.ssh, level, o.mkpath)?;
    let (current, releases) = dry_run_status(&mut s)?;
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
    // The live manifest, when it must be fetched, goes with `Bye`: one round trip.
    let fetch = current.filter(|_| cached.is_none() && !unchanged);
    if let Some(id) = fetch {
        s.queue_manifest(id)?;
    }
    s.queue_bye()?;
    let previous = match (cached, current) {
        (Some(m), _) => Some(m),
        // A no-op: the live manifest is this one.
        (None, Some(_)) if unchanged => Some(manifest.clone()),
        (None, Some(_)) => Some(s.manifest_answer()?),
        (None, None) => None,
    };
    let round_trips = s.round_trips();
    let _ = s.closed();
    let content = caches.as_ref().filter(|_| from_cache).map(|d| {
        flip_transfer::ContentCache::new(d.join("content"), flip_deploy::CONTENT_CACHE_BYTES)
    });
    let plan = flip_plan::plan(previous.as_ref(), manifest);
    let mut changes = flip_plan::report::changes(previous.as_ref(), manifest, &plan);
    // Patches are made here as the deploy would make them (this client has both versions); a
    // delta needs the target's signature, so it is predicted by the rule alone.
    let paths: Vec<&flip_manifest::RelPath> = manifest.files().map(|(p, ..)| p).collect();
    let transfers: Vec<_> = changes.transfers().collect();
    let sent = predicted_sends(
        &transfers,
        previous.as_ref(),
        content.as_ref(),
        &paths,
        o,
        target.whole_files(o.whole_file),
    );
    drop(transfers);
    changes.settle(&sent);
    // The live release already is this tree: the deploy makes no release (unless forced, or
    // unless it finds the live tree altered: then a new release repairs it) and reports every
    // file unchanged and nothing linked; so does its dry run.
    let no_release = unchanged && !o.force_release;
    if no_release {
        let files = manifest.file_count() as u64;
        changes = flip_plan::report::Changes::default();
        changes.counts.files.total = files;
        changes.counts.files.unchanged = files;
    }
    let st = &plan.stats;
    let (transfer_bytes, matched_bytes) = match no_release {
        true => (0, 0),
        false => (st.transfer_bytes, st.matched_bytes),
    };
    let mut out = serde_json::Map::new();
    {
        out.insert("dry_run".into(), json!(true));
        out.insert("round_trips".into(), json!(round_trips));
        out.insert("target".into(), json!(target.display()));
        out.insert("live".into(), json!(current));
        out.insert("unchanged".into(), json!(no_release));
        output::counts_json(&changes.counts, &mut out);
        out.insert(
            "bytes".into(),
            json!({"transfer": transfer_bytes, "matched": matched_bytes}),
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
            outln!("{out}");
        }
    } else if let (true, Some(live)) = (no_release, current) {
        note!(
            "flip: dry run against {}: unchanged, release {live} stays live (no release is made unless the deploy finds it altered, or with --force-release)",
            target.display(),
        );
    } else {
        output::print_items(&changes.items);
        note!(
            "flip: dry run against {} (live: {}): {}; {} to transfer before delta and compression",
            target.display(),
            current.map_or("none".to_string(), |c| format!("release {c}")),
            output::counts_text(&changes.counts),
            output::bytes(transfer_bytes)
        );
    }
    Ok(out)
}

/// The target's status for a dry run: what is live, or nothing for a target a deploy would
/// make (refused, as the deploy would refuse it, when it is a file, a directory that is not a
/// target, or its parent is missing without `--mkpath`: the agent checks, one round trip).
fn dry_run_status(
    s: &mut flip_transfer::Session,
) -> Result<(Option<u64>, Vec<flip_wire::ReleaseSummary>)> {
    s.queue_can_deploy()?;
    s.queue_status()?;
    if !s.deployable()? {
        // Not a target yet: its status fails, and a deploy would send everything.
        return Ok(match s.status_answer() {
            Ok(st) => st,
            Err(flip_transfer::TransferError::Remote {
                class: flip_wire::ErrorClass::Target,
                ..
            }) => (None, Vec::new()),
            Err(e) => return Err(e.into()),
        });
    }
    Ok(s.status_answer()?)
}

/// A file to transfer, as [`flip_plan::report::Changes::transfers`] lists it: its index, size
/// and delta basis (path, size).
type ToTransfer<'a> = (u32, u64, Option<&'a (flip_manifest::RelPath, u64)>);

/// How each file to transfer would go: patches are made here as the deploy would make them
/// (this client has both versions); a delta needs the target's signature, so it is predicted by
/// the rule alone.
fn predicted_sends(
    transfers: &[ToTransfer<'_>],
    previous: Option<&flip_manifest::Manifest>,
    content: Option<&flip_transfer::ContentCache>,
    paths: &[&flip_manifest::RelPath],
    o: &Options,
    whole_files: bool,
) -> Vec<flip_plan::report::Sent> {
    transfers
        .par_iter()
        .map(|&(index, size, basis)| {
            use flip_plan::report::Via;
            let old = basis.and_then(|(b, _)| match previous?.get(b)? {
                flip_manifest::EntryKind::File { digest, .. } => Some(*digest),
                _ => None,
            });
            let cached = flip_transfer::in_cache(content, old.as_ref());
            let chosen = flip_transfer::send_policy(size, basis.map(|b| b.1), cached, whole_files);
            let via = match (chosen, content, old) {
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
        .collect()
}

/// `o` with environment `env`'s hooks: `rollback ENV` and `activate ENV` run its
/// `after_activate` hooks on the targets that moved.
fn with_hooks(o: Options, env: &config::Resolved) -> Options {
    Options {
        hooks: flip_deploy::Hooks {
            before_activate: Vec::new(),
            after_activate: env.after_activate.0 .0.clone(),
            rollback_on_failure: false,
            env: Some(env.env.clone()),
        },
        ..o
    }
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
        // Where a rollback or an activation records what is live now (see
        // `flip_deploy::record_live`).
        cache_dir: cache_dir(),
        compress_level: Some(0),
        whole_file: None,
        shared: Default::default(),
        writable_owner: None,
        wait: common.wait,
        force_release: false,
        parallel: 0,
        mkpath: false,
        ssh: ssh_settings(common),
        hooks: Default::default(),
    }
}

/// Opens a session and takes the lock for `what`.
fn locked_session(target: &Target, common: &Common, what: Purpose) -> Result<Session> {
    Ok(flip_deploy::locked_session(
        target,
        &command_options(common),
        what,
        &mut lock_note(target),
    )?)
}

/// What a command waiting for `target`'s lock says about its holder.
fn lock_note(target: &Target) -> impl FnMut(&str) {
    let peer = target.display();
    move |h| {
        note!(
            "flip: {peer} is locked by {}; waiting",
            output::printable(h)
        )
    }
}

/// Opens a session and sends, in one batch, the lock for `what`, `then` (a request queued by
/// the closure) and `Bye`; returns once the lock's answer is read.
fn locked_batch(
    target: &Target,
    common: &Common,
    what: Purpose,
    then: impl FnOnce(&mut Session) -> flip_transfer::Result<()>,
) -> Result<Session> {
    let mut s = flip_deploy::lock_queued(target, &command_options(common), what)?;
    then(&mut s)?;
    s.queue_bye()?;
    s.locked(&mut lock_note(target))?;
    Ok(s)
}

/// Prints what the agent could not remove and its warnings (stderr, in every mode) and returns
/// them for `--json`: leftovers as `{"path", "error"}` objects.
fn notices(s: &mut Session) -> (Vec<serde_json::Value>, Vec<String>) {
    let warnings = s.take_warnings();
    for w in &warnings {
        note!("flip: warning: {}", output::printable(w));
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

/// A target of `releases`, `prune` or `verify` failed with `e`: named alone on the command
/// line, its error is the command's; in an environment it is named with its error on stderr,
/// recorded in `hosts` (the JSON's rows, where the command has them), and the command exits 10.
fn target_failed(
    env: bool,
    target: &Target,
    e: anyhow::Error,
    code: &mut Code,
    hosts: Option<&mut Vec<serde_json::Value>>,
) -> Result<()> {
    if !env {
        return Err(e);
    }
    render::host_error(&target.display(), &error_text(&e), "");
    *code = exit::PARTIAL;
    if let Some(hosts) = hosts {
        hosts.push(render::failed_host(&target.display(), &e));
    }
    Ok(())
}

fn releases(a: cli::ReleasesArgs, cfg: Option<&Config>) -> Result<Code> {
    let (env, targets) = targets_of(cfg, &a.target)?;
    let ssh = ssh_only(&a.ssh);
    let mut lists = Vec::new();
    let mut lives = Vec::new();
    // An environment's table shows the targets that answered; each other one is named with
    // its error (exit 10).
    let mut listed = Vec::new();
    let mut failed = Vec::new();
    let mut code = exit::OK;
    for target in &targets {
        let status = (|| -> Result<_> {
            let mut s = target.connect(&ssh, 0)?;
            let (live, list) = s.status()?;
            notices(&mut s);
            s.close()?;
            Ok((live, list))
        })();
        match status {
            Ok((live, list)) => {
                lists.push(list);
                lives.push(live);
                listed.push(target.clone());
            }
            Err(e) => target_failed(env.is_some(), target, e, &mut code, Some(&mut failed))?,
        }
    }
    if let Some(env) = env {
        render::release_table(&env.env, &listed, &lists, &lives, &failed, a.json);
        return Ok(code);
    }
    let (target, list) = (&targets[0], &lists[0]);
    // The live release left out of the listing (its metadata damaged or gone: the warning
    // above says which) still gets its row, marked live, with what is unknown left out.
    let unlisted_live = render::unlisted_live(list, lives[0]);
    // Rows by id: a listed release, or the unlisted live one (`None`).
    let mut rows: Vec<(u64, Option<&flip_wire::ReleaseSummary>)> =
        list.iter().map(|r| (r.id, Some(r))).collect();
    rows.extend(unlisted_live.map(|id| (id, None)));
    rows.sort_by_key(|(id, _)| *id);
    if a.json {
        let arr: Vec<_> = rows
            .iter()
            .map(|(id, r)| match r {
                Some(r) => json!({
                    "id": r.id, "label": r.label, "created": output::iso_time(r.created),
                    "files": r.files, "bytes": r.bytes, "current": r.current, "damaged": false,
                }),
                None => json!({
                    "id": id, "label": null, "created": null, "files": null, "bytes": null,
                    "current": true, "damaged": true,
                }),
            })
            .collect();
        outln!("{}", serde_json::Value::Array(arr));
    } else if rows.is_empty() {
        note!("flip: {} has no releases", target.display());
    } else {
        outln!(
            "{:>6}  {:<7}  {:<20}  {:>8}  {:>10}  LABEL",
            "ID",
            "CURRENT",
            "CREATED",
            "FILES",
            "BYTES"
        );
        for (id, r) in rows {
            match r {
                Some(r) => outln!(
                    "{:>6}  {:<7}  {:<20}  {:>8}  {:>10}  {}",
                    r.id,
                    if r.current { "*" } else { "" },
                    output::iso_time(r.created),
                    r.files,
                    output::bytes(r.bytes),
                    output::escape(r.label.as_deref().unwrap_or(""))
                ),
                None => outln!(
                    "{:>6}  {:<7}  {:<20}  {:>8}  {:>10}  (not listed: its directory or metadata is missing or damaged)",
                    id,
                    "*",
                    "?",
                    "?",
                    "?"
                ),
            }
        }
    }
    Ok(exit::OK)
}

/// The answer of `rollback` and `activate` on one target: `current` moved from `previous` to
/// `id` (a rollback to a newer release is called an activation), or `id` was live already
/// (both commands alike: exit 0, nothing changed). JSON: `{"target", "release", "previous",
/// "changed"}`.
/// `round_trips`: with the agent, beyond opening the connection.
fn switched(
    target: &Target,
    json: bool,
    verb: &str,
    id: u64,
    previous: Option<u64>,
    round_trips: u64,
) {
    let changed = previous != Some(id);
    if json {
        outln!(
            "{}",
            json!({"target": target.display(), "release": id, "previous": previous, "changed": changed, "round_trips": round_trips})
        );
    } else if !changed {
        note!(
            "flip: release {id} of {} is already live; nothing changed",
            target.display()
        );
    } else {
        let verb = match previous {
            Some(p) if verb == "rolled back" && id > p => "activated",
            _ => verb,
        };
        let was = previous.map(|p| format!(" (was {p})")).unwrap_or_default();
        note!(
            "flip: {verb} {}: current -> releases/{id}{was}",
            target.display()
        );
    }
}

/// Reads the status queued after a rollback or an activation to release `id` and records its
/// manifest as live on `target` in this client's caches (see `flip_deploy::record_live`).
fn record_live(s: &mut Session, target: &Target, id: u64) -> Result<()> {
    let (current, releases) = s.status_answer()?;
    let live = releases.iter().find(|r| r.id == id && current == Some(id));
    if let (Some(dir), Some(r)) = (cache_dir(), live) {
        flip_deploy::record_live(&dir, target, &r.manifest_digest);
    }
    Ok(())
}

fn rollback(a: cli::RollbackArgs, cfg: Option<&Config>) -> Result<Code> {
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
            &with_hooks(command_options(&a.common), &env),
            &SwitchPlan::Rollback,
            a.force,
            Purpose::Rollback,
            &progress::Progress::lines(&targets),
        );
        return Ok(render::switch(&env.env, "rolled back", out, a.common.json));
    }
    let target = &targets[0];
    // Lock, rollback, status and bye in one round trip (a refused lock: the rest is not done).
    let mut s = locked_batch(target, &a.common, Purpose::Rollback, |s| {
        s.queue_rollback(a.to, a.force)?;
        s.queue_status()
    })?;
    let r = s.rolled_back();
    // Also on failure: "nothing to roll back to" must say which releases were skipped and why.
    notices(&mut s);
    let (id, previous) = r?;
    record_live(&mut s, target, id)?;
    let round_trips = s.round_trips();
    s.closed()?;
    switched(
        target,
        a.common.json,
        "rolled back",
        id,
        previous,
        round_trips,
    );
    Ok(exit::OK)
}

fn activate(a: cli::ActivateArgs, cfg: Option<&Config>) -> Result<Code> {
    let (env, targets) = targets_of(cfg, &a.target)?;
    let id = a.id.parse::<u64>();
    if let Some(env) = env {
        let plan = match id {
            Ok(id) => SwitchPlan::Id(id),
            Err(_) => SwitchPlan::Label(a.id.clone()),
        };
        let out = flip_deploy::switch(
            &targets,
            &with_hooks(command_options(&a.common), &env),
            &plan,
            a.force,
            Purpose::Activate,
            &progress::Progress::lines(&targets),
        );
        return Ok(render::switch(&env.env, "activated", out, a.common.json));
    }
    let Ok(id) = id else {
        return Err(exit::coded(
            exit::USAGE,
            format!(
                "{:?} is no release id: one target's releases are activated by number (`flip releases {}` lists them); a label names releases across an environment of flip.toml (`flip activate ENV LABEL`)",
                a.id,
                targets[0].display()
            ),
        ));
    };
    let target = &targets[0];
    // Lock, activate, status and bye in one round trip (a refused lock: the rest is not done).
    let mut s = locked_batch(target, &a.common, Purpose::Activate, |s| {
        s.queue_activate(id, a.force)?;
        s.queue_status()
    })?;
    let r = s.activated();
    notices(&mut s);
    let previous = r?;
    record_live(&mut s, target, id)?;
    let round_trips = s.round_trips();
    s.closed()?;
    switched(
        target,
        a.common.json,
        "activated",
        id,
        previous,
        round_trips,
    );
    Ok(exit::OK)
}

fn prune(a: cli::PruneArgs, cfg: Option<&Config>) -> Result<Code> {
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
                    note!("flip: nothing to prune in {}", target.display());
                } else {
                    note!(
                        "flip: pruned {}: removed releases {:?}",
                        target.display(),
                        removed
                    );
                }
            }
            Ok(json!({
                "target": target.display(), "pruned": removed,
                "leftovers": leftovers, "warnings": warnings,
            }))
        })();
        match r {
            Ok(v) => hosts.push(v),
            Err(e) => target_failed(env.is_some(), target, e, &mut code, Some(&mut hosts))?,
        }
    }
    if a.common.json {
        match env {
            Some(_) => outln!("{}", json!({"hosts": hosts})),
            None => outln!("{}", hosts[0]),
        }
    }
    Ok(code)
}

fn verify(a: cli::VerifyArgs, cfg: Option<&Config>) -> Result<Code> {
    let (env, targets) = targets_of(cfg, &a.target)?;
    if env.is_some() && a.id.is_some() {
        // Release N of one target is not release N of another.
        return Err(exit::coded(
            exit::USAGE,
            "release ids differ between targets: for an environment, `flip verify ENV` checks each target's live release",
        ));
    }
    let ssh = ssh_only(&a.ssh);
    let mut hosts = Vec::new();
    let mut code = exit::OK;
    for target in &targets {
        let r = (|| -> Result<(u64, Vec<String>, Vec<String>)> {
            let mut s = target.connect(&ssh, 0)?;
            let (id, problems) = s.verify(a.id)?;
            // Among them: the paths written by hooks, which are not differences.
            let warnings = s.take_warnings();
            s.close().context("closing the session")?;
            Ok((id, problems, warnings))
        })();
        match r {
            Ok((id, problems, warnings)) => {
                for w in &warnings {
                    note!(
                        "flip: {}: warning: {}",
                        target.display(),
                        output::printable(w)
                    );
                }
                if !a.json {
                    if problems.is_empty() {
                        note!(
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
                hosts.push(json!({"target": target.display(), "release": id, "ok": problems.is_empty(), "problems": problems, "warnings": warnings}));
            }
            Err(e) => target_failed(env.is_some(), target, e, &mut code, Some(&mut hosts))?,
        }
    }
    if a.json {
        match env {
            Some(_) => outln!("{}", json!({"hosts": hosts})),
            None => outln!("{}", hosts[0]),
        }
    }
    Ok(code)
}

fn show_config(a: cli::ConfigArgs, cfg: Option<&Config>) -> Result<Code> {
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
    match a.json {
        true => config_json(c, &r, source.as_ref()),
        false => config_text(c, &r, source.as_ref()),
    }
    Ok(exit::OK)
}

/// `flip config ENV --json`: the resolved settings, and where each came from.
fn config_json(c: &Config, r: &config::Resolved, source: Option<&(String, &'static str)>) {
    outln!(
        "{}",
        json!({
            "config": c.path.display().to_string(),
            "env": r.env,
            "targets": r.targets,
            "source": source.map(|s| &s.0),
            "exclude": r.exclude.0,
            "keep": r.keep.0,
            "parallel": r.parallel.0,
            "compress_level": r.compress_level.0,
            "whole_file": r.whole_file.0,
            "shared_dirs": r.shared_dirs.0,
            "shared_files": r.shared_files.0,
            "writable_dirs": r.writable_dirs.0,
            "writable_mode": r.writable_mode.0,
            "writable_owner": r.writable_owner.0,
            "before_activate": r.before_activate.0.0.iter().map(config_hooks::show).collect::<Vec<_>>(),
            "after_activate": r.after_activate.0.0.iter().map(config_hooks::show).collect::<Vec<_>>(),
            "rollback_on_failure": r.rollback_on_failure.0,
            "from": {
                "source": source.map(|s| s.1),
                "exclude": r.exclude.1, "keep": r.keep.1, "parallel": r.parallel.1,
                "compress_level": r.compress_level.1,
                "whole_file": r.whole_file.1,
                "shared_dirs": r.shared_dirs.1, "shared_files": r.shared_files.1,
                "writable_dirs": r.writable_dirs.1, "writable_mode": r.writable_mode.1,
                "writable_owner": r.writable_owner.1,
                "before_activate": r.before_activate.1, "after_activate": r.after_activate.1,
                "rollback_on_failure": r.rollback_on_failure.1,
            },
        })
    );
}

/// `v` as TOML writes it, a string quoted and escaped, a list inline: `flip config`'s lines
/// read back as flip.toml (Rust's `{:?}` escapes, `\u{1b}`, are no TOML).
fn toml_value(v: impl Into<toml::Value>) -> String {
    v.into().to_string()
}

/// `flip config ENV` as flip.toml lines, each commented with where it came from.
fn config_text(c: &Config, r: &config::Resolved, source: Option<&(String, &'static str)>) {
    outln!("# {} [env.{}]", c.path.display(), r.env);
    outln!("targets = {}", toml_value(r.targets.clone()));
    match source {
        Some((s, from)) => outln!("source = {}  # {from}", toml_value(s.as_str())),
        None => outln!("# source: not set"),
    }
    outln!(
        "exclude = {}  # {}",
        toml_value(r.exclude.0.clone()),
        r.exclude.1
    );
    outln!("keep = {}  # {}", r.keep.0, r.keep.1);
    outln!(
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
        Some(l) => outln!("compress_level = {l}  # {}", r.compress_level.1),
        None => {
            outln!(
                "# compress_level: default (adaptive over SSH, levels {}-{}; off locally)",
                flip_wire::adapt::MIN_LEVEL,
                flip_wire::adapt::MAX_LEVEL
            )
        }
    }
    match r.whole_file.0 {
        Some(w) => outln!("whole_file = {w}  # {}", r.whole_file.1),
        None => outln!("# whole_file: default (yes locally, no over SSH)"),
    }
    for (key, (list, from)) in [
        ("shared_dirs", &r.shared_dirs),
        ("shared_files", &r.shared_files),
        ("writable_dirs", &r.writable_dirs),
    ] {
        outln!("{key} = {}  # {from}", toml_value(list.clone()));
    }
    outln!(
        "writable_mode = {}  # {}",
        toml_value(r.writable_mode.0.as_str()),
        r.writable_mode.1
    );
    match &r.writable_owner.0 {
        Some(o) => outln!(
            "writable_owner = {}  # {}",
            toml_value(o.as_str()),
            r.writable_owner.1
        ),
        None => outln!("# writable_owner: not set (the deploy user)"),
    }
    for (key, (list, from)) in [
        ("before_activate", &r.before_activate),
        ("after_activate", &r.after_activate),
    ] {
        let shown: Vec<String> = list.0.iter().map(config_hooks::show_toml).collect();
        outln!("{key} = [{}]  # {from}", shown.join(", "));
    }
    outln!(
        "rollback_on_failure = {}  # {}",
        r.rollback_on_failure.0,
        r.rollback_on_failure.1
    );
}
