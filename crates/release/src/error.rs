use std::io;
use std::path::{Path, PathBuf};

/// Broad classes of failure, for exit codes and the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Another deploy holds the lock.
    Locked,
    /// The target or a release is not in a state the request can work with.
    Target,
    /// A written file did not match its digest, or stored state is damaged.
    Integrity,
    /// The disk is full.
    NoSpace,
    /// Any other I/O failure on the target.
    Io,
    /// The client asked for something invalid.
    BadRequest,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot {op} {}: no space left on device", path.display())]
    NoSpace { op: &'static str, path: PathBuf },
    #[error("no space left on device for the release: its new files need {need} bytes (the largest: {largest}), the filesystem has {free} bytes free, keeping {margin} in reserve; free some space or prune old releases")]
    NotEnoughSpace {
        /// The largest file to be written.
        largest: String,
        need: u64,
        free: u64,
        margin: u64,
    },
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("{} does not exist", .0.display())]
    Missing(PathBuf),
    #[error("{} is not empty and is not a flip target (no .flip/ inside); deploy into a new or empty directory", .0.display())]
    NotATarget(PathBuf),
    /// A directory that is not a flip target, where one must exist already (not a deploy).
    #[error("{} is not a flip target (no .flip/ inside)", .0.display())]
    NoTarget(PathBuf),
    /// A deploy would have to create more than the target directory itself.
    #[error("cannot create the target {}: {} does not exist (--mkpath creates missing parents)", dir.display(), parent.display())]
    NoParent { dir: PathBuf, parent: PathBuf },
    #[error("target is locked by {holder}; pass --wait to wait for it")]
    Locked { holder: String },
    #[error("release {0} does not exist")]
    NoSuchRelease(u64),
    #[error("nothing is live yet: {} has no current release", .0.display())]
    NothingLive(PathBuf),
    #[error("there is no release older than {current} to roll back to")]
    NothingToRollBack { current: u64 },
    #[error("release {0} is already live")]
    AlreadyLive(u64),
    #[error("{} exists and is not a symlink; flip will not replace it (move it away first)", .0.display())]
    CurrentNotSymlink(PathBuf),
    #[error("{} points to {target:?}, not to a release flip made", path.display())]
    CurrentForeign { path: PathBuf, target: String },
    #[error("{path}: written content does not match the manifest ({detail})")]
    Integrity { path: String, detail: String },
    #[error("{} is damaged: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// One of flip's own directories or files under the target is of the wrong type (a
    /// symlink to somewhere else, a file where a directory belongs, ...).
    #[error("{} is {found}, not {expected}: flip never follows or replaces its own files under the target; move it away or restore it", path.display())]
    Layout {
        path: PathBuf,
        found: &'static str,
        expected: &'static str,
    },
    /// A shared path under `shared/` is of another kind than the settings say (a file where a
    /// directory is shared, a symlink on the way): nothing was changed.
    #[error("{} is {found}, not {expected} ({why}): flip changes nothing under shared/ and does not deploy; move it away or change shared_dirs/shared_files", path.display())]
    SharedConflict {
        path: PathBuf,
        found: &'static str,
        expected: &'static str,
        why: String,
    },
    /// The work was stopped because nobody waits for it any more (see [`crate::abandon`]).
    #[error("stopped: the client went away")]
    Abandoned,
    /// The release id counter reached the largest id there is.
    #[error("release ids are exhausted: {} holds {last}, the largest id flip hands out; deploy into a new target", path.display())]
    IdsExhausted { path: PathBuf, last: u64 },
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Io { .. } | Error::Abandoned => ErrorClass::Io,
            Error::NoSpace { .. } | Error::NotEnoughSpace { .. } => ErrorClass::NoSpace,
            Error::Locked { .. } => ErrorClass::Locked,
            Error::Integrity { .. } | Error::Corrupt { .. } => ErrorClass::Integrity,
            Error::BadRequest(_) => ErrorClass::BadRequest,
            Error::NotADirectory(_)
            | Error::Missing(_)
            | Error::NotATarget(_)
            | Error::NoTarget(_)
            | Error::NoParent { .. }
            | Error::NoSuchRelease(_)
            | Error::NothingLive(_)
            | Error::NothingToRollBack { .. }
            | Error::AlreadyLive(_)
            | Error::CurrentNotSymlink(_)
            | Error::CurrentForeign { .. }
            | Error::Layout { .. }
            | Error::SharedConflict { .. }
            | Error::IdsExhausted { .. } => ErrorClass::Target,
        }
    }
}

/// `map_err(io("create", &path))`: an I/O error naming the operation and the path, with a full
/// disk told apart.
pub(crate) fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
            Error::NoSpace {
                op,
                path: path.to_path_buf(),
            }
        } else {
            Error::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
