//! The private sshd works with the system ssh client, and dropping connections works.

use flip_testkit::Sshd;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn system_client_logs_in_and_connections_can_be_killed() {
    let sshd = Sshd::start();
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join(".ssh/config");
    sshd.write_ssh_config(&config, "web1");

    let out = Command::new("ssh")
        .arg("-F")
        .arg(&config)
        .args(["web1", "echo hello; printf %s \"$HOME\""])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh failed: {}\nsshd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        sshd.log()
    );
    // The login's home is the server's own, not root's real one.
    let home_line = format!("hello\n{}", sshd.home().display());
    assert_eq!(String::from_utf8_lossy(&out.stdout), home_line);
    assert!(sshd.home().is_dir());

    // A long-running remote command; killing the connection ends the client quickly. Kill only
    // once the command runs ("started" arrived): killing a login while the shell's startup files
    // run can leave their lock files behind.
    let mut child = Command::new("ssh")
        .arg("-F")
        .arg(&config)
        .args(["web1", "echo started; cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let _stdin = child.stdin.take().unwrap(); // kept open: `cat` runs until the connection dies
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 8];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"started\n");
    assert!(sshd.kill_connections() > 0, "no connection process found");
    let mut sink = Vec::new();
    stdout.read_to_end(&mut sink).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(sshd
        .host_public_key_line()
        .starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 ", sshd.port())));
}
