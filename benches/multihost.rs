//! Multi-host deploys: the wall time of a patch release (`flip deploy prod`, two phases) to 1, 4
//! and 10 targets of one environment, on the generated PHP application of benches/deploy.
//! Goal: 10 targets take at most 1.5× the time of one (one scan, shared work, parallel
//! connections).
//!
//! `cargo bench --bench multihost [-- --files N --runs N --counts 1,4,10 --ssh]` writes
//! benches/results/multihost.md (first line: the command that reproduces it). Without `--bench`
//! (as `cargo test --all-targets` runs it) it is a smoke test: a small corpus, 1 and 2 local
//! targets, one run, every target checked live.

#[allow(dead_code)]
#[path = "deploy/corpus/mod.rs"]
mod corpus;
#[allow(dead_code)]
#[path = "deploy/sshd.rs"]
mod sshd;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FLIP: &str = env!("CARGO_BIN_EXE_flip");

struct Config {
    files: usize,
    runs: usize,
    counts: Vec<usize>,
    ssh: bool,
    smoke: bool,
    command: String,
}

fn parse() -> Result<Config, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.iter().any(|a| a == "--bench");
    let mut c = Config {
        files: 12_000,
        runs: 3,
        counts: vec![1, 4, 10],
        ssh: false,
        smoke: !bench,
        command: String::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--bench" => {}
            "--files" => c.files = value()?.parse().map_err(|e| format!("--files: {e}"))?,
            "--runs" => c.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--counts" => {
                c.counts = value()?
                    .split(',')
                    .map(|n| n.parse().map_err(|e| format!("--counts: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--ssh" => c.ssh = true,
            other if other.starts_with("--") => return Err(format!("unknown option {other}")),
            _ => {}
        }
    }
    let shown: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--bench")
        .collect();
    c.command = if shown.is_empty() {
        "cargo bench --bench multihost".into()
    } else {
        format!("cargo bench --bench multihost -- {}", shown.join(" "))
    };
    if c.smoke {
        c.files = 300;
        c.runs = 1;
        c.counts = vec![1, 2];
        c.ssh = false;
    }
    Ok(c)
}

/// Runs flip in `dir` with `home`; panics with its stderr on failure.
fn flip(dir: &Path, home: &Path, args: &[&str]) -> Duration {
    let started = Instant::now();
    let out = Command::new(FLIP)
        .args(args)
        .current_dir(dir)
        .env("HOME", home)
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .stdin(Stdio::null())
        .output()
        .expect("running flip");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "flip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let c = match parse() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("multihost: {e}");
            std::process::exit(2);
        }
    };
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let work = tempfile::Builder::new()
        .prefix("flip-multihost-")
        .tempdir_in(&base)
        .expect("work dir");
    let w = work.path();
    let home = w.join("home");
    fs::create_dir_all(&home).unwrap();
    let server = c.ssh.then(|| {
        let s = sshd::Sshd::start(&w.join("sshd")).expect("starting sshd");
        s.write_client_home(&home, s.port()).expect("client home");
        s
    });
    let mut corpus = corpus::generate(c.files, 1);
    let src = w.join("src");
    corpus::materialize(&corpus, &src, corpus::Scenario::Initial.mtime()).unwrap();
    let mut rows = Vec::new();
    let mut seed = 100;
    for &n in &c.counts {
        let dir = w.join(format!("env-{n}"));
        fs::create_dir_all(&dir).unwrap();
        let targets: Vec<String> = (0..n)
            .map(|i| {
                let root = dir.join(format!("t{i}"));
                match &server {
                    Some(s) => format!("ssh://root@127.0.0.1:{}{}", s.port(), root.display()),
                    None => root.display().to_string(),
                }
            })
            .collect();
        let list: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
        fs::write(
            dir.join("flip.toml"),
            format!(
                "source = {:?}\n[env.prod]\ntargets = [{}]\n",
                src.display().to_string(),
                list.join(", ")
            ),
        )
        .unwrap();
        let mut extra: Vec<String> = Vec::new();
        if let Some(s) = &server {
            extra = vec![
                "-i".into(),
                s.user_key().display().to_string(),
                "--remote-flip".into(),
                FLIP.into(),
            ];
        }
        let args = |label: String| -> Vec<String> {
            let mut a = vec!["deploy".into(), "prod".into(), "--label".into(), label];
            a.extend(extra.iter().cloned());
            a
        };
        let run = |a: Vec<String>| {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            flip(&dir, &home, &a)
        };
        // The first release everywhere (not timed), then timed patch releases.
        run(args("initial".into()));
        let mut times = Vec::new();
        for r in 0..c.runs {
            seed += 1;
            let ch = corpus.mutate(corpus::Scenario::Patch, seed);
            corpus::apply(&corpus, &ch, &src, corpus::Scenario::Patch.mtime()).unwrap();
            times.push(run(args(format!("patch-{r}"))));
        }
        for i in 0..n {
            let link = fs::read_link(dir.join(format!("t{i}/current"))).expect("current");
            assert_eq!(
                link,
                PathBuf::from(format!("releases/{}", c.runs + 1)),
                "target {i} is live on the last release"
            );
        }
        let m = median(times.clone());
        eprintln!(
            "multihost: {n} target(s): median {:.3} s over {} run(s)",
            m.as_secs_f64(),
            times.len()
        );
        rows.push((n, m, times));
    }
    if c.smoke {
        return;
    }
    let one = rows[0].1.as_secs_f64();
    let mut md = format!(
        "# Multi-host patch release\n\n`{}` (flip {}, commit {})\n\n",
        c.command,
        env!("CARGO_PKG_VERSION"),
        git_commit()
    );
    md.push_str(&format!(
        "A patch release (~50 files of {} changed) deployed with `flip deploy prod` to every \
         target of one environment ({} targets on this machine, under {}), median of {} run(s) \
         each; the first release of each environment is not timed. Machine: {} CPU(s).\n\n",
        c.files,
        if c.ssh { "SSH" } else { "local" },
        base.display(),
        c.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    md.push_str("| targets | median | runs | vs 1 target |\n|---:|---:|---|---:|\n");
    for (n, m, times) in &rows {
        let all: Vec<String> = times
            .iter()
            .map(|t| format!("{:.3}", t.as_secs_f64()))
            .collect();
        md.push_str(&format!(
            "| {n} | {:.3} s | {} | {:.2}× |\n",
            m.as_secs_f64(),
            all.join(", "),
            m.as_secs_f64() / one
        ));
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "benches/results/multihost-{}.md",
        if c.ssh { "ssh" } else { "local" }
    ));
    fs::write(&out, md).expect("writing the results");
    eprintln!("multihost: wrote {}", out.display());
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
