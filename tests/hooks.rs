//! Hooks (`before_activate`, `after_activate`, `rollback_on_failure`) end to end through the
//! binary: run by the agents of real OpenSSH servers (flip_testkit::Sshd, two on their own
//! ports) and of local targets, all on this machine so every target is checked on disk.

mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FLIP: &str = env!("CARGO_BIN_EXE_flip");

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

/// `flip.toml`: source "src", `top` at the top level, `[env.prod]` with these targets.
/// Environment `prod` with the one target `root`, release 1 deployed there without hooks, the
/// source changed to v2 and flip.toml given the hook settings `hooks` for the next deploy.
fn deployed_then_hooks(fx: &Fx, root: &Path, hooks: &str) {
    let targets = vec![s(root).to_string()];
    config(fx, &targets, "");
    let src = fx.src("src");
    site_v1(&src);
    fx.flip(&["deploy", "prod"]).success();
    site_v2(&src);
    config(fx, &targets, hooks);
}

fn config(fx: &Fx, targets: &[String], top: &str) {
    let list: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
    fs::write(
        fx.path("flip.toml"),
        format!(
            "source = \"src\"\n{top}\n[env.prod]\ntargets = [{}]\n",
            list.join(", ")
        ),
    )
    .unwrap();
}

/// `n` local targets `t1`..`tn`: their paths, and as flip.toml names them.
fn local_targets(fx: &Fx, n: u32) -> (Vec<PathBuf>, Vec<String>) {
    let roots: Vec<PathBuf> = (1..=n).map(|i| fx.path(&format!("t{i}"))).collect();
    let targets = roots.iter().map(|r| s(r).to_string()).collect();
    (roots, targets)
}

/// Deploys v1 (label `v1`, no hooks) to the local `targets`, then configures `hooks` and makes
/// the source v2.
fn v1_live_then_v2_with(fx: &Fx, targets: &[String], hooks: &str) -> Src {
    config(fx, targets, "");
    let src = fx.src("src");
    site_v1(&src);
    fx.flip(&["deploy", "prod", "--label", "v1"]).success();
    config(fx, targets, hooks);
    site_v2(&src);
    src
}

/// Deploys v1 (no hooks yet) to both targets, then makes the source v2.
fn v1_live_then_v2(fx: &Fx, servers: &Servers, targets: &[String]) -> Src {
    config(fx, targets, "");
    let src = fx.src("src");
    site_v1(&src);
    servers
        .run(fx, &["deploy", "prod", "--label", "v1"])
        .success();
    site_v2(&src);
    src
}

#[test]
fn a_before_hook_failing_on_one_of_two_ssh_hosts_changes_neither() {
    let fx = Fx::new();
    let servers = Servers::start(&fx);
    let (ra, rb) = (fx.path("a"), fx.path("b"));
    let targets = servers.targets(&ra, &rb);
    v1_live_then_v2(&fx, &servers, &targets);
    config(
        &fx,
        &targets,
        &format!(
            "before_activate = ['echo warming; case \"$FLIP_TARGET\" in *{}) echo \"boom on b\" >&2; exit 3;; esac']",
            s(&rb)
        ),
    );
    let r = servers
        .run(&fx, &["deploy", "prod", "--json", "--label", "v2"])
        .code(12);
    for root in [&ra, &rb] {
        assert_eq!(link(root), "releases/1", "{}", r.stderr);
        assert_eq!(
            listing(root),
            (vec![1], vec![]),
            "nothing staged or committed is left"
        );
    }
    // Every line prefixed with its target, on stderr (stdout carries only the JSON).
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("boom on b"))
        .unwrap_or_else(|| panic!("hook output missing: {}", r.stderr));
    assert!(
        line.starts_with('[') && line.contains(&format!("{}] boom on b", s(&rb))),
        "{line}"
    );
    let warming = r
        .stderr
        .lines()
        .filter(|l| l.ends_with("] warming"))
        .count();
    assert_eq!(warming, 2, "{}", r.stderr);
    assert!(
        !r.stdout.contains("] warming"),
        "hook output on stdout: {}",
        r.stdout
    );
    let j = r.json();
    let (a, b) = (&hosts(&j)[0], &hosts(&j)[1]);
    assert_eq!(a["state"], "discarded", "{j}");
    assert_eq!(b["state"], "failed", "{j}");
    assert_eq!(b["error"]["code"], 12, "{j}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exit status 3"),
        "{j}"
    );
    assert_eq!(b["hooks"][0]["status"], 3, "{j}");
    assert_eq!(b["hooks"][0]["phase"], "before_activate", "{j}");
    assert_eq!(a["hooks"][0]["status"], 0, "{j}");
}

#[test]
fn an_after_hook_failure_with_rollback_on_failure_switches_both_ssh_hosts_back() {
    let fx = Fx::new();
    let servers = Servers::start(&fx);
    let (ra, rb) = (fx.path("a"), fx.path("b"));
    let targets = servers.targets(&ra, &rb);
    let src = v1_live_then_v2(&fx, &servers, &targets);
    let v2 = src.tree();
    let fail_on_b = format!(
        "after_activate = ['case \"$FLIP_TARGET\" in *{}) exit 7;; esac']",
        s(&rb)
    );
    config(
        &fx,
        &targets,
        &format!("{fail_on_b}\nrollback_on_failure = true"),
    );
    let r = servers
        .run(&fx, &["deploy", "prod", "--json", "--label", "v2"])
        .code(12);
    let j = r.json();
    for (root, h) in [&ra, &rb].into_iter().zip(hosts(&j)) {
        assert_eq!(link(root), "releases/1", "{j}");
        assert_eq!(h["state"], "switched_back", "{j}");
        assert_eq!(listing(root).0, vec![1], "the new release is discarded");
    }
    assert_eq!(hosts(&j)[1]["hooks"][0]["status"], 7, "{j}");
    assert_eq!(hosts(&j)[1]["hooks"][0]["phase"], "after_activate", "{j}");
    assert_eq!(hosts(&j)[0]["hooks"][0]["status"], 0, "{j}");

    // Without rollback_on_failure the new release stays live, and the deploy says it failed.
    config(&fx, &targets, &fail_on_b);
    let r = servers
        .run(&fx, &["deploy", "prod", "--json", "--label", "v2"])
        .code(12);
    let j = r.json();
    for (root, h) in [&ra, &rb].into_iter().zip(hosts(&j)) {
        assert_eq!(h["state"], "live", "{j}");
        let rel = h["release"].as_u64().unwrap();
        assert_eq!(link(root), format!("releases/{rel}"));
        assert_dir_eq(&root.join("current"), &v2, "v2 stays live");
    }
    assert_eq!(hosts(&j)[1]["error"]["code"], 12, "{j}");
    assert_eq!(j["summary"]["ok"], false, "{j}");
    let msg = hosts(&j)[1]["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("after_activate hook") && msg.contains("exit status 7"),
        "{j}"
    );
    let warned = hosts(&j)[0]["warnings"].to_string();
    assert!(warned.contains("stays live"), "{j}");
}

#[test]
fn a_hook_sees_its_release_as_cwd_and_the_flip_variables() {
    let fx = Fx::new();
    let root = fx.path("t");
    let out = fx.path("seen");
    deployed_then_hooks(
        &fx,
        &root,
        &format!(
            "before_activate = ['{{ pwd -P; echo \"$FLIP_RELEASE|$FLIP_RELEASE_DIR|$FLIP_PREVIOUS|$FLIP_TARGET|$FLIP_ENV\"; cat | wc -c; }} > {}']\nafter_activate = ['echo \"after $FLIP_RELEASE|$FLIP_PREVIOUS\" >> {}']",
            s(&out),
            s(&out)
        ),
    );
    fx.flip(&["deploy", "prod"]).success();
    let seen = fs::read_to_string(&out).unwrap();
    let real = fs::canonicalize(root.join("releases/2")).unwrap();
    let want = format!(
        "{}\n2|{}|1|{}|prod\n0\nafter 2|1\n",
        s(&real),
        s(&root.join("releases/2")),
        s(&root)
    );
    assert_eq!(seen, want);
}

#[test]
fn a_once_hook_runs_on_exactly_one_target() {
    let fx = Fx::new();
    let (_, targets) = local_targets(&fx, 3);
    let log = fx.path("migrations");
    config(
        &fx,
        &targets,
        &format!(
            "before_activate = [{{ run = 'echo \"$FLIP_TARGET\" >> {}', once = true }}, 'echo every >> {}']",
            s(&log),
            s(&log)
        ),
    );
    let src = fx.src("src");
    site_v1(&src);
    let j = fx.flip(&["deploy", "prod", "--json"]).success().json();
    let text = fs::read_to_string(&log).unwrap();
    let once: Vec<&str> = text.lines().filter(|l| *l != "every").collect();
    assert_eq!(once, vec![targets[0].as_str()], "{text}");
    assert_eq!(text.lines().filter(|l| *l == "every").count(), 3, "{text}");
    assert_eq!(hosts(&j)[0]["hooks"].as_array().unwrap().len(), 2, "{j}");
    assert_eq!(hosts(&j)[1]["hooks"].as_array().unwrap().len(), 1, "{j}");
}

#[test]
fn a_hook_past_its_timeout_is_killed_with_its_children_and_aborts_the_deploy() {
    let fx = Fx::new();
    let root = fx.path("t");
    let pid = fx.path("pid");
    deployed_then_hooks(
        &fx,
        &root,
        &format!(
            "before_activate = [{{ run = 'sleep 30 & echo $! > {}; wait', timeout = \"1s\" }}]",
            s(&pid)
        ),
    );
    let t = Instant::now();
    let r = fx.flip(&["deploy", "prod", "--json"]).code(12);
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(link(&root), "releases/1");
    assert_eq!(listing(&root), (vec![1], vec![]));
    let j = r.json();
    let h = &hosts(&j)[0];
    assert_eq!(h["hooks"][0]["timed_out"], true, "{j}");
    assert!(
        h["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out after 1s"),
        "{j}"
    );
    // The hook's background child went with its process group.
    let child: i32 = fs::read_to_string(&pid).unwrap().trim().parse().unwrap();
    let alive =
        fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|st| !st.contains(") Z "));
    assert!(!alive, "sleep {child} survived the timeout");
}

/// A hook past its timeout gets SIGTERM, and what ignores it SIGKILL after the grace: a
/// command that traps SIGTERM to end cleanly (a migration finishing its statement) had no
/// grace once the hook's shell itself had died of the SIGTERM, and was killed at once.
#[test]
fn what_outlives_the_hooks_shell_after_a_timeout_still_gets_its_grace() {
    let fx = Fx::new();
    let root = fx.path("t");
    let mark = fx.path("graceful");
    deployed_then_hooks(
        &fx,
        &root,
        &format!(
            r#"before_activate = [{{ run = "sh -c \"trap 'sleep 1; echo graceful > {}; exit 0' TERM; sleep 60 & wait\"; true", timeout = "1s" }}]"#,
            s(&mark)
        ),
    );
    let t = Instant::now();
    fx.flip(&["deploy", "prod", "--json"]).code(12);
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(
        fs::read_to_string(&mark).ok().as_deref(),
        Some("graceful\n"),
        "the trap ran to its end"
    );
    assert_eq!(link(&root), "releases/1");
}

#[test]
fn an_unchanged_tree_runs_no_hooks() {
    let fx = Fx::new();
    let root = fx.path("t");
    let log = fx.path("ran");
    config(
        &fx,
        &[s(&root).to_string()],
        &format!("before_activate = ['echo ran >> {}']", s(&log)),
    );
    let src = fx.src("src");
    site_v1(&src);
    fx.flip(&["deploy", "prod"]).success();
    let j = fx.flip(&["deploy", "prod", "--json"]).success().json();
    assert_eq!(hosts(&j)[0]["unchanged"], true, "{j}");
    assert_eq!(fs::read_to_string(&log).unwrap(), "ran\n");
}

#[test]
fn what_hooks_write_into_the_release_is_not_tampering_but_a_later_change_is() {
    let fx = Fx::new();
    let root = fx.path("t");
    config(
        &fx,
        &[s(&root).to_string()],
        "before_activate = ['mkdir -p var/cache && echo \"<?php return 1;\" > var/cache/config.php', \
         'echo 2 > var/cache/second.php']\n\
         after_activate = ['echo 3 > var/cache/after.php']",
    );
    let src = fx.src("src");
    src.file("index.php", "<?php echo 1;\n", 0o644);
    fx.flip(&["deploy", "prod"]).success();
    assert_eq!(
        fs::read_to_string(root.join("current/var/cache/config.php")).unwrap(),
        "<?php return 1;\n"
    );
    let r = fx.flip(&["verify", s(&root), "--json"]).success();
    let j = r.json();
    assert_eq!(j["ok"], true, "{j}");
    let warned = j["warnings"].to_string();
    assert!(
        warned.contains("5 path(s) written by hooks") && warned.contains("var/cache/config.php"),
        "{j}"
    );
    // Every hook's writes, of both phases, are recorded (once per phase, after its last hook).
    assert!(warned.contains("var/cache/second.php"), "{j}");
    assert!(warned.contains("var/cache/after.php"), "{j}");
    // The tree is still the deployed one: the next deploy of it makes no release.
    let again = fx.flip(&["deploy", "prod", "--json"]).success().json();
    assert_eq!(hosts(&again)[0]["release"], 1, "{again}");
    // A file added into a directory a hook made: no longer the deployed tree (a new release).
    fs::write(
        root.join("current/var/cache/planted.php"),
        "<?php evil();\n",
    )
    .unwrap();
    let j = fx.flip(&["deploy", "prod", "--json"]).success().json();
    assert_eq!(hosts(&j)[0]["release"], 2, "{j}");
    assert!(!root.join("current/var/cache/planted.php").exists());
    // Changed after the hooks ran, or never written by one: flagged.
    fs::write(root.join("current/var/cache/config.php"), "<?php evil();\n").unwrap();
    fs::write(root.join("current/planted.php"), "<?php evil();\n").unwrap();
    let j = fx.flip(&["verify", s(&root), "--json"]).code(7).json();
    let problems = j["problems"].to_string();
    assert!(
        problems.contains("var/cache/config.php") && problems.contains("(a hook wrote it; its "),
        "{j}"
    );
    assert!(problems.contains("planted.php"), "{j}");
    // The directories the hook made are still as it left them.
    assert!(!problems.contains("\"var/cache:"), "{j}");
    assert_eq!(j["problems"].as_array().unwrap().len(), 2, "{j}");
}

#[test]
fn idle_agents_outlive_another_targets_long_once_hook() {
    let fx = Fx::new();
    let servers = Servers::start(&fx);
    let (ra, rb) = (fx.path("a"), fx.path("b"));
    let targets = servers.targets(&ra, &rb);
    // Agents that give up on a silent client after 2 s; the migration takes 4.
    let wrapper = fx.path("flip-idle");
    fs::write(
        &wrapper,
        format!("#!/bin/sh\nshift\nexec {FLIP} agent --idle-timeout 2 \"$@\"\n"),
    )
    .unwrap();
    fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    config(
        &fx,
        &targets,
        "before_activate = [{ run = 'sleep 4; echo migrated', once = true }]",
    );
    let src = fx.src("src");
    site_v1(&src);
    let key = servers.a.user_key();
    let r = fx.flip(&[
        "deploy",
        "prod",
        "-i",
        s(&key),
        "--remote-flip",
        s(&wrapper),
    ]);
    let r = r.success();
    assert!(r.stderr.contains("] migrated"), "{}", r.stderr);
    for root in [&ra, &rb] {
        assert_eq!(link(root), "releases/1");
    }
}

#[test]
fn rollback_and_activate_of_an_environment_run_after_hooks_on_the_targets_that_moved() {
    let fx = Fx::new();
    let (roots, targets) = local_targets(&fx, 2);
    let log = fx.path("reloads");
    let after = format!(
        "after_activate = ['echo \"$FLIP_TARGET $FLIP_RELEASE $FLIP_PREVIOUS\" >> {}']",
        s(&log)
    );
    config(&fx, &targets, "");
    let src = fx.src("src");
    site_v1(&src);
    fx.flip(&["deploy", "prod", "--label", "v1"]).success();
    site_v2(&src);
    fx.flip(&["deploy", "prod", "--label", "v2"]).success();
    config(&fx, &targets, &after);
    let j = fx.flip(&["rollback", "prod", "--json"]).success().json();
    let text = fs::read_to_string(&log).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![format!("{} 1 2", targets[0]), format!("{} 1 2", targets[1])],
        "{text}"
    );
    assert_eq!(hosts(&j)[0]["hooks"][0]["status"], 0, "{j}");
    // A failing reload is reported (exit 12); the rollback is not undone.
    config(
        &fx,
        &targets,
        "after_activate = ['case \"$FLIP_TARGET\" in *t2) exit 5;; esac']",
    );
    let r = fx.flip(&["activate", "prod", "v2", "--json"]).code(12);
    let j = r.json();
    for root in &roots {
        assert_eq!(link(root), "releases/2");
    }
    assert_eq!(hosts(&j)[1]["hooks"][0]["status"], 5, "{j}");
    assert_eq!(hosts(&j)[1]["error"]["code"], 12, "{j}");
    // Nothing moves, nothing runs.
    fs::remove_file(&log).unwrap();
    config(&fx, &targets, &after);
    fx.flip(&["activate", "prod", "v2"]).success();
    assert!(!log.exists(), "hooks ran on targets that did not move");
}

#[test]
fn a_bad_hook_in_flip_toml_is_named_by_file_line_and_key_and_flip_config_shows_the_hooks() {
    let fx = Fx::new();
    fs::write(
        fx.path("flip.toml"),
        "source = \"src\"\n[env.prod]\ntargets = [\"/nonexistent/t\"]\nbefore_activate = [\n  \"ok\",\n  { run = \"x\", timeout = \"soon\" },\n]\n",
    )
    .unwrap();
    fx.flip(&["deploy", "prod"])
        .code(2)
        .stderr_has("flip.toml:6: env.prod.before_activate: timeout \"soon\"");
    fs::write(
        fx.path("flip.toml"),
        "source = \"src\"\nafter_activate = [{ run = \"x\", onse = true }]\n[env.prod]\ntargets = [\"/t\"]\n",
    )
    .unwrap();
    fx.flip(&["config", "prod"])
        .code(2)
        .stderr_has("flip.toml:2: after_activate: unknown field `onse`");
    fs::write(
        fx.path("flip.toml"),
        "source = \"src\"\nafter_activate = [\"reload\"]\n[env.prod]\ntargets = [\"/t\"]\nbefore_activate = [{ run = \"migrate\", once = true, timeout = \"90s\" }]\nrollback_on_failure = true\n",
    )
    .unwrap();
    let j = fx.flip(&["config", "prod", "--json"]).success().json();
    assert_eq!(j["before_activate"][0]["run"], "migrate", "{j}");
    assert_eq!(j["before_activate"][0]["once"], true, "{j}");
    assert_eq!(j["before_activate"][0]["timeout"], "1m 30s", "{j}");
    assert_eq!(j["after_activate"][0], "reload", "{j}");
    assert_eq!(j["rollback_on_failure"], true, "{j}");
    assert_eq!(j["from"]["before_activate"], "environment table", "{j}");
    assert_eq!(j["from"]["after_activate"], "top level", "{j}");
}

/// `flip config ENV` prints TOML that reads back as the same settings: written under
/// `[env.ENV]` as a flip.toml of its own, `flip config --json` of it says what it says of the
/// original (all but where each setting came from). Hooks with options are inline tables;
/// before, they were JSON (`{"once":false,"run":...}`), which no TOML parser takes, and strings
/// were Rust-escaped (`\u{1b}`).
#[test]
fn flip_config_prints_toml_that_reads_back_as_the_same_settings() {
    let fx = Fx::new();
    fs::create_dir(fx.path("back")).unwrap();
    fs::write(
        fx.path("flip.toml"),
        concat!(
            "source = 'sr\"c'\n",
            "exclude = [\"/tests\", \"a'b\", \"tab\\there\", \"esc\\u001bx\"]\n",
            "after_activate = [\"reload\"]\n",
            "[env.prod]\n",
            "targets = [\"/srv/app\", \"deploy@web1:/srv/app\"]\n",
            "writable_owner = \"www-data\"\n",
            "before_activate = [\"true\", { run = 'echo \"hi\"', timeout = \"90s\" }, { run = \"migrate\", once = true }]\n",
        ),
    )
    .unwrap();
    let text = fx.flip(&["config", "prod"]).success().stdout;
    assert!(
        text.contains(
            "before_activate = [\"true\", { run = 'echo \"hi\"', once = false, timeout = \"1m 30s\" }, { run = \"migrate\", once = true, timeout = \"10m\" }]  # environment table\n"
        ),
        "{text}"
    );
    let back = fx.path("back/flip.toml");
    fs::write(&back, format!("[env.prod]\n{text}")).unwrap();
    let settings = |config: &Path| {
        let mut j = fx
            .flip(&["config", "prod", "--json", "--config", s(config)])
            .success()
            .json();
        let o = j.as_object_mut().unwrap();
        o.remove("config");
        o.remove("from");
        j
    };
    let (original, read_back) = (settings(&fx.path("flip.toml")), settings(&back));
    assert_eq!(read_back, original, "{text}");
    assert_eq!(original["before_activate"][1]["run"], "echo \"hi\"");
    assert_eq!(original["exclude"][3], "esc\u{1b}x");
}

#[test]
fn a_single_target_deploy_takes_the_top_level_hooks_and_a_failed_first_deploy_leaves_no_target() {
    let fx = Fx::new();
    let root = fx.path("t");
    fs::write(
        fx.path("flip.toml"),
        "before_activate = ['echo \"env=[$FLIP_ENV]\"; exit 2']\n",
    )
    .unwrap();
    let src = fx.src("src");
    site_v1(&src);
    let r = fx.flip(&["deploy", src.s(), s(&root), "--json"]).code(12);
    assert!(
        r.stderr.contains(&format!("[{}] env=[]", s(&root))),
        "{}",
        r.stderr
    );
    let j = r.json();
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["error"]["code"], 12, "{j}");
    assert_eq!(j["hooks"][0]["status"], 2, "{j}");
    assert!(!root.exists(), "a failed first deploy leaves no target");
}

#[test]
fn after_a_before_hook_failed_no_further_hook_starts_on_any_target() {
    let fx = Fx::new();
    let (roots, targets) = local_targets(&fx, 2);
    let migrated = fx.path("migrated");
    config(
        &fx,
        &targets,
        &format!(
            "before_activate = ['case \"$FLIP_TARGET\" in *t2) exit 1;; *) sleep 2;; esac', {{ run = 'touch {}', once = true }}]",
            s(&migrated)
        ),
    );
    let src = fx.src("src");
    site_v1(&src);
    let j = fx.flip(&["deploy", "prod", "--json"]).code(12).json();
    assert!(
        !migrated.exists(),
        "the migration ran for an aborted deploy"
    );
    assert_eq!(hosts(&j)[0]["state"], "discarded", "{j}");
    // Its first hook ran, or had not started yet when t2 failed: never the migration.
    let ran = hosts(&j)[0]["hooks"].as_array().map_or(0, Vec::len);
    assert!(ran <= 1, "{j}");
    for root in &roots {
        assert!(!root.exists(), "a failed first deploy leaves no target");
    }
}

#[test]
fn a_hook_failing_on_one_target_while_another_outlives_the_idle_timeout_leaves_both_unchanged() {
    let fx = Fx::new();
    let servers = Servers::start(&fx);
    let (ra, rb) = (fx.path("a"), fx.path("b"));
    let targets = servers.targets(&ra, &rb);
    // Agents that give up on a silent client after 2 s; target a's hook takes 4, b's fails.
    let wrapper = fx.path("flip-idle");
    fs::write(
        &wrapper,
        format!("#!/bin/sh\nshift\nexec {FLIP} agent --idle-timeout 2 \"$@\"\n"),
    )
    .unwrap();
    fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let key = servers.a.user_key();
    let args = [
        "deploy",
        "prod",
        "-i",
        s(&key),
        "--remote-flip",
        s(&wrapper),
    ];
    config(&fx, &targets, "");
    let src = fx.src("src");
    site_v1(&src);
    fx.flip(&args).success();
    config(
        &fx,
        &targets,
        "before_activate = ['case \"$FLIP_TARGET\" in */a) sleep 4; echo slept;; *) exit 3;; esac']",
    );
    site_v2(&src);
    let r = fx.flip(&args).code(12);
    assert!(r.stderr.contains("exit status 3"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("idle"),
        "an agent gave up meanwhile: {}",
        r.stderr
    );
    for root in [&ra, &rb] {
        assert_eq!(link(root), "releases/1");
        let ids: Vec<String> = fs::read_dir(root.join("releases"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            ids,
            vec!["1".to_string()],
            "{}: {}",
            root.display(),
            r.stderr
        );
    }
    // The targets take the next deploy at once (no lock held, nothing left over).
    config(&fx, &targets, "");
    fx.flip(&args).success();
    for root in [&ra, &rb] {
        assert_eq!(link(root), "releases/3");
    }
}

/// The human summary of an after_activate hook that failed on one of two local targets names
/// the hook's failure once (the other target's warning names the target, not the message
/// again), and the last line says it went live but a hook failed; with rollback_on_failure
/// the target switched back says so in its line.
#[test]
fn a_failed_after_hook_is_told_once_in_the_human_summary() {
    let fx = Fx::new();
    let (roots, targets) = local_targets(&fx, 2);
    let hook = "after_activate = ['case \"$FLIP_TARGET\" in *t2) exit 7;; esac']";
    let src = v1_live_then_v2_with(&fx, &targets, hook);
    let r = fx.flip(&["deploy", "prod", "--label", "v2"]).code(12);
    assert_eq!(r.stderr.matches("exit status 7").count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "release 2 stays live although an after_activate hook failed on {} (rollback_on_failure is off)",
            targets[1]
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("prod v2: live on all 2 targets in ")
            && r.stderr.trim_end().ends_with(", but a hook failed on 1"),
        "{}",
        r.stderr
    );
    config(
        &fx,
        &targets,
        &format!("{hook}\nrollback_on_failure = true"),
    );
    src.file("new.php", "<?php // v3\n", 0o644);
    let r = fx.flip(&["deploy", "prod", "--label", "v3"]).code(12);
    assert_eq!(r.stderr.matches("exit status 7").count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "flip: deployed release 3 to {} (v3), then switched back: ",
            targets[0]
        )),
        "{}",
        r.stderr
    );
    for root in &roots {
        assert_eq!(link(root), "releases/2");
    }
}

/// An after hook failing on one target leaves the new release live everywhere (without
/// `rollback_on_failure`): every other target still runs all of its after hooks (its PHP-FPM
/// reload), in a deploy as in an environment's activate. With `rollback_on_failure` every
/// target is switched back, so no further hook starts anywhere.
#[test]
fn a_failed_after_hook_stops_only_its_own_target_unless_everything_is_switched_back() {
    let fx = Fx::new();
    let (roots, targets) = local_targets(&fx, 2);
    let reloaded = fx.path("reloaded");
    // t1 fails at once; t2's first hook is still running then.
    let hooks = format!(
        "after_activate = ['case \"$FLIP_TARGET\" in *t1) exit 7;; *) sleep 1;; esac', 'echo \"$FLIP_TARGET $FLIP_RELEASE\" >> {}']",
        s(&reloaded)
    );
    let src = v1_live_then_v2_with(&fx, &targets, &hooks);
    let j = fx
        .flip(&["deploy", "prod", "--label", "v2", "--json"])
        .code(12)
        .json();
    for root in &roots {
        assert_eq!(link(root), "releases/2");
    }
    assert_eq!(
        fs::read_to_string(&reloaded).unwrap(),
        format!("{} 2\n", targets[1]),
        "{j}"
    );
    assert_eq!(
        hosts(&j)[0]["hooks"].as_array().map(Vec::len),
        Some(1),
        "{j}"
    );
    assert_eq!(
        hosts(&j)[1]["hooks"].as_array().map(Vec::len),
        Some(2),
        "{j}"
    );

    // The environment's activate of v1 runs the after hooks of both targets the same way.
    fs::remove_file(&reloaded).unwrap();
    fx.flip(&["activate", "prod", "v1"]).code(12);
    assert_eq!(
        fs::read_to_string(&reloaded).unwrap(),
        format!("{} 1\n", targets[1])
    );
    for root in &roots {
        assert_eq!(link(root), "releases/1");
    }

    // With rollback_on_failure both go back: nothing further starts once t1 failed.
    fs::remove_file(&reloaded).unwrap();
    config(
        &fx,
        &targets,
        &format!("{hooks}\nrollback_on_failure = true"),
    );
    src.file("new.php", "<?php // v3\n", 0o644);
    fx.flip(&["deploy", "prod", "--label", "v3"]).code(12);
    assert!(!reloaded.exists(), "a hook started after the failure");
    for root in &roots {
        assert_eq!(link(root), "releases/1");
    }
}

/// A hook that writes a file whose name is not UTF-8: such a name is known only lossily, so it
/// is never recorded as the hook's write. It stays a difference (`verify` names it), the
/// release is never "unchanged", and a file planted under another such name is not vouched
/// for: the redeploy makes a new release without it.
#[test]
fn a_hook_write_with_a_name_that_is_not_utf8_vouches_for_nothing() {
    use std::os::unix::ffi::OsStrExt;
    let fx = Fx::new();
    let root = fx.path("t");
    config(
        &fx,
        &[s(&root).to_string()],
        r#"before_activate = ['touch "$(printf "n\377")"']"#,
    );
    let src = fx.src("src");
    src.file("index.php", "<?php echo 1;\n", 0o644);
    fx.flip(&["deploy", "prod"]).success();
    let planted = root
        .join("current")
        .join(std::ffi::OsStr::from_bytes(b"n\xfd"));
    fs::write(&planted, "<?php evil();\n").unwrap();
    fx.flip(&["verify", s(&root)]).code(7);
    let j = fx.flip(&["deploy", "prod", "--json"]).success().json();
    assert_eq!(hosts(&j)[0]["release"], 2, "{j}");
    assert!(!root
        .join("current")
        .join(std::ffi::OsStr::from_bytes(b"n\xfd"))
        .exists());
}

/// A hook that chmods a deployed directory (`chmod 775 bootstrap/cache`, as Laravel recipes
/// do): recorded, so the next deploy of the same tree is unchanged; a later chmod by someone
/// else is a difference, and the redeploy makes a new release.
#[test]
fn a_directory_a_hook_chmods_stays_unchanged_but_a_later_chmod_does_not() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fx::new();
    let root = fx.path("t");
    config(
        &fx,
        &[s(&root).to_string()],
        "before_activate = ['chmod 775 bootstrap/cache']",
    );
    let src = fx.src("src");
    src.file("index.php", "<?php echo 1;\n", 0o644).file(
        "bootstrap/cache/.gitignore",
        "*\n",
        0o644,
    );
    fs::set_permissions(src.p("bootstrap/cache"), fs::Permissions::from_mode(0o755)).unwrap();
    fx.flip(&["deploy", "prod"]).success();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&root.join("current/bootstrap/cache")), 0o775);
    let j = fx.flip(&["deploy", "prod", "--json"]).success().json();
    assert_eq!(hosts(&j)[0]["unchanged"], true, "{j}");
    fs::set_permissions(
        root.join("current/bootstrap/cache"),
        fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let j = fx.flip(&["deploy", "prod", "--json"]).success().json();
    assert_eq!(hosts(&j)[0]["release"], 2, "{j}");
    assert_eq!(mode(&root.join("current/bootstrap/cache")), 0o775);
}

/// A deploy waiting (`--wait`) behind a first deploy whose hook fails, and which therefore
/// undoes the target it made, makes the target again and goes through (before: "cannot open
/// …/.flip: No such file or directory", exit 5).
#[test]
fn a_deploy_waiting_behind_a_failed_first_deploy_goes_through() {
    let fx = Fx::new();
    fs::write(
        fx.path("flip.toml"),
        "before_activate = ['sleep 2; false']\n",
    )
    .unwrap();
    fs::write(fx.path("plain.toml"), "").unwrap();
    let a = fx.src("a");
    a.file("a.txt", "a\n", 0o644);
    let b = fx.src("b");
    b.file("b.txt", "b\n", 0o644);
    let first = fx.spawn(&[], &["deploy", a.s(), fx.root_str()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !fx.root.join(".flip/lock").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first deploy never locked"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let plain = fx.path("plain.toml");
    let second = fx.spawn(
        &[],
        &[
            "deploy",
            "--wait",
            "--config",
            s(&plain),
            b.s(),
            fx.root_str(),
        ],
    );
    while !second.stderr_so_far().contains("waiting") {
        assert!(
            std::time::Instant::now() < deadline,
            "the second never waited"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = first.finish(Duration::from_secs(60));
    assert_ne!(r.code, 0, "the first deploy's hook failed: {}", r.stderr);
    second.finish(Duration::from_secs(60)).success();
    assert_dir_eq(&fx.current(), &b.tree(), "the second deploy is live");
}
