//! The record of each release's files as committed (`.flip/releases/N.stat`): per regular
//! file, the identity of its inode and of its last change, written at commit and read by the next
//! deploy to tell an intact file it may hard-link from one that was replaced or written to since.

use crate::{at, fsutil, Root};
use flip_manifest::{EntryKind, Manifest, RelPath};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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

/// `.flip/links`: the link ledger. Every name flip adds to or removes from an inode a release
/// holds changes that inode's link count and ctime, for every release sharing it: the records
/// of the others (written when each was committed) go stale. Rather than rewriting the record of
/// every release that shares an inode (O(all releases)), the ledger keeps, per inode flip has
/// linked, its link count and ctime just after flip's last change to it, and which release last
/// linked it (`holder`). What a release's file should look like now is its record with, when
/// the ledger knows the inode from a later change, the ledger's ctime and link count
/// ([`Root::expected_stamps`]): one read of the ledger, then O(files of that release).
///
/// Updated, under the deploy lock, by each commit (the inodes it linked), each prune (the
/// shared inodes of the releases removed, checked before and after) and each staged release
/// dropped uncommitted (the inodes it had linked). What flip does not know it changed (a crash
/// between the change and the ledger, an edit behind its back) leaves a file that matches
/// nothing: it is copied, not linked, by the next deploy, and the copy (a new inode) has an
/// exact record again. A damaged or missing ledger is the same: nothing blocks.
const LINKS_MAGIC: &[u8; 8] = b"FLIPLNK1";
/// Bytes of one ledger entry: ino, holder, ctime (u64, u64, i64), ctime_nsec, nlink (u32, u32).
const LINK_LEN: usize = 32;
/// Largest ledger read back (32 M inodes); a bigger one is damaged and ignored.
const LINKS_MAX: u64 = 16 + (LINK_LEN as u64) * (32 << 20);

/// What the ledger knows of one inode: its ctime and link count just after flip last changed
/// them, and the release that last linked it (where it can be reached by its path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LinkState {
    pub(crate) ctime: i64,
    pub(crate) ctime_nsec: u32,
    pub(crate) nlink: u32,
    pub(crate) holder: u64,
}

/// The link ledger in memory, by inode number.
#[derive(Default)]
pub(crate) struct Links {
    map: HashMap<u64, LinkState>,
    changed: bool,
}

impl Links {
    /// Records `st` (just taken, after flip changed the inode) as the inode's state; `holder`:
    /// the release that can reach it.
    pub(crate) fn set(&mut self, st: &FileStamp, holder: u64) {
        let new = LinkState {
            ctime: st.ctime,
            ctime_nsec: st.ctime_nsec,
            nlink: st.nlink,
            holder,
        };
        if self.map.insert(st.ino, new) != Some(new) {
            self.changed = true;
        }
    }

    /// Forgets an inode (gone, or in a state flip cannot vouch for).
    pub(crate) fn forget(&mut self, ino: u64) {
        if self.map.remove(&ino).is_some() {
            self.changed = true;
        }
    }

    pub(crate) fn get(&self, ino: u64) -> Option<&LinkState> {
        self.map.get(&ino)
    }

    /// `st` (a file's record) as the file should look now: with the ledger's ctime and link
    /// count when the ledger knows a later change of the inode.
    pub(crate) fn apply(&self, st: &mut FileStamp) {
        if let Some(l) = self.map.get(&st.ino) {
            if (l.ctime, l.ctime_nsec) >= (st.ctime, st.ctime_nsec) {
                (st.ctime, st.ctime_nsec, st.nlink) = (l.ctime, l.ctime_nsec, l.nlink);
            }
        }
    }
}

impl Root {
    fn links_path(&self) -> PathBuf {
        self.state_dir().join("links")
    }

    /// The link ledger; empty when missing or damaged (then only the records count).
    pub(crate) fn read_links(&self) -> Links {
        let mut links = Links::default();
        let Ok(Some(b)) = fsutil::read_optional_limited(&self.links_path(), LINKS_MAX) else {
            return links;
        };
        let n = b
            .get(8..16)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
        if b.get(..8) != Some(&LINKS_MAGIC[..])
            || n.and_then(|n| n.checked_mul(LINK_LEN as u64)) != Some(b.len() as u64 - 16)
        {
            return links;
        }
        let u64_at = |c: &[u8], i: usize| u64::from_le_bytes(c[i..i + 8].try_into().expect("8"));
        let u32_at = |c: &[u8], i: usize| u32::from_le_bytes(c[i..i + 4].try_into().expect("4"));
        links.map = b[16..]
            .chunks_exact(LINK_LEN)
            .map(|c| {
                let st = LinkState {
                    holder: u64_at(c, 8),
                    ctime: u64_at(c, 16) as i64,
                    ctime_nsec: u32_at(c, 24),
                    nlink: u32_at(c, 28),
                };
                (u64_at(c, 0), st)
            })
            .collect();
        links
    }

    /// Writes the ledger back if it changed. Never fails: a ledger that cannot be written only
    /// costs copies instead of links (warned about here).
    pub(crate) fn write_links(&self, links: &Links) {
        if !links.changed {
            return;
        }
        let mut v: Vec<(&u64, &LinkState)> = links.map.iter().collect();
        v.sort_unstable_by_key(|(ino, _)| **ino);
        let r = fsutil::write_atomic_with(&self.links_path(), |w| {
            w.write_all(LINKS_MAGIC)?;
            w.write_all(&(v.len() as u64).to_le_bytes())?;
            for (ino, l) in &v {
                let mut b = [0u8; LINK_LEN];
                b[..8].copy_from_slice(&ino.to_le_bytes());
                b[8..16].copy_from_slice(&l.holder.to_le_bytes());
                b[16..24].copy_from_slice(&l.ctime.to_le_bytes());
                b[24..28].copy_from_slice(&l.ctime_nsec.to_le_bytes());
                b[28..32].copy_from_slice(&l.nlink.to_le_bytes());
                w.write_all(&b)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            self.warn(format!(
                "the link ledger could not be written ({e}): the next deploy copies the files it concerns instead of linking them"
            ));
        }
    }

    /// How the files of release `id` should look now, by position in its manifest's entries
    /// (`None` for directories and symlinks; empty when its record is unknown): the record,
    /// with the ledger's later ctime and link count (see [`LINKS_MAGIC`]).
    pub(crate) fn expected_stamps(&self, id: u64, m: &Manifest) -> Vec<Option<FileStamp>> {
        let mut stamps = self.read_stamps(id, m);
        if stamps.is_empty() {
            return stamps;
        }
        let links = self.read_links();
        for st in stamps.iter_mut().flatten() {
            links.apply(st);
        }
        stamps
    }
}

/// Notes in `u` the files of the tree `dir` that are the inodes `stamps` (the record of the
/// release whose manifest is `m`) says: as expected (with `links`) and shared, or the same inode
/// in another state (forgotten). Another inode at a path is none of the ledger's business here.
fn note_tree(
    u: &mut Unlinks,
    links: &Links,
    dir: &Path,
    m: &Manifest,
    mut stamps: Vec<Option<FileStamp>>,
) {
    if stamps.is_empty() {
        return;
    }
    for st in stamps.iter_mut().flatten() {
        links.apply(st);
    }
    let now = at::par_entries(dir, m.entries(), |i, _, at| {
        let want = stamps[i]?;
        let (dir, name) = at?;
        let now = FileStamp::of_stat(&at::lstat_at(dir, name).ok()?);
        Some((want, now))
    });
    for (e, found) in m.entries().iter().zip(now) {
        let Some((want, now)) = found else { continue };
        if now.ino != want.ino {
            continue;
        }
        if now != want {
            u.unknown.push(want.ino);
            continue;
        }
        if now.nlink <= 1 {
            continue;
        }
        u.by_ino.entry(now.ino).or_insert((e.path.clone(), now));
    }
}

/// The files of releases about to be removed that are as expected and share their inode with
/// a release that stays: [`Root::unlink_shared`] removes those names first, one inode at a time,
/// and records each inode's new ctime and link count if it is as expected then (the same but
/// for one name less per name removed).
pub(crate) struct Unlinks {
    /// By inode: the path (the same in every release holding it) and the expected stamp
    /// before.
    by_ino: HashMap<u64, (RelPath, FileStamp)>,
    /// Inodes of the removed releases whose state was not as expected: forgotten.
    unknown: Vec<u64>,
    doomed: Vec<u64>,
}

impl Root {
    /// Before removing releases `doomed` (id, where its tree is now: `releases/N`, or the
    /// trash an interrupted prune or discard left): their files' inodes, checked against what
    /// is expected of them. A release whose metadata is gone already notes nothing (the inodes
    /// it shared then match nothing afterwards, and are copied once). O(files of those
    /// releases).
    pub(crate) fn before_unlink(&self, doomed: &[(u64, PathBuf)]) -> Unlinks {
        let links = self.read_links();
        let mut u = Unlinks {
            by_ino: HashMap::new(),
            unknown: Vec::new(),
            doomed: doomed.iter().map(|(id, _)| *id).collect(),
        };
        for (id, dir) in doomed {
            let Ok(m) = self.manifest(*id) else { continue };
            let stamps = self.read_stamps(*id, &m);
            note_tree(&mut u, &links, dir, &m, stamps);
        }
        u
    }

    /// Before removing `dir`, a staging tree an interrupted deploy left: the files it had
    /// linked from the live release (the same inode at the same path, in the state the ledger
    /// recorded just after the link) lose that name.
    pub(crate) fn before_unlink_staging(&self, dir: &Path) -> Unlinks {
        let mut u = Unlinks {
            by_ino: HashMap::new(),
            unknown: Vec::new(),
            doomed: Vec::new(),
        };
        let Some(id) = self.current().ok().flatten() else {
            return u;
        };
        let Ok(m) = self.manifest(id) else { return u };
        let links = self.read_links();
        let stamps = self.read_stamps(id, &m);
        note_tree(&mut u, &links, dir, &m, stamps);
        u
    }

    /// Removes the shared files' names from the doomed trees, now at `dirs` (trash directories,
    /// or the staging directory), before the rest of those trees is deleted, and tells the
    /// ledger each shared inode's new state. Per inode, in parallel: its state is checked to be
    /// exactly as noted by [`Root::before_unlink`] (ctime included), its names in `dirs` are
    /// removed, and it is looked at again through a release that keeps it, found the same but
    /// for its ctime and one link less per name removed: only then is that state recorded (the
    /// window in which an edit that puts its mtime back could pass for flip's own unlink is
    /// that of a few system calls on one inode, not the deletion of whole trees). Any other
    /// finding forgets the inode (the next deploy hashes or copies it).
    pub(crate) fn unlink_shared(&self, u: Unlinks, dirs: &[PathBuf]) {
        if u.by_ino.is_empty() && u.unknown.is_empty() {
            return;
        }
        let mut links = self.read_links();
        for ino in &u.unknown {
            links.forget(*ino);
        }
        let live = self.current().ok().flatten();
        // Each tree is opened once, and walked in path order with one cursor per tree and
        // thread (each directory opened once), in parallel.
        let mut shared: Vec<(u64, RelPath, FileStamp, Option<u64>)> = u
            .by_ino
            .into_iter()
            .map(|(ino, (path, was))| (ino, path, was, links.get(ino).map(|l| l.holder)))
            .collect();
        shared.sort_unstable_by(|a, b| a.1.cmp(&b.1));
        let ids: std::collections::BTreeSet<u64> = shared
            .iter()
            .filter_map(|s| s.3)
            .chain(live)
            .filter(|id| !u.doomed.contains(id))
            .collect();
        let kept: HashMap<u64, at::Tree> = ids
            .into_iter()
            .filter_map(|id| Some((id, at::Tree::open(&self.release_dir(id)).ok()?)))
            .collect();
        let doomed: Vec<at::Tree> = dirs.iter().filter_map(|d| at::Tree::open(d).ok()).collect();
        let found: Vec<Option<(u64, FileStamp)>> = shared
            .par_iter()
            .map_init(
                || (HashMap::new(), HashMap::new()),
                |(kept_cursors, doomed_cursors), (ino, path, was, holder)| {
                    // Its names in the doomed trees, each checked to be this inode.
                    let mut names = Vec::new();
                    for (i, tree) in doomed.iter().enumerate() {
                        let cursor = doomed_cursors
                            .entry(i)
                            .or_insert_with(|| at::Cursor::new(tree));
                        let Ok((dir, name)) = cursor.parent_of(path) else {
                            continue;
                        };
                        match at::lstat_at(&dir, &name) {
                            Ok(st) if st.ino() == *ino => names.push((dir, name, st)),
                            _ => {}
                        }
                    }
                    // As noted before, to the ctime: nothing changed it since.
                    let first = names.first()?;
                    if FileStamp::of_stat(&first.2) != *was {
                        return None;
                    }
                    let mut removed = 0u32;
                    for (dir, name, _) in &names {
                        if at::unlink_at(dir, name).is_ok() {
                            removed += 1;
                        }
                    }
                    // Fewer than expected when a name could not be removed (a directory this
                    // user may not write: a leftover, retried later): the count is of what
                    // went, so the ledger holds the link count the file has now.
                    [*holder, live].into_iter().flatten().find_map(|id| {
                        let tree = kept.get(&id)?;
                        let cursor = kept_cursors
                            .entry(id)
                            .or_insert_with(|| at::Cursor::new(tree));
                        let (dir, name) = cursor.parent_of(path).ok()?;
                        let now = FileStamp::of_stat(&at::lstat_at(&dir, &name).ok()?);
                        let same = was.same_but_links(&now);
                        (same && now.nlink.checked_add(removed) == Some(was.nlink))
                            .then_some((id, now))
                    })
                },
            )
            .collect();
        for ((ino, _, _, holder), found) in shared.into_iter().zip(found) {
            match found {
                Some((id, now)) => links.set(&now, holder.unwrap_or(id)),
                None => links.forget(ino),
            }
        }
        self.write_links(&links);
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
    /// Whether `now` is this inode as recorded but for its ctime and link count, which links
    /// made or removed since change.
    pub(crate) fn same_but_links(&self, now: &FileStamp) -> bool {
        FileStamp {
            ctime: now.ctime,
            ctime_nsec: now.ctime_nsec,
            nlink: now.nlink,
            ..*self
        } == *now
    }

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
