//! An old server: a Debian 11 (bullseye) root without flip (glibc 2.31, OpenSSL 1.1, no zstd, no
//! b3sum) made by `make old-server-root` (debootstrap, cached under target/old-server/), reached
//! through `--ssh-command` with a wrapper that runs each remote command under `chroot ROOT` with
//! a fresh server HOME. flip finds no agent there, uploads one (compressed and checked: the
//! agent-only build beside it) and runs it there: deploy, redeploy, rollback and releases, with
//! the target's files checked in the root.
//!
//! Needs root (chroot), the Debian root and the portable builds `dist/flip-VERSION-TARGET` and
//! `dist/flip-agent-VERSION-TARGET` (`make dist`, of the same source as this test: an older
//! dist/ speaks an older protocol); tests/run.sh makes them. Without them each test prints a `SKIP` line naming what is
//! missing and why (tests/run.sh passes the reason when the Debian mirror cannot be reached).

mod common;

use common::*;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The issue's bound for the bytes sent on first contact to a server without flip.
const FIRST_CONTACT_LIMIT: u64 = 4_000_000;

/// Prints past the test harness's capture, so a skip is seen in a normal `cargo test` run.
fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP old_server::{test}: {why}");
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `dist/flip-VERSION-ARCH-unknown-linux-gnu`, or `FLIP_TEST_DIST`.
fn dist_binary() -> PathBuf {
    match std::env::var_os("FLIP_TEST_DIST") {
        Some(p) => PathBuf::from(p),
        None => repo().join(format!(
            "dist/flip-{VERSION}-{}-unknown-linux-gnu",
            std::env::consts::ARCH
        )),
    }
}

/// The agent-only build beside [`dist_binary`], as flip finds it.
fn dist_agent(dist: &Path) -> PathBuf {
    let name = dist.file_name().unwrap().to_str().unwrap();
    let rest = name.strip_prefix("flip").unwrap_or("");
    dist.with_file_name(format!("flip-agent{rest}"))
}

/// The Debian 11 root: `FLIP_TEST_OLD_ROOT`, else `target/old-server/bullseye`.
fn debian_root() -> PathBuf {
    match std::env::var_os("FLIP_TEST_OLD_ROOT") {
        Some(p) => PathBuf::from(p),
        None => repo().join("target/old-server/bullseye"),
    }
}

/// One test's old server: a private directory inside the Debian root (removed on drop) holding
/// the server HOME and the deploy target, and the `--ssh-command` wrapper that logs the size of
/// each command line and of each upload it passes on.
struct OldServer {
    fx: Fx,
    chroot: PathBuf,
    /// The test's directory inside the root, as the server sees it (`/tmp/flip-it-XXXX`).
    inside: String,
    _box: tempfile::TempDir,
    wrapper: String,
    wire: PathBuf,
    dist: PathBuf,
    /// The agent-only build beside `dist`.
    agent: PathBuf,
}

impl OldServer {
    /// `None` (after printing why) when this machine cannot run the test.
    // `None` means "cannot run here": a broken fixture must panic, not skip the test.
    #[allow(clippy::unwrap_in_result)]
    fn new(test: &str) -> Option<OldServer> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            skip(test, "not root (chroot needs root)");
            return None;
        }
        let chroot = debian_root();
        if !chroot.join(".ok").exists() {
            let why = std::env::var("FLIP_TEST_OLD_SERVER_SKIP").unwrap_or_else(|_| {
                format!(
                    "no Debian 11 root at {} (`make old-server-root` makes it; tests/run.sh runs that)",
                    chroot.display()
                )
            });
            skip(test, &why);
            return None;
        }
        let dist = dist_binary();
        let agent = dist_agent(&dist);
        for file in [&dist, &agent] {
            if !file.exists() {
                skip(
                    test,
                    &format!(
                        "no portable build at {} (`make dist` makes it; tests/run.sh runs that)",
                        file.display()
                    ),
                );
                return None;
            }
        }
        let fx = Fx::new();
        let boxed = tempfile::Builder::new()
            .prefix("flip-it-")
            .tempdir_in(chroot.join("tmp"))
            .unwrap();
        let inside = format!(
            "/tmp/{}",
            boxed.path().file_name().unwrap().to_str().unwrap()
        );
        fs::create_dir(boxed.path().join("home")).unwrap();
        // The target's parent: a deploy creates only the target directory itself.
        fs::create_dir(boxed.path().join("srv")).unwrap();
        let wire = fx.path("wire");
        fs::create_dir(&wire).unwrap();
        let wrapper = fx.path("ssh-chroot");
        let run = format!(
            "env -i HOME={inside}/home PATH=/usr/local/bin:/usr/bin:/bin /usr/sbin/chroot '{}' /bin/sh -c \"$cmd\"",
            chroot.display()
        );
        fs::write(
            &wrapper,
            format!(
                r#"#!/bin/sh
# flip's --ssh-command: [OPTIONS...] -- DESTINATION COMMAND. Runs COMMAND under chroot.
while [ $# -gt 0 ] && [ "$1" != "--" ]; do shift; done
if [ $# -ne 3 ]; then echo "ssh-chroot: expected -- DESTINATION COMMAND, got: $*" >&2; exit 255; fi
cmd=$3
printf '%s' "$cmd" | wc -c >> '{wire}/commands'
case $cmd in
*flip-upload*)
  # The upload reads its stdin to the end: count it, then pass it on.
  f='{wire}/upload.tmp'
  cat > "$f"
  wc -c < "$f" >> '{wire}/uploads'
  {run} < "$f"
  rc=$?
  rm -f "$f"
  exit $rc
  ;;
esac
exec {run}
"#,
                wire = wire.display(),
            ),
        )
        .unwrap();
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
        Some(OldServer {
            fx,
            chroot,
            inside,
            _box: boxed,
            wrapper: wrapper.to_str().unwrap().to_string(),
            wire,
            dist,
            agent,
        })
    }

    /// A path on the server, as seen from here.
    fn host_path(&self, server_path: &str) -> PathBuf {
        self.chroot.join(server_path.trim_start_matches('/'))
    }

    /// The deploy target as the server sees it.
    fn target_dir(&self) -> String {
        format!("{}/srv/app", self.inside)
    }

    /// The target as flip is given it.
    fn target(&self) -> String {
        format!("old:{}", self.target_dir())
    }

    /// The target root, as seen from here.
    fn root(&self) -> PathBuf {
        self.host_path(&self.target_dir())
    }

    /// The server's agent cache, as seen from here.
    fn agent_cache(&self) -> PathBuf {
        self.host_path(&format!("{}/home/.cache/flip", self.inside))
    }

    /// Runs `bin ARGS... --ssh-command WRAPPER` with the test's HOME.
    fn run(&self, bin: &Path, args: &[&str]) -> Run {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&["--ssh-command", &self.wrapper]);
        let mut child = Command::new(bin)
            .args(&all)
            .env("HOME", &self.fx.home)
            .env("XDG_CACHE_HOME", self.fx.home.join(".cache"))
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn flip");
        let deadline = Instant::now() + TIMEOUT;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "{} {} did not finish within {TIMEOUT:?}",
                    bin.display(),
                    all.join(" ")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        Run {
            args: format!("({}) {}", bin.display(), all.join(" ")),
            code: out.status.code().expect("flip exited"),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Numbers the wrapper logged to `wire/NAME`, one a line.
    fn logged(&self, name: &str) -> Vec<u64> {
        fs::read_to_string(self.wire.join(name))
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect()
    }

    /// `(id, current)` pairs from `releases --json`, run by `bin`.
    fn listed(&self, bin: &Path, extra: &[&str]) -> Vec<(u64, bool)> {
        let mut args = vec!["releases", "--json"];
        let target = self.target();
        args.push(&target);
        args.extend_from_slice(extra);
        let v = self.run(bin, &args).success().json();
        v.as_array()
            .expect("releases --json is an array")
            .iter()
            .map(|r| (r["id"].as_u64().unwrap(), r["current"].as_bool().unwrap()))
            .collect()
    }
}

fn hash_of(path: &Path) -> String {
    blake3::hash(&fs::read(path).unwrap()).to_hex().to_string()
}

/// The portable build deploys to Debian 11 by itself: it uploads the agent-only build beside it
/// once (compressed: the server has gzip but no zstd), under 4 MB on first contact, and the
/// agent it uploaded serves deploy, redeploy, rollback and releases there.
#[test]
fn a_portable_build_deploys_redeploys_and_rolls_back_on_debian_11() {
    let Some(w) = OldServer::new("a_portable_build_deploys_redeploys_and_rolls_back_on_debian_11")
    else {
        return;
    };
    let src = w.fx.src("src");
    site_v1(&src);
    let v1 = src.tree();
    let target = w.target();
    let first = w
        .run(&w.dist, &["deploy", "--json", src.s(), &target])
        .success()
        .stderr_has("has no flip")
        .stderr_has(&format!("uploading {} (", w.agent.display()))
        .stderr_has("gzip on the wire");
    assert_dir_eq(&w.root().join("current"), &v1, "v1 deployed on Debian 11");

    // The agent that ran is the uploaded copy of exactly the agent-only build, keyed by its
    // hash (never the name a whole flip of this version would have).
    assert_ne!(hash_of(&w.agent), hash_of(&w.dist));
    let agent = w
        .agent_cache()
        .join(format!("flip-{VERSION}-{}", hash_of(&w.agent)));
    assert_eq!(fs::read(&agent).unwrap(), fs::read(&w.agent).unwrap());
    assert_eq!(
        fs::metadata(&agent).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let names: Vec<String> = fs::read_dir(w.agent_cache())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names.len(),
        1,
        "temp files left in the agent cache: {names:?}"
    );

    // First contact on the wire: the command lines and the upload's stdin.
    let uploads = w.logged("uploads");
    assert_eq!(uploads.len(), 1, "one upload");
    let commands: u64 = w.logged("commands").iter().sum();
    let contact = commands + uploads[0];
    let binary = fs::metadata(&w.agent).unwrap().len();
    let whole = fs::metadata(&w.dist).unwrap().len();
    let sent = num(&first.json(), "/bytes/sent");
    let _ = writeln!(
        std::io::stderr(),
        "old_server: first contact {contact} bytes ({} bytes of agent upload, gzip of the \
         {binary}-byte agent-only build (flip itself: {whole} bytes); {commands} bytes of \
         command lines); then the deploy sent {sent} bytes",
        uploads[0]
    );
    assert!(
        contact < FIRST_CONTACT_LIMIT,
        "first contact sent {contact} bytes (limit {FIRST_CONTACT_LIMIT})"
    );
    assert!(uploads[0] < binary, "the upload is compressed");

    // Redeploy: the cached agent runs, nothing is uploaded again.
    site_v2(&src);
    let v2 = src.tree();
    w.run(&w.dist, &["deploy", src.s(), &target]).success();
    assert_eq!(w.logged("uploads").len(), 1, "no second upload");
    assert_eq!(
        fs::read_link(w.root().join("current")).unwrap(),
        PathBuf::from("releases/2")
    );
    assert_dir_eq(&w.root().join("current"), &v2, "v2 deployed on Debian 11");
    assert_eq!(w.listed(&w.dist, &[]), vec![(1, false), (2, true)]);

    w.run(&w.dist, &["rollback", &target]).success();
    assert_eq!(
        fs::read_link(w.root().join("current")).unwrap(),
        PathBuf::from("releases/1")
    );
    assert_dir_eq(&w.root().join("current"), &v1, "rolled back on Debian 11");
    assert_eq!(w.listed(&w.dist, &[]), vec![(1, true), (2, false)]);
    assert_eq!(w.logged("uploads").len(), 1, "still one upload");
}

/// A build that is not portable (this test binary's debug flip and the debug flip-agent beside
/// it, linked against this machine's newer glibc) is not uploaded to Debian 11: the error says
/// what to do. A portable build named by `--agent-binary` (a whole flip), or kept in the local
/// per-platform cache (the agent-only build), is uploaded and runs there.
#[test]
fn a_debug_build_uploads_the_portable_agent_it_is_given() {
    let Some(w) = OldServer::new("a_debug_build_uploads_the_portable_agent_it_is_given") else {
        return;
    };
    let debug = PathBuf::from(FLIP);
    let src = w.fx.src("src");
    site_v1(&src);
    let target = w.target();

    let refused = w
        .run(&debug, &["deploy", src.s(), &target])
        .code(6)
        .stderr_has(&format!(
            "the agent-only build beside this flip ({}) is not a portable build",
            FLIP_AGENT
        ))
        .stderr_has("the server has glibc 2.31")
        .stderr_has(&format!("Install flip {VERSION} on the server"))
        .stderr_has("--agent-binary FILE")
        .stderr_has(&format!("`{}`", uname_sm()));
    let cache_file = w.fx.home.join(format!(
        ".cache/flip/agents/flip-{VERSION}-{}",
        uname_sm().replace(' ', "-")
    ));
    assert!(
        refused.stderr.contains(&cache_file.display().to_string()),
        "{}",
        refused.stderr
    );
    assert!(w.logged("uploads").is_empty(), "nothing uploaded");
    assert!(!w.root().join("current").exists());

    // --agent-binary: the portable build is uploaded and runs the deploy.
    let dist = w.dist.to_str().unwrap();
    w.run(
        &debug,
        &["deploy", src.s(), &target, "--agent-binary", dist],
    )
    .success();
    assert_dir_eq(
        &w.root().join("current"),
        &src.tree(),
        "deployed by the given agent",
    );
    let agent = w
        .agent_cache()
        .join(format!("flip-{VERSION}-{}", hash_of(&w.dist)));
    assert_eq!(fs::read(&agent).unwrap(), fs::read(&w.dist).unwrap());
    assert_eq!(w.logged("uploads").len(), 1);

    // The local per-platform cache: the agent-only build, found without a flag.
    fs::remove_dir_all(w.agent_cache()).unwrap();
    fs::create_dir_all(cache_file.parent().unwrap()).unwrap();
    fs::copy(&w.agent, &cache_file).unwrap();
    assert_eq!(w.listed(&debug, &[]), vec![(1, true)]);
    assert_eq!(
        w.logged("uploads").len(),
        2,
        "uploaded from the local cache"
    );
    let agent = w
        .agent_cache()
        .join(format!("flip-{VERSION}-{}", hash_of(&w.agent)));
    assert_eq!(fs::read(&agent).unwrap(), fs::read(&w.agent).unwrap());
}

/// `uname -sm` here, which is the server's (the root is this machine's architecture).
fn uname_sm() -> String {
    let out = Command::new("uname").arg("-sm").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
