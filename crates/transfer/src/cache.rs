//! The client's cache of manifests it has deployed, by digest. When the target's live release has
//! a manifest the client already knows, a deploy sends only the difference to it, so an unchanged
//! tree costs a few hundred bytes on the wire whatever its size. The cache is only an
//! optimisation: a missing or damaged entry just means the whole manifest is sent.

use flip_manifest::{Digest, Manifest};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Entries kept; older ones are removed when a new one is stored.
const KEEP: usize = 32;

pub struct ManifestCache {
    dir: PathBuf,
}

impl ManifestCache {
    pub fn new(dir: PathBuf) -> Self {
        ManifestCache { dir }
    }

    /// The manifest whose digest is `hex`, if cached and intact.
    pub fn get(&self, hex: &str) -> Option<Manifest> {
        let want = Digest::from_hex(hex)?;
        let bytes = fs::read(self.dir.join(want.to_hex())).ok()?;
        // The digest is of the canonical encoding: a damaged file cannot pass.
        if Digest::of(&bytes) != want {
            return None;
        }
        flip_manifest::decode(&bytes).ok()
    }

    /// Stores a manifest (atomically), then trims the cache. Errors are returned for the caller
    /// to report as a warning.
    pub fn put(&self, m: &Manifest) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let bytes = flip_manifest::encode(m);
        let name = Digest::of(&bytes).to_hex();
        let tmp = self.dir.join(format!(".{name}.{}", std::process::id()));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        drop(f);
        fs::rename(&tmp, self.dir.join(&name))?;
        self.trim();
        Ok(())
    }

    fn trim(&self) {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = rd
            .flatten()
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if files.len() <= KEEP {
            return;
        }
        files.sort();
        for (_, p) in &files[..files.len() - KEEP] {
            let _ = fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flip_manifest::{Entry, EntryKind, RelPath};

    #[test]
    fn roundtrip_and_damage() {
        let dir = std::env::temp_dir().join(format!("flip-mcache-{}", std::process::id()));
        let c = ManifestCache::new(dir.clone());
        let m = Manifest::new(vec![Entry {
            path: RelPath::new("a").unwrap(),
            kind: EntryKind::Dir { mode: 0o755 },
        }])
        .unwrap();
        c.put(&m).unwrap();
        let hex = m.digest().to_hex();
        assert_eq!(c.get(&hex), Some(m.clone()));
        std::fs::write(dir.join(&hex), b"garbage").unwrap();
        assert_eq!(c.get(&hex), None);
        assert_eq!(c.get("not hex"), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Files larger than this are not kept in the content cache.
pub const CONTENT_MAX_FILE: u64 = 8 << 20;

/// The client's content-addressed cache of file versions it deployed, by blake3. When a file
/// changes, its old version is usually here, and the client sends a zstd `--patch-from` frame
/// against it — far smaller than an rsync delta, and with no signature round trip. Bounded in
/// total size; least recently used versions go first. Only an optimisation: what is missing or
/// damaged is simply not used.
pub struct ContentCache {
    dir: PathBuf,
    max_bytes: u64,
}

impl ContentCache {
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        ContentCache { dir, max_bytes }
    }

    fn path(&self, d: &Digest) -> PathBuf {
        let hex = d.to_hex();
        self.dir.join(&hex[..2]).join(&hex[2..])
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// The content with digest `d`, checked; marks it recently used.
    pub fn get(&self, d: &Digest) -> Option<Vec<u8>> {
        let p = self.path(d);
        let bytes = fs::read(&p).ok()?;
        if Digest::of(&bytes) != *d {
            let _ = fs::remove_file(&p);
            return None;
        }
        if let Ok(f) = fs::File::options().append(true).open(&p) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        Some(bytes)
    }

    /// Copies `src` (whose content must have digest `d`) into the cache unless it is there.
    pub fn put_file(&self, d: &Digest, src: &Path) -> std::io::Result<()> {
        let p = self.path(d);
        if p.is_file() {
            return Ok(());
        }
        fs::create_dir_all(p.parent().expect("two levels"))?;
        let bytes = fs::read(src)?;
        if Digest::of(&bytes) != *d {
            // Changed since it was scanned: not the deployed version.
            return Ok(());
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, &bytes)?;
        fs::rename(&tmp, &p)
    }

    /// Removes least recently used entries until the cache fits its bound.
    pub fn trim(&self) {
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
        let Ok(top) = fs::read_dir(&self.dir) else {
            return;
        };
        for sub in top.flatten() {
            let Ok(rd) = fs::read_dir(sub.path()) else {
                continue;
            };
            for e in rd.flatten() {
                if let Ok(m) = e.metadata() {
                    files.push((
                        m.modified().unwrap_or(std::time::UNIX_EPOCH),
                        m.len(),
                        e.path(),
                    ));
                }
            }
        }
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        if total <= self.max_bytes {
            return;
        }
        files.sort();
        for (_, len, p) in files {
            if total <= self.max_bytes {
                break;
            }
            if fs::remove_file(&p).is_ok() {
                total -= len;
            }
        }
    }
}

#[cfg(test)]
mod content_tests {
    use super::*;

    #[test]
    fn stores_checks_and_trims() {
        let dir = std::env::temp_dir().join(format!("flip-ccache-{}", std::process::id()));
        let src = dir.join("src");
        fs::create_dir_all(&src).unwrap();
        let c = ContentCache::new(dir.join("c"), 150);
        let mut digests = Vec::new();
        for i in 0..3u8 {
            let data = vec![i; 60];
            let f = src.join(i.to_string());
            fs::write(&f, &data).unwrap();
            let d = Digest::of(&data);
            c.put_file(&d, &f).unwrap();
            assert_eq!(c.get(&d).unwrap(), data);
            digests.push(d);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // A file whose content is not what the caller says is not stored.
        let wrong = Digest::of(b"other");
        c.put_file(&wrong, &src.join("0")).unwrap();
        assert!(!c.contains(&wrong));
        c.trim();
        assert!(!c.contains(&digests[0]), "oldest evicted");
        assert!(c.contains(&digests[1]) && c.contains(&digests[2]));
        // Damage is detected and the entry dropped.
        fs::write(c.path(&digests[2]), b"x").unwrap();
        assert_eq!(c.get(&digests[2]), None);
        fs::remove_dir_all(dir).unwrap();
    }
}
