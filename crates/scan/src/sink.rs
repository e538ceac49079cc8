//! Content the scan hands on as it reads it ([`crate::scan_streaming`]).

use flip_manifest::{Digest, RelPath};

/// Receives what a scan reads, from the scan's threads (in no set order across files): a first
/// deploy sends each file as it is hashed instead of reading it a second time.
///
/// Files up to [`crate::BIG_FILE`] are read whole and handed on, even those the hash cache
/// knows (reading them is what sending them takes); larger ones (read in pieces, or answered
/// by the cache) are not: whoever uses the scan sends those itself.
pub trait ContentSink: Send + Sync {
    /// Once, after the walk and before any [`ContentSink::file`]: the regular files found and
    /// their bytes, as the walk saw them (a file may be read with another size).
    fn walked(&self, files: u64, bytes: u64);

    /// File `rel`, read whole: its permission bits, its mtime `(seconds, nanoseconds)` as opened,
    /// and exactly the bytes hashed for the manifest (which records this size and `digest`).
    /// May block (a bounded queue), which slows the scan down.
    fn file(&self, rel: &RelPath, mode: u32, mtime: (i64, u32), digest: &Digest, data: Vec<u8>);
}
