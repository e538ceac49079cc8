//! flip-agent: the agent-only binary flip uploads to a server that has no flip. It serves
//! exactly what a client asks of a server (src/agent_cmd.rs, shared with `flip`):
//!
//! ```text
//! flip-agent agent --root PATH [--mkpath] [--idle-timeout SECS] [--preamble BASE64]
//! flip-agent blake3 FILE...
//! flip-agent --version              (prints `flip VERSION`, as `flip --version` does)
//! ```
//!
//! with the same output and exit codes as `flip agent`, `flip blake3` and `flip --version`. It
//! links the agent library only (no SSH, no TLS, no command-line UI), so the upload on first
//! contact is a fraction of the whole client's.

mod agent_cmd;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit statuses, as flip's (src/exit.rs): a bug, a usage error, a connection problem.
const INTERNAL: u8 = 1;
const USAGE: u8 = 2;
const CONNECTION: u8 = 6;

const USAGE_TEXT: &str = "\
flip-agent: the agent flip uploads to a server (the server side of `flip deploy`).

Usage: flip-agent agent --root PATH [--mkpath] [--idle-timeout SECS] [--preamble BASE64]
       flip-agent blake3 FILE...
       flip-agent --version
";

/// One command line of the agent.
#[derive(Debug, PartialEq, Eq)]
enum Cmd {
    Version,
    Help,
    /// `agent`: serve one session on stdin/stdout.
    Agent {
        root: PathBuf,
        mkpath: bool,
        /// Seconds; 0 waits forever.
        idle_timeout: u64,
        /// The session's first bytes (`--preamble`, decoded).
        preamble: Vec<u8>,
    },
    /// `blake3 FILE...`.
    Blake3(Vec<PathBuf>),
}

/// Parses the arguments after the program name.
fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Cmd, lexopt::Error> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let command = match p.next()? {
        Some(Long("version") | Short('V')) => return Ok(Cmd::Version),
        Some(Long("help") | Short('h')) | None => return Ok(Cmd::Help),
        Some(Value(v)) => v,
        Some(arg) => return Err(arg.unexpected()),
    };
    match command.to_str() {
        Some("agent") => {
            let (mut root, mut mkpath) = (None, false);
            let mut idle_timeout = agent_cmd::DEFAULT_IDLE_SECS;
            let mut words = Vec::new();
            while let Some(arg) = p.next()? {
                match arg {
                    Long("root") => root = Some(PathBuf::from(p.value()?)),
                    Long("mkpath") => mkpath = true,
                    Long("idle-timeout") => idle_timeout = p.value()?.parse()?,
                    Long("preamble") => {
                        let text = p.value()?;
                        words.push(text.into_string().map_err(|_| "--preamble is not base64")?);
                    }
                    Long("help") | Short('h') => return Ok(Cmd::Help),
                    _ => return Err(arg.unexpected()),
                }
            }
            let root = root.ok_or("agent needs --root PATH")?;
            Ok(Cmd::Agent {
                root,
                mkpath,
                idle_timeout,
                preamble: agent_cmd::preamble(words.iter().map(String::as_str))?,
            })
        }
        Some("blake3") => {
            let mut files = Vec::new();
            while let Some(arg) = p.next()? {
                match arg {
                    Value(file) => files.push(PathBuf::from(file)),
                    _ => return Err(arg.unexpected()),
                }
            }
            if files.is_empty() {
                return Err("blake3 needs at least one FILE".into());
            }
            Ok(Cmd::Blake3(files))
        }
        _ => Err(format!(
            "unknown command '{}' (agent, blake3 or --version)",
            command.to_string_lossy()
        )
        .into()),
    }
}

fn main() -> ExitCode {
    agent_cmd::limit_malloc_arenas();
    let cmd = match parse(std::env::args_os().skip(1)) {
        Ok(cmd) => cmd,
        Err(e) => {
            eprint!("flip-agent: error: {e}\n\n{USAGE_TEXT}");
            return ExitCode::from(USAGE);
        }
    };
    let code = match cmd {
        Cmd::Version => print(&format!("{}\n", agent_cmd::VERSION_LINE)),
        Cmd::Help => print(USAGE_TEXT),
        Cmd::Agent {
            root,
            mkpath,
            idle_timeout,
            preamble,
        } => match agent_cmd::serve(&root, idle_timeout, mkpath, preamble) {
            Ok(()) => 0,
            Err(e) if e.is_idle_timeout() || e.is_client_gone() => CONNECTION,
            Err(_) => INTERNAL,
        },
        Cmd::Blake3(files) => {
            match agent_cmd::blake3_files(&files, &mut std::io::stdout().lock()) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("flip: error: {e}");
                    INTERNAL
                }
            }
        }
    };
    ExitCode::from(code)
}

/// Writes `text` to stdout: exit status 0, or [`INTERNAL`] if it could not be written.
fn print(text: &str) -> u8 {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("flip: error: cannot write to stdout: {e}");
            INTERNAL
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &[&str]) -> Result<Cmd, String> {
        parse(line.iter().map(OsString::from)).map_err(|e| e.to_string())
    }

    /// The command lines a client sends to a server's agent (crates/deploy/src/target.rs,
    /// crates/transport/src/ssh/remote.rs), in both option spellings.
    #[test]
    fn the_agents_command_lines_parse() {
        assert_eq!(args(&["--version"]), Ok(Cmd::Version));
        assert_eq!(
            args(&["agent", "--root", "/srv/my app"]),
            Ok(Cmd::Agent {
                root: "/srv/my app".into(),
                mkpath: false,
                idle_timeout: 600,
                preamble: Vec::new(),
            })
        );
        assert_eq!(
            args(&["agent", "--root=/srv/a", "--mkpath", "--idle-timeout", "0"]),
            Ok(Cmd::Agent {
                root: "/srv/a".into(),
                mkpath: true,
                idle_timeout: 0,
                preamble: Vec::new(),
            })
        );
        assert_eq!(
            args(&["blake3", "/a", "-"]),
            Ok(Cmd::Blake3(vec!["/a".into(), "-".into()]))
        );
        assert_eq!(
            args(&[
                "agent",
                "--root=/a",
                "--preamble=AAEC/w==",
                "--preamble",
                "Bw=="
            ]),
            Ok(Cmd::Agent {
                root: "/a".into(),
                mkpath: false,
                idle_timeout: 600,
                preamble: vec![0, 1, 2, 255, 7],
            })
        );
    }

    #[test]
    fn a_preamble_that_is_not_base64_or_too_long_is_refused() {
        let bad = args(&["agent", "--root=/a", "--preamble=%%%"]).unwrap_err();
        assert!(bad.contains("--preamble is not base64"), "{bad}");
        // 16 KiB in words of 4,096 characters (3 KiB) is the most.
        let word = format!("--preamble={}", "A".repeat(4096));
        let mut line = vec!["agent", "--root=/a"];
        line.extend(std::iter::repeat_n(word.as_str(), 5));
        let last = format!("--preamble={}", "A".repeat(1364));
        line.push(&last);
        assert!(args(&line).is_ok());
        line.push("--preamble=AAAA");
        let bad = args(&line).unwrap_err();
        assert!(
            bad.contains("--preamble holds more than 16384 bytes"),
            "{bad}"
        );
    }

    #[test]
    fn other_command_lines_are_usage_errors() {
        for (line, says) in [
            (&["agent"][..], "--root"),
            (&["agent", "--root"], "--root"),
            (&["agent", "--root", "/a", "--idle-timeout", "soon"], "soon"),
            (&["agent", "--root", "/a", "--json"], "--json"),
            (&["blake3"], "FILE"),
            (&["deploy", "src", "host:/srv"], "deploy"),
            (&["--root", "/a"], "--root"),
        ] {
            let e = args(line).unwrap_err();
            assert!(e.contains(says), "{line:?}: {e}");
        }
    }
}
