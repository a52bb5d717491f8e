//! One interface to a site's store, whatever keeps its files.
//!
//! A run, `verify`, retention, `[[copy]]`, `status` and the restore
//! commands all reach a store through [`Backend`]; a directory on this
//! machine ([`super::StoreRoot`], in `dir.rs`) and a bucket
//! ([`super::s3::S3Root`]) are its implementations. What a site file says
//! ([`StoreAt`]) is turned into one in a single place, [`open`], so a new
//! kind of store is a new implementation, not a new arm in every command.
//!
//! A backend writes a run's files through the [`super::Store`] that
//! [`Backend::begin_run`] returns (see `outlet.rs` for where the bytes go),
//! and publishes them, or not, in [`Backend::finish_run`].

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::path::Path;
use std::time::Duration;

use super::lock::Holder;
use super::retention::Verdict;
use super::run::{BadManifest, Outcome, RunHeader, Runs};
use super::{Budget, Manifest, Store};
use crate::site::{Site, StoreAt};

/// A site's store. Every method is bounded by the timeout the store was
/// opened with (an S3 request), or is local I/O.
pub trait Backend: Send + Sync {
    /// A stored file (`rel` from the store's root, as a manifest locates
    /// it): its size, and its bytes as they are read. A missing file is
    /// `NotFound`; one that is no longer a regular file, `InvalidData`.
    fn open_file(&self, rel: &Path) -> io::Result<(u64, Box<dyn Read + '_>)>;

    /// A stored file's size, without reading it (errors as `open_file`'s).
    fn file_size(&self, rel: &Path) -> io::Result<u64> {
        self.open_file(rel).map(|(size, _)| size)
    }

    /// Every manifest, oldest run first, and the ones that cannot be read.
    fn manifests(&self) -> io::Result<(Vec<Manifest>, Vec<BadManifest>)>;

    /// The newest good run of `runs`.
    fn last_good(&self, runs: &Runs) -> io::Result<Option<Manifest>>;

    /// The raw bytes of a manifest and of its signature, if it has one.
    fn manifest_bytes(&self, run_id: &str) -> io::Result<(Vec<u8>, Option<Vec<u8>>)>;

    /// The runs whose manifest has a signature beside it, from one
    /// listing (nothing is read).
    fn signed_runs(&self) -> io::Result<BTreeSet<String>>;

    /// Rewrites a recorded run's manifest (and its signature): a run whose
    /// copy failed after it was recorded gets the warning.
    fn rewrite_manifest(&self, manifest: &Manifest) -> io::Result<()>;

    /// Which runs in the store are `site`'s.
    fn runs_of(&self, site: &str) -> Runs;

    /// Who is running now, and who died holding the lock.
    fn holders(&self) -> (Option<Holder>, Option<Holder>);

    /// What the store holds that no manifest lists (`listed` says which
    /// paths one does) and that is not the store's own bookkeeping: for
    /// `verify`.
    fn unlisted(&self, listed: &dyn Fn(&Path) -> bool) -> io::Result<Unlisted>;

    /// Whether `forget` works on this store: asked before the lock is
    /// taken, so a store that cannot forget refuses without touching it,
    /// saying what to do instead.
    fn can_forget(&self) -> io::Result<()>;

    /// `offsite forget`: records that a run lost files.
    fn forget(&self, run_id: &str) -> io::Result<Vec<String>>;

    /// Finishes prunes that were interrupted. One line per thing done.
    fn resume_prune(&self) -> io::Result<Vec<String>>;

    /// Removes the runs `verdicts` prune. One line per thing done.
    fn prune(&self, verdicts: &[Verdict]) -> io::Result<Vec<String>>;

    /// Takes the store's lock for `header`'s run (or a command named
    /// like one), without waiting.
    fn lock(&self, header: &RunHeader) -> Result<Locked, LockFailure>;

    /// Under the lock: finishes what interrupted runs left. One line per
    /// thing done.
    fn recover(&self) -> io::Result<Vec<String>>;

    /// Ties the store to `site` before its run: which runs are whose, and
    /// whether other files share the place. Problems are warnings.
    fn claim_for_run(&self, site: &Site);

    /// Starts a run: from here a crash is recorded by the next run.
    fn begin_run(
        &self,
        header: &RunHeader,
        budget: Budget,
        recipients: Vec<age::x25519::Recipient>,
    ) -> io::Result<Store>;

    /// Ends a run: a good one is published (if `lock` is still ours), any
    /// other keeps nothing visible; its manifest is written last.
    fn finish_run(&self, header: &RunHeader, store: &Store, outcome: &Outcome, lock: &dyn Held)
    -> io::Result<Manifest>;

    /// Gives up a run without recording it (a copy that failed, which the
    /// next run makes again).
    fn abandon_run(&self, store: Store) -> io::Result<()>;

    /// What a run that could not be recorded leaves, for its error.
    fn left_behind(&self, run_id: &str) -> String;
}

/// A held lock: released when dropped, or by [`Held::release`], which
/// says whether that worked.
pub trait Held: Send {
    /// Whether the lock is still ours, checked right before publishing.
    fn confirm(&self) -> Result<(), String>;

    /// Frees the lock for the next run.
    fn release(self: Box<Self>) -> Result<(), String>;
}

/// A lock taken, and the run it was taken over from, if that one died
/// holding it.
pub struct Locked {
    pub lock: Box<dyn Held>,
    pub took_over: Option<String>,
}

/// Why a lock was not taken.
#[derive(Debug)]
pub enum LockFailure {
    /// Another run holds it: who.
    Busy(String),
    /// The store could not be asked.
    Failed(OpenError),
}

impl std::fmt::Display for LockFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockFailure::Busy(who) => f.write_str(who),
            LockFailure::Failed(e) => e.fmt(f),
        }
    }
}

/// What `verify` reports of the files no manifest lists.
#[derive(Debug, Default)]
pub struct Unlisted {
    /// Problems: unlisted files, interrupted prunes.
    pub problems: Vec<String>,
    /// Worth a line under `-v`, not a problem.
    pub notes: Vec<String>,
}

/// A site's store, opened.
pub struct Root(Box<dyn Backend>);

impl std::ops::Deref for Root {
    type Target = dyn Backend;
    fn deref(&self) -> &(dyn Backend + 'static) {
        &*self.0
    }
}

impl Root {
    pub fn new(backend: impl Backend + 'static) -> Root {
        Root(Box::new(backend))
    }

    /// Opens a store that should exist already (`status`, `verify`,
    /// `prune`, restore): an S3 store is probed, so wrong credentials or a
    /// missing bucket are said here.
    pub fn open_existing(store: &StoreAt, timeout: Duration) -> Result<Root, OpenError> {
        open(store, Access::Existing, timeout, None)
    }
}

/// What opening a store may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read it: create nothing.
    Existing,
    /// Write runs into it: a directory is made if missing.
    Run,
    /// A `[[copy]]`: a directory must be there already (a disk that is
    /// not mounted must not be filled beneath its mount point), and its
    /// own files are then made.
    Copy,
}

/// Opens `store` for `access`, signing what it writes with `signer`. The
/// one place where a site's store setting becomes a [`Backend`].
pub fn open(
    store: &StoreAt,
    access: Access,
    timeout: Duration,
    signer: Option<ssh_key::PrivateKey>,
) -> Result<Root, OpenError> {
    match store {
        StoreAt::Dir(dir) => {
            let root = match access {
                Access::Existing => super::StoreRoot::open_existing(dir),
                Access::Run => super::StoreRoot::open(dir),
                Access::Copy if !dir.is_dir() => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "{} does not exist (a disk not mounted?); a copy goes only into a directory that is there \
                         (mkdir -m 700 it once where the copy belongs)",
                        dir.display()
                    ),
                )),
                Access::Copy => super::StoreRoot::open(dir),
            };
            let root = root.map_err(|e| OpenError::dir(e, access))?;
            Ok(Root::new(root.with_signer(signer)))
        }
        StoreAt::S3(spec) => {
            let root = super::s3::S3Root::open(spec, timeout).map_err(OpenError::s3)?.with_signer(signer);
            root.probe().map_err(OpenError::s3)?;
            Ok(Root::new(root))
        }
        StoreAt::Repo(spec) => Ok(Root::new(super::repo::RepoRoot::open(spec, access, timeout, signer)?)),
    }
}

/// Checks, creating and sending nothing, that a run could write into
/// `store`: what a dry run trips on first.
pub fn probe_for_run(store: &StoreAt, timeout: Duration) -> Result<(), OpenError> {
    match store {
        StoreAt::Dir(dir) => super::run::probe_writable(dir).map_err(|e| OpenError::dir(e, Access::Run)),
        StoreAt::S3(_) => open(store, Access::Existing, timeout, None).map(drop),
        StoreAt::Repo(spec) => {
            match &spec.at {
                crate::site::RepoAt::Dir(path) => {
                    super::run::probe_writable(path).map_err(|e| OpenError::dir(e, Access::Run))?
                }
                crate::site::RepoAt::S3(s3) => {
                    super::s3::S3Root::open(s3, timeout).and_then(|root| root.probe()).map_err(OpenError::s3)?
                }
            }
            super::repo::probe_password(&spec.password).map_err(|e| OpenError::new(e, Fault::Config))
        }
    }
}

/// Why a store could not be opened or used.
#[derive(Debug)]
pub struct OpenError {
    error: Box<dyn std::error::Error + Send + Sync>,
    fault: Fault,
}

/// Whose a fault is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No such store yet (a site that never ran).
    Missing,
    /// The configuration's: credentials, a bucket, a directory that is not
    /// a store. The site's to fix.
    Config,
    /// Nothing answers, or the server says it failed: the backup fails.
    Outage,
}

impl OpenError {
    pub fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync>>, fault: Fault) -> OpenError {
        OpenError { error: error.into(), fault }
    }

    fn dir(e: io::Error, access: Access) -> OpenError {
        let fault = match e.kind() {
            io::ErrorKind::NotFound if access == Access::Existing => Fault::Missing,
            _ => Fault::Config,
        };
        OpenError::new(e, fault)
    }

    pub(crate) fn s3(e: crate::s3::S3Error) -> OpenError {
        use crate::s3::S3Error;
        let fault =
            if matches!(e, S3Error::Unreachable(_) | S3Error::ServerFailed(_)) { Fault::Outage } else { Fault::Config };
        OpenError::new(e, fault)
    }

    /// No such directory (a site that never ran).
    pub fn is_not_found(&self) -> bool {
        self.fault == Fault::Missing
    }

    /// Whether the fault is the configuration's rather than the network's.
    pub fn is_config(&self) -> bool {
        self.fault != Fault::Outage
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for OpenError {}
