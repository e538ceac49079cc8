//! What `flip diff`, `flip deploy --dry-run` and the deploy itself report, through the real
//! binary: every kind of change (directories, symlinks and files created, changed and removed,
//! mode-only changes, changed files sent as patches or deltas) is counted and itemized, and the
//! three agree exactly, item by item, given the same knowledge.

mod common;

use common::*;
use serde_json::Value;
use std::fs;

/// A few KiB of PHP-like text, different for every `seed`, that patches and deltas compress well.
fn text(seed: usize, lines: usize) -> String {
    (0..lines)
        .map(|i| format!("<?php // {seed} line {i}: $value_{i} = compute({i});\n"))
        .collect()
}

/// `flip deploy --no-whole-file --dry-run EXTRA... SRC ROOT`, which must succeed: the dry run
/// of the deploys these tests make (`Fx::deploy`: patches and deltas, as over SSH).
#[track_caller]
fn dry_run(fx: &Fx, src: &Src, extra: &[&str]) -> Run {
    let mut args = vec!["deploy", "--no-whole-file", "--dry-run"];
    args.extend_from_slice(extra);
    args.extend([src.s(), fx.root_str()]);
    fx.flip(&args).success()
}

fn v1(src: &Src) {
    src.dir("app", 0o755)
        .file("app/big.php", text(1, 1000), 0o644)
        .file("app/small.php", text(2, 40), 0o644)
        .file("app/old/gone.php", "<?php // gone\n", 0o644)
        .file("bin/tool", "#!/bin/sh\necho tool\n", 0o644)
        .file("keep.txt", "kept\n", 0o644)
        .symlink("old-link", "keep.txt")
        .symlink("public/link", "../app")
        .dir("storage", 0o755);
}

fn v2(src: &Src) {
    src.overwrite(
        "app/big.php",
        text(1, 1000).replace("line 500:", "line five hundred:"),
    )
    .overwrite(
        "app/small.php",
        text(2, 40).replace("line 20:", "line twenty:"),
    )
    .file("app/new.php", "<?php // new\n", 0o644)
    .remove("app/old/gone.php")
    .remove("app/old")
    .chmod("bin/tool", 0o755)
    .remove("old-link")
    .remove("public/link")
    .symlink("public/link", "../storage")
    .dir("storage/cache", 0o755)
    .chmod("storage", 0o775);
}

/// The itemized lines of v1 → v2, with `big` and `small` the ways the two changed files go.
fn expected_lines(big: &str, small: &str) -> Vec<String> {
    [
        format!("~ file app/big.php (content, {big})"),
        "+ file app/new.php (literal)".into(),
        "- dir  app/old".into(),
        "- file app/old/gone.php".into(),
        format!("~ file app/small.php (content, {small})"),
        "m file bin/tool (mode 644->755, copy)".into(),
        "- link old-link".into(),
        "> link public/link -> ../storage (was ../app)".into(),
        "m dir  storage (mode 755->775)".into(),
        "+ dir  storage/cache".into(),
    ]
    .into()
}

fn lines(out: &str) -> Vec<String> {
    out.lines().map(str::to_string).collect()
}

fn item<'a>(j: &'a Value, path: &str, change: &str) -> &'a Value {
    j["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {j}"))
        .iter()
        .find(|i| i["path"] == path && i["change"] == change)
        .unwrap_or_else(|| panic!("no {change} item for {path}: {j}"))
}

/// The counts of v1 → v2 with `patched` of the two changed files sent as patches, `delta` as
/// rsync deltas, `literal` whole (besides the new file).
fn assert_counts(j: &Value, patched: u64, delta: u64, literal: u64) {
    let files = [
        ("total", 5),
        ("new", 1),
        ("changed", 2),
        ("mode", 1),
        ("unchanged", 1),
        ("removed", 1),
        ("linked", 1),
        ("copied", 1),
        ("literal", 1 + literal),
        ("delta", patched + delta),
        ("patched", patched),
        ("resent", 0),
    ];
    for (k, v) in files {
        assert_eq!(num(j, &format!("/files/{k}")), v, "files.{k} in {j}");
    }
    for (kind, new, changed, removed) in [("dirs", 1, 1, 1), ("symlinks", 0, 1, 1)] {
        assert_eq!(num(j, &format!("/{kind}/new")), new, "{kind}.new in {j}");
        assert_eq!(
            num(j, &format!("/{kind}/changed")),
            changed,
            "{kind}.changed in {j}"
        );
        assert_eq!(
            num(j, &format!("/{kind}/removed")),
            removed,
            "{kind}.removed in {j}"
        );
    }
}

/// The counts and the items of one report, for comparing reports of different commands.
fn report(j: &Value) -> Value {
    serde_json::json!({
        "files": j["files"], "dirs": j["dirs"], "symlinks": j["symlinks"], "items": j["items"],
    })
}

/// A changed file whose old version is in the content cache goes as a patch: diff, dry run and
/// deploy list and count every change alike, in JSON and in their itemized lines.
#[test]
fn diff_dry_run_and_deploy_agree_on_every_change_with_patches() {
    let fx = Fx::new();
    let src = fx.src("src");
    v1(&src);
    fx.deploy(&src, &[]);
    let old = fx.path("old");
    copy_tree(&src.dir, &old);
    v2(&src);

    let diff = fx
        .flip(&["diff", "--json", "--itemize", s(&old), src.s()])
        .success()
        .json();
    let diff_text = fx.flip(&["diff", "--itemize", s(&old), src.s()]).success();
    let dry = dry_run(&fx, &src, &["--json"]).json();
    let dry_text = dry_run(&fx, &src, &[]);
    assert_eq!(fx.release_ids(), vec![1], "a dry run changes nothing");
    let deploy = fx.deploy(&src, &["--itemize"]);

    let want = expected_lines("patch", "patch");
    assert_eq!(lines(&dry_text.stdout), want, "dry run's itemized lines");
    assert_eq!(
        lines(&diff_text.stdout)[..want.len()],
        want[..],
        "diff's itemized lines"
    );
    assert_counts(&deploy, 2, 0, 0);
    assert_eq!(report(&dry), report(&deploy), "dry run vs deploy");
    assert_eq!(report(&diff), report(&deploy), "diff vs deploy");
    // Its patches are a deploy's over SSH (or with --no-whole-file, as here): the text says so,
    // since a local directory takes changed files whole by default.
    assert!(
        diff_text
            .stdout
            .contains("\na deploy over SSH sends (zstd level 3):\n"),
        "{}",
        diff_text.stdout
    );
    assert!(
        dry_text
            .stderr
            .contains("5 files: 1 new, 2 changed, 1 mode, 1 unchanged, 1 removed; 1 linked, 1 copied, 1 literal, 0 delta, 2 patch; dirs: 1 new, 1 changed, 1 removed; symlinks: 0 new, 1 changed, 1 removed"),
        "{}",
        dry_text.stderr
    );

    // The JSON items say the same as the lines.
    let link = item(&deploy, "public/link", "retarget");
    assert_eq!(
        (&link["kind"], &link["target"], &link["was"]),
        (&"symlink".into(), &"../storage".into(), &"../app".into())
    );
    assert_eq!(item(&deploy, "old-link", "removed")["kind"], "symlink");
    assert_eq!(item(&deploy, "storage/cache", "new")["kind"], "dir");
    assert_eq!(item(&deploy, "app/old", "removed")["kind"], "dir");
    let tool = item(&deploy, "bin/tool", "mode");
    assert_eq!(
        (&tool["via"], &tool["mode"]["old"], &tool["mode"]["new"]),
        (&"copy".into(), &"644".into(), &"755".into())
    );
    assert_eq!(item(&deploy, "app/new.php", "new")["via"], "literal");
    assert_eq!(item(&deploy, "app/big.php", "changed")["via"], "patch");
    assert_eq!(item(&deploy, "app/old/gone.php", "removed")["kind"], "file");
    assert!(deploy["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i.get("note").is_none()));
    assert_dir_eq(&fx.current(), &src.tree(), "current");
}

/// Without flip's caches a changed file goes as an rsync delta (the small one whole): diff,
/// dry run and deploy (which then learns the changes from the agent) agree, and the human
/// deploy's itemized lines are the dry run's.
#[test]
fn diff_dry_run_and_deploy_agree_on_every_change_with_deltas() {
    let fx = Fx::new();
    let src = fx.src("src");
    v1(&src);
    fx.deploy(&src, &[]);
    let old = fx.path("old");
    copy_tree(&src.dir, &old);
    v2(&src);

    let diff = fx
        .flip(&[
            "diff",
            "--no-cache",
            "--json",
            "--itemize",
            s(&old),
            src.s(),
        ])
        .success()
        .json();
    let dry = dry_run(&fx, &src, &["--no-cache", "--json"]).json();
    let dry_text = dry_run(&fx, &src, &["--no-cache"]);
    let twin = fx.path("twin");
    copy_tree(&src.dir, &twin);
    let deploy = fx.deploy(&src, &["--itemize", "--no-cache"]);

    assert_counts(&deploy, 0, 1, 1);
    assert_eq!(report(&dry), report(&deploy), "dry run vs deploy");
    assert_eq!(report(&diff), report(&deploy), "diff vs deploy");
    let want = expected_lines("delta", "literal");
    assert_eq!(lines(&dry_text.stdout), want, "dry run's itemized lines");

    // The same change once more, deployed with human output: the same lines on stdout.
    fs::remove_dir_all(&fx.root).unwrap();
    let fresh = Src { dir: old.clone() };
    fx.flip(&[
        "deploy",
        "--no-whole-file",
        "--no-cache",
        fresh.s(),
        fx.root_str(),
    ])
    .success();
    let human = fx
        .flip(&[
            "deploy",
            "--no-whole-file",
            "--itemize",
            "--no-cache",
            s(&twin),
            fx.root_str(),
        ])
        .success();
    assert_eq!(lines(&human.stdout), want, "deploy's itemized lines");
    assert!(
        human.stderr.contains("2 literal, 1 delta, 0 patch"),
        "{}",
        human.stderr
    );
}

/// Deploying the live tree again changes nothing, and every report says zero.
#[test]
fn a_no_op_reports_zero_everywhere() {
    let fx = Fx::new();
    let src = fx.src("src");
    v1(&src);
    fx.deploy(&src, &[]);
    let diff = fx
        .flip(&["diff", "--json", "--itemize", src.s(), src.s()])
        .success()
        .json();
    // An unchanged tree makes no release: the deploy and its dry run say so, every file
    // unchanged and nothing linked, no byte to send.
    let dry_unforced = dry_run(&fx, &src, &["--json"]).json();
    let dry_unforced_text = dry_run(&fx, &src, &[]);
    let unforced = fx.deploy(&src, &["--itemize"]);
    assert_eq!(
        fx.release_ids(),
        vec![1],
        "no release for an unchanged tree"
    );
    // The live release stays live: the deploy says so, as `flip activate` of it would.
    assert_eq!(
        (
            &unforced["release"],
            &unforced["previous"],
            &unforced["activated"]
        ),
        (
            &serde_json::json!(1),
            &serde_json::json!(1),
            &serde_json::json!(true)
        ),
        "{unforced}"
    );
    for j in [&dry_unforced, &unforced] {
        assert_eq!(j["unchanged"], true, "{j}");
        assert_eq!(num(j, "/files/unchanged"), 5, "{j}");
        assert_eq!(num(j, "/files/linked"), 0, "{j}");
        assert_eq!(j["items"], serde_json::json!([]), "{j}");
    }
    assert_eq!(num(&dry_unforced, "/bytes/transfer"), 0, "{dry_unforced}");
    assert_eq!(num(&dry_unforced, "/bytes/matched"), 0, "{dry_unforced}");
    assert!(
        dry_unforced_text
            .stderr
            .contains("unchanged, release 1 stays live"),
        "{}",
        dry_unforced_text.stderr
    );
    // Forced, the same no-op makes a release of links, and the forced dry run predicts it.
    let dry = dry_run(&fx, &src, &["--json", "--force-release"]).json();
    let dry_text = dry_run(&fx, &src, &["--force-release"]);
    assert_eq!(dry["unchanged"], false, "{dry}");
    let deploy = fx.deploy(&src, &["--itemize", "--force-release"]);
    let cold = fx
        .flip(&[
            "deploy",
            "--no-whole-file",
            "--json",
            "--itemize",
            "--no-cache",
            "--force-release",
            src.s(),
            fx.root_str(),
        ])
        .success()
        .json();
    for j in [&diff, &dry, &deploy, &cold] {
        for k in [
            "new", "changed", "mode", "removed", "copied", "literal", "delta", "patched", "resent",
        ] {
            assert_eq!(num(j, &format!("/files/{k}")), 0, "files.{k}: {j}");
        }
        assert_eq!(num(j, "/files/unchanged"), 5, "{j}");
        assert_eq!(num(j, "/files/linked"), 5, "{j}");
        for kind in ["dirs", "symlinks"] {
            for k in ["new", "changed", "removed"] {
                assert_eq!(num(j, &format!("/{kind}/{k}")), 0, "{kind}.{k}: {j}");
            }
        }
        assert_eq!(j["items"], serde_json::json!([]), "{j}");
    }
    assert_eq!(dry_text.stdout, "", "no itemized line for a no-op");
}

/// When the target's state makes the deploy deviate from the plan (an unchanged file whose copy
/// in the live release is gone cannot be linked), the deploy's report is the truth and says so;
/// the dry run, which cannot see it, predicted the link.
#[test]
fn the_deploy_reports_what_the_target_made_it_do() {
    let fx = Fx::new();
    let src = fx.src("src");
    v1(&src);
    fx.deploy(&src, &[]);
    fs::remove_file(fx.release(1).join("keep.txt")).unwrap();
    src.file("app/new.php", "<?php // new\n", 0o644);

    let dry = dry_run(&fx, &src, &["--json"]).json();
    assert_eq!(num(&dry, "/files/linked"), 5, "{dry}");
    assert_eq!(num(&dry, "/files/resent"), 0, "{dry}");
    let deploy = fx.deploy(&src, &["--itemize"]);
    assert_eq!(num(&deploy, "/files/linked"), 4, "{deploy}");
    assert_eq!(num(&deploy, "/files/literal"), 2, "{deploy}");
    assert_eq!(num(&deploy, "/files/resent"), 1, "{deploy}");
    assert_eq!(num(&deploy, "/files/unchanged"), 5, "{deploy}");
    let keep = item(&deploy, "keep.txt", "unchanged");
    assert_eq!(keep["via"], "literal", "{deploy}");
    assert!(
        keep["note"]
            .as_str()
            .unwrap()
            .contains("missing or altered"),
        "{deploy}"
    );
    assert_eq!(fs::read(fx.current().join("keep.txt")).unwrap(), b"kept\n");

    // The human report names it too.
    fs::remove_file(fx.release(2).join("keep.txt")).unwrap();
    src.file("app/newer.php", "<?php // newer\n", 0o644);
    let human = fx
        .flip(&[
            "deploy",
            "--no-whole-file",
            "--itemize",
            src.s(),
            fx.root_str(),
        ])
        .success();
    assert!(
        human
            .stdout
            .contains("= file keep.txt (literal: its copy on the target is missing or altered"),
        "{}",
        human.stdout
    );
    assert!(human.stderr.contains("1 resent"), "{}", human.stderr);

    // Without --itemize the counts say the same, and no items are listed.
    fs::remove_file(fx.release(3).join("keep.txt")).unwrap();
    src.file("app/newest.php", "<?php // newest\n", 0o644);
    let quiet = fx.deploy(&src, &[]);
    assert_eq!(num(&quiet, "/files/resent"), 1, "{quiet}");
    assert_eq!(num(&quiet, "/files/literal"), 2, "{quiet}");
    assert_eq!(num(&quiet, "/files/linked"), 6, "{quiet}");
    assert!(quiet.get("items").is_none(), "{quiet}");
}

/// The reported fault: a release whose only changes are a symlink retargeted, a symlink removed
/// and a new empty directory was reported as a no-op by diff, dry run and deploy alike.
#[test]
fn a_release_of_only_symlink_and_directory_changes_is_not_a_no_op() {
    let fx = Fx::new();
    let src = fx.src("src");
    v1(&src);
    fx.deploy(&src, &[]);
    let old = fx.path("old");
    copy_tree(&src.dir, &old);
    src.remove("public/link")
        .symlink("public/link", "../storage")
        .remove("old-link")
        .dir("storage/sessions", 0o700);

    let diff = fx
        .flip(&["diff", "--json", "--itemize", s(&old), src.s()])
        .success()
        .json();
    let dry = dry_run(&fx, &src, &["--json"]).json();
    let deploy = fx.deploy(&src, &["--itemize"]);
    for j in [&diff, &dry, &deploy] {
        assert_eq!(num(j, "/symlinks/changed"), 1, "{j}");
        assert_eq!(num(j, "/symlinks/removed"), 1, "{j}");
        assert_eq!(num(j, "/dirs/new"), 1, "{j}");
        assert_eq!(num(j, "/files/unchanged"), 5, "{j}");
        assert_eq!(report(j), report(&deploy), "{j}");
    }
    let paths: Vec<&str> = deploy["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["old-link", "public/link", "storage/sessions"]);
    assert_eq!(
        fs::read_link(fx.current().join("public/link")).unwrap(),
        std::path::Path::new("../storage")
    );
    assert!(fx.current().join("storage/sessions").is_dir());
}

/// A tiny file's patch is no bigger than nothing saved: the deploy sends it whole, and the dry
/// run (which makes the patch itself, as the deploy does) and diff say so alike, with the note.
#[test]
fn a_patch_no_smaller_than_the_file_is_reported_as_literal_everywhere() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("tiny.txt", "a\n", 0o644)
        .file("page.php", text(3, 60), 0o644);
    fx.deploy(&src, &[]);
    let old = fx.path("old");
    copy_tree(&src.dir, &old);
    src.overwrite("tiny.txt", "bb\n")
        .overwrite("page.php", text(3, 60).replace("line 7:", "line seven:"));

    let diff = fx
        .flip(&["diff", "--json", "--itemize", s(&old), src.s()])
        .success()
        .json();
    let dry = dry_run(&fx, &src, &["--json"]).json();
    let deploy = fx.deploy(&src, &["--itemize"]);
    assert_eq!(report(&dry), report(&deploy), "dry run vs deploy");
    assert_eq!(report(&diff), report(&deploy), "diff vs deploy");
    assert_eq!(item(&deploy, "page.php", "changed")["via"], "patch");
    let tiny = item(&deploy, "tiny.txt", "changed");
    assert_eq!(tiny["via"], "literal", "{deploy}");
    assert!(
        tiny["note"]
            .as_str()
            .unwrap()
            .contains("no smaller than the file"),
        "{deploy}"
    );
    assert_eq!(num(&deploy, "/files/patched"), 1, "{deploy}");
    assert_eq!(num(&deploy, "/files/literal"), 1, "{deploy}");
}

/// A file moved and edited is new at its path and built from its old self: all three reports
/// say so (`from`), whether it goes as a patch (warm caches) or as an rsync delta (none).
#[test]
fn a_moved_and_edited_file_is_reported_with_its_basis_alike() {
    for (flags, via) in [(&[][..], "patch"), (&["--no-cache"][..], "delta")] {
        let fx = Fx::new();
        let src = fx.src("src");
        src.file("src/Old/Thing.php", text(4, 400), 0o644);
        fx.deploy(&src, flags);
        let old = fx.path("old");
        copy_tree(&src.dir, &old);
        src.remove("src/Old/Thing.php").remove("src/Old").file(
            "src/New/Thing.php",
            text(4, 400).replace("line 9:", "line nine:"),
            0o644,
        );

        let mut args = vec!["diff", "--json", "--itemize", s(&old), src.s()];
        args.extend_from_slice(flags);
        let diff = fx.flip(&args).success().json();
        let mut args = vec![
            "deploy",
            "--no-whole-file",
            "--dry-run",
            "--json",
            src.s(),
            fx.root_str(),
        ];
        args.extend_from_slice(flags);
        let dry = fx.flip(&args).success().json();
        let mut extra = vec!["--itemize"];
        extra.extend_from_slice(flags);
        let deploy = fx.deploy(&src, &extra);

        assert_eq!(report(&dry), report(&deploy), "dry run vs deploy ({via})");
        assert_eq!(report(&diff), report(&deploy), "diff vs deploy ({via})");
        let moved = item(&deploy, "src/New/Thing.php", "new");
        assert_eq!(moved["via"], via, "{deploy}");
        assert_eq!(moved["from"], "src/Old/Thing.php", "{deploy}");
        assert_eq!(num(&deploy, "/dirs/new"), 1, "{deploy}");
        assert_eq!(num(&deploy, "/dirs/removed"), 1, "{deploy}");
        assert_eq!(num(&deploy, "/files/removed"), 1, "{deploy}");
    }
}

/// A file the plan meant to hard-link whose inode on the target was changed behind flip's back
/// (chowned) is copied instead: `files.copied` counts it, `unchanged_copied` says how many of
/// the copies were meant as links, and a note says why, in the JSON and in the human lines.
#[test]
fn a_file_copied_instead_of_linked_is_reported_with_a_note() {
    use std::os::unix::fs::MetadataExt;
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("a.php", "<?php echo 'a';\n", 0o644)
        .file("b.php", "<?php echo 'b';\n", 0o644)
        .file("c.txt", "c v1\n", 0o644);
    fx.deploy(&src, &[]);
    std::os::unix::fs::lchown(fx.release(1).join("a.php"), Some(65534), None).unwrap();
    src.overwrite("c.txt", "c v2\n");
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["files"]["unchanged"], 2, "{j}");
    assert_eq!(j["files"]["linked"], 1, "{j}");
    assert_eq!(j["files"]["copied"], 1, "{j}");
    assert_eq!(j["files"]["resent"], 0, "{j}");
    assert_eq!(j["unchanged_copied"], 1, "{j}");
    let note = j["notes"][0].as_str().unwrap_or_default();
    assert!(
        note.starts_with("1 unchanged file(s) were copied into new inodes, not hard-linked"),
        "{j}"
    );
    let warned = j["warnings"].as_array().unwrap();
    assert!(
        warned
            .iter()
            .any(|w| w.as_str().unwrap().contains("a.php (owner 65534:")),
        "{j}"
    );
    let a = std::fs::symlink_metadata(fx.release(2).join("a.php")).unwrap();
    assert_ne!(a.uid(), 65534);

    // The human lines: the counts, then the note.
    std::os::unix::fs::lchown(fx.release(2).join("b.php"), Some(65534), None).unwrap();
    src.overwrite("c.txt", "c v3\n");
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .success()
        .stderr_has("; 1 linked, 1 copied, 1 literal,")
        .stderr_has("flip: note: 1 unchanged file(s) were copied into new inodes, not hard-linked")
        .stderr_has("b.php (owner 65534:");
    // An untouched deploy notes nothing.
    src.overwrite("c.txt", "c v4\n");
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["unchanged_copied"], 0, "{j}");
    assert!(j.get("notes").is_none(), "{j}");
    assert_eq!(j["files"]["linked"], 2, "{j}");
}
