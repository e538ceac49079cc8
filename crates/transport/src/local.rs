//! The agent as a local child process, talking over its stdin and stdout. Its stderr is passed
//! through to ours so agent diagnostics reach the user.

use crate::{AgentStream, Finish, TransportError};
use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts `program args...` with piped stdin/stdout.
pub fn spawn(program: &Path, args: &[OsString]) -> Result<AgentStream, TransportError> {
    let mut child = Command::new(program)
        .args(args)
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
        reader: Box::new(reader),
        writer: Box::new(writer),
        handle: Box::new(LocalChild {
            child,
            program: program.display().to_string(),
        }),
        peer: "local".to_string(),
    })
}

struct LocalChild {
    child: Child,
    program: String,
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
