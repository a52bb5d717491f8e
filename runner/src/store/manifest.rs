//! Run manifests: what one run stored, what produced each file, and how
//! the run ended. A manifest is the last thing a run writes; a file counts
//! as a backup only when a good run's manifest lists it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StoredFile;

/// How a run ended. Ordered: when several things happen, the worst wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Everything the script asked for was stored.
    Ok,
    /// Stored, but something deserves a look (a denial the script handled,
    /// a warning it logged, a file that changed while it was read).
    Warning,
    /// The run failed or was interrupted after storing some files: they
    /// are kept aside, not as a backup.
    Incomplete,
    /// The run failed and stored nothing.
    Failed,
}

impl Status {
    pub const ALL: [Status; 4] = [Status::Ok, Status::Warning, Status::Incomplete, Status::Failed];

    /// A good run's files are a backup.
    pub fn is_good(self) -> bool {
        self <= Status::Warning
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warning => "warning",
            Status::Incomplete => "incomplete",
            Status::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The capability call that produced a stored file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// `interface.function`, e.g. `ssh.exec-to-file`.
    pub call: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The remote command as sent (secrets masked), or the remote path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// The local sources of an archive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// Entries of an archive's sources that could not be read and were left
    /// out (each also a warning of the run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// The remote command's exit status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<u32>,
}

/// The script a run executed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ScriptRef {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// Where it came from: the file, or `oci://...@sha256:...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Who signed it, when the site checks `script_signers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
}

/// What a run is: known when it starts (its journal's first line records
/// it, so an interrupted run can still be reported).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunHeader {
    pub run_id: String,
    pub site: String,
    /// The machine and process that ran it.
    pub hostname: String,
    pub pid: u32,
    pub script: ScriptRef,
    /// SHA-256 of the site's grants (see `Site::grants_digest`).
    pub grants_sha256: String,
    /// RFC 3339, local time with offset.
    pub started: String,
}

impl RunHeader {
    /// The header of a run whose own record was lost (a journal torn
    /// before its first line): only its id is known.
    pub fn unknown(run_id: &str, started: &str) -> RunHeader {
        RunHeader {
            run_id: run_id.to_string(),
            site: String::new(),
            hostname: String::new(),
            pid: 0,
            script: ScriptRef::default(),
            grants_sha256: String::new(),
            started: started.to_string(),
        }
    }
}

/// The record of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version of this file.
    pub format: u32,
    #[serde(flatten)]
    pub run: RunHeader,
    pub ended: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// For a run that did not succeed: the directory (relative to the store
    /// root) its files were kept in, instead of their paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_in: Option<String>,
    pub files: Vec<StoredFile>,
}

pub const FORMAT: u32 = 1;

impl Manifest {
    /// Where `entry` is, relative to the store root.
    pub fn location(&self, entry: &StoredFile) -> PathBuf {
        match &self.kept_in {
            Some(dir) => Path::new(dir).join(&entry.path),
            None => PathBuf::from(&entry.path),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    pub fn started_at(&self) -> Option<chrono::DateTime<chrono::FixedOffset>> {
        chrono::DateTime::parse_from_rfc3339(&self.run.started).ok()
    }

    pub fn ended_at(&self) -> Option<chrono::DateTime<chrono::FixedOffset>> {
        chrono::DateTime::parse_from_rfc3339(&self.ended).ok()
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a manifest serialises");
        out.push(b'\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_status_wins() {
        assert_eq!(Status::Ok.max(Status::Warning), Status::Warning);
        assert_eq!(Status::Incomplete.max(Status::Warning), Status::Incomplete);
        assert_eq!(Status::ALL.iter().copied().max(), Some(Status::Failed));
        assert!(Status::Warning.is_good() && !Status::Incomplete.is_good());
        assert_eq!(serde_json::to_string(&Status::Incomplete).unwrap(), "\"incomplete\"");
    }
}
