//! Nothing unverified goes live, through the real binary: files of the live release edited
//! behind flip's back (even with their mtime put back) are never carried forward, whatever state
//! `.flip/releases/N.stat` is in; damaged delta bases are noticed and the file goes whole in the
//! same deploy; hard links join only the same path across releases; all 12 permission bits
//! survive a deploy and `verify` checks them.

mod common;

use common::*;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// About 150 KB of text, as in the issue.
fn text_150k(tag: &str) -> String {
    let mut t = String::new();
    let mut i = 0;
    while t.len() < 150_000 {
        t.push_str(&format!(
            "{tag} line {i}: the quick brown fox jumps over the lazy dog\n"
        ));
        i += 1;
    }
    t
}

/// Overwrites 8 bytes in the middle of `p` in place (same inode, same size), then puts its
/// mtime back as `touch -r` would.
fn tamper_in_place(p: &Path) {
    let (secs, nsec) = mtime(p);
    let ino_before = ino(p);
    let mut f = fs::OpenOptions::new().write(true).open(p).unwrap();
    f.seek(SeekFrom::Start(70_000)).unwrap();
    f.write_all(b"TAMPERED").unwrap();
    drop(f);
    set_mtime(p, secs, nsec);
    assert_eq!(mtime(p), (secs, nsec), "mtime restored");
    assert_eq!(ino(p), ino_before, "edited in place");
}

/// The input: a 150 KB text file and another file, deployed.
fn deployed_site(fx: &Fx) -> Src {
    let src = fx.src("src");
    src.file("big.txt", text_150k("v1"), 0o644)
        .file("other.txt", "other v1\n", 0o644)
        .file("keep.txt", "unchanged\n", 0o644);
    fx.deploy(&src, &[]);
    src
}

/// Tamper with `big.txt` under `current/`, damage the stamps with `damage`, change another file
/// in the source and deploy: the new release holds the source's bytes in a new inode, the
/// untouched file is still linked when the record vouches for it (`record_usable`), else copied
/// into a new inode with the same bytes, and `verify` passes.
fn tampered_file_is_not_linked_forward(record_usable: bool, damage: impl FnOnce(&Fx)) {
    let fx = Fx::new();
    let src = deployed_site(&fx);
    tamper_in_place(&fx.current().join("big.txt"));
    damage(&fx);
    src.overwrite("other.txt", "other v2\n");

    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/release"), 2);
    let (r1, r2) = (fx.release(1), fx.release(2));
    assert_eq!(fs::read(r2.join("big.txt")).unwrap(), src.read("big.txt"));
    assert_ne!(ino(&r2.join("big.txt")), ino(&r1.join("big.txt")));
    assert_eq!(fs::read(r2.join("keep.txt")).unwrap(), src.read("keep.txt"));
    if record_usable {
        // An intact file is still linked: its stamp was checked, nothing re-sent.
        assert_eq!(ino(&r2.join("keep.txt")), ino(&r1.join("keep.txt")));
        assert_eq!(num(&j, "/files/linked"), 1, "{j}");
    } else {
        // Nothing vouches for the untouched file's inode: copied (content checked), not
        // linked, not re-sent.
        assert_ne!(ino(&r2.join("keep.txt")), ino(&r1.join("keep.txt")));
        assert_eq!(
            fs::symlink_metadata(r1.join("keep.txt")).unwrap().nlink(),
            1
        );
        assert_eq!(num(&j, "/files/linked"), 0, "{j}");
        assert_eq!(num(&j, "/files/copied"), 1, "{j}");
        assert_eq!(num(&j, "/files/resent"), 1, "{j}");
    }
    assert_dir_eq(&fx.current(), &src.tree(), "current after the deploy");
    fx.flip(&["verify", fx.root_str()]).success();
}

fn stat_file(fx: &Fx, id: u64) -> std::path::PathBuf {
    fx.root.join(format!(".flip/releases/{id}.stat"))
}

#[test]
fn a_file_edited_in_place_with_its_mtime_restored_is_not_linked_forward() {
    tampered_file_is_not_linked_forward(true, |_| {});
}

#[test]
fn a_missing_stat_file_means_copies_not_links() {
    tampered_file_is_not_linked_forward(false, |fx| fs::remove_file(stat_file(fx, 1)).unwrap());
}

#[test]
fn a_truncated_stat_file_means_copies_not_links() {
    tampered_file_is_not_linked_forward(false, |fx| {
        let p = stat_file(fx, 1);
        let b = fs::read(&p).unwrap();
        fs::write(&p, &b[..b.len() / 2]).unwrap();
    });
}

#[test]
fn a_stat_file_of_the_wrong_length_means_copies_not_links() {
    tampered_file_is_not_linked_forward(false, |fx| {
        let p = stat_file(fx, 1);
        let mut b = fs::read(&p).unwrap();
        b.extend_from_slice(&[0; 3]);
        fs::write(&p, &b).unwrap();
    });
}

/// A `.stat` of the previous format (inode and mtime only, which the tampering left as they
/// were) is not trusted either.
#[test]
fn a_stat_file_of_the_old_format_means_copies_not_links() {
    tampered_file_is_not_linked_forward(false, |fx| {
        let r1 = fx.release(1);
        let files = ["big.txt", "keep.txt", "other.txt"];
        let mut b = b"FLIPSTA1".to_vec();
        b.extend_from_slice(&(files.len() as u64).to_le_bytes());
        for f in files {
            let m = fs::symlink_metadata(r1.join(f)).unwrap();
            b.extend_from_slice(&m.ino().to_le_bytes());
            b.extend_from_slice(&m.mtime().to_le_bytes());
            b.extend_from_slice(&(m.mtime_nsec() as u32).to_le_bytes());
        }
        fs::write(stat_file(fx, 1), &b).unwrap();
    });
}

/// Deploying the same source again repairs a tampered live release: the edited file is sent
/// again into a new inode, the rest is linked.
#[test]
fn a_redeploy_of_the_same_source_heals_a_tampered_live_release() {
    let fx = Fx::new();
    let src = deployed_site(&fx);
    tamper_in_place(&fx.current().join("big.txt"));
    let run = fx.flip(&["verify", fx.root_str()]).code(7);
    assert!(
        run.stdout.contains("big.txt") || run.stderr.contains("big.txt"),
        "{run:?}"
    );

    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/release"), 2);
    let (r1, r2) = (fx.release(1), fx.release(2));
    assert_eq!(fs::read(r2.join("big.txt")).unwrap(), src.read("big.txt"));
    assert_ne!(ino(&r2.join("big.txt")), ino(&r1.join("big.txt")));
    assert_eq!(ino(&r2.join("other.txt")), ino(&r1.join("other.txt")));
    assert_dir_eq(&fx.current(), &src.tree(), "current after the redeploy");
    fx.flip(&["verify", fx.root_str()]).success();
}

/// Something added to the live release behind flip's back (a script dropped into it, at the top
/// or in a directory, a directory, a symlink to `/etc`) makes it no longer the deployed tree:
/// deploying the same source again makes a new release without it (not "unchanged"), and
/// `verify` passes. Before, only edited, removed or chmodded entries counted.
#[test]
fn a_redeploy_of_the_same_source_drops_what_was_added_to_the_live_release() {
    for planted in [
        "shell.php",
        "sub/shell.php",
        "evil-dir",
        "sub/etc-link",
        "chmod sub",
    ] {
        let fx = Fx::new();
        let src = deployed_site(&fx);
        src.file("sub/inner.txt", "inner\n", 0o644);
        let first = fx.deploy(&src, &[]);
        let live = num(&first, "/release");
        let at = fx.current().join(planted);
        match planted {
            // Not added, but a directory made world-writable is no longer the deployed tree.
            "chmod sub" => {
                fs::set_permissions(fx.current().join("sub"), fs::Permissions::from_mode(0o777))
                    .unwrap()
            }
            "evil-dir" => fs::create_dir(&at).unwrap(),
            "sub/etc-link" => std::os::unix::fs::symlink("/etc", &at).unwrap(),
            _ => fs::write(&at, "<?php system($_GET['c']);\n").unwrap(),
        }
        fx.flip(&["verify", fx.root_str()]).code(7);

        let j = fx.deploy(&src, &[]);
        assert_eq!(j["unchanged"], false, "{planted}: {j}");
        assert_eq!(num(&j, "/release"), live + 1, "{planted}: {j}");
        assert!(
            fs::symlink_metadata(fx.current().join(planted)).is_err(),
            "{planted}"
        );
        assert_dir_eq(&fx.current(), &src.tree(), planted);
        fx.flip(&["verify", fx.root_str()]).success();
        // And the repaired release is the deployed tree again: no release the next time.
        let again = fx.deploy(&src, &[]);
        assert_eq!(again["unchanged"], true, "{planted}: {again}");
    }
}

/// How the live copy of a delta basis is damaged.
#[derive(Clone, Copy, Debug)]
enum Damage {
    None,
    Deleted,
    Symlink,
    EditedInPlace,
}

fn damage(p: &Path, how: Damage) {
    match how {
        Damage::None => {}
        Damage::Deleted => fs::remove_file(p).unwrap(),
        Damage::Symlink => {
            // Pointing at a file of the same content: still not what the manifest says.
            let elsewhere = p.with_file_name("elsewhere.txt");
            fs::copy(p, &elsewhere).unwrap();
            fs::remove_file(p).unwrap();
            std::os::unix::fs::symlink(&elsewhere, p).unwrap();
        }
        Damage::EditedInPlace => tamper_in_place(p),
    }
}

/// Deploy a 150 KB file, damage its live copy, change it in the source and deploy again (with a
/// warm content cache, or `--no-cache`): the deploy succeeds on the first try, the file went
/// whole (no patch, no delta against the damaged basis), and the release verifies.
fn changed_file_with_a_damaged_basis(how: Damage, extra: &[&str]) {
    let fx = Fx::new();
    let src = deployed_site(&fx);
    damage(&fx.current().join("big.txt"), how);
    src.overwrite(
        "big.txt",
        text_150k("v1").replace("line 700:", "line seven hundred:"),
    );

    let j = fx.deploy(&src, extra);
    assert_eq!(num(&j, "/release"), 2);
    assert_eq!(
        fs::read(fx.release(2).join("big.txt")).unwrap(),
        src.read("big.txt")
    );
    match how {
        // The control: an intact basis is used (a patch from the cache, or an rsync delta).
        Damage::None => {
            assert_eq!(num(&j, "/files/delta"), 1, "{j}");
            assert_eq!(num(&j, "/files/literal"), 0, "{j}");
        }
        _ => {
            assert_eq!(num(&j, "/files/delta"), 0, "{j}");
            assert_eq!(num(&j, "/files/literal"), 1, "{j}");
        }
    }
    assert_dir_eq(&fx.current(), &src.tree(), "current after the deploy");
    fx.flip(&["verify", fx.root_str()]).success();
}

#[test]
fn an_intact_basis_is_used_for_a_delta() {
    changed_file_with_a_damaged_basis(Damage::None, &[]);
    changed_file_with_a_damaged_basis(Damage::None, &["--no-cache"]);
}

#[test]
fn a_deleted_basis_makes_the_file_go_whole_in_the_same_deploy() {
    changed_file_with_a_damaged_basis(Damage::Deleted, &[]);
    changed_file_with_a_damaged_basis(Damage::Deleted, &["--no-cache"]);
}

#[test]
fn a_basis_replaced_by_a_symlink_makes_the_file_go_whole_in_the_same_deploy() {
    changed_file_with_a_damaged_basis(Damage::Symlink, &[]);
    changed_file_with_a_damaged_basis(Damage::Symlink, &["--no-cache"]);
}

#[test]
fn a_basis_edited_in_place_makes_the_file_go_whole_in_the_same_deploy() {
    changed_file_with_a_damaged_basis(Damage::EditedInPlace, &[]);
    changed_file_with_a_damaged_basis(Damage::EditedInPlace, &["--no-cache"]);
}

/// The fuzzy ancestor of a moved and edited file is checked like any basis.
#[test]
fn a_damaged_fuzzy_ancestor_makes_the_file_go_whole_in_the_same_deploy() {
    for extra in [&[][..], &["--no-cache"][..]] {
        let fx = Fx::new();
        let src = fx.src("src");
        src.file("old/Thing.php", text_150k("thing"), 0o644);
        fx.deploy(&src, &[]);
        tamper_in_place(&fx.current().join("old/Thing.php"));
        src.remove("old/Thing.php").file(
            "new/Thing.php",
            text_150k("thing").replace("line 9:", "line nine:"),
            0o644,
        );
        let j = fx.deploy(&src, extra);
        assert_eq!(num(&j, "/files/delta"), 0, "{j}");
        assert_eq!(num(&j, "/files/literal"), 1, "{j}");
        assert_dir_eq(&fx.current(), &src.tree(), "current after the deploy");
        fx.flip(&["verify", fx.root_str()]).success();
    }
}

/// Hard links join only the same path across releases: a new empty log file does not share an
/// inode with `public/.gitkeep`, a duplicate of another file's content is a copy, and an
/// unchanged file at the same path is a link. Copies cost nothing on the wire.
#[test]
fn hard_links_join_only_the_same_path() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("public/.gitkeep", "", 0o644)
        .file("a.txt", noise(7, 20_000), 0o644)
        .file("keep.txt", "unchanged\n", 0o644);
    fx.deploy(&src, &[]);
    src.file("storage/app.log", "", 0o644)
        .file("b.txt", noise(7, 20_000), 0o644);
    let j = fx.deploy(&src, &[]);
    let (r1, r2) = (fx.release(1), fx.release(2));

    assert_eq!(ino(&r2.join("keep.txt")), ino(&r1.join("keep.txt")));
    assert_eq!(ino(&r2.join("a.txt")), ino(&r1.join("a.txt")));
    let gitkeeps = [
        ino(&r1.join("public/.gitkeep")),
        ino(&r2.join("public/.gitkeep")),
    ];
    assert_ne!(gitkeeps[0], gitkeeps[1], "empty files are never linked");
    let log = ino(&r2.join("storage/app.log"));
    assert!(
        !gitkeeps.contains(&log),
        "the log shares an inode with .gitkeep"
    );
    assert_ne!(ino(&r2.join("b.txt")), ino(&r1.join("a.txt")));
    assert_ne!(ino(&r2.join("b.txt")), ino(&r2.join("a.txt")));
    assert_eq!(num(&j, "/files/linked"), 2, "{j}");
    assert_eq!(num(&j, "/files/copied"), 3, "{j}");
    assert_eq!(num(&j, "/files/literal"), 0, "{j}");
    assert_eq!(num(&j, "/files/delta"), 0, "{j}");
    assert!(
        num(&j, "/bytes/sent") < 10_000,
        "copies cost nothing on the wire: {j}"
    );
    assert_dir_eq(&fx.current(), &src.tree(), "current");
    fx.flip(&["verify", fx.root_str()]).success();

    // What the application writes into the new file stays there.
    fs::OpenOptions::new()
        .append(true)
        .open(fx.current().join("storage/app.log"))
        .unwrap()
        .write_all(b"a log line\n")
        .unwrap();
    for r in [&r1, &r2] {
        assert_eq!(fs::read(r.join("public/.gitkeep")).unwrap(), b"");
    }
}

/// setuid, setgid and sticky bits survive a deploy exactly (files and directories, also under
/// a setgid directory, whose bit mkdir would pass on), a redeploy, and a mode change; `verify`
/// notices a setuid bit added later.
#[test]
fn setuid_setgid_and_sticky_bits_survive_deploy_and_verify_checks_them() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("bin/suid", "#!/bin/sh\n", 0o4755)
        .file("bin/both", "#!/bin/sh\necho both\n", 0o6755)
        .file("shared/sub/file.txt", "x\n", 0o644)
        .file("tmp/.keep", "k\n", 0o644)
        .file("index.php", "<?php\n", 0o644)
        .dir("shared/sub", 0o755)
        .dir("shared", 0o2775)
        .dir("tmp", 0o1777);
    fx.deploy(&src, &[]);
    let expected = src.tree();
    assert_eq!(
        expected["bin/suid"],
        Node::File {
            mode: 0o4755,
            data: b"#!/bin/sh\n".to_vec()
        }
    );
    assert_eq!(expected["shared"], Node::Dir { mode: 0o2775 });
    assert_eq!(expected["tmp"], Node::Dir { mode: 0o1777 });
    assert_dir_eq(&fx.current(), &expected, "current with special bits");
    let mode = |rel: &str| fs::symlink_metadata(fx.current().join(rel)).unwrap().mode() & 0o7777;
    assert_eq!(mode("bin/both"), 0o6755);
    assert_eq!(mode("shared/sub"), 0o755);
    fx.flip(&["verify", fx.root_str()]).success();

    // A redeploy keeps them (links), a mode change alone makes a copy with the new bits.
    src.chmod("bin/suid", 0o755).chmod("index.php", 0o4644);
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/files/literal"), 0, "{j}");
    assert_dir_eq(&fx.current(), &src.tree(), "current after mode changes");
    assert_eq!(mode("bin/suid"), 0o755);
    assert_eq!(mode("index.php"), 0o4644);
    assert_eq!(
        fs::symlink_metadata(fx.release(1).join("bin/suid"))
            .unwrap()
            .mode()
            & 0o7777,
        0o4755,
        "release 1 keeps its mode"
    );
    fx.flip(&["verify", fx.root_str()]).success();

    // A setuid bit added behind flip's back is a difference.
    let p = fx.current().join("bin/both");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o6755)).unwrap();
    let p = fx.current().join("bin/suid");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o4755)).unwrap();
    let run = fx.flip(&["verify", fx.root_str()]).code(7);
    let out = format!("{}{}", run.stdout, run.stderr);
    assert!(out.contains("bin/suid") && out.contains("4755"), "{out}");
    assert!(!out.contains("bin/both"), "{out}");
}

/// The `staged` events of `.flip/log`, oldest first.
fn staged_events(fx: &Fx) -> Vec<serde_json::Value> {
    fs::read_to_string(fx.root.join(".flip/log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "staged")
        .collect()
}

/// Pruning an old release changes the ctime and link count of the inodes it shared with the live
/// one; that alone must not make the next deploy hash or copy every file (the link ledger learns
/// the new state of inodes that were as expected before the prune).
#[test]
fn pruning_does_not_make_the_next_deploy_hash_everything() {
    let fx = Fx::new();
    let src = fx.src("src");
    for i in 0..20 {
        src.file(&format!("f{i}.txt"), format!("file {i}\n"), 0o644);
    }
    fx.deploy(&src, &["--keep", "1"]);
    for v in 2..=4 {
        src.file(&format!("f{v}.txt"), format!("file {v}, v{v}\n"), 0o644);
        fx.deploy(&src, &["--keep", "1"]);
    }
    // Release 1 was pruned after the third deploy, release 2 after the fourth (the live one and
    // the rollback target are kept).
    assert_eq!(fx.release_ids(), vec![3, 4]);
    let staged = staged_events(&fx);
    assert_eq!(staged.len(), 4);
    for e in &staged[1..] {
        assert_eq!(e["hashed"], 0, "{e}");
    }

    // A file tampered with before a prune is still caught after it: the prune (which removes
    // releases 3 and 4, sharing the file's inode) must not bring its record up to date.
    for v in 5..=6 {
        src.file(&format!("f{v}.txt"), format!("file {v}, v{v}\n"), 0o644);
        fx.deploy(&src, &["--keep", "5"]);
    }
    let f15 = fx.current().join("f15.txt");
    let ino15 = ino(&f15);
    assert_eq!(ino(&fx.release(3).join("f15.txt")), ino15);
    tamper_in_place_small(&f15);
    fx.flip(&["prune", fx.root_str(), "--keep", "1"]).success();
    assert_eq!(fx.release_ids(), vec![5, 6]);
    src.file("f7.txt", "file 7, v7\n", 0o644);
    let j = fx.deploy(&src, &["--keep", "1"]);
    assert_eq!(num(&j, "/release"), 7);
    assert_ne!(ino(&fx.release(7).join("f15.txt")), ino15);
    // Not linked, its copy failed the content check: sent again.
    assert_eq!(num(&j, "/files/resent"), 1, "{j}");
    assert_dir_eq(&fx.current(), &src.tree(), "current");
    fx.flip(&["verify", fx.root_str()]).success();
}

/// [`tamper_in_place`] for a small file: its first byte changed, mtime put back.
fn tamper_in_place_small(p: &Path) {
    let (secs, nsec) = mtime(p);
    let mut f = fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all(b"F").unwrap();
    drop(f);
    set_mtime(p, secs, nsec);
}

/// A permission bit the kernel will not set is an error naming the file and the bits, and
/// nothing goes live. Here an unprivileged deploy user (`nobody`) stages under a setgid
/// `releases/` of a group it is not in: new files get that group, and the kernel silently drops
/// the setgid bit a chmod asks for.
#[test]
fn a_permission_bit_the_kernel_drops_is_a_clear_error() {
    let fx = Fx::new();
    let (uid, gid) = (65534u32, 65534u32); // nobody:nogroup
    let top = fx.path("");
    fs::set_permissions(&top, fs::Permissions::from_mode(0o755)).unwrap();
    let chown = |p: &Path, uid: u32, gid: u32| {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::chown(c.as_ptr(), uid, gid) },
            0,
            "{}",
            p.display()
        );
    };
    let home = fx.home.clone();
    chown(&home, uid, gid);
    let src = fx.src("src");
    src.file("bin/tool", "#!/bin/sh\necho v1\n", 0o2755)
        .file("index.php", "<?php\n", 0o644);
    fs::create_dir(&fx.root).unwrap();
    chown(&fx.root, uid, gid);
    let as_nobody = |args: &[&str]| {
        let out = flip_as_nobody()
            .args(args)
            .env("HOME", &home)
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .env_remove("FLIP_FAULT")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = as_nobody(&["deploy", src.s(), fx.root_str()]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        fs::symlink_metadata(fx.current().join("bin/tool"))
            .unwrap()
            .mode()
            & 0o7777,
        0o2755
    );

    // releases/ now passes group root on to what is created in it.
    let releases = fx.root.join("releases");
    chown(&releases, uid, 0);
    fs::set_permissions(&releases, fs::Permissions::from_mode(0o2775)).unwrap();
    src.file("bin/tool", "#!/bin/sh\necho v2\n", 0o2755);
    let (code, err) = as_nobody(&["deploy", src.s(), fx.root_str()]);
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("bin/tool") && err.contains("2755"), "{err}");
    assert!(!err.contains("again"), "no retry advice: {err}");
    assert_eq!(fx.current_link(), "releases/1");
}

/// A small site of three files, deployed; returns its source.
fn three_files(fx: &Fx) -> Src {
    let src = fx.src("src");
    src.file("a.php", "<?php echo 'a';\n", 0o644)
        .file("b.php", "<?php echo 'b';\n", 0o644)
        .file("c.txt", "c v1\n", 0o644);
    fx.deploy(&src, &[]);
    src
}

fn meta(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap()
}

/// A live file chowned behind flip's back (a hard link shares its owner): the next release
/// gets a new inode with the deploy user's owner, the manifest's mode and the right bytes,
/// reported as copied with a warning that says why; an untouched file is still linked.
#[test]
fn a_chowned_live_file_is_copied_into_a_new_inode_not_linked() {
    let fx = Fx::new();
    let src = three_files(&fx);
    let r1 = fx.release(1);
    let me = (meta(&r1.join("b.php")).uid(), meta(&r1.join("b.php")).gid());
    std::os::unix::fs::lchown(r1.join("a.php"), Some(65534), Some(65534)).unwrap();
    src.overwrite("c.txt", "c v2\n");

    let run = fx
        .flip(&["deploy", "--json", src.s(), fx.root_str()])
        .success()
        .stderr_has("1 unchanged file(s) of release 1 were copied into new inodes")
        .stderr_has("a.php (owner 65534:65534, recorded");
    let j = run.json();
    let r2 = fx.release(2);
    let a = meta(&r2.join("a.php"));
    assert_ne!(a.ino(), meta(&r1.join("a.php")).ino());
    assert_eq!((a.uid(), a.gid()), me);
    assert_eq!(a.mode() & 0o7777, 0o644);
    assert_eq!(a.nlink(), 1);
    assert_eq!(fs::read(r2.join("a.php")).unwrap(), src.read("a.php"));
    // The untouched file: the same inode (the fast path).
    assert_eq!(ino(&r2.join("b.php")), ino(&r1.join("b.php")));
    assert_eq!(num(&j, "/files/linked"), 1, "{j}");
    assert_eq!(num(&j, "/files/copied"), 1, "{j}");
    assert_eq!(num(&j, "/files/resent"), 0, "{j}");
    assert_dir_eq(&fx.current(), &src.tree(), "current");
    fx.flip(&["verify", fx.root_str()]).success();
}

/// A live file chmodded and chmodded back (its mode is the manifest's again, its ctime is
/// not): not vouched for, so copied, not linked.
#[test]
fn a_chmodded_live_file_is_copied_into_a_new_inode_not_linked() {
    let fx = Fx::new();
    let src = three_files(&fx);
    let r1 = fx.release(1);
    fs::set_permissions(r1.join("a.php"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(r1.join("a.php"), fs::Permissions::from_mode(0o644)).unwrap();
    src.overwrite("c.txt", "c v2\n");
    let j = fx.deploy(&src, &[]);
    let r2 = fx.release(2);
    assert_ne!(ino(&r2.join("a.php")), ino(&r1.join("a.php")));
    assert_eq!(meta(&r2.join("a.php")).mode() & 0o7777, 0o644);
    assert_eq!(fs::read(r2.join("a.php")).unwrap(), src.read("a.php"));
    assert_eq!(ino(&r2.join("b.php")), ino(&r1.join("b.php")));
    assert_eq!(
        (num(&j, "/files/linked"), num(&j, "/files/copied")),
        (1, 1),
        "{j}"
    );
}

/// `ln /somewhere/else releases/1/a.php` (same bytes as the manifest's): linking it forward
/// would carry an inode shared with a file outside the releases into every release. It is
/// copied instead, and the outside file gains no name.
#[test]
fn a_live_file_replaced_by_an_inode_linked_from_outside_is_not_linked_forward() {
    let fx = Fx::new();
    let src = three_files(&fx);
    let r1 = fx.release(1);
    let outside = fx.path("outside.php");
    fs::write(&outside, src.read("a.php")).unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).unwrap();
    fs::remove_file(r1.join("a.php")).unwrap();
    fs::hard_link(&outside, r1.join("a.php")).unwrap();
    assert_eq!(meta(&outside).nlink(), 2);
    src.overwrite("c.txt", "c v2\n");

    let j = fx.deploy(&src, &[]);
    let r2 = fx.release(2);
    assert_ne!(ino(&r2.join("a.php")), ino(&outside));
    assert_eq!(
        meta(&outside).nlink(),
        2,
        "the deploy gave the outside file no name"
    );
    assert_eq!(meta(&r2.join("a.php")).nlink(), 1);
    assert_eq!(fs::read(r2.join("a.php")).unwrap(), src.read("a.php"));
    assert_eq!(ino(&r2.join("b.php")), ino(&r1.join("b.php")));
    assert_eq!(num(&j, "/files/copied"), 1, "{j}");
    assert_dir_eq(&fx.current(), &src.tree(), "current");
}

/// A release rolled back to still vouches for its inodes (their link count and ctime changed
/// when the next release linked them, and again when releases were pruned): untouched files
/// are still linked by the deploys that follow.
#[test]
fn after_a_rollback_and_redeploy_untouched_files_are_still_linked() {
    let fx = Fx::new();
    let src = three_files(&fx);
    src.overwrite("c.txt", "c v2\n");
    fx.deploy(&src, &[]);
    fx.flip(&["rollback", fx.root_str()]).success();
    assert_eq!(fx.current_link(), "releases/1");
    src.overwrite("c.txt", "c v3\n");
    let j = fx.deploy(&src, &["--keep", "1"]);
    assert_eq!(num(&j, "/release"), 3);
    assert_eq!(
        (num(&j, "/files/linked"), num(&j, "/files/copied")),
        (2, 0),
        "{j}"
    );
    let b = ino(&fx.release(3).join("b.php"));
    // Pruned down to the live release and its rollback target, then deployed again.
    src.overwrite("c.txt", "c v4\n");
    let j = fx.deploy(&src, &["--keep", "1"]);
    assert_eq!(
        (num(&j, "/files/linked"), num(&j, "/files/copied")),
        (2, 0),
        "{j}"
    );
    assert_eq!(ino(&fx.current().join("b.php")), b);
    assert_dir_eq(&fx.current(), &src.tree(), "current");
}
