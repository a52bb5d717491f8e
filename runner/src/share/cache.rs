//! The local script store: components by SHA-256, their signatures, and
//! what each registry manifest resolved to.
//!
//! ```text
//! ROOT/blobs/sha256/HEX                 a component, checked against HEX on every load
//! ROOT/sigs/sha256/HEX/SIGHEX.sig       signatures found for it (armored SSHSIG)
//! ROOT/manifests/sha256/MHEX.json       a registry manifest: its component, where it came from
//! ```
//!
//! It is data, not a cache that may be cleared: a pinned script that is
//! here runs with the registry down. So it lives under `/var/lib/offsite`
//! for root and `~/.local/share/offsite` otherwise. Everything is written
//! to a temporary name, synced and renamed (concurrent pulls of one digest
//! each write their own and the last rename wins with the same bytes);
//! directories are 0700 and files 0600. An entry whose bytes do not hash to
//! its name is removed and refused, never run.

use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

/// Largest component stored or loaded.
pub const MAX_SCRIPT_BYTES: u64 = 64 * 1024 * 1024;

/// What a registry manifest resolved to when it was pulled.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ManifestRecord {
    /// The manifest's SHA-256.
    pub manifest: String,
    /// The component's SHA-256 (the one layer).
    pub component: String,
    pub size: u64,
    /// The reference it was pulled or pushed by, `oci://...:TAG@sha256:...`.
    pub reference: String,
    /// When (RFC 3339).
    pub fetched: String,
    /// The script's name and version, from the manifest's annotations.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub version: String,
}

/// A script store rooted at a directory.
#[derive(Debug, Clone)]
pub struct ScriptCache {
    pub root: PathBuf,
}

/// Why a component could not be loaded from the store.
#[derive(Debug)]
pub enum LoadError {
    Missing,
    /// It was there but wrong; it has been removed.
    Corrupt(String),
    Io(io::Error),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Missing => write!(f, "not in the local script store"),
            LoadError::Corrupt(why) => write!(f, "the stored copy was corrupt ({why}) and has been removed"),
            LoadError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl ScriptCache {
    /// `$OFFSITE_SCRIPTS_DIR`, else `/var/lib/offsite/scripts` for root,
    /// else `$XDG_DATA_HOME/offsite/scripts` or `~/.local/share/offsite/scripts`.
    pub fn default_root() -> Result<PathBuf> {
        if let Some(d) = std::env::var_os("OFFSITE_SCRIPTS_DIR").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(d));
        }
        if rustix::process::geteuid().is_root() {
            return Ok(PathBuf::from("/var/lib/offsite/scripts"));
        }
        if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(d).join("offsite/scripts"));
        }
        let home = crate::home::home_dir().context(
            "no place for the script store: set OFFSITE_SCRIPTS_DIR (or HOME) so pulled scripts can be kept",
        )?;
        Ok(home.join(".local/share/offsite/scripts"))
    }

    pub fn open_default() -> Result<ScriptCache> {
        Ok(ScriptCache { root: ScriptCache::default_root()? })
    }

    pub fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex)
    }

    fn sig_dir(&self, hex: &str) -> PathBuf {
        self.root.join("sigs/sha256").join(hex)
    }

    fn manifest_path(&self, manifest_hex: &str) -> PathBuf {
        self.root.join("manifests/sha256").join(format!("{manifest_hex}.json"))
    }

    /// Whether the component `hex` is stored (not checked; see `load`).
    pub fn has(&self, hex: &str) -> bool {
        std::fs::symlink_metadata(self.blob_path(hex)).is_ok_and(|m| m.is_file())
    }

    /// The component `hex`, checked: a regular file of ours that only we
    /// can write, at most [`MAX_SCRIPT_BYTES`], whose SHA-256 is `hex`.
    /// A wrong one is removed.
    pub fn load(&self, hex: &str) -> Result<Vec<u8>, LoadError> {
        check_hex(hex).map_err(|e| LoadError::Corrupt(e.to_string()))?;
        let path = self.blob_path(hex);
        let bytes = match read_ours(&path, MAX_SCRIPT_BYTES) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(LoadError::Missing),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied || e.kind() == io::ErrorKind::InvalidData => {
                return Err(LoadError::Corrupt(e.to_string()));
            }
            Err(e) => return Err(LoadError::Io(e)),
        };
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != hex {
            let _ = std::fs::remove_file(&path);
            return Err(LoadError::Corrupt(format!("its bytes hash to {actual}")));
        }
        Ok(bytes)
    }

    /// Stores a component read from `from`, which must hash to `hex` and be
    /// at most `max` bytes; nothing is left behind when it does not.
    /// Memory stays flat: the bytes go to a temporary file as they come.
    pub fn store_from(&self, hex: &str, from: &mut dyn Read, max: u64) -> Result<u64> {
        check_hex(hex)?;
        let mut w = self.writer(hex)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).context("reading the component")?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n], max)?;
        }
        w.finish()
    }

    /// A writer for the component `hex`, for bytes that arrive in pieces.
    pub fn writer(&self, hex: &str) -> Result<BlobWriter> {
        check_hex(hex)?;
        let dir = self.root.join("blobs/sha256");
        make_private_dirs(&dir)?;
        let temp = dir.join(format!(".tmp.{}.{}", std::process::id(), unique()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .with_context(|| format!("cannot write into the script store {}", self.root.display()))?;
        Ok(BlobWriter {
            file: Some(file),
            temp,
            target: self.blob_path(hex),
            hex: hex.to_string(),
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// Stores bytes already in memory (a local file being pushed or signed).
    pub fn store_bytes(&self, bytes: &[u8]) -> Result<String> {
        let hex = hex::encode(Sha256::digest(bytes));
        let mut w = self.writer(&hex)?;
        w.write(bytes, MAX_SCRIPT_BYTES)?;
        w.finish()?;
        Ok(hex)
    }

    /// Adds a signature of `hex` (kept under its own hash, so adding the
    /// same one twice is a no-op).
    pub fn add_signature(&self, hex: &str, armored: &[u8]) -> Result<()> {
        check_hex(hex)?;
        if armored.len() as u64 > super::signing::MAX_SIGNATURE {
            bail!("a signature of {} bytes is over the limit", armored.len());
        }
        let dir = self.sig_dir(hex);
        make_private_dirs(&dir)?;
        let name = format!("{}.sig", hex::encode(Sha256::digest(armored)));
        write_private(&dir, &name, armored)
    }

    /// The signatures stored for `hex`.
    pub fn signatures(&self, hex: &str) -> Result<Vec<Vec<u8>>> {
        check_hex(hex)?;
        let dir = self.sig_dir(hex);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|x| x == "sig")
                && let Ok(bytes) = read_ours(&path, super::signing::MAX_SIGNATURE)
            {
                out.push(bytes);
            }
        }
        Ok(out)
    }

    pub fn record_manifest(&self, record: &ManifestRecord) -> Result<()> {
        check_hex(&record.manifest)?;
        let dir = self.root.join("manifests/sha256");
        make_private_dirs(&dir)?;
        write_private(&dir, &format!("{}.json", record.manifest), &serde_json::to_vec_pretty(record)?)
    }

    /// What the manifest `manifest_hex` resolved to, if it was pulled here.
    pub fn manifest(&self, manifest_hex: &str) -> Option<ManifestRecord> {
        check_hex(manifest_hex).ok()?;
        let bytes = read_ours(&self.manifest_path(manifest_hex), 64 * 1024).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Every manifest record, newest fetch first.
    pub fn manifests(&self) -> Vec<ManifestRecord> {
        let mut out: Vec<ManifestRecord> = std::fs::read_dir(self.root.join("manifests/sha256"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                self.manifest(name.strip_suffix(".json")?)
            })
            .collect();
        out.sort_by(|a, b| b.fetched.cmp(&a.fetched));
        out
    }

    /// Every stored component: (sha256, size).
    pub fn blobs(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = std::fs::read_dir(self.root.join("blobs/sha256"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                check_hex(&name).ok()?;
                Some((name, e.metadata().ok()?.len()))
            })
            .collect();
        out.sort();
        out
    }
}

/// A component being written into the store.
pub struct BlobWriter {
    file: Option<std::fs::File>,
    temp: PathBuf,
    target: PathBuf,
    hex: String,
    hasher: Sha256,
    written: u64,
}

impl BlobWriter {
    pub fn write(&mut self, bytes: &[u8], max: u64) -> Result<()> {
        self.written += bytes.len() as u64;
        if self.written > max {
            bail!("the component is over the limit of {max} bytes");
        }
        self.hasher.update(bytes);
        self.file.as_mut().expect("open until finished").write_all(bytes).context("writing into the script store")
    }

    /// Checks the digest, syncs and renames into place.
    pub fn finish(mut self) -> Result<u64> {
        let actual = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if actual != self.hex {
            bail!("the bytes received hash to sha256:{actual}, not sha256:{}: refused, nothing was stored", self.hex);
        }
        let file = self.file.take().expect("open until finished");
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.temp, &self.target)?;
        sync_parent(&self.target)?;
        Ok(self.written)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() || self.temp.exists() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

pub fn check_hex(hex: &str) -> Result<()> {
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(anyhow!("{:?} is not a SHA-256 (64 lowercase hex digits)", crate::text::truncate(hex, 80)))
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (N.fetch_add(1, Ordering::Relaxed) << 48)
}

/// Creates `dir` and its missing parents 0700, and refuses a directory on
/// the way that someone else owns or others can write.
fn make_private_dirs(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the script store directory {}", dir.display()))?;
    let meta = std::fs::metadata(dir)?;
    let uid = rustix::process::geteuid().as_raw();
    if meta.uid() != uid || meta.mode() & 0o022 != 0 {
        bail!(
            "the script store directory {} is owned by uid {} with mode {:o}: others could put code in it",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let temp = dir.join(format!(".tmp.{}.{}", std::process::id(), unique()));
    let result = (|| -> io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&temp, dir.join(name))?;
        sync_parent(&dir.join(name))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.with_context(|| format!("cannot write {}", dir.join(name).display()))
}

fn sync_parent(path: &Path) -> io::Result<()> {
    std::fs::File::open(path.parent().expect("a file in a directory"))?.sync_all()
}

/// Reads a regular file that we own and only we can write, without
/// following a link, at most `max` bytes.
fn read_ours(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
    let meta = f.metadata()?;
    let uid = rustix::process::geteuid().as_raw();
    if !meta.is_file() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not a regular file of ours that only we can write",
        ));
    }
    if meta.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} bytes, over the limit of {max}", meta.len()),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "it grew over the limit while being read"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_checked_on_every_load_and_a_corrupt_one_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ScriptCache { root: dir.path().join("scripts") };
        let hex = cache.store_bytes(b"\0asm one").unwrap();
        assert_eq!(cache.load(&hex).unwrap(), b"\0asm one");
        let mode = std::fs::metadata(cache.blob_path(&hex)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::metadata(&cache.root).unwrap().mode() & 0o777, 0o700);
        std::fs::write(cache.blob_path(&hex), b"\0asm two").unwrap();
        assert!(matches!(cache.load(&hex), Err(LoadError::Corrupt(_))));
        assert!(!cache.has(&hex), "removed, so the next pull replaces it");
        assert!(matches!(cache.load(&hex), Err(LoadError::Missing)));
    }

    #[test]
    fn bytes_that_do_not_match_or_are_too_many_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ScriptCache { root: dir.path().join("scripts") };
        let claimed = hex::encode(Sha256::digest(b"the real one"));
        let e = cache.store_from(&claimed, &mut &b"a forgery"[..], 1024).unwrap_err();
        assert!(e.to_string().contains("hash to"), "{e}");
        let e = cache.store_from(&claimed, &mut &[0u8; 4096][..], 100).unwrap_err();
        assert!(e.to_string().contains("over the limit"), "{e}");
        let left: Vec<_> = std::fs::read_dir(cache.root.join("blobs/sha256")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
