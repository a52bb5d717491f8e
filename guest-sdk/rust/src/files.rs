//! A read-only view of the site's read roots: list a directory, look at one
//! path, measure a tree. The same paths `archive` may read, under the same
//! rules; links are reported, never followed, and no file is opened.
//!
//! ```no_run
//! use offsite_sdk::{files, info};
//! let usage = files::usage("www")?;
//! info!("www: {} files, {} bytes", usage.files, usage.bytes);
//! for entry in files::list_dir("www")? {
//!     info!("{} {:?} {} bytes", entry.name, entry.kind, entry.size);
//! }
//! # Ok::<(), offsite_sdk::HostError>(())
//! ```

use crate::HostError;
use crate::wit::offsite::backup::files as raw;

pub use raw::{DiskUsage, Entry, Kind};

/// The entries of the directory `path`, sorted by name; more than 100000
/// is `limit-exceeded`.
///
/// ```no_run
/// use offsite_sdk::files::{self, Kind};
/// for entry in files::list_dir("/var/www")? {
///     if matches!(entry.kind, Kind::Directory) {
///         offsite_sdk::archive::tar_gz(&[format!("/var/www/{}", entry.name)], &format!("www/{}.tgz", entry.name))?;
///     }
/// }
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
pub fn list_dir(path: &str) -> Result<Vec<Entry>, HostError> {
    raw::list_dir(path).map_err(HostError::from)
}

/// `path` itself, not following a final link; `not-found` when it does not
/// exist.
///
/// ```no_run
/// if offsite_sdk::files::stat("/var/www/index.html")?.size == 0 {
///     offsite_sdk::warn!("the site's index page is empty");
/// }
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
pub fn stat(path: &str) -> Result<Entry, HostError> {
    raw::stat(path).map_err(HostError::from)
}

/// Whether `path` exists (a link counts, whatever it points to); any error
/// but `not-found` (a path outside the read roots, say) is returned.
///
/// ```no_run
/// let mut sources = Vec::new();
/// for path in ["/var/www", "/srv/uploads"] {
///     if offsite_sdk::files::exists(path)? {
///         sources.push(path);
///     }
/// }
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
pub fn exists(path: &str) -> Result<bool, HostError> {
    match raw::stat(path) {
        Ok(_) => Ok(true),
        Err(crate::HostErrorKind::NotFound(_)) => Ok(false),
        Err(e) => Err(HostError::from(e)),
    }
}

/// Files, directories and bytes beneath `path`, like `du -s --apparent-size`.
///
/// ```no_run
/// let usage = offsite_sdk::files::usage("/var/www")?;
/// offsite_sdk::info!("/var/www: {} files in {} directories, {} bytes", usage.files, usage.directories, usage.bytes);
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
pub fn usage(path: &str) -> Result<DiskUsage, HostError> {
    raw::usage(path).map_err(HostError::from)
}
