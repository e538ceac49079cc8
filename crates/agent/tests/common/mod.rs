//! What the agent's raw-frame tests share: the lock request of a deploy, manifest entries, a
//! root with a live release, and one session over pipes.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use flip_manifest::{Digest, Entry, EntryKind, Manifest, RelPath};
use flip_release::{Holder, Root, Wait};
use flip_wire::{FrameReader, FrameWriter, Request, Response, MAGIC, PROTOCOL};
use std::io::Write;
use std::path::Path;

/// The holder a test client names when it takes the lock for a deploy.
pub fn holder() -> flip_wire::Holder {
    flip_wire::Holder {
        pid: 1,
        host: "test".into(),
        user: "test".into(),
        since: 0,
        what: flip_wire::Purpose::Deploy,
        run: String::new(),
    }
}

/// `Lock` for a deploy, without waiting.
pub fn lock() -> Request {
    Request::Lock {
        wait: false,
        holder: holder(),
    }
}

/// A file entry of `content` with permission bits `mode`.
pub fn file_mode(path: &str, content: &[u8], mode: u32) -> Entry {
    Entry {
        path: RelPath::new(path).unwrap(),
        kind: EntryKind::File {
            mode,
            size: content.len() as u64,
            digest: Digest::of(content),
        },
    }
}

/// A file entry of `content`, mode 0644.
pub fn file(path: &str, content: &[u8]) -> Entry {
    file_mode(path, content, 0o644)
}

/// A root at `dir` with release 1 live, holding `files` (path, content), each mode 0644.
pub fn live_root(dir: &Path, files: &[(&str, &[u8])]) -> Root {
    let root = Root::open_or_init(dir).unwrap();
    let me = Holder {
        pid: 1,
        host: "h".into(),
        user: "u".into(),
        since: 0,
        what: "setup".into(),
        run: None,
    };
    let lock = root.lock(&me, Wait::No).unwrap();
    let entries = files.iter().map(|(p, c)| file(p, c)).collect();
    let m = Manifest::new(entries).unwrap();
    let stage = root.stage(&lock, m.clone(), None).unwrap();
    for idx in stage.needs().to_vec() {
        let content = files
            .iter()
            .find(|(p, _)| m.entries()[idx].path.as_str() == *p)
            .map(|(_, c)| *c)
            .unwrap();
        let mut w = stage.begin_file(idx).unwrap();
        w.write(content).unwrap();
        stage.finish_file(w, None).unwrap();
    }
    let info = stage.commit().unwrap();
    root.activate(&lock, info.id).unwrap();
    root
}

/// `Stage` of manifest `m`, sent whole, and its one chunk.
pub fn stage_whole(m: &Manifest) -> Vec<Request> {
    let bytes = flip_manifest::encode(m);
    vec![
        Request::Stage {
            label: None,
            base: flip_wire::StageBase::Whole,
            payload_len: bytes.len() as u64,
            digest: m.digest(),
            ahead: None,
        },
        Request::ManifestChunk(bytes),
    ]
}

/// Runs one agent session on `root` fed with `frames` after a valid Hello (or with the bytes
/// `raw` alone); returns every answer (notices skipped) up to an error or `Bye`.
pub fn session(root: &Path, raw: Option<Vec<u8>>, frames: Vec<Request>) -> Vec<Response> {
    session_paused(root, raw, frames, || {}, Vec::new())
}

/// [`session`], the client sending `first`, then, once `between` returned (the agent reading
/// on meanwhile), `rest`.
pub fn session_paused(
    root: &Path,
    raw: Option<Vec<u8>>,
    first: Vec<Request>,
    between: impl FnOnce() + Send,
    rest: Vec<Request>,
) -> Vec<Response> {
    let (client_rx, agent_tx) = std::io::pipe().unwrap();
    let (agent_rx, client_tx) = std::io::pipe().unwrap();
    let dir = root.to_path_buf();
    let agent = std::thread::spawn(move || {
        let _ = flip_agent::serve(Box::new(agent_rx), Box::new(agent_tx), &dir);
    });
    let out = std::thread::scope(|scope| {
        let writer = scope.spawn(move || {
            let mut client_tx = client_tx;
            if let Some(bytes) = raw {
                let _ = client_tx.write_all(&bytes);
                return;
            }
            let mut tx = FrameWriter::new(Box::new(client_tx));
            let _ = tx.send(&Request::Hello {
                magic: MAGIC,
                protocol: PROTOCOL,
                version: "test".into(),
                compress: 0,
            });
            let send = |tx: &mut FrameWriter, frames: Vec<Request>| {
                for f in frames {
                    if tx.send(&f).is_err() {
                        return false;
                    }
                }
                tx.flush().is_ok()
            };
            if send(&mut tx, first) {
                between();
                send(&mut tx, rest);
            }
        });
        let mut rx = FrameReader::new(Box::new(client_rx));
        let mut out = Vec::new();
        while let Ok(r) = rx.recv::<Response>() {
            if matches!(r, Response::Notices { .. }) {
                continue;
            }
            let end = matches!(r, Response::Error { .. } | Response::Bye);
            out.push(r);
            if end {
                break;
            }
        }
        drop(rx);
        writer.join().unwrap();
        out
    });
    agent.join().unwrap();
    out
}
