//! Running one tool invocation and measuring it: wall time, exit status, output, and the peak
//! resident memory of each side.
//!
//! Peak RSS is read from the kernel's per-process high-water mark (`VmHWM` in
//! `/proc/PID/status`), sampled every 5 ms over the whole process tree of each side; a side's peak
//! is the largest sum, over one sample, of the high-water marks of its live processes (an upper
//! bound for the memory the side held at once; forked processes that share pages are counted
//! once each). Because the mark only grows, sampling misses at most what a process added in its
//! last 5 ms. (`ru_maxrss` from wait4 is no help: after a vfork-style spawn the kernel charges
//! the parent's high-water mark to the child at exec.)
//!
//! Sides: in local mode the tool's top process is the client and its descendants (flip's agent,
//! rsync's receiver and generator) are the server side. Over SSH the tool's whole local tree
//! (including an `ssh` child) is the client, and the server side is every descendant of our
//! private sshd that is not sshd itself (`flip agent`, `rsync --server`, the swap's shell).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default)]
pub struct Measured {
    pub wall: Duration,
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Peak RSS of the client side, KiB.
    pub client_kb: u64,
    /// Peak RSS of the server side, KiB.
    pub server_kb: u64,
}

impl Measured {
    /// Two invocations one after the other (rsync, then the ssh that swaps `current`).
    pub fn then(mut self, next: Measured) -> Measured {
        self.wall += next.wall;
        self.success &= next.success;
        if !next.success {
            self.code = next.code;
        }
        self.stdout.push_str(&next.stdout);
        self.stderr.push_str(&next.stderr);
        self.client_kb = self.client_kb.max(next.client_kb);
        self.server_kb = self.server_kb.max(next.server_kb);
        self
    }

    pub fn check(&self, what: &str) -> io::Result<()> {
        if self.success {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "{what} failed (exit {:?}):\n{}{}",
                self.code, self.stdout, self.stderr
            )))
        }
    }
}

/// Where the server side of a run lives.
#[derive(Clone, Copy)]
pub enum ServerSide {
    /// The descendants of the tool's own process (local mode).
    Children,
    /// The non-sshd descendants of this sshd listener pid.
    Sshd(u32),
}

/// Runs `cmd` to completion and measures it.
pub fn run(cmd: &mut Command, server: ServerSide) -> io::Result<Measured> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let peaks = Arc::new(Mutex::new((0u64, 0u64)));
    let sampler = {
        let (stop, peaks) = (Arc::clone(&stop), Arc::clone(&peaks));
        thread::spawn(move || {
            let mut hwm: BTreeMap<u32, u64> = BTreeMap::new();
            loop {
                let done = stop.load(Ordering::SeqCst);
                let (client, server) = sample(pid, server, &mut hwm);
                {
                    let mut p = peaks.lock().unwrap();
                    p.0 = p.0.max(client);
                    p.1 = p.1.max(server);
                }
                if done {
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    // Reap with wait4 (not Child::wait, so that EINTR is retried and nothing else reaps it).
    // Its ru_maxrss is not used: after a vfork-style spawn it includes the parent's memory
    // (the kernel records the old mm's high-water mark at exec).
    let mut status = 0;
    let r = loop {
        // SAFETY: plain waitpid(2) on our own child; status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if r == -1 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break r;
    };
    let wall = started.elapsed();
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    let (client_kb, server_kb) = *peaks.lock().unwrap_or_else(|e| e.into_inner());
    let exited = libc::WIFEXITED(status);
    let code = exited.then(|| libc::WEXITSTATUS(status));
    Ok(Measured {
        wall,
        success: code == Some(0),
        code,
        stdout,
        stderr,
        client_kb,
        server_kb,
    })
}

/// One sample: (client KiB, server KiB).
fn sample(root: u32, server: ServerSide, hwm: &mut BTreeMap<u32, u64>) -> (u64, u64) {
    let mut seen = |pid: u32| -> u64 {
        match read_hwm(pid) {
            Some(kb) => {
                let e = hwm.entry(pid).or_insert(0);
                *e = (*e).max(kb);
                *e
            }
            None => 0,
        }
    };
    let mut below_root = Vec::new();
    descendants(root, &mut below_root);
    match server {
        ServerSide::Children => {
            let client = seen(root);
            let server = below_root.iter().map(|&p| seen(p)).sum();
            (client, server)
        }
        ServerSide::Sshd(listener) => {
            let client = seen(root) + below_root.iter().map(|&p| seen(p)).sum::<u64>();
            let mut remote = Vec::new();
            descendants(listener, &mut remote);
            let server = remote
                .into_iter()
                .filter(|&p| !comm(p).starts_with("sshd"))
                .map(&mut seen)
                .sum();
            (client, server)
        }
    }
}

/// All descendants of `pid` (children of every thread), depth first.
fn descendants(pid: u32, out: &mut Vec<u32>) {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        let Ok(children) = fs::read_to_string(t.path().join("children")) else {
            continue;
        };
        for c in children
            .split_whitespace()
            .filter_map(|s| s.parse::<u32>().ok())
        {
            if !out.contains(&c) {
                out.push(c);
                descendants(c, out);
            }
        }
    }
}

fn read_hwm(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// CPU seconds used so far by the whole machine (busy, including steal) and by us: this process,
/// its reaped descendants, and the given extra processes with their reaped children (our sshd).
/// The difference between two snapshots' `others()` is what other processes took meanwhile.
#[derive(Clone, Copy, Default, Debug)]
pub struct CpuSnapshot {
    pub busy: f64,
    pub ours: f64,
}

impl CpuSnapshot {
    pub fn take(extra: &[u32]) -> CpuSnapshot {
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let busy = fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.to_string();
                let v: Vec<f64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal
                let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
                Some(busy / hz)
            })
            .unwrap_or(0.0);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        let mut ours = 0.0;
        for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
            // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: getrusage fills the struct we pass.
            if unsafe { libc::getrusage(who, &mut ru) } == 0 {
                ours += tv(ru.ru_utime) + tv(ru.ru_stime);
            }
        }
        for pid in extra {
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            // After "(comm)": state is field 3; utime, stime, cutime, cstime are fields 14–17.
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: f64 = (11..15)
                .filter_map(|i| f.get(i).and_then(|x| x.parse::<f64>().ok()))
                .sum();
            ours += ticks / hz;
        }
        CpuSnapshot { busy, ours }
    }

    /// CPU seconds other processes (and kernel threads) used between `earlier` and `self`.
    pub fn others_since(self, earlier: CpuSnapshot) -> f64 {
        ((self.busy - earlier.busy) - (self.ours - earlier.ours)).max(0.0)
    }
}
