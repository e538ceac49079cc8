//! `flip.toml`: environments (named lists of targets) and deploy settings, found in the working
//! directory or given with `--config FILE`. Precedence: command-line flag > the environment's
//! table > the top level > flip's default. Every error names the file, the line and the key.

use crate::config_hooks::HookList;
use crate::exit;
use anyhow::Result;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file name looked for in the working directory.
pub const FILE: &str = "flip.toml";

/// Settings that may appear at the top level and in an environment's table.
#[derive(Debug, Default, Clone)]
pub struct Settings {
    /// The directory deployed, relative to the file.
    pub source: Option<PathBuf>,
    /// Gitignore-style patterns left out, on top of the source's `.flipignore`.
    pub exclude: Option<Vec<String>>,
    /// Releases kept on each target after a deploy.
    pub keep: Option<u32>,
    /// Targets deployed to at once (phase 1); 0 = all.
    pub parallel: Option<usize>,
    /// zstd level of the connections, 0-19.
    pub compress_level: Option<i32>,
    /// Files go whole (no patch, no delta); `None`: yes for a local target, no over SSH.
    pub whole_file: Option<bool>,
    /// Directories kept once under the target's `shared/`, linked from every release.
    pub shared_dirs: Option<Vec<String>>,
    /// Files kept once under the target's `shared/`, linked from every release.
    pub shared_files: Option<Vec<String>>,
    /// Directories that must exist with `writable_mode` after a deploy.
    pub writable_dirs: Option<Vec<String>>,
    /// Octal permission bits of the writable directories (default "0775").
    pub writable_mode: Option<String>,
    /// `user` or `user:group` of the writable directories, when the agent runs as root.
    pub writable_owner: Option<String>,
    /// Hooks run on every target before the swap (inside the committed release).
    pub before_activate: Option<HookList>,
    /// Hooks run on every target after the swap.
    pub after_activate: Option<HookList>,
    /// An `after_activate` failure switches every target back to its previous release.
    pub rollback_on_failure: Option<bool>,
}

// No `#[serde(flatten)]`: it defeats `deny_unknown_fields` and the spans of type errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvShape {
    /// With its span: an empty list is named by its line.
    targets: toml::Spanned<Vec<String>>,
    source: Option<PathBuf>,
    exclude: Option<Vec<String>>,
    keep: Option<u32>,
    parallel: Option<usize>,
    compress_level: Option<i32>,
    whole_file: Option<bool>,
    shared_dirs: Option<Vec<String>>,
    shared_files: Option<Vec<String>>,
    writable_dirs: Option<Vec<String>>,
    writable_mode: Option<String>,
    writable_owner: Option<String>,
    before_activate: Option<HookList>,
    after_activate: Option<HookList>,
    rollback_on_failure: Option<bool>,
}

#[derive(Debug)]
struct Env {
    targets: Vec<String>,
    settings: Settings,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    source: Option<PathBuf>,
    exclude: Option<Vec<String>>,
    keep: Option<u32>,
    parallel: Option<usize>,
    compress_level: Option<i32>,
    whole_file: Option<bool>,
    shared_dirs: Option<Vec<String>>,
    shared_files: Option<Vec<String>>,
    writable_dirs: Option<Vec<String>>,
    writable_mode: Option<String>,
    writable_owner: Option<String>,
    before_activate: Option<HookList>,
    after_activate: Option<HookList>,
    rollback_on_failure: Option<bool>,
    /// Keyed with their spans: an error in an environment names the line of its name.
    #[serde(default)]
    env: BTreeMap<toml::Spanned<String>, EnvShape>,
}

/// A parsed `flip.toml`.
pub struct Config {
    pub path: PathBuf,
    top: Settings,
    envs: BTreeMap<String, Env>,
}

/// An environment's settings after precedence, and where each came from (for `flip config`).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub env: String,
    pub targets: Vec<String>,
    pub source: Option<(PathBuf, &'static str)>,
    pub exclude: (Vec<String>, &'static str),
    pub keep: (u32, &'static str),
    pub parallel: (usize, &'static str),
    pub compress_level: (Option<i32>, &'static str),
    pub whole_file: (Option<bool>, &'static str),
    pub shared_dirs: (Vec<String>, &'static str),
    pub shared_files: (Vec<String>, &'static str),
    pub writable_dirs: (Vec<String>, &'static str),
    pub writable_mode: (String, &'static str),
    pub writable_owner: (Option<String>, &'static str),
    pub before_activate: (HookList, &'static str),
    pub after_activate: (HookList, &'static str),
    pub rollback_on_failure: (bool, &'static str),
}

/// Default of `keep`.
pub const KEEP: u32 = 5;

/// Default of `writable_mode`.
pub const WRITABLE_MODE: &str = "0775";

impl Settings {
    /// The shared-path settings (`shared_dirs`, `shared_files`, `writable_dirs`,
    /// `writable_mode`) checked, and `writable_owner`. An error (exit 2) names `file`, the line
    /// when the file's `text` is given, and the key (`prefix` is `env.NAME.` for an
    /// environment's table).
    pub fn shared(
        &self,
        file: &Path,
        prefix: &str,
        text: Option<&str>,
    ) -> Result<(flip_plan::shared::SharedPaths, Option<String>)> {
        let bad = |key: &str, msg: String| {
            let line = text
                .and_then(|t| line_of_key(t, prefix, key.split('/').next().unwrap_or(key)))
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            exit::coded(
                exit::USAGE,
                format!("{}{line}: {prefix}{key}: {msg}", file.display()),
            )
        };
        let paths = |key: &str, v: &Option<Vec<String>>| -> Result<Vec<flip_manifest::RelPath>> {
            v.iter()
                .flatten()
                .map(|p| {
                    flip_manifest::RelPath::new(p.trim_end_matches('/')).map_err(|e| {
                        // Most causes quote the path already: name it once.
                        let why = match e {
                            flip_manifest::PathError::Empty | flip_manifest::PathError::TooLong => {
                                format!("{p:?}: {e}")
                            }
                            _ => e.to_string(),
                        };
                        bad(
                            key,
                            format!("{why}: a relative path inside the release is expected"),
                        )
                    })
                })
                .collect()
        };
        // As the command line's --compress-level: a level outside it was taken as is, and a
        // negative one garbled the stream (the client compressed, the agent did not decompress).
        if let Some(l) = self.compress_level.filter(|l| !(0..=19).contains(l)) {
            return Err(bad(
                "compress_level",
                format!("{l} is not a level from 0 (off) to 19"),
            ));
        }
        let mode_text = self.writable_mode.as_deref().unwrap_or(WRITABLE_MODE);
        let writable_mode = u32::from_str_radix(mode_text, 8)
            .ok()
            .filter(|m| m & !0o7777 == 0)
            .ok_or_else(|| {
                bad(
                    "writable_mode",
                    format!("{mode_text:?} is not an octal mode such as \"0775\""),
                )
            })?;
        // A directory its owner cannot list, enter and write is no writable directory.
        if writable_mode & 0o700 != 0o700 {
            return Err(bad(
                "writable_mode",
                format!("{mode_text:?} does not let the directory's owner read, write and enter it (rwx, 0700): such as \"0775\""),
            ));
        }
        if let Some(o) = &self.writable_owner {
            let ok =
                |s: &str| !s.is_empty() && !s.contains(|c: char| c == ':' || c.is_whitespace());
            let valid = match o.split_once(':') {
                Some((u, g)) => ok(u) && ok(g),
                None => ok(o),
            };
            if !valid {
                return Err(bad(
                    "writable_owner",
                    format!("{o:?} is not \"user\" or \"user:group\""),
                ));
            }
        }
        let s = flip_plan::shared::SharedPaths {
            dirs: paths("shared_dirs", &self.shared_dirs)?,
            files: paths("shared_files", &self.shared_files)?,
            writable: paths("writable_dirs", &self.writable_dirs)?,
            writable_mode,
        };
        s.validate().map_err(|e| {
            use flip_plan::shared::SharedError;
            // The key that lists the path (its line is the one named).
            let listed =
                |p: &str, list: &[flip_manifest::RelPath]| list.iter().any(|r| r.to_string() == p);
            let key = match &e {
                SharedError::WritableInFile { .. } => "writable_dirs",
                SharedError::BadMode(_) => "writable_mode",
                SharedError::Reserved(p) if listed(p, &s.writable) => "writable_dirs",
                SharedError::Reserved(p) if listed(p, &s.files) => "shared_files",
                SharedError::Reserved(_) => "shared_dirs",
                _ => "shared_dirs/shared_files",
            };
            bad(key, e.to_string())
        })?;
        Ok((s, self.writable_owner.clone()))
    }
}

/// Largest configuration file read, in bytes.
const CONFIG_MAX: u64 = 4 << 20;

/// The configuration's text: a regular file (a FIFO would block, `/dev/zero` never end) of at
/// most [`CONFIG_MAX`] bytes.
fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let m = f.metadata()?;
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    if !m.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    if m.len() > CONFIG_MAX {
        return Err(invalid(format!("larger than {CONFIG_MAX} bytes")));
    }
    let mut text = String::new();
    f.take(CONFIG_MAX).read_to_string(&mut text)?;
    Ok(text)
}

impl Config {
    /// `explicit` (`--config FILE`, which must exist), else `./flip.toml` if there is one.
    pub fn load(explicit: Option<&Path>) -> Result<Option<Config>> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None if Path::new(FILE).is_file() => PathBuf::from(FILE),
            None => return Ok(None),
        };
        let text = read_bounded(&path).map_err(|e| {
            exit::coded(
                exit::USAGE,
                format!("cannot read the configuration {}: {e}", path.display()),
            )
        })?;
        let path = std::path::absolute(&path).unwrap_or(path);
        let shape: FileShape = toml::from_str(&text)
            .map_err(|e| exit::coded(exit::USAGE, describe_error(&path, &text, &e)))?;
        let mut envs = BTreeMap::new();
        for (name, env) in shape.env {
            // An error in environment `name`'s table: `key: msg`, with the line of its name
            // (`[env."a b"]`, or `env."a b".targets = ...`).
            let line_at = |at: usize| text[..at.min(text.len())].matches('\n').count() + 1;
            let name_line = line_at(name.span().start);
            let name = name.into_inner();
            let bad_env = |line: usize, key: String, msg: &str| {
                exit::coded(
                    exit::USAGE,
                    format!("{}:{line}: {key}: {msg}", path.display()),
                )
            };
            // Typed as `flip deploy NAME`: a name that could be a path or host:path would turn
            // a command meant for that target into one for the environment.
            let ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
            if name.is_empty() || name.starts_with(['-', '.']) || !name.chars().all(ok) {
                return Err(bad_env(
                    name_line,
                    format!("env.{name:?}"),
                    "an environment's name is letters, digits and ._-, not starting with '-' or '.' (it is typed where a target could be)",
                ));
            }
            if env.targets.get_ref().is_empty() {
                return Err(bad_env(
                    line_at(env.targets.span().start),
                    format!("env.{name}.targets"),
                    "an environment needs at least one target",
                ));
            }
            let settings = Settings {
                source: env.source,
                exclude: env.exclude,
                keep: env.keep,
                parallel: env.parallel,
                compress_level: env.compress_level,
                whole_file: env.whole_file,
                shared_dirs: env.shared_dirs,
                shared_files: env.shared_files,
                writable_dirs: env.writable_dirs,
                writable_mode: env.writable_mode,
                writable_owner: env.writable_owner,
                before_activate: env.before_activate,
                after_activate: env.after_activate,
                rollback_on_failure: env.rollback_on_failure,
            };
            let targets = env.targets.into_inner();
            envs.insert(name, Env { targets, settings });
        }
        let top = Settings {
            source: shape.source,
            exclude: shape.exclude,
            keep: shape.keep,
            parallel: shape.parallel,
            compress_level: shape.compress_level,
            whole_file: shape.whole_file,
            shared_dirs: shape.shared_dirs,
            shared_files: shape.shared_files,
            writable_dirs: shape.writable_dirs,
            writable_mode: shape.writable_mode,
            writable_owner: shape.writable_owner,
            before_activate: shape.before_activate,
            after_activate: shape.after_activate,
            rollback_on_failure: shape.rollback_on_failure,
        };
        for (name, env) in envs
            .iter()
            .map(|(n, e)| (format!("env.{n}."), &e.settings))
            .chain([(String::new(), &top)])
        {
            env.shared(&path, &name, Some(&text))?;
        }
        Ok(Some(Config { path, top, envs }))
    }

    /// Whether `name` is one of the file's environments.
    pub fn has_env(&self, name: &str) -> bool {
        self.envs.contains_key(name)
    }

    /// The file's directory: what a relative `source` (and local target) is relative to.
    pub fn dir(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// Environment `name` resolved against the top level and defaults (flags come on top, in
    /// the caller).
    pub fn env(&self, name: &str) -> Result<Resolved> {
        let Some(env) = self.envs.get(name) else {
            let known: Vec<&str> = self.envs.keys().map(String::as_str).collect();
            return Err(exit::coded(
                exit::USAGE,
                format!(
                    "{}: env.{name}: no such environment (the file defines: {})",
                    self.path.display(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        let e = &env.settings;
        let t = &self.top;
        let envkey: &'static str = "environment table";
        fn pick<T: Clone>(
            e: &Option<T>,
            t: &Option<T>,
            envkey: &'static str,
        ) -> Option<(T, &'static str)> {
            e.clone()
                .map(|v| (v, envkey))
                .or_else(|| t.clone().map(|v| (v, "top level")))
        }
        let dir = self.dir();
        Ok(Resolved {
            env: name.to_string(),
            targets: env.targets.clone(),
            source: pick(&e.source, &t.source, envkey).map(|(p, from)| (dir.join(p), from)),
            exclude: pick(&e.exclude, &t.exclude, envkey).unwrap_or((Vec::new(), "default")),
            keep: pick(&e.keep, &t.keep, envkey).unwrap_or((KEEP, "default")),
            parallel: pick(&e.parallel, &t.parallel, envkey).unwrap_or((0, "default")),
            compress_level: pick(&e.compress_level, &t.compress_level, envkey)
                .map(|(v, f)| (Some(v), f))
                .unwrap_or((None, "default")),
            whole_file: pick(&e.whole_file, &t.whole_file, envkey)
                .map(|(v, f)| (Some(v), f))
                .unwrap_or((None, "default")),
            shared_dirs: pick(&e.shared_dirs, &t.shared_dirs, envkey)
                .unwrap_or((Vec::new(), "default")),
            shared_files: pick(&e.shared_files, &t.shared_files, envkey)
                .unwrap_or((Vec::new(), "default")),
            writable_dirs: pick(&e.writable_dirs, &t.writable_dirs, envkey)
                .unwrap_or((Vec::new(), "default")),
            writable_mode: pick(&e.writable_mode, &t.writable_mode, envkey)
                .unwrap_or((WRITABLE_MODE.to_string(), "default")),
            writable_owner: pick(&e.writable_owner, &t.writable_owner, envkey)
                .map(|(v, f)| (Some(v), f))
                .unwrap_or((None, "default")),
            before_activate: pick(&e.before_activate, &t.before_activate, envkey)
                .unwrap_or((HookList::default(), "default")),
            after_activate: pick(&e.after_activate, &t.after_activate, envkey)
                .unwrap_or((HookList::default(), "default")),
            rollback_on_failure: pick(&e.rollback_on_failure, &t.rollback_on_failure, envkey)
                .unwrap_or((false, "default")),
        })
    }

    /// The top level's settings (for `flip deploy SRC TARGET` with a file present).
    pub fn top(&self) -> &Settings {
        &self.top
    }
}

/// `FILE:LINE: KEY: what is wrong`, from a toml error and its span.
fn describe_error(path: &Path, text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    let Some(span) = e.span() else {
        return format!("{}: {msg}", path.display());
    };
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let key = key_at(text, span.start);
    match key {
        Some(k) => format!("{}:{line}: {k}: {msg}", path.display()),
        None => format!("{}:{line}: {msg}", path.display()),
    }
}

/// The dotted key of the line holding byte `at` (`env.prod.keep`), from the `[table]` header
/// above it and the text before `=`; the table itself for a header line.
fn key_at(text: &str, at: usize) -> Option<String> {
    let at = at.min(text.len());
    let mut start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let mut end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    // Inside a list written over several lines (`before_activate = [` ... `{ run = ... }`):
    // the key is on the line that opened it.
    let is_key = |l: &str| {
        let l = l.trim();
        l.starts_with('[')
            || l.split_once('=').is_some_and(|(k, _)| {
                let k = k.trim();
                !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_alphanumeric() || "_-.\"' ".contains(c))
            })
    };
    while !is_key(&text[start..end]) && start > 0 {
        end = start - 1;
        start = text[..end].rfind('\n').map_or(0, |i| i + 1);
    }
    let line = text[start..end].trim();
    let header = |l: &str| {
        l.strip_prefix('[')
            .and_then(|l| l.split(']').next())
            .map(|h| h.trim().to_string())
    };
    if line.starts_with('[') {
        return header(line);
    }
    let table = text[..start]
        .lines()
        .rev()
        .find_map(|l| header(l.trim()).filter(|_| l.trim().starts_with('[')));
    let key = line.split('=').next()?.trim().trim_matches('"').to_string();
    if key.is_empty() || line.find('=').is_none() {
        return table;
    }
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key,
    })
}

/// The line setting `key` in the table `prefix` names (`env.NAME.`, or `""` for the top level).
fn line_of_key(text: &str, prefix: &str, key: &str) -> Option<usize> {
    let want = prefix.trim_end_matches('.');
    let mut table = String::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.starts_with('[') {
            table = l
                .trim_matches(|c| c == '[' || c == ']')
                .replace([' ', '"'], "");
            continue;
        }
        if table == want {
            if let Some(rest) = l.strip_prefix(key) {
                if rest.trim_start().starts_with('=') {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

/// `flip init`'s starter file for a PHP application.
pub const STARTER: &str = r#"# flip.toml: where `flip deploy ENV` deploys (see README.md, "flip.toml").
# Settings at the top level apply to every environment; an environment's table overrides them,
# and a command-line flag overrides both.

# The directory deployed, relative to this file: your built application (composer install
# --no-dev --optimize-autoloader, compiled assets). Point the web server at current/public.
source = "."

# Left out of every release, in gitignore syntax, on top of the source's .flipignore.
# Runtime state belongs in shared paths outside the release, never inside it.
exclude = [
    "/.git",
    "/tests",
    "/storage/logs/*",
    "/storage/framework/cache/*",
    "/storage/framework/sessions/*",
    "/node_modules",
    ".env",
    "*.md",
]

# Releases kept on each target after a deploy (the live one and the rollback target always are).
keep = 5

# What the application writes at runtime lives once per target under shared/ and appears in
# every release as a relative symlink: seeded from the source on the first deploy only, then
# never written, replaced or removed by flip. `.env` is excluded above, so the first deploy
# creates it empty: fill it in on the server.
shared_dirs = ["storage"]
shared_files = [".env"]
# Directories the application writes into inside the release, made with this mode (and owner,
# when the agent runs as root).
writable_dirs = ["bootstrap/cache"]
# writable_mode = "0775"
# writable_owner = "www-data"

# Hooks run on every target through its agent, inside the new release (the working directory),
# with FLIP_RELEASE, FLIP_RELEASE_DIR, FLIP_PREVIOUS, FLIP_TARGET and FLIP_ENV set. A failing
# before_activate hook leaves every target on its current release; `once` runs on one target.
# before_activate = [
#     "php artisan config:cache",
#     { run = "php artisan migrate --force", once = true, timeout = "10m" },
# ]
# After the swap PHP keeps serving the old release from OPcache until it is reset (README.md,
# "OPcache and the realpath cache"):
# after_activate = ["sudo systemctl reload php8.3-fpm"]
# rollback_on_failure = true    # an after_activate failure switches every target back

# Every target of an environment gets the release, and they go live together: a target that
# fails means none goes live. A target is what `flip deploy SRC TARGET` takes: a local
# directory, [user@]host:/path or ssh://user@host:port/path.
[env.prod]
targets = ["deploy@web1:/srv/app", "deploy@web2:/srv/app"]

[env.staging]
targets = ["deploy@staging:/srv/app"]
keep = 3
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_named_with_their_table() {
        let text = "keep = 1\n\n[env.prod]\ntargets = [\"/x\"]\nkeep = \"x\"\n";
        let at = text.find("\"x\"").unwrap();
        assert_eq!(key_at(text, at).as_deref(), Some("env.prod.keep"));
        assert_eq!(key_at(text, 0).as_deref(), Some("keep"));
        assert_eq!(
            key_at(text, text.find("[env").unwrap()).as_deref(),
            Some("env.prod")
        );
    }
}
