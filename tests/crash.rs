//! Crashes of the agent (FLIP_FAULT makes it exit(99) on the spot, as kill -9 would) at every
//! point before the swap: `current` must keep naming the complete old release, the leftovers must
//! go at the next deploy, the lock must die with the process, and the crashed deploy's id must
//! never be handed out again.

mod common;

use common::*;
use std::fs;

fn crash_before_the_swap(point: &str) {
    let fx = Fx::new();
    let root = fx.root_str();
    let src = fx.src("src");
    site_v1(&src);
    let v1 = src.tree();
    fx.deploy(&src, &[]);
    let r1_inodes: Vec<(String, u64)> = files_of(&v1)
        .into_iter()
        .map(|f| {
            let i = ino(&fx.release(1).join(&f));
            (f, i)
        })
        .collect();

    site_v2(&src);
    let v2 = src.tree();
    let run = fx.flip_env(&[("FLIP_FAULT", point)], &["deploy", src.s(), root]);
    assert_ne!(run.code, 0, "a crashed deploy must fail\n{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("FLIP_FAULT={point}")),
        "the fault point was not reached:\n{}",
        run.stderr
    );

    // The live release is the old one, complete and unchanged.
    assert_eq!(fx.current_link(), "releases/1");
    assert_dir_eq(&fx.current(), &v1, "current after the crash");
    for (f, i) in &r1_inodes {
        assert_eq!(ino(&fx.release(1).join(f)), *i, "{f}");
    }
    assert_eq!(fx.release_ids(), vec![1], "no half-made release is visible");
    assert_eq!(fx.listed(), vec![(1, true)]);
    // The crash really left its staging directory behind (no destructor ran)...
    assert_eq!(fx.release_leftovers(), vec![".staging-2"]);
    if point == "before-rename" {
        assert!(fx.meta_files().contains(&"2.manifest".to_string()));
    }
    fx.flip(&["verify", root]).success();

    // ...and its lock died with it: the file still names the dead holder, but no --wait needed.
    let holder: serde_json::Value =
        serde_json::from_slice(&fs::read(fx.root.join(".flip/lock")).unwrap()).unwrap();
    assert!(
        holder["what"].as_str().unwrap().starts_with("deploy"),
        "{holder}"
    );

    let j = fx.deploy(&src, &[]);
    assert_eq!(
        num(&j, "/release"),
        3,
        "id 2 was taken by the crashed deploy"
    );
    assert_eq!(num(&j, "/previous"), 1);
    assert_eq!(num(&j, "/files/delta"), 1, "{j}");
    assert_eq!(fx.current_link(), "releases/3");
    assert_dir_eq(&fx.current(), &v2, "current after the retry");
    assert_dir_eq(&fx.release(1), &v1, "releases/1 after the retry");
    assert_eq!(fx.release_ids(), vec![1, 3]);
    assert!(
        fx.release_leftovers().is_empty(),
        "leftovers: {:?}",
        fx.release_leftovers()
    );
    assert_eq!(
        fx.meta_files(),
        vec![
            "1.json",
            "1.manifest",
            "1.stat",
            "3.json",
            "3.manifest",
            "3.stat"
        ]
    );
    assert_eq!(fx.listed(), vec![(1, false), (3, true)]);
    fx.flip(&["verify", root]).success();
    // Unchanged files are still linked to release 1 after the recovery.
    assert_eq!(
        ino(&fx.release(3).join("index.html")),
        ino(&fx.release(1).join("index.html"))
    );
}

#[test]
fn crash_before_commit() {
    crash_before_the_swap("before-commit");
}

#[test]
fn crash_before_rename() {
    crash_before_the_swap("before-rename");
}

#[test]
fn crash_mid_transfer() {
    crash_before_the_swap("mid-transfer");
}

#[test]
fn crash_during_the_first_deploy_leaves_nothing_live() {
    let fx = Fx::new();
    let root = fx.root_str();
    let src = fx.src("src");
    site_v1(&src);
    let run = fx.flip_env(
        &[("FLIP_FAULT", "before-commit")],
        &["deploy", src.s(), root],
    );
    assert_ne!(run.code, 0);
    assert!(
        fs::symlink_metadata(fx.current()).is_err(),
        "nothing may be live"
    );
    assert!(fx.release_ids().is_empty());
    assert_eq!(fx.listed(), vec![]);
    fx.flip(&["verify", root])
        .code(5)
        .stderr_has("no current release");

    // The failed deploy's id is skipped, the lock is free, and the leftovers go.
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/release"), 2);
    assert_eq!(fx.current_link(), "releases/2");
    assert_dir_eq(&fx.current(), &src.tree(), "current");
    assert!(fx.release_leftovers().is_empty());

    // A crash after that does not bring id 2 or 3 back either.
    src.file("small.txt", "small v3\n", 0o644);
    let run = fx.flip_env(
        &[("FLIP_FAULT", "before-rename")],
        &["deploy", src.s(), root],
    );
    assert_ne!(run.code, 0);
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/release"), 4);
    assert_eq!(fx.release_ids(), vec![2, 4]);
}

#[test]
fn mid_transfer_crash_with_a_big_literal_file() {
    // The first transferred file is a large one (over 4 MiB), streamed by the writing thread.
    let fx = Fx::new();
    let root = fx.root_str();
    let src = fx.src("src");
    src.file("a.txt", "a\n", 0o644);
    fx.deploy(&src, &[]);
    src.file("huge.bin", noise(9, (4 << 20) + 4096), 0o644);
    // (Compression off: zstd in a debug build would make this test slow.)
    let run = fx.flip_env(
        &[("FLIP_FAULT", "mid-transfer")],
        &["deploy", "--compress-level", "0", src.s(), root],
    );
    assert_ne!(run.code, 0);
    assert_eq!(fx.current_link(), "releases/1");
    assert!(!fx.current().join("huge.bin").exists());
    let j = fx.deploy(&src, &["--compress-level", "0"]);
    assert_eq!(num(&j, "/release"), 3);
    assert_dir_eq(&fx.current(), &src.tree(), "current");
    assert!(fx.release_leftovers().is_empty());
}
