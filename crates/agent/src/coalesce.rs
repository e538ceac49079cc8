//! The answers to one batch of requests leave together.
//!
//! A client sends the requests that do not depend on an answer as one batch and waits for all
//! their answers. Were each answer written on its own, an SSH server that does not set
//! `TCP_NODELAY` on a non-interactive session (OpenSSH's `sshd` for `exec` without a pty) would
//! send the first and hold each later one back until the client's TCP acknowledged the one
//! before (Nagle's algorithm): a round trip per answer, measured at 50 ms RTT as a no-op deploy
//! waiting 0.21 s for one batch instead of 0.10 s.
//!
//! So the answers are held ([`Holder::hold`]) and written in one go just before the agent next
//! reads from the client ([`ReleasingInput`]): when it has answered everything the client sent
//! so far. Whatever else the agent writes (a hook's live output, a "waiting for the lock"
//! notice, a manifest's chunks) goes out at once, after what was held, so the order never
//! changes. At most [`MAX_HELD`] bytes are held; more are written out.
//!
//! Written out means queued ([`Queued`]): a thread of its own writes to the client, so the
//! agent goes on reading while the client is still writing a batch (its content sent ahead of
//! the answers it will read) and the answers wait in memory, at most [`MAX_QUEUED`] bytes.
//! Were they written in the agent's thread, a client writing more than the pipes hold, and an
//! agent answering more than they hold, would each wait for the other for ever.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Bytes held at most before they are written out anyway.
pub(crate) const MAX_HELD: usize = 64 * 1024;

/// Bytes held at most while deferred ([`Holder::defer`]): far more than the answers to a
/// stage of the largest manifest and its changes.
pub(crate) const MAX_DEFERRED: usize = 256 << 20;

/// Bytes queued for the client at most; a write beyond waits for the client to read.
pub(crate) const MAX_QUEUED: usize = 16 << 20;

struct State {
    out: Queued,
    held: Vec<u8>,
    holding: bool,
    /// Everything is held, reads release nothing ([`Holder::defer`]).
    deferred: bool,
}

impl State {
    fn release(&mut self) -> io::Result<()> {
        if !self.held.is_empty() {
            self.out.write_all(&self.held)?;
            self.held.clear();
            self.out.flush()?;
        }
        Ok(())
    }
}

/// Shared by the two ends: decides whether what is written now is held.
#[derive(Clone)]
pub(crate) struct Holder(Arc<Mutex<State>>);

impl Holder {
    /// The output side (written through, or held) and the input side (releasing what is held
    /// before each read) of the streams `input` and `output`.
    pub(crate) fn wrap(
        input: Box<dyn Read + Send>,
        output: Box<dyn Write + Send>,
    ) -> (Holder, ReleasingInput, HeldOutput) {
        let h = Holder(Arc::new(Mutex::new(State {
            out: Queued::start(output),
            held: Vec::new(),
            holding: false,
            deferred: false,
        })));
        let input = ReleasingInput {
            inner: input,
            holder: h.clone(),
        };
        let output = HeldOutput { holder: h.clone() };
        (h, input, output)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Only the session's thread writes; a poisoned lock still holds consistent bytes.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes out what is held now (the session's end: no read follows).
    pub(crate) fn release(&self) -> io::Result<()> {
        self.state().release()
    }

    /// Writes out what is held now and waits until everything written so far has left this
    /// process (written to the client's pipe or socket; not waiting for the client to read
    /// it): before work this agent may die in, whose answers so far the client must have
    /// (the commit's and activation's, before a prune). Only where the client reads, having
    /// sent its batch: it is not waiting for this agent to read.
    pub(crate) fn release_written(&self) -> io::Result<()> {
        let mut s = self.state();
        s.release()?;
        s.out.written()
    }

    /// Whether everything written is held ([`Holder::defer`]).
    pub(crate) fn deferring(&self) -> bool {
        self.state().deferred
    }

    /// From now on (`on`) everything written is held, whatever is read meanwhile, until this is
    /// called with `false` (then the next read, flush or write outside [`Holder::hold`] writes
    /// it out): for a client that writes a whole batch, content included, before it reads any
    /// answer (a `Stage` with `ahead`). At most [`MAX_DEFERRED`] bytes; more are written out.
    pub(crate) fn defer(&self, on: bool) {
        self.state().deferred = on;
    }

    /// Runs `write` with what it writes held until the next read from the client.
    pub(crate) fn hold<T>(&self, write: impl FnOnce() -> T) -> T {
        self.state().holding = true;
        let r = write();
        self.state().holding = false;
        r
    }
}

/// The client's stream: before each read, what was held is written out.
pub(crate) struct ReleasingInput {
    inner: Box<dyn Read + Send>,
    holder: Holder,
}

impl Read for ReleasingInput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        {
            let mut s = self.holder.state();
            if !s.deferred {
                s.release()?;
            }
        }
        self.inner.read(buf)
    }
}

/// The stream to the client, held or written through.
pub(crate) struct HeldOutput {
    holder: Holder,
}

impl Write for HeldOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.holder.state();
        if s.holding || s.deferred {
            s.held.extend_from_slice(buf);
            let most = if s.deferred { MAX_DEFERRED } else { MAX_HELD };
            if s.held.len() > most {
                s.release()?;
            }
            return Ok(buf.len());
        }
        s.release()?;
        s.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut s = self.holder.state();
        if s.holding || s.deferred {
            return Ok(());
        }
        s.release()?;
        s.out.flush()
    }
}

/// What the writer thread and the agent share.
#[derive(Default)]
struct Queue {
    chunks: VecDeque<Vec<u8>>,
    bytes: usize,
    /// The agent is done writing: the thread ends once the queue is empty.
    closed: bool,
    /// How the first failed write failed; every later write and flush fails the same way.
    failed: Option<(io::ErrorKind, String)>,
}

/// A writer whose bytes a thread of its own writes to `out`, in order (what is queued by the
/// time it writes, in one write), flushed;
/// writing waits only while [`MAX_QUEUED`] bytes are queued. A failed write of the thread is
/// the error of every write and flush after it. Dropping it waits until everything queued is
/// written (or failed): what the agent wrote last reaches the client before it exits.
pub(crate) struct Queued {
    shared: Arc<(Mutex<Queue>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Queued {
    pub(crate) fn start(mut out: Box<dyn Write + Send>) -> Queued {
        let shared: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let theirs = shared.clone();
        let thread = std::thread::spawn(move || {
            let (lock, cond) = &*theirs;
            loop {
                // Everything queued so far, in one write.
                let chunk = {
                    let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
                    while q.chunks.is_empty() && !q.closed {
                        q = cond.wait(q).unwrap_or_else(|e| e.into_inner());
                    }
                    let Some(mut first) = q.chunks.pop_front() else {
                        return;
                    };
                    for c in q.chunks.drain(..) {
                        first.extend_from_slice(&c);
                    }
                    first
                };
                let done = out.write_all(&chunk).and_then(|()| out.flush());
                let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
                q.bytes -= chunk.len();
                if let Err(e) = done {
                    q.failed = Some((e.kind(), e.to_string()));
                    q.chunks.clear();
                    q.bytes = 0;
                    q.closed = true;
                }
                cond.notify_all();
                if q.failed.is_some() {
                    return;
                }
            }
        });
        Queued {
            shared,
            thread: Some(thread),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn failure(f: &(io::ErrorKind, String)) -> io::Error {
    io::Error::new(f.0, f.1.clone())
}

impl Queued {
    /// Waits until everything queued so far is written (or the writing failed: its error).
    fn written(&self) -> io::Result<()> {
        let cond = &self.shared.1;
        let mut q = self.queue();
        while q.failed.is_none() && q.bytes > 0 {
            q = cond.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        match &q.failed {
            Some(f) => Err(failure(f)),
            None => Ok(()),
        }
    }
}

impl Write for Queued {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let cond = &self.shared.1;
        let mut q = self.queue();
        while q.failed.is_none() && q.bytes > 0 && q.bytes + buf.len() > MAX_QUEUED {
            q = cond.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(f) = &q.failed {
            return Err(failure(f));
        }
        q.chunks.push_back(buf.to_vec());
        q.bytes += buf.len();
        cond.notify_all();
        Ok(buf.len())
    }

    /// What is queued is flushed as it is written: only a failure is reported here.
    fn flush(&mut self) -> io::Result<()> {
        match &self.queue().failed {
            Some(f) => Err(failure(f)),
            None => Ok(()),
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.queue().closed = true;
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use flip_testkit::Writes;

    /// The writes so far, once `n` bytes in all have arrived (the thread writes them).
    fn written(writes: &Writes, n: usize) -> Vec<Vec<u8>> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let w = writes.0.lock().unwrap().clone();
            if w.iter().map(Vec::len).sum::<usize>() >= n || std::time::Instant::now() > deadline {
                return w;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn held_answers_leave_in_one_write_before_the_next_read_and_in_order() {
        let writes = Writes::default();
        let (h, mut input, mut output) =
            Holder::wrap(Box::new(&b"next"[..]), Box::new(writes.clone()));
        h.hold(|| {
            output.write_all(b"one").unwrap();
            output.flush().unwrap();
        });
        h.hold(|| {
            output.write_all(b"two").unwrap();
            output.flush().unwrap();
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            writes.0.lock().unwrap().is_empty(),
            "nothing leaves while held"
        );
        let mut buf = [0u8; 4];
        input.read_exact(&mut buf).unwrap();
        assert_eq!(written(&writes, 6), vec![b"onetwo".to_vec()]);
        // Written through: after what was held, in order.
        h.hold(|| output.write_all(b"three").unwrap());
        output.write_all(b"four").unwrap();
        assert_eq!(written(&writes, 15).concat(), b"onetwothreefour");
    }

    /// What `release_written` returns after has left the process: an agent that dies right
    /// after (a prune's crash, just after the activation was answered) has still told the
    /// client. A plain `release` only queues it for the writer thread.
    #[test]
    fn answers_released_before_risky_work_have_left_when_it_starts() {
        struct Slow(Writes);
        impl Write for Slow {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                std::thread::sleep(std::time::Duration::from_millis(100));
                self.0.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let writes = Writes::default();
        let (h, _input, mut output) =
            Holder::wrap(Box::new(&b""[..]), Box::new(Slow(writes.clone())));
        h.hold(|| {
            output.write_all(b"committed, activated").unwrap();
            output.flush().unwrap();
        });
        h.release_written().unwrap();
        assert_eq!(
            writes.0.lock().unwrap().concat(),
            b"committed, activated".to_vec()
        );
    }

    #[test]
    fn deferred_answers_stay_held_across_reads_until_deferral_ends() {
        let writes = Writes::default();
        let (h, mut input, mut output) =
            Holder::wrap(Box::new(&b"abcd"[..]), Box::new(writes.clone()));
        h.defer(true);
        h.hold(|| output.write_all(b"staged").unwrap());
        let mut buf = [0u8; 2];
        input.read_exact(&mut buf).unwrap();
        output.write_all(b"+changes").unwrap();
        output.flush().unwrap();
        input.read_exact(&mut buf).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            writes.0.lock().unwrap().is_empty(),
            "nothing leaves while deferred"
        );
        h.defer(false);
        output.flush().unwrap();
        assert_eq!(written(&writes, 14).concat(), b"staged+changes");
    }

    #[test]
    fn more_than_the_bound_is_written_out_while_held() {
        let writes = Writes::default();
        let (h, _input, mut output) = Holder::wrap(Box::new(&b""[..]), Box::new(writes.clone()));
        h.hold(|| output.write_all(&vec![7u8; MAX_HELD + 1]).unwrap());
        let w = written(&writes, MAX_HELD + 1);
        assert_eq!(w.iter().map(Vec::len).sum::<usize>(), MAX_HELD + 1);
    }

    #[test]
    fn answers_wait_in_memory_while_the_client_does_not_read_and_all_arrive_in_order() {
        // A pipe holds 64 KiB: written in this thread, 1 MiB would wait for a reader.
        let (mut client, agent_out) = std::io::pipe().unwrap();
        let mut out = Queued::start(Box::new(agent_out));
        let sent: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        for piece in sent.chunks(1000) {
            out.write_all(piece).unwrap();
        }
        out.flush().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap();
            got
        });
        // Dropped: waits until everything is written, then ends the stream.
        drop(out);
        assert_eq!(reader.join().unwrap(), sent);
    }

    #[test]
    fn a_failed_write_is_the_error_of_every_later_write_and_flush() {
        let (client, agent_out) = std::io::pipe().unwrap();
        drop(client);
        let mut out = Queued::start(Box::new(agent_out));
        let _ = out.write_all(b"to nobody");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let e = loop {
            if let Err(e) = out.flush() {
                break e;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the failure never came"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        let again = out.write_all(b"more").unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::BrokenPipe);
    }
}
