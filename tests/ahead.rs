//! The patches made ahead (while the SSH login is under way), through the real binary: a deploy
//! interrupted during the login leaves the content cache fit for the next deploys. The "SSH"
//! is an `--ssh-command` wrapper that runs the agent on this machine, after a pause while a
//! flag file exists (a slow login).

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FLIP: &str = env!("CARGO_BIN_EXE_flip");

/// Files of the tree: small (about 2 KB each, as PHP sources), so that many versions share one
/// write buffer of the content cache's pack.
const FILES: usize = 2700;

/// Version `v` of the tree: each file with `v` pairs of lines changed from the first.
fn tree(src: &Src, v: usize) {
    for i in 0..FILES {
        let mut lines: Vec<String> = (0..40)
            .map(|j| {
                format!(
                    "    public function f{i}_{j}(): int {{ return {}; }}\n",
                    j * 7 + i
                )
            })
            .collect();
        for k in 0..v {
            for n in 0..2 {
                let j = (i * 13 + k * 7 + n * 3) % 40;
                lines[j] =
                    format!("    public function g{i}_{j}_v{k}(): string {{ return 'x{k}'; }}\n");
            }
        }
        src.file(
            &format!("vendor/p{}/f{i}.php", i % 50),
            lines.concat(),
            0o644,
        );
    }
}

/// The wrapper: `[OPTIONS...] -- DESTINATION COMMAND`, COMMAND run here, after sleeping while
/// `slow` exists.
fn wrapper(dir: &Path, slow: &Path) -> PathBuf {
    let w = dir.join("ssh-here");
    fs::write(
        &w,
        format!(
            "#!/bin/sh\nwhile [ $# -gt 0 ] && [ \"$1\" != \"--\" ]; do shift; done\n\
             while [ -e '{}' ]; do sleep 0.05; done\nexec /bin/sh -c \"$3\"\n",
            slow.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&w, fs::Permissions::from_mode(0o755)).unwrap();
    w
}

/// Bytes of the content cache's newest index other than `old`.
fn newest_index(dir: &Path, old: &[PathBuf]) -> Option<(PathBuf, u64)> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "idx") && !old.contains(p))
        .collect();
    v.sort();
    let p = v.pop()?;
    let len = fs::metadata(&p).ok()?.len();
    Some((p, len))
}

/// Ctrl-C while the patches are made ahead, during the login: the content cache's index of
/// that deploy names versions whose bytes its pack never got. The next deploy must not take
/// them as kept: the retry stores them, and the deploy after it sends every changed file as a
/// patch (before, each such file went whole, and kept going whole while its pack lived).
#[test]
fn ctrl_c_during_the_patches_made_ahead_leaves_the_next_deploys_their_patches() {
    let fx = Fx::new();
    let slow = fx.path("slow-login");
    let ssh = wrapper(&fx.path(""), &slow);
    let url = format!("root@localhost:{}", fx.root_str());
    let src = fx.src("src");
    let content = fx.home.join(".cache/flip/content");
    let deploy = |extra: &[&str]| {
        let mut a = vec![
            "deploy",
            "--json",
            "--ssh-command",
            s(&ssh),
            "--remote-flip",
            FLIP,
        ];
        a.extend_from_slice(extra);
        a.extend_from_slice(&[src.s(), &url]);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        fx.flip(&a).success().json()
    };
    tree(&src, 1);
    run(deploy(&[]));
    let before: Vec<PathBuf> = fs::read_dir(&content)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();

    // Release 2, interrupted while the login is held up: once its index has flushed the
    // records of nearly every file read ahead (a multiple of its 8 KiB buffer), Ctrl-C.
    tree(&src, 2);
    fs::write(&slow, "").unwrap();
    let args = deploy(&[]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let running = fx.spawn(&[], &a);
    let flushed = (FILES / 186 * 186 * 44) as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while newest_index(&content, &before).is_none_or(|(_, len)| len < flushed) {
        assert!(Instant::now() < deadline, "the patches were not made ahead");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", &running.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let end = running
        .wait_any(Duration::from_secs(30))
        .expect("ended by Ctrl-C");
    assert!(!end.success(), "{end:?}");
    fs::remove_file(&slow).unwrap();
    assert_eq!(fx.current_link(), "releases/1");

    // The retry, then release 3: every changed file goes as a patch against release 2.
    let j = run(deploy(&[]));
    assert_eq!(num(&j, "/release"), 2, "{j}");
    tree(&src, 3);
    let j = run(deploy(&[]));
    assert_eq!(num(&j, "/release"), 3, "{j}");
    assert_eq!(num(&j, "/files/patched"), FILES as u64, "{j}");
    assert_eq!(num(&j, "/files/literal"), 0, "{j}");
    assert_dir_eq(&fx.current(), &src.tree(), "release 3");
}
