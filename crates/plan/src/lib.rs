//! (previous manifest, new manifest) → [`Plan`]: what the target must do to build the new release
//! next to the previous one. Pure: no I/O, deterministic. A deploy's plan is computed by the agent
//! alone (its stage answers with the files it still needs, so the plan is never shipped); the
//! client computes the same plan from the same manifests only to predict a deploy (`--dry-run`,
//! `flip diff`).
//!
//! For every regular file of the new manifest, in order:
//! 1. same content and mode at the same path of the previous release, and not empty →
//!    [`Source::Link`]: a hard link, nothing crosses the wire. Links join only the same path
//!    across releases (as rsync `--link-dest`): a file the application appends to at runtime
//!    never shows up at another path, in this release or an older one;
//! 2. same content at the same path with another mode, or anywhere else in the previous release,
//!    or an empty file that the previous release has somewhere → [`Source::Copy`]: the agent makes
//!    a new inode from what it has (reflink or copy; chmod on a shared inode would change older
//!    releases too), renames and duplicates still cost nothing on the wire;
//! 3. otherwise → [`Source::Transfer`], with a delta basis when the previous release has a
//!    likely ancestor: the previous version at the same path, else (rsync `--fuzzy` style) a file
//!    that is gone from the new release and looks like this one's old self — the same file name
//!    elsewhere (a moved and edited class) or, in the same directory, the same name once
//!    content-hash parts are masked (`app.3f9a2c1e.js` → `app.*.js`, a rebuilt bundle). The
//!    client picks literal, patch or delta for each transfer.
//!
//! Directories and symlinks are created from the manifest itself. Mtimes play no part: content
//! and mode decide what changed.

#![warn(missing_docs, unreachable_pub)]

pub mod report;
pub mod shared;

use std::collections::HashMap;

use flip_manifest::{Digest, Entry, EntryKind, Manifest, RelPath};

/// Where the bytes of one file of the new release come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Hard link to the same path of the previous release (same content, same mode, not empty).
    Link(RelPath),
    /// Local copy of this path of the previous release into a new inode: the content is equal,
    /// and the path or the mode differs, or the file is empty.
    Copy(RelPath),
    /// Content must come from the client; `basis` is a file of the previous release to build it
    /// from (its previous version at the same path, or a likely ancestor: see the crate docs).
    Transfer {
        /// The delta basis, if any.
        basis: Option<RelPath>,
    },
}

/// One regular file of the new release and where its bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStep {
    /// Where the file goes in the new release.
    pub path: RelPath,
    /// All 12 permission bits (`mode & 0o7777`).
    pub mode: u32,
    /// Length in bytes.
    pub size: u64,
    /// blake3 of the content.
    pub digest: Digest,
    /// Where its content comes from.
    pub source: Source,
}

/// Counts of a [`Plan`], by [`Source`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    /// Regular files of the new manifest.
    pub files: u64,
    /// Hard links to the same path of the previous release.
    pub linked: u64,
    /// New inodes made on the target from content it already has (another path, another mode,
    /// or an empty file).
    pub copied: u64,
    /// Files whose content must come from the client.
    pub transfers: u64,
    /// Regular files of the previous release whose path is gone from the new one.
    pub removed: u64,
    /// Bytes of files the target already has (linked or copied).
    pub matched_bytes: u64,
    /// Bytes of files that must be transferred (before delta and compression).
    pub transfer_bytes: u64,
}

/// What the target does to build a new release next to the previous one: one [`FileStep`] per
/// regular file. Directories and symlinks come from the manifest itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Every regular file of the new manifest, in manifest order.
    pub files: Vec<FileStep>,
    /// Counts of the steps.
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

/// The plan for building `new` next to `prev` (`None`: nothing live, everything is transferred),
/// by the rules of the crate docs.
pub fn plan(prev: Option<&Manifest>, new: &Manifest) -> Plan {
    let empty = Manifest::default();
    let prev = prev.unwrap_or(&empty);
    // Built on first use: most files of an upgrade are linked from the same path.
    let by_digest = std::cell::OnceCell::new();
    let fuzzy = Fuzzy::new(prev, new);
    let mut stats = PlanStats::default();
    let mut files = Vec::with_capacity(new.file_count());
    // Both manifests are sorted by path: the same path in `prev` is found by one merge walk.
    let mut theirs = prev.entries().iter().peekable();
    for (path, mode, size, digest) in new.files() {
        while theirs.next_if(|e| e.path < *path).is_some() {}
        let same_path = match theirs.peek() {
            Some(Entry {
                path: p,
                kind: EntryKind::File {
                    mode: m, digest: d, ..
                },
            }) if p == path => Some((*m, d)),
            _ => None,
        };
        let source = if same_path == Some((mode, digest)) && size > 0 {
            Source::Link(path.clone())
        } else if same_path.is_some_and(|(_, d)| d == digest) {
            // Same content at the same path: another mode, or empty (never linked).
            Source::Copy(path.clone())
        } else if let [(_, first, _), ..] = by_digest.get_or_init(|| prev.by_digest()).get(digest) {
            Source::Copy((*first).clone())
        } else {
            Source::Transfer {
                basis: match same_path {
                    Some(_) => Some(path.clone()),
                    None => fuzzy.basis(path, size).cloned(),
                },
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
    stats.removed = fuzzy.gone as u64;
    Plan { files, stats }
}

/// The regular files of `prev` whose path is not a regular file in `new` (path, size): one merge
/// of the two sorted entry lists.
fn gone_files<'a>(prev: &'a Manifest, new: &Manifest) -> Vec<(&'a RelPath, u64)> {
    let mut gone = Vec::new();
    let mut theirs = new.entries().iter().peekable();
    for e in prev.entries() {
        let EntryKind::File { size, .. } = e.kind else {
            continue;
        };
        while theirs.next_if(|n| n.path < e.path).is_some() {}
        match theirs.peek() {
            Some(n) if n.path == e.path && matches!(n.kind, EntryKind::File { .. }) => {}
            _ => gone.push((&e.path, size)),
        }
    }
    gone
}

/// A fuzzy basis is only taken when its size is within this factor of the new file's: a much
/// larger one costs more to load than it can save, a much smaller one saves little.
const FUZZY_SIZE_FACTOR: u64 = 4;

/// Candidate ancestors for files new at their path: regular files of the previous release whose
/// path is gone from the new one, indexed by file name and by (directory, masked name), each
/// list sorted by (size, path) so the choice is deterministic (a prediction matches the deploy).
struct Fuzzy<'a> {
    by_name: HashMap<&'a str, Vec<(u64, &'a RelPath)>>,
    by_mask: HashMap<(&'a str, String), Vec<(u64, &'a RelPath)>>,
    /// How many files are gone.
    gone: usize,
}

impl<'a> Fuzzy<'a> {
    fn new(prev: &'a Manifest, new: &Manifest) -> Self {
        let mut by_name: HashMap<&str, Vec<(u64, &RelPath)>> = HashMap::new();
        let mut by_mask: HashMap<(&str, String), Vec<(u64, &RelPath)>> = HashMap::new();
        let gone = gone_files(prev, new);
        for &(path, size) in &gone {
            by_name
                .entry(path.file_name())
                .or_default()
                .push((size, path));
            if let Some(mask) = mask_hashes(path.file_name()) {
                by_mask
                    .entry((dir_of(path), mask))
                    .or_default()
                    .push((size, path));
            }
        }
        for list in by_name.values_mut().chain(by_mask.values_mut()) {
            list.sort_unstable();
        }
        Fuzzy {
            by_name,
            by_mask,
            gone: gone.len(),
        }
    }

    /// The likely ancestor of a file new at `path`, if any: same file name first, then the same
    /// masked name in the same directory; among several, the closest in size.
    fn basis(&self, path: &RelPath, size: u64) -> Option<&'a RelPath> {
        if self.by_name.is_empty() {
            return None;
        }
        let by_name = self.by_name.get(path.file_name());
        let by_mask = || {
            let mask = mask_hashes(path.file_name())?;
            self.by_mask.get(&(dir_of(path), mask))
        };
        by_name
            .and_then(|l| closest(l, size))
            .or_else(|| by_mask().and_then(|l| closest(l, size)))
    }
}

/// The entry of `list` (sorted by size) closest in size to `size`, if within the size factor.
fn closest<'a>(list: &[(u64, &'a RelPath)], size: u64) -> Option<&'a RelPath> {
    let i = list.partition_point(|(s, _)| *s < size);
    let below = i.checked_sub(1).map(|j| list[j]);
    let above = list.get(i).copied();
    let (s, p) = match (below, above) {
        (Some(b), Some(a)) => {
            if size - b.0 <= a.0 - size {
                b
            } else {
                a
            }
        }
        (Some(x), None) | (None, Some(x)) => x,
        (None, None) => return None,
    };
    let (lo, hi) = (s.min(size), s.max(size));
    (hi <= lo.saturating_mul(FUZZY_SIZE_FACTOR).max(64)).then_some(p)
}

fn dir_of(path: &RelPath) -> &str {
    path.as_str().rsplit_once('/').map_or("", |(d, _)| d)
}

/// `name` with every part that looks like a content hash replaced by `*`, or `None` when it has
/// none. Parts are separated by `.`, `-`, `_` or `~`; a hash-like part is at least 6 ASCII
/// letters and digits with at least one digit (`3f9a2c1e`, `BxY12kq9`, not `jquery` or `v2`).
fn mask_hashes(name: &str) -> Option<String> {
    let mut out = String::with_capacity(name.len());
    let mut masked = false;
    for part in name.split_inclusive(['.', '-', '_', '~']) {
        let (word, sep) = match part.char_indices().last() {
            Some((i, '.' | '-' | '_' | '~')) => part.split_at(i),
            _ => (part, ""),
        };
        let hashy = word.len() >= 6
            && word.bytes().all(|b| b.is_ascii_alphanumeric())
            && word.bytes().any(|b| b.is_ascii_digit());
        if hashy {
            out.push('*');
            masked = true;
        } else {
            out.push_str(word);
        }
        out.push_str(sep);
    }
    masked.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flip_manifest::Entry;

    fn m(files: &[(&str, &[u8], u32)]) -> Manifest {
        let mut dirs = std::collections::BTreeSet::from(["d".to_string()]);
        for (p, ..) in files {
            let mut d = RelPath::new(*p).unwrap().parent();
            while let Some(x) = d {
                d = x.parent();
                dirs.insert(x.as_str().to_string());
            }
        }
        let mut entries: Vec<Entry> = dirs
            .into_iter()
            .map(|d| Entry {
                path: RelPath::new(d).unwrap(),
                kind: EntryKind::Dir { mode: 0o755 },
            })
            .collect();
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

    /// How the plan gets the file at `path`.
    fn source_of(plan: &Plan, path: &str) -> Source {
        let step = plan.files.iter().find(|f| f.path.as_str() == path);
        step.unwrap().source.clone()
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
        let src = |path: &str| source_of(&plan, path);
        assert_eq!(src("same"), Source::Link(p("same")));
        // Links join only the same path: a rename is a local copy.
        assert_eq!(src("d/new-name"), Source::Copy(p("old-name")));
        assert_eq!(src("script"), Source::Copy(p("script")));
        assert_eq!(
            src("edited"),
            Source::Transfer {
                basis: Some(p("edited"))
            }
        );
        assert_eq!(src("fresh"), Source::Transfer { basis: None });
        assert_eq!(plan.stats.linked, 1);
        assert_eq!(plan.stats.copied, 2);
        assert_eq!(plan.stats.transfers, 2);
        // "old-name" and "gone" no longer exist at their paths
        assert_eq!(plan.stats.removed, 2);
        assert_eq!(plan.transfers().count(), 2);
    }

    /// Content found at another path is never hard-linked to the new path, whatever its mode:
    /// a log file appended to at runtime must not show up in a public file of any release.
    #[test]
    fn content_at_another_path_is_copied_not_linked() {
        let prev = m(&[
            ("a", b"x", 0o755),
            ("b", b"x", 0o644),
            ("public/.gitkeep", b"", 0o644),
        ]);
        let new = m(&[
            ("c", b"x", 0o644),
            ("public/.gitkeep", b"", 0o644),
            ("storage/app.log", b"", 0o644),
        ]);
        let plan = plan(Some(&prev), &new);
        let src = |path: &str| source_of(&plan, path);
        assert_eq!(src("c"), Source::Copy(p("a")));
        // Empty files are created, never linked, even at the same path.
        assert_eq!(src("public/.gitkeep"), Source::Copy(p("public/.gitkeep")));
        assert_eq!(src("storage/app.log"), Source::Copy(p("public/.gitkeep")));
        assert_eq!(plan.stats.linked, 0);
        assert_eq!(plan.stats.copied, 3);
    }

    /// Set-id and sticky bits are part of the mode: a change of them alone is a copy.
    #[test]
    fn special_mode_bits_count() {
        let prev = m(&[("run", b"#!", 0o755)]);
        let new = m(&[("run", b"#!", 0o4755)]);
        let plan = plan(Some(&prev), &new);
        assert_eq!(plan.files[0].source, Source::Copy(p("run")));
        assert_eq!(plan.files[0].mode, 0o4755);
        let same = super::plan(Some(&new), &new);
        assert_eq!(same.files[0].source, Source::Link(p("run")));
    }

    #[test]
    fn same_tree_is_all_links() {
        let t = m(&[("a", b"1", 0o644), ("d/b", b"2", 0o600), ("e", b"", 0o644)]);
        let plan = plan(Some(&t), &t);
        assert_eq!(plan.stats.linked, 2);
        // The empty file is created anew.
        assert_eq!(plan.stats.copied, 1);
        assert_eq!(plan.stats.transfers + plan.stats.removed, 0);
    }

    #[test]
    fn moved_and_edited_files_and_rebuilt_bundles_get_a_fuzzy_basis() {
        let big = |c: u8, n: usize| vec![c; n];
        let (a1, a2) = (big(b'a', 1000), big(b'A', 1100));
        let (b1, b2) = (big(b'b', 5000), big(b'B', 4000));
        let (l1, l2, l3) = (big(b'l', 100), big(b'L', 900), big(b'x', 120));
        let prev = m(&[
            ("src/Old/Thing.php", &a1, 0o644),
            ("public/build/app.3f9a2c1e.js", &b1, 0o644),
            ("public/build/vendor.3f9a2c1e.js", &big(b'v', 9000), 0o644),
            ("vendor/a/LICENSE", &l1, 0o644),
            ("vendor/b/LICENSE", &l2, 0o644),
            ("kept/LICENSE", &l3, 0o644),
            ("src/Huge.php", &big(b'h', 100_000), 0o644),
        ]);
        let new = m(&[
            ("src/New/Thing.php", &a2, 0o644),
            ("public/build/app.77c01d2b.js", &b2, 0o644),
            ("public/other/app.88c01d2b.js", &b2, 0o644),
            ("vendor/c/LICENSE", &big(b'C', 110), 0o644),
            ("kept/LICENSE", &l3, 0o644),
            ("lib/Huge.php", &big(b'H', 100), 0o644),
            ("fresh.txt", b"new", 0o644),
        ]);
        let plan = plan(Some(&prev), &new);
        let basis = |path: &str| match &plan.files.iter().find(|f| f.path.as_str() == path) {
            Some(FileStep {
                source: Source::Transfer { basis },
                ..
            }) => basis.as_ref().map(|b| b.as_str().to_string()),
            other => panic!("{path}: {other:?}"),
        };
        assert_eq!(
            basis("src/New/Thing.php").as_deref(),
            Some("src/Old/Thing.php")
        );
        assert_eq!(
            basis("public/build/app.77c01d2b.js").as_deref(),
            Some("public/build/app.3f9a2c1e.js")
        );
        // masked names only match within one directory
        assert_eq!(basis("public/other/app.88c01d2b.js"), None);
        // the closest in size among files gone from the new release (kept/LICENSE is still there)
        assert_eq!(
            basis("vendor/c/LICENSE").as_deref(),
            Some("vendor/a/LICENSE")
        );
        // a thousand times larger: not worth loading
        assert_eq!(basis("lib/Huge.php"), None);
        assert_eq!(basis("fresh.txt"), None);
    }

    /// The merge that finds files gone from the release follows the manifests' component-wise
    /// order (`a` < `a/x` < `a-b`), not byte order.
    #[test]
    fn files_gone_follow_component_order() {
        let prev = m(&[
            ("a/x", b"1", 0o644),
            ("a-b", b"2", 0o644),
            ("a.c", b"3", 0o644),
            ("z/y", b"4", 0o644),
        ]);
        let new = m(&[
            ("a-b", b"2", 0o644),
            ("a.c/in", b"3", 0o644),
            ("z/y", b"5", 0o644),
        ]);
        let gone: Vec<&str> = gone_files(&prev, &new)
            .into_iter()
            .map(|(p, _)| p.as_str())
            .collect();
        // "a.c" became a directory; "z/y" changed but is still a file.
        assert_eq!(gone, ["a/x", "a.c"]);
        assert_eq!(plan(Some(&prev), &new).stats.removed, 2);
    }

    #[test]
    fn masks_content_hash_parts_of_names() {
        assert_eq!(mask_hashes("app.3f9a2c1e.js").as_deref(), Some("app.*.js"));
        assert_eq!(
            mask_hashes("main-BxY12kq9.chunk.css").as_deref(),
            Some("main-*.chunk.css")
        );
        assert_eq!(
            mask_hashes("runtime~a1b2c3d4e5.js").as_deref(),
            Some("runtime~*.js")
        );
        assert_eq!(mask_hashes("jquery.min.js"), None);
        assert_eq!(mask_hashes("v2.php"), None);
        assert_eq!(mask_hashes("Version20240101.php").as_deref(), Some("*.php"));
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
