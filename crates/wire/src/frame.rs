//! Length-prefixed bincode frames over any byte stream, optionally inside a zstd stream.

use crate::adapt::AdaptiveLevel;
use crate::{WireError, MAX_FRAME};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Counts the bytes that cross a stream (the raw, possibly compressed, bytes).
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Bytes counted so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
}

struct Counted<T> {
    inner: T,
    counter: Counter,
    /// Nanoseconds spent inside the inner writer's `write` and `flush` (blocked on the
    /// transport); unused for reading.
    blocked: Counter,
    /// Bytes to write before anything else (the plain frames buffered when compression
    /// started): they leave with the first compressed bytes, not on their own.
    pending: Vec<u8>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.add(n);
        Ok(n)
    }
}

impl<W: Write> Counted<W> {
    /// Writes the pending bytes, then `buf` whole, in one write to the inner writer.
    fn write_pending(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut all = std::mem::take(&mut self.pending);
        all.extend_from_slice(buf);
        let t = Instant::now();
        let r = self.inner.write_all(&all);
        self.blocked.add(t.elapsed().as_nanos() as usize);
        r?;
        self.counter.add(all.len());
        Ok(())
    }
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.pending.is_empty() {
            self.write_pending(buf)?;
            return Ok(buf.len());
        }
        let t = Instant::now();
        let r = self.inner.write(buf);
        self.blocked.add(t.elapsed().as_nanos() as usize);
        let n = r?;
        self.counter.add(n);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.write_pending(&[])?;
        }
        let t = Instant::now();
        let r = self.inner.flush();
        self.blocked.add(t.elapsed().as_nanos() as usize);
        r
    }
}

type RawReader = BufReader<Counted<Box<dyn Read + Send>>>;
type RawWriter = Counted<Box<dyn Write + Send>>;

enum ReadSide {
    Plain(RawReader),
    Zstd(Box<zstd::stream::read::Decoder<'static, RawReader>>),
    Switching,
}

/// Reads frames.
pub struct FrameReader {
    side: ReadSide,
    counter: Counter,
    buf: Vec<u8>,
}

impl FrameReader {
    /// Reads plain frames from `inner` until [`FrameReader::start_decompression`].
    pub fn new(inner: Box<dyn Read + Send>) -> Self {
        let counter = Counter::default();
        let counted = Counted {
            inner,
            counter: counter.clone(),
            blocked: Counter::default(),
            pending: Vec::new(),
        };
        FrameReader {
            side: ReadSide::Plain(BufReader::with_capacity(256 * 1024, counted)),
            counter,
            buf: Vec::new(),
        }
    }

    /// Whether bytes read from the transport wait in this reader's buffer, not decoded yet
    /// (what zstd holds already decoded is not seen).
    pub fn buffered(&self) -> bool {
        match &self.side {
            ReadSide::Plain(r) => !r.buffer().is_empty(),
            ReadSide::Zstd(d) => !d.get_ref().buffer().is_empty(),
            ReadSide::Switching => false,
        }
    }

    /// Raw bytes read so far.
    pub fn counter(&self) -> Counter {
        self.counter.clone()
    }

    /// From now on the peer's bytes are one zstd stream.
    ///
    /// # Errors
    /// [`WireError::Io`] if the zstd decoder cannot be set up.
    pub fn start_decompression(&mut self) -> Result<(), WireError> {
        if let ReadSide::Plain(r) = std::mem::replace(&mut self.side, ReadSide::Switching) {
            let mut d = zstd::stream::read::Decoder::with_buffer(r)?;
            // The peer's window (its memory claim on us) is bounded by one frame's worth:
            // zstd level 19 needs 8 MiB.
            d.window_log_max(25)?;
            self.side = ReadSide::Zstd(Box::new(d));
        }
        Ok(())
    }

    fn reader(&mut self) -> &mut dyn Read {
        match &mut self.side {
            ReadSide::Plain(r) => r,
            ReadSide::Zstd(d) => d.as_mut(),
            ReadSide::Switching => unreachable!("reader used while switching"),
        }
    }

    /// Reads one frame; `Err(Closed)` on a clean end of stream between frames.
    ///
    /// # Errors
    /// [`WireError::Closed`] at a clean end of stream, [`WireError::Io`] for a failed read or
    /// an end inside a frame, [`WireError::TooLarge`] for a length over [`MAX_FRAME`],
    /// [`WireError::Decode`] for a payload that is not exactly one `T`.
    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<T, WireError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.reader().read(&mut len[got..]) {
                Ok(0) if got == 0 => return Err(WireError::Closed),
                // The peer went away mid-frame (killed while it wrote): a broken
                // connection, not a garbled one.
                Ok(0) => return Err(cut("the stream ends inside a frame header")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(len, 0);
        let r = self.reader().read_exact(&mut buf);
        if let Err(e) = r {
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                cut("the stream ends inside a frame")
            } else {
                e.into()
            });
        }
        let out = decode(&buf);
        // Keep a modest buffer for the next frame; give back huge ones.
        if buf.capacity() <= 8 << 20 {
            self.buf = buf;
        }
        out
    }
}

/// Decodes one frame payload, which must be consumed entirely.
pub(crate) fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    crate::bounded::reset();
    let (msg, used): (T, usize) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| WireError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(WireError::Decode(format!(
            "{} trailing bytes after the message",
            payload.len() - used
        )));
    }
    Ok(msg)
}

/// Plain frames are gathered up to this many bytes per write to the transport: a first deploy
/// of small files sent one write (and, at the agent, one read and one poll) per file otherwise.
const PLAIN_BUFFER: usize = 256 * 1024;

type Encoder = zstd::stream::write::Encoder<'static, RawWriter>;

/// Input bytes per zstd job when compressing on several threads
/// ([`FrameWriter::set_workers`]).
pub(crate) const JOB_SIZE: u32 = 2 << 20;

enum WriteSide {
    Plain(BufWriter<RawWriter>),
    Zstd(Box<Encoder>),
    Switching,
}

/// Writes frames. Nothing is guaranteed to leave before [`flush`](Self::flush).
pub struct FrameWriter {
    side: WriteSide,
    counter: Counter,
    /// Nanoseconds blocked writing to the transport.
    blocked: Counter,
    /// The level controller, when compression is adaptive.
    adapt: Option<AdaptiveLevel>,
    /// When the last send or flush returned (adaptive compression only).
    returned: Option<Instant>,
    /// The zstd level in use (0: none).
    level: i32,
    /// zstd worker threads (0: compress on the caller's thread).
    workers: u32,
    buf: Vec<u8>,
}

impl FrameWriter {
    /// Writes plain frames to `inner` until [`FrameWriter::start_compression`].
    pub fn new(inner: Box<dyn Write + Send>) -> Self {
        let counter = Counter::default();
        let blocked = Counter::default();
        FrameWriter {
            side: WriteSide::Plain(BufWriter::with_capacity(
                PLAIN_BUFFER,
                Counted {
                    inner,
                    counter: counter.clone(),
                    blocked: blocked.clone(),
                    pending: Vec::new(),
                },
            )),
            counter,
            blocked,
            adapt: None,
            returned: None,
            level: 0,
            workers: 0,
            buf: Vec::new(),
        }
    }

    /// Compresses on `workers` threads of zstd's own (0 or 1: on the caller's thread), from
    /// [`FrameWriter::start_compression`] on; call it before. zstd cuts the stream into jobs of
    /// 2 MiB, each compressed with the previous job's tail as its history, so the bytes differ
    /// a little from a one-thread stream's but read the same. An adaptive stream uses them only
    /// at the start level and below, where the link is fast and compression is what the
    /// deploy waits on (a level change there applies from the next job on, within the frame,
    /// as `zstd --adapt` does); above it, the link is the bottleneck and the stream goes on in
    /// a frame of one thread: on a 2-core machine that also runs the server, harder levels on
    /// every core left too little to the rest and slowed a first deploy at 10 MB/s by ~10%
    /// (measured).
    pub fn set_workers(&mut self, workers: u32) {
        self.workers = if workers > 1 { workers } else { 0 };
    }

    /// Whether a stream at `level` runs on this writer's workers.
    fn threaded(&self, level: i32) -> bool {
        self.workers > 0 && (self.adapt.is_none() || level <= crate::adapt::START_LEVEL)
    }

    /// A zstd encoder at `level` over `w`, on this writer's workers if
    /// [`threaded`](Self::threaded). A zstd that cannot start its workers leaves this writer
    /// on one thread from then on.
    fn encoder(&mut self, w: RawWriter, level: i32) -> io::Result<Encoder> {
        let mut e = zstd::stream::write::Encoder::new(w, level)?;
        if self.threaded(level) {
            let threads = e
                .multithread(self.workers)
                .and_then(|()| e.set_parameter(zstd::zstd_safe::CParameter::JobSize(JOB_SIZE)));
            if threads.is_err() {
                // Nothing is compressed yet: the encoder goes on as it was made.
                let _ = e.multithread(0);
                self.workers = 0;
            }
        }
        Ok(e)
    }

    /// Raw bytes written so far.
    pub fn counter(&self) -> Counter {
        self.counter.clone()
    }

    /// From now on everything written is zstd at `level` (1–19), or, with
    /// [`ADAPTIVE`](crate::ADAPTIVE), at a level chosen from the link
    /// ([`AdaptiveLevel`]: measured per window of input, each change starting a new zstd frame,
    /// which a [`FrameReader`] reads on transparently).
    ///
    /// # Errors
    /// [`WireError::Io`] if the zstd encoder cannot be set up.
    pub fn start_compression(&mut self, level: i32) -> Result<(), WireError> {
        let level = if level == crate::ADAPTIVE {
            let a = AdaptiveLevel::default();
            let l = a.level();
            self.adapt = Some(a);
            l
        } else {
            level
        };
        if let WriteSide::Plain(w) = std::mem::replace(&mut self.side, WriteSide::Switching) {
            // What was written plain goes first; the encoder buffers its own output.
            // What was written plain is not flushed on its own: it leaves with the first
            // compressed bytes (a client's first batch in one piece: see `flip_transport`'s
            // preamble).
            let (mut w, buffered) = w.into_parts();
            w.pending = buffered.unwrap_or_else(|p| p.into_inner());
            let e = self.encoder(w, level)?;
            self.side = WriteSide::Zstd(Box::new(e));
            self.level = level;
        }
        Ok(())
    }

    /// The zstd level in use now (0: none); with adaptive compression it moves.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Tells the adaptive controller (if any) what writing `input` bytes cost since `started`
    /// (when `blocked_before` ns had been spent blocked), and applies a new level: the current
    /// zstd frame is ended and a new one begins at that level.
    fn adapt(
        &mut self,
        input: usize,
        started: Instant,
        (blocked_before, out_before): (u64, u64),
    ) -> io::Result<()> {
        let Some(a) = &mut self.adapt else {
            return Ok(());
        };
        let blocked = Duration::from_nanos(self.blocked.get().saturating_sub(blocked_before));
        let compressing = started.elapsed().saturating_sub(blocked);
        // Time since the writer last returned: spent waiting for something to write.
        let waiting = self
            .returned
            .map_or(Duration::ZERO, |r| started.saturating_duration_since(r));
        self.returned = Some(Instant::now());
        let output = self.counter.get().saturating_sub(out_before);
        match a.record(input as u64, output, compressing, blocked, waiting) {
            Some(level) => self.switch_level(level),
            None => Ok(()),
        }
    }

    /// Compresses at `level` from now on: on workers at both levels, from the next job on in
    /// the same frame (the controller waits for the jobs in flight); otherwise the current
    /// zstd frame is ended and a new one begins.
    fn switch_level(&mut self, level: i32) -> io::Result<()> {
        if self.threaded(self.level) && self.threaded(level) {
            if let WriteSide::Zstd(e) = &mut self.side {
                e.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))?;
                self.level = level;
                if let Some(a) = &mut self.adapt {
                    // The jobs in flight on the workers and the one being filled.
                    a.settle(u64::from(JOB_SIZE) * (u64::from(self.workers) + 1));
                }
            }
            return Ok(());
        }
        if let WriteSide::Zstd(e) = std::mem::replace(&mut self.side, WriteSide::Switching) {
            let w = e.finish()?;
            self.side = WriteSide::Zstd(Box::new(self.encoder(w, level)?));
            self.level = level;
        }
        Ok(())
    }

    fn writer(&mut self) -> &mut dyn Write {
        match &mut self.side {
            WriteSide::Plain(w) => w,
            WriteSide::Zstd(e) => e.as_mut(),
            WriteSide::Switching => unreachable!("writer used while switching"),
        }
    }

    /// Sends one frame (buffered: see [`FrameWriter::flush`]).
    ///
    /// # Errors
    /// [`WireError::Decode`] or [`WireError::TooLarge`] if `msg` does not encode within
    /// [`MAX_FRAME`] bytes (nothing is sent), [`WireError::Io`] if writing fails.
    pub fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), WireError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(&[0; 4]);
        bincode::serde::encode_into_std_write(msg, &mut buf, config())
            .map_err(|e| WireError::Decode(e.to_string()))?;
        let len = buf.len() - 4;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
        let (started, before) = (Instant::now(), (self.blocked.get(), self.counter.get()));
        let r = self.writer().write_all(&buf);
        let n = buf.len();
        if buf.capacity() <= 8 << 20 {
            self.buf = buf;
        }
        r?;
        Ok(self.adapt(n, started, before)?)
    }

    /// Pushes everything sent so far to the peer (ends a zstd block).
    ///
    /// # Errors
    /// [`WireError::Io`] if writing fails.
    pub fn flush(&mut self) -> Result<(), WireError> {
        let (started, before) = (Instant::now(), (self.blocked.get(), self.counter.get()));
        self.writer().flush()?;
        Ok(self.adapt(0, started, before)?)
    }

    /// Ends the stream cleanly (finishes the zstd frame) and closes the underlying writer.
    ///
    /// # Errors
    /// [`WireError::Io`] if writing fails.
    pub fn finish(self) -> Result<(), WireError> {
        match self.side {
            WriteSide::Plain(mut w) => w.flush()?,
            WriteSide::Zstd(e) => {
                let mut w = e.finish()?;
                w.flush()?;
            }
            WriteSide::Switching => {}
        }
        Ok(())
    }
}

/// The error of a stream that ends inside a frame: [`WireError::Io`] (`UnexpectedEof`).
fn cut(what: &str) -> WireError {
    WireError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, Response, CHUNK};

    use flip_testkit::Writes;

    /// The plain `Hello` does not leave when compression starts: it goes with what follows,
    /// in one write at the first flush (a client's first batch in one piece).
    #[test]
    fn plain_frames_leave_with_the_first_compressed_ones() {
        let writes = Writes::default();
        let mut w = FrameWriter::new(Box::new(writes.clone()));
        w.send(&Request::Bye).unwrap();
        w.start_compression(3).unwrap();
        w.send(&Request::Status).unwrap();
        assert!(
            writes.0.lock().unwrap().is_empty(),
            "written before the flush"
        );
        w.flush().unwrap();
        let all = writes.0.lock().unwrap().clone();
        assert_eq!(all.len(), 1, "{all:?}");
        let plain = 4 + 1; // the length, then Bye's tag
        assert_eq!(&all[0][..4], &[1, 0, 0, 0]);
        // zstd's frame magic right after the plain frame.
        assert_eq!(&all[0][plain..plain + 4], &[0x28, 0xb5, 0x2f, 0xfd]);
        assert_eq!(w.counter().get(), all[0].len() as u64);
    }

    struct Pipe(std::sync::mpsc::Receiver<Vec<u8>>, Vec<u8>, usize);
    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.2 == self.1.len() {
                match self.0.recv() {
                    Ok(v) => {
                        self.1 = v;
                        self.2 = 0;
                    }
                    Err(_) => return Ok(0),
                }
            }
            let n = buf.len().min(self.1.len() - self.2);
            buf[..n].copy_from_slice(&self.1[self.2..self.2 + n]);
            self.2 += n;
            Ok(n)
        }
    }
    struct Tx(std::sync::mpsc::Sender<Vec<u8>>);
    impl Write for Tx {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn pair() -> (FrameWriter, FrameReader) {
        let (tx, rx) = std::sync::mpsc::channel();
        (
            FrameWriter::new(Box::new(Tx(tx))),
            FrameReader::new(Box::new(Pipe(rx, Vec::new(), 0))),
        )
    }

    #[test]
    fn plain_then_compressed() {
        let (mut w, mut r) = pair();
        let hello = Request::Hello {
            magic: crate::MAGIC,
            protocol: crate::PROTOCOL,
            version: "1".into(),
            compress: 3,
        };
        w.send(&hello).unwrap();
        w.flush().unwrap();
        assert_eq!(r.recv::<Request>().unwrap(), hello);
        w.start_compression(3).unwrap();
        r.start_decompression().unwrap();
        let data = b"<?php echo 'hello';\n".repeat(10_000);
        let msg = Request::Literal {
            index: 7,
            mtime: Some((1, 2)),
            data: data.clone(),
            last: true,
        };
        w.send(&msg).unwrap();
        w.flush().unwrap();
        // Readable after a flush, before the stream is finished.
        assert_eq!(r.recv::<Request>().unwrap(), msg);
        w.send(&Request::Bye).unwrap();
        w.finish().unwrap();
        assert_eq!(r.recv::<Request>().unwrap(), Request::Bye);
        assert!(matches!(r.recv::<Request>(), Err(WireError::Closed)));
        assert!(r.counter().get() < data.len() as u64 / 20);
        const { assert!(CHUNK < MAX_FRAME) };
    }

    /// Plain frames leave in one write at the flush, not one each; one sent without a flush
    /// before compression starts still goes first, plain.
    #[test]
    fn plain_frames_are_gathered_and_go_out_before_compression_starts() {
        use std::sync::atomic::AtomicUsize;
        struct Writes(Tx, Arc<AtomicUsize>);
        impl Write for Writes {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.1.fetch_add(1, Ordering::SeqCst);
                self.0.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let writes = Arc::new(AtomicUsize::new(0));
        let mut w = FrameWriter::new(Box::new(Writes(Tx(tx), writes.clone())));
        let mut r = FrameReader::new(Box::new(Pipe(rx, Vec::new(), 0)));
        for _ in 0..100 {
            w.send(&Request::Status).unwrap();
        }
        assert_eq!(writes.load(Ordering::SeqCst), 0, "held until the flush");
        w.flush().unwrap();
        assert_eq!(writes.load(Ordering::SeqCst), 1, "one write for the batch");
        for _ in 0..100 {
            assert_eq!(r.recv::<Request>().unwrap(), Request::Status);
        }
        let plain = Request::GetManifest { id: 4 };
        w.send(&plain).unwrap();
        w.start_compression(3).unwrap();
        w.send(&Request::Bye).unwrap();
        w.finish().unwrap();
        assert_eq!(r.recv::<Request>().unwrap(), plain);
        r.start_decompression().unwrap();
        assert_eq!(r.recv::<Request>().unwrap(), Request::Bye);
    }

    #[test]
    fn a_level_change_mid_stream_is_read_transparently() {
        let (mut w, mut r) = pair();
        w.start_compression(crate::ADAPTIVE).unwrap();
        r.start_decompression().unwrap();
        assert_eq!(w.level(), crate::adapt::START_LEVEL);
        let msg = |i: u32| Request::Literal {
            index: i,
            mtime: None,
            data: format!("<?php // file {i}\n").repeat(5_000).into_bytes(),
            last: true,
        };
        for (i, level) in [(0, 9), (1, 1), (2, 5)] {
            w.send(&msg(i)).unwrap();
            w.switch_level(level).unwrap();
            assert_eq!(w.level(), level);
        }
        w.send(&msg(3)).unwrap();
        w.flush().unwrap();
        for i in 0..4 {
            assert_eq!(r.recv::<Request>().unwrap(), msg(i));
        }
        w.finish().unwrap();
        assert!(matches!(r.recv::<Request>(), Err(WireError::Closed)));
    }

    /// On worker threads, level changes up to the start level stay inside one zstd frame (a
    /// one-thread writer starts a frame per change), one above it starts a frame of one
    /// thread, and a stream of several jobs reads back whole.
    #[test]
    fn on_workers_a_level_change_stays_in_the_frame_and_reads_back() {
        struct Keep(Tx, Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Keep {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if let Ok(mut raw) = self.1.lock() {
                    raw.extend_from_slice(buf);
                }
                self.0.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let msg = |i: u32| Request::Literal {
            index: i,
            mtime: None,
            data: (0..4_000u32)
                .flat_map(|n| {
                    format!("$v{} = {};\n", n % 97, n.wrapping_mul(2_654_435_761) ^ i).into_bytes()
                })
                .collect(),
            last: true,
        };
        let frames = |workers: u32| {
            let (tx, rx) = std::sync::mpsc::channel();
            let raw = Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut w = FrameWriter::new(Box::new(Keep(Tx(tx), raw.clone())));
            let mut r = FrameReader::new(Box::new(Pipe(rx, Vec::new(), 0)));
            w.set_workers(workers);
            w.start_compression(crate::ADAPTIVE).unwrap();
            r.start_decompression().unwrap();
            // Over 6 MiB: several jobs of JOB_SIZE.
            for i in 0..80 {
                w.send(&msg(i)).unwrap();
                if i % 20 == 19 {
                    w.switch_level([2, 1, 3, 9][i as usize / 20]).unwrap();
                }
            }
            w.flush().unwrap();
            for i in 0..80 {
                assert_eq!(r.recv::<Request>().unwrap(), msg(i), "message {i}");
            }
            w.finish().unwrap();
            assert!(matches!(r.recv::<Request>(), Err(WireError::Closed)));
            let raw = raw.lock().unwrap();
            let magic = 0xFD2F_B528u32.to_le_bytes();
            raw.windows(4).filter(|w| *w == magic).count()
        };
        // 3 → 2 → 1 → 3 in the first frame, 9 (above the start level) in a second.
        assert_eq!(frames(2), 2);
        assert_eq!(frames(1), 5);
    }

    #[test]
    fn rejects_oversized_and_garbage_frames() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut r = FrameReader::new(Box::new(Pipe(rx, Vec::new(), 0)));
        tx.send(u32::MAX.to_le_bytes().to_vec()).unwrap();
        assert!(matches!(r.recv::<Response>(), Err(WireError::TooLarge(_))));

        let (tx, rx) = std::sync::mpsc::channel();
        let mut r = FrameReader::new(Box::new(Pipe(rx, Vec::new(), 0)));
        // A frame claiming a vector of 2^60 elements inside 12 bytes.
        let mut f = 12u32.to_le_bytes().to_vec();
        f.extend_from_slice(&[8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0]);
        tx.send(f).unwrap();
        assert!(matches!(r.recv::<Request>(), Err(WireError::Decode(_))));

        let (tx, rx) = std::sync::mpsc::channel();
        let mut r = FrameReader::new(Box::new(Pipe(rx, Vec::new(), 0)));
        // A stream that ends inside a frame: the peer went away mid-write (a broken
        // connection, which an agent does not report as garbage).
        tx.send(vec![10, 0, 0, 0, 1, 2]).unwrap();
        drop(tx);
        assert!(matches!(
            r.recv::<Request>(),
            Err(WireError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof
        ));
    }

    #[test]
    fn a_huge_zstd_window_is_refused() {
        // A peer whose stream claims a 128 MiB window would make us reserve that much.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.window_log(27).unwrap();
        enc.write_all(&[0u8; 16]).unwrap();
        let bytes = enc.finish().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut r = FrameReader::new(Box::new(Pipe(rx, Vec::new(), 0)));
        r.start_decompression().unwrap();
        tx.send(bytes).unwrap();
        drop(tx);
        assert!(matches!(r.recv::<Request>(), Err(WireError::Io(_))));
    }

    #[test]
    fn a_frame_of_tiny_list_elements_cannot_take_more_than_a_frame_of_memory() {
        // One million one-byte paths: under 5 MB of frame, ~60 MB of slots and shared paths.
        let names: Vec<String> = (0..1_000_000u32)
            .map(|i| format!("{}", (b'a' + (i % 26) as u8) as char))
            .collect();
        let items: Vec<crate::SigItem> = names
            .iter()
            .enumerate()
            .map(|(i, n)| crate::SigItem {
                index: i as u32,
                basis: flip_manifest::RelPath::new(n.as_str()).unwrap(),
            })
            .collect();
        let bytes = bincode::serde::encode_to_vec(Request::Signatures(items), config()).unwrap();
        assert!(bytes.len() < MAX_FRAME / 4, "{}", bytes.len());
        match decode::<Request>(&bytes) {
            Err(WireError::Decode(m)) => assert!(m.contains("bytes of memory"), "{m}"),
            other => panic!("decoded: {:?}", other.map(|_| ())),
        }
        // A list claiming 2^40 elements is refused before anything is reserved.
        let mut huge = vec![];
        huge.extend_from_slice(
            &bincode::serde::encode_to_vec(Request::Signatures(vec![]), config()).unwrap(),
        );
        huge.pop(); // the empty list's length
        huge.extend_from_slice(&[253, 0, 0, 0, 0, 0, 1, 0, 0]); // varint u64 2^40
        assert!(decode::<Request>(&huge).is_err());
        // A real request of 100,000 items of real path lengths decodes, and so does the next
        // frame (the budget is per frame).
        let real: Vec<crate::SigItem> = (0..100_000u32)
            .map(|i| crate::SigItem {
                index: i,
                basis: flip_manifest::RelPath::new(format!(
                    "vendor/pkg{}/src/File{i}.php",
                    i % 100
                ))
                .unwrap(),
            })
            .collect();
        let bytes =
            bincode::serde::encode_to_vec(Request::Signatures(real.clone()), config()).unwrap();
        for _ in 0..2 {
            assert_eq!(
                decode::<Request>(&bytes).unwrap(),
                Request::Signatures(real.clone())
            );
        }
    }

    #[test]
    fn hostile_paths_do_not_decode() {
        let good = Request::Signatures(vec![crate::SigItem {
            index: 1,
            basis: flip_manifest::RelPath::new("aa/b").unwrap(),
        }]);
        let mut bytes = bincode::serde::encode_to_vec(&good, config()).unwrap();
        let pos = bytes.windows(4).position(|w| w == b"aa/b").unwrap();
        bytes[pos..pos + 4].copy_from_slice(b"../b");
        assert!(decode::<Request>(&bytes).is_err());
    }
}
