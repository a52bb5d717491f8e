//! How a command ends: its exit code, the failure that carries one, and
//! the helpers every command shares (the script runtime, opening a store
//! that should exist). Below `cli`, so `run`, `share` and `restore` need
//! not import the command line.
//!
//! Exit codes (also in docs/running.md):
//! - 0: the backup succeeded;
//! - 1: the backup failed (the script returned an error or trapped, or the
//!   run was partial);
//! - 2: usage, configuration or module error: nothing was attempted;
//! - 3: the script hit a sandbox limit (deadline, memory, stack);
//! - 4: another run of this site holds its lock.

use anyhow::anyhow;

use crate::engine::{Runtime, default_cache_dir};
use crate::store::Root;

/// Process exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    BackupFailed = 1,
    Usage = 2,
    Limit = 3,
    Locked = 4,
}

/// An error together with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub error: anyhow::Error,
}

pub(crate) trait ExitContext<T> {
    fn exit(self, exit: Exit) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> ExitContext<T> for Result<T, E> {
    fn exit(self, exit: Exit) -> Result<T, Failure> {
        self.map_err(|e| Failure { exit, error: e.into() })
    }
}

/// The exit codes, for `offsite --help` and every man page.
pub(crate) const EXIT_CODES: &[(Exit, &str)] = &[
    (Exit::Ok, "the backup succeeded (or the command found nothing wrong)"),
    (
        Exit::BackupFailed,
        "the backup failed: the script returned an error or trapped, or a run was partial; verify and status: \
         a problem was found",
    ),
    (Exit::Usage, "usage, configuration or script error: nothing was attempted"),
    (Exit::Limit, "the script hit a sandbox limit (deadline, memory, stack)"),
    (Exit::Locked, "another run of this site holds its lock"),
];

/// The script runtime, with the compile cache where this user keeps it.
pub(crate) fn runtime() -> Result<Runtime, Failure> {
    Runtime::new(default_cache_dir()).exit(Exit::Usage)
}

/// Opens a store that should exist: a configuration fault is exit 2, an
/// unreachable server exit 1.
pub(crate) fn open_existing(store: &crate::site::StoreAt, timeout: std::time::Duration) -> Result<Root, Failure> {
    Root::open_existing(store, timeout).map_err(|e| {
        let exit = if e.is_config() { Exit::Usage } else { Exit::BackupFailed };
        Failure { exit, error: anyhow!("store {}: {e}", store.display()) }
    })
}
