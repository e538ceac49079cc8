//! Fault injection through the real binary: a crash (`FLIP_FAULT=POINT` makes the process exit on
//! the spot, as a power cut or kill -9 would, in debug builds only) at every step of deploy,
//! activate, rollback and prune, and SIGKILL of the client or of its agent at many moments of a
//! deploy. After each: `current` names a release whose tree is one that was deployed, and it
//! verifies; every listed release is intact; the next deploy succeeds, cleans up every leftover,
//! and gets an id never handed out before.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

/// A target with releases 1, 2 and 3 (3 live), and the tree of each.
struct World {
    fx: Fx,
    src: Src,
    trees: BTreeMap<u64, Tree>,
}

fn version(src: &Src, n: u32) {
    src.file("small.txt", format!("small v{n}\n"), 0o644).file(
        &format!("added-{n}.txt"),
        format!("added in {n}\n"),
        0o644,
    );
    let mut big = src.read("big.bin");
    big[n as usize * 1000] ^= 0x5a;
    src.file("big.bin", big, 0o644);
}

fn world() -> World {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    let mut trees = BTreeMap::new();
    for n in 1..=3u32 {
        if n > 1 {
            version(&src, n);
        }
        let j = fx.deploy(&src, &["--keep", "10"]);
        assert_eq!(num(&j, "/release"), n as u64);
        trees.insert(n as u64, src.tree());
    }
    World { fx, src, trees }
}

impl World {
    /// The highest id the target ever handed out (directories, metadata and the counter).
    fn max_id_seen(&self) -> u64 {
        let mut max = self.fx.release_ids().last().copied().unwrap_or(0);
        for name in self.fx.release_leftovers() {
            if let Some(id) = name.rsplit('-').next().and_then(|s| s.parse().ok()) {
                max = max.max(id);
            }
        }
        for name in self.fx.meta_files() {
            if let Some(id) = name.split('.').next().and_then(|s| s.parse().ok()) {
                max = max.max(id);
            }
        }
        if let Ok(t) = fs::read_to_string(self.fx.root.join(".flip/next-id")) {
            if let Ok(next) = t.trim().parse::<u64>() {
                max = max.max(next - 1);
            }
        }
        max
    }

    /// What must hold after any crash: `current` names a release whose tree is `expected` (one
    /// of the trees the crashed command could have left live), which verifies; every release
    /// still listed is intact.
    #[track_caller]
    fn assert_consistent(&self, expected: &[&Tree], what: &str) {
        let fx = &self.fx;
        let live = fx.current_link();
        let live_tree = read_tree(&fx.current());
        assert!(
            expected.contains(&&live_tree),
            "{what}: current -> {live} holds a tree that was never deployed"
        );
        fx.flip(&["verify", fx.root_str()]).success();
        for (id, _) in fx.listed() {
            if let Some(t) = self.trees.get(&id) {
                assert_dir_eq(&fx.release(id), t, &format!("{what}: releases/{id}"));
            }
        }
    }

    /// The deploy after a crash: succeeds (waiting for a lock a dying agent may still hold),
    /// takes a fresh id, leaves nothing behind, and goes live.
    #[track_caller]
    fn assert_next_deploy_recovers(&mut self, before: u64, what: &str) {
        version(&self.src, 9);
        let j = self.fx.deploy(&self.src, &["--keep", "10", "--wait"]);
        let id = num(&j, "/release");
        assert!(
            id > before,
            "{what}: id {id} was handed out before (max {before})"
        );
        assert_eq!(self.fx.current_link(), format!("releases/{id}"));
        assert_dir_eq(&self.fx.current(), &self.src.tree(), what);
        assert!(
            self.fx.release_leftovers().is_empty(),
            "{what}: leftovers after the next deploy: {:?}",
            self.fx.release_leftovers()
        );
        let ids = self.fx.release_ids();
        for name in self.fx.meta_files() {
            let id: u64 = name.split('.').next().unwrap().parse().unwrap();
            assert!(ids.contains(&id), "{what}: metadata {name} of no release");
        }
        self.fx.flip(&["verify", self.fx.root_str()]).success();
    }
}

/// Runs `args` with `FLIP_FAULT=point`, which must be reached and must fail the command, except
/// in the cleanup after a deploy went live: then the deploy succeeded and says that pruning
/// failed.
#[track_caller]
fn crash(w: &World, point: &str, args: &[&str]) {
    let run = w.fx.flip_env(&[("FLIP_FAULT", point)], args);
    if args[0] == "deploy" && point.starts_with("prune-") {
        assert_eq!(run.code, 0, "{point}: the deploy is live\n{}", run.stderr);
        assert!(run.stderr.contains("pruning"), "{point}: {}", run.stderr);
    } else {
        assert_ne!(
            run.code, 0,
            "{point}: a crashed command must fail\n{}",
            run.stderr
        );
    }
    assert!(
        run.stderr.contains(&format!("FLIP_FAULT={point}")),
        "{point}: the fault point was not reached by flip {}:\n{}",
        args.join(" "),
        run.stderr
    );
}

/// A deploy of a fourth version with `--keep 2`, so that it also prunes releases 1 and 2.
fn crash_deploy(point: &str) {
    let mut w = world();
    version(&w.src, 4);
    let v4 = w.src.tree();
    let root = w.fx.root_str().to_string();
    crash(&w, point, &["deploy", w.src.s(), &root, "--keep", "2"]);
    let before = w.max_id_seen();
    assert!(before >= 3);
    w.assert_consistent(&[&w.trees[&3], &v4], point);
    w.assert_next_deploy_recovers(before, point);
}

#[test]
fn deploy_survives_a_crash_right_after_taking_the_lock() {
    crash_deploy("after-lock");
}

#[test]
fn deploy_survives_a_crash_right_after_taking_an_id() {
    crash_deploy("after-id");
}

#[test]
fn deploy_survives_a_crash_after_staging_links() {
    crash_deploy("after-stage");
}

#[test]
fn deploy_survives_a_crash_mid_transfer() {
    crash_deploy("mid-transfer");
}

#[test]
fn deploy_survives_a_crash_before_commit() {
    crash_deploy("before-commit");
}

#[test]
fn deploy_survives_a_crash_before_the_release_is_renamed_into_place() {
    crash_deploy("before-rename");
}

#[test]
fn deploy_survives_a_crash_after_the_release_is_renamed_into_place() {
    crash_deploy("after-rename");
}

#[test]
fn deploy_survives_a_crash_before_the_swap() {
    crash_deploy("before-swap");
}

#[test]
fn deploy_survives_a_crash_after_the_swap() {
    crash_deploy("after-swap");
}

/// A single-target deploy sends commit and activation in one batch, and the agent holds the
/// commit's answer until it has activated too (one write for the batch; locally, since frames
/// are gathered, the whole batch is one read): an agent dying in the swap is reported as
/// having died committing or activating, never as a failed commit of a release that went live.
#[test]
fn a_crash_in_the_swap_is_not_reported_as_a_failed_commit() {
    let w = world();
    version(&w.src, 4);
    let root = w.fx.root_str().to_string();
    let run = w.fx.flip_env(
        &[("FLIP_FAULT", "after-swap")],
        &["deploy", w.src.s(), &root],
    );
    assert_eq!(run.code, 6, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("protocol error while committing or activating the release: the agent ended the session"),
        "{}",
        run.stderr
    );
}

#[test]
fn deploy_survives_a_crash_while_pruning_after_moving_a_release_to_trash() {
    crash_deploy("prune-after-trash");
}

/// A prune that crashed right after renaming a release to trash (its metadata still there):
/// the next deploy's cleanup removes the trash's names of inodes that stay before deleting it,
/// and tells the link ledger their new state, so that deploy still links every unchanged file.
/// Before, the trash was deleted without a word to the ledger, and the files the pruned release
/// had shared were copied (content-checked) instead of linked, once.
#[test]
fn after_a_prune_crashed_at_the_trash_the_next_deploy_still_links() {
    let w = world();
    version(&w.src, 4);
    let root = w.fx.root_str().to_string();
    crash(
        &w,
        "prune-after-trash",
        &["deploy", w.src.s(), &root, "--keep", "2"],
    );
    assert!(
        w.fx.release_leftovers()
            .iter()
            .any(|n| n.starts_with(".trash-")),
        "{:?}",
        w.fx.release_leftovers()
    );
    version(&w.src, 9);
    let j = w.fx.deploy(&w.src, &["--keep", "10"]);
    assert_eq!(j["unchanged_copied"], 0, "{j}");
    assert!(num(&j, "/files/linked") > 0, "{j}");
    assert!(w.fx.release_leftovers().is_empty());
    w.fx.flip(&["verify", w.fx.root_str()]).success();
}

#[test]
fn deploy_survives_a_crash_while_pruning_after_forgetting_a_release() {
    crash_deploy("prune-after-forget");
}

fn crash_command(point: &str, args: &[&str], could_be_live: &[u64]) {
    let mut w = world();
    let root = w.fx.root_str().to_string();
    let mut full: Vec<&str> = vec![args[0], &root];
    full.extend_from_slice(&args[1..]);
    crash(&w, point, &full);
    let before = w.max_id_seen();
    let expected: Vec<&Tree> = could_be_live.iter().map(|id| &w.trees[id]).collect();
    w.assert_consistent(&expected, point);
    // Nothing the crashed command did may cost a release: all three are still listed.
    if args[0] != "prune" {
        assert_eq!(
            w.fx.listed()
                .into_iter()
                .map(|(id, _)| id)
                .collect::<Vec<_>>(),
            vec![1, 2, 3],
            "{point}"
        );
    }
    w.assert_next_deploy_recovers(before, point);
}

#[test]
fn rollback_survives_a_crash_after_taking_the_lock() {
    crash_command("after-lock", &["rollback"], &[3]);
}

#[test]
fn rollback_survives_a_crash_before_the_swap() {
    crash_command("before-swap", &["rollback"], &[3]);
}

#[test]
fn rollback_survives_a_crash_after_the_swap() {
    crash_command("after-swap", &["rollback"], &[2, 3]);
}

#[test]
fn activate_survives_a_crash_before_the_swap() {
    crash_command("before-swap", &["activate", "1"], &[3]);
}

#[test]
fn activate_survives_a_crash_after_the_swap() {
    crash_command("after-swap", &["activate", "1"], &[1, 3]);
}

#[test]
fn prune_survives_a_crash_after_moving_a_release_to_trash() {
    crash_command("prune-after-trash", &["prune", "--keep", "1"], &[3]);
}

#[test]
fn prune_survives_a_crash_after_forgetting_a_release() {
    crash_command("prune-after-forget", &["prune", "--keep", "1"], &[3]);
}

/// Waits (up to [`TIMEOUT`]) until process `pid` has exited (gone, or a zombie).
fn wait_exited(pid: u32) {
    let t0 = std::time::Instant::now();
    while !exited(pid) {
        assert!(
            t0.elapsed() < TIMEOUT,
            "agent {pid} still runs after {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILL of the client or of its agent at many moments of a deploy (a fixed spread over the
/// time a deploy takes here, so a run is reproducible in what it covers, if not in timing).
#[test]
fn sigkill_of_client_or_agent_at_any_moment_loses_nothing() {
    let mut w = world();
    let root = w.fx.root_str().to_string();
    // How long an uninterrupted deploy of a changed tree takes on this machine.
    version(&w.src, 5);
    let t0 = Instant::now();
    let j = w.fx.deploy(&w.src, &["--keep", "3"]);
    let took = t0.elapsed().max(Duration::from_millis(20));
    w.trees.insert(num(&j, "/release"), w.src.tree());

    let rounds = 16u32;
    let mut interrupted = 0;
    for round in 0..rounds {
        let live = read_tree(&w.fx.current());
        version(&w.src, 10 + round);
        w.src.file(
            &format!("round/{round}.bin"),
            noise(round as u64, 300_000),
            0o644,
        );
        let attempted = w.src.tree();
        let before = w.max_id_seen();
        let kill_agent = round % 2 == 1;
        let delay = took.mul_f64(f64::from(round / 2) / f64::from(rounds / 2) * 1.2);
        let run =
            w.fx.spawn(&[], &["deploy", w.src.s(), &root, "--keep", "3"]);
        let pid = run.pid();
        std::thread::sleep(delay);
        let agent = children(pid).first().copied();
        let victim = if kill_agent { agent } else { None }.unwrap_or(pid);
        // SAFETY: sending a signal to a process this test started (or its child).
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        let status = run.wait_any(TIMEOUT).expect("the deploy ends once killed");
        // An agent outliving its killed client goes on with what the client had sent (up to
        // the swap, when the commit, activation and prune were sent with the content): the
        // tree is read once it is done, not while `current` is being swapped under the walk.
        if let Some(a) = agent.filter(|&a| a != victim) {
            wait_exited(a);
        }
        if !status.success() {
            interrupted += 1;
        }
        let what = format!(
            "round {round}: SIGKILL of the {} after {delay:?}",
            if victim == pid { "client" } else { "agent" }
        );
        // A deploy killed after the swap may already be live: either tree is consistent.
        let fx = &w.fx;
        let live_now = read_tree(&fx.current());
        assert!(
            live_now == live || live_now == attempted,
            "{what}: current holds a tree that was never deployed"
        );
        fx.flip(&["verify", &root]).success();
        w.assert_next_deploy_recovers(before, &what);
        w.trees.clear();
    }
    // Most kills must land while the deploy runs, or this test proves little.
    assert!(
        interrupted >= rounds / 4,
        "only {interrupted} of {rounds} deploys were interrupted by the kill"
    );
}
