//! Building a release in a hidden staging directory.
//!
//! [`Root::stage`] creates `releases/.staging-<id>/`, makes every directory and symlink, hard-links
//! or copies every file the previous release already has (in parallel), and leaves a list of the
//! files whose content must still arrive ([`Stage::needs`]). The caller then feeds those as
//! literal bytes ([`Stage::begin_file`]) or as deltas against a file of the previous release
//! ([`Stage::apply_delta`]); each is checked against its size and blake3 before it counts.
//! [`Stage::commit`] refuses to finish while anything is missing. Dropping an uncommitted stage
//! removes the staging directory. [`Root::prepare`] stages the live release again while the
//! manifest of the next one is still on its way; [`Stage::restage`] then makes it the stage of
//! that manifest, keeping what it would make the same way. Files may be written on several threads at once: a stage is
//! `Sync`, each needed file can be claimed by one writer only, and what has arrived (pending
//! files, stamps, counts) is kept behind a lock.
//!
//! Every file is created with `O_EXCL | O_NOFOLLOW` inside directories this stage made itself, so
//! nothing is ever written into an existing inode (hard-linked files are shared with older
//! releases) or through a symlink.
//!
//! Nothing of the previous release is trusted by its size: a file is hard-linked forward only when
//! its inode is exactly what is expected of it (inode, size, mtime, ctime, which `touch -r` cannot
//! set back, owner, group, mode and link count: the record written when that release was
//! committed, `.flip/releases/N.stat`, with the link ledger's later ctime and link count; see
//! `record.rs`). Otherwise it is copied into a new inode, its content checked against the
//! manifest (counted as not linked, with a warning saying why), or transferred whole when that
//! check fails. A delta basis is used when its stamp matches or its blake3 is the manifest's (the
//! files concerned are hashed in parallel); a basis that fails is dropped before the client
//! hears of it.

use crate::delta::{DeltaApplier, DeltaWriter, PatchWriter};
use crate::error::{io, Error, Result};
use crate::{at, fsutil, LockGuard, ReleaseInfo, Root, STAGING_PREFIX};
use flip_manifest::{Digest, EntryKind, Manifest, RelPath};
use flip_plan::{FileStep, Plan, Source};
use rayon::prelude::*;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::CStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

mod streamed;

pub(crate) use crate::record::FileStamp;

/// The permission bits flip deploys and verifies (all 12: rwx for user, group and other,
/// setuid, setgid, sticky).
const MODE_MASK: u32 = flip_manifest::MODE_MASK;

/// Files from this size up are mapped rather than read into memory when used as a patch basis:
/// a patch's basis holds at most this much anonymous memory.
pub const PATCH_BASIS_IN_MEMORY: u64 = 16 << 20;
const MMAP_THRESHOLD: u64 = PATCH_BASIS_IN_MEMORY;

/// What staging has done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StageStats {
    /// Files hard-linked from the same path of the previous release.
    pub linked: u64,
    /// Files copied (reflinked where the filesystem can) into a new inode from content the
    /// previous release holds: at another path, with another mode, or empty, and unchanged
    /// files whose inode could not be hard-linked (`not_linked`).
    pub copied: u64,
    /// Of `copied`: unchanged files the plan meant to hard-link whose inode in the previous
    /// release is not as flip recorded it (owner, group, mode, link count or last change
    /// differ, or no record), or that the kernel refused to link: copied into a new inode,
    /// content checked against the manifest.
    pub not_linked: u64,
    /// Files of the previous release hashed because their recorded identity was unknown or
    /// differed (as link sources or delta bases).
    pub hashed: u64,
    /// Delta bases found not to be what the previous release's manifest says (missing, not a
    /// regular file, or other content): their files go whole.
    pub bases_dropped: u64,
    /// Files written from client data (literal or delta).
    pub written: u64,
    /// Of those, files streamed before the manifest (a first deploy sending while it hashes).
    pub streamed: u64,
}

/// A release being built in a hidden staging directory under the root: see [`Root::stage`].
/// Dropped without [`Stage::commit`], it is removed.
pub struct Stage<'r> {
    root: &'r Root,
    id: u64,
    dir: PathBuf,
    prev: Option<(u64, Manifest)>,
    /// Identity of the previous release's files when it was committed, by position in its
    /// manifest's entries (`None` for directories and symlinks); empty if unknown.
    prev_stat: Vec<Option<FileStamp>>,
    /// Files of the previous release checked during staging to be what its manifest says, and
    /// so usable as delta bases; no other file is.
    good_bases: HashSet<RelPath>,
    /// The previous release's directory, opened once when staging: each delta or patch basis is
    /// reached beneath it (see [`Stage::open_basis`]).
    prev_tree: Option<at::Tree>,
    manifest: Manifest,
    plan: Plan,
    needs: Vec<usize>,
    /// What content has arrived: shared by the threads that write files in parallel.
    progress: Mutex<Progress>,
    label: Option<String>,
    stats: StageStats,
    committed: bool,
    /// Seeds to move into `shared/` and writable directories, at commit.
    shared: Option<crate::SharedCommit>,
    /// A first deploy's files streamed before the manifest (see `streamed.rs`).
    streamed: Option<Box<streamed::Streamed>>,
    /// Files hard-linked from the previous release (plan index, stamp just after the link):
    /// the link ledger learns their inodes' new state at commit, or again when the stage is
    /// dropped (the link removed).
    linked: Vec<(usize, FileStamp)>,
    /// Files of the previous release hashed to check them (counted across a restage).
    hashed: AtomicU64,
    /// A prepared stage ([`Root::prepare`]): what it made for each file (its step and
    /// outcome), for [`Stage::restage`]. `None` once restaged, and for any other stage.
    prepared: Option<HashMap<RelPath, (FileStep, Outcome)>>,
}

/// The part of a stage that files being written (possibly on several threads at once) update.
#[derive(Default)]
struct Progress {
    /// Needed files no writer has been opened for yet.
    pending: BTreeSet<usize>,
    /// Needed files with a writer open (begun, not finished).
    writing: BTreeSet<usize>,
    /// Identity of each staged file (by plan index), for the release's `.stat`.
    stamps: Vec<Option<FileStamp>>,
    written: u64,
}

#[derive(Clone)]
enum Outcome {
    Linked(FileStamp),
    Copied(FileStamp),
    /// Meant to be linked, copied instead: the reason.
    NotLinked(FileStamp, String),
    /// Streamed before the manifest, and found to be its file.
    Streamed(FileStamp),
    /// The content must come from the client; `basis_ok`: the plan's delta basis (if any) was
    /// found intact.
    Transfer {
        basis_ok: bool,
    },
}

const TRANSFER: Outcome = Outcome::Transfer { basis_ok: false };

impl Root {
    /// Starts building a new release holding exactly `manifest`, planned against the live one.
    ///
    /// # Errors
    /// [`Error::NotEnoughSpace`] when the new content cannot fit, [`Error::Layout`], or an I/O
    /// error creating the staging directory, linking or copying.
    pub fn stage(
        &self,
        lock: &LockGuard,
        manifest: Manifest,
        label: Option<String>,
    ) -> Result<Stage<'_>> {
        self.stage_after(lock, manifest, label, None)
    }

    /// [`Root::stage`] for a caller that has already read the live release's manifest
    /// (`live`: id and manifest), which is then not read again. Ignored if that release is no
    /// longer live.
    ///
    /// # Errors
    /// As [`Root::stage`].
    pub fn stage_after(
        &self,
        lock: &LockGuard,
        manifest: Manifest,
        label: Option<String>,
        live: Option<(u64, Manifest)>,
    ) -> Result<Stage<'_>> {
        self.new_stage(lock, manifest, label, live, None)
    }

    /// Stages the live release (`live`: its id and manifest, the one recorded for it) again,
    /// while the manifest of the release to build is still on its way: every unchanged file a
    /// release usually keeps is linked already when [`Stage::restage`] gives the stage that
    /// manifest. What a deploy over a slow link does with the round trip in which the client's
    /// stage is still travelling. `None` when `live` is not the live release.
    ///
    /// Once `stop` says so (asked every few files: the manifest has arrived), no more files
    /// are linked: the restage makes the rest.
    ///
    /// # Errors
    /// As [`Root::stage`].
    pub fn prepare(
        &self,
        lock: &LockGuard,
        live: (u64, Manifest),
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Stage<'_>>> {
        if self.current()? != Some(live.0) {
            return Ok(None);
        }
        let manifest = live.1.clone();
        self.new_stage(lock, manifest, None, Some(live), Some(stop))
            .map(Some)
    }

    fn new_stage(
        &self,
        lock: &LockGuard,
        manifest: Manifest,
        label: Option<String>,
        live: Option<(u64, Manifest)>,
        preparing: Option<&(dyn Fn() -> bool + Sync)>,
    ) -> Result<Stage<'_>> {
        self.clean_leftovers(lock)?;
        let prev = match (self.current()?, live) {
            (Some(id), Some((known, m))) if known == id => Some((id, m)),
            (Some(id), _) => match self.manifest(id) {
                Ok(m) => Some((id, m)),
                // A damaged live manifest: plan against nothing (everything is sent) rather
                // than fail every deploy until someone repairs it.
                Err(e @ Error::Corrupt { .. }) => {
                    self.warn(format!("{e}; the new release is built without links to it"));
                    None
                }
                // Its directory is there (`current` names it), its metadata is not.
                Err(Error::NoSuchRelease(_)) => {
                    self.warn(format!(
                        "the live release {id} has no manifest ({} missing); the new release is built without links to it",
                        self.manifest_path(id).display()
                    ));
                    None
                }
                Err(e) => return Err(e),
            },
            (None, _) => None,
        };
        let plan = flip_plan::plan(prev.as_ref().map(|(_, m)| m), &manifest);
        let prev_stat = match &prev {
            Some((id, m)) => self.expected_stamps(*id, m),
            None => Vec::new(),
        };
        let id = self.allocate_id()?;
        let dir = self.releases_dir().join(format!("{STAGING_PREFIX}{id}"));
        let mut stage = Stage {
            root: self,
            id,
            dir,
            prev,
            prev_stat,
            good_bases: HashSet::new(),
            prev_tree: None,
            manifest,
            plan,
            needs: Vec::new(),
            progress: Mutex::new(Progress::default()),
            label,
            stats: StageStats::default(),
            committed: false,
            shared: None,
            streamed: None,
            linked: Vec::new(),
            hashed: AtomicU64::new(0),
            prepared: preparing.map(|_| HashMap::new()),
        };
        stage.build_tree(preparing)?;
        crate::fault_point("after-stage");
        Ok(stage)
    }
}

impl<'r> Stage<'r> {
    /// The id the release will have.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The plan it follows.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The manifest it builds.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// With seeds of shared paths ([`Stage::set_shared`]): the release as recorded (the staged
    /// manifest with each seed replaced by its symlink) and, for each of `plan().files`, its
    /// index among the release's files (`None` for a file of a seed). `None` without seeds.
    pub fn release_files(&self) -> Option<(&Manifest, Vec<Option<usize>>)> {
        let s = self.shared.as_ref().filter(|s| !s.seeds.is_empty())?;
        let mut next = 0;
        let map = self
            .plan
            .files
            .iter()
            .map(|f| {
                if s.seeds
                    .iter()
                    .any(|(x, _)| flip_plan::shared::is_within(&f.path, x))
                {
                    return None;
                }
                next += 1;
                Some(next - 1)
            })
            .collect();
        Some((&s.release, map))
    }

    /// The manifest of the live release this one was planned against.
    pub fn previous_manifest(&self) -> Option<&Manifest> {
        self.prev.as_ref().map(|(_, m)| m)
    }

    /// The live release this one was planned against.
    pub fn previous(&self) -> Option<u64> {
        self.prev.as_ref().map(|(id, _)| *id)
    }

    /// What staging has done so far (a snapshot: files may be being written meanwhile).
    pub fn stats(&self) -> StageStats {
        let p = self.progress();
        StageStats {
            written: p.written,
            ..self.stats.clone()
        }
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        // A writer thread that panicked leaves nothing half-updated (each update is one step).
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The delta basis of `plan().files[index]` (its previous version at the same path, or a
    /// likely ancestor) and its size, if the plan found one and staging found it intact: what a
    /// delta or patch can be made against. `None` means the file goes whole.
    pub fn basis_of(&self, index: usize) -> Option<(RelPath, u64)> {
        let Source::Transfer { basis: Some(b) } = &self.plan.files.get(index)?.source else {
            return None;
        };
        if !self.good_bases.contains(b) {
            return None;
        }
        match self.prev.as_ref()?.1.get(b) {
            Some(EntryKind::File { size, .. }) => Some((b.clone(), *size)),
            _ => None,
        }
    }

    /// Indexes into `plan().files` whose content must come from the client, ascending.
    pub fn needs(&self) -> &[usize] {
        &self.needs
    }

    fn abs(&self, rel: &RelPath) -> PathBuf {
        self.dir.join(rel.as_str())
    }

    /// Directories and symlinks (one level of depth at a time, each level in parallel), then
    /// links and copies in parallel.
    fn build_tree(&mut self, stop: Option<&(dyn Fn() -> bool + Sync)>) -> Result<()> {
        if self.streamed.is_none() {
            // Private until the release is complete (see `commit`).
            fsutil::create_private_dir(&self.dir)?;
        }
        self.make_dirs_and_symlinks(None)?;
        // The previous release and the staging tree, each reached through directory
        // descriptors (`at`): one lookup of a name per call, never through a symlink. A
        // previous release that cannot be opened so has nothing to link from.
        self.prev_tree = self
            .prev
            .as_ref()
            .and_then(|(id, _)| at::Tree::open(&self.root.release_dir(*id)).ok());
        let outcomes = self.file_outcomes(Vec::new(), stop)?;
        self.account(outcomes, &[])?;
        self.check_streamed_all_listed()
    }

    /// Gives a prepared stage ([`Root::prepare`]) the manifest of the release to build, and its
    /// `label`. What the stage made that the new plan makes the same way stays: a file whose
    /// step (path, mode, size, digest, source) is unchanged, a directory, a symlink to the same
    /// target. The rest is removed (deepest first; the link ledger learns of each link
    /// removed), and the new plan is staged from there as [`Root::stage`] stages it: the
    /// result is the stage `Root::stage` makes of `manifest` against the same live release.
    ///
    /// # Errors
    /// [`Error::BadRequest`] for a stage that was not prepared or was restaged already, or
    /// whose release is no longer live (drop it and stage anew); else as [`Root::stage`]. A
    /// stage this fails for is to be dropped (its tree is then removed).
    pub fn restage(&mut self, manifest: Manifest, label: Option<String>) -> Result<()> {
        let Some(mut made) = self.prepared.take() else {
            return Err(Error::BadRequest("no prepared stage to restage".into()));
        };
        let live = self.previous();
        if live.is_none() || self.root.current()? != live {
            return Err(Error::BadRequest(
                "the release the stage was prepared from is no longer live".into(),
            ));
        }
        let plan = flip_plan::plan(self.previous_manifest(), &manifest);
        let reused: Vec<Option<Outcome>> = plan
            .files
            .iter()
            .map(|step| match made.get(&step.path) {
                Some((old, outcome)) if old == step && outcome.staged() => {
                    made.remove(&step.path).map(|(_, o)| o)
                }
                _ => None,
            })
            .collect();
        // Files made for a step the new plan does not have.
        made.retain(|_, (_, o)| o.staged());
        made.par_iter()
            .try_for_each(|(p, _)| fsutil::remove_file(self.abs(p)))?;
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.linked)
            .into_iter()
            .partition(|(i, _)| made.contains_key(&self.plan.files[*i].path));
        self.linked = kept;
        // Their inodes as the ledger now has them, for the checks of bases below (not hashed
        // again for the ctime the link and its removal gave them).
        if let (Some(ledger), Some((_, m))) = (self.forget_links(&gone), self.prev.as_ref()) {
            for (i, _) in &gone {
                let pos = m.position(&self.plan.files[*i].path);
                if let Some(st) = pos.and_then(|p| self.prev_stat.get_mut(p)?.as_mut()) {
                    ledger.apply(st);
                }
            }
        }
        // Directories and symlinks the new manifest does not have as they are, deepest first
        // (what was in them is gone by then).
        for level in by_depth(self.manifest.entries()).iter().rev() {
            level.par_iter().try_for_each(|e| {
                if same_dir_or_symlink(&e.kind, manifest.get(&e.path)) {
                    return Ok(());
                }
                let path = self.abs(&e.path);
                match e.kind {
                    EntryKind::Dir { .. } => fsutil::remove_dir(&path),
                    _ => fsutil::remove_file(&path),
                }
            })?;
        }
        // The kept links, by their index in the new plan.
        let index: HashMap<&RelPath, usize> = plan
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (&f.path, i))
            .collect();
        let linked: Vec<(usize, FileStamp)> = self
            .linked
            .iter()
            .filter_map(|(i, st)| Some((*index.get(&self.plan.files[*i].path)?, *st)))
            .collect();
        let kept: Vec<bool> = reused
            .iter()
            .map(|o| matches!(o, Some(Outcome::Linked(_))))
            .collect();
        let old = std::mem::replace(&mut self.manifest, manifest);
        self.plan = plan;
        self.linked = linked;
        self.label = label;
        self.needs.clear();
        self.good_bases.clear();
        self.stats = StageStats::default();
        *self.progress.get_mut().unwrap_or_else(|e| e.into_inner()) = Progress::default();
        self.make_dirs_and_symlinks(Some(&old))?;
        let outcomes = self.file_outcomes(reused, None)?;
        self.account(outcomes, &kept)
    }

    /// Whether this stage was prepared ([`Root::prepare`]) and not restaged yet.
    pub fn prepared(&self) -> bool {
        self.prepared.is_some()
    }

    /// Makes the manifest's directories and symlinks, one level of depth at a time (each level
    /// in parallel); with `old` (the manifest a prepared stage made), not those it already
    /// made as they are.
    fn make_dirs_and_symlinks(&self, old: Option<&Manifest>) -> Result<()> {
        let umask = fsutil::umask();
        for level in by_depth(self.manifest.entries()) {
            level.par_iter().try_for_each(|e| {
                let path = self.abs(&e.path);
                if old.is_some_and(|m| same_dir_or_symlink(&e.kind, m.get(&e.path))) {
                    return Ok(());
                }
                match &e.kind {
                    // Made for a streamed file (its mode is set at commit).
                    EntryKind::Dir { .. } if self.streamed_dir(&e.path) => Ok(()),
                    EntryKind::Dir { mode } => std::fs::DirBuilder::new()
                        .mode(initial_dir_mode(*mode, umask))
                        .create(&path)
                        .map_err(io("create", &path)),
                    EntryKind::Symlink { target } => std::os::unix::fs::symlink(target, &path)
                        .map_err(io("create the symlink", &path)),
                    EntryKind::File { .. } => Ok(()),
                }
            })?;
        }
        Ok(())
    }

    /// How each file of the plan is staged: linked, copied, or awaiting content; a file with
    /// an outcome in `reused` (by plan index; empty: none) keeps it. Once `stop` (asked every
    /// [`STOP_EVERY`] files) says so, the files not begun are left awaiting content.
    fn file_outcomes(
        &self,
        reused: Vec<Option<Outcome>>,
        stop: Option<&(dyn Fn() -> bool + Sync)>,
    ) -> Result<Vec<Result<Outcome>>> {
        let (asked, stopped) = (AtomicU64::new(0), std::sync::atomic::AtomicBool::new(false));
        let stop_now = || {
            let Some(stop) = stop else { return false };
            if stopped.load(Ordering::Relaxed) {
                return true;
            }
            let n = asked.fetch_add(1, Ordering::Relaxed);
            let now = n % STOP_EVERY == STOP_EVERY - 1 && stop();
            if now {
                stopped.store(true, Ordering::Relaxed);
            }
            now
        };
        let staged = at::Tree::open(&self.dir).map_err(io("open", &self.dir))?;
        let prev_tree = self.prev_tree.as_ref();
        let hashed = AtomicU64::new(0);
        let recorded = self.link_stamps();
        let mut reused = reused;
        reused.resize_with(self.plan.files.len(), || None);
        let outcomes: Vec<Result<Outcome>> = self
            .plan
            .files
            .par_iter()
            .zip(recorded.par_iter())
            .zip(reused.into_par_iter())
            .map_init(
                || (prev_tree.map(at::Cursor::new), at::Cursor::new(&staged)),
                |(prev, dst), ((step, recorded), reused)| {
                    crate::check_abandoned()?;
                    if let Some(kept) = reused {
                        return Ok(kept);
                    }
                    if stop_now() {
                        return Ok(TRANSFER);
                    }
                    if let Some(streamed) = self.streamed_outcome(step)? {
                        return Ok(streamed);
                    }
                    let Some(prev) = prev else {
                        return Ok(TRANSFER);
                    };
                    match &step.source {
                        Source::Link(from) => match PrevFile::reach(prev, from) {
                            Some(src) => self.link(step, *recorded, &src, dst),
                            None => Ok(TRANSFER),
                        },
                        Source::Copy(from) => match PrevFile::reach(prev, from) {
                            Some(src) => self.copy(step, &src),
                            None => Ok(TRANSFER),
                        },
                        Source::Transfer { basis: Some(b) } => Ok(Outcome::Transfer {
                            basis_ok: PrevFile::reach(prev, b)
                                .is_some_and(|src| self.intact(b, &src, &hashed)),
                        }),
                        Source::Transfer { basis: None } => Ok(TRANSFER),
                    }
                },
            )
            .collect();
        self.hashed
            .fetch_add(hashed.into_inner(), Ordering::Relaxed);
        Ok(outcomes)
    }

    /// Counts the outcomes of [`Stage::file_outcomes`] (`kept`: by plan index, a link already
    /// in [`Stage::linked`]), records each file's identity and what must still arrive, and
    /// tells the link ledger of the new links; warns of files copied instead of linked, but
    /// for a prepared stage (its restage warns of those it keeps).
    fn account(&mut self, outcomes: Vec<Result<Outcome>>, kept: &[bool]) -> Result<()> {
        self.stats.hashed = self.hashed.load(Ordering::Relaxed);
        let preparing = self.prepared.is_some();
        let progress = self.progress.get_mut().unwrap_or_else(|e| e.into_inner());
        progress.stamps = vec![None; self.plan.files.len()];
        let mut not_linked = Vec::new();
        let mut made_now = 0;
        for (i, outcome) in outcomes.into_iter().enumerate() {
            let outcome = outcome?;
            if let Some(p) = self.prepared.as_mut() {
                let step = &self.plan.files[i];
                p.insert(step.path.clone(), (step.clone(), outcome.clone()));
            }
            match outcome {
                Outcome::Linked(st) => {
                    self.stats.linked += 1;
                    progress.stamps[i] = Some(st);
                    if !kept.get(i).copied().unwrap_or(false) {
                        self.linked.push((i, st));
                        made_now += 1;
                    }
                }
                Outcome::Copied(st) => {
                    self.stats.copied += 1;
                    progress.stamps[i] = Some(st);
                }
                Outcome::NotLinked(st, why) => {
                    self.stats.copied += 1;
                    self.stats.not_linked += 1;
                    progress.stamps[i] = Some(st);
                    if not_linked.len() < NAMED_NOT_LINKED {
                        not_linked.push(format!("{} ({why})", self.plan.files[i].path));
                    }
                }
                Outcome::Streamed(st) => progress.stamps[i] = Some(st),
                Outcome::Transfer { basis_ok } => {
                    match &self.plan.files[i].source {
                        Source::Transfer { basis: Some(b) } if basis_ok => {
                            self.good_bases.insert(b.clone());
                        }
                        Source::Transfer { basis: Some(_) } => self.stats.bases_dropped += 1,
                        // A link or copy whose source is missing or altered on disk.
                        Source::Transfer { basis: None } | Source::Link(_) | Source::Copy(_) => {}
                    }
                    self.needs.push(i);
                }
            }
        }
        progress.pending = self.needs.iter().copied().collect();
        // The links made now (those kept by a restage are in the ledger already).
        let made = &self.linked[self.linked.len() - made_now..];
        if let (false, Some((prev, _))) = (made.is_empty(), self.prev.as_ref()) {
            // Written now, not only at commit: a staging tree an interrupted deploy leaves
            // is removed by the next cleanup, which can then tell these inodes as they were
            // just after the links.
            let mut links = self.root.read_links();
            for (_, st) in made {
                let holder = links.get(st.ino).map_or(*prev, |l| l.holder);
                links.set(st, holder);
            }
            self.root.write_links(&links);
        }
        if self.stats.not_linked > 0 && !preparing {
            let n = self.stats.not_linked;
            let more = n - not_linked.len() as u64;
            let more = match more {
                0 => String::new(),
                m => format!(", and {m} more"),
            };
            self.root.warn(format!(
                "{n} unchanged file(s) of release {} were copied into new inodes (content checked), not hard-linked, because their inode there is not as flip recorded it: {}{more}",
                self.previous().unwrap_or_default(),
                not_linked.join(", ")
            ));
        }
        Ok(())
    }

    /// The committed stamp of the previous release's file at each link's source (the same
    /// path), by position in the plan: one merge walk of two path-sorted lists.
    fn link_stamps(&self) -> Vec<Option<&FileStamp>> {
        let Some((_, m)) = self.prev.as_ref() else {
            return vec![None; self.plan.files.len()];
        };
        let mut theirs = m.entries().iter().zip(&self.prev_stat).peekable();
        self.plan
            .files
            .iter()
            .map(|step| {
                let Source::Link(from) = &step.source else {
                    return None;
                };
                while theirs.next_if(|(e, _)| e.path < *from).is_some() {}
                match theirs.peek() {
                    Some((e, st)) if e.path == *from => st.as_ref(),
                    // Not in path order (never for a plan's links): looked up.
                    _ => self.prev_stamp(from),
                }
            })
            .collect()
    }

    /// The committed stamp of file `path` of the previous release, if known.
    fn prev_stamp(&self, path: &RelPath) -> Option<&FileStamp> {
        let (_, m) = self.prev.as_ref()?;
        self.prev_stat.get(m.position(path)?)?.as_ref()
    }

    /// Whether file `rel` of the previous release (at `abs`) is what that release's manifest
    /// says: a regular file of its size whose identity is the one recorded at commit, or, when
    /// the record is unknown or differs, whose blake3 is the manifest's.
    fn intact(&self, rel: &RelPath, src: &PrevFile, hashed: &AtomicU64) -> bool {
        let Some(EntryKind::File { size, digest, .. }) =
            self.prev.as_ref().and_then(|(_, m)| m.get(rel))
        else {
            return false;
        };
        match src.stat() {
            Some(meta) if meta.is_file() && meta.len() == *size => {
                self.intact_meta(self.prev_stamp(rel), src, &meta, *size, digest, hashed)
            }
            _ => false,
        }
    }

    /// [`Self::intact`] for a regular file of the right size whose metadata is `meta`.
    fn intact_meta(
        &self,
        recorded: Option<&FileStamp>,
        src: &PrevFile,
        meta: &at::Stat,
        size: u64,
        digest: &Digest,
        hashed: &AtomicU64,
    ) -> bool {
        if recorded == Some(&FileStamp::of_stat(meta)) {
            return true;
        }
        hashed.fetch_add(1, Ordering::Relaxed);
        src.open_read()
            .is_some_and(|f| hash_matches(&f, meta.ino(), size, digest))
    }

    /// Hard-links an unchanged file from the same path of the previous release, only when its
    /// inode is exactly as flip recorded it (`recorded`: the previous release's record, with the
    /// link ledger's later link count and ctime): same inode, size, mtime, ctime, owner, group,
    /// mode and link count, and the manifest's mode. A hard link shares all of these: a file
    /// chowned or chmodded behind flip's back, an inode also linked from outside the releases,
    /// or one edited in place would otherwise be carried into the new release and every one
    /// after. Anything else is copied into a new inode (content checked against the manifest,
    /// so an edited file is transferred instead), and counted as not linked with the reason.
    /// `dst` reaches the staging tree's directories. Per file: a `statx` of the source, the
    /// `linkat` and a `statx` of the link, each relative to its directory's descriptor.
    fn link(
        &self,
        step: &FileStep,
        recorded: Option<&FileStamp>,
        src: &PrevFile,
        dst: &mut at::Cursor<'_>,
    ) -> Result<Outcome> {
        let meta = match src.stat() {
            Some(m) if m.is_file() && m.len() == step.size => m,
            _ => return Ok(TRANSFER),
        };
        if let Some(why) = why_not_linked(recorded, &FileStamp::of_stat(&meta), step.mode) {
            // A prepared stage copies nothing: the copy may not be wanted, and the restage
            // makes it if it is.
            if self.prepared.is_some() {
                return Ok(TRANSFER);
            }
            return self.copy_instead(step, src, why);
        }
        let (dir, name) = dst
            .parent_of(&step.path)
            .map_err(|e| io("open the directory of", &self.abs(&step.path))(e))?;
        match at::link_at(&src.parent, &src.name, &dir, &name) {
            Ok(()) => {
                // The stamp is taken after the link (which changes the inode's ctime), and the
                // link must be the inode that was checked.
                let linked = at::lstat_at(&dir, &name)
                    .map_err(|e| io("inspect", &self.abs(&step.path))(e))?;
                if linked.ino() != meta.ino() || linked.dev() != meta.dev() {
                    at::unlink_at(&dir, &name)
                        .map_err(|e| io("remove", &self.abs(&step.path))(e))?;
                    return Ok(TRANSFER);
                }
                Ok(Outcome::Linked(FileStamp::of_stat(&linked)))
            }
            // Too many links to one inode, another filesystem, or a link the kernel refuses
            // (`fs.protected_hardlinks` for a file the deploy user does not own): a copy does
            // the job, and fails over to a transfer if it cannot read the file either.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMLINK | libc::EXDEV | libc::EPERM | libc::EACCES)
                ) =>
            {
                self.copy_instead(step, src, format!("the kernel refused the link: {e}"))
            }
            Err(e) => Err(io("hard-link", &self.abs(&step.path))(e)),
        }
    }

    /// [`Self::copy`] of a file meant to be linked, counted as not linked (`why`).
    fn copy_instead(&self, step: &FileStep, src: &PrevFile, why: String) -> Result<Outcome> {
        Ok(match self.copy(step, src)? {
            Outcome::Copied(st) => Outcome::NotLinked(st, why),
            other => other,
        })
    }

    /// Copies a file of the previous release into a new inode with the new mode, keeping its
    /// mtime: a reflink (`FICLONE`) where the filesystem shares blocks, else a read/write copy.
    /// Either way the new file's content is hashed and must match the manifest, or the file is
    /// transferred instead.
    fn copy(&self, step: &FileStep, src: &PrevFile) -> Result<Outcome> {
        let Some(mut input) = src.open_read() else {
            return Ok(TRANSFER);
        };
        let Ok(meta) = input.metadata() else {
            return Ok(TRANSFER);
        };
        if !meta.is_file() || meta.len() != step.size {
            return Ok(TRANSFER);
        }
        let dst = self.abs(&step.path);
        let mut w = FileWriter::create(usize::MAX, &dst, step)?;
        let discard = |w: FileWriter| {
            drop(w);
            fsutil::remove_file(&dst)?;
            Ok(TRANSFER)
        };
        if step.size > 0 && w.reflink_from(&input).is_ok() {
            // Hash what the new inode holds: the check does not depend on how it was filled.
            if w.hash_contents().is_err() {
                return discard(w);
            }
        } else {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                if crate::abandoned() {
                    return discard(w);
                }
                let n = match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return discard(w),
                };
                if w.write(&buf[..n]).is_err() {
                    return discard(w);
                }
            }
        }
        if w.hasher.finalize() != blake3::Hash::from(step.digest.0) || w.written != step.size {
            return discard(w);
        }
        let stamp = w.close(step.mode, Some((meta.mtime(), meta.mtime_nsec() as u32)))?;
        Ok(Outcome::Copied(stamp))
    }

    /// Claims `plan().files[index]` for one writer: it must be one of
    /// [`needs`](Self::needs), not yet written and not being written.
    fn claim(&self, index: usize) -> Result<&FileStep> {
        let mut p = self.progress();
        if !p.pending.remove(&index) {
            return Err(Error::BadRequest(format!(
                "file #{index} is not awaiting content"
            )));
        }
        p.writing.insert(index);
        Ok(&self.plan.files[index])
    }

    /// Gives back a claim whose writer could not be made (the file awaits content again).
    fn unclaim(&self, index: usize) {
        let mut p = self.progress();
        if p.writing.remove(&index) {
            p.pending.insert(index);
        }
    }

    /// Runs `make` on a claim of `index`, giving the claim back if it fails.
    fn claimed<T>(&self, index: usize, make: impl FnOnce(&FileStep) -> Result<T>) -> Result<T> {
        let step = self.claim(index)?;
        let r = make(step);
        if r.is_err() {
            self.unclaim(index);
        }
        r
    }

    /// Opens a new file for the content of `plan().files[index]`, which must be one of
    /// [`needs`](Self::needs) and neither written nor being written. Files may be written on
    /// several threads at once (a stage is `Sync`).
    ///
    /// # Errors
    /// [`Error::BadRequest`] for an index that is not needed or already begun, or an I/O error
    /// creating the file.
    pub fn begin_file(&self, index: usize) -> Result<FileWriter> {
        self.claimed(index, |step| {
            FileWriter::create(index, &self.abs(&step.path), step)
        })
    }

    /// Checks a written file against the manifest (size, blake3), gives it its mode and mtime.
    ///
    /// # Errors
    /// [`Error::Integrity`] when the size or blake3 differs from the manifest, or an I/O error.
    pub fn finish_file(&self, mut w: FileWriter, mtime: Option<(i64, u32)>) -> Result<()> {
        if let Some((rel, mode)) = w.streamed.take() {
            return self.finish_streamed(w, rel, mode, mtime);
        }
        let index = w.index;
        if !self.progress().writing.contains(&index) {
            return Err(Error::BadRequest(format!(
                "file #{index} is not being written"
            )));
        }
        let step = &self.plan.files[index];
        let (mode, size) = (step.mode, step.size);
        w.verify(&step.path, size, &step.digest)?;
        let stamp = w.close(mode, mtime)?;
        let mut p = self.progress();
        p.stamps[index] = Some(stamp);
        p.writing.remove(&index);
        p.written += 1;
        Ok(())
    }

    /// Resolves a delta basis: a regular file of the previous release, checked on disk.
    fn basis(&self, basis: &RelPath) -> Result<(PathBuf, u64)> {
        let Some((id, prev)) = &self.prev else {
            return Err(Error::BadRequest(format!(
                "{basis}: no previous release to take a delta basis from"
            )));
        };
        let Some(EntryKind::File { size, .. }) = prev.get(basis) else {
            return Err(Error::BadRequest(format!(
                "{basis}: not a file of the previous release"
            )));
        };
        if !self.good_bases.contains(basis) {
            return Err(Error::BadRequest(format!(
                "{basis}: not a delta basis this release was offered"
            )));
        }
        Ok((self.root.release_dir(*id).join(basis.as_str()), *size))
    }

    /// Opens a delta basis (a regular file of the previous release, not through a symlink) and
    /// checks its size against the previous manifest.
    fn open_basis(&self, basis: &RelPath) -> Result<(File, PathBuf, u64)> {
        let (path, size) = self.basis(basis)?;
        // Beneath the previous release as opened when staging: a basis is good only if it was
        // checked there, so a stage that could not open it has none.
        let file = self
            .prev_tree
            .as_ref()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
            .and_then(|tree| at::Cursor::new(tree).parent_of(basis))
            .and_then(|(parent, name)| PrevFile { parent, name }.open_read_io())
            .map_err(io("open the delta basis", &path))?;
        let meta = file.metadata().map_err(io("inspect", &path))?;
        if !meta.is_file() || meta.len() != size {
            return Err(Error::Corrupt {
                path,
                detail: "the previous release's file no longer matches its manifest".into(),
            });
        }
        Ok((file, path, size))
    }

    /// Reads a basis file whole (small) or mapped (large).
    fn load_basis(&self, basis: &RelPath) -> Result<Basis> {
        let (file, path, size) = self.open_basis(basis)?;
        if size >= MMAP_THRESHOLD {
            // SAFETY: files of a complete release are never written in place by flip (new
            // content always gets a new inode); the mapping is read-only.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io("map", &path))?;
            Ok(Basis::Map(map))
        } else {
            let mut v = Vec::with_capacity(size as usize);
            (&file)
                .take(size)
                .read_to_end(&mut v)
                .map_err(io("read", &path))?;
            Ok(Basis::Mem(v))
        }
    }

    /// An rsync signature of a basis file, with a block size chosen here from the file size
    /// (never by the client). The file is read in pieces of whole blocks (at most
    /// 8 MiB at a time), so memory stays bounded whatever its size; the
    /// signature itself is 12 bytes per block (under 1% of the file).
    ///
    /// # Errors
    /// [`Error::BadRequest`] for a basis the stage did not offer, or an I/O error reading it.
    pub fn signature(&self, basis: &RelPath) -> Result<Vec<u8>> {
        let (file, path, size) = self.open_basis(basis)?;
        crate::delta::signature(&file, &path, size)
    }

    /// Starts building `plan().files[index]` from an rsync delta against `basis`, applied as
    /// it arrives ([`DeltaWriter::feed`]): copies are read from the basis file with `pread`,
    /// the output goes straight into the new file and is refused beyond the manifest size.
    /// Close it with [`DeltaWriter::finish`] and [`Stage::finish_file`].
    ///
    /// # Errors
    /// As [`Stage::begin_file`], and [`Error::BadRequest`] for a basis the stage did not offer.
    pub fn begin_delta(&self, index: usize, basis: &RelPath) -> Result<DeltaWriter> {
        self.claimed(index, |step| {
            let (size, name) = (step.size, step.path.to_string());
            let (file, path, len) = self.open_basis(basis)?;
            let applier = DeltaApplier::new(file, len, path, name, size);
            Ok(DeltaWriter {
                applier,
                file: FileWriter::create(index, &self.abs(&step.path), step)?,
            })
        })
    }

    /// Starts building `plan().files[index]` from a zstd `--patch-from` frame made against
    /// `basis` (whose content the client says has `basis_digest`), decompressed as it arrives
    /// ([`PatchWriter::feed`]) with a bounded window. Close it with [`PatchWriter::finish`]
    /// and [`Stage::finish_file`].
    ///
    /// # Errors
    /// As [`Stage::begin_delta`], and [`Error::BadRequest`] when the previous release does not
    /// hold `basis` with content `basis_digest`.
    pub fn begin_patch(
        &self,
        index: usize,
        basis: &RelPath,
        basis_digest: &Digest,
    ) -> Result<PatchWriter> {
        self.claimed(index, |step| {
            let path = &step.path;
            let known = match self.prev.as_ref().map(|(_, m)| m.get(basis)) {
                Some(Some(EntryKind::File { digest, .. })) => Some(*digest),
                _ => None,
            };
            if known != Some(*basis_digest) {
                return Err(Error::BadRequest(format!(
                    "{path}: patch made against a version of {basis} the previous release does not hold"
                )));
            }
            let base = self.load_basis(basis)?;
            let file = FileWriter::create(index, &self.abs(path), step)?;
            PatchWriter::new(base, file, path.to_string())
        })
    }

    /// Applies a whole rsync delta against `basis` to produce `plan().files[index]`
    /// ([`Stage::begin_delta`] in one piece); the output is limited to the manifest size and
    /// checked against its blake3.
    ///
    /// # Errors
    /// As [`Stage::begin_delta`], [`DeltaWriter::feed`] and [`Stage::finish_file`].
    pub fn apply_delta(
        &self,
        index: usize,
        basis: &RelPath,
        delta: &[u8],
        mtime: Option<(i64, u32)>,
    ) -> Result<()> {
        let mut d = self.begin_delta(index, basis)?;
        d.feed(delta)?;
        let w = d.finish()?;
        self.finish_file(w, mtime)
    }

    /// Decompresses a whole zstd `--patch-from` frame ([`Stage::begin_patch`] in one piece);
    /// the output is limited to the manifest size and checked against its blake3.
    ///
    /// # Errors
    /// As [`Stage::begin_patch`], [`PatchWriter::feed`] and [`Stage::finish_file`].
    pub fn apply_patch(
        &self,
        index: usize,
        basis: &RelPath,
        basis_digest: &Digest,
        patch: &[u8],
        mtime: Option<(i64, u32)>,
    ) -> Result<()> {
        let mut p = self.begin_patch(index, basis, basis_digest)?;
        p.feed(patch)?;
        let w = p.finish()?;
        self.finish_file(w, mtime)
    }

    /// Shared paths for [`Stage::commit`]: the seeds of this staged tree go into `shared/`
    /// (replaced by their symlinks), the release recorded is `s.release`, and the writable
    /// directories are made. Refused unless `s.release` is this stage's manifest with exactly the
    /// seeds replaced by symlinks (the same files otherwise, in the same order).
    ///
    /// # Errors
    /// [`Error::BadRequest`] when `s.release` does not match the staged tree so.
    pub fn set_shared(&mut self, s: crate::SharedCommit) -> Result<()> {
        let kept = self
            .manifest
            .files()
            .filter(|(p, ..)| {
                !s.seeds
                    .iter()
                    .any(|(x, _)| flip_plan::shared::is_within(p, x))
            })
            .map(|(p, ..)| p);
        if !kept.eq(s.release.files().map(|(p, ..)| p)) {
            return Err(Error::BadRequest(
                "the release's shared paths do not match the staged tree".into(),
            ));
        }
        self.shared = Some(s);
        Ok(())
    }

    /// Makes the release durable and visible as `releases/<id>` (not live: see
    /// [`Root::activate`]). Fails if any needed file has not been written.
    ///
    /// # Errors
    /// [`Error::BadRequest`] when a needed file is missing, or an I/O error flushing, recording
    /// the manifest or renaming (the staging directory is then removed).
    pub fn commit(mut self) -> Result<ReleaseInfo> {
        {
            let p = self.progress();
            let missing = p.pending.len() + p.writing.len();
            let first = p.pending.iter().chain(&p.writing).min();
            if let Some(first) = first {
                return Err(Error::BadRequest(format!(
                    "{missing} file(s) never arrived, first {}",
                    self.plan.files[*first].path
                )));
            }
        }
        crate::fault_point("before-commit");
        // Final directory modes, deepest level first (so a setgid parent passes nothing on).
        // Each is checked: mkdir may have been given fewer bits, a setgid parent more, and the
        // kernel may refuse a bit.
        for level in by_depth(self.manifest.entries()).iter().rev() {
            level.par_iter().try_for_each(|e| match e.kind {
                EntryKind::Dir { mode } => set_dir_mode(&self.abs(&e.path), mode),
                _ => Ok(()),
            })?;
        }
        // The release directory stays private (0700: nobody else can reach into it) until the
        // seeds are moved and the writable directories chowned below: a directory of the
        // release that another user may write (a world-writable one from the source, one
        // chowned to the web server's user) is theirs to swap for a symlink meanwhile, and
        // those steps work on paths.
        if let Some(shared) = self.shared.take() {
            self.fill_stamps()?;
            crate::shared::commit_shared(self.root, &self.dir, &self.manifest, &shared)?;
            // The seeds' files are no longer in the release: keep the others' identities.
            let seeds = &shared.seeds;
            let files = &self.plan.files;
            let p = self.progress.get_mut().unwrap_or_else(|e| e.into_inner());
            let stamps = std::mem::take(&mut p.stamps);
            p.stamps = stamps
                .into_iter()
                .zip(files)
                .filter(|(_, f)| {
                    !seeds
                        .iter()
                        .any(|(x, _)| flip_plan::shared::is_within(&f.path, x))
                })
                .map(|(st, _)| st)
                .collect();
            self.manifest = shared.release;
        }
        fsutil::set_mode(&self.dir, 0o755)?;
        fsutil::syncfs(&self.dir)?;
        let info = ReleaseInfo {
            id: self.id,
            label: self.label.clone(),
            created: fsutil::now(),
            files: self.manifest.file_count() as u64,
            bytes: self.manifest.total_bytes(),
            manifest_digest: self.manifest.digest().to_hex(),
            current: false,
        };
        fsutil::write_atomic_with(&self.root.manifest_path(self.id), |w| {
            flip_manifest::encode_to(&self.manifest, w)
        })?;
        self.fill_stamps()?;
        let stamps = &self
            .progress
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .stamps;
        self.root
            .write_record(self.id, stamps.iter().map(|st| st.expect("filled above")))?;
        if !self.linked.is_empty() {
            // The inodes linked now have one name more and a new ctime, in every release
            // that shares them: this release is where they can be reached.
            let mut links = self.root.read_links();
            for (_, st) in &self.linked {
                links.set(st, self.id);
            }
            self.root.write_links(&links);
        }
        fsutil::write_atomic(
            &self.root.info_path(self.id),
            &serde_json::to_vec_pretty(&info)
                .map_err(|e| io("write", &self.root.info_path(self.id))(e.into()))?,
        )?;
        crate::fault_point("before-rename");
        let dst = self.root.release_dir(self.id);
        fsutil::rename("rename the staged release to", &self.dir, &dst)?;
        fsutil::fsync_dir(&self.root.releases_dir())?;
        self.committed = true;
        crate::fault_point("after-rename");
        Ok(info)
    }
}

impl Stage<'_> {
    /// Makes sure every staged file has its identity (recorded as each was linked,
    /// copied or written; looked up again only if missing).
    fn fill_stamps(&mut self) -> Result<()> {
        let stamps = &self
            .progress
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .stamps;
        let missing: Vec<usize> = (0..stamps.len()).filter(|&i| stamps[i].is_none()).collect();
        let found: Vec<(usize, FileStamp)> = missing
            .into_par_iter()
            .map(|i| {
                let abs = self.abs(&self.plan.files[i].path);
                let m = fsutil::symlink_metadata(&abs)?;
                Ok((i, FileStamp::of(&m)))
            })
            .collect::<Result<_>>()?;
        let stamps = &mut self
            .progress
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .stamps;
        for (i, st) in found {
            stamps[i] = Some(st);
        }
        Ok(())
    }
}

impl Root {
    /// The live release's id when its manifest's digest is `digest` and the tree is intact as
    /// far as a look without reading content tells: every file the same inode, size, mtime and
    /// ctime as recorded at commit, every symlink with its target, every directory there and
    /// holding nothing else than the manifest lists (and what its hooks wrote, unchanged since).
    /// `None` otherwise (nothing live, another manifest, a record missing or damaged (then
    /// warned about) or any difference, an added file too): then a deploy of that manifest
    /// makes a new release, which repairs the tree.
    ///
    /// # Errors
    /// An I/O error reading the live release's records (a difference or a damaged record is
    /// `None`, not an error).
    pub fn live_intact(&self, digest: &Digest) -> Result<Option<u64>> {
        let Some(id) = self.current()? else {
            return Ok(None);
        };
        // A live release whose record is damaged is not intact (named, and a new release is
        // made): failing here failed every deploy until someone repaired it by hand.
        let not_intact = |e: Error| match e {
            Error::Corrupt { .. } => {
                self.warn(format!("the live release {id} is not checked: {e}"));
                Ok(None)
            }
            // Its record or manifest is gone (or its directory): the same, for the same reason.
            Error::NoSuchRelease(_) => {
                let missing: Vec<String> = [
                    self.info_path(id),
                    self.manifest_path(id),
                    self.release_dir(id),
                ]
                .iter()
                .filter(|p| fsutil::lstat_or_none(p).is_none())
                .map(|p| p.display().to_string())
                .collect();
                let why = match missing.is_empty() {
                    true => e.to_string(),
                    false => format!("{} missing", missing.join(" and ")),
                };
                self.warn(format!("the live release {id} is not checked: {why}"));
                Ok(None)
            }
            e => Err(e),
        };
        match self.info(id) {
            Ok(info) if info.manifest_digest == digest.to_hex() => {}
            Ok(_) => return Ok(None),
            Err(e) => return not_intact(e),
        }
        let manifest = match self.manifest(id) {
            Ok(m) => m,
            Err(e) => return not_intact(e),
        };
        if manifest.digest() != *digest {
            return Ok(None);
        }
        let stamps = self.expected_stamps(id, &manifest);
        if stamps.len() != manifest.len() {
            return Ok(None);
        }
        let dir = self.release_dir(id);
        let entries = manifest.entries();
        // Every directory is listed too: nothing may have been added (a script dropped into
        // the live release), beyond what its hooks wrote. Counted first: a directory holding
        // as many names as the manifest gives it holds exactly those (each of them is checked
        // to be there); only another count has its names looked up.
        let (children, top_children) = children_counts(entries);
        let known: std::sync::OnceLock<HashSet<&str>> = std::sync::OnceLock::new();
        // `mode`: the directory's permission bits as the manifest has them (None: not in it).
        let added = |rel: &str,
                     dir: RawFd,
                     name: &CStr,
                     expected: u32,
                     mode: Option<u32>|
         -> Option<Vec<String>> {
            let mut count = 0u32;
            let found = at::list_at(dir, name, &mut |_| count += 1).ok()?;
            // Its mode changed: a difference, unless a hook's (recorded) chmod.
            let mut extra: Vec<String> = Vec::new();
            if mode.is_some_and(|m| m != found) {
                extra.push(rel.to_string());
            }
            if count == expected {
                return Some(extra);
            }
            let known = known.get_or_init(|| entries.iter().map(|e| e.path.as_str()).collect());
            let path = |n: &str| match rel {
                "" => n.to_string(),
                _ => format!("{rel}/{n}"),
            };
            at::list_at(dir, name, &mut |n| match std::str::from_utf8(n) {
                Ok(n) => extra.extend(Some(path(n)).filter(|p| !known.contains(p.as_str()))),
                // Never a manifest's name.
                Err(_) => extra.push(path(&String::from_utf8_lossy(n))),
            })
            .ok()?;
            Some(extra)
        };
        let Ok(top) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
            return Ok(None);
        };
        let Some(mut extra) = added("", libc::AT_FDCWD, &top, top_children, None) else {
            return Ok(None);
        };
        let checked = at::par_entries(&dir, entries, |i, e, at| {
            let (dir, name) = at?;
            let same = match &e.kind {
                EntryKind::File { .. } => stamps[i].is_some_and(|st| {
                    at::lstat_at(dir, name).is_ok_and(|m| FileStamp::of_stat(&m) == st)
                }),
                EntryKind::Symlink { target } => {
                    at::read_link_at(dir, name).is_ok_and(|t| t == target.as_bytes())
                }
                // Listed (never through a symlink: ELOOP), which also tells it is there.
                EntryKind::Dir { mode } => {
                    return added(
                        e.path.as_str(),
                        dir.as_raw_fd(),
                        name,
                        children[i],
                        Some(*mode),
                    );
                }
            };
            same.then(Vec::new)
        });
        let Some(checked) = checked.into_iter().collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        extra.extend(checked.into_iter().flatten());
        // What a directory the hooks made holds is theirs only if recorded too.
        let mut i = 0;
        while i < extra.len() {
            let path = dir.join(&extra[i]);
            if fsutil::lstat_or_none(&path).is_some_and(|m| m.is_dir()) {
                let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
                    return Ok(None);
                };
                let rel = extra[i].clone();
                // Never equal to u32::MAX names: every name is looked up.
                let Some(inner) = added(&rel, libc::AT_FDCWD, &c, u32::MAX, None) else {
                    return Ok(None);
                };
                extra.extend(inner);
            }
            i += 1;
        }
        if !extra.is_empty() {
            let diffs = extra
                .into_iter()
                .map(|p| {
                    let m = format!("{p}: not in the manifest");
                    (p, m)
                })
                .collect();
            if !self
                .without_hook_writes(id, &dir, &manifest, diffs, false)
                .is_empty()
            {
                return Ok(None);
            }
        }
        Ok(Some(id))
    }
}

/// How many entries of `entries` (a manifest's, in path order: a directory's descendants
/// follow it) are directly in each directory entry (by index; 0 for the others), and directly
/// at the top.
fn children_counts(entries: &[flip_manifest::Entry]) -> (Vec<u32>, u32) {
    let mut children = vec![0u32; entries.len()];
    let mut top = 0u32;
    let mut open: Vec<usize> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let p = e.path.as_str();
        while let Some(&d) = open.last() {
            let dp = entries[d].path.as_str();
            if p.len() > dp.len() && p.starts_with(dp) && p.as_bytes()[dp.len()] == b'/' {
                break;
            }
            open.pop();
        }
        match open.last() {
            Some(&d) => children[d] += 1,
            None => top += 1,
        }
        if matches!(e.kind, EntryKind::Dir { .. }) {
            open.push(i);
        }
    }
    (children, top)
}

/// A file of the previous release, reached from the release directory without following any
/// symlink ([`at::Tree`]): a directory of a committed release replaced by a symlink (to `/etc`,
/// or anywhere outside the root) is never walked through, so nothing outside the release is
/// ever linked, copied, hashed or used as a basis. Every operation works on the directory the
/// walk opened (`*at` calls), so swapping a directory for a symlink after the walk changes
/// nothing either.
struct PrevFile {
    /// The file's parent directory (an `O_PATH` descriptor).
    parent: std::sync::Arc<std::os::fd::OwnedFd>,
    name: std::ffi::CString,
}

impl PrevFile {
    /// `rel` of the tree `prev` walks; `None` when a component on the way is not a real
    /// directory (a symlink, a file, missing) or a name cannot be passed to the kernel.
    fn reach(prev: &mut at::Cursor<'_>, rel: &RelPath) -> Option<PrevFile> {
        let (parent, name) = prev.parent_of(rel).ok()?;
        Some(PrevFile { parent, name })
    }

    /// The entry's own metadata (a symlink's, never its target's); `None` if it is gone.
    fn stat(&self) -> Option<at::Stat> {
        at::lstat_at(&self.parent, &self.name).ok()
    }

    /// The entry opened for reading, refusing a symlink (and never blocking on a FIFO).
    fn open_read(&self) -> Option<File> {
        self.open_read_io().ok()
    }

    fn open_read_io(&self) -> std::io::Result<File> {
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        at::openat(self.parent.as_raw_fd(), &self.name, flags).map(File::from)
    }
}

/// Whether `kind` (a directory or symlink of a new manifest) is what `old` has at its path:
/// a directory, or a symlink to the same target.
fn same_dir_or_symlink(kind: &EntryKind, old: Option<&EntryKind>) -> bool {
    match (kind, old) {
        (EntryKind::Dir { .. }, Some(EntryKind::Dir { .. })) => true,
        (EntryKind::Symlink { target: a }, Some(EntryKind::Symlink { target: b })) => a == b,
        _ => false,
    }
}

impl Outcome {
    /// Whether something was made for the file (anything but awaiting its content).
    fn staged(&self) -> bool {
        !matches!(self, Outcome::Transfer { .. })
    }
}

/// Files between two looks at whether a prepared stage is to stop ([`Root::prepare`]).
const STOP_EVERY: u64 = 256;

/// How many paths the warning about files copied instead of linked names.
const NAMED_NOT_LINKED: usize = 3;

/// Why a file of the previous release whose inode on disk is `now` must not be hard-linked
/// into a new release with permission bits `mode`, given what is expected of it (`recorded`);
/// `None` when it may be.
fn why_not_linked(recorded: Option<&FileStamp>, now: &FileStamp, mode: u32) -> Option<String> {
    if now.mode & MODE_MASK != mode {
        return Some(format!(
            "mode {:04o}, the new release's is {mode:04o}",
            now.mode & MODE_MASK
        ));
    }
    let Some(r) = recorded else {
        return Some("no usable record of it".into());
    };
    Some(if !r.full {
        "its record is of format 2, without owner, mode or link count".into()
    } else if r.ino != now.ino {
        "another inode than the one recorded".into()
    } else if (r.uid, r.gid) != (now.uid, now.gid) {
        format!(
            "owner {}:{}, recorded {}:{}",
            now.uid, now.gid, r.uid, r.gid
        )
    } else if r.mode != now.mode {
        format!("mode {:o}, recorded {:o}", now.mode, r.mode)
    } else if r.nlink < now.nlink {
        format!(
            "{} links, {} expected: it is also linked from elsewhere",
            now.nlink, r.nlink
        )
    } else if r.nlink != now.nlink {
        format!(
            "{} links, {} expected: a name of it was removed behind flip's back",
            now.nlink, r.nlink
        )
    } else if r != now {
        "changed since it was recorded (size, mtime or ctime)".into()
    } else {
        return None;
    })
}

/// Whether the open regular file `file` (expected to be inode `ino`) holds exactly `size` bytes
/// hashing to `digest`, and was not written to while it was read.
fn hash_matches(file: &File, ino: u64, size: u64, digest: &Digest) -> bool {
    let Ok(before) = file.metadata() else {
        return false;
    };
    if !before.is_file() || before.ino() != ino || before.len() != size {
        return false;
    }
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        if crate::abandoned() {
            return false;
        }
        match (&*file).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
                if total > size {
                    return false;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    let unchanged = file
        .metadata()
        .is_ok_and(|after| FileStamp::of(&after) == FileStamp::of(&before));
    unchanged && total == size && Digest::from(h.finalize()) == *digest
}

/// Gives a staged directory exactly `mode` (all 12 bits) and checks that it has it.
fn set_dir_mode(path: &Path, mode: u32) -> Result<()> {
    let have = fsutil::symlink_metadata(path)?.mode() & MODE_MASK;
    if have == mode {
        return Ok(());
    }
    fsutil::set_mode(path, mode)?;
    let got = fsutil::symlink_metadata(path)?.mode() & MODE_MASK;
    check_mode(path, mode, got)
}

/// The error for a mode the kernel did not keep (it clears setgid, silently, for a group the
/// user is not in; some filesystems refuse set-id bits).
fn check_mode(path: &Path, wanted: u32, got: u32) -> Result<()> {
    if got == wanted {
        return Ok(());
    }
    Err(Error::Io {
        op: "set the permission bits of",
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "mode {wanted:04o} was asked for, the filesystem kept {got:04o} (setgid needs the \
                 deploying user to be in the file's group; set-id and sticky bits may be refused)"
            ),
        ),
    })
}

/// The directories and symlinks of `entries`, grouped by depth (top level first).
fn by_depth(entries: &[flip_manifest::Entry]) -> Vec<Vec<&flip_manifest::Entry>> {
    let mut levels: Vec<Vec<&flip_manifest::Entry>> = Vec::new();
    for e in entries
        .iter()
        .filter(|e| !matches!(e.kind, EntryKind::File { .. }))
    {
        let d = e.path.depth() - 1;
        if levels.len() <= d {
            levels.resize_with(d + 1, Vec::new);
        }
        levels[d].push(e);
    }
    levels
}

/// The mode a staged directory is created with: its final `mode` when `mkdir` under the
/// process umask gives exactly that and the owner can fill it (then commit leaves it alone),
/// else owner-only and writable (commit sets the final mode, so a read-only directory can still
/// be filled).
fn initial_dir_mode(mode: u32, umask: Option<u32>) -> u32 {
    match umask {
        // mkdir ignores set-id bits: those are set at commit.
        Some(u) if mode & 0o700 == 0o700 && mode & u == 0 && mode & 0o7000 == 0 => mode,
        _ => 0o700,
    }
}

impl Drop for Stage<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fsutil::remove_tree(&self.dir);
            self.unlinked();
        }
    }
}

impl Stage<'_> {
    /// After the staging tree is removed: each inode it had linked has one name less and a new
    /// ctime again. The ledger learns that state where the previous release still holds the
    /// inode as it was (but for that name); anything else is left to mismatch (a copy next
    /// time, never a link).
    fn unlinked(&mut self) {
        let linked = std::mem::take(&mut self.linked);
        let _ = self.forget_links(&linked);
    }

    /// The ledger learns of each link of `links` (plan index, stamp just after the link) that
    /// was removed: where the previous release still holds the inode as it was but for that
    /// name, its one name less and new ctime. Returns the ledger written, if any.
    fn forget_links(&self, links: &[(usize, FileStamp)]) -> Option<crate::record::Links> {
        let (Some(tree), Some((prev, _))) = (self.prev_tree.as_ref(), self.prev.as_ref()) else {
            return None;
        };
        if links.is_empty() {
            return None;
        }
        let mut ledger = self.root.read_links();
        let mut cursor = at::Cursor::new(tree);
        for (i, was) in links {
            let Ok((dir, name)) = cursor.parent_of(&self.plan.files[*i].path) else {
                continue;
            };
            let Ok(now) = at::lstat_at(&dir, &name).map(|m| FileStamp::of_stat(&m)) else {
                continue;
            };
            let same = was.same_but_links(&now);
            if same && now.nlink + 1 == was.nlink {
                let holder = ledger.get(now.ino).map_or(*prev, |l| l.holder);
                ledger.set(&now, holder);
            }
        }
        self.root.write_links(&ledger);
        Some(ledger)
    }
}

/// A delta or patch basis in memory: read whole (small) or mapped (large).
pub(crate) enum Basis {
    Mem(Vec<u8>),
    Map(memmap2::Mmap),
}

impl std::ops::Deref for Basis {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Basis::Mem(v) => v,
            Basis::Map(m) => m,
        }
    }
}

/// A new file being written: hashed as it is written, refused past its manifest size.
pub struct FileWriter {
    index: usize,
    path: PathBuf,
    file: File,
    hasher: blake3::Hasher,
    written: u64,
    /// The manifest size: no more is written.
    pub(crate) limit: u64,
    /// A file streamed before the manifest: its path in the release and mode.
    streamed: Option<(RelPath, u32)>,
}

impl FileWriter {
    /// A writer for `step`'s file at `path` (plan index `index`).
    fn create(index: usize, path: &Path, step: &FileStep) -> Result<FileWriter> {
        Self::create_new(index, path, step.mode, step.size, None)
    }

    /// Creates `path` (`O_EXCL|O_NOFOLLOW`) with permission bits `mode` to take at most `limit`
    /// bytes; `streamed` for a file streamed before the manifest.
    fn create_new(
        index: usize,
        path: &Path,
        mode: u32,
        limit: u64,
        streamed: Option<(RelPath, u32)>,
    ) -> Result<FileWriter> {
        let file = fsutil::open_with(
            "create",
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                // Its final permission bits (but the special ones) from the start: `close`
                // then needs no chmod unless the umask took some away.
                .mode(mode & 0o777)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC),
            path,
        )?;
        Ok(FileWriter {
            index,
            path: path.to_path_buf(),
            file,
            hasher: blake3::Hasher::new(),
            written: 0,
            limit,
            streamed,
        })
    }

    /// The plan index this writer fills.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Appends `data` to the file (hashing it on the way).
    ///
    /// # Errors
    /// [`Error::Integrity`] beyond the manifest size, or an I/O error writing.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        if self.written + data.len() as u64 > self.limit {
            return Err(Error::Integrity {
                path: self.path.display().to_string(),
                detail: format!("more than the {} bytes the manifest says", self.limit),
            });
        }
        self.file.write_all(data).map_err(io("write", &self.path))?;
        self.hasher.update(data);
        self.written += data.len() as u64;
        Ok(())
    }

    /// Fills the (empty) file with a reflink of `src`'s blocks (`FICLONE`): no data is copied
    /// where the filesystem supports it. Fails, leaving the file empty, where it does not.
    fn reflink_from(&mut self, src: &File) -> std::io::Result<()> {
        // SAFETY: FICLONE takes the source descriptor as its argument; both fds are open.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::FICLONE as _, src.as_raw_fd()) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Hashes what the file holds now (after a reflink), counting it as written, up to the
    /// manifest size.
    fn hash_contents(&mut self) -> Result<()> {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match self.file.read_at(&mut buf, self.written) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io("read", &self.path)(e)),
            };
            if self.written + n as u64 > self.limit {
                return Err(Error::Integrity {
                    path: self.path.display().to_string(),
                    detail: format!("more than the {} bytes the manifest says", self.limit),
                });
            }
            self.hasher.update(&buf[..n]);
            self.written += n as u64;
        }
    }

    fn verify(&self, rel: &RelPath, size: u64, digest: &Digest) -> Result<()> {
        if self.written != size {
            return Err(Error::Integrity {
                path: rel.to_string(),
                detail: format!("{} bytes arrived, the manifest says {size}", self.written),
            });
        }
        if Digest::from(self.hasher.finalize()) != *digest {
            return Err(Error::Integrity {
                path: rel.to_string(),
                detail: "blake3 differs".into(),
            });
        }
        Ok(())
    }

    /// Gives the file its mode (all 12 bits, checked: the kernel may drop some) and mtime;
    /// returns its stamp.
    fn close(self, mode: u32, mtime: Option<(i64, u32)>) -> Result<FileStamp> {
        if let Some((secs, nanos)) = mtime {
            let ts = libc::timespec {
                tv_sec: secs as libc::time_t,
                tv_nsec: nanos.min(999_999_999) as libc::c_long,
            };
            let times = [ts, ts];
            // SAFETY: futimens reads two timespecs from a live array; the fd is ours.
            if unsafe { libc::futimens(self.file.as_raw_fd(), times.as_ptr()) } != 0 {
                return Err(io("set the mtime of", &self.path)(
                    std::io::Error::last_os_error(),
                ));
            }
        }
        let mut m = self.file.metadata().map_err(io("inspect", &self.path))?;
        // Created with its permission bits: a chmod only when the umask dropped some or
        // special bits are wanted (then the identity is read again: the chmod moved ctime).
        if m.mode() & MODE_MASK != mode {
            self.file
                .set_permissions(fs::Permissions::from_mode(mode))
                .map_err(io("chmod", &self.path))?;
            m = self.file.metadata().map_err(io("inspect", &self.path))?;
        }
        check_mode(&self.path, mode, m.mode() & MODE_MASK)?;
        Ok(FileStamp::of(&m))
    }
}

/// Compares a tree on disk with a manifest: every entry's kind, mode, size, content and target,
/// and nothing extra. Returns one (path, message) per difference, sorted by message.
///
/// `expected`: the files' stamps as recorded at commit, by position in the manifest's entries
/// (empty: unknown); a file whose inode is exactly as recorded is not read again.
pub(crate) fn tree_differences(
    dir: &Path,
    manifest: &Manifest,
    expected: &[Option<FileStamp>],
) -> Vec<(String, String)> {
    let mut problems: Vec<(String, String)> = manifest
        .entries()
        .par_iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let st = expected.get(i).and_then(Option::as_ref);
            difference(dir, e, st).map(|m| (e.path.to_string(), m))
        })
        .collect();
    let mut listed = Vec::new();
    list_tree(dir, dir, &mut listed, &mut problems);
    for (rel, utf8) in listed {
        match RelPath::new(rel.clone()) {
            // A name that is not UTF-8 is shown lossily, and is never a manifest's name.
            Ok(p) if utf8 && manifest.get(&p).is_some() => {}
            _ => problems.push((rel.clone(), format!("{rel}: not in the manifest"))),
        }
    }
    // In path order: an added directory comes before what it holds.
    problems.sort();
    problems
}

/// How entry `e` of a manifest differs in the tree at `dir`, if it does.
fn difference(
    dir: &Path,
    e: &flip_manifest::Entry,
    expected: Option<&FileStamp>,
) -> Option<String> {
    let p = dir.join(e.path.as_str());
    // A difference names the entry's path (relative to the release); its error is the cause.
    #[allow(clippy::disallowed_methods)]
    let meta = match fs::symlink_metadata(&p) {
        Ok(m) => m,
        Err(err) => return Some(format!("{}: {err}", e.path)),
    };
    match &e.kind {
        EntryKind::Dir { mode } => {
            if !meta.is_dir() {
                Some(format!("{}: not a directory", e.path))
            } else if meta.mode() & MODE_MASK != *mode {
                Some(format!(
                    "{}: mode {:04o}, expected {mode:04o}",
                    e.path,
                    meta.mode() & MODE_MASK
                ))
            } else {
                None
            }
        }
        EntryKind::Symlink { target } => match fsutil::read_link(&p) {
            Ok(t) if t.as_os_str() == target.as_str() => None,
            Ok(t) => Some(format!(
                "{}: points to {}, expected {target}",
                e.path,
                t.display()
            )),
            Err(_) => Some(format!("{}: not a symlink", e.path)),
        },
        EntryKind::File { mode, size, digest } => {
            if !meta.file_type().is_file() {
                return Some(format!("{}: not a regular file", e.path));
            }
            if meta.mode() & MODE_MASK != *mode {
                return Some(format!(
                    "{}: mode {:04o}, expected {mode:04o}",
                    e.path,
                    meta.mode() & MODE_MASK
                ));
            }
            if meta.len() != *size {
                return Some(format!("{}: {} bytes, expected {size}", e.path, meta.len()));
            }
            if expected.is_some_and(|st| *st == FileStamp::of(&meta)) {
                // The inode written and checked at commit, untouched since (ctime cannot be set
                // back).
                return None;
            }
            // Read, never mapped: a file truncated during the check (by the
            // application) must be a difference, not a SIGBUS.
            match hash_file(&p, *size) {
                Ok(d) if d == *digest => None,
                Ok(_) => Some(format!("{}: content differs from the manifest", e.path)),
                Err(err) => Some(format!("{}: {err}", e.path)),
            }
        }
    }
}

/// The blake3 of the regular file at `path` (not through a symlink at its end, never blocking
/// on a FIFO), read in pieces, at most `size` bytes (what it should hold) and one more: a file
/// swapped, between the caller's `lstat` and this open, for a device or a bigger file is a
/// difference, never read without end.
pub(crate) fn hash_file(path: &Path, size: u64) -> std::io::Result<Digest> {
    // The caller's difference names the entry's path; the error here is the cause alone.
    #[allow(clippy::disallowed_methods)]
    let f = fsutil::read_own().open(path)?;
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(std::io::Error::other(
            "not a regular file (replaced meanwhile)",
        ));
    }
    let mut f = f.take(size.saturating_add(1));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut read = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) if read == size => return Ok(Digest::from(h.finalize())),
            Ok(0) => {
                return Err(std::io::Error::other(format!(
                    "{read} bytes read, {size} expected (changed meanwhile)"
                )))
            }
            Ok(n) => {
                read += n as u64;
                if read > size {
                    return Err(std::io::Error::other(format!(
                        "more than the {size} bytes expected (changed meanwhile)"
                    )));
                }
                h.update(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Every entry under `dir` (never through a symlink), as its path relative to `base` (shown
/// lossily) and whether that path is UTF-8; a directory that cannot be read is a problem of
/// its own (what it holds is unknown).
fn list_tree(
    base: &Path,
    dir: &Path,
    out: &mut Vec<(String, bool)>,
    problems: &mut Vec<(String, String)>,
) {
    let rel_of = |p: &Path| {
        let rel = p.strip_prefix(base).unwrap_or(p);
        (rel.to_string_lossy().into_owned(), rel.to_str().is_some())
    };
    let unreadable = |e: std::io::Error, problems: &mut Vec<(String, String)>| {
        let (rel, _) = rel_of(dir);
        let shown = if rel.is_empty() { "." } else { rel.as_str() };
        let m = format!("{shown}: cannot be read ({e}): what it holds is unknown");
        problems.push((rel, m));
    };
    // The difference names the path; the error is the cause alone.
    #[allow(clippy::disallowed_methods)]
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => return unreadable(e, problems),
    };
    for e in rd {
        let e = match e {
            Ok(e) => e,
            Err(e) => return unreadable(e, problems),
        };
        let p = e.path();
        out.push(rel_of(&p));
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            list_tree(base, &p, out, problems);
        }
    }
}

#[cfg(test)]
// The tests write, damage and remove targets' files on purpose.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::{Holder, Wait};
    use flip_manifest::Entry;

    /// A file swapped for a device, or grown, between a check's `lstat` and its read is a
    /// difference after at most its expected size and one byte: `/dev/zero` is never read
    /// without end (a rollback's check held the lock forever reading it).
    #[test]
    fn hash_file_reads_no_more_than_the_expected_size_and_only_regular_files() {
        let e = hash_file(Path::new("/dev/zero"), 4).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        fs::write(&p, b"12345").unwrap();
        assert_eq!(hash_file(&p, 5).unwrap(), Digest::of(b"12345"));
        let e = hash_file(&p, 4).unwrap_err();
        assert!(e.to_string().contains("more than the 4 bytes"), "{e}");
        let e = hash_file(&p, 6).unwrap_err();
        assert!(e.to_string().contains("5 bytes read, 6 expected"), "{e}");
    }

    fn manifest(files: &[(&str, &[u8], u32)]) -> Manifest {
        let mut entries = Vec::new();
        for (p, data, mode) in files {
            entries.push(Entry {
                path: RelPath::new(*p).unwrap(),
                kind: EntryKind::File {
                    mode: *mode,
                    size: data.len() as u64,
                    digest: Digest::of(data),
                },
            });
        }
        Manifest::new(entries).unwrap()
    }

    fn holder() -> Holder {
        Holder {
            pid: std::process::id(),
            host: "test".into(),
            user: "test".into(),
            since: 0,
            what: "deploy".into(),
            run: None,
        }
    }

    /// Stages `files` as a new release against the live one, fills what it needs from `files`,
    /// commits and activates it; returns the stage's stats and the bases it offered.
    fn deploy(root: &Root, files: &[(&str, &[u8], u32)]) -> (StageStats, Vec<Option<RelPath>>) {
        let lock = root.lock(&holder(), Wait::No).unwrap();
        let stage = root.stage(&lock, manifest(files), None).unwrap();
        let needs = stage.needs().to_vec();
        let bases = needs
            .iter()
            .map(|&i| stage.basis_of(i).map(|(b, _)| b))
            .collect();
        for i in needs {
            let path = stage.plan().files[i].path.clone();
            let data = files.iter().find(|f| f.0 == path.as_str()).unwrap().1;
            let mut w = stage.begin_file(i).unwrap();
            w.write(data).unwrap();
            stage.finish_file(w, None).unwrap();
        }
        let stats = stage.stats().clone();
        let info = stage.commit().unwrap();
        root.activate(&lock, info.id).unwrap();
        (stats, bases)
    }

    /// Writes one byte of `p` in place and puts its mtime back (as `touch -r` would).
    fn tamper(p: &Path) {
        // Past the coarse clock tick of the stamp taken at commit, so the ctime moves.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let m = fs::symlink_metadata(p).unwrap();
        let f = OpenOptions::new().write(true).open(p).unwrap();
        f.write_at(b"X", 0).unwrap();
        let t = std::time::UNIX_EPOCH
            + std::time::Duration::new(m.mtime() as u64, m.mtime_nsec() as u32);
        f.set_modified(t).unwrap();
        drop(f);
        let n = fs::symlink_metadata(p).unwrap();
        assert_eq!(
            (n.ino(), n.len(), n.mtime(), n.mtime_nsec()),
            (m.ino(), m.len(), m.mtime(), m.mtime_nsec())
        );
    }

    /// A tree from `(path, spec)`: `"d755"` a directory, `"l:TARGET"` a symlink,
    /// `"f644:CONTENT"` a file.
    fn tree(specs: &[(&str, &str)]) -> (Manifest, Vec<(String, Vec<u8>)>) {
        let mut entries = Vec::new();
        let mut data = Vec::new();
        for (p, spec) in specs {
            let kind = if let Some(m) = spec.strip_prefix('d') {
                EntryKind::Dir {
                    mode: u32::from_str_radix(m, 8).unwrap(),
                }
            } else if let Some(t) = spec.strip_prefix("l:") {
                EntryKind::Symlink { target: t.into() }
            } else {
                let (m, c) = spec[1..].split_once(':').unwrap();
                data.push((p.to_string(), c.as_bytes().to_vec()));
                EntryKind::File {
                    mode: u32::from_str_radix(m, 8).unwrap(),
                    size: c.len() as u64,
                    digest: Digest::of(c.as_bytes()),
                }
            };
            entries.push(Entry {
                path: RelPath::new(*p).unwrap(),
                kind,
            });
        }
        (Manifest::new(entries).unwrap(), data)
    }

    /// Fills what `stage` needs from `data`, commits and activates it; returns its stats and
    /// its needs (with the bases offered).
    fn finish(
        root: &Root,
        lock: &LockGuard,
        stage: Stage<'_>,
        data: &[(String, Vec<u8>)],
    ) -> (StageStats, Vec<(String, Option<RelPath>)>) {
        let needs: Vec<usize> = stage.needs().to_vec();
        let mut offered = Vec::new();
        for i in needs {
            let path = stage.plan().files[i].path.clone();
            offered.push((path.to_string(), stage.basis_of(i).map(|(b, _)| b)));
            let bytes = &data.iter().find(|f| f.0 == path.as_str()).unwrap().1;
            let mut w = stage.begin_file(i).unwrap();
            w.write(bytes).unwrap();
            stage.finish_file(w, None).unwrap();
        }
        let stats = stage.stats().clone();
        let info = stage.commit().unwrap();
        root.activate(lock, info.id).unwrap();
        (stats, offered)
    }

    /// A release as the tests compare it: each entry's path, kind, mode, content or target,
    /// and whether a file shares its inode with the same path of release `prev`.
    fn listing(root: &Root, id: u64, prev: u64) -> Vec<String> {
        let dir = root.release_dir(id);
        let mut out = Vec::new();
        for e in walkdir(&dir) {
            let rel = e.strip_prefix(&dir).unwrap();
            let m = fs::symlink_metadata(&e).unwrap();
            let what = if m.is_dir() {
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&e).unwrap().display())
            } else {
                let shared = fs::symlink_metadata(root.release_dir(prev).join(rel))
                    .is_ok_and(|o| o.ino() == m.ino());
                format!("{:?} shared {shared}", fs::read(&e).unwrap())
            };
            out.push(format!("{} {:o} {what}", rel.display(), m.mode() & 0o7777));
        }
        out.sort();
        out
    }

    fn walkdir(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                out.extend(walkdir(&p));
            }
            out.push(p);
        }
        out
    }

    /// A prepared stage, restaged for a new manifest, builds the release a stage of that
    /// manifest builds: the same entries, modes, contents and symlink targets, the same files
    /// shared with the live release, the same needs and bases, the same counts; and the link
    /// ledger is left as right (the next deploy links every unchanged file); also when the
    /// prepare stopped part way (the manifest came). Covers files kept,
    /// changed, removed, renamed, made empty, given another mode; directories and symlinks
    /// kept, removed (with their contents), retargeted, and paths that change kind.
    /// Unchanged files added to both trees of the test below, more than a prepare links
    /// between two looks at whether to stop.
    const FILL: usize = 3 * STOP_EVERY as usize;

    fn with_fill(specs: &[(&str, &str)]) -> (Manifest, Vec<(String, Vec<u8>)>) {
        let names: Vec<String> = (0..FILL).map(|i| format!("fill/{i:04}")).collect();
        let mut all = specs.to_vec();
        all.push(("fill", "d755"));
        all.extend(names.iter().map(|n| (n.as_str(), "f644:fill")));
        tree(&all)
    }

    #[test]
    fn a_restaged_prepared_stage_builds_what_a_stage_builds() {
        let v1 = with_fill(&[
            ("app", "d755"),
            ("app/keep.php", "f644:keep"),
            ("app/change.php", "f644:change one"),
            ("app/gone.php", "f644:gone"),
            ("app/mode.sh", "f644:#!/bin/sh"),
            ("app/empty", "f644:"),
            ("old", "d755"),
            ("old/x.php", "f644:moved away"),
            ("old/deep", "d700"),
            ("old/deep/y", "f600:deep"),
            ("link", "l:app"),
            ("lchange", "l:a"),
            ("kind", "f644:a file, then a directory"),
            ("kind2", "d755"),
            ("kind2/z", "f644:in a directory, then the directory a file"),
            ("ro", "d555"),
            ("ro/f", "f444:read only"),
        ]);
        let v2 = with_fill(&[
            ("app", "d750"),
            ("app/keep.php", "f644:keep"),
            ("app/change.php", "f644:change two"),
            ("app/mode.sh", "f755:#!/bin/sh"),
            ("app/empty", "f644:"),
            ("app/new.php", "f644:new"),
            ("app/renamed.php", "f644:moved away"),
            ("link", "l:app"),
            ("lchange", "l:b"),
            ("kind", "d755"),
            ("kind/inner", "f644:inner"),
            ("kind2", "f644:a file now"),
            ("ro", "d555"),
            ("ro/f", "f444:read only"),
            ("ro/g", "f444:also read only"),
            ("new", "d750"),
            ("new/f", "f644:f"),
        ]);
        let t = tempfile::tempdir().unwrap();
        let mut results = Vec::new();
        for (prepared, stop) in [(false, false), (true, false), (true, true)] {
            // `stop`: the manifest arrives while the prepare is under way.
            let stop = move || stop;
            let root = Root::open_or_init(&t.path().join(format!("t{}", results.len()))).unwrap();
            let lock = root.lock(&holder(), Wait::No).unwrap();
            let stage = root.stage(&lock, v1.0.clone(), None).unwrap();
            finish(&root, &lock, stage, &v1.1);
            // A file not as recorded (its mode changed behind flip's back): copied, not linked.
            let keep = root.release_dir(1).join("app/keep.php");
            fs::set_permissions(&keep, fs::Permissions::from_mode(0o600)).unwrap();
            let stage = match prepared {
                false => root.stage(&lock, v2.0.clone(), None).unwrap(),
                true => {
                    let live = (1, root.manifest(1).unwrap());
                    let mut stage = root.prepare(&lock, live, &stop).unwrap().unwrap();
                    assert!(stage.prepared());
                    // It copies nothing (the restage does, what the new release keeps).
                    assert_eq!(stage.stats().not_linked, 0);
                    // Stopped, it linked the files begun before its first look only.
                    let linked = stage.stats().linked as usize;
                    match stop() {
                        true => assert!(linked < STOP_EVERY as usize, "{linked}"),
                        false => assert!(linked > FILL, "{linked}"),
                    }
                    stage.restage(v2.0.clone(), Some("v2".into())).unwrap();
                    assert!(!stage.prepared());
                    stage
                }
            };
            let (stats, offered) = finish(&root, &lock, stage, &v2.1);
            let release = listing(&root, 2, 1);
            // The ledger: every unchanged file is linked again, nothing hashed or copied.
            let stage = root.stage(&lock, v2.0.clone(), None).unwrap();
            let again = stage.stats().clone();
            assert_eq!(
                (
                    again.linked,
                    again.copied,
                    again.hashed,
                    stage.needs().len()
                ),
                (10 + FILL as u64, 1, 0, 0),
                "prepared: {prepared}"
            );
            drop(stage);
            let leftovers: Vec<_> = fs::read_dir(root.releases_dir())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(STAGING_PREFIX))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
            results.push((stats, offered, release));
        }
        assert_eq!(results[0], results[1]);
        assert_eq!(results[0], results[2]);
        let (stats, offered, release) = &results[0];
        assert_eq!(
            (stats.linked, stats.copied, stats.written),
            (1 + FILL as u64, 4, 6),
            "{stats:?}"
        );
        assert!(
            offered.contains(&(
                "app/change.php".into(),
                Some(RelPath::new("app/change.php").unwrap())
            )),
            "{offered:?}"
        );
        assert!(
            release.contains(&"app/keep.php 644 [107, 101, 101, 112] shared false".to_string()),
            "{release:#?}"
        );
        assert!(
            release.contains(&"lchange 777 -> b".to_string()),
            "{release:#?}"
        );
        assert!(release.contains(&"ro 555 dir".to_string()), "{release:#?}");
    }

    /// A prepared stage dropped without a restage leaves nothing behind, and the ledger as it
    /// was: the next deploy links every file.
    #[test]
    fn a_prepared_stage_dropped_unused_leaves_the_target_as_it_was() {
        let (m, data) = tree(&[("d", "d755"), ("d/a", "f644:a"), ("b", "f600:b")]);
        let t = tempfile::tempdir().unwrap();
        let root = Root::open_or_init(&t.path().join("t")).unwrap();
        let lock = root.lock(&holder(), Wait::No).unwrap();
        let stage = root.stage(&lock, m.clone(), None).unwrap();
        finish(&root, &lock, stage, &data);
        // Not the live release: nothing is prepared.
        assert!(root
            .prepare(&lock, (7, m.clone()), &|| false)
            .unwrap()
            .is_none());
        let stage = root
            .prepare(&lock, (1, m.clone()), &|| false)
            .unwrap()
            .unwrap();
        assert!(root
            .releases_dir()
            .join(format!("{STAGING_PREFIX}2"))
            .is_dir());
        drop(stage);
        assert!(!root
            .releases_dir()
            .join(format!("{STAGING_PREFIX}2"))
            .exists());
        let stage = root.stage(&lock, m, None).unwrap();
        let st = stage.stats().clone();
        assert_eq!((st.linked, st.copied, st.hashed), (2, 0, 0));
    }

    #[test]
    fn intact_files_are_linked_without_hashing_and_tampered_ones_are_sent() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::open_or_init(&t.path().join("t")).unwrap();
        let big = vec![b'a'; 20_000];
        let v1: &[(&str, &[u8], u32)] = &[
            ("a", b"aaaa", 0o644),
            ("b", &big, 0o644),
            ("c", b"cc", 0o4755),
        ];
        deploy(&root, v1);
        let (st, _) = deploy(&root, v1);
        assert_eq!((st.linked, st.hashed, st.written), (3, 0, 0));

        // Tampered in place, mtime put back: not linked, its copy fails the content check,
        // and it is sent again.
        tamper(&root.release_dir(2).join("a"));
        let (st, _) = deploy(&root, v1);
        assert_eq!((st.linked, st.copied, st.written), (2, 0, 1));

        // A mode changed behind flip's back: the content is copied into a new inode.
        let live = root.current().unwrap().unwrap();
        let c = root.release_dir(live).join("c");
        fs::set_permissions(&c, fs::Permissions::from_mode(0o755)).unwrap();
        let (st, _) = deploy(&root, v1);
        assert_eq!(
            (st.linked, st.copied, st.not_linked, st.written),
            (2, 1, 1, 0)
        );
        let now = root.release_dir(root.current().unwrap().unwrap()).join("c");
        assert_eq!(fs::metadata(&now).unwrap().mode() & MODE_MASK, 0o4755);
        assert_ne!(
            fs::metadata(&now).unwrap().ino(),
            fs::metadata(&c).unwrap().ino()
        );

        // No usable record: nothing is vouched for, every file is copied (content checked)
        // into a new inode, none linked.
        for damage in [&b""[..], b"FLIPSTA3", b"FLIPSTA3\x03\0\0\0\0\0\0\0"] {
            let live = root.current().unwrap().unwrap();
            fs::write(root.stat_path(live), damage).unwrap();
            let (st, _) = deploy(&root, v1);
            assert_eq!((st.linked, st.copied, st.written), (0, 3, 0), "{damage:?}");
        }
    }

    /// Links, prunes, rollbacks and dropped stages change the link count and ctime of inodes
    /// older releases share: the link ledger keeps what is expected of them, so a release
    /// rolled back to, or live after a prune, still vouches for its files without hashing.
    #[test]
    fn the_link_ledger_keeps_shared_inodes_vouched_for() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::open_or_init(&t.path().join("t")).unwrap();
        let v1: &[(&str, &[u8], u32)] = &[("a", b"aaaa", 0o644), ("b", b"bb", 0o600)];
        deploy(&root, v1);
        deploy(&root, v1);
        // Rolled back to release 1, whose record was written before 2 linked its files.
        let lock = root.lock(&holder(), Wait::No).unwrap();
        root.activate(&lock, 1).unwrap();
        drop(lock);
        let (st, _) = deploy(&root, v1);
        assert_eq!((st.linked, st.hashed, st.written), (2, 0, 0));
        // A stage dropped after linking (a client that went away) gives the names back.
        let lock = root.lock(&holder(), Wait::No).unwrap();
        let stage = root.stage(&lock, manifest(v1), None).unwrap();
        assert_eq!(stage.stats().linked, 2);
        drop(stage);
        drop(lock);
        // Releases removed: the inodes the live one shares with them lose names.
        let lock = root.lock(&holder(), Wait::No).unwrap();
        assert_eq!(root.prune(&lock, 1).unwrap(), vec![1]);
        drop(lock);
        let (st, _) = deploy(&root, v1);
        assert_eq!((st.linked, st.hashed, st.written), (2, 0, 0));
        let a = root.release_dir(root.current().unwrap().unwrap()).join("a");
        assert_eq!(fs::metadata(a).unwrap().nlink(), 3);
    }

    #[test]
    fn a_damaged_basis_is_not_offered_nor_accepted() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::open_or_init(&t.path().join("t")).unwrap();
        let (b1, b2) = (vec![b'a'; 20_000], vec![b'b'; 20_000]);
        deploy(&root, &[("f", &b1, 0o644), ("g", &b1, 0o644)]);
        tamper(&root.release_dir(1).join("g"));
        let lock = root.lock(&holder(), Wait::No).unwrap();
        let stage = root
            .stage(
                &lock,
                manifest(&[("f", &b2, 0o644), ("g", &b2, 0o644)]),
                None,
            )
            .unwrap();
        assert_eq!(stage.needs(), &[0, 1]);
        assert_eq!(
            stage.basis_of(0).map(|(b, _)| b.to_string()).as_deref(),
            Some("f")
        );
        assert_eq!(stage.basis_of(1), None);
        assert_eq!(stage.stats().bases_dropped, 1);
        assert!(stage.signature(&RelPath::new("f").unwrap()).is_ok());
        assert!(matches!(
            stage.signature(&RelPath::new("g").unwrap()),
            Err(Error::BadRequest(_))
        ));
    }

    #[test]
    fn directories_with_special_bits_start_private() {
        assert_eq!(initial_dir_mode(0o755, Some(0o022)), 0o755);
        assert_eq!(initial_dir_mode(0o2775, Some(0o002)), 0o700);
        assert_eq!(initial_dir_mode(0o1777, Some(0)), 0o700);
    }
}
