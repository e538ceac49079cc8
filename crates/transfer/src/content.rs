//! Streaming file content to the agent. Each needed file is read, checked against the digest it
//! was scanned with, and encoded the cheapest way available:
//! - a zstd `--patch-from` frame against the old version kept in the local content cache,
//! - an rsync delta against the agent's signature of its previous version,
//! - or the bytes themselves (the session's zstd stream compresses them).
//!
//! Small files are read and encoded in parallel (rayon) while the main thread writes frames;
//! large ones are mapped and streamed by the main thread. Each file's frames are contiguous.

use crate::{ContentCache, DeployReport, Result, Session, TransferError};
use flip_manifest::{Digest, RelPath};
use flip_plan::report::{Sent, Via};
use flip_wire::{Mtime, Request, CHUNK};
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Files above this size are streamed by the writing thread itself instead of being prepared
/// whole in memory by the workers.
const LARGE: u64 = 4 << 20;
/// Prepared files waiting for the writer at most.
const QUEUE: usize = 16;
/// Bytes of small files being read, encoded or waiting for the writer at most: with
/// [`QUEUE`] alone, sixteen 4 MiB files could sit in memory at once.
const IN_FLIGHT: u64 = 16 << 20;

/// Bytes of file content in flight between the workers and the writer.
struct Budget {
    used: std::sync::Mutex<u64>,
    freed: std::sync::Condvar,
}

impl Budget {
    /// Waits until `n` more bytes fit (or nothing is in flight), then takes them; `false` if
    /// the transfer was cancelled meanwhile.
    fn take(&self, n: u64, cancel: &AtomicBool) -> bool {
        let mut used = self.used.lock().unwrap();
        while *used > 0 && *used + n > IN_FLIGHT {
            if cancel.load(Ordering::Relaxed) {
                return false;
            }
            used = self.freed.wait(used).unwrap();
        }
        *used += n;
        !cancel.load(Ordering::Relaxed)
    }

    fn give(&self, n: u64) {
        *self.used.lock().unwrap() -= n;
        self.freed.notify_all();
    }

    /// Wakes every waiting worker (after a cancel).
    fn wake(&self) {
        let _guard = self.used.lock().unwrap();
        self.freed.notify_all();
    }
}

/// One file to send: `patch` set when the old version (path, digest) is in the content cache,
/// `basis` when it goes as an rsync delta, neither for a literal.
pub(crate) struct Job<'m> {
    /// Position among the manifest's regular files: how the agent names it.
    pub index: usize,
    pub path: &'m RelPath,
    pub size: u64,
    pub digest: &'m Digest,
    pub basis: Option<RelPath>,
    pub patch: Option<(RelPath, &'m Digest)>,
}

/// How one file's content goes on the wire.
enum Encoded<'a> {
    Literal(Cow<'a, [u8]>),
    Delta(RelPath, Vec<u8>),
    Patch(RelPath, Digest, Vec<u8>),
}

/// A file ready to go: its frames, and what it counts for in the report.
struct Prepared {
    frames: Vec<Request>,
    tally: Tally,
}

/// What one sent file counts for in the report.
struct Tally {
    /// The file's index (for the report's itemized list).
    index: usize,
    /// Bytes of delta or patch, `None` for a literal.
    encoded: Option<u64>,
    patched: bool,
    size: u64,
}

pub(crate) fn send(
    s: &mut Session,
    source: &Path,
    jobs: &[Job],
    sigs: HashMap<usize, Vec<u8>>,
    cache: Option<&ContentCache>,
    report: &mut DeployReport,
) -> Result<()> {
    let (large, small): (Vec<&Job>, Vec<&Job>) = jobs.iter().partition(|j| j.size > LARGE);
    let cancel = AtomicBool::new(false);
    let budget = Budget {
        used: std::sync::Mutex::new(0),
        freed: std::sync::Condvar::new(),
    };
    let sig = |job: &Job| sigs.get(&job.index).map(Vec::as_slice);
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Result<Prepared>)>(QUEUE);
        let (cancel, budget) = (&cancel, &budget);
        scope.spawn(move || {
            small.par_iter().for_each_with(tx, |tx, job| {
                if !budget.take(job.size, cancel) {
                    return;
                }
                let item = read_small(source, job).map(|(data, mtime)| {
                    remember(cache, job.digest, &data);
                    let enc = encode(job, &data, sig(job), cache);
                    prepared(job, mtime, data.len() as u64, enc, Vec::new)
                });
                let _ = tx.send((job.size, item));
            });
        });
        let result = rx.iter().try_for_each(|(taken, item)| {
            let Prepared { frames, tally } = item?;
            for f in &frames {
                s.queue(f)?;
            }
            drop(frames);
            budget.give(taken);
            count(report, &tally);
            Ok(())
        });
        if result.is_err() {
            cancel.store(true, Ordering::Relaxed);
            budget.wake();
        }
        result
    })?;
    for job in large {
        if job.patch.is_none() && sig(job).is_none() {
            stream_literal(s, source, job, cache)?;
            count(
                report,
                &Tally {
                    index: job.index,
                    encoded: None,
                    patched: false,
                    size: job.size,
                },
            );
            continue;
        }
        let (map, mtime) = map_large(source, job)?;
        remember(cache, job.digest, &map);
        let enc = encode(job, &map, sig(job), cache);
        // Frames go out one by one: a large file is never held twice in memory.
        let mut err = Ok(());
        let p = prepared(job, mtime, map.len() as u64, enc, || {
            SendEach(&mut *s, &mut err)
        });
        err?;
        count(report, &p.tally);
    }
    Ok(())
}

/// Sends a large file whole, read piece by piece (never whole in memory, never mapped): each
/// piece is hashed as it is read, and the last one goes only once the digest matches the scan's.
fn stream_literal(
    s: &mut Session,
    source: &Path,
    job: &Job,
    cache: Option<&ContentCache>,
) -> Result<()> {
    let path = source.join(job.path.as_str());
    let (mut f, mtime, len) = open_source(&path)?;
    let changed = || TransferError::SourceChanged(job.path.to_string());
    if len != job.size {
        return Err(changed());
    }
    let read_err = |source| TransferError::Source {
        path: path.display().to_string(),
        source,
    };
    let index = job.index as u32;
    let mut hasher = blake3::Hasher::new();
    // Versions small enough for the content cache are kept for it (at most 8 MiB).
    let mut keep = (cache.is_some() && job.size <= crate::cache::CONTENT_MAX_FILE)
        .then(|| Vec::with_capacity(job.size as usize));
    let mut held: Option<Vec<u8>> = None;
    let mut total = 0u64;
    loop {
        let mut piece = Vec::with_capacity(CHUNK);
        let n = (&mut f)
            .take(CHUNK as u64)
            .read_to_end(&mut piece)
            .map_err(read_err)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > job.size {
            return Err(changed());
        }
        hasher.update(&piece);
        if let Some(k) = keep.as_mut() {
            k.extend_from_slice(&piece);
        }
        if let Some(data) = held.replace(piece) {
            s.queue(&Request::Literal {
                index,
                mtime,
                data,
                last: false,
            })?;
        }
    }
    if total != job.size || Digest::from(hasher.finalize()) != *job.digest {
        return Err(changed());
    }
    s.queue(&Request::Literal {
        index,
        mtime,
        data: held.unwrap_or_default(),
        last: true,
    })?;
    if let Some(k) = keep {
        remember(cache, job.digest, &k);
    }
    Ok(())
}

/// Where `prepared` puts frames: a Vec (small files, sent later) or straight to the session.
trait Sink {
    fn push(&mut self, r: Request);
    fn done(self) -> Vec<Request>;
}

impl Sink for Vec<Request> {
    fn push(&mut self, r: Request) {
        Vec::push(self, r)
    }
    fn done(self) -> Vec<Request> {
        self
    }
}

struct SendEach<'s>(&'s mut Session, &'s mut Result<()>);

impl Sink for SendEach<'_> {
    fn push(&mut self, r: Request) {
        if self.1.is_ok() {
            *self.1 = self.0.queue(&r);
        }
    }
    fn done(self) -> Vec<Request> {
        Vec::new()
    }
}

/// Splits an encoding into frames of at most [`CHUNK`] bytes (an empty file is one empty frame).
fn prepared<S: Sink>(
    job: &Job,
    mtime: Mtime,
    size: u64,
    enc: Encoded<'_>,
    sink: impl FnOnce() -> S,
) -> Prepared {
    let index = job.index as u32;
    let mut sink = sink();
    let (bytes, encoded, patched): (&[u8], Option<u64>, bool) = match &enc {
        Encoded::Literal(b) => (b, None, false),
        Encoded::Delta(_, d) => (d, Some(d.len() as u64), false),
        Encoded::Patch(_, _, p) => (p, Some(p.len() as u64), true),
    };
    let n = bytes.len().div_ceil(CHUNK).max(1);
    for i in 0..n {
        let data = bytes[i * CHUNK..((i + 1) * CHUNK).min(bytes.len())].to_vec();
        let last = i + 1 == n;
        sink.push(match &enc {
            Encoded::Literal(_) => Request::Literal {
                index,
                mtime,
                data,
                last,
            },
            Encoded::Delta(basis, _) => Request::Delta {
                index,
                basis: basis.clone(),
                mtime,
                data,
                last,
            },
            Encoded::Patch(basis, digest, _) => Request::Patch {
                index,
                basis: basis.clone(),
                basis_digest: digest.0,
                mtime,
                data,
                last,
            },
        });
    }
    Prepared {
        frames: sink.done(),
        tally: Tally {
            index: job.index,
            encoded,
            patched,
            size,
        },
    }
}

fn count(report: &mut DeployReport, p: &Tally) {
    report.sent.push(Sent {
        index: p.index as u32,
        via: match p.encoded {
            None => Via::Literal,
            Some(_) if p.patched => Via::Patch,
            Some(_) => Via::Delta,
        },
        note: None,
    });
    if p.patched {
        report.patched += 1;
    }
    match p.encoded {
        Some(d) => {
            report.delta += 1;
            report.delta_bytes += d;
            report.matched_bytes += p.size.saturating_sub(d);
        }
        None => {
            report.literal += 1;
            report.literal_bytes += p.size;
        }
    }
}

/// Keeps a version being deployed in the content cache (checked against its digest already),
/// so the next change of the file can go as a patch. Done by the workers while the connection
/// is busy; a failure only costs a later deploy some bytes.
fn remember(cache: Option<&ContentCache>, digest: &Digest, data: &[u8]) {
    if let Some(c) = cache {
        let _ = c.put(digest, data);
    }
}

/// The cheapest encoding of `data` this job allows.
fn encode<'a>(
    job: &Job,
    data: &'a [u8],
    sig: Option<&[u8]>,
    cache: Option<&ContentCache>,
) -> Encoded<'a> {
    if let Some((basis, digest)) = &job.patch {
        if let Some(p) = cache
            .and_then(|c| c.get(digest))
            .and_then(|old| patch(&old, data))
        {
            return Encoded::Patch(basis.clone(), **digest, p);
        }
    }
    if let (Some(basis), Some(sig)) = (&job.basis, sig) {
        if let Some(d) = delta(sig, data) {
            return Encoded::Delta(basis.clone(), d);
        }
    }
    Encoded::Literal(Cow::Borrowed(data))
}

/// Opens a source file without following a symlink that replaced it since the scan.
fn open_source(path: &Path) -> Result<(File, Mtime, u64)> {
    let err = |source| TransferError::Source {
        path: path.display().to_string(),
        source,
    };
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(err)?;
    let m = f.metadata().map_err(err)?;
    Ok((f, Some((m.mtime(), m.mtime_nsec() as u32)), m.len()))
}

/// A small file, read whole and checked against its scanned digest.
fn read_small(source: &Path, step: &Job) -> Result<(Vec<u8>, Mtime)> {
    let path = source.join(step.path.as_str());
    let (f, mtime, _) = open_source(&path)?;
    let mut data = Vec::with_capacity(step.size as usize);
    f.take(step.size + 1)
        .read_to_end(&mut data)
        .map_err(|source| TransferError::Source {
            path: path.display().to_string(),
            source,
        })?;
    if data.len() as u64 != step.size || Digest::of(&data) != *step.digest {
        return Err(TransferError::SourceChanged(step.path.to_string()));
    }
    Ok((data, mtime))
}

/// A large file, mapped and checked against its scanned digest (hashed on all cores).
fn map_large(source: &Path, step: &Job) -> Result<(memmap2::Mmap, Mtime)> {
    let path = source.join(step.path.as_str());
    let (f, mtime, len) = open_source(&path)?;
    if len != step.size {
        return Err(TransferError::SourceChanged(step.path.to_string()));
    }
    // SAFETY: a read-only mapping of a source file; if the file changes underneath, the blake3
    // check below (or the agent's) rejects the result.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|source| TransferError::Source {
        path: path.display().to_string(),
        source,
    })?;
    let mut h = blake3::Hasher::new();
    h.update_rayon(&map);
    if Digest::from(h.finalize()) != *step.digest {
        return Err(TransferError::SourceChanged(step.path.to_string()));
    }
    Ok((map, mtime))
}

/// An rsync delta of `data` against a signature from the agent, if the signature is sane and
/// the delta is smaller than the data.
fn delta(sig: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    // Header: magic, block size, hash size (big-endian u32s). Refuse sizes that would make the
    // diff panic or crawl before handing the signature to fast_rsync.
    let block = u32::from_be_bytes(sig.get(4..8)?.try_into().ok()?);
    let hash = u32::from_be_bytes(sig.get(8..12)?.try_into().ok()?);
    if !(256..=1 << 20).contains(&block) || !(1..=16).contains(&hash) {
        return None;
    }
    let sig = fast_rsync::Signature::deserialize(sig.to_vec()).ok()?;
    let mut out = Vec::new();
    fast_rsync::diff(&sig.index(), data, &mut out).ok()?;
    (out.len() < data.len()).then_some(out)
}

/// zstd `--patch-from`: `new` compressed with `old` as reference prefix. `None` if not smaller
/// than `new`. Level 9 for small files, 3 above 32 KiB: measured on PHP-like files, a patch at
/// 9 is within ~10% of one at 19 while 10× faster (19 runs at ~2 MB/s, far too slow for a
/// vendor upgrade of thousands of files), and 3 keeps large files at stream speed.
pub fn patch(old: &[u8], new: &[u8]) -> Option<Vec<u8>> {
    let level = if new.len() <= 32 << 10 { 9 } else { 3 };
    // The window must reach back over the whole reference.
    let span = (old.len() + new.len()).max(1 << 10) as u64;
    let window = (64 - span.leading_zeros()).clamp(10, 27);
    let mut enc = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), level, old).ok()?;
    enc.window_log(window).ok()?;
    // As `zstd --patch-from` does: long-distance matching finds the reference's content
    // wherever it is, which the fast levels' small match tables miss.
    enc.long_distance_matching(true).ok()?;
    enc.write_all(new).ok()?;
    let out = enc.finish().ok()?;
    (out.len() < new.len()).then_some(out)
}

/// The rsync delta that would turn `old` into `new`, computed locally with the same signature
/// parameters the agent uses; `None` when sending `new` whole is smaller. For `flip diff`.
pub fn local_delta(old: &[u8], new: &[u8]) -> Option<Vec<u8>> {
    let opts = fast_rsync::SignatureOptions {
        block_size: flip_plan::block_size(old.len() as u64),
        crypto_hash_size: 8,
    };
    let sig = fast_rsync::Signature::calculate(old, opts);
    delta(sig.serialized(), new)
}
