//! Human-readable formatting helpers, and the report of what a release changes (itemized lines
//! and counts) shared by `flip deploy`, `flip deploy --dry-run` and `flip diff`.

use flip_plan::report::{Change, Counts, Item, Kind};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, AtomicI8, Ordering};

/// How much flip says on stderr: -1 `-q` (errors only), 0 default, 1 `-v`, 2 `-vv`.
static VERBOSITY: AtomicI8 = AtomicI8::new(0);
/// Set once a write to stdout failed: the rest of the output is dropped.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
/// Set once a write to stdout failed otherwise than on a closed pipe: the output is lost.
static STDOUT_FAILED: AtomicBool = AtomicBool::new(false);

/// Sets the verbosity from `-q` and the number of `-v`.
pub fn set_verbosity(quiet: bool, verbose: u8) {
    let v = if quiet { -1 } else { verbose.min(2) as i8 };
    VERBOSITY.store(v, Ordering::Relaxed);
}

/// -1 with `-q`, 0 by default, 1 with `-v`, 2 with `-vv`.
pub fn verbosity() -> i8 {
    VERBOSITY.load(Ordering::Relaxed)
}

/// `-q`: only errors go to stderr.
pub fn quiet() -> bool {
    verbosity() < 0
}

/// Writes to stdout (use [`outln!`] and [`out!`]). A stdout the reader closed (`flip releases
/// T | head -1`) is no error and no panic: the rest of the output is dropped and the command
/// ends with its own exit code; another write error (a full disk) is said once on stderr, and
/// [`stdout_failed`] makes the command end with exit code 13 if nothing else failed.
pub fn write_out(args: std::fmt::Arguments) {
    use std::io::Write;
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args) {
        stdout_error(&e);
    }
}

fn stdout_error(e: &std::io::Error) {
    STDOUT_GONE.store(true, Ordering::Relaxed);
    if e.kind() != std::io::ErrorKind::BrokenPipe {
        STDOUT_FAILED.store(true, Ordering::Relaxed);
        eprintln!("flip: error: cannot write to stdout: {e}");
    }
}

/// Flushes what stdout still buffers (a last line without its newline), and says whether any
/// write to stdout failed otherwise than on a closed pipe: the output is lost.
pub fn stdout_failed() -> bool {
    use std::io::Write;
    if !STDOUT_GONE.load(Ordering::Relaxed) {
        if let Err(e) = std::io::stdout().lock().flush() {
            stdout_error(&e);
        }
    }
    STDOUT_FAILED.load(Ordering::Relaxed)
}

/// `println!` that survives a closed stdout: see [`write_out`].
macro_rules! outln {
    () => {
        $crate::output::write_out(format_args!("\n"))
    };
    ($($t:tt)*) => {
        $crate::output::write_out(format_args!("{}\n", format_args!($($t)*)))
    };
}

/// `print!` that survives a closed stdout: see [`write_out`].
macro_rules! out {
    ($($t:tt)*) => {
        $crate::output::write_out(format_args!($($t)*))
    };
}

/// A line on stderr that is not an error (a summary, a note, a warning): left out with `-q`.
macro_rules! note {
    ($($t:tt)*) => {
        if !$crate::output::quiet() {
            eprintln!($($t)*)
        }
    };
}

/// One itemized line (the format is documented in README.md, "Itemized changes"):
/// `OP KIND PATH[ -> TARGET][ (DETAILS)]`, OP one of `+` created, `~` content changed, `m` mode
/// only, `>` symlink retargeted, `-` removed, `=` unchanged but sent again; KIND `file`, `dir `
/// or `link`; DETAILS what changes and how the file goes (`content`, `mode 644->755`,
/// `was OLD-TARGET`, `literal`/`delta`/`patch`/`link`/`copy`, `from PATH`, and after `: ` why
/// a deploy deviated from the plan).
pub fn item_line(it: &Item) -> String {
    let op = match it.change {
        Change::New => '+',
        Change::Content => '~',
        Change::Mode => 'm',
        Change::Retarget => '>',
        Change::Removed => '-',
        Change::Unchanged => '=',
    };
    let kind = match it.kind {
        Kind::File => "file",
        Kind::Dir => "dir ",
        Kind::Symlink => "link",
    };
    let mut line = format!("{op} {kind} {}", escape(it.path.as_str()));
    if it.change != Change::Removed {
        if let Some(t) = &it.target {
            line.push_str(&format!(" -> {}", escape(t)));
        }
    }
    let mut details = Vec::new();
    if it.change == Change::Content {
        details.push("content".to_string());
    }
    if let Some((old, new)) = it.modes {
        details.push(format!("mode {old:o}->{new:o}"));
    }
    if let Some(was) = &it.was {
        details.push(format!("was {}", escape(was)));
    }
    if let Some(via) = it.via.filter(|_| it.change != Change::Removed) {
        let mut v = via.as_str().to_string();
        if let Some(from) = it.from() {
            v.push_str(&format!(" from {}", escape(from.as_str())));
        }
        if let Some(note) = &it.note {
            v.push_str(&format!(": {}", escape(note)));
        }
        details.push(v);
    }
    if !details.is_empty() {
        line.push_str(&format!(" ({})", details.join(", ")));
    }
    line
}

pub use flip_manifest::text::{escape, hidden, printable};

/// The JSON form of one item: `path`, `kind` (`file`, `dir`, `symlink`), `change` (`new`,
/// `changed`, `mode`, `retarget`, `removed`, `unchanged`), and where they apply `via`, `from`,
/// `mode` (`{"old": "644", "new": "755"}`), `target`, `was` and `note`.
pub fn item_json(it: &Item) -> Value {
    let mut o = Map::new();
    o.insert("path".into(), json!(it.path.as_str()));
    let kind = match it.kind {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
    };
    o.insert("kind".into(), json!(kind));
    let change = match it.change {
        Change::New => "new",
        Change::Content => "changed",
        Change::Mode => "mode",
        Change::Retarget => "retarget",
        Change::Removed => "removed",
        Change::Unchanged => "unchanged",
    };
    o.insert("change".into(), json!(change));
    if let Some(via) = it.via.filter(|_| it.change != Change::Removed) {
        o.insert("via".into(), json!(via.as_str()));
        if let Some(from) = it.from() {
            o.insert("from".into(), json!(from.as_str()));
        }
    }
    if let Some((old, new)) = it.modes {
        o.insert(
            "mode".into(),
            json!({"old": format!("{old:o}"), "new": format!("{new:o}")}),
        );
    }
    if let Some(t) = &it.target {
        o.insert("target".into(), json!(t));
    }
    if let Some(w) = &it.was {
        o.insert("was".into(), json!(w));
    }
    if let Some(n) = &it.note {
        o.insert("note".into(), json!(n));
    }
    Value::Object(o)
}

pub fn items_json(items: &[Item]) -> Value {
    Value::Array(items.iter().map(item_json).collect())
}

/// The counts as JSON members: `files` (`total`, `new`, `changed`, `mode`, `unchanged`,
/// `removed`, `linked`, `copied`, `literal`, `delta` (patches included), `patched`, `resent`),
/// `dirs` and `symlinks` (`new`, `changed`, `removed`).
pub fn counts_json(c: &Counts, out: &mut Map<String, Value>) {
    let f = &c.files;
    out.insert(
        "files".into(),
        json!({
            "total": f.total, "new": f.new, "changed": f.changed, "mode": f.mode,
            "unchanged": f.unchanged, "removed": f.removed,
            "linked": f.linked, "copied": f.copied, "literal": f.literal, "delta": f.delta,
            "patched": f.patched, "resent": f.resent,
        }),
    );
    for (key, e) in [("dirs", &c.dirs), ("symlinks", &c.symlinks)] {
        out.insert(
            key.into(),
            json!({"new": e.new, "changed": e.changed, "removed": e.removed}),
        );
    }
}

/// The counts in one line: `12 files: 3 new, 2 changed, 1 mode, 6 unchanged, 1 removed; 7
/// linked, 1 copied, 2 literal, 1 delta, 1 patch; dirs: 1 new, 0 changed, 1 removed; symlinks:
/// 1 new, 1 changed, 0 removed` (`delta` here without the patches; `, N resent` when a deploy
/// had to send files it meant to reuse).
pub fn counts_text(c: &Counts) -> String {
    let f = &c.files;
    let resent = if f.resent > 0 {
        format!(", {} resent", f.resent)
    } else {
        String::new()
    };
    format!(
        "{} files: {} new, {} changed, {} mode, {} unchanged, {} removed; {} linked, {} copied, {} literal, {} delta, {} patch{resent}; dirs: {} new, {} changed, {} removed; symlinks: {} new, {} changed, {} removed",
        f.total, f.new, f.changed, f.mode, f.unchanged, f.removed,
        f.linked, f.copied, f.literal, f.delta.saturating_sub(f.patched), f.patched,
        c.dirs.new, c.dirs.changed, c.dirs.removed,
        c.symlinks.new, c.symlinks.changed, c.symlinks.removed,
    )
}

/// Prints one itemized line per item on stdout.
pub fn print_items(items: &[Item]) {
    for it in items {
        outln!("{}", item_line(it));
    }
}

/// 1536 -> "1.5 KiB".
pub fn bytes(n: u64) -> String {
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

/// Unix seconds -> "2026-11-28T22:41:03Z" (UTC, ISO 8601).
pub use flip_deploy::iso_time;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(iso_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_time(1_795_912_263), "2026-11-29T00:31:03Z");
        assert_eq!(iso_time(951_782_400), "2000-02-29T00:00:00Z");
    }
}
