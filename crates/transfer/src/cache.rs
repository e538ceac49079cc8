//! The client's cache of manifests it has deployed, by digest. When the target's live release has
//! a manifest the client already knows, a deploy sends only the difference to it, so an unchanged
//! tree costs a few hundred bytes on the wire whatever its size. The cache is only an
//! optimisation: a missing or damaged entry just means the whole manifest is sent.

use flip_manifest::{Digest, Manifest};
use std::fs;
use std::io::Write;
use std::path::PathBuf;

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
