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
    // SAFETY: getrusage fills the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
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
