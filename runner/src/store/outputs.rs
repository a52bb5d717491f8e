//! Outputs, tracked across runs: for each output name (see
//! [`output_name`](super::manifest::output_name)) a site's current runs
//! make, its last good copy and whether its newest attempt failed. A server
//! down for a week shows as such in `status` and the textfile while the
//! other server's dumps keep coming.

use std::collections::BTreeSet;

use super::manifest::Manifest;

/// At most this many outputs are reported per site (status, textfile).
pub const MAX_REPORTED: usize = 256;

/// One output of a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputState {
    pub name: String,
    /// The newest run that published a copy: run id, start, end.
    pub last_good: Option<Copy>,
    /// The newest run whose call for it failed, when that is newer than
    /// its last good copy: run id, start, and the error.
    pub failing: Option<Failure>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub run_id: String,
    pub started: String,
    pub ended: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub run_id: String,
    pub started: String,
    pub error: String,
}

/// The outputs of a site's `runs` (oldest first) that its newest good
/// run, or any run since, made or failed to make; sorted by name. (An
/// output only older runs made is no longer the script's.)
pub fn states(runs: &[&Manifest]) -> Vec<OutputState> {
    let from = runs.iter().rposition(|m| m.status.is_good()).unwrap_or(0);
    let mut current: BTreeSet<String> = BTreeSet::new();
    for m in runs.get(from..).unwrap_or_default() {
        current.extend(m.files.iter().map(|f| f.output()));
        current.extend(m.failed.iter().map(|f| f.output()));
    }
    // One pass, newest run first, until every output has its good copy.
    let mut found: std::collections::BTreeMap<String, OutputState> =
        current.into_iter().map(|name| (name.clone(), OutputState { name, last_good: None, failing: None })).collect();
    let mut open = found.len();
    for m in runs.iter().rev() {
        if open == 0 {
            break;
        }
        for f in m.published() {
            if let Some(state) = found.get_mut(&f.output())
                && state.last_good.is_none()
            {
                state.last_good = Some(Copy {
                    run_id: m.run.run_id.clone(),
                    started: m.run.started.clone(),
                    ended: m.ended.clone(),
                    path: f.path.clone(),
                });
                open -= 1;
            }
        }
        for f in &m.failed {
            if let Some(state) = found.get_mut(&f.output())
                && state.last_good.is_none()
                && state.failing.is_none()
            {
                state.failing = Some(Failure {
                    run_id: m.run.run_id.clone(),
                    started: m.run.started.clone(),
                    error: f.error.clone(),
                });
            }
        }
    }
    found.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredFile;
    use crate::store::manifest::{FORMAT, FailedOutput, RunHeader, Status};

    fn run(id: &str, status: Status, files: &[&str], failed: &[&str]) -> Manifest {
        Manifest {
            format: FORMAT,
            run: RunHeader {
                run_id: id.into(),
                site: "s".into(),
                hostname: "h".into(),
                pid: 1,
                script: Default::default(),
                grants_sha256: String::new(),
                started: format!("start-{id}"),
            },
            ended: format!("end-{id}"),
            status,
            error: None,
            warnings: vec![],
            kept_in: None,
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
            failed: failed
                .iter()
                .map(|p| FailedOutput {
                    path: p.to_string(),
                    call: "ssh.exec-to-file".into(),
                    host: None,
                    error: format!("{p} refused"),
                })
                .collect(),
            snapshot: None,
        }
    }

    #[test]
    fn a_failing_output_keeps_its_last_good_copy_and_its_error() {
        let runs = [
            run("1", Status::Ok, &["old/x-20261101.sql"], &[]),
            run("2", Status::Ok, &["s1/db-20261120.sql", "s2/db-20261120.sql"], &[]),
            run("3", Status::Partial, &["s1/db-20261121.sql"], &["s2/db-20261121.sql"]),
            run("4", Status::Partial, &["s1/db-20261122.sql"], &["s2/db-20261122.sql"]),
        ];
        let refs: Vec<&Manifest> = runs.iter().collect();
        let states = states(&refs);
        assert_eq!(states.len(), 2, "an output of older runs only is not current: {states:?}");
        assert_eq!(states[0].name, "s1/db-#.sql");
        assert_eq!(states[0].last_good.as_ref().unwrap().run_id, "4");
        assert!(states[0].failing.is_none());
        assert_eq!(states[1].name, "s2/db-#.sql");
        assert_eq!(states[1].last_good.as_ref().unwrap().run_id, "2");
        let failing = states[1].failing.as_ref().unwrap();
        assert_eq!((failing.run_id.as_str(), failing.error.as_str()), ("4", "s2/db-20261122.sql refused"));
    }
}
