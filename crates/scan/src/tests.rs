use super::*;
use flip_manifest::RelPath;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::time::Duration;

fn write(root: &Path, rel: &str, content: &[u8]) -> PathBuf {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, content).unwrap();
    p
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// A scan start far enough after file creation that nothing is racy.
fn later() -> SystemTime {
    SystemTime::now() + Duration::from_secs(60)
}

fn kinds(out: &ScanOutput) -> BTreeMap<String, EntryKind> {
    out.manifest
        .entries()
        .iter()
        .map(|e| (e.path.to_string(), e.kind.clone()))
        .collect()
}

fn names(out: &ScanOutput) -> Vec<String> {
    out.manifest
        .entries()
        .iter()
        .map(|e| e.path.to_string())
        .collect()
}

fn file(mode: u32, content: &[u8]) -> EntryKind {
    EntryKind::File {
        mode,
        size: content.len() as u64,
        digest: Digest::of(content),
    }
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[test]
fn captures_files_dirs_symlinks_and_modes() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    write(r, "index.php", b"<?php echo 1;");
    chmod(&write(r, "bin/console", b"#!/usr/bin/env php"), 0o755);
    chmod(&write(r, "bin/setuid", b"x"), 0o4750);
    write(r, "src/Controller/Home.php", b"<?php class Home {}");
    write(r, ".htaccess", b"RewriteEngine On");
    write(r, ".env", b"APP_ENV=prod");
    write(r, "empty.txt", b"");
    fs::create_dir_all(r.join("var/cache")).unwrap();
    fs::create_dir_all(r.join("tmp")).unwrap();
    fs::create_dir_all(r.join("shared")).unwrap();
    chmod(&r.join("var"), 0o700);
    chmod(&r.join("bin"), 0o750);
    chmod(&r.join("tmp"), 0o1777);
    chmod(&r.join("shared"), 0o2775);
    symlink("../shared/uploads", r.join("uploads")).unwrap();
    symlink("index.php", r.join("src/index-link")).unwrap();

    let out = scan(r, &ScanOptions::default()).unwrap();
    let k = kinds(&out);
    let dir = |mode| EntryKind::Dir { mode };
    let expected: BTreeMap<String, EntryKind> = [
        (".env", file(0o644, b"APP_ENV=prod")),
        (".htaccess", file(0o644, b"RewriteEngine On")),
        ("bin", dir(0o750)),
        ("bin/console", file(0o755, b"#!/usr/bin/env php")),
        // All 12 permission bits are captured: setuid, setgid, sticky.
        ("bin/setuid", file(0o4750, b"x")),
        ("empty.txt", file(0o644, b"")),
        ("index.php", file(0o644, b"<?php echo 1;")),
        ("src", dir(0o755)),
        ("src/Controller", dir(0o755)),
        (
            "src/Controller/Home.php",
            file(0o644, b"<?php class Home {}"),
        ),
        (
            "src/index-link",
            EntryKind::Symlink {
                target: "index.php".into(),
            },
        ),
        (
            "uploads",
            EntryKind::Symlink {
                target: "../shared/uploads".into(),
            },
        ),
        ("shared", dir(0o2775)),
        ("tmp", dir(0o1777)),
        ("var", dir(0o700)),
        ("var/cache", dir(0o755)),
    ]
    .into_iter()
    .map(|(p, k)| (p.to_string(), k))
    .collect();
    assert_eq!(k, expected);
    // Sorted in manifest order.
    let n = names(&out);
    assert_eq!(n[0], ".env");
    assert!(n
        .windows(2)
        .all(|w| RelPath::new(&*w[0]).unwrap() < RelPath::new(&*w[1]).unwrap()));

    let s = out.stats;
    assert_eq!((s.files, s.dirs, s.symlinks), (7, 7, 2));
    let bytes: u64 = out.manifest.total_bytes();
    assert_eq!(s.bytes, bytes);
    assert_eq!(
        (s.hashed_files, s.hashed_bytes, s.cache_hits),
        (7, bytes, 0)
    );
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
}

#[test]
fn symlinks_are_never_followed() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    write(r, "real/inner.php", b"x");
    symlink("real", r.join("to-dir")).unwrap();
    symlink("/", r.join("to-root")).unwrap();
    symlink("does/not/exist", r.join("dangling")).unwrap();
    symlink("loop", r.join("loop")).unwrap();
    // A symlink matched by a directory-only pattern is not a directory.
    let out = scan(
        r,
        &ScanOptions {
            excludes: vec!["to-dir/".into()],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        names(&out),
        [
            "dangling",
            "loop",
            "real",
            "real/inner.php",
            "to-dir",
            "to-root"
        ]
    );
    assert_eq!(
        out.manifest.get(&RelPath::new("to-root").unwrap()),
        Some(&EntryKind::Symlink { target: "/".into() })
    );
    assert_eq!(out.stats.symlinks, 4);
}

#[test]
fn root_may_be_a_symlink_to_a_directory() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), "real/a", b"1");
    symlink("real", t.path().join("current")).unwrap();
    let out = scan(&t.path().join("current"), &ScanOptions::default()).unwrap();
    assert_eq!(names(&out), ["a"]);
}

/// A tree exercising every kind of pattern.
fn exclude_tree(r: &Path) {
    write(r, "keep.php", b"1");
    write(r, "cache/x.php", b"1");
    write(r, "sub/cache/y.php", b"1");
    write(r, "sub2/cache", b"a file named cache");
    write(r, "var/log/app.log", b"1");
    write(r, "var/log2", b"1");
    write(r, "sub/var/log/z", b"1");
    write(r, "debug.log", b"1");
    write(r, "sub/deep/trace.log", b"1");
    write(r, "sub/deep/keep.log", b"1");
    write(r, "node_modules/pkg/index.js", b"1");
    write(r, "a/b/c/d.tmp", b"1");
    write(r, "a/important.tmp", b"1");
    // Would fail the scan (non-UTF-8 name) if the excluded directory were descended.
    fs::write(r.join("cache").join(OsStr::from_bytes(b"\xff.php")), b"1").unwrap();
}

#[test]
fn excludes_from_flipignore_and_flags() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    exclude_tree(r);
    fs::write(
        r.join(FLIPIGNORE),
        "# comment\r\ncache/\n/var/log\n*.log\n!keep.log\nnode_modules/**\n\n",
    )
    .unwrap();
    let opts = ScanOptions {
        excludes: vec!["a/**/*.tmp".into(), "!important.tmp".into()],
        ..Default::default()
    };
    let out = scan(r, &opts).unwrap();
    assert_eq!(
        names(&out),
        [
            ".flipignore",
            "a",
            "a/b",
            "a/b/c",
            "a/important.tmp",
            "keep.php",
            "node_modules",
            "sub",
            "sub/deep",
            "sub/deep/keep.log",
            "sub/var",
            "sub/var/log",
            "sub/var/log/z",
            "sub2",
            "sub2/cache",
            "var",
            "var/log2",
        ]
    );

    // A flag can undo a .flipignore line, and exclude .flipignore itself.
    let opts = ScanOptions {
        excludes: vec!["!debug.log".into(), "/.flipignore".into()],
        ..Default::default()
    };
    let n = names(&scan(r, &opts).unwrap());
    assert!(n.contains(&"debug.log".to_string()));
    assert!(!n.contains(&".flipignore".to_string()));
    assert!(!n.contains(&"sub/deep/trace.log".to_string()));
}

#[test]
fn flipignore_can_be_disabled() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    write(r, "a.log", b"1");
    write(r, ".flipignore", b"*.log\n");
    let opts = ScanOptions {
        use_flipignore: false,
        ..Default::default()
    };
    assert_eq!(names(&scan(r, &opts).unwrap()), [".flipignore", "a.log"]);
    assert_eq!(
        names(&scan(r, &ScanOptions::default()).unwrap()),
        [".flipignore"]
    );
}

#[test]
fn dot_files_included_and_gitignore_not_honoured() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    write(r, ".gitignore", b"*.php\n.env\n");
    write(r, "index.php", b"1");
    write(r, ".env", b"1");
    write(r, ".user.ini", b"1");
    write(r, ".git/HEAD", b"ref");
    write(r, "public/.htaccess", b"1");
    let out = scan(r, &ScanOptions::default()).unwrap();
    assert_eq!(
        names(&out),
        [
            ".env",
            ".git",
            ".git/HEAD",
            ".gitignore",
            ".user.ini",
            "index.php",
            "public",
            "public/.htaccess"
        ]
    );
}

#[test]
fn invalid_pattern_is_an_error_naming_its_origin() {
    let t = tempfile::tempdir().unwrap();
    let opts = ScanOptions {
        excludes: vec!["[z-a]".into()],
        ..Default::default()
    };
    let e = scan(t.path(), &opts).unwrap_err().to_string();
    assert!(e.contains("--exclude") && e.contains("[z-a]"), "{e}");

    write(t.path(), FLIPIGNORE, b"ok\n[z-a]\n");
    let e = scan(t.path(), &ScanOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains(".flipignore line 2"), "{e}");
}

#[test]
fn hash_cache_hits_and_invalidation() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path().join("src");
    write(&r, "a.php", b"aaaa");
    write(&r, "dir/b.php", b"bbbb");
    let c = write(&r, "c.php", b"cccc");
    let cache = t.path().join("state/hashes.bin");
    let opts = ScanOptions {
        hash_cache: Some(cache.clone()),
        ..Default::default()
    };

    let first = scan_at(&r, &opts, later()).unwrap();
    assert_eq!((first.stats.hashed_files, first.stats.cache_hits), (3, 0));
    assert!(cache.is_file(), "cache written, parent created");

    let second = scan_at(&r, &opts, later()).unwrap();
    assert_eq!(
        (
            second.stats.hashed_files,
            second.stats.hashed_bytes,
            second.stats.cache_hits
        ),
        (0, 0, 3)
    );
    assert_eq!(second.manifest, first.manifest);

    // Same size, new content, mtime bumped: re-hashed.
    fs::write(&c, b"CCCC").unwrap();
    let f = fs::File::options().write(true).open(&c).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(f);
    let third = scan_at(&r, &opts, later() + Duration::from_secs(10)).unwrap();
    assert_eq!((third.stats.hashed_files, third.stats.cache_hits), (1, 2));
    assert_eq!(
        third.manifest.get(&RelPath::new("c.php").unwrap()),
        Some(&file(0o644, b"CCCC"))
    );

    // Deleted files leave the cache; the rest still hit.
    fs::remove_file(r.join("a.php")).unwrap();
    let fourth = scan_at(&r, &opts, later() + Duration::from_secs(10)).unwrap();
    assert_eq!((fourth.stats.hashed_files, fourth.stats.cache_hits), (0, 2));
    let (loaded, _) = Cache::load(&cache);
    assert_eq!(loaded.len(), 2);

    // Without the option nothing is read.
    let plain = scan(&r, &ScanOptions::default()).unwrap();
    assert_eq!(plain.stats.cache_hits, 0);
    assert_eq!(plain.manifest, fourth.manifest);
}

#[test]
fn content_change_with_same_size_and_restored_mtime_is_caught_by_ctime() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path().join("src");
    let p = write(&r, "a.php", b"aaaa");
    let old = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    let set = |p: &Path| {
        let f = fs::File::options().write(true).open(p).unwrap();
        f.set_modified(old).unwrap();
    };
    set(&p);
    let opts = ScanOptions {
        hash_cache: Some(t.path().join("cache")),
        ..Default::default()
    };
    // Pretend the scan happened long ago enough... (ctime is now, so start must be later).
    scan_at(&r, &opts, later()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    fs::write(&p, b"bbbb").unwrap();
    set(&p); // mtime and size identical to the cached key; ctime is not.
    let out = scan_at(&r, &opts, later()).unwrap();
    assert_eq!(out.stats.cache_hits, 0);
    assert_eq!(
        out.manifest.get(&RelPath::new("a.php").unwrap()),
        Some(&file(0o644, b"bbbb"))
    );
}

#[test]
fn racy_files_are_not_cached() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path().join("src");
    write(&r, "fresh.php", b"1");
    let opts = ScanOptions {
        hash_cache: Some(t.path().join("cache")),
        ..Default::default()
    };
    // Real clock: the file was just written, so it is within the racy window.
    scan(&r, &opts).unwrap();
    let again = scan(&r, &opts).unwrap();
    assert_eq!((again.stats.hashed_files, again.stats.cache_hits), (1, 0));
    let (loaded, _) = Cache::load(&t.path().join("cache"));
    assert_eq!(loaded.len(), 0);
}

#[test]
fn corrupt_or_foreign_cache_is_ignored() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path().join("src");
    write(&r, "a.php", b"aaaa");
    write(&r, "b.php", b"bbbb");
    let cache = t.path().join("cache");
    let opts = ScanOptions {
        hash_cache: Some(cache.clone()),
        ..Default::default()
    };
    let truth = scan(&r, &ScanOptions::default()).unwrap().manifest;

    for garbage in [&b""[..], b"FLIPHC01", b"\x00\x01\x02garbage", &[0xff; 4096]] {
        fs::write(&cache, garbage).unwrap();
        let out = scan_at(&r, &opts, later()).unwrap();
        assert_eq!((out.stats.cache_hits, out.stats.hashed_files), (0, 2));
        assert_eq!(out.manifest, truth);
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    }
    // Rewritten properly: now it hits.
    assert_eq!(scan_at(&r, &opts, later()).unwrap().stats.cache_hits, 2);

    // A valid cache with one flipped bit anywhere is not trusted.
    let good = fs::read(&cache).unwrap();
    for i in (0..good.len()).step_by(7) {
        let mut bad = good.clone();
        bad[i] ^= 1;
        fs::write(&cache, &bad).unwrap();
        let out = scan_at(&r, &opts, later()).unwrap();
        assert_eq!(out.stats.cache_hits, 0, "flipped byte {i} trusted");
        assert_eq!(out.manifest, truth);
    }

    // A directory where the cache should be: warnings, but the scan succeeds.
    fs::remove_file(&cache).unwrap();
    fs::create_dir(&cache).unwrap();
    let out = scan_at(&r, &opts, later()).unwrap();
    assert_eq!(out.manifest, truth);
    assert!(!out.warnings.is_empty());
}

#[test]
fn cache_inside_the_tree_is_left_out() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    write(r, "a.php", b"1");
    fs::create_dir(r.join(".flip")).unwrap();
    let opts = ScanOptions {
        hash_cache: Some(r.join(".flip/../.flip/hashes")),
        ..Default::default()
    };
    scan_at(r, &opts, later()).unwrap();
    assert!(r.join(".flip/hashes").is_file());
    let out = scan_at(r, &opts, later()).unwrap();
    assert_eq!(names(&out), [".flip", "a.php"]);
    assert_eq!(out.stats.cache_hits, 1);
}

#[test]
fn missing_root_and_file_root() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("nope");
    let e = scan(&missing, &ScanOptions::default()).unwrap_err();
    assert!(matches!(e, ScanError::Missing { .. }));
    assert_eq!(
        e.to_string(),
        format!("source directory {} does not exist", missing.display())
    );
    let f = write(t.path(), "file", b"1");
    let e = scan(&f, &ScanOptions::default()).unwrap_err();
    assert!(matches!(e, ScanError::NotADir { .. }));
    assert!(e.to_string().contains(&*f.to_string_lossy()));
}

#[test]
fn unreadable_file_error_names_path_and_cause() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        eprintln!("skipped: root can read anything");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let p = write(t.path(), "secret.php", b"1");
    chmod(&p, 0o000);
    let e = scan(t.path(), &ScanOptions::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "cannot read {}: Permission denied (os error 13)",
            p.display()
        )
    );
}

#[test]
fn big_file_is_hashed_in_pieces_correctly() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("big.bin");
    let size = BIG_FILE + 12_345;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::File::create(&p).unwrap();
        f.set_len(size).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(size / 2)).unwrap();
        f.write_all(b"middle").unwrap();
        f.seek(SeekFrom::Start(size - 4)).unwrap();
        f.write_all(b"tail").unwrap();
    }
    let bytes = fs::read(&p).unwrap();
    let want = Digest::from(blake3::hash(&bytes));
    assert_eq!(hash_file(&p).unwrap(), (size, want));
    let out = scan(t.path(), &ScanOptions::default()).unwrap();
    assert_eq!(
        out.manifest.get(&RelPath::new("big.bin").unwrap()),
        Some(&EntryKind::File {
            mode: 0o644,
            size,
            digest: want
        })
    );
    // Small-file path agrees with the plain hash too.
    let s = write(t.path(), "small", b"hello");
    assert_eq!(hash_file(&s).unwrap(), (5, Digest::of(b"hello")));
}

#[test]
fn fifo_is_skipped_with_a_warning() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), "a.php", b"1");
    fs::create_dir(t.path().join("run")).unwrap();
    let fifo = t.path().join("run/pipe");
    mkfifo(&fifo);
    let out = scan(t.path(), &ScanOptions::default()).unwrap();
    assert_eq!(names(&out), ["a.php", "run"]);
    assert_eq!(out.warnings.len(), 1);
    assert!(
        out.warnings[0].contains(&*fifo.to_string_lossy()) && out.warnings[0].contains("FIFO"),
        "{:?}",
        out.warnings
    );
    // hash_file refuses it instead of blocking on open.
    let e = hash_file(&fifo).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn non_utf8_names_and_targets_are_errors_naming_the_path() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path().join("a");
    fs::create_dir_all(r.join("sub")).unwrap();
    fs::write(r.join("sub").join(OsStr::from_bytes(b"caf\xe9.php")), b"1").unwrap();
    let e = scan(&r, &ScanOptions::default()).unwrap_err();
    assert!(matches!(e, ScanError::NotUtf8 { .. }));
    // The byte that is not UTF-8 is shown as `\xNN`, so the message names the file.
    assert!(e.to_string().contains("sub/caf\\xe9.php"), "{e}");
    // Unless a pattern excludes it.
    let opts = ScanOptions {
        excludes: vec!["*.php".into()],
        ..Default::default()
    };
    assert_eq!(names(&scan(&r, &opts).unwrap()), ["sub"]);

    let t = tempfile::tempdir().unwrap();
    symlink(OsStr::from_bytes(b"\xff"), t.path().join("link")).unwrap();
    let e = scan(t.path(), &ScanOptions::default()).unwrap_err();
    assert!(matches!(e, ScanError::LinkNotUtf8 { .. }));
    assert!(e.to_string().contains("link"), "{e}");
}

#[test]
fn many_files_in_parallel() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    for d in 0..40 {
        for f in 0..50 {
            write(
                r,
                &format!("d{d}/s{}/f{f}.php", f % 5),
                format!("{d}/{f}").as_bytes(),
            );
        }
    }
    let out = scan(r, &ScanOptions::default()).unwrap();
    assert_eq!(out.stats.files, 2000);
    assert_eq!(out.stats.dirs, 40 + 40 * 5);
    assert_eq!(out.manifest.len(), 2240);
    assert_eq!(
        out.manifest.get(&RelPath::new("d17/s3/f8.php").unwrap()),
        Some(&file(0o644, b"17/8"))
    );
    // Deterministic regardless of scheduling.
    assert_eq!(
        scan(r, &ScanOptions::default()).unwrap().manifest.digest(),
        out.manifest.digest()
    );
}

/// `cargo test -p flip-scan --release -- --ignored --nocapture bench_100k`
#[test]
#[ignore]
fn bench_100k() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path().join("src");
    for i in 0..100_000 {
        write(
            &r,
            &format!("d{}/e{}/f{i}.php", i % 100, (i / 100) % 10),
            &vec![b'x'; 1000 + i % 5000],
        );
    }
    let opts = ScanOptions {
        hash_cache: Some(t.path().join("cache")),
        ..Default::default()
    };
    for round in 0..3 {
        let start = std::time::Instant::now();
        let out = scan_at(&r, &opts, later()).unwrap();
        eprintln!(
            "round {round}: {:?} files={} hashed={} hits={}",
            start.elapsed(),
            out.stats.files,
            out.stats.hashed_files,
            out.stats.cache_hits
        );
    }
}

/// The meter a progress line reads counts every regular file once, with its size, whether it
/// was hashed or found in the hash cache.
#[test]
fn the_scan_meter_counts_each_file_and_its_bytes() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path().join("src");
    write(&r, "a.txt", b"12345");
    write(&r, "d/b.bin", &[7u8; 10_000]);
    write(&r, "d/e/empty", b"");
    symlink("a.txt", r.join("link")).unwrap();
    let cache = t.path().join("hashes");
    for round in 0..2 {
        let opts = ScanOptions {
            hash_cache: Some(cache.clone()),
            ..Default::default()
        };
        let out = scan_at(&r, &opts, later()).unwrap();
        assert_eq!(opts.meter.files(), 3, "round {round}");
        assert_eq!(opts.meter.bytes(), 10_005, "round {round}");
        assert_eq!(out.stats.files, 3);
    }
}

/// A file handed on: path, mode, digest, content.
type Handed = (RelPath, u32, Digest, Vec<u8>);

/// Collects what a streaming scan hands on.
#[derive(Default)]
struct Collect {
    walked: std::sync::Mutex<Option<(u64, u64)>>,
    files: std::sync::Mutex<Vec<Handed>>,
    /// Big files: path, content so far, closed.
    pieces: std::sync::Mutex<Vec<(RelPath, Vec<u8>, bool)>>,
}

impl ContentSink for Collect {
    fn walked(&self, files: u64, bytes: u64) {
        *self.walked.lock().unwrap() = Some((files, bytes));
    }
    fn file(&self, rel: &RelPath, mode: u32, _mtime: (i64, u32), digest: &Digest, data: Vec<u8>) {
        self.files
            .lock()
            .unwrap()
            .push((rel.clone(), mode, *digest, data));
    }
    fn piece(&self, rel: &RelPath, _: u32, _: (i64, u32), size: u64, data: Vec<u8>, last: bool) {
        let mut p = self.pieces.lock().unwrap();
        assert!(
            p.iter().all(|(r, _, done)| *done || r == rel),
            "pieces interleaved"
        );
        match p.last_mut() {
            Some((r, got, false)) if r == rel => got.extend_from_slice(&data),
            _ => p.push((rel.clone(), data, false)),
        }
        let f = p.last_mut().unwrap();
        assert!(f.1.len() as u64 <= size);
        f.2 = last;
    }
}

#[test]
fn a_sink_gets_a_big_file_in_order_after_the_others_exactly_as_hashed() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    let big: Vec<u8> = (0..(BIG_FILE as usize + 3_000_001))
        .map(|i| (i % 251) as u8)
        .collect();
    write(r, "a/big", &big);
    write(r, "b/small", b"small");
    let sink = Collect::default();
    let out = scan_with(r, &ScanOptions::default(), later(), Some(&sink)).unwrap();
    let pieces = sink.pieces.into_inner().unwrap();
    assert_eq!(pieces.len(), 1);
    let (rel, got, last) = &pieces[0];
    assert_eq!((rel.as_str(), *last), ("a/big", true));
    assert!(got == &big, "the pieces are the file, in order");
    assert_eq!(
        out.manifest.get(rel),
        Some(&EntryKind::File {
            mode: fs::metadata(r.join("a/big")).unwrap().permissions().mode() & 0o7777,
            size: big.len() as u64,
            digest: Digest::of(&big)
        })
    );
    assert_eq!(
        sink.files.into_inner().unwrap().len(),
        1,
        "the small file whole"
    );
}

#[test]
fn a_sink_gets_exactly_the_bytes_the_manifest_records_even_for_cached_files() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path().join("src");
    for i in 0..40 {
        write(&r, &format!("d{}/f{i}", i % 4), &vec![i as u8; i * 31]);
    }
    chmod(&r.join("d1/f1"), 0o4750);
    symlink("d0", r.join("link")).unwrap();
    let cache = t.path().join("hashes");
    let opts = ScanOptions {
        hash_cache: Some(cache),
        ..Default::default()
    };
    // A first scan fills the hash cache; the streaming one still reads (and hands on) every file.
    scan_at(&r, &opts, later()).unwrap();
    let sink = Collect::default();
    let out = scan_with(&r, &opts, later(), Some(&sink)).unwrap();
    let files = sink.files.into_inner().unwrap();
    assert_eq!(files.len(), out.manifest.file_count());
    let bytes: u64 = files.iter().map(|f| f.3.len() as u64).sum();
    assert_eq!(sink.walked.into_inner().unwrap(), Some((40, bytes)));
    for (rel, mode, digest, data) in files {
        assert_eq!(
            Digest::of(&data),
            digest,
            "{rel}: the bytes handed on are the ones hashed"
        );
        assert_eq!(
            out.manifest.get(&rel),
            Some(&EntryKind::File {
                mode,
                size: data.len() as u64,
                digest
            }),
            "{rel}: the manifest records what was handed on"
        );
    }
}
