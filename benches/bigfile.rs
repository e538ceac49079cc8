//! Peak memory and wall time of deploying very large files, local target (a `flip agent` child
//! process over pipes, as over SSH).
//!
//! ```text
//! cargo bench --bench bigfile                          # 1 GiB and 4 GiB, under target/tmp
//! cargo bench --bench bigfile -- --gib 1,4 --dir /dev/shm
//! ```
//! For each size, a tree of one big file of incompressible bytes, one 6 MiB file (small enough
//! for the content cache, so it can go as a zstd patch) and an `index.php`:
//! 1. `initial`: first deploy (everything literal);
//! 2. `cache`: a few regions of both files overwritten, one block inserted into the big file;
//!    redeploy with the caches (the 6 MiB file goes as a zstd patch against the content cache;
//!    the big one, far above what the content cache keeps, as an rsync delta);
//! 3. `delta`: other regions changed; redeploy with `--no-cache` (both files go as rsync deltas
//!    against the agent's signatures).
//!
//! Peak RSS (VmHWM) of the client and of its agent is polled from /proc every 20 ms while each
//! deploy runs, and the larger of the two is checked against `wait4`'s `ru_maxrss`. Every live
//! release is compared with its source (blake3). Writes benches/results/bigfile.md. Under
//! `cargo test` (no `--bench` argument) it runs one 48 MiB round in a temp dir and writes
//! nothing.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FLIP: &str = env!("CARGO_BIN_EXE_flip");

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let sizes: Vec<u64> = if bench {
        opt("--gib")
            .unwrap_or_else(|| "1,4".into())
            .split(',')
            .map(|g| g.trim().parse::<u64>().expect("--gib 1,4") << 30)
            .collect()
    } else {
        vec![48 << 20]
    };
    let base = match opt("--dir") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tmp"),
    };
    fs::create_dir_all(&base).unwrap();
    let mut rows = Vec::new();
    for &size in &sizes {
        let work = tempfile::Builder::new()
            .prefix("flip-bigfile-")
            .tempdir_in(&base)
            .unwrap();
        rows.extend(round(work.path(), size));
    }
    let mut md = String::new();
    md.push_str("# Big files: peak memory per side\n\n");
    md.push_str(&format!(
        "Command: `cargo bench --bench bigfile -- --gib {}{}`  \n",
        sizes
            .iter()
            .map(|s| (s >> 30).to_string())
            .collect::<Vec<_>>()
            .join(","),
        opt("--dir")
            .map(|d| format!(" --dir {d}"))
            .unwrap_or_default()
    ));
    md.push_str(&format!(
        "Machine: {} cores, {}; files under {}.\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        uname(),
        base.display()
    ));
    md.push_str(
        "A tree of one big file of incompressible bytes, a 6 MiB file and `index.php`; local \
         target (client and `flip agent` child over pipes). `initial`: first deploy. `cache`: 8 \
         regions of 64 KiB overwritten and 1 MiB inserted into the big file, 8 bytes of the \
         6 MiB file changed, redeployed with the caches (the 6 MiB file as a zstd patch against \
         the content cache; the big file, far above what that cache keeps, as an rsync delta). \
         `delta`: other regions changed, redeployed with `--no-cache` (both as rsync deltas). Peak RSS is VmHWM polled from /proc every 20 ms; `max (wait4)` is the kernel's \
         maximum over both processes.\n\n",
    );
    md.push_str(
        "| file | step | wall s | sent | delta files | patched | client peak MiB | agent peak MiB | max (wait4) MiB |\n",
    );
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {} | {} | {} | {:.1} | {:.1} | {:.1} |\n",
            human(r.size),
            r.step,
            r.wall.as_secs_f64(),
            human(r.sent),
            r.delta,
            r.patched,
            r.client as f64 / 1048576.0,
            r.agent as f64 / 1048576.0,
            r.maxrss as f64 / 1048576.0,
        ));
    }
    print!("{md}");
    for r in &rows {
        assert!(
            r.client.max(r.agent).max(r.maxrss) < 100 << 20,
            "{} {}: a side peaked above 100 MB",
            human(r.size),
            r.step
        );
    }
    if bench {
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results/bigfile.md");
        fs::write(&out, md).unwrap();
        eprintln!("wrote {}", out.display());
    }
}

struct Row {
    size: u64,
    step: &'static str,
    wall: Duration,
    sent: u64,
    delta: u64,
    patched: u64,
    client: u64,
    agent: u64,
    maxrss: u64,
}

fn round(work: &Path, size: u64) -> Vec<Row> {
    let src = work.join("src");
    let root = work.join("target");
    let home = work.join("home");
    fs::create_dir_all(src.join("data")).unwrap();
    fs::create_dir_all(&home).unwrap();
    let big = src.join("data/big.bin");
    let six = src.join("data/six.bin");
    write_noise(&big, 1, size);
    write_noise(&six, 2, 6 << 20);
    fs::write(src.join("index.php"), "<?php\n").unwrap();
    let mut rows = Vec::new();
    let deploy = |step: &'static str, extra: &[&str]| -> Row {
        let mut args = vec![
            "deploy",
            "--json",
            "--keep",
            "1",
            src.to_str().unwrap(),
            root.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (json, wall, client, agent, maxrss) = run(&home, &args);
        let v: serde_json::Value = serde_json::from_str(&json).expect("deploy --json");
        let n = |p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
        let live = root.join("current/data/big.bin");
        assert_eq!(hash_file(&live), hash_file(&big), "{step}: live big file");
        assert_eq!(
            hash_file(&root.join("current/data/six.bin")),
            hash_file(&six),
            "{step}: live 6 MiB file"
        );
        Row {
            size,
            step,
            wall,
            sent: n("/bytes/sent"),
            delta: n("/files/delta"),
            patched: n("/files/patched"),
            client,
            agent,
            maxrss,
        }
    };
    // The first deploy fills the caches (the 6 MiB file's content among them).
    rows.push(deploy("initial", &[]));
    edit(&big, &six, size, 10);
    insert(&big, size / 3, 1 << 20, 11);
    rows.push(deploy("cache", &[]));
    edit(&big, &six, size, 20);
    rows.push(deploy("delta", &["--no-cache"]));
    rows
}

/// Overwrites 8 regions of 64 KiB of `big` and 8 bytes of `six`, in place.
fn edit(big: &Path, six: &Path, size: u64, seed: u64) {
    let f = File::options().write(true).open(big).unwrap();
    for i in 0..8u64 {
        let at = (size / 9) * (i + 1) + seed * 4096;
        f.write_all_at(&noise(seed * 100 + i, 64 << 10), at)
            .unwrap();
    }
    let f = File::options().write(true).open(six).unwrap();
    f.write_all_at(&noise(seed, 8), 3 << 20).unwrap();
}

/// Inserts `n` bytes of noise at `at` into `path` (rewritten through a temp file, 8 MiB at a
/// time).
fn insert(path: &Path, at: u64, n: usize, seed: u64) {
    let tmp = path.with_extension("tmp");
    {
        let mut r = File::open(path).unwrap();
        let mut w = std::io::BufWriter::with_capacity(8 << 20, File::create(&tmp).unwrap());
        std::io::copy(&mut (&mut r).take(at), &mut w).unwrap();
        w.write_all(&noise(seed, n)).unwrap();
        std::io::copy(&mut r, &mut w).unwrap();
        w.flush().unwrap();
    }
    fs::rename(&tmp, path).unwrap();
}

/// Runs flip; returns its stdout, wall time, the peak RSS of the client and of its agent
/// (polled), and `wait4`'s maximum over both.
fn run(home: &Path, args: &[&str]) -> (String, Duration, u64, u64, u64) {
    let start = Instant::now();
    let mut child = Command::new(FLIP)
        .args(args)
        .env("HOME", home)
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn flip");
    let pid = child.id() as i32;
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let (mut client, mut agent, mut agent_pid) = (0u64, 0u64, None);
    let (status, maxrss) = loop {
        client = client.max(hwm(pid));
        if agent_pid.is_none() {
            agent_pid = child_of(pid);
        }
        if let Some(a) = agent_pid {
            agent = agent.max(hwm(a));
        }
        let mut status = 0;
        // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child, filling structs we own.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            break (status, ru.ru_maxrss as u64 * 1024);
        }
        assert_eq!(r, 0, "wait4: {}", std::io::Error::last_os_error());
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = start.elapsed();
    let out = reader.join().unwrap();
    // The child is reaped; keep std from waiting for it again.
    #[allow(clippy::mem_forget)]
    std::mem::forget(child);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "flip {args:?} failed: {status}"
    );
    (out, wall, client, agent, maxrss)
}

/// VmHWM of a process in bytes (0 once it is gone).
fn hwm(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// A child process of `pid` (the agent of a local deploy).
fn child_of(pid: i32) -> Option<i32> {
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces; the fields after the last ')'.
        let after = &stat[stat.rfind(')')? + 2..];
        if after.split(' ').nth(1).and_then(|x| x.parse::<i32>().ok()) == Some(pid) {
            return Some(p);
        }
    }
    None
}

/// Writes `len` bytes of noise to `path`, 8 MiB at a time.
fn write_noise(path: &Path, seed: u64, len: u64) {
    let mut w = File::create(path).unwrap();
    let mut done = 0u64;
    let mut i = 0;
    while done < len {
        let n = (len - done).min(8 << 20) as usize;
        w.write_all(&noise(seed * 1_000_003 + i, n)).unwrap();
        done += n as u64;
        i += 1;
    }
}

/// blake3 of a file, read 16 MiB at a time (a mapping would make this process's resident
/// set, which a spawned child inherits as its starting peak, as large as the file).
fn hash_file(path: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut f = File::open(path).unwrap();
    let mut buf = vec![0u8; 16 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finalize();
        }
        h.update_rayon(&buf[..n]);
    }
}

/// Deterministic incompressible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
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

fn human(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn uname() -> String {
    Command::new("uname")
        .arg("-sr")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
