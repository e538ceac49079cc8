//! The canonical binary encoding of a [`Manifest`]: what the target stores for every release,
//! what crosses the wire, and what [`Manifest::digest`] hashes.
//!
//! ```text
//! "FLIPMAN1" count:varint
//! per entry: shared:varint suffix_len:varint suffix  kind:u8  fields
//!   kind 0 dir:     mode:varint
//!   kind 1 file:    mode:varint size:varint digest:[u8; 32]
//!   kind 2 symlink: len:varint target
//! ```
//! Paths are prefix-compressed against the previous entry (`shared` bytes reused). Entries are in
//! [`RelPath`] order, each once; the decoder rejects anything else, so every manifest has exactly
//! one encoding.

use crate::{
    Digest, DirPatch, Entry, EntryKind, Manifest, ManifestDiff, ManifestError, PathError, RelPath,
    MAX_ENTRIES,
};

const MAGIC: &[u8; 8] = b"FLIPMAN1";
const DIFF_MAGIC: &[u8; 8] = b"FLIPDIF1";
const DIR_PATCH_MAGIC: &[u8; 8] = b"FLIPDPT1";

/// Why bytes are not the canonical encoding of a manifest (or diff, or directory patch).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes do not start with the format's magic.
    #[error("not a flip manifest (bad magic)")]
    BadMagic,
    /// The bytes end inside an entry.
    #[error("manifest is truncated")]
    Truncated,
    /// A number is malformed, not minimal, or too large for its field.
    #[error("manifest has a malformed or non-minimal number")]
    BadVarint,
    /// Entry (index) has an unknown kind byte.
    #[error("manifest entry {0} has an unknown kind")]
    BadKind(usize),
    /// Entry (index) shares more or less of the previous path than it should.
    #[error(
        "manifest entry {0} does not reuse exactly the prefix it shares with the previous path"
    )]
    BadPrefix(usize),
    /// Entry `index` has a path that is not a [`RelPath`].
    #[error("manifest entry {index}: {source}")]
    BadPath {
        /// Position of the entry (0-based).
        index: usize,
        /// What is wrong with the path.
        source: PathError,
    },
    /// Entry (index) is not after the previous one.
    #[error("manifest entry {0} is out of order or repeated")]
    Order(usize),
    /// The claimed number of entries (given) cannot fit in the bytes.
    #[error("manifest claims {0} entries, more than it can hold")]
    Count(u64),
    /// Decoding `encoded` bytes would allocate more than `budget` bytes ([`DECODE_RATIO`]).
    #[error(
        "manifest of {encoded} bytes would take more than {budget} bytes of memory once decoded"
    )]
    Expands {
        /// Length of the encoding, in bytes.
        encoded: usize,
        /// What decoding it may allocate, in bytes.
        budget: u64,
    },
    /// Bytes (how many) follow the last entry.
    #[error("manifest has {0} bytes of trailing garbage")]
    Trailing(usize),
    /// The entries decode but do not form a valid manifest.
    #[error("manifest is inconsistent: {0}")]
    Invalid(#[from] ManifestError),
}

/// The canonical encoding of `m`: magic, entry count, then each entry with its path prefix-compressed
/// against the previous one. Its blake3 is the manifest's [`Digest`](crate::Digest).
pub fn encode(m: &Manifest) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + m.len() * 48);
    out.extend_from_slice(MAGIC);
    put_entries(&mut out, m.entries());
    out
}

/// Writes [`encode`]`(m)` to `w` in 64 KiB pieces.
///
/// # Errors
/// What writing to `w` returns.
pub fn encode_to(m: &Manifest, w: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(72 * 1024);
    out.extend_from_slice(MAGIC);
    let mut failed = Ok(());
    put_entries_with(&mut out, m.entries(), |buf| {
        if failed.is_ok() {
            failed = w.write_all(buf);
        }
        buf.clear();
    });
    failed?;
    w.write_all(&out)
}

/// blake3 of [`encode`]`(m)`, computed in 64 KiB pieces.
pub(crate) fn digest(m: &Manifest) -> Digest {
    let mut h = blake3::Hasher::new();
    encode_to(m, &mut h).expect("hashing cannot fail");
    Digest(*h.finalize().as_bytes())
}

/// Decodes what [`encode`] made, within a memory budget proportional to `buf.len()`.
///
/// # Errors
/// [`DecodeError`] unless `buf` is exactly a canonical encoding of a valid manifest.
pub fn decode(buf: &[u8]) -> Result<Manifest, DecodeError> {
    let mut r = Reader::new(buf);
    if r.take(MAGIC.len())? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let entries = r.entries()?;
    r.end()?;
    let m = Manifest::from_sorted(entries)?;
    // `buf` is the canonical encoding (checked above; fuzzed: `encode(decode(b)) == b`), so
    // its blake3 is the digest, without encoding the manifest again (a fifth of the cost).
    let _ = m.digest.set(Digest(*blake3::hash(buf).as_bytes()));
    Ok(m)
}

/// The canonical encoding of a [`ManifestDiff`]: `"FLIPDIF1"`, the removed paths (count, then
/// prefix-compressed paths), then the added or changed entries (as in a manifest).
pub fn encode_diff(d: &ManifestDiff) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + d.removed.len() * 24 + d.upserts.len() * 48);
    out.extend_from_slice(DIFF_MAGIC);
    put_varint(&mut out, d.removed.len() as u64);
    let mut prev = "";
    for p in &d.removed {
        put_path(&mut out, prev, p.as_str());
        prev = p.as_str();
    }
    put_entries(&mut out, &d.upserts);
    out
}

/// Decodes an encoded [`ManifestDiff`], within the same memory budget as [`decode`].
///
/// # Errors
/// [`DecodeError`] unless `buf` is exactly a canonical encoding of a diff (paths sorted, each once).
pub fn decode_diff(buf: &[u8]) -> Result<ManifestDiff, DecodeError> {
    let mut r = Reader::new(buf);
    if r.take(DIFF_MAGIC.len())? != DIFF_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let count = r.count::<RelPath>()?;
    let mut removed: Vec<RelPath> = Vec::with_capacity(count);
    let mut raw = Vec::new();
    for index in 0..count {
        let prev = removed.last().map_or("", RelPath::as_str);
        let path = r.path(index, prev, &mut raw)?;
        if removed.last().is_some_and(|last| *last >= path) {
            return Err(DecodeError::Order(index));
        }
        removed.push(path);
    }
    let upserts = r.entries()?;
    r.end()?;
    Ok(ManifestDiff { removed, upserts })
}

/// The canonical encoding of a [`DirPatch`]: `"FLIPDPT1"`, a root flag (1 if the root's
/// entries are replaced), the other replaced directories (count, prefix-compressed paths), then
/// the entries (as in a manifest).
pub fn encode_dir_patch(d: &DirPatch) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + d.dirs.len() * 24 + d.entries.len() * 48);
    out.extend_from_slice(DIR_PATCH_MAGIC);
    let root = d.dirs.iter().any(String::is_empty);
    out.push(root as u8);
    let dirs: Vec<&String> = d.dirs.iter().filter(|s| !s.is_empty()).collect();
    put_varint(&mut out, dirs.len() as u64);
    let mut prev = "";
    for p in dirs {
        put_path(&mut out, prev, p);
        prev = p;
    }
    put_entries(&mut out, &d.entries);
    out
}

/// Decodes an encoded [`DirPatch`], within the same memory budget as [`decode`].
///
/// # Errors
/// [`DecodeError`] unless `buf` is exactly a canonical encoding of a directory patch.
pub fn decode_dir_patch(buf: &[u8]) -> Result<DirPatch, DecodeError> {
    let mut r = Reader::new(buf);
    if r.take(DIR_PATCH_MAGIC.len())? != DIR_PATCH_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let mut dirs = match r.byte()? {
        0 => Vec::new(),
        1 => vec![String::new()],
        _ => return Err(DecodeError::BadKind(0)),
    };
    let count = r.count::<String>()?;
    let mut last: Option<RelPath> = None;
    let mut raw = Vec::new();
    for index in 0..count {
        let prev = last.as_ref().map_or("", RelPath::as_str);
        let path = r.path(index, prev, &mut raw)?;
        if last.as_ref().is_some_and(|l| *l >= path) {
            return Err(DecodeError::Order(index));
        }
        dirs.push(path.as_str().to_string());
        last = Some(path);
    }
    let entries = r.entries()?;
    r.end()?;
    Ok(DirPatch { dirs, entries })
}

fn put_path(out: &mut Vec<u8>, prev: &str, path: &str) {
    let shared = common_prefix(prev, path);
    put_varint(out, shared as u64);
    put_varint(out, (path.len() - shared) as u64);
    out.extend_from_slice(&path.as_bytes()[shared..]);
}

fn put_entries(out: &mut Vec<u8>, entries: &[Entry]) {
    put_entries_with(out, entries, |_| {});
}

/// [`put_entries`], handing `out` to `drain` whenever it grows past 64 KiB (which may empty it):
/// a canonical encoding can be hashed without ever being whole in memory.
fn put_entries_with(out: &mut Vec<u8>, entries: &[Entry], mut drain: impl FnMut(&mut Vec<u8>)) {
    put_varint(out, entries.len() as u64);
    let mut prev: &str = "";
    for e in entries {
        if out.len() >= 64 * 1024 {
            drain(out);
        }
        put_path(out, prev, e.path.as_str());
        match &e.kind {
            EntryKind::Dir { mode } => {
                out.push(0);
                put_varint(out, *mode as u64);
            }
            EntryKind::File { mode, size, digest } => {
                out.push(1);
                put_varint(out, *mode as u64);
                put_varint(out, *size);
                out.extend_from_slice(&digest.0);
            }
            EntryKind::Symlink { target } => {
                out.push(2);
                put_varint(out, target.len() as u64);
                out.extend_from_slice(target.as_bytes());
            }
        }
        prev = e.path.as_str();
    }
}

fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = a
        .as_bytes()
        .iter()
        .zip(b.as_bytes())
        .take_while(|(x, y)| x == y)
        .count();
    while !b.is_char_boundary(n) {
        n -= 1;
    }
    n
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// What decoding may allocate: [`DECODE_RATIO`] times the encoded bytes plus [`DECODE_SLACK`].
/// A real tree decodes to about 3 times its encoding (a file entry takes at least 38 bytes
/// encoded, ~100 plus its path in memory); prefix compression lets a hostile one claim far more
/// (4 KiB paths that each differ from the previous one in their last byte: 1000 times), which
/// is refused before it is allocated.
pub(crate) const DECODE_RATIO: u64 = 10;
/// See [`DECODE_RATIO`].
pub(crate) const DECODE_SLACK: u64 = 32 << 20;
/// What one decoded path costs beyond its bytes (the shared allocation's header, allocator
/// overhead).
const PATH_COST: u64 = 32;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Bytes of memory decoding may still allocate.
    budget: u64,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            budget: (buf.len() as u64)
                .saturating_mul(DECODE_RATIO)
                .saturating_add(DECODE_SLACK),
        }
    }

    /// Accounts for `n` bytes about to be allocated.
    fn charge(&mut self, n: u64) -> Result<(), DecodeError> {
        self.budget = self.budget.checked_sub(n).ok_or(DecodeError::Expands {
            encoded: self.buf.len(),
            budget: self.buf.len() as u64 * DECODE_RATIO + DECODE_SLACK,
        })?;
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let part = (b & 0x7f) as u64;
            if shift == 63 && part > 1 {
                return Err(DecodeError::BadVarint);
            }
            v |= part << shift;
            if b & 0x80 == 0 {
                // A zero last byte after the first is padding: another encoding of a number
                // that has a shorter one.
                if b == 0 && shift > 0 {
                    return Err(DecodeError::BadVarint);
                }
                return Ok(v);
            }
        }
        Err(DecodeError::BadVarint)
    }

    /// An element count, refused when the rest of the buffer could not hold that many; the
    /// vector of `count` elements of `T` is charged to the budget.
    fn count<T>(&mut self) -> Result<usize, DecodeError> {
        let count = self.varint()?;
        // Every element takes at least 3 bytes; a count beyond that is a lie, not an
        // allocation request.
        let room = (self.buf.len() - self.pos) as u64 / 3;
        if count > MAX_ENTRIES as u64 || count > room {
            return Err(DecodeError::Count(count));
        }
        self.charge(count * std::mem::size_of::<T>() as u64)?;
        Ok(count as usize)
    }

    /// The next path, whose first bytes are shared with `prev`; `raw` is scratch space.
    fn path(
        &mut self,
        index: usize,
        prev: &str,
        raw: &mut Vec<u8>,
    ) -> Result<RelPath, DecodeError> {
        let shared = self.varint()? as usize;
        if shared > prev.len() {
            return Err(DecodeError::BadPrefix(index));
        }
        let len = self.varint()? as usize;
        let suffix = self.take(len)?;
        self.charge(PATH_COST + (shared + len) as u64)?;
        raw.clear();
        raw.extend_from_slice(&prev.as_bytes()[..shared]);
        raw.extend_from_slice(suffix);
        let path =
            RelPath::from_bytes(raw).map_err(|source| DecodeError::BadPath { index, source })?;
        // The encoder always reuses the longest shared prefix (cut at a character boundary);
        // anything else is another encoding of the same path. The first `shared` bytes are
        // equal by construction: what follows them decides (as `common_prefix` would).
        let more = prev.as_bytes()[shared..]
            .iter()
            .zip(suffix)
            .take_while(|(x, y)| x == y)
            .count();
        let mut longest = shared + more;
        while !path.as_str().is_char_boundary(longest) {
            longest -= 1;
        }
        if shared != longest {
            return Err(DecodeError::BadPrefix(index));
        }
        Ok(path)
    }

    /// Entries in strictly increasing path order.
    fn entries(&mut self) -> Result<Vec<Entry>, DecodeError> {
        let count = self.count::<Entry>()?;
        let mut entries: Vec<Entry> = Vec::with_capacity(count);
        let mut raw = Vec::new();
        for index in 0..count {
            let prev = entries.last().map_or("", |e| e.path.as_str());
            let path = self.path(index, prev, &mut raw)?;
            let kind = match self.byte()? {
                0 => EntryKind::Dir { mode: self.mode()? },
                1 => {
                    let mode = self.mode()?;
                    let size = self.varint()?;
                    let mut d = [0u8; 32];
                    d.copy_from_slice(self.take(32)?);
                    EntryKind::File {
                        mode,
                        size,
                        digest: Digest(d),
                    }
                }
                2 => {
                    let len = self.varint()? as usize;
                    let t = self.take(len)?;
                    self.charge(PATH_COST + len as u64)?;
                    let target =
                        String::from_utf8(t.to_vec()).map_err(|_| DecodeError::BadPath {
                            index,
                            source: PathError::NotUtf8(String::from_utf8_lossy(t).into_owned()),
                        })?;
                    EntryKind::Symlink { target }
                }
                _ => return Err(DecodeError::BadKind(index)),
            };
            if entries.last().is_some_and(|last| last.path >= path) {
                return Err(DecodeError::Order(index));
            }
            entries.push(Entry { path, kind });
        }
        Ok(entries)
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.pos != self.buf.len() {
            return Err(DecodeError::Trailing(self.buf.len() - self.pos));
        }
        Ok(())
    }

    fn mode(&mut self) -> Result<u32, DecodeError> {
        let v = self.varint()?;
        u32::try_from(v).map_err(|_| DecodeError::BadVarint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{dir, file, p};

    #[test]
    fn a_manifest_expanding_far_beyond_its_bytes_is_refused_before_allocation() {
        // 15 nested directories of 255-byte names, then 30,000 directories inside: each entry
        // takes ~11 bytes encoded and a ~4 KiB path decoded.
        let mut entries = Vec::new();
        let mut path = String::new();
        for i in 0..15 {
            if i > 0 {
                path.push('/');
            }
            path.push_str(&"x".repeat(254));
            path.push((b'a' + i as u8) as char);
            entries.push(dir(&path));
        }
        for i in 0..30_000 {
            entries.push(dir(&format!("{path}/{i:05}")));
        }
        let m = Manifest::new(entries).unwrap();
        let bytes = encode(&m);
        assert!(bytes.len() < 400_000, "{}", bytes.len());
        match decode(&bytes) {
            Err(DecodeError::Expands { encoded, budget }) => {
                assert_eq!(encoded, bytes.len());
                assert!(budget < 40 << 20);
            }
            other => panic!("expected a refusal, got {:?}", other.map(|m| m.len())),
        }
        // The same as a diff or a directory patch.
        let diff = ManifestDiff {
            removed: Vec::new(),
            upserts: m.entries().to_vec(),
        };
        assert!(matches!(
            decode_diff(&encode_diff(&diff)),
            Err(DecodeError::Expands { .. })
        ));
        // A lying count is refused before its vector is reserved, not only by the room left.
        let mut lie = MAGIC.to_vec();
        put_varint(&mut lie, 20_000_000);
        lie.extend(std::iter::repeat_n(0u8, 60_000_000));
        assert!(matches!(decode(&lie), Err(DecodeError::Expands { .. })));
    }

    #[test]
    fn streamed_digest_is_the_digest_of_the_encoding() {
        let small = sample();
        assert_eq!(digest(&small), Digest::of(&encode(&small)));
        // Several 64 KiB pieces.
        let mut entries = vec![dir("d")];
        for i in 0..5000 {
            entries.push(file(
                &format!("d/file-{i:05}.php"),
                format!("{i}").as_bytes(),
            ));
        }
        let big = Manifest::new(entries).unwrap();
        assert!(encode(&big).len() > 3 * 64 * 1024);
        assert_eq!(digest(&big), Digest::of(&encode(&big)));
        assert_ne!(digest(&big), digest(&small));
        let mut streamed = Vec::new();
        encode_to(&big, &mut streamed).unwrap();
        assert_eq!(streamed, encode(&big));
    }

    fn sample() -> Manifest {
        Manifest::new(vec![
            dir("src"),
            dir("src/Controller"),
            file("src/Controller/Home.php", b"<?php echo 1;"),
            file("src/Kernel.php", b"<?php"),
            dir("empty"),
            Entry {
                path: p("public"),
                kind: EntryKind::Symlink {
                    target: "../shared/public".into(),
                },
            },
            Entry {
                path: p("bin"),
                kind: EntryKind::File {
                    mode: 0o755,
                    size: 3,
                    digest: Digest::of(b"abc"),
                },
            },
            file("\u{e9}t\u{e9}.txt", b""),
            file("\u{e9}t\u{e8}.txt", b""),
        ])
        .unwrap()
    }

    #[test]
    fn roundtrip() {
        let m = sample();
        let bytes = encode(&m);
        assert_eq!(decode(&bytes).unwrap(), m);
        assert_eq!(
            Manifest::default(),
            decode(&encode(&Manifest::default())).unwrap()
        );
    }

    #[test]
    fn digest_is_stable_and_content_sensitive() {
        let a = sample();
        let b = sample();
        assert_eq!(a.digest(), b.digest());
        let mut e = a.clone().into_entries();
        e.retain(|x| x.path.as_str() != "empty");
        assert_ne!(Manifest::new(e).unwrap().digest(), a.digest());
    }

    #[test]
    fn rejects_every_truncation() {
        let bytes = encode(&sample());
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "prefix of {n} bytes decoded");
        }
        let mut more = bytes.clone();
        more.push(0);
        assert_eq!(decode(&more), Err(DecodeError::Trailing(1)));
    }

    /// All 12 permission bits survive encoding; a mode with a file type bit is refused.
    #[test]
    fn special_mode_bits_roundtrip_and_type_bits_are_refused() {
        let m = Manifest::new(vec![
            Entry {
                path: p("shared"),
                kind: EntryKind::Dir { mode: 0o2775 },
            },
            Entry {
                path: p("tmp"),
                kind: EntryKind::Dir { mode: 0o1777 },
            },
            Entry {
                path: p("suid"),
                kind: EntryKind::File {
                    mode: 0o6755,
                    size: 1,
                    digest: Digest::of(b"x"),
                },
            },
        ])
        .unwrap();
        assert_eq!(decode(&encode(&m)).unwrap(), m);
        for mode in [0o10000u64, 0o100644, 0o40755] {
            let mut b = MAGIC.to_vec();
            put_varint(&mut b, 1);
            put_varint(&mut b, 0);
            put_varint(&mut b, 1);
            b.push(b'd');
            b.push(0);
            put_varint(&mut b, mode);
            assert!(
                matches!(
                    decode(&b),
                    Err(DecodeError::Invalid(ManifestError::BadMode { .. }))
                ),
                "{mode:o}"
            );
        }
    }

    #[test]
    fn rejects_hostile_input() {
        // A huge count in a tiny buffer must not allocate.
        let mut b = MAGIC.to_vec();
        put_varint(&mut b, u64::MAX >> 1);
        assert!(matches!(decode(&b), Err(DecodeError::Count(_))));
        // An escaping path.
        let mut b = MAGIC.to_vec();
        put_varint(&mut b, 1);
        put_varint(&mut b, 0);
        put_varint(&mut b, 5);
        b.extend_from_slice(b"../ab");
        b.push(0);
        put_varint(&mut b, 0o755);
        assert!(matches!(decode(&b), Err(DecodeError::BadPath { .. })));
        // Out-of-order entries (non-canonical).
        let good = Manifest::new(vec![file("a", b"1"), file("b", b"2")]).unwrap();
        let enc = encode(&good);
        let mut swapped = MAGIC.to_vec();
        put_varint(&mut swapped, 2);
        let entry = |name: &str, content: &[u8], out: &mut Vec<u8>| {
            put_varint(out, 0);
            put_varint(out, 1);
            out.extend_from_slice(name.as_bytes());
            out.push(1);
            put_varint(out, 0o644);
            put_varint(out, content.len() as u64);
            out.extend_from_slice(&Digest::of(content).0);
        };
        entry("b", b"2", &mut swapped);
        entry("a", b"1", &mut swapped);
        assert_eq!(swapped.len(), enc.len());
        assert_eq!(decode(&swapped), Err(DecodeError::Order(1)));
    }

    /// Inputs found by `fuzz/` (target `manifest_decode`): the decoder accepted other encodings
    /// than the canonical one, so `encode(decode(b)) != b` and a manifest's digest was not
    /// unique.
    #[test]
    fn rejects_non_canonical_encodings_found_by_fuzzing() {
        // A diff whose one upsert has mode 76 written as 0xcc 0x00 (a padded varint).
        let mut padded = b"FLIPDIF1\x00\x01\x00\x01\x01\x01\xcc\x00\x01".to_vec();
        padded.extend_from_slice(&[0xff; 26]);
        padded.extend_from_slice(&[0x02, 0x00, 0xf8, 0x00, 0x00, 0x02]);
        assert_eq!(decode_diff(&padded), Err(DecodeError::BadVarint));
        // A diff removing "\u{1}", "\u{1}\u{2}", "\u{1}\u{4}", ... where the third path reuses
        // nothing of the second instead of the byte they share.
        let short_prefix =
            b"FLIPDIF1\x05\x00\x01\x01\x01\x01\x02\x00\x02\x01\x04\x00\x01\x02\x00\x02\xc3\xa9\x00";
        assert_eq!(decode_diff(short_prefix), Err(DecodeError::BadPrefix(2)));
    }

    /// A decoded manifest's digest (taken from the bytes) is the one its encoding gives.
    #[test]
    fn a_decoded_manifest_has_the_digest_of_its_encoding() {
        let m =
            Manifest::new(vec![file("a", b"1"), file("b", b"22"), file("\u{e9}", b"")]).unwrap();
        let d = decode(&encode(&m)).unwrap();
        assert_eq!(d.digest(), digest(&d));
        assert_eq!(d.digest(), m.digest());
    }

    #[test]
    fn every_manifest_has_one_encoding() {
        let m =
            Manifest::new(vec![file("\u{e9}t\u{e9}", b""), file("\u{e9}t\u{e8}", b"")]).unwrap();
        let canonical = encode(&m);
        assert_eq!(decode(&canonical).unwrap(), m);
        let entry = |out: &mut Vec<u8>, shared: u8, suffix: &[u8], mode: &[u8]| {
            out.extend_from_slice(&[shared, suffix.len() as u8]);
            out.extend_from_slice(suffix);
            out.push(1);
            out.extend_from_slice(mode);
            out.push(0);
            out.extend_from_slice(&Digest::of(b"").0);
        };
        let build = |second_shared: u8, second_suffix: &[u8], mode: &[u8], count: &[u8]| {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(count);
            entry(&mut b, 0, "\u{e9}t\u{e8}".as_bytes(), &[0xa4, 0x03]);
            entry(&mut b, second_shared, second_suffix, mode);
            b
        };
        // Canonical: the second path reuses "\u{e9}t" (3 bytes), not half of the next character.
        assert_eq!(
            build(3, "\u{e9}".as_bytes(), &[0xa4, 0x03], &[2]),
            canonical
        );
        assert_eq!(
            decode(&build(4, &[0xa9], &[0xa4, 0x03], &[2])),
            Err(DecodeError::BadPrefix(1))
        );
        assert_eq!(
            decode(&build(0, "\u{e9}t\u{e9}".as_bytes(), &[0xa4, 0x03], &[2])),
            Err(DecodeError::BadPrefix(1))
        );
        assert_eq!(
            decode(&build(3, "\u{e9}".as_bytes(), &[0xa4, 0x83, 0x00], &[2])),
            Err(DecodeError::BadVarint)
        );
        assert_eq!(
            decode(&build(3, "\u{e9}".as_bytes(), &[0xa4, 0x03], &[0x82, 0x00])),
            Err(DecodeError::BadVarint)
        );
        // Zero itself is one byte, and still fine.
        assert_eq!(
            decode(&encode(&Manifest::default())).unwrap(),
            Manifest::default()
        );
    }
}
