//! A first deploy that sends while it hashes: files streamed before their manifest
//! ([`Request::StreamStart`], [`Request::Stream`]), queued with what follows (no answer).

use crate::{Result, Session};
use flip_manifest::RelPath;
use flip_wire::{Mtime, Request, CHUNK};

impl Session {
    /// Queues `StreamStart`: at most `files` files of `bytes` bytes in all follow, before the
    /// [`Session::stage`] of a manifest that lists each of them exactly. Only into a target with
    /// nothing live; the agent's refusal is the answer to the stage.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_stream_start(&mut self, files: u64, bytes: u64) -> Result<()> {
        self.phase = "sending file content";
        self.queue(&Request::StreamStart { files, bytes })
    }

    /// Queues the content of file `path` (permission bits `mode`), in pieces of at most
    /// [`CHUNK`] bytes.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_stream_file(
        &mut self,
        path: &RelPath,
        mode: u32,
        mtime: Mtime,
        data: Vec<u8>,
    ) -> Result<()> {
        self.queue_stream_piece(path, mode, mtime, data, true)
    }

    /// Queues the next piece of file `path`'s content (all of a file's pieces one after
    /// another), in frames of at most [`CHUNK`] bytes; `last` closes the file.
    ///
    /// # Errors
    /// See [`Session`].
    pub fn queue_stream_piece(
        &mut self,
        path: &RelPath,
        mode: u32,
        mtime: Mtime,
        data: Vec<u8>,
        last: bool,
    ) -> Result<()> {
        let n = data.len() as u64;
        if data.len() <= CHUNK {
            self.queue(&Request::Stream {
                path: path.clone(),
                mode,
                mtime,
                data,
                last,
            })?;
        } else {
            let frames = data.chunks(CHUNK).count();
            for (i, c) in data.chunks(CHUNK).enumerate() {
                self.queue(&Request::Stream {
                    path: path.clone(),
                    mode,
                    mtime,
                    data: c.to_vec(),
                    last: last && i + 1 == frames,
                })?;
            }
        }
        match last {
            true => self.meter.add_file(n),
            false => self.meter.add_bytes(n),
        }
        Ok(())
    }

    /// The answer just read arrived while the client still had work of its own (the scan):
    /// it cost no waiting, so it is not counted as a round trip.
    pub fn overlapped(&mut self) {
        self.round_trips = self.round_trips.saturating_sub(1);
    }
}
