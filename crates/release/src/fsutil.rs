//! Small durable-filesystem helpers.

// The one module of the on-disk crates allowed the filesystem calls `clippy.toml` disallows:
// its helpers are what the rest uses instead (durable writes, removal that names what it left).
#![allow(clippy::disallowed_methods)]

use crate::error::{io, Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// fsync a directory, making the names created or renamed inside it durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(io("open", dir))?;
    f.sync_all().map_err(io("fsync", dir))
}

/// `lstat` of `path`, never following a symlink. Errors name the path ("cannot inspect …").
pub(crate) fn symlink_metadata(path: impl AsRef<Path>) -> Result<fs::Metadata> {
    let path = path.as_ref();
    fs::symlink_metadata(path).map_err(io("inspect", path))
}

/// [`symlink_metadata`], with `None` when nothing is at `path`.
pub(crate) fn symlink_metadata_if_any(path: impl AsRef<Path>) -> Result<Option<fs::Metadata>> {
    let path = path.as_ref();
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("inspect", path)(e)),
    }
}

/// The metadata of whatever is at `path`, or `None` for any failure: for yes/no checks whose
/// failure means "not there (for us)" and is never reported.
pub(crate) fn lstat_or_none(path: impl AsRef<Path>) -> Option<fs::Metadata> {
    let path = path.as_ref();
    fs::symlink_metadata(path).ok()
}

/// Whether anything (a symlink included, dangling or not) is at `path`: a yes/no check.
pub(crate) fn exists_nofollow(path: impl AsRef<Path>) -> bool {
    let path = path.as_ref();
    fs::symlink_metadata(path).is_ok()
}

/// The target of the symlink at `path`. Errors name the path ("cannot read the symlink …").
pub(crate) fn read_link(path: impl AsRef<Path>) -> Result<PathBuf> {
    let path = path.as_ref();
    fs::read_link(path).map_err(io("read the symlink", path))
}

/// The entries of the directory `path`. Errors name the path ("cannot read …").
pub(crate) fn read_dir(path: impl AsRef<Path>) -> Result<fs::ReadDir> {
    let path = path.as_ref();
    fs::read_dir(path).map_err(io("read", path))
}

/// Creates the directory `path` (its parent must exist). Errors name the path ("cannot create …").
#[cfg(test)]
pub(crate) fn create_dir(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    fs::create_dir(path).map_err(io("create", path))
}

/// Creates the directory `path` private to this user (mode 0700, whatever the umask), made so
/// by `mkdir` itself: under a setgid parent it still gets the parent's group and setgid bit
/// (a chmod afterwards would drop the bit for a user not in that group). Errors name the path.
pub(crate) fn create_private_dir(path: impl AsRef<Path>) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let path = path.as_ref();
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(io("create", path))
}

/// Creates the directory `path` unless one is there: `Ok(true)` when it was made. Errors name
/// the path ("cannot create …").
pub(crate) fn create_dir_if_missing(path: impl AsRef<Path>) -> Result<bool> {
    let path = path.as_ref();
    match fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io("create", path)(e)),
    }
}

/// Creates the directory `path` and its missing parents. Errors name `path` ("cannot create …").
pub(crate) fn create_dir_all(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    fs::create_dir_all(path).map_err(io("create", path))
}

/// Removes the file or symlink at `path`. Errors name the path ("cannot remove …").
pub(crate) fn remove_file(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    fs::remove_file(path).map_err(io("remove", path))
}

/// Removes the empty directory `path`. Errors name the path ("cannot remove …").
pub(crate) fn remove_dir(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    fs::remove_dir(path).map_err(io("remove", path))
}

/// Removes the file or symlink at `path` if there is one: `Ok(false)` when nothing was there.
pub(crate) fn remove_file_if_any(path: impl AsRef<Path>) -> Result<bool> {
    let path = path.as_ref();
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io("remove", path)(e)),
    }
}

/// Best-effort removal of a file or symlink (a temp file of our own, a leftover the next cleanup
/// retries): whatever fails is ignored.
pub(crate) fn remove_file_quietly(path: impl AsRef<Path>) {
    let path = path.as_ref();
    let _ = fs::remove_file(path);
}

/// Best-effort removal of an empty directory; returns whether it is gone.
pub(crate) fn remove_dir_quietly(path: impl AsRef<Path>) -> bool {
    let path = path.as_ref();
    fs::remove_dir(path).is_ok()
}

/// Renames `from` to `to` (replacing `to`). Errors name `to` after `op` ("cannot {op} {to}: …").
pub(crate) fn rename(op: &'static str, from: impl AsRef<Path>, to: impl AsRef<Path>) -> Result<()> {
    let (from, to) = (from.as_ref(), to.as_ref());
    fs::rename(from, to).map_err(io(op, to))
}

/// A free name beside `path` to move it aside to: `NAME.aside-SECONDS`, or, when that is taken
/// (moved aside twice in one second), `NAME.aside-SECONDS-N`.
pub(crate) fn aside_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = format!("{name}.aside-{}", now());
    let mut to = path.with_file_name(&base);
    let mut n = 1u32;
    while exists_nofollow(&to) && n < 10_000 {
        to = path.with_file_name(format!("{base}-{n}"));
        n += 1;
    }
    to
}

/// What `m` (the `lstat` of `path`) is, for a message: its kind, and a symlink's target
/// ("a symlink to /elsewhere/log", "a directory").
pub(crate) fn described(path: &Path, m: &fs::Metadata) -> String {
    let kind = kind_of(m);
    match m.file_type().is_symlink() {
        true => match read_link(path) {
            Ok(t) => format!("{kind} to {}", t.display()),
            Err(_) => kind.to_string(),
        },
        false => kind.to_string(),
    }
}

/// Renames `from` to `to` (replacing `to`), moving `from` out of the way. Errors name `from`
/// ("cannot move aside {from}: …").
pub(crate) fn move_aside(from: impl AsRef<Path>, to: impl AsRef<Path>) -> Result<()> {
    let from = from.as_ref();
    fs::rename(from, to).map_err(io("move aside", from))
}

/// Sets the mode of `path` (following a symlink: callers pass what they created). Errors name
/// the path ("cannot chmod …").
pub(crate) fn set_mode(path: impl AsRef<Path>, mode: u32) -> Result<()> {
    let path = path.as_ref();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io("chmod", path))
}

/// Opens `path` for reading. Errors name the path ("cannot open …").
pub(crate) fn open(path: impl AsRef<Path>) -> Result<File> {
    let path = path.as_ref();
    File::open(path).map_err(io("open", path))
}

/// Opens `path` with `opts`. Errors name the path after `op` ("cannot {op} {path}: …").
pub(crate) fn open_with(
    op: &'static str,
    opts: &OpenOptions,
    path: impl AsRef<Path>,
) -> Result<File> {
    let path = path.as_ref();
    opts.open(path).map_err(io(op, path))
}

/// Writes `bytes` to `path` atomically and durably: temp file, fsync, rename, fsync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] with the content produced by `fill` through a buffer, so it never has to be
/// whole in memory.
pub(crate) fn write_atomic_with(
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
pub(crate) fn syncfs(path: &Path) -> Result<()> {
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
pub(crate) fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            if remove_tree_reporting(path, &mut LeftoverList::default()) {
                Ok(())
            } else {
                Err(io("remove", path)(e))
            }
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
pub(crate) struct LeftoverList {
    pub items: Vec<Leftover>,
    /// Paths not named because the list was full.
    pub more: u64,
}

impl LeftoverList {
    pub(crate) fn push(&mut self, path: &Path, error: impl std::fmt::Display) {
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
    pub(crate) fn into_vec(mut self, under: &Path) -> Vec<Leftover> {
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
///
/// Whoever can write into the tree (a web server that wrote a cache into an old release) may
/// swap a directory for a symlink at any moment: every step works relative to a directory
/// descriptor opened without following symlinks (`openat`, `unlinkat`), so nothing outside
/// the tree is ever removed or made writable, whatever is swapped meanwhile.
pub(crate) fn remove_tree_reporting(path: &Path, out: &mut LeftoverList) -> bool {
    match fs::remove_dir_all(path) {
        Ok(()) => return true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
        Err(_) => {}
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        out.push(path, "not a path flip removes");
        return false;
    };
    let parent = match open_dir_at(libc::AT_FDCWD, &cstr(parent.as_os_str()), false) {
        Ok(fd) => fd,
        Err(e) => {
            out.push(path, e);
            return false;
        }
    };
    remove_below(&parent, &cstr(name), path, out, &mut Deep::default(), None)
}

/// Directory levels [`remove_below`] descends below the top of a tree, each holding a descriptor,
/// before it moves what is deeper up to the top and removes it from there: a tree of any depth
/// goes with a bounded number of descriptors (a session's limit is often 1024) and a bounded
/// stack.
const DEEP_LEVELS: usize = 48;

/// A removal's state across levels: how deep it is below the top directory of the tree, and
/// the directories moved up to the top (their names there), still to remove.
#[derive(Default)]
struct Deep {
    depth: usize,
    moved: Vec<std::ffi::CString>,
    /// Names tried at the top so far (for unique ones).
    serial: u64,
}

/// Moves the directory `name` of `dir` up to the top directory of the removal (`top`) under a
/// fresh name (never replacing an entry), recorded in `deep.moved`. Both are inside the tree
/// being removed: nothing leaves it.
fn move_up(
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::CStr,
    top: &std::os::fd::OwnedFd,
    deep: &mut Deep,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        deep.serial += 1;
        let to = cstr(std::ffi::OsStr::new(&format!(
            ".flip-deep-{}-{}",
            std::process::id(),
            deep.serial
        )));
        match rename_noreplace(dir.as_raw_fd(), name, top.as_raw_fd(), &to) {
            Ok(()) => {
                deep.moved.push(to);
                return Ok(());
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && deep.serial < 1 << 20 => {}
            Err(e) => return Err(e),
        }
    }
}

fn cstr(s: &std::ffi::OsStr) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    // Names from the filesystem and flip's own paths hold no NUL.
    std::ffi::CString::new(s.as_bytes()).unwrap_or_default()
}

/// `openat(at, name)` as a directory, never through a symlink at `name`; `path_only`: an
/// `O_PATH` descriptor (needs no read permission).
fn open_dir_at(
    at: libc::c_int,
    name: &std::ffi::CStr,
    path_only: bool,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let access = if path_only {
        libc::O_PATH
    } else {
        libc::O_RDONLY
    };
    let flags = access | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: openat with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::openat(at, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor returned by openat is ours to own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

fn cvt(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Removes `name` in the directory `dir` (shown as `shown` in messages), a whole tree if it is
/// a directory. `top` is the descriptor of the top directory of the removal once below it
/// (`None` for the top itself), `deep` how far below it `dir` is: a directory more than
/// [`DEEP_LEVELS`] below is moved up to the top and removed from there.
fn remove_below(
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::CStr,
    shown: &Path,
    out: &mut LeftoverList,
    deep: &mut Deep,
    top: Option<&std::os::fd::OwnedFd>,
) -> bool {
    use std::os::fd::AsRawFd;
    let gone = |r: std::io::Result<()>, out: &mut LeftoverList| match r {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            out.push(shown, e);
            false
        }
    };
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstatat fills the stat we pass; the name is NUL-terminated.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if let Err(e) = cvt(r) {
        return gone(Err(e), out);
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        // SAFETY: unlinkat relative to our directory descriptor; never follows a symlink.
        let r = unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
        return gone(cvt(r), out);
    }
    if let Some(top) = top.filter(|_| deep.depth >= DEEP_LEVELS) {
        // Too deep to hold another descriptor: up to the top, removed from there.
        return gone(move_up(dir, name, top, deep), out);
    }
    let sub = match open_writable_dir(dir, name, st.st_mode) {
        Ok(fd) => fd,
        Err(e) => return gone(Err(e), out),
    };
    let names = match list_dir(&sub) {
        Ok(n) => n,
        Err(e) => {
            out.push(shown, e);
            return false;
        }
    };
    let mut all = true;
    // One level down, below the top (this directory when it is the top).
    let descend = |child: &std::ffi::CString, deep: &mut Deep, out: &mut LeftoverList| {
        let shown = shown
            .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(child.as_bytes()));
        deep.depth += 1;
        let gone = remove_below(&sub, child, &shown, out, deep, Some(top.unwrap_or(&sub)));
        deep.depth -= 1;
        gone
    };
    for child in names {
        all &= descend(&child, deep, out);
    }
    if top.is_none() {
        // The top: what was moved up to it goes now, each a fresh descent (which may move up
        // more, until nothing is left that deep).
        while let Some(child) = deep.moved.pop() {
            all &= descend(&child, deep, out);
        }
    }
    drop(sub);
    // SAFETY: as above, removing the (now empty) directory entry itself.
    all && gone(
        cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) }),
        out,
    )
}

/// Opens the directory `name` in `dir` for listing and removing its entries, giving its owner
/// full access first when it lacks it (a web server's read-only cache directory). The mode is
/// changed through a descriptor of that very directory, never through a name a symlink could
/// have replaced.
fn open_writable_dir(
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::CStr,
    mode: libc::mode_t,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    if mode & 0o700 != 0o700 {
        let p = open_dir_at(dir.as_raw_fd(), name, true)?;
        // An O_PATH descriptor cannot be fchmod'ed; its /proc link names exactly that inode.
        let link = cstr(std::ffi::OsStr::new(&format!(
            "/proc/self/fd/{}",
            p.as_raw_fd()
        )));
        // SAFETY: chmod of a NUL-terminated path; the result is ignored (best effort: the
        // removal that follows reports what still cannot go).
        unsafe { libc::chmod(link.as_ptr(), 0o700) };
    }
    open_dir_at(dir.as_raw_fd(), name, false)
}

/// The names in an open directory (without `.` and `..`).
fn list_dir(dir: &std::os::fd::OwnedFd) -> std::io::Result<Vec<std::ffi::CString>> {
    let mut no_bound = u64::MAX;
    list_dir_bounded(dir, &mut no_bound).map(|(names, _)| names)
}

/// The names in an open directory (without `.` and `..`), at most `budget` of them (taken off the budget); `false`
/// when the budget ran out before the end.
pub(crate) fn list_dir_bounded(
    dir: &std::os::fd::OwnedFd,
    budget: &mut u64,
) -> std::io::Result<(Vec<std::ffi::CString>, bool)> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor `dir` keeps open; the result is checked.
    let dup = unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fdopendir takes ownership of the duplicate we just made (on success); closedir
    // below releases it.
    let d = unsafe { libc::fdopendir(dup) };
    if d.is_null() {
        let e = std::io::Error::last_os_error();
        // SAFETY: fdopendir failed, so the duplicate is still ours to close.
        unsafe { libc::close(dup) };
        return Err(e);
    }
    let mut names = Vec::new();
    loop {
        if *budget == 0 {
            // SAFETY: d came from fdopendir above.
            unsafe { libc::closedir(d) };
            return Ok((names, false));
        }
        // SAFETY: errno is reset so the end of the listing can be told from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: d is the open stream from fdopendir, not closed yet.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            // SAFETY: __errno_location returns this thread's errno, always valid to read.
            let errno = unsafe { *libc::__errno_location() };
            // SAFETY: d came from fdopendir and is closed once, here, before returning.
            unsafe { libc::closedir(d) };
            if errno != 0 {
                return Err(std::io::Error::from_raw_os_error(errno));
            }
            return Ok((names, true));
        }
        // SAFETY: d_name is a NUL-terminated name inside the entry readdir returned.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            *budget -= 1;
            names.push(name.to_owned());
        }
    }
}

/// What kind of file `m` describes, for messages: "a symlink", "a directory", ...
pub(crate) fn kind_of(m: &fs::Metadata) -> &'static str {
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
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The open flags of every file flip reads (or appends to) in a target's layout: never through
/// a symlink at the end of the path (`ELOOP`), never blocking on a FIFO planted there, closed on
/// exec.
pub(crate) const OWN_FILE_FLAGS: libc::c_int =
    libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;

/// `OpenOptions` that read a file of a target's layout ([`OWN_FILE_FLAGS`]).
pub(crate) fn read_own() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true).custom_flags(OWN_FILE_FLAGS);
    o
}

/// A file of flip's own, read whole: errors other than "not found" as `Error`; "not found" as
/// `None`. Never follows a symlink (a symlink is refused, naming the path), and refuses a file
/// larger than `max` bytes (as damaged) before reading any of it.
pub(crate) fn read_optional_limited(path: &Path, max: u64) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = match read_own().open(path) {
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
pub(crate) fn umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let v = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(v.trim(), 8).ok()
    })
}

/// `renameat2(from_dir, from, to_dir, to, RENAME_NOREPLACE)` as a raw system call: the glibc
/// wrapper is 2.28's, newer than the oldest glibc flip's portable build runs on (2.17), while the
/// call itself is the kernel's (3.15 and later). `AT_FDCWD` for a path relative to the working
/// directory (or absolute).
///
/// # Errors
/// The call's: `EEXIST` when `to` exists, `ENOSYS`/`EINVAL` when the kernel or the filesystem
/// cannot rename without replacing.
pub(crate) fn rename_noreplace(
    from_dir: std::os::fd::RawFd,
    from: &std::ffi::CStr,
    to_dir: std::os::fd::RawFd,
    to: &std::ffi::CStr,
) -> std::io::Result<()> {
    // SAFETY: both names are NUL-terminated C strings that outlive the call; the descriptors
    // are the caller's open directories (or AT_FDCWD); the kernel reads nothing else.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            from_dir,
            from.as_ptr(),
            to_dir,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `statx(dir, name, flags, STATX_BASIC_STATS)` ([`crate::at::statx`]); `None` when it fails.
pub(crate) fn statx(
    dir: std::os::fd::RawFd,
    name: &std::ffi::CStr,
    flags: libc::c_int,
) -> Option<libc::statx> {
    crate::at::statx(dir, name, flags).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each wrapper's error names the operation and the path, once (std's never names it).
    #[test]
    fn wrapper_errors_name_the_operation_and_the_path_once() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("missing");
        let shown = missing.display().to_string();
        let errors = [
            ("inspect", symlink_metadata(&missing).unwrap_err()),
            ("read the symlink", read_link(&missing).unwrap_err()),
            ("read", read_dir(&missing).map(|_| ()).unwrap_err()),
            ("remove", remove_file(&missing).unwrap_err()),
            ("chmod", set_mode(&missing, 0o644).unwrap_err()),
            ("open", open(&missing).map(|_| ()).unwrap_err()),
            ("create", create_dir(missing.join("d")).unwrap_err()),
        ];
        for (op, e) in errors {
            let msg = e.to_string();
            let path = if op == "create" {
                missing.join("d").display().to_string()
            } else {
                shown.clone()
            };
            assert!(
                msg.starts_with(&format!("cannot {op} {path}: ")),
                "{op}: {msg}"
            );
            assert_eq!(msg.matches(&shown).count(), 1, "{op}: {msg}");
        }
        let e = rename("swap", &missing, t.path().join("to")).unwrap_err();
        assert!(e
            .to_string()
            .starts_with(&format!("cannot swap {}: ", t.path().join("to").display())));
        let e = move_aside(&missing, t.path().join("to")).unwrap_err();
        assert!(e
            .to_string()
            .starts_with(&format!("cannot move aside {shown}: ")));
    }

    /// The "if any" wrappers tell a missing path apart from a failure, which they name.
    #[test]
    fn if_any_wrappers_answer_none_for_a_missing_path_and_name_other_failures() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("missing");
        assert!(symlink_metadata_if_any(&missing).unwrap().is_none());
        assert!(!remove_file_if_any(&missing).unwrap());
        assert!(!exists_nofollow(&missing));
        let file = t.path().join("f");
        write_atomic(&file, b"x").unwrap();
        assert!(symlink_metadata_if_any(&file).unwrap().is_some());
        // Below a regular file: ENOTDIR, not "missing".
        let below = file.join("x");
        let e = symlink_metadata_if_any(&below).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot inspect {}: ", below.display())),
            "{e}"
        );
        assert!(remove_file_if_any(&file).unwrap());
        assert!(!exists_nofollow(&file));
        assert!(create_dir_if_missing(&missing).unwrap());
        assert!(!create_dir_if_missing(&missing).unwrap());
    }
}
