//! Host key checking against OpenSSH `known_hosts` files (the user's and the system's, read
//! together as OpenSSH does: a key pinned or revoked in any of them counts).
//!
//! Lines are read one at a time so that a line this code cannot use (an unsupported key type,
//! `@cert-authority`) is skipped instead of hiding the lines after it. Host patterns follow
//! OpenSSH: comma-separated, `*`/`?` wildcards, `!` negation, `[host]:port` for ports other than
//! 22, and hashed names (`|1|salt|hash`, HMAC-SHA1, matched with libssh2's implementation).
//! A key listed under `@revoked` is refused.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use ssh2::{KnownHostFileKind, Session};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// What known_hosts says about a presented key.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// An entry for this host has exactly this key.
    Known,
    /// No entry for this host with this key type. `other_types`: key types known for the host.
    Unknown { other_types: Vec<String> },
    /// An entry for this host in `file` has a different key of the same type.
    Changed { file: PathBuf },
    /// The key is listed as `@revoked` in `file`.
    Revoked { file: PathBuf },
}

/// One usable line.
struct Entry {
    /// The known_hosts file it is in.
    file: PathBuf,
    marker: Option<String>,
    patterns: String,
    blob: Vec<u8>,
}

/// The name looked up: `host` on port 22, `[host]:port` otherwise (as OpenSSH records them).
pub(crate) fn lookup_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_ascii_lowercase()
    } else {
        format!("[{}]:{port}", host.to_ascii_lowercase())
    }
}

/// The key type named inside a key blob (its first SSH string), e.g. `ssh-ed25519`.
pub(crate) fn blob_type(blob: &[u8]) -> String {
    if blob.len() >= 4 {
        let n = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
        if let Some(name) = blob.get(4..4 + n) {
            return String::from_utf8_lossy(name).into_owned();
        }
    }
    "unknown".to_string()
}

/// `SHA256:base64` (unpadded), as OpenSSH prints fingerprints.
pub(crate) fn fingerprint(sha256: &[u8]) -> String {
    format!("SHA256:{}", STANDARD_NO_PAD.encode(sha256))
}

/// The usable lines of every file of `files` (a missing one has none); an error names the file.
fn read_entries(files: &[PathBuf]) -> io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for file in files {
        let text = match fs::read(file) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", file.display()))),
        };
        entries.extend(text.lines().filter_map(|l| parse_line(l, file)));
    }
    Ok(entries)
}

fn parse_line(line: &str, file: &Path) -> Option<Entry> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut fields = line.split_whitespace();
    let mut first = fields.next()?;
    let marker = if first.starts_with('@') {
        let m = first.to_string();
        first = fields.next()?;
        Some(m)
    } else {
        None
    };
    let _key_type = fields.next()?;
    let blob = STANDARD.decode(fields.next()?).ok()?;
    Some(Entry {
        file: file.to_path_buf(),
        marker,
        patterns: first.to_string(),
        blob,
    })
}

/// Whether an entry's host patterns match `name` (a [`lookup_name`]).
fn entry_matches(session: &Session, patterns: &str, name: &str) -> bool {
    if patterns.starts_with("|1|") {
        return hashed_matches(session, patterns, name);
    }
    let mut matched = false;
    for pattern in patterns.split(',') {
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern),
        };
        if glob(&pattern.to_ascii_lowercase(), name) {
            if negated {
                return false;
            }
            matched = true;
        }
    }
    matched
}

/// A hashed name, checked with libssh2 (which implements the HMAC-SHA1): a one-line store with
/// the entry's name and a placeholder key, asked whether `name` with that key is known.
fn hashed_matches(session: &Session, hashed: &str, name: &str) -> bool {
    // An ed25519 key blob of zeros: the key is irrelevant, only the name is compared.
    let mut placeholder = Vec::new();
    placeholder.extend_from_slice(&11u32.to_be_bytes());
    placeholder.extend_from_slice(b"ssh-ed25519");
    placeholder.extend_from_slice(&32u32.to_be_bytes());
    placeholder.extend_from_slice(&[0u8; 32]);
    let Ok(mut store) = session.known_hosts() else {
        return false;
    };
    let line = format!("{hashed} ssh-ed25519 {}", STANDARD.encode(&placeholder));
    if store.read_str(&line, KnownHostFileKind::OpenSSH).is_err() {
        return false;
    }
    matches!(store.check(name, &placeholder), ssh2::CheckResult::Match)
}

/// `*` and `?` wildcards, as in OpenSSH host patterns.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// The key types recorded for the host (for host key algorithm preferences).
pub(crate) fn known_types(
    session: &Session,
    files: &[PathBuf],
    host: &str,
    port: u16,
) -> Vec<String> {
    let name = lookup_name(host, port);
    let mut types: Vec<String> = read_entries(files)
        .unwrap_or_default()
        .iter()
        .filter(|e| e.marker.is_none() && entry_matches(session, &e.patterns, &name))
        .map(|e| blob_type(&e.blob))
        .collect();
    types.dedup();
    types
}

/// Checks the key `blob` presented by `host:port`.
pub(crate) fn check(
    session: &Session,
    files: &[PathBuf],
    host: &str,
    port: u16,
    blob: &[u8],
) -> io::Result<Verdict> {
    let name = lookup_name(host, port);
    let presented_type = blob_type(blob);
    let (mut known, mut changed) = (false, None);
    let mut other_types = Vec::new();
    for entry in read_entries(files)? {
        match entry.marker.as_deref() {
            Some("@revoked") => {
                if entry.blob == blob {
                    return Ok(Verdict::Revoked { file: entry.file });
                }
                continue;
            }
            Some(_) => continue,
            None => {}
        }
        if !entry_matches(session, &entry.patterns, &name) {
            continue;
        }
        if entry.blob == blob {
            known = true;
        } else if blob_type(&entry.blob) == presented_type {
            changed.get_or_insert(entry.file);
        } else {
            other_types.push(blob_type(&entry.blob));
        }
    }
    Ok(if known {
        Verdict::Known
    } else if let Some(file) = changed {
        Verdict::Changed { file }
    } else {
        Verdict::Unknown { other_types }
    })
}

/// Appends `name type base64` for `host:port` to `file`, creating it (and its directory, mode
/// 0700 like `~/.ssh`) if needed.
pub(crate) fn append(file: &Path, host: &str, port: u16, blob: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = file.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
    }
    let needs_newline = match fs::read(file) {
        Ok(bytes) => !bytes.is_empty() && !bytes.ends_with(b"\n"),
        Err(_) => false,
    };
    let line = format!(
        "{}{} {} {}\n",
        if needs_newline { "\n" } else { "" },
        lookup_name(host, port),
        blob_type(blob),
        STANDARD.encode(blob)
    );
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(file)?;
    f.write_all(line.as_bytes())
}

/// A `HostKey` method preference list that puts the key types already known for the host first
/// (as OpenSSH does), so a server with several host keys is checked against the recorded one.
pub(crate) fn host_key_prefs(known: &[String], supported: &[&str]) -> Option<String> {
    if known.is_empty() {
        return None;
    }
    let mut prefs: Vec<&str> = Vec::new();
    for t in known {
        let methods: Vec<&str> = match t.as_str() {
            "ssh-rsa" => vec!["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"],
            other => vec![other],
        };
        for m in &methods {
            if supported.contains(m) && !prefs.contains(m) {
                prefs.push(m);
            }
        }
    }
    for m in supported {
        if !prefs.contains(m) {
            prefs.push(m);
        }
    }
    Some(prefs.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globbing() {
        assert!(glob("*.example.com", "web1.example.com"));
        assert!(glob("web?", "web1"));
        assert!(!glob("web?", "web12"));
        assert!(glob("[127.0.0.1]:*", "[127.0.0.1]:2222"));
        assert!(!glob("*.example.com", "example.com"));
        assert!(glob("*", ""));
    }

    #[test]
    fn patterns_with_negation() {
        let session = Session::new().unwrap();
        assert!(entry_matches(&session, "a,b,*.x", "c.x"));
        assert!(!entry_matches(&session, "*.x,!bad.x", "bad.x"));
        assert!(entry_matches(&session, "*.x,!bad.x", "good.x"));
        assert!(!entry_matches(&session, "web1", "[web1]:2222"));
    }

    #[test]
    fn blob_type_and_fingerprint() {
        let mut blob = Vec::new();
        blob.extend_from_slice(&11u32.to_be_bytes());
        blob.extend_from_slice(b"ssh-ed25519");
        assert_eq!(blob_type(&blob), "ssh-ed25519");
        assert_eq!(blob_type(&[0, 0]), "unknown");
        assert_eq!(fingerprint(&[0u8; 32]).len(), 7 + 43);
    }

    #[test]
    fn prefs_put_known_first() {
        let supported = [
            "ssh-ed25519",
            "ecdsa-sha2-nistp256",
            "rsa-sha2-512",
            "ssh-rsa",
        ];
        assert_eq!(
            host_key_prefs(&["ssh-rsa".into()], &supported).unwrap(),
            "rsa-sha2-512,ssh-rsa,ssh-ed25519,ecdsa-sha2-nistp256"
        );
        assert_eq!(host_key_prefs(&[], &supported), None);
    }
}
