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

/// The bound's level is the user's: 0 leaves it out (`null`, no line), a lower level gives a
/// larger bound, and neither changes the warm and cold estimates.
#[test]
fn diff_bound_level_is_chosen_or_left_out() {
    let fx = Fx::new();
    let (old, new) = pair(&fx, 200, Scenario::Minor);
    let diff = |level: &str| {
        fx.flip(&["diff", "--json", "--bound-level", level, old.s(), new.s()])
            .success()
            .json()
    };
    let (best, fast, none) = (diff("19"), diff("1"), diff("0"));
    assert_eq!(num(&best, "/estimate/bound_level"), 19);
    assert_eq!(num(&fast, "/estimate/bound_level"), 1);
    assert_eq!(num(&none, "/estimate/bound_level"), 0);
    assert!(
        num(&fast, "/estimate/bound") > num(&best, "/estimate/bound"),
        "{fast} {best}"
    );
    assert_eq!(none.pointer("/estimate/bound"), Some(&Value::Null));
    for d in [&fast, &none] {
        for ptr in ["/estimate/warm/sent", "/estimate/cold/sent"] {
            assert_eq!(num(d, ptr), num(&best, ptr), "{ptr}");
        }
    }
    let text = |level: &str| {
        fx.flip(&["diff", "--bound-level", level, old.s(), new.s()])
            .success()
            .stdout
    };
    let with = text("19");
    assert!(
        with.contains("  bound (zstd -19 --patch-from of the changes): "),
        "{with}"
    );
    let without = text("0");
    assert!(without.contains("  cold client (no caches):"), "{without}");
    assert!(!without.contains("bound"), "{without}");
    fx.flip(&["diff", "--bound-level", "20", old.s(), new.s()])
        .code(2)
        .stderr_has("--bound-level");
}

/// Changes larger than several of the bound's groups (compressed several at once) all count:
/// incompressible files, in groups of their own or cut into several, give a bound of their
/// whole size.
#[test]
fn diff_bound_counts_every_group() {
    let fx = Fx::new();
    let old = fx.src("old");
    old.file("keep.txt", "x", 0o644);
    let new = fx.src("new");
    new.file("keep.txt", "x", 0o644);
    let each = 5 << 20;
    for i in 0..5 {
        new.file(&format!("blob{i}.bin"), noise(i, each), 0o644);
    }
    // Larger than a group: it goes in pieces, every one of them counted.
    new.file("big.bin", noise(9, 20 << 20), 0o644);
    let d = fx
        .flip(&["diff", "--json", "--bound-level", "1", old.s(), new.s()])
        .success()
        .json();
    let bound = num(&d, "/estimate/bound");
    let all = 5 * each as u64 + (20 << 20);
    assert!(
        (all..all + all / 100).contains(&bound),
        "bound {bound} for {all} bytes of noise"
    );
}
