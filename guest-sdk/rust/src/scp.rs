//! Copying files from the site's remote hosts into its store.

use crate::ssh::Pending;
use crate::wit::offsite::backup::scp as raw;
use crate::{FileInfo, HostError};

/// Copies `remote_path` (absolute) from `host` into `dest` in the store.
/// The whole announced size must arrive; the file appears only when
/// complete, with its size and SHA-256 returned.
///
/// ```no_run
/// let info = offsite_sdk::scp::fetch("server1", "/var/backups/db.tgz", "server1/db.20040321-014844.tgz")?;
/// offsite_sdk::info!("{} bytes, sha256 {}", info.bytes, info.sha256);
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
pub fn fetch(host: &str, remote_path: &str, dest: &str) -> Result<FileInfo, HostError> {
    raw::fetch(host, remote_path, dest).map_err(HostError::from)
}

/// [`fetch`] in the background.
///
/// ```no_run
/// let job = offsite_sdk::scp::start_fetch("server2", "/var/backups/db.tgz", "server2/db.tgz")?;
/// job.wait()?;
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
pub fn start_fetch(host: &str, remote_path: &str, dest: &str) -> Result<Pending, HostError> {
    raw::start_fetch(host, remote_path, dest).map(Pending).map_err(HostError::from)
}
