//! A restic repository as a site's store: `store = "restic:PATH"`.
//!
//! A run streams each output into the repository as it is written
//! (`outlet.rs`, `packer.rs`: chunked at restic's boundaries, compressed,
//! encrypted and packed; rustic_core opens, indexes, checks and prunes),
//! and its end saves **one snapshot** holding every output at the path
//! the script chose, plus the run's manifest at `.offsite/manifest.json`
//! (and its signature beside it). The snapshot is tagged `offsite`,
//! `site=NAME`, `run=ID` and `status=STATUS`.
//!
//! - A good run (ok, warning) and a partial one (its complete outputs)
//!   make a snapshot; `status=partial` marks the latter, and Offsite's
//!   retention and restore take only good ones.
//! - A failed or interrupted run makes none. What it packed is data that
//!   no snapshot references, which `restic check` accepts and a prune
//!   removes. The run's failure is in its log, its exit code, its
//!   notifications and its metrics, as for every store.
//!
//! restic's own tools read the repository as theirs: `restic snapshots`,
//! `restic dump`, `restic restore`, `restic check --read-data`. Locks are
//! restic's (`lock.rs`). The password comes from `[repository]
//! password_file` or `password_command`, or from `RESTIC_PASSWORD_FILE`,
//! and is never in argv or a log.

mod bucket;
mod chunker;
mod local;
mod lock;
mod outlet;
mod packer;
mod render;
mod tree_out;
mod trees;

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rustic_core::repofile::{MasterKey, Metadata, Node, NodeType, SnapshotFile, StringList};
use rustic_core::{
    ConfigOptions, Credentials, FileType, Id, IndexedFullStatus, KeyOptions, OpenStatus, Repository,
    RepositoryBackends, RepositoryOptions, RusticError, SnapshotOptions, TreeId, WriteBackend,
};

use super::backend::{Access, Backend, Fault, Held, LockFailure, Locked, OpenError, Unlisted};
use super::lock::Holder;
use super::run::{BadManifest, Outcome, RunHeader, Runs, manifest_for};
use super::{Budget, Manifest, Store, protect};
use crate::site::{PasswordFrom, RepoAt, RepoStore, Site};

use self::local::LocalRepo;
use self::lock::{Refused, RepoLock};
use self::outlet::{Archived, RepoOutlet, Target};
use self::packer::{Known, Sink};

/// Where a snapshot keeps the run's manifest.
pub const MANIFEST_PATH: &str = ".offsite/manifest.json";
/// The tag every snapshot Offsite makes carries.
pub const TAG: &str = "offsite";
/// Data packs of 4 MiB: rustic's default grows them toward 32 MiB, and
/// the packer's buffers with them (see docs/BENCHMARKS.md).
const PACK_SIZE: usize = 4 << 20;
/// How many of a site's last snapshots are looked at for the archives a
/// run's may take unchanged files from.
const PARENT_RUNS: usize = 10;
/// How long a `password_command` may take.
const PASSWORD_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a repository's files are (a directory, a bucket): rustic_core's
/// backend, and the few files it has no type for (locks).
pub(crate) trait Storage: WriteBackend + std::fmt::Debug {
    /// Whether a repository is there (its `config`).
    fn exists(&self) -> io::Result<bool>;
    /// Whether nothing at all is there.
    fn is_empty(&self) -> io::Result<bool>;
    /// The names of the files in `dir` (`locks`).
    fn names(&self, dir: &str) -> io::Result<Vec<String>>;
    /// A small file and when it was written; an empty one if it is
    /// larger than `max`; `None` if it is gone.
    #[allow(clippy::type_complexity)]
    fn read_small(
        &self,
        dir: &str,
        name: &str,
        max: u64,
    ) -> io::Result<Option<(Vec<u8>, Option<std::time::SystemTime>)>>;
    /// Writes a file whole (or not at all).
    fn write_whole(&self, dir: &str, name: &str, bytes: &[u8]) -> io::Result<()>;
    fn remove_file(&self, dir: &str, name: &str) -> io::Result<()>;
    /// For messages: `restic:WHERE`.
    fn shown(&self) -> String;
}

/// A rustic error as one line: its message with its context filled in,
/// then each of its causes the same way (rustic's own `Display` is a
/// page with a backtrace), bounded.
pub(crate) fn rustic_text(e: &RusticError) -> String {
    fn head(e: &RusticError) -> String {
        let log = e.display_log();
        let log = log.strip_prefix("Error: ").unwrap_or(&log);
        log.split(" (kind: related to").next().unwrap_or(log).to_string()
    }
    let mut text = head(e);
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let rustic = c.downcast_ref::<RusticError>().or_else(|| c.downcast_ref::<Box<RusticError>>().map(|b| &**b));
        let said = match rustic {
            Some(r) => head(r),
            None => c.to_string(),
        };
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = c.source();
    }
    let mut one = text.split(['\n', '\r']).map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    if one.len() > 600 {
        let cut = (0..=600).rev().find(|&i| one.is_char_boundary(i)).unwrap_or(0);
        one.truncate(cut);
        one.push('…');
    }
    one
}

/// A site's repository, opened with its password.
pub struct RepoRoot {
    storage: Arc<dyn Storage>,
    be: Arc<dyn WriteBackend>,
    backends: RepositoryBackends,
    key: MasterKey,
    signer: Option<ssh_key::PrivateKey>,
    /// The index, for reading files and manifests: read when first
    /// needed, and again after this process changed the repository.
    indexed: Mutex<Option<Arc<Repository<IndexedFullStatus>>>>,
    /// The run in progress: what its files made.
    run: Mutex<Option<RunState>>,
    /// The site whose run or command holds the lock, for its lock file.
    site: Mutex<Option<String>>,
}

impl RepoRoot {
    /// Opens the repository at `spec`; for a run (or a copy into a
    /// directory that is there), creates it first if there is none.
    pub fn open(
        spec: &RepoStore,
        access: Access,
        timeout: Duration,
        signer: Option<ssh_key::PrivateKey>,
    ) -> Result<RepoRoot, OpenError> {
        let shown = spec.display();
        let storage: Arc<dyn Storage> = match &spec.at {
            RepoAt::Dir(path) => {
                if access == Access::Copy && !path.is_dir() {
                    return Err(OpenError::new(
                        format!(
                            "{} does not exist (a disk not mounted?); a copy goes only into a directory that is \
                             there (mkdir -m 700 it once where the copy belongs)",
                            path.display()
                        ),
                        Fault::Config,
                    ));
                }
                Arc::new(LocalRepo::new(path))
            }
            RepoAt::S3(s3) => {
                let root = super::s3::S3Root::open(s3, timeout).map_err(OpenError::s3)?;
                root.probe().map_err(OpenError::s3)?;
                Arc::new(bucket::BucketRepo::new(Arc::clone(root.bucket())))
            }
        };
        let unreachable = |e: io::Error| OpenError::new(format!("cannot reach {shown}: {e}"), Fault::Outage);
        let exists = storage.exists().map_err(unreachable)?;
        if !exists {
            if access == Access::Existing {
                return Err(OpenError::new(
                    format!("{shown} holds no restic repository yet (the first run creates it)"),
                    Fault::Missing,
                ));
            }
            if !storage.is_empty().map_err(unreachable)? {
                return Err(OpenError::new(
                    format!(
                        "{shown} is neither a restic repository (it has no config file) nor empty; a repository \
                         store needs a place of its own"
                    ),
                    Fault::Config,
                ));
            }
        }
        let password = read_password(&spec.password).map_err(|e| OpenError::new(e, Fault::Config))?;
        let be: Arc<dyn WriteBackend> = Arc::clone(&storage) as Arc<dyn WriteBackend>;
        let backends = RepositoryBackends::new(Arc::clone(&be), None);
        let options = RepositoryOptions::default().no_cache(true);
        let fail = |what: &str, e: Box<RusticError>| {
            let fault = if e.is_incorrect_password() { Fault::Config } else { Fault::Outage };
            let why = if e.is_incorrect_password() {
                "the password does not open the restic repository (no key matches it)".to_string()
            } else {
                format!("cannot {what} the restic repository: {}", rustic_text(&e))
            };
            OpenError::new(why, fault)
        };
        let repo = Repository::new(&options, &backends).map_err(|e| fail("reach", e))?;
        let credentials = Credentials::password(&password);
        let repo = if exists {
            repo.open(&credentials).map_err(|e| fail("open", e))?
        } else {
            let config = ConfigOptions::default()
                .set_datapack_size(bytesize::ByteSize::b(PACK_SIZE as u64))
                .set_datapack_growfactor(0u32)
                .set_datapack_size_limit(bytesize::ByteSize::b(PACK_SIZE as u64));
            // The key first, then the config: a repository is never
            // there without a way in.
            let master = MasterKey::new();
            storage.create().map_err(|e| fail("create", e))?;
            write_key(&*storage, &password, &master)
                .map_err(|e| OpenError::new(format!("cannot write the repository's key: {e}"), Fault::Config))?;
            let repo = repo
                .init(&Credentials::Masterkey(master), &KeyOptions::default(), &config)
                .map_err(|e| fail("create", e))?;
            log::info!(target: "offsite::store", "created a restic repository at {shown}");
            repo
        };
        let key = repo.key();
        Ok(RepoRoot {
            storage,
            be,
            backends,
            key,
            signer,
            indexed: Mutex::new(None),
            run: Mutex::new(None),
            site: Mutex::new(None),
        })
    }

    /// The repository opened again with its master key (no key
    /// derivation): rustic_core's states are not shared, but made anew.
    fn fresh(&self) -> io::Result<Repository<OpenStatus>> {
        let options = RepositoryOptions::default().no_cache(true);
        Repository::new(&options, &self.backends)
            .and_then(|r| r.open(&Credentials::Masterkey(self.key.clone())))
            .map_err(|e| io::Error::other(rustic_text(&e)))
    }

    fn indexed(&self) -> io::Result<Arc<Repository<IndexedFullStatus>>> {
        let mut cached = self.indexed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(repo) = &*cached {
            return Ok(Arc::clone(repo));
        }
        let repo = self
            .fresh()?
            .to_indexed()
            .map_err(|e| io::Error::other(format!("cannot read the repository's index: {}", rustic_text(&e))))?;
        let repo = Arc::new(repo);
        *cached = Some(Arc::clone(&repo));
        Ok(repo)
    }

    /// The repository changed: the index is read again when next needed.
    fn forget_index(&self) {
        self.indexed.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// The snapshots Offsite made, oldest first.
    fn snapshots(&self) -> io::Result<Vec<SnapshotFile>> {
        let mut snaps: Vec<SnapshotFile> = self
            .fresh()?
            .get_all_snapshots()
            .map_err(|e| io::Error::other(rustic_text(&e)))?
            .into_iter()
            .filter(|s| s.tags.contains(TAG))
            .collect();
        snaps.sort_by(|a, b| a.time.cmp(&b.time));
        Ok(snaps)
    }

    /// For `offsite check --connect`: what the repository holds and who
    /// holds its locks, as lines of the report (text from lock files
    /// escaped).
    pub fn survey(&self, site: &str) -> io::Result<Vec<String>> {
        let all = self.fresh()?.get_all_snapshots().map_err(|e| io::Error::other(rustic_text(&e)))?;
        let site_tag = format!("site={}", tag_text(site));
        let ours: Vec<&SnapshotFile> =
            all.iter().filter(|s| s.tags.contains(TAG) && s.tags.contains(&site_tag)).collect();
        let mut lines = vec![format!(
            "connected: the password opens it; {} snapshot(s), {} of them this site's runs",
            all.len(),
            ours.len()
        )];
        if let Some(last) = ours.iter().max_by_key(|s| s.time.timestamp()) {
            // Tags are the repository's data, which others may write.
            let status = last.tags.iter().find_map(|t| t.strip_prefix("status=")).unwrap_or("?");
            lines.push(format!(
                "last run of this site: {} ({})",
                last.time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                crate::text::escape(status)
            ));
        }
        // Who holds a lock, in the words of the lock's own description
        // (escaped there); a stale one says what removes it.
        let found = lock::locks(&*self.storage, &self.key)?;
        lines.push(match (found.iter().find(|(_, l)| !l.is_stale()), found.iter().find(|(_, l)| l.is_stale())) {
            (Some((_, l)), _) => format!("locked: {}", l.describe()),
            (None, Some((_, l))) if l.offsite_run.is_some() => {
                format!("a stale lock (the next run removes it): {}", l.describe())
            }
            (None, Some((_, l))) => format!("a stale lock (`restic unlock` removes it): {}", l.describe()),
            (None, None) => "not locked: no run or restic command is using it".into(),
        });
        Ok(lines)
    }

    /// The whole of a small file in a snapshot (a manifest, a signature).
    fn read_small(&self, snap: &SnapshotFile, path: &str) -> io::Result<Vec<u8>> {
        let repo = self.indexed()?;
        let node = repo.node_from_snapshot_and_path(snap, path).map_err(|e| not_found(&e))?;
        if node.meta.size > 16 << 20 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{path} is too large for a manifest")));
        }
        let mut out = Vec::new();
        FileReader::new(repo, &node)?.read_to_end(&mut out)?;
        Ok(out)
    }

    fn manifest_of(&self, snap: &SnapshotFile) -> Result<Manifest, String> {
        let bytes = self.read_small(snap, MANIFEST_PATH).map_err(|e| e.to_string())?;
        manifest_from(snap, &bytes)
    }

    fn snapshot_of_run(&self, run_id: &str) -> io::Result<SnapshotFile> {
        let tag = format!("run={}", tag_text(run_id));
        self.snapshots()?
            .into_iter()
            .rev()
            .find(|s| s.tags.contains(&tag))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no snapshot of run {run_id}")))
    }

    /// The archives stored as trees in the site's last runs, by output
    /// name (time stamps set aside, see [`super::manifest::output_name`]):
    /// each the newest of its name among the last [`PARENT_RUNS`]
    /// snapshots. A run that cannot be read is passed over (an archive
    /// without a parent is read whole).
    fn parents(&self, site: &str) -> HashMap<String, TreeId> {
        let tag = format!("site={}", tag_text(site));
        let mut parents = HashMap::new();
        let snaps = match self.snapshots() {
            Ok(all) => all,
            Err(e) => {
                log::info!(target: "offsite::store", "the last runs cannot be listed ({e}); archives are read whole");
                return parents;
            }
        };
        for snap in snaps.iter().rev().filter(|s| s.tags.contains(&tag)).take(PARENT_RUNS) {
            // A site that signs takes files unread only from runs it
            // signed: a run someone else put into the repository never
            // gets its chunks into a manifest this key signs.
            let manifest = match &self.signer {
                Some(key) => self.signed_by(snap, key).and_then(|json| manifest_from(snap, &json)),
                None => self.manifest_of(snap),
            };
            let m = match manifest {
                Ok(m) => m,
                Err(e) => {
                    log::info!(target: "offsite::store", "snapshot {} is not taken as a parent: {e}", snap.id);
                    continue;
                }
            };
            for f in &m.files {
                if let Some(id) = f.tree.as_ref().and_then(|t| t.id.parse::<Id>().ok()) {
                    parents.entry(super::manifest::output_name(&f.path)).or_insert(TreeId::from(id));
                }
            }
        }
        parents
    }

    /// The manifest in `snap`, if it carries a good signature by `key`.
    fn signed_by(&self, snap: &SnapshotFile, key: &ssh_key::PrivateKey) -> Result<Vec<u8>, String> {
        let json = self.read_small(snap, MANIFEST_PATH).map_err(|e| e.to_string())?;
        let sig = self
            .read_small(snap, &format!("{MANIFEST_PATH}{}", protect::SIG_SUFFIX))
            .map_err(|_| "its manifest is not signed".to_string())?;
        protect::verify(key.public_key(), &json, &sig)?;
        Ok(json)
    }

    /// The run's end: the snapshot of `manifest`'s files, which the run
    /// stored, with the manifest (and its signature) beside them.
    fn save_snapshot(
        &self,
        header: &RunHeader,
        manifest: &Manifest,
        target: &Target,
        archived: &Archived,
    ) -> io::Result<()> {
        let json = manifest.to_json();
        let mut small = vec![(MANIFEST_PATH.to_string(), json.clone())];
        if let Some(key) = &self.signer {
            small.push((format!("{MANIFEST_PATH}{}", protect::SIG_SUFFIX), protect::sign(key, &json)?));
        }
        // The manifest and its signature share a pack and an index, which
        // is written before the snapshot names them.
        let mut session = packer::Session::new(Arc::clone(&target.known), &target.sink, 1)?;
        let mut stored = Vec::new();
        for (path, bytes) in small {
            let (content, n) = session.file(&mut &bytes[..])?;
            stored.push((path, content, n));
        }
        session.finish()?;
        archived.files.lock().unwrap_or_else(|e| e.into_inner()).extend(stored);
        let published: BTreeSet<&str> = manifest.published().map(|f| f.path.as_str()).collect();
        let now = jiff_now();
        let meta = Metadata {
            mode: Some(0o600),
            mtime: Some(now),
            uid: Some(rustix::process::getuid().as_raw()),
            gid: Some(rustix::process::getgid().as_raw()),
            ..Default::default()
        };
        let mut root = trees::Dir::default();
        for (path, content, bytes) in archived.files.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if !path.starts_with(".offsite/") && !published.contains(path.as_str()) {
                continue;
            }
            let file = Path::new(path);
            let name = file.file_name().ok_or_else(|| io::Error::other("a file without a name"))?;
            let mut node = Node::new_node(name, NodeType::File, Metadata { size: *bytes, ..meta.clone() });
            node.content = Some(content.clone());
            root.insert(file, node).map_err(io::Error::other)?;
        }
        // Archives stored as trees: a directory of that name.
        for (path, id) in archived.trees.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if !published.contains(path.as_str()) {
                continue;
            }
            let file = Path::new(path);
            let name = file.file_name().ok_or_else(|| io::Error::other("an archive without a name"))?;
            let mut node = Node::new_node(name, NodeType::Dir, Metadata { mode: Some(0o700), ..meta.clone() });
            node.subtree = Some(*id);
            root.insert(file, node).map_err(io::Error::other)?;
        }
        let mut pack = trees::TreePack::new();
        let root_id = pack.add_dir(root, &meta).map_err(io::Error::other)?;
        pack.save(&*self.be, &self.key)?;
        let mut snap = SnapshotOptions::default()
            .host(header.hostname.clone())
            .to_snapshot()
            .map_err(|e| io::Error::other(rustic_text(&e)))?;
        snap.tree = root_id;
        snap.paths = StringList::default();
        snap.paths.add(header.site.clone());
        for tag in [
            TAG.to_string(),
            format!("site={}", tag_text(&header.site)),
            format!("run={}", tag_text(&header.run_id)),
            format!("status={}", manifest.status.as_str()),
        ] {
            snap.tags.add(tag);
        }
        if let Ok(started) = header.started.parse::<rustic_core::jiff::Timestamp>() {
            snap.time = started.to_zoned(rustic_core::jiff::tz::TimeZone::system());
        }
        let saved = self.fresh()?.save_snapshots(vec![snap]).map_err(|e| io::Error::other(rustic_text(&e)));
        self.forget_index();
        saved
    }
}

/// The manifest `bytes` of `snap`, which must name the run its tags name.
fn manifest_from(snap: &SnapshotFile, bytes: &[u8]) -> Result<Manifest, String> {
    let mut m: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if !snap.tags.contains(&format!("run={}", tag_text(&m.run.run_id))) {
        return Err(format!("its manifest names run {}, which its tags do not", m.run.run_id));
    }
    m.snapshot = Some(snap.id.to_hex().as_str().to_string());
    Ok(m)
}

fn jiff_now() -> rustic_core::jiff::Timestamp {
    rustic_core::jiff::Timestamp::now()
}

/// A tag holds no comma (restic splits tag lists on it).
fn tag_text(s: &str) -> String {
    s.replace(',', "_")
}

fn not_found(e: &RusticError) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, rustic_text(e))
}

/// A file of a snapshot, read in pieces as it is asked for.
struct FileReader {
    repo: Arc<Repository<IndexedFullStatus>>,
    file: rustic_core::vfs::OpenFile,
    size: u64,
    at: u64,
    piece: Bytes,
}

impl FileReader {
    fn new(repo: Arc<Repository<IndexedFullStatus>>, node: &rustic_core::repofile::Node) -> io::Result<Self> {
        let file = repo.open_file(node).map_err(|e| io::Error::other(rustic_text(&e)))?;
        Ok(FileReader { repo, file, size: node.meta.size, at: 0, piece: Bytes::new() })
    }
}

impl Read for FileReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.piece.is_empty() {
            if self.at >= self.size {
                return Ok(0);
            }
            let want = (self.size - self.at).min(1 << 20) as usize;
            self.piece = self
                .repo
                .read_file_at(&self.file, self.at as usize, want)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, rustic_text(&e)))?;
            if self.piece.is_empty() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file's content ends before its size"));
            }
        }
        let n = out.len().min(self.piece.len());
        out[..n].copy_from_slice(&self.piece[..n]);
        self.piece = self.piece.slice(n..);
        self.at += n as u64;
        Ok(n)
    }
}

/// Writes a key file for `master`, opened by `password`. rustic_core's
/// own key derives with scrypt N = 2^17 (128 MiB each time the repository
/// is opened); restic's take N = 2^15, r = 8 and a p it calibrates (32
/// MiB), and so does this one (p = 8).
fn write_key(storage: &dyn Storage, password: &str, master: &MasterKey) -> io::Result<()> {
    use rustic_core::repofile::KeyFile;
    let mut salt = vec![0u8; 64];
    getrandom::fill(&mut salt).map_err(|e| io::Error::other(format!("no random salt: {e}")))?;
    let mut file = KeyFile {
        hostname: Some(super::run::hostname()),
        username: std::env::var("USER").ok(),
        created: Some(rustic_core::jiff::Zoned::now()),
        kdf: "scrypt".into(),
        n: 1 << 15,
        r: 8,
        p: 8,
        data: Vec::new(),
        salt,
    };
    let (encrypt, k, r) = file.kdf_key(&password).map_err(|e| io::Error::other(rustic_text(&e)))?.to_keys();
    let wrapping = [encrypt, k, r].concat();
    file.data = lock::seal(&wrapping, &serde_json::to_vec(master).map_err(io::Error::other)?)?;
    let json = serde_json::to_vec(&file).map_err(io::Error::other)?;
    let id = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&json));
    storage.write_whole("keys", &id, &json)
}

/// What a dry run checks of the password: that its file is there and
/// only its owner's (a `password_command` is not run).
pub fn probe_password(from: &PasswordFrom) -> Result<(), String> {
    match from {
        PasswordFrom::Command(_) => Ok(()),
        PasswordFrom::File(_) | PasswordFrom::EnvFile => read_password(from).map(drop),
    }
}

/// Reads the repository's password from where the site says.
fn read_password(from: &PasswordFrom) -> Result<String, String> {
    let from_file = |path: &Path, what: &str| -> Result<String, String> {
        if let Err(crate::transport::TransportError::Config { detail, .. }) =
            crate::transport::check_key_file("repository", path)
        {
            return Err(detail.replace("identity file", what).replace("private key", what));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
        Ok(text.trim().to_string())
    };
    let password = match from {
        PasswordFrom::File(path) => from_file(path, "the repository's password file")?,
        PasswordFrom::EnvFile => match std::env::var_os("RESTIC_PASSWORD_FILE") {
            Some(path) => from_file(Path::new(&path), "RESTIC_PASSWORD_FILE")?,
            None => {
                return Err("no password for the restic repository: set [repository] password_file or \
                            password_command in the site file, or RESTIC_PASSWORD_FILE"
                    .into());
            }
        },
        PasswordFrom::Command(command) => run_password_command(command)?,
    };
    if password.is_empty() {
        return Err("the restic repository's password is empty".into());
    }
    Ok(password)
}

/// `sh -c COMMAND`, its output the password; bounded in time and size.
fn run_password_command(command: &str) -> Result<String, String> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the repository's password_command: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stdout).take(64 << 10).read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stderr).take(4 << 10).read_to_end(&mut buf);
        buf
    });
    let deadline = std::time::Instant::now() + PASSWORD_COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the repository's password_command did not finish within {}s",
                    PASSWORD_COMMAND_TIMEOUT.as_secs()
                ));
            }
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        let said = crate::text::escape(err.trim());
        return Err(format!("the repository's password_command failed ({status}): {said}"));
    }
    String::from_utf8(out)
        .map(|s| s.trim().to_string())
        .map_err(|_| "the repository's password_command printed something that is not UTF-8".into())
}

/// A run in progress: its repository (with the index as the run began)
/// and what its files made.
type RunState = (Target, Arc<Archived>);

/// The lock a run or command holds.
struct HeldLock(RepoLock);

impl Held for HeldLock {
    fn confirm(&self) -> Result<(), String> {
        self.0.confirm()
    }
    fn release(self: Box<Self>) -> Result<(), String> {
        self.0.release()
    }
}

fn unsupported(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, format!("{what} does not work on a restic repository store yet"))
}

impl Backend for RepoRoot {
    /// `rel` is where [`Manifest::location`] puts a file of a repository's
    /// run: `@SNAPSHOT/PATH`.
    fn open_file(&self, rel: &Path) -> io::Result<(u64, Box<dyn Read + '_>)> {
        let mut parts = rel.iter();
        let snap_id = parts
            .next()
            .and_then(|p| p.to_str())
            .and_then(|p| p.strip_prefix('@'))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not a file of a snapshot"))?;
        let path: PathBuf = parts.collect();
        let repo = self.indexed()?;
        let snap = repo.get_snapshot_from_str(snap_id, |_| true).map_err(|e| not_found(&e))?;
        let node = repo.node_from_snapshot_and_path(&snap, &path.to_string_lossy()).map_err(|e| not_found(&e))?;
        if node.node_type == NodeType::Dir {
            // An archive stored as a tree: the tar, checked against the
            // run's manifest as it is read.
            let m = self.manifest_of(&snap).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let entry = m.files.iter().find(|f| Path::new(&f.path) == path);
            let Some((entry, tree)) = entry.and_then(|f| Some((f, f.tree.as_ref()?))) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a directory the run's manifest does not record as an archive",
                ));
            };
            let root = tree
                .id
                .parse::<rustic_core::Id>()
                .map(TreeId::from)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, rustic_text(&e)))?;
            if node.subtree != Some(root) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the snapshot's tree is not the one its manifest records",
                ));
            }
            let tar = render::TreeTar::new(repo, root, &tree.members, entry.bytes)?;
            return Ok((entry.bytes, Box::new(tar)));
        }
        if node.node_type != NodeType::File {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file"));
        }
        let size = node.meta.size;
        Ok((size, Box::new(FileReader::new(repo, &node)?)))
    }

    fn manifests(&self) -> io::Result<(Vec<Manifest>, Vec<BadManifest>)> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for snap in self.snapshots()? {
            match self.manifest_of(&snap) {
                Ok(m) => good.push(m),
                Err(error) => bad.push(BadManifest { name: format!("snapshot {}", snap.id.to_hex().as_str()), error }),
            }
        }
        Ok((good, bad))
    }

    fn last_good(&self, runs: &Runs) -> io::Result<Option<Manifest>> {
        for snap in self.snapshots()?.iter().rev() {
            if let Ok(m) = self.manifest_of(snap)
                && runs.includes(&m)
                && m.status.is_good()
            {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    fn manifest_bytes(&self, run_id: &str) -> io::Result<(Vec<u8>, Option<Vec<u8>>)> {
        let snap = self.snapshot_of_run(run_id)?;
        let json = self.read_small(&snap, MANIFEST_PATH)?;
        let sig = self.read_small(&snap, &format!("{MANIFEST_PATH}{}", protect::SIG_SUFFIX)).ok();
        Ok((json, sig))
    }

    fn signed_runs(&self) -> io::Result<BTreeSet<String>> {
        let mut runs = BTreeSet::new();
        for snap in self.snapshots()? {
            if let Ok(m) = self.manifest_of(&snap)
                && self.read_small(&snap, &format!("{MANIFEST_PATH}{}", protect::SIG_SUFFIX)).is_ok()
            {
                runs.insert(m.run.run_id);
            }
        }
        Ok(runs)
    }

    fn rewrite_manifest(&self, _: &Manifest) -> io::Result<()> {
        Err(unsupported("recording a failed copy in a run's manifest"))
    }

    fn runs_of(&self, site: &str) -> Runs {
        Runs::Named(site.to_string())
    }

    fn holders(&self) -> (Option<Holder>, Option<Holder>) {
        let Ok(found) = lock::locks(&*self.storage, &self.key) else { return (None, None) };
        let holder = |l: &lock::LockFile| Holder {
            pid: u32::try_from(l.pid).unwrap_or(0),
            hostname: l.hostname.clone(),
            started: l.time.clone(),
            site: l.offsite_site.clone().unwrap_or_default(),
            run_id: l.offsite_run.clone().unwrap_or_else(|| "restic".into()),
        };
        let live = found.iter().find(|(_, l)| !l.is_stale()).map(|(_, l)| holder(l));
        let dead = found.iter().find(|(_, l)| l.is_stale()).map(|(_, l)| holder(l));
        (live, dead)
    }

    /// restic's structure check, as `restic check` does it without
    /// `--read-data`: every pack the index names is there with its size,
    /// every snapshot's trees are readable, every blob they name is in
    /// the index. (The outputs' bytes are read and hashed by `verify`
    /// itself, run by run.) Data no snapshot references is a note: a
    /// prune removes it.
    fn unlisted(&self, _: &dyn Fn(&Path) -> bool) -> io::Result<Unlisted> {
        let results = self
            .fresh()?
            .check(rustic_core::CheckOptions::default())
            .map_err(|e| io::Error::other(format!("the repository's check failed: {}", rustic_text(&e))))?;
        let mut found = Unlisted::default();
        for (level, finding) in &results.0 {
            let line = format!("{}: {}", self.storage.shown(), crate::text::escape(&finding.to_string()));
            // The level's type is not exported: its name says which.
            if format!("{level:?}") == "Error" {
                found.problems.push(line);
            } else {
                found.notes.push(line);
            }
        }
        found.notes.push(format!(
            "{}: the repository's structure was checked (packs, index, trees), as restic check does",
            self.storage.shown()
        ));
        Ok(found)
    }

    fn can_forget(&self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "forget works on a store in a directory; in a restic repository, `restic check` finds lost data and \
             `restic forget SNAPSHOT` removes a run",
        ))
    }

    fn forget(&self, _: &str) -> io::Result<Vec<String>> {
        self.can_forget().map(|()| Vec::new())
    }

    fn resume_prune(&self) -> io::Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Forgets the snapshots of the runs `verdicts` prune, then prunes
    /// the data no snapshot references any more (repacking packs that are
    /// partly unused), all under an exclusive restic lock: no restic and
    /// no other Offsite process works on the repository meanwhile (this
    /// process's own run, whose retention this may be, excepted).
    fn prune(&self, verdicts: &[super::retention::Verdict]) -> io::Result<Vec<String>> {
        let gone: Vec<_> = verdicts.iter().filter(|v| !v.keep()).collect();
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        let site = self.site.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let run = format!("prune-{}", super::run::new_run_id(chrono::Local::now()));
        let lock = match RepoLock::take(&self.storage, &self.key, true, &run, site.as_deref()) {
            Ok(lock) => lock,
            Err(Refused::Busy(who)) => return Err(io::Error::other(format!("the repository is in use: {who}"))),
            Err(Refused::Failed(e)) => return Err(e),
        };
        let snaps = self.snapshots()?;
        let mut lines = Vec::new();
        for v in gone {
            let tag = format!("run={}", tag_text(&v.run_id));
            for snap in snaps.iter().filter(|s| s.tags.contains(&tag)) {
                let id = snap.id.into_inner();
                self.be.remove(FileType::Snapshot, &id, true).map_err(|e| io::Error::other(rustic_text(&e)))?;
            }
            lines.push(format!("pruned run {} ({})", v.run_id, v.pruned_because.as_deref().unwrap_or_default()));
        }
        self.forget_index();
        let repo = self.fresh()?;
        let options = rustic_core::PruneOptions::default()
            .instant_delete(true)
            .max_unused(rustic_core::LimitOption::Percentage(0))
            .max_repack(rustic_core::LimitOption::Unlimited);
        let plan = repo.prune_plan(&options).map_err(|e| io::Error::other(rustic_text(&e)))?;
        let (unused, repack) = (plan.stats.packs.unused, plan.stats.packs.repack);
        lock.confirm().map_err(io::Error::other)?;
        let pruned = repo.prune(&options, plan).map_err(|e| io::Error::other(rustic_text(&e)));
        self.forget_index();
        pruned?;
        lines.push(format!("pruned the repository: {unused} pack(s) removed, {repack} repacked"));
        lock.release().map_err(io::Error::other)?;
        Ok(lines)
    }

    fn lock(&self, header: &RunHeader) -> Result<Locked, LockFailure> {
        let exclusive = ["prune-", "forget-"].iter().any(|p| header.run_id.starts_with(p));
        let site = (!header.site.is_empty()).then_some(header.site.as_str());
        match RepoLock::take(&self.storage, &self.key, exclusive, &header.run_id, site) {
            Ok(lock) => {
                *self.site.lock().unwrap_or_else(|e| e.into_inner()) = site.map(str::to_string);
                Ok(Locked { lock: Box::new(HeldLock(lock)), took_over: None })
            }
            Err(Refused::Busy(who)) => Err(LockFailure::Busy(format!("the restic repository is locked: {who}"))),
            Err(Refused::Failed(e)) => Err(LockFailure::Failed(OpenError::new(
                format!("{}: cannot lock the restic repository: {e}", self.storage.shown()),
                Fault::Outage,
            ))),
        }
    }

    /// Nothing to finish: an interrupted run left at most data that no
    /// snapshot references, which a prune removes.
    fn recover(&self) -> io::Result<Vec<String>> {
        Ok(Vec::new())
    }

    fn claim_for_run(&self, _: &Site) {}

    fn begin_run(
        &self,
        header: &RunHeader,
        budget: Budget,
        recipients: Vec<age::x25519::Recipient>,
    ) -> io::Result<Store> {
        if !recipients.is_empty() {
            return Err(io::Error::other("a restic repository encrypts with its own key; age recipients do not apply"));
        }
        // The index as the run begins, fresh: what its files need not
        // store again.
        self.forget_index();
        let repo = self.indexed()?;
        let level = repo.config().zstd().map_err(|e| io::Error::other(rustic_text(&e)))?;
        let parents = self.parents(&header.site);
        let known = Arc::new(Known::new(repo));
        let sink = Sink { be: Arc::clone(&self.be), key: self.key.clone(), level, pack_size: PACK_SIZE };
        let target = Target { known, sink };
        let archived = Arc::new(Archived::default());
        *self.run.lock().unwrap_or_else(|e| e.into_inner()) = Some((target.clone(), Arc::clone(&archived)));
        Ok(Store::new(&header.run_id, Box::new(RepoOutlet { target, archived, parents }), budget, Vec::new(), None))
    }

    fn finish_run(
        &self,
        header: &RunHeader,
        store: &Store,
        outcome: &Outcome,
        lock: &dyn Held,
    ) -> io::Result<Manifest> {
        let ended = chrono::Local::now().to_rfc3339();
        let manifest = manifest_for(header, store.stored(), outcome, &ended);
        let Some((target, archived)) = self.run.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Err(io::Error::other("the run was not begun in this repository"));
        };
        if !manifest.status.publishes() {
            return Ok(manifest);
        }
        lock.confirm().map_err(io::Error::other)?;
        self.save_snapshot(header, &manifest, &target, &archived)?;
        Ok(manifest)
    }

    fn abandon_run(&self, store: Store) -> io::Result<()> {
        drop(store);
        self.run.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok(())
    }

    fn left_behind(&self, _: &str) -> String {
        "no snapshot was made; what it packed is data no snapshot references, which a prune removes".into()
    }
}
