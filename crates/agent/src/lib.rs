//! flip's agent: the target side of the protocol. The client starts `flip agent --root PATH`
//! (as a local child process, or through SSH on a server) and the agent serves one session on
//! its stdin/stdout, turning [`flip_wire`] requests into [`flip_release`] operations.
//!
//! The agent trusts nothing it receives. Frames are size-checked by `flip_wire`; paths arrive as
//! validated `RelPath`s; the manifest is decoded canonically and must match the digest the client
//! announced; content is accepted only for files the agent itself found missing, never beyond
//! their manifest size, and each file must hash to its manifest digest; deltas are applied with
//! an output limit against bases the agent resolves in its own previous release. On the first
//! error the agent answers with a [`Response::Error`] and ends the session; an unfinished staging
//! directory is removed and `current` is untouched.

#![warn(missing_docs, unreachable_pub)]

use flip_manifest::RelPath;
use flip_release::{
    Created, Error as RelError, ErrorClass as RelClass, LockGuard, Root, Stage, Wait,
};
use flip_wire::{
    ErrorClass, FrameReader, FrameWriter, Mtime, Need, ProbeItem, Purpose, ReleaseSummary, Request,
    Response, StageBase, WireError, CHANGES_PER_FRAME, CHUNK, MAGIC, MAX_MANIFEST, PROTOCOL,
};
use rayon::prelude::*;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the agent waits for the client's next request before it gives up (removing its
/// staging directory and releasing the lock), unless `flip agent --idle-timeout` says otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Why a session ended badly (the client has been told, when the connection still allowed it).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A release operation on the target failed.
    #[error(transparent)]
    Release(#[from] RelError),
    /// Reading or writing a frame failed: a bad frame, the client gone, the idle timeout.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The client sent a request out of order or one the agent refuses.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A hook could not be started or waited for.
    #[error("{0}")]
    Hook(String),
    /// A `Stage` described as a difference against a release that is not the live one (a
    /// client that staged ahead of the status, guessing the live release): the stage is not
    /// done, the session goes on.
    #[error("{0}")]
    StaleBase(String),
}

impl AgentError {
    /// Whether the session ended because the client sent nothing for the idle timeout.
    pub fn is_idle_timeout(&self) -> bool {
        matches!(self, AgentError::Wire(WireError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut)
    }

    /// Whether the client went away (closed the connection, broken pipe): nobody is left to
    /// tell, and the agent ends silently.
    pub fn is_client_gone(&self) -> bool {
        match self {
            AgentError::Wire(WireError::Closed) => true,
            AgentError::Wire(WireError::Io(e)) => e.kind() != std::io::ErrorKind::TimedOut,
            AgentError::Protocol(m) => m == CLIENT_GONE,
            AgentError::Release(RelError::Abandoned) => true,
            _ => false,
        }
    }
}

const CLIENT_GONE: &str = "client went away mid-deploy";

impl AgentError {
    fn class(&self) -> ErrorClass {
        match self {
            AgentError::Release(e) => match e.class() {
                RelClass::Locked => ErrorClass::Locked,
                RelClass::Target => ErrorClass::Target,
                RelClass::Integrity => ErrorClass::Integrity,
                RelClass::NoSpace => ErrorClass::NoSpace,
                RelClass::Io => ErrorClass::Io,
                RelClass::BadRequest => ErrorClass::BadRequest,
                RelClass::Duplicate => ErrorClass::Duplicate,
            },
            AgentError::Wire(WireError::Io(_)) => ErrorClass::Io,
            AgentError::Wire(_) | AgentError::Protocol(_) => ErrorClass::Protocol,
            AgentError::Hook(_) => ErrorClass::Io,
            AgentError::StaleBase(_) => ErrorClass::BadRequest,
        }
    }
}

type Result<T, E = AgentError> = std::result::Result<T, E>;

mod apply;
mod coalesce;
pub mod doctor;
mod hooks;
mod shared;
mod stream;

use apply::{How, Pool};
use std::sync::Arc;

/// The file whose content is arriving in chunks (handed to the writers as it arrives).
struct Incoming {
    index: u32,
    kind: Kind,
    /// Encoded bytes received so far, and the most accepted.
    got: u64,
    limit: u64,
}

#[derive(Clone, PartialEq, Eq)]
enum Kind {
    Literal,
    /// A delta or patch against this basis.
    Encoded(RelPath, Encoding),
}

/// How a changed file is encoded against its previous version.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// An rsync delta against a signature the agent made.
    Rsync,
    /// A zstd frame with the old content (of this digest) as reference prefix.
    Patch(flip_manifest::Digest),
}

struct Session {
    root_path: PathBuf,
    root: Option<&'static Root>,
    lock: Option<LockGuard>,
    stage: Option<Arc<Stage<'static>>>,
    /// The live release staged again while the client's `Stage` was on its way
    /// ([`Request::Prepare`]): what that `Stage` starts from.
    prepared: Option<Stage<'static>>,
    /// The threads writing files, started with the first content.
    pool: Option<Pool>,
    incoming: Option<Incoming>,
    host: String,
    /// Directory hashes of the live release (id), computed on the first probe.
    tree: Option<(u64, flip_manifest::DirTree)>,
    /// What this session created to make the target (a first deploy), undone at the end unless
    /// a release was committed.
    created: Option<Created>,
    committed: bool,
    /// The release this session committed: the only one `Discard` may remove, and only while it
    /// is not live (a multi-host deploy switching back after another target failed).
    discardable: Option<u64>,
    /// The shared-path settings of this deploy and what `shared/` held ([`Request::Shared`]).
    shared: Option<shared::Settings>,
    /// A deploy may create the root's missing parents too (`flip agent --mkpath`); otherwise
    /// only the root itself, when its parent exists.
    mkpath: bool,
    /// The release live before this session's activation or rollback, once it made one
    /// (`FLIP_PREVIOUS` of a hook run after the swap).
    previous_live: Option<Option<u64>>,
    /// The handshake succeeded: after a failed request, what the client pipelined is answered
    /// ([`drain`]).
    greeted: bool,
    /// The last request was a `Stage` against a release no longer live (why): a `Changes`
    /// right after it is not done either.
    stale: Option<String>,
    /// Content sent ahead of a stage that needs other content, or that was not done (why):
    /// until the next `Bye`, content frames are dropped and requests answered `NotDone`
    /// (`Stage`'s `ahead`).
    dropping: Option<String>,
    /// The client said `Bye`: the session ended as the client meant it to.
    bye: bool,
    /// The live release this session's last `CheckLive` found intact ([`Request::EndIfLive`]).
    live_intact: Option<u64>,
    /// Holds the answers to a batch until they all leave together ([`coalesce`]).
    holder: coalesce::Holder,
    /// A release hooks ran in whose writes are not recorded yet, with how it differed from its
    /// manifest before the first of them ran ([`Root::hook_baseline`]): recorded once, before
    /// the next request that is not another hook in it, or when the session ends (one look at
    /// the release per phase, however many hooks ran).
    hook_writes: Option<(u64, flip_release::HookBaseline)>,
    /// A first deploy's files streaming before its manifest ([`Request::StreamStart`]).
    streaming: Option<stream::Streaming>,
}

/// A session's writer threads (started with its first content), or the first file they
/// failed on.
fn writers(pool: &mut Option<Pool>) -> Result<&mut Pool> {
    let pool = pool.get_or_insert_with(|| Pool::new(Pool::default_threads()));
    if pool.failed() {
        let e = pool.settle().expect("a file failed");
        return Err(e.into());
    }
    Ok(pool)
}

/// Serves one session. Returns once the client said `Bye` or the session failed.
///
/// # Errors
/// [`AgentError`]: the protocol broke, the client went away or idled, or a request failed
/// in a way that ends the session (its cleanup done first).
pub fn serve(
    input: Box<dyn Read + Send>,
    output: Box<dyn Write + Send>,
    root: &Path,
) -> Result<()> {
    serve_with(input, output, root, false)
}

/// [`serve`]; with `mkpath`, a deploy creates the root's missing parent directories too.
///
/// # Errors
/// As [`serve`].
pub fn serve_with(
    input: Box<dyn Read + Send>,
    output: Box<dyn Write + Send>,
    root: &Path,
    mkpath: bool,
) -> Result<()> {
    let (holder, input, output) = coalesce::Holder::wrap(input, output);
    let mut rx = FrameReader::new(Box::new(input));
    let mut tx = FrameWriter::new(Box::new(output));
    let mut s = Session {
        holder,
        // Absolute: a hook's FLIP_RELEASE_DIR names the release wherever the hook `cd`s
        // (`web1:app` is relative to the login directory, the agent's).
        root_path: {
            let root = home_expanded(root);
            std::path::absolute(&root).unwrap_or(root)
        },
        root: None,
        lock: None,
        stage: None,
        prepared: None,
        pool: None,
        incoming: None,
        host: hostname(),
        tree: None,
        created: None,
        committed: false,
        discardable: None,
        shared: None,
        mkpath,
        previous_live: None,
        greeted: false,
        stale: None,
        dropping: None,
        bye: false,
        live_intact: None,
        hook_writes: None,
        streaming: None,
    };
    let r = s.run(&mut rx, &mut tx);
    s.record_hook_writes();
    // Teardown, on every path: the staging directory goes first, then a target this session
    // created and never committed into (a failed first deploy leaves the target as it found
    // it), then the lock; only then is the client told, so a retry never finds the lock held.
    s.incoming = None;
    s.pool = None;
    s.stage = None;
    s.prepared = None;
    s.streaming = None;
    s.discard_abandoned();
    let lock = s.lock.take();
    match (s.created.take(), lock, s.root) {
        (Some(created), Some(lock), Some(root)) if !s.committed => root.undo_init(&created, lock),
        (_, lock, _) => drop(lock),
    }
    match r {
        Ok(()) => {
            s.holder.defer(false);
            let _ = s.holder.hold(|| tx.finish());
            let _ = s.holder.release();
            Ok(())
        }
        Err(e) => {
            // Answers held for a client still sending its content go out with the error.
            s.holder.defer(false);
            if !matches!(
                e,
                AgentError::Wire(WireError::Io(_)) | AgentError::Wire(WireError::Closed)
            ) {
                let _ = s.send_notices(&mut tx);
                let message = e.to_string();
                let _ = tx.send(&Response::Error {
                    class: e.class(),
                    message: message.clone(),
                });
                if s.greeted {
                    drain(&mut rx, &mut tx, &message);
                }
                let _ = tx.finish();
            }
            Err(e)
        }
    }
}

/// The `payload_len` bytes of a `Stage`'s `ManifestChunk`s (checked against the limit before).
fn read_payload(rx: &mut FrameReader, payload_len: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity((payload_len as usize).min(CHUNK));
    while (bytes.len() as u64) < payload_len {
        match rx.recv::<Request>()? {
            Request::ManifestChunk(c) if bytes.len() as u64 + c.len() as u64 <= payload_len => {
                bytes.extend_from_slice(&c)
            }
            _ => {
                return Err(AgentError::Protocol(
                    "expected the rest of the manifest".into(),
                ))
            }
        }
    }
    Ok(bytes)
}

/// A staged manifest, its digest, and the live release and manifest it was rebuilt against.
type Rebuilt = (
    flip_manifest::Manifest,
    flip_manifest::Digest,
    Option<(u64, flip_manifest::Manifest)>,
);

/// The manifest a `Stage` describes, as `base` says: whole (the canonical encoding, whose
/// blake3 is its digest), or a difference or directory patch against the live release (then
/// also the live release and its manifest). A base that is no longer live is
/// [`AgentError::StaleBase`]: the client stages again.
///
/// `known`: a live release and its manifest the caller holds already (a prepared stage's), not
/// read again if still live (then no live manifest is returned).
fn rebuild_manifest(
    root: &Root,
    base: StageBase,
    bytes: &[u8],
    known: Option<(u64, &flip_manifest::Manifest)>,
) -> Result<Rebuilt> {
    let mut live_manifest = None;
    let (base, dirs) = match base {
        StageBase::Whole => (None, false),
        StageBase::Diff(d) => (Some(d), false),
        StageBase::Dirs(d) => (Some(d), true),
    };
    let (manifest, got) = match base {
        // The decoder accepts only the canonical encoding: its blake3 is the digest.
        None => (
            flip_manifest::decode(bytes)
                .map_err(|e| RelError::BadRequest(format!("manifest rejected: {e}")))?,
            flip_manifest::Digest::of(bytes),
        ),
        Some(base) => {
            let live = root
                .current()?
                .ok_or_else(|| AgentError::StaleBase("manifest diff but nothing is live".into()))?;
            // A live manifest that cannot be read is no base either: the client, told so,
            // stages the whole manifest (planned against nothing).
            let known = known.filter(|(id, _)| *id == live).map(|(_, m)| m);
            let read = match known {
                Some(_) => None,
                None => Some(
                    root.manifest(live)
                        .map_err(|e| AgentError::StaleBase(e.to_string()))?,
                ),
            };
            let prev = read.as_ref().or(known).expect("read unless known");
            if prev.digest() != base {
                return Err(AgentError::StaleBase(format!(
                    "manifest diff is against another release than the live one ({live})"
                )));
            }
            let rejected = |e: &dyn std::fmt::Display| {
                RelError::BadRequest(format!("manifest diff rejected: {e}"))
            };
            let m = if dirs {
                let patch = flip_manifest::decode_dir_patch(bytes).map_err(|e| rejected(&e))?;
                prev.apply_dirs(&patch).map_err(|e| rejected(&e))?
            } else {
                let diff = flip_manifest::decode_diff(bytes).map_err(|e| rejected(&e))?;
                prev.apply(&diff).map_err(|e| rejected(&e))?
            };
            let d = m.digest();
            live_manifest = read.map(|r| (live, r));
            (m, d)
        }
    };
    Ok((manifest, got, live_manifest))
}

/// After a failed request (everything already undone and the lock released): reads what the
/// client pipelined after it and answers each request that expects an answer with
/// [`Response::NotDone`], acting on none; content frames are dropped. Ends at `Bye`, at the end
/// of the stream or of what one frame can say, or after [`flip_wire::DRAIN_ANSWERS_MAX`]
/// answers or [`flip_wire::DRAIN_FRAMES_MAX`] frames: the read-ahead is bounded.
fn drain(rx: &mut FrameReader, tx: &mut FrameWriter, because: &str) {
    if tx.flush().is_err() {
        return;
    }
    let mut answers = 0;
    for _ in 0..flip_wire::DRAIN_FRAMES_MAX {
        let Ok(req) = rx.recv::<Request>() else {
            return;
        };
        if !expects_answer(&req) {
            continue;
        }
        let sent = tx.send(&Response::NotDone {
            request: <&str>::from(&req).to_string(),
            because: because.to_string(),
        });
        answers += 1;
        if sent.and_then(|()| tx.flush()).is_err()
            || matches!(req, Request::Bye)
            || answers >= flip_wire::DRAIN_ANSWERS_MAX
        {
            return;
        }
    }
}

/// Whether the agent answers `req` (content and manifest pieces are answered, if at all, by
/// the request they belong to).
fn expects_answer(req: &Request) -> bool {
    !matches!(
        req,
        Request::ManifestChunk(_)
            | Request::Literal { .. }
            | Request::Delta { .. }
            | Request::Patch { .. }
            | Request::StreamStart { .. }
            | Request::Stream { .. }
            | Request::Prepare { .. }
    )
}

/// Whether more of the client's input is there to read already: in `rx`'s buffer, or (serving
/// stdio) on stdin.
fn input_waiting(rx: &FrameReader) -> bool {
    rx.buffered() || stdin_readable()
}

/// Whether the agent serves stdio and its stdin has bytes to read.
fn stdin_readable() -> bool {
    if !SERVING_STDIO.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    let mut fd = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd we own, for fd 0, open for the agent's whole life.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents & libc::POLLIN != 0
}

/// [`serve`] on this process's stdin and stdout. With an `idle` timeout, a client that sends
/// nothing (and reads nothing the agent must write) for that long is given up on: the session
/// ends as if it had failed (staging removed, lock released) with an error for which
/// [`AgentError::is_idle_timeout`] holds.
///
/// With `mkpath`, a deploy creates the root's missing parent directories too. `preamble`: the
/// first bytes of the session's input, read before stdin (at most [`PREAMBLE_MAX`]; what an
/// SSH client put in the command line, where it costs no round trip).
///
/// # Errors
/// As [`serve`].
pub fn serve_stdio(
    root: &Path,
    idle: Option<Duration>,
    mkpath: bool,
    preamble: Vec<u8>,
) -> Result<()> {
    use std::io::Read as _;
    use std::os::fd::FromRawFd;
    doctor::note_start();
    flip_release::fault_scope(root);
    // SAFETY: fds 0 and 1 are open for the whole life of the agent and owned by nothing else.
    let (input, output) = unsafe { (std::fs::File::from_raw_fd(0), std::fs::File::from_raw_fd(1)) };
    SERVING_STDIO.store(true, std::sync::atomic::Ordering::Relaxed);
    std::thread::spawn(watch_client);
    serve_with(
        Box::new(std::io::Cursor::new(preamble).chain(Idle { file: input, idle })),
        Box::new(Idle { file: output, idle }),
        root,
        mkpath,
    )
}

/// Most bytes a client may pass before the session's input as `--preamble` words (decoded,
/// all together): what it wrote while its `exec` was on its way.
pub const PREAMBLE_MAX: usize = 16 << 10;

/// The target root with a leading `~` expanded as a shell expands it: `~` and `~/x` in the
/// home of the user the agent runs as (`$HOME`, else the password database), `~name` and
/// `~name/x` in user `name`'s home (`getpwnam_r`). The client passes the root quoted (no shell
/// on the server expands it), and `host:~/app` is how scp and rsync users write a path in
/// their home. Anything else, and a `~name` that names no user, is left as it is (then the
/// error names the path as written).
pub fn home_expanded(root: &Path) -> PathBuf {
    let Some(rest) = root.to_str().and_then(|s| s.strip_prefix('~')) else {
        return root.to_path_buf();
    };
    let (name, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let home = match name {
        "" => std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .or_else(|| passwd_home(None)),
        name => passwd_home(Some(name)),
    };
    match home {
        Some(h) if tail.is_empty() => h,
        Some(h) => h.join(tail),
        None => root.to_path_buf(),
    }
}

/// The home directory of user `name` (or of the user this process runs as), from the password
/// database; `None` when there is no such user or no home recorded.
fn passwd_home(name: Option<&str>) -> Option<PathBuf> {
    use flip_release::passwd;
    let user = match name {
        Some(n) => passwd::by_name(n),
        // SAFETY: geteuid has no preconditions and cannot fail.
        None => passwd::by_uid(unsafe { libc::geteuid() }),
    }?;
    (!user.home.as_os_str().is_empty()).then_some(user.home)
}

/// Set by [`serve_stdio`]: the session's output is this process's stdout.
static SERVING_STDIO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a small write to the client now could block: stdout (when the session is served on
/// it) has no room. (A pipe or socket with room takes a small frame whole.)
fn output_would_block() -> bool {
    if !SERVING_STDIO.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    let mut pfd = libc::pollfd {
        fd: 1,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd we own, count 1, no waiting.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 0 || (n > 0 && pfd.revents & libc::POLLOUT == 0)
}

/// Waits until nobody reads the agent's stdout any more, or nobody writes its stdin (the
/// client was killed, or its connection dropped: the pipe or socket reports an error or a
/// hangup), then abandons the work in progress ([`flip_release::abandon`]): the session ends
/// at its next file or piece, stops a running hook, removes its staging directory and releases
/// the lock, instead of finishing staging, signatures or a hook for no one while a retry finds
/// the target locked. The client closes its end only after the answer to its `Bye` (nothing
/// after that looks at the abandonment, the teardown neither) or when it gives up: requests
/// it queued and closed its input after are not done (`Request::Bye`). Behind the system
/// `ssh` (`--ssh-command`), which outlives a killed client and reads on, only the input
/// tells: ssh passes the end of its input on, and sshd closes the agent's stdin.
fn watch_client() {
    let mut pfds = [
        libc::pollfd {
            fd: 1,
            // Nothing asked for: only POLLERR, POLLHUP and POLLNVAL are reported.
            events: 0,
            revents: 0,
        },
        libc::pollfd {
            fd: 0,
            // A pipe with no writer left reports POLLHUP; a socket whose peer shut its writing
            // down, POLLRDHUP.
            events: libc::POLLRDHUP,
            revents: 0,
        },
    ];
    while pfds.iter().any(|p| p.fd >= 0) {
        // SAFETY: two pollfds we own, count 2, no timeout (a negative fd is skipped).
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
        if n > 0 {
            let hangup = libc::POLLERR | libc::POLLHUP | libc::POLLRDHUP;
            if pfds.iter().any(|p| p.revents & hangup != 0) {
                flip_release::abandon();
                return;
            }
            // Not a descriptor that can tell (POLLNVAL): watched no more.
            for p in &mut pfds {
                if p.revents != 0 {
                    p.fd = -1;
                }
            }
            continue;
        }
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// A descriptor whose reads and writes give up with `TimedOut` after `idle` without progress.
struct Idle {
    file: std::fs::File,
    idle: Option<Duration>,
}

impl Idle {
    fn ready(&self, events: libc::c_short) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let Some(idle) = self.idle else {
            return Ok(());
        };
        let idle = hooks::idle_wait(idle);
        let ms = libc::c_int::try_from(idle.as_millis()).unwrap_or(libc::c_int::MAX);
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events,
            revents: 0,
        };
        loop {
            // SAFETY: one pollfd we own, count 1.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            match n {
                0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no request from the client for {} s", idle.as_secs()),
                    ))
                }
                n if n > 0 => return Ok(()),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
}

impl Read for Idle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.ready(libc::POLLIN)?;
        self.file.read(buf)
    }
}

impl Write for Idle {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.ready(libc::POLLOUT)?;
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn hostname() -> String {
    flip_release::hostname()
}

/// The listing's view of a release; `None` for one whose recorded manifest digest is not a
/// digest (damaged metadata: such a release is left out, as a damaged one is).
fn summary(r: flip_release::ReleaseInfo) -> Option<ReleaseSummary> {
    Some(ReleaseSummary {
        id: r.id,
        manifest_digest: flip_manifest::Digest::from_hex(&r.manifest_digest)?,
        label: r.label,
        created: r.created,
        files: r.files,
        bytes: r.bytes,
        current: r.current,
    })
}

impl Session {
    fn run(&mut self, rx: &mut FrameReader, tx: &mut FrameWriter) -> Result<()> {
        // An error is the first in the order of the stream: a file still being written before
        // the request that failed (or before the client went away) may have failed first.
        self.serve_requests(rx, tx)
            .map_err(|e| match &mut self.pool {
                Some(pool) => pool.settle().map_or(e, AgentError::from),
                None => e,
            })
    }

    fn serve_requests(&mut self, rx: &mut FrameReader, tx: &mut FrameWriter) -> Result<()> {
        self.handshake(rx, tx)?;
        self.greeted = true;
        loop {
            let req: Request = match rx.recv() {
                Ok(r) => r,
                Err(WireError::Closed) => {
                    if self.stage.is_some() || self.streaming.is_some() {
                        return Err(AgentError::Protocol(CLIENT_GONE.into()));
                    }
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            if !matches!(&req, Request::Hook { release, .. } if Some(*release) == self.hook_writes.as_ref().map(|h| h.0))
            {
                self.record_hook_writes();
            }
            // The content sent ahead ends at the `Commit` after it: what follows is a few small
            // requests, so the answers held meanwhile go out now, before anything is committed
            // or made live (an agent that dies in the swap has said what it staged).
            if matches!(req, Request::Commit) && self.holder.deferring() {
                self.holder.defer(false);
                self.holder.release_written().map_err(WireError::Io)?;
            }
            // Content sent ahead for other needs than the stage's: dropped up to the `Bye` that
            // ends it, each request not done (the stage's `Changes` is answered as usual).
            if let Some(because) = self
                .dropping
                .as_ref()
                .filter(|_| !matches!(req, Request::Changes { .. }))
            {
                if expects_answer(&req) {
                    let not_done = Response::NotDone {
                        request: <&str>::from(&req).to_string(),
                        because: because.clone(),
                    };
                    tx.send(&not_done)?;
                    if matches!(req, Request::Bye) {
                        self.dropping = None;
                    }
                    self.holder.hold(|| tx.flush())?;
                }
                continue;
            }
            if matches!(req, Request::Bye) {
                return self.say_bye(tx);
            }
            if let Request::EndIfLive { keep } = req {
                if self.unchanged_live()? {
                    let pruned = self.prune(keep)?;
                    self.send_notices(tx)?;
                    tx.send(&pruned)?;
                    return self.say_bye(tx);
                }
                tx.send(&Response::NotDone {
                    request: "EndIfLive".into(),
                    because: "the live release was not found intact as the new one".into(),
                })?;
                self.holder.hold(|| tx.flush())?;
                continue;
            }
            // A stage ahead of the status against a release no longer live, and the `Changes`
            // asked with it, are not done; the session goes on.
            let stale = match (&req, &self.stale) {
                (Request::Changes { .. }, Some(why)) if self.stage.is_none() => Some(why.clone()),
                _ => None,
            };
            self.stale = None;
            if let Some(because) = stale {
                tx.send(&Response::NotDone {
                    request: "Changes".into(),
                    because,
                })?;
                tx.flush()?;
                continue;
            }
            let is_stage = matches!(req, Request::Stage { .. });
            let ahead = matches!(req, Request::Stage { ahead: Some(_), .. });
            // Content frames are answered only at Commit (or by an error).
            let answer = match self.handle(req, rx, tx) {
                Err(AgentError::StaleBase(because)) if is_stage => {
                    self.stale = Some(because.clone());
                    if ahead {
                        self.holder.defer(true);
                        self.dropping = Some(format!(
                            "the stage the content was sent ahead for was not done: {because}"
                        ));
                    }
                    Some(Response::NotDone {
                        request: "Stage".into(),
                        because,
                    })
                }
                other => other?,
            };
            if let Some(resp) = answer {
                self.send_notices(tx)?;
                tx.send(&resp)?;
                // Out with the rest of the batch's answers, before the next read.
                self.holder.hold(|| tx.flush())?;
            }
        }
    }

    fn handshake(&mut self, rx: &mut FrameReader, tx: &mut FrameWriter) -> Result<()> {
        let (protocol, version, compress) = match rx.recv::<Request>() {
            Ok(Request::Hello {
                magic,
                protocol,
                version,
                compress,
            }) if magic == MAGIC => (protocol, version, compress),
            Ok(_) => return Err(AgentError::Protocol("expected Hello".into())),
            Err(WireError::Decode(_)) | Err(WireError::TooLarge(_)) => {
                return Err(AgentError::Protocol(
                    "the client does not speak flip's protocol".into(),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        if protocol != PROTOCOL {
            return Err(AgentError::Protocol(format!(
                "client flip {version} speaks protocol {protocol}, this agent (flip {}) speaks {PROTOCOL}",
                env!("CARGO_PKG_VERSION")
            )));
        }
        // The client decided alone: what it pipelined after Hello is already zstd.
        if compress > 0 {
            rx.start_decompression()?;
        }
        tx.send(&Response::Welcome {
            protocol: PROTOCOL,
            version: env!("CARGO_PKG_VERSION").to_string(),
            host: self.host.clone(),
            // Symlinks resolved: what names this target however the client wrote it (the
            // client ranks targets by it for ordered locking).
            root: std::fs::canonicalize(&self.root_path)
                .unwrap_or_else(|_| self.root_path.clone())
                .display()
                .to_string(),
        })?;
        tx.flush()?;
        if compress > 0 {
            tx.start_compression(compress.clamp(1, 3))?;
        }
        Ok(())
    }

    /// Sends what the root noticed since the last answer (warnings, leftovers), if anything.
    fn send_notices(&mut self, tx: &mut FrameWriter) -> Result<()> {
        let Some(root) = self.root else {
            return Ok(());
        };
        let warnings = root.take_warnings();
        let leftovers = root.take_leftovers();
        if warnings.is_empty() && leftovers.is_none() {
            return Ok(());
        }
        let leftovers = leftovers.map(|l| {
            l.into_iter()
                .map(|l| flip_wire::Leftover {
                    path: l.path.display().to_string(),
                    error: l.error,
                })
                .collect()
        });
        tx.send(&Response::Notices {
            warnings,
            leftovers,
        })?;
        Ok(())
    }

    /// The root, opened on first use; a deploy may create it.
    fn root(&mut self, create: bool) -> Result<&'static Root> {
        if let Some(r) = self.root {
            return Ok(r);
        }
        let root = if create {
            let (root, created) = Root::open_or_init_tracked(&self.root_path, self.mkpath)?;
            self.created = created;
            root
        } else {
            Root::open(&self.root_path)?
        };
        // One root per agent process, alive until it exits.
        let root: &'static Root = Box::leak(Box::new(root));
        self.root = Some(root);
        Ok(root)
    }

    fn locked(&self) -> Result<&LockGuard> {
        self.lock
            .as_ref()
            .ok_or_else(|| AgentError::Protocol("this request needs the lock first".into()))
    }

    fn staged(&self) -> Result<&Arc<Stage<'static>>> {
        self.stage
            .as_ref()
            .ok_or_else(|| AgentError::Protocol("no release is being staged".into()))
    }

    /// A session that ends without `Bye` (the client killed or gone, an error, the idle
    /// timeout) removes the release it committed and never made live: its `before_activate`
    /// hooks may not have run, or run to their end, and the deploy that made it failed. (A
    /// `--no-activate` deploy says `Bye`: its release stays, staged.)
    fn discard_abandoned(&mut self) {
        let (Some(id), Some(root), Some(lock), false) =
            (self.discardable, self.root, self.lock.as_ref(), self.bye)
        else {
            return;
        };
        if !matches!(root.current(), Ok(c) if c != Some(id)) {
            return;
        }
        match root.discard(lock, id) {
            Ok(()) => {
                self.discardable = None;
                self.committed = false;
                self.log(serde_json::json!({
                    "time": now(), "event": "discard", "release": id,
                    "why": "the session ended before the release was made live",
                }));
            }
            Err(e) => eprintln!("flip agent: warning: release {id} left staged: {e}"),
        }
    }

    fn log(&self, event: serde_json::Value) {
        if let Some(root) = self.root {
            if let Err(e) = root.log(&event) {
                eprintln!("flip agent: warning: {e}");
            }
        }
    }

    fn handle(
        &mut self,
        req: Request,
        rx: &mut FrameReader,
        tx: &mut FrameWriter,
    ) -> Result<Option<Response>> {
        // A prepared stage is for the `Stage` that follows its `Prepare`: any other request
        // drops it (one may remove the staging directories: a prune, a discard).
        if !matches!(req, Request::Stage { .. } | Request::Prepare { .. }) {
            self.prepared = None;
        }
        Ok(Some(match req {
            Request::Hello { .. } => return Err(AgentError::Protocol("Hello sent twice".into())),
            Request::Lock { wait, holder } => self.take_lock(wait, holder, tx)?,
            Request::Status => self.status()?,
            Request::GetManifest { id } => {
                self.get_manifest(id, tx)?;
                return Ok(None);
            }
            Request::Stage {
                label,
                base,
                payload_len,
                digest,
                ahead,
            } => {
                let staged = self.stage(rx, label, base, payload_len, digest)?;
                if let (Some(want), Response::Staged { needs, .. }) = (ahead, &staged) {
                    // Every answer from this one on waits until the client has sent its content.
                    self.holder.defer(true);
                    if flip_wire::needs_digest(needs) != want {
                        self.dropping =
                            Some("the stage needs other files than the content sent ahead".into());
                    }
                }
                staged
            }
            Request::Probe(items) => self.probe(items)?,
            Request::ManifestChunk(_) => {
                return Err(AgentError::Protocol("manifest data outside Stage".into()))
            }
            Request::Signatures(items) => {
                self.signatures(items, tx)?;
                Response::SignaturesDone
            }
            Request::BasisSignatures => {
                let items = self.delta_items()?;
                self.signatures(items, tx)?;
                Response::SignaturesDone
            }
            Request::Literal {
                index,
                mtime,
                data,
                last,
            } => {
                self.content(index, Kind::Literal, mtime, data, last)?;
                return Ok(None);
            }
            Request::Delta {
                index,
                basis,
                mtime,
                data,
                last,
            } => {
                let kind = Kind::Encoded(basis, Encoding::Rsync);
                self.content(index, kind, mtime, data, last)?;
                return Ok(None);
            }
            Request::Patch {
                index,
                basis,
                basis_digest,
                mtime,
                data,
                last,
            } => {
                let kind = Kind::Encoded(basis, Encoding::Patch(basis_digest));
                self.content(index, kind, mtime, data, last)?;
                return Ok(None);
            }
            Request::Prepare { base } => {
                self.prepare(base, rx)?;
                return Ok(None);
            }
            Request::Commit => self.commit()?,
            Request::Activate { id, force } => self.activate(id, force)?,
            Request::ActivateCommitted => match self.discardable {
                Some(id) => self.activate(id, false)?,
                None => {
                    return Err(AgentError::Protocol(
                        "ActivateCommitted, but this session committed no release".into(),
                    ))
                }
            },
            Request::Check { id } => self.check(id)?,
            Request::CanDeploy => {
                let found = flip_release::Root::deployable(&self.root_path, self.mkpath)?;
                Response::Deployable {
                    exists: found == flip_release::Found::Target,
                }
            }
            Request::Rollback { to, force } => self.rollback(to, force)?,
            Request::Prune { keep } => self.prune(keep)?,
            Request::Verify { id } => self.verify(id)?,
            Request::Changes { all } => {
                self.changes(all, tx)?;
                return Ok(None);
            }
            Request::Discard { id } => self.discard(id)?,
            Request::CheckLive { digest } => self.check_live(digest)?,
            Request::Shared {
                dirs,
                files,
                writable,
                mode,
                owner,
            } => self.set_shared(dirs, files, writable, mode, owner)?,
            // Read-only, never holding the lock (at most a shared look, let go at once): a running
            // deploy is reported, never waited for.
            Request::Doctor => doctor::answer(&self.root_path)?,
            Request::StreamStart { files, bytes } => {
                self.stream_start(files, bytes)?;
                return Ok(None);
            }
            Request::Stream {
                path,
                mode,
                mtime,
                data,
                last,
            } => {
                self.stream(path, mode, mtime, data, last)?;
                return Ok(None);
            }
            Request::Hook {
                release,
                run,
                timeout_ms,
                env,
                wait_ms,
            } => self.hook(release, run, timeout_ms, env, wait_ms, tx)?,
            Request::Bye | Request::EndIfLive { .. } => unreachable!("handled by run"),
        }))
    }

    /// `Lock`: takes the target's lock for this session (waiting, with `Waiting` notices, when
    /// asked); the root is created first for a deploy.
    fn take_lock(
        &mut self,
        wait: bool,
        holder: flip_wire::Holder,
        tx: &mut FrameWriter,
    ) -> Result<Response> {
        if self.lock.is_some() {
            return Err(AgentError::Protocol("lock requested twice".into()));
        }
        for (field, text) in [
            ("host", &holder.host),
            ("user", &holder.user),
            ("run", &holder.run),
        ] {
            if text.len() > flip_wire::HOLDER_TEXT_MAX {
                return Err(AgentError::from(RelError::BadRequest(format!(
                    "the lock holder's {field} is {} bytes long, more than {}",
                    text.len(),
                    flip_wire::HOLDER_TEXT_MAX
                ))));
            }
        }
        let root = self.root(holder.what == Purpose::Deploy)?;
        let me = flip_release::Holder {
            pid: std::process::id(),
            host: self.host.clone(),
            user: holder.user,
            since: holder.since,
            what: format!("{} from {} pid {}", holder.what, holder.host, holder.pid),
            run: Some(holder.run).filter(|r| !r.is_empty()),
        };
        let mut first = true;
        let mut told = |h: &str| {
            // Repeats (every few seconds while the holder keeps the lock) only when the write
            // cannot block: a client still writing what it queued after the lock reads nothing
            // until it is done, and a full pipe would stop this agent here for good.
            if !first && output_would_block() {
                return;
            }
            first = false;
            let _ = tx.send(&Response::Waiting {
                holder: h.to_string(),
            });
            let _ = tx.flush();
        };
        let mut root = root;
        let mut remade = 0;
        let guard = loop {
            let r = match wait {
                true => root.lock(&me, Wait::Yes(&mut told)),
                false => root.lock(&me, Wait::No),
            };
            match r {
                // The deploy it waited for was a first deploy that failed and undid the target
                // (`.flip/` gone): the target is made again, as it would have been had that
                // deploy never run.
                Err(_)
                    if holder.what == Purpose::Deploy
                        && remade < 3
                        && gone(&root.path().join(flip_release::STATE)) =>
                {
                    remade += 1;
                    self.root = None;
                    root = self.root(true)?;
                }
                r => break r?,
            }
        };
        self.lock = Some(guard);
        Ok(Response::Locked)
    }

    /// `Status`: the live release and every release's summary.
    fn status(&mut self) -> Result<Response> {
        let root = self.root(false)?;
        let current = root.current()?;
        Ok(Response::Status {
            current,
            releases: root.releases()?.into_iter().filter_map(summary).collect(),
        })
    }

    /// `GetManifest`: sends release `id`'s manifest file as `ManifestChunk` frames.
    fn get_manifest(&mut self, id: u64, tx: &mut FrameWriter) -> Result<()> {
        let bytes = self.root(false)?.manifest_bytes(id)?;
        let mut chunks = bytes.chunks(CHUNK).peekable();
        if chunks.peek().is_none() {
            return Err(AgentError::Protocol("empty manifest file".into()));
        }
        while let Some(c) = chunks.next() {
            tx.send(&Response::ManifestChunk {
                data: c.to_vec(),
                last: chunks.peek().is_none(),
            })?;
        }
        tx.flush()?;
        Ok(())
    }

    /// `Commit`: once every file arrived and the writers settled, makes the staged release
    /// durable as `releases/<id>`.
    fn commit(&mut self) -> Result<Response> {
        if self.incoming.is_some() {
            return Err(AgentError::Protocol(
                "Commit while a file is incomplete".into(),
            ));
        }
        if self.stage.is_none() {
            return Err(AgentError::Protocol("Commit without Stage".into()));
        }
        if let Some(e) = self.pool.as_mut().and_then(Pool::settle) {
            return Err(e.into());
        }
        let stage = self.stage.take().expect("checked above");
        // Settled: no writer holds the stage any more.
        let stage = Arc::into_inner(stage)
            .ok_or_else(|| AgentError::Protocol("the stage is still being written".into()))?;
        let stats = stage.stats();
        let info = stage.commit()?;
        self.committed = true;
        self.discardable = Some(info.id);
        self.log(serde_json::json!({
            "time": now(), "event": "staged", "release": info.id,
            "label": info.label, "files": info.files, "written": stats.written,
            "streamed": stats.streamed,
            "hashed": stats.hashed, "bases_dropped": stats.bases_dropped,
        }));
        Ok(Response::Committed { id: info.id })
    }

    /// Whether release `id` needs no check before it is made live: this session committed it
    /// (every byte checked as it was written), or it was live when this session first switched
    /// (a switch back after a failure elsewhere, as it was a moment ago).
    fn vouched(&self, id: u64) -> bool {
        self.discardable == Some(id) || self.previous_live == Some(Some(id))
    }

    /// Refuses release `id` when it changed since it was committed, unless `force` or
    /// [`vouched`](Self::vouched).
    fn check_before_switch(&self, root: &Root, id: u64, force: bool) -> Result<()> {
        if force || self.vouched(id) || root.current()? == Some(id) {
            return Ok(());
        }
        Ok(root.check_unchanged(id)?)
    }

    /// `Activate`: swaps `current` to release `id` (see [`Request::Activate`]).
    fn activate(&mut self, id: u64, force: bool) -> Result<Response> {
        let root = self.root(false)?;
        let lock = self.locked()?;
        self.check_before_switch(root, id, force)?;
        let previous = root.activate(lock, id)?;
        self.previous_live.get_or_insert(previous);
        self.log(serde_json::json!({
            "time": now(), "event": "activate", "release": id, "previous": previous,
        }));
        Ok(Response::Activated { id, previous })
    }

    /// `Check`: whether `Activate` of release `id` would pass its check (see
    /// [`Request::Check`]); nothing changes.
    fn check(&mut self, id: u64) -> Result<Response> {
        let root = self.root(false)?;
        self.locked()?;
        root.info(id)?;
        self.check_before_switch(root, id, false)?;
        Ok(Response::Checked { id })
    }

    /// `Rollback`: swaps `current` to release `to`, or to the one before the live one (see
    /// [`Request::Rollback`]).
    fn rollback(&mut self, to: Option<u64>, force: bool) -> Result<Response> {
        let root = self.root(false)?;
        let lock = self.locked()?;
        let current = root.live()?;
        let target = match to {
            Some(t) => {
                root.info(t)?;
                t
            }
            None => root.rollback_target(current)?,
        };
        self.check_before_switch(root, target, force)?;
        // `--to` the live release answers as `activate` of it does: it stays live.
        let previous = root.activate(lock, target)?;
        self.previous_live.get_or_insert(previous);
        self.log(serde_json::json!({
            "time": now(), "event": "rollback", "release": target, "previous": previous,
        }));
        Ok(Response::Activated {
            id: target,
            previous,
        })
    }

    /// `Prune`: removes old releases beyond `keep`.
    fn prune(&mut self, keep: u32) -> Result<Response> {
        let root = self.root(false)?;
        // Removing trees takes a while, and the answers held so far (the commit's, the
        // activation's) must reach the client even if this agent dies meanwhile: out now, when
        // there is something to remove (a later answer may then wait up to a round trip for
        // Nagle, `coalesce`, which the removal mostly outlasts).
        if !root.prunable(keep as usize)?.is_empty() {
            self.holder.release_written().map_err(WireError::Io)?;
        }
        let removed = root.prune(self.locked()?, keep as usize)?;
        self.log(serde_json::json!({
            "time": now(), "event": "prune", "removed": removed,
        }));
        Ok(Response::Pruned { removed })
    }

    /// `Verify`: re-hashes release `id` (the live one when `None`) against its manifest.
    fn verify(&mut self, id: Option<u64>) -> Result<Response> {
        let root = self.root(false)?;
        let id = match id {
            Some(id) => id,
            None => root.live()?,
        };
        Ok(Response::Verified {
            id,
            problems: root.verify(id)?,
        })
    }

    /// `Changes`: sends what the stage changes (every path with `all`) as `Changes` frames of
    /// at most [`CHANGES_PER_FRAME`] items.
    fn changes(&mut self, all: bool, tx: &mut FrameWriter) -> Result<()> {
        let stage = self
            .stage
            .as_ref()
            .ok_or_else(|| AgentError::Protocol("Changes without Stage".into()))?;
        let c = match stage.release_files() {
            // Seeds of shared paths: the changes of the release as recorded (each seed a
            // symlink), its files' steps and needs taken from the staged ones.
            Some((release, map)) => {
                let plan = flip_plan::Plan {
                    files: (stage.plan().files.iter().zip(&map))
                        .filter(|(_, m)| m.is_some())
                        .map(|(f, _)| f.clone())
                        .collect(),
                    stats: Default::default(),
                };
                let needs: Vec<usize> = stage.needs().iter().filter_map(|&i| map[i]).collect();
                flip_plan::report::deployed(stage.previous_manifest(), release, &plan, &needs, all)
            }
            None => flip_plan::report::deployed(
                stage.previous_manifest(),
                stage.manifest(),
                stage.plan(),
                stage.needs(),
                all,
            ),
        };
        let mut pieces = c.items.chunks(CHANGES_PER_FRAME).peekable();
        loop {
            let items = pieces.next().unwrap_or_default().to_vec();
            let last = pieces.peek().is_none();
            tx.send(&Response::Changes {
                counts: c.counts,
                items,
                last,
            })?;
            if last {
                break;
            }
        }
        tx.flush()?;
        Ok(())
    }

    /// `Discard`: removes release `id`, only if this session committed it and it is not live.
    fn discard(&mut self, id: u64) -> Result<Response> {
        if self.discardable != Some(id) {
            return Err(RelError::BadRequest(format!(
                "release {id} was not committed by this session, or was made live: it is not discarded"
            ))
            .into());
        }
        let root = self.root(false)?;
        root.discard(self.locked()?, id)?;
        self.discardable = None;
        // A target this session created holds nothing else: it is undone at the end.
        self.committed = false;
        self.log(serde_json::json!({
            "time": now(), "event": "discard", "release": id,
        }));
        Ok(Response::Discarded { id })
    }

    /// `CheckLive`: the live release's id when it is the manifest `digest`'s and intact (then
    /// the writable directories under `shared/` are made now: no release will be).
    fn check_live(&mut self, digest: flip_manifest::Digest) -> Result<Response> {
        let root = self.root(false)?;
        self.locked()?;
        let mut id = root.live_intact(&digest)?;
        // Owners are not in a manifest: a live release whose writable directories are not
        // owned as `writable_owner` now wants is not this deploy's (a new one is made, its
        // directories given that owner).
        if let (Some(live), Some(settings)) = (id, &self.shared) {
            if let Err(why) = settings.release_owned(root, live) {
                root.warn(why);
                id = None;
            }
        }
        // No release will be made: the writable directories under shared/ are made now.
        if let (Some(_), Some(settings)) = (id, &self.shared) {
            settings.writable_only(root)?;
        }
        self.live_intact = id;
        Ok(Response::LiveIntact { id })
    }

    /// Answers `Bye`: the session ends as the client meant it to.
    fn say_bye(&mut self, tx: &mut FrameWriter) -> Result<()> {
        self.bye = true;
        // With the answers before it and the stream's end: one write (`coalesce`).
        self.holder.hold(|| {
            tx.send(&Response::Bye)?;
            tx.flush()
        })?;
        Ok(())
    }

    /// `EndIfLive` ends the session: the last `CheckLive` found the live release intact, it is
    /// still live, and this session has staged, committed and switched nothing since.
    fn unchanged_live(&mut self) -> Result<bool> {
        let Some(id) = self.live_intact else {
            return Ok(false);
        };
        if self.stage.is_some()
            || self.streaming.is_some()
            || self.committed
            || self.previous_live.is_some()
        {
            return Ok(false);
        }
        let root = self.root(false)?;
        self.locked()?;
        Ok(root.current()? == Some(id))
    }

    /// `Shared`: checks this deploy's shared-path settings against `shared/` and keeps them
    /// for the stage and the commit.
    fn set_shared(
        &mut self,
        dirs: Vec<RelPath>,
        files: Vec<RelPath>,
        writable: Vec<RelPath>,
        mode: u32,
        owner: Option<String>,
    ) -> Result<Response> {
        let root = self.root(false)?;
        let lock = self.locked()?;
        if self.stage.is_some() {
            return Err(AgentError::Protocol("Shared after Stage".into()));
        }
        let settings = shared::Settings::check(root, lock, dirs, files, writable, mode, owner)?;
        let present = settings.present.iter().cloned().collect();
        self.shared = Some(settings);
        Ok(Response::SharedState { present })
    }

    /// `Hook`: runs a hook in committed release `release`, forwarding its output, and answers
    /// how it ended.
    fn hook(
        &mut self,
        release: u64,
        run: String,
        timeout_ms: u64,
        env: Vec<String>,
        wait_ms: u64,
        tx: &mut FrameWriter,
    ) -> Result<Response> {
        let root = self.root(false)?;
        self.locked()?;
        let hook = hooks::Hook::checked(run, timeout_ms, env).map_err(RelError::BadRequest)?;
        // A committed release of this root: its metadata and a real directory.
        root.info(release)?;
        let previous = match self.previous_live {
            Some(p) => p,
            None => root.current()?,
        };
        // What a hook wrote into the release is not tampering, however it ended (its client
        // gone mid-hook included: it is killed, and what it wrote stays): recorded after the
        // last hook of this phase (`record_hook_writes`), or when the session ends.
        if self.hook_writes.as_ref().map(|h| h.0) != Some(release) {
            // What differed before (an edit a `--force` switch made live) is not the hooks'.
            self.hook_writes = Some((release, root.hook_baseline(release)));
        }
        let done =
            hooks::run(&hook, &root.release_dir(release), release, previous, tx).map_err(|e| {
                match e {
                    hooks::HookError::Client(w) => AgentError::Wire(w),
                    e => AgentError::Hook(e.to_string()),
                }
            })?;
        // The client's other targets may still run hooks: do not give up on it.
        hooks::wait_at_least(Duration::from_millis(wait_ms.min(7 * 24 * 3600 * 1000)));
        if let Response::HookDone {
            status,
            signal,
            timed_out,
            duration_ms,
        } = &done
        {
            self.log(serde_json::json!({
                "time": now(), "event": "hook", "release": release,
                "run": hook.run, "status": status, "signal": signal,
                "timed_out": timed_out, "duration_ms": duration_ms,
            }));
        }
        Ok(done)
    }

    /// Records what the hooks wrote into release [`Session::hook_writes`], if any (a lock is
    /// held: hooks ran under it).
    fn record_hook_writes(&mut self) {
        if let (Some((id, before)), Some(root), Some(lock)) =
            (self.hook_writes.take(), self.root, self.lock.as_ref())
        {
            root.record_hook_writes(lock, id, &before);
        }
    }

    /// Compares the client's directory hashes with the live release's.
    fn probe(&mut self, items: Vec<ProbeItem>) -> Result<Response> {
        self.locked()?;
        if items.len() > flip_manifest::MAX_ENTRIES {
            return Err(RelError::BadRequest("probe too large".into()).into());
        }
        if self.tree.is_none() {
            let root = self.root(false)?;
            // A client probing ahead of the status: nothing live (or a live manifest that
            // cannot be read, which the status does not list either), nothing the same.
            let absent = Response::Probed(vec![flip_wire::ProbeState::Absent; items.len()]);
            let Some(live) = root.current()? else {
                return Ok(absent);
            };
            let Ok(m) = root.manifest(live) else {
                return Ok(absent);
            };
            self.tree = Some((live, flip_manifest::DirTree::new(&m)));
        }
        let (_, tree) = self.tree.as_ref().expect("set above");
        let states = items
            .iter()
            .map(|it| tree.compare(&it.dir, &it.flat, &it.merkle).into())
            .collect();
        Ok(Response::Probed(states))
    }

    fn stage(
        &mut self,
        rx: &mut FrameReader,
        label: Option<String>,
        base: StageBase,
        payload_len: u64,
        digest: flip_manifest::Digest,
    ) -> Result<Response> {
        // Nothing the client sends is read or decoded before it holds the lock.
        self.locked()?;
        // A stage the client left unused (staged ahead against a release it no longer takes
        // for the live one) is replaced, as long as nothing was sent into it.
        if self.stage.is_some() && self.pool.is_none() && self.incoming.is_none() {
            self.stage = None;
        }
        if self.stage.is_some() {
            return Err(AgentError::Protocol(
                "a release is already being staged".into(),
            ));
        }
        if payload_len > MAX_MANIFEST {
            return Err(RelError::BadRequest(format!(
                "manifest of {payload_len} bytes exceeds the limit of {MAX_MANIFEST}"
            ))
            .into());
        }
        if label
            .as_ref()
            .is_some_and(|l| l.len() > 1024 || l.contains('\0'))
        {
            return Err(RelError::BadRequest("label too long or contains NUL".into()).into());
        }
        let bytes = read_payload(rx, payload_len)?;
        let root = self.root(false)?;
        let known = self
            .prepared
            .as_ref()
            .and_then(|p| Some((p.previous()?, p.previous_manifest()?)));
        let (manifest, got, live_manifest) = rebuild_manifest(root, base, &bytes, known)?;
        if got != digest {
            return Err(RelError::BadRequest("manifest does not match its digest".into()).into());
        }
        drop(bytes);
        let commit = match &self.shared {
            Some(settings) => Some(settings.commit_for(&manifest)?),
            None => None,
        };
        let prepared = self.prepared.take().filter(|p| {
            root.current()
                .ok()
                .flatten()
                .is_some_and(|id| p.previous() == Some(id))
        });
        let mut stage = match (self.streaming.take(), prepared) {
            // A first deploy whose files came ahead: they must be this manifest's.
            (Some(streamed), _) => self.adopt_streamed(streamed, manifest, label, &base)?,
            (None, Some(mut stage)) => {
                stage.restage(manifest, label)?;
                stage
            }
            (None, None) => root.stage_after(self.locked()?, manifest, label, live_manifest)?,
        };
        if let Some(c) = commit {
            stage.set_shared(c)?;
        }
        // Refuse up front (the stage is dropped, so removed) content that cannot fit.
        check_space(root.path(), &stage)?;
        // Links and copies of the release as recorded: a seed's files go to shared/.
        let (mut linked, mut copied) = (stage.stats().linked, stage.stats().copied);
        if let Some((_, map)) = stage.release_files() {
            for (f, _) in stage
                .plan()
                .files
                .iter()
                .zip(map)
                .filter(|(_, m)| m.is_none())
            {
                match f.source {
                    flip_plan::Source::Link(_) => linked = linked.saturating_sub(1),
                    flip_plan::Source::Copy(_) => copied = copied.saturating_sub(1),
                    flip_plan::Source::Transfer { .. } => {}
                }
            }
        }
        let resp = Response::Staged {
            id: stage.id(),
            previous: stage.previous(),
            needs: needs_of(&stage),
            linked,
            copied,
            removed: stage.plan().stats.removed,
        };
        self.stage = Some(Arc::new(stage));
        Ok(resp)
    }

    /// `Prepare`: stages the live release again while the client's `Stage` is on its way
    /// (see [`Request::Prepare`] for when). Whatever goes wrong here is left to the `Stage`
    /// to meet and report: a prepared stage that fails is dropped (removed).
    fn prepare(&mut self, base: Option<flip_manifest::Digest>, rx: &FrameReader) -> Result<()> {
        let root = self.root(false)?;
        let lock = self.locked()?;
        if self.stage.is_some()
            || self.prepared.is_some()
            || self.streaming.is_some()
            || self.live_intact.is_some()
            || input_waiting(rx)
        {
            return Ok(());
        }
        // The answers so far leave before the work: the client may be waiting for them.
        if !self.holder.deferring() {
            self.holder.release().map_err(WireError::Io)?;
        }
        let Ok(Some(id)) = root.current() else {
            return Ok(());
        };
        let Ok(manifest) = root.manifest(id) else {
            return Ok(());
        };
        if base.is_some_and(|d| d != manifest.digest()) {
            return Ok(());
        }
        // Until the client's next request (its stage) is there to read.
        if let Ok(Some(stage)) = root.prepare(lock, (id, manifest), &stdin_readable) {
            self.prepared = Some(stage);
        }
        Ok(())
    }

    /// Hands a chunk of file `index` (literal bytes, or a delta or patch applied into its
    /// staging file as it arrives) to the writers; the file is checked and closed when `last`.
    /// The encoded bytes of one file are limited to what an encoding of its manifest size can
    /// plausibly take, its output to the manifest size.
    fn content(
        &mut self,
        index: u32,
        kind: Kind,
        mtime: Mtime,
        data: Vec<u8>,
        last: bool,
    ) -> Result<()> {
        let stage = self.staged()?.clone();
        let pool = writers(&mut self.pool)?;
        let mut inc = match self.incoming.take() {
            None => {
                let size = stage
                    .plan()
                    .files
                    .get(index as usize)
                    .map(|f| f.size)
                    .ok_or_else(|| {
                        RelError::BadRequest(format!("file #{index} is not awaiting content"))
                    })?;
                let (how, limit, weight) = match &kind {
                    // The writer refuses bytes beyond the manifest size.
                    Kind::Literal => (How::Literal, u64::MAX, 0),
                    Kind::Encoded(basis, enc) => {
                        // Only against the basis this agent offered for the file.
                        let basis_size = match stage.basis_of(index as usize) {
                            Some((b, n)) if b == *basis => n,
                            _ => {
                                return Err(RelError::BadRequest(format!(
                                    "file #{index}: {basis} is not the basis offered for it"
                                ))
                                .into())
                            }
                        };
                        // An encoding never needs much more than the file it builds.
                        let limit = size.saturating_add(size / 8).saturating_add(1 << 20);
                        match enc {
                            Encoding::Rsync => {
                                (How::Delta(basis.clone()), limit, DELTA_WORKING_MEMORY)
                            }
                            // The decoder's window (up to the file size) and the basis.
                            Encoding::Patch(d) => (
                                How::Patch(basis.clone(), *d),
                                limit,
                                size.min(1 << flip_release::PATCH_WINDOW_LOG_MAX)
                                    + basis_size.min(flip_release::PATCH_BASIS_IN_MEMORY),
                            ),
                        }
                    }
                };
                pool.start(&stage, index as usize, how, weight);
                Incoming {
                    index,
                    kind,
                    got: 0,
                    limit,
                }
            }
            Some(inc) if inc.index == index && inc.kind == kind => inc,
            Some(_) => return Err(interrupted(index)),
        };
        drop(stage);
        inc.got += data.len() as u64;
        if inc.got > inc.limit {
            return Err(RelError::BadRequest(format!(
                "encoded content for file #{index} is larger than {} bytes",
                inc.limit
            ))
            .into());
        }
        pool.chunk(data, last, mtime);
        if !last {
            self.incoming = Some(inc);
        }
        Ok(())
    }

    /// What [`Request::BasisSignatures`] signs: each needed file with a basis the stage offered
    /// that a client without old content sends as an rsync delta
    /// ([`flip_plan::report::choose`]), ascending.
    fn delta_items(&self) -> Result<Vec<flip_wire::SigItem>> {
        let stage = self.staged()?;
        let files = &stage.plan().files;
        Ok(stage
            .needs()
            .iter()
            .filter_map(|&i| {
                let (basis, basis_size) = stage.basis_of(i)?;
                let size = files.get(i)?.size;
                let via = flip_plan::report::choose(size, Some(basis_size), false);
                (via == flip_plan::report::Via::Delta).then_some(flip_wire::SigItem {
                    index: i as u32,
                    basis,
                })
            })
            .collect())
    }

    /// Streams the signatures of the delta bases a client asks for. Each item must name a
    /// file this stage needs, once, with the basis the agent offered for it, so the request
    /// is bounded by the plan; a basis shared by several files is signed once. Signatures are
    /// made a few at a time (at most [`SIG_BATCH_BYTES`] of bases) and sent as they are made.
    fn signatures(&mut self, items: Vec<flip_wire::SigItem>, tx: &mut FrameWriter) -> Result<()> {
        let stage = self.staged()?;
        let needs = stage.needs();
        if items.len() > needs.len() {
            return Err(RelError::BadRequest(format!(
                "{} signatures asked for, but only {} files are being transferred",
                items.len(),
                needs.len()
            ))
            .into());
        }
        let mut seen = std::collections::HashSet::with_capacity(items.len());
        // (basis, its size, the files that want it)
        let mut by_basis: std::collections::BTreeMap<RelPath, (u64, Vec<u32>)> = Default::default();
        for it in items {
            if needs.binary_search(&(it.index as usize)).is_err() {
                return Err(RelError::BadRequest(format!(
                    "signature asked for file #{} which is not being transferred",
                    it.index
                ))
                .into());
            }
            if !seen.insert(it.index) {
                return Err(RelError::BadRequest(format!(
                    "signature asked twice for file #{}",
                    it.index
                ))
                .into());
            }
            match stage.basis_of(it.index as usize) {
                Some((b, size)) if b == it.basis => by_basis
                    .entry(b)
                    .or_insert((size, Vec::new()))
                    .1
                    .push(it.index),
                _ => {
                    return Err(RelError::BadRequest(format!(
                        "file #{}: {} is not the basis offered for it",
                        it.index, it.basis
                    ))
                    .into())
                }
            }
        }
        drop(seen);
        let stage = &**stage;
        let bases: Vec<(RelPath, (u64, Vec<u32>))> = by_basis.into_iter().collect();
        let mut start = 0;
        while start < bases.len() {
            let mut end = start;
            let mut bytes = 0u64;
            while end < bases.len() && (end == start || bytes + bases[end].1 .0 <= SIG_BATCH_BYTES)
            {
                bytes += bases[end].1 .0;
                end += 1;
            }
            let sigs: Vec<Result<Vec<u8>, RelError>> = bases[start..end]
                .par_iter()
                .map(|(b, _)| stage.signature(b))
                .collect();
            for ((_, (_, indexes)), sig) in bases[start..end].iter().zip(sigs) {
                let sig = sig?;
                for &index in indexes {
                    tx.send(&Response::Signature {
                        index,
                        sig: sig.clone(),
                    })?;
                }
            }
            start = end;
        }
        Ok(())
    }
}

/// What `stage` needs from the client, as `Staged` says it (the basis where one is offered).
fn needs_of(stage: &Stage<'_>) -> Vec<Need> {
    stage
        .needs()
        .iter()
        .map(|&i| Need {
            index: i as u32,
            basis: stage.basis_of(i),
        })
        .collect()
}

// The patch window the client may use is the one the stage accepts.
const _: () = assert!(flip_wire::PATCH_WINDOW_LOG_MAX == flip_release::PATCH_WINDOW_LOG_MAX);

/// Free space kept on the target's filesystem beyond what a release's new content needs: 5% of
/// the filesystem, at most 64 MiB.
pub const SPACE_MARGIN: u64 = 64 << 20;

/// Fails with [`RelError::NotEnoughSpace`] when the content `stage` still needs, plus a margin
/// ([`SPACE_MARGIN`]), does not fit in the space available (to this user) on the filesystem
/// holding `root`: refused before any content is sent rather than at the first full write.
fn check_space(root: &Path, stage: &Stage) -> Result<()> {
    let files = &stage.plan().files;
    let need = stage
        .needs()
        .iter()
        .fold(0u64, |n, &i| n.saturating_add(files[i].size));
    check_free(root, need, || {
        stage
            .needs()
            .iter()
            .max_by_key(|&&i| files[i].size)
            .map(|&i| format!("{}, {} bytes", files[i].path, files[i].size))
    })
}

/// Refuses `need` bytes of new content that do not fit in the free space of the filesystem of
/// `root` (keeping [`SPACE_MARGIN`], at most 5% of it, in reserve); `largest` names the
/// largest file for the error, when it is known.
fn check_free(root: &Path, need: u64, largest: impl FnOnce() -> Option<String>) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(root.as_os_str().as_bytes()) else {
        return Ok(());
    };
    // SAFETY: statvfs fills the zeroed struct we own from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above: `c` is NUL-terminated and `st` is ours.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        // Unknown free space: writing will tell.
        return Ok(());
    }
    let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    let total = (st.f_blocks as u64).saturating_mul(st.f_frsize as u64);
    let margin = SPACE_MARGIN.min(total / 20);
    if need.saturating_add(margin) > free {
        return Err(RelError::NotEnoughSpace {
            largest: largest(),
            need,
            free,
            margin,
        }
        .into());
    }
    Ok(())
}

/// Working memory of a writer applying an rsync delta (its copy buffer and the file's).
const DELTA_WORKING_MEMORY: u64 = 1 << 20;

/// Bytes of delta bases signed at once (in parallel) before their signatures are sent.
const SIG_BATCH_BYTES: u64 = 256 << 20;

fn interrupted(index: u32) -> AgentError {
    AgentError::Protocol(format!(
        "content for file #{index} arrived while another file was incomplete"
    ))
}

/// Whether nothing is at `path` (not even a symlink).
fn gone(path: &Path) -> bool {
    // Only the kind of the error is looked at: no message to name the path in.
    #[allow(clippy::disallowed_methods)]
    std::fs::symlink_metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leading_tilde_is_a_home_directory() {
        let home = PathBuf::from(std::env::var_os("HOME").expect("HOME is set"));
        let root_home = passwd_home(Some("root")).expect("root has a home");
        let p = |s: &str| home_expanded(Path::new(s));
        assert_eq!(p("~"), home);
        assert_eq!(p("~/"), home);
        assert_eq!(p("~/sites/app"), home.join("sites/app"));
        assert_eq!(p("~root"), root_home);
        assert_eq!(p("~root/app"), root_home.join("app"));
        // Left as written: no such user, a tilde elsewhere, absolute and relative paths.
        for s in [
            "~no-such-user-flip/app",
            "app~",
            "a/~/b",
            "/srv/~app",
            "app",
            "./~",
        ] {
            assert_eq!(p(s), PathBuf::from(s), "{s}");
        }
    }
}
