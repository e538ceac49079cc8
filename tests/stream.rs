//! A first deploy sends while it hashes: the files the scan reads stream to the agent before
//! the manifest (locally and over SSH), and the release is exactly the source tree.

mod common;

use common::*;
use flip_testkit::Sshd;

/// A tree big enough to stream (more than 256 files): nested directories, modes (setuid,
/// executable, private), empty files and duplicates, symlinks, and one file above the scan's
/// whole-read size (streamed in pieces after the others). Returns the number of files.
fn streamable(src: &Src) -> usize {
    let mut small = 0;
    for d in 0..12 {
        for f in 0..25 {
            let mode = [0o644, 0o755, 0o600, 0o4750][(d + f) % 4];
            src.file(
                &format!("d{d}/sub{}/f{f}.php", d % 3),
                noise((d * 100 + f) as u64, 100 + f * 97),
                mode,
            );
            small += 1;
        }
    }
    src.file("empty-a", "", 0o644);
    src.file("empty-b", "", 0o444);
    src.file("dup-1", "same content\n", 0o644);
    src.file("dup-2", "same content\n", 0o755);
    src.dir("private", 0o700);
    src.file("private/key", "k", 0o400);
    src.symlink("link-to-d0", "d0");
    src.symlink("dangling", "nowhere/at/all");
    small += 5;
    src.file("big.bin", noise(7, (16 << 20) + 12345), 0o644);
    small + 1
}

fn streamed_count(root: &std::path::Path) -> u64 {
    let log = std::fs::read_to_string(root.join(".flip/log")).unwrap();
    let staged: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["event"] == "staged")
        .unwrap_or_else(|| panic!("no staged event in {log}"));
    staged["streamed"].as_u64().unwrap()
}

#[test]
fn a_first_deploy_streamed_locally_lands_every_byte_mode_and_symlink() {
    let fx = Fx::new();
    let src = fx.src("src");
    let files = streamable(&src);
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["release"], 1, "{j}");
    assert_tree_eq(
        &read_tree(&fx.current()),
        &src.tree(),
        "the streamed first release",
    );
    assert_eq!(
        streamed_count(&fx.root),
        files as u64,
        "every file went while the scan hashed, the big one in pieces"
    );
    let rt = j["round_trips"].as_u64().unwrap();
    assert!(rt <= 3, "first deploy round trips: {j}");
    assert_eq!(j["files"]["literal"], files as u64, "{j}");
    assert_eq!(fx.release_leftovers(), Vec::<String>::new());

    // The next deploy (an upgrade: something is live, the client knows it) does not stream.
    src.overwrite("d0/sub0/f0.php", "changed\n");
    let j = fx.deploy(&src, &[]);
    assert_eq!(j["release"], 2, "{j}");
    assert_tree_eq(&read_tree(&fx.current()), &src.tree(), "the upgrade");
    assert!(j["round_trips"].as_u64().unwrap() <= 2, "{j}");
}

/// `-v` names the time a first deploy spent sending as the scan read, apart from waiting for
/// the scan (it counted as waiting before); a deploy that does not stream has no such phase.
#[test]
fn verbose_timings_show_the_streaming_of_a_first_deploy() {
    let fx = Fx::new();
    let src = fx.src("src");
    streamable(&src);
    let timing = |r: &Run| -> String {
        r.stderr
            .lines()
            .find(|l| l.starts_with(&format!("flip: {}: connecting ", fx.root_str())))
            .unwrap_or_else(|| panic!("no phase timings: {}", r.stderr))
            .to_string()
    };
    let first = fx.flip(&["deploy", "-v", src.s(), fx.root_str()]).success();
    let line = timing(&first);
    assert!(
        line.contains("waiting for the scan ") && line.contains(", sending as the scan reads "),
        "{line}"
    );
    assert!(line.ends_with(", live"), "{line}");
    src.overwrite("d0/sub0/f0.php", "changed\n");
    let second = fx.flip(&["deploy", "-v", src.s(), fx.root_str()]).success();
    let line = timing(&second);
    assert!(!line.contains("sending as the scan reads"), "{line}");
    assert!(line.contains("staging and sending "), "{line}");
}

#[test]
fn a_first_deploy_streamed_over_ssh_lands_every_byte_mode_and_symlink() {
    let fx = Fx::new();
    let sshd = Sshd::start();
    sshd.write_known_hosts(&fx.home.join(".ssh/known_hosts"));
    let url = format!("ssh://root@127.0.0.1:{}{}", sshd.port(), fx.root_str());
    let src = fx.src("src");
    let files = streamable(&src);
    let key = s(&sshd.user_key()).to_string();
    let j = fx
        .flip(&[
            "deploy",
            "--json",
            src.s(),
            &url,
            "-i",
            &key,
            "--remote-flip",
            FLIP,
        ])
        .success()
        .json();
    assert_eq!(j["release"], 1, "{j}");
    assert_tree_eq(
        &read_tree(&fx.current()),
        &src.tree(),
        "the streamed first release over SSH",
    );
    assert_eq!(streamed_count(&fx.root), files as u64);
    assert!(j["round_trips"].as_u64().unwrap() <= 3, "{j}");
}

#[test]
fn a_client_without_a_record_of_the_target_streams_nothing_into_a_live_one() {
    let fx = Fx::new();
    let src = fx.src("src");
    streamable(&src);
    fx.deploy(&src, &[]);
    src.overwrite("d3/sub0/f1.php", "another client's change\n");
    // Another client (its own caches): it expects a first deploy, the status says otherwise.
    let other = fx.path("other-cache");
    let j = fx
        .flip_env(
            &[("XDG_CACHE_HOME", s(&other))],
            &["deploy", "--json", src.s(), fx.root_str()],
        )
        .success()
        .json();
    assert_eq!(j["release"], 2, "{j}");
    assert_tree_eq(
        &read_tree(&fx.current()),
        &src.tree(),
        "the upgrade from another client",
    );
    let log = std::fs::read_to_string(fx.root.join(".flip/log")).unwrap();
    let staged: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "staged")
        .collect();
    assert_eq!(staged.len(), 2, "{log}");
    assert_eq!(
        staged[1]["streamed"], 0,
        "nothing streams into a live target: {log}"
    );
    assert_eq!(
        staged[1]["written"], 1,
        "only the changed file is sent: {log}"
    );
}

/// A scan that fails while files stream (a file its user cannot read, as `nobody`, sorted after
/// hundreds of others) fails the deploy naming that file, and leaves nothing on the target: no
/// release, no staging, not even the target the session created.
#[test]
fn a_scan_failing_while_files_stream_names_the_file_and_leaves_no_target() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fx::new();
    let src = fx.src("src");
    streamable(&src);
    src.file("zz/unreadable.php", "secret", 0o000);
    let home = fx.path("nobody-home");
    std::fs::create_dir_all(&home).unwrap();
    for p in [fx.path(""), src.p(""), home.clone()] {
        let st = std::process::Command::new("chown")
            .args(["-R", "65534:65534", s(&p)])
            .status()
            .unwrap();
        assert!(st.success());
    }
    std::fs::set_permissions(fx.path(""), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", FLIP])
        .args(["deploy", src.s(), fx.root_str()])
        .env("HOME", &home)
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("zz/unreadable.php") && stderr.contains("Permission denied"),
        "{stderr}"
    );
    assert!(
        !fx.root.exists(),
        "the target the failed deploy created is gone: {:?}",
        std::fs::read_dir(&fx.root).map(|d| d.map(|e| e.unwrap().path()).collect::<Vec<_>>())
    );
}
