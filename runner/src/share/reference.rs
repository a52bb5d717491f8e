//! Where a script comes from: a local file, or a registry reference
//! `oci://REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]`.
//!
//! The registry is always named (there is no default registry to guess),
//! and the parts are checked against the OCI distribution grammar so that
//! a reference cannot smuggle a path, a query or a second host.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The prefix that makes a script reference a registry reference.
pub const SCHEME: &str = "oci://";

/// A script in a registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OciRef {
    /// `host` or `host:port`.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// The image manifest's SHA-256, 64 lowercase hex digits.
    pub digest: Option<String>,
}

/// Where a site's script comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptSource {
    Path(PathBuf),
    Oci(OciRef),
}

impl ScriptSource {
    /// Reads a script reference: `oci://...`, a shipped script's name
    /// (`arc`: no `/` and no `.`), or a path (relative paths mean `base`).
    pub fn parse(text: &str, base: &Path) -> Result<ScriptSource> {
        if text.starts_with(SCHEME) {
            return Ok(ScriptSource::Oci(text.parse()?));
        }
        if text.contains("://") {
            bail!("{text:?}: a script is a file path or an oci://REGISTRY/REPOSITORY:TAG reference");
        }
        if is_script_name(text) {
            return Ok(ScriptSource::Path(shipped_script(text)?));
        }
        Ok(ScriptSource::Path(crate::site::expand_home(Path::new(text), base)))
    }
}

/// Whether `text` names a shipped script (`arc`, `mysql-pull`) rather than
/// a file: lowercase letters, digits and `-`, so never a path.
fn is_script_name(text: &str) -> bool {
    text.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Where shipped scripts are looked up by name: `$OFFSITE_SCRIPT_PATH`
/// (directories separated by `:`), else /usr/local/lib/offsite/scripts
/// (installed from source) and /usr/lib/offsite/scripts (the package).
pub fn shipped_script_dirs() -> Vec<PathBuf> {
    match std::env::var_os("OFFSITE_SCRIPT_PATH").filter(|p| !p.is_empty()) {
        Some(path) => std::env::split_paths(&path).collect(),
        None => vec!["/usr/local/lib/offsite/scripts".into(), "/usr/lib/offsite/scripts".into()],
    }
}

/// The file of the shipped script `name`: the first `DIR/NAME.wasm` found.
fn shipped_script(name: &str) -> Result<PathBuf> {
    let dirs = shipped_script_dirs();
    if let Some(found) = dirs.iter().map(|d| d.join(format!("{name}.wasm"))).find(|f| f.is_file()) {
        return Ok(found);
    }
    let looked: Vec<String> = dirs.iter().map(|d| d.join(format!("{name}.wasm")).display().to_string()).collect();
    bail!(
        "no shipped script is called {name:?}: there is no {} (the offsite package ships arc, mysql-pull and \
         pg-pull; for a file of your own, give its path, such as ./{name}.wasm)",
        looked.join(" or ")
    )
}

impl fmt::Display for ScriptSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScriptSource::Path(p) => write!(f, "{}", p.display()),
            ScriptSource::Oci(r) => write!(f, "{r}"),
        }
    }
}

impl OciRef {
    /// The same script pinned to `digest`, keeping the tag it was found by.
    pub fn pinned(&self, digest: &str) -> OciRef {
        OciRef { digest: Some(digest.to_string()), ..self.clone() }
    }

    /// `oci://REGISTRY/REPOSITORY:TAG` without the digest (what a tag moves on).
    pub fn without_digest(&self) -> OciRef {
        OciRef { digest: None, ..self.clone() }
    }

    /// `REGISTRY/REPOSITORY`: where the script lives, whatever its tag or
    /// digest (what a signature's statement names).
    pub fn repository_path(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The tag, `latest` when none is given (as docker and oras read it).
    pub fn tag_or_latest(&self) -> &str {
        self.tag.as_deref().unwrap_or("latest")
    }
}

impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@sha256:{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for OciRef {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<OciRef> {
        let shown = crate::text::truncate(text, 200);
        let Some(rest) = text.strip_prefix(SCHEME) else {
            bail!("{shown:?} is not an oci:// reference");
        };
        let usage = "expected oci://REGISTRY/REPOSITORY:TAG or oci://REGISTRY/REPOSITORY@sha256:DIGEST";
        if text.len() > 512 {
            bail!("{shown:?}: a reference is at most 512 characters");
        }
        let (rest, digest) = match rest.split_once('@') {
            Some((r, d)) => {
                let Some(hex) = d.strip_prefix("sha256:") else {
                    bail!("{shown:?}: the digest must be sha256:<64 hex digits>");
                };
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    bail!("{shown:?}: the digest must be sha256:<64 hex digits>");
                }
                (r, Some(hex.to_ascii_lowercase()))
            }
            None => (rest, None),
        };
        let Some((registry, path)) = rest.split_once('/') else {
            bail!("{shown:?}: no repository ({usage})");
        };
        if !valid_registry(registry) {
            bail!("{shown:?}: {registry:?} is not a registry host[:port] ({usage})");
        }
        // A tag follows the last ':' after the last '/'.
        let last_slash = path.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match path[last_slash..].find(':') {
            Some(i) => (&path[..last_slash + i], Some(&path[last_slash + i + 1..])),
            None => (path, None),
        };
        if !valid_repository(repository) {
            bail!(
                "{shown:?}: {repository:?} is not a repository name (lowercase letters, digits and . _ - \
                 separators, / between parts)"
            );
        }
        if let Some(t) = tag
            && !valid_tag(t)
        {
            bail!("{shown:?}: {t:?} is not a tag (letters, digits, . _ -, at most 128, not starting with . or -)");
        }
        Ok(OciRef {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest,
        })
    }
}

fn valid_registry(r: &str) -> bool {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok_and(|n| n > 0));
    host_ok && port_ok
}

fn valid_repository(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 255
        && r.split('/').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_lowercase() | b[0].is_ascii_digit()
                && b[b.len() - 1].is_ascii_lowercase() | b[b.len() - 1].is_ascii_digit()
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
                && !part.contains("..")
        })
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_print_back() {
        let d = "a".repeat(64);
        for text in [
            "oci://registry.example:5000/backup/mysql-pull:1.2".to_string(),
            "oci://127.0.0.5:5443/mysql-pull".to_string(),
            format!("oci://reg.example/team/mysql-pull@sha256:{d}"),
            format!("oci://reg.example/mysql-pull:v1@sha256:{d}"),
        ] {
            let r: OciRef = text.parse().unwrap();
            assert_eq!(r.to_string(), text);
        }
        let r: OciRef = "oci://reg.example:5000/a/b:t".parse().unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("reg.example:5000", "a/b", Some("t"))
        );
    }

    #[test]
    fn references_that_could_mean_something_else_are_refused() {
        for bad in [
            "oci://",
            "oci://reg.example",
            "oci://reg.example/",
            "oci://reg.example/UPPER:t",
            "oci://reg.example/a/../b:t",
            "oci://reg.example/a:t/b",
            "oci://reg.example/a:-t",
            "oci://reg.example/a@sha256:abc",
            "oci://reg.example/a@sha512:abc",
            "oci://user@reg.example/a:t",
            "oci://reg.example:99999/a:t",
            "oci://reg.example/a?x=1",
            "oci://reg.example/a#frag",
            "oci://re g/a",
        ] {
            assert!(bad.parse::<OciRef>().is_err(), "{bad}");
        }
        assert!(ScriptSource::parse("https://x/y.wasm", Path::new("/")).is_err());
        assert_eq!(
            ScriptSource::parse("arc.wasm", Path::new("/etc/offsite")).unwrap(),
            ScriptSource::Path("/etc/offsite/arc.wasm".into())
        );
    }
}
