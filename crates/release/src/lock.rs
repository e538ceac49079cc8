//! The deploy lock: an `flock` on `.flip/lock`, held for a whole deploy, rollback, activate or
//! prune. The kernel drops it when the holding process ends, however it ends, so a crash or a
//! Ctrl-C never leaves a stale lock behind. The file's content only describes the holder for the
//! message a second caller gets; it is never what decides.

use crate::error::{io, Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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
    /// The client's run (see `flip_wire::Holder::run`), if it named one: a caller of the same
    /// run finds the lock held by itself ([`Error::HeldByThisRun`](crate::Error::HeldByThisRun)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

impl Holder {
    /// Whether this holder, as seen on `host`, may still run: its pid runs here, or it is on
    /// another host, where nobody here can tell.
    fn may_run_on(&self, host: &str) -> bool {
        self.host != host || pid_alive(self.pid)
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Read from the lock file: any number (a forged one does not overflow).
        let age = crate::fsutil::now().saturating_sub(self.since);
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
    /// A shared `flock` on `.flip/` itself, held as long as the lock: it tells whoever finds
    /// the lock file shared with another file by a hard link that a session of this target is
    /// running (see [`acquire`]).
    _dir: File,
}

/// How to behave when the lock is taken.
pub enum Wait<'a> {
    /// Fail at once with [`Error::Locked`](crate::Error::Locked).
    No,
    /// Block until free; the callback is told who holds it when the wait starts, whenever
    /// another holder takes over, and the same again every [`RETELL`] while nothing changes.
    Yes(&'a mut dyn FnMut(&str)),
}

/// Takes the lock at `path` (`.flip/lock`); returns the guard and, when the lock file had to be
/// replaced, a warning naming it and why.
///
/// A lock file with more than one link (a hard link to another target's lock, planted or made
/// by a `cp -al` of a whole target) would couple this target to whatever else has that inode:
/// a deploy there would block a deploy here. Such a file is replaced by a fresh one, already
/// locked, renamed over it under an exclusive `flock` on `.flip/` (two of this target's own
/// sessions never both replace it). It is never replaced while a session of this target holds
/// its lock: every holder keeps a shared `flock` on `.flip/`, so a replacement that cannot take
/// `.flip/` exclusively leaves the lock alone and reports it as taken.
pub(crate) fn acquire(
    path: &Path,
    me: &Holder,
    wait: Wait<'_>,
) -> Result<(LockGuard, Option<String>)> {
    let dir_path = path.parent().expect("the lock lives in .flip/");
    let host = crate::hostname();
    let mut teller = Teller {
        wait,
        told: None,
        at: std::time::Instant::now(),
        every: RETELL,
    };
    let busy = || Held {
        key: "busy".into(),
        text: "another flip session of this target (it holds .flip/)".into(),
        run: None,
    };
    // A lock file removed or replaced between our open and our flock (a failed first deploy
    // undoing its target, another session replacing a shared lock file) locks nothing: open it
    // again.
    let mut replaced_meanwhile = 0;
    // A caller that waits stops once nobody waits for it (the agent's client is gone): looked
    // at before each pause, never before a lock that is free is taken (a session abandoned
    // right after it made its target still takes the lock, which its teardown needs to undo
    // the target).
    let pause = |d: std::time::Duration| -> Result<()> {
        crate::check_abandoned()?;
        std::thread::sleep(d);
        crate::check_abandoned()
    };
    while replaced_meanwhile < 100 {
        if let Some(m) = crate::fsutil::lstat_or_none(path).filter(|m| !m.is_file()) {
            // Not a file flip made (a symlink, a FIFO, a directory): never opened, replaced.
            let dir = open_dir(dir_path)?;
            if exclusive(&dir, dir_path, PATIENCE_FREE)? {
                match replace_odd(path, &m)? {
                    Some((fresh, why)) => return finish(fresh, dir, path, me, Some(why)),
                    None => {
                        replaced_meanwhile += 1;
                        continue;
                    }
                }
            }
            drop(dir);
            teller.tell(busy())?;
            pause(std::time::Duration::from_millis(100))?;
            continue;
        }
        let mut file = open(path)?;
        if !file.metadata().map_err(io("stat", path))?.is_file() {
            // Swapped for another type between the look and the open: looked at again.
            replaced_meanwhile += 1;
            continue;
        }
        let shared = links(&file, path)? > 1;
        if !flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(io("lock", path))? {
            if shared {
                // Held, through this name or another one; by a session of this target only if
                // `.flip/` is held too.
                let dir = open_dir(dir_path)?;
                if exclusive(&dir, dir_path, PATIENCE_BUSY)? {
                    match replace(path, &file, &dir)? {
                        Some(fresh) => return finish(fresh, dir, path, me, replaced_why(path)),
                        None => {
                            replaced_meanwhile += 1;
                            continue;
                        }
                    }
                }
                // A session of this target runs, or another one is replacing the file (once
                // it is done, the file is another one).
                flock(&dir, libc::LOCK_SH).map_err(io("lock", dir_path))?;
                drop(dir);
                if !same_file(&file, path) {
                    replaced_meanwhile += 1;
                    continue;
                }
            }
            if let Some(held) = holder_or_free(&mut file, path)? {
                same_run(me, held.run.as_deref(), path)?;
                teller.tell(held)?;
                if shared {
                    // Not blocked on an inode another target may hold for long: looked at
                    // again until this target's session is done.
                    pause(std::time::Duration::from_millis(100))?;
                    continue;
                }
                // Waited for in short steps, not one blocking `flock`: the next holder may be
                // this caller's own run (it took the lock through another name of this
                // directory while we waited), which would hold it until we give up.
                while !flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(io("lock", path))? {
                    pause(WAIT_STEP)?;
                    match read_holder(&mut file) {
                        Some(h) => {
                            same_run(me, h.run.as_deref(), path)?;
                            teller.tell(Held::named(&h, &host))?;
                        }
                        None => teller.again(),
                    }
                }
            }
        }
        // Ours. `.flip/` is held shared before the file is checked: a replacement was either
        // done before (the check fails) or waits until we let go.
        let dir = open_dir(dir_path)?;
        flock(&dir, libc::LOCK_SH).map_err(io("lock", dir_path))?;
        if !same_file(&file, path) {
            replaced_meanwhile += 1;
            continue;
        }
        let shared = links(&file, path)? > 1;
        // Others could open it (a lock file from before it was private): replaced by a new
        // inode, since a descriptor someone opened on the old one would still lock it.
        let loose = loose(&file);
        if !shared && !loose {
            return finish(file, dir, path, me, None);
        }
        // Free, but not this target's alone: replaced all the same, unless a session of this
        // target holds `.flip/` (its lock file was swapped for this one from outside).
        if exclusive(&dir, dir_path, PATIENCE_FREE)? {
            match replace(path, &file, &dir)? {
                Some(fresh) => {
                    let why = if shared { replaced_why(path) } else { None };
                    return finish(fresh, dir, path, me, why);
                }
                None => {
                    replaced_meanwhile += 1;
                    continue;
                }
            }
        }
        if !shared {
            // `.flip/` busy a moment too long: kept, made private (`finish`).
            return finish(file, dir, path, me, None);
        }
        drop((file, dir));
        teller.tell(busy())?;
        pause(std::time::Duration::from_millis(100))?;
    }
    Err(io("lock", path)(std::io::Error::other(
        "the lock file keeps being replaced",
    )))
}

/// The lock file's permission bits: its owner's alone. `flock` needs only a descriptor, so a
/// lock file anyone may open (0644) lets any local user hold a target's lock, and block every
/// deploy there, with a read-only `flock`.
const LOCK_MODE: u32 = 0o600;

/// Whether the lock file's permission bits are other than [`LOCK_MODE`].
fn loose(file: &File) -> bool {
    file.metadata()
        .is_ok_and(|m| m.permissions().mode() & 0o777 != LOCK_MODE)
}

/// How often a caller that waits for the lock tries it again.
const WAIT_STEP: std::time::Duration = std::time::Duration::from_millis(50);

/// [`Error::HeldByThisRun`] when the lock's holder (`run`) is the caller's own run.
fn same_run(me: &Holder, run: Option<&str>, path: &Path) -> Result<()> {
    match me.run.is_some() && run == me.run.as_deref() {
        true => Err(Error::HeldByThisRun {
            path: path.to_path_buf(),
        }),
        false => Ok(()),
    }
}

/// How long a replacement waits for `.flip/` when the lock file is held through another link
/// (a session of this target holds `.flip/` for its whole life; others only for moments).
const PATIENCE_BUSY: std::time::Duration = std::time::Duration::from_millis(250);
/// The same when the lock file was free.
const PATIENCE_FREE: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes `dir` exclusively (converting a shared lock we hold), trying for up to `patience`.
/// On `false` we hold no lock on it any more.
fn exclusive(dir: &File, path: &Path, patience: std::time::Duration) -> Result<bool> {
    let until = std::time::Instant::now() + patience;
    loop {
        if flock(dir, libc::LOCK_EX | libc::LOCK_NB).map_err(io("lock", path))? {
            return Ok(true);
        }
        if std::time::Instant::now() >= until {
            flock(dir, libc::LOCK_UN).map_err(io("unlock", path))?;
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn replaced_why(path: &Path) -> Option<String> {
    Some(format!(
        "{} was shared with another file by a hard link (a copy of the target made with `cp -al`, or planted): a lock held there would have blocked this target; replaced by a lock file of its own",
        path.display()
    ))
}

/// Under an exclusive `flock` on `dir` (`.flip/`): when `path` is still `old`, a fresh lock
/// file, created and locked under a temp name, is renamed over it. `None`: `path` is another
/// file already (replaced meanwhile): nothing done.
fn replace(path: &Path, old: &File, _dir: &File) -> Result<Option<File>> {
    if !same_file(old, path) {
        return Ok(None);
    }
    create_locked(path).map(Some)
}

/// Under an exclusive `flock` on `.flip/`: when `path` is still of the type `seen` says (not a
/// regular file), it is replaced by a fresh lock file, already locked: anything but a directory
/// is renamed over (never followed: what a symlink names is untouched), a directory is first
/// moved aside (`lock.aside-SECONDS`). Returns the file and the warning naming what was
/// found; `None` when `path` changed meanwhile (nothing done).
fn replace_odd(path: &Path, seen: &std::fs::Metadata) -> Result<Option<(File, String)>> {
    use std::os::unix::fs::MetadataExt;
    let Some(m) = crate::fsutil::lstat_or_none(path) else {
        return Ok(None);
    };
    if m.is_file() || m.ino() != seen.ino() || m.dev() != seen.dev() {
        return Ok(None);
    }
    let what = crate::fsutil::described(path, &m);
    let why = if m.is_dir() {
        let aside = crate::fsutil::aside_path(path);
        crate::fsutil::move_aside(path, &aside)?;
        format!(
            "{} was {what}, not flip's lock file: moved aside to {}; replaced by a lock file",
            path.display(),
            aside.display()
        )
    } else {
        format!(
            "{} was {what}, not flip's lock file: replaced by one (never followed)",
            path.display()
        )
    };
    let fresh = create_locked(path)?;
    Ok(Some((fresh, why)))
}

/// A fresh lock file, created and locked under a temp name beside `path`, renamed over
/// whatever `path` is (made durable): a new inode (never one that exists), locked before
/// anyone can open it by its name.
fn create_locked(path: &Path) -> Result<File> {
    let tmp = path.with_file_name(format!(".lock.tmp-{}", std::process::id()));
    crate::fsutil::remove_file_quietly(&tmp);
    let fresh = crate::fsutil::open_with(
        "create",
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(LOCK_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC),
        &tmp,
    )?;
    if !flock(&fresh, libc::LOCK_EX | libc::LOCK_NB).map_err(io("lock", &tmp))? {
        crate::fsutil::remove_file_quietly(&tmp);
        return Err(io("lock", &tmp)(std::io::Error::other(
            "a file just created is locked by someone else",
        )));
    }
    if let Err(e) = crate::fsutil::rename("replace", &tmp, path) {
        crate::fsutil::remove_file_quietly(&tmp);
        return Err(e);
    }
    // The rename made durable: a crash must not bring the old file back.
    crate::fsutil::fsync_dir(path.parent().expect("in .flip/"))?;
    Ok(fresh)
}

/// Holds `file` (the lock) and `dir` (`.flip/`, downgraded to shared) and writes the holder.
fn finish(
    file: File,
    dir: File,
    path: &Path,
    me: &Holder,
    warning: Option<String>,
) -> Result<(LockGuard, Option<String>)> {
    let dir_path = path.parent().expect("in .flip/");
    flock(&dir, libc::LOCK_SH).map_err(io("lock", dir_path))?;
    // A lock file from before it was private that could not be replaced: made so now (best
    // effort; its owner can).
    if loose(&file) {
        let _ = file.set_permissions(std::fs::Permissions::from_mode(LOCK_MODE));
    }
    write_holder(&file, path, me)?;
    Ok((
        LockGuard {
            _file: file,
            _dir: dir,
        },
        warning,
    ))
}

fn links(file: &File, path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata().map_err(io("stat", path))?.nlink())
}

fn open_dir(path: &Path) -> Result<File> {
    crate::fsutil::open_with(
        "open",
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC),
        path,
    )
}

fn open(path: &Path) -> Result<File> {
    // A symlink here (ELOOP) is a layout error of its own; the others name the path via `io`.
    #[allow(clippy::disallowed_methods)]
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(LOCK_MODE)
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
pub(crate) fn flock(file: &File, op: libc::c_int) -> std::io::Result<bool> {
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
fn holder_or_free(file: &mut File, path: &Path) -> Result<Option<Held>> {
    let host = crate::hostname();
    let mut last = None;
    for i in 0..40 {
        match read_holder(file) {
            // Looked at again for a while first: a doctor's look at the lock (a shared lock,
            // let go at once) fails a `LOCK_EX` for an instant, while the file still names
            // the last holder.
            Some(h) if i >= GRACE && h.may_run_on(&host) => return Ok(Some(Held::of(&h))),
            Some(h) => last = Some(h),
            None => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
        if flock(file, libc::LOCK_EX | libc::LOCK_NB).map_err(io("lock", path))? {
            return Ok(None);
        }
    }
    Ok(Some(match last {
        Some(h) => Held::named(&h, &host),
        None => Held {
            key: "unnamed".into(),
            text: "another flip process (it has not written its name into the lock file)".into(),
            run: None,
        },
    }))
}

/// Looks at a lock found taken (25 ms apart) before its holder is believed: someone who only
/// looks (`flip doctor`) holds it shared for an instant.
const GRACE: usize = 4;

/// Who holds the lock, as a waiter tells it.
struct Held {
    /// Which holder this is: the same for as long as one holder keeps the lock.
    key: String,
    /// The holder for people (its age as of when it was first seen).
    text: String,
    /// The holder's run (see [`Holder::run`]).
    run: Option<String>,
}

impl Held {
    /// The holder the lock file names, as seen on `host`: itself while it runs (or on another
    /// host, where nobody here can tell), else someone who did not write a name (a plain
    /// `flock` on the file, or a process that has not written its name yet), not that earlier
    /// holder.
    fn named(h: &Holder, host: &str) -> Held {
        if h.may_run_on(host) {
            return Held::of(h);
        }
        Held {
            key: format!("unnamed\0{}\0{}", h.pid, h.since),
            text: format!(
                "a process that has not written its name into the lock file (the name there, \
                 pid {} on {}, is of an earlier holder that no longer runs)",
                h.pid, h.host
            ),
            run: None,
        }
    }

    fn of(h: &Holder) -> Held {
        Held {
            key: format!("{}\0{}\0{}\0{}", h.pid, h.host, h.since, h.what),
            text: h.to_string(),
            run: h.run.clone(),
        }
    }
}

/// How often a waiter tells its callback who holds the lock when nothing changed: what the
/// callback writes (an agent's `Waiting` to its client) is one way a waiter finds out that
/// nobody reads any more (an `ssh` whose client was killed exits when it has something to
/// write; then the agent sees its output hang up and stops waiting,
/// [`crate::check_abandoned`]), should the end of its input not tell it first.
pub const RETELL: std::time::Duration = std::time::Duration::from_secs(5);

/// Tells a waiting caller who holds the lock, or fails a caller that does not wait.
struct Teller<'a> {
    wait: Wait<'a>,
    /// The holder last told: its key and text.
    told: Option<(String, String)>,
    /// When it was told.
    at: std::time::Instant,
    /// How often the same holder is told again ([`RETELL`]).
    every: std::time::Duration,
}

impl Teller<'_> {
    /// `held` holds the lock: [`Error::Locked`] for a caller that does not wait; for one that
    /// does, its callback hears the holder when it is new, and the same text again every
    /// `every` ([`RETELL`]) while it keeps the lock.
    fn tell(&mut self, held: Held) -> Result<()> {
        let tell = match &mut self.wait {
            Wait::No => return Err(Error::Locked { holder: held.text }),
            Wait::Yes(tell) => tell,
        };
        match &self.told {
            Some((key, _)) if *key == held.key => {
                if self.at.elapsed() < self.every {
                    return Ok(());
                }
            }
            _ => self.told = Some((held.key, held.text)),
        }
        if let Some((_, text)) = &self.told {
            tell(text);
        }
        self.at = std::time::Instant::now();
        Ok(())
    }

    /// The holder is unchanged (or could not be read this time): told again once `every` has
    /// passed.
    fn again(&mut self) {
        if let (Wait::Yes(tell), Some((_, text))) = (&mut self.wait, &self.told) {
            if self.at.elapsed() >= self.every {
                tell(text);
                self.at = std::time::Instant::now();
            }
        }
    }
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

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests look at and link files freely
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::sync::{Arc, Barrier};

    fn me(what: &str) -> Holder {
        Holder {
            pid: std::process::id(),
            host: crate::hostname(),
            user: "test".into(),
            since: crate::fsutil::now(),
            what: what.into(),
            run: None,
        }
    }

    fn meta(p: &Path) -> std::fs::Metadata {
        std::fs::symlink_metadata(p).unwrap()
    }

    /// Another target's lock (`a/lock`, held by its deploy) and this target's lock a hard link
    /// to it: two of this target's deploys race, exactly one replaces and holds the lock, the
    /// other is told it is taken; the other target's lock keeps its inode, bytes and holder.
    #[test]
    fn two_racing_replacements_of_a_shared_lock_file_leave_one_holder() {
        for round in 0..20 {
            let tmp = tempfile::tempdir().unwrap();
            let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
            crate::fsutil::create_dir(&a).unwrap();
            crate::fsutil::create_dir(&b).unwrap();
            let (a_lock, b_lock) = (a.join("lock"), b.join("lock"));
            let other = open(&a_lock).unwrap();
            write_holder(&other, &a_lock, &me("deploy of a")).unwrap();
            assert!(flock(&other, libc::LOCK_EX | libc::LOCK_NB).unwrap());
            std::fs::hard_link(&a_lock, &b_lock).unwrap();
            let a_bytes = crate::fsutil::read_optional_limited(&a_lock, 1 << 20).unwrap();
            let a_ino = meta(&a_lock).ino();

            let barrier = Arc::new(Barrier::new(2));
            let racers: Vec<_> = (0..2)
                .map(|i| {
                    let (barrier, b_lock) = (barrier.clone(), b_lock.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        acquire(&b_lock, &me(&format!("racer {i}")), Wait::No)
                    })
                })
                .collect();
            let results: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
            let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(won.len(), 1, "round {round}: {results:?}");
            let warning = won[0].1.as_deref().expect("the replacement is named");
            assert!(
                warning.contains(&b_lock.display().to_string()) && warning.contains("hard link"),
                "{warning}"
            );
            for r in &results {
                if let Err(e) = r {
                    assert!(matches!(e, Error::Locked { .. }), "round {round}: {e}");
                }
            }
            // b's lock is a file of its own, and it is held.
            let b_meta = meta(&b_lock);
            assert_eq!(b_meta.nlink(), 1);
            assert_ne!(b_meta.ino(), a_ino);
            let probe = open(&b_lock).unwrap();
            assert!(!flock(&probe, libc::LOCK_EX | libc::LOCK_NB).unwrap());
            // a's lock: the same inode, bytes and holder, still held by a's deploy.
            assert_eq!(meta(&a_lock).ino(), a_ino);
            assert_eq!(meta(&a_lock).nlink(), 1);
            assert_eq!(
                crate::fsutil::read_optional_limited(&a_lock, 1 << 20).unwrap(),
                a_bytes
            );
            let probe = open(&a_lock).unwrap();
            assert!(!flock(&probe, libc::LOCK_EX | libc::LOCK_NB).unwrap());
            // No temp file left.
            let names: Vec<_> = crate::fsutil::read_dir(&b)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, vec![std::ffi::OsString::from("lock")]);
        }
    }

    /// A lock held by the caller's own run (one directory reached under two names) is refused
    /// at once, even by a caller that would wait; another run's lock is waited on or reported
    /// as taken, as is one held by no named run.
    #[test]
    fn a_lock_held_by_the_callers_own_run_is_refused_not_waited_on() {
        let tmp = tempfile::tempdir().unwrap();
        let lock = tmp.path().join("lock");
        let with_run = |what: &str, run: Option<&str>| Holder {
            run: run.map(str::to_string),
            ..me(what)
        };
        let (held, _) = acquire(&lock, &with_run("first", Some("r1")), Wait::No).unwrap();
        let mut told = Vec::new();
        let mut tell = |h: &str| told.push(h.to_string());
        let e = acquire(&lock, &with_run("second", Some("r1")), Wait::Yes(&mut tell)).unwrap_err();
        assert!(
            matches!(&e, Error::HeldByThisRun { path } if *path == lock),
            "{e}"
        );
        assert!(e.to_string().contains("name it once"), "{e}");
        assert!(told.is_empty(), "{told:?}");
        for run in [Some("r2"), None] {
            let e = acquire(&lock, &with_run("other", run), Wait::No).unwrap_err();
            assert!(
                matches!(&e, Error::Locked { holder } if holder.contains("first")),
                "{e}"
            );
        }
        drop(held);
        acquire(&lock, &with_run("after", Some("r1")), Wait::No).unwrap();
    }

    /// The lock file is its owner's alone (a read-only descriptor is enough to `flock` it):
    /// made so, and a looser one from before replaced by a private one when next taken.
    #[test]
    fn the_lock_file_is_private() {
        let tmp = tempfile::tempdir().unwrap();
        let lock = tmp.path().join("lock");
        let mode = |p: &Path| meta(p).mode() & 0o7777;
        drop(acquire(&lock, &me("first"), Wait::No).unwrap());
        assert_eq!(mode(&lock), 0o600);
        std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o644)).unwrap();
        // Someone opened the loose file and keeps it: the next lock is taken on a new inode,
        // which that descriptor cannot lock (it could the old one: a read-only flock).
        let kept = File::open(&lock).unwrap();
        let (held, warning) = acquire(&lock, &me("second"), Wait::No).unwrap();
        assert_eq!(warning, None);
        assert_eq!(mode(&lock), 0o600);
        assert_ne!(meta(&lock).ino(), kept.metadata().unwrap().ino());
        drop(held);
        assert!(flock(&kept, libc::LOCK_EX | libc::LOCK_NB).unwrap());
        let probe = open(&lock).unwrap();
        assert!(flock(&probe, libc::LOCK_EX | libc::LOCK_NB).unwrap());
    }

    /// A forged `since` of either extreme is shown, not an overflow (a panic in a debug build).
    #[test]
    fn a_forged_since_does_not_overflow() {
        for since in [i64::MIN, i64::MAX] {
            let text = Holder {
                since,
                ..me("forged")
            }
            .to_string();
            assert!(text.contains("forged") && text.contains(" s ago"), "{text}");
        }
    }

    /// A caller waiting behind another run's lock gives up as soon as the lock passes to its
    /// own run (its other name of the directory got it first), not when that run lets go.
    #[test]
    fn a_waiter_gives_up_once_its_own_run_takes_the_lock_over() {
        let tmp = tempfile::tempdir().unwrap();
        let lock = tmp.path().join("lock");
        let with_run = |what: &str, run: &str| Holder {
            run: Some(run.to_string()),
            ..me(what)
        };
        let (held, _) = acquire(&lock, &with_run("other run", "r2"), Wait::No).unwrap();
        let (told_tx, told_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        {
            let lock = lock.clone();
            let me = with_run("waiter", "r1");
            std::thread::spawn(move || {
                let mut tell = |h: &str| told_tx.send(h.to_string()).unwrap();
                let _ = done_tx.send(acquire(&lock, &me, Wait::Yes(&mut tell)).map(|_| ()));
            });
        }
        let told = told_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        assert!(told.contains("other run"), "{told}");
        // The lock passes to the waiter's own run: as if r2 let go and r1's other session
        // took it (the same file and flock, its holder rewritten).
        write_holder(&held._file, &lock, &with_run("sibling", "r1")).unwrap();
        let done = done_rx.recv_timeout(std::time::Duration::from_secs(5));
        drop(held);
        let e = done.expect("the waiter still waits").unwrap_err();
        assert!(matches!(e, Error::HeldByThisRun { .. }), "{e}");
    }

    /// A lock this target's own session holds is never replaced, even once it is shared with
    /// another file by a hard link: a second session is told it is taken. Once the first is
    /// done, the next one replaces it.
    #[test]
    fn a_shared_lock_file_this_targets_session_holds_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join(".flip");
        crate::fsutil::create_dir(&state).unwrap();
        let lock = state.join("lock");
        let (first, warned) = acquire(&lock, &me("first"), Wait::No).unwrap();
        assert_eq!(warned, None);
        let ino = meta(&lock).ino();
        let elsewhere = tmp.path().join("copy-of-the-lock");
        std::fs::hard_link(&lock, &elsewhere).unwrap();

        let e = acquire(&lock, &me("second"), Wait::No).unwrap_err();
        assert!(
            matches!(&e, Error::Locked { holder } if holder.contains("first")),
            "{e}"
        );
        assert_eq!(meta(&lock).ino(), ino, "the held lock was not replaced");

        drop(first);
        let (_third, warned) = acquire(&lock, &me("third"), Wait::No).unwrap();
        assert!(warned.is_some_and(|w| w.contains("hard link")));
        assert_ne!(meta(&lock).ino(), ino);
        assert_eq!(meta(&lock).nlink(), 1);
        assert_eq!(meta(&elsewhere).ino(), ino);
        assert_eq!(meta(&elsewhere).nlink(), 1);
    }

    /// A waiter hears a holder when it is new, with the text it was first seen with, and the
    /// same again only once `every` has passed (the age in a holder's text changes every
    /// second: a client shows a holder once by comparing texts). One that does not wait fails
    /// with the holder's text.
    #[test]
    fn a_waiter_hears_a_new_holder_at_once_and_the_same_one_only_every_interval() {
        let every = std::time::Duration::from_secs(10);
        let passed = || std::time::Instant::now().checked_sub(every).unwrap();
        let held = |key: &str, text: &str| Held {
            key: key.into(),
            text: text.into(),
            run: None,
        };
        let mut heard = Vec::new();
        let mut hear = |h: &str| heard.push(h.to_string());
        let mut t = Teller {
            wait: Wait::Yes(&mut hear),
            told: None,
            at: std::time::Instant::now(),
            every,
        };
        t.again();
        t.tell(held("a", "A, 0 s")).unwrap();
        t.tell(held("a", "A, 1 s")).unwrap();
        t.again();
        t.tell(held("b", "B, 0 s")).unwrap();
        t.at = passed();
        t.again();
        t.tell(held("b", "B, 3 s")).unwrap();
        t.at = passed();
        t.tell(held("b", "B, 12 s")).unwrap();
        drop(t);
        assert_eq!(heard, ["A, 0 s", "B, 0 s", "B, 0 s", "B, 0 s"]);
        let mut t = Teller {
            wait: Wait::No,
            told: None,
            at: std::time::Instant::now(),
            every,
        };
        assert!(matches!(
            t.tell(held("a", "A, 0 s")),
            Err(Error::Locked { holder }) if holder == "A, 0 s"
        ));
    }

    /// `flip doctor` looks at a lock with a shared `flock` let go at once: a deploy that
    /// meets it then, while the lock file still names a holder that looks alive (here this
    /// very process), takes the lock instead of failing as "locked".
    #[test]
    fn a_look_at_the_lock_for_an_instant_does_not_fail_a_deploy() {
        let tmp = tempfile::tempdir().unwrap();
        let lock = tmp.path().join("lock");
        drop(acquire(&lock, &me("the last deploy"), Wait::No).unwrap());
        let doctor = open(&lock).unwrap();
        assert!(flock(&doctor, libc::LOCK_SH | libc::LOCK_NB).unwrap());
        let looked = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            drop(doctor);
        });
        let (_held, _) = acquire(&lock, &me("this deploy"), Wait::No).unwrap();
        looked.join().unwrap();
    }
}
