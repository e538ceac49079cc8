//! Shared paths (`shared_dirs`, `shared_files`, `writable_dirs` of flip.toml), end to end
//! through the binary: local targets and two real OpenSSH servers. What lives in `shared/` is
//! seeded once from the source, never shipped again, never lost across deploys and rollbacks,
//! reached from every release through relative symlinks, and a conflicting type is refused
//! before anything changes.

mod common;

use common::*;
use flip_testkit::Sshd;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CONFIG: &str = r#"
shared_dirs = ["storage", "public/uploads"]
shared_files = [".env"]
writable_dirs = ["storage/framework/cache", "bootstrap/cache"]
"#;

fn write_config(fx: &Fx, text: &str) {
    fs::write(fx.path("flip.toml"), text).unwrap();
}

/// A Laravel-shaped source.
fn app(fx: &Fx) -> Src {
    let src = fx.src("src");
    src.file("app/Kernel.php", "<?php // v1\n", 0o644)
        .file(
            "public/index.php",
            "<?php require '../app/Kernel.php';\n",
            0o644,
        )
        .file("storage/logs/seed.log", "seeded from the source\n", 0o644)
        .file(".env", "APP_ENV=seed\n", 0o600);
    src
}

/// Every entry under `dir` (recursively, symlinks not followed): relative path → (kind, mode,
/// content or link target).
fn tree(dir: &Path) -> BTreeMap<String, (char, u32, Vec<u8>)> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, (char, u32, Vec<u8>)>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(base).unwrap().to_str().unwrap().to_string();
            let mode = m.mode() & 0o7777;
            if m.file_type().is_symlink() {
                let t = fs::read_link(&p).unwrap();
                out.insert(rel, ('l', 0, t.to_str().unwrap().as_bytes().to_vec()));
            } else if m.is_dir() {
                out.insert(rel, ('d', mode, Vec::new()));
                walk(base, &p, out);
            } else {
                out.insert(rel, ('f', mode, fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

/// Inodes of every regular file under `dir`.
fn inodes(dir: &Path) -> BTreeSet<u64> {
    fn walk(dir: &Path, out: &mut BTreeSet<u64>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                walk(&p, out);
            } else if m.is_file() {
                out.insert(m.ino());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, &mut out);
    out
}

fn link(p: &Path) -> String {
    fs::read_link(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_str()
        .unwrap()
        .to_string()
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// What every deploy onto `root` must leave: the links of the live release resolve through
/// `current` into `shared/`, the writable directories have their mode, no file of `shared/`
/// shares an inode with a release.
#[track_caller]
fn assert_shared_layout(root: &Path) {
    let cur = root.join("current");
    assert_eq!(link(&cur.join("storage")), "../../shared/storage");
    assert_eq!(
        link(&cur.join("public/uploads")),
        "../../../shared/public/uploads"
    );
    assert_eq!(link(&cur.join(".env")), "../../shared/.env");
    let shared = root.join("shared");
    assert!(fs::symlink_metadata(&shared).unwrap().is_dir());
    // Through current, each link reaches shared/ (same inode).
    for x in ["storage", "public/uploads", ".env"] {
        assert_eq!(
            fs::metadata(cur.join(x)).unwrap().ino(),
            fs::metadata(shared.join(x)).unwrap().ino(),
            "{x} through current"
        );
    }
    assert_eq!(mode(&shared.join("storage/framework/cache")), 0o775);
    assert_eq!(mode(&cur.join("bootstrap/cache")), 0o775);
    let shared_inodes = inodes(&shared);
    assert!(!shared_inodes.is_empty());
    for e in fs::read_dir(root.join("releases")).unwrap() {
        let r = e.unwrap().path();
        let common: Vec<_> = inodes(&r).intersection(&shared_inodes).copied().collect();
        assert!(
            common.is_empty(),
            "{} shares inodes {common:?} with shared/",
            r.display()
        );
    }
}

#[test]
fn shared_paths_are_seeded_once_and_survive_three_deploys_and_a_rollback() {
    let fx = Fx::new();
    write_config(&fx, CONFIG);
    let src = app(&fx);
    let root = fx.root.clone();
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["release"], 1);
    assert_eq!(
        j["seeded"],
        serde_json::json!([".env", "public/uploads", "storage"])
    );
    let shared = root.join("shared");
    // Seeded from the source; a shared dir the source lacks is created empty.
    assert_eq!(
        fs::read(shared.join("storage/logs/seed.log")).unwrap(),
        b"seeded from the source\n"
    );
    assert_eq!(fs::read(shared.join(".env")).unwrap(), b"APP_ENV=seed\n");
    assert_eq!(mode(&shared.join(".env")), 0o600);
    assert!(fs::read_dir(shared.join("public/uploads"))
        .unwrap()
        .next()
        .is_none());
    assert_eq!(
        fs::read(fx.current().join("storage/logs/seed.log")).unwrap(),
        b"seeded from the source\n"
    );
    assert_shared_layout(&root);

    // The application writes into shared/ between deploys.
    fs::write(
        shared.join("storage/logs/app.log"),
        "written at runtime 1\n",
    )
    .unwrap();
    fs::write(shared.join("public/uploads/avatar.png"), "png").unwrap();
    fs::write(shared.join(".env"), "APP_ENV=prod\n").unwrap();

    // The source's copies change, by far more bytes than the deploy may send: they must not
    // be shipped, nor reach shared/.
    let big: Vec<u8> = (0..400_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    src.overwrite("storage/logs/seed.log", &big)
        .overwrite(".env", "APP_ENV=from-the-source\n")
        .overwrite("app/Kernel.php", "<?php // v2\n");
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["release"], 2);
    assert!(j.get("seeded").is_none(), "{j}");
    let sent = j["bytes"]["sent"].as_u64().unwrap();
    assert!(
        sent < 20_000,
        "a changed shared copy was shipped: {sent} bytes sent"
    );
    let before = tree(&shared);
    assert_eq!(
        before["storage/logs/seed.log"].2,
        b"seeded from the source\n".to_vec()
    );
    assert_eq!(before[".env"].2, b"APP_ENV=prod\n".to_vec());
    assert_eq!(
        before["storage/logs/app.log"].2,
        b"written at runtime 1\n".to_vec()
    );
    assert_eq!(before["public/uploads/avatar.png"].2, b"png".to_vec());
    assert_shared_layout(&root);

    fs::write(
        shared.join("storage/logs/app.log"),
        "written at runtime 2\n",
    )
    .unwrap();
    src.overwrite("app/Kernel.php", "<?php // v3\n");
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["release"], 3);
    assert_eq!(
        fs::read(fx.current().join("storage/logs/app.log")).unwrap(),
        b"written at runtime 2\n"
    );
    assert_eq!(
        fs::read(fx.current().join("app/Kernel.php")).unwrap(),
        b"<?php // v3\n"
    );
    assert_shared_layout(&root);
    let before = tree(&shared);

    fx.flip(&["rollback", fx.root_str()]).success();
    assert_eq!(fx.current_link(), "releases/2");
    assert_eq!(tree(&shared), before, "rollback touched shared/");
    assert_eq!(
        fs::read(fx.current().join("storage/logs/app.log")).unwrap(),
        b"written at runtime 2\n"
    );
    assert_shared_layout(&root);
    fx.flip(&["verify", fx.root_str()]).success();
    for id in [1, 2, 3] {
        fx.flip(&["verify", fx.root_str(), &id.to_string()])
            .success();
    }
    fx.flip(&["prune", fx.root_str(), "--keep", "1"]).success();
    assert_eq!(tree(&shared), before, "prune touched shared/");
    fx.flip(&["activate", fx.root_str(), "3"]).success();
    assert_eq!(tree(&shared), before, "activate touched shared/");
    fx.flip(&["verify", fx.root_str()]).success();
}

#[test]
fn a_dry_run_and_diff_do_not_report_shared_paths_as_changes() {
    let fx = Fx::new();
    write_config(&fx, CONFIG);
    let src = app(&fx);
    fx.deploy(&src, &[]);
    // The source's shared copies change: no change for a dry run, nor for diff of the trees.
    let old = fx.path("old");
    fs::create_dir(&old).unwrap();
    assert!(std::process::Command::new("cp")
        .args(["-a", &format!("{}/.", src.s()), s(&old)])
        .status()
        .unwrap()
        .success());
    src.overwrite("storage/logs/seed.log", "other\n")
        .overwrite(".env", "X=1\n")
        .file("public/uploads/from-the-source.png", "x", 0o644);
    let j = fx
        .flip(&["deploy", "--dry-run", "--json", src.s(), fx.root_str()])
        .success()
        .json();
    assert_eq!(j["items"], serde_json::json!([]), "{j}");
    let j = fx
        .flip(&["diff", "--json", "--itemize", s(&old), src.s()])
        .success()
        .json();
    assert_eq!(j["items"], serde_json::json!([]), "{j}");
    // And a deploy of it is unchanged: the release would be the live one.
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["unchanged"], true, "{j}");
}

#[test]
fn a_conflicting_type_in_the_source_is_refused_before_connecting() {
    let fx = Fx::new();
    write_config(&fx, CONFIG);
    let src = app(&fx);
    fx.deploy(&src, &[]);
    let before = (
        tree(&fx.root.join("shared")),
        fx.release_ids(),
        fx.current_link(),
    );
    fs::remove_dir_all(src.p("storage")).unwrap();
    src.file("storage", "a file where a directory is shared", 0o644);
    let r = fx
        .flip(&["deploy", src.s(), fx.root_str()])
        .code(4)
        .stderr_has("storage is a regular file in the source, but it is in shared_dirs");
    drop(r);
    assert_eq!(
        (
            tree(&fx.root.join("shared")),
            fx.release_ids(),
            fx.current_link()
        ),
        before
    );
    assert!(fx.release_leftovers().is_empty());
}

#[test]
fn a_conflicting_type_in_shared_is_refused_with_nothing_changed() {
    let fx = Fx::new();
    write_config(&fx, CONFIG);
    let src = app(&fx);
    fx.deploy(&src, &[]);
    let shared = fx.root.join("shared");
    fs::remove_file(shared.join(".env")).unwrap();
    fs::create_dir(shared.join(".env")).unwrap();
    src.overwrite("app/Kernel.php", "<?php // v2\n");
    let before = (tree(&shared), fx.release_ids(), fx.current_link());
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .code(5)
        .stderr_has("shared/.env is a directory, not a regular file (.env is in shared_files)");
    assert_eq!((tree(&shared), fx.release_ids(), fx.current_link()), before);
    assert!(fx.release_leftovers().is_empty());
    // A symlink on the way into shared/ is refused too, and never followed.
    fs::remove_dir(shared.join(".env")).unwrap();
    fs::write(shared.join(".env"), "A=1\n").unwrap();
    let elsewhere = fx.path("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    fs::rename(shared.join("public"), fx.path("public-moved")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, shared.join("public")).unwrap();
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .code(5)
        .stderr_has("shared/public is a symlink, not a directory");
    assert!(fs::read_dir(&elsewhere).unwrap().next().is_none());
    assert_eq!(fx.release_ids(), vec![1]);
}

/// A deploy that seeds shared paths reports the release it records, as its dry run predicts:
/// each seed a new symlink, the seeds' files and directories not counted as release files
/// (they are sent, and named in `seeded`); on a first deploy and when a path the live release
/// holds becomes shared.
#[test]
fn a_seeding_deploy_reports_what_its_dry_run_predicts() {
    let fx = Fx::new();
    write_config(&fx, CONFIG);
    let src = app(&fx);
    // The seeds hold files equal to release files (copied on the target, not counted either).
    src.file("storage/app/.gitignore", "*\n", 0o644)
        .file("public/.gitignore", "*\n", 0o644);
    let counts = |j: &serde_json::Value| {
        serde_json::json!([
            j["files"],
            j["dirs"]["new"],
            j["dirs"]["removed"],
            j["symlinks"],
            j["items"]
        ])
    };
    let dry = |fx: &Fx| {
        fx.flip(&[
            "deploy",
            "--dry-run",
            "--json",
            "--itemize",
            src.s(),
            fx.root_str(),
        ])
        .success()
        .json()
    };
    let deploy = |fx: &Fx| {
        fx.flip(&[
            "deploy",
            "--json",
            "--itemize",
            "--no-whole-file",
            src.s(),
            fx.root_str(),
            "--mkpath",
        ])
        .success()
        .json()
    };
    let mut predicted = dry(&fx);
    let j = deploy(&fx);
    // The dry run's transfer counts are its own (no resends); the rest must agree.
    predicted["files"]["resent"] = j["files"]["resent"].clone();
    assert_eq!(counts(&j), counts(&predicted), "{j}\n{predicted}");
    assert_eq!(j["files"]["total"], 3, "{j}");
    assert_eq!(j["files"]["copied"], 0, "{j}");
    assert_eq!(j["symlinks"]["new"], 3, "{j}");
    assert_eq!(
        j["seeded"],
        serde_json::json!([".env", "public/uploads", "storage"]),
        "{j}"
    );

    // Deployed without shared paths, then storage becomes shared: the release's storage
    // directory and its files go, a symlink comes.
    let fx = Fx::new();
    fx.deploy(&src, &[]);
    write_config(&fx, CONFIG);
    let predicted = dry(&fx);
    let j = deploy(&fx);
    assert_eq!(counts(&j), counts(&predicted), "{j}\n{predicted}");
    assert_eq!(j["files"]["removed"], 3, "{j}");
    assert_eq!(j["files"]["linked"], 3, "{j}");
    assert_eq!(j["symlinks"]["new"], 3, "{j}");
}

#[test]
fn seeding_a_path_the_live_release_holds_makes_fresh_inodes() {
    let fx = Fx::new();
    let src = app(&fx);
    // Deployed first without shared paths: storage is a plain directory of release 1.
    fx.deploy(&src, &[]);
    let old = fx.release(1).join("storage/logs/seed.log");
    let old_ino = fs::metadata(&old).unwrap().ino();
    write_config(&fx, CONFIG);
    fx.deploy(&src, &[]);
    let seeded = fx.root.join("shared/storage/logs/seed.log");
    assert_ne!(fs::metadata(&seeded).unwrap().ino(), old_ino);
    assert_eq!(fs::metadata(&old).unwrap().nlink(), 1);
    assert_eq!(fs::read(&seeded).unwrap(), b"seeded from the source\n");
    // Release 1 keeps its own copy; writing into shared/ does not reach it.
    fs::write(&seeded, "changed in shared\n").unwrap();
    assert_eq!(fs::read(&old).unwrap(), b"seeded from the source\n");
    assert_shared_layout(&fx.root);
    fx.flip(&["verify", fx.root_str(), "1"]).success();
    fx.flip(&["verify", fx.root_str()]).success();
}

/// A writable directory of the release chowned to the web server's user (`writable_owner`)
/// before another one below it: that user could swap the one below for a symlink while the
/// deploy runs, and the chmod by path that followed it gave any file the writable mode (2770
/// here: setgid on a root agent's victim). The directory is now opened without following a
/// symlink and changed through its descriptor: the deploy fails naming it, the file is left
/// as it was, the live release stays.
#[test]
fn a_writable_directory_swapped_for_a_symlink_during_the_deploy_is_not_followed() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: writable_owner needs a root agent (CI is root)");
        return;
    }
    let fx = Fx::new();
    write_config(
        &fx,
        "writable_dirs = [\"bootstrap\", \"bootstrap/cache\"]\nwritable_mode = \"2770\"\nwritable_owner = \"nobody\"\n",
    );
    let src = app(&fx);
    src.file("bootstrap/cache/.keep", "", 0o644);
    fx.deploy(&src, &[]);
    src.file("app/Kernel.php", "<?php // v2\n", 0o644);
    let victim = fx.path("victim");
    fs::write(&victim, "secret\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    let marker = fx.path("paused");
    let pause = format!("before-writable:{}", marker.display());
    let run = fx.spawn(
        &[("FLIP_PAUSE", pause.as_str())],
        &["deploy", "--json", src.s(), fx.root_str()],
    );
    let until = Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        assert!(Instant::now() < until, "the deploy never reached its pause");
        std::thread::sleep(Duration::from_millis(10));
    }
    let staging = fs::read_dir(fx.root.join("releases"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".staging")
        })
        .expect("a release is being staged");
    // Nobody but the agent's user can reach into the release being made (root, this test,
    // can: it stands for a writer that got in anyway).
    assert_eq!(mode(&staging), 0o700);
    let cache = staging.join("bootstrap/cache");
    fs::remove_dir_all(&cache).unwrap();
    std::os::unix::fs::symlink(&victim, &cache).unwrap();
    fs::remove_file(&marker).unwrap();
    let r = run.finish(Duration::from_secs(60));
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("bootstrap/cache"), "{}", r.stderr);
    let m = fs::metadata(&victim).unwrap();
    assert_eq!(
        (m.mode() & 0o7777, m.uid()),
        (0o600, 0),
        "the file is left as it was"
    );
    assert_eq!(fx.current_link(), "releases/1");
    // (Release ids are never reused: the failed one had 2.)
    fx.deploy(&src, &[]);
    assert_eq!(fx.current_link(), "releases/3");
    assert_eq!(mode(&fx.release(3)), 0o755);
}

/// A writable directory below a shared one that is a file in the source: the first deploy
/// moved the seed into shared/, then failed on it, and every later deploy refused the target
/// until someone fixed shared/ by hand. The source is refused first (exit 4), nothing is made.
#[test]
fn a_writable_directory_of_a_shared_one_that_is_a_file_in_the_source_is_refused_first() {
    let fx = Fx::new();
    write_config(&fx, CONFIG);
    let src = app(&fx);
    src.file("storage/framework/cache", "not a directory\n", 0o644);
    // A dry run says so too (it skipped the check and predicted a deploy that would fail).
    for dry in [&["--dry-run"][..], &[]] {
        let args = [&["deploy"][..], dry, &[src.s(), fx.root_str()]].concat();
        fx.flip(&args).code(4).stderr_has(
            "storage/framework/cache is a regular file in the source, but it is in writable_dirs",
        );
    }
    assert!(!fx.root.exists(), "nothing was made");
    fs::remove_file(src.dir.join("storage/framework/cache")).unwrap();
    fx.deploy(&src, &[]);
    assert_shared_layout(&fx.root);
}

/// The uid of user `name` (`id -u`).
fn uid_of(name: &str) -> u32 {
    let out = std::process::Command::new("id")
        .args(["-u", name])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn writable_dirs_get_their_mode_and_as_root_their_owner() {
    let fx = Fx::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let is_root = unsafe { libc::geteuid() } == 0;
    write_config(
        &fx,
        &format!("{CONFIG}writable_mode = \"2770\"\nwritable_owner = \"nobody\"\n"),
    );
    let src = app(&fx);
    let j = fx.deploy(&src, &[]);
    let in_shared = fx.root.join("shared/storage/framework/cache");
    let in_release = fx.current().join("bootstrap/cache");
    assert_eq!(mode(&in_shared), 0o2770);
    assert_eq!(mode(&in_release), 0o2770);
    if is_root {
        let nobody = uid_of("nobody");
        assert_eq!(fs::metadata(&in_shared).unwrap().uid(), nobody);
        assert_eq!(fs::metadata(&in_release).unwrap().uid(), nobody);
    } else {
        let w = j["warnings"].to_string();
        assert!(w.contains("writable_owner"), "{w}");
    }
    fx.flip(&["verify", fx.root_str()]).success();
    // A deploy that makes no release still makes the writable directories under shared/.
    fs::remove_dir(&in_shared).unwrap();
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["unchanged"], true, "{j}");
    assert_eq!(mode(&in_shared), 0o2770);
    if is_root {
        // Another writable_owner alone: owners are in no manifest, yet the live release is not
        // what the deploy asks for; a new one is made with its writable directories so owned,
        // and the deploy after it changes nothing.
        write_config(
            &fx,
            &format!("{CONFIG}writable_mode = \"2770\"\nwritable_owner = \"daemon\"\n"),
        );
        let uid = |p: &std::path::Path| fs::metadata(p).unwrap().uid();
        let before = fx.current_link();
        let j = fx.deploy(&src, &[]);
        assert_eq!(j["unchanged"], false, "{j}");
        assert!(
            j["warnings"]
                .to_string()
                .contains("as writable_owner wants"),
            "{j}"
        );
        assert_ne!(fx.current_link(), before);
        let want = uid_of("daemon");
        assert_eq!(uid(&fx.current().join("bootstrap/cache")), want);
        assert_eq!(uid(&in_shared), want);
        let again = fx.deploy(&src, &[]);
        assert_eq!(again["unchanged"], true, "{again}");
        write_config(
            &fx,
            &format!("{CONFIG}writable_mode = \"2770\"\nwritable_owner = \"nobody\"\n"),
        );
    }
    // A bad mode is a configuration error naming the key; so is one whose owner cannot use
    // the directory, a path in flip's own `.flip` (named with the list that has it), a
    // compression level outside 0..=19 (a negative one garbled the stream,
    // exit 6), and an environment named like a target (`flip rollback /srv/app` would have
    // rolled back the environment).
    let current = fx.current_link();
    for (text, says) in [
        (format!("{CONFIG}writable_mode = \"rwx\"\n"), "writable_mode: \"rwx\" is not an octal mode"),
        (format!("{CONFIG}writable_mode = \"0644\"\n"), ":5: writable_mode: \"0644\" does not let the directory's owner read, write and enter it"),
        (format!("{CONFIG}compress_level = -2\n"), ":5: compress_level: -2 is not a level from 0 (off) to 19"),
        (format!("{CONFIG}compress_level = 25\n"), "compress_level: 25 is not a level"),
        (
            CONFIG.replace("\"bootstrap/cache\"", "\".flip/cache\""),
            ":4: writable_dirs: .flip/cache: `.flip` is flip's own directory",
        ),
        (
            CONFIG.replace("\".env\"", "\".flip/env\""),
            ":3: shared_files: .flip/env: `.flip` is flip's own directory",
        ),
        (
            format!("{CONFIG}[env.\"/srv/app\"]\ntargets = [\"/x\"]\n"),
            ":5: env.\"/srv/app\": an environment's name is letters, digits and ._-",
        ),
    ] {
        write_config(&fx, &text);
        fx.flip(&["deploy", src.s(), fx.root_str()])
            .code(2)
            .stderr_has(says);
    }
    assert_eq!(fx.current_link(), current);
}

/// Two SSH servers that both trust one user key, and the fixture's known_hosts trusting both.
fn two_servers(fx: &Fx) -> (Sshd, Sshd) {
    let (a, b) = (Sshd::start(), Sshd::start());
    let key = fs::read_to_string(a.user_key().with_extension("pub")).unwrap();
    fs::write(b.dir().join("authorized_keys"), key).unwrap();
    fs::create_dir_all(fx.home.join(".ssh")).unwrap();
    fs::write(
        fx.home.join(".ssh/known_hosts"),
        format!(
            "{}\n{}\n",
            a.host_public_key_line(),
            b.host_public_key_line()
        ),
    )
    .unwrap();
    (a, b)
}

#[test]
fn shared_paths_over_ssh_on_two_hosts_are_never_lost_nor_shipped_again() {
    let fx = Fx::new();
    let (a, b) = two_servers(&fx);
    let roots: Vec<PathBuf> = vec![fx.path("web1"), fx.path("web2")];
    let targets = [
        format!("ssh://root@127.0.0.1:{}{}", a.port(), s(&roots[0])),
        format!("ssh://root@127.0.0.1:{}{}", b.port(), s(&roots[1])),
    ];
    write_config(
        &fx,
        &format!(
            "source = \"src\"\n{CONFIG}\n[env.prod]\ntargets = [{:?}, {:?}]\n",
            targets[0], targets[1]
        ),
    );
    let src = app(&fx);
    let key = s(&a.user_key()).to_string();
    let deploy = |label: &str| {
        let args = ["deploy", "prod", "--json", "--label", label, "-i", &key];
        fx.flip(&[&args[..], &["--remote-flip", FLIP]].concat())
            .success()
            .json()
    };
    deploy("v1");
    for r in &roots {
        assert_shared_layout(r);
        assert_eq!(
            fs::read(r.join("shared/storage/logs/seed.log")).unwrap(),
            b"seeded from the source\n"
        );
        fs::write(r.join("shared/storage/logs/app.log"), s(r)).unwrap();
    }
    let big: Vec<u8> = (0..400_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    src.overwrite("storage/logs/seed.log", &big)
        .overwrite("app/Kernel.php", "<?php // v2\n");
    let j = deploy("v2");
    for h in j["hosts"].as_array().unwrap() {
        let sent = h["bytes"]["sent"].as_u64().unwrap();
        assert!(sent < 30_000, "{}: {sent} bytes sent", h["target"]);
    }
    src.overwrite("app/Kernel.php", "<?php // v3\n");
    deploy("v3");
    let snapshots: Vec<_> = roots.iter().map(|r| tree(&r.join("shared"))).collect();
    fx.flip(&["rollback", "prod", "-i", &key, "--remote-flip", FLIP])
        .success();
    for (r, before) in roots.iter().zip(&snapshots) {
        assert_eq!(link(&r.join("current")), "releases/2");
        assert_eq!(&tree(&r.join("shared")), before);
        assert_eq!(
            fs::read(r.join("current/storage/logs/app.log")).unwrap(),
            s(r).as_bytes()
        );
        assert_eq!(
            fs::read(r.join("current/storage/logs/seed.log")).unwrap(),
            b"seeded from the source\n"
        );
        assert_shared_layout(r);
    }
    fx.flip(&["verify", "prod", "-i", &key, "--remote-flip", FLIP])
        .success();
}

/// Unmounts on drop.
struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn seeds_reach_a_shared_directory_on_another_filesystem() {
    let fx = Fx::new();
    let src = app(&fx);
    fx.deploy(&src, &[]);
    let shared = fx.root.join("shared");
    fs::create_dir(&shared).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs", s(&shared)])
        .status()
        .is_ok_and(|st| st.success());
    if !ok {
        eprintln!("SKIP: cannot mount a tmpfs here (needs root and mount rights)");
        return;
    }
    let _mount = Mount(shared.clone());
    assert_ne!(
        fs::metadata(&shared).unwrap().dev(),
        fs::metadata(fx.root.join("releases")).unwrap().dev()
    );
    write_config(&fx, CONFIG);
    fx.deploy(&src, &[]);
    assert_eq!(
        fs::read(shared.join("storage/logs/seed.log")).unwrap(),
        b"seeded from the source\n"
    );
    assert_eq!(mode(&shared.join(".env")), 0o600);
    assert_eq!(mode(&shared.join("storage/logs")), 0o755);
    let names: Vec<String> = fs::read_dir(shared.join("storage"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!names.iter().any(|n| n.contains("tmp-seed")), "{names:?}");
    assert_shared_layout(&fx.root);
    fx.flip(&["verify", fx.root_str()]).success();
}

#[test]
fn shared_keys_follow_the_precedence_and_bad_ones_name_the_file_line_and_key() {
    let fx = Fx::new();
    write_config(
        &fx,
        "source = \"src\"\nshared_dirs = [\"storage\"]\nwritable_mode = \"0770\"\n\n[env.prod]\ntargets = [\"/x\"]\nshared_files = [\".env\"]\nwritable_mode = \"0750\"\n",
    );
    let j = fx.flip(&["config", "prod", "--json"]).success().json();
    assert_eq!(j["shared_dirs"], serde_json::json!(["storage"]));
    assert_eq!(j["shared_files"], serde_json::json!([".env"]));
    assert_eq!(j["writable_mode"], "0750");
    assert_eq!(j["from"]["shared_dirs"], "top level");
    assert_eq!(j["from"]["writable_mode"], "environment table");
    assert_eq!(j["from"]["writable_dirs"], "default");
    write_config(
        &fx,
        "shared_dirs = [\"storage\"]\n\n[env.prod]\ntargets = [\"/x\"]\nshared_dirs = [\"a\", \"../b\"]\n",
    );
    fx.flip(&["config", "prod"])
        .code(2)
        .stderr_has("flip.toml:5: env.prod.shared_dirs: \"../b\": path has an empty, '.' or '..' component: a relative path inside the release is expected");
    write_config(&fx, "shared_dirs = [\"storage\", \"storage/logs\"]\n");
    fx.flip(&["config", "prod"])
        .code(2)
        .stderr_has("flip.toml:1: shared_dirs/shared_files: shared path storage/logs is inside shared path storage");
}

#[test]
fn a_shared_directory_that_is_a_symlink_is_refused_and_not_followed() {
    let fx = Fx::new();
    let src = app(&fx);
    fx.deploy(&src, &[]);
    let elsewhere = fx.path("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, fx.root.join("shared")).unwrap();
    write_config(&fx, CONFIG);
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .code(5)
        .stderr_has("shared is a symlink, not a directory");
    assert!(fs::read_dir(&elsewhere).unwrap().next().is_none());
    assert_eq!(fx.release_ids(), vec![1]);
    // Commands that do not use shared paths are not stopped by it.
    fx.flip(&["verify", fx.root_str()]).success();
}

#[test]
fn a_first_deploy_that_dies_after_seeding_leaves_a_target_the_next_deploy_completes() {
    let fx = Fx::new();
    write_config(&fx, CONFIG);
    let src = app(&fx);
    let run = fx.flip_env(
        &[("FLIP_FAULT", "before-rename")],
        &["deploy", src.s(), fx.root_str()],
    );
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("FLIP_FAULT=before-rename"),
        "{}",
        run.stderr
    );
    assert!(!fx.current().exists());
    // The seeds are in shared/ already; the source changes meanwhile, and the next deploy
    // neither seeds again nor fails on what the crash left.
    assert_eq!(
        fs::read(fx.root.join("shared/storage/logs/seed.log")).unwrap(),
        b"seeded from the source\n"
    );
    src.overwrite("storage/logs/seed.log", "changed in the source\n");
    let j = fx.deploy(&src, &[]);
    assert!(j.get("seeded").is_none(), "{j}");
    assert_eq!(
        fs::read(fx.current().join("storage/logs/seed.log")).unwrap(),
        b"seeded from the source\n"
    );
    assert!(fx.release_leftovers().is_empty());
    assert_shared_layout(&fx.root);
    fx.flip(&["verify", fx.root_str()]).success();
}

/// `flip deploy --json SRC ROOT` run as `nobody` (with the fixture's flip.toml and HOME).
fn deploy_as_nobody(fx: &Fx, src: &Src) -> (i32, serde_json::Value, String) {
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("setpriv (util-linux) is installed");
    let out = std::process::Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", FLIP])
        .args(["deploy", "--json", src.s(), fx.root_str()])
        .current_dir(fx.path(""))
        .env("HOME", &fx.home)
        .env("XDG_CACHE_HOME", fx.home.join(".cache"))
        .env_remove("FLIP_FAULT")
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .expect("run setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let j = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap_or(-1),
        j,
        format!("{stdout}\n{stderr}"),
    )
}

/// A writable directory under `shared/` that the deploy user (nobody) does not own: root made
/// it root's (the web server's setup, say). With the mode it should have, flip leaves it alone
/// and the deploy is clean; with another mode, which nobody may not change, every deploy still
/// succeeds and names the directory, its mode and owner and the command that fixes it. Before,
/// flip chmod-ed it on every deploy and every deploy failed (EPERM).
#[test]
fn a_writable_dir_the_deploy_user_does_not_own_is_chmod_ed_only_if_needed_else_named() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to give files to nobody (CI is root)");
        return;
    }
    let fx = Fx::new();
    write_config(
        &fx,
        "shared_dirs = [\"storage\"]\nwritable_dirs = [\"storage/framework/cache\"]\nwritable_mode = \"2775\"\n",
    );
    let src = fx.src("src");
    src.file("index.php", "<?php // v1\n", 0o644)
        .file("storage/logs/seed.log", "seeded\n", 0o644);
    let chown = |spec: &str, p: &Path, recursive: bool| {
        let mut c = std::process::Command::new("chown");
        if recursive {
            c.arg("-R");
        }
        assert!(c.arg(spec).arg(p).status().unwrap().success());
    };
    // Everything of the fixture is nobody's; the target is made by nobody's first deploy.
    fs::set_permissions(fx.path(""), fs::Permissions::from_mode(0o755)).unwrap();
    chown("65534:65534", &fx.path(""), true);
    let (code, j, out) = deploy_as_nobody(&fx, &src);
    assert_eq!(code, 0, "{out}");
    let cache = fx.root.join("shared/storage/framework/cache");
    assert_eq!(mode(&cache), 0o2775);
    assert_eq!(fs::metadata(&cache).unwrap().uid(), 65534);
    assert_eq!(j["warnings"], serde_json::json!([]), "{j}");

    // Root takes the directory over, with the right mode: nothing to change, no warning, for a
    // new release and for an unchanged deploy alike.
    chown("0:0", &cache, false);
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o2775)).unwrap();
    src.overwrite("index.php", "<?php // v2\n");
    for what in ["a new release", "an unchanged deploy"] {
        let (code, j, out) = deploy_as_nobody(&fx, &src);
        assert_eq!(code, 0, "{what}: {out}");
        assert_eq!(j["warnings"], serde_json::json!([]), "{what}: {j}");
        assert_eq!(mode(&cache), 0o2775, "{what}");
        assert_eq!(fs::metadata(&cache).unwrap().uid(), 0, "{what}");
    }
    assert_eq!(link(&fx.current()), "releases/2");

    // With another mode nobody may not change: named, and the deploys go on.
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o755)).unwrap();
    src.overwrite("index.php", "<?php // v3\n");
    for what in ["a new release", "an unchanged deploy"] {
        let (code, j, out) = deploy_as_nobody(&fx, &src);
        assert_eq!(code, 0, "{what}: {out}");
        let w = j["warnings"].to_string();
        assert!(
            w.contains(&format!("sudo chmod 2775 {}", cache.display()))
                && w.contains("mode 0755")
                && w.contains("uid 0"),
            "{what}: {w}"
        );
        assert_eq!(mode(&cache), 0o755, "{what}");
    }
    assert_eq!(link(&fx.current()), "releases/3");
    assert_eq!(
        fs::read(fx.current().join("index.php")).unwrap(),
        b"<?php // v3\n"
    );
}
