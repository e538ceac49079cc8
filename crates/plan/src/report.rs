//! What a release changes, path by path, and how each file gets its content: the one
//! classification behind `flip diff`, `flip deploy --dry-run` and the report of a real deploy, so
//! the three agree by construction.
//!
//! [`changes`] compares the previous and the new manifest entry by entry (one merge of the two
//! sorted lists) and lists every path that changes as an [`Item`]: directories, symlinks and
//! files created, changed or removed, with how the [`Plan`] gets each file of the new release
//! ([`Planned`]). Unchanged paths are only counted. [`choose`] is the rule that picks literal,
//! rsync delta or zstd patch for a file whose content is sent; [`Changes::settle`] records how
//! each sent file went (predicted by a dry run or `flip diff`, measured by a deploy) and counts
//! it. When a deploy has to deviate from the plan because of the target's state (a file to link
//! whose copy on the target is missing or altered, a delta basis found damaged), it lists the
//! file with what really happened and a note saying why.

use crate::{Plan, Source, DELTA_MIN};
use flip_manifest::{EntryKind, Manifest, RelPath};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::HashMap;

/// What kind of entry an [`Item`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
}

/// What happens to a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Created: the path is new, or held another kind of entry before (which is then also
    /// listed as [`Change::Removed`]).
    New,
    /// A file's content changed (its mode may have changed too: [`Item::modes`]).
    Content,
    /// Only the mode changed (a file or a directory).
    Mode,
    /// A symlink points somewhere else.
    Retarget,
    /// Gone from the new release (or replaced by another kind of entry).
    Removed,
    /// A file unchanged in content and mode that the deploy could not reuse from the target
    /// (its copy there was missing or altered) and sent again. Only in a deploy's report.
    Unchanged,
}

/// How the plan gets a file of the new release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Planned {
    /// Hard link to this path of the previous release.
    Link(RelPath),
    /// Local copy of this path of the previous release.
    Copy(RelPath),
    /// Content sent by the client, built from `basis` (path and size in the previous release)
    /// when there is one.
    Transfer {
        /// The basis and its size in bytes.
        basis: Option<(RelPath, u64)>,
    },
}

/// How a file of the new release got (or gets) its content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Via {
    /// Hard-linked from the previous release: nothing sent.
    Link,
    /// Copied on the target from the previous release: nothing sent.
    Copy,
    /// Sent whole.
    Literal,
    /// Sent as an rsync delta against a basis on the target.
    Delta,
    /// Sent as a zstd `--patch-from` frame against the old version in the client's cache.
    Patch,
}

impl Via {
    /// The word used in itemized lines and JSON: `link`, `copy`, `literal`, `delta`, `patch`.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Link => "link",
            Via::Copy => "copy",
            Via::Literal => "literal",
            Via::Delta => "delta",
            Via::Patch => "patch",
        }
    }
}

/// One path that changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The path in the release.
    pub path: RelPath,
    /// What the entry is (the new one's kind, or the removed one's).
    pub kind: Kind,
    /// What happened to it.
    pub change: Change,
    /// Files of the new release: position among the new manifest's regular files (how the
    /// agent names a file), its size in bytes, and how the plan gets it.
    pub file: Option<(u32, u64, Planned)>,
    /// (old, new) permission bits, when they changed.
    pub modes: Option<(u32, u32)>,
    /// Symlinks: the target (the new one, or for a removed link the old one).
    pub target: Option<String>,
    /// A retargeted symlink's old target.
    pub was: Option<String>,
    /// How the file got (or gets) its content; set by [`Changes::settle`].
    #[serde(skip)]
    pub via: Option<Via>,
    /// Why a deploy did something else than the plan, if it did.
    #[serde(skip)]
    pub note: Option<String>,
}

impl Item {
    /// The path the content comes from when it is another one than [`Item::path`]: the source
    /// of a link or copy, or a delta or patch basis.
    pub fn from(&self) -> Option<&RelPath> {
        let from = match &self.file.as_ref()?.2 {
            Planned::Link(p) | Planned::Copy(p) => p,
            Planned::Transfer {
                basis: Some((b, _)),
            } if matches!(self.via, None | Some(Via::Delta | Via::Patch)) => b,
            Planned::Transfer { .. } => return None,
        };
        (*from != self.path).then_some(from)
    }
}

/// Created, changed and removed entries of one kind (`changed`: a directory's mode, a symlink's
/// target).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryCounts {
    /// Entries created.
    pub new: u64,
    /// Entries whose mode or target changed.
    pub changed: u64,
    /// Entries removed.
    pub removed: u64,
}

/// Regular files: what changes (`new`, `changed` content, `mode` only, `unchanged`, `removed`;
/// all but `removed` add up to `total`), and how the files of the new release get their content
/// (`linked`, `copied`, `literal`, `delta`, which includes `patched`; these add up to `total`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCounts {
    /// Regular files of the new release.
    pub total: u64,
    /// Files new at their path.
    pub new: u64,
    /// Files whose content changed.
    pub changed: u64,
    /// Files whose mode alone changed.
    pub mode: u64,
    /// Files unchanged.
    pub unchanged: u64,
    /// Files removed.
    pub removed: u64,
    /// Files hard-linked from the previous release.
    pub linked: u64,
    /// Files copied on the target from content it has.
    pub copied: u64,
    /// Files sent whole.
    pub literal: u64,
    /// rsync deltas and zstd patches.
    pub delta: u64,
    /// zstd patches (also counted in `delta`).
    pub patched: u64,
    /// Files the plan would link or copy from the target but the deploy had to send, because
    /// their copy on the target was missing or altered (counted in `literal`/`delta` instead of
    /// `linked`/`copied`). Always 0 in a prediction.
    pub resent: u64,
}

/// Every count of a report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Regular files.
    pub files: FileCounts,
    /// Directories.
    pub dirs: EntryCounts,
    /// Symbolic links.
    pub symlinks: EntryCounts,
}

/// The changed paths of a release, in manifest order (a removed entry before a new one at the
/// same path), and the counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The changed paths (all of them, or only those asked for).
    pub items: Vec<Item>,
    /// The counts, always complete.
    pub counts: Counts,
}

/// How one file whose content is sent went (or would go): `index` among the new manifest's
/// regular files, `via` one of `Literal`, `Delta`, `Patch`, and why it differs from the plan,
/// if it does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// Index among the new manifest's regular files.
    pub index: u32,
    /// How its content went.
    pub via: Via,
    /// Why it went otherwise than [`choose`] chose, if it did.
    pub note: Option<String>,
}

/// The rule every deploy, dry run and `flip diff` uses for a file whose content is sent: a zstd
/// patch when there is a basis and the client has its old content (`patchable`); an rsync delta
/// when the file and its basis (`basis_size`) are both at least [`DELTA_MIN`] bytes; else the
/// bytes. A deploy still sends a file whole when its patch or delta comes out no smaller.
pub fn choose(size: u64, basis_size: Option<u64>, patchable: bool) -> Via {
    match basis_size {
        Some(_) if patchable => Via::Patch,
        Some(b) if size >= DELTA_MIN && b >= DELTA_MIN => Via::Delta,
        _ => Via::Literal,
    }
}

/// Lists what changes from `prev` (`None`: nothing live) to `new`, with `plan` (that of the
/// same two manifests) saying how each file of the new release is got. Links and copies are
/// settled and counted here; files to transfer wait for [`Changes::settle`].
pub fn changes(prev: Option<&Manifest>, new: &Manifest, plan: &Plan) -> Changes {
    classify(prev, new, plan, &[], true)
}

/// [`changes`] for a deploy, on the target: `needs` are the files the stage could not link or
/// copy (indexes among the new manifest's regular files, ascending); an unchanged one among them
/// is listed as [`Change::Unchanged`], planned as a link in place. With `all` false, only the
/// files the stage had to deviate from its plan for (planned as links or copies, yet needed)
/// are listed — what a deploy without an itemized list needs to hear; the counts are complete
/// either way.
pub fn deployed(
    prev: Option<&Manifest>,
    new: &Manifest,
    plan: &Plan,
    needs: &[usize],
    all: bool,
) -> Changes {
    classify(prev, new, plan, needs, all)
}

fn classify(
    prev: Option<&Manifest>,
    new: &Manifest,
    plan: &Plan,
    needs: &[usize],
    all: bool,
) -> Changes {
    let needed = |index: usize| needs.binary_search(&index).is_ok();
    let empty = Manifest::default();
    let prev = prev.unwrap_or(&empty);
    let mut c = Changes::default();
    let mut steps = plan.files.iter().enumerate();
    let mut old = prev.entries().iter().peekable();
    let mut cur = new.entries().iter().peekable();
    loop {
        let order = match (old.peek(), cur.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(o), Some(n)) => o.path.cmp(&n.path),
        };
        let (o, n) = match order {
            Ordering::Less => (old.next(), None),
            Ordering::Greater => (None, cur.next()),
            Ordering::Equal => (old.next(), cur.next()),
        };
        let same_kind = match (o.map(|e| &e.kind), n.map(|e| &e.kind)) {
            (Some(a), Some(b)) => std::mem::discriminant(a) == std::mem::discriminant(b),
            _ => false,
        };
        if let (Some(o), false) = (o, same_kind) {
            c.push_removed(&o.path, &o.kind, all);
        }
        let Some(n) = n else { continue };
        let old = o.filter(|_| same_kind).map(|e| &e.kind);
        match &n.kind {
            EntryKind::Dir { mode } => c.push_dir(&n.path, *mode, old, all),
            EntryKind::Symlink { target } => c.push_symlink(&n.path, target, old, all),
            EntryKind::File { mode, size, digest } => {
                let Some((index, step)) = steps.next() else {
                    debug_assert!(false, "the plan has a step for every file");
                    continue;
                };
                debug_assert_eq!(step.path, n.path);
                let file = NewFile {
                    path: &n.path,
                    mode: *mode,
                    size: *size,
                    digest,
                    index,
                    needed: needed(index),
                };
                c.push_file(&file, &step.source, prev, old, all);
            }
        }
    }
    c
}

/// A regular file of the new release, as [`Changes::push_file`] classifies it.
struct NewFile<'a> {
    path: &'a RelPath,
    mode: u32,
    size: u64,
    digest: &'a flip_manifest::Digest,
    /// Its index among the new manifest's regular files.
    index: usize,
    /// The stage could not reuse it as planned (it is among the files the agent needs).
    needed: bool,
}

impl Item {
    /// An item with only its path, kind and change set.
    fn new(path: &RelPath, change: Change, kind: Kind) -> Item {
        Item {
            path: path.clone(),
            kind,
            change,
            file: None,
            modes: None,
            target: None,
            was: None,
            via: None,
            note: None,
        }
    }
}

impl Changes {
    /// Counts (and with `all` lists) a directory of the new release; `old` is what the previous
    /// release had there, if of the same kind.
    fn push_dir(&mut self, path: &RelPath, mode: u32, old: Option<&EntryKind>, all: bool) {
        let change = match old {
            None => Change::New,
            Some(EntryKind::Dir { mode: m }) if *m != mode => Change::Mode,
            Some(_) => return,
        };
        let mut it = Item::new(path, change, Kind::Dir);
        if let Some(EntryKind::Dir { mode: m }) = old {
            it.modes = Some((*m, mode));
            self.counts.dirs.changed += 1;
        } else {
            self.counts.dirs.new += 1;
        }
        if all {
            self.items.push(it);
        }
    }

    /// Counts (and with `all` lists) a symlink of the new release; `old` as for
    /// [`Changes::push_dir`].
    fn push_symlink(&mut self, path: &RelPath, target: &str, old: Option<&EntryKind>, all: bool) {
        let mut it = match old {
            None => {
                self.counts.symlinks.new += 1;
                Item::new(path, Change::New, Kind::Symlink)
            }
            Some(EntryKind::Symlink { target: t }) if t != target => {
                self.counts.symlinks.changed += 1;
                let mut it = Item::new(path, Change::Retarget, Kind::Symlink);
                it.was = Some(t.clone());
                it
            }
            Some(_) => return,
        };
        it.target = Some(target.to_string());
        if all {
            self.items.push(it);
        }
    }

    /// Counts a regular file of the new release by what changes and how the plan (`source`)
    /// builds it; lists it with `all`, or when the stage deviated from the plan for it.
    /// Unchanged files built in place are counted, never listed (unless the stage could not).
    fn push_file(
        &mut self,
        f: &NewFile,
        source: &Source,
        prev: &Manifest,
        old: Option<&EntryKind>,
        all: bool,
    ) {
        let planned = match source {
            Source::Link(p) => Planned::Link(p.clone()),
            Source::Copy(p) => Planned::Copy(p.clone()),
            Source::Transfer { basis } => Planned::Transfer {
                basis: basis.as_ref().and_then(|b| match prev.get(b) {
                    Some(EntryKind::File { size, .. }) => Some((b.clone(), *size)),
                    _ => None,
                }),
            },
        };
        self.counts.files.total += 1;
        match &planned {
            Planned::Link(_) => self.counts.files.linked += 1,
            Planned::Copy(_) => self.counts.files.copied += 1,
            Planned::Transfer { .. } => {}
        }
        let (change, modes) = match old {
            None => (Change::New, None),
            Some(EntryKind::File {
                mode: m, digest: d, ..
            }) => {
                let modes = (*m != f.mode).then_some((*m, f.mode));
                if d != f.digest {
                    (Change::Content, modes)
                } else if modes.is_some() {
                    (Change::Mode, modes)
                } else {
                    self.counts.files.unchanged += 1;
                    // Unchanged and linked in place, or (empty) created anew in
                    // place: counted, not listed (unless the target could not).
                    let in_place = matches!(
                        &planned,
                        Planned::Link(p) | Planned::Copy(p) if p == f.path
                    );
                    if in_place && !f.needed {
                        return;
                    }
                    (Change::Unchanged, None)
                }
            }
            Some(_) => unreachable!("same kind"),
        };
        match change {
            Change::New => self.counts.files.new += 1,
            Change::Content => self.counts.files.changed += 1,
            Change::Mode => self.counts.files.mode += 1,
            _ => {}
        }
        let mut it = Item::new(f.path, change, Kind::File);
        it.modes = modes;
        it.via = match planned {
            Planned::Link(_) => Some(Via::Link),
            Planned::Copy(_) => Some(Via::Copy),
            Planned::Transfer { .. } => None,
        };
        let deviates = f.needed && matches!(planned, Planned::Link(_) | Planned::Copy(_));
        it.file = Some((f.index as u32, f.size, planned));
        if all || deviates {
            self.items.push(it);
        }
    }

    fn push_removed(&mut self, path: &RelPath, kind: &EntryKind, list: bool) {
        let (kind, target) = match kind {
            EntryKind::Dir { .. } => {
                self.counts.dirs.removed += 1;
                (Kind::Dir, None)
            }
            EntryKind::File { .. } => {
                self.counts.files.removed += 1;
                (Kind::File, None)
            }
            EntryKind::Symlink { target } => {
                self.counts.symlinks.removed += 1;
                (Kind::Symlink, Some(target.clone()))
            }
        };
        if !list {
            return;
        }
        self.items.push(Item {
            path: path.clone(),
            kind,
            change: Change::Removed,
            file: None,
            modes: None,
            target,
            was: None,
            via: None,
            note: None,
        });
    }

    /// Records how each sent file went (`sent`: the files whose content is sent, each once,
    /// [`Via::Literal`], [`Via::Delta`] or [`Via::Patch`]) and counts it. A sent file the plan
    /// meant to link or copy (listed by [`Changes::mark_needs`]) moves from `linked`/`copied` to
    /// `resent`.
    pub fn settle(&mut self, sent: &[Sent]) {
        // Links and copies go as planned unless sent (`via` does not travel over the wire).
        for it in &mut self.items {
            it.via = match it.file.as_ref().map(|f| &f.2) {
                Some(Planned::Link(_)) => Some(Via::Link),
                Some(Planned::Copy(_)) => Some(Via::Copy),
                _ => it.via,
            };
        }
        let at: HashMap<u32, usize> = self
            .items
            .iter()
            .enumerate()
            .filter_map(|(i, it)| Some((it.file.as_ref()?.0, i)))
            .collect();
        let f = &mut self.counts.files;
        for s in sent {
            match s.via {
                Via::Link | Via::Copy => continue,
                Via::Literal => f.literal += 1,
                Via::Delta => f.delta += 1,
                Via::Patch => {
                    f.delta += 1;
                    f.patched += 1;
                }
            }
            let Some(&i) = at.get(&s.index) else { continue };
            let it = &mut self.items[i];
            match it.file.as_ref().map(|f| &f.2) {
                Some(Planned::Link(_)) => {
                    f.linked = f.linked.saturating_sub(1);
                    f.resent += 1;
                }
                Some(Planned::Copy(_)) => {
                    f.copied = f.copied.saturating_sub(1);
                    f.resent += 1;
                }
                _ => {}
            }
            it.via = Some(s.via);
            it.note = s.note.clone();
        }
    }

    /// The files of the plan whose content is sent: (index, size, basis), in order.
    pub fn transfers(&self) -> impl Iterator<Item = (u32, u64, Option<&(RelPath, u64)>)> {
        self.items.iter().filter_map(|it| match &it.file {
            Some((i, size, Planned::Transfer { basis })) => Some((*i, *size, basis.as_ref())),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flip_manifest::{Digest, Entry};

    fn m(entries: &[(&str, EntryKind)]) -> Manifest {
        let mut v: Vec<Entry> = entries
            .iter()
            .map(|(p, k)| Entry {
                path: RelPath::new(*p).unwrap(),
                kind: k.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        Manifest::new(v).unwrap()
    }
    fn dir(mode: u32) -> EntryKind {
        EntryKind::Dir { mode }
    }
    fn file(c: &[u8], mode: u32) -> EntryKind {
        EntryKind::File {
            mode,
            size: c.len() as u64,
            digest: Digest::of(c),
        }
    }
    fn link(t: &str) -> EntryKind {
        EntryKind::Symlink { target: t.into() }
    }

    fn lines(c: &Changes) -> Vec<String> {
        c.items
            .iter()
            .map(|it| {
                format!(
                    "{:?} {:?} {} {:?}",
                    it.change,
                    it.kind,
                    it.path.as_str(),
                    it.via
                )
            })
            .collect()
    }

    #[test]
    fn every_kind_of_change_is_listed_and_counted() {
        let big = vec![b'x'; 20_000];
        let mut big2 = big.clone();
        big2[10] = b'y';
        let prev = m(&[
            ("d", dir(0o755)),
            ("d/gone", dir(0o755)),
            ("d/gone/f", file(b"f", 0o644)),
            ("d/l", link("a")),
            ("d/l2", link("a")),
            ("d/mode", file(b"m", 0o644)),
            ("d/big", file(&big, 0o644)),
            ("d/same", file(b"s", 0o644)),
            ("d/x", file(b"was a file", 0o644)),
            ("open", dir(0o755)),
        ]);
        let new = m(&[
            ("d", dir(0o755)),
            ("d/empty", dir(0o755)),
            ("d/l", link("b")),
            ("d/mode", file(b"m", 0o755)),
            ("d/big", file(&big2, 0o644)),
            ("d/new", file(b"fresh", 0o644)),
            ("d/same", file(b"s", 0o644)),
            ("d/x", link("now a link")),
            ("open", dir(0o700)),
        ]);
        let plan = crate::plan(Some(&prev), &new);
        let mut c = changes(Some(&prev), &new, &plan);
        let sent: Vec<Sent> = c
            .transfers()
            .map(|(index, size, basis)| Sent {
                index,
                via: choose(size, basis.map(|b| b.1), false),
                note: None,
            })
            .collect();
        c.settle(&sent);
        assert_eq!(
            lines(&c),
            [
                "Content File d/big Some(Delta)",
                "New Dir d/empty None",
                "Removed Dir d/gone None",
                "Removed File d/gone/f None",
                "Retarget Symlink d/l None",
                "Removed Symlink d/l2 None",
                "Mode File d/mode Some(Copy)",
                "New File d/new Some(Literal)",
                "Removed File d/x None",
                "New Symlink d/x None",
                "Mode Dir open None",
            ]
        );
        let f = c.counts.files;
        assert_eq!(
            (f.total, f.new, f.changed, f.mode, f.unchanged, f.removed),
            (4, 1, 1, 1, 1, 2)
        );
        assert_eq!(
            (f.linked, f.copied, f.literal, f.delta, f.patched, f.resent),
            (1, 1, 1, 1, 0, 0)
        );
        let e = |n, c, r| EntryCounts {
            new: n,
            changed: c,
            removed: r,
        };
        assert_eq!(c.counts.dirs, e(1, 1, 1));
        assert_eq!(c.counts.symlinks, e(1, 1, 1));
        let l = &c.items[4];
        assert_eq!(
            (l.target.as_deref(), l.was.as_deref()),
            (Some("b"), Some("a"))
        );
    }

    #[test]
    fn a_same_tree_changes_nothing() {
        let t = m(&[
            ("d", dir(0o755)),
            ("d/f", file(b"1", 0o644)),
            ("l", link("d")),
        ]);
        let mut c = changes(Some(&t), &t, &crate::plan(Some(&t), &t));
        c.settle(&[]);
        assert!(c.items.is_empty());
        assert_eq!(c.counts.files.unchanged, 1);
        assert_eq!(c.counts.files.linked, 1);
        assert_eq!(c.counts.dirs, EntryCounts::default());
        assert_eq!(c.counts.symlinks, EntryCounts::default());
    }

    /// A deploy that had to send an unchanged file lists it, and counts it as resent.
    #[test]
    fn a_resent_unchanged_file_is_listed_with_its_note() {
        let t = m(&[("a", file(b"1", 0o644)), ("b", file(b"2", 0o644))]);
        let mut c = deployed(Some(&t), &t, &crate::plan(Some(&t), &t), &[1], false);
        let sent = [Sent {
            index: 1,
            via: Via::Literal,
            note: Some("altered on the target".into()),
        }];
        c.settle(&sent);
        assert_eq!(lines(&c), ["Unchanged File b Some(Literal)"]);
        let f = c.counts.files;
        assert_eq!((f.linked, f.literal, f.resent), (1, 1, 1));
    }

    /// Without an itemized list the target names only the files it deviated for; the counts
    /// are those of the full classification.
    #[test]
    fn a_deploy_without_itemize_hears_only_deviations() {
        let prev = m(&[("a", file(b"1", 0o644)), ("b", file(b"2", 0o644))]);
        let new = m(&[
            ("a", file(b"1", 0o644)),
            ("b", file(b"3", 0o644)),
            ("c", dir(0o755)),
        ]);
        let plan = crate::plan(Some(&prev), &new);
        let full = changes(Some(&prev), &new, &plan);
        let quiet = deployed(Some(&prev), &new, &plan, &[1], false);
        assert_eq!(quiet.counts, full.counts);
        assert!(quiet.items.is_empty(), "{:?}", quiet.items);
        let tampered = deployed(Some(&prev), &new, &plan, &[0, 1], false);
        assert_eq!(lines(&tampered), ["Unchanged File a Some(Link)"]);
        let all = deployed(Some(&prev), &new, &plan, &[0, 1], true);
        assert_eq!(
            lines(&all),
            [
                "Unchanged File a Some(Link)",
                "Content File b None",
                "New Dir c None"
            ]
        );
    }

    #[test]
    fn the_encoding_rule() {
        assert_eq!(choose(100, None, true), Via::Literal);
        assert_eq!(choose(100, Some(100), true), Via::Patch);
        assert_eq!(choose(100, Some(100), false), Via::Literal);
        assert_eq!(choose(DELTA_MIN, Some(DELTA_MIN), false), Via::Delta);
        assert_eq!(choose(DELTA_MIN, Some(DELTA_MIN - 1), false), Via::Literal);
    }
}
