//! Attacks on a target and on the reports, through the real binary: what a hostile or careless
//! hand on the server (or in the source tree) can do between two deploys, and what flip must
//! then refuse, name or repair.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::MetadataExt;

/// The live release at `fx`, as a path.
fn live(fx: &Fx) -> std::path::PathBuf {
    fx.root.join(fx.current_link())
}

#[test]
fn a_directory_of_the_live_release_replaced_by_a_symlink_is_never_walked_through() {
    let fx = Fx::new();
    let src = fx.src("src");
    let big = noise(7, 64 * 1024);
    src.file("index.php", "v1\n", 0o644)
        .file("conf/settings.php", "<?php return ['db' => 'x'];\n", 0o644)
        .file("conf/big.bin", &big, 0o644);
    fx.deploy(&src, &[]);

    // Someone who can write into the live release swaps its conf/ for a symlink to a directory
    // outside the root holding the very same content.
    let outside = fx.path("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("settings.php"), src.read("conf/settings.php")).unwrap();
    fs::write(outside.join("big.bin"), &big).unwrap();
    let conf = live(&fx).join("conf");
    fs::rename(&conf, fx.path("conf-moved")).unwrap();
    std::os::unix::fs::symlink(&outside, &conf).unwrap();

    // A changed file whose basis would be found only through the symlink, and an unchanged one
    // that would be linked through it.
    let mut big2 = big.clone();
    big2[100] ^= 1;
    src.file("index.php", "v2\n", 0o644)
        .file("conf/big.bin", &big2, 0o644);
    let j = fx.deploy(&src, &["--no-cache", "--itemize"]);

    let rel = live(&fx);
    for name in ["settings.php", "big.bin"] {
        let foreign = outside.join(name);
        assert_eq!(
            fs::metadata(&foreign).unwrap().nlink(),
            1,
            "{name} outside the root got linked into the release: {j}"
        );
        assert_ne!(ino(&rel.join("conf").join(name)), ino(&foreign), "{name}");
    }
    assert!(fs::symlink_metadata(rel.join("conf")).unwrap().is_dir());
    assert_eq!(fs::read(rel.join("conf/big.bin")).unwrap(), big2);
    assert_eq!(num(&j, "/files/linked"), 0, "{j}");
    assert_eq!(
        num(&j, "/files/delta"),
        0,
        "no delta against a basis outside: {j}"
    );
    fx.flip(&["verify", fx.root_str()]).success();
}

#[test]
fn current_naming_a_release_id_in_another_spelling_is_refused_not_verified_as_that_release() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    fx.deploy(&src, &[]);
    src.file("index.php", "v2\n", 0o644);
    fx.deploy(&src, &[]);
    // releases/02 is not releases/2: a copy with other content, made live by hand.
    let evil = fx.root.join("releases/02");
    copy_tree(&fx.release(2), &evil);
    fs::write(evil.join("index.php"), "EVIL\n").unwrap();
    std::os::unix::fs::symlink("releases/02", fx.root.join("c.tmp")).unwrap();
    fs::rename(fx.root.join("c.tmp"), fx.current()).unwrap();

    // verify must not check releases/2 and call the live tree good.
    fx.flip(&["verify", fx.root_str()])
        .code(5)
        .stderr_has("releases/02");
    // A directory named 02 is not release 2 either: never listed as one.
    std::os::unix::fs::symlink("releases/2", fx.root.join("c.tmp")).unwrap();
    fs::rename(fx.root.join("c.tmp"), fx.current()).unwrap();
    assert_eq!(fx.listed(), vec![(1, false), (2, true)]);
    fx.flip(&["verify", fx.root_str()]).success();
}

/// Peak resident memory of the largest child process this test binary has waited for, in KiB.
fn children_max_rss_kib() -> i64 {
    // SAFETY: getrusage fills the struct we pass.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru.ru_maxrss
    }
}

#[test]
fn a_huge_stored_manifest_or_stat_record_is_damaged_not_read_into_memory() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644)
        .file("lib/a.php", "a\n", 0o644);
    fx.deploy(&src, &[]);
    src.file("index.php", "v2\n", 0o644);
    fx.deploy(&src, &[]);
    // Sparse gigabytes where the live release's manifest and identity record are.
    for name in ["2.manifest", "2.stat"] {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(fx.root.join(".flip/releases").join(name))
            .unwrap();
        f.set_len(1 << 30).unwrap();
    }
    src.file("index.php", "v3\n", 0o644);
    let j = fx.deploy(&src, &["--no-cache"]);
    let warnings = j["warnings"].to_string();
    assert!(warnings.contains("2.manifest is damaged"), "{j}");
    // Reading either would take over 1 GiB (other tests' processes stay well under 600 MiB).
    assert!(
        children_max_rss_kib() < 600 * 1024,
        "a process took {} KiB",
        children_max_rss_kib()
    );
    assert_eq!(fs::read(live(&fx).join("index.php")).unwrap(), b"v3\n");
    fx.flip(&["verify", fx.root_str()]).success();
    fx.flip(&["rollback", fx.root_str()]).success();
}

/// Three releases of a one-file site; release 3 is live.
fn three_releases(fx: &Fx) -> Src {
    let src = fx.src("src");
    for v in 1..=3 {
        src.file("index.php", format!("v{v}\n"), 0o644);
        fx.deploy(&src, &[]);
    }
    src
}

#[test]
fn a_rollback_that_finds_nothing_to_roll_back_to_names_the_damaged_releases_it_skipped() {
    let fx = Fx::new();
    three_releases(&fx);
    let meta = fx.root.join(".flip/releases");
    fs::write(meta.join("2.manifest"), "garbage").unwrap();
    fs::write(meta.join("1.json"), "garbage").unwrap();
    fx.flip(&["rollback", fx.root_str()])
        .code(5)
        .stderr_has("no release older than 3")
        .stderr_has("2.manifest is damaged")
        .stderr_has("1.json is damaged");
    assert_eq!(fx.current_link(), "releases/3");
}

#[test]
fn an_explicit_rollback_or_activate_refuses_a_release_whose_manifest_is_damaged() {
    let fx = Fx::new();
    three_releases(&fx);
    let manifest = fx.root.join(".flip/releases/2.manifest");
    let mut bytes = fs::read(&manifest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&manifest, bytes).unwrap();
    fx.flip(&["rollback", fx.root_str(), "--to", "2"])
        .code(7)
        .stderr_has("2.manifest is damaged");
    fx.flip(&["activate", fx.root_str(), "2"])
        .code(7)
        .stderr_has("2.manifest is damaged");
    assert_eq!(fx.current_link(), "releases/3");
    // An intact one still goes live.
    fx.flip(&["activate", fx.root_str(), "1"]).success();
    fx.flip(&["verify", fx.root_str()]).success();
}

/// A release's label is read back from the target (`.flip/releases/N.json`): one forged there
/// with an escape sequence, a right-to-left override and a newline was printed raw by a
/// rollback or activation of an environment, clearing the screen or forging a line. It is
/// escaped as every other name from the target is.
#[test]
fn a_label_forged_on_the_target_cannot_rewrite_the_operators_screen() {
    let fx = Fx::new();
    let src = fx.src("src");
    fs::write(
        fx.path("flip.toml"),
        format!(
            "source = \"src\"\n[env.t]\ntargets = [{:?}]\n",
            fx.root_str()
        ),
    )
    .unwrap();
    src.file("index.php", "v1\n", 0o644);
    fx.flip(&["deploy", "t", "--label", "one"]).success();
    src.file("index.php", "v2\n", 0o644);
    fx.flip(&["deploy", "t", "--label", "two"]).success();
    let meta = fx.root.join(".flip/releases/1.json");
    let mut j: serde_json::Value = serde_json::from_slice(&fs::read(&meta).unwrap()).unwrap();
    j["label"] = "\u{1b}[2Jevil\u{202e}eno\n+ file forged".into();
    fs::write(&meta, j.to_string()).unwrap();
    let shown = r"\x1b[2Jevil\u{202e}eno\n+ file forged";
    for args in [
        &["rollback", "t"][..],
        &["activate", "t", "two"],
        &["activate", "t", "1"],
    ] {
        let run = fx.flip(args).success();
        let all = format!("{}{}", run.stdout, run.stderr);
        assert!(
            !all.contains('\u{1b}') && !all.contains('\u{202e}') && !all.contains("\n+ file"),
            "{args:?}: {all:?}"
        );
        if args[0] != "activate" || args[2] == "1" {
            assert!(all.contains(shown), "{args:?}: {all:?}");
        }
    }
    assert_eq!(fx.current_link(), "releases/1");
}

#[test]
fn a_file_name_with_a_newline_or_a_bidi_override_cannot_forge_a_line_of_the_itemized_list() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    fx.deploy(&src, &[]);
    // One new file whose name, printed raw, would read as the removal of index.php.
    let name = "x\n- file index.php";
    src.file(name, "hi\n", 0o644)
        .file("back\\slash\ttab", "hi\n", 0o644)
        // Shown raw, it reads "invoicephp.png" (right-to-left override).
        .file("invoice\u{202e}gnp.php", "hi\n", 0o644)
        .symlink("link", "to\nwhere");
    let check = |run: Run, what: &str| {
        let lines: Vec<&str> = run
            .stdout
            .lines()
            .filter(|l| {
                let b = l.as_bytes();
                b.len() > 2 && b"+-~m>=".contains(&b[0]) && b[1] == b' '
            })
            .collect();
        assert_eq!(
            lines,
            [
                "+ file back\\\\slash\\ttab (literal)",
                "+ file invoice\\u{202e}gnp.php (literal)",
                "+ link link -> to\\nwhere",
                "+ file x\\n- file index.php (literal)",
            ],
            "{what}"
        );
    };
    let root = fx.root_str();
    let old = s(&fx.release(1)).to_string();
    check(
        fx.flip(&["diff", &old, src.s(), "--itemize"]).success(),
        "diff",
    );
    check(
        fx.flip(&["deploy", src.s(), root, "--dry-run"]).success(),
        "dry run",
    );
    check(
        fx.flip(&["deploy", src.s(), root, "--itemize"]).success(),
        "deploy",
    );
    // The file itself is deployed under its real name.
    assert_eq!(fs::read(live(&fx).join(name)).unwrap(), b"hi\n");
}

#[test]
fn error_messages_name_each_path_once() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    let missing = fx.path("missing");
    let m = s(&missing);
    for args in [vec!["releases", m], vec!["rollback", m], vec!["verify", m]] {
        let run = fx.flip(&args).code(5).stderr_has(m);
        assert_eq!(run.stderr.matches(m).count(), 1, "{}", run.stderr);
    }
    fx.deploy(&src, &[]);
    let releases = fx.root.join("releases");
    let run = fx.flip(&["releases", s(&releases)]).code(5);
    assert_eq!(
        run.stderr.matches(s(&releases)).count(),
        1,
        "{}",
        run.stderr
    );
    // A target inside the source, given plainly: each path once.
    let inside = src.p("deploy");
    let run = fx.flip(&["deploy", src.s(), s(&inside)]).code(2);
    assert_eq!(run.stderr.matches(s(&inside)).count(), 1, "{}", run.stderr);
    assert!(!inside.exists());
}

/// Whether process `pid` has `path` open.
fn has_open(pid: u32, path: &std::path::Path) -> bool {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    rd.flatten()
        .any(|e| fs::read_link(e.path()).is_ok_and(|t| t == path))
}

#[test]
fn a_large_source_file_truncated_while_it_is_sent_is_a_source_change_not_a_crash() {
    let fx = Fx::new();
    let src = fx.src("src");
    let big = noise(11, 40 << 20);
    src.file("var/big.log", &big, 0o644)
        .file("index.php", "v1\n", 0o644);
    fx.deploy(&src, &[]);
    let mut big2 = big.clone();
    big2[1000] ^= 1;
    src.overwrite("var/big.log", &big2);
    let path = src.p("var/big.log");
    let mut run = fx.spawn(&[], &["deploy", src.s(), fx.root_str()]);
    let pid = run.pid();
    let deadline = std::time::Instant::now() + TIMEOUT;
    let staging = fx.root.join("releases/.staging-2");
    while run.is_running() && std::time::Instant::now() < deadline {
        // After the scan (the agent stages once it has the manifest), when the send opens it.
        if staging.exists() && has_open(pid, &path) {
            // logrotate's copytruncate, in the middle of the send.
            fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(1000)
                .unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // `finish` fails the test if flip died of a signal (SIGBUS from a truncated mapping).
    run.finish(TIMEOUT)
        .code(4)
        .stderr_has("var/big.log changed while flip was deploying it");
    assert_eq!(fx.current_link(), "releases/1");
    src.overwrite("var/big.log", &big2);
    fx.deploy(&src, &[]);
    assert_eq!(fs::read(live(&fx).join("var/big.log")).unwrap(), big2);
}

/// Runs flip as `nobody` (uid 65534) with its own home, in a temp dir nobody can enter.
struct Nobody {
    fx: Fx,
    home: std::path::PathBuf,
    root: std::path::PathBuf,
}

impl Nobody {
    fn new() -> Nobody {
        use std::os::unix::fs::PermissionsExt;
        let fx = Fx::new();
        fs::set_permissions(fx.path(""), fs::Permissions::from_mode(0o755)).unwrap();
        let own = fx.path("nobody");
        fs::create_dir(&own).unwrap();
        std::os::unix::fs::chown(&own, Some(65534), Some(65534)).unwrap();
        let home = own.join("home");
        fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
        let root = own.join("target");
        Nobody { fx, home, root }
    }

    fn run(&self, args: &[&str]) -> Run {
        let out = flip_as_nobody()
            .args(args)
            .env("HOME", &self.home)
            .env("XDG_CACHE_HOME", self.home.join(".cache"))
            .env_remove("FLIP_FAULT")
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run setpriv");
        Run {
            args: args.join(" "),
            code: out.status.code().expect("not killed"),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

#[test]
fn cleanup_never_removes_through_a_directory_swapped_for_a_symlink_meanwhile() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let w = Nobody::new();
    let src = w.fx.src("src");
    let root = s(&w.root).to_string();
    let deploy = |v: u32| {
        src.file("index.php", format!("v{v}\n"), 0o644);
        w.run(&["deploy", "--keep", "1", src.s(), &root]).success();
    };
    deploy(1);
    // The web server (here root) keeps a cache inside release 1 that the deploy user cannot
    // empty, so cleanup walks it entry by entry.
    let cache = w.root.join("releases/1/var/cache");
    fs::create_dir_all(cache.join("sub")).unwrap();
    fs::write(cache.join("sub/victim"), "cached").unwrap();
    // Something the deploy user may delete, outside the target, with the same name.
    let precious = w.fx.path("nobody/precious");
    fs::create_dir(&precious).unwrap();
    fs::write(precious.join("victim"), "keep me").unwrap();
    std::os::unix::fs::chown(&precious, Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::chown(precious.join("victim"), Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::symlink(&precious, cache.join("link")).unwrap();
    deploy(2);
    deploy(3);
    let cache = w.root.join("releases/.trash-1/var/cache");
    assert!(cache.join("sub/victim").exists(), "release 1 is trash now");

    // While the deploy user retries the cleanup, the cache's owner keeps swapping its
    // directory and its symlink.
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let a = std::ffi::CString::new(s(&cache.join("sub"))).unwrap();
            let b = std::ffi::CString::new(s(&cache.join("link"))).unwrap();
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: renameat2 with two NUL-terminated paths.
                unsafe {
                    libc::renameat2(
                        libc::AT_FDCWD,
                        a.as_ptr(),
                        libc::AT_FDCWD,
                        b.as_ptr(),
                        libc::RENAME_EXCHANGE,
                    )
                };
            }
        });
        for _ in 0..40 {
            w.run(&["prune", "--keep", "1", &root]).success();
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(
        fs::read(precious.join("victim")).ok().as_deref(),
        Some(&b"keep me"[..]),
        "cleanup removed a file outside the target through a swapped symlink"
    );
    assert_eq!(
        fs::read_link(w.root.join("current")).unwrap(),
        std::path::Path::new("releases/3")
    );
}

#[test]
fn an_agent_whose_client_was_killed_stops_its_work_and_frees_the_lock_at_once() {
    let fx = Fx::new();
    let src = fx.src("src");
    let files: Vec<Vec<u8>> = (0..4).map(|i| noise(20 + i, 32 << 20)).collect();
    for (i, f) in files.iter().enumerate() {
        src.file(&format!("data/{i}.bin"), f, 0o644);
    }
    fx.deploy(&src, &[]);
    for (i, f) in files.iter().enumerate() {
        let mut f = f.clone();
        f[12345] ^= 1;
        src.overwrite(&format!("data/{i}.bin"), &f);
    }
    // Signatures of 128 MiB of bases: seconds of work for the agent (a debug build's longer).
    let mut run = fx.spawn(&[], &["deploy", "--no-cache", src.s(), fx.root_str()]);
    let pid = run.pid();
    let staging = fx.root.join("releases/.staging-2");
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !staging.exists() && run.is_running() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // The agent is a child of whichever of the client's threads connected (a phase 1 worker
    // of the pipeline, not the main thread).
    let agent: u32 = *children(pid).first().expect("the client runs its agent");
    std::thread::sleep(std::time::Duration::from_millis(100));
    // SAFETY: kill of the flip client this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(run.wait_any(TIMEOUT).is_some());
    let killed = std::time::Instant::now();
    while !exited(agent) && killed.elapsed() < TIMEOUT {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let took = killed.elapsed();
    assert!(
        took < std::time::Duration::from_secs(5),
        "the agent worked on for {took:?} after its client was killed, holding the lock"
    );
    assert!(
        !staging.exists(),
        "the abandoned staging directory was removed"
    );
    // Whatever takes the lock right after finds it free.
    fx.flip(&["prune", fx.root_str()]).success();
    assert_eq!(fx.current_link(), "releases/1");
}

/// A deploy that waits for the lock (`--wait`) and whose client is killed (a CI job cancelled)
/// left its agent polling the lock for as long as the holder kept it, then taking it to stage a
/// release for no one: its agent now ends at its next look at the lock.
#[test]
fn an_agent_waiting_for_the_lock_whose_client_was_killed_stops_waiting() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    fx.deploy(&src, &[]);
    src.file("index.php", "v2\n", 0o644);
    // Held as another deploy holds it.
    let lock = hold_root_lock(&fx.root);
    let run = fx.spawn(&[], &["deploy", "--wait", src.s(), fx.root_str()]);
    let pid = run.pid();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !run.stderr_so_far().contains("waiting") {
        assert!(
            std::time::Instant::now() < deadline,
            "the deploy never waited"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let agent: u32 = *children(pid).first().expect("the client runs its agent");
    // SAFETY: kill of the flip client this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(run.wait_any(TIMEOUT).is_some());
    let killed = std::time::Instant::now();
    while !exited(agent) && killed.elapsed() < TIMEOUT {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let took = killed.elapsed();
    assert!(
        took < std::time::Duration::from_secs(5),
        "the agent still waited for the lock {took:?} after its client was killed"
    );
    // It never got the lock: nothing was staged, and the holder still holds it.
    drop(lock);
    assert!(
        !fs::read_dir(fx.root.join("releases")).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".staging")),
        "nothing staged"
    );
    assert_eq!(fx.current_link(), "releases/1");
    fx.deploy(&src, &[]);
    assert_eq!(fx.current_link(), "releases/2");
}

/// A first deploy streams its files to the agent, which queues them to its writers: killed,
/// the client left an agent writing out its queue of small files for seconds (up to 4 s for
/// 30,000 files, release build), the lock held and the half-made target there all along.
/// The client is killed as soon as the agent has begun the release, and the tree is larger
/// than what the agent reads ahead of its writers (64 MiB): the client is still sending then.
/// (Killed 300 ms later instead, a client that had sent everything, `Bye` included, had asked
/// for the release to go live, and the agent rightly made it so: this test failed that way
/// now and then under load.)
#[test]
fn a_first_deploy_whose_client_was_killed_is_undone_at_once() {
    let fx = Fx::new();
    let src = fx.src("src");
    // 18,000 files of 4 KiB: 72 MiB.
    for d in 0..120 {
        for f in 0..150 {
            let line = format!("<?php // {d} {f}\n");
            src.file(
                &format!("d{d}/f{f}.php"),
                line.repeat(4096 / line.len() + 1),
                0o644,
            );
        }
    }
    let mut run = fx.spawn(&[], &["deploy", src.s(), fx.root_str()]);
    let pid = run.pid();
    let releases = fx.root.join("releases");
    let begun = || {
        fs::read_dir(&releases).is_ok_and(|mut d| {
            d.any(|e| {
                let e = e.unwrap();
                e.file_name().to_string_lossy().starts_with(".staging")
                    && fs::read_dir(e.path()).is_ok_and(|mut s| s.next().is_some())
            })
        })
    };
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !begun() && run.is_running() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(
        run.is_running(),
        "the deploy ended before it could be killed"
    );
    // SAFETY: kill of the flip client this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(run.wait_any(TIMEOUT).is_some());
    let killed = std::time::Instant::now();
    while fx.root.exists() && killed.elapsed() < TIMEOUT {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let took = killed.elapsed();
    assert!(
        took < std::time::Duration::from_secs(2),
        "the agent wrote on for {took:?} after its client was killed, holding the lock"
    );
    // A retry goes through at once.
    fx.deploy(&src, &[]);
    assert_dir_eq(&fx.current(), &src.tree(), "the retry");
}

#[test]
fn an_unchanged_empty_file_is_not_itemized_as_a_change() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("public/.gitkeep", "", 0o644)
        .file("index.php", "v1\n", 0o644);
    fx.deploy(&src, &[]);
    src.file("index.php", "v2\n", 0o644);
    let root = fx.root_str();
    let dry = fx.flip(&["deploy", src.s(), root, "--dry-run"]).success();
    let diff = fx
        .flip(&["diff", s(&fx.release(1)), src.s(), "--itemize"])
        .success();
    let deploy = fx.flip(&["deploy", src.s(), root, "--itemize"]).success();
    for (what, run) in [("dry run", &dry), ("diff", &diff), ("deploy", &deploy)] {
        assert!(!run.stdout.contains(".gitkeep"), "{what}:\n{}", run.stdout);
        assert!(
            run.stdout.contains("~ file index.php"),
            "{what}:\n{}",
            run.stdout
        );
    }
    // Still created anew, never linked.
    assert_ne!(
        ino(&fx.release(1).join("public/.gitkeep")),
        ino(&fx.release(2).join("public/.gitkeep"))
    );
}

/// `--label` refuses a newline; one written into the release's metadata on the target is
/// shown escaped in the listing.
#[test]
fn a_label_with_a_newline_cannot_forge_a_row_of_the_release_listing() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    fx.deploy(&src, &["--label", "v1"]);
    let meta = fx.root.join(".flip/releases/1.json");
    let mut j: serde_json::Value = serde_json::from_slice(&fs::read(&meta).unwrap()).unwrap();
    j["label"] = "v1\n    99  *        2026-01-01T00:00:00Z".into();
    fs::write(&meta, j.to_string()).unwrap();
    let run = fx.flip(&["releases", fx.root_str()]).success();
    let rows: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(rows.len(), 2, "a header and one release:\n{}", run.stdout);
    assert!(
        rows[1].ends_with("v1\\n    99  *        2026-01-01T00:00:00Z"),
        "{}",
        run.stdout
    );
    // JSON keeps the label as it was given.
    let j = fx
        .flip(&["releases", "--json", fx.root_str()])
        .success()
        .json();
    assert_eq!(
        j[0]["label"].as_str().unwrap(),
        "v1\n    99  *        2026-01-01T00:00:00Z"
    );
}

#[test]
fn a_fifo_where_flip_keeps_metadata_never_hangs_a_command() {
    let fx = Fx::new();
    three_releases(&fx);
    let meta = fx.root.join(".flip/releases");
    let fifo = |name: &str| {
        let p = meta.join(name);
        fs::remove_file(&p).unwrap();
        mkfifo(&p);
    };
    fifo("1.json");
    fifo("2.manifest");
    fifo("3.stat");
    let quick = std::time::Duration::from_secs(30);
    let run = |args: &[&str]| fx.spawn(&[], args).finish(quick);
    let root = fx.root_str();
    let listed = run(&["releases", root]).success();
    assert!(listed.stderr.contains("1.json"), "{}", listed.stderr);
    assert!(listed.stderr.contains("2.manifest"), "{}", listed.stderr);
    run(&["rollback", root])
        .code(5)
        .stderr_has("no release older than 3");
    let src = fx.src("src");
    src.file("index.php", "v4\n", 0o644);
    run(&["deploy", src.s(), root]).success();
    assert_eq!(fx.current_link(), "releases/4");
    run(&["verify", root]).success();
}

#[test]
fn a_name_on_the_target_cannot_send_escape_sequences_to_the_terminal() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    fx.deploy(&src, &[]);
    // A file (not a directory) under releases/ with a name flip cleans up: named in a warning.
    let evil = ".staging-\u{1b}]0;pwned\u{7}\u{1b}[2J\nflip: deployed release 99";
    fs::write(fx.root.join("releases").join(evil), "").unwrap();
    src.file("index.php", "v2\n", 0o644);
    let run = fx
        .flip(&["deploy", src.s(), fx.root_str()])
        .success()
        .stderr_has(r"\x1b]0;pwned\x07\x1b[2J\nflip: deployed release 99");
    assert!(!run.stderr.contains('\u{1b}'), "{:?}", run.stderr);
    assert!(
        !run.stderr.contains("\nflip: deployed release 99"),
        "{:?}",
        run.stderr
    );
}

#[test]
fn a_forged_lock_holder_cannot_send_escape_sequences_to_the_terminal() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    fx.deploy(&src, &[]);
    // Whoever can write the lock file holds it and describes itself with escape sequences.
    let mut lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.root.join(".flip/lock"))
        .unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let holder = serde_json::json!({
        "pid": std::process::id(), "host": host.trim(), "user": "\u{1b}[2Jmallory\u{202e}resu",
        "since": 0, "what": "deploy\u{1b}]0;pwned\u{7}",
    });
    lock.set_len(0).unwrap();
    lock.write_all(holder.to_string().as_bytes()).unwrap();
    let run = fx
        .flip(&["deploy", src.s(), fx.root_str()])
        .code(3)
        .stderr_has(r"\x1b[2Jmallory\u{202e}resu");
    assert!(!run.stderr.contains('\u{1b}'), "{:?}", run.stderr);
    // Nor show the rest of the line right to left.
    assert!(!run.stderr.contains('\u{202e}'), "{:?}", run.stderr);
    let waiting = fx.spawn(&[], &["deploy", "--wait", src.s(), fx.root_str()]);
    // The client says who holds the lock once its agent waits for it.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !waiting.stderr_so_far().contains("waiting") {
        assert!(
            std::time::Instant::now() < deadline,
            "the deploy never waited"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(lock);
    let run = waiting.finish(TIMEOUT).success().stderr_has("waiting");
    assert!(!run.stderr.contains('\u{1b}'), "{:?}", run.stderr);
    assert!(!run.stderr.contains('\u{202e}'), "{:?}", run.stderr);
}

#[test]
fn a_forged_leftovers_record_cannot_name_paths_outside_the_target() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    fx.deploy(&src, &[]);
    let outside = fx.path("outside-secret");
    fs::write(&outside, "x").unwrap();
    let record = serde_json::json!([
        {"path": s(&outside), "error": "Permission denied (os error 13)"},
        {"path": "/etc/passwd", "error": "Permission denied (os error 13)"},
    ]);
    fs::write(fx.root.join(".flip/leftovers"), record.to_string()).unwrap();
    let run = fx.flip(&["releases", fx.root_str()]).success();
    assert!(!run.stderr.contains("outside-secret"), "{}", run.stderr);
    assert!(!run.stderr.contains("/etc/passwd"), "{}", run.stderr);
    let j = fx
        .flip(&["prune", "--json", fx.root_str()])
        .success()
        .json();
    assert_eq!(j["leftovers"], serde_json::json!([]), "{j}");
    assert!(outside.exists());
}

#[test]
fn flips_own_cache_inside_the_source_is_not_deployed() {
    let fx = Fx::new();
    let src = fx.src("src");
    let cache = src.p(".cache");
    let env = [("XDG_CACHE_HOME", s(&cache))];
    for v in 1..=3 {
        src.file("index.php", format!("v{v}\n"), 0o644);
        fx.flip_env(&env, &["deploy", src.s(), fx.root_str()])
            .success()
            .stderr_has("is inside the source; it is not deployed");
    }
    assert!(cache.join("flip/manifests").is_dir(), "the cache is in use");
    assert!(!live(&fx).join(".cache/flip").exists());
    assert_eq!(fs::read(live(&fx).join("index.php")).unwrap(), b"v3\n");
}

// ---- Shared paths, hooks, doctor and the CLI (issues 10 and 13), attacked as a user would ----

#[test]
fn a_shared_file_the_source_lacks_starts_empty_instead_of_failing_the_deploy() {
    let fx = Fx::new();
    fs::write(
        fx.path("flip.toml"),
        "shared_dirs = [\"storage\"]\nshared_files = [\".env\"]\n",
    )
    .unwrap();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    let j = fx.deploy(&src, &[]);
    let env = fx.root.join("shared/.env");
    let m = fs::symlink_metadata(&env).unwrap();
    assert!(m.is_file(), "{j}");
    assert_eq!((m.len(), m.mode() & 0o7777), (0, 0o644), "{j}");
    assert!(fx.root.join("shared/storage").is_dir(), "{j}");
    assert_eq!(
        fs::read_link(live(&fx).join(".env")).unwrap().to_str(),
        Some("../../shared/.env")
    );
}

#[test]
fn shared_dir_swapped_for_a_symlink_outside_is_refused_and_the_live_release_is_named() {
    let fx = Fx::new();
    let src = fx.src("src");
    fs::write(
        fx.path("flip.toml"),
        format!(
            "source = \"src\"\nshared_dirs = [\"storage\"]\n[env.t]\ntargets = [{:?}]\n",
            fx.root_str()
        ),
    )
    .unwrap();
    src.file("index.php", "v1\n", 0o644)
        .file("storage/seed.log", "seed\n", 0o644);
    fx.flip(&["deploy", "t"]).success();
    let outside = fx.path("outside");
    fs::create_dir(&outside).unwrap();
    src.file("index.php", "v2\n", 0o644);
    // shared/storage, then shared/ itself, replaced by a symlink to a directory outside.
    for swapped in ["shared/storage", "shared"] {
        let p = fx.root.join(swapped);
        fs::rename(&p, fx.path("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, &p).unwrap();
        let run = fx
            .flip(&["deploy", "t"])
            .code(10)
            .stderr_has(&format!("{} is a symlink", s(&p)))
            .stderr_has("failed (release 1 live)");
        assert!(!run.stderr.contains("no release live"), "{}", run.stderr);
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "{swapped}");
        assert_eq!(fx.current_link(), "releases/1");
        assert_eq!(fx.release_ids(), vec![1]);
        fs::remove_file(&p).unwrap();
        fs::rename(fx.path("moved"), &p).unwrap();
    }
    fx.flip(&["deploy", "t"]).success();
    assert_eq!(fs::read(live(&fx).join("index.php")).unwrap(), b"v2\n");
    assert_eq!(
        fs::read(live(&fx).join("storage/seed.log")).unwrap(),
        b"seed\n"
    );
}

#[test]
fn an_unknown_writable_owner_is_a_target_problem_not_a_connection_problem() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    fx.deploy(&src, &[]);
    for owner in ["flip-no-such-user", "root:flip-no-such-group"] {
        fs::write(
            fx.path("flip.toml"),
            format!("writable_dirs = [\"cache\"]\nwritable_owner = \"{owner}\"\n"),
        )
        .unwrap();
        let run = fx
            .flip(&["deploy", src.s(), fx.root_str()])
            .code(5)
            .stderr_has("writable_owner: no ")
            .stderr_has("nothing was changed");
        assert!(!run.stderr.contains("invalid request"), "{}", run.stderr);
        assert_eq!(fx.release_ids(), vec![1]);
        assert_eq!(fx.current_link(), "releases/1");
    }
}

#[test]
fn a_bad_shared_path_in_flip_toml_is_named_once() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    for (bad, why) in [("../up", "component"), ("/etc", "absolute"), ("", "empty")] {
        fs::write(fx.path("flip.toml"), format!("shared_dirs = [{bad:?}]\n")).unwrap();
        let run = fx
            .flip(&["deploy", src.s(), fx.root_str()])
            .code(2)
            .stderr_has(why)
            .stderr_has("flip.toml:1: shared_dirs");
        assert_eq!(
            run.stderr.matches(&format!("{bad:?}")).count(),
            1,
            "{}",
            run.stderr
        );
    }
    assert!(!fx.root.exists());
}

#[test]
fn a_hook_appending_to_a_hard_linked_deployed_file_is_flagged_not_excused() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644)
        .file("config/app.php", "<?php return [];\n", 0o644);
    fx.deploy(&src, &[]);
    // Release 2 links config/app.php from release 1; the hook appends to it in place.
    fs::write(
        fx.path("flip.toml"),
        "before_activate = [\"echo '// tampered' >> config/app.php\"]\n",
    )
    .unwrap();
    src.file("index.php", "v2\n", 0o644);
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .success()
        .stderr_has("config/app.php was changed in place");
    assert_eq!(
        ino(&fx.release(1).join("config/app.php")),
        ino(&fx.release(2).join("config/app.php"))
    );
    let run = fx.flip(&["verify", "--json", fx.root_str()]).code(7);
    let j = run.json();
    let problems = j["problems"].to_string();
    assert!(problems.contains("config/app.php"), "{j}");
    assert!(problems.contains("changed in place"), "{j}");
    assert!(
        !j["warnings"].to_string().contains("written by hooks"),
        "{j}"
    );

    // A hook that replaces the file (new inode) is not tampering: a warning only.
    fs::write(
        fx.path("flip.toml"),
        "before_activate = [\"cp config/app.php x && echo '// ok' >> x && mv x config/app.php\"]\n",
    )
    .unwrap();
    src.file("index.php", "v3\n", 0o644);
    fx.flip(&["deploy", src.s(), fx.root_str()]).success();
    fx.flip(&["verify", fx.root_str()])
        .success()
        .stderr_has("written by hooks");
}

#[test]
fn an_after_hook_failing_on_a_first_deploy_says_there_was_nothing_to_switch_back_to() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    fs::write(
        fx.path("flip.toml"),
        format!(
            "source = \"src\"\nafter_activate = [\"exit 3\"]\nrollback_on_failure = true\n[env.e]\ntargets = [{:?}]\n",
            fx.root_str()
        ),
    )
    .unwrap();
    let run = fx
        .flip(&["deploy", "e"])
        .code(12)
        .stderr_has("had no release live before: release 1 stays live")
        .stderr_has("live on its one target");
    assert!(!run.stderr.contains("all 1 targets"), "{}", run.stderr);
    assert_eq!(fx.current_link(), "releases/1");
    // The next deploy switches back to release 1 when the hook fails again.
    src.file("index.php", "v2\n", 0o644);
    fx.flip(&["deploy", "e"])
        .code(12)
        .stderr_has("switched back to release 1");
    assert_eq!(fx.current_link(), "releases/1");
    assert_eq!(fx.release_ids(), vec![1]);
}

/// Starts `flip deploy SRC ROOT` with a before-hook that writes its pid to `pidfile` and sleeps,
/// waits for the hook to run, kills the client with `signal`, and waits for the hook to be gone.
fn kill_client_during_hook(fx: &Fx, src: &Src, signal: i32) {
    let pidfile = fx.path("hook.pid");
    let _ = fs::remove_file(&pidfile);
    fs::write(
        fx.path("flip.toml"),
        format!(
            "before_activate = [\"echo $$ > {}; sleep 60\"]\n",
            s(&pidfile)
        ),
    )
    .unwrap();
    let mut run = fx.spawn(&[], &["deploy", src.s(), fx.root_str()]);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let hook = loop {
        if let Some(pid) = fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            break pid;
        }
        assert!(run.is_running(), "the deploy ended before its hook ran");
        assert!(std::time::Instant::now() < deadline, "the hook never ran");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    // SAFETY: a signal to the flip client this test started.
    unsafe { libc::kill(run.pid() as i32, signal) };
    assert!(run.wait_any(TIMEOUT).is_some());
    let killed = std::time::Instant::now();
    while !exited(hook) && killed.elapsed() < TIMEOUT {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(exited(hook), "the hook outlived its client");
    fs::remove_file(fx.path("flip.toml")).unwrap();
}

#[test]
fn a_client_killed_during_a_before_hook_leaves_no_release_behind() {
    let fx = Fx::new();
    let src = fx.src("src");
    // A first deploy: the target it was creating is gone again.
    src.file("index.php", "v1\n", 0o644);
    kill_client_during_hook(&fx, &src, libc::SIGTERM);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while fx.root.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        !fx.root.exists(),
        "a first deploy that failed leaves no target"
    );
    fx.deploy(&src, &[]);

    // A later deploy: its committed release, whose hook never finished, is removed (it would
    // otherwise be the rollback target of the next deploy), and the lock is free.
    src.file("index.php", "v2\n", 0o644);
    kill_client_during_hook(&fx, &src, libc::SIGINT);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let gone = |fx: &Fx| {
        fx.release_ids() == vec![1] && !fx.meta_files().iter().any(|f| f.starts_with("2."))
    };
    while !gone(&fx) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(fx.release_ids(), vec![1]);
    assert_eq!(fx.current_link(), "releases/1");
    assert!(gone(&fx), "{:?}", fx.meta_files());
    // The agent may still be finishing its cleanup: the lock is waited for.
    let j = fx.deploy(&src, &["--wait"]);
    assert_eq!(j["release"], 3, "{j}");
    fx.flip(&["rollback", fx.root_str()]).success();
    assert_eq!(fx.current_link(), "releases/1");
}

#[test]
fn mkpath_over_a_file_in_the_way_names_the_file() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    let file = fx.path("afile");
    fs::write(&file, "not a directory").unwrap();
    for target in ["afile/x", "afile/x/y"] {
        let t = fx.path(target);
        for extra in [&["--mkpath"][..], &[][..]] {
            let mut args = vec!["deploy", src.s(), s(&t)];
            args.extend_from_slice(extra);
            let run = fx
                .flip(&args)
                .code(5)
                .stderr_has(&format!("{} is not a directory", s(&file)));
            assert!(!run.stderr.contains("os error"), "{}", run.stderr);
        }
    }
    assert_eq!(fs::read(&file).unwrap(), b"not a directory");
}

#[test]
fn flip_config_says_where_every_value_came_from_hooks_included() {
    let fx = Fx::new();
    fs::write(
        fx.path("flip.toml"),
        "source = \".\"\n[env.prod]\ntargets = [\"/srv/app\"]\n",
    )
    .unwrap();
    let run = fx.flip(&["config", "prod"]).success();
    for line in run
        .stdout
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("targets"))
    {
        let (_, from) = line.rsplit_once("  # ").unwrap_or(("", ""));
        assert!(
            !from.trim().is_empty(),
            "no origin: {line:?}\n{}",
            run.stdout
        );
    }
    assert!(
        run.stdout.contains("before_activate = []  # default"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("3 over SSH"), "{}", run.stdout);
    let j = fx.flip(&["config", "--json", "prod"]).success().json();
    assert_eq!(j["from"]["before_activate"], "default", "{j}");
    assert_eq!(j["from"]["after_activate"], "default", "{j}");
}

#[test]
fn a_shared_file_excluded_from_the_scan_is_seeded_empty_not_a_source_change() {
    let fx = Fx::new();
    fs::write(
        fx.path("flip.toml"),
        "shared_files = [\".env\"]\nexclude = [\".env\"]\n",
    )
    .unwrap();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644)
        .file(".env", "APP_KEY=local-secret\n", 0o600);
    let j = fx.deploy(&src, &[]);
    assert_eq!(fs::read(fx.root.join("shared/.env")).unwrap(), b"", "{j}");
    // Nothing of the local secret went anywhere on the target.
    assert!(!fs::read_to_string(fx.root.join(".flip/log"))
        .unwrap()
        .contains("local-secret"));
}

#[test]
fn doctor_names_a_shared_dir_swapped_for_a_symlink_that_every_deploy_refuses() {
    let fx = Fx::new();
    fs::write(fx.path("flip.toml"), "shared_dirs = [\"storage\"]\n").unwrap();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    fx.deploy(&src, &[]);
    fx.flip(&["doctor", fx.root_str()]).success();
    let shared = fx.root.join("shared");
    fs::rename(&shared, fx.path("shared-moved")).unwrap();
    std::os::unix::fs::symlink(fx.path("shared-moved"), &shared).unwrap();
    // Doctor's one shared problem (exit 11), as its message.
    let shared_problem = || {
        let j = fx
            .flip(&["doctor", "--json", fx.root_str()])
            .code(11)
            .json();
        let findings = j["hosts"][0]["findings"].as_array().unwrap();
        let f = findings
            .iter()
            .find(|f| f["check"] == "shared" && f["severity"] == "problem")
            .unwrap_or_else(|| panic!("no shared problem: {j}"));
        f["message"].as_str().unwrap().to_string()
    };
    assert!(shared_problem().contains("a symlink"));
    // What doctor calls a problem is what the deploy refuses.
    src.file("index.php", "v2\n", 0o644);
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .code(5)
        .stderr_has("is a symlink");

    // The same one level down: shared/ real, the shared path in it a symlink.
    fs::remove_file(&shared).unwrap();
    fs::rename(fx.path("shared-moved"), &shared).unwrap();
    fx.flip(&["doctor", fx.root_str()]).success();
    let storage = shared.join("storage");
    fs::rename(&storage, fx.path("storage-moved")).unwrap();
    std::os::unix::fs::symlink(fx.path("storage-moved"), &storage).unwrap();
    let m = shared_problem();
    assert!(m.contains("storage") && m.contains("a symlink"), "{m}");
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .code(5)
        .stderr_has("is a symlink");
}

#[test]
fn a_failed_environment_rollback_names_the_live_release_once() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    fx.deploy(&src, &[]);
    fs::write(
        fx.path("flip.toml"),
        format!(
            "source = \"src\"\n[env.e]\ntargets = [{:?}, {:?}]\n",
            fx.root_str(),
            s(&fx.path("missing"))
        ),
    )
    .unwrap();
    let run = fx.flip(&["rollback", "e"]).code(10);
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains(fx.root_str()))
        .unwrap_or_else(|| panic!("{}", run.stderr));
    assert!(line.contains("(1)"), "{line}");
    assert!(!line.contains("live: release 1"), "named twice: {line}");
    assert!(!run.stderr.contains("live: none"), "{}", run.stderr);
}

#[test]
fn ctrl_c_during_a_hook_stops_the_hook_and_leaves_no_release_behind() {
    use std::os::unix::process::CommandExt;
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    fx.deploy(&src, &[]);
    let pidfile = fx.path("hook.pid");
    fs::write(
        fx.path("flip.toml"),
        format!(
            "before_activate = [\"echo $$ > {}; sleep 60\"]\n",
            s(&pidfile)
        ),
    )
    .unwrap();
    src.file("index.php", "v2\n", 0o644);
    // A terminal's Ctrl-C: SIGINT to the foreground process group, the client's.
    let mut child = std::process::Command::new(FLIP)
        .args(["deploy", src.s(), fx.root_str()])
        .current_dir(fx.path(""))
        .env("HOME", &fx.home)
        .env("XDG_CACHE_HOME", fx.home.join(".cache"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    let hook = loop {
        if let Some(pid) = fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            break pid;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the deploy ended first"
        );
        assert!(std::time::Instant::now() < deadline, "the hook never ran");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    // SAFETY: SIGINT to the process group of the flip client this test started.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
    child.wait().unwrap();
    let gone = std::time::Instant::now();
    while !(exited(hook) && fx.release_ids() == vec![1]) && gone.elapsed() < TIMEOUT {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let alive = !exited(hook);
    if alive {
        // SAFETY: the hook's shell this test's deploy started.
        unsafe { libc::kill(hook as i32, libc::SIGKILL) };
    }
    assert!(!alive, "the hook outlived the Ctrl-C'd deploy");
    assert_eq!(fx.release_ids(), vec![1]);
    assert_eq!(fx.current_link(), "releases/1");
    fs::remove_file(fx.path("flip.toml")).unwrap();
    // The agent may still be finishing its cleanup: the lock is waited for.
    fx.deploy(&src, &["--wait"]);
}

#[test]
fn flip_init_never_writes_through_a_symlink_named_flip_toml() {
    let fx = Fx::new();
    let planted = fx.path("planted-target");
    std::os::unix::fs::symlink(&planted, fx.path("flip.toml")).unwrap();
    fx.flip(&["init"]).code(2).stderr_has("exists already");
    assert!(
        !planted.exists(),
        "init created the file a dangling symlink named"
    );
    fs::write(&planted, "precious\n").unwrap();
    fx.flip(&["init", "--force"]).success();
    assert_eq!(fs::read(&planted).unwrap(), b"precious\n");
    let m = fs::symlink_metadata(fx.path("flip.toml")).unwrap();
    assert!(m.is_file(), "the symlink was replaced by the starter");
    assert!(fs::read_to_string(fx.path("flip.toml"))
        .unwrap()
        .contains("[env.prod]"));
    let leftovers: Vec<_> = fs::read_dir(fx.path(""))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_config_that_never_ends_or_blocks_is_refused_at_once() {
    let fx = Fx::new();
    let fifo = fx.path("fifo.toml");
    mkfifo(&fifo);
    for config in ["/dev/zero", s(&fifo)] {
        fx.flip(&["--config", config, "config", "prod"])
            .code(2)
            .stderr_has("not a regular file");
    }
}

#[test]
fn a_flipignore_that_is_a_fifo_or_a_symlink_to_dev_zero_is_refused_not_read() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    let ignore = src.p(".flipignore");
    mkfifo(&ignore);
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .code(4)
        .stderr_has(".flipignore: not a regular file");
    fs::remove_file(&ignore).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &ignore).unwrap();
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .code(4)
        .stderr_has(".flipignore: a symlink");
    assert!(!fx.root.exists());
    fs::remove_file(&ignore).unwrap();
    src.file(".flipignore", "*.log\n", 0o644)
        .file("debug.log", "x", 0o644);
    fx.deploy(&src, &[]);
    assert!(!live(&fx).join("debug.log").exists());
}

#[test]
fn a_hook_leaving_a_background_process_on_its_output_does_not_hang_the_deploy() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    let pidfile = fx.path("daemon.pid");
    fs::write(
        fx.path("flip.toml"),
        format!(
            "before_activate = [\"sleep 600 & echo $! > {}; echo started\"]\n",
            s(&pidfile)
        ),
    )
    .unwrap();
    // The harness's timeout (far below 600 s) fails the test if the deploy waits for it.
    let run = fx.flip(&["deploy", src.s(), fx.root_str()]);
    let pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: the background sleep this test's hook started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    run.success().stderr_has("] started");
    assert_eq!(fx.current_link(), "releases/1");
}

/// A redeploy of the same source first checks that the live release still is what was
/// committed, directories included: a directory swapped for a symlink to an identical copy
/// outside the root (every entry looks intact through it), or an empty one swapped for a
/// symlink, makes a new release with real directories, not "unchanged".
#[test]
fn a_live_directory_swapped_for_a_symlink_is_not_taken_for_an_unchanged_release() {
    for dir in ["conf", "var/cache"] {
        let fx = Fx::new();
        let src = fx.src("src");
        src.file("index.php", "v1\n", 0o644)
            .file("conf/settings.php", "<?php return [];\n", 0o644)
            .dir("var/cache", 0o755);
        fx.deploy(&src, &[]);
        let outside = fx.path("outside");
        copy_tree(&live(&fx).join(dir), &outside);
        fs::rename(live(&fx).join(dir), fx.path("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, live(&fx).join(dir)).unwrap();

        let j = fx.deploy(&src, &[]);

        assert_eq!(num(&j, "/release"), 2, "{dir}: {j}");
        assert_eq!(fx.current_link(), "releases/2", "{dir}");
        assert!(
            fs::symlink_metadata(live(&fx).join(dir)).unwrap().is_dir(),
            "{dir}"
        );
        assert_dir_eq(&fx.current(), &src.tree(), dir);
    }
}

/// A `$USER` longer than a lock holder may name (256 bytes) is cut, at a character boundary,
/// not sent whole for the agent to refuse every deploy with.
#[test]
fn a_long_user_name_does_not_stop_deploys() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    let long = "é".repeat(200);
    fx.flip_env(&[("USER", &long)], &["deploy", src.s(), fx.root_str()])
        .success();
    let holder: serde_json::Value =
        serde_json::from_slice(&fs::read(fx.root.join(".flip/lock")).unwrap()).unwrap();
    let user = holder["user"].as_str().unwrap();
    assert_eq!(user, "é".repeat(128), "{holder}");
}
