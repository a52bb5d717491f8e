//! The running user's home directory: `$HOME`, else the password
//! database's entry for the effective user, as OpenSSH finds it. A systemd
//! system service runs without `HOME` (unless it sets `User=`), so `~` in a
//! site file, keychain's `~/.keychain` and `~/.ssh` are found the same way
//! under the shipped units as from a login shell or cron.

use std::ffi::{CStr, OsString};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// `$HOME` when set and not empty, else the effective user's home in the
/// password database; `None` when neither says.
pub fn home_dir() -> Option<PathBuf> {
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Some(PathBuf::from(home)),
        None => passwd_home(rustix::process::geteuid().as_raw()),
    }
}

/// The home directory of `uid` in the password database.
fn passwd_home(uid: u32) -> Option<PathBuf> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: an all-zero passwd is a valid value for getpwuid_r to
        // fill; `buf` outlives every use of the pointers it fills in.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 || found.is_null() || pw.pw_dir.is_null() {
            return None;
        }
        // SAFETY: getpwuid_r succeeded, so pw_dir points to a NUL-ended
        // string in `buf`.
        let dir = unsafe { CStr::from_ptr(pw.pw_dir) }.to_bytes().to_vec();
        return (!dir.is_empty()).then(|| PathBuf::from(OsString::from_vec(dir)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_database_names_roots_home() {
        assert_eq!(passwd_home(0), Some(PathBuf::from("/root")));
        // A uid nobody has.
        assert_eq!(passwd_home(3_999_999_999), None);
    }
}
