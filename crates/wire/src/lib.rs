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
//! [`Response::Welcome`]. If the client asked for compression (`compress` > 0: the client alone
//! decides), everything it sends after `Hello` is one zstd stream, and everything the agent sends
//! after `Welcome` another, each flushed at every batch boundary: many small PHP files compress
//! far better in one shared stream than one by one. The client does not wait for `Welcome`: it
//! pipelines what follows `Hello`.
//!
//! Requests that do not depend on an answer are sent together (a batch: the client waits once
//! for all their answers, a round trip). The agent handles them in order; when one fails, it
//! answers [`Response::Error`] for it and [`Response::NotDone`] for each request read after it
//! (at most [`DRAIN_ANSWERS_MAX`]) without acting on any, and the session ends.
//!
//! A deploy, in order (steps that do not depend on an answer in one batch, whatever the number
//! of files):
//! `Hello` → `Welcome`; `Lock` → `Locked` (after `Waiting` answers while it waits); (with shared paths) `Shared` →
//! `SharedState`; `Status` → `Status`;
//! when the live release has the new manifest's digest, `CheckLive` → `LiveIntact` (intact: no
//! release is made); when the client has no copy of the live manifest, `Probe` → `Probed`,
//! every directory at once (one round trip), to find the directories that differ; `Stage` +
//! `ManifestChunk`s → `Staged` (what the agent still needs), pipelined with `Changes` →
//! `Changes` chunks (what the release changes, for the deploy's report); `Signatures` →
//! `Signature`s + `SignaturesDone` (a client without the live manifest pipelines
//! `BasisSignatures` with the stage instead, answered the same way); `Literal`/`Delta`/`Patch` frames + `Commit` → `Committed`;
//! `Activate` → `Activated`; `Prune` → `Pruned`; `Bye`. A client that made the live release
//! sends its content ahead: `Stage` (with `ahead`), `Changes`, content, `Commit`,
//! `ActivateCommitted`, `Prune`, `Bye` in one batch (see [`Request::Stage`] for when the
//! content was not what the stage needs). A deploy that expects to change nothing
//! queues `EndIfLive` behind `CheckLive`: `Pruned` + `Bye` when the live release is intact (the
//! session ends in its first batch), else `NotDone` and the deploy goes on. `GetManifest` → `ManifestChunk`s fetches
//! a release's manifest (a dry run without a cached copy of the live one).
//! A multi-host deploy that fails on another target after this one committed sends
//! `Discard` → `Discarded` instead of `Activate`. A dry run: `Hello` → `Welcome`, `CanDeploy` →
//! `Deployable`, `Status` → `Status` (an error when the root is not there yet). An
//! environment's rollback or activation:
//! `Lock` + `Status`, then `Check` → `Checked` on every target, then `Activate` on every one. `flip doctor`: `Hello` → `Welcome`; `Doctor` →
//! `Findings` (no lock). Hooks around the swap: `Hook` → `HookOutput`s
//! (the hook's lines, as it writes them) + `HookDone`. Message tags are pinned by `tests/tags.rs`.
//! Before any answer the agent may send [`Response::Notices`]: what it could not clean up, and
//! problems that did not stop the request.

#![warn(missing_docs, unreachable_pub)]

pub mod adapt;
mod bounded;
mod frame;

pub use adapt::{AdaptiveLevel, ADAPTIVE};
pub use bounded::Weigh;
pub use frame::{Counter, FrameReader, FrameWriter};

use flip_manifest::{Digest, RelPath};
use serde::{Deserialize, Serialize};

/// Bumped on every incompatible change; the handshake refuses a mismatch.
pub const PROTOCOL: u32 = 15;
/// The first bytes of [`Request::Hello`]: this is flip.
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

/// Most bytes the agent's record of a first deploy's streamed files may cost before their
/// manifest comes ([`Request::StreamStart`]): each streamed file and each directory made for
/// one is charged [`stream_record_cost`] (the agent keeps their paths), in stream order. A
/// streamed path of a few KiB can make thousands of directories; without this bound a
/// client's few bytes cost the agent a thousand times as much memory. The client streams no
/// file that would pass it (that file is sent after the manifest, as any other).
pub const STREAM_RECORD_MAX: u64 = MAX_MANIFEST;

/// What recording streamed file or directory `rel` costs against [`STREAM_RECORD_MAX`]: its
/// path's bytes and 64 more.
pub fn stream_record_cost(rel: &RelPath) -> u64 {
    rel.as_str().len() as u64 + 64
}

/// A modification time: (seconds since the epoch, nanoseconds), or none.
pub type Mtime = Option<(i64, u32)>;

/// Bytes of each text of a [`Holder`] (`host`, `user`, `run`) at most: the agent refuses a
/// longer one (it is written into the target's lock file for the next caller to read).
pub const HOLDER_TEXT_MAX: usize = 256;

/// Who holds a target's lock.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    /// Process id of the client.
    pub pid: u32,
    /// Host the client runs on.
    pub host: String,
    /// User the client runs as.
    pub user: String,
    /// When it took the lock (seconds since the epoch).
    pub since: i64,
    /// What it is doing.
    pub what: Purpose,
    /// Names this run of the client (random, the same for every target it works on; empty:
    /// none): a target whose lock this run already holds under another name is the same
    /// directory twice (`ErrorClass::Duplicate`), not one to wait for.
    pub run: String,
}

/// Why a client takes a target's lock. Only a deploy may create the target's layout; the
/// holder's purpose is shown to whoever finds the target locked.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Purpose {
    /// `flip deploy`.
    Deploy,
    /// `flip rollback`.
    Rollback,
    /// `flip activate`.
    Activate,
    /// `flip prune`.
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

/// One complete release of a target.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReleaseSummary {
    /// The release id.
    pub id: u64,
    /// Its label, if it has one.
    pub label: Option<String>,
    /// When it was committed (seconds since the epoch).
    pub created: i64,
    /// Regular files in it.
    pub files: u64,
    /// Sum of their sizes.
    pub bytes: u64,
    /// Its manifest's digest.
    pub manifest_digest: Digest,
    /// Whether it is the live release.
    pub current: bool,
}

/// Something the agent could not remove (a file the deploy user may not delete, an immutable
/// file): the path on the target and why. Retried at the next cleanup.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Leftover {
    /// The path on the target, relative to its root.
    pub path: String,
    /// Why it could not be removed.
    pub error: String,
}

/// A file the agent needs: `index` into the new manifest's regular files (in manifest order),
/// and the previous version at the same path with its size, usable as a delta basis.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Need {
    /// Index into the new manifest's regular files (manifest order).
    pub index: u32,
    /// A delta basis (path in the live release, size in bytes), if the plan has one.
    pub basis: Option<(RelPath, u64)>,
}

/// A directory (`""` for the root) and its hashes in the client's new tree.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeItem {
    /// The directory (`""`: the root).
    pub dir: String,
    /// Hash of its direct entries ([`flip_manifest::DirTree`]).
    pub flat: [u8; 8],
    /// Hash of its whole subtree.
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

/// A basis whose signature the client wants.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigItem {
    /// Index into the new manifest's regular files (manifest order).
    pub index: u32,
    /// The basis to sign: the one the agent offered for that file.
    pub basis: RelPath,
}

/// `&'static str::from(&msg)` gives the variant's name, for errors and logs.
/// A message from the client to the agent.
///
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, strum::IntoStaticStr)]
pub enum Request {
    /// The first frame of a session.
    Hello {
        /// [`MAGIC`]: this is flip.
        magic: [u8; 4],
        /// The client's [`PROTOCOL`].
        protocol: u32,
        /// The client's flip version.
        version: String,
        /// zstd level for the rest of the session; 0 = no compression.
        compress: i32,
    },
    /// Take the target's lock for the rest of the session.
    Lock {
        /// Wait for a lock someone else holds (the agent answers [`Response::Waiting`] when the
        /// wait starts, when another holder takes over, and again every few seconds) instead
        /// of answering [`Response::Error`].
        wait: bool,
        /// Who takes the lock, recorded for whoever finds the target locked.
        holder: Holder,
    },
    /// The live release and every complete release.
    Status,
    /// The manifest of release `id`, in `ManifestChunk`s.
    GetManifest {
        /// The release id.
        id: u64,
    },
    /// Start a release. `payload_len` bytes follow in `ManifestChunk`s, what `base` says they
    /// are. `digest` is the new manifest's digest, checked by the agent.
    Stage {
        /// The release's label (a git commit, a timestamp, ...).
        label: Option<String>,
        /// What the payload is.
        base: StageBase,
        /// Bytes of the payload that follow in `ManifestChunk`s.
        payload_len: u64,
        /// The new manifest's digest.
        digest: Digest,
        /// The client sends the content of the files it expects the stage to need without
        /// waiting for `Staged` (a client that made the live release there plans as the agent
        /// will): [`needs_digest`] of those needs. The content follows the `Changes` asked with
        /// the stage, then `Commit` and the requests up to and including `Bye`. The agent holds
        /// every answer from `Staged` on until it reads that `Commit`, and writes them before it
        /// acts on it (the client reads nothing before it has written its content, so neither
        /// side waits for the other however much either sends).
        /// When the stage was done and needs exactly those files, with those bases, it goes on
        /// as usual; otherwise it drops every content frame up to the `Bye` and answers
        /// [`Response::NotDone`] for each request up to and including it (the `Changes` of the
        /// stage aside), acting on none, and the session goes on, the stage (if done) waiting
        /// for the content it needs.
        ahead: Option<Digest>,
    },
    /// Compare directory hashes with the live release's (see [`flip_manifest::DirTree`]), for a
    /// client that does not have the live manifest.
    Probe(#[serde(deserialize_with = "bounded::vec")] Vec<ProbeItem>),
    /// A piece of the payload announced by `Stage`.
    ManifestChunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Signatures of delta bases, one per item.
    Signatures(#[serde(deserialize_with = "bounded::vec")] Vec<SigItem>),
    /// Content of file `index` (into the plan's files), in order; `last` closes it.
    Literal {
        /// Index into the new manifest's regular files (manifest order).
        index: u32,
        /// The file's modification time, `(seconds, nanoseconds)`, if it is to be set.
        mtime: Mtime,
        /// The next piece of content, at most [`CHUNK`] bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// This piece closes the file.
        last: bool,
    },
    /// An rsync delta of file `index` against `basis`, possibly in several chunks.
    Delta {
        /// Index into the new manifest's regular files (manifest order).
        index: u32,
        /// The basis: a regular file of the live release.
        basis: RelPath,
        /// The file's modification time, `(seconds, nanoseconds)`, if it is to be set.
        mtime: Mtime,
        /// The next piece of content, at most [`CHUNK`] bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// This piece closes the file.
        last: bool,
    },
    /// A zstd frame compressed with `basis` (a file of the previous release whose content has
    /// digest `basis_digest`) as its reference prefix — zstd's `--patch-from` — that decompresses
    /// to file `index`. Needs no signature: the client kept the old version itself.
    Patch {
        /// Index into the new manifest's regular files (manifest order).
        index: u32,
        /// The basis: a regular file of the live release.
        basis: RelPath,
        /// The basis's blake3, as the client knows it.
        basis_digest: Digest,
        /// The file's modification time, `(seconds, nanoseconds)`, if it is to be set.
        mtime: Mtime,
        /// The next piece of content, at most [`CHUNK`] bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// This piece closes the file.
        last: bool,
    },
    /// Every needed file has arrived: check, flush and rename the release into place.
    Commit,
    /// Point `current` at a release. One this session did not commit, nor the one live before
    /// this session's first switch, is first checked against what was committed (refused when
    /// it changed since) unless `force`.
    Activate {
        /// The release id.
        id: u64,
        /// Make it live even if it changed since it was committed.
        force: bool,
    },
    /// Point `current` at `to`, or at the newest release older than the live one, checked as
    /// `Activate` checks it.
    Rollback {
        /// The release to go to; `None`: the newest release older than the live one.
        to: Option<u64>,
        /// Make it live even if it changed since it was committed.
        force: bool,
    },
    /// Remove old releases, keeping `keep` (and the live one).
    Prune {
        /// How many releases to keep (the live one always stays).
        keep: u32,
    },
    /// Check release `id` (default: the live one) against its manifest.
    Verify {
        /// The release id.
        id: Option<u64>,
    },
    /// The end of the session. The client keeps its side of the stream open until it has
    /// read the answer: an agent whose input ends before (or whose output nobody reads) takes
    /// the client for gone, and abandons what it was doing and what is still queued.
    Bye,
    /// After `Stage` (before `Commit`): what the staged release changes against the live one,
    /// classified by [`flip_plan::report::deployed`] (the files the stage could not link or copy
    /// marked). With `all`, every changed path;
    /// without, only the files the stage had to deviate from its plan for. Answered by
    /// [`Response::Changes`] frames.
    Changes {
        /// Every changed path, not only the deviations.
        all: bool,
    },
    /// Remove release `id`, committed by this session and never made live (a multi-host deploy
    /// that failed on another target). Answered by [`Response::Discarded`].
    Discard {
        /// The release id.
        id: u64,
    },
    /// Is the live release the one of manifest `digest`, and intact (every file as recorded at
    /// commit, every symlink and directory there)? Answered by [`Response::LiveIntact`]. A
    /// deploy of an unchanged tree then makes no release.
    CheckLive {
        /// The new manifest's digest.
        digest: Digest,
    },
    /// After `Lock`, before `Stage`, on a deploy with shared paths: the shared-path settings
    /// (`flip_plan::shared::SharedPaths`: `dirs`, `files`, `writable` directories and their
    /// `mode`; `owner`, `"user"` or `"user:group"`, applied when the agent runs as root). The
    /// agent checks each `shared/X` without following symlinks and answers
    /// [`Response::SharedState`], or refuses a conflicting type (naming the path) before anything
    /// changes. The following `Stage` must then carry the manifest
    /// `SharedPaths::apply(scan, present).staged`; at commit the agent moves the seeds (shared
    /// paths not present) into `shared/`, records the release with symlinks, and makes the
    /// writable directories.
    Shared {
        /// Shared directories, relative to the release root.
        #[serde(deserialize_with = "bounded::vec")]
        dirs: Vec<RelPath>,
        /// Shared regular files, relative to the release root.
        #[serde(deserialize_with = "bounded::vec")]
        files: Vec<RelPath>,
        /// Writable directories, relative to the release root (under `shared/` when inside a
        /// shared directory).
        #[serde(deserialize_with = "bounded::vec")]
        writable: Vec<RelPath>,
        /// Permission bits (within 07777) of the writable directories.
        mode: u32,
        /// Owner of the writable directories, `"user"` or `"user:group"`; applied only when the
        /// agent runs as root.
        owner: Option<String>,
    },
    /// `flip doctor`: look at the target read-only (never taking the lock) and report what is
    /// wrong with it, each finding with its fix. Needs no lock. Answered by
    /// [`Response::Findings`].
    Doctor,
    /// Runs a hook: `/bin/sh -c run` inside release `release` (a committed release directory of
    /// the root; the working directory), under the lock, with stdin `/dev/null`, in its own
    /// process group, for at most `timeout_ms` (then SIGTERM to the group, SIGKILL after
    /// [`HOOK_KILL_GRACE_MS`]). `env`: `NAME=VALUE` entries, only `FLIP_TARGET` and `FLIP_ENV`
    /// (at most [`HOOK_ENV_MAX`] bytes each); the agent adds `FLIP_RELEASE`,
    /// `FLIP_RELEASE_DIR` and `FLIP_PREVIOUS`. `wait_ms`: how long the agent waits for the
    /// next request after this one, at least (other targets' hooks may run that long; its idle
    /// timeout must not end the session meanwhile). Answered by [`Response::HookOutput`]
    /// frames as the hook writes, then [`Response::HookDone`].
    Hook {
        /// Id of the committed release the hook runs in (its working directory).
        release: u64,
        /// The shell command, at most [`HOOK_RUN_MAX`] bytes.
        run: String,
        /// Longest the hook may run, in milliseconds.
        timeout_ms: u64,
        /// `NAME=VALUE` entries: only `FLIP_TARGET` and `FLIP_ENV`.
        #[serde(deserialize_with = "bounded::vec")]
        env: Vec<String>,
        /// Least time the agent waits for the next request after this one, in milliseconds.
        wait_ms: u64,
    },
    /// A first deploy that sends while it hashes (nothing live on the target): at most `files`
    /// files of at most `bytes` bytes in all follow in [`Request::Stream`] frames, before the
    /// `Stage` (whole manifest) that must list each of them exactly (path, mode, size,
    /// blake3). The agent starts a staging directory and checks the free space for `bytes`.
    /// Not answered (its failure is the answer to the next request that is).
    StreamStart {
        /// Most files that follow.
        files: u64,
        /// Most bytes of content that follow, all files together.
        bytes: u64,
    },
    /// Content of a file streamed before its manifest (after [`Request::StreamStart`]), in
    /// order; `last` closes it. Not answered.
    Stream {
        /// The file's path in the release.
        path: RelPath,
        /// Its permission bits (within 07777).
        mode: u32,
        /// The file's modification time, `(seconds, nanoseconds)`, if it is to be set.
        mtime: Mtime,
        /// The next piece of content, at most [`CHUNK`] bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// This piece closes the file.
        last: bool,
    },
    /// After `Lock`: would `Activate` of release `id` (without `force`) pass its check? The
    /// release must exist; one that is live, or that this session committed, passes; any other
    /// is compared with what was committed, as `Activate` does (and `Activate` checks again).
    /// Answered by [`Response::Checked`], or an error naming the first differences. What an
    /// environment's rollback or activation asks every target before it moves any.
    Check {
        /// The release id.
        id: u64,
    },
    /// Could a deploy use the root, as it is now (a target, an empty directory, or missing
    /// with its parent there, or any missing parents when the agent runs with `--mkpath`)?
    /// Nothing changes; no lock. Answered by [`Response::Deployable`], or the error the
    /// deploy would fail with (not a directory, a directory that is not a target, a missing
    /// parent). What a dry run asks before `Status`.
    CanDeploy,
    /// Ends a deploy that turned out to change nothing, in the batch that found it out: when
    /// this session's last [`Request::CheckLive`] found the live release intact (and nothing
    /// was staged since), the agent prunes as [`Request::Prune`] with `keep` would (answering
    /// [`Response::Pruned`]) and ends the session as [`Request::Bye`] does (answering
    /// [`Response::Bye`]). Otherwise it acts on nothing and answers [`Response::NotDone`];
    /// the session goes on. A client that expects a no-op queues it behind `CheckLive` (and
    /// its `Probe`s), saving the round trip a `Prune` and a `Bye` of their own would cost.
    EndIfLive {
        /// How many releases to keep (the live one always stays).
        keep: u32,
    },
    /// After `Stage` (and its `Changes`): the rsync signatures of the delta bases the stage
    /// offered, for every needed file that goes as a delta when the client holds no old
    /// content — [`flip_plan::report::choose`]`(size, Some(basis size), false)` is
    /// [`flip_plan::report::Via::Delta`], the rule of a client without the live manifest. Answered as
    /// [`Request::Signatures`] is ([`Response::Signature`]s, then [`Response::SignaturesDone`]),
    /// so such a client asks in the stage's round trip instead of one of its own.
    BasisSignatures,
    /// Make live the release this session committed, checked as [`Request::Activate`] checks
    /// it; for a client that queues it before it knows the release's id. Answered by
    /// [`Response::Activated`].
    ActivateCommitted,
    /// After `Lock`: a `Stage` against the live release follows, but later (its manifest is
    /// still on its way: over SSH, the channel takes input only a round trip after the command
    /// started). The agent may use the wait to stage the live release again, so that the
    /// unchanged files are linked already when the `Stage` comes (`Root::prepare`); it does
    /// so only when the live release's manifest has the digest `base` (any, with `None`), no
    /// input is waiting yet, nothing is staged, and the last `CheckLive` did not find the new
    /// release live already; it stops linking once more input is there to read (the rest is
    /// linked by the `Stage`). A hint: not answered, and nothing the client sees depends on it
    /// but the time the `Stage` takes (what was prepared and not used is removed). Names no
    /// file: may be sent in the command line (`shown_safely`).
    Prepare {
        /// The digest of the live manifest the stage will be against, if the client knows it.
        base: Option<Digest>,
    },
}

/// The digest of a stage's needs, as `Stage`'s `ahead` names them: blake3 over each need in
/// order (its index, 4 bytes little-endian; then 0 for no basis, or 1, the basis's length (8
/// bytes little-endian), its bytes and its size (8 bytes little-endian)).
pub fn needs_digest(needs: &[Need]) -> Digest {
    let mut bytes = Vec::with_capacity(needs.len() * 16);
    for n in needs {
        bytes.extend_from_slice(&n.index.to_le_bytes());
        match &n.basis {
            None => bytes.push(0),
            Some((path, size)) => {
                bytes.push(1);
                bytes.extend_from_slice(&(path.as_str().len() as u64).to_le_bytes());
                bytes.extend_from_slice(path.as_str().as_bytes());
                bytes.extend_from_slice(&size.to_le_bytes());
            }
        }
    }
    Digest::of(&bytes)
}

/// Longest hook command accepted, in bytes.
pub const HOOK_RUN_MAX: usize = 64 << 10;
/// Longest value of a hook's environment variable, in bytes.
pub const HOOK_ENV_MAX: usize = 4 << 10;
/// Longest line of hook output forwarded, in bytes; a longer line is cut (and marked).
pub const HOOK_LINE_MAX: usize = 8 << 10;
/// Time between SIGTERM and SIGKILL when a hook times out, in milliseconds.
pub const HOOK_KILL_GRACE_MS: u64 = 5_000;

/// Which output of a hook a [`Response::HookOutput`] line comes from.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum HookStream {
    /// The hook's standard output.
    Stdout,
    /// The hook's standard error.
    Stderr,
}

/// What kind of failure a [`Response::Error`] reports.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ErrorClass {
    /// Someone else holds the target's lock.
    Locked,
    /// The target is not usable (not a directory, not a flip target, ...).
    Target,
    /// Content does not match its digest, or a release is damaged.
    Integrity,
    /// The target's filesystem is full.
    NoSpace,
    /// A system call failed.
    Io,
    /// The request is invalid (a path, size or index out of bounds, ...).
    BadRequest,
    /// The request came at the wrong time or did not decode.
    Protocol,
    /// A bug in the agent.
    Internal,
    /// The target's lock is held by this same client run, through another of its targets: two
    /// of them are one directory.
    Duplicate,
}

/// `&'static str::from(&msg)` gives the variant's name, for errors and logs.
/// A message from the agent to the client.
///
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, strum::IntoStaticStr)]
pub enum Response {
    /// The answer to `Hello`.
    Welcome {
        /// The agent's [`PROTOCOL`].
        protocol: u32,
        /// The agent's flip version.
        version: String,
        /// The agent's host name.
        host: String,
        /// The target root, as the agent resolved it: `~` expanded, absolute, and with
        /// symlinks resolved when it exists (with the host, what names one target however
        /// the client wrote it).
        root: String,
    },
    /// Sent while `Lock { wait: true }` blocks: when the wait starts, when another holder
    /// takes over, and the same text again every few seconds (a keepalive: writing is how an
    /// agent behind a relay finds out that its client is gone).
    Waiting {
        /// Who holds the lock, described for people.
        holder: String,
    },
    /// The lock is taken.
    Locked,
    /// The answer to `Status`.
    Status {
        /// The live release, if any.
        current: Option<u64>,
        /// Every complete release, oldest first.
        #[serde(deserialize_with = "bounded::vec")]
        releases: Vec<ReleaseSummary>,
    },
    /// A piece of a manifest (the answer to `GetManifest`).
    ManifestChunk {
        /// The next piece.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// This is the last piece.
        last: bool,
    },
    /// The answer to `Stage`: the release is being staged as `id`.
    Staged {
        /// The release id.
        id: u64,
        /// The release that was live before, if any.
        previous: Option<u64>,
        /// The files whose content the agent needs, ascending.
        #[serde(deserialize_with = "bounded::vec")]
        needs: Vec<Need>,
        /// Files hard-linked from the live release.
        linked: u64,
        /// Files copied from content the target has.
        copied: u64,
        /// Files of the previous release no longer in the new one.
        removed: u64,
    },
    /// The signature of one basis asked for by `Signatures`.
    Signature {
        /// Index into the new manifest's regular files.
        index: u32,
        /// The rsync signature of the basis (`fast_rsync`'s format).
        #[serde(with = "serde_bytes")]
        sig: Vec<u8>,
    },
    /// Every signature asked for was sent.
    SignaturesDone,
    /// One state per probed directory, in order.
    Probed(#[serde(deserialize_with = "bounded::vec")] Vec<ProbeState>),
    /// The staged release is `releases/<id>`.
    Committed {
        /// The release id.
        id: u64,
    },
    /// `current` names release `id` now.
    Activated {
        /// The release id.
        id: u64,
        /// The release that was live before, if any.
        previous: Option<u64>,
    },
    /// The answer to `Prune`.
    Pruned {
        /// Release ids removed.
        #[serde(deserialize_with = "bounded::vec")]
        removed: Vec<u64>,
    },
    /// The answer to `Verify`.
    Verified {
        /// The release id.
        id: u64,
        /// What does not match the manifest, one line each; empty if intact.
        #[serde(deserialize_with = "bounded::vec")]
        problems: Vec<String>,
    },
    /// The request failed; the session may go on (after a failed `Stage`, only with `Bye`).
    Error {
        /// What kind of failure it is (picks the client's exit code).
        class: ErrorClass,
        /// What failed, naming the path and the cause.
        message: String,
    },
    /// The answer to `Bye`: the session ends.
    Bye,
    /// Sent before the answer it belongs to. `warnings`: problems that did not stop the request
    /// (a damaged release that is not live, an unexpected entry, ...). `leftovers`: when the
    /// agent looked (a cleanup, prune or listing), everything it could not remove as of now
    /// (replacing what an earlier notice said); `None` when it did not look.
    Notices {
        /// Problems that did not stop the request.
        warnings: Vec<String>,
        /// What the agent could not remove, when it looked.
        leftovers: Option<Vec<Leftover>>,
    },
    /// One piece of the answer to [`Request::Changes`]: the counts (the same in every piece),
    /// at most [`CHANGES_PER_FRAME`] items in manifest order, and whether this is the last piece.
    Changes {
        /// The counts of the whole release.
        counts: flip_plan::report::Counts,
        /// The next changed paths.
        items: Vec<flip_plan::report::Item>,
        /// This is the last piece.
        last: bool,
    },
    /// The release named by [`Request::Discard`] is gone.
    Discarded {
        /// The release id.
        id: u64,
    },
    /// The answer to [`Request::CheckLive`]: the live release's id when it is that manifest's
    /// and intact, else `None`.
    LiveIntact {
        /// The release id.
        id: Option<u64>,
    },
    /// The answer to [`Request::Shared`]: the shared paths `shared/` already has (each of its
    /// kind); the others are seeded from the release at commit.
    SharedState {
        /// The shared paths (as listed in `dirs` and `files`) that `shared/` already has, each
        /// of its kind.
        #[serde(deserialize_with = "bounded::vec")]
        present: Vec<RelPath>,
    },
    /// The answer to [`Request::Doctor`]: the agent's clock when it answered (Unix
    /// milliseconds, for the client's skew check) and what it found, in the order it looked.
    Findings {
        /// The agent's clock when it answered, in Unix milliseconds.
        time_ms: i64,
        /// What the agent found, in the order it looked.
        #[serde(deserialize_with = "bounded::vec")]
        findings: Vec<Finding>,
    },
    /// One line a hook wrote (without its newline; at most [`HOOK_LINE_MAX`] bytes of it, a
    /// longer one cut and marked), sent as it comes.
    HookOutput {
        /// Which output the line comes from.
        stream: HookStream,
        /// The line, without its newline (lossy UTF-8), at most [`HOOK_LINE_MAX`] bytes.
        line: String,
    },
    /// The hook ended: its exit `status` (`None` when a signal ended it: `signal`), whether
    /// it was killed for exceeding its timeout, and how long it ran, in milliseconds.
    HookDone {
        /// The hook's exit status; `None` when a signal ended it.
        status: Option<i32>,
        /// The signal that ended the hook, if one did.
        signal: Option<i32>,
        /// Whether the agent killed the hook for exceeding its timeout.
        timed_out: bool,
        /// How long the hook ran, in milliseconds.
        duration_ms: u64,
    },
    /// A request of a pipelined batch the agent did not act on, because an earlier one failed
    /// (answered with [`Response::Error`]): `request` names it (the [`Request`] variant),
    /// `because` is that first error's message. The session then ends.
    NotDone {
        /// The request not acted on (its variant's name).
        request: String,
        /// The message of the first error of the batch.
        because: String,
    },
    /// The answer to [`Request::Check`]: release `id` may be made live as it is.
    Checked {
        /// The release id.
        id: u64,
    },
    /// The answer to [`Request::CanDeploy`]: a deploy could use the root; `exists`: it is a
    /// target already (else a deploy would make it one).
    Deployable {
        /// The root is a target already.
        exists: bool,
    },
}

/// Most requests expecting an answer that an agent reads, after a failed one, to answer them
/// [`Response::NotDone`] (the rest of the client's batch); content frames read meanwhile are
/// dropped unread, at most [`DRAIN_FRAMES_MAX`] of them. Then the session ends.
pub const DRAIN_ANSWERS_MAX: usize = 256;
/// Most frames an agent reads after a failed request (see [`DRAIN_ANSWERS_MAX`]).
pub const DRAIN_FRAMES_MAX: usize = 1 << 16;

/// How much a [`Finding`] of `flip doctor` matters.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The check passed.
    Ok,
    /// Worth knowing, nothing to fix (a deploy is running, php's CLI settings may not be FPM's).
    Note,
    /// Risky, depending on what the agent cannot see (the web server's configuration).
    Warning,
    /// Something that breaks or will break deploys, rollbacks or prunes on this target.
    Problem,
}

impl Severity {
    /// "ok", "note", "warning", "problem".
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Ok => "ok",
            Severity::Note => "note",
            Severity::Warning => "warning",
            Severity::Problem => "problem",
        }
    }
}

/// One thing `flip doctor` found on a target: which `check` (`layout`, `current`, `releases`,
/// `writable`, `leftovers`, `space`, `lock`, `php`, ...), how much it matters, what it saw,
/// and how to fix it (a command or a setting; `None` when there is nothing to fix).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Finding {
    /// Which check found it (`layout`, `current`, `releases`, ...).
    pub check: String,
    /// How much it matters.
    pub severity: Severity,
    /// What the agent saw, naming the path.
    pub message: String,
    /// How to fix it (a command or a setting); `None` when there is nothing to fix.
    pub fix: Option<String>,
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Reading or writing the stream failed.
    #[error("connection to the agent failed: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// A frame longer than [`MAX_FRAME`] (its length).
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// A frame that does not decode.
    #[error("malformed frame: {0}")]
    Decode(String),
    /// A frame that is not what the protocol allows here.
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
