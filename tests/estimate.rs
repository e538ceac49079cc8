//! `flip diff` predicts what a deploy sends: its warm and cold estimates are compared with the
//! bytes real deploys of the same pair of trees sent (the benchmark's generated corpus).

mod common;
#[path = "../benches/deploy/corpus/mod.rs"]
#[allow(dead_code)]
mod corpus;

use common::*;
use corpus::Scenario;
use serde_json::Value;

fn num(v: &Value, ptr: &str) -> u64 {
    v.pointer(ptr)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{ptr} in {v}"))
}

/// Generates the corpus (`files`, seed 7) as OLD, and its `scenario` mutation as NEW.
fn pair(fx: &Fx, files: usize, scenario: Scenario) -> (Src, Src) {
    let mut c = corpus::generate(files, 7);
    let old = fx.src("old");
    corpus::materialize(&c, &old.dir, Scenario::Initial.mtime()).unwrap();
    c.mutate(scenario, 7);
    let new = fx.src("new");
    corpus::materialize(&c, &new.dir, scenario.mtime()).unwrap();
    (old, new)
}

/// Bytes the client sent deploying NEW over a target where OLD is live, at zstd `level`:
/// warm (the client deployed OLD with its caches) or cold (`--no-cache`).
fn deployed(old: &Src, new: &Src, level: &str, cold: bool) -> u64 {
    let fx = Fx::new();
    fx.deploy(old, &[]);
    let mut extra = vec!["--compress-level", level];
    if cold {
        extra.push("--no-cache");
    }
    let j = fx.deploy(new, &extra);
    num(&j, "/bytes/sent")
}

#[track_caller]
fn within_10_percent(predicted: u64, real: u64, what: &str) {
    let ratio = predicted as f64 / real as f64;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{what}: flip diff predicted {predicted} bytes, the deploy sent {real} ({ratio:.3}×)"
    );
}

fn check(files: usize, scenario: Scenario, level: &str) {
    let fx = Fx::new();
    let (old, new) = pair(&fx, files, scenario);
    let d = fx
        .flip(&[
            "diff",
            "--json",
            "--compress-level",
            level,
            old.s(),
            new.s(),
        ])
        .success()
        .json();
    assert_eq!(num(&d, "/estimate/compress_level").to_string(), level);
    let warm = deployed(&old, &new, level, false);
    let cold = deployed(&old, &new, level, true);
    eprintln!(
        "{scenario:?} level {level}: warm {} vs {warm}, cold {} vs {cold}, bound {}",
        num(&d, "/estimate/warm/sent"),
        num(&d, "/estimate/cold/sent"),
        num(&d, "/estimate/bound")
    );
    within_10_percent(num(&d, "/estimate/warm/sent"), warm, "warm");
    within_10_percent(num(&d, "/estimate/cold/sent"), cold, "cold");
    // A cold client cannot patch: it sends more, and nothing beats the bound by much.
    assert!(cold > warm, "cold {cold} <= warm {warm}");
    assert!(num(&d, "/estimate/bound") <= num(&d, "/estimate/warm/sent"));
    let top = d
        .pointer("/estimate/top")
        .and_then(Value::as_array)
        .unwrap();
    assert!(!top.is_empty());
    let sizes: Vec<u64> = top
        .iter()
        .map(|t| num(t, "/warm/bytes").max(num(t, "/cold/bytes")))
        .collect();
    assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
}

#[test]
fn diff_predicts_a_patch_upgrade_within_10_percent_compressed() {
    check(400, Scenario::Patch, "3");
}

#[test]
fn diff_predicts_a_minor_upgrade_within_10_percent_compressed() {
    check(400, Scenario::Minor, "3");
}

#[test]
fn diff_predicts_a_minor_upgrade_within_10_percent_uncompressed() {
    check(400, Scenario::Minor, "0");
}
