//! The parallel directory walk: one rayon task per directory, `lstat` of every entry, excludes
//! applied top-down so an excluded directory is never opened.

use crate::cache::Key;
use crate::{fsutil, ScanError};
use flip_manifest::RelPath;
use ignore::gitignore::Gitignore;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// A directory or symlink found on disk.
pub(crate) enum Node {
    Dir { rel: RelPath, mode: u32 },
    Symlink { rel: RelPath, target: String },
}

/// A regular file found on disk (not yet hashed). `key` is from `lstat`: what the hash cache is
/// checked against.
pub(crate) struct FileNode {
    pub rel: RelPath,
    pub mode: u32,
    pub key: Key,
}

/// Everything the walk found, in no particular order. Files stay in per-directory batches:
/// one contiguous list would be reallocated (and briefly held twice) as it grows.
pub(crate) struct Walked {
    pub nodes: Vec<Node>,
    pub files: Vec<Vec<FileNode>>,
    pub warnings: Vec<String>,
}

/// Walks `root` (which must be a directory), skipping paths matched by `excludes` and the
/// relative path `skip` (the hash cache, if it lives inside the tree).
pub(crate) fn walk(
    root: &Path,
    excludes: &Gitignore,
    skip: Option<&str>,
) -> Result<Walked, ScanError> {
    let w = Walker {
        excludes,
        skip,
        nodes: Mutex::new(Vec::new()),
        files: Mutex::new(Vec::new()),
        warnings: Mutex::new(Vec::new()),
        error: Mutex::new(None),
        failed: AtomicBool::new(false),
    };
    rayon::scope(|s| w.dir(s, root.to_path_buf(), None));
    if let Some(e) = w.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(Walked {
        nodes: w.nodes.into_inner().unwrap_or_else(|p| p.into_inner()),
        files: w.files.into_inner().unwrap_or_else(|p| p.into_inner()),
        warnings: w.warnings.into_inner().unwrap_or_else(|p| p.into_inner()),
    })
}

struct Walker<'a> {
    excludes: &'a Gitignore,
    skip: Option<&'a str>,
    /// Each directory appends its entries in one batch.
    nodes: Mutex<Vec<Node>>,
    files: Mutex<Vec<Vec<FileNode>>>,
    warnings: Mutex<Vec<String>>,
    /// The first error; once set, no further directory is listed.
    error: Mutex<Option<ScanError>>,
    failed: AtomicBool,
}

impl<'a> Walker<'a> {
    /// Lists one directory, spawning a task per subdirectory.
    fn dir<'s>(&'s self, s: &rayon::Scope<'s>, abs: PathBuf, rel: Option<RelPath>) {
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        match self.list(s, &abs, rel.as_ref()) {
            Ok((nodes, files)) => {
                lock(&self.nodes).extend(nodes);
                if !files.is_empty() {
                    lock(&self.files).push(files);
                }
            }
            Err(e) => {
                self.failed.store(true, Ordering::Relaxed);
                lock(&self.error).get_or_insert(e);
            }
        }
    }

    fn list<'s>(
        &'s self,
        s: &rayon::Scope<'s>,
        abs: &Path,
        rel: Option<&RelPath>,
    ) -> Result<(Vec<Node>, Vec<FileNode>), ScanError> {
        let io_err = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| ScanError::Io { op, path, source }
        };
        let mut nodes = Vec::new();
        let mut files = Vec::new();
        for dirent in fsutil::read_dir(abs)? {
            let dirent = dirent.map_err(io_err("read directory", abs))?;
            let path = dirent.path();
            let meta = match dirent.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.warn(format!(
                        "skipping {}: it vanished during the scan",
                        path.display()
                    ));
                    continue;
                }
                Err(e) => return Err(io_err("stat", &path)(e)),
            };
            let ft = meta.file_type();
            let name = dirent.file_name();
            let Some(name_str) = name.to_str() else {
                // Not representable in a manifest; fine only if excluded anyway.
                let raw = match rel {
                    None => PathBuf::from(&name),
                    Some(r) => Path::new(r.as_str()).join(&name),
                };
                if self.excludes.matched(&raw, ft.is_dir()).is_ignore() {
                    continue;
                }
                return Err(ScanError::NotUtf8 { path });
            };
            let child = match rel {
                None => RelPath::new(name_str),
                Some(r) => r.join(name_str),
            }
            .map_err(|source| ScanError::BadPath {
                path: path.clone(),
                source,
            })?;
            if self.skip == Some(child.as_str())
                || self
                    .excludes
                    .matched(child.as_str(), ft.is_dir())
                    .is_ignore()
            {
                continue;
            }
            let mode = meta.mode() & flip_manifest::MODE_MASK;
            if ft.is_dir() {
                nodes.push(Node::Dir {
                    rel: child.clone(),
                    mode,
                });
                s.spawn(move |s| self.dir(s, path, Some(child)));
            } else if ft.is_file() {
                files.push(FileNode {
                    rel: child,
                    mode,
                    key: Key::of(&meta),
                });
            } else if ft.is_symlink() {
                let target = fsutil::read_link(&path)?;
                let target = target
                    .into_os_string()
                    .into_string()
                    .map_err(|_| ScanError::LinkNotUtf8 { path: path.clone() })?;
                nodes.push(Node::Symlink { rel: child, target });
            } else {
                let what = if ft.is_fifo() {
                    "a FIFO"
                } else if ft.is_socket() {
                    "a socket"
                } else if ft.is_block_device() {
                    "a block device"
                } else if ft.is_char_device() {
                    "a character device"
                } else {
                    "of an unknown type"
                };
                self.warn(format!(
                    "skipping {}: it is {what}, not a regular file, directory or symlink",
                    path.display()
                ));
            }
        }
        Ok((nodes, files))
    }

    fn warn(&self, w: String) {
        lock(&self.warnings).push(w);
    }
}

/// Locks a mutex, tolerating poison (a panicking task poisons nothing we rely on: the panic is
/// re-raised by `rayon::scope` anyway).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
