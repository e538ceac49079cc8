//! What the server runs, shared by `flip` and the agent-only `flip-agent` (src/agent_main.rs):
//! `agent --root PATH [--mkpath] [--idle-timeout SECS]`, `blake3 FILE...` (the upload check on
//! a server without b3sum) and `--version`. Both binaries serve them with this code, so they
//! print the same lines and exit with the same codes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `flip VERSION`: what `--version` prints, and what the client's launcher and upload check
/// compare a server's binary against.
// flip's own `--version` is clap's; a test in main.rs checks that the two agree.
#[cfg_attr(not(test), allow(dead_code))]
pub const VERSION_LINE: &str = concat!("flip ", env!("CARGO_PKG_VERSION"));

/// `agent`'s `--idle-timeout` when none is given, in seconds.
pub const DEFAULT_IDLE_SECS: u64 = flip_agent::DEFAULT_IDLE_TIMEOUT.as_secs();

/// Serves one agent session on stdin/stdout over `root` (see [`flip_agent::serve_stdio`]); an
/// `idle_timeout` of 0 waits forever. On an error, says on stderr what only stderr can still be
/// told (the idle timeout, a garbled connection); the client was sent every other error, and a
/// client that went away is told nothing.
///
/// # Errors
/// The session's error, for the caller's exit code: [`flip_agent::AgentError::is_idle_timeout`]
/// and [`flip_agent::AgentError::is_client_gone`] are connection problems (exit 6), any other
/// error exit 1.
pub fn serve(
    root: &Path,
    idle_timeout: u64,
    mkpath: bool,
    preamble: Vec<u8>,
) -> Result<(), flip_agent::AgentError> {
    // Raw descriptors: the protocol is binary, so no line buffering on stdout.
    let idle = (idle_timeout > 0).then(|| Duration::from_secs(idle_timeout));
    let Err(e) = flip_agent::serve_stdio(root, idle, mkpath, preamble) else {
        return Ok(());
    };
    if e.is_idle_timeout() {
        eprintln!(
            "flip agent: no request from the client for {idle_timeout} s; gave up (staging removed, lock released)"
        );
    } else if let flip_agent::AgentError::Wire(w) = &e {
        // A garbled connection has no one left to tell but our own stderr; a client that went
        // away (closed the connection, broken pipe) is told nothing: an aborted session is
        // silent (for a local target our stderr is the user's terminal). Any other error the
        // client has been sent and reports.
        if !e.is_client_gone() {
            eprintln!("flip agent: {w}");
        }
    }
    Err(e)
}

/// `agent --preamble=BASE64...`: the bytes the session's input starts with, each word standard
/// base64 on its own, in order, at most [`flip_agent::PREAMBLE_MAX`] bytes decoded in all.
///
/// # Errors
/// What is wrong with the words, for a usage error.
pub fn preamble<'a>(words: impl IntoIterator<Item = &'a str>) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let max = flip_agent::PREAMBLE_MAX;
    let mut bytes = Vec::new();
    for text in words {
        // Checked before decoding: what is decoded stays within the limit.
        let padding = text.bytes().rev().take(2).filter(|&b| b == b'=').count();
        if bytes.len() + (text.len() / 4 * 3).saturating_sub(padding) > max {
            return Err(format!("--preamble holds more than {max} bytes"));
        }
        let piece = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("--preamble is not base64: {e}"))?;
        bytes.extend_from_slice(&piece);
    }
    Ok(bytes)
}

/// `blake3 FILE...`: one `HASH  FILE` line per file on `out`, as b3sum prints them. A reader
/// that closed `out` (`flip blake3 F | head -c 0`) is no error: the rest is not hashed.
///
/// # Errors
/// The first file that cannot be read (with its path), or another failed write to `out`.
pub fn blake3_files(files: &[PathBuf], out: &mut dyn Write) -> Result<(), Blake3Error> {
    let written = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(Blake3Error::Write(e)),
        Ok(()) => Ok(true),
    };
    for file in files {
        let mut hasher = blake3::Hasher::new();
        hasher.update_mmap(file).map_err(|e| Blake3Error::Read {
            path: file.clone(),
            source: e,
        })?;
        let line = writeln!(out, "{}  {}", hasher.finalize().to_hex(), file.display());
        if !written(line)? {
            return Ok(());
        }
    }
    written(out.flush()).map(drop)
}

/// Why `blake3 FILE...` failed.
#[derive(Debug, thiserror::Error)]
pub enum Blake3Error {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Standard output could not be written.
    #[error("cannot write the hashes: {0}")]
    Write(std::io::Error),
}

/// glibc gives every thread its own malloc arena (up to 8 per core), and memory freed in one
/// arena is not reused by another: with rayon workers allocating paths, buffers and frames, a
/// deploy of 100,000 files kept ~30 MB more resident than it used. Two arenas cost nothing
/// measurable in speed here. Call first thing in `main`, before any other thread exists.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
