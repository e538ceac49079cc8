//! A first deploy that sends while it hashes.
//!
//! When one target (no shared paths) is deployed by a client that never made a release live
//! there, the scan hands every file it reads whole ([`flip_scan::ContentSink`]) to a bounded
//! queue ([`QUEUE_BYTES`]), and the target's worker, once the status (read while the scan
//! goes on) says nothing is live, streams them to the agent as they come: each file read once,
//! hashed and sent from the same buffer. The manifest follows in the usual `Stage`; what was not
//! streamed (files the hash cache answered for, files above [`flip_scan::BIG_FILE`]) is what the
//! agent then needs, sent as usual. When something is live after all, the queue is dropped and
//! the deploy goes on as any other (the status was read early: one round trip more when the
//! scan had ended by then).

use crate::{DeployError, Failed, Host};
use flip_manifest::{Digest, RelPath};
use flip_transfer::ContentCache;
use flip_wire::ReleaseSummary;
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

/// Bytes of content read by the scan and not yet sent, at most (one file may exceed it alone).
pub(crate) const QUEUE_BYTES: u64 = 16 << 20;

/// Items, or bytes, queued before a waiting sender is woken, and bytes of room freed before a
/// waiting scan thread is: on loopback the sender outruns the scan and waited for each file,
/// and one wake-up per file (a system call and often a context switch) was ~19,000 futex calls
/// on a first deploy of 12,000 files.
const WAKE_ITEMS: usize = 16;
const WAKE_BYTES: u64 = 1 << 20;

/// Trees smaller than this (files and bytes both) are not streamed: their scan ends before an
/// early status could help.
const MIN_FILES: u64 = 256;
const MIN_BYTES: u64 = 4 << 20;

enum Item {
    Walked {
        files: u64,
        bytes: u64,
    },
    File {
        rel: RelPath,
        mode: u32,
        mtime: (i64, u32),
        digest: Digest,
        data: Vec<u8>,
    },
    /// A piece of a file larger than the scan reads whole.
    Piece {
        rel: RelPath,
        mode: u32,
        mtime: (i64, u32),
        data: Vec<u8>,
        last: bool,
    },
}

impl Item {
    fn bytes(&self) -> u64 {
        match self {
            Item::Walked { .. } => 0,
            Item::File { data, .. } | Item::Piece { data, .. } => data.len() as u64,
        }
    }
}

#[derive(Default)]
struct State {
    items: VecDeque<Item>,
    bytes: u64,
    /// The scan ended (the feed was dropped).
    done: bool,
    /// The sender gave up (or does not stream): the scan hands nothing more on.
    dropped: bool,
    /// What the walk announced and is left of it: a file read beyond it is not streamed.
    left: Option<(u64, u64)>,
    /// Scan threads waiting for room, and whether the sender waits for items (a wake-up only
    /// then, and only for [`WAKE_ITEMS`] or [`WAKE_BYTES`] at once: no system call per file).
    producers_waiting: usize,
    consumer_waiting: bool,
    /// The big file whose pieces are coming: whether it streams (it fit in what was left).
    big: Option<bool>,
    /// What the agent's record of the streamed paths has cost ([`flip_wire::STREAM_RECORD_MAX`])
    /// and the directories it made for them, charged as the agent charges them.
    record: u64,
    dirs: HashSet<RelPath>,
}

impl State {
    /// Charges streaming `rel` (its path and the directories the agent makes for it) to the
    /// agent's record, unless that passes [`flip_wire::STREAM_RECORD_MAX`]: then `false`, and
    /// the file is sent after the manifest. The total charged is that of the set of files
    /// charged, whatever their order, so the agent (in queue order) never passes the bound.
    fn charge(&mut self, rel: &RelPath) -> bool {
        let missing = rel.parents_until(|p| self.dirs.contains(p));
        let cost = missing
            .iter()
            .map(flip_wire::stream_record_cost)
            .sum::<u64>()
            + flip_wire::stream_record_cost(rel);
        if self.record + cost > flip_wire::STREAM_RECORD_MAX {
            return false;
        }
        self.record += cost;
        self.dirs.extend(missing);
        true
    }
}

#[derive(Default)]
struct Queue {
    state: Mutex<State>,
    changed: Condvar,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The scan's end of the queue; dropped when the scan ends.
pub(crate) struct Feed(Arc<Queue>);

/// The sender's end of the queue; dropped, the scan hands nothing more on.
pub(crate) struct Drain(Arc<Queue>);

/// A queue between the scan and one target's sender.
pub(crate) fn queue() -> (Feed, Drain) {
    let q = Arc::new(Queue::default());
    (Feed(q.clone()), Drain(q))
}

impl flip_scan::ContentSink for Feed {
    fn walked(&self, files: u64, bytes: u64) {
        let mut s = self.0.lock();
        s.left = Some((files, bytes));
        s.items.push_back(Item::Walked { files, bytes });
        self.0.changed.notify_all();
    }

    fn file(&self, rel: &RelPath, mode: u32, mtime: (i64, u32), digest: &Digest, data: Vec<u8>) {
        let n = data.len() as u64;
        let mut s = self.0.lock();
        let dropped = s.dropped;
        match &mut s.left {
            Some((files, bytes)) if !dropped && *files > 0 && *bytes >= n => {
                *files -= 1;
                *bytes -= n;
            }
            // Grown since the walk, or nobody streams: sent after the manifest, if at all.
            _ => return,
        }
        // Its path is more than the agent keeps before the manifest: sent after it.
        if !s.charge(rel) {
            return;
        }
        let item = Item::File {
            rel: rel.clone(),
            mode,
            mtime,
            digest: *digest,
            data,
        };
        self.0.push(s, item);
    }

    fn piece(
        &self,
        rel: &RelPath,
        mode: u32,
        mtime: (i64, u32),
        size: u64,
        data: Vec<u8>,
        last: bool,
    ) {
        let mut s = self.0.lock();
        let dropped = s.dropped;
        let streams = match s.big {
            Some(streams) => streams,
            // The whole file is reserved at its first piece: it streams whole or not at all.
            None => match &mut s.left {
                Some((files, bytes)) if !dropped && *files > 0 && *bytes >= size => {
                    *files -= 1;
                    *bytes -= size;
                    s.charge(rel)
                }
                _ => false,
            },
        };
        s.big = Some(streams);
        if last {
            s.big = None;
        }
        if streams {
            let item = Item::Piece {
                rel: rel.clone(),
                mode,
                mtime,
                data,
                last,
            };
            self.0.push(s, item);
        }
    }
}

impl Queue {
    /// Queues `item` once there is room for it (or nobody takes it any more).
    fn push(&self, mut s: std::sync::MutexGuard<'_, State>, item: Item) {
        let n = item.bytes();
        while !s.dropped && !s.items.is_empty() && s.bytes + n > QUEUE_BYTES {
            // The sender may be waiting for more than is queued: what is there goes first.
            if s.consumer_waiting {
                self.changed.notify_all();
            }
            s.producers_waiting += 1;
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            s.producers_waiting -= 1;
        }
        if s.dropped {
            return;
        }
        s.bytes += n;
        s.items.push_back(item);
        if s.consumer_waiting && (s.items.len() >= WAKE_ITEMS || s.bytes >= WAKE_BYTES) {
            self.changed.notify_all();
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.0.lock().done = true;
        self.0.changed.notify_all();
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.dropped = true;
        s.items.clear();
        s.bytes = 0;
        self.0.changed.notify_all();
    }
}

impl Drain {
    /// The next item, waiting for it; `None` once the scan ended and everything was taken.
    fn next(&self) -> Option<Item> {
        let mut s = self.0.lock();
        loop {
            if let Some(item) = s.items.pop_front() {
                s.bytes -= item.bytes();
                if s.producers_waiting > 0
                    && (s.items.is_empty() || s.bytes + WAKE_BYTES <= QUEUE_BYTES)
                {
                    self.0.changed.notify_all();
                }
                return Some(item);
            }
            if s.done {
                return None;
            }
            s.consumer_waiting = true;
            s = self.0.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            s.consumer_waiting = false;
        }
    }

    /// Whether the scan has ended.
    fn scan_done(&self) -> bool {
        self.0.lock().done
    }
}

/// What [`stream_first`] did.
pub(crate) struct Early {
    /// The status, read while the scan went on: the live release and every release.
    pub(crate) status: (Option<u64>, Vec<ReleaseSummary>),
    /// Files and bytes streamed (nothing was live).
    pub(crate) streamed: Option<(u64, u64)>,
}

/// Streams what the scan reads to `host` while the scan goes on, when nothing is live there
/// (read from the lock's and status's answers, sent at connect time). `None`: the tree is too
/// small to be worth it, or the scan failed (then nothing was read early). `on_check` is
/// called when the scan has ended before those answers are waited for (the wait is then the
/// target's alone), `on_stream` when the files start to go.
pub(crate) fn stream_first(
    host: &mut Host,
    drain: Drain,
    on_wait: &mut dyn FnMut(&str),
    on_check: &mut dyn FnMut(),
    on_stream: &mut dyn FnMut(),
    cache: Option<&ContentCache>,
) -> Result<Option<Early>, Failed> {
    let Some(Item::Walked { files, bytes }) = drain.next() else {
        // The scan failed before its walk ended.
        return Ok(None);
    };
    if files < MIN_FILES && bytes < MIN_BYTES {
        return Ok(None);
    }
    if drain.scan_done() {
        on_check();
    }
    let s = &mut host.session;
    let status = s
        .locked(on_wait)
        .and_then(|()| s.status_answer())
        .map_err(|e| host.fail(e.into()))?;
    let s = &mut host.session;
    if !drain.scan_done() {
        s.overlapped();
    }
    if status.0.is_some() {
        return Ok(Some(Early {
            status,
            streamed: None,
        }));
    }
    on_stream();
    let (mut n, mut total) = (0u64, 0u64);
    let mut sent = s.queue_stream_start(files, bytes);
    while let (Ok(()), Some(item)) = (&sent, drain.next()) {
        total += item.bytes();
        match item {
            Item::File {
                rel,
                mode,
                mtime,
                digest,
                data,
            } => {
                if let Some(c) = cache {
                    // Best effort, as for content sent after the manifest: a patch's basis.
                    let _ = c.put(&digest, &data);
                }
                n += 1;
                sent = s.queue_stream_file(&rel, mode, Some(mtime), data);
            }
            Item::Piece {
                rel,
                mode,
                mtime,
                data,
                last,
            } => {
                n += u64::from(last);
                sent = s.queue_stream_piece(&rel, mode, Some(mtime), data, last);
            }
            Item::Walked { .. } => {}
        }
    }
    drop(drain);
    sent.map_err(|e| host.fail(DeployError::from(e)))?;
    Ok(Some(Early {
        status,
        streamed: Some((n, total)),
    }))
}

/// Counts the streamed files in the report of the stage that followed.
pub(crate) fn account(report: &mut flip_transfer::DeployReport, (files, bytes): (u64, u64)) {
    report.literal += files;
    report.counts.files.literal += files;
    report.literal_bytes += bytes;
    report.matched_bytes = report.matched_bytes.saturating_sub(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client charges streamed paths as the agent does and streams none that would pass
    /// `flip_wire::STREAM_RECORD_MAX` (the agent would refuse it, on every retry): the files
    /// beyond it go after the manifest, and short paths still stream once long ones did not.
    #[test]
    fn no_file_streams_past_what_the_agent_keeps_of_the_paths() {
        let prefix = vec!["d".repeat(255); 15].join("/");
        let path = |i: u64| RelPath::new(format!("{prefix}/f{i:06}")).unwrap();
        let each = flip_wire::stream_record_cost(&path(0));
        let dirs: u64 = (1..=15)
            .map(|k| {
                flip_wire::stream_record_cost(
                    &RelPath::new(vec!["d".repeat(255); k].join("/")).unwrap(),
                )
            })
            .sum();
        let mut s = State::default();
        let mut streamed = 0;
        while s.charge(&path(streamed)) {
            streamed += 1;
        }
        assert_eq!(streamed, (flip_wire::STREAM_RECORD_MAX - dirs) / each);
        assert_eq!(s.record, dirs + streamed * each);
        assert!(s.record <= flip_wire::STREAM_RECORD_MAX);
        // Refused: nothing charged, no directory recorded for it.
        let long = format!("{}/x", vec!["e".repeat(255); 15].join("/"));
        assert!(!s.charge(&RelPath::new(long).unwrap()));
        assert_eq!(s.dirs.len(), 15);
        let room = flip_wire::STREAM_RECORD_MAX - s.record;
        assert_eq!(s.charge(&RelPath::new("a").unwrap()), room >= 65);
    }

    /// The sender is woken for a batch of files, not each one, yet never left waiting: not
    /// behind a scan thread that waits for room (a file nearly as large as the queue behind a
    /// small one, while the sender waits for more than is queued), nor for the last few files
    /// once the scan ends.
    #[test]
    fn the_sender_gets_every_file_whether_or_not_a_batch_fills() {
        use flip_scan::ContentSink;
        let (feed, drain) = queue();
        let (tx, rx) = std::sync::mpsc::channel();
        let sender = std::thread::spawn(move || {
            while let Some(item) = drain.next() {
                let got = match item {
                    Item::Walked { files, .. } => format!("walked {files}"),
                    Item::File { rel, data, .. } => format!("{rel} {}", data.len()),
                    Item::Piece { rel, .. } => format!("piece of {rel}"),
                };
                tx.send(got).unwrap();
            }
        });
        let big = (QUEUE_BYTES - 10) as usize;
        // The scan, on a thread of its own: a test that fails times out below instead of
        // hanging with it.
        std::thread::spawn(move || {
            let file = |name: &str, len: usize| {
                let rel = RelPath::new(name).unwrap();
                feed.file(&rel, 0o644, (1, 0), &Digest([0; 32]), vec![0; len]);
            };
            feed.walked(4, 300 + big as u64);
            while !feed.0.lock().consumer_waiting {
                std::thread::yield_now();
            }
            file("small", 100);
            // Queued: 100 bytes, one file; this one waits for room, and the sender for a
            // batch.
            file("big", big);
            file("a", 100);
            file("b", 100);
        });
        let next = || rx.recv_timeout(std::time::Duration::from_secs(20)).unwrap();
        assert_eq!(next(), "walked 4");
        assert_eq!(next(), "small 100");
        assert_eq!(next(), format!("big {big}"));
        assert_eq!(next(), "a 100");
        assert_eq!(next(), "b 100");
        sender.join().unwrap();
    }
}
