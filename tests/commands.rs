//! The other commands through the real binary: rollback, activate, releases, prune, verify,
//! the lock, --no-activate, and the errors a user can run into (with their exit codes).

mod common;

use common::*;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

/// A target with release 1 (site v1) and release 2 (site v2, live), and both trees.
fn two_releases(fx: &Fx) -> (Src, Tree, Tree) {
    let src = fx.src("src");
    site_v1(&src);
    let v1 = src.tree();
    fx.deploy(&src, &[]);
    site_v2(&src);
    let v2 = src.tree();
    fx.deploy(&src, &[]);
    assert_eq!(fx.current_link(), "releases/2");
    (src, v1, v2)
}

/// Deploys a tiny source whose one file says `tag`.
fn deploy_tag(fx: &Fx, tag: &str, extra: &[&str]) -> serde_json::Value {
    let src = fx.src("tagged");
    src.file("version.txt", tag, 0o644);
    fx.deploy(&src, extra)
}

#[test]
fn rollback_and_activate() {
    let fx = Fx::new();
    let (_src, v1, v2) = two_releases(&fx);
    let root = fx.root_str();

    let j = fx.flip(&["rollback", "--json", root]).success().json();
    assert_eq!(num(&j, "/release"), 1);
    assert_eq!(num(&j, "/previous"), 2);
    assert_eq!(fx.current_link(), "releases/1");
    assert_dir_eq(&fx.current(), &v1, "current after rollback");

    // Nothing older than 1: refused, current untouched.
    fx.flip(&["rollback", root]).code(5).stderr_has("roll back");
    assert_eq!(fx.current_link(), "releases/1");

    fx.flip(&["rollback", "--to", "2", root]).success();
    assert_eq!(fx.current_link(), "releases/2");
    assert_dir_eq(&fx.current(), &v2, "current after rollback --to 2");

    fx.flip(&["rollback", root]).success();
    assert_eq!(fx.current_link(), "releases/1");
    let j = fx.flip(&["activate", "--json", root, "2"]).success().json();
    assert_eq!(num(&j, "/release"), 2);
    assert_eq!(num(&j, "/previous"), 1);
    assert_eq!(fx.current_link(), "releases/2");
    assert_dir_eq(&fx.current(), &v2, "current after activate 2");

    fx.flip(&["activate", root, "9"])
        .code(5)
        .stderr_has("does not exist");
    fx.flip(&["rollback", "--to", "9", root])
        .code(5)
        .stderr_has("does not exist");
    assert_eq!(fx.current_link(), "releases/2");

    // Both releases still intact after all the switching.
    assert_dir_eq(&fx.release(1), &v1, "releases/1");
    assert_dir_eq(&fx.release(2), &v2, "releases/2");
}

/// A release edited in place after it was deployed (same size, its mtime set back: only its
/// ctime tells) is not made live again by a rollback or an activate: exit 7, naming the file
/// and what differs, `current` untouched. A file only touched (same bytes) is hashed and
/// accepted; a file added to a release is a difference too. `--force` makes it live as it is.
/// Before, the rollback made the edited tree live without a word.
#[test]
fn a_release_changed_since_it_was_deployed_is_not_made_live_again_unless_forced() {
    let fx = Fx::new();
    let (_src, v1, _v2) = two_releases(&fx);
    let root = fx.root_str();
    let edited = fx.release(1).join("small.txt");
    edit_in_place(&edited, b"small XX\n");
    // Shared by both releases, only touched: its bytes are still the deployed ones.
    fs::File::options()
        .write(true)
        .open(fx.release(1).join("index.html"))
        .unwrap()
        .set_modified(std::time::SystemTime::now())
        .unwrap();

    let shown = s(&fx.release(1)).to_string();
    for args in [vec!["rollback", root], vec!["activate", root, "1"]] {
        fx.flip(&args)
            .code(7)
            .stderr_has(&format!("{shown} has changed since it was deployed"))
            .stderr_has("small.txt: content differs from the manifest")
            .stderr_has("--force");
        assert_eq!(fx.current_link(), "releases/2");
    }
    let j = fx.flip(&["rollback", "--json", root]).code(7).json();
    assert_eq!(j["error"]["code"], 7, "{j}");

    fx.flip(&["rollback", "--force", root]).success();
    assert_eq!(fx.current_link(), "releases/1");
    assert_eq!(
        fs::read(fx.current().join("small.txt")).unwrap(),
        b"small XX\n"
    );

    // Back as deployed (its ctime is new: hashed, and the same): made live without --force.
    fx.flip(&["activate", root, "2"]).success();
    fs::write(&edited, "small v1\n").unwrap();
    fx.flip(&["rollback", root]).success();
    assert_eq!(fx.current_link(), "releases/1");
    assert_dir_eq(&fx.current(), &v1, "releases/1 as deployed");

    // A file added to release 2.
    fs::write(fx.release(2).join("planted.php"), "<?php evil();\n").unwrap();
    fx.flip(&["activate", root, "2"])
        .code(7)
        .stderr_has("planted.php: not in the manifest");
    assert_eq!(fx.current_link(), "releases/1");
    fx.flip(&["activate", "--force", root, "2"]).success();
    assert_eq!(fx.current_link(), "releases/2");
}

/// What the rollback check finds in a release is named in path order, and planted names never
/// pass for the manifest's: a directory added with files in it is named before them; a name
/// that is not UTF-8 (shown with U+FFFD) is added even when the manifest has the name it shows
/// as; a release directory replaced by a symlink is refused as what it is by `activate` and
/// `verify` alike (exit 5), never followed, and `flip doctor` names it. Before, the files of a
/// planted directory were named and the directory itself was not, the non-UTF-8 name passed,
/// and `verify` followed the symlink.
#[test]
fn the_rollback_check_names_planted_things_as_they_are() {
    use std::os::unix::ffi::OsStrExt;
    let fx = Fx::new();
    let root = fx.root_str();
    let src = fx.src("src");
    src.file("d/\u{FFFD}.php", "ok\n", 0o644)
        .file("v.txt", "1\n", 0o644);
    fx.deploy(&src, &[]);
    src.overwrite("v.txt", "2\n");
    fx.deploy(&src, &[]);

    let d = fx.release(1).join("d");
    let odd = d.join(std::ffi::OsStr::from_bytes(b"\xff.php"));
    fs::write(&odd, "<?php evil();\n").unwrap();
    fx.flip(&["rollback", root])
        .code(7)
        .stderr_has(".php: not in the manifest");
    fs::remove_file(&odd).unwrap();

    fs::create_dir_all(d.join("w")).unwrap();
    for i in 0..5 {
        fs::write(d.join(format!("w/f{i}")), "x").unwrap();
    }
    fx.flip(&["rollback", root])
        .code(7)
        .stderr_has("(d/w: not in the manifest; d/w/f0: not in the manifest; d/w/f1: not in the manifest, and 3 more)");
    fs::remove_dir_all(d.join("w")).unwrap();
    fx.flip(&["rollback", root]).success();
    fx.flip(&["activate", root, "2"]).success();

    let elsewhere = fx.path("elsewhere");
    fs::rename(fx.release(1), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, fx.release(1)).unwrap();
    for args in [vec!["activate", root, "1"], vec!["verify", root, "1"]] {
        fx.flip(&args)
            .code(5)
            .stderr_has(&format!("{} is a symlink", s(&fx.release(1))));
    }
    assert_eq!(fx.current_link(), "releases/2");
    // flip doctor names it as a problem (it said nothing).
    let doctor = fx.flip(&["doctor", root]).code(11);
    assert!(
        doctor
            .stdout
            .contains("PROBLEM: releases: releases/1 is not a complete release")
            && doctor.stdout.contains("is a symlink"),
        "{}",
        doctor.stdout
    );
}

#[test]
fn rollback_to_the_live_release_changes_nothing_as_activate() {
    let fx = Fx::new();
    two_releases(&fx);
    fx.flip(&["rollback", "--to", "2", fx.root_str()])
        .success()
        .stderr_has("already live; nothing changed");
    assert_eq!(fx.current_link(), "releases/2");
}

#[test]
fn releases_lists_ids_labels_and_the_live_one() {
    let fx = Fx::new();
    let root = fx.root_str();
    // A target that does not exist yet is an error, and is not created.
    fx.flip(&["releases", root])
        .code(5)
        .stderr_has("does not exist");
    assert!(!fx.root.exists());
    let src = fx.src("src");
    site_v1(&src);
    fx.deploy(&src, &["--label", "first cut"]);
    site_v2(&src);
    fx.deploy(&src, &[]);

    let j = fx.flip(&["releases", "--json", root]).success().json();
    let arr = j.as_array().expect("an array");
    assert_eq!(arr.len(), 2, "{j}");
    for (r, id) in arr.iter().zip([1u64, 2]) {
        let keys: Vec<&str> = r.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        for k in ["id", "label", "created", "files", "bytes", "current"] {
            assert!(keys.contains(&k), "{k} missing in {r}");
        }
        assert_eq!(num(r, "/id"), id);
        assert_eq!(num(r, "/files"), 10);
        let created = r["created"].as_str().unwrap();
        assert_eq!(created.len(), 20, "{created}");
        assert_eq!(&created[10..11], "T", "{created}");
        assert!(created.ends_with('Z'), "{created}");
    }
    assert!(
        arr[0]["created"].as_str() <= arr[1]["created"].as_str(),
        "{j}"
    );
    assert_eq!(arr[0]["label"], "first cut");
    assert!(arr[1]["label"].is_null());
    assert_eq!(arr[0]["current"], false);
    assert_eq!(arr[1]["current"], true);
    let bytes: u64 = files_of(&src.tree())
        .iter()
        .map(|f| src.read(f).len() as u64)
        .sum();
    assert_eq!(num(&arr[1], "/bytes"), bytes);

    let human = fx.flip(&["releases", root]).success();
    let rows: Vec<&str> = human.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{}", human.stdout);
    let ids: Vec<&str> = rows
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(ids, vec!["1", "2"]);
    assert!(rows[0].contains("first cut"), "{}", rows[0]);
    assert!(!rows[0].contains('*'), "{}", rows[0]);
    assert!(rows[1].contains('*'), "{}", rows[1]);

    // After a rollback the live marker moves.
    fx.flip(&["rollback", root]).success();
    assert_eq!(fx.listed(), vec![(1, true), (2, false)]);
}

#[test]
fn prune_never_removes_the_live_release_or_the_rollback_target() {
    let fx = Fx::new();
    let root = fx.root_str();
    for t in ["a", "b", "c", "d"] {
        deploy_tag(&fx, t, &["--keep", "10"]);
    }
    assert_eq!(fx.release_ids(), vec![1, 2, 3, 4]);
    fx.flip(&["activate", root, "2"]).success();
    let r1 = read_tree(&fx.release(1));
    let r2 = read_tree(&fx.release(2));

    // Live 2, rollback target 1, newest 4: only 3 goes.
    let j = fx
        .flip(&["prune", "--json", "--keep", "1", root])
        .success()
        .json();
    assert_eq!(j["pruned"], serde_json::json!([3]));
    assert_eq!(fx.release_ids(), vec![1, 2, 4]);
    assert_eq!(fx.current_link(), "releases/2");
    assert_dir_eq(&fx.release(1), &r1, "rollback target after prune");
    assert_dir_eq(&fx.release(2), &r2, "live release after prune");
    assert!(!fx.meta_files().iter().any(|f| f.starts_with("3.")));

    // Even keep 0 spares the live release and its rollback target.
    let j = fx
        .flip(&["prune", "--json", "--keep", "0", root])
        .success()
        .json();
    assert_eq!(j["pruned"], serde_json::json!([4]));
    assert_eq!(fx.release_ids(), vec![1, 2]);
    assert_eq!(fx.listed(), vec![(1, false), (2, true)]);
    fx.flip(&["rollback", root]).success();
    assert_eq!(fx.current_link(), "releases/1");
    fx.flip(&["activate", root, "2"]).success();

    // Ids are never reused: 3 and 4 are gone, the next deploy is 5.
    let j = deploy_tag(&fx, "e", &[]);
    assert_eq!(num(&j, "/release"), 5);

    // deploy --keep 1: live 6 and rollback target 5 stay, 1 and 2 go.
    let j = deploy_tag(&fx, "f", &["--keep", "1"]);
    assert_eq!(num(&j, "/release"), 6);
    assert_eq!(j["pruned"], serde_json::json!([1, 2]));
    assert_eq!(fx.release_ids(), vec![5, 6]);
    assert_eq!(
        fx.meta_files(),
        vec![
            "5.json",
            "5.manifest",
            "5.stat",
            "6.json",
            "6.manifest",
            "6.stat"
        ]
    );
    assert_eq!(fs::read(fx.current().join("version.txt")).unwrap(), b"f");
    assert_eq!(fs::read(fx.release(5).join("version.txt")).unwrap(), b"e");
    fx.flip(&["rollback", root]).success();
    assert_eq!(fx.current_link(), "releases/5");
    fx.flip(&["verify", root]).success();
}

/// `flip releases` still shows which release is live when that release's metadata is
/// damaged: its row, marked live and damaged, in id order, with what is unknown left out.
#[test]
fn releases_marks_a_live_release_whose_metadata_is_damaged() {
    let fx = Fx::new();
    let root = fx.root_str();
    for t in ["a", "b", "c"] {
        deploy_tag(&fx, t, &[]);
    }
    fx.flip(&["activate", root, "2"]).success();
    fs::write(fx.root.join(".flip/releases/2.json"), "garbage").unwrap();
    let r = fx.flip(&["releases", "--json", root]).success();
    let j = r.json();
    let rows = j.as_array().unwrap();
    let ids: Vec<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![1, 2, 3], "{j}");
    assert_eq!(rows[1]["current"], true, "{j}");
    assert_eq!(rows[1]["damaged"], true, "{j}");
    assert_eq!(rows[1]["files"], serde_json::Value::Null, "{j}");
    assert_eq!(rows[0]["damaged"], false, "{j}");
    assert!(r.stderr.contains("release 2 is not listed"), "{}", r.stderr);
    let r = fx.flip(&["releases", root]).success();
    let live: Vec<&str> = r.stdout.lines().filter(|l| l.contains('*')).collect();
    assert_eq!(live.len(), 1, "{}", r.stdout);
    assert!(
        live[0].trim_start().starts_with("2 ")
            && live[0].ends_with("(not listed: its directory or metadata is missing or damaged)"),
        "{}",
        r.stdout
    );
}

/// A release that is not live, whose manifest is not the one recorded at commit (garbage
/// written over it), is left out of the listing with a warning, as one whose record is
/// damaged: it was listed as healthy (`"damaged": false`), though a rollback skipped it and
/// `flip verify` failed on it.
#[test]
fn a_release_whose_manifest_is_damaged_is_not_listed() {
    let fx = Fx::new();
    let root = fx.root_str();
    for t in ["a", "b", "c", "d"] {
        deploy_tag(&fx, t, &["--keep", "10"]);
    }
    fs::write(fx.root.join(".flip/releases/3.manifest"), "garbage").unwrap();
    assert_eq!(fx.listed(), vec![(1, false), (2, false), (4, true)]);
    let r = fx.flip(&["releases", root]).success();
    assert!(
        r.stderr.contains("release 3 is not listed") && r.stderr.contains("3.manifest"),
        "{}",
        r.stderr
    );
    // The rollback goes past it, to 2.
    fx.flip(&["rollback", root]).success();
    assert_eq!(fx.current_link(), "releases/2");
}

/// A release whose metadata is damaged is left out of the listing (warned about on every
/// command); once it is older than every release kept, a prune removes it, tree and metadata,
/// so the warning stops. A damaged newer one stays (it may be a rollback the user wants back).
#[test]
fn a_release_with_damaged_metadata_is_pruned_once_older_than_every_kept_one() {
    let fx = Fx::new();
    let root = fx.root_str();
    for t in ["a", "b", "c", "d"] {
        deploy_tag(&fx, t, &["--keep", "10"]);
    }
    let meta = fx.root.join(".flip/releases");
    fs::write(meta.join("1.json"), "garbage").unwrap();
    fs::remove_file(meta.join("3.json")).unwrap();
    let r = fx.flip(&["releases", root]).success();
    assert!(r.stderr.contains("release 1 is not listed"), "{}", r.stderr);
    // Keep 1: live 4 and rollback target 2 stay; 3 is newer than 2: stays too.
    let j = fx
        .flip(&["prune", "--json", "--keep", "1", root])
        .success()
        .json();
    assert_eq!(j["pruned"], serde_json::json!([1]), "{j}");
    assert_eq!(fx.release_ids(), vec![2, 3, 4]);
    assert!(!fx.meta_files().iter().any(|f| f.starts_with("1.")));
    // Keep 0 spares live 4 and rollback target 2; 3, between them, stays.
    let j = fx
        .flip(&["prune", "--json", "--keep", "0", root])
        .success()
        .json();
    assert_eq!(j["pruned"], serde_json::json!([]), "{j}");
    // The next deploy (keep 1) keeps 5 and its rollback target 4: 2 and 3 go.
    let j = deploy_tag(&fx, "e", &["--keep", "1"]);
    assert_eq!(j["pruned"], serde_json::json!([2, 3]), "{j}");
    assert_eq!(fx.release_ids(), vec![4, 5]);
    let r = fx.flip(&["releases", root]).success();
    assert!(!r.stderr.contains("not listed"), "{}", r.stderr);
}

/// A release holding a directory tree thousands of levels deep (an application's cache gone
/// wrong, or planted) is pruned completely by an agent limited to 64 open files: it used to
/// stay a leftover forever, "Too many open files" on every deploy.
#[test]
fn a_release_thousands_of_directories_deep_is_pruned_with_few_descriptors() {
    let fx = Fx::new();
    let root = fx.root_str();
    deploy_tag(&fx, "a", &[]);
    let mut deep = fx.release(1);
    for _ in 0..2000 {
        deep.push("d");
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("f"), "x").unwrap();
    // A symlink to a directory outside, deep down: removed itself, never followed.
    let outside = fx.path("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("keep"), "k").unwrap();
    std::os::unix::fs::symlink(&outside, deep.join("out")).unwrap();
    deploy_tag(&fx, "b", &[]);
    let src = fx.src("tagged");
    src.file("version.txt", "c", 0o644);
    let out = std::process::Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\" \"$@\"", FLIP])
        .args(["deploy", "--json", src.s(), root, "--keep", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["pruned"], serde_json::json!([1]), "{j}");
    assert_eq!(j["leftovers"], serde_json::json!([]), "{j}");
    assert_eq!(fx.release_ids(), vec![2, 3]);
    let entries: Vec<_> = fs::read_dir(fx.root.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(fs::read(outside.join("keep")).unwrap(), b"k");
}

#[test]
fn ids_are_never_reused_after_pruning_the_newest_releases() {
    let fx = Fx::new();
    let root = fx.root_str();
    for t in ["a", "b", "c"] {
        deploy_tag(&fx, t, &[]);
    }
    fx.flip(&["activate", root, "1"]).success();
    let j = fx
        .flip(&["prune", "--json", "--keep", "0", root])
        .success()
        .json();
    assert_eq!(j["pruned"], serde_json::json!([2, 3]));
    assert_eq!(fx.release_ids(), vec![1]);
    let j = deploy_tag(&fx, "d", &[]);
    assert_eq!(num(&j, "/release"), 4);
    assert_eq!(fx.current_link(), "releases/4");
    assert_eq!(fs::read(fx.current().join("version.txt")).unwrap(), b"d");
}

/// The lock taken with a plain `flock` (maintenance, another tool): the lock file still names
/// the agent of the last deploy, which has exited. The deploy and `flip doctor` say the holder
/// did not write its name, and name that pid only as an earlier holder's (they named it as the
/// holder, sending the reader after a process that no longer runs).
#[test]
fn a_lock_taken_with_a_plain_flock_is_not_blamed_on_the_last_deploy() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    fx.deploy(&src, &[]);
    let left: serde_json::Value =
        serde_json::from_slice(&fs::read(fx.root.join(".flip/lock")).unwrap()).unwrap();
    let earlier = left["pid"]
        .as_u64()
        .expect("the deploy's agent wrote its pid");
    let lock = hold_root_lock(&fx.root);
    site_v2(&src);
    let j = fx
        .flip(&["deploy", "--json", src.s(), fx.root_str()])
        .code(3)
        .json();
    let m = j["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("a process that has not written its name into the lock file")
            && m.contains(&format!("pid {earlier} on "))
            && m.contains("earlier holder that no longer runs"),
        "{m}"
    );
    let doctor = fx.flip(&["doctor", "--json", fx.root_str()]).json();
    let found = doctor["hosts"][0]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "lock")
        .unwrap_or_else(|| panic!("{doctor}"))
        .clone();
    let m = found["message"].as_str().unwrap();
    assert!(
        m.contains(&format!(
            "locked by pid {} (it has not written its name",
            std::process::id()
        )) && m.contains(&format!("the name there, pid {earlier} on ")),
        "{m}"
    );
    drop(lock);
    fx.deploy(&src, &[]);
    assert_eq!(fx.current_link(), "releases/2");
}

/// Takes the target's lock from this process, as another flip would, with a holder record.
fn hold_lock(fx: &Fx) -> fs::File {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.root.join(".flip/lock"))
        .expect("lock file");
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(r, 0, "the test could not take the lock");
    f.set_len(0).unwrap();
    f.write_all(br#"{"pid":123,"host":"h","user":"u","since":0,"what":"deploy"}"#)
        .unwrap();
    f.flush().unwrap();
    f
}

#[test]
fn a_held_lock_fails_at_once_naming_the_holder() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    let v1 = src.tree();
    fx.deploy(&src, &[]);
    let next_id = fs::read(fx.root.join(".flip/next-id")).unwrap();
    let lock = hold_lock(&fx);
    site_v2(&src);
    let root = fx.root_str();

    fx.flip(&["deploy", src.s(), root])
        .code(3)
        .stderr_has("pid 123")
        .stderr_has("--wait");
    let j = fx.flip(&["deploy", "--json", src.s(), root]).code(3).json();
    assert_eq!(num(&j, "/error/code"), 3);
    assert!(
        j["error"]["message"].as_str().unwrap().contains("pid 123"),
        "{j}"
    );
    // Other commands that change the target honour the lock too.
    fx.flip(&["rollback", root]).code(3).stderr_has("pid 123");
    fx.flip(&["activate", root, "1"]).code(3);
    fx.flip(&["prune", root]).code(3);

    // Nothing happened: same release, same content, no id used up.
    assert_eq!(fx.current_link(), "releases/1");
    assert_eq!(fx.release_ids(), vec![1]);
    assert!(fx.release_leftovers().is_empty());
    assert_dir_eq(&fx.current(), &v1, "current while locked");
    assert_eq!(fs::read(fx.root.join(".flip/next-id")).unwrap(), next_id);

    // Read-only commands do not need the lock.
    fx.flip(&["releases", root]).success();
    fx.flip(&["verify", root]).success();

    drop(lock);
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/release"), 2);
}

#[test]
fn deploy_wait_blocks_until_the_lock_is_released() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    fx.deploy(&src, &[]);
    site_v2(&src);
    let v2 = src.tree();

    let lock = hold_lock(&fx);
    let mut waiting = fx.spawn(&[], &["deploy", "--wait", "--json", src.s(), fx.root_str()]);
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        drop(lock);
    });
    // It cannot have finished while the lock is held (it may not even have asked yet).
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        waiting.is_running(),
        "deploy --wait did not wait for the lock"
    );
    releaser.join().unwrap();

    let run = waiting.finish(TIMEOUT).success();
    assert!(run.stderr.contains("pid 123"), "{}", run.stderr);
    assert!(run.stderr.contains("waiting"), "{}", run.stderr);
    assert_eq!(num(&run.json(), "/release"), 2);
    assert_eq!(fx.current_link(), "releases/2");
    assert_dir_eq(&fx.current(), &v2, "current after waiting");
}

#[test]
fn no_activate_stages_without_going_live() {
    let fx = Fx::new();
    let root = fx.root_str();
    let src = fx.src("src");
    site_v1(&src);
    let v1 = src.tree();
    fx.deploy(&src, &[]);
    site_v2(&src);
    let v2 = src.tree();

    let j = fx.deploy(&src, &["--no-activate", "--keep", "0"]);
    assert_eq!(num(&j, "/release"), 2);
    assert_eq!(j["activated"], false);
    assert_eq!(j["pruned"], serde_json::json!([]));
    assert_eq!(fx.current_link(), "releases/1");
    assert_dir_eq(&fx.current(), &v1, "current after --no-activate");
    assert_dir_eq(&fx.release(2), &v2, "staged release 2");
    assert_eq!(fx.listed(), vec![(1, true), (2, false)]);
    fx.flip(&["verify", root, "2"]).success();

    let j = fx.flip(&["activate", "--json", root, "2"]).success().json();
    assert_eq!(num(&j, "/release"), 2);
    assert_eq!(num(&j, "/previous"), 1);
    assert_eq!(fx.current_link(), "releases/2");
    assert_dir_eq(&fx.current(), &v2, "current after activate");
    assert_eq!(fx.listed(), vec![(1, false), (2, true)]);

    // `--keep` holds for a staged release too (it was ignored): kept are the staged one, the
    // live one and its rollback target.
    src.file("index.html", "v3", 0o644);
    fx.deploy(&src, &["--keep", "9"]);
    src.file("index.html", "v4", 0o644);
    let j = fx.deploy(&src, &["--no-activate", "--keep", "1"]);
    assert_eq!(j["pruned"], serde_json::json!([1]), "{j}");
    assert_eq!(fx.listed(), vec![(2, false), (3, true), (4, false)]);
}

#[test]
fn verify_detects_a_tampered_file() {
    let fx = Fx::new();
    let root = fx.root_str();
    two_releases(&fx);
    fx.flip(&["verify", root]).success();
    let j = fx.flip(&["verify", "--json", root]).success().json();
    assert_eq!(j["ok"], true);
    assert_eq!(num(&j, "/release"), 2);
    assert_eq!(j["problems"], serde_json::json!([]));

    // Same length, same mode, different bytes, in a new inode (index.html is shared with
    // release 1, which must stay intact).
    let live = fx.release(2).join("index.html");
    let original = fs::read(&live).unwrap();
    let mut forged = original.clone();
    forged[0] ^= 0x20;
    let tmp = fx.release(2).join(".forged");
    fs::write(&tmp, &forged).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
    fs::rename(&tmp, &live).unwrap();

    fx.flip(&["verify", root]).code(7).stderr_has("index.html");
    let j = fx.flip(&["verify", "--json", root]).code(7).json();
    assert_eq!(j["ok"], false);
    let problems = j["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{j}");
    assert!(problems[0].as_str().unwrap().contains("index.html"), "{j}");

    // Release 1 was not touched by the forgery.
    assert_eq!(
        fs::read(fx.release(1).join("index.html")).unwrap(),
        original
    );
    fx.flip(&["verify", root, "1"]).success();

    // An extra file is a problem too.
    fs::write(fx.release(1).join("intruder.php"), "<?php").unwrap();
    fx.flip(&["verify", root, "1"])
        .code(7)
        .stderr_has("intruder.php");
}

#[test]
fn missing_source_is_a_source_error() {
    let fx = Fx::new();
    let missing = fx.path("no-such-dir");
    fx.flip(&["deploy", missing.to_str().unwrap(), fx.root_str()])
        .code(4)
        .stderr_has(missing.to_str().unwrap());
    assert!(!fx.root.exists(), "a failed deploy created the target");

    let file = fx.path("a-file");
    fs::write(&file, "x").unwrap();
    fx.flip(&["deploy", file.to_str().unwrap(), fx.root_str()])
        .code(4)
        .stderr_has("not a directory");
}

#[test]
fn target_that_is_a_file_is_a_target_error() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    let target = fx.path("target-file");
    fs::write(&target, "precious").unwrap();
    fx.flip(&["deploy", src.s(), target.to_str().unwrap()])
        .code(5)
        .stderr_has("not a directory");
    assert_eq!(fs::read(&target).unwrap(), b"precious");
}

#[test]
fn foreign_non_empty_target_is_refused_and_untouched() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    let target = fx.src("somebody-elses");
    target.file("index.php", "<?php echo 1;", 0o644);
    let before = target.tree();
    fx.flip(&["deploy", src.s(), target.s()])
        .code(5)
        .stderr_has("not a flip target");
    assert_tree_eq(&target.tree(), &before, "the foreign directory");
    // Read-only commands refuse it too, without creating anything.
    fx.flip(&["releases", target.s()]).code(5);
    fx.flip(&["rollback", target.s()]).code(5);
    assert_tree_eq(&target.tree(), &before, "the foreign directory");
}

#[test]
fn an_existing_empty_directory_becomes_a_target() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    fs::create_dir(&fx.root).unwrap();
    fx.deploy(&src, &[]);
    assert_eq!(fx.current_link(), "releases/1");
    assert_dir_eq(&fx.current(), &src.tree(), "current");
}

#[test]
fn usage_errors_exit_2() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    fx.flip(&["deploy", "--bogus", src.s(), fx.root_str()])
        .code(2)
        .stderr_has("--bogus");
    fx.flip(&["deploy", src.s()]).code(2);
    fx.flip(&["frobnicate"]).code(2);
    fx.flip(&["activate", fx.root_str(), "not-a-number"])
        .code(2);
    fx.flip(&["deploy", "--compress-level", "42", src.s(), fx.root_str()])
        .code(2);
    assert!(!fx.root.exists());
    fx.flip(&["--help"]).success();
}

#[test]
fn current_replaced_by_a_directory_is_not_touched() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    fx.deploy(&src, &[]);
    fs::remove_file(fx.current()).unwrap();
    let hand_made = Src { dir: fx.current() };
    hand_made.file("index.html", "hand-made, do not lose", 0o644);
    let before = hand_made.tree();

    site_v2(&src);
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .code(5)
        .stderr_has("not a symlink");
    assert!(fs::symlink_metadata(fx.current()).unwrap().is_dir());
    assert_tree_eq(&hand_made.tree(), &before, "the directory at current");
    assert_eq!(fx.release_ids(), vec![1]);
    assert!(fx.release_leftovers().is_empty());
    // A rollback or activation would replace it too: also refused.
    fx.flip(&["activate", fx.root_str(), "1"])
        .code(5)
        .stderr_has("not a symlink");
    assert_tree_eq(&hand_made.tree(), &before, "the directory at current");
}

/// A file of the live release replaced behind flip's back (same size and mode) must not be
/// hard-linked into the next release.
#[test]
fn a_tampered_live_file_is_not_carried_into_the_next_release() {
    let fx = Fx::new();
    let root = fx.root_str();
    let src = fx.src("src");
    site_v1(&src);
    fx.deploy(&src, &[]);
    let live = fx.release(1).join("index.html");
    let mut forged = fs::read(&live).unwrap();
    forged[0] ^= 0x20;
    let tmp = fx.release(1).join(".forged");
    fs::write(&tmp, &forged).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
    fs::rename(&tmp, &live).unwrap();

    site_v2(&src);
    let run = fx.flip(&["deploy", src.s(), root]);
    if run.code == 0 {
        // Either the deploy repairs the file from the source, or it refuses; it must not put a
        // release that does not match its manifest live.
        assert_dir_eq(
            &fx.current(),
            &src.tree(),
            "current after deploying over a tampered file",
        );
        fx.flip(&["verify", root]).success();
    } else {
        assert_eq!(fx.current_link(), "releases/1");
    }
}
