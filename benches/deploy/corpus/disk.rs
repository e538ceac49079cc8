//! Writing a corpus, or one mutation of it, to disk.

use super::*;
use std::os::unix::fs::{symlink, PermissionsExt};

pub(super) fn write_node(
    root: &Path,
    path: &str,
    node: &Node,
    mtime: SystemTime,
) -> io::Result<()> {
    let full = root.join(path);
    if let Some(parent) = full.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::symlink_metadata(&full) {
        Ok(_) => fs::remove_file(&full)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    match node {
        Node::File { data, mode } => {
            let f = fs::File::create(&full)?;
            io::Write::write_all(&mut &f, data)?;
            f.set_permissions(fs::Permissions::from_mode(*mode))?;
            f.set_modified(mtime)?;
        }
        Node::Symlink(target) => symlink(target, &full)?,
    }
    Ok(())
}

/// Writes the whole tree into `root` (which must not exist or be empty); every file gets `mtime`.
pub fn materialize(c: &Corpus, root: &Path, mtime: SystemTime) -> io::Result<()> {
    fs::create_dir_all(root)?;
    for (path, node) in &c.entries {
        write_node(root, path, node, mtime)?;
    }
    Ok(())
}

/// Applies a change made by [`Corpus::mutate`] to the tree on disk: new and changed files are
/// (re)written with `mtime`, removed ones deleted, and directories left empty removed.
pub fn apply(c: &Corpus, ch: &Change, root: &Path, mtime: SystemTime) -> io::Result<()> {
    for p in &ch.removed {
        if c.entries.contains_key(p) {
            continue;
        }
        fs::remove_file(root.join(p))?;
        let mut dir = root.join(p);
        while dir.pop() && dir != root {
            if fs::remove_dir(&dir).is_err() {
                break;
            }
        }
    }
    for p in ch.writes() {
        if let Some(node) = c.entries.get(p) {
            write_node(root, p, node, mtime)
                .map_err(|e| io::Error::new(e.kind(), format!("writing {p}: {e}")))?;
        }
    }
    Ok(())
}
