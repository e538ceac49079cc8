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

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes held at most before they are written out anyway.
pub(crate) const MAX_HELD: usize = 64 * 1024;

struct State {
    out: Box<dyn Write + Send>,
    held: Vec<u8>,
    holding: bool,
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
            out: output,
            held: Vec::new(),
            holding: false,
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
        self.holder.state().release()?;
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
        if s.holding {
            s.held.extend_from_slice(buf);
            if s.held.len() > MAX_HELD {
                s.release()?;
            }
            return Ok(buf.len());
        }
        s.release()?;
        s.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut s = self.holder.state();
        if s.holding {
            return Ok(());
        }
        s.release()?;
        s.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use flip_testkit::Writes;

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
        assert!(
            writes.0.lock().unwrap().is_empty(),
            "nothing leaves while held"
        );
        let mut buf = [0u8; 4];
        input.read_exact(&mut buf).unwrap();
        assert_eq!(*writes.0.lock().unwrap(), vec![b"onetwo".to_vec()]);
        // Written through: after what was held, in order.
        h.hold(|| output.write_all(b"three").unwrap());
        output.write_all(b"four").unwrap();
        assert_eq!(
            *writes.0.lock().unwrap(),
            vec![b"onetwo".to_vec(), b"three".to_vec(), b"four".to_vec()]
        );
    }

    #[test]
    fn more_than_the_bound_is_written_out_while_held() {
        let writes = Writes::default();
        let (h, _input, mut output) = Holder::wrap(Box::new(&b""[..]), Box::new(writes.clone()));
        h.hold(|| output.write_all(&vec![7u8; MAX_HELD + 1]).unwrap());
        let w = writes.0.lock().unwrap();
        assert_eq!(w.iter().map(Vec::len).sum::<usize>(), MAX_HELD + 1);
    }
}
