//! Hooks: shell commands the client asks the agent to run inside a committed release
//! ([`flip_wire::Request::Hook`]), e.g. `php artisan config:cache` before the swap or a PHP-FPM
//! reload after it.
//!
//! Bounded like every request: the command and its environment are size-checked; the hook runs
//! with stdin `/dev/null` in its own process group, its output is forwarded line by line as it
//! comes (a line cut at [`HOOK_LINE_MAX`] bytes, marked; at most a few hundred lines queued
//! between the pipes and the connection, so memory does not grow with the output), and when it
//! runs past its timeout the whole group gets SIGTERM, then SIGKILL after
//! [`HOOK_KILL_GRACE_MS`].

use flip_wire::{
    FrameWriter, HookStream, Response, HOOK_ENV_MAX, HOOK_KILL_GRACE_MS, HOOK_LINE_MAX,
    HOOK_RUN_MAX,
};
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shell a hook runs in. A fuzzing build (`cargo fuzz`, `--cfg fuzzing`) runs every hook
/// with `true` instead: the fuzzer writes raw frames and must never run what it made up.
#[cfg(not(fuzzing))]
const SHELL: &str = "/bin/sh";
#[cfg(fuzzing)]
const SHELL: &str = "true";

/// The only environment variables a client may set for a hook.
const CLIENT_ENV: [&str; 2] = ["FLIP_TARGET", "FLIP_ENV"];

/// Longest timeout a client may ask for: a day.
const TIMEOUT_MAX_MS: u64 = 24 * 3600 * 1000;

/// After the hook's shell exited, how long its output pipes may stay open (a background
/// process it started holds them) before the agent stops reading them.
const DRAIN: Duration = Duration::from_secs(2);

/// Until when the agent waits for the client's next request whatever its idle timeout (the
/// client's other targets may still run hooks): see [`wait_at_least`].
static WAIT_UNTIL: Mutex<Option<Instant>> = Mutex::new(None);

/// The agent waits for the next request for at least `d` from now, even beyond its idle
/// timeout.
pub(crate) fn wait_at_least(d: Duration) {
    let until = Instant::now() + d;
    let mut w = WAIT_UNTIL.lock().unwrap_or_else(|e| e.into_inner());
    if w.is_none_or(|u| u < until) {
        *w = Some(until);
    }
}

/// The idle timeout `idle`, extended to what [`wait_at_least`] asked for.
pub(crate) fn idle_wait(idle: Duration) -> Duration {
    let w = WAIT_UNTIL.lock().unwrap_or_else(|e| e.into_inner());
    match *w {
        Some(until) => idle.max(until.saturating_duration_since(Instant::now())),
        None => idle,
    }
}

/// A hook request that passed the checks.
pub(crate) struct Hook {
    /// The shell command.
    pub(crate) run: String,
    /// Longest the hook may run.
    pub(crate) timeout: Duration,
    /// `(name, value)`, names from [`CLIENT_ENV`] only.
    pub(crate) env: Vec<(String, String)>,
}

impl Hook {
    /// Checks what the client sent: a non-empty command without NUL of at most
    /// [`HOOK_RUN_MAX`] bytes, a timeout of at most a day, only `FLIP_TARGET` and `FLIP_ENV`,
    /// each once, values of at most [`HOOK_ENV_MAX`] bytes without NUL.
    pub(crate) fn checked(run: String, timeout_ms: u64, env: Vec<String>) -> Result<Hook, String> {
        if run.trim().is_empty() || run.len() > HOOK_RUN_MAX || run.contains('\0') {
            return Err(format!(
                "hook command refused: empty, longer than {HOOK_RUN_MAX} bytes or containing NUL"
            ));
        }
        if timeout_ms == 0 || timeout_ms > TIMEOUT_MAX_MS {
            return Err(format!(
                "hook timeout of {timeout_ms} ms refused (1 ms to 24 h)"
            ));
        }
        let mut vars: Vec<(String, String)> = Vec::new();
        for e in env {
            let Some((name, value)) = e.split_once('=') else {
                return Err("hook environment entry without '='".into());
            };
            if !CLIENT_ENV.contains(&name) || vars.iter().any(|(n, _)| n == name) {
                return Err(format!(
                    "hook environment variable {name:.64} refused (only FLIP_TARGET and FLIP_ENV, once each)"
                ));
            }
            if value.len() > HOOK_ENV_MAX || value.contains('\0') {
                return Err(format!(
                    "hook environment variable {name}: value longer than {HOOK_ENV_MAX} bytes or containing NUL"
                ));
            }
            vars.push((name.to_string(), value.to_string()));
        }
        Ok(Hook {
            run,
            timeout: Duration::from_millis(timeout_ms),
            env: vars,
        })
    }
}

/// Runs `hook` with `/bin/sh -c` in `dir` (release `id`; `previous`: the release live before
/// the deploy), forwarding its output to the client as [`Response::HookOutput`] frames;
/// returns the [`Response::HookDone`] to answer with. `Err` only when the hook cannot be
/// started or the client cannot be written to (the hook is then killed).
pub(crate) fn run(
    hook: &Hook,
    dir: &Path,
    id: u64,
    previous: Option<u64>,
    tx: &mut FrameWriter,
) -> Result<Response, HookError> {
    let started = Instant::now();
    let mut cmd = command(hook, dir, id, previous);
    let mut child = cmd.spawn().map_err(|e| HookError::Start {
        dir: dir.display().to_string(),
        source: e,
    })?;
    let pgid = child.id() as libc::pid_t;
    // Lines from both pipes, in the order they come; bounded, so a reader waits for the
    // connection rather than the agent holding the output.
    let (lines_tx, lines) = sync_channel::<Option<(HookStream, String)>>(256);
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    spawn_reader(out, HookStream::Stdout, lines_tx.clone());
    spawn_reader(err, HookStream::Stderr, lines_tx);
    let deadline = started + hook.timeout;
    let mut timed_out = false;
    let mut kill_at: Option<Instant> = None;
    let mut open_pipes = 2;
    let mut exited: Option<(std::process::ExitStatus, Instant)> = None;
    let kill = |sig| {
        // SAFETY: a signal to the hook's own process group (its pid is the group id).
        unsafe { libc::kill(-pgid, sig) };
    };
    let result = loop {
        if exited.is_none() {
            match child.try_wait() {
                Ok(Some(st)) => exited = Some((st, Instant::now())),
                Ok(None) => {}
                Err(e) => break Err(HookError::Wait(e)),
            }
        }
        if let Some((st, at)) = exited {
            // Timed out and the shell died of the SIGTERM: what is left of its group (a
            // command that traps SIGTERM to end cleanly) has the rest of its grace, then
            // SIGKILL; once the group is gone, nothing is waited for.
            // SAFETY: signal 0 to the hook's own process group only asks whether it exists.
            if kill_at.is_some() && unsafe { libc::kill(-pgid, 0) } != 0 {
                kill_at = None;
            }
            if kill_at.is_some_and(|k| Instant::now() >= k) || flip_release::abandoned() {
                kill(libc::SIGKILL);
                kill_at = None;
            }
            if kill_at.is_none() && (open_pipes == 0 || at.elapsed() > DRAIN) {
                break Ok(st);
            }
        } else {
            let now = Instant::now();
            if !timed_out && now >= deadline {
                timed_out = true;
                kill(libc::SIGTERM);
                kill_at = Some(now + Duration::from_millis(HOOK_KILL_GRACE_MS));
            }
            if kill_at.is_some_and(|k| now >= k) {
                kill(libc::SIGKILL);
                kill_at = None;
            }
            if flip_release::abandoned() {
                kill(libc::SIGKILL);
            }
        }
        if let Err(e) = forward(&lines, &mut open_pipes, tx) {
            kill(libc::SIGKILL);
            let _ = child.wait();
            return Err(HookError::Client(e));
        }
    };
    let status = match result {
        Ok(st) => st,
        Err(e) => {
            kill(libc::SIGKILL);
            let _ = child.wait();
            return Err(e);
        }
    };
    Ok(Response::HookDone {
        status: status.code(),
        signal: status.signal(),
        timed_out,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// `/bin/sh -c RUN` in `dir`, stdin `/dev/null`, output piped, in a process group of its own,
/// with the `FLIP_*` environment (the client's `FLIP_TARGET` and `FLIP_ENV` over empty ones).
fn command(hook: &Hook, dir: &Path, id: u64, previous: Option<u64>) -> std::process::Command {
    let mut cmd = std::process::Command::new(SHELL);
    cmd.arg("-c")
        .arg(&hook.run)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env("FLIP_RELEASE", id.to_string())
        .env("FLIP_RELEASE_DIR", dir)
        .env(
            "FLIP_PREVIOUS",
            previous.map(|p| p.to_string()).unwrap_or_default(),
        )
        .env("FLIP_TARGET", "")
        .env("FLIP_ENV", "")
        .process_group(0);
    for (n, v) in &hook.env {
        cmd.env(n, v);
    }
    cmd
}

/// Sends the hook's lines that are there (waiting a little for the first), at most 256, in
/// one flush; counts the pipes that closed.
fn forward(
    lines: &Receiver<Option<(HookStream, String)>>,
    open_pipes: &mut usize,
    tx: &mut FrameWriter,
) -> Result<(), flip_wire::WireError> {
    let mut got = next_line(lines, *open_pipes);
    let mut sent = 0;
    // What is already there goes in one flush (a few hundred lines at most).
    while let Some(msg) = got {
        match msg {
            Some((stream, line)) => {
                tx.send(&Response::HookOutput { stream, line })?;
                sent += 1;
            }
            None => *open_pipes -= 1,
        }
        got = match sent < 256 {
            true => lines.try_recv().ok(),
            false => None,
        };
    }
    if sent > 0 {
        tx.flush()?;
    }
    Ok(())
}

/// The next message of the readers, waiting a little: `Some(None)` when a pipe closed, `None`
/// when nothing came (or every pipe is closed already).
fn next_line(
    lines: &Receiver<Option<(HookStream, String)>>,
    open_pipes: usize,
) -> Option<Option<(HookStream, String)>> {
    if open_pipes == 0 {
        std::thread::sleep(Duration::from_millis(20));
        return None;
    }
    match lines.recv_timeout(Duration::from_millis(50)) {
        Ok(m) => Some(m),
        Err(RecvTimeoutError::Timeout) => None,
        Err(RecvTimeoutError::Disconnected) => {
            std::thread::sleep(Duration::from_millis(20));
            None
        }
    }
}

/// Reads `pipe` line by line into `to` (each line at most [`HOOK_LINE_MAX`] bytes, a longer one
/// cut and marked; invalid UTF-8 replaced), then `None` at its end.
fn spawn_reader(
    mut pipe: impl Read + Send + 'static,
    stream: HookStream,
    to: SyncSender<Option<(HookStream, String)>>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut line: Vec<u8> = Vec::new();
        let mut cut = false;
        let emit = |line: &mut Vec<u8>, cut: bool| {
            let mut s = String::from_utf8_lossy(line).into_owned();
            if cut {
                s.push_str(&format!(" [line cut at {HOOK_LINE_MAX} bytes]"));
            }
            line.clear();
            to.send(Some((stream, s))).is_ok()
        };
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            for &b in &buf[..n] {
                if b == b'\n' {
                    if !emit(&mut line, cut) {
                        return;
                    }
                    cut = false;
                } else if line.len() < HOOK_LINE_MAX {
                    line.push(b);
                } else {
                    cut = true;
                }
            }
        }
        if (!line.is_empty() || cut) && !emit(&mut line, cut) {
            return;
        }
        let _ = to.send(None);
    });
}

/// Why a hook could not be run to its end.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HookError {
    /// The shell could not be spawned in the release directory `dir`.
    #[error("cannot start the hook (/bin/sh) in {dir}: {source}")]
    Start {
        /// The release directory the hook was to run in.
        dir: String,
        /// Why spawning failed.
        source: std::io::Error,
    },
    /// Waiting for the hook's shell failed.
    #[error("waiting for the hook failed: {0}")]
    Wait(std::io::Error),
    /// Forwarding the hook's output to the client failed.
    #[error("the client stopped reading the hook's output: {0}")]
    Client(flip_wire::WireError),
}
