//! Retention: which runs to keep, and removing the others.
//!
//! Rules (per site): the last N good runs, plus the newest good run of each
//! of the last D days, W ISO weeks and M months that have one (a partial
//! run counts: its published files are backups). Runs that did not succeed
//! are kept until a newer good run exists. Whatever the rules say, the
//! newest good run is kept, and so is the newest copy of each output
//! (`manifest::output_name`) made since it, so a server that failed for a
//! week never ages out its last good dump; a file is removed only when the pruned
//! run's manifest lists it, no kept manifest lists it, and its size is still
//! the size recorded; nothing no manifest lists is ever touched.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use chrono::{Datelike, TimeZone};

use super::manifest::{Manifest, Status};
use super::run::{Runs, StoreRoot};
use super::{META_DIR, sync_dir};

/// A site's `[retention]` rules. All zero means keep everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keep {
    pub last: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
}

impl Keep {
    pub fn is_empty(&self) -> bool {
        *self == Keep::default()
    }
}

impl std::fmt::Display for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rules: Vec<String> =
            [("last", self.last), ("daily", self.daily), ("weekly", self.weekly), ("monthly", self.monthly)]
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(what, n)| format!("{what} {n}"))
                .collect();
        if rules.is_empty() { f.write_str("keep everything") } else { f.write_str(&rules.join(", ")) }
    }
}

/// What the rules decided for one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub run_id: String,
    pub status: Status,
    pub started: String,
    /// Why it is kept; empty means it goes.
    pub kept_because: Vec<String>,
    /// Why it goes (when it does).
    pub pruned_because: Option<String>,
    /// Files that would be removed, relative to the store, with sizes.
    pub files: Vec<(PathBuf, u64)>,
    /// Files it lists that stay because a kept run lists them too.
    pub shared: Vec<PathBuf>,
}

impl Verdict {
    pub fn keep(&self) -> bool {
        self.pruned_because.is_none()
    }
}

/// Applies `keep` to a site's `runs` among `manifests` (oldest first), with
/// days, weeks and months in the local time zone.
pub fn plan(manifests: &[Manifest], runs: &Runs, keep: &Keep) -> Vec<Verdict> {
    plan_in(manifests, runs, keep, &chrono::Local)
}

pub fn plan_in<Tz: TimeZone>(manifests: &[Manifest], runs: &Runs, keep: &Keep, tz: &Tz) -> Vec<Verdict> {
    let mine: Vec<&Manifest> = manifests.iter().filter(|m| runs.includes(m)).collect();
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); mine.len()];
    let newest_good = mine.iter().rposition(|m| m.status.is_good());
    let (mut days, mut weeks, mut months) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut good_seen = 0u32;
    for (i, m) in mine.iter().enumerate().rev() {
        if !m.status.publishes() {
            continue;
        }
        if Some(i) == newest_good {
            reasons[i].push("the newest good backup".to_string());
        }
        if good_seen < keep.last {
            reasons[i].push(format!("one of the last {} good runs", keep.last));
        }
        good_seen += 1;
        let Some(t) = m.started_at().map(|t| t.with_timezone(tz)) else {
            reasons[i].push("its start time cannot be read, so no rule can place it".to_string());
            continue;
        };
        let day = t.date_naive();
        if days.len() < keep.daily as usize && days.insert(day) {
            reasons[i].push(format!("daily: newest of {day}"));
        }
        let w = t.iso_week();
        let week = format!("{}-W{:02}", w.year(), w.week());
        if weeks.len() < keep.weekly as usize && weeks.insert(week.clone()) {
            reasons[i].push(format!("weekly: newest of {week}"));
        }
        let month = format!("{}-{:02}", t.year(), t.month());
        if months.len() < keep.monthly as usize && months.insert(month.clone()) {
            reasons[i].push(format!("monthly: newest of {month}"));
        }
    }
    for (i, m) in mine.iter().enumerate() {
        if !m.status.publishes() && newest_good.is_none_or(|g| i > g) {
            reasons[i].push(format!("{} and no good run is newer", m.status));
        }
    }
    for (i, outputs) in newest_copies(&mine) {
        if reasons[i].is_empty() {
            reasons[i].push(format!("the newest good copy of {}", list_outputs(&outputs)));
        }
    }
    // Every location a kept manifest lists, of any site sharing the store.
    let kept_ids: BTreeSet<&str> =
        mine.iter().zip(&reasons).filter(|(_, r)| !r.is_empty()).map(|(m, _)| m.run.run_id.as_str()).collect();
    let protected: BTreeSet<PathBuf> = manifests
        .iter()
        .filter(|m| !runs.includes(m) || kept_ids.contains(m.run.run_id.as_str()))
        .flat_map(|m| m.files.iter().map(|f| m.location(f)))
        .collect();
    mine.iter()
        .zip(reasons)
        .map(|(m, kept_because)| {
            let pruned_because = kept_because.is_empty().then(|| {
                if m.status.publishes() {
                    format!("outside the rules ({keep})")
                } else {
                    let newer = newest_good.map(|g| mine[g].run.run_id.as_str()).unwrap_or("?");
                    format!("{} and superseded by good run {newer}", m.status)
                }
            });
            let (mut files, mut shared) = (Vec::new(), Vec::new());
            if pruned_because.is_some() {
                for f in &m.files {
                    let loc = m.location(f);
                    if protected.contains(&loc) {
                        shared.push(loc);
                    } else {
                        files.push((loc, f.bytes));
                    }
                }
            }
            Verdict {
                run_id: m.run.run_id.clone(),
                status: m.status,
                started: m.run.started.clone(),
                kept_because,
                pruned_because,
                files,
                shared,
            }
        })
        .collect()
}

/// Per run index, the current outputs (see [`super::outputs::states`]) it
/// holds the newest copy of.
fn newest_copies(runs: &[&Manifest]) -> std::collections::BTreeMap<usize, Vec<String>> {
    let mut out: std::collections::BTreeMap<usize, Vec<String>> = std::collections::BTreeMap::new();
    for state in super::outputs::states(runs) {
        if let Some(copy) = state.last_good
            && let Some(i) = runs.iter().position(|m| m.run.run_id == copy.run_id)
        {
            out.entry(i).or_default().push(state.name);
        }
    }
    out
}

/// Up to three output names, and how many more.
fn list_outputs(outputs: &[String]) -> String {
    let shown: Vec<String> = outputs.iter().take(3).map(|o| crate::text::escape(o).into_owned()).collect();
    match outputs.len() {
        n if n > 3 => format!("{} and {} more output(s)", shown.join(", "), n - 3),
        _ => shown.join(", "),
    }
}

/// Removes the runs `verdicts` prune. Each run's manifest is first renamed
/// to `<run>.json.pruning`, so an interrupted prune is finished by the next
/// one and never leaves files that no manifest lists as deletable. Returns
/// one line per file removed or left alone.
pub fn apply(root: &StoreRoot, verdicts: &[Verdict]) -> io::Result<Vec<String>> {
    let mut lines = Vec::new();
    for v in verdicts.iter().filter(|v| !v.keep()) {
        let name = format!("{}.json", v.run_id);
        let pruning = format!("{name}.pruning");
        root.manifests.rename(&name, &root.manifests, &pruning)?;
        sync_dir(&root.manifests)?;
        remove_files(root, &v.files, &mut lines)?;
        let kept = format!("runs/{}", v.run_id);
        if root.meta.is_dir(&kept) {
            root.meta.remove_dir_all(&kept)?;
        }
        let _ = root.manifests.remove_file(format!("{name}{}", super::protect::SIG_SUFFIX));
        root.manifests.remove_file(&pruning)?;
        sync_dir(&root.manifests)?;
        lines.push(format!("pruned run {} ({})", v.run_id, v.pruned_because.as_deref().unwrap_or_default()));
    }
    Ok(lines)
}

/// Finishes prunes that were interrupted: their manifests were already
/// renamed `.pruning`; files a current manifest lists stay.
pub fn resume(root: &StoreRoot) -> io::Result<Vec<String>> {
    let mut lines = Vec::new();
    let mut leftovers = Vec::new();
    for entry in root.manifests.entries()? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json.pruning") {
            leftovers.push(name);
        }
    }
    if leftovers.is_empty() {
        return Ok(lines);
    }
    let (current, _) = root.manifests()?;
    let protected: BTreeSet<PathBuf> = current.iter().flat_map(|m| m.files.iter().map(|f| m.location(f))).collect();
    for name in leftovers {
        let Ok(m) = serde_json::from_slice::<Manifest>(&root.manifests.read(&name)?) else {
            lines.push(format!("left {name} alone: it cannot be read"));
            continue;
        };
        let files: Vec<(PathBuf, u64)> =
            m.files.iter().map(|f| (m.location(f), f.bytes)).filter(|(loc, _)| !protected.contains(loc)).collect();
        remove_files(root, &files, &mut lines)?;
        let kept = format!("runs/{}", m.run.run_id);
        if root.meta.is_dir(&kept) {
            root.meta.remove_dir_all(&kept)?;
        }
        let _ = root.manifests.remove_file(format!("{}.json{}", m.run.run_id, super::protect::SIG_SUFFIX));
        root.manifests.remove_file(&name)?;
        lines.push(format!("finished pruning run {}, which an earlier prune had started", m.run.run_id));
    }
    sync_dir(&root.manifests)?;
    Ok(lines)
}

fn remove_files(root: &StoreRoot, files: &[(PathBuf, u64)], lines: &mut Vec<String>) -> io::Result<()> {
    let mut parents = BTreeSet::new();
    for (path, bytes) in files {
        match root.dir.symlink_metadata(path) {
            Ok(meta) if meta.is_file() && meta.len() == *bytes => {
                root.dir.remove_file(path)?;
                lines.push(format!("removed {}", path.display()));
                if let Some(p) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    parents.insert(p.to_path_buf());
                }
            }
            Ok(meta) => lines.push(format!(
                "left {} alone: it is not the {bytes}-byte file the manifest lists ({} bytes now)",
                path.display(),
                meta.len()
            )),
            Err(_) => {}
        }
    }
    // Directories the removals emptied go too, up to the store root.
    for p in parents.iter().rev() {
        let mut dir: Option<&Path> = Some(p);
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty() && !d.starts_with(META_DIR)) {
            if root.dir.remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
        let _ = match parent {
            Some(d) => root.dir.open_dir(d).and_then(|d| sync_dir(&d)),
            None => sync_dir(&root.dir),
        };
    }
    sync_dir(&root.dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredFile;
    use crate::store::manifest::{FORMAT, RunHeader, ScriptRef};

    fn run(id: &str, started: &str, status: Status, files: &[&str]) -> Manifest {
        Manifest {
            format: FORMAT,
            run: RunHeader {
                run_id: id.into(),
                site: "s".into(),
                hostname: "h".into(),
                pid: 1,
                script: ScriptRef {
                    name: "t".into(),
                    version: "1".into(),
                    sha256: String::new(),
                    ..Default::default()
                },
                grants_sha256: String::new(),
                started: started.into(),
            },
            ended: started.into(),
            status,
            error: None,
            warnings: vec![],
            kept_in: (!status.publishes()).then(|| format!(".offsite/runs/{id}")),
            files: files
                .iter()
                .map(|p| StoredFile {
                    path: p.to_string(),
                    bytes: 1,
                    sha256: String::new(),
                    plain: None,
                    origin: Default::default(),
                    replaces: None,
                    kept: false,
                    asked: None,
                    tree: None,
                })
                .collect(),
            failed: vec![],
            snapshot: None,
        }
    }

    fn kept(verdicts: &[Verdict]) -> Vec<&str> {
        verdicts.iter().filter(|v| v.keep()).map(|v| v.run_id.as_str()).collect()
    }

    #[test]
    fn last_daily_weekly_monthly() {
        // Two runs a day, 2026-10-01 .. 2026-11-26 (UTC), like the article's crontab.
        let mut runs = Vec::new();
        let start = chrono::NaiveDate::from_ymd_opt(2026, 10, 1).unwrap();
        for d in 0..57 {
            let day = start + chrono::Duration::days(d);
            for h in [3, 20] {
                let id = format!("{}T{h:02}", day.format("%Y%m%d"));
                runs.push(run(&id, &format!("{day}T{h:02}:34:00+00:00"), Status::Ok, &[&format!("{id}.sql.gz")]));
            }
        }
        let keep = Keep { last: 3, daily: 3, weekly: 2, monthly: 2 };
        let v = plan_in(&runs, &Runs::Named("s".into()), &keep, &chrono::Utc);
        assert_eq!(
            kept(&v),
            vec![
                "20261031T20", // monthly: newest of 2026-10
                "20261122T20", // weekly: newest of 2026-W47
                "20261124T20", // daily
                "20261125T20", // daily
                "20261126T03", // last 3
                "20261126T20", // newest, last 3, daily, weekly, monthly
            ]
        );
        let newest = v.last().unwrap();
        assert!(newest.kept_because.iter().any(|r| r.contains("newest good")), "{newest:?}");
        let gone = v.iter().find(|v| v.run_id == "20261001T03").unwrap();
        assert_eq!(gone.files, vec![(PathBuf::from("20261001T03.sql.gz"), 1)]);
    }

    #[test]
    fn the_newest_good_run_survives_any_number_of_failures() {
        let mut runs = vec![run("1", "2026-11-20T03:00:00+00:00", Status::Ok, &["a"])];
        for i in 2..8 {
            runs.push(run(&i.to_string(), &format!("2026-11-2{i}T03:00:00+00:00"), Status::Failed, &[]));
        }
        let keep = Keep { last: 1, ..Keep::default() };
        let v = plan_in(&runs, &Runs::Named("s".into()), &keep, &chrono::Utc);
        assert_eq!(kept(&v), vec!["1", "2", "3", "4", "5", "6", "7"], "failures are newer than every good run");
        // Even a rule that keeps nothing by count keeps the newest good run.
        let v = plan_in(&runs, &Runs::Named("s".into()), &Keep { daily: 0, ..Keep::default() }, &chrono::Utc);
        assert!(v[0].keep());
    }

    #[test]
    fn failed_runs_go_once_a_newer_good_run_exists_and_shared_files_stay() {
        let runs = vec![
            run("1", "2026-11-20T03:00:00+00:00", Status::Ok, &["latest.tgz", "one.tgz"]),
            run("2", "2026-11-21T03:00:00+00:00", Status::Incomplete, &["x.tgz"]),
            run("3", "2026-11-22T03:00:00+00:00", Status::Ok, &["latest.tgz"]),
        ];
        let v = plan_in(&runs, &Runs::Named("s".into()), &Keep { last: 1, ..Keep::default() }, &chrono::Utc);
        assert_eq!(kept(&v), vec!["3"]);
        assert_eq!(v[0].files, vec![(PathBuf::from("one.tgz"), 1)]);
        assert_eq!(v[0].shared, vec![PathBuf::from("latest.tgz")]);
        assert_eq!(v[1].files, vec![(PathBuf::from(".offsite/runs/2/x.tgz"), 1)]);
        assert!(v[1].pruned_because.as_deref().unwrap().contains("superseded by good run 3"));
    }

    #[test]
    fn the_newest_copy_of_each_output_survives_partial_runs() {
        // Both servers, then server2 fails for a week while server1 works,
        // then server1 fails once while server2 is back.
        let mut runs =
            vec![run("1", "2026-11-20T03:00:00+00:00", Status::Ok, &["s1/db-20261120.sql", "s2/db-20261120.sql"])];
        for i in 2..9 {
            let mut m = run(
                &i.to_string(),
                &format!("2026-11-2{i}T03:00:00+00:00"),
                Status::Partial,
                &[&format!("s1/db-2026112{i}.sql")],
            );
            m.failed.push(crate::store::manifest::FailedOutput {
                path: format!("s2/db-2026112{i}.sql"),
                call: "ssh.exec-to-file".into(),
                host: Some("s2".into()),
                error: "connection refused".into(),
            });
            runs.push(m);
        }
        let keep = Keep { last: 2, ..Keep::default() };
        let v = plan_in(&runs, &Runs::Named("s".into()), &keep, &chrono::Utc);
        assert_eq!(kept(&v), vec!["1", "7", "8"], "the last good run holds s2's newest dump: {v:#?}");
        // A fully good run later: s2's week-old dump is back to the rules.
        runs.push(run("9", "2026-11-29T03:00:00+00:00", Status::Ok, &["s1/db-20261129.sql", "s2/db-20261129.sql"]));
        let v = plan_in(&runs, &Runs::Named("s".into()), &keep, &chrono::Utc);
        assert_eq!(kept(&v), vec!["8", "9"]);
        // Alternating failures: s2's newest copy is in a partial run, older
        // than what the rules keep.
        let mut alternating =
            vec![run("1", "2026-11-20T03:00:00+00:00", Status::Ok, &["s1/a-20261120", "s2/a-20261120"])];
        alternating.push(run("2", "2026-11-21T03:00:00+00:00", Status::Partial, &["s2/a-20261121"]));
        for i in 3..6 {
            alternating.push(run(
                &i.to_string(),
                &format!("2026-11-2{i}T03:00:00+00:00"),
                Status::Partial,
                &[&format!("s1/a-2026112{i}")],
            ));
        }
        let v = plan_in(&alternating, &Runs::Named("s".into()), &Keep { last: 1, ..Keep::default() }, &chrono::Utc);
        assert_eq!(kept(&v), vec!["1", "2", "5"]);
        let second = &v[1];
        assert_eq!(second.kept_because, vec!["the newest good copy of s2/a-#".to_string()]);
    }

    #[test]
    fn other_sites_in_the_same_store_are_untouched() {
        let mut other = run("0", "2026-11-19T03:00:00+00:00", Status::Ok, &["a"]);
        other.run.site = "t".into();
        let runs = vec![other, run("1", "2026-11-20T03:00:00+00:00", Status::Ok, &["a"])];
        let v = plan_in(&runs, &Runs::Named("s".into()), &Keep { last: 1, ..Keep::default() }, &chrono::Utc);
        assert_eq!(v.len(), 1);
        assert!(v[0].keep());
    }

    #[test]
    fn a_dedicated_store_counts_runs_made_under_an_earlier_name() {
        let mut old = run("0", "2026-11-19T03:00:00+00:00", Status::Ok, &["a"]);
        old.run.site = "before-rename".into();
        let runs = vec![
            old,
            run("1", "2026-11-20T03:00:00+00:00", Status::Ok, &["b"]),
            run("2", "2026-11-21T03:00:00+00:00", Status::Ok, &["c"]),
        ];
        let v = plan_in(&runs, &Runs::All, &Keep { last: 2, ..Keep::default() }, &chrono::Utc);
        assert_eq!(v.len(), 3, "the old name's run is this site's too");
        assert_eq!(kept(&v), vec!["1", "2"]);
    }
}
