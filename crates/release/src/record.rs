//! The record of each release's files as committed (`.flip/releases/N.stat`): per regular
//! file, the identity of its inode and of its last change, written at commit and read by the next
//! deploy to tell an intact file it may hard-link from one that was replaced or written to since.

use crate::{at, fsutil, Root};
use flip_manifest::{EntryKind, Manifest};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;

impl Root {
    /// The inode of each file of release `id` as recorded at commit (`.flip/releases/N.stat`),
    /// by path; empty when that record is missing or damaged.
    pub(crate) fn committed_inodes(&self, id: u64, m: &Manifest) -> BTreeMap<String, u64> {
        let stamps = self.read_stamps(id, m);
        m.entries()
            .iter()
            .zip(stamps)
            .filter_map(|(e, st)| Some((e.path.to_string(), st?.ino)))
            .collect()
    }

    /// The recorded identity of a release's files, by position in its manifest's entries
    /// (`None` for directories and symlinks); empty when the record is missing, of an older
    /// format, truncated or does not match the manifest: then every file is unknown, and is
    /// hashed before it is linked or used as a basis.
    pub(crate) fn read_stamps(&self, id: u64, m: &Manifest) -> Vec<Option<FileStamp>> {
        let files = m.file_count();
        let Some(expected) = files
            .checked_mul(FileStamp::LEN)
            .and_then(|n| n.checked_add(16))
        else {
            return Vec::new();
        };
        // Never more than the record of this manifest's files is read (a bigger one is damaged).
        let Ok(Some(b)) = fsutil::read_optional_limited(&self.stat_path(id), expected as u64)
        else {
            return Vec::new();
        };
        let len = match b.get(..8) {
            Some(m) if m == STAMP_MAGIC => FileStamp::LEN,
            Some(m) if m == STAMP_MAGIC_V2 => FileStamp::LEN_V2,
            _ => return Vec::new(),
        };
        if b.len() != 16 + files * len || b[8..16] != (files as u64).to_le_bytes() {
            return Vec::new();
        }
        let mut stamps = b[16..].chunks_exact(len).map(FileStamp::decode);
        m.entries()
            .iter()
            .map(|e| match e.kind {
                EntryKind::File { .. } => stamps.next(),
                _ => None,
            })
            .collect()
    }
}

impl Root {
    /// Writes the record of release `id`: one stamp per regular file, in manifest order.
    pub(crate) fn write_record(
        &self,
        id: u64,
        stamps: impl ExactSizeIterator<Item = FileStamp>,
    ) -> crate::Result<()> {
        fsutil::write_atomic_with(&self.stat_path(id), |w| {
            w.write_all(STAMP_MAGIC)?;
            w.write_all(&(stamps.len() as u64).to_le_bytes())?;
            for st in stamps {
                w.write_all(&st.encode())?;
            }
            Ok(())
        })
    }
}

/// The live release's record of its files' identities, and which files matched it just before
/// flip removes names that may share their inodes (pruning an older release): removing a link
/// changes an inode's ctime, which alone must not make the next deploy hash every file again.
pub(crate) struct LiveStamps {
    id: u64,
    manifest: Manifest,
    stamps: Vec<Option<FileStamp>>,
    intact: Vec<bool>,
}

impl Root {
    /// Snapshot for [`Root::refresh_live_stamps`]; `None` when nothing is live or its record is
    /// unknown (then there is nothing to keep up to date).
    pub(crate) fn live_stamps(&self) -> Option<LiveStamps> {
        let id = self.current().ok()??;
        let manifest = self.manifest(id).ok()?;
        let stamps = self.read_stamps(id, &manifest);
        if stamps.is_empty() {
            return None;
        }
        let dir = self.release_dir(id);
        let intact = at::par_entries(&dir, manifest.entries(), |i, _, at| {
            stamps[i].is_some_and(|st| {
                at.and_then(|(dir, name)| at::lstat_at(dir, name).ok())
                    .is_some_and(|m| FileStamp::of_stat(&m) == st)
            })
        });
        Some(LiveStamps {
            id,
            manifest,
            stamps,
            intact,
        })
    }

    /// After the removal: a file that matched its record before and is still the same inode
    /// with the same size and mtime gets its new ctime recorded. Anything else keeps its old
    /// record (and is hashed by the next deploy). Best effort: a record that cannot be rewritten
    /// only costs hashing.
    pub(crate) fn refresh_live_stamps(&self, live: Option<LiveStamps>) {
        let Some(mut live) = live else { return };
        if self.current().ok().flatten() != Some(live.id) {
            return;
        }
        let dir = self.release_dir(live.id);
        let fresh: Vec<Option<FileStamp>> =
            at::par_entries(&dir, live.manifest.entries(), |i, _, at| {
                let st = live.stamps[i].as_ref().filter(|_| live.intact[i])?;
                let (dir, name) = at?;
                let now = FileStamp::of_stat(&at::lstat_at(dir, name).ok()?);
                let same_write = (now.ino, now.size, now.mtime, now.mtime_nsec)
                    == (st.ino, st.size, st.mtime, st.mtime_nsec)
                    && (now.uid, now.gid, now.mode) == (st.uid, st.gid, st.mode);
                (same_write && now != *st).then_some(now)
            });
        if fresh.iter().all(Option::is_none) {
            return;
        }
        for (st, new) in live.stamps.iter_mut().zip(fresh) {
            if new.is_some() {
                *st = new;
            }
        }
        let _ = fsutil::write_atomic_with(&self.stat_path(live.id), |w| {
            w.write_all(STAMP_MAGIC)?;
            w.write_all(&(live.manifest.file_count() as u64).to_le_bytes())?;
            for (e, st) in live.manifest.entries().iter().zip(&live.stamps) {
                if let EntryKind::File { .. } = e.kind {
                    let st = st.expect("every file has a stamp in a known record");
                    w.write_all(&st.encode())?;
                }
            }
            Ok(())
        });
    }
}

/// `.stat` format 3: the magic, the file count (u64 LE), then one [`FileStamp`] per regular file
/// in manifest order ([`FileStamp::LEN`] bytes each).
const STAMP_MAGIC: &[u8; 8] = b"FLIPSTA3";
/// Format 2: the same without owner, group, mode and link count ([`FileStamp::LEN_V2`] bytes
/// each): still read, those fields unknown (such a stamp never matches a file on disk). Format
/// 1 (inode and mtime only) is read as no record.
const STAMP_MAGIC_V2: &[u8; 8] = b"FLIPSTA2";

/// The identity of a file's inode and of its last change: what must be unchanged for a file of
/// a committed release to be trusted without hashing, or hard-linked into a new release.
/// `ctime` changes on every write, chmod, chown, link and `utimensat`, and cannot be set back;
/// owner, group, mode and link count are shared by every name of the inode, so a new release
/// that links it inherits them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileStamp {
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime: i64,
    pub(crate) mtime_nsec: u32,
    pub(crate) ctime: i64,
    pub(crate) ctime_nsec: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// `st_mode`: the file type and all permission bits.
    pub(crate) mode: u32,
    pub(crate) nlink: u32,
    /// Owner, group, mode and link count are known (false for a format 2 record: then the
    /// stamp equals no stamp read from disk).
    pub(crate) full: bool,
}

impl FileStamp {
    /// Bytes of one encoded stamp (format 3).
    pub(crate) const LEN: usize = 56;
    /// Bytes of one format 2 stamp.
    pub(crate) const LEN_V2: usize = 40;

    pub(crate) fn of(m: &fs::Metadata) -> Self {
        FileStamp {
            ino: m.ino(),
            size: m.len(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec() as u32,
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec() as u32,
            uid: m.uid(),
            gid: m.gid(),
            mode: m.mode(),
            nlink: u32::try_from(m.nlink()).unwrap_or(u32::MAX),
            full: true,
        }
    }

    pub(crate) fn of_stat(m: &at::Stat) -> Self {
        let ((mtime, mtime_nsec), (ctime, ctime_nsec)) = (m.mtime(), m.ctime());
        FileStamp {
            ino: m.ino(),
            size: m.len(),
            mtime,
            mtime_nsec,
            ctime,
            ctime_nsec,
            uid: m.uid(),
            gid: m.gid(),
            mode: m.mode(),
            nlink: m.nlink(),
            full: true,
        }
    }

    pub(crate) fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.ino.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.mtime.to_le_bytes());
        b[24..28].copy_from_slice(&self.mtime_nsec.to_le_bytes());
        b[28..36].copy_from_slice(&self.ctime.to_le_bytes());
        b[36..40].copy_from_slice(&self.ctime_nsec.to_le_bytes());
        b[40..44].copy_from_slice(&self.uid.to_le_bytes());
        b[44..48].copy_from_slice(&self.gid.to_le_bytes());
        b[48..52].copy_from_slice(&self.mode.to_le_bytes());
        b[52..56].copy_from_slice(&self.nlink.to_le_bytes());
        b
    }

    /// Decodes [`Self::encode`]'s output ([`Self::LEN`] bytes), or a format 2 stamp
    /// ([`Self::LEN_V2`] bytes: owner, group, mode and link count unknown).
    pub(crate) fn decode(c: &[u8]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(c[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(c[i..i + 4].try_into().expect("4 bytes"));
        let full = c.len() >= Self::LEN;
        let extra = |i: usize| if full { u32_at(i) } else { 0 };
        FileStamp {
            ino: u64_at(0),
            size: u64_at(8),
            mtime: u64_at(16) as i64,
            mtime_nsec: u32_at(24),
            ctime: u64_at(28) as i64,
            ctime_nsec: u32_at(36),
            uid: extra(40),
            gid: extra(44),
            mode: extra(48),
            nlink: extra(52),
            full,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_encode_and_decode() {
        let st = FileStamp {
            ino: 1 << 40,
            size: 150_000,
            mtime: -5,
            mtime_nsec: 999_999_999,
            ctime: 1_700_000_000,
            ctime_nsec: 7,
            uid: 33,
            gid: 4_000_000_000,
            mode: 0o100644,
            nlink: 3,
            full: true,
        };
        assert_eq!(FileStamp::decode(&st.encode()), st);
        // Format 2: the same first 40 bytes, owner, group, mode and link count unknown.
        let old = FileStamp::decode(&st.encode()[..FileStamp::LEN_V2]);
        assert!(!old.full);
        assert_ne!(old, st);
        assert_eq!(
            (old.ino, old.ctime, old.ctime_nsec),
            (st.ino, st.ctime, st.ctime_nsec)
        );
    }
}
