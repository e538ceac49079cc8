//! The password database (`getpwnam_r`, `getpwuid_r`): one safe lookup for the places that
//! need a user's name, ids or home directory.

use std::ffi::{CStr, CString};
use std::path::PathBuf;

/// A user's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The login name.
    pub name: String,
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// The home directory as recorded (may be empty).
    pub home: PathBuf,
}

/// The entry of user `name`; `None` when there is no such user (or the name holds a NUL).
pub fn by_name(name: &str) -> Option<User> {
    let c = CString::new(name).ok()?;
    lookup(|pw, buf, res| {
        // SAFETY: a NUL-terminated name; `pw`, `buf` and `res` are the caller's, alive for the
        // call, and getpwnam_r writes at most `buf.len()` bytes into `buf`.
        unsafe { libc::getpwnam_r(c.as_ptr(), pw, buf.as_mut_ptr(), buf.len(), res) }
    })
}

/// The entry of user id `uid`; `None` when the database has none.
pub fn by_uid(uid: u32) -> Option<User> {
    lookup(|pw, buf, res| {
        // SAFETY: as in `by_name`, for getpwuid_r.
        unsafe { libc::getpwuid_r(uid, pw, buf.as_mut_ptr(), buf.len(), res) }
    })
}

fn lookup(
    call: impl FnOnce(&mut libc::passwd, &mut [libc::c_char], &mut *mut libc::passwd) -> libc::c_int,
) -> Option<User> {
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: libc::passwd is plain old data (integers and nullable pointers): all-zero is valid.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut res: *mut libc::passwd = std::ptr::null_mut();
    if call(&mut pw, &mut buf, &mut res) != 0 || res.is_null() || pw.pw_name.is_null() {
        return None;
    }
    // SAFETY: pw_name and pw_dir (when not null) point to NUL-terminated strings inside `buf`,
    // alive here.
    let (name, home) = unsafe {
        (
            CStr::from_ptr(pw.pw_name).to_string_lossy().into_owned(),
            match pw.pw_dir.is_null() {
                true => PathBuf::new(),
                false => PathBuf::from(std::ffi::OsStr::from_bytes(
                    CStr::from_ptr(pw.pw_dir).to_bytes(),
                )),
            },
        )
    };
    Some(User {
        name,
        uid: pw.pw_uid,
        gid: pw.pw_gid,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_by_name_and_by_id() {
        let root = by_name("root").expect("root is in the database");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(!root.home.as_os_str().is_empty());
        assert_eq!(by_uid(0), Some(root));
        assert_eq!(by_name("no-such-user-flip"), None);
        assert_eq!(by_name("a\0b"), None);
    }
}
