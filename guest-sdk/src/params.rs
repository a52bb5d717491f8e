//! The run's parameters: the site's `[params]` overlaid with `--param`,
//! with defaults from [`ScriptInfo`](crate::ScriptInfo) applied.

use crate::HostError;
use crate::wit::offsite::backup::params as raw;

/// The value of a declared parameter, or `None` when it has no value.
/// Reading an undeclared parameter is denied ([`HostError::is_denied`]).
///
/// ```no_run
/// let prefix = offsite_sdk::params::get("prefix")?.unwrap_or_else(|| "backup".into());
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
pub fn get(name: &str) -> Result<Option<String>, HostError> {
    raw::get(name).map_err(HostError::from)
}

/// The value of a parameter that must be set (and not empty).
///
/// ```no_run
/// let path = offsite_sdk::params::require("path")?;
/// # Ok::<(), offsite_sdk::Error>(())
/// ```
pub fn require(name: &str) -> crate::Result<String> {
    match get(name)? {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(crate::anyhow!("parameter {name:?} is required")),
    }
}
