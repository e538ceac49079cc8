//! Deploys through the real binary: the first release, delta deploys against it, no-op deploys
//! from a fresh checkout, mtimes, and excludes.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;

#[test]
fn first_deploy_reproduces_the_source_exactly() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    let expected = src.tree();

    let j = fx.deploy(&src, &[]);

    // Layout.
    assert_eq!(fx.current_link(), "releases/1");
    assert_eq!(fx.release_ids(), vec![1]);
    assert!(
        fx.release_leftovers().is_empty(),
        "{:?}",
        fx.release_leftovers()
    );
    assert_eq!(fx.meta_files(), vec!["1.json", "1.manifest", "1.stat"]);
    for f in ["lock", "next-id", "log"] {
        assert!(fx.root.join(".flip").join(f).is_file(), ".flip/{f} missing");
    }

    // Content: files, bytes, modes, symlinks (dangling, directory, absolute, relative) kept as
    // symlinks, empty directories, dot-files.
    assert_dir_eq(&fx.release(1), &expected, "releases/1 vs source");
    assert_dir_eq(&fx.current(), &expected, "current vs source");
    let r1 = fx.release(1);
    assert_eq!(
        fs::symlink_metadata(r1.join("bin/run.sh")).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(
        fs::read_link(r1.join("dangling")).unwrap().to_str(),
        Some("does/not/exist")
    );
    assert!(fs::symlink_metadata(r1.join("assets-link"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_dir(r1.join("empty")).unwrap().count(), 0);
    assert_eq!(fs::read(r1.join(".htaccess")).unwrap(), b"Deny from all\n");

    // JSON report.
    let total_bytes: u64 = expected
        .values()
        .map(|n| match n {
            Node::File { data, .. } => data.len() as u64,
            _ => 0,
        })
        .sum();
    assert_eq!(num(&j, "/release"), 1);
    assert_eq!(j["target"].as_str(), Some(fx.root_str()));
    assert_eq!(j["activated"], true);
    assert!(j["previous"].is_null(), "{j}");
    assert_eq!(num(&j, "/files/total"), V1_FILES);
    assert_eq!(num(&j, "/files/literal"), V1_FILES);
    assert_eq!(num(&j, "/files/linked"), 0);
    assert_eq!(num(&j, "/files/delta"), 0);
    assert_eq!(num(&j, "/files/removed"), 0);
    assert_eq!(num(&j, "/bytes/literal"), total_bytes);
    assert_eq!(num(&j, "/bytes/matched"), 0);
    // big.bin is incompressible: it all had to cross the connection.
    assert!(num(&j, "/bytes/sent") >= BIG as u64, "{j}");
    assert!(num(&j, "/bytes/received") > 0, "{j}");
    assert!(j["duration_ms"].is_u64(), "{j}");

    // The agent's own verification agrees.
    fx.flip(&["verify", fx.root_str()]).success();
}

#[test]
fn second_deploy_links_unchanged_files_and_leaves_release_1_alone() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    fx.deploy(&src, &[]);
    let r1 = fx.release(1);
    let r1_before = read_tree(&r1);
    let r1_stats: Vec<_> = files_of(&r1_before)
        .iter()
        .map(|f| (f.clone(), ino(&r1.join(f)), mtime(&r1.join(f))))
        .collect();

    site_v2(&src);
    let expected = src.tree();
    let j = fx.deploy(&src, &[]);

    assert_eq!(num(&j, "/release"), 2);
    assert_eq!(num(&j, "/previous"), 1);
    assert_eq!(fx.current_link(), "releases/2");
    assert_dir_eq(&fx.current(), &expected, "current vs edited source");
    assert!(!fx.current().join("empty2").exists());
    assert_eq!(
        fs::read_link(fx.current().join("newlink"))
            .unwrap()
            .to_str(),
        Some("index.html")
    );

    // Release 1 is exactly what it was: bytes, modes, symlinks, and its files' inodes and mtimes.
    assert_dir_eq(&r1, &r1_before, "releases/1 after the second deploy");
    for (f, i, m) in &r1_stats {
        assert_eq!(ino(&r1.join(f)), *i, "{f}: inode of release 1 changed");
        assert_eq!(mtime(&r1.join(f)), *m, "{f}: mtime of release 1 changed");
    }

    // Unchanged files are hard links into release 1; the rename is a link to the old path.
    let r2 = fx.release(2);
    for f in ["index.html", ".htaccess", "bin/run.sh", "sub/deep/file.txt"] {
        assert_eq!(ino(&r2.join(f)), ino(&r1.join(f)), "{f} should be linked");
    }
    // Links join only the same path: the renamed file is a local copy of its old path.
    assert_ne!(
        ino(&r2.join("assets/img/logo.png")),
        ino(&r1.join("assets/logo.png")),
        "the renamed file is copied, not linked to its old path"
    );
    // Changed content and changed mode both need a new inode; an empty file is always new.
    for f in ["big.bin", "small.txt", "conf/app.conf", "sub/zero"] {
        assert_ne!(
            ino(&r2.join(f)),
            ino(&r1.join(f)),
            "{f} must be a new inode"
        );
    }
    assert_eq!(
        read_tree(&r1)["conf/app.conf"],
        Node::File {
            mode: 0o644,
            data: b"key = value\n".to_vec()
        }
    );

    // The report.
    assert_eq!(num(&j, "/files/total"), 10);
    assert_eq!(num(&j, "/files/linked"), 4);
    assert_eq!(num(&j, "/files/copied"), 3);
    assert_eq!(num(&j, "/files/delta"), 1);
    assert_eq!(num(&j, "/files/literal"), 2);
    assert_eq!(num(&j, "/files/removed"), 2);
    // The 64 changed bytes of big.bin travelled as a delta, not the whole 256 KiB.
    assert!(num(&j, "/bytes/sent") < 64 * 1024, "{j}");
    assert!(num(&j, "/bytes/matched") > BIG as u64 / 2, "{j}");
    assert!(num(&j, "/bytes/delta") > 0, "{j}");

    fx.flip(&["verify", fx.root_str()]).success();
    fx.flip(&["verify", fx.root_str(), "1"]).success();
}

#[test]
fn fresh_checkout_with_new_mtimes_transfers_nothing() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    stamp_files(&src.dir, 1_500_000_000);
    fx.deploy(&src, &[]);

    // Same content and modes, new path, new inodes, all mtimes different.
    let checkout = fx.src("checkout");
    copy_tree(&src.dir, &checkout.dir);
    stamp_files(&checkout.dir, 1_700_000_000);
    let expected = checkout.tree();
    assert_tree_eq(&expected, &src.tree(), "the copy is the same tree");

    // The same tree makes no release unless forced (tests/environments.rs covers that); a forced
    // one links everything.
    let j = fx.deploy(&checkout, &["--force-release"]);
    assert_eq!(num(&j, "/release"), 2);
    assert_eq!(num(&j, "/files/total"), V1_FILES);
    // Every file but the empty one (created anew, never linked).
    assert_eq!(num(&j, "/files/linked"), V1_FILES - 1, "{j}");
    assert_eq!(num(&j, "/files/literal"), 0, "{j}");
    assert_eq!(num(&j, "/files/delta"), 0, "{j}");
    assert_eq!(num(&j, "/files/copied"), 1, "{j}");
    assert_eq!(num(&j, "/files/removed"), 0, "{j}");
    assert_eq!(num(&j, "/bytes/literal"), 0, "{j}");
    assert!(num(&j, "/bytes/sent") < 10_000, "{j}");

    assert_dir_eq(&fx.current(), &expected, "current vs checkout");
    for f in files_of(&expected) {
        let (a, b) = (fx.release(1).join(&f), fx.release(2).join(&f));
        if f != "sub/zero" {
            assert_eq!(ino(&a), ino(&b), "{f} should be linked");
        }
        assert_eq!(
            mtime(&b),
            mtime(&a),
            "{f}: linked or copied file keeps its mtime"
        );
        assert_ne!(mtime(&b), mtime(&checkout.p(&f)), "{f}");
    }
}

#[test]
fn new_files_get_the_source_mtime_and_linked_files_keep_theirs() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    stamp_files(&src.dir, 1_400_000_000);
    fx.deploy(&src, &[]);
    let r1 = fx.release(1);
    for f in files_of(&src.tree()) {
        assert_eq!(mtime(&r1.join(&f)), mtime(&src.p(&f)), "{f}: source mtime");
    }

    site_v2(&src);
    stamp_files(&src.dir, 1_600_000_000);
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/files/delta"), 1, "{j}");
    let r2 = fx.release(2);
    // Literal (new.txt, small.txt) and delta (big.bin) files: the source's mtime, to the ns.
    for f in ["new.txt", "small.txt", "big.bin"] {
        assert_eq!(mtime(&r2.join(f)), mtime(&src.p(f)), "{f}: source mtime");
    }
    // Linked files: release 1's inode and mtime, not the source's new one; a renamed file is a
    // local copy of its old path, with its mtime.
    for (new, old) in [
        ("index.html", "index.html"),
        ("bin/run.sh", "bin/run.sh"),
        ("assets/img/logo.png", "assets/logo.png"),
    ] {
        assert_eq!(
            ino(&r2.join(new)) == ino(&r1.join(old)),
            new == old,
            "{new}"
        );
        assert_eq!(mtime(&r2.join(new)), mtime(&r1.join(old)), "{new}");
        assert_ne!(mtime(&r2.join(new)), mtime(&src.p(new)), "{new}");
    }
}

#[test]
fn excludes_and_flipignore() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file(
        ".flipignore",
        "# build output\ncache/\n*.log\n!keep.log\n/secret.txt\n",
        0o644,
    )
    .file("index.html", "hi\n", 0o644)
    .file("app.log", "noise\n", 0o644)
    .file("keep.log", "keep me\n", 0o644)
    .file("sub/debug.log", "noise\n", 0o644)
    .file("sub/keep.log", "keep me too\n", 0o644)
    .file("cache/a.bin", "cached\n", 0o644)
    .file("sub/cache/b.bin", "cached\n", 0o644)
    .file("data/cache", "a file named cache, not a directory\n", 0o644)
    .file("secret.txt", "root secret\n", 0o600)
    .file("sub/secret.txt", "not anchored here\n", 0o644)
    .file("scratch.tmp", "tmp\n", 0o644);

    let without = |t: &Tree, gone: &[&str]| -> Tree {
        t.iter()
            .filter(|(k, _)| {
                !gone
                    .iter()
                    .any(|g| *k == g || k.starts_with(&format!("{g}/")))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };

    // .flipignore (dir-only pattern at any depth, glob, negation, anchored) plus --exclude.
    let all = src.tree();
    let j = fx.deploy(&src, &["--exclude", "*.tmp"]);
    let expected = without(
        &all,
        &[
            "cache",
            "sub/cache",
            "app.log",
            "sub/debug.log",
            "secret.txt",
            "scratch.tmp",
        ],
    );
    assert_dir_eq(&fx.current(), &expected, "with .flipignore and --exclude");
    assert_eq!(num(&j, "/files/total"), files_of(&expected).len() as u64);
    assert!(fx.current().join(".flipignore").is_file());
    assert!(fx.current().join("keep.log").is_file());
    assert!(fx.current().join("data/cache").is_file());

    // --exclude comes after .flipignore: '*.log' overrides its '!keep.log', and '!secret.txt'
    // re-includes what .flipignore left out.
    fx.deploy(&src, &["--exclude", "*.log", "--exclude", "!secret.txt"]);
    let expected = without(
        &all,
        &[
            "cache",
            "sub/cache",
            "app.log",
            "sub/debug.log",
            "keep.log",
            "sub/keep.log",
        ],
    );
    assert_dir_eq(&fx.current(), &expected, "with --exclude '*.log'");

    // --no-flipignore: only --exclude applies.
    fx.deploy(&src, &["--no-flipignore", "--exclude", "*.log"]);
    let expected = without(
        &all,
        &["app.log", "sub/debug.log", "keep.log", "sub/keep.log"],
    );
    assert_dir_eq(&fx.current(), &expected, "with --no-flipignore");
}

#[test]
fn second_deploy_from_a_client_without_cached_state() {
    // The first deploy leaves the hash cache and the live manifest in this test's HOME; a client
    // on another machine has neither and must get the same release.
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    fx.deploy(&src, &[]);
    assert!(
        fx.home.join(".cache/flip").is_dir(),
        "flip's cache is under $XDG_CACHE_HOME"
    );

    site_v2(&src);
    let j = deploy_from_fresh_home(&fx, "other-home", &src, &[]);
    assert_eq!(num(&j, "/release"), 2);
    assert_eq!(num(&j, "/files/linked"), 4, "{j}");
    assert_eq!(num(&j, "/files/copied"), 3, "{j}");
    assert_eq!(num(&j, "/files/delta"), 1, "{j}");
    assert_eq!(num(&j, "/files/literal"), 2, "{j}");
    assert_eq!(num(&j, "/files/removed"), 2, "{j}");
    assert!(num(&j, "/bytes/sent") < 64 * 1024, "{j}");
    assert_dir_eq(&fx.current(), &src.tree(), "current");
    assert_eq!(
        ino(&fx.release(2).join("index.html")),
        ino(&fx.release(1).join("index.html"))
    );
}

/// With the old versions in the local content cache, changed files go as zstd patches (no
/// signature round trip), far smaller than the files; a damaged cache entry is never trusted.
#[test]
fn changed_files_go_as_patches_against_the_content_cache() {
    let fx = Fx::new();
    let src = fx.src("src");
    let text = php_lines(4000);
    // A few KiB: below the rsync delta threshold, still worth a patch.
    let small: String = text.lines().take(60).map(|l| format!("{l}\n")).collect();
    src.file("big.php", &text, 0o644)
        .file("small.php", &small, 0o644);
    fx.deploy(&src, &[]);

    src.overwrite("big.php", text.replace("line 2000:", "line two thousand:"));
    src.overwrite("small.php", small.replace("line 30:", "line thirty:"));
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/files/patched"), 2, "{j}");
    assert_eq!(num(&j, "/files/literal"), 0, "{j}");
    assert!(num(&j, "/bytes/delta") < 200, "patches are tiny: {j}");
    assert_dir_eq(&fx.current(), &src.tree(), "current after patches");
    fx.flip(&["verify", fx.root_str()]).success();

    // Damage every cached version: the deploy must notice and send something else.
    let content = fx.home.join(".cache/flip/content");
    let mut damaged = 0;
    for e in fs::read_dir(&content).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "pack") {
            let len = fs::metadata(&p).unwrap().len() as usize;
            fs::write(&p, vec![b'#'; len]).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged >= 1);
    src.overwrite(
        "big.php",
        text.replace("line 3000:", "line three thousand:"),
    );
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/files/patched"), 0, "{j}");
    assert_dir_eq(&fx.current(), &src.tree(), "current after a damaged cache");
    fx.flip(&["verify", fx.root_str()]).success();

    // --no-cache: no patches, and the same result.
    src.overwrite("small.php", "<?php echo 3;\n");
    let j = fx.deploy(&src, &["--no-cache"]);
    assert_eq!(num(&j, "/files/patched"), 0, "{j}");
    assert_dir_eq(&fx.current(), &src.tree(), "current with --no-cache");
}

/// To a local directory changed files go whole by default (as rsync's `--whole-file`): no
/// patch, no delta, and nothing kept in the content cache; the dry run predicts the same.
/// `--no-whole-file` or `whole_file = false` in flip.toml bring deltas and patches back, and
/// `--whole-file` wins over the file.
#[test]
fn a_local_deploy_sends_changed_files_whole_unless_asked_not_to() {
    let fx = Fx::new();
    let src = fx.src("src");
    let text = php_lines(4000);
    src.file("big.php", &text, 0o644)
        .file("small.php", &text[..3000], 0o644);
    let deploy = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["deploy", "--json"];
        args.extend_from_slice(extra);
        args.extend([src.s(), fx.root_str()]);
        fx.flip(&args).success().json()
    };
    deploy(&[]);
    let mut round = 0;
    let mut edit = || {
        round += 1;
        src.overwrite(
            "big.php",
            text.replace("line 2000:", &format!("edit {round}:")),
        );
        src.overwrite(
            "small.php",
            text[..3000].replace("line 30:", &format!("edit {round}:")),
        );
    };

    edit();
    let dry = deploy(&["--dry-run"]);
    let j = deploy(&[]);
    for j in [&dry, &j] {
        assert_eq!(num(j, "/files/literal"), 2, "{j}");
        assert_eq!(num(j, "/files/patched"), 0, "{j}");
        assert_eq!(num(j, "/files/delta"), 0, "{j}");
    }
    let sizes: u64 = ["big.php", "small.php"]
        .iter()
        .map(|f| fs::metadata(src.p(f)).unwrap().len())
        .sum();
    assert_eq!(
        num(&j, "/bytes/literal"),
        sizes,
        "whole and uncompressed: {j}"
    );
    assert_dir_eq(&fx.current(), &src.tree(), "current after whole files");

    // Whole-file deploys keep nothing in the content cache (it only serves patches): the
    // first deploy asking for deltas gets rsync deltas, the next one patches.
    edit();
    let j = deploy(&["--no-whole-file"]);
    assert_eq!(num(&j, "/files/patched"), 0, "{j}");
    assert_eq!(num(&j, "/files/delta"), 1, "big.php: {j}");
    assert_eq!(
        num(&j, "/files/literal"),
        1,
        "small.php, below the delta size: {j}"
    );
    edit();
    let j = deploy(&["--no-whole-file"]);
    assert_eq!(num(&j, "/files/patched"), 2, "{j}");
    assert!(num(&j, "/bytes/delta") < 300, "patches are tiny: {j}");
    assert_dir_eq(&fx.current(), &src.tree(), "current after patches");

    // The same from flip.toml; the command line wins over it.
    let conf = fx.path("flip.toml");
    fs::write(
        &conf,
        format!(
            "whole_file = false\n[env.local]\ntargets = [{:?}]\nsource = {:?}\n",
            fx.root_str(),
            src.s()
        ),
    )
    .unwrap();
    let shown = fx
        .flip(&["config", "--config", s(&conf), "local", "--json"])
        .success()
        .json();
    assert_eq!(shown["whole_file"], false, "{shown}");
    assert_eq!(shown["from"]["whole_file"], "top level", "{shown}");
    edit();
    let deploy_env = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["deploy", "--json", "--config", s(&conf)];
        args.extend_from_slice(extra);
        args.push("local");
        fx.flip(&args).success().json()
    };
    let j = deploy_env(&[]);
    assert_eq!(num(&hosts(&j)[0], "/files/patched"), 2, "{j}");
    edit();
    let j = deploy_env(&["--whole-file"]);
    assert_eq!(num(&hosts(&j)[0], "/files/literal"), 2, "{j}");
    assert_eq!(num(&hosts(&j)[0], "/files/patched"), 0, "{j}");
    assert_dir_eq(
        &fx.current(),
        &src.tree(),
        "current after the environment's deploys",
    );
    fx.flip(&["verify", fx.root_str()]).success();
}

/// Files above 4 MiB are streamed in pieces by the sending thread (never whole in memory); one
/// small enough for the content cache (≤ 8 MiB) is kept there and later goes as a patch, a
/// bigger one as an rsync delta.
#[test]
fn large_files_stream_and_later_go_as_patch_or_delta() {
    let fx = Fx::new();
    let src = fx.src("src");
    let (six, nine) = (noise(21, 6 << 20), noise(22, (9 << 20) + 77));
    src.file("media/six.bin", &six, 0o644)
        .file("media/nine.bin", &nine, 0o644)
        .file("index.php", "<?php\n", 0o644);
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/files/literal"), 3, "{j}");
    assert_eq!(
        num(&j, "/bytes/literal"),
        (six.len() + nine.len() + 6) as u64,
        "{j}"
    );
    assert_dir_eq(&fx.current(), &src.tree(), "current after large literals");

    let (mut six2, mut nine2) = (six.clone(), nine.clone());
    six2[3 << 20..(3 << 20) + 8].copy_from_slice(b"CHANGED!");
    nine2[5 << 20..(5 << 20) + 8].copy_from_slice(b"CHANGED!");
    src.file("media/six.bin", &six2, 0o644)
        .file("media/nine.bin", &nine2, 0o644);
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/files/patched"), 1, "{j}");
    assert_eq!(num(&j, "/files/delta"), 2, "{j}");
    assert_eq!(num(&j, "/files/literal"), 0, "{j}");
    assert!(num(&j, "/bytes/delta") < 200_000, "{j}");
    assert_dir_eq(&fx.current(), &src.tree(), "current after large changes");
    fx.flip(&["verify", fx.root_str()]).success();
}

/// Directory modes come out exact whatever the umask allows `mkdir` to give: read-only
/// directories (filled before their final mode is set), group-writable ones (which a 022 umask
/// would strip) and plain ones (created with their final mode directly).
#[test]
fn directory_modes_are_exact() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("ro/inner/file.php", "<?php // ro\n", 0o644)
        .file("shared/uploads.txt", "x\n", 0o644)
        .file("plain/y.php", "<?php\n", 0o644)
        .dir("ro/inner", 0o555)
        .dir("ro", 0o555)
        .dir("shared", 0o775)
        .dir("plain", 0o755)
        .dir("private", 0o700)
        .dir("odd", 0o311);
    fx.deploy(&src, &[]);
    let mode = |rel: &str| {
        fs::metadata(fx.current().join(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("ro"), 0o555);
    assert_eq!(mode("ro/inner"), 0o555);
    assert_eq!(mode("shared"), 0o775);
    assert_eq!(mode("plain"), 0o755);
    assert_eq!(mode("private"), 0o700);
    assert_eq!(mode("odd"), 0o311);
    assert_eq!(
        fs::read(fx.current().join("ro/inner/file.php")).unwrap(),
        b"<?php // ro\n"
    );
    assert_dir_eq(
        &fx.current(),
        &src.tree(),
        "current with odd directory modes",
    );
    // Make the tree removable again for the fixture's cleanup.
    for d in ["ro", "ro/inner"] {
        fs::set_permissions(src.p(d), fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// A class moved to another namespace and edited, and a front-end bundle rebuilt under a new
/// content-hashed name, have no previous version at their path; the file they replace serves as
/// the basis instead: a patch from the content cache, or an rsync delta from a cold client.
#[test]
fn moved_and_rehashed_files_are_built_from_their_old_selves() {
    let fx = Fx::new();
    let src = fx.src("src");
    let mut class = String::from("<?php\nnamespace App\\Old;\n\nfinal class Mover\n{\n");
    for i in 0..600 {
        class.push_str(&format!(
            "    public function step{i}(int $x): int {{ return $x * {i}; }}\n"
        ));
    }
    class.push_str("}\n");
    let bundle = noise(7, 300_000);
    src.file("src/Old/Mover.php", &class, 0o644)
        .file("public/build/app.3f9a2c1e.js", &bundle, 0o644)
        .file("public/index.php", "<?php\n", 0o644);
    fx.deploy(&src, &[]);

    let moved = class.replace("App\\Old", "App\\New");
    let mut rebuilt = bundle.clone();
    rebuilt[150_000..150_016].copy_from_slice(b"rebuilt-bundle!!");
    src.remove("src/Old/Mover.php")
        .file("src/New/Mover.php", &moved, 0o644)
        .remove("public/build/app.3f9a2c1e.js")
        .file("public/build/app.77c01d2b.js", &rebuilt, 0o644);
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/files/patched"), 2, "{j}");
    assert_eq!(num(&j, "/files/literal"), 0, "{j}");
    assert!(num(&j, "/bytes/delta") < 1000, "patches are small: {j}");
    assert_dir_eq(&fx.current(), &src.tree(), "current after moves");
    fx.flip(&["verify", fx.root_str()]).success();

    // The same change from a client with no cache: rsync deltas against the old names.
    fx.flip(&["rollback", fx.root_str()]).success();
    let j = deploy_from_fresh_home(&fx, "cold", &src, &[]);
    assert_eq!(num(&j, "/files/patched"), 0, "{j}");
    assert_eq!(num(&j, "/files/delta"), 2, "{j}");
    assert!(
        num(&j, "/bytes/delta") < 40_000,
        "deltas instead of 320 KB of literals: {j}"
    );
    assert_dir_eq(&fx.current(), &src.tree(), "current after cold moves");
}

/// A CI runner starts with no cache at all: deploying an unchanged tree still sends almost
/// nothing (no manifest, no content), because the live manifest's digest matches.
#[test]
fn an_unchanged_tree_from_a_cold_client_sends_almost_nothing() {
    let fx = Fx::new();
    let src = fx.src("src");
    for i in 0..2000 {
        src.file(
            &format!("src/Module{}/Class{i}.php", i % 40),
            format!(
                "<?php\nnamespace App\\Module{};\nfinal class Class{i} {{}}\n",
                i % 40
            ),
            0o644,
        );
    }
    let first = fx.deploy(&src, &[]);
    assert!(
        num(&first, "/bytes/sent") > 40_000,
        "a first deploy sends the manifest: {first}"
    );

    let checkout = fx.src("checkout");
    copy_tree(&src.dir, &checkout.dir);
    stamp_files(&checkout.dir, 1_700_000_000);
    let j = deploy_from_fresh_home(&fx, "cold-home", &checkout, &["--force-release"]);
    assert_eq!(num(&j, "/files/linked"), 2000, "{j}");
    // Besides a few requests, only the hashes of the 42 directories, which a client without
    // caches sends ahead of the status (to save the probe's round trip on an upgrade).
    assert!(num(&j, "/bytes/sent") < 2_000, "{j}");
    assert_dir_eq(
        &fx.current(),
        &checkout.tree(),
        "current after a cold no-op",
    );

    // A patch release from another cold client: only the changed directories' entries travel
    // (found by comparing directory hashes), not the 2000-entry manifest.
    checkout.overwrite("src/Module3/Class3.php", "<?php // patched\n");
    checkout.file("src/Module7/Added.php", "<?php // new\n", 0o644);
    checkout.file("src/NewModule/New.php", "<?php // new module\n", 0o644);
    std::fs::remove_dir_all(checkout.p("src/Module9")).unwrap();
    let j = deploy_from_fresh_home(&fx, "cold-home-2", &checkout, &[]);
    assert_eq!(num(&j, "/files/literal"), 3, "{j}");
    assert_eq!(num(&j, "/files/removed"), 50, "{j}");
    assert!(num(&j, "/bytes/sent") < 8_000, "{j}");
    assert_dir_eq(
        &fx.current(),
        &checkout.tree(),
        "current after a cold patch",
    );
    fx.flip(&["verify", fx.root_str()]).success();
}

/// `flip deploy --json --no-whole-file SRC ROOT` from a client with an empty HOME (no caches at
/// all), as a new CI runner is (rsync deltas, as over SSH: see [`Fx::deploy`]).
fn deploy_from_fresh_home(fx: &Fx, name: &str, src: &Src, extra: &[&str]) -> serde_json::Value {
    let home = fx.path(name);
    fs::create_dir(&home).unwrap();
    let cache = home.join(".cache");
    fx.deploy_env(
        &[("HOME", s(&home)), ("XDG_CACHE_HOME", s(&cache))],
        src,
        extra,
    )
}

/// An upgrade whose new files just under the size workers prepare whole (4 MiB) add up to
/// more than the 16 MiB allowed in flight, among many small ones: handed to the writer in
/// batches, under that bound, every byte lands.
#[test]
fn an_upgrade_of_many_files_larger_than_the_bytes_in_flight_lands_every_byte() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "v1\n", 0o644);
    fx.deploy(&src, &[]);
    for i in 0..14u64 {
        src.file(
            &format!("assets/blob{i}.bin"),
            noise(i, (4 << 20) - 4096),
            0o644,
        );
        for k in 0..40u64 {
            src.file(
                &format!("src/m{i}/c{k}.php"),
                noise(1_000 + i * 100 + k, 200 + k as usize * 31),
                0o644,
            );
        }
    }
    let expected = src.tree();
    let j = fx.deploy(&src, &[]);
    assert_eq!(num(&j, "/release"), 2);
    assert_dir_eq(&fx.release(2), &expected, "release 2");
}

/// A new target inside what another target keeps (a release, `shared/`, `.flip/`, through
/// `current`) is refused before anything is written (exit 5, naming both), also by a dry run:
/// a deploy there wrote into the release the other target serves. Next to it is fine.
#[test]
fn a_target_inside_another_targets_releases_is_refused() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    fx.deploy(&src, &[]);
    let live = src.tree();
    for inside in ["releases/1/x", "current/x", ".flip/x", "shared/x/y"] {
        let t = fx.root.join(inside);
        for dry in [&["--dry-run", "--mkpath"][..], &["--mkpath"]] {
            let args = [&["deploy"][..], dry, &[src.s(), s(&t)]].concat();
            let r = fx.flip(&args).code(5);
            assert!(
                r.stderr.contains("a directory the flip target")
                    && r.stderr.contains(fx.root_str()),
                "{inside}: {}",
                r.stderr
            );
        }
        assert!(!t.exists(), "{inside}");
    }
    // Nor through a symlink to what it keeps.
    let via = fx.path("via-current");
    std::os::unix::fs::symlink(fx.root.join("current"), &via).unwrap();
    let into = via.join("new");
    for dry in [&["--dry-run"][..], &[]] {
        let args = [&["deploy"][..], dry, &[src.s(), s(&into)]].concat();
        fx.flip(&args)
            .code(5)
            .stderr_has("a directory the flip target");
    }
    assert!(!fx.current().join("new").exists());
    assert_dir_eq(&fx.current(), &live, "the live release is untouched");
    fx.flip(&["verify", fx.root_str()]).success();
    // A symlink to nothing is no directory to deploy into: the dry run says so as the deploy.
    let dangling = fx.path("dangling");
    std::os::unix::fs::symlink(fx.path("nowhere"), &dangling).unwrap();
    for t in [dangling.clone(), dangling.join("sub")] {
        for dry in [&["--dry-run", "--mkpath"][..], &["--mkpath"]] {
            let args = [&["deploy"][..], dry, &[src.s(), s(&t)]].concat();
            fx.flip(&args).code(5).stderr_has(&format!(
                "{} is a symlink to {}, which does not exist",
                s(&dangling),
                s(&fx.path("nowhere"))
            ));
        }
    }
    let next = fx.path("next-to-it");
    fx.flip(&["deploy", src.s(), s(&next)]).success();
}
