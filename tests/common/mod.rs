//! Shared helpers for the integration tests of the real `flip` binary: an isolated environment
//! per test (its own temp dir, HOME and XDG_CACHE_HOME, so the hash cache never touches the real
//! home), source tree builders, and byte-for-byte, mode-for-mode tree comparison.

#![allow(dead_code)]

use flip_testkit::Sshd;
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub const FLIP: &str = env!("CARGO_BIN_EXE_flip");
/// The agent-only binary built with [`FLIP`], beside it: what flip uploads to a server.
pub const FLIP_AGENT: &str = env!("CARGO_BIN_EXE_flip-agent");

/// `flip` to be run as `nobody` (uid and gid 65534, no supplementary groups) through
/// setpriv(1) from util-linux: add its arguments, environment and working directory.
#[allow(dead_code)]
pub fn flip_as_nobody() -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        FLIP,
    ]);
    c
}

/// Generous upper bound for one flip command; only there so a hang fails instead of blocking.
pub const TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Running flip
// ---------------------------------------------------------------------------------------------

/// The outcome of one flip command.
#[derive(Debug)]
pub struct Run {
    pub args: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn context(&self) -> String {
        format!(
            "flip {}\nexit code: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args, self.code, self.stdout, self.stderr
        )
    }

    /// Asserts exit code 0.
    #[track_caller]
    pub fn success(self) -> Run {
        assert_eq!(self.code, 0, "expected success\n{}", self.context());
        self
    }

    /// Asserts the given exit code.
    #[track_caller]
    pub fn code(self, code: i32) -> Run {
        assert_eq!(self.code, code, "unexpected exit code\n{}", self.context());
        self
    }

    /// Asserts stderr contains `needle`.
    #[track_caller]
    pub fn stderr_has(self, needle: &str) -> Run {
        assert!(
            self.stderr.contains(needle),
            "stderr does not mention {needle:?}\n{}",
            self.context()
        );
        self
    }

    /// stdout parsed as one JSON value.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{}", self.context()))
    }
}

/// A flip process started in the background.
pub struct Running {
    args: String,
    child: Child,
    out: Option<JoinHandle<Vec<u8>>>,
    err: Option<JoinHandle<Vec<u8>>>,
    /// What it wrote on stderr so far.
    err_so_far: Arc<Mutex<Vec<u8>>>,
}

impl Running {
    /// What the process wrote on stderr so far.
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.err_so_far.lock().unwrap()).into_owned()
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process however it ends (a signal included); `None` if it ran past
    /// `timeout` (then it is killed).
    pub fn wait_any(mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the process (killing it and failing after `timeout`).
    pub fn finish(mut self, timeout: Duration) -> Run {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("flip {} did not finish within {timeout:?}", self.args);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stdout = self.out.take().unwrap().join().unwrap();
        let stderr = self.err.take().unwrap().join().unwrap();
        let stdout = String::from_utf8_lossy(&stdout).into_owned();
        let stderr = String::from_utf8_lossy(&stderr).into_owned();
        let code = status.code().unwrap_or_else(|| {
            panic!(
                "flip {} was killed by a signal ({status})\nstderr:\n{stderr}",
                self.args
            )
        });
        Run {
            args: self.args.clone(),
            code,
            stdout,
            stderr,
        }
    }
}

fn drain(r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    drain_into(r, Arc::default())
}

/// [`drain`] that also appends what it reads to `seen` as it comes.
fn drain_into(mut r: impl Read + Send + 'static, seen: Arc<Mutex<Vec<u8>>>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => seen.lock().unwrap().extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        std::mem::take(&mut *seen.lock().unwrap())
    })
}

/// One test's world: a temp dir holding a fake HOME, the sources and the target root.
pub struct Fx {
    tmp: TempDir,
    pub home: PathBuf,
    /// The deploy target (not created until the first deploy).
    pub root: PathBuf,
}

impl Fx {
    pub fn new() -> Fx {
        let tmp = tempfile::Builder::new()
            .prefix("flip-it-")
            .tempdir()
            .expect("tempdir");
        let home = tmp.path().join("home");
        fs::create_dir(&home).unwrap();
        let root = tmp.path().join("target");
        Fx { tmp, home, root }
    }

    /// A path inside the test's temp dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// A new, empty source directory `name` in the temp dir.
    pub fn src(&self, name: &str) -> Src {
        let dir = self.path(name);
        fs::create_dir_all(&dir).unwrap();
        Src { dir }
    }

    pub fn root_str(&self) -> &str {
        s(&self.root)
    }

    pub fn release(&self, id: u64) -> PathBuf {
        self.root.join("releases").join(id.to_string())
    }

    pub fn current(&self) -> PathBuf {
        self.root.join("current")
    }

    /// `readlink ROOT/current`.
    pub fn current_link(&self) -> String {
        fs::read_link(self.current())
            .expect("current is a symlink")
            .to_str()
            .unwrap()
            .to_string()
    }

    /// Numeric directory names under ROOT/releases, ascending.
    pub fn release_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = fs::read_dir(self.root.join("releases"))
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str()?.parse().ok())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Names under ROOT/releases that are not release ids (staging, trash, ...).
    pub fn release_leftovers(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root.join("releases"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
            .filter(|n| n.parse::<u64>().is_err())
            .collect();
        v.sort();
        v
    }

    /// File names in ROOT/.flip/releases, sorted.
    pub fn meta_files(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root.join(".flip/releases"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    }

    fn command(&self, env: &[(&str, &str)], args: &[&str]) -> Command {
        let mut c = Command::new(FLIP);
        c.args(args)
            .current_dir(self.tmp.path())
            .env("HOME", &self.home)
            .env("XDG_CACHE_HOME", self.home.join(".cache"))
            .env_remove("FLIP_FAULT")
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    /// Starts flip in the background.
    pub fn spawn(&self, env: &[(&str, &str)], args: &[&str]) -> Running {
        let mut child = self.command(env, args).spawn().expect("spawn flip");
        let out = drain(child.stdout.take().unwrap());
        let err_so_far = Arc::<Mutex<Vec<u8>>>::default();
        let err = drain_into(child.stderr.take().unwrap(), err_so_far.clone());
        Running {
            args: args.join(" "),
            child,
            out: Some(out),
            err: Some(err),
            err_so_far,
        }
    }

    /// Runs flip to completion.
    pub fn flip(&self, args: &[&str]) -> Run {
        self.spawn(&[], args).finish(TIMEOUT)
    }

    /// Runs flip with extra environment variables.
    pub fn flip_env(&self, env: &[(&str, &str)], args: &[&str]) -> Run {
        self.spawn(env, args).finish(TIMEOUT)
    }

    /// `flip deploy --json --no-whole-file SRC ROOT EXTRA...`, which must succeed; returns its
    /// JSON. `--no-whole-file`: changed files go as patches and deltas, as over SSH, where a
    /// local deploy sends them whole by default (`tests/deploy.rs` holds that default); the
    /// tests through this helper check the delta engine on the cheapest target.
    #[track_caller]
    pub fn deploy(&self, src: &Src, extra: &[&str]) -> Value {
        self.deploy_env(&[], src, extra)
    }

    /// [`Fx::deploy`] with extra environment variables.
    #[track_caller]
    pub fn deploy_env(&self, env: &[(&str, &str)], src: &Src, extra: &[&str]) -> Value {
        let mut args = vec![
            "deploy",
            "--json",
            "--no-whole-file",
            src.s(),
            self.root_str(),
        ];
        args.extend_from_slice(extra);
        self.flip_env(env, &args).success().json()
    }

    /// `flip releases --json ROOT` as (id, current) pairs.
    pub fn listed(&self) -> Vec<(u64, bool)> {
        let v = self
            .flip(&["releases", "--json", self.root_str()])
            .success()
            .json();
        v.as_array()
            .expect("releases --json is an array")
            .iter()
            .map(|r| (r["id"].as_u64().unwrap(), r["current"].as_bool().unwrap()))
            .collect()
    }
}

/// A UTF-8 path as &str (test paths always are).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------------------
// Source trees
// ---------------------------------------------------------------------------------------------

/// A source directory being built.
pub struct Src {
    pub dir: PathBuf,
}

impl Src {
    pub fn s(&self) -> &str {
        s(&self.dir)
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Writes a file (a new inode every time) with exactly `mode`.
    pub fn file(&self, rel: &str, data: impl AsRef<[u8]>, mode: u32) -> &Self {
        let p = self.p(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        let _ = fs::remove_file(&p);
        fs::write(&p, data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    /// Overwrites a file's bytes in place (same inode, mode kept).
    pub fn overwrite(&self, rel: &str, data: impl AsRef<[u8]>) -> &Self {
        fs::write(self.p(rel), data).unwrap();
        self
    }

    pub fn dir(&self, rel: &str, mode: u32) -> &Self {
        let p = self.p(rel);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    pub fn symlink(&self, rel: &str, target: &str) -> &Self {
        let p = self.p(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        std::os::unix::fs::symlink(target, p).unwrap();
        self
    }

    /// Removes a file, symlink or empty directory.
    pub fn remove(&self, rel: &str) -> &Self {
        let p = self.p(rel);
        let m = fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            fs::remove_dir(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
        self
    }

    pub fn rename(&self, from: &str, to: &str) -> &Self {
        let to = self.p(to);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::rename(self.p(from), to).unwrap();
        self
    }

    pub fn chmod(&self, rel: &str, mode: u32) -> &Self {
        fs::set_permissions(self.p(rel), fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    pub fn read(&self, rel: &str) -> Vec<u8> {
        fs::read(self.p(rel)).unwrap()
    }

    pub fn tree(&self) -> Tree {
        read_tree(&self.dir)
    }
}

/// Deterministic incompressible bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Size of `big.bin` in the standard site (well above the 8 KiB delta threshold).
pub const BIG: usize = 256 * 1024;

/// The standard first version of a site: every kind of entry flip must reproduce.
/// 10 regular files.
pub fn site_v1(src: &Src) {
    src.file("index.html", "<h1>hello</h1>\n", 0o644)
        .file(".htaccess", "Deny from all\n", 0o644)
        .file("small.txt", "small v1\n", 0o644)
        .file("big.bin", noise(1, BIG), 0o644)
        .file("bin/run.sh", "#!/bin/sh\necho run\n", 0o755)
        .file("assets/logo.png", noise(2, 3000), 0o644)
        .file("conf/app.conf", "key = value\n", 0o644)
        .file("gone.txt", "to be deleted\n", 0o640)
        .file("sub/deep/file.txt", "deep\n", 0o600)
        .file("sub/zero", "", 0o644)
        .dir("sub/deep", 0o750)
        .dir("empty", 0o755)
        .dir("empty2", 0o700)
        .symlink("dangling", "does/not/exist")
        .symlink("assets-link", "assets")
        .symlink("abs-link", "/etc/hostname")
        .symlink("bin/up", "../index.html");
}

pub const V1_FILES: u64 = 10;

/// Edits turning [`site_v1`] into the second version: a delta-sized edit, a small edit, an
/// addition, a deletion, a rename, a mode change on unchanged content, a new symlink and a
/// removed empty directory. 10 regular files: 4 linked, 3 copied (the rename, the mode change and
/// the empty file, which is never linked), 1 delta, 2 literal; 2 removed paths.
pub fn site_v2(src: &Src) {
    let mut big = src.read("big.bin");
    for (i, b) in big[100_000..100_064].iter_mut().enumerate() {
        *b = i as u8;
    }
    src.overwrite("big.bin", big)
        .overwrite("small.txt", "small v2, edited\n")
        .file("new.txt", "a brand new file\n", 0o644)
        .remove("gone.txt")
        .rename("assets/logo.png", "assets/img/logo.png")
        .chmod("conf/app.conf", 0o600)
        .symlink("newlink", "index.html")
        .remove("empty2");
}

/// `lines` lines of PHP-like text, each different: content that patches and deltas compress
/// well.
pub fn php_lines(lines: usize) -> String {
    (0..lines)
        .map(|i| format!("<?php // line {i}: $value_{i} = compute({i});\n"))
        .collect()
}

/// Recursively copies a tree, keeping modes and symlinks (new inodes, new mtimes).
pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let m = fs::symlink_metadata(&src).unwrap();
        if m.file_type().is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if m.is_dir() {
            copy_tree(&src, &dst);
            fs::set_permissions(&dst, fs::Permissions::from_mode(m.mode() & 0o7777)).unwrap();
        } else {
            fs::copy(&src, &dst).unwrap();
            fs::set_permissions(&dst, fs::Permissions::from_mode(m.mode() & 0o7777)).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Trees on disk
// ---------------------------------------------------------------------------------------------

/// One entry of a tree, as flip must reproduce it.
#[derive(Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: PathBuf },
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Dir { mode } => write!(f, "dir {mode:o}"),
            Node::File { mode, data } => write!(
                f,
                "file {mode:o}, {} bytes, blake3 {}",
                data.len(),
                &blake3::hash(data).to_hex()[..16]
            ),
            Node::Symlink { target } => write!(f, "symlink -> {}", target.display()),
        }
    }
}

/// Relative path → entry, for everything under a directory (the directory itself excluded;
/// symlinks are never followed, except that `dir` itself may be one, like `ROOT/current`).
pub type Tree = BTreeMap<String, Node>;

pub fn read_tree(dir: &Path) -> Tree {
    let mut t = Tree::new();
    walk(dir, "", &mut t);
    t
}

fn walk(dir: &Path, prefix: &str, out: &mut Tree) {
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
        let e = e.unwrap();
        let name = e.file_name().to_str().unwrap().to_string();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let p = e.path();
        let m = fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        if ft.is_symlink() {
            out.insert(
                rel,
                Node::Symlink {
                    target: fs::read_link(&p).unwrap(),
                },
            );
        } else if ft.is_dir() {
            out.insert(
                rel.clone(),
                Node::Dir {
                    mode: m.mode() & 0o7777,
                },
            );
            walk(&p, &rel, out);
        } else if ft.is_file() {
            out.insert(
                rel,
                Node::File {
                    mode: m.mode() & 0o7777,
                    data: fs::read(&p).unwrap(),
                },
            );
        } else {
            panic!("unexpected file type at {}", p.display());
        }
    }
}

/// Asserts two trees are equal, listing every difference (paths, kinds, modes, sizes, targets).
#[track_caller]
pub fn assert_tree_eq(actual: &Tree, expected: &Tree, what: &str) {
    let mut diffs = Vec::new();
    for (k, v) in expected {
        match actual.get(k) {
            None => diffs.push(format!("  missing:    {k} ({v:?})")),
            Some(a) if a != v => diffs.push(format!("  differs:    {k}: {a:?}, expected {v:?}")),
            _ => {}
        }
    }
    for (k, v) in actual {
        if !expected.contains_key(k) {
            diffs.push(format!("  unexpected: {k} ({v:?})"));
        }
    }
    assert!(diffs.is_empty(), "{what}:\n{}", diffs.join("\n"));
}

/// Asserts the tree at `dir` equals `expected`.
#[track_caller]
pub fn assert_dir_eq(dir: &Path, expected: &Tree, what: &str) {
    assert_tree_eq(&read_tree(dir), expected, what);
}

/// Paths of the regular files of a tree.
pub fn files_of(t: &Tree) -> Vec<String> {
    t.iter()
        .filter(|(_, n)| matches!(n, Node::File { .. }))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Inode number (of the path itself, not following a symlink).
/// Makes a FIFO at `p` (mode 0644).
pub fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(s(p)).unwrap();
    // SAFETY: mkfifo of a NUL-terminated path.
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(r, 0, "mkfifo {}", p.display());
}

pub fn ino(p: &Path) -> u64 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .ino()
}

/// (seconds, nanoseconds) of a path's mtime.
pub fn mtime(p: &Path) -> (i64, i64) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.mtime(), m.mtime_nsec())
}

/// Sets a path's atime and mtime (not following a symlink).
pub fn set_mtime(p: &Path, secs: i64, nsec: i64) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nsec as libc::c_long,
    };
    let times = [ts, ts];
    // SAFETY: a valid NUL-terminated path and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

/// Writes `data` over the start of the file at `p`, in place (the same inode), and puts its
/// mtime back: only its ctime tells (an edit made behind flip's back, covering its tracks).
pub fn edit_in_place(p: &Path, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let (secs, nsec) = mtime(p);
    fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .write_all_at(data, 0)
        .unwrap();
    set_mtime(p, secs, nsec);
}

/// Gives every regular file under `dir` a distinct mtime: `base + i` seconds, `i * 1000 + 7`
/// nanoseconds, in path order.
pub fn stamp_files(dir: &Path, base: i64) {
    for (i, rel) in files_of(&read_tree(dir)).iter().enumerate() {
        set_mtime(&dir.join(rel), base + i as i64, i as i64 * 1000 + 7);
    }
}

/// Number of a JSON field, failing with the whole document when absent.
#[track_caller]
pub fn num(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {v}"))
}

pub fn hosts(j: &Value) -> &Vec<Value> {
    j["hosts"].as_array().expect("hosts is an array")
}

/// Two SSH servers that both trust one user key, and the fixture's known_hosts trusting both.
pub struct Servers {
    pub a: Sshd,
    pub b: Sshd,
}

impl Servers {
    pub fn start(fx: &Fx) -> Servers {
        let (a, b) = (Sshd::start(), Sshd::start());
        let key = fs::read_to_string(a.user_key().with_extension("pub")).unwrap();
        fs::write(b.dir().join("authorized_keys"), key).unwrap();
        fs::create_dir_all(fx.home.join(".ssh")).unwrap();
        fs::write(
            fx.home.join(".ssh/known_hosts"),
            format!(
                "{}\n{}\n",
                a.host_public_key_line(),
                b.host_public_key_line()
            ),
        )
        .unwrap();
        Servers { a, b }
    }

    pub fn args(&self) -> Vec<String> {
        vec![
            "-i".into(),
            s(&self.a.user_key()).into(),
            "--remote-flip".into(),
            FLIP.into(),
        ]
    }

    /// The two SSH targets, roots `ra` and `rb`.
    pub fn targets(&self, ra: &Path, rb: &Path) -> Vec<String> {
        vec![
            format!("ssh://root@127.0.0.1:{}{}", self.a.port(), s(ra)),
            format!("ssh://root@127.0.0.1:{}{}", self.b.port(), s(rb)),
        ]
    }

    pub fn run(&self, fx: &Fx, args: &[&str]) -> Run {
        let key = self.a.user_key();
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["-i", s(&key), "--remote-flip", FLIP]);
        fx.flip(&a)
    }
}

/// The children of process `pid`: every thread's (a child belongs to the thread that started
/// it, e.g. a pipeline worker that connected, not the main thread), in no set order.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether process `pid` is gone (or a zombie no one has reaped yet).
pub fn exited(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Takes `root`'s deploy lock (`.flip/lock`) from this process, waiting for it, as another
/// deploy holds it: held until the file is dropped.
pub fn hold_root_lock(root: &Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join(".flip/lock"))
        .unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    lock
}
