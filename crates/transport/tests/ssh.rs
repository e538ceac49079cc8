//! The SSH transport against a real private sshd (flip-testkit). Runs as root, like CI.
//!
//! Each test has its own home directory, passed as `SshOptions::home` (the process environment is
//! shared by the parallel tests, so it is never modified), and the ssh-agent disabled unless the
//! test starts its own.

use flip_testkit::Sshd;
use flip_transport::ssh::{self, SshOptions, SshTarget};
use flip_transport::{AgentStream, TransportError};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A server, a home directory that trusts it, options that log in with its key.
struct Fixture {
    sshd: Sshd,
    home: tempfile::TempDir,
    opts: SshOptions,
    target: SshTarget,
}

impl Fixture {
    fn new() -> Fixture {
        let sshd = Sshd::start();
        let home = tempfile::tempdir().unwrap();
        sshd.write_known_hosts(&home.path().join(".ssh/known_hosts"));
        let opts = SshOptions {
            identity: Some(sshd.user_key()),
            home: Some(home.path().to_path_buf()),
            agent_socket: Some(PathBuf::new()),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        };
        let target = SshTarget {
            user: Some("root".to_string()),
            host: "127.0.0.1".to_string(),
            port: Some(sshd.port()),
            path: "/tmp".to_string(),
        };
        Fixture {
            sshd,
            home,
            opts,
            target,
        }
    }

    fn known_hosts(&self) -> PathBuf {
        self.home.path().join(".ssh/known_hosts")
    }

    /// Runs `command` with no input and returns its stdout; fails the test on errors.
    fn output(&self, command: &str) -> String {
        let stream = ssh::exec(&self.target, &self.opts, command)
            .unwrap_or_else(|e| panic!("{e}\nsshd log:\n{}", self.sshd.log()));
        read_all(stream)
    }
}

/// The errors of connecting without and with accepting new host keys: both must refuse.
fn refused_either_way(f: &mut Fixture) -> Vec<TransportError> {
    [false, true]
        .into_iter()
        .map(|accept| {
            f.opts.accept_new_host_key = accept;
            ssh::exec(&f.target, &f.opts, "true")
                .err()
                .unwrap_or_else(|| panic!("refused (accepting new keys: {accept})"))
        })
        .collect()
}

fn read_all(mut stream: AgentStream) -> String {
    drop(stream.writer);
    let mut out = String::new();
    stream.reader.read_to_string(&mut out).unwrap();
    stream.handle.finish().unwrap();
    out
}

/// A stderr sink the test can look into.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Every stderr line carries the host prefix and the output ends with `expected`. (The server's
/// shell startup files may print warnings of their own before the command runs.)
fn assert_prefixed(captured: &str, host: &str, expected: &str) {
    assert!(
        captured
            .lines()
            .all(|l| l.starts_with(&format!("{host}: "))),
        "{captured}"
    );
    assert!(captured.ends_with(expected), "{captured}");
}

/// Deterministic incompressible-looking bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `data` from one thread while another reads everything back; returns what was read.
fn round_trip(stream: AgentStream, data: Arc<Vec<u8>>) -> Vec<u8> {
    let AgentStream {
        mut reader,
        mut writer,
        handle,
        ..
    } = stream;
    let to_send = data.clone();
    let writer_thread = thread::spawn(move || {
        for chunk in to_send.chunks(256 * 1024) {
            writer.write_all(chunk).unwrap();
        }
        // Dropping the writer sends EOF.
    });
    let reader_thread = thread::spawn(move || {
        let mut got = Vec::with_capacity(data.len());
        reader.read_to_end(&mut got).unwrap();
        got
    });
    writer_thread.join().unwrap();
    let got = reader_thread.join().unwrap();
    handle.finish().unwrap();
    got
}

#[test]
fn echo_round_trip_20_mib_full_duplex() {
    let f = Fixture::new();
    let data = Arc::new(pattern(20 << 20, 7));
    let stream = ssh::exec(&f.target, &f.opts, "cat").unwrap();
    assert_eq!(stream.peer, "root@127.0.0.1");
    let got = round_trip(stream, data.clone());
    assert_eq!(got.len(), data.len());
    assert!(got == *data, "the echoed bytes differ");
}

#[test]
fn unknown_host_is_refused_then_accepted_and_remembered() {
    let mut f = Fixture::new();
    std::fs::remove_file(f.known_hosts()).unwrap();
    let expected = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(f.sshd.dir().join("host_key.pub"))
        .output()
        .unwrap();
    let expected_fp = String::from_utf8_lossy(&expected.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();

    let err = ssh::exec(&f.target, &f.opts, "true")
        .err()
        .expect("refused");
    let message = err.to_string();
    match &err {
        TransportError::HostKeyUnknown { fingerprint, .. } => assert_eq!(fingerprint, &expected_fp),
        other => panic!("expected HostKeyUnknown, got {other:?}"),
    }
    assert!(message.contains(&expected_fp), "{message}");
    assert!(
        message.contains(&format!("127.0.0.1:{}", f.sshd.port())),
        "{message}"
    );

    // Accepting creates ~/.ssh and records the key.
    std::fs::remove_dir_all(f.home.path().join(".ssh")).unwrap();
    f.opts.accept_new_host_key = true;
    assert_eq!(f.output("echo hi"), "hi\n");
    let recorded = std::fs::read_to_string(f.known_hosts()).unwrap();
    assert_eq!(recorded.trim(), f.sshd.host_public_key_line());

    // Next time it is known without accepting.
    f.opts.accept_new_host_key = false;
    assert_eq!(f.output("echo again"), "again\n");

    // Hashed entries (ssh-keygen -H) work too.
    let status = Command::new("ssh-keygen")
        .arg("-q")
        .arg("-H")
        .arg("-f")
        .arg(f.known_hosts())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let hashed = std::fs::read_to_string(f.known_hosts()).unwrap();
    assert!(hashed.starts_with("|1|"), "{hashed}");
    assert_eq!(f.output("echo hashed"), "hashed\n");
}

#[test]
fn strict_host_key_checking_accept_new_in_config() {
    let mut f = Fixture::new();
    std::fs::remove_file(f.known_hosts()).unwrap();
    let config = f.home.path().join(".ssh/config");
    std::fs::write(
        &config,
        "Host 127.0.0.1\n  StrictHostKeyChecking accept-new\n",
    )
    .unwrap();
    assert_eq!(f.output("echo ok"), "ok\n");
    assert!(f.known_hosts().exists());
    f.opts.config_file = Some(config);
    assert_eq!(f.output("echo ok"), "ok\n");
}

#[test]
fn changed_host_key_is_refused_even_when_accepting_new_keys() {
    let mut f = Fixture::new();
    // Record some other ed25519 key for this host:port.
    let other = f.sshd.wrong_user_key("not_the_host_key");
    let other_pub = std::fs::read_to_string(format!("{}.pub", other.display())).unwrap();
    let blob = other_pub.split_whitespace().nth(1).unwrap();
    std::fs::write(
        f.known_hosts(),
        format!("[127.0.0.1]:{} ssh-ed25519 {blob}\n", f.sshd.port()),
    )
    .unwrap();
    for err in refused_either_way(&mut f) {
        assert!(
            matches!(err, TransportError::HostKeyChanged { .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("HAS CHANGED"), "{message}");
        assert!(message.contains("man-in-the-middle"), "{message}");
    }
    // The file was not modified.
    assert_eq!(
        std::fs::read_to_string(f.known_hosts())
            .unwrap()
            .lines()
            .count(),
        1
    );
}

/// known_hosts records an ECDSA key for the host; the server (an impostor, or one whose keys
/// were replaced) offers only an Ed25519 one. The client asks for the recorded type first, so a
/// server that has it shows it: a key of another type is refused, even when accepting new keys,
/// and nothing is recorded (accepting it as "new" let an impostor in).
#[test]
fn a_host_key_of_another_type_than_the_recorded_one_is_refused() {
    let mut f = Fixture::new();
    let ecdsa = f.home.path().join("other_ecdsa");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ecdsa", "-N", "", "-f"])
        .arg(&ecdsa)
        .status()
        .unwrap();
    assert!(st.success());
    let public = std::fs::read_to_string(format!("{}.pub", ecdsa.display())).unwrap();
    let mut words = public.split_whitespace();
    let (kind, blob) = (words.next().unwrap(), words.next().unwrap());
    let recorded = format!("[127.0.0.1]:{} {kind} {blob}\n", f.sshd.port());
    std::fs::write(f.known_hosts(), &recorded).unwrap();
    for err in refused_either_way(&mut f) {
        assert!(
            matches!(err, TransportError::HostKeyOtherType { .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("IS NOT THE ONE RECORDED"), "{message}");
        assert!(message.contains("ecdsa-sha2-nistp256"), "{message}");
        assert!(!message.contains("--accept-new-host-key"), "{message}");
    }
    assert_eq!(std::fs::read_to_string(f.known_hosts()).unwrap(), recorded);
}

/// The system's known_hosts (`GlobalKnownHostsFile`, default `/etc/ssh/ssh_known_hosts`) is
/// read with the user's, as OpenSSH reads it: a host key an organisation pins there is known
/// without asking; one it revokes there is refused though the user's file has it; and one it
/// pins differently is a changed key, refused even when new keys are accepted, and never
/// recorded in the user's file.
#[test]
fn the_systems_known_hosts_pins_and_revokes_keys_too() {
    let mut f = Fixture::new();
    let server = std::fs::read_to_string(f.known_hosts()).unwrap();
    let global = f.home.path().join("ssh_known_hosts");
    let config = f.home.path().join("ssh_config");
    std::fs::write(
        &config,
        format!("Host *\n  GlobalKnownHostsFile {}\n", global.display()),
    )
    .unwrap();
    f.opts.config_file = Some(config);
    // Pinned only in the system's file.
    std::fs::write(&global, &server).unwrap();
    std::fs::write(f.known_hosts(), "").unwrap();
    assert_eq!(f.output("echo ok"), "ok\n");
    assert_eq!(std::fs::read_to_string(f.known_hosts()).unwrap(), "");
    // Revoked there, known in the user's file.
    std::fs::write(f.known_hosts(), &server).unwrap();
    let mut words = server.split_whitespace().skip(1);
    let (kind, blob) = (words.next().unwrap(), words.next().unwrap());
    std::fs::write(&global, format!("@revoked * {kind} {blob}\n")).unwrap();
    let err = ssh::exec(&f.target, &f.opts, "true")
        .err()
        .expect("a revoked key is refused");
    // The message names the file that revokes it, not the user's.
    assert!(
        matches!(&err, TransportError::HostKeyChanged { known_hosts, .. } if *known_hosts == global),
        "{err:?}"
    );
    // Another key of the same type pinned there, nothing in the user's file, new keys accepted.
    let other = f.sshd.wrong_user_key("not_the_host_key");
    let other_pub = std::fs::read_to_string(format!("{}.pub", other.display())).unwrap();
    let other_blob = other_pub.split_whitespace().nth(1).unwrap();
    std::fs::write(
        &global,
        format!("[127.0.0.1]:{} ssh-ed25519 {other_blob}\n", f.sshd.port()),
    )
    .unwrap();
    std::fs::write(f.known_hosts(), "").unwrap();
    f.opts.accept_new_host_key = true;
    let err = ssh::exec(&f.target, &f.opts, "true")
        .err()
        .expect("a key other than the pinned one is refused");
    assert!(
        matches!(&err, TransportError::HostKeyChanged { known_hosts, .. } if *known_hosts == global),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(&format!("the recorded key is in {}", global.display())),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(f.known_hosts()).unwrap(), "");
}

#[test]
fn wrong_key_is_refused_with_a_clear_message() {
    let mut f = Fixture::new();
    let wrong = f.sshd.wrong_user_key("wrong_key");
    f.opts.identity = Some(wrong.clone());
    let err = ssh::exec(&f.target, &f.opts, "true")
        .err()
        .expect("refused");
    assert!(matches!(err, TransportError::Auth { .. }), "{err:?}");
    let message = err.to_string();
    let expected = format!(
        "authentication failed for root@127.0.0.1:{} (tried: ",
        f.sshd.port()
    );
    assert!(message.starts_with(&expected), "{message}");
    assert!(message.contains(&wrong.display().to_string()), "{message}");
}

#[test]
fn encrypted_key_without_agent_is_refused_with_a_clear_message() {
    let mut f = Fixture::new();
    let locked = f.sshd.encrypted_user_key("locked_key", "correct horse");
    f.opts.identity = Some(locked.clone());
    let err = ssh::exec(&f.target, &f.opts, "true")
        .err()
        .expect("refused");
    assert!(
        matches!(err, TransportError::KeyEncrypted { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("passphrase-protected"), "{message}");
    assert!(message.contains("ssh-agent"), "{message}");
    assert!(message.contains(&locked.display().to_string()), "{message}");
}

/// An ssh-agent of our own, stopped on drop.
struct Agent {
    child: std::process::Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh-agent");
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "ssh-agent did not start"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Agent {
            child,
            socket,
            _dir: dir,
        }
    }

    /// `ssh-add KEY` with the passphrase supplied through SSH_ASKPASS.
    fn add(&self, key: &Path, passphrase: &str) {
        let askpass = self._dir.path().join("askpass.sh");
        std::fs::write(&askpass, format!("#!/bin/sh\necho '{passphrase}'\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o700)).unwrap();
        // Other test threads may fork while askpass.sh is still open for writing in this
        // process; exec then fails with ETXTBSY for a moment. Try a few times.
        let mut last = None;
        for _ in 0..5 {
            let out = Command::new("ssh-add")
                .arg(key)
                .env("SSH_AUTH_SOCK", &self.socket)
                .env("SSH_ASKPASS", &askpass)
                .env("SSH_ASKPASS_REQUIRE", "force")
                .env("DISPLAY", ":0")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            last = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            thread::sleep(Duration::from_millis(100));
        }
        panic!("ssh-add failed: {}", last.unwrap_or_default());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn encrypted_key_works_through_the_agent() {
    let mut f = Fixture::new();
    let locked = f.sshd.encrypted_user_key("locked_key", "correct horse");
    let agent = Agent::start();
    agent.add(&locked, "correct horse");
    f.opts.identity = Some(locked);
    f.opts.agent_socket = Some(agent.socket.clone());
    assert_eq!(f.output("echo via-agent"), "via-agent\n");
}

#[test]
fn config_alias_supplies_host_port_user_key_and_known_hosts() {
    let mut f = Fixture::new();
    // Only the config knows the host: no identity option, no known_hosts in ~/.ssh.
    std::fs::remove_file(f.known_hosts()).unwrap();
    let config = f.home.path().join(".ssh/config");
    f.sshd.write_ssh_config(&config, "web1");
    let kh = f.home.path().join(".ssh/known_hosts");
    std::fs::rename(&kh, f.home.path().join("alias_known_hosts")).unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&kh.display().to_string(), "~/alias_known_hosts");
    std::fs::write(&config, text).unwrap();

    f.opts.identity = None;
    f.target = ssh::parse_target("web1:/srv/app").unwrap().unwrap();
    let stream = ssh::exec(&f.target, &f.opts, "whoami").unwrap();
    assert_eq!(stream.peer, "root@web1");
    assert_eq!(read_all(stream), "root\n");
}

#[test]
fn system_ssh_command_transport() {
    let mut f = Fixture::new();
    let config = f.home.path().join("ssh_config");
    f.sshd.write_ssh_config(&config, "web1");
    f.opts.ssh_command = Some(format!("ssh -F {}", config.display()));
    f.opts.identity = None;
    f.target = ssh::parse_target("web1:/srv").unwrap().unwrap();

    let data = Arc::new(pattern(4 << 20, 3));
    let got = round_trip(ssh::exec(&f.target, &f.opts, "cat").unwrap(), data.clone());
    assert!(got == *data);

    // Remote stderr is prefixed; a failing command reports its status and stderr.
    let captured = Captured::default();
    let mut stream = ssh::exec_with_stderr(
        &f.target,
        &f.opts,
        "echo warn >&2; exit 4",
        Box::new(captured.clone()),
    )
    .unwrap();
    let mut out = Vec::new();
    stream.reader.read_to_end(&mut out).unwrap();
    let err = stream.handle.finish().expect_err("exit 4");
    assert!(err.to_string().contains('4'), "{err}");
    assert!(err.to_string().contains("warn"), "{err}");
    assert_prefixed(&captured.text(), "web1", "web1: warn\n");

    // ssh's own failures are classified: an unknown host key.
    std::fs::write(f.home.path().join("known_hosts"), "").unwrap();
    let mut stream = ssh::exec(&f.target, &f.opts, "true").unwrap();
    let mut out = Vec::new();
    let _ = stream.reader.read_to_end(&mut out);
    let err = stream.handle.finish().expect_err("host key refused");
    assert!(
        matches!(err, TransportError::HostKeyUnknown { .. }),
        "{err:?}"
    );
}

#[test]
fn remote_stderr_lines_are_prefixed_and_exit_status_reported() {
    let f = Fixture::new();
    let captured = Captured::default();
    let mut stream = ssh::exec_with_stderr(
        &f.target,
        &f.opts,
        "echo out; echo first >&2; printf 'second\\nunterminated' >&2; exit 3",
        Box::new(captured.clone()),
    )
    .unwrap();
    drop(stream.writer);
    let mut out = String::new();
    stream.reader.read_to_string(&mut out).unwrap();
    assert_eq!(out, "out\n");
    let err = stream.handle.finish().expect_err("exit 3");
    match &err {
        TransportError::Exit { status, stderr, .. } => {
            assert_eq!(status, "exit status 3");
            assert!(stderr.contains("first"), "{stderr}");
        }
        other => panic!("{other:?}"),
    }
    assert_prefixed(
        &captured.text(),
        "127.0.0.1",
        "127.0.0.1: first\n127.0.0.1: second\n127.0.0.1: unterminated\n",
    );
}

#[test]
fn killed_connection_gives_errors_not_a_hang() {
    let f = Fixture::new();
    let stream = ssh::exec(&f.target, &f.opts, "cat").unwrap();
    let AgentStream {
        mut reader,
        mut writer,
        handle,
        ..
    } = stream;
    let started = Instant::now();
    let writer_thread = thread::spawn(move || {
        let chunk = pattern(256 * 1024, 9);
        loop {
            if let Err(e) = writer.write_all(&chunk) {
                return e;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "writer never failed"
            );
        }
    });
    // Kill only once `cat` runs (echoed data arrives): killing the login while the server's
    // shell startup files run can leave their lock files behind (pyenv's rehash lock here).
    let (running_tx, running_rx) = std::sync::mpsc::channel();
    let reader_thread = thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0usize;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return (total, None),
                Ok(n) => {
                    if total == 0 {
                        let _ = running_tx.send(());
                    }
                    total += n;
                }
                Err(e) => return (total, Some(e)),
            }
        }
    });
    running_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("cat echoed nothing");
    thread::sleep(Duration::from_millis(200));
    assert!(f.sshd.kill_connections() > 0);
    let write_err = writer_thread.join().unwrap();
    let (read, read_err) = reader_thread.join().unwrap();
    assert!(read > 0);
    let read_err = read_err.expect("the reader must see an error, not a clean EOF");
    assert!(read_err.to_string().contains("127.0.0.1"), "{read_err}");
    assert!(write_err.to_string().contains("127.0.0.1"), "{write_err}");
    let err = handle
        .finish()
        .expect_err("finish reports the lost connection");
    assert!(
        matches!(err, TransportError::ConnectionLost { .. }),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn connect_errors_name_the_host() {
    let mut f = Fixture::new();
    // Nothing listens on this port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    f.target.port = Some(port);
    let err = ssh::exec(&f.target, &f.opts, "true").err().unwrap();
    assert!(matches!(err, TransportError::Connect { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );

    // A server that accepts but never speaks: the handshake times out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    f.target.port = Some(silent.local_addr().unwrap().port());
    f.opts.connect_timeout = Duration::from_millis(500);
    let start = Instant::now();
    let err = ssh::exec(&f.target, &f.opts, "true").err().unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, TransportError::Connect { .. }), "{err:?}");
}

/// A fake flip: `--version` prints `flip VERSION`; `agent ARGS` prints its args to stderr and
/// echoes stdin (like `cat`).
/// A fake flip: `--version` prints `flip VERSION`, `blake3 FILE` prints its own blake3 (kept
/// beside it, in `PATH.b3`, as an uploaded copy checks itself), anything else echoes what its
/// `--preamble` words hold, then its stdin.
fn fake_flip(path: &Path, version: &str) {
    std::fs::write(
        path,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'flip {version}'; exit 0; fi\n\
             if [ \"$1\" = blake3 ]; then cat '{path}.b3'; exit 0; fi\n\
             echo \"args: $*\" >&2\n\
             for a; do case $a in --preamble=*) printf %s \"${{a#--preamble=}}\" | base64 -d;; esac; done\n\
             exec cat\n",
            path = path.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        format!("{}.b3", path.display()),
        format!("{}  x\n", hash_of(path)),
    )
    .unwrap();
}

/// blake3 of a file, lowercase hex.
fn hash_of(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap())
        .to_hex()
        .to_string()
}

#[test]
fn connect_agent_runs_remote_flip_with_quoted_args() {
    let mut f = Fixture::new();
    let flip = f.home.path().join("fake flip");
    fake_flip(&flip, "0.0.1");
    f.opts.remote_flip = Some(ssh::shell_quote(&flip.display().to_string()));
    let captured = Captured::default();
    let stream = ssh::connect_agent_with_stderr(
        &f.target,
        &f.opts,
        &["--root".to_string(), "/srv/my app".to_string()],
        Box::new(captured.clone()),
    )
    .unwrap();
    let data = Arc::new(pattern(1 << 20, 5));
    assert!(round_trip(stream, data.clone()) == *data);
    assert_prefixed(
        &captured.text(),
        "127.0.0.1",
        "127.0.0.1: args: agent --root /srv/my app\n",
    );
}

/// Removes a file in the server's (= this machine's) root home when dropped.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Makes the fixture's flip a fake one of a version no real flip has (`tag`, this process),
/// so the server (this machine, as root) has no agent for it: where it gets uploaded to, and
/// what removes it from there when dropped.
fn missing_agent(f: &mut Fixture, tag: &str) -> (PathBuf, Cleanup) {
    let version = format!("0.0.0-{tag}{}", std::process::id());
    let local = f.home.path().join("local-flip");
    fake_flip(&local, &version);
    let hash = hash_of(&local);
    f.opts.local_exe = local;
    f.opts.version = version.clone();
    let remote_home = f.output("printf %s \"$HOME\"");
    let installed = Path::new(&remote_home).join(format!(".cache/flip/flip-{version}-{hash}"));
    (installed.clone(), Cleanup(installed))
}

#[test]
fn connect_agent_uploads_flip_when_the_server_has_none() {
    let mut f = Fixture::new();
    let (installed, _cleanup) = missing_agent(&mut f, "test");

    let args = ["--root".to_string(), "/srv/app".to_string()];
    let captured = Captured::default();
    let stream =
        ssh::connect_agent_with_stderr(&f.target, &f.opts, &args, Box::new(captured.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
    // More than the buffers between the two ends hold, written before the launcher said it
    // found no agent: all of it reaches the uploaded one (echoed back while it is sent again).
    let data = Arc::new(pattern(6 << 20, 11));
    assert!(round_trip(stream, data.clone()) == *data);
    assert!(
        installed.exists(),
        "not installed at {}",
        installed.display()
    );
    assert!(
        captured.text().contains("args: agent --root /srv/app"),
        "{}",
        captured.text()
    );

    assert!(
        captured.text().contains("has no flip"),
        "{}",
        captured.text()
    );

    // The second time it is found in the cache: no upload.
    let before = std::fs::metadata(&installed).unwrap().ino();
    let captured = Captured::default();
    let stream =
        ssh::connect_agent_with_stderr(&f.target, &f.opts, &args, Box::new(captured.clone()))
            .unwrap();
    let data = Arc::new(pattern(1000, 12));
    assert!(round_trip(stream, data.clone()) == *data);
    assert!(
        !captured.text().contains("has no flip"),
        "{}",
        captured.text()
    );
    assert_eq!(std::fs::metadata(&installed).unwrap().ino(), before);
}

/// An "ssh command" that runs the remote command locally with a fake `uname` first on the PATH,
/// to play a server of another platform.
#[test]
fn connect_agent_refuses_uploading_to_another_platform() {
    let mut f = Fixture::new();
    let dir = f.home.path();
    let bin = dir.join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = |path: &Path, body: &str| {
        std::fs::write(path, body).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    script(&bin.join("uname"), "#!/bin/sh\necho 'Plan9 mips'\n");
    let fake_ssh = dir.join("fake-ssh");
    // The server's home is not the client's: the client keeps its own files in its
    // ~/.cache/flip (the agents' hashes).
    let server_home = dir.join("server");
    std::fs::create_dir_all(&server_home).unwrap();
    script(
        &fake_ssh,
        &format!(
            "#!/bin/sh\nwhile [ \"$1\" != -- ]; do shift; done\nshift 2\n\
             HOME={home} PATH={bin}:/usr/bin:/bin exec sh -c \"$1\"\n",
            home = server_home.display(),
            bin = bin.display()
        ),
    );
    f.opts.ssh_command = Some(fake_ssh.display().to_string());
    f.opts.version = "0.0.0-nowhere".to_string();
    // The launch is pipelined: the stream is returned at once, and its first read (what the
    // client does after its first requests) says why no agent could be started.
    let mut stream = ssh::connect_agent(&f.target, &f.opts, &[]).unwrap();
    let read = stream.reader.read(&mut [0u8; 16]).expect_err("refused");
    let err = *read
        .into_inner()
        .expect("the transport's error")
        .downcast::<TransportError>()
        .expect("a TransportError");
    match &err {
        TransportError::Platform { local, remote, .. } => {
            assert_eq!(remote, "Plan9 mips");
            assert_ne!(local, remote);
        }
        other => panic!("{other:?}"),
    }
    let m = err.to_string();
    assert!(m.contains("Plan9 mips") && m.contains("127.0.0.1"), "{m}");
    assert!(
        !server_home.join(".cache/flip").exists(),
        "nothing may be uploaded"
    );
}

/// Upload throughput against the system client: `cargo test --release -p flip-transport --test
/// ssh -- --ignored --nocapture throughput`.
#[test]
#[ignore = "a benchmark; run it in release mode"]
fn throughput_vs_system_ssh() {
    let f = Fixture::new();
    let size = 512usize << 20;
    let data = pattern(size, 1);
    let file = f.home.path().join("payload");
    std::fs::write(&file, &data).unwrap();
    let config = f.home.path().join("ssh_config");
    f.sshd.write_ssh_config(&config, "web1");
    let mib = |secs: f64| size as f64 / secs / (1 << 20) as f64;

    for round in 0..2 {
        let start = Instant::now();
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cat {} | ssh -F {} web1 'cat >/dev/null'",
                file.display(),
                config.display()
            ))
            .status()
            .unwrap();
        assert!(status.success());
        let system = mib(start.elapsed().as_secs_f64());

        let start = Instant::now();
        let mut stream = ssh::exec(&f.target, &f.opts, "cat >/dev/null").unwrap();
        for chunk in data.chunks(256 * 1024) {
            stream.writer.write_all(chunk).unwrap();
        }
        drop(stream.writer);
        stream.handle.finish().unwrap();
        let ours = mib(start.elapsed().as_secs_f64());
        println!(
            "upload round {round}: system ssh {system:.0} MiB/s, flip ssh2 {ours:.0} MiB/s ({:.0}%)",
            ours / system * 100.0
        );

        let remote = format!("head -c {size} {}", file.display());
        let start = Instant::now();
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ssh -F {} web1 '{remote}' >/dev/null",
                config.display()
            ))
            .status()
            .unwrap();
        assert!(status.success());
        let system = mib(start.elapsed().as_secs_f64());
        let start = Instant::now();
        let mut stream = ssh::exec(&f.target, &f.opts, &remote).unwrap();
        drop(stream.writer);
        let n = std::io::copy(&mut stream.reader, &mut std::io::sink()).unwrap();
        assert_eq!(n as usize, size);
        stream.handle.finish().unwrap();
        let ours = mib(start.elapsed().as_secs_f64());
        println!(
            "download round {round}: system ssh {system:.0} MiB/s, flip ssh2 {ours:.0} MiB/s ({:.0}%)",
            ours / system * 100.0
        );
    }
}

/// Slow logins and silences longer than the keepalive interval are fine, in the blocking phase
/// (probe, upload) and while streaming: every login here takes 2 s (a forced command sleeps before
/// running the requested one) and keepalives go out every second.
#[test]
fn slow_login_and_idle_stream_with_short_keepalive() {
    let mut f = Fixture::new();
    let remote_home = f.output("printf %s \"$HOME\"");
    let ak = f.sshd.dir().join("authorized_keys");
    let key = std::fs::read_to_string(&ak).unwrap();
    std::fs::write(
        &ak,
        format!("command=\"sleep 2; eval \\\"$SSH_ORIGINAL_COMMAND\\\"\" {key}"),
    )
    .unwrap();
    std::fs::write(
        f.home.path().join(".ssh/config"),
        "Host *\n  ServerAliveInterval 1\n",
    )
    .unwrap();

    // Streaming: 2 s of login plus 2 s of silence.
    assert_eq!(f.output("sleep 2; echo done"), "done\n");

    // Upload (blocking exec) after a slow launcher, then the agent starts.
    let version = format!("0.0.0-slow{}", std::process::id());
    let local = f.home.path().join("local-flip");
    fake_flip(&local, &version);
    let hash = hash_of(&local);
    f.opts.local_exe = local;
    f.opts.version = version.clone();
    let installed = Path::new(&remote_home).join(format!(".cache/flip/flip-{version}-{hash}"));
    let _cleanup = Cleanup(installed.clone());
    let stream = ssh::connect_agent(&f.target, &f.opts, &[]).unwrap_or_else(|e| panic!("{e}"));
    let data = Arc::new(pattern(1000, 12));
    assert!(round_trip(stream, data.clone()) == *data);
}

/// The client writes more than is kept for a second launch (16 MiB) from one thread while
/// another waits for the agent's first answer, to a server with no agent: the reader learns
/// of the missing agent while the writer is still writing to the launcher. Every byte reaches
/// the uploaded agent, in order, and neither half panics or hangs.
#[test]
fn connect_agent_uploads_while_a_writer_thread_passes_what_is_kept() {
    let mut f = Fixture::new();
    let (_, _cleanup) = missing_agent(&mut f, "kept");
    let stream = ssh::connect_agent(&f.target, &f.opts, &[]).unwrap_or_else(|e| panic!("{e}"));
    let data = Arc::new(pattern(24 << 20, 13));
    assert!(round_trip(stream, data.clone()) == *data);
}
