//! A hostile or broken client gets a clear error and nothing else: no file outside the root, no
//! release from bad data, `current` untouched, no staging directory left.

// Tests read back what the agent wrote: a failed read fails the test at its own line, and the
// fs helpers of the on-disk crates are theirs, not the tests'.
#![allow(clippy::disallowed_methods)]

use flip_manifest::{Digest, Entry, EntryKind, Manifest, RelPath};
use flip_release::Root;
use flip_wire::{ErrorClass, Request, Response, SigItem, MAGIC, PROTOCOL};
use std::path::Path;

mod common;
use common::{file, holder, lock, session};

/// A root with release 1 live, holding `old.txt` (20 KiB).
fn live_root(dir: &Path) -> Root {
    common::live_root(dir, &[("old.txt", &[b'x'; 20 << 10])])
}

/// Runs a session that must end in an error of `class` whose message contains `needle`, with
/// everything on disk as it was.
#[track_caller]
fn refused(root: &Path, frames: Vec<Request>, class: ErrorClass, needle: &str) {
    let (got, msg) = last_error(&session(root, None, frames));
    assert_eq!(got, class, "{msg}");
    assert!(msg.contains(needle), "{msg}");
    assert_intact(root);
}

fn last_error(rs: &[Response]) -> (ErrorClass, String) {
    match rs.last() {
        Some(Response::Error { class, message }) => (*class, message.clone()),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Everything stays as it was: release 1 live, no other release, no staging.
fn assert_intact(dir: &Path) {
    let link = std::fs::read_link(dir.join("current")).unwrap();
    assert_eq!(link.to_str(), Some("releases/1"));
    let mut names: Vec<String> = std::fs::read_dir(dir.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["1"], "releases/ holds only the live release");
    assert_eq!(
        std::fs::read(dir.join("releases/1/old.txt")).unwrap(),
        vec![b'x'; 20 << 10]
    );
}

fn stage_frames(m: &Manifest, digest: Option<[u8; 32]>) -> Vec<Request> {
    let bytes = flip_manifest::encode(m);
    vec![
        Request::Lock {
            wait: false,
            holder: holder(),
        },
        Request::Stage {
            label: None,
            base: flip_wire::StageBase::Whole,
            payload_len: bytes.len() as u64,
            digest: digest.map_or(m.digest(), Digest),
            ahead: None,
        },
        Request::ManifestChunk(bytes),
    ]
}

#[test]
fn garbage_instead_of_a_hello() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let rs = session(t.path(), Some(b"GET / HTTP/1.1\r\n\r\n".to_vec()), vec![]);
    let (class, msg) = last_error(&rs);
    assert_eq!(class, ErrorClass::Protocol);
    assert!(msg.contains("does not speak flip's protocol"), "{msg}");
    assert_intact(t.path());
}

#[test]
fn staging_needs_the_lock() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let m = Manifest::new(vec![file("a", b"1")]).unwrap();
    let mut frames = stage_frames(&m, None);
    frames.remove(0);
    refused(t.path(), frames, ErrorClass::Protocol, "needs the lock");
}

#[test]
fn a_manifest_that_does_not_match_its_digest() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let m = Manifest::new(vec![file("a", b"1")]).unwrap();
    let rs = session(t.path(), None, stage_frames(&m, Some([7; 32])));
    let (class, msg) = last_error(&rs);
    assert_eq!(class, ErrorClass::BadRequest);
    assert!(msg.contains("does not match its digest"), "{msg}");
    assert_intact(t.path());
}

#[test]
fn content_for_a_file_nobody_asked_for() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let m = Manifest::new(vec![file("a", b"1")]).unwrap();
    let mut frames = stage_frames(&m, None);
    frames.push(Request::Literal {
        index: 4_000_000_000,
        mtime: None,
        data: b"1".to_vec(),
        last: true,
    });
    refused(
        t.path(),
        frames,
        ErrorClass::BadRequest,
        "not awaiting content",
    );
}

#[test]
fn more_bytes_than_the_manifest_says() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let m = Manifest::new(vec![file("a", b"12")]).unwrap();
    let mut frames = stage_frames(&m, None);
    frames.push(Request::Literal {
        index: 0,
        mtime: None,
        data: vec![0; 1 << 20],
        last: true,
    });
    refused(
        t.path(),
        frames,
        ErrorClass::Integrity,
        "more than the 2 bytes",
    );
}

#[test]
fn content_that_does_not_hash_to_the_manifest() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let m = Manifest::new(vec![file("a", b"12")]).unwrap();
    let mut frames = stage_frames(&m, None);
    frames.push(Request::Literal {
        index: 0,
        mtime: None,
        data: b"21".to_vec(),
        last: true,
    });
    frames.push(Request::Commit);
    refused(
        t.path(),
        frames,
        ErrorClass::Integrity,
        "a: written content does not match",
    );
}

#[test]
fn a_delta_against_a_basis_outside_the_previous_release() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let m = Manifest::new(vec![file("a", &[1; 20 << 10])]).unwrap();
    let mut frames = stage_frames(&m, None);
    frames.push(Request::Signatures(vec![SigItem {
        index: 0,
        basis: RelPath::new(".flip/lock").unwrap(),
    }]));
    refused(
        t.path(),
        frames,
        ErrorClass::BadRequest,
        "is not the basis offered for it",
    );
}

#[test]
fn a_commit_with_files_missing() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let m = Manifest::new(vec![file("a", b"1"), file("b", b"2")]).unwrap();
    let mut frames = stage_frames(&m, None);
    frames.push(Request::Commit);
    refused(
        t.path(),
        frames,
        ErrorClass::BadRequest,
        "2 file(s) never arrived",
    );
}

/// A symlink to a directory outside the root, then a file "below" it: the manifest is refused
/// (a symlink cannot be a parent), so nothing is ever written through the link.
#[test]
fn a_file_below_a_symlink_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let root_dir = t.path().join("root");
    live_root(&root_dir);
    let entries = vec![
        Entry {
            path: RelPath::new("evil").unwrap(),
            kind: EntryKind::Symlink {
                target: outside.path().to_str().unwrap().to_string(),
            },
        },
        file("evil/owned", b"pwned"),
    ];
    // Manifest::new refuses this too; build the encoding by hand from a valid twin.
    assert!(Manifest::new(entries).is_err());
    let twin = Manifest::new(vec![
        Entry {
            path: RelPath::new("evil").unwrap(),
            kind: EntryKind::Dir { mode: 0o755 },
        },
        file("evil/owned", b"pwned"),
    ])
    .unwrap();
    let mut bytes = flip_manifest::encode(&twin);
    // Entry 1 of the twin is "evil" as a dir (kind byte 0, mode 0o755 as varint 0xed 0x03);
    // turn it into a symlink (kind 2) to `outside`.
    let target = outside.path().to_str().unwrap().as_bytes().to_vec();
    let pos = bytes.windows(4).position(|w| w == b"evil").unwrap() + 4;
    assert_eq!(&bytes[pos..pos + 3], &[0, 0xed, 0x03]);
    let mut replacement = vec![2, target.len() as u8];
    replacement.extend_from_slice(&target);
    bytes.splice(pos..pos + 3, replacement);
    let frames = vec![
        Request::Lock {
            wait: false,
            holder: holder(),
        },
        Request::Stage {
            label: None,
            base: flip_wire::StageBase::Whole,
            payload_len: bytes.len() as u64,
            digest: Digest(*blake3::hash(&bytes).as_bytes()),
            ahead: None,
        },
        Request::ManifestChunk(bytes),
        Request::Literal {
            index: 0,
            mtime: None,
            data: b"pwned".to_vec(),
            last: true,
        },
        Request::Commit,
    ];
    let (class, msg) = last_error(&session(&root_dir, None, frames));
    assert_eq!(class, ErrorClass::BadRequest);
    assert!(
        msg.contains("evil/owned: its parent evil is not a directory"),
        "{msg}"
    );
    assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    assert_intact(&root_dir);
}

#[test]
fn an_oversized_frame_is_refused_before_allocation() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let mut bytes = Vec::new();
    // A valid Hello, then a header claiming a 4 GiB frame.
    let hello = Request::Hello {
        magic: MAGIC,
        protocol: PROTOCOL,
        version: "t".into(),
        compress: 0,
    };
    let payload = bincode::serde::encode_to_vec(&hello, bincode::config::standard()).unwrap();
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&payload);
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    let rs = session(t.path(), Some(bytes), vec![]);
    assert!(
        matches!(rs.first(), Some(Response::Welcome { .. })),
        "{rs:?}"
    );
    let (class, msg) = last_error(&rs);
    assert_eq!(class, ErrorClass::Protocol);
    assert!(msg.contains("exceeds the limit"), "{msg}");
    assert_intact(t.path());
}

#[test]
fn a_patch_against_a_version_the_agent_does_not_hold() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let new = vec![b'y'; 20 << 10];
    let m = Manifest::new(vec![file("old.txt", &new)]).unwrap();
    let mut frames = stage_frames(&m, None);
    frames.push(Request::Patch {
        index: 0,
        basis: RelPath::new("old.txt").unwrap(),
        basis_digest: Digest([9; 32]),
        mtime: None,
        data: vec![0; 16],
        last: true,
    });
    refused(t.path(), frames, ErrorClass::BadRequest, "does not hold");
}

#[test]
fn a_patch_that_inflates_beyond_the_manifest_size() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let old = vec![b'x'; 20 << 10];
    let m = Manifest::new(vec![file("old.txt", b"short")]).unwrap();
    // A valid zstd frame that decompresses to 10 MiB.
    let bomb = zstd::bulk::compress(&vec![0u8; 10 << 20], 19).unwrap();
    let mut frames = stage_frames(&m, None);
    frames.push(Request::Patch {
        index: 0,
        basis: RelPath::new("old.txt").unwrap(),
        basis_digest: Digest::of(&old),
        mtime: None,
        data: bomb,
        last: true,
    });
    refused(
        t.path(),
        frames,
        ErrorClass::Integrity,
        "more than the 5 bytes",
    );
}

/// A session that must end in a protocol error naming `needle`, before anything was staged.
#[track_caller]
fn refused_before_the_lock(t: &Path, frame: Request, needle: &str) {
    refused(t, vec![frame], ErrorClass::Protocol, needle);
}

#[test]
fn nothing_is_read_or_decoded_before_the_lock() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let old = RelPath::new("old.txt").unwrap();
    // A Stage announcing the largest manifest: refused before a single chunk is read.
    refused_before_the_lock(
        t.path(),
        Request::Stage {
            label: None,
            base: flip_wire::StageBase::Whole,
            payload_len: flip_wire::MAX_MANIFEST,
            digest: Digest([0; 32]),
            ahead: None,
        },
        "needs the lock",
    );
    refused_before_the_lock(
        t.path(),
        Request::Probe(vec![flip_wire::ProbeItem {
            dir: String::new(),
            flat: [0; 8],
            merkle: [0; 8],
        }]),
        "needs the lock",
    );
    refused_before_the_lock(
        t.path(),
        Request::ManifestChunk(vec![0; 1 << 20]),
        "outside Stage",
    );
    refused_before_the_lock(
        t.path(),
        Request::Signatures(vec![SigItem {
            index: 0,
            basis: old.clone(),
        }]),
        "no release is being staged",
    );
    for content in [
        Request::Literal {
            index: 0,
            mtime: None,
            data: vec![1; 1000],
            last: false,
        },
        Request::Delta {
            index: 0,
            basis: old.clone(),
            mtime: None,
            data: vec![1; 1000],
            last: false,
        },
        Request::Patch {
            index: 0,
            basis: old.clone(),
            basis_digest: Digest([0; 32]),
            mtime: None,
            data: vec![1; 1000],
            last: false,
        },
    ] {
        refused_before_the_lock(t.path(), content, "no release is being staged");
    }
}

/// The encoding of a manifest whose paths share long prefixes: 15 nested directories of
/// 255-byte names, then `n` directories inside, each ~11 bytes encoded and ~4 KiB decoded.
/// Written by hand (as `flip_manifest::encode` would) so this test never holds it decoded.
fn expanding_manifest(n: usize) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut out = b"FLIPMAN1".to_vec();
    varint(&mut out, 15 + n as u64);
    let mut prev = String::new();
    // `known`: a length both paths are known to share (saves comparing 4 KiB per entry).
    let mut put = |out: &mut Vec<u8>, path: String, known: usize| {
        let shared = known
            + prev.as_bytes()[known..]
                .iter()
                .zip(&path.as_bytes()[known..])
                .take_while(|(a, b)| a == b)
                .count();
        varint(out, shared as u64);
        varint(out, (path.len() - shared) as u64);
        out.extend_from_slice(&path.as_bytes()[shared..]);
        out.extend_from_slice(&[0, 0xed, 0x03]); // a directory, mode 0o755
        prev = path;
    };
    let mut path = String::new();
    for i in 0..15 {
        if i > 0 {
            path.push('/');
        }
        path.push_str(&"x".repeat(254));
        path.push((b'a' + i as u8) as char);
        put(&mut out, path.clone(), 0);
    }
    for i in 0..n {
        put(&mut out, format!("{path}/{i:06}"), path.len());
    }
    out
}

#[test]
fn a_manifest_that_would_expand_far_beyond_its_bytes_is_refused() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    // ~1.1 MB on the wire, ~400 MB of paths once decoded.
    let bytes = expanding_manifest(100_000);
    assert!(bytes.len() < 2 << 20, "{}", bytes.len());
    let frames = vec![
        lock(),
        Request::Stage {
            label: None,
            base: flip_wire::StageBase::Whole,
            payload_len: bytes.len() as u64,
            digest: Digest(*blake3::hash(&bytes).as_bytes()),
            ahead: None,
        },
        Request::ManifestChunk(bytes),
    ];
    refused(
        t.path(),
        frames,
        ErrorClass::BadRequest,
        "bytes of memory once decoded",
    );
}

/// Stage frames for a release where `old.txt` (20 KiB, live) changes to `new` content: the
/// agent needs file #0 with `old.txt` as its basis.
fn changed_old_txt(new: &[u8]) -> Vec<Request> {
    let m = Manifest::new(vec![file("old.txt", new)]).unwrap();
    stage_frames(&m, None)
}

#[test]
fn signatures_are_bounded_by_the_plan() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let old = RelPath::new("old.txt").unwrap();
    let item = |index| SigItem {
        index,
        basis: old.clone(),
    };
    // The same large basis named thousands of times for one file.
    let mut frames = changed_old_txt(&[b'y'; 20 << 10]);
    frames.push(Request::Signatures(vec![item(0); 5000]));
    refused(
        t.path(),
        frames,
        ErrorClass::BadRequest,
        "5000 signatures asked for, but only 1 files are being transferred",
    );
    // Two files needed: one asked twice, or each once but one with another basis than the
    // one offered.
    let m = Manifest::new(vec![file("a.txt", &[b'a'; 9000]), file("old.txt", b"new")]).unwrap();
    let mut frames = stage_frames(&m, None);
    frames.push(Request::Signatures(vec![item(1), item(1)]));
    refused(
        t.path(),
        frames,
        ErrorClass::BadRequest,
        "signature asked twice for file #1",
    );
    let mut frames = stage_frames(&m, None);
    frames.push(Request::Signatures(vec![item(0), item(1)]));
    refused(
        t.path(),
        frames,
        ErrorClass::BadRequest,
        "file #0: old.txt is not the basis offered for it",
    );
    // The honest request is answered: one signature, then done.
    let mut frames = changed_old_txt(&[b'y'; 20 << 10]);
    frames.push(Request::Signatures(vec![item(0)]));
    frames.push(Request::Bye);
    let rs = session(t.path(), None, frames);
    let sigs: Vec<_> = rs
        .iter()
        .filter(|r| matches!(r, Response::Signature { index: 0, .. }))
        .collect();
    assert_eq!(sigs.len(), 1, "{rs:?}");
    assert!(rs.contains(&Response::SignaturesDone), "{rs:?}");
}

#[test]
fn basis_signatures_sign_the_bases_of_the_files_a_client_without_old_content_deltas() {
    let t = tempfile::tempdir().unwrap();
    let big = [b'x'; 20 << 10];
    common::live_root(t.path(), &[("old.txt", &big), ("small.txt", b"tiny")]);
    // Nothing staged: nothing to sign.
    refused(
        t.path(),
        vec![lock(), Request::BasisSignatures],
        ErrorClass::Protocol,
        "no release is being staged",
    );
    // new.txt has no basis; small.txt's is under DELTA_MIN (sent whole); old.txt (#1) goes as
    // a delta against its previous version: its basis alone is signed.
    let m = Manifest::new(vec![
        file("new.txt", &[b'z'; 20 << 10]),
        file("old.txt", &[b'y'; 20 << 10]),
        file("small.txt", b"tiny, edited"),
    ])
    .unwrap();
    let mut frames = stage_frames(&m, None);
    frames.push(Request::BasisSignatures);
    frames.push(Request::Bye);
    let rs = session(t.path(), None, frames);
    let staged = rs.iter().find_map(|r| match r {
        Response::Staged { needs, .. } => Some(needs.len()),
        _ => None,
    });
    assert_eq!(staged, Some(3), "{rs:?}");
    let signed: Vec<u32> = rs
        .iter()
        .filter_map(|r| match r {
            Response::Signature { index, sig } if !sig.is_empty() => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(signed, vec![1], "{rs:?}");
    let done = rs.iter().position(|r| *r == Response::SignaturesDone);
    let last_sig = rs
        .iter()
        .rposition(|r| matches!(r, Response::Signature { .. }));
    assert!(done > last_sig, "{rs:?}");
}

#[test]
fn activate_committed_without_a_commit_is_refused() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    refused(
        t.path(),
        vec![lock(), Request::ActivateCommitted],
        ErrorClass::Protocol,
        "this session committed no release",
    );
}

#[test]
fn a_list_of_a_million_tiny_paths_is_refused_at_decoding() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let mut frames = changed_old_txt(&[b'y'; 20 << 10]);
    // Under 6 MB of frame; ~60 MB of list slots and paths once decoded.
    let items: Vec<SigItem> = (0..1_000_000u32)
        .map(|i| SigItem {
            index: i,
            basis: RelPath::new(["a", "b", "c"][i as usize % 3]).unwrap(),
        })
        .collect();
    frames.push(Request::Signatures(items));
    refused(
        t.path(),
        frames,
        ErrorClass::Protocol,
        "bytes of memory once decoded",
    );
}

#[test]
fn a_release_larger_than_the_free_space_is_refused_before_any_content() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let tib = Entry {
        path: RelPath::new("huge.bin").unwrap(),
        kind: EntryKind::File {
            mode: 0o644,
            size: 1 << 40,
            digest: Digest([1; 32]),
        },
    };
    let m = Manifest::new(vec![tib, file("old.txt", &[b'x'; 20 << 10])]).unwrap();
    let mut frames = stage_frames(&m, None);
    frames.push(Request::Literal {
        index: 0,
        mtime: None,
        data: vec![0; 1 << 20],
        last: false,
    });
    let rs = session(t.path(), None, frames);
    assert!(
        !rs.iter().any(|r| matches!(r, Response::Staged { .. })),
        "{rs:?}"
    );
    let (class, msg) = last_error(&rs);
    assert_eq!(class, ErrorClass::NoSpace, "{msg}");
    assert!(
        msg.contains("no space left on device for the release: its new files need 1099511627776 bytes (the largest: huge.bin, 1099511627776 bytes)"),
        "{msg}"
    );
    assert_intact(t.path());
}

/// A delta of COPY commands (6 bytes each, 20 KiB of output each).
fn copies(n: usize) -> Vec<u8> {
    let mut d = 0x7273_0236u32.to_be_bytes().to_vec();
    for _ in 0..n {
        // COPY, 1-byte offset 0, 4-byte length 20480.
        d.extend_from_slice(&[0x47, 0, 0, 0, 0x50, 0]);
    }
    d.push(0);
    d
}

#[test]
fn a_tiny_delta_expanding_into_gigabytes_stops_at_the_manifest_size() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let old = RelPath::new("old.txt").unwrap();
    // 1 MB of delta claiming 3.4 GiB of output, sent in small chunks: applied as it
    // arrives, refused at the first byte past the file's 20 KiB.
    let delta = copies(1_400_000 / 8);
    let mut frames = changed_old_txt(&[b'y'; 20 << 10]);
    for (i, c) in delta.chunks(4096).enumerate() {
        frames.push(Request::Delta {
            index: 0,
            basis: old.clone(),
            mtime: None,
            data: c.to_vec(),
            last: (i + 1) * 4096 >= delta.len(),
        });
    }
    refused(
        t.path(),
        frames,
        ErrorClass::Integrity,
        "goes beyond the 20480 bytes the manifest says",
    );
    // More encoded bytes than any encoding of the file needs are refused too.
    let mut frames = changed_old_txt(&[b'y'; 20 << 10]);
    frames.push(Request::Delta {
        index: 0,
        basis: old.clone(),
        mtime: None,
        data: vec![0x41; 2 << 20],
        last: false,
    });
    refused(t.path(), frames, ErrorClass::BadRequest, "is larger than");
}

#[test]
fn a_streamed_delta_builds_the_file() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let old = RelPath::new("old.txt").unwrap();
    // The new file: the old one (20 KiB of 'x') with 'y's in the middle.
    let mut new = vec![b'x'; 20 << 10];
    new[5000..5100].fill(b'y');
    let sig = fast_rsync::Signature::calculate(
        &[b'x'; 20 << 10],
        fast_rsync::SignatureOptions {
            block_size: 1024,
            crypto_hash_size: 8,
        },
    );
    let mut delta = Vec::new();
    fast_rsync::diff(&sig.index(), &new, &mut delta).unwrap();
    let mut frames = changed_old_txt(&new);
    for (i, c) in delta.chunks(7).enumerate() {
        frames.push(Request::Delta {
            index: 0,
            basis: old.clone(),
            mtime: None,
            data: c.to_vec(),
            last: (i + 1) * 7 >= delta.len(),
        });
    }
    frames.push(Request::Commit);
    frames.push(Request::Bye);
    let rs = session(t.path(), None, frames);
    assert!(
        rs.iter().any(|r| matches!(r, Response::Committed { .. })),
        "{rs:?}"
    );
    let id = match rs.iter().find(|r| matches!(r, Response::Committed { .. })) {
        Some(Response::Committed { id, .. }) => *id,
        _ => unreachable!(),
    };
    assert_eq!(
        std::fs::read(t.path().join(format!("releases/{id}/old.txt"))).unwrap(),
        new
    );
}

/// 200 files of 8 KiB, and the literal frames filling them (`bad`: files whose content is
/// replaced by the same number of other bytes).
fn many_files(bad: &[usize]) -> (Manifest, Vec<Request>) {
    let content = |i: usize| format!("{i:05}").repeat(1638).into_bytes();
    let m = Manifest::new(
        (0..200)
            .map(|i| file(&format!("f{i:03}"), &content(i)))
            .collect(),
    )
    .unwrap();
    let mut frames = stage_frames(&m, None);
    for i in 0..200 {
        let mut data = content(i);
        if bad.contains(&i) {
            data.fill(b'#');
        }
        frames.push(Request::Literal {
            index: i as u32,
            mtime: None,
            data,
            last: true,
        });
    }
    frames.push(Request::Commit);
    (m, frames)
}

#[test]
fn files_written_in_parallel_all_arrive_and_commit() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let (_, mut frames) = many_files(&[]);
    // The client's goodbye: a session ending without it removes the release it committed and
    // never made live.
    frames.push(Request::Bye);
    let rs = session(t.path(), None, frames);
    assert!(
        rs.iter()
            .any(|r| matches!(r, Response::Committed { id: 2 })),
        "expected Committed, got {rs:?}"
    );
    let files = std::fs::read_dir(t.path().join("releases/2"))
        .unwrap()
        .count();
    assert_eq!(files, 200);
    let f = t.path().join("releases/2/f123");
    assert_eq!(std::fs::read(f).unwrap(), "00123".repeat(1638).into_bytes());
}

#[test]
fn the_first_failing_file_in_stream_order_is_the_one_reported() {
    // Files are written on several threads; whichever finishes first, the error names the
    // first bad file of the stream, every time.
    for _ in 0..5 {
        let t = tempfile::tempdir().unwrap();
        live_root(t.path());
        let (_, frames) = many_files(&[57, 58, 150, 199]);
        let (class, msg) = last_error(&session(t.path(), None, frames));
        assert_eq!(class, ErrorClass::Integrity, "{msg}");
        assert!(
            msg.contains("f057") && msg.contains("blake3 differs"),
            "{msg}"
        );
        assert_intact(t.path());
    }
}

/// `Lock`, `Shared { dirs }`, then the stage of `m`.
fn shared_frames(dirs: &[&str], m: &Manifest) -> Vec<Request> {
    let mut frames = stage_frames(m, None);
    frames.insert(
        1,
        Request::Shared {
            dirs: dirs.iter().map(|d| RelPath::new(*d).unwrap()).collect(),
            files: vec![],
            writable: vec![],
            mode: 0o775,
            owner: None,
        },
    );
    frames
}

#[test]
fn nested_shared_paths_are_refused() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let m = Manifest::new(vec![file("a", b"1")]).unwrap();
    refused(
        t.path(),
        shared_frames(&["storage", "storage/logs"], &m),
        ErrorClass::BadRequest,
        "inside shared path storage",
    );
    assert!(!t.path().join("shared").exists());
}

#[test]
// The test plants runtime data in `shared/` on purpose (the target's state, not the agent's).
#[allow(clippy::disallowed_methods)]
fn a_stage_that_would_write_over_a_shared_path_the_target_has_is_refused() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    std::fs::create_dir_all(t.path().join("shared/storage")).unwrap();
    #[allow(clippy::disallowed_methods)] // a scratch target's file
    std::fs::write(t.path().join("shared/storage/keep"), "runtime data").unwrap();
    // The target has shared/storage: the release must link to it, not carry a directory.
    let dir = Entry {
        path: RelPath::new("storage").unwrap(),
        kind: EntryKind::Dir { mode: 0o755 },
    };
    let m = Manifest::new(vec![dir, file("storage/keep", b"from the client")]).unwrap();
    refused(
        t.path(),
        shared_frames(&["storage"], &m),
        ErrorClass::BadRequest,
        "does not have the form the shared paths give it",
    );
    assert_eq!(
        std::fs::read(t.path().join("shared/storage/keep")).unwrap(),
        b"runtime data"
    );
}

#[test]
fn a_seed_that_is_a_symlink_is_refused_and_nothing_lands_in_shared() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let link = Entry {
        path: RelPath::new("storage").unwrap(),
        kind: EntryKind::Symlink {
            target: "/etc".into(),
        },
    };
    let m = Manifest::new(vec![link]).unwrap();
    refused(
        t.path(),
        shared_frames(&["storage"], &m),
        ErrorClass::BadRequest,
        "storage is a symlink",
    );
    assert!(!t.path().join("shared/storage").exists());
}

fn hook(release: u64, run: &str, env: &[&str]) -> Request {
    Request::Hook {
        release,
        run: run.into(),
        timeout_ms: 10_000,
        env: env.iter().map(|e| e.to_string()).collect(),
        wait_ms: 0,
    }
}

#[test]
fn a_hook_is_refused_without_the_lock_outside_a_committed_release_or_with_other_variables() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let marker = t.path().join("ran");
    let run = format!("touch {}", marker.display());
    refused_before_the_lock(t.path(), hook(1, &run, &[]), "needs the lock");
    let bad: Vec<(Request, ErrorClass, &str)> = vec![
        (hook(2, &run, &[]), ErrorClass::Target, "2"),
        (
            hook(1, &run, &["LD_PRELOAD=/tmp/evil.so"]),
            ErrorClass::BadRequest,
            "LD_PRELOAD",
        ),
        (
            hook(1, &run, &["PATH=/tmp"]),
            ErrorClass::BadRequest,
            "PATH",
        ),
        (
            hook(1, &run, &["FLIP_ENV=a", "FLIP_ENV=b"]),
            ErrorClass::BadRequest,
            "once each",
        ),
        (
            hook(1, &run, &[&format!("FLIP_TARGET={}", "x".repeat(5000))]),
            ErrorClass::BadRequest,
            "longer than",
        ),
        (hook(1, "touch a\0b", &[]), ErrorClass::BadRequest, "NUL"),
        (hook(1, " ", &[]), ErrorClass::BadRequest, "empty"),
        (
            Request::Hook {
                release: 1,
                run: run.clone(),
                timeout_ms: 0,
                env: vec![],
                wait_ms: 0,
            },
            ErrorClass::BadRequest,
            "timeout",
        ),
    ];
    for (frame, class, needle) in bad {
        refused(t.path(), vec![lock(), frame], class, needle);
    }
    assert!(!marker.exists(), "a refused hook ran");
}

#[test]
fn hook_output_is_forwarded_line_by_line_with_long_lines_cut() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    // 20,000 short lines, then a 100 KiB line without a newline, on stderr.
    let run = "i=0; while [ $i -lt 20000 ]; do echo line$i; i=$((i+1)); done; head -c 102400 /dev/zero | tr '\\0' y >&2; pwd; exit 4";
    let rs = session(
        t.path(),
        None,
        vec![lock(), hook(1, run, &["FLIP_ENV=prod"])],
    );
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut done = None;
    for r in &rs {
        match r {
            Response::HookOutput { stream, line } => match stream {
                flip_wire::HookStream::Stdout => out.push(line.clone()),
                flip_wire::HookStream::Stderr => err.push(line.clone()),
            },
            Response::HookDone {
                status, timed_out, ..
            } => done = Some((*status, *timed_out)),
            _ => {}
        }
    }
    assert_eq!(done, Some((Some(4), false)), "{:?}", rs.last());
    assert_eq!(out.len(), 20_001);
    assert_eq!(out[19_999], "line19999");
    let release = std::fs::canonicalize(t.path().join("releases/1")).unwrap();
    assert_eq!(out[20_000], release.to_str().unwrap(), "cwd is the release");
    assert_eq!(err.len(), 1);
    let cut = format!(
        "{} [line cut at {} bytes]",
        "y".repeat(flip_wire::HOOK_LINE_MAX),
        flip_wire::HOOK_LINE_MAX
    );
    assert_eq!(err[0], cut);
    assert_intact(t.path());
}

#[test]
fn a_hook_past_its_timeout_is_killed_with_what_ignores_sigterm_in_its_group() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let pid = t.path().join("pid");
    let run = format!(
        "(trap '' TERM; exec sleep 30) & echo $! > {}; wait",
        pid.display()
    );
    let started = std::time::Instant::now();
    let rs = session(
        t.path(),
        None,
        vec![
            lock(),
            Request::Hook {
                release: 1,
                run,
                timeout_ms: 300,
                env: vec![],
                wait_ms: 0,
            },
        ],
    );
    let done = rs.iter().find_map(|r| match r {
        Response::HookDone { timed_out, .. } => Some(*timed_out),
        _ => None,
    });
    assert_eq!(done, Some(true), "{:?}", rs.last());
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    let child: i32 = std::fs::read_to_string(&pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let alive =
        std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|st| !st.contains(") Z "));
    assert!(!alive, "{child} ignored SIGTERM and survived");
    assert_intact(t.path());
}

/// A lock holder whose texts are longer than the wire allows (they go into the lock file for
/// the next caller to read, which reads a bounded prefix) is refused before anything is locked
/// or written.
#[test]
fn a_lock_holder_with_an_overlong_text() {
    let t = tempfile::tempdir().unwrap();
    live_root(t.path());
    let lock_file = t.path().join(".flip/lock");
    let before = std::fs::read(&lock_file).ok();
    for field in ["host", "user", "run"] {
        let mut h = holder();
        let long = "x".repeat(flip_wire::HOLDER_TEXT_MAX + 1);
        match field {
            "host" => h.host = long,
            "user" => h.user = long,
            _ => h.run = long,
        }
        refused(
            t.path(),
            vec![Request::Lock {
                wait: false,
                holder: h,
            }],
            ErrorClass::BadRequest,
            &format!("the lock holder's {field} is 257 bytes long"),
        );
        assert_eq!(std::fs::read(&lock_file).ok(), before, "{field}");
    }
    // At the bound: taken.
    let mut h = holder();
    h.run = "r".repeat(flip_wire::HOLDER_TEXT_MAX);
    let rs = session(
        t.path(),
        None,
        vec![Request::Lock {
            wait: false,
            holder: h,
        }],
    );
    assert!(rs.contains(&Response::Locked), "{rs:?}");
}
