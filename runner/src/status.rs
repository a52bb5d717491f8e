//! `offsite status`: for each site, its last run, its last good run, whether
//! it is running now, and when it runs next. Read from the stores'
//! manifests and locks, so it works whether or not a watcher is running.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};

use crate::site::Site;
use crate::store::Manifest;
use crate::store::Root;
use crate::store::outputs::OutputState;
use crate::store::run::Runs;

/// One site's state.
pub struct SiteStatus {
    pub text: String,
    /// The last run did not succeed.
    pub failing: bool,
    /// The same for `--json` (docs/JSON.md), with the manifest's names.
    pub json: serde_json::Value,
}

/// The site files named by `args`: files as given, and every `*.toml` in a
/// directory, sorted.
pub fn site_files(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for arg in args {
        if arg.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(arg)
                .with_context(|| format!("cannot read {}", arg.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
                .collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(arg.clone());
        }
    }
    Ok(out)
}

/// Describes `site` as of `now`.
pub fn status(site: &Site, file: &Path, now: DateTime<Utc>) -> SiteStatus {
    let mut text = String::new();
    let _ = writeln!(text, "site {} ({})", site.name, file.display());
    let mut json = serde_json::json!({
        "site": site.name, "site_file": file.display().to_string(), "store": site.store.display().to_string(),
        "last_run": null, "last_good": null, "running": null, "interrupted": null, "next_run": null,
    });
    let mut failing;
    match Root::open_existing(&site.store, site.limits.call_timeout) {
        // Never run and an unreadable store both fail a monitoring check:
        // there is no backup to count on.
        Err(e) if e.is_not_found() => {
            failing = true;
            let _ = writeln!(text, "  last run:  never (no store at {} yet)", site.store.display());
        }
        Err(e) => {
            failing = true;
            let _ = writeln!(text, "  last run:  unknown: cannot read the store {}: {e}", site.store.display());
            json["error"] = format!("cannot read the store {}: {e}", site.store.display()).into();
        }
        Ok(root) => {
            let all = root.manifests().map(|(all, _)| all).unwrap_or_default();
            let runs = root.runs_of(&site.name);
            let others: std::collections::BTreeSet<&str> =
                all.iter().map(|m| m.run.site.as_str()).filter(|n| *n != site.name).collect();
            let mine: Vec<Manifest> = all.iter().filter(|m| runs.includes(m)).cloned().collect();
            match mine.last() {
                None => {
                    failing = true;
                    let _ = writeln!(text, "  last run:  never");
                }
                Some(last) => {
                    failing = !last.status.is_good();
                    json["last_run"] = serde_json::json!({
                        "run_id": last.run.run_id, "status": last.status.as_str(), "started": last.run.started,
                        "ended": last.ended, "files": last.files.len(), "bytes": last.bytes(), "error": last.error,
                    });
                    // Times are when each run started, the same for both lines.
                    let _ = writeln!(
                        text,
                        "  last run:  started {} {}  ({})",
                        local(&last.run.started),
                        last.status,
                        summary(last)
                    );
                    if let Some(e) = &last.error {
                        // The script's or a server's words: escaped.
                        let first = e.lines().next().unwrap_or_default();
                        let _ = writeln!(text, "             {}", crate::text::escape(first));
                    }
                    match mine.iter().rev().find(|m| m.status.is_good()) {
                        Some(good) => {
                            json["last_good"] =
                                serde_json::json!({ "run_id": good.run.run_id, "started": good.run.started });
                            let _ = writeln!(text, "  last good: started {}", local(&good.run.started));
                        }
                        None => {
                            let _ = writeln!(text, "  last good: never");
                        }
                    }
                    let refs: Vec<&Manifest> = mine.iter().collect();
                    json["outputs"] = outputs(&crate::store::outputs::states(&refs), &last.run.run_id, &mut text);
                }
            }
            if !others.is_empty() {
                json["other_sites"] = others.iter().map(|n| n.to_string()).collect::<Vec<_>>().into();
                let names = others.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
                let _ = match runs {
                    // A renamed site file: its history stayed with the store.
                    Runs::All => writeln!(
                        text,
                        "  note:      this store's runs count as this site's, including those made as site {names}"
                    ),
                    Runs::Named(_) => {
                        writeln!(text, "  note:      the store is shared; it also holds runs of site {names}")
                    }
                };
            }
            if !site.copies.is_empty() {
                json["copies"] = copies(site, &mine, &mut text).into();
            }
            match root.holders() {
                // An S3 store's lock is an object that outlives its holder
                // until it is stale; a holder on this machine whose process
                // is gone is not running, whatever the object says.
                (Some(h), _) if h.hostname == crate::store::run::hostname() && !process_exists(h.pid) => {
                    failing = true;
                    json["interrupted"] = serde_json::json!({
                        "run_id": h.run_id, "pid": h.pid, "hostname": h.hostname, "started": h.started,
                    });
                    let _ = writeln!(
                        text,
                        "  running:   no; run {} (pid {} on this machine, started {}) was killed or crashed before \
                         it finished; the store's lock it held is taken over once it is stale (`lock_stale`), and \
                         the run that takes it recovers it",
                        h.run_id,
                        h.pid,
                        local(&h.started)
                    );
                }
                (Some(h), _) => {
                    json["running"] = serde_json::json!({ "pid": h.pid, "hostname": h.hostname, "started": h.started });
                    let _ =
                        writeln!(text, "  running:   yes, pid {} on {} since {}", h.pid, h.hostname, local(&h.started));
                }
                (None, Some(h)) => {
                    failing = true;
                    json["interrupted"] = serde_json::json!({
                        "run_id": h.run_id, "pid": h.pid, "hostname": h.hostname, "started": h.started,
                    });
                    let _ = writeln!(
                        text,
                        "  running:   no; run {} (pid {} on {}, started {}) was killed or crashed before it \
                         finished; the next run recovers it",
                        h.run_id,
                        h.pid,
                        h.hostname,
                        local(&h.started)
                    );
                }
                (None, None) => {
                    let _ = writeln!(text, "  running:   no");
                }
            }
        }
    }
    match &site.schedule {
        Some(s) => match s.next_after(now) {
            Some(next) => {
                json["next_run"] = serde_json::json!({
                    "at": next.to_rfc3339(), "schedule": s.expression, "timezone": s.zone.to_string(),
                });
                let _ = writeln!(
                    text,
                    "  next run:  {} ({}, {})",
                    next.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M %Z"),
                    s.expression,
                    s.zone
                );
            }
            None => {
                let _ = writeln!(text, "  next run:  never ({} has no future time)", s.expression);
            }
        },
        None => match crate::systemd::enabled_timer(file) {
            // The shipped timer's own calendar, which the generator leaves
            // alone for a site without a schedule.
            Some(timer) => {
                let _ = writeln!(
                    text,
                    "  next run:  daily at midnight ({timer} is enabled and the site has no `schedule`: the \
                     timer's default)"
                );
            }
            None => {
                let _ = writeln!(
                    text,
                    "  next run:  not scheduled here (the site has no `schedule` and no enabled offsite@ timer; \
                     cron or another scheduler runs it)"
                );
            }
        },
    }
    json["failing"] = failing.into();
    SiteStatus { text, failing, json }
}

/// The site's outputs (see `store::outputs`): in the text only when one
/// of them did not come from the last run, each such one with its last
/// good copy and why its newest attempt failed; all of them in the JSON.
fn outputs(states: &[OutputState], last_run: &str, text: &mut String) -> serde_json::Value {
    let behind: Vec<&OutputState> =
        states.iter().filter(|o| o.last_good.as_ref().is_none_or(|c| c.run_id != last_run)).collect();
    if !behind.is_empty() {
        let _ = writeln!(text, "  outputs:   {} of {} not made by the last run:", behind.len(), states.len());
        for o in behind.iter().take(20) {
            // Names and errors are the script's and the servers' words.
            let name = crate::text::escape(&o.name);
            let good = match &o.last_good {
                Some(c) => format!("last good copy started {} (run {})", local(&c.started), c.run_id),
                None => "no good copy yet".to_string(),
            };
            let failing = match &o.failing {
                Some(f) => format!(
                    "; failed in run {}: {}",
                    f.run_id,
                    crate::text::escape(crate::text::shorten_middle(&f.error, 300).as_ref())
                ),
                None => String::new(),
            };
            let _ = writeln!(text, "             {name}: {good}{failing}");
        }
        if behind.len() > 20 {
            let _ = writeln!(text, "             and {} more (--json lists them all)", behind.len() - 20);
        }
    }
    states
        .iter()
        .take(crate::store::outputs::MAX_REPORTED)
        .map(|o| {
            serde_json::json!({
                "output": o.name,
                "last_good": o.last_good.as_ref().map(|c| serde_json::json!({
                    "run_id": c.run_id, "started": c.started, "path": c.path,
                })),
                "failing": o.failing.as_ref().map(|f| serde_json::json!({
                    "run_id": f.run_id, "started": f.started, "error": f.error,
                })),
            })
        })
        .collect::<Vec<_>>()
        .into()
}

/// Whether a process with this pid runs on this machine.
fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A manifest's time in local time; a value that is no time (the store's
/// text) comes back escaped.
pub(crate) fn local(rfc3339: &str) -> String {
    DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S %Z").to_string())
        .unwrap_or_else(|_| crate::text::escape(rfc3339).into_owned())
}

fn summary(m: &Manifest) -> String {
    let secs = match (m.started_at(), m.ended_at()) {
        (Some(s), Some(e)) => (e - s).num_milliseconds() as f64 / 1000.0,
        _ => 0.0,
    };
    format!("{} file(s), {:.1} MiB, {secs:.1} s", m.files.len(), m.bytes() as f64 / (1 << 20) as f64)
}

/// Each `[[copy]]` store: the newest good run it has, and how many good
/// runs of the first store it lacks (a copy that failed is caught up by
/// the next run).
fn copies(site: &Site, mine: &[Manifest], text: &mut String) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for copy in &site.copies {
        let store = copy.store.display();
        let newest =
            Root::open_existing(&copy.store, site.limits.call_timeout).map_err(|e| e.to_string()).and_then(|root| {
                let (all, _) = root.manifests().map_err(|e| e.to_string())?;
                let runs = root.runs_of(&site.name);
                Ok(all.into_iter().rev().find(|m| runs.includes(m) && m.status.publishes()).map(|m| m.run.run_id))
            });
        match newest {
            Ok(newest) => {
                // A run id read from the copy's manifests: the store's
                // text, escaped (a bucket is anyone's with write access).
                let shown = newest.as_deref().map(crate::text::escape);
                let behind = mine
                    .iter()
                    .filter(|m| m.status.publishes() && newest.as_ref().is_none_or(|n| m.run.run_id > *n))
                    .count();
                let _ = match (&shown, behind) {
                    (Some(n), 0) => writeln!(text, "  copy:      {store}: up to date (run {n})"),
                    (Some(n), b) => writeln!(text, "  copy:      {store}: {b} good run(s) behind (newest copied: {n})"),
                    (None, _) => writeln!(text, "  copy:      {store}: nothing copied yet"),
                };
                out.push(serde_json::json!({ "store": store, "last_copied": newest, "behind": behind }));
            }
            Err(e) => {
                let _ = writeln!(text, "  copy:      {store}: cannot be read: {e}");
                out.push(serde_json::json!({ "store": store, "last_copied": null, "behind": 0, "error": e }));
            }
        }
    }
    out
}
