//! Files of a tree reached through directory descriptors.
//!
//! A [`Tree`] is a directory opened once; each directory below it is opened beneath it without
//! following a symlink anywhere on the way (`openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`, or, on kernels before 5.6 or where a seccomp filter refuses `openat2`,
//! one `openat(O_NOFOLLOW)` per component), and every operation on a file (`statx`, `linkat`,
//! `openat`) is made relative to its directory's descriptor. The kernel then looks up one path
//! component per call instead of the whole path, and a directory swapped for a symlink after
//! it was opened changes nothing. A [`Cursor`] keeps the last directory a worker reached: files
//! are handled in path order, so the next one is most often in the same directory.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use flip_manifest::RelPath;

/// A directory, as an `O_PATH` descriptor (needs no read permission), never a symlink.
const DIR_FLAGS: libc::c_int =
    libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// Set once `openat2` is found missing (ENOSYS) or refused (EPERM: a seccomp filter).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// A directory tree whose directories are opened beneath its root.
pub(crate) struct Tree {
    root: Arc<OwnedFd>,
}

impl Tree {
    /// Opens the directory `path` (not a symlink at its last component).
    ///
    /// # Errors
    /// The `openat` error (ENOTDIR, ELOOP for a symlink, ENOENT, ...).
    pub(crate) fn open(path: &Path) -> io::Result<Tree> {
        let name = CString::new(path.as_os_str().as_bytes()).map_err(|_| einval())?;
        Ok(Tree {
            root: Arc::new(openat(libc::AT_FDCWD, &name, DIR_FLAGS)?),
        })
    }

    /// The directory `rel` below the root (`""`: the root itself): `rel` is a [`RelPath`]'s
    /// text or a prefix of it ending at a component, so it holds no empty, `.` or `..`
    /// component.
    ///
    /// # Errors
    /// ELOOP when a component is a symlink, ENOTDIR when one is not a directory, ENOENT, ...
    pub(crate) fn dir(&self, rel: &str) -> io::Result<Arc<OwnedFd>> {
        if rel.is_empty() {
            return Ok(Arc::clone(&self.root));
        }
        let name = CString::new(rel).map_err(|_| einval())?;
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            match openat2_beneath(self.root.as_raw_fd(), &name) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                }
                // A rename raced with the lookup: the component walk below answers.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                r => return r.map(Arc::new),
            }
        }
        let mut dir: Option<OwnedFd> = None;
        for part in rel.split('/') {
            let part = CString::new(part).map_err(|_| einval())?;
            let at = dir.as_ref().unwrap_or(&self.root).as_raw_fd();
            dir = Some(openat(at, &part, DIR_FLAGS)?);
        }
        Ok(Arc::new(dir.expect("a non-empty path has a component")))
    }
}

/// The two directories one worker reached last in a [`Tree`], reused while its entries follow
/// (two: a manifest lists a directory's entry, in its parent, between files of its siblings).
pub(crate) struct Cursor<'t> {
    tree: &'t Tree,
    /// The most recent first.
    last: [Option<(String, Arc<OwnedFd>)>; 2],
}

impl<'t> Cursor<'t> {
    pub(crate) fn new(tree: &'t Tree) -> Self {
        Cursor {
            tree,
            last: [None, None],
        }
    }

    /// The directory holding `rel` (opened beneath the tree's root, or one of the last two
    /// when it is one of them) and `rel`'s file name.
    ///
    /// # Errors
    /// As [`Tree::dir`].
    pub(crate) fn parent_of(&mut self, rel: &RelPath) -> io::Result<(Arc<OwnedFd>, CString)> {
        let (dir, name) = rel.as_str().rsplit_once('/').unwrap_or(("", rel.as_str()));
        let name = CString::new(name).map_err(|_| einval())?;
        if let Some(i) = self
            .last
            .iter()
            .position(|l| l.as_ref().is_some_and(|(d, _)| d == dir))
        {
            self.last.swap(0, i);
        } else {
            let fd = self.tree.dir(dir)?;
            self.last[1] = Some((dir.to_string(), fd));
            self.last.swap(0, 1);
        }
        let (_, fd) = self.last[0].as_ref().expect("just filled");
        Ok((Arc::clone(fd), name))
    }
}

/// The identity and kind of a directory entry, from `statx` (a symlink's own, never its
/// target's).
#[derive(Clone, Copy)]
pub(crate) struct Stat(libc::statx);

impl Stat {
    pub(crate) fn is_file(&self) -> bool {
        u32::from(self.0.stx_mode) & libc::S_IFMT == libc::S_IFREG
    }

    /// Size in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.0.stx_size
    }

    /// The permission bits and file type (as `st_mode`).
    pub(crate) fn mode(&self) -> u32 {
        u32::from(self.0.stx_mode)
    }

    pub(crate) fn ino(&self) -> u64 {
        self.0.stx_ino
    }

    pub(crate) fn uid(&self) -> u32 {
        self.0.stx_uid
    }

    pub(crate) fn gid(&self) -> u32 {
        self.0.stx_gid
    }

    /// The number of names of the inode.
    pub(crate) fn nlink(&self) -> u32 {
        self.0.stx_nlink
    }

    /// The device (major, minor).
    pub(crate) fn dev(&self) -> (u32, u32) {
        (self.0.stx_dev_major, self.0.stx_dev_minor)
    }

    /// Last modification: seconds and nanoseconds since the epoch.
    pub(crate) fn mtime(&self) -> (i64, u32) {
        (self.0.stx_mtime.tv_sec, self.0.stx_mtime.tv_nsec)
    }

    /// Last status change: seconds and nanoseconds since the epoch.
    pub(crate) fn ctime(&self) -> (i64, u32) {
        (self.0.stx_ctime.tv_sec, self.0.stx_ctime.tv_nsec)
    }
}

/// `statx(dir, name, flags, STATX_BASIC_STATS)` as a raw system call (the glibc wrapper is
/// 2.28's, and the agent runs on older systems).
///
/// # Errors
/// The system call's error.
pub(crate) fn statx(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<libc::statx> {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel fills `st`, which we own and which outlives the call; the name is a
    // NUL-terminated C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_statx,
            dir,
            name.as_ptr(),
            flags | libc::AT_STATX_SYNC_AS_STAT,
            libc::STATX_BASIC_STATS,
            &mut st as *mut libc::statx,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// The entry `name` of the directory `dir`, not following a symlink.
///
/// # Errors
/// The system call's error (ENOENT when nothing is there).
pub(crate) fn lstat_at(dir: &OwnedFd, name: &CStr) -> io::Result<Stat> {
    statx(dir.as_raw_fd(), name, libc::AT_SYMLINK_NOFOLLOW).map(Stat)
}

/// Hard-links `from_name` of `from` as `to_name` in `to`, never following a symlink at the
/// source.
///
/// # Errors
/// The system call's error.
pub(crate) fn link_at(
    from: &OwnedFd,
    from_name: &CStr,
    to: &OwnedFd,
    to_name: &CStr,
) -> io::Result<()> {
    // SAFETY: linkat with two directory descriptors we own and two NUL-terminated names; flags
    // 0 (a symlink at the source is linked itself, never followed).
    let r = unsafe {
        libc::linkat(
            from.as_raw_fd(),
            from_name.as_ptr(),
            to.as_raw_fd(),
            to_name.as_ptr(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes the file (or symlink) `name` of the directory `dir`.
///
/// # Errors
/// The system call's error.
pub(crate) fn unlink_at(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: unlinkat relative to a directory descriptor we own, NUL-terminated name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Calls `each` with every name in the directory `name` of `dir` (`AT_FDCWD` and a path: any
/// directory), without `.` and `..`, in the order the file system lists them; `name` is not
/// followed when it is a symlink (ELOOP) and must be a directory (ENOTDIR). Read with
/// `getdents64` into a buffer of its own: no allocation per name. Returns the directory's
/// permission bits (`st_mode & 0o7777`).
///
/// # Errors
/// The `openat`, `fstat` or `getdents64` error (EACCES for a directory that cannot be read, ...).
pub(crate) fn list_at(dir: RawFd, name: &CStr, each: &mut dyn FnMut(&[u8])) -> io::Result<u32> {
    let fd = openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
    )?;
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct, which fstat fills.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a descriptor we own, into the struct we own.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mode = st.st_mode & 0o7777;
    let mut buf = [0u64; 4096];
    loop {
        // SAFETY: getdents64 writes at most `len` bytes into the buffer we own and pass.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                std::mem::size_of_val(&buf),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(mode);
        }
        // SAFETY: the first `n` bytes are what the kernel wrote: whole `linux_dirent64` records.
        let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
        let mut at = 0;
        while at + 19 < bytes.len() {
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            let reclen = usize::from(u16::from_ne_bytes([bytes[at + 16], bytes[at + 17]]));
            if reclen == 0 || at + reclen > bytes.len() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let raw = &bytes[at + 19..at + reclen];
            let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
            if name != b"." && name != b".." {
                each(name);
            }
            at += reclen;
        }
    }
}

/// The target of the symlink `name` of the directory `dir`.
///
/// # Errors
/// The system call's error (EINVAL when it is not a symlink); ENAMETOOLONG for a target longer
/// than `PATH_MAX`, which Linux does not store.
pub(crate) fn read_link_at(dir: &OwnedFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: readlinkat writes at most `buf.len()` bytes into `buf`, which we own.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize == buf.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Runs `f` on every entry of `entries` (paths relative to the directory `dir`) in parallel,
/// with the entry's directory descriptor and name (`None` when `dir` or a directory on the way
/// cannot be reached without following a symlink); each worker reuses its last directory.
pub(crate) fn par_entries<T: Send>(
    dir: &Path,
    entries: &[flip_manifest::Entry],
    f: impl Fn(usize, &flip_manifest::Entry, Option<(&OwnedFd, &CStr)>) -> T + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let tree = Tree::open(dir).ok();
    entries
        .par_iter()
        .enumerate()
        .map_init(
            || tree.as_ref().map(Cursor::new),
            |cursor, (i, e)| {
                let at = cursor.as_mut().and_then(|c| c.parent_of(&e.path).ok());
                f(i, e, at.as_ref().map(|(d, n)| (&**d, n.as_c_str())))
            },
        )
        .collect()
}

/// `openat(at, name, flags | O_CLOEXEC)`.
///
/// # Errors
/// The system call's error.
pub(crate) fn openat(at: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: openat with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::openat(at, name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor returned by openat is ours to own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `struct open_how` of `linux/openat2.h` (libc's is `non_exhaustive`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// The directory `rel` beneath `at` in one system call: no symlink (nor magic link) on the way,
/// nothing outside `at`.
fn openat2_beneath(at: RawFd, rel: &CStr) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: DIR_FLAGS as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a NUL-terminated path and a `how` of the size passed, which
    // outlives the call; the result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            at,
            rel.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor returned by openat2 is ours to own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

// Tests build their trees with std (its errors need not name paths there).
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// A directory of the tree replaced by a symlink (to a directory outside it, holding a file
    /// of the same name) is never walked through, by `openat2` or the component walk.
    #[test]
    fn a_symlinked_directory_is_not_walked_through() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"in").unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir_all(outside.join("b")).unwrap();
        std::fs::write(outside.join("b/f"), b"out").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("s")).unwrap();
        let tree = Tree::open(&root).unwrap();
        for fallback in [false, true] {
            NO_OPENAT2.store(fallback, Ordering::Relaxed);
            let mut c = Cursor::new(&tree);
            let (dir, name) = c.parent_of(&rel("a/b/f")).unwrap();
            assert_eq!(
                lstat_at(&dir, &name).unwrap().len(),
                2,
                "fallback {fallback}"
            );
            // ELOOP from openat2, ENOTDIR from `openat(O_PATH | O_DIRECTORY | O_NOFOLLOW)`.
            let e = Cursor::new(&tree).parent_of(&rel("s/b/f")).err().unwrap();
            assert!(
                matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
                "fallback {fallback}: {e}"
            );
            let e = tree.dir("a/b/f").err().unwrap();
            assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR), "fallback {fallback}");
        }
        NO_OPENAT2.store(false, Ordering::Relaxed);
        // The tree's root itself is not a symlink either.
        assert!(Tree::open(&root.join("s")).is_err());
    }
}
