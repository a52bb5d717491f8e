//! Hot reload for `offsite watch`: a site file and its script, kept as the
//! last version that passed validation.
//!
//! A new version replaces the old one only when the pair is valid: the site
//! file parses, the script compiles as a component of our world, its
//! `describe` runs, and `offsite check` finds no problem with the script
//! against the site's grants and parameters. Otherwise the old version
//! stays and the reason is returned (and logged by the caller). A file
//! caught half-written (an editor truncating then writing) simply fails
//! validation; the event that follows its last write loads it whole.
//!
//! Versions are handed out as `Arc`s: a run holds the version it started
//! with however many reloads happen meanwhile.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use sha2::{Digest, Sha256};

use crate::bindings::meta::ScriptInfo;
use crate::caps::{Caps, Clock};
use crate::engine::{Runtime, Script, ScriptFailure};
use crate::policy::Policy;
use crate::share::reference::ScriptSource;
use crate::share::resolve::Fetched;
use crate::site::Site;

/// One validated pair.
pub struct Version {
    pub site: Site,
    /// The site file's text as validated, and its SHA-256.
    pub site_text: String,
    pub site_sha256: String,
    pub script: Script,
    /// The script file's bytes as validated (what a run must execute,
    /// whatever the file holds by then).
    pub script_bytes: Vec<u8>,
    /// Where they came from (a file, or `oci://...@sha256:...`).
    pub script_source: String,
    /// The signature that passed the site's `script_signers`, if it checks.
    pub signature: Option<Vec<u8>>,
    pub info: ScriptInfo,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// Neither file changed.
    Unchanged,
    /// The new pair replaced the old one (SHA-256s: script, then site).
    /// `script_kept` says why the script on disk was not taken when only
    /// the site was (its new text is good with the script already held).
    Replaced { old: (String, String), new: (String, String), script_kept: Option<String> },
    /// The new pair is not valid; the old one stays.
    Rejected { reason: String },
}

/// A site and its script as `watch` keeps them.
pub struct Slot {
    pub site_file: PathBuf,
    /// The script, when given apart from the site file; otherwise the
    /// site's `script` key names it (and may change with the site).
    script_file: Option<PathBuf>,
    current: Arc<Version>,
}

impl Slot {
    /// Loads and validates the pair; at start-up a bad pair is an error.
    /// Relative paths are made absolute against the current directory.
    pub fn load(runtime: &Runtime, site_file: &Path, script_file: &Path) -> Result<Slot> {
        let site_file = std::path::absolute(site_file)?;
        let script_file = Some(std::path::absolute(script_file)?);
        let current = validate(runtime, &site_file, script_file.as_deref())?;
        Ok(Slot { site_file, script_file, current: Arc::new(current) })
    }

    /// Like [`Slot::load`], for a site file that names its script.
    pub fn for_site(runtime: &Runtime, site_file: &Path) -> Result<Slot> {
        let site_file = std::path::absolute(site_file)?;
        let current = validate(runtime, &site_file, None)?;
        Ok(Slot { site_file, script_file: None, current: Arc::new(current) })
    }

    /// The script file the current version came from.
    pub fn script_file(&self) -> &Path {
        &self.current.script.path
    }

    /// The version a run should use (it keeps it until it ends).
    pub fn current(&self) -> Arc<Version> {
        Arc::clone(&self.current)
    }

    /// Re-reads both files; swaps in the new pair only if it is valid.
    pub fn reload(&mut self, runtime: &Runtime) -> Reload {
        let prepared = self.job().prepare(runtime);
        self.apply(prepared)
    }

    /// What a reload reads, apart from the slot: [`ReloadJob::prepare`]
    /// may run on another thread (registries and compiling take their
    /// time) while the slot keeps serving its current version.
    pub fn job(&self) -> ReloadJob {
        ReloadJob {
            site_file: self.site_file.clone(),
            script_file: self.script_file.clone(),
            current: Arc::clone(&self.current),
        }
    }

    /// Takes a prepared reload. One prepared from a version that is no
    /// longer current changes nothing.
    pub fn apply(&mut self, prepared: Prepared) -> Reload {
        let old = (self.current.script.sha256.clone(), self.current.site_sha256.clone());
        if prepared.based_on != old {
            return Reload::Unchanged;
        }
        match prepared.outcome {
            Outcome::Unchanged => Reload::Unchanged,
            Outcome::Rejected(reason) => Reload::Rejected { reason },
            Outcome::Replace { version, script_kept } => {
                let new = (version.script.sha256.clone(), version.site_sha256.clone());
                self.current = Arc::new(*version);
                Reload::Replaced { old, new, script_kept }
            }
        }
    }
}

/// The inputs of one reload, taken from a [`Slot`].
pub struct ReloadJob {
    site_file: PathBuf,
    script_file: Option<PathBuf>,
    current: Arc<Version>,
}

/// A reload worked out, for [`Slot::apply`].
pub struct Prepared {
    /// The (script, site) SHA-256s of the version it was worked out from.
    based_on: (String, String),
    outcome: Outcome,
}

enum Outcome {
    Unchanged,
    Replace { version: Box<Version>, script_kept: Option<String> },
    Rejected(String),
}

impl ReloadJob {
    /// Validates the files on disk (fetching a registry script, compiling,
    /// checking) against the version the job was taken from.
    pub fn prepare(&self, runtime: &Runtime) -> Prepared {
        let current = &self.current;
        let based_on = (current.script.sha256.clone(), current.site_sha256.clone());
        let outcome = match validate(runtime, &self.site_file, self.script_file.as_deref()) {
            Ok(v)
                if (v.script.sha256.as_str(), v.site_sha256.as_str()) == (based_on.0.as_str(), based_on.1.as_str()) =>
            {
                Outcome::Unchanged
            }
            Ok(v) => {
                // A new version from a followed tag has not been reviewed:
                // it must not take the site back, nor ask for calls the
                // site does not grant.
                if v.script.sha256 != based_on.0 && v.site.script_follow {
                    if let Some(why) = crate::share::diff::step_back(&current.info, &v.info) {
                        return Prepared {
                            based_on,
                            outcome: Outcome::Rejected(format!(
                                "{why}: a followed tag never takes a site back (`offsite script update \
                                 --allow-downgrade` pins such a version)"
                            )),
                        };
                    }
                    if let Err(reason) = grants_hold(runtime, &self.site_file, current, &v) {
                        return Prepared { based_on, outcome: Outcome::Rejected(reason) };
                    }
                }
                Outcome::Replace { version: Box::new(v), script_kept: None }
            }
            Err(e) => {
                let reason = one_line(&format!("{e:#}"));
                // An edited site is not held back by a script whose rebuild
                // is broken: it may be good with the script already held.
                match validate_with(runtime, &self.site_file, self.script_file.as_deref(), Some(current)) {
                    Ok(v) => Outcome::Replace { version: Box::new(v), script_kept: Some(reason) },
                    _ => Outcome::Rejected(reason),
                }
            }
        };
        Prepared { based_on, outcome }
    }
}

/// The grant diff of a followed tag's new version against the running
/// one: `Err` names the calls the site would deny.
fn grants_hold(runtime: &Runtime, site_file: &Path, old: &Version, new: &Version) -> Result<(), String> {
    let side = |v: &Version| crate::share::diff::Side {
        fetched: Fetched {
            bytes: v.script_bytes.clone(),
            path: v.script.path.clone(),
            source: v.script_source.clone(),
            signatures: v.signature.iter().cloned().collect(),
        },
        info: v.info.clone(),
        imports: v.script.component.component_type().imports(runtime.engine()).map(|(n, _)| n.to_string()).collect(),
    };
    let report = crate::share::diff::diff(site_file, Some(&side(old)), &side(new)).map_err(|e| format!("{e:#}"))?;
    log::info!(target: "offsite::watch", "new version of {}:\n{}", new.script_source, report.text.trim_end());
    if let Some(why) = &report.unusable {
        return Err(format!("{} {} cannot run on this site: {why}", new.info.name, new.info.version));
    }
    if report.denied.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} {} asks for {} call(s) this site does not grant: {}",
            new.info.name,
            new.info.version,
            report.denied.len(),
            report.denied.join("; ")
        ))
    }
}

/// Whether `source` is where `kept`'s script came from.
fn source_matches(source: &ScriptSource, kept: &Version) -> bool {
    match source {
        ScriptSource::Path(p) => *p == kept.script.path,
        ScriptSource::Oci(r) => {
            kept.script_source == r.to_string() || kept.script_source.starts_with(&format!("{}@", r.without_digest()))
        }
    }
}

/// An error message on one line (wasmtime's can span several).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn validate(runtime: &Runtime, site_file: &Path, script_file: Option<&Path>) -> Result<Version> {
    validate_with(runtime, site_file, script_file, None)
}

/// Validates the site file on disk with the script on disk, or, for a
/// changed site that still names the same file, with the script of `kept`.
fn validate_with(
    runtime: &Runtime,
    site_file: &Path,
    script_file: Option<&Path>,
    kept: Option<&Version>,
) -> Result<Version> {
    let text =
        std::fs::read_to_string(site_file).with_context(|| format!("cannot read site file {}", site_file.display()))?;
    // `site_file` is absolute: relative paths in the site (and archive
    // sources) resolve against its directory.
    let cwd = crate::site::dir_of(site_file);
    let site = Site::parse(&text, site_file, cwd)?;
    let site_sha256 = hex::encode(Sha256::digest(text.as_bytes()));
    if kept.is_some_and(|v| v.site_sha256 == site_sha256) {
        return Err(anyhow!("the site file did not change"));
    }
    let source = match script_file {
        Some(p) => ScriptSource::Path(p.to_path_buf()),
        None => site
            .script
            .clone()
            .ok_or_else(|| anyhow!("{}: no `script` key: name the script this site runs", site_file.display()))?,
    };
    let fetched = match kept {
        Some(v) if source_matches(&source, v) => Fetched {
            bytes: v.script_bytes.clone(),
            path: v.script.path.clone(),
            source: v.script_source.clone(),
            signatures: v.signature.iter().cloned().collect(),
        },
        Some(_) => return Err(anyhow!("the site names another script")),
        None => crate::share::resolve::fetch(&source, &site)?,
    };
    // The signature that passed travels with the version (a run checks
    // it again on the snapshot).
    let signature = crate::share::resolve::check_signer(&fetched, site.script_signers.as_deref())?.map(|v| v.signature);
    let script_file = fetched.path.as_path();
    let script = runtime.load_bytes(script_file, &fetched.bytes)?;
    if let Some(pin) = &site.script_sha256
        && *pin != script.sha256
    {
        return Err(anyhow!("{} has sha256 {}, but the site pins {pin}", fetched.source, script.sha256));
    }
    let caps = Caps::new("describe", "-", Policy::deny_all(), Clock::System);
    let info = runtime.describe(&script, caps).map_err(|f| match f {
        ScriptFailure::Limit(m) | ScriptFailure::Trap(m) | ScriptFailure::Aborted(m) => {
            anyhow!("{}: describe() failed: {m}", script_file.display())
        }
    })?;
    let report = crate::check::check(&site, site_file, &text, Some((runtime, &script, &info)), Some(&fetched), false);
    if let Some(first) = report.problems.first() {
        return Err(anyhow!("{} problem(s); the first: {first}", report.problems.len()));
    }
    Ok(Version {
        site,
        site_text: text,
        site_sha256,
        script,
        script_bytes: fetched.bytes,
        script_source: fetched.source,
        signature,
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use offsite_testkit::rebuilt;

    struct Dir {
        _tmp: tempfile::TempDir,
        site: PathBuf,
        script: PathBuf,
        good: Vec<u8>,
    }

    fn setup() -> Dir {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("src")).unwrap();
        let site = tmp.path().join("site.toml");
        std::fs::write(&site, "store = \"store\"\n[read]\nroots = [\"src\"]\n[params]\ncase = \"ok\"\n").unwrap();
        let script = tmp.path().join("fixture.wasm");
        let good = std::fs::read(offsite_testkit::script("fixture")).unwrap();
        std::fs::write(&script, &good).unwrap();
        Dir { _tmp: tmp, site, script, good }
    }

    fn runtime() -> Runtime {
        Runtime::new(Some(offsite_testkit::shared_cache_dir())).unwrap()
    }

    /// Replaces `path` the way cargo and most editors do: write aside, rename.
    fn replace(path: &Path, bytes: &[u8]) {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn a_rebuilt_script_replaces_the_old_and_a_running_version_is_kept() {
        let (d, rt) = (setup(), runtime());
        let mut slot = Slot::load(&rt, &d.site, &d.script).unwrap();
        let running = slot.current();
        assert_eq!(slot.reload(&rt), Reload::Unchanged);
        replace(&d.script, &rebuilt(&d.good, "v2"));
        let Reload::Replaced { old, new, script_kept: None } = slot.reload(&rt) else { panic!("not replaced") };
        assert_eq!(old.0, running.script.sha256);
        assert_ne!(new.0, old.0);
        assert_eq!(new.1, old.1, "the site did not change");
        assert_eq!(slot.current().script.sha256, new.0);
        assert_eq!(running.script.sha256, old.0, "a run keeps the version it started with");
    }

    #[test]
    fn a_bad_or_half_written_script_keeps_the_last_good_one() {
        let (d, rt) = (setup(), runtime());
        let mut slot = Slot::load(&rt, &d.site, &d.script).unwrap();
        let good_sha = slot.current().script.sha256.clone();
        for (what, bytes) in [
            ("garbage", b"not wasm at all".to_vec()),
            ("half written", d.good[..d.good.len() / 2].to_vec()),
            ("a core module", offsite_testkit::wat("(module)")),
            ("empty", Vec::new()),
        ] {
            std::fs::write(&d.script, &bytes).unwrap(); // truncate, then write
            match slot.reload(&rt) {
                Reload::Rejected { reason } => assert!(reason.contains("fixture.wasm"), "{what}: {reason}"),
                other => panic!("{what}: {other:?}"),
            }
            assert_eq!(slot.current().script.sha256, good_sha, "{what}");
        }
        std::fs::write(&d.script, rebuilt(&d.good, "v3")).unwrap();
        assert!(matches!(slot.reload(&rt), Reload::Replaced { .. }));
    }

    #[test]
    fn a_site_edit_is_validated_against_the_script() {
        let (d, rt) = (setup(), runtime());
        let mut slot = Slot::load(&rt, &d.site, &d.script).unwrap();
        // New grants: another read root. Valid, so it replaces the site.
        std::fs::create_dir(d.site.parent().unwrap().join("www")).unwrap();
        replace(&d.site, b"store = \"store\"\n[read]\nroots = [\"src\", \"www\"]\n[params]\ncase = \"ok\"\n");
        assert!(matches!(slot.reload(&rt), Reload::Replaced { .. }));
        assert_eq!(slot.current().site.read_roots.len(), 2);
        // The script's required parameter is gone: rejected, the old site stays.
        replace(&d.site, b"store = \"store\"\n[read]\nroots = [\"src\"]\n");
        let Reload::Rejected { reason } = slot.reload(&rt) else {
            panic!("accepted a site the script cannot run with")
        };
        assert!(reason.contains("case"), "{reason}");
        assert_eq!(slot.current().site.read_roots.len(), 2);
        // A syntax error, likewise.
        std::fs::write(&d.site, "store = \n").unwrap();
        assert!(matches!(slot.reload(&rt), Reload::Rejected { .. }));
    }

    #[test]
    fn a_site_edit_goes_in_with_the_held_script_while_the_script_on_disk_is_broken() {
        let (d, rt) = (setup(), runtime());
        let mut slot = Slot::load(&rt, &d.site, &d.script).unwrap();
        let held = slot.current().script.sha256.clone();
        std::fs::write(&d.script, b"a broken build").unwrap();
        assert!(matches!(slot.reload(&rt), Reload::Rejected { .. }));
        replace(&d.site, b"store = \"store\"\n[read]\nroots = [\"src\"]\n[params]\ncase = \"warn\"\n");
        let Reload::Replaced { old, new, script_kept: Some(why) } = slot.reload(&rt) else {
            panic!("the site edit was not taken")
        };
        assert_eq!((old.0.as_str(), new.0.as_str()), (held.as_str(), held.as_str()));
        assert_ne!(old.1, new.1);
        assert!(why.contains("fixture.wasm") && !why.contains('\n'), "{why}");
        assert_eq!(slot.current().site.params["case"], "warn");
        // A site the held script cannot run with is still refused.
        replace(&d.site, b"store = \"store\"\n[read]\nroots = [\"src\"]\n");
        assert!(matches!(slot.reload(&rt), Reload::Rejected { .. }));
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn a_thousand_reloads_leak_neither_memory_nor_file_descriptors() {
        // Measured in a process of its own (this test again, alone): the
        // other tests of this one allocate what they like meanwhile, which
        // once looked like 200 MiB grown over the reloads.
        const NAME: &str = "reload::tests::a_thousand_reloads_leak_neither_memory_nor_file_descriptors";
        if std::env::var_os("OFFSITE_TEST_ALONE").is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--test-threads", "1"])
                .env("OFFSITE_TEST_ALONE", "1")
                .output()
                .unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success() && text.contains("1 passed"), "{text}");
            return;
        }
        let (d, rt) = (setup(), runtime());
        let mut slot = Slot::load(&rt, &d.site, &d.script).unwrap();
        let versions = [rebuilt(&d.good, "a"), rebuilt(&d.good, "b")];
        // Warm up: both versions compiled and cached, allocators settled.
        for v in versions.iter().cycle().take(20) {
            replace(&d.script, v);
            assert!(matches!(slot.reload(&rt), Reload::Replaced { .. }));
        }
        let (fds, rss) = (open_fds(), rss_kib());
        for v in versions.iter().cycle().take(1000) {
            replace(&d.script, v);
            assert!(matches!(slot.reload(&rt), Reload::Replaced { .. }));
        }
        // Allow a little noise (allocator caches): a leak per reload would
        // show as a thousand descriptors, or a thousand compiled scripts
        // (hundreds of MiB).
        let now = open_fds();
        assert!(now <= fds + 16, "file descriptors went from {fds} to {now} over 1000 reloads");
        let grown = rss_kib().saturating_sub(rss);
        assert!(grown < 64 << 10, "resident memory grew by {grown} KiB over 1000 reloads");
    }
}
