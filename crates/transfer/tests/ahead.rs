//! Patches made ahead of a deploy (while its SSH login is under way) reach its send: a file
//! whose patch is made is read once, by the patches made ahead, and sent as that patch while it
//! is still what was read then. Against an agent served in this process.

mod common;

use common::session;
use flip_manifest::Manifest;
use flip_transfer::{ContentCache, DeployReport, TransferError};
use std::fs;
use std::path::Path;

/// A PHP-like source file of `lines` functions named after `seed`.
fn php(seed: &str, lines: usize) -> Vec<u8> {
    (0..lines)
        .map(|i| format!("    public function {seed}{i}(): int {{ return {i}; }}\n"))
        .collect::<String>()
        .into_bytes()
}

fn scan(source: &Path) -> Manifest {
    flip_scan::scan(source, &flip_scan::ScanOptions::default())
        .unwrap()
        .manifest
}

/// Deploys `manifest` (scanned from `source`) to `root` as the client of a deploy does, with
/// the content cache and, when there is one, the live release's manifest (`previous`).
fn deploy(
    source: &Path,
    root: &Path,
    manifest: &Manifest,
    previous: Option<&Manifest>,
    cache: &ContentCache,
) -> Result<DeployReport, TransferError> {
    let mut s = session(root);
    s.status()?;
    let live = previous.map(Manifest::digest);
    let report = s.stage(
        source,
        manifest,
        previous.cloned(),
        None,
        Some(cache),
        live,
        false,
    )?;
    s.activate(report.release)?;
    s.close()?;
    Ok(report)
}

/// A source, a target and a content cache in a temporary directory, with release 1 of
/// `a.php` and `b.php` deployed, then release 2's sources written (both files changed) and
/// their patches made ahead.
struct Ahead {
    _tmp: tempfile::TempDir,
    source: std::path::PathBuf,
    root: std::path::PathBuf,
    cache: ContentCache,
    v1: Manifest,
    v2: Manifest,
}

impl Ahead {
    fn new() -> Ahead {
        let tmp = tempfile::tempdir().unwrap();
        let (source, root) = (tmp.path().join("src"), tmp.path().join("target"));
        let cache = ContentCache::new(tmp.path().join("cache"), 1 << 30);
        fs::create_dir_all(&source).unwrap();
        fs::write(source.join("a.php"), php("a", 200)).unwrap();
        fs::write(source.join("b.php"), php("b", 200)).unwrap();
        let v1 = scan(&source);
        deploy(&source, &root, &v1, None, &cache).unwrap();
        fs::write(source.join("a.php"), [php("a", 200), php("x", 3)].concat()).unwrap();
        fs::write(source.join("b.php"), [php("y", 2), php("b", 199)].concat()).unwrap();
        let v2 = scan(&source);
        let made = flip_transfer::patch_ahead(&source, &v2, &v1, &cache, &|| false);
        assert_eq!(made, 2, "both changed files patched ahead");
        Ahead {
            _tmp: tmp,
            source,
            root,
            cache,
            v1,
            v2,
        }
    }

    /// Deploys release 2.
    fn deploy(&self) -> Result<DeployReport, TransferError> {
        deploy(
            &self.source,
            &self.root,
            &self.v2,
            Some(&self.v1),
            &self.cache,
        )
    }

    /// Whether release 1 is still the live one.
    fn release_1_live(&self) -> bool {
        fs::read_link(self.root.join("current")).unwrap() == Path::new("releases/1")
    }
}

/// Files whose patches were made ahead and that were left alone since are sent as those
/// patches, with the mtime they had when they were read (the send does not read them again:
/// measured, not tested here).
#[test]
fn files_patched_ahead_and_left_alone_are_sent_as_their_patches() {
    let fx = Ahead::new();

    let report = fx.deploy().unwrap();

    assert_eq!((report.release, report.patched), (2, 2), "{report:?}");
    let live = fx.root.join("current");
    for name in ["a.php", "b.php"] {
        let (sent, there) = (fx.source.join(name), live.join(name));
        assert_eq!(
            fs::read(&there).unwrap(),
            fs::read(&sent).unwrap(),
            "{name}"
        );
        let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
        assert_eq!(mtime(&there), mtime(&sent), "{name}");
    }
}

/// A file rewritten after its patch was made ahead, even to as many bytes, is not what was
/// read then (its ctime and mtime moved): the send reads it again, finds it changed since the
/// scan and fails the deploy naming it; release 1 stays live.
#[test]
fn a_file_rewritten_after_its_patch_was_made_ahead_fails_the_deploy() {
    let fx = Ahead::new();
    let mut other = fs::read(fx.source.join("a.php")).unwrap();
    other[20] = b'Z';
    fs::write(fx.source.join("a.php"), &other).unwrap();

    let err = fx.deploy().unwrap_err();

    assert!(
        matches!(&err, TransferError::SourceChanged(p) if p == "a.php"),
        "{err:?}"
    );
    assert!(fx.release_1_live());
}

/// A file patched ahead that has grown since is read again and found changed since the scan:
/// the deploy fails naming it, and release 1 stays live.
#[test]
fn a_file_patched_ahead_that_changed_size_since_fails_the_deploy() {
    let fx = Ahead::new();
    fs::write(fx.source.join("b.php"), php("grown", 300)).unwrap();

    let err = fx.deploy().unwrap_err();

    assert!(
        matches!(&err, TransferError::SourceChanged(p) if p == "b.php"),
        "{err:?}"
    );
    assert!(fx.release_1_live());
}
