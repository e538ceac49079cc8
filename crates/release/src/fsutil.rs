//! Small durable-filesystem helpers.

use crate::error::{io, Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// fsync a directory, making the names created or renamed inside it durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(io("open", dir))?;
    f.sync_all().map_err(io("fsync", dir))
}

/// Writes `bytes` to `path` atomically and durably: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] with the content produced by `fill` through a buffer, so it never has to be
/// whole in memory.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path.parent().expect("state files live in a directory");
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    let mut w = std::io::BufWriter::with_capacity(256 * 1024, f);
    // `into_inner` flushes the buffer.
    let f = match fill(&mut w).and_then(|()| w.into_inner().map_err(|e| e.into_error())) {
        Ok(f) => f,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(io("write", &tmp)(e));
        }
    };
    f.sync_all().map_err(io("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io("rename into place", path))?;
    fsync_dir(dir)
}

/// Flushes everything written on the filesystem holding `path` (one syscall instead of an fsync
/// per file: a release of 10,000 files is made durable in one go).
pub fn syncfs(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).map_err(io("open", path))?;
    // SAFETY: syncfs takes a valid open file descriptor and touches no memory of ours.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io("sync the filesystem of", path)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Removes a directory tree, also when a web server left read-only directories in it. Never
/// follows a symlink: a symlink at `path` is removed itself.
pub fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_writable(path);
            fs::remove_dir_all(path).map_err(io("remove", path))
        }
    }
}

/// Something flip meant to remove and could not (a file the deploy user may not delete, an
/// immutable file): named with the cause, and retried at the next cleanup.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Leftover {
    /// Absolute path (as the agent sees it).
    pub path: PathBuf,
    /// Why it could not be removed.
    pub error: String,
}

/// At most this many leftovers are named per cleanup; the rest are counted in one more entry.
pub const MAX_LEFTOVERS: usize = 64;

/// What a best-effort removal could not remove, bounded to [`MAX_LEFTOVERS`] entries.
#[derive(Default, Debug)]
pub struct LeftoverList {
    pub items: Vec<Leftover>,
    /// Paths not named because the list was full.
    pub more: u64,
}

impl LeftoverList {
    pub fn push(&mut self, path: &Path, error: impl std::fmt::Display) {
        if self.items.len() < MAX_LEFTOVERS {
            self.items.push(Leftover {
                path: path.to_path_buf(),
                error: error.to_string(),
            });
        } else {
            self.more += 1;
        }
    }

    /// The entries, with one more naming `under` and the count of paths left unnamed.
    pub fn into_vec(mut self, under: &Path) -> Vec<Leftover> {
        if self.more > 0 {
            self.items.push(Leftover {
                path: under.to_path_buf(),
                error: format!("and {} more path(s) that could not be removed", self.more),
            });
        }
        self.items
    }
}

/// Removes as much of the tree at `path` as it can, never following a symlink, and names in
/// `out` each path it could not remove (the deepest ones: a directory is not named again for
/// children already named). Returns whether everything is gone.
pub fn remove_tree_reporting(path: &Path, out: &mut LeftoverList) -> bool {
    match fs::remove_dir_all(path) {
        Ok(()) => return true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
        Err(_) => {}
    }
    make_writable(path);
    match fs::remove_dir_all(path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(_) => remove_each(path, out),
    }
}

fn remove_each(path: &Path, out: &mut LeftoverList) -> bool {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
        Err(e) => {
            out.push(path, e);
            return false;
        }
    };
    let gone = |r: std::io::Result<()>, out: &mut LeftoverList| match r {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            out.push(path, e);
            false
        }
    };
    if !meta.is_dir() {
        return gone(fs::remove_file(path), out);
    }
    let rd = match fs::read_dir(path) {
        Ok(rd) => rd,
        Err(e) => {
            out.push(path, e);
            return false;
        }
    };
    let mut all = true;
    for e in rd {
        match e {
            Ok(e) => all &= remove_each(&e.path(), out),
            Err(e) => {
                out.push(path, e);
                return false;
            }
        }
    }
    all && gone(fs::remove_dir(path), out)
}

fn make_writable(dir: &Path) {
    if let Ok(meta) = fs::symlink_metadata(dir) {
        if meta.is_dir() {
            if meta.permissions().mode() & 0o700 != 0o700 {
                let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
            }
            if let Ok(rd) = fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        make_writable(&e.path());
                    }
                }
            }
        }
    }
}

/// What kind of file `m` describes, for messages: "a symlink", "a directory", ...
pub fn kind_of(m: &fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_symlink() {
        "a symlink"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A file of flip's own, read whole: errors other than "not found" as `Error`; "not found" as
/// `None`. Never follows a symlink (a symlink is refused, naming the path), and refuses a file
/// larger than `max` bytes (as damaged) before reading any of it.
pub fn read_optional_limited(path: &Path, max: u64) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Error::Layout {
                path: path.to_path_buf(),
                found: "a symlink",
                expected: "a regular file",
            })
        }
        Err(e) => return Err(io("read", path)(e)),
    };
    let meta = f.metadata().map_err(io("inspect", path))?;
    if !meta.is_file() {
        return Err(Error::Layout {
            path: path.to_path_buf(),
            found: kind_of(&meta),
            expected: "a regular file",
        });
    }
    if meta.len() > max {
        return Err(corrupt(
            path,
            format!("{} bytes, more than the {max} it can hold", meta.len()),
        ));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    f.take(max.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(io("read", path))?;
    if out.len() as u64 > max {
        return Err(corrupt(
            path,
            format!("more than the {max} bytes it can hold"),
        ));
    }
    Ok(Some(out))
}

pub(crate) fn corrupt(path: &Path, detail: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// The process umask, read from `/proc/self/status` (reading it with `umask(2)` would change it
/// for a moment under other threads' feet); `None` if unknown.
pub fn umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let v = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(v.trim(), 8).ok()
    })
}
