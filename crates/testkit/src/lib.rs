//! Test support for flip. Used only as a dev-dependency.
//!
//! [`Sshd`] runs a real, private OpenSSH server on loopback for the duration of a test: its own
//! host key, its own user key in its own `authorized_keys`, its own config, on a free port. Tests
//! log in as root with the generated key (tests run as root, as CI does), through ssh2 or through
//! the system `ssh` client with the config file that [`Sshd::write_ssh_config`] writes.
//!
//! ```no_run
//! let sshd = flip_testkit::Sshd::start();
//! let home = tempfile::tempdir().unwrap();
//! sshd.write_known_hosts(&home.path().join(".ssh/known_hosts"));
//! sshd.write_ssh_config(&home.path().join(".ssh/config"), "web1");
//! // `ssh -F HOME/.ssh/config web1 true` now logs in without prompts.
//! ```
//!
//! [`Writes`] records each write an output gets, for tests of what leaves in one write.

#![warn(missing_docs, unreachable_pub)]

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// An output that records each write it gets (clones share the record): the bytes of every
/// `write` call, in order. `flush` does nothing.
#[derive(Clone, Default)]
pub struct Writes(pub std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl Write for Writes {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .push(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The OpenSSH server binary. Always started by absolute path.
pub const SSHD: &str = "/usr/sbin/sshd";

/// A private OpenSSH server listening on `127.0.0.1:port()`, stopped when dropped.
///
/// Its logins are root's, but with `HOME` set to a directory of its own
/// ([`home`](Sshd::home)), so what a login keeps in its home (the agents flip uploads to
/// `~/.cache/flip`, targets under `~/`) is this server's alone: tests running side by side
/// never see each other's, and root's real home is not touched.
pub struct Sshd {
    dir: tempfile::TempDir,
    child: Child,
    port: u16,
}

impl Sshd {
    /// Starts a server. Panics (failing the test) with a clear message if it cannot: sshd
    /// missing, keys not generated, or the server not accepting connections within 10 s.
    pub fn start() -> Sshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: the SSH tests need OpenSSH's server. Run the README test command \
             or `.ci/run`, which install it (`apt-get install -y openssh-server`)."
        );
        let dir = tempfile::Builder::new()
            .prefix("flip-sshd-")
            .tempdir()
            .expect("creating the sshd temp dir");
        let d = dir.path();
        keygen(&d.join("host_key"), None);
        keygen(&d.join("user_key"), None);
        let user_pub = fs::read_to_string(d.join("user_key.pub")).expect("reading user_key.pub");
        fs::write(d.join("authorized_keys"), user_pub).expect("writing authorized_keys");
        fs::create_dir_all(d.join("home")).expect("creating the server's home");
        // sshd refuses to start without its privilege-separation directory.
        fs::create_dir_all("/run/sshd").expect("creating /run/sshd");

        // The port is picked by binding port 0 and releasing it; another process may grab it in
        // between, so a failed start is retried with a new port.
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            write_sshd_config(d, port);
            let _ = fs::remove_file(d.join("sshd.log"));
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-f")
                .arg(d.join("sshd_config"))
                .arg("-E")
                .arg(d.join("sshd.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {SSHD}: {e}"));
            if wait_listening(&mut child, port, &d.join("sshd.log")) {
                return Sshd { dir, child, port };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = fs::read_to_string(d.join("sshd.log")).unwrap_or_default();
        }
        panic!("sshd did not start listening on 127.0.0.1; its log:\n{last_log}");
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The private key authorized to log in as root (ed25519, no passphrase).
    pub fn user_key(&self) -> PathBuf {
        self.dir.path().join("user_key")
    }

    /// The `HOME` of the server's logins: `home` in [`dir`](Sshd::dir), empty at the start.
    /// `~` in a target is this directory; `~root` is still root's real home.
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// The server's temp dir (keys, config, log). Removed when the server is dropped.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The pid of the listening sshd.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Generates a new key pair named `name` in the server's dir that is NOT authorized: logging
    /// in with it fails. Returns the private key path.
    pub fn wrong_user_key(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        keygen(&path, None);
        path
    }

    /// Generates a passphrase-protected key pair named `name`, authorizes its public key, and
    /// returns the private key path. It works only through an ssh-agent holding it.
    pub fn encrypted_user_key(&self, name: &str, passphrase: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        keygen(&path, Some(passphrase));
        let public = fs::read_to_string(format!("{}.pub", path.display()))
            .expect("reading the encrypted key's .pub");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("authorized_keys"))
            .expect("opening authorized_keys");
        f.write_all(public.as_bytes())
            .expect("appending to authorized_keys");
        path
    }

    /// The host key as a known_hosts line: `[127.0.0.1]:PORT ssh-ed25519 AAAA...`.
    pub fn host_public_key_line(&self) -> String {
        let public =
            fs::read_to_string(self.dir.path().join("host_key.pub")).expect("reading host_key.pub");
        let mut fields = public.split_whitespace();
        let kind = fields.next().expect("host key type");
        let blob = fields.next().expect("host key blob");
        format!("[127.0.0.1]:{} {kind} {blob}", self.port)
    }

    /// Writes a known_hosts file (creating its directory) that trusts this server's host key.
    pub fn write_known_hosts(&self, path: &Path) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("creating the known_hosts directory");
        }
        fs::write(path, format!("{}\n", self.host_public_key_line())).expect("writing known_hosts");
    }

    /// Writes an ssh client config (creating its directory) with a `Host alias` block for this
    /// server: HostName, Port, User root, IdentityFile, UserKnownHostsFile (a `known_hosts` file
    /// next to the config, written too), IdentitiesOnly. Usable with `ssh -F path alias`.
    pub fn write_ssh_config(&self, path: &Path, alias: &str) {
        let dir = path.parent().expect("config path has a parent");
        fs::create_dir_all(dir).expect("creating the ssh config directory");
        let known_hosts = dir.join("known_hosts");
        self.write_known_hosts(&known_hosts);
        let config = format!(
            "Host {alias}\n\
             \x20   HostName 127.0.0.1\n\
             \x20   Port {port}\n\
             \x20   User root\n\
             \x20   IdentityFile {key}\n\
             \x20   UserKnownHostsFile {kh}\n\
             \x20   IdentitiesOnly yes\n\
             \x20   BatchMode yes\n",
            port = self.port,
            key = self.user_key().display(),
            kh = known_hosts.display(),
        );
        fs::write(path, config).expect("writing the ssh config");
    }

    /// Drops every open connection the way a network failure would: kills (SIGKILL) the
    /// per-connection sshd processes, i.e. the listener's children and the sshd processes below
    /// them, so the TCP connections close at once. The commands the sessions ran see their
    /// input close and normally end by themselves; this waits up to 5 s for that, then kills
    /// what is left. (Killing a login shell outright in the middle of its startup files could
    /// leave their lock files behind, e.g. pyenv's rehash lock in root's .bashrc.) The listener
    /// keeps running. Processes are found through /proc parent pids and their executable, never
    /// by name. Returns how many sshd processes were killed.
    pub fn kill_connections(&self) -> usize {
        let mut tree = Vec::new();
        for pid in child_pids(self.child.id()) {
            collect_tree(pid, &mut tree);
        }
        let sshd = fs::canonicalize(SSHD).unwrap_or_else(|_| PathBuf::from(SSHD));
        let (connections, commands): (Vec<u32>, Vec<u32>) = tree.into_iter().partition(|pid| {
            fs::read_link(format!("/proc/{pid}/exe")).ok().as_ref() == Some(&sshd)
        });
        for &pid in &connections {
            kill(pid);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while commands.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        for &pid in commands.iter().filter(|&&pid| alive(pid)) {
            kill(pid);
        }
        connections.len()
    }

    /// The server's log (sshd -E), for diagnosing failed tests.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // Connections outlive the listener unless dropped too; then stop the listener by pid.
        self.kill_connections();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The temp dir is removed by TempDir's own Drop.
    }
}

/// SIGKILL.
fn kill(pid: u32) {
    // SAFETY: plain kill(2) on a pid that descends from our own sshd listener.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Whether `pid` still runs (exists and is not a zombie).
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// `ssh-keygen -q -t ed25519 -N PASSPHRASE -f path`.
fn keygen(path: &Path, passphrase: Option<&str>) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-C", "flip-test", "-N"])
        .arg(passphrase.unwrap_or(""))
        .arg("-f")
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("running ssh-keygen (is openssh-client installed?): {e}"));
    assert!(
        status.success(),
        "ssh-keygen -f {} failed: {status}",
        path.display()
    );
}

fn write_sshd_config(dir: &Path, port: u16) {
    let config = format!(
        "Port {port}\n\
         ListenAddress 127.0.0.1\n\
         HostKey {dir}/host_key\n\
         AuthorizedKeysFile {dir}/authorized_keys\n\
         PermitRootLogin prohibit-password\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         UsePAM no\n\
         PidFile {dir}/sshd.pid\n\
         StrictModes no\n\
         SetEnv HOME={dir}/home\n\
         LogLevel VERBOSE\n\
         MaxStartups 100\n\
         MaxSessions 100\n",
        dir = dir.display()
    );
    fs::write(dir.join("sshd_config"), config).expect("writing sshd_config");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port on 127.0.0.1")
}

/// Waits until `child` listens on `port`: its log says so (a connection alone may reach another
/// test's sshd that took the port first while this one fails to bind it) and the port takes
/// connections. False if sshd exited or 10 s passed.
fn wait_listening(child: &mut Child, port: u16, log: &Path) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listening = format!("Server listening on 127.0.0.1 port {port}.");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if fs::read_to_string(log).is_ok_and(|l| l.contains(&listening))
            && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Pids whose parent is `parent`, from /proc/*/stat.
fn child_pids(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if parent_pid(pid) == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// The parent pid from /proc/PID/stat: `pid (comm) state ppid ...`; comm may contain spaces
/// and parentheses, so parse after the last ')'.
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and all its descendants, parents first.
fn collect_tree(pid: u32, out: &mut Vec<u32>) {
    out.push(pid);
    for child in child_pids(pid) {
        collect_tree(child, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_parent_pid_of_self() {
        let me = std::process::id();
        let parent = parent_pid(me).expect("own stat");
        assert!(child_pids(parent).contains(&me));
    }
}
