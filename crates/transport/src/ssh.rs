//! The agent over SSH: `flip agent ...` runs on the server in an SSH exec channel and the
//! protocol flows over the channel's stdin/stdout, exactly as with a local child process.
//!
//! Two transports:
//! - built in (default): ssh2/libssh2, with OpenSSH-like behaviour for `~/.ssh/config`, host key
//!   checking against `known_hosts` and key authentication (agent, then key files). The channel is
//!   driven by one pump thread ([`pump`]), so the returned stream's reader and writer can be used
//!   from two threads at once.
//! - the system client, when [`SshOptions::ssh_command`] is set (`--ssh-command "ssh -F cfg"`,
//!   like `rsync -e`): `ssh ... host -- COMMAND` as a child process over pipes.
//!
//! Finding the agent on the server ([`remote`]): `--remote-flip PATH` runs exactly that;
//! otherwise one `sh -c` launcher looks for an uploaded agent of exactly the binary we would
//! upload (`~/.cache/flip/flip-VERSION-BLAKE3`), then a `flip` of our exact version on the PATH,
//! and `exec`s it as the agent in the same channel. If none is found, a binary for the server's
//! `uname -sm` is uploaded there, compressed and checked (`--agent-binary FILE`, the local
//! per-platform cache [`SshOptions::agent_cache_file`], or this flip if the platforms match),
//! and started.
//!
//! The server's stderr is relayed to ours, each line prefixed with the host name (`web1: ...`).

mod command;
mod config;
mod known_hosts;
mod pump;
mod remote;
mod session;
mod stderr;

pub use pump::{preamble_words, PREAMBLE_MAX, PREAMBLE_WORD};
pub use stderr::PrefixLines;

use crate::{AgentStream, TransportError};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

/// Where an SSH target points: `[user@]host:/path` or `ssh://[user@]host[:port]/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// The login user, if given; otherwise `User` from the ssh config, else the local user name.
    pub user: Option<String>,
    /// A host name, address or `~/.ssh/config` alias (IPv6 addresses without brackets).
    pub host: String,
    /// The port, if given (URL form only); otherwise `Port` from the ssh config, else 22.
    pub port: Option<u16>,
    /// The path on the server, as written. Relative paths are relative to the login directory.
    pub path: String,
}

impl SshTarget {
    /// `user@host` or `host`: for messages and [`AgentStream::peer`].
    pub fn peer(&self) -> String {
        match &self.user {
            Some(user) => format!("{user}@{}", self.host),
            None => self.host.clone(),
        }
    }
}

impl std::fmt::Display for SshTarget {
    /// The target as [`parse_target`] reads it back: `[user@]host:path` (an IPv6 address in
    /// brackets), or, with a port or a user name that form cannot carry,
    /// `ssh://[user@]host[:port]/path` (`%`-escaped where needed).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
        let host = match self.host.contains(':') {
            true => format!("[{}]", self.host),
            false => self.host.clone(),
        };
        // The scp-like form where it reads back: no port, and a user name without ':', '/'
        // or '@' (which would end the host, make a local path, or move the host).
        let plain_user = self
            .user
            .as_ref()
            .is_none_or(|u| !u.contains([':', '/', '@']));
        if self.port.is_none() && plain_user {
            let user = self
                .user
                .as_ref()
                .map(|u| format!("{u}@"))
                .unwrap_or_default();
            return write!(f, "{user}{host}:{}", self.path);
        }
        const ESCAPED: &AsciiSet = &CONTROLS
            .add(b' ')
            .add(b'%')
            .add(b'?')
            .add(b'#')
            .add(b'@')
            .add(b'/')
            .add(b':');
        let user = self
            .user
            .as_ref()
            .map(|u| format!("{}@", utf8_percent_encode(u, ESCAPED)))
            .unwrap_or_default();
        let path = match self.path.strip_prefix('/') {
            Some(abs) => abs.to_string(),
            // `~`, `~/x`, `~user/x`: the URL's path reads back without its leading '/'.
            None if self.path.starts_with('~') => self.path.clone(),
            // Relative to the login directory.
            None => format!("~/{}", self.path),
        };
        let path: Vec<String> = path
            .split('/')
            .map(|c| utf8_percent_encode(c, ESCAPED).to_string())
            .collect();
        let port = self.port.map(|p| format!(":{p}")).unwrap_or_default();
        write!(f, "ssh://{user}{host}{port}/{}", path.join("/"))
    }
}

/// Recognizes an SSH target.
///
/// - `ssh://[user@]host[:port]/path`: the path includes its leading `/`, except `ssh://h/~/x`
///   which gives `~/x`; `%XX` escapes are decoded; IPv6 hosts are written `[::1]`; `.` and `..`
///   segments are resolved as in any URL (the `url` crate parses it). A malformed URL, a bad
///   `%` escape, a password, a `?` query or `#` fragment (write `%3F`, `%23`) is an error.
/// - `[user@]host:path` (scp style): the part before the first `:` must not contain `/`. IPv6
///   hosts are written `[::1]:path`. An empty path (`host:`) gives `.`, the login directory.
///
/// Everything else is a local path and gives `None`: absolute and `./` paths, `x/y` and
/// `x/y:z` (a `/` before the first `:`), names without a colon, and Windows-like `C:\x`, `C:/x`.
///
/// # Errors
/// [`TransportError::Target`] for a malformed `ssh://` URL.
pub fn parse_target(s: &str) -> Result<Option<SshTarget>, TransportError> {
    let t = if s.starts_with("ssh://") {
        parse_url(s)?
    } else {
        match parse_scp_like(s) {
            Some(t) => t,
            None => return Ok(None),
        }
    };
    check_names(s, &t)?;
    Ok(Some(t))
}

/// Refuses a user or host name that is not one: ssh passes them on to its config (`%r`, `%h`
/// in a `ProxyCommand` or `Match exec`, which OpenSSH before 9.6 ran through a shell as they
/// were: CVE-2023-51385) and to error messages, so a target from a repository's flip.toml
/// could run a command on the machine that deploys. A user name is letters, digits and
/// `._@+-`; a host name letters, digits and `._-`, or an IPv6 address; neither starts with
/// `-`.
fn check_names(input: &str, t: &SshTarget) -> Result<(), TransportError> {
    let bad = |what: &str, name: &str| TransportError::Target {
        input: input.to_string(),
        message: format!(
            "{what} {name:?} is not a {what}: letters, digits and {} only, not starting with '-'",
            if what == "user name" { "._@+-" } else { "._-" }
        ),
    };
    if let Some(u) = &t.user {
        let ok = |c: char| c.is_alphanumeric() || "._@+-".contains(c);
        if u.starts_with('-') || !u.chars().all(ok) {
            return Err(bad("user name", u));
        }
    }
    if t.path.chars().any(char::is_control) {
        return Err(TransportError::Target {
            input: input.to_string(),
            message: "the path holds a control character (a newline, a tab, ...)".into(),
        });
    }
    let ipv6 = t.host.contains(':')
        && t.host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":.%".contains(c));
    let ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    if t.host.starts_with('-') || !(ipv6 || t.host.chars().all(ok)) {
        return Err(bad("host name", &t.host));
    }
    Ok(())
}

fn parse_scp_like(s: &str) -> Option<SshTarget> {
    if s.starts_with('/') || s.starts_with("./") || s.starts_with("../") {
        return None;
    }
    let colon = s.find(':')?;
    if s[..colon].contains('/') {
        return None;
    }
    // user@ ends at the last '@' before the host part (a '@' cannot appear in a host name).
    let (user, rest) = match s[..colon].rfind('@') {
        Some(at) => (Some(&s[..at]), &s[at + 1..]),
        None => (None, s),
    };
    let (host, path) = if let Some(bracketed) = rest.strip_prefix('[') {
        let end = bracketed.find(']')?;
        let path = bracketed[end + 1..].strip_prefix(':')?;
        (&bracketed[..end], path)
    } else {
        let colon = rest.find(':')?;
        (&rest[..colon], &rest[colon + 1..])
    };
    if host.is_empty() || host.chars().any(char::is_whitespace) || user == Some("") {
        return None;
    }
    Some(SshTarget {
        user: user.map(str::to_string),
        host: host.to_string(),
        port: None,
        path: if path.is_empty() {
            ".".to_string()
        } else {
            path.to_string()
        },
    })
}

fn parse_url(input: &str) -> Result<SshTarget, TransportError> {
    let bad = |message: &str| TransportError::Target {
        input: input.to_string(),
        message: message.to_string(),
    };
    // The url crate parses the authority (user, IPv6 brackets, port) and the path; it is
    // lenient about malformed `%` escapes, which it reports only as a syntax violation.
    let bad_escape = std::cell::Cell::new(false);
    let url = url::Url::options()
        .syntax_violation_callback(Some(&|v| {
            if v == url::SyntaxViolation::PercentDecode {
                bad_escape.set(true);
            }
        }))
        .parse(input)
        .map_err(|e| bad(&e.to_string()))?;
    if bad_escape.get() {
        return Err(bad("bad %-escape"));
    }
    let host = match url.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
        Some(url::Host::Ipv6(a)) => a.to_string(),
        Some(url::Host::Ipv4(a)) => a.to_string(),
        _ => return Err(bad("missing host")),
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| bad("a %-escape that is not UTF-8"))
    };
    // An '@' with nothing before it, or a password, is a mistake rather than a user name.
    let authority = &input["ssh://".len()..];
    let authority = &authority[..authority.find('/').unwrap_or(authority.len())];
    let user = match (url.username(), url.password()) {
        (_, Some(_)) => return Err(bad("a password in the URL (use a key or the ssh-agent)")),
        ("", None) if authority.contains('@') => return Err(bad("empty user name before '@'")),
        ("", None) => None,
        (u, None) => Some(decode(u)?),
    };
    if url.port() == Some(0) {
        return Err(bad("invalid port 0"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("'?' and '#' in the path are written %3F and %23"));
    }
    if url.path().is_empty() {
        return Err(bad("missing the path after the host (ssh://host/path)"));
    }
    let mut path = decode(url.path())?;
    if path.starts_with("/~") {
        path.remove(0);
    }
    Ok(SshTarget {
        user,
        host,
        port: url.port(),
        path,
    })
}

/// How to reach SSH targets. Build with [`SshOptions::new`] or `..Default::default()`.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// `-i/--identity`: a private key tried after the ssh-agent's keys and before the config's.
    pub identity: Option<PathBuf>,
    /// Accept and record an unknown host key (never a changed one).
    pub accept_new_host_key: bool,
    /// The ssh client config; default `$HOME/.ssh/config` (a missing default file is fine).
    pub config_file: Option<PathBuf>,
    /// TCP connect + SSH handshake timeout; `ConnectTimeout` in the config overrides it.
    pub connect_timeout: Duration,
    /// `--remote-flip PATH`: run exactly this on the server (passed to the remote shell as is,
    /// so `~/bin/flip` works), followed by `agent ARGS`.
    pub remote_flip: Option<String>,
    /// `--ssh-command "ssh -F cfg"`: use this client (split like a shell would) as the transport.
    pub ssh_command: Option<String>,
    /// This flip binary. When the server has no flip of our version and is of our platform
    /// (and neither `agent_binary` nor a local cache file for it is there), the agent-only
    /// build beside it is uploaded (`flip-agent`, or `flip-agent-REST` beside `flip-REST`),
    /// else this binary.
    pub local_exe: PathBuf,
    /// `--agent-binary FILE`: upload this (a flip of our version built for the server) when the
    /// server has no flip of our version, instead of this executable.
    pub agent_binary: Option<PathBuf>,
    /// The local cache of per-platform agents (see [`SshOptions::agent_cache_file`]); `None`:
    /// see [`SshOptions::agents_dir`].
    pub agents_dir: Option<PathBuf>,
    /// The target this flip was built for by `make dist` (a portable build, needing only
    /// glibc 2.17), e.g. `x86_64-unknown-linux-gnu`; `None` for other builds. Only changes
    /// messages.
    pub portable: Option<String>,
    /// The oldest glibc (`2.17`) this executable runs on, if known: `make dist` builds say
    /// (`FLIP_DIST_GLIBC` at build time); other builds on glibc need about the glibc they run
    /// on here. flip does not upload itself to a server with an older glibc, and says what to
    /// do instead. `None`: no check.
    pub needs_glibc: Option<String>,
    /// This flip's version (`env!("CARGO_PKG_VERSION")`); the server's `flip --version` must
    /// print exactly `flip VERSION`.
    pub version: String,
    /// The home directory for `~`, `~/.ssh/config`, `known_hosts` and default keys; `None`:
    /// `$HOME`. (Tests set it instead of mutating the process environment.)
    pub home: Option<PathBuf>,
    /// The ssh-agent socket; `None`: `$SSH_AUTH_SOCK` if set. An empty path disables the agent.
    pub agent_socket: Option<PathBuf>,
    /// Say nothing but errors: no note of an agent uploaded or a host key recorded.
    pub quiet: bool,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            identity: None,
            accept_new_host_key: false,
            config_file: None,
            connect_timeout: Duration::from_secs(10),
            remote_flip: None,
            ssh_command: None,
            local_exe: std::env::current_exe().unwrap_or_default(),
            agent_binary: None,
            agents_dir: None,
            portable: option_env!("FLIP_DIST_TARGET").map(str::to_string),
            needs_glibc: option_env!("FLIP_DIST_GLIBC")
                .map(str::to_string)
                .or_else(running_glibc),
            version: String::new(),
            home: None,
            agent_socket: None,
            quiet: false,
        }
    }
}

impl SshOptions {
    /// Defaults for the running flip: its executable and version.
    pub fn new(local_exe: PathBuf, version: impl Into<String>) -> Self {
        SshOptions {
            local_exe,
            version: version.into(),
            ..Default::default()
        }
    }

    /// The home directory used for `~` (see [`SshOptions::home`]).
    pub(crate) fn home_dir(&self) -> PathBuf {
        self.home
            .clone()
            .or_else(|| std::env::var_os("HOME").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/"))
    }

    /// The local directory of per-platform agents: `agents_dir`; else, like flip's other
    /// caches, `$XDG_CACHE_HOME/flip/agents` (unless `home` is set), else
    /// `HOME/.cache/flip/agents`.
    pub fn agents_dir(&self) -> PathBuf {
        if let Some(dir) = &self.agents_dir {
            return dir.clone();
        }
        match std::env::var_os("XDG_CACHE_HOME") {
            Some(x) if self.home.is_none() && !x.is_empty() => PathBuf::from(x).join("flip/agents"),
            _ => self.home_dir().join(".cache/flip/agents"),
        }
    }

    /// The local cache file flip uploads to a server whose `uname -sm` is `platform` (when no
    /// `--agent-binary` is given): `AGENTS_DIR/flip-VERSION-OS-ARCH`, e.g.
    /// `~/.cache/flip/agents/flip-0.1.0-Linux-aarch64`.
    pub fn agent_cache_file(&self, platform: &str) -> PathBuf {
        self.agents_dir().join(format!(
            "flip-{}-{}",
            self.version,
            remote::platform_file_part(platform)
        ))
    }

    /// The ssh-agent socket to try, if any.
    pub(crate) fn agent_socket(&self) -> Option<PathBuf> {
        match &self.agent_socket {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p.clone()),
            None => std::env::var_os("SSH_AUTH_SOCK")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        }
    }
}

/// The version of the glibc this process runs on (`2.36`), if it is linked against glibc.
fn running_glibc() -> Option<String> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: gnu_get_libc_version returns a pointer to a static NUL-terminated string.
        let v = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
        v.to_str().ok().map(str::to_string)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Connects and starts `<flip> agent <agent_args...>` on the server; returns the duplex stream.
/// The server's stderr goes to our stderr, each line prefixed with `HOST: `.
///
/// # Errors
/// Any [`TransportError`] of the SSH kinds: the config, connecting, the host key,
/// authentication, finding, uploading or starting the agent on the server.
pub fn connect_agent(
    target: &SshTarget,
    opts: &SshOptions,
    agent_args: &[String],
) -> Result<AgentStream, TransportError> {
    connect_agent_with_stderr(target, opts, agent_args, Box::new(std::io::stderr()))
}

/// [`connect_agent`], with the server's (prefixed) stderr lines written to `stderr`.
///
/// # Errors
/// As [`connect_agent`].
pub fn connect_agent_with_stderr(
    target: &SshTarget,
    opts: &SshOptions,
    agent_args: &[String],
    stderr: Box<dyn Write + Send>,
) -> Result<AgentStream, TransportError> {
    remote::start_agent(target, opts, agent_args, stderr)
}

/// Runs an arbitrary shell command line on the server (through the login shell, as `ssh host
/// COMMAND` does) and streams its stdin/stdout. Its stderr goes to ours, prefixed `HOST: `.
///
/// # Errors
/// As [`connect_agent`], for connecting and starting the command.
pub fn exec(
    target: &SshTarget,
    opts: &SshOptions,
    command: &str,
) -> Result<AgentStream, TransportError> {
    exec_with_stderr(target, opts, command, Box::new(std::io::stderr()))
}

/// [`exec`], with the server's (prefixed) stderr lines written to `stderr`.
///
/// # Errors
/// As [`exec`].
pub fn exec_with_stderr(
    target: &SshTarget,
    opts: &SshOptions,
    command: &str,
    stderr: Box<dyn Write + Send>,
) -> Result<AgentStream, TransportError> {
    let remote = open(target, opts)?;
    remote.stream(command, &format!("`{command}`"), stderr, false)
}

/// Quotes `s` as one word for a POSIX shell: unchanged if it has only characters no shell
/// treats specially, else in single quotes.
///
/// Not `shell_words::quote`: that leaves `{a,b}`, `!` and `^` bare, which bash and zsh (the
/// login shell that runs the remote command) expand.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The result of a command run to completion on the server.
pub(crate) struct Output {
    /// The exit status; `None` if it ended by a signal or reported none.
    pub status: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A way to run commands on one server: an ssh2 session or the system ssh client.
pub(crate) trait Remote {
    /// The host as the user named it (for messages and the stderr prefix).
    fn host(&self) -> &str;
    /// Runs `command` to completion, feeding it `input` (then EOF) and capturing its output.
    fn run(
        &mut self,
        command: &str,
        input: Option<&mut dyn Read>,
    ) -> Result<Output, TransportError>;
    /// Starts `command` and returns the stream to it. `what` names it in error messages. With
    /// `preamble`, `command` takes ` --preamble=BASE64` at its end (the agent's first input:
    /// see `pump::Parts::deferred`), which a transport may append.
    fn stream(
        self: Box<Self>,
        command: &str,
        what: &str,
        stderr: Box<dyn Write + Send>,
        preamble: bool,
    ) -> Result<AgentStream, TransportError>;
}

/// Connects with the configured transport.
pub(crate) fn open(
    target: &SshTarget,
    opts: &SshOptions,
) -> Result<Box<dyn Remote>, TransportError> {
    match &opts.ssh_command {
        Some(cmd) => Ok(Box::new(command::SystemSsh::new(target, opts, cmd)?)),
        None => {
            let cfg = config::resolve(target, opts)?;
            Ok(Box::new(session::Connection::open(opts, cfg)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(user: Option<&str>, host: &str, port: Option<u16>, path: &str) -> Option<SshTarget> {
        Some(SshTarget {
            user: user.map(str::to_string),
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }

    #[test]
    fn scp_like_targets() {
        let p = |s| parse_target(s).unwrap();
        assert_eq!(p("web1:/srv/app"), t(None, "web1", None, "/srv/app"));
        assert_eq!(
            p("deploy@web1.example.com:/srv/app"),
            t(Some("deploy"), "web1.example.com", None, "/srv/app")
        );
        assert_eq!(p("web1:app"), t(None, "web1", None, "app"));
        assert_eq!(p("web1:"), t(None, "web1", None, "."));
        assert_eq!(p("root@[::1]:/srv"), t(Some("root"), "::1", None, "/srv"));
        assert_eq!(p("a.b:/x:y"), t(None, "a.b", None, "/x:y"));
        assert_eq!(p("u@h@x:/p"), t(Some("u@h"), "x", None, "/p"));
        // A one-letter host (an alias of ~/.ssh/config) is a host, as for scp and rsync: flip
        // runs on Unix, where `p:/srv/app` is no drive letter.
        assert_eq!(p("p:/srv/app"), t(None, "p", None, "/srv/app"));
        assert_eq!(p("c:"), t(None, "c", None, "."));
    }

    #[test]
    fn local_paths() {
        for s in [
            "/srv/app",
            "./web1:/x",
            "../a:b",
            "dir/sub",
            "dir/x:y",
            "plain",
            ":foo",
            "@host:/x",
            "",
        ] {
            assert_eq!(parse_target(s).unwrap(), None, "{s:?}");
        }
    }

    /// What flip shows of a target reads back as that target: the port is kept (in the URL
    /// form), an IPv6 address bracketed.
    #[test]
    fn targets_display_as_they_parse() {
        for s in [
            "web1:/srv/app",
            "deploy@web1:/srv/app",
            "web1:app",
            "p:/srv/app",
            "root@[::1]:/srv",
            "ssh://web1:2222/srv/app",
            "ssh://deploy@[2001:db8::7]:2200/srv",
            "ssh://h:22/~/app",
            "ssh://d%40x@h:2/a%20b/c%25d",
            "ssh://t:2222/~",
            "ssh://t:2222/~root/x",
            "ssh://d.x+y@t/p",
        ] {
            let t = p(s);
            assert_eq!(p(&t.to_string()), t, "{s} shown as {t}");
        }
        assert_eq!(
            p("ssh://web1:2222/srv/app").to_string(),
            "ssh://web1:2222/srv/app"
        );
        assert_eq!(p("ssh://web1/srv/app").to_string(), "web1:/srv/app");
    }

    fn p(s: &str) -> SshTarget {
        parse_target(s).unwrap().unwrap()
    }

    #[test]
    fn url_targets() {
        let p = |s| parse_target(s).unwrap();
        assert_eq!(p("ssh://web1/srv/app"), t(None, "web1", None, "/srv/app"));
        assert_eq!(
            p("ssh://deploy@web1:2222/srv/app"),
            t(Some("deploy"), "web1", Some(2222), "/srv/app")
        );
        assert_eq!(p("ssh://[::1]:22/x"), t(None, "::1", Some(22), "/x"));
        assert_eq!(p("ssh://[::1]/x"), t(None, "::1", None, "/x"));
        assert_eq!(p("ssh://h/~/app"), t(None, "h", None, "~/app"));
        assert_eq!(p("ssh://h/a%20b"), t(None, "h", None, "/a b"));
        assert_eq!(
            p("ssh://deploy@[2001:db8::7]:2200/srv"),
            t(Some("deploy"), "2001:db8::7", Some(2200), "/srv")
        );
        assert_eq!(p("ssh://d%40x@h/p"), t(Some("d@x"), "h", None, "/p"));
        assert_eq!(
            p("ssh://h/%C3%A9t%C3%A9"),
            t(None, "h", None, "/\u{e9}t\u{e9}")
        );
        assert_eq!(p("ssh://h/a b"), t(None, "h", None, "/a b"));
        assert_eq!(p("ssh://h/srv/app/"), t(None, "h", None, "/srv/app/"));
        assert_eq!(
            p("ssh://10.0.0.1:22/x"),
            t(None, "10.0.0.1", Some(22), "/x")
        );
        for bad in [
            "ssh://web1",
            "ssh:///x",
            "ssh://web1:0/x",
            "ssh://web1:99999/x",
            "ssh://web1:ab/x",
            "ssh://@web1/x",
            "ssh://[::1/x",
            "ssh://::1/x",
            "ssh://h/%zz",
            "ssh://h/%ff",
            "ssh://u:secret@h/x",
            "ssh://h/x?y",
            "ssh://h/x#y",
            // Names ssh would pass on to a config's ProxyCommand or to a shell.
            "ssh://a%3Ab@t/p",
            "ssh://a%2Fb@t/p",
            "ssh://%24(id)@web1/x",
            "ssh://a%20b@web1/x",
            "ssh://-oProxyCommand=x@web1/x",
            "$(touch${IFS}pwned)@web1:/srv",
            "`id`@web1:/srv",
            "a;b@web1:/srv",
            "-oProxyCommand=x@web1:/srv",
            "we$b1:/srv",
            "-web1:/srv",
            "web1;id:/srv",
            "web1:/srv/a\nb",
            "ssh://web1/srv/a%01b",
        ] {
            assert!(
                matches!(parse_target(bad), Err(TransportError::Target { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/usr/bin/flip"), "/usr/bin/flip");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(shell_quote("/srv/{a,b}"), "'/srv/{a,b}'");
        assert_eq!(shell_quote("x!y^z"), "'x!y^z'");
    }
}
