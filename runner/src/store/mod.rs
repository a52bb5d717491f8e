//! The backup store: the one directory a site's scripts write into.
//!
//! Layout (`META_DIR` is `.offsite`):
//!
//! ```text
//! STORE/
//!   <the files of good runs, at the paths the scripts chose>
//!   .offsite/lock                  one run at a time (see `lock`)
//!   .offsite/manifests/<run>.json  one per finished run, written last
//!   .offsite/runs/<run>/           files of a run in progress, or kept
//!                                  from a run that did not succeed
//!   .offsite/runs/<run>.journal    the files a run has completed so far
//!   .offsite/partial/<key>[.json]  large fetches, kept for the next run
//!                                  if this one does not finish them
//! ```
//!
//! A run writes each file under a temporary name inside its own staging
//! directory, syncs it and renames it there, then notes it in its journal.
//! Only when the whole run succeeds are its files renamed to the paths the
//! script chose, after which its manifest is installed (see `run`). So a
//! file of a failed or interrupted run never appears where a backup would,
//! and never replaces one.
//!
//! All access goes through `cap_std::fs::Dir` handles opened on the store,
//! so a symlink planted inside the store cannot redirect a write elsewhere.

#[cfg(feature = "runtime")]
pub mod backend;
#[cfg(feature = "runtime")]
mod dir;
mod durable;
pub mod lock;
pub mod manifest;
pub mod outlet;
pub mod outputs;
pub mod protect;
#[cfg(feature = "runtime")]
pub mod repo;
pub mod retention;
pub mod run;
#[cfg(feature = "runtime")]
pub mod s3;
pub mod tree;

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cap_std::fs::{Dir, DirBuilder, File, OpenOptions};
use sha2::{Digest, Sha256};

use self::outlet::{OutFile, Outlet, Unpublished};

#[cfg(feature = "runtime")]
pub use self::backend::Root;
pub use self::manifest::{Manifest, Origin, Status};
pub use self::run::StoreRoot;

/// Prefix of in-progress files. Scripts may not name files with it.
pub const TEMP_PREFIX: &str = ".offsite-tmp.";

/// The runner's own directory at the store root. Scripts may not write
/// beneath it.
pub const META_DIR: &str = ".offsite";

/// Where one run writes: its staging directory inside the store, the
/// journal of files it has completed, and its budget.
pub struct Store {
    run_id: String,
    outlet: Box<dyn Outlet>,
    shared: Arc<RunShared>,
}

/// What every pending file of a run updates when it completes.
struct RunShared {
    budget: Budget,
    /// Encrypt every file to these (none: store plain files).
    recipients: Vec<age::x25519::Recipient>,
    /// The staging directory's journal (a store on this machine).
    journal: Mutex<Option<std::fs::File>>,
    /// Files kept but not yet visible (sealed uploads), for the run's
    /// end to publish or discard.
    unpublished: Mutex<Vec<Box<dyn Unpublished>>>,
    /// Paths created in this run (pending or stored): each at most once.
    claimed: Mutex<HashSet<PathBuf>>,
    /// Files completed, in order.
    stored: Mutex<Vec<StoredFile>>,
}

/// What one run may still write: files created and bytes stored, shared by
/// every pending file (and so by parallel transfers).
#[derive(Debug)]
pub struct Budget {
    max_bytes: u64,
    max_files: u64,
    bytes: AtomicU64,
    files: AtomicU64,
}

/// The error a [`Budget`] returns, inside an `io::Error`, so callers can
/// tell it from the file system's own quota errors.
#[derive(Debug)]
pub struct BudgetExceeded(pub String);

impl std::fmt::Display for BudgetExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BudgetExceeded {}

impl Budget {
    pub fn new(max_bytes: u64, max_files: u64) -> Budget {
        Budget { max_bytes, max_files, bytes: AtomicU64::new(0), files: AtomicU64::new(0) }
    }

    pub fn unlimited() -> Budget {
        Budget::new(u64::MAX, u64::MAX)
    }

    fn take_file(&self) -> io::Result<()> {
        if self.files.fetch_add(1, Ordering::Relaxed) >= self.max_files {
            return Err(io::Error::new(
                io::ErrorKind::QuotaExceeded,
                BudgetExceeded(format!("this run reached the site's max_files limit ({} files)", self.max_files)),
            ));
        }
        Ok(())
    }

    fn take_bytes(&self, n: u64) -> io::Result<()> {
        if self.bytes.fetch_add(n, Ordering::Relaxed).saturating_add(n) > self.max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::QuotaExceeded,
                BudgetExceeded(format!("this run reached the site's max_bytes limit ({} bytes)", self.max_bytes)),
            ));
        }
        Ok(())
    }
}

/// Opens (creating, mode 0700) the directory `rel` beneath `dir`.
pub(crate) fn make_dirs(dir: &Dir, rel: &Path) -> io::Result<Dir> {
    if rel.as_os_str().is_empty() {
        return dir.try_clone();
    }
    let mut builder = DirBuilder::new();
    builder.recursive(true);
    {
        use cap_std::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    dir.create_dir_with(rel, &builder)?;
    dir.open_dir(rel)
}

/// Creates `name` in `dir` for writing, mode 0600; it must not exist.
pub(crate) fn create_new(dir: &Dir, name: &str) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    {
        use cap_std::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    dir.open_with(name, &options)
}

/// A fresh temporary name for `final_name` in this process. It carries at
/// most the first 64 bytes of the final name (for a person looking at a
/// leftover), so any name that is legal in its directory (up to 255 bytes)
/// has a legal temporary name too.
pub(crate) fn temp_name(final_name: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let cut = (0..=final_name.len().min(64)).rev().find(|i| final_name.is_char_boundary(*i)).unwrap_or(0);
    format!("{TEMP_PREFIX}{}.{}.{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed), &final_name[..cut])
}

/// The files of `now` that shrank below `percent` of the newest published
/// copy of the same output (see [`manifest::output_name`]) among
/// `earlier` (a site's runs, oldest first): one line each, with both
/// sizes. Each output is compared with its own last good copy, so a dump
/// whose server was down for a week is compared with the dump of a week
/// ago, compared by the uncompressed size where the file is encrypted. A
/// dump that lost its tables still exits 0 with its trailer: this catches it.
pub fn shrunk(now: &[StoredFile], earlier: &[manifest::Manifest], percent: u32) -> Vec<String> {
    let size = |f: &StoredFile| f.plain.as_ref().map_or(f.bytes, |p| p.bytes);
    let mut wanted: std::collections::BTreeSet<String> = now.iter().map(StoredFile::output).collect();
    let mut before: std::collections::BTreeMap<String, (&StoredFile, &str)> = std::collections::BTreeMap::new();
    for m in earlier.iter().rev() {
        if wanted.is_empty() {
            break;
        }
        for f in m.published() {
            let name = f.output();
            if wanted.remove(&name) {
                before.insert(name, (f, &m.run.run_id));
            }
        }
    }
    let mut out = Vec::new();
    for f in now {
        if let Some((old, run)) = before.get(&f.output()) {
            let (was, is) = (size(old), size(f));
            if was > 0 && (is as u128) * 100 < (was as u128) * percent as u128 {
                out.push(format!(
                    "{} is {is} bytes, {}% of the {was} bytes of {} in run {run}, its last good copy; check that \
                     nothing was lost (threshold: [report] shrink_warning = \"{percent}%\")",
                    f.path,
                    (is as u128 * 100 / was as u128),
                    old.path,
                ));
            }
        }
    }
    out
}

/// Syncs the directory itself, so renames and removals in it are durable.
pub(crate) fn sync_dir(dir: &Dir) -> io::Result<()> {
    dir.open(".")?.sync_all()
}

/// Writes a small file whole: temporary name, fsync, rename, fsync of the
/// directory. Readers see the old content or the new, never a mix.
pub(crate) fn write_atomic(dir: &Dir, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_name(name);
    let result = (|| {
        let mut f = create_new(dir, &tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        dir.rename(&tmp, dir, name)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = dir.remove_file(&tmp);
    }
    result
}

impl Store {
    pub(crate) fn new(
        run_id: &str,
        outlet: Box<dyn Outlet>,
        budget: Budget,
        recipients: Vec<age::x25519::Recipient>,
        journal: Option<std::fs::File>,
    ) -> Store {
        Store {
            run_id: run_id.to_string(),
            outlet,
            shared: Arc::new(RunShared {
                budget,
                recipients,
                journal: Mutex::new(journal),
                unpublished: Mutex::new(Vec::new()),
                claimed: Mutex::new(Default::default()),
                stored: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The files kept but not yet visible (sealed uploads), for the run's
    /// end to publish, or to discard by dropping them.
    pub fn take_unpublished(&self) -> Vec<Box<dyn Unpublished>> {
        std::mem::take(&mut *self.shared.unpublished.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The files completed so far, in order.
    pub fn stored(&self) -> Vec<StoredFile> {
        self.shared.stored.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts writing `rel` (already validated by the policy) in this run's
    /// staging directory. A run may write each path once.
    pub fn create(&self, rel: &Path) -> io::Result<PendingFile> {
        let (claim, mut final_name) = self.claim(rel)?;
        if !self.shared.recipients.is_empty() {
            final_name.push_str(protect::AGE_SUFFIX);
        }
        let out = self.outlet.create(rel, &final_name)?;
        let file = HashingWriter::new(out);
        let writer = if self.shared.recipients.is_empty() {
            Sink::Plain(file)
        } else {
            let recipients = self.shared.recipients.iter().map(|r| r as &dyn age::Recipient);
            let encryptor = age::Encryptor::with_recipients(recipients).map_err(io::Error::other)?;
            Sink::Age(HashingWriter::new(encryptor.wrap_output(file)?))
        };
        Ok(PendingFile { final_name: final_name.into(), writer: Some(writer), claim, scratch: Vec::new(), asked: None })
    }

    /// Starts a file the script asked for gzipped. Returns whether the
    /// caller gzips it: not for a store that compresses what it stores (a
    /// restic repository), which gets the bytes as they are, under the
    /// name without its gzip suffix (`db.sql.gz` is `db.sql`, `www.tgz`
    /// is `www.tar`); the record keeps the name asked for.
    pub fn create_gzipped(&self, rel: &Path) -> io::Result<(PendingFile, bool)> {
        if !self.outlet.compresses() {
            return Ok((self.create(rel)?, true));
        }
        let asked = rel.to_string_lossy().into_owned();
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut pending = self.create(&rel.with_file_name(uncompressed_name(&name)))?;
        pending.asked = Some(asked);
        Ok((pending, false))
    }

    /// Starts an archive the script asked for as `rel` (a `.tgz`) as a
    /// tree of nodes, in a store that keeps trees (a restic repository):
    /// under the name without its gzip suffix, as [`create_gzipped`]
    /// names it. `None` where the store keeps only files.
    ///
    /// [`create_gzipped`]: Store::create_gzipped
    pub fn create_tree(&self, rel: &Path) -> io::Result<Option<PendingTree>> {
        if !self.shared.recipients.is_empty() || !self.outlet.keeps_trees() {
            return Ok(None);
        }
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let plain = rel.with_file_name(uncompressed_name(&name));
        let (claim, final_name) = self.claim(&plain)?;
        let Some(out) = self.outlet.create_tree(&plain, &final_name)? else { return Ok(None) };
        let asked = (plain != rel).then(|| rel.to_string_lossy().into_owned());
        Ok(Some(PendingTree { out: Some(out), claim, final_name, asked, members: Vec::new() }))
    }

    /// Claims `rel` for this run (each path once) and one file of the
    /// budget; returns the claim and the file's name.
    fn claim(&self, rel: &Path) -> io::Result<(Claim, String)> {
        let file_name =
            rel.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "destination names no file"))?;
        if !self.shared.claimed.lock().unwrap_or_else(|e| e.into_inner()).insert(rel.to_path_buf()) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} was already written in this run; a run writes each file once", rel.display()),
            ));
        }
        let claim = Claim { shared: Arc::clone(&self.shared), rel: rel.to_path_buf() };
        self.shared.budget.take_file()?;
        Ok((claim, file_name.to_string_lossy().into_owned()))
    }

    /// Like [`create`](Self::create), for a copy of the remote file `of`
    /// that a later run may go on from if this one does not finish it
    /// (see [`outlet::Partial`]). Returns how many of its bytes an
    /// earlier run left, already counted and hashed: the caller copies
    /// on from there. `None` for an encrypted site, or a store that keeps
    /// no partial files: nothing outlives a failure.
    pub fn create_resumable(&self, rel: &Path, of: &outlet::RemoteFile) -> io::Result<(PendingFile, Option<u64>)> {
        if !self.shared.recipients.is_empty() {
            // Its bytes would wait unencrypted.
            return Ok((self.create(rel)?, None));
        }
        let (claim, final_name) = self.claim(rel)?;
        let Some(resumed) = self.outlet.create_resumable(rel, &final_name, of)? else {
            let out = self.outlet.create(rel, &final_name)?;
            let writer = Sink::Plain(HashingWriter::new(out));
            return Ok((
                PendingFile {
                    final_name: final_name.into(),
                    writer: Some(writer),
                    claim,
                    scratch: Vec::new(),
                    asked: None,
                },
                None,
            ));
        };
        // The bytes kept are hashed once, read back, not fetched again.
        self.shared.budget.take_bytes(resumed.bytes)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < resumed.bytes {
            let want = buf.len().min((resumed.bytes - at) as usize);
            let n = std::os::unix::fs::FileExt::read_at(&resumed.prefix, &mut buf[..want], at)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "a partial file is shorter than its note"));
            }
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        let file = HashingWriter { inner: resumed.out, hasher, bytes: resumed.bytes };
        let pending = PendingFile {
            final_name: final_name.into(),
            writer: Some(Sink::Plain(file)),
            claim,
            scratch: Vec::new(),
            asked: None,
        };
        Ok((pending, Some(resumed.bytes)))
    }
}

/// A gzip file's name without its gzip suffix: what it holds.
pub fn uncompressed_name(name: &str) -> String {
    for (suffix, instead) in [(".tar.gz", ".tar"), (".tgz", ".tar"), (".gz", "")] {
        if let Some(stem) = name.strip_suffix(suffix).filter(|s| !s.is_empty()) {
            return format!("{stem}{instead}");
        }
    }
    name.to_string()
}

/// A path claimed by a pending file; released if the file is abandoned.
struct Claim {
    shared: Arc<RunShared>,
    rel: PathBuf,
}

/// A file being written into the store. Dropping it without [`commit`]
/// removes the temporary file, so a failed call leaves nothing behind.
///
/// [`commit`]: PendingFile::commit
pub struct PendingFile {
    final_name: PathBuf,
    writer: Option<Sink>,
    claim: Claim,
    /// Where [`PendingFile::spare`] puts bytes that go through age.
    scratch: Vec<u8>,
    /// See [`StoredFile::asked`].
    asked: Option<String>,
}

/// A file whose every byte was written: its stored size and hash, and the
/// plaintext's if encrypted.
struct Written {
    out: Box<dyn OutFile>,
    bytes: u64,
    sha256: String,
    plain: Option<Plain>,
}

/// Where a pending file's bytes go: straight to the file, or through age.
/// Either way the stored bytes are counted and hashed; through age the
/// plaintext is too.
enum Sink {
    Plain(HashingWriter<Box<dyn OutFile>>),
    Age(HashingWriter<age::stream::StreamWriter<HashingWriter<Box<dyn OutFile>>>>),
}

impl Sink {
    /// The file, every byte written to it, with the stored size and hash,
    /// and the plaintext's if encrypted.
    fn finish(self) -> io::Result<Written> {
        let (file, plain) = match self {
            Sink::Plain(file) => (file, None),
            Sink::Age(plain) => {
                let (stream, bytes, sha256) = plain.finish();
                (stream.finish()?, Some(Plain { bytes, sha256 }))
            }
        };
        let (out, bytes, sha256) = file.finish();
        Ok(Written { out, bytes, sha256, plain })
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Age(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Age(w) => w.flush(),
        }
    }
}

/// What was stored, and what produced it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredFile {
    /// Relative to the store root: the path the script named, plus `.age`
    /// when the site encrypts.
    pub path: String,
    /// Size and SHA-256 of the stored bytes.
    pub bytes: u64,
    pub sha256: String,
    /// Size and SHA-256 before encryption, for an encrypted file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain: Option<Plain>,
    pub origin: Origin,
    /// The file of an earlier good run that this one replaced at the same
    /// path (a daily name run twice a day, a pinned `--now`): recorded, so
    /// the loss of the earlier file is never silent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<Replaced>,
    /// A partial run's file that was not published, because a file was
    /// already at its path (a partial run replaces nothing): it is in the
    /// run's `kept_in` directory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
    /// In a store that compresses what it stores (a restic repository):
    /// the name the script asked for, a gzip file, which is stored
    /// uncompressed at `path` instead (gzip it to have that file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked: Option<String>,
    /// An archive stored as a tree of nodes (see [`tree`]): its evidence.
    /// Its `sha256` is then empty, and `bytes` is the length of the tar
    /// that reading it gives back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<TreeRecord>,
}

/// See [`StoredFile::tree`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TreeRecord {
    /// The id of its root tree (the SHA-256 of that tree, which names
    /// everything beneath it by SHA-256).
    pub id: String,
    /// The tar's entries.
    pub entries: u64,
    /// The archive's sources, as their paths in the tar, in order.
    pub members: Vec<String>,
    /// Regular files that were not read: the site's last good run has
    /// the same file (size, times, inode), whose chunks it names again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unread: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl StoredFile {
    /// Its output name (see [`manifest::output_name`]), without the `.age`
    /// of an encrypted file.
    pub fn output(&self) -> String {
        manifest::output_name(self.plain_path())
    }

    /// Its path without the `.age` of an encrypted file: what decrypting
    /// gives back.
    pub fn plain_path(&self) -> &str {
        match &self.plain {
            Some(_) => self.path.strip_suffix(protect::AGE_SUFFIX).unwrap_or(&self.path),
            None => &self.path,
        }
    }
}

/// See [`StoredFile::replaces`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Replaced {
    pub run: String,
    pub sha256: String,
}

/// The plaintext of an encrypted file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Plain {
    pub bytes: u64,
    pub sha256: String,
}

impl PendingFile {
    /// Syncs the data, renames it into place in the staging directory,
    /// syncs the directory and notes the file in the run's journal. (An
    /// upload is sealed instead, and completed at the run's end.)
    pub fn commit(mut self, origin: Origin) -> io::Result<StoredFile> {
        let asked = self.asked.take();
        self.commit_as(|path, bytes, sha256, plain| {
            Ok(StoredFile { path, bytes, sha256, plain, origin, replaces: None, kept: false, asked, tree: None })
        })
    }

    /// Commits a copy of `original` (a file of another store of the
    /// site): the bytes written must be its bytes, by size and SHA-256, and
    /// the record keeps its plaintext's size and hash and its origin.
    pub fn commit_copy(self, original: &StoredFile) -> io::Result<StoredFile> {
        self.commit_as(|path, bytes, sha256, _| {
            // An archive stored as a tree has no stream hash: its reader
            // checked its blobs, and the copy is a tar file, with the hash
            // of its bytes as they were copied.
            if original.tree.is_some() && (path.as_str(), bytes) == (original.path.as_str(), original.bytes) {
                return Ok(StoredFile { sha256, tree: None, replaces: None, kept: false, ..original.clone() });
            }
            if (path.as_str(), bytes, sha256.as_str()) != (original.path.as_str(), original.bytes, original.sha256.as_str())
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{path}: read {bytes} bytes with sha256 {sha256}, but its manifest says {} bytes with sha256 {}",
                        original.bytes, original.sha256
                    ),
                ));
            }
            Ok(StoredFile { replaces: None, kept: false, ..original.clone() })
        })
    }

    /// Commits the plaintext of `original`, a gzip file of another store
    /// of the site, into a store that compresses what it stores (started by
    /// [`Store::create_gzipped`]): the gzip bytes read (`read`, `read_sha256`)
    /// must be `original`'s, and the record is the plaintext's, under the
    /// name without the gzip suffix, keeping the name asked for and the
    /// origin.
    pub fn commit_gunzipped_copy(
        mut self,
        original: &StoredFile,
        read: u64,
        read_sha256: &str,
    ) -> io::Result<StoredFile> {
        if (read, read_sha256) != (original.bytes, original.sha256.as_str()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: read {read} bytes with sha256 {read_sha256}, but its manifest says {} bytes with sha256 {}",
                    original.path, original.bytes, original.sha256
                ),
            ));
        }
        let asked = self.asked.take();
        self.commit_as(|path, bytes, sha256, plain| {
            Ok(StoredFile {
                path,
                bytes,
                sha256,
                plain,
                origin: original.origin.clone(),
                replaces: None,
                kept: false,
                asked,
                tree: None,
            })
        })
    }

    /// Finishes the bytes, lets `record` judge them (path, size, hash and
    /// plaintext) and make their record, then stores them.
    fn commit_as(
        mut self,
        record: impl FnOnce(String, u64, String, Option<Plain>) -> io::Result<StoredFile>,
    ) -> io::Result<StoredFile> {
        let writer = self.writer.take().expect("commit called once");
        let path = self.claim.rel.with_file_name(&self.final_name).to_string_lossy().into_owned();
        // Dropped on an error, the file leaves nothing (see `OutFile`).
        let Written { out, bytes, sha256, plain } = writer.finish()?;
        let stored = record(path, bytes, sha256, plain)?;
        let shared = Arc::clone(&self.claim.shared);
        if let Some(unpublished) = out.keep()? {
            shared.unpublished.lock().unwrap_or_else(|e| e.into_inner()).push(unpublished);
        }
        note_stored(&shared, &stored)?;
        // Stored: the claim stays.
        self.claim.rel = PathBuf::new();
        Ok(stored)
    }
}

/// An archive being stored as a tree (see [`tree`]). Dropped without
/// [`commit`](PendingTree::commit), it leaves nothing a reader sees.
pub struct PendingTree {
    out: Option<Box<dyn tree::TreeOut>>,
    claim: Claim,
    final_name: String,
    asked: Option<String>,
    members: Vec<String>,
}

impl PendingTree {
    /// See [`tree::TreeOut::member`].
    pub fn member(&mut self, member: &Path) -> io::Result<()> {
        self.members.push(member.to_string_lossy().into_owned());
        self.out.as_mut().expect("not committed").member(member)
    }

    /// See [`tree::TreeOut::add`]; a file's bytes count against the
    /// run's budget, read or not.
    pub fn add(&mut self, path: &Path, meta: &tree::EntryMeta, entry: tree::Entry<'_>) -> io::Result<()> {
        if matches!(entry, tree::Entry::File(_)) {
            self.claim.shared.budget.take_bytes(meta.size)?;
        }
        self.out.as_mut().expect("not committed").add(path, meta, entry)
    }

    /// Stores the tree and records it.
    pub fn commit(mut self, origin: Origin) -> io::Result<StoredFile> {
        let done = self.out.take().expect("committed once").finish()?;
        let stored = StoredFile {
            path: self.claim.rel.with_file_name(&self.final_name).to_string_lossy().into_owned(),
            bytes: done.bytes,
            sha256: String::new(),
            plain: None,
            origin,
            replaces: None,
            kept: false,
            asked: self.asked.take(),
            tree: Some(TreeRecord {
                id: done.id,
                entries: done.entries,
                members: std::mem::take(&mut self.members),
                unread: done.unread,
            }),
        };
        note_stored(&self.claim.shared, &stored)?;
        // Stored: the claim stays.
        self.claim.rel = PathBuf::new();
        Ok(stored)
    }
}

/// Notes a stored file in the run's journal and its list.
fn note_stored(shared: &RunShared, stored: &StoredFile) -> io::Result<()> {
    if let Some(journal) = shared.journal.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        let mut line = serde_json::to_vec(stored).expect("a stored file serialises");
        line.push(b'\n');
        journal.write_all(&line)?;
        journal.sync_data()?;
    }
    shared.stored.lock().unwrap_or_else(|e| e.into_inner()).push(stored.clone());
    Ok(())
}

impl PendingFile {
    /// Makes the bytes so far durable where a later run may go on from
    /// them (a file from [`Store::create_resumable`]); otherwise nothing.
    pub fn checkpoint(&mut self) -> io::Result<()> {
        match self.writer.as_mut().expect("not committed") {
            Sink::Plain(w) => w.inner.checkpoint(),
            Sink::Age(_) => Ok(()),
        }
    }

    /// Its bytes are of no use to a later run: dropped, it leaves none.
    pub fn discard_partial(&mut self) {
        if let Some(Sink::Plain(w)) = self.writer.as_mut() {
            w.inner.discard();
        }
    }

    /// Space to read the next bytes into, so they need not be copied
    /// again on their way to the file; [`filled`](Self::filled) takes
    /// the first `n`. Never empty.
    pub fn spare(&mut self) -> &mut [u8] {
        match self.writer.as_mut().expect("not committed") {
            Sink::Plain(w) => w.spare(),
            Sink::Age(_) => {
                if self.scratch.is_empty() {
                    self.scratch.resize(256 << 10, 0);
                }
                &mut self.scratch
            }
        }
    }

    /// Counts, hashes and writes the first `n` bytes of
    /// [`spare`](Self::spare), as `write_all` would.
    pub fn filled(&mut self, n: usize) -> io::Result<()> {
        self.claim.shared.budget.take_bytes(n as u64)?;
        match self.writer.as_mut().expect("not committed") {
            Sink::Plain(w) => w.filled(n),
            Sink::Age(w) => w.write_all(&self.scratch[..n]),
        }
    }
}

impl Write for PendingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.claim.shared.budget.take_bytes(buf.len() as u64)?;
        self.writer.as_mut().expect("not committed").write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.as_mut().expect("not committed").flush()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.rel.as_os_str().is_empty() {
            self.shared.claimed.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.rel);
        }
    }
}

/// Counts and hashes everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), bytes: 0 }
    }

    /// Returns the inner writer, the byte count and the lower-case hex SHA-256.
    pub fn finish(self) -> (W, u64, String) {
        (self.inner, self.bytes, hex::encode(self.hasher.finalize()))
    }
}

impl HashingWriter<Box<dyn OutFile>> {
    /// [`OutFile::spare`].
    fn spare(&mut self) -> &mut [u8] {
        self.inner.spare()
    }

    /// Counts and hashes the first `n` bytes of [`spare`](Self::spare),
    /// then hands them to the file, as `write` would.
    fn filled(&mut self, n: usize) -> io::Result<()> {
        self.hasher.update(&self.inner.spare()[..n]);
        self.bytes += n as u64;
        self.inner.filled(n)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::run::{Outcome, RunHeader};
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    fn header() -> RunHeader {
        RunHeader {
            run_id: "r".into(),
            site: "s".into(),
            hostname: "h".into(),
            pid: 1,
            script: manifest::ScriptRef {
                name: "t".into(),
                version: "1".into(),
                sha256: String::new(),
                ..Default::default()
            },
            grants_sha256: String::new(),
            started: "2026-11-26T23:00:00+00:00".into(),
        }
    }

    fn begin(root: &Path, budget: Budget) -> (StoreRoot, Store) {
        let store_root = StoreRoot::open(root).unwrap();
        let store = store_root.begin_run(&header(), budget).unwrap();
        (store_root, store)
    }

    fn origin() -> Origin {
        Origin { call: "test".into(), ..Default::default() }
    }

    #[test]
    fn commit_stages_the_file_with_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let (_root, store) = begin(dir.path(), Budget::unlimited());
        let staged = dir.path().join(".offsite/runs/r/sub");
        let mut f = store.create(Path::new("sub/a.txt")).unwrap();
        f.write_all(b"hello").unwrap();
        assert_eq!(names(&staged).len(), 1);
        assert!(!staged.join("a.txt").exists(), "invisible before commit");
        let stored = f.commit(origin()).unwrap();
        assert_eq!(stored.bytes, 5);
        assert_eq!(stored.sha256, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(std::fs::read(staged.join("a.txt")).unwrap(), b"hello");
        assert_eq!(names(&staged), vec!["a.txt"]);
        assert_eq!(store.stored(), vec![stored.clone()]);
        let journal = std::fs::read_to_string(dir.path().join(".offsite/runs/r.journal")).unwrap();
        assert_eq!(journal.lines().count(), 2, "a header and one file: {journal}");
        assert!(!dir.path().join("sub").exists(), "nothing at its path until the run ends");
    }

    /// A resumable copy left by a run that did not finish it: the next
    /// run with the same file goes on from its durable bytes (whole
    /// blocks), hashes them once, and stores the whole file; the copy of
    /// a changed file, or one discarded, is not used again.
    #[test]
    fn a_partial_copy_is_taken_up_by_the_next_run_only_for_the_same_file() {
        // Beside the test binary: the build's own disk (direct I/O), not a tmpfs.
        let exe = std::env::current_exe().unwrap();
        let dir = tempfile::tempdir_in(exe.parent().unwrap()).unwrap();
        let data: Vec<u8> = (0..(5u32 << 20) + 12345).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let of = outlet::RemoteFile {
            host: "db".into(),
            path: "/var/backups/db.sql".into(),
            identity: "2049 77 5255225 2026-12-05 10:00:00.000000000 +0000".into(),
            size: data.len() as u64,
        };
        let root = run::StoreRoot::open(dir.path()).unwrap();
        let run = |id: &str| {
            let mut h = header();
            h.run_id = id.into();
            root.begin_run(&h, Budget::unlimited()).unwrap()
        };
        let partial = dir.path().join(".offsite/partial");
        let data_files = || names(&partial).into_iter().filter(|n| !n.ends_with(".json")).collect::<Vec<_>>();

        // The first run writes 3.5 MiB, makes them durable, and fails.
        let store = run("r1");
        let (mut f, kept) = store.create_resumable(Path::new("a.sql"), &of).unwrap();
        assert_eq!(kept, Some(0));
        f.write_all(&data[..(7 << 19)]).unwrap();
        f.checkpoint().unwrap();
        drop(f);
        assert_eq!(data_files().len(), 1);

        // The next goes on from 3 MiB (whole blocks), under another name.
        let store = run("r2");
        let (mut f, kept) = store.create_resumable(Path::new("b.sql"), &of).unwrap();
        assert_eq!(kept, Some(3 << 20));
        f.write_all(&data[3 << 20..]).unwrap();
        let stored = f.commit(origin()).unwrap();
        assert_eq!(stored.bytes, data.len() as u64);
        assert_eq!(stored.sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(std::fs::read(dir.path().join(".offsite/runs/r2/b.sql")).unwrap(), data);
        assert!(data_files().is_empty(), "{:?}", data_files());

        // A second copy of the same file at once is a plain staged file:
        // the two never write into one partial file.
        let store = run("r2b");
        let (mut first, kept) = store.create_resumable(Path::new("x.sql"), &of).unwrap();
        assert_eq!(kept, Some(0));
        let (mut second, kept) = store.create_resumable(Path::new("y.sql"), &of).unwrap();
        assert_eq!(kept, None);
        first.write_all(&data).unwrap();
        second.write_all(&data[..(1 << 20)]).unwrap();
        drop(second);
        first.commit(origin()).unwrap();
        assert_eq!(std::fs::read(dir.path().join(".offsite/runs/r2b/x.sql")).unwrap(), data);
        let (again, kept) = store.create_resumable(Path::new("z.sql"), &of).unwrap();
        assert_eq!(kept, Some(0), "free again once the first is done");
        drop(again);

        // A copy of a file that changed since is not used; nor is one the
        // fetch discarded.
        let store = run("r3");
        let (mut f, _) = store.create_resumable(Path::new("c.sql"), &of).unwrap();
        f.write_all(&data[..(2 << 20)]).unwrap();
        drop(f);
        let changed = outlet::RemoteFile { identity: of.identity.replace("10:00", "10:01"), ..of.clone() };
        let store = run("r4");
        let (mut f, kept) = store.create_resumable(Path::new("d.sql"), &changed).unwrap();
        assert_eq!(kept, Some(0));
        f.write_all(&data[..(2 << 20)]).unwrap();
        f.discard_partial();
        drop(f);
        assert!(data_files().is_empty(), "{:?}", data_files());

        // An encrypting run keeps nothing unencrypted.
        let key = age::x25519::Identity::generate();
        let mut h = header();
        h.run_id = "r5".into();
        let store = root.begin_encrypted_run(&h, Budget::unlimited(), vec![key.to_public()]).unwrap();
        let (mut f, kept) = store.create_resumable(Path::new("e.sql"), &of).unwrap();
        assert_eq!(kept, None);
        f.write_all(&data[..(2 << 20)]).unwrap();
        drop(f);
        assert!(data_files().is_empty(), "{:?}", data_files());
    }

    #[test]
    fn a_run_writes_each_path_once_but_may_retry_an_abandoned_one() {
        let dir = tempfile::tempdir().unwrap();
        let (_root, store) = begin(dir.path(), Budget::unlimited());
        let first = store.create(Path::new("a")).unwrap();
        assert_eq!(store.create(Path::new("a")).err().unwrap().kind(), io::ErrorKind::AlreadyExists);
        drop(first);
        let mut again = store.create(Path::new("a")).unwrap();
        again.write_all(b"x").unwrap();
        again.commit(origin()).unwrap();
        assert_eq!(store.create(Path::new("a")).err().unwrap().kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn large_files_are_intact_whichever_way_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let (_root, store) = begin(dir.path(), Budget::unlimited());
        let mut f = store.create(Path::new("big.bin")).unwrap();
        let mut expected = Sha256::new();
        // 28 MiB in odd-sized pieces, through `write_all` and through
        // `spare`/`filled` in turn.
        let mut written = 0u64;
        let mut i = 0u32;
        while written < 28 << 20 {
            let chunk: Vec<u8> = (0..100_003u32).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect();
            if i.is_multiple_of(2) {
                f.write_all(&chunk).unwrap();
            } else {
                let mut rest = &chunk[..];
                while !rest.is_empty() {
                    let spare = f.spare();
                    let n = spare.len().min(rest.len());
                    spare[..n].copy_from_slice(&rest[..n]);
                    f.filled(n).unwrap();
                    rest = &rest[n..];
                }
            }
            expected.update(&chunk);
            written += chunk.len() as u64;
            i += 1;
        }
        let stored = f.commit(origin()).unwrap();
        assert_eq!(stored.bytes, written);
        assert_eq!(stored.sha256, hex::encode(expected.finalize()));
        let on_disk = std::fs::read(dir.path().join(".offsite/runs/r/big.bin")).unwrap();
        assert_eq!(on_disk.len() as u64, written);
        assert_eq!(hex::encode(Sha256::digest(&on_disk)), stored.sha256);
    }

    #[test]
    fn the_budget_caps_files_and_bytes_across_pending_files() {
        let dir = tempfile::tempdir().unwrap();
        let (root, store) = begin(dir.path(), Budget::new(10, 2));
        let mut a = store.create(Path::new("a")).unwrap();
        let mut b = store.create(Path::new("b")).unwrap();
        let err = store.create(Path::new("c")).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::QuotaExceeded);
        assert!(err.to_string().contains("max_files"), "{err}");
        a.write_all(b"123456").unwrap();
        let err = b.write_all(b"12345").unwrap_err();
        assert!(err.to_string().contains("max_bytes"), "{err}");
        drop(b);
        a.commit(origin()).unwrap();
        root.finish_run(&header(), &store, &Outcome::default()).unwrap();
        assert_eq!(names(dir.path()), vec![".offsite", "a"], "the over-budget file left nothing");
    }

    #[test]
    fn dropping_an_uncommitted_file_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.tgz"), "good").unwrap();
        let (root, store) = begin(dir.path(), Budget::unlimited());
        let mut f = store.create(Path::new("a.tgz")).unwrap();
        f.write_all(b"partial").unwrap();
        drop(f);
        let m = root.finish_run(&header(), &store, &Outcome { error: Some("x".into()), ..Outcome::default() }).unwrap();
        assert_eq!(m.status, Status::Failed);
        assert_eq!(names(dir.path()), vec![".offsite", "a.tgz"]);
        assert_eq!(names(&dir.path().join(".offsite/runs")), Vec::<String>::new());
        assert_eq!(std::fs::read(dir.path().join("a.tgz")).unwrap(), b"good");
    }

    #[test]
    fn a_planted_symlink_cannot_redirect_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let store_root = dir.path().join("store");
        let (root, store) = begin(&store_root, Budget::unlimited());
        // Planted where staging writes, and where installing writes.
        std::os::unix::fs::symlink(outside.path(), store_root.join(".offsite/runs/r/evil")).unwrap();
        assert!(store.create(Path::new("evil/x")).is_err());
        std::fs::remove_file(store_root.join(".offsite/runs/r/evil")).unwrap();
        std::os::unix::fs::symlink(outside.path(), store_root.join("evil")).unwrap();
        let mut f = store.create(Path::new("evil/x")).unwrap();
        f.write_all(b"x").unwrap();
        f.commit(origin()).unwrap();
        let m = root.finish_run(&header(), &store, &Outcome::default()).unwrap();
        assert_eq!(m.status, Status::Incomplete, "kept aside, not installed through the link");
        assert!(m.error.unwrap().contains("evil is not a directory"));
        assert!(names(outside.path()).is_empty());
    }
}
