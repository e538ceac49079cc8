//! Full-duplex streaming over one ssh2 channel.
//!
//! libssh2 sessions are not safe to drive from two threads, and ssh2's blocking mode holds the
//! session lock for the whole of a blocking read, so a writer thread would stall behind a
//! reader thread. Instead the session is put in non-blocking mode and one pump thread owns it:
//! it moves bytes between the channel and two local socket pairs, and waits with `poll(2)` on
//! the TCP socket and the local sockets (never spinning). The user gets the other ends of the
//! socket pairs as the stream's reader and writer, which behave like pipes to a child process:
//! bounded buffering (the socket buffers plus one chunk each way), EOF both ways, and a dropped
//! connection reported as an `io::Error` naming the host.

use super::stderr::Relay;
use crate::{AgentStream, Finish, TransportError};
use ssh2::{BlockDirections, Channel, Session};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Bytes moved per read/write call each way.
const CHUNK: usize = 256 * 1024;

/// libssh2's "would block" error code.
pub(super) const LIBSSH2_ERROR_EAGAIN: i32 = -37;
/// libssh2's code for a request the server answered with a failure.
const LIBSSH2_ERROR_REQUEST_DENIED: i32 = -22;

/// Local socket buffer size requested for each direction.
const SOCKET_BUFFER: libc::c_int = 1024 * 1024;

/// Most bytes of the user's first writes carried in a deferred `exec`'s command line
/// ([`Parts::deferred`]), in words of [`PREAMBLE_WORD`]: the command stays within one SSH
/// packet (libssh2 sends at most 40,000 bytes of payload). The agent takes as much
/// (`flip_agent::PREAMBLE_MAX`).
pub const PREAMBLE_MAX: usize = 16 << 10;
/// Bytes per `--preamble` word: 4 KiB of base64, a word the most limited login shell still
/// takes (csh: 5,000 characters, not 20,000; eight such words on one line are fine).
pub const PREAMBLE_WORD: usize = 3 << 10;

/// `bytes` (at most [`PREAMBLE_MAX`]) as the `--preamble=BASE64` words of a command line, each
/// of at most [`PREAMBLE_WORD`] bytes.
pub fn preamble_words(bytes: &[u8]) -> Vec<String> {
    use base64::Engine;
    bytes
        .chunks(PREAMBLE_WORD)
        .map(|w| {
            format!(
                "--preamble={}",
                base64::engine::general_purpose::STANDARD.encode(w)
            )
        })
        .collect()
}

/// How long the user may pause before a deferred `exec` goes with what it wrote so far: a
/// client writes its first batch at once, and a longer pause (a scan still under way) would
/// only delay the server's start.
const PREAMBLE_QUIET: std::time::Duration = std::time::Duration::from_millis(2);
/// How long a deferred `exec` waits for the user's first bytes at most (a client that read or
/// closed its writer before sends it at once): a deploy writes nothing until its first batch
/// is ready, which takes it a few milliseconds once the scan is over.
const PREAMBLE_FIRST: std::time::Duration = std::time::Duration::from_millis(100);

/// What the pump needs: a session in which `channel` has started the command, or has asked to
/// (`exec`).
pub(crate) struct Parts {
    pub session: Session,
    pub channel: Channel,
    /// The command whose `exec` request is sent (the session in non-blocking mode) but whose
    /// reply has not been read: the pump reads it, and the user's first bytes follow the request
    /// without waiting for it (see [`super::session`]).
    pub exec: Option<String>,
    /// A command whose `exec` is not sent yet (with `exec` `None`): the pump sends it once the
    /// user has written its first batch (it starts reading, seals ([`AgentStream::seal`]),
    /// pauses for [`PREAMBLE_QUIET`] after writing, has written [`PREAMBLE_MAX`] bytes, or
    /// closed its writer; at most [`PREAMBLE_FIRST`] after the pump started if it wrote
    /// nothing), with those bytes appended as ` --preamble=BASE64` words, the agent's input
    /// before its stdin. Other users of the server see a command line (`ps`): the user seals
    /// before it writes what they must not see. A session channel takes no
    /// data before its command runs (`sshd` opens the channel's window only then, a round
    /// trip after the `exec`): in the command line, the first batch costs no round trip.
    pub deferred: Option<String>,
    /// The session's TCP socket.
    pub fd: RawFd,
    /// The host as the user named it.
    pub host: String,
    pub peer: String,
    /// "flip agent on web1": names the command in exit errors.
    pub what: String,
    /// Interval of SSH keepalives while streaming.
    pub keepalive: std::time::Duration,
    pub relay: Relay,
    /// [`crate::AgentStream::round_trip`].
    pub round_trip: Option<std::time::Duration>,
}

/// State shared by the pump and the user's halves.
struct Shared {
    host: String,
    /// Set (before the local sockets are closed) when the connection failed.
    error: Mutex<Option<String>>,
    /// The server refused the pipelined `exec` (`error` says how): the connection was fine.
    refused: std::sync::atomic::AtomicBool,
    /// The user sealed the preamble ([`AgentStream::seal`]), or started reading: what it wrote
    /// so far is its whole first batch, and nothing it writes from now on may go in the
    /// command line.
    sealed: std::sync::atomic::AtomicBool,
    /// The `exec` is no longer deferred (or the pump ended): a seal returns.
    decided: Mutex<bool>,
    decided_now: std::sync::Condvar,
    /// Set when the session was given up and waiting for its agent to end took too long, or
    /// the server did not start the agent in time ([`Finish::aborter`]): the pump drops the
    /// connection (the server ends the agent) instead of keeping it open, on a thread of its
    /// own, until the client exits.
    abandoned: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// [`AgentStream::seal`]: waits until the pump has sent, or no longer defers, the `exec`
    /// (the user writes nothing meanwhile, so what the pump takes was written before).
    fn seal(&self) {
        self.sealed.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut decided = self.decided.lock().unwrap_or_else(|e| e.into_inner());
        while !*decided {
            decided = self
                .decided_now
                .wait(decided)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The `exec` is no longer deferred, or the pump ends: seals return.
    fn decide(&self) {
        *self.decided.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.decided_now.notify_all();
    }

    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn io_error(&self) -> Option<io::Error> {
        self.error().map(|message| {
            if self.refused.load(std::sync::atomic::Ordering::SeqCst) {
                return io::Error::other(format!(
                    "{} refused to run the command: {message}",
                    self.host
                ));
            }
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("connection to {} lost: {message}", self.host),
            )
        })
    }
}

/// How the remote command ended.
struct Ended {
    status: Option<i32>,
    signal: Option<String>,
}

/// Starts the pump thread and returns the stream.
///
/// # Errors
/// When the local sockets or the thread cannot be made (out of file descriptors or threads).
pub(crate) fn start(parts: Parts) -> io::Result<AgentStream> {
    let (user_read, pump_write) = UnixStream::pair()?;
    let (pump_read, user_write) = UnixStream::pair()?;
    for s in [&user_read, &pump_write, &pump_read, &user_write] {
        set_buffer_sizes(s);
    }
    pump_write.set_nonblocking(true)?;
    pump_read.set_nonblocking(true)?;
    let shared = Arc::new(Shared {
        host: parts.host.clone(),
        error: Mutex::new(None),
        refused: Default::default(),
        sealed: Default::default(),
        decided: Mutex::new(parts.deferred.is_none()),
        decided_now: Default::default(),
        abandoned: Default::default(),
    });
    let tail = parts.relay.tail.clone();
    let peer = parts.peer.clone();
    let what = parts.what.clone();
    let writer_handle = user_write.try_clone()?;
    let round_trip = parts.round_trip;
    let pump_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("ssh-pump-{}", parts.host))
        .spawn(move || Pump::new(parts, pump_read, pump_write, pump_shared).run())?;
    let sealing = shared.clone();
    Ok(AgentStream {
        round_trip,
        seal: Arc::new(move || sealing.seal()),
        reader: Box::new(PumpReader {
            sock: user_read,
            shared: shared.clone(),
        }),
        writer: Box::new(PumpWriter {
            sock: user_write,
            shared: shared.clone(),
        }),
        handle: Box::new(PumpFinish {
            thread: Some(thread),
            writer: writer_handle,
            shared,
            what,
            tail,
        }),
        peer,
    })
}

fn set_buffer_sizes(s: &UnixStream) {
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a socket we own, with a c_int option value.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &SOCKET_BUFFER as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// The user's read half: data from the remote command's stdout.
struct PumpReader {
    sock: UnixStream,
    shared: Arc<Shared>,
}

impl Read for PumpReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Waiting for answers: the first batch is whole (no need to wait for the pump, as a
        // seal does before it writes what must not go in the command line).
        self.shared
            .sealed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        match self.sock.read(buf) {
            // EOF: the end of the remote output, unless the pump closed it because of an error.
            Ok(0) if !buf.is_empty() => match self.shared.io_error() {
                Some(e) => Err(e),
                None => Ok(0),
            },
            Ok(n) => Ok(n),
            Err(e) => Err(self.shared.io_error().unwrap_or(e)),
        }
    }
}

/// The user's write half: data for the remote command's stdin. Dropping it sends EOF.
struct PumpWriter {
    sock: UnixStream,
    shared: Arc<Shared>,
}

impl Write for PumpWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock
            .write(buf)
            .map_err(|e| match self.shared.io_error() {
                Some(e) => e,
                None if e.kind() == io::ErrorKind::BrokenPipe => io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    format!(
                        "the command on {} no longer reads its input (it ended)",
                        self.shared.host
                    ),
                ),
                None => e,
            })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for PumpWriter {
    fn drop(&mut self) {
        // The Finish handle holds a duplicate of this socket, so closing our fd alone would not
        // signal EOF.
        let _ = self.sock.shutdown(Shutdown::Write);
    }
}

struct PumpFinish {
    /// Taken by `finish`; still here when the session is dropped without it.
    thread: Option<JoinHandle<Result<Ended, String>>>,
    /// A duplicate of the writer's socket: finish() closes the stream if still open.
    writer: UnixStream,
    shared: Arc<Shared>,
    what: String,
    tail: super::stderr::Tail,
}

impl Finish for PumpFinish {
    fn aborter(&self) -> Option<crate::Aborter> {
        let shared = self.shared.clone();
        Some(Box::new(move || {
            shared
                .abandoned
                .store(true, std::sync::atomic::Ordering::SeqCst)
        }))
    }

    fn finish(mut self: Box<Self>) -> Result<(), TransportError> {
        let _ = self.writer.shutdown(Shutdown::Write);
        let thread = self.thread.take().expect("finished once");
        let ended = thread.join().map_err(|_| {
            TransportError::Other(format!("the ssh pump for {} panicked", self.shared.host))
        })?;
        match ended {
            Err(message) => Err(TransportError::ConnectionLost {
                host: self.shared.host.clone(),
                message,
            }),
            Ok(Ended {
                status: Some(0),
                signal: None,
            }) => Ok(()),
            Ok(Ended { status, signal }) => Err(TransportError::Exit {
                what: self.what.clone(),
                status: match (signal, status) {
                    (Some(sig), _) => format!("signal {sig}"),
                    (None, Some(code)) => format!("exit status {code}"),
                    (None, None) => "no exit status".to_string(),
                },
                stderr: self.tail.text(),
            }),
        }
    }
}

impl Drop for PumpFinish {
    /// A session given up without `finish`: close our side and wait (bounded) for the pump,
    /// which ends when the remote agent has (it removes its staging and releases the lock
    /// first), so a retry right after does not find the target locked.
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let _ = self.writer.shutdown(Shutdown::Write);
        let deadline = std::time::Instant::now() + crate::local::ABANDON_WAIT;
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            // The pump looks at this at least once a second, then drops the connection.
            self.shared
                .abandoned
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// One direction's buffer: `buf[start..end]` is pending.
struct Chunk {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Chunk {
    fn new() -> Self {
        Chunk {
            buf: vec![0; CHUNK],
            start: 0,
            end: 0,
        }
    }
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
}

struct Pump {
    session: Session,
    channel: Channel,
    /// The command whose `exec` reply is awaited (see [`Parts::exec`]).
    exec: Option<String>,
    /// The command whose `exec` waits for the user's first batch ([`Parts::deferred`]).
    deferred: Option<Deferred>,
    /// The `exec` request is wholly sent: what follows it on the connection may be sent.
    exec_sent: bool,
    fd: RawFd,
    relay: Relay,
    shared: Arc<Shared>,
    /// Our end of the user's reader; None once closed (remote EOF delivered).
    to_user: Option<UnixStream>,
    /// Our end of the user's writer; None once it hit EOF or the remote stopped reading.
    from_user: Option<UnixStream>,
    down: Chunk,
    up: Chunk,
    /// Remote stderr, on its way to the relay.
    errbuf: Vec<u8>,
    /// The user dropped the reader: remote output is discarded.
    user_gone: bool,
    remote_eof: bool,
    eof_sent: bool,
}

/// A deferred `exec` ([`Parts::deferred`]) and the user's first bytes, gathered for it.
struct Deferred {
    command: String,
    /// When the pump started.
    since: std::time::Instant,
    /// When the user last wrote.
    last: Option<std::time::Instant>,
    bytes: Vec<u8>,
}

/// What a step was blocked on, accumulated over one pass.
#[derive(Default)]
struct Wait {
    tcp_in: bool,
    tcp_out: bool,
    user_in: bool,
    user_out: bool,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Pump {
    fn new(parts: Parts, from_user: UnixStream, to_user: UnixStream, shared: Arc<Shared>) -> Pump {
        parts.session.set_blocking(false);
        // Keepalives without a reply request: libssh2 would queue every reply forever. Sent data
        // that is never acknowledged trips TCP_USER_TIMEOUT, which is what detects a dead link.
        let secs = parts.keepalive.as_secs().clamp(1, u32::MAX as u64) as u32;
        parts.session.set_keepalive(false, secs);
        // A request that left whole leaves libssh2 waiting to read its reply only; a deferred
        // one has not left.
        let exec_sent = parts.deferred.is_none()
            && (parts.exec.is_none()
                || matches!(parts.session.block_directions(), BlockDirections::Inbound));
        Pump {
            session: parts.session,
            channel: parts.channel,
            exec: parts.exec,
            deferred: parts.deferred.map(|command| Deferred {
                command,
                since: std::time::Instant::now(),
                last: None,
                bytes: Vec::new(),
            }),
            exec_sent,
            fd: parts.fd,
            relay: parts.relay,
            shared,
            to_user: Some(to_user),
            from_user: Some(from_user),
            down: Chunk::new(),
            up: Chunk::new(),
            errbuf: vec![0; 64 * 1024],
            user_gone: false,
            remote_eof: false,
            eof_sent: false,
        }
    }

    /// Runs until the channel closes or the connection fails.
    fn run(mut self) -> Result<Ended, String> {
        let result = self.pump();
        self.shared.decide();
        if let Err(message) = &result {
            // Record the error before closing the local ends, so the user's halves report it.
            *self.shared.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.clone());
        }
        self.to_user = None;
        self.from_user = None;
        self.relay.finish();
        if result.is_ok() {
            // Polite close; bounded, since the session goes away anyway.
            self.session.set_keepalive(false, 0);
            self.session.set_blocking(true);
            self.session.set_timeout(2000);
            let _ = self.channel.close();
            let _ = self.session.disconnect(None, "flip: done", None);
        }
        result
    }

    fn blocked(&self, wait: &mut Wait) {
        match self.session.block_directions() {
            BlockDirections::Inbound => wait.tcp_in = true,
            BlockDirections::Outbound => wait.tcp_out = true,
            BlockDirections::Both => {
                wait.tcp_in = true;
                wait.tcp_out = true;
            }
            BlockDirections::None => wait.tcp_in = true,
        }
    }

    /// Moves bytes each way until the command's exit status arrives: one pass of every step,
    /// again at once if any made progress, else a `poll` for what blocked them.
    fn pump(&mut self) -> Result<Ended, String> {
        loop {
            if self
                .shared
                .abandoned
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return Err("the session was given up".to_string());
            }
            let mut wait = Wait::default();
            let mut progress = self.gather_preamble(&mut wait);
            progress |= self.finish_exec(&mut wait)?;
            progress |= self.read_remote_output(&mut wait)?;
            progress |= self.deliver_to_user(&mut wait);
            progress |= self.relay_stderr(&mut wait)?;
            progress |= self.read_user_input(&mut wait);
            progress |= self.send_to_remote(&mut wait)?;
            progress |= self.send_eof(&mut wait)?;
            if let Some(ended) = self.ended(&mut wait)? {
                return Ok(ended);
            }
            if progress {
                continue;
            }
            // In non-blocking mode keepalives are sent only when we ask (it is a no-op until
            // one is due). Waking up every second keeps that timely.
            let _ = self.session.keepalive_send();
            // A deferred `exec` watches the clock (and whether the user reads) closely.
            self.poll(&wait, if self.deferred.is_some() { 1 } else { 1000 })?;
        }
    }

    /// While the `exec` is deferred ([`Parts::deferred`]): takes what the user writes, up to
    /// [`PREAMBLE_MAX`] bytes, and once the first batch is whole (the user reads or sealed,
    /// pauses for [`PREAMBLE_QUIET`], closed its writer, or the bytes are at the limit) makes the `exec`
    /// of the command with them as `--preamble=BASE64`, for [`Pump::finish_exec`] to send. True
    /// if it made progress.
    fn gather_preamble(&mut self, wait: &mut Wait) -> bool {
        let Some(d) = &mut self.deferred else {
            return false;
        };
        let mut progress = false;
        let room = PREAMBLE_MAX - d.bytes.len();
        if let (Some(sock), true) = (&mut self.from_user, room > 0) {
            let mut buf = [0u8; PREAMBLE_WORD];
            let room = room.min(PREAMBLE_WORD);
            match sock.read(&mut buf[..room]) {
                Ok(0) => self.from_user = None,
                Ok(n) => {
                    d.bytes.extend_from_slice(&buf[..n]);
                    d.last = Some(std::time::Instant::now());
                    progress = true;
                }
                Err(e) if would_block(&e) => wait.user_in = true,
                Err(_) => self.from_user = None,
            }
        }
        let sealed = self.shared.sealed.load(std::sync::atomic::Ordering::SeqCst);
        let quiet = match d.last {
            Some(t) => t.elapsed() >= PREAMBLE_QUIET,
            None => d.since.elapsed() >= PREAMBLE_FIRST,
        };
        let full = d.bytes.len() >= PREAMBLE_MAX;
        if !(sealed || quiet || full || self.from_user.is_none()) {
            return progress;
        }
        let Some(d) = self.deferred.take() else {
            return progress;
        };
        let mut command = d.command;
        for word in preamble_words(&d.bytes) {
            command.push(' ');
            command.push_str(&word);
        }
        self.exec = Some(command);
        self.shared.decide();
        true
    }

    /// Reads the reply to a pipelined `exec` (or finishes sending the request). True if it made
    /// progress. A refusal ends the stream: whatever was sent after the request was dropped.
    fn finish_exec(&mut self, wait: &mut Wait) -> Result<bool, String> {
        let Some(command) = &self.exec else {
            return Ok(false);
        };
        match self.channel.exec(command) {
            Ok(()) => {
                self.exec = None;
                self.exec_sent = true;
                Ok(true)
            }
            Err(e) if e.code() == ssh2::ErrorCode::Session(LIBSSH2_ERROR_EAGAIN) => {
                let sent = matches!(self.session.block_directions(), BlockDirections::Inbound);
                let progress = sent && !self.exec_sent;
                self.exec_sent |= sent;
                self.blocked(wait);
                Ok(progress)
            }
            Err(e) => {
                // Refused (CHANNEL_FAILURE), rather than the connection failing meanwhile.
                let refused = e.code() == ssh2::ErrorCode::Session(LIBSSH2_ERROR_REQUEST_DENIED);
                self.shared
                    .refused
                    .store(refused, std::sync::atomic::Ordering::SeqCst);
                Err(e.message().to_string())
            }
        }
    }

    /// Remote stdout -> down chunk. True if it made progress.
    fn read_remote_output(&mut self, wait: &mut Wait) -> Result<bool, String> {
        if self.remote_eof || !self.down.is_empty() {
            return Ok(false);
        }
        match self.channel.read(&mut self.down.buf) {
            Ok(0) if self.channel.eof() => {
                self.remote_eof = true;
                Ok(true)
            }
            Ok(0) => {
                self.blocked(wait);
                Ok(false)
            }
            Ok(n) => {
                self.down.end = n;
                Ok(true)
            }
            Err(e) if would_block(&e) => {
                self.blocked(wait);
                Ok(false)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Down chunk -> the user's reader; once the remote output ended and all of it is
    /// delivered, the user's reader sees EOF. True if it made progress.
    fn deliver_to_user(&mut self, wait: &mut Wait) -> bool {
        let mut progress = false;
        if !self.down.is_empty() {
            if self.user_gone {
                self.down.clear();
            } else if let Some(sock) = &mut self.to_user {
                match sock.write(self.down.pending()) {
                    Ok(n) => {
                        self.down.consume(n);
                        progress = true;
                    }
                    Err(e) if would_block(&e) => wait.user_out = true,
                    Err(_) => {
                        // The reader was dropped; keep draining the channel.
                        self.user_gone = true;
                        self.down.clear();
                        progress = true;
                    }
                }
            }
        }
        if self.remote_eof && self.down.is_empty() && self.to_user.is_some() {
            self.to_user = None;
        }
        progress
    }

    /// Remote stderr -> relay. Always drained: it shares the channel window. True if it made
    /// progress.
    fn relay_stderr(&mut self, wait: &mut Wait) -> Result<bool, String> {
        let mut progress = false;
        loop {
            match self.channel.stderr().read(&mut self.errbuf) {
                Ok(0) => return Ok(progress),
                Ok(n) => {
                    self.relay.data(&self.errbuf[..n]);
                    progress = true;
                }
                Err(e) if would_block(&e) => {
                    self.blocked(wait);
                    return Ok(progress);
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// The user's writer -> up chunk. True if it made progress.
    fn read_user_input(&mut self, wait: &mut Wait) -> bool {
        if !self.up.is_empty() || self.deferred.is_some() {
            return false;
        }
        let Some(sock) = &mut self.from_user else {
            return false;
        };
        match sock.read(&mut self.up.buf) {
            Ok(0) => self.from_user = None,
            Ok(n) => self.up.end = n,
            Err(e) if would_block(&e) => {
                wait.user_in = true;
                return false;
            }
            Err(_) => self.from_user = None,
        }
        true
    }

    /// Up chunk -> remote stdin. True if it made progress.
    fn send_to_remote(&mut self, wait: &mut Wait) -> Result<bool, String> {
        let mut progress = false;
        if !self.exec_sent {
            return Ok(false);
        }
        while !self.up.is_empty() {
            match self.channel.write(self.up.pending()) {
                Ok(0) => {
                    self.blocked(wait);
                    break;
                }
                Ok(n) => {
                    self.up.consume(n);
                    progress = true;
                }
                Err(e) if would_block(&e) => {
                    self.blocked(wait);
                    break;
                }
                Err(_) if self.remote_eof || self.channel.eof() => {
                    // The command ended and no longer reads: drop its input; the user's
                    // writer gets a broken pipe, the exit status tells the rest.
                    self.up.clear();
                    self.from_user = None;
                    self.eof_sent = true;
                    return Ok(true);
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(progress)
    }

    /// The user closed the writer and everything is sent: EOF to the remote stdin. True if it
    /// made progress.
    fn send_eof(&mut self, wait: &mut Wait) -> Result<bool, String> {
        if self.from_user.is_some()
            || !self.up.is_empty()
            || self.eof_sent
            || self.exec.is_some()
            || self.deferred.is_some()
        {
            return Ok(false);
        }
        match self.channel.send_eof() {
            Ok(()) => {
                self.eof_sent = true;
                Ok(true)
            }
            Err(e) if e.code() == ssh2::ErrorCode::Session(LIBSSH2_ERROR_EAGAIN) => {
                self.blocked(wait);
                Ok(false)
            }
            Err(e) if !(self.remote_eof || self.channel.eof()) => Err(e.message().to_string()),
            Err(_) => {
                self.eof_sent = true;
                Ok(false)
            }
        }
    }

    /// Everything delivered: waits for the remote close and the exit status; `None` while it
    /// has not come.
    fn ended(&mut self, wait: &mut Wait) -> Result<Option<Ended>, String> {
        if !self.remote_eof
            || !self.down.is_empty()
            || self.exec.is_some()
            || self.deferred.is_some()
        {
            return Ok(None);
        }
        match self.channel.wait_close() {
            Ok(()) => {
                // Late stderr that arrived with the close.
                while let Ok(n) = self.channel.stderr().read(&mut self.errbuf) {
                    if n == 0 {
                        break;
                    }
                    self.relay.data(&self.errbuf[..n]);
                }
                let signal = self.channel.exit_signal().ok().and_then(|s| s.exit_signal);
                let status = self.channel.exit_status().ok();
                Ok(Some(Ended { status, signal }))
            }
            Err(e) if e.code() == ssh2::ErrorCode::Session(LIBSSH2_ERROR_EAGAIN) => {
                self.blocked(wait);
                Ok(None)
            }
            Err(e) => Err(e.message().to_string()),
        }
    }

    /// Waits until one of the blocked steps can make progress (or the timeout passes).
    fn poll(&self, wait: &Wait, timeout_ms: i32) -> Result<(), String> {
        let mut fds = Vec::with_capacity(3);
        let mut tcp_events = 0;
        if wait.tcp_in {
            tcp_events |= libc::POLLIN;
        }
        if wait.tcp_out {
            tcp_events |= libc::POLLOUT;
        }
        fds.push(libc::pollfd {
            fd: self.fd,
            events: tcp_events,
            revents: 0,
        });
        if wait.user_in {
            if let Some(s) = &self.from_user {
                fds.push(libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        if wait.user_out {
            if let Some(s) = &self.to_user {
                fds.push(libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                });
            }
        }
        // SAFETY: poll(2) on an array of pollfd we own, for fds that stay open during the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(format!("poll: {e}"));
            }
        }
        Ok(())
    }
}
