//! A first deploy's files streamed before their manifest (`StreamStart`, `Stream`): the agent
//! commits them only when the manifest lists each exactly, and refuses anything else with
//! nothing left behind (no release, no staging, no target it created).

// Tests read back what the agent wrote.
#![allow(clippy::disallowed_methods)]

use flip_manifest::{Entry, EntryKind, Manifest, RelPath};
use flip_wire::{ErrorClass, Request, Response};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

mod common;
use common::{file_mode as file, lock, stage_whole};

/// One agent session on `root` fed with `frames` after a Hello.
fn session(root: &Path, frames: Vec<Request>) -> Vec<Response> {
    common::session(root, None, frames)
}

fn dir(path: &str) -> Entry {
    Entry {
        path: RelPath::new(path).unwrap(),
        kind: EntryKind::Dir { mode: 0o755 },
    }
}

fn stream(path: &str, data: &[u8], mode: u32) -> Request {
    Request::Stream {
        path: RelPath::new(path).unwrap(),
        mode,
        mtime: Some((1_600_000_000, 0)),
        data: data.to_vec(),
        last: true,
    }
}

/// The session ended in an error of `class` naming `needle`, and the target it created is gone.
#[track_caller]
fn refused_first(frames: Vec<Request>, class: ErrorClass, needle: &str) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("t");
    let rs = session(&root, frames);
    match rs.last() {
        Some(Response::Error { class: c, message }) => {
            assert_eq!(*c, class, "{message}");
            assert!(message.contains(needle), "{message}");
        }
        other => panic!("expected an error, got {other:?} after {rs:?}"),
    }
    assert!(
        !root.exists(),
        "the target this session created is removed: {:?}",
        std::fs::read_dir(&root).map(|d| d.count())
    );
}

fn start(files: u64, bytes: u64) -> Vec<Request> {
    vec![
        lock(),
        Request::Status,
        Request::StreamStart { files, bytes },
    ]
}

#[test]
fn streamed_files_listed_exactly_by_the_manifest_are_committed() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("t");
    let m = Manifest::new(vec![
        file("a", b"alpha", 0o644),
        dir("d"),
        dir("d/e"),
        file("d/e/run", b"#!/bin/sh\n", 0o4755),
        file("d/late", b"sent after the manifest", 0o600),
        file("empty", b"", 0o644),
    ])
    .unwrap();
    let mut frames = start(4, 64);
    frames.push(stream("d/e/run", b"#!/bin/sh\n", 0o4755));
    frames.push(stream("a", b"alpha", 0o644));
    frames.push(stream("empty", b"", 0o644));
    frames.extend(stage_whole(&m));
    // Not streamed: what the stage answers it needs (index 2 of the files, in manifest order:
    // a, d/e/run, d/late, empty).
    frames.push(Request::Literal {
        index: 2,
        mtime: None,
        data: b"sent after the manifest".to_vec(),
        last: true,
    });
    frames.push(Request::Commit);
    frames.push(Request::Bye);
    let rs = session(&root, frames);
    let staged = rs
        .iter()
        .find_map(|r| match r {
            Response::Staged { needs, .. } => Some(needs.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{rs:?}"));
    assert_eq!(
        staged.iter().map(|n| n.index).collect::<Vec<_>>(),
        [2],
        "only the file not streamed is needed"
    );
    assert!(
        rs.iter()
            .any(|r| matches!(r, Response::Committed { id: 1 })),
        "{rs:?}"
    );
    let rel = root.join("releases/1");
    assert_eq!(std::fs::read(rel.join("a")).unwrap(), b"alpha");
    assert_eq!(std::fs::read(rel.join("d/e/run")).unwrap(), b"#!/bin/sh\n");
    assert_eq!(
        std::fs::read(rel.join("d/late")).unwrap(),
        b"sent after the manifest"
    );
    let mode = |p: &str| std::fs::metadata(rel.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("d/e/run"), 0o4755);
    assert_eq!(mode("d/late"), 0o600);
    assert_eq!(
        mode("d"),
        0o755,
        "directories made for streamed files get their modes"
    );
    assert_eq!(mode("d/e"), 0o755);
    let log = std::fs::read_to_string(root.join(".flip/log")).unwrap();
    assert!(log.contains("\"streamed\":3"), "{log}");
    let staging: Vec<_> = std::fs::read_dir(root.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(staging, ["1"]);
}

#[test]
fn a_streamed_file_the_manifest_lacks_is_refused() {
    let m = Manifest::new(vec![file("a", b"1", 0o644)]).unwrap();
    let mut frames = start(2, 2);
    frames.push(stream("a", b"1", 0o644));
    frames.push(stream("extra", b"2", 0o644));
    frames.extend(stage_whole(&m));
    frames.push(Request::Commit);
    refused_first(
        frames,
        ErrorClass::BadRequest,
        "extra was streamed but the manifest does not list it",
    );
}

#[test]
fn a_streamed_file_with_another_hash_is_refused() {
    let m = Manifest::new(vec![file("a", b"1", 0o644)]).unwrap();
    let mut frames = start(1, 1);
    frames.push(stream("a", b"2", 0o644));
    frames.extend(stage_whole(&m));
    frames.push(Request::Commit);
    refused_first(
        frames,
        ErrorClass::Integrity,
        "a: written content does not match",
    );
}

#[test]
fn a_streamed_file_with_another_mode_is_refused() {
    let m = Manifest::new(vec![file("a", b"1", 0o644)]).unwrap();
    let mut frames = start(1, 1);
    frames.push(stream("a", b"1", 0o755));
    frames.extend(stage_whole(&m));
    refused_first(frames, ErrorClass::Integrity, "mode 755");
}

#[test]
fn a_file_neither_streamed_nor_sent_is_refused_at_commit() {
    let m = Manifest::new(vec![file("a", b"1", 0o644), file("b", b"2", 0o644)]).unwrap();
    let mut frames = start(2, 2);
    frames.push(stream("a", b"1", 0o644));
    frames.extend(stage_whole(&m));
    frames.push(Request::Commit);
    refused_first(frames, ErrorClass::BadRequest, "never arrived, first b");
}

#[test]
fn more_content_than_announced_is_refused() {
    let mut frames = start(1, 1);
    frames.push(stream("a", b"12", 0o644));
    refused_first(frames, ErrorClass::BadRequest, "more content streamed than");
}

#[test]
fn more_files_than_announced_is_refused() {
    let mut frames = start(1, 10);
    frames.push(stream("a", b"1", 0o644));
    frames.push(stream("b", b"1", 0o644));
    refused_first(frames, ErrorClass::BadRequest, "more files streamed than");
}

#[test]
fn a_file_streamed_twice_or_below_a_streamed_file_is_refused() {
    let mut frames = start(3, 10);
    frames.push(stream("a", b"1", 0o644));
    frames.push(stream("a", b"1", 0o644));
    let m = Manifest::new(vec![file("a", b"1", 0o644)]).unwrap();
    frames.extend(stage_whole(&m));
    refused_first(frames, ErrorClass::Io, "a");
    let mut frames = start(3, 10);
    frames.push(stream("a", b"1", 0o644));
    frames.push(stream("a/b", b"1", 0o644));
    frames.extend(stage_whole(&m));
    refused_first(frames, ErrorClass::Io, "a");
}

#[test]
fn a_mode_beyond_the_permission_bits_is_refused() {
    let mut frames = start(1, 10);
    frames.push(stream("a", b"1", 0o170644));
    let m = Manifest::new(vec![file("a", b"1", 0o644)]).unwrap();
    frames.extend(stage_whole(&m));
    refused_first(frames, ErrorClass::BadRequest, "is not a permission mode");
}

#[test]
fn streaming_into_a_target_with_a_live_release_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("t");
    // A first release, made live, by a streamed deploy.
    let m = Manifest::new(vec![file("a", b"1", 0o644)]).unwrap();
    let mut frames = start(1, 1);
    frames.push(stream("a", b"1", 0o644));
    frames.extend(stage_whole(&m));
    frames.extend([
        Request::Commit,
        Request::Activate {
            id: 1,
            force: false,
        },
        Request::Bye,
    ]);
    let rs = session(&root, frames);
    assert!(matches!(rs.last(), Some(Response::Bye)), "{rs:?}");
    let mut frames = start(1, 1);
    frames.push(stream("a", b"2", 0o644));
    let rs = session(&root, frames);
    match rs.last() {
        Some(Response::Error { class, message }) => {
            assert_eq!(*class, ErrorClass::BadRequest, "{message}");
            assert!(message.contains("release 1 is live"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(root.join("current/a")).unwrap(), b"1");
    let names: Vec<_> = std::fs::read_dir(root.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["1"], "no staging left");
}

#[test]
fn an_announcement_of_more_files_than_a_manifest_can_list_is_refused() {
    refused_first(
        start(1 << 40, 1),
        ErrorClass::BadRequest,
        "files announced, more than the limit",
    );
}
