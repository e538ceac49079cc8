//! flip's agent protocol: the messages a client and an agent exchange, and their framing.
//!
//! A frame is a little-endian `u32` length followed by that many bytes of a bincode-encoded
//! [`Request`] or [`Response`]. The length is checked against [`MAX_FRAME`] before anything is
//! allocated, and decoding runs with the same limit, so a hostile peer cannot make either side
//! allocate more than one frame's worth of each thing a frame holds: its bytes (at most
//! [`MAX_FRAME`]); the strings and byte buffers decoded from them (at most [`MAX_FRAME`],
//! bincode's limit); and the slots of its lists with the paths they hold (at most [`MAX_FRAME`]:
//! every list is decoded by `bounded::vec`, which checks its length against what is left of that
//! budget before reserving it, and charges each element's own allocations). Whatever is sent,
//! one frame costs at most three times [`MAX_FRAME`] to decode, never the gigabytes a list of a
//! million tiny elements would otherwise take.
//!
//! A session starts in plain frames with [`Request::Hello`] (naming [`PROTOCOL`]) and
//! [`Response::Welcome`]. If the client asked for compression, both directions then switch to one
//! zstd stream each, flushed at every batch boundary: many small PHP files compress far better in
//! one shared stream than one by one.
//!
//! A deploy, in order (one round trip per step, whatever the number of files):
//! `Hello` → `Welcome`; `Lock` → `Locked` (after a `Waiting` if it waits); `Status` → `Status`;
//! when the live release has the new manifest's digest, `CheckLive` → `LiveIntact` (intact: no
//! release is made); when the client has no copy of the live manifest, `Probe` → `Probed`, one
//! round trip per level of the tree, to find the directories that differ; `Stage` +
//! `ManifestChunk`s → `Staged` (what the agent still needs), pipelined with `Changes` →
//! `Changes` chunks (what the release changes, for the deploy's report); `Signatures` →
//! `Signature`s + `SignaturesDone`; `Literal`/`Delta`/`Patch` frames + `Commit` → `Committed`;
//! `Activate` → `Activated`; `Prune` → `Pruned`; `Bye`. `GetManifest` → `ManifestChunk`s fetches
//! a release's manifest (a dry run without a cached copy of the live one).
//! A multi-host deploy that fails on another target after this one committed sends
//! `Discard` → `Discarded` instead of `Activate`. Message tags are pinned by `tests/tags.rs`.
//! Before any answer the agent may send [`Response::Notices`]: what it could not clean up, and
//! problems that did not stop the request.

pub mod adapt;
mod bounded;
mod frame;

pub use adapt::{AdaptiveLevel, ADAPTIVE};
pub use bounded::Weigh;
pub use frame::{Counter, FrameReader, FrameWriter};

use flip_manifest::{Digest, RelPath};
use serde::{Deserialize, Serialize};

/// Bumped on every incompatible change; the handshake refuses a mismatch.
pub const PROTOCOL: u32 = 7;
pub const MAGIC: [u8; 4] = *b"FLIP";
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 32 << 20;
/// Items per [`Response::Changes`] frame: an item is at most ~16 KiB (a path, a source path and
/// two symlink targets), so a frame stays far below [`MAX_FRAME`].
pub const CHANGES_PER_FRAME: usize = 1000;
/// File content is sent in chunks of at most this size.
pub const CHUNK: usize = 4 << 20;
/// Largest zstd window (as a power of two: 64 MiB) a `Patch` may use; the agent refuses
/// larger ones, which bounds its decoder's buffer.
pub const PATCH_WINDOW_LOG_MAX: u32 = 26;
/// Largest manifest accepted (in canonical encoding): about five million entries. The agent
/// holds it whole while decoding it (itself bounded by `flip_manifest`'s decode budget).
pub const MAX_MANIFEST: u64 = 256 << 20;

pub type Mtime = Option<(i64, u32)>;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    pub user: String,
    pub since: i64,
    pub what: Purpose,
}

/// Why a client takes a target's lock. Only a deploy may create the target's layout; the
/// holder's purpose is shown to whoever finds the target locked.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Purpose {
    Deploy,
    Rollback,
    Activate,
    Prune,
}

impl Purpose {
    /// The command's name: "deploy", "rollback", "activate", "prune".
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Deploy => "deploy",
            Purpose::Rollback => "rollback",
            Purpose::Activate => "activate",
            Purpose::Prune => "prune",
        }
    }
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the payload of a [`Request::Stage`] is, and what it is relative to.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum StageBase {
    /// The whole new manifest, canonically encoded.
    Whole,
    /// A [`flip_manifest::ManifestDiff`] against the live release's manifest, whose digest this
    /// is (an empty diff for an unchanged tree).
    Diff(Digest),
    /// A [`flip_manifest::DirPatch`] (the entries of the directories whose direct entries
    /// changed) against the live release's manifest, whose digest this is.
    Dirs(Digest),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReleaseSummary {
    pub id: u64,
    pub label: Option<String>,
    pub created: i64,
    pub files: u64,
    pub bytes: u64,
    pub manifest_digest: Digest,
    pub current: bool,
}

/// Something the agent could not remove (a file the deploy user may not delete, an immutable
/// file): the path on the target and why. Retried at the next cleanup.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Leftover {
    pub path: String,
    pub error: String,
}

/// A file the agent needs: `index` into the new manifest's regular files (in manifest order),
/// and the previous version at the same path with its size, usable as a delta basis.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Need {
    pub index: u32,
    pub basis: Option<(RelPath, u64)>,
}

/// A directory (`""` for the root) and its hashes in the client's new tree.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeItem {
    pub dir: String,
    pub flat: [u8; 8],
    pub merkle: [u8; 8],
}

/// How a probed directory compares with the live release's ([`Response::Probed`]).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ProbeState {
    /// The whole subtree is the same.
    Same,
    /// Its direct entries are the same; something below differs.
    Below,
    /// Its direct entries differ (and maybe more below).
    Differs,
    /// The live release has no such directory.
    Absent,
}

impl From<flip_manifest::DirState> for ProbeState {
    fn from(s: flip_manifest::DirState) -> Self {
        use flip_manifest::DirState;
        match s {
            DirState::Same => Self::Same,
            DirState::Below => Self::Below,
            DirState::Differs => Self::Differs,
            DirState::Absent => Self::Absent,
        }
    }
}

impl From<ProbeState> for flip_manifest::DirState {
    fn from(s: ProbeState) -> Self {
        match s {
            ProbeState::Same => Self::Same,
            ProbeState::Below => Self::Below,
            ProbeState::Differs => Self::Differs,
            ProbeState::Absent => Self::Absent,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigItem {
    pub index: u32,
    pub basis: RelPath,
}

/// `&'static str::from(&msg)` gives the variant's name, for errors and logs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, strum::IntoStaticStr)]
pub enum Request {
    Hello {
        magic: [u8; 4],
        protocol: u32,
        version: String,
        /// zstd level for the rest of the session; 0 = no compression.
        compress: i32,
    },
    Lock {
        wait: bool,
        holder: Holder,
    },
    Status,
    GetManifest {
        id: u64,
    },
    /// Start a release. `payload_len` bytes follow in `ManifestChunk`s, what `base` says they
    /// are. `digest` is the new manifest's digest, checked by the agent.
    Stage {
        label: Option<String>,
        base: StageBase,
        payload_len: u64,
        digest: Digest,
    },
    /// Compare directory hashes with the live release's (see [`flip_manifest::DirTree`]), for a
    /// client that does not have the live manifest.
    Probe(#[serde(deserialize_with = "bounded::vec")] Vec<ProbeItem>),
    ManifestChunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Signatures of delta bases, one per item.
    Signatures(#[serde(deserialize_with = "bounded::vec")] Vec<SigItem>),
    /// Content of file `index` (into the plan's files), in order; `last` closes it.
    Literal {
        index: u32,
        mtime: Mtime,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        last: bool,
    },
    /// An rsync delta of file `index` against `basis`, possibly in several chunks.
    Delta {
        index: u32,
        basis: RelPath,
        mtime: Mtime,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        last: bool,
    },
    /// A zstd frame compressed with `basis` (a file of the previous release whose content has
    /// digest `basis_digest`) as its reference prefix — zstd's `--patch-from` — that decompresses
    /// to file `index`. Needs no signature: the client kept the old version itself.
    Patch {
        index: u32,
        basis: RelPath,
        basis_digest: Digest,
        mtime: Mtime,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        last: bool,
    },
    Commit,
    /// Point `current` at a release.
    Activate {
        id: u64,
    },
    /// Point `current` at `to`, or at the newest release older than the live one.
    Rollback {
        to: Option<u64>,
    },
    Prune {
        keep: u32,
    },
    Verify {
        id: Option<u64>,
    },
    Bye,
    /// After `Stage` (before `Commit`): what the staged release changes against the live one,
    /// classified by [`flip_plan::report::deployed`] (the files the stage could not link or copy
    /// marked). With `all`, every changed path;
    /// without, only the files the stage had to deviate from its plan for. Answered by
    /// [`Response::Changes`] frames.
    Changes {
        all: bool,
    },
    /// Remove release `id`, committed by this session and never made live (a multi-host deploy
    /// that failed on another target). Answered by [`Response::Discarded`].
    Discard {
        id: u64,
    },
    /// Is the live release the one of manifest `digest`, and intact (every file as recorded at
    /// commit, every symlink and directory there)? Answered by [`Response::LiveIntact`]. A
    /// deploy of an unchanged tree then makes no release.
    CheckLive {
        digest: Digest,
    },
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ErrorClass {
    Locked,
    Target,
    Integrity,
    NoSpace,
    Io,
    BadRequest,
    Protocol,
    Internal,
}

/// `&'static str::from(&msg)` gives the variant's name, for errors and logs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, strum::IntoStaticStr)]
pub enum Response {
    Welcome {
        protocol: u32,
        version: String,
        host: String,
        root: String,
    },
    /// Sent once while `Lock { wait: true }` blocks.
    Waiting {
        holder: String,
    },
    Locked,
    Status {
        current: Option<u64>,
        #[serde(deserialize_with = "bounded::vec")]
        releases: Vec<ReleaseSummary>,
    },
    ManifestChunk {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        last: bool,
    },
    Staged {
        id: u64,
        previous: Option<u64>,
        /// The files whose content the agent needs, ascending.
        #[serde(deserialize_with = "bounded::vec")]
        needs: Vec<Need>,
        linked: u64,
        copied: u64,
        /// Files of the previous release no longer in the new one.
        removed: u64,
    },
    Signature {
        index: u32,
        #[serde(with = "serde_bytes")]
        sig: Vec<u8>,
    },
    SignaturesDone,
    /// One state per probed directory, in order.
    Probed(#[serde(deserialize_with = "bounded::vec")] Vec<ProbeState>),
    /// The staged release is `releases/<id>`.
    Committed {
        id: u64,
    },
    Activated {
        id: u64,
        previous: Option<u64>,
    },
    Pruned {
        #[serde(deserialize_with = "bounded::vec")]
        removed: Vec<u64>,
    },
    Verified {
        id: u64,
        #[serde(deserialize_with = "bounded::vec")]
        problems: Vec<String>,
    },
    Error {
        class: ErrorClass,
        message: String,
    },
    Bye,
    /// Sent before the answer it belongs to. `warnings`: problems that did not stop the request
    /// (a damaged release that is not live, an unexpected entry, ...). `leftovers`: when the
    /// agent looked (a cleanup, prune or listing), everything it could not remove as of now
    /// (replacing what an earlier notice said); `None` when it did not look.
    Notices {
        warnings: Vec<String>,
        leftovers: Option<Vec<Leftover>>,
    },
    /// One piece of the answer to [`Request::Changes`]: the counts (the same in every piece),
    /// at most [`CHANGES_PER_FRAME`] items in manifest order, and whether this is the last piece.
    Changes {
        counts: flip_plan::report::Counts,
        items: Vec<flip_plan::report::Item>,
        last: bool,
    },
    /// The release named by [`Request::Discard`] is gone.
    Discarded {
        id: u64,
    },
    /// The answer to [`Request::CheckLive`]: the live release's id when it is that manifest's
    /// and intact, else `None`.
    LiveIntact {
        id: Option<u64>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection to the agent failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Decode(String),
    #[error("protocol error: {0}")]
    Protocol(String),
}

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn messages_are_named_by_their_variant() {
        assert_eq!(<&str>::from(&Response::Bye), "Bye");
        assert_eq!(<&str>::from(&Response::Locked), "Locked");
        assert_eq!(<&str>::from(&Request::Bye), "Bye");
    }
}
