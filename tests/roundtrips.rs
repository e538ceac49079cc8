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

/// A target with the deep site as release 1 and its second version as release 2 (live),
/// deployed by this client.
fn two_releases() -> (Fx, Src) {
    let fx = Fx::new();
    let src = fx.src("src");
    deep_site(&src);
    fx.deploy(&src, &[]);
    site_v2(&src);
    fx.deploy(&src, &[]);
    (fx, src)
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
    // Handshake, lock, status, live check, and (the live release being intact) prune and bye.
    assert_eq!(round_trips(&noop), 1, "no-op: {noop}");

    site_v2(&src);
    src.overwrite("a/b/c/d/e/f.txt", "edited deep down\n");
    let warm = fx.deploy(&src, &[]);
    assert_eq!(warm["release"], 2);
    // Handshake, lock, status, live check, the stage against the release this client made
    // live, and (its plan known) the content, commit, activation, prune and bye.
    assert_eq!(round_trips(&warm), 1, "warm upgrade: {warm}");
    assert_eq!(
        warm["files"]["patched"], 1,
        "big.bin from the content cache: {warm}"
    );
    assert_eq!(read_tree(&fx.current()), src.tree());
}

#[test]
fn a_no_op_prunes_and_ends_in_its_first_round_trip_from_any_client() {
    let (fx, src) = two_releases();
    src.overwrite("a/f.txt", "third\n");
    fx.deploy(&src, &[]);

    // This client made release 3 live: it expects a no-op. Release 2 stays as the rollback
    // target, release 1 goes.
    let warm = fx.deploy(&src, &["--keep", "1"]);
    assert_eq!(warm["unchanged"], true, "{warm}");
    assert_eq!(warm["release"], 3, "{warm}");
    assert_eq!(warm["pruned"], serde_json::json!([1]), "{warm}");
    assert_eq!(round_trips(&warm), 1, "warm no-op: {warm}");
    assert!(!fx.release(1).exists(), "release 1 pruned");
    assert!(fx.release(2).is_dir(), "release 2 kept");

    src.overwrite("a/f.txt", "fourth\n");
    fx.deploy(&src, &[]);
    let live = read_tree(&fx.current());
    // A client without caches (a fresh CI runner) also probes, in the same round trip.
    let cold = fx.deploy(&src, &["--no-cache", "--keep", "1"]);
    assert_eq!(cold["unchanged"], true, "{cold}");
    assert_eq!(cold["release"], 4, "{cold}");
    assert_eq!(cold["pruned"], serde_json::json!([2]), "{cold}");
    assert_eq!(round_trips(&cold), 1, "cold no-op: {cold}");
    assert!(!fx.release(2).exists(), "release 2 pruned");
    assert_eq!(read_tree(&fx.current()), live);
    // The session ended cleanly: the next deploy takes the lock at once.
    let again = fx.deploy(&src, &["--keep", "1"]);
    assert_eq!(again["pruned"], serde_json::json!([]), "{again}");
    assert_eq!(round_trips(&again), 1, "{again}");
}

#[test]
fn a_no_op_expected_but_a_tampered_live_release_makes_a_new_one() {
    let (fx, src) = two_releases();
    let want = src.tree();
    // Someone edited the live release: it is not intact, so the deploy goes on after the
    // agent declined to end the session, and makes release 3 from the same tree: the first
    // round trip as for a no-op; stage (the edited file is resent); content, commit,
    // activate, prune and bye.
    std::fs::write(fx.current().join("a/f.txt"), "tampered\n").unwrap();
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["unchanged"], false, "{j}");
    assert_eq!(j["release"], 3, "{j}");
    assert_eq!(j["files"]["resent"], 1, "{j}");
    assert_eq!(round_trips(&j), 3, "{j}");
    assert_eq!(read_tree(&fx.current()), want);
}

#[test]
fn a_warm_upgrade_whose_live_release_was_edited_sends_what_the_stage_needs_after_all() {
    let (fx, src) = two_releases();
    // An unchanged file edited in the live release: the stage cannot link it and needs it
    // from the client, which sent only the files it changed. That content is dropped (nothing
    // is committed or made live with it); the deploy sends what the stage needs, then
    // commits, activates, prunes and ends: one round trip more than a warm upgrade.
    std::fs::write(fx.current().join("a/f.txt"), "tampered\n").unwrap();
    src.overwrite("a/b/c/d/e/f.txt", "edited once more\n");
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["release"], 3, "{j}");
    assert_eq!(j["previous"], 2, "{j}");
    assert_eq!(j["files"]["resent"], 1, "{j}");
    assert_eq!(round_trips(&j), 2, "{j}");
    assert_eq!(read_tree(&fx.current()), src.tree());
    assert_eq!(
        std::fs::read_to_string(fx.release(2).join("a/f.txt")).unwrap(),
        "tampered\n",
        "release 2 as it was found"
    );
    fx.flip(&["verify", fx.root_str()]).success();
}

#[test]
fn a_stage_ahead_against_a_release_no_longer_live_costs_one_round_trip_more() {
    let fx = Fx::new();
    let src = fx.src("src");
    deep_site(&src);
    fx.deploy(&src, &[]);
    let v1 = src.tree();
    site_v2(&src);
    fx.deploy(&src, &[]);
    // Another client (its own caches) makes release 1 live again: this one still expects
    // release 2's tree (its record).
    let other = fx.path("other-home");
    let other_cache = other.join(".cache");
    fx.flip_env(
        &[("HOME", s(&other)), ("XDG_CACHE_HOME", s(&other_cache))],
        &["rollback", fx.root_str()],
    )
    .success();
    let records = std::fs::read_dir(fx.home.join(".cache/flip/targets"))
        .expect("the client records what it made live")
        .count();
    assert_eq!(records, 1);
    src.overwrite("a/b/c/d/e/f.txt", "edited after the rollback\n");
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["release"], 3, "{j}");
    assert_eq!(j["previous"], 1, "{j}");
    assert_eq!(round_trips(&j), 3, "stale stage ahead: {j}");
    assert_eq!(read_tree(&fx.current()), src.tree());
    assert_eq!(read_tree(&fx.release(1)), v1, "release 1 untouched");
    fx.flip(&["verify", fx.root_str()]).success();
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
    // Handshake, lock, status, live check and probe (every directory at once); stage and
    // the signatures of the bases it offers; content, commit, activate, prune and bye.
    assert_eq!(cold["files"]["delta"], 1, "{cold}");
    assert_eq!(round_trips(&cold), 3, "cold upgrade: {cold}");
    assert_eq!(read_tree(&fx.current()), src.tree());
}

#[test]
fn a_dry_run_a_rollback_and_an_activation_take_few_round_trips() {
    let (fx, src) = two_releases();
    let dry = fx.deploy(&src, &["--dry-run"]);
    // Handshake and status; bye.
    assert_eq!(round_trips(&dry), 2, "dry run: {dry}");
    src.overwrite("small.txt", "changed again\n");
    // Without caches: handshake and status; the live manifest with bye.
    let cold = fx.deploy(&src, &["--dry-run", "--no-cache"]);
    assert_eq!(cold["files"]["changed"], 1, "{cold}");
    assert_eq!(round_trips(&cold), 2, "cold dry run: {cold}");
    assert_eq!(fx.current_link(), "releases/2");
    let back = fx
        .flip(&["rollback", "--json", fx.root_str()])
        .success()
        .json();
    assert_eq!(fx.current_link(), "releases/1");
    assert_eq!(round_trips(&back), 1, "rollback: {back}");
    let again = fx
        .flip(&["activate", "--json", fx.root_str(), "2"])
        .success()
        .json();
    assert_eq!(fx.current_link(), "releases/2");
    assert_eq!(round_trips(&again), 1, "activate: {again}");
}

/// A rollback or an activation by this client records the release it made live, as a deploy
/// does: the next deploy stages ahead against that release, in the 1 round trip of any warm
/// upgrade (3 against a stale record: see above).
#[test]
fn after_this_clients_rollback_or_activation_the_next_deploy_takes_one_round_trip() {
    let (fx, src) = two_releases();
    let root = fx.root_str();
    for (switch, live, release) in [
        (&["rollback", root][..], 1, 3),
        (&["activate", root, "2"][..], 2, 4),
    ] {
        fx.flip(switch).success();
        assert_eq!(fx.current_link(), format!("releases/{live}"));
        src.overwrite("a/b/c/d/e/f.txt", format!("edited after {}\n", switch[0]));
        let j = fx.deploy(&src, &[]);
        assert_eq!(
            (j["release"].as_u64(), j["previous"].as_u64()),
            (Some(release), Some(live))
        );
        assert_eq!(round_trips(&j), 1, "after {}: {j}", switch[0]);
        assert_eq!(read_tree(&fx.current()), src.tree());
    }
    fx.flip(&["verify", fx.root_str()]).success();
}

/// A warm upgrade sends its content before it reads any answer, while the agent answers the
/// stage with every file it needs: here 9,000 files of 2 KB names, an answer of 18 MB, more than
/// the pipes and the agent's output queue hold together. The agent holds its answers until it
/// has read the whole batch, so neither side waits for the other.
#[test]
fn a_warm_upgrade_whose_stage_answer_is_larger_than_every_buffer_does_not_wait_on_itself() {
    let fx = Fx::new();
    let src = fx.src("src");
    let long: Vec<String> = (0..8).map(|l| format!("{l}{}", "n".repeat(239))).collect();
    let name = |i: usize| format!("d{}/{}/{i}.php", i % 40, long.join("/"));
    for i in 0..9000 {
        src.file(&name(i), format!("<?php // {i} v1\n"), 0o644);
    }
    fx.deploy(&src, &[]);
    for i in 0..9000 {
        src.overwrite(&name(i), format!("<?php // {i} v2\n"));
    }
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["release"], 2, "{j}");
    assert_eq!(j["files"]["changed"], 9000, "{j}");
    assert_eq!(round_trips(&j), 1, "{j}");
    assert_eq!(read_tree(&fx.current()), src.tree());
}
