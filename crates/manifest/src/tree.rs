//! Directory hashes of a manifest, for finding what changed without either side holding the
//! other's manifest.
//!
//! Every directory (the root is `""`) gets two hashes: `flat`, over its direct entries (name,
//! kind, mode, size, digest or symlink target), and `merkle`, over its `flat` hash and the
//! `merkle` hashes of its subdirectories. Equal `merkle` means an equal subtree; equal `flat`
//! means equal direct entries. A client that does not know the target's manifest walks down from
//! the root, comparing hashes level by level, and sends only the entries of directories whose
//! direct entries differ ([`DirPatch`]). The target applies the patch to its manifest and checks
//! the result against the new manifest's full digest, so a hash collision can only fail a
//! deploy, never corrupt one.

use crate::{Entry, EntryKind, Manifest, ManifestError, RelPath};
use std::collections::{BTreeSet, HashMap};

/// Hash bytes kept per directory and kind (truncated blake3).
pub const DIR_HASH_LEN: usize = 8;
/// A truncated blake3 of a directory's entries or subtree.
pub type DirHash = [u8; DIR_HASH_LEN];

#[derive(Clone, Debug, Default)]
struct Node {
    flat: DirHash,
    merkle: DirHash,
    /// Subdirectories, in manifest order.
    subdirs: Vec<String>,
    /// Indexes of the direct entries in the manifest.
    entries: Vec<usize>,
}

/// The directory hashes of one manifest.
#[derive(Clone, Debug)]
pub struct DirTree {
    nodes: HashMap<String, Node>,
}

/// How a directory of one tree compares with the same path in another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirState {
    /// Same subtree.
    Same,
    /// Same direct entries; something below differs.
    Below,
    /// The direct entries differ (and maybe more below).
    Differs,
    /// Not a directory there.
    Absent,
}

fn key(p: &RelPath) -> String {
    p.as_str().to_string()
}

fn parent_key(p: &RelPath) -> String {
    p.parent().map(|p| key(&p)).unwrap_or_default()
}

impl DirTree {
    /// Walks this tree's directories from the root, one level at a time, asking `compare` how
    /// each level's directories (`(dir, flat, merkle)` hashes, `""` for the root) stand in another
    /// tree, and returns the directories whose direct entries differ there or that it lacks (a
    /// lacking directory's whole subtree, without asking further). `compare` answers one
    /// [`DirState`] per directory, in order (a client asks its agent: one round trip per level).
    ///
    /// # Errors
    /// Whatever `compare` returns.
    pub fn walk_changed<E>(
        &self,
        mut compare: impl FnMut(Vec<(String, DirHash, DirHash)>) -> Result<Vec<DirState>, E>,
    ) -> Result<BTreeSet<String>, E> {
        let mut changed = BTreeSet::new();
        let mut frontier = vec![String::new()];
        while !frontier.is_empty() {
            let level = frontier
                .iter()
                .map(|d| {
                    let (flat, merkle) = self.hashes(d).expect("a directory of this tree");
                    (d.clone(), flat, merkle)
                })
                .collect();
            let states = compare(level)?;
            let mut next = Vec::new();
            for (d, state) in frontier.into_iter().zip(states) {
                match state {
                    DirState::Same => {}
                    DirState::Below => next.extend_from_slice(self.subdirs(&d)),
                    DirState::Differs => {
                        next.extend_from_slice(self.subdirs(&d));
                        changed.insert(d);
                    }
                    DirState::Absent => {
                        // Not there: the whole subtree goes, no need to ask further.
                        let mut stack = vec![d];
                        while let Some(x) = stack.pop() {
                            stack.extend_from_slice(self.subdirs(&x));
                            changed.insert(x);
                        }
                    }
                }
            }
            frontier = next;
        }
        Ok(changed)
    }

    /// The directory hashes of every directory of `m` (the root is `""`).
    pub fn new(m: &Manifest) -> DirTree {
        let mut nodes: HashMap<String, Node> = HashMap::new();
        nodes.insert(String::new(), Node::default());
        for (i, e) in m.entries().iter().enumerate() {
            if e.is_dir() {
                nodes.insert(key(&e.path), Node::default());
            }
            let parent = nodes.entry(parent_key(&e.path)).or_default();
            parent.entries.push(i);
            if e.is_dir() {
                parent.subdirs.push(key(&e.path));
            }
        }
        // Deepest directories first, so children are hashed before their parents.
        let mut order: Vec<String> = nodes.keys().cloned().collect();
        order.sort_by_key(|k| {
            std::cmp::Reverse(if k.is_empty() {
                0
            } else {
                k.matches('/').count() + 1
            })
        });
        for k in order {
            let node = &nodes[&k];
            let mut flat = blake3::Hasher::new();
            for &i in &node.entries {
                hash_entry(&mut flat, &m.entries()[i]);
            }
            let flat = trunc(flat.finalize());
            let mut merkle = blake3::Hasher::new();
            merkle.update(&flat);
            for sub in &node.subdirs {
                merkle.update(sub.as_bytes());
                merkle.update(&[0]);
                merkle.update(&nodes[sub].merkle);
            }
            let merkle = trunc(merkle.finalize());
            let node = nodes.get_mut(&k).expect("present");
            node.flat = flat;
            node.merkle = merkle;
        }
        DirTree { nodes }
    }

    /// (flat, merkle) of a directory, `""` being the root.
    pub fn hashes(&self, dir: &str) -> Option<(DirHash, DirHash)> {
        self.nodes.get(dir).map(|n| (n.flat, n.merkle))
    }

    /// Subdirectories of `dir`.
    pub fn subdirs(&self, dir: &str) -> &[String] {
        self.nodes.get(dir).map_or(&[], |n| &n.subdirs)
    }

    /// How `dir` here compares with hashes from another tree.
    pub fn compare(&self, dir: &str, flat: &DirHash, merkle: &DirHash) -> DirState {
        match self.nodes.get(dir) {
            None => DirState::Absent,
            Some(n) if n.merkle == *merkle => DirState::Same,
            Some(n) if n.flat == *flat => DirState::Below,
            Some(_) => DirState::Differs,
        }
    }

    /// The patch that carries the direct entries of `dirs` (which must be directories here).
    pub fn patch(&self, m: &Manifest, dirs: &BTreeSet<String>) -> DirPatch {
        let mut entries: Vec<Entry> = dirs
            .iter()
            .filter_map(|d| self.nodes.get(d))
            .flat_map(|n| n.entries.iter().map(|&i| m.entries()[i].clone()))
            .collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        DirPatch {
            dirs: dirs.iter().cloned().collect(),
            entries,
        }
    }
}

fn trunc(h: blake3::Hash) -> DirHash {
    let mut out = [0u8; DIR_HASH_LEN];
    out.copy_from_slice(&h.as_bytes()[..DIR_HASH_LEN]);
    out
}

fn hash_entry(h: &mut blake3::Hasher, e: &Entry) {
    h.update(e.path.file_name().as_bytes());
    h.update(&[0]);
    match &e.kind {
        EntryKind::Dir { mode } => {
            h.update(&[0]);
            h.update(&mode.to_le_bytes());
        }
        EntryKind::File { mode, size, digest } => {
            h.update(&[1]);
            h.update(&mode.to_le_bytes());
            h.update(&size.to_le_bytes());
            h.update(&digest.0);
        }
        EntryKind::Symlink { target } => {
            h.update(&[2]);
            h.update(&(target.len() as u64).to_le_bytes());
            h.update(target.as_bytes());
        }
    }
}

/// New direct entries for some directories: everything else is as in the base manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirPatch {
    /// Directories whose direct entries are replaced (`""` is the root), sorted.
    pub dirs: Vec<String>,
    /// Their new direct entries, sorted by path.
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// `self` with the direct entries of `patch.dirs` replaced by `patch.entries`. An old
    /// subdirectory that the patch drops (or turns into something else) goes with everything
    /// below it; one it keeps keeps its content unless the patch replaces that too.
    ///
    /// # Errors
    /// As [`Manifest::new`], for the result.
    pub fn apply_dirs(&self, patch: &DirPatch) -> Result<Manifest, ManifestError> {
        let replaced: BTreeSet<&str> = patch.dirs.iter().map(String::as_str).collect();
        for e in &patch.entries {
            let p = e.path.parent();
            let parent = p.as_ref().map_or("", |p| p.as_str());
            if !replaced.contains(parent) {
                return Err(ManifestError::NoParentDir {
                    path: e.path.to_string(),
                    parent: parent.to_string(),
                });
            }
        }
        let new_dirs: BTreeSet<&RelPath> = patch
            .entries
            .iter()
            .filter(|e| e.is_dir())
            .map(|e| &e.path)
            .collect();
        let mut out: Vec<Entry> = Vec::with_capacity(self.len() + patch.entries.len());
        let mut dropped: Option<String> = None;
        for e in self.entries() {
            if let Some(d) = &dropped {
                if e.path.as_str().starts_with(d.as_str())
                    && e.path.as_str().as_bytes().get(d.len()) == Some(&b'/')
                {
                    continue;
                }
                dropped = None;
            }
            let p = e.path.parent();
            if replaced.contains(p.as_ref().map_or("", |p| p.as_str())) {
                if e.is_dir() && !new_dirs.contains(&e.path) {
                    dropped = Some(e.path.as_str().to_string());
                }
                continue;
            }
            out.push(e.clone());
        }
        out.extend(patch.entries.iter().cloned());
        Manifest::new(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{dir, file};

    fn walk(old: &Manifest, new: &Manifest) -> (BTreeSet<String>, usize) {
        // What a client with `new` finds when probing a target holding `old`.
        let (to, tn) = (DirTree::new(old), DirTree::new(new));
        let mut frontier = vec![String::new()];
        let mut send = BTreeSet::new();
        let mut probes = 0;
        while !frontier.is_empty() {
            let mut next = Vec::new();
            for d in frontier {
                probes += 1;
                let (flat, merkle) = tn.hashes(&d).unwrap();
                match to.compare(&d, &flat, &merkle) {
                    DirState::Same => {}
                    DirState::Below => next.extend(tn.subdirs(&d).iter().cloned()),
                    DirState::Differs | DirState::Absent => {
                        send.insert(d.clone());
                        next.extend(tn.subdirs(&d).iter().cloned());
                    }
                }
            }
            frontier = next;
        }
        (send, probes)
    }

    #[test]
    fn only_changed_directories_are_sent_and_the_result_is_exact() {
        let old = Manifest::new(vec![
            dir("a"),
            dir("a/deep"),
            file("a/deep/x", b"1"),
            dir("b"),
            file("b/y", b"2"),
            dir("gone"),
            dir("gone/sub"),
            file("gone/sub/z", b"3"),
            file("top", b"4"),
            dir("swap"),
            file("swap/w", b"5"),
        ])
        .unwrap();
        let new = Manifest::new(vec![
            dir("a"),
            dir("a/deep"),
            file("a/deep/x", b"changed"),
            dir("b"),
            file("b/y", b"2"),
            dir("fresh"),
            dir("fresh/sub"),
            file("fresh/sub/n", b"6"),
            file("top", b"4"),
            file("swap", b"now a file"),
        ])
        .unwrap();
        let (send, _) = walk(&old, &new);
        let got: Vec<&str> = send.iter().map(String::as_str).collect();
        // The root (gone, fresh, swap changed), a/deep (x changed), the new subtree.
        assert_eq!(got, ["", "a/deep", "fresh", "fresh/sub"]);
        let patch = DirTree::new(&new).patch(&new, &send);
        let bytes = crate::encode_dir_patch(&patch);
        assert_eq!(crate::decode_dir_patch(&bytes).unwrap(), patch);
        assert_eq!(old.apply_dirs(&patch).unwrap(), new);
        assert_eq!(old.apply_dirs(&patch).unwrap().digest(), new.digest());
        // Unchanged tree: one probe, nothing to send.
        let (send, probes) = walk(&new, &new);
        assert!(send.is_empty());
        assert_eq!(probes, 1);
    }

    #[test]
    fn entries_outside_the_replaced_directories_are_refused() {
        let m = Manifest::new(vec![dir("a"), file("a/x", b"1")]).unwrap();
        let patch = DirPatch {
            dirs: vec!["b".into()],
            entries: vec![file("a/x", b"2")],
        };
        assert!(m.apply_dirs(&patch).is_err());
    }
}
