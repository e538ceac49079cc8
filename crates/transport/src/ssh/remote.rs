//! Finding, uploading and starting the agent on the server.
//!
//! One exec runs a small `sh -c` launcher. It looks for a flip of exactly our version: first an
//! uploaded agent of exactly the binary we would upload (`~/.cache/flip/flip-VERSION-BLAKE3`,
//! keyed by content hash so two builds of one version never run each other's agent), then `flip`
//! on the PATH. It prints a marker line and `exec`s it as the agent in the same channel, so the
//! usual case costs a single exec. If none is found it prints the server's `uname -sm` and which
//! decompressors it has instead, and exits.
//!
//! The client does not wait for the marker: its first requests follow the `exec` at once (see
//! [`launching`]), and the marker is read before the agent's first answer. With OpenSSH's
//! `sshd`, whose `exec` reply is not waited for either (`session::pipelines_exec`), they reach
//! the agent as it starts: the launch costs the channel's opening round trip alone. When the
//! launcher found no agent, those requests are sent again to the uploaded one.
//!
//! Then flip picks the binary to upload ([`choose_agent`]): `--agent-binary FILE`, else the
//! per-platform binary in the local cache (`~/.cache/flip/agents/flip-VERSION-OS-ARCH`, from
//! `uname -s` and `uname -m` of the server), else, if the server's platform is ours, the
//! agent-only `flip-agent` beside this executable ([`agent_beside`]; a fraction of the size),
//! else this executable. Every candidate is keyed by its own content hash on the server, so an
//! agent-only build and a whole flip of one version never take each other's name; either
//! serves. It is sent compressed (zstd if the server has `zstd`, else gzip), decompressed to a
//! temp name, checked (size, `--version`, blake3), renamed into place (the server keeps the
//! [`KEEP_AGENTS`] agents used last), and the launcher runs again.

use super::{open, shell_quote, Remote, SshOptions, SshTarget};
use crate::{AgentStream, TransportError};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// The marker the launcher prints before anything else it prints.
const MARKER: &str = "flip-launch: ";

/// Most bytes of noise (e.g. from shell startup files) tolerated before the marker.
const MAX_NOISE: usize = 64 * 1024;

/// Agents kept in the server's `~/.cache/flip` (by last use; the launcher touches the one it
/// runs): the oldest go when one more is uploaded.
const KEEP_AGENTS: usize = 3;

/// Exit status of the upload script when the uploaded binary does not run on the server (or
/// is not flip of our version).
const DOES_NOT_RUN: i32 = 3;

/// Connects and starts the agent (see the module docs).
pub(crate) fn start_agent(
    target: &SshTarget,
    opts: &SshOptions,
    agent_args: &[String],
    stderr: Box<dyn Write + Send>,
) -> Result<AgentStream, TransportError> {
    let args: Vec<String> = agent_args.iter().map(|a| shell_quote(a)).collect();
    let args = args.join(" ");
    let sink = SharedSink(Arc::new(Mutex::new(stderr)));

    if let Some(flip) = &opts.remote_flip {
        let remote = open(target, opts)?;
        let host = remote.host().to_string();
        let what = format!("`{flip} agent`");
        // No preamble: the launcher runs only an agent of this very version, but a flip named
        // by --remote-flip may be older than `--preamble` (its own error would then hide the
        // version check of the handshake).
        let stream = remote.stream(
            &format!("{flip} agent {args}"),
            &what,
            Box::new(sink),
            false,
        )?;
        return Ok(first_byte_within(stream, host));
    }

    let candidates = candidates(opts)?;
    let hashes: Vec<&str> = candidates
        .iter()
        .filter_map(|c| c.hash.as_deref())
        .collect();
    let launcher = sh_c(&launcher_script(&opts.version, &hashes, &args));
    let what = "the flip agent";
    let remote = open(target, opts)?;
    let host = remote.host().to_string();
    let stream = remote.stream(&launcher, what, Box::new(sink.clone()), true)?;
    let (target, opts) = (target.clone(), opts.clone());
    let relaunch_host = host.clone();
    let relaunch: Relaunch = Box::new(move |missing: Missing| {
        let host = relaunch_host;
        let agent = choose_agent(&opts, &host, &missing.platform, candidates)?;
        glibc_check(&opts, &host, &missing, &agent)?;
        let mut remote = open(&target, &opts)?;
        let uploaded = upload(&mut *remote, &opts, &agent, &missing, &mut sink.clone())?;
        // Now exactly the uploaded agent.
        let launcher = sh_c(&launcher_script(&opts.version, &[&uploaded], &args));
        // No preamble: what is sent again may hold what the first stream's seal kept off the
        // command line; an upload's round trip more does not matter.
        let stream = remote.stream(&launcher, what, Box::new(sink), false)?;
        match read_marker(stream, &host)? {
            Launch::Started(stream) => Ok(stream),
            Launch::Missing(_) => Err(TransportError::Remote {
                host,
                phase: "starting the agent".to_string(),
                message: format!(
                    "flip {} was uploaded to ~/.cache/flip but the launcher still does not find it",
                    opts.version
                ),
            }),
        }
    });
    Ok(launching(stream, host, relaunch))
}

/// Uploads an agent for a server that has none (what its launcher said) and starts it.
type Relaunch = Box<dyn FnOnce(Missing) -> Result<AgentStream, TransportError> + Send>;

/// Bytes the client may write before the launcher's marker was read; past them the marker is
/// read first. They are kept to be sent again to an agent uploaded because none was found.
const KEPT_BEFORE_MARKER: usize = 16 << 20;

/// The agent's stream with the launcher's marker not read yet: the client's first requests
/// follow the launch at once instead of a round trip later (with a server that runs the
/// command before reading on, see `session::pipelines_exec`, they reach the agent as it
/// starts). The marker is read before the first byte of the agent's output is. When the
/// launcher found no agent, what the client wrote (kept, at most [`KEPT_BEFORE_MARKER`]
/// bytes) went to the launcher, which did not read it: an agent is uploaded and started
/// (`relaunch`) and gets those bytes again. A failure to start the agent reaches the client as
/// the error of its read (or of the write that has to read the marker first), carrying the
/// [`TransportError`] itself. The two halves may be used from two threads: the writer half
/// writes without holding the lock, so the reader can read the marker meanwhile.
fn launching(stream: AgentStream, host: String, relaunch: Relaunch) -> AgentStream {
    let peer = stream.peer.clone();
    let seal = stream.seal.clone();
    let round_trip = stream.round_trip;
    let shared = Arc::new(LaunchShared {
        host,
        state: Mutex::new(LaunchState::Pending(Box::new(Pending {
            reader: Some(stream.reader),
            writer: Some(stream.writer),
            handle: Some(stream.handle),
            peer: stream.peer,
            kept: Vec::new(),
            relaunch: Some(relaunch),
            closed: false,
        }))),
        writer_back: std::sync::Condvar::new(),
        input_closed: Arc::default(),
    });
    AgentStream {
        seal,
        round_trip,
        reader: Box::new(LaunchReader {
            shared: shared.clone(),
            inner: None,
        }),
        writer: Box::new(LaunchWriter {
            shared: shared.clone(),
            inner: None,
        }),
        handle: Box::new(LaunchFinish(shared)),
        peer,
    }
}

struct LaunchShared {
    host: String,
    state: Mutex<LaunchState>,
    /// Signalled when the writer half puts the pending writer back after a write, and when
    /// the marker's reading is settled (the agent started or failed to).
    writer_back: std::sync::Condvar,
    /// The writer half was dropped (read by a replay that ends after it started).
    input_closed: Arc<std::sync::atomic::AtomicBool>,
}

/// The stream while the marker is not read.
struct Pending {
    /// Taken while the marker is read (under the lock).
    reader: Option<Box<dyn Read + Send>>,
    /// `None` while the writer half writes through it (without the lock).
    writer: Option<Box<dyn Write + Send>>,
    handle: Option<Box<dyn crate::Finish>>,
    peer: String,
    /// Everything written so far, for an agent uploaded after all.
    kept: Vec<u8>,
    relaunch: Option<Relaunch>,
    /// The client dropped its writer: end of its input, after the kept bytes.
    closed: bool,
}

enum LaunchState {
    Pending(Box<Pending>),
    /// The agent runs: each half takes its part (if still here) once. `writer` is `None` when
    /// the writer half had the agent's writer in hand when the marker was read (it keeps it).
    Started {
        reader: Option<Box<dyn Read + Send>>,
        writer: Option<Box<dyn Write + Send>>,
        handle: Option<Box<dyn crate::Finish>>,
        /// An uploaded agent getting the kept bytes again, on a thread of its own (the reader
        /// may have to read its answers meanwhile): it yields the agent's writer when done.
        replay: Option<Replay>,
    },
    /// The agent could not be started (the first read, or the write that read the marker, had
    /// the error).
    Failed(String),
}

type Guard<'a> = std::sync::MutexGuard<'a, LaunchState>;

type Replay = std::thread::JoinHandle<io::Result<Option<Box<dyn Write + Send>>>>;

impl LaunchShared {
    fn state(&self) -> Guard<'_> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the marker if not yet done (`state`: this lock, held), relaunching when no agent
    /// was found. The error of a failure is returned once (as an `io::Error` carrying the
    /// [`TransportError`]); later calls get its message.
    fn confirm<'a>(&'a self, mut state: Guard<'a>) -> io::Result<Guard<'a>> {
        // The other half read the marker (no agent) and waits for this one's writer to
        // relaunch: it is here, so wake that half and wait for the launch to be settled.
        while matches!(&*state, LaunchState::Pending(p) if p.reader.is_none()) {
            self.writer_back.notify_all();
            state = self
                .writer_back
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        let p = match &mut *state {
            LaunchState::Pending(p) => p,
            LaunchState::Started { .. } => return Ok(state),
            LaunchState::Failed(m) => return Err(io::Error::other(m.clone())),
        };
        let (Some(reader), Some(handle)) = (p.reader.take(), p.handle.take()) else {
            unreachable!("the marker is read once, under the lock")
        };
        let stream = AgentStream {
            seal: crate::no_seal(),
            round_trip: None,
            reader,
            // The agent's writer stays with the writer half meanwhile.
            writer: Box::new(io::sink()),
            handle,
            peer: p.peer.clone(),
        };
        let started = match read_marker(stream, &self.host) {
            Ok(Launch::Started(s)) => {
                let writer = p.writer.take();
                Ok((s.reader, writer, s.handle, None))
            }
            Ok(Launch::Missing(missing)) => {
                // What was written went to the launcher, which did not read it: its writer
                // (once the writer half is done with it) is dropped, the kept bytes go to the
                // uploaded agent.
                loop {
                    match &mut *state {
                        LaunchState::Pending(p) if p.writer.is_none() && !p.closed => {
                            state = self
                                .writer_back
                                .wait(state)
                                .unwrap_or_else(|e| e.into_inner());
                        }
                        _ => break,
                    }
                }
                let LaunchState::Pending(p) = &mut *state else {
                    // Finished meanwhile by another thread (`LaunchFinish`).
                    return Err(io::Error::other(
                        "the stream to the agent was finished while the agent was being started",
                    ));
                };
                drop(p.writer.take());
                let relaunch = p.relaunch.take().expect("relaunched once");
                let (kept, closed) = (std::mem::take(&mut p.kept), p.closed);
                let input_closed = self.input_closed.clone();
                relaunch(missing).and_then(|s| {
                    let mut writer = s.writer;
                    let replay = std::thread::Builder::new()
                        .name("flip-replay".into())
                        .spawn(move || {
                            writer.write_all(&kept)?;
                            // End of input at once if the client's writer is gone.
                            let gone = closed || input_closed.load(Ordering::SeqCst);
                            Ok((!gone).then_some(writer))
                        })
                        .map_err(|e| TransportError::Other(format!("spawning a thread: {e}")))?;
                    Ok((s.reader, None, s.handle, Some(replay)))
                })
            }
            Err(e) => Err(e),
        };
        // Settled: a half waiting for it goes on.
        self.writer_back.notify_all();
        match started {
            Ok((reader, writer, handle, replay)) => {
                *state = LaunchState::Started {
                    reader: Some(reader),
                    writer,
                    handle: Some(handle),
                    replay,
                };
                Ok(state)
            }
            Err(e) => {
                *state = LaunchState::Failed(e.to_string());
                Err(io::Error::other(e))
            }
        }
    }
}

/// The agent's writer once its replay (if any) is done.
fn replayed(replay: Replay) -> io::Result<Option<Box<dyn Write + Send>>> {
    replay
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the replay thread panicked")))
}

struct LaunchReader {
    shared: Arc<LaunchShared>,
    inner: Option<Box<dyn Read + Send>>,
}

impl Read for LaunchReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.inner.is_none() {
            let mut state = self.shared.confirm(self.shared.state())?;
            if let LaunchState::Started { reader, .. } = &mut *state {
                self.inner = reader.take();
            }
        }
        match &mut self.inner {
            Some(r) => r.read(buf),
            None => Err(io::Error::other("the agent's output was already taken")),
        }
    }
}

struct LaunchWriter {
    shared: Arc<LaunchShared>,
    inner: Option<Box<dyn Write + Send>>,
}

impl LaunchWriter {
    /// Writes `buf` before the marker is read: kept, and sent through the pending writer
    /// without the lock. `false` when it must be confirmed first (too much kept).
    fn write_pending(&mut self, buf: &[u8]) -> bool {
        let mut w = {
            let mut state = self.shared.state();
            let LaunchState::Pending(p) = &mut *state else {
                return false;
            };
            // Too much kept, or the other half found no agent and relaunches (not to the
            // launcher, which ended).
            if p.kept.len() + buf.len() > KEPT_BEFORE_MARKER || p.reader.is_none() {
                return false;
            }
            p.kept.extend_from_slice(buf);
            p.writer.take().expect("one writer half")
        };
        // Unsent bytes (a launcher that ended without reading) go to the uploaded agent; a
        // broken connection is what the first read reports.
        let _ = w.write_all(buf);
        let mut state = self.shared.state();
        match &mut *state {
            LaunchState::Pending(p) => {
                p.writer = Some(w);
                self.shared.writer_back.notify_all();
            }
            // The agent it reached runs: this is its writer.
            LaunchState::Started {
                writer: None,
                replay: None,
                ..
            } => self.inner = Some(w),
            // Relaunched (the reader waited for this writer), or failed.
            _ => drop(w),
        }
        true
    }
}

impl Write for LaunchWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.inner.is_none() {
            if self.write_pending(buf) {
                return Ok(buf.len());
            }
            let mut state = self.shared.confirm(self.shared.state())?;
            if let LaunchState::Started { writer, replay, .. } = &mut *state {
                self.inner = writer.take();
                if let Some(r) = replay.take() {
                    drop(state);
                    self.inner = replayed(r)?;
                }
            }
        }
        match &mut self.inner {
            Some(w) => w.write(buf),
            None => Err(io::Error::other("the agent's input was already taken")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Some(w) => w.flush(),
            // Written through at once while pending.
            None => Ok(()),
        }
    }
}

impl Drop for LaunchWriter {
    /// End of input, as the stream's own writer gives when dropped.
    fn drop(&mut self) {
        if self.inner.is_some() {
            return;
        }
        match &mut *self.shared.state() {
            LaunchState::Pending(p) => {
                p.closed = true;
                drop(p.writer.take());
                self.shared.writer_back.notify_all();
            }
            LaunchState::Started { writer, replay, .. } => {
                drop(writer.take());
                // A replay still writing ends the input itself; one done holds the writer.
                self.shared.input_closed.store(true, Ordering::SeqCst);
                if replay.as_ref().is_some_and(|r| r.is_finished()) {
                    drop(replay.take().map(replayed));
                }
            }
            LaunchState::Failed(_) => {}
        }
    }
}

struct LaunchFinish(Arc<LaunchShared>);

impl crate::Finish for LaunchFinish {
    fn finish(self: Box<Self>) -> Result<(), TransportError> {
        let state = std::mem::replace(&mut *self.0.state(), LaunchState::Failed(String::new()));
        match state {
            // Never read from: how the launcher (or the agent it started) ended.
            LaunchState::Pending(p) => {
                let Pending {
                    reader,
                    writer,
                    handle,
                    ..
                } = *p;
                drop((reader, writer));
                handle.map_or(Ok(()), |h| h.finish())
            }
            LaunchState::Started {
                handle: Some(h),
                replay,
                writer,
                ..
            } => {
                // The whole input reaches the agent, then ends.
                if let Some(r) = replay {
                    drop(replayed(r));
                }
                drop(writer);
                h.finish()
            }
            LaunchState::Started { handle: None, .. } | LaunchState::Failed(_) => Ok(()),
        }
    }
}

/// A command any login shell (bash, dash, csh, tcsh, fish) runs as `sh` running `script`: the
/// login shell may not be POSIX, so scripts run under sh; and the command is one line holding
/// none of the characters those shells read differently inside quotes (a newline, which csh
/// refuses in quotes; `\` and `'`, which fish escapes there; `"`, `$` and `` ` ``): each is
/// carried as a control character (U+0001 to U+0006) that `tr` turns back before sh
/// evaluates the script. The script holds no control character of its own ([`check_names`]
/// keeps them out of remote paths).
///
/// [`check_names`]: super::check_names
fn sh_c(script: &str) -> String {
    const CARRIED: [(char, char); 6] = [
        ('\n', '\u{1}'),
        ('\'', '\u{2}'),
        ('"', '\u{3}'),
        ('$', '\u{4}'),
        ('`', '\u{5}'),
        ('\\', '\u{6}'),
    ];
    debug_assert!(!script.chars().any(|c| ('\u{1}'..='\u{6}').contains(&c)));
    let body: String = script
        .chars()
        .map(|c| {
            CARRIED
                .iter()
                .find(|(from, _)| *from == c)
                .map_or(c, |(_, to)| *to)
        })
        .collect();
    let inner = format!(
        r#"eval "$(printf %s '{body}' | tr '\001\002\003\004\005\006' '\n\047\042\044\140\134')""#
    );
    format!("sh -c {}", shell_quote(&inner))
}

/// Where a binary that could serve as the agent comes from (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// `--agent-binary FILE`.
    Flag,
    /// `~/.cache/flip/agents/flip-VERSION-OS-ARCH` on this machine.
    LocalCache,
    /// The agent-only `flip-agent` beside the running flip, built with it.
    Beside,
    /// The running flip itself.
    Exe,
}

/// A local binary flip may upload, and its blake3 (lowercase hex, 64 characters): the key of
/// the server-side cache `~/.cache/flip/flip-VERSION-HASH`. `None` for this executable when it
/// cannot be read (replaced by an upgrade while running): then only a `flip` on the server's
/// PATH is found, and uploading it fails naming the file.
#[derive(Debug, Clone)]
struct Candidate {
    path: PathBuf,
    hash: Option<String>,
    source: Source,
}

/// The local binaries an agent on the server may be a copy of: `--agent-binary` alone if given,
/// else the per-platform binaries of our version in the local cache, the agent-only binary
/// beside this executable (when there is one), then this executable.
fn candidates(opts: &SshOptions) -> Result<Vec<Candidate>, TransportError> {
    let memo = opts.agents_dir().with_file_name("agent-hashes");
    let hash = |path: &Path, source: Source| -> Result<Candidate, TransportError> {
        let hash = hash_file_memo(path, &memo).map_err(|e| {
            TransportError::Other(match source {
                Source::Flag => format!("--agent-binary {}: {e}", path.display()),
                _ => format!("reading {}: {e}", path.display()),
            })
        })?;
        Ok(Candidate {
            path: path.to_path_buf(),
            hash: Some(hash),
            source,
        })
    };
    if let Some(file) = &opts.agent_binary {
        return Ok(vec![hash(file, Source::Flag)?]);
    }
    let mut out = Vec::new();
    let prefix = format!("flip-{}-", opts.version);
    if let Ok(entries) = std::fs::read_dir(opts.agents_dir()) {
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix) && !n.ends_with(".tmp"))
            .collect();
        names.sort();
        for name in names {
            let path = opts.agents_dir().join(name);
            // An unreadable cache entry is only a missed candidate.
            if let Ok(c) = hash(&path, Source::LocalCache) {
                out.push(c);
            }
        }
    }
    // An agent-only binary that cannot be read is only a missed candidate too.
    if let Ok(c) = hash(&agent_beside(&opts.local_exe), Source::Beside) {
        out.push(c);
    }
    out.push(hash(&opts.local_exe, Source::Exe).unwrap_or(Candidate {
        path: opts.local_exe.clone(),
        hash: None,
        source: Source::Exe,
    }));
    Ok(out)
}

/// The agent-only binary that belongs with the flip at `exe`: beside it, named as `make dist`
/// and cargo name it: `flip` -> `flip-agent`, `flip-1.2.3-x86_64-unknown-linux-gnu` ->
/// `flip-agent-1.2.3-x86_64-unknown-linux-gnu`; `flip-agent` beside an executable of another
/// name.
pub(crate) fn agent_beside(exe: &Path) -> PathBuf {
    let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let rest = match name.strip_prefix("flip") {
        Some(rest) if rest.is_empty() || rest.starts_with('-') => rest,
        _ => "",
    };
    exe.with_file_name(format!("flip-agent{rest}"))
}

/// [`hash_file`], remembered in the directory `memo` by the file's identity (path, device,
/// inode, size, mtime, ctime): flip hashes its own binary (3 MB for `flip-agent`, 12 MB for
/// itself) on every SSH connect otherwise, which on loopback cost a first deploy about as much
/// as its launch. A memo is kept only when the file did not change while it was hashed; one
/// that cannot be read (or is not a hash) or written only costs the hashing.
fn hash_file_memo(path: &Path, memo: &Path) -> io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let stamp = |m: &std::fs::Metadata| {
        format!(
            "{}\0{}\0{}\0{}\0{}.{}\0{}.{}",
            path.display(),
            m.dev(),
            m.ino(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        )
    };
    let before = stamp(&std::fs::metadata(path)?);
    let file = memo.join(blake3::hash(before.as_bytes()).to_hex().as_str());
    if let Ok(h) = std::fs::read_to_string(&file) {
        if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Ok(h);
        }
    }
    let hash = hash_file(path)?;
    if std::fs::metadata(path).is_ok_and(|m| stamp(&m) == before) {
        // One temp file per call: connections made at once (several hosts) hash on several
        // threads of this process.
        static TEMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = TEMP.fetch_add(1, Ordering::Relaxed);
        let tmp = memo.join(format!(".tmp-{}-{n}", std::process::id()));
        let _ = std::fs::create_dir_all(memo)
            .and_then(|()| std::fs::write(&tmp, &hash))
            .and_then(|()| std::fs::rename(&tmp, &file));
        let _ = std::fs::remove_file(&tmp);
        trim_memos(memo);
    }
    Ok(hash)
}

/// Memos of binaries kept at most (each rebuild of flip writes one): the oldest go.
const KEEP_MEMOS: usize = 16;

/// Removes all but the [`KEEP_MEMOS`] newest memos of `memo`.
fn trim_memos(memo: &Path) {
    let Ok(dir) = std::fs::read_dir(memo) else {
        return;
    };
    let mut memos: Vec<(std::time::SystemTime, PathBuf)> = dir
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if memos.len() <= KEEP_MEMOS {
        return;
    }
    memos.sort();
    for (_, p) in &memos[..memos.len() - KEEP_MEMOS] {
        let _ = std::fs::remove_file(p);
    }
}

/// blake3 of a file's contents, lowercase hex.
fn hash_file(path: &Path) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap(path)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// `Linux x86_64` -> `Linux-x86_64`: the platform part of a local cache file name.
pub(crate) fn platform_file_part(platform: &str) -> String {
    platform
        .split_whitespace()
        .collect::<Vec<_>>()
        .join("-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The binary to upload to a server of `platform` (`uname -sm`): `--agent-binary`, else the
/// local cache's binary for that platform (put there on purpose), else, if the platform is
/// ours, the agent-only binary beside this executable, else this executable.
fn choose_agent(
    opts: &SshOptions,
    host: &str,
    platform: &str,
    candidates: Vec<Candidate>,
) -> Result<Candidate, TransportError> {
    let cached = opts.agent_cache_file(platform);
    let (mut beside, mut exe) = (None, None);
    for c in candidates {
        match c.source {
            Source::Flag => return Ok(c),
            Source::LocalCache if c.path == cached => return Ok(c),
            Source::LocalCache => {}
            Source::Beside => beside = Some(c),
            Source::Exe => exe = Some(c),
        }
    }
    let local = local_platform();
    match beside.or(exe) {
        Some(c) if platform == local => Ok(c),
        _ => Err(TransportError::Platform {
            host: host.to_string(),
            local,
            remote: platform.to_string(),
            version: opts.version.clone(),
            cache: cached,
        }),
    }
}

/// The script that finds this version's agent on the server and starts it with
/// `quoted_args`, after printing the `ok` marker; or reports what the server has for an upload
/// (`missing`). Run by [`sh_c`]: the `--preamble=BASE64` words after the command (the pump's,
/// see `pump::Parts::deferred`) are `$0` and `$@` there, passed on to the agent.
fn launcher_script(version: &str, hashes: &[&str], quoted_args: &str) -> String {
    let cached: Vec<String> = hashes
        .iter()
        .map(|h| format!("\"$HOME/.cache/flip/flip-$v-{}\"", shell_quote(h)))
        .collect();
    format!(
        r#"v={version}
case $0 in --preamble=*) set -- "$0" "$@";; esac
for f in {cached} "$(command -v flip 2>/dev/null)"; do
  if [ -n "$f" ] && [ -x "$f" ] && [ "$("$f" --version </dev/null 2>/dev/null)" = "flip $v" ]; then
    case $f in "$HOME/.cache/flip/"*) touch "$f" 2>/dev/null;; esac
    printf '{MARKER}ok %s\n' "$f"
    exec "$f" agent {quoted_args} "$@"
  fi
done
t=
for x in zstd gzip b3sum; do command -v $x >/dev/null 2>&1 && t="$t $x"; done
printf '{MARKER}missing %s|%s|%s\n' "$(uname -sm)" "$t" "$(getconf GNU_LIBC_VERSION 2>/dev/null)"
"#,
        version = shell_quote(version),
        cached = cached.join(" "),
    )
}

/// What the launcher reported when it found no flip.
struct Missing {
    /// `uname -sm` on the server.
    platform: String,
    /// `zstd` is installed there.
    zstd: bool,
    /// `gzip` is installed there.
    gzip: bool,
    /// `b3sum` is installed there.
    b3sum: bool,
    /// The server's glibc version, if it has glibc (`getconf GNU_LIBC_VERSION`).
    glibc: Option<(u32, u32)>,
}

enum Launch {
    Started(AgentStream),
    Missing(Missing),
}

/// How long the server's login may take to run the launcher: beyond it, the login is taken
/// for hung (a shell startup file waiting for input, a command in it that never returns) and
/// the connection is dropped. In a debug build (the tests'), `FLIP_LAUNCH_TIMEOUT_MS`
/// overrides it.
pub(crate) const LAUNCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn launch_timeout() -> std::time::Duration {
    let test = cfg!(debug_assertions)
        .then(|| std::env::var("FLIP_LAUNCH_TIMEOUT_MS").ok()?.parse().ok())
        .flatten();
    test.map(std::time::Duration::from_millis)
        .unwrap_or(LAUNCH_TIMEOUT)
}

/// Calls an [`Aborter`](crate::Aborter) once `after` has passed, unless stopped first.
struct Deadline {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Set (before the abort) once the time ran out.
    fired: Arc<std::sync::atomic::AtomicBool>,
}

impl Deadline {
    fn start(after: std::time::Duration, abort: crate::Aborter) -> Deadline {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fire = fired.clone();
        let thread = std::thread::Builder::new()
            .name("flip-launch-deadline".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(after)
                {
                    fire.store(true, std::sync::atomic::Ordering::SeqCst);
                    abort();
                }
            })
            .ok();
        Deadline {
            stop,
            thread,
            fired,
        }
    }

    /// Stops the clock; whether it had run out.
    fn stop(self) -> bool {
        let _ = self.stop.send(());
        if let Some(t) = self.thread {
            let _ = t.join();
        }
        self.fired.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Reads the launcher's marker line, within [`LAUNCH_TIMEOUT`]. On `ok`, returns the stream
/// positioned just after it.
fn read_marker(stream: AgentStream, host: &str) -> Result<Launch, TransportError> {
    let within = launch_timeout();
    let deadline = stream
        .handle
        .aborter()
        .map(|abort| Deadline::start(within, abort));
    let read = read_marker_now(stream, host);
    if deadline.is_some_and(Deadline::stop) {
        return Err(login_too_slow(host, within));
    }
    read
}

/// The login did not start flip within `within`: the connection was dropped.
fn login_too_slow(host: &str, within: std::time::Duration) -> TransportError {
    TransportError::Remote {
        host: host.to_string(),
        phase: "starting the agent".to_string(),
        message: format!(
            "the login did not start flip within {} s (a shell startup file waiting for input, or a command in it that never returns?); the connection was dropped",
            within.as_secs_f64()
        ),
    }
}

/// `--remote-flip`: no launcher, no marker; the agent's first byte (its `Welcome`) must come
/// within [`LAUNCH_TIMEOUT`] of the `exec`, else the connection is dropped and whatever read or
/// write meets the dropped connection fails with [`login_too_slow`].
fn first_byte_within(mut stream: AgentStream, host: String) -> AgentStream {
    let within = launch_timeout();
    let Some(abort) = stream.handle.aborter() else {
        return stream;
    };
    let deadline = Deadline::start(within, abort);
    let late = Late {
        fired: deadline.fired.clone(),
        host,
        within,
    };
    stream.writer = Box::new(LateWriter {
        inner: stream.writer,
        late: late.clone(),
    });
    stream.reader = Box::new(FirstByte {
        inner: stream.reader,
        deadline: Some(deadline),
        late,
    });
    stream
}

/// Whether a [`Deadline`] ran out: then an I/O error (or the end of the agent's output) is
/// [`login_too_slow`].
#[derive(Clone)]
struct Late {
    fired: Arc<std::sync::atomic::AtomicBool>,
    host: String,
    within: std::time::Duration,
}

impl Late {
    fn error(&self) -> Option<io::Error> {
        self.fired
            .load(std::sync::atomic::Ordering::SeqCst)
            .then(|| io::Error::other(login_too_slow(&self.host, self.within)))
    }
}

/// A reader whose first read must end before its [`Deadline`] runs out.
struct FirstByte {
    inner: Box<dyn Read + Send>,
    deadline: Option<Deadline>,
    late: Late,
}

impl Read for FirstByte {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf);
        if let Some(d) = self.deadline.take() {
            d.stop();
        }
        match read {
            Ok(0) | Err(_) if !buf.is_empty() => match self.late.error() {
                Some(e) => Err(e),
                None => read,
            },
            read => read,
        }
    }
}

/// The writer of a stream with a [`Deadline`] for its first answer.
struct LateWriter {
    inner: Box<dyn Write + Send>,
    late: Late,
}

impl Write for LateWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner
            .write(buf)
            .map_err(|e| self.late.error().unwrap_or(e))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner
            .flush()
            .map_err(|e| self.late.error().unwrap_or(e))
    }
}

fn read_marker_now(mut stream: AgentStream, host: &str) -> Result<Launch, TransportError> {
    let mut reader = BufReader::with_capacity(64 * 1024, stream.reader);
    let mut noise = Vec::new();
    let mut line = Vec::new();
    let marker = loop {
        line.clear();
        // Bounded: output without a newline (a progress bar's `\r`, a server sending bytes
        // for ever) is noise like any other, not a line to keep reading.
        let room = (MAX_NOISE - noise.len().min(MAX_NOISE) + MARKER.len() + 4096) as u64;
        let n = match (&mut reader).take(room).read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(e) => {
                return Err(TransportError::Remote {
                    host: host.to_string(),
                    phase: "starting the agent".to_string(),
                    message: e.to_string(),
                })
            }
        };
        if n == 0 {
            // The launcher ended without a marker: report how it ended.
            drop(stream.writer);
            stream.handle.finish()?;
            return Err(TransportError::Remote {
                host: host.to_string(),
                phase: "starting the agent".to_string(),
                message: format!(
                    "the launcher script printed no marker{}",
                    if noise.is_empty() {
                        String::new()
                    } else {
                        format!("; its output: {}", String::from_utf8_lossy(&noise).trim())
                    }
                ),
            });
        }
        if let Some(rest) = line.strip_prefix(MARKER.as_bytes()) {
            break String::from_utf8_lossy(rest).trim().to_string();
        }
        noise.extend_from_slice(&line);
        if noise.len() > MAX_NOISE || (line.len() as u64 == room && !line.ends_with(b"\n")) {
            return Err(TransportError::Remote {
                host: host.to_string(),
                phase: "starting the agent".to_string(),
                message: "the remote shell printed too much output before starting flip \
                          (a shell startup file printing to stdout?)"
                    .to_string(),
            });
        }
    };
    if marker.starts_with("ok") {
        let leftover = reader.buffer().to_vec();
        let inner = reader.into_inner();
        stream.reader = Box::new(io::Cursor::new(leftover).chain(inner));
        return Ok(Launch::Started(stream));
    }
    let info = marker.strip_prefix("missing ").unwrap_or("");
    let mut fields = info.split('|');
    let platform = fields.next().unwrap_or("");
    let tools = fields.next().unwrap_or("");
    let glibc = fields.next().and_then(|g| g.trim().strip_prefix("glibc "));
    drop(stream.writer);
    drop(reader);
    stream.handle.finish()?;
    let has = |tool: &str| tools.split_whitespace().any(|t| t == tool);
    Ok(Launch::Missing(Missing {
        platform: platform.trim().to_string(),
        zstd: has("zstd"),
        gzip: has("gzip"),
        b3sum: has("b3sum"),
        glibc: glibc.and_then(parse_version),
    }))
}

/// The local platform in `uname -sm` form, e.g. `Linux x86_64`.
pub(crate) fn local_platform() -> String {
    if let Ok(out) = std::process::Command::new("uname").arg("-sm").output() {
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !s.is_empty() {
            return s;
        }
    }
    let os = match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "freebsd" => "FreeBSD",
        other => other,
    };
    let arch = match (std::env::consts::OS, std::env::consts::ARCH) {
        ("macos", "aarch64") => "arm64",
        (_, arch) => arch,
    };
    format!("{os} {arch}")
}

/// `2.31` -> (2, 31).
fn parse_version(s: &str) -> Option<(u32, u32)> {
    let mut parts = s.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().unwrap_or("0").parse().ok()?;
    Some((major, minor))
}

/// Refuses, before uploading anything, to upload this flip (or the agent-only binary built
/// with it) to a server whose glibc is older than the one it needs (see
/// [`SshOptions::needs_glibc`]): it would not start there.
fn glibc_check(
    opts: &SshOptions,
    host: &str,
    server: &Missing,
    agent: &Candidate,
) -> Result<(), TransportError> {
    if !matches!(agent.source, Source::Exe | Source::Beside) {
        return Ok(());
    }
    let (Some(have), Some(need)) = (
        server.glibc,
        opts.needs_glibc.as_deref().and_then(parse_version),
    ) else {
        return Ok(());
    };
    if have >= need {
        return Ok(());
    }
    let said = format!(
        "it needs glibc {}.{} or newer and the server has glibc {}.{} (nothing was uploaded)",
        need.0, need.1, have.0, have.1
    );
    Err(TransportError::Remote {
        host: host.to_string(),
        phase: "uploading flip".to_string(),
        message: does_not_run(opts, host, &server.platform, agent, &said),
    })
}

/// How the agent travels: the server decompresses it with `zstd -dc` or `gzip -dc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Zstd,
    Gzip,
    Raw,
}

impl Codec {
    /// The best the server can decompress.
    fn for_server(missing: &Missing) -> Codec {
        if missing.zstd {
            Codec::Zstd
        } else if missing.gzip {
            Codec::Gzip
        } else {
            Codec::Raw
        }
    }

    fn name(self) -> &'static str {
        match self {
            Codec::Zstd => "zstd",
            Codec::Gzip => "gzip",
            Codec::Raw => "uncompressed",
        }
    }

    /// The server-side command that writes the decompressed stdin to stdout.
    fn decoder(self) -> &'static str {
        match self {
            Codec::Zstd => "zstd -dcq",
            Codec::Gzip => "gzip -dc",
            Codec::Raw => "cat",
        }
    }

    /// Compresses `data` for the wire; checksummed frames, so the decoder also checks transit.
    /// Release-sized binaries get the strongest levels (a one-off cost, cached by
    /// [`wire_bytes`]); bigger ones (debug builds) fast levels.
    fn encode(self, data: &[u8]) -> io::Result<Vec<u8>> {
        let small = data.len() <= STRONG_LIMIT;
        match self {
            Codec::Zstd => {
                let level = if small { ZSTD_LEVEL } else { 3 };
                let mut enc = zstd::Encoder::new(Vec::new(), level)?;
                enc.include_checksum(true)?;
                enc.set_pledged_src_size(Some(data.len() as u64))?;
                enc.write_all(data)?;
                enc.finish()
            }
            Codec::Gzip => {
                let level = if small {
                    flate2::Compression::best()
                } else {
                    flate2::Compression::fast()
                };
                let mut enc = flate2::write::GzEncoder::new(Vec::new(), level);
                enc.write_all(data)?;
                enc.finish()
            }
            Codec::Raw => Ok(data.to_vec()),
        }
    }

    /// File name suffix in the local wire cache.
    fn suffix(self) -> &'static str {
        match self {
            Codec::Zstd => "zst",
            Codec::Gzip => "gz",
            Codec::Raw => "raw",
        }
    }
}

/// Binaries up to this size (release builds are ~10 MB) are compressed hard and the result kept
/// in the local cache; bigger ones (debug builds) quickly and not kept.
const STRONG_LIMIT: usize = 32 << 20;

/// Compressed forms kept in `AGENTS_DIR/.wire/` (oldest removed first).
const WIRE_CACHE_ENTRIES: usize = 4;

/// `data` (whose blake3 is `hash`) compressed with `codec`: from the local cache
/// `AGENTS_DIR/.wire/HASH.SUFFIX` when there (and it decompresses to exactly `data`), else
/// compressed now and, for release-sized binaries, kept there. Failing to use the cache only
/// costs time.
fn wire_bytes(opts: &SshOptions, data: &[u8], hash: &str, codec: Codec) -> io::Result<Vec<u8>> {
    if codec == Codec::Raw || data.len() > STRONG_LIMIT {
        return codec.encode(data);
    }
    let dir = opts.agents_dir().join(".wire");
    let file = dir.join(format!("{hash}.{}", codec.suffix()));
    if let Ok(cached) = std::fs::read(&file) {
        if decodes_to(codec, &cached, data) {
            return Ok(cached);
        }
    }
    let wire = codec.encode(data)?;
    let _ = store_wire(&dir, &file, &wire);
    Ok(wire)
}

/// Whether `wire` decompresses to exactly `data` (a damaged cache entry is not sent).
fn decodes_to(codec: Codec, wire: &[u8], data: &[u8]) -> bool {
    let mut out = Vec::with_capacity(data.len());
    let ok = match codec {
        Codec::Zstd => zstd::Decoder::new(wire)
            .and_then(|d| d.take(data.len() as u64 + 1).read_to_end(&mut out))
            .is_ok(),
        Codec::Gzip => flate2::read::GzDecoder::new(wire)
            .take(data.len() as u64 + 1)
            .read_to_end(&mut out)
            .is_ok(),
        Codec::Raw => {
            out.extend_from_slice(wire);
            true
        }
    };
    ok && out == data
}

/// Writes `file` (temp + rename) and keeps at most [`WIRE_CACHE_ENTRIES`] files in `dir`.
fn store_wire(dir: &Path, file: &Path, wire: &[u8]) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp.{}", std::process::id()));
    std::fs::write(&tmp, wire)?;
    std::fs::rename(&tmp, file)?;
    // The others, oldest first; the one just written stays.
    let mut others: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| {
            let e = e.ok()?;
            Some((e.metadata().ok()?.modified().ok()?, e.path()))
        })
        .filter(|(_, p)| p != file)
        .collect();
    others.sort();
    let excess = (others.len() + 1).saturating_sub(WIRE_CACHE_ENTRIES);
    for (_, old) in others.into_iter().take(excess) {
        let _ = std::fs::remove_file(old);
    }
    Ok(())
}

/// zstd level for the agent upload: a one-off cost on first contact, so high, short of the
/// `--ultra` levels whose window a small server may not have the memory to decode.
const ZSTD_LEVEL: i32 = 19;

/// Uploads `agent` to `~/.cache/flip/flip-VERSION-HASH` on the server in one exec; returns
/// the HASH.
fn upload(
    remote: &mut dyn Remote,
    opts: &SshOptions,
    agent: &Candidate,
    server: &Missing,
    notes: &mut dyn Write,
) -> Result<String, TransportError> {
    let host = remote.host().to_string();
    let fail = |message: String| TransportError::Remote {
        host: host.clone(),
        phase: "uploading flip".to_string(),
        message,
    };
    let path = &agent.path;
    let bytes =
        std::fs::read(path).map_err(|e| fail(format!("reading {}: {e}", path.display())))?;
    // The file may have changed since it was hashed: the name on the server must match.
    let hash = blake3::hash(&bytes).to_hex().to_string();
    if agent.hash.as_ref().is_some_and(|h| *h != hash) {
        return Err(fail(format!(
            "{} changed while flip was connecting; run flip again",
            path.display()
        )));
    }
    let codec = Codec::for_server(server);
    let wire = wire_bytes(opts, &bytes, &hash, codec)
        .map_err(|e| fail(format!("compressing {}: {e}", path.display())))?;
    if !opts.quiet {
        let _ = writeln!(
            notes,
            "flip: {host} has no flip {}: uploading {} ({} bytes, {} bytes {} on the wire)",
            opts.version,
            path.display(),
            bytes.len(),
            wire.len(),
            codec.name()
        );
    }
    let script = upload_script(&opts.version, bytes.len(), &hash, codec, server.b3sum);
    let out = remote.run(&sh_c(&script), Some(&mut wire.as_slice()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status == Some(0) && stdout.contains("flip-upload: ok") {
        return Ok(hash);
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if out.status == Some(DOES_NOT_RUN) {
        return Err(fail(does_not_run(
            opts,
            &host,
            &server.platform,
            agent,
            &stderr,
        )));
    }
    Err(fail(format!(
        "{} ({})",
        if stderr.is_empty() {
            "the upload script failed"
        } else {
            &stderr
        },
        match out.status {
            Some(code) => format!("exit status {code}"),
            None => "killed".to_string(),
        }
    )))
}

/// The message for an uploaded binary that does not run on the server: what it said, and what
/// to do instead.
fn does_not_run(
    opts: &SshOptions,
    host: &str,
    platform: &str,
    agent: &Candidate,
    said: &str,
) -> String {
    let cache = opts.agent_cache_file(platform);
    let what = match agent.source {
        Source::Flag => format!("--agent-binary {}", agent.path.display()),
        Source::LocalCache => format!("{} (from the local agent cache)", agent.path.display()),
        Source::Exe | Source::Beside if opts.portable.is_some() => built_with(agent, ""),
        Source::Exe | Source::Beside => built_with(
            agent,
            " is not a portable build (a debug build or one linked against this machine's \
             libraries) and",
        ),
    };
    format!(
        "{what} does not run on {host}: {said}. Install flip {version} on the server (on its \
         PATH, or pass --remote-flip PATH), or pass --agent-binary FILE with a portable flip \
         {version} for `{platform}` (`make dist` writes \
         dist/flip-agent-{version}-TARGET, the agent-only build; keep it as {cache} and flip \
         uploads it by itself)",
        version = opts.version,
        cache = cache.display(),
    )
}

/// `this flip (PATH)` or `the agent-only build beside this flip (PATH)`, then `said`.
fn built_with(agent: &Candidate, said: &str) -> String {
    match agent.source {
        Source::Beside => format!(
            "the agent-only build beside this flip ({}){said}",
            agent.path.display()
        ),
        _ => format!("this flip ({}){said}", agent.path.display()),
    }
}

fn upload_script(version: &str, size: usize, hash: &str, codec: Codec, b3sum: bool) -> String {
    // With b3sum the upload is checked before it first runs; without, it hashes itself once
    // it has shown that it runs (the size, and SSH's own integrity checks, came first).
    let check = |cmd: &str| {
        format!(
            "got=$({cmd})\n[ \"$got\" = \"$h\" ] || {{ echo \"blake3 mismatch after upload: $got, expected $h\" >&2; exit 2; }}\n"
        )
    };
    let (hash_first, hash_after) = if b3sum {
        (check(r#"b3sum "$t" | cut -d' ' -f1"#), String::new())
    } else {
        (
            String::new(),
            check(r#""$t" blake3 "$t" </dev/null | cut -d' ' -f1"#),
        )
    };
    format!(
        r#"set -e
v={version}
h={hash}
d="$HOME/.cache/flip"
t="$d/.flip-$v-$h.$$.tmp"
a="$d/flip-$v-$h"
mkdir -p -m 700 "$d"
trap 'rm -f "$t"' EXIT
# A new file only (never through a name someone left there).
rm -f "$t"
set -C
{decoder} > "$t"
set +C
n=$(wc -c < "$t" | tr -d ' ')
[ "$n" = "{size}" ] || {{ echo "size mismatch after upload: $n bytes, expected {size}" >&2; exit 2; }}
{hash_first}chmod 755 "$t"
out=$("$t" --version </dev/null 2>&1) || {{ echo "$out" >&2; exit {DOES_NOT_RUN}; }}
[ "$out" = "flip $v" ] || {{ echo "it says '$out', expected 'flip $v'" >&2; exit {DOES_NOT_RUN}; }}
{hash_after}if [ -d "$a" ] && [ ! -L "$a" ]; then echo "$a is a directory, not flip" >&2; exit 2; fi
mv -f "$t" "$a"
trap - EXIT
# Keep the {KEEP_AGENTS} agents used last (never failing the upload over one it cannot remove);
# temp files of uploads killed long ago go too.
k=0
for f in $(ls -t "$d"); do
  case $f in flip-*) k=$((k+1)); [ $k -le {KEEP_AGENTS} ] || rm -f "$d/$f" 2>/dev/null || true;; esac
done
find "$d" -name '.flip-*.tmp' -mmin +60 -exec rm -f {{}} + 2>/dev/null || true
echo "flip-upload: ok"
"#,
        version = shell_quote(version),
        hash = shell_quote(hash),
        decoder = codec.decoder(),
    )
}

/// One stderr sink shared by the streams opened while starting the agent.
#[derive(Clone)]
struct SharedSink(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SharedSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    /// A writer that is slow to take each write (as one blocked on a full channel would be),
    /// keeping what it took.
    struct SlowSink(Arc<Mutex<Vec<u8>>>, std::time::Duration);

    impl Write for SlowSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            std::thread::sleep(self.1);
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Done;

    impl crate::Finish for Done {
        fn finish(self: Box<Self>) -> Result<(), TransportError> {
            Ok(())
        }
    }

    fn fake_stream(output: &[u8], writer: SlowSink) -> AgentStream {
        AgentStream {
            round_trip: None,
            reader: Box::new(io::Cursor::new(output.to_vec())),
            writer: Box::new(writer),
            handle: Box::new(Done),
            peer: "test".to_string(),
            seal: crate::no_seal(),
        }
    }

    /// The reader half learns that no agent was found while a writer on another thread keeps
    /// writing, past what is kept for the relaunch: the writer waits for the relaunch instead
    /// of reading the marker a second time, and the uploaded agent gets every byte, in order.
    #[test]
    fn a_writer_thread_past_the_kept_bytes_waits_for_the_relaunch() {
        let launcher_got = Arc::new(Mutex::new(Vec::new()));
        let agent_got = Arc::new(Mutex::new(Vec::new()));
        let stream = fake_stream(
            format!("{MARKER}missing Linux x86_64|gzip\n").as_bytes(),
            SlowSink(launcher_got.clone(), std::time::Duration::from_millis(2)),
        );
        let agent = agent_got.clone();
        let relaunch: Relaunch =
            Box::new(move |_| Ok(fake_stream(b"", SlowSink(agent, std::time::Duration::ZERO))));
        let AgentStream {
            mut reader,
            mut writer,
            handle,
            ..
        } = launching(stream, "host".to_string(), relaunch);
        let data: Vec<u8> = (0..(KEPT_BEFORE_MARKER + (4 << 20)))
            .map(|i| (i % 251) as u8)
            .collect();
        let data = Arc::new(data);
        let to_send = data.clone();
        let writing = std::thread::spawn(move || {
            for chunk in to_send.chunks(256 * 1024) {
                writer.write_all(chunk).unwrap();
            }
        });
        // Let the writer be in the middle of its writes when the marker is read.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(reader.read(&mut [0u8; 16]).unwrap(), 0);
        writing.join().expect("the writer half panicked");
        handle.finish().unwrap();
        assert!(
            *agent_got.lock().unwrap() == *data,
            "the agent got other bytes"
        );
    }

    /// A login that writes without a newline before the launcher's marker (a progress bar's
    /// `\r`, a server sending bytes for ever) is refused once it passes the noise bound; the
    /// client no longer keeps reading one endless line into memory.
    #[test]
    fn output_without_a_newline_before_the_marker_is_bounded() {
        let endless = io::repeat(b'#');
        let stream = AgentStream {
            round_trip: None,
            reader: Box::new(endless),
            writer: Box::new(io::sink()),
            handle: Box::new(Done),
            peer: "test".to_string(),
            seal: crate::no_seal(),
        };
        match read_marker(stream, "web1") {
            Err(TransportError::Remote { message, .. }) => {
                assert!(message.contains("printed too much output"), "{message}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a stream of noise started an agent"),
        }
        // Noise that ends without a newline, then the end: said as it is.
        let stream = fake_stream(
            b"Welcome to web1",
            SlowSink(Arc::default(), Default::default()),
        );
        match read_marker(stream, "web1") {
            Err(TransportError::Remote { message, .. }) => assert!(
                message.contains("printed no marker; its output: Welcome to web1"),
                "{message}"
            ),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("noise started an agent"),
        }
    }

    /// The launcher and upload scripts run as sh scripts whatever the login shell: the same
    /// output under bash, dash, csh, tcsh and fish (those installed; tests/run.sh installs
    /// them) as the script run by sh directly, with every character a shell treats specially
    /// in it. (A multi-line `sh -c '...'` failed under csh and tcsh: "Unmatched '".)
    #[test]
    fn a_script_runs_as_sh_under_every_login_shell() {
        let script = "set -e\nv='1.0 \"x\"'\nk=0\nfor f in a b c; do\n  case $f in a|b) k=$((k+1)); [ ! $k -le 1 ] || echo \"$f it's `echo tick` {} *\";; esac\ndone\nprintf '%s\\n' \"$v\" 'back\\slash' \"back\\\\slash2\" \"#!~^&|<>;\"\ntrap 'echo trapped' EXIT\necho \"${HOME:+home}\"\n";
        let want = Command::new("sh").arg("-c").arg(script).output().unwrap();
        assert!(want.status.success());
        let command = sh_c(script);
        assert!(!command.contains('\n'), "{command}");
        each_login_shell(|shell| {
            let got = Command::new(shell)
                .arg("-c")
                .arg(&command)
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&got.stdout),
                String::from_utf8_lossy(&want.stdout),
                "{shell}: {}",
                String::from_utf8_lossy(&got.stderr)
            );
            assert!(got.status.success(), "{shell}");
        });
    }

    /// Runs `check` with each login shell installed here (tests/run.sh installs them all): at
    /// least two.
    fn each_login_shell(mut check: impl FnMut(&str)) {
        let mut tried = Vec::new();
        for shell in ["sh", "bash", "dash", "csh", "tcsh", "fish"] {
            if Command::new(shell).arg("-c").arg("true").output().is_err() {
                continue;
            }
            tried.push(shell);
            check(shell);
        }
        eprintln!("login shells tried: {tried:?}");
        assert!(tried.len() >= 2, "{tried:?}");
    }

    /// A home whose `~/.cache/flip` holds fake agents of version 1.2.3: `(hash, name)` each,
    /// a `flip-1.2.3-HASH` that prints `name:ARGS` (see [`fake_flip`]).
    fn home_with_agents(builds: &[(&str, &str)]) -> tempfile::TempDir {
        let home = tempfile::tempdir().unwrap();
        let cache = home.path().join(".cache/flip");
        std::fs::create_dir_all(&cache).unwrap();
        for (hash, name) in builds {
            fake_flip(&cache.join(format!("flip-1.2.3-{hash}")), "1.2.3", name);
        }
        home
    }

    /// The launcher hands the `--preamble=BASE64` words after the command (the pump's, as many
    /// as it sends) to the agent, under every login shell; without them the agent gets none.
    #[test]
    fn the_launcher_passes_the_preamble_on_under_every_login_shell() {
        let home = home_with_agents(&[("aaaa", "agent-a")]);
        let first: Vec<u8> = (0..super::super::PREAMBLE_MAX)
            .map(|i| (i * 7) as u8)
            .collect();
        // As the pump writes them: the most it sends, in words of PREAMBLE_WORD bytes.
        let word = super::super::preamble_words(&first).join(" ");
        let command = sh_c(&launcher_script("1.2.3", &["aaaa"], "--root '/srv/a b'"));
        each_login_shell(|shell| {
            let run = |line: &str| {
                Command::new(shell)
                    .arg("-c")
                    .arg(line)
                    .env("HOME", home.path())
                    .env("PATH", "/usr/bin:/bin")
                    .output()
                    .unwrap()
            };
            let with = run(&format!("{command} {word}"));
            let with = String::from_utf8_lossy(&with.stdout);
            assert!(
                with.ends_with(&format!("agent-a:agent --root /srv/a b {word}\n")),
                "{shell}: {with}"
            );
            let without = run(&command);
            let without = String::from_utf8_lossy(&without.stdout);
            assert!(
                without.ends_with("agent-a:agent --root /srv/a b\n"),
                "{shell}: {without}"
            );
        });
    }

    /// Connections made at once (a deploy to several hosts) hash different binaries into the
    /// same memo directory on several threads: each memo holds its own file's hash.
    #[test]
    fn binary_hashes_remembered_from_several_threads_stay_apart() {
        let t = tempfile::tempdir().unwrap();
        let memo = t.path().join("memo");
        let bins: Vec<PathBuf> = (0..6)
            .map(|i| {
                let bin = t.path().join(format!("agent-{i}"));
                std::fs::write(&bin, format!("agent {i}")).unwrap();
                bin
            })
            .collect();
        std::thread::scope(|s| {
            for bin in &bins {
                let memo = &memo;
                s.spawn(move || {
                    let real = hash_file(bin).unwrap();
                    for _ in 0..300 {
                        hash_file_memo(bin, memo).unwrap();
                        // What the next connect reads.
                        assert_eq!(
                            hash_file_memo(bin, memo).unwrap(),
                            real,
                            "{}",
                            bin.display()
                        );
                        // Forget it (this file's memo only) to write it anew.
                        for e in std::fs::read_dir(memo).unwrap().flatten() {
                            if std::fs::read_to_string(e.path()).is_ok_and(|h| h == real) {
                                let _ = std::fs::remove_file(e.path());
                            }
                        }
                    }
                });
            }
        });
        for bin in &bins {
            assert_eq!(
                hash_file_memo(bin, &memo).unwrap(),
                hash_file(bin).unwrap(),
                "{}",
                bin.display()
            );
        }
    }

    /// A binary's hash is remembered by its identity: the memo is what a second call returns,
    /// a changed file or a memo that is not a hash is hashed again.
    #[test]
    fn binary_hashes_are_remembered_until_the_file_changes() {
        let t = tempfile::tempdir().unwrap();
        let (bin, memo) = (t.path().join("flip-agent"), t.path().join("memo"));
        std::fs::write(&bin, b"agent v1").unwrap();
        let real = hash_file(&bin).unwrap();
        assert_eq!(hash_file_memo(&bin, &memo).unwrap(), real);
        let kept: Vec<_> = std::fs::read_dir(&memo).unwrap().flatten().collect();
        assert_eq!(kept.len(), 1, "one memo, no temp file left");
        let fake = "ab".repeat(32);
        std::fs::write(kept[0].path(), &fake).unwrap();
        assert_eq!(
            hash_file_memo(&bin, &memo).unwrap(),
            fake,
            "read from the memo"
        );
        std::fs::write(kept[0].path(), "not a hash").unwrap();
        assert_eq!(
            hash_file_memo(&bin, &memo).unwrap(),
            real,
            "a bad memo is ignored"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&bin, b"agent v2").unwrap();
        assert_eq!(
            hash_file_memo(&bin, &memo).unwrap(),
            hash_file(&bin).unwrap()
        );
        assert_ne!(hash_file(&bin).unwrap(), real);
        // One memo per build: no more than KEEP_MEMOS are kept.
        for i in 0..KEEP_MEMOS + 3 {
            let other = t.path().join(format!("build-{i}"));
            std::fs::write(&other, format!("build {i}")).unwrap();
            hash_file_memo(&other, &memo).unwrap();
        }
        assert_eq!(std::fs::read_dir(&memo).unwrap().count(), KEEP_MEMOS);
    }

    /// A fake flip: `--version` prints `flip VERSION`, `blake3 F` prints `$HOME/expected`,
    /// anything else prints `NAME:ARGS`.
    fn fake_flip(path: &Path, version: &str, name: &str) {
        std::fs::write(
            path,
            format!(
                "#!/bin/sh\ncase \"$1\" in --version) echo 'flip {version}';;\n\
                 blake3) cat \"$HOME/expected\";;\n*) echo \"{name}:$*\";; esac\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn launch(home: &Path, version: &str, hashes: &[&str]) -> String {
        let out = Command::new("sh")
            .arg("-c")
            .arg(launcher_script(version, hashes, "--root '/srv/a b'"))
            .env("HOME", home)
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    /// The launcher runs the cached agent named by our hash, and reports "missing" (with the
    /// platform and the decompressors there) otherwise.
    #[test]
    fn launcher_script_finds_or_reports() {
        let home = home_with_agents(&[("aaaa", "agent-a")]);
        let found = launch(home.path(), "1.2.3", &["aaaa"]);
        assert!(found.starts_with("flip-launch: ok "), "{found}");
        assert!(
            found.ends_with("agent-a:agent --root /srv/a b\n"),
            "{found}"
        );
        let missing = launch(home.path(), "9.9.9", &["aaaa"]);
        assert!(missing.starts_with("flip-launch: missing "), "{missing}");
        assert!(missing.contains(&local_platform()), "{missing}");
        assert!(missing.contains(" gzip"), "{missing}");
    }

    /// Two builds of one version: the launcher runs only the one whose content hash we name,
    /// never the other build's agent.
    #[test]
    fn two_builds_of_one_version_never_run_each_others_agent() {
        let home = home_with_agents(&[("aaaa", "agent-a"), ("bbbb", "agent-b")]);
        let cache = home.path().join(".cache/flip");
        let b = launch(home.path(), "1.2.3", &["cccc", "bbbb"]);
        assert!(b.ends_with("agent-b:agent --root /srv/a b\n"), "{b}");
        let other = launch(home.path(), "1.2.3", &["cccc"]);
        assert!(other.starts_with("flip-launch: missing "), "{other}");
        // An old unkeyed cache entry is not used either.
        fake_flip(&cache.join("flip-1.2.3"), "1.2.3", "unkeyed");
        let old = launch(home.path(), "1.2.3", &["cccc"]);
        assert!(old.starts_with("flip-launch: missing "), "{old}");
    }

    /// Runs the upload script for `body` (sent with `codec`) in `home`; `expected` is what the
    /// uploaded binary prints for its own blake3.
    fn run_upload(
        home: &Path,
        body: &[u8],
        size: usize,
        codec: Codec,
        expected: &str,
    ) -> std::process::Output {
        let hash = blake3::hash(body).to_hex().to_string();
        std::fs::write(home.join("expected"), format!("{expected}  x\n")).unwrap();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(upload_script("1.2.3", size, &hash, codec, false))
            .env("HOME", home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let wire = codec.encode(body).unwrap();
        child.stdin.take().unwrap().write_all(&wire).unwrap();
        child.wait_with_output().unwrap()
    }

    fn fake_body() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        fake_flip(&dir.path().join("f"), "1.2.3", "uploaded");
        std::fs::read(dir.path().join("f")).unwrap()
    }

    fn cache_names(home: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(home.join(".cache/flip"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// The upload is decompressed, and its size, `--version` and blake3 are checked before it
    /// is renamed to `flip-VERSION-HASH`; a failed check leaves nothing behind.
    #[test]
    fn upload_script_decompresses_and_checks_size_version_and_blake3() {
        let body = fake_body();
        let hash = blake3::hash(&body).to_hex().to_string();
        let mut codecs = vec![Codec::Gzip, Codec::Raw];
        if Command::new("zstd").arg("--version").output().is_ok() {
            codecs.push(Codec::Zstd);
        }
        for codec in codecs {
            let home = tempfile::tempdir().unwrap();
            let bad = run_upload(home.path(), &body, body.len() + 1, codec, &hash);
            assert_eq!(bad.status.code(), Some(2), "{codec:?}");
            assert!(String::from_utf8_lossy(&bad.stderr).contains("size mismatch"));
            assert!(cache_names(home.path()).is_empty(), "{codec:?}");

            let wrong = run_upload(home.path(), &body, body.len(), codec, "0123");
            assert_eq!(wrong.status.code(), Some(2), "{codec:?}");
            assert!(String::from_utf8_lossy(&wrong.stderr).contains("blake3 mismatch"));
            assert!(cache_names(home.path()).is_empty(), "{codec:?}");

            let good = run_upload(home.path(), &body, body.len(), codec, &hash);
            assert!(
                good.status.success(),
                "{codec:?}: {}",
                String::from_utf8_lossy(&good.stderr)
            );
            assert_eq!(cache_names(home.path()), vec![format!("flip-1.2.3-{hash}")]);
            let placed = home.path().join(format!(".cache/flip/flip-1.2.3-{hash}"));
            assert_eq!(std::fs::read(&placed).unwrap(), body, "{codec:?}");
            let mode = std::fs::metadata(&placed).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o755);
        }
    }

    /// An upload keeps the agents used last and removes older ones and stale temp files.
    #[test]
    fn an_upload_keeps_the_agents_used_last() {
        let home = tempfile::tempdir().unwrap();
        let cache = home.path().join(".cache/flip");
        std::fs::create_dir_all(&cache).unwrap();
        let old = |name: &str, secs: i64| {
            let p = cache.join(name);
            std::fs::write(&p, name).unwrap();
            let t = libc::timespec {
                tv_sec: 1_000_000_000 + secs,
                tv_nsec: 0,
            };
            let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
            // SAFETY: a valid path and two valid timespecs.
            unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), 0) };
        };
        for (i, name) in ["flip-1.2.3-a", "flip-1.2.3-b", "flip-1.2.3-c", "flip-1.0.0"]
            .iter()
            .enumerate()
        {
            old(name, i as i64);
        }
        old(".flip-1.2.3-x.99.tmp", 0);
        let body = fake_body();
        let hash = blake3::hash(&body).to_hex().to_string();
        let out = run_upload(home.path(), &body, body.len(), Codec::Gzip, &hash);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut want = vec![
            "flip-1.0.0".to_string(),
            format!("flip-1.2.3-{hash}"),
            "flip-1.2.3-c".to_string(),
        ];
        want.sort();
        assert_eq!(cache_names(home.path()), want);
    }

    /// A binary that does not run on the server gives the distinct exit status that turns into
    /// the "what to do" message.
    #[test]
    fn upload_script_reports_a_binary_that_does_not_run() {
        let home = tempfile::tempdir().unwrap();
        let body = b"#!/bin/sh\necho 'version GLIBC_2.99 not found' >&2\nexit 1\n";
        let out = run_upload(home.path(), body, body.len(), Codec::Gzip, "x");
        assert_eq!(out.status.code(), Some(DOES_NOT_RUN));
        assert!(String::from_utf8_lossy(&out.stderr).contains("GLIBC_2.99 not found"));
        assert!(cache_names(home.path()).is_empty());
    }

    fn opts_in(home: &Path) -> SshOptions {
        SshOptions {
            version: "1.2.3".to_string(),
            home: Some(home.to_path_buf()),
            local_exe: home.join("exe"),
            ..Default::default()
        }
    }

    /// What is uploaded: --agent-binary, else the local cache's binary for the server's
    /// platform, else this flip when the platforms match; otherwise an error saying what to do.
    #[test]
    fn the_agent_to_upload_is_chosen_by_the_servers_platform() {
        let home = tempfile::tempdir().unwrap();
        let mut opts = opts_in(home.path());
        std::fs::write(&opts.local_exe, b"exe").unwrap();
        let local = local_platform();

        let c = choose_agent(&opts, "web1", &local, candidates(&opts).unwrap()).unwrap();
        assert_eq!(c.source, Source::Exe);
        assert_eq!(c.hash, Some(blake3::hash(b"exe").to_hex().to_string()));

        let e = choose_agent(&opts, "web1", "Plan9 mips", candidates(&opts).unwrap());
        let msg = e.unwrap_err().to_string();
        assert!(msg.contains("`Plan9 mips`"), "{msg}");
        assert!(msg.contains("install flip 1.2.3 on the server"), "{msg}");
        assert!(msg.contains("--agent-binary FILE"), "{msg}");
        let cached = home.path().join(".cache/flip/agents/flip-1.2.3-Plan9-mips");
        assert!(msg.contains(&cached.display().to_string()), "{msg}");

        std::fs::create_dir_all(cached.parent().unwrap()).unwrap();
        std::fs::write(&cached, b"plan9 build").unwrap();
        let all = candidates(&opts).unwrap();
        assert_eq!(all.len(), 2);
        let c = choose_agent(&opts, "web1", "Plan9 mips", all.clone()).unwrap();
        assert_eq!((c.source, c.path), (Source::LocalCache, cached.clone()));
        // The cached binary of another platform is not uploaded to ours.
        let c = choose_agent(&opts, "web1", &local, all).unwrap();
        assert_eq!(c.source, Source::Exe);

        let flag = home.path().join("given");
        std::fs::write(&flag, b"given").unwrap();
        opts.agent_binary = Some(flag.clone());
        let c = choose_agent(&opts, "web1", "Plan9 mips", candidates(&opts).unwrap()).unwrap();
        assert_eq!((c.source, c.path), (Source::Flag, flag));
        opts.agent_binary = Some(home.path().join("absent"));
        let e = candidates(&opts).unwrap_err().to_string();
        assert!(e.contains("--agent-binary") && e.contains("absent"), "{e}");

        // An executable that cannot be read is no error until it is to be uploaded.
        opts.agent_binary = None;
        opts.local_exe = home.path().join("replaced");
        let all = candidates(&opts).unwrap();
        assert_eq!(all.last().unwrap().hash, None);
    }

    /// The agent-only `flip-agent` beside this flip is uploaded instead of this flip, to a
    /// server of our platform only; `--agent-binary` and the local cache's binary for the
    /// server's platform still come first, and without it this flip is uploaded.
    #[test]
    fn the_agent_only_build_beside_flip_is_uploaded_instead_of_flip() {
        let home = tempfile::tempdir().unwrap();
        let mut opts = opts_in(home.path());
        let dist = home.path().join("dist");
        std::fs::create_dir(&dist).unwrap();
        opts.local_exe = dist.join("flip-1.2.3-x86_64-unknown-linux-gnu");
        std::fs::write(&opts.local_exe, b"whole flip").unwrap();
        let local = local_platform();

        let c = choose_agent(&opts, "web1", &local, candidates(&opts).unwrap()).unwrap();
        assert_eq!((c.source, &c.path), (Source::Exe, &opts.local_exe));

        let beside = dist.join("flip-agent-1.2.3-x86_64-unknown-linux-gnu");
        std::fs::write(&beside, b"agent only").unwrap();
        let all = candidates(&opts).unwrap();
        let sources: Vec<Source> = all.iter().map(|c| c.source).collect();
        assert_eq!(sources, vec![Source::Beside, Source::Exe]);
        let c = choose_agent(&opts, "web1", &local, all.clone()).unwrap();
        assert_eq!((c.source, &c.path), (Source::Beside, &beside));
        assert_eq!(
            c.hash,
            Some(blake3::hash(b"agent only").to_hex().to_string())
        );
        // Both hashes are offered to the launcher: an agent uploaded by either is found.
        assert!(all.iter().all(|c| c.hash.is_some()));
        // Not to a server of another platform.
        let e = choose_agent(&opts, "web1", "Plan9 mips", all).unwrap_err();
        assert!(e.to_string().contains("`Plan9 mips`"), "{e}");

        // The local cache's binary for the server's platform comes first.
        let cached = opts.agent_cache_file(&local);
        std::fs::create_dir_all(cached.parent().unwrap()).unwrap();
        std::fs::write(&cached, b"kept on purpose").unwrap();
        let c = choose_agent(&opts, "web1", &local, candidates(&opts).unwrap()).unwrap();
        assert_eq!((c.source, c.path), (Source::LocalCache, cached.clone()));
        std::fs::remove_file(&cached).unwrap();

        // So does --agent-binary.
        opts.agent_binary = Some(opts.local_exe.clone());
        let c = choose_agent(&opts, "web1", &local, candidates(&opts).unwrap()).unwrap();
        assert_eq!(c.source, Source::Flag);
        opts.agent_binary = None;

        // Built with this flip, it needs the glibc this flip needs.
        opts.needs_glibc = Some("2.34".to_string());
        opts.portable = None;
        let agent = choose_agent(&opts, "web1", &local, candidates(&opts).unwrap()).unwrap();
        let server = Missing {
            platform: local.clone(),
            zstd: false,
            gzip: true,
            b3sum: false,
            glibc: Some((2, 31)),
        };
        let e = glibc_check(&opts, "web1", &server, &agent)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "the agent-only build beside this flip ({}) is not a portable build",
                beside.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn the_agent_only_build_is_named_after_flip() {
        let beside = |exe: &str| agent_beside(Path::new(exe));
        assert_eq!(
            beside("/usr/bin/flip"),
            PathBuf::from("/usr/bin/flip-agent")
        );
        assert_eq!(
            beside("dist/flip-1.2.3-x86_64-unknown-linux-gnu"),
            PathBuf::from("dist/flip-agent-1.2.3-x86_64-unknown-linux-gnu")
        );
        assert_eq!(beside("/opt/flipper"), PathBuf::from("/opt/flip-agent"));
        assert_eq!(beside("/opt/deploy"), PathBuf::from("/opt/flip-agent"));
    }

    #[test]
    fn compressed_agents_are_cached_locally_and_checked() {
        let home = tempfile::tempdir().unwrap();
        let opts = opts_in(home.path());
        let data = b"flip agent ".repeat(1000);
        let hash = blake3::hash(&data).to_hex().to_string();
        let wire = wire_bytes(&opts, &data, &hash, Codec::Gzip).unwrap();
        let kept = home
            .path()
            .join(format!(".cache/flip/agents/.wire/{hash}.gz"));
        assert_eq!(std::fs::read(&kept).unwrap(), wire);
        assert!(decodes_to(Codec::Gzip, &wire, &data));
        let mut damaged = wire.clone();
        let mid = damaged.len() / 2;
        damaged[mid] ^= 0xff;
        std::fs::write(&kept, &damaged).unwrap();
        let again = wire_bytes(&opts, &data, &hash, Codec::Gzip).unwrap();
        assert!(decodes_to(Codec::Gzip, &again, &data));
        assert_eq!(std::fs::read(&kept).unwrap(), again);
        // At most a few entries are kept.
        for i in 0..WIRE_CACHE_ENTRIES + 2 {
            let d = format!("other {i}").into_bytes();
            let h = blake3::hash(&d).to_hex().to_string();
            wire_bytes(&opts, &d, &h, Codec::Zstd).unwrap();
        }
        let n = std::fs::read_dir(kept.parent().unwrap()).unwrap().count();
        assert_eq!(n, WIRE_CACHE_ENTRIES);
    }

    /// This flip is not uploaded to a server whose glibc is older than the one it needs.
    #[test]
    fn a_build_needing_a_newer_glibc_is_not_uploaded() {
        let home = tempfile::tempdir().unwrap();
        let mut opts = opts_in(home.path());
        std::fs::write(&opts.local_exe, b"exe").unwrap();
        let agent = candidates(&opts).unwrap().pop().unwrap();
        let server = |glibc| Missing {
            platform: "Linux x86_64".to_string(),
            zstd: false,
            gzip: true,
            b3sum: false,
            glibc,
        };
        opts.needs_glibc = Some("2.34".to_string());
        opts.portable = None;
        let e = glibc_check(&opts, "web1", &server(Some((2, 31))), &agent)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a portable build"), "{e}");
        assert!(
            e.contains("needs glibc 2.34 or newer and the server has glibc 2.31"),
            "{e}"
        );
        assert!(e.contains("--agent-binary FILE"), "{e}");
        assert!(glibc_check(&opts, "web1", &server(Some((2, 34))), &agent).is_ok());
        assert!(glibc_check(&opts, "web1", &server(None), &agent).is_ok());
        opts.needs_glibc = Some("2.17".to_string());
        assert!(glibc_check(&opts, "web1", &server(Some((2, 31))), &agent).is_ok());
        assert_eq!(parse_version("2.31"), Some((2, 31)));
        assert_eq!(parse_version("2"), Some((2, 0)));
        assert_eq!(parse_version("x"), None);
    }

    #[test]
    fn platform_names_make_file_names() {
        assert_eq!(platform_file_part("Linux x86_64"), "Linux-x86_64");
        assert_eq!(platform_file_part(" Darwin  arm64\n"), "Darwin-arm64");
        assert_eq!(platform_file_part("a/b c"), "a_b-c");
    }
}
