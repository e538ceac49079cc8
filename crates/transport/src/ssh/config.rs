//! What to connect to for a target, from the target itself, the options and `~/.ssh/config`
//! (parsed by the `ssh2-config` crate; OpenSSH semantics: the first value found wins, `Host`
//! patterns with `*`, `?` and `!`).

use super::{SshOptions, SshTarget};
use crate::TransportError;
use ssh2_config::{HostParams, ParseRule, SshConfig};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How `StrictHostKeyChecking` treats a host whose key is not known yet. A changed key is
/// refused whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnknownHosts {
    /// Refuse (OpenSSH's `yes`, and `ask` since flip never prompts).
    Refuse,
    /// Record the key and go on (`accept-new`, `no`, `off`, or `--accept-new-host-key`).
    AcceptNew,
}

/// Everything needed to connect to one target.
#[derive(Debug, Clone)]
pub(crate) struct HostConfig {
    /// The host as the user wrote it (maybe an alias): for messages.
    pub alias: String,
    /// The name or address to connect to (`HostName`, else the alias).
    pub host_name: String,
    pub port: u16,
    pub user: String,
    /// Private keys to try, in order: `--identity`, the config's, then the defaults that exist.
    pub identities: Vec<PathBuf>,
    /// `IdentitiesOnly yes`: use only agent keys that match one of `identities`.
    pub identities_only: bool,
    /// The user's known_hosts file: read, and where a new host key is recorded (the first
    /// `UserKnownHostsFile`, default `~/.ssh/known_hosts`).
    pub known_hosts: PathBuf,
    /// The other known_hosts files, only read (as OpenSSH reads them): the further
    /// `UserKnownHostsFile`s (default `~/.ssh/known_hosts2`), then the `GlobalKnownHostsFile`s
    /// (default `/etc/ssh/ssh_known_hosts` and `/etc/ssh/ssh_known_hosts2`; missing ones are
    /// fine). A key revoked or pinned in any of them counts.
    pub known_hosts_also: Vec<PathBuf>,
    pub unknown_hosts: UnknownHosts,
    pub connect_timeout: Duration,
    /// Interval of SSH keepalives (`ServerAliveInterval`, default 15 s).
    pub keepalive: Duration,
}

impl HostConfig {
    /// `host:port` as connected to.
    pub(crate) fn address(&self) -> String {
        if self.host_name.contains(':') {
            format!("[{}]:{}", self.host_name, self.port)
        } else {
            format!("{}:{}", self.host_name, self.port)
        }
    }

    /// Every known_hosts file read, the user's own first.
    pub(crate) fn known_hosts_files(&self) -> Vec<PathBuf> {
        std::iter::once(self.known_hosts.clone())
            .chain(self.known_hosts_also.iter().cloned())
            .collect()
    }

    /// `user@host:port`, for authentication messages.
    pub(crate) fn login(&self) -> String {
        format!("{}@{}", self.user, self.address())
    }
}

/// Resolves a target with the options and the ssh config file.
pub(crate) fn resolve(target: &SshTarget, opts: &SshOptions) -> Result<HostConfig, TransportError> {
    let home = opts.home_dir();
    let (config_path, explicit) = match &opts.config_file {
        Some(p) => (p.clone(), true),
        None => (home.join(".ssh/config"), false),
    };
    let params = read_config(&config_path, explicit, &home, &target.host)?;

    // Options ssh2-config does not model itself: the first value, lowercase key.
    let raw = |key: &str| -> Option<String> {
        let p = params.as_ref()?;
        p.unsupported_fields
            .get(key)
            .or_else(|| p.ignored_fields.get(key))
            .and_then(|v| v.first())
            .cloned()
    };

    let host_name = params
        .as_ref()
        .and_then(|p| p.host_name.clone())
        .map(|h| expand_tokens(&h, &target.host))
        .unwrap_or_else(|| target.host.clone());
    let port = target
        .port
        .or_else(|| params.as_ref().and_then(|p| p.port))
        .unwrap_or(22);
    let user = match target
        .user
        .clone()
        .or_else(|| params.as_ref().and_then(|p| p.user.clone()))
    {
        Some(u) => u,
        None => local_user_name(),
    };

    let identities = identities(opts.identity.as_deref(), params.as_ref(), &home);

    // Every value of a key that takes several (`UserKnownHostsFile a b`); `None` when unset.
    let raw_all = |key: &str| -> Option<Vec<String>> {
        let p = params.as_ref()?;
        p.unsupported_fields
            .get(key)
            .or_else(|| p.ignored_fields.get(key))
            .map(|v| {
                v.iter()
                    .flat_map(|s| s.split_whitespace())
                    .map(str::to_string)
                    .collect()
            })
    };
    let files = |key: &str, default: &[PathBuf]| -> Vec<PathBuf> {
        match raw_all(key) {
            Some(v) if v.iter().any(|s| s.eq_ignore_ascii_case("none")) => Vec::new(),
            Some(v) if !v.is_empty() => {
                v.iter().map(|s| expand_home(Path::new(s), &home)).collect()
            }
            _ => default.to_vec(),
        }
    };
    let mut user_files = files(
        "userknownhostsfile",
        &[
            home.join(".ssh/known_hosts"),
            home.join(".ssh/known_hosts2"),
        ],
    );
    // `none`: nothing of the user's is read, but a key accepted goes to the usual file.
    let known_hosts = match user_files.is_empty() {
        true => home.join(".ssh/known_hosts"),
        false => user_files.remove(0),
    };
    let mut known_hosts_also = user_files;
    known_hosts_also.extend(files(
        "globalknownhostsfile",
        &[
            PathBuf::from("/etc/ssh/ssh_known_hosts"),
            PathBuf::from("/etc/ssh/ssh_known_hosts2"),
        ],
    ));

    let unknown_hosts = if opts.accept_new_host_key {
        UnknownHosts::AcceptNew
    } else {
        match raw("stricthostkeychecking")
            .map(|s| s.to_ascii_lowercase())
            .as_deref()
        {
            Some("accept-new" | "no" | "off") => UnknownHosts::AcceptNew,
            _ => UnknownHosts::Refuse,
        }
    };

    let connect_timeout = params
        .as_ref()
        .and_then(|p| p.connect_timeout)
        .filter(|d| !d.is_zero())
        .unwrap_or(opts.connect_timeout);
    let keepalive = params
        .as_ref()
        .and_then(|p| p.server_alive_interval)
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(15));
    let identities_only = raw("identitiesonly")
        .map(|s| matches!(s.to_ascii_lowercase().as_str(), "yes" | "true"))
        .unwrap_or(false);

    Ok(HostConfig {
        alias: target.host.clone(),
        host_name,
        port,
        user,
        identities,
        identities_only,
        known_hosts,
        known_hosts_also,
        unknown_hosts,
        connect_timeout,
        keepalive,
    })
}

/// The parameters the ssh client config at `path` gives `host`; `None` when there is no config
/// (a missing default file is fine, a missing `explicit` one is an error).
fn read_config(
    path: &Path,
    explicit: bool,
    home: &Path,
    host: &str,
) -> Result<Option<HostParams>, TransportError> {
    match std::fs::File::open(path) {
        Ok(file) => {
            let config = SshConfig::default()
                .home_dir(home)
                .parse(
                    &mut BufReader::new(file),
                    ParseRule::ALLOW_UNKNOWN_FIELDS | ParseRule::ALLOW_UNSUPPORTED_FIELDS,
                )
                .map_err(|e| TransportError::Config {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
            Ok(Some(config.query(host)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(None),
        Err(e) => Err(TransportError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
    }
}

/// The keys to try, in order: `--identity`, then the config's `IdentityFile`s, or (when it
/// names none) OpenSSH's default key files that exist.
fn identities(identity: Option<&Path>, params: Option<&HostParams>, home: &Path) -> Vec<PathBuf> {
    let mut identities = Vec::new();
    if let Some(id) = identity {
        identities.push(expand_home(id, home));
    }
    let configured = params
        .and_then(|p| p.identity_file.clone())
        .unwrap_or_default();
    let has_configured = !configured.is_empty();
    identities.extend(configured.iter().map(|p| expand_home(p, home)));
    if !has_configured {
        // OpenSSH's defaults, tried when they exist (only when the config names none).
        for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
            let p = home.join(".ssh").join(name);
            if p.exists() {
                identities.push(p);
            }
        }
    }
    identities.dedup();
    identities
}

/// `%h` (the host as given) and `%%` in `HostName`.
fn expand_tokens(s: &str, host: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('%', Some('h')) => {
                out.push_str(host);
                chars.next();
            }
            ('%', Some('%')) => {
                out.push('%');
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// `~` and `~/x` against `home`; other paths unchanged.
pub(crate) fn expand_home(p: &Path, home: &Path) -> PathBuf {
    match p.to_str() {
        Some("~") => home.to_path_buf(),
        Some(s) if s.starts_with("~/") => home.join(&s[2..]),
        _ => p.to_path_buf(),
    }
}

/// The local login name: `$USER`, else the passwd entry of our uid.
fn local_user_name() -> String {
    if let Some(u) = std::env::var_os("USER").and_then(|u| u.into_string().ok()) {
        if !u.is_empty() {
            return u;
        }
    }
    // SAFETY: getpwuid_r with a buffer we own; the result points into that buffer.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            libc::getuid(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc == 0 && !result.is_null() && !pwd.pw_name.is_null() {
            if let Ok(name) = std::ffi::CStr::from_ptr(pwd.pw_name).to_str() {
                return name.to_string();
            }
        }
    }
    "root".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str) -> SshTarget {
        SshTarget {
            user: None,
            host: host.to_string(),
            port: None,
            path: "/srv".to_string(),
        }
    }

    #[test]
    fn reads_aliases_and_defaults() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join(".ssh")).unwrap();
        std::fs::write(
            home.path().join(".ssh/config"),
            "Host web*\n  HostName %h.example.com\n  User deploy\n  Port 2200\n\
             IdentityFile ~/.ssh/deploy_key\n  UserKnownHostsFile ~/kh\n\
             StrictHostKeyChecking accept-new\n  ConnectTimeout 3\n  IdentitiesOnly yes\n\
             Host *\n  User nobody\n  Port 2300\n",
        )
        .unwrap();
        let opts = SshOptions {
            home: Some(home.path().to_path_buf()),
            ..Default::default()
        };
        let c = resolve(&target("web1"), &opts).unwrap();
        assert_eq!(c.host_name, "web1.example.com");
        assert_eq!(c.user, "deploy");
        assert_eq!(c.port, 2200);
        assert_eq!(c.identities, vec![home.path().join(".ssh/deploy_key")]);
        assert!(c.identities_only);
        assert_eq!(c.known_hosts, home.path().join("kh"));
        assert_eq!(c.unknown_hosts, UnknownHosts::AcceptNew);
        assert_eq!(c.connect_timeout, Duration::from_secs(3));

        let c = resolve(&target("db1"), &opts).unwrap();
        assert_eq!(c.host_name, "db1");
        assert_eq!(c.user, "nobody");
        assert_eq!(c.port, 2300);
        assert_eq!(c.known_hosts, home.path().join(".ssh/known_hosts"));
        assert_eq!(c.unknown_hosts, UnknownHosts::Refuse);
        assert_eq!(c.connect_timeout, Duration::from_secs(10));

        // The target's own user and port win over the config.
        let mut t = target("web2");
        t.user = Some("root".into());
        t.port = Some(22);
        let c = resolve(&t, &opts).unwrap();
        assert_eq!((c.user.as_str(), c.port), ("root", 22));
    }

    #[test]
    fn missing_default_config_is_fine_but_explicit_is_not() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join(".ssh")).unwrap();
        std::fs::write(home.path().join(".ssh/id_rsa"), "x").unwrap();
        let mut opts = SshOptions {
            home: Some(home.path().to_path_buf()),
            identity: Some(PathBuf::from("~/mykey")),
            ..Default::default()
        };
        let c = resolve(&target("h"), &opts).unwrap();
        assert_eq!(c.port, 22);
        assert_eq!(
            c.identities,
            vec![home.path().join("mykey"), home.path().join(".ssh/id_rsa")]
        );
        opts.config_file = Some(home.path().join("nope"));
        assert!(matches!(
            resolve(&target("h"), &opts),
            Err(TransportError::Config { .. })
        ));
    }
}
