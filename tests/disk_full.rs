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

#[test]
fn a_full_disk_fails_cleanly_and_loses_nothing() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let fx = Fx::new();
    std::fs::create_dir(&fx.root).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs", fx.root_str()])
        .status()
        .expect("run mount");
    assert!(st.success(), "mount tmpfs failed");
    let _mount = Mount(fx.root.clone());

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
