//! flip.toml environments and two-phase multi-host deploys, end to end through the binary:
//! local targets and real OpenSSH servers (flip_testkit::Sshd, two of them on their own ports),
//! all on this machine so every target's files are checked on disk.

mod common;

use common::*;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const FLIP: &str = env!("CARGO_BIN_EXE_flip");

/// `ROOT/current`'s link text.
fn link(root: &Path) -> String {
    fs::read_link(root.join("current"))
        .unwrap_or_else(|e| panic!("{}/current: {e}", root.display()))
        .to_str()
        .unwrap()
        .to_string()
}

/// Release ids and other names under ROOT/releases.
fn listing(root: &Path) -> (Vec<u64>, Vec<String>) {
    let mut ids = Vec::new();
    let mut other = Vec::new();
    for e in fs::read_dir(root.join("releases")).unwrap() {
        let n = e.unwrap().file_name().to_str().unwrap().to_string();
        match n.parse() {
            Ok(id) => ids.push(id),
            Err(_) => other.push(n),
        }
    }
    ids.sort_unstable();
    other.sort();
    (ids, other)
}

/// Writes flip.toml in the directory flip runs in (the fixture's temp dir).
fn write_config(fx: &Fx, text: &str) -> PathBuf {
    let p = fx.path("flip.toml");
    fs::write(&p, text).unwrap();
    p
}

/// `[env.prod]` with these targets, source "src".
fn env_config(fx: &Fx, targets: &[String], extra: &str) {
    let list: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
    write_config(
        fx,
        &format!(
            "source = \"src\"\n{extra}\n[env.prod]\ntargets = [{}]\n",
            list.join(", ")
        ),
    );
}

fn with(args: &[&str], extra: &[String]) -> Vec<String> {
    args.iter()
        .map(|a| a.to_string())
        .chain(extra.iter().cloned())
        .collect()
}

/// Environment `prod` of two local targets, `t1` and `t2` (`extra`: more of flip.toml), and
/// the source `src`: (the targets' roots, as named in flip.toml, the source).
fn two_targets(fx: &Fx, extra: &str) -> (Vec<PathBuf>, Vec<String>, Src) {
    let roots: Vec<PathBuf> = (1..=2).map(|i| fx.path(&format!("t{i}"))).collect();
    let targets: Vec<String> = roots.iter().map(|r| s(r).to_string()).collect();
    env_config(fx, &targets, extra);
    (roots, targets, fx.src("src"))
}

/// Deploys `prod` once per label, `index.php` saying `v1`, `v2`, ... in turn.
fn deploy_labels(fx: &Fx, src: &Src, labels: &[&str]) {
    for (v, label) in labels.iter().enumerate() {
        src.file("index.php", format!("v{}\n", v + 1), 0o644);
        fx.flip(&["deploy", "prod", "--label", label]).success();
    }
}

fn run(fx: &Fx, args: &[String]) -> Run {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    fx.flip(&a)
}

#[test]
fn an_environment_of_four_targets_goes_live_together_and_rolls_back_together() {
    let fx = Fx::new();
    let servers = Servers::start(&fx);
    let roots: Vec<PathBuf> = (1..=4).map(|i| fx.path(&format!("t{i}"))).collect();
    // Two local targets, and one on each SSH server.
    let targets = vec![
        s(&roots[0]).to_string(),
        s(&roots[1]).to_string(),
        format!("ssh://root@127.0.0.1:{}{}", servers.a.port(), s(&roots[2])),
        format!("ssh://root@127.0.0.1:{}{}", servers.b.port(), s(&roots[3])),
    ];
    env_config(&fx, &targets, "keep = 5");
    let src = fx.src("src");
    site_v1(&src);
    let v1 = src.tree();
    let ssh = servers.args();

    let r = run(
        &fx,
        &with(&["deploy", "prod", "--json", "--label", "v1"], &ssh),
    )
    .success();
    let j = r.json();
    assert_eq!(hosts(&j).len(), 4, "{j}");
    for (h, t) in hosts(&j).iter().zip(&targets) {
        assert_eq!(h["state"], "live", "{h}");
        assert_eq!(h["release"], 1, "{h}");
        assert_eq!(h["label"], "v1", "{h}");
        assert_eq!(h["activated"], true, "{h}");
        assert_eq!(h["unchanged"], false, "{h}");
        assert!(h["files"]["total"].as_u64().unwrap() > 0, "{h}");
        assert!(h["bytes"]["sent"].as_u64().unwrap() > 0, "{h}");
        let shown = h["target"].as_str().unwrap();
        assert!(
            t.ends_with(shown.rsplit(':').next().unwrap()),
            "{shown} vs {t}"
        );
    }
    assert_eq!(j["summary"]["ok"], true, "{j}");
    assert_eq!(j["summary"]["live"], 4, "{j}");
    assert_eq!(j["summary"]["label"], "v1", "{j}");
    for root in &roots {
        assert_eq!(link(root), "releases/1");
        assert_dir_eq(&root.join("current"), &v1, "v1 on every target");
    }

    site_v2(&src);
    let v2 = src.tree();
    run(&fx, &with(&["deploy", "prod", "--label", "v2"], &ssh)).success();
    for root in &roots {
        assert_eq!(link(root), "releases/2");
        assert_dir_eq(&root.join("current"), &v2, "v2 on every target");
    }

    // One table across targets, a row per label.
    let j = run(&fx, &with(&["releases", "prod", "--json"], &ssh))
        .success()
        .json();
    let rows = j.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{j}");
    assert_eq!(rows[0]["label"], "v1");
    assert_eq!(rows[1]["label"], "v2");
    for r in rows[1]["releases"].as_array().unwrap() {
        assert_eq!(r["id"], 2, "{j}");
        assert_eq!(r["current"], true, "{j}");
    }
    let table = run(&fx, &with(&["releases", "prod"], &ssh)).success();
    assert!(
        table.stdout.contains("v1") && table.stdout.contains("2*"),
        "{}",
        table.stdout
    );

    // Rollback moves every target to the previous label's releases.
    let j = run(&fx, &with(&["rollback", "prod", "--json"], &ssh))
        .success()
        .json();
    for h in hosts(&j) {
        assert_eq!(h["release"], 1, "{j}");
        assert_eq!(h["previous"], 2, "{j}");
        assert_eq!(h["label"], "v1", "{j}");
    }
    for root in &roots {
        assert_eq!(link(root), "releases/1");
        assert_dir_eq(&root.join("current"), &v1, "v1 again after the rollback");
    }
    // And `activate ENV LABEL` forward again.
    run(&fx, &with(&["activate", "prod", "v2"], &ssh)).success();
    for root in &roots {
        assert_eq!(link(root), "releases/2");
    }
    // Verify and prune act on every target.
    let j = run(&fx, &with(&["verify", "prod", "--json"], &ssh))
        .success()
        .json();
    assert!(hosts(&j).iter().all(|h| h["ok"] == true), "{j}");
    let j = run(
        &fx,
        &with(&["prune", "prod", "--json", "--keep", "1"], &ssh),
    )
    .success()
    .json();
    assert_eq!(hosts(&j).len(), 4, "{j}");
}

#[test]
fn a_target_failing_in_phase_1_leaves_every_target_unchanged_with_no_staging() {
    let fx = Fx::new();
    let roots: Vec<PathBuf> = (1..=3).map(|i| fx.path(&format!("t{i}"))).collect();
    let good: Vec<String> = roots.iter().map(|r| s(r).to_string()).collect();
    env_config(&fx, &good, "");
    let src = fx.src("src");
    site_v1(&src);
    let v1 = src.tree();
    fx.flip(&["deploy", "prod"]).success();

    // A fourth target that is a regular file.
    let bad = fx.path("not-a-dir");
    fs::write(&bad, "a file").unwrap();
    let mut all = good.clone();
    all.insert(1, s(&bad).to_string());
    env_config(&fx, &all, "");
    site_v2(&src);
    let r = fx.flip(&["deploy", "prod", "--json"]).code(10);
    let j = r.json();
    let h = hosts(&j);
    assert_eq!(h.len(), 4, "{j}");
    assert_eq!(h[1]["state"], "failed", "{j}");
    assert_eq!(h[1]["target"], s(&bad), "{j}");
    assert!(
        h[1]["error"]["message"].as_str().unwrap().contains(s(&bad)),
        "the error names the target: {j}"
    );
    assert_eq!(h[1]["error"]["code"], 5, "{j}");
    for i in [0, 2, 3] {
        assert_eq!(h[i]["state"], "discarded", "{j}");
        assert_eq!(h[i]["live"], 1, "{j}");
    }
    assert_eq!(j["summary"]["ok"], false, "{j}");
    for root in &roots {
        assert_eq!(link(root), "releases/1", "no target was activated");
        assert_dir_eq(&root.join("current"), &v1, "the live release is intact");
        assert_eq!(
            listing(root),
            (vec![1], vec![]),
            "no staging and no committed release left on {}",
            root.display()
        );
    }
    assert_eq!(fs::read(&bad).unwrap(), b"a file");

    // Humans get the failing target named, and the same exit code.
    let r = fx.flip(&["deploy", "prod"]).code(10);
    assert!(r.stderr.contains(s(&bad)), "{}", r.stderr);
    assert!(
        r.stderr.contains("FAILED on 1 of 4 targets"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_activation_failing_in_phase_2_switches_the_others_back() {
    let fx = Fx::new();
    let roots: Vec<PathBuf> = (1..=3).map(|i| fx.path(&format!("t{i}"))).collect();
    let targets: Vec<String> = roots.iter().map(|r| s(r).to_string()).collect();
    env_config(&fx, &targets, "");
    let src = fx.src("src");
    site_v1(&src);
    let v1 = src.tree();
    fx.flip(&["deploy", "prod"]).success();

    site_v2(&src);
    // The agent of the middle target dies right before its swap (debug builds only).
    let r = fx
        .flip_env(
            &[
                ("FLIP_FAULT", "before-swap"),
                ("FLIP_FAULT_ROOT", s(&roots[1])),
            ],
            &["deploy", "prod", "--json"],
        )
        .code(10);
    let j = r.json();
    let h = hosts(&j);
    assert_eq!(h[1]["state"], "failed", "{j}");
    assert_eq!(h[0]["state"], "switched_back", "{j}");
    assert_eq!(h[2]["state"], "switched_back", "{j}");
    for host in h {
        assert_eq!(
            host["live"], 1,
            "the report says which release is live: {j}"
        );
    }
    for root in &roots {
        assert_eq!(link(root), "releases/1");
        assert_dir_eq(&root.join("current"), &v1, "v1 is live again everywhere");
    }
    for root in [&roots[0], &roots[2]] {
        assert_eq!(
            listing(root).0,
            vec![1],
            "the switched-back release is discarded"
        );
    }
    // An agent that dies right after its swap: the client sees the failure, finds the new
    // release live there through a new session, and switches that target back too.
    let r = fx
        .flip_env(
            &[
                ("FLIP_FAULT", "after-swap"),
                ("FLIP_FAULT_ROOT", s(&roots[2])),
            ],
            &["deploy", "prod", "--json"],
        )
        .code(10);
    let j = r.json();
    assert_eq!(hosts(&j)[2]["state"], "failed", "{j}");
    for root in &roots {
        assert_eq!(link(root), "releases/1", "{j}");
        assert_dir_eq(&root.join("current"), &v1, "v1 is live everywhere");
    }
    // The next deploy goes through.
    let v2 = src.tree();
    fx.flip(&["deploy", "prod"]).success();
    for root in &roots {
        assert_dir_eq(&root.join("current"), &v2, "v2 everywhere");
    }
}

/// Holds `ROOT/.flip/lock` (flock) for `secs` in the background, as another deploy would.
fn hold_lock(root: &Path, secs: u32) -> std::process::Child {
    let c = std::process::Command::new("flock")
        .arg(root.join(".flip/lock"))
        .args(["sleep", &secs.to_string()])
        .spawn()
        .expect("flock(1) from util-linux");
    std::thread::sleep(Duration::from_millis(300));
    c
}

/// Whether `ROOT/.flip/lock` is free now (taken and let go at once, never waited for).
fn lock_is_free(root: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(root.join(".flip/lock")).expect("lock file");
    // SAFETY: flock on a descriptor we own; closing it lets go.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Once `running` says it waits for a lock, the lock of `later` (a target named after the
/// one waited for) is let go within 5 s.
fn waits_holding_no_later_lock(running: &Running, later: &Path) {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while !running.stderr_so_far().contains("is locked by") {
        assert!(std::time::Instant::now() < until, "it never waited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !lock_is_free(later) {
        assert!(
            std::time::Instant::now() < until,
            "{} stayed locked while it waited",
            later.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `flip deploy prod --wait --json` while t1 (`roots[0]`) is locked for 10 s (the holder's
/// `sleep` keeps the lock however `flock` ends): t2's lock, taken with t1's wait (in parallel),
/// is let go at once, long before t1 is free, and nothing is made on t2 meanwhile; then the
/// deploy goes through (exit 0).
fn deploy_prod_waiting_for_t1(fx: &Fx, roots: &[PathBuf]) -> Run {
    let mut holder = hold_lock(&roots[0], 10);
    let running = fx.spawn(&[], &["deploy", "prod", "--wait", "--json"]);
    waits_holding_no_later_lock(&running, &roots[1]);
    assert_eq!(listing(&roots[1]), (vec![1], vec![]), "nothing made on t2");
    holder.wait().unwrap();
    let r = running.finish(Duration::from_secs(60));
    assert_eq!(r.code, 0, "{}", r.stderr);
    r
}

/// Two deploys that share targets, both waiting (`--wait`), could each hold one target and
/// wait for the other's lock for ever. A deploy now waits for a target's lock only while it
/// holds none of a target named after it: with t1 busy, the deploy that took t2 lets go of it
/// while it waits for t1 (a deploy waiting for t2 could have held t1), then deploys both.
#[test]
fn a_deploy_waiting_for_a_lock_holds_no_lock_of_a_target_named_after_it() {
    let fx = Fx::new();
    let (roots, _, src) = two_targets(&fx, "");
    site_v1(&src);
    fx.flip(&["deploy", "prod"]).success();
    site_v2(&src);
    let r = deploy_prod_waiting_for_t1(&fx, &roots);
    let j: Value = serde_json::from_str(&r.stdout).unwrap();
    for (h, root) in hosts(&j).iter().zip(&roots) {
        assert_eq!(h["state"], "live", "{j}");
        assert_dir_eq(&root.join("current"), &src.tree(), "v2 everywhere");
    }
}

/// The order is the targets' own, not their spellings': with t1 named through a symlink
/// (`z-link`, a name after t2's), the deploy waiting for t1 still holds no lock of t2. Ranked
/// by the names given, it held t2 while it waited, and a deploy naming t1 as `t1` could have
/// held t1 while it waited for t2, each for ever.
#[test]
fn targets_are_locked_in_one_order_however_they_are_named() {
    let fx = Fx::new();
    let roots: Vec<PathBuf> = (1..=2).map(|i| fx.path(&format!("t{i}"))).collect();
    let alias = fx.path("z-link");
    std::os::unix::fs::symlink(&roots[0], &alias).unwrap();
    let src = fx.src("src");
    site_v1(&src);
    for root in &roots {
        fx.flip(&["deploy", src.s(), s(root), "--mkpath"]).success();
    }
    env_config(&fx, &[s(&alias).to_string(), s(&roots[1]).to_string()], "");
    site_v2(&src);
    deploy_prod_waiting_for_t1(&fx, &roots);
    for root in &roots {
        // A new release (the attempt that gave way may have used an id on t2).
        let newest = *listing(root).0.last().unwrap();
        assert!(newest > 1);
        assert_eq!(link(root), format!("releases/{newest}"));
        assert_dir_eq(&root.join("current"), &src.tree(), "v2 everywhere");
    }
}

/// In flip.toml a local target's `~` is the home, and a relative one is relative to the file
/// (as `source` is) wherever flip runs: `~/app` was a directory literally named `~` in the
/// working directory (made so with `--mkpath`), and `../t2` depended on where flip ran.
#[test]
fn local_targets_in_flip_toml_expand_the_home_and_are_relative_to_the_file() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    fs::create_dir_all(fx.path("conf")).unwrap();
    fs::write(
        fx.path("conf/flip.toml"),
        "source = \"../src\"\n[env.prod]\ntargets = [\"~/app\", \"../t2\"]\n",
    )
    .unwrap();
    // Run from the fixture's directory, not the file's.
    fx.flip(&["deploy", "prod", "--config", "conf/flip.toml", "--mkpath"])
        .success();
    for root in [fx.home.join("app"), fx.path("t2")] {
        assert_eq!(link(&root), "releases/1", "{}", root.display());
        assert_dir_eq(&root.join("current"), &src.tree(), "deployed");
    }
    assert!(!fx.path("~").exists() && !fx.path("conf/~").exists());
    let j = fx
        .flip(&["releases", "prod", "--config", "conf/flip.toml", "--json"])
        .success()
        .json();
    assert_eq!(j[0]["releases"].as_array().unwrap().len(), 2, "{j}");
}

/// A label deployed where the tree was live already (no release made there, so the label is
/// recorded only on the other targets) still names a release there: the one of the same tree.
/// `activate ENV LABEL` and `rollback ENV` failed on that target ("no release labelled"), and
/// `flip releases ENV` showed no release of the label there, after a deploy that said "live on
/// all targets".
#[test]
fn a_label_deployed_where_the_tree_was_live_names_that_release() {
    let fx = Fx::new();
    let (roots, targets, src) = two_targets(&fx, "");
    site_v1(&src);
    let v1 = src.tree();
    // t1 gets the tree first, without a label.
    fx.flip(&["deploy", src.s(), &targets[0]]).success();
    let j = fx
        .flip(&["deploy", "prod", "--label", "v1", "--json"])
        .success()
        .json();
    assert_eq!(hosts(&j)[0]["state"], "unchanged", "{j}");
    assert_eq!(hosts(&j)[1]["state"], "live", "{j}");
    site_v2(&src);
    fx.flip(&["deploy", "prod", "--label", "v2"]).success();
    let j = fx.flip(&["releases", "prod", "--json"]).success().json();
    let row = j
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["label"] == "v1")
        .unwrap_or_else(|| panic!("{j}"));
    let ids: Vec<u64> = row["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 1], "{j}");
    fx.flip(&["rollback", "prod"]).success();
    for root in &roots {
        assert_eq!(link(root), "releases/1");
    }
    fx.flip(&["activate", "prod", "v2"]).success();
    fx.flip(&["activate", "prod", "v1"]).success();
    for root in &roots {
        assert_eq!(link(root), "releases/1");
        assert_dir_eq(&root.join("current"), &v1, "v1");
    }
}

/// Release ids are per target: `flip verify ENV ID` checked release ID of each target, a
/// different release on each; it is refused (exit 2), as `rollback ENV --to ID` is.
#[test]
fn verify_of_an_environment_takes_no_release_id() {
    let fx = Fx::new();
    let (_, _, src) = two_targets(&fx, "");
    site_v1(&src);
    fx.flip(&["deploy", "prod"]).success();
    fx.flip(&["verify", "prod", "1"])
        .code(2)
        .stderr_has("release ids differ between targets");
    fx.flip(&["verify", "prod"]).success();
}

/// `flip rollback ENV --wait` locks in the same order: waiting for t1, it holds no lock of t2.
#[test]
fn an_environment_rollback_waiting_for_a_lock_holds_no_lock_of_a_target_named_after_it() {
    let fx = Fx::new();
    let (roots, _, src) = two_targets(&fx, "");
    deploy_labels(&fx, &src, &["v1", "v2"]);
    let mut holder = hold_lock(&roots[0], 10);
    let running = fx.spawn(&[], &["rollback", "prod", "--wait"]);
    waits_holding_no_later_lock(&running, &roots[1]);
    assert_eq!(link(&roots[1]), "releases/2", "nothing moved on t2");
    holder.wait().unwrap();
    let r = running.finish(Duration::from_secs(60));
    assert_eq!(r.code, 0, "{}", r.stderr);
    for root in &roots {
        assert_eq!(link(root), "releases/1");
    }
}

/// The case itself: environments `prod` (t1, t2) and `back` (t2, t1) deployed at once, both
/// waiting, while t2 is busy: both end, one after the other. Before, each could take one
/// target and wait for the other's lock for ever.
#[test]
fn two_waiting_deploys_of_environments_sharing_targets_both_end() {
    let fx = Fx::new();
    let (roots, targets, src) = two_targets(&fx, "");
    let both = |order: [&String; 2]| format!("[{:?}, {:?}]", order[0], order[1]);
    write_config(
        &fx,
        &format!(
            "source = \"src\"\n[env.prod]\ntargets = {}\n[env.back]\ntargets = {}\n",
            both([&targets[0], &targets[1]]),
            both([&targets[1], &targets[0]])
        ),
    );
    site_v1(&src);
    fx.flip(&["deploy", "prod"]).success();
    for round in 0..2 {
        src.file("index.php", format!("round {round}\n"), 0o644);
        let mut holder = hold_lock(&roots[1], 2);
        let runs: Vec<_> = ["prod", "back"]
            .iter()
            .map(|env| fx.spawn(&[], &["deploy", env, "--wait"]))
            .collect();
        holder.wait().unwrap();
        for r in runs {
            let r = r.finish(Duration::from_secs(60));
            assert_eq!(r.code, 0, "round {round}: {}", r.stderr);
        }
        for root in &roots {
            assert_dir_eq(&root.join("current"), &src.tree(), "both targets");
        }
    }
}

#[test]
fn parallel_1_works_on_one_target_at_a_time() {
    let fx = Fx::new();
    let (roots, _, src) = two_targets(&fx, "");
    site_v1(&src);
    fx.flip(&["deploy", "prod"]).success();

    // The first target is locked for a while: with --parallel 1 the second is not touched
    // until the first is done.
    site_v2(&src);
    let mut holder = hold_lock(&roots[0], 3);
    let running = fx.spawn(&[], &["deploy", "prod", "--wait", "--parallel", "1"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        listing(&roots[1]),
        (vec![1], vec![]),
        "t2 untouched while t1 waits"
    );
    holder.wait().unwrap();
    running.finish(TIMEOUT).success();
    assert_eq!(link(&roots[1]), "releases/2");

    // By default every target works at once: t1 is committed while t2 waits for its lock.
    // (Not the other way round: waiting for t1's lock, the deploy would let go of t2's, named
    // after it: see `a_deploy_waiting_for_a_lock_holds_no_lock_of_a_target_named_after_it`.)
    src.overwrite("index.html", "<h1>three</h1>\n");
    let mut holder = hold_lock(&roots[1], 3);
    let running = fx.spawn(&[], &["deploy", "prod", "--wait"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        listing(&roots[0]).0,
        vec![1, 2, 3],
        "t1 committed while t2 waits"
    );
    assert_eq!(
        link(&roots[0]),
        "releases/2",
        "but not activated before t2 is ready"
    );
    holder.wait().unwrap();
    running.finish(TIMEOUT).success();
    assert_eq!(link(&roots[0]), "releases/3");
    assert_eq!(link(&roots[1]), "releases/3");
}

#[test]
fn config_errors_name_the_file_line_and_key() {
    let fx = Fx::new();
    let file = fx.path("flip.toml");
    let cases: &[(&str, &str)] = &[
        ("source = \"src\"\nkeep = 5\nkep = 3\n", "flip.toml:3: kep"),
        ("source = \"src\"\nkeep = \"five\"\n", "flip.toml:2: keep"),
        (
            "source = \"src\"\n\n[env.prod]\ntargets = [\"/x\"]\nkeep = -1\n",
            "flip.toml:5: env.prod.keep",
        ),
        (
            "source = \"src\"\n[env.prod]\ntargets = \"/x\"\n",
            "flip.toml:3: env.prod.targets",
        ),
        ("[env.prod]\nkeep = 3\n", "flip.toml:1: env.prod"),
        (
            "[env.prod]\ntargets = [\"/x\"]\nhosts = [\"/y\"]\n",
            "flip.toml:3: env.prod.hosts",
        ),
        // An environment's bad name or empty targets: the line of the name or of the key,
        // however the table is written (all said line 1 but a plain `[env."NAME"]` header's,
        // and an empty `targets` the header's line).
        (
            "source = \"src\"\n[env.\"a b\"]\ntargets = [\"/x\"]\n",
            "flip.toml:2: env.\"a b\": an environment's name is letters",
        ),
        (
            "source = \"src\"\n\n[ env . 'a b' ]\ntargets = [\"/x\"]\n",
            "flip.toml:3: env.\"a b\": an environment's name is letters",
        ),
        (
            "source = \"src\"\nenv.\"a b\".targets = [\"/x\"]\n",
            "flip.toml:2: env.\"a b\": an environment's name is letters",
        ),
        (
            "source = \"src\"\n[env.prod]\nkeep = 3\ntargets = []\n",
            "flip.toml:4: env.prod.targets: an environment needs at least one target",
        ),
    ];
    for (text, want) in cases {
        fs::write(&file, text).unwrap();
        let r = fx.flip(&["deploy", "prod"]).code(2);
        assert!(
            r.stderr.contains(s(&file).trim_end_matches("flip.toml")) && r.stderr.contains(want),
            "{text:?}: want {want:?} in: {}",
            r.stderr
        );
    }
    // Missing targets name the key; an unknown environment names the file and the key.
    fs::write(&file, "[env.prod]\nkeep = 3\n").unwrap();
    fx.flip(&["deploy", "prod"]).code(2).stderr_has("targets");
    fs::write(&file, "source = \"src\"\n[env.prod]\ntargets = [\"/x\"]\n").unwrap();
    fx.flip(&["deploy", "staging"])
        .code(2)
        .stderr_has("flip.toml: env.staging: no such environment (the file defines: prod)");
    // --config FILE, and a JSON error object.
    let other = fx.path("other.toml");
    fs::write(&other, "keep = true\n").unwrap();
    let r = fx
        .flip(&["deploy", "prod", "--json", "--config", s(&other)])
        .code(2);
    assert!(r.stderr.contains("other.toml:1: keep"), "{}", r.stderr);
    assert_eq!(r.json()["error"]["code"], 2);
}

#[test]
fn settings_take_the_flag_then_the_environment_then_the_top_level_then_the_default() {
    let fx = Fx::new();
    let root = fx.path("t1");
    write_config(
        &fx,
        &format!(
            "source = \"src\"\nkeep = 7\nparallel = 2\nexclude = [\"*.log\"]\n\n[env.prod]\ntargets = [{:?}]\nkeep = 1\n\n[env.staging]\ntargets = [{:?}]\n",
            s(&root),
            s(&root)
        ),
    );
    let j = fx.flip(&["config", "prod", "--json"]).success().json();
    assert_eq!(j["keep"], 1, "{j}");
    assert_eq!(j["from"]["keep"], "environment table", "{j}");
    assert_eq!(j["parallel"], 2, "{j}");
    assert_eq!(j["from"]["parallel"], "top level", "{j}");
    assert_eq!(j["exclude"][0], "*.log", "{j}");
    assert_eq!(
        j["source"],
        s(&fx.path("src")),
        "source is relative to the file: {j}"
    );
    let j = fx.flip(&["config", "staging", "--json"]).success().json();
    assert_eq!(j["keep"], 7, "{j}");
    assert_eq!(j["compress_level"], Value::Null, "{j}");
    assert_eq!(j["from"]["compress_level"], "default", "{j}");
    let text = fx.flip(&["config", "prod"]).success().stdout;
    assert!(text.contains("keep = 1  # environment table"), "{text}");

    // Deploys really use them: env keep = 1 keeps the live release and the rollback target;
    // the top level's exclude leaves *.log out; --keep overrides both.
    let src = fx.src("src");
    for i in 0..3 {
        src.file("index.php", format!("<?php echo {i};\n"), 0o644);
        src.file("debug.log", "noise", 0o644);
        fx.flip(&["deploy", "prod"]).success();
    }
    assert_eq!(listing(&root).0, vec![2, 3]);
    assert!(
        !root.join("current/debug.log").exists(),
        "excluded by the top level"
    );
    src.file("index.php", "<?php echo 9;\n", 0o644);
    fx.flip(&["deploy", "prod", "--keep", "5"]).success();
    assert_eq!(listing(&root).0, vec![2, 3, 4]);
    // `flip deploy SRC TARGET` keeps working next to a flip.toml, and without one.
    let other = fx.path("t2");
    fx.flip(&["deploy", src.s(), s(&other)]).success();
    fs::remove_file(fx.path("flip.toml")).unwrap();
    let other3 = fx.path("t3");
    fx.flip(&["deploy", src.s(), s(&other3)]).success();
    assert!(other3.join("current/index.php").exists());
    fx.flip(&["deploy", "prod"])
        .code(2)
        .stderr_has("no flip.toml here");
}

#[test]
fn init_writes_a_starter_that_parses() {
    let fx = Fx::new();
    fx.flip(&["init"]).success();
    let text = fs::read_to_string(fx.path("flip.toml")).unwrap();
    assert!(text.contains("[env.prod]") && text.contains("# "), "{text}");
    let j = fx.flip(&["config", "prod", "--json"]).success().json();
    assert_eq!(j["targets"].as_array().unwrap().len(), 2, "{j}");
    assert_eq!(j["shared_dirs"], serde_json::json!(["storage"]), "{j}");
    assert_eq!(j["shared_files"], serde_json::json!([".env"]), "{j}");
    // The commented hooks parse too once uncommented.
    let hooks: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with("before_activate =")
                    || rest.starts_with("    ")
                    || rest.starts_with(']')
                    || rest.starts_with("after_activate")
                    || rest.starts_with("rollback_on_failure") =>
            {
                rest.to_string()
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(fx.path("flip.toml"), &hooks).unwrap();
    let j = fx.flip(&["config", "prod", "--json"]).success().json();
    assert_eq!(
        j["before_activate"].as_array().unwrap().len(),
        2,
        "{hooks}\n{j}"
    );
    assert_eq!(j["rollback_on_failure"], true, "{j}");
    fs::write(fx.path("flip.toml"), &text).unwrap();
    fx.flip(&["init"]).code(2).stderr_has("exists already");
    // The starter deploys a Laravel-shaped app as it is: .env excluded, so shared/.env starts
    // empty; local logs stay out of the seed.
    let src = fx.path("app");
    fs::create_dir_all(src.join("storage/logs")).unwrap();
    fs::write(src.join("storage/logs/laravel.log"), "local\n").unwrap();
    fs::write(src.join(".env"), "APP_KEY=local\n").unwrap();
    fs::write(src.join("index.php"), "<?php\n").unwrap();
    fs::rename(fx.path("flip.toml"), src.join("flip.toml")).unwrap();
    let cfg = src.join("flip.toml");
    fx.flip(&["--config", s(&cfg), "deploy", s(&src), fx.root_str()])
        .success();
    assert_eq!(fs::read(fx.root.join("shared/.env")).unwrap(), b"");
    assert!(fx.root.join("shared/storage/logs").is_dir());
    assert!(!fx.root.join("shared/storage/logs/laravel.log").exists());
    assert!(fx.root.join("current/bootstrap/cache").is_dir());
}

#[test]
fn an_unchanged_tree_makes_no_release() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    fx.deploy(&src, &[]);
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["unchanged"], true, "{j}");
    assert_eq!(j["release"], 1, "{j}");
    assert_eq!(j["activated"], true, "{j}");
    assert_eq!(fx.release_ids(), vec![1]);
    let r = fx.flip(&["deploy", src.s(), fx.root_str()]).success();
    assert!(
        r.stderr.contains("unchanged, release 1 is live"),
        "{}",
        r.stderr
    );
    assert_eq!(fx.release_ids(), vec![1]);

    // --force-release makes one anyway.
    let j = fx.deploy(&src, &["--force-release"]);
    assert_eq!(j["unchanged"], false, "{j}");
    assert_eq!(j["release"], 2, "{j}");
    assert_eq!(fx.current_link(), "releases/2");

    // A live release altered behind flip's back is not "unchanged": a new release repairs it.
    let victim = fx.current().join("index.html");
    let expected = src.tree();
    fs::remove_file(&victim).unwrap();
    fs::write(&victim, "tampered").unwrap();
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["unchanged"], false, "{j}");
    assert_eq!(j["release"], 3, "{j}");
    assert_dir_eq(&fx.current(), &expected, "repaired");

    // An environment whose targets are all unchanged: exit 0, every host unchanged.
    env_config(&fx, &[fx.root_str().to_string()], "");
    let j = fx.flip(&["deploy", "prod", "--json"]).success().json();
    assert_eq!(hosts(&j)[0]["unchanged"], true, "{j}");
    assert_eq!(hosts(&j)[0]["release"], 3, "{j}");
    assert_eq!(j["summary"]["unchanged"], true, "{j}");
}

#[test]
fn progress_lines_only_on_a_terminal() {
    let fx = Fx::new();
    let (_, targets, src) = two_targets(&fx, "");
    site_v1(&src);
    // Not a terminal: no progress lines, only the summary.
    let r = fx.flip(&["deploy", "prod"]).success();
    assert!(!r.stderr.contains("staging and sending"), "{}", r.stderr);
    assert!(
        !r.stderr
            .lines()
            .any(|l| l.contains(&targets[0]) && l.ends_with("  live")),
        "{}",
        r.stderr
    );
    // Under a pseudo-terminal (script(1)): one line per target.
    site_v2(&src);
    let cmd = format!("{FLIP} deploy prod");
    let r = fx.flip_env(&[], &["--version"]);
    assert_eq!(r.code, 0);
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(fx.path(""))
        .env("HOME", &fx.home)
        .env("XDG_CACHE_HOME", fx.home.join(".cache"))
        .env("TERM", "xterm")
        .output()
        .expect("script(1) from util-linux");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for t in &targets {
        assert!(
            text.lines()
                .any(|l| l.contains(t.as_str()) && l.contains("live")),
            "a progress line for {t}: {text}"
        );
    }
    assert!(text.contains("live on all 2 targets"), "{text}");
}

#[test]
fn an_environment_staged_without_activation_succeeds_and_activates_by_label_later() {
    let fx = Fx::new();
    let (roots, _, src) = two_targets(&fx, "");
    site_v1(&src);
    fx.flip(&["deploy", "prod", "--label", "v1"]).success();
    site_v2(&src);
    let j = fx
        .flip(&["deploy", "prod", "--label", "v2", "--no-activate", "--json"])
        .success()
        .json();
    assert!(hosts(&j).iter().all(|h| h["state"] == "staged"), "{j}");
    assert_eq!(j["summary"]["ok"], true, "{j}");
    for root in &roots {
        assert_eq!(link(root), "releases/1");
    }
    fx.flip(&["activate", "prod", "v2"]).success();
    for root in &roots {
        assert_eq!(link(root), "releases/2");
    }
    // A label no target has: nothing moves, the error names the target (exit 10), and each
    // target's own code is a target problem (5), as for one target, not a usage error.
    let r = fx.flip(&["activate", "prod", "v9"]).code(10);
    assert!(
        r.stderr.contains("no release labelled \"v9\""),
        "{}",
        r.stderr
    );
    let j = fx
        .flip(&["activate", "prod", "v9", "--json"])
        .code(10)
        .json();
    assert!(hosts(&j).iter().all(|h| h["error"]["code"] == 5), "{j}");
    for root in &roots {
        assert_eq!(link(root), "releases/2");
    }
}

#[test]
fn a_dry_run_of_an_environment_reports_every_target_and_changes_none() {
    let fx = Fx::new();
    let (roots, targets, src) = two_targets(&fx, "");
    site_v1(&src);
    fx.flip(&["deploy", "prod"]).success();
    site_v2(&src);
    let j = fx
        .flip(&["deploy", "prod", "--dry-run", "--json"])
        .success()
        .json();
    assert_eq!(hosts(&j).len(), 2, "{j}");
    for (h, t) in hosts(&j).iter().zip(&targets) {
        assert_eq!(h["dry_run"], true, "{h}");
        assert_eq!(h["target"], t.as_str(), "{h}");
        assert_eq!(h["live"], 1, "{h}");
        assert!(h["files"]["changed"].as_u64().unwrap() > 0, "{h}");
    }
    for root in &roots {
        assert_eq!(
            listing(root),
            (vec![1], vec![]),
            "a dry run changes nothing"
        );
    }
}

#[test]
fn an_unreachable_or_locked_target_stops_the_whole_environment() {
    let fx = Fx::new();
    let roots: Vec<PathBuf> = (1..=2).map(|i| fx.path(&format!("t{i}"))).collect();
    let mut targets: Vec<String> = roots.iter().map(|r| s(r).to_string()).collect();
    env_config(&fx, &targets, "");
    let src = fx.src("src");
    site_v1(&src);
    fx.flip(&["deploy", "prod"]).success();
    site_v2(&src);

    // Locked by another deploy (no --wait): exit 10, the holder's target named, nothing moves.
    let mut holder = hold_lock(&roots[1], 5);
    let j = fx.flip(&["deploy", "prod", "--json"]).code(10).json();
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(hosts(&j)[1]["state"], "failed", "{j}");
    assert_eq!(hosts(&j)[1]["error"]["code"], 3, "locked: {j}");
    assert_eq!(hosts(&j)[0]["state"], "discarded", "{j}");
    for root in &roots {
        assert_eq!(listing(root), (vec![1], vec![]), "{j}");
    }

    // Unreachable (nothing listens on port 1): exit 10, that target named, nothing moves.
    let dead = format!("ssh://root@127.0.0.1:1{}", s(&fx.path("t3")));
    targets.push(dead.clone());
    env_config(&fx, &targets, "");
    let r = fx.flip(&["deploy", "prod"]).code(10);
    assert!(r.stderr.contains("127.0.0.1"), "{}", r.stderr);
    for root in &roots {
        assert_eq!(link(root), "releases/1");
        assert_eq!(listing(root), (vec![1], vec![]));
    }
}

#[test]
fn an_environment_rollback_that_fails_names_the_damaged_releases_it_skipped() {
    let fx = Fx::new();
    let (roots, _, src) = two_targets(&fx, "");
    deploy_labels(&fx, &src, &["v1", "v2"]);
    // The only release to roll back to is damaged on the first target.
    fs::write(roots[0].join(".flip/releases/1.json"), "x").unwrap();
    let r = fx
        .flip(&["rollback", "prod"])
        .code(10)
        .stderr_has("1.json is damaged");
    // Named once per line: the warning names the target's path already.
    for l in r.stderr.lines().filter(|l| l.contains("1.json")) {
        assert_eq!(l.matches(s(&roots[0])).count(), 1, "{}", r.stderr);
    }
    let j = fx.flip(&["rollback", "prod", "--json"]).code(10).json();
    let warnings = hosts(&j)[0]["warnings"].to_string();
    assert!(warnings.contains("1.json is damaged"), "{j}");
    assert_eq!(link(&roots[0]), "releases/2");
    assert_eq!(link(&roots[1]), "releases/2");
}

/// `rollback ENV` where the release to go back to was edited in place on one target: that
/// target refuses it (exit 7 in its JSON, naming the file) before any target moves: the other
/// one is never switched (its log records no activation), and the command exits 10 with every
/// target still on release 2;
/// `--force` moves them all. The `after_activate` hook that then runs in the forced release
/// (and touches the edited file) does not make the edit its own: `verify` still reports it,
/// and a later rollback to that release without `--force` is refused again.
#[test]
fn an_environment_rollback_to_a_release_edited_on_one_target_moves_none_unless_forced() {
    let fx = Fx::new();
    // The hook also touches every file, as a `chown -R` would: the hot fix stays no write of its.
    let (roots, _, src) = two_targets(
        &fx,
        "after_activate = ['echo moved > moved.txt; touch index.php']",
    );
    deploy_labels(&fx, &src, &["v1", "v2"]);
    fs::write(roots[1].join("releases/1/index.php"), "hot fix\n").unwrap();
    let switches = |root: &Path| {
        fs::read_to_string(root.join(".flip/log"))
            .unwrap()
            .lines()
            .filter(|l| l.contains(r#""event":"activate""#) || l.contains(r#""event":"rollback""#))
            .count()
    };
    let before = switches(&roots[0]);
    let j = fx.flip(&["rollback", "prod", "--json"]).code(10).json();
    let refused = hosts(&j)[1]["error"].to_string();
    assert!(
        refused.contains("has changed since it was deployed") && refused.contains("index.php"),
        "{j}"
    );
    assert_eq!(hosts(&j)[1]["error"]["code"], 7, "{j}");
    let other = hosts(&j)[0]["error"]["message"].to_string();
    assert!(other.contains("nothing was changed"), "{j}");
    assert_eq!(
        switches(&roots[0]),
        before,
        "the other target was switched meanwhile"
    );
    assert_eq!(link(&roots[0]), "releases/2");
    assert_eq!(link(&roots[1]), "releases/2");

    fx.flip(&["rollback", "prod", "--force"]).success();
    assert_eq!(link(&roots[0]), "releases/1");
    assert_eq!(link(&roots[1]), "releases/1");
    assert_eq!(
        fs::read_to_string(roots[1].join("current/index.php")).unwrap(),
        "hot fix\n"
    );
    let j = fx
        .flip(&["verify", "--json", s(&roots[1]), "1"])
        .code(7)
        .json();
    let problems = j["problems"].to_string();
    assert!(
        problems.contains("index.php") && !problems.contains("moved.txt"),
        "{j}"
    );
    fx.flip(&["activate", "prod", "v2"]).success();
    fx.flip(&["rollback", "prod"]).code(10);
    assert_eq!(link(&roots[1]), "releases/2");
}

/// `rollback ENV` after the same label was deployed twice (a commit deployed again, or two
/// deploys within a second labelled by the time) goes back one deploy: to each target's
/// release of that label older than the live one, not past both to the label before; the
/// next rollback goes on to that one. A label by the time is unique to its deploy.
#[test]
fn an_environment_rollback_after_a_label_deployed_twice_goes_back_one_deploy() {
    let fx = Fx::new();
    let (roots, _, src) = two_targets(&fx, "");
    deploy_labels(&fx, &src, &["a", "b", "b"]);
    fx.flip(&["rollback", "prod"]).success();
    for root in &roots {
        assert_eq!(link(root), "releases/2");
    }
    // The table's row of "b" shows the live release of that label, not its newest.
    let j = fx.flip(&["releases", "prod", "--json"]).success().json();
    let b = &j.as_array().unwrap()[1];
    assert_eq!(b["label"], "b", "{j}");
    for cell in b["releases"].as_array().unwrap() {
        assert_eq!(
            (cell["id"].as_u64(), cell["current"].as_bool()),
            (Some(2), Some(true)),
            "{j}"
        );
    }
    fx.flip(&["rollback", "prod"]).success();
    for root in &roots {
        assert_eq!(link(root), "releases/1");
    }
    // Without a label (the source is no git work tree): the time, to the millisecond.
    for v in [4, 5] {
        src.file("index.php", format!("v{v}\n"), 0o644);
        fx.flip(&["deploy", "prod"]).success();
    }
    let j = fx
        .flip(&["releases", "--json", s(&roots[0])])
        .success()
        .json();
    let labels: Vec<&str> = j.as_array().unwrap()[3..]
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels.len(), 2, "{j}");
    assert_ne!(labels[0], labels[1], "{j}");
    assert!(
        labels
            .iter()
            .all(|l| l.len() == "2026-11-30T09:30:00.123Z".len()),
        "{j}"
    );
}

/// `flip releases ENV` when one target's live release has damaged metadata: the table keeps a
/// row for it (marked live, label and time unknown), as `flip releases TARGET` does, instead of
/// showing that target with no live release at all.
#[test]
fn releases_of_an_environment_keep_a_row_for_a_live_release_with_damaged_metadata() {
    let fx = Fx::new();
    let (roots, _, src) = two_targets(&fx, "");
    deploy_labels(&fx, &src, &["v1", "v2"]);
    fs::write(roots[1].join(".flip/releases/2.json"), "garbage").unwrap();
    let r = fx.flip(&["releases", "prod", "--json"]).success();
    let j = r.json();
    let rows = j.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{j}");
    assert_eq!(rows[1]["label"], "v2", "{j}");
    assert_eq!(rows[1]["releases"][0]["current"], true, "{j}");
    assert_eq!(rows[1]["releases"][1]["id"], serde_json::Value::Null, "{j}");
    assert_eq!(rows[2]["damaged"], true, "{j}");
    assert_eq!(rows[2]["releases"][0]["id"], serde_json::Value::Null, "{j}");
    assert_eq!(rows[2]["releases"][1]["id"], 2, "{j}");
    assert_eq!(rows[2]["releases"][1]["current"], true, "{j}");
    assert_eq!(rows[0]["damaged"], false, "{j}");
    assert!(r.stderr.contains("2.json"), "{}", r.stderr);
    let out = fx.flip(&["releases", "prod"]).success().stdout;
    let last = out.lines().last().unwrap();
    assert!(
        last.starts_with("(metadata damaged)")
            && last.contains(" -")
            && last.trim_end().ends_with("2*"),
        "{out}"
    );
}

/// Whole files are decided per target: in one environment the local target gets changed files
/// whole and the SSH one patches, and the dry run says so of each, item by item. `whole_file`
/// in the environment's table wins over the top level (`flip config` names where it came
/// from), and `--whole-file` over both, over SSH too.
#[test]
fn an_environment_sends_whole_files_locally_and_patches_over_ssh_as_its_dry_run_says() {
    let fx = Fx::new();
    let sshd = flip_testkit::Sshd::start();
    sshd.write_known_hosts(&fx.home.join(".ssh/known_hosts"));
    let (local, remote) = (fx.path("local"), fx.path("remote"));
    let targets = vec![
        s(&local).to_string(),
        format!("ssh://root@127.0.0.1:{}{}", sshd.port(), s(&remote)),
    ];
    let ssh: Vec<String> = vec![
        "-i".into(),
        s(&sshd.user_key()).into(),
        "--remote-flip".into(),
        FLIP.into(),
    ];
    let src = fx.src("src");
    let text = php_lines(4000);
    src.file("big.php", &text, 0o644)
        .file("small.php", &text[..3000], 0o644);
    let mut round = 0;
    let mut edit = || {
        round += 1;
        for (f, t) in [("big.php", &text[..]), ("small.php", &text[..3000])] {
            src.overwrite(f, t.replace("line 30:", &format!("edit {round}:")));
        }
    };
    // (via of each item, files counts) of every host.
    let seen = |j: &Value| -> Vec<(Vec<(String, String)>, Value)> {
        hosts(j)
            .iter()
            .map(|h| {
                let items = h["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| (i["path"].to_string(), i["via"].to_string()))
                    .collect();
                (items, h["files"].clone())
            })
            .collect()
    };
    let deploy = |extra: &[&str]| -> (Value, Value) {
        let extra: Vec<String> = ssh
            .iter()
            .cloned()
            .chain(extra.iter().map(|a| a.to_string()))
            .collect();
        let dry = run(
            &fx,
            &with(&["deploy", "prod", "--json", "--dry-run"], &extra),
        );
        let j = run(
            &fx,
            &with(&["deploy", "prod", "--json", "--itemize"], &extra),
        );
        let (dry, j) = (dry.success().json(), j.success().json());
        assert_eq!(
            seen(&dry),
            seen(&j),
            "the dry run predicts each target's deploy"
        );
        (hosts(&j)[0].clone(), hosts(&j)[1].clone())
    };

    env_config(&fx, &targets, "");
    deploy(&[]);
    edit();
    let (l, r) = deploy(&[]);
    assert_eq!(num(&l, "/files/literal"), 2, "local: whole files: {l}");
    assert_eq!(num(&l, "/files/delta"), 0, "{l}");
    assert_eq!(num(&r, "/files/patched"), 2, "SSH: patches: {r}");
    assert_eq!(num(&r, "/files/literal"), 0, "{r}");

    // The environment's table over the top level.
    write_config(
        &fx,
        &format!(
            "source = \"src\"\nwhole_file = true\n[env.prod]\ntargets = [{:?}, {:?}]\nwhole_file = false\n",
            targets[0], targets[1]
        ),
    );
    let shown = fx.flip(&["config", "prod"]).success().stdout;
    assert!(
        shown.contains("whole_file = false  # environment table"),
        "{shown}"
    );
    edit();
    let (l, r) = deploy(&[]);
    // The SSH target's deploys kept the content both targets have live: patches for both.
    for h in [&l, &r] {
        assert_eq!(num(h, "/files/patched"), 2, "{h}");
        assert_eq!(num(h, "/files/literal"), 0, "{h}");
    }
    // The flag over both; whole over SSH too.
    edit();
    let (l, r) = deploy(&["--whole-file"]);
    for h in [&l, &r] {
        assert_eq!(num(h, "/files/literal"), 2, "{h}");
        assert_eq!(num(h, "/files/delta"), 0, "{h}");
    }
    for root in [&local, &remote] {
        assert_dir_eq(&root.join("current"), &src.tree(), "every target");
    }
}

/// `rollback ENV` records, per target, the release it made live, as a deploy does: the next
/// deploy of the environment stages ahead against it, its content too (one target: 1 round
/// trip, as any warm upgrade; 3 against the stale record it had before).
#[test]
fn a_rollback_of_an_environment_is_what_its_next_deploy_expects_live() {
    let fx = Fx::new();
    let root = fx.path("t1");
    env_config(&fx, &[s(&root).to_string()], "");
    let src = fx.src("src");
    site_v1(&src);
    fx.flip(&["deploy", "prod"]).success();
    site_v2(&src);
    fx.flip(&["deploy", "prod"]).success();
    fx.flip(&["rollback", "prod"]).success();
    src.file("index.php", "<?php echo 'after the rollback';\n", 0o644);
    let j = fx.flip(&["deploy", "prod", "--json"]).success().json();
    let h = &hosts(&j)[0];
    assert_eq!(
        (h["release"].as_u64(), h["previous"].as_u64()),
        (Some(3), Some(1)),
        "{j}"
    );
    assert_eq!(h["round_trips"], 1, "{j}");
    assert_dir_eq(&root.join("current"), &src.tree(), "after the rollback");
}

/// `flip init --config FILE` writes the starter to FILE (not to ./flip.toml), and
/// `--config FILE` reads it back.
#[test]
fn init_with_config_writes_that_file() {
    let fx = Fx::new();
    fs::create_dir(fx.path("deploy")).unwrap();
    let file = fx.path("deploy/staging.toml");
    fx.flip(&["init", "--config", s(&file)]).success();
    assert!(!fx.path("flip.toml").exists(), "wrote ./flip.toml");
    let text = fs::read_to_string(&file).unwrap();
    assert!(text.contains("[env.prod]"), "{text}");
    let j = fx
        .flip(&["config", "prod", "--json", "--config", s(&file)])
        .success()
        .json();
    assert_eq!(j["targets"].as_array().unwrap().len(), 2, "{j}");
    fx.flip(&["init", "--config", s(&file)])
        .code(2)
        .stderr_has(&format!("{} exists already", file.display()));
    fx.flip(&["init", "--config", s(&file), "--force"])
        .success();
    let left: Vec<_> = fs::read_dir(fx.path("deploy"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["staging.toml"], "a temp file left behind");
}

/// `flip init --config FILE` where FILE cannot be a file: in a directory that does not exist,
/// under a file, or a directory itself (with --force too, which cannot replace one). A usage
/// error naming the path and why, nothing written. Before: exit 1 (a bug) with the OS error,
/// and for a directory advice to pass --force, which then failed with exit 1.
#[test]
fn init_refuses_a_config_path_that_cannot_be_a_file() {
    let fx = Fx::new();
    let missing = fx.path("nodir/x.toml");
    fx.flip(&["init", "--config", s(&missing)])
        .code(2)
        .stderr_has(&format!(
            "cannot write {}: there is no directory {}",
            missing.display(),
            fx.path("nodir").display()
        ));
    assert!(!fx.path("nodir").exists());
    fs::write(fx.path("file"), "x").unwrap();
    let under_file = fx.path("file/x.toml");
    fx.flip(&["init", "--config", s(&under_file)])
        .code(2)
        .stderr_has(&format!(
            "cannot write {}: {} is not a directory",
            under_file.display(),
            fx.path("file").display()
        ));
    let dir = fx.path("somedir");
    fs::create_dir(&dir).unwrap();
    for force in [&[][..], &["--force"][..]] {
        let mut args = vec!["init", "--config", s(&dir)];
        args.extend(force);
        let run = fx.flip(&args).code(2).stderr_has(&format!(
            "{} is a directory; name the file to write (--config FILE)",
            dir.display()
        ));
        assert!(!run.stderr.contains("--force to"), "{}", run.stderr);
    }
    assert!(
        fs::read_dir(&dir).unwrap().next().is_none(),
        "wrote into it"
    );
    // A directory the user may not write (as nobody, into one of root's): exit 2 with the OS
    // error, not 1 (a bug).
    let shut = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(shut.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let file = shut.path().join("flip.toml");
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            FLIP,
        ])
        .args(["init", "--config", s(&file)])
        .current_dir("/")
        .env("HOME", "/nonexistent")
        .output()
        .expect("setpriv");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "flip: error: cannot write {}: Permission denied (os error 13)\n",
            file.display()
        )
    );
}

/// One target listed twice in an environment (`/srv/app` and `/srv/app/`; an SSH target with
/// the same user, host, port and path): a usage error naming both, exit 2, before anything is
/// locked. Before, the second waited on the first one's lock: exit 10, or for ever with
/// `--wait`.
#[test]
fn an_environment_naming_one_target_twice_is_refused() {
    let fx = Fx::new();
    let t = fx.path("t");
    for twice in [
        [s(&t).to_string(), format!("{}/", s(&t))],
        [
            "ssh://deploy@web1:2222/srv/app".to_string(),
            "ssh://deploy@web1:2222/srv/app/".to_string(),
        ],
        ["web1:/srv/app".to_string(), "web1:/srv//./app".to_string()],
        [s(&t).to_string(), s(&fx.path("link-to-t")).to_string()],
    ] {
        if !fx.path("link-to-t").exists() {
            fs::create_dir_all(&t).unwrap();
            std::os::unix::fs::symlink(&t, fx.path("link-to-t")).unwrap();
        }
        env_config(&fx, &twice, "");
        fx.src("src").file("index.php", "<?php\n", 0o644);
        let r = fx.flip(&["deploy", "prod", "--wait"]).code(2);
        assert!(
            r.stderr.contains("name the same target")
                && r.stderr.contains(&format!("{:?}", twice[1])),
            "{}",
            r.stderr
        );
        assert!(!t.join(".flip").exists(), "nothing was deployed");
    }
}

/// One directory named twice in a way the names do not show (a local path and the same path
/// over SSH on this machine): the second session finds the lock held by its own run and says
/// so, exit 2, at once even with `--wait` (before: exit 10, or waiting for ever); nothing new
/// goes live, and that target's line does not claim nothing is live there.
#[test]
fn an_environment_naming_one_directory_under_two_names_is_refused_not_waited_on() {
    let fx = Fx::new();
    let servers = Servers::start(&fx);
    let root = fx.path("t");
    let targets = [
        s(&root).to_string(),
        format!("ssh://root@127.0.0.1:{}{}", servers.a.port(), s(&root)),
    ];
    env_config(&fx, &targets, "");
    let src = fx.src("src");
    site_v1(&src);
    let ssh = servers.args();
    // Release 1 live, deployed to the directory by one name.
    run(&fx, &with(&["deploy", s(&src.dir), s(&root)], &[])).success();
    site_v2(&src);
    for wait in [false, true] {
        let mut args = with(&["deploy", "prod"], &ssh);
        if wait {
            args.push("--wait".into());
        }
        let started = std::time::Instant::now();
        let r = run(&fx, &args).code(2);
        assert!(
            r.stderr
                .contains("is held by this same flip run through another of its targets")
                && r.stderr.contains("name it once"),
            "{}",
            r.stderr
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        assert_eq!(link(&root), "releases/1", "nothing new went live");
        // The target that found its own lock never read what is live: not "no release live".
        assert!(
            r.stderr.contains("(what is live there was not read)")
                && r.stderr.contains("(release 1 live)")
                && !r.stderr.contains("no release live"),
            "{}",
            r.stderr
        );
    }
}

/// `releases ENV` with one target unreachable: the table of the targets that answered, the
/// other one named with its error, exit 10 (before: only the error, exit 6, nothing listed);
/// `verify ENV` and `prune ENV` name it as well.
#[test]
fn releases_of_an_environment_list_the_targets_that_answer() {
    let fx = Fx::new();
    let root = fx.path("t1");
    env_config(&fx, &[s(&root).to_string()], "");
    let src = fx.src("src");
    site_v1(&src);
    fx.flip(&["deploy", "prod", "--label", "v1"]).success();
    let down = "ssh://127.0.0.1:1/x".to_string();
    env_config(&fx, &[s(&root).to_string(), down.clone()], "");
    let r = fx.flip(&["releases", "prod"]).code(10);
    assert!(r.stdout.contains("v1"), "{}", r.stdout);
    assert!(r.stdout.contains(s(&root)), "{}", r.stdout);
    assert!(
        r.stderr.contains("127.0.0.1:1") && r.stderr.contains("error"),
        "{}",
        r.stderr
    );
    let j = fx.flip(&["releases", "prod", "--json"]).code(10).json();
    assert_eq!(j[0]["label"], "v1", "{j}");
    assert_eq!(j[0]["failed"], false, "{j}");
    assert_eq!(j[0]["releases"].as_array().unwrap().len(), 1, "{j}");
    // The target that did not answer: a last row of its own, with its error (JSON readers
    // saw only the exit code before).
    let rows = j.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{j}");
    let last = &rows[1];
    assert_eq!(last["failed"], true, "{j}");
    assert_eq!(last["damaged"], false, "{j}");
    assert_eq!(last["label"], serde_json::Value::Null, "{j}");
    let cell = &last["releases"][0];
    assert_eq!(cell["target"], down, "{j}");
    assert_eq!(cell["id"], serde_json::Value::Null, "{j}");
    assert_eq!(cell["error"]["code"], 6, "{j}");
    assert!(
        cell["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("127.0.0.1:1")),
        "{j}"
    );
    // `verify` and `prune` name the target that did not answer too (`prune` said nothing of
    // it but its exit code).
    for cmd in ["verify", "prune"] {
        let r = fx.flip(&[cmd, "prod"]).code(10);
        assert!(
            r.stderr.contains("127.0.0.1:1") && r.stderr.contains("error"),
            "{cmd}: {}",
            r.stderr
        );
    }
}

/// An environment deploy that makes no release (every target unchanged) says so, without the
/// new label, which names no release.
#[test]
fn an_unchanged_environment_deploy_names_no_label() {
    let fx = Fx::new();
    let (_, _, src) = two_targets(&fx, "");
    src.file("index.php", "v1\n", 0o644);
    fx.flip(&["deploy", "prod", "--label", "v1"]).success();
    let r = fx.flip(&["deploy", "prod", "--label", "v2"]).success();
    assert!(
        r.stderr.contains("prod: unchanged on all 2 targets") && !r.stderr.contains("v2"),
        "{}",
        r.stderr
    );
}
