//! Streaming file content to the agent: literal bytes or rsync deltas, prepared in parallel,
//! written in order of readiness, each file's frames contiguous.

use crate::{ContentCache, DeployReport, Result, Session, TransferError};
use flip_manifest::{Digest, RelPath};
use flip_plan::Plan;
use flip_wire::{Mtime, Request, CHUNK};
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Files above this size are streamed by the writing thread itself instead of being prepared
/// whole in memory by the workers.
const LARGE: u64 = 4 << 20;
/// Prepared files waiting for the writer at most (bounds client memory).
const QUEUE: usize = 16;

/// One file to send: `patch` set when the old version (path, digest) is in the content cache,
/// `basis` when it goes as an rsync delta, neither for a literal.
pub(crate) struct Job {
    pub index: usize,
    pub basis: Option<RelPath>,
    pub patch: Option<(RelPath, Digest)>,
}

/// A file ready to go: its frames and what they count for.
struct Prepared {
    frames: Vec<Request>,
    delta: Option<u64>,
    patched: bool,
    size: u64,
}

pub(crate) fn send(
    s: &mut Session,
    source: &Path,
    plan: &Plan,
    jobs: &[Job],
    sigs: HashMap<usize, Vec<u8>>,
    cache: Option<&ContentCache>,
    report: &mut DeployReport,
) -> Result<()> {
    let (large, small): (Vec<&Job>, Vec<&Job>) =
        jobs.iter().partition(|j| plan.files[j.index].size > LARGE);
    let cancel = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Prepared>>(QUEUE);
        let (cancel, sigs) = (&cancel, &sigs);
        scope.spawn(move || {
            small.par_iter().for_each_with(tx, |tx, job| {
                if cancel.load(Ordering::Relaxed) {
                    return;
                }
                let sig = sigs.get(&job.index).map(Vec::as_slice);
                let _ = tx.send(prepare(source, plan, job, sig, cache));
            });
        });
        let result = (|| {
            for item in rx.iter() {
                let p = item?;
                for f in &p.frames {
                    s.queue(f)?;
                }
                count(report, &p);
            }
            Ok(())
        })();
        if result.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        result
    })?;
    for job in large {
        let sig = sigs.get(&job.index).map(Vec::as_slice);
        let p = stream_large(s, source, plan, job, sig, cache)?;
        count(report, &p);
    }
    Ok(())
}

fn count(report: &mut DeployReport, p: &Prepared) {
    if p.patched {
        report.patched += 1;
    }
    match p.delta {
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

fn check(rel: &RelPath, data: &[u8], size: u64, digest: &Digest) -> Result<()> {
    if data.len() as u64 != size || Digest::of(data) != *digest {
        return Err(TransferError::SourceChanged(rel.to_string()));
    }
    Ok(())
}

fn prepare(
    source: &Path,
    plan: &Plan,
    job: &Job,
    sig: Option<&[u8]>,
    cache: Option<&ContentCache>,
) -> Result<Prepared> {
    let step = &plan.files[job.index];
    let path = source.join(step.path.as_str());
    let (f, mtime, _) = open_source(&path)?;
    let mut data = Vec::with_capacity(step.size as usize);
    f.take(step.size + 1)
        .read_to_end(&mut data)
        .map_err(|source| TransferError::Source {
            path: path.display().to_string(),
            source,
        })?;
    check(&step.path, &data, step.size, &step.digest)?;
    let index = job.index as u32;
    if let Some(p) = patch_frames(job, &data, mtime, cache) {
        return Ok(p);
    }
    if let (Some(basis), Some(sig)) = (&job.basis, sig) {
        if let Some(delta) = delta(sig, &data) {
            return Ok(Prepared {
                delta: Some(delta.len() as u64),
                patched: false,
                size: step.size,
                frames: chunked(&delta, |data, last| Request::Delta {
                    index,
                    basis: basis.clone(),
                    mtime,
                    data,
                    last,
                }),
            });
        }
    }
    Ok(Prepared {
        delta: None,
        patched: false,
        size: step.size,
        frames: chunked(&data, |data, last| Request::Literal {
            index,
            mtime,
            data,
            last,
        }),
    })
}

/// Patch frames for a job whose old version is in the content cache, if the patch is smaller
/// than the file.
fn patch_frames(
    job: &Job,
    data: &[u8],
    mtime: Mtime,
    cache: Option<&ContentCache>,
) -> Option<Prepared> {
    let (basis, digest) = job.patch.as_ref()?;
    let old = cache?.get(digest)?;
    let patch = patch(&old, data)?;
    let index = job.index as u32;
    Some(Prepared {
        delta: Some(patch.len() as u64),
        patched: true,
        size: data.len() as u64,
        frames: chunked(&patch, |chunk, last| Request::Patch {
            index,
            basis: basis.clone(),
            basis_digest: digest.0,
            mtime,
            data: chunk,
            last,
        }),
    })
}

/// zstd `--patch-from`: `new` compressed with `old` as reference prefix. Strong levels for small
/// files (where it costs little), lighter ones for large files. `None` if not smaller than `new`.
pub fn patch(old: &[u8], new: &[u8]) -> Option<Vec<u8>> {
    let level = match new.len() {
        0..=131_072 => 19,
        131_073..=1_048_576 => 12,
        _ => 6,
    };
    // The window must reach back over the whole reference.
    let span = (old.len() + new.len()).max(1 << 10) as u64;
    let window = (64 - span.leading_zeros()).clamp(10, 27);
    let mut enc = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), level, old).ok()?;
    enc.window_log(window).ok()?;
    enc.write_all(new).ok()?;
    let out = enc.finish().ok()?;
    (out.len() < new.len()).then_some(out)
}

/// Splits content into frames of at most [`CHUNK`] bytes (an empty file is one empty frame).
fn chunked(data: &[u8], make: impl Fn(Vec<u8>, bool) -> Request) -> Vec<Request> {
    if data.is_empty() {
        return vec![make(Vec::new(), true)];
    }
    let n = data.len().div_ceil(CHUNK);
    data.chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| make(c.to_vec(), i + 1 == n))
        .collect()
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

/// Large files: mapped, checked, and sent chunk by chunk from the writing thread.
fn stream_large(
    s: &mut Session,
    source: &Path,
    plan: &Plan,
    job: &Job,
    sig: Option<&[u8]>,
    cache: Option<&ContentCache>,
) -> Result<Prepared> {
    let step = &plan.files[job.index];
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
    if Digest::from(h.finalize()) != step.digest {
        return Err(TransferError::SourceChanged(step.path.to_string()));
    }
    if let Some(p) = patch_frames(job, &map, mtime, cache) {
        for f in &p.frames {
            s.queue(f)?;
        }
        return Ok(Prepared {
            frames: Vec::new(),
            ..p
        });
    }
    let index = job.index as u32;
    let (bytes, delta_len, basis) = match (&job.basis, sig.and_then(|sig| delta(sig, &map))) {
        (Some(b), Some(d)) => {
            let n = d.len() as u64;
            (std::borrow::Cow::Owned(d), Some(n), Some(b.clone()))
        }
        _ => (std::borrow::Cow::Borrowed(&map[..]), None, None),
    };
    let n = bytes.len().div_ceil(CHUNK).max(1);
    for i in 0..n {
        let chunk = bytes[i * CHUNK..((i + 1) * CHUNK).min(bytes.len())].to_vec();
        let last = i + 1 == n;
        let req = match &basis {
            Some(b) => Request::Delta {
                index,
                basis: b.clone(),
                mtime,
                data: chunk,
                last,
            },
            None => Request::Literal {
                index,
                mtime,
                data: chunk,
                last,
            },
        };
        s.queue(&req)?;
    }
    Ok(Prepared {
        frames: Vec::new(),
        delta: delta_len,
        patched: false,
        size: step.size,
    })
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
