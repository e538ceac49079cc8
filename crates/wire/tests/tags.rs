//! The protocol's message tags are pinned: bincode encodes an enum variant by its position, so
//! reordering, inserting or removing a variant silently changes what every older or newer peer
//! reads. Each variant below is encoded and its first byte (the varint tag) compared with the
//! number it has on the wire. A change that moves a tag must bump `PROTOCOL` and this table.

use flip_manifest::{Digest, RelPath};
use flip_wire::{
    ErrorClass, Holder, HookStream, ProbeState, Purpose, Request, Response, Severity, StageBase,
    PROTOCOL,
};

fn tag<T: serde::Serialize>(v: &T) -> u8 {
    let bytes = bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap();
    bytes[0]
}

fn path() -> RelPath {
    RelPath::new("a").unwrap()
}

#[test]
fn protocol_version_matches_the_pinned_tags() {
    assert_eq!(
        PROTOCOL, 15,
        "a protocol bump must re-check the tag tables below"
    );
}

#[test]
fn request_tags_are_pinned() {
    let d = Digest([7; 32]);
    let cases: Vec<(Request, u8)> = vec![
        (
            Request::Hello {
                magic: *b"FLIP",
                protocol: PROTOCOL,
                version: String::new(),
                compress: 0,
            },
            0,
        ),
        (
            Request::Lock {
                wait: false,
                holder: Holder {
                    pid: 1,
                    host: String::new(),
                    user: String::new(),
                    since: 0,
                    what: Purpose::Deploy,
                    run: String::new(),
                },
            },
            1,
        ),
        (Request::Status, 2),
        (Request::GetManifest { id: 1 }, 3),
        (
            Request::Stage {
                label: None,
                base: StageBase::Whole,
                payload_len: 0,
                digest: d,
                ahead: None,
            },
            4,
        ),
        (Request::Probe(vec![]), 5),
        (Request::ManifestChunk(vec![]), 6),
        (Request::Signatures(vec![]), 7),
        (
            Request::Literal {
                index: 0,
                mtime: None,
                data: vec![],
                last: true,
            },
            8,
        ),
        (
            Request::Delta {
                index: 0,
                basis: path(),
                mtime: None,
                data: vec![],
                last: true,
            },
            9,
        ),
        (
            Request::Patch {
                index: 0,
                basis: path(),
                basis_digest: d,
                mtime: None,
                data: vec![],
                last: true,
            },
            10,
        ),
        (Request::Commit, 11),
        (
            Request::Activate {
                id: 1,
                force: false,
            },
            12,
        ),
        (
            Request::Rollback {
                to: None,
                force: false,
            },
            13,
        ),
        (Request::Prune { keep: 1 }, 14),
        (Request::Verify { id: None }, 15),
        (Request::Bye, 16),
        (Request::Changes { all: false }, 17),
        (Request::Discard { id: 1 }, 18),
        (Request::CheckLive { digest: d }, 19),
        (
            Request::Shared {
                dirs: vec![path()],
                files: vec![],
                writable: vec![],
                mode: 0o775,
                owner: None,
            },
            20,
        ),
        (Request::Doctor, 21),
        (
            Request::Hook {
                release: 1,
                run: String::new(),
                timeout_ms: 0,
                env: vec![],
                wait_ms: 0,
            },
            22,
        ),
        (Request::StreamStart { files: 0, bytes: 0 }, 23),
        (
            Request::Stream {
                path: path(),
                mode: 0o644,
                mtime: None,
                data: vec![],
                last: true,
            },
            24,
        ),
        (Request::Check { id: 1 }, 25),
        (Request::CanDeploy, 26),
        (Request::EndIfLive { keep: 1 }, 27),
        (Request::BasisSignatures, 28),
        (Request::ActivateCommitted, 29),
        (Request::Prepare { base: Some(d) }, 30),
    ];
    for (req, want) in &cases {
        assert_eq!(tag(req), *want, "tag of {req:?}");
    }
}

#[test]
fn response_tags_are_pinned() {
    let cases: Vec<(Response, u8)> = vec![
        (
            Response::Welcome {
                protocol: PROTOCOL,
                version: String::new(),
                host: String::new(),
                root: String::new(),
            },
            0,
        ),
        (
            Response::Waiting {
                holder: String::new(),
            },
            1,
        ),
        (Response::Locked, 2),
        (
            Response::Status {
                current: None,
                releases: vec![],
            },
            3,
        ),
        (
            Response::ManifestChunk {
                data: vec![],
                last: true,
            },
            4,
        ),
        (
            Response::Staged {
                id: 1,
                previous: None,
                needs: vec![],
                linked: 0,
                copied: 0,
                removed: 0,
            },
            5,
        ),
        (
            Response::Signature {
                index: 0,
                sig: vec![],
            },
            6,
        ),
        (Response::SignaturesDone, 7),
        (Response::Probed(vec![]), 8),
        (Response::Committed { id: 1 }, 9),
        (
            Response::Activated {
                id: 1,
                previous: None,
            },
            10,
        ),
        (Response::Pruned { removed: vec![] }, 11),
        (
            Response::Verified {
                id: 1,
                problems: vec![],
            },
            12,
        ),
        (
            Response::Error {
                class: ErrorClass::Target,
                message: String::new(),
            },
            13,
        ),
        (Response::Bye, 14),
        (
            Response::Notices {
                warnings: vec![],
                leftovers: None,
            },
            15,
        ),
        (
            Response::Changes {
                counts: Default::default(),
                items: vec![],
                last: true,
            },
            16,
        ),
        (Response::Discarded { id: 1 }, 17),
        (Response::LiveIntact { id: None }, 18),
        (
            Response::SharedState {
                present: vec![path()],
            },
            19,
        ),
        (
            Response::Findings {
                time_ms: 0,
                findings: vec![],
            },
            20,
        ),
        (
            Response::HookOutput {
                stream: HookStream::Stdout,
                line: String::new(),
            },
            21,
        ),
        (
            Response::HookDone {
                status: Some(0),
                signal: None,
                timed_out: false,
                duration_ms: 0,
            },
            22,
        ),
        (
            Response::NotDone {
                request: String::new(),
                because: String::new(),
            },
            23,
        ),
        (Response::Checked { id: 1 }, 24),
        (Response::Deployable { exists: true }, 25),
    ];
    for (resp, want) in &cases {
        assert_eq!(tag(resp), *want, "tag of {resp:?}");
    }
}

#[test]
fn nested_enum_tags_are_pinned() {
    let d = Digest([0; 32]);
    let states = [
        ProbeState::Same,
        ProbeState::Below,
        ProbeState::Differs,
        ProbeState::Absent,
    ];
    for (i, st) in states.iter().enumerate() {
        assert_eq!(tag(st) as usize, i, "tag of {st:?}");
    }
    assert_eq!(tag(&HookStream::Stdout), 0);
    assert_eq!(tag(&HookStream::Stderr), 1);
    assert_eq!(tag(&StageBase::Whole), 0);
    assert_eq!(tag(&StageBase::Diff(d)), 1);
    assert_eq!(tag(&StageBase::Dirs(d)), 2);
    let purposes = [
        Purpose::Deploy,
        Purpose::Rollback,
        Purpose::Activate,
        Purpose::Prune,
    ];
    for (i, p) in purposes.iter().enumerate() {
        assert_eq!(tag(p) as usize, i, "tag of {p:?}");
    }
    let classes = [
        ErrorClass::Locked,
        ErrorClass::Target,
        ErrorClass::Integrity,
        ErrorClass::NoSpace,
        ErrorClass::Io,
        ErrorClass::BadRequest,
        ErrorClass::Protocol,
        ErrorClass::Internal,
        ErrorClass::Duplicate,
    ];
    for (i, c) in classes.iter().enumerate() {
        assert_eq!(tag(c) as usize, i, "tag of {c:?}");
    }
    let severities = [
        Severity::Ok,
        Severity::Note,
        Severity::Warning,
        Severity::Problem,
    ];
    for (i, s) in severities.iter().enumerate() {
        assert_eq!(tag(s) as usize, i, "tag of {s:?}");
    }
}
