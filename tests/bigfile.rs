//! Big files through the real binary: a changed file goes as an rsync delta diffed, sent and
//! applied streaming, in bounded memory on both sides. (Its own test binary: the peak RSS of
//! this process's children is then the peak of this test's client and agent alone.)

mod common;

use common::*;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Peak resident set of every waited-for child and grandchild so far, in bytes. A child
/// spawned with `posix_spawn` starts out sharing this process's memory and inherits its peak,
/// so this test never holds a big file in memory itself.
fn children_peak_rss() -> u64 {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
        // SAFETY: getrusage fills the zeroed struct we own.
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) },
        0
    );
    ru.ru_maxrss as u64 * 1024
}

/// A piece of a file being written: a range of another file, or noise.
enum Piece<'a> {
    From(&'a Path, u64, u64),
    Noise(u64, usize),
}

/// Writes `pieces` to `path` 1 MiB at a time; returns the blake3 of the result.
fn write_pieces(path: &Path, pieces: &[Piece]) -> blake3::Hash {
    let tmp = path.with_extension("tmp");
    let mut out = File::create(&tmp).unwrap();
    let mut h = blake3::Hasher::new();
    let mut put = |b: &[u8]| {
        out.write_all(b).unwrap();
        h.update(b);
    };
    for p in pieces {
        match p {
            Piece::From(src, off, len) => {
                let f = File::open(src).unwrap();
                let mut buf = vec![0u8; 1 << 20];
                let mut done = 0;
                while done < *len {
                    let n = (len - done).min(1 << 20) as usize;
                    f.read_exact_at(&mut buf[..n], off + done).unwrap();
                    put(&buf[..n]);
                    done += n as u64;
                }
            }
            Piece::Noise(seed, len) => {
                for (i, start) in (0..*len).step_by(1 << 20).enumerate() {
                    put(&noise(seed * 1000 + i as u64, (len - start).min(1 << 20)));
                }
            }
        }
    }
    drop(out);
    fs::rename(&tmp, path).unwrap();
    h.finalize()
}

fn hash_file(path: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut f = File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finalize();
        }
        h.update(&buf[..n]);
    }
}

#[test]
fn a_changed_64_mib_file_goes_as_a_streamed_delta_in_bounded_memory() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "<?php\n", 0o644);
    fs::create_dir(src.p("data")).unwrap();
    let big = src.p("data/big.bin");
    let len: u64 = (64 << 20) + 12_345;
    write_pieces(&big, &[Piece::Noise(64, len as usize)]);
    let j = fx.deploy(&src, &["--no-cache"]);
    assert_eq!(num(&j, "/files/literal"), 2, "{j}");

    // Overwrites (one across the 32 MiB window boundary of the client's diff), an insertion
    // that shifts everything after it, a deletion, and an appended tail.
    let old = fx.path("old.bin");
    fs::copy(&big, &old).unwrap();
    let edge = 32 << 20;
    let want = write_pieces(
        &big,
        &[
            Piece::From(&old, 0, 1000),
            Piece::Noise(1, 8),
            Piece::From(&old, 1008, edge - 3000 - 1008),
            Piece::Noise(2, 6000),
            Piece::From(&old, edge + 3000, (40 << 20) - edge - 3000),
            Piece::Noise(3, 5000),
            Piece::From(&old, 40 << 20, 10 << 20),
            Piece::From(&old, (50 << 20) + 7000, len - (50 << 20) - 7000),
            Piece::Noise(4, 100_000),
        ],
    );
    let j = fx.deploy(&src, &["--no-cache"]);
    assert_eq!(num(&j, "/files/delta"), 1, "{j}");
    assert_eq!(num(&j, "/files/patched"), 0, "{j}");
    assert_eq!(num(&j, "/files/literal"), 0, "{j}");
    let sent = num(&j, "/bytes/delta");
    assert!(
        sent < 1 << 20,
        "a few edits cost {sent} bytes of delta: {j}"
    );
    assert_eq!(
        hash_file(&fx.current().join("data/big.bin")),
        want,
        "the live file differs from the source"
    );

    // Holding the file, its delta or its output whole on either side would take over 64 MiB
    // on top of the binary's own ~20-40 MB.
    let peak = children_peak_rss();
    assert!(
        peak < 100 << 20,
        "client or agent peaked at {} MiB",
        peak >> 20
    );
}

/// A 40 MiB file replaced by one it shares nothing with goes whole (a literal of its size),
/// not as an rsync delta a little longer than the file; a small edit, or new content over its
/// first 32 MiB window with the tail kept, goes as a delta.
#[test]
fn a_big_file_that_shares_nothing_with_its_basis_goes_whole() {
    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "<?php\n", 0o644);
    let big = src.p("big.bin");
    let len: u64 = 40 << 20;
    write_pieces(&big, &[Piece::Noise(70, len as usize)]);
    fx.deploy(&src, &["--no-cache"]);
    let want = write_pieces(&big, &[Piece::Noise(71, len as usize)]);
    let j = fx.deploy(&src, &["--no-cache"]);
    assert_eq!(num(&j, "/files/literal"), 1, "{j}");
    assert_eq!(num(&j, "/files/delta"), 0, "{j}");
    assert_eq!(num(&j, "/bytes/literal"), len, "{j}");
    assert_eq!(hash_file(&fx.current().join("big.bin")), want);

    let old = fx.path("old.bin");
    fs::copy(&big, &old).unwrap();
    let want = write_pieces(
        &big,
        &[
            Piece::From(&old, 0, 5 << 20),
            Piece::Noise(72, 1000),
            Piece::From(&old, (5 << 20) + 1000, len - (5 << 20) - 1000),
        ],
    );
    let j = fx.deploy(&src, &["--no-cache"]);
    assert_eq!(num(&j, "/files/delta"), 1, "{j}");
    assert!(num(&j, "/bytes/delta") < 1 << 20, "{j}");
    assert_eq!(hash_file(&fx.current().join("big.bin")), want);

    // Its first 33 MiB new, its tail as it was: still a delta (the last window tells), which
    // sends about the new part, not the whole file.
    fs::copy(&big, &old).unwrap();
    let new_part = 33u64 << 20;
    let want = write_pieces(
        &big,
        &[
            Piece::Noise(73, new_part as usize),
            Piece::From(&old, new_part, len - new_part),
        ],
    );
    let j = fx.deploy(&src, &["--no-cache"]);
    assert_eq!(num(&j, "/files/delta"), 1, "{j}");
    let sent = num(&j, "/bytes/delta");
    assert!(sent < new_part + (1 << 20), "{j}");
    assert_eq!(hash_file(&fx.current().join("big.bin")), want);
}

/// VmHWM of a live process, in bytes.
/// The next answer of the agent, past the notices it may send before one.
fn answer(rx: &mut flip_wire::FrameReader) -> flip_wire::Response {
    loop {
        match rx.recv().unwrap() {
            flip_wire::Response::Notices { .. } => continue,
            r => return r,
        }
    }
}

fn vm_hwm(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    kib * 1024
}

/// A client speaking frames to a real `flip agent` process: a signature of a 64 MiB basis and a
/// delta that copies all of it are made and applied streaming, so the agent's peak RSS stays
/// far below the file size (it held the basis, or the whole output, before).
#[test]
fn a_real_agent_signs_and_applies_a_64_mib_delta_in_bounded_memory() {
    use flip_manifest::{Digest, Entry, EntryKind, Manifest};
    use flip_wire::{FrameReader, FrameWriter, Request, Response, SigItem, CHUNK, MAGIC, PROTOCOL};
    use std::process::{Command, Stdio};

    let fx = Fx::new();
    let src = fx.src("src");
    src.file("index.php", "<?php\n", 0o644);
    fs::create_dir(src.p("data")).unwrap();
    let big = src.p("data/big.bin");
    let len: u64 = (64 << 20) + 12_345;
    write_pieces(&big, &[Piece::Noise(65, len as usize)]);
    fx.deploy(&src, &["--no-cache"]);

    // The new version: the old one and one more byte.
    let mut h = blake3::Hasher::new();
    let mut f = File::open(&big).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    h.update(b"!");
    let live = flip_manifest::decode(&fs::read(fx.root.join(".flip/releases/1.manifest")).unwrap())
        .unwrap();
    let entries: Vec<Entry> = live
        .entries()
        .iter()
        .map(|e| match &e.kind {
            EntryKind::File { mode, .. } if e.path.as_str() == "data/big.bin" => Entry {
                path: e.path.clone(),
                kind: EntryKind::File {
                    mode: *mode,
                    size: len + 1,
                    digest: Digest(*h.finalize().as_bytes()),
                },
            },
            _ => e.clone(),
        })
        .collect();
    let m = Manifest::new(entries).unwrap();
    let bytes = flip_manifest::encode(&m);

    let mut agent = Command::new(FLIP)
        .args(["agent", "--root", fx.root_str()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = agent.id();
    let mut tx = FrameWriter::new(Box::new(agent.stdin.take().unwrap()));
    let mut rx = FrameReader::new(Box::new(agent.stdout.take().unwrap()));
    let ask = |tx: &mut FrameWriter, r: Request| {
        tx.send(&r).unwrap();
        tx.flush().unwrap();
    };
    ask(
        &mut tx,
        Request::Hello {
            magic: MAGIC,
            protocol: PROTOCOL,
            version: "test".into(),
            compress: 0,
        },
    );
    assert!(matches!(rx.recv().unwrap(), Response::Welcome { .. }));
    ask(
        &mut tx,
        Request::Lock {
            wait: false,
            holder: flip_wire::Holder {
                pid: 1,
                host: "t".into(),
                user: "t".into(),
                since: 0,
                what: flip_wire::Purpose::Deploy,
                run: String::new(),
            },
        },
    );
    assert_eq!(answer(&mut rx), Response::Locked);
    tx.send(&Request::Stage {
        label: None,
        base: flip_wire::StageBase::Whole,
        payload_len: bytes.len() as u64,
        digest: m.digest(),
        ahead: None,
    })
    .unwrap();
    for c in bytes.chunks(CHUNK) {
        tx.send(&Request::ManifestChunk(c.to_vec())).unwrap();
    }
    tx.flush().unwrap();
    let basis = match answer(&mut rx) {
        Response::Staged { needs, .. } => {
            assert_eq!(needs.len(), 1, "{needs:?}");
            assert_eq!(needs[0].index, 0);
            needs[0].basis.clone().expect("a basis").0
        }
        other => panic!("{other:?}"),
    };
    ask(
        &mut tx,
        Request::Signatures(vec![SigItem {
            index: 0,
            basis: basis.clone(),
        }]),
    );
    assert!(matches!(
        answer(&mut rx),
        Response::Signature { index: 0, .. }
    ));
    assert_eq!(answer(&mut rx), Response::SignaturesDone);
    // COPY (1-byte offset 0, 4-byte length: the whole basis), LITERAL "!", END.
    let mut delta = 0x7273_0236u32.to_be_bytes().to_vec();
    delta.extend_from_slice(&[0x47, 0]);
    delta.extend_from_slice(&(len as u32).to_be_bytes());
    delta.extend_from_slice(&[0x01, b'!', 0]);
    for (i, c) in delta.chunks(5).enumerate() {
        tx.send(&Request::Delta {
            index: 0,
            basis: basis.clone(),
            mtime: None,
            data: c.to_vec(),
            last: (i + 1) * 5 >= delta.len(),
        })
        .unwrap();
    }
    ask(&mut tx, Request::Commit);
    let id = match answer(&mut rx) {
        Response::Committed { id } => id,
        other => panic!("{other:?}"),
    };
    let peak = vm_hwm(pid);
    ask(&mut tx, Request::Bye);
    assert_eq!(answer(&mut rx), Response::Bye);
    drop(tx);
    assert!(agent.wait().unwrap().success());
    let built = fx.release(id).join("data/big.bin");
    assert_eq!(fs::metadata(&built).unwrap().len(), len + 1);
    assert_eq!(hash_file(&built), h.finalize());
    assert!(
        peak < 48 << 20,
        "the agent peaked at {} MiB for a 64 MiB delta",
        peak >> 20
    );
}
