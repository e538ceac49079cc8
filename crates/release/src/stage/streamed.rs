//! A first deploy that sends while it hashes: files arrive before their manifest.
//!
//! [`Root::stage_streaming`] (nothing live) starts a staging directory without a manifest;
//! [`Stage::make_parents`] and [`Stage::begin_streamed`] create each streamed file (its parent
//! directories made by this stage, private, one at a time; the file `O_EXCL|O_NOFOLLOW`),
//! hashed as it is written, and [`Stage::finish_file`] records its path, mode, size and blake3.
//! Then [`Stage::adopt`] takes the manifest: every streamed file must be one of its files with
//! exactly that mode, size and blake3 (else the stage is refused, and dropped: removed), the
//! directories made for them its directories; the files not streamed are what the stage
//! [`needs`](Stage::needs), as for any stage. Nothing else differs: commit checks that every
//! needed file arrived and sets the final directory modes, as it does for every release.

use super::{io, Error, FileStamp, FileWriter, Outcome, Result, Stage, MODE_MASK};
use crate::{fsutil, LockGuard, Root, STAGING_PREFIX};
use flip_manifest::{Digest, EntryKind, Manifest, RelPath};
use flip_plan::FileStep;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::DirBuilderExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// What has been streamed into a stage before its manifest.
#[derive(Default)]
pub(crate) struct Streamed {
    /// Directories made for streamed files (relative to the release).
    dirs: Mutex<HashSet<RelPath>>,
    /// Files written and checked against their own content: mode, size, blake3, identity.
    files: Mutex<HashMap<RelPath, StreamedFile>>,
    /// Streamed files the manifest listed as they are (counted by [`Stage::adopt`]).
    matched: AtomicUsize,
    /// The manifest came: nothing more streams.
    adopted: bool,
}

struct StreamedFile {
    mode: u32,
    size: u64,
    digest: Digest,
    stamp: FileStamp,
}

impl Root {
    /// Starts a release whose files arrive before its manifest (a first deploy: nothing may be
    /// live). Its id is taken now; the staging directory is removed if the stage is dropped.
    ///
    /// # Errors
    /// [`Error::BadRequest`] when a release is live, or an I/O error creating the staging
    /// directory.
    pub fn stage_streaming(&self, lock: &LockGuard) -> Result<Stage<'_>> {
        self.clean_leftovers(lock)?;
        if let Some(id) = self.current()? {
            return Err(Error::BadRequest(format!(
                "release {id} is live: files stream before their manifest only into a target with nothing live"
            )));
        }
        let id = self.allocate_id()?;
        let manifest = Manifest::default();
        let stage = Stage {
            root: self,
            id,
            dir: self.releases_dir().join(format!("{STAGING_PREFIX}{id}")),
            prev: None,
            prev_stat: Vec::new(),
            good_bases: HashSet::new(),
            prev_tree: None,
            plan: flip_plan::plan(None, &manifest),
            manifest,
            needs: Vec::new(),
            progress: Mutex::new(Default::default()),
            label: None,
            stats: Default::default(),
            // Not created yet: nothing to remove if creating it fails.
            committed: true,
            shared: None,
            streamed: Some(Box::default()),
            linked: Vec::new(),
            hashed: std::sync::atomic::AtomicU64::new(0),
            prepared: None,
        };
        // Private until the release is complete (see `Stage::commit`).
        fsutil::create_private_dir(&stage.dir)?;
        let mut stage = stage;
        stage.committed = false;
        Ok(stage)
    }
}

impl Stage<'_> {
    fn streaming(&self) -> Result<&Streamed> {
        match &self.streamed {
            Some(s) if !s.adopted => Ok(s),
            _ => Err(Error::BadRequest(
                "no release is being streamed before its manifest".into(),
            )),
        }
    }

    /// Makes the missing parent directories of streamed file `rel`, private (their modes are
    /// set at commit), each inside one this stage made. Called by one thread, in stream order.
    /// Recording `rel` and each directory made costs `cost(path)` out of `budget` (what the
    /// record of the streamed files may still take), checked before anything is made.
    ///
    /// # Errors
    /// [`Error::BadRequest`] when the record would cost more than `budget`, or an I/O error,
    /// e.g. when a streamed file already holds a parent's path.
    pub fn make_parents(
        &self,
        rel: &RelPath,
        budget: &mut u64,
        cost: impl Fn(&RelPath) -> u64,
    ) -> Result<()> {
        let s = self.streaming()?;
        let mut dirs = s.dirs.lock().unwrap_or_else(|e| e.into_inner());
        let missing = rel.parents_until(|p| dirs.contains(p));
        let charged = missing.iter().map(&cost).sum::<u64>() + cost(rel);
        *budget = budget.checked_sub(charged).ok_or_else(|| {
            Error::BadRequest(format!(
                "{rel}: the paths streamed before the manifest (with the directories made for them) are more than the agent keeps"
            ))
        })?;
        for p in missing.into_iter().rev() {
            let path = self.abs(&p);
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .map_err(io("create", &path))?;
            dirs.insert(p);
        }
        Ok(())
    }

    /// Creates streamed file `rel` (`O_EXCL|O_NOFOLLOW`, its parents made by
    /// [`Stage::make_parents`]) with permission bits `mode`; [`Stage::finish_file`] records it.
    ///
    /// # Errors
    /// [`Error::BadRequest`] for a mode beyond 07777 or a stage that is not streaming, or an I/O
    /// error creating the file (one streamed twice: it exists).
    pub fn begin_streamed(&self, rel: &RelPath, mode: u32) -> Result<FileWriter> {
        self.streaming()?;
        if mode & !MODE_MASK != 0 {
            return Err(Error::BadRequest(format!(
                "{rel}: mode {mode:o} is not a permission mode"
            )));
        }
        // The session bounds the bytes of all streamed files together.
        FileWriter::create_new(
            usize::MAX,
            &self.abs(rel),
            mode,
            u64::MAX,
            Some((rel.clone(), mode)),
        )
    }

    /// Closes streamed file `rel`: mode and mtime set, identity and content recorded.
    pub(super) fn finish_streamed(
        &self,
        w: FileWriter,
        rel: RelPath,
        mode: u32,
        mtime: Option<(i64, u32)>,
    ) -> Result<()> {
        let s = self.streaming()?;
        let (size, digest) = (w.written, Digest::from(w.hasher.finalize()));
        let stamp = w.close(mode, mtime)?;
        let file = StreamedFile {
            mode,
            size,
            digest,
            stamp,
        };
        let mut files = s.files.lock().unwrap_or_else(|e| e.into_inner());
        if files.insert(rel.clone(), file).is_some() {
            return Err(Error::BadRequest(format!("{rel} was streamed twice")));
        }
        drop(files);
        self.progress().written += 1;
        Ok(())
    }

    /// Gives a streaming stage its manifest (`label`): plans it against nothing, checks each
    /// streamed file is exactly the manifest's, makes the other directories and the symlinks.
    ///
    /// # Errors
    /// [`Error::Integrity`] for a streamed file whose mode, size or blake3 is not the
    /// manifest's, [`Error::BadRequest`] for one the manifest does not list (or a stage that
    /// is not streaming), or an I/O error (a streamed file where the manifest has a directory
    /// or symlink).
    pub fn adopt(&mut self, manifest: Manifest, label: Option<String>) -> Result<()> {
        self.streaming()?;
        if let Some(s) = self.streamed.as_mut() {
            s.adopted = true;
            self.stats.streamed = s.files.get_mut().map_or(0, |f| f.len() as u64);
        }
        self.plan = flip_plan::plan(None, &manifest);
        self.manifest = manifest;
        self.label = label;
        self.build_tree(None)
    }

    /// Whether directory `rel` was made for a streamed file.
    pub(super) fn streamed_dir(&self, rel: &RelPath) -> bool {
        self.streamed.as_ref().is_some_and(|s| {
            s.dirs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(rel)
        })
    }

    /// The outcome of plan step `step` if its file was streamed: it must be that file exactly.
    pub(super) fn streamed_outcome(&self, step: &FileStep) -> Result<Option<Outcome>> {
        let Some(s) = &self.streamed else {
            return Ok(None);
        };
        let files = s.files.lock().unwrap_or_else(|e| e.into_inner());
        let Some(f) = files.get(&step.path) else {
            return Ok(None);
        };
        let detail = if f.size != step.size {
            format!("{} bytes streamed, the manifest says {}", f.size, step.size)
        } else if f.digest != step.digest {
            "the blake3 of what was streamed differs".into()
        } else if f.mode != step.mode {
            format!(
                "streamed with mode {:o}, the manifest says {:o}",
                f.mode, step.mode
            )
        } else {
            s.matched.fetch_add(1, Ordering::SeqCst);
            return Ok(Some(Outcome::Streamed(f.stamp)));
        };
        Err(Error::Integrity {
            path: step.path.to_string(),
            detail,
        })
    }

    /// Every streamed file was one of the manifest's (after the plan's files were matched).
    pub(super) fn check_streamed_all_listed(&self) -> Result<()> {
        let Some(s) = &self.streamed else {
            return Ok(());
        };
        let files = s.files.lock().unwrap_or_else(|e| e.into_inner());
        if s.matched.load(Ordering::SeqCst) == files.len() {
            return Ok(());
        }
        let extra = files
            .keys()
            .filter(|p| !matches!(self.manifest.get(p), Some(EntryKind::File { .. })))
            .min()
            .map_or_else(String::new, |p| p.to_string());
        Err(Error::BadRequest(format!(
            "{extra} was streamed but the manifest does not list it"
        )))
    }
}
