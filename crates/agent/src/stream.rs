//! A first deploy that sends while it hashes: [`Request::StreamStart`] then [`Request::Stream`]
//! frames, each file's content in order, before the `Stage` that brings the manifest.
//!
//! Only into a target with nothing live, under the lock, without shared paths. What is announced
//! bounds what is accepted: at most `files` files (at most [`MAX_STREAMED_FILES`]) and `bytes`
//! bytes in all, and `bytes` must fit in the free space before anything is written; the record of
//! the paths streamed (files and the directories made for them) costs at most
//! [`flip_wire::STREAM_RECORD_MAX`]. Each file is created by the stage
//! (`O_EXCL|O_NOFOLLOW`, its parents made by the stage, one at a time) and written and hashed by
//! the same writer threads as any content (bounded in flight); at `Stage` every streamed file
//! must be the manifest's file exactly (mode, size, blake3) and nothing else may have been
//! streamed ([`flip_release::Stage::adopt`]), or the stage is refused and removed.
//!
//! [`Request::StreamStart`]: flip_wire::Request::StreamStart
//! [`Request::Stream`]: flip_wire::Request::Stream

use crate::apply::{How, Pool};
use crate::{check_free, writers, AgentError, Result, Session};
use flip_manifest::{Manifest, RelPath};
use flip_release::{Error as RelError, Stage};
use flip_wire::{Mtime, StageBase};
use std::sync::Arc;

/// Most files a client may stream before a manifest: what the largest manifest the agent
/// accepts ([`flip_wire::MAX_MANIFEST`]) can list at 64 bytes an entry, so the record of what
/// was streamed costs about what that manifest costs decoded.
const MAX_STREAMED_FILES: u64 = flip_wire::MAX_MANIFEST / 64;

/// A release whose files are streaming before its manifest.
pub(crate) struct Streaming {
    stage: Arc<Stage<'static>>,
    /// Files and bytes the client may still stream (what `StreamStart` announced, less what came).
    files_left: u64,
    bytes_left: u64,
    /// What the record of the streamed paths may still cost ([`flip_wire::STREAM_RECORD_MAX`]).
    record_left: u64,
    /// The file whose frames are arriving.
    open: Option<RelPath>,
}

impl Session {
    /// `StreamStart`: a staging directory for files that come before their manifest.
    pub(crate) fn stream_start(&mut self, files: u64, bytes: u64) -> Result<()> {
        self.locked()?;
        if self.stage.is_some() || self.streaming.is_some() {
            return Err(AgentError::Protocol(
                "a release is already being staged".into(),
            ));
        }
        if self.shared.is_some() {
            return Err(RelError::BadRequest(
                "files cannot stream before the manifest of a deploy with shared paths".into(),
            )
            .into());
        }
        if files > MAX_STREAMED_FILES {
            return Err(RelError::BadRequest(format!(
                "{files} files announced, more than the limit of {MAX_STREAMED_FILES}"
            ))
            .into());
        }
        let root = self.root(false)?;
        check_free(root.path(), bytes, || None)?;
        let stage = root.stage_streaming(self.locked()?)?;
        self.streaming = Some(Streaming {
            stage: Arc::new(stage),
            files_left: files,
            bytes_left: bytes,
            record_left: flip_wire::STREAM_RECORD_MAX,
            open: None,
        });
        Ok(())
    }

    /// `Stream`: the next piece of a streamed file, handed to the writers; `last` closes it.
    pub(crate) fn stream(
        &mut self,
        path: RelPath,
        mode: u32,
        mtime: Mtime,
        data: Vec<u8>,
        last: bool,
    ) -> Result<()> {
        let st = self
            .streaming
            .as_mut()
            .ok_or_else(|| AgentError::Protocol("Stream without StreamStart".into()))?;
        let len = data.len() as u64;
        if len > st.bytes_left {
            return Err(RelError::BadRequest(format!(
                "{path}: more content streamed than StreamStart announced"
            ))
            .into());
        }
        st.bytes_left -= len;
        let pool = writers(&mut self.pool)?;
        match &st.open {
            None => {
                if st.files_left == 0 {
                    return Err(RelError::BadRequest(format!(
                        "{path}: more files streamed than StreamStart announced"
                    ))
                    .into());
                }
                st.files_left -= 1;
                st.stage
                    .make_parents(&path, &mut st.record_left, flip_wire::stream_record_cost)?;
                if last {
                    pool.whole(&st.stage, usize::MAX, How::Stream(path, mode), data, mtime);
                    return Ok(());
                }
                pool.start(&st.stage, usize::MAX, How::Stream(path.clone(), mode), 0);
                st.open = Some(path);
            }
            Some(open) if *open == path => {}
            Some(open) => {
                return Err(AgentError::Protocol(format!(
                    "{path} streamed while {open} was incomplete"
                )))
            }
        }
        pool.chunk(data, last, mtime);
        if last {
            st.open = None;
        }
        Ok(())
    }

    /// At `Stage` after streaming: once every streamed file is written, the stage takes its
    /// manifest (which must list each exactly; nothing was live, so the payload is whole).
    pub(crate) fn adopt_streamed(
        &mut self,
        streamed: Streaming,
        manifest: Manifest,
        label: Option<String>,
        base: &StageBase,
    ) -> Result<Stage<'static>> {
        if let Some(open) = &streamed.open {
            return Err(AgentError::Protocol(format!(
                "Stage while streamed file {open} was incomplete"
            )));
        }
        if !matches!(base, StageBase::Whole) {
            return Err(RelError::BadRequest(
                "the manifest of streamed files must be sent whole".into(),
            )
            .into());
        }
        if let Some(e) = self.pool.as_mut().and_then(Pool::settle) {
            return Err(e.into());
        }
        // Settled: no writer holds the stage any more.
        let mut stage = Arc::into_inner(streamed.stage)
            .ok_or_else(|| AgentError::Protocol("the stage is still being written".into()))?;
        stage.adopt(manifest, label)?;
        Ok(stage)
    }
}
