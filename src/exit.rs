//! Exit codes, and how an error chain maps to one. The README's table lists the same codes.

use flip_deploy::DeployError;
use flip_transfer::TransferError;
use flip_transport::TransportError;
use flip_wire::ErrorClass;

pub const OK: i32 = 0;
pub const INTERNAL: i32 = 1;
pub const USAGE: i32 = 2;
pub const LOCKED: i32 = 3;
pub const SOURCE: i32 = 4;
pub const TARGET: i32 = 5;
pub const CONNECTION: i32 = 6;
pub const INTEGRITY: i32 = 7;
pub const NO_SPACE: i32 = 8;
pub const AUTH: i32 = 9;
/// An environment command (deploy, rollback, activate, prune or verify on every target of an
/// environment) failed on some targets: not every target is where it was asked to be.
pub const PARTIAL: i32 = 10;
/// A hook failed or timed out: a `before_activate` hook (nothing went live on any target), or
/// an `after_activate` hook (the new release is live, or every target was switched back with
/// `rollback_on_failure`). Takes precedence over [`PARTIAL`].
pub const HOOK: i32 = 11;

/// An error that already knows its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Coded {
    pub code: i32,
    pub message: String,
}

pub fn coded(code: i32, message: impl Into<String>) -> anyhow::Error {
    Coded {
        code,
        message: message.into(),
    }
    .into()
}

/// The exit code for an error: the first cause in the chain that says what kind of failure it is.
pub fn code_of(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(c) = cause.downcast_ref::<Coded>() {
            return c.code;
        }
        if let Some(d) = cause.downcast_ref::<DeployError>() {
            return deploy_code(d);
        }
        if let Some(t) = cause.downcast_ref::<TransferError>() {
            return transfer_code(t);
        }
        if let Some(t) = cause.downcast_ref::<TransportError>() {
            return transport_code(t);
        }
        if cause.downcast_ref::<flip_scan::ScanError>().is_some() {
            return SOURCE;
        }
    }
    INTERNAL
}

/// The exit code of one target's failure.
pub fn deploy_code(d: &DeployError) -> i32 {
    match d {
        DeployError::Usage(_) => USAGE,
        DeployError::Source(_) | DeployError::Scan(_) => SOURCE,
        DeployError::Transfer(t) => transfer_code(t),
        DeployError::Transport(t) => transport_code(t),
        DeployError::Exe(_) => INTERNAL,
        DeployError::Aborted { .. } => PARTIAL,
        DeployError::Hook { .. } => HOOK,
    }
}

fn transfer_code(t: &TransferError) -> i32 {
    match t {
        TransferError::Remote { class, .. } => match class {
            ErrorClass::Locked => LOCKED,
            ErrorClass::Target => TARGET,
            ErrorClass::Integrity => INTEGRITY,
            ErrorClass::NoSpace => NO_SPACE,
            ErrorClass::Io => TARGET,
            ErrorClass::BadRequest | ErrorClass::Protocol => CONNECTION,
            ErrorClass::Internal => INTERNAL,
        },
        TransferError::Source { .. } | TransferError::SourceChanged(_) => SOURCE,
        TransferError::Transport(t) => transport_code(t),
        TransferError::Wire { .. } | TransferError::Protocol { .. } => CONNECTION,
    }
}

/// Exit code for a transport failure: SSH trust and authentication problems apart from
/// everything else that keeps us from reaching an agent.
fn transport_code(t: &TransportError) -> i32 {
    match t {
        TransportError::HostKeyUnknown { .. }
        | TransportError::HostKeyChanged { .. }
        | TransportError::Auth { .. }
        | TransportError::KeyEncrypted { .. } => AUTH,
        TransportError::Target { .. } | TransportError::Config { .. } => USAGE,
        _ => CONNECTION,
    }
}
