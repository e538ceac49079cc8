//! flip-scan: a source tree on disk to a [`Manifest`].
//!
//! # Design
//!
//! [`scan`] runs in three phases:
//!
//! 1. **Walk** (`walk.rs`): a `rayon::scope` with one task per directory. Each task lists its
//!    directory, `lstat`s every entry and spawns a task per subdirectory, appending its entries to
//!    a shared list in one batch. Symlinks are recorded with their target as read by `readlink`
//!    and never followed (so there are no loops). Sockets, FIFOs and devices are skipped with a
//!    warning. The root itself must be a directory (a symlink to one is fine) and is not an entry.
//!    A name that is not UTF-8 is an error (manifest paths are UTF-8) unless a pattern excludes it.
//! 2. **Hash**: every regular file, in parallel on the rayon pool. If the hash cache has an entry
//!    whose (path, size, mtime, ctime, inode, device) all match the `lstat`, its digest is reused
//!    without opening the file. Otherwise the file is opened (`O_NOFOLLOW | O_NONBLOCK`, so a
//!    file swapped for a symlink or FIFO mid-scan is an error, not a hang), `fstat`ed and hashed:
//!    read whole + `blake3::hash` up to 16 MiB, above that read in 8 MiB pieces, each hashed
//!    with `Hasher::update_rayon` on all cores ([`hash_file`]); never memory-mapped, so a file
//!    truncated meanwhile is a read error, not a SIGBUS. The size recorded is the number of bytes hashed.
//! 3. **Assemble**: [`Manifest::new`] sorts and validates the entries; the hash cache is
//!    rewritten atomically with exactly the files of this scan, so it never grows beyond the tree.
//!
//! Memory is proportional to the number of entries (a path, a mode and a few integers each); file
//! contents are held only while each is hashed (up to 16 MiB per worker thread; larger files one
//! 8 MiB piece at a time).
//!
//! # Excludes
//!
//! Gitignore syntax, matched by `ignore::gitignore` against the path relative to the source root:
//! first the lines of `.flipignore` in the root (if [`ScanOptions::use_flipignore`]), then each
//! [`ScanOptions::excludes`] pattern, later ones taking precedence (so `--exclude '!x'` can undo a
//! `.flipignore` line). `cache/` matches directories only, `/var/log` is anchored at the root,
//! `!keep.php` re-includes, `**` spans directories, `#` starts a comment (write `\#` for a
//! literal). An excluded directory is not descended, so, as in git, a negation cannot re-include
//! something inside it. Nothing else is filtered: dot-files (`.htaccess`, `.env`) are deployed,
//! `.gitignore` files are not honoured, and `.flipignore` itself is part of the manifest unless a
//! pattern excludes it. A hash cache file that lies inside the source tree is always left out.
//!
//! # Hash cache
//!
//! See `cache.rs` for the format. It is only an optimisation: a missing, corrupt or foreign file
//! is silently treated as empty, and failing to write it is a warning. Following git's
//! "racy-git" rule, a file whose mtime or ctime is less than two seconds before the scan started
//! (or in the future) is never served from or stored into the cache, since it could change again
//! without its timestamps changing.

#![warn(missing_docs, unreachable_pub)]

mod cache;
mod fsutil;
mod hash;
mod sink;
mod walk;

pub use sink::ContentSink;

pub use hash::{hash_file, BIG_FILE};

use cache::{Cache, Key};
use flip_manifest::{Entry, EntryKind, Manifest, ManifestError, PathError};
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use rayon::prelude::*;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub use flip_manifest::Digest;

/// Name of the exclude file read from the source root.
pub const FLIPIGNORE: &str = ".flipignore";

/// How to scan.
#[derive(Clone, Debug)]
pub struct ScanOptions {
    /// Gitignore-syntax patterns (from repeated `--exclude GLOB`), applied after `.flipignore`.
    pub excludes: Vec<String>,
    /// Read `.flipignore` in the source root (gitignore syntax). Default `true`.
    pub use_flipignore: bool,
    /// A file to read cached digests from and rewrite afterwards; `None` = no cache.
    pub hash_cache: Option<PathBuf>,
    /// Counts the files looked at as the scan goes, for progress lines (default: a meter no
    /// one reads).
    pub meter: ScanMeter,
}

/// How far a scan has gone: the regular files looked at (hashed, or found in the hash cache)
/// and their bytes. Atomics the scan's threads add to and whoever holds a clone reads on its
/// own schedule (no callback, no lock).
#[derive(Clone, Debug, Default)]
pub struct ScanMeter(std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>);

impl ScanMeter {
    /// Regular files looked at so far.
    pub fn files(&self) -> u64 {
        self.0[0].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Their bytes (file sizes).
    pub fn bytes(&self) -> u64 {
        self.0[1].load(std::sync::atomic::Ordering::Relaxed)
    }

    fn add(&self, size: u64) {
        self.0[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0[1].fetch_add(size, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            excludes: Vec::new(),
            use_flipignore: true,
            hash_cache: None,
            meter: ScanMeter::default(),
        }
    }
}

/// Counts for one scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Regular files in the manifest.
    pub files: u64,
    /// Directories (the root not counted).
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Sum of regular file sizes.
    pub bytes: u64,
    /// Files whose content was read and hashed (not served from the cache).
    pub hashed_files: u64,
    /// Bytes of the files read and hashed.
    pub hashed_bytes: u64,
    /// Files whose digest came from the hash cache.
    pub cache_hits: u64,
}

/// The result of [`scan`].
#[derive(Debug)]
pub struct ScanOutput {
    /// The source tree.
    pub manifest: Manifest,
    /// Things skipped (special files, files that vanished mid-scan) or a cache that could not be
    /// read or written; sorted. None of them make the manifest wrong.
    pub warnings: Vec<String>,
    /// What the scan counted.
    pub stats: ScanStats,
}

/// Why a scan failed. Every message names the path concerned.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The source directory does not exist.
    #[error("source directory {} does not exist", path.display())]
    Missing {
        /// The path concerned.
        path: PathBuf,
    },
    /// The source is not a directory.
    #[error("source {} is not a directory", path.display())]
    NotADir {
        /// The path concerned.
        path: PathBuf,
    },
    /// `op` is a verb phrase: "read", "read directory", "stat", "read symlink".
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// The operation that failed (`open`, `rename`, ...).
        op: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file name that is not UTF-8 (manifest paths are).
    #[error("{}: file name is not valid UTF-8 (flip paths must be UTF-8; rename it, or leave it out with --exclude)", bytes_shown(path))]
    NotUtf8 {
        /// The path concerned.
        path: PathBuf,
    },
    /// A symlink target that is not UTF-8.
    #[error("{}: symlink target is not valid UTF-8", bytes_shown(path))]
    LinkNotUtf8 {
        /// The path concerned.
        path: PathBuf,
    },
    /// A path flip cannot deploy (too long, ...).
    #[error("{}: {source}", path.display())]
    BadPath {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: PathError,
    },
    /// A file changed type or vanished in a way the scan cannot skip.
    #[error("{}: {what} during the scan", path.display())]
    Changed {
        /// The path concerned.
        path: PathBuf,
        /// What changed (`"was replaced by a symlink"`, `"stopped being a regular file"`).
        what: &'static str,
    },
    /// `origin` is `.flipignore`'s path and line, or `--exclude`.
    #[error("invalid exclude pattern in {origin}: {message}")]
    BadPattern {
        /// Where the pattern came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// The entries do not form a valid manifest.
    #[error("source tree cannot be deployed: {0}")]
    Manifest(#[from] ManifestError),
}

/// `path` with every byte that is not part of valid UTF-8 written `\xNN` (`bad\xff.php`),
/// instead of the U+FFFD of `Path::display`, which names no file.
fn bytes_shown(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for chunk in path.as_os_str().as_bytes().utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Scans the directory `root` into a manifest. See the crate documentation for the rules.
///
/// # Errors
/// [`ScanError`]: `root` missing or not a directory, an unreadable entry, a name flip cannot
/// deploy, a bad exclude pattern, a file that changed type during the scan.
pub fn scan(root: &Path, opts: &ScanOptions) -> Result<ScanOutput, ScanError> {
    scan_with(root, opts, SystemTime::now(), None)
}

/// [`scan`] that hands `sink` the content it reads as it goes (see [`ContentSink`]): a first
/// deploy sends while it hashes.
///
/// # Errors
/// As [`scan`].
pub fn scan_streaming(
    root: &Path,
    opts: &ScanOptions,
    sink: &dyn ContentSink,
) -> Result<ScanOutput, ScanError> {
    scan_with(root, opts, SystemTime::now(), Some(sink))
}

/// [`scan`] with the scan start time (for the racy-git rule) given, so tests need not sleep.
#[cfg(test)]
fn scan_at(root: &Path, opts: &ScanOptions, start: SystemTime) -> Result<ScanOutput, ScanError> {
    scan_with(root, opts, start, None)
}

/// [`scan`] at `start`, handing what it reads to `sink`.
fn scan_with(
    root: &Path,
    opts: &ScanOptions,
    start: SystemTime,
    sink: Option<&dyn ContentSink>,
) -> Result<ScanOutput, ScanError> {
    let start_ns = start
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    check_root(root)?;
    let excludes = build_excludes(root, opts)?;

    let mut warnings = Vec::new();
    let mut cache = None;
    let mut skip = None;
    if let Some(path) = &opts.hash_cache {
        let (c, w) = Cache::load(path);
        warnings.extend(w);
        cache = Some(c);
        skip = path_inside(root, path);
    }

    // Phase 1: walk.
    let walked = walk::walk(root, &excludes, skip.as_deref())?;
    warnings.extend(walked.warnings);
    let mut stats = ScanStats::default();
    let mut batches = walked.files;
    if let Some(sink) = sink {
        let all = batches.iter().flatten();
        let bytes = all.clone().fold(0u64, |n, f| n.saturating_add(f.key.size));
        sink.walked(all.count() as u64, bytes);
    }

    // Phase 2: hash (in place: each file's key becomes that of what was read). With a sink,
    // files above BIG_FILE come after the others, one at a time (their pieces in order).
    let big: Vec<bool> = batches
        .iter()
        .flatten()
        .map(|f| sink.is_some() && f.key.size > hash::BIG_FILE)
        .collect();
    let mut hashed: Vec<Option<Hashed>> = batches
        .par_iter_mut()
        .flat_map(|b| b.par_iter_mut())
        .map(|f| {
            opts.meter.add(f.key.size);
            // The same test as `big` (`f` is not changed before this).
            match sink.is_some() && f.key.size > hash::BIG_FILE {
                true => Ok(None),
                false => hash_one(root, cache.as_ref(), start_ns, f, sink),
            }
        })
        .collect::<Result<_, _>>()?;
    let files = batches.iter_mut().flatten();
    for ((f, h), _) in files.zip(&mut hashed).zip(&big).filter(|(_, &b)| b) {
        *h = hash_one(root, cache.as_ref(), start_ns, f, sink)?;
    }
    count_files(root, &batches, &hashed, &mut stats, &mut warnings);

    // Phase 3: rewrite the hash cache (unless it already says exactly this), then let it go.
    if let (Some(path), Some(cache)) = (&opts.hash_cache, cache.take()) {
        rewrite_cache(path, cache, &batches, &hashed, &stats, &mut warnings);
    }

    // Phase 4: assemble.
    let manifest = assemble(walked.nodes, batches, hashed, &mut stats)?;
    warnings.sort();
    Ok(ScanOutput {
        manifest,
        warnings,
        stats,
    })
}

/// The source root must be a directory (a symlink to one is fine).
fn check_root(root: &Path) -> Result<(), ScanError> {
    // Follows a symlink on purpose; each error names the root (missing is an error of its own).
    #[allow(clippy::disallowed_methods)]
    match fs::metadata(root) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(ScanError::NotADir {
            path: root.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ScanError::Missing {
            path: root.to_path_buf(),
        }),
        Err(source) => Err(ScanError::Io {
            op: "stat",
            path: root.to_path_buf(),
            source,
        }),
    }
}

/// Counts the hashed files (and bytes, cache hits) into `stats`; a file gone since the walk
/// (`None`) is a warning.
fn count_files(
    root: &Path,
    batches: &[Vec<walk::FileNode>],
    hashed: &[Option<Hashed>],
    stats: &mut ScanStats,
    warnings: &mut Vec<String>,
) {
    for (f, h) in batches.iter().flatten().zip(hashed) {
        let Some(h) = h else {
            warnings.push(format!(
                "skipping {}: it vanished during the scan",
                root.join(f.rel.as_str()).display()
            ));
            continue;
        };
        stats.files += 1;
        stats.bytes += f.key.size;
        if h.hit {
            stats.cache_hits += 1;
        } else {
            stats.hashed_files += 1;
            stats.hashed_bytes += f.key.size;
        }
    }
}

/// Rewrites the hash cache at `path` with exactly the cacheable files of this scan, unless
/// it already says exactly that (all hits, nothing dropped). A failed write is a warning.
fn rewrite_cache(
    path: &Path,
    cache: Cache,
    batches: &[Vec<walk::FileNode>],
    hashed: &[Option<Hashed>],
    stats: &ScanStats,
    warnings: &mut Vec<String>,
) {
    let keep = || {
        batches
            .iter()
            .flatten()
            .zip(hashed)
            .filter_map(|(f, h)| match h {
                Some(h) if h.cacheable => Some((f.rel.as_str(), f.key, h.digest)),
                _ => None,
            })
    };
    let kept = keep().count();
    let unchanged = kept == cache.len() && kept as u64 == stats.cache_hits;
    drop(cache);
    if !unchanged {
        if let Err(e) = cache::store(path, kept, keep()) {
            warnings.push(format!("cannot write hash cache {}: {e}", path.display()));
        }
    }
}

/// The manifest of the walked directories and symlinks and the hashed files (those that
/// vanished left out), counting directories and symlinks into `stats`.
fn assemble(
    nodes: Vec<walk::Node>,
    batches: Vec<Vec<walk::FileNode>>,
    hashed: Vec<Option<Hashed>>,
    stats: &mut ScanStats,
) -> Result<Manifest, ScanError> {
    let mut entries = Vec::with_capacity(nodes.len() + hashed.len());
    for node in nodes {
        entries.push(match node {
            walk::Node::Dir { rel, mode } => {
                stats.dirs += 1;
                Entry {
                    path: rel,
                    kind: EntryKind::Dir { mode },
                }
            }
            walk::Node::Symlink { rel, target } => {
                stats.symlinks += 1;
                Entry {
                    path: rel,
                    kind: EntryKind::Symlink { target },
                }
            }
        });
    }
    for (f, h) in batches.into_iter().flatten().zip(hashed) {
        if let Some(h) = h {
            entries.push(Entry {
                path: f.rel,
                kind: EntryKind::File {
                    mode: f.mode,
                    size: f.key.size,
                    digest: h.digest,
                },
            });
        }
    }
    Ok(Manifest::new(entries)?)
}

/// The digest of one regular file after phase 2.
struct Hashed {
    digest: Digest,
    hit: bool,
    /// May go into the rewritten cache.
    cacheable: bool,
}

/// Digest of one file: from the cache if its key matches, else read (then `f`'s mode and key
/// become those of the file read, with the key's size the number of bytes hashed). `Ok(None)`
/// means it vanished since the walk.
fn hash_one(
    root: &Path,
    cache: Option<&Cache>,
    start_ns: i128,
    f: &mut walk::FileNode,
    sink: Option<&dyn ContentSink>,
) -> Result<Option<Hashed>, ScanError> {
    // A sink sends what is read: the file is read anyway (the cache would save nothing).
    if sink.is_none() && !f.key.is_racy(start_ns) {
        if let Some(digest) = cache.and_then(|c| c.get(f.rel.as_str(), &f.key)) {
            return Ok(Some(Hashed {
                digest,
                hit: true,
                cacheable: true,
            }));
        }
    }
    let path = root.join(f.rel.as_str());
    let file = match hash::open(&path, true) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(ScanError::Changed {
                path,
                what: "was replaced by a symlink",
            })
        }
        Err(source) => {
            return Err(ScanError::Io {
                op: "read",
                path,
                source,
            })
        }
    };
    let meta = file.metadata().map_err(|source| ScanError::Io {
        op: "stat",
        path: path.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ScanError::Changed {
            path,
            what: "stopped being a regular file",
        });
    }
    let mode = meta.mode() & flip_manifest::MODE_MASK;
    let mtime = (meta.mtime(), meta.mtime_nsec() as u32);
    let read = match sink {
        Some(sink) if meta.len() > hash::BIG_FILE => {
            let mut each = |data, last| sink.piece(&f.rel, mode, mtime, meta.len(), data, last);
            hash::hash_big_pieces(&file, &meta, &mut each).map(|(n, d)| (n, d, None))
        }
        _ => hash::hash_open_file_keep(&file, &meta, sink.is_some()),
    };
    let (size, digest, content) = read.map_err(|source| ScanError::Io {
        op: "read",
        path: path.clone(),
        source,
    })?;
    let mut key = Key::of(&meta);
    // A size different from fstat's means the file changed while it was read: the digest is
    // right for the bytes read (and the size recorded), but must not be cached.
    let cacheable = size == key.size && !key.is_racy(start_ns);
    key.size = size;
    f.key = key;
    f.mode = mode;
    if let (Some(sink), Some(data)) = (sink, content) {
        // Exactly the bytes hashed (whatever the file holds by now): the manifest says them.
        sink.file(&f.rel, f.mode, mtime, &digest, data);
    }
    Ok(Some(Hashed {
        digest,
        hit: false,
        cacheable,
    }))
}

/// Largest `.flipignore` read, in bytes.
const FLIPIGNORE_MAX: u64 = 4 << 20;

/// `.flipignore`'s bytes: a regular file of at most [`FLIPIGNORE_MAX`] bytes, never through a
/// symlink (one to `/dev/zero` never ended, to another file read that file as patterns) nor from
/// a FIFO (which blocked the scan).
fn read_flipignore(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt;
    // The caller names `.flipignore`'s path with this error; a symlink is an error of its own.
    #[allow(clippy::disallowed_methods)]
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(
                io::ErrorKind::InvalidData,
                "a symlink (flip reads .flipignore only as a regular file)",
            ),
            _ => e,
        })?;
    let m = f.metadata()?;
    if !m.is_file() || m.len() > FLIPIGNORE_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a regular file of at most {FLIPIGNORE_MAX} bytes"),
        ));
    }
    let mut bytes = Vec::new();
    f.take(FLIPIGNORE_MAX).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The exclude matcher: `.flipignore` lines, then `opts.excludes`.
///
/// The builder is rooted at `.` and given paths relative to the source root: with a real root,
/// `ignore` strips a leading copy of the root from candidate paths, which would mangle a
/// relative root such as `app` scanning `app/app/x`.
fn build_excludes(root: &Path, opts: &ScanOptions) -> Result<Gitignore, ScanError> {
    let mut b = GitignoreBuilder::new(".");
    if opts.use_flipignore {
        let path = root.join(FLIPIGNORE);
        match read_flipignore(&path) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| ScanError::BadPattern {
                    origin: path.display().to_string(),
                    message: "the file is not valid UTF-8".into(),
                })?;
                let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
                for (n, line) in text.lines().enumerate() {
                    b.add_line(Some(path.clone()), line)
                        .map_err(|e| ScanError::BadPattern {
                            origin: format!("{} line {}", path.display(), n + 1),
                            message: e.to_string(),
                        })?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ScanError::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        }
    }
    for pat in &opts.excludes {
        b.add_line(None, pat).map_err(|e| ScanError::BadPattern {
            origin: "--exclude".into(),
            message: e.to_string(),
        })?;
    }
    b.build().map_err(|e| ScanError::BadPattern {
        origin: "excludes".into(),
        message: e.to_string(),
    })
}

/// `file` relative to `root` if it lies inside it (comparing canonical paths), else `None`.
fn path_inside(root: &Path, file: &Path) -> Option<String> {
    let root = fs::canonicalize(root).ok()?;
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let full = fs::canonicalize(parent).ok()?.join(file.file_name()?);
    Some(full.strip_prefix(&root).ok()?.to_str()?.to_string())
}

#[cfg(test)]
// The tests write, damage and remove targets' files on purpose.
#[allow(clippy::disallowed_methods)]
mod tests;
