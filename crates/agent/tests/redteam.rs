//! Red-team checks of today's agent code: request orders and client deaths a deploy does not
//! make, each asserting what is on disk afterwards.

// Tests read back what the agent wrote.
#![allow(clippy::disallowed_methods)]

use flip_manifest::{Digest, Entry, EntryKind, Manifest, RelPath};
use flip_release::{Holder, Root, Wait};
use flip_wire::{FrameReader, FrameWriter, Request, Response, MAGIC, PROTOCOL};
use std::path::Path;

fn lock() -> Request {
    Request::Lock {
        wait: false,
        holder: flip_wire::Holder {
            pid: 1,
            host: "test".into(),
            user: "test".into(),
            since: 0,
            what: flip_wire::Purpose::Deploy,
        },
    }
}

fn file(path: &str, content: &[u8]) -> Entry {
    Entry {
        path: RelPath::new(path).unwrap(),
        kind: EntryKind::File {
            mode: 0o644,
            size: content.len() as u64,
            digest: Digest::of(content),
        },
    }
}

/// A root with release 1 live, holding `a` ("alpha").
fn live_root(dir: &Path) -> Root {
    let root = Root::open_or_init(dir).unwrap();
    let me = Holder {
        pid: 1,
        host: "h".into(),
        user: "u".into(),
        since: 0,
        what: "setup".into(),
    };
    let lock = root.lock(&me, Wait::No).unwrap();
    let m = Manifest::new(vec![file("a", b"alpha")]).unwrap();
    let stage = root.stage(&lock, m, None).unwrap();
    let idx = stage.needs()[0];
    let mut w = stage.begin_file(idx).unwrap();
    w.write(b"alpha").unwrap();
    stage.finish_file(w, None).unwrap();
    let info = stage.commit().unwrap();
    root.activate(&lock, info.id).unwrap();
    root
}

/// One agent session fed with `frames` after a Hello. The client reads answers (notices
/// skipped) until `stop` says so, an error or `Bye`, then goes away (both pipes closed); the
/// answers read are returned once the agent is done.
fn session(root: &Path, frames: Vec<Request>, stop: impl Fn(&Response) -> bool) -> Vec<Response> {
    let (client_rx, agent_tx) = std::io::pipe().unwrap();
    let (agent_rx, client_tx) = std::io::pipe().unwrap();
    let root = root.to_path_buf();
    let agent = std::thread::spawn(move || {
        let _ = flip_agent::serve(Box::new(agent_rx), Box::new(agent_tx), &root);
    });
    let mut tx = FrameWriter::new(Box::new(client_tx));
    tx.send(&Request::Hello {
        magic: MAGIC,
        protocol: PROTOCOL,
        version: "test".into(),
        compress: 0,
    })
    .unwrap();
    for f in frames {
        tx.send(&f).unwrap();
    }
    tx.flush().unwrap();
    let mut rx = FrameReader::new(Box::new(client_rx));
    let mut out = Vec::new();
    while let Ok(r) = rx.recv::<Response>() {
        if matches!(r, Response::Notices { .. }) {
            continue;
        }
        let end = stop(&r) || matches!(r, Response::Error { .. } | Response::Bye);
        out.push(r);
        if end {
            break;
        }
    }
    drop(rx);
    drop(tx);
    agent.join().unwrap();
    out
}

/// The problems `Verify` finds in the live release.
fn verify(root: &Path) -> Vec<String> {
    let rs = session(
        root,
        vec![Request::Verify { id: None }, Request::Bye],
        |_| false,
    );
    rs.iter()
        .find_map(|r| match r {
            Response::Verified { problems, .. } => Some(problems.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{rs:?}"))
}

/// An after-activate hook writes into the live release, then its client goes away while it
/// still runs (killed mid-hook): the hook is killed, and what it wrote is recorded as the
/// hooks' (verify finds the live release intact), as when the hook ends on its own.
#[test]
fn what_a_hook_wrote_before_its_client_went_away_is_not_tampering() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("t");
    live_root(&root);
    assert_eq!(verify(&root), Vec::<String>::new());
    let hook = Request::Hook {
        release: 1,
        run: "echo w > written; while :; do echo tick; sleep 0.05; done".into(),
        timeout_ms: 60_000,
        env: Vec::new(),
        wait_ms: 0,
    };
    let rs = session(&root, vec![lock(), hook], |r| {
        matches!(r, Response::HookOutput { .. })
    });
    assert!(
        matches!(rs.last(), Some(Response::HookOutput { .. })),
        "{rs:?}"
    );
    assert_eq!(
        std::fs::read(root.join("current/written")).unwrap(),
        b"w\n",
        "the hook wrote before its client went away"
    );
    assert_eq!(
        verify(&root),
        Vec::<String>::new(),
        "the hook's write is not tampering"
    );
}
