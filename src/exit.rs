//! Exit codes: one enum ([`Code`]), converted to [`std::process::ExitCode`] in `main`, and one
//! mapping from an error to its code ([`code_of`]). README.md's table and `flip --help` list
//! the same codes (a test checks the README against [`Code::ALL`]).

use flip_deploy::DeployError;
use flip_transfer::TransferError;
use flip_transport::TransportError;
use flip_wire::ErrorClass;

/// What a flip command's exit status says. To add one: a variant with the next number, its
/// entry in [`Code::ALL`] and [`Code::summary`], and a row in README.md's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// Success.
    Ok = 0,
    /// A bug.
    Internal = 1,
    /// Unknown flag, missing argument, bad flip.toml, overlapping source and target, ...
    Usage = 2,
    /// Another deploy, rollback, activate or prune holds the target's lock.
    Locked = 3,
    /// The source is missing, not a directory, unreadable or changed during the deploy.
    Source = 4,
    /// The target's state: not a flip target, no such release, nothing to roll back to, ...
    Target = 5,
    /// The agent could not be reached or the connection broke.
    Connection = 6,
    /// A file did not match its digest, `flip verify` found differences, damaged metadata.
    Integrity = 7,
    /// The target's disk is full.
    NoSpace = 8,
    /// SSH authentication failed, or the host key is unknown or changed.
    Auth = 9,
    /// An environment command (deploy, rollback, activate, prune or verify on every target of an
    /// environment) failed on some targets: not every target is where it was asked to be.
    Partial = 10,
    /// `flip doctor` found a problem on a target (with `--strict`, a warning too).
    Unhealthy = 11,
    /// A hook failed or timed out: a `before_activate` hook (nothing went live on any target),
    /// or an `after_activate` hook (the new release is live, or every target was switched back
    /// with `rollback_on_failure`). Takes precedence over [`Code::Partial`].
    Hook = 12,
    /// The command's output could not be written to stdout (a full disk, an I/O error; a
    /// reader that closed the pipe is no error): what the command did is done, its report is
    /// lost. Only when the command itself succeeded; its own failure code wins.
    Output = 13,
}

impl Code {
    /// Every code, in order.
    pub const ALL: [Code; 14] = [
        Code::Ok,
        Code::Internal,
        Code::Usage,
        Code::Locked,
        Code::Source,
        Code::Target,
        Code::Connection,
        Code::Integrity,
        Code::NoSpace,
        Code::Auth,
        Code::Partial,
        Code::Unhealthy,
        Code::Hook,
        Code::Output,
    ];

    /// The number the process exits with.
    pub fn number(self) -> u8 {
        self as u8
    }

    /// A few words for `flip --help`; README.md's row of this code says them too.
    pub fn summary(self) -> &'static str {
        match self {
            Code::Ok => "success",
            Code::Internal => "internal error",
            Code::Usage => "usage error",
            Code::Locked => "locked",
            Code::Source => "source problem",
            Code::Target => "target problem",
            Code::Connection => "connection problem",
            Code::Integrity => "integrity",
            Code::NoSpace => "disk is full",
            Code::Auth => "SSH authentication",
            Code::Partial => "an environment command failed on some targets",
            Code::Unhealthy => "`flip doctor` found a problem",
            Code::Hook => "a hook failed",
            Code::Output => "stdout could not be written",
        }
    }

    /// `Exit codes: 0 success, 1 internal error, ...` for `flip --help`.
    pub fn help_line() -> String {
        let list: Vec<String> = Code::ALL
            .iter()
            .map(|c| format!("{} {}", c.number(), c.summary()))
            .collect();
        format!("Exit codes: {}.", list.join(", "))
    }
}

/// In JSON a code is its number (`{"error": {"code": 5, ...}}`).
impl serde::Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.number())
    }
}

impl From<Code> for std::process::ExitCode {
    fn from(c: Code) -> Self {
        std::process::ExitCode::from(c.number())
    }
}

// Short names for the codes, as the commands use them.
pub const OK: Code = Code::Ok;
pub const USAGE: Code = Code::Usage;
pub const SOURCE: Code = Code::Source;
pub const INTEGRITY: Code = Code::Integrity;
pub const PARTIAL: Code = Code::Partial;
pub const UNHEALTHY: Code = Code::Unhealthy;

/// An error that already knows its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Coded {
    pub code: Code,
    pub message: String,
}

pub fn coded(code: Code, message: impl Into<String>) -> anyhow::Error {
    Coded {
        code,
        message: message.into(),
    }
    .into()
}

/// The exit code of an environment command that failed on some targets with `errors`:
/// [`Code::Usage`] when one of them is a usage error (the environment itself is wrong: one
/// directory named twice), else [`Code::Partial`].
pub fn of_environment<'e, E: std::error::Error + 'static>(
    mut errors: impl Iterator<Item = &'e E>,
) -> Code {
    match errors.any(|e| code_of(e) == Code::Usage) {
        true => Code::Usage,
        false => PARTIAL,
    }
}

/// The exit code for an error (an `anyhow::Error` derefs to one): the first cause in its chain
/// that says what kind of failure it is; [`Code::Internal`] when none does. The only mapping
/// from errors to codes: a target's failure in an environment's JSON gets its code here too.
pub fn code_of(err: &(dyn std::error::Error + 'static)) -> Code {
    let mut cause = Some(err);
    while let Some(c) = cause {
        if let Some(code) = own_code(c) {
            return code;
        }
        cause = c.source();
    }
    Code::Internal
}

/// The code of one error by its own type, not looking at its causes.
fn own_code(cause: &(dyn std::error::Error + 'static)) -> Option<Code> {
    if let Some(c) = cause.downcast_ref::<Coded>() {
        return Some(c.code);
    }
    if let Some(e) = cause.downcast_ref::<clap::Error>() {
        return Some(if e.use_stderr() {
            Code::Usage
        } else {
            Code::Ok
        });
    }
    if let Some(d) = cause.downcast_ref::<DeployError>() {
        return Some(match d {
            DeployError::Usage(_) => Code::Usage,
            DeployError::TargetState(_) => Code::Target,
            DeployError::Source(_) | DeployError::Scan(_) => Code::Source,
            DeployError::Transfer(t) => transfer_code(t),
            DeployError::Transport(t) => transport_code(t),
            DeployError::Exe(_) => Code::Internal,
            DeployError::Aborted { .. } => Code::Partial,
            // Never reported: the deploy starts again (it gave way to a lock holder).
            DeployError::GaveWay { .. } => Code::Locked,
            DeployError::Hook { .. } => Code::Hook,
        });
    }
    if let Some(t) = cause.downcast_ref::<TransferError>() {
        return Some(transfer_code(t));
    }
    if let Some(t) = cause.downcast_ref::<TransportError>() {
        return Some(transport_code(t));
    }
    if let Some(e) = cause.downcast_ref::<flip_agent::AgentError>() {
        // The agent's own exit: its client is told the error itself, over the protocol.
        return Some(match e.is_idle_timeout() || e.is_client_gone() {
            true => Code::Connection,
            false => Code::Internal,
        });
    }
    if cause.downcast_ref::<flip_scan::ScanError>().is_some() {
        return Some(Code::Source);
    }
    None
}

fn transfer_code(t: &TransferError) -> Code {
    match t {
        TransferError::Remote { class, .. } => match class {
            ErrorClass::Locked => Code::Locked,
            ErrorClass::Target => Code::Target,
            ErrorClass::Integrity => Code::Integrity,
            ErrorClass::NoSpace => Code::NoSpace,
            ErrorClass::Io => Code::Target,
            ErrorClass::BadRequest | ErrorClass::Protocol => Code::Connection,
            ErrorClass::Internal => Code::Internal,
            ErrorClass::Duplicate => Code::Usage,
        },
        TransferError::Source { .. } | TransferError::SourceChanged(_) => Code::Source,
        TransferError::Transport(t) => transport_code(t),
        TransferError::Wire { .. } | TransferError::Protocol { .. } => Code::Connection,
    }
}

/// Exit code for a transport failure: SSH trust and authentication problems apart from
/// everything else that keeps us from reaching an agent.
fn transport_code(t: &TransportError) -> Code {
    match t {
        TransportError::HostKeyUnknown { .. }
        | TransportError::HostKeyChanged { .. }
        | TransportError::HostKeyOtherType { .. }
        | TransportError::Auth { .. }
        | TransportError::KeyEncrypted { .. } => Code::Auth,
        TransportError::Target { .. }
        | TransportError::Config { .. }
        | TransportError::SshCommandInvalid { .. } => Code::Usage,
        _ => Code::Connection,
    }
}

#[cfg(test)]
mod tests {
    use super::Code;

    /// README.md's exit code table has one row per code, in order, each saying the code's
    /// summary: the table cannot drift from the enum.
    #[test]
    fn the_readme_table_lists_every_exit_code_with_its_summary() {
        let readme = include_str!("../README.md");
        let table = readme
            .split("## Exit codes")
            .nth(1)
            .expect("README.md has an Exit codes section");
        let rows: Vec<(u8, &str)> = table
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| {
                let mut cells = l.trim_matches('|').splitn(2, '|');
                let n = cells.next()?.trim().parse().ok()?;
                Some((n, cells.next()?.trim()))
            })
            .collect();
        let numbers: Vec<u8> = rows.iter().map(|r| r.0).collect();
        let expected: Vec<u8> = Code::ALL.iter().map(|c| c.number()).collect();
        assert_eq!(numbers, expected, "README rows vs Code::ALL");
        for ((n, meaning), code) in rows.iter().zip(Code::ALL) {
            assert!(
                meaning.contains(code.summary()),
                "README row {n} ({meaning:?}) does not say {:?}",
                code.summary()
            );
        }
    }

    #[test]
    fn every_code_is_listed_once_and_numbered_in_order() {
        for (i, c) in Code::ALL.iter().enumerate() {
            assert_eq!(c.number() as usize, i, "{c:?}");
        }
    }
}
