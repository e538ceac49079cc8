//! `flip doctor ENV|TARGET`: asks each target's agent what it finds (read-only: no lock, no
//! change; see `flip_release::doctor` and `flip_agent::doctor`), adds this client's clock skew
//! check, and prints every finding with its target and fix (`--json`: an object per target and
//! a summary). Exit 0 when no target has a problem (`--strict`: nor a warning),
//! [`exit::UNHEALTHY`] when one has, [`exit::PARTIAL`] when a target of an environment could
//! not be asked.

use crate::{cli, config::Config, error_text, exit, output, render, ssh_only, targets_of};
use anyhow::Result;
use flip_deploy::Target;
use flip_wire::{Finding, Severity};
use serde_json::{json, Value};

/// Clock skew beyond which (after the round trip's uncertainty) the agent's clock is a finding.
pub const SKEW_LIMIT_MS: i64 = 5_000;

/// The agent's clock minus this client's, in milliseconds, estimated at the middle of the
/// round trip (`sent_ms` and `received_ms` on this client's clock, `agent_ms` on the agent's),
/// and the estimate's uncertainty: half the round trip.
pub fn skew(sent_ms: i64, agent_ms: i64, received_ms: i64) -> (i64, i64) {
    let rtt = received_ms.saturating_sub(sent_ms).max(0);
    let middle = sent_ms.saturating_add(rtt / 2);
    (agent_ms.saturating_sub(middle), (rtt + 1) / 2)
}

/// The `clock` finding: a warning when the agent's clock is off by more than
/// [`SKEW_LIMIT_MS`] even at the edge of the round trip's uncertainty.
pub fn clock_finding(skew_ms: i64, uncertainty_ms: i64) -> Finding {
    let off = skew_ms.abs().saturating_sub(uncertainty_ms);
    let (severity, message, fix) = if off > SKEW_LIMIT_MS {
        (
            Severity::Warning,
            format!(
                "the target's clock is {:.1} s {} this machine's (±{:.1} s): release times, lock ages and time-based labels disagree between machines",
                skew_ms.abs() as f64 / 1000.0,
                if skew_ms > 0 { "ahead of" } else { "behind" },
                uncertainty_ms as f64 / 1000.0
            ),
            Some("sync both clocks with NTP: sudo timedatectl set-ntp true (systemd-timesyncd or chrony)".to_string()),
        )
    } else {
        (
            Severity::Ok,
            format!(
                "the target's clock agrees with this machine's ({:+.1} s, ±{:.1} s)",
                skew_ms as f64 / 1000.0,
                uncertainty_ms as f64 / 1000.0
            ),
            None,
        )
    };
    Finding {
        check: "clock".into(),
        severity,
        message,
        fix,
    }
}

/// What one target answered.
struct Checked {
    host: String,
    findings: Vec<Finding>,
    skew_ms: i64,
    uncertainty_ms: i64,
}

fn check(target: &Target, ssh: &flip_deploy::SshSettings) -> Result<Checked> {
    let mut s = target.connect(ssh, 0)?;
    let a = s.doctor()?;
    let host = s.agent_host.clone();
    let _ = s.take_warnings();
    s.close()?;
    let (skew_ms, uncertainty_ms) = skew(a.sent_ms, a.agent_ms, a.received_ms);
    let mut findings = a.findings;
    findings.push(clock_finding(skew_ms, uncertainty_ms));
    Ok(Checked {
        host,
        findings,
        skew_ms,
        uncertainty_ms,
    })
}

/// Whether a finding makes its target unhealthy.
fn counts(f: &Finding, strict: bool) -> bool {
    f.severity == Severity::Problem || (strict && f.severity == Severity::Warning)
}

pub fn run(a: cli::DoctorArgs, cfg: Option<&Config>) -> Result<exit::Code> {
    let (env, targets) = targets_of(cfg, &a.target)?;
    let ssh = ssh_only(&a.ssh);
    let results: Vec<Result<Checked>> = std::thread::scope(|scope| {
        let handles: Vec<_> = targets
            .iter()
            .map(|t| scope.spawn(|| check(t, &ssh)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("doctor thread panicked")))
            })
            .collect()
    });
    let mut hosts = Vec::new();
    let (mut healthy, mut unhealthy, mut failed) = (0u64, 0u64, 0u64);
    let mut tally = [0u64; 4];
    for (target, r) in targets.iter().zip(results) {
        let name = target.display();
        let c = match r {
            Ok(c) => c,
            Err(e) if env.is_none() => return Err(e),
            Err(e) => {
                failed += 1;
                if !a.json {
                    render::host_error(&name, &error_text(&e), "");
                }
                hosts.push(render::failed_host(&name, &e));
                continue;
            }
        };
        for f in &c.findings {
            tally[f.severity as usize] += 1;
        }
        let ok = !c.findings.iter().any(|f| counts(f, a.strict));
        if ok {
            healthy += 1;
        } else {
            unhealthy += 1;
        }
        if !a.json {
            print_findings(&name, &c.findings);
        }
        hosts.push(json!({
            "target": name,
            "host": c.host,
            "healthy": ok,
            "clock": {"skew_ms": c.skew_ms, "uncertainty_ms": c.uncertainty_ms},
            "findings": c.findings.iter().map(finding_json).collect::<Vec<_>>(),
        }));
    }
    let summary = json!({
        "env": env.as_ref().map(|e| e.env.clone()),
        "targets": targets.len(),
        "healthy": healthy,
        "unhealthy": unhealthy,
        "failed": failed,
        "problems": tally[Severity::Problem as usize],
        "warnings": tally[Severity::Warning as usize],
        "notes": tally[Severity::Note as usize],
        "strict": a.strict,
    });
    if a.json {
        outln!("{}", json!({"hosts": hosts, "summary": summary}));
    } else {
        note!(
            "flip: doctor: {healthy} of {} target(s) healthy; {} problem(s), {} warning(s){}",
            targets.len(),
            tally[Severity::Problem as usize],
            tally[Severity::Warning as usize],
            if failed > 0 {
                format!("; {failed} could not be checked")
            } else {
                String::new()
            }
        );
    }
    Ok(if failed > 0 {
        exit::PARTIAL
    } else if unhealthy > 0 {
        exit::UNHEALTHY
    } else {
        exit::OK
    })
}

fn finding_json(f: &Finding) -> Value {
    json!({"check": f.check, "severity": f.severity.as_str(), "message": f.message, "fix": f.fix})
}

/// `TARGET: SEVERITY: CHECK: MESSAGE` on stdout, and `TARGET: fix: FIX` under it.
fn print_findings(target: &str, findings: &[Finding]) {
    for f in findings {
        let sev = match f.severity {
            Severity::Ok => "ok",
            Severity::Note => "note",
            Severity::Warning => "WARNING",
            Severity::Problem => "PROBLEM",
        };
        outln!(
            "{target}: {sev}: {}: {}",
            f.check,
            output::printable(&f.message)
        );
        if let Some(fix) = &f.fix {
            outln!("{target}:   fix: {}", output::printable(fix));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_is_measured_at_the_middle_of_the_round_trip() {
        // Sent at 1000, answered at 1600 by a clock reading 11300: the agent answered around
        // 1300 on ours, so it is 10 s ahead, give or take 300 ms.
        assert_eq!(skew(1_000, 11_300, 1_600), (10_000, 300));
        assert_eq!(skew(1_000, 1_000 - 7_000, 1_000), (-7_000, 0));
        // A clock that ran backwards on this machine counts as no round trip.
        assert_eq!(skew(2_000, 2_000, 1_000), (0, 0));
    }

    #[test]
    fn skew_within_the_limit_or_the_round_trip_is_no_warning() {
        assert_eq!(clock_finding(4_900, 0).severity, Severity::Ok);
        // 8 s off, but the answer took 8 s: it may be right.
        assert_eq!(clock_finding(8_000, 4_000).severity, Severity::Ok);
        let f = clock_finding(-9_000, 1_000);
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.message.contains("9.0 s behind"), "{}", f.message);
        assert!(f.fix.unwrap().contains("timedatectl set-ntp true"));
        assert!(clock_finding(6_000, 200).message.contains("ahead of"));
    }
}
