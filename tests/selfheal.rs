//! A target that heals itself, through the real binary: flip's own layout is never followed out
//! of the root, a target inside the source is refused before anything is made, one leftover
//! flip cannot delete never fails a deploy (it is named and retried), damaged metadata and crash
//! leftovers are named and cleaned, ids never wrap, and a session always ends cleanly: the lock
//! is free for an immediate retry, an idle agent gives up, a failed first deploy leaves nothing.

mod common;

use common::*;
use flip_wire::{FrameReader, FrameWriter, Holder, Request, Response, MAGIC, PROTOCOL};
use serde_json::Value;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A small site every user can read (the standard one has owner-only files).
fn public_site(src: &Src, version: u32) {
    src.file("index.html", format!("<h1>v{version}</h1>\n"), 0o644)
        .file("lib/app.php", "<?php echo 1;\n", 0o644)
        .file("big.bin", noise(version as u64, 64 * 1024), 0o644);
}

fn warnings(j: &Value) -> Vec<String> {
    j["warnings"]
        .as_array()
        .unwrap_or_else(|| panic!("no warnings array in {j}"))
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect()
}

fn leftover_paths(j: &Value) -> Vec<String> {
    j["leftovers"]
        .as_array()
        .unwrap_or_else(|| panic!("no leftovers array in {j}"))
        .iter()
        .map(|l| l["path"].as_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// flip's layout is its own
// ---------------------------------------------------------------------------------------------

/// Every command that touches the target refuses it with exit 5, naming `path`.
#[track_caller]
fn every_command_refuses(fx: &Fx, src: &Src, path: &Path, what: &str) {
    let root = fx.root_str();
    let p = s(path);
    fx.flip(&["deploy", src.s(), root])
        .code(5)
        .stderr_has(p)
        .stderr_has(what);
    fx.flip(&["prune", root, "--keep", "1"])
        .code(5)
        .stderr_has(p);
    fx.flip(&["rollback", root]).code(5).stderr_has(p);
    fx.flip(&["releases", root]).code(5).stderr_has(p);
}

#[test]
fn a_symlinked_releases_dir_is_refused_and_the_linked_directory_untouched() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);
    public_site(&src, 2);
    fx.deploy(&src, &[]);

    // releases/ moved elsewhere and replaced by a symlink; the other directory also holds
    // foreign files named like flip's own (staging, trash, a numbered directory).
    let elsewhere = fx.path("elsewhere");
    fs::rename(fx.root.join("releases"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, fx.root.join("releases")).unwrap();
    for name in [".staging-9", ".trash-1", "77"] {
        fs::create_dir_all(elsewhere.join(name)).unwrap();
        fs::write(elsewhere.join(name).join("precious.txt"), name).unwrap();
    }
    let before = read_tree(&elsewhere);

    public_site(&src, 3);
    every_command_refuses(&fx, &src, &fx.root.join("releases"), "symlink");
    assert_tree_eq(&read_tree(&elsewhere), &before, "the linked-to directory");
    assert_eq!(fx.current_link(), "releases/2");
}

#[test]
fn a_symlinked_state_dir_is_refused_and_a_state_file_of_another_type_replaced() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);

    let state = fx.root.join(".flip");
    let elsewhere = fx.path("elsewhere-state");
    fs::rename(&state, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &state).unwrap();
    fs::write(elsewhere.join(".next-id.tmp-1"), "foreign").unwrap();
    fs::write(elsewhere.join("releases/5.json"), "foreign").unwrap();
    let before = read_tree(&elsewhere);
    public_site(&src, 2);
    every_command_refuses(&fx, &src, &state, "symlink");
    assert_tree_eq(
        &read_tree(&elsewhere),
        &before,
        "the linked-to state directory",
    );

    // Back in place, but the log is a symlink to somebody's file (kept elsewhere by hand), the
    // id counter a FIFO and the leftovers record a directory: never followed nor written
    // through; replaced under the lock, each named, and the deploy goes on (it failed every
    // time, exit 5).
    fs::remove_file(&state).unwrap();
    fs::rename(&elsewhere, &state).unwrap();
    let foreign = fx.path("foreign.log");
    fs::write(&foreign, "not flip's\n").unwrap();
    fs::remove_file(state.join("log")).unwrap();
    std::os::unix::fs::symlink(&foreign, state.join("log")).unwrap();
    fs::remove_file(state.join("next-id")).unwrap();
    mkfifo(&state.join("next-id"));
    let _ = fs::remove_file(state.join("leftovers"));
    fs::create_dir(state.join("leftovers")).unwrap();
    fs::write(state.join("leftovers/kept"), "somebody's").unwrap();
    fx.flip(&["releases", fx.root_str()]).success();
    let j = fx
        .flip(&["deploy", "--json", src.s(), fx.root_str()])
        .success()
        .json();
    let w = warnings(&j).join("\n");
    for (f, what) in [
        ("log", format!("a symlink to {}", foreign.display())),
        ("next-id", "a special file".to_string()),
        ("leftovers", "a directory".to_string()),
    ] {
        assert!(
            w.contains(&format!("{} was {what}", state.join(f).display())),
            "{f}: {w}"
        );
        // flip's own again (the leftovers record is written only when there are some).
        let m = fs::symlink_metadata(state.join(f));
        assert!(
            m.as_ref().map_or(f == "leftovers", |m| m.is_file()),
            "{f}: {m:?}"
        );
    }
    assert_eq!(fs::read_to_string(&foreign).unwrap(), "not flip's\n");
    assert_eq!(j["release"], 2, "{j}");
    assert_eq!(fx.current_link(), "releases/2");
    let aside: Vec<_> = fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("leftovers.aside-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        fs::read_to_string(state.join(&aside[0]).join("kept")).unwrap(),
        "somebody's"
    );
    // The next deploy: nothing to say.
    public_site(&src, 3);
    let j = fx.deploy(&src, &[]);
    assert!(warnings(&j).is_empty(), "{j}");
}

#[test]
fn a_real_directory_named_current_is_refused_and_kept() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);
    fs::remove_file(fx.current()).unwrap();
    fs::create_dir(fx.current()).unwrap();
    fs::write(fx.current().join("index.html"), "hand-made").unwrap();
    public_site(&src, 2);
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .code(5)
        .stderr_has(s(&fx.current()))
        .stderr_has("not a symlink");
    assert_eq!(
        fs::read_to_string(fx.current().join("index.html")).unwrap(),
        "hand-made"
    );
    assert_eq!(fx.release_ids(), vec![1], "nothing was staged");
}

/// `current` made by hand (`ln -sfn /srv/app/releases/1 current`, as people and other tools
/// write it) named a release flip did not recognise: every command failed (exit 5), and
/// `flip doctor`'s advice, `flip activate`, failed the same way. Such a `current` is now the
/// release it names; one naming anything else is nobody's release: listed with a warning,
/// and replaced by the next activation, the directory it named untouched.
#[test]
fn a_current_made_by_hand_is_read_as_what_it_names() {
    let fx = Fx::new();
    let src = fx.src("src");
    for v in 1..=2 {
        public_site(&src, v);
        fx.deploy(&src, &[]);
    }
    let link = fx.root.join("current");
    let relink = |to: &str| {
        fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(to, &link).unwrap();
    };
    let live = |j: &Value| -> Vec<u64> {
        j.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["current"] == true)
            .map(|r| r["id"].as_u64().unwrap())
            .collect()
    };
    let absolute = fx.release(2).display().to_string();
    for to in [absolute.as_str(), "./releases/2", "releases/2/"] {
        relink(to);
        let r = fx.flip(&["releases", "--json", fx.root_str()]).success();
        assert_eq!(live(&r.json()), [2], "current -> {to}");
        assert_eq!(r.stderr, "", "current -> {to}");
        let doctor = fx.flip(&["doctor", fx.root_str()]).success();
        assert!(
            doctor.stdout.contains("current -> releases/2: committed"),
            "{}",
            doctor.stdout
        );
    }
    // A rollback from the hand-made link, then flip's own form again.
    fx.flip(&["rollback", fx.root_str()]).success();
    assert_eq!(fx.current_link(), "releases/1");

    let maintenance = fx.path("maintenance");
    fs::create_dir(&maintenance).unwrap();
    fs::write(maintenance.join("index.html"), "down for maintenance").unwrap();
    relink(s(&maintenance));
    let foreign = format!(
        "points to {:?}, not to a release flip made",
        s(&maintenance)
    );
    let r = fx.flip(&["releases", "--json", fx.root_str()]).success();
    assert_eq!(live(&r.json()), Vec::<u64>::new());
    r.stderr_has(&foreign);
    fx.flip(&["rollback", fx.root_str()]).code(5);
    let doctor = fx.flip(&["doctor", fx.root_str()]).code(11);
    for said in [
        "not a release flip made".to_string(),
        format!("fix: flip activate {} ID", fx.root_str()),
    ] {
        assert!(doctor.stdout.contains(&said), "{said}: {}", doctor.stdout);
    }
    // The doctor's fix works.
    fx.flip(&["activate", fx.root_str(), "2"])
        .success()
        .stderr_has(&foreign);
    assert_eq!(fx.current_link(), "releases/2");
    // So does a deploy.
    relink(s(&maintenance));
    public_site(&src, 3);
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["release"], 3, "{j}");
    assert_eq!(j["previous"], Value::Null, "{j}");
    assert!(warnings(&j).iter().any(|w| w.contains(&foreign)), "{j}");
    assert_eq!(fx.current_link(), "releases/3");
    assert_eq!(
        fs::read_to_string(maintenance.join("index.html")).unwrap(),
        "down for maintenance"
    );
}

#[test]
fn a_live_release_replaced_by_a_symlink_is_refused() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);
    let elsewhere = fx.path("elsewhere-release");
    fs::rename(fx.release(1), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, fx.release(1)).unwrap();
    let before = read_tree(&elsewhere);
    public_site(&src, 2);
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .code(5)
        .stderr_has(s(&fx.release(1)))
        .stderr_has("symlink");
    fx.flip(&["prune", fx.root_str(), "--keep", "0"]).code(5);
    assert_tree_eq(&read_tree(&elsewhere), &before, "the linked-to release");
    assert!(fs::symlink_metadata(fx.release(1))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn a_symlinked_release_metadata_file_is_named_and_not_followed() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);
    public_site(&src, 2);
    fx.deploy(&src, &[]);
    let meta = fx.root.join(".flip/releases/1.json");
    let foreign = fx.path("foreign.json");
    fs::copy(&meta, &foreign).unwrap();
    fs::remove_file(&meta).unwrap();
    std::os::unix::fs::symlink(&foreign, &meta).unwrap();
    let run = fx.flip(&["releases", "--json", fx.root_str()]).success();
    let ids: Vec<u64> = run
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![2],
        "release 1's metadata is a symlink: not trusted"
    );
    assert!(run.stderr.contains(s(&meta)), "{}", run.stderr);
    assert!(foreign.is_file());
}

// ---------------------------------------------------------------------------------------------
// Target and source overlapping
// ---------------------------------------------------------------------------------------------

#[test]
fn a_target_inside_the_source_is_refused_before_anything_is_created() {
    let fx = Fx::new();
    let app = fx.src("app");
    public_site(&app, 1);
    let before = app.tree();
    std::os::unix::fs::symlink(&app.dir, fx.path("link")).unwrap();
    for target in [
        app.p("deploy"),
        app.p("x/../deploy"),
        fx.path("link/deploy"),
        app.dir.clone(),
    ] {
        fx.flip(&["deploy", app.s(), s(&target)])
            .code(2)
            .stderr_has("inside the source")
            .stderr_has(s(&target));
        assert_tree_eq(&app.tree(), &before, "the source");
    }
    // The dry run too: nothing to learn from a target that cannot work.
    fx.flip(&["deploy", "--dry-run", app.s(), s(&app.p("deploy"))])
        .code(2);
    assert_tree_eq(&app.tree(), &before, "the source");
}

#[test]
fn a_source_inside_the_targets_own_directories_is_refused() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);
    for source in [fx.current(), fx.release(1), fx.root.join(".flip")] {
        fx.flip(&["deploy", s(&source), fx.root_str()])
            .code(2)
            .stderr_has("inside the target");
    }
    assert_eq!(fx.release_ids(), vec![1]);
}

// ---------------------------------------------------------------------------------------------
// Leftovers flip cannot delete
// ---------------------------------------------------------------------------------------------

/// A world for running flip as `nobody`: a temp dir nobody can enter, with a home and a target
/// parent owned by nobody.
struct Nobody {
    fx: Fx,
    home: PathBuf,
    root: PathBuf,
}

impl Nobody {
    fn new() -> Nobody {
        let fx = Fx::new();
        let top = fx.path("");
        fs::set_permissions(&top, fs::Permissions::from_mode(0o755)).unwrap();
        let own = fx.path("nobody");
        fs::create_dir(&own).unwrap();
        std::os::unix::fs::chown(&own, Some(65534), Some(65534)).unwrap();
        let home = own.join("home");
        let root = own.join("target");
        let n = Nobody { fx, home, root };
        n.run(&["--version"]).success();
        fs::create_dir(&n.home).unwrap_or(());
        std::os::unix::fs::chown(&n.home, Some(65534), Some(65534)).unwrap();
        n
    }

    fn run(&self, args: &[&str]) -> Run {
        let out = flip_as_nobody()
            .args(args)
            .env("HOME", &self.home)
            .env("XDG_CACHE_HOME", self.home.join(".cache"))
            .env_remove("FLIP_FAULT")
            .env_remove("SSH_AUTH_SOCK")
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .expect("run setpriv");
        Run {
            args: args.join(" "),
            code: out.status.code().expect("not killed"),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn deploy(&self, src: &Src) -> Value {
        self.run(&["deploy", "--json", "--keep", "1", src.s(), s(&self.root)])
            .success()
            .json()
    }
}

#[test]
fn an_undeletable_file_in_an_old_release_never_fails_a_deploy() {
    let w = Nobody::new();
    let src = w.fx.src("src");
    public_site(&src, 1);
    let j = w.deploy(&src);
    assert_eq!(num(&j, "/release"), 1);
    // The web server (root) caches a page inside release 1.
    let cache = w.root.join("releases/1/var/cache");
    fs::create_dir_all(&cache).unwrap();
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(cache.join("page.html"), "cached").unwrap();
    let blocker = w.root.join("releases/.trash-1/var/cache/page.html");

    for v in 2..=4u32 {
        public_site(&src, v);
        let j = w.deploy(&src);
        assert_eq!(num(&j, "/release"), v as u64, "{j}");
        let left = leftover_paths(&j);
        if v == 2 {
            assert!(left.is_empty(), "release 1 is the rollback target: {j}");
        } else {
            assert_eq!(left, vec![s(&blocker).to_string()], "{j}");
            let err = j["leftovers"][0]["error"].as_str().unwrap();
            assert!(err.contains("Permission denied"), "{j}");
        }
    }
    assert_eq!(
        fs::read_link(w.root.join("current")).unwrap(),
        Path::new("releases/4")
    );
    let ids: Vec<u64> = fs::read_dir(w.root.join("releases"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.parse().ok())
        .collect::<std::collections::BTreeSet<u64>>()
        .into_iter()
        .collect();
    assert_eq!(ids, vec![3, 4], "releases 1 and 2 are pruned");
    // Everything of release 1 but the blocker is gone.
    assert!(!w.root.join("releases/.trash-1/index.html").exists());

    // The listing and prune name it too.
    let run = w.run(&["releases", s(&w.root)]).success();
    assert!(run.stderr.contains(s(&blocker)), "{}", run.stderr);
    let j = w
        .run(&["prune", "--json", "--keep", "1", s(&w.root)])
        .success()
        .json();
    assert_eq!(leftover_paths(&j), vec![s(&blocker).to_string()], "{j}");

    // Once root removes the blocker, the next deploy finishes the job.
    fs::remove_dir_all(w.root.join("releases/.trash-1/var")).unwrap();
    public_site(&src, 5);
    let j = w.deploy(&src);
    assert!(leftover_paths(&j).is_empty(), "{j}");
    assert!(!w.root.join("releases/.trash-1").exists());
    assert!(!w.root.join(".flip/leftovers").exists());
    let run = w.run(&["releases", s(&w.root)]).success();
    assert!(!run.stderr.contains("cannot remove"), "{}", run.stderr);
}

/// A pruned release holds, in a directory flip's user may not write (made by a `sudo flip
/// deploy`), a name of a file the kept releases share: the prune removes the names it can,
/// and the link ledger counts what it removed. It counted only complete removals, so the
/// next deploy took the file's lower link count for "a name removed behind flip's back",
/// warned, and copied what it could have linked.
#[test]
fn a_name_a_prune_could_not_remove_does_not_stop_the_next_deploy_linking() {
    let w = Nobody::new();
    let src = w.fx.src("src");
    let target = s(&w.root).to_string();
    for v in 1..=4u32 {
        public_site(&src, v);
        w.run(&["deploy", "--keep", "10", src.s(), &target])
            .success();
    }
    std::os::unix::fs::chown(w.root.join("releases/1/lib"), Some(0), Some(0)).unwrap();
    // Keeping 1: releases 1 to 3 go (5 is live, 4 its rollback target); of lib/app.php's
    // names there, release 1's stays, in the trash.
    public_site(&src, 5);
    w.deploy(&src);
    assert!(w.root.join("releases/.trash-1/lib/app.php").exists());
    public_site(&src, 6);
    let j = w.deploy(&src);
    assert_eq!(num(&j, "/release"), 6, "{j}");
    assert!(!warnings(&j).iter().any(|w| w.contains("expected")), "{j}");
    let ino = |id: u64| common::ino(&w.root.join(format!("releases/{id}/lib/app.php")));
    assert_eq!(ino(6), ino(5), "lib/app.php is linked: {j}");
}

#[test]
fn an_immutable_file_in_an_old_release_never_fails_a_deploy() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);
    let pinned = fx.release(1).join("pinned.txt");
    fs::write(&pinned, "immutable").unwrap();
    let chattr = Command::new("chattr").arg("+i").arg(&pinned).status();
    if !chattr.is_ok_and(|s| s.success()) {
        eprintln!("chattr +i is not supported here; skipping");
        return;
    }
    let trashed = fx.root.join("releases/.trash-1/pinned.txt");
    let mut last = Value::Null;
    for v in 2..=4u32 {
        public_site(&src, v);
        last = fx.deploy(&src, &["--keep", "1"]);
    }
    let _ = Command::new("chattr").arg("-i").arg(&trashed).status();
    assert_eq!(
        leftover_paths(&last),
        vec![s(&trashed).to_string()],
        "{last}"
    );
    assert!(
        last["leftovers"][0]["error"]
            .as_str()
            .unwrap()
            .contains("not permitted"),
        "{last}"
    );
    let j = fx.deploy(&src, &["--keep", "1"]);
    assert!(leftover_paths(&j).is_empty(), "{j}");
    assert_eq!(fx.release_leftovers(), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// Damaged metadata, crash leftovers, ids
// ---------------------------------------------------------------------------------------------

/// What someone put under `releases/` (a backup directory, a file) is flip's to leave alone,
/// and to name: no command said a word of it (doctor called the target healthy), though
/// the README lists it among the warnings. Now every command warns, doctor names it, and a
/// prune keeping nothing still leaves it.
#[test]
fn what_is_not_a_release_under_releases_is_named_and_left_alone() {
    let fx = Fx::new();
    let root = fx.root_str();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);
    let junk = fx.root.join("releases/junk");
    let backup = fx.root.join("releases/old-backup");
    fs::write(&junk, "x").unwrap();
    fs::create_dir(&backup).unwrap();
    fs::write(backup.join("index.php"), "old").unwrap();
    public_site(&src, 2);
    let j = fx.deploy(&src, &[]);
    for p in [&junk, &backup] {
        let named = format!("{} is not a release flip made", p.display());
        assert_eq!(
            warnings(&j).iter().filter(|w| w.contains(&named)).count(),
            1,
            "{j}"
        );
    }
    fx.flip(&["releases", root])
        .success()
        .stderr_has(&format!("{} is not a release flip made", junk.display()));
    let doctor = fx.flip(&["doctor", "--json", root]).success().json();
    let said = doctor["hosts"][0]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "releases" && f["severity"] == "warning")
        .unwrap_or_else(|| panic!("{doctor}"))
        .clone();
    assert!(
        said["message"]
            .as_str()
            .unwrap()
            .starts_with("releases/junk, releases/old-backup: not flip's"),
        "{said}"
    );
    fx.flip(&["prune", "--keep", "0", root]).success();
    assert_eq!(fs::read(&junk).unwrap(), b"x");
    assert_eq!(fs::read(backup.join("index.php")).unwrap(), b"old");
}

/// `current` names a release directory that has no metadata (copied there by hand): the
/// deploy makes a new release of everything, and its warnings say the directory is there and
/// its metadata is not; one said "release 7 does not exist" of the directory it had just named.
#[test]
fn a_live_release_without_metadata_is_named_as_it_is() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);
    copy_tree(&fx.release(1), &fx.release(7));
    std::os::unix::fs::symlink("releases/7", fx.root.join("c.tmp")).unwrap();
    fs::rename(fx.root.join("c.tmp"), fx.current()).unwrap();
    public_site(&src, 2);
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["release"], 8, "{j}");
    let w = warnings(&j);
    assert!(!w.iter().any(|w| w.contains("does not exist")), "{j}");
    let manifest = fx.root.join(".flip/releases/7.manifest");
    assert!(
        w.iter()
            .any(|w| w.starts_with("the live release 7 has no manifest")
                && w.contains(&format!("({} missing)", manifest.display()))),
        "{j}"
    );
    assert_dir_eq(&fx.current(), &src.tree(), "release 8");
}

#[test]
fn damaged_metadata_of_releases_that_are_not_live_is_named_and_skipped() {
    let fx = Fx::new();
    let root = fx.root_str();
    let src = fx.src("src");
    for v in 1..=4 {
        public_site(&src, v);
        fx.deploy(&src, &[]);
    }
    let meta = fx.root.join(".flip/releases");
    fs::write(meta.join("2.json"), b"\x00garbage{").unwrap();
    let m3 = fs::read(meta.join("3.manifest")).unwrap();
    fs::write(meta.join("3.manifest"), &m3[..m3.len() / 2]).unwrap();
    fs::write(meta.join("1.stat"), b"short").unwrap();

    let run = fx.flip(&["releases", "--json", root]).success();
    let ids: Vec<u64> = run
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    // 2's record and 3's manifest are damaged: neither is listed, each named.
    assert_eq!(ids, vec![1, 4], "{}", run.stderr);
    for damaged in ["2.json", "3.manifest"] {
        assert!(
            run.stderr.contains(s(&meta.join(damaged))),
            "{}",
            run.stderr
        );
    }

    // Rollback skips the release whose manifest is damaged (naming it) and the unlisted one.
    let run = fx.flip(&["rollback", "--json", root]).success();
    assert_eq!(num(&run.json(), "/release"), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains(s(&meta.join("3.manifest"))),
        "{}",
        run.stderr
    );
    assert_eq!(fx.current_link(), "releases/1");

    // A deploy goes on, and says what it saw.
    public_site(&src, 5);
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/release"), 5);
    let w = warnings(&j).join("\n");
    assert!(w.contains("2.json"), "{j}");
    assert_dir_eq(&fx.current(), &src.tree(), "current after the deploy");
    fx.flip(&["verify", root]).success();
}

#[test]
fn a_damaged_live_manifest_does_not_fail_every_deploy() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);
    fs::write(
        fx.root.join(".flip/releases/1.manifest"),
        b"FLIPMAN?garbage",
    )
    .unwrap();
    public_site(&src, 2);
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/release"), 2);
    assert!(warnings(&j).join("\n").contains("1.manifest"), "{j}");
    assert_dir_eq(&fx.current(), &src.tree(), "current");
    fx.flip(&["verify", fx.root_str()]).success();
}

/// The live release's record (`N.json`) damaged or gone, its manifest gone, or its directory
/// gone: every deploy failed (exit 6 "a release is already being staged" from a client that
/// had staged ahead against it, exit 5 "release 1 does not exist" from any), until someone
/// repaired the target by hand. Now the deploy names what it found and makes a release of the
/// whole tree, linking what it still can, and so does the one after it.
#[test]
fn a_live_release_whose_record_manifest_or_directory_is_damaged_or_gone_is_deployed_over() {
    type Damage = fn(&Fx);
    let cases: [(&str, Damage, &str); 5] = [
        (
            "record damaged",
            |fx| fs::write(fx.root.join(".flip/releases/1.json"), b"{garbage").unwrap(),
            "1.json is damaged",
        ),
        (
            "record naming another manifest",
            |fx| {
                let p = fx.root.join(".flip/releases/1.json");
                let mut j: Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
                j["manifest_digest"] = Value::String("0".repeat(64));
                fs::write(&p, serde_json::to_vec(&j).unwrap()).unwrap();
            },
            "",
        ),
        (
            "record gone",
            |fx| fs::remove_file(fx.root.join(".flip/releases/1.json")).unwrap(),
            "1.json missing",
        ),
        (
            "manifest gone",
            |fx| fs::remove_file(fx.root.join(".flip/releases/1.manifest")).unwrap(),
            "1.manifest missing",
        ),
        (
            "directory gone",
            |fx| fs::remove_dir_all(fx.release(1)).unwrap(),
            "releases/1 missing",
        ),
    ];
    for (what, damage, named) in cases {
        let fx = Fx::new();
        let src = fx.src("src");
        public_site(&src, 1);
        fx.deploy(&src, &[]);
        damage(&fx);
        for v in [2, 3] {
            public_site(&src, v);
            let j = fx.deploy(&src, &[]);
            assert_eq!(
                fx.current_link(),
                format!("releases/{}", num(&j, "/release"))
            );
            assert_dir_eq(&fx.current(), &src.tree(), what);
            if v == 2 {
                let w = warnings(&j).join("\n");
                assert!(w.contains(named), "{what}: {j}");
            }
        }
        fx.flip(&["verify", fx.root_str()]).success();
    }
}

#[test]
fn crash_leftovers_and_unexpected_entries_are_cleaned_or_named() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);
    let state = fx.root.join(".flip");
    let temps = [
        state.join(".next-id.tmp-4242"),
        state.join("releases/.1.manifest.tmp-4242"),
        state.join("releases/.9.json.tmp-4242"),
    ];
    for t in &temps {
        fs::write(t, "half-written").unwrap();
    }
    let current_tmp = fx.root.join(".current.tmp-4242");
    std::os::unix::fs::symlink("releases/1", &current_tmp).unwrap();
    // A symlink named like a staging directory, pointing at somebody's files.
    let foreign = fx.path("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("precious.txt"), "keep me").unwrap();
    std::os::unix::fs::symlink(&foreign, fx.root.join("releases/.staging-9")).unwrap();
    // A file where a release directory would be.
    fs::write(fx.root.join("releases/7"), "not a release").unwrap();

    let run = fx.flip(&["releases", fx.root_str()]).success();
    assert!(
        run.stderr.contains(s(&fx.root.join("releases/7"))),
        "{}",
        run.stderr
    );

    public_site(&src, 2);
    let j = fx.deploy(&src, &[]);
    for t in &temps {
        assert!(!t.exists(), "{} was not cleaned", t.display());
    }
    assert!(
        fs::symlink_metadata(&current_tmp).is_err(),
        ".current.tmp-* not cleaned"
    );
    assert!(fs::symlink_metadata(fx.root.join("releases/.staging-9")).is_err());
    assert_eq!(
        fs::read_to_string(foreign.join("precious.txt")).unwrap(),
        "keep me"
    );
    assert_eq!(
        fs::read_to_string(fx.root.join("releases/7")).unwrap(),
        "not a release"
    );
    assert!(warnings(&j).join("\n").contains("releases/7"), "{j}");
    // Ids stay above everything found on disk.
    assert_eq!(num(&j, "/release"), 8, "{j}");
    assert_eq!(fx.current_link(), "releases/8");
}

#[test]
fn release_ids_near_the_largest_u64_never_wrap() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);
    let last = u64::MAX - 1;
    fs::write(fx.root.join(".flip/next-id"), format!("{last}\n")).unwrap();
    public_site(&src, 2);
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["release"].as_u64(), Some(last), "{j}");
    assert_eq!(fx.current_link(), format!("releases/{last}"));
    public_site(&src, 3);
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .code(5)
        .stderr_has("exhausted");
    assert_eq!(fx.current_link(), format!("releases/{last}"));
    assert!(
        fx.release_leftovers().is_empty(),
        "{:?}",
        fx.release_leftovers()
    );
}

#[test]
fn a_stray_directory_named_with_the_largest_id_does_not_stop_deploys() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);
    // Not flip's: no metadata, and the counter never got there.
    let stray = fx.root.join(format!("releases/{}", u64::MAX - 1));
    fs::create_dir(&stray).unwrap();
    public_site(&src, 2);
    let r = fx
        .flip(&["deploy", src.s(), fx.root_str(), "--json"])
        .success();
    let j = r.json();
    assert_eq!(j["release"].as_u64(), Some(2), "{j}");
    assert_eq!(fx.current_link(), "releases/2");
    assert!(
        warnings(&j).join("\n").contains("ids go on from 2"),
        "{j}\n{}",
        r.stderr
    );
    // The next one too: the warning is no dead end.
    public_site(&src, 3);
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["release"].as_u64(), Some(3), "{j}");
    assert!(stray.is_dir(), "flip never removes what it did not make");
}

#[test]
fn a_damaged_id_counter_is_rebuilt_without_reusing_ids() {
    let fx = Fx::new();
    let root = fx.root_str();
    let src = fx.src("src");
    for v in 1..=3 {
        public_site(&src, v);
        fx.deploy(&src, &[]);
    }
    // Back to 1, and prune 2 and 3: only the log still knows id 3 was used.
    fx.flip(&["activate", root, "1"]).success();
    fx.flip(&["prune", root, "--keep", "0"]).success();
    assert_eq!(fx.release_ids(), vec![1]);
    fs::write(fx.root.join(".flip/next-id"), "garbage").unwrap();
    public_site(&src, 4);
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/release"), 4, "{j}");
    assert!(warnings(&j).join("\n").contains("next-id"), "{j}");
    assert_eq!(
        fs::read_to_string(fx.root.join(".flip/next-id"))
            .unwrap()
            .trim(),
        "5"
    );
}

// ---------------------------------------------------------------------------------------------
// Sessions end cleanly
// ---------------------------------------------------------------------------------------------

/// A file whose name is not UTF-8: the scan refuses the source (exit 4).
fn poison(src: &Src) -> PathBuf {
    let p = src.dir.join(OsStr::from_bytes(b"bad-\xff-name"));
    fs::write(&p, "x").unwrap();
    p
}

#[test]
fn a_failed_first_deploy_leaves_no_target_behind() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    let bad = poison(&src);
    let nested = fx.path("new/deeper/target");
    for target in [fx.root.clone(), nested.clone()] {
        let run = fx.flip(&["deploy", src.s(), s(&target)]).code(4);
        assert!(!run.stderr.contains("Broken pipe"), "{}", run.stderr);
        assert!(!run.stderr.contains("flip agent"), "{}", run.stderr);
    }
    assert!(!fx.root.exists(), "the new target was left behind");
    assert!(
        !fx.path("new").exists(),
        "directories made for the target were left behind"
    );

    // An existing empty directory stays, empty.
    let empty = fx.path("empty");
    fs::create_dir(&empty).unwrap();
    fx.flip(&["deploy", src.s(), s(&empty)]).code(4);
    assert_eq!(
        fs::read_dir(&empty).unwrap().count(),
        0,
        "left in the empty target"
    );

    fs::remove_file(bad).unwrap();
    fx.deploy(&src, &[]);
    assert_eq!(fx.current_link(), "releases/1");
}

#[test]
fn a_failed_deploy_is_followed_at_once_by_a_retry_that_succeeds() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);
    for v in 2..=6u32 {
        public_site(&src, v);
        let bad = poison(&src);
        let run = fx.flip(&["deploy", src.s(), fx.root_str()]).code(4);
        assert!(!run.stderr.contains("Broken pipe"), "{}", run.stderr);
        assert!(!run.stderr.contains("flip agent"), "{}", run.stderr);
        fs::remove_file(bad).unwrap();
        // No --wait: the failed attempt's agent is gone and its lock with it.
        let j = fx.deploy(&src, &[]);
        assert_eq!(
            fx.current_link(),
            format!("releases/{}", num(&j, "/release"))
        );
        assert!(
            fx.release_leftovers().is_empty(),
            "{:?}",
            fx.release_leftovers()
        );
    }
}

#[test]
fn an_idle_agent_gives_up_and_releases_the_lock() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);

    // An agent whose client took the lock and then went silent (stopped, hung).
    let mut agent = Command::new(FLIP)
        .args(["agent", "--root", fx.root_str(), "--idle-timeout", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut tx = FrameWriter::new(Box::new(agent.stdin.take().unwrap()));
    let mut rx = FrameReader::new(Box::new(agent.stdout.take().unwrap()));
    tx.send(&Request::Hello {
        magic: MAGIC,
        protocol: PROTOCOL,
        version: "test".into(),
        compress: 0,
    })
    .unwrap();
    tx.flush().unwrap();
    assert!(matches!(
        rx.recv::<Response>().unwrap(),
        Response::Welcome { .. }
    ));
    tx.send(&Request::Lock {
        wait: false,
        holder: Holder {
            pid: 1,
            host: "test-host".into(),
            user: "tester".into(),
            since: 0,
            what: flip_wire::Purpose::Deploy,
            run: String::new(),
        },
    })
    .unwrap();
    tx.flush().unwrap();
    assert!(matches!(rx.recv::<Response>().unwrap(), Response::Locked));
    let started = Instant::now();

    // Meanwhile a deploy is refused, naming the holder.
    public_site(&src, 2);
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .code(3)
        .stderr_has(&format!("pid {}", agent.id()));

    // The agent gives up on its own while its stdin is still open.
    let status = loop {
        if let Some(st) = agent.try_wait().unwrap() {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the agent did not give up"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "gave up too early"
    );
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut agent.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("no request"), "{err}");
    drop(tx);
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/release"), 2);
}

/// The live release's own record damaged (its metadata or its manifest): a deploy of the same
/// tree names the damaged file, makes a new release and succeeds, and the one after it finds
/// that release live and unchanged. Before, every deploy failed (exit 7) on the damaged file.
#[test]
fn a_damaged_record_of_the_live_release_does_not_fail_every_deploy() {
    for (name, junk) in [("1.json", "{garbage"), ("1.manifest", "yy")] {
        let fx = Fx::new();
        let src = fx.src("src");
        public_site(&src, 1);
        fx.deploy(&src, &[]);
        std::fs::write(fx.root.join(".flip/releases").join(name), junk).unwrap();
        let r = fx.flip(&["deploy", src.s(), fx.root_str()]).success();
        assert!(
            r.stderr.contains(name) && r.stderr.contains("damaged"),
            "{name}: {}",
            r.stderr
        );
        assert_eq!(fx.current_link(), "releases/2", "{name}");
        assert_dir_eq(&fx.current(), &src.tree(), name);
        let j = fx.deploy(&src, &[]);
        assert_eq!(num(&j, "/release"), 2, "{name}: {j}");
        fx.flip(&["verify", fx.root_str()]).success();
    }
}

// ---------------------------------------------------------------------------------------------
// flip's files of .flip/ shared with another file by a hard link
// ---------------------------------------------------------------------------------------------

/// Two targets deployed: `fx.root` (B) and `other` (A).
fn two_targets(fx: &Fx, src: &Src) -> PathBuf {
    let other = fx.path("other-target");
    public_site(src, 1);
    fx.flip(&["deploy", src.s(), s(&other)]).success();
    fx.deploy(src, &[]);
    other
}

/// B's `.flip/lock` is a hard link to A's (a `cp -al` of a whole target, or planted), and a
/// deploy of A holds A's lock (here the test holds an `flock` on it). A deploy to B does not wait for A:
/// it replaces B's lock file by one of its own, says so naming it, and succeeds; A's lock keeps
/// its inode, bytes and holder (a deploy to A is still refused as locked). Before, the deploy
/// to B was refused (exit 3, "locked by" A's holder) for as long as A's deploy ran.
#[test]
fn a_lock_file_shared_by_a_hard_link_is_replaced_and_locks_only_its_target() {
    let fx = Fx::new();
    let src = fx.src("src");
    let a = two_targets(&fx, &src);
    let (a_lock, b_lock) = (a.join(".flip/lock"), fx.root.join(".flip/lock"));
    fs::remove_file(&b_lock).unwrap();
    fs::hard_link(&a_lock, &b_lock).unwrap();
    let a_bytes = fs::read(&a_lock).unwrap();
    let a_ino = ino(&a_lock);
    // A's deploy: an flock on A's lock, held here until dropped.
    let holder = fs::File::open(&a_lock).unwrap();
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&holder), libc::LOCK_EX) };
    assert_eq!(r, 0);

    public_site(&src, 2);
    let started = Instant::now();
    let j = fx.deploy(&src, &[]);
    assert!(started.elapsed() < Duration::from_secs(20), "waited for A");
    assert_eq!(fx.current_link(), "releases/2");
    let w = warnings(&j);
    assert!(
        w.iter()
            .any(|w| w.contains(s(&b_lock)) && w.contains("hard link")),
        "{w:?}"
    );
    let b_meta = fs::symlink_metadata(&b_lock).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&b_meta), 1);
    assert_ne!(ino(&b_lock), a_ino);
    // A's lock: untouched, and still A's holder's.
    assert_eq!(ino(&a_lock), a_ino);
    assert_eq!(
        std::os::unix::fs::MetadataExt::nlink(&fs::symlink_metadata(&a_lock).unwrap()),
        1
    );
    assert_eq!(fs::read(&a_lock).unwrap(), a_bytes);
    fx.flip(&["deploy", src.s(), s(&a)])
        .code(3)
        .stderr_has("locked");
    // The next deploy to B finds its own lock: no warning.
    public_site(&src, 3);
    let j = fx.deploy(&src, &[]);
    assert!(warnings(&j).is_empty(), "{j}");
    drop(holder);
    fx.flip(&["deploy", src.s(), s(&a)]).success();
}

/// `.flip/lock` of another type: a symlink to somebody's file, a directory with a file in it,
/// a FIFO. `flip doctor` says the next deploy replaces it; the deploy does (never opening nor
/// following it: the linked-to file keeps its bytes, the directory is moved aside whole),
/// names what it found in a warning and goes live; the deploy after that finds its own lock
/// quietly. Before, every deploy, rollback and prune was refused (exit 5) until someone
/// removed it by hand.
#[test]
fn a_lock_file_of_another_type_is_replaced_never_followed() {
    let fx = Fx::new();
    let src = fx.src("src");
    public_site(&src, 1);
    fx.deploy(&src, &[]);
    let lock = fx.root.join(".flip/lock");
    let foreign = fx.path("foreign.txt");
    fs::write(&foreign, "not flip's\n").unwrap();

    type Make<'a> = &'a dyn Fn(&Path);
    let dir: Make = &|p| {
        fs::create_dir(p).unwrap();
        fs::write(p.join("kept"), "somebody's").unwrap();
    };
    // Two directories in a row (within a second): each moved aside to a name of its own.
    let cases: [(&str, Make); 4] = [
        ("a symlink", &|p| {
            std::os::unix::fs::symlink(&foreign, p).unwrap()
        }),
        ("a directory", dir),
        ("a directory", dir),
        ("a special file", &|p| mkfifo(p)),
    ];
    for (n, (what, make)) in cases.iter().enumerate() {
        fs::remove_file(&lock).unwrap();
        make(&lock);
        let doctor = fx.flip(&["doctor", "--json", fx.root_str()]).json();
        let notes = doctor["hosts"][0]["findings"].to_string();
        assert!(
            notes.contains(&format!(".flip/lock is {what}, not flip's file")),
            "{what}: {notes}"
        );

        let release = n as u32 + 2;
        public_site(&src, release);
        let j = fx.deploy(&src, &[]);
        assert_eq!(j["release"], release, "{what}: {j}");
        assert_eq!(fx.current_link(), format!("releases/{release}"));
        let w = warnings(&j).join("\n");
        assert!(
            w.contains(&format!("{} was {what}", lock.display()))
                && w.contains("not flip's lock file"),
            "{what}: {w}"
        );
        assert!(fs::symlink_metadata(&lock).unwrap().is_file(), "{what}");
        assert_eq!(fs::read_to_string(&foreign).unwrap(), "not flip's\n");
        let j = fx
            .flip(&["prune", "--json", "--keep", "9", fx.root_str()])
            .success()
            .json();
        assert!(warnings(&j).is_empty(), "{what}: {j}");
    }
    let aside: Vec<PathBuf> = fs::read_dir(fx.root.join(".flip"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| s(p).contains("/lock.aside-"))
        .collect();
    assert_eq!(aside.len(), 2, "{aside:?}");
    for a in &aside {
        assert_eq!(fs::read_to_string(a.join("kept")).unwrap(), "somebody's");
    }
    let doctor = fx.flip(&["doctor", fx.root_str()]).success();
    assert!(
        doctor.stdout.contains("moved aside by flip")
            && doctor.stdout.contains(".flip/lock.aside-"),
        "{}",
        doctor.stdout
    );
}

/// An in-place edit made while a prune deletes an old release (same size, its mtime put back:
/// only the ctime tells) is never taken for the prune's own unlinking. The link ledger learns
/// the new state of the inodes the pruned release shared as their names go, one inode at a
/// time, before the rest of its tree is deleted (here the prune is held just after that, where
/// the edit is made); so a rollback to a release holding the edited inode refuses it (exit 7)
/// and the next deploy does not link it: the new release has the source's bytes. Before, the
/// ledger was updated after the whole deletion, comparing everything but the ctime: the edit
/// passed for the prune's, the rollback made it live and the next deploy linked it.
#[test]
fn an_edit_made_while_a_prune_runs_is_not_taken_for_the_prunes_own() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("keep.txt", "keep\n", 0o644)
        .file("a.txt", "v1\n", 0o644);
    fx.deploy(&src, &[]);
    for v in ["v2\n", "v3\n"] {
        src.overwrite("a.txt", v);
        fx.deploy(&src, &["--keep", "9"]);
    }
    let marker = fx.path("paused");
    let pause = format!("prune-before-delete:{}", marker.display());
    let prune = fx.spawn(
        &[("FLIP_PAUSE", pause.as_str())],
        &["prune", "--keep", "2", fx.root_str()],
    );
    let until = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(Instant::now() < until, "the prune never reached its pause");
        std::thread::sleep(Duration::from_millis(10));
    }
    let shared = fx.release(3).join("keep.txt");
    edit_in_place(&shared, b"KEEP\n");
    fs::remove_file(&marker).unwrap();
    prune.finish(Duration::from_secs(30)).success();
    assert_eq!(fx.release_ids(), vec![2, 3]);

    fx.flip(&["rollback", fx.root_str()])
        .code(7)
        .stderr_has("keep.txt: content differs from the manifest");
    assert_eq!(fx.current_link(), "releases/3");
    src.overwrite("a.txt", "v4\n");
    let j = fx.deploy(&src, &["--keep", "9"]);
    assert_eq!(j["release"], 4, "{j}");
    assert_eq!(fs::read(fx.current().join("keep.txt")).unwrap(), b"keep\n");
    assert_ne!(ino(&fx.current().join("keep.txt")), ino(&shared));
}

/// Two first deploys into one new directory at once: the second found the directory holding
/// the first's `releases/` and no `.flip/` yet, called it "not a flip target" (exit 5, even
/// with `--wait`) and advised deploying into an empty directory. `.flip/` is now made first:
/// paused right after it, the first deploy leaves a directory the second takes for the target
/// it is, and both succeed.
#[test]
fn a_target_another_deploy_is_making_is_taken_for_a_target() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    let marker = fx.path("paused");
    let pause = format!("init-after-state:{}", marker.display());
    let first = fx.spawn(
        &[("FLIP_PAUSE", pause.as_str())],
        &["deploy", "--json", src.s(), fx.root_str()],
    );
    let until = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(
            Instant::now() < until,
            "the first deploy never reached its pause"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["release"], 1, "{j}");
    assert_eq!(j["warnings"], serde_json::json!([]), "{j}");
    fs::remove_file(&marker).unwrap();
    let j = first.finish(Duration::from_secs(30)).success().json();
    assert_eq!(j["unchanged"], true, "{j}");
    assert_eq!(fx.current_link(), "releases/1");
    assert_dir_eq(&fx.current(), &src.tree(), "the first deploy's release");
    // In a target that had them, a lost directory of flip's is made again, and said.
    fs::remove_dir_all(fx.root.join(".flip/releases")).unwrap();
    site_v2(&src);
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["release"], 2, "{j}");
    let made = format!(
        "{} was missing; made again",
        fx.root.join(".flip/releases").display()
    );
    assert_eq!(
        j["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| **w == made)
            .count(),
        1,
        "{j}"
    );
}

/// B's `.flip/log` is a hard link to A's: a deploy to B appends nothing to it (A's log keeps
/// its bytes), starts a log of its own (a new inode, one link) whose first line is a
/// `log-restarted` event saying why, followed by this deploy's events, and names it in a
/// warning; the deploy after that appends to the new log quietly.
#[test]
fn a_log_shared_by_a_hard_link_restarts_and_leaves_the_other_log_unchanged() {
    let fx = Fx::new();
    let src = fx.src("src");
    let a = two_targets(&fx, &src);
    let (a_log, b_log) = (a.join(".flip/log"), fx.root.join(".flip/log"));
    fs::remove_file(&b_log).unwrap();
    fs::hard_link(&a_log, &b_log).unwrap();
    let doctor = fx.flip(&["doctor", "--json", fx.root_str()]).json();
    let notes = doctor["hosts"][0]["findings"].to_string();
    assert!(
        notes.contains(".flip/log shares its inode with 1 other name(s) by a hard link"),
        "{notes}"
    );
    let a_bytes = fs::read(&a_log).unwrap();
    let a_ino = ino(&a_log);

    public_site(&src, 2);
    let j = fx.deploy(&src, &[]);
    assert_eq!(fx.current_link(), "releases/2");
    let w = warnings(&j);
    assert!(
        w.iter()
            .any(|w| w.contains(s(&b_log)) && w.contains("hard link")),
        "{w:?}"
    );
    assert_eq!(fs::read(&a_log).unwrap(), a_bytes, "A's log unchanged");
    assert_eq!(ino(&a_log), a_ino);
    assert_ne!(ino(&b_log), a_ino);
    let nlink = |p: &Path| std::os::unix::fs::MetadataExt::nlink(&fs::symlink_metadata(p).unwrap());
    assert_eq!(nlink(&b_log), 1);
    assert_eq!(nlink(&a_log), 1);
    let lines: Vec<Value> = fs::read_to_string(&b_log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["event"], "log-restarted", "{lines:?}");
    assert!(
        lines[0]["reason"].as_str().unwrap().contains("hard link"),
        "{lines:?}"
    );
    assert!(
        lines[1..]
            .iter()
            .any(|l| l["event"] == "activate" && l["release"] == 2),
        "{lines:?}"
    );

    // The next deploy appends to the new log, without a warning.
    let restarted = ino(&b_log);
    public_site(&src, 3);
    let j = fx.deploy(&src, &[]);
    assert!(warnings(&j).is_empty(), "{j}");
    assert_eq!(ino(&b_log), restarted);
    let text = fs::read_to_string(&b_log).unwrap();
    assert_eq!(text.matches("log-restarted").count(), 1);
    assert_eq!(fs::read(&a_log).unwrap(), a_bytes);
}
