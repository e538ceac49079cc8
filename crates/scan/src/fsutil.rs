//! The scan's filesystem helpers: the one module of this crate allowed the `std::fs` calls
//! `clippy.toml` disallows. Each returns a [`ScanError`] naming the operation and the path
//! (std's `io::Error` never names its path).
#![allow(clippy::disallowed_methods)]

use crate::ScanError;
use std::fs;
use std::path::{Path, PathBuf};

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ScanError {
    let path = path.to_path_buf();
    move |source| ScanError::Io { op, path, source }
}

/// The entries of the directory `path` ("cannot read directory …").
pub(crate) fn read_dir(path: &Path) -> Result<fs::ReadDir, ScanError> {
    fs::read_dir(path).map_err(io("read directory", path))
}

/// The target of the symlink at `path` ("cannot read symlink …").
pub(crate) fn read_link(path: &Path) -> Result<PathBuf, ScanError> {
    fs::read_link(path).map_err(io("read symlink", path))
}
