//! Patches made ahead: while the SSH login of a deploy is still under way (on a real network,
//! several round trips during which the client's cores wait), the client makes the patches it
//! will most likely send, so that once the agent says what it needs, they are ready.
//!
//! The guess is the release this client last made live on the target (its manifest, from the
//! local cache): each small file whose path holds another version there, kept in the content
//! cache, and which the deploy would send as a patch ([`crate::send_policy`]). What is made goes
//! into the content cache's patch memo ([`ContentCache::patch`]), keyed by the old and new
//! digests, where the deploy's own encoding finds it; a wrong guess (another release live, a
//! damaged basis the agent does not offer) costs only the work. Nothing is sent, and nothing
//! the deploy sends depends on whether a patch was made here or later: the same bytes either
//! way.

use crate::content::{self, Job};
use crate::ContentCache;
use flip_manifest::{Digest, Manifest, RelPath};
use flip_plan::report::Via;
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Makes the patches a deploy of `manifest` (scanned from `source`) will most likely send to a
/// target whose live release is `live`, into `cache`'s patch memo, and keeps the new versions
/// in `cache` as the deploy would (the next deploy's bases). Each new file is read and checked
/// against its scanned digest first; one that changed since the scan, or cannot be read, is
/// skipped (the deploy itself then reports it). Works on rayon's pool, one file per worker at a
/// time (each at most the deploy's small-file size, 4 MiB); stops taking new files once `stop`
/// says so, or once the patch memo is full (a patch made then would be thrown away and made
/// again by the deploy). Returns the number of patches made here and kept in the memo.
///
/// A file whose new content is anywhere in `live` is skipped: the agent links it rather than
/// asking for it.
pub fn patch_ahead(
    source: &Path,
    manifest: &Manifest,
    live: &Manifest,
    cache: &ContentCache,
    stop: &(dyn Fn() -> bool + Sync),
) -> usize {
    let old: HashMap<&RelPath, (u64, &Digest)> = live
        .files()
        .map(|(path, _, size, digest)| (path, (size, digest)))
        .collect();
    let present: HashSet<&Digest> = old.values().map(|(_, d)| *d).collect();
    let jobs: Vec<(Job, &Digest)> = manifest
        .files()
        .filter(|(_, _, size, digest)| *size <= content::LARGE && !present.contains(digest))
        .filter_map(|(path, _, size, digest)| {
            let &(old_size, old_digest) = old.get(path)?;
            let via = crate::send_policy(size, Some(old_size), cache.contains(old_digest), false);
            let job = Job {
                index: 0,
                path,
                size,
                digest,
                basis: None,
                patch: None,
            };
            (via == Via::Patch).then_some((job, old_digest))
        })
        .collect();
    let made = AtomicUsize::new(0);
    jobs.par_iter().for_each(|(job, old)| {
        if stop() || !cache.patch_memo_has_room() {
            return;
        }
        let Ok((data, seen)) = content::read_small(source, job) else {
            return;
        };
        content::remember(Some(cache), job.digest, &data);
        if cache
            .patch(old, job.digest, |o| content::patch(o, &data))
            .is_some()
        {
            if let Some(seen) = seen {
                cache.note_read(job.path, job.digest, seen);
            }
            made.fetch_add(1, Ordering::Relaxed);
        }
    });
    made.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use tempfile::TempDir;

    fn scan(dir: &Path) -> Manifest {
        flip_scan::scan(dir, &flip_scan::ScanOptions::default())
            .unwrap()
            .manifest
    }

    /// An old and a new tree (empty) and a content cache (in a directory of its own).
    fn trees() -> (TempDir, TempDir, TempDir, ContentCache) {
        let dir = || tempfile::tempdir().unwrap();
        let (old, new, cache_dir) = (dir(), dir(), dir());
        let cache = ContentCache::new(cache_dir.path().to_path_buf(), 1 << 30);
        (old, new, cache_dir, cache)
    }

    fn php(seed: &str, lines: usize) -> Vec<u8> {
        (0..lines)
            .map(|i| format!("    public function {seed}{i}(): int {{ return {i}; }}\n"))
            .collect::<String>()
            .into_bytes()
    }

    /// The patches of the files changed in place are in the memo once `patch_ahead` returns
    /// (the deploy's own encoding then makes none), and the new versions are kept; a file new in
    /// this release, one whose content the live release holds elsewhere (linked, not sent), one
    /// whose old version is not kept and one changed since the scan get none.
    #[test]
    fn makes_the_patches_a_deploy_of_the_expected_release_sends() {
        let (old, new, _cache_dir, cache) = trees();
        let w = |root: &Path, name: &str, data: &[u8]| {
            let p = root.join(name);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, data).unwrap();
        };
        for (name, seed) in [
            ("src/a.php", "a"),
            ("src/b.php", "b"),
            ("src/c.php", "c"),
            ("src/d.php", "d"),
            ("src/e.php", "e"),
            ("src/same.php", "s"),
        ] {
            w(old.path(), name, &php(seed, 200));
        }
        for (name, data) in [
            ("src/a.php", [php("a", 200), php("x", 3)].concat()),
            ("src/b.php", [php("y", 2), php("b", 199)].concat()),
            // c.php now holds what e.php held: the agent links it.
            ("src/c.php", php("e", 200)),
            ("src/d.php", [php("d", 200), php("z", 1)].concat()),
            ("src/e.php", [php("e", 100), php("w", 1)].concat()),
            ("src/same.php", php("s", 200)),
        ] {
            w(new.path(), name, &data);
        }
        w(new.path(), "src/added.php", &php("n", 50));
        let (live, manifest) = (scan(old.path()), scan(new.path()));
        let digest = |m: &Manifest, p: &str| *m.files().find(|f| f.0.as_str() == p).unwrap().3;
        // Every old version is kept but d.php's.
        for p in [
            "src/a.php",
            "src/b.php",
            "src/c.php",
            "src/e.php",
            "src/same.php",
        ] {
            cache
                .put(&digest(&live, p), &fs::read(old.path().join(p)).unwrap())
                .unwrap();
        }
        // e.php changes after the scan.
        w(new.path(), "src/e.php", &php("changed", 100));

        let made = patch_ahead(new.path(), &manifest, &live, &cache, &|| false);

        assert_eq!(made, 2, "a.php and b.php");
        for p in ["src/a.php", "src/b.php"] {
            let (o, n) = (digest(&live, p), digest(&manifest, p));
            let got = cache.patch(&o, &n, |_| panic!("{p}: made again"));
            assert_eq!(
                got,
                content::patch(
                    &fs::read(old.path().join(p)).unwrap(),
                    &fs::read(new.path().join(p)).unwrap()
                ),
                "{p}"
            );
            assert!(cache.contains(&n), "{p}: the new version is kept");
        }
        for p in ["src/c.php", "src/d.php", "src/e.php"] {
            let (o, n) = (digest(&live, p), digest(&manifest, p));
            assert!(!cache.contains(&n) || p == "src/c.php", "{p}: nothing kept");
            let mut asked = false;
            cache.patch(&o, &n, |_| {
                asked = true;
                None
            });
            assert!(asked || p == "src/d.php", "{p}: no patch made ahead");
        }
    }

    /// Once the patch memo is full it makes no more patches (they would be thrown away, and
    /// the deploy would make them again) and reads no more files.
    #[test]
    fn makes_no_patch_once_the_memo_is_full() {
        let (old, new, _cache_dir, cache) = trees();
        for i in 0..3 {
            let name = format!("f{i}.php");
            fs::write(old.path().join(&name), php(&name, 100)).unwrap();
            fs::write(
                new.path().join(&name),
                [php(&name, 100), php("x", 1)].concat(),
            )
            .unwrap();
        }
        let (live, manifest) = (scan(old.path()), scan(new.path()));
        for (name, _, _, d) in live.files() {
            cache
                .put(d, &fs::read(old.path().join(name.as_str())).unwrap())
                .unwrap();
        }
        // The first patch fills it.
        cache.set_patch_memo_cap(1);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let made = one.install(|| patch_ahead(new.path(), &manifest, &live, &cache, &|| false));
        assert_eq!(made, 1);
        let kept = manifest.files().filter(|f| cache.contains(f.3)).count();
        assert_eq!(kept, 1, "the new versions read");
    }

    /// Told to stop, it reads no file and makes no patch.
    #[test]
    fn makes_nothing_once_told_to_stop() {
        let (old, new, _cache_dir, cache) = trees();
        fs::write(old.path().join("a.php"), php("a", 100)).unwrap();
        fs::write(
            new.path().join("a.php"),
            [php("a", 100), php("b", 1)].concat(),
        )
        .unwrap();
        let (live, manifest) = (scan(old.path()), scan(new.path()));
        let (o, n) = (
            *live.files().next().unwrap().3,
            *manifest.files().next().unwrap().3,
        );
        cache.put(&o, &php("a", 100)).unwrap();
        assert_eq!(
            patch_ahead(new.path(), &manifest, &live, &cache, &|| true),
            0
        );
        assert!(!cache.contains(&n));
        assert_eq!(
            patch_ahead(new.path(), &manifest, &live, &cache, &|| false),
            1
        );
    }
}
