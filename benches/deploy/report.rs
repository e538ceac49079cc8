//! Turning samples into results: a Markdown report, the raw JSON, and a PNG chart.

use crate::chart::{self, Canvas, Group, Panel};
use crate::corpus::Scenario;
use crate::{Config, CorpusStats, Fs, Mode, Sample, StepInfo, Tool};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::process::Command;

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Everything about one tool in one (mode, fs, scenario) cell.
#[derive(Default, Clone)]
pub struct ToolStats {
    pub n: usize,
    pub median_s: Option<f64>,
    pub wire: Option<f64>,
    /// flip only: its round trips beyond the SSH login (`round_trips` in its JSON), median.
    pub round_trips: Option<f64>,
    pub client_mb: f64,
    pub server_mb: f64,
}

#[derive(Default, Clone)]
pub struct Cell {
    pub flip: ToolStats,
    pub rsync: ToolStats,
    /// flip/rsync wall time of each interleaved pair (same run).
    pub ratios: Vec<f64>,
    /// No-op only: flip's wall time over `flip releases`'s on the same target, per run.
    pub floor_ratios: Vec<f64>,
}

impl Cell {
    pub fn ratio_median(&self) -> Option<f64> {
        median(&mut self.ratios.clone())
    }
}

fn tool_stats(samples: &[&Sample]) -> ToolStats {
    let mut walls: Vec<f64> = samples.iter().map(|s| s.wall).collect();
    let mut wires: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.wire.map(|w| w.total() as f64))
        .collect();
    ToolStats {
        n: samples.len(),
        median_s: median(&mut walls),
        wire: median(&mut wires),
        round_trips: median(
            &mut samples
                .iter()
                .filter_map(|s| s.flip_json.as_ref()?["round_trips"].as_f64())
                .collect::<Vec<_>>(),
        ),
        client_mb: samples.iter().map(|s| s.client_kb).max().unwrap_or(0) as f64 / 1024.0,
        server_mb: samples.iter().map(|s| s.server_kb).max().unwrap_or(0) as f64 / 1024.0,
    }
}

pub fn cells(samples: &[Sample]) -> BTreeMap<(Mode, Fs, Scenario), Cell> {
    let mut keys: Vec<(Mode, Fs, Scenario)> =
        samples.iter().map(|s| (s.mode, s.fs, s.scenario)).collect();
    keys.sort();
    keys.dedup();
    let mut out = BTreeMap::new();
    for k in keys {
        let of = |t: Tool| -> Vec<&Sample> {
            samples
                .iter()
                .filter(|s| (s.mode, s.fs, s.scenario) == k && s.tool == t)
                .collect()
        };
        let (f, r) = (of(Tool::Flip), of(Tool::Rsync));
        let ratios = f
            .iter()
            .filter_map(|a| {
                r.iter()
                    .find(|b| b.run == a.run)
                    .map(|b| a.wall / b.wall.max(1e-9))
            })
            .collect();
        out.insert(
            k,
            Cell {
                floor_ratios: f
                    .iter()
                    .filter_map(|a| a.floor.map(|fl| a.wall / fl.max(1e-9)))
                    .collect(),
                flip: tool_stats(&f),
                rsync: tool_stats(&r),
                ratios,
            },
        );
    }
    out
}

fn secs(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.3}"))
}

fn bytes(v: Option<f64>) -> String {
    v.map_or("–".into(), chart::human_bytes)
}

fn cmd_out(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// Writes NAME.md, NAME.json and NAME.png into the output directory; returns the Markdown.
pub fn write(
    cfg: &Config,
    samples: &[Sample],
    infos: &BTreeMap<Scenario, StepInfo>,
    notes: &[String],
    corpus: &CorpusStats,
) -> io::Result<String> {
    let cells = cells(samples);
    let root = env!("CARGO_MANIFEST_DIR");
    // FLIP_BENCH_REV names the commit when the tree is an export without .git.
    let (rev, dirty) = match std::env::var("FLIP_BENCH_REV") {
        Ok(r) if !r.is_empty() => (r, false),
        _ => (
            cmd_out("git", &["-C", root, "rev-parse", "--short", "HEAD"]),
            !cmd_out(
                "git",
                &["-C", root, "status", "--porcelain", "--untracked-files=no"],
            )
            .is_empty(),
        ),
    };
    let date = cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let machine = format!(
        "{cores} cores, Linux {}, {}, OpenSSH {}, {}",
        cmd_out("uname", &["-r"]),
        cmd_out("rsync", &["--version"]).replace("  ", " "),
        cmd_out("ssh", &["-V"]),
        cmd_out("zstd", &["--version"])
            .trim_matches('*')
            .trim()
            .split(", by")
            .next()
            .unwrap_or("")
    );
    let ssh_version = Command::new("ssh")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default();
    let machine = machine.replace("OpenSSH , ", &format!("{ssh_version}, "));

    let mut md = String::new();
    let _ = writeln!(md, "# flip vs rsync: deploy benchmark\n");
    let _ = writeln!(md, "Made by `{}`", cfg.command);
    let _ = writeln!(
        md,
        "on {date}, flip {rev}{} (release profile), {machine}.\n",
        if dirty { " + uncommitted changes" } else { "" }
    );
    let _ = writeln!(
        md,
        "Corpus: {} files, {:.1} MB, generated PHP application (seed {}); {} interleaved run(s) per cell; \
         each run deploys the whole chain initial → patch → minor → vendor → noop → fresh-ci → ci-patch onto fresh targets. \
         Times are wall-clock medians in seconds; *flip/rsync* is the median of the per-run ratios (min–max), \
         below 1 means flip is faster. Peak RSS is the maximum over the runs (MB, client / server side). \
         See benches/README.md for what exactly is measured.\n",
        corpus.files,
        corpus.bytes as f64 / 1e6,
        cfg.seed,
        cfg.runs
    );
    let _ = writeln!(md, "| scenario | files changed / added / removed / renamed | bytes in changed files | zstd -{} --patch-from bound |", cfg.bound_level.unwrap_or(19));
    let _ = writeln!(md, "|---|---|---:|---:|");
    for s in &cfg.scenarios {
        if let Some(i) = infos.get(s) {
            let _ = writeln!(
                md,
                "| {} | {} / {} / {} / {} | {} | {} |",
                s.name(),
                i.changed,
                i.added,
                i.removed,
                i.renamed,
                bytes(Some(i.bytes_written as f64)),
                bytes(i.bound.map(|b| b as f64))
            );
        }
    }
    md.push('\n');
    for &mode in &cfg.modes {
        for &fs_kind in &cfg.fss {
            let keyed: Vec<(&Scenario, &Cell)> = cfg
                .scenarios
                .iter()
                .filter_map(|s| cells.get(&(mode, fs_kind, *s)).map(|c| (s, c)))
                .collect();
            if keyed.is_empty() {
                continue;
            }
            let title = match mode {
                Mode::Local => "Local target (`flip deploy SRC DIR` vs `rsync -a --delete --link-dest` + symlink swap)",
                Mode::Ssh => "SSH target over loopback (`flip deploy SRC ssh://…` vs `rsync -a --delete -z --link-dest` + `ssh … ln -sfn && mv -T`)",
            };
            let _ = writeln!(md, "## {title}, target on {}\n", fs_kind.name());
            if mode == Mode::Ssh {
                let _ = writeln!(md, "| scenario | flip s | rsync s | flip/rsync | flip round trips | flip wire | rsync wire | bound | flip/bound | rsync/flip wire | flip RSS MB | rsync RSS MB |");
                let _ = writeln!(
                    md,
                    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                );
            } else {
                let _ = writeln!(
                    md,
                    "| scenario | flip s | rsync s | flip/rsync | flip RSS MB | rsync RSS MB |"
                );
                let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
            }
            for (s, c) in keyed {
                let ratio = match c.ratio_median() {
                    Some(r) => {
                        let lo = c.ratios.iter().cloned().fold(f64::INFINITY, f64::min);
                        let hi = c.ratios.iter().cloned().fold(0.0, f64::max);
                        format!("{r:.2} ({lo:.2}–{hi:.2})")
                    }
                    None => "–".into(),
                };
                let rss = |t: &ToolStats| {
                    if t.n == 0 {
                        "–".to_string()
                    } else {
                        format!("{:.0} / {:.0}", t.client_mb, t.server_mb)
                    }
                };
                if mode == Mode::Ssh {
                    let bound = infos.get(s).and_then(|i| i.bound).map(|b| b as f64);
                    let fb = match (c.flip.wire, bound) {
                        (Some(f), Some(b)) if b > 0.0 => format!("{:.2}", f / b),
                        _ => "–".into(),
                    };
                    let rf = match (c.rsync.wire, c.flip.wire) {
                        (Some(r), Some(f)) if f > 0.0 => format!("{:.1}", r / f),
                        _ => "–".into(),
                    };
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        s.name(),
                        secs(c.flip.median_s),
                        secs(c.rsync.median_s),
                        ratio,
                        c.flip.round_trips.map_or("–".into(), |r| format!("{r:.0}")),
                        bytes(c.flip.wire),
                        bytes(c.rsync.wire),
                        bytes(bound),
                        fb,
                        rf,
                        rss(&c.flip),
                        rss(&c.rsync)
                    );
                } else {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} | {} |",
                        s.name(),
                        secs(c.flip.median_s),
                        secs(c.rsync.median_s),
                        ratio,
                        rss(&c.flip),
                        rss(&c.rsync)
                    );
                }
            }
            md.push('\n');
        }
    }
    md.push_str(&targets(cfg, &cells, infos));
    let scaling = scaling(cfg, &cells, corpus.files);
    md.push_str(&scaling);
    if !notes.is_empty() {
        md.push_str("## Notes\n\n");
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
        md.push('\n');
    }

    // Raw data.
    let raw = json!({
        "command": cfg.command,
        "date": date,
        "flip_rev": rev,
        "dirty": dirty,
        "machine": machine,
        "corpus": {"files": corpus.files, "bytes": corpus.bytes, "seed": cfg.seed},
        "runs": cfg.runs,
        "steps": infos.iter().map(|(s, i)| (s.name().to_string(), json!({
            "changed": i.changed, "added": i.added, "removed": i.removed, "renamed": i.renamed,
            "bytes_written": i.bytes_written, "bound": i.bound,
        }))).collect::<serde_json::Map<String, Value>>(),
        "medians": cells.iter().flat_map(|((m, f, s), c)| {
            [(Tool::Flip, &c.flip), (Tool::Rsync, &c.rsync)].into_iter().filter(|(_, t)| t.n > 0).map(move |(tool, t)| json!({
                "mode": m.name(), "fs": f.name(), "scenario": s.name(), "tool": tool.name(),
                "median_s": t.median_s, "wire": t.wire, "client_mb": t.client_mb, "server_mb": t.server_mb,
                "ratio_flip_rsync": c.ratio_median(),
            }))
        }).collect::<Vec<_>>(),
        "samples": samples.iter().map(|s| json!({
            "mode": s.mode.name(), "fs": s.fs.name(), "scenario": s.scenario.name(),
            "tool": s.tool.name(), "run": s.run, "wall_s": s.wall,
            "client_kb": s.client_kb, "server_kb": s.server_kb,
            "wire_up": s.wire.map(|w| w.up), "wire_down": s.wire.map(|w| w.down),
            "connections": s.wire.map(|w| w.connections),
            "flip_releases_s": s.floor,
            "flip": s.flip_json,
        })).collect::<Vec<_>>(),
        "notes": notes,
    });
    fs::write(
        cfg.out.join(format!("{}.json", cfg.name)),
        serde_json::to_vec_pretty(&raw)?,
    )?;
    draw(cfg, &cells, infos, corpus)?;
    let _ = writeln!(md, "![chart]({}.png)", cfg.name);
    fs::write(cfg.out.join(format!("{}.md", cfg.name)), &md)?;
    Ok(md)
}

/// The issue's targets, each checked against what was measured.
fn targets(
    cfg: &Config,
    cells: &BTreeMap<(Mode, Fs, Scenario), Cell>,
    infos: &BTreeMap<Scenario, StepInfo>,
) -> String {
    let mut md =
        String::from("## Targets\n\n| target | where | measured | met? |\n|---|---|---:|---|\n");
    let yes = |b: bool| if b { "yes" } else { "**no**" };
    for ((mode, fs_kind, s), c) in cells {
        let place = format!("{} / {} / {}", mode.name(), fs_kind.name(), s.name());
        for goal in speed_goals(cfg, *mode, *fs_kind, *s) {
            if let Some(r) = c.ratio_median() {
                let _ = writeln!(
                    md,
                    "| flip ≥{goal}× faster than rsync | {place} | {:.2}× | {} |",
                    1.0 / r,
                    yes(1.0 / r >= goal)
                );
            }
        }
        // Over SSH only: a local `flip releases` reads the target without an agent.
        if let (Mode::Ssh, Scenario::Noop, Some(r)) = (mode, s, median(&mut c.floor_ratios.clone()))
        {
            let _ = writeln!(
                md,
                "| flip no-op ≤ 1.2× `flip releases` | {place} | {r:.2}× | {} |",
                yes(r <= 1.2)
            );
        }
        if let (Mode::Ssh, Scenario::Initial, Some(_), Some(f), Some(r)) =
            (mode, s, cfg.link.rate, c.flip.wire, c.rsync.wire)
        {
            let _ = writeln!(
                md,
                "| flip wire ≤ 0.8× rsync -z's | {place} | {:.2}× | {} |",
                f / r,
                yes(f / r <= 0.8)
            );
        }
        if *mode == Mode::Ssh {
            match s {
                Scenario::Noop | Scenario::FreshCi => {
                    if let (Some(f), Some(r)) = (c.flip.wire, c.rsync.wire) {
                        let _ = writeln!(
                            md,
                            "| flip wire ≤ 1/20 of rsync's | {place} | 1/{:.1} | {} |",
                            r / f,
                            yes(r / f >= 20.0)
                        );
                    }
                }
                Scenario::Patch | Scenario::Minor => {
                    if let (Some(f), Some(b)) = (c.flip.wire, infos.get(s).and_then(|i| i.bound)) {
                        let _ = writeln!(
                            md,
                            "| flip wire ≤ 1.5× the patch-from bound | {place} | {:.2}× | {} |",
                            f / b as f64,
                            yes(f / b as f64 <= 1.5)
                        );
                    }
                }
                _ => {}
            }
        }
        if cfg.files >= 100_000 && c.flip.n > 0 {
            let _ = writeln!(
                md,
                "| flip peak RSS ≤ 100 MB per side | {place} | {:.0} / {:.0} MB | {} |",
                c.flip.client_mb,
                c.flip.server_mb,
                yes(c.flip.client_mb <= 100.0 && c.flip.server_mb <= 100.0)
            );
        }
    }
    md.push('\n');
    md
}

/// The speed goals (flip at least this many times faster than rsync) for one cell: issue #4's
/// on an unshaped link (upgrades ≥3×, no-op and fresh checkout ≥5×), and issue #12's: on
/// loopback a first deploy ≥2× and a vendor upgrade on tmpfs ≥4×; at 50 ms RTT upgrades ≥5×
/// and the no-op ≥4.5×; a first deploy over a rate-capped link ≥1.5×.
fn speed_goals(cfg: &Config, mode: Mode, fs_kind: Fs, s: Scenario) -> Vec<f64> {
    let upgrade = matches!(
        s,
        Scenario::Patch
            | Scenario::Minor
            | Scenario::Vendor
            | Scenario::FreshCi
            | Scenario::CiPatch
    );
    if cfg.link.rate.is_some() {
        return match (mode, s) {
            (Mode::Ssh, Scenario::Initial) => vec![1.5],
            _ => vec![],
        };
    }
    if cfg.link.delay.as_millis() >= 25 && mode == Mode::Ssh {
        return match s {
            Scenario::Noop => vec![4.5],
            _ if upgrade => vec![5.0],
            _ => vec![],
        };
    }
    let mut goals = match s {
        Scenario::Noop | Scenario::FreshCi => vec![5.0],
        Scenario::Patch | Scenario::Minor | Scenario::CiPatch => vec![3.0],
        Scenario::Initial => vec![2.0],
        _ => vec![],
    };
    if s == Scenario::Vendor && fs_kind == Fs::Shm {
        goals.push(4.0);
    }
    goals
}

/// Compares with the results of another corpus size in the same directory (12k ↔ 100k).
fn scaling(cfg: &Config, cells: &BTreeMap<(Mode, Fs, Scenario), Cell>, files: usize) -> String {
    let other_files = if cfg.files == 12_000 { 100_000 } else { 12_000 };
    let path = cfg.out.join(format!("deploy-{other_files}.json"));
    let Some(other) = fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    else {
        return String::new();
    };
    let other_actual = other["corpus"]["files"]
        .as_f64()
        .unwrap_or(other_files as f64);
    let this_actual = files as f64;
    let mut md = format!(
        "## Scaling against deploy-{other_files}.json\n\n\
         Time here divided by time there, over the file-count ratio ({:.2}): 1.00 is linear, \
         above 1 worse than linear.\n\n| mode / fs / scenario | flip | rsync |\n|---|---:|---:|\n",
        this_actual / other_actual
    );
    let medians = other["medians"].as_array().cloned().unwrap_or_default();
    for ((m, f, s), c) in cells {
        let find = |tool: &str| -> Option<f64> {
            medians
                .iter()
                .find(|x| {
                    x["mode"] == m.name()
                        && x["fs"] == f.name()
                        && x["scenario"] == s.name()
                        && x["tool"] == tool
                })
                .and_then(|x| x["median_s"].as_f64())
        };
        let rel = |here: Option<f64>, there: Option<f64>| match (here, there) {
            (Some(a), Some(b)) if b > 0.0 => {
                format!("{:.2}", (a / b) / (this_actual / other_actual))
            }
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "| {} / {} / {} | {} | {} |",
            m.name(),
            f.name(),
            s.name(),
            rel(c.flip.median_s, find("flip")),
            rel(c.rsync.median_s, find("rsync"))
        );
    }
    md.push('\n');
    md
}

fn draw(
    cfg: &Config,
    cells: &BTreeMap<(Mode, Fs, Scenario), Cell>,
    infos: &BTreeMap<Scenario, StepInfo>,
    corpus: &CorpusStats,
) -> io::Result<()> {
    let mut panels = Vec::new();
    for &mode in &cfg.modes {
        for &fs_kind in &cfg.fss {
            let groups: Vec<Group> = cfg
                .scenarios
                .iter()
                .filter_map(|s| cells.get(&(mode, fs_kind, *s)).map(|c| (s, c)))
                .map(|(s, c)| Group {
                    label: match c.ratio_median() {
                        Some(r) => format!("{} {:.1}x", s.name(), 1.0 / r),
                        None => s.name().to_string(),
                    },
                    bars: vec![
                        (c.flip.median_s, chart::FLIP, secs2(c.flip.median_s)),
                        (c.rsync.median_s, chart::RSYNC, secs2(c.rsync.median_s)),
                    ],
                })
                .collect();
            if !groups.is_empty() {
                panels.push(Panel {
                    title: format!(
                        "{} target on {}: median wall time (s); label: scenario, flip speed-up",
                        mode.name(),
                        fs_kind.name()
                    ),
                    unit: "s".into(),
                    log: false,
                    groups,
                });
            }
        }
    }
    if let Some(&fs_kind) = cfg.fss.first() {
        if cfg.modes.contains(&Mode::Ssh) {
            let groups: Vec<Group> = cfg
                .scenarios
                .iter()
                .filter_map(|s| cells.get(&(Mode::Ssh, fs_kind, *s)).map(|c| (s, c)))
                .map(|(s, c)| {
                    let b = infos.get(s).and_then(|i| i.bound).map(|b| b as f64);
                    Group {
                        label: s.name().to_string(),
                        bars: vec![
                            (c.flip.wire, chart::FLIP, bytes(c.flip.wire)),
                            (c.rsync.wire, chart::RSYNC, bytes(c.rsync.wire)),
                            (b, chart::BOUND, bytes(b)),
                        ],
                    }
                })
                .collect();
            if !groups.is_empty() {
                panels.push(Panel {
                    title:
                        "ssh: bytes on the wire (log scale), and the zstd -19 --patch-from bound"
                            .into(),
                    unit: "".into(),
                    log: true,
                    groups,
                });
            }
        }
    }
    let (w, ph) = (1500i64, 380i64);
    let mut cv = Canvas::new(w as usize, (90 + ph * panels.len().max(1) as i64) as usize);
    cv.text(
        20,
        16,
        &format!(
            "flip vs rsync: {} files, {:.0} MB, {} runs (median)",
            corpus.files,
            corpus.bytes as f64 / 1e6,
            cfg.runs
        ),
        3,
        chart::BLACK,
    );
    chart::legend(
        &mut cv,
        20,
        56,
        &[
            ("flip", chart::FLIP),
            ("rsync", chart::RSYNC),
            ("zstd patch-from bound", chart::BOUND),
        ],
    );
    for (i, p) in panels.iter().enumerate() {
        chart::draw_panel(&mut cv, p, 0, 90 + i as i64 * ph, w, ph - 10);
    }
    cv.save(&cfg.out.join(format!("{}.png", cfg.name)))
}

fn secs2(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| {
        if v < 10.0 {
            format!("{v:.2}")
        } else {
            format!("{v:.1}")
        }
    })
}
