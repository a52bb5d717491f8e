//! `offsite watch`: one long-running process that runs each site on its
//! schedule and picks up a rebuilt script or an edited site file.
//!
//! - **Runs are child processes**: each run is `offsite run` started by the
//!   watcher, the very path cron takes, with the same store lock, staging,
//!   recovery, reports and exit codes. A run that crashes or runs out of
//!   memory takes nothing else down, and its log lines carry the site's
//!   name. The child runs the exact version the watcher validated: the
//!   script from a private snapshot of the bytes that passed validation,
//!   the site from the validated text (on its stdin), so a file replaced
//!   a moment later cannot slip in unchecked.
//! - **Reloads** (`crate::reload`): the parent directories of every site
//!   and script file are watched (editors and cargo replace files by
//!   rename, or delete and create). Events for a file are debounced, then
//!   the pair is validated and swapped in only if good; a bad version is
//!   logged and the last good one stays. A running run keeps its version.
//! - **Timing** ([`Timer`]) is pure: it is given the current time, so the
//!   tests drive it with an injected clock.
//! - **Signals**: SIGTERM or SIGINT stops scheduling; runs get the grace
//!   period, then SIGTERM (a clean abort, see `crate::abort`), then after
//!   [`KILL_AFTER`] SIGKILL. A second SIGTERM/SIGINT skips the grace.
//!   SIGHUP re-reads every site and script (and re-lists directories).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write as _;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Utc};

use crate::engine::{Runtime, default_cache_dir};
use crate::reload::{Reload, Slot, Version};
use crate::schedule::{Missed, Schedule};

/// How late a scheduled run may start and still be on time. Later than
/// this, the machine was asleep or the clock jumped: the run was missed
/// and the site's `missed` policy decides.
pub const LATE: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
/// After its SIGTERM, how long an aborting run has before SIGKILL.
pub const KILL_AFTER: Duration = Duration::from_secs(30);
/// The longest the loop sleeps: a clock change or a resume from suspend
/// is noticed within this.
const TICK: Duration = Duration::from_secs(1);
/// How often running children are looked at.
const REAP_EVERY: Duration = Duration::from_millis(50);

/// `offsite watch` settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// At most this many runs at once.
    pub jobs: usize,
    /// Quiet time after a file event before the file is read.
    pub debounce: Duration,
    /// How long runs may go on after SIGTERM/SIGINT before they are stopped.
    pub grace: Duration,
    /// Run a site as soon as a new version of it is in place.
    pub run_on_change: bool,
    /// `-v` count, passed on to the runs.
    pub verbose: u8,
}

/// When one site runs, as of a time it is told (never the clock itself).
#[derive(Debug, Clone)]
pub struct Timer {
    schedule: Schedule,
    missed: Missed,
    next: Option<DateTime<Utc>>,
}

/// Why a site is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fire {
    /// Its scheduled time came.
    OnTime(DateTime<Utc>),
    /// A scheduled time passed unseen (the watcher was not running, or the
    /// machine slept); `run` is what the site's `missed` policy says.
    Missed { at: DateTime<Utc>, run: bool },
}

impl Fire {
    pub fn runs(&self) -> bool {
        matches!(self, Fire::OnTime(_) | Fire::Missed { run: true, .. })
    }
}

impl Timer {
    /// A timer from `now` on.
    pub fn new(schedule: Schedule, missed: Missed, now: DateTime<Utc>) -> Timer {
        let next = schedule.next_after(now);
        Timer { schedule, missed, next }
    }

    /// At start-up: the timer, and what to do about the times that passed
    /// since the site's last run (`last`, from its newest manifest). A
    /// site that never ran has missed nothing.
    pub fn start(
        schedule: Schedule,
        missed: Missed,
        last: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> (Timer, Option<Fire>) {
        let fire = last
            .and_then(|l| schedule.next_after(l))
            .filter(|at| *at <= now)
            .map(|at| Fire::Missed { at, run: missed == Missed::RunOnce });
        (Timer::new(schedule, missed, now), fire)
    }

    /// The next scheduled instant.
    pub fn next(&self) -> Option<DateTime<Utc>> {
        self.next
    }

    /// What is due at `now`, if anything, and the timer moves past `now`:
    /// several times that passed at once (a suspend) are one firing.
    pub fn poll(&mut self, now: DateTime<Utc>) -> Option<Fire> {
        let at = self.next.filter(|at| *at <= now)?;
        self.next = self.schedule.next_after(now);
        Some(if now - at <= LATE { Fire::OnTime(at) } else { Fire::Missed { at, run: self.missed == Missed::RunOnce } })
    }
}

/// The validated scripts the runs execute, by SHA-256, in a private
/// directory that goes with the watcher.
struct Snapshots {
    dir: tempfile::TempDir,
}

impl Snapshots {
    fn new() -> Result<Snapshots> {
        let dir = tempfile::Builder::new()
            .prefix("offsite-watch.")
            .tempdir()
            .context("cannot create a private directory for script snapshots")?;
        Ok(Snapshots { dir })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.path().join(format!("{sha256}.wasm"))
    }

    /// The snapshot of `version`'s script, written on first use.
    fn script(&self, version: &Version) -> Result<PathBuf> {
        let path = self.path(&version.script.sha256);
        if !path.exists() {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, &version.script_bytes)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .with_context(|| format!("cannot write the script snapshot {}", path.display()))?;
        }
        // The run checks the site's signers again, on the snapshot.
        if let Some(sig) = &version.signature {
            let sig_path = crate::share::resolve::sig_path(&path);
            std::fs::write(&sig_path, sig)
                .with_context(|| format!("cannot write the signature snapshot {}", sig_path.display()))?;
        }
        Ok(path)
    }

    /// Removes every snapshot but those in `keep`.
    fn prune(&self, keep: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let sha = name.strip_suffix(".wasm.sig").or_else(|| name.strip_suffix(".wasm")).unwrap_or(&name);
            if !keep.contains(sha) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// A run in progress.
struct Running {
    child: Child,
    started: Instant,
    version: Arc<Version>,
    why: String,
    terminated: Option<Instant>,
}

/// One watched site.
struct Entry {
    slot: Slot,
    timer: Option<Timer>,
    running: Option<Running>,
    /// Due, waiting for a free job (or for its store): since when, and why.
    /// Runs start in the order they came due.
    queued: Option<(Instant, String)>,
    /// A new version arrived during a run (`--run-on-change`).
    rerun: bool,
    /// When to re-read the files (debounce), after an event.
    reload_at: Option<Instant>,
    /// Its file is no longer listed (SIGHUP): dropped when idle.
    retired: bool,
    /// Why the last new version was refused: the same refusal again (one
    /// edit is often several writes) is not logged again.
    last_rejection: Option<String>,
    /// A site following a registry tag (`script_update = "follow"`): when
    /// to look at the tag next (`script_poll`).
    poll_at: Option<Instant>,
    /// A reload being prepared on a thread of its own: since when, and
    /// its number (a result that comes after [`RELOAD_TIMEOUT`] is dropped).
    reloading: Option<(Instant, u64)>,
}

impl Entry {
    /// Sets when a followed tag is looked at next (none for other sites).
    fn schedule_poll(&mut self) {
        let site = &self.slot.current().site;
        let follows = site.script_follow && matches!(site.script, Some(crate::share::reference::ScriptSource::Oci(_)));
        self.poll_at = follows.then(|| Instant::now() + site.script_poll);
    }

    fn name(&self) -> String {
        self.slot.current().site.name.clone()
    }

    /// Marks the site due (if it is not already waiting).
    fn queue(&mut self, why: String) {
        if self.queued.is_none() {
            self.queued = Some((Instant::now(), why));
        }
    }

    fn files(&self) -> [PathBuf; 2] {
        [self.slot.site_file.clone(), self.slot.script_file().to_path_buf()]
    }
}

enum Message {
    Files(Vec<PathBuf>),
    Signal(i32),
    /// A reload worked out off the loop, by its number.
    Prepared(u64, Box<crate::reload::Prepared>),
    /// A refused site file loaded again off the loop: its entry, or why not.
    Loaded(PathBuf, std::result::Result<Box<Entry>, String>),
}

/// A site file that does not load (bad TOML, a script that does not
/// compile or validate, no schedule): refused, logged once, and tried
/// again when it changes or on SIGHUP; every other site keeps its
/// schedule meanwhile.
struct Refused {
    error: String,
    /// When to try again (the debounce after a change).
    retry_at: Option<Instant>,
    /// A load under way on its thread.
    loading: bool,
}

/// How long a reload may take (a registry that trickles, a compile) before
/// the watcher stops waiting for it; the registry client's own timeouts
/// (5 minutes an operation) end it sooner.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `offsite watch` until SIGTERM or SIGINT. A site that does not load
/// or validate is refused (logged, tried again when its file changes), and
/// the others run on; later, bad versions are refused one by one.
pub fn watch(args: &[PathBuf], options: Options) -> Result<()> {
    if options.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    let runtime = Runtime::new(default_cache_dir())?;
    let files = crate::status::site_files(args)?;
    if files.is_empty() {
        bail!("no site files in {}", args.iter().map(|a| a.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    let mut entries = Vec::new();
    let mut refused = BTreeMap::new();
    let now = Utc::now();
    for file in &files {
        match load_entry(&runtime, file, &options, now) {
            Ok((entry, fire)) => {
                let queued = fire.and_then(|f| announce(&entry.name(), &f)).map(|why| (Instant::now(), why));
                entries.push(Entry { queued, ..entry });
            }
            Err(e) => {
                let error = format!("{e:#}");
                log_refused(file, &error);
                refused.insert(absolute(file), Refused { error, retry_at: None, loading: false });
            }
        }
    }

    let (tx, rx) = std::sync::mpsc::channel();
    forward_signals(tx.clone())?;
    let files_tx = tx.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let _ = files_tx.send(Message::Files(event.paths));
        }
    })
    .context("cannot watch files (inotify)")?;
    let mut state = Watch {
        runtime: Arc::new(runtime),
        tx: tx.clone(),
        reloads: 0,
        options,
        args: args.to_vec(),
        entries,
        refused,
        snapshots: Snapshots::new()?,
        watched: BTreeSet::new(),
        stopping: None,
        told: String::new(),
    };
    state.rewatch(&mut watcher);
    for e in &state.entries {
        let next = e.timer.as_ref().and_then(Timer::next).map(|t| local(&t));
        log::info!(
            target: "offsite::watch",
            "watching site {} ({}) with {} {} (sha256 {}); next run: {}",
            e.name(),
            e.slot.site_file.display(),
            e.slot.current().info.name,
            e.slot.current().info.version,
            e.slot.current().script.sha256,
            next.as_deref().unwrap_or(if state.options.run_on_change { "on change" } else { "none" })
        );
    }
    state.run(&rx, &mut watcher);
    Ok(())
}

/// The site file as the watcher keys it (absolute, as the entries' are).
fn absolute(file: &Path) -> PathBuf {
    std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf())
}

fn log_refused(file: &Path, error: &str) {
    log::error!(
        target: "offsite::watch",
        "site file {} is refused, and the other sites keep their schedules: {error} (it is loaded again when \
         it changes, or on SIGHUP)",
        file.display()
    );
}

/// Logs what start-up found about missed runs; the reason to queue a run.
fn announce(site: &str, fire: &Fire) -> Option<String> {
    match fire {
        Fire::Missed { at, run: true } => {
            log::warn!(target: "offsite::watch", "site {site}: missed its run at {}: running it now (missed = \"run-once\")", local(at));
            Some(format!("missed its run at {}", local(at)))
        }
        Fire::Missed { at, run: false } => {
            log::warn!(target: "offsite::watch", "site {site}: missed its run at {}: skipped (missed = \"skip\")", local(at));
            None
        }
        Fire::OnTime(at) => Some(format!("scheduled at {}", local(at))),
    }
}

fn local(t: &DateTime<Utc>) -> String {
    t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M %Z").to_string()
}

fn load_entry(runtime: &Runtime, file: &Path, options: &Options, now: DateTime<Utc>) -> Result<(Entry, Option<Fire>)> {
    let slot = Slot::for_site(runtime, file)?;
    let version = slot.current();
    let site = &version.site;
    let (timer, fire) = match &site.schedule {
        Some(schedule) => {
            let (timer, fire) = Timer::start(schedule.clone(), site.missed, last_run(&site.store, &site.name), now);
            (Some(timer), fire)
        }
        None if options.run_on_change => (None, None),
        None => bail!(
            "{}: no `schedule`: watch runs a site on its schedule (or on every change, with --run-on-change)",
            file.display()
        ),
    };
    let entry = Entry {
        slot,
        timer,
        running: None,
        queued: None,
        rerun: false,
        reload_at: None,
        retired: false,
        last_rejection: None,
        poll_at: None,
        reloading: None,
    };
    let mut entry = entry;
    entry.schedule_poll();
    Ok((entry, fire))
}

/// When the site last started a run, from its store's manifests.
fn last_run(store: &crate::site::StoreAt, site: &str) -> Option<DateTime<Utc>> {
    // (Bounded: the watcher waits for it before it schedules the site.)
    let root = crate::store::Root::open_existing(store, std::time::Duration::from_secs(10)).ok()?;
    let (manifests, _) = root.manifests().ok()?;
    let runs = root.runs_of(site);
    manifests.iter().rev().find(|m| runs.includes(m)).and_then(|m| m.started_at()).map(|t| t.with_timezone(&Utc))
}

fn forward_signals(tx: Sender<Message>) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for signal in signals.forever() {
            if tx.send(Message::Signal(signal)).is_err() {
                return;
            }
        }
    })?;
    Ok(())
}

struct Watch {
    /// Shared with the threads that prepare reloads.
    runtime: Arc<Runtime>,
    /// Where those threads send what they prepared.
    tx: std::sync::mpsc::Sender<Message>,
    /// Reloads started so far (each one's number).
    reloads: u64,
    options: Options,
    args: Vec<PathBuf>,
    entries: Vec<Entry>,
    /// Site files that do not load, by absolute path.
    refused: BTreeMap<PathBuf, Refused>,
    snapshots: Snapshots,
    watched: BTreeSet<PathBuf>,
    /// Since SIGTERM/SIGINT: when the grace period ends.
    stopping: Option<Instant>,
    /// The last STATUS= told to systemd.
    told: String,
}

impl Watch {
    /// One line for `systemctl status`: sites, runs going, the next run.
    fn status_line(&self) -> String {
        let running = self.entries.iter().filter(|e| e.running.is_some()).count();
        let next = self
            .entries
            .iter()
            .filter_map(|e| Some((e.timer.as_ref()?.next()?, e.name())))
            .min()
            .map(|(at, name)| format!("; next: {name} at {}", local(&at)))
            .unwrap_or_default();
        let what = if self.stopping.is_some() { "stopping: " } else { "" };
        let refused = match self.refused.len() {
            0 => String::new(),
            n => format!(", {n} refused (see the log)"),
        };
        format!("{what}{} site(s){refused}, {running} running{next}", self.entries.len())
    }

    /// Tells systemd the status when it changed (nothing outside systemd).
    fn tell_status(&mut self) {
        let line = self.status_line();
        if line != self.told {
            crate::systemd::notify(&format!("STATUS={line}"));
            self.told = line;
        }
    }

    fn run(&mut self, rx: &Receiver<Message>, watcher: &mut impl notify::Watcher) {
        crate::systemd::notify(&format!("READY=1\nSTATUS={}", self.status_line()));
        loop {
            self.reap();
            self.tell_status();
            if let Some(grace_end) = self.stopping {
                if self.entries.iter().all(|e| e.running.is_none()) {
                    log::info!(target: "offsite::watch", "stopped");
                    return;
                }
                self.stop_runs(grace_end);
            } else {
                self.reload_due();
                self.retry_refused();
                self.fire_due(Utc::now());
                self.start_queued();
            }
            let mut wait = TICK;
            if self.entries.iter().any(|e| e.running.is_some()) {
                wait = wait.min(REAP_EVERY);
            }
            let now = Instant::now();
            // A site whose reload is under way waits for its message.
            let idle = self.entries.iter().filter(|e| e.reloading.is_none());
            for at in idle.flat_map(|e| e.reload_at.into_iter().chain(e.poll_at)) {
                wait = wait.min(at.saturating_duration_since(now));
            }
            for at in self.refused.values().filter(|r| !r.loading).filter_map(|r| r.retry_at) {
                wait = wait.min(at.saturating_duration_since(now));
            }
            if let Some(next) = self.entries.iter().filter_map(|e| e.timer.as_ref()?.next()).min() {
                let until = (next - Utc::now()).to_std().unwrap_or_default();
                wait = wait.min(until);
            }
            match rx.recv_timeout(wait) {
                Ok(Message::Files(paths)) => self.touched(&paths),
                Ok(Message::Signal(signal)) => self.signal(signal, watcher),
                Ok(Message::Prepared(number, prepared)) => self.prepared(number, *prepared, watcher),
                Ok(Message::Loaded(file, loaded)) => self.loaded(file, loaded, watcher),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Starts (or restarts) the debounce of every site whose file changed.
    fn touched(&mut self, paths: &[PathBuf]) {
        let at = Instant::now() + self.options.debounce;
        for e in &mut self.entries {
            if paths.iter().any(|p| e.files().contains(p)) {
                e.reload_at = Some(at);
            }
        }
        for (file, r) in &mut self.refused {
            if paths.contains(file) {
                r.retry_at = Some(at);
            }
        }
    }

    /// Loads again, each on a thread of its own, the refused site files
    /// whose debounce ran out.
    fn retry_refused(&mut self) {
        let now = Instant::now();
        for (file, r) in &mut self.refused {
            if r.loading || r.retry_at.is_none_or(|at| at > now) {
                continue;
            }
            r.retry_at = None;
            r.loading = true;
            let (runtime, tx, options, path) =
                (Arc::clone(&self.runtime), self.tx.clone(), self.options.clone(), file.clone());
            let spawned = std::thread::Builder::new().name("load".into()).spawn(move || {
                let loaded = load_entry(&runtime, &path, &options, Utc::now())
                    .map(|(entry, _)| Box::new(entry))
                    .map_err(|e| format!("{e:#}"));
                let _ = tx.send(Message::Loaded(path, loaded));
            });
            if let Err(err) = spawned {
                log::error!(target: "offsite::watch", "cannot load {} again: {err}", file.display());
                r.loading = false;
            }
        }
    }

    /// Takes a refused site file's new load: it joins the sites, or stays
    /// refused (logged again only when the reason changed).
    fn loaded(
        &mut self,
        file: PathBuf,
        loaded: std::result::Result<Box<Entry>, String>,
        watcher: &mut impl notify::Watcher,
    ) {
        let Some(r) = self.refused.get_mut(&file) else { return };
        r.loading = false;
        if self.stopping.is_some() {
            return;
        }
        match loaded {
            Ok(entry) => {
                self.refused.remove(&file);
                log::info!(target: "offsite::watch", "site {}: {} loads now; added", entry.name(), file.display());
                self.entries.push(*entry);
                self.rewatch(watcher);
            }
            Err(error) if error == r.error => {
                log::debug!(target: "offsite::watch", "site file {} is still refused: {error}", file.display());
            }
            Err(error) => {
                log_refused(&file, &error);
                r.error = error;
            }
        }
    }

    fn signal(&mut self, signal: i32, watcher: &mut impl notify::Watcher) {
        use signal_hook::consts::SIGHUP;
        let name = match signal {
            SIGHUP => "SIGHUP",
            signal_hook::consts::SIGINT => "SIGINT",
            _ => "SIGTERM",
        };
        if signal == SIGHUP {
            if self.stopping.is_none() {
                log::info!(target: "offsite::watch", "received SIGHUP: re-reading every site and script");
                let at = crate::systemd::monotonic_usec();
                crate::systemd::notify(&format!("RELOADING=1\nMONOTONIC_USEC={at}"));
                self.reread(watcher);
                crate::systemd::notify(&format!("READY=1\nSTATUS={}", self.status_line()));
            }
            return;
        }
        let running = self.entries.iter().filter(|e| e.running.is_some()).count();
        match self.stopping {
            None => {
                self.entries.iter_mut().for_each(|e| e.queued = None);
                self.stopping = Some(Instant::now() + self.options.grace);
                crate::systemd::notify(&format!("STOPPING=1\nSTATUS={}", self.status_line()));
                if running > 0 {
                    log::warn!(
                        target: "offsite::watch",
                        "received {name}: no new runs; {running} run(s) in progress get {} to finish",
                        humantime::format_duration(self.options.grace)
                    );
                } else {
                    log::info!(target: "offsite::watch", "received {name}: stopping");
                }
            }
            Some(_) => {
                log::warn!(target: "offsite::watch", "received {name} again: stopping the runs now");
                self.stopping = Some(Instant::now());
            }
        }
    }

    /// SIGHUP: every listed site file read again, new ones added, gone
    /// ones dropped (after their run, if one is going).
    fn reread(&mut self, watcher: &mut impl notify::Watcher) {
        let files = match crate::status::site_files(&self.args) {
            Ok(files) => files,
            Err(e) => {
                log::error!(target: "offsite::watch", "cannot list the site files: {e:#}; keeping the sites as they are");
                return;
            }
        };
        let listed: Vec<PathBuf> = files.iter().filter_map(|f| std::path::absolute(f).ok()).collect();
        for e in &mut self.entries {
            e.retired = !listed.contains(&e.slot.site_file);
            if !e.retired {
                e.reload_at = Some(Instant::now());
            } else {
                log::info!(target: "offsite::watch", "site {}: {} is no longer listed; dropping it", e.name(), e.slot.site_file.display());
            }
        }
        // Refused files that are still listed are tried again now.
        self.refused.retain(|file, _| listed.contains(file));
        for r in self.refused.values_mut() {
            r.retry_at = Some(Instant::now());
        }
        let now = Utc::now();
        for file in listed {
            if self.entries.iter().any(|e| e.slot.site_file == file) || self.refused.contains_key(&file) {
                continue;
            }
            match load_entry(&self.runtime, &file, &self.options, now) {
                Ok((entry, _)) => {
                    log::info!(target: "offsite::watch", "site {}: added ({})", entry.name(), file.display());
                    self.entries.push(entry);
                }
                Err(e) => {
                    let error = format!("{e:#}");
                    log_refused(&file, &error);
                    self.refused.insert(file, Refused { error, retry_at: None, loading: false });
                }
            }
        }
        self.drop_retired();
        self.rewatch(watcher);
        self.reload_due();
    }

    fn drop_retired(&mut self) {
        let before = self.entries.len();
        self.entries.retain(|e| !(e.retired && e.running.is_none()));
        if self.entries.len() != before {
            self.prune_snapshots();
        }
    }

    /// Starts a reload, on a thread of its own, for each site whose
    /// debounce ran out or whose followed tag is due a look (a new digest
    /// is pulled, signer-checked, diffed against the site's grants and
    /// validated like any new version). The loop goes on scheduling and
    /// answering signals meanwhile, whatever a registry does.
    fn reload_due(&mut self) {
        let now = Instant::now();
        for e in &mut self.entries {
            if let Some((since, _)) = e.reloading
                && now.duration_since(since) > RELOAD_TIMEOUT
            {
                log::error!(
                    target: "offsite::watch",
                    "site {}: a reload (its registry, or a compile) did not finish in {}; keeping the running version",
                    e.name(),
                    humantime::format_duration(RELOAD_TIMEOUT)
                );
                e.reloading = None;
            }
            if e.poll_at.is_some_and(|at| at <= now) {
                e.reload_at = Some(now);
                e.schedule_poll();
            }
            if e.reloading.is_some() || e.reload_at.is_none_or(|at| at > now) {
                continue;
            }
            e.reload_at = None;
            self.reloads += 1;
            let number = self.reloads;
            e.reloading = Some((now, number));
            let job = e.slot.job();
            let (runtime, tx) = (Arc::clone(&self.runtime), self.tx.clone());
            let spawned = std::thread::Builder::new().name("reload".into()).spawn(move || {
                let prepared = job.prepare(&runtime);
                let _ = tx.send(Message::Prepared(number, Box::new(prepared)));
            });
            if let Err(err) = spawned {
                log::error!(target: "offsite::watch", "site {}: cannot start a reload: {err}", e.name());
                e.reloading = None;
            }
        }
    }

    /// Takes a reload prepared off the loop.
    fn prepared(&mut self, number: u64, prepared: crate::reload::Prepared, watcher: &mut impl notify::Watcher) {
        let Some(e) = self.entries.iter_mut().find(|e| e.reloading.is_some_and(|(_, n)| n == number)) else {
            return;
        };
        e.reloading = None;
        if self.stopping.is_some() {
            return;
        }
        let name = e.name();
        let old_schedule = e.slot.current().site.schedule.as_ref().map(|s| (s.expression.clone(), s.zone));
        let mut changed = false;
        match e.slot.apply(prepared) {
            Reload::Unchanged => {}
            Reload::Rejected { reason } if e.last_rejection.as_deref() == Some(reason.as_str()) => {
                log::debug!(target: "offsite::watch", "site {name}: still not valid: {reason}");
            }
            Reload::Rejected { reason } => {
                log::error!(
                    target: "offsite::watch",
                    "site {name}: the new version is not valid; keeping the running one (script sha256 {}): {reason}",
                    e.slot.current().script.sha256
                );
                e.last_rejection = Some(reason);
            }
            Reload::Replaced { old, new, script_kept } => {
                changed = true;
                e.last_rejection = None;
                let current = e.slot.current();
                if let Some(reason) = script_kept {
                    log::error!(
                        target: "offsite::watch",
                        "site {name}: the script on disk is not valid; keeping the running one (script sha256 {}) with the new site file: {reason}",
                        old.0
                    );
                }
                let change = |what: &str, old: &str, new: &str| {
                    if old == new {
                        format!("{what} sha256 {old} (unchanged)")
                    } else {
                        format!("{what} sha256 {old} -> {new}")
                    }
                };
                log::info!(
                    target: "offsite::watch",
                    "site {}: reloaded {} {}: {}, {}",
                    current.site.name,
                    current.info.name,
                    current.info.version,
                    change("script", &old.0, &new.0),
                    change("site", &old.1, &new.1)
                );
                let schedule = current.site.schedule.as_ref().map(|s| (s.expression.clone(), s.zone));
                if schedule != old_schedule {
                    e.timer = current.site.schedule.clone().map(|s| Timer::new(s, current.site.missed, Utc::now()));
                    if e.timer.is_none() && !self.options.run_on_change {
                        log::warn!(target: "offsite::watch", "site {name}: its site file has no `schedule` now: it will not run until it has one again");
                    }
                }
                if self.options.run_on_change {
                    if e.running.is_some() {
                        e.rerun = true;
                    } else {
                        e.queue("its files changed".into());
                    }
                }
            }
        }
        if changed {
            self.rewatch(watcher);
            self.prune_snapshots();
        }
    }

    /// Watches the directories of every site and script file, and only
    /// those.
    fn rewatch(&mut self, watcher: &mut impl notify::Watcher) {
        let wanted: BTreeSet<PathBuf> = self
            .entries
            .iter()
            .flat_map(|e| e.files())
            .chain(self.refused.keys().cloned())
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        for dir in self.watched.difference(&wanted) {
            let _ = watcher.unwatch(dir);
        }
        for dir in wanted.difference(&self.watched) {
            if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                log::error!(target: "offsite::watch", "cannot watch {}: {e}; changes there are seen on SIGHUP only", dir.display());
            }
        }
        self.watched = wanted;
    }

    fn fire_due(&mut self, now: DateTime<Utc>) {
        for e in &mut self.entries {
            let Some(fire) = e.timer.as_mut().and_then(|t| t.poll(now)) else { continue };
            let name = e.name();
            let why = match &fire {
                Fire::OnTime(at) => format!("scheduled at {}", local(at)),
                Fire::Missed { at, run: true } => {
                    log::warn!(target: "offsite::watch", "site {name}: its run at {} was missed (the machine slept or the clock jumped): running it now", local(at));
                    format!("missed its run at {}", local(at))
                }
                Fire::Missed { at, run: false } => {
                    log::warn!(target: "offsite::watch", "site {name}: its run at {} was missed (the machine slept or the clock jumped): skipped (missed = \"skip\")", local(at));
                    continue;
                }
            };
            if let Some(r) = &e.running {
                log::warn!(
                    target: "offsite::watch",
                    "site {name}: {why}, but its previous run ({}) is still going after {}: this one is skipped",
                    r.why,
                    humantime::format_duration(Duration::from_secs(r.started.elapsed().as_secs()))
                );
            } else {
                e.queue(why);
            }
        }
    }

    /// Starts queued runs while jobs are free. A site whose store another
    /// of our runs is using waits for it (they share the store's lock).
    fn start_queued(&mut self) {
        let mut due: Vec<(Instant, usize)> =
            self.entries.iter().enumerate().filter_map(|(i, e)| Some((e.queued.as_ref()?.0, i))).collect();
        due.sort();
        for (_, i) in due {
            let busy = self.entries.iter().filter(|e| e.running.is_some()).count();
            if busy >= self.options.jobs {
                return;
            }
            let store = &self.entries[i].slot.current().site.store;
            let store_busy =
                self.entries.iter().any(|e| e.running.as_ref().is_some_and(|r| r.version.site.store == *store));
            if !store_busy {
                self.start(i);
            }
        }
    }

    fn start(&mut self, i: usize) {
        let e = &mut self.entries[i];
        let why = e.queued.take().map(|(_, why)| why).unwrap_or_default();
        let version = e.slot.current();
        let name = version.site.name.clone();
        match spawn_run(&self.snapshots, &e.slot.site_file, &version, self.options.verbose) {
            Ok(child) => {
                log::info!(
                    target: "offsite::watch",
                    "site {name}: run started ({why}), pid {}, {} {} (sha256 {})",
                    child.id(),
                    version.info.name,
                    version.info.version,
                    version.script.sha256
                );
                e.running = Some(Running { child, started: Instant::now(), version, why, terminated: None });
            }
            Err(err) => log::error!(target: "offsite::watch", "site {name}: cannot start a run: {err:#}"),
        }
    }

    /// Collects finished runs and reports how each ended.
    fn reap(&mut self) {
        let mut finished = false;
        for e in &mut self.entries {
            let Some(r) = &mut e.running else { continue };
            let status = match r.child.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                Err(err) => {
                    log::error!(target: "offsite::watch", "site {}: cannot wait for run pid {}: {err}", r.version.site.name, r.child.id());
                    continue;
                }
            };
            let took = humantime::format_duration(Duration::from_millis(r.started.elapsed().as_millis() as u64));
            let name = r.version.site.name.clone();
            match (status.code(), status.signal()) {
                (Some(0), _) => log::info!(target: "offsite::watch", "site {name}: run succeeded in {took}"),
                (Some(4), _) => log::warn!(
                    target: "offsite::watch",
                    "site {name}: run skipped: another run of this store holds its lock (see above)"
                ),
                (Some(code), _) => log::error!(
                    target: "offsite::watch",
                    "site {name}: run failed (exit {code}) after {took}; its error is above"
                ),
                (None, Some(signal)) => log::error!(
                    target: "offsite::watch",
                    "site {name}: run killed by signal {signal} after {took}; the next run recovers what it left"
                ),
                (None, None) => log::error!(target: "offsite::watch", "site {name}: run ended without a status"),
            }
            e.running = None;
            finished = true;
            if std::mem::take(&mut e.rerun) && self.stopping.is_none() {
                e.queue("its files changed during the last run".into());
            }
        }
        if finished {
            self.drop_retired();
            self.prune_snapshots();
        }
    }

    /// After the grace period: SIGTERM each run (a clean abort), and
    /// SIGKILL one that is still there [`KILL_AFTER`] later.
    fn stop_runs(&mut self, grace_end: Instant) {
        let now = Instant::now();
        if now < grace_end {
            return;
        }
        for e in &mut self.entries {
            let Some(r) = &mut e.running else { continue };
            let pid = rustix::process::Pid::from_child(&r.child);
            match r.terminated {
                None => {
                    log::warn!(
                        target: "offsite::watch",
                        "site {}: run still going after the grace period: stopping it (SIGTERM)",
                        r.version.site.name
                    );
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                    r.terminated = Some(now);
                }
                Some(at) if now.duration_since(at) >= KILL_AFTER => {
                    log::error!(
                        target: "offsite::watch",
                        "site {}: run did not stop {} after SIGTERM: killing it; the next run recovers what it left",
                        r.version.site.name,
                        humantime::format_duration(KILL_AFTER)
                    );
                    let _ = r.child.kill();
                    r.terminated = Some(now + Duration::from_secs(3600));
                }
                Some(_) => {}
            }
        }
    }

    fn prune_snapshots(&self) {
        let mut keep: HashSet<String> = self.entries.iter().map(|e| e.slot.current().script.sha256.clone()).collect();
        keep.extend(self.entries.iter().filter_map(|e| Some(e.running.as_ref()?.version.script.sha256.clone())));
        self.snapshots.prune(&keep);
    }
}

/// Starts `offsite run` for `version`: the snapshot of its script, its
/// site text on stdin, in its own process group (a Ctrl-C meant for the
/// watcher does not reach the runs; the watcher decides when they stop).
fn spawn_run(snapshots: &Snapshots, site_file: &Path, version: &Version, verbose: u8) -> Result<Child> {
    let script = snapshots.script(version)?;
    let mut cmd = Command::new("/proc/self/exe");
    if verbose > 0 {
        cmd.arg(format!("-{}", "v".repeat(verbose as usize)));
    }
    cmd.arg("run").arg(&script).arg("--site").arg(site_file).arg("--site-stdin");
    cmd.arg("--script-source").arg(&version.script_source);
    cmd.current_dir(crate::site::dir_of(site_file));
    cmd.env("OFFSITE_LOG_PREFIX", format!("[{}] ", version.site.name));
    cmd.env(crate::logging::LOG_TIME_VAR, "1");
    cmd.stdin(Stdio::piped()).stdout(Stdio::null());
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(|e| anyhow!("cannot start offsite run: {e}"))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // The run reads its whole stdin before anything else.
    if let Err(e) = stdin.write_all(version.site_text.as_bytes()) {
        let _ = child.kill();
        let _ = child.wait();
        bail!("cannot pass the site to the run: {e}");
    }
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Drives `timer` minute by minute from `from` to `to` (an injected
    /// clock) and returns when it fired.
    fn fires(
        timer: &mut Timer,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        step: chrono::TimeDelta,
    ) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let mut now = from;
        while now <= to {
            if let Some(fire) = timer.poll(now) {
                let on_time = matches!(fire, Fire::OnTime(_));
                out.push((now.to_rfc3339(), on_time));
            }
            now += step;
        }
        out
    }

    fn article(tz: &str) -> Schedule {
        Schedule::parse("34 3,20 * * *", Some(tz)).unwrap()
    }

    #[test]
    fn fires_at_the_scheduled_instants() {
        let start = utc("2026-03-01T00:00:00Z");
        let mut timer = Timer::new(article("UTC"), Missed::RunOnce, start);
        let got = fires(&mut timer, start, utc("2026-03-02T23:59:00Z"), chrono::TimeDelta::minutes(1));
        let want: Vec<(String, bool)> = [
            "2026-03-01T03:34:00+00:00",
            "2026-03-01T20:34:00+00:00",
            "2026-03-02T03:34:00+00:00",
            "2026-03-02T20:34:00+00:00",
        ]
        .iter()
        .map(|s| (s.to_string(), true))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn fires_across_dst_changes_in_the_sites_zone() {
        // Europe/Berlin 2026: clocks go forward on 29 March at 02:00 and back
        // on 25 October at 03:00. A 02:30 job has no 02:30 on 29 March (it
        // runs at the change, 03:00 CEST = 01:00 UTC) and two on 25 October
        // (it runs once, the first time, 02:30 CEST = 00:30 UTC).
        let schedule = Schedule::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        let step = chrono::TimeDelta::minutes(1);
        let from = utc("2026-03-28T00:00:00Z");
        let mut timer = Timer::new(schedule.clone(), Missed::RunOnce, from);
        let got: Vec<String> =
            fires(&mut timer, from, utc("2026-03-30T12:00:00Z"), step).into_iter().map(|f| f.0).collect();
        assert_eq!(got, ["2026-03-28T01:30:00+00:00", "2026-03-29T01:00:00+00:00", "2026-03-30T00:30:00+00:00"]);

        let from = utc("2026-10-24T00:00:00Z");
        let mut timer = Timer::new(schedule, Missed::RunOnce, from);
        let got: Vec<String> =
            fires(&mut timer, from, utc("2026-10-26T12:00:00Z"), step).into_iter().map(|f| f.0).collect();
        assert_eq!(got, ["2026-10-24T00:30:00+00:00", "2026-10-25T00:30:00+00:00", "2026-10-26T01:30:00+00:00"]);
    }

    #[test]
    fn a_sleep_over_several_runs_is_one_missed_firing_by_policy() {
        let at = utc("2026-03-01T00:00:00Z");
        let wake = utc("2026-03-03T12:00:00Z"); // slept through four runs
        let mut timer = Timer::new(article("UTC"), Missed::RunOnce, at);
        assert_eq!(timer.poll(wake), Some(Fire::Missed { at: utc("2026-03-01T03:34:00Z"), run: true }));
        assert_eq!(timer.poll(wake), None, "the missed runs coalesce");
        assert_eq!(timer.next(), Some(utc("2026-03-03T20:34:00Z")));

        let mut timer = Timer::new(article("UTC"), Missed::Skip, at);
        let fire = timer.poll(wake).unwrap();
        assert!(!fire.runs(), "{fire:?}");
        // Late by less than LATE (a busy machine) is still on time.
        let mut timer = Timer::new(article("UTC"), Missed::Skip, at);
        assert_eq!(timer.poll(utc("2026-03-01T03:34:59Z")), Some(Fire::OnTime(utc("2026-03-01T03:34:00Z"))));
    }

    #[test]
    fn start_up_runs_once_for_missed_runs_or_skips_them() {
        let now = utc("2026-03-05T12:00:00Z");
        // Last ran three days ago: missed, run once.
        let (timer, fire) = Timer::start(article("UTC"), Missed::RunOnce, Some(utc("2026-03-02T03:34:10Z")), now);
        assert_eq!(fire, Some(Fire::Missed { at: utc("2026-03-02T20:34:00Z"), run: true }));
        assert_eq!(timer.next(), Some(utc("2026-03-05T20:34:00Z")));
        // The same with missed = skip: nothing runs now.
        let (_, fire) = Timer::start(article("UTC"), Missed::Skip, Some(utc("2026-03-02T03:34:10Z")), now);
        assert!(!fire.unwrap().runs());
        // Last ran at the last scheduled time: nothing missed.
        let (_, fire) = Timer::start(article("UTC"), Missed::RunOnce, Some(utc("2026-03-05T03:34:00Z")), now);
        assert_eq!(fire, None);
        // Never ran: nothing missed, the first run is the next scheduled one.
        let (timer, fire) = Timer::start(article("UTC"), Missed::RunOnce, None, now);
        assert_eq!((fire, timer.next()), (None, Some(utc("2026-03-05T20:34:00Z"))));
    }

    #[test]
    fn local_time_is_the_default_zone() {
        // Whatever TZ the tests run in, a local schedule fires at 03:34 local.
        let schedule = Schedule::parse("34 3 * * *", None).unwrap();
        let from = Utc::now();
        let mut timer = Timer::new(schedule, Missed::RunOnce, from);
        let next = timer.next().unwrap();
        assert_eq!(next.with_timezone(&chrono::Local).format("%H:%M").to_string(), "03:34");
        assert!(matches!(timer.poll(next), Some(Fire::OnTime(_))));
    }
}
