//! A target whose disk fills up mid-deploy: a clear error (exit 8), the live release intact, no
//! staging left behind, and the next deploy that fits succeeds. Needs root (mounts a small
//! tmpfs), as CI runs.

mod common;

use common::*;
use std::process::Command;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Mounts a tmpfs with `options` on `fx`'s target root (unmounted when the result is dropped);
/// `None` when not root (the test is skipped: CI runs as root).
fn small_tmpfs(fx: &Fx, options: &str) -> Option<Mount> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
        return None;
    }
    std::fs::create_dir(&fx.root).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs", fx.root_str()])
        .status()
        .expect("run mount");
    assert!(st.success(), "mount tmpfs failed");
    Some(Mount(fx.root.clone()))
}

#[test]
fn a_full_disk_fails_cleanly_and_loses_nothing() {
    let fx = Fx::new();
    let Some(_mount) = small_tmpfs(&fx, "size=2m") else {
        return;
    };

    let src = fx.src("src");
    site_v1(&src);
    fx.deploy(&src, &[]);
    let v1 = read_tree(&fx.current());

    // 3 MiB of new, incompressible content cannot fit in 2 MiB.
    for i in 0..3 {
        src.file(&format!("media/{i}.bin"), noise(100 + i, 1 << 20), 0o644);
    }
    let r = fx
        .flip(&["deploy", src.s(), fx.root_str()])
        .code(8)
        .stderr_has("no space left on device");
    assert!(r.stderr.contains("media/"), "names the file: {}", r.stderr);
    assert_eq!(fx.current_link(), "releases/1");
    assert_tree_eq(&read_tree(&fx.current()), &v1, "live release after ENOSPC");
    assert!(
        fx.release_leftovers().is_empty(),
        "{:?}",
        fx.release_leftovers()
    );
    fx.flip(&["verify", fx.root_str()]).success();

    std::fs::remove_dir_all(src.p("media")).unwrap();
    site_v2(&src);
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/release"), 3);
    assert_dir_eq(&fx.current(), &src.tree(), "deploy after freeing space");
}

/// A first deploy whose files stream into a target that runs out of inodes mid-stream (the
/// announced bytes fit, the files do not): a clear error (exit 8) naming the cause, nothing
/// left in the target root, and the next deploy that fits succeeds.
#[test]
fn a_first_deploy_running_out_of_inodes_mid_stream_leaves_nothing() {
    let fx = Fx::new();
    let Some(_mount) = small_tmpfs(&fx, "size=16m,nr_inodes=200") else {
        return;
    };
    let src = fx.src("src");
    // More than 256 files (the client streams them) and more than the target's inodes.
    for i in 0..300 {
        src.file(&format!("d{}/f{i}", i % 10), noise(i, 1000), 0o644);
    }
    let r = fx
        .flip(&["deploy", src.s(), fx.root_str()])
        .code(8)
        .stderr_has("no space left on device");
    let left: Vec<_> = std::fs::read_dir(&fx.root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?} left after: {}", r.stderr);
    for i in 100..300 {
        std::fs::remove_file(src.p(&format!("d{}/f{i}", i % 10))).unwrap();
    }
    fx.deploy(&src, &[]);
    assert_dir_eq(&fx.current(), &src.tree(), "deploy after the failed one");
}

/// A first deploy too big for the target, refused before any content (its files stream before
/// their manifest, so the agent knows their total but not the largest): the error says what
/// it needs and has free, without an empty "(the largest: )", and nothing is left behind.
#[test]
fn a_first_deploy_too_big_is_refused_up_front_with_its_size() {
    let fx = Fx::new();
    let Some(_mount) = small_tmpfs(&fx, "size=2m") else {
        return;
    };
    let src = fx.src("src");
    // More than 256 files (the client streams them), 3 MB of noise in all.
    for i in 0..300 {
        src.file(&format!("d{}/f{i}", i % 10), noise(i, 10_000), 0o644);
    }
    let r = fx
        .flip(&["deploy", src.s(), fx.root_str()])
        .code(8)
        .stderr_has("no space left on device for the release: its new files need 3000000 bytes, the filesystem has ");
    assert!(!r.stderr.contains("largest"), "{}", r.stderr);
    let left: Vec<_> = std::fs::read_dir(&fx.root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?} left after: {}", r.stderr);
}

/// Inodes in use on the filesystem of `path`.
fn inodes_used(path: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a zeroed statvfs (plain integers) is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs we own to fill.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    (st.f_files - st.f_ffree) as u64
}

/// A warm upgrade of 70,000 changed files sends them with its stage, before any answer; the
/// target has no inode left for the staging directory. The agent reads only so much after
/// the failure before it ends the session, so the client's writes fail: it must still report
/// the agent's error (exit 8, "no space left"), not the broken pipe (exit 6). Nothing is lost,
/// and the deploy goes through once there is room.
#[test]
fn a_warm_upgrade_sending_ahead_into_a_target_out_of_inodes_reports_why() {
    let fx = Fx::new();
    let Some(_mount) = small_tmpfs(&fx, "size=1g") else {
        return;
    };
    let src = fx.src("src");
    let files = |v: &str| {
        for d in 0..70 {
            for i in 0..1000 {
                src.file(&format!("d{d}/f{i}"), format!("{d}-{i} {v}\n"), 0o644);
            }
        }
    };
    files("v1");
    fx.deploy(&src, &[]);
    let v1 = src.tree();
    files("v2");
    let remount = |n: u64| {
        let opt = format!("remount,nr_inodes={n}");
        let st = Command::new("mount")
            .args(["-o", &opt, fx.root_str()])
            .status()
            .unwrap();
        assert!(st.success(), "mount -o {opt}");
    };
    remount(inodes_used(&fx.root) + 2);
    fx.flip(&["deploy", "--no-whole-file", src.s(), fx.root_str()])
        .code(8)
        .stderr_has("no space left on device");
    assert_eq!(fx.current_link(), "releases/1");
    assert_dir_eq(&fx.current(), &v1, "the live release");
    remount(1_000_000);
    let j = fx.deploy(&src, &[]);
    // (Release ids are never reused: the failed deploy had 2.)
    assert_eq!(j["release"], 3, "{j}");
    assert_dir_eq(&fx.current(), &src.tree(), "the deploy after it");
}
