//! A store on S3-compatible object storage, with a directory store's
//! guarantees. Object stores have no rename, so visibility is built from
//! what they do have: a multipart upload is invisible until completed, and
//! completing it replaces the object atomically.
//!
//! Layout under `s3://BUCKET/PREFIX`:
//!
//! ```text
//! <the files of good runs, at the paths the scripts chose>
//! .offsite/lock                      one run at a time, across machines
//! .offsite/clock/…                   the lock's probe of the server's clock
//! .offsite/sites                     several sites share this store
//! .offsite/manifests/<run>.json      one per finished run, written last
//! .offsite/runs/<run>.journal        a run in progress (its header)
//! .offsite/runs/<run>.manifest       a good run being published
//! ```
//!
//! A run uploads each output straight to its final key and seals it when
//! the output ends: every byte is on the server, nothing is visible. Only
//! when the whole run has succeeded, and the lock is confirmed still ours,
//! does the run write its manifest under `runs/` (the intent), complete
//! every upload (each object appears whole, replacing the old one at once),
//! and install the manifest. A failed run aborts its uploads: nothing of it
//! is ever visible, and no object is replaced or removed. A killed run
//! leaves invisible uploads, which the next run aborts, and a journal,
//! which it records as an interrupted run. A run killed while completing
//! leaves its intent: the next run checks which objects are this run's
//! (downloaded and hashed) and installs the manifest, or records the run
//! as incomplete.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::backend::{Backend, Held, LockFailure, Locked, OpenError, Unlisted};
use super::manifest::{Manifest, Status};
use super::outlet::{OutFile, Outlet, Unpublished};
use super::run::{BadManifest, Outcome, RunHeader, Runs, manifest_for};
use super::{Budget, Store, StoredFile, protect};
use crate::s3::credentials::{self, Env};
use crate::s3::lock::{self as s3lock, LockError, S3Lock};
use crate::s3::upload::{ObjectWriter, SealedUpload};
use crate::s3::{Bucket, Put, S3Error};
use crate::site::S3Store;
use crate::site::Site;

const MANIFESTS: &str = ".offsite/manifests";
const RUNS: &str = ".offsite/runs";
/// In `.offsite`: several sites write into this store (see `run::SITES_MARK`).
const SITES_MARK: &str = ".offsite/sites";

/// A site's S3 store, reached with the credentials the environment gives.
pub struct S3Root {
    bucket: Arc<Bucket>,
    spec: S3Store,
    signer: Option<ssh_key::PrivateKey>,
    /// Where the credentials came from, for messages.
    credentials: String,
    sites_shared: AtomicBool,
    /// Manifests fetched so far, by object name. A run reads the manifests
    /// several times (the shrink check, replacements, retention, copies),
    /// and a manifest changes only through the root that holds the lock,
    /// so each is fetched once; every read still lists the names, so
    /// manifests added or removed meanwhile are seen.
    fetched: Mutex<BTreeMap<String, Manifest>>,
}

impl S3Root {
    /// Resolves the credentials and prepares the client (nothing is sent
    /// yet). Every request is bounded by `timeout`.
    pub fn open(spec: &S3Store, timeout: Duration) -> Result<S3Root, S3Error> {
        let (creds, region) = credentials::resolve(spec.settings.profile.as_deref(), &Env::current())
            .map_err(|e| S3Error::Denied(format!("{}: {e}", spec.location)))?;
        let region = spec.settings.region.clone().or(region);
        let bucket = Bucket::open(&spec.location, &spec.settings, &creds, region.as_deref(), timeout)?;
        Ok(S3Root {
            bucket: Arc::new(bucket),
            spec: spec.clone(),
            signer: None,
            credentials: creds.source.clone(),
            sites_shared: AtomicBool::new(false),
            fetched: Mutex::default(),
        })
    }

    /// Signs every manifest written from now on with `key`.
    pub fn with_signer(mut self, key: Option<ssh_key::PrivateKey>) -> S3Root {
        self.signer = key;
        self
    }

    pub fn bucket(&self) -> &Arc<Bucket> {
        &self.bucket
    }

    /// Where the credentials came from ("environment", or a file and profile).
    pub fn credentials_source(&self) -> &str {
        &self.credentials
    }

    /// Whether the bucket answers to our credentials, and whether several
    /// sites share the store.
    pub fn probe(&self) -> Result<(), S3Error> {
        self.bucket.probe()?;
        let shared = self.bucket.head(SITES_MARK)?.is_some();
        self.sites_shared.store(shared, Ordering::Relaxed);
        Ok(())
    }

    /// Takes the store's lock for `header`'s run.
    pub fn lock(&self, header: &RunHeader) -> Result<S3Lock, LockError> {
        let holder = s3lock::Holder {
            site: header.site.clone(),
            host: header.hostname.clone(),
            pid: header.pid,
            started: header.started.clone(),
            run_id: header.run_id.clone(),
        };
        S3Lock::acquire(Arc::clone(&self.bucket), holder, self.spec.lock_stale)
    }

    /// Who holds the lock now, if anyone.
    pub fn holder(&self) -> Result<Option<s3lock::Holder>, S3Error> {
        s3lock::holder(&self.bucket)
    }

    /// The lock's holder, and whether it has stopped renewing it for
    /// longer than `[s3] lock_stale` (by this machine's clock: a hint for
    /// `status`; taking a lock over uses the server's).
    pub fn holder_state(&self) -> Result<Option<(super::lock::Holder, bool)>, S3Error> {
        let Some(h) = self.holder()? else { return Ok(None) };
        let quiet = self.bucket.head(s3lock::LOCK_KEY)?.map(|m| chrono::Utc::now() - m.modified);
        let stale = quiet.and_then(|q| q.to_std().ok()).is_some_and(|q| q > self.spec.lock_stale);
        let escape = |t: &str| crate::text::escape(t).into_owned();
        let holder = super::lock::Holder {
            pid: h.pid,
            hostname: escape(&h.host),
            started: escape(&h.started),
            site: escape(&h.site),
            run_id: escape(&h.run_id),
        };
        Ok(Some((holder, stale)))
    }

    /// Marks the store as one several sites write into.
    pub fn mark_sites_shared(&self) -> Result<(), S3Error> {
        if !self.sites_shared.load(Ordering::Relaxed) {
            let text = b"several sites write into this store; runs are told apart by site name\n".to_vec();
            self.bucket.put(SITES_MARK, text, Put::Overwrite)?;
            self.sites_shared.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Which runs in this store are `site`'s: all of them, unless several
    /// sites share it (as [`super::StoreRoot::runs_of`]).
    pub fn runs_of(&self, site: &str) -> Runs {
        if self.sites_shared.load(Ordering::Relaxed) { Runs::Named(site.to_string()) } else { Runs::All }
    }

    /// Finishes what interrupted runs left, under the lock: a run killed
    /// while publishing is installed (or recorded as incomplete), a run
    /// killed earlier is recorded as interrupted, and every incomplete
    /// upload beneath the prefix is aborted. One line per thing done.
    pub fn recover(&self) -> Result<Vec<String>, S3Error> {
        let mut done = Vec::new();
        let names: BTreeSet<String> = self
            .bucket
            .list(RUNS)?
            .into_iter()
            .filter_map(|m| m.rel.strip_prefix(&format!("{RUNS}/")).map(str::to_string))
            .collect();
        for name in &names {
            if let Some(run_id) = name.strip_suffix(".manifest") {
                done.push(self.finish_publishing(run_id)?);
            } else if let Some(run_id) = name.strip_suffix(".journal")
                && !names.contains(&format!("{run_id}.manifest"))
            {
                done.push(self.record_interrupted(run_id)?);
            }
        }
        let pending = self.bucket.pending_uploads("")?;
        for upload in &pending {
            self.bucket.abort_upload(&upload.rel, &upload.upload_id)?;
        }
        if !pending.is_empty() {
            let shown: Vec<String> = pending.iter().take(5).map(|u| crate::text::escape(&u.rel).into_owned()).collect();
            done.push(format!(
                "aborted {} incomplete upload(s) an interrupted run left ({}{})",
                pending.len(),
                shown.join(", "),
                if pending.len() > 5 { ", …" } else { "" }
            ));
        }
        Ok(done)
    }

    /// A run killed after it decided to publish: each of its files that is
    /// on the server with the recorded hash is its own; the manifest is
    /// installed with those.
    fn finish_publishing(&self, run_id: &str) -> Result<String, S3Error> {
        let staged = format!("{RUNS}/{run_id}.manifest");
        let Some((bytes, _)) = self.bucket.get(&staged)? else { return Ok(format!("run {run_id}: nothing to finish")) };
        let Some(mut manifest) = serde_json::from_slice::<Manifest>(&bytes).ok() else {
            return Err(S3Error::Other(format!(
                "{}: cannot be read as a manifest",
                self.bucket.location().key(&staged)
            )));
        };
        let total = manifest.files.len();
        let mut kept = Vec::new();
        for f in std::mem::take(&mut manifest.files) {
            if self.holds(&f)? {
                kept.push(f);
            }
        }
        let line = if kept.len() == total {
            format!("run {run_id} was interrupted while publishing its {total} file(s); it is now installed")
        } else {
            manifest.error = Some(format!(
                "interrupted while publishing: {} of its {total} file(s) never appeared",
                total - kept.len()
            ));
            manifest.status = if kept.is_empty() { Status::Failed } else { Status::Incomplete };
            format!(
                "run {run_id} was interrupted while publishing: recorded as {}, {} of {total} file(s) in place",
                manifest.status,
                kept.len()
            )
        };
        manifest.files = kept;
        self.install_manifest(&manifest)?;
        self.bucket.delete(&staged)?;
        self.bucket.delete(&format!("{staged}{}", protect::SIG_SUFFIX))?;
        self.bucket.delete(&format!("{RUNS}/{run_id}.journal"))?;
        Ok(line)
    }

    /// Whether the object at `f`'s path has `f`'s size and SHA-256.
    fn holds(&self, f: &StoredFile) -> Result<bool, S3Error> {
        let mut object = match self.bucket.reader(&f.path)? {
            Some(object) if object.size() == f.bytes => object,
            _ => return Ok(false),
        };
        let mut hasher = HashSink(Sha256::new());
        io::copy(&mut object, &mut hasher)?;
        Ok(hex::encode(hasher.0.finalize()) == f.sha256)
    }

    /// A run whose journal remains, with nothing published: killed or
    /// crashed before it finished. Its uploads are aborted by `recover`.
    fn record_interrupted(&self, run_id: &str) -> Result<String, S3Error> {
        let journal = format!("{RUNS}/{run_id}.journal");
        let header: Option<RunHeader> = self.bucket.get(&journal)?.and_then(|(b, _)| serde_json::from_slice(&b).ok());
        let now = chrono::Local::now().to_rfc3339();
        let header = header.unwrap_or_else(|| RunHeader::unknown(run_id, &now));
        let who = format!("pid {} on {}", header.pid, crate::text::escape(&header.hostname));
        let outcome = Outcome {
            error: Some(format!(
                "interrupted: the run ({who}, started {}) stopped before it finished; it was killed or crashed, \
                 and nothing of it was published",
                crate::text::escape(&header.started)
            )),
            ..Outcome::default()
        };
        let manifest = manifest_for(&header, Vec::new(), &outcome, &now);
        self.install_manifest(&manifest)?;
        self.bucket.delete(&journal)?;
        Ok(format!("run {run_id} ({who}) was interrupted before it published anything: recorded as failed"))
    }

    /// Starts a run: its journal (so a crash is recorded by the next run)
    /// and a store that uploads to final keys without publishing.
    pub fn begin_run(
        &self,
        header: &RunHeader,
        budget: Budget,
        recipients: Vec<age::x25519::Recipient>,
    ) -> Result<Store, S3Error> {
        let journal = serde_json::to_vec(header).expect("a header serialises");
        self.bucket.put(&format!("{RUNS}/{}.journal", header.run_id), journal, Put::Create)?;
        let outlet =
            Box::new(BucketOutlet { bucket: Arc::clone(&self.bucket), part_size: self.spec.part_size as usize });
        Ok(Store::new(&header.run_id, outlet, budget, recipients, None))
    }

    /// Ends a run. A good run is published (see the module documentation),
    /// provided `lock` is still ours; any other run's uploads are aborted
    /// and only its manifest is written.
    pub fn finish_run(
        &self,
        header: &RunHeader,
        store: &Store,
        outcome: &Outcome,
        lock: &dyn Held,
    ) -> Result<Manifest, S3Error> {
        let files = store.stored();
        let sealed = store.take_unpublished();
        let ended = chrono::Local::now().to_rfc3339();
        let mut manifest = manifest_for(header, files, outcome, &ended);
        let run_id = &header.run_id;
        let journal = format!("{RUNS}/{run_id}.journal");
        let mut sealed = sealed;
        if manifest.status == Status::Partial {
            // Each complete file is published unless an object is at its
            // path already: a partial run replaces nothing, and a bucket
            // keeps nothing unpublished, so that one is discarded.
            let mut taken = Vec::new();
            for f in &manifest.files {
                if self.bucket.head(&f.path)?.is_some() {
                    taken.push(f.path.clone());
                }
            }
            if !taken.is_empty() {
                sealed.retain(|u| !taken.iter().any(|t| t == u.rel()));
                manifest.files.retain(|f| !taken.contains(&f.path));
                let shown: Vec<String> = taken.iter().take(5).map(|t| crate::text::escape(t).into_owned()).collect();
                manifest.warnings.push(format!(
                    "{} complete file(s) of this partial run were discarded instead of replacing the object of the \
                     same name ({}{})",
                    taken.len(),
                    shown.join(", "),
                    if taken.len() > 5 { ", …" } else { "" }
                ));
            }
            if manifest.files.is_empty() {
                manifest.status = Status::Failed;
            }
        }
        if !manifest.status.publishes() {
            let discarded = sealed.len();
            drop(sealed);
            if discarded > 0 {
                manifest.warnings.push(format!(
                    "{discarded} complete file(s) of this run were discarded: an S3 store keeps nothing of a run \
                     that did not succeed"
                ));
            }
            manifest.files.clear();
            manifest.status = Status::Failed;
            self.install_manifest(&manifest)?;
            self.bucket.delete(&journal)?;
            return Ok(manifest);
        }
        if let Err(why) = lock.confirm() {
            return Err(S3Error::Other(format!("{why}; nothing of this run was published")));
        }
        self.note_replacements(&mut manifest)?;
        let json = manifest.to_json();
        let staged = format!("{RUNS}/{run_id}.manifest");
        self.bucket.put(&staged, json, Put::Overwrite)?;
        for upload in sealed {
            upload.publish().map_err(|e| S3Error::Other(e.to_string()))?;
        }
        self.install_manifest(&manifest)?;
        self.bucket.delete(&staged)?;
        self.bucket.delete(&journal)?;
        Ok(manifest)
    }

    /// Gives up a run without recording it: its uploads are aborted and
    /// its journal goes (a copy that failed, which the next run makes
    /// again).
    pub fn abandon_run(&self, store: Store) -> Result<(), S3Error> {
        drop(store.take_unpublished());
        self.bucket.delete(&format!("{RUNS}/{}.journal", store.run_id()))
    }

    /// Rewrites a recorded run's manifest (and its signature).
    pub fn rewrite_manifest(&self, manifest: &Manifest) -> Result<(), S3Error> {
        self.write_manifest(manifest, Put::Overwrite)
    }

    /// Notes a manifest as it is now in the bucket (see `fetched`).
    fn remember(&self, m: &Manifest) {
        let name = format!("{}.json", m.run.run_id);
        self.fetched.lock().unwrap_or_else(|e| e.into_inner()).insert(name, m.clone());
    }

    /// Writes a run's manifest (its signature first), once.
    fn install_manifest(&self, manifest: &Manifest) -> Result<(), S3Error> {
        match self.write_manifest(manifest, Put::Create) {
            // Installed before an interruption.
            Err(S3Error::Conflict(_)) => Ok(()),
            done => done,
        }
    }

    fn write_manifest(&self, manifest: &Manifest, mode: Put) -> Result<(), S3Error> {
        let json = manifest.to_json();
        let name = format!("{MANIFESTS}/{}.json", manifest.run.run_id);
        if let Some(key) = &self.signer {
            let sig = protect::sign(key, &json).map_err(|e| S3Error::Other(format!("signing the manifest: {e}")))?;
            self.bucket.put(&format!("{name}{}", protect::SIG_SUFFIX), sig, Put::Overwrite)?;
        }
        self.bucket.put(&name, json, mode)?;
        self.remember(manifest);
        Ok(())
    }

    /// For each file a good run is about to publish over an object an
    /// earlier good run stored at the same path, records which run's
    /// object it replaces.
    fn note_replacements(&self, manifest: &mut Manifest) -> Result<(), S3Error> {
        let mut taken = Vec::new();
        for (i, f) in manifest.files.iter().enumerate() {
            if self.bucket.head(&f.path)?.is_some() {
                taken.push(i);
            }
        }
        if taken.is_empty() {
            return Ok(());
        }
        let (all, _) = self.manifests()?;
        for i in taken {
            let path = manifest.files[i].path.clone();
            let previous = all
                .iter()
                .rev()
                .find_map(|m| m.published().find(|f| f.path == path).map(|f| (m.run.run_id.clone(), f.sha256.clone())));
            if let Some((run, sha256)) = previous {
                log::info!(target: "offsite::store", "{} replaces the object of the same name from run {run}", crate::text::escape(&path));
                manifest.files[i].replaces = Some(super::Replaced { run, sha256 });
            }
        }
        Ok(())
    }

    fn manifest_names(&self) -> Result<Vec<String>, S3Error> {
        let mut names: Vec<String> = self
            .bucket
            .list(MANIFESTS)?
            .into_iter()
            .filter_map(|m| m.rel.strip_prefix(&format!("{MANIFESTS}/")).map(str::to_string))
            .filter(|n| n.ends_with(".json") && !n.contains('/'))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every manifest, oldest run first, and the ones that cannot be read.
    pub fn manifests(&self) -> Result<(Vec<Manifest>, Vec<BadManifest>), S3Error> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for name in self.manifest_names()? {
            if let Some(m) = self.fetched.lock().unwrap_or_else(|e| e.into_inner()).get(&name) {
                good.push(m.clone());
                continue;
            }
            let parsed = match self.bucket.get(&format!("{MANIFESTS}/{name}"))? {
                Some((bytes, _)) => serde_json::from_slice::<Manifest>(&bytes).map_err(|e| e.to_string()),
                None => continue,
            };
            match parsed {
                Ok(m) if format!("{}.json", m.run.run_id) == name => {
                    self.remember(&m);
                    good.push(m)
                }
                Ok(m) => bad.push(BadManifest { name, error: format!("it names run {}", m.run.run_id) }),
                Err(error) => bad.push(BadManifest { name, error }),
            }
        }
        Ok((good, bad))
    }

    /// The newest good run of `runs`.
    pub fn last_good(&self, runs: &Runs) -> Result<Option<Manifest>, S3Error> {
        let (all, _) = self.manifests()?;
        Ok(all.into_iter().rev().find(|m| runs.includes(m) && m.status.is_good()))
    }

    /// The raw bytes of a manifest and of its signature, if it has one.
    pub fn manifest_bytes(&self, run_id: &str) -> Result<(Vec<u8>, Option<Vec<u8>>), S3Error> {
        let name = format!("{MANIFESTS}/{run_id}.json");
        let sig = self.bucket.get(&format!("{name}{}", protect::SIG_SUFFIX))?.map(|(b, _)| b);
        match self.bucket.get(&name)? {
            Some((bytes, _)) => Ok((bytes, sig)),
            None => Err(S3Error::NotFound(format!("no manifest for run {run_id}"))),
        }
    }

    /// Removes the runs `verdicts` prune, as [`super::retention::apply`]
    /// does in a directory: the manifest is first set aside as
    /// `.json.pruning`, so an interrupted prune is finished by the next.
    pub fn prune(&self, verdicts: &[super::retention::Verdict]) -> Result<Vec<String>, S3Error> {
        let mut lines = Vec::new();
        for v in verdicts.iter().filter(|v| !v.keep()) {
            let name = format!("{MANIFESTS}/{}.json", v.run_id);
            let pruning = format!("{name}.pruning");
            let Some((bytes, _)) = self.bucket.get(&name)? else { continue };
            self.bucket.put(&pruning, bytes, Put::Overwrite)?;
            self.bucket.delete(&name)?;
            self.remove_objects(&v.files, &mut lines)?;
            self.bucket.delete(&format!("{name}{}", protect::SIG_SUFFIX))?;
            self.bucket.delete(&pruning)?;
            lines.push(format!("pruned run {} ({})", v.run_id, v.pruned_because.as_deref().unwrap_or_default()));
        }
        Ok(lines)
    }

    /// Finishes prunes that were interrupted; objects a current manifest
    /// lists stay.
    pub fn resume_prune(&self) -> Result<Vec<String>, S3Error> {
        let leftovers: Vec<String> =
            self.bucket.list(MANIFESTS)?.into_iter().map(|m| m.rel).filter(|r| r.ends_with(".json.pruning")).collect();
        let mut lines = Vec::new();
        if leftovers.is_empty() {
            return Ok(lines);
        }
        let (current, _) = self.manifests()?;
        let protected: BTreeSet<PathBuf> = current.iter().flat_map(|m| m.files.iter().map(|f| m.location(f))).collect();
        for rel in leftovers {
            let Some(m) = self.bucket.get(&rel)?.and_then(|(b, _)| serde_json::from_slice::<Manifest>(&b).ok()) else {
                lines.push(format!("left {} alone: it cannot be read", crate::text::escape(&rel)));
                continue;
            };
            let files: Vec<(PathBuf, u64)> =
                m.files.iter().map(|f| (m.location(f), f.bytes)).filter(|(loc, _)| !protected.contains(loc)).collect();
            self.remove_objects(&files, &mut lines)?;
            let sig = format!("{MANIFESTS}/{}.json{}", m.run.run_id, protect::SIG_SUFFIX);
            self.bucket.delete(&sig)?;
            self.bucket.delete(&rel)?;
            lines.push(format!("finished pruning run {}, which an earlier prune had started", m.run.run_id));
        }
        Ok(lines)
    }

    /// Deletes each object that still has the size its manifest lists.
    fn remove_objects(&self, files: &[(PathBuf, u64)], lines: &mut Vec<String>) -> Result<(), S3Error> {
        for (path, bytes) in files {
            let rel = path.to_string_lossy();
            // The manifest came from the bucket: nothing but a path a run
            // could have stored is ever deleted (never the store's own).
            if crate::policy::store_path(&rel).is_err() {
                lines.push(format!("left {} alone: no run stores a file there", crate::text::escape(&rel)));
                continue;
            }
            match self.bucket.head(&rel)? {
                Some(meta) if meta.size == *bytes => {
                    self.bucket.delete(&rel)?;
                    lines.push(format!("removed {}", crate::text::escape(&rel)));
                }
                Some(meta) => lines.push(format!(
                    "left {} alone: it is not the {bytes}-byte object the manifest lists ({} bytes now)",
                    crate::text::escape(&rel),
                    meta.size
                )),
                None => {}
            }
        }
        Ok(())
    }
}

/// Hashes what is written to it.
struct HashSink(Sha256);

impl io::Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether `rel` (relative to the prefix) is the store's own bookkeeping,
/// not a backup: what `verify` does not count as unlisted.
pub fn is_bookkeeping(rel: &str) -> bool {
    rel == s3lock::LOCK_KEY
        || rel == SITES_MARK
        || rel.starts_with(".offsite/clock/")
        || rel.strip_prefix(&format!("{MANIFESTS}/")).is_some_and(|n| {
            !n.contains('/') && (n.ends_with(".json") || n.ends_with(&format!(".json{}", protect::SIG_SUFFIX)))
        })
}

/// A run's record in progress (`verify` notes it, a run finishes it).
pub fn is_run_record(rel: &str) -> bool {
    rel.starts_with(&format!("{RUNS}/"))
}

/// Each file of a run is uploaded to its final key and sealed when it
/// ends: every byte on the server, nothing visible until the run's end
/// completes the upload.
struct BucketOutlet {
    bucket: Arc<Bucket>,
    part_size: usize,
}

impl Outlet for BucketOutlet {
    fn create(&self, rel: &Path, final_name: &str) -> io::Result<Box<dyn OutFile>> {
        let key = rel.with_file_name(final_name).to_string_lossy().into_owned();
        let writer = ObjectWriter::create(Arc::clone(&self.bucket), &key, self.part_size).map_err(io::Error::other)?;
        Ok(Box::new(writer))
    }
}

impl OutFile for ObjectWriter {
    fn spare(&mut self) -> &mut [u8] {
        ObjectWriter::spare(self)
    }

    fn filled(&mut self, n: usize) -> io::Result<()> {
        ObjectWriter::filled(self, n).map_err(io::Error::other)
    }

    fn keep(self: Box<Self>) -> io::Result<Option<Box<dyn Unpublished>>> {
        Ok(Some(Box::new(self.seal().map_err(io::Error::other)?)))
    }
}

impl Unpublished for SealedUpload {
    fn rel(&self) -> &str {
        SealedUpload::rel(self)
    }

    fn publish(self: Box<Self>) -> io::Result<()> {
        self.complete().map(drop).map_err(io::Error::other)
    }
}

impl Held for S3Lock {
    fn confirm(&self) -> Result<(), String> {
        S3Lock::confirm(self)
    }

    fn release(self: Box<Self>) -> Result<(), String> {
        S3Lock::release(*self).map_err(|e| e.to_string())
    }
}

impl Backend for S3Root {
    fn open_file(&self, rel: &Path) -> io::Result<(u64, Box<dyn io::Read + '_>)> {
        match self.bucket.reader(&rel.to_string_lossy()) {
            Ok(Some(object)) => Ok((object.size(), Box::new(object))),
            Ok(None) => Err(io::Error::new(io::ErrorKind::NotFound, "no such object")),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// A HEAD, not a GET begun and dropped.
    fn file_size(&self, rel: &Path) -> io::Result<u64> {
        match self.bucket.head(&rel.to_string_lossy()) {
            Ok(Some(meta)) => Ok(meta.size),
            Ok(None) => Err(io::Error::new(io::ErrorKind::NotFound, "no such object")),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    fn manifests(&self) -> io::Result<(Vec<Manifest>, Vec<BadManifest>)> {
        S3Root::manifests(self).map_err(io::Error::other)
    }

    fn last_good(&self, runs: &Runs) -> io::Result<Option<Manifest>> {
        S3Root::last_good(self, runs).map_err(io::Error::other)
    }

    fn manifest_bytes(&self, run_id: &str) -> io::Result<(Vec<u8>, Option<Vec<u8>>)> {
        S3Root::manifest_bytes(self, run_id).map_err(io::Error::other)
    }

    fn signed_runs(&self) -> io::Result<BTreeSet<String>> {
        let suffix = format!(".json{}", protect::SIG_SUFFIX);
        let prefix = format!("{MANIFESTS}/");
        Ok(self
            .bucket
            .list(MANIFESTS)
            .map_err(io::Error::other)?
            .into_iter()
            .filter_map(|m| m.rel.strip_prefix(&prefix)?.strip_suffix(&suffix).map(str::to_string))
            .collect())
    }

    fn rewrite_manifest(&self, manifest: &Manifest) -> io::Result<()> {
        S3Root::rewrite_manifest(self, manifest).map_err(io::Error::other)
    }

    fn runs_of(&self, site: &str) -> Runs {
        S3Root::runs_of(self, site)
    }

    fn holders(&self) -> (Option<super::lock::Holder>, Option<super::lock::Holder>) {
        match self.holder_state() {
            Ok(Some((h, false))) => (Some(h), None),
            Ok(Some((h, true))) => (None, Some(h)),
            _ => (None, None),
        }
    }

    /// Objects under the prefix that no manifest lists and that are not
    /// the store's own: problems, as unlisted files are. A run's record in
    /// progress (or left by a killed run, which the next run finishes) is
    /// noted, not counted.
    fn unlisted(&self, listed: &dyn Fn(&Path) -> bool) -> io::Result<Unlisted> {
        let mut found = Unlisted::default();
        for object in self.bucket.list("").map_err(io::Error::other)? {
            let rel = object.rel.as_str();
            if listed(Path::new(rel)) || is_bookkeeping(rel) {
                continue;
            }
            let shown = crate::text::escape(rel);
            if is_run_record(rel) {
                found.notes.push(format!("{shown}: the record of a run in progress, or of one the next run finishes"));
            } else if rel.ends_with(".json.pruning") {
                found.problems.push(format!("{shown}: an interrupted prune (the next prune finishes it)"));
            } else {
                found.problems.push(format!("{shown}: unlisted: no manifest lists this object"));
            }
        }
        found.notes.push(format!(
            "{}: every object was downloaded and hashed (the server's checksums are not used)",
            self.bucket.location()
        ));
        Ok(found)
    }

    fn can_forget(&self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "forget works on a store in a directory; in an S3 store, a run whose objects were lost is reported by \
             verify until retention prunes it",
        ))
    }

    fn forget(&self, _: &str) -> io::Result<Vec<String>> {
        self.can_forget().map(|()| Vec::new())
    }

    fn resume_prune(&self) -> io::Result<Vec<String>> {
        S3Root::resume_prune(self).map_err(io::Error::other)
    }

    fn prune(&self, verdicts: &[super::retention::Verdict]) -> io::Result<Vec<String>> {
        S3Root::prune(self, verdicts).map_err(io::Error::other)
    }

    fn lock(&self, header: &RunHeader) -> Result<Locked, LockFailure> {
        match S3Root::lock(self, header) {
            Ok(lock) => Ok(Locked { lock: Box::new(lock), took_over: None }),
            Err(e @ LockError::Busy { .. }) => Err(LockFailure::Busy(e.to_string())),
            Err(LockError::S3(e)) => Err(LockFailure::Failed(OpenError::s3(e))),
        }
    }

    fn recover(&self) -> io::Result<Vec<String>> {
        S3Root::recover(self).map_err(io::Error::other)
    }

    fn claim_for_run(&self, site: &Site) {
        if site.shared_store
            && let Err(e) = self.mark_sites_shared()
        {
            log::warn!(target: "offsite::run", "cannot mark {} as shared by sites: {e}", site.store.display());
        }
    }

    fn begin_run(
        &self,
        header: &RunHeader,
        budget: Budget,
        recipients: Vec<age::x25519::Recipient>,
    ) -> io::Result<Store> {
        S3Root::begin_run(self, header, budget, recipients).map_err(io::Error::other)
    }

    fn finish_run(
        &self,
        header: &RunHeader,
        store: &Store,
        outcome: &Outcome,
        lock: &dyn Held,
    ) -> io::Result<Manifest> {
        S3Root::finish_run(self, header, store, outcome, lock).map_err(io::Error::other)
    }

    fn abandon_run(&self, store: Store) -> io::Result<()> {
        S3Root::abandon_run(self, store).map_err(io::Error::other)
    }

    fn left_behind(&self, _: &str) -> String {
        "the next run recovers what it left (nothing unpublished becomes visible)".into()
    }
}
