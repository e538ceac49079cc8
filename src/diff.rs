//! `flip diff OLD NEW`: what a deploy from OLD to NEW would do and send, with no target at all.
//! Both trees are scanned, planned and classified exactly as a deploy plans and reports
//! ([`flip_plan::report`]). Each changed file is encoded locally by the deploy's rule, twice:
//!
//! - `warm`: for the client that deployed OLD and kept its caches: it describes the new
//!   manifest as a difference, and patches (zstd `--patch-from`) files whose old version its
//!   content cache holds;
//! - `cold`: for a client with no caches (a fresh CI runner, `--no-cache`): it finds the changed
//!   directories by probing the target's directory hashes, and sends rsync deltas against the
//!   target's copies (signatures with the agent's parameters).
//!
//! Either way a file goes whole when its encoding is no smaller. The predicted `sent` bytes are
//! those of the client's side of the connection: every request a deploy of the pair sends
//! (handshake, lock, status, probes, manifest, signature requests, content, commit, activate,
//! prune, bye) encoded into real frames and compressed as the deploy's stream is, at a fixed
//! `--compress-level` (an adaptive SSH stream varies its level with the link; it is not
//! modelled). The `bound` is what the best local encoding needs: the changed files compressed
//! against their old versions (zstd `--bound-level`, 19 by default, long-distance matching) in
//! groups of at most [`BOUND_GROUP`] bytes (a larger file in pieces), up to [`BOUND_PARALLEL`]
//! at once on as many cores; unchanged files cost
//! nothing. At level 19 it is by far the slowest part (1–2 MB/s per core; the rest of `flip
//! diff` takes well under a second for a 12,000-file release).

use crate::cli::DiffArgs;
use crate::{exit, output};
use anyhow::Result;
use flip_manifest::{Digest, Manifest, RelPath};
use flip_plan::report::{choose, Sent, Via};
use flip_wire::{FrameWriter, Mtime, Request, SigItem, StageBase, CHUNK, MAGIC, PROTOCOL};
use rayon::prelude::*;
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::path::Path;

/// New bytes per group of the bound's `--patch-from` (and as much of old bytes as reference).
/// Measured on the benchmark's 12k-file corpus, 2 cores, level 19: against groups of 32 MiB,
/// the vendor upgrade's bound took 9.4 s instead of 19.6 s (476 against 492 KiB), a first
/// deploy's 24 s instead of 32 s (2% larger).
pub const BOUND_GROUP: usize = 8 << 20;

/// From this `--bound-level` and this many bytes of changed files on, the bound takes seconds:
/// a terminal is told why it waits.
const SLOW_LEVEL: i32 = 16;
const SLOW_BYTES: u64 = 8 << 20;

/// Groups of the bound compressed at once, at most (one per core up to this): each holds up to
/// twice [`BOUND_GROUP`] of data and a zstd context of its own.
const BOUND_PARALLEL: usize = 4;

/// Source bytes encoded at once (in parallel) before they are fed to the simulated streams.
const BATCH: u64 = 64 << 20;

/// How many files the report ranks.
const TOP: usize = 10;

/// A file to transfer: its index, size and delta basis (path, size).
type Transfer = (u32, u64, Option<(RelPath, u64)>);

/// A file encoded for both clients: (its bytes, its basis' bytes, its mtime, warm, cold).
type Encoded = (Vec<u8>, Option<Vec<u8>>, Mtime, Enc, Enc);

/// One changed file as one scenario sends it.
struct Enc {
    via: Via,
    note: Option<String>,
    /// What goes into the frames: the file, its delta or its patch.
    bytes: Vec<u8>,
}

/// One scenario's running totals.
#[derive(Default)]
struct Tally {
    literal: u64,
    delta: u64,
    patched: u64,
    deltas: u64,
    literals: u64,
}

impl Tally {
    fn add(&mut self, e: &Enc) {
        match e.via {
            Via::Literal => {
                self.literal += e.bytes.len() as u64;
                self.literals += 1;
            }
            Via::Patch => {
                self.delta += e.bytes.len() as u64;
                self.patched += 1;
            }
            _ => {
                self.delta += e.bytes.len() as u64;
                self.deltas += 1;
            }
        }
    }
}

/// A file of the ranking: its path, size and what each scenario sends for it (compressed).
struct Ranked {
    path: String,
    size: u64,
    warm: (Via, u64),
    cold: (Via, u64),
}

/// `flip diff OLD NEW`; with `shared` paths, both trees as the releases a deploy records.
pub fn run(
    a: DiffArgs,
    shared: Option<&flip_plan::shared::SharedPaths>,
) -> Result<crate::exit::Code> {
    let (old, new) = scan_pair(&a, shared)?;
    let plan = flip_plan::plan(Some(&old), &new);
    let mut changes = flip_plan::report::changes(Some(&old), &new, &plan);
    let files: Vec<(&RelPath, Digest)> = new.files().map(|(p, _, _, d)| (p, *d)).collect();
    let transfers: Vec<Transfer> = changes
        .transfers()
        .map(|(i, s, b)| (i, s, b.cloned()))
        .collect();
    let level = a.compress_level;
    let (mut warm, mut cold, manifest_diff) = describe(&old, &new, level);
    let chosen = choices(&transfers);
    let changed: u64 = transfers.iter().map(|t| t.1).sum();
    if a.bound_level >= SLOW_LEVEL && changed >= SLOW_BYTES && std::io::stderr().is_terminal() {
        note!(
            "flip: the bound compresses {} of changed files at zstd -{} (about 1–2 MB/s per core); \
             --bound-level 0 leaves it out, a lower level is faster",
            output::bytes(changed),
            a.bound_level
        );
    }
    ask_signatures([&mut warm, &mut cold], &transfers, &chosen);
    let (mut sent, bound) =
        encode_content(&a, &files, &transfers, &chosen, [&mut warm, &mut cold])?;
    rank(&mut sent.ranked);
    sent.ranked.truncate(TOP);
    changes.settle(&sent.outcomes);
    let p = Prediction {
        bound: bound
            .finish()?
            .map(|b| b + compressed_len(&manifest_diff, a.bound_level)),
        warm_sent: warm.finish(),
        cold_sent: cold.finish(),
        content: sent,
    };
    let (sel, sel_sent) = if a.no_cache {
        (&p.content.ct, p.cold_sent)
    } else {
        (&p.content.wt, p.warm_sent)
    };
    let to_transfer: u64 = plan.transfers().map(|(_, s)| s.size).sum();
    let matched = plan.stats.matched_bytes + to_transfer.saturating_sub(sel.literal + sel.delta);
    match a.json {
        true => print_json(&a, &changes, &p, sel, sel_sent, matched),
        false => print_text(&a, &changes, &p, sel, matched),
    }
    Ok(exit::OK)
}

/// What `flip diff` predicts: the content as each client encodes it, and the bytes each sends.
struct Prediction {
    content: Content,
    warm_sent: u64,
    cold_sent: u64,
    /// The lower bound: `zstd --patch-from` of the changes plus the manifest difference (`None`:
    /// not computed, `--bound-level 0`).
    bound: Option<u64>,
}

/// The content of every changed file, encoded for both clients.
struct Content {
    /// The warm and the cold client's totals.
    wt: Tally,
    ct: Tally,
    /// How each file goes for the client the report is about (`--no-cache`: the cold one).
    outcomes: Vec<Sent>,
    /// The files sending the most bytes.
    ranked: Vec<Ranked>,
}

/// OLD and NEW scanned as a deploy scans its source (with `shared` paths: as the releases a
/// deploy records).
fn scan_pair(
    a: &DiffArgs,
    shared: Option<&flip_plan::shared::SharedPaths>,
) -> Result<(Manifest, Manifest)> {
    let scan = |dir: &Path| -> Result<Manifest> {
        if !dir.is_dir() {
            let what = match dir.symlink_metadata() {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist",
                _ => "is not a directory",
            };
            return Err(exit::coded(
                exit::SOURCE,
                format!("{} {what}", dir.display()),
            ));
        }
        let opts = flip_scan::ScanOptions {
            excludes: a.exclude.clone(),
            use_flipignore: !a.no_flipignore,
            hash_cache: None,
            meter: Default::default(),
        };
        Ok(flip_scan::scan(dir, &opts)?.manifest)
    };
    let mut old = scan(&a.old)?;
    let mut new = scan(&a.new)?;
    if let Some(shared) = shared {
        old = crate::shared_release(shared, &old)?;
        new = crate::shared_release(shared, &new)?;
    }
    Ok((old, new))
}

/// The warm and the cold client's streams up to their content (handshake, lock, status,
/// probes, stage), and the manifest difference (part of the bound).
fn describe(old: &Manifest, new: &Manifest, level: i32) -> (Stream, Stream, Vec<u8>) {
    // The client side of each deploy, up to its content.
    let mut warm = Stream::new(level);
    let mut cold = Stream::new(level);
    let manifest_diff = flip_manifest::encode_diff(&old.diff(new));
    let unchanged = old.digest() == new.digest();
    // It sends its content ahead of the stage's answer (`Session::stage_ahead`).
    warm.ahead = true;
    warm.stage(StageBase::Diff(old.digest()), new.digest(), &manifest_diff);
    // A client without caches probes every directory ahead of the status, changed or not.
    let tree = flip_manifest::DirTree::new(new);
    let live = flip_manifest::DirTree::new(old);
    let dirs = probe(&mut cold, &tree, &live);
    let (cold_base, dir_patch) = if unchanged {
        (StageBase::Diff(old.digest()), manifest_diff.clone())
    } else {
        (
            StageBase::Dirs(old.digest()),
            flip_manifest::encode_dir_patch(&tree.patch(new, &dirs)),
        )
    };
    cold.stage(cold_base, new.digest(), &dir_patch);
    (warm, cold, manifest_diff)
}

/// The rule's choice per file: (warm, cold).
fn choices(transfers: &[Transfer]) -> Vec<(Via, Via)> {
    // The rule's choice per file: a warm client patches what its content cache holds; both
    // ask for signatures of the bases they diff against.
    let patchable = |size: u64, basis: Option<&(RelPath, u64)>| {
        size <= flip_transfer::PATCH_MAX
            && basis.is_some_and(|b| b.1 <= flip_transfer::CONTENT_MAX_FILE)
    };
    transfers
        .iter()
        .map(|(_, size, basis)| {
            let bsize = basis.as_ref().map(|b| b.1);
            (
                choose(*size, bsize, patchable(*size, basis.as_ref())),
                choose(*size, bsize, false),
            )
        })
        .collect()
}

/// The signature requests of both clients: the warm one names every basis it diffs against; the
/// cold one asks with its stage for those the agent offers.
fn ask_signatures(streams: [&mut Stream; 2], transfers: &[Transfer], chosen: &[(Via, Via)]) {
    let [warm, cold] = streams;
    for (stream, pick) in [(warm, 0), (cold, 1)] {
        let items: Vec<SigItem> = transfers
            .iter()
            .zip(chosen)
            .filter(|(_, c)| if pick == 0 { c.0 } else { c.1 } == Via::Delta)
            .filter_map(|((i, _, b), _)| {
                b.as_ref().map(|(b, _)| SigItem {
                    index: *i,
                    basis: b.clone(),
                })
            })
            .collect();
        match pick {
            // A client without the live manifest asks with its stage, for whatever it needs.
            1 => stream.send(&Request::BasisSignatures),
            _ if !items.is_empty() => stream.send(&Request::Signatures(items)),
            _ => {}
        }
    }
}

/// The content, a batch at a time: encoded in parallel, fed to both streams in order; and the
/// bound's compressor, fed the same files.
fn encode_content(
    a: &DiffArgs,
    files: &[(&RelPath, Digest)],
    transfers: &[Transfer],
    chosen: &[(Via, Via)],
    streams: [&mut Stream; 2],
) -> Result<(Content, Bound)> {
    let [warm, cold] = streams;
    let level = a.compress_level;
    let (mut wt, mut ct) = (Tally::default(), Tally::default());
    let mut outcomes: Vec<Sent> = Vec::with_capacity(transfers.len());
    let mut ranked: Vec<Ranked> = Vec::new();
    let mut bound = Bound::new(a.bound_level);
    let mut start = 0;
    while start < transfers.len() {
        let mut end = start;
        let mut bytes = 0u64;
        while end < transfers.len() && (end == start || bytes + transfers[end].1 <= BATCH) {
            bytes += transfers[end].1;
            end += 1;
        }
        let batch: Vec<Result<Encoded>> = (start..end)
            .into_par_iter()
            .map(|k| {
                let (index, _, basis) = &transfers[k];
                let path = a.new.join(files[*index as usize].0.as_str());
                let data = std::fs::read(&path)?;
                let mtime = mtime_of(&path);
                let old_data = match basis {
                    Some((b, _)) => Some(std::fs::read(a.old.join(b.as_str()))?),
                    None => None,
                };
                let enc = |chosen: Via| {
                    let e = match (chosen, &old_data) {
                        (Via::Patch, Some(o)) => flip_transfer::patch(o, &data),
                        (Via::Delta, Some(o)) => flip_transfer::local_delta(o, &data),
                        _ => None,
                    };
                    let (via, bytes) = match e {
                        Some(e) => (chosen, e),
                        None => (Via::Literal, data.clone()),
                    };
                    Enc {
                        via,
                        note: flip_transfer::fallback_note(chosen, via),
                        bytes,
                    }
                };
                let (w, c) = (enc(chosen[k].0), enc(chosen[k].1));
                Ok((data, old_data, mtime, w, c))
            })
            .collect();
        for (k, r) in (start..end).zip(batch) {
            let (data, old_data, mtime, w, c) = r?;
            let (index, size, basis) = &transfers[k];
            let digest = old_data.as_ref().map(|o| Digest::of(o));
            warm.content(*index, mtime, &w, basis.as_ref(), digest);
            cold.content(*index, mtime, &c, basis.as_ref(), digest);
            wt.add(&w);
            ct.add(&c);
            ranked.push(Ranked {
                path: files[*index as usize].0.to_string(),
                size: *size,
                warm: (w.via, compressed_len(&w.bytes, level)),
                cold: (c.via, compressed_len(&c.bytes, level)),
            });
            // Keep the ranking short as it goes.
            if ranked.len() > 4 * TOP {
                rank(&mut ranked);
                ranked.truncate(TOP);
            }
            let chosen_enc = if a.no_cache { &c } else { &w };
            outcomes.push(Sent {
                index: *index,
                via: chosen_enc.via,
                note: chosen_enc.note.clone(),
            });
            bound.add(old_data.as_deref(), &data)?;
        }
        start = end;
    }
    let content = Content {
        wt,
        ct,
        outcomes,
        ranked,
    };
    Ok((content, bound))
}

fn model(level: i32) -> String {
    if level == 0 {
        "no compression".to_string()
    } else {
        format!("zstd level {level}")
    }
}

/// `flip diff --json`.
fn print_json(
    a: &DiffArgs,
    changes: &flip_plan::report::Changes,
    p: &Prediction,
    sel: &Tally,
    sel_sent: u64,
    matched: u64,
) {
    let mut out = serde_json::Map::new();
    out.insert("old".into(), json!(a.old.display().to_string()));
    out.insert("new".into(), json!(a.new.display().to_string()));
    output::counts_json(&changes.counts, &mut out);
    out.insert(
        "bytes".into(),
        json!({
            "literal": sel.literal, "delta": sel.delta, "matched": matched,
            "estimated_wire": sel_sent,
        }),
    );
    let scenario = |t: &Tally, sent: u64| {
        json!({
            "sent": sent, "literal": t.literal, "delta": t.delta,
            "files": {"literal": t.literals, "delta": t.deltas, "patched": t.patched},
        })
    };
    out.insert(
        "estimate".into(),
        json!({
            "compress_level": a.compress_level,
            "warm": scenario(&p.content.wt, p.warm_sent),
            "cold": scenario(&p.content.ct, p.cold_sent),
            "bound": p.bound,
            "bound_level": a.bound_level,
            "top": p.content.ranked.iter().map(|r| json!({
                "path": r.path, "size": r.size,
                "warm": {"via": r.warm.0.as_str(), "bytes": r.warm.1},
                "cold": {"via": r.cold.0.as_str(), "bytes": r.cold.1},
            })).collect::<Vec<_>>(),
        }),
    );
    if a.itemize {
        out.insert("items".into(), output::items_json(&changes.items));
    }
    outln!("{}", serde_json::Value::Object(out));
}

/// `flip diff` for people.
fn print_text(
    a: &DiffArgs,
    changes: &flip_plan::report::Changes,
    p: &Prediction,
    sel: &Tally,
    matched: u64,
) {
    if crate::itemized(a.itemize, a.json) {
        output::print_items(&changes.items);
    }
    outln!("{}", output::counts_text(&changes.counts));
    outln!(
        "literal {}, delta {}, matched {} ({})",
        output::bytes(sel.literal),
        output::bytes(sel.delta),
        output::bytes(matched),
        if a.no_cache {
            "no local caches"
        } else {
            "warm caches of the client that deployed OLD"
        }
    );
    // A local directory takes changed files whole by default (`--whole-file`): these are the
    // bytes of a deploy that patches, as over SSH.
    outln!("a deploy over SSH sends ({}):", model(a.compress_level));
    let mut lines = vec![
        (
            "warm client (caches of the deploy of OLD):".to_string(),
            p.warm_sent,
        ),
        ("cold client (no caches):".to_string(), p.cold_sent),
    ];
    if let Some(bound) = p.bound {
        let label = format!(
            "bound (zstd -{} --patch-from of the changes):",
            a.bound_level
        );
        lines.push((label, bound));
    }
    let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    for (label, n) in lines {
        outln!("  {label:width$} {}", output::bytes(n));
    }
    if !p.content.ranked.is_empty() {
        outln!("largest files (warm / cold, compressed):");
        for r in &p.content.ranked {
            outln!(
                "  {} / {}  {}",
                output::bytes(r.warm.1),
                output::bytes(r.cold.1),
                output::escape(&r.path)
            );
        }
    }
}

/// Largest first (by what the costlier scenario sends), then by path.
fn rank(r: &mut [Ranked]) {
    r.sort_by(|a, b| {
        let (x, y) = (a.warm.1.max(a.cold.1), b.warm.1.max(b.cold.1));
        y.cmp(&x).then_with(|| a.path.cmp(&b.path))
    });
}

fn mtime_of(path: &Path) -> Mtime {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.mtime(), m.mtime_nsec() as u32))
}

/// Bytes of `data` compressed alone at `level` (0: as is).
fn compressed_len(data: &[u8], level: i32) -> u64 {
    if level == 0 {
        return data.len() as u64;
    }
    zstd::bulk::compress(data, level).map_or(data.len() as u64, |c| c.len() as u64)
}

/// The client's side of a simulated deploy session: real frames, compressed as a deploy's
/// are, flushed where a deploy waits for an answer; only their bytes are kept.
struct Stream {
    tx: FrameWriter,
    /// Content sent ahead (`Stage`'s `ahead`): the release is made live with
    /// `ActivateCommitted`.
    ahead: bool,
}

impl Stream {
    fn new(level: i32) -> Stream {
        let mut tx = FrameWriter::new(Box::new(std::io::sink()));
        let s = |tx: &mut FrameWriter, r: &Request| {
            tx.send(r).expect("a frame into memory");
            tx.flush().expect("into memory");
        };
        s(
            &mut tx,
            &Request::Hello {
                magic: MAGIC,
                protocol: PROTOCOL,
                version: env!("CARGO_PKG_VERSION").to_string(),
                compress: level,
            },
        );
        if level > 0 {
            tx.start_compression(level).expect("into memory");
        }
        let mut st = Stream { tx, ahead: false };
        st.send(&Request::Lock {
            wait: false,
            holder: flip_wire::Holder {
                pid: std::process::id(),
                host: "localhost".into(),
                user: "deploy".into(),
                since: 1_700_000_000,
                what: flip_wire::Purpose::Deploy,
                // As long as a real run's.
                run: "0".repeat(16),
            },
        });
        st.send(&Request::Status);
        st
    }

    fn queue(&mut self, r: &Request) {
        self.tx.send(r).expect("a frame into memory");
    }

    /// Queues `r` and flushes: the deploy waits for an answer here.
    fn send(&mut self, r: &Request) {
        self.queue(r);
        self.tx.flush().expect("into memory");
    }

    /// The stage request with the manifest description (`base`: how it is described).
    fn stage(&mut self, base: flip_wire::StageBase, digest: Digest, payload: &[u8]) {
        self.queue(&Request::Stage {
            label: None,
            base,
            payload_len: payload.len() as u64,
            digest,
            // The digest of the needs costs the same whatever it is.
            ahead: self.ahead.then_some(Digest([0; 32])),
        });
        for c in payload.chunks(CHUNK) {
            self.queue(&Request::ManifestChunk(c.to_vec()));
        }
        self.send(&Request::Changes { all: false });
    }

    /// One file's content frames, as the deploy splits them.
    fn content(
        &mut self,
        index: u32,
        mtime: Mtime,
        e: &Enc,
        basis: Option<&(RelPath, u64)>,
        basis_digest: Option<Digest>,
    ) {
        let n = e.bytes.len().div_ceil(CHUNK).max(1);
        for i in 0..n {
            let data = e.bytes[i * CHUNK..((i + 1) * CHUNK).min(e.bytes.len())].to_vec();
            let last = i + 1 == n;
            let basis = basis.map(|b| b.0.clone());
            self.queue(&match (e.via, basis) {
                (Via::Delta, Some(basis)) => Request::Delta {
                    index,
                    basis,
                    mtime,
                    data,
                    last,
                },
                (Via::Patch, Some(basis)) => Request::Patch {
                    index,
                    basis,
                    basis_digest: basis_digest.unwrap_or(Digest([0; 32])),
                    mtime,
                    data,
                    last,
                },
                _ => Request::Literal {
                    index,
                    mtime,
                    data,
                    last,
                },
            });
        }
    }

    /// Commit, activate, prune and goodbye; the bytes the client sent in all.
    fn finish(mut self) -> u64 {
        self.send(&Request::Commit);
        self.send(&match self.ahead {
            true => Request::ActivateCommitted,
            false => Request::Activate {
                id: 2,
                force: false,
            },
        });
        self.send(&Request::Prune { keep: 5 });
        self.send(&Request::Bye);
        let counter = self.tx.counter();
        let _ = self.tx.finish();
        counter.get()
    }
}

/// Sends every directory's hashes, as a client without the live manifest does
/// ([`flip_transfer::probe_requests`]), and returns the directories to describe: those the
/// walk over the live tree's answers finds changed.
fn probe(
    s: &mut Stream,
    tree: &flip_manifest::DirTree,
    live: &flip_manifest::DirTree,
) -> std::collections::BTreeSet<String> {
    for f in flip_transfer::probe_requests(tree).1 {
        s.send(&f);
    }
    let walked = tree.walk_changed(|level| {
        let states = level
            .iter()
            .map(|(dir, flat, merkle)| live.compare(dir, flat, merkle))
            .collect();
        Ok::<_, std::convert::Infallible>(states)
    });
    match walked {
        Ok(changed) => changed,
    }
}

/// The bound: changed files compressed against their old versions, a group at a time, the
/// groups on all cores (at most [`BOUND_PARALLEL`] at once, so memory stays bounded).
struct Bound {
    /// zstd level (0: no bound is computed).
    level: i32,
    /// The group being filled: (old versions, new versions).
    group: (Vec<u8>, Vec<u8>),
    /// Full groups not yet compressed.
    full: Vec<(Vec<u8>, Vec<u8>)>,
    /// How many groups are compressed at once.
    parallel: usize,
    total: u64,
}

impl Bound {
    fn new(level: i32) -> Bound {
        Bound {
            level,
            group: Default::default(),
            full: Vec::new(),
            parallel: rayon::current_num_threads().clamp(1, BOUND_PARALLEL),
            total: 0,
        }
    }

    fn add(&mut self, old: Option<&[u8]>, new: &[u8]) -> Result<()> {
        if self.level == 0 {
            return Ok(());
        }
        // A file larger than a group goes in group-sized pieces, each against the same stretch
        // of its old version: no group holds more than twice BOUND_GROUP, whatever the files.
        for (k, piece) in new.chunks(BOUND_GROUP).enumerate() {
            let old = old.map(|o| {
                let start = (k * BOUND_GROUP).min(o.len());
                &o[start..(start + BOUND_GROUP).min(o.len())]
            });
            self.add_piece(old, piece)?;
        }
        Ok(())
    }

    fn add_piece(&mut self, old: Option<&[u8]>, new: &[u8]) -> Result<()> {
        let (o, n) = &self.group;
        if !n.is_empty()
            && (n.len() + new.len() > BOUND_GROUP
                || o.len() + old.map_or(0, <[u8]>::len) > BOUND_GROUP)
        {
            self.close_group()?;
        }
        let (o, n) = &mut self.group;
        if let Some(old) = old {
            // A reference bigger than a group is cut to its start (the bound stays bounded).
            let room = BOUND_GROUP.saturating_sub(o.len());
            o.extend_from_slice(&old[..old.len().min(room)]);
        }
        n.extend_from_slice(new);
        if n.len() >= BOUND_GROUP {
            self.close_group()?;
        }
        Ok(())
    }

    /// Sets the group aside; compresses the full ones once there are enough for every core.
    fn close_group(&mut self) -> Result<()> {
        if !self.group.1.is_empty() {
            self.full.push(std::mem::take(&mut self.group));
        }
        if self.full.len() >= self.parallel {
            self.compress_full()?;
        }
        Ok(())
    }

    fn compress_full(&mut self) -> Result<()> {
        let level = self.level;
        let sizes: Vec<std::io::Result<u64>> = self
            .full
            .par_drain(..)
            .map(|(old, new)| patch_from_len(&old, &new, level))
            .collect();
        for n in sizes {
            self.total += n?;
        }
        Ok(())
    }

    /// The bytes of every group, or `None` when no bound is computed (level 0).
    fn finish(mut self) -> Result<Option<u64>> {
        if self.level == 0 {
            return Ok(None);
        }
        self.close_group()?;
        self.compress_full()?;
        Ok(Some(self.total))
    }
}

/// Bytes of `new` compressed at `level` with `old` as its reference (`zstd --long
/// --patch-from`), the window just large enough for both.
fn patch_from_len(old: &[u8], new: &[u8], level: i32) -> std::io::Result<u64> {
    let span = (old.len() + new.len()).max(1 << 10) as u64;
    let window = (64 - span.leading_zeros()).clamp(10, 27);
    let mut enc = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), level, old)?;
    enc.window_log(window)?;
    enc.long_distance_matching(true)?;
    enc.write_all(new)?;
    Ok(enc.finish()?.len() as u64)
}
