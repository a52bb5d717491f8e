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

/// One `HOST:NAME[:ITEM,ITEM...]` entry of a list parameter, such as the
/// database scripts' `dumps = "server1:sitedb:tbl_a,tbl_b server2:transdb"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    /// A host of the site, by its name there.
    pub host: String,
    /// What to take on that host: a database, a path.
    pub name: String,
    /// The optional comma-separated tail: tables, say. Empty when absent.
    pub items: Vec<String>,
}

/// Splits a whitespace-separated list of `HOST:NAME[:ITEM,ITEM...]`
/// entries. `NAME` may not contain `:`; the items may (only the first two
/// colons split). An empty list is an empty `Vec`: whether that is an error
/// is the script's call.
///
/// ```
/// use offsite_sdk::params::{HostEntry, host_entries};
/// let entries = host_entries(" server1:sitedb:tbl_a,tbl_b  server2:transdb ").unwrap();
/// assert_eq!(entries[0].items, ["tbl_a", "tbl_b"]);
/// assert_eq!(entries[1], HostEntry { host: "server2".into(), name: "transdb".into(), items: vec![] });
/// assert!(host_entries("server1").is_err());
/// assert!(host_entries(":sitedb").is_err());
/// assert!(host_entries("").unwrap().is_empty());
/// ```
pub fn host_entries(list: &str) -> crate::Result<Vec<HostEntry>> {
    list.split_whitespace()
        .map(|entry| {
            let mut parts = entry.splitn(3, ':');
            let (Some(host), Some(name)) = (parts.next(), parts.next()) else {
                crate::bail!("entry {entry:?} must be HOST:NAME or HOST:NAME:ITEM,ITEM");
            };
            if host.is_empty() || name.is_empty() {
                crate::bail!("entry {entry:?} has an empty host or name");
            }
            let items = parts.next().map(|t| t.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect());
            Ok(HostEntry { host: host.into(), name: name.into(), items: items.unwrap_or_default() })
        })
        .collect()
}

/// The parameter `name` as [`host_entries`], which must hold at least one
/// entry: missing, empty or malformed is an error naming the parameter.
///
/// ```no_run
/// for dump in offsite_sdk::params::require_host_entries("dumps")? {
///     offsite_sdk::info!("{} on {}", dump.name, dump.host);
/// }
/// # Ok::<(), offsite_sdk::Error>(())
/// ```
pub fn require_host_entries(name: &str) -> crate::Result<Vec<HostEntry>> {
    let entries = host_entries(&get(name)?.unwrap_or_default()).map_err(|e| crate::anyhow!("{name}: {e}"))?;
    if entries.is_empty() {
        crate::bail!(
            "nothing to back up: set the {name} param to HOST:NAME entries, e.g. \"server1:sitedb server2:transdb\""
        );
    }
    Ok(entries)
}
