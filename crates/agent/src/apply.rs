//! Writing files in parallel: the session loop reads content frames in order and hands each file
//! to one of a few writer threads, which create, fill (literal bytes, rsync delta or zstd
//! patch), check (size, blake3) and close it through the shared [`Stage`].
//!
//! - Memory is bounded by bytes: every chunk (plus a fixed overhead per message) and the working
//!   memory of a file being patched count against [`IN_FLIGHT`] until a writer is done with
//!   them; the session waits for room before it reads on.
//! - The chunks of one file go to one writer, in order; files are spread over the writers.
//! - Errors are reported as the sequential agent would: when any file fails, the writers skip
//!   files that came after it, every file before it is finished, and the failure of the first
//!   failing file (in the order the files arrived) is the one reported ([`Pool::settle`]).

use flip_manifest::{Digest, RelPath};
use flip_release::{DeltaWriter, Error as RelError, FileWriter, PatchWriter, Stage};
use flip_wire::Mtime;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Bytes of content (and of patch working memory) handed to the writers and not yet written.
pub(crate) const IN_FLIGHT: u64 = 64 << 20;

/// What each queued message counts for beyond its data (so thousands of tiny files queue in
/// bounded memory too).
const MSG_OVERHEAD: u64 = 1024;

/// How a file's content arrives.
pub(crate) enum How {
    Literal,
    /// An rsync delta against this basis.
    Delta(RelPath),
    /// A zstd `--patch-from` frame against this basis, whose content has this digest.
    Patch(RelPath, Digest),
    /// A file streamed before the manifest: its path and mode.
    Stream(RelPath, u32),
}

enum Msg {
    Start {
        seq: u64,
        index: usize,
        how: How,
        stage: Arc<Stage<'static>>,
        /// Working memory held (in the budget) until the file is done.
        weight: u64,
    },
    Chunk {
        seq: u64,
        data: Vec<u8>,
        last: bool,
        mtime: Mtime,
    },
    /// The session gives up on the open file `seq` (it failed elsewhere): report whether it
    /// had failed already, and drop it.
    Abandon { seq: u64 },
    /// A file whose content is one chunk: `Start` and its last `Chunk` in one message (one
    /// wake-up of the writer per small file).
    Whole {
        seq: u64,
        index: usize,
        how: How,
        stage: Arc<Stage<'static>>,
        data: Vec<u8>,
        mtime: Mtime,
    },
}

/// The bytes in flight, and a wait for room.
struct Budget {
    used: Mutex<u64>,
    /// The session waits for room (only then does a release wake it: no system call per chunk).
    waiting: std::sync::atomic::AtomicBool,
    room: Condvar,
    /// Set when a writer died: nobody waits for room any more.
    broken: std::sync::atomic::AtomicBool,
}

impl Budget {
    /// Waits until `n` more bytes fit beside what is in flight, not counting `exempt` bytes
    /// held by the open file itself (whose chunks can only be written after they are sent), or
    /// until nothing else is in flight; then counts them.
    fn acquire(&self, n: u64, exempt: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while must_wait(*used, n, exempt) && !self.broken.load(Ordering::SeqCst) {
            self.waiting.store(true, Ordering::SeqCst);
            used = self.room.wait(used).unwrap_or_else(|e| e.into_inner());
            self.waiting.store(false, Ordering::SeqCst);
        }
        *used += n;
    }

    fn break_open(&self) {
        self.broken.store(true, Ordering::SeqCst);
        let _used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        self.room.notify_all();
    }

    fn release(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(n);
        // Set under the lock by the one waiter before it sleeps: never missed.
        if self.waiting.load(Ordering::SeqCst) {
            self.room.notify_all();
        }
    }
}

/// Whether `n` more bytes must wait, with `used` in flight of which `exempt` are the open
/// file's own working memory: they must while what is in flight beside the open file, plus
/// them, exceeds [`IN_FLIGHT`] — unless only the open file holds anything (then its next chunk
/// always goes, so a file whose working memory alone exceeds the budget still progresses).
fn must_wait(used: u64, n: u64, exempt: u64) -> bool {
    used > exempt && used.saturating_sub(exempt) + n > IN_FLIGHT
}

struct Shared {
    budget: Budget,
    /// The sequence number of the first file known to have failed (`u64::MAX`: none); writers
    /// skip files after it.
    stop_after: AtomicU64,
}

/// One file's outcome: `Ok` when written (or skipped, or abandoned without failing); `None`
/// when a writer thread died (a bug): then files it held never finish.
type Done = Option<(u64, Result<(), RelError>)>;

struct Worker {
    tx: Option<Sender<Msg>>,
    /// Messages queued and not yet handled.
    queued: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// The open file: the one whose chunks are arriving.
struct Open {
    seq: u64,
    worker: usize,
    weight: u64,
}

/// The writer threads of one session.
pub(crate) struct Pool {
    workers: Vec<Worker>,
    shared: Arc<Shared>,
    results: Receiver<Done>,
    next_seq: u64,
    open: Option<Open>,
    /// Files started and not yet done.
    outstanding: usize,
    /// Failures received, by sequence number.
    failed: BTreeMap<u64, RelError>,
    /// A writer thread died.
    broken: bool,
}

impl Pool {
    /// Starts `threads` writers (at least one).
    pub(crate) fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            budget: Budget {
                used: Mutex::new(0),
                waiting: Default::default(),
                room: Condvar::new(),
                broken: Default::default(),
            },
            stop_after: AtomicU64::new(u64::MAX),
        });
        let (done_tx, results) = channel();
        let workers = (0..threads.max(1))
            .map(|_| {
                let (tx, rx) = channel();
                let queued = Arc::new(AtomicUsize::new(0));
                let (shared, done, q) = (shared.clone(), done_tx.clone(), queued.clone());
                let thread = std::thread::Builder::new()
                    .name("flip-writer".into())
                    .spawn(move || {
                        let run = || work(rx, &shared, &done, &q);
                        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).is_err() {
                            shared.stop_after.store(0, Ordering::SeqCst);
                            shared.budget.break_open();
                            let _ = done.send(None);
                        }
                    })
                    .expect("spawn a writer thread");
                Worker {
                    tx: Some(tx),
                    queued,
                    thread: Some(thread),
                }
            })
            .collect();
        Pool {
            workers,
            shared,
            results,
            next_seq: 0,
            open: None,
            outstanding: 0,
            failed: BTreeMap::new(),
            broken: false,
        }
    }

    /// The number of writers for this machine: one per core, 2 to 8.
    pub(crate) fn default_threads() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(2, 8)
    }

    /// Queues `msg` for `worker`, first waiting for room for its `bytes` (none: no wait).
    fn send(&mut self, worker: usize, msg: Msg, bytes: u64) {
        if bytes > 0 {
            let exempt = self.open.as_ref().map_or(0, |o| o.weight);
            self.shared.budget.acquire(bytes, exempt);
        }
        let w = &self.workers[worker];
        w.queued.fetch_add(1, Ordering::SeqCst);
        let sent = w.tx.as_ref().is_some_and(|tx| tx.send(msg).is_ok());
        if !sent {
            // The writer is gone (it panicked): the budget is given back, and the file counts
            // as failed when it is settled.
            w.queued.fetch_sub(1, Ordering::SeqCst);
            self.shared.budget.release(bytes);
        }
    }

    /// Starts file `index` (the first chunk follows with [`Pool::chunk`]); `weight`: bytes of
    /// working memory its writer needs beyond its chunks.
    pub(crate) fn start(
        &mut self,
        stage: &Arc<Stage<'static>>,
        index: usize,
        how: How,
        weight: u64,
    ) {
        let (seq, worker) = self.next_file();
        let msg = Msg::Start {
            seq,
            index,
            how,
            stage: stage.clone(),
            weight,
        };
        self.send(worker, msg, weight + MSG_OVERHEAD);
        self.open = Some(Open {
            seq,
            worker,
            weight,
        });
    }

    /// The next file's sequence number and the writer it goes to (the least loaded), counted
    /// as outstanding; no file may be open.
    fn next_file(&mut self) -> (u64, usize) {
        debug_assert!(self.open.is_none());
        let seq = self.next_seq;
        self.next_seq += 1;
        let worker = (0..self.workers.len())
            .min_by_key(|&i| self.workers[i].queued.load(Ordering::SeqCst))
            .expect("at least one writer");
        self.outstanding += 1;
        (seq, worker)
    }

    /// [`Pool::start`] and the one [`Pool::chunk`] of a file whose content is `data`, in one
    /// message.
    pub(crate) fn whole(
        &mut self,
        stage: &Arc<Stage<'static>>,
        index: usize,
        how: How,
        data: Vec<u8>,
        mtime: Mtime,
    ) {
        let (seq, worker) = self.next_file();
        let bytes = data.len() as u64 + 2 * MSG_OVERHEAD;
        let msg = Msg::Whole {
            seq,
            index,
            how,
            stage: stage.clone(),
            data,
            mtime,
        };
        self.send(worker, msg, bytes);
        self.collect(false);
    }

    /// Hands the next chunk of the open file to its writer; `last` closes the file.
    pub(crate) fn chunk(&mut self, data: Vec<u8>, last: bool, mtime: Mtime) {
        let Some(open) = &self.open else { return };
        let (seq, worker) = (open.seq, open.worker);
        let bytes = data.len() as u64 + MSG_OVERHEAD;
        self.send(
            worker,
            Msg::Chunk {
                seq,
                data,
                last,
                mtime,
            },
            bytes,
        );
        if last {
            self.open = None;
        }
        self.collect(false);
    }

    /// Whether a file has failed (as far as the writers have told so far).
    pub(crate) fn failed(&mut self) -> bool {
        self.collect(false);
        !self.failed.is_empty() || self.broken
    }

    fn collect(&mut self, block: bool) {
        loop {
            let r = if block {
                match self.results.recv() {
                    Ok(r) => r,
                    Err(_) => return,
                }
            } else {
                match self.results.try_recv() {
                    Ok(r) => r,
                    Err(_) => return,
                }
            };
            match r {
                None => {
                    self.broken = true;
                    return;
                }
                Some((seq, r)) => {
                    self.outstanding -= 1;
                    if let Err(e) = r {
                        self.shared.stop_after.fetch_min(seq, Ordering::SeqCst);
                        self.failed.insert(seq, e);
                    }
                }
            }
            if block && self.outstanding == 0 {
                return;
            }
        }
    }

    /// Waits until every file started is written, failed, skipped (after a failure) or, for
    /// the open one, abandoned; returns the failure of the first failing file, in the order
    /// the files arrived. Then the pool is empty: no writer holds the stage.
    pub(crate) fn settle(&mut self) -> Option<RelError> {
        if let Some(open) = self.open.take() {
            self.send(open.worker, Msg::Abandon { seq: open.seq }, 0);
        }
        if self.outstanding > 0 && !self.broken {
            self.collect(true);
        }
        if self.broken {
            // A writer died: its files never finish.
            return Some(RelError::BadRequest(
                "a writer thread stopped unexpectedly".into(),
            ));
        }
        let first = self.failed.pop_first().map(|(_, e)| e);
        self.failed.clear();
        self.shared.stop_after.store(u64::MAX, Ordering::SeqCst);
        first
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Writers skip whatever is still queued, then end when their channel closes.
        self.shared.stop_after.store(0, Ordering::SeqCst);
        for w in &mut self.workers {
            w.tx = None;
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

enum Writer {
    Literal(Box<FileWriter>),
    Delta(Box<DeltaWriter>),
    Patch(Box<PatchWriter>),
}

/// The file a writer is filling.
struct Current {
    seq: u64,
    stage: Arc<Stage<'static>>,
    writer: Writer,
    weight: u64,
}

/// A writer thread: handles its messages in order until the session drops the pool.
fn work(rx: Receiver<Msg>, shared: &Shared, done: &Sender<Done>, queued: &AtomicUsize) {
    let mut w = WriterThread {
        shared,
        done,
        current: None,
        dropping: None,
    };
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Start {
                seq,
                index,
                how,
                stage,
                weight,
            } => w.start(seq, index, how, stage, weight),
            Msg::Chunk {
                seq,
                data,
                last,
                mtime,
            } => w.chunk(seq, data, last, mtime),
            Msg::Abandon { seq } => w.abandon(seq),
            Msg::Whole {
                seq,
                index,
                how,
                stage,
                data,
                mtime,
            } => {
                w.start(seq, index, how, stage, 0);
                w.chunk(seq, data, true, mtime);
            }
        }
        queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One writer thread's state between messages.
struct WriterThread<'a> {
    shared: &'a Shared,
    done: &'a Sender<Done>,
    current: Option<Current>,
    /// A file that failed or was skipped: its remaining chunks are dropped (seq, weight held).
    dropping: Option<(u64, u64)>,
}

impl WriterThread<'_> {
    fn release(&self, n: u64) {
        self.shared.budget.release(n);
    }

    /// Whether a file before `seq` failed (then `seq` does not matter).
    fn stopped_before(&self, seq: u64) -> bool {
        seq > self.shared.stop_after.load(Ordering::SeqCst)
    }

    /// Records that file `seq` failed: files after it are skipped.
    fn stop_after(&self, seq: u64) {
        self.shared.stop_after.fetch_min(seq, Ordering::SeqCst);
    }

    /// Begins file `seq` (or skips it, when a file before it failed).
    fn start(&mut self, seq: u64, index: usize, how: How, stage: Arc<Stage<'static>>, weight: u64) {
        self.release(MSG_OVERHEAD);
        if self.stopped_before(seq) {
            drop(stage);
            self.dropping = Some((seq, weight));
            let _ = self.done.send(Some((seq, Ok(()))));
            return;
        }
        // The client went away: the files still queued are not written (seconds of work on a
        // first deploy's queue of small files, the lock held all along), the session ends.
        if flip_release::abandoned() {
            drop(stage);
            self.stop_after(seq);
            self.dropping = Some((seq, weight));
            let _ = self
                .done
                .send(Some((seq, Err(flip_release::Error::Abandoned))));
            return;
        }
        let w = match how {
            How::Literal => stage
                .begin_file(index)
                .map(|f| Writer::Literal(Box::new(f))),
            How::Delta(b) => stage
                .begin_delta(index, &b)
                .map(|d| Writer::Delta(Box::new(d))),
            How::Patch(b, d) => stage
                .begin_patch(index, &b, &d)
                .map(|p| Writer::Patch(Box::new(p))),
            How::Stream(p, mode) => stage
                .begin_streamed(&p, mode)
                .map(|f| Writer::Literal(Box::new(f))),
        };
        match w {
            Ok(writer) => {
                self.current = Some(Current {
                    seq,
                    stage,
                    writer,
                    weight,
                })
            }
            Err(e) => {
                drop(stage);
                self.stop_after(seq);
                self.dropping = Some((seq, weight));
                let _ = self.done.send(Some((seq, Err(e))));
            }
        }
    }

    /// A chunk of file `seq`: written, or dropped with the file it belongs to; `last` closes
    /// the file (checked and given `mtime`).
    fn chunk(&mut self, seq: u64, data: Vec<u8>, last: bool, mtime: Mtime) {
        let bytes = data.len() as u64 + MSG_OVERHEAD;
        let mut c = match self.current.take() {
            Some(c) if c.seq == seq => c,
            other => {
                self.current = other;
                drop(data);
                self.release(bytes);
                if last {
                    self.forget_dropped(seq);
                }
                return;
            }
        };
        let fed = if self.stopped_before(seq) {
            // A file before this one failed: this one does not matter.
            Err(None)
        } else {
            feed(&mut c.writer, &data).map_err(Some)
        };
        drop(data);
        self.release(bytes);
        match fed {
            Ok(()) if !last => self.current = Some(c),
            Ok(()) => {
                let weight = c.weight;
                let r = finish(c, mtime);
                self.release(weight);
                if r.is_err() {
                    self.stop_after(seq);
                }
                let _ = self.done.send(Some((seq, r)));
                if !self.stopped_before(seq) {
                    flip_release::fault_point("mid-transfer");
                }
            }
            Err(e) => {
                self.dropping = Some((seq, c.weight));
                drop(c);
                if e.is_some() {
                    self.stop_after(seq);
                }
                let _ = self.done.send(Some((seq, e.map_or(Ok(()), Err))));
                if last {
                    if let Some((_, w)) = self.dropping.take() {
                        self.release(w);
                    }
                }
            }
        }
    }

    /// The session gave up on file `seq` (the client sent no more of it).
    fn abandon(&mut self, seq: u64) {
        match self.current.take() {
            Some(c) if c.seq == seq => {
                let weight = c.weight;
                drop(c);
                self.release(weight);
                let _ = self.done.send(Some((seq, Ok(()))));
            }
            other => {
                self.current = other;
                // It already failed or was skipped, and has been reported.
                self.forget_dropped(seq);
            }
        }
    }

    /// File `seq`, if it is the one being dropped, is over: its weight goes back.
    fn forget_dropped(&mut self, seq: u64) {
        if let Some((s, w)) = self.dropping {
            if s == seq {
                self.dropping = None;
                self.release(w);
            }
        }
    }
}

fn feed(w: &mut Writer, data: &[u8]) -> Result<(), RelError> {
    match w {
        Writer::Literal(f) => f.write(data),
        Writer::Delta(d) => d.feed(data),
        Writer::Patch(p) => p.feed(data),
    }
}

/// Closes a file: the encoding must be complete, the content its manifest's.
fn finish(c: Current, mtime: Mtime) -> Result<(), RelError> {
    let Current { stage, writer, .. } = c;
    let file = match writer {
        Writer::Literal(f) => *f,
        Writer::Delta(d) => d.finish()?,
        Writer::Patch(p) => p.finish()?,
    };
    stage.finish_file(file, mtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn chunks_wait_for_room_beyond_the_budget() {
        assert!(!must_wait(0, 4 * MIB, 0));
        assert!(!must_wait(IN_FLIGHT - 4 * MIB, 4 * MIB, 0));
        assert!(must_wait(IN_FLIGHT - 4 * MIB, 4 * MIB + 1, 0));
        // Nothing in flight: even a piece larger than the budget goes (alone).
        assert!(!must_wait(0, 2 * IN_FLIGHT, 0));
    }

    #[test]
    fn the_open_file_working_memory_does_not_block_its_own_chunks() {
        // A patch whose window and basis alone exceed the budget: its chunks go one at a time.
        let weight = IN_FLIGHT + 10 * MIB;
        assert!(!must_wait(weight, 4 * MIB, weight));
        assert!(!must_wait(weight + 4 * MIB, 4 * MIB, weight));
        // Beside it, other files' chunks still count against the budget.
        assert!(must_wait(weight + IN_FLIGHT - MIB, 4 * MIB, weight));
    }
}
