//! SSH targets end to end: the real flip binary against a real OpenSSH server that the test
//! starts on 127.0.0.1 (flip_testkit::Sshd). The "server" is this machine, so the target's
//! files are checked directly on disk.

mod common;

use common::*;
use flip_testkit::Sshd;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const FLIP: &str = env!("CARGO_BIN_EXE_flip");

/// A test world with a server, a HOME whose known_hosts trusts it, and the user key.
struct World {
    fx: Fx,
    sshd: Sshd,
}

impl World {
    fn new() -> World {
        let fx = Fx::new();
        let sshd = Sshd::start();
        sshd.write_known_hosts(&fx.home.join(".ssh/known_hosts"));
        World { fx, sshd }
    }

    /// `ssh://root@127.0.0.1:PORT/<fx.root>`.
    fn url(&self) -> String {
        format!(
            "ssh://root@127.0.0.1:{}{}",
            self.sshd.port(),
            self.fx.root_str()
        )
    }

    fn key(&self) -> String {
        s(&self.sshd.user_key()).to_string()
    }

    /// flip ARGS... with the user key and this build as the remote agent.
    fn flip(&self, args: &[&str]) -> Run {
        let key = self.key();
        let mut a: Vec<&str> = args.to_vec();
        a.extend_from_slice(&["-i", &key, "--remote-flip", FLIP]);
        self.fx.flip(&a)
    }
}

#[test]
fn deploy_redeploy_rollback_and_friends_over_ssh() {
    let w = World::new();
    let url = w.url();
    let src = w.fx.src("src");
    site_v1(&src);
    let v1 = src.tree();
    let j = w
        .flip(&["deploy", "--json", src.s(), &url])
        .success()
        .json();
    assert_eq!(num(&j, "/release"), 1);
    assert_eq!(w.fx.current_link(), "releases/1");
    assert_dir_eq(&w.fx.current(), &v1, "current after the first SSH deploy");

    site_v2(&src);
    let v2 = src.tree();
    let j = w
        .flip(&["deploy", "--json", "--label", "v2", src.s(), &url])
        .success()
        .json();
    assert_eq!(num(&j, "/release"), 2);
    assert!(num(&j, "/files/linked") > 0, "{j}");
    assert_eq!(w.fx.current_link(), "releases/2");
    assert_dir_eq(&w.fx.current(), &v2, "current after the second SSH deploy");
    assert_dir_eq(&w.fx.release(1), &v1, "release 1 untouched");
    // Unchanged content is shared with release 1.
    let unchanged = files_of(&v1)
        .into_iter()
        .find(|f| v1.get(f) == v2.get(f))
        .expect("v1 and v2 share a file");
    assert_eq!(
        ino(&w.fx.release(1).join(&unchanged)),
        ino(&w.fx.release(2).join(&unchanged))
    );

    let list = w.flip(&["releases", "--json", &url]).success().json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1]["label"], "v2");
    assert_eq!(list[1]["current"], true);

    let j = w.flip(&["rollback", "--json", &url]).success().json();
    assert_eq!(num(&j, "/release"), 1);
    assert_eq!(w.fx.current_link(), "releases/1");
    w.flip(&["verify", &url]).success();
    w.flip(&["activate", &url, "2"]).success();
    assert_eq!(w.fx.current_link(), "releases/2");
    let j = w
        .flip(&["prune", "--json", "--keep", "1", &url])
        .success()
        .json();
    // Release 1 is the rollback target: kept.
    assert_eq!(j["pruned"], serde_json::json!([]));
    w.flip(&["rollback", &url, "--to", "9"])
        .code(5)
        .stderr_has("release 9 does not exist");
}

#[test]
fn unknown_host_is_refused_then_accepted_with_the_flag() {
    let w = World::new();
    let kh = w.fx.home.join(".ssh/known_hosts");
    fs::remove_file(&kh).unwrap();
    let url = w.url();
    let src = w.fx.src("src");
    site_v1(&src);
    w.flip(&["deploy", src.s(), &url])
        .code(9)
        .stderr_has("is not known")
        .stderr_has("SHA256:");
    assert!(!w.fx.root.exists(), "nothing was created on the server");
    // Recorded, and said so; with -q only errors are printed (the key is recorded all the same).
    w.flip(&["deploy", "--accept-new-host-key", src.s(), &url])
        .success()
        .stderr_has("added the ");
    fs::remove_file(&kh).unwrap();
    let quiet = w
        .flip(&["deploy", "-q", "--accept-new-host-key", src.s(), &url])
        .success();
    assert_eq!(quiet.stderr, "", "-q prints only errors");
    let recorded = fs::read_to_string(&kh).unwrap();
    assert!(
        recorded.contains(&format!("[127.0.0.1]:{}", w.sshd.port())),
        "{recorded}"
    );
    // Next time the recorded key is enough.
    w.flip(&["deploy", "--force-release", src.s(), &url])
        .success();
    assert_eq!(w.fx.current_link(), "releases/2");
}

#[test]
fn a_changed_host_key_is_always_refused() {
    let w = World::new();
    let other = w.fx.path("other-host-key");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f", s(&other)])
        .status()
        .unwrap();
    assert!(st.success());
    let pubkey = fs::read_to_string(other.with_extension("pub")).unwrap();
    let mut parts = pubkey.split_whitespace();
    let line = format!(
        "[127.0.0.1]:{} {} {}\n",
        w.sshd.port(),
        parts.next().unwrap(),
        parts.next().unwrap()
    );
    fs::write(w.fx.home.join(".ssh/known_hosts"), line).unwrap();
    let src = w.fx.src("src");
    site_v1(&src);
    for extra in [&[][..], &["--accept-new-host-key"][..]] {
        let mut args = vec!["deploy", src.s()];
        let url = w.url();
        args.push(&url);
        args.extend_from_slice(extra);
        w.flip(&args).code(9).stderr_has("HAS CHANGED");
    }
    assert!(!w.fx.root.exists());
}

#[test]
fn a_wrong_key_is_refused_clearly() {
    let w = World::new();
    let wrong = w.sshd.wrong_user_key("wrong");
    let src = w.fx.src("src");
    site_v1(&src);
    w.fx.flip(&[
        "deploy",
        src.s(),
        &w.url(),
        "-i",
        s(&wrong),
        "--remote-flip",
        FLIP,
    ])
    .code(9)
    .stderr_has("authentication failed for root@127.0.0.1");
    assert!(!w.fx.root.exists());
    // A file that is no key: the message says why it did not do, with its path.
    let garbage = w.fx.path("garbage-key");
    fs::write(&garbage, "garbage\n").unwrap();
    fs::set_permissions(
        &garbage,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    w.fx.flip_env(
        &[("SSH_AUTH_SOCK", "")],
        &["releases", &w.url(), "-i", s(&garbage)],
    )
    .code(9)
    .stderr_has(&format!("{} (Unable to extract public key", s(&garbage)));
}

#[test]
fn an_alias_from_the_ssh_config_file_works() {
    let w = World::new();
    w.sshd
        .write_ssh_config(&w.fx.home.join(".ssh/config"), "web1");
    let src = w.fx.src("src");
    site_v1(&src);
    let target = format!("web1:{}", w.fx.root_str());
    // No -i: the IdentityFile comes from the config.
    w.fx.flip(&["deploy", src.s(), &target, "--remote-flip", FLIP])
        .success();
    assert_dir_eq(&w.fx.current(), &src.tree(), "current deployed via alias");
}

#[test]
fn the_system_ssh_client_can_be_the_transport() {
    let w = World::new();
    let cfg = w.fx.path("ssh_config");
    w.sshd.write_ssh_config(&cfg, "web1");
    let src = w.fx.src("src");
    site_v1(&src);
    let target = format!("web1:{}", w.fx.root_str());
    let cmd = format!("ssh -F {}", s(&cfg));
    w.fx.flip(&[
        "deploy",
        src.s(),
        &target,
        "--ssh-command",
        &cmd,
        "--remote-flip",
        FLIP,
    ])
    .success();
    site_v2(&src);
    w.fx.flip(&[
        "deploy",
        src.s(),
        &target,
        "--ssh-command",
        &cmd,
        "--remote-flip",
        FLIP,
    ])
    .success();
    assert_eq!(w.fx.current_link(), "releases/2");
    assert_dir_eq(&w.fx.current(), &src.tree(), "current via system ssh");
}

/// `flip deploy --json ARGS` fails with `code`, saying `error` once: as the JSON error, and
/// on stderr as its only line.
fn deploy_fails_saying_once(fx: &Fx, args: &[&str], code: i32, error: &str) {
    let r = fx
        .flip(&[&["deploy", "--json"][..], args].concat())
        .code(code);
    assert_eq!(r.json()["error"]["message"], error, "{args:?}");
    assert_eq!(r.stderr, format!("flip: error: {error}\n"), "{args:?}");
}

/// Writes an executable (0755) script.
fn write_script(path: &std::path::Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, body).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// An `--ssh-command` that cannot be started is named as the SSH command, with the OS error,
/// exit 6 (it said "cannot start the agent /nonexistent/ssh -T", blaming the agent, with a
/// `-T` flip added); one that is no command (empty, an unclosed quote) is a usage error, exit
/// 2 (it was exit 6, as an agent that could not start).
#[test]
fn an_ssh_command_that_cannot_start_is_named_as_such() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    let target = format!("web1:{}", fx.root_str());
    for (cmd, code, error) in [
        (
            "/nonexistent/ssh",
            6,
            "cannot start the SSH command /nonexistent/ssh: No such file or directory (os error 2)",
        ),
        (
            "/nonexistent/ssh -F cfg",
            6,
            "cannot start the SSH command /nonexistent/ssh: No such file or directory (os error 2)",
        ),
        (
            "",
            2,
            "--ssh-command \"\": it is empty, where it names the ssh client (\"ssh -F cfg\")",
        ),
        (
            "ssh 'x",
            2,
            "--ssh-command \"ssh 'x\": cannot split it into words: missing closing quote",
        ),
    ] {
        deploy_fails_saying_once(&fx, &[src.s(), &target, "--ssh-command", cmd], code, error);
        fx.flip(&["releases", &target, "--ssh-command", cmd])
            .code(code)
            .stderr_has(error);
    }
    assert!(!fx.root.exists());
}

/// Without --remote-flip and without flip on the server's PATH, flip uploads the agent-only
/// build beside it (`flip-agent`) to ~/.cache/flip/flip-VERSION-BLAKE3 on the server
/// (compressed, checked) and runs that: the deploys are served by flip-agent.
#[test]
fn the_agent_is_uploaded_when_the_server_has_none() {
    let w = World::new();
    // The server's logins have a home of their own, empty at the start.
    let uploaded = w.sshd.home().join(".cache/flip").join(format!(
        "flip-{}-{}",
        env!("CARGO_PKG_VERSION"),
        blake3::hash(&fs::read(FLIP_AGENT).unwrap()).to_hex()
    ));
    // What else is in the cache: three agents of other versions, used after an old directory
    // someone made there with an agent's name. Keeping the three newest removes the agents
    // past them, and cannot remove the directory: that no longer fails the upload.
    let cache = uploaded.parent().unwrap().to_path_buf();
    fs::create_dir_all(&cache).unwrap();
    let junk = cache.join("flip-0.0.0-dir");
    fs::create_dir_all(&junk).unwrap();
    let st = std::process::Command::new("touch")
        .args(["-d", "2001-01-01"])
        .arg(&junk)
        .status()
        .unwrap();
    assert!(st.success());
    for i in 0..3 {
        fs::write(cache.join(format!("flip-0.0.0-fake{i}")), "not flip").unwrap();
    }
    let src = w.fx.src("src");
    site_v1(&src);
    w.fx.flip(&["deploy", src.s(), &w.url(), "-i", &w.key()])
        .success()
        .stderr_has("has no flip")
        .stderr_has(&format!("uploading {FLIP_AGENT} ("));
    assert_dir_eq(
        &w.fx.current(),
        &src.tree(),
        "deployed by the uploaded agent",
    );
    use std::os::unix::fs::PermissionsExt;
    assert!(junk.is_dir(), "the directory is left as it was");
    let fakes = fs::read_dir(&cache)
        .unwrap()
        .filter(|e| {
            let e = e.as_ref().unwrap();
            e.file_name()
                .to_string_lossy()
                .starts_with("flip-0.0.0-fake")
        })
        .count();
    assert_eq!(
        fakes, 2,
        "the three agents used last are kept, the new one among them"
    );
    let meta = fs::metadata(&uploaded).expect("agent uploaded");
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert_eq!(fs::read(&uploaded).unwrap(), fs::read(FLIP_AGENT).unwrap());
    // The second deploy finds it and does not upload again.
    let before = common::ino(&uploaded);
    site_v2(&src);
    let again =
        w.fx.flip(&["deploy", src.s(), &w.url(), "-i", &w.key()])
            .success();
    assert!(!again.stderr.contains("has no flip"), "{}", again.stderr);
    assert_eq!(common::ino(&uploaded), before);
}

/// A deploy through the system `ssh` (`--ssh-command`) that waits for the lock (`--wait`) and
/// whose client is killed (a CI job cancelled): `ssh` lives on, its input at end of file and
/// nothing to write, so the agent behind it never saw its client go and waited for as long as
/// the holder kept the lock. The agent now stops at its own input's end, which ssh passes on
/// (it also repeats who holds the lock every few seconds, a write that would end `ssh`). The
/// client printed the holder once.
#[test]
fn a_waiting_agent_behind_the_system_ssh_stops_once_its_client_is_killed() {
    let w = World::new();
    let (src, deploy) = deployed_through_system_ssh(&w);
    let deploy: Vec<&str> = deploy.iter().map(String::as_str).collect();
    let lock = hold_lock(&w.fx);
    let run = w.fx.spawn(&[], &[&deploy[..], &["--wait"]].concat());
    let pid = run.pid();
    let agent = waiting_agent(&run, w.fx.root_str());
    let ssh = children(pid);
    assert!(!ssh.is_empty(), "the client runs ssh");
    // Long enough for the agent to have repeated the holder: the client shows it once.
    std::thread::sleep(LOCK_RETELL + Duration::from_secs(1));
    let said = run.stderr_so_far();
    assert_eq!(said.matches("waiting").count(), 1, "{said}");
    // SAFETY: kill of the flip client this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(run.wait_any(TIMEOUT).is_some());
    let killed = Instant::now();
    while !(exited(agent) && ssh.iter().all(|&p| exited(p))) && killed.elapsed() < TIMEOUT {
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = killed.elapsed();
    // Before it repeats who holds the lock (`LOCK_RETELL`): at its input's end.
    assert!(
        took < Duration::from_secs(4),
        "the agent (or ssh) still waited {took:?} after the client was killed"
    );
    // It never got the lock: nothing staged, the live release untouched; the next deploy runs.
    drop(lock);
    assert!(w.fx.release_leftovers().is_empty());
    assert_eq!(w.fx.current_link(), "releases/1");
    w.fx.flip(&deploy).success();
    assert_eq!(w.fx.current_link(), "releases/2");
    assert_dir_eq(
        &w.fx.current(),
        &src.tree(),
        "current after the next deploy",
    );
}

/// A target deployed once (site v1) through the system `ssh` (`--ssh-command`), its source
/// since changed to site v2: the source and the deploy's command line.
fn deployed_through_system_ssh(w: &World) -> (Src, Vec<String>) {
    let cfg = w.fx.path("ssh_config");
    w.sshd.write_ssh_config(&cfg, "web1");
    let cmd = format!("ssh -F {}", s(&cfg));
    let target = format!("web1:{}", w.fx.root_str());
    let src = w.fx.src("src");
    site_v1(&src);
    let deploy = [
        "deploy",
        src.s(),
        &target,
        "--ssh-command",
        &cmd,
        "--remote-flip",
        FLIP,
    ];
    w.fx.flip(&deploy).success();
    site_v2(&src);
    let deploy = deploy.iter().map(|a| a.to_string()).collect();
    (src, deploy)
}

/// A deploy through the system `ssh` whose client is killed while its `before_activate` hook
/// runs (a CI job cancelled): `ssh` lives on and reads on, so the agent, which watched only
/// its output, never saw its client go: the hook ran to its timeout, the lock held all along.
/// ssh passes the end of its input on; at that end the agent now kills the hook, removes the
/// release it committed and frees the lock, at once.
#[test]
fn a_hook_behind_the_system_ssh_stops_once_its_client_is_killed() {
    let w = World::new();
    let (src, deploy) = deployed_through_system_ssh(&w);
    let deploy: Vec<&str> = deploy.iter().map(String::as_str).collect();
    let pidfile = w.fx.path("hook.pid");
    fs::write(
        w.fx.path("flip.toml"),
        format!(
            "before_activate = [\"echo $$ > {}; sleep 60\"]\n",
            s(&pidfile)
        ),
    )
    .unwrap();
    let run = w.fx.spawn(&[], &deploy);
    let deadline = Instant::now() + TIMEOUT;
    let hook = loop {
        if let Some(pid) = fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the hook never ran");
        std::thread::sleep(Duration::from_millis(10));
    };
    let agent = *agents_serving(w.fx.root_str())
        .first()
        .expect("an agent serves the deploy");
    let ssh = children(run.pid());
    assert!(!ssh.is_empty(), "the client runs ssh");
    // SAFETY: kill of the flip client this test started.
    unsafe { libc::kill(run.pid() as i32, libc::SIGKILL) };
    assert!(run.wait_any(TIMEOUT).is_some());
    let killed = Instant::now();
    let over = || exited(hook) && exited(agent) && ssh.iter().all(|&p| exited(p));
    while !over() && killed.elapsed() < TIMEOUT {
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the hook, the agent or ssh outlived the client by {took:?} (hook alive: {})",
        !exited(hook)
    );
    // The release whose hook never finished is gone, the live one untouched, the lock free.
    assert_eq!(w.fx.current_link(), "releases/1");
    assert_eq!(w.fx.release_ids(), vec![1]);
    fs::remove_file(w.fx.path("flip.toml")).unwrap();
    let j =
        w.fx.flip(&[&deploy[..], &["--json"]].concat())
            .success()
            .json();
    assert_eq!(j["release"], 3, "{j}");
    assert_dir_eq(
        &w.fx.current(),
        &src.tree(),
        "current after the next deploy",
    );
}

/// The target's lock, held as another deploy holds it, until dropped.
fn hold_lock(fx: &Fx) -> fs::File {
    hold_root_lock(&fx.root)
}

/// The agent serving `root` for `run`, once `run` says it waits for the lock.
fn waiting_agent(run: &Running, root: &str) -> u32 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "the deploy never waited");
        if run.stderr_so_far().contains("waiting") {
            if let Some(a) = agents_serving(root).first() {
                return *a;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How often an agent waiting for a lock repeats who holds it (`flip_release::RETELL`).
const LOCK_RETELL: Duration = Duration::from_secs(5);

/// The agents (`flip agent ...`) whose command line names `root`.
fn agents_serving(root: &str) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
            let named = format!("--root={root}");
            args.get(1) == Some(&&b"agent"[..])
                && (args.contains(&root.as_bytes()) || args.contains(&named.as_bytes()))
        })
        .collect()
}

/// `host:~/app`, as scp and rsync users write a path in their home (and `~user/app`): the
/// client passes the path quoted, so no shell on the server expands the `~`; the agent does.
/// A deploy with `--mkpath` made a directory literally named `~` in the home instead. And
/// `host:-app`, a path in the home starting with '-', was taken for an option of the agent.
#[test]
fn a_path_in_the_servers_home_can_be_written_with_a_tilde_or_a_dash() {
    let w = World::new();
    // The logins' HOME (the server's own directory); `~root` is root's home in passwd.
    let home = w.sshd.home();
    let src = w.fx.src("src");
    site_v1(&src);
    let port = w.sshd.port();
    let url = format!("ssh://root@127.0.0.1:{port}/~/deep/app");
    w.flip(&["deploy", "--mkpath", src.s(), &url]).success();
    assert_dir_eq(
        &home.join("deep/app/current"),
        &src.tree(),
        "deployed in the home",
    );
    assert!(!home.join("~").exists(), "no directory named ~ was made");
    // A user's home by name: root's, from passwd (not the login's HOME).
    let root_home = fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"root")).then(|| PathBuf::from(f[5]))
        })
        .expect("root in /etc/passwd");
    let name = format!("flip-test-tilde-{}", std::process::id());
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(root_home.join(&name));
    site_v2(&src);
    let other = format!("ssh://root@127.0.0.1:{port}/~root/{name}/app");
    let j = w
        .flip(&["deploy", "--json", "--mkpath", src.s(), &other])
        .success()
        .json();
    assert_eq!(num(&j, "/release"), 1, "{j}");
    assert_dir_eq(
        &root_home.join(&name).join("app/current"),
        &src.tree(),
        "deployed via ~root",
    );
    // A relative path that starts with '-' (through an alias: the scp form has no port) is a
    // path, not an option of the agent. Relative to where the login starts: root's home
    // (sshd changes there; only HOME is the server's own).
    w.sshd
        .write_ssh_config(&w.fx.home.join(".ssh/config"), "web1");
    let dash = format!("-{name}");
    let _cleanup_dash = Cleanup(root_home.join(&dash));
    w.flip(&["deploy", src.s(), &format!("web1:{dash}")])
        .success();
    assert_dir_eq(
        &root_home.join(&dash).join("current"),
        &src.tree(),
        "deployed in ~root/-name",
    );
    // A user that does not exist: the path as written, not found.
    w.flip(&[
        "releases",
        &format!("ssh://root@127.0.0.1:{port}/~no-such-user-flip/app"),
    ])
    .code(5)
    .stderr_has("~no-such-user-flip/app does not exist");
}

/// The system ssh's own failure (exit status 255: the host unreachable, the key refused) is said
/// once, in flip's error (which --json carries too): before, ssh's stderr line was relayed as
/// the server's (`web1: ssh: connect to host ...`) and then repeated in the error. What a
/// server that answers writes to stderr before its first byte (a login's banner) is still
/// passed on, once.
#[test]
fn the_system_ssh_failing_to_connect_is_said_once_in_the_error() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    let target = format!("web1:{}", fx.root_str());
    for (said, code, error) in [
        (
            "ssh: connect to host web1 port 22: Connection refused",
            6,
            "connecting to web1: ssh: connect to host web1 port 22: Connection refused",
        ),
        (
            "web1: Permission denied (publickey).",
            9,
            "authentication failed for web1 (tried: the ssh command's keys; ssh said: web1: Permission denied (publickey).)",
        ),
    ] {
        let ssh = fx.path("failing-ssh");
        write_script(&ssh, &format!("#!/bin/sh\necho '{said}' >&2\nexit 255\n"));
        // With `--remote-flip` too (no launcher: the session starts at once, and found only a
        // broken pipe: "connection failed while taking the deploy lock: ... Broken pipe").
        for remote in [&[][..], &["--remote-flip", "/usr/bin/flip"][..]] {
            let mut args = vec![src.s(), &target, "--ssh-command", s(&ssh)];
            args.extend(remote);
            deploy_fails_saying_once(&fx, &args, code, error);
        }
    }
    assert!(!fx.root.exists());
    // A login that writes to stderr, then runs the agent here.
    let ssh = fx.path("chatty-ssh");
    write_script(
        &ssh,
        "#!/bin/sh\necho 'welcome to web1' >&2\nwhile [ $# -gt 0 ] && [ \"$1\" != \"--\" ]; do shift; done\nexec /bin/sh -c \"$3\"\n",
    );
    let r = fx
        .flip(&[
            "deploy",
            src.s(),
            &target,
            "--ssh-command",
            s(&ssh),
            "--remote-flip",
            FLIP,
        ])
        .success();
    assert_eq!(
        r.stderr.matches("web1: welcome to web1\n").count(),
        1,
        "{}",
        r.stderr
    );
    assert_dir_eq(&fx.current(), &src.tree(), "deployed through it");
}

/// A server whose login never starts flip (a shell startup file waiting for input, a command
/// in it that hangs) hung the deploy for ever: after the launch deadline (60 s; shortened here
/// through the debug build's FLIP_LAUNCH_TIMEOUT_MS) the connection is dropped and the deploy
/// fails, saying why (exit 6), with nothing changed.
#[test]
fn a_login_that_never_starts_flip_fails_after_the_launch_deadline() {
    let fx = Fx::new();
    let ssh = fx.path("hung-login");
    write_script(&ssh, "#!/bin/sh\nexec sleep 600\n");
    let src = fx.src("src");
    site_v1(&src);
    let target = format!("web1:{}", fx.root_str());
    let t0 = Instant::now();
    let r = fx
        .flip_env(
            &[("FLIP_LAUNCH_TIMEOUT_MS", "1500")],
            &["deploy", src.s(), &target, "--ssh-command", s(&ssh)],
        )
        .code(6);
    assert!(
        r.stderr.contains(
            "the login did not start flip within 1.5 s (a shell startup file waiting for input"
        ),
        "{}",
        r.stderr
    );
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    assert!(!fx.root.exists());
    // Through the built-in transport to a real server, with a deadline no login meets.
    let w = World::new();
    let key = w.key();
    let r =
        w.fx.flip_env(
            &[("FLIP_LAUNCH_TIMEOUT_MS", "1")],
            &["deploy", src.s(), &w.url(), "-i", &key, "--no-cache"],
        )
        .code(6);
    assert!(
        r.stderr
            .contains("the login did not start flip within 0.001 s"),
        "{}",
        r.stderr
    );
    assert!(!w.fx.root.exists());
    // With --remote-flip there is no launcher: the agent's first answer has the same deadline,
    // through the system ssh and through the built-in transport (to a "flip" that never
    // answers, as a login that never starts one: a real agent could have made the target
    // before the connection was dropped, and the check below would race its cleanup).
    let silent = fx.path("silent-flip");
    write_script(&silent, "#!/bin/sh\nexec cat >/dev/null\n");
    let t0 = Instant::now();
    let r = fx
        .flip_env(
            &[("FLIP_LAUNCH_TIMEOUT_MS", "1500")],
            &[
                "deploy",
                src.s(),
                &target,
                "--ssh-command",
                s(&ssh),
                "--remote-flip",
                FLIP,
            ],
        )
        .code(6);
    assert!(
        r.stderr
            .contains("the login did not start flip within 1.5 s"),
        "{}",
        r.stderr
    );
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    let r =
        w.fx.flip_env(
            &[("FLIP_LAUNCH_TIMEOUT_MS", "1")],
            &[
                "deploy",
                src.s(),
                &w.url(),
                "-i",
                &key,
                "--remote-flip",
                s(&silent),
            ],
        )
        .code(6);
    assert!(
        r.stderr
            .contains("the login did not start flip within 0.001 s"),
        "{}",
        r.stderr
    );
    assert!(!w.fx.root.exists());
}

/// A connection dropped in the middle of a transfer: a clear error naming the host, `current`
/// untouched on the server, and the next deploy succeeds.
#[test]
fn a_connection_killed_mid_transfer_loses_nothing() {
    let w = World::new();
    let url = w.url();
    let src = w.fx.src("src");
    site_v1(&src);
    w.flip(&["deploy", src.s(), &url]).success();
    let v1 = read_tree(&w.fx.current());
    // Enough incompressible data that the transfer takes a while.
    for i in 0..12 {
        src.file(&format!("blob/{i}.bin"), noise(i, 8 << 20), 0o644);
    }
    let key = w.key();
    let mut run = w.fx.spawn(
        &[],
        &["deploy", src.s(), &url, "-i", &key, "--remote-flip", FLIP],
    );
    let staging = w.fx.root.join("releases/.staging-2");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !staging.exists() {
        assert!(Instant::now() < deadline, "staging never started");
        assert!(run.is_running(), "deploy ended before the transfer");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(w.sshd.kill_connections() > 0);
    let r = run.finish(Duration::from_secs(60));
    assert_ne!(r.code, 0, "a killed connection must fail the deploy");
    assert!(
        r.stderr.contains("127.0.0.1") && r.stderr.contains("connection failed while"),
        "the error names the host and the phase: {}",
        r.stderr
    );
    assert_eq!(w.fx.current_link(), "releases/1");
    assert_tree_eq(&read_tree(&w.fx.current()), &v1, "current after the drop");
    let j = w
        .flip(&["deploy", "--json", src.s(), &url])
        .success()
        .json();
    assert_eq!(num(&j, "/release"), 3);
    assert_dir_eq(&w.fx.current(), &src.tree(), "current after the retry");
    assert!(w.fx.release_leftovers().is_empty());
}

#[test]
fn an_unreachable_host_fails_fast_with_a_connection_error() {
    let fx = Fx::new();
    // Nothing listens on a port we just bound and released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let src = fx.src("src");
    site_v1(&src);
    let url = format!("ssh://root@127.0.0.1:{port}/srv/app");
    fx.flip(&["deploy", src.s(), &url])
        .code(6)
        .stderr_has(&format!("127.0.0.1:{port}"));
}

#[test]
fn a_passphrase_protected_key_without_an_agent_is_refused_clearly() {
    let w = World::new();
    let key = w.sshd.encrypted_user_key("locked", "secret words");
    let src = w.fx.src("src");
    site_v1(&src);
    w.fx.flip(&[
        "deploy",
        src.s(),
        &w.url(),
        "-i",
        s(&key),
        "--remote-flip",
        FLIP,
    ])
    .code(9)
    .stderr_has("passphrase");
    assert!(!w.fx.root.exists());
}

#[test]
fn over_ssh_an_error_names_the_path_once_and_mkpath_reaches_the_agent() {
    let w = World::new();
    let src = w.fx.src("src");
    site_v1(&src);
    let url_of =
        |p: &std::path::Path| format!("ssh://root@127.0.0.1:{}{}", w.sshd.port(), p.display());
    let afile = w.fx.path("afile");
    fs::write(&afile, "x").unwrap();
    // A dry run fails as the deploy does (the agent checks the target).
    let dry = w
        .flip(&["deploy", "--dry-run", src.s(), &url_of(&afile)])
        .code(5);
    let r = w.flip(&["deploy", src.s(), &url_of(&afile)]).code(5);
    assert_eq!(dry.stderr, r.stderr);
    assert_eq!(
        r.stderr,
        format!(
            "flip: error: root@127.0.0.1:{}: {} is not a directory\n",
            w.sshd.port(),
            afile.display()
        )
    );
    // The same target in an environment: its line names host and path once too.
    fs::write(
        w.fx.path("flip.toml"),
        format!(
            "source = {:?}\n[env.prod]\ntargets = [{:?}]\n",
            src.s(),
            url_of(&afile)
        ),
    )
    .unwrap();
    let r = w.flip(&["deploy", "prod"]).code(10);
    let line = format!(
        "flip: error: root@127.0.0.1:{}: {} is not a directory",
        w.sshd.port(),
        afile.display()
    );
    assert!(r.stderr.lines().any(|l| l == line), "{}", r.stderr);
    fs::remove_file(w.fx.path("flip.toml")).unwrap();
    // A new target two levels below what exists: refused unless --mkpath, which the agent on
    // the server gets.
    let deep = w.fx.path("srv/app/site");
    for dry in [&["--dry-run"][..], &[]] {
        let r = w
            .flip(&[&["deploy"][..], dry, &[src.s(), &url_of(&deep)]].concat())
            .code(5);
        assert!(
            r.stderr.contains("(--mkpath creates missing parents)"),
            "{}",
            r.stderr
        );
    }
    // A dry run with --mkpath says what the deploy would send, and creates nothing.
    let r = w
        .flip(&["deploy", "--dry-run", "--mkpath", src.s(), &url_of(&deep)])
        .success();
    assert!(r.stderr.contains("(live: none)"), "{}", r.stderr);
    assert!(!w.fx.path("srv").exists());
    let r = w.flip(&["deploy", src.s(), &url_of(&deep)]).code(5);
    assert!(
        r.stderr.contains("(--mkpath creates missing parents)"),
        "{}",
        r.stderr
    );
    assert!(!w.fx.path("srv").exists());
    w.flip(&["deploy", "--mkpath", src.s(), &url_of(&deep)])
        .success();
    assert_eq!(
        fs::read_link(deep.join("current")).unwrap().to_str(),
        Some("releases/1")
    );
}

#[test]
fn a_deploy_at_the_adaptive_level_lands_identical_bytes() {
    // Enough content for dozens of level decisions (one per MiB) past the buffers to the link
    // (8 MiB of output), so the adaptive level moves mid-stream; each move changes how the rest
    // of the stream is compressed, never what lands.
    let w = World::new();
    let url = w.url();
    let src = w.fx.src("src");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut total = 0u64;
    for f in 0..40 {
        let mut data = Vec::with_capacity(1 << 20);
        while data.len() < 1 << 20 {
            // Words from a small vocabulary with random numbers: compresses about 3:1.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let word =
                ["public", "function", "return", "$this->", "array", "static"][(x % 6) as usize];
            data.extend_from_slice(format!("{word} {} ", x >> 40).as_bytes());
        }
        total += data.len() as u64;
        src.file(&format!("vendor/p{}/f{f}.php", f % 4), &data, 0o644);
    }
    let tree = src.tree();
    let j = w
        .flip(&["deploy", "--json", src.s(), &url])
        .success()
        .json();
    assert_dir_eq(&w.fx.current(), &tree, "current after an adaptive deploy");
    let level = num(&j, "/bytes/compress_level");
    assert!((1..=12).contains(&level), "{j}");
    assert!(num(&j, "/bytes/sent") < total / 2, "{j}");
    w.flip(&["verify", &url]).success();
}

/// Out of file descriptors at any point of a session (the limit lowered step by step, from too
/// low to open the connection up to enough for everything): flip either works or says what it
/// could not do, with its exit code, and never panics.
#[test]
fn running_out_of_file_descriptors_is_an_error_never_a_panic() {
    let w = World::new();
    let src = w.fx.src("src");
    site_v1(&src);
    w.flip(&["deploy", src.s(), &w.url()]).success();
    let key = w.key();
    let mut refused = 0;
    for limit in 4..=24 {
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                &format!("ulimit -n {limit}; exec \"$0\" \"$@\""),
                FLIP,
            ])
            .args(["releases", &w.url(), "-i", &key, "--remote-flip", FLIP])
            .env("HOME", &w.fx.home)
            .env("XDG_CACHE_HOME", w.fx.home.join(".cache"))
            .env_remove("SSH_AUTH_SOCK")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "limit {limit}: {stderr}");
        match out.status.code() {
            Some(0) => {}
            Some(code @ 1..=100) => {
                assert!(
                    stderr.starts_with("flip: error: "),
                    "limit {limit}: {stderr}"
                );
                assert!(
                    stderr.contains("Too many open files"),
                    "limit {limit} ({code}): {stderr}"
                );
                refused += 1;
            }
            other => panic!("limit {limit}: exit {other:?}: {stderr}"),
        }
    }
    assert!(refused > 0, "no limit was low enough to refuse anything");
}

/// The client's first batch rides in the `exec`'s command line (`--preamble=BASE64`), where it
/// costs no round trip: a session channel takes no data until its command runs. Seen on a
/// deploy waiting for the lock: its agent's command line starts the session with `Hello`, and
/// holds none of what the server's other users must not see.
#[test]
fn the_first_batch_goes_in_the_agents_command_line() {
    let w = World::new();
    let key = w.key();
    let src = w.fx.src("src");
    site_v1(&src);
    let url = w.url();
    let deploy = ["deploy", src.s(), url.as_str(), "-i", key.as_str()];
    w.fx.flip(&deploy).success();
    // The first deploy uploaded the agent (the server's home is its own); from now on it is
    // found, and started with the preamble.
    src.file("index.php", "<?php // again\n", 0o644);
    let lock = hold_lock(&w.fx);
    let run = w.fx.spawn(&[], &[&deploy[..], &["--wait"]].concat());
    let agent = waiting_agent(&run, w.fx.root_str());
    let cmdline = fs::read(format!("/proc/{agent}/cmdline")).unwrap();
    let preamble = cmdline
        .split(|&b| b == 0)
        .find_map(|a| a.strip_prefix(b"--preamble="))
        .unwrap_or_else(|| panic!("no --preamble in {}", String::from_utf8_lossy(&cmdline)));
    let bytes = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(preamble)
            .unwrap()
    };
    // A frame: its length (u32), then `Hello` (tag 0) with the magic.
    assert_eq!(&bytes[4..9], b"\0FLIP", "{bytes:?}");
    // Read as the agent reads it: only what other users of the server may see (`ps` shows a
    // command line), never the stage's file names and digests that follow in the batch.
    let mut rx = flip_wire::FrameReader::new(Box::new(std::io::Cursor::new(bytes)));
    let mut names = Vec::new();
    while let Ok(req) = rx.recv::<flip_wire::Request>() {
        if let flip_wire::Request::Hello { compress, .. } = req {
            if compress != 0 {
                rx.start_decompression().unwrap();
            }
        }
        names.push(<&str>::from(&req).to_string());
    }
    assert_eq!(names, ["Hello", "Lock", "Status", "CheckLive"], "{names:?}");
    drop(lock);
    run.finish(TIMEOUT).success();
    assert_eq!(w.fx.current_link(), "releases/2");
    assert_dir_eq(&w.fx.current(), &src.tree(), "current after the wait");

    // A first batch larger than the command line takes (the stage of 1,500 changed files,
    // their digests alone 48 KB): the most that fits goes there, the rest on the channel.
    for i in 0..1500 {
        src.file(&format!("many/f{i}.php"), format!("<?php // {i}\n"), 0o644);
    }
    w.fx.flip(&deploy).success();
    for i in 0..1500 {
        src.overwrite(&format!("many/f{i}.php"), format!("<?php // {i}, edited\n"));
    }
    let j =
        w.fx.flip(&[&deploy[..], &["--json"]].concat())
            .success()
            .json();
    assert_eq!(j["release"], 4, "{j}");
    assert_dir_eq(
        &w.fx.current(),
        &src.tree(),
        "current after a large first batch",
    );
}
