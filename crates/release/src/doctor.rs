//! `flip doctor`'s look at a target on disk: read-only (it never waits for or keeps the lock:
//! at most a shared lock let go at once, see `check_lock`; it writes nothing and changes no
//! mode), bounded (the walk inspects at most [`DoctorOptions::max_entries`]
//! entries and [`MAX_DEPTH`] levels, and says when it stopped) and never following a symlink:
//! every directory is opened relative to its parent's descriptor with `O_NOFOLLOW`.
//!
//! What it checks, each as [`Finding`]s with the fix:
//! - `layout`: flip's own paths are what flip made (else nothing else is looked at);
//! - `current`: a symlink to a complete release (committed: its directory and metadata there,
//!   its manifest readable and the one recorded at commit);
//! - `releases`: release directories flip cannot use (no metadata, so never listed, rolled back
//!   to or pruned), and what an interrupted run left;
//! - `writable`: the directories and files flip writes into, for the user the agent runs as;
//! - `leftovers`: entries under `releases/` and `.flip/` this user could not remove (in a
//!   directory it may not write, owned by another user under a sticky directory, immutable or
//!   append-only), and the ones the last cleanup recorded;
//! - `space`: free space (and inodes) on the target's filesystem for one more release as large
//!   as the live one;
//! - `lock`: who holds the deploy lock, read from `/proc/locks` and the lock file (asked of the
//!   kernel with a shared lock let go at once when `/proc/locks` names no holder);
//! - `state`: flip's files in `.flip/` of another type, or (the lock and the log) hard-linked
//!   to another file, which the next command that takes the lock replaces.

use crate::error::Result;
use crate::lock::Holder;
use crate::{fsutil, Error, Root, RELEASES, STATE};
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// How much a [`Finding`] matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The check passed.
    Ok,
    /// Worth knowing; nothing to fix.
    Note,
    /// Risky, depending on what flip cannot see.
    Warning,
    /// Breaks, or will break, deploys, rollbacks or prunes of this target.
    Problem,
}

/// One thing the doctor found: the check's name, how much it matters, what it saw (paths
/// relative to the target's root) and the fix (a command or a setting, with absolute paths).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Which check found it (`layout`, `current`, `releases`, `writable`, `leftovers`, ...).
    pub check: &'static str,
    /// How much it matters.
    pub severity: Severity,
    /// What the check saw, paths relative to the target's root.
    pub message: String,
    /// How to fix it (a command or a setting, with absolute paths); `None` when there is
    /// nothing to fix.
    pub fix: Option<String>,
}

impl Finding {
    /// A finding of `check` with no fix (add one with [`Finding::fix`]).
    pub fn new(check: &'static str, severity: Severity, message: impl Into<String>) -> Finding {
        Finding {
            check,
            severity,
            message: message.into(),
            fix: None,
        }
    }

    /// The same finding, with `fix` as its fix.
    #[must_use]
    pub fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = Some(fix.into());
        self
    }
}

/// Bounds and thresholds of [`doctor`].
#[derive(Clone, Copy, Debug)]
pub struct DoctorOptions {
    /// Entries the leftover walk inspects at most (over all releases and `.flip/`).
    pub max_entries: u64,
    /// Free space a release needs beyond its own size: 5% of the filesystem, at most this
    /// many bytes (what the agent keeps in reserve when it stages).
    pub space_margin: u64,
}

impl Default for DoctorOptions {
    fn default() -> Self {
        DoctorOptions {
            max_entries: 200_000,
            space_margin: 64 << 20,
        }
    }
}

/// Deepest directory level the leftover walk descends to below a release.
pub const MAX_DEPTH: usize = 64;
/// Directories named per leftover finding at most; the rest are counted.
const NAMED: usize = 10;
/// Largest `/proc/locks` read.
const PROC_LOCKS_MAX: u64 = 4 << 20;

/// Looks at the target `dir` and reports what it finds. Fails (as every command does) when
/// `dir` is missing, not a directory or not a flip target; a layout flip would refuse is a
/// `layout` problem, after which nothing else is looked at.
///
/// # Errors
///
/// [`Error::Missing`] (or [`Error::DanglingSymlink`]), [`Error::NotADirectory`] or
/// [`Error::NotATarget`] for `dir` itself, or
/// another error of [`Root::open`] (an I/O error naming the path) other than a bad layout;
/// what the checks cannot read afterwards becomes a finding, not an error.
pub fn doctor(dir: &Path, opts: &DoctorOptions) -> Result<Vec<Finding>> {
    let root = match Root::open(dir) {
        Ok(r) => r,
        Err(e @ (Error::Missing(_) | Error::NotADirectory(_) | Error::NotATarget(_))) => {
            return Err(e)
        }
        Err(e @ (Error::Layout { .. } | Error::CurrentNotSymlink(_))) => {
            let path = match &e {
                Error::Layout { path, .. } | Error::CurrentNotSymlink(path) => path.clone(),
                _ => unreachable!(),
            };
            return Ok(vec![Finding::new(
                "layout",
                Severity::Problem,
                e.to_string(),
            )
            .fix(format!(
                "move {} away (every flip command refuses this target until then)",
                path.display()
            ))]);
        }
        Err(e) => return Err(e),
    };
    let me = Me::get();
    let mut out = Vec::new();
    let live = check_current(&root, &mut out);
    check_releases(&root, &mut out);
    check_writable(&root, &me, &mut out);
    check_leftovers(&root, &me, opts, &mut out);
    check_space(&root, live, opts, &mut out);
    check_lock(&root, &mut out);
    check_state_files(&root, &mut out);
    check_shared(&root, &mut out);
    Ok(out)
}

/// Entries of `shared/` looked at by [`check_shared`], at most.
const SHARED_ENTRIES_MAX: usize = 10_000;

/// `shared/`, when there is one, must be a real directory, and each entry in it a real directory
/// or file: a deploy with shared paths refuses a symlink (it never writes through one) or
/// anything else there.
fn check_shared(root: &Root, out: &mut Vec<Finding>) {
    let path = root.shared_dir();
    let Some(m) = fsutil::lstat_or_none(&path) else {
        return;
    };
    if m.is_dir() {
        // A shared path itself must be a real directory or file too: flip makes nothing else
        // there, and a deploy with that path refuses anything else (it never writes through a
        // symlink). Looked at directly under shared/, a bounded number of entries.
        let odd: Vec<(PathBuf, std::fs::Metadata)> = fsutil::read_dir(&path)
            .into_iter()
            .flatten()
            .take(SHARED_ENTRIES_MAX)
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let p = e.path();
                fsutil::lstat_or_none(&p).map(|m| (p, m))
            })
            .filter(|(_, m)| !m.is_dir() && !m.is_file())
            .collect();
        if odd.is_empty() {
            out.push(Finding::new(
                "shared",
                Severity::Ok,
                "shared/ is a real directory",
            ));
        }
        for (p, m) in odd {
            out.push(
                Finding::new(
                    "shared",
                    Severity::Problem,
                    format!(
                        "{} is {}: a deploy whose shared paths include it refuses this target (flip never writes through a symlink)",
                        p.display(),
                        fsutil::described(&p, &m)
                    ),
                )
                .fix(format!(
                    "put the real directory or file at {} (to keep shared data on another disk, mount that disk there)",
                    p.display()
                )),
            );
        }
        return;
    }
    out.push(
        Finding::new(
            "shared",
            Severity::Problem,
            format!(
                "shared is {}, not a directory: every deploy with shared paths refuses this target (flip never writes through a symlink)",
                crate::fsutil::kind_of(&m)
            ),
        )
        .fix(format!(
            "put the real directory at {} (to keep shared data on another disk, mount that disk there)",
            path.display()
        )),
    );
}

/// The release `current` names, when it is complete; findings on it either way.
fn check_current(root: &Root, out: &mut Vec<Finding>) -> Option<crate::ReleaseInfo> {
    let t = root.path().display().to_string();
    let activate = format!("flip activate {t} ID (a complete release: flip releases {t})");
    let id = match root.current_link() {
        Ok(crate::CurrentLink::Release(id)) => id,
        Ok(crate::CurrentLink::Foreign(target)) => {
            out.push(
                Finding::new(
                    "current",
                    Severity::Problem,
                    format!(
                        "current -> {target:?}, not a release flip made: nothing of flip's is live"
                    ),
                )
                .fix(activate),
            );
            return None;
        }
        Ok(crate::CurrentLink::Missing) => {
            out.push(
                Finding::new(
                    "current",
                    Severity::Problem,
                    "there is no `current`: nothing is live",
                )
                .fix(activate),
            );
            return None;
        }
        Err(e) => {
            out.push(Finding::new("current", Severity::Problem, e.to_string()).fix(activate));
            return None;
        }
    };
    let dir = root.release_dir(id);
    if !fsutil::exists_nofollow(&dir) {
        out.push(
            Finding::new(
                "current",
                Severity::Problem,
                format!("current -> {RELEASES}/{id}, which does not exist (a dangling symlink: the site is down)"),
            )
            .fix(activate),
        );
        return None;
    }
    let info = match root.info(id) {
        Ok(i) => i,
        Err(Error::NoSuchRelease(_)) => {
            out.push(
                Finding::new(
                    "current",
                    Severity::Problem,
                    format!(
                        "current -> {RELEASES}/{id}, which is not a complete release: {STATE}/releases/{id}.json or {id}.manifest is missing (flip did not commit it, or its metadata was deleted)"
                    ),
                )
                .fix(format!("flip deploy SOURCE {t} (a new, complete release), or {activate}")),
            );
            return None;
        }
        Err(e) => {
            out.push(
                Finding::new(
                    "current",
                    Severity::Problem,
                    format!("current -> {RELEASES}/{id}, whose metadata cannot be read: {e}"),
                )
                .fix(format!("flip deploy SOURCE {t}, or {activate}")),
            );
            return None;
        }
    };
    if let Err(e) = root.manifest_intact(&info) {
        out.push(
            Finding::new(
                "current",
                Severity::Problem,
                format!("current -> {RELEASES}/{id}, whose manifest cannot be trusted: {e} (the next deploy sends everything)"),
            )
            .fix(format!("flip deploy SOURCE {t}")),
        );
        return Some(info);
    }
    out.push(Finding::new(
        "current",
        Severity::Ok,
        format!("current -> {RELEASES}/{id}: committed, manifest present and intact"),
    ));
    Some(info)
}

/// Release directories flip cannot use, and what an interrupted run left under `releases/`.
fn check_releases(root: &Root, out: &mut Vec<Finding>) {
    // Whatever `current` names is the `current` check's: never offered for removal here.
    let live = root.current().ok().flatten();
    let dir = root.releases_dir();
    // The finding names the directory (relative to the target); its error is the cause alone.
    #[allow(clippy::disallowed_methods)]
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) => {
            out.push(Finding::new(
                "releases",
                Severity::Problem,
                format!("cannot list {RELEASES}/: {e}"),
            ));
            return;
        }
    };
    let (mut complete, mut incomplete, mut interrupted) = (0u64, Vec::new(), Vec::new());
    let mut strays = Vec::new();
    for e in rd.flatten().take(100_000) {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir
            && (name.starts_with(crate::STAGING_PREFIX) || name.starts_with(crate::TRASH_PREFIX))
        {
            interrupted.push(name);
            continue;
        }
        let Some(id) = crate::parse_id(&name) else {
            if !crate::is_temp(&name) {
                strays.push(name);
            }
            continue;
        };
        if !is_dir {
            // A release's name on something flip never made (a symlink to elsewhere): never
            // followed, listed, rolled back to or pruned.
            // (Gone meanwhile: nothing to say.)
            match root.release_dir_checked(id) {
                Err(Error::NoSuchRelease(_)) | Ok(_) => {}
                Err(_) if Some(id) == live => {}
                Err(e) => incomplete.push((id, e)),
            }
            continue;
        }
        match root.info(id) {
            Ok(_) => complete += 1,
            Err(_) if Some(id) == live => {}
            Err(e) => incomplete.push((id, e)),
        }
    }
    incomplete.sort_by_key(|(id, _)| *id);
    interrupted.sort();
    for (id, e) in incomplete.iter().take(NAMED) {
        let why = match e {
            Error::NoSuchRelease(_) => {
                format!("its metadata ({STATE}/releases/{id}.json and .manifest) is missing")
            }
            e => e.to_string(),
        };
        out.push(
            Finding::new(
                "releases",
                Severity::Problem,
                format!(
                    "{RELEASES}/{id} is not a complete release: {why}; flip never lists, rolls back to or prunes it"
                ),
            )
            .fix(format!("rm -rf {}", root.release_dir(*id).display())),
        );
    }
    if incomplete.len() > NAMED {
        out.push(
            Finding::new(
                "releases",
                Severity::Problem,
                format!(
                    "and {} more incomplete release directories under {RELEASES}/",
                    incomplete.len() - NAMED
                ),
            )
            .fix("remove the ones named above, then run flip doctor again for the next ones"),
        );
    }
    if !interrupted.is_empty() {
        out.push(Finding::new(
            "releases",
            Severity::Note,
            format!(
                "{} {} of a deploy or prune that was interrupted or is running; the next deploy or prune removes {} (what it cannot is named under leftovers)",
                named_under_releases(&interrupted),
                if interrupted.len() == 1 { "is what is left" } else { "are what is left" },
                if interrupted.len() == 1 { "it" } else { "them" }
            ),
        ));
    }
    if !strays.is_empty() {
        strays.sort();
        out.push(
            Finding::new(
                "releases",
                Severity::Warning,
                format!(
                    "{}: not flip's (releases are numbered): never listed, rolled back to, pruned or removed, each deploy warns of them",
                    named_under_releases(&strays),
                ),
            )
            .fix(format!("move them out of {}", dir.display())),
        );
    }
    if incomplete.is_empty() {
        out.push(Finding::new(
            "releases",
            Severity::Ok,
            format!("{complete} complete release(s), none without its metadata"),
        ));
    }
}

/// `releases/a, releases/b and 3 more`: the first [`NAMED`] of `names` (entries under
/// `releases/`), and how many more.
fn named_under_releases(names: &[String]) -> String {
    let first: Vec<String> = names
        .iter()
        .take(NAMED)
        .map(|n| format!("{RELEASES}/{n}"))
        .collect();
    match names.len().saturating_sub(NAMED) {
        0 => first.join(", "),
        n => format!("{} and {n} more", first.join(", ")),
    }
}

/// Whether the agent's user can write where flip writes: the root (`current` is swapped
/// there), `releases/`, `.flip/`, `.flip/releases/` and the files of `.flip/`.
fn check_writable(root: &Root, me: &Me, out: &mut Vec<Finding>) {
    if statvfs(root.path()).is_some_and(|fs| fs.read_only) {
        out.push(
            Finding::new(
                "writable",
                Severity::Problem,
                format!(
                    "{} is on a filesystem mounted read-only: no deploy, rollback or prune can \
                     write to it",
                    root.path().display()
                ),
            )
            .fix(format!(
                "mount -o remount,rw \"$(findmnt -no TARGET -T {})\"",
                root.path().display()
            )),
        );
        return;
    }
    let state = root.path().join(STATE);
    let mut bad = Vec::new();
    let dirs = [
        (
            root.path().to_path_buf(),
            "the target, where `current` is swapped",
        ),
        (root.releases_dir(), "releases/"),
        (state.clone(), ".flip/"),
        (state.join("releases"), ".flip/releases/"),
    ];
    for (path, what) in dirs {
        match fsutil::lstat_or_none(&path) {
            Some(m) if !me.may(&m, 0o3) => bad.push((path, what, describe(&m))),
            _ => {}
        }
    }
    for f in ["lock", "log", "next-id"] {
        let path = state.join(f);
        match fsutil::lstat_or_none(&path) {
            Some(m) if !me.may(&m, 0o2) => bad.push((path, "a file of .flip/", describe(&m))),
            _ => {}
        }
    }
    if bad.is_empty() {
        out.push(Finding::new(
            "writable",
            Severity::Ok,
            format!(
                "{} may write the target's directories and flip's files",
                me.name
            ),
        ));
    }
    for (path, what, how) in bad {
        out.push(
            Finding::new(
                "writable",
                Severity::Problem,
                format!(
                    "{} ({what}) is not writable by {}: {how}",
                    shown(root, &path),
                    me.name
                ),
            )
            .fix(format!("sudo chown {} {}", me.name, path.display())),
        );
    }
}

/// A directory whose entries this user could not remove.
struct Stuck {
    dir: PathBuf,
    entries: u64,
    example: String,
    why: String,
}

struct Walk<'a> {
    me: &'a Me,
    budget: u64,
    stopped: Option<String>,
    stuck: Vec<Stuck>,
    more: u64,
}

impl Walk<'_> {
    /// Records a directory this user cannot empty, unless one above it is recorded already
    /// (its fix covers this one).
    fn stick(&mut self, s: Stuck) {
        if self.stuck.iter().any(|t| s.dir.starts_with(&t.dir)) {
            return;
        }
        if self.stuck.len() < NAMED {
            self.stuck.push(s);
        } else {
            self.more += 1;
        }
    }

    /// Opens directory `name` of `parent` (shown as `path`) without following a symlink and
    /// inspects it: a symlink there is not followed, nor looked at further (removing it is
    /// removing the link).
    fn enter(&mut self, parent: &OwnedFd, name: &CStr, path: PathBuf, depth: usize) {
        match open_dir_at(parent.as_raw_fd(), name) {
            Ok(fd) => self.dir(&fd, &path, depth),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ELOOP | libc::ENOTDIR | libc::ENOENT)
                ) => {}
            Err(e) => {
                let st = Stat::at(parent, name);
                // flip's remover gives a directory it owns full access before emptying it.
                if self.me.root || st.as_ref().is_none_or(|st| st.uid != self.me.uid) {
                    let how = st
                        .map(|st| format!(" ({})", st.describe()))
                        .unwrap_or_default();
                    let why = format!("cannot be listed by {}: {e}{how}", self.me.name);
                    self.stick(Stuck {
                        dir: path,
                        entries: 0,
                        example: String::new(),
                        why,
                    });
                }
            }
        }
    }

    /// Inspects the entries of the open directory `fd` (shown as `path`), then its
    /// subdirectories, depth first.
    fn dir(&mut self, fd: &OwnedFd, path: &Path, depth: usize) {
        if self.stopped.is_some() {
            return;
        }
        // The directory as opened (not as listed a moment ago: it may have been swapped).
        let Some(st) = Stat::at(fd, c"") else {
            return;
        };
        let names = match crate::fsutil::list_dir_bounded(fd, &mut self.budget) {
            Ok((names, complete)) => {
                if !complete {
                    self.stopped = Some(format!(
                        "the walk stopped in {} after inspecting its entry budget",
                        path.display()
                    ));
                }
                names
            }
            Err(e) => {
                self.stick(Stuck {
                    dir: path.to_path_buf(),
                    entries: 0,
                    example: String::new(),
                    why: format!("cannot be listed: {e}"),
                });
                return;
            }
        };
        // flip's remover gives a directory it owns full access first; others stay as they are.
        let writable = self.me.root || st.uid == self.me.uid || self.me.may_st(&st, 0o3);
        let sticky = st.mode & libc::S_ISVTX != 0;
        let (mut blocked, mut example, mut why) = (0u64, String::new(), String::new());
        let mut subdirs = Vec::new();
        for name in names {
            let Some(e) = Stat::at(fd, &name) else {
                continue;
            };
            let reason = if st.immutable {
                Some("the directory is immutable or append-only (chattr -ia)".to_string())
            } else if e.immutable {
                Some("immutable or append-only (chattr -ia)".to_string())
            } else if !writable {
                Some(format!(
                    "the directory is {}, not writable by {}",
                    st.describe(),
                    self.me.name
                ))
            } else if sticky && !self.me.root && e.uid != self.me.uid && st.uid != self.me.uid {
                Some(format!(
                    "owned by {} in a sticky directory",
                    user_name(e.uid)
                ))
            } else {
                None
            };
            if let Some(r) = reason {
                blocked += 1;
                if example.is_empty() {
                    example = name.to_string_lossy().into_owned();
                    why = r;
                }
            }
            if e.is_dir {
                subdirs.push(name);
            }
        }
        if blocked > 0 {
            self.stick(Stuck {
                dir: path.to_path_buf(),
                entries: blocked,
                example,
                why,
            });
        }
        if depth >= MAX_DEPTH {
            if !subdirs.is_empty() && self.stopped.is_none() {
                self.stopped = Some(format!(
                    "the walk did not descend below {} ({MAX_DEPTH} levels)",
                    path.display()
                ));
            }
            return;
        }
        for name in subdirs {
            if self.stopped.is_some() {
                return;
            }
            let child = path.join(name_of(&name));
            self.enter(fd, &name, child, depth + 1);
        }
    }
}

fn name_of(name: &CStr) -> &std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(name.to_bytes())
}

/// What this user could not remove under `releases/` (every release, staging and trash
/// directory) and `.flip/`, and what the last cleanup recorded.
fn check_leftovers(root: &Root, me: &Me, opts: &DoctorOptions, out: &mut Vec<Finding>) {
    let mut w = Walk {
        me,
        budget: opts.max_entries,
        stopped: None,
        stuck: Vec::new(),
        more: 0,
    };
    for top in [RELEASES, STATE] {
        let Ok(top_fd) = open_dir_at(libc::AT_FDCWD, &cstr(&root.path().join(top))) else {
            continue;
        };
        let Ok((names, _)) = crate::fsutil::list_dir_bounded(&top_fd, &mut w.budget) else {
            continue;
        };
        for name in names {
            if Stat::at(&top_fd, &name).is_some_and(|st| st.is_dir) {
                w.enter(&top_fd, &name, Path::new(top).join(name_of(&name)), 0);
            }
        }
    }
    let recorded = root.recorded_leftovers();
    let found = !w.stuck.is_empty() || !recorded.is_empty();
    for s in &w.stuck {
        let what = if s.entries == 0 {
            format!("{}/ {}", s.dir.display(), s.why)
        } else {
            format!(
                "{}/: {} entr{} (e.g. {}) cannot be removed by {}: {}",
                s.dir.display(),
                s.entries,
                if s.entries == 1 { "y" } else { "ies" },
                s.example,
                me.name,
                s.why
            )
        };
        out.push(
            Finding::new(
                "leftovers",
                Severity::Problem,
                format!("{what}; a prune will leave it behind"),
            )
            .fix(format!(
                "sudo chown -R {} {} (or have the web server write into shared paths, not into the release)",
                me.name,
                root.path().join(&s.dir).display()
            )),
        );
    }
    if w.more > 0 {
        out.push(Finding::new(
            "leftovers",
            Severity::Problem,
            format!(
                "and {} more directories with entries {} cannot remove",
                w.more, me.name
            ),
        ));
    }
    for l in recorded.iter().take(NAMED) {
        out.push(
            Finding::new(
                "leftovers",
                Severity::Problem,
                format!(
                    "{} was left by an earlier cleanup: {}",
                    shown(root, &l.path),
                    l.error
                ),
            )
            .fix(format!("sudo rm -rf {}", l.path.display())),
        );
    }
    if let Some(s) = w.stopped {
        out.push(Finding::new(
            "leftovers",
            Severity::Note,
            format!(
                "{s} ({} entries at most are inspected): what lies beyond was not looked at",
                opts.max_entries
            ),
        ));
    } else if !found {
        out.push(Finding::new(
            "leftovers",
            Severity::Ok,
            format!(
                "{} can remove everything under {RELEASES}/ and {STATE}/",
                me.name
            ),
        ));
    }
}

/// Free space and inodes for one more release as large as the live one.
fn check_space(
    root: &Root,
    live: Option<crate::ReleaseInfo>,
    opts: &DoctorOptions,
    out: &mut Vec<Finding>,
) {
    let Some(live) = live else {
        return;
    };
    let Some(fs) = statvfs(root.path()) else {
        out.push(Finding::new(
            "space",
            Severity::Note,
            "the filesystem's free space cannot be read (statvfs failed)",
        ));
        return;
    };
    let margin = opts.space_margin.min(fs.total / 20);
    let need = live.bytes.saturating_add(margin);
    let t = root.path().display();
    if fs.free < need {
        out.push(
            Finding::new(
                "space",
                Severity::Problem,
                format!(
                    "{} free on the target's filesystem; a release as large as the live one ({}, {} files) needs {} with flip's reserve of {}: a deploy that changes most files fails with a full disk",
                    human(fs.free),
                    human(live.bytes),
                    live.files,
                    human(need),
                    human(margin)
                ),
            )
            .fix(format!("flip prune {t} --keep 2, or free or add space on the filesystem")),
        );
    } else if fs.inodes_total > 0 && fs.inodes_free < live.files {
        out.push(
            Finding::new(
                "space",
                Severity::Problem,
                format!(
                    "{} free inodes on the target's filesystem; a release of as many files as the live one ({}) may need that many",
                    fs.inodes_free, live.files
                ),
            )
            .fix(format!("flip prune {t} --keep 2, or free inodes on the filesystem")),
        );
    } else {
        out.push(Finding::new(
            "space",
            Severity::Ok,
            format!(
                "{} free, enough for one more release as large as the live one ({})",
                human(fs.free),
                human(live.bytes)
            ),
        ));
    }
}

/// flip's own files in `.flip/` the next deploy, rollback, activate or prune replaces (see
/// [`Root::lock`]): of another type than a regular file (a symlink, a FIFO, a directory), or,
/// for the two written in place (the lock and the log), sharing their inode with another file
/// by a hard link. A note each: nothing to fix by hand.
fn check_state_files(root: &Root, out: &mut Vec<Finding>) {
    use std::os::unix::fs::MetadataExt;
    let state = root.path().join(STATE);
    for f in ["lock", "log", "next-id", crate::LEFTOVERS, "links"] {
        let path = state.join(f);
        let Some(m) = fsutil::lstat_or_none(&path) else {
            continue;
        };
        let what = if !m.is_file() {
            format!("is {}, not flip's file", fsutil::kind_of(&m))
        } else if m.nlink() > 1 && matches!(f, "lock" | "log") {
            format!(
                "shares its inode with {} other name(s) by a hard link (a `cp -al` copy of the target, or planted)",
                m.nlink() - 1
            )
        } else {
            continue;
        };
        out.push(Finding::new(
            "state",
            Severity::Note,
            format!(
                "{} {what}: the next deploy, rollback, activate or prune gives the target a file of its own, never following nor writing through it",
                shown(root, &path)
            ),
        ));
    }
    // What flip moved aside (`NAME.aside-SECONDS`): kept for someone to look at.
    let Ok(rd) = fsutil::read_dir(&state) else {
        return;
    };
    let mut aside: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".aside-"))
        .take(1000)
        .collect();
    if aside.is_empty() {
        return;
    }
    aside.sort();
    let named: Vec<String> = aside.iter().take(5).map(|n| format!(".flip/{n}")).collect();
    let more = match aside.len() {
        n if n > 5 => format!(" and {} more", n - 5),
        _ => String::new(),
    };
    out.push(
        Finding::new(
            "state",
            Severity::Note,
            format!(
                "{}{more}: moved aside by flip (each was in the place of one of its files, of another type); kept for you to look at",
                named.join(", ")
            ),
        )
        .fix(format!("rm -r {}/.flip/*.aside-*  # once looked at", root.path().display())),
    );
}

/// Who holds the deploy lock: the kernel's list of `flock`s (`/proc/locks`) names the lock
/// file's inode when someone holds it; the lock file says who. `/proc/locks` leaves out the
/// locks of processes outside this one's pid namespace (a doctor run in a container does not
/// see a deploy run from the host or from another container), so when it names no holder, the
/// kernel is asked directly: a shared lock, non-blocking, let go at once (a deploy that meets
/// it then looks again before it believes the lock taken). The lock file is looked at through
/// the descriptor opened (never through a symlink), so a file swapped in meanwhile is not what
/// is asked about.
fn check_lock(root: &Root, out: &mut Vec<Finding>) {
    use std::os::unix::fs::MetadataExt;
    let path = root.path().join(STATE).join("lock");
    let none = |out: &mut Vec<Finding>| {
        out.push(Finding::new("lock", Severity::Ok, "no deploy is running"))
    };
    // Missing, or of another type (`state` says so): nobody can hold it.
    let Some(seen) = fsutil::lstat_or_none(&path).filter(|m| m.is_file()) else {
        return none(out);
    };
    // The lock file is private to the user who deploys (0600): another user (root's doctor
    // of a target a deploy user owns is fine; the reverse is not) sees that a deploy runs,
    // and its pid, but not who it is.
    let (file, m, unread) = match fsutil::open_with("read", &fsutil::read_own(), &path) {
        Ok(f) => match f.metadata() {
            Ok(m) if m.is_file() => (Some(f), m, String::new()),
            // Swapped for another type since the look: not a lock anyone holds.
            _ => return none(out),
        },
        Err(Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound
                || source.raw_os_error() == Some(libc::ELOOP) =>
        {
            // Gone, or swapped for a symlink, since the look.
            return none(out);
        }
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::PermissionDenied => {
            let why = format!("{} is private to {}", path.display(), user_name(seen.uid()));
            (None, seen, why)
        }
        Err(e) => (None, seen, e.to_string()),
    };
    let holder = file.as_ref().and_then(|f| {
        use std::io::Read;
        let mut b = Vec::new();
        f.take(64 * 1024).read_to_end(&mut b).ok()?;
        serde_json::Deserializer::from_slice(&b)
            .into_iter::<Holder>()
            .next()?
            .ok()
    });
    let running = |out: &mut Vec<Finding>, who: String| {
        out.push(Finding::new(
            "lock",
            Severity::Note,
            format!("a deploy, rollback, activate or prune is running: locked by {who}; what it stages or removes may show above"),
        ))
    };
    let cannot_tell = |out: &mut Vec<Finding>, why: String| {
        out.push(Finding::new(
            "lock",
            Severity::Note,
            format!("cannot tell whether a deploy is running: {why}"),
        ))
    };
    let dev = (libc::major(m.dev()) as u64, libc::minor(m.dev()) as u64);
    let listed_pid = || {
        let text = read_limited("/proc/locks", PROC_LOCKS_MAX)?;
        let pid = holder_pid(&text, m.ino(), dev, holder.as_ref().map(|h| h.pid));
        Some(pid.map(str::to_string))
    };
    // `None`: no /proc/locks; `Some(None)`: it names no holder.
    let listed = listed_pid();
    let seen_holder = |out: &mut Vec<Finding>, pid: String| match (&holder, &file) {
        // The kernel names the holder's pid: a name left by an earlier holder is not it (the
        // lock taken with a plain `flock`, or by a process that has not written its name).
        (Some(h), _) if h.pid.to_string() != pid => running(
            out,
            format!(
                "pid {pid} (it has not written its name into the lock file; the name there, \
                 pid {} on {}, is of an earlier holder)",
                h.pid, h.host
            ),
        ),
        (Some(h), _) => running(out, h.to_string()),
        (None, None) => running(
            out,
            format!("pid {pid} (who it is, this user cannot read: {unread})"),
        ),
        (None, Some(_)) => running(
            out,
            "another flip process (it has not written its name yet)".to_string(),
        ),
    };
    if let Some(Some(pid)) = listed {
        return seen_holder(out, pid);
    }
    let Some(f) = &file else {
        return match listed {
            Some(_) => cannot_tell(
                out,
                format!("/proc/locks shows no holder, but one in another pid namespace (a doctor in a container does not see the host's) would not show, and {unread}"),
            ),
            None => cannot_tell(out, format!("no /proc/locks, and {unread}")),
        };
    };
    match crate::lock::flock(f, libc::LOCK_SH | libc::LOCK_NB) {
        // Free (the shared lock goes with the descriptor, now).
        Ok(true) => none(out),
        Ok(false) => {
            // Taken meanwhile by a deploy /proc/locks does show?
            if let Some(Some(pid)) = listed_pid() {
                return seen_holder(out, pid);
            }
            let unseen = match listed {
                Some(_) => "a process /proc/locks does not show: it runs in another pid namespace (the host's, or another container's)",
                None => "this machine has no /proc/locks to say which process",
            };
            let who = match &holder {
                Some(h) => format!("{h} ({unseen})"),
                None => unseen.to_string(),
            };
            running(out, who)
        }
        Err(e) => cannot_tell(out, format!("cannot lock {}: {e}", path.display())),
    }
}

/// The pid (as `/proc/locks`, `text`, gives it) of the holder of an `flock` on inode `ino` of
/// device `dev` (or, as the device numbers of some filesystems differ from `stat`'s, of one
/// held by the recorded `pid`); `None` when nobody holds it.
fn holder_pid(text: &str, ino: u64, dev: (u64, u64), pid: Option<u32>) -> Option<&str> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().filter(|f| *f != "->").collect();
        // "1:" "FLOCK" "ADVISORY" "WRITE" PID "MAJ:MIN:INO" START END; a deploy holds it
        // exclusively (WRITE), a doctor's look is shared (READ).
        if f.len() < 6 || f[1] != "FLOCK" || f[3] != "WRITE" {
            return None;
        }
        let mut id = f[5].split(':');
        let (Some(maj), Some(min), Some(i)) = (id.next(), id.next(), id.next()) else {
            return None;
        };
        if i.parse::<u64>().ok() != Some(ino) {
            return None;
        }
        let same_dev = u64::from_str_radix(maj, 16).ok() == Some(dev.0)
            && u64::from_str_radix(min, 16).ok() == Some(dev.1);
        (same_dev || pid.is_some_and(|p| f[4].parse::<u32>().ok() == Some(p))).then_some(f[4])
    })
}

fn read_limited(path: &str, max: u64) -> Option<String> {
    use std::io::Read;
    let mut s = String::new();
    fsutil::open(path)
        .ok()?
        .take(max)
        .read_to_string(&mut s)
        .ok()?;
    Some(s)
}

/// The user the agent runs as, and its groups.
struct Me {
    uid: u32,
    groups: Vec<u32>,
    root: bool,
    name: String,
}

impl Me {
    fn get() -> Me {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        // SAFETY: getegid has no preconditions and cannot fail.
        let egid = unsafe { libc::getegid() };
        let mut groups = vec![egid];
        let mut buf = vec![0 as libc::gid_t; 256];
        // SAFETY: getgroups writes at most `buf.len()` ids into the buffer we own, and returns
        // -1 (checked) when there are more.
        let n = unsafe { libc::getgroups(buf.len() as libc::c_int, buf.as_mut_ptr()) };
        if n > 0 {
            groups.extend_from_slice(&buf[..n as usize]);
        }
        Me {
            uid,
            groups,
            root: uid == 0,
            name: user_name(uid),
        }
    }

    /// Whether this user has the permission bits `want` (`0o4` read, `0o2` write, `0o1`
    /// search) on a file of metadata `m` (mode bits only: ACLs are not looked at).
    fn may(&self, m: &std::fs::Metadata, want: u32) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.may_st(
            &Stat {
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                is_dir: m.is_dir(),
                immutable: false,
            },
            want,
        )
    }

    fn may_st(&self, st: &Stat, want: u32) -> bool {
        if self.root {
            return true;
        }
        let bits = if st.uid == self.uid {
            st.mode >> 6
        } else if self.groups.contains(&st.gid) {
            st.mode >> 3
        } else {
            st.mode
        } & 0o7;
        bits & want == want
    }
}

/// What the walk needs of an entry (`statx`, not following a symlink).
struct Stat {
    mode: u32,
    uid: u32,
    gid: u32,
    is_dir: bool,
    /// Immutable or append-only: not even root may remove it (or, for a directory, its
    /// entries).
    immutable: bool,
}

impl Stat {
    fn at(dir: &OwnedFd, name: &CStr) -> Option<Stat> {
        // An empty name: the directory `dir` itself.
        let st = crate::fsutil::statx(
            dir.as_raw_fd(),
            name,
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH,
        )?;
        let attrs = (libc::STATX_ATTR_IMMUTABLE | libc::STATX_ATTR_APPEND) as u64;
        let mode = u32::from(st.stx_mode);
        Some(Stat {
            mode,
            uid: st.stx_uid,
            gid: st.stx_gid,
            is_dir: mode & libc::S_IFMT == libc::S_IFDIR,
            immutable: st.stx_attributes & st.stx_attributes_mask & attrs != 0,
        })
    }

    fn describe(&self) -> String {
        format!(
            "owned by {}:{}, mode {:o}",
            user_name(self.uid),
            group_name(self.gid),
            self.mode & 0o7777
        )
    }
}

fn describe(m: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "owned by {}:{}, mode {:o}",
        user_name(m.uid()),
        group_name(m.gid()),
        m.mode() & 0o7777
    )
}

/// `path` relative to the target's root, for messages.
fn shown(root: &Root, path: &Path) -> String {
    match path.strip_prefix(root.path()) {
        Ok(p) if p.as_os_str().is_empty() => root.path().display().to_string(),
        Ok(p) => p.display().to_string(),
        Err(_) => path.display().to_string(),
    }
}

/// The user name of `uid` (the password database), or the number.
pub fn user_name(uid: u32) -> String {
    crate::passwd::by_uid(uid).map_or_else(|| uid.to_string(), |u| u.name)
}

fn group_name(gid: u32) -> String {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: libc::group is plain old data (integers and nullable pointers): all-zero is valid.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut res: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrgid_r fills the struct we own and writes at most `buf.len()` bytes into the
    // buffer we own; the status and the result pointer are checked before use.
    let r = unsafe { libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut res) };
    if r != 0 || res.is_null() || gr.gr_name.is_null() {
        return gid.to_string();
    }
    // SAFETY: gr_name points to a NUL-terminated name inside our buffer.
    unsafe { CStr::from_ptr(gr.gr_name) }
        .to_string_lossy()
        .into_owned()
}

fn cstr(p: &Path) -> CString {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// `openat(at, name, O_DIRECTORY | O_NOFOLLOW)` for listing.
fn open_dir_at(at: libc::c_int, name: &CStr) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: openat with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::openat(at, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor returned by openat is ours to own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

struct FsSpace {
    free: u64,
    total: u64,
    inodes_free: u64,
    inodes_total: u64,
    /// Mounted read-only (`ST_RDONLY`): nothing on it can be written, whatever the modes.
    read_only: bool,
}

fn statvfs(path: &Path) -> Option<FsSpace> {
    let c = cstr(path);
    // SAFETY: libc::statvfs is plain old data, for which all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills the struct we own from a NUL-terminated path that outlives the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(FsSpace {
        free: (st.f_bavail as u64).saturating_mul(st.f_frsize as u64),
        total: (st.f_blocks as u64).saturating_mul(st.f_frsize as u64),
        inodes_free: st.f_favail as u64,
        inodes_total: st.f_files as u64,
        read_only: st.f_flag & libc::ST_RDONLY != 0,
    })
}

/// `n` bytes for a message: "512 B", "3.2 MiB".
fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
// The tests write targets' files on purpose, to make the states the code must handle.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn a_held_flock_is_found_by_inode_and_device_or_by_the_recorded_pid() {
        let text = "1: POSIX  ADVISORY  WRITE 99 08:01:77 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4321 00:2b:12345 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 4322 00:2b:12345 0 EOF\n";
        assert_eq!(holder_pid(text, 12345, (0, 0x2b), None), Some("4321"));
        assert_eq!(
            holder_pid(text, 12345, (0, 0x2c), None),
            None,
            "another device"
        );
        assert_eq!(
            holder_pid(text, 12345, (0, 0x2c), Some(4321)),
            Some("4321"),
            "the recorded holder"
        );
        assert_eq!(
            holder_pid(text, 77, (8, 1), None),
            None,
            "a POSIX lock is not flip's"
        );
        assert_eq!(holder_pid(text, 1, (0, 0x2b), Some(4321)), None);
    }

    #[test]
    fn permissions_follow_owner_then_group_then_others() {
        let me = Me {
            uid: 1000,
            groups: vec![50],
            root: false,
            name: "deploy".into(),
        };
        let st = |mode, uid, gid| Stat {
            mode,
            uid,
            gid,
            is_dir: true,
            immutable: false,
        };
        assert!(me.may_st(&st(0o700, 1000, 0), 0o3));
        assert!(
            !me.may_st(&st(0o577, 1000, 50), 0o3),
            "the owner bits decide"
        );
        assert!(me.may_st(&st(0o070, 0, 50), 0o3));
        assert!(!me.may_st(&st(0o755, 0, 0), 0o3));
        assert!(me.may_st(&st(0o757, 0, 0), 0o3));
    }

    /// A target with releases/1 holding `files` files, nothing live.
    fn target(files: usize) -> (tempfile::TempDir, Root) {
        let t = tempfile::tempdir().unwrap();
        let root = Root::open_or_init(&t.path().join("app")).unwrap();
        let dir = root.release_dir(1).join("a/b");
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..files {
            std::fs::write(dir.join(format!("f{i}")), "x").unwrap();
        }
        (t, root)
    }

    fn notes(f: &[Finding]) -> Vec<&str> {
        f.iter()
            .filter(|f| f.check == "leftovers" && f.severity == Severity::Note)
            .map(|f| f.message.as_str())
            .collect()
    }

    #[test]
    fn the_walk_stops_at_its_entry_budget_and_says_so() {
        let (_t, root) = target(50);
        let opts = DoctorOptions {
            max_entries: 20,
            ..DoctorOptions::default()
        };
        let f = doctor(root.path(), &opts).unwrap();
        let n = notes(&f);
        assert_eq!(n.len(), 1, "{f:?}");
        assert!(
            n[0].contains("the walk stopped in releases/1/a/b"),
            "{}",
            n[0]
        );
        assert!(n[0].contains("20 entries at most"), "{}", n[0]);
        let all = DoctorOptions::default();
        assert!(notes(&doctor(root.path(), &all).unwrap()).is_empty());
    }

    #[test]
    fn the_walk_never_follows_a_symlink_out_of_the_root() {
        let (t, root) = target(2);
        // 100 entries outside the root, linked from inside a release: with a budget of 20,
        // following the link would stop the walk.
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        for i in 0..100 {
            std::fs::write(outside.join(format!("o{i}")), "x").unwrap();
        }
        std::os::unix::fs::symlink(&outside, root.release_dir(1).join("a/out")).unwrap();
        std::os::unix::fs::symlink(&outside, root.releases_dir().join("2")).unwrap();
        let opts = DoctorOptions {
            max_entries: 20,
            ..DoctorOptions::default()
        };
        let f = doctor(root.path(), &opts).unwrap();
        assert!(notes(&f).is_empty(), "{f:?}");
        assert!(
            f.iter()
                .any(|f| f.check == "leftovers" && f.severity == Severity::Ok),
            "{f:?}"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}
