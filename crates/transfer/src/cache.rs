//! The client's cache of manifests it has deployed, by digest. When the target's live release has
//! a manifest the client already knows, a deploy sends only the difference to it, so an unchanged
//! tree costs a few hundred bytes on the wire whatever its size. The cache is only an
//! optimisation: a missing or damaged entry just means the whole manifest is sent.

use flip_manifest::{Digest, Manifest, RelPath};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Entries kept; older ones are removed when a new one is stored.
const KEEP: usize = 32;

/// The manifest cache: one file per manifest, named by its digest, in one directory.
pub struct ManifestCache {
    dir: PathBuf,
}

impl ManifestCache {
    /// The cache in `dir` (created when the first manifest is stored).
    pub fn new(dir: PathBuf) -> Self {
        ManifestCache { dir }
    }

    /// Whether no manifest was ever kept here (a client that never deployed: a fresh CI runner).
    pub fn is_empty(&self) -> bool {
        fs::read_dir(&self.dir).map_or(true, |mut d| d.next().is_none())
    }

    /// The manifest whose digest is `want`, if cached and intact.
    pub fn get(&self, want: &Digest) -> Option<Manifest> {
        let want = *want;
        let bytes = fs::read(self.dir.join(want.to_hex())).ok()?;
        // The digest is of the canonical encoding: a damaged file cannot pass.
        if Digest::of(&bytes) != want {
            return None;
        }
        flip_manifest::decode(&bytes).ok()
    }

    /// Stores a manifest (atomically), then trims the cache. Errors are returned for the caller
    /// to report as a warning.
    ///
    /// # Errors
    /// What creating the directory or writing the file returns.
    pub fn put(&self, m: &Manifest) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let name = m.digest().to_hex();
        if let Ok(f) = fs::File::options().append(true).open(self.dir.join(&name)) {
            // Already there (a redeploy): only mark it recently used for the trim.
            return f.set_modified(std::time::SystemTime::now());
        }
        let bytes = flip_manifest::encode(m);
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
        assert_eq!(c.get(&m.digest()), Some(m.clone()));
        std::fs::write(dir.join(&hex), b"garbage").unwrap();
        assert_eq!(c.get(&m.digest()), None);
        assert_eq!(c.get(&Digest([0; 32])), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Files larger than this are not kept in the content cache.
pub const CONTENT_MAX_FILE: u64 = 8 << 20;

/// One index record: digest, offset and length in its pack.
const RECORD: usize = 32 + 8 + 4;

/// The client's content-addressed cache of file versions it deployed, by blake3. When a file
/// changes, its old version is usually here, and the client sends a zstd `--patch-from` frame
/// against it — far smaller than an rsync delta, and with no signature round trip.
///
/// Versions are appended to pack files, one pack (`<stamp>.pack` with its `<stamp>.idx`) per
/// deploy, so keeping 10,000 files costs two sequential writes rather than 10,000 file creations,
/// and concurrent deploys never share a file. When the packs exceed the bound, the oldest go
/// first. Only an optimisation: what is missing or damaged (every read is checked against its
/// digest) is simply not used.
pub struct ContentCache {
    dir: PathBuf,
    max_bytes: u64,
    /// What the packs hold, read on first use: a deploy that needs no old version (a no-op)
    /// never reads the indexes.
    index: Mutex<Option<Index>>,
    /// This process's pack and index, opened on the first new version.
    writer: Mutex<Option<PackWriter>>,
    /// Patches made in this process, by (old, new) digest: the targets of a deploy whose live
    /// releases hold the same old version share one patch.
    patches: Mutex<PatchMemo>,
    /// What each source file whose patch was made was when it was read, by path and digest
    /// ([`ContentCache::note_read`]); as many entries as the patch memo, about 100 bytes each.
    reads: Mutex<HashMap<(String, Digest), crate::content::Seen>>,
}

/// A made patch (or `None`: none could be made), computed by the first session that asks.
type PatchCell = std::sync::Arc<std::sync::OnceLock<Option<Vec<u8>>>>;

#[derive(Default)]
struct PatchMemo {
    made: HashMap<(Digest, Digest), PatchCell>,
    /// Bytes of patches kept; none is added beyond `cap`.
    bytes: u64,
    /// [`PATCH_MEMO_BYTES`] (less in tests).
    cap: u64,
}

/// Bytes of patches kept for sharing between the targets of one deploy at most.
const PATCH_MEMO_BYTES: u64 = 64 << 20;

/// Where each cached version is.
#[derive(Default)]
struct Index {
    /// Pack stamps; the positions below refer to them.
    stamps: Vec<String>,
    /// What the packs on disk held when loaded, sorted by digest: (digest, pack, length,
    /// offset), 48 bytes per version (100,000 versions ≈ 5 MB).
    loaded: Vec<(Digest, u32, u32, u64)>,
    /// Versions this process added: digest → (pack, length, offset).
    added: HashMap<Digest, (u32, u32, u64)>,
    /// Each pack opened for reading, by position in `stamps`, once it is first read: a vendor
    /// upgrade reads thousands of old versions from one pack.
    open: Vec<Option<std::sync::Arc<fs::File>>>,
}

impl Index {
    fn load(dir: &Path) -> Index {
        let mut index = Index::default();
        for (stamp, pack_len) in packs(dir) {
            let Ok(idx) = fs::read(dir.join(format!("{stamp}.idx"))) else {
                continue;
            };
            let pack = index.stamps.len() as u32;
            index.stamps.push(stamp);
            index.loaded.reserve_exact(idx.len() / RECORD);
            for r in idx.chunks_exact(RECORD) {
                let mut d = [0u8; 32];
                d.copy_from_slice(&r[..32]);
                let off = u64::from_le_bytes(r[32..40].try_into().unwrap());
                let len = u32::from_le_bytes(r[40..44].try_into().unwrap());
                // A process ended without `finish` (Ctrl-C) can leave an index naming bytes
                // its pack never got: such a version is not kept (else it would never be
                // stored again, and the next deploy would plan patches it cannot make).
                if off
                    .checked_add(u64::from(len))
                    .is_none_or(|end| end > pack_len)
                {
                    continue;
                }
                index.loaded.push((Digest(d), pack, len, off));
            }
        }
        // Any copy will do: every read is checked against the digest.
        index.loaded.sort_unstable_by_key(|r| r.0);
        index.loaded.dedup_by_key(|r| r.0);
        index
    }

    fn find(&self, d: &Digest) -> Option<(u32, u32, u64)> {
        if let Some(at) = self.added.get(d) {
            return Some(*at);
        }
        let i = self.loaded.partition_point(|r| r.0 < *d);
        match self.loaded.get(i) {
            Some(&(x, pack, len, off)) if x == *d => Some((pack, len, off)),
            _ => None,
        }
    }
}

struct PackWriter {
    /// Position of this pack's stamp in [`Index::stamps`].
    pack: u32,
    data: std::io::BufWriter<fs::File>,
    idx: std::io::BufWriter<fs::File>,
    len: u64,
}

impl ContentCache {
    /// The cache in `dir`; nothing is read until it is used.
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        ContentCache {
            dir,
            max_bytes,
            index: Mutex::new(None),
            writer: Mutex::new(None),
            patches: Mutex::new(PatchMemo {
                cap: PATCH_MEMO_BYTES,
                ..PatchMemo::default()
            }),
            reads: Mutex::new(HashMap::new()),
        }
    }

    /// The patch from the kept version `old` to the content `new`, made by `make` from the old
    /// version once per process: each target whose live release holds `old` gets the same
    /// bytes (a session asking while another makes it waits for it). `None` when `old` is not
    /// kept or `make` finds no patch. Past 64 MiB of patches kept, each is made anew.
    pub fn patch(
        &self,
        old: &Digest,
        new: &Digest,
        make: impl FnOnce(&[u8]) -> Option<Vec<u8>>,
    ) -> Option<Vec<u8>> {
        let cell = {
            let mut memo = self.patches.lock().unwrap_or_else(|e| e.into_inner());
            match memo.made.get(&(*old, *new)) {
                Some(c) => Some(c.clone()),
                None if memo.bytes < memo.cap => {
                    let c = PatchCell::default();
                    memo.made.insert((*old, *new), c.clone());
                    Some(c)
                }
                None => None,
            }
        };
        let Some(cell) = cell else {
            return make(&self.get(old)?);
        };
        let mut made_here = false;
        let p = cell.get_or_init(|| {
            made_here = true;
            make(&self.get(old)?)
        });
        if made_here {
            let n = p.as_ref().map_or(0, |p| p.len() as u64);
            self.patches.lock().unwrap_or_else(|e| e.into_inner()).bytes += n;
        }
        p.clone()
    }

    /// The patch from the kept version `old` to the content `new` if this process made one
    /// already ([`ContentCache::patch`], the patches made ahead or another target's session),
    /// without making one or waiting for one being made. `None` also when none could be made.
    pub(crate) fn made_patch(&self, old: &Digest, new: &Digest) -> Option<Vec<u8>> {
        let memo = self.patches.lock().unwrap_or_else(|e| e.into_inner());
        memo.made.get(&(*old, *new))?.get()?.clone()
    }

    /// Records that the source file `path`, read as `seen`, held content `digest` (checked
    /// against it) when its patch was made: while it is still exactly that, the send need not
    /// read it again ([`ContentCache::read_seen`]).
    pub(crate) fn note_read(&self, path: &RelPath, digest: &Digest, seen: crate::content::Seen) {
        let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
        reads.insert((path.to_string(), *digest), seen);
    }

    /// What the source file `path` was when it was read holding `digest` (see
    /// [`ContentCache::note_read`]).
    pub(crate) fn read_seen(
        &self,
        path: &RelPath,
        digest: &Digest,
    ) -> Option<crate::content::Seen> {
        let reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
        reads.get(&(path.to_string(), *digest)).copied()
    }

    /// Whether [`ContentCache::patch`] still keeps what it makes (below 64 MiB of patches):
    /// past that, a patch made before it is asked for is thrown away.
    pub(crate) fn patch_memo_has_room(&self) -> bool {
        let memo = self.patches.lock().unwrap_or_else(|e| e.into_inner());
        memo.bytes < memo.cap
    }

    /// Sets the patch memo's bound to `bytes` (tests).
    #[cfg(test)]
    pub(crate) fn set_patch_memo_cap(&self, bytes: u64) {
        self.patches.lock().unwrap().cap = bytes;
    }

    /// Runs `f` on the index, loading it first if needed.
    fn with_index<T>(&self, f: impl FnOnce(&mut Index) -> T) -> T {
        let mut guard = self.index.lock().unwrap();
        f(guard.get_or_insert_with(|| Index::load(&self.dir)))
    }

    /// Whether content with digest `d` is kept.
    pub fn contains(&self, d: &Digest) -> bool {
        self.with_index(|i| i.find(d).is_some())
    }

    /// The content with digest `d`, read back and checked.
    pub fn get(&self, d: &Digest) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let (pack, len, off, f) = self.with_index(|i| {
            let (pack, len, off) = i.find(d)?;
            let at = pack as usize;
            if i.open.len() <= at {
                i.open.resize(at + 1, None);
            }
            if i.open[at].is_none() {
                let path = self.dir.join(format!("{}.pack", i.stamps[at]));
                i.open[at] = Some(std::sync::Arc::new(fs::File::open(path).ok()?));
            }
            Some((pack, len, off, i.open[at].clone()?))
        })?;
        if let Some(w) = self.writer.lock().unwrap().as_mut() {
            if w.pack == pack {
                w.data.flush().ok()?;
            }
        }
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, off).ok()?;
        (Digest::of(&buf) == *d).then_some(buf)
    }

    /// Keeps `bytes` (whose digest the caller has checked to be `d`) unless already there.
    /// Files above [`CONTENT_MAX_FILE`] are not kept.
    ///
    /// # Errors
    /// What writing this process's pack returns.
    pub fn put(&self, d: &Digest, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.len() as u64 > CONTENT_MAX_FILE || self.contains(d) {
            return Ok(());
        }
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none() {
            fs::create_dir_all(&self.dir)?;
            let stamp = format!(
                "{:020}-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|t| t.as_nanos())
                    .unwrap_or(0),
                std::process::id()
            );
            let open = |ext: &str| {
                fs::OpenOptions::new()
                    .create_new(true)
                    .append(true)
                    .open(self.dir.join(format!("{stamp}.{ext}")))
            };
            let data = std::io::BufWriter::with_capacity(1 << 20, open("pack")?);
            let idx = std::io::BufWriter::new(open("idx")?);
            let pack = self.with_index(|i| {
                i.stamps.push(stamp);
                i.stamps.len() as u32 - 1
            });
            *w = Some(PackWriter {
                pack,
                data,
                idx,
                len: 0,
            });
        }
        let w = w.as_mut().expect("opened above");
        w.data.write_all(bytes)?;
        let mut rec = [0u8; RECORD];
        rec[..32].copy_from_slice(&d.0);
        rec[32..40].copy_from_slice(&w.len.to_le_bytes());
        rec[40..44].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
        w.idx.write_all(&rec)?;
        let (pack, len, off) = (w.pack, bytes.len() as u32, w.len);
        self.with_index(|i| i.added.insert(*d, (pack, len, off)));
        w.len += bytes.len() as u64;
        Ok(())
    }

    /// Writes out this process's pack, then removes the oldest packs until the cache fits its
    /// bound.
    ///
    /// # Errors
    /// What writing the pack and its index returns.
    pub fn finish(&self) -> std::io::Result<()> {
        if let Some(mut w) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // The pack before its index: an index never names bytes that are not there.
            w.data.flush()?;
            w.idx.flush()?;
        }
        let all = packs(&self.dir);
        let mut total: u64 = all.iter().map(|(_, len)| len).sum();
        for (stamp, len) in all {
            if total <= self.max_bytes {
                break;
            }
            let _ = fs::remove_file(self.dir.join(format!("{stamp}.idx")));
            let _ = fs::remove_file(self.dir.join(format!("{stamp}.pack")));
            total -= len;
        }
        Ok(())
    }
}

/// (stamp, size) of every pack in `dir`, oldest first.
fn packs(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stamp = name.strip_suffix(".pack")?.to_string();
            Some((stamp, e.metadata().ok()?.len()))
        })
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod content_tests {
    use super::*;

    #[test]
    fn stores_checks_and_trims() {
        let dir = std::env::temp_dir().join(format!("flip-ccache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut digests = Vec::new();
        for i in 0..3u8 {
            // One deploy (process) per pack.
            let c = ContentCache::new(dir.clone(), 150);
            let data = vec![i; 60];
            let d = Digest::of(&data);
            c.put(&d, &data).unwrap();
            c.put(&d, &data).unwrap();
            assert_eq!(c.get(&d).unwrap(), data, "readable before finish");
            c.finish().unwrap();
            digests.push(d);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let c = ContentCache::new(dir.clone(), 150);
        assert!(!c.contains(&digests[0]), "oldest pack evicted");
        assert_eq!(c.get(&digests[1]).unwrap(), vec![1u8; 60]);
        assert_eq!(c.get(&digests[2]).unwrap(), vec![2u8; 60]);
        // Damage is detected.
        for (stamp, _) in packs(&dir) {
            fs::write(dir.join(format!("{stamp}.pack")), vec![9u8; 60]).unwrap();
        }
        assert_eq!(c.get(&digests[2]), None);
        fs::remove_dir_all(dir).unwrap();
    }

    /// A deploy killed before `finish` (Ctrl-C while the patches are made ahead, during the
    /// SSH login) leaves its index flushed past its pack: the versions whose bytes are missing
    /// are not taken as kept, so the next deploy stores them again and can patch against them.
    #[test]
    fn an_index_naming_bytes_its_pack_lacks_keeps_nothing_of_them() {
        let dir = std::env::temp_dir().join(format!("flip-ckill-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let c = ContentCache::new(dir.clone(), 1 << 30);
        let versions: Vec<Vec<u8>> = (0..400u32)
            .map(|i| format!("<?php return {i};\n").repeat(20).into_bytes())
            .collect();
        for v in &versions {
            c.put(&Digest::of(v), v).unwrap();
        }
        // Killed: nothing is flushed or dropped.
        #[allow(
            clippy::mem_forget,
            reason = "what a killed process leaves is the point"
        )]
        std::mem::forget(c);
        let (stamp, _) = packs(&dir).pop().unwrap();
        assert!(
            fs::metadata(dir.join(format!("{stamp}.idx")))
                .unwrap()
                .len()
                > 0
        );
        let c = ContentCache::new(dir.clone(), 1 << 30);
        for v in &versions {
            let d = Digest::of(v);
            assert_eq!(c.contains(&d), c.get(&d).is_some(), "kept but unreadable");
            c.put(&d, v).unwrap();
        }
        c.finish().unwrap();
        let c = ContentCache::new(dir.clone(), 1 << 30);
        for v in &versions {
            assert_eq!(c.get(&Digest::of(v)).as_deref(), Some(&v[..]));
        }
        fs::remove_dir_all(dir).unwrap();
    }

    /// Ten sessions (the targets of one deploy) asking at once for the patch from the same old
    /// version get one patch, made once from the cached old version; an old version not kept
    /// gets none.
    #[test]
    fn one_patch_is_made_for_every_target_with_the_same_old_version() {
        let dir = std::env::temp_dir().join(format!("flip-pmemo-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let c = ContentCache::new(dir.clone(), 1 << 20);
        let old = b"the old version".to_vec();
        let old_d = Digest::of(&old);
        c.put(&old_d, &old).unwrap();
        let new_d = Digest::of(b"the new version");
        let made = std::sync::atomic::AtomicUsize::new(0);
        let got: Vec<Option<Vec<u8>>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..10)
                .map(|_| {
                    s.spawn(|| {
                        c.patch(&old_d, &new_d, |o| {
                            made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(20));
                            Some([o, b"+patch"].concat())
                        })
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(got
            .iter()
            .all(|p| p.as_deref() == Some(&b"the old version+patch"[..])));
        let missing = Digest::of(b"never kept");
        assert_eq!(c.patch(&missing, &new_d, |_| Some(vec![1])), None);
        fs::remove_dir_all(dir).unwrap();
    }
}
