//! The agent as a local child process, talking over its stdin and stdout. Its stderr is passed
//! through to ours so agent diagnostics reach the user.

use crate::{AgentStream, Finish, TransportError};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts `program args...` with piped stdin/stdout.
///
/// # Errors
/// [`TransportError::Spawn`] if the process cannot be started.
pub fn spawn(program: &Path, args: &[OsString]) -> Result<AgentStream, TransportError> {
    let mut child = Command::new(program)
        .args(args)
        // A process group of its own, as an agent over SSH is: Ctrl-C on the terminal ends
        // the client only, and the agent, seeing its input close, stops a running hook and
        // cleans up (killed with the client, it left the hook running and its release behind).
        .process_group(0)
        // Not an SSH session's command, even when this client runs in one: the agent measures
        // its start from the SSH session's when this is set (`flip doctor`'s `startup`).
        .env_remove("SSH_CONNECTION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| TransportError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
    let writer = child.stdin.take().expect("piped stdin");
    let reader = child.stdout.take().expect("piped stdout");
    Ok(AgentStream {
        round_trip: None,
        reader: Box::new(reader),
        writer: Box::new(writer),
        handle: Box::new(LocalChild {
            child,
            program: program.display().to_string(),
        }),
        peer: "local".to_string(),
        seal: crate::no_seal(),
    })
}

struct LocalChild {
    child: Child,
    program: String,
}

/// How long a session that ends without [`Finish::finish`] (an error on the client's side)
/// waits for its agent to exit before killing it. The agent removes its staging directory and
/// releases the lock as soon as its input closes; waiting for that means a retry right after
/// never finds the target locked by the agent of the failed attempt.
pub const ABANDON_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits up to `within` for `child` to exit, then kills it (and reaps it either way).
pub(crate) fn reap(child: &mut Child, within: std::time::Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
}

impl Drop for LocalChild {
    /// Runs after the session's pipes are closed (the stream halves are dropped first), so the
    /// agent sees its input end and cleans up.
    fn drop(&mut self) {
        reap(&mut self.child, ABANDON_WAIT);
    }
}

impl Finish for LocalChild {
    fn finish(mut self: Box<Self>) -> Result<(), TransportError> {
        let status = self
            .child
            .wait()
            .map_err(|e| TransportError::Other(format!("waiting for {}: {e}", self.program)))?;
        if status.success() {
            Ok(())
        } else {
            Err(TransportError::Exit {
                what: self.program.clone(),
                status: status.to_string(),
                stderr: String::new(),
            })
        }
    }
}
