//! Byte streams to a flip agent. flip speaks one protocol to every target: the client starts
//! `flip agent --root PATH` somewhere and exchanges frames with it over that process's
//! stdin/stdout. This crate only provides the pipes; it knows nothing about the protocol.
//!
//! - [`local`]: the agent as a child process of this one (the default local-directory target).
//! - [`ssh`]: the agent over an SSH exec channel (ssh2), or over the system `ssh` client.
//!
//! An [`AgentStream`] has independent read and write halves, so one thread may write while another
//! reads (the transfer pipelines requests), and a [`Finish`] handle that closes the stream and
//! reports how the remote side ended.

#![warn(missing_docs, unreachable_pub)]

pub mod local;
pub mod ssh;

use std::io::{Read, Write};
use std::path::PathBuf;

/// Why a stream to an agent could not be opened or ended badly. Messages name the host or
/// program and the cause.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The local agent process could not be started.
    #[error("cannot start the agent {program}: {source}")]
    Spawn {
        /// The program that was to run.
        program: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The SSH client of `--ssh-command` could not be started (not found, not executable).
    #[error("cannot start the SSH command {program}: {source}")]
    SshCommand {
        /// The program that was to run (the command's first word).
        program: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `--ssh-command` is no command: empty, or not split into words as a shell would.
    #[error("--ssh-command {command:?}: {message}")]
    SshCommandInvalid {
        /// The command as given.
        command: String,
        /// What is wrong.
        message: String,
    },
    /// The agent (or a remote command) ended abnormally.
    #[error("agent {what} ended with {status}{}", stderr_tail(.stderr))]
    Exit {
        /// What was running ("flip agent on web1", ...).
        what: String,
        /// How it ended ("exit status 3", "signal 9").
        status: String,
        /// The end of what it wrote to stderr.
        stderr: String,
    },
    /// Anything else, described.
    #[error("{0}")]
    Other(String),

    // --- SSH targets. The CLI maps these to exit codes, so the kinds stay distinct: a bad
    // target or config, a connection failure, a host key problem, an authentication failure, a
    // failure on the server while preparing or running the agent.
    /// A malformed `ssh://` URL.
    #[error("bad ssh target {input:?}: {message}")]
    Target {
        /// The text given.
        input: String,
        /// What is wrong.
        message: String,
    },
    /// The ssh client config could not be read or parsed.
    #[error("ssh config {path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Resolving or connecting to the server failed, or timed out.
    #[error("connecting to {host}: {source}")]
    Connect {
        /// The host, as the user named it.
        host: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An SSH protocol step failed (handshake, opening a channel, ...).
    #[error("{phase} with {host}: {message}")]
    Ssh {
        /// The host, as the user named it.
        host: String,
        /// What flip was doing ("handshake", "uploading the agent", ...).
        phase: String,
        /// What is wrong.
        message: String,
    },
    /// The connection dropped while streaming.
    #[error("connection to {host} lost: {message}")]
    ConnectionLost {
        /// The host, as the user named it.
        host: String,
        /// What is wrong.
        message: String,
    },
    /// The server's host key is not in known_hosts and accepting new keys was not allowed.
    #[error(
        "host key for {host} is not known: {key_type} key fingerprint is {fingerprint}. \
         If that is the server's key, connect once with --accept-new-host-key (it is then \
         added to {known_hosts}), or add it there yourself"
    )]
    HostKeyUnknown {
        /// The host, as the user named it.
        host: String,
        /// The key's type (`ssh-ed25519`, ...).
        key_type: String,
        /// The key's SHA256 fingerprint.
        fingerprint: String,
        /// The known_hosts file consulted.
        known_hosts: PathBuf,
    },
    /// The server presented a different key than the one recorded (or a revoked one).
    #[error(
        "WARNING: THE HOST KEY FOR {host} HAS CHANGED (or is revoked)! Someone could be \
         eavesdropping on you right now (possible man-in-the-middle attack), or the server's \
         key was replaced. It now offers {key_type} {fingerprint}; the recorded key is in \
         {known_hosts}. Refusing to connect; if the change is expected, remove the old entry \
         (ssh-keygen -R) and connect again"
    )]
    HostKeyChanged {
        /// The host, as the user named it.
        host: String,
        /// The key's type (`ssh-ed25519`, ...).
        key_type: String,
        /// The key's SHA256 fingerprint.
        fingerprint: String,
        /// The known_hosts file that records the other key (or revokes this one).
        known_hosts: PathBuf,
    },
    /// The server presented a key of a type known_hosts records no key of, while it records
    /// keys of other types for the host: the client asks for the recorded types first, so a
    /// server that still has its recorded key presents it. Refused even when new keys are
    /// accepted (`--accept-new-host-key` would record an impostor's key).
    #[error(
        "WARNING: THE HOST KEY FOR {host} IS NOT THE ONE RECORDED: it offers {offered}, while \
         {known_hosts} records a key of another type for it ({known_types}), which it no longer \
         offers. Someone could be impersonating the server (possible man-in-the-middle \
         attack), or the server's keys were replaced. Refusing to connect; if the change is \
         expected, remove the old entry (ssh-keygen -R) and connect again"
    )]
    HostKeyOtherType {
        /// The host, as the user named it.
        host: String,
        /// The key presented: its type and SHA256 fingerprint (`ssh-ed25519 SHA256:...`).
        offered: String,
        /// The types known_hosts records for the host, comma-separated.
        known_types: String,
        /// The known_hosts file consulted.
        known_hosts: PathBuf,
    },
    /// No offered key was accepted. `target` is `user@host:port`.
    #[error("authentication failed for {target} (tried: {tried})")]
    Auth {
        /// `user@host:port`.
        target: String,
        /// The keys and methods tried.
        tried: String,
    },
    /// The only usable key is passphrase-protected and no ssh-agent holds it.
    #[error(
        "authentication failed for {target}: the key {key} is passphrase-protected and flip \
         never prompts for passphrases; load it into ssh-agent first (`ssh-add {key}`)"
    )]
    KeyEncrypted {
        /// `user@host:port`.
        target: String,
        /// The key file.
        key: PathBuf,
    },
    /// The server's OS/architecture differs from this flip binary's and no binary for it was
    /// given: what to do is in the message.
    #[error(
        "{host} is `{remote}` (uname -sm) and has no flip {version}, but this flip is built for \
         `{local}` and no flip for `{remote}` was given: install flip {version} on the server \
         (on its PATH, or pass --remote-flip PATH), or pass --agent-binary FILE with a flip \
         {version} built for `{remote}` (or keep it as {cache} and flip uploads it by itself)",
        cache = .cache.display()
    )]
    Platform {
        /// The host, as the user named it.
        host: String,
        /// This flip's platform (`uname -sm` form).
        local: String,
        /// The server's `uname -sm`.
        remote: String,
        /// This flip's version.
        version: String,
        /// The local per-platform cache file that would have been uploaded.
        cache: PathBuf,
    },
    /// A command run on the server to find, upload or start the agent failed.
    #[error("{phase} on {host}: {message}")]
    Remote {
        /// The host, as the user named it.
        host: String,
        /// What flip was doing ("handshake", "uploading the agent", ...).
        phase: String,
        /// What is wrong.
        message: String,
    },
}

fn stderr_tail(s: &str) -> String {
    let s = s.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}

/// How the stream ended, once closed.
pub trait Finish: Send {
    /// Closes the stream (if still open) and waits for the agent to end.
    ///
    /// # Errors
    /// [`TransportError::Exit`] if it ended abnormally (a non-zero status or a signal), or what
    /// broke the connection.
    fn finish(self: Box<Self>) -> Result<(), TransportError>;

    /// A way to end the connection from another thread while a read on the stream waits (a
    /// deadline), where this transport has one: that read then ends (an error or the end of the
    /// stream) instead of waiting for a server that never answers.
    fn aborter(&self) -> Option<Aborter> {
        None
    }

    /// Once the stream broke (a write found no reader, a read found its end): the transport's
    /// own account of why, where it has one, looked for without waiting long (at most about
    /// two seconds). The system `ssh` that exited with status 255 gives its failure (the host
    /// unreachable, the key refused), as [`Finish::finish`] would; a broken pipe says nothing
    /// of that.
    fn failure(&self) -> Option<TransportError> {
        None
    }
}

/// Ends a connection from another thread (see [`Finish::aborter`]); calling it more than once,
/// or after the stream ended, does nothing more.
pub type Aborter = Box<dyn Fn() + Send + Sync>;

/// A duplex byte stream to an agent.
///
/// Over SSH the stream is returned before the agent is known to run: the client's first
/// requests follow the launch without a round trip. When no agent could be started (none on
/// the server and none could be uploaded), the first read (or a write past what is kept for a
/// second launch) fails with an `io::Error` whose inner error is the [`TransportError`].
pub struct AgentStream {
    /// The agent's output (its stdout).
    pub reader: Box<dyn Read + Send>,
    /// The agent's input (its stdin); dropping it is end of input.
    pub writer: Box<dyn Write + Send>,
    /// Ends the stream and reports how the agent ended.
    pub handle: Box<dyn Finish>,
    /// A short name for messages: "local", "deploy@web1".
    pub peer: String,
    /// Call before writing anything that must not be seen on the server by other users (file
    /// names and content, hook commands): what was written so far may go in the agent's
    /// command line, where `ps` shows it (see `ssh::PREAMBLE_MAX`), and nothing written from
    /// then on. Returns once the transport has taken what it will; a no-op where nothing
    /// travels in the command line, and after the first call.
    pub seal: Seal,
    /// One round trip to the server, timed as the stream was opened (the built-in SSH client:
    /// the reply to opening its channel); `None` where not measured (a local agent, the system
    /// `ssh`).
    pub round_trip: Option<std::time::Duration>,
}

/// See [`AgentStream::seal`].
pub type Seal = std::sync::Arc<dyn Fn() + Send + Sync>;

/// A [`Seal`] that does nothing: a stream whose input all goes through its channel.
pub fn no_seal() -> Seal {
    std::sync::Arc::new(|| {})
}
