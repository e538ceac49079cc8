//! Building a release in a hidden staging directory.
//!
//! [`Root::stage`] creates `releases/.staging-<id>/`, makes every directory and symlink, hard-links
//! or copies every file the previous release already has (in parallel), and leaves a list of the
//! files whose content must still arrive ([`Stage::needs`]). The caller then feeds those as
//! literal bytes ([`Stage::begin_file`]) or as deltas against a file of the previous release
//! ([`Stage::apply_delta`]); each is checked against its size and blake3 before it counts.
//! [`Stage::commit`] refuses to finish while anything is missing. Dropping an uncommitted stage
//! removes the staging directory.
//!
//! Every file is created with `O_EXCL | O_NOFOLLOW` inside directories this stage made itself, so
//! nothing is ever written into an existing inode (hard-linked files are shared with older
//! releases) or through a symlink.

use crate::delta::{DeltaApplier, DeltaWriter, PatchWriter};
use crate::error::{io, Error, Result};
use crate::{fsutil, LockGuard, ReleaseInfo, Root, STAGING_PREFIX};
use flip_manifest::{Digest, EntryKind, Manifest, RelPath};
use flip_plan::{FileStep, Plan, Source};
use rayon::prelude::*;
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Files above this size are mapped rather than read into memory when used as a patch basis.
const MMAP_THRESHOLD: u64 = 16 << 20;

/// What staging has done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StageStats {
    pub linked: u64,
    pub copied: u64,
    /// Files planned as links or copies whose source turned out to be missing or altered on
    /// disk; they are transferred instead.
    pub relinked_as_transfer: u64,
    /// Files written from client data (literal or delta).
    pub written: u64,
    pub written_bytes: u64,
}

pub struct Stage<'r> {
    root: &'r Root,
    id: u64,
    dir: PathBuf,
    prev: Option<(u64, Manifest)>,
    /// Inode and mtime of the previous release's files when it was committed, by position in
    /// its manifest's entries (directories hold a zero stamp); empty if unknown.
    prev_stat: Vec<FileStamp>,
    manifest: Manifest,
    plan: Plan,
    needs: Vec<usize>,
    pending: BTreeSet<usize>,
    /// Inode and mtime of each staged file (by plan index), for the release's `.stat`.
    stamps: Vec<Option<FileStamp>>,
    label: Option<String>,
    stats: StageStats,
    committed: bool,
}

enum Outcome {
    Linked(FileStamp),
    Copied(FileStamp),
    Transfer,
}

impl Root {
    /// Starts building a new release holding exactly `manifest`, planned against the live one.
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
    pub fn stage_after(
        &self,
        lock: &LockGuard,
        manifest: Manifest,
        label: Option<String>,
        live: Option<(u64, Manifest)>,
    ) -> Result<Stage<'_>> {
        self.clean_leftovers(lock)?;
        let prev = match (self.current()?, live) {
            (Some(id), Some((known, m))) if known == id => Some((id, m)),
            (Some(id), _) => Some((id, self.manifest(id)?)),
            (None, _) => None,
        };
        let plan = flip_plan::plan(prev.as_ref().map(|(_, m)| m), &manifest);
        let prev_stat = match &prev {
            Some((id, m)) => self.read_stamps(*id, m),
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
            manifest,
            plan,
            needs: Vec::new(),
            pending: BTreeSet::new(),
            stamps: Vec::new(),
            label,
            stats: StageStats::default(),
            committed: false,
        };
        stage.build_tree()?;
        Ok(stage)
    }
}

impl<'r> Stage<'r> {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The live release this one was planned against.
    pub fn previous(&self) -> Option<u64> {
        self.prev.as_ref().map(|(id, _)| *id)
    }

    pub fn stats(&self) -> &StageStats {
        &self.stats
    }

    /// The previous version of `plan().files[index]` at the same path and its size, if the plan
    /// found one: what a delta can be computed against.
    pub fn basis_of(&self, index: usize) -> Option<(RelPath, u64)> {
        let Source::Transfer { basis: Some(b) } = &self.plan.files.get(index)?.source else {
            return None;
        };
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
    fn build_tree(&mut self) -> Result<()> {
        fs::create_dir(&self.dir).map_err(io("create", &self.dir))?;
        let umask = fsutil::umask();
        for level in by_depth(self.manifest.entries()) {
            level.par_iter().try_for_each(|e| {
                let path = self.abs(&e.path);
                match &e.kind {
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
        let prev_dir = self.prev.as_ref().map(|(id, _)| self.root.release_dir(*id));
        let outcomes: Vec<Result<Outcome>> = self
            .plan
            .files
            .par_iter()
            .map(|step| match (&step.source, &prev_dir) {
                (Source::Link(from), Some(pd)) => self.link(step, from, &pd.join(from.as_str())),
                (Source::Copy(from), Some(pd)) => self.copy(step, &pd.join(from.as_str())),
                _ => Ok(Outcome::Transfer),
            })
            .collect();
        self.stamps = vec![None; self.plan.files.len()];
        for (i, outcome) in outcomes.into_iter().enumerate() {
            match outcome? {
                Outcome::Linked(st) => {
                    self.stats.linked += 1;
                    self.stamps[i] = Some(st);
                }
                Outcome::Copied(st) => {
                    self.stats.copied += 1;
                    self.stamps[i] = Some(st);
                }
                Outcome::Transfer => {
                    if !matches!(self.plan.files[i].source, Source::Transfer { .. }) {
                        self.stats.relinked_as_transfer += 1;
                    }
                    self.needs.push(i);
                }
            }
        }
        self.pending = self.needs.iter().copied().collect();
        Ok(())
    }

    /// The committed stamp of file `path` of the previous release, if known.
    fn prev_stamp(&self, path: &RelPath) -> Option<&FileStamp> {
        let (_, m) = self.prev.as_ref()?;
        self.prev_stat.get(m.position(path)?)
    }

    /// Hard-links an unchanged file, after checking that the old inode is still the one the
    /// previous release committed (same inode and mtime: not replaced, not written to) and looks
    /// like what the old manifest says (a regular file of that size and mode). Anything else is
    /// transferred again rather than trusted.
    fn link(&self, step: &FileStep, from: &RelPath, src: &Path) -> Result<Outcome> {
        let stamp = match fs::symlink_metadata(src) {
            Ok(m)
                if m.file_type().is_file()
                    && m.len() == step.size
                    && m.mode() & 0o777 == step.mode
                    && self
                        .prev_stamp(from)
                        .is_none_or(|st| *st == FileStamp::of(&m)) =>
            {
                FileStamp::of(&m)
            }
            _ => return Ok(Outcome::Transfer),
        };
        let dst = self.abs(&step.path);
        match fs::hard_link(src, &dst) {
            // The link is the same inode: same stamp.
            Ok(()) => Ok(Outcome::Linked(stamp)),
            // Too many links to one inode, or another filesystem: a copy does the job.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMLINK) | Some(libc::EXDEV)) => {
                self.copy(step, src)
            }
            Err(e) => Err(io("hard-link", &dst)(e)),
        }
    }

    /// Copies a file of the previous release into a new inode with the new mode, keeping its
    /// mtime; its content is hashed on the way and must match.
    fn copy(&self, step: &FileStep, src: &Path) -> Result<Outcome> {
        let Ok(mut input) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(src)
        else {
            return Ok(Outcome::Transfer);
        };
        let Ok(meta) = input.metadata() else {
            return Ok(Outcome::Transfer);
        };
        if !meta.is_file() || meta.len() != step.size {
            return Ok(Outcome::Transfer);
        }
        let mut w = FileWriter::create(usize::MAX, &self.abs(&step.path), step)?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = input.read(&mut buf).map_err(io("read", src))?;
            if n == 0 {
                break;
            }
            if w.write(&buf[..n]).is_err() {
                drop(w);
                let _ = fs::remove_file(self.abs(&step.path));
                return Ok(Outcome::Transfer);
            }
        }
        if w.hasher.finalize() != blake3::Hash::from(step.digest.0) || w.written != step.size {
            drop(w);
            let _ = fs::remove_file(self.abs(&step.path));
            return Ok(Outcome::Transfer);
        }
        let stamp = w.close(step.mode, Some((meta.mtime(), meta.mtime_nsec() as u32)))?;
        Ok(Outcome::Copied(stamp))
    }

    fn check_pending(&self, index: usize) -> Result<&FileStep> {
        if !self.pending.contains(&index) {
            return Err(Error::BadRequest(format!(
                "file #{index} is not awaiting content"
            )));
        }
        Ok(&self.plan.files[index])
    }

    /// Opens a new file for the content of `plan().files[index]`, which must be one of
    /// [`needs`](Self::needs) and not yet written.
    pub fn begin_file(&mut self, index: usize) -> Result<FileWriter> {
        let step = self.check_pending(index)?;
        FileWriter::create(index, &self.abs(&step.path), step)
    }

    /// Checks a written file against the manifest (size, blake3), gives it its mode and mtime.
    pub fn finish_file(&mut self, w: FileWriter, mtime: Option<(i64, u32)>) -> Result<()> {
        let index = w.index;
        let step = self.check_pending(index)?;
        let (mode, size) = (step.mode, step.size);
        w.verify(&step.path, size, &step.digest)?;
        self.stamps[index] = Some(w.close(mode, mtime)?);
        self.pending.remove(&index);
        self.stats.written += 1;
        self.stats.written_bytes += size;
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
        Ok((self.root.release_dir(*id).join(basis.as_str()), *size))
    }

    /// Opens a delta basis (a regular file of the previous release, not through a symlink) and
    /// checks its size against the previous manifest.
    fn open_basis(&self, basis: &RelPath) -> Result<(File, PathBuf, u64)> {
        let (path, size) = self.basis(basis)?;
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
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
    pub fn signature(&self, basis: &RelPath) -> Result<Vec<u8>> {
        let (file, path, size) = self.open_basis(basis)?;
        crate::delta::signature(&file, &path, size)
    }

    /// Starts building `plan().files[index]` from an rsync delta against `basis`, applied as
    /// it arrives ([`DeltaWriter::feed`]): copies are read from the basis file with `pread`,
    /// the output goes straight into the new file and is refused beyond the manifest size.
    /// Close it with [`DeltaWriter::finish`] and [`Stage::finish_file`].
    pub fn begin_delta(&mut self, index: usize, basis: &RelPath) -> Result<DeltaWriter> {
        let step = self.check_pending(index)?;
        let (size, name) = (step.size, step.path.to_string());
        let (file, path, len) = self.open_basis(basis)?;
        let applier = DeltaApplier::new(file, len, path, name, size);
        Ok(DeltaWriter {
            applier,
            file: self.begin_file(index)?,
        })
    }

    /// Starts building `plan().files[index]` from a zstd `--patch-from` frame made against
    /// `basis` (whose content the client says has `basis_digest`), decompressed as it arrives
    /// ([`PatchWriter::feed`]) with a bounded window. Close it with [`PatchWriter::finish`]
    /// and [`Stage::finish_file`].
    pub fn begin_patch(
        &mut self,
        index: usize,
        basis: &RelPath,
        basis_digest: &Digest,
    ) -> Result<PatchWriter> {
        let step = self.check_pending(index)?;
        let path = step.path.clone();
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
        PatchWriter::new(base, self.begin_file(index)?, path.to_string())
    }

    /// Applies a whole rsync delta against `basis` to produce `plan().files[index]`
    /// ([`Stage::begin_delta`] in one piece); the output is limited to the manifest size and
    /// checked against its blake3.
    pub fn apply_delta(
        &mut self,
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
    pub fn apply_patch(
        &mut self,
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

    /// Makes the release durable and visible as `releases/<id>` (not live: see
    /// [`Root::activate`]). Fails if any needed file has not been written.
    pub fn commit(mut self) -> Result<ReleaseInfo> {
        if let Some(first) = self.pending.iter().next() {
            return Err(Error::BadRequest(format!(
                "{} file(s) never arrived, first {}",
                self.pending.len(),
                self.plan.files[*first].path
            )));
        }
        crate::fault_point("before-commit");
        // Final directory modes, deepest level first (a directory created with its final mode
        // needs nothing).
        let umask = fsutil::umask();
        for level in by_depth(self.manifest.entries()).iter().rev() {
            level.par_iter().try_for_each(|e| match e.kind {
                EntryKind::Dir { mode } if initial_dir_mode(mode, umask) != mode => {
                    let p = self.abs(&e.path);
                    fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                        .map_err(io("chmod", &p))
                }
                _ => Ok(()),
            })?;
        }
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o755))
            .map_err(io("chmod", &self.dir))?;
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
        fsutil::write_atomic_with(&self.root.stat_path(self.id), |w| {
            w.write_all(STAMP_MAGIC)?;
            w.write_all(&(self.stamps.len() as u64).to_le_bytes())?;
            for st in &self.stamps {
                let st = st.expect("filled above");
                w.write_all(&st.ino.to_le_bytes())?;
                w.write_all(&st.mtime.to_le_bytes())?;
                w.write_all(&st.nsec.to_le_bytes())?;
            }
            Ok(())
        })?;
        fsutil::write_atomic(
            &self.root.info_path(self.id),
            &serde_json::to_vec_pretty(&info).expect("json"),
        )?;
        crate::fault_point("before-rename");
        let dst = self.root.release_dir(self.id);
        fs::rename(&self.dir, &dst).map_err(io("rename the staged release to", &dst))?;
        fsutil::fsync_dir(&self.root.releases_dir())?;
        self.committed = true;
        Ok(info)
    }
}

impl Stage<'_> {
    /// Makes sure every staged file has its inode and mtime (recorded as each was linked,
    /// copied or written; looked up again only if missing).
    fn fill_stamps(&mut self) -> Result<()> {
        let missing: Vec<usize> = (0..self.stamps.len())
            .filter(|&i| self.stamps[i].is_none())
            .collect();
        let found: Vec<(usize, FileStamp)> = missing
            .into_par_iter()
            .map(|i| {
                let abs = self.abs(&self.plan.files[i].path);
                let m = fs::symlink_metadata(&abs).map_err(io("inspect", &abs))?;
                Ok((i, FileStamp::of(&m)))
            })
            .collect::<Result<_>>()?;
        for (i, st) in found {
            self.stamps[i] = Some(st);
        }
        Ok(())
    }
}

impl Root {
    /// The stamps of a release's files by path; empty when missing or not matching the
    /// manifest (then links are checked by size and mode only).
    fn read_stamps(&self, id: u64, m: &Manifest) -> Vec<FileStamp> {
        let Ok(Some(b)) = fsutil::read_optional(&self.stat_path(id)) else {
            return Vec::new();
        };
        let files = m.file_count();
        if b.len() != 16 + files * 20
            || &b[..8] != STAMP_MAGIC
            || b[8..16] != (files as u64).to_le_bytes()
        {
            return Vec::new();
        }
        let mut stamps = b[16..].chunks_exact(20).map(|c| FileStamp {
            ino: u64::from_le_bytes(c[..8].try_into().unwrap()),
            mtime: i64::from_le_bytes(c[8..16].try_into().unwrap()),
            nsec: u32::from_le_bytes(c[16..20].try_into().unwrap()),
        });
        let none = FileStamp {
            ino: 0,
            mtime: 0,
            nsec: 0,
        };
        m.entries()
            .iter()
            .map(|e| match e.kind {
                EntryKind::File { .. } => stamps.next().unwrap_or(none),
                _ => none,
            })
            .collect()
    }
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
        Some(u) if mode & 0o700 == 0o700 && mode & u == 0 => mode,
        _ => 0o700,
    }
}

const STAMP_MAGIC: &[u8; 8] = b"FLIPSTA1";

/// What identifies a file's inode and its last write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    mtime: i64,
    nsec: u32,
}

impl FileStamp {
    fn of(m: &fs::Metadata) -> Self {
        FileStamp {
            ino: m.ino(),
            mtime: m.mtime(),
            nsec: m.mtime_nsec() as u32,
        }
    }
}

impl Drop for Stage<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fsutil::remove_tree(&self.dir);
        }
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
    limit: u64,
}

impl FileWriter {
    fn create(index: usize, path: &Path, step: &FileStep) -> Result<FileWriter> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io("create", path))?;
        Ok(FileWriter {
            index,
            path: path.to_path_buf(),
            file,
            hasher: blake3::Hasher::new(),
            written: 0,
            limit: step.size,
        })
    }

    /// The plan index this writer fills.
    pub fn index(&self) -> usize {
        self.index
    }

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

    /// Gives the file its mode and mtime; returns its stamp.
    fn close(self, mode: u32, mtime: Option<(i64, u32)>) -> Result<FileStamp> {
        self.file
            .set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io("chmod", &self.path))?;
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
        let m = self.file.metadata().map_err(io("inspect", &self.path))?;
        Ok(FileStamp::of(&m))
    }
}

/// Compares a tree on disk with a manifest: every entry's kind, mode, size, content and target,
/// and nothing extra. Returns one line per difference.
pub(crate) fn verify_tree(dir: &Path, manifest: &Manifest) -> Vec<String> {
    let mut problems: Vec<String> = manifest
        .entries()
        .par_iter()
        .filter_map(|e| {
            let p = dir.join(e.path.as_str());
            let meta = match fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(err) => return Some(format!("{}: {err}", e.path)),
            };
            match &e.kind {
                EntryKind::Dir { mode } => {
                    if !meta.is_dir() {
                        Some(format!("{}: not a directory", e.path))
                    } else if meta.mode() & 0o777 != *mode {
                        Some(format!(
                            "{}: mode {:o}, expected {mode:o}",
                            e.path,
                            meta.mode() & 0o777
                        ))
                    } else {
                        None
                    }
                }
                EntryKind::Symlink { target } => match fs::read_link(&p) {
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
                    if meta.mode() & 0o777 != *mode {
                        return Some(format!(
                            "{}: mode {:o}, expected {mode:o}",
                            e.path,
                            meta.mode() & 0o777
                        ));
                    }
                    if meta.len() != *size {
                        return Some(format!("{}: {} bytes, expected {size}", e.path, meta.len()));
                    }
                    let mut h = blake3::Hasher::new();
                    match h.update_mmap(&p).map(|h| Digest::from(h.finalize())) {
                        Ok(d) if d == *digest => None,
                        Ok(_) => Some(format!("{}: content differs from the manifest", e.path)),
                        Err(err) => Some(format!("{}: {err}", e.path)),
                    }
                }
            }
        })
        .collect();
    let mut extra = Vec::new();
    list_tree(dir, dir, &mut extra);
    for rel in extra {
        match RelPath::new(rel.clone()) {
            Ok(p) if manifest.get(&p).is_some() => {}
            _ => problems.push(format!("{rel}: not in the manifest")),
        }
    }
    problems.sort();
    problems
}

fn list_tree(base: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if let Ok(rel) = p.strip_prefix(base) {
            out.push(rel.to_string_lossy().into_owned());
        }
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            list_tree(base, &p, out);
        }
    }
}
