//! Arbitrary bytes → `flip_wire::FrameReader`, reading `Request`s (what the agent reads) or
//! `Response`s (what the client reads) until the first error, one of four ways (picked by the
//! first input byte):
//! 1. the bytes as a plain frame stream;
//! 2. the bytes as a zstd stream (`start_decompression` before the first frame);
//! 3. the bytes zstd-compressed, so the frames inside a valid zstd stream get fuzzed too;
//! 4. the agent's pattern: one plain frame, then a switch to zstd for the rest.
//!
//! Never a panic; never an allocation beyond one frame's worth (`LimitAlloc`); every decoded
//! message survives an encode/decode round trip.
#![no_main]

use flip_wire::{FrameReader, Request, Response, WireError, MAX_FRAME};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::io::Cursor;

#[global_allocator]
static ALLOC: flip_fuzz::LimitAlloc = flip_fuzz::LimitAlloc {
    // One frame buffer (at most MAX_FRAME) plus zstd's window and bookkeeping.
    max_single: MAX_FRAME + (1 << 20),
    max_live: 3 * MAX_FRAME,
};

/// At most this many frames per run (a stream of empty-ish frames is otherwise unbounded work).
const MAX_FRAMES: usize = 256;

fn reader(bytes: Vec<u8>) -> FrameReader {
    FrameReader::new(Box::new(Cursor::new(bytes)))
}

fn drain<T: DeserializeOwned + Serialize + PartialEq + Debug>(r: &mut FrameReader) {
    for _ in 0..MAX_FRAMES {
        match r.recv::<T>() {
            Ok(msg) => {
                let again = flip_fuzz::frame(&msg);
                let back: T = reader(again)
                    .recv()
                    .expect("a frame the writer made reads back");
                assert_eq!(back, msg);
            }
            Err(WireError::TooLarge(n)) => {
                assert!(n > MAX_FRAME);
                return;
            }
            Err(_) => return,
        }
    }
}

/// zstd at level 1, reusing one compression context (creating one per input costs more than
/// the rest of the run).
fn compress(data: &[u8]) -> Vec<u8> {
    thread_local! {
        static Z: std::cell::RefCell<zstd::bulk::Compressor<'static>> =
            std::cell::RefCell::new(zstd::bulk::Compressor::new(1).unwrap());
    }
    Z.with(|z| {
        z.borrow_mut()
            .compress(data)
            .expect("compressing in memory")
    })
}

fn run<T: DeserializeOwned + Serialize + PartialEq + Debug>(mode: u8, data: &[u8]) {
    match mode {
        // 1. Plain.
        0 => drain::<T>(&mut reader(data.to_vec())),
        // 2. The raw bytes as a zstd stream.
        1 => {
            let mut r = reader(data.to_vec());
            if r.start_decompression().is_ok() {
                drain::<T>(&mut r);
            }
        }
        // 3. The bytes inside a valid zstd stream.
        2 => {
            let mut r = reader(compress(data));
            if r.start_decompression().is_ok() {
                drain::<T>(&mut r);
            }
        }
        // 4. Handshake-style: the first byte splits the rest into a plain part and a part that
        // follows compressed, as after Hello { compress > 0 }.
        _ => {
            if let Some((&split, rest)) = data.split_first() {
                let split = (split as usize).min(rest.len());
                let mut stream = rest[..split].to_vec();
                stream.extend(compress(&rest[split..]));
                let mut r = reader(stream);
                if r.recv::<T>().is_ok() && r.start_decompression().is_ok() {
                    drain::<T>(&mut r);
                }
            }
        }
    }
}

// The first byte picks the way (bits 0-1) and the message type (bit 2); the rest is the stream.
fuzz_target!(|data: &[u8]| {
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    if sel & 4 == 0 {
        run::<Request>(sel & 3, data);
    } else {
        run::<Response>(sel & 3, data);
    }
});
