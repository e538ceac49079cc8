//! The client side of flip's protocol: a [`Session`] with one agent, and the deploy that runs a
//! plan over it.
//!
//! A deploy costs a fixed number of round trips whatever the file count: the client stages the
//! new manifest, the agent answers with the files it cannot link or copy from the live release,
//! the client asks for rsync signatures of the changed files it wants to send as deltas (one
//! request for all of them), then streams every file's content — deltas for changed files,
//! literal bytes for new ones — and commits. Reading, hashing and delta computation run in
//! parallel (rayon) while the main thread writes frames, so the connection stays busy.

#![warn(missing_docs, unreachable_pub)]

mod ahead;
mod cache;
mod content;
mod stream;

pub use ahead::patch_ahead;
pub use cache::{ContentCache, ManifestCache, CONTENT_MAX_FILE};
pub use content::{local_delta, patch, DELTA_WINDOW, PATCH_MAX};

use flip_manifest::{Digest, EntryKind, Manifest, RelPath};
use flip_transport::{AgentStream, Finish, TransportError};
use flip_wire::{
    ErrorClass, FrameReader, FrameWriter, Holder, Leftover, Need, ProbeItem, ReleaseSummary,
    Request, Response, SigItem, StageBase, WireError, CHUNK, MAGIC, PROTOCOL,
};
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use flip_plan::report::{Changes, Counts, Item, Planned, Sent, Via};
pub use flip_plan::DELTA_MIN;

/// Why a session with an agent failed. Messages name the target (its peer name) once.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The agent's error, after the target it concerns (unless the message already names it).
    #[error("{}", named_once(peer, message))]
    Remote {
        /// The peer, as `user@host` or a local description.
        peer: String,
        /// What kind of failure the agent reported.
        class: ErrorClass,
        /// The agent's message, naming the path and cause.
        message: String,
    },
    /// The connection to the agent broke.
    #[error("{peer}: connection failed while {phase}")]
    Wire {
        /// The peer, as `user@host` or a local description.
        peer: String,
        /// What the session was doing ("sending file content", ...).
        phase: &'static str,
        /// The underlying error.
        source: WireError,
    },
    /// The stream to the agent could not be opened or ended badly.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A source file could not be read.
    #[error("cannot read {path}: {source}")]
    Source {
        /// The source file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A source file (path) changed while it was being sent.
    #[error("{0} changed while flip was deploying it: something writes into the source directory; deploy a source that stays unchanged during the deploy")]
    SourceChanged(String),
    /// The agent answered something the protocol does not allow here.
    #[error("{peer}: protocol error while {phase}: {message}")]
    Protocol {
        /// The peer, as `user@host` or a local description.
        peer: String,
        /// What the session was doing ("sending file content", ...).
        phase: &'static str,
        /// What the agent sent that was not allowed.
        message: String,
    },
}

/// This crate's result.
pub type Result<T, E = TransferError> = std::result::Result<T, E>;

/// `PEER: MESSAGE`, or the message alone when it already names the peer (a local target's
/// path), so no message names the same path twice.
fn named_once(peer: &str, message: &str) -> String {
    match peer_prefix(peer, message) {
        Some(p) => format!("{p}: {message}"),
        None => message.to_string(),
    }
}

/// What to put before `message` about `peer` (a target as `Target::display` names it: a local
/// path, `[user@]host:path` or `ssh://[user@]host:port/path`) so the line names the target,
/// and each path, once: nothing when the message names the target already (a local target's
/// path in the agent's error), the `[user@]host` (`[user@]host:port`) alone when it names the
/// target's path (`web1: /srv/app is not a directory`), else the whole `peer`.
pub fn peer_prefix<'p>(peer: &'p str, message: &str) -> Option<&'p str> {
    if peer.is_empty() || message.contains(peer) {
        return None;
    }
    // An SSH target, read by the parser that reads the command line (its path with the URL's
    // %-escapes decoded, as messages name it): its host part is what comes before the path.
    let Ok(Some(t)) = flip_transport::ssh::parse_target(peer) else {
        return Some(peer);
    };
    let host = match peer.strip_prefix("ssh://") {
        Some(rest) => rest.find('/').map(|i| &rest[..i]),
        None => peer
            .strip_suffix(t.path.as_str())
            .and_then(|h| h.strip_suffix(':')),
    };
    match host {
        Some(host) if t.path.len() > 1 && message.contains(&t.path) => {
            // Already `host: /path ...` (an error this function prefixed before).
            let named = message.starts_with(host) && message[host.len()..].starts_with(": ");
            (!named).then_some(host)
        }
        _ => Some(peer),
    }
}

/// What a deploy did, for the summary and `--json`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeployReport {
    /// The release made.
    pub release: u64,
    /// The release live before, if any.
    pub previous: Option<u64>,
    /// Regular files in the release.
    pub files: u64,
    /// Files hard-linked from the previous release.
    pub linked: u64,
    /// Files copied on the target from content it had.
    pub copied: u64,
    /// Of `copied`: unchanged files the plan meant to hard-link from the live release that the
    /// target copied into a new inode instead (their inode there was not as recorded, or the
    /// kernel refused the link; the agent's warning says which and why).
    pub not_linked: u64,
    /// Files sent as rsync deltas or zstd patches.
    pub delta: u64,
    /// Files sent whole.
    pub literal: u64,
    /// Files of the previous release not in this one.
    pub removed: u64,
    /// Bytes of files sent whole (before compression).
    pub literal_bytes: u64,
    /// Bytes the target already had: linked and copied files, and the unchanged parts of
    /// delta-transferred files.
    pub matched_bytes: u64,
    /// Bytes of delta instructions and patches sent (before stream compression).
    pub delta_bytes: u64,
    /// Changed files sent as zstd patches against the old version in the content cache (also
    /// counted in `delta`).
    pub patched: u64,
    /// What the release changes and how each file went, counted (the same classification as
    /// `flip diff` and `flip deploy --dry-run`, with what this deploy really did).
    pub counts: Counts,
    /// Every changed path, in manifest order, when the deploy was asked to itemize; else only
    /// the files the target made it deviate from the plan for.
    pub items: Vec<Item>,
    /// How each file whose content was sent went, in the order sent.
    pub sent: Vec<Sent>,
}

/// The agent's answer to `flip doctor`, with this client's clock (Unix milliseconds) just
/// before the request was sent and just after the answer arrived.
#[derive(Clone, Debug)]
pub struct DoctorAnswer {
    /// What the agent found, in the order it looked.
    pub findings: Vec<flip_wire::Finding>,
    /// The agent's clock when it answered, in Unix milliseconds.
    pub agent_ms: i64,
    /// This client's clock just before the request was sent, in Unix milliseconds.
    pub sent_ms: i64,
    /// This client's clock just after the answer arrived, in Unix milliseconds.
    pub received_ms: i64,
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How a hook ended on the target ([`Session::hook`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookEnd {
    /// Its exit status; `None` when a signal ended it.
    pub status: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Killed because it ran longer than its timeout.
    pub timed_out: bool,
    /// How long it ran, in milliseconds (measured by the agent).
    pub duration_ms: u64,
}

impl HookEnd {
    /// Exited with status 0 within its timeout.
    pub fn succeeded(&self) -> bool {
        self.status == Some(0) && !self.timed_out
    }
}

/// An open session with an agent.
///
/// Every request fails with [`TransferError::Remote`] when the agent reports an error (its
/// class says which kind), [`TransferError::Wire`] when the connection breaks, and
/// [`TransferError::Protocol`] when the agent answers out of turn; those are the `# Errors` of
/// each method unless it says more.
pub struct Session {
    rx: FrameReader,
    tx: FrameWriter,
    handle: Option<Box<dyn Finish>>,
    peer: String,
    /// What the session is doing, for errors: "sending file content", ...
    phase: &'static str,
    /// Warnings the agent sent (see [`Response::Notices`]), not yet taken.
    warnings: Vec<String>,
    /// What the agent last said it could not remove (`None`: it never said).
    leftovers: Option<Vec<Leftover>>,
    /// How far the content of [`Session::stage`] has gone, for progress lines.
    meter: SendMeter,
    /// The agent's host name, as its `Welcome` said (`flip doctor` shows it; known once the
    /// first answer was read).
    pub agent_host: String,
    /// The target root as the agent resolved it (absolute, symlinks resolved when it exists),
    /// as its `Welcome` said; known once the first answer was read. With
    /// [`agent_host`](Session::agent_host), what names one target however it was written.
    pub agent_root: String,
    /// The agent's `Welcome` was read (the client does not wait for it: it pipelines what
    /// follows `Hello`); the answers are zstd from then on when `compress` is not 0.
    welcomed: bool,
    compress: i32,
    /// Frames were flushed since the client last read an answer.
    unanswered: bool,
    /// Frames were queued and not flushed yet (flushed before the next answer is read).
    queued: bool,
    /// Round trips so far: times the client waited for an answer after sending all it could.
    round_trips: u64,
    /// The probe answered ahead of the stage ([`Session::queue_probe`]): the manifest probed
    /// (its digest) and the state of each of its directories.
    probed: Option<(Digest, HashMap<String, flip_manifest::DirState>)>,
    /// Directories of the probe queued ahead, awaiting [`Session::probe_answer`].
    probing: Option<(Digest, Vec<String>)>,
    /// One round trip to the agent's host, as the transport timed it ([`AgentStream::round_trip`]).
    round_trip: Option<std::time::Duration>,
    /// With [`Session::defer_commit`]: `stage` queues `Commit` without reading its answer.
    defer_commit: bool,
    /// With [`Session::report_release`]: the release recorded, whose files the report counts.
    report_release: Option<std::sync::Arc<Manifest>>,
    /// An `Activate` was queued: the agent may hold the answer to a `Commit` before it until
    /// the activation is done (`coalesce`), so a session that ends while the client waits for
    /// that answer may have ended in either.
    activate_queued: bool,
    /// A `Stage` queued ahead of the status ([`Session::stage_ahead`]).
    ahead: Option<Ahead>,
    /// The agent took the content sent ahead ([`Session::stage_ahead`]): `Commit`,
    /// `ActivateCommitted`, `Prune` and `Bye` went with it.
    took_ahead: bool,
    /// Every file sent whole ([`Session::send_whole_files`]).
    whole_files: bool,
    /// What was written so far may go in the agent's command line ([`AgentStream::seal`]);
    /// `None` once sealed.
    seal: Option<flip_transport::Seal>,
}

/// A `Stage` queued before the client knew the live release: of the manifest of `digest`, as a
/// difference against the manifest of `base`, with the old digests of the paths it changes.
struct Ahead {
    digest: Digest,
    base: Digest,
    old_digests: HashMap<RelPath, Digest>,
    /// The content sent after it ([`Session::stage_ahead`]).
    content: Option<SentAhead>,
}

/// What [`Session::stage_ahead`] needs to send the content with the stage: the source, the
/// content cache (old versions to patch against) and the releases to keep.
pub struct ContentAhead<'a> {
    /// The source directory.
    pub source: &'a Path,
    /// The content cache, if any.
    pub cache: Option<&'a ContentCache>,
    /// Releases kept by the `Prune` sent with it.
    pub keep: u32,
}

/// Answers read at most, after a failed write, to find the agent's error: the answers to one
/// batch before the request that failed (a lock, a status, a stage and its changes, probes).
const AFTER_FAILURE_MAX: usize = 1 << 16;

/// Content sent ahead of the stage's answer, for the needs the client expected.
struct SentAhead {
    /// [`flip_wire::needs_digest`] of the needs it was sent for.
    needs: Digest,
    /// What the send filled in of the report (how each file went, bytes).
    report: DeployReport,
    /// How the send policy picked each file, and its basis (the report's notes).
    planned: Chosen,
    /// Bytes of the files sent (before encoding).
    content_bytes: u64,
}

/// How far a session's file content has gone, for progress lines: atomics the sender updates
/// as it goes (per file, and per piece of a large file) and whoever holds a clone reads on its
/// own schedule (no callback, no lock).
#[derive(Clone, Debug, Default)]
pub struct SendMeter {
    counts: Arc<MeterCounts>,
    /// Raw bytes written to the connection (after compression).
    wire: flip_wire::Counter,
}

#[derive(Debug, Default)]
struct MeterCounts {
    files: AtomicU64,
    bytes: AtomicU64,
    done_files: AtomicU64,
    done_bytes: AtomicU64,
}

impl SendMeter {
    /// (files, bytes) of content the stage sends, as file sizes (before delta and compression):
    /// (0, 0) until the agent said what it needs.
    pub fn total(&self) -> (u64, u64) {
        let c = &self.counts;
        (c.files.load(Relaxed), c.bytes.load(Relaxed))
    }

    /// (files, bytes) of [`SendMeter::total`] handled so far (sent, or prepared and queued).
    pub fn done(&self) -> (u64, u64) {
        let c = &self.counts;
        (c.done_files.load(Relaxed), c.done_bytes.load(Relaxed))
    }

    /// Bytes written to the connection so far (compressed), the whole session.
    pub fn wire_bytes(&self) -> u64 {
        self.wire.get()
    }

    fn set_total(&self, files: u64, bytes: u64) {
        self.counts.files.store(files, Relaxed);
        self.counts.bytes.store(bytes, Relaxed);
    }

    /// `n` more bytes of the file being sent.
    pub(crate) fn add_bytes(&self, n: u64) {
        self.counts.done_bytes.fetch_add(n, Relaxed);
    }

    /// One more file done, `rest` of its bytes not yet counted by [`SendMeter::add_bytes`].
    pub(crate) fn add_file(&self, rest: u64) {
        self.counts.done_bytes.fetch_add(rest, Relaxed);
        self.counts.done_files.fetch_add(1, Relaxed);
    }
}

impl Session {
    /// Handshake over a fresh stream; `compress` is the zstd level (0 = off,
    /// [`flip_wire::ADAPTIVE`]: chosen from the link, told to the agent as 3).
    ///
    /// # Errors
    /// As any request (see [`Session`]), and [`TransferError::Protocol`] when the agent speaks
    /// another protocol version.
    pub fn open(stream: AgentStream, compress: i32) -> Result<Session> {
        let tx = FrameWriter::new(stream.writer);
        let meter = SendMeter {
            counts: Arc::default(),
            wire: tx.counter(),
        };
        let mut s = Session {
            rx: FrameReader::new(stream.reader),
            tx,
            meter,
            handle: Some(stream.handle),
            peer: stream.peer,
            phase: "greeting the agent",
            warnings: Vec::new(),
            leftovers: None,
            agent_host: String::new(),
            agent_root: String::new(),
            welcomed: false,
            compress,
            unanswered: false,
            queued: false,
            round_trips: 0,
            probed: None,
            probing: None,
            report_release: None,
            defer_commit: false,
            activate_queued: false,
            ahead: None,
            took_ahead: false,
            whole_files: false,
            seal: Some(stream.seal),
            round_trip: stream.round_trip,
        };
        s.queue(&Request::Hello {
            magic: MAGIC,
            protocol: PROTOCOL,
            version: env!("CARGO_PKG_VERSION").to_string(),
            compress: if compress == flip_wire::ADAPTIVE {
                flip_wire::adapt::START_LEVEL
            } else {
                compress
            },
        })?;
        // The client alone decides the compression: what follows `Hello` is zstd at once, so
        // it is pipelined without waiting for `Welcome` (read with the first answer). `Hello`
        // leaves with the first batch, in one piece (over SSH, in the agent's command line).
        if compress != 0 {
            // zstd's own threads, as many as rayon's (one per core), up to 4: on a fast link,
            // compression is what a first deploy waits on.
            s.tx.set_workers(rayon::current_num_threads().min(4) as u32);
            s.tx.start_compression(compress)
                .map_err(|e| TransferError::Wire {
                    peer: s.peer.clone(),
                    phase: "starting compression",
                    source: e,
                })?;
        }
        Ok(s)
    }

    /// Reads the agent's `Welcome` (plain), checks its protocol and starts decompressing what
    /// follows. An agent that refused the `Hello` answers an error instead, returned as it came.
    fn welcome(&mut self) -> std::result::Result<Option<Response>, WireError> {
        self.welcomed = true;
        match self.rx.recv::<Response>()? {
            Response::Welcome {
                protocol,
                version,
                host,
                root,
            } => {
                if protocol != PROTOCOL {
                    return Ok(Some(Response::Error {
                        class: ErrorClass::Protocol,
                        message: format!(
                            "agent flip {version} speaks protocol {protocol}, this client {PROTOCOL}"
                        ),
                    }));
                }
                self.agent_host = host;
                self.agent_root = root;
                if self.compress != 0 {
                    self.rx.start_decompression()?;
                }
                Ok(None)
            }
            other => Ok(Some(other)),
        }
    }

    /// Round trips so far beyond opening the connection: each time the client waited for an
    /// answer after having sent everything it could (the `Hello` counts with what was
    /// pipelined after it), counting the one whose answers are still awaited.
    pub fn round_trips(&self) -> u64 {
        self.round_trips + u64::from(self.queued || self.unanswered)
    }

    /// Sends what is queued now (e.g. `Lock`, so the agent takes it while the client scans);
    /// the answers are read later, in the same round trip.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn send_queued(&mut self) -> Result<()> {
        self.flush()
    }

    /// The agent's peer name, for messages ("local", "deploy@web1").
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// A handle on how far this session's content has gone (for progress lines).
    pub fn meter(&self) -> SendMeter {
        self.meter.clone()
    }

    /// (bytes sent, bytes received) on the raw connection so far.
    pub fn bytes(&self) -> (u64, u64) {
        (self.tx.counter().get(), self.rx.counter().get())
    }

    /// From now on every file to transfer goes whole (no patch, no rsync delta), as rsync's
    /// `--whole-file` does and, like rsync, for a target on this machine: over a pipe bytes
    /// cost less than making a patch or delta and applying it (which reads the basis too).
    pub fn send_whole_files(&mut self) {
        self.whole_files = true;
    }

    /// Whether every file goes whole ([`Session::send_whole_files`]): then a deploy keeps
    /// nothing in the content cache for this target (its only use is patches).
    pub fn whole_files(&self) -> bool {
        self.whole_files
    }

    /// The zstd level this client compresses with now (0: none; an adaptive level moves).
    pub fn compress_level(&self) -> i32 {
        self.tx.level()
    }

    fn wire(&self, source: WireError) -> TransferError {
        // The agent could not be started: the transport said why through the stream (see
        // `flip_transport::AgentStream`), and its error is kept as it is.
        let source = match source {
            WireError::Io(e) if e.get_ref().is_some_and(|i| i.is::<TransportError>()) => {
                match e.into_inner().map(|i| i.downcast::<TransportError>()) {
                    Some(Ok(t)) => return TransferError::Transport(*t),
                    Some(Err(i)) => WireError::Io(std::io::Error::other(i)),
                    None => unreachable!("checked to hold an error"),
                }
            }
            other => other,
        };
        // The connection broke: the transport may know why (the system ssh's own failure).
        let broke = match &source {
            WireError::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
            ),
            WireError::Closed => true,
            _ => false,
        };
        if let Some(t) = self.transport_failure().filter(|_| broke) {
            return TransferError::Transport(t);
        }
        TransferError::Wire {
            peer: self.peer.clone(),
            phase: self.phase,
            source,
        }
    }

    /// The transport's account of a broken connection, if it has one ([`Finish::failure`]).
    fn transport_failure(&self) -> Option<TransportError> {
        self.handle.as_ref().and_then(|h| h.failure())
    }

    fn protocol(&self, message: String) -> TransferError {
        TransferError::Protocol {
            peer: self.peer.clone(),
            phase: self.phase,
            message,
        }
    }

    fn unexpected(&self, r: &Response) -> TransferError {
        match r {
            Response::NotDone { request, because } => TransferError::Remote {
                peer: self.peer.clone(),
                class: ErrorClass::Protocol,
                message: format!("{request} not done because {because}"),
            },
            Response::Error { class, message } => TransferError::Remote {
                peer: self.peer.clone(),
                class: *class,
                message: message.clone(),
            },
            other => self.protocol(format!("unexpected answer {}", <&str>::from(other))),
        }
    }

    /// Queues a frame. If the agent hung up, its last word (an error frame) is what the user
    /// needs to see, not the broken pipe.
    fn queue(&mut self, req: &Request) -> Result<()> {
        // Looked at only until sealed: not for every content frame.
        if let Some(seal) = self.seal.take_if(|_| !shown_safely(req)) {
            // What the batch holds so far leaves now, so the transport can take it.
            self.tx.flush().map_err(|e| self.agent_error_or(e))?;
            seal();
        }
        self.queued = true;
        match self.tx.send(req) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.agent_error_or(e)),
        }
    }

    fn send(&mut self, req: &Request) -> Result<()> {
        self.queue(req)?;
        self.flush()
    }

    /// Sends what was queued: the batch the next answer read waits for.
    fn flush(&mut self) -> Result<()> {
        self.unanswered = true;
        self.queued = false;
        self.tx.flush().map_err(|e| self.agent_error_or(e))
    }

    /// A failed send's error: the agent's own, when it said why before it stopped reading.
    fn agent_error_or(&mut self, e: WireError) -> TransferError {
        // The answers to what came before the failed request come first (at most what one
        // batch asks, and the `NotDone`s are not read: the error precedes them).
        for _ in 0..AFTER_FAILURE_MAX {
            match self.answer() {
                Ok(r @ Response::Error { .. }) => return self.unexpected(&r),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        self.wire(e)
    }

    /// The next message of the agent that is not a notice (notices are kept, see
    /// [`Session::take_warnings`] and [`Session::leftovers`]).
    fn answer(&mut self) -> std::result::Result<Response, WireError> {
        if std::mem::take(&mut self.unanswered) {
            self.round_trips += 1;
        }
        if !self.welcomed {
            if let Some(refused) = self.welcome()? {
                return Ok(refused);
            }
        }
        loop {
            match self.rx.recv::<Response>()? {
                Response::Notices {
                    warnings,
                    leftovers,
                } => self.note(warnings, leftovers),
                r => return Ok(r),
            }
        }
    }

    fn note(&mut self, warnings: Vec<String>, leftovers: Option<Vec<Leftover>>) {
        for w in warnings {
            if !self.warnings.contains(&w) {
                self.warnings.push(w);
            }
        }
        if leftovers.is_some() {
            self.leftovers = leftovers;
        }
    }

    /// The agent's warnings received since the last call (problems that did not stop it).
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// What the agent could not remove, as it last said (`None`: it never said).
    pub fn leftovers(&self) -> Option<&[Leftover]> {
        self.leftovers.as_deref()
    }

    fn recv(&mut self) -> Result<Response> {
        if self.queued {
            self.flush()?;
        }
        match self.answer() {
            Ok(r @ Response::Error { .. }) => Err(self.unexpected(&r)),
            Ok(r) => Ok(r),
            Err(WireError::Closed) => Err(match self.transport_failure() {
                Some(t) => TransferError::Transport(t),
                None => self.protocol("the agent ended the session".into()),
            }),
            Err(e) => Err(self.wire(e)),
        }
    }

    /// Takes the target's deploy lock. With `wait`, `on_wait` hears who holds it.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn lock(
        &mut self,
        holder: Holder,
        wait: bool,
        on_wait: &mut dyn FnMut(&str),
    ) -> Result<()> {
        self.queue_lock(holder, wait)?;
        self.locked(on_wait)
    }

    /// Queues `Lock` (sent with what follows, see [`Session::locked`] for its answer).
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_lock(&mut self, holder: Holder, wait: bool) -> Result<()> {
        self.phase = "taking the deploy lock";
        self.queue(&Request::Lock { wait, holder })
    }

    /// The answer to a queued `Lock`; `on_wait` hears who holds the lock when the wait starts
    /// and whenever another holder takes over (the agent repeats an unchanged holder every few
    /// seconds, which is how it finds out that nobody reads: those are not passed on).
    ///
    /// # Errors
    /// See [`Session`].
    pub fn locked(&mut self, on_wait: &mut dyn FnMut(&str)) -> Result<()> {
        self.locked_unless(on_wait, &|_| false).map(|_| ())
    }

    /// [`Session::locked`], giving up the wait when `give_up` says so: it is asked at each of
    /// the agent's `Waiting` answers (when the wait starts, and every few seconds while it
    /// lasts), given this session (its `Welcome` read). Returns whether the lock was taken;
    /// after `false` the session is of no more use (the agent still waits for the lock until
    /// it is closed).
    ///
    /// # Errors
    /// See [`Session`].
    pub fn locked_unless(
        &mut self,
        on_wait: &mut dyn FnMut(&str),
        give_up: &dyn Fn(&Session) -> bool,
    ) -> Result<bool> {
        self.phase = "taking the deploy lock";
        let mut last = None;
        loop {
            match self.recv()? {
                Response::Locked => return Ok(true),
                Response::Waiting { holder } => {
                    if last.as_ref() != Some(&holder) {
                        on_wait(&holder);
                        last = Some(holder);
                    }
                    if give_up(self) {
                        return Ok(false);
                    }
                }
                other => return Err(self.unexpected(&other)),
            }
        }
    }

    /// The live release and every complete release.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn status(&mut self) -> Result<(Option<u64>, Vec<ReleaseSummary>)> {
        self.queue_status()?;
        self.status_answer()
    }

    /// Queues `Status` (its answer: [`Session::status_answer`]).
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_status(&mut self) -> Result<()> {
        self.queue(&Request::Status)
    }

    /// The answer to a queued `Status`: the live release and every complete release.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn status_answer(&mut self) -> Result<(Option<u64>, Vec<ReleaseSummary>)> {
        self.phase = "reading the target's status";
        match self.recv()? {
            Response::Status { current, releases } => Ok((current, releases)),
            other => Err(self.unexpected(&other)),
        }
    }

    /// A release's manifest, fetched from the agent.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn manifest(&mut self, id: u64) -> Result<Manifest> {
        self.queue_manifest(id)?;
        self.manifest_answer()
    }

    /// Queues `GetManifest` of release `id` (its answer: [`Session::manifest_answer`]).
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_manifest(&mut self, id: u64) -> Result<()> {
        self.queue(&Request::GetManifest { id })
    }

    /// The answer to a queued `GetManifest`: the release's manifest.
    ///
    /// # Errors
    /// See [`Session`]; [`TransferError::Protocol`] for a manifest that does not decode.
    pub fn manifest_answer(&mut self) -> Result<Manifest> {
        self.phase = "fetching a manifest";
        let mut bytes = Vec::new();
        loop {
            match self.recv()? {
                Response::ManifestChunk { data, last } => {
                    bytes.extend_from_slice(&data);
                    if last {
                        break;
                    }
                }
                other => return Err(self.unexpected(&other)),
            }
        }
        flip_manifest::decode(&bytes)
            .map_err(|e| self.protocol(format!("the agent sent a bad manifest: {e}")))
    }

    /// Builds a release of `manifest` on the target from the files under `source`. When the
    /// client knows the live release's manifest (`previous`), only the difference is sent; when
    /// the live manifest's digest (`live_digest`, from [`Session::status`]) equals the new one,
    /// nothing is.
    /// With `itemize`, the report lists every changed path ([`DeployReport::items`]).
    /// Returns once the release is committed (complete and durable, not yet live).
    ///
    /// # Errors
    /// As any request (see [`Session`]), [`TransferError::Source`] for a source file that
    /// cannot be read and [`TransferError::SourceChanged`] for one that changed meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub fn stage(
        &mut self,
        source: &Path,
        manifest: &Manifest,
        previous: Option<Manifest>,
        label: Option<String>,
        content_cache: Option<&ContentCache>,
        live_digest: Option<flip_manifest::Digest>,
        itemize: bool,
    ) -> Result<DeployReport> {
        self.phase = "staging the release";
        let digest = manifest.digest();
        // Staged ahead of the status against the live release the client expected: its
        // answer, unless that release is no longer live (then staged now, as below). The
        // agent staged it only against the live release's own manifest, which it checked:
        // taken whatever the status could list (a live release whose record is damaged is
        // not listed, and staging again could not do better).
        let mut sent_ahead = None;
        let ahead = match self.ahead.take() {
            Some(a) if a.digest == digest && live_digest.is_none_or(|d| d == a.base) => {
                let got = self.ahead_answer()?;
                match (&got, a.content) {
                    (Some(_), content) => sent_ahead = content,
                    // Not staged: neither was the content taken.
                    (None, Some(_)) => self.ahead_refused()?,
                    (None, None) => {}
                }
                got.map(|r| (r, a.old_digests))
            }
            Some(a) => {
                self.ahead = Some(a);
                self.drop_ahead()?;
                None
            }
            None => None,
        };
        // A client without the live manifest sends rsync deltas only: the agent knows which
        // files those are once it staged, and signs their bases in the stage's round trip.
        let mut signed_ahead = false;
        let (staged, old_digests) = match ahead {
            Some(got) => got,
            None => {
                let (base, payload, old_digests) =
                    self.describe(manifest, previous, live_digest)?;
                signed_ahead = matches!(base, StageBase::Dirs(_)) && !self.whole_files;
                self.queue_stage(label, base, &payload, (digest, None), itemize)?;
                if signed_ahead {
                    self.queue(&Request::BasisSignatures)?;
                }
                self.flush()?;
                (self.recv()?, old_digests)
            }
        };
        let mut report = DeployReport {
            files: manifest.file_count() as u64,
            ..Default::default()
        };
        let needs = match staged {
            Response::Staged {
                id,
                previous,
                needs,
                linked,
                copied,
                removed,
            } => {
                report.release = id;
                report.previous = previous;
                report.linked = linked;
                report.copied = copied;
                report.removed = removed;
                needs
            }
            other => return Err(self.unexpected(&other)),
        };
        // Without an itemized list the agent names only files it needs; with one, at most every
        // path of the new release, and every path of the old one as removed.
        let limit = if itemize {
            manifest.len() + flip_manifest::MAX_ENTRIES
        } else {
            needs.len()
        };
        // The agent takes content sent ahead when the stage needs exactly it (the same rule).
        let (taken, refused) = match sent_ahead {
            Some(sent) if sent.needs == flip_wire::needs_digest(&needs) => (Some(sent), false),
            Some(_) => (None, true),
            None => (None, false),
        };
        let changes = self.changes(limit)?;
        if let Some(sent) = taken {
            self.took_ahead = true;
            return Ok(self.report_ahead(report, sent, changes, manifest));
        }
        if refused {
            self.ahead_refused()?;
        }
        let (jobs, planned) = self.jobs(manifest, needs, &old_digests, content_cache)?;
        let content_bytes = jobs.iter().map(|j| j.size).sum::<u64>();
        self.meter.set_total(jobs.len() as u64, content_bytes);
        report.matched_bytes = manifest.total_bytes() - content_bytes;
        self.phase = "fetching delta signatures";
        let sigs = match signed_ahead {
            true => self.signature_answers(&jobs)?,
            false => self.signatures(&jobs)?,
        };
        self.phase = "sending file content";
        content::send(self, source, &jobs, sigs, content_cache, &mut report)?;
        drop(jobs);
        self.phase = "committing the release";
        let release = self.report_release.take();
        let to_release = release.as_deref().map(|r| release_indexes(manifest, r));
        explain(&mut report, changes, planned, to_release);
        if self.defer_commit {
            self.queue(&Request::Commit)?;
            return Ok(report);
        }
        self.send(&Request::Commit)?;
        self.committed(report.release)?;
        Ok(report)
    }

    /// Queues `Stage` with its payload, and `Changes` (the agent answers it right after
    /// `Staged`: no round trip of its own); `ahead`: the digest of the needs whose content
    /// follows (see [`Session::stage_ahead`]).
    fn queue_stage(
        &mut self,
        label: Option<String>,
        base: StageBase,
        payload: &[u8],
        (digest, ahead): (Digest, Option<Digest>),
        itemize: bool,
    ) -> Result<()> {
        self.queue(&Request::Stage {
            label,
            base,
            payload_len: payload.len() as u64,
            digest,
            ahead,
        })?;
        for c in payload.chunks(CHUNK) {
            self.queue(&Request::ManifestChunk(c.to_vec()))?;
        }
        self.queue(&Request::Changes { all: itemize })
    }

    /// Queues the `Stage` of `manifest` as a difference against `live` (the manifest of the
    /// release this client expects live: the one it last deployed to this target), before
    /// the status says what is live: a [`Session::stage`] of `manifest` against that release
    /// then takes no round trip of its own. When another release is live, the agent answers
    /// it [`Response::NotDone`] and the session goes on (`stage` stages as usual; any other
    /// path reads that answer with [`Session::drop_ahead`]).
    ///
    /// With `content`, it also sends, without waiting for any answer, the content of the files
    /// the stage needs if the target is as this client left it (the plan from `live` to
    /// `manifest`, every basis offered), then queues `Commit`, `ActivateCommitted`,
    /// `Prune { keep }` and `Bye` (see `Stage`'s `ahead`): a whole upgrade in the first
    /// batch. Not when that content needs rsync signatures (a file whose old version is not in
    /// the content cache goes as a delta): then only the stage is queued. [`Session::stage`]
    /// reads the answers; when the agent took the content ([`Session::took_ahead`]) read
    /// [`Session::committed`], [`Session::activated`], [`Session::pruned`] and
    /// [`Session::closed`] next, else the deploy goes on as usual.
    ///
    /// # Errors
    /// See [`Session`]; with `content`, [`TransferError::Source`] for a source file that
    /// cannot be read and [`TransferError::SourceChanged`] for one that changed meanwhile.
    pub fn stage_ahead(
        &mut self,
        manifest: &Manifest,
        live: &Manifest,
        label: Option<String>,
        itemize: bool,
        content: Option<ContentAhead<'_>>,
    ) -> Result<()> {
        self.phase = "staging the release";
        let digest = manifest.digest();
        let base = live.digest();
        let (_, payload, old_digests) = self.describe(manifest, Some(live.clone()), Some(base))?;
        let jobs = match &content {
            Some(c) => self.jobs_ahead(manifest, live, &old_digests, c.cache)?,
            None => None,
        };
        let stage = (digest, jobs.as_ref().map(|(_, _, needs)| *needs));
        self.queue_stage(label, StageBase::Diff(base), &payload, stage, itemize)?;
        let sent = match (jobs, content) {
            (Some((jobs, planned, needs)), Some(c)) => {
                let content_bytes = jobs.iter().map(|j| j.size).sum::<u64>();
                self.meter.set_total(jobs.len() as u64, content_bytes);
                let mut report = DeployReport::default();
                self.phase = "sending file content";
                content::send(self, c.source, &jobs, HashMap::new(), c.cache, &mut report)?;
                drop(jobs);
                for r in [
                    Request::Commit,
                    Request::ActivateCommitted,
                    Request::Prune { keep: c.keep },
                    Request::Bye,
                ] {
                    self.queue(&r)?;
                }
                self.activate_queued = true;
                Some(SentAhead {
                    needs,
                    report,
                    planned,
                    content_bytes,
                })
            }
            _ => None,
        };
        self.ahead = Some(Ahead {
            digest,
            base,
            old_digests,
            content: sent,
        });
        Ok(())
    }

    /// The jobs of the content a stage of `manifest` against `live` needs when the target is
    /// as this client left it, how each goes, and [`flip_wire::needs_digest`] of those needs
    /// (the agent's plan, every basis offered); `None` when one of them would go as an rsync
    /// delta (its signature is a round trip).
    #[allow(clippy::type_complexity)]
    fn jobs_ahead<'m>(
        &self,
        manifest: &'m Manifest,
        live: &Manifest,
        old_digests: &'m HashMap<RelPath, Digest>,
        cache: Option<&ContentCache>,
    ) -> Result<Option<(Vec<content::Job<'m>>, Chosen, Digest)>> {
        let plan = flip_plan::plan(Some(live), manifest);
        let needs: Vec<Need> = plan
            .transfers()
            .map(|(i, step)| Need {
                index: i as u32,
                basis: match &step.source {
                    flip_plan::Source::Transfer { basis: Some(b) } => match live.get(b) {
                        Some(EntryKind::File { size, .. }) => Some((b.clone(), *size)),
                        _ => None,
                    },
                    _ => None,
                },
            })
            .collect();
        let digest = flip_wire::needs_digest(&needs);
        let (jobs, planned) = self.jobs(manifest, needs, old_digests, cache)?;
        if jobs.iter().any(|j| j.basis.is_some()) {
            return Ok(None);
        }
        Ok(Some((jobs, planned, digest)))
    }

    /// Whether the agent took the content sent ahead ([`Session::stage_ahead`]): the commit,
    /// activation, prune and bye are on their way.
    pub fn took_ahead(&self) -> bool {
        self.took_ahead
    }

    /// Reads the `NotDone`s of what was queued after content the agent did not take, up to
    /// `Bye`.
    fn ahead_refused(&mut self) -> Result<()> {
        loop {
            match self.recv()? {
                Response::NotDone { request, .. } if request == "Bye" => break,
                Response::NotDone { .. } => {}
                other => return Err(self.unexpected(&other)),
            }
        }
        self.activate_queued = false;
        Ok(())
    }

    /// The report of a stage whose content went ahead: `staged` says what the agent linked
    /// and copied, `sent` how the content went.
    fn report_ahead(
        &mut self,
        staged: DeployReport,
        sent: SentAhead,
        changes: Changes,
        manifest: &Manifest,
    ) -> DeployReport {
        let mut report = DeployReport {
            release: staged.release,
            previous: staged.previous,
            files: staged.files,
            linked: staged.linked,
            copied: staged.copied,
            removed: staged.removed,
            // The send counted what patches and deltas found in place.
            matched_bytes: manifest.total_bytes() - sent.content_bytes + sent.report.matched_bytes,
            ..sent.report
        };
        self.phase = "committing the release";
        explain(&mut report, changes, sent.planned, None);
        report
    }

    /// The agent's answer to the stage queued ahead: `Staged`, or `None` when it was not done
    /// (another release is live; its `Changes` was not done either, and both answers are read).
    fn ahead_answer(&mut self) -> Result<Option<Response>> {
        match self.recv_or_not_done()? {
            Some(r) => Ok(Some(r)),
            None => match self.recv_or_not_done()? {
                None => Ok(None),
                Some(other) => Err(self.unexpected(&other)),
            },
        }
    }

    /// Reads the answers to a stage queued ahead and not used (the live release was not the
    /// one expected, or the tree is unchanged), if any. A stage the agent did make is left
    /// unfinished: the agent removes it when the session ends.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn drop_ahead(&mut self) -> Result<()> {
        let Some(ahead) = self.ahead.take() else {
            return Ok(());
        };
        if let Some(r) = self.ahead_answer()? {
            let Response::Staged { needs, .. } = &r else {
                return Err(self.unexpected(&r));
            };
            if ahead
                .content
                .as_ref()
                .is_some_and(|c| c.needs == flip_wire::needs_digest(needs))
            {
                return Err(self.protocol(
                    "the agent took content sent ahead for a release this deploy does not make"
                        .into(),
                ));
            }
            self.changes(usize::MAX)?;
        }
        if ahead.content.is_some() {
            self.ahead_refused()?;
        }
        Ok(())
    }

    /// The next answer, `None` when it is [`Response::NotDone`] for a stage ahead.
    fn recv_or_not_done(&mut self) -> Result<Option<Response>> {
        match self.recv()? {
            Response::NotDone { request, .. } if request == "Stage" || request == "Changes" => {
                Ok(None)
            }
            r => Ok(Some(r)),
        }
    }

    /// From now on [`Session::stage`] queues `Commit` and returns without its answer, so what
    /// follows (`Activate`, `Prune`, `Bye`) goes in the same round trip; read it with
    /// [`Session::committed`] before their answers.
    pub fn defer_commit(&mut self) {
        self.defer_commit = true;
    }

    /// The next [`Session::stage`] reports on `release`, the release the agent records, rather
    /// than on the staged manifest: they differ when shared paths are seeded (the seeds' files
    /// are staged and sent, then moved into `shared/`, a symlink left in their place). The
    /// agent lists the changes of `release` too; the files sent are counted among its files
    /// (a seed's are sent, in the bytes, but not counted).
    pub fn report_release(&mut self, release: std::sync::Arc<Manifest>) {
        self.report_release = Some(release);
    }

    /// The answer to `Commit`: release `id` is committed.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn committed(&mut self, id: u64) -> Result<()> {
        self.phase = match self.activate_queued {
            true => "committing or activating the release",
            false => "committing the release",
        };
        match self.recv()? {
            Response::Committed { id: got } if got == id => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Queues the directory hashes of `manifest`, every directory at once, before the client
    /// knows whether it will need them (a client without the live manifest, ahead of the
    /// status): [`Session::probe_answer`] reads the answers, and a `stage` of that manifest
    /// against the live release then needs no probe round trip of its own.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_probe(&mut self, manifest: &Manifest) -> Result<()> {
        let tree = flip_manifest::DirTree::new(manifest);
        let all = self.queue_probe_of(&tree)?;
        self.probing = Some((manifest.digest(), all));
        Ok(())
    }

    /// Reads the answers to [`Session::queue_probe`].
    ///
    /// # Errors
    /// See [`Session`].
    pub fn probe_answer(&mut self) -> Result<()> {
        self.phase = "comparing directories";
        if let Some((digest, all)) = self.probing.take() {
            let states = self.probe_states(&all)?;
            self.probed = Some((digest, states));
        }
        Ok(())
    }

    /// Queues `Probe` frames for every directory of `tree` (at most [`PROBE_PER_FRAME`] each);
    /// returns the directories, in the order sent.
    fn queue_probe_of(&mut self, tree: &flip_manifest::DirTree) -> Result<Vec<String>> {
        let (all, frames) = probe_requests(tree);
        for f in &frames {
            self.queue(f)?;
        }
        Ok(all)
    }

    /// Reads the `Probed` answers for the directories `all` (as queued).
    fn probe_states(&mut self, all: &[String]) -> Result<HashMap<String, flip_manifest::DirState>> {
        let mut states = HashMap::with_capacity(all.len());
        for piece in all.chunks(PROBE_PER_FRAME) {
            match self.recv()? {
                Response::Probed(s) if s.len() == piece.len() => {
                    states.extend(piece.iter().cloned().zip(s.into_iter().map(Into::into)));
                }
                other => return Err(self.unexpected(&other)),
            }
        }
        Ok(states)
    }

    /// How a `Stage` describes `manifest` (its [`StageBase`] and payload), as cheaply as the
    /// client can: an empty diff for an unchanged tree, a diff against the live manifest the
    /// client knows (`previous`), the directories that differ (found by probing), or the
    /// whole manifest. Also the digests the live release holds at the paths that change or go
    /// (the bases a patch can have); the rest of the live manifest is dropped here.
    fn describe(
        &mut self,
        manifest: &Manifest,
        previous: Option<Manifest>,
        live_digest: Option<Digest>,
    ) -> Result<(StageBase, Vec<u8>, HashMap<RelPath, Digest>)> {
        let digest = manifest.digest();
        let mut old_digests: HashMap<RelPath, Digest> = HashMap::new();
        let (base, payload) = match previous {
            // Unchanged tree (a no-op, or a fresh checkout of the same commit): an empty
            // difference, even for a client that never saw the live manifest.
            _ if live_digest == Some(digest) => (
                StageBase::Diff(digest),
                flip_manifest::encode_diff(&Default::default()),
            ),
            Some(prev) => {
                let diff = prev.diff(manifest);
                let touched = diff
                    .removed
                    .iter()
                    .chain(diff.upserts.iter().map(|e| &e.path));
                for p in touched {
                    if let Some(EntryKind::File { digest, .. }) = prev.get(p) {
                        old_digests.insert(p.clone(), *digest);
                    }
                }
                (
                    StageBase::Diff(prev.digest()),
                    flip_manifest::encode_diff(&diff),
                )
            }
            // Something live the client has not seen: find the changed directories by their
            // hashes (a few round trips, a few bytes per directory looked at) instead of
            // sending the whole manifest.
            None => match live_digest {
                Some(live) => {
                    self.phase = "comparing directories";
                    let tree = flip_manifest::DirTree::new(manifest);
                    let dirs = self.changed_dirs(manifest, &tree)?;
                    self.phase = "staging the release";
                    (
                        StageBase::Dirs(live),
                        flip_manifest::encode_dir_patch(&tree.patch(manifest, &dirs)),
                    )
                }
                None => (StageBase::Whole, flip_manifest::encode(manifest)),
            },
        };
        Ok((base, payload, old_digests))
    }

    /// The content to send for the files the agent `needs` (ascending indexes into the
    /// manifest's regular files), each the way [`send_policy`] picks; and, by index, what was
    /// picked and the basis the agent offered (for the report's notes).
    fn jobs<'m>(
        &self,
        manifest: &'m Manifest,
        needs: Vec<flip_wire::Need>,
        old_digests: &'m HashMap<RelPath, Digest>,
        content_cache: Option<&ContentCache>,
    ) -> Result<(Vec<content::Job<'m>>, Chosen)> {
        // Indexes count the manifest's regular files in order; the needs come in that order.
        let mut files = manifest.files().enumerate();
        let mut jobs = Vec::with_capacity(needs.len());
        // What the rule chose for each needed file, and the basis the agent offered.
        let mut planned = Chosen::new();
        for n in needs {
            let index = n.index as usize;
            let Some((_, (path, _, size, digest))) = files
                .find(|(i, _)| *i >= index)
                .filter(|(i, _)| *i == index)
            else {
                return Err(self.protocol("the agent asked for files out of range or order".into()));
            };
            // The old version in the local content cache: a patch, no signature needed. Only
            // against a basis the agent offered: it offers none it did not find intact (and
            // refuses a patch against one), so a damaged basis makes the file go whole.
            let old = n
                .basis
                .as_ref()
                .and_then(|(b, _)| Some((b.clone(), old_digests.get(b)?)));
            let cached = in_cache(content_cache, old.as_ref().map(|(_, d)| *d));
            let via = send_policy(
                size,
                n.basis.as_ref().map(|b| b.1),
                cached,
                self.whole_files,
            );
            planned.insert(index as u32, (via, n.basis.as_ref().map(|b| b.0.clone())));
            let patch = old.filter(|_| via == Via::Patch);
            let basis = n.basis.filter(|_| via == Via::Delta).map(|(b, _)| b);
            jobs.push(content::Job {
                index,
                path,
                size,
                digest,
                basis,
                patch,
            });
        }
        Ok((jobs, planned))
    }

    /// Receives the answer to [`Request::Changes`] (at most `limit` items, in order).
    fn changes(&mut self, limit: usize) -> Result<Changes> {
        let mut out = Changes::default();
        loop {
            match self.recv()? {
                Response::Changes {
                    counts,
                    items,
                    last,
                } => {
                    if out.items.len() + items.len() > limit {
                        return Err(self.protocol("the agent listed too many changes".into()));
                    }
                    out.counts = counts;
                    // How files went is this client's to count (in `settle`), not the agent's.
                    let f = &mut out.counts.files;
                    (f.literal, f.delta, f.patched, f.resent) = (0, 0, 0, 0);
                    out.items.extend(items);
                    if last {
                        break;
                    }
                }
                other => return Err(self.unexpected(&other)),
            }
        }
        if !out.items.windows(2).all(|w| w[0].path <= w[1].path) {
            return Err(self.protocol("the agent listed changes out of order".into()));
        }
        Ok(out)
    }

    /// Walks down the directory tree comparing hashes with the live release, one round trip per
    /// level, and returns the directories whose direct entries differ (or are new).
    fn changed_dirs(
        &mut self,
        manifest: &Manifest,
        tree: &flip_manifest::DirTree,
    ) -> Result<BTreeSet<String>> {
        // Answered ahead (with the status), or every directory now, all sent before any answer.
        let states = match self.probed.take() {
            Some((d, states)) if d == manifest.digest() => states,
            _ => {
                let all = self.queue_probe_of(tree)?;
                self.probe_states(&all)?
            }
        };
        // The same walk as one level per round trip, answered from what came back.
        tree.walk_changed(|level| {
            Ok::<_, TransferError>(
                level
                    .iter()
                    .map(|(d, _, _)| {
                        states
                            .get(d)
                            .copied()
                            .unwrap_or(flip_manifest::DirState::Absent)
                    })
                    .collect(),
            )
        })
    }

    /// Fetches the rsync signatures of every delta basis, in one round trip.
    fn signatures(&mut self, jobs: &[content::Job]) -> Result<HashMap<usize, Vec<u8>>> {
        let items: Vec<SigItem> = jobs
            .iter()
            .filter_map(|j| {
                j.basis.as_ref().map(|b| SigItem {
                    index: j.index as u32,
                    basis: b.clone(),
                })
            })
            .collect();
        if items.is_empty() {
            return Ok(HashMap::new());
        }
        self.send(&Request::Signatures(items))?;
        self.signature_answers(jobs)
    }

    /// Reads `Signature`s up to `SignaturesDone`: one for each of the `jobs` with a delta
    /// basis, and no other. Also the answers to the `BasisSignatures` queued with a stage: the
    /// agent signed the bases of the files a client without old content sends as deltas, by
    /// the rule that made `jobs` ([`send_policy`]), so exactly the jobs with a basis.
    fn signature_answers(&mut self, jobs: &[content::Job]) -> Result<HashMap<usize, Vec<u8>>> {
        let want: std::collections::HashSet<usize> = jobs
            .iter()
            .filter(|j| j.basis.is_some())
            .map(|j| j.index)
            .collect();
        let mut out = HashMap::with_capacity(want.len());
        loop {
            match self.recv()? {
                Response::Signature { index, sig } if want.contains(&(index as usize)) => {
                    out.insert(index as usize, sig);
                }
                Response::SignaturesDone if out.len() == want.len() => return Ok(out),
                other => return Err(self.unexpected(&other)),
            }
        }
    }

    /// Points `current` at `id`; returns the release that was live before. A release this
    /// session did not commit is refused when it changed since it was committed
    /// ([`Request::Activate`]).
    ///
    /// # Errors
    /// See [`Session`].
    pub fn activate(&mut self, id: u64) -> Result<Option<u64>> {
        self.queue_activate(id, false)?;
        self.activated()
    }

    /// Queues `Activate` of `id` (its answer: [`Session::activated`]); `force`: even if it
    /// changed since it was committed.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_activate(&mut self, id: u64, force: bool) -> Result<()> {
        self.activate_queued = true;
        self.queue(&Request::Activate { id, force })
    }

    /// The answer to a queued `Activate`: the release live before.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn activated(&mut self) -> Result<Option<u64>> {
        self.phase = "activating the release";
        match self.recv()? {
            Response::Activated { previous, .. } => Ok(previous),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Queues `Check` of release `id` (its answer: [`Session::checked`]): would `Activate`
    /// of it pass its check?
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_check(&mut self, id: u64) -> Result<()> {
        self.queue(&Request::Check { id })
    }

    /// The answer to a queued `Check`: `Ok` when the release may be made live as it is; the
    /// agent's refusal (the release changed since it was committed, or is missing) otherwise.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn checked(&mut self) -> Result<()> {
        self.phase = "checking the release";
        match self.recv()? {
            Response::Checked { .. } => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Queues `CanDeploy` (its answer: [`Session::deployable`]).
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_can_deploy(&mut self) -> Result<()> {
        self.queue(&Request::CanDeploy)
    }

    /// The answer to a queued `CanDeploy`: whether the root is a target already (`false`: a
    /// deploy would make it one); the error a deploy would fail with otherwise.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn deployable(&mut self) -> Result<bool> {
        self.phase = "checking the target";
        match self.recv()? {
            Response::Deployable { exists } => Ok(exists),
            other => Err(self.unexpected(&other)),
        }
    }

    /// The live release's id when it holds exactly the manifest of `digest` and is intact (see
    /// [`Request::CheckLive`]); `None` otherwise.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn live_intact(&mut self, digest: Digest) -> Result<Option<u64>> {
        self.queue_live_intact(digest)?;
        self.live_intact_answer()
    }

    /// One round trip to the agent's host as the transport timed it when connecting
    /// ([`AgentStream::round_trip`]); `None` where it did not.
    pub fn round_trip(&self) -> Option<std::time::Duration> {
        self.round_trip
    }

    /// Queues a `Prepare` (see [`Request::Prepare`]): the stage queued after it goes against
    /// the live release whose manifest has the digest `base` (or whatever is live), and reaches
    /// the agent only a while after this (over SSH, a round trip after the agent started).
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_prepare(&mut self, base: Option<Digest>) -> Result<()> {
        self.queue(&Request::Prepare { base })
    }

    /// Queues `CheckLive` for `digest` (its answer: [`Session::live_intact_answer`]).
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_live_intact(&mut self, digest: Digest) -> Result<()> {
        self.queue(&Request::CheckLive { digest })
    }

    /// The answer to a queued `CheckLive`.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn live_intact_answer(&mut self) -> Result<Option<u64>> {
        self.phase = "checking the live release";
        match self.recv()? {
            Response::LiveIntact { id } => Ok(id),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Queues `EndIfLive` (see [`Request::EndIfLive`]), behind a queued `CheckLive`: if that
    /// finds the live release intact, the agent prunes to `keep` releases and ends the session.
    /// Its answer: [`Session::end_if_live_answer`].
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_end_if_live(&mut self, keep: u32) -> Result<()> {
        self.queue(&Request::EndIfLive { keep })
    }

    /// The answer to a queued `EndIfLive`: `Some(ids pruned)` when the session ended (its
    /// `Bye` follows: read it with [`Session::closed`]), `None` when it goes on.
    ///
    /// # Errors
    /// The agent's error when pruning failed (the session then ends with [`Session::closed`],
    /// whose error says nothing new); otherwise see [`Session`].
    pub fn end_if_live_answer(&mut self) -> Result<Option<Vec<u64>>> {
        self.phase = "pruning old releases";
        match self.recv()? {
            Response::Pruned { removed } => Ok(Some(removed)),
            Response::NotDone { request, .. } if request == "EndIfLive" => Ok(None),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Tells the agent this deploy's shared paths (see [`Request::Shared`]) and returns the ones
    /// `shared/` already has; an `Err` (the agent's, naming the path) when one there is of
    /// another kind. `owner`: `user` or `user:group` for writable directories.
    ///
    /// # Errors
    /// The agent's error when a shared path under `shared/` is of another kind than listed, or
    /// the settings are refused; otherwise see [`Session`].
    pub fn shared(
        &mut self,
        paths: &flip_plan::shared::SharedPaths,
        owner: Option<&str>,
    ) -> Result<BTreeSet<RelPath>> {
        self.queue_shared(paths, owner)?;
        self.shared_answer()
    }

    /// Queues `Shared` (its answer: [`Session::shared_answer`]).
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_shared(
        &mut self,
        paths: &flip_plan::shared::SharedPaths,
        owner: Option<&str>,
    ) -> Result<()> {
        self.queue(&Request::Shared {
            dirs: paths.dirs.clone(),
            files: paths.files.clone(),
            writable: paths.writable.clone(),
            mode: paths.writable_mode,
            owner: owner.map(str::to_string),
        })
    }

    /// The answer to a queued `Shared`: the shared paths `shared/` already has.
    ///
    /// # Errors
    /// See [`Session`]; the agent's error names a shared path of another kind.
    pub fn shared_answer(&mut self) -> Result<BTreeSet<RelPath>> {
        self.phase = "checking the shared paths";
        match self.recv()? {
            Response::SharedState { present } => Ok(present.into_iter().collect()),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Removes release `id`, committed in this session and not made live (a multi-host deploy
    /// that failed on another target).
    ///
    /// # Errors
    /// See [`Session`].
    pub fn discard(&mut self, id: u64) -> Result<()> {
        self.phase = "discarding the release";
        self.send(&Request::Discard { id })?;
        match self.recv()? {
            Response::Discarded { id: got } if got == id => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Rolls back to `to` or to the newest release older than the live one: (new, previous).
    ///
    /// # Errors
    /// See [`Session`].
    pub fn rollback(&mut self, to: Option<u64>, force: bool) -> Result<(u64, Option<u64>)> {
        self.queue_rollback(to, force)?;
        self.rolled_back()
    }

    /// Queues `Rollback` (its answer: [`Session::rolled_back`]); `force`: even to a release
    /// that changed since it was committed.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_rollback(&mut self, to: Option<u64>, force: bool) -> Result<()> {
        self.queue(&Request::Rollback { to, force })
    }

    /// The answer to a queued `Rollback`: (new, previous).
    ///
    /// # Errors
    /// See [`Session`].
    pub fn rolled_back(&mut self) -> Result<(u64, Option<u64>)> {
        self.phase = "rolling back";
        match self.recv()? {
            Response::Activated { id, previous } => Ok((id, previous)),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Removes old releases, keeping the `keep` newest and the live one; returns the ids removed.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn prune(&mut self, keep: u32) -> Result<Vec<u64>> {
        self.queue_prune(keep)?;
        self.pruned()
    }

    /// Queues `Prune` (its answer: [`Session::pruned`]), e.g. to go with `Bye`.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_prune(&mut self, keep: u32) -> Result<()> {
        self.queue(&Request::Prune { keep })
    }

    /// The answer to a queued `Prune`: the ids removed.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn pruned(&mut self) -> Result<Vec<u64>> {
        self.phase = "pruning old releases";
        match self.recv()? {
            Response::Pruned { removed } => Ok(removed),
            other => Err(self.unexpected(&other)),
        }
    }

    /// `flip doctor`: what the agent finds on the target (read-only; no lock needed), with the
    /// clocks around the round trip for the skew check.
    ///
    /// # Errors
    /// See [`Session`] (an agent too old for `Doctor` answers with an error).
    pub fn doctor(&mut self) -> Result<DoctorAnswer> {
        self.phase = "asking the agent for its findings";
        let sent_ms = unix_ms();
        self.send(&Request::Doctor)?;
        match self.recv()? {
            Response::Findings { time_ms, findings } => Ok(DoctorAnswer {
                findings,
                agent_ms: time_ms,
                sent_ms,
                received_ms: unix_ms(),
            }),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Re-hashes a release on the target against its manifest: (id, problems).
    ///
    /// # Errors
    /// See [`Session`].
    pub fn verify(&mut self, id: Option<u64>) -> Result<(u64, Vec<String>)> {
        self.phase = "verifying a release";
        self.send(&Request::Verify { id })?;
        match self.recv()? {
            Response::Verified { id, problems } => Ok((id, problems)),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Runs a hook on the target ([`Request::Hook`]): `run` by `/bin/sh -c` inside release
    /// `release`, for at most `timeout_ms`; `env` are `NAME=VALUE` entries (`FLIP_TARGET`,
    /// `FLIP_ENV`); the agent waits at least `wait_ms` for the next request afterwards.
    /// `on_line` hears every line of output as it arrives. Returns how the hook ended (a
    /// failing hook is not an error here: the caller decides).
    ///
    /// # Errors
    /// The agent's error when it refuses the hook (release not committed, command or
    /// environment too long or not allowed, timeout over a day, no lock) or cannot start it;
    /// otherwise see [`Session`].
    pub fn hook(
        &mut self,
        release: u64,
        run: &str,
        timeout_ms: u64,
        env: Vec<String>,
        wait_ms: u64,
        on_line: &mut dyn FnMut(flip_wire::HookStream, &str),
    ) -> Result<HookEnd> {
        self.phase = "running a hook";
        self.send(&Request::Hook {
            release,
            run: run.to_string(),
            timeout_ms,
            env,
            wait_ms,
        })?;
        loop {
            match self.recv()? {
                Response::HookOutput { stream, line } => on_line(stream, &line),
                Response::HookDone {
                    status,
                    signal,
                    timed_out,
                    duration_ms,
                } => {
                    return Ok(HookEnd {
                        status,
                        signal,
                        timed_out,
                        duration_ms,
                    })
                }
                other => return Err(self.unexpected(&other)),
            }
        }
    }

    /// Says goodbye and waits for the agent to exit.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn close(mut self) -> Result<()> {
        self.queue_bye()?;
        self.closed()
    }

    /// Queues `Bye` after what is queued (e.g. a `Prune`, whose answer is read first); the
    /// session ends with [`Session::closed`].
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_bye(&mut self) -> Result<()> {
        self.phase = "closing the session";
        self.queue(&Request::Bye)
    }

    /// Reads the answer to a queued `Bye` and waits for the agent to exit.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn closed(mut self) -> Result<()> {
        self.phase = "closing the session";
        match self.recv()? {
            Response::Bye => {}
            other => return Err(self.unexpected(&other)),
        }
        let Session { tx, rx, handle, .. } = self;
        tx.finish().ok();
        drop(rx);
        if let Some(h) = handle {
            h.finish()?;
        }
        Ok(())
    }
}

/// Whether `req` may be seen by the server's other users, as the agent's command line is (an
/// SSH transport may put a session's first bytes there: [`AgentStream::seal`]): the handshake,
/// the lock (who deploys, from where), the status and the checks of what is live. File names
/// and content, manifests, directory hashes and hook commands are not.
fn shown_safely(req: &Request) -> bool {
    matches!(
        req,
        Request::Hello { .. }
            | Request::Lock { .. }
            | Request::Status
            | Request::CheckLive { .. }
            | Request::EndIfLive { .. }
            | Request::Prepare { .. }
            | Request::CanDeploy
            | Request::Doctor
            | Request::Bye
    )
}

/// Directories per `Probe` frame (a path of at most a few KiB each keeps a frame far below
/// [`flip_wire::MAX_FRAME`]).
const PROBE_PER_FRAME: usize = 4096;

/// The `Probe` frames of a client without the live manifest: every directory of `tree` (the
/// root first, then depth first), at most [`PROBE_PER_FRAME`] a frame, all sent at once; and
/// the directories in the order sent. For `flip diff`'s prediction too.
pub fn probe_requests(tree: &flip_manifest::DirTree) -> (Vec<String>, Vec<Request>) {
    let mut all = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(d) = stack.pop() {
        stack.extend_from_slice(tree.subdirs(&d));
        all.push(d);
    }
    let frames = all
        .chunks(PROBE_PER_FRAME)
        .map(|piece| {
            Request::Probe(
                piece
                    .iter()
                    .map(|d| {
                        let (flat, merkle) = tree.hashes(d).expect("a directory of this tree");
                        ProbeItem {
                            dir: d.clone(),
                            flat,
                            merkle,
                        }
                    })
                    .collect(),
            )
        })
        .collect();
    (all, frames)
}

/// By file index: how [`send_policy`] chose to send it, and the basis the agent offered.
type Chosen = HashMap<u32, (Via, Option<RelPath>)>;

/// Completes a deploy's report from the agent's classification (`changes`): a note on every
/// file sent otherwise than `planned`, the sent files in index order, and the counts, with the
/// stage's own link and copy tallies (a link can become a copy across filesystems).
/// For each regular file of `staged`, its index among the files of `release` (which holds a
/// subset of them, in the same order: the staged manifest less the seeds' files), `None` for
/// a file `release` does not have.
fn release_indexes(staged: &Manifest, release: &Manifest) -> Vec<Option<u32>> {
    let mut kept = release.files().map(|(p, ..)| p).enumerate().peekable();
    staged
        .files()
        .map(|(p, ..)| match kept.peek() {
            Some((i, q)) if *q == p => {
                let i = *i as u32;
                kept.next();
                Some(i)
            }
            _ => None,
        })
        .collect()
}

fn explain(
    report: &mut DeployReport,
    mut changes: Changes,
    mut planned: Chosen,
    to_release: Option<Vec<Option<u32>>>,
) {
    if let Some(map) = to_release {
        // The agent listed the release's changes: the files sent are counted by their index
        // in it, a seed's files not at all.
        let at = |i: u32| map.get(i as usize).copied().flatten();
        report.sent = std::mem::take(&mut report.sent)
            .into_iter()
            .filter_map(|mut s| {
                s.index = at(s.index)?;
                Some(s)
            })
            .collect();
        planned = planned
            .into_iter()
            .filter_map(|(i, v)| Some((at(i)?, v)))
            .collect();
    }
    let items_by_index: HashMap<u32, &Item> = changes
        .items
        .iter()
        .filter_map(|it| Some((it.file.as_ref()?.0, it)))
        .collect();
    for s in &mut report.sent {
        let (chosen, offered) = planned.remove(&s.index).unwrap_or((s.via, None));
        s.note = deviation(
            items_by_index.get(&s.index).copied(),
            chosen,
            offered,
            s.via,
        );
    }
    drop(items_by_index);
    report.sent.sort_by_key(|s| s.index);
    changes.settle(&report.sent);
    // Planned links not sent and not linked: copied by the target instead.
    report.not_linked = changes.counts.files.linked.saturating_sub(report.linked);
    changes.counts.files.linked = report.linked;
    changes.counts.files.copied = report.copied;
    report.counts = changes.counts;
    report.items = changes.items;
}

/// Why a sent file went otherwise than the plan said, if it did: `item` is its listed change
/// (if listed), `chosen` what the rule chose with the basis the agent `offered`, `sent` what
/// went.
fn deviation(
    item: Option<&Item>,
    chosen: Via,
    offered: Option<RelPath>,
    sent: Via,
) -> Option<String> {
    match item.and_then(|it| it.file.as_ref()).map(|f| &f.2) {
        Some(Planned::Link(p) | Planned::Copy(p)) => {
            let what = if item.is_some_and(|it| it.path == *p) {
                "its copy on the target".to_string()
            } else {
                format!("{p} on the target")
            };
            return Some(format!(
                "{what} is missing or altered, so it was sent, not reused"
            ));
        }
        Some(Planned::Transfer {
            basis: Some((b, _)),
        }) if offered.as_ref() != Some(b) => {
            return Some(format!(
                "the basis {b} is missing or altered on the target, so it was sent {}",
                if sent == Via::Literal {
                    "whole"
                } else {
                    "otherwise"
                }
            ));
        }
        _ => {}
    }
    fallback_note(chosen, sent)
}

/// Whether a file of `size` bytes can go as a zstd patch: it is at most
/// [`content::PATCH_MAX`] (the patch window stays within the agent's limit) and the old content
/// of its basis (`old`: the basis's digest, known when the client has the live release's
/// manifest) is in the content cache. The rule of a deploy, and of a dry run predicting it.
pub fn patchable(cache: Option<&ContentCache>, old: Option<&Digest>, size: u64) -> bool {
    size <= content::PATCH_MAX && in_cache(cache, old)
}

/// Whether the old content of digest `old` is in the content cache.
pub fn in_cache(cache: Option<&ContentCache>, old: Option<&Digest>) -> bool {
    matches!((cache, old), (Some(c), Some(d)) if c.contains(d))
}

/// The one send policy of a deploy, a dry run and `flip diff`: how a file of `size` bytes goes
/// whose basis (if it has one) is `basis_size` bytes, `old_cached` saying whether the client
/// holds that basis's old content (in its content cache, or for `flip diff` would hold it). A
/// zstd patch when the old content is cached and the file is at most [`PATCH_MAX`] (the agent's
/// patch window), an rsync delta when file and basis are both at least [`DELTA_MIN`], else the
/// bytes ([`flip_plan::report::choose`]). The deploy still sends a file whole when its patch or
/// delta comes out no smaller ([`fallback_note`]). With `whole_files` (a target on this
/// machine, [`Session::send_whole_files`]) every file goes whole.
pub fn send_policy(size: u64, basis_size: Option<u64>, old_cached: bool, whole_files: bool) -> Via {
    if whole_files {
        return Via::Literal;
    }
    flip_plan::report::choose(size, basis_size, old_cached && size <= content::PATCH_MAX)
}

/// Whether the source file at `path` would go as a zstd patch against the cached version of
/// digest `old`: the deploy's own test (a patch no smaller than the file goes whole, and so
/// does a file whose old version is no longer readable from the cache). Reads the file (at most
/// [`content::PATCH_MAX`] bytes; never mapped, never through a symlink or from a FIFO); for a
/// dry run predicting a deploy.
pub fn patch_is_smaller(cache: &ContentCache, old: &Digest, path: &Path) -> bool {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Some(old) = cache.get(old) else {
        return false;
    };
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    else {
        return false;
    };
    match f.metadata() {
        Ok(m) if m.is_file() && m.len() <= content::PATCH_MAX => {}
        _ => return false,
    }
    let mut data = Vec::new();
    if f.take(content::PATCH_MAX + 1)
        .read_to_end(&mut data)
        .is_err()
        || data.len() as u64 > content::PATCH_MAX
    {
        return false;
    }
    patch(&old, &data).is_some()
}

/// The note of a file sent whole although [`flip_plan::report::choose`] chose a patch or a
/// delta (`chosen`) for it: the encoding came out no smaller than the file. `None` otherwise.
pub fn fallback_note(chosen: Via, sent: Via) -> Option<String> {
    match (chosen, sent) {
        (Via::Patch, Via::Literal) => Some(
            "the patch was no smaller than the file (or the cached old version was unusable), so it was sent whole".into(),
        ),
        (Via::Delta, Via::Literal) => {
            Some("the delta was no smaller than the file, so it was sent whole".into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod peer_tests {
    use super::peer_prefix;

    #[test]
    fn an_error_names_the_target_and_its_path_once() {
        // A local target named by the agent's message: nothing before it.
        assert_eq!(
            peer_prefix("/srv/afile", "/srv/afile is not a directory"),
            None
        );
        // An SSH target whose path the message names: the host alone.
        assert_eq!(
            peer_prefix("deploy@web1:/srv/afile", "/srv/afile is not a directory"),
            Some("deploy@web1")
        );
        // ... once only: a message already prefixed so gets nothing more.
        assert_eq!(
            peer_prefix(
                "deploy@web1:/srv/afile",
                "deploy@web1: /srv/afile is not a directory"
            ),
            None
        );
        // With a port: the target's URL up to its path (its %-escapes read as the message
        // has them).
        assert_eq!(
            peer_prefix("ssh://web1:2222/srv/a%20b", "/srv/a b does not exist"),
            Some("web1:2222")
        );
        assert_eq!(
            peer_prefix(
                "ssh://deploy@web1:2222/srv/afile",
                "/srv/afile is not a directory"
            ),
            Some("deploy@web1:2222")
        );
        // A message that does not name it: the whole target.
        assert_eq!(
            peer_prefix("ssh://web1:2222/srv/app", "the disk is full"),
            Some("ssh://web1:2222/srv/app")
        );
        assert_eq!(
            peer_prefix("web1:/srv/app", "the disk is full"),
            Some("web1:/srv/app")
        );
        assert_eq!(
            peer_prefix("/srv/app", "the disk is full"),
            Some("/srv/app")
        );
    }
}
