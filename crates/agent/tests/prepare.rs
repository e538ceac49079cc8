//! `Prepare`: while the client's `Stage` is still on its way, the agent stages the live release
//! again, and the `Stage` starts from there. The release made is the one a plain `Stage` makes;
//! a `Prepare` the agent cannot use changes nothing but leaves nothing behind.

// Tests read back what the agent wrote: a failed read fails the test at its own line, and the
// fs helpers of the on-disk crates are theirs, not the tests'.
#![allow(clippy::disallowed_methods)]

use flip_manifest::{Digest, Manifest};
use flip_wire::{Request, Response};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::lock;

/// Release 1 live: `keep.txt`, `app.txt` ("v1") and `gone.txt`.
fn live_root(dir: &Path) -> Manifest {
    let files: &[(&str, &[u8])] = &[
        ("app.txt", b"v1"),
        ("gone.txt", b"old"),
        ("keep.txt", b"same"),
    ];
    common::live_root(dir, files);
    flip_release::Root::open(dir).unwrap().manifest(1).unwrap()
}

/// Release 2: `app.txt` edited, `keep.txt` kept, `gone.txt` removed, `new.txt` added.
fn next() -> Manifest {
    Manifest::new(vec![
        common::file("app.txt", b"v2"),
        common::file("keep.txt", b"same"),
        common::file("new.txt", b"new"),
    ])
    .unwrap()
}

/// The staging directory of release 2, once it holds `keep.txt` (or after 5 s).
fn staged_keep(dir: &Path) -> Option<std::fs::Metadata> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let m = std::fs::symlink_metadata(dir.join("releases/.staging-2/keep.txt"));
        if m.is_ok() || Instant::now() > until {
            return m.ok();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A session: `first` (after `Hello`), then, once `between` returned, the stage of [`next`]
/// with its content, commit, activation and `Bye`. Returns the answers.
fn session(dir: &Path, first: Vec<Request>, between: impl FnOnce() + Send) -> Vec<Response> {
    common::session_paused(dir, None, first, between, rest())
}

/// The stage of [`next`] with its content, commit, activation and `Bye`.
fn rest() -> Vec<Request> {
    let mut rest = common::stage_whole(&next());
    for (index, data) in [(0u32, &b"v2"[..]), (2, b"new")] {
        rest.push(Request::Literal {
            index,
            mtime: None,
            data: data.to_vec(),
            last: true,
        });
    }
    rest.extend([Request::Commit, Request::ActivateCommitted, Request::Bye]);
    rest
}

/// Release 2 is live and as [`next`] says; `keep.txt` shares release 1's inode, nothing else
/// does; no staging directory is left.
#[track_caller]
fn assert_release_2(dir: &Path, got: &[Response]) {
    assert_release(dir, got, 2)
}

/// [`assert_release_2`] for release `id`.
#[track_caller]
fn assert_release(dir: &Path, got: &[Response], id: u64) {
    assert!(
        got.contains(&Response::Activated {
            id,
            previous: Some(1)
        }),
        "{got:?}"
    );
    let r2 = dir.join(format!("releases/{id}"));
    assert_eq!(std::fs::read(r2.join("app.txt")).unwrap(), b"v2");
    assert_eq!(std::fs::read(r2.join("new.txt")).unwrap(), b"new");
    assert!(!r2.join("gone.txt").exists());
    let ino = |p: &Path| std::fs::symlink_metadata(p).unwrap().ino();
    let r1 = dir.join("releases/1");
    assert_eq!(ino(&r2.join("keep.txt")), ino(&r1.join("keep.txt")));
    assert_ne!(ino(&r2.join("app.txt")), ino(&r1.join("app.txt")));
    let names: Vec<String> = std::fs::read_dir(dir.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!names.iter().any(|n| n.starts_with('.')), "{names:?}");
    // The ledger knows every inode as it is: verify finds both releases intact.
    let root = flip_release::Root::open(dir).unwrap();
    for id in [1, id] {
        root.verify(id)
            .unwrap_or_else(|e| panic!("release {id}: {e}"));
    }
}

#[test]
fn the_stage_after_a_prepare_starts_from_the_live_release_linked_already() {
    let t = tempfile::tempdir().unwrap();
    let live = live_root(t.path());
    let first = vec![
        lock(),
        Request::Prepare {
            base: Some(live.digest()),
        },
    ];
    let got = session(t.path(), first, || {
        // Before the stage is sent, the unchanged and the changed files of release 1 are
        // linked into the staging directory of release 2.
        let keep = staged_keep(t.path()).expect("prepared");
        assert_eq!(keep.nlink(), 2);
        assert!(t.path().join("releases/.staging-2/gone.txt").exists());
    });
    assert_release_2(t.path(), &got);
}

#[test]
fn a_prepare_the_agent_cannot_use_changes_nothing() {
    for (why, base, check_live) in [
        (
            "another base",
            Some(Digest::of(b"not the live manifest")),
            false,
        ),
        ("the new release already live", None, true),
    ] {
        let t = tempfile::tempdir().unwrap();
        let live = live_root(t.path());
        let mut first = vec![lock()];
        if check_live {
            first.push(Request::CheckLive {
                digest: live.digest(),
            });
        }
        first.push(Request::Prepare { base });
        let got = session(t.path(), first, || {
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                !t.path().join("releases/.staging-2").exists(),
                "{why}: prepared"
            );
        });
        assert_release_2(t.path(), &got);
    }
}

#[test]
fn a_prepare_without_the_lock_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let live = live_root(t.path());
    let got = common::session(
        t.path(),
        None,
        vec![Request::Prepare {
            base: Some(live.digest()),
        }],
    );
    match got.last() {
        Some(Response::Error { message, .. }) => assert!(message.contains("lock"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(!t.path().join("releases/.staging-2").exists());
}

/// A request between `Prepare` and `Stage` drops what was prepared (a prune removes the
/// staging directories): the stage is made as without it.
#[test]
fn a_request_between_prepare_and_stage_drops_the_prepared_stage() {
    let t = tempfile::tempdir().unwrap();
    let live = live_root(t.path());
    let first = vec![
        lock(),
        Request::Prepare {
            base: Some(live.digest()),
        },
    ];
    let got = common::session_paused(
        t.path(),
        None,
        first,
        || assert!(staged_keep(t.path()).is_some(), "prepared"),
        [Request::Prune { keep: 5 }]
            .into_iter()
            .chain(rest())
            .collect(),
    );
    assert!(
        got.contains(&Response::Pruned { removed: vec![] }),
        "{got:?}"
    );
    // Release 2's id went to the prepared stage.
    assert_release(t.path(), &got, 3);
}
