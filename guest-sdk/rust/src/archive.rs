//! Archives of the site's read roots, written into its store.

use crate::wit::offsite::backup::archive as raw;
use crate::{FileInfo, HostError};

/// Writes a gzip-compressed tar of `sources` to `dest` in the store and
/// returns its size and SHA-256. Symbolic links are stored as links; the
/// file appears under `dest` only once it is complete and synced.
///
/// ```no_run
/// let info = offsite_sdk::archive::tar_gz(&["beoserver"], "beoserver.20040321-014844.tgz")?;
/// offsite_sdk::info!("{} bytes, sha256 {}", info.bytes, info.sha256);
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
pub fn tar_gz<S: AsRef<str>>(sources: &[S], dest: &str) -> Result<FileInfo, HostError> {
    let sources: Vec<String> = sources.iter().map(|s| s.as_ref().to_string()).collect();
    raw::tar_gz(&sources, dest).map_err(HostError::from)
}
