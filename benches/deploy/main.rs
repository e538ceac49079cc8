//! flip vs rsync: deploy benchmark. See benches/README.md.
//!
//! `cargo bench --bench deploy [-- OPTIONS]` runs the full benchmark and writes
//! benches/results/deploy-<files>.{md,json,png}. Run without `--bench` (as
//! `cargo test --all-targets` does) it runs a smoke test instead: a tiny corpus, one run, local
//! targets, every result tree checked against its source.

mod chart;
mod corpus;
mod measure;
mod relay;
mod report;
mod sshd;

use corpus::{Corpus, Scenario};
use measure::{Measured, ServerSide};
use relay::{Relay, Snapshot};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Mode {
    Local,
    Ssh,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Fs {
    Shm,
    Disk,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Tool {
    Flip,
    Rsync,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Local => "local",
            Mode::Ssh => "ssh",
        }
    }
}

impl Fs {
    pub fn name(self) -> &'static str {
        match self {
            Fs::Shm => "tmpfs",
            Fs::Disk => "disk",
        }
    }
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::Flip => "flip",
            Tool::Rsync => "rsync",
        }
    }
}

pub struct Config {
    pub files: usize,
    pub runs: usize,
    pub seed: u64,
    pub scenarios: Vec<Scenario>,
    pub modes: Vec<Mode>,
    pub fss: Vec<Fs>,
    pub out: PathBuf,
    pub shm: PathBuf,
    pub disk: PathBuf,
    pub bound_level: Option<i32>,
    pub verify: bool,
    pub verify_all: bool,
    pub flip: PathBuf,
    pub name: String,
    pub command: String,
    pub smoke: bool,
    /// How the relay in front of sshd shapes the SSH link (delay, rate cap).
    pub link: relay::Link,
    /// `--trees DIR`: only write each step's source tree to `DIR/<scenario>` (for profiling
    /// one deploy by hand), then exit.
    pub trees: Option<PathBuf>,
    /// `--src-dir DIR`: where each step's source tree is made (default: the work directory,
    /// under `shm`): a source on disk makes every read of it go through that filesystem.
    pub src_dir: Option<PathBuf>,
}

/// One measured deploy.
#[derive(Clone, Debug)]
pub struct Sample {
    pub mode: Mode,
    pub fs: Fs,
    pub scenario: Scenario,
    pub tool: Tool,
    pub run: usize,
    pub wall: f64,
    pub client_kb: u64,
    pub server_kb: u64,
    pub wire: Option<Snapshot>,
    pub flip_json: Option<serde_json::Value>,
    /// flip's no-op only: the wall time (s) of `flip releases` on the same target right after,
    /// the floor of one session (issue #12: a no-op costs at most 1.2× that).
    pub floor: Option<f64>,
}

/// Per scenario: what changed in the tree, and the zstd --patch-from lower bound.
#[derive(Clone, Debug, Default)]
pub struct StepInfo {
    pub changed: usize,
    pub added: usize,
    pub removed: usize,
    pub renamed: usize,
    pub bytes_written: u64,
    pub bound: Option<u64>,
}

const USAGE: &str =
    "usage: cargo bench --bench deploy -- [--files N] [--runs N] [--scenarios all|LIST] \
[--local] [--ssh] [--fs tmpfs,disk] [--seed N] [--out DIR] [--shm-dir DIR] [--disk-dir DIR] \
[--bound-level N | --no-bound] [--no-verify | --verify-all] [--name STEM] [--flip PATH] [--smoke] \
[--rtt-ms N] [--rate-mbps N] [--trees DIR] [--src-dir DIR]";

fn parse_args() -> Result<Config, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.iter().any(|a| a == "--bench");
    let mut cfg = Config {
        files: 12_000,
        runs: 5,
        seed: 1,
        scenarios: Scenario::ALL.to_vec(),
        modes: vec![],
        fss: vec![Fs::Shm, Fs::Disk],
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results"),
        shm: PathBuf::from("/dev/shm"),
        disk: PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        bound_level: Some(19),
        verify: true,
        verify_all: false,
        flip: PathBuf::from(env!("CARGO_BIN_EXE_flip")),
        name: String::new(),
        command: String::new(),
        smoke: !bench,
        link: relay::Link::default(),
        trees: None,
        src_dir: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<String, String> {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        let num = |s: String| -> Result<usize, String> {
            s.parse().map_err(|_| format!("not a number: {s}"))
        };
        match a.as_str() {
            "--bench" => continue,
            "--smoke" => cfg.smoke = true,
            "--files" => cfg.files = num(value(a)?)?,
            "--runs" => cfg.runs = num(value(a)?)?.max(1),
            "--seed" => cfg.seed = num(value(a)?)? as u64,
            "--scenarios" => {
                let v = value(a)?;
                cfg.scenarios = if v == "all" {
                    Scenario::ALL.to_vec()
                } else {
                    let mut s = v
                        .split(',')
                        .map(|x| Scenario::parse(x.trim()).ok_or(format!("unknown scenario {x}")))
                        .collect::<Result<Vec<_>, _>>()?;
                    s.sort();
                    s.dedup();
                    s
                };
            }
            "--local" => cfg.modes.push(Mode::Local),
            "--ssh" => cfg.modes.push(Mode::Ssh),
            "--fs" => {
                cfg.fss = value(a)?
                    .split(',')
                    .map(|x| match x.trim() {
                        "tmpfs" | "shm" => Ok(Fs::Shm),
                        "disk" => Ok(Fs::Disk),
                        o => Err(format!("unknown --fs {o} (tmpfs, disk)")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
            }
            "--out" => cfg.out = value(a)?.into(),
            "--shm-dir" => cfg.shm = value(a)?.into(),
            "--disk-dir" => cfg.disk = value(a)?.into(),
            "--src-dir" => cfg.src_dir = Some(value(a)?.into()),
            "--bound-level" => cfg.bound_level = Some(num(value(a)?)? as i32),
            "--no-bound" => cfg.bound_level = None,
            "--rtt-ms" => {
                cfg.link.delay = Duration::from_micros(num(value(a)?)? as u64 * 500);
            }
            "--rate-mbps" => cfg.link.rate = Some(num(value(a)?)? as u64 * 1_000_000),
            "--no-verify" => cfg.verify = false,
            "--verify-all" => cfg.verify_all = true,
            "--name" => cfg.name = value(a)?,
            "--flip" => cfg.flip = value(a)?.into(),
            "--trees" => cfg.trees = Some(value(a)?.into()),
            "-h" | "--help" => return Err(USAGE.to_string()),
            o => return Err(format!("unknown argument {o}\n{USAGE}")),
        }
    }
    if cfg.modes.is_empty() {
        cfg.modes = vec![Mode::Local, Mode::Ssh];
    }
    cfg.modes.sort();
    cfg.modes.dedup();
    cfg.fss.sort();
    cfg.fss.dedup();
    if cfg.name.is_empty() {
        cfg.name = format!("deploy-{}", cfg.files);
    }
    let shown: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--bench")
        .collect();
    cfg.command = if shown.is_empty() {
        "cargo bench --bench deploy".to_string()
    } else {
        format!("cargo bench --bench deploy -- {}", shown.join(" "))
    };
    Ok(cfg)
}

fn main() {
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let result = if let Some(dir) = &cfg.trees {
        write_trees(&cfg, dir)
    } else if cfg.smoke {
        smoke(cfg)
    } else {
        bench(cfg)
    };
    if let Err(e) = result {
        eprintln!("deploy bench: {e}");
        std::process::exit(1);
    }
}

/// `--trees DIR`: the source tree of every step of the chain (up to the last scenario asked
/// for), each whole in `DIR/<scenario>`, made as the benchmark makes it: the step before copied
/// with its mtimes (`cp -a`) and changed, so that only what the step changed has its mtime.
fn write_trees(cfg: &Config, dir: &Path) -> io::Result<()> {
    let mut c = corpus::generate(cfg.files, cfg.seed);
    let last = cfg
        .scenarios
        .iter()
        .max()
        .copied()
        .unwrap_or(Scenario::Initial);
    let mut before: Option<PathBuf> = None;
    for scenario in Scenario::ALL.into_iter().filter(|s| *s <= last) {
        let ch = c.mutate(scenario, cfg.seed);
        let to = dir.join(scenario.name());
        let _ = fs::remove_dir_all(&to);
        match &before {
            Some(prev) if !matches!(scenario, Scenario::Initial | Scenario::FreshCi) => {
                let ok = std::process::Command::new("cp")
                    .arg("-a")
                    .arg(prev)
                    .arg(&to)
                    .status()?
                    .success();
                if !ok {
                    return Err(io::Error::other(format!("cp -a {} failed", prev.display())));
                }
                corpus::apply(&c, &ch, &to, scenario.mtime())?;
            }
            _ => corpus::materialize(&c, &to, scenario.mtime())?,
        }
        eprintln!("deploy bench: wrote {}", to.display());
        before = Some(to);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Smoke test (no --bench): small, fast, and strict.

fn smoke(mut cfg: Config) -> io::Result<()> {
    let started = Instant::now();
    let a = corpus::generate(300, 3);
    let b = corpus::generate(300, 3);
    assert!(
        a.entries == b.entries,
        "the corpus generator is not deterministic"
    );
    let tmp = tempfile::Builder::new()
        .prefix("flip-bench-smoke-")
        .tempdir()?;
    cfg.files = 300;
    cfg.runs = 1;
    cfg.seed = 3;
    cfg.modes = vec![Mode::Local];
    cfg.fss = vec![Fs::Shm];
    cfg.shm = tmp.path().to_path_buf();
    cfg.bound_level = None;
    cfg.verify = true;
    cfg.out = tmp.path().join("results");
    fs::create_dir_all(&cfg.out)?;
    let rsync = which("rsync");
    let tools: Vec<Tool> = if rsync {
        vec![Tool::Flip, Tool::Rsync]
    } else {
        eprintln!("deploy bench smoke: rsync not installed, checking flip only");
        vec![Tool::Flip]
    };
    let mut b = Bench::new(&cfg, tmp.path().join("work"), &tools)?;
    let samples = b.run_chain(Mode::Local, Fs::Shm, 0, &a)?;
    assert_eq!(samples.len(), Scenario::ALL.len() * tools.len());
    let noop = samples
        .iter()
        .find(|s| s.tool == Tool::Flip && s.scenario == Scenario::Noop)
        .and_then(|s| s.flip_json.clone())
        .expect("flip's JSON for the no-op deploy");
    assert_eq!(
        noop["files"]["literal"], 0,
        "a no-op deploy sent files: {noop}"
    );
    // The report and chart code paths, into the temp dir.
    report::write(&cfg, &samples, &b.infos, &b.notes, &b.corpus_stats(&a))?;
    assert!(cfg.out.join(format!("{}.png", cfg.name)).exists());
    println!(
        "deploy bench smoke: {} deploys of a {}-file corpus verified ({}) in {:.1}s",
        samples.len(),
        a.file_count(),
        tools
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Whether `cmd` is an executable file somewhere on PATH.
fn which(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|d| {
            fs::metadata(d.join(cmd))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

// ---------------------------------------------------------------------------------------------
// The benchmark

fn bench(mut cfg: Config) -> io::Result<()> {
    let started = Instant::now();
    for tool in ["rsync", "tar", "zstd", "ssh", "ssh-keygen"] {
        let needed = tool != "zstd" || cfg.bound_level.is_some();
        if needed && !which(tool) {
            return Err(io::Error::other(format!("{tool} is not installed")));
        }
    }
    eprintln!(
        "deploy bench: generating the corpus ({} files, seed {})",
        cfg.files, cfg.seed
    );
    let base = corpus::generate(cfg.files, cfg.seed);
    eprintln!(
        "deploy bench: {} files, {:.1} MB",
        base.file_count(),
        base.total_bytes() as f64 / 1e6
    );
    let work = cfg.shm.join(format!("flip-bench-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    // A private copy of flip, so that a rebuild during the benchmark cannot change it midway.
    let flip = work.join("bin/flip");
    fs::create_dir_all(flip.parent().unwrap())?;
    fs::copy(&cfg.flip, &flip)?;
    cfg.flip = flip;
    let mut b = Bench::new(&cfg, work, &[Tool::Flip, Tool::Rsync])?;
    b.compute_infos(&base)?;
    let mut samples = Vec::new();
    for &mode in &cfg.modes {
        if mode == Mode::Ssh {
            b.start_ssh()?;
        }
        for &fs_kind in &cfg.fss {
            for run in 0..cfg.runs {
                eprintln!(
                    "deploy bench: {} target on {}, run {}/{} ({:.0}s so far)",
                    mode.name(),
                    fs_kind.name(),
                    run + 1,
                    cfg.runs,
                    started.elapsed().as_secs_f64()
                );
                samples.extend(b.run_chain(mode, fs_kind, run, &base)?);
            }
        }
    }
    let stats = b.corpus_stats(&base);
    if let Some(n) = b.interference_note() {
        b.notes.push(n);
    }
    if let Some(dir) = &cfg.src_dir {
        b.notes.push(format!(
            "The chain's source tree was made under {} (`--src-dir`), not on tmpfs.",
            dir.display()
        ));
    }
    b.notes.push(format!(
        "Total benchmark time: {:.0} s.",
        started.elapsed().as_secs_f64()
    ));
    fs::create_dir_all(&cfg.out)?;
    let md = report::write(&cfg, &samples, &b.infos, &b.notes, &stats)?;
    println!("{md}");
    eprintln!(
        "deploy bench: wrote {}/{}.{{md,json,png}} in {:.0}s",
        cfg.out.display(),
        cfg.name,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

struct SshEnv {
    sshd: sshd::Sshd,
    relay: Relay,
    home: PathBuf,
    config: PathBuf,
}

pub struct CorpusStats {
    pub files: usize,
    pub bytes: u64,
}

struct Bench<'a> {
    cfg: &'a Config,
    work: PathBuf,
    tools: Vec<Tool>,
    ssh: Option<SshEnv>,
    /// Why flip is skipped over SSH, if it is.
    flip_ssh_skip: Option<String>,
    infos: BTreeMap<Scenario, StepInfo>,
    notes: Vec<String>,
    /// Per run: (wall seconds, CPU seconds used by other processes meanwhile).
    interference: Vec<(f64, f64)>,
}

impl Drop for Bench<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.work);
        let _ = fs::remove_dir_all(self.src());
        for fs_kind in [Fs::Shm, Fs::Disk] {
            let _ = fs::remove_dir_all(self.target_base(fs_kind));
        }
    }
}

impl<'a> Bench<'a> {
    fn new(cfg: &'a Config, work: PathBuf, tools: &[Tool]) -> io::Result<Bench<'a>> {
        fs::create_dir_all(&work)?;
        Ok(Bench {
            cfg,
            work,
            tools: tools.to_vec(),
            ssh: None,
            flip_ssh_skip: None,
            infos: BTreeMap::new(),
            notes: Vec::new(),
            interference: Vec::new(),
        })
    }

    /// Where each step's source tree is made ([`Config::src_dir`]).
    fn src(&self) -> PathBuf {
        match &self.cfg.src_dir {
            Some(dir) => dir.join(format!("flip-bench-src-{}", std::process::id())),
            None => self.work.join("src"),
        }
    }

    fn target_base(&self, fs_kind: Fs) -> PathBuf {
        match fs_kind {
            Fs::Shm => self.work.join("targets"),
            Fs::Disk => self
                .cfg
                .disk
                .join(format!("flip-bench-targets-{}", std::process::id())),
        }
    }

    fn corpus_stats(&self, base: &Corpus) -> CorpusStats {
        CorpusStats {
            files: base.file_count(),
            bytes: base.total_bytes(),
        }
    }

    /// The scenarios run in order from the first deploy up to the last one asked for; only the
    /// asked-for ones are reported.
    fn chain(&self) -> Vec<Scenario> {
        let last = self
            .cfg
            .scenarios
            .iter()
            .max()
            .copied()
            .unwrap_or(Scenario::Initial);
        Scenario::ALL.into_iter().filter(|s| *s <= last).collect()
    }

    /// Change counts per step, and the zstd --patch-from lower bounds (cached on disk, since
    /// zstd -19 over two 90 MB tars takes more than a minute each).
    fn compute_infos(&mut self, base: &Corpus) -> io::Result<()> {
        let mut c = base.clone();
        let src = self.work.join("bound-src");
        let tars = self.work.join("tars");
        fs::create_dir_all(&tars)?;
        let level = self.cfg.bound_level;
        let cache_path = self.cfg.disk.join("flip-bench-cache").join(format!(
            "bounds-g{}-f{}-s{}-l{}.json",
            corpus::GENERATOR_VERSION,
            self.cfg.files,
            self.cfg.seed,
            level.unwrap_or(0)
        ));
        let cached: BTreeMap<String, u64> = fs::read(&cache_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let chain = self.chain();
        // A partial cache is recomputed whole: each bound needs the previous step's tree.
        let need = level.is_some() && chain.iter().any(|s| !cached.contains_key(s.name()));
        // First every step's tar, then the zstd runs, two at a time (nothing is measured yet,
        // and zstd -19 is single-threaded here).
        let mut jobs: Vec<(Scenario, Option<PathBuf>, PathBuf)> = Vec::new();
        let mut prev_tar: Option<PathBuf> = None;
        for s in chain {
            let ch = c.mutate(s, self.cfg.seed);
            let written: u64 = ch
                .writes()
                .filter_map(|p| match c.entries.get(p) {
                    Some(corpus::Node::File { data, .. }) => Some(data.len() as u64),
                    _ => None,
                })
                .sum();
            let info = StepInfo {
                changed: ch.changed.len(),
                added: ch.added.len(),
                removed: ch.removed.len() - ch.renamed.len(),
                renamed: ch.renamed.len(),
                bytes_written: if s == Scenario::FreshCi || s == Scenario::Initial {
                    c.total_bytes()
                } else {
                    written
                },
                bound: cached.get(s.name()).copied().filter(|_| !need),
            };
            self.infos.insert(s, info);
            // fresh-ci has the no-op's content, so the same tar (mtimes are normalised).
            if need && s != Scenario::FreshCi {
                if s == Scenario::Initial {
                    corpus::materialize(&c, &src, s.mtime())?;
                } else {
                    corpus::apply(&c, &ch, &src, s.mtime())?;
                }
                let tar = tars.join(format!("{}.tar", s.name()));
                make_tar(&src, &tar)?;
                jobs.push((s, prev_tar.replace(tar.clone()), tar));
            }
        }
        let _ = fs::remove_dir_all(&src);
        if let (Some(level), true) = (level, need) {
            eprintln!(
                "deploy bench: computing the zstd -{level} lower bounds for {} steps (cached afterwards)",
                jobs.len()
            );
            let t = Instant::now();
            let next = std::sync::Mutex::new(jobs.into_iter());
            let results = std::sync::Mutex::new(BTreeMap::new());
            std::thread::scope(|scope| -> io::Result<()> {
                let workers: Vec<_> = (0..2)
                    .map(|_| {
                        scope.spawn(|| -> io::Result<()> {
                            loop {
                                let job = next.lock().unwrap().next();
                                let Some((s, old, new)) = job else {
                                    return Ok(());
                                };
                                let b = zstd_bound(level, old.as_deref(), &new)?;
                                eprintln!(
                                    "deploy bench:   {}: {b} bytes ({:.0}s)",
                                    s.name(),
                                    t.elapsed().as_secs_f64()
                                );
                                results.lock().unwrap().insert(s, b);
                            }
                        })
                    })
                    .collect();
                for w in workers {
                    w.join().expect("zstd worker")?;
                }
                Ok(())
            })?;
            let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
            let mut fresh = BTreeMap::new();
            for (s, info) in self.infos.iter_mut() {
                let b = if *s == Scenario::FreshCi {
                    results.get(&Scenario::Noop).copied()
                } else {
                    results.get(s).copied()
                };
                info.bound = b;
                if let Some(b) = b {
                    fresh.insert(s.name().to_string(), b);
                }
            }
            fs::create_dir_all(cache_path.parent().unwrap())?;
            fs::write(&cache_path, serde_json::to_vec_pretty(&fresh)?)?;
        }
        let _ = fs::remove_dir_all(&tars);
        Ok(())
    }

    fn start_ssh(&mut self) -> io::Result<()> {
        if self.ssh.is_some() {
            return Ok(());
        }
        let sshd = sshd::Sshd::start(&self.work.join("sshd"))?;
        let relay = Relay::start_shaped(sshd.port(), self.cfg.link)?;
        if self.cfg.link.is_shaped() {
            self.notes.push(format!(
                "SSH link shaped by the relay: {} ms added to the round trip ({} ms each way){}.",
                self.cfg.link.delay.as_millis() * 2,
                self.cfg.link.delay.as_millis(),
                match self.cfg.link.rate {
                    Some(r) => format!(", {} MB/s per direction", r / 1_000_000),
                    None => String::new(),
                }
            ));
        }
        let home = self.work.join("ssh-home");
        let config = sshd.write_client_home(&home, relay.port())?;
        // Does ssh itself get through the relay?
        let probe = Command::new("ssh")
            .arg("-F")
            .arg(&config)
            .args(["bench", "true"])
            .env("HOME", &home)
            .env("SSH_AUTH_SOCK", "")
            .stdin(Stdio::null())
            .output()?;
        if !probe.status.success() {
            return Err(io::Error::other(format!(
                "ssh through the relay failed: {}\nsshd log:\n{}",
                String::from_utf8_lossy(&probe.stderr),
                sshd.log()
            )));
        }
        self.ssh = Some(SshEnv {
            sshd,
            relay,
            home,
            config,
        });
        self.flip_ssh_skip = self.probe_flip_ssh().err();
        if let Some(why) = &self.flip_ssh_skip {
            let note = format!("flip was skipped over SSH: {why}");
            eprintln!("deploy bench: {note}");
            self.notes.push(note);
        }
        Ok(())
    }

    /// Whether this flip can deploy over SSH (its SSH support is recent).
    fn probe_flip_ssh(&self) -> Result<(), String> {
        let help = Command::new(&self.cfg.flip)
            .args(["deploy", "--help"])
            .output()
            .map_err(|e| e.to_string())?;
        if !String::from_utf8_lossy(&help.stdout).contains("--identity") {
            return Err(
                "`flip deploy --help` has no --identity option (no SSH support yet)".into(),
            );
        }
        let src = self.work.join("probe-src");
        fs::create_dir_all(&src).map_err(|e| e.to_string())?;
        fs::write(src.join("index.php"), "<?php echo 1;\n").map_err(|e| e.to_string())?;
        let target = self.work.join("probe-target");
        let m = self
            .flip_ssh_command(&src, &target)
            .output()
            .map_err(|e| e.to_string())?;
        let _ = fs::remove_dir_all(&target);
        if m.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`flip deploy SRC ssh://root@127.0.0.1:PORT/...` failed: {}",
                String::from_utf8_lossy(&m.stderr)
                    .lines()
                    .chain(String::from_utf8_lossy(&m.stdout).lines())
                    .next()
                    .unwrap_or("")
                    .trim()
            ))
        }
    }

    fn flip_local_command(&self, src: &Path, target: &Path) -> Command {
        let mut cmd = Command::new(&self.cfg.flip);
        cmd.arg("deploy")
            .arg(src)
            .arg(target)
            .args(["--json", "--keep", "10"])
            .env("XDG_CACHE_HOME", self.work.join("xdg-cache"));
        cmd
    }

    fn flip_ssh_command(&self, src: &Path, target: &Path) -> Command {
        let ssh = self.ssh.as_ref().expect("ssh started");
        let mut cmd = Command::new(&self.cfg.flip);
        cmd.arg("deploy")
            .arg(src)
            .arg(format!(
                "ssh://root@127.0.0.1:{}{}",
                ssh.relay.port(),
                target.display()
            ))
            .args(["--json", "--keep", "10", "--identity"])
            .arg(ssh.sshd.user_key())
            .env("HOME", &ssh.home)
            .env("SSH_AUTH_SOCK", "")
            .env("XDG_CACHE_HOME", self.work.join("xdg-cache"));
        cmd
    }

    /// The wall time (s) of `flip releases TARGET --json` through the same transport as the
    /// deploys: one session that only lists, the floor a no-op deploy is held against.
    fn releases_floor(&self, mode: Mode, target: &Path) -> io::Result<f64> {
        let cmd = match mode {
            Mode::Local => self.flip_local_command(Path::new("."), target),
            Mode::Ssh => self.flip_ssh_command(Path::new("."), target),
        };
        // The deploy command line with its source dropped and `deploy` → `releases`; the
        // options a listing does not take (`--keep`) dropped too.
        let args: Vec<std::ffi::OsString> = cmd.get_args().map(|a| a.to_owned()).collect();
        let mut args = args.into_iter();
        let mut kept = vec!["releases".into()];
        args.next(); // deploy
        args.next(); // the source
        while let Some(a) = args.next() {
            if a == "--keep" {
                args.next();
                continue;
            }
            kept.push(a);
        }
        let mut list = Command::new(cmd.get_program());
        list.args(kept);
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                list.env(k, v);
            }
        }
        let m = measure::run(&mut list, ServerSide::Children)?;
        m.check("flip releases")?;
        Ok(m.wall.as_secs_f64())
    }

    /// Deploys with flip; returns the measurement and flip's JSON.
    fn deploy_flip(
        &self,
        mode: Mode,
        src: &Path,
        target: &Path,
    ) -> io::Result<(Measured, Option<Snapshot>, Option<serde_json::Value>)> {
        let (m, wire) = match mode {
            Mode::Local => {
                let m = measure::run(
                    &mut self.flip_local_command(src, target),
                    ServerSide::Children,
                )?;
                (m, None)
            }
            Mode::Ssh => {
                let ssh = self.ssh.as_ref().expect("ssh started");
                let before = ssh.relay.snapshot();
                let m = measure::run(
                    &mut self.flip_ssh_command(src, target),
                    ServerSide::Sshd(ssh.sshd.pid()),
                )?;
                ssh.relay.settle(Duration::from_secs(5));
                (m, Some(ssh.relay.snapshot().since(before)))
            }
        };
        m.check("flip deploy")?;
        let json = serde_json::from_str(m.stdout.trim()).ok();
        Ok((m, wire, json))
    }

    /// Deploys with rsync into releases/<release> (hard-linking from releases/<release - 1>),
    /// then swaps `current` the classic way.
    fn deploy_rsync(
        &self,
        mode: Mode,
        src: &Path,
        target: &Path,
        release: usize,
    ) -> io::Result<(Measured, Option<Snapshot>)> {
        let mut cmd = Command::new("rsync");
        cmd.arg("-a").arg("--delete");
        if mode == Mode::Ssh {
            cmd.arg("-z");
        }
        if release > 1 {
            cmd.arg(format!("--link-dest=../{}", release - 1));
        }
        let mut from = src.as_os_str().to_owned();
        from.push("/");
        cmd.arg(from);
        let dest = format!("{}/releases/{release}/", target.display());
        match mode {
            Mode::Local => {
                cmd.arg(&dest);
                let m = measure::run(&mut cmd, ServerSide::Children)?;
                m.check("rsync")?;
                let t = Instant::now();
                let tmp = target.join("current.tmp");
                let _ = fs::remove_file(&tmp);
                symlink(format!("releases/{release}"), &tmp)?;
                fs::rename(&tmp, target.join("current"))?;
                let mut m = m;
                m.wall += t.elapsed();
                Ok((m, None))
            }
            Mode::Ssh => {
                let ssh = self.ssh.as_ref().expect("ssh started");
                let e = format!("ssh -F {}", ssh.config.display());
                cmd.arg("-e").arg(&e).arg(format!("bench:{dest}"));
                cmd.env("HOME", &ssh.home).env("SSH_AUTH_SOCK", "");
                let before = ssh.relay.snapshot();
                let side = ServerSide::Sshd(ssh.sshd.pid());
                let m = measure::run(&mut cmd, side)?;
                m.check("rsync")?;
                let mut swap = Command::new("ssh");
                swap.arg("-F")
                    .arg(&ssh.config)
                    .arg("bench")
                    .arg(format!(
                        "cd {} && ln -sfn releases/{release} current.tmp && mv -T current.tmp current",
                        target.display()
                    ))
                    .env("HOME", &ssh.home)
                    .env("SSH_AUTH_SOCK", "");
                let m2 = measure::run(&mut swap, side)?;
                m2.check("ssh (swap current)")?;
                ssh.relay.settle(Duration::from_secs(5));
                Ok((m.then(m2), Some(ssh.relay.snapshot().since(before))))
            }
        }
    }

    /// One run: a fresh source and fresh targets, then every step of the chain, each deployed by
    /// every tool (the order alternating between runs), with the result checked.
    fn run_chain(
        &mut self,
        mode: Mode,
        fs_kind: Fs,
        run: usize,
        base: &Corpus,
    ) -> io::Result<Vec<Sample>> {
        let src = self.src();
        let _ = fs::remove_dir_all(&src);
        let _ = fs::remove_dir_all(self.work.join("xdg-cache"));
        let tbase = self.target_base(fs_kind);
        let _ = fs::remove_dir_all(&tbase);
        let flip_t = tbase.join("flip");
        let rsync_t = tbase.join("rsync");
        fs::create_dir_all(rsync_t.join("releases"))?;
        let mut c = base.clone();
        let mut samples = Vec::new();
        let extra: Vec<u32> = self.ssh.iter().map(|s| s.sshd.pid()).collect();
        let (cpu0, t0) = (measure::CpuSnapshot::take(&extra), Instant::now());
        let flip_skipped = mode == Mode::Ssh && self.flip_ssh_skip.is_some();
        for (step, scenario) in self.chain().into_iter().enumerate() {
            let ch = c.mutate(scenario, self.cfg.seed);
            match scenario {
                Scenario::Initial => corpus::materialize(&c, &src, scenario.mtime())?,
                Scenario::FreshCi | Scenario::CiPatch => {
                    fs::remove_dir_all(&src)?;
                    corpus::materialize(&c, &src, scenario.mtime())?;
                }
                _ => corpus::apply(&c, &ch, &src, scenario.mtime())?,
            }
            self.infos.entry(scenario).or_insert_with(|| StepInfo {
                changed: ch.changed.len(),
                added: ch.added.len(),
                removed: ch.removed.len() - ch.renamed.len(),
                renamed: ch.renamed.len(),
                ..Default::default()
            });
            let mut order = self.tools.clone();
            if run % 2 == 1 {
                order.reverse();
            }
            for tool in order {
                if tool == Tool::Flip && flip_skipped {
                    continue;
                }
                // Flush what earlier deploys left dirty, so nobody pays for another's writes.
                // SAFETY: sync(2) has no arguments and cannot fail.
                unsafe { libc::sync() };
                let (m, wire, json, live) = match tool {
                    Tool::Flip => {
                        if scenario == Scenario::CiPatch {
                            // A runner without caches: no manifests, no old content.
                            let _ = fs::remove_dir_all(self.work.join("xdg-cache"));
                        }
                        let (m, w, j) = self.deploy_flip(mode, &src, &flip_t)?;
                        (m, w, j, flip_t.join("current"))
                    }
                    Tool::Rsync => {
                        let (m, w) = self.deploy_rsync(mode, &src, &rsync_t, step + 1)?;
                        (m, w, None, rsync_t.join("current"))
                    }
                };
                if self.cfg.verify && (run == 0 || self.cfg.verify_all) {
                    compare_trees(&src, &live).map_err(|e| {
                        io::Error::other(format!(
                            "{} {} {}: the live release differs from the source: {e}",
                            tool.name(),
                            mode.name(),
                            scenario.name()
                        ))
                    })?;
                }
                let floor = match (tool, scenario) {
                    (Tool::Flip, Scenario::Noop) if mode == Mode::Ssh => {
                        Some(self.releases_floor(mode, &flip_t)?)
                    }
                    _ => None,
                };
                let s = Sample {
                    mode,
                    fs: fs_kind,
                    scenario,
                    tool,
                    run,
                    wall: m.wall.as_secs_f64(),
                    client_kb: m.client_kb,
                    server_kb: m.server_kb,
                    wire,
                    flip_json: json,
                    floor,
                };
                eprintln!(
                    "  {:<8} {:<5} {:>7.3}s{} rss {:.0}/{:.0} MB{}",
                    scenario.name(),
                    tool.name(),
                    s.wall,
                    wire.map_or(String::new(), |w| format!(
                        "  wire {:>9}",
                        chart::human_bytes(w.total() as f64)
                    )),
                    s.client_kb as f64 / 1024.0,
                    s.server_kb as f64 / 1024.0,
                    floor.map_or(String::new(), |f| format!("  (flip releases {f:.3}s)"))
                );
                if self.cfg.scenarios.contains(&scenario) {
                    samples.push(s);
                }
            }
        }
        let others = measure::CpuSnapshot::take(&extra).others_since(cpu0);
        let wall = t0.elapsed().as_secs_f64();
        self.interference.push((wall, others));
        eprintln!("  (other processes used {others:.1} CPU-s during this {wall:.0} s run)");
        let _ = fs::remove_dir_all(&tbase);
        Ok(samples)
    }

    /// A note on how much CPU other processes took while we measured (a busy machine makes
    /// every number slower and noisier).
    fn interference_note(&self) -> Option<String> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall: f64 = self.interference.iter().map(|x| x.0).sum();
        let others: f64 = self.interference.iter().map(|x| x.1).sum();
        let worst = self
            .interference
            .iter()
            .map(|(w, o)| o / (w * cores))
            .fold(0.0, f64::max);
        (wall > 0.0).then(|| {
            format!(
                "CPU used outside the benchmark's own processes (other processes, kernel threads, \
                 hypervisor steal) while runs were measured: {others:.0} CPU-s, {:.1} % of the \
                 machine on average, {:.1} % in the worst run.{}",
                100.0 * others / (wall * cores),
                100.0 * worst,
                if 100.0 * worst > 25.0 {
                    " The machine was not idle: expect slower, noisier numbers than on a quiet one."
                } else {
                    ""
                }
            )
        })
    }
}

fn make_tar(dir: &Path, out: &Path) -> io::Result<()> {
    let st = Command::new("tar")
        .args([
            "--sort=name",
            &format!("--mtime=@{}", corpus::BASE_MTIME),
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--format=gnu",
            "-cf",
        ])
        .arg(out)
        .arg("-C")
        .arg(dir)
        .arg(".")
        .status()?;
    if !st.success() {
        return Err(io::Error::other(format!("tar failed: {st}")));
    }
    Ok(())
}

/// `zstd -LEVEL --long=W [--patch-from=old] new -c | wc -c`.
fn zstd_bound(level: i32, old: Option<&Path>, new: &Path) -> io::Result<u64> {
    let size = fs::metadata(new)?
        .len()
        .max(old.map_or(0, |o| fs::metadata(o).map_or(0, |m| m.len())));
    let window = (64 - size.leading_zeros()).clamp(27, 31);
    let mut cmd = Command::new("zstd");
    cmd.arg(format!("-{level}"));
    if level > 19 {
        cmd.arg("--ultra");
    }
    cmd.arg(format!("--long={window}")).arg("-q").arg("-c");
    cmd.arg("--single-thread");
    if let Some(o) = old {
        cmd.arg(format!("--patch-from={}", o.display()));
    }
    let mut child = cmd
        .arg(new)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut out = child.stdout.take().expect("piped");
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        match out.read(&mut buf)? {
            0 => break,
            k => n += k as u64,
        }
    }
    let st = child.wait()?;
    if !st.success() {
        return Err(io::Error::other(format!("zstd failed: {st}")));
    }
    Ok(n)
}

/// Checks that `b` (the live release) holds exactly what `a` (the source) does: the same paths,
/// kinds, permission bits, file contents and symlink targets.
///
/// # Errors
/// The first difference, or a path that cannot be read, described.
pub fn compare_trees(a: &Path, b: &Path) -> Result<(), String> {
    let b = fs::canonicalize(b).map_err(|e| format!("{}: {e}", b.display()))?;
    let mut ea = BTreeMap::new();
    let mut eb = BTreeMap::new();
    walk(a, a, &mut ea).map_err(|e| e.to_string())?;
    walk(&b, &b, &mut eb).map_err(|e| e.to_string())?;
    for (p, ka) in &ea {
        match eb.get(p) {
            None => return Err(format!("{p} is missing")),
            Some(kb) if kb != ka => return Err(format!("{p}: {kb:?}, expected {ka:?}")),
            Some(Kind::File(..)) => {
                let (x, y) = (fs::read(a.join(p)), fs::read(b.join(p)));
                match (x, y) {
                    (Ok(x), Ok(y)) if x == y => {}
                    _ => return Err(format!("{p}: content differs")),
                }
            }
            Some(_) => {}
        }
    }
    if let Some(p) = eb.keys().find(|p| !ea.contains_key(*p)) {
        return Err(format!("{p} should not be there"));
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File(u32, u64),
    Symlink(PathBuf),
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Kind>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let path = e.path();
        let rel = path
            .strip_prefix(root)
            .map_err(io::Error::other)?
            .to_string_lossy()
            .into_owned();
        let md = fs::symlink_metadata(&path)?;
        let ft = md.file_type();
        if ft.is_symlink() {
            out.insert(rel, Kind::Symlink(fs::read_link(&path)?));
        } else if ft.is_dir() {
            out.insert(rel, Kind::Dir);
            walk(root, &path, out)?;
        } else {
            out.insert(rel, Kind::File(md.permissions().mode() & 0o7777, md.size()));
        }
    }
    Ok(())
}
