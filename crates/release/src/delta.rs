//! Streaming application of rsync deltas (the librsync format `fast_rsync` 0.2 emits) and of
//! zstd patches.
//!
//! ```text
//! magic: u32 BE 0x72730236
//! commands, each one opcode byte:
//!   0x00              END
//!   0x01..=0x40       LITERAL of 1..=64 bytes, the bytes follow
//!   0x41..=0x44       LITERAL, length in 1/2/4/8 bytes (BE), then the bytes
//!   0x45..=0x54       COPY from the basis: (op - 0x45) / 4 selects 1/2/4/8 bytes of offset,
//!                     (op - 0x45) % 4 the same for the length (BE)
//! ```
//!
//! [`DeltaApplier`] consumes a delta in pieces of any size as they arrive, reads copied ranges
//! from the basis file with `pread` through one bounded buffer, and hands the output to a sink in
//! pieces of at most [`COPY_BUF`] bytes (literal bytes are passed through as they arrive). Its
//! memory is a few hundred KiB whatever the file size, and its work is bounded by the output,
//! which is refused beyond a limit (the manifest size): every command must produce at least one
//! byte (zero-length literals and copies are refused; `fast_rsync` never emits them). A delta is
//! refused when it has the wrong magic, an unknown command, a copy outside the basis, more output
//! than the limit, data after END, or ends before END.

use crate::error::{Error, Result};
use crate::stage::{Basis, FileWriter};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const DELTA_MAGIC: u32 = 0x7273_0236;
const OP_END: u8 = 0x00;
const OP_LITERAL_1: u8 = 0x01;
const OP_LITERAL_64: u8 = 0x40;
const OP_LITERAL_N1: u8 = 0x41;
const OP_LITERAL_N8: u8 = 0x44;
const OP_COPY_N1_N1: u8 = 0x45;
const OP_COPY_N8_N8: u8 = 0x54;

/// Largest piece read from the basis (and handed to the sink) at once.
pub const COPY_BUF: usize = 256 * 1024;

/// Where the applier stands in the command stream.
#[derive(Clone, Copy, Debug)]
enum State {
    /// Collecting the 4 magic bytes.
    Magic,
    /// Expecting an opcode.
    Command,
    /// Collecting the `want` parameter bytes of opcode `op`.
    Params { op: u8, want: usize },
    /// Passing through `left` literal bytes.
    Literal { left: u64 },
    /// END seen: nothing may follow.
    Done,
}

/// Applies one rsync delta against a basis file, streaming; see the [module docs](self).
pub struct DeltaApplier {
    state: State,
    /// Bytes of a header or parameters collected so far (at most 16).
    pending: [u8; 16],
    have: usize,
    basis: File,
    basis_len: u64,
    /// What the messages name: the file being built.
    name: String,
    basis_path: PathBuf,
    limit: u64,
    written: u64,
    buf: Vec<u8>,
}

impl DeltaApplier {
    /// An applier reading copies from `basis` (`basis_len` bytes, at `basis_path`) and producing
    /// at most `limit` bytes of the file `name`.
    pub fn new(basis: File, basis_len: u64, basis_path: PathBuf, name: String, limit: u64) -> Self {
        DeltaApplier {
            state: State::Magic,
            pending: [0; 16],
            have: 0,
            basis,
            basis_len,
            name,
            basis_path,
            limit,
            written: 0,
            buf: Vec::new(),
        }
    }

    /// Bytes of output the commands read so far amount to (a literal counts whole as soon as
    /// its length is read, before all its bytes have arrived); never more than the limit.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn bad(&self, detail: String) -> Error {
        Error::Integrity {
            path: self.name.clone(),
            detail: format!("delta cannot be applied: {detail}"),
        }
    }

    /// Claims `n` more bytes of output against the limit.
    fn claim(&mut self, n: u64, what: &str) -> Result<()> {
        if n > self.limit - self.written {
            return Err(self.bad(format!(
                "a {what} of {n} bytes at offset {} goes beyond the {} bytes the manifest says",
                self.written, self.limit
            )));
        }
        self.written += n;
        Ok(())
    }

    /// Consumes the next piece of the delta, handing its output to `out`.
    ///
    /// # Errors
    /// [`Error::Integrity`] for a malformed delta, a copy outside the basis or output beyond the
    /// limit; what `out` returns.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        out: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        while !data.is_empty() {
            match self.state {
                State::Magic => {
                    let n = (4 - self.have).min(data.len());
                    self.pending[self.have..self.have + n].copy_from_slice(&data[..n]);
                    self.have += n;
                    data = &data[n..];
                    if self.have == 4 {
                        let magic = u32::from_be_bytes([
                            self.pending[0],
                            self.pending[1],
                            self.pending[2],
                            self.pending[3],
                        ]);
                        if magic != DELTA_MAGIC {
                            return Err(self.bad(format!("wrong magic 0x{magic:08x}")));
                        }
                        self.have = 0;
                        self.state = State::Command;
                    }
                }
                State::Command => {
                    let op = data[0];
                    data = &data[1..];
                    self.state = match op {
                        OP_END => State::Done,
                        OP_LITERAL_1..=OP_LITERAL_64 => {
                            let n = (op - OP_LITERAL_1 + 1) as u64;
                            self.claim(n, "literal")?;
                            State::Literal { left: n }
                        }
                        OP_LITERAL_N1..=OP_LITERAL_N8 => State::Params {
                            op,
                            want: 1 << (op - OP_LITERAL_N1),
                        },
                        OP_COPY_N1_N1..=OP_COPY_N8_N8 => {
                            let mode = op - OP_COPY_N1_N1;
                            State::Params {
                                op,
                                want: (1 << (mode / 4)) + (1 << (mode % 4)),
                            }
                        }
                        _ => return Err(self.bad(format!("unknown command 0x{op:02x}"))),
                    };
                }
                State::Params { op, want } => {
                    let n = (want - self.have).min(data.len());
                    self.pending[self.have..self.have + n].copy_from_slice(&data[..n]);
                    self.have += n;
                    data = &data[n..];
                    if self.have == want {
                        self.have = 0;
                        self.command(op, want, out)?;
                    }
                }
                State::Literal { left } => {
                    let n = (left.min(data.len() as u64)) as usize;
                    out(&data[..n])?;
                    data = &data[n..];
                    self.state = if left == n as u64 {
                        State::Command
                    } else {
                        State::Literal {
                            left: left - n as u64,
                        }
                    };
                }
                State::Done => {
                    return Err(self.bad(format!("{} bytes after its end", data.len())));
                }
            }
        }
        Ok(())
    }

    /// Runs an opcode whose `want` parameter bytes are in `pending`.
    fn command(
        &mut self,
        op: u8,
        want: usize,
        out: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let be = |b: &[u8]| b.iter().fold(0u64, |v, x| (v << 8) | *x as u64);
        if op <= OP_LITERAL_N8 {
            let n = be(&self.pending[..want]);
            if n == 0 {
                return Err(self.bad("a literal of length 0".into()));
            }
            self.claim(n, "literal")?;
            self.state = State::Literal { left: n };
            return Ok(());
        }
        let mode = op - OP_COPY_N1_N1;
        let off_len = 1usize << (mode / 4);
        let offset = be(&self.pending[..off_len]);
        let len = be(&self.pending[off_len..want]);
        if len == 0 {
            return Err(self.bad("a copy of length 0".into()));
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.basis_len)
        {
            return Err(self.bad(format!(
                "a copy of {len} bytes at {offset} is outside the basis of {} bytes",
                self.basis_len
            )));
        }
        self.claim(len, "copy")?;
        if self.buf.is_empty() {
            self.buf = vec![0u8; COPY_BUF];
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(COPY_BUF as u64) as usize;
            let piece = &mut self.buf[..n];
            self.basis
                .read_exact_at(piece, offset + done)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => Error::Corrupt {
                        path: self.basis_path.clone(),
                        detail: "the delta basis became shorter than its manifest says".into(),
                    },
                    _ => crate::error::io("read the delta basis", &self.basis_path)(e),
                })?;
            out(piece)?;
            done += n as u64;
        }
        self.state = State::Command;
        Ok(())
    }

    /// Checks that the delta ended with END; returns the bytes produced.
    ///
    /// # Errors
    /// [`Error::Integrity`] if the delta is incomplete.
    pub fn finish(self) -> Result<u64> {
        match self.state {
            State::Done => Ok(self.written),
            _ => Err(self.bad("it ends before its END command (truncated)".into())),
        }
    }
}

/// Bytes of a basis read at once to compute its signature.
const SIGNATURE_WINDOW: usize = 8 << 20;

/// Most blocks a signature has: 12 MiB of signature, well within one frame.
const MAX_SIG_BLOCKS: u64 = 1 << 20;

/// The block size of a basis' signature: [`flip_plan::block_size`], or larger for a file of
/// over 16 GiB so its signature stays within [`MAX_SIG_BLOCKS`] (up to 1 MiB blocks, which
/// clients accept).
fn signature_block(size: u64) -> u32 {
    let fit = size
        .div_ceil(MAX_SIG_BLOCKS)
        .next_power_of_two()
        .min(1 << 20) as u32;
    flip_plan::block_size(size).max(fit)
}

/// The rsync signature (MD4, 8-byte strong hashes, block size from [`signature_block`]) of `file` (`size` bytes at `path`), read in pieces of whole blocks
/// of at most [`SIGNATURE_WINDOW`] bytes: blocks are signed independently, so the result is the
/// header followed by each piece's block entries, the same bytes as signing the file whole.
pub(crate) fn signature(file: &File, path: &Path, size: u64) -> Result<Vec<u8>> {
    let block = signature_block(size);
    let opts = fast_rsync::SignatureOptions {
        block_size: block,
        crypto_hash_size: 8,
    };
    let window = SIGNATURE_WINDOW - SIGNATURE_WINDOW % block as usize;
    let mut out = Vec::with_capacity(12 + (size / block as u64 + 1) as usize * 12);
    let mut buf = vec![0u8; (size as usize).min(window)];
    let mut off = 0u64;
    // Signed a few whole blocks at a time, so abandoned work stops within about a MiB.
    let step = (1usize << 20).div_ceil(block as usize) * block as usize;
    loop {
        crate::check_abandoned()?;
        let n = (size - off).min(window as u64) as usize;
        file.read_exact_at(&mut buf[..n], off)
            .map_err(crate::error::io("read the delta basis", path))?;
        // (An empty file still gets its header.)
        let empty = std::iter::once(&buf[..0]).filter(|_| n == 0);
        for (k, piece) in empty.chain(buf[..n].chunks(step)).enumerate() {
            crate::check_abandoned()?;
            let sig = fast_rsync::Signature::calculate(piece, opts).into_serialized();
            out.extend_from_slice(if off == 0 && k == 0 { &sig } else { &sig[12..] });
        }
        off += n as u64;
        if off >= size {
            return Ok(out);
        }
    }
}

/// The content of a file arriving as an rsync delta: the applier and the file it fills.
/// Made by [`Stage::begin_delta`](crate::Stage::begin_delta).
pub struct DeltaWriter {
    pub(crate) applier: DeltaApplier,
    pub(crate) file: FileWriter,
}

impl DeltaWriter {
    /// The plan index this delta builds.
    pub fn index(&self) -> usize {
        self.file.index()
    }

    /// Applies the next piece of the delta.
    ///
    /// # Errors
    /// As [`DeltaApplier::feed`], and an I/O error reading the basis or writing the file.
    pub fn feed(&mut self, data: &[u8]) -> Result<()> {
        let file = &mut self.file;
        self.applier.feed(data, &mut |b| file.write(b))
    }

    /// Checks that the delta is complete; the file is then checked by
    /// [`Stage::finish_file`](crate::Stage::finish_file).
    ///
    /// # Errors
    /// [`Error::Integrity`] if the delta is incomplete.
    pub fn finish(self) -> Result<FileWriter> {
        self.applier.finish()?;
        Ok(self.file)
    }
}

/// Largest zstd window a patch may claim (2^26 = 64 MiB): the decoder's buffer is that large
/// at most, whatever the frame says. Clients make patches of files up to 32 MiB only
/// (`flip_transfer`), whose window is at most 2^26 with an 8 MiB reference.
pub const PATCH_WINDOW_LOG_MAX: u32 = 26;

/// A zstd `--patch-from` frame decompressed as it arrives, against the basis it was made with,
/// handing its output to a sink in pieces of at most [`COPY_BUF`] bytes. The window is capped at
/// [`PATCH_WINDOW_LOG_MAX`] whatever the frame claims, so the decoder's memory is bounded; the
/// sink bounds the output (a [`FileWriter`] refuses more than the manifest size).
pub struct PatchDecoder {
    /// Taken from [`DCTX_POOL`] (or new), reset (forgetting the basis) and given back on drop,
    /// before `_basis` is dropped.
    dec: Option<zstd::zstd_safe::DCtx<'static>>,
    _basis: Basis,
    name: String,
    buf: Vec<u8>,
    ended: bool,
}

/// Decompression contexts of finished patches, reused by the next ones: a vendor upgrade
/// patches thousands of files, and creating a context for each cost more than many a small
/// file's decompression. At most [`DCTX_POOL_MAX`] are kept.
static DCTX_POOL: std::sync::Mutex<Vec<zstd::zstd_safe::DCtx<'static>>> =
    std::sync::Mutex::new(Vec::new());
const DCTX_POOL_MAX: usize = 16;

impl PatchDecoder {
    /// A decoder for a patch of the file `name` (for messages) made against `basis`.
    ///
    /// # Errors
    /// [`Error::Integrity`] when zstd cannot set up the decoder.
    pub fn new(basis: Vec<u8>, name: String) -> Result<Self> {
        Self::with_basis(Basis::Mem(basis), name, COPY_BUF as u64)
    }

    /// As [`PatchDecoder::new`], for an output of at most `out_len` bytes (its output buffer
    /// is no larger, from 4 KiB to [`COPY_BUF`]).
    pub(crate) fn with_basis(basis: Basis, name: String, out_len: u64) -> Result<Self> {
        use zstd::zstd_safe::{DCtx, DParameter};
        // SAFETY: the slice points into the basis' heap buffer or its read-only mapping, which
        // stay where they are when `Basis` moves and are never written; the context given it
        // is reset (forgetting it) in `drop`, before the basis is dropped, and never handed
        // out.
        let prefix: &'static [u8] =
            unsafe { std::slice::from_raw_parts(basis.as_ptr(), basis.len()) };
        let pooled = DCTX_POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut d = PatchDecoder {
            dec: pooled.or_else(DCtx::try_create),
            _basis: basis,
            name,
            buf: vec![0u8; out_len.clamp(4096, COPY_BUF as u64) as usize],
            ended: false,
        };
        let set = match d.dec.as_mut() {
            None => Err("no memory for a decoder"),
            Some(dec) => dec
                .set_parameter(DParameter::WindowLogMax(PATCH_WINDOW_LOG_MAX))
                .and_then(|_| dec.ref_prefix(prefix))
                .map(drop)
                .map_err(zstd::zstd_safe::get_error_name),
        };
        match set {
            Ok(()) => Ok(d),
            // `d` is dropped: its context reset, recycled.
            Err(e) => Err(d.bad(e.to_string())),
        }
    }

    /// Gives a context (reset) back to the pool.
    fn recycle(dec: Option<zstd::zstd_safe::DCtx<'static>>) {
        if let Some(dec) = dec {
            let mut pool = DCTX_POOL.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < DCTX_POOL_MAX {
                pool.push(dec);
            }
        }
    }

    fn bad(&self, detail: String) -> Error {
        Error::Integrity {
            path: self.name.clone(),
            detail: format!("patch cannot be applied: {detail}"),
        }
    }

    /// Decompresses the next piece of the patch, handing the output to `out`.
    ///
    /// # Errors
    /// [`Error::Integrity`] for a frame zstd refuses (corrupt, a window over the cap, made
    /// against another basis) or bytes after the frame's end; whatever `out` returns.
    pub fn feed(&mut self, data: &[u8], out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        use zstd::zstd_safe::{InBuffer, OutBuffer};
        let mut input = InBuffer::around(data);
        loop {
            if self.ended && input.pos() < data.len() {
                return Err(self.bad(format!("{} bytes after its end", data.len() - input.pos())));
            }
            let mut buf = OutBuffer::around(&mut self.buf[..]);
            let Some(dec) = self.dec.as_mut() else {
                return Err(self.bad("its decoder is gone".into()));
            };
            let hint = match dec.decompress_stream(&mut buf, &mut input) {
                Ok(h) => h,
                Err(c) => return Err(self.bad(zstd::zstd_safe::get_error_name(c).into())),
            };
            let n = buf.pos();
            if n > 0 {
                out(&self.buf[..n])?;
            }
            if hint == 0 {
                self.ended = true;
            }
            if input.pos() == data.len() && n < self.buf.len() {
                return Ok(());
            }
        }
    }

    /// Checks that the patch's frame is complete.
    ///
    /// # Errors
    /// [`Error::Integrity`] when the frame was cut short.
    pub fn finish(self) -> Result<()> {
        if !self.ended {
            return Err(self.bad("it ends inside its zstd frame (truncated)".into()));
        }
        Ok(())
    }
}

/// Resets the context in `dec` (which drops its reference to a basis) and takes it out; `None`
/// when there is none or it cannot be reset (then it is dropped, not reused).
fn reset_taken(
    dec: &mut Option<zstd::zstd_safe::DCtx<'static>>,
) -> Option<zstd::zstd_safe::DCtx<'static>> {
    let mut d = dec.take()?;
    d.reset(zstd::zstd_safe::ResetDirective::SessionAndParameters)
        .ok()?;
    Some(d)
}

impl Drop for PatchDecoder {
    fn drop(&mut self) {
        // Runs before the fields are dropped: the context forgets the basis first.
        Self::recycle(reset_taken(&mut self.dec));
    }
}

/// The content of a file arriving as a zstd `--patch-from` frame, decompressed as it arrives.
/// Made by [`Stage::begin_patch`](crate::Stage::begin_patch).
pub struct PatchWriter {
    decoder: PatchDecoder,
    file: FileWriter,
}

impl PatchWriter {
    pub(crate) fn new(basis: Basis, file: FileWriter, name: String) -> Result<Self> {
        Ok(PatchWriter {
            decoder: PatchDecoder::with_basis(basis, name, file.limit)?,
            file,
        })
    }

    /// The plan index this patch builds.
    pub fn index(&self) -> usize {
        self.file.index()
    }

    /// Decompresses the next piece of the patch into the file (refused past its size).
    ///
    /// # Errors
    /// [`Error::Integrity`] for a malformed frame, a window over the limit or output beyond the
    /// file's size; an I/O error writing.
    pub fn feed(&mut self, data: &[u8]) -> Result<()> {
        let file = &mut self.file;
        self.decoder.feed(data, &mut |b| file.write(b))
    }

    /// Checks that the patch's frame is complete.
    ///
    /// # Errors
    /// [`Error::Integrity`] if the frame is incomplete.
    pub fn finish(self) -> Result<FileWriter> {
        self.decoder.finish()?;
        Ok(self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A deterministic xorshift generator (no dependency needed).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn basis_file(data: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(data).unwrap();
        t.flush().unwrap();
        let f = crate::fsutil::open(t.path()).unwrap();
        (t, f)
    }

    /// Applies `delta` fed in pieces of random sizes.
    fn apply(basis: &[u8], delta: &[u8], limit: u64, rng: &mut Rng) -> Result<Vec<u8>> {
        let (t, f) = basis_file(basis);
        let mut a = DeltaApplier::new(f, basis.len() as u64, t.path().into(), "f".into(), limit);
        let mut out = Vec::new();
        let mut rest = delta;
        while !rest.is_empty() {
            let n = (1 + rng.below((rest.len() as u64).min(70_000))) as usize;
            a.feed(&rest[..n], &mut |b| {
                assert!(b.len() <= COPY_BUF);
                out.extend_from_slice(b);
                Ok(())
            })?;
            rest = &rest[n..];
        }
        let n = a.finish()?;
        assert_eq!(n, out.len() as u64);
        Ok(out)
    }

    fn rsync_delta(old: &[u8], new: &[u8], block: u32) -> Vec<u8> {
        let sig = fast_rsync::Signature::calculate(
            old,
            fast_rsync::SignatureOptions {
                block_size: block,
                crypto_hash_size: 8,
            },
        );
        let mut d = Vec::new();
        fast_rsync::diff(&sig.index(), new, &mut d).unwrap();
        d
    }

    #[test]
    fn round_trips_fast_rsync_deltas_fed_in_random_pieces() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..40 {
            let len = rng.below(if round % 8 == 0 { 3 << 20 } else { 200_000 }) as usize;
            let old = rng.bytes(len);
            let mut new = old.clone();
            // Edits: overwrites, insertions, deletions, appends.
            for _ in 0..rng.below(12) {
                let at = rng.below(new.len() as u64 + 1) as usize;
                let n = rng.below(5000) as usize;
                match rng.below(3) {
                    0 => {
                        let end = (at + n).min(new.len());
                        let b = rng.bytes(end - at);
                        new[at..end].copy_from_slice(&b);
                    }
                    1 => {
                        let b = rng.bytes(n);
                        new.splice(at..at, b);
                    }
                    _ => {
                        let end = (at + n).min(new.len());
                        new.drain(at..end);
                    }
                }
            }
            if round % 5 == 0 {
                new.extend(rng.bytes(100_000));
            }
            let block = [256, 1024, 2048][round % 3];
            let delta = rsync_delta(&old, &new, block);
            let mut want = Vec::new();
            fast_rsync::apply(&old, &delta, &mut want).unwrap();
            assert_eq!(want, new);
            let got = apply(&old, &delta, new.len() as u64, &mut rng).unwrap();
            assert!(got == new, "round {round}: streamed output differs");
        }
    }

    /// Builds a delta by hand: magic, then raw commands, then END.
    fn delta_of(cmds: &[&[u8]]) -> Vec<u8> {
        let mut d = DELTA_MAGIC.to_be_bytes().to_vec();
        for c in cmds {
            d.extend_from_slice(c);
        }
        d.push(OP_END);
        d
    }

    fn refused(basis: &[u8], delta: &[u8], limit: u64, words: &str) {
        let mut rng = Rng(7);
        let e = apply(basis, delta, limit, &mut rng).expect_err("must be refused");
        assert!(
            e.to_string().contains(words),
            "error {e:?} does not say {words:?}"
        );
    }

    #[test]
    fn a_signature_made_in_pieces_equals_the_whole_one() {
        let mut rng = Rng(11);
        for len in [
            0usize,
            1,
            5000,
            SIGNATURE_WINDOW - 1,
            SIGNATURE_WINDOW,
            2 * SIGNATURE_WINDOW + 12_345,
        ] {
            let data = rng.bytes(len);
            let (t, f) = basis_file(&data);
            let opts = fast_rsync::SignatureOptions {
                block_size: signature_block(len as u64),
                crypto_hash_size: 8,
            };
            let whole = fast_rsync::Signature::calculate(&data, opts).into_serialized();
            assert!(
                signature(&f, t.path(), len as u64).unwrap() == whole,
                "length {len}"
            );
        }
    }

    #[test]
    fn signatures_of_huge_files_stay_within_a_frame() {
        assert_eq!(signature_block(1 << 30), flip_plan::block_size(1 << 30));
        assert_eq!(signature_block(16 << 30), 16384);
        assert_eq!(signature_block(100 << 30), 128 << 10);
        assert_eq!(signature_block(1 << 40), 1 << 20);
        for size in [(16u64 << 30) + 1, 100 << 30, 1 << 40] {
            let blocks = size.div_ceil(signature_block(size) as u64);
            assert!(12 + blocks * 12 < 16 << 20, "{size}: {blocks} blocks");
        }
    }

    #[test]
    fn copies_and_every_literal_width_apply() {
        let basis: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let lit300: Vec<u8> = vec![7; 300];
        let mut n2 = vec![0x42, 0x01, 0x2c];
        n2.extend_from_slice(&lit300);
        let mut n8 = vec![0x44, 0, 0, 0, 0, 0, 0, 0, 2];
        n8.extend_from_slice(b"xy");
        let d = delta_of(&[
            b"\x03abc",
            &[0x41, 2, b'd', b'e'],
            &n2,
            &n8,
            &[0x45, 10, 5],                  // copy 1-byte offset, 1-byte length
            &[0x4a, 0x01, 0x00, 0x01, 0x00], // 2-byte offset 256, 2-byte length 256
            &[0x54, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3], // 8/8: offset 65536, len 3
        ]);
        let mut want = b"abcde".to_vec();
        want.extend_from_slice(&lit300);
        want.extend_from_slice(b"xy");
        want.extend_from_slice(&basis[10..15]);
        want.extend_from_slice(&basis[256..512]);
        want.extend_from_slice(&basis[65536..65539]);
        let mut rng = Rng(3);
        assert_eq!(
            apply(&basis, &d, want.len() as u64, &mut rng).unwrap(),
            want
        );
        let mut fr = Vec::new();
        fast_rsync::apply(&basis, &d, &mut fr).unwrap();
        assert_eq!(
            fr, want,
            "fast_rsync reads the hand-made delta the same way"
        );
    }

    #[test]
    fn output_beyond_the_limit_is_refused() {
        let basis = vec![1u8; 4096];
        refused(&basis, &delta_of(&[b"\x04abcd"]), 3, "beyond the 3 bytes");
        // A few bytes of COPY commands that would expand into gigabytes stop at the limit.
        // COPY with a 1-byte offset (0) and a 4-byte length (4096): 6 bytes each.
        let copy = [0x47u8, 0, 0, 0, 0x10, 0];
        let d = delta_of(&std::iter::repeat_n(&copy[..], 1_000_000).collect::<Vec<_>>());
        refused(&basis, &d, 1 << 20, "beyond the 1048576 bytes");
    }

    #[test]
    fn copies_outside_the_basis_are_refused() {
        let basis = vec![1u8; 100];
        refused(
            &basis,
            &delta_of(&[&[0x45, 90, 11]]),
            1000,
            "outside the basis",
        );
        refused(
            &basis,
            &delta_of(&[&[0x45, 100, 1]]),
            1000,
            "outside the basis",
        );
        let huge = [
            0x54u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 1,
        ];
        refused(&basis, &delta_of(&[&huge]), 1000, "outside the basis");
        refused(&basis, &delta_of(&[&[0x45, 0, 0]]), 1000, "length 0");
        refused(&basis, &delta_of(&[&[0x41, 0]]), 1000, "length 0");
    }

    #[test]
    fn truncated_trailing_unknown_and_foreign_input_is_refused() {
        let basis = vec![1u8; 100];
        let good = delta_of(&[b"\x02ab", &[0x45, 0, 5]]);
        for cut in 0..good.len() {
            refused(&basis, &good[..cut], 1000, "truncated");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        refused(&basis, &trailing, 1000, "after its end");
        refused(&basis, &delta_of(&[&[0x55]]), 1000, "unknown command 0x55");
        refused(&basis, &delta_of(&[&[0xff]]), 1000, "unknown command 0xff");
        let mut sig_magic = good.clone();
        sig_magic[..4].copy_from_slice(&0x7273_0136u32.to_be_bytes());
        refused(&basis, &sig_magic, 1000, "wrong magic");
    }

    #[test]
    fn a_basis_shorter_than_claimed_is_named() {
        let basis = vec![1u8; 100];
        let (t, f) = basis_file(&basis);
        let mut a = DeltaApplier::new(f, 1000, t.path().into(), "f".into(), 1000);
        let d = delta_of(&[&[0x4a, 0, 50, 0x01, 0x00]]);
        let e = a.feed(&d, &mut |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("shorter than its manifest"), "{e}");
    }

    fn zstd_patch(old: &[u8], new: &[u8]) -> Vec<u8> {
        // As the client makes them: a window over the reference, long-distance matching.
        let mut enc = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), 9, old).unwrap();
        enc.window_log(20).unwrap();
        enc.long_distance_matching(true).unwrap();
        enc.write_all(new).unwrap();
        enc.finish().unwrap()
    }

    fn decode(basis: &[u8], patch: &[u8], piece: usize) -> Result<Vec<u8>> {
        let mut d = PatchDecoder::with_basis(Basis::Mem(basis.to_vec()), "f".into(), 100)?;
        let mut out = Vec::new();
        for p in patch.chunks(piece) {
            d.feed(p, &mut |b| {
                out.extend_from_slice(b);
                Ok(())
            })?;
        }
        d.finish()?;
        Ok(out)
    }

    /// Decoders reuse pooled contexts: patch after patch (a corrupt one and one of another
    /// basis among them) each decodes to exactly its file, with an output buffer smaller than
    /// the output, and nothing of one (its basis, its error) carries over to the next.
    #[test]
    fn pooled_patch_decoders_carry_nothing_from_one_patch_to_the_next() {
        let mut rng = Rng(7);
        for round in 0..20 {
            let len = 500 + (rng.next() % 20_000) as usize;
            let old: Vec<u8> = (0..len).map(|_| (rng.next() % 7) as u8 + b'a').collect();
            let mut new = old.clone();
            new.splice(len / 3..len / 3, format!("round {round}").bytes());
            let patch = zstd_patch(&old, &new);
            assert_eq!(
                decode(&old, &patch, 1 + round * 37).unwrap(),
                new,
                "round {round}"
            );
            let mut bad = patch.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 0xff;
            // Corrupt: refused or decodes to something else (the file's blake3 catches it).
            assert_ne!(decode(&old, &bad, 64).ok(), Some(new.clone()));
            let other: Vec<u8> = old.iter().rev().copied().collect();
            assert_ne!(decode(&other, &patch, 64).ok(), Some(new.clone()));
        }
        assert!(
            !DCTX_POOL.lock().unwrap().is_empty(),
            "contexts are given back"
        );
    }
}
