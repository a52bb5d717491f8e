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
    /// The run failed, but some of its calls succeeded: each of their
    /// outputs is complete by its own evidence and was published (except
    /// where it would have replaced an earlier file: that one is kept
    /// aside). `failed` names the outputs that were not made.
    Partial,
    /// The run failed or was interrupted after storing some files: they
    /// are kept aside, not as a backup.
    Incomplete,
    /// The run failed and stored nothing.
    Failed,
}

impl Status {
    pub const ALL: [Status; 5] = [Status::Ok, Status::Warning, Status::Partial, Status::Incomplete, Status::Failed];

    /// A good run's files are a backup.
    pub fn is_good(self) -> bool {
        self <= Status::Warning
    }

    /// A run whose files at their paths are backups: a good run (all of
    /// them) or a partial one (those not kept aside).
    pub fn publishes(self) -> bool {
        self <= Status::Partial
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warning => "warning",
            Status::Partial => "partial",
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
    /// root) its files were kept in, instead of their paths (for a partial
    /// run, only the files marked `kept`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_in: Option<String>,
    pub files: Vec<StoredFile>,
    /// The outputs the run's calls failed to make (see [`FailedOutput`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<FailedOutput>,
    /// In a restic repository store: the id of the run's snapshot, which
    /// holds its files (not in the manifest, which the snapshot holds).
    #[serde(skip)]
    pub snapshot: Option<String>,
}

/// An output a call failed to make: where the script asked for it, what
/// was called, and why it failed (the script's and the server's words,
/// bounded; escaped wherever shown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedOutput {
    /// The destination as the script named it.
    pub path: String,
    /// `interface.function`, as in [`Origin::call`].
    pub call: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub error: String,
}

impl FailedOutput {
    /// Its output name (see [`output_name`]).
    pub fn output(&self) -> String {
        output_name(&self.path)
    }
}

/// The name under which runs' files count as the same output: the path
/// with each time stamp or counter set aside. A run of digits (with `-`,
/// `_`, `:`, `.` or `T` between digit groups) that holds at least four
/// digits becomes `#`: `db1/sitedb-20040321-014844.sql.gz` is
/// `db1/sitedb-#.sql.gz`, and `server1` stays `server1`, so two servers'
/// dumps are two outputs. (A stored file's name counts without the
/// `.age` encryption adds, see `StoredFile::output`.) Status, retention,
/// the shrink check and the textfile track outputs by this name, so a
/// dump that failed for a week shows as such.
pub fn output_name(path: &str) -> String {
    let path = path.strip_prefix("./").unwrap_or(path);
    let chars: Vec<char> = path.chars().collect();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let start = i;
        let mut digits = 0;
        loop {
            while i < chars.len() && chars[i].is_ascii_digit() {
                digits += 1;
                i += 1;
            }
            let joined = i + 1 < chars.len() && "-_:.T".contains(chars[i]) && chars[i + 1].is_ascii_digit();
            if !joined {
                break;
            }
            i += 1;
        }
        if digits >= 4 {
            out.push('#');
        } else {
            out.extend(&chars[start..i]);
        }
    }
    out
}

pub const FORMAT: u32 = 1;

impl Manifest {
    /// Where `entry` is, relative to the store root.
    pub fn location(&self, entry: &StoredFile) -> PathBuf {
        if let Some(snapshot) = &self.snapshot {
            return Path::new(&format!("@{snapshot}")).join(&entry.path);
        }
        match &self.kept_in {
            Some(dir) if self.status != Status::Partial || entry.kept => Path::new(dir).join(&entry.path),
            _ => PathBuf::from(&entry.path),
        }
    }

    /// The files that are backups at their paths: all of a good run's,
    /// those of a partial run not kept aside, none of another run's.
    pub fn published(&self) -> impl Iterator<Item = &StoredFile> {
        let all = self.status.is_good();
        let partial = self.status == Status::Partial;
        self.files.iter().filter(move |f| all || (partial && !f.kept))
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
        assert!(!Status::Partial.is_good() && Status::Partial.publishes() && !Status::Incomplete.publishes());
        assert_eq!(Status::Partial.max(Status::Warning), Status::Partial);
        assert_eq!(serde_json::to_string(&Status::Incomplete).unwrap(), "\"incomplete\"");
    }

    #[test]
    fn output_names_set_digits_aside() {
        assert_eq!(output_name("db1/sitedb-20040321-014844.sql.gz"), "db1/sitedb-#.sql.gz");
        assert_eq!(output_name("./www.20261205-010000.tgz"), "www.#.tgz");
        assert_eq!(output_name("server1/db-2026-12-05T01:34:00.sql"), "server1/db-#.sql");
        assert_eq!(output_name("server2/db.1733363226.sql"), "server2/db.#.sql");
        assert_eq!(output_name("plain.txt"), "plain.txt");
        assert_ne!(output_name("server1/x-20261205.sql"), output_name("server2/x-20261205.sql"));
    }
}
