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
//!   .flip/next-id                the next release id; ids are never reused
//!   .flip/releases/7.manifest    canonical manifest of each kept release
//!   .flip/releases/7.json        its metadata: label, creation time, totals
//!   .flip/releases/7.stat        inode and mtime of each of its files when it was committed
//!   .flip/log                    one JSON line per deploy, activation and prune
//! ```
//!
//! Durability order for a deploy: file data and directories are flushed (`syncfs`), the manifest
//! is recorded, the staging directory is renamed to `releases/<id>` and `releases/` fsynced; only
//! then does [`Root::activate`] swap `current` and fsync the root. `current` therefore always names
//! a complete, verified release.

pub mod delta;
mod error;
mod fsutil;
mod lock;
mod stage;

pub use delta::{DeltaApplier, DeltaWriter, PatchWriter, PATCH_WINDOW_LOG_MAX};
pub use error::{Error, ErrorClass, Result};
pub use lock::{Holder, LockGuard, Wait};
pub use stage::{FileWriter, Stage, StageStats};

use error::io;
use flip_manifest::Manifest;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const RELEASES: &str = "releases";
pub const CURRENT: &str = "current";
pub const STATE: &str = ".flip";
const STAGING_PREFIX: &str = ".staging-";
const TRASH_PREFIX: &str = ".trash-";

/// What flip remembers about one release.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReleaseInfo {
    pub id: u64,
    pub label: Option<String>,
    /// Unix seconds.
    pub created: i64,
    pub files: u64,
    pub bytes: u64,
    pub manifest_digest: String,
    /// Set when listing: whether `current` points here.
    #[serde(default)]
    pub current: bool,
}

/// A deploy target's root directory.
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    /// Opens an existing flip target.
    pub fn open(dir: &Path) -> Result<Root> {
        let meta = fs::metadata(dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Missing(dir.to_path_buf()),
            _ => io("open", dir)(e),
        })?;
        if !meta.is_dir() {
            return Err(Error::NotADirectory(dir.to_path_buf()));
        }
        let root = Root {
            dir: dir.to_path_buf(),
        };
        if !root.state_dir().is_dir() {
            return Err(Error::NotATarget(dir.to_path_buf()));
        }
        Ok(root)
    }

    /// Opens a target, making a new one when `dir` is missing or empty. A directory that holds
    /// other things is refused rather than taken over.
    pub fn open_or_init(dir: &Path) -> Result<Root> {
        match fs::metadata(dir) {
            Ok(m) if !m.is_dir() => return Err(Error::NotADirectory(dir.to_path_buf())),
            Ok(_) => {
                let root = Root {
                    dir: dir.to_path_buf(),
                };
                if root.state_dir().is_dir() {
                    return Ok(root);
                }
                let mut rd = fs::read_dir(dir).map_err(io("read", dir))?;
                if rd.next().is_some() {
                    return Err(Error::NotATarget(dir.to_path_buf()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(io("create", dir))?;
            }
            Err(e) => return Err(io("open", dir)(e)),
        }
        let root = Root {
            dir: dir.to_path_buf(),
        };
        fs::create_dir_all(root.releases_dir()).map_err(io("create", &root.releases_dir()))?;
        fs::create_dir_all(root.meta_dir()).map_err(io("create", &root.meta_dir()))?;
        fsutil::fsync_dir(&root.state_dir())?;
        fsutil::fsync_dir(&root.dir)?;
        Ok(root)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    fn meta_dir(&self) -> PathBuf {
        self.state_dir().join("releases")
    }

    pub fn releases_dir(&self) -> PathBuf {
        self.dir.join(RELEASES)
    }

    pub fn release_dir(&self, id: u64) -> PathBuf {
        self.releases_dir().join(id.to_string())
    }

    fn manifest_path(&self, id: u64) -> PathBuf {
        self.meta_dir().join(format!("{id}.manifest"))
    }

    fn info_path(&self, id: u64) -> PathBuf {
        self.meta_dir().join(format!("{id}.json"))
    }

    /// (inode, mtime) of every file of a release as committed: what lets the next deploy tell
    /// an intact file it may hard-link from one that was replaced or written to since.
    fn stat_path(&self, id: u64) -> PathBuf {
        self.meta_dir().join(format!("{id}.stat"))
    }

    /// Takes the deploy lock for the lifetime of the guard.
    pub fn lock(&self, me: &Holder, wait: Wait<'_>) -> Result<LockGuard> {
        fs::create_dir_all(self.state_dir()).map_err(io("create", &self.state_dir()))?;
        lock::acquire(&self.state_dir().join("lock"), me, wait)
    }

    /// The release `current` points to, if any.
    pub fn current(&self) -> Result<Option<u64>> {
        let link = self.dir.join(CURRENT);
        let meta = match fs::symlink_metadata(&link) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("inspect", &link)(e)),
        };
        if !meta.file_type().is_symlink() {
            return Err(Error::CurrentNotSymlink(link));
        }
        let target = fs::read_link(&link).map_err(io("read the symlink", &link))?;
        let target = target.to_string_lossy().into_owned();
        match target
            .strip_prefix("releases/")
            .and_then(|s| s.parse::<u64>().ok())
        {
            Some(id) => Ok(Some(id)),
            None => Err(Error::CurrentForeign { path: link, target }),
        }
    }

    /// Complete releases (directory and manifest both present), oldest first.
    pub fn releases(&self) -> Result<Vec<ReleaseInfo>> {
        let current = self.current().ok().flatten();
        let mut out = Vec::new();
        for id in self.release_ids()? {
            match self.info(id) {
                Ok(mut info) => {
                    info.current = Some(id) == current;
                    out.push(info);
                }
                Err(Error::NoSuchRelease(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Ids of the directories under releases/ named by a number, ascending.
    fn release_ids(&self) -> Result<Vec<u64>> {
        let dir = self.releases_dir();
        let mut ids = Vec::new();
        for e in fs::read_dir(&dir).map_err(io("read", &dir))? {
            let e = e.map_err(io("read", &dir))?;
            if let Some(id) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Metadata of a complete release.
    pub fn info(&self, id: u64) -> Result<ReleaseInfo> {
        let path = self.info_path(id);
        let Some(bytes) = fsutil::read_optional(&path)? else {
            return Err(Error::NoSuchRelease(id));
        };
        if !self.release_dir(id).is_dir() || !self.manifest_path(id).is_file() {
            return Err(Error::NoSuchRelease(id));
        }
        serde_json::from_slice(&bytes).map_err(|e| fsutil::corrupt(&path, e.to_string()))
    }

    /// The stored manifest of a complete release.
    pub fn manifest(&self, id: u64) -> Result<Manifest> {
        let path = self.manifest_path(id);
        let bytes = fsutil::read_optional(&path)?.ok_or(Error::NoSuchRelease(id))?;
        flip_manifest::decode(&bytes).map_err(|e| fsutil::corrupt(&path, e.to_string()))
    }

    /// The stored manifest's canonical bytes (what the agent sends to a client).
    pub fn manifest_bytes(&self, id: u64) -> Result<Vec<u8>> {
        fsutil::read_optional(&self.manifest_path(id))?.ok_or(Error::NoSuchRelease(id))
    }

    /// The newest complete release older than `current`: what a rollback goes to.
    pub fn rollback_target(&self, current: u64) -> Result<u64> {
        self.releases()?
            .iter()
            .rev()
            .map(|r| r.id)
            .find(|id| *id < current)
            .ok_or(Error::NothingToRollBack { current })
    }

    /// Points `current` at release `id` atomically (symlink at a temp name, rename over
    /// `current`, fsync the root). Returns the release that was live before.
    pub fn activate(&self, _lock: &LockGuard, id: u64) -> Result<Option<u64>> {
        self.info(id)?;
        let previous = self.current()?;
        let link = self.dir.join(CURRENT);
        let tmp = self
            .dir
            .join(format!(".{CURRENT}.tmp-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("{RELEASES}/{id}"), &tmp)
            .map_err(io("create the symlink", &tmp))?;
        if let Err(e) = fs::rename(&tmp, &link) {
            let _ = fs::remove_file(&tmp);
            return Err(io("swap", &link)(e));
        }
        fsutil::fsync_dir(&self.dir)?;
        Ok(previous)
    }

    /// Removes the oldest releases so that `keep` remain, never the live one nor the one a
    /// rollback would pick. Returns the ids removed.
    pub fn prune(&self, _lock: &LockGuard, keep: usize) -> Result<Vec<u64>> {
        let releases = self.releases()?;
        let current = self.current()?;
        let protected: Vec<u64> = match current {
            Some(c) => std::iter::once(c)
                .chain(self.rollback_target(c).ok())
                .collect(),
            None => Vec::new(),
        };
        let mut kept = 0usize;
        let mut doomed = Vec::new();
        for r in releases.iter().rev() {
            if protected.contains(&r.id) || kept < keep {
                kept += 1;
            } else {
                doomed.push(r.id);
            }
        }
        doomed.sort_unstable();
        for id in &doomed {
            self.remove_release(*id)?;
        }
        Ok(doomed)
    }

    /// Makes a release disappear atomically (rename to trash), forgets it, then deletes it.
    fn remove_release(&self, id: u64) -> Result<()> {
        let dir = self.release_dir(id);
        let trash = self.releases_dir().join(format!("{TRASH_PREFIX}{id}"));
        fsutil::remove_tree(&trash)?;
        fs::rename(&dir, &trash).map_err(io("move aside", &dir))?;
        fsutil::fsync_dir(&self.releases_dir())?;
        for p in [
            self.manifest_path(id),
            self.info_path(id),
            self.stat_path(id),
        ] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &p)(e)),
            }
        }
        fsutil::remove_tree(&trash)
    }

    /// Removes what an interrupted run left behind: staging and trash directories, and state of
    /// releases whose directory never appeared.
    pub fn clean_leftovers(&self, _lock: &LockGuard) -> Result<Vec<String>> {
        let dir = self.releases_dir();
        let mut removed = Vec::new();
        for e in fs::read_dir(&dir).map_err(io("read", &dir))? {
            let e = e.map_err(io("read", &dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(STAGING_PREFIX) || name.starts_with(TRASH_PREFIX) {
                fsutil::remove_tree(&e.path())?;
                removed.push(name);
            }
        }
        let meta = self.meta_dir();
        for e in fs::read_dir(&meta).map_err(io("read", &meta))? {
            let e = e.map_err(io("read", &meta))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.split('.').next().and_then(|s| s.parse::<u64>().ok());
            if let Some(id) = id {
                if !self.release_dir(id).is_dir() {
                    fs::remove_file(e.path()).map_err(io("remove", &e.path()))?;
                    removed.push(format!(".flip/releases/{name}"));
                }
            }
        }
        Ok(removed)
    }

    /// Takes the next release id and records that it is taken before anything uses it, so no id
    /// is ever handed out twice, whatever happens to the deploy that got it.
    fn allocate_id(&self) -> Result<u64> {
        let path = self.state_dir().join("next-id");
        let stored = match fsutil::read_optional(&path)? {
            Some(b) => String::from_utf8_lossy(&b)
                .trim()
                .parse::<u64>()
                .map_err(|_| fsutil::corrupt(&path, "not a number"))?,
            None => 1,
        };
        // Never below anything on disk, even if the counter file was lost or restored from backup.
        let on_disk = self.release_ids()?.last().map_or(1, |m| m + 1);
        let id = stored.max(on_disk).max(1);
        fsutil::write_atomic(&path, format!("{}\n", id + 1).as_bytes())?;
        Ok(id)
    }

    /// Appends one JSON line to `.flip/log`. Failures to log are reported, not fatal to callers
    /// that choose to ignore them.
    pub fn log(&self, event: &serde_json::Value) -> Result<()> {
        let path = self.state_dir().join("log");
        let mut line = serde_json::to_vec(event).expect("json");
        line.push(b'\n');
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io("open", &path))?;
        f.write_all(&line).map_err(io("append to", &path))
    }

    /// Re-reads a release and compares it with its manifest. Returns the differences found.
    pub fn verify(&self, id: u64) -> Result<Vec<String>> {
        let manifest = self.manifest(id)?;
        Ok(stage::verify_tree(&self.release_dir(id), &manifest))
    }
}

/// A test-only fault point: when `FLIP_FAULT` names `point`, the process dies on the spot, as a
/// power cut or a kill -9 would end it.
pub fn fault_point(point: &str) {
    if std::env::var("FLIP_FAULT").as_deref() == Ok(point) {
        eprintln!("flip: FLIP_FAULT={point}: simulating a crash");
        std::process::exit(99);
    }
}
