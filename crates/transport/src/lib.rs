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

pub mod local;
pub mod ssh;

use std::io::{Read, Write};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot start the agent {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("agent {what} ended with {status}{}", stderr_tail(.stderr))]
    Exit {
        what: String,
        status: String,
        stderr: String,
    },
    #[error("{0}")]
    Other(String),
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
    /// Closes the stream (if still open) and waits for the agent to end. Returns an error if it
    /// ended abnormally.
    fn finish(self: Box<Self>) -> Result<(), TransportError>;
}

/// A duplex byte stream to an agent.
pub struct AgentStream {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    pub handle: Box<dyn Finish>,
    /// A short name for messages: "local", "deploy@web1".
    pub peer: String,
}
