//! A whole agent session: `flip_agent::serve` reads a well-formed plain `Hello` (compress 0) and
//! then frames derived from the fuzz input, against a real root directory on disk.
//!
//! The input is decoded with `arbitrary` into a list of operations: raw requests with fuzzed
//! fields, raw bytes, and "client-like" operations (stage a generated tree in full or as a diff
//! against the live manifest, send the content the agent asked for as literals, real rsync
//! deltas or zstd patches, commit, activate, a whole deploy in one go). Frames are rendered
//! lazily, when the agent asks for more bytes, so they can use what the agent answered so far
//! (which files it needs, the id it committed) and what is on disk (the live manifest for a
//! diff, delta and patch bases); that lets the fuzzer get past the digests and reach deltas,
//! patches, several releases, rollback and prune.
//!
//! Checked after every input:
//! - no panic (and no allocation beyond the limits of `LimitAlloc`);
//! - nothing outside the root changed: the root's parent holds the root and a `canary/`
//!   directory (symlinks in generated trees point at it), and is snapshotted before and compared
//!   after every session;
//! - no `releases/.staging-*` directory survives the session;
//! - `current`, if present, names a complete release that verifies clean against its manifest.
//!
//! One directory per process (under /dev/shm when it exists), wiped between inputs.
#![no_main]

use arbitrary::Arbitrary;
use flip_fuzz::SharedBuf;
use flip_manifest::{Digest, Entry, EntryKind, Manifest, RelPath};
use flip_wire::{
    FrameReader, Holder, Need, ProbeItem, Request, Response, SigItem, MAGIC, PROTOCOL,
};
use libfuzzer_sys::fuzz_target;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Cursor, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[global_allocator]
static ALLOC: flip_fuzz::LimitAlloc = flip_fuzz::LimitAlloc {
    // The agent's own cap: `Stage::apply_delta` reserves min(manifest size, 1 GiB) for the
    // output, and the manifest size is the client's word. Everything else stays within a frame.
    max_single: 1 << 30,
    // That reservation, plus a few frames. The agent leaks one `Root` per session by design (one
    // session per process in production), so the live total also grows slowly over a run.
    max_live: (1 << 30) + (256 << 20),
};

// ---------------------------------------------------------------------------------------------
// The fuzz input.

#[derive(Arbitrary, Debug)]
struct Input {
    /// Whether the root directory exists (empty) before the session; else the agent creates it.
    root_exists: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Lock {
        wait: bool,
        deploy: bool,
    },
    Status,
    /// Directory hashes to compare with the live release.
    Probe(Vec<(String, [u8; 8], [u8; 8])>),
    GetManifest {
        id: u8,
    },
    Stage {
        label: Option<String>,
        tree: Tree,
        how: StageHow,
        chunk: u16,
        /// Content for the needs of this digest follows (mostly not what the stage needs:
        /// dropped up to the next `Bye`).
        ahead: Option<[u8; 32]>,
    },
    ManifestChunk(Vec<u8>),
    Signatures(Vec<SigOp>),
    /// The signatures of the bases the stage offered for deltas.
    BasisSignatures,
    /// Make live the release this session committed.
    ActivateCommitted,
    /// Content of one file the agent said it needs.
    Content {
        pick: u8,
        enc: Enc,
        chunk: u16,
        corrupt: bool,
        mtime: Option<(i64, u32)>,
    },
    /// Content of every file the agent still needs.
    AllContent {
        enc: Enc,
    },
    Literal {
        index: u8,
        data: Vec<u8>,
        last: bool,
        mtime: Option<(i64, u32)>,
    },
    Delta {
        index: u8,
        basis: Name,
        data: Vec<u8>,
        last: bool,
    },
    /// A patch with fuzzed content; `basis_digest` read from disk when `true_digest`.
    Patch {
        index: u8,
        basis: Name,
        true_digest: bool,
        data: PatchData,
        last: bool,
    },
    Commit,
    Activate {
        id: u8,
        force: bool,
    },
    /// Activate the release committed last in this session.
    ActivateLast,
    Rollback {
        to: Option<u8>,
        force: bool,
    },
    Prune {
        keep: u8,
    },
    Verify {
        id: Option<u8>,
    },
    Check {
        id: u8,
    },
    CanDeploy,
    Bye,
    /// What the staged release changes (the deploy's report).
    Changes {
        all: bool,
    },
    Hello {
        compress: i8,
    },
    /// Bytes on the wire as they are (garbage, truncated frames, ...).
    Raw(Vec<u8>),
    /// Lock (if needed), stage `tree`, send all content, commit, optionally activate.
    Deploy {
        tree: Tree,
        diff: bool,
        enc: Enc,
        activate: bool,
    },
}

/// How changed content is sent (when the agent reports a basis; else as a literal).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Enc {
    Literal,
    Delta,
    Patch,
}

#[derive(Arbitrary, Debug)]
enum PatchData {
    Raw(Vec<u8>),
    /// A zstd frame header (magic, no content size, window 2^(10 + log % 22)) then `blocks`.
    Frame {
        log: u8,
        blocks: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
enum StageHow {
    Full,
    /// A manifest diff against the live release (falls back to a full manifest if none).
    Diff,
    /// A diff, announced against a wrong base digest.
    WrongBase,
    /// The right payload with a wrong announced digest.
    WrongDigest,
    /// A payload of raw bytes (announced digest computed if they decode).
    Raw(Vec<u8>),
    /// Raw bytes announced as a diff against the live manifest.
    RawDiff(Vec<u8>),
    /// The payload with `payload_len` off by this much.
    WrongLen(i8),
    /// A directory patch against the live release (as a client without its manifest sends).
    Dirs,
    /// Raw bytes announced as a directory patch against the live manifest.
    RawDirs(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct SigOp {
    pick: u8,
    basis: Option<Name>,
}

#[derive(Arbitrary, Debug)]
struct Tree {
    entries: Vec<TEntry>,
}

#[derive(Arbitrary, Debug)]
struct TEntry {
    path: Name,
    kind: TKind,
}

#[derive(Arbitrary, Debug)]
enum TKind {
    Dir {
        mode: u16,
    },
    File {
        mode: u16,
        content: Content,
    },
    /// A file whose size and digest match no content the client has.
    FileLie {
        mode: u16,
        size: u64,
        digest: u8,
    },
    Symlink {
        target: Target,
    },
}

#[derive(Arbitrary, Debug)]
enum Content {
    Bytes(Vec<u8>),
    /// Text of `lines` lines, one of them changed by `tweak`: versions differ a little, so real
    /// deltas are small.
    Lines {
        lines: u16,
        tweak: u8,
    },
}

#[derive(Arbitrary, Debug)]
enum Name {
    Comps(Vec<u8>),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Target {
    Rel(Name),
    /// `../` × depth (at most 3: from the top of a release, 3 levels up is the root's parent)
    /// then a name.
    Up {
        depth: u8,
        name: Name,
    },
    /// The canary file outside the root, relative (`../../../canary/f` and shorter).
    Canary {
        depth: u8,
        dir: bool,
    },
    /// The canary, by absolute path.
    CanaryAbs {
        dir: bool,
    },
    Raw(String),
}

const COMPS: &[&str] = &[
    "a",
    "b",
    "c",
    "a-b",
    "\u{e9}",
    "index.php",
    "current",
    "releases",
    ".flip",
    "..a",
    "a b",
    ".staging-1",
    "1",
];

fn name_str(n: &Name) -> String {
    match n {
        Name::Comps(c) => {
            let parts: Vec<&str> = c
                .iter()
                .take(4)
                .map(|i| COMPS[*i as usize % COMPS.len()])
                .collect();
            if parts.is_empty() {
                "a".into()
            } else {
                parts.join("/")
            }
        }
        Name::Raw(s) => s.clone(),
    }
}

fn rel(n: &Name) -> RelPath {
    RelPath::new(name_str(n)).unwrap_or_else(|_| RelPath::new("a").unwrap())
}

fn content_bytes(c: &Content) -> Vec<u8> {
    match c {
        Content::Bytes(b) => b.clone(),
        Content::Lines { lines, tweak } => {
            let lines = (*lines % 4096) as usize;
            let mut out = Vec::with_capacity(lines * 24);
            for i in 0..lines {
                if i % 251 == *tweak as usize % 251 {
                    out.extend_from_slice(format!("<?php // changed {tweak}\n").as_bytes());
                } else {
                    out.extend_from_slice(format!("<?php echo {i};\n").as_bytes());
                }
            }
            out
        }
    }
}

fn target_str(t: &Target, env: &Env) -> String {
    let s = match t {
        Target::Rel(n) => name_str(n),
        Target::Up { depth, name } => {
            format!("{}{}", "../".repeat((*depth % 4) as usize), name_str(name))
        }
        Target::Canary { depth, dir } => format!(
            "{}canary{}",
            "../".repeat((*depth % 4) as usize),
            if *dir { "" } else { "/f" }
        ),
        Target::CanaryAbs { dir } => {
            let c = env.parent.join("canary");
            if *dir { c } else { c.join("f") }.display().to_string()
        }
        // Never anything that could reach beyond the root's parent, should the agent ever
        // follow a symlink it created: no absolute paths, no `..`.
        Target::Raw(s) => s
            .trim_start_matches('/')
            .split('/')
            .filter(|c| *c != "..")
            .collect::<Vec<_>>()
            .join("/"),
    };
    if s.is_empty() || s.contains('\0') || s.len() > flip_manifest::MAX_LINK_TARGET {
        "x".into()
    } else {
        s
    }
}

/// A valid manifest from whatever the fuzzer listed: missing parents are added as directories,
/// repeated paths keep their first entry, entries under a non-directory are dropped. Records
/// every generated file's content by digest.
fn build_manifest(t: &Tree, env: &Env, contents: &mut HashMap<Digest, Vec<u8>>) -> Manifest {
    let mut map: BTreeMap<RelPath, EntryKind> = BTreeMap::new();
    for e in t.entries.iter().take(64) {
        let path = rel(&e.path);
        let kind = match &e.kind {
            TKind::Dir { mode } => EntryKind::Dir {
                mode: *mode as u32 & 0o7777,
            },
            TKind::File { mode, content } => {
                let c = content_bytes(content);
                let digest = Digest::of(&c);
                let size = c.len() as u64;
                contents.insert(digest, c);
                EntryKind::File {
                    mode: *mode as u32 & 0o7777,
                    size,
                    digest,
                }
            }
            TKind::FileLie { mode, size, digest } => EntryKind::File {
                mode: *mode as u32 & 0o7777,
                size: *size,
                digest: Digest([*digest; 32]),
            },
            TKind::Symlink { target } => EntryKind::Symlink {
                target: target_str(target, env),
            },
        };
        let mut parent = path.parent();
        while let Some(p) = parent {
            parent = p.parent();
            map.entry(p).or_insert(EntryKind::Dir { mode: 0o755 });
        }
        map.entry(path).or_insert(kind);
    }
    let mut kept: Vec<Entry> = Vec::new();
    let mut dirs: std::collections::HashSet<RelPath> = Default::default();
    for (path, kind) in map {
        if let Some(p) = path.parent() {
            if !dirs.contains(&p) {
                continue;
            }
        }
        if matches!(kind, EntryKind::Dir { .. }) {
            dirs.insert(path.clone());
        }
        kept.push(Entry { path, kind });
    }
    Manifest::new(kept).expect("the harness builds valid manifests")
}

// ---------------------------------------------------------------------------------------------
// The per-process directory.

struct Env {
    parent: PathBuf,
    root: PathBuf,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        // Leftovers of earlier runs whose process is gone.
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("flip-fuzz-agent-") {
                    if !Path::new("/proc").join(pid).exists() {
                        remove_tree(&e.path());
                    }
                }
            }
        }
        let parent = base.join(format!("flip-fuzz-agent-{}", std::process::id()));
        remove_tree(&parent);
        std::fs::create_dir_all(parent.join("canary/d")).unwrap();
        std::fs::write(parent.join("canary/f"), b"canary\n").unwrap();
        Env {
            root: parent.join("root"),
            parent,
        }
    })
}

fn remove_tree(p: &Path) {
    if std::fs::remove_dir_all(p).is_err() && p.exists() {
        // Read-only directories left by a release: make everything writable and retry.
        fn chmod_all(p: &Path) {
            if let Ok(m) = std::fs::symlink_metadata(p) {
                if m.is_dir() {
                    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
                    if let Ok(rd) = std::fs::read_dir(p) {
                        for e in rd.flatten() {
                            chmod_all(&e.path());
                        }
                    }
                }
            }
        }
        chmod_all(p);
        std::fs::remove_dir_all(p).expect("wiping the fuzz root");
    }
}

/// Everything under `dir` except `skip`: path, type, mode, size, mtime, and file content.
fn snapshot(dir: &Path, skip: &Path) -> Vec<String> {
    fn walk(d: &Path, skip: &Path, out: &mut Vec<String>) {
        let mut names: Vec<_> = match std::fs::read_dir(d) {
            Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
            Err(e) => {
                out.push(format!("{}: {e}", d.display()));
                return;
            }
        };
        names.sort();
        for p in names {
            if p == skip {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            let content = if m.is_file() {
                format!("{:?}", std::fs::read(&p).unwrap())
            } else if m.file_type().is_symlink() {
                format!("-> {:?}", std::fs::read_link(&p).unwrap())
            } else {
                String::new()
            };
            out.push(format!(
                "{} {:o} {} {}.{} {}",
                p.display(),
                m.mode(),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                content
            ));
            if m.is_dir() {
                walk(&p, skip, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, skip, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// The client side: renders operations into bytes when the agent wants more.

/// How a file's content went.
enum Sent {
    Literal,
    Delta(RelPath),
    Patch(RelPath, [u8; 32]),
}

struct Staged {
    manifest: Option<Manifest>,
    needs: Vec<Need>,
    /// Needs whose content has been sent in full (`AllContent` skips them).
    sent: Vec<u32>,
}

struct Client {
    env: &'static Env,
    ops: VecDeque<Op>,
    out: Vec<u8>,
    pos: usize,
    /// The agent's responses.
    responses: SharedBuf,
    parsed: usize,
    contents: HashMap<Digest, Vec<u8>>,
    /// The manifest of the last Stage sent, until the agent answers Staged.
    staging: Option<Option<Manifest>>,
    staged: Option<Staged>,
    locked: bool,
    last_committed: Option<u64>,
}

impl Client {
    fn send(&mut self, req: &Request) {
        if trace() {
            eprintln!("flip-fuzz: -> {}", cut(format!("{req:?}")));
        }
        self.out.extend(flip_fuzz::frame(req));
    }

    /// Reads the agent's answers so far.
    fn read_responses(&mut self) {
        let all = self.responses.0.lock().unwrap().clone();
        loop {
            let rest = &all[self.parsed..];
            if rest.len() < 4 {
                break;
            }
            let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
            if rest.len() < 4 + len {
                break;
            }
            let frame = rest[..4 + len].to_vec();
            self.parsed += 4 + len;
            let resp: Response = FrameReader::new(Box::new(Cursor::new(frame)))
                .recv()
                .expect("the agent sends well-formed responses");
            match resp {
                Response::Locked => self.locked = true,
                Response::Staged { needs, .. } => {
                    let manifest = self.staging.take().flatten();
                    self.staged = Some(Staged {
                        manifest,
                        needs,
                        sent: Vec::new(),
                    });
                }
                Response::Committed { id, .. } => {
                    self.last_committed = Some(id);
                    self.staged = None;
                }
                _ => {}
            }
        }
    }

    fn live_manifest(&self) -> Option<(Vec<u8>, Manifest)> {
        let root = &self.env.root;
        let target = std::fs::read_link(root.join("current")).ok()?;
        let id = target.to_str()?.strip_prefix("releases/")?;
        let bytes = std::fs::read(root.join(format!(".flip/releases/{id}.manifest"))).ok()?;
        let m = flip_manifest::decode(&bytes).ok()?;
        Some((bytes, m))
    }

    fn stage(
        &mut self,
        label: Option<String>,
        tree: &Tree,
        how: &StageHow,
        chunk: u16,
        ahead: Option<[u8; 32]>,
    ) {
        let manifest = build_manifest(tree, self.env, &mut self.contents);
        let mut digest = manifest.digest().0;
        let live = self.live_manifest();
        let (mut base, payload, known) = match how {
            StageHow::Full | StageHow::WrongDigest | StageHow::WrongLen(_) => {
                (None, flip_manifest::encode(&manifest), Some(manifest))
            }
            StageHow::Diff | StageHow::WrongBase => match &live {
                Some((bytes, prev)) => (
                    Some(Digest::of(bytes).0),
                    flip_manifest::encode_diff(&prev.diff(&manifest)),
                    Some(manifest),
                ),
                None => (None, flip_manifest::encode(&manifest), Some(manifest)),
            },
            StageHow::Raw(b) => {
                let m = flip_manifest::decode(b).ok();
                if let Some(m) = &m {
                    digest = m.digest().0;
                }
                (None, b.clone(), m)
            }
            StageHow::Dirs => match &live {
                Some((bytes, prev)) => {
                    let (old, new) = (
                        flip_manifest::DirTree::new(prev),
                        flip_manifest::DirTree::new(&manifest),
                    );
                    // Every directory of the new tree whose direct entries differ or are new.
                    let mut dirs = std::collections::BTreeSet::new();
                    let mut stack = vec![String::new()];
                    while let Some(d) = stack.pop() {
                        let (flat, merkle) = new.hashes(&d).unwrap();
                        match old.compare(&d, &flat, &merkle) {
                            flip_manifest::DirState::Same => continue,
                            flip_manifest::DirState::Below => {}
                            _ => {
                                dirs.insert(d.clone());
                            }
                        }
                        stack.extend_from_slice(new.subdirs(&d));
                    }
                    (
                        Some(Digest::of(bytes).0),
                        flip_manifest::encode_dir_patch(&new.patch(&manifest, &dirs)),
                        Some(manifest),
                    )
                }
                None => (None, flip_manifest::encode(&manifest), Some(manifest)),
            },
            StageHow::RawDirs(b) => {
                let m = live.as_ref().and_then(|(_, prev)| {
                    prev.apply_dirs(&flip_manifest::decode_dir_patch(b).ok()?)
                        .ok()
                });
                if let Some(m) = &m {
                    digest = m.digest().0;
                }
                (
                    live.as_ref().map(|(bytes, _)| Digest::of(bytes).0),
                    b.clone(),
                    m,
                )
            }
            StageHow::RawDiff(b) => {
                let m = live
                    .as_ref()
                    .and_then(|(_, prev)| prev.apply(&flip_manifest::decode_diff(b).ok()?).ok());
                if let Some(m) = &m {
                    digest = m.digest().0;
                }
                (
                    live.as_ref().map(|(bytes, _)| Digest::of(bytes).0),
                    b.clone(),
                    m,
                )
            }
        };
        if matches!(how, StageHow::WrongBase) {
            base = Some([0x5a; 32]);
        }
        if matches!(how, StageHow::WrongDigest) {
            digest[0] ^= 1;
        }
        let payload_len = match how {
            StageHow::WrongLen(d) => (payload.len() as i64 + *d as i64).max(0) as u64,
            _ => payload.len() as u64,
        };
        let dirs = matches!(how, StageHow::Dirs | StageHow::RawDirs(_));
        let base = match base {
            None => flip_wire::StageBase::Whole,
            Some(b) if dirs => flip_wire::StageBase::Dirs(Digest(b)),
            Some(b) => flip_wire::StageBase::Diff(Digest(b)),
        };
        self.send(&Request::Stage {
            label,
            base,
            payload_len,
            digest: Digest(digest),
            ahead: ahead.map(Digest),
        });
        let chunk = (chunk as usize).max(1).max(payload.len() / 8);
        for c in payload.chunks(chunk) {
            self.send(&Request::ManifestChunk(c.to_vec()));
        }
        self.staging = Some(known);
    }

    /// What to send for need `need`: the bytes and how they are encoded.
    fn content(&self, need: &Need, enc: Enc) -> Option<(Vec<u8>, Sent)> {
        let staged = self.staged.as_ref()?;
        let m = staged.manifest.as_ref()?;
        let (_, _, _, digest) = m.files().nth(need.index as usize)?;
        // A file whose content nobody has (`FileLie`): send nothing, or an empty encoding.
        let data = self.contents.get(digest).cloned().unwrap_or_default();
        let old = need.basis.as_ref().and_then(|(basis, _)| {
            let old = std::fs::read(self.env.root.join("current").join(basis.as_str())).ok()?;
            Some((basis.clone(), old))
        });
        match (enc, old) {
            (Enc::Delta, Some((basis, old))) => {
                let sig = fast_rsync::Signature::calculate(
                    &old,
                    fast_rsync::SignatureOptions {
                        block_size: 1024,
                        crypto_hash_size: 8,
                    },
                );
                let mut d = Vec::new();
                fast_rsync::diff(&sig.index(), &data, &mut d).expect("diff in memory");
                Some((d, Sent::Delta(basis)))
            }
            (Enc::Patch, Some((basis, old))) => {
                // As the client makes them (at a cheaper level): zstd with the old version as
                // reference prefix, a window over both.
                let span = (old.len() + data.len()).max(1 << 10) as u64;
                let window = (64 - span.leading_zeros()).clamp(10, 27);
                let mut enc = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), 3, &old)
                    .expect("zstd encoder");
                enc.window_log(window).expect("zstd window");
                std::io::Write::write_all(&mut enc, &data).expect("compress in memory");
                let patch = enc.finish().expect("compress in memory");
                Some((patch, Sent::Patch(basis, Digest::of(&old).0)))
            }
            _ => Some((data, Sent::Literal)),
        }
    }

    fn send_content(
        &mut self,
        need: &Need,
        enc: Enc,
        chunk: u16,
        corrupt: bool,
        mtime: Option<(i64, u32)>,
    ) {
        let Some((mut data, sent)) = self.content(need, enc) else {
            return;
        };
        if corrupt {
            match data.last_mut() {
                Some(b) => *b ^= 0x20,
                None => data.push(b'!'),
            }
        }
        let chunk = (chunk as usize).max(1).max(data.len() / 8);
        let mut pieces: Vec<&[u8]> = data.chunks(chunk).collect();
        if pieces.is_empty() {
            pieces.push(&[]);
        }
        let n = pieces.len();
        for (i, p) in pieces.into_iter().enumerate() {
            let last = i + 1 == n;
            let (index, data) = (need.index, p.to_vec());
            let req = match &sent {
                Sent::Delta(basis) => Request::Delta {
                    index,
                    basis: basis.clone(),
                    mtime,
                    data,
                    last,
                },
                Sent::Patch(basis, basis_digest) => Request::Patch {
                    index,
                    basis: basis.clone(),
                    basis_digest: Digest(*basis_digest),
                    mtime,
                    data,
                    last,
                },
                Sent::Literal => Request::Literal {
                    index,
                    mtime,
                    data,
                    last,
                },
            };
            self.send(&req);
        }
        if let Some(s) = &mut self.staged {
            s.sent.push(need.index);
        }
    }

    fn render(&mut self, op: Op) {
        match op {
            Op::Lock { wait, deploy } => self.send(&Request::Lock {
                wait,
                holder: Holder {
                    pid: 1,
                    host: "fuzz".into(),
                    user: "fuzz".into(),
                    since: 0,
                    what: if deploy {
                        flip_wire::Purpose::Deploy
                    } else {
                        flip_wire::Purpose::Rollback
                    },
                    run: "fuzz".into(),
                },
            }),
            Op::Status => self.send(&Request::Status),
            Op::GetManifest { id } => self.send(&Request::GetManifest { id: id as u64 }),
            Op::Stage {
                label,
                tree,
                how,
                chunk,
                ahead,
            } => self.stage(label, &tree, &how, chunk, ahead),
            Op::ManifestChunk(c) => self.send(&Request::ManifestChunk(c)),
            Op::Signatures(items) => {
                let needs = self
                    .staged
                    .as_ref()
                    .map(|s| s.needs.clone())
                    .unwrap_or_default();
                let items = items
                    .iter()
                    .take(16)
                    .map(|s| {
                        let need = needs.get(s.pick as usize % needs.len().max(1));
                        SigItem {
                            index: need.map_or(s.pick as u32, |n| n.index),
                            basis: match &s.basis {
                                Some(n) => rel(n),
                                None => need
                                    .and_then(|n| n.basis.as_ref())
                                    .map_or_else(|| RelPath::new("a").unwrap(), |b| b.0.clone()),
                            },
                        }
                    })
                    .collect();
                self.send(&Request::Signatures(items));
            }
            Op::BasisSignatures => self.send(&Request::BasisSignatures),
            Op::ActivateCommitted => self.send(&Request::ActivateCommitted),
            Op::Content {
                pick,
                enc,
                chunk,
                corrupt,
                mtime,
            } => {
                let need = self.staged.as_ref().and_then(|s| {
                    (!s.needs.is_empty()).then(|| s.needs[pick as usize % s.needs.len()].clone())
                });
                if let Some(need) = need {
                    self.send_content(&need, enc, chunk, corrupt, mtime);
                }
            }
            Op::AllContent { enc } => {
                let needs: Vec<Need> = match &self.staged {
                    Some(s) => s
                        .needs
                        .iter()
                        .filter(|n| !s.sent.contains(&n.index))
                        .cloned()
                        .collect(),
                    None => Vec::new(),
                };
                for n in &needs {
                    self.send_content(n, enc, u16::MAX, false, Some((1_700_000_000, 0)));
                }
            }
            Op::Literal {
                index,
                data,
                last,
                mtime,
            } => self.send(&Request::Literal {
                index: index as u32,
                mtime,
                data,
                last,
            }),
            Op::Delta {
                index,
                basis,
                data,
                last,
            } => self.send(&Request::Delta {
                index: index as u32,
                basis: rel(&basis),
                mtime: None,
                data,
                last,
            }),
            Op::Patch {
                index,
                basis,
                true_digest,
                data,
                last,
            } => {
                let basis = rel(&basis);
                let basis_digest = match true_digest {
                    true => std::fs::read(self.env.root.join("current").join(basis.as_str()))
                        .map(|old| Digest::of(&old).0)
                        .unwrap_or([0; 32]),
                    false => [0; 32],
                };
                let data = match data {
                    PatchData::Raw(b) => b,
                    PatchData::Frame { log, blocks } => {
                        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, (log % 22) << 3];
                        f.extend(blocks);
                        f
                    }
                };
                self.send(&Request::Patch {
                    index: index as u32,
                    basis,
                    basis_digest: Digest(basis_digest),
                    mtime: None,
                    data,
                    last,
                });
            }
            Op::Commit => self.send(&Request::Commit),
            Op::Activate { id, force } => self.send(&Request::Activate {
                id: id as u64,
                force,
            }),
            Op::ActivateLast => {
                let id = self.last_committed.unwrap_or(1);
                self.send(&Request::Activate { id, force: false });
            }
            Op::Rollback { to, force } => self.send(&Request::Rollback {
                to: to.map(|t| t as u64),
                force,
            }),
            Op::Prune { keep } => self.send(&Request::Prune { keep: keep as u32 }),
            Op::Check { id } => self.send(&Request::Check { id: id as u64 }),
            Op::CanDeploy => self.send(&Request::CanDeploy),
            Op::Verify { id } => self.send(&Request::Verify {
                id: id.map(|i| i as u64),
            }),
            Op::Bye => self.send(&Request::Bye),
            Op::Changes { all } => self.send(&Request::Changes { all }),
            Op::Probe(items) => self.send(&Request::Probe(
                items
                    .into_iter()
                    .map(|(dir, flat, merkle)| ProbeItem { dir, flat, merkle })
                    .collect(),
            )),
            Op::Hello { compress } => self.send(&Request::Hello {
                magic: MAGIC,
                protocol: PROTOCOL,
                version: "fuzz".into(),
                compress: compress as i32,
            }),
            Op::Raw(b) => self.out.extend(b),
            Op::Deploy {
                tree,
                diff,
                enc,
                activate,
            } => {
                // Rendered step by step: each needs the agent's answer to the previous one.
                let mut steps = Vec::new();
                if !self.locked {
                    steps.push(Op::Lock {
                        wait: false,
                        deploy: true,
                    });
                }
                steps.push(Op::Stage {
                    label: Some("fuzz".into()),
                    tree,
                    how: if diff { StageHow::Diff } else { StageHow::Full },
                    chunk: u16::MAX,
                    ahead: None,
                });
                steps.push(Op::AllContent { enc });
                steps.push(Op::Commit);
                if activate {
                    steps.push(Op::ActivateLast);
                }
                for s in steps.into_iter().rev() {
                    self.ops.push_front(s);
                }
            }
        }
    }
}

impl Read for Client {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.out.len() {
            self.read_responses();
            self.out.clear();
            self.pos = 0;
            match self.ops.pop_front() {
                Some(op) => self.render(op),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

// ---------------------------------------------------------------------------------------------

fn check_root(root: &Path) {
    let releases = root.join("releases");
    if let Ok(rd) = std::fs::read_dir(&releases) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(".staging-"),
                "staging directory {name} survived the session"
            );
        }
    }
    if std::fs::symlink_metadata(root.join("current")).is_ok() {
        let target = std::fs::read_link(root.join("current")).expect("current is a symlink");
        let id: u64 = target
            .to_str()
            .and_then(|t| t.strip_prefix("releases/"))
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("current points to {target:?}"));
        let r = flip_release::Root::open(root).expect("a root with current opens");
        let problems = r.verify(id).expect("the live release verifies");
        assert!(
            problems.is_empty(),
            "live release {id} differs from its manifest: {problems:?}"
        );
    }
}

/// `FLIP_FUZZ_TRACE=1`: print every request sent and response received, cut at 100 characters
/// (`FLIP_FUZZ_TRACE=full`: whole), to see how deep the corpus gets:
/// `FLIP_FUZZ_TRACE=1 target/x86_64-unknown-linux-gnu/release/agent_session -runs=0 corpus/agent_session`.
fn trace() -> bool {
    trace_mode().is_some()
}

fn trace_mode() -> Option<&'static str> {
    static T: OnceLock<Option<String>> = OnceLock::new();
    T.get_or_init(|| std::env::var("FLIP_FUZZ_TRACE").ok())
        .as_deref()
}

fn cut(s: String) -> String {
    if trace_mode() == Some("full") {
        return s;
    }
    s.chars().take(100).collect()
}

fn trace_responses(bytes: &[u8]) {
    let mut r = FrameReader::new(Box::new(Cursor::new(bytes.to_vec())));
    while let Ok(resp) = r.recv::<Response>() {
        eprintln!("flip-fuzz: <- {}", cut(format!("{resp:?}")));
    }
}

fuzz_target!(|input: Input| {
    let env = env();
    remove_tree(&env.root);
    if input.root_exists {
        std::fs::create_dir(&env.root).unwrap();
    }
    let before = snapshot(&env.parent, &env.root);

    let responses = SharedBuf::default();
    let hello = flip_fuzz::frame(&Request::Hello {
        magic: MAGIC,
        protocol: PROTOCOL,
        version: "fuzz".into(),
        compress: 0,
    });
    let client = Client {
        env,
        ops: input.ops.into_iter().take(64).collect(),
        out: hello,
        pos: 0,
        responses: responses.clone(),
        parsed: 0,
        contents: HashMap::new(),
        staging: None,
        staged: None,
        locked: false,
        last_committed: None,
    };
    let _ = flip_agent::serve(Box::new(client), Box::new(responses.clone()), &env.root);
    if trace() {
        trace_responses(&responses.take());
    }

    assert_eq!(
        before,
        snapshot(&env.parent, &env.root),
        "something outside the root changed"
    );
    check_root(&env.root);
});
