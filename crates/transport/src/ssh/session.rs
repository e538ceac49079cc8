//! The built-in transport: one ssh2 (libssh2) session per target. Connecting does TCP (with a
//! timeout and keepalives), the SSH handshake, the host key check and key authentication like
//! OpenSSH. Short commands run in blocking mode; the long-running one is handed to the
//! [`pump`](super::pump) thread.

use super::config::{HostConfig, UnknownHosts};
use super::known_hosts::{self, Verdict};
use super::stderr::Relay;
use super::{pump, Output, Remote, SshOptions};
use crate::{AgentStream, TransportError};
use ssh2::{HashType, MethodType, Session};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Chunk size for uploads in blocking mode.
const CHUNK: usize = 256 * 1024;

/// Timeout of each blocking libssh2 call after the handshake (running probes, uploading).
const OP_TIMEOUT: Duration = Duration::from_secs(120);

/// While sending a command's input: how long the channel may take nothing before flip looks
/// whether the command has ended.
const INPUT_POLL: Duration = Duration::from_secs(1);

/// An authenticated ssh2 session.
pub(crate) struct Connection {
    session: Session,
    /// The TCP socket's fd (owned by the session), for polling in the pump.
    fd: RawFd,
    cfg: HostConfig,
}

impl Connection {
    /// Connects, checks the host key and authenticates.
    pub(crate) fn open(opts: &SshOptions, cfg: HostConfig) -> Result<Connection, TransportError> {
        let tcp = tcp_connect(&cfg)?;
        let fd = tcp.as_raw_fd();
        let ssh_err = |phase: &str, e: ssh2::Error| TransportError::Ssh {
            host: cfg.address(),
            phase: phase.to_string(),
            message: e.message().to_string(),
        };

        let mut session = Session::new().map_err(|e| ssh_err("creating an ssh session", e))?;
        session.set_tcp_stream(tcp);
        session.set_timeout(millis(cfg.connect_timeout));
        // Prefer the host key types already recorded for this host, like OpenSSH.
        let known =
            known_hosts::known_types(&session, &cfg.known_hosts_files(), &cfg.host_name, cfg.port);
        if let Ok(supported) = session.supported_algs(MethodType::HostKey) {
            if let Some(prefs) = known_hosts::host_key_prefs(&known, &supported) {
                let _ = session.method_pref(MethodType::HostKey, &prefs);
            }
        }
        // chacha20-poly1305 first, like OpenSSH: measured on loopback it is libssh2's fastest
        // (its AES-GCM and AES-CTR+HMAC reach only ~60-70% of the OpenSSH client's upload rate).
        for dir in [MethodType::CryptCs, MethodType::CryptSc] {
            let _ = session.method_pref(
                dir,
                "chacha20-poly1305@openssh.com,aes128-gcm@openssh.com,aes256-gcm@openssh.com,\
                 aes128-ctr,aes192-ctr,aes256-ctr",
            );
        }
        session.handshake().map_err(|e| {
            if e.code() == ssh2::ErrorCode::Session(-9) {
                // LIBSSH2_ERROR_TIMEOUT
                TransportError::Connect {
                    host: cfg.address(),
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the SSH handshake timed out after {} s",
                            cfg.connect_timeout.as_secs_f32()
                        ),
                    ),
                }
            } else {
                ssh_err("the SSH handshake", e)
            }
        })?;

        check_host_key(&session, &cfg, opts.quiet)?;
        authenticate(&session, opts, &cfg)?;

        // No SSH keepalives yet: in blocking mode libssh2 gives up with "Timed out waiting on
        // socket" once a keepalive interval passes without data (a slow login shell would
        // do). The pump enables them.
        session.set_timeout(millis(OP_TIMEOUT));
        Ok(Connection { session, fd, cfg })
    }

    fn ssh_err(&self, phase: &str, e: ssh2::Error) -> TransportError {
        TransportError::Ssh {
            host: self.cfg.address(),
            phase: phase.to_string(),
            message: e.message().to_string(),
        }
    }

    fn io_err(&self, phase: &str, e: io::Error) -> TransportError {
        TransportError::Ssh {
            host: self.cfg.address(),
            phase: phase.to_string(),
            message: e.to_string(),
        }
    }
}

impl Connection {
    /// Opens a session channel. OpenSSH's `sshd` sends a small message right after the
    /// authentication (its host keys, `hostkeys-00@openssh.com`, which wants no reply) and the
    /// channel's confirmation after it; with Nagle's algorithm on its side (a session without a
    /// terminal), the confirmation waits until the client acknowledges the first, which Linux
    /// delays by up to 40 ms (measured on loopback: 42 ms of a 90 ms `flip releases`). So the
    /// channel is opened in non-blocking mode, and each time the socket has something to read
    /// its acknowledgement goes out at once (`TCP_QUICKACK`).
    fn open_channel(&self, phase: &str) -> Result<ssh2::Channel, TransportError> {
        self.session.set_blocking(false);
        let started = std::time::Instant::now();
        let opened = loop {
            match self.session.channel_session() {
                Err(e) if e.code() == ssh2::ErrorCode::Session(pump::LIBSSH2_ERROR_EAGAIN) => {
                    if started.elapsed() > OP_TIMEOUT {
                        self.session.set_blocking(true);
                        return Err(TransportError::Ssh {
                            host: self.cfg.address(),
                            phase: phase.to_string(),
                            message: format!(
                                "the server did not open a channel within {} s",
                                OP_TIMEOUT.as_secs()
                            ),
                        });
                    }
                    let events = match self.session.block_directions() {
                        ssh2::BlockDirections::Outbound => libc::POLLOUT,
                        ssh2::BlockDirections::Both => libc::POLLIN | libc::POLLOUT,
                        _ => libc::POLLIN,
                    };
                    let mut fd = libc::pollfd {
                        fd: self.fd,
                        events,
                        revents: 0,
                    };
                    // SAFETY: poll(2) on one pollfd we own, for the session's socket (open
                    // while the session is).
                    unsafe { libc::poll(&mut fd, 1, 1000) };
                    quick_ack(self.fd);
                }
                other => break other,
            }
        };
        self.session.set_blocking(true);
        opened.map_err(|e| self.ssh_err(phase, e))
    }

    /// Sends `input` to the command of `channel` (the session's timeout set to
    /// [`INPUT_POLL`]). Each time the channel takes nothing for that long, what the command
    /// printed is read into `stdout` and `stderr`: true when the command ended (its output
    /// closed) without reading all of it; an error after [`OP_TIMEOUT`] without progress.
    fn send_input(
        &self,
        channel: &mut ssh2::Channel,
        input: &mut dyn Read,
        stdout: &mut Vec<u8>,
        stderr: &mut Vec<u8>,
    ) -> Result<bool, TransportError> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(TransportError::Other(format!("reading input: {e}"))),
            };
            let mut pending = &buf[..n];
            let mut progress = std::time::Instant::now();
            while !pending.is_empty() {
                match channel.write(pending) {
                    Ok(0) => {}
                    Ok(k) => {
                        pending = &pending[k..];
                        progress = std::time::Instant::now();
                    }
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        self.session.set_blocking(false);
                        let drained = drain(channel, stdout).and_then(|_| {
                            let mut err = channel.stderr();
                            drain(&mut err, stderr)
                        });
                        self.session.set_blocking(true);
                        drained.map_err(|e| self.io_err("sending data", e))?;
                        if channel.eof() {
                            return Ok(true);
                        }
                        if progress.elapsed() >= OP_TIMEOUT {
                            return Err(self.io_err("sending data", e));
                        }
                    }
                    Err(e) => return Err(self.io_err("sending data", e)),
                }
            }
        }
    }
}

/// Appends to `out` what `from` has now (non-blocking), up to its end.
fn drain(from: &mut dyn Read, out: &mut Vec<u8>) -> io::Result<()> {
    let mut buf = [0u8; 32 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

impl Remote for Connection {
    fn host(&self) -> &str {
        &self.cfg.alias
    }

    fn run(
        &mut self,
        command: &str,
        input: Option<&mut dyn Read>,
    ) -> Result<Output, TransportError> {
        let phase = "running a command";
        let mut channel = self.open_channel("opening a channel")?;
        channel.exec(command).map_err(|e| self.ssh_err(phase, e))?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut ended = false;
        if let Some(input) = input {
            // Short waits while sending: a command that ended without reading all its input
            // (an upload script that failed) never opens the channel's window again.
            self.session.set_timeout(millis(INPUT_POLL));
            let sent = self.send_input(&mut channel, input, &mut stdout, &mut stderr);
            self.session.set_timeout(millis(OP_TIMEOUT));
            ended = sent?;
        }
        if !ended {
            channel
                .send_eof()
                .map_err(|e| self.ssh_err("sending data", e))?;
        }
        channel
            .read_to_end(&mut stdout)
            .map_err(|e| self.io_err(phase, e))?;
        channel
            .stderr()
            .read_to_end(&mut stderr)
            .map_err(|e| self.io_err(phase, e))?;
        channel.wait_close().map_err(|e| self.ssh_err(phase, e))?;
        let status = match channel.exit_signal() {
            Ok(sig) if sig.exit_signal.is_some() => None,
            _ => channel.exit_status().ok(),
        };
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    fn stream(
        self: Box<Self>,
        command: &str,
        what: &str,
        stderr: Box<dyn Write + Send>,
        preamble: bool,
    ) -> Result<AgentStream, TransportError> {
        let phase = "starting the agent";
        // A round trip (the server's reply), and little work on either side.
        let opened = std::time::Instant::now();
        let mut channel = self.open_channel(phase)?;
        let round_trip = Some(opened.elapsed());
        let pipelined = pipelines_exec(self.session.banner());
        // The first batch in the command line (`Parts::deferred`): the pump sends the `exec`.
        let deferred = (pipelined && preamble).then(|| command.to_string());
        let exec = if deferred.is_some() {
            self.session.set_blocking(false);
            None
        } else if pipelined {
            // Sent without waiting for the reply: the pump reads it, and the client's first
            // bytes follow the request at once, saving a round trip.
            self.session.set_blocking(false);
            match channel.exec(command) {
                Ok(()) => None,
                Err(e) if e.code() == ssh2::ErrorCode::Session(pump::LIBSSH2_ERROR_EAGAIN) => {
                    Some(command.to_string())
                }
                Err(e) => return Err(self.ssh_err(phase, e)),
            }
        } else {
            channel.exec(command).map_err(|e| self.ssh_err(phase, e))?;
            None
        };
        let host = self.cfg.alias.clone();
        let relay = Relay::new(&host, stderr);
        let address = self.cfg.address();
        let parts = pump::Parts {
            session: self.session,
            channel,
            exec,
            fd: self.fd,
            host: host.clone(),
            peer: format!("{}@{}", self.cfg.user, host),
            what: format!("{what} on {host}"),
            keepalive: self.cfg.keepalive,
            relay,
            deferred,
            round_trip,
        };
        pump::start(parts).map_err(|e| TransportError::Ssh {
            host: address,
            phase: phase.to_string(),
            message: format!("starting the pump of the connection: {e}"),
        })
    }
}

/// Whether the server (by its version `banner`) runs an `exec` request before it reads the
/// next message of the connection, so that channel data sent right behind the request reaches
/// the command: OpenSSH's `sshd` starts the command while handling the request, and its
/// channel takes data from then on. Other servers get the reply awaited first: one that drops
/// data arriving before its command started would leave the agent without its `Hello`.
fn pipelines_exec(banner: Option<&str>) -> bool {
    banner.is_some_and(|b| b.starts_with("SSH-2.0-OpenSSH_"))
}

/// Acknowledges at once what the socket `fd` received (`TCP_QUICKACK`: sends a delayed
/// acknowledgement now); a failure only leaves the kernel's own timing.
#[cfg(target_os = "linux")]
fn quick_ack(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt(2) with a pointer to an int we own and its size, on the session's
    // socket.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Elsewhere acknowledgements keep the kernel's own timing.
#[cfg(not(target_os = "linux"))]
fn quick_ack(_fd: RawFd) {}

fn millis(d: Duration) -> u32 {
    d.as_millis().clamp(1, u32::MAX as u128) as u32
}

/// TCP connect to each resolved address in turn, with the connect timeout, then TCP_NODELAY and
/// keepalives (so a silently dead peer is noticed).
fn tcp_connect(cfg: &HostConfig) -> Result<TcpStream, TransportError> {
    let host = if cfg.alias == cfg.host_name {
        cfg.address()
    } else {
        format!("{} ({})", cfg.alias, cfg.address())
    };
    let addrs: Vec<SocketAddr> = (cfg.host_name.as_str(), cfg.port)
        .to_socket_addrs()
        .map_err(|source| TransportError::Connect {
            host: host.clone(),
            source,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, cfg.connect_timeout) {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                set_keepalive(&tcp);
                return Ok(tcp);
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                last = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("timed out after {} s", cfg.connect_timeout.as_secs_f32()),
                );
            }
            Err(e) => last = e,
        }
    }
    Err(TransportError::Connect { host, source: last })
}

/// TCP keepalive probes after 30 s idle, every 10 s, 3 failures; and unacknowledged data for
/// 60 s drops the connection (TCP_USER_TIMEOUT), which with SSH keepalives bounds how long a
/// dead link can stall a deploy.
fn set_keepalive(tcp: &TcpStream) {
    let fd = tcp.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: setsockopt on a socket we own, with a c_int option value.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    #[cfg(target_os = "linux")]
    {
        set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
        set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 60_000);
    }
}

/// Checks the server's host key against known_hosts; records a new one if allowed.
fn check_host_key(session: &Session, cfg: &HostConfig, quiet: bool) -> Result<(), TransportError> {
    let host = cfg.address();
    let (blob, _) = session.host_key().ok_or_else(|| TransportError::Ssh {
        host: host.clone(),
        phase: "checking the host key".to_string(),
        message: "the server sent no host key".to_string(),
    })?;
    let key_type = known_hosts::blob_type(blob);
    let fingerprint = session
        .host_key_hash(HashType::Sha256)
        .map(known_hosts::fingerprint)
        .unwrap_or_else(|| "SHA256:?".to_string());
    let files = cfg.known_hosts_files();
    let verdict =
        known_hosts::check(session, &files, &cfg.host_name, cfg.port, blob).map_err(|e| {
            TransportError::Ssh {
                host: host.clone(),
                phase: "checking the host key".to_string(),
                message: format!("reading {e}"),
            }
        })?;
    match verdict {
        Verdict::Known => Ok(()),
        Verdict::Changed { file } | Verdict::Revoked { file } => {
            Err(TransportError::HostKeyChanged {
                host,
                key_type,
                fingerprint,
                known_hosts: file,
            })
        }
        Verdict::Unknown { other_types } if !other_types.is_empty() => {
            let mut known_types = other_types;
            known_types.sort();
            known_types.dedup();
            Err(TransportError::HostKeyOtherType {
                host,
                offered: format!("{key_type} {fingerprint}"),
                known_types: known_types.join(", "),
                known_hosts: cfg.known_hosts.clone(),
            })
        }
        Verdict::Unknown { .. } if cfg.unknown_hosts == UnknownHosts::AcceptNew => {
            known_hosts::append(&cfg.known_hosts, &cfg.host_name, cfg.port, blob).map_err(|e| {
                TransportError::Ssh {
                    host: host.clone(),
                    phase: "recording the host key".to_string(),
                    message: format!("writing {}: {e}", cfg.known_hosts.display()),
                }
            })?;
            if !quiet {
                eprintln!(
                    "flip: added the {key_type} host key of {host} ({fingerprint}) to {}",
                    cfg.known_hosts.display()
                );
            }
            Ok(())
        }
        Verdict::Unknown { .. } => Err(TransportError::HostKeyUnknown {
            host,
            key_type,
            fingerprint,
            known_hosts: cfg.known_hosts.clone(),
        }),
    }
}

/// Public key authentication in OpenSSH's order: the agent's keys, then the key files
/// (`--identity`, the config's `IdentityFile`s, the default `~/.ssh/id_*`), without asking
/// for the server's methods first (a round trip saved on every login; asked after a failure). Passphrase-protected
/// files are skipped (flip never prompts); if nothing else worked, the error says to use the
/// agent.
fn authenticate(
    session: &Session,
    opts: &SshOptions,
    cfg: &HostConfig,
) -> Result<(), TransportError> {
    let user = cfg.user.as_str();
    let login = cfg.login();
    let mut tried: Vec<String> = Vec::new();

    // Public keys of the identity files, to filter agent keys under IdentitiesOnly.
    let file_blobs: Vec<Vec<u8>> = cfg
        .identities
        .iter()
        .filter_map(|p| public_blob(&pub_path(p)))
        .collect();

    if let Some(socket) = opts.agent_socket() {
        match try_agent(session, user, &socket, cfg, &file_blobs, &mut tried) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(note) => tried.push(note),
        }
    }

    let mut encrypted: Option<PathBuf> = None;
    for key in &cfg.identities {
        match key_file_state(key) {
            KeyFile::Missing => {
                tried.push(format!("{} (missing)", key.display()));
                continue;
            }
            KeyFile::Encrypted => {
                tried.push(format!("{} (passphrase-protected, skipped)", key.display()));
                encrypted.get_or_insert_with(|| key.clone());
                continue;
            }
            KeyFile::Plain => {}
        }
        let public = pub_path(key);
        let public = public.exists().then_some(public);
        match session.userauth_pubkey_file(user, public.as_deref(), key, None) {
            Ok(()) if session.authenticated() => return Ok(()),
            Ok(()) => tried.push(key.display().to_string()),
            Err(e) => {
                if is_disconnect(&e) {
                    return Err(TransportError::Ssh {
                        host: cfg.address(),
                        phase: "authenticating".to_string(),
                        message: format!(
                            "the server closed the connection ({}); tried: {}",
                            e.message(),
                            tried.join(", ")
                        ),
                    });
                }
                // Why this key did not do (unreadable, not a key, refused), with its path.
                tried.push(format!("{} ({})", key.display(), e.message()));
            }
        }
    }
    // The methods are asked for only now (a round trip: the "none" method, which may even
    // succeed), to say why no key worked when the server takes no public key at all.
    match session.auth_methods(user) {
        Ok(methods) if !methods.split(',').any(|m| m == "publickey") => {
            return Err(TransportError::Auth {
                target: login,
                tried: format!(
                    "nothing: the server accepts only {methods}, and flip uses public keys"
                ),
            });
        }
        Err(_) if session.authenticated() => return Ok(()),
        // Otherwise what was tried says it (a server that hung up after too many keys too).
        _ => {}
    }
    if let Some(key) = encrypted {
        return Err(TransportError::KeyEncrypted { target: login, key });
    }
    if tried.is_empty() {
        tried.push("no keys: no ssh-agent, no --identity, no ~/.ssh/id_* files".to_string());
    }
    Err(TransportError::Auth {
        target: login,
        tried: tried.join(", "),
    })
}

/// Tries the agent's keys. Ok(true) when authenticated; Err with a note if the agent is
/// unusable.
fn try_agent(
    session: &Session,
    user: &str,
    socket: &Path,
    cfg: &HostConfig,
    file_blobs: &[Vec<u8>],
    tried: &mut Vec<String>,
) -> Result<bool, String> {
    let unusable = |e: ssh2::Error| format!("ssh-agent at {} ({})", socket.display(), e.message());
    let mut agent = session.agent().map_err(unusable)?;
    agent.set_identity_path(socket).map_err(unusable)?;
    agent.connect().map_err(unusable)?;
    agent.list_identities().map_err(unusable)?;
    let identities = agent.identities().map_err(unusable)?;
    for identity in identities {
        if cfg.identities_only && !file_blobs.iter().any(|b| b == identity.blob()) {
            continue;
        }
        if agent.userauth(user, &identity).is_ok() && session.authenticated() {
            let _ = agent.disconnect();
            return Ok(true);
        }
        tried.push(format!("agent key {}", identity.comment()));
    }
    let _ = agent.disconnect();
    Ok(false)
}

fn is_disconnect(e: &ssh2::Error) -> bool {
    // LIBSSH2_ERROR_SOCKET_SEND (-7), SOCKET_DISCONNECT (-13), SOCKET_RECV (-43)
    matches!(e.code(), ssh2::ErrorCode::Session(-7 | -13 | -43))
}

fn pub_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// The key blob of an OpenSSH `.pub` file.
fn public_blob(path: &Path) -> Option<Vec<u8>> {
    use base64::Engine;
    let text = std::fs::read_to_string(path).ok()?;
    let b64 = text.split_whitespace().nth(1)?;
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

#[derive(Debug, PartialEq, Eq)]
enum KeyFile {
    Missing,
    Encrypted,
    Plain,
}

/// Whether a private key file exists and is passphrase-protected: OpenSSH format (cipher name
/// in the header) or PEM (`Proc-Type: 4,ENCRYPTED` / `ENCRYPTED PRIVATE KEY`).
fn key_file_state(path: &Path) -> KeyFile {
    use base64::Engine;
    let Ok(text) = std::fs::read_to_string(path) else {
        return if path.exists() {
            KeyFile::Plain // unreadable as text: let libssh2 report it
        } else {
            KeyFile::Missing
        };
    };
    if text.contains("ENCRYPTED") {
        return KeyFile::Encrypted;
    }
    if let Some(body) = text
        .split("-----BEGIN OPENSSH PRIVATE KEY-----")
        .nth(1)
        .and_then(|rest| rest.split("-----END").next())
    {
        let b64: String = body.split_whitespace().collect();
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b64) {
            // "openssh-key-v1\0", then string ciphername.
            let magic = b"openssh-key-v1\0";
            if let Some(rest) = bytes.strip_prefix(magic.as_slice()) {
                if rest.len() >= 4 {
                    let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                    if rest.get(4..4 + n) != Some(b"none".as_slice()) {
                        return KeyFile::Encrypted;
                    }
                }
            }
        }
    }
    KeyFile::Plain
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A command that ends without reading its input (an upload script that cannot create
    /// its directory) while more than the channel's window is still to send: `run` returns
    /// how it ended and what it printed, at once, not "timed out" when OP_TIMEOUT has passed.
    #[test]
    fn run_returns_when_the_command_ends_without_reading_its_input() {
        let sshd = flip_testkit::Sshd::start();
        let home = tempfile::tempdir().unwrap();
        sshd.write_known_hosts(&home.path().join(".ssh/known_hosts"));
        let opts = SshOptions {
            identity: Some(sshd.user_key()),
            home: Some(home.path().to_path_buf()),
            agent_socket: Some(std::path::PathBuf::new()),
            ..Default::default()
        };
        let target = super::super::SshTarget {
            user: Some("root".to_string()),
            host: "127.0.0.1".to_string(),
            port: Some(sshd.port()),
            path: "/tmp".to_string(),
        };
        let mut remote = super::super::open(&target, &opts).unwrap();
        let input = vec![7u8; 32 << 20];
        let out = remote
            .run("echo cannot write >&2; exit 3", Some(&mut input.as_slice()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.status, Some(3));
        assert_eq!(String::from_utf8_lossy(&out.stderr), "cannot write\n");
    }

    #[test]
    fn detects_encrypted_openssh_keys() {
        let dir = tempfile::tempdir().unwrap();
        for (name, pass) in [("plain", ""), ("locked", "secret")] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", pass, "-f"])
                .arg(dir.path().join(name))
                .status()
                .unwrap();
            assert!(status.success());
        }
        assert_eq!(key_file_state(&dir.path().join("plain")), KeyFile::Plain);
        assert_eq!(
            key_file_state(&dir.path().join("locked")),
            KeyFile::Encrypted
        );
        assert_eq!(key_file_state(&dir.path().join("nope")), KeyFile::Missing);
        assert!(public_blob(&dir.path().join("plain.pub")).is_some());
    }
}
