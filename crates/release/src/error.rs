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
    /// The caller's own run holds the lock, through another of its targets.
    Duplicate,
}

/// Why an operation on a target failed. Every message names the path (or release) and the cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on `path` failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// The operation that failed (`open`, `rename`, ...).
        op: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The filesystem holding `path` is full.
    #[error("cannot {op} {}: no space left on device", path.display())]
    NoSpace {
        /// The operation that failed (`open`, `rename`, ...).
        op: &'static str,
        /// The path concerned.
        path: PathBuf,
    },
    /// The release's new content does not fit in the filesystem's free space (checked before any content).
    #[error("no space left on device for the release: its new files need {need} bytes{}, the filesystem has {free} bytes free, keeping {margin} in reserve; free some space or prune old releases", .largest.as_ref().map(|l| format!(" (the largest: {l})")).unwrap_or_default())]
    NotEnoughSpace {
        /// The largest file to be written (`PATH, N bytes`), when known: files streamed before
        /// their manifest announce only their count and total.
        largest: Option<String>,
        /// Bytes the new files need.
        need: u64,
        /// Bytes free on the filesystem (for the deploy user).
        free: u64,
        /// Bytes kept in reserve.
        margin: u64,
    },
    /// The target root (path) is not a directory.
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The target root (path) does not exist.
    #[error("{} does not exist", .0.display())]
    Missing(PathBuf),
    /// The target root (path) is a symlink to a directory that does not exist (an unmounted
    /// disk, a path not made yet): refused rather than made through the symlink.
    /// A symlink to a symlink names each: "PATH is a symlink to A, a symlink to B, which does
    /// not exist".
    #[error("{} is a symlink to {}, which does not exist", .path.display(), chain_text(.chain))]
    DanglingSymlink {
        /// The symlink: the target root, or the first of its parents that is one.
        path: PathBuf,
        /// What it points to, as it says; then, while that is a symlink too, what that one
        /// points to, and so on (at most 40): the last one does not exist.
        chain: Vec<PathBuf>,
    },
    /// The directory (path) has other content and no `.flip/`.
    #[error("{} is not empty and is not a flip target (no .flip/ inside); deploy into a new or empty directory", .0.display())]
    NotATarget(PathBuf),
    /// A directory that is not a flip target, where one must exist already (not a deploy).
    #[error("{} is not a flip target (no .flip/ inside)", .0.display())]
    NoTarget(PathBuf),
    /// A new target inside what another target keeps (its releases, shared paths, state or
    /// `current`), where it would write into releases that target serves.
    #[error("{} is inside {}, a directory the flip target {} keeps; deploy next to that target, not into it", dir.display(), within.display(), outer.display())]
    InsideTarget {
        /// The directory a deploy would make a target.
        dir: PathBuf,
        /// What of the other target it is inside (`OUTER/releases`, ...).
        within: PathBuf,
        /// The other target's root.
        outer: PathBuf,
    },
    /// A deploy would have to create more than the target directory itself.
    #[error("cannot create the target {}: {} does not exist (--mkpath creates missing parents)", dir.display(), parent.display())]
    NoParent {
        /// The target directory.
        dir: PathBuf,
        /// Its first missing parent.
        parent: PathBuf,
    },
    /// Another session holds the target's lock.
    #[error("target is locked by {holder}; pass --wait to wait for it")]
    Locked {
        /// Who holds the lock, described for people.
        holder: String,
    },
    /// The lock (path) is held by the caller's own run, through another of its targets.
    #[error("{} is held by this same flip run through another of its targets: two targets name this one directory (through a symlink or a bind mount, as a host alias and its address, or with a user or port the ssh config supplies); name it once", .path.display())]
    HeldByThisRun {
        /// The lock file.
        path: PathBuf,
    },
    /// No complete release has this id.
    #[error("release {0} does not exist")]
    NoSuchRelease(u64),
    /// The target (path) has no live release.
    #[error("nothing is live yet: {} has no current release", .0.display())]
    NothingLive(PathBuf),
    /// `current` (path) points to something that is not a release of the target: nothing of
    /// flip's is live.
    #[error("{} points to {target:?}, not to a release flip made: nothing of flip's is live", path.display())]
    CurrentForeign {
        /// `current`.
        path: PathBuf,
        /// What it points to, as it reads.
        target: String,
    },
    /// No release is older than the live one.
    #[error("there is no release older than {current} to roll back to")]
    NothingToRollBack {
        /// The live release.
        current: u64,
    },
    /// The release (id) is live already.
    #[error("release {0} is already live")]
    AlreadyLive(u64),
    /// `current` (path) is not a symlink.
    #[error("{} exists and is not a symlink; flip will not replace it (move it away first)", .0.display())]
    CurrentNotSymlink(PathBuf),
    /// A written file does not match the manifest (`path` relative to the release).
    #[error("{path}: written content does not match the manifest ({detail})")]
    Integrity {
        /// The path concerned.
        path: String,
        /// What does not match.
        detail: String,
    },
    /// A committed release (`dir`) no longer is what was deployed: `first` names the first
    /// differences, `more` counts the others.
    #[error("{} has changed since it was deployed ({first}{}): not made live; `--force` makes it live as it is, `flip verify` lists every difference", dir.display(), more_text(*.more))]
    Changed {
        /// The release directory.
        dir: PathBuf,
        /// The first differences, `; `-separated.
        first: String,
        /// How many more there are.
        more: usize,
    },
    /// flip's own record at `path` is damaged.
    #[error("{} is damaged: {detail}", path.display())]
    Corrupt {
        /// The path concerned.
        path: PathBuf,
        /// What does not match.
        detail: String,
    },
    /// The client asked for something invalid (described).
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// One of flip's own directories or files under the target is of the wrong type (a
    /// symlink to somewhere else, a file where a directory belongs, ...).
    #[error("{} is {found}, not {expected}: flip never follows or replaces its own files under the target; move it away or restore it", path.display())]
    Layout {
        /// The path concerned.
        path: PathBuf,
        /// What is there ("a symlink", "a regular file", ...).
        found: &'static str,
        /// What belongs there.
        expected: &'static str,
    },
    /// A shared path under `shared/` is of another kind than the settings say (a file where a
    /// directory is shared, a symlink on the way): nothing was changed.
    #[error("{} is {found}, not {expected} ({why}): flip changes nothing under shared/ and does not deploy; move it away or change shared_dirs, shared_files or writable_dirs", path.display())]
    SharedConflict {
        /// The path under `shared/`.
        path: PathBuf,
        /// What is there ("a symlink", "a regular file", ...).
        found: &'static str,
        /// What the settings say belongs there.
        expected: &'static str,
        /// Which setting says so.
        why: String,
    },
    /// `writable_owner` names a user or group this host does not have (the message says
    /// which); nothing was changed.
    #[error("{0}: nothing was changed; create it on the target or change writable_owner")]
    UnknownOwner(String),
    /// The work was stopped because nobody waits for it any more (see [`crate::abandon`]).
    #[error("stopped: the client went away")]
    Abandoned,
    /// The release id counter reached the largest id there is.
    #[error("release ids are exhausted: {} holds {last}, the largest id flip hands out; deploy into a new target", path.display())]
    IdsExhausted {
        /// The path concerned.
        path: PathBuf,
        /// The last id handed out.
        last: u64,
    },
}

impl Error {
    /// The class of the error, which the agent sends on the wire and the client maps to an exit code.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Io { .. } | Error::Abandoned => ErrorClass::Io,
            Error::NoSpace { .. } | Error::NotEnoughSpace { .. } => ErrorClass::NoSpace,
            Error::Locked { .. } => ErrorClass::Locked,
            Error::HeldByThisRun { .. } => ErrorClass::Duplicate,
            Error::Integrity { .. } | Error::Corrupt { .. } | Error::Changed { .. } => {
                ErrorClass::Integrity
            }
            Error::BadRequest(_) => ErrorClass::BadRequest,
            Error::NotADirectory(_)
            | Error::Missing(_)
            | Error::DanglingSymlink { .. }
            | Error::NotATarget(_)
            | Error::NoTarget(_)
            | Error::NoParent { .. }
            | Error::InsideTarget { .. }
            | Error::NoSuchRelease(_)
            | Error::NothingLive(_)
            | Error::CurrentForeign { .. }
            | Error::NothingToRollBack { .. }
            | Error::AlreadyLive(_)
            | Error::CurrentNotSymlink(_)
            | Error::Layout { .. }
            | Error::SharedConflict { .. }
            | Error::UnknownOwner(_)
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

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// ", and N more" for [`Error::Changed`].
fn more_text(more: usize) -> String {
    match more {
        0 => String::new(),
        n => format!(", and {n} more"),
    }
}

/// The hops of a symlink chain as [`Error::DanglingSymlink`] tells them: `A, a symlink to B`.
fn chain_text(chain: &[PathBuf]) -> String {
    chain
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", a symlink to ")
}
