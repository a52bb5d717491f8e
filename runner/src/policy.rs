//! The one place where grants are decided.
//!
//! Every host function starts by describing what it is about to do as a
//! [`Call`] and asking [`Policy::check`]. The match in `check` is exhaustive,
//! so a new capability cannot ship without a decision here. A refusal is a
//! [`Denial`], which the capability turns into the WIT `error` the script
//! sees; it is never a trap and never a silent no-op.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::bindings::types::Error as WitError;
use crate::site::Site;

/// Something a script asked the host to do.
#[derive(Debug)]
pub enum Call<'a> {
    ClockNow,
    ClockFormat,
    Log,
    ParamGet {
        name: &'a str,
    },
    /// Read `source` (as the script wrote it) for an archive.
    ArchiveRead {
        source: &'a str,
    },
    /// Write `dest` (as the script wrote it) into the store.
    StoreWrite {
        dest: &'a str,
    },
}

impl Call<'_> {
    /// The WIT interface the call belongs to, for logs.
    pub fn interface(&self) -> &'static str {
        match self {
            Call::ClockNow | Call::ClockFormat => "clock",
            Call::Log => "log",
            Call::ParamGet { .. } => "params",
            Call::ArchiveRead { .. } | Call::StoreWrite { .. } => "archive",
        }
    }
}

/// What an allowed call may touch.
#[derive(Debug, PartialEq, Eq)]
pub enum Grant {
    /// Needs no resource (clock, log).
    Unrestricted,
    /// The parameter exists; reading it is allowed.
    Param,
    /// Read `rel` beneath read root number `root`; `member` is the name the
    /// entry gets in an archive.
    Read { root: usize, rel: PathBuf, member: PathBuf },
    /// Write `rel` beneath the store.
    Write { rel: PathBuf },
}

/// Why a call was refused or malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    Denied(String),
    InvalidArgument(String),
    NotFound(String),
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::Denied(m) => write!(f, "denied: {m}"),
            Denial::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Denial::NotFound(m) => write!(f, "not found: {m}"),
        }
    }
}

impl From<Denial> for WitError {
    fn from(d: Denial) -> Self {
        match d {
            Denial::Denied(m) => WitError::Denied(m),
            Denial::InvalidArgument(m) => WitError::InvalidArgument(m),
            Denial::NotFound(m) => WitError::NotFound(m),
        }
    }
}

/// The grants of one site, resolved once per run.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Canonical read roots.
    read_roots: Vec<PathBuf>,
    /// Directory relative archive sources resolve against.
    base_dir: PathBuf,
    /// Parameters the script declared, with their values and secrecy.
    params: BTreeMap<String, ParamGrant>,
}

#[derive(Debug, Clone)]
pub struct ParamGrant {
    pub value: Option<String>,
    pub secret: bool,
}

impl Policy {
    /// A policy that denies everything: used while calling `describe`.
    pub fn deny_all() -> Policy {
        Policy { read_roots: Vec::new(), base_dir: PathBuf::from("/nonexistent"), params: BTreeMap::new() }
    }

    pub fn for_site(site: &Site, params: BTreeMap<String, ParamGrant>) -> Policy {
        Policy { read_roots: site.read_roots.clone(), base_dir: site.base_dir.clone(), params }
    }

    pub fn read_roots(&self) -> &[PathBuf] {
        &self.read_roots
    }

    pub fn param(&self, name: &str) -> Option<&ParamGrant> {
        self.params.get(name)
    }

    /// Decides one call. Exhaustive by construction.
    pub fn check(&self, call: &Call<'_>) -> Result<Grant, Denial> {
        match call {
            Call::ClockNow | Call::ClockFormat | Call::Log => Ok(Grant::Unrestricted),
            Call::ParamGet { name } => match self.params.get(*name) {
                Some(_) => Ok(Grant::Param),
                None => Err(Denial::Denied(format!("parameter {name:?} is not declared by the script's describe()"))),
            },
            Call::ArchiveRead { source } => self.check_read(source),
            Call::StoreWrite { dest } => store_path(dest).map(|rel| Grant::Write { rel }),
        }
    }

    fn check_read(&self, source: &str) -> Result<Grant, Denial> {
        if self.read_roots.is_empty() {
            return Err(Denial::Denied(format!("cannot read {source:?}: this site grants no read roots")));
        }
        let lexical = plain_path(source)?;
        let member: PathBuf = lexical.components().filter(|c| matches!(c, Component::Normal(_))).collect();
        if member.as_os_str().is_empty() {
            return Err(Denial::InvalidArgument(format!("{source:?} names no file or directory")));
        }
        let absolute = self.base_dir.join(&lexical);
        // Resolve the parent through the file system so that a symlinked
        // directory on the way cannot lead outside; the final component is
        // archived as what it is (a link stays a link).
        let parent = absolute.parent().unwrap_or(Path::new("/"));
        let name = absolute
            .file_name()
            .ok_or_else(|| Denial::InvalidArgument(format!("{source:?} names no file or directory")))?;
        let parent = parent.canonicalize().map_err(|e| Denial::NotFound(format!("cannot read {source:?}: {e}")))?;
        let resolved = parent.join(name);
        for (index, root) in self.read_roots.iter().enumerate() {
            if let Ok(rel) = resolved.strip_prefix(root) {
                if rel.as_os_str().is_empty() {
                    // The root itself: archive it as ".".
                    return Ok(Grant::Read { root: index, rel: PathBuf::from("."), member });
                }
                return Ok(Grant::Read { root: index, rel: rel.to_path_buf(), member });
            }
        }
        Err(Denial::Denied(format!(
            "cannot read {source:?}: {} is outside the read roots ({})",
            resolved.display(),
            self.read_roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
        )))
    }
}

/// A path with no NUL and no `..`. `.` components are dropped.
fn plain_path(p: &str) -> Result<PathBuf, Denial> {
    if p.is_empty() {
        return Err(Denial::InvalidArgument("empty path".into()));
    }
    if p.contains('\0') {
        return Err(Denial::InvalidArgument(format!("path {:?} contains a NUL byte", p.replace('\0', "\\0"))));
    }
    let path = Path::new(p);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(Denial::Denied(format!("path {p:?} contains `..`, which is never allowed")));
    }
    Ok(path.components().filter(|c| *c != Component::CurDir).collect())
}

/// Validates a destination in the store: relative, plain components only,
/// and not one of the runner's own temporary names.
pub fn store_path(dest: &str) -> Result<PathBuf, Denial> {
    let rel = plain_path(dest)?;
    if rel.is_absolute() {
        return Err(Denial::Denied(format!(
            "store destination {dest:?} is absolute; it must be a path relative to the store"
        )));
    }
    if rel.as_os_str().is_empty() {
        return Err(Denial::InvalidArgument(format!("store destination {dest:?} names no file")));
    }
    for c in rel.components() {
        if let Component::Normal(part) = c
            && part.to_string_lossy().starts_with(crate::store::TEMP_PREFIX)
        {
            return Err(Denial::Denied(format!("store destination {dest:?} uses the runner's reserved prefix")));
        }
    }
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(roots: &[&Path], base: &Path) -> Policy {
        Policy {
            read_roots: roots.iter().map(|r| r.canonicalize().unwrap()).collect(),
            base_dir: base.to_path_buf(),
            params: BTreeMap::from([("path".to_string(), ParamGrant { value: Some("x".into()), secret: false })]),
        }
    }

    #[test]
    fn reads_inside_a_root_are_granted_with_the_member_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("beoserver")).unwrap();
        let p = policy(&[dir.path()], dir.path());
        let grant = p.check(&Call::ArchiveRead { source: "beoserver" }).unwrap();
        assert_eq!(grant, Grant::Read { root: 0, rel: "beoserver".into(), member: "beoserver".into() });
        let abs = dir.path().canonicalize().unwrap().join("beoserver");
        let grant = p.check(&Call::ArchiveRead { source: abs.to_str().unwrap() }).unwrap();
        let Grant::Read { rel, member, .. } = grant else { panic!() };
        assert_eq!(rel, Path::new("beoserver"));
        assert!(!member.is_absolute(), "leading / is stripped like GNU tar does");
    }

    #[test]
    fn dotdot_and_outside_paths_are_denied() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        let p = policy(&[&dir.path().join("a")], &dir.path().join("a"));
        assert!(matches!(p.check(&Call::ArchiveRead { source: "../a" }), Err(Denial::Denied(_))));
        assert!(matches!(p.check(&Call::ArchiveRead { source: "/etc/passwd" }), Err(Denial::Denied(_))));
        assert!(matches!(p.check(&Call::ArchiveRead { source: "x\0y" }), Err(Denial::InvalidArgument(_))));
    }

    #[test]
    fn a_symlinked_parent_cannot_lead_outside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(dir.path().join("secret")).unwrap();
        std::fs::write(dir.path().join("secret/key"), "k").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        let p = policy(&[&root], &root);
        let err = p.check(&Call::ArchiveRead { source: "link/key" }).unwrap_err();
        assert!(matches!(err, Denial::Denied(ref m) if m.contains("outside the read roots")), "{err:?}");
        // The link itself is inside and is archived as a link.
        assert!(p.check(&Call::ArchiveRead { source: "link" }).is_ok());
    }

    #[test]
    fn no_read_roots_means_no_reads() {
        let p = Policy::deny_all();
        assert!(matches!(p.check(&Call::ArchiveRead { source: "x" }), Err(Denial::Denied(_))));
        assert!(matches!(p.check(&Call::ParamGet { name: "path" }), Err(Denial::Denied(_))));
    }

    #[test]
    fn undeclared_params_are_denied() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(&[dir.path()], dir.path());
        assert_eq!(p.check(&Call::ParamGet { name: "path" }), Ok(Grant::Param));
        assert!(p.check(&Call::ParamGet { name: "other" }).is_err());
    }

    #[test]
    fn store_destinations() {
        assert_eq!(store_path("a/b.tgz").unwrap(), Path::new("a/b.tgz"));
        assert_eq!(store_path("./b.tgz").unwrap(), Path::new("b.tgz"));
        assert!(matches!(store_path("/tmp/x"), Err(Denial::Denied(_))));
        assert!(matches!(store_path("../x"), Err(Denial::Denied(_))));
        assert!(matches!(store_path("a\0b"), Err(Denial::InvalidArgument(_))));
        assert!(matches!(store_path("."), Err(Denial::InvalidArgument(_))));
        assert!(matches!(store_path(""), Err(Denial::InvalidArgument(_))));
        assert!(store_path(&format!("{}x", crate::store::TEMP_PREFIX)).is_err());
    }
}
