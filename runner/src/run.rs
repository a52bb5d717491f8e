//! `offsite run`, assembled: the site and the script, parameters, the
//! store and its lock, the engine, and what follows a run (manifest,
//! retention, reports, notifications, the JSON summary). The command line
//! only parses arguments into a [`Request`]; `offsite watch` runs each site
//! as a child `offsite run`, so every run, scheduled or by hand, goes
//! through this one path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Local, NaiveDateTime, TimeZone};
use clap::Args;

use crate::bindings::meta::ScriptInfo;
use crate::caps::remote::Slots;
use crate::caps::{AuditLog, Caps, Clock};
use crate::engine::{Runtime, SandboxLimits, Script, ScriptFailure};
use crate::exit::{Exit, ExitContext, Failure, runtime};
use crate::policy::{ParamGrant, Policy};
use crate::report::{self, Event, Note};
use crate::share::reference::ScriptSource;
use crate::site::Site;
use crate::store::backend::{Access, Held, LockFailure, OpenError};
use crate::store::manifest::ScriptRef;
use crate::store::run::{Outcome, RunHeader, hostname, new_run_id};
use crate::store::{Budget, Manifest, Root, Status, StoredFile};
use crate::store::{protect, retention};
use crate::transport::openssh::OpenSsh;

#[derive(Args)]
pub struct Request {
    /// The script component (.wasm); or, without --site, a site (a NAME
    /// looked up as /etc/offsite/NAME.toml, or a FILE.toml) whose `script`
    /// is run. Default: the site's `script`.
    script: Option<PathBuf>,
    /// The site granting what the script may touch: a file, or a NAME
    /// looked up as /etc/offsite/NAME.toml ($OFFSITE_CONFIG_DIR). Without
    /// it the script reads beneath the current directory and writes into it.
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
    /// Set from the global `--json`: a JSON summary of the run on stdout.
    #[arg(skip)]
    pub json: bool,
    /// Append every policy decision (allow or deny) to FILE as JSON lines.
    #[arg(long, value_name = "FILE")]
    audit: Option<PathBuf>,
    /// Read the site file's text from stdin; --site still names it (for
    /// messages and relative paths). `offsite watch` passes the exact text
    /// it validated this way.
    #[arg(long, hide = true, requires = "site")]
    site_stdin: bool,
    /// Where the script came from, for the manifest: `offsite watch` runs
    /// a private snapshot of the version it validated.
    #[arg(long, hide = true)]
    script_source: Option<String>,
    /// `offsite script diff`: a dry run that connects to no server and
    /// does not check signers, to see which calls a version makes.
    #[arg(long, hide = true, requires = "dry_run")]
    probe: bool,
}

/// `offsite run`: one run of a script for a site, from loading both to
/// the manifest, the reports and the summary.
pub fn run(args: Request) -> Result<(), Failure> {
    crate::abort::on_signals().context("cannot install the signal handlers").exit(Exit::Usage)?;
    let started_wall = SystemTime::now();
    let started = Instant::now();
    let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
    let (site, script_arg) = load_site(&args, &cwd)?;
    // A live line per transfer, on a terminal only.
    crate::progress::enable(!args.json);
    let clock = match &args.now {
        Some(text) => Clock::Pinned(parse_now(text).exit(Exit::Usage)?),
        None => Clock::System,
    };
    let mut cli_params = BTreeMap::new();
    for kv in &args.params {
        let (k, v) = kv.split_once('=').ok_or_else(|| anyhow!("--param {kv:?} must be KEY=VALUE")).exit(Exit::Usage)?;
        cli_params.insert(k.to_string(), v.to_string());
    }

    let source = match script_arg {
        Some(arg) => ScriptSource::parse(&arg.to_string_lossy(), &cwd).exit(Exit::Usage)?,
        None => match site.script.clone() {
            Some(source) => source,
            None if site.file.is_some() => {
                return Err(anyhow!("name the script to run: site {} has no `script`", site_label(&site)))
                    .exit(Exit::Usage);
            }
            None => {
                return Err(anyhow!("name the script to run (SCRIPT.wasm), or a site (--site)")).exit(Exit::Usage);
            }
        },
    };
    let fetched = crate::share::resolve::fetch(&source, &site).exit(Exit::Usage)?;
    // Signatures are checked on the bytes that will run, before they are
    // compiled.
    let signers = if args.probe { None } else { site.script_signers.as_deref() };
    let signer = crate::share::resolve::check_signer(&fetched, signers).exit(Exit::Usage)?;
    let runtime = runtime()?;
    let script = runtime.load_bytes(&fetched.path, &fetched.bytes).exit(Exit::Usage)?;
    if let Some(pin) = &site.script_sha256
        && *pin != script.sha256
    {
        return Err(anyhow!(
            "{} has sha256 {}, but site {} pins script_sha256 = {pin}; refusing to run it",
            fetched.source,
            script.sha256,
            site_label(&site)
        ))
        .exit(Exit::Usage);
    }
    let info = describe(&runtime, &script)?;
    let params = resolve_params(&info, &site, &cli_params).exit(Exit::Usage)?;
    log::info!(
        target: "offsite::run",
        "running {} {} (sha256 {}) for site {} with {}",
        info.name, info.version, script.sha256, site.name, site.limits
    );

    let local_start = DateTime::<Local>::from(started_wall);
    let header = RunHeader {
        run_id: new_run_id(local_start),
        site: site.name.clone(),
        hostname: hostname(),
        pid: std::process::id(),
        script: ScriptRef {
            name: info.name.clone(),
            version: info.version.clone(),
            sha256: script.sha256.clone(),
            source: Some(args.script_source.clone().unwrap_or(fetched.source)),
            signer: signer.map(|v| v.signer.to_string()),
        },
        grants_sha256: site.grants_digest(),
        started: local_start.to_rfc3339(),
    };
    crate::logging::set_field("OFFSITE_SITE", &site.name);
    crate::logging::set_field("OFFSITE_RUN_ID", &header.run_id);
    crate::logging::set_field("OFFSITE_SCRIPT_SHA256", &script.sha256);
    let mut caps = caps_for(&site, &info, params, clock, &script.sha256, &args)?;
    // A dry run writes nothing, not even a missing store directory, and so
    // takes no lock and leaves no manifest. (Last, so nothing above can
    // fail after the run has begun in the store.)
    let mut session = None;
    let mut signer = None;
    if args.dry_run {
        // It still finds what the real run would trip on first.
        crate::store::backend::probe_for_run(&site.store, site.limits.call_timeout)
            .map_err(|e| store_failure(&site, e, "cannot be written"))?;
    }
    if !args.dry_run {
        let recipients = protect::recipients(&site.protect.recipients, None).exit(Exit::Usage)?;
        signer = site
            .protect
            .signing_key
            .as_deref()
            .map(protect::signing_key)
            .transpose()
            .context("[protect] signing_key")
            .exit(Exit::Usage)?;
        let (root, lock) = open_locked(&site, &header, signer.clone())?;
        let budget = Budget::new(site.limits.max_bytes, site.limits.max_files);
        root.claim_for_run(&site);
        let begun = root.begin_run(&header, budget, recipients);
        let store = begun
            .with_context(|| format!("cannot start the run in the store {}", site.store.display()))
            .exit(Exit::BackupFailed)?;
        caps.store = Some(Arc::new(store));
        session = Some((root, lock));
    }
    if session.is_some() {
        let note = Note { site: &site.name, run_id: &header.run_id, status: None, tail: "" };
        report::notify(&site.notify, Event::Start, &note);
    }

    let limits = SandboxLimits { deadline: site.limits.deadline, memory: site.limits.memory };
    let (result, mut caps) = runtime.run(&script, caps, limits);
    // Background transfers finish (or fail) before the run is judged.
    let unseen = caps.settle();
    caps.transport = None;
    let outputs = caps.outputs();
    let (mut failure, aborted) = judge(result, &unseen, &caps);

    let mut manifest = None;
    if let Some((root, lock)) = &session {
        let store = caps.store.take().expect("a run has a store");
        let recorded =
            record(root, lock.as_ref(), signer.as_ref(), &site, &header, &store, &caps, &outputs, failure, aborted);
        (manifest, failure) = recorded;
    }
    if session.is_some() {
        let mut tail: Vec<String> = crate::logging::capture_snapshot().tail.into();
        let status = manifest.as_ref().map_or(Status::Failed, |m| m.status);
        let event = match &failure {
            None => Event::Success,
            Some(f) => {
                tail.push(format!("offsite: error: {:#}", f.error));
                Event::Failure
            }
        };
        let tail = tail.join("\n");
        let note = Note { site: &site.name, run_id: &header.run_id, status: Some(status), tail: &tail };
        report::notify(&site.notify, event, &note);
    }
    let status = match (&manifest, &failure) {
        (Some(m), _) => m.status,
        (None, None) => Status::Ok,
        (None, Some(_)) => Status::Failed,
    };
    if args.json {
        let summary = RunSummary {
            status: status.as_str(),
            run_id: manifest.as_ref().map(|m| m.run.run_id.as_str()),
            site: &site.name,
            script: &info.name,
            script_version: &info.version,
            script_sha256: &script.sha256,
            started: local_start.to_rfc3339(),
            duration_s: started.elapsed().as_secs_f64(),
            dry_run: args.dry_run,
            // The manifest's (a bucket keeps no files of a failed run).
            files: manifest.as_ref().map_or(&outputs[..], |m| &m.files[..]),
            kept_in: manifest.as_ref().and_then(|m| m.kept_in.as_deref()),
            warnings: manifest.as_ref().map_or(0, |m| m.warnings.len()),
            denials: caps.denials,
            peak_rss_kib: peak_rss_kib(),
            error: failure.as_ref().map(|f| format!("{:#}", f.error)),
        };
        crate::json::report(&summary);
    }
    crate::logging::set_field("OFFSITE_STATUS", status.as_str());
    if crate::logging::to_journal() && !args.dry_run {
        // The journal keeps an entry per run, good or not (cron mail stays
        // silent on success; a journal is read by query).
        let bytes: u64 = outputs.iter().map(|o| o.bytes).sum();
        let text = format!(
            "{}offsite: run {} of site {}: {} ({} file(s), {bytes} bytes, {:.1?})\n",
            crate::logging::prefix(),
            header.run_id,
            site.name,
            status.as_str(),
            outputs.len(),
            started.elapsed()
        );
        crate::logging::emit(log::Level::Info, &text);
    }
    match failure {
        None => {
            log::info!(target: "offsite::run", "done in {:.1?}: {} file(s) stored", started.elapsed(), outputs.len());
            Ok(())
        }
        Some(f) => Err(f),
    }
}

/// The site of a run, and the script named on the command line if any:
/// `offsite run web1` and `offsite run /etc/offsite/web1.toml` name a site,
/// a bare NAME is looked up in the config directory, and without one the
/// current directory is the site.
fn load_site(args: &Request, cwd: &Path) -> Result<(Site, Option<PathBuf>), Failure> {
    let (script_arg, site_arg) = match (args.script.clone(), args.site.clone()) {
        (Some(target), None) if names_a_site(&target) => (None, Some(target)),
        other => other,
    };
    let site = match site_arg.map(|s| site_path(&s)) {
        Some(file) if args.site_stdin => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("cannot read the site file's text from stdin")
                .exit(Exit::Usage)?;
            Site::parse(&text, &file, cwd)
        }
        Some(file) => Site::load(&file, cwd),
        None => Site::current_dir(cwd),
    }
    .exit(Exit::Usage)?;
    Ok((site, script_arg))
}

/// The capabilities of one run: the site's policy, secrets, limits and
/// SSH connections, and the audit log if asked for.
fn caps_for(
    site: &Site,
    info: &ScriptInfo,
    params: BTreeMap<String, ParamGrant>,
    clock: Clock,
    script_sha256: &str,
    args: &Request,
) -> Result<Caps, Failure> {
    let secrets = params.values().filter(|p| p.secret).filter_map(|p| p.value.clone()).collect();
    let mut caps = Caps::new(&info.name, &site.name, Policy::for_site(site, params), clock);
    caps.script_sha256 = script_sha256.to_string();
    caps.secret_sources = site.secrets.clone();
    caps.deliveries = site.deliveries.clone();
    if let Some(path) = &args.audit {
        let log = AuditLog::open(path)
            .with_context(|| format!("cannot open the audit log {}", path.display()))
            .exit(Exit::Usage)?;
        caps.audit = Some(Arc::new(log));
    }
    caps.call_timeout = site.limits.call_timeout;
    caps.run_deadline = Some(Instant::now() + site.limits.deadline);
    caps.dry_run = args.dry_run;
    caps.offline = args.probe;
    caps.unreadable_fatal = site.unreadable_fatal;
    caps.secrets = secrets;
    caps.captured_output = site.limits.captured_output;
    caps.slots = Arc::new(Slots::new(site.limits.parallel));
    if !site.hosts.is_empty() {
        let transport = OpenSsh::new(&site.hosts, site.ssh_config.as_deref())
            .context("cannot create a private directory for SSH control sockets")
            .exit(Exit::BackupFailed)?
            .until(caps.run_deadline);
        caps.transport = Some(Arc::new(transport));
        caps.idle_timeouts = site.hosts.iter().map(|(n, h)| (n.clone(), h.idle_timeout)).collect();
        caps.host_paces = site
            .hosts
            .iter()
            .filter_map(|(n, h)| Some((n.clone(), Arc::new(crate::caps::pace::Pace::new(h.bandwidth?)))))
            .collect();
        caps.site_pace = site.limits.bandwidth.map(|r| Arc::new(crate::caps::pace::Pace::new(r)));
        caps.fetch_lanes = site
            .hosts
            .iter()
            .map(|(n, h)| {
                (
                    n.clone(),
                    crate::caps::remote::FetchLanes {
                        connections: h.connections,
                        parallel_above: h.parallel_above,
                        retries: h.retries,
                        retry_streams: h.retry_streams,
                    },
                )
            })
            .collect();
    }
    Ok(caps)
}

/// How the script's part of the run ended, as a failure (or none), and
/// whether a stop was asked for.
fn judge(result: Result<Result<(), String>, ScriptFailure>, unseen: &[String], caps: &Caps) -> (Option<Failure>, bool) {
    let stopped_in_script = matches!(result, Err(ScriptFailure::Aborted(_)));
    let mut failure: Option<Failure> = match result {
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
        Err(ScriptFailure::Trap(msg)) => {
            Some(Failure { exit: Exit::BackupFailed, error: anyhow!("backup failed: {}", caps.redact(&msg)) })
        }
        Err(ScriptFailure::Limit(msg)) => Some(Failure { exit: Exit::Limit, error: anyhow!("backup failed: {msg}") }),
        Err(ScriptFailure::Aborted(msg)) => Some(Failure { exit: Exit::BackupFailed, error: anyhow!("backup {msg}") }),
    };
    // A stop asked for while the script ran fails the run, whatever the
    // script made of the errors its calls got (it may have ignored them).
    let aborted = crate::abort::requested();
    if aborted && !stopped_in_script {
        let after = failure.map(|f| format!(" ({:#})", f.error)).unwrap_or_default();
        failure =
            Some(Failure { exit: Exit::BackupFailed, error: anyhow!("backup {}{after}", crate::abort::message()) });
    }

    (failure, aborted)
}

/// Ends a run in the store: the warnings a good run still earns (calls
/// the script swallowed, a drastic shrink), then its manifest, then
/// retention and the textfile. Returns the manifest, and the run's failure
/// (which recording can add to).
#[allow(clippy::too_many_arguments)]
fn record(
    root: &Root,
    lock: &dyn Held,
    signer: Option<&ssh_key::PrivateKey>,
    site: &Site,
    header: &RunHeader,
    store: &crate::store::Store,
    caps: &Caps,
    outputs: &[StoredFile],
    mut failure: Option<Failure>,
    aborted: bool,
) -> (Option<Manifest>, Option<Failure>) {
    let mut manifest = None;
    // Calls that failed while the run still succeeded: the script
    // handled (or ignored) them, and each is a warning. (A failed run
    // says why in its error, once.)
    if failure.is_none() {
        for line in &caps.failed_calls {
            log::warn!(target: "offsite::calls", "site {}: {line}", site.name);
        }
    }
    // A backup that lost most of its content is not silently `ok`: each
    // output is compared with its own last good copy.
    if site.shrink_warning > 0
        && !outputs.is_empty()
        && let Ok((all, _)) = root.manifests()
    {
        let runs = root.runs_of(&site.name);
        let mine: Vec<Manifest> = all.into_iter().filter(|m| runs.includes(m)).collect();
        for line in crate::store::shrunk(outputs, &mine, site.shrink_warning) {
            log::warn!(target: "offsite::run", "{line}");
        }
    }
    let outcome = Outcome {
        // Bounded: an error may quote a huge parameter or output.
        error: failure
            .as_ref()
            .map(|f| crate::text::truncate(&format!("{:#}", f.error), crate::logging::MAX_MESSAGE).into_owned()),
        warnings: crate::logging::capture_snapshot().warnings,
        aborted,
        // A script that failed still made the outputs its calls
        // completed; a run stopped by a signal publishes nothing.
        publish_completed: !aborted,
        failed: caps.failed_outputs(),
    };
    let finished = root.finish_run(header, store, &outcome, lock);
    match finished {
        Ok(m) => {
            if failure.is_none() && !m.status.is_good() {
                let why = m.error.clone().unwrap_or_default();
                failure = Some(Failure { exit: Exit::BackupFailed, error: anyhow!("backup failed: {why}") });
            }
            if m.status == Status::Partial
                && let Some(f) = failure.take()
            {
                failure = Some(Failure { exit: f.exit, error: anyhow!("{}", partial_message(&m, &f.error)) });
            }
            manifest = Some(m);
        }
        Err(e) => {
            let left = root.left_behind(&header.run_id);
            let error = anyhow!(
                "{}the run could not be recorded in the store {}: {e}; {left}",
                failure.as_ref().map(|f| format!("{:#}; and ", f.error)).unwrap_or_else(|| "backup failed: ".into()),
                site.store.display(),
            );
            failure = Some(Failure { exit: failure.map_or(Exit::BackupFailed, |f| f.exit), error });
        }
    }
    if let Some(m) = manifest.as_mut()
        && m.status.publishes()
        && !site.copies.is_empty()
    {
        copy(root, site, header, signer, m, caps.run_deadline);
    }
    if let Some(m) = &manifest {
        after_run(root, site, m);
    }
    (manifest, failure)
}

/// A good run goes to the site's `[[copy]]` stores (before retention, so
/// a run a copy still lacks is not pruned first). A copy that fails makes
/// the run a warning, recorded in its manifest.
fn copy(
    root: &Root,
    site: &Site,
    header: &RunHeader,
    signer: Option<&ssh_key::PrivateKey>,
    m: &mut Manifest,
    until: Option<Instant>,
) {
    let failed = crate::copy::copy_all(root, site, header, signer, until);
    if failed.is_empty() {
        return;
    }
    for line in &failed {
        log::warn!(target: "offsite::copy", "{line}");
    }
    m.warnings.extend(failed);
    m.status = Status::Warning;
    if let Err(e) = root.rewrite_manifest(m) {
        log::warn!(target: "offsite::copy", "cannot add the copy's failure to the run's manifest: {e}");
    }
}

/// A store that cannot be used, said as the site's fault (exit 2) or as
/// a failed backup (exit 1: nothing answers, or the server failed).
fn store_failure(site: &Site, e: OpenError, what: &str) -> Failure {
    let exit = if e.is_config() { Exit::Usage } else { Exit::BackupFailed };
    Failure { exit, error: anyhow!("the store {} {what}: {e}", site.store.display()) }
}

/// Opens the site's store and takes its lock, then finishes whatever an
/// interrupted run left (see `Backend::recover`).
fn open_locked(
    site: &Site,
    header: &RunHeader,
    signer: Option<ssh_key::PrivateKey>,
) -> Result<(Root, Box<dyn Held>), Failure> {
    let root = crate::store::backend::open(&site.store, Access::Run, site.limits.call_timeout, signer)
        .map_err(|e| store_failure(site, e, "cannot be opened"))?;
    let locked = match root.lock(header) {
        Ok(locked) => locked,
        Err(LockFailure::Busy(e)) => {
            return Err(anyhow!(
                "site {}: store {}: {e}; this run did not start (that one goes on)",
                site.name,
                site.store.display()
            ))
            .exit(Exit::Locked);
        }
        Err(LockFailure::Failed(e)) => return Err(store_failure(site, e, "cannot be locked")),
    };
    crate::logging::capture_start();
    if let Some(note) = locked.took_over {
        log::warn!(target: "offsite::run", "{note}");
    }
    let recovered = root
        .recover()
        .with_context(|| format!("cannot recover what an interrupted run left in {}", site.store.display()))
        .exit(Exit::BackupFailed)?;
    for line in recovered {
        log::warn!(target: "offsite::run", "{line}");
    }
    Ok((root, locked.lock))
}

/// What a partial run says: what it published, which outputs it did not
/// make and why, then the script's own error. Names and errors are the
/// script's and servers' words: escaped.
fn partial_message(m: &Manifest, error: &anyhow::Error) -> String {
    let why = format!("{error:#}");
    let why = why.strip_prefix("backup failed: ").unwrap_or(&why).to_string();
    let list = |names: Vec<String>| crate::text::shorten_middle(&names.join(", "), 400).into_owned();
    let published: Vec<String> = m.published().map(|f| crate::text::escape(&f.path).into_owned()).collect();
    let mut text = format!("backup partial: {} output(s) published ({})", published.len(), list(published));
    if !m.failed.is_empty() {
        // Each with its call's error, unless the script's error says it.
        let failed: Vec<String> = m
            .failed
            .iter()
            .map(|f| {
                let detail = f.error.split_once(": ").map_or(f.error.as_str(), |(_, rest)| rest);
                match why.contains(detail) {
                    true => crate::text::escape(&f.path).into_owned(),
                    false => format!("{} ({})", crate::text::escape(&f.path), crate::text::escape(&f.error)),
                }
            })
            .collect();
        text.push_str(&format!(", {} not made ({})", failed.len(), list(failed)));
    }
    let kept = m.files.iter().filter(|f| f.kept).count();
    if let (true, Some(dir)) = (kept > 0, &m.kept_in) {
        text.push_str(&format!(
            ", {kept} kept aside in {dir} instead of replacing the file of the same name (a partial run replaces \
             nothing)"
        ));
    }
    text.push_str(&format!("; the script failed: {why}"));
    text
}

/// After a run is recorded: retention (after good runs only) and the
/// node_exporter textfile. Neither changes the run's status.
fn after_run(root: &Root, site: &Site, manifest: &Manifest) {
    if manifest.status.publishes() && !site.retention.is_empty() {
        let pruned = root.resume_prune().and_then(|mut lines| {
            let (manifests, _) = root.manifests()?;
            let plan = retention::plan(&manifests, &root.runs_of(&site.name), &site.retention);
            lines.extend(root.prune(&plan)?);
            Ok(lines)
        });
        match pruned {
            Ok(lines) => lines.iter().for_each(|l| log::info!(target: "offsite::retention", "{l}")),
            Err(e) => log::warn!(target: "offsite::report", "retention failed (nothing more was removed): {e}"),
        }
    }
    if let Some(path) = &site.prometheus {
        let runs = root.runs_of(&site.name);
        let mine: Vec<Manifest> = match root.manifests() {
            Ok((all, _)) => all.into_iter().filter(|m| runs.includes(m)).collect(),
            Err(e) => {
                log::warn!(target: "offsite::report", "cannot read the store's manifests for the textfile: {e}");
                vec![manifest.clone()]
            }
        };
        let last_good = mine.iter().rev().find(|m| m.status.is_good());
        let refs: Vec<&Manifest> = mine.iter().collect();
        let outputs = crate::store::outputs::states(&refs);
        if let Err(e) = report::write_prometheus(path, site, manifest, last_good, &outputs) {
            log::warn!(target: "offsite::report", "cannot write the node_exporter textfile {}: {e}", path.display());
        }
    }
}

#[derive(serde::Serialize)]
struct RunSummary<'a> {
    status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_id: Option<&'a str>,
    site: &'a str,
    script: &'a str,
    script_version: &'a str,
    script_sha256: &'a str,
    started: String,
    duration_s: f64,
    dry_run: bool,
    /// As in the manifest.
    files: &'a [StoredFile],
    /// Where a run that did not succeed kept its files.
    #[serde(skip_serializing_if = "Option::is_none")]
    kept_in: Option<&'a str>,
    warnings: usize,
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

pub fn site_label(site: &Site) -> String {
    match &site.file {
        Some(f) => f.display().to_string(),
        None => site.name.clone(),
    }
}

pub fn describe(runtime: &Runtime, script: &Script) -> Result<ScriptInfo, Failure> {
    let caps = Caps::new("describe", "-", Policy::deny_all(), Clock::System);
    runtime.describe(script, caps).map_err(|f| {
        let msg = match f {
            ScriptFailure::Limit(m) | ScriptFailure::Trap(m) | ScriptFailure::Aborted(m) => m,
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
        // An empty value (`--param path=`) is no value for a required one.
        if spec.required && value.as_deref().is_none_or(str::is_empty) {
            missing.push(spec.name.clone());
        }
        // A parameter whose default is a time pattern (`stamp = "%Y%m%d"`)
        // takes a time pattern: a bad one is a usage error now, before
        // anything runs or is recorded, not a failed run at 03:34.
        if let (Some(default), Some(v)) = (&spec.default, &value)
            && is_time_pattern(default)
            && let Err(e) = check_time_pattern(v)
        {
            bail!("parameter {} = {v:?}: {e} (it is a strftime pattern, like {default:?})", spec.name);
        }
        out.insert(spec.name.clone(), ParamGrant { value, secret: spec.secret });
    }
    if !missing.is_empty() {
        bail!(
            "script {} needs parameter{} {} (missing or empty): pass --param {}=VALUE or set it under [params] in \
             the site file",
            info.name,
            if missing.len() > 1 { "s" } else { "" },
            missing.join(", "),
            missing[0]
        );
    }
    Ok(out)
}

/// Whether `text` is a strftime pattern with at least one directive.
fn is_time_pattern(text: &str) -> bool {
    text.contains('%') && check_time_pattern(text).is_ok()
}

fn check_time_pattern(text: &str) -> Result<(), String> {
    use crate::bindings::clock::{Instant, Zone};
    crate::caps::format_instant(Instant { seconds: 0, nanoseconds: 0 }, text, Zone::Utc)
        .map(drop)
        .map_err(|e| crate::caps::describe_error(&e))
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

/// Whether a lone `offsite run` argument names a site rather than a
/// script: a `.toml` file, or a bare name with no extension and no `/`.
fn names_a_site(target: &Path) -> bool {
    match target.extension() {
        Some(ext) => ext == "toml",
        None => target.components().count() == 1 && !target.is_file(),
    }
}

/// A site argument as a file: a bare NAME (no `/`, no extension, no such
/// file here) is `NAME.toml` in the config directory (`$OFFSITE_CONFIG_DIR`,
/// else /etc/offsite), so a crontab line needs no path and works from any
/// working directory.
pub fn site_path(site: &Path) -> PathBuf {
    if site.components().count() == 1 && site.extension().is_none() && !site.exists() {
        let dir = std::env::var_os("OFFSITE_CONFIG_DIR").map(PathBuf::from).unwrap_or_else(|| "/etc/offsite".into());
        let mut name = site.as_os_str().to_owned();
        name.push(".toml");
        return dir.join(name);
    }
    site.to_path_buf()
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
        // A bad time pattern for a parameter whose default is one.
        let cli = BTreeMap::from([("path".to_string(), "x".to_string()), ("fmt".to_string(), "%Q".to_string())]);
        let err = resolve_params(&info(), &site, &cli).unwrap_err().to_string();
        assert!(err.contains("parameter fmt = \"%Q\"") && err.contains("strftime"), "{err}");
        // `--param path=` is as good as no value for a required parameter.
        let cli = BTreeMap::from([("path".to_string(), String::new())]);
        let err = resolve_params(&info(), &site, &cli).unwrap_err().to_string();
        assert!(err.contains("needs parameter path (missing or empty)"), "{err}");
    }

    #[test]
    fn now_accepts_local_and_explicit_offsets() {
        let t = parse_now("2004-03-21T01:48:44Z").unwrap();
        assert_eq!(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(), 1_079_833_724);
        assert!(parse_now("2004-03-21T01:48:44").is_ok());
        assert!(parse_now("yesterday").is_err());
    }
}
