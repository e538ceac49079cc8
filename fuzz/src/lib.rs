//! Helpers shared by the fuzz targets: an allocator that turns an oversized allocation into a
//! crash (libFuzzer's `-malloc_limit_mb` only works under a sanitizer, and these targets normally
//! run with `--sanitizer none`), and frame encoding.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Wraps the system allocator; aborts (a crash libFuzzer records, with the input) when one
/// allocation exceeds `max_single` bytes or the bytes live at once exceed `max_live`.
pub struct LimitAlloc {
    pub max_single: usize,
    pub max_live: usize,
}

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Bytes currently allocated through [`LimitAlloc`].
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

impl LimitAlloc {
    #[inline]
    fn check(&self, size: usize) {
        if size > self.max_single {
            die(b"single allocation over the limit: ", size);
        }
        let live = LIVE.load(Ordering::Relaxed).saturating_add(size);
        if live > self.max_live {
            die(b"live allocations over the limit: ", live);
        }
    }
}

/// Reports without allocating, then aborts (libFuzzer saves the input as a crash).
#[cold]
fn die(what: &[u8], n: usize) -> ! {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(b"flip-fuzz: ");
    let _ = err.write_all(what);
    let _ = err.write_all(&digits[i..]);
    let _ = err.write_all(b" bytes\n");
    std::process::abort();
}

// SAFETY: every call is forwarded to `System` with the same arguments; the counter is only
// bookkeeping.
unsafe impl GlobalAlloc for LimitAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.check(layout.size());
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.check(layout.size());
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.check(new_size.saturating_sub(layout.size()));
        if new_size > self.max_single {
            die(b"single allocation over the limit: ", new_size);
        }
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

/// A `Write` into a shared buffer (a `FrameWriter` owns its writer).
#[derive(Clone, Default)]
pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// One plain frame (length prefix + bincode) holding `msg`, as `FrameWriter` writes it.
pub fn frame<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let buf = SharedBuf::default();
    let mut w = flip_wire::FrameWriter::new(Box::new(buf.clone()));
    w.send(msg).expect("a message the fuzzer built encodes");
    w.finish().expect("writing to memory");
    buf.take()
}

/// `basis` edited as `input` says: its first half, taken three bytes at a time, overwrites the
/// byte at a little-endian `u16` offset (modulo the length) with the third; its second half is
/// appended. A new version of a file for the delta and patch targets.
pub fn edited(basis: &[u8], input: &[u8]) -> Vec<u8> {
    let mut new = basis.to_vec();
    let (edits, append) = input.split_at(input.len() / 2);
    for e in edits.chunks_exact(3) {
        if new.is_empty() {
            break;
        }
        let at = u16::from_le_bytes([e[0], e[1]]) as usize % new.len();
        new[at] = e[2];
    }
    new.extend_from_slice(append);
    new
}
