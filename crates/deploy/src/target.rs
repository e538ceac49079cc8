//! Where a command goes: a local directory (the agent runs as a child process of this one) or a
//! server reached over SSH (the agent runs there). Either way the result is an agent session
//! speaking the same protocol.

use crate::DeployError;
use flip_transfer::Session;
use flip_transport::ssh::{SshOptions, SshTarget};
use std::ffi::OsString;
use std::path::PathBuf;

/// How SSH targets are reached (the command line's `-i`, `--accept-new-host-key`,
/// `--ssh-command`, `--remote-flip`, `--ssh-config`).
#[derive(Clone, Debug, Default)]
pub struct SshSettings {
    /// `-i`: a private key tried after the ssh-agent's keys.
    pub identity: Option<PathBuf>,
    /// `--accept-new-host-key`: record an unknown host key (never a changed one).
    pub accept_new_host_key: bool,
    /// `--ssh-command`: the system ssh client to use instead of the built-in one.
    pub ssh_command: Option<String>,
    /// `--remote-flip`: the flip to run on the server.
    pub remote_flip: Option<String>,
    /// `--ssh-config`: the ssh client config (default `~/.ssh/config`).
    pub config_file: Option<PathBuf>,
    /// The flip binary to upload when the server has none (`--agent-binary`).
    pub agent_binary: Option<PathBuf>,
    /// `-q`: no note of an agent uploaded or a host key recorded (errors still say all).
    pub quiet: bool,
}

/// A deploy target: exactly what the command line and `flip.toml`'s `targets` take.
#[derive(Clone, Debug)]
pub enum Target {
    /// A directory on this machine (absolute), served by a local agent process.
    Local(PathBuf),
    /// A directory on a server, reached over SSH.
    Ssh(SshTarget),
}

impl Target {
    /// `/srv/app`, `./app`: local; `[user@]host:/path`, `ssh://[user@]host[:port]/path`: SSH.
    ///
    /// # Errors
    /// [`DeployError::Usage`] for an empty target, a malformed `ssh://` URL or a local path
    /// that cannot be resolved.
    pub fn parse(s: &str) -> Result<Target, DeployError> {
        if s.is_empty() {
            return Err(DeployError::Usage("the target is empty".into()));
        }
        match flip_transport::ssh::parse_target(s) {
            Ok(Some(t)) => return Ok(Target::Ssh(t)),
            Ok(None) => {}
            Err(e) => return Err(DeployError::Usage(e.to_string())),
        }
        let path = std::path::absolute(s)
            .map_err(|e| DeployError::Usage(format!("cannot resolve the target path {s}: {e}")))?;
        Ok(Target::Local(path))
    }

    /// Whether `self` and `other` name the same directory: the same local path (component by
    /// component: `/srv/app/` is `/srv/app`; or, where it exists, the same directory once
    /// symlinks and `..` are resolved), or the same user, host, port and path over SSH (empty
    /// and `.` components aside). Two names of one server (an alias and its address, a user or
    /// port given or left to the ssh config) are not told apart.
    pub fn same_as(&self, other: &Target) -> bool {
        match (self, other) {
            // Where they exist, as the file system resolves them (symlinks, `..`).
            (Target::Local(a), Target::Local(b)) => {
                #[allow(clippy::disallowed_methods)]
                let real = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
                a == b || real(a) == real(b)
            }
            (Target::Ssh(a), Target::Ssh(b)) => {
                // `/x//y/./z/` is `/x/y/z`.
                let path = |p: &str| {
                    let parts: Vec<&str> = p
                        .split('/')
                        .filter(|c| !c.is_empty() && *c != ".")
                        .collect();
                    (p.starts_with('/'), parts.join("/"))
                };
                (&a.user, &a.host, a.port, path(&a.path))
                    == (&b.user, &b.host, b.port, path(&b.path))
            }
            _ => false,
        }
    }

    /// For messages and JSON: the local path made absolute, or the SSH target as it parses
    /// back (`[user@]host:path`, with a port `ssh://[user@]host:port/path`).
    pub fn display(&self) -> String {
        match self {
            Target::Local(p) => p.display().to_string(),
            Target::Ssh(t) => t.to_string(),
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

    /// Whether files go whole to this target, never as patches or deltas: as asked, else yes
    /// for a local one (see [`Session::send_whole_files`]), no over SSH.
    pub fn whole_files(&self, asked: Option<bool>) -> bool {
        asked.unwrap_or(matches!(self, Target::Local(_)))
    }

    /// Starts an agent for this target and opens a session with it.
    ///
    /// # Errors
    /// [`DeployError`] when this executable cannot be found, the agent cannot be started or
    /// reached, or the handshake fails.
    pub fn connect(&self, ssh: &SshSettings, compress: i32) -> Result<Session, DeployError> {
        self.connect_agent(ssh, compress, false)
    }

    /// [`Target::connect`]; with `mkpath`, the agent (`flip agent --mkpath`, locally or on the
    /// server) may create the root's missing parent directories when a deploy creates the root.
    ///
    /// # Errors
    /// As [`Target::connect`].
    pub fn connect_agent(
        &self,
        ssh: &SshSettings,
        compress: i32,
        mkpath: bool,
    ) -> Result<Session, DeployError> {
        let exe = std::env::current_exe().map_err(DeployError::Exe)?;
        let mut stream = match self {
            Target::Local(root) => {
                let mut args: Vec<OsString> = vec![
                    "agent".into(),
                    "--root".into(),
                    root.clone().into_os_string(),
                ];
                if mkpath {
                    args.push("--mkpath".into());
                }
                flip_transport::local::spawn(&exe, &args)?
            }
            Target::Ssh(t) => {
                let mut opts = SshOptions::new(exe, env!("CARGO_PKG_VERSION"));
                opts.identity = ssh.identity.clone();
                opts.accept_new_host_key = ssh.accept_new_host_key;
                opts.config_file = ssh.config_file.clone();
                opts.remote_flip = ssh.remote_flip.clone();
                opts.ssh_command = ssh.ssh_command.clone();
                opts.agent_binary = ssh.agent_binary.clone();
                opts.quiet = ssh.quiet;
                // One word: a relative path may start with '-' (`web1:-app`).
                let mut args = vec![format!("--root={}", t.path)];
                if mkpath {
                    args.push("--mkpath".into());
                }
                flip_transport::ssh::connect_agent(t, &opts, &args)?
            }
        };
        stream.peer = self.display();
        Ok(Session::open(stream, compress)?)
    }
}
