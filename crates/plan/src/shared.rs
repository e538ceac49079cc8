//! Shared paths: directories and files that live once under the target's `shared/` and appear in
//! every release as relative symlinks (`storage -> ../../shared/storage`), plus writable
//! directories. Pure, so the client and the agent derive the same release from the same scan.
//!
//! [`SharedPaths::apply`] turns a scanned manifest, the settings and the shared paths the target
//! already has into the release's manifest (every shared path a symlink, its source content gone)
//! and the manifest to stage: the same, except that a shared path the target does not have yet (a
//! seed) keeps its source content (or, absent from the source, an empty directory or an empty
//! file of mode 0644), which the agent moves into `shared/` when it commits.

use std::collections::{BTreeMap, BTreeSet};

use flip_manifest::{Digest, Entry, EntryKind, Manifest, ManifestError, RelPath};

/// Mode of the directories added as parents of shared paths and writable directories, and of
/// empty seeded directories.
pub const PARENT_MODE: u32 = 0o755;
/// Mode of an empty seeded shared file.
pub const EMPTY_FILE_MODE: u32 = 0o644;
/// Default mode of writable directories.
pub const WRITABLE_MODE: u32 = 0o775;
/// The target's directory holding the shared paths.
pub const SHARED_DIR: &str = "shared";

/// What a shared path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SharedKind {
    /// A directory (`shared_dirs`): its whole subtree is shared.
    Dir,
    /// A regular file (`shared_files`).
    File,
}

impl SharedKind {
    /// "a directory" / "a regular file", for messages.
    pub fn describe(self) -> &'static str {
        match self {
            SharedKind::Dir => "a directory",
            SharedKind::File => "a regular file",
        }
    }
}

/// The shared-path settings of a deploy (`shared_dirs`, `shared_files`, `writable_dirs`,
/// `writable_mode` of `flip.toml`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedPaths {
    /// Shared directories (`shared_dirs`), relative to the release root.
    pub dirs: Vec<RelPath>,
    /// Shared regular files (`shared_files`), relative to the release root.
    pub files: Vec<RelPath>,
    /// Directories that must exist with [`SharedPaths::writable_mode`] after a deploy: in the
    /// release, or under `shared/` when under a shared directory.
    pub writable: Vec<RelPath>,
    /// Permission bits (07777) of writable directories.
    pub writable_mode: u32,
}

/// Why shared-path settings or a source cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SharedError {
    /// A shared path is below another shared path.
    #[error("shared path {inner} is inside shared path {outer}: list only {outer}")]
    Nested {
        /// The enclosing shared path.
        outer: String,
        /// The shared path below it.
        inner: String,
    },
    /// A path is listed twice (in `shared_dirs`, `shared_files` or both).
    #[error("{0} is listed twice in the shared paths")]
    Twice(String),
    /// A shared path or writable directory is in flip's own `.flip` directory.
    #[error("{0}: `.flip` is flip's own directory and cannot be shared or writable")]
    Reserved(String),
    /// A writable directory is at or below a shared file.
    #[error("writable directory {dir} is inside shared file {file}")]
    WritableInFile {
        /// The writable directory.
        dir: String,
        /// The shared file it is in.
        file: String,
    },
    /// `writable_mode` has bits outside the permission bits (07777).
    #[error("writable_mode {0:o} has bits outside 07777")]
    BadMode(u32),
    /// The source (or the staged tree) has the wrong kind of entry at a path.
    #[error("{path} is {found} in the source, but {why}: make it {expected} or remove it")]
    WrongType {
        /// The path, relative to the release root.
        path: String,
        /// What the source has there ("a symlink", ...).
        found: &'static str,
        /// What it must be ("a directory", ...).
        expected: &'static str,
        /// Why it must be that (which setting asks for it).
        why: String,
    },
    /// The resulting release or staged manifest is not a valid manifest.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// What [`SharedPaths::apply`] makes of a scanned manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The release as recorded on the target: every shared path a symlink into `shared/`.
    pub release: Manifest,
    /// What is staged and sent: `release`, except that each seed holds its content.
    pub staged: Manifest,
    /// Shared paths the target does not have yet, in path order: moved from the staged tree into
    /// `shared/` at commit.
    pub seeds: Vec<(RelPath, SharedKind)>,
}

fn kind_name(k: &EntryKind) -> &'static str {
    match k {
        EntryKind::Dir { .. } => "a directory",
        EntryKind::File { .. } => "a regular file",
        EntryKind::Symlink { .. } => "a symlink",
    }
}

/// Whether `p` is `x` or below it.
pub fn is_within(p: &RelPath, x: &RelPath) -> bool {
    let (p, x) = (p.as_str(), x.as_str());
    p == x || (p.len() > x.len() && p.starts_with(x) && p.as_bytes()[x.len()] == b'/')
}

/// The symlink target of shared path `x` inside a release (`releases/N/x`):
/// `../../shared/storage` for `storage`, `../../../shared/public/uploads` for `public/uploads`.
pub fn link_target(x: &RelPath) -> String {
    format!("{}{SHARED_DIR}/{x}", "../".repeat(x.depth() + 1))
}

impl SharedPaths {
    /// Whether there is nothing to do (no shared path, no writable directory).
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty() && self.files.is_empty() && self.writable.is_empty()
    }

    /// Every shared path with its kind, in path order.
    pub fn all(&self) -> Vec<(RelPath, SharedKind)> {
        let mut v: Vec<(RelPath, SharedKind)> = self
            .dirs
            .iter()
            .map(|p| (p.clone(), SharedKind::Dir))
            .chain(self.files.iter().map(|p| (p.clone(), SharedKind::File)))
            .collect();
        v.sort();
        v
    }

    /// The shared path `p` is equal to or below.
    pub fn covering(&self, p: &RelPath) -> Option<(&RelPath, SharedKind)> {
        self.dirs
            .iter()
            .map(|x| (x, SharedKind::Dir))
            .chain(self.files.iter().map(|x| (x, SharedKind::File)))
            .find(|(x, _)| is_within(p, x))
    }

    /// Writable directories under a shared directory (made under `shared/` by the agent).
    pub fn writable_in_shared(&self) -> Vec<RelPath> {
        let mut v: Vec<RelPath> = self
            .writable
            .iter()
            .filter(|w| self.covering(w).is_some())
            .cloned()
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Writable directories inside the release.
    pub fn writable_in_release(&self) -> Vec<RelPath> {
        let mut v: Vec<RelPath> = self
            .writable
            .iter()
            .filter(|w| self.covering(w).is_none())
            .cloned()
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Checks the settings themselves: no shared path twice or inside another, none in `.flip`,
    /// no writable directory inside a shared file, a mode within 07777.
    ///
    /// # Errors
    ///
    /// [`SharedError::BadMode`], [`SharedError::Reserved`], [`SharedError::Twice`],
    /// [`SharedError::Nested`] or [`SharedError::WritableInFile`], for the first such setting.
    pub fn validate(&self) -> Result<(), SharedError> {
        if self.writable_mode & !0o7777 != 0 {
            return Err(SharedError::BadMode(self.writable_mode));
        }
        let all = self.all();
        for p in all.iter().map(|(p, _)| p).chain(&self.writable) {
            if p.components().next() == Some(".flip") {
                return Err(SharedError::Reserved(p.to_string()));
            }
        }
        for (i, (a, _)) in all.iter().enumerate() {
            for (b, _) in &all[i + 1..] {
                if a == b {
                    return Err(SharedError::Twice(a.to_string()));
                }
                // Sorted: a parent comes before its children.
                if is_within(b, a) {
                    return Err(SharedError::Nested {
                        outer: a.to_string(),
                        inner: b.to_string(),
                    });
                }
            }
        }
        for w in &self.writable {
            if let Some((x, SharedKind::File)) = self.covering(w) {
                return Err(SharedError::WritableInFile {
                    dir: w.to_string(),
                    file: x.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Checks a scanned source before anything is sent: each shared path absent or of its kind,
    /// each parent of a shared path or of a writable directory in the release absent or a
    /// directory, each writable directory in the release absent or a directory.
    ///
    /// # Errors
    ///
    /// What [`SharedPaths::validate`] returns, or [`SharedError::WrongType`] for the first shared
    /// path that `m` has as another kind of entry.
    pub fn check_source(&self, m: &Manifest) -> Result<(), SharedError> {
        self.validate()?;
        for (x, kind) in self.all() {
            if let Some(k) = m.get(&x) {
                let ok = matches!(
                    (kind, k),
                    (SharedKind::Dir, EntryKind::Dir { .. })
                        | (SharedKind::File, EntryKind::File { .. })
                );
                if !ok {
                    return Err(SharedError::WrongType {
                        path: x.to_string(),
                        found: kind_name(k),
                        expected: kind.describe(),
                        why: format!("it is listed in shared_{}s", dir_or_file(kind)),
                    });
                }
            }
        }
        Ok(())
    }

    /// The release and the staged manifest of `scanned` on a target that already has the shared
    /// paths in `present` (see the module docs). Source content at a shared path the target has
    /// is left out whatever its kind; at a seed it must be of the path's kind.
    ///
    /// # Errors
    ///
    /// What [`SharedPaths::validate`] returns; [`SharedError::WrongType`] when a seed in `scanned`
    /// is not of its kind, or when a parent of a shared path or writable directory, or a writable
    /// directory in the release, is not a directory; [`SharedError::Manifest`] when the result
    /// is not a valid manifest.
    pub fn apply(
        &self,
        scanned: &Manifest,
        present: &BTreeSet<RelPath>,
    ) -> Result<Applied, SharedError> {
        self.validate()?;
        let all = self.all();
        let seeds: Vec<(RelPath, SharedKind)> = all
            .iter()
            .filter(|(x, _)| !present.contains(x))
            .cloned()
            .collect();
        let is_seed = |x: &RelPath| seeds.iter().any(|(s, _)| s == x);
        let (mut release, mut staged) = self.split_scan(scanned, &is_seed)?;
        let mut parents = add_links(&all, &is_seed, &mut release, &mut staged);
        let in_release = self.writable_in_release();
        parents.extend(in_release.iter().cloned());
        add_parents(&parents, &mut release, &mut staged)?;
        self.add_writable(&in_release, &mut release, &mut staged)?;
        let build = |map: BTreeMap<RelPath, EntryKind>| {
            Manifest::from_sorted(
                map.into_iter()
                    .map(|(path, kind)| Entry { path, kind })
                    .collect(),
            )
        };
        Ok(Applied {
            release: build(release)?,
            staged: build(staged)?,
            seeds,
        })
    }

    /// The scanned entries as the release has them (those under no shared path) and as the
    /// stage has them (those too, and the content of seeds), each seed checked to be of its
    /// kind.
    fn split_scan(
        &self,
        scanned: &Manifest,
        is_seed: &dyn Fn(&RelPath) -> bool,
    ) -> Result<(Tree, Tree), SharedError> {
        let mut release = Tree::new();
        let mut staged = Tree::new();
        for e in scanned.entries() {
            match self.covering(&e.path) {
                None => {
                    release.insert(e.path.clone(), e.kind.clone());
                    staged.insert(e.path.clone(), e.kind.clone());
                }
                Some((x, kind)) if is_seed(x) => {
                    if &e.path == x {
                        let ok = matches!(
                            (kind, &e.kind),
                            (SharedKind::Dir, EntryKind::Dir { .. })
                                | (SharedKind::File, EntryKind::File { .. })
                        );
                        if !ok {
                            return Err(SharedError::WrongType {
                                path: x.to_string(),
                                found: kind_name(&e.kind),
                                expected: kind.describe(),
                                why: format!("it is listed in shared_{}s", dir_or_file(kind)),
                            });
                        }
                    }
                    staged.insert(e.path.clone(), e.kind.clone());
                }
                // The target has it: the source's copy is not shipped.
                Some(_) => {}
            }
        }
        Ok((release, staged))
    }

    /// Writable directories in the release: directories of `writable_mode` in both trees.
    fn add_writable(
        &self,
        in_release: &[RelPath],
        release: &mut Tree,
        staged: &mut Tree,
    ) -> Result<(), SharedError> {
        for w in in_release {
            for map in [&mut *release, &mut *staged] {
                match map.get(w) {
                    None | Some(EntryKind::Dir { .. }) => {
                        map.insert(
                            w.clone(),
                            EntryKind::Dir {
                                mode: self.writable_mode,
                            },
                        );
                    }
                    Some(k) => {
                        return Err(SharedError::WrongType {
                            path: w.to_string(),
                            found: kind_name(k),
                            expected: "a directory",
                            why: "it is listed in writable_dirs".into(),
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

/// A manifest being built: path → entry.
type Tree = BTreeMap<RelPath, EntryKind>;

/// Each shared path as a symlink into `shared/` in the release, and in the stage too unless it
/// is a seed (then its content, or an empty directory or file when the source has none).
/// Returns the shared paths, whose parents must be directories.
fn add_links(
    all: &[(RelPath, SharedKind)],
    is_seed: &dyn Fn(&RelPath) -> bool,
    release: &mut Tree,
    staged: &mut Tree,
) -> Vec<RelPath> {
    let mut parents: Vec<RelPath> = Vec::new();
    for (x, kind) in all {
        let link = EntryKind::Symlink {
            target: link_target(x),
        };
        release.insert(x.clone(), link.clone());
        if is_seed(x) {
            staged.entry(x.clone()).or_insert_with(|| match kind {
                SharedKind::Dir => EntryKind::Dir { mode: PARENT_MODE },
                SharedKind::File => EntryKind::File {
                    mode: EMPTY_FILE_MODE,
                    size: 0,
                    digest: Digest::of(b""),
                },
            });
        } else {
            staged.insert(x.clone(), link);
        }
        parents.push(x.clone());
    }
    parents
}

/// The parents of every shared path and writable directory, as directories in both trees
/// (created where missing; anything else there is an error).
fn add_parents(
    parents: &[RelPath],
    release: &mut Tree,
    staged: &mut Tree,
) -> Result<(), SharedError> {
    for p in parents {
        let mut cur = p.parent();
        while let Some(d) = cur {
            for map in [&mut *release, &mut *staged] {
                match map.get(&d) {
                    None => {
                        map.insert(d.clone(), EntryKind::Dir { mode: PARENT_MODE });
                    }
                    Some(EntryKind::Dir { .. }) => {}
                    Some(k) => {
                        return Err(SharedError::WrongType {
                            path: d.to_string(),
                            found: kind_name(k),
                            expected: "a directory",
                            why: format!("{p} is below it in the shared or writable paths"),
                        })
                    }
                }
            }
            cur = d.parent();
        }
    }
    Ok(())
}

fn dir_or_file(k: SharedKind) -> &'static str {
    match k {
        SharedKind::Dir => "dir",
        SharedKind::File => "file",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }
    fn dir(s: &str) -> Entry {
        Entry {
            path: p(s),
            kind: EntryKind::Dir { mode: 0o755 },
        }
    }
    fn file(s: &str, content: &[u8]) -> Entry {
        Entry {
            path: p(s),
            kind: EntryKind::File {
                mode: 0o644,
                size: content.len() as u64,
                digest: Digest::of(content),
            },
        }
    }
    fn settings() -> SharedPaths {
        SharedPaths {
            dirs: vec![p("storage"), p("public/uploads")],
            files: vec![p(".env")],
            writable: vec![p("storage/framework/cache"), p("bootstrap/cache")],
            writable_mode: 0o775,
        }
    }
    fn source() -> Manifest {
        Manifest::new(vec![
            file(".env", b"APP=1"),
            dir("app"),
            file("app/a.php", b"<?php"),
            dir("public"),
            file("public/index.php", b"<?php"),
            dir("storage"),
            dir("storage/logs"),
            file("storage/logs/x.log", b"log"),
        ])
        .unwrap()
    }

    #[test]
    fn links_point_through_the_release_into_shared() {
        assert_eq!(link_target(&p("storage")), "../../shared/storage");
        assert_eq!(
            link_target(&p("public/uploads")),
            "../../../shared/public/uploads"
        );
    }

    #[test]
    fn a_first_deploy_seeds_every_shared_path_and_records_symlinks() {
        let a = settings().apply(&source(), &BTreeSet::new()).unwrap();
        let link = |x: &str| {
            Some(EntryKind::Symlink {
                target: link_target(&p(x)),
            })
        };
        for x in ["storage", "public/uploads", ".env"] {
            assert_eq!(a.release.get(&p(x)).cloned(), link(x), "{x}");
        }
        assert!(a.release.get(&p("storage/logs/x.log")).is_none());
        assert_eq!(
            a.release.get(&p("bootstrap/cache")),
            Some(&EntryKind::Dir { mode: 0o775 })
        );
        assert_eq!(
            a.release.get(&p("bootstrap")),
            Some(&EntryKind::Dir { mode: 0o755 })
        );
        // The seeds keep their content; a shared dir absent from the source is staged empty.
        assert_eq!(
            a.staged.get(&p("storage/logs/x.log")),
            source().get(&p("storage/logs/x.log"))
        );
        assert_eq!(
            a.staged.get(&p("public/uploads")),
            Some(&EntryKind::Dir { mode: 0o755 })
        );
        assert_eq!(a.seeds.len(), 3);
        // The agent's check: applying again to the staged manifest gives the same.
        let again = settings().apply(&a.staged, &BTreeSet::new()).unwrap();
        assert_eq!(again, a);
    }

    #[test]
    fn a_shared_path_the_target_has_is_not_shipped_whatever_the_source_holds() {
        let present: BTreeSet<RelPath> = [p("storage"), p("public/uploads"), p(".env")].into();
        let a = settings().apply(&source(), &present).unwrap();
        assert!(a.seeds.is_empty());
        assert_eq!(a.release, a.staged);
        assert_eq!(a.release.file_count(), 2);
        // A source whose storage is now a file: it is not shipped, so not refused here.
        let other = Manifest::new(vec![file("storage", b"x")]).unwrap();
        let b = settings().apply(&other, &present).unwrap();
        assert!(matches!(
            b.release.get(&p("storage")),
            Some(EntryKind::Symlink { .. })
        ));
    }

    #[test]
    fn a_seed_of_the_wrong_kind_is_refused_naming_it() {
        let m = Manifest::new(vec![file("storage", b"x")]).unwrap();
        let e = settings().apply(&m, &BTreeSet::new()).unwrap_err();
        assert!(
            e.to_string().starts_with("storage is a regular file"),
            "{e}"
        );
        assert!(settings().check_source(&m).is_err());
        let m = Manifest::new(vec![file("public", b"x")]).unwrap();
        let e = settings().apply(&m, &BTreeSet::new()).unwrap_err();
        assert!(e.to_string().starts_with("public is a regular file"), "{e}");
    }

    #[test]
    fn nested_reserved_and_twice_listed_paths_are_refused() {
        let mut s = settings();
        s.files.push(p("storage/x"));
        assert!(matches!(s.validate(), Err(SharedError::Nested { .. })));
        let mut s = settings();
        s.dirs.push(p(".flip/x"));
        assert!(matches!(s.validate(), Err(SharedError::Reserved(_))));
        let mut s = settings();
        s.files.push(p("storage"));
        assert!(matches!(s.validate(), Err(SharedError::Twice(_))));
        let mut s = settings();
        s.writable.push(p(".env/x"));
        assert!(matches!(
            s.validate(),
            Err(SharedError::WritableInFile { .. })
        ));
    }

    #[test]
    fn writable_dirs_split_between_release_and_shared() {
        let s = settings();
        assert_eq!(s.writable_in_shared(), vec![p("storage/framework/cache")]);
        assert_eq!(s.writable_in_release(), vec![p("bootstrap/cache")]);
    }
}
