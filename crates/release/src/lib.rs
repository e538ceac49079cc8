//! The target side of a deploy, on disk: a root directory holding releases, the `current`
//! symlink, and flip's own state. Used by the agent; knows nothing of the wire, so everything here
//! is testable on plain directories.
//!
//! ```text
//! ROOT/
//!   current -> releases/7        relative symlink, swapped with one rename(2)
//!   releases/6/  releases/7/     complete releases (unchanged files hard-linked between them)
//!   releases/.staging-8/         a release being built; never live, removed if abandoned
//!   .flip/lock                   flock held by whoever deploys, rolls back, activates or prunes
//!                                (with a shared flock on .flip/; a lock file with other links
//!                                is replaced: see `lock.rs`)
//!   .flip/next-id                the next release id; ids are never reused
//!   .flip/releases/7.manifest    canonical manifest of each kept release
//!   .flip/releases/7.json        its metadata: label, creation time, totals
//!   .flip/releases/7.stat        identity (inode, size, mtime, ctime) of each of its files
//!   .flip/log                    one JSON line per deploy, activation and prune (one with other
//!                                links is restarted, never appended to: [`Root::log`])
//! ```
//!
//! Durability order for a deploy: file data and directories are flushed (`syncfs`), the manifest
//! is recorded, the staging directory is renamed to `releases/<id>` and `releases/` fsynced; only
//! then does [`Root::activate`] swap `current` and fsync the root. `current` therefore always names
//! a complete, verified release.

#![warn(missing_docs, unreachable_pub)]

mod at;
pub mod delta;
pub mod doctor;
mod error;
mod fsutil;
mod hooks;
mod lock;
pub mod passwd;
mod record;
mod shared;
mod stage;

pub use delta::{DeltaApplier, DeltaWriter, PatchDecoder, PatchWriter, PATCH_WINDOW_LOG_MAX};
pub use error::{Error, ErrorClass, Result};
pub use fsutil::{Leftover, MAX_LEFTOVERS};
pub use hooks::HookBaseline;
pub use lock::{Holder, LockGuard, Wait, RETELL};
pub use shared::{resolve_owner, SharedCommit};
pub use stage::{FileWriter, Stage, StageStats, PATCH_BASIS_IN_MEMORY};

use error::io;
use flip_manifest::Manifest;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The directory of complete releases, under the root.
pub const RELEASES: &str = "releases";
/// The symlink naming the live release, under the root.
pub const CURRENT: &str = "current";
/// flip's own state (lock, log, metadata), under the root.
pub const STATE: &str = ".flip";
const STAGING_PREFIX: &str = ".staging-";
const TRASH_PREFIX: &str = ".trash-";
/// The record of what the last cleanup could not remove (JSON list of [`Leftover`]s).
const LEFTOVERS: &str = "leftovers";
/// Largest stored manifest read (as large as a manifest a client may send whole): a bigger
/// `.flip/releases/N.manifest` is damaged, and is never read into memory.
pub const MANIFEST_MAX: u64 = 256 << 20;
/// Largest `.json` metadata or leftovers record read.
const SMALL_FILE_MAX: u64 = 1 << 20;

/// What flip remembers about one release.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReleaseInfo {
    /// The release id.
    pub id: u64,
    /// Its label, if it has one.
    pub label: Option<String>,
    /// Unix seconds.
    pub created: i64,
    /// Regular files in it.
    pub files: u64,
    /// Sum of their sizes.
    pub bytes: u64,
    /// Its manifest's digest, in hex.
    pub manifest_digest: String,
    /// Set when listing: whether `current` points here.
    #[serde(default)]
    pub current: bool,
}

/// A deploy target's root directory.
///
/// Problems found on the way that do not stop the operation (a damaged non-live release, a
/// leftover of an unexpected type, what a cleanup could not remove) are collected as notices:
/// see [`Root::take_warnings`] and [`Root::take_leftovers`].
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
    notices: Arc<Mutex<Notices>>,
}

#[derive(Debug, Default)]
struct Notices {
    warnings: Vec<String>,
    leftovers: Option<Vec<Leftover>>,
}

/// What a deploy would find at a target's directory ([`Root::deployable`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A target (`.flip/` there, its layout as flip makes it).
    Target,
    /// An empty directory, which a deploy makes a target.
    Empty,
    /// Missing: a deploy creates these directories (outermost first, the root last).
    Missing(Vec<PathBuf>),
}

/// What [`Root::open_or_init`] created, so a first deploy that fails can leave the target as it
/// found it ([`Root::undo_init`]).
#[derive(Debug, Clone)]
pub struct Created {
    /// Directories created above and including the root (outermost first); empty when the
    /// root existed (empty).
    dirs: Vec<PathBuf>,
}

impl Root {
    fn at(dir: &Path) -> Root {
        Root {
            dir: dir.to_path_buf(),
            notices: Arc::default(),
        }
    }

    /// Opens an existing flip target. Refuses (naming the path) when one of flip's own
    /// directories or files is a symlink or of the wrong type.
    ///
    /// # Errors
    /// [`Error::Missing`] ([`Error::DanglingSymlink`] for a symlink to nothing),
    /// [`Error::NotADirectory`], [`Error::NotATarget`] (no `.flip/`), [`Error::Layout`] for a
    /// symlink or wrong type, or an I/O error.
    pub fn open(dir: &Path) -> Result<Root> {
        // Follows a symlink to the target on purpose; a missing target is its own error.
        #[allow(clippy::disallowed_methods)]
        let meta = fs::metadata(dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => missing_error(dir),
            _ => io("open", dir)(e),
        })?;
        if !meta.is_dir() {
            return Err(Error::NotADirectory(dir.to_path_buf()));
        }
        let root = Root::at(dir);
        if !expect_dir(&root.state_dir())? {
            return Err(Error::NoTarget(dir.to_path_buf()));
        }
        root.check_layout()?;
        Ok(root)
    }

    /// Opens a target, making a new one when `dir` is missing or empty (and its missing parents
    /// too). A directory that holds other things is refused rather than taken over.
    ///
    /// # Errors
    /// [`Error::NotATarget`] for a directory with other content and no `.flip/`, [`Error::NoParent`]
    /// for a missing parent without `mkpath`, [`Error::Layout`], or an I/O error creating the
    /// layout.
    pub fn open_or_init(dir: &Path) -> Result<Root> {
        Ok(Self::open_or_init_tracked(dir, true)?.0)
    }

    /// What a deploy would find at `dir`, changing nothing: a target (its layout checked), an
    /// empty directory it would take, or a missing one it would create (with its missing
    /// parents, outermost first, when `mkpath`): the checks of [`Root::open_or_init_tracked`],
    /// which a dry run makes too.
    ///
    /// # Errors
    /// [`Error::NotADirectory`] (the target, or a file where a parent must be),
    /// [`Error::DanglingSymlink`] (the target, or the parent it would be made in, a symlink to
    /// nothing), [`Error::NotATarget`] for a directory with other content and no `.flip/`,
    /// [`Error::NoParent`] for a missing parent without `mkpath`, [`Error::Layout`], or an I/O
    /// error.
    pub fn deployable(dir: &Path, mkpath: bool) -> Result<Found> {
        // Follows a symlink to the target on purpose; missing and ENOTDIR are errors of their
        // own, naming the path; the others name it through `io`.
        #[allow(clippy::disallowed_methods)]
        match fs::metadata(dir) {
            Ok(m) if !m.is_dir() => Err(Error::NotADirectory(dir.to_path_buf())),
            Ok(_) => {
                let root = Root::at(dir);
                if expect_dir(&root.state_dir())? {
                    root.check_layout()?;
                    return Ok(Found::Target);
                }
                let mut rd = fsutil::read_dir(dir)?;
                if rd.next().is_some() {
                    // Another deploy making this target may have made `.flip/` (its first)
                    // since the look above.
                    if expect_dir(&root.state_dir())? {
                        root.check_layout()?;
                        return Ok(Found::Target);
                    }
                    return Err(Error::NotATarget(dir.to_path_buf()));
                }
                refuse_inside_target(dir)?;
                Ok(Found::Empty)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut missing: Vec<PathBuf> = dir
                    .ancestors()
                    .take_while(|a| !a.as_os_str().is_empty() && !fsutil::exists_nofollow(a))
                    .map(Path::to_path_buf)
                    .collect();
                missing.reverse();
                // What is there above them must be a directory: a symlink to nothing (the
                // target itself, or a parent) cannot be created through.
                let there = match missing.first() {
                    Some(first) => first.parent().map(Path::to_path_buf),
                    None => Some(dir.to_path_buf()),
                };
                #[allow(clippy::disallowed_methods)]
                if let Some(there) = there.filter(|t| !t.as_os_str().is_empty()) {
                    match fs::metadata(&there) {
                        Ok(m) if m.is_dir() => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            return Err(missing_error(&there))
                        }
                        _ => return Err(Error::NotADirectory(there)),
                    }
                }
                if missing.len() > 1 && !mkpath {
                    return Err(Error::NoParent {
                        dir: dir.to_path_buf(),
                        parent: missing[0].clone(),
                    });
                }
                refuse_inside_target(dir)?;
                Ok(Found::Missing(missing))
            }
            // A file where a parent directory must be: name that file, not the target.
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                let file = dir
                    .ancestors()
                    .skip(1)
                    .find(|a| fsutil::lstat_or_none(a).is_some_and(|m| !m.is_dir()))
                    .unwrap_or(dir);
                Err(Error::NotADirectory(file.to_path_buf()))
            }
            Err(e) => Err(io("open", dir)(e)),
        }
    }

    /// [`Root::open_or_init`], also telling what it created (`None`: the target existed). A
    /// missing `dir` is created when its parent exists (as rsync does); missing parents only
    /// when `mkpath`, else [`Error::NoParent`], so a mistyped path is not silently made.
    ///
    /// # Errors
    /// As [`Root::open_or_init`].
    pub fn open_or_init_tracked(dir: &Path, mkpath: bool) -> Result<(Root, Option<Created>)> {
        let mut created = Created { dirs: Vec::new() };
        match Self::deployable(dir, mkpath)? {
            Found::Target => return Ok((Root::at(dir), None)),
            Found::Empty => {}
            Found::Missing(missing) => {
                fsutil::create_dir_all(dir)?;
                created.dirs = missing;
            }
        }
        let root = Root::at(dir);
        // `.flip/` first: a deploy starting meanwhile finds a target being made (and takes
        // its turn at the lock), never a directory holding someone's `releases/` and no
        // `.flip/`, which it would refuse as not a target.
        fsutil::create_dir_if_missing(root.state_dir())?;
        fault_pause("init-after-state");
        for d in [root.meta_dir(), root.releases_dir()] {
            fsutil::create_dir_if_missing(&d)?;
        }
        root.check_layout()?;
        fsutil::fsync_dir(&root.state_dir())?;
        fsutil::fsync_dir(&root.dir)?;
        Ok((root, Some(created)))
    }

    /// Leaves a target that [`Root::open_or_init_tracked`] created as it was found, provided no
    /// release was ever committed into it: flip's directories go, and so do the directories
    /// created for the root. Best effort: what cannot go stays (and is harmless: an empty
    /// target). Consumes the lock, which is released before the root itself goes.
    pub fn undo_init(&self, created: &Created, lock: LockGuard) {
        let releases = self.releases_dir();
        let empty = fsutil::read_dir(&releases).is_ok_and(|mut rd| rd.next().is_none());
        // Seeds already moved into shared/ (a commit that failed after them) are kept, and so
        // is the target around them: undone, it would be a directory flip refuses to take over.
        if !empty
            || fsutil::exists_nofollow(self.dir.join(CURRENT))
            || fsutil::exists_nofollow(self.shared_dir())
        {
            return;
        }
        let state = self.state_dir();
        fsutil::remove_dir_quietly(self.meta_dir());
        for f in ["next-id", "log", LEFTOVERS, "lock"] {
            fsutil::remove_file_quietly(state.join(f));
        }
        drop(lock);
        fsutil::remove_dir_quietly(&state);
        fsutil::remove_dir_quietly(&releases);
        for d in created.dirs.iter().rev() {
            if !fsutil::remove_dir_quietly(d) {
                break;
            }
        }
    }

    /// Refuses (naming the path) when one of flip's own directories or files is a symlink or
    /// of the wrong type: flip must never stage, commit, prune or delete through a link.
    ///
    /// # Errors
    /// [`Error::Layout`] naming the first path of the wrong type, or an I/O error.
    pub fn check_layout(&self) -> Result<()> {
        let state = self.state_dir();
        expect_dir(&state)?;
        expect_dir(&self.meta_dir())?;
        expect_dir(&self.releases_dir())?;
        // The lock file of another type is replaced when the lock is taken, next-id, log,
        // leftovers and links under it ([`Root::lock`]); until then nothing reads or writes
        // them through a link.
        match fsutil::lstat_or_none(self.dir.join(CURRENT)) {
            Some(m) if !m.file_type().is_symlink() => {
                Err(Error::CurrentNotSymlink(self.dir.join(CURRENT)))
            }
            _ => Ok(()),
        }
    }

    /// Records a warning, sent with the next answer ([`Root::take_warnings`]).
    pub fn warn(&self, message: String) {
        let mut n = self.notices.lock().unwrap_or_else(|e| e.into_inner());
        if !n.warnings.contains(&message) {
            n.warnings.push(message);
        }
    }

    /// The warnings collected since the last call: problems that did not stop the operation (a
    /// damaged release that is not live, an unexpected entry under `releases/`, a damaged id
    /// counter that was rebuilt, ...).
    pub fn take_warnings(&self) -> Vec<String> {
        let mut n = self.notices.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut n.warnings)
    }

    /// What flip could not remove, as of the last cleanup or listing since the last call
    /// (`None`: not looked at since; `Some(empty)`: nothing left over).
    pub fn take_leftovers(&self) -> Option<Vec<Leftover>> {
        let mut n = self.notices.lock().unwrap_or_else(|e| e.into_inner());
        n.leftovers.take()
    }

    fn set_leftovers(&self, list: Vec<Leftover>) {
        let mut n = self.notices.lock().unwrap_or_else(|e| e.into_inner());
        n.leftovers = Some(list);
    }

    /// The leftovers recorded by the last cleanup that still exist.
    pub fn recorded_leftovers(&self) -> Vec<Leftover> {
        let path = self.state_dir().join(LEFTOVERS);
        let list: Vec<Leftover> = match fsutil::read_optional_limited(&path, SMALL_FILE_MAX) {
            Ok(Some(b)) => match serde_json::from_slice(&b) {
                Ok(l) => l,
                Err(e) => {
                    self.warn(format!("{} is damaged ({e}); ignored", path.display()));
                    Vec::new()
                }
            },
            Ok(None) => Vec::new(),
            Err(e) => {
                self.warn(format!("{e}; ignored"));
                Vec::new()
            }
        };
        // Only what a cleanup of this target can have left: paths under its root (a record
        // naming anything else was not written by flip, and is not looked at).
        list.into_iter()
            .filter(|l| l.path.starts_with(&self.dir))
            .filter(|l| fsutil::exists_nofollow(&l.path))
            .take(MAX_LEFTOVERS + 1)
            .collect()
    }

    /// The target root.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    fn meta_dir(&self) -> PathBuf {
        self.state_dir().join("releases")
    }

    /// `ROOT/releases`.
    pub fn releases_dir(&self) -> PathBuf {
        self.dir.join(RELEASES)
    }

    /// `ROOT/releases/<id>`.
    pub fn release_dir(&self, id: u64) -> PathBuf {
        self.releases_dir().join(id.to_string())
    }

    fn manifest_path(&self, id: u64) -> PathBuf {
        self.meta_dir().join(format!("{id}.manifest"))
    }

    fn info_path(&self, id: u64) -> PathBuf {
        self.meta_dir().join(format!("{id}.json"))
    }

    /// (inode, size, mtime, ctime) of every file of a release as committed: what lets the next
    /// deploy tell an intact file it may hard-link from one that was replaced or written to
    /// since (anything else is hashed first).
    fn stat_path(&self, id: u64) -> PathBuf {
        self.meta_dir().join(format!("{id}.stat"))
    }

    /// Takes the deploy lock for the lifetime of the guard.
    /// Checks flip's layout before and again under the lock (refusing a symlink or a wrong
    /// type, see [`Root::check_layout`]). A lock file shared with another file by a hard link
    /// is replaced by one of this target's own (with a warning), unless a session of this
    /// target holds it; one of another type (a symlink, a FIFO, a directory) is replaced too,
    /// never opened nor followed (a directory is moved aside to `lock.aside-SECONDS`).
    ///
    /// # Errors
    /// [`Error::Locked`] (naming the holder) when someone holds it and `wait` does not wait,
    /// [`Error::Layout`], or an I/O error.
    pub fn lock(&self, me: &Holder, wait: Wait<'_>) -> Result<LockGuard> {
        self.check_layout()?;
        let (guard, replaced) = lock::acquire(&self.state_dir().join("lock"), me, wait)?;
        if let Some(w) = replaced {
            self.warn(w);
        }
        self.check_layout()?;
        self.replace_odd_state_files()?;
        // flip's own directories, if lost, are made again rather than failing every deploy;
        // said only of a target that had them (an id handed out): in one that another deploy
        // is making, they may just not be made yet.
        let had = fsutil::exists_nofollow(self.state_dir().join("next-id"));
        for d in [self.releases_dir(), self.meta_dir()] {
            if fsutil::create_dir_if_missing(&d)? && had {
                self.warn(format!("{} was missing; made again", d.display()));
            }
        }
        fault_point("after-lock");
        Ok(guard)
    }

    /// `.flip/next-id`, `log`, `leftovers` and `links` of another type than a regular file (a symlink a
    /// user made to keep the log elsewhere, a FIFO, a directory) would fail every deploy: under
    /// the lock, anything but a directory is removed itself (never followed: what a symlink
    /// names is untouched), a directory is moved aside (`NAME.aside-SECONDS`), each named in a
    /// warning. flip then makes its own file again (the id counter rebuilt from every id
    /// found).
    fn replace_odd_state_files(&self) -> Result<()> {
        let state = self.state_dir();
        let mut changed = false;
        for f in ["next-id", "log", LEFTOVERS, "links"] {
            let path = state.join(f);
            let Some(m) = fsutil::lstat_or_none(&path) else {
                continue;
            };
            if m.is_file() {
                continue;
            }
            changed = true;
            let what = fsutil::described(&path, &m);
            if m.is_dir() {
                let aside = fsutil::aside_path(&path);
                fsutil::move_aside(&path, &aside)?;
                self.warn(format!(
                    "{} was {what}, not flip's file: moved aside to {}; flip makes its own",
                    path.display(),
                    aside.display()
                ));
            } else {
                fsutil::remove_file_if_any(&path)?;
                self.warn(format!(
                    "{} was {what}, not flip's file: removed (never followed); flip makes its own",
                    path.display()
                ));
            }
        }
        match changed {
            true => fsutil::fsync_dir(&state),
            false => Ok(()),
        }
    }

    /// The release `current` points to, if any. A `current` that points elsewhere (not to a
    /// release of this target: a maintenance page, a directory of another tool) names none:
    /// nothing of flip's is live, which a warning says (see [`Root::take_warnings`]), and the
    /// next activation replaces it; [`Root::current_link`] tells it apart.
    ///
    /// # Errors
    /// [`Error::CurrentNotSymlink`], [`Error::Layout`] for a release path that is not a
    /// directory, or an I/O error reading it.
    pub fn current(&self) -> Result<Option<u64>> {
        match self.current_link()? {
            CurrentLink::Missing => Ok(None),
            CurrentLink::Release(id) => Ok(Some(id)),
            CurrentLink::Foreign(target) => {
                self.warn(format!(
                    "{} points to {target:?}, not to a release flip made: nothing of flip's is live, and the next activation replaces it",
                    self.dir.join(CURRENT).display()
                ));
                Ok(None)
            }
        }
    }

    /// The live release, for what needs one (a rollback, a check of what is live).
    ///
    /// # Errors
    /// [`Error::NothingLive`] without `current`, [`Error::CurrentForeign`] for a `current`
    /// naming no release of this target, or what [`Root::current_link`] returns.
    pub fn live(&self) -> Result<u64> {
        match self.current_link()? {
            CurrentLink::Release(id) => Ok(id),
            CurrentLink::Missing => Err(Error::NothingLive(self.dir.clone())),
            CurrentLink::Foreign(target) => Err(Error::CurrentForeign {
                path: self.dir.join(CURRENT),
                target,
            }),
        }
    }

    /// What `current` is: missing, a release of this target, or a symlink to anything else.
    /// A release is named as flip writes it (`releases/N`), and also as people and other tools
    /// do by hand: `./releases/N`, `releases/N/`, or an absolute path into this target's own
    /// `releases/` (however the target is reached: the directory is compared, not the text).
    ///
    /// # Errors
    /// [`Error::CurrentNotSymlink`], [`Error::Layout`] for a release path that is not a
    /// directory, or an I/O error reading it.
    pub fn current_link(&self) -> Result<CurrentLink> {
        let link = self.dir.join(CURRENT);
        let Some(meta) = fsutil::symlink_metadata_if_any(&link)? else {
            return Ok(CurrentLink::Missing);
        };
        if !meta.file_type().is_symlink() {
            return Err(Error::CurrentNotSymlink(link));
        }
        let target = fsutil::read_link(&link)?;
        let target = target.to_string_lossy().into_owned();
        match self.release_named(&target) {
            Some(id) => {
                let dir = self.release_dir(id);
                match fsutil::lstat_or_none(&dir) {
                    Some(m) if !m.is_dir() => Err(Error::Layout {
                        path: dir,
                        found: fsutil::kind_of(&m),
                        expected: "a release directory",
                    }),
                    _ => Ok(CurrentLink::Release(id)),
                }
            }
            None => Ok(CurrentLink::Foreign(target)),
        }
    }

    /// The release a symlink target in the root names (see [`Root::current_link`]).
    fn release_named(&self, target: &str) -> Option<u64> {
        let t = target.trim_end_matches('/');
        let t = t.strip_prefix("./").unwrap_or(t);
        if let Some(id) = t.strip_prefix("releases/").and_then(parse_id) {
            return Some(id);
        }
        let p = Path::new(t);
        let id = parse_id(p.file_name()?.to_str()?)?;
        let parent = p.parent().filter(|_| p.is_absolute())?;
        // The same directory as this root's releases/: followed on purpose, only looked at.
        #[allow(clippy::disallowed_methods)]
        let same = match (fs::metadata(parent), fs::metadata(self.releases_dir())) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        same.then_some(id)
    }

    /// Complete releases (directory and manifest both present), oldest first. A release whose
    /// metadata is missing or damaged, and an entry of an unexpected type under `releases/`,
    /// are left out with a warning (see [`Root::take_warnings`]); the leftovers the last cleanup
    /// recorded are looked up too (see [`Root::take_leftovers`]).
    ///
    /// # Errors
    /// An I/O error listing `releases/` (a damaged release is a warning, not an error).
    pub fn releases(&self) -> Result<Vec<ReleaseInfo>> {
        let current = self.current().ok().flatten();
        let mut out = Vec::new();
        for id in self.release_ids()? {
            match self.info(id) {
                Ok(mut info) => {
                    info.current = Some(id) == current;
                    // A release whose manifest is not the one recorded at commit can be neither
                    // rolled back to nor checked: left out (the live one too: it is what a
                    // client diffs against, and the next deploy sends its whole manifest
                    // instead of failing). Read whole: a few milliseconds for the releases
                    // kept of a tree of tens of thousands of files.
                    if let Err(e) = self.manifest_intact(&info) {
                        let which = if info.current {
                            "live release"
                        } else {
                            "release"
                        };
                        self.warn(format!("{which} {id} is not listed: {e}"));
                        continue;
                    }
                    out.push(info);
                }
                Err(Error::NoSuchRelease(_)) => self.warn(format!(
                    "{} has no complete metadata in {} (.json and .manifest); not listed",
                    self.release_dir(id).display(),
                    self.meta_dir().display()
                )),
                Err(e) => self.warn(format!("release {id} is not listed: {e}")),
            }
        }
        let leftovers = self.recorded_leftovers();
        let mut n = self.notices.lock().unwrap_or_else(|e| e.into_inner());
        if n.leftovers.is_none() {
            n.leftovers = Some(leftovers);
        }
        Ok(out)
    }

    /// Ids of the directories under releases/ named by a number, ascending. A numbered entry
    /// that is not a real directory is left out with a warning, never followed.
    fn release_ids(&self) -> Result<Vec<u64>> {
        let dir = self.releases_dir();
        let mut ids = Vec::new();
        for e in fsutil::read_dir(&dir)? {
            let e = e.map_err(io("read", &dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let flip_named = name.starts_with(STAGING_PREFIX) || name.starts_with(TRASH_PREFIX);
            let id = parse_id(name);
            if id.is_none() && !flip_named {
                // Not flip's (a backup someone put there, another tool's release): named, and
                // left as it is (a temp file of flip's own is the cleanup's).
                if !is_temp(name) {
                    self.warn(format!(
                        "{} is not a release flip made (releases are numbered): never listed, rolled back to, pruned or removed",
                        e.path().display()
                    ));
                }
                continue;
            }
            match e.file_type() {
                Ok(t) if t.is_dir() => ids.extend(id),
                Ok(_) => {
                    let path = e.path();
                    let kind = fsutil::lstat_or_none(&path)
                        .map(|m| fsutil::kind_of(&m))
                        .unwrap_or("gone");
                    self.warn(format!(
                        "{} is {kind}, not a directory flip made; ignored{}",
                        path.display(),
                        if flip_named {
                            " (removed at the next cleanup)"
                        } else {
                            ""
                        }
                    ));
                }
                Err(e) => self.warn(format!("{}: {e}", e_path(&dir, name))),
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Metadata of a complete release.
    ///
    /// # Errors
    /// [`Error::NoSuchRelease`] unless its metadata, directory and manifest are there,
    /// [`Error::Layout`] for a manifest that is not a regular file, [`Error::Corrupt`] for
    /// metadata that does not parse, or an I/O error.
    pub fn info(&self, id: u64) -> Result<ReleaseInfo> {
        let path = self.info_path(id);
        let Some(bytes) = fsutil::read_optional_limited(&path, SMALL_FILE_MAX)? else {
            return Err(Error::NoSuchRelease(id));
        };
        self.release_dir_checked(id)?;
        match fsutil::lstat_or_none(self.manifest_path(id)) {
            Some(m) if m.is_file() => {}
            Some(m) => {
                return Err(Error::Layout {
                    path: self.manifest_path(id),
                    found: fsutil::kind_of(&m),
                    expected: "a regular file",
                })
            }
            None => return Err(Error::NoSuchRelease(id)),
        }
        serde_json::from_slice(&bytes).map_err(|e| fsutil::corrupt(&path, e.to_string()))
    }

    /// `ROOT/releases/<id>`, a real directory: [`Error::NoSuchRelease`] when missing,
    /// [`Error::Layout`] naming what it is instead (a symlink is never followed).
    fn release_dir_checked(&self, id: u64) -> Result<PathBuf> {
        let dir = self.release_dir(id);
        match expect_dir(&dir)? {
            true => Ok(dir),
            false => Err(Error::NoSuchRelease(id)),
        }
    }

    /// The stored manifest of a complete release.
    ///
    /// # Errors
    /// [`Error::NoSuchRelease`] when no manifest is stored, [`Error::Layout`] for a symlink or
    /// anything but a regular file there, [`Error::Corrupt`] for one that does not decode (or
    /// is larger than a manifest can be), or an I/O error.
    pub fn manifest(&self, id: u64) -> Result<Manifest> {
        let path = self.manifest_path(id);
        let bytes =
            fsutil::read_optional_limited(&path, MANIFEST_MAX)?.ok_or(Error::NoSuchRelease(id))?;
        flip_manifest::decode(&bytes).map_err(|e| fsutil::corrupt(&path, e.to_string()))
    }

    /// The stored manifest's canonical bytes (what the agent sends to a client).
    ///
    /// # Errors
    /// As [`Root::manifest`], except that the bytes are not decoded.
    pub fn manifest_bytes(&self, id: u64) -> Result<Vec<u8>> {
        fsutil::read_optional_limited(&self.manifest_path(id), MANIFEST_MAX)?
            .ok_or(Error::NoSuchRelease(id))
    }

    /// The newest complete release older than `current`: what a rollback goes to.
    /// Releases whose stored manifest does not match the digest their metadata recorded are
    /// not listed ([`Root::releases`], with a warning), so never chosen; the activation checks
    /// the chosen one's manifest again.
    ///
    /// # Errors
    /// [`Error::NothingToRollBack`] when no intact release is older than `current`, or an I/O
    /// error.
    pub fn rollback_target(&self, current: u64) -> Result<u64> {
        Self::rollback_target_in(&self.releases()?, current)
    }

    /// [`Root::rollback_target`] among `releases`, a listing already made (oldest first).
    fn rollback_target_in(releases: &[ReleaseInfo], current: u64) -> Result<u64> {
        releases
            .iter()
            .rev()
            .find(|r| r.id < current)
            .map(|r| r.id)
            .ok_or(Error::NothingToRollBack { current })
    }

    /// Checks that a release's stored manifest hashes to the digest its metadata recorded
    /// (streaming: memory stays small whatever the manifest's size).
    fn manifest_intact(&self, r: &ReleaseInfo) -> Result<()> {
        use std::io::Read;
        let path = self.manifest_path(r.id);
        let f = fsutil::open_with("read", &fsutil::read_own(), &path)?;
        let meta = f.metadata().map_err(io("inspect", &path))?;
        if !meta.is_file() {
            return Err(Error::Layout {
                path,
                found: fsutil::kind_of(&meta),
                expected: "a regular file",
            });
        }
        let len = meta.len();
        if len > MANIFEST_MAX {
            return Err(fsutil::corrupt(
                &path,
                format!("{len} bytes, more than the {MANIFEST_MAX} a manifest can have"),
            ));
        }
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut f = std::io::BufReader::new(f);
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    h.update(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io("read", &path)(e)),
            }
        }
        if h.finalize().to_hex().as_str() != r.manifest_digest {
            return Err(fsutil::corrupt(
                &path,
                "does not match the digest recorded at commit",
            ));
        }
        Ok(())
    }

    /// Points `current` at release `id` atomically (symlink at a temp name, rename over
    /// `current`, fsync the root). Returns the release that was live before.
    /// Refuses a release whose stored manifest is not the one recorded at its commit (then
    /// nothing can tell whether its tree is complete): an explicit `rollback --to` or `activate`
    /// as much as the rollback that skips it.
    ///
    /// # Errors
    /// [`Error::NoSuchRelease`], [`Error::Corrupt`] for a release whose manifest is not the one
    /// recorded, or an I/O error (`current` is then unchanged).
    pub fn activate(&self, _lock: &LockGuard, id: u64) -> Result<Option<u64>> {
        let info = self.info(id)?;
        self.manifest_intact(&info)?;
        let previous = self.current()?;
        let link = self.dir.join(CURRENT);
        let tmp = self
            .dir
            .join(format!(".{CURRENT}.tmp-{}", std::process::id()));
        fsutil::remove_file_quietly(&tmp);
        std::os::unix::fs::symlink(format!("{RELEASES}/{id}"), &tmp)
            .map_err(io("create the symlink", &tmp))?;
        fault_point("before-swap");
        if let Err(e) = fsutil::rename("swap", &tmp, &link) {
            fsutil::remove_file_quietly(&tmp);
            return Err(e);
        }
        fault_point("after-swap");
        fsutil::fsync_dir(&self.dir)?;
        Ok(previous)
    }

    /// The releases a [`Root::prune`] keeping `keep` would remove now, ascending: all but the
    /// `keep` newest, never the live one or the one a rollback would go back to; and a release
    /// whose metadata is damaged or missing (left out of [`Root::releases`]) once it is older
    /// than every release kept.
    ///
    /// # Errors
    /// An I/O error reading the releases or `current`.
    pub fn prunable(&self, keep: usize) -> Result<Vec<u64>> {
        let releases = self.releases()?;
        let current = self.current()?;
        let protected: Vec<u64> = match current {
            Some(c) => std::iter::once(c)
                .chain(Self::rollback_target_in(&releases, c).ok())
                .collect(),
            None => Vec::new(),
        };
        let mut kept = 0usize;
        let mut doomed = Vec::new();
        let mut oldest_kept = u64::MAX;
        for r in releases.iter().rev() {
            if protected.contains(&r.id) || kept < keep {
                kept += 1;
                oldest_kept = oldest_kept.min(r.id);
            } else {
                doomed.push(r.id);
            }
        }
        // A release left out of the listing (its metadata damaged or missing: it can be neither
        // rolled back to nor checked) goes once it is older than every release kept, else it
        // would stay, and be warned about, forever. Never the live one.
        if kept > 0 {
            let listed: std::collections::BTreeSet<u64> = releases.iter().map(|r| r.id).collect();
            doomed.extend(
                self.release_ids()?
                    .into_iter()
                    .filter(|id| *id < oldest_kept && !listed.contains(id) && Some(*id) != current),
            );
        }
        doomed.sort_unstable();
        Ok(doomed)
    }

    /// Removes the oldest releases so that `keep` remain, never the live one nor the one a
    /// rollback would pick. Returns the ids removed. A release is gone (from the listing, and
    /// its metadata) once it is renamed to trash; whatever of its tree cannot be deleted (a file
    /// the deploy user may not remove) stays in `releases/.trash-<id>`, is named (see
    /// [`Root::take_leftovers`]) and retried at the next cleanup: it never fails the prune.
    ///
    /// # Errors
    /// An I/O error reading the listing or `current`; what cannot be deleted is a leftover, not an
    /// error.
    pub fn prune(&self, lock: &LockGuard, keep: usize) -> Result<Vec<u64>> {
        let doomed = self.prunable(keep)?;
        // Deleting a release's tree changes the ctime and link count of inodes the releases
        // that stay share with it: the link ledger learns their new state, for the files that
        // were as expected before.
        let unlinks = (!doomed.is_empty()).then(|| {
            let at: Vec<(u64, PathBuf)> = doomed
                .iter()
                .map(|&id| (id, self.release_dir(id)))
                .collect();
            self.before_unlink(&at)
        });
        let mut removed = Vec::new();
        for id in doomed {
            match self.retire_release(id) {
                Ok(()) => removed.push(id),
                Err(e) => self.warn(format!("release {id} was not pruned: {e}")),
            }
        }
        if let Some(u) = unlinks {
            let trash: Vec<PathBuf> = removed.iter().map(|id| self.trash_dir(*id)).collect();
            self.unlink_shared(u, &trash);
        }
        fault_pause("prune-before-delete");
        self.clean_leftovers(lock)?;
        Ok(removed)
    }

    /// Removes release `id`, which must not be live (a release committed by a multi-host
    /// deploy that failed elsewhere): renamed to trash, forgotten, and its tree deleted by the
    /// cleanup that follows (what cannot be deleted is named, as for a prune).
    ///
    /// # Errors
    /// [`Error::NoSuchRelease`], [`Error::BadRequest`] for the live release, or an I/O error
    /// renaming it.
    pub fn discard(&self, lock: &LockGuard, id: u64) -> Result<()> {
        self.info(id)?;
        if self.current()? == Some(id) {
            return Err(Error::BadRequest(format!(
                "release {id} is live: it is not discarded"
            )));
        }
        let unlinks = self.before_unlink(&[(id, self.release_dir(id))]);
        self.retire_release(id)?;
        self.unlink_shared(unlinks, &[self.trash_dir(id)]);
        self.clean_leftovers(lock)?;
        Ok(())
    }

    /// `ROOT/releases/.trash-<id>`: where a pruned or discarded release's tree waits to be
    /// deleted.
    fn trash_dir(&self, id: u64) -> PathBuf {
        self.releases_dir().join(format!("{TRASH_PREFIX}{id}"))
    }

    /// Makes a release disappear atomically (rename to trash) and forgets it; its tree is
    /// deleted by the cleanup that follows.
    fn retire_release(&self, id: u64) -> Result<()> {
        let dir = self.release_dir(id);
        let trash = self.trash_dir(id);
        if fsutil::exists_nofollow(&trash) {
            // A trash of the same id cannot exist (ids are never reused), unless put there.
            return Err(Error::Layout {
                path: trash,
                found: "already present",
                expected: "free for the release being pruned",
            });
        }
        fsutil::move_aside(&dir, &trash)?;
        fsutil::fsync_dir(&self.releases_dir())?;
        fault_point("prune-after-trash");
        for p in [
            self.manifest_path(id),
            self.info_path(id),
            self.stat_path(id),
            self.hooks_path(id),
        ] {
            if let Err(e) = fsutil::remove_file_if_any(&p) {
                self.warn(format!("{e}"));
            }
        }
        fault_point("prune-after-forget");
        Ok(())
    }

    /// Removes what an interrupted run or an earlier cleanup left behind: staging and trash
    /// directories, state of releases whose directory never appeared, and temp files of
    /// interrupted writes (`.next-id.tmp-*`, `.7.manifest.tmp-*`, `.current.tmp-*`). Never
    /// fails on one entry: what it cannot remove is named (path, cause) in the leftovers (see
    /// [`Root::take_leftovers`], also recorded in `.flip/leftovers` for listings) and retried at
    /// the next cleanup. Returns the names removed.
    ///
    /// # Errors
    /// An I/O error listing the directories to clean; what cannot be removed is a leftover.
    pub fn clean_leftovers(&self, _lock: &LockGuard) -> Result<Vec<String>> {
        let dir = self.releases_dir();
        let mut removed = Vec::new();
        let mut left = fsutil::LeftoverList::default();
        for e in fsutil::read_dir(&dir)? {
            let e = e.map_err(io("read", &dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with(STAGING_PREFIX) || name.starts_with(TRASH_PREFIX)) {
                continue;
            }
            let path = e.path();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if !is_dir {
                // Not something flip made: removed as the link or file it is, never followed.
                // The leftover names the path; its error is the cause alone.
                #[allow(clippy::disallowed_methods)]
                match fs::remove_file(&path) {
                    Ok(()) => {
                        self.warn(format!(
                            "removed {}, which was not a directory flip made",
                            path.display()
                        ));
                        removed.push(name);
                    }
                    Err(err) => left.push(&path, err),
                }
            } else {
                // A staging tree left by an interrupted deploy holds links to the live
                // release's inodes: the ledger learns their state once those names are gone.
                // Its names of inodes that stay are removed first, and the ledger learns
                // their state (a prune that crashed after renaming a release to trash).
                let u = match name.strip_prefix(TRASH_PREFIX).and_then(parse_id) {
                    Some(id) => Some(self.before_unlink(&[(id, path.clone())])),
                    None if name.starts_with(STAGING_PREFIX) => {
                        Some(self.before_unlink_staging(&path))
                    }
                    None => None,
                };
                if let Some(u) = u {
                    self.unlink_shared(u, std::slice::from_ref(&path));
                }
                if fsutil::remove_tree_reporting(&path, &mut left) {
                    removed.push(name);
                }
            }
        }
        let meta = self.meta_dir();
        for e in fsutil::read_dir(&meta)? {
            let e = e.map_err(io("read", &meta))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.split('.').next().and_then(|s| s.parse::<u64>().ok());
            let orphan = id.is_some_and(|id| {
                !fsutil::lstat_or_none(self.release_dir(id)).is_some_and(|m| m.is_dir())
            });
            if orphan || is_temp(&name) {
                self.remove_file_noting(&e, &mut left, &mut removed, ".flip/releases/");
            }
        }
        for (d, prefix) in [(self.state_dir(), ".flip/"), (self.dir.clone(), "")] {
            // The leftover names the path; its error is the cause alone.
            #[allow(clippy::disallowed_methods)]
            let rd = match fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(err) => {
                    left.push(&d, err);
                    continue;
                }
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let ours = if prefix.is_empty() {
                    name.starts_with(&format!(".{CURRENT}.tmp-"))
                } else {
                    is_temp(&name)
                };
                if ours {
                    self.remove_file_noting(&e, &mut left, &mut removed, prefix);
                }
            }
        }
        let list = left.into_vec(&dir);
        self.record_leftovers(&list);
        self.set_leftovers(list);
        Ok(removed)
    }

    fn remove_file_noting(
        &self,
        e: &fs::DirEntry,
        left: &mut fsutil::LeftoverList,
        removed: &mut Vec<String>,
        prefix: &str,
    ) {
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            left.push(&path, "a directory where flip keeps files; not removed");
            return;
        }
        // The leftover names the path; its error is the cause alone.
        #[allow(clippy::disallowed_methods)]
        match fs::remove_file(&path) {
            Ok(()) => removed.push(format!("{prefix}{}", e.file_name().to_string_lossy())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => left.push(&path, err),
        }
    }

    /// Keeps `.flip/leftovers` equal to `list` (absent when empty). Failing to record is a
    /// warning: the leftovers are still reported to this session.
    fn record_leftovers(&self, list: &[Leftover]) {
        let path = self.state_dir().join(LEFTOVERS);
        let r = if list.is_empty() {
            fsutil::remove_file_if_any(&path).map(|_| ())
        } else {
            fsutil::write_atomic(&path, &serde_json::to_vec(list).expect("json"))
        };
        if let Err(e) = r {
            self.warn(format!("cannot record the leftovers: {e}"));
        }
    }

    /// Takes the next release id and records that it is taken before anything uses it, so no id
    /// is ever handed out twice, whatever happens to the deploy that got it. A damaged counter
    /// is rebuilt (with a warning) from every id still found on the target: releases, staging
    /// and trash directories, metadata, and the log.
    fn allocate_id(&self) -> Result<u64> {
        let path = self.state_dir().join("next-id");
        let stored = match fsutil::read_optional_limited(&path, 64) {
            Ok(Some(b)) => match String::from_utf8_lossy(&b).trim().parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => {
                    self.warn(format!(
                        "{} is damaged (not a number); rebuilt from the ids found on the target",
                        path.display()
                    ));
                    None
                }
            },
            Ok(None) => None,
            Err(e @ Error::Layout { .. }) => return Err(e),
            Err(e) => {
                self.warn(format!("{e}; rebuilt from the ids found on the target"));
                None
            }
        };
        let on_disk = self.ids_on_disk()?;
        let mut seen = on_disk.last().copied();
        if stored.is_none() {
            seen = seen.max(self.highest_id_in_log());
        }
        let exhausted = |last| Error::IdsExhausted {
            path: path.clone(),
            last,
        };
        let usual = seen
            .map_or(Some(1), |m| m.checked_add(1))
            .map(|after_seen| stored.unwrap_or(1).max(after_seen).max(1))
            .filter(|id| *id < u64::MAX);
        let id = match (usual, stored) {
            (Some(id), _) => id,
            // Something is named with one of the last ids, which flip never handed out here
            // (the counter is below it): one stray directory must not stop every deploy. Ids go
            // on from the counter (and the log), past every id a name on the target takes.
            (None, Some(counter)) if counter < u64::MAX => {
                let floor = counter
                    .max(self.highest_id_in_log().map_or(1, |l| l.saturating_add(1)))
                    .max(1);
                let mut id = floor;
                while on_disk.contains(&id) {
                    id = id.checked_add(1).ok_or_else(|| exhausted(id))?;
                }
                self.warn(format!(
                    "{} or {} holds an entry named with release id {}, at the end of the ids, \
                     which flip never handed out here ({} holds {counter}); ids go on from \
                     {id} (remove the entry if it is not flip's)",
                    self.releases_dir().display(),
                    self.meta_dir().display(),
                    seen.unwrap_or(u64::MAX),
                    path.display()
                ));
                id
            }
            (None, _) => return Err(exhausted(u64::MAX)),
        };
        let next = id.checked_add(1).ok_or_else(|| exhausted(id))?;
        fsutil::write_atomic(&path, format!("{next}\n").as_bytes())?;
        fault_point("after-id");
        Ok(id)
    }

    /// Every id named by a release, staging or trash directory or a metadata file.
    fn ids_on_disk(&self) -> Result<std::collections::BTreeSet<u64>> {
        let mut ids = std::collections::BTreeSet::new();
        for d in [self.releases_dir(), self.meta_dir()] {
            for e in fsutil::read_dir(&d)? {
                let e = e.map_err(io("read", &d))?;
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                let name = name
                    .strip_prefix(STAGING_PREFIX)
                    .or_else(|| name.strip_prefix(TRASH_PREFIX))
                    .unwrap_or(name);
                if let Some(id) = name.split('.').next().and_then(|s| s.parse::<u64>().ok()) {
                    ids.insert(id);
                }
            }
        }
        Ok(ids)
    }

    /// The highest release id `.flip/log` mentions (read line by line; damaged lines skipped).
    fn highest_id_in_log(&self) -> Option<u64> {
        use std::io::{BufRead, Read};
        let path = self.state_dir().join("log");
        let f = fsutil::open_with("open", &fsutil::read_own(), &path).ok()?;
        let mut max = None;
        let mut r = std::io::BufReader::new(f);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.by_ref().take(1 << 20).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            let ids = v["release"].as_u64().into_iter().chain(
                v["removed"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_u64()),
            );
            max = max.max(ids.max());
        }
        max
    }

    /// Appends one JSON line to `.flip/log`. Failures to log are reported, not fatal to callers
    /// that choose to ignore them.
    ///
    /// Only ever into a log of this target's own: a log that shares its inode with another file
    /// (a hard link: appending would write into that file too) or that is not a regular file is
    /// not written to; a new log, starting with a `log-restarted` line that says why, is renamed
    /// over it (with a warning naming the path).
    ///
    /// # Errors
    /// An I/O error opening or writing the log.
    pub fn log(&self, event: &serde_json::Value) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let path = self.state_dir().join("log");
        let mut line = serde_json::to_vec(event).map_err(|e| io("write", &path)(e.into()))?;
        line.push(b'\n');
        let why = match fsutil::lstat_or_none(&path) {
            Some(m) if !m.is_file() => Some(format!("it was {}", fsutil::kind_of(&m))),
            Some(m) if m.nlink() > 1 => Some(shared_why(m.nlink())),
            _ => None,
        };
        if let Some(why) = why {
            return self.restart_log(&path, &why, &line);
        }
        let mut f = fsutil::open_with(
            "open",
            fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o644)
                .custom_flags(fsutil::OWN_FILE_FLAGS),
            &path,
        )?;
        // Looked at again through the descriptor: linked or swapped since the look above.
        let m = f.metadata().map_err(io("stat", &path))?;
        if !m.is_file() || m.nlink() > 1 {
            drop(f);
            let why = if m.is_file() {
                shared_why(m.nlink())
            } else {
                format!("it was {}", fsutil::kind_of(&m))
            };
            return self.restart_log(&path, &why, &line);
        }
        f.write_all(&line).map_err(io("append to", &path))
    }

    /// Renames a new log over `path`: a `log-restarted` line saying `why`, then `line`.
    fn restart_log(&self, path: &Path, why: &str, line: &[u8]) -> Result<()> {
        let reason = format!("{why}; the old log was left as it was and is no longer written to");
        let mut first = serde_json::to_vec(&serde_json::json!({
            "time": fsutil::now(), "event": "log-restarted", "reason": reason,
        }))
        .map_err(|e| io("write", path)(e.into()))?;
        first.push(b'\n');
        first.extend_from_slice(line);
        fsutil::write_atomic(path, &first)?;
        self.warn(format!(
            "{}: {reason}; a new log was started",
            path.display()
        ));
        Ok(())
    }
    /// Re-reads a release and compares it with its manifest. Returns the differences found.
    /// What its hooks wrote (recorded by [`Root::record_hook_writes`], unchanged since) is
    /// not a difference: it is named in a warning.
    ///
    /// # Errors
    /// As [`Root::manifest`]; the differences found are the result, not errors.
    pub fn verify(&self, id: u64) -> Result<Vec<String>> {
        // A release directory replaced by a symlink is refused, never followed.
        let dir = self.release_dir_checked(id)?;
        let manifest = self.manifest(id)?;
        let diffs = stage::tree_differences(&dir, &manifest, &[]);
        Ok(self.without_hook_writes(id, &dir, &manifest, diffs, true))
    }

    /// How release `id` (its tree at `dir`, its `manifest`) differs from what was committed:
    /// [`stage::tree_differences`], where a file whose inode is exactly as recorded at commit
    /// (`.flip/releases/N.stat`, with the link ledger's later ctime and link count) is not read.
    fn differences_since_commit(
        &self,
        id: u64,
        dir: &Path,
        manifest: &Manifest,
    ) -> Vec<(String, String)> {
        let stamps = self.expected_stamps(id, manifest);
        stage::tree_differences(dir, manifest, &stamps)
    }

    /// Refuses release `id` when its tree is no longer what was committed (a file edited,
    /// chmodded, removed or added in place since; what its hooks wrote is not a difference):
    /// what a rollback or an `activate` checks before making an older release live again.
    /// The same comparison as [`Root::verify`], but a file whose inode is exactly as recorded
    /// at commit (`.flip/releases/N.stat`, with the link ledger's later ctime and link count)
    /// is not read: a walk and a `stat` per entry, plus a hash of each file that changed.
    ///
    /// # Errors
    /// [`Error::Changed`] naming the first differences, or as [`Root::manifest`].
    pub fn check_unchanged(&self, id: u64) -> Result<()> {
        let dir = self.release_dir_checked(id)?;
        let manifest = self.manifest(id)?;
        let diffs = self.differences_since_commit(id, &dir, &manifest);
        let problems = self.without_hook_writes(id, &dir, &manifest, diffs, false);
        if problems.is_empty() {
            return Ok(());
        }
        const NAMED: usize = 3;
        let more = problems.len().saturating_sub(NAMED);
        Err(Error::Changed {
            dir,
            first: problems
                .into_iter()
                .take(NAMED)
                .collect::<Vec<_>>()
                .join("; "),
            more,
        })
    }
}

/// [`Error::Missing`] for `dir`, which is not there; or [`Error::DanglingSymlink`] when `dir`,
/// or the first of its parents that is missing, is a symlink to nothing (`ls` shows it: "does
/// not exist" would send the reader looking for a typo).
fn missing_error(dir: &Path) -> Error {
    for a in dir.ancestors().take_while(|a| !a.as_os_str().is_empty()) {
        match fsutil::lstat_or_none(a) {
            Some(m) if m.file_type().is_symlink() => {
                if let Some(chain) = dangling_chain(a) {
                    return Error::DanglingSymlink {
                        path: a.to_path_buf(),
                        chain,
                    };
                }
                break;
            }
            // There: whatever is missing is below it.
            Some(_) => break,
            None => {}
        }
    }
    Error::Missing(dir.to_path_buf())
}

/// What the symlink `link` points to, hop by hop (each as the link says), when the last one
/// does not exist; `None` when the chain ends at something that exists, or could not be read,
/// or is longer than the kernel follows (40).
fn dangling_chain(link: &Path) -> Option<Vec<PathBuf>> {
    let mut chain = Vec::new();
    let mut at = link.to_path_buf();
    while chain.len() < 40 {
        let to = fsutil::read_link(&at).ok()?;
        let next = match at.parent() {
            Some(p) if to.is_relative() => p.join(&to),
            _ => to.clone(),
        };
        chain.push(to);
        match fsutil::lstat_or_none(&next) {
            None => return Some(chain),
            Some(m) if m.file_type().is_symlink() => at = next,
            Some(_) => return None,
        }
    }
    None
}

/// Refuses a new target `dir` below what an enclosing flip target keeps (`releases/`,
/// `shared/`, `.flip/`, `current`): a deploy there would write into a release another target
/// serves, or into its state.
fn refuse_inside_target(dir: &Path) -> Result<()> {
    // Where the directory really is: its deepest existing ancestor resolved (symlinks, `..`),
    // the missing rest appended.
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let resolved = dir
        .ancestors()
        .find_map(|a| {
            #[allow(clippy::disallowed_methods)]
            let real = fs::canonicalize(a).ok()?;
            Some(real.join(dir.strip_prefix(a).ok()?))
        })
        .unwrap_or(dir);
    for outer in resolved.ancestors().skip(1) {
        let root = Root::at(outer);
        if !matches!(fsutil::lstat_or_none(root.state_dir()), Some(m) if m.is_dir()) {
            continue;
        }
        let Ok(rest) = resolved.strip_prefix(outer) else {
            continue;
        };
        let first = rest.components().next().map(|c| c.as_os_str().to_owned());
        if let Some(first) = first.filter(|f| {
            [STATE, RELEASES, flip_plan::shared::SHARED_DIR, CURRENT]
                .iter()
                .any(|k| f.as_os_str() == std::ffi::OsStr::new(k))
        }) {
            return Err(Error::InsideTarget {
                dir: resolved.clone(),
                within: outer.join(first),
                outer: outer.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// A release id written the one way flip writes it (`7`; never `07` or `+7`, which name other
/// directories than `releases/7`).
fn parse_id(s: &str) -> Option<u64> {
    s.parse::<u64>().ok().filter(|id| id.to_string() == s)
}

/// Whether `name` is a temp file of an interrupted atomic write (`.next-id.tmp-123`).
pub(crate) fn is_temp(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// `path` of a directory entry, for messages.
fn e_path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// Whether `path` exists as a directory, as flip makes its own: `Ok(false)` when missing, a
/// [`Error::Layout`] naming it when it is a symlink or of another type.
fn expect_dir(path: &Path) -> Result<bool> {
    match fsutil::symlink_metadata_if_any(path)? {
        Some(m) if m.is_dir() => Ok(true),
        Some(m) => Err(Error::Layout {
            path: path.to_path_buf(),
            found: fsutil::kind_of(&m),
            expected: "a directory",
        }),
        None => Ok(false),
    }
}

/// Why a file of `.flip/` with `links` hard links is not written into.
fn shared_why(links: u64) -> String {
    format!(
        "it had {links} hard links (it shares its inode with another file, maybe another target's log copied with `cp -al`, or planted): appending would have written into that file too"
    )
}

/// What a target's `current` is ([`Root::current_link`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CurrentLink {
    /// No `current`: nothing is live.
    Missing,
    /// A release of this target (which may be missing or incomplete: see `flip doctor`).
    Release(u64),
    /// A symlink to something else, as it reads.
    Foreign(String),
}

/// This host's name, as the lock holder records it.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

static ABANDONED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Tells this process's long work on the target that nobody waits for it any more (the agent's
/// client went away: killed, or its connection dropped): staging's links, copies and hashing and
/// the making of signatures stop at their next file or piece with [`Error::Abandoned`], so the
/// session ends (staging removed, lock released) at once instead of finishing work no one will
/// use while a retry finds the target locked. Cannot be undone; for the agent, one session per
/// process.
pub fn abandon() {
    ABANDONED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether [`abandon`] was called (the agent's client went away).
pub fn abandoned() -> bool {
    ABANDONED.load(std::sync::atomic::Ordering::Relaxed)
}

/// `Err(Error::Abandoned)` once [`abandon`] was called.
pub(crate) fn check_abandoned() -> Result<()> {
    if abandoned() {
        Err(Error::Abandoned)
    } else {
        Ok(())
    }
}

/// A test-only fault point: in a debug build (what `cargo test` runs), when the environment
/// variable `FLIP_FAULT` names `point`, the process dies on the spot (exit 99, no destructor
/// runs), as a power cut or a kill -9 would end it. A release build ignores `FLIP_FAULT`.
///
/// The points, in the order a deploy meets them: `after-lock`, `after-id`, `after-stage`,
/// `mid-transfer`, `before-commit`, `before-rename`, `after-rename`, `before-swap`,
/// `after-swap`, `prune-after-trash`, `prune-after-forget` (rollback and activate meet
/// `after-lock`, `before-swap` and `after-swap`; prune the last two). tests/faults.rs crashes at
/// each of them.
///
/// With `FLIP_FAULT_ROOT=DIR` as well, only an agent serving the target root `DIR` (see
/// [`fault_scope`]) crashes: one target of a multi-host deploy fails, the others do not.
#[inline]
pub fn fault_point(point: &str) {
    if cfg!(debug_assertions)
        && std::env::var_os("FLIP_FAULT").is_some_and(|v| v == point)
        && FAULT_SCOPE.get().copied().unwrap_or(true)
    {
        eprintln!("flip: FLIP_FAULT={point}: simulating a crash");
        std::process::exit(99);
    }
}

/// Test hook, debug builds only: with `FLIP_PAUSE=POINT:FILE` in the environment, the process
/// creates `FILE` at `point` and waits (up to 60 s) until it is removed, so that a test can
/// change the target at that moment. A no-op otherwise.
pub fn fault_pause(point: &str) {
    if !cfg!(debug_assertions) || !FAULT_SCOPE.get().copied().unwrap_or(true) {
        return;
    }
    let Some(v) = std::env::var_os("FLIP_PAUSE") else {
        return;
    };
    let v = v.to_string_lossy();
    let Some((p, file)) = v.split_once(':') else {
        return;
    };
    if p != point {
        return;
    }
    #[allow(clippy::disallowed_methods)]
    let made = fs::write(file, point);
    if made.is_err() {
        return;
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while fsutil::exists_nofollow(file) && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

static FAULT_SCOPE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Tells [`fault_point`] which target root this process serves: with `FLIP_FAULT_ROOT` set to
/// another path, this process's fault points stay quiet. Debug builds only; set once.
pub fn fault_scope(root: &Path) {
    if cfg!(debug_assertions) {
        let mine = std::env::var_os("FLIP_FAULT_ROOT").is_none_or(|r| Path::new(&r) == root);
        let _ = FAULT_SCOPE.set(mine);
    }
}

#[cfg(test)]
// The tests write, damage and remove targets' files on purpose.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn me() -> Holder {
        Holder {
            pid: std::process::id(),
            host: hostname(),
            user: "tester".into(),
            since: 0,
            what: "deploy".into(),
            run: None,
        }
    }

    #[test]
    fn cleanup_never_follows_a_symlinked_trash_and_names_what_it_cannot_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open_or_init(&tmp.path().join("t")).unwrap();
        let lock = root.lock(&me(), Wait::No).unwrap();
        let foreign = tmp.path().join("foreign");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("keep"), "x").unwrap();
        std::os::unix::fs::symlink(&foreign, root.releases_dir().join(".trash-3")).unwrap();
        // A directory where a temp file would be: not flip's to delete, named instead.
        fs::create_dir(root.state_dir().join(".next-id.tmp-1")).unwrap();
        let removed = root.clean_leftovers(&lock).unwrap();
        assert_eq!(removed, vec![".trash-3".to_string()]);
        assert!(foreign.join("keep").is_file());
        let left = root.take_leftovers().unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].path, root.state_dir().join(".next-id.tmp-1"));
        assert_eq!(root.recorded_leftovers(), left);
    }

    #[test]
    fn the_lock_holder_is_read_past_a_tail_of_an_older_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open_or_init(&tmp.path().join("t")).unwrap();
        let path = root.state_dir().join("lock");
        let mut text = serde_json::to_vec(&me()).unwrap();
        text.extend_from_slice(b"\"older holder's tail\"}");
        let _held = root.lock(&me(), Wait::No).unwrap();
        // As a reader may find it between the holder's write and its truncation.
        fs::write(&path, &text).unwrap();
        let other = Root::open(root.path()).unwrap();
        match other.lock(&me(), Wait::No) {
            Err(Error::Locked { holder }) => {
                assert!(
                    holder.contains(&format!("pid {}", std::process::id())),
                    "{holder}"
                )
            }
            r => panic!("expected Locked, got {r:?}"),
        }
    }

    #[test]
    fn ids_stop_before_they_would_wrap() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::open_or_init(&tmp.path().join("t")).unwrap();
        let _lock = root.lock(&me(), Wait::No).unwrap();
        let next = root.state_dir().join("next-id");
        fs::write(&next, format!("{}\n", u64::MAX - 1)).unwrap();
        assert_eq!(root.allocate_id().unwrap(), u64::MAX - 1);
        assert!(matches!(
            root.allocate_id(),
            Err(Error::IdsExhausted { last, .. }) if last == u64::MAX
        ));
        // A stray directory named with the largest id (flip never handed it out: the counter
        // says 1) does not stop the deploys: ids go on from the counter, past taken names.
        fs::create_dir(root.release_dir(u64::MAX)).unwrap();
        fs::create_dir(root.release_dir(1)).unwrap();
        fs::write(&next, "1\n").unwrap();
        assert_eq!(root.allocate_id().unwrap(), 2);
        assert_eq!(fs::read_to_string(&next).unwrap(), "3\n");
        let warned = root.take_warnings();
        assert!(
            warned
                .iter()
                .any(|w| w.contains("at the end of the ids") && w.contains("go on from 2")),
            "{warned:?}"
        );
    }
}
