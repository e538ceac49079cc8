//! [`RelPath`]: a path relative to a release root that cannot escape it.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

/// Longest path accepted, in bytes (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest single component accepted, in bytes (Linux's NAME_MAX).
pub const MAX_COMPONENT_LEN: usize = 255;

/// Why a string is not a [`RelPath`] (the offending text, quoted, where there is one).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// The path is empty.
    #[error("path is empty")]
    Empty,
    /// The path starts with `/`.
    #[error("{0:?}: path is absolute")]
    Absolute(String),
    /// A component is empty, `.` or `..`.
    #[error("{0:?}: path has an empty, '.' or '..' component")]
    BadComponent(String),
    /// The path contains a NUL byte.
    #[error("{0:?}: path contains a NUL byte")]
    Nul(String),
    /// Longer than [`MAX_PATH_LEN`] bytes, or a component longer than [`MAX_COMPONENT_LEN`].
    #[error(
        "path is longer than {MAX_PATH_LEN} bytes or has a component over {MAX_COMPONENT_LEN}"
    )]
    TooLong,
    /// The bytes are not UTF-8 (shown lossily).
    #[error("{0:?}: path is not valid UTF-8")]
    NotUtf8(String),
}

/// A validated relative path: UTF-8, `/`-separated, no empty, `.` or `..` components, no NUL, not
/// absolute, within Linux's length limits. Joined to a root directory it always names something
/// inside that root (unless a component on disk is a symlink, which the agent never creates before
/// writing below it).
///
/// Ordering is component-wise (`a` < `a/b` < `a-b`), so a directory sorts right before everything
/// inside it.
///
/// Shared, immutable text: a clone (a plan step naming a manifest path, a map key) costs a
/// reference count, not a copy — at 100,000 files that is the difference of tens of megabytes.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(Arc<str>);

impl RelPath {
    /// Validates `s` as a relative path.
    ///
    /// # Errors
    /// [`PathError`]: empty, absolute, an empty, `.` or `..` component, a NUL, too long.
    pub fn new(s: impl Into<String>) -> Result<Self, PathError> {
        let s = s.into();
        validate(&s)?;
        Ok(RelPath(s.into()))
    }

    /// Builds a path from raw bytes (e.g. an OS file name), rejecting non-UTF-8.
    ///
    /// # Errors
    /// [`PathError::NotUtf8`], or as [`RelPath::new`].
    pub fn from_bytes(b: &[u8]) -> Result<Self, PathError> {
        match std::str::from_utf8(b) {
            Ok(s) => Self::new(s),
            Err(_) => Err(PathError::NotUtf8(String::from_utf8_lossy(b).into_owned())),
        }
    }

    /// The path text, `/`-separated.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, outermost first.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The containing directory, or `None` for a top-level entry.
    pub fn parent(&self) -> Option<RelPath> {
        self.0.rfind('/').map(|i| RelPath(self.0[..i].into()))
    }

    /// The directories above this path, nearest first, up to the first one `known` holds (not
    /// included); all of them when `known` holds none. Used where a client and an agent must
    /// count the same directories (the streamed paths' record, `flip_wire::STREAM_RECORD_MAX`).
    pub fn parents_until(&self, known: impl Fn(&RelPath) -> bool) -> Vec<RelPath> {
        let mut missing = Vec::new();
        let mut up = self.parent();
        while let Some(p) = up {
            if known(&p) {
                break;
            }
            up = p.parent();
            missing.push(p);
        }
        missing
    }

    /// Appends one validated component (or several, `a/b`).
    ///
    /// # Errors
    /// As [`RelPath::new`], for the joined path.
    pub fn join(&self, rest: &str) -> Result<RelPath, PathError> {
        RelPath::new(format!("{}/{}", self.0, rest))
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        self.0.split('/').count()
    }
}

fn validate(s: &str) -> Result<(), PathError> {
    if s.is_empty() {
        return Err(PathError::Empty);
    }
    if s.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    if s.contains('\0') {
        return Err(PathError::Nul(s.to_string()));
    }
    if s.starts_with('/') {
        return Err(PathError::Absolute(s.to_string()));
    }
    // Components are short (a manifest's average a dozen bytes): one pass over the bytes
    // rather than a search per component.
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().chain([&b'/']).enumerate() {
        if b != b'/' {
            continue;
        }
        let c = &s.as_bytes()[start..i];
        if c.is_empty() || c == b"." || c == b".." {
            return Err(PathError::BadComponent(s.to_string()));
        }
        if c.len() > MAX_COMPONENT_LEN {
            return Err(PathError::TooLong);
        }
        start = i + 1;
    }
    Ok(())
}

impl Ord for RelPath {
    fn cmp(&self, other: &Self) -> Ordering {
        // Component-wise order equals byte order with '/' ranked below every other byte.
        // Manifests are searched and sorted by this, and neighbouring paths share long
        // prefixes: skip the common prefix eight bytes at a time, then rank the first byte that
        // differs.
        let key = |b: u8| if b == b'/' { 0 } else { b };
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        let i = common_prefix_len(a, b);
        match (a.get(i), b.get(i)) {
            (Some(x), Some(y)) => key(*x).cmp(&key(*y)),
            _ => a.len().cmp(&b.len()),
        }
    }
}

fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_ne_bytes(a[i..i + 8].try_into().expect("8 bytes"));
        let y = u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if x != y {
            break;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

impl PartialOrd for RelPath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, PathError> {
        RelPath::new(s)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0.to_string()
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl AsRef<str> for RelPath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_until_stops_below_the_first_known_directory() {
        let p = RelPath::new("a/b/c/d.txt").unwrap();
        let names = |v: Vec<RelPath>| v.iter().map(|p| p.as_str().to_string()).collect::<Vec<_>>();
        assert_eq!(names(p.parents_until(|_| false)), ["a/b/c", "a/b", "a"]);
        assert_eq!(
            names(p.parents_until(|q| q.as_str() == "a")),
            ["a/b/c", "a/b"]
        );
        assert!(p.parents_until(|q| q.as_str() == "a/b/c").is_empty());
        assert!(RelPath::new("top")
            .unwrap()
            .parents_until(|_| false)
            .is_empty());
    }

    #[test]
    fn accepts_ordinary_paths() {
        for ok in [
            "a",
            "a/b",
            ".htaccess",
            "vendor/x/..y",
            "a b/ü.php",
            "...",
            "a/.b",
        ] {
            RelPath::new(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn rejects_escapes() {
        for bad in [
            "",
            "/etc/passwd",
            "..",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/",
            ".",
            "x\0y",
        ] {
            assert!(RelPath::new(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(RelPath::new("a".repeat(256)), Err(PathError::TooLong));
        assert!(RelPath::from_bytes(b"\xff").is_err());
    }

    #[test]
    fn component_order() {
        let mut v: Vec<RelPath> = ["a-b", "a/b", "a", "a/b/c", "b", "a.b"]
            .iter()
            .map(|s| RelPath::new(*s).unwrap())
            .collect();
        v.sort();
        let s: Vec<&str> = v.iter().map(|p| p.as_str()).collect();
        assert_eq!(s, ["a", "a/b", "a/b/c", "a-b", "a.b", "b"]);
    }

    /// The fast comparison agrees with the plain definition (byte order, '/' lowest) on paths
    /// with long shared prefixes, differences at every offset and prefixes of each other.
    #[test]
    fn component_order_matches_the_definition() {
        let reference = |a: &str, b: &str| {
            let key = |c: u8| if c == b'/' { 0 } else { c };
            a.bytes().map(key).cmp(b.bytes().map(key))
        };
        let alphabet = b"ab/-.z";
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let base = "vendor/symfony/http-kernel/src/";
        let mut paths = Vec::new();
        for _ in 0..400 {
            let mut s = base[..(next() % base.len() as u64) as usize].to_string();
            for _ in 0..(next() % 24) {
                s.push(alphabet[(next() % alphabet.len() as u64) as usize] as char);
            }
            if let Ok(p) = RelPath::new(s) {
                paths.push(p);
            }
        }
        assert!(paths.len() > 100, "only {} valid paths", paths.len());
        for a in &paths {
            for b in &paths {
                assert_eq!(a.cmp(b), reference(a.as_str(), b.as_str()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn parent_and_name() {
        let p = RelPath::new("x/y/z.php").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "x/y");
        assert_eq!(p.file_name(), "z.php");
        assert_eq!(RelPath::new("top").unwrap().parent(), None);
    }

    #[test]
    fn serde_validates() {
        // A hostile peer cannot smuggle an escaping path through deserialization.
        let r: Result<RelPath, _> = RelPath::try_from("../etc".to_string());
        assert!(r.is_err());
    }
}
