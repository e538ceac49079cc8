//! Finding, uploading and starting the agent on the server.
//!
//! One exec runs a small `sh -c` launcher. It looks for a flip of exactly our version (on the
//! PATH, then `~/.cache/flip/flip-VERSION`), prints a marker line and `exec`s it as the agent in
//! the same channel, so the usual case costs a single exec. If none is found it prints the
//! server's `uname -sm` instead and exits; then, if the platform matches ours, the local binary
//! is uploaded to `~/.cache/flip/flip-VERSION` (written to a temp name, its size and blake3
//! checked, `--version` run, then renamed into place) and the launcher runs again.

use super::{open, shell_quote, Remote, SshOptions, SshTarget};
use crate::{AgentStream, TransportError};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};

/// The marker the launcher prints before anything else it prints.
const MARKER: &str = "flip-launch: ";

/// Most bytes of noise (e.g. from shell startup files) tolerated before the marker.
const MAX_NOISE: usize = 64 * 1024;

/// Connects and starts the agent (see the module docs).
pub(crate) fn start_agent(
    target: &SshTarget,
    opts: &SshOptions,
    agent_args: &[String],
    stderr: Box<dyn Write + Send>,
) -> Result<AgentStream, TransportError> {
    let args: Vec<String> = agent_args.iter().map(|a| shell_quote(a)).collect();
    let args = args.join(" ");
    let sink = SharedSink(Arc::new(Mutex::new(stderr)));

    if let Some(flip) = &opts.remote_flip {
        let remote = open(target, opts)?;
        let what = format!("`{flip} agent`");
        return remote.stream(&format!("{flip} agent {args}"), &what, Box::new(sink));
    }

    let launcher = sh_c(&launcher_script(&opts.version, &args));
    let what = "the flip agent";
    let remote = open(target, opts)?;
    let host = remote.host().to_string();
    let stream = remote.stream(&launcher, what, Box::new(sink.clone()))?;
    let missing = match read_marker(stream, &host)? {
        Launch::Started(stream) => return Ok(stream),
        Launch::Missing(info) => info,
    };

    let local = local_platform();
    if missing.platform != local {
        return Err(TransportError::Platform {
            host,
            local,
            remote: missing.platform,
            version: opts.version.clone(),
        });
    }
    let mut remote = open(target, opts)?;
    upload(&mut *remote, opts, missing.b3sum)?;
    let stream = remote.stream(&launcher, what, Box::new(sink))?;
    match read_marker(stream, &host)? {
        Launch::Started(stream) => Ok(stream),
        Launch::Missing(_) => Err(TransportError::Remote {
            host,
            phase: "starting the agent".to_string(),
            message: format!(
                "flip {} was uploaded to ~/.cache/flip but the launcher still does not find it",
                opts.version
            ),
        }),
    }
}

/// `sh -c 'SCRIPT'`: the login shell may not be POSIX (fish, csh), so scripts run under sh.
fn sh_c(script: &str) -> String {
    format!("sh -c {}", shell_quote(script))
}

fn launcher_script(version: &str, quoted_args: &str) -> String {
    format!(
        r#"v={version}
for f in "$(command -v flip 2>/dev/null)" "$HOME/.cache/flip/flip-$v"; do
  if [ -n "$f" ] && [ -x "$f" ] && [ "$("$f" --version </dev/null 2>/dev/null)" = "flip $v" ]; then
    printf '{MARKER}ok %s\n' "$f"
    exec "$f" agent {quoted_args}
  fi
done
if command -v b3sum >/dev/null 2>&1; then b=b3sum; else b=; fi
printf '{MARKER}missing %s|%s\n' "$(uname -sm)" "$b"
"#,
        version = shell_quote(version),
    )
}

/// What the launcher reported when it found no flip.
struct Missing {
    /// `uname -sm` on the server.
    platform: String,
    /// `b3sum` is installed there.
    b3sum: bool,
}

enum Launch {
    Started(AgentStream),
    Missing(Missing),
}

/// Reads the launcher's marker line. On `ok`, returns the stream positioned just after it.
fn read_marker(mut stream: AgentStream, host: &str) -> Result<Launch, TransportError> {
    let mut reader = BufReader::with_capacity(64 * 1024, stream.reader);
    let mut noise = Vec::new();
    let mut line = Vec::new();
    let marker = loop {
        line.clear();
        let n = match reader.read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(e) => {
                return Err(TransportError::Remote {
                    host: host.to_string(),
                    phase: "starting the agent".to_string(),
                    message: e.to_string(),
                })
            }
        };
        if n == 0 {
            // The launcher ended without a marker: report how it ended.
            drop(stream.writer);
            stream.handle.finish()?;
            return Err(TransportError::Remote {
                host: host.to_string(),
                phase: "starting the agent".to_string(),
                message: format!(
                    "the launcher script printed no marker{}",
                    if noise.is_empty() {
                        String::new()
                    } else {
                        format!("; its output: {}", String::from_utf8_lossy(&noise).trim())
                    }
                ),
            });
        }
        if let Some(rest) = line.strip_prefix(MARKER.as_bytes()) {
            break String::from_utf8_lossy(rest).trim().to_string();
        }
        noise.extend_from_slice(&line);
        if noise.len() > MAX_NOISE {
            return Err(TransportError::Remote {
                host: host.to_string(),
                phase: "starting the agent".to_string(),
                message: "the remote shell printed too much output before starting flip \
                          (a shell startup file printing to stdout?)"
                    .to_string(),
            });
        }
    };
    if marker.starts_with("ok") {
        let leftover = reader.buffer().to_vec();
        let inner = reader.into_inner();
        stream.reader = Box::new(io::Cursor::new(leftover).chain(inner));
        return Ok(Launch::Started(stream));
    }
    let info = marker.strip_prefix("missing ").unwrap_or("");
    let (platform, tools) = info.split_once('|').unwrap_or((info, ""));
    drop(stream.writer);
    drop(reader);
    stream.handle.finish()?;
    Ok(Launch::Missing(Missing {
        platform: platform.trim().to_string(),
        b3sum: tools.contains("b3sum"),
    }))
}

/// The local platform in `uname -sm` form, e.g. `Linux x86_64`.
pub(crate) fn local_platform() -> String {
    if let Ok(out) = std::process::Command::new("uname").arg("-sm").output() {
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !s.is_empty() {
            return s;
        }
    }
    let os = match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "freebsd" => "FreeBSD",
        other => other,
    };
    let arch = match (std::env::consts::OS, std::env::consts::ARCH) {
        ("macos", "aarch64") => "arm64",
        (_, arch) => arch,
    };
    format!("{os} {arch}")
}

/// Uploads the local flip to `~/.cache/flip/flip-VERSION` on the server in one exec.
fn upload(remote: &mut dyn Remote, opts: &SshOptions, b3sum: bool) -> Result<(), TransportError> {
    let host = remote.host().to_string();
    let fail = |message: String| TransportError::Remote {
        host: host.clone(),
        phase: "uploading flip".to_string(),
        message,
    };
    let exe = &opts.local_exe;
    let bytes = std::fs::read(exe).map_err(|e| fail(format!("reading {}: {e}", exe.display())))?;
    let hash = blake3::hash(&bytes).to_hex().to_string();
    let script = upload_script(&opts.version, bytes.len(), &hash, b3sum);
    let out = remote.run(&sh_c(&script), Some(&mut bytes.as_slice()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status == Some(0) && stdout.contains("flip-upload: ok") {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(fail(format!(
        "{} ({})",
        if stderr.is_empty() {
            "the upload script failed"
        } else {
            &stderr
        },
        match out.status {
            Some(code) => format!("exit status {code}"),
            None => "killed".to_string(),
        }
    )))
}

fn upload_script(version: &str, size: usize, hash: &str, b3sum: bool) -> String {
    let hash_check = if b3sum {
        format!(
            r#"h=$(b3sum "$t" | cut -d' ' -f1)
[ "$h" = "{hash}" ] || {{ echo "blake3 mismatch after upload: $h, expected {hash}" >&2; exit 1; }}
"#
        )
    } else {
        String::new()
    };
    format!(
        r#"set -e
v={version}
d="$HOME/.cache/flip"
t="$d/.flip-$v.$$.tmp"
mkdir -p "$d"
trap 'rm -f "$t"' EXIT
cat > "$t"
n=$(wc -c < "$t" | tr -d ' ')
[ "$n" = "{size}" ] || {{ echo "size mismatch after upload: $n bytes, expected {size}" >&2; exit 1; }}
{hash_check}chmod 755 "$t"
out=$("$t" --version </dev/null 2>&1) || {{ echo "the uploaded flip does not run here: $out" >&2; exit 1; }}
[ "$out" = "flip $v" ] || {{ echo "the uploaded flip says '$out', expected 'flip $v'" >&2; exit 1; }}
mv -f "$t" "$d/flip-$v"
trap - EXIT
echo "flip-upload: ok"
"#,
        version = shell_quote(version),
    )
}

/// One stderr sink shared by the streams opened while starting the agent.
#[derive(Clone)]
struct SharedSink(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SharedSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The launcher finds a fake flip of the right version, and reports "missing" otherwise.
    #[test]
    fn launcher_script_finds_or_reports() {
        let home = tempfile::tempdir().unwrap();
        let cache = home.path().join(".cache/flip");
        std::fs::create_dir_all(&cache).unwrap();
        let fake = cache.join("flip-1.2.3");
        std::fs::write(
            &fake,
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'flip 1.2.3'; else echo \"agent:$*\"; fi\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let run = |version: &str| {
            let out = Command::new("sh")
                .arg("-c")
                .arg(launcher_script(version, "--root '/srv/a b'"))
                .env("HOME", home.path())
                .env("PATH", "/usr/bin:/bin")
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        };
        let found = run("1.2.3");
        assert!(found.starts_with("flip-launch: ok "), "{found}");
        assert!(found.ends_with("agent:agent --root /srv/a b\n"), "{found}");
        let missing = run("9.9.9");
        assert!(missing.starts_with("flip-launch: missing "), "{missing}");
        assert!(missing.contains(&local_platform()), "{missing}");
    }

    #[test]
    fn upload_script_checks_size_and_version() {
        let home = tempfile::tempdir().unwrap();
        let body = b"#!/bin/sh\necho 'flip 1.2.3'\n";
        let hash = blake3::hash(body).to_hex().to_string();
        let run = |size: usize| {
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(upload_script("1.2.3", size, &hash, false))
                .env("HOME", home.path())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(body).unwrap();
            child.wait_with_output().unwrap()
        };
        let bad = run(body.len() + 1);
        assert!(!bad.status.success());
        assert!(String::from_utf8_lossy(&bad.stderr).contains("size mismatch"));
        assert!(!home.path().join(".cache/flip/flip-1.2.3").exists());
        let good = run(body.len());
        assert!(
            good.status.success(),
            "{}",
            String::from_utf8_lossy(&good.stderr)
        );
        assert!(home.path().join(".cache/flip/flip-1.2.3").exists());
        // No temp files left behind.
        let left: Vec<_> = std::fs::read_dir(home.path().join(".cache/flip"))
            .unwrap()
            .collect();
        assert_eq!(left.len(), 1);
    }
}
