//! The life of a run in the store: lock, recovery of interrupted runs,
//! staging, and the end of the run (promotion of a good run's files, or
//! keeping a failed run's files aside), always finished by the manifest.

use std::collections::BTreeSet;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use cap_std::ambient_authority;
use cap_std::fs::Dir;

use super::lock::{self, Holder, Lock, LockError};
pub use super::manifest::RunHeader;
use super::manifest::{FORMAT, Manifest, Status};
use super::protect;
use super::{Budget, META_DIR, Store, StoredFile, TEMP_PREFIX, make_dirs, sync_dir, write_atomic};

/// A site's store, opened with its `.offsite` directory.
pub struct StoreRoot {
    root: PathBuf,
    pub(crate) dir: Dir,
    pub(crate) meta: Dir,
    pub(crate) runs: Dir,
    pub(crate) manifests: Dir,
    /// Signs every manifest written (see `protect`).
    signer: Option<ssh_key::PrivateKey>,
}

/// How the script's part of a run ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Why the run failed, if it did.
    pub error: Option<String>,
    /// Warnings logged during the run.
    pub warnings: Vec<String>,
    /// The run was stopped (a signal): `failed` even with complete files.
    pub aborted: bool,
    /// The run failed, but the files its calls completed may be published
    /// (a `partial` run): the script's failure, not a stop or a crash.
    pub publish_completed: bool,
    /// The outputs the run's calls failed to make.
    pub failed: Vec<super::manifest::FailedOutput>,
}

/// A manifest file that could not be read.
#[derive(Debug, Clone)]
pub struct BadManifest {
    pub name: String,
    pub error: String,
}

/// The name of this machine, for lock notes and manifests.
/// In `.offsite`: the manifests of runs `offsite forget` set aside.
pub const FORGOTTEN_DIR: &str = "forgotten";

/// In `.offsite`: the store is not dedicated (see `StoreRoot::mark_shared`).
pub const SHARED_MARK: &str = "shared";

/// In `.offsite`: several sites write into this store (a site file says
/// `shared_store = true`), so runs are told apart by site name.
pub const SITES_MARK: &str = "sites";

/// In `.offsite`: the partial copies of large fetches (see
/// [`super::outlet::Partial`]).
pub const PARTIAL_DIR: &str = "partial";

/// In `.offsite`: the name of the site that last ran into a dedicated store.
pub const OWNER_FILE: &str = "site";

/// Which of a store's runs are a site's. A dedicated store's runs are all
/// its site's, whatever the site was called when each ran (a renamed site
/// file keeps its history); in a store several sites or the user's own
/// files share, runs are told apart by site name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runs {
    All,
    Named(String),
}

impl Runs {
    pub fn includes(&self, m: &Manifest) -> bool {
        match self {
            Runs::All => true,
            Runs::Named(site) => m.run.site == *site,
        }
    }
}

pub fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

/// A run id: the UTC start time to the millisecond, and the pid. Ids sort
/// in start order.
pub fn new_run_id(started: chrono::DateTime<chrono::Local>) -> String {
    format!("{}-{}", started.with_timezone(&chrono::Utc).format("%Y%m%dT%H%M%S%.3fZ"), std::process::id())
}

fn journal_name(run_id: &str) -> String {
    format!("{run_id}.journal")
}

fn staged_manifest_name(run_id: &str) -> String {
    format!("{run_id}.manifest")
}

/// `.offsite/runs/<run>`, relative to the store root.
pub fn kept_dir(run_id: &str) -> String {
    format!("{META_DIR}/runs/{run_id}")
}

impl StoreRoot {
    /// Opens the store at `root`, creating it and its `.offsite` directory
    /// (mode 0700) as needed.
    pub fn open(root: &Path) -> io::Result<StoreRoot> {
        if !root.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(root)?;
        }
        let dir = Dir::open_ambient_dir(root, ambient_authority())?;
        let meta = make_dirs(&dir, Path::new(META_DIR))?;
        let runs = make_dirs(&meta, Path::new("runs"))?;
        let manifests = make_dirs(&meta, Path::new("manifests"))?;
        Ok(StoreRoot { root: root.to_path_buf(), dir, meta, runs, manifests, signer: None })
    }

    /// Signs every manifest written from now on with `key`.
    pub fn with_signer(mut self, key: Option<ssh_key::PrivateKey>) -> StoreRoot {
        self.signer = key;
        self
    }

    /// The raw bytes of a manifest and of its signature, if it has one.
    pub fn manifest_bytes(&self, run_id: &str) -> io::Result<(Vec<u8>, Option<Vec<u8>>)> {
        let name = format!("{run_id}.json");
        let sig = self.manifests.read(format!("{name}{}", protect::SIG_SUFFIX)).ok();
        Ok((self.manifests.read(&name)?, sig))
    }

    /// Opens an existing store without creating anything.
    pub fn open_existing(root: &Path) -> io::Result<StoreRoot> {
        let dir = Dir::open_ambient_dir(root, ambient_authority())?;
        let meta = dir.open_dir(META_DIR).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{} is not an offsite store (it has no {META_DIR} directory): {e}", root.display()),
            )
        })?;
        let runs = meta.open_dir("runs")?;
        let manifests = meta.open_dir("manifests")?;
        Ok(StoreRoot { root: root.to_path_buf(), dir, meta, runs, manifests, signer: None })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the store's lock (see [`lock`]).
    pub fn lock(&self, me: &Holder) -> Result<(Lock, Option<Holder>), LockError> {
        lock::acquire(&self.meta, me)
    }

    /// `offsite forget`: records that run `run_id` lost files (deleted by
    /// hand, a failed disk) so that `verify` stops failing on them, without
    /// erasing the record: its manifest moves to `.offsite/forgotten/`. Only
    /// a run with a missing file can be forgotten (runs that are whole are
    /// removed by retention). Returns what was done, one line each.
    pub fn forget(&self, run_id: &str) -> io::Result<Vec<String>> {
        if run_id.is_empty() || run_id.contains(['/', '\\']) || run_id.starts_with('.') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{run_id:?} is not a run id")));
        }
        let name = format!("{run_id}.json");
        let bytes = self.manifests.read(&name).map_err(|e| {
            io::Error::new(e.kind(), format!("no manifest for run {run_id} ({e}); `offsite status` lists runs"))
        })?;
        let manifest: super::Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{name}: {e}")))?;
        let (missing, present): (Vec<_>, Vec<_>) =
            manifest.files.iter().map(|f| manifest.location(f)).partition(|p| !self.dir.exists(p));
        if missing.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "every file of run {run_id} is still there; forget is for runs that lost files (retention \
                     removes whole runs)"
                ),
            ));
        }
        if !self.meta.exists(FORGOTTEN_DIR) {
            self.meta.create_dir(FORGOTTEN_DIR)?;
        }
        let forgotten = self.meta.open_dir(FORGOTTEN_DIR)?;
        let sig = format!("{name}{}", protect::SIG_SUFFIX);
        if self.manifests.exists(&sig) {
            self.manifests.rename(&sig, &forgotten, &sig)?;
        }
        self.manifests.rename(&name, &forgotten, &name)?;
        sync_dir(&forgotten)?;
        sync_dir(&self.manifests)?;
        let show = |v: &[PathBuf]| v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        let mut done = vec![format!(
            "forgot run {run_id} ({}): its manifest is kept in {META_DIR}/{FORGOTTEN_DIR}/{name}",
            manifest.status
        )];
        done.push(format!("  lost: {}", show(&missing)));
        if !present.is_empty() {
            done.push(format!("  still there, now listed by no run unless another lists it: {}", show(&present)));
        }
        Ok(done)
    }

    /// Marks the store as one that also holds files that are not
    /// offsite's (the current directory of a run without a site file, as
    /// in `tar czf` in place): `verify` then does not count them as
    /// problems. A site's store is dedicated and stays strict.
    pub fn mark_shared(&self) -> io::Result<()> {
        if self.meta.exists(SHARED_MARK) {
            return Ok(());
        }
        self.meta.write(SHARED_MARK, b"this store is a directory that holds other files too\n")
    }

    /// Whether [`StoreRoot::mark_shared`] was called for this store.
    pub fn is_shared(&self) -> bool {
        self.meta.exists(SHARED_MARK)
    }

    /// Marks the store as one several sites write into: from now on each
    /// site's status and retention see only the runs made under its name.
    pub fn mark_sites_shared(&self) -> io::Result<()> {
        if self.meta.exists(SITES_MARK) {
            return Ok(());
        }
        self.meta.write(SITES_MARK, b"several sites write into this store; runs are told apart by site name\n")
    }

    /// Which runs in this store are `site`'s (see [`Runs`]).
    pub fn runs_of(&self, site: &str) -> Runs {
        if self.is_shared() || self.meta.exists(SITES_MARK) { Runs::Named(site.to_string()) } else { Runs::All }
    }

    /// Records `site` as the one that runs into this dedicated store, and
    /// returns the name it replaces and how many runs that name made here,
    /// when it is another: a renamed site file (whose history stays
    /// with the store) or two site files sharing one store by mistake
    /// (which then take turns, and warn each time). A store from before the
    /// record existed is owned by the site of its newest run.
    pub fn claim(&self, site: &str) -> io::Result<Option<(String, usize)>> {
        let (all, _) = self.manifests()?;
        let previous = match self.meta.read_to_string(OWNER_FILE) {
            Ok(text) => text.lines().next().map(str::to_string).filter(|n| !n.is_empty()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => all.last().map(|m| m.run.site.clone()),
            Err(e) => return Err(e),
        };
        if previous.as_deref() != Some(site) {
            write_atomic(&self.meta, OWNER_FILE, format!("{site}\n").as_bytes())?;
        }
        Ok(previous.filter(|p| p != site).map(|p| {
            let count = all.iter().filter(|m| m.run.site == p).count();
            (p, count)
        }))
    }

    /// Who holds the lock now, if anyone.
    pub fn holder(&self) -> Option<Holder> {
        lock::holder(&self.meta)
    }

    /// The run that died holding the lock, if one did (see [`lock::died`]).
    pub fn died_holder(&self) -> Option<Holder> {
        lock::died(&self.meta)
    }

    /// Finishes what interrupted runs left, under the lock: a run killed
    /// while installing its files is installed; a run killed earlier gets
    /// a manifest saying so, with its complete files kept aside; temporary
    /// files are removed. Returns one line per thing done.
    pub fn recover(&self) -> io::Result<Vec<String>> {
        let mut done = Vec::new();
        let mut names: Vec<String> = Vec::new();
        for entry in self.runs.entries()? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        for name in &names {
            if name.starts_with(TEMP_PREFIX) {
                self.runs.remove_file(name)?;
            } else if name.ends_with(".manifest.sig") {
                // Installed with its manifest.
            } else if let Some(run_id) = name.strip_suffix(".manifest") {
                let manifest: Manifest = serde_json::from_slice(&self.runs.read(name)?)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{name}: {e}")))?;
                self.install(&manifest)?;
                done.push(format!(
                    "run {run_id} was interrupted while installing its {} file(s); it is now installed",
                    manifest.files.len()
                ));
            } else if let Some(run_id) = name.strip_suffix(".journal") {
                if names.contains(&staged_manifest_name(run_id)) {
                    continue;
                }
                done.push(self.record_interrupted(run_id)?);
            } else if !names.contains(&journal_name(name))
                && !names.contains(&staged_manifest_name(name))
                && self.runs.is_dir(name)
                && !self.keeps_files_of(name)
            {
                // A staging directory with no journal, and no manifest
                // keeping files in it: nothing in it was completed, or it
                // is what an install left before it could remove it.
                self.runs.remove_dir_all(name)?;
                done.push(format!("removed the empty staging directory of run {name}"));
            }
        }
        for entry in self.manifests.entries()? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX) {
                self.manifests.remove_file(&name)?;
            }
        }
        if let Ok(partial) = self.meta.open_dir(PARTIAL_DIR) {
            let keep = std::time::Duration::from_secs(super::outlet::PARTIAL_KEEP_DAYS * 86400);
            for entry in partial.entries()? {
                let entry = entry?;
                let stale = entry.metadata()?.modified()?.into_std().elapsed().is_ok_and(|age| age > keep);
                if stale && entry.file_type()?.is_file() {
                    let name = entry.file_name();
                    partial.remove_file(&name)?;
                    if !name.to_string_lossy().ends_with(".json") {
                        done.push(format!(
                            "removed a partial fetch untouched for {} days",
                            super::outlet::PARTIAL_KEEP_DAYS
                        ));
                    }
                }
            }
        }
        sync_dir(&self.runs)?;
        Ok(done)
    }

    /// Whether run `run_id`'s manifest keeps its files in its staging
    /// directory (a run that did not succeed).
    fn keeps_files_of(&self, run_id: &str) -> bool {
        self.manifests
            .read(format!("{run_id}.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
            .is_some_and(|m| m.kept_in.is_some())
    }

    /// Writes the manifest of a run that stopped without finishing.
    fn record_interrupted(&self, run_id: &str) -> io::Result<String> {
        let journal = self.runs.open(journal_name(run_id))?.into_std();
        let mut lines = BufReader::new(journal).lines();
        let header: Option<RunHeader> = lines.next().transpose()?.and_then(|l| serde_json::from_str(&l).ok());
        let mut files = Vec::new();
        for line in lines {
            // A torn last line is a file whose note never completed.
            if let Ok(stored) = serde_json::from_str::<StoredFile>(&line?) {
                files.push(stored);
            }
        }
        if self.runs.is_dir(run_id) {
            remove_temps(&self.runs.open_dir(run_id)?)?;
            files.retain(|f| self.runs.open_dir(run_id).and_then(|d| d.metadata(&f.path)).is_ok());
        }
        let now = chrono::Local::now().to_rfc3339();
        let header = header.unwrap_or_else(|| RunHeader::unknown(run_id, &now));
        let who = format!("pid {} on {}", header.pid, header.hostname);
        let outcome = Outcome {
            error: Some(format!(
                "interrupted: the run ({who}, started {}) stopped before it finished; it was killed or crashed",
                header.started
            )),
            ..Outcome::default()
        };
        let manifest = self.conclude(&header, files, &outcome, &now)?;
        Ok(match &manifest.kept_in {
            Some(dir) => format!(
                "run {run_id} ({who}) was interrupted: recorded as {}, its {} complete file(s) kept in {dir}",
                manifest.status,
                manifest.files.len()
            ),
            None => format!("run {run_id} ({who}) was interrupted before storing anything: recorded as failed"),
        })
    }

    /// Starts a run: its staging directory and journal.
    pub fn begin_run(&self, header: &RunHeader, budget: Budget) -> io::Result<Store> {
        self.begin_encrypted_run(header, budget, Vec::new())
    }

    /// Starts a run whose files are encrypted to `recipients`.
    pub fn begin_encrypted_run(
        &self,
        header: &RunHeader,
        budget: Budget,
        recipients: Vec<age::x25519::Recipient>,
    ) -> io::Result<Store> {
        let staging = make_dirs(&self.runs, Path::new(&header.run_id))?;
        let mut journal = super::create_new(&self.runs, &journal_name(&header.run_id))?.into_std();
        let mut line = serde_json::to_vec(header).expect("a header serialises");
        line.push(b'\n');
        io::Write::write_all(&mut journal, &line)?;
        journal.sync_all()?;
        sync_dir(&self.runs)?;
        let partial = super::outlet::Partial {
            dir: make_dirs(&self.meta, Path::new(PARTIAL_DIR))?,
            site: header.site.clone(),
            busy: Default::default(),
        };
        let outlet = Box::new(super::outlet::StagingOutlet { staging, partial: Some(partial) });
        Ok(Store::new(&header.run_id, outlet, budget, recipients, Some(journal)))
    }

    /// Gives up a run without recording it: its staged files and journal
    /// go (a copy that failed, which the next run makes again).
    pub fn abandon_run(&self, store: Store) -> io::Result<()> {
        let run_id = store.run_id().to_string();
        drop(store);
        if self.runs.is_dir(&run_id) {
            self.runs.remove_dir_all(&run_id)?;
        }
        let _ = self.runs.remove_file(journal_name(&run_id));
        sync_dir(&self.runs)
    }

    /// Rewrites a recorded run's manifest (and its signature): a run whose
    /// copy failed after it was recorded gets the warning.
    pub fn rewrite_manifest(&self, manifest: &Manifest) -> io::Result<()> {
        let json = manifest.to_json();
        let name = format!("{}.json", manifest.run.run_id);
        if let Some(key) = &self.signer {
            write_atomic(&self.manifests, &format!("{name}{}", protect::SIG_SUFFIX), &protect::sign(key, &json)?)?;
        }
        write_atomic(&self.manifests, &name, &json)
    }

    /// Ends a run: a good run's files are moved to their paths and its
    /// manifest installed; a failed run's files stay in its staging
    /// directory, which its manifest names. The manifest comes last.
    pub fn finish_run(&self, header: &RunHeader, store: &Store, outcome: &Outcome) -> io::Result<Manifest> {
        let files = store.stored();
        let ended = chrono::Local::now().to_rfc3339();
        self.conclude(header, files, outcome, &ended)
    }

    fn conclude(
        &self,
        header: &RunHeader,
        files: Vec<StoredFile>,
        outcome: &Outcome,
        ended: &str,
    ) -> io::Result<Manifest> {
        let mut manifest = manifest_for(header, files, outcome, ended);
        if manifest.status.is_good()
            && let Err(e) = self.check_destinations(&manifest.files)
        {
            manifest.status = Status::Incomplete;
            manifest.error = Some(e.to_string());
        }
        let run_id = &header.run_id;
        if manifest.status == Status::Partial {
            // Each file whose path is free is published; one that would
            // replace a file (or cannot be installed) is kept aside.
            for f in &mut manifest.files {
                let path = Path::new(&f.path);
                f.kept = self.dir.symlink_metadata(path).is_ok()
                    || self.check_destinations(std::slice::from_ref(f)).is_err();
            }
            if manifest.files.iter().all(|f| f.kept) {
                manifest.status = Status::Incomplete;
                manifest.files.iter_mut().for_each(|f| f.kept = false);
            } else if manifest.files.iter().any(|f| f.kept) {
                manifest.kept_in = Some(kept_dir(run_id));
            }
        }
        if manifest.status.publishes() {
            self.note_replacements(&mut manifest);
            let json = manifest.to_json();
            let staged = staged_manifest_name(run_id);
            if let Some(key) = &self.signer {
                write_atomic(&self.runs, &format!("{staged}{}", protect::SIG_SUFFIX), &protect::sign(key, &json)?)?;
            }
            write_atomic(&self.runs, &staged, &json)?;
            self.install(&manifest)?;
        } else {
            if manifest.files.is_empty() {
                if self.runs.is_dir(run_id) {
                    self.runs.remove_dir_all(run_id)?;
                }
            } else {
                manifest.kept_in = Some(kept_dir(run_id));
            }
            let json = manifest.to_json();
            let name = format!("{run_id}.json");
            if let Some(key) = &self.signer {
                write_atomic(&self.manifests, &format!("{name}{}", protect::SIG_SUFFIX), &protect::sign(key, &json)?)?;
            }
            write_atomic(&self.manifests, &name, &json)?;
            let _ = self.runs.remove_file(journal_name(run_id));
            sync_dir(&self.runs)?;
        }
        Ok(manifest)
    }

    /// For each file a good run is about to install over a file an earlier
    /// good run stored at the same path, records which run's file it
    /// replaces (read from the newest manifest listing the path; only on
    /// such a collision are manifests read).
    fn note_replacements(&self, manifest: &mut Manifest) {
        let taken: Vec<usize> = (0..manifest.files.len())
            .filter(|&i| !manifest.files[i].kept && self.dir.is_file(&manifest.files[i].path))
            .collect();
        if taken.is_empty() {
            return;
        }
        let Ok((all, _)) = self.manifests() else { return };
        for i in taken {
            let path = manifest.files[i].path.clone();
            let previous = all
                .iter()
                .rev()
                .find_map(|m| m.published().find(|f| f.path == path).map(|f| (m.run.run_id.clone(), f.sha256.clone())));
            if let Some((run, sha256)) = previous {
                log::info!(target: "offsite::store", "{path} replaces the file of the same name from run {run}");
                manifest.files[i].replaces = Some(super::Replaced { run, sha256 });
            }
        }
    }

    /// A good run may only be installed if every path it names can take a
    /// file: nothing there, or a regular file (which it replaces).
    fn check_destinations(&self, files: &[StoredFile]) -> io::Result<()> {
        for f in files {
            let path = Path::new(&f.path);
            if let Ok(meta) = self.dir.symlink_metadata(path)
                && !meta.is_file()
            {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("cannot install {}: something other than a regular file is in the way", f.path),
                ));
            }
            for dir in path.ancestors().skip(1).filter(|d| !d.as_os_str().is_empty()) {
                if let Ok(meta) = self.dir.symlink_metadata(dir)
                    && !meta.is_dir()
                {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("cannot install {}: {} is not a directory", f.path, dir.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Moves a good run's staged files to their paths, then installs its
    /// staged manifest. Idempotent, so an interrupted install can be redone.
    fn install(&self, manifest: &Manifest) -> io::Result<()> {
        let run_id = &manifest.run.run_id;
        let mut parents = BTreeSet::new();
        if self.runs.is_dir(run_id) {
            let staging = self.runs.open_dir(run_id)?;
            for f in manifest.published() {
                let rel = Path::new(&f.path);
                let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
                let name = rel.file_name().expect("stored files have names");
                let Ok(from) =
                    staging.open_dir(if parent_rel.as_os_str().is_empty() { Path::new(".") } else { &parent_rel })
                else {
                    continue;
                };
                if from.symlink_metadata(name).is_err() {
                    continue; // installed before an interruption
                }
                let to = make_dirs(&self.dir, &parent_rel)?;
                from.rename(name, &to, name)?;
                parents.insert(parent_rel);
            }
        }
        for p in &parents {
            sync_dir(&make_dirs(&self.dir, p)?)?;
        }
        let name = format!("{run_id}.json");
        let staged = staged_manifest_name(run_id);
        let sig = format!("{staged}{}", protect::SIG_SUFFIX);
        if self.runs.exists(&sig) {
            self.runs.rename(&sig, &self.manifests, format!("{name}{}", protect::SIG_SUFFIX))?;
        }
        self.runs.rename(&staged, &self.manifests, &name)?;
        sync_dir(&self.manifests)?;
        // A partial run's kept files stay where its manifest says.
        if self.runs.is_dir(run_id) && manifest.kept_in.is_none() {
            self.runs.remove_dir_all(run_id)?;
        }
        let _ = self.runs.remove_file(journal_name(run_id));
        sync_dir(&self.runs)
    }

    /// The names of the installed manifests, oldest run first (run ids
    /// sort by time).
    fn manifest_names(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in self.manifests.entries()? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") && !name.starts_with(TEMP_PREFIX) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// The newest good (ok or warning) run of `runs`, reading manifests
    /// newest first and stopping at the first match.
    pub fn last_good(&self, runs: &Runs) -> io::Result<Option<Manifest>> {
        for name in self.manifest_names()?.iter().rev() {
            let Ok(bytes) = self.manifests.read(name) else { continue };
            if let Ok(m) = serde_json::from_slice::<Manifest>(&bytes)
                && runs.includes(&m)
                && m.status.is_good()
            {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// Every manifest, oldest run first, and the ones that cannot be read.
    pub fn manifests(&self) -> io::Result<(Vec<Manifest>, Vec<BadManifest>)> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for name in self.manifest_names()? {
            let parsed = self
                .manifests
                .read(&name)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Manifest>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(m) if format!("{}.json", m.run.run_id) == name => good.push(m),
                Ok(m) => bad.push(BadManifest { name, error: format!("it names run {}", m.run.run_id) }),
                Err(error) => bad.push(BadManifest { name, error }),
            }
        }
        Ok((good, bad))
    }
}

/// The manifest of a run that ended with `outcome` after storing `files`.
/// Its status follows from them: an error with files stored is
/// incomplete, without any it is failed; warnings alone make a warning.
pub fn manifest_for(header: &RunHeader, files: Vec<StoredFile>, outcome: &Outcome, ended: &str) -> Manifest {
    let status = match (&outcome.error, files.is_empty()) {
        (Some(_), _) if outcome.aborted => Status::Failed,
        (Some(_), true) => Status::Failed,
        (Some(_), false) if outcome.publish_completed => Status::Partial,
        (Some(_), false) => Status::Incomplete,
        (None, _) if !outcome.warnings.is_empty() => Status::Warning,
        (None, _) => Status::Ok,
    };
    Manifest {
        format: FORMAT,
        run: header.clone(),
        ended: ended.to_string(),
        status,
        error: outcome.error.clone(),
        warnings: outcome.warnings.clone(),
        kept_in: None,
        files,
        failed: outcome.failed.clone(),
        snapshot: None,
    }
}

/// Removes in-progress files beneath `dir` (never following links).
/// Iterative, with one directory open at a time, however deep the tree.
fn remove_temps(dir: &Dir) -> io::Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let here = if rel.as_os_str().is_empty() { dir.try_clone()? } else { dir.open_dir(&rel)? };
        for entry in here.entries()? {
            let entry = entry?;
            let name = entry.file_name();
            if entry.file_type()?.is_dir() {
                stack.push(rel.join(&name));
            } else if name.to_string_lossy().starts_with(TEMP_PREFIX) {
                here.remove_file(&name)?;
            }
        }
    }
    Ok(())
}

/// Whether a run could write into `store` (or create it), asked of the
/// kernel without writing anything: the store, or its nearest existing
/// parent, must be a directory this user may write and enter (a read-only
/// mount says so too).
pub fn probe_writable(store: &Path) -> std::io::Result<()> {
    use rustix::fs::{Access, access};
    let existing = store.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if !existing.is_dir() {
        return Err(std::io::Error::other(format!("{} is not a directory", existing.display())));
    }
    access(existing, Access::WRITE_OK | Access::EXEC_OK).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::store::Origin;
    use crate::store::manifest::ScriptRef;

    fn header(run_id: &str) -> RunHeader {
        RunHeader {
            run_id: run_id.into(),
            site: "s".into(),
            hostname: "h".into(),
            pid: 1,
            script: ScriptRef { name: "t".into(), version: "1".into(), sha256: "0".repeat(64), ..Default::default() },
            grants_sha256: "1".repeat(64),
            started: "2026-11-26T23:00:00+00:00".into(),
        }
    }

    fn write(store: &Store, rel: &str, data: &[u8]) {
        let mut f = store.create(Path::new(rel)).unwrap();
        f.write_all(data).unwrap();
        f.commit(Origin { call: "test".into(), ..Default::default() }).unwrap();
    }

    fn tree(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                if e.file_type().unwrap().is_dir() {
                    walk(base, &p, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        walk(root, root, &mut out);
        out.sort();
        out
    }

    #[test]
    fn a_good_run_installs_its_files_then_its_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let root = StoreRoot::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("a.txt"), "old").unwrap();
        let store = root.begin_run(&header("r1"), Budget::unlimited()).unwrap();
        write(&store, "a.txt", b"new");
        write(&store, "sub/b.txt", b"bee");
        assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"old", "nothing replaced before the end");
        assert!(!dir.path().join("sub").exists());
        let m = root.finish_run(&header("r1"), &store, &Outcome::default()).unwrap();
        assert_eq!(m.status, Status::Ok);
        assert_eq!(m.files.len(), 2);
        assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"new");
        assert_eq!(tree(dir.path()), vec![".offsite/manifests/r1.json", "a.txt", "sub/b.txt"]);
        let (manifests, bad) = root.manifests().unwrap();
        assert!(bad.is_empty());
        assert_eq!(manifests, vec![m]);
    }

    #[test]
    fn a_failed_run_keeps_its_files_aside_and_replaces_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = StoreRoot::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("a.txt"), "good").unwrap();
        let store = root.begin_run(&header("r1"), Budget::unlimited()).unwrap();
        write(&store, "a.txt", b"newer");
        let outcome = Outcome { error: Some("the second host failed".into()), ..Outcome::default() };
        let m = root.finish_run(&header("r1"), &store, &outcome).unwrap();
        assert_eq!(m.status, Status::Incomplete);
        assert_eq!(m.kept_in.as_deref(), Some(".offsite/runs/r1"));
        assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"good");
        assert_eq!(std::fs::read(dir.path().join(m.location(&m.files[0]))).unwrap(), b"newer");
        // Nothing stored at all: failed, and nothing kept.
        let store = root.begin_run(&header("r2"), Budget::unlimited()).unwrap();
        let m = root.finish_run(&header("r2"), &store, &outcome).unwrap();
        assert_eq!((m.status, m.kept_in), (Status::Failed, None));
        assert!(!dir.path().join(".offsite/runs/r2").exists());
    }

    #[test]
    fn a_partial_run_publishes_new_outputs_and_keeps_aside_what_would_replace_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = StoreRoot::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("a.txt"), "good").unwrap();
        let store = root.begin_run(&header("r1"), Budget::unlimited()).unwrap();
        write(&store, "a.txt", b"newer");
        write(&store, "s2/b.txt", b"bee");
        let outcome = Outcome {
            error: Some("server1 failed".into()),
            publish_completed: true,
            failed: vec![crate::store::manifest::FailedOutput {
                path: "s1/c.txt".into(),
                call: "ssh.exec-to-file".into(),
                host: Some("s1".into()),
                error: "connection refused".into(),
            }],
            ..Outcome::default()
        };
        let m = root.finish_run(&header("r1"), &store, &outcome).unwrap();
        assert_eq!(m.status, Status::Partial);
        assert_eq!(m.kept_in.as_deref(), Some(".offsite/runs/r1"));
        assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"good", "a partial run replaces nothing");
        assert_eq!(std::fs::read(dir.path().join("s2/b.txt")).unwrap(), b"bee", "the new output is published");
        let kept: Vec<&str> = m.files.iter().filter(|f| f.kept).map(|f| f.path.as_str()).collect();
        assert_eq!(kept, vec!["a.txt"]);
        assert_eq!(std::fs::read(dir.path().join(m.location(&m.files[0]))).unwrap(), b"newer");
        assert_eq!(m.location(&m.files[1]), PathBuf::from("s2/b.txt"));
        assert_eq!(m.published().map(|f| f.path.as_str()).collect::<Vec<_>>(), vec!["s2/b.txt"]);
        assert_eq!(m.failed[0].output(), "s1/c.txt");
        assert_eq!(tree(dir.path()), vec![".offsite/manifests/r1.json", ".offsite/runs/r1/a.txt", "a.txt", "s2/b.txt"]);
        assert!(root.recover().unwrap().is_empty(), "the kept file stays where the manifest says");
        assert_eq!(root.manifests().unwrap().0, vec![m]);

        // A stop (signal) publishes nothing, whatever was complete.
        let store = root.begin_run(&header("r2"), Budget::unlimited()).unwrap();
        write(&store, "s3/d.txt", b"d");
        let stopped = Outcome { aborted: true, ..outcome };
        let m = root.finish_run(&header("r2"), &store, &stopped).unwrap();
        assert_eq!(m.status, Status::Failed);
        assert!(!dir.path().join("s3").exists());
    }

    #[test]
    fn recovery_records_a_killed_run_and_removes_its_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = StoreRoot::open(dir.path()).unwrap();
        let store = root.begin_run(&header("r1"), Budget::unlimited()).unwrap();
        write(&store, "done.txt", b"complete");
        let mut partial = store.create(Path::new("partial.txt")).unwrap();
        partial.write_all(b"half").unwrap();
        // "Kill": leak both without running any destructor.
        std::mem::forget(partial);
        std::mem::forget(store);
        let done = root.recover().unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(done[0].contains("interrupted"), "{done:?}");
        let (manifests, _) = root.manifests().unwrap();
        assert_eq!(manifests[0].status, Status::Incomplete);
        assert_eq!(tree(dir.path()), vec![".offsite/manifests/r1.json", ".offsite/runs/r1/done.txt"]);
        assert!(root.recover().unwrap().is_empty(), "recovery is done once");
    }

    #[test]
    fn recovery_finishes_an_interrupted_install() {
        let dir = tempfile::tempdir().unwrap();
        let root = StoreRoot::open(dir.path()).unwrap();
        let store = root.begin_run(&header("r1"), Budget::unlimited()).unwrap();
        write(&store, "x/a.txt", b"a");
        write(&store, "b.txt", b"b");
        let files = store.stored();
        std::mem::forget(store);
        // As if killed after the staged manifest and the first rename.
        let m = manifest_for(&header("r1"), files, &Outcome::default(), "2026-11-26T23:00:01+00:00");
        write_atomic(&root.runs, &staged_manifest_name("r1"), &m.to_json()).unwrap();
        std::fs::create_dir(dir.path().join("x")).unwrap();
        std::fs::rename(dir.path().join(".offsite/runs/r1/x/a.txt"), dir.path().join("x/a.txt")).unwrap();
        let done = root.recover().unwrap();
        assert!(done[0].contains("installed"), "{done:?}");
        assert_eq!(tree(dir.path()), vec![".offsite/manifests/r1.json", "b.txt", "x/a.txt"]);
        assert_eq!(root.manifests().unwrap().0, vec![m]);
    }
}
