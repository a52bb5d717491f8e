//! From a site's `script` to the bytes that run: a local file (with
//! `FILE.sig` beside it), or a registry reference resolved through the
//! site's lock file and the local script store. A pinned script that is
//! stored never touches the network. When the site names `script_signers`,
//! the bytes must carry a signature by a listed key.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use super::cache::{LoadError, MAX_SCRIPT_BYTES, ScriptCache};
use super::lockfile;
use super::reference::{OciRef, ScriptSource};
use super::registry::Registry;
use super::signing::{AllowedSigners, MAX_SIGNATURE, Signer};
use crate::site::Site;

/// A script ready to compile, and where it came from.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub bytes: Vec<u8>,
    /// A path for messages: the file, or the stored component.
    pub path: PathBuf,
    /// The site's reference pinned to what ran (`oci://...@sha256:...`),
    /// or the file's path.
    pub source: String,
    /// Signatures found for these bytes.
    pub signatures: Vec<Vec<u8>>,
}

impl Fetched {
    /// `REGISTRY/REPOSITORY` for a script from a registry (what its
    /// signatures must name); `None` for a local file.
    pub fn repository(&self) -> Option<String> {
        self.source.parse::<OciRef>().ok().map(|r| r.repository_path())
    }
}

/// Loads the script `source` for `site` (see the module docs).
pub fn fetch(source: &ScriptSource, site: &Site) -> Result<Fetched> {
    match source {
        ScriptSource::Path(path) => fetch_file(path),
        ScriptSource::Oci(r) => fetch_oci(r, site),
    }
}

/// A local file and its `FILE.sig`.
pub fn fetch_file(path: &Path) -> Result<Fetched> {
    let bytes =
        read_bounded(path, MAX_SCRIPT_BYTES).with_context(|| format!("cannot read script {}", path.display()))?;
    let sig_path = sig_path(path);
    let signatures = match read_bounded(&sig_path, MAX_SIGNATURE) {
        Ok(s) => vec![s],
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) => {
            Vec::new()
        }
        Err(e) => return Err(e.context(format!("cannot read the signature {}", sig_path.display()))),
    };
    Ok(Fetched { bytes, path: path.to_path_buf(), source: path.display().to_string(), signatures })
}

/// `FILE.wasm.sig`, as `ssh-keygen -Y sign` names it.
pub fn sig_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// Which manifest a registry reference means for `site`: its own digest,
/// the site's lock, or (following) the tag now.
fn fetch_oci(r: &OciRef, site: &Site) -> Result<Fetched> {
    let cache = ScriptCache::open_default()?;
    if let Some(d) = &r.digest {
        return from_store_or_pull(&cache, &r.pinned(d));
    }
    let lock = match &site.file {
        Some(file) => lockfile::read(file)?,
        None => None,
    };
    match lock {
        Some(lock) if lock.reference == r.to_string() => from_store_or_pull(&cache, &r.pinned(lock.manifest_hex())),
        Some(lock) => bail!(
            "{} records {} but the site's script is {r}: run `offsite script update {}`",
            lockfile::path_for(site.file.as_deref().unwrap_or(Path::new("SITE"))).display(),
            lock.reference,
            site.file.as_deref().unwrap_or(Path::new("SITE")).display()
        ),
        None if site.script_follow => follow(&cache, r),
        None => bail!(
            "the script {r} is a tag with no recorded digest, and a tag can move to code nobody reviewed: run \
             `offsite script update {}` to pin it (or set script_update = \"follow\")",
            site.file.as_deref().map_or("SITE.toml".into(), |f| f.display().to_string())
        ),
    }
}

/// A followed tag: what it points to now; with the registry unreachable,
/// the newest version of it pulled before (said in a warning: once while
/// the registry stays down, so a watcher polling every few seconds does not
/// repeat it, and again when it is back).
fn follow(cache: &ScriptCache, r: &OciRef) -> Result<Fetched> {
    static DOWN: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let resolved = Registry::connect(&r.registry).and_then(|reg| reg.resolve(r));
    let down = || DOWN.lock().unwrap_or_else(|e| e.into_inner());
    match resolved {
        Ok(hex) => {
            if down().remove(&r.to_string()) {
                log::info!(target: "offsite::script", "the registry is reachable again: following {r}");
            }
            from_store_or_pull(cache, &r.pinned(&hex))
        }
        Err(e) => {
            let prefix = format!("{r}@");
            let known = cache.manifests().into_iter().find(|m| m.reference.starts_with(&prefix));
            match known {
                Some(m) => {
                    let first = down().insert(r.to_string());
                    let level = if first { log::Level::Warn } else { log::Level::Debug };
                    log::log!(
                        target: "offsite::script",
                        level,
                        "cannot reach the registry to follow {r} ({e:#}); running the version pulled {}, \
                         sha256:{}",
                        m.fetched,
                        m.manifest
                    );
                    from_store_or_pull(cache, &r.pinned(&m.manifest))
                }
                None => Err(e.context(format!("cannot follow {r}, and no version of it was pulled before"))),
            }
        }
    }
}

/// The component of the manifest `r` pins, from the store, pulled first
/// when it is not there (or was corrupt).
pub fn from_store_or_pull(cache: &ScriptCache, r: &OciRef) -> Result<Fetched> {
    let manifest = r.digest.as_deref().expect("pinned");
    if let Some(record) = cache.manifest(manifest) {
        match cache.load(&record.component) {
            Ok(bytes) => return Ok(fetched(cache, r, &record.component, bytes)),
            Err(LoadError::Missing) => {}
            Err(LoadError::Corrupt(why)) => log::warn!(
                target: "offsite::script",
                "the stored copy of {r} was corrupt ({why}); it was removed and is pulled again"
            ),
            Err(LoadError::Io(e)) => return Err(anyhow!("cannot read the stored copy of {r}: {e}")),
        }
    }
    let pulled = Registry::connect(&r.registry).and_then(|reg| reg.pull(cache, r)).with_context(|| {
        format!("{r} is not in the local script store ({}) and cannot be pulled", cache.root.display())
    })?;
    let bytes = cache.load(&pulled.record.component).map_err(|e| anyhow!("{r}: {e}"))?;
    Ok(fetched(cache, r, &pulled.record.component, bytes))
}

fn fetched(cache: &ScriptCache, r: &OciRef, component: &str, bytes: Vec<u8>) -> Fetched {
    let signatures = cache.signatures(component).unwrap_or_default();
    Fetched { bytes, path: cache.blob_path(component), source: r.to_string(), signatures }
}

/// A signature that passed a site's `script_signers`, and whose it is.
#[derive(Debug, Clone)]
pub struct Verified {
    pub signer: Signer,
    pub signature: Vec<u8>,
}

/// The signer of `fetched` under the site's `script_signers`: `None` when
/// the site does not check; an error (naming what was found and the file
/// consulted) when it checks and no signature passes.
///
/// A stored registry script whose stored signatures do not pass is not
/// refused on them alone: a signature may have been added to the registry
/// since it was pulled, so the registry is asked for its signatures first
/// (only on this path: a script that passes never touches the network).
pub fn check_signer(fetched: &Fetched, signers: Option<&Path>) -> Result<Option<Verified>> {
    let Some(file) = signers else { return Ok(None) };
    let allowed = AllowedSigners::load(file)?;
    let verify = |signatures: &[Vec<u8>]| {
        allowed
            .verify_script(&fetched.bytes, fetched.repository().as_deref(), signatures)
            .map(|(signer, i, _)| Verified { signer, signature: signatures[i].clone() })
    };
    let why = match verify(&fetched.signatures) {
        Ok(verified) => return Ok(Some(verified)),
        Err(why) => why,
    };
    let Some(r) = fetched.source.parse::<OciRef>().ok().filter(|r| r.digest.is_some()) else {
        bail!("refusing to run {}: {why}", fetched.source);
    };
    let refreshed =
        ScriptCache::open_default().and_then(|cache| Registry::connect(&r.registry)?.refresh_signatures(&cache, &r));
    match refreshed {
        Ok(signatures) => match verify(&signatures) {
            Ok(verified) => {
                log::info!(target: "offsite::script", "{}: a signature added since it was pulled passes", fetched.source);
                Ok(Some(verified))
            }
            Err(why) => bail!("refusing to run {}: {why} (signatures asked of the registry again)", fetched.source),
        },
        Err(e) => bail!(
            "refusing to run {}: {why} (the registry could not be asked for newer signatures: {e:#})",
            fetched.source
        ),
    }
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    f.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        bail!("{} is over the limit of {max} bytes", path.display());
    }
    Ok(bytes)
}
