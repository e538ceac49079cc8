//! The agent's side of shared paths ([`flip_wire::Request::Shared`]): the settings are checked
//! as anything received is, `shared/` is looked at under the lock, and the staged manifest the
//! client sends must be exactly what [`SharedPaths::apply`] makes of it, so a client cannot
//! make the agent move anything but the seeds it found missing itself.

use crate::{AgentError, Result};
use flip_manifest::{Manifest, RelPath};
use flip_plan::shared::SharedPaths;
use flip_release::{Error as RelError, LockGuard, Root, SharedCommit};
use std::collections::BTreeSet;

/// Shared paths and writable directories one deploy may name, each list.
const MAX_PATHS: usize = 10_000;

/// One session's shared-path settings and what `shared/` held when they were checked.
pub(crate) struct Settings {
    paths: SharedPaths,
    pub(crate) present: BTreeSet<RelPath>,
    owner: Option<(u32, u32)>,
}

impl Settings {
    /// Validates the settings, resolves the owner (only when running as root; otherwise a
    /// warning) and looks at `shared/`.
    pub(crate) fn check(
        root: &Root,
        lock: &LockGuard,
        dirs: Vec<RelPath>,
        files: Vec<RelPath>,
        writable: Vec<RelPath>,
        mode: u32,
        owner: Option<String>,
    ) -> Result<Settings> {
        if dirs.len() > MAX_PATHS || files.len() > MAX_PATHS || writable.len() > MAX_PATHS {
            return Err(RelError::BadRequest("too many shared paths".into()).into());
        }
        let paths = SharedPaths {
            dirs,
            files,
            writable,
            writable_mode: mode,
        };
        paths
            .validate()
            .map_err(|e| RelError::BadRequest(e.to_string()))?;
        // SAFETY: geteuid cannot fail.
        let root_user = unsafe { libc::geteuid() } == 0;
        let owner = match owner {
            Some(spec) if root_user => {
                Some(flip_release::resolve_owner(&spec).map_err(RelError::UnknownOwner)?)
            }
            Some(spec) => {
                root.warn(format!(
                    "writable_owner = {spec:?} is applied only when the agent runs as root; the writable directories keep the deploy user as owner"
                ));
                None
            }
            None => None,
        };
        let present = root.shared_state(lock, &paths)?;
        Ok(Settings {
            paths,
            present,
            owner,
        })
    }

    /// For a deploy that makes no release (the live one is intact and already this tree): the
    /// writable directories under `shared/` of shared paths it has, made as a commit would.
    pub(crate) fn writable_only(&self, root: &Root) -> Result<()> {
        let dirs: Vec<RelPath> = self
            .paths
            .writable_in_shared()
            .into_iter()
            .filter(|w| {
                self.paths
                    .covering(w)
                    .is_some_and(|(x, _)| self.present.contains(x))
            })
            .collect();
        if dirs.is_empty() {
            return Ok(());
        }
        root.writable_shared(&dirs, self.paths.writable_mode, self.owner)?;
        root.sync_shared()?;
        Ok(())
    }

    /// Whether the writable directories inside release `live` are owned as `writable_owner`
    /// wants (always so without an owner); else why not, for a warning.
    pub(crate) fn release_owned(&self, root: &Root, live: u64) -> std::result::Result<(), String> {
        let Some(owner) = self.owner else {
            return Ok(());
        };
        match root.writable_not_owned(live, &self.paths.writable_in_release(), owner) {
            None => Ok(()),
            Some((dir, has)) => Err(format!(
                "{dir} in release {live} is owned by {has}, not {}:{} as writable_owner wants: \
                 a new release is made",
                owner.0, owner.1
            )),
        }
    }

    /// What the commit of `staged` does with shared paths; refuses a staged manifest that is
    /// not the one these settings make of it.
    pub(crate) fn commit_for(&self, staged: &Manifest) -> Result<SharedCommit> {
        let a = self
            .paths
            .apply(staged, &self.present)
            .map_err(|e| RelError::BadRequest(format!("shared paths: {e}")))?;
        if a.staged != *staged {
            return Err(AgentError::from(RelError::BadRequest(
                "the manifest does not have the form the shared paths give it".into(),
            )));
        }
        Ok(SharedCommit {
            seeds: a.seeds,
            release: a.release,
            writable_release: self.paths.writable_in_release(),
            writable_shared: self.paths.writable_in_shared(),
            mode: self.paths.writable_mode,
            owner: self.owner,
        })
    }
}
