//! Site files: the TOML that grants one site's script what it may touch.
//!
//! Parsing is strict. An unknown key or a bad value is an error that names
//! the file, the line and the key, because a typo in a grant must never
//! silently widen or narrow what a backup does.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// Limits applied to one run of a site's script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock deadline for the whole run (guest code and host calls).
    pub deadline: Duration,
    /// Maximum linear memory of the script, in bytes.
    pub memory: u64,
    /// Timeout for any single host call.
    pub call_timeout: Duration,
    /// Remote transfers that may run at the same time (hosts in parallel).
    pub parallel: usize,
    /// Largest stdout or stderr `ssh.exec` captures; bigger output must be
    /// streamed with `exec-to-file`.
    pub captured_output: u64,
    /// Most bytes one run may store.
    pub max_bytes: u64,
    /// Most files one run may create in the store.
    pub max_files: u64,
    /// Bytes per second all of a run's transfers share (`bandwidth`).
    pub bandwidth: Option<u64>,
}

/// The least memory a script can start with: a Rust script's stack alone
/// is 1 MiB.
pub const MIN_MEMORY: u64 = 4 << 20;
/// The most a 32-bit WebAssembly memory can have.
pub const MAX_MEMORY: u64 = 4 << 30;

impl Limits {
    /// Values that would break every run: the key and why.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&self.memory) {
            return Err((
                "memory",
                format!("{} bytes is outside 4MiB..4GiB (a script needs a few MiB; wasm32 stops at 4GiB)", self.memory),
            ));
        }
        for (key, d) in [("deadline", self.deadline), ("call_timeout", self.call_timeout)] {
            if d.is_zero() {
                return Err((key, "must be longer than 0s".into()));
            }
        }
        if self.parallel == 0 {
            return Err(("parallel", "must be at least 1".into()));
        }
        if self.parallel > 256 {
            return Err(("parallel", "must be at most 256".into()));
        }
        for (key, n) in [("max_bytes", self.max_bytes), ("max_files", self.max_files)] {
            if n == 0 {
                return Err((key, "must be more than 0, or every run fails".into()));
            }
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: Duration::from_secs(6 * 3600),
            memory: 128 << 20,
            call_timeout: Duration::from_secs(3600),
            parallel: 4,
            captured_output: 1 << 20,
            max_bytes: u64::MAX,
            max_files: 100_000,
            bandwidth: None,
        }
    }
}

/// How often `watch` checks a followed registry tag, by default.
pub const DEFAULT_SCRIPT_POLL: Duration = Duration::from_secs(3600);

/// A site, resolved: every path is absolute and every root exists.
#[derive(Debug, Clone)]
pub struct Site {
    /// Short name used in logs and reports.
    pub name: String,
    /// The file it came from; `None` for the implicit current-directory site.
    pub file: Option<PathBuf>,
    /// Where backups are written: one directory, or one bucket and prefix.
    pub store: StoreAt,
    /// Several site files write into `store` (`shared_store = true`): each
    /// sees only the runs made under its name. Otherwise the store is the
    /// site's own and every run in it is the site's.
    pub shared_store: bool,
    /// Directories the script may archive from (canonical paths).
    pub read_roots: Vec<PathBuf>,
    /// Directory relative source paths resolve against.
    pub base_dir: PathBuf,
    /// An entry an archive cannot read fails the archive, instead of being
    /// left out with a warning (`[read] unreadable = "fail"`).
    pub unreadable_fatal: bool,
    pub params: BTreeMap<String, String>,
    pub limits: Limits,
    /// When set, the script's SHA-256 must equal this (lower-case hex).
    pub script_sha256: Option<String>,
    /// The remote hosts the script may name, with their grants.
    pub hosts: BTreeMap<String, HostConfig>,
    /// `ssh_config` file for every host (`ssh -F`); `None` means the
    /// user's own `~/.ssh/config`.
    pub ssh_config: Option<PathBuf>,
    /// Named secrets a script may pass (by handle) to a capability.
    pub secrets: BTreeMap<String, SecretSource>,
    /// How each secret that may leave the runner is sent, and to which
    /// programs (`[secrets.NAME]`'s `stdin` and `programs`). A secret with
    /// no entry here can be opened but never delivered.
    pub deliveries: BTreeMap<String, Delivery>,
    /// Which runs to keep after a good run (`[retention]`); empty keeps all.
    pub retention: crate::store::retention::Keep,
    /// Further stores each good run is copied to (`[[copy]]`).
    pub copies: Vec<CopyTo>,
    /// node_exporter textfile to rewrite after every run (`[report]`).
    pub prometheus: Option<PathBuf>,
    /// An output smaller than this percentage of the same output in the
    /// last good run is a warning (`[report] shrink_warning`; 0 is off).
    pub shrink_warning: u32,
    /// Who to tell when a run starts, succeeds or fails (`[notify]`).
    pub notify: Notify,
    /// At-rest protection (`[protect]`).
    pub protect: Protect,
    /// The script `offsite watch` runs for this site (`script`; `offsite
    /// run` takes it on its command line instead): a file, or a registry
    /// reference.
    pub script: Option<crate::share::reference::ScriptSource>,
    /// The OpenSSH allowed_signers file a script must be signed against
    /// (`script_signers`); `None` runs unsigned scripts.
    pub script_signers: Option<PathBuf>,
    /// A registry tag with no digest recorded in the site's lock file is
    /// run at whatever it points to now (`script_update = "follow"`),
    /// instead of being refused.
    pub script_follow: bool,
    /// How often `watch` checks a followed tag (`script_poll`).
    pub script_poll: Duration,
    /// When `offsite watch` runs the site (`schedule`, `timezone`).
    pub schedule: Option<crate::schedule::Schedule>,
    /// What `watch` does about runs missed while it was not running.
    pub missed: crate::schedule::Missed,
}

/// `[protect]`: encrypt outputs to age recipients, sign manifests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protect {
    /// `age1...` recipients (from `age_recipients` and `age_recipients_file`).
    pub recipients: Vec<String>,
    /// OpenSSH ed25519 private key that signs every manifest.
    pub signing_key: Option<PathBuf>,
    /// Public key `verify` checks signatures with (default: the signing
    /// key's `.pub`).
    pub verify_key: Option<PathBuf>,
}

/// `[notify]`: a command, an HTTP URL (healthchecks.io style), or both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notify {
    /// Program and arguments; the event is in its environment.
    pub command: Vec<String>,
    /// Pinged at `URL/start`, `URL` and `URL/fail`.
    pub url: Option<String>,
    pub timeout: Duration,
}

/// The most connections a host's `connections` may allow.
pub const MAX_CONNECTIONS: usize = 16;
/// A host's `connections`, `parallel_above` and `retries` when unset.
pub const DEFAULT_CONNECTIONS: usize = 4;
pub const DEFAULT_PARALLEL_ABOVE: u64 = 64 << 20;
pub const DEFAULT_RETRIES: u32 = 3;

/// One `[hosts.NAME]` section: how to reach the host and what may be done
/// there. Scripts only ever see `NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    pub name: String,
    /// Address or `~/.ssh/config` alias; defaults to `NAME`.
    pub address: String,
    pub port: Option<u16>,
    pub user: Option<String>,
    /// Private key file; without one the agent and ssh_config decide.
    pub identity: Option<PathBuf>,
    pub passphrase: Option<SecretSource>,
    /// `None`: OpenSSH's default (`~/.ssh/known_hosts`).
    pub known_hosts: Option<PathBuf>,
    /// `SHA256:...` fingerprint the host key must have.
    pub host_key: Option<String>,
    pub connect_timeout: Duration,
    /// A remote call that sends nothing for this long is abandoned.
    pub idle_timeout: Duration,
    /// OpenSSH's `Compression` for this host; `None`: ssh_config decides.
    /// It pays on a slow link for text (dumps), and costs CPU for nothing
    /// on a fast one or for data that is compressed already.
    pub compression: Option<bool>,
    /// Most SSH connections one fetch of a large file may use (1: one).
    pub connections: usize,
    /// A fetch of a file larger than this may spread over connections.
    pub parallel_above: u64,
    /// Bytes per second all of a run's transfers from this host share.
    pub bandwidth: Option<u64>,
    /// How often a connection that failed in a way that may pass
    /// (refused, reset, timed out) is tried again.
    pub retries: u32,
    /// A streamed command whose connection was lost before it produced
    /// a byte is run again (up to `retries`): for commands that may run
    /// twice.
    pub retry_streams: bool,
    /// Allowed commands: each an argv pattern (see `policy`).
    pub commands: Vec<Vec<String>>,
    /// Remote paths `scp.fetch` may copy: glob patterns on absolute paths.
    pub fetch: Vec<String>,
    /// Addresses this offsite server connects from, as the server sees
    /// them, for the `from=` of `offsite keys authorized-line`.
    pub from: Option<String>,
}

/// What the site sends when a script passes a secret handle to a remote
/// command: the stdin text (with `{secret}` replaced by the value), and the
/// programs (argv\[0\], exactly) it may be sent to. The script chooses
/// neither, so it cannot turn the delivery into an echo of the value or
/// point the program at a listener of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub stdin: String,
    pub programs: Vec<String>,
}

/// The directory a file is in: `.` for a bare file name (whose
/// `parent()` is the empty path, which no system call accepts).
pub fn dir_of(file: &Path) -> &Path {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Most bytes a secret's value may have (a password, a token, a key).
pub const MAX_SECRET_BYTES: usize = 4096;

/// Most bytes a secret's stdin template may have.
pub const MAX_STDIN_TEMPLATE: usize = 4096;

/// Where a secret comes from. The value is read when it is needed and never
/// stored in the site.
///
/// A file must be readable by its owner only, like a private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

impl Site {
    /// The implicit site used without `--site`: what a shell script started
    /// in `cwd` could do. It reads beneath `cwd`, writes into `cwd` and has
    /// no hosts.
    pub fn current_dir(cwd: &Path) -> Result<Site> {
        let cwd =
            cwd.canonicalize().with_context(|| format!("cannot resolve the current directory {}", cwd.display()))?;
        Ok(Site {
            name: cwd.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into()),
            file: None,
            store: StoreAt::Dir(cwd.clone()),
            shared_store: false,
            read_roots: vec![cwd.clone()],
            base_dir: cwd,
            unreadable_fatal: false,
            params: BTreeMap::new(),
            limits: Limits::default(),
            script_sha256: None,
            hosts: BTreeMap::new(),
            ssh_config: None,
            secrets: BTreeMap::new(),
            deliveries: BTreeMap::new(),
            retention: Default::default(),
            copies: Vec::new(),
            prometheus: None,
            shrink_warning: DEFAULT_SHRINK_WARNING,
            notify: Notify { timeout: NOTIFY_TIMEOUT, ..Notify::default() },
            protect: Protect::default(),
            script: None,
            script_signers: None,
            script_follow: false,
            script_poll: DEFAULT_SCRIPT_POLL,
            schedule: None,
            missed: Default::default(),
        })
    }

    /// Reads and validates a site file. Relative paths in it, and relative
    /// archive sources (a `path` parameter, say), resolve against the
    /// file's own directory, so a site means the same from cron (whose
    /// working directory is `$HOME`), `offsite watch` and a shell anywhere.
    pub fn load(path: &Path, cwd: &Path) -> Result<Site> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read site file {}", path.display()))?;
        Site::parse(&text, path, cwd)
    }

    /// Parses site file text; `path` names it in errors and anchors relative
    /// paths.
    pub fn parse(text: &str, path: &Path, cwd: &Path) -> Result<Site> {
        let raw: SiteFile = toml::from_str(text).map_err(|e| anyhow::anyhow!(describe_toml_error(path, text, &e)))?;
        let file_dir = path
            .parent()
            .map(|p| if p.as_os_str().is_empty() { cwd.to_path_buf() } else { cwd.join(p) })
            .unwrap_or_else(|| cwd.to_path_buf());
        // `FILE:LINE: key `K`` for a dotted key (`limits.parallel`, or a
        // section such as `hosts.server1`), like the parser's own errors.
        let at = |key: &str| {
            let first = key.split('/').next().unwrap_or(key);
            let line = match first.rsplit_once('.') {
                Some((section, k)) => key_line(text, section, k).or_else(|| key_line(text, first, "")),
                None => key_line(text, "", first).or_else(|| key_line(text, first, "")),
            };
            match line {
                Some(line) => format!("{}:{line}: key `{key}`", path.display()),
                None => format!("{}: key `{key}`", path.display()),
            }
        };

        let store = store_at(&raw.store, raw.s3, raw.repository, &file_dir)
            .map_err(|(key, why)| anyhow::anyhow!("{}: {why}", at(key)))?;
        let mut copies: Vec<CopyTo> = Vec::new();
        for (i, copy) in raw.copy.into_iter().enumerate() {
            let n = i + 1;
            let fail = |key: &str, why: String| anyhow::anyhow!("{}: (copy {n}) {why}", at(&format!("copy.{key}")));
            let to = store_at(&copy.store, copy.s3, copy.repository, &file_dir).map_err(|(key, why)| fail(key, why))?;
            if to == store || copies.iter().any(|c| c.store == to) {
                return Err(fail(
                    "store",
                    format!("{} is already a store of this site; a copy goes elsewhere", to.display()),
                ));
            }
            copies.push(CopyTo { store: to, retention: copy.retention.keep() });
        }
        let mut read_roots = Vec::new();
        for root in &raw.read.roots {
            let abs = file_dir.join(root);
            let canonical = abs.canonicalize().with_context(|| {
                format!("{}: read root {} does not exist or cannot be resolved", at("read.roots"), abs.display())
            })?;
            if !canonical.is_dir() {
                bail!("{}: read root {} is not a directory", at("read.roots"), abs.display());
            }
            read_roots.push(canonical);
        }
        let shrink_warning = match raw.report.shrink_warning.as_deref() {
            None => DEFAULT_SHRINK_WARNING,
            Some("off") => 0,
            Some(text) => {
                text.strip_suffix('%').and_then(|n| n.trim().parse::<u32>().ok()).filter(|n| *n <= 100).ok_or_else(
                    || {
                        anyhow::anyhow!(
                            "{}: {text:?} must be a percentage like \"50%\", or \"off\"",
                            at("report.shrink_warning")
                        )
                    },
                )?
            }
        };
        let unreadable_fatal = match raw.read.unreadable.as_deref() {
            None | Some("skip") => false,
            Some("fail") => true,
            Some(other) => bail!("{}: {other:?} must be \"skip\" or \"fail\"", at("read.unreadable")),
        };
        let script = match raw.script.as_deref() {
            Some(text) => {
                Some(crate::share::reference::ScriptSource::parse(text, &file_dir).with_context(|| at("script"))?)
            }
            None => None,
        };
        let script_follow = match raw.script_update.as_deref() {
            None | Some("pinned") => false,
            Some("follow") => true,
            Some(other) => bail!("{}: {other:?} must be \"pinned\" or \"follow\"", at("script_update")),
        };
        if script_follow && !matches!(script, Some(crate::share::reference::ScriptSource::Oci(_))) {
            bail!("{}: only a registry script (script = \"oci://...\") can follow a tag", at("script_update"));
        }
        if let Some(d) = &raw.script_poll
            && d.0 < Duration::from_secs(10)
        {
            bail!("{}: at least 10s, so a registry is not polled in a loop", at("script_poll"));
        }
        if let Some(pin) = &raw.script_sha256
            && (pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            bail!("{}: expected 64 hex digits, got {pin:?}", at("script_sha256"));
        }
        let defaults = Limits::default();
        let limits = Limits {
            deadline: raw.limits.deadline.map_or(defaults.deadline, |d| d.0),
            memory: raw.limits.memory.map_or(defaults.memory, |m| m.0),
            call_timeout: raw.limits.call_timeout.map_or(defaults.call_timeout, |d| d.0),
            parallel: raw.limits.parallel.unwrap_or(defaults.parallel),
            captured_output: raw.limits.captured_output.map_or(defaults.captured_output, |m| m.0),
            max_bytes: raw.limits.max_bytes.map_or(defaults.max_bytes, |m| m.0),
            max_files: raw.limits.max_files.unwrap_or(defaults.max_files),
            bandwidth: raw.limits.bandwidth.map(|r| r.0),
        };
        limits.validate().map_err(|(key, why)| anyhow::anyhow!("{}: {why}", at(&format!("limits.{key}"))))?;
        if let Some(name) = &raw.name
            && (name.trim().is_empty() || name.contains(['/', '\\']) || name.chars().any(char::is_control))
        {
            bail!("{}: {name:?} must be a plain name (no `/`, no control characters), like \"web1\"", at("name"));
        }
        let mut secrets = BTreeMap::new();
        let mut deliveries = BTreeMap::new();
        for (name, section) in raw.secrets {
            let key = at(&format!("secrets.{name}"));
            let source = match (section.file, section.env) {
                (Some(f), None) => SecretSource::File(expand_home(&f, &file_dir)),
                (None, Some(v)) => SecretSource::Env(v),
                _ => bail!("{key}: give exactly one of `file` or `env`"),
            };
            match (section.stdin, section.programs) {
                (None, None) => {}
                (Some(stdin), Some(programs)) => {
                    if !stdin.contains("{secret}") {
                        bail!("{key}: `stdin` must contain the {{secret}} placeholder");
                    }
                    if stdin.len() > MAX_STDIN_TEMPLATE || stdin.contains('\0') {
                        bail!("{key}: `stdin` must be text of at most {MAX_STDIN_TEMPLATE} bytes, without NUL");
                    }
                    if programs.is_empty() || programs.iter().any(|p| p.is_empty()) {
                        bail!("{key}: `programs` must name the program(s) the secret is sent to, like [\"mysqldump\"]");
                    }
                    deliveries.insert(name.clone(), Delivery { stdin, programs });
                }
                _ => bail!(
                    "{key}: give both `stdin` (what is sent, with {{secret}}) and `programs` (to which programs), or neither"
                ),
            }
            secrets.insert(name, source);
        }
        let mut hosts = BTreeMap::new();
        for (name, h) in raw.hosts {
            let host =
                h.resolve(&name, &file_dir).map_err(|e| anyhow::anyhow!("{}: {e}", at(&format!("hosts.{name}"))))?;
            hosts.insert(name, host);
        }
        if let Some(url) = &raw.notify.url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            bail!("{}: {url:?} must be an http:// or https:// URL", at("notify.url"));
        }
        if raw.notify.command.as_ref().is_some_and(|c| c.is_empty()) {
            bail!("{}: give the program and its arguments, like [\"/usr/local/bin/page-me\"]", at("notify.command"));
        }
        let recipients_file = raw.protect.age_recipients_file.map(|p| expand_home(&p, &file_dir));
        let mut recipients = raw.protect.age_recipients.clone();
        let parsed = crate::store::protect::recipients(&recipients, recipients_file.as_deref())
            .map_err(|e| anyhow::anyhow!("{}: {e}", at("protect.age_recipients")))?;
        recipients = parsed.iter().map(|r| r.to_string()).collect();
        let signing_key = raw.protect.signing_key.map(|p| expand_home(&p, &file_dir));
        let verify_key = raw.protect.verify_key.map(|p| expand_home(&p, &file_dir)).or_else(|| {
            signing_key.as_ref().map(|k| {
                let mut pub_key = k.clone().into_os_string();
                pub_key.push(".pub");
                PathBuf::from(pub_key)
            })
        });
        if !recipients.is_empty() && matches!(store, StoreAt::Repo(_)) {
            bail!(
                "{}: a restic repository encrypts everything with its own key; age recipients are for a store in a \
                 directory or a bucket",
                at("protect.age_recipients")
            );
        }
        let protect = Protect { recipients, signing_key, verify_key };
        if let Some(tz) = &raw.timezone
            && tz.parse::<chrono_tz::Tz>().is_err()
        {
            bail!("{}: {tz:?} is not a time zone name like \"Europe/Berlin\"", at("timezone"));
        }
        if raw.timezone.is_some() && raw.schedule.is_none() {
            bail!("{}: a time zone needs a `schedule`", at("timezone"));
        }
        let schedule = raw
            .schedule
            .as_deref()
            .map(|expr| crate::schedule::Schedule::parse(expr, raw.timezone.as_deref()))
            .transpose()
            .map_err(|e| {
                anyhow::anyhow!("{}: {e}", at(if raw.timezone.is_some() { "schedule/timezone" } else { "schedule" }))
            })?;
        let missed = match raw.missed.as_deref() {
            None => Default::default(),
            Some(text) => text.parse().map_err(|e| anyhow::anyhow!("{}: {e}", at("missed")))?,
        };
        let notify = Notify {
            command: raw.notify.command.unwrap_or_default(),
            url: raw.notify.url,
            timeout: raw.notify.timeout.map_or(NOTIFY_TIMEOUT, |d| d.0),
        };
        let name = match raw.name {
            Some(n) => n,
            None => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "site".into()),
        };
        Ok(Site {
            name,
            file: Some(path.to_path_buf()),
            store,
            shared_store: raw.shared_store,
            read_roots,
            base_dir: file_dir.clone(),
            unreadable_fatal,
            params: raw.params,
            limits,
            script_sha256: raw.script_sha256.map(|s| s.to_ascii_lowercase()),
            hosts,
            ssh_config: raw.ssh_config.map(|p| expand_home(&p, &file_dir)),
            secrets,
            deliveries,
            retention: raw.retention.keep(),
            copies,
            prometheus: raw.report.prometheus.map(|p| expand_home(&p, &file_dir)),
            shrink_warning,
            notify,
            protect,
            script,
            script_signers: raw.script_signers.map(|p| expand_home(&p, &file_dir)),
            script_follow,
            script_poll: raw.script_poll.map_or(DEFAULT_SCRIPT_POLL, |d| d.0),
            schedule,
            missed,
        })
    }

    /// SHA-256 of what the site grants (store, read roots, hosts and their
    /// commands and paths, secret and parameter names, limits), so a
    /// manifest shows whether two runs had the same grants. Secret and
    /// parameter values are left out.
    pub fn grants_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let hosts: BTreeMap<&str, serde_json::Value> = self
            .hosts
            .iter()
            .map(|(name, h)| {
                let value = serde_json::json!({
                    "address": h.address, "port": h.port, "user": h.user,
                    "commands": h.commands, "fetch": h.fetch,
                });
                (name.as_str(), value)
            })
            .collect();
        let grants = serde_json::json!({
            "store": self.store.display(),
            "copies": self.copies.iter().map(|c| c.store.display()).collect::<Vec<_>>(),
            "shared_store": self.shared_store,
            "read_roots": self.read_roots,
            "unreadable_fatal": self.unreadable_fatal,
            "hosts": hosts,
            "secrets": self.secrets.keys().collect::<Vec<_>>(),
            "deliveries": self.deliveries.iter().map(|(k, d)| (k, (&d.stdin, &d.programs))).collect::<BTreeMap<_, _>>(),
            "params": self.params.keys().collect::<Vec<_>>(),
            "limits": self.limits.to_string(),
        });
        hex::encode(Sha256::digest(grants.to_string().as_bytes()))
    }
}

/// The default `[report] shrink_warning`: an output at less than half its
/// last good size is a warning.
pub const DEFAULT_SHRINK_WARNING: u32 = 50;

/// How long a notification may take.
pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// The on-disk schema. `deny_unknown_fields` everywhere: a misspelt key is an
/// error, not a silently ignored grant.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteFile {
    name: Option<String>,
    store: PathBuf,
    #[serde(default)]
    shared_store: bool,
    /// The script `offsite watch` runs for this site.
    script: Option<String>,
    script_signers: Option<PathBuf>,
    script_update: Option<String>,
    script_poll: Option<HumanDuration>,
    /// Cron expression for `offsite watch`.
    schedule: Option<String>,
    timezone: Option<String>,
    missed: Option<String>,
    script_sha256: Option<String>,
    #[serde(default)]
    read: ReadSection,
    #[serde(default)]
    params: BTreeMap<String, String>,
    #[serde(default)]
    limits: LimitsSection,
    ssh_config: Option<PathBuf>,
    #[serde(default)]
    hosts: BTreeMap<String, HostSection>,
    #[serde(default)]
    secrets: BTreeMap<String, SecretSection>,
    #[serde(default)]
    retention: RetentionSection,
    #[serde(default)]
    report: ReportSection,
    #[serde(default)]
    notify: NotifySection,
    #[serde(default)]
    protect: ProtectSection,
    s3: Option<S3Section>,
    repository: Option<RepositorySection>,
    #[serde(default)]
    copy: Vec<CopySection>,
}

/// `[[copy]]`: a further store, with its own `[copy.s3]` and
/// `[copy.retention]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CopySection {
    store: PathBuf,
    s3: Option<S3Section>,
    repository: Option<RepositorySection>,
    #[serde(default)]
    retention: RetentionSection,
}

/// A further store a site's good runs are copied to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyTo {
    pub store: StoreAt,
    /// Which runs the copy keeps; empty keeps all.
    pub retention: crate::store::retention::Keep,
}

/// `[s3]`: how to reach an `s3://` store. Credentials are never here.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct S3Section {
    endpoint: Option<String>,
    region: Option<String>,
    #[serde(default)]
    path_style: bool,
    profile: Option<String>,
    part_size: Option<ByteSize>,
    lock_stale: Option<HumanDuration>,
}

/// `[repository]`: where the password of a `restic:` store comes from.
/// The password itself is never here.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RepositorySection {
    password_file: Option<PathBuf>,
    password_command: Option<String>,
}

/// Where a site's backups go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAt {
    /// A directory on this machine.
    Dir(PathBuf),
    /// A bucket and prefix on S3-compatible storage.
    S3(Box<S3Store>),
    /// A restic repository (`restic:PATH`).
    Repo(Box<RepoStore>),
}

/// A `restic:` store: a restic repository (format 2) in a directory or a
/// bucket, and where its password comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoStore {
    pub at: RepoAt,
    pub password: PasswordFrom,
}

/// Where a repository is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoAt {
    Dir(PathBuf),
    S3(Box<S3Store>),
}

impl RepoStore {
    /// For messages: `restic:PATH` or `restic:s3://BUCKET/PREFIX`.
    pub fn display(&self) -> String {
        match &self.at {
            RepoAt::Dir(p) => format!("{RESTIC_PREFIX}{}", p.display()),
            RepoAt::S3(s) => format!("{RESTIC_PREFIX}{}", s.location),
        }
    }
}

/// Where a repository's password comes from, as restic users keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordFrom {
    /// `[repository] password_file`: a file only its owner can read.
    File(PathBuf),
    /// `[repository] password_command`: run with `sh -c`; its output.
    Command(String),
    /// Neither: `RESTIC_PASSWORD_FILE` in the environment of the run.
    EnvFile,
}

/// The prefix of a repository store.
pub const RESTIC_PREFIX: &str = "restic:";

/// An `s3://` store and the `[s3]` settings that reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Store {
    pub location: crate::s3::S3Location,
    pub settings: crate::s3::S3Settings,
    /// Size of each part of a multipart upload (`[s3] part_size`).
    pub part_size: u64,
    /// A lock not renewed for this long belongs to a dead run
    /// (`[s3] lock_stale`).
    pub lock_stale: Duration,
}

/// `[s3] part_size` unless set: objects up to 160 GiB in 10,000 parts.
pub const DEFAULT_PART_SIZE: u64 = 16 << 20;
/// `[s3] lock_stale` unless set.
pub const DEFAULT_LOCK_STALE: Duration = Duration::from_secs(600);

impl StoreAt {
    /// The directory, for a store on this machine.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            StoreAt::Dir(p) => Some(p),
            StoreAt::S3(_) | StoreAt::Repo(_) => None,
        }
    }

    /// For messages: the directory's path, or `s3://BUCKET/PREFIX`.
    pub fn display(&self) -> String {
        match self {
            StoreAt::Dir(p) => p.display().to_string(),
            StoreAt::S3(s) => s.location.to_string(),
            StoreAt::Repo(r) => r.display(),
        }
    }
}

/// The site file's `store` (and `[s3]`), or the key at fault and why.
fn store_at(
    raw: &Path,
    s3: Option<S3Section>,
    repository: Option<RepositorySection>,
    file_dir: &Path,
) -> Result<StoreAt, (&'static str, String)> {
    let text = raw.to_string_lossy();
    if text.is_empty() {
        return Err(("store", "name the directory backups go into, like \"/srv/offsite/web1\"".into()));
    }
    if text.chars().any(char::is_control) {
        return Err(("store", format!("{} holds a control character", crate::text::escape(&text))));
    }
    if let Some(rest) = text.strip_prefix(RESTIC_PREFIX) {
        return repo_at(rest, s3, repository, file_dir);
    }
    if repository.is_some() {
        return Err((
            "repository",
            format!("a [repository] table is for a store = \"{RESTIC_PREFIX}PATH\" (a restic repository)"),
        ));
    }
    if !text.starts_with("s3://") {
        if s3.is_some() {
            return Err((
                "s3",
                "an [s3] table is for a store = \"s3://BUCKET/PREFIX\"; this store is a directory".into(),
            ));
        }
        return Ok(StoreAt::Dir(file_dir.join(raw)));
    }
    Ok(StoreAt::S3(Box::new(s3_at(&text, s3)?)))
}

/// An `s3://` location and the `[s3]` settings that reach it.
fn s3_at(text: &str, s3: Option<S3Section>) -> Result<S3Store, (&'static str, String)> {
    let location = crate::s3::S3Location::parse(text).map_err(|e| ("store", e))?;
    let s3 = s3.unwrap_or(S3Section {
        endpoint: None,
        region: None,
        path_style: false,
        profile: None,
        part_size: None,
        lock_stale: None,
    });
    let settings = crate::s3::S3Settings {
        endpoint: s3.endpoint,
        region: s3.region,
        path_style: s3.path_style,
        profile: s3.profile,
    };
    settings.check().map_err(|e| ("s3.endpoint", e))?;
    let part_size = s3.part_size.map_or(DEFAULT_PART_SIZE, |b| b.0);
    if !(5 << 20..=5 << 30).contains(&part_size) {
        return Err(("s3.part_size", "must be between 5MiB and 5GiB (S3's limits for a part)".into()));
    }
    let lock_stale = s3.lock_stale.map_or(DEFAULT_LOCK_STALE, |d| d.0);
    if lock_stale < Duration::from_secs(10) {
        return Err(("s3.lock_stale", "must be at least 10s (the lock is renewed every tenth of it)".into()));
    }
    Ok(S3Store { location, settings, part_size, lock_stale })
}

/// A `restic:` store, and the `[repository]` table that says where its
/// password comes from.
fn repo_at(
    rest: &str,
    s3: Option<S3Section>,
    repository: Option<RepositorySection>,
    file_dir: &Path,
) -> Result<StoreAt, (&'static str, String)> {
    let at = if rest.starts_with("s3://") {
        RepoAt::S3(Box::new(s3_at(rest, s3)?))
    } else if rest.starts_with("s3:") {
        return Err(("store", format!("a repository in a bucket is {RESTIC_PREFIX}s3://BUCKET/PREFIX")));
    } else if s3.is_some() {
        return Err(("s3", "an [s3] table is for a bucket; this repository is in a directory".into()));
    } else {
        RepoAt::Dir(file_dir.join(rest))
    };
    if rest.is_empty() {
        return Err(("store", format!("name the repository's directory, like \"{RESTIC_PREFIX}/srv/offsite/repo\"")));
    }
    let section = repository.unwrap_or(RepositorySection { password_file: None, password_command: None });
    let password = match (section.password_file, section.password_command) {
        (Some(_), Some(_)) => {
            return Err(("repository", "give password_file or password_command, not both".into()));
        }
        (Some(file), None) => PasswordFrom::File(expand_home(&file, file_dir)),
        (None, Some(command)) if command.trim().is_empty() => {
            return Err(("repository.password_command", "is empty".into()));
        }
        (None, Some(command)) => PasswordFrom::Command(command),
        (None, None) => PasswordFrom::EnvFile,
    };
    Ok(StoreAt::Repo(Box::new(RepoStore { at, password })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ProtectSection {
    #[serde(default)]
    age_recipients: Vec<String>,
    age_recipients_file: Option<PathBuf>,
    signing_key: Option<PathBuf>,
    verify_key: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RetentionSection {
    keep_last: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_monthly: Option<u32>,
}

impl RetentionSection {
    fn keep(&self) -> crate::store::retention::Keep {
        crate::store::retention::Keep {
            last: self.keep_last.unwrap_or(0),
            daily: self.keep_daily.unwrap_or(0),
            weekly: self.keep_weekly.unwrap_or(0),
            monthly: self.keep_monthly.unwrap_or(0),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReportSection {
    prometheus: Option<PathBuf>,
    /// `"50%"` (default), another percentage, or `"off"`.
    shrink_warning: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NotifySection {
    command: Option<Vec<String>>,
    url: Option<String>,
    timeout: Option<HumanDuration>,
}

/// `name = { file = "..." }` or `name = { env = "VAR" }`, optionally with
/// `stdin = "...{secret}..."` and `programs = ["..."]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretSection {
    file: Option<PathBuf>,
    env: Option<String>,
    stdin: Option<String>,
    programs: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostSection {
    address: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    identity: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
    passphrase_env: Option<String>,
    known_hosts: Option<PathBuf>,
    host_key: Option<String>,
    connect_timeout: Option<HumanDuration>,
    idle_timeout: Option<HumanDuration>,
    compression: Option<bool>,
    connections: Option<usize>,
    parallel_above: Option<ByteSize>,
    bandwidth: Option<Rate>,
    retries: Option<u32>,
    retry_streams: Option<bool>,
    #[serde(default)]
    commands: Vec<Vec<String>>,
    #[serde(default)]
    fetch: Vec<String>,
    from: Option<String>,
}

impl HostSection {
    fn resolve(self, name: &str, file_dir: &Path) -> Result<HostConfig, String> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(format!("host name {name:?} may only use letters, digits, `-`, `_` and `.`"));
        }
        let passphrase = match (self.passphrase_file, self.passphrase_env) {
            (Some(_), Some(_)) => return Err("set passphrase_file or passphrase_env, not both".into()),
            (Some(f), None) => Some(SecretSource::File(expand_home(&f, file_dir))),
            (None, Some(v)) => Some(SecretSource::Env(v)),
            (None, None) => None,
        };
        if passphrase.is_some() && self.identity.is_none() {
            return Err("a passphrase needs an `identity` key file".into());
        }
        if let Some(fp) = &self.host_key
            && !fp.starts_with("SHA256:")
        {
            return Err(format!(
                "host_key {fp:?} must be a SHA256 fingerprint as `ssh-keygen -lf` prints it, like \"SHA256:...\""
            ));
        }
        if let Some(from) = &self.from
            && (from.is_empty() || from.contains(['"', '\n', '\r', ' ']))
        {
            return Err(format!(
                "from {from:?} must be an address list as authorized_keys takes it, like \"192.0.2.7\" or \"192.0.2.0/24,2001:db8::7\""
            ));
        }
        let connections = self.connections.unwrap_or(DEFAULT_CONNECTIONS);
        if !(1..=MAX_CONNECTIONS).contains(&connections) {
            return Err(format!("connections = {connections}: give 1 to {MAX_CONNECTIONS}"));
        }
        let parallel_above = self.parallel_above.map_or(DEFAULT_PARALLEL_ABOVE, |b| b.0);
        let retries = self.retries.unwrap_or(DEFAULT_RETRIES);
        if retries > 10 {
            return Err(format!("retries = {retries}: give 0 to 10"));
        }
        for (i, pattern) in self.commands.iter().enumerate() {
            crate::policy::CommandPattern::new(pattern).map_err(|e| format!("commands[{i}]: {e}"))?;
        }
        for (i, pattern) in self.fetch.iter().enumerate() {
            crate::policy::PathPattern::new(pattern).map_err(|e| format!("fetch[{i}]: {e}"))?;
        }
        Ok(HostConfig {
            name: name.to_string(),
            address: self.address.unwrap_or_else(|| name.to_string()),
            port: self.port,
            user: self.user,
            identity: self.identity.map(|p| expand_home(&p, file_dir)),
            passphrase,
            known_hosts: self.known_hosts.map(|p| expand_home(&p, file_dir)),
            host_key: self.host_key,
            connect_timeout: self.connect_timeout.map_or(Duration::from_secs(15), |d| d.0),
            idle_timeout: self.idle_timeout.map_or(Duration::from_secs(600), |d| d.0),
            compression: self.compression,
            connections,
            parallel_above,
            bandwidth: self.bandwidth.map(|r| r.0),
            retries,
            retry_streams: self.retry_streams.unwrap_or(false),
            commands: self.commands,
            fetch: self.fetch,
            from: self.from,
        })
    }
}

/// `~/x` against the home directory (`$HOME`, else the password
/// database's), other relative paths against `base`.
pub(crate) fn expand_home(p: &Path, base: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~")
        && let Some(home) = crate::home::home_dir()
    {
        return home.join(rest);
    }
    base.join(p)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReadSection {
    #[serde(default)]
    roots: Vec<PathBuf>,
    /// `"skip"` (default) or `"fail"`.
    unreadable: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    deadline: Option<HumanDuration>,
    memory: Option<ByteSize>,
    call_timeout: Option<HumanDuration>,
    parallel: Option<usize>,
    captured_output: Option<ByteSize>,
    max_bytes: Option<ByteSize>,
    max_files: Option<u64>,
    bandwidth: Option<Rate>,
}

/// A duration written as `90s`, `30m`, `6h` or `1h 30m`.
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match humantime::parse_duration(&s) {
            Ok(v) if !v.is_zero() => Ok(HumanDuration(v)),
            Ok(_) => Err(serde::de::Error::custom("a duration must be greater than zero")),
            Err(e) => Err(serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); write it like \"90s\", \"30m\" or \"6h\""
            ))),
        }
    }
}

/// A size written as a number of bytes or with a unit: `512MiB`, `2G`.
struct ByteSize(u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => parse_size(&s).map(ByteSize).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses a rate as the site file writes it: `20MiB/s`, `500KiB/s`,
/// `100M/s` (units of 1024, as every size in the site file).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let size = s.trim().strip_suffix("/s").ok_or_else(|| format!("{s:?} is not a rate; write it like \"20MiB/s\""))?;
    let rate = parse_size(size.trim()).map_err(|e| format!("{s:?}: {e}"))?;
    if rate < 1024 {
        return Err(format!("{s:?} is below 1KiB/s; write it like \"20MiB/s\""));
    }
    Ok(rate)
}

/// A rate for messages: `20MiB/s`, `512KiB/s`, `1.5MiB/s`.
pub fn show_rate(rate: u64) -> String {
    let (n, unit) = if rate >= 1 << 30 {
        (rate as f64 / f64::from(1u32 << 30), "GiB")
    } else if rate >= 1 << 20 {
        (rate as f64 / f64::from(1u32 << 20), "MiB")
    } else {
        (rate as f64 / 1024.0, "KiB")
    };
    if n.fract() == 0.0 { format!("{n:.0}{unit}/s") } else { format!("{n:.1}{unit}/s") }
}

/// A rate as [`parse_rate`] reads it.
struct Rate(u64);

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_rate(&String::deserialize(d)?).map(Rate).map_err(serde::de::Error::custom)
    }
}

/// Parses `123`, `64KiB`, `512MiB`, `2GiB`, `1G`, `10M`, in any case:
/// `KiB`/`MiB`/`GiB`/`TiB` and bare `K`/`M`/`G`/`T` are powers of 1024,
/// `KB`/`MB`/`GB`/`TB` powers of 1000, as their standards say.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}; write it like \"512MiB\""))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => return Err(format!("unknown size unit {other:?} in {s:?}; use KiB, MiB or GiB")),
    };
    n.checked_mul(factor).ok_or_else(|| format!("size {s:?} is too large"))
}

/// The 1-based line of `key = ...` in `[section]` (`""` for the top level);
/// with an empty `key`, the line of the section header itself.
pub fn key_line(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = header.trim().to_string();
            if key.is_empty() && current == section {
                return Some(i + 1);
            }
            continue;
        }
        if current == section
            && !key.is_empty()
            && let Some((k, _)) = line.split_once('=')
            && k.trim().trim_matches('"') == key
        {
            return Some(i + 1);
        }
    }
    None
}

/// Renders a TOML error as `FILE:LINE:COL: key `K`: message`, the way a
/// compiler would, so the user can jump straight to it.
fn describe_toml_error(path: &Path, text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim_end();
    let Some(span) = err.span() else {
        return format!("{}: {message}", path.display());
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let col = text[line_start..start].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| !k.is_empty() && !k.starts_with('['));
    let key = match key {
        Some(k) => format!(" key `{k}`:"),
        None => String::new(),
    };
    format!("{}:{line_no}:{col}:{key} {message}\n    {line}", path.display())
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "deadline {}, memory {} MiB, call timeout {}, {} parallel transfer(s)",
            humantime::format_duration(self.deadline),
            self.memory >> 20,
            humantime::format_duration(self.call_timeout),
            self.parallel
        )?;
        if let Some(rate) = self.bandwidth {
            write!(f, ", bandwidth {}", show_rate(rate))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_written_with_a_unit_per_second() {
        assert_eq!(parse_rate("20MiB/s"), Ok(20 << 20));
        assert_eq!(parse_rate(" 512KiB/s "), Ok(512 << 10));
        assert!(parse_rate("20MiB").unwrap_err().contains("not a rate"));
        assert!(parse_rate("10/s").unwrap_err().contains("below"));
    }

    fn parse(text: &str) -> Result<Site> {
        let dir = std::env::temp_dir();
        Site::parse(text, Path::new("/etc/offsite/web1.toml"), &dir)
    }

    #[test]
    fn minimal_site_uses_defaults_and_file_stem() {
        let site = parse("store = \"/srv/backup/web1\"\n").unwrap();
        assert_eq!(site.name, "web1");
        assert_eq!(site.store.dir(), Some(Path::new("/srv/backup/web1")));
        assert_eq!(site.limits, Limits::default());
        assert!(site.read_roots.is_empty());
    }

    /// The site owns what is sent with a secret: a bounded template with
    /// the placeholder, and the programs it goes to; both or neither.
    #[test]
    fn secret_deliveries_are_bounded_and_complete() {
        let site = parse(
            "store = \"/x\"\n[secrets]\ndb = { env = \"V\", stdin = \"password={secret}\", programs = [\"mysqldump\"] }\n\
             token = { env = \"T\" }\n",
        )
        .unwrap();
        assert_eq!(
            site.deliveries.get("db"),
            Some(&Delivery { stdin: "password={secret}".into(), programs: vec!["mysqldump".into()] })
        );
        assert!(!site.deliveries.contains_key("token"));
        let err = |text: &str| parse(&format!("store = \"/x\"\n[secrets]\n{text}\n")).unwrap_err().to_string();
        assert!(err("db = { env = \"V\", stdin = \"{secret}\" }").contains("give both"));
        assert!(err("db = { env = \"V\", stdin = \"no placeholder\", programs = [\"x\"] }").contains("placeholder"));
        assert!(err("db = { env = \"V\", stdin = \"{secret}\", programs = [] }").contains("`programs` must name"));
        // A template big enough to fill a pipe is refused at parse time.
        let big = format!("db = {{ env = \"V\", stdin = \"{{secret}}{}\", programs = [\"x\"] }}", "x".repeat(70_000));
        assert!(err(&big).contains("at most 4096 bytes"));
    }

    /// Values `check` used to accept that break every run, each refused
    /// with the file, the line and the key.
    #[test]
    fn values_that_break_every_run_are_refused_with_their_line() {
        let err = |text: &str| parse(text).unwrap_err().to_string();
        let e = err("store = \"/x\"\n[limits]\nmemory = \"0\"\n");
        assert!(e.starts_with("/etc/offsite/web1.toml:3: key `limits.memory`") && e.contains("outside 4MiB"), "{e}");
        assert!(err("store = \"/x\"\n[limits]\nmemory = \"1KiB\"\n").contains("outside 4MiB"));
        assert!(err("store = \"/x\"\n[limits]\nmemory = \"100TiB\"\n").contains("4GiB"));
        let e = err("store = \"/x\"\n\n[limits]\nparallel = 0\n");
        assert!(e.starts_with("/etc/offsite/web1.toml:4: key `limits.parallel`"), "{e}");
        assert!(err("store = \"/x\"\n[limits]\nmax_bytes = 0\n").contains("more than 0"));
        assert!(err("store = \"/x\"\n[limits]\ndeadline = \"0s\"\n").contains("greater than zero"));
        let e = err("store = \"\"\n");
        assert!(e.starts_with("/etc/offsite/web1.toml:1: key `store`"), "{e}");
        assert!(err("name = \"\"\nstore = \"/x\"\n").contains("key `name`"));
        assert!(err("name = \"a/b\"\nstore = \"/x\"\n").contains("plain name"));
        let e = err("store = \"/x\"\ntimezone = \"Mars/Olympus\"\n");
        assert!(e.starts_with("/etc/offsite/web1.toml:2: key `timezone`") && e.contains("not a time zone"), "{e}");
        let e = err("store = \"/x\"\nschedule = \"every day\"\n");
        assert!(e.starts_with("/etc/offsite/web1.toml:2: key `schedule`"), "{e}");
        let e = err("store = \"/x\"\nmissed = \"sometimes\"\n");
        assert!(e.starts_with("/etc/offsite/web1.toml:2: key `missed`"), "{e}");
    }

    #[test]
    fn sizes_take_any_case_with_binary_and_decimal_units() {
        assert_eq!(parse_size("128MiB").unwrap(), 128 << 20);
        assert_eq!(parse_size("128mib").unwrap(), 128 << 20);
        assert_eq!(parse_size("100mb").unwrap(), 100_000_000);
        assert_eq!(parse_size("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn relative_store_resolves_against_the_site_file() {
        let site = parse("store = \"backups\"\n").unwrap();
        assert_eq!(site.store.dir(), Some(Path::new("/etc/offsite/backups")));
    }

    #[test]
    fn an_s3_store_takes_its_settings_from_the_s3_table() {
        let site = parse(
            "store = \"s3://backups/web1\"\n[s3]\nendpoint = \"https://s3.example.net\"\npath_style = true\n\
             part_size = \"8MiB\"\nlock_stale = \"5m\"\n",
        )
        .unwrap();
        let crate::site::StoreAt::S3(s3) = &site.store else { panic!("{:?}", site.store) };
        assert_eq!((s3.location.bucket.as_str(), s3.location.prefix.as_str()), ("backups", "web1"));
        assert_eq!(s3.settings.endpoint.as_deref(), Some("https://s3.example.net"));
        assert!(s3.settings.path_style);
        assert_eq!((s3.part_size, s3.lock_stale), (8 << 20, Duration::from_secs(300)));
        assert_eq!(site.store.display(), "s3://backups/web1");
        let err = |text: &str| parse(text).unwrap_err().to_string();
        let e = err("store = \"s3://Bad_Bucket/x\"\n");
        assert!(e.contains("key `store`") && e.contains("lower-case"), "{e}");
        let e = err("store = \"s3://backups\"\n[s3]\nendpoint = \"http://s3.example.net\"\n");
        assert!(e.contains("key `s3.endpoint`") && e.contains("unencrypted"), "{e}");
        let e = err("store = \"s3://backups\"\n[s3]\npart_size = \"1MiB\"\n");
        assert!(e.contains("key `s3.part_size`"), "{e}");
        let e = err("store = \"/srv/x\"\n[s3]\nregion = \"eu-west-1\"\n");
        assert!(e.contains("[s3] table"), "{e}");
        let site = parse(
            "store = \"/srv/a\"\n[[copy]]\nstore = \"copies/a\"\n[copy.retention]\nkeep_last = 3\n[[copy]]\n\
             store = \"s3://vault/a\"\n[copy.s3]\npath_style = true\n",
        )
        .unwrap();
        assert_eq!(site.copies.len(), 2);
        assert_eq!(site.copies[0].store.dir(), Some(Path::new("/etc/offsite/copies/a")));
        assert_eq!(site.copies[0].retention.last, 3);
        assert_eq!(site.copies[1].store.display(), "s3://vault/a");
        let e = err("store = \"/srv/a\"\n[[copy]]\nstore = \"/srv/a\"\n");
        assert!(e.contains("key `copy.store`") && e.contains("already a store of this site"), "{e}");
        let e = err("store = \"s3://backups\"\n[s3]\naccess_key = \"AKIA\"\n");
        assert!(e.contains("access_key"), "credentials never in the site file: {e}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("store = \"/x\"\n\n[limits]\ndeadlin = \"1h\"\n").unwrap_err().to_string();
        assert!(err.starts_with("/etc/offsite/web1.toml:4:1: key `deadlin`:"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn bad_value_names_file_line_and_key() {
        let err = parse("store = \"/x\"\n[limits]\nmemory = \"12 parsecs\"\n").unwrap_err().to_string();
        assert!(err.starts_with("/etc/offsite/web1.toml:3:"), "{err}");
        assert!(err.contains("key `memory`"), "{err}");
        assert!(err.contains("unknown size unit"), "{err}");
    }

    #[test]
    fn limits_parse_units() {
        let site =
            parse("store = \"/x\"\n[limits]\ndeadline = \"90s\"\nmemory = \"64MiB\"\ncall_timeout = \"5m\"\n").unwrap();
        assert_eq!(site.limits.deadline, Duration::from_secs(90));
        assert_eq!(site.limits.memory, 64 << 20);
        assert_eq!(site.limits.call_timeout, Duration::from_secs(300));
    }

    #[test]
    fn schedules_are_checked_when_the_site_is_read() {
        let site = parse("store = \"s\"\nschedule = \"34 3,20 * * *\"\nmissed = \"skip\"\n").unwrap();
        assert_eq!(site.schedule.unwrap().expression, "34 3,20 * * *");
        assert_eq!(site.missed, crate::schedule::Missed::Skip);
        let err = parse("store = \"s\"\nschedule = \"34 3,20 * *\"\n").unwrap_err().to_string();
        assert!(err.contains("key `schedule`") && err.contains("five fields"), "{err}");
        let err = parse("store = \"s\"\ntimezone = \"Europe/Berlin\"\n").unwrap_err().to_string();
        assert!(err.contains("needs a `schedule`"), "{err}");
        let err = parse("store = \"s\"\nschedule = \"0 3 * * *\"\nmissed = \"maybe\"\n").unwrap_err().to_string();
        assert!(err.contains("key `missed`") && err.contains("run-once"), "{err}");
    }

    #[test]
    fn missing_read_root_is_an_error() {
        let err = parse("store = \"/x\"\n[read]\nroots = [\"/definitely/not/here\"]\n").unwrap_err();
        assert!(format!("{err:#}").contains("read.roots"), "{err:#}");
    }

    #[test]
    fn bad_pin_is_rejected() {
        let err = parse("store = \"/x\"\nscript_sha256 = \"abc\"\n").unwrap_err().to_string();
        assert!(err.contains("script_sha256"), "{err}");
    }

    #[test]
    fn hosts_with_grants() {
        let site = parse(
            "store = \"/x\"\n[hosts.server1]\naddress = \"127.0.0.2\"\nport = 2222\nuser = \"backup\"\n\
             identity = \"keys/id\"\npassphrase_env = \"OFFSITE_PASS\"\nconnect_timeout = \"5s\"\ncompression = true\n\
             commands = [[\"mysqldump\", \"--single-transaction\", \"*\"]]\nfetch = [\"/var/backups/*.tgz\"]\n\
             [hosts.web]\n",
        )
        .unwrap();
        let h = &site.hosts["server1"];
        assert_eq!(h.address, "127.0.0.2");
        assert_eq!(h.port, Some(2222));
        assert_eq!(h.identity.as_deref(), Some(Path::new("/etc/offsite/keys/id")));
        assert_eq!(h.passphrase, Some(SecretSource::Env("OFFSITE_PASS".into())));
        assert_eq!(h.connect_timeout, Duration::from_secs(5));
        assert_eq!(h.compression, Some(true));
        assert_eq!(h.commands.len(), 1);
        assert_eq!(site.hosts["web"].address, "web", "the name doubles as an ssh_config alias");
        assert_eq!(site.hosts["web"].compression, None, "unset: ssh_config decides");
    }

    #[test]
    fn bad_host_sections_are_refused() {
        let err = parse("store = \"/x\"\n[hosts.a]\nadress = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains(":3:1: key `adress`"), "{err}");
        let err = parse("store = \"/x\"\n[hosts.a]\nhost_key = \"abc\"\n").unwrap_err().to_string();
        assert!(err.contains("hosts.a") && err.contains("SHA256"), "{err}");
        let err = parse("store = \"/x\"\n[hosts.a]\npassphrase_env = \"P\"\n").unwrap_err().to_string();
        assert!(err.contains("identity"), "{err}");
        let err = parse("store = \"/x\"\n[hosts.a]\ncommands = [[]]\n").unwrap_err().to_string();
        assert!(err.contains("commands[0]"), "{err}");
        let err = parse("store = \"/x\"\n[hosts.a]\nfetch = [\"relative/*\"]\n").unwrap_err().to_string();
        assert!(err.contains("fetch[0]"), "{err}");
    }

    #[test]
    fn secrets_name_a_file_or_a_variable() {
        let site =
            parse("store = \"/x\"\n[secrets]\ndb = { file = \"db.pass\" }\ntoken = { env = \"TOKEN\" }\n").unwrap();
        assert_eq!(site.secrets["db"], SecretSource::File("/etc/offsite/db.pass".into()));
        assert_eq!(site.secrets["token"], SecretSource::Env("TOKEN".into()));
        let err = parse("store = \"/x\"\n[secrets]\ndb = { }\n").unwrap_err().to_string();
        assert!(err.contains("secrets.db") && err.contains("exactly one"), "{err}");
        assert!(parse("store = \"/x\"\n[secrets]\ndb = \"hunter2\"\n").is_err(), "values never inline");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
