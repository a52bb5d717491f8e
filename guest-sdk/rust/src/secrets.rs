//! Secrets the site file names, held as opaque handles.
//!
//! A script can open a secret the site declares and hand it to a capability
//! that delivers it (see [`crate::ssh::exec_to_file_with_secret`]); there is
//! no way to read its value, so a script cannot leak what it never sees.

use crate::HostError;
use crate::wit::offsite::backup::secrets as raw;

/// A handle on one of the site's secrets.
pub struct Secret(pub(crate) raw::Secret);

impl Secret {
    /// Opens the secret the site file declares as `name` under `[secrets]`.
    ///
    /// ```no_run
    /// let password = offsite_sdk::secrets::Secret::open("db_password")?;
    /// assert_eq!(password.name(), "db_password");
    /// # Ok::<(), offsite_sdk::HostError>(())
    /// ```
    pub fn open(name: &str) -> Result<Secret, HostError> {
        raw::open(name).map(Secret).map_err(HostError::from)
    }

    /// The WIT resource, for calling the raw bindings in [`crate::wit`].
    pub fn raw(&self) -> &raw::Secret {
        &self.0
    }

    /// The name the site gives it (never the value).
    pub fn name(&self) -> String {
        self.0.name()
    }
}
