//! What hooks wrote into a release. A `before_activate` hook that warms a cache writes into the
//! committed release; that is not tampering. After each successful hook the agent records what
//! differs between the release and its manifest ([`Root::record_hook_writes`]): each differing
//! path with its identity (kind, mode, inode, size, mtime and ctime for a file; the target of
//! a symlink), in `.flip/releases/N.hooks`. `verify` then reports a difference whose path is
//! recorded with the identity it still has as written by hooks (a warning), and every other
//! difference as before: a hook-written file changed afterwards has another ctime, so it is
//! flagged. The manifest (and the deploy's digest) stay the deployed tree's.

use crate::{fsutil, stage, LockGuard, Root};
use flip_manifest::Manifest;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Most paths recorded for one release; beyond, the rest are not recorded (and `verify` flags
/// them) with a warning.
pub(crate) const MAX_HOOK_PATHS: usize = 100_000;

/// Largest record read back (a damaged or planted bigger one is ignored with a warning).
const RECORD_MAX: u64 = 64 << 20;

/// How many recorded paths a `verify` warning names.
const NAMED: usize = 10;

/// How a release differed from its manifest before its hooks ran ([`Root::hook_baseline`]):
/// path → (identity, content).
#[derive(Debug, Default)]
pub struct HookBaseline(BTreeMap<String, (String, String)>);

impl Root {
    /// How release `id` differs from its manifest now, before hooks run in it: what
    /// [`Root::record_hook_writes`] must not take for theirs (an edit a `--force` switch made
    /// live, still as it was). A `stat` per entry and a hash of each file not as recorded at
    /// commit; empty when the manifest cannot be read.
    pub fn hook_baseline(&self, id: u64) -> HookBaseline {
        let Ok(manifest) = self.manifest(id) else {
            return HookBaseline::default();
        };
        let dir = self.release_dir(id);
        HookBaseline(
            self.differences_since_commit(id, &dir, &manifest)
                .into_iter()
                .map(|(p, _)| {
                    let path = dir.join(&p);
                    (p, (identity(&path), content(&path)))
                })
                .collect(),
        )
    }

    pub(crate) fn hooks_path(&self, id: u64) -> PathBuf {
        self.meta_dir().join(format!("{id}.hooks"))
    }

    /// Records what the hooks run so far changed in release `id` (every difference from its
    /// manifest that `before`, taken before they ran, does not hold as it is now, with the
    /// identity it has now; one that differed before, and not by an earlier hook's write,
    /// only if what it holds changed: a hook's `chown -R` or `touch` does not make an edit
    /// its own), merged with what was recorded before. Never fails: a problem (a
    /// record that cannot be written) becomes a warning, and `verify` will flag what was not
    /// recorded.
    pub fn record_hook_writes(&self, _lock: &LockGuard, id: u64, before: &HookBaseline) {
        if let Err(e) = self.try_record_hook_writes(id, before) {
            self.warn(format!(
                "what the hooks wrote into release {id} could not be recorded ({e}): `flip verify` will report it as differences"
            ));
        }
    }

    fn try_record_hook_writes(&self, id: u64, before: &HookBaseline) -> crate::Result<()> {
        let manifest = self.manifest(id)?;
        let dir = self.release_dir(id);
        let diffs = self.differences_since_commit(id, &dir, &manifest);
        let mut record = self.hook_record(id);
        let mut dropped = 0usize;
        let shared = self.written_in_place(id, &dir, &manifest, diffs.iter().map(|(p, _)| p));
        for (path, links) in &shared {
            self.warn(format!("release {id}: {path} was {}", in_place_why(*links)));
        }
        for (path, _) in diffs {
            // A name that is not UTF-8 is known only lossily: it cannot be looked at again,
            // so it is never recorded (it stays a difference).
            if !recordable(&path) {
                continue;
            }
            let id = identity(&dir.join(&path));
            if let Some((was, what)) = before.0.get(&path) {
                // Differed before the hooks ran, and unchanged since: as recorded (or not).
                if *was == id {
                    continue;
                }
                // Differed before, not by an earlier hook's write, and they did not change
                // what it holds (a `chown -R` or `touch` changes only its times): not theirs.
                let hooks_own = record.get(&path) == Some(was);
                if !hooks_own && *what == content(&dir.join(&path)) {
                    continue;
                }
            }
            if record.len() >= MAX_HOOK_PATHS && !record.contains_key(&path) {
                dropped += 1;
                continue;
            }
            record.insert(path, id);
        }
        if dropped > 0 {
            self.warn(format!(
                "the hooks changed more than {MAX_HOOK_PATHS} paths of release {id}: {dropped} are not recorded, and `flip verify` reports them as differences"
            ));
        }
        let bytes = serde_json::to_vec(&record)
            .map_err(|e| fsutil::corrupt(&self.hooks_path(id), e.to_string()))?;
        fsutil::write_atomic(&self.hooks_path(id), &bytes)
    }

    /// The record of release `id` (empty when there is none; a damaged one is ignored with a
    /// warning).
    fn hook_record(&self, id: u64) -> BTreeMap<String, String> {
        let path = self.hooks_path(id);
        match fsutil::read_optional_limited(&path, RECORD_MAX) {
            Ok(None) => BTreeMap::new(),
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                self.warn(format!(
                    "{} is damaged ({e}): what hooks wrote into release {id} is reported as differences",
                    path.display()
                ));
                BTreeMap::new()
            }),
            Err(e) => {
                self.warn(format!(
                    "{e}: what hooks wrote into release {id} is reported as differences"
                ));
                BTreeMap::new()
            }
        }
    }

    /// Splits the differences of release `id` (path, message) into problems and the paths
    /// written by its hooks (recorded, and unchanged since); warns about the latter when `tell`.
    /// A file a hook wrote into in place while other releases share its inode is a problem
    /// (they changed too), never "written by hooks".
    pub(crate) fn without_hook_writes(
        &self,
        id: u64,
        dir: &Path,
        manifest: &Manifest,
        diffs: Vec<(String, String)>,
        tell: bool,
    ) -> Vec<String> {
        if diffs.is_empty() {
            return Vec::new();
        }
        let record = self.hook_record(id);
        let shared = self.written_in_place(id, dir, manifest, diffs.iter().map(|(p, _)| p));
        let mut written = Vec::new();
        let mut problems = Vec::new();
        for (path, message) in diffs {
            if let Some(links) = shared.get(&path) {
                problems.push(format!("{message}: {}", in_place_why(*links)));
                continue;
            }
            match record.get(&path).filter(|_| recordable(&path)) {
                Some(was) => {
                    let now = identity(&dir.join(&path));
                    match *was == now {
                        true => written.push(path),
                        false => problems.push(format!(
                            "{message} (a hook wrote it; {} since)",
                            changed_fields(was, &now)
                        )),
                    }
                }
                None => problems.push(message),
            }
        }
        if tell && !written.is_empty() {
            written.sort();
            let mut named: Vec<&str> = written.iter().take(NAMED).map(String::as_str).collect();
            if written.len() > NAMED {
                named.push("...");
            }
            self.warn(format!(
                "release {id}: {} path(s) written by hooks (recorded after they ran, unchanged since; not tampering): {}",
                written.len(),
                named.join(", ")
            ));
        }
        problems
    }
}

impl Root {
    /// Of `paths` (differences of release `id` from its manifest), the deployed files still on
    /// the inode recorded at commit and linked elsewhere too (by path, with their link count):
    /// changed in place (content or mode), so every release sharing the inode changed with them.
    fn written_in_place<'a>(
        &self,
        id: u64,
        dir: &Path,
        manifest: &Manifest,
        paths: impl Iterator<Item = &'a String>,
    ) -> BTreeMap<String, u64> {
        let inodes = self.committed_inodes(id, manifest);
        paths
            .filter_map(|p| {
                let ino = *inodes.get(p)?;
                let m = fsutil::lstat_or_none(dir.join(p))?;
                (m.is_file() && m.ino() == ino && m.nlink() > 1).then(|| (p.clone(), m.nlink()))
            })
            .collect()
    }
}

/// Why a deployed file changed in place while `links` paths share its inode is a problem.
fn in_place_why(links: u64) -> String {
    format!(
        "changed in place after commit (by a hook?) while {} other hard link(s) share its inode: the releases sharing it changed too; a hook must write a new file and rename it over the old one, never edit, append to or chmod a deployed file",
        links - 1
    )
}

/// What a path is now, without following a symlink: `file MODE INO SIZE MTIME CTIME`,
/// `dir MODE`, `link TARGET`, `other MODE INO`, or `missing`.
/// What differs between two [`identity`] strings of one path, in words: "its ctime changed"
/// (a chown, chmod or touch changes it, as any write does), "it is now a directory", ...
fn changed_fields(was: &str, now: &str) -> String {
    let (w, n): (Vec<&str>, Vec<&str>) = (was.split(' ').collect(), now.split(' ').collect());
    if w[0] == "link" && n[0] == "link" {
        return "its target changed".into();
    }
    if w[0] != n[0] || w.len() != n.len() {
        return format!("it is now {} (was {})", n[0], w[0]);
    }
    const FILE: [&str; 6] = ["kind", "mode", "inode", "size", "mtime", "ctime"];
    let names: &[&str] = match w[0] {
        "file" => &FILE,
        "dir" => &["kind", "mode"],
        "link" => &["kind", "target"],
        _ => &["kind", "mode", "inode"],
    };
    let differ: Vec<&str> = names
        .iter()
        .zip(w.iter().zip(&n))
        .filter(|(_, (a, b))| a != b)
        .map(|(name, _)| *name)
        .collect();
    match differ.as_slice() {
        [] => "it changed".into(),
        [one] => format!("its {one} changed"),
        more => format!("its {} changed", more.join(", ")),
    }
}

/// What `path` holds, for telling a hook's write from a mere change of owner, mode or times:
/// a file's blake3 (read at most to its size), a symlink's target, "dir" for any directory
/// (its entries are paths of their own).
fn content(path: &Path) -> String {
    let Some(m) = fsutil::lstat_or_none(path) else {
        return "missing".into();
    };
    let t = m.file_type();
    if t.is_symlink() {
        identity(path)
    } else if t.is_dir() {
        "dir".into()
    } else if t.is_file() {
        match stage::hash_file(path, m.size()) {
            Ok(d) => format!("file {}", d.to_hex()),
            Err(e) => format!("file ? {e}"),
        }
    } else {
        format!("other {}", m.ino())
    }
}

/// Whether a difference's path can be recorded as a hook's write: not one that stands for a
/// name that is not UTF-8 (shown with U+FFFD: several names have that text, and no file has it,
/// so it would be "missing" both when recorded and when checked, vouching for any such name).
fn recordable(path: &str) -> bool {
    !path.contains('\u{fffd}')
}

fn identity(path: &Path) -> String {
    let Some(m) = fsutil::lstat_or_none(path) else {
        return "missing".into();
    };
    let mode = m.mode() & 0o7777;
    let t = m.file_type();
    if t.is_symlink() {
        match fsutil::read_link(path) {
            Ok(target) => format!("link {}", target.display()),
            Err(_) => "link ?".into(),
        }
    } else if t.is_dir() {
        format!("dir {mode:o}")
    } else if t.is_file() {
        format!(
            "file {mode:o} {} {} {}.{} {}.{}",
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        )
    } else {
        format!("other {mode:o} {}", m.ino())
    }
}
