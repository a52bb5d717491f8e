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
/// entries. A part that holds a space, `:`, `,` or `"` is written in double
/// quotes, with `\"` and `\\` inside, so any table name can be named
/// (`server1:sitedb:"tbl stats",tbl_ccode`). An empty list is an empty
/// `Vec`: whether that is an error is the script's call.
///
/// ```
/// use offsite_sdk::params::{HostEntry, host_entries};
/// let entries = host_entries(" server1:sitedb:tbl_a,tbl_b  server2:transdb ").unwrap();
/// assert_eq!(entries[0].items, ["tbl_a", "tbl_b"]);
/// assert_eq!(entries[1], HostEntry { host: "server2".into(), name: "transdb".into(), items: vec![] });
/// let odd = host_entries(r#"server1:"my db":"tbl stats","a:b,c","say \"hi\"""#).unwrap();
/// assert_eq!(odd[0].name, "my db");
/// assert_eq!(odd[0].items, ["tbl stats", "a:b,c", "say \"hi\""]);
/// assert!(host_entries("server1").is_err());
/// assert!(host_entries(":sitedb").is_err());
/// assert!(host_entries("server1:\"open").is_err());
/// assert!(host_entries("").unwrap().is_empty());
/// ```
pub fn host_entries(list: &str) -> crate::Result<Vec<HostEntry>> {
    let mut entries = Vec::new();
    for entry in split_unquoted(list, |c| c.is_whitespace())? {
        if entry.is_empty() {
            continue;
        }
        let parts = split_unquoted(&entry, |c| c == ':')?;
        if parts.len() < 2 || parts.len() > 3 {
            crate::bail!("entry {entry:?} must be HOST:NAME or HOST:NAME:ITEM,ITEM (quote a part that holds `:`)");
        }
        let (host, name) = (unquote(&parts[0])?, unquote(&parts[1])?);
        if host.is_empty() || name.is_empty() {
            crate::bail!("entry {entry:?} has an empty host or name");
        }
        let items = match parts.get(2) {
            Some(tail) => split_unquoted(tail, |c| c == ',')?
                .iter()
                .filter(|t| !t.is_empty())
                .map(|t| unquote(t))
                .collect::<crate::Result<_>>()?,
            None => Vec::new(),
        };
        entries.push(HostEntry { host, name, items });
    }
    Ok(entries)
}

/// Splits `text` at the characters `sep` accepts that are outside double
/// quotes; the pieces keep their quotes.
fn split_unquoted(text: &str, sep: impl Fn(char) -> bool) -> crate::Result<Vec<String>> {
    let (mut out, mut piece, mut quoted, mut escaped) = (Vec::new(), String::new(), false, false);
    for c in text.chars() {
        if escaped {
            piece.push(c);
            escaped = false;
        } else if quoted && c == '\\' {
            piece.push(c);
            escaped = true;
        } else if c == '"' {
            piece.push(c);
            quoted = !quoted;
        } else if !quoted && sep(c) {
            out.push(std::mem::take(&mut piece));
        } else {
            piece.push(c);
        }
    }
    if quoted {
        crate::bail!("{text:?} has a `\"` that is never closed");
    }
    out.push(piece);
    Ok(out)
}

/// A part without its quotes and escapes: `"tbl stats"` is `tbl stats`.
fn unquote(part: &str) -> crate::Result<String> {
    let mut out = String::with_capacity(part.len());
    let mut chars = part.chars();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => match chars.next() {
                Some(next) => out.push(next),
                None => crate::bail!("{part:?} ends in a lone `\\`"),
            },
            c => out.push(c),
        }
    }
    Ok(out)
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
