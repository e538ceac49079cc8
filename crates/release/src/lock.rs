//! The deploy lock: an `flock` on `.flip/lock`, held for a whole deploy, rollback, activate or
//! prune. The kernel drops it when the holding process ends, however it ends, so a crash or a
//! Ctrl-C never leaves a stale lock behind. The file's content only describes the holder for the
//! message a second caller gets; it is never what decides.

use crate::error::{io, Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Who holds the lock, shown to whoever finds it taken.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    /// Process id of the client.
    pub pid: u32,
    /// Host the client runs on.
    pub host: String,
    /// User the client runs as.
    pub user: String,
    /// Unix seconds.
    pub since: i64,
    /// What the holder is doing ("deploy", "rollback", ...) and for whom (the client).
    pub what: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let age = crate::fsutil::now() - self.since;
        write!(
            f,
            "pid {} on {} (user {}, {}, since {} s ago)",
            self.pid, self.host, self.user, self.what, age
        )
    }
}

/// Proof that the lock is held; dropping it releases the lock.
#[derive(Debug)]
pub struct LockGuard {
    _file: File,
}

/// How to behave when the lock is taken.
pub enum Wait<'a> {
    /// Fail at once with [`Error::Locked`](crate::Error::Locked).
    No,
    /// Block until free; the callback is told once who holds it.
    Yes(&'a mut dyn FnMut(&str)),
}

pub(crate) fn acquire(path: &Path, me: &Holder, wait: Wait<'_>) -> Result<LockGuard> {
    let mut wait = wait;
    // A lock file removed or replaced between our open and our flock (a failed first deploy
    // undoing its target) locks nothing: open it again.
    for _ in 0..100 {
        let mut file = open(path)?;
        if !flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(io("lock", path))? {
            match holder_or_free(&mut file, path)? {
                None => {}
                Some(holder) => match &mut wait {
                    Wait::No => return Err(Error::Locked { holder }),
                    Wait::Yes(tell) => {
                        tell(&holder);
                        flock(&file, libc::LOCK_EX).map_err(io("lock", path))?;
                    }
                },
            }
        }
        if !same_file(&file, path) {
            continue;
        }
        write_holder(&file, path, me)?;
        return Ok(LockGuard { _file: file });
    }
    Err(io("lock", path)(std::io::Error::other(
        "the lock file keeps being replaced",
    )))
}

fn open(path: &Path) -> Result<File> {
    // A symlink here (ELOOP) is a layout error of its own; the others name the path via `io`.
    #[allow(clippy::disallowed_methods)]
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                Error::Layout {
                    path: path.to_path_buf(),
                    found: "a symlink",
                    expected: "a regular file",
                }
            } else {
                io("open the lock file", path)(e)
            }
        })
}

fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata().ok(), crate::fsutil::lstat_or_none(path)) {
        (Some(a), Some(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// The holder is written over the old one in one `pwrite` and the rest cut off after, so a
/// reader sees the old holder, the new one, or the new one followed by a tail of the old one
/// (which [`read_holder`] ignores) — never an empty file once anyone has held the lock.
fn write_holder(file: &File, path: &Path, me: &Holder) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let text = serde_json::to_vec(me).map_err(|e| io("write", path)(e.into()))?;
    file.write_all_at(&text, 0).map_err(io("write", path))?;
    file.set_len(text.len() as u64).map_err(io("write", path))
}

/// Ok(true) when taken, Ok(false) when someone else holds it (non-blocking mode).
fn flock(file: &File, op: libc::c_int) -> std::io::Result<bool> {
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Who holds the lock, or `None` if it turned out free while we looked (then it is ours). A
/// holder that has not written its name yet, or a name left by a holder that is gone (its pid
/// no longer runs on this host), is looked at again for up to a second.
fn holder_or_free(file: &mut File, path: &Path) -> Result<Option<String>> {
    let host = crate::hostname();
    let mut last = None;
    for _ in 0..40 {
        match read_holder(file) {
            Some(h) if h.host != host || pid_alive(h.pid) => return Ok(Some(h.to_string())),
            Some(h) => last = Some(h),
            None => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
        if flock(file, libc::LOCK_EX | libc::LOCK_NB).map_err(io("lock", path))? {
            return Ok(None);
        }
    }
    Ok(Some(match last {
        Some(h) => h.to_string(),
        None => "another flip process (it has not written its name into the lock file)".into(),
    }))
}

fn read_holder(file: &mut File) -> Option<Holder> {
    let mut s = Vec::new();
    file.rewind().ok()?;
    file.take(64 * 1024).read_to_end(&mut s).ok()?;
    serde_json::Deserializer::from_slice(&s)
        .into_iter::<Holder>()
        .next()?
        .ok()
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}
