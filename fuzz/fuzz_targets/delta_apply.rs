//! The agent's streaming rsync-delta applier (`flip_release::DeltaApplier`) on hostile input, fed
//! in pieces of fuzzed sizes, against a basis file on disk, with an output limit. Two ways,
//! picked by the first input byte:
//! 1. raw delta bytes: never a panic, never more output than the limit, memory bounded whatever
//!    the delta claims (`LimitAlloc`); and when it accepts a delta, `fast_rsync::apply_limited`
//!    (the reference implementation) accepts it too and gives the same bytes;
//! 2. a real delta: a new file derived from the basis by fuzzed edits, diffed with fast_rsync
//!    against the basis' signature, must be rebuilt exactly, however it is cut into pieces; with a
//!    limit one byte short it must be refused.
#![no_main]

use flip_release::DeltaApplier;
use libfuzzer_sys::fuzz_target;
use std::fs::File;
use std::io::{Seek, Write};
use std::path::PathBuf;
use std::sync::OnceLock;

#[global_allocator]
static ALLOC: flip_fuzz::LimitAlloc = flip_fuzz::LimitAlloc {
    // The applier's copy buffer (256 KiB), fast_rsync's reference output (bounded by the limit
    // below) and the input.
    max_single: 8 << 20,
    max_live: 64 << 20,
};

/// Largest output a run allows (the manifest size the agent would pass).
const MAX_LIMIT: u64 = 1 << 20;

/// One basis file per process (under /dev/shm when it exists), rewritten for every input. The
/// files of earlier runs whose process is gone are removed first (a run ends without cleaning
/// up: one file per run piled up in /dev/shm).
fn basis_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("flip-fuzz-delta-basis-") {
                    if !std::path::Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        dir.join(format!("flip-fuzz-delta-basis-{}", std::process::id()))
    })
}

fn basis_file(bytes: &[u8]) -> File {
    let mut f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(basis_path())
        .expect("basis file");
    f.write_all(bytes).unwrap();
    f.rewind().unwrap();
    f
}

/// Applies `delta` in pieces whose sizes come from `cuts`; the output, or the error.
fn apply(basis: &[u8], delta: &[u8], cuts: &[u8], limit: u64) -> Result<Vec<u8>, String> {
    let mut a = DeltaApplier::new(
        basis_file(basis),
        basis.len() as u64,
        basis_path().clone(),
        "f".into(),
        limit,
    );
    let mut out = Vec::new();
    let mut rest = delta;
    let mut cut = cuts.iter().cycle();
    while !rest.is_empty() {
        let n = (*cut.next().unwrap_or(&255) as usize + 1).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        a.feed(piece, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })
        .map_err(|e| e.to_string())?;
        assert!(out.len() as u64 <= limit, "output beyond the limit");
        assert!(out.len() as u64 <= a.written() && a.written() <= limit);
    }
    a.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mode = data[0] % 2;
    let split = (u16::from_le_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
    let cuts_len = (data[3] as usize % 8) + 1;
    let rest = &data[4..];
    let cuts = &rest[..cuts_len.min(rest.len())];
    let rest = &rest[cuts.len()..];
    let split = split.min(rest.len());
    let (basis, tail) = rest.split_at(split);
    match mode {
        0 => {
            // Raw delta bytes, a limit from the input.
            let limit = (u64::from(data[1]) << 12 | u64::from(data[2])) % MAX_LIMIT;
            let ours = apply(basis, tail, cuts, limit);
            if let Ok(out) = &ours {
                let mut reference = Vec::new();
                let r = fast_rsync::apply_limited(basis, tail, &mut reference, limit as usize);
                assert!(r.is_ok(), "accepted a delta the reference refuses: {r:?}");
                assert_eq!(out, &reference, "output differs from the reference");
            }
        }
        _ => {
            // A real delta of the basis edited by the rest of the input (`flip_fuzz::edited`).
            let new = flip_fuzz::edited(basis, tail);
            let block = 64u32;
            let sig = fast_rsync::Signature::calculate(
                basis,
                fast_rsync::SignatureOptions {
                    block_size: block,
                    crypto_hash_size: 8,
                },
            );
            let mut delta = Vec::new();
            fast_rsync::diff(&sig.index(), &new, &mut delta).unwrap();
            let out = apply(basis, &delta, cuts, new.len() as u64)
                .unwrap_or_else(|e| panic!("a real delta was refused: {e}"));
            assert_eq!(out, new, "a real delta rebuilt other bytes");
            if !new.is_empty() {
                assert!(
                    apply(basis, &delta, cuts, new.len() as u64 - 1).is_err(),
                    "output one byte over the limit was accepted"
                );
            }
        }
    }
});
