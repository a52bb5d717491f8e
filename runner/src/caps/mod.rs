//! Host implementations of the `offsite:backup` interfaces, one module per
//! WIT interface. Each host function first asks the [`Policy`]; a refusal is
//! logged and returned to the script as a WIT error.

mod archive;
mod clock;
mod log;
mod params;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cap_std::fs::Dir;

use crate::bindings::types::Error as WitError;
use crate::bindings::{meta, types};
use crate::policy::{Call, Grant, Policy};
use crate::store::{Store, StoredFile};

pub use self::clock::Clock;

/// Per-run state behind every capability.
pub struct Caps {
    /// Script name, used as the log target.
    pub script: String,
    pub site: String,
    pub policy: Policy,
    pub clock: Clock,
    /// `None` while the script is only being described.
    pub store: Option<Arc<Store>>,
    pub call_timeout: Duration,
    /// Check grants and read sources, but write nothing.
    pub dry_run: bool,
    /// Values that must never appear in a log line.
    pub secrets: Vec<String>,
    /// Files this run has stored, in order.
    pub outputs: Vec<StoredFile>,
    /// Calls refused by the policy during this run.
    pub denials: u32,
    read_dirs: Vec<Option<Dir>>,
}

impl Caps {
    pub fn new(script: &str, site: &str, policy: Policy, clock: Clock) -> Caps {
        let roots = policy.read_roots().len();
        Caps {
            script: script.to_string(),
            site: site.to_string(),
            policy,
            clock,
            store: None,
            call_timeout: Duration::from_secs(3600),
            dry_run: false,
            secrets: Vec::new(),
            outputs: Vec::new(),
            denials: 0,
            read_dirs: (0..roots).map(|_| None).collect(),
        }
    }

    /// Asks the policy about `call` and records the decision in the log.
    fn decide(&mut self, call: Call<'_>) -> Result<Grant, WitError> {
        let decision = self.policy.check(&call);
        match &decision {
            Ok(_) => {
                ::log::debug!(target: "offsite::policy", "site {}: allow {}: {:?}", self.site, call.interface(), call)
            }
            Err(denial) => {
                self.denials += 1;
                ::log::warn!(target: "offsite::policy", "site {}: refused {} call: {}", self.site, call.interface(), self.redact(&denial.to_string()));
            }
        }
        decision.map_err(WitError::from)
    }

    /// Replaces every secret value in `text` with `***`.
    pub fn redact(&self, text: &str) -> String {
        redact(&self.secrets, text)
    }

    fn store(&self) -> Result<&Arc<Store>, WitError> {
        self.store.as_ref().ok_or_else(|| WitError::Denied("no store is available while describing a script".into()))
    }

    /// The read root `index`, opened once per run.
    fn read_dir(&mut self, index: usize) -> Result<&Dir, WitError> {
        if self.read_dirs[index].is_none() {
            let root: &PathBuf = &self.policy.read_roots()[index];
            let dir = Dir::open_ambient_dir(root, cap_std::ambient_authority())
                .map_err(|e| io_error(&root.display().to_string(), e))?;
            self.read_dirs[index] = Some(dir);
        }
        Ok(self.read_dirs[index].as_ref().expect("opened above"))
    }
}

/// Replaces every one of `secrets` in `text` with `***`.
pub fn redact(secrets: &[String], text: &str) -> String {
    let mut out = text.to_string();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret.as_str(), "***");
    }
    out
}

/// Maps an I/O failure on `what` to the WIT error the script sees.
pub(crate) fn io_error(what: &str, e: std::io::Error) -> WitError {
    match e.kind() {
        std::io::ErrorKind::NotFound => WitError::NotFound(format!("{what}: {e}")),
        std::io::ErrorKind::TimedOut => WitError::Timeout(format!("{what}: {e}")),
        std::io::ErrorKind::PermissionDenied => WitError::Denied(format!("{what}: {e}")),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            WitError::Io(format!("{what}: the store is full: {e}"))
        }
        _ => WitError::Io(format!("{what}: {e}")),
    }
}

impl types::Host for Caps {}
impl meta::Host for Caps {}

/// Seconds and nanoseconds since the epoch for a `SystemTime`, negative
/// before 1970.
pub(crate) fn epoch_parts(t: SystemTime) -> (i64, u32) {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            }
        }
    }
}
