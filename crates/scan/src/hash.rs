//! Content hashing: whole-buffer blake3 for small files; big ones read in 8 MiB pieces, each
//! hashed on the rayon pool.

use flip_manifest::Digest;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Files larger than this are read in [`PIECE`]-sized pieces, each hashed with
/// `Hasher::update_rayon` (multi-core); smaller ones are read whole and hashed with
/// `blake3::hash`, the fastest for small inputs.
pub const BIG_FILE: u64 = 16 * 1024 * 1024;

/// Read size for big files: memory stays bounded whatever the file size (a mapping would count
/// the whole file in the process's resident memory, and raise SIGBUS if it were truncated).
const PIECE: usize = 8 * 1024 * 1024;

/// Hashes one file's content, returning the number of bytes hashed and their blake3 digest.
///
/// The path is opened like `File::open` (a symlink in it is followed) but non-blocking, so a FIFO
/// fails with an error instead of hanging; anything but a regular file is an error
/// (`InvalidInput`). Files up to [`BIG_FILE`] are read whole; larger ones in pieces.
///
/// # Errors
/// What opening or reading `path` returns; `InvalidInput` for anything but a regular file.
pub fn hash_file(path: &Path) -> io::Result<(u64, Digest)> {
    let file = open(path, false)?;
    let meta = file.metadata()?;
    hash_open_file(&file, &meta)
}

/// Opens a file for hashing: read-only, non-blocking (a FIFO swapped in must not hang the scan)
/// and, with `nofollow`, refusing a symlink as the last component (`ELOOP`).
pub(crate) fn open(path: &Path, nofollow: bool) -> io::Result<File> {
    let mut flags = libc::O_NONBLOCK;
    if nofollow {
        flags |= libc::O_NOFOLLOW;
    }
    // Every caller names the path with this error (the scan: ScanError; `hash_file`'s callers),
    // and tells ENOENT and ELOOP apart by kind, which an error naming the path would hide.
    #[allow(clippy::disallowed_methods)]
    OpenOptions::new().read(true).custom_flags(flags).open(path)
}

/// Hashes an open file whose `fstat` is `meta`. The size returned is the number of bytes
/// actually hashed, which can differ from `meta.len()` if the file changed in between.
pub(crate) fn hash_open_file(file: &File, meta: &Metadata) -> io::Result<(u64, Digest)> {
    hash_open_file_keep(file, meta, false).map(|(n, d, _)| (n, d))
}

/// [`hash_open_file`], returning with `keep` the content hashed of a file read whole (up to
/// [`BIG_FILE`]; `None` for one read in pieces).
pub(crate) fn hash_open_file_keep(
    mut file: &File,
    meta: &Metadata,
    keep: bool,
) -> io::Result<(u64, Digest, Option<Vec<u8>>)> {
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > BIG_FILE {
        let mut hasher = blake3::Hasher::new();
        let mut piece = vec![0u8; PIECE];
        let mut total = 0u64;
        loop {
            let mut n = 0;
            while n < PIECE {
                match file.read(&mut piece[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if n == 0 {
                break;
            }
            hasher.update_rayon(&piece[..n]);
            total += n as u64;
        }
        Ok((total, hasher.finalize().into(), None))
    } else {
        // One spare byte so that reading to EOF does not reallocate.
        let mut buf = Vec::with_capacity(meta.len() as usize + 1);
        // Through `Take`: `File`'s own read_to_end asks fstat and lseek for a size hint, two
        // system calls per file the reservation above makes useless.
        Read::take(file, u64::MAX).read_to_end(&mut buf)?;
        let hashed = (buf.len() as u64, Digest::of(&buf));
        Ok((hashed.0, hashed.1, keep.then_some(buf)))
    }
}

/// Hashes a file above [`BIG_FILE`] whose `fstat` is `meta`, read in [`PIECE`]-sized pieces (at
/// most `meta.len()` bytes: what grows meanwhile is left for the next scan), handing each piece
/// to `each` with whether it is the last (an empty last piece for a file found empty). Returns
/// the bytes hashed and their digest.
pub(crate) fn hash_big_pieces(
    file: &File,
    meta: &Metadata,
    each: &mut dyn FnMut(Vec<u8>, bool),
) -> io::Result<(u64, Digest)> {
    let mut hasher = blake3::Hasher::new();
    let mut input = Read::take(file, meta.len());
    let mut held: Option<Vec<u8>> = None;
    let mut total = 0u64;
    loop {
        let mut piece = Vec::with_capacity(PIECE);
        (&mut input).take(PIECE as u64).read_to_end(&mut piece)?;
        if piece.is_empty() {
            break;
        }
        hasher.update_rayon(&piece);
        total += piece.len() as u64;
        if let Some(prev) = held.replace(piece) {
            each(prev, false);
        }
    }
    each(held.unwrap_or_default(), true);
    Ok((total, hasher.finalize().into()))
}
