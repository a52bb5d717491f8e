//! What a site runs when its script is a registry tag: the digest
//! `offsite script update` resolved, verified and showed the diff of,
//! recorded in `SITE.lock` beside the site file (commit it with the site).
//! `run` and `watch` run exactly that digest; a tag that moved changes
//! nothing until the next `update`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptLock {
    /// The site's `script`, as written there (`oci://REGISTRY/REPO:TAG`).
    pub reference: String,
    /// The manifest digest the tag resolved to, `sha256:...`.
    pub manifest: String,
    /// The component's digest (what runs, and what manifests record).
    pub component: String,
    /// Who signed it, when the site checks signers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// When `update` recorded it (RFC 3339).
    pub updated: String,
}

impl ScriptLock {
    pub fn manifest_hex(&self) -> &str {
        self.manifest.strip_prefix("sha256:").unwrap_or(&self.manifest)
    }
    pub fn component_hex(&self) -> &str {
        self.component.strip_prefix("sha256:").unwrap_or(&self.component)
    }
}

/// `SITE.lock` beside `SITE.toml`.
pub fn path_for(site_file: &Path) -> PathBuf {
    site_file.with_extension("lock")
}

/// The lock of `site_file`, if it has one.
pub fn read(site_file: &Path) -> Result<Option<ScriptLock>> {
    let path = path_for(site_file);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let lock: ScriptLock = toml::from_str(&text).with_context(|| format!("{} cannot be read", path.display()))?;
    for (key, value) in [("manifest", &lock.manifest), ("component", &lock.component)] {
        let hex = value.strip_prefix("sha256:").unwrap_or_default();
        if super::cache::check_hex(hex).is_err() {
            bail!("{}: {key} must be sha256:<64 lowercase hex digits>", path.display());
        }
    }
    Ok(Some(lock))
}

/// Writes the lock atomically (temporary file, fsync, rename).
pub fn write(site_file: &Path, lock: &ScriptLock) -> Result<PathBuf> {
    use std::io::Write;
    let path = path_for(site_file);
    let dir = crate::site::dir_of(&path);
    let mut temp =
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
    let text = format!(
        "# Written by `offsite script update`: the script version this site runs.\n# Commit it with the site file; \
         run `offsite script update {}` to move on.\n{}",
        site_file.display(),
        toml::to_string(lock)?
    );
    temp.write_all(text.as_bytes())?;
    temp.as_file().sync_all()?;
    let mode = std::fs::metadata(site_file).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o644);
    if let Ok(mode) = mode {
        let _ = std::fs::set_permissions(temp.path(), std::os::unix::fs::PermissionsExt::from_mode(mode | 0o600));
    }
    temp.persist(&path).map_err(|e| e.error).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(path)
}
