//! Host implementations of the `offsite:backup` interfaces, one module per
//! WIT interface. Each host function first asks the [`Policy`]; a refusal is
//! logged and returned to the script as a WIT error.

mod archive;
mod clock;
mod files;
mod lanes;
mod log;
pub mod pace;
mod params;
pub mod remote;
mod scp;
pub mod secrets;
mod ssh;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cap_std::fs::Dir;
use wasmtime::component::{Resource, ResourceTable};

use self::remote::{Job, JobSlot, Remote, Slots};
use crate::transport::Transport;

use crate::bindings::types::Error as WitError;
use crate::bindings::{meta, types};
use crate::policy::{Call, Grant, Policy};
use crate::store::manifest::FailedOutput;
use crate::store::{Store, StoredFile};

pub use self::clock::{Clock, format_instant};

/// Per-run state behind every capability.
pub struct Caps {
    /// Script name, used as the log target.
    pub script: String,
    /// The script's SHA-256, for the log and the audit file.
    pub script_sha256: String,
    /// Where `--audit` writes every decision.
    pub audit: Option<Arc<AuditLog>>,
    pub site: String,
    pub policy: Policy,
    pub clock: Clock,
    /// `None` while the script is only being described.
    pub store: Option<Arc<Store>>,
    pub call_timeout: Duration,
    /// When the whole run must end: every host call, and every background
    /// transfer, ends by then too (epochs only interrupt guest code).
    pub run_deadline: Option<std::time::Instant>,
    /// Check grants and read sources, but write nothing.
    pub dry_run: bool,
    /// A dry run that reaches no server either (`script diff` probes).
    pub offline: bool,
    /// An unreadable entry in an archive's sources fails the call
    /// (`[read] unreadable = "fail"`) instead of being left out with a
    /// warning.
    pub unreadable_fatal: bool,
    /// Values that must never appear in a log line.
    pub secrets: Vec<String>,
    /// Files this run has stored, in order of completion.
    pub outputs: Arc<Mutex<Vec<StoredFile>>>,
    /// Outputs the script asked for that were not made (see
    /// [`OutputNote`]).
    pub failed_outputs: Arc<Mutex<Vec<FailedOutput>>>,
    /// Calls refused by the policy during this run.
    pub denials: u32,
    /// Calls that failed otherwise: a run that still succeeds reports each
    /// as a warning (see `cli::run`), so swallowed failures are never `ok`.
    pub failed_calls: Vec<String>,
    read_dirs: Vec<Option<Dir>>,
    /// SSH connections; `None` when the site has no hosts.
    pub transport: Option<Arc<dyn Transport>>,
    /// Per-host idle timeouts.
    pub idle_timeouts: BTreeMap<String, Duration>,
    /// Per-host spread of large fetches.
    pub fetch_lanes: BTreeMap<String, remote::FetchLanes>,
    /// Bandwidth limits: each host's, shared by its transfers.
    pub host_paces: BTreeMap<String, Arc<pace::Pace>>,
    /// The site's, shared by every transfer of the run.
    pub site_pace: Option<Arc<pace::Pace>>,
    /// Where each of the site's secrets comes from.
    pub secret_sources: BTreeMap<String, crate::site::SecretSource>,
    /// What is sent with each deliverable secret (the site's, never the
    /// script's).
    pub deliveries: BTreeMap<String, crate::site::Delivery>,
    /// Bounds remote transfers running at once.
    pub slots: Arc<Slots>,
    pub captured_output: u64,
    /// `pending` and `secret` resources handed to the script.
    table: ResourceTable,
    open_secrets: usize,
    jobs: Vec<Arc<JobSlot>>,
    job_failures: Arc<AtomicU32>,
}

impl Caps {
    pub fn new(script: &str, site: &str, policy: Policy, clock: Clock) -> Caps {
        let roots = policy.read_roots().len();
        Caps {
            script: script.to_string(),
            script_sha256: String::new(),
            audit: None,
            site: site.to_string(),
            policy,
            clock,
            store: None,
            call_timeout: Duration::from_secs(3600),
            run_deadline: None,
            dry_run: false,
            offline: false,
            unreadable_fatal: false,
            secrets: Vec::new(),
            outputs: Arc::new(Mutex::new(Vec::new())),
            failed_outputs: Arc::new(Mutex::new(Vec::new())),
            denials: 0,
            failed_calls: Vec::new(),
            read_dirs: (0..roots).map(|_| None).collect(),
            transport: None,
            idle_timeouts: BTreeMap::new(),
            fetch_lanes: BTreeMap::new(),
            host_paces: BTreeMap::new(),
            site_pace: None,
            secret_sources: BTreeMap::new(),
            deliveries: BTreeMap::new(),
            slots: Arc::new(Slots::new(4)),
            captured_output: 1 << 20,
            table: ResourceTable::new(),
            open_secrets: 0,
            jobs: Vec::new(),
            job_failures: Arc::new(AtomicU32::new(0)),
        }
    }

    /// The files stored so far.
    pub fn outputs(&self) -> Vec<StoredFile> {
        self.outputs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The outputs asked for and not made so far.
    pub fn failed_outputs(&self) -> Vec<FailedOutput> {
        self.failed_outputs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A note to take of the output at `dest` that `call` is to make: if
    /// the call fails (denied included), the output is recorded as not
    /// made, so status and retention can tell which output failed.
    fn output_note(&self, call: &str, host: Option<&str>, dest: &str) -> OutputNote {
        OutputNote {
            list: Arc::clone(&self.failed_outputs),
            secrets: Arc::new(self.secrets.clone()),
            call: call.to_string(),
            host: host.map(str::to_string),
            path: dest.to_string(),
        }
    }

    /// When a host call started now must end: its own timeout, or the
    /// run's deadline if that comes first. `true` when the run's deadline
    /// is the one that binds.
    pub fn call_deadline(
        call_timeout: Duration,
        run_deadline: Option<std::time::Instant>,
    ) -> (std::time::Instant, bool) {
        let own = std::time::Instant::now() + call_timeout;
        match run_deadline {
            Some(run) if run < own => (run, true),
            _ => (own, false),
        }
    }

    /// Waits for every background transfer; returns the failures the
    /// script never saw (they fail the run).
    pub fn settle(&mut self) -> Vec<String> {
        remote::settle(&self.jobs)
    }

    /// What a remote call to `host` needs, detached from `self`.
    fn remote(&self, host: &str) -> Result<Remote, WitError> {
        let transport =
            self.transport.clone().ok_or_else(|| WitError::Denied(format!("host {host:?}: this site has no hosts")))?;
        Ok(Remote {
            transport,
            store: self.store.clone(),
            secrets: Arc::new(self.secrets.clone()),
            outputs: Arc::clone(&self.outputs),
            slots: Arc::clone(&self.slots),
            call_timeout: self.call_timeout,
            run_deadline: self.run_deadline,
            idle_timeout: self.idle_timeouts.get(host).copied().unwrap_or(Duration::from_secs(600)),
            captured_output: self.captured_output,
            fetch: self.fetch_lanes.get(host).copied().unwrap_or_default(),
            paces: self.host_paces.get(host).iter().copied().chain(&self.site_pace).cloned().collect(),
            dry_run: self.dry_run,
            offline: self.offline,
        })
    }

    /// Starts `work` in the background as a `pending` resource.
    fn start_job(
        &mut self,
        what: String,
        work: impl FnOnce() -> Result<types::FileInfo, WitError> + Send + 'static,
    ) -> Result<Resource<Job>, WitError> {
        if self.jobs.len() >= remote::MAX_JOBS {
            return Err(WitError::LimitExceeded(format!(
                "a run may start at most {} background transfers",
                remote::MAX_JOBS
            )));
        }
        let (job, slot) = Job::start(what, Arc::clone(&self.job_failures), work);
        self.jobs.push(slot);
        self.table.push(job).map_err(|e| WitError::LimitExceeded(format!("too many pending transfers: {e}")))
    }

    /// Starts an output-making transfer in the background once `prepared`
    /// (the policy's decision and the call's parts) is ready; `note`
    /// records the output as not made if either step fails.
    fn start_output<P: Send + 'static>(
        &mut self,
        note: OutputNote,
        what: String,
        prepared: Result<P, WitError>,
        work: impl FnOnce(P) -> Result<types::FileInfo, WitError> + Send + 'static,
    ) -> Result<Resource<Job>, WitError> {
        let prepared = prepared.inspect_err(|e| note.failed(e))?;
        self.start_job(what, move || {
            let result = work(prepared);
            note.record(&result);
            result
        })
    }

    /// Asks the policy about `call` and records the decision in the log
    /// and, with `--audit`, the audit file.
    fn decide(&mut self, call: Call<'_>) -> Result<Grant, WitError> {
        let decision = self.policy.check(&call);
        // The clock and the log grant nothing and are called in loops:
        // neither the log nor the audit file records them, so a script
        // cannot flood either through them.
        if matches!(call, Call::ClockNow | Call::ClockFormat | Call::Log) && decision.is_ok() {
            return decision.map_err(WitError::from);
        }
        let shown = crate::text::shorten_middle(&self.redact(&format!("{call:?}")), DENIAL_MAX).into_owned();
        match &decision {
            Ok(_) => ::log::debug!(
                target: "offsite::policy",
                "site {} script {}: allow {}: {shown}",
                self.site, self.script_sha256, call.interface()
            ),
            Err(denial) => {
                self.denials += 1;
                ::log::warn!(
                    target: "offsite::policy",
                    "site {}: refused {} call: {}",
                    self.site, call.interface(), crate::text::shorten_middle(&self.redact(&denial.to_string()), DENIAL_MAX)
                );
                ::log::debug!(target: "offsite::policy", "site {} script {}: deny {shown}", self.site, self.script_sha256);
            }
        }
        if let Some(audit) = &self.audit
            && audit.admit()
        {
            let record = serde_json::json!({
                "time": chrono::Local::now().to_rfc3339(),
                "site": self.site,
                "script": self.script,
                "script_sha256": self.script_sha256,
                "interface": call.interface(),
                "call": self.redact_json(call.to_json()),
                "decision": if decision.is_ok() { "allow" } else { "deny" },
                "reason": decision.as_ref().err().map(|d| self.redact(&d.to_string())),
            });
            audit.record(&record);
        }
        decision.map_err(WitError::from)
    }

    /// Records a failed call, whatever the script does with the error
    /// next: a run whose script swallowed a failed transfer is at best
    /// `warning`, never `ok`. Denials (counted in `denials` since `before`)
    /// were logged by `decide` already.
    fn noted<T>(&mut self, what: &str, before: u32, result: Result<T, WitError>) -> Result<T, WitError> {
        if let Err(e) = &result
            && self.denials == before
        {
            let line = format!("{what} failed: {}", self.redact(&describe_error(e)));
            ::log::info!(target: "offsite::calls", "site {}: {line}", self.site);
            self.failed_calls.push(line);
        }
        result
    }

    /// `value` with every secret replaced in every string in it.
    fn redact_json(&self, value: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::String(s) => Value::String(crate::text::shorten_middle(&self.redact(&s), DENIAL_MAX).into_owned()),
            Value::Array(a) => Value::Array(a.into_iter().map(|v| self.redact_json(v)).collect()),
            Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, self.redact_json(v))).collect()),
            other => other,
        }
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

/// `--audit FILE`: one JSON object per line, appended and flushed per
/// decision, so a killed run keeps what it decided.
pub struct AuditLog {
    file: Mutex<std::fs::File>,
    written: std::sync::atomic::AtomicUsize,
}

/// Most decisions one run writes to the audit file; past it one line says
/// so, and the file grows no further (each record is bounded too, so a
/// run adds at most about 30 MB).
pub const MAX_AUDIT_RECORDS: usize = 10_000;

impl AuditLog {
    /// Opens `path` for appending, creating it with mode 0600.
    pub fn open(path: &std::path::Path) -> std::io::Result<AuditLog> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        Ok(AuditLog { file: Mutex::new(file), written: Default::default() })
    }

    /// Whether one more decision may be written; the first one over the
    /// bound writes a note instead.
    fn admit(&self) -> bool {
        let n = self.written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n == MAX_AUDIT_RECORDS {
            self.record(&serde_json::json!({
                "time": chrono::Local::now().to_rfc3339(),
                "decision": "suppressed",
                "reason": format!("more than {MAX_AUDIT_RECORDS} decisions in this run; the rest are not written"),
            }));
        }
        n < MAX_AUDIT_RECORDS
    }

    fn record(&self, value: &serde_json::Value) {
        use std::io::Write;
        let mut line = value.to_string();
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(line.as_bytes()) {
            ::log::error!(target: "offsite::policy", "cannot write the audit log: {e}");
        }
    }
}

/// At most this many failed outputs are recorded per run, each path and
/// error bounded: a script that fails in a loop cannot grow the manifest.
const MAX_FAILED_OUTPUTS: usize = 256;
const FAILED_OUTPUT_TEXT: usize = 1024;

/// See [`Caps::output_note`]; moved into a background transfer's thread.
pub struct OutputNote {
    list: Arc<Mutex<Vec<FailedOutput>>>,
    secrets: Arc<Vec<String>>,
    call: String,
    host: Option<String>,
    path: String,
}

impl OutputNote {
    /// Records the output as not made if `result` is an error.
    pub fn record<T>(&self, result: &Result<T, WitError>) {
        if let Err(e) = result {
            self.failed(e);
        }
    }

    /// Records the output as not made, for `e`.
    pub fn failed(&self, e: &WitError) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() >= MAX_FAILED_OUTPUTS {
            return;
        }
        let bound = |t: &str| crate::text::shorten_middle(&redact(&self.secrets, t), FAILED_OUTPUT_TEXT).into_owned();
        list.push(FailedOutput {
            path: bound(&self.path),
            call: self.call.clone(),
            host: self.host.as_deref().map(bound),
            error: bound(&describe_error(e)),
        });
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

/// Masks secrets in a byte stream that arrives in pieces, before any of it
/// is kept, cut or shown: a secret split across two reads is still masked,
/// and a later cut of the output (keeping its last N bytes) can only cut a
/// mask, never a secret, so no prefix or suffix of a value survives.
///
/// It holds back the last `longest - 1` bytes of what it was given (the
/// start of an occurrence that may complete with the next piece) until
/// more arrives or [`StreamRedactor::finish`].
pub struct StreamRedactor {
    finders: Vec<memchr::memmem::Finder<'static>>,
    longest: usize,
    hold: Vec<u8>,
}

impl StreamRedactor {
    pub fn new(secrets: &[String]) -> StreamRedactor {
        let finders: Vec<_> = secrets
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| memchr::memmem::Finder::new(s.as_bytes()).into_owned())
            .collect();
        let longest = finders.iter().map(|f| f.needle().len()).max().unwrap_or(0);
        StreamRedactor { finders, longest, hold: Vec::new() }
    }

    /// Takes the next piece; returns what is now safe to keep.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        if self.finders.is_empty() {
            return data.to_vec();
        }
        self.hold.extend_from_slice(data);
        let mut out = Vec::with_capacity(self.hold.len());
        let mut at = 0;
        while let Some((pos, len)) = self.earliest(&self.hold[at..]) {
            out.extend_from_slice(&self.hold[at..at + pos]);
            out.extend_from_slice(b"***");
            at += pos + len;
        }
        // No whole secret starts in hold[at..]; one that completes later
        // must end in new bytes, so it starts in the last `longest - 1`.
        let safe = at.max(self.hold.len().saturating_sub(self.longest - 1));
        out.extend_from_slice(&self.hold[at..safe]);
        self.hold.drain(..safe);
        out
    }

    /// The end of the stream: what was held back (it holds no whole secret).
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.hold)
    }

    /// The first occurrence of any secret in `text`: (position, length);
    /// at equal positions, the longest.
    fn earliest(&self, text: &[u8]) -> Option<(usize, usize)> {
        self.finders
            .iter()
            .filter_map(|f| f.find(text).map(|pos| (pos, f.needle().len())))
            .min_by_key(|&(pos, len)| (pos, std::cmp::Reverse(len)))
    }
}

/// Maps an I/O failure on `what` to the WIT error the script sees.
pub(crate) fn io_error(what: &str, e: std::io::Error) -> WitError {
    match e.kind() {
        std::io::ErrorKind::NotFound => WitError::NotFound(format!("{what}: {e}")),
        std::io::ErrorKind::TimedOut => WitError::Timeout(format!("{what}: {e}")),
        std::io::ErrorKind::PermissionDenied => WitError::Denied(format!("{what}: {e}")),
        // Our own per-run budget (see store::Budget).
        std::io::ErrorKind::QuotaExceeded if e.get_ref().is_some() => WitError::LimitExceeded(format!("{what}: {e}")),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            WitError::Io(format!("{what}: the store is full: {e}"))
        }
        _ => WitError::Io(format!("{what}: {e}")),
    }
}

impl From<crate::policy::Denial> for WitError {
    fn from(d: crate::policy::Denial) -> Self {
        use crate::policy::Denial;
        // A denial quotes what the script asked for, which may be huge.
        let short = |m: String| crate::text::shorten_middle(&m, DENIAL_MAX).into_owned();
        match d {
            Denial::Denied(m) => WitError::Denied(short(m)),
            Denial::InvalidArgument(m) => WitError::InvalidArgument(short(m)),
            Denial::NotFound(m) => WitError::NotFound(short(m)),
        }
    }
}

/// Longest denial message, start and end kept.
const DENIAL_MAX: usize = 1024;

/// A WIT error as one line of text.
pub fn describe_error(e: &WitError) -> String {
    match e {
        WitError::Denied(m) => format!("denied: {m}"),
        WitError::NotFound(m) => format!("not found: {m}"),
        WitError::Io(m) => format!("I/O error: {m}"),
        WitError::Timeout(m) => format!("timeout: {m}"),
        WitError::RemoteFailed(m) => format!("remote failure: {m}"),
        WitError::InvalidArgument(m) => format!("invalid argument: {m}"),
        WitError::LimitExceeded(m) => format!("limit exceeded: {m}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn through(secrets: &[&str], pieces: &[&[u8]]) -> Vec<u8> {
        let secrets: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
        let mut r = StreamRedactor::new(&secrets);
        let mut out = Vec::new();
        for p in pieces {
            out.extend(r.push(p));
        }
        out.extend(r.finish());
        out
    }

    #[test]
    fn a_stream_redactor_masks_secrets_split_across_pieces() {
        assert_eq!(through(&["hunter2"], &[b"pass=hun", b"ter2 ok"]), b"pass=*** ok");
        assert_eq!(through(&["hunter2"], &[b"h", b"u", b"n", b"t", b"e", b"r", b"2", b"!"]), b"***!");
        assert_eq!(through(&["abc", "abcdef"], &[b"xabcdefx abc"]), b"x***x ***");
        assert_eq!(through(&[], &[b"plain", b" text"]), b"plain text");
        assert_eq!(through(&["secret"], &[b"secre"]), b"secre", "an incomplete value at the very end stays");
    }

    #[test]
    fn every_cut_of_a_redacted_stream_is_free_of_the_secret() {
        // The truncation attack: pad so that a cut to the last N bytes
        // falls inside the value; no cut may leave a piece of it.
        let secret = "Zq7-hunter2-s3cr3t";
        for pad in 0..64 {
            let mut text = vec![b'.'; pad];
            text.extend_from_slice(format!("quick={secret}\n").as_bytes());
            for chunk in [1, 3, 7, 4096] {
                let pieces: Vec<&[u8]> = text.chunks(chunk).collect();
                let out = through(&[secret], &pieces);
                for keep in 0..out.len() {
                    let tail = String::from_utf8_lossy(&out[out.len() - keep..]).into_owned();
                    for len in 4..secret.len() {
                        for part in [&secret[..len], &secret[secret.len() - len..]] {
                            assert!(!tail.contains(part), "{part:?} survived in {tail:?}");
                        }
                    }
                }
            }
        }
    }
}
