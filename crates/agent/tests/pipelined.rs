//! A client pipelines requests that do not depend on an answer: the agent reads what follows
//! `Hello` compressed as the client chose, handles the batch in order, and after a failure acts
//! on nothing more, answering each remaining request "not done because" the first error.

// Tests read back what the agent wrote: a failed read fails the test at its own line, and the
// fs helpers of the on-disk crates are theirs, not the tests'.
#![allow(clippy::disallowed_methods)]

use flip_wire::{FrameReader, FrameWriter, Request, Response, MAGIC, PROTOCOL};
use std::path::Path;

mod common;
use common::lock;

/// A root with release 1 live (one empty directory).
fn live_root(dir: &Path) {
    common::live_root(dir, &[]);
}

/// Sends `Hello` (asking for zstd at `compress`) and every frame of `batch` before reading
/// anything, as a pipelining client does; returns every answer after `Welcome` until the agent
/// ends the session.
fn pipelined(root: &Path, compress: i32, batch: Vec<Request>) -> Vec<Response> {
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
        compress,
    })
    .unwrap();
    if compress > 0 {
        tx.start_compression(compress).unwrap();
    }
    for f in &batch {
        tx.send(f).unwrap();
    }
    tx.flush().unwrap();
    let mut rx = FrameReader::new(Box::new(client_rx));
    match rx.recv::<Response>().unwrap() {
        Response::Welcome { protocol, .. } => assert_eq!(protocol, PROTOCOL),
        other => panic!("expected Welcome, got {other:?}"),
    }
    if compress > 0 {
        rx.start_decompression().unwrap();
    }
    let mut out = Vec::new();
    while let Ok(r) = rx.recv::<Response>() {
        if matches!(r, Response::Notices { .. }) {
            continue;
        }
        let end = matches!(r, Response::Bye);
        out.push(r);
        if end || out.len() > batch.len() {
            break;
        }
    }
    drop(tx);
    drop(rx);
    agent.join().unwrap();
    out
}

#[test]
fn a_batch_sent_right_after_a_compressed_hello_is_answered_in_order() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let got = pipelined(
        t.path(),
        3,
        vec![
            lock(),
            Request::Status,
            Request::Prune { keep: 5 },
            Request::Bye,
        ],
    );
    assert!(matches!(got[0], Response::Locked), "{got:?}");
    assert!(
        matches!(
            got[1],
            Response::Status {
                current: Some(1),
                ..
            }
        ),
        "{got:?}"
    );
    assert!(matches!(got[2], Response::Pruned { .. }), "{got:?}");
    assert!(matches!(got[3], Response::Bye), "{got:?}");
}

#[test]
fn after_a_failed_request_the_rest_of_the_batch_is_not_done() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let marker = t.path().join("ran");
    let batch = vec![
        lock(),
        Request::Verify { id: Some(42) },
        Request::Hook {
            release: 1,
            run: format!("touch {}", marker.display()),
            timeout_ms: 10_000,
            env: vec![],
            wait_ms: 0,
        },
        Request::Literal {
            index: 0,
            mtime: None,
            data: vec![1, 2, 3],
            last: true,
        },
        Request::Activate {
            id: 1,
            force: false,
        },
        Request::Bye,
    ];
    for compress in [0, 3] {
        let got = pipelined(t.path(), compress, batch.clone());
        assert!(matches!(got[0], Response::Locked), "{got:?}");
        let Response::Error { message, .. } = &got[1] else {
            panic!("expected the error of Verify, got {got:?}");
        };
        assert!(message.contains("42"), "{message}");
        // The content frame is dropped; every request expecting an answer gets one.
        let not_done: Vec<(&str, &str)> = got[2..]
            .iter()
            .map(|r| match r {
                Response::NotDone { request, because } => (request.as_str(), because.as_str()),
                other => panic!("expected NotDone, got {other:?}"),
            })
            .collect();
        assert_eq!(
            not_done.iter().map(|n| n.0).collect::<Vec<_>>(),
            ["Hook", "Activate", "Bye"]
        );
        assert!(not_done.iter().all(|n| n.1 == message), "{not_done:?}");
        assert!(!marker.exists(), "a request after the failure was acted on");
        // The lock was released before the error was told: a new session takes it at once.
        let again = pipelined(t.path(), 0, vec![lock(), Request::Bye]);
        assert!(matches!(again[0], Response::Locked), "{again:?}");
    }
}

#[test]
fn a_stage_ahead_against_a_release_not_live_is_not_done_and_the_session_goes_on() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let payload = flip_manifest::encode_diff(&Default::default());
    let stale = flip_manifest::Digest([0x5a; 32]);
    let batch = vec![
        lock(),
        Request::Stage {
            label: None,
            base: flip_wire::StageBase::Diff(stale),
            payload_len: payload.len() as u64,
            digest: stale,
            ahead: None,
        },
        Request::ManifestChunk(payload),
        Request::Changes { all: false },
        Request::Status,
        Request::Bye,
    ];
    let got = pipelined(t.path(), 0, batch);
    assert!(matches!(got[0], Response::Locked), "{got:?}");
    for (r, want) in got[1..3].iter().zip(["Stage", "Changes"]) {
        match r {
            Response::NotDone { request, because } => {
                assert_eq!(request, want);
                assert!(
                    because.contains("another release than the live one"),
                    "{because}"
                );
            }
            other => panic!("expected NotDone for {want}, got {other:?}"),
        }
    }
    assert!(
        matches!(
            got[3],
            Response::Status {
                current: Some(1),
                ..
            }
        ),
        "{got:?}"
    );
    assert!(matches!(got[4], Response::Bye), "{got:?}");
    let staging: Vec<_> = std::fs::read_dir(t.path().join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(staging, ["1"], "nothing staged");
}

/// Release 1 live with `app.txt` ("v1") and `keep.txt`; the stage of release 2 (`app.txt`
/// edited, `keep.txt` kept, `new.txt` added), whole, with its `Changes`, telling the agent
/// that content for the needs of digest `ahead` follows; and what it needs: `app.txt` (#0)
/// against its previous version, `new.txt` (#2) without a basis.
fn upgrade(
    dir: &Path,
    ahead: impl Fn(&[flip_wire::Need]) -> flip_manifest::Digest,
) -> (Vec<Request>, Vec<flip_wire::Need>) {
    common::live_root(dir, &[("app.txt", b"v1"), ("keep.txt", b"same")]);
    let m = flip_manifest::Manifest::new(vec![
        common::file("app.txt", b"v2"),
        common::file("keep.txt", b"same"),
        common::file("new.txt", b"new"),
    ])
    .unwrap();
    let needs = vec![
        flip_wire::Need {
            index: 0,
            basis: Some((flip_manifest::RelPath::new("app.txt").unwrap(), 2)),
        },
        flip_wire::Need {
            index: 2,
            basis: None,
        },
    ];
    let mut batch = vec![lock()];
    batch.extend(common::stage_whole(&m));
    if let Request::Stage { ahead: a, .. } = &mut batch[1] {
        *a = Some(ahead(&needs));
    }
    batch.push(Request::Changes { all: false });
    (batch, needs)
}

fn literal(index: u32, data: &[u8]) -> Request {
    Request::Literal {
        index,
        mtime: None,
        data: data.to_vec(),
        last: true,
    }
}

/// The answers after `Locked`, `Staged` and the `Changes` frames.
fn after_changes(got: &[Response]) -> &[Response] {
    assert!(matches!(got[0], Response::Locked), "{got:?}");
    assert!(matches!(got[1], Response::Staged { .. }), "{got:?}");
    let last = got
        .iter()
        .position(|r| matches!(r, Response::Changes { last: true, .. }))
        .unwrap_or_else(|| panic!("no Changes: {got:?}"));
    &got[last + 1..]
}

#[test]
fn content_sent_with_the_stage_is_taken_when_it_is_what_the_stage_needs() {
    let t = tempfile::tempdir().unwrap();
    let (mut batch, needs) = upgrade(t.path(), flip_wire::needs_digest);
    batch.extend([
        literal(0, b"v2"),
        literal(2, b"new"),
        Request::Commit,
        Request::ActivateCommitted,
        Request::Prune { keep: 5 },
        Request::Bye,
    ]);
    let got = pipelined(t.path(), 0, batch);
    match &got[1] {
        Response::Staged { needs: n, .. } => assert_eq!(*n, needs),
        other => panic!("expected Staged, got {other:?}"),
    }
    let rest = after_changes(&got);
    assert_eq!(
        rest,
        [
            Response::Committed { id: 2 },
            Response::Activated {
                id: 2,
                previous: Some(1)
            },
            Response::Pruned { removed: vec![] },
            Response::Bye,
        ],
        "{got:?}"
    );
    assert_eq!(
        std::fs::read_link(t.path().join("current")).unwrap(),
        Path::new("releases/2")
    );
    let live = t.path().join("current");
    assert_eq!(std::fs::read(live.join("app.txt")).unwrap(), b"v2");
    assert_eq!(std::fs::read(live.join("new.txt")).unwrap(), b"new");
}

#[test]
fn content_sent_ahead_for_other_needs_is_dropped_up_to_bye_and_the_session_goes_on() {
    let t = tempfile::tempdir().unwrap();
    // The client expected only new.txt to be needed.
    let (mut batch, _) = upgrade(t.path(), |needs| flip_wire::needs_digest(&needs[1..]));
    batch.extend([
        literal(2, b"new"),
        Request::Commit,
        Request::ActivateCommitted,
        Request::Prune { keep: 5 },
        Request::Bye,
        // What it sends once it read the stage's answer: nothing of the above was done.
        literal(0, b"v2"),
        literal(2, b"new"),
        Request::Commit,
        Request::Activate {
            id: 2,
            force: false,
        },
        Request::Bye,
    ]);
    let got = pipelined(t.path(), 0, batch);
    let rest = after_changes(&got);
    for (r, want) in rest[..4]
        .iter()
        .zip(["Commit", "ActivateCommitted", "Prune", "Bye"])
    {
        match r {
            Response::NotDone { request, because } => {
                assert_eq!(request, want, "{got:?}");
                assert!(
                    because.contains("other files than the content sent ahead"),
                    "{because}"
                );
            }
            other => panic!("expected NotDone for {want}, got {other:?}"),
        }
    }
    assert_eq!(
        rest[4..],
        [
            Response::Committed { id: 2 },
            Response::Activated {
                id: 2,
                previous: Some(1)
            },
            Response::Bye,
        ],
        "{got:?}"
    );
    let live = t.path().join("current");
    assert_eq!(std::fs::read(live.join("app.txt")).unwrap(), b"v2");
    assert_eq!(std::fs::read(live.join("new.txt")).unwrap(), b"new");
    assert_eq!(std::fs::read(live.join("keep.txt")).unwrap(), b"same");
}
