//! (previous manifest, new manifest) → [`Plan`]: what the target must do to build the new release
//! next to the previous one. Pure: no I/O, deterministic, so the client and the agent compute the
//! same plan from the same manifests and never have to ship it.
//!
//! For every regular file of the new manifest, in order:
//! 1. same content, same mode anywhere in the previous release (same path preferred) → [`Source::Link`]:
//!    a hard link, nothing crosses the wire, renames and copies are free;
//! 2. same content but only with another mode → [`Source::Copy`]: the agent copies it locally
//!    (chmod on a shared inode would change older releases too);
//! 3. otherwise → [`Source::Transfer`], with the previous version at the same path as a delta
//!    basis when there is one. The client picks literal or delta for each transfer.
//!
//! Directories and symlinks are created from the manifest itself. Mtimes play no part: content
//! and mode decide what changed.

use flip_manifest::{Digest, EntryKind, Manifest, RelPath};

/// Where the bytes of one file of the new release come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Hard link to this path of the previous release.
    Link(RelPath),
    /// Local copy of this path of the previous release (content equal, mode differs).
    Copy(RelPath),
    /// Content must come from the client; `basis` is the previous version at the same path.
    Transfer { basis: Option<RelPath> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStep {
    pub path: RelPath,
    pub mode: u32,
    pub size: u64,
    pub digest: Digest,
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    pub files: u64,
    pub linked: u64,
    pub copied: u64,
    pub transfers: u64,
    /// Regular files of the previous release whose path is gone from the new one.
    pub removed: u64,
    /// Bytes of files the target already has (linked or copied).
    pub matched_bytes: u64,
    /// Bytes of files that must be transferred (before delta and compression).
    pub transfer_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Every regular file of the new manifest, in manifest order.
    pub files: Vec<FileStep>,
    pub stats: PlanStats,
}

impl Plan {
    /// The files whose content must come from the client: (index into `files`, step).
    pub fn transfers(&self) -> impl Iterator<Item = (usize, &FileStep)> {
        self.files
            .iter()
            .enumerate()
            .filter(|(_, f)| matches!(f.source, Source::Transfer { .. }))
    }
}

/// rsync block size for a delta basis of `len` bytes: about its square root, 1–16 KiB. The agent
/// picks it when it makes a signature; `flip diff` uses the same rule for its estimates.
pub fn block_size(len: u64) -> u32 {
    ((len as f64).sqrt() as u32)
        .next_power_of_two()
        .clamp(1024, 16384)
}

/// Files at least this large whose previous version is at least this large too are worth an
/// rsync delta; smaller ones are cheaper sent whole inside the compressed stream.
pub const DELTA_MIN: u64 = 8 * 1024;

pub fn plan(prev: Option<&Manifest>, new: &Manifest) -> Plan {
    let empty = Manifest::default();
    let prev = prev.unwrap_or(&empty);
    let by_digest = prev.by_digest();
    let mut stats = PlanStats::default();
    let mut files = Vec::with_capacity(new.file_count());
    for (path, mode, size, digest) in new.files() {
        let same_path = match prev.get(path) {
            Some(EntryKind::File {
                mode: m, digest: d, ..
            }) => Some((*m, d)),
            _ => None,
        };
        let source = if same_path == Some((mode, digest)) {
            Source::Link(path.clone())
        } else if let Some(holders) = by_digest.get(digest) {
            match holders.iter().find(|(_, m)| *m == mode) {
                Some((p, _)) => Source::Link((*p).clone()),
                None => Source::Copy(holders[0].0.clone()),
            }
        } else {
            Source::Transfer {
                basis: same_path.map(|_| path.clone()),
            }
        };
        stats.files += 1;
        match source {
            // Sizes come from a manifest the agent received: their sum may not fit.
            Source::Link(_) => {
                stats.linked += 1;
                stats.matched_bytes = stats.matched_bytes.saturating_add(size);
            }
            Source::Copy(_) => {
                stats.copied += 1;
                stats.matched_bytes = stats.matched_bytes.saturating_add(size);
            }
            Source::Transfer { .. } => {
                stats.transfers += 1;
                stats.transfer_bytes = stats.transfer_bytes.saturating_add(size);
            }
        }
        files.push(FileStep {
            path: path.clone(),
            mode,
            size,
            digest: *digest,
            source,
        });
    }
    stats.removed = prev
        .files()
        .filter(|(p, ..)| !matches!(new.get(p), Some(EntryKind::File { .. })))
        .count() as u64;
    Plan { files, stats }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flip_manifest::Entry;

    fn m(files: &[(&str, &[u8], u32)]) -> Manifest {
        let mut entries = vec![Entry {
            path: RelPath::new("d").unwrap(),
            kind: EntryKind::Dir { mode: 0o755 },
        }];
        for (p, c, mode) in files {
            entries.push(Entry {
                path: RelPath::new(*p).unwrap(),
                kind: EntryKind::File {
                    mode: *mode,
                    size: c.len() as u64,
                    digest: Digest::of(c),
                },
            });
        }
        Manifest::new(entries).unwrap()
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn first_deploy_transfers_everything() {
        let new = m(&[("a", b"1", 0o644), ("d/b", b"2", 0o644)]);
        let plan = plan(None, &new);
        assert_eq!(plan.stats.transfers, 2);
        assert!(plan
            .files
            .iter()
            .all(|f| f.source == Source::Transfer { basis: None }));
    }

    #[test]
    fn links_renames_copies_and_deltas() {
        let prev = m(&[
            ("same", b"same", 0o644),
            ("old-name", b"moved", 0o644),
            ("script", b"#!", 0o644),
            ("edited", b"v1", 0o644),
            ("gone", b"bye", 0o644),
        ]);
        let new = m(&[
            ("same", b"same", 0o644),
            ("d/new-name", b"moved", 0o644),
            ("script", b"#!", 0o755),
            ("edited", b"v2", 0o644),
            ("fresh", b"new", 0o644),
        ]);
        let plan = plan(Some(&prev), &new);
        let src = |path: &str| {
            plan.files
                .iter()
                .find(|f| f.path.as_str() == path)
                .unwrap()
                .source
                .clone()
        };
        assert_eq!(src("same"), Source::Link(p("same")));
        assert_eq!(src("d/new-name"), Source::Link(p("old-name")));
        assert_eq!(src("script"), Source::Copy(p("script")));
        assert_eq!(
            src("edited"),
            Source::Transfer {
                basis: Some(p("edited"))
            }
        );
        assert_eq!(src("fresh"), Source::Transfer { basis: None });
        assert_eq!(plan.stats.linked, 2);
        assert_eq!(plan.stats.copied, 1);
        assert_eq!(plan.stats.transfers, 2);
        // "old-name" and "gone" no longer exist at their paths
        assert_eq!(plan.stats.removed, 2);
        assert_eq!(plan.transfers().count(), 2);
    }

    #[test]
    fn prefers_link_with_matching_mode() {
        let prev = m(&[("a", b"x", 0o755), ("b", b"x", 0o644)]);
        let new = m(&[("c", b"x", 0o644)]);
        assert_eq!(
            plan(Some(&prev), &new).files[0].source,
            Source::Link(p("b"))
        );
    }

    #[test]
    fn same_tree_is_all_links() {
        let t = m(&[("a", b"1", 0o644), ("d/b", b"2", 0o600)]);
        let plan = plan(Some(&t), &t);
        assert_eq!(plan.stats.linked, 2);
        assert_eq!(plan.stats.transfers + plan.stats.removed, 0);
    }

    /// Found by `fuzz/` (target `agent_session`): a client staged this manifest (two files whose
    /// sizes add up past `u64::MAX`) and the agent's plan overflowed summing them (a panic in
    /// builds with overflow checks, a wrapped total otherwise).
    #[test]
    fn sizes_past_u64_max_saturate() {
        let mut bytes = b"FLIPMAN1\x02".to_vec();
        let huge_size = [225, 194, 133, 251, 255, 255, 255, 255, 255, 1];
        for (shared, suffix) in [(0u8, &b"a"[..]), (0, &[220, 147][..])] {
            bytes.extend_from_slice(&[shared, suffix.len() as u8]);
            bytes.extend_from_slice(suffix);
            bytes.extend_from_slice(&[1, 149, 3]); // file, mode 0o625
            bytes.extend_from_slice(&huge_size);
            bytes.extend_from_slice(&[0xff; 32]);
        }
        let new = flip_manifest::decode(&bytes).unwrap();
        assert!(new.files().all(|(_, _, size, _)| size > u64::MAX / 2));
        let first = plan(None, &new);
        assert_eq!(first.stats.transfers, 2);
        assert_eq!(first.stats.transfer_bytes, u64::MAX);
        let again = plan(Some(&new), &new);
        assert_eq!(again.stats.linked, 2);
        assert_eq!(again.stats.matched_bytes, u64::MAX);
        assert_eq!(new.total_bytes(), u64::MAX);
    }
}
