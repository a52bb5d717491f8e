//! The `offsite` command line.
//!
//! Exit codes (also in the README):
//! - 0: the backup succeeded;
//! - 1: the backup failed (the script returned an error or trapped);
//! - 2: usage, configuration or module error: nothing was attempted;
//! - 3: the script hit a sandbox limit (deadline, memory, stack);
//! - 4: another run of this site holds its lock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Local, NaiveDateTime, TimeZone};
use clap::{Args, Parser, Subcommand};

use crate::bindings::meta::ScriptInfo;
use crate::caps::remote::Slots;
use crate::caps::{AuditLog, Caps, Clock};
use crate::engine::{Runtime, SandboxLimits, Script, ScriptFailure, default_cache_dir};
use crate::policy::{ParamGrant, Policy};
use crate::site::Site;
use crate::store::{Budget, Store, StoredFile};
use crate::transport::openssh::OpenSsh;

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

trait ExitContext<T> {
    fn exit(self, exit: Exit) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> ExitContext<T> for Result<T, E> {
    fn exit(self, exit: Exit) -> Result<T, Failure> {
        self.map_err(|e| Failure { exit, error: e.into() })
    }
}

#[derive(Parser)]
#[command(name = "offsite", version, about = "Runs sandboxed WebAssembly backup scripts.")]
struct Cli {
    /// More output: -v progress, -vv every policy decision.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a backup script once. Silent on success.
    Run(RunArgs),
    /// Show a script's metadata, its SHA-256 and the interfaces it imports.
    Inspect {
        /// The script component (.wasm).
        script: PathBuf,
    },
    /// Check a site file (and a script against it): print what it allows
    /// and every problem, with the file, line and fix. Exit 2 on problems.
    Check {
        /// The site file.
        site: PathBuf,
        /// The script the site will run.
        script: Option<PathBuf>,
        /// Also log into every host and look up each granted program.
        #[arg(long)]
        connect: bool,
    },
    /// Key helpers for the servers a site reaches.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print the authorized_keys line to install on HOST for the backup key:
    /// restrict, from= and, for fixed grants, a forced command.
    AuthorizedLine {
        /// The site file.
        site: PathBuf,
        /// The host's name in the site file.
        host: String,
        /// The public key (default: the host's identity file + .pub).
        #[arg(long, value_name = "FILE.pub")]
        key: Option<PathBuf>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// The script component (.wasm).
    script: PathBuf,
    /// The site file granting what the script may touch. Without it the
    /// script reads beneath the current directory and writes into it.
    #[arg(long)]
    site: Option<PathBuf>,
    /// Set a script parameter (overrides the site file); repeatable.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// Pin the script's clock, e.g. 2004-03-21T01:48:44 (local time) or
    /// with a Z or +HH:MM offset.
    #[arg(long, value_name = "YYYY-MM-DDTHH:MM:SS")]
    now: Option<String>,
    /// Check grants and read sources, but write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print a JSON summary of the run on stdout.
    #[arg(long)]
    json: bool,
    /// Append every policy decision (allow or deny) to FILE as JSON lines.
    #[arg(long, value_name = "FILE")]
    audit: Option<PathBuf>,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { Exit::Usage as u8 } else { 0 });
        }
    };
    crate::logging::init(cli.verbose);
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Inspect { script } => inspect(&script),
        Command::Check { site, script, connect } => check(&site, script.as_deref(), connect),
        Command::Keys(KeysCommand::AuthorizedLine { site, host, key }) => authorized_line(&site, &host, key.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("offsite: error: {:#}", f.error);
            ExitCode::from(f.exit as u8)
        }
    }
}

fn runtime() -> Result<Runtime, Failure> {
    Runtime::new(default_cache_dir()).exit(Exit::Usage)
}

fn run(args: RunArgs) -> Result<(), Failure> {
    let started_wall = SystemTime::now();
    let started = Instant::now();
    let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
    let site = match &args.site {
        Some(file) => Site::load(file, &cwd),
        None => Site::current_dir(&cwd),
    }
    .exit(Exit::Usage)?;
    let clock = match &args.now {
        Some(text) => Clock::Pinned(parse_now(text).exit(Exit::Usage)?),
        None => Clock::System,
    };
    let mut cli_params = BTreeMap::new();
    for kv in &args.params {
        let (k, v) = kv.split_once('=').ok_or_else(|| anyhow!("--param {kv:?} must be KEY=VALUE")).exit(Exit::Usage)?;
        cli_params.insert(k.to_string(), v.to_string());
    }

    let runtime = runtime()?;
    let script = runtime.load(&args.script).exit(Exit::Usage)?;
    if let Some(pin) = &site.script_sha256
        && *pin != script.sha256
    {
        return Err(anyhow!(
            "{} has sha256 {}, but site {} pins script_sha256 = {pin}; refusing to run it",
            script.path.display(),
            script.sha256,
            site_label(&site)
        ))
        .exit(Exit::Usage);
    }
    let info = describe(&runtime, &script)?;
    let params = resolve_params(&info, &site, &cli_params).exit(Exit::Usage)?;
    let secrets = params.values().filter(|p| p.secret).filter_map(|p| p.value.clone()).collect();
    log::info!(
        target: "offsite::run",
        "running {} {} (sha256 {}) for site {} with {}",
        info.name, info.version, script.sha256, site.name, site.limits
    );

    let mut caps = Caps::new(&info.name, &site.name, Policy::for_site(&site, params), clock);
    // A dry run writes nothing, not even a missing store directory.
    if !args.dry_run || site.store.exists() {
        let store = Store::open(&site.store)
            .with_context(|| format!("cannot open the store {}", site.store.display()))
            .exit(Exit::Usage)?
            .with_budget(Budget::new(site.limits.max_bytes, site.limits.max_files));
        caps.store = Some(Arc::new(store));
    }
    caps.script_sha256 = script.sha256.clone();
    caps.secret_sources = site.secrets.clone();
    if let Some(path) = &args.audit {
        let log = AuditLog::open(path)
            .with_context(|| format!("cannot open the audit log {}", path.display()))
            .exit(Exit::Usage)?;
        caps.audit = Some(Arc::new(log));
    }
    caps.call_timeout = site.limits.call_timeout;
    caps.dry_run = args.dry_run;
    caps.secrets = secrets;
    caps.captured_output = site.limits.captured_output;
    caps.slots = Arc::new(Slots::new(site.limits.parallel));
    if !site.hosts.is_empty() {
        let transport = OpenSsh::new(&site.hosts, site.ssh_config.as_deref())
            .context("cannot create a private directory for SSH control sockets")
            .exit(Exit::BackupFailed)?;
        caps.transport = Some(Arc::new(transport));
        caps.idle_timeouts = site.hosts.iter().map(|(n, h)| (n.clone(), h.idle_timeout)).collect();
    }

    let limits = SandboxLimits { deadline: site.limits.deadline, memory: site.limits.memory };
    let (result, mut caps) = runtime.run(&script, caps, limits);
    // Background transfers finish (or fail) before the run is judged.
    let unseen = caps.settle();
    caps.transport = None;
    let outputs = caps.outputs();
    let failure = match result {
        Ok(Ok(())) if !unseen.is_empty() => Some(Failure {
            exit: Exit::BackupFailed,
            error: anyhow!(
                "backup failed: background transfer(s) failed and the script never waited for them: {}",
                caps.redact(&unseen.join("; "))
            ),
        }),
        Ok(Ok(())) => None,
        Ok(Err(msg)) => {
            Some(Failure { exit: Exit::BackupFailed, error: anyhow!("backup failed: {}", caps.redact(&msg)) })
        }
        Err(ScriptFailure::Trap(msg)) => Some(Failure {
            exit: Exit::BackupFailed,
            error: anyhow!("backup failed: the script trapped: {}", caps.redact(&msg)),
        }),
        Err(ScriptFailure::Limit(msg)) => Some(Failure { exit: Exit::Limit, error: anyhow!("backup failed: {msg}") }),
    };
    if args.json {
        let summary = RunSummary {
            status: if failure.is_none() { "ok" } else { "failed" },
            site: &site.name,
            script: &info.name,
            script_version: &info.version,
            script_sha256: &script.sha256,
            started: DateTime::<Local>::from(started_wall).to_rfc3339(),
            duration_s: started.elapsed().as_secs_f64(),
            dry_run: args.dry_run,
            outputs: &outputs,
            denials: caps.denials,
            peak_rss_kib: peak_rss_kib(),
            error: failure.as_ref().map(|f| format!("{:#}", f.error)),
        };
        println!("{}", serde_json::to_string(&summary).expect("summary serialises"));
    }
    match failure {
        None => {
            log::info!(target: "offsite::run", "done in {:.1?}: {} file(s) stored", started.elapsed(), outputs.len());
            Ok(())
        }
        Some(f) => Err(f),
    }
}

#[derive(serde::Serialize)]
struct RunSummary<'a> {
    status: &'a str,
    site: &'a str,
    script: &'a str,
    script_version: &'a str,
    script_sha256: &'a str,
    started: String,
    duration_s: f64,
    dry_run: bool,
    outputs: &'a [StoredFile],
    denials: u32,
    /// High-water mark of this process's resident memory (`VmHWM`).
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_rss_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// This process's peak resident set size, from `/proc/self/status`. (Unlike
/// `getrusage`, `VmHWM` does not include what the parent had before `exec`.)
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn site_label(site: &Site) -> String {
    match &site.file {
        Some(f) => f.display().to_string(),
        None => site.name.clone(),
    }
}

fn describe(runtime: &Runtime, script: &Script) -> Result<ScriptInfo, Failure> {
    let caps = Caps::new("describe", "-", Policy::deny_all(), Clock::System);
    runtime.describe(script, caps).map_err(|f| {
        let msg = match f {
            ScriptFailure::Limit(m) | ScriptFailure::Trap(m) => m,
        };
        Failure { exit: Exit::Usage, error: anyhow!("{}: describe() failed: {msg}", script.path.display()) }
    })
}

/// Merges site params and `--param`s, applies the script's defaults and
/// checks that every required parameter is set and no unknown one is.
fn resolve_params(
    info: &ScriptInfo,
    site: &Site,
    cli: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, ParamGrant>> {
    let declared: BTreeMap<&str, _> = info.params.iter().map(|p| (p.name.as_str(), p)).collect();
    for (name, origin) in
        site.params.keys().map(|k| (k, site_label(site))).chain(cli.keys().map(|k| (k, "--param".to_string())))
    {
        if !declared.contains_key(name.as_str()) {
            let known: Vec<&str> = declared.keys().copied().collect();
            bail!(
                "{origin}: unknown parameter {name:?} for script {} (it takes: {})",
                info.name,
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            );
        }
    }
    let mut out = BTreeMap::new();
    let mut missing = Vec::new();
    for spec in &info.params {
        let value =
            cli.get(&spec.name).or_else(|| site.params.get(&spec.name)).cloned().or_else(|| spec.default.clone());
        if spec.required && value.is_none() {
            missing.push(spec.name.clone());
        }
        out.insert(spec.name.clone(), ParamGrant { value, secret: spec.secret });
    }
    if !missing.is_empty() {
        bail!(
            "script {} needs parameter{} {}: pass --param {}=VALUE or set it under [params] in the site file",
            info.name,
            if missing.len() > 1 { "s" } else { "" },
            missing.join(", "),
            missing[0]
        );
    }
    Ok(out)
}

/// `--now`: local time by default, or an explicit `Z` / offset.
fn parse_now(text: &str) -> Result<SystemTime> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.into());
    }
    let naive = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S")
        .with_context(|| format!("--now {text:?}: expected YYYY-MM-DDTHH:MM:SS"))?;
    let local = Local
        .from_local_datetime(&naive)
        .earliest()
        .ok_or_else(|| anyhow!("--now {text:?} does not exist in the local time zone (a DST gap)"))?;
    Ok(local.into())
}

fn check(site_file: &Path, script: Option<&Path>, connect: bool) -> Result<(), Failure> {
    let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
    let text = std::fs::read_to_string(site_file)
        .with_context(|| format!("cannot read site file {}", site_file.display()))
        .exit(Exit::Usage)?;
    let site = Site::parse(&text, site_file, &cwd).exit(Exit::Usage)?;
    let loaded = match script {
        Some(path) => {
            let runtime = runtime()?;
            let script = runtime.load(path).exit(Exit::Usage)?;
            let info = describe(&runtime, &script)?;
            Some((runtime, script, info))
        }
        None => None,
    };
    let report = crate::check::check(&site, site_file, &text, loaded.as_ref().map(|(r, s, i)| (r, s, i)), connect);
    print!("{}", report.text);
    if report.problems.is_empty() {
        println!("no problems found");
        return Ok(());
    }
    for p in &report.problems {
        eprintln!("offsite: problem: {p}");
    }
    Err(anyhow!("{}: {} problem(s) found", site_file.display(), report.problems.len())).exit(Exit::Usage)
}

fn authorized_line(site_file: &Path, host: &str, key: Option<&Path>) -> Result<(), Failure> {
    let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
    let site = Site::load(site_file, &cwd).exit(Exit::Usage)?;
    let line = crate::keys::authorized_line(&site, host, key).exit(Exit::Usage)?;
    for note in &line.notes {
        println!("# {note}");
    }
    println!("{}", line.line);
    Ok(())
}

fn inspect(path: &Path) -> Result<(), Failure> {
    let runtime = runtime()?;
    let script = runtime.load(path).exit(Exit::Usage)?;
    let info = describe(&runtime, &script)?;
    println!("script:      {} {}", info.name, info.version);
    println!("file:        {}", script.path.display());
    println!("sha256:      {}", script.sha256);
    if !info.description.is_empty() {
        println!("description: {}", info.description);
    }
    println!(
        "capabilities declared: {}",
        if info.capabilities.is_empty() { "none".into() } else { info.capabilities.join(", ") }
    );
    println!("parameters:");
    if info.params.is_empty() {
        println!("  (none)");
    }
    for p in &info.params {
        let mut flags = vec![if p.required { "required" } else { "optional" }];
        if p.secret {
            flags.push("secret");
        }
        let default = p.default.as_ref().map(|d| format!(", default {d:?}")).unwrap_or_default();
        println!("  {} ({}{default}): {}", p.name, flags.join(", "), p.description);
    }
    println!("imports:");
    let ty = script.component.component_type();
    for (name, _) in ty.imports(runtime.engine()) {
        println!("  {name}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::meta::ParamSpec;

    fn info() -> ScriptInfo {
        ScriptInfo {
            name: "arc".into(),
            version: "1".into(),
            description: String::new(),
            params: vec![
                ParamSpec {
                    name: "path".into(),
                    description: String::new(),
                    required: true,
                    default: None,
                    secret: false,
                },
                ParamSpec {
                    name: "fmt".into(),
                    description: String::new(),
                    required: false,
                    default: Some("%Y".into()),
                    secret: false,
                },
            ],
            capabilities: vec![],
        }
    }

    #[test]
    fn params_merge_with_cli_winning_and_defaults_applied() {
        let mut site = Site::current_dir(&std::env::temp_dir()).unwrap();
        site.params.insert("path".into(), "from-site".into());
        let cli = BTreeMap::from([("path".to_string(), "from-cli".to_string())]);
        let p = resolve_params(&info(), &site, &cli).unwrap();
        assert_eq!(p["path"].value.as_deref(), Some("from-cli"));
        assert_eq!(p["fmt"].value.as_deref(), Some("%Y"));
    }

    #[test]
    fn missing_and_unknown_params_are_named() {
        let site = Site::current_dir(&std::env::temp_dir()).unwrap();
        let err = resolve_params(&info(), &site, &BTreeMap::new()).unwrap_err().to_string();
        assert!(err.contains("needs parameter path"), "{err}");
        let cli = BTreeMap::from([("path".to_string(), "x".to_string()), ("paht".to_string(), "x".to_string())]);
        let err = resolve_params(&info(), &site, &cli).unwrap_err().to_string();
        assert!(err.contains("unknown parameter \"paht\""), "{err}");
    }

    #[test]
    fn now_accepts_local_and_explicit_offsets() {
        let t = parse_now("2004-03-21T01:48:44Z").unwrap();
        assert_eq!(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(), 1_079_833_724);
        assert!(parse_now("2004-03-21T01:48:44").is_ok());
        assert!(parse_now("yesterday").is_err());
    }
}
