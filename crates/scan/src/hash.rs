//! Content hashing: whole-buffer blake3 for small files, a memory map hashed on the rayon pool
//! for big ones.

use flip_manifest::Digest;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Files larger than this are memory-mapped and hashed with `Hasher::update_rayon` (multi-core,
/// ~7 GiB/s); smaller ones are read into memory and hashed with `blake3::hash`, which is 2–3×
/// faster than mapping a small file.
pub const MMAP_THRESHOLD: u64 = 16 * 1024 * 1024;

/// Hashes one file's content, returning the number of bytes hashed and their blake3 digest.
///
/// The path is opened like `File::open` (a symlink in it is followed) but non-blocking, so a FIFO
/// fails with an error instead of hanging; anything but a regular file is an error
/// (`InvalidInput`). Files up to [`MMAP_THRESHOLD`] are read whole; larger ones are mapped.
///
/// Mapping has one hazard shared by every mmap user: if another process truncates the file while
/// it is hashed, the process receives SIGBUS. Don't hash files that are being truncated.
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
    OpenOptions::new().read(true).custom_flags(flags).open(path)
}

/// Hashes an open file whose `fstat` is `meta`. The size returned is the number of bytes
/// actually hashed, which can differ from `meta.len()` if the file changed in between.
pub(crate) fn hash_open_file(mut file: &File, meta: &Metadata) -> io::Result<(u64, Digest)> {
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > MMAP_THRESHOLD {
        // SAFETY: the map is read-only and private to this function. The only way its contents
        // can change under us is another process writing the file, which gives a torn digest
        // (as a read would) or, on truncation, SIGBUS; neither is undefined behaviour of ours
        // that could corrupt memory, and flip documents not to deploy files being truncated.
        let map = unsafe { memmap2::Mmap::map(file)? };
        let mut hasher = blake3::Hasher::new();
        hasher.update_rayon(&map);
        Ok((map.len() as u64, hasher.finalize().into()))
    } else {
        // One spare byte so that reading to EOF does not reallocate.
        let mut buf = Vec::with_capacity(meta.len() as usize + 1);
        file.read_to_end(&mut buf)?;
        Ok((buf.len() as u64, Digest::of(&buf)))
    }
}
