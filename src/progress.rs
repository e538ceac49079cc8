//! Progress while a deploy runs, on stderr: when stderr is a terminal (and not `-q`), a scan
//! line (files, bytes, rate) and one line per target (its phase; while sending, bytes of file
//! content sent of those to send, rate and ETA; then "applying" while the agent writes,
//! verifies and commits). The pipeline only adds to atomic counters ([`flip_scan::ScanMeter`],
//! [`flip_transfer::SendMeter`]); a ticker thread here reads them every 100 ms. With `-v`, each
//! target's time per phase (and the scan's) is printed after the deploy, terminal or not.

use crate::output;
use flip_deploy::{Events, Phase, Target};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The deploy's progress lines and phase timings.
pub struct Progress {
    bars: Option<Bars>,
    names: Vec<String>,
    /// Per target: each phase reached and when (for `-v`).
    phases: Mutex<Vec<Vec<(Phase, Instant)>>>,
    /// The scan's meter, and when it started and ended (for `-v`).
    scan: Mutex<Option<ScanTime>>,
}

/// The scan, for `-v`.
struct ScanTime {
    meter: flip_scan::ScanMeter,
    started: Instant,
    ended: Option<Instant>,
}

/// The terminal's lines, and what the ticker reads.
struct Bars {
    multi: MultiProgress,
    hosts: Vec<ProgressBar>,
    /// Held by the ticker while it draws: an event that changes what is shown waits for it.
    state: Arc<Mutex<Drawn>>,
    stop: Arc<AtomicBool>,
    ticker: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Width of the target column.
    width: usize,
}

/// What the ticker reads: the scan's line and meter while it runs, each target's meter while
/// it sends.
struct Drawn {
    scan: Option<(ProgressBar, flip_scan::ScanMeter, Instant)>,
    meters: Vec<Option<flip_transfer::SendMeter>>,
}

/// Whether stderr may be colored: a terminal, and `NO_COLOR` unset or empty.
pub fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

impl Progress {
    /// Progress for a deploy to `targets`: lines on stderr only when it is a terminal and
    /// neither `-q` nor `--json` was given.
    pub fn new(targets: &[Target], json: bool) -> Arc<Progress> {
        let names: Vec<String> = targets.iter().map(Target::display).collect();
        let shown = std::io::stderr().is_terminal() && !output::quiet() && !json;
        let bars = shown.then(|| Bars::new(&names, color()));
        Arc::new(Progress {
            bars,
            phases: Mutex::new(vec![Vec::new(); names.len()]),
            names,
            scan: Mutex::new(None),
        })
    }

    /// No progress lines: only the "locked by ...; waiting" lines (rollback and activate of an
    /// environment).
    pub fn lines(targets: &[Target]) -> Progress {
        Progress {
            bars: None,
            phases: Mutex::new(vec![Vec::new(); targets.len()]),
            names: targets.iter().map(Target::display).collect(),
            scan: Mutex::new(None),
        }
    }

    /// Leaves every line as it ended; with `-v`, prints the time of each phase.
    pub fn done(&self) {
        if let Some(b) = &self.bars {
            b.stop();
        }
        if output::verbosity() >= 1 {
            for line in self.timings() {
                note!("flip: {line}");
            }
        }
    }

    /// `-v`'s lines: `scanned N files (BYTES) in S s`, then per target `TARGET: connecting
    /// 0.05 s, waiting for the scan 0.20 s, ...` (the last phase reached, without a time).
    fn timings(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let scan = self.scan.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ScanTime {
            meter,
            started,
            ended: Some(ended),
        }) = scan.as_ref()
        {
            lines.push(format!(
                "scanned {} files ({}) in {:.2} s",
                meter.files(),
                output::bytes(meter.bytes()),
                ended.duration_since(*started).as_secs_f64()
            ));
        }
        let phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        for (name, list) in self.names.iter().zip(phases.iter()) {
            let mut parts = Vec::new();
            for (i, (phase, at)) in list.iter().enumerate() {
                match list.get(i + 1) {
                    Some((_, next)) => parts.push(format!(
                        "{} {:.2} s",
                        said(*phase, self.names.len()),
                        next.duration_since(*at).as_secs_f64()
                    )),
                    None => parts.push(said(*phase, self.names.len()).to_string()),
                }
            }
            if !parts.is_empty() {
                lines.push(format!("{}: {}", output::printable(name), parts.join(", ")));
            }
        }
        lines
    }
}

impl Events for Progress {
    fn phase(&self, host: usize, phase: Phase) {
        if let Some(list) = self
            .phases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(host)
        {
            list.push((phase, Instant::now()));
        }
        if let Some(b) = &self.bars {
            b.phase(host, phase);
        }
    }

    /// Every line of a hook's output, live on stderr (whether or not it is a terminal, with
    /// `-q` too: it is the hook's own output; never on stdout, which carries `--json`),
    /// prefixed with its target: `[deploy@web1:/srv/app] ...`.
    fn hook_line(&self, host: usize, _stream: flip_deploy::HookStream, line: &str) {
        let name = self.names.get(host).map(String::as_str).unwrap_or("?");
        let text = format!("[{}] {}", output::printable(name), output::printable(line));
        match &self.bars {
            Some(b) => b.multi.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }

    fn waiting(&self, host: usize, holder: &str) {
        let name = self.names.get(host).map(String::as_str).unwrap_or("?");
        // The holder is what the lock file says: whoever holds the lock wrote it.
        let holder = output::printable(holder);
        match self.bars.as_ref().and_then(|b| b.hosts.get(host)) {
            Some(b) => b.set_message(format!("locked by {holder}; waiting")),
            None => note!("flip: {name} is locked by {holder}; waiting"),
        }
    }

    fn scanning(&self, meter: &flip_scan::ScanMeter) {
        *self.scan.lock().unwrap_or_else(|e| e.into_inner()) = Some(ScanTime {
            meter: meter.clone(),
            started: Instant::now(),
            ended: None,
        });
        if let Some(b) = &self.bars {
            b.scanning(meter);
        }
    }

    fn scanned(&self) {
        if let Some(t) = self.scan.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            t.ended = Some(Instant::now());
        }
        if let Some(b) = &self.bars {
            b.scanned();
        }
    }

    fn sending(&self, host: usize, meter: &flip_transfer::SendMeter) {
        if let Some(b) = &self.bars {
            b.sending(host, meter);
        }
    }
}

impl Bars {
    fn new(names: &[String], color: bool) -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let width = names.iter().map(String::len).max().unwrap_or(0);
        let hosts: Vec<ProgressBar> = names
            .iter()
            .map(|n| {
                let b = multi.add(ProgressBar::new_spinner());
                b.set_style(spinner_style(width));
                b.set_prefix(output::printable(n).into_owned());
                b.set_message("waiting");
                b
            })
            .collect();
        let state = Arc::new(Mutex::new(Drawn {
            scan: None,
            meters: vec![None; hosts.len()],
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (hosts, state, stop) = (hosts.clone(), state.clone(), stop.clone());
            std::thread::spawn(move || tick(&hosts, &state, &stop, width, color))
        };
        Bars {
            multi,
            hosts,
            state,
            stop,
            ticker: Mutex::new(Some(ticker)),
            width,
        }
    }

    fn drawn(&self) -> std::sync::MutexGuard<'_, Drawn> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn phase(&self, host: usize, phase: Phase) {
        let Some(b) = self.hosts.get(host) else {
            return;
        };
        let mut drawn = self.drawn();
        // Past sending: no more bytes to show for this target.
        if phase != Phase::Staging
            && drawn
                .meters
                .get_mut(host)
                .is_some_and(|m| m.take().is_some())
        {
            b.set_style(spinner_style(self.width));
        }
        b.set_message(said(phase, self.hosts.len()));
    }

    fn sending(&self, host: usize, meter: &flip_transfer::SendMeter) {
        if let Some(slot) = self.drawn().meters.get_mut(host) {
            *slot = Some(meter.clone());
        }
    }

    fn scanning(&self, meter: &flip_scan::ScanMeter) {
        let bar = self.multi.insert(0, ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message("scanning the source");
        self.drawn().scan = Some((bar, meter.clone(), Instant::now()));
    }

    fn scanned(&self) {
        if let Some((bar, m, started)) = self.drawn().scan.take() {
            bar.finish_with_message(format!(
                "scanned {} files, {} in {:.2} s",
                m.files(),
                output::bytes(m.bytes()),
                started.elapsed().as_secs_f64()
            ));
        }
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        for b in &self.hosts {
            b.finish();
        }
    }
}

/// The ticker: every 100 ms, until `stop`, reads the meters and redraws the lines.
fn tick(hosts: &[ProgressBar], state: &Mutex<Drawn>, stop: &AtomicBool, width: usize, color: bool) {
    let mut sending = vec![false; hosts.len()];
    while !stop.load(Ordering::Relaxed) {
        let drawn = state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((bar, m, started)) = &drawn.scan {
            let secs = started.elapsed().as_secs_f64().max(0.001);
            bar.set_message(format!(
                "scanning: {} files, {}, {}/s",
                m.files(),
                output::bytes(m.bytes()),
                output::bytes((m.bytes() as f64 / secs) as u64)
            ));
            bar.tick();
        }
        for (i, (bar, meter)) in hosts.iter().zip(&drawn.meters).enumerate() {
            let Some(m) = meter else {
                sending[i] = false;
                continue;
            };
            let ((files, bytes), (done_files, done_bytes)) = (m.total(), m.done());
            if files == 0 {
                continue;
            }
            if done_files >= files {
                bar.set_style(spinner_style(width));
                bar.set_message(format!(
                    "applying: the agent writes, verifies and commits ({} sent)",
                    output::bytes(m.wire_bytes())
                ));
                continue;
            }
            bar.set_message(format!("{done_files}/{files} files"));
            if !sending[i] {
                sending[i] = true;
                bar.set_length(bytes);
                bar.set_style(bar_style(width, color));
            }
            bar.set_position(done_bytes);
        }
        for b in hosts {
            if !b.is_finished() {
                b.tick();
            }
        }
        drop(drawn);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spinner_style(width: usize) -> ProgressStyle {
    ProgressStyle::with_template(&format!("{{spinner}} {{prefix:<{width}}}  {{msg}}"))
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// While sending: bytes of file content (before delta and compression) of the total, rate, ETA.
fn bar_style(width: usize, color: bool) -> ProgressStyle {
    let bar = if color {
        "{bar:24.cyan/blue}"
    } else {
        "{bar:24}"
    };
    ProgressStyle::with_template(&format!(
        "{{spinner}} {{prefix:<{width}}}  sending {bar} {{bytes}}/{{total_bytes}} {{bytes_per_sec}}, ETA {{eta}}, {{msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

/// What a line says of `phase`, among `targets` targets: with one there are no others to wait
/// for.
fn said(phase: Phase, targets: usize) -> &'static str {
    match phase {
        Phase::Committed if targets == 1 => "committed",
        _ => phase.as_str(),
    }
}
