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

/// The entries of the directory `path`, sorted by name.
pub fn list_dir(path: &str) -> Result<Vec<Entry>, HostError> {
    raw::list_dir(path).map_err(HostError::from)
}

/// `path` itself, not following a final link.
pub fn stat(path: &str) -> Result<Entry, HostError> {
    raw::stat(path).map_err(HostError::from)
}

/// Whether `path` exists (a link counts, whatever it points to).
pub fn exists(path: &str) -> Result<bool, HostError> {
    match raw::stat(path) {
        Ok(_) => Ok(true),
        Err(crate::HostErrorKind::NotFound(_)) => Ok(false),
        Err(e) => Err(HostError::from(e)),
    }
}

/// Files, directories and bytes beneath `path`, like `du -s --apparent-size`.
pub fn usage(path: &str) -> Result<DiskUsage, HostError> {
    raw::usage(path).map_err(HostError::from)
}
