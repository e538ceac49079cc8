//! Round trips with the agent beyond opening the connection (the SSH login), per deploy
//! scenario, as the deploy reports them (`"round_trips"`): requests that do not depend on an
//! answer go together, so the count does not grow with files or directories. Local targets
//! speak the same protocol as SSH ones.

mod common;

use common::*;

fn round_trips(v: &serde_json::Value) -> u64 {
    v["round_trips"]
        .as_u64()
        .unwrap_or_else(|| panic!("no round_trips in {v}"))
}

/// A tree several directory levels deep, so a per-level probe would show.
fn deep_site(src: &Src) {
    site_v1(src);
    for d in ["a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/e"] {
        src.file(&format!("{d}/f.txt"), format!("in {d}\n"), 0o644);
    }
}

#[test]
fn a_no_op_and_a_warm_upgrade_take_few_round_trips() {
    let fx = Fx::new();
    let src = fx.src("src");
    deep_site(&src);
    let first = fx.deploy(&src, &[]);
    // Handshake, lock, status, live check and probe; stage; content, commit, activate, prune
    // and bye.
    assert_eq!(round_trips(&first), 3, "first deploy: {first}");

    let noop = fx.deploy(&src, &[]);
    assert_eq!(noop["unchanged"], true);
    // Handshake, lock, status and live check; prune and bye.
    assert_eq!(round_trips(&noop), 2, "no-op: {noop}");

    site_v2(&src);
    src.overwrite("a/b/c/d/e/f.txt", "edited deep down\n");
    let warm = fx.deploy(&src, &[]);
    assert_eq!(warm["release"], 2);
    assert_eq!(round_trips(&warm), 3, "warm upgrade: {warm}");
    assert_eq!(read_tree(&fx.current()), src.tree());
}

#[test]
fn a_client_without_caches_finds_changed_directories_in_one_round_trip() {
    let fx = Fx::new();
    let src = fx.src("src");
    deep_site(&src);
    fx.deploy(&src, &[]);
    site_v2(&src);
    src.overwrite("a/b/c/d/e/f.txt", "edited deep down\n");
    let cold = fx.deploy(&src, &["--no-cache"]);
    assert_eq!(cold["release"], 2);
    // Handshake, lock, status, live check and probe (every directory at once); stage;
    // signatures; content, commit, activate, prune and bye.
    assert_eq!(cold["files"]["delta"], 1, "{cold}");
    assert_eq!(round_trips(&cold), 4, "cold upgrade: {cold}");
    assert_eq!(read_tree(&fx.current()), src.tree());
}

#[test]
fn a_dry_run_and_a_rollback_take_few_round_trips() {
    let fx = Fx::new();
    let src = fx.src("src");
    deep_site(&src);
    fx.deploy(&src, &[]);
    site_v2(&src);
    fx.deploy(&src, &[]);
    let dry = fx.deploy(&src, &["--dry-run"]);
    assert_eq!(round_trips(&dry), 2, "dry run: {dry}");
    assert_eq!(fx.current_link(), "releases/2");
    let back = fx
        .flip(&["rollback", "--json", fx.root_str()])
        .success()
        .json();
    assert_eq!(fx.current_link(), "releases/1");
    assert_eq!(round_trips(&back), 1, "rollback: {back}");
}
