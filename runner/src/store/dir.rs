//! The directory store as a [`Backend`]: what `run.rs`, `retention.rs` and
//! `lock.rs` do for a store on this machine, behind the one interface.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use cap_std::fs::Dir;

use super::backend::{Backend, Fault, Held, LockFailure, Locked, OpenError, Unlisted};
use super::lock::{self, Holder, LockError};
use super::retention::{self, Verdict};
use super::run::{self, BadManifest, Outcome, RunHeader, Runs, StoreRoot, kept_dir};
use super::{Budget, META_DIR, Manifest, Store, TEMP_PREFIX, protect};
use crate::site::Site;

impl Held for lock::Lock {
    /// A flock is the kernel's: held until this process lets it go.
    fn confirm(&self) -> Result<(), String> {
        Ok(())
    }

    fn release(self: Box<Self>) -> Result<(), String> {
        Ok(())
    }
}

impl Backend for StoreRoot {
    fn open_file(&self, rel: &Path) -> io::Result<(u64, Box<dyn Read + '_>)> {
        let meta = self.dir.symlink_metadata(rel)?;
        if !meta.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "it is no longer a regular file"));
        }
        let file = self.dir.open(rel)?.into_std();
        Ok((meta.len(), Box::new(file)))
    }

    fn manifests(&self) -> io::Result<(Vec<Manifest>, Vec<BadManifest>)> {
        StoreRoot::manifests(self)
    }

    fn last_good(&self, runs: &Runs) -> io::Result<Option<Manifest>> {
        StoreRoot::last_good(self, runs)
    }

    fn manifest_bytes(&self, run_id: &str) -> io::Result<(Vec<u8>, Option<Vec<u8>>)> {
        StoreRoot::manifest_bytes(self, run_id)
    }

    fn signed_runs(&self) -> io::Result<BTreeSet<String>> {
        let suffix = format!(".json{}", protect::SIG_SUFFIX);
        let mut runs = BTreeSet::new();
        for entry in self.manifests.entries()? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(run) = name.strip_suffix(&suffix) {
                runs.insert(run.to_string());
            }
        }
        Ok(runs)
    }

    fn rewrite_manifest(&self, manifest: &Manifest) -> io::Result<()> {
        StoreRoot::rewrite_manifest(self, manifest)
    }

    fn runs_of(&self, site: &str) -> Runs {
        StoreRoot::runs_of(self, site)
    }

    fn holders(&self) -> (Option<Holder>, Option<Holder>) {
        (self.holder(), self.died_holder())
    }

    fn unlisted(&self, listed: &dyn Fn(&Path) -> bool) -> io::Result<Unlisted> {
        let active = self.holder().map(|h| h.run_id);
        let mut found = Vec::new();
        walk(&self.dir, Path::new(""), &mut |rel| {
            if !listed(rel) && !is_bookkeeping(rel, active.as_deref()) {
                found.push(rel.to_path_buf());
            }
        })?;
        let lines = describe_unlisted(&found);
        Ok(if self.is_shared() {
            // The current directory of runs without a site: its other files
            // are the user's, not problems.
            Unlisted {
                notes: lines.into_iter().map(|u| format!("{u} (a shared directory: not a problem)")).collect(),
                problems: Vec::new(),
            }
        } else {
            Unlisted { problems: lines, notes: Vec::new() }
        })
    }

    fn can_forget(&self) -> io::Result<()> {
        Ok(())
    }

    fn forget(&self, run_id: &str) -> io::Result<Vec<String>> {
        StoreRoot::forget(self, run_id)
    }

    fn resume_prune(&self) -> io::Result<Vec<String>> {
        retention::resume(self)
    }

    fn prune(&self, verdicts: &[Verdict]) -> io::Result<Vec<String>> {
        retention::apply(self, verdicts)
    }

    fn lock(&self, header: &RunHeader) -> Result<Locked, LockFailure> {
        match lock::acquire(&self.meta, &Holder::from(header)) {
            Ok((lock, died)) => Ok(Locked {
                lock: Box::new(lock),
                took_over: died.map(|dead| {
                    format!(
                        "took over the store's lock from {dead}: that run ended without releasing it (killed or \
                         crashed)"
                    )
                }),
            }),
            Err(e @ LockError::Held(_)) => Err(LockFailure::Busy(e.to_string())),
            Err(e) => Err(LockFailure::Failed(OpenError::new(e.to_string(), Fault::Outage))),
        }
    }

    fn recover(&self) -> io::Result<Vec<String>> {
        StoreRoot::recover(self)
    }

    /// A site's store is dedicated: its runs are the site's whatever it was
    /// called when each ran, so a renamed site file keeps its history, and
    /// the rename is said once (cron mails it). Two site files on one store
    /// take turns owning it and warn on every run, until they get a store
    /// each or both say `shared_store = true`, which tells their runs apart
    /// by name. A run without a site file writes into the current
    /// directory, which holds the user's own files too.
    fn claim_for_run(&self, site: &Site) {
        let shown = site.store.display();
        let Some(file) = &site.file else {
            if let Err(e) = self.mark_shared() {
                log::warn!(target: "offsite::run", "cannot mark {shown} as a shared directory: {e}");
            }
            return;
        };
        if site.shared_store {
            if let Err(e) = self.mark_sites_shared() {
                log::warn!(target: "offsite::run", "cannot mark {shown} as shared by sites: {e}");
            }
            return;
        }
        if StoreRoot::runs_of(self, &site.name) != Runs::All {
            return;
        }
        match self.claim(&site.name) {
            Ok(None) => {}
            Ok(Some((previous, count))) => log::warn!(
                target: "offsite::run",
                "the store {shown} was used by site {previous:?} ({count} run(s) under that name) and now by site \
                 {:?} ({}): a store's runs belong to it, so status and retention count them all as this site's. \
                 If the site was renamed, nothing more is needed; if two site files write here, give each its own \
                 store, or set `shared_store = true` in both",
                site.name,
                file.display()
            ),
            Err(e) => log::warn!(target: "offsite::run", "cannot record site {:?} as the store's: {e}", site.name),
        }
    }

    fn begin_run(
        &self,
        header: &RunHeader,
        budget: Budget,
        recipients: Vec<age::x25519::Recipient>,
    ) -> io::Result<Store> {
        self.begin_encrypted_run(header, budget, recipients)
    }

    /// The flock is held by this process for the whole run, so there is
    /// nothing to confirm.
    fn finish_run(&self, header: &RunHeader, store: &Store, outcome: &Outcome, _: &dyn Held) -> io::Result<Manifest> {
        StoreRoot::finish_run(self, header, store, outcome)
    }

    fn abandon_run(&self, store: Store) -> io::Result<()> {
        StoreRoot::abandon_run(self, store)
    }

    fn left_behind(&self, run_id: &str) -> String {
        format!("its files stay in {} for the next run to recover", kept_dir(run_id))
    }
}

/// The runner's own files, and the files of the run in progress.
fn is_bookkeeping(rel: &Path, active_run: Option<&str>) -> bool {
    let Ok(inner) = rel.strip_prefix(META_DIR) else { return false };
    if inner == Path::new(lock::LOCK_FILE)
        || inner == Path::new(run::SHARED_MARK)
        || inner == Path::new(run::SITES_MARK)
        || inner == Path::new(run::OWNER_FILE)
        || inner.starts_with(run::FORGOTTEN_DIR)
        // Large fetches kept for the next run (`outlet::Partial`): never
        // a backup, and removed after a week.
        || inner.starts_with(run::PARTIAL_DIR)
    {
        return true;
    }
    if let Ok(m) = inner.strip_prefix("manifests") {
        let name = m.to_string_lossy();
        return !m.as_os_str().is_empty()
            && (name.ends_with(".json") || name.ends_with(".json.sig"))
            && !name.starts_with(TEMP_PREFIX);
    }
    if let (Ok(r), Some(active)) = (inner.strip_prefix("runs"), active_run) {
        let first = r.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
        return first == active || first == format!("{active}.journal") || first == format!("{active}.manifest");
    }
    false
}

/// One line for each file no manifest lists, saying what it most likely is.
fn describe_unlisted(found: &[PathBuf]) -> Vec<String> {
    // A run that was killed or crashed left its journal (and what it had
    // staged) in `.offsite/runs/`; the next run records it as interrupted.
    let runs = Path::new(META_DIR).join("runs");
    let interrupted: BTreeSet<String> = found
        .iter()
        .filter_map(|rel| rel.strip_prefix(&runs).ok()?.to_str()?.strip_suffix(".journal").map(str::to_string))
        .collect();
    found
        .iter()
        .map(|rel| {
            let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            // `.offsite/runs/RUN.journal`, or a file staged in `.offsite/runs/RUN/`.
            let top = rel.strip_prefix(&runs).ok().and_then(|r| r.components().next()?.as_os_str().to_str());
            let of_run = top.map(|t| t.strip_suffix(".journal").map_or((t, false), |run| (run, true)));
            match of_run {
                Some((run, true)) if interrupted.contains(run) => format!(
                    "{}: the journal of run {run}, which was interrupted (killed or crashed); the next run of the \
                     site records it as interrupted",
                    rel.display()
                ),
                Some((run, false)) if interrupted.contains(run) => format!(
                    "{}: staged by run {run}, which was interrupted before it finished; the next run of the site \
                     records that run as interrupted",
                    rel.display()
                ),
                _ if name.starts_with(TEMP_PREFIX) => format!(
                    "{}: a leftover temporary file of an interrupted run (the next run removes it)",
                    rel.display()
                ),
                _ if name.ends_with(".json.pruning") => {
                    format!("{}: an interrupted prune (the next prune finishes it)", rel.display())
                }
                _ => format!("{}: unlisted: no manifest lists this file", rel.display()),
            }
        })
        .collect()
}

/// Every non-directory beneath `dir`, in sorted order. Iterative, and each
/// directory is opened from `dir` and closed before the next, so however
/// deep a store is, the walk holds a few descriptors, not one per level.
fn walk(dir: &Dir, rel: &Path, found: &mut dyn FnMut(&Path)) -> io::Result<()> {
    let mut stack = vec![rel.to_path_buf()];
    while let Some(rel) = stack.pop() {
        let here = if rel.as_os_str().is_empty() { dir.try_clone()? } else { dir.open_dir(&rel)? };
        let mut entries = Vec::new();
        for e in here.entries()? {
            let e = e?;
            entries.push((e.file_name(), e.file_type()?.is_dir()));
        }
        drop(here);
        entries.sort();
        let mut subdirs = Vec::new();
        for (name, is_dir) in entries {
            let path = rel.join(&name);
            if is_dir {
                subdirs.push(path);
            } else {
                found(&path);
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}
