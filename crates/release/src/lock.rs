//! The deploy lock: an `flock` on `.flip/lock`, held for a whole deploy, rollback, activate or
//! prune. The kernel drops it when the holding process ends, however it ends, so a crash or a
//! Ctrl-C never leaves a stale lock behind. The file's content only describes the holder for the
//! message a second caller gets; it is never what decides.

use crate::error::{io, Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Who holds the lock, shown to whoever finds it taken.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
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
    No,
    /// Block until free; the callback is told once who holds it.
    Yes(&'a mut dyn FnMut(&str)),
}

pub(crate) fn acquire(path: &Path, me: &Holder, wait: Wait<'_>) -> Result<LockGuard> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io("open the lock file", path))?;
    if !flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(io("lock", path))? {
        let holder = describe_holder(&mut file);
        match wait {
            Wait::No => return Err(Error::Locked { holder }),
            Wait::Yes(tell) => {
                tell(&holder);
                flock(&file, libc::LOCK_EX).map_err(io("lock", path))?;
            }
        }
    }
    let text = serde_json::to_vec(me).expect("holder serializes");
    file.set_len(0).map_err(io("write", path))?;
    file.rewind().map_err(io("write", path))?;
    file.write_all(&text).map_err(io("write", path))?;
    Ok(LockGuard { _file: file })
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

fn describe_holder(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.rewind();
    let _ = file.take(64 * 1024).read_to_string(&mut s);
    match serde_json::from_str::<Holder>(&s) {
        Ok(h) => h.to_string(),
        Err(_) => "another flip process (holder unknown)".to_string(),
    }
}
