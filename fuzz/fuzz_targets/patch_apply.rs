//! The agent's streaming zstd `--patch-from` decoder (`flip_release::PatchDecoder`) on hostile
//! input, fed in pieces of fuzzed sizes, with a sink that refuses output past a limit (as the
//! staging file does at the manifest size). Two ways, picked by the first input byte:
//! 1. raw frame bytes: never a panic, memory bounded whatever window the frame claims
//!    (`LimitAlloc`: the decoder's window is capped), output never past the limit; whatever it
//!    accepts, zstd's own decoder with the same prefix gives the same bytes;
//! 2. a real patch of a fuzzed edit of the basis must rebuild it exactly, however it is cut.
#![no_main]

use flip_release::PatchDecoder;
use libfuzzer_sys::fuzz_target;
use std::io::Read;

#[global_allocator]
static ALLOC: flip_fuzz::LimitAlloc = flip_fuzz::LimitAlloc {
    // The decoder's window (capped at 2^26) and its buffers, the output up to the limit.
    max_single: (1 << 26) + (8 << 20),
    max_live: 192 << 20,
};

const LIMIT: usize = 1 << 20;

fn apply(basis: &[u8], patch: &[u8], cuts: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    let mut d = PatchDecoder::new(basis.to_vec(), "f".into()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut rest = patch;
    let mut cut = cuts.iter().cycle();
    while !rest.is_empty() {
        let n = (*cut.next().unwrap_or(&255) as usize + 1).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        d.feed(piece, &mut |b| {
            if out.len() + b.len() > limit {
                return Err(flip_release::Error::BadRequest("over the limit".into()));
            }
            out.extend_from_slice(b);
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    }
    d.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mode = data[0] % 2;
    let cuts = &data[1..2 + data[1] as usize % 3];
    let rest = &data[cuts.len() + 1..];
    let split = (data[2] as usize * 16).min(rest.len());
    let (basis, tail) = rest.split_at(split);
    match mode {
        0 => {
            if let Ok(out) = apply(basis, tail, cuts, LIMIT) {
                assert!(out.len() <= LIMIT);
                let mut reference = Vec::new();
                let r =
                    zstd::stream::read::Decoder::with_ref_prefix(tail, basis).and_then(|mut d| {
                        d.window_log_max(flip_release::PATCH_WINDOW_LOG_MAX)?;
                        (&mut d).take(LIMIT as u64 + 1).read_to_end(&mut reference)
                    });
                if r.is_ok() {
                    assert_eq!(out, reference, "output differs from zstd's own decoder");
                }
            }
        }
        _ => {
            let new = flip_fuzz::edited(basis, tail);
            let mut enc = zstd::stream::raw::Encoder::with_ref_prefix(3, basis).unwrap();
            let patch = {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                let mut out = vec![0u8; zstd::zstd_safe::compress_bound(new.len()) + 1024];
                let mut input = InBuffer::around(&new);
                let mut ob = OutBuffer::around(&mut out[..]);
                while input.pos() < new.len() {
                    enc.run(&mut input, &mut ob).unwrap();
                }
                while enc.finish(&mut ob, true).unwrap() != 0 {}
                let n = ob.pos();
                out.truncate(n);
                out
            };
            let out = apply(basis, &patch, cuts, new.len())
                .unwrap_or_else(|e| panic!("a real patch was refused: {e}"));
            assert_eq!(out, new, "a real patch rebuilt other bytes");
        }
    }
});
