//! Streaming file content to the agent. Each needed file is read, checked against the digest it
//! was scanned with, and encoded the cheapest way available (a file whose patch this process
//! made already, from bytes read and checked the same way, is not read again):
//! - a zstd `--patch-from` frame against the old version kept in the local content cache,
//! - an rsync delta against the agent's signature of its previous version,
//! - or the bytes themselves (the session's zstd stream compresses them).
//!
//! Small files are read and encoded in parallel (rayon) while the main thread writes frames;
//! large ones are read a window at a time (never mapped) and streamed by the main thread. Each file's frames are contiguous.

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
pub(crate) const LARGE: u64 = 4 << 20;
/// Batches of prepared files waiting for the writer at most.
const QUEUE: usize = 16;
/// Files a worker hands the writer at once, at most (fewer when there are few files, so that
/// they still spread over every thread): one hand-over per file cost a wake-up of the writer
/// (and often a context switch) per file: a vendor upgrade of 3,500 files made ~11,700 futex
/// calls, 915 in batches.
const BATCH_FILES: usize = 16;
/// Bytes of content a worker gathers before handing its batch over (a large file goes alone).
const BATCH_BYTES: u64 = 1 << 20;
/// Bytes of small files being read, encoded or waiting for the writer at most: with
/// [`QUEUE`] alone, sixteen batches of 4 MiB files could sit in memory at once.
const IN_FLIGHT: u64 = 16 << 20;

/// Bytes of file content in flight between the workers and the writer.
struct Budget {
    used: std::sync::Mutex<Used>,
    freed: std::sync::Condvar,
}

/// [`Budget`]'s state.
#[derive(Default)]
struct Used {
    bytes: u64,
    /// Workers waiting for bytes to be freed: the writer wakes them only when there are some.
    waiting: usize,
}

impl Budget {
    /// Takes `n` more bytes if they fit (or nothing is in flight), without waiting.
    fn try_take(&self, n: u64) -> bool {
        let mut used = self.used.lock().unwrap();
        let fits = used.bytes == 0 || used.bytes + n <= IN_FLIGHT;
        if fits {
            used.bytes += n;
        }
        fits
    }

    /// Waits until `n` more bytes fit (or nothing is in flight), then takes them; `false` if
    /// the transfer was cancelled meanwhile.
    fn take(&self, n: u64, cancel: &AtomicBool) -> bool {
        let mut used = self.used.lock().unwrap();
        while used.bytes > 0 && used.bytes + n > IN_FLIGHT {
            if cancel.load(Ordering::Relaxed) {
                return false;
            }
            used.waiting += 1;
            used = self.freed.wait(used).unwrap();
            used.waiting -= 1;
        }
        used.bytes += n;
        !cancel.load(Ordering::Relaxed)
    }

    fn give(&self, n: u64) {
        let mut used = self.used.lock().unwrap();
        used.bytes -= n;
        if used.waiting > 0 {
            self.freed.notify_all();
        }
    }

    /// Wakes every waiting worker (after a cancel).
    fn wake(&self) {
        let _guard = self.used.lock().unwrap();
        self.freed.notify_all();
    }
}

/// Cancels the workers of [`send`] and wakes those waiting for room when dropped: the writer
/// stopped taking what they prepare (it is done, failed or panicked).
struct Stop<'a> {
    cancel: &'a AtomicBool,
    budget: &'a Budget,
}

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.budget.wake();
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
        used: std::sync::Mutex::default(),
        freed: std::sync::Condvar::new(),
    };
    let sig = |job: &Job| sigs.get(&job.index).map(Vec::as_slice);
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(u64, Result<Prepared>)>>(QUEUE);
        let (cancel, budget) = (&cancel, &budget);
        // Batches small enough that a few files still spread over every thread: their
        // patches and deltas are what takes the CPU.
        let per_task = (small.len() / (rayon::current_num_threads() * 4)).clamp(1, BATCH_FILES);
        scope.spawn(move || {
            small.par_chunks(per_task).for_each_with(tx, |tx, chunk| {
                let mut batch = Vec::with_capacity(chunk.len());
                let mut bytes = 0;
                for job in chunk {
                    let room = budget.try_take(job.size);
                    // What this worker holds goes to the writer before it waits for room:
                    // held, it could be what every worker waits for.
                    let full = bytes > 0 && bytes + job.size > BATCH_BYTES;
                    if full || (!room && !batch.is_empty()) {
                        let _ = tx.send(std::mem::take(&mut batch));
                        bytes = 0;
                    }
                    if !room && !budget.take(job.size, cancel) {
                        return;
                    }
                    if cancel.load(Ordering::Relaxed) {
                        budget.give(job.size);
                        return;
                    }
                    let item = made_patch(source, job, cache).unwrap_or_else(|| {
                        read_small(source, job).map(|(data, seen)| {
                            remember(cache, job.digest, &data);
                            let enc = encode(job, &data, sig(job), cache);
                            if let (Some(c), Some(seen), Encoded::Patch(..)) = (cache, seen, &enc) {
                                c.note_read(job.path, job.digest, seen);
                            }
                            let mtime = seen.map(|s| s.mtime);
                            prepared(job, mtime, data.len() as u64, enc, Vec::new)
                        })
                    });
                    bytes += job.size;
                    batch.push((job.size, item));
                }
                if !batch.is_empty() {
                    let _ = tx.send(batch);
                }
            });
        });
        // Stops the workers however this thread leaves the loop: on an error below, or a
        // panic (workers waiting for room would otherwise wait for ever, and the scope with
        // them).
        let _stop = Stop { cancel, budget };
        let result = rx.iter().flatten().try_for_each(|(taken, item)| {
            let Prepared { frames, tally } = item?;
            for f in &frames {
                s.queue(f)?;
            }
            drop(frames);
            budget.give(taken);
            s.meter.add_file(tally.size);
            count(report, &tally);
            Ok(())
        });
        result
    })?;
    for job in large {
        let before = s.meter.done().1;
        let tally = if let Some((basis, digest)) = &job.patch {
            match cache.and_then(|c| c.get(digest)) {
                Some(old) => stream_patch(s, source, job, basis, digest, &old, cache)?,
                // Gone from the cache since the plan was made: the agent signs nothing for a
                // patch job, so the file goes whole.
                None => {
                    stream_literal(s, source, job, cache)?;
                    literal_tally(job)
                }
            }
        } else if let (Some(basis), Some(sig)) = (&job.basis, sig(job)) {
            match parse_signature(sig) {
                Some(sig) => match stream_delta(s, source, job, basis, &sig, cache)? {
                    Some(tally) => tally,
                    // Its first window shares nothing worth a delta with the basis.
                    None => {
                        stream_literal(s, source, job, cache)?;
                        literal_tally(job)
                    }
                },
                None => {
                    stream_literal(s, source, job, cache)?;
                    literal_tally(job)
                }
            }
        } else {
            stream_literal(s, source, job, cache)?;
            literal_tally(job)
        };
        let counted = s.meter.done().1 - before;
        s.meter.add_file(job.size.saturating_sub(counted));
        count(report, &tally);
    }
    Ok(())
}

fn literal_tally(job: &Job) -> Tally {
    Tally {
        index: job.index,
        encoded: None,
        patched: false,
        size: job.size,
    }
}

/// Bytes of a large file diffed at a time: each window is read alone (so at most this much
/// of the file is resident at once), diffed against the whole signature, and its commands sent
/// as they are made; the windows' deltas are one delta (copies name basis offsets, literals
/// carry their bytes). A match spanning two windows is sent as literal bytes instead.
pub const DELTA_WINDOW: u64 = 32 << 20;

/// Frames of one file's delta or patch, sent as its bytes are produced: [`CHUNK`] bytes per
/// frame, the last one held back until [`FrameSink::finish`] marks it `last`.
struct FrameSink<'s> {
    s: &'s mut Session,
    frame: &'s dyn Fn(Vec<u8>, bool) -> Request,
    buf: Vec<u8>,
    /// Bytes to drop from the start of what is written next (a window's delta magic).
    skip: usize,
    /// Bytes sent or held so far.
    total: u64,
    err: Option<TransferError>,
}

impl<'s> FrameSink<'s> {
    fn new(s: &'s mut Session, frame: &'s dyn Fn(Vec<u8>, bool) -> Request) -> Self {
        FrameSink {
            s,
            frame,
            buf: Vec::with_capacity(CHUNK + 1),
            skip: 0,
            total: 0,
            err: None,
        }
    }

    /// The first error the session gave, or `e` itself.
    fn failure(&mut self, e: impl FnOnce() -> TransferError) -> TransferError {
        self.err.take().unwrap_or_else(e)
    }

    /// Sends what is held as the file's last frame.
    fn finish(mut self) -> Result<u64> {
        let data = std::mem::take(&mut self.buf);
        self.s.queue(&(self.frame)(data, true))?;
        Ok(self.total)
    }
}

impl Write for FrameSink<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.err.is_some() {
            return Err(std::io::Error::other("the connection failed"));
        }
        if self.skip > 0 {
            let n = self.skip.min(data.len());
            self.skip -= n;
            return Ok(n);
        }
        if self.buf.len() > CHUNK {
            let mut chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK + 1));
            self.buf.extend_from_slice(&chunk[CHUNK..]);
            chunk.truncate(CHUNK);
            if let Err(e) = self.s.queue(&(self.frame)(chunk, false)) {
                self.err = Some(e);
                return Err(std::io::Error::other("the connection failed"));
            }
        }
        let n = data.len().min(CHUNK + 1 - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.total += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A writer that only counts the bytes written to it.
struct ByteCount(u64);

impl Write for ByteCount {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0 += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads `len` bytes of `f` at `off`: a window of a large source file. Read, never mapped: a
/// source file truncated under a mapping (a log rotated in the source) would kill flip with
/// SIGBUS; read, a file that ends early has changed since the scan (exit 4, named).
fn read_window(f: &File, path: &Path, rel: &RelPath, off: u64, len: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len as usize];
    match f.read_exact_at(&mut buf, off) {
        Ok(()) => Ok(buf),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(TransferError::SourceChanged(rel.to_string()))
        }
        Err(source) => Err(TransferError::Source {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Sends a large file as an rsync delta against the agent's signature, computed and sent
/// window by window ([`DELTA_WINDOW`]): neither the file nor its delta is ever whole in memory.
/// The file is hashed on the way; the last frame goes only once its digest matches the scan's.
/// `None`, with nothing sent, when neither the first window's delta nor the last's is smaller
/// than its window (the file has little in common with its basis): it goes whole instead, as a
/// smaller file whose delta is no smaller than itself does, rather than as a delta longer than
/// the file.
fn stream_delta(
    s: &mut Session,
    source: &Path,
    job: &Job,
    basis: &RelPath,
    sig: &fast_rsync::Signature,
    cache: Option<&ContentCache>,
) -> Result<Option<Tally>> {
    let path = source.join(job.path.as_str());
    let (f, mtime, len) = open_source(&path, job.path)?;
    if len != job.size {
        return Err(TransferError::SourceChanged(job.path.to_string()));
    }
    let index = job.index as u32;
    let frame = |data: Vec<u8>, last: bool| Request::Delta {
        index,
        basis: basis.clone(),
        mtime,
        data,
        last,
    };
    let indexed = sig.index();
    // Measured before anything is sent (counted, not held: memory stays bounded): the first
    // window and, of a longer file, the last; when neither has a delta smaller than itself,
    // the file shares (next to) nothing with its basis. A file changed only at its start or
    // its end still goes as a delta. A window that goes is diffed twice, fast where it matches.
    let shares_nothing = |off: u64| -> Result<bool> {
        let n = (len - off).min(DELTA_WINDOW);
        let map = read_window(&f, &path, job.path, off, n)?;
        let mut size = ByteCount(0);
        Ok(fast_rsync::diff(&indexed, &map, &mut size).is_ok() && size.0 >= n)
    };
    let last = len.saturating_sub(1) / DELTA_WINDOW * DELTA_WINDOW;
    if shares_nothing(0)? && (last == 0 || shares_nothing(last)?) {
        return Ok(None);
    }
    let mut sink = FrameSink::new(s, &frame);
    let mut hasher = blake3::Hasher::new();
    let mut off = 0u64;
    loop {
        let n = (len - off).min(DELTA_WINDOW);
        let map = read_window(&f, &path, job.path, off, n)?;
        hasher.update_rayon(&map);
        if len <= crate::cache::CONTENT_MAX_FILE
            && Digest::from(hasher.clone().finalize()) == *job.digest
        {
            remember(cache, job.digest, &map);
        }
        // Every window's delta but the first starts with the magic; every one ends with END,
        // dropped here and written once after the last window.
        sink.skip = if off == 0 { 0 } else { 4 };
        let r = fast_rsync::diff(&indexed, &map, &mut sink);
        if let Err(e) = r {
            return Err(sink.failure(|| TransferError::Source {
                path: path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            }));
        }
        if sink.buf.pop() != Some(0) {
            return Err(sink.failure(|| TransferError::Source {
                path: path.display().to_string(),
                source: std::io::Error::other("the rsync delta did not end with END"),
            }));
        }
        sink.total -= 1;
        drop(map);
        off += n;
        sink.s.meter.add_bytes(n);
        if off >= len {
            break;
        }
    }
    if Digest::from(hasher.finalize()) != *job.digest {
        return Err(TransferError::SourceChanged(job.path.to_string()));
    }
    sink.buf.push(0);
    let total = sink.finish()? + 1;
    Ok(Some(Tally {
        index: job.index,
        encoded: Some(total),
        patched: false,
        size: job.size,
    }))
}

/// Largest file sent as a zstd patch: the patch's window covers the old version (at most
/// [`crate::cache::CONTENT_MAX_FILE`]) and the new one, and must stay within what the agent
/// accepts ([`flip_wire::PATCH_WINDOW_LOG_MAX`]-sized windows). Larger files go as rsync
/// deltas.
pub const PATCH_MAX: u64 = 32 << 20;

/// Sends a file (at most [`PATCH_MAX`] bytes) as a zstd `--patch-from` frame against `old`,
/// compressed and sent as it is made.
fn stream_patch(
    s: &mut Session,
    source: &Path,
    job: &Job,
    basis: &RelPath,
    old_digest: &Digest,
    old: &[u8],
    cache: Option<&ContentCache>,
) -> Result<Tally> {
    let (map, mtime) = read_large(source, job)?;
    remember(cache, job.digest, &map);
    let index = job.index as u32;
    let frame = |data: Vec<u8>, last: bool| Request::Patch {
        index,
        basis: basis.clone(),
        basis_digest: *old_digest,
        mtime,
        data,
        last,
    };
    let mut sink = FrameSink::new(s, &frame);
    let failed = |e: std::io::Error| TransferError::Source {
        path: source.join(job.path.as_str()).display().to_string(),
        source: e,
    };
    let r = (|| -> std::io::Result<()> {
        let mut enc = patch_encoder(&mut sink, old, map.len())?;
        for piece in map.chunks(1 << 20) {
            enc.write_all(piece)?;
        }
        enc.finish()?;
        Ok(())
    })();
    if let Err(e) = r {
        return Err(sink.failure(|| failed(e)));
    }
    let total = sink.finish()?;
    Ok(Tally {
        index: job.index,
        encoded: Some(total),
        patched: true,
        size: job.size,
    })
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
    let (mut f, mtime, len) = open_source(&path, job.path)?;
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
            let n = data.len() as u64;
            s.queue(&Request::Literal {
                index,
                mtime,
                data,
                last: false,
            })?;
            s.meter.add_bytes(n);
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
                basis_digest: *digest,
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
pub(crate) fn remember(cache: Option<&ContentCache>, digest: &Digest, data: &[u8]) {
    if let Some(c) = cache {
        let _ = c.put(digest, data);
    }
}

/// A patch job whose patch this process made already (ahead of the deploy, or for another
/// target) from the file's bytes read at this path after the scan and checked against the
/// scanned digest: its source is not read again while it is still exactly what was read then
/// ([`Seen`]: same inode, size, mtime and ctime, which any write or replacement changes). The
/// agent checks what it makes of the patch against that digest. `None`: no such patch, or the
/// file is not what was read (then it is read and checked again, and a change since the scan
/// is reported as before).
fn made_patch(source: &Path, job: &Job, cache: Option<&ContentCache>) -> Option<Result<Prepared>> {
    let (basis, old) = job.patch.as_ref()?;
    let cache = cache?;
    let read = cache.read_seen(job.path, job.digest)?;
    let patch = cache.made_patch(old, job.digest)?;
    let path = source.join(job.path.as_str());
    match open_source_seen(&path, job.path) {
        Ok((_, now)) if now == read => {
            let enc = Encoded::Patch(basis.clone(), **old, patch);
            Some(Ok(prepared(job, Some(now.mtime), job.size, enc, Vec::new)))
        }
        Ok(_) => None,
        Err(e) => Some(Err(e)),
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
        // Made once for every target whose live release holds the same old version.
        if let Some(p) = cache.and_then(|c| c.patch(digest, job.digest, |old| patch(old, data))) {
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

/// What a source file was when it was opened and read: its mtime (sent with its content) and
/// what changes whenever it is written or replaced (inode, size, ctime). The send trusts a
/// version read once (see [`made_patch`]) only while the file is still exactly this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seen {
    mtime: (i64, u32),
    ctime: (i64, u32),
    ino: u64,
    dev: u64,
    size: u64,
}

impl Seen {
    fn of(m: &std::fs::Metadata) -> Seen {
        Seen {
            mtime: (m.mtime(), m.mtime_nsec() as u32),
            ctime: (m.ctime(), m.ctime_nsec() as u32),
            ino: m.ino(),
            dev: m.dev(),
            size: m.len(),
        }
    }
}

/// Opens a source file without following a symlink that replaced it since the scan, and
/// without blocking on a FIFO that did: anything but a regular file has changed since the scan.
fn open_source(path: &Path, rel: &RelPath) -> Result<(File, Mtime, u64)> {
    open_source_seen(path, rel).map(|(f, seen)| (f, Some(seen.mtime), seen.size))
}

/// [`open_source`], with what the file is as it is opened.
fn open_source_seen(path: &Path, rel: &RelPath) -> Result<(File, Seen)> {
    let err = |source| TransferError::Source {
        path: path.display().to_string(),
        source,
    };
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => TransferError::SourceChanged(rel.to_string()),
            _ => err(e),
        })?;
    let m = f.metadata().map_err(err)?;
    if !m.is_file() {
        return Err(TransferError::SourceChanged(rel.to_string()));
    }
    Ok((f, Seen::of(&m)))
}

/// A small file, read whole and checked against its scanned digest, with what it was when it
/// was read (its mtime among it; for an empty file, which is not read, what it is if it is
/// this empty file, else `None`).
pub(crate) fn read_small(source: &Path, step: &Job) -> Result<(Vec<u8>, Option<Seen>)> {
    // An empty file's content is known without reading it; and an empty shared-file seed
    // (`flip_plan::shared`: a shared file the scan lacks starts empty) may name a path the
    // source lacks, or one excluded from the scan that has content (a local `.env`).
    let path = source.join(step.path.as_str());
    if step.size == 0 {
        // The source's mtime when it is this empty file.
        let seen = std::fs::symlink_metadata(&path)
            .ok()
            .filter(|m| m.is_file() && m.len() == 0)
            .map(|m| Seen::of(&m));
        return Ok((Vec::new(), seen));
    }
    let (f, seen) = open_source_seen(&path, step.path)?;
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
    Ok((data, Some(seen)))
}

/// A file of at most [`PATCH_MAX`] bytes, read whole (see [`read_window`]) and checked against
/// its scanned digest (hashed on all cores).
fn read_large(source: &Path, step: &Job) -> Result<(Vec<u8>, Mtime)> {
    let path = source.join(step.path.as_str());
    let (f, mtime, len) = open_source(&path, step.path)?;
    if len != step.size {
        return Err(TransferError::SourceChanged(step.path.to_string()));
    }
    let data = read_window(&f, &path, step.path, 0, len)?;
    let mut h = blake3::Hasher::new();
    h.update_rayon(&data);
    if Digest::from(h.finalize()) != *step.digest {
        return Err(TransferError::SourceChanged(step.path.to_string()));
    }
    Ok((data, mtime))
}

/// A signature from the agent, if it is sane.
fn parse_signature(sig: &[u8]) -> Option<fast_rsync::Signature> {
    // Header: magic, block size, hash size (big-endian u32s). Refuse sizes that would make the
    // diff panic or crawl before handing the signature to fast_rsync.
    let block = u32::from_be_bytes(sig.get(4..8)?.try_into().ok()?);
    let hash = u32::from_be_bytes(sig.get(8..12)?.try_into().ok()?);
    if !(256..=1 << 20).contains(&block) || !(1..=16).contains(&hash) {
        return None;
    }
    fast_rsync::Signature::deserialize(sig.to_vec()).ok()
}

/// An rsync delta of `data` against a signature from the agent, if the signature is sane and
/// the delta is smaller than the data.
fn delta(sig: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let sig = parse_signature(sig)?;
    let mut out = Vec::new();
    fast_rsync::diff(&sig.index(), data, &mut out).ok()?;
    (out.len() < data.len()).then_some(out)
}

/// zstd `--patch-from`: `new` compressed with `old` as reference prefix. `None` if not smaller
/// than `new`. Level 7 for small files, 3 above 32 KiB, with long-distance matching (as
/// `zstd --patch-from` does). Measured on the generated PHP corpus (`cargo bench --bench deploy
/// -- --trees DIR`, vendor upgrade: 3,419 changed files, 22.9 MB): level 7 made 366,576 bytes
/// of patches in 0.084 s on one core, level 9 (binary-tree search) 366,253 in 0.30 s, level 6
/// 368,486; 19 runs at ~2 MB/s, far too slow for thousands of files. Level 3 keeps large files
/// at stream speed.
///
/// For the small files, long-distance matching costs little and pays on the wire: on the
/// 3,393 of them up to 32 KiB, level 7 without it makes 2% fewer patch bytes (351,004 against
/// 358,626) in 20% less time (65 against 83 ms), but once the session's zstd stream (level 3)
/// has compressed the patches together, as it does on the wire, 4% more (315,682 against
/// 304,559); level 8 without it 2% more (309,855) in 70 ms. At level 3 it saves 8% of the patch
/// bytes (389,654 against 424,411).
///
/// Each thread keeps one compression context for its patches: creating one per file cost
/// ~27 µs (3,000 small PHP files: 99 ms → 18 ms, the same bytes), which a vendor upgrade of
/// thousands of files paid on every one.
pub fn patch(old: &[u8], new: &[u8]) -> Option<Vec<u8>> {
    use zstd::zstd_safe::CCtx;
    thread_local! {
        static CCTX: std::cell::RefCell<Option<CCtx<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    CCTX.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        if c.is_none() {
            *c = Some(CCtx::try_create()?);
        }
        patch_with(c.as_mut()?, old, new)
    })
}

/// [`patch`] with the context `cctx`, left with no reference to `old`.
fn patch_with(
    cctx: &mut zstd::zstd_safe::CCtx<'static>,
    old: &[u8],
    new: &[u8],
) -> Option<Vec<u8>> {
    use zstd::zstd_safe::{CParameter, ResetDirective};
    let (level, window) = patch_params(old.len(), new.len());
    cctx.reset(ResetDirective::SessionAndParameters).ok()?;
    let set = |cctx: &mut zstd::zstd_safe::CCtx<'static>| -> Option<()> {
        cctx.set_parameter(CParameter::CompressionLevel(level))
            .ok()?;
        cctx.set_parameter(CParameter::WindowLog(window)).ok()?;
        cctx.set_parameter(CParameter::EnableLongDistanceMatching(true))
            .ok()?;
        cctx.set_pledged_src_size(Some(new.len() as u64))
            .ok()
            .map(drop)
    };
    set(cctx)?;
    // SAFETY: zstd uses a referenced prefix for the next frame only, which `compress2` makes
    // whole before returning; the reset below (which clears every dictionary and prefix) runs
    // before this function returns, so the context never refers to `old` after it is gone.
    let prefix: &'static [u8] = unsafe { std::mem::transmute::<&[u8], &'static [u8]>(old) };
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(new.len()));
    let made = cctx
        .ref_prefix(prefix)
        .and_then(|_| cctx.compress2(&mut out, new));
    let _ = cctx.reset(ResetDirective::SessionAndParameters);
    made.ok()?;
    (out.len() < new.len()).then_some(out)
}

/// The level and window log of a patch of `new_len` bytes against `old_len`: level 7 up to
/// 32 KiB, 3 above; a window reaching back over the whole reference, within what the agent
/// accepts.
fn patch_params(old_len: usize, new_len: usize) -> (i32, u32) {
    let level = if new_len <= 32 << 10 { 7 } else { 3 };
    let span = (old_len + new_len).max(1 << 10) as u64;
    let window = (64 - span.leading_zeros()).clamp(10, flip_wire::PATCH_WINDOW_LOG_MAX);
    (level, window)
}

/// The zstd encoder of a patch of `new_len` bytes against `old`: see [`patch`].
fn patch_encoder<W: Write>(
    w: W,
    old: &[u8],
    new_len: usize,
) -> std::io::Result<zstd::stream::write::Encoder<'_, W>> {
    let (level, window) = patch_params(old.len(), new_len);
    let mut enc = zstd::stream::write::Encoder::with_ref_prefix(w, level, old)?;
    enc.window_log(window)?;
    // The agent's decoder then needs no larger a buffer than the file.
    enc.set_pledged_src_size(Some(new_len as u64))?;
    // As `zstd --patch-from` does: long-distance matching finds the reference's content
    // wherever it is, which the fast levels' small match tables miss.
    enc.long_distance_matching(true)?;
    Ok(enc)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The patch made with a thread's reused context is byte for byte the one a fresh encoder
    /// makes, patch after patch of other sizes, levels and windows: nothing of one patch (its
    /// reference, its parameters) leaks into the next.
    #[test]
    fn a_reused_context_makes_the_same_patches_as_a_fresh_one() {
        let fresh = |old: &[u8], new: &[u8]| {
            let mut enc = patch_encoder(Vec::new(), old, new.len()).unwrap();
            enc.write_all(new).unwrap();
            let out = enc.finish().unwrap();
            (out.len() < new.len()).then_some(out)
        };
        let mut made = 0;
        for (i, len) in [1500usize, 40_000, 300, 9000, 200_000, 1500]
            .into_iter()
            .enumerate()
        {
            let old: Vec<u8> = (0..len).map(|j| (j * 7 + i) as u8 % 61 + 32).collect();
            let mut new = old.clone();
            new.splice(len / 2..len / 2, format!("// change {i}\n").bytes());
            let p = patch(&old, &new);
            assert_eq!(p, fresh(&old, &new), "patch {i} of {len} bytes");
            made += usize::from(p.is_some());
        }
        assert_eq!(made, 6, "every file here patches smaller than itself");
    }
}
