//! Content the scan hands on as it reads it ([`crate::scan_streaming`]).

use flip_manifest::{Digest, RelPath};

/// Receives what a scan reads, from the scan's threads (in no set order across files): a first
/// deploy sends each file as it is hashed instead of reading it a second time.
///
/// Every file is read and handed on, even those the hash cache knows (reading them is what
/// sending them takes): up to [`crate::BIG_FILE`] whole ([`ContentSink::file`], from the scan's
/// threads, in no set order), larger ones in pieces ([`ContentSink::piece`], one file at a
/// time, after the others).
pub trait ContentSink: Send + Sync {
    /// Once, after the walk and before any [`ContentSink::file`]: the regular files found and
    /// their bytes, as the walk saw them (a file may be read with another size).
    fn walked(&self, files: u64, bytes: u64);

    /// File `rel`, read whole: its permission bits, its mtime `(seconds, nanoseconds)` as opened,
    /// and exactly the bytes hashed for the manifest (which records this size and `digest`).
    /// May block (a bounded queue), which slows the scan down.
    fn file(&self, rel: &RelPath, mode: u32, mtime: (i64, u32), digest: &Digest, data: Vec<u8>);

    /// The next piece of file `rel` (larger than [`crate::BIG_FILE`]; at most `size` bytes in
    /// all, its size when opened), in order, the pieces of one file after one another; `last`
    /// closes it. The manifest records exactly the bytes handed on.
    fn piece(
        &self,
        rel: &RelPath,
        mode: u32,
        mtime: (i64, u32),
        size: u64,
        data: Vec<u8>,
        last: bool,
    );
}
