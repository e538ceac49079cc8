//! The system ssh client as the transport (`--ssh-command "ssh -F cfg"`, like `rsync -e`):
//! `<words> [-p PORT] [-i KEY] [-o StrictHostKeyChecking=accept-new] -- [user@]host COMMAND`
//! as a child process, streaming over its stdin/stdout. The client does its own config, host
//! key checking and authentication; its failures (exit status 255) are classified from its
//! messages into the same error kinds as the built-in transport.

use super::stderr::{Relay, Tail, TAIL_BYTES};
use super::{Output, Remote, SshOptions, SshTarget};
use crate::{AgentStream, Finish, TransportError};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// ssh's exit status for its own failures (connection, host key, authentication).
const SSH_FAILED: i32 = 255;

pub(crate) struct SystemSsh {
    argv: Vec<String>,
    /// `[user@]host` as passed to ssh.
    destination: String,
    host: String,
}

impl SystemSsh {
    pub(crate) fn new(
        target: &SshTarget,
        opts: &SshOptions,
        ssh_command: &str,
    ) -> Result<SystemSsh, TransportError> {
        let bad = |message: String| TransportError::SshCommandInvalid {
            command: ssh_command.to_string(),
            message,
        };
        let mut argv = shell_words::split(ssh_command)
            .map_err(|e| bad(format!("cannot split it into words: {e}")))?;
        if argv.is_empty() {
            return Err(bad(
                "it is empty, where it names the ssh client (\"ssh -F cfg\")".to_string(),
            ));
        }
        // The protocol is binary: never a terminal on the server (a config's `RequestTTY
        // force` would turn its bytes into a tty's).
        argv.push("-T".to_string());
        if let Some(config) = &opts.config_file {
            argv.extend(["-F".to_string(), config.display().to_string()]);
        }
        if let Some(port) = target.port {
            argv.extend(["-p".to_string(), port.to_string()]);
        }
        if let Some(identity) = &opts.identity {
            argv.extend(["-i".to_string(), identity.display().to_string()]);
        }
        if opts.accept_new_host_key {
            argv.extend([
                "-o".to_string(),
                "StrictHostKeyChecking=accept-new".to_string(),
            ]);
        }
        Ok(SystemSsh {
            argv,
            destination: target.peer(),
            host: target.host.clone(),
        })
    }

    fn command(&self, remote_command: &str) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .arg("--")
            .arg(&self.destination)
            .arg(remote_command);
        cmd
    }

    fn spawn_error(&self, source: io::Error) -> TransportError {
        TransportError::SshCommand {
            program: self.argv[0].clone(),
            source,
        }
    }
}

impl Remote for SystemSsh {
    fn host(&self) -> &str {
        &self.host
    }

    fn run(
        &mut self,
        command: &str,
        input: Option<&mut dyn Read>,
    ) -> Result<Output, TransportError> {
        let mut child = self
            .command(command)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.spawn_error(e))?;
        let stdout = read_in_thread(child.stdout.take());
        let stderr = read_in_thread(child.stderr.take());
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            // A write error means ssh ended early; its status and stderr tell why.
            let _ = io::copy(input, &mut stdin);
        }
        let status = child.wait().map_err(|e| self.spawn_error(e))?;
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        if status.code() == Some(SSH_FAILED) {
            return Err(classify(
                &self.host,
                &self.destination,
                &String::from_utf8_lossy(&stderr),
            ));
        }
        Ok(Output {
            status: status.code(),
            stdout,
            stderr,
        })
    }

    fn stream(
        self: Box<Self>,
        command: &str,
        what: &str,
        stderr: Box<dyn Write + Send>,
        _preamble: bool,
    ) -> Result<AgentStream, TransportError> {
        let mut child = self
            .command(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.spawn_error(e))?;
        let writer = child.stdin.take().expect("piped stdin");
        let reader = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let relay = Relay::new(&self.host, stderr);
        let tail = relay.tail.clone();
        let gate = Arc::new(Mutex::new(Gate {
            relay,
            held: Some(Vec::new()),
        }));
        let relay_gate = gate.clone();
        let relay_thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match err.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => lock(&relay_gate).data(&buf[..n]),
                }
            }
        });
        Ok(AgentStream {
            seal: crate::no_seal(),
            round_trip: None,
            reader: Box::new(OpensGate {
                inner: reader,
                gate: Some(gate.clone()),
            }),
            writer: Box::new(writer),
            handle: Box::new(SystemFinish {
                killable: Arc::new(Mutex::new(Some(child.id()))),
                child,
                relay_thread: Some(relay_thread),
                tail,
                gate,
                what: format!("{what} on {}", self.host),
                host: self.host.clone(),
                destination: self.destination.clone(),
            }),
            peer: self.destination.clone(),
        })
    }
}

/// ssh's stderr on its way to ours. Until the server's first byte reaches stdout, ssh may still
/// be connecting, and what it writes may be its own failure (exit status 255), which
/// [`classify`] makes the error of: that is held back (at most what the tail keeps), and dropped
/// when the error says it, so the cause is told once, in flip's error (which `--json` has too).
/// Otherwise (the server answered, more was written, ssh ended another way, the stream was
/// given up) it is passed on as it came.
struct Gate {
    relay: Relay,
    /// What came before the server's first byte; `None` once passed on or dropped.
    held: Option<Vec<u8>>,
}

impl Gate {
    fn data(&mut self, data: &[u8]) {
        match &mut self.held {
            Some(held) if held.len() + data.len() <= TAIL_BYTES => {
                self.relay.tail.push(data);
                held.extend_from_slice(data);
            }
            Some(_) => {
                self.open();
                self.relay.data(data);
            }
            None => self.relay.data(data),
        }
    }

    /// Passes on what was held, and from now on what comes.
    fn open(&mut self) {
        if let Some(held) = self.held.take() {
            self.relay.show(&held);
        }
    }

    /// The end: what was held is dropped (`said`: the error says it) or passed on, and an
    /// unterminated last line written.
    fn close(&mut self, said: bool) {
        match said {
            true => self.held = None,
            false => self.open(),
        }
        self.relay.finish();
    }
}

fn lock(gate: &Mutex<Gate>) -> MutexGuard<'_, Gate> {
    gate.lock().unwrap_or_else(|e| e.into_inner())
}

/// The server's output (ssh's stdout): its first byte says ssh is connected, and opens the
/// [`Gate`] of its stderr.
struct OpensGate<R> {
    inner: R,
    gate: Option<Arc<Mutex<Gate>>>,
}

impl<R: Read> Read for OpensGate<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            if let Some(gate) = self.gate.take() {
                lock(&gate).open();
            }
        }
        Ok(n)
    }
}

fn read_in_thread<R: Read + Send + 'static>(r: Option<R>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut out);
        }
        out
    })
}

struct SystemFinish {
    child: Child,
    /// The child's pid while it may be killed ([`Finish::aborter`]); taken before it is reaped,
    /// so a kill never reaches a pid the system gave to another process since.
    killable: Arc<Mutex<Option<u32>>>,
    relay_thread: Option<JoinHandle<()>>,
    tail: Tail,
    gate: Arc<Mutex<Gate>>,
    what: String,
    host: String,
    destination: String,
}

impl Drop for SystemFinish {
    /// A session given up without `finish` (after the stream halves were dropped, so the remote
    /// agent sees its input end): wait (bounded) for ssh, which ends when the agent has.
    fn drop(&mut self) {
        self.killable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        crate::local::reap(&mut self.child, crate::local::ABANDON_WAIT);
        // Given up without `finish`: nothing says what ssh wrote.
        lock(&self.gate).open();
    }
}

impl SystemFinish {
    /// ssh's own failure (exit status 255), from what it wrote (`stderr`), and whether the
    /// error quotes that: a connection or authentication failure does; the host key errors say
    /// it their own way, and ssh's lines (the known_hosts line to remove) are passed on.
    fn own_failure(&self, stderr: &str) -> (TransportError, bool) {
        let failed = classify(&self.host, &self.destination, stderr);
        let said = matches!(
            failed,
            TransportError::Connect { .. } | TransportError::Auth { .. }
        );
        (failed, said)
    }
}

impl Finish for SystemFinish {
    fn aborter(&self) -> Option<crate::Aborter> {
        let killable = self.killable.clone();
        Some(Box::new(move || {
            if let Some(pid) = *killable.lock().unwrap_or_else(|e| e.into_inner()) {
                // SAFETY: kill of our own child, not reaped yet (its pid is taken before).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }))
    }

    fn failure(&self) -> Option<TransportError> {
        let pid = self.child.id() as libc::id_t;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let status = loop {
            // SAFETY: a zeroed siginfo_t is a valid buffer for waitid to fill.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid on our own child; WNOWAIT leaves it to be reaped by `finish`.
            let r = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            // SAFETY: si_pid and si_status are set by waitid for a child that exited.
            let (who, status) = unsafe { (info.si_pid(), info.si_status()) };
            if r == 0 && who != 0 {
                break (info.si_code == libc::CLD_EXITED).then_some(status);
            }
            if r != 0 || std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        if status != Some(SSH_FAILED) {
            return None;
        }
        // What ssh wrote before it exited, still on its way through the relay.
        let until = std::time::Instant::now() + std::time::Duration::from_millis(200);
        while self.tail.text().is_empty() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let (failed, said) = self.own_failure(&self.tail.text());
        if said {
            // Not passed on as the server's too.
            lock(&self.gate).close(true);
        }
        Some(failed)
    }

    fn finish(mut self: Box<Self>) -> Result<(), TransportError> {
        self.killable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let status = self.child.wait().map_err(|e| TransportError::SshCommand {
            program: "ssh".to_string(),
            source: e,
        })?;
        if let Some(t) = self.relay_thread.take() {
            let _ = t.join();
        }
        let stderr = self.tail.text();
        let failed = (status.code() == Some(SSH_FAILED)).then(|| self.own_failure(&stderr));
        lock(&self.gate).close(failed.as_ref().is_some_and(|(_, said)| *said));
        if status.success() {
            return Ok(());
        }
        if let Some((e, _)) = failed {
            return Err(e);
        }
        Err(TransportError::Exit {
            what: self.what.clone(),
            status: status.to_string(),
            stderr,
        })
    }
}

/// Turns ssh's own failure messages into the matching error kind.
fn classify(host: &str, destination: &str, stderr: &str) -> TransportError {
    let fingerprint = stderr
        .split_whitespace()
        .find(|w| w.starts_with("SHA256:"))
        .map(|w| w.trim_end_matches('.').to_string())
        .unwrap_or_else(|| "(not shown by ssh)".to_string());
    let key_type = stderr
        .split_whitespace()
        .zip(stderr.split_whitespace().skip(1))
        .find(|(_, next)| *next == "key" || *next == "host")
        .map(|(t, _)| t.to_string())
        .filter(|t| {
            t.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        })
        .unwrap_or_else(|| "host".to_string());
    // "Offending ED25519 key in /root/.ssh/known_hosts:3"
    let known_hosts = stderr
        .lines()
        .find_map(|l| l.split(" key in ").nth(1))
        .map(|p| PathBuf::from(p.rsplit_once(':').map_or(p, |(f, _)| f).trim()))
        .unwrap_or_else(|| PathBuf::from("known_hosts"));
    if stderr.contains("HAS CHANGED") || stderr.contains("REVOKED") {
        TransportError::HostKeyChanged {
            host: host.to_string(),
            key_type,
            fingerprint,
            known_hosts,
        }
    } else if stderr.contains("Host key verification failed") {
        TransportError::HostKeyUnknown {
            host: host.to_string(),
            key_type,
            fingerprint,
            known_hosts,
        }
    } else if stderr.contains("Permission denied") || stderr.contains("Too many authentication") {
        TransportError::Auth {
            target: destination.to_string(),
            tried: format!("the ssh command's keys; ssh said: {}", stderr.trim()),
        }
    } else {
        TransportError::Connect {
            host: host.to_string(),
            source: io::Error::other(if stderr.trim().is_empty() {
                "ssh failed (exit status 255)".to_string()
            } else {
                stderr.trim().to_string()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The system ssh never gets a terminal on the server (the protocol is binary), and gets
    /// `--ssh-config` as `-F`, the port, the key and accept-new after the user's own words.
    #[test]
    fn the_system_ssh_gets_no_tty_and_the_options_given() {
        let target = crate::ssh::parse_target("ssh://deploy@web1:2200/srv/app")
            .unwrap()
            .unwrap();
        let mut opts = SshOptions::new(PathBuf::from("flip"), "0");
        opts.config_file = Some(PathBuf::from("/etc/flip/ssh config"));
        opts.identity = Some(PathBuf::from("/k/id"));
        let ssh = SystemSsh::new(&target, &opts, "ssh -o 'ProxyJump bastion'").unwrap();
        assert_eq!(
            ssh.argv,
            [
                "ssh",
                "-o",
                "ProxyJump bastion",
                "-T",
                "-F",
                "/etc/flip/ssh config",
                "-p",
                "2200",
                "-i",
                "/k/id"
            ]
        );
        assert_eq!(ssh.destination, "deploy@web1");
    }

    #[test]
    fn classifies_ssh_failures() {
        let e = classify(
            "web1",
            "root@web1",
            "No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\nHost key verification failed.\n",
        );
        assert!(
            matches!(e, TransportError::HostKeyUnknown { ref key_type, .. } if key_type == "ED25519"),
            "{e:?}"
        );
        let e = classify("web1", "root@web1", "@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\nThe fingerprint for the ED25519 key sent by the remote host is\nSHA256:abc.\nOffending ED25519 key in /h/.ssh/known_hosts:1\n");
        match e {
            TransportError::HostKeyChanged {
                fingerprint,
                known_hosts,
                ..
            } => {
                assert_eq!(fingerprint, "SHA256:abc");
                assert_eq!(known_hosts, PathBuf::from("/h/.ssh/known_hosts"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(
                "web1",
                "root@web1",
                "root@127.0.0.1: Permission denied (publickey).\n"
            ),
            TransportError::Auth { .. }
        ));
        assert!(matches!(
            classify(
                "web1",
                "root@web1",
                "ssh: connect to host 127.0.0.1 port 1: Connection refused\n"
            ),
            TransportError::Connect { .. }
        ));
    }
}
