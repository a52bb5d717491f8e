//! What would a new version of a script do on this site? Both versions are
//! described (name, version, parameters, capabilities, imported
//! interfaces) and run dry against the site with every server left alone
//! (`run --dry-run --probe --audit`): the calls each makes are compared,
//! and the new calls the site's grants would deny are named in words,
//! before the new version ever runs for real.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::resolve::Fetched;
use crate::bindings::meta::ScriptInfo;

/// Why moving from `old` to `new` takes a site back or to another script:
/// another name, or a lower version (semantic versions compared as such,
/// others only for equality). `None` when it moves forward or stays.
///
/// A signature says who built a component, not that it is the newest: a
/// registry writer can point a tag at any older build the same key signed.
pub fn step_back(old: &ScriptInfo, new: &ScriptInfo) -> Option<String> {
    let shown = |s: &str| crate::text::escape(s).into_owned();
    if old.name != new.name {
        return Some(format!("the tag now holds script {} where {} was recorded", shown(&new.name), shown(&old.name)));
    }
    match (semver::Version::parse(&old.version), semver::Version::parse(&new.version)) {
        (Ok(o), Ok(n)) if n < o => Some(format!(
            "{} {} is older than the recorded {}",
            shown(&new.name),
            shown(&new.version),
            shown(&old.version)
        )),
        _ => None,
    }
}

/// One side of a diff: a script as fetched, and what it declares.
pub struct Side {
    pub fetched: Fetched,
    pub info: ScriptInfo,
    pub imports: Vec<String>,
}

/// The calls a version made in a dry run of the site.
#[derive(Debug, Default)]
pub struct Probe {
    /// Each call in words, and the site's answer (`None`: allowed).
    pub calls: BTreeMap<String, Option<String>>,
    /// Why the dry run ended badly, if it did (a missing parameter, an
    /// error the script returned after a denial, ...).
    pub failed: Option<String>,
    /// It was stopped at its time limit (see [`PROBE_TIMEOUT`]).
    pub timed_out: bool,
}

/// The most one dry run of a version may take, unless
/// `$OFFSITE_PROBE_TIMEOUT` (e.g. `2m`) says otherwise.
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn probe_timeout() -> std::time::Duration {
    std::env::var("OFFSITE_PROBE_TIMEOUT")
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
        .unwrap_or(PROBE_TIMEOUT)
}

/// The report of a diff, and what it found.
pub struct Diff {
    pub text: String,
    /// New calls the site would deny, in words.
    pub denied: Vec<String>,
    /// The new version could not even start on this site.
    pub unusable: Option<String>,
}

/// Loads a side: compiles and describes it.
pub fn side(fetched: Fetched) -> Result<Side, crate::exit::Failure> {
    use crate::exit::{Exit, ExitContext};
    let runtime = crate::exit::runtime()?;
    let script = runtime.load_bytes(&fetched.path, &fetched.bytes).exit(Exit::Usage)?;
    let info = crate::run::describe(&runtime, &script)?;
    let imports = script.component.component_type().imports(runtime.engine()).map(|(n, _)| n.to_string()).collect();
    Ok(Side { fetched, info, imports })
}

/// Runs `side` dry against `site_file` with one pinned clock, and collects
/// the calls from the audit log.
pub fn probe(site_file: &Path, side: &Side, now: &str) -> Result<Probe> {
    let dir = tempfile::tempdir().context("cannot make a scratch directory for the dry run")?;
    let script = dir.path().join("script.wasm");
    std::fs::write(&script, &side.fetched.bytes)?;
    let audit = dir.path().join("audit.jsonl");
    let exe = std::env::current_exe().context("cannot find the offsite binary for the dry run")?;
    let stderr = dir.path().join("stderr");
    let mut child = std::process::Command::new(exe)
        .arg("run")
        .arg(&script)
        .arg("--site")
        .arg(site_file)
        .args(["--dry-run", "--probe", "--now", now, "--audit"])
        .arg(&audit)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).context("cannot make the dry run's log")?)
        .spawn()
        .context("cannot start the dry run")?;
    // A version under review may be hostile: its dry run gets a bound of
    // its own, far below a site's deadline, or `update` (and a watcher
    // looking at a followed tag) would wait on it for hours.
    let limit = probe_timeout();
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the dry run")? {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut probe = Probe::default();
    match status {
        None => {
            probe.timed_out = true;
            probe.failed = Some(format!("its dry run did not finish within {}", humantime::format_duration(limit)));
        }
        Some(s) if !s.success() => {
            let log = std::fs::read(&stderr).unwrap_or_default();
            let log = String::from_utf8_lossy(&log);
            let last = log.lines().rev().find(|l| l.contains("error:")).unwrap_or("it failed").to_string();
            probe.failed = Some(last.split("error: ").nth(1).unwrap_or(&last).to_string());
        }
        Some(_) => {}
    }
    let text = std::fs::read_to_string(&audit).unwrap_or_default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(words) = call_in_words(&v["interface"], &v["call"]) else { continue };
        let reason = (v["decision"] == "deny").then(|| v["reason"].as_str().unwrap_or("denied").to_string());
        // A call made both allowed and denied keeps the denial.
        let slot = probe.calls.entry(words).or_insert(None);
        if reason.is_some() {
            *slot = reason;
        }
    }
    Ok(probe)
}

/// A call from the audit log in words; `None` for reads of parameters,
/// the clock and the log (they grant nothing).
fn call_in_words(interface: &serde_json::Value, call: &serde_json::Value) -> Option<String> {
    let s = |k: &str| crate::text::escape(call[k].as_str().unwrap_or_default()).into_owned();
    Some(match (interface.as_str()?, call["fn"].as_str()?) {
        ("ssh", "exec") => {
            let argv: Vec<String> =
                call["argv"].as_array()?.iter().map(|a| a.as_str().unwrap_or_default().to_string()).collect();
            format!("runs `{}` on {}", crate::text::escape(&shell_words(&argv)), s("host"))
        }
        ("scp", "fetch") => format!("fetches {} from {}", s("path"), s("host")),
        ("archive", "tar-gz") => format!("reads {} for an archive", s("read")),
        ("archive", "write") => format!("writes {} into the store", s("dest")),
        ("secrets", "open") => format!("opens the secret {}", s("name")),
        ("secrets", "send") => format!("sends the secret {} to {}", s("name"), s("program")),
        _ => return None,
    })
}

/// Compares `old` (if any) with `new` on the site in `site_file`.
pub fn diff(site_file: &Path, old: Option<&Side>, new: &Side) -> Result<Diff> {
    let now = chrono::Local::now().format("%Y-%m-%dT%H:%M:%S").to_string();
    let mut text = String::new();
    let label = |s: &Side| {
        format!(
            "{} {} (component sha256:{}, {})",
            s.info.name,
            s.info.version,
            hex_of(&s.fetched.bytes),
            s.fetched.source
        )
    };
    if let Some(o) = old {
        let _ = writeln!(text, "old: {}", crate::text::escape(&label(o)));
    } else {
        let _ = writeln!(text, "old: none recorded for this site");
    }
    let _ = writeln!(text, "new: {}", crate::text::escape(&label(new)));

    // What each declares.
    let none = Side {
        fetched: new.fetched.clone(),
        info: ScriptInfo {
            name: String::new(),
            version: String::new(),
            description: String::new(),
            params: Vec::new(),
            capabilities: Vec::new(),
        },
        imports: Vec::new(),
    };
    let o = old.unwrap_or(&none);
    let params = |s: &Side| s.info.params.iter().map(|p| (p.name.clone(), p.required)).collect::<BTreeMap<_, _>>();
    let (op, np) = (params(o), params(new));
    let mut declared = Vec::new();
    for (name, required) in &np {
        match op.get(name) {
            None => declared.push(format!("+ parameter {name}{}", if *required { " (required)" } else { "" })),
            Some(false) if *required => declared.push(format!("! parameter {name} is now required")),
            _ => {}
        }
    }
    for name in op.keys().filter(|n| !np.contains_key(*n)) {
        declared.push(format!("- parameter {name}"));
    }
    let set = |v: &[String]| v.iter().cloned().collect::<BTreeSet<_>>();
    for (what, a, b) in [
        ("capability", set(&o.info.capabilities), set(&new.info.capabilities)),
        ("imports", set(&o.imports), set(&new.imports)),
    ] {
        for x in b.difference(&a) {
            declared.push(format!("+ {what} {x}"));
        }
        for x in a.difference(&b) {
            declared.push(format!("- {what} {x}"));
        }
    }
    let _ = writeln!(text, "declared:");
    if declared.is_empty() {
        let _ = writeln!(text, "  no change");
    }
    for d in &declared {
        let _ = writeln!(text, "  {}", crate::text::escape(d));
    }

    // What each does here.
    let old_probe = old.map(|o| probe(site_file, o, &now)).transpose()?;
    let new_probe = probe(site_file, new, &now)?;
    let _ = writeln!(text, "calls on this site (dry run, no server contacted):");
    let empty = Probe::default();
    let before = old_probe.as_ref().unwrap_or(&empty);
    let mut denied = Vec::new();
    let mut lines = 0;
    for (call, answer) in &new_probe.calls {
        let new_call = !before.calls.contains_key(call);
        let mark = if new_call { "+" } else { " " };
        match answer {
            Some(why) => {
                let _ = writeln!(text, "  {mark} {call}: not granted ({})", crate::text::escape(why));
                denied.push(call.clone());
            }
            None if new_call => {
                let _ = writeln!(text, "  {mark} {call}");
            }
            None => {}
        }
        lines += 1;
    }
    for call in before.calls.keys().filter(|c| !new_probe.calls.contains_key(*c)) {
        let _ = writeln!(text, "  - {call}");
        lines += 1;
    }
    if lines == 0 {
        let _ = writeln!(text, "  none");
    } else if denied.is_empty() {
        let same = new_probe.calls.keys().filter(|c| before.calls.contains_key(*c)).count();
        if same > 0 {
            let _ = writeln!(text, "  ({same} call(s) the same as before)");
        }
    }
    if let Some(why) = &new_probe.failed {
        let _ = writeln!(text, "  the new version's dry run failed: {}", crate::text::escape(why));
    }
    // A version whose dry run did not end is refused whatever it did first.
    let unusable =
        new_probe.failed.clone().filter(|_| new_probe.timed_out || (new_probe.calls.is_empty() && denied.is_empty()));
    Ok(Diff { text, denied, unusable })
}

/// `argv` as a reader would type it: plain words bare, others in single quotes.
fn shell_words(argv: &[String]) -> String {
    let plain = |a: &str| !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(&b));
    argv.iter()
        .map(|a| if plain(a) { a.clone() } else { format!("'{}'", a.replace('\'', "'\\''")) })
        .collect::<Vec<_>>()
        .join(" ")
}

fn hex_of(bytes: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))[..12].to_string()
}
