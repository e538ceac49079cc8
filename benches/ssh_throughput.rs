//! Upload throughput over SSH: flip against `cat FILE | ssh host 'cat >/dev/null'` with the system
//! OpenSSH client, on a private sshd on loopback (flip_testkit::Sshd).
//!
//! ```text
//! cargo bench --bench ssh_throughput                # 512 MiB, 5 interleaved rounds
//! cargo bench --bench ssh_throughput -- --mib 256 --rounds 3
//! ```
//! Three ways to move the same bytes, interleaved (A B C A B C ...):
//! - `system`: `cat FILE | ssh -F cfg host 'cat >/dev/null'` — the yardstick;
//! - `ssh2`: flip's transport (ssh2 exec channel and pump) writing the file to `cat >/dev/null`;
//! - `deploy`: `flip deploy` of a tree of new, incompressible files over ssh2 to a target on
//!   /dev/shm, end to end (scan, stream, write, blake3-verify, syncfs, activate), with
//!   `--compress-level 0` and with the default level.
//!
//! Writes benches/results/ssh-throughput.md. Under `cargo test` (no `--bench` argument) it runs
//! a 16 MiB smoke round and checks only that everything works.

use flip_testkit::Sshd;
use flip_transport::ssh::{self, SshOptions, SshTarget};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const FLIP: &str = env!("CARGO_BIN_EXE_flip");

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (mib, rounds) = if bench {
        (arg("--mib", 512), arg("--rounds", 5))
    } else {
        (16, 1)
    };
    let size = mib << 20;

    let sshd = Sshd::start();
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    sshd.write_known_hosts(&home.join(".ssh/known_hosts"));
    let cfg = work.path().join("ssh_config");
    sshd.write_ssh_config(&cfg, "bench");

    // Incompressible payload: one file for the pipes, 8 files of the same total for deploys.
    let data = noise(size);
    let file = work.path().join("payload");
    std::fs::write(&file, &data).unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    for (i, part) in data.chunks(size / 8).enumerate() {
        std::fs::write(tree.join(format!("part{i}.bin")), part).unwrap();
    }

    let target = SshTarget {
        user: Some("root".into()),
        host: "127.0.0.1".into(),
        port: Some(sshd.port()),
        path: "/tmp".into(),
    };
    let opts = SshOptions {
        identity: Some(sshd.user_key()),
        home: Some(home.clone()),
        agent_socket: Some(PathBuf::new()),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    };

    let names = [
        "system ssh (cat | ssh)",
        "flip ssh2 channel",
        "flip deploy, zstd off",
        "flip deploy, zstd 3",
    ];
    let mut secs: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        secs[0].push(time(|| {
            let st = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "cat '{}' | ssh -F '{}' bench 'cat >/dev/null'",
                    file.display(),
                    cfg.display()
                ))
                .status()
                .unwrap();
            assert!(st.success(), "system ssh failed");
        }));
        secs[1].push(time(|| {
            let mut s = ssh::exec(&target, &opts, "cat >/dev/null").unwrap();
            for chunk in data.chunks(256 << 10) {
                s.writer.write_all(chunk).unwrap();
            }
            drop(s.writer);
            s.handle.finish().unwrap();
        }));
        for (k, level) in [(2, "0"), (3, "3")] {
            let dest = tempfile::Builder::new()
                .prefix("flip-bench-")
                .tempdir_in("/dev/shm")
                .unwrap();
            let url = format!(
                "ssh://root@127.0.0.1:{}{}/app",
                sshd.port(),
                dest.path().display()
            );
            secs[k].push(time(|| deploy(&home, &tree, &url, &sshd.user_key(), level)));
            // Every byte arrived.
            let got = std::fs::read(dest.path().join("app/current/part0.bin")).unwrap();
            assert_eq!(got, data[..size / 8], "deployed content");
        }
        eprintln!(
            "round {round}: {}",
            names
                .iter()
                .zip(&secs)
                .map(|(n, s)| format!("{n} {:.0} MiB/s", mib as f64 / s[round]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !bench {
        eprintln!(
            "ssh_throughput: smoke run ok (run `cargo bench --bench ssh_throughput` to measure)"
        );
        return;
    }
    let base = median(&secs[0]);
    let mut md = String::new();
    md.push_str("# Upload throughput over SSH (loopback)\n\n");
    md.push_str(&format!(
        "Command: `cargo bench --bench ssh_throughput -- --mib {mib} --rounds {rounds}`  \n"
    ));
    md.push_str(&format!(
        "{mib} MiB of incompressible data, {rounds} interleaved rounds, medians; deploy targets on /dev/shm. \
         2-core machine: client, sshd and agent share the cores.\n\n"
    ));
    md.push_str("| method | median s | MiB/s | vs system ssh | per-round ratios |\n|---|---:|---:|---:|---|\n");
    for (n, s) in names.iter().zip(&secs) {
        let m = median(s);
        let ratios: Vec<String> = s
            .iter()
            .zip(&secs[0])
            .map(|(x, b)| format!("{:.0}%", b / x * 100.0))
            .collect();
        md.push_str(&format!(
            "| {n} | {m:.2} | {:.0} | {:.0}% | {} |\n",
            mib as f64 / m,
            base / m * 100.0,
            ratios.join(" ")
        ));
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/ssh-throughput.md");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, &md).unwrap();
    println!("{md}");
    eprintln!("written to {}", out.display());
}

fn deploy(home: &Path, tree: &Path, url: &str, key: &Path, level: &str) {
    let out = Command::new(FLIP)
        .args(["deploy", "--no-cache", "--compress-level", level])
        .arg(tree)
        .arg(url)
        .arg("-i")
        .arg(key)
        .args(["--remote-flip", FLIP])
        .env("HOME", home)
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "flip deploy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn time(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Deterministic incompressible bytes (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
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
