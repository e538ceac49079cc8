//! The hash cache: digests of files seen by an earlier scan, reused while the file's
//! (path, size, mtime, ctime, inode, device) are unchanged.
//!
//! # File format (all integers little-endian)
//!
//! ```text
//! "FLIPHC01" body_len:u64 checksum:[u8; 32] body
//! body  = count:u64 entry*
//! entry = path_len:u16 path:[u8; path_len] size:u64 mtime_s:i64 mtime_ns:u32
//!         ctime_s:i64 ctime_ns:u32 ino:u64 dev:u64 digest:[u8; 32]
//! ```
//!
//! `checksum` is the blake3 of `body`. A file that is missing, has another magic, a wrong length,
//! a wrong checksum or anything else malformed is treated as an empty cache: the cache can only
//! save work, never change a result. It is rewritten atomically (temporary file in the same
//! directory, then `rename`), holding only the files seen by the latest scan.

use flip_manifest::{Digest, MAX_PATH_LEN};
use std::fs::{self, Metadata};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const MAGIC: &[u8; 8] = b"FLIPHC01";
const HEADER_LEN: usize = 8 + 8 + 32;
/// Bytes of an entry besides its path.
const ENTRY_FIXED: usize = 2 + 8 + 8 + 4 + 8 + 4 + 8 + 8 + 32;
/// A cache file larger than this is not read (100M files' worth of short paths).
const MAX_FILE_LEN: u64 = 16 << 30;

/// What must be unchanged for a cached digest to be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Key {
    pub size: u64,
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    pub ino: u64,
    pub dev: u64,
}

impl Key {
    pub(crate) fn of(meta: &Metadata) -> Key {
        Key {
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec() as u32),
            ctime: (meta.ctime(), meta.ctime_nsec() as u32),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }

    /// Racy-git rule: a file whose mtime or ctime is within `RACY_WINDOW_NS` of the scan start
    /// (or after it) could be modified again without its timestamps changing, so its digest
    /// must not be cached.
    pub(crate) fn is_racy(&self, scan_start_ns: i128) -> bool {
        let ns = |(s, n): (i64, u32)| s as i128 * 1_000_000_000 + n as i128;
        ns(self.mtime).max(ns(self.ctime)) + RACY_WINDOW_NS > scan_start_ns
    }
}

/// Two seconds: covers coarse file system timestamps and the kernel's coarse clock lagging
/// the wall clock.
pub(crate) const RACY_WINDOW_NS: i128 = 2_000_000_000;

/// Cached digests as one sorted list of (path hash, key hash, digest): 64 bytes per file, no
/// path strings. A wrong hit would need two paths with the same 128-bit blake3 prefix *and* a
/// key (size, timestamps, inode, device) with the same 128-bit blake3 prefix.
#[derive(Default)]
pub(crate) struct Cache {
    sorted: Vec<(u128, u128, Digest)>,
}

fn hash128(bytes: &[u8]) -> u128 {
    let h = blake3::hash(bytes);
    u128::from_le_bytes(h.as_bytes()[..16].try_into().expect("16 bytes"))
}

impl Key {
    fn hash128(&self) -> u128 {
        let mut b = [0u8; 48];
        b[..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..16].copy_from_slice(&self.mtime.0.to_le_bytes());
        b[16..20].copy_from_slice(&self.mtime.1.to_le_bytes());
        b[20..28].copy_from_slice(&self.ctime.0.to_le_bytes());
        b[28..32].copy_from_slice(&self.ctime.1.to_le_bytes());
        b[32..40].copy_from_slice(&self.ino.to_le_bytes());
        b[40..48].copy_from_slice(&self.dev.to_le_bytes());
        hash128(&b)
    }
}

impl Cache {
    /// Reads a cache file. A missing or invalid file gives an empty cache; an unreadable one
    /// (e.g. permission denied) gives an empty cache and a warning.
    pub(crate) fn load(path: &Path) -> (Cache, Option<String>) {
        // The warning names the cache's path; NotFound is an empty cache, told apart by kind.
        #[allow(clippy::disallowed_methods)]
        let bytes = match fs::metadata(path) {
            Ok(m) if m.len() > MAX_FILE_LEN => return (Cache::default(), None),
            Ok(_) => fs::read(path),
            Err(e) => Err(e),
        };
        match bytes {
            Ok(bytes) => (Cache::decode(&bytes).unwrap_or_default(), None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Cache::default(), None),
            Err(e) => (
                Cache::default(),
                Some(format!(
                    "ignoring hash cache {}: cannot read it: {e}",
                    path.display()
                )),
            ),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.sorted.len()
    }

    /// The cached digest of `path` if its key is unchanged.
    pub(crate) fn get(&self, path: &str, key: &Key) -> Option<Digest> {
        let p = hash128(path.as_bytes());
        let i = self.sorted.partition_point(|(x, ..)| *x < p);
        match self.sorted.get(i) {
            Some((x, k, d)) if *x == p && *k == key.hash128() => Some(*d),
            _ => None,
        }
    }

    fn decode(buf: &[u8]) -> Option<Cache> {
        let header = buf.get(..HEADER_LEN)?;
        if &header[..8] != MAGIC {
            return None;
        }
        let body_len = u64::from_le_bytes(header[8..16].try_into().ok()?);
        let body = &buf[HEADER_LEN..];
        if body.len() as u64 != body_len || blake3::hash(body).as_bytes() != &header[16..48] {
            return None;
        }
        let mut r = Reader(body);
        let count = r.u64()?;
        if count > (body.len() / ENTRY_FIXED) as u64 {
            return None;
        }
        let mut sorted = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let len = u16::from_le_bytes(r.take(2)?.try_into().ok()?) as usize;
            if len > MAX_PATH_LEN {
                return None;
            }
            let path = hash128(std::str::from_utf8(r.take(len)?).ok()?.as_bytes());
            let key = Key {
                size: r.u64()?,
                mtime: (r.u64()? as i64, r.u32()?),
                ctime: (r.u64()? as i64, r.u32()?),
                ino: r.u64()?,
                dev: r.u64()?,
            };
            let digest = Digest(r.take(32)?.try_into().ok()?);
            sorted.push((path, key.hash128(), digest));
        }
        if !r.0.is_empty() {
            return None;
        }
        sorted.sort_unstable_by_key(|(p, ..)| *p);
        // Each path once (a file written by flip always has that); else trust none of them.
        if sorted.windows(2).any(|w| w[0].0 == w[1].0) {
            return None;
        }
        Some(Cache { sorted })
    }
}

/// Writes the cache format to `out`: a header with a zeroed checksum and length, then the body
/// (`count` entries); returns the header to put in place of the zeroed one. The body is never
/// whole in memory.
fn write<'a>(
    out: &mut impl Write,
    count: usize,
    entries: impl Iterator<Item = (&'a str, Key, Digest)>,
) -> io::Result<[u8; HEADER_LEN]> {
    struct Body<'w, W> {
        out: &'w mut W,
        hasher: blake3::Hasher,
        len: u64,
    }
    impl<W: Write> Body<'_, W> {
        fn put(&mut self, b: &[u8]) -> io::Result<()> {
            self.hasher.update(b);
            self.len += b.len() as u64;
            self.out.write_all(b)
        }
    }
    out.write_all(&[0; HEADER_LEN])?;
    let mut body = Body {
        out,
        hasher: blake3::Hasher::new(),
        len: 0,
    };
    body.put(&(count as u64).to_le_bytes())?;
    let mut n = 0;
    let mut e = Vec::with_capacity(ENTRY_FIXED + 256);
    for (path, key, digest) in entries {
        n += 1;
        e.clear();
        // Paths come from `RelPath`, which caps them at MAX_PATH_LEN (< u16::MAX).
        e.extend_from_slice(&(path.len() as u16).to_le_bytes());
        e.extend_from_slice(path.as_bytes());
        e.extend_from_slice(&key.size.to_le_bytes());
        e.extend_from_slice(&key.mtime.0.to_le_bytes());
        e.extend_from_slice(&key.mtime.1.to_le_bytes());
        e.extend_from_slice(&key.ctime.0.to_le_bytes());
        e.extend_from_slice(&key.ctime.1.to_le_bytes());
        e.extend_from_slice(&key.ino.to_le_bytes());
        e.extend_from_slice(&key.dev.to_le_bytes());
        e.extend_from_slice(&digest.0);
        body.put(&e)?;
    }
    if n != count {
        return Err(io::Error::other(
            "hash cache: entry count changed while writing",
        ));
    }
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&body.len.to_le_bytes());
    header[16..].copy_from_slice(body.hasher.finalize().as_bytes());
    Ok(header)
}

/// Encodes `entries` in the cache format.
#[cfg(test)]
pub(crate) fn encode(entries: &[(&str, Key, Digest)]) -> Vec<u8> {
    let mut out = Vec::new();
    let header = write(&mut out, entries.len(), entries.iter().copied()).expect("a Vec");
    out[..HEADER_LEN].copy_from_slice(&header);
    out
}

/// Replaces the cache file at `path` with `entries` (`count` of them), atomically: a temporary
/// file in the same directory renamed over it. The parent directory is created if missing. No
/// fsync: a cache torn by a crash fails its checksum and is ignored.
// The client's own cache, not a release: the caller's warning names its path ("cannot write
// hash cache …: {e}"), so these calls keep std's errors rather than naming the path twice.
#[allow(clippy::disallowed_methods)]
pub(crate) fn store<'a>(
    path: &Path,
    count: usize,
    entries: impl Iterator<Item = (&'a str, Key, Digest)>,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        // The client's own temp file (named by its pid, in its cache directory): truncating a
        // stale one of a dead process is intended; no release shares it.
        #[allow(clippy::disallowed_methods)]
        let file = fs::File::create(&tmp)?;
        let mut w = io::BufWriter::with_capacity(256 * 1024, file);
        let header = write(&mut w, count, entries)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.write_all_at(&header, 0)?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> Key {
        Key {
            size: n,
            mtime: (n as i64, 1),
            ctime: (-(n as i64), 2),
            ino: n * 7,
            dev: 3,
        }
    }

    #[test]
    fn roundtrip() {
        let entries = [
            ("a", key(1), Digest::of(b"a")),
            ("d/\u{e9}.php", key(2), Digest::of(b"b")),
        ];
        let c = Cache::decode(&encode(&entries)).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("a", &key(1)), Some(Digest::of(b"a")));
        assert_eq!(c.get("d/\u{e9}.php", &key(2)), Some(Digest::of(b"b")));
        assert_eq!(c.get("a", &key(2)), None);
        assert_eq!(c.get("b", &key(1)), None);
        assert_eq!(Cache::decode(&encode(&[])).unwrap().len(), 0);
    }

    #[test]
    fn rejects_damage() {
        let good = encode(&[("a", key(1), Digest::of(b"a"))]);
        for n in 0..good.len() {
            assert!(Cache::decode(&good[..n]).is_none(), "prefix {n} accepted");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(Cache::decode(&bad).is_none(), "flipped byte {i} accepted");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(Cache::decode(&longer).is_none());
    }

    #[test]
    fn rejects_hostile_count_with_valid_checksum() {
        // A body claiming 2^60 entries, correctly checksummed: no huge allocation, just None.
        let body = (1u64 << 60).to_le_bytes();
        let mut buf = MAGIC.to_vec();
        buf.extend_from_slice(&(body.len() as u64).to_le_bytes());
        buf.extend_from_slice(blake3::hash(&body).as_bytes());
        buf.extend_from_slice(&body);
        assert!(Cache::decode(&buf).is_none());
    }

    #[test]
    fn racy_window() {
        let mut k = key(1);
        k.mtime = (100, 0);
        k.ctime = (100, 0);
        let s = |secs: i128| secs * 1_000_000_000;
        assert!(k.is_racy(s(101)));
        assert!(k.is_racy(s(90)), "a future timestamp is racy");
        assert!(!k.is_racy(s(102) + 1));
        k.ctime = (200, 0);
        assert!(k.is_racy(s(150)), "ctime counts too");
    }
}
