//! Shared paths on the target: `shared/X`, kept once and linked from every release
//! (see `flip_plan::shared`). This module checks what `shared/` holds, and at commit moves a
//! release's seeds into it and makes the writable directories, never through a symlink: every
//! directory of `shared/` is opened with `O_NOFOLLOW` relative to its parent's descriptor.
//! Nothing here ever removes or rewrites anything under `shared/`.

use crate::error::{io, Error, Result};
use crate::fsutil;
use crate::{LockGuard, Root};
use flip_manifest::{EntryKind, Manifest, RelPath};
use flip_plan::shared::{is_within, link_target, SharedKind, SharedPaths, SHARED_DIR};
use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What a stage does with shared paths at commit ([`crate::Stage::set_shared`]).
#[derive(Clone, Debug)]
pub struct SharedCommit {
    /// Shared paths `shared/` lacks, with their kind: moved there from the staged tree.
    pub seeds: Vec<(RelPath, SharedKind)>,
    /// The release as recorded: the staged manifest with each seed replaced by its symlink.
    pub release: Manifest,
    /// Writable directories inside the release (given an owner, when there is one).
    pub writable_release: Vec<RelPath>,
    /// Writable directories under `shared/` (made if missing, given the mode and the owner).
    pub writable_shared: Vec<RelPath>,
    /// Permission bits of writable directories.
    pub mode: u32,
    /// Owner (uid, gid) of writable directories; `None`: left as created.
    pub owner: Option<(u32, u32)>,
}

fn cstr(s: &str) -> CString {
    // RelPath components and flip's names hold no NUL.
    CString::new(s).unwrap_or_default()
}

fn cvt(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens directory `name` in `at` without following a symlink, creating it (mode `create`)
/// when missing and asked to.
fn open_dir_at(at: &OwnedFd, name: &str, create: Option<u32>) -> std::io::Result<OwnedFd> {
    let c = cstr(name);
    if let Some(mode) = create {
        // SAFETY: mkdirat relative to a directory fd we own, NUL-terminated name.
        let r = unsafe { libc::mkdirat(at.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
    }
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: openat relative to a directory fd we own; the result is checked.
    let fd = unsafe { libc::openat(at.as_raw_fd(), c.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor returned by openat is ours to own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_path_dir(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default();
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: open with a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor returned by open is ours to own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What `lstat` says of `path`: `None` when it does not exist.
fn lkind(path: &Path) -> Result<Option<fs::Metadata>> {
    fsutil::symlink_metadata_if_any(path)
}

impl Root {
    /// `TARGET/shared`: the shared paths' home (a real directory, never a symlink).
    pub fn shared_dir(&self) -> PathBuf {
        self.path().join(SHARED_DIR)
    }

    /// Which shared paths `shared/` already has, each of its kind (every component a real
    /// directory, a shared directory a directory, a shared file a regular file), looked at
    /// with `lstat` only. Refuses ([`Error::SharedConflict`], naming the path) a path of
    /// another kind, a symlink on the way, or one on the way to a writable directory under
    /// `shared/`; nothing is changed.
    ///
    /// # Errors
    ///
    /// [`Error::SharedConflict`] as above; an I/O error naming the path when one cannot be
    /// inspected.
    pub fn shared_state(
        &self,
        _lock: &LockGuard,
        paths: &SharedPaths,
    ) -> Result<BTreeSet<RelPath>> {
        let base = self.shared_dir();
        let mut present = BTreeSet::new();
        match lkind(&base)? {
            None => return Ok(present),
            Some(m) if m.is_dir() => {}
            Some(m) => {
                return Err(Error::Layout {
                    path: base,
                    found: fsutil::kind_of(&m),
                    expected: "a directory",
                })
            }
        }
        let walk = |p: &RelPath, last: Option<SharedKind>| -> Result<bool> {
            let comps: Vec<&str> = p.components().collect();
            let mut cur = base.clone();
            for (i, c) in comps.iter().enumerate() {
                cur.push(c);
                let expect = if i + 1 == comps.len() {
                    last.unwrap_or(SharedKind::Dir)
                } else {
                    SharedKind::Dir
                };
                let Some(m) = lkind(&cur)? else {
                    return Ok(false);
                };
                let ok = match expect {
                    SharedKind::Dir => m.is_dir(),
                    SharedKind::File => m.is_file(),
                };
                if !ok {
                    return Err(Error::SharedConflict {
                        path: cur,
                        found: fsutil::kind_of(&m),
                        expected: expect.describe(),
                        why: match (i + 1 == comps.len(), last) {
                            (true, Some(SharedKind::Dir)) => format!("{p} is in shared_dirs"),
                            (true, Some(SharedKind::File)) => format!("{p} is in shared_files"),
                            _ => format!("{p} is below it"),
                        },
                    });
                }
            }
            Ok(true)
        };
        for (x, kind) in paths.all() {
            if walk(&x, Some(kind))? {
                present.insert(x);
            }
        }
        for w in paths.writable_in_shared() {
            walk(&w, None)?;
        }
        Ok(present)
    }
}

/// Moves the seeds of a staged tree (`dir`) into `shared/`, leaving a symlink in their place,
/// and makes the writable directories. Called by the stage's commit before its `syncfs`
/// (which makes all of it durable). A file of a seed that shares its inode (a hard link made
/// from the live release) is first copied to a new inode, so `shared/` never shares one with a
/// release. A seed `shared/` got meanwhile (the application made it) wins: the staged copy is
/// dropped with a warning, never written over.
pub(crate) fn commit_shared(
    root: &Root,
    dir: &Path,
    staged: &Manifest,
    s: &SharedCommit,
) -> Result<()> {
    let base = root.shared_dir();
    if !s.seeds.is_empty() || !s.writable_shared.is_empty() {
        fsutil::create_dir_if_missing(&base)?;
    }
    for (x, _kind) in &s.seeds {
        let staged_x = dir.join(x.as_str());
        // Fresh inodes for every file of the seed.
        for e in staged.entries() {
            if let EntryKind::File { .. } = e.kind {
                if is_within(&e.path, x) {
                    fresh_inode(&dir.join(e.path.as_str()))?;
                }
            }
        }
        let parent = open_shared_parent(&base, x, None)?;
        let from = CString::new(staged_x.as_os_str().as_encoded_bytes()).unwrap_or_default();
        let to = cstr(x.file_name());
        let mut r = fsutil::rename_noreplace(libc::AT_FDCWD, &from, parent.as_raw_fd(), &to);
        let shown = base.join(x.as_str());
        if r.as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::EXDEV))
        {
            // shared/ is another filesystem (a mount): copied there under a temp name, each
            // file and directory flushed, then renamed into place.
            r = copy_across(&parent, dir, staged, x, &shown);
            if r.is_ok() {
                fsutil::remove_tree(&staged_x)?;
            }
        }
        if let Err(e) = r {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(io("move the seed into", &shown)(e));
            }
            root.warn(format!(
                "{} appeared during the deploy: kept as it is, the source's copy was not seeded",
                shown.display()
            ));
            fsutil::remove_tree(&staged_x)?;
        }
        // SAFETY: fsync on the directory descriptor `parent`, which we own and keep open.
        cvt(unsafe { libc::fsync(parent.as_raw_fd()) }).map_err(io("fsync", &shown))?;
        std::os::unix::fs::symlink(link_target(x), &staged_x)
            .map_err(io("create the symlink", &staged_x))?;
    }
    crate::fault_pause("before-writable");
    for w in &s.writable_release {
        if let Some((uid, gid)) = s.owner {
            let p = dir.join(w.as_str());
            // Opened component by component from the staged release, never through a
            // symlink, and changed through the descriptor: a writable directory chowned
            // before this one (its parent) belongs to the web server's user, who could swap
            // this one for a symlink meanwhile, and a chmod by path would follow it.
            let fd = open_below(dir, w).map_err(io("open", &p))?;
            // SAFETY: fchown and fchmod on a directory descriptor we own.
            cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map_err(io("chown", &p))?;
            // SAFETY: as above.
            cvt(unsafe { libc::fchmod(fd.as_raw_fd(), s.mode as libc::mode_t) })
                .map_err(io("chmod", &p))?;
        }
    }
    root.writable_shared(&s.writable_shared, s.mode, s.owner)
}

impl Root {
    /// The first of `dirs` (writable directories inside release `id`, relative to it) whose
    /// owner is not `owner` (uid, gid), with the owner it has (`uid:gid`) or why it could not
    /// be looked at; each opened component by component below the release, never through a
    /// symlink. `None`: every one is owned as wanted.
    pub fn writable_not_owned(
        &self,
        id: u64,
        dirs: &[RelPath],
        owner: (u32, u32),
    ) -> Option<(RelPath, String)> {
        let base = self.release_dir(id);
        for w in dirs {
            match open_below(&base, w).and_then(|fd| std::fs::File::from(fd).metadata()) {
                Ok(m) if (m.uid(), m.gid()) == owner => {}
                Ok(m) => return Some((w.clone(), format!("{}:{}", m.uid(), m.gid()))),
                Err(e) => return Some((w.clone(), e.to_string())),
            }
        }
        None
    }

    /// Flushes the filesystem holding `shared/` (after [`Root::writable_shared`] alone).
    ///
    /// # Errors
    ///
    /// An I/O error naming `shared/` when it cannot be opened or `syncfs` fails.
    pub fn sync_shared(&self) -> Result<()> {
        fsutil::syncfs(&self.shared_dir())
    }

    /// Makes each of `dirs` (writable directories under a shared directory) exist under
    /// `shared/` as a directory of `mode` (and `owner`), creating what is missing on the way
    /// (mode 0755), never through a symlink. Only under shared paths that exist or were just
    /// seeded; flushed by the caller's `syncfs`, or here when called alone (an unchanged deploy).
    ///
    /// The mode and the owner are changed only when they differ from what is wanted. A change
    /// the deploy user may not make (`EPERM`: the directory is someone else's) does not fail
    /// the deploy: it is named in a warning, with the directory's mode and owner and the
    /// command that fixes it.
    ///
    /// # Errors
    ///
    /// An I/O error naming the path when a component on the way, or the directory itself, is a
    /// symlink or not a directory (each is opened with `O_NOFOLLOW`), or cannot be created, or
    /// chmod-ed or chown-ed for another reason than `EPERM`.
    pub fn writable_shared(
        &self,
        dirs: &[RelPath],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<()> {
        let base = self.shared_dir();
        for w in dirs {
            let shown = base.join(w.as_str());
            let parent = open_shared_parent(&base, w, Some(flip_plan::shared::PARENT_MODE))?;
            let fd =
                open_dir_at(&parent, w.file_name(), Some(mode)).map_err(io("create", &shown))?;
            let st = fstat(&fd).map_err(io("stat", &shown))?;
            let have = st.st_mode & 0o7777;
            if let Some((uid, gid)) = owner {
                if (st.st_uid, st.st_gid) != (uid, gid) {
                    // SAFETY: fchown on a directory fd we own.
                    let r = cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) });
                    if let Err(e) = r {
                        if e.raw_os_error() != Some(libc::EPERM) {
                            return Err(io("chown", &shown)(e));
                        }
                        self.warn(format!(
                            "{} is owned by {}:{}, not {uid}:{gid} as writable_owner wants, and this user ({}) may not change that (operation not permitted); left as it is: run `sudo chown {uid}:{gid} {}`",
                            shown.display(),
                            st.st_uid,
                            st.st_gid,
                            // SAFETY: geteuid cannot fail.
                            unsafe { libc::geteuid() },
                            shown.display()
                        ));
                    }
                }
            }
            // After a chown (which may clear the setgid bit), the mode as it is now.
            let have = match owner {
                Some(_) => fstat(&fd).map_err(io("stat", &shown))?.st_mode & 0o7777,
                None => have,
            };
            if have != mode & 0o7777 {
                // SAFETY: fchmod on a directory fd we own.
                let r = cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) });
                if r.is_ok() {
                    // The kernel drops a setgid bit for a group the user is not in, silently.
                    let now = fstat(&fd).map_err(io("stat", &shown))?;
                    if now.st_mode & 0o7777 != mode & 0o7777 {
                        self.warn(format!(
                            "{} was given mode {:04o} but has {:04o} (the kernel dropped a bit: this deploy's user is not in its group {}); run `sudo chmod {:04o} {}`",
                            shown.display(),
                            mode & 0o7777,
                            now.st_mode & 0o7777,
                            now.st_gid,
                            mode & 0o7777,
                            shown.display()
                        ));
                    }
                }
                if let Err(e) = r {
                    if e.raw_os_error() != Some(libc::EPERM) {
                        return Err(io("chmod", &shown)(e));
                    }
                    self.warn(format!(
                        "{} has mode {have:04o}, not {:04o} as writable_mode wants, and is owned by uid {} (this deploy runs as uid {}): flip may not change its mode (operation not permitted); left as it is: run `sudo chmod {:04o} {}`",
                        shown.display(),
                        mode & 0o7777,
                        st.st_uid,
                        // SAFETY: geteuid cannot fail.
                        unsafe { libc::geteuid() },
                        mode & 0o7777,
                        shown.display()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `fstat` of a descriptor we own.
fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: a zeroed stat is a valid buffer for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a descriptor we own, into our buffer.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// Copies the staged seed `x` (of the staged tree at `dir`) into `parent` (the directory of
/// `shared/x`, on another filesystem) as `.NAME.tmp-seed`, every file and directory flushed, then
/// renames it to its name unless that exists (`AlreadyExists`; the copy is removed). Only
/// directories this copy made are written into; at most one descriptor per level is open.
fn copy_across(
    parent: &OwnedFd,
    dir: &Path,
    staged: &Manifest,
    x: &RelPath,
    shown: &Path,
) -> std::io::Result<()> {
    let name = x.file_name();
    let tmp = format!(".{name}.tmp-seed");
    let create = |at: &OwnedFd, n: &str, src: &Path, mode: u32| -> std::io::Result<()> {
        let c = cstr(n);
        let flags =
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: openat relative to a directory fd we own; the result is checked.
        let fd = unsafe { libc::openat(at.as_raw_fd(), c.as_ptr(), flags, 0o600 as libc::c_uint) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor returned by openat is ours to own.
        let mut out = unsafe { fs::File::from_raw_fd(fd) };
        // The caller names the seed ("cannot move the seed into shared/X") with this error.
        #[allow(clippy::disallowed_methods)]
        let mut src = fs::File::open(src)?;
        std::io::copy(&mut src, &mut out)?;
        // SAFETY: fchmod on a file descriptor we own.
        cvt(unsafe { libc::fchmod(out.as_raw_fd(), mode as libc::mode_t) })?;
        out.sync_all()
    };
    let finish_dir = |fd: &OwnedFd, mode: u32| -> std::io::Result<()> {
        // SAFETY: fchmod on a directory descriptor we own and keep open.
        cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) })?;
        // SAFETY: fsync on the same descriptor.
        cvt(unsafe { libc::fsync(fd.as_raw_fd()) })
    };
    match staged.get(x) {
        Some(EntryKind::File { mode, .. }) => create(parent, &tmp, &dir.join(x.as_str()), *mode)?,
        Some(EntryKind::Dir { mode }) => {
            // The open directories from x down to the current entry's parent, with their modes.
            let mut stack: Vec<(RelPath, OwnedFd, u32)> =
                vec![(x.clone(), open_dir_at(parent, &tmp, Some(0o700))?, *mode)];
            let below = staged
                .entries()
                .iter()
                .filter(|e| e.path != *x && is_within(&e.path, x));
            for e in below {
                let p = e.path.parent().expect("below x");
                while stack.last().is_some_and(|(d, ..)| *d != p) {
                    let (_, fd, m) = stack.pop().expect("not empty");
                    finish_dir(&fd, m)?;
                }
                let (_, at, _) = stack.last().expect("x is an ancestor of every entry below");
                let n = e.path.file_name();
                match &e.kind {
                    EntryKind::Dir { mode } => {
                        let fd = open_dir_at(at, n, Some(0o700))?;
                        stack.push((e.path.clone(), fd, *mode));
                    }
                    EntryKind::File { mode, .. } => {
                        create(at, n, &dir.join(e.path.as_str()), *mode)?
                    }
                    EntryKind::Symlink { target } => {
                        let (t, c) = (cstr(target), cstr(n));
                        // SAFETY: symlinkat with NUL-terminated strings and a directory fd we own.
                        cvt(unsafe { libc::symlinkat(t.as_ptr(), at.as_raw_fd(), c.as_ptr()) })?;
                    }
                }
            }
            while let Some((_, fd, m)) = stack.pop() {
                finish_dir(&fd, m)?;
            }
        }
        _ => {
            return Err(std::io::Error::other(format!(
                "{}: the seed is not a file or directory",
                shown.display()
            )))
        }
    }
    let (from, to) = (cstr(&tmp), cstr(name));
    let r = fsutil::rename_noreplace(parent.as_raw_fd(), &from, parent.as_raw_fd(), &to);
    if let Err(e) = r {
        if let Some(p) = shown.parent() {
            let _ = fsutil::remove_tree(&p.join(&tmp));
        }
        return Err(e);
    }
    Ok(())
}

/// The directory holding `shared/X`, opened component by component without following a
/// symlink; missing ones are created (mode 0755, or `create`) when `create` or always for seeds.
/// The directory `x` below the directory `base`, each component opened relative to the one
/// before with `O_NOFOLLOW` (a symlink anywhere on the way is an error, `ELOOP` or
/// `ENOTDIR`); nothing is created.
fn open_below(base: &Path, x: &RelPath) -> std::io::Result<OwnedFd> {
    let mut fd = open_path_dir(base)?;
    for c in x.components() {
        fd = open_dir_at(&fd, c, None)?;
    }
    Ok(fd)
}

fn open_shared_parent(base: &Path, x: &RelPath, create: Option<u32>) -> Result<OwnedFd> {
    let mut fd = open_path_dir(base).map_err(io("open", base))?;
    let mut shown = base.to_path_buf();
    let comps: Vec<&str> = x.components().collect();
    for c in &comps[..comps.len() - 1] {
        shown.push(c);
        let mode = create.unwrap_or(flip_plan::shared::PARENT_MODE);
        fd = open_dir_at(&fd, c, Some(mode)).map_err(io("open", &shown))?;
    }
    Ok(fd)
}

/// Gives the staged file `path` an inode of its own when it shares one (a hard link to the
/// live release): copied to a temp name, flushed, renamed over it.
fn fresh_inode(path: &Path) -> Result<()> {
    let m = fsutil::symlink_metadata(path)?;
    if !m.is_file() || m.nlink() <= 1 {
        return Ok(());
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-seed"));
    fsutil::remove_file_quietly(&tmp);
    let mut from = fsutil::open_with(
        "open",
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC),
        path,
    )?;
    // A new file (never one that exists), then the mode exactly (the umask applies at create).
    let mut out = fsutil::open_with(
        "create",
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600),
        &tmp,
    )?;
    std::io::copy(&mut from, &mut out).map_err(io("copy into", &tmp))?;
    out.set_permissions(fs::Permissions::from_mode(m.mode() & 0o7777))
        .map_err(io("chmod", &tmp))?;
    out.sync_all().map_err(io("fsync", &tmp))?;
    fsutil::rename("rename", &tmp, path)?;
    Ok(())
}

/// Resolves `user` or `user:group` to (uid, gid) (the user's primary group when no group is
/// given).
///
/// # Errors
///
/// A message naming the user or group when the name has a NUL byte or this host has no such
/// user or group.
pub fn resolve_owner(spec: &str) -> std::result::Result<(u32, u32), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.contains('\0') {
        return Err(format!("writable_owner: {user:?} is not a user name"));
    }
    let pw = crate::passwd::by_name(user)
        .ok_or_else(|| format!("writable_owner: no user {user:?} on this host"))?;
    let (uid, mut gid) = (pw.uid, pw.gid);
    if let Some(g) = group {
        let cg =
            CString::new(g).map_err(|_| format!("writable_owner: {g:?} is not a group name"))?;
        // SAFETY: as above, for getgrnam.
        let gr = unsafe { libc::getgrnam(cg.as_ptr()) };
        if gr.is_null() {
            return Err(format!("writable_owner: no group {g:?} on this host"));
        }
        // SAFETY: non-null group entry from getgrnam.
        gid = unsafe { (*gr).gr_gid };
    }
    Ok((uid, gid))
}

#[cfg(test)]
// The tests write targets' files on purpose, to make the states the code must handle.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::{Holder, Wait};
    use flip_manifest::{Digest, Entry};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn settings() -> SharedPaths {
        SharedPaths {
            dirs: vec![p("storage")],
            files: vec![],
            writable: vec![p("storage/cache")],
            writable_mode: 0o770,
        }
    }

    fn me() -> Holder {
        Holder {
            pid: std::process::id(),
            host: "h".into(),
            user: "u".into(),
            since: 0,
            what: "test".into(),
            run: None,
        }
    }

    #[test]
    fn a_commit_moves_the_seed_into_shared_and_records_the_link() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open_or_init(tmp.path()).unwrap();
        let lock = root.lock(&me(), Wait::No).unwrap();
        let s = settings();
        assert!(root.shared_state(&lock, &s).unwrap().is_empty());
        let scanned = Manifest::new(vec![
            Entry {
                path: p("storage"),
                kind: EntryKind::Dir { mode: 0o755 },
            },
            Entry {
                path: p("storage/a"),
                kind: EntryKind::File {
                    mode: 0o640,
                    size: 1,
                    digest: Digest::of(b"a"),
                },
            },
        ])
        .unwrap();
        let a = s.apply(&scanned, &BTreeSet::new()).unwrap();
        let mut stage = root.stage(&lock, a.staged.clone(), None).unwrap();
        let i = stage.needs()[0];
        let mut w = stage.begin_file(i).unwrap();
        w.write(b"a").unwrap();
        stage.finish_file(w, None).unwrap();
        stage
            .set_shared(SharedCommit {
                seeds: a.seeds.clone(),
                release: a.release.clone(),
                writable_release: vec![],
                writable_shared: s.writable_in_shared(),
                mode: 0o770,
                owner: None,
            })
            .unwrap();
        let info = stage.commit().unwrap();
        let shared = root.shared_dir();
        assert_eq!(fs::read(shared.join("storage/a")).unwrap(), b"a");
        assert_eq!(
            fs::symlink_metadata(shared.join("storage/cache"))
                .unwrap()
                .mode()
                & 0o7777,
            0o770
        );
        let rel = root.release_dir(info.id).join("storage");
        assert_eq!(
            fs::read_link(&rel).unwrap().to_str(),
            Some("../../shared/storage")
        );
        assert_eq!(root.manifest(info.id).unwrap(), a.release);
        assert!(root.verify(info.id).unwrap().is_empty());
        assert_eq!(
            root.shared_state(&lock, &s).unwrap(),
            BTreeSet::from([p("storage")])
        );
    }

    #[test]
    fn a_release_that_is_not_the_staged_tree_with_links_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open_or_init(tmp.path()).unwrap();
        let lock = root.lock(&me(), Wait::No).unwrap();
        let a = settings()
            .apply(&Manifest::default(), &BTreeSet::new())
            .unwrap();
        let mut stage = root.stage(&lock, a.staged.clone(), None).unwrap();
        let other = Manifest::new(vec![Entry {
            path: p("x"),
            kind: EntryKind::File {
                mode: 0o644,
                size: 0,
                digest: Digest::of(b""),
            },
        }])
        .unwrap();
        let e = stage
            .set_shared(SharedCommit {
                seeds: a.seeds,
                release: other,
                writable_release: vec![],
                writable_shared: vec![],
                mode: 0o770,
                owner: None,
            })
            .unwrap_err();
        assert!(e.to_string().contains("do not match"), "{e}");
    }

    #[test]
    fn a_shared_path_of_another_kind_is_a_conflict_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open_or_init(tmp.path()).unwrap();
        let lock = root.lock(&me(), Wait::No).unwrap();
        fs::create_dir(root.shared_dir()).unwrap();
        fs::write(root.shared_dir().join("storage"), "a file").unwrap();
        let e = root.shared_state(&lock, &settings()).unwrap_err();
        assert!(
            e.to_string()
                .contains("shared/storage is a regular file, not a directory"),
            "{e}"
        );
    }
}
