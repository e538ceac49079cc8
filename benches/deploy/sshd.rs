//! A private OpenSSH server on loopback for the SSH half of the benchmark: its own host and user
//! keys, config and port; stopped (by its own pid) when dropped. Independent of the test
//! support crate so the benchmark keeps working while that crate changes.

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    dir: PathBuf,
    child: Child,
    port: u16,
}

impl Sshd {
    /// Starts sshd with its files in `dir` (created).
    pub fn start(dir: &Path) -> io::Result<Sshd> {
        if !Path::new(SSHD).exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{SSHD} is missing (apt-get install -y openssh-server)"),
            ));
        }
        fs::create_dir_all(dir)?;
        for name in ["host_key", "user_key"] {
            let _ = fs::remove_file(dir.join(name));
            let _ = fs::remove_file(dir.join(format!("{name}.pub")));
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "flip-bench", "-f"])
                .arg(dir.join(name))
                .stdin(Stdio::null())
                .status()?;
            if !st.success() {
                return Err(io::Error::other(format!("ssh-keygen failed: {st}")));
            }
        }
        fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys"))?;
        // The login's home: its own, empty, so the server's login shell reads no `.bashrc` of
        // the machine's user (root's here runs pyenv's init, ~0.1 s per login, which a deploy
        // server's account does not have) and the agent is cached under it.
        fs::create_dir_all(dir.join("home"))?;
        fs::create_dir_all("/run/sshd")?;
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let config = format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nPidFile {d}/sshd.pid\n\
                 StrictModes no\nUseDNS no\nMaxStartups 100\nMaxSessions 100\n\
                 SetEnv HOME={d}/home\n",
                d = dir.display()
            );
            fs::write(dir.join("sshd_config"), config)?;
            let _ = fs::remove_file(dir.join("sshd.log"));
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-f")
                .arg(dir.join("sshd_config"))
                .arg("-E")
                .arg(dir.join("sshd.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Ok(Sshd {
                        dir: dir.to_path_buf(),
                        child,
                        port,
                    });
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = fs::read_to_string(dir.join("sshd.log")).unwrap_or_default();
        }
        Err(io::Error::other(format!(
            "sshd did not start; its log:\n{last_log}"
        )))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn user_key(&self) -> PathBuf {
        self.dir.join("user_key")
    }

    /// `[127.0.0.1]:PORT ssh-ed25519 AAAA...` for a client that connects to `port` (the relay).
    pub fn known_hosts_line(&self, port: u16) -> io::Result<String> {
        let public = fs::read_to_string(self.dir.join("host_key.pub"))?;
        let mut f = public.split_whitespace();
        let (kind, blob) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        Ok(format!("[127.0.0.1]:{port} {kind} {blob}\n"))
    }

    /// Writes `home/.ssh/{config,known_hosts}` so that `ssh -F home/.ssh/config bench` and
    /// `ssh://root@127.0.0.1:port/...` reach this server through `port` without prompts.
    pub fn write_client_home(&self, home: &Path, port: u16) -> io::Result<PathBuf> {
        let ssh = home.join(".ssh");
        fs::create_dir_all(&ssh)?;
        fs::write(ssh.join("known_hosts"), self.known_hosts_line(port)?)?;
        let config = format!(
            "Host bench\n    HostName 127.0.0.1\n    Port {port}\n    User root\n    \
             IdentityFile {key}\n    IdentitiesOnly yes\n    UserKnownHostsFile {kh}\n    \
             StrictHostKeyChecking yes\n    BatchMode yes\n    ControlMaster no\n",
            key = self.user_key().display(),
            kh = ssh.join("known_hosts").display()
        );
        let path = ssh.join("config");
        fs::write(&path, config)?;
        Ok(path)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
