//! Where a command goes: a local directory (the agent runs as a child process of this one) or a
//! server reached over SSH (the agent runs there). Either way the result is an agent session
//! speaking the same protocol.

use crate::cli::SshArgs;
use crate::exit;
use anyhow::{Context, Result};
use flip_transfer::Session;
use flip_transport::ssh::{SshOptions, SshTarget};
use flip_transport::TransportError;
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Clone)]
pub enum Target {
    Local(PathBuf),
    Ssh(SshTarget),
}

impl Target {
    /// `/srv/app`, `./app`: local; `[user@]host:/path`, `ssh://[user@]host[:port]/path`: SSH.
    pub fn parse(s: &str) -> Result<Target> {
        if s.is_empty() {
            return Err(exit::coded(exit::USAGE, "the target is empty"));
        }
        match flip_transport::ssh::parse_target(s) {
            Ok(Some(t)) => return Ok(Target::Ssh(t)),
            Ok(None) => {}
            Err(e) => return Err(exit::coded(exit::USAGE, e.to_string())),
        }
        let path = std::path::absolute(s)
            .with_context(|| format!("cannot resolve the target path {s}"))?;
        Ok(Target::Local(path))
    }

    /// For messages and JSON: the local path made absolute, or `[user@]host:path`.
    pub fn display(&self) -> String {
        match self {
            Target::Local(p) => p.display().to_string(),
            Target::Ssh(t) => format!("{}:{}", t.peer(), t.path),
        }
    }

    /// The zstd level for the connection: as asked (fixed), else adaptive over SSH (chosen from
    /// the link, [`flip_wire::ADAPTIVE`]) and none locally (pipes are faster than compression).
    pub fn compress_level(&self, asked: Option<i32>) -> i32 {
        asked.unwrap_or(match self {
            Target::Local(_) => 0,
            Target::Ssh(_) => flip_wire::ADAPTIVE,
        })
    }

    /// Starts an agent for this target and opens a session with it.
    pub fn connect(&self, ssh: &SshArgs, compress: i32) -> Result<Session> {
        let exe = std::env::current_exe().context("cannot find the flip executable")?;
        let mut stream = match self {
            Target::Local(root) => {
                let args: Vec<OsString> = vec![
                    "agent".into(),
                    "--root".into(),
                    root.clone().into_os_string(),
                ];
                flip_transport::local::spawn(&exe, &args)?
            }
            Target::Ssh(t) => {
                let mut opts = SshOptions::new(exe, env!("CARGO_PKG_VERSION"));
                opts.identity = ssh.identity.clone();
                opts.accept_new_host_key = ssh.accept_new_host_key;
                opts.config_file = ssh.ssh_config.clone();
                opts.remote_flip = ssh.remote_flip.clone();
                opts.ssh_command = ssh.ssh_command.clone();
                let args = vec!["--root".to_string(), t.path.clone()];
                flip_transport::ssh::connect_agent(t, &opts, &args)?
            }
        };
        stream.peer = self.display();
        Ok(Session::open(stream, compress)?)
    }
}

/// Exit code for a transport failure: SSH trust and authentication problems apart from
/// everything else that keeps us from reaching an agent.
pub fn transport_exit_code(t: &TransportError) -> i32 {
    match t {
        TransportError::HostKeyUnknown { .. }
        | TransportError::HostKeyChanged { .. }
        | TransportError::Auth { .. }
        | TransportError::KeyEncrypted { .. } => exit::AUTH,
        TransportError::Target { .. } | TransportError::Config { .. } => exit::USAGE,
        _ => exit::CONNECTION,
    }
}
