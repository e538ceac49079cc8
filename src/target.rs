//! Where a command goes: a local directory (the agent runs as a child process of this one) or a
//! server reached over SSH (the agent runs there). Either way the result is an agent session
//! speaking the same protocol.

use crate::cli::SshArgs;
use crate::exit;
use anyhow::{Context, Result};
use flip_transfer::Session;
use flip_transport::TransportError;
use std::ffi::OsString;
use std::path::PathBuf;

pub enum Target {
    Local(PathBuf),
}

impl Target {
    pub fn parse(s: &str) -> Result<Target> {
        if s.is_empty() {
            return Err(exit::coded(exit::USAGE, "the target is empty"));
        }
        let path = std::path::absolute(s)
            .with_context(|| format!("cannot resolve the target path {s}"))?;
        Ok(Target::Local(path))
    }

    /// For messages and JSON: the target as the user wrote it, made absolute when local.
    pub fn display(&self) -> String {
        match self {
            Target::Local(p) => p.display().to_string(),
        }
    }

    /// Starts an agent for this target and opens a session with it.
    pub fn connect(&self, _ssh: &SshArgs, compress: i32) -> Result<Session> {
        let mut stream = match self {
            Target::Local(root) => {
                let exe = std::env::current_exe().context("cannot find the flip executable")?;
                let args: Vec<OsString> =
                    vec!["agent".into(), "--root".into(), root.clone().into_os_string()];
                flip_transport::local::spawn(&exe, &args)?
            }
        };
        stream.peer = self.display();
        Ok(Session::open(stream, compress)?)
    }
}

pub fn transport_exit_code(_t: &TransportError) -> i32 {
    exit::CONNECTION
}
