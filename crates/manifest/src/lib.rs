//! flip's data model, shared by every other crate: a validated relative path ([`RelPath`]), the
//! entries of a release tree ([`Entry`]), content digests ([`Digest`]) and the [`Manifest`] that
//! lists a whole tree, with a canonical binary encoding whose blake3 names the tree; and how
//! names from outside are shown on a terminal ([`text`]).
//!
//! This crate does no I/O. Everything that comes from outside (a client, a file on the target) is
//! validated when it is turned into these types, so code that holds a `RelPath` or a `Manifest` can
//! rely on its invariants.

#![warn(missing_docs, unreachable_pub)]

mod encoding;
mod path;
pub mod text;
mod tree;

pub use encoding::{
    decode, decode_diff, decode_dir_patch, encode, encode_diff, encode_dir_patch, encode_to,
    DecodeError,
};
pub use path::{PathError, RelPath, MAX_COMPONENT_LEN, MAX_PATH_LEN};
pub use tree::{DirHash, DirPatch, DirState, DirTree, DIR_HASH_LEN};

use serde::{Deserialize, Serialize};
use std::fmt;

/// Permission bits flip carries: all 12 of them, read/write/execute for user, group and other,
/// and setuid (0o4000), setgid (0o2000) and sticky (0o1000). The file type bits are not part of
/// a mode.
pub const MODE_MASK: u32 = 0o7777;
/// Longest symlink target accepted.
pub const MAX_LINK_TARGET: usize = 4096;
/// Most entries one manifest may hold.
pub const MAX_ENTRIES: usize = 20_000_000;

/// A blake3 digest of a file's content (or of a manifest's canonical encoding).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Digest of a byte slice.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// The 64 lowercase hex digits of the digest (blake3's own encoding).
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hex digits (either case); `None` for anything else.
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s).ok().map(Self::from)
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Self {
        Digest(*h.as_bytes())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What a path in the tree is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// A directory with its permission bits.
    Dir {
        /// Permission bits, `st_mode & 0o7777` ([`MODE_MASK`]).
        mode: u32,
    },
    /// A regular file.
    File {
        /// Permission bits, `st_mode & 0o7777` ([`MODE_MASK`]).
        mode: u32,
        /// Length in bytes.
        size: u64,
        /// blake3 of the content.
        digest: Digest,
    },
    /// The target is kept exactly as the source had it and is never followed.
    Symlink {
        /// The link's target text, as `readlink` gives it (at most [`MAX_LINK_TARGET`] bytes, no NUL).
        target: String,
    },
}

/// One path of a release tree and what is there.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entry {
    /// Where, relative to the release root.
    pub path: RelPath,
    /// What is there.
    pub kind: EntryKind,
}

impl Entry {
    /// Whether the entry is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir { .. })
    }
}

/// Why a list of entries is not a valid manifest (the path named is the entry's).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The same path appears twice.
    #[error("{path}: listed twice")]
    Duplicate {
        /// The entry's path.
        path: String,
    },
    /// A path whose parent is missing or not a directory.
    #[error("{path}: its parent {parent} is not a directory in the manifest")]
    NoParentDir {
        /// The entry's path.
        path: String,
        /// Its parent path.
        parent: String,
    },
    /// A mode with bits outside [`MODE_MASK`].
    #[error("{path}: mode {mode:o} has bits outside 07777")]
    BadMode {
        /// The entry's path.
        path: String,
        /// The mode given.
        mode: u32,
    },
    /// A symlink target that is empty, longer than [`MAX_LINK_TARGET`] or has a NUL.
    #[error("{path}: symlink target is empty, too long or contains NUL")]
    BadLinkTarget {
        /// The entry's path.
        path: String,
    },
    /// More than [`MAX_ENTRIES`] entries (the count).
    #[error("manifest has {0} entries, more than the limit of {MAX_ENTRIES}")]
    TooMany(usize),
}

/// Every entry of one release tree, sorted by path (component-wise), each path once, every parent
/// a directory entry. The root directory itself is implicit.
#[derive(Clone, Debug, Default)]
pub struct Manifest {
    entries: Vec<Entry>,
    /// [`Manifest::digest`], computed on first use: the entries never change after
    /// construction, and a deploy asks for the digest of the same manifest several times.
    digest: std::sync::OnceLock<Digest>,
}

/// Manifests are equal when their entries are (whether a digest was computed yet or not).
impl PartialEq for Manifest {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl Eq for Manifest {}

impl Manifest {
    /// Sorts and validates the entries.
    ///
    /// # Errors
    /// [`ManifestError`]: a path twice, a parent that is not a directory entry, a bad mode or
    /// symlink target, more than [`MAX_ENTRIES`] entries.
    pub fn new(mut entries: Vec<Entry>) -> Result<Self, ManifestError> {
        entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        Self::from_sorted(entries)
    }

    /// Validates entries that must already be sorted; out-of-order input is sorted too.
    ///
    /// # Errors
    /// As [`Manifest::new`].
    pub fn from_sorted(mut entries: Vec<Entry>) -> Result<Self, ManifestError> {
        if entries.len() > MAX_ENTRIES {
            return Err(ManifestError::TooMany(entries.len()));
        }
        if !entries.windows(2).all(|w| w[0].path <= w[1].path) {
            entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        }
        for w in entries.windows(2) {
            if w[0].path == w[1].path {
                return Err(ManifestError::Duplicate {
                    path: w[0].path.to_string(),
                });
            }
        }
        // In this order ('/' ranks below every other byte) a directory's entries follow it,
        // all together: the directories enclosing the entry at hand form a stack, and its
        // parent, if a directory of the manifest, is the top once the directories it is not in
        // are popped. One pass, no hashing.
        let mut open: Vec<&str> = Vec::new();
        for e in &entries {
            validate_kind(e)?;
            let path = e.path.as_str();
            while open.last().is_some_and(|d| {
                !(path.len() > d.len() && path.starts_with(d) && path.as_bytes()[d.len()] == b'/')
            }) {
                open.pop();
            }
            if let Some(i) = path.rfind('/') {
                if open.last() != Some(&&path[..i]) {
                    return Err(ManifestError::NoParentDir {
                        path: path.to_string(),
                        parent: path[..i].to_string(),
                    });
                }
            }
            if e.is_dir() {
                open.push(path);
            }
        }
        drop(open);
        Ok(Manifest {
            entries,
            digest: std::sync::OnceLock::new(),
        })
    }

    /// The entries, sorted by path.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entries, sorted by path, without a copy.
    pub fn into_entries(self) -> Vec<Entry> {
        self.entries
    }

    /// Number of entries (directories, files and symlinks).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the tree has no entries (an empty root).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Looks a path up (binary search).
    pub fn get(&self, path: &RelPath) -> Option<&EntryKind> {
        self.position(path).map(|i| &self.entries[i].kind)
    }

    /// Where `path` is in [`Manifest::entries`] (binary search).
    pub fn position(&self, path: &RelPath) -> Option<usize> {
        self.entries.binary_search_by(|e| e.path.cmp(path)).ok()
    }

    /// Regular files: (path, mode, size, digest).
    pub fn files(&self) -> impl Iterator<Item = (&RelPath, u32, u64, &Digest)> {
        self.entries.iter().filter_map(|e| match &e.kind {
            EntryKind::File { mode, size, digest } => Some((&e.path, *mode, *size, digest)),
            _ => None,
        })
    }

    /// Number of regular files.
    pub fn file_count(&self) -> usize {
        self.files().count()
    }

    /// Sum of regular file sizes (saturating: the sizes of a received manifest are arbitrary).
    pub fn total_bytes(&self) -> u64 {
        self.files()
            .fold(0u64, |sum, (_, _, s, _)| sum.saturating_add(s))
    }

    /// The blake3 of the canonical encoding: two trees with equal digests are the same tree.
    pub fn digest(&self) -> Digest {
        *self.digest.get_or_init(|| encoding::digest(self))
    }

    /// Where each content digest can be found: every (path, mode) holding it, in path order.
    pub fn by_digest(&self) -> ByDigest<'_> {
        let mut all: Vec<_> = self.files().map(|(p, mode, _, d)| (d, p, mode)).collect();
        // Stable: paths stay in manifest order within one digest.
        all.sort_by(|a, b| a.0.cmp(b.0));
        ByDigest(all)
    }
}

/// [`Manifest::by_digest`]: one sorted list rather than a map of lists (24 bytes per file).
pub struct ByDigest<'a>(Vec<(&'a Digest, &'a RelPath, u32)>);

impl<'a> ByDigest<'a> {
    /// The (digest, path, mode) of every file with content `d`, in path order; empty if none.
    pub fn get(&self, d: &Digest) -> &[(&'a Digest, &'a RelPath, u32)] {
        let start = self.0.partition_point(|(x, ..)| *x < d);
        let end = start + self.0[start..].partition_point(|(x, ..)| *x == d);
        &self.0[start..end]
    }
}

/// The difference between two manifests: paths that are gone, and entries that are new or
/// changed. A client that knows the target's live manifest sends this instead of the whole new
/// one; the target applies it and checks the result against the new manifest's digest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ManifestDiff {
    /// Sorted, each once.
    pub removed: Vec<RelPath>,
    /// Sorted, each once.
    pub upserts: Vec<Entry>,
}

impl ManifestDiff {
    /// Whether the diff changes nothing.
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.upserts.is_empty()
    }
}

impl Manifest {
    /// What turns `self` into `new`.
    pub fn diff(&self, new: &Manifest) -> ManifestDiff {
        let (mut a, mut b) = (
            self.entries.iter().peekable(),
            new.entries.iter().peekable(),
        );
        let mut d = ManifestDiff::default();
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(x), None) => {
                    d.removed.push(x.path.clone());
                    a.next();
                }
                (None, Some(y)) => {
                    d.upserts.push((*y).clone());
                    b.next();
                }
                (Some(x), Some(y)) => match x.path.cmp(&y.path) {
                    std::cmp::Ordering::Less => {
                        d.removed.push(x.path.clone());
                        a.next();
                    }
                    std::cmp::Ordering::Greater => {
                        d.upserts.push((*y).clone());
                        b.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if x.kind != y.kind {
                            d.upserts.push((*y).clone());
                        }
                        a.next();
                        b.next();
                    }
                },
            }
        }
        d
    }

    /// `self` with `diff` applied, validated like any manifest.
    ///
    /// # Errors
    /// As [`Manifest::new`], for the result.
    pub fn apply(&self, diff: &ManifestDiff) -> Result<Manifest, ManifestError> {
        let mut out = Vec::with_capacity(self.len() + diff.upserts.len());
        let mut removed = diff.removed.iter().peekable();
        let mut ups = diff.upserts.iter().peekable();
        for e in &self.entries {
            while let Some(u) = ups.peek() {
                if u.path < e.path {
                    out.push((*u).clone());
                    ups.next();
                } else {
                    break;
                }
            }
            while removed.peek().is_some_and(|r| **r < e.path) {
                removed.next();
            }
            let is_removed = removed.peek().is_some_and(|r| **r == e.path);
            let replaced = ups.peek().is_some_and(|u| u.path == e.path);
            if replaced {
                out.push(ups.next().unwrap().clone());
            } else if !is_removed {
                out.push(e.clone());
            }
        }
        out.extend(ups.cloned());
        Manifest::from_sorted(out)
    }
}

fn validate_kind(e: &Entry) -> Result<(), ManifestError> {
    match &e.kind {
        EntryKind::Dir { mode } | EntryKind::File { mode, .. } => {
            if mode & !MODE_MASK != 0 {
                return Err(ManifestError::BadMode {
                    path: e.path.to_string(),
                    mode: *mode,
                });
            }
        }
        EntryKind::Symlink { target } => {
            if target.is_empty() || target.len() > MAX_LINK_TARGET || target.contains('\0') {
                return Err(ManifestError::BadLinkTarget {
                    path: e.path.to_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    pub(crate) fn file(path: &str, content: &[u8]) -> Entry {
        Entry {
            path: p(path),
            kind: EntryKind::File {
                mode: 0o644,
                size: content.len() as u64,
                digest: Digest::of(content),
            },
        }
    }

    pub(crate) fn dir(path: &str) -> Entry {
        Entry {
            path: p(path),
            kind: EntryKind::Dir { mode: 0o755 },
        }
    }

    #[test]
    fn sorts_and_validates_parents() {
        let m = Manifest::new(vec![file("a/b.php", b"x"), dir("a"), file("a-b", b"y")]).unwrap();
        let order: Vec<_> = m.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(order, ["a", "a/b.php", "a-b"]);
        let err = Manifest::new(vec![file("x/y", b"1")]).unwrap_err();
        assert_eq!(
            err,
            ManifestError::NoParentDir {
                path: "x/y".into(),
                parent: "x".into()
            }
        );
        let err = Manifest::new(vec![file("f", b"1"), file("f/g", b"2")]).unwrap_err();
        assert!(matches!(err, ManifestError::NoParentDir { .. }));
        // Deep trees, siblings whose names extend a directory's, and a parent left behind.
        let m = Manifest::new(vec![
            dir("a"),
            dir("a/d"),
            dir("a/d/e"),
            file("a/d/e/f", b"1"),
            file("a/d-x", b"2"),
            file("a/g", b"3"),
            dir("ab"),
            file("ab/c", b"4"),
            file("a-b", b"5"),
        ])
        .unwrap();
        assert_eq!(m.len(), 9);
        let err = Manifest::new(vec![
            dir("a"),
            dir("a/d"),
            file("a/d/x", b"1"),
            file("a/dd/y", b"2"),
        ])
        .unwrap_err();
        assert_eq!(
            err,
            ManifestError::NoParentDir {
                path: "a/dd/y".into(),
                parent: "a/dd".into()
            }
        );
        let err = Manifest::new(vec![dir("a"), file("a/b", b"1"), file("ab/c", b"2")]).unwrap_err();
        assert!(matches!(err, ManifestError::NoParentDir { .. }), "{err:?}");
    }

    #[test]
    fn rejects_duplicates_and_bad_modes() {
        assert!(matches!(
            Manifest::new(vec![file("a", b"1"), file("a", b"2")]),
            Err(ManifestError::Duplicate { .. })
        ));
        let with_mode = |mode| Entry {
            path: p("s"),
            kind: EntryKind::File {
                mode,
                size: 0,
                digest: Digest::of(b""),
            },
        };
        // All 12 permission bits are carried; file type bits are not a mode.
        for mode in [0o4755, 0o2775, 0o1777, 0o6755, 0o7777] {
            assert!(Manifest::new(vec![with_mode(mode)]).is_ok(), "{mode:o}");
        }
        for mode in [0o10644, 0o100644, 0o40755, u32::MAX] {
            assert!(
                matches!(
                    Manifest::new(vec![with_mode(mode)]),
                    Err(ManifestError::BadMode { .. })
                ),
                "{mode:o}"
            );
        }
    }

    #[test]
    fn diff_and_apply_roundtrip() {
        let old = Manifest::new(vec![
            dir("a"),
            file("a/x", b"1"),
            file("a/y", b"2"),
            dir("gone"),
            file("gone/z", b"3"),
            file("top", b"4"),
        ])
        .unwrap();
        let new = Manifest::new(vec![
            dir("a"),
            file("a/x", b"1"),
            file("a/y", b"changed"),
            dir("b"),
            file("b/new", b"5"),
            file("top", b"4"),
        ])
        .unwrap();
        let d = old.diff(&new);
        assert_eq!(
            d.removed.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
            ["gone", "gone/z"]
        );
        assert_eq!(d.upserts.len(), 3);
        assert_eq!(old.apply(&d).unwrap(), new);
        let bytes = encode_diff(&d);
        assert_eq!(decode_diff(&bytes).unwrap(), d);
        assert!(old.diff(&old).is_empty());
        assert_eq!(
            Manifest::default()
                .apply(&Manifest::default().diff(&new))
                .unwrap(),
            new
        );
        // Removing a directory but not its content leaves an orphan: refused.
        let bad = ManifestDiff {
            removed: vec![p("gone")],
            upserts: vec![],
        };
        assert!(old.apply(&bad).is_err());
    }

    #[test]
    fn digest_hex_roundtrip() {
        let d = Digest::of(b"hello");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
        assert_eq!(Digest::from_hex(&d.to_hex().to_uppercase()), Some(d));
        // from_str_radix would take "+f" as a byte.
        assert_eq!(Digest::from_hex(&format!("+f{}", &d.to_hex()[2..])), None);
        assert_eq!(Digest::from_hex(&d.to_hex()[1..]), None);
    }
}
