//! Multi-host deploys: the wall time of a patch release (`flip deploy prod`, two phases) to 1, 4
//! and 10 targets of one environment, on the generated PHP application of benches/deploy.
//! Goal: 10 targets take at most 1.5× the time of one (one scan, shared work, parallel
//! connections).
//!
//! `cargo bench --bench multihost [-- --files N --runs N --counts 1,4,10 --ssh --rtt-ms N
//! --rate-mbps N --name NAME]` writes benches/results/multihost-NAME.md (default name: `local`,
//! `ssh`, or `ssh-rttN`; first line: the command that reproduces it). With `--ssh`, every SSH
//! connection goes through the deploy bench's relay (benches/deploy/relay.rs), which adds
//! `--rtt-ms` to the round trip and caps each direction at `--rate-mbps` (per connection, as
//! targets on their own machines behind their own links would be). Without `--bench`
//! (as `cargo test --all-targets` runs it) it is a smoke test: a small corpus, 1 and 2 local
//! targets, one run, every target checked live.

#[allow(dead_code)]
#[path = "deploy/corpus/mod.rs"]
mod corpus;
#[allow(dead_code)]
#[path = "deploy/relay.rs"]
mod relay;
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
    /// Added round trip of each SSH connection, milliseconds.
    rtt_ms: u64,
    /// Bandwidth cap per direction of each SSH connection, megabits per second.
    rate_mbps: Option<u64>,
    name: Option<String>,
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
        rtt_ms: 0,
        rate_mbps: None,
        name: None,
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
            "--rtt-ms" => c.rtt_ms = value()?.parse().map_err(|e| format!("--rtt-ms: {e}"))?,
            "--rate-mbps" => {
                c.rate_mbps = Some(value()?.parse().map_err(|e| format!("--rate-mbps: {e}"))?)
            }
            "--name" => c.name = Some(value()?.clone()),
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
    if (c.rtt_ms > 0 || c.rate_mbps.is_some()) && !c.ssh {
        return Err("--rtt-ms and --rate-mbps shape SSH connections: add --ssh".into());
    }
    if c.smoke {
        c.files = 300;
        c.runs = 1;
        c.counts = vec![1, 2];
        c.ssh = false;
    }
    Ok(c)
}

/// CPU time (user + system) of this process's waited-for children so far: flip and, for local
/// targets, its agents (flip waits for them); not the agents sshd runs.
fn children_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let t = |v: libc::timeval| Duration::new(v.tv_sec as u64, v.tv_usec as u32 * 1000);
    t(u.ru_utime) + t(u.ru_stime)
}

/// Runs flip in `dir` with `home`; panics with its stderr on failure. Returns the wall time and
/// the CPU time of flip and the processes it waited for.
fn flip(dir: &Path, home: &Path, args: &[&str]) -> (Duration, Duration) {
    let cpu = children_cpu();
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
    (took, children_cpu().saturating_sub(cpu))
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
    let link = relay::Link {
        delay: Duration::from_micros(c.rtt_ms * 500),
        rate: c.rate_mbps.map(|m| m * 1_000_000 / 8),
    };
    // Every SSH connection goes through the relay (shaped or not), so runs at 0 and 50 ms
    // differ only by the link.
    let server = c.ssh.then(|| {
        let s = sshd::Sshd::start(&w.join("sshd")).expect("starting sshd");
        let r = relay::Relay::start_shaped(s.port(), link).expect("starting the relay");
        s.write_client_home(&home, r.port()).expect("client home");
        (s, r)
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
                    Some((_, r)) => format!("ssh://root@127.0.0.1:{}{}", r.port(), root.display()),
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
        if let Some((s, _)) = &server {
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
        let (mut times, mut cpus) = (Vec::new(), Vec::new());
        for r in 0..c.runs {
            seed += 1;
            let ch = corpus.mutate(corpus::Scenario::Patch, seed);
            corpus::apply(&corpus, &ch, &src, corpus::Scenario::Patch.mtime()).unwrap();
            let (wall, cpu) = run(args(format!("patch-{r}")));
            times.push(wall);
            cpus.push(cpu);
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
        rows.push((n, m, times, median(cpus)));
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
    let shaped = match (c.ssh, c.rtt_ms, c.rate_mbps) {
        (false, ..) => String::new(),
        (true, 0, None) => " through an unshaped TCP relay".to_string(),
        (true, rtt, rate) => format!(
            " through a TCP relay adding {rtt} ms to each connection's round trip{}",
            rate.map_or(String::new(), |r| format!(
                ", each direction capped at {r} Mbit/s"
            ))
        ),
    };
    md.push_str(&format!(
        "A patch release (~50 files of {} changed) deployed with `flip deploy prod` to every \
         target of one environment ({} targets on this machine{}, under {}), median of {} \
         run(s) each; the first release of each environment is not timed. Machine: {} CPU(s).\n\n",
        c.files,
        if c.ssh { "SSH" } else { "local" },
        shaped,
        base.display(),
        c.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    md.push_str(&format!(
        "| targets | median | runs | vs 1 target | CPU (median, {}) |\n|---:|---:|---|---:|---:|\n",
        if c.ssh {
            "client only"
        } else {
            "client and agents"
        }
    ));
    for (n, m, times, cpu) in &rows {
        let all: Vec<String> = times
            .iter()
            .map(|t| format!("{:.3}", t.as_secs_f64()))
            .collect();
        md.push_str(&format!(
            "| {n} | {:.3} s | {} | {:.2}× | {:.2} s |\n",
            m.as_secs_f64(),
            all.join(", "),
            m.as_secs_f64() / one,
            cpu.as_secs_f64()
        ));
    }
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    md.push_str(&format!(
        "\nLoad average when the run ended (1, 5, 15 min): {}.\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let name = c.name.clone().unwrap_or_else(|| match (c.ssh, c.rtt_ms) {
        (false, _) => "local".into(),
        (true, 0) => "ssh".into(),
        (true, rtt) => format!("ssh-rtt{rtt}"),
    });
    let out =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("benches/results/multihost-{name}.md"));
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
