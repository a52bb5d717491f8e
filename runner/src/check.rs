//! `offsite check SITE.toml [SCRIPT.wasm] [--connect]`: what a site allows,
//! in plain words, and every problem found before a run would hit it.
//!
//! Without a script it checks the site file alone; with one it also checks
//! the script's parameters and the interfaces it imports against the
//! site's grants; with `--connect` it logs into each host (host key,
//! authentication) and looks up each granted program there. Each problem
//! names the file, the line when there is one, and the fix.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::bindings::meta::ScriptInfo;
use crate::caps::remote::{Remote, Slots};
use crate::engine::{Runtime, Script};
use crate::site::{HostConfig, SecretSource, Site};
use crate::transport::openssh::OpenSsh;
use crate::transport::{Transport, check_key_file};

/// One thing wrong, with where and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// `FILE` or `FILE:LINE`.
    pub at: String,
    pub what: String,
    pub fix: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}\n    fix: {}", self.at, self.what, self.fix)
    }
}

/// The result of a check: a report to print and the problems in it.
pub struct Report {
    pub text: String,
    pub problems: Vec<Problem>,
}

/// Checks `site` (read from `site_file`, whose text is `text`), and, when
/// given, `script` as loaded by `runtime` with `info` from its `describe`.
pub fn check(
    site: &Site,
    site_file: &Path,
    text: &str,
    script: Option<(&Runtime, &Script, &ScriptInfo)>,
    fetched: Option<&crate::share::resolve::Fetched>,
    connect: bool,
) -> Report {
    let file = site_file.display().to_string();
    let at_key = |section: &str, key: &str| match key_line(text, section, key) {
        Some(line) => format!("{file}:{line}"),
        None => file.clone(),
    };
    let mut problems = Vec::new();
    let mut out = String::new();
    let _ = writeln!(out, "site {} ({file})", site.name);

    // What the site allows, in plain words.
    match &site.store {
        crate::site::StoreAt::Dir(dir) => {
            let _ = writeln!(out, "  writes files only beneath {}", dir.display());
            if dir.exists() {
                if let Err(e) = probe_writable(dir) {
                    problems.push(Problem {
                        at: at_key("", "store"),
                        what: format!("the store {} is not writable: {e}", dir.display()),
                        fix: "fix its ownership or mode, or point `store` elsewhere".into(),
                    });
                }
            } else {
                let _ = writeln!(out, "    (it does not exist yet; the first run creates it, mode 0700)");
            }
            if site.file.as_deref().is_some_and(crate::systemd::serves) && crate::systemd::watch_needs_reload(dir) {
                let _ = writeln!(
                    out,
                    "    (under offsite-watch.service it is writable only after `systemctl daemon-reload && \
                     systemctl restart offsite-watch`, which opens the stores of the site files present then)"
                );
            }
        }
        crate::site::StoreAt::S3(spec) => {
            let _ = writeln!(out, "  writes objects only beneath {}", spec.location);
            s3_report(&mut out, &mut problems, spec, site.limits.call_timeout, &at_key, connect);
        }
        crate::site::StoreAt::Repo(spec) => {
            let _ = writeln!(out, "  writes snapshots only into the restic repository {}", spec.display());
            repo_report(&mut out, &mut problems, site, spec, &at_key("", "store"), connect);
        }
    }
    for (i, copy) in site.copies.iter().enumerate() {
        let n = i + 1;
        match &copy.store {
            crate::site::StoreAt::Dir(dir) => {
                let _ = writeln!(out, "  copies each run's files to {} (copy {n})", dir.display());
                if !dir.is_dir() {
                    let _ = writeln!(
                        out,
                        "    warning: it does not exist (a disk not mounted?); runs never create a copy's \
                         directory, so copy {n} fails with a warning until it is there (mkdir -m 700 {})",
                        dir.display()
                    );
                } else if let Err(e) = probe_writable(dir) {
                    let _ = writeln!(out, "    warning: it is not writable ({e}); copy {n} fails with a warning");
                }
            }
            crate::site::StoreAt::S3(spec) => {
                let _ = writeln!(out, "  copies each run's objects to {} (copy {n})", spec.location);
                let at_copy = |_: &str, _: &str| format!("{file}: [[copy]] {n}");
                s3_report(&mut out, &mut problems, spec, site.limits.call_timeout, &at_copy, connect);
            }
            crate::site::StoreAt::Repo(spec) => {
                let _ =
                    writeln!(out, "  copies each good run into the restic repository {} (copy {n})", spec.display());
                repo_report(&mut out, &mut problems, site, spec, &format!("{file}: [[copy]] {n}"), connect);
            }
        }
    }
    if site.read_roots.is_empty() {
        let _ = writeln!(out, "  reads no local files");
    }
    for root in &site.read_roots {
        let _ = writeln!(out, "  may archive anything beneath {}", root.display());
    }
    if site.hosts.is_empty() {
        let _ = writeln!(out, "  reaches no remote hosts");
    }
    for host in site.hosts.values() {
        describe_host(&mut out, host);
        host_problems(host, &file, text, &mut problems);
    }
    for (name, source) in &site.secrets {
        let at = at_key("secrets", name);
        match source {
            SecretSource::File(path) => {
                let _ =
                    writeln!(out, "  secret {name}: from {} (scripts get a handle, never the value)", path.display());
                if let Err(e) = check_key_file(name, path) {
                    problems.push(Problem {
                        at,
                        what: format!("secret {name}: {}", e.to_string().trim_start_matches(&format!("host {name}: "))),
                        fix: format!("create it readable by its owner only: chmod 600 {}", path.display()),
                    });
                }
            }
            SecretSource::Env(var) => {
                let _ = writeln!(out, "  secret {name}: from ${var} (scripts get a handle, never the value)");
                if std::env::var_os(var).is_none() {
                    problems.push(Problem {
                        at,
                        what: format!("secret {name}: the variable {var} is not set in this environment"),
                        fix: format!("export {var} where the runner starts"),
                    });
                }
            }
        }
    }
    for (name, delivery) in &site.deliveries {
        let shown = delivery.stdin.replace("{secret}", "<value>");
        let _ = writeln!(
            out,
            "  secret {name} is sent only as the stdin {:?}, and only to {} (on a host whose grants allow the command)",
            crate::text::escape(&shown),
            delivery.programs.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ")
        );
        for program in &delivery.programs {
            let granted: Vec<&str> = site
                .hosts
                .values()
                .filter(|h| h.commands.iter().any(|c| c.first() == Some(program)))
                .map(|h| h.name.as_str())
                .collect();
            if granted.is_empty() {
                problems.push(Problem {
                    at: at_key("secrets", name),
                    what: format!("secret {name} may be sent to {program:?}, but no host grants that program"),
                    fix: format!("grant a {program:?} command under [hosts.NAME], or correct `programs`"),
                });
            } else {
                let _ = writeln!(out, "    {program:?} is granted on {}", granted.join(", "));
            }
        }
    }
    for name in site.secrets.keys().filter(|n| !site.deliveries.contains_key(*n)) {
        let _ = writeln!(out, "  secret {name} is sent nowhere (no `stdin` and `programs`): a script can only open it");
    }
    let _ = writeln!(out, "  limits: {}", site.limits);
    source_report(&mut out, &mut problems, site, fetched, &at_key, connect);
    lifecycle_report(&mut out, &mut problems, site, &at_key);

    if let Some((runtime, script, info)) = script {
        script_report(&mut out, &mut problems, site, &file, text, runtime, script, info);
    }

    if connect && !site.hosts.is_empty() {
        connect_report(&mut out, &mut problems, site, &file, text);
    }
    Report { text: out, problems }
}

fn describe_host(out: &mut String, host: &HostConfig) {
    let mut how = host.address.clone();
    if let Some(user) = &host.user {
        how = format!("{user}@{how}");
    }
    if let Some(port) = host.port {
        how.push_str(&format!(":{port}"));
    }
    let _ = writeln!(out, "  host {} ({how}):", host.name);
    if host.commands.is_empty() {
        let _ = writeln!(out, "    may run no commands");
    }
    for pattern in &host.commands {
        let _ = writeln!(out, "    may run: {}", plain_pattern(pattern));
        // Validated when the site was parsed.
        if let Ok(compiled) = crate::policy::CommandPattern::new(pattern) {
            for line in compiled.describe() {
                let _ = writeln!(out, "      {line}");
            }
            for warning in compiled.warnings() {
                let _ = writeln!(out, "      warning: {warning}");
            }
        }
    }
    if host.fetch.is_empty() {
        let _ = writeln!(out, "    may copy no files");
    }
    for pattern in &host.fetch {
        let _ = writeln!(out, "    may copy files matching {pattern}");
    }
    if let Some(pin) = &host.host_key {
        let _ = writeln!(out, "    only if its host key is {pin}");
    }
}

/// What a script says about itself, safe to print: its author controls
/// every string in it, so control characters (a fake `sha256:` line drawn
/// over the real one, a hidden import list) are escaped.
pub fn shown_info(info: &ScriptInfo) -> ScriptInfo {
    let e = |s: &str| crate::text::escape(s).into_owned();
    ScriptInfo {
        name: e(&info.name),
        version: e(&info.version),
        description: e(&info.description),
        capabilities: info.capabilities.iter().map(|c| e(c)).collect(),
        params: info
            .params
            .iter()
            .map(|p| crate::bindings::meta::ParamSpec {
                name: e(&p.name),
                description: e(&p.description),
                required: p.required,
                default: p.default.as_deref().map(e),
                secret: p.secret,
            })
            .collect(),
    }
}

/// A command pattern in words: `mysqldump --single-transaction sitedb`
/// followed by what the globs and the repeat mean.
fn plain_pattern(pattern: &[String]) -> String {
    let mut parts = Vec::new();
    for (i, p) in pattern.iter().enumerate() {
        if i + 1 == pattern.len()
            && let Some(rest) = p.strip_suffix("...")
        {
            parts.push(format!("[any number of arguments matching {rest:?}]"));
        } else if i > 0 && p.contains(['*', '?', '[', '{']) {
            parts.push(format!("[one argument matching {p:?}]"));
        } else {
            parts.push(p.clone());
        }
    }
    parts.join(" ")
}

/// The site's script: where it comes from, which version is pinned,
/// whether it is stored here, who signed it, and with `--connect` whether
/// its registry answers and its tag still points at the pinned version.
fn source_report(
    out: &mut String,
    problems: &mut Vec<Problem>,
    site: &Site,
    fetched: Option<&crate::share::resolve::Fetched>,
    at_key: &dyn Fn(&str, &str) -> String,
    connect: bool,
) {
    use crate::share::reference::ScriptSource;
    let Some(source) = &site.script else { return };
    let _ = writeln!(out, "  runs {source} under offsite watch");
    let mut problem =
        |what: String, fix: &str| problems.push(Problem { at: at_key("", "script"), what, fix: fix.into() });
    if let ScriptSource::Path(p) = source
        && !p.is_file()
    {
        problem(
            format!("the script {} does not exist", p.display()),
            "build it, or fix the path (relative paths are relative to the site file)",
        );
        return;
    }
    if let ScriptSource::Oci(r) = source {
        // A lock that cannot be read stops every run: say so here too.
        let lock = match site.file.as_deref().map(crate::share::lockfile::read).transpose() {
            Ok(lock) => lock.flatten(),
            Err(e) => {
                problem(format!("{e:#}"), "fix it, or remove it and run `offsite script update SITE.toml`");
                None
            }
        };
        let pinned = match (&r.digest, &lock) {
            (Some(d), _) => {
                let _ = writeln!(out, "    pinned by its digest sha256:{d}");
                Some(d.clone())
            }
            (None, Some(l)) if l.reference == r.to_string() => {
                let _ = writeln!(
                    out,
                    "    pinned by {} to {} (component {}, signer {}, recorded {})",
                    crate::share::lockfile::path_for(site.file.as_deref().expect("a lock has a site file")).display(),
                    l.manifest,
                    l.component,
                    l.signer.as_deref().unwrap_or("not checked"),
                    l.updated
                );
                Some(l.manifest_hex().to_string())
            }
            (None, _) if site.script_follow => {
                let _ = writeln!(out, "    follows the tag {} (script_update = \"follow\")", r.tag_or_latest());
                None
            }
            (None, _) => {
                problem(
                    format!("{r} is a tag with no recorded digest: runs refuse it"),
                    "run `offsite script update SITE.toml` to review and pin it",
                );
                None
            }
        };
        if let Some(m) = &pinned {
            match crate::share::cache::ScriptCache::open_default().map(|c| (c.manifest(m), c)) {
                Ok((Some(rec), cache)) if cache.has(&rec.component) => {
                    let _ = writeln!(out, "    stored locally in {} (runs need no registry)", cache.root.display());
                }
                Ok((_, cache)) => {
                    let _ = writeln!(
                        out,
                        "    not stored locally ({}): the first run pulls it and needs the registry",
                        cache.root.display()
                    );
                }
                Err(e) => problem(format!("no script store: {e:#}"), "set OFFSITE_SCRIPTS_DIR or HOME"),
            }
        }
        if connect {
            match crate::share::registry::Registry::connect(&r.registry)
                .and_then(|reg| reg.resolve(&r.without_digest()))
            {
                Ok(now) if pinned.as_deref() == Some(now.as_str()) => {
                    let _ = writeln!(out, "    the registry answers; tag {} still points there", r.tag_or_latest());
                }
                Ok(now) if pinned.is_some() && r.digest.is_none() => {
                    let _ = writeln!(
                        out,
                        "    the registry answers; tag {} has moved to sha256:{now}: `offsite script update` shows \
                         what the new version would do",
                        r.tag_or_latest()
                    );
                }
                Ok(now) => {
                    let _ = writeln!(out, "    the registry answers; tag {} points to sha256:{now}", r.tag_or_latest());
                }
                Err(e) => problem(
                    format!("the registry of {r} cannot be reached: {}", crate::text::escape(&format!("{e:#}"))),
                    "check the address, `docker login`/`podman login`, and the CA in certs.d",
                ),
            }
        }
    }
    if let Some(signers) = &site.script_signers {
        // The bytes the caller already has; fetched again only to say why
        // they could not be had.
        let fetched = match fetched {
            Some(f) => Ok(std::borrow::Cow::Borrowed(f)),
            None => crate::share::resolve::fetch(source, site).map(std::borrow::Cow::Owned),
        };
        match fetched {
            Ok(f) => match crate::share::resolve::check_signer(&f, Some(signers)) {
                Ok(Some(v)) => {
                    let _ = writeln!(out, "    signed by {}, listed in {}", v.signer, signers.display());
                }
                Ok(None) => {}
                Err(e) => problem(format!("{e:#}"), "sign it (`offsite script sign`) with a key in the file"),
            },
            Err(e) => problem(format!("{e:#}"), "pull it first, or fix the reference"),
        }
    }
}

/// Retention, reports, notifications and at-rest protection: what they
/// will do, and whatever would make them fail at run time.
fn lifecycle_report(out: &mut String, problems: &mut Vec<Problem>, site: &Site, at_key: &dyn Fn(&str, &str) -> String) {
    if let Some(schedule) = &site.schedule {
        let next = schedule
            .next_after(chrono::Utc::now())
            .map_or("never".to_string(), |t| t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M %Z").to_string());
        let _ = writeln!(out, "  is due at \"{}\" ({}); next: {next}", schedule.expression, schedule.zone);
        // What offsite@SITE.timer will say (the generator writes it).
        match crate::systemd::on_calendar(schedule) {
            Ok(lines) => {
                let _ = writeln!(out, "  as a systemd timer: OnCalendar={}", lines.join(" and OnCalendar="));
            }
            Err(e) => {
                let _ = writeln!(out, "  as a systemd timer: none ({e:#}); offsite@SITE.timer would run daily");
            }
        }
    }
    if site.retention.is_empty() {
        let _ = writeln!(out, "  keeps every run (no [retention])");
    } else {
        let _ = writeln!(out, "  after each good run keeps: {} (and always the newest good run)", site.retention);
    }
    if let Some(path) = &site.prometheus {
        let _ = writeln!(out, "  writes its node_exporter textfile to {}", path.display());
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !dir.is_dir() {
            problems.push(Problem {
                at: at_key("report", "prometheus"),
                what: format!("the directory {} does not exist", dir.display()),
                fix: "point it at node_exporter's --collector.textfile.directory".into(),
            });
        }
    }
    if let Some(program) = site.notify.command.first() {
        let _ = writeln!(out, "  notifies by running {program} at start, success and failure");
        if !on_path(program) {
            problems.push(Problem {
                at: at_key("notify", "command"),
                what: format!("the notification program {program:?} is not found"),
                fix: "give its full path, or install it".into(),
            });
        }
    }
    if site.notify.url.is_some() {
        let _ = writeln!(out, "  pings its notification URL at start, success and failure (with curl)");
        if !on_path("curl") {
            problems.push(Problem {
                at: at_key("notify", "url"),
                what: "notification pings need curl, which is not installed".into(),
                fix: "apt-get install curl".into(),
            });
        }
    }
    let protect = &site.protect;
    if !protect.recipients.is_empty() {
        let _ = writeln!(out, "  encrypts every file it stores to {} age recipient(s)", protect.recipients.len());
    }
    if let Some(key) = &protect.signing_key {
        let _ = writeln!(out, "  signs every manifest with {}", key.display());
        if let Err(e) = crate::store::protect::signing_key(key) {
            problems.push(Problem {
                at: at_key("protect", "signing_key"),
                what: format!("{e:#}"),
                fix: format!("ssh-keygen -t ed25519 -N '' -f {0} && chmod 600 {0}", key.display()),
            });
        }
    }
}

/// Whether `program` names an executable, directly or on `$PATH`.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let runs = |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        return runs(Path::new(program));
    }
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|d| runs(&d.join(program))))
}

fn host_problems(host: &HostConfig, file: &str, text: &str, problems: &mut Vec<Problem>) {
    let section = format!("hosts.{}", host.name);
    let at = |key: &str| match key_line(text, &section, key) {
        Some(line) => format!("{file}:{line}"),
        None => file.to_string(),
    };
    if let Some(key) = &host.identity
        && let Err(e) = check_key_file(&host.name, key)
    {
        problems.push(Problem {
            at: at("identity"),
            what: e.to_string(),
            fix: format!("chmod 600 {} (and make sure it exists)", key.display()),
        });
    }
    if let Some(SecretSource::File(p)) = &host.passphrase
        && check_key_file(&host.name, p).is_err()
    {
        problems.push(Problem {
            at: at("passphrase_file"),
            what: format!("passphrase file {} is missing or readable by others", p.display()),
            fix: format!("create it with mode 0600: chmod 600 {}", p.display()),
        });
    }
    if let Some(SecretSource::Env(name)) = &host.passphrase
        && std::env::var_os(name).is_none()
    {
        problems.push(Problem {
            at: at("passphrase_env"),
            what: format!("the passphrase variable {name} is not set in this environment"),
            fix: format!("export {name} where the runner starts (cron: in the crontab or a wrapper)"),
        });
    }
    if let Some(kh) = &host.known_hosts
        && !kh.exists()
    {
        problems.push(Problem {
            at: at("known_hosts"),
            what: format!("known_hosts file {} does not exist, so no host key can be verified", kh.display()),
            fix: "create it with the server's key (offsite check --connect prints the line to add)".into(),
        });
    }
}

/// The WIT interfaces a component imports from our package, by short name.
fn imported_interfaces(runtime: &Runtime, script: &Script) -> BTreeSet<String> {
    let ty = script.component.component_type();
    ty.imports(runtime.engine())
        .filter_map(|(name, _)| {
            let rest = name.strip_prefix("offsite:backup/")?;
            Some(rest.split('@').next().unwrap_or(rest).to_string())
        })
        .collect()
}

/// What a script's imports mean here: WASI interfaces the runner gives
/// nothing through (notes), and capabilities it uses without declaring
/// them or declares without using (`(notes, undeclared)`).
pub fn import_notes(all_imports: &[String], declared: &[String]) -> (Vec<String>, Vec<String>) {
    let mut notes = Vec::new();
    let has = |prefix: &str| all_imports.iter().any(|i| i.starts_with(prefix));
    if has("wasi:filesystem") {
        notes.push(
            "imports wasi:filesystem: file calls (std::fs, open()) will fail, as scripts have no filesystem; use \
             `archive` and the read-only `files` view of the read roots"
                .to_string(),
        );
    }
    if has("wasi:sockets") {
        notes.push(
            "imports wasi:sockets: network calls will fail, as scripts have no network; use `ssh` and `scp`"
                .to_string(),
        );
    }
    let ours: BTreeSet<String> = all_imports
        .iter()
        .filter_map(|n| n.strip_prefix("offsite:backup/"))
        .map(|r| r.split('@').next().unwrap_or(r).to_string())
        .filter(|i| i != "types" && i != "meta")
        .collect();
    let declared: BTreeSet<String> = declared.iter().cloned().collect();
    let undeclared: Vec<String> = ours.difference(&declared).cloned().collect();
    for unused in declared.difference(&ours) {
        notes.push(format!("declares the {unused} capability but does not import it (it cannot use it)"));
    }
    (notes, undeclared)
}

#[allow(clippy::too_many_arguments)]
fn script_report(
    out: &mut String,
    problems: &mut Vec<Problem>,
    site: &Site,
    file: &str,
    text: &str,
    runtime: &Runtime,
    script: &Script,
    info: &ScriptInfo,
) {
    let info = &shown_info(info);
    let _ =
        writeln!(out, "script {} {} ({}, sha256 {})", info.name, info.version, script.path.display(), script.sha256);
    let imports = imported_interfaces(runtime, script);
    let _ = writeln!(
        out,
        "  imports: {}",
        if imports.is_empty() {
            "nothing of ours".to_string()
        } else {
            imports.iter().cloned().collect::<Vec<_>>().join(", ")
        }
    );
    let all: Vec<String> =
        script.component.component_type().imports(runtime.engine()).map(|(n, _)| n.to_string()).collect();
    let (notes, undeclared) = import_notes(&all, &info.capabilities);
    for note in notes {
        let _ = writeln!(out, "  note: script {} {note}", info.name);
    }
    if !undeclared.is_empty() {
        problems.push(Problem {
            at: file.to_string(),
            what: format!(
                "script {} uses {} without declaring it (declared: {}): what it says about itself is incomplete",
                info.name,
                undeclared.join(", "),
                if info.capabilities.is_empty() { "none".to_string() } else { info.capabilities.join(", ") }
            ),
            fix: "ask its author to declare every capability it uses in describe()".into(),
        });
    }
    if let Some(pin) = &site.script_sha256
        && *pin != script.sha256
    {
        problems.push(Problem {
            at: key_line(text, "", "script_sha256").map_or(file.to_string(), |l| format!("{file}:{l}")),
            what: format!("the site pins script_sha256 = {pin}, but this script is {}", script.sha256),
            fix: "update the pin if this build is the one you mean to run".into(),
        });
    }
    // Parameters.
    let declared: BTreeSet<&str> = info.params.iter().map(|p| p.name.as_str()).collect();
    for name in site.params.keys() {
        if !declared.contains(name.as_str()) {
            let close = declared.iter().find(|d| similar(d, name));
            problems.push(Problem {
                at: key_line(text, "params", name).map_or(file.to_string(), |l| format!("{file}:{l}")),
                what: format!(
                    "[params] sets {name:?}, which script {} does not take (it takes: {})",
                    info.name,
                    if declared.is_empty() {
                        "none".to_string()
                    } else {
                        declared.iter().copied().collect::<Vec<_>>().join(", ")
                    }
                ),
                fix: match close {
                    Some(c) => format!("did you mean `{c}`? rename the key"),
                    None => "remove the key".into(),
                },
            });
        }
    }
    for spec in &info.params {
        let value = site.params.get(&spec.name).or(spec.default.as_ref());
        match value {
            None if spec.required => problems.push(Problem {
                at: file.to_string(),
                what: format!(
                    "script {} needs parameter {:?} ({}), and the site does not set it",
                    info.name, spec.name, spec.description
                ),
                fix: format!(
                    "add `{} = \"...\"` under [params] (or pass --param {}=... on every run)",
                    spec.name, spec.name
                ),
            }),
            None => {
                let _ = writeln!(out, "  param {}: unset", spec.name);
            }
            Some(_) if spec.secret => {
                let _ = writeln!(out, "  param {}: set (secret, not shown)", spec.name);
            }
            Some(v) => {
                let from = if site.params.contains_key(&spec.name) { "site" } else { "default" };
                let _ = writeln!(out, "  param {} = {v:?} ({from})", spec.name);
            }
        }
    }
    // Interfaces the script imports against what the site grants. With
    // nothing of the kind granted every call is refused: a problem. With
    // hosts but not this kind of grant, the script may simply not need it
    // in this site's mode (mysql-pull's dump mode never fetches): a note.
    let no_hosts = site.hosts.is_empty();
    let needs = [
        (
            "ssh",
            no_hosts,
            site.hosts.values().all(|h| h.commands.is_empty()),
            "no host grants any command",
            "add `commands = [[...]]` to a [hosts.NAME] section",
        ),
        (
            "scp",
            no_hosts,
            site.hosts.values().all(|h| h.fetch.is_empty()),
            "no host grants any fetch path",
            "add `fetch = [\"/path/*.tgz\"]` to a [hosts.NAME] section",
        ),
        (
            "archive",
            site.read_roots.is_empty(),
            false,
            "the site grants no read roots",
            "add `[read]` with `roots = [\"/dir\"]`",
        ),
        // Looking at files is often optional (a size logged before a
        // dump): without read roots it is a note, not a problem.
        (
            "files",
            false,
            site.read_roots.is_empty(),
            "the site grants no read roots",
            "add `[read]` with `roots = [\"/dir\"]`",
        ),
    ];
    for (iface, nothing, none_of_kind, why, fix) in needs {
        if !imports.contains(iface) {
            continue;
        }
        if nothing {
            let local = iface == "archive" || iface == "files";
            let why = if local { why.to_string() } else { "the site has no [hosts.NAME] section".to_string() };
            problems.push(Problem {
                at: file.to_string(),
                what: format!(
                    "script {} uses the {iface} capability, but {why}, so every such call will be denied",
                    info.name
                ),
                fix: if local {
                    fix.into()
                } else {
                    "add a [hosts.NAME] section with the grants the script needs".into()
                },
            });
        } else if none_of_kind {
            let _ = writeln!(
                out,
                "  note: script {} can use {iface}, but {why}: such calls will be denied ({fix} if it needs them)",
                info.name
            );
        }
    }
}

/// An S3 store: where the credentials come from (never what they are),
/// and with `--connect` whether the bucket answers to them, who holds the
/// lock and what interrupted runs left.
fn s3_report(
    out: &mut String,
    problems: &mut Vec<Problem>,
    spec: &crate::site::S3Store,
    timeout: std::time::Duration,
    at_key: &dyn Fn(&str, &str) -> String,
    connect: bool,
) {
    let endpoint = spec.settings.endpoint.as_deref().unwrap_or("AWS");
    let _ = writeln!(
        out,
        "    endpoint {endpoint}{}, parts of {} MiB, a lock unrenewed for {} is stale",
        if spec.settings.path_style { " (path-style)" } else { "" },
        spec.part_size >> 20,
        humantime::format_duration(spec.lock_stale)
    );
    let root = match crate::store::s3::S3Root::open(spec, timeout) {
        Ok(root) => root,
        Err(e) => {
            problems.push(Problem {
                at: at_key("", "store"),
                what: e.to_string(),
                fix: "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials \
                      ([s3] profile or AWS_PROFILE)"
                    .into(),
            });
            return;
        }
    };
    let _ = writeln!(out, "    credentials from {}", root.credentials_source());
    if !connect {
        return;
    }
    if let Err(e) = root.probe() {
        let fix = match &e {
            crate::s3::S3Error::Denied(_) => "check the key pair and what the bucket's policy grants it",
            crate::s3::S3Error::NoBucket(_) => "create the bucket, or fix its name in `store`",
            crate::s3::S3Error::Unreachable(_) | crate::s3::S3Error::ServerFailed(_) => {
                "check [s3] endpoint, and that the server (and the storage behind it) is up"
            }
            _ => "check [s3] and the store's URL",
        };
        let _ = writeln!(out, "    cannot reach the store");
        problems.push(Problem { at: at_key("", "store"), what: e.to_string(), fix: fix.into() });
        return;
    }
    let _ = writeln!(out, "    connected: the bucket answers to these credentials");
    match root.holder() {
        Ok(Some(h)) => {
            let escape = crate::text::escape;
            let _ = writeln!(
                out,
                "    locked by site {:?} on {} (pid {}), started {}",
                escape(&h.site),
                escape(&h.host),
                h.pid,
                escape(&h.started)
            );
        }
        Ok(None) => {
            let _ = writeln!(out, "    not locked: no run is using it");
        }
        Err(e) => {
            let _ = writeln!(out, "    cannot read the lock: {e}");
        }
    }
    match root.bucket().pending_uploads("") {
        Ok(p) if p.is_empty() => {}
        Ok(p) => {
            let _ = writeln!(
                out,
                "    {} incomplete upload(s) (a run in progress, or left by a killed one; the next run aborts them)",
                p.len()
            );
        }
        Err(e) => {
            let _ = writeln!(out, "    cannot list incomplete uploads: {e}");
        }
    }
}

fn connect_report(out: &mut String, problems: &mut Vec<Problem>, site: &Site, file: &str, text: &str) {
    // A check says how each host answers now: a host that is down is
    // reported at once, not tried again as a run would.
    let hosts =
        site.hosts.iter().map(|(n, h)| (n.clone(), crate::site::HostConfig { retries: 0, ..h.clone() })).collect();
    let transport: Arc<dyn Transport> = match OpenSsh::new(&hosts, site.ssh_config.as_deref()) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            problems.push(Problem {
                at: file.to_string(),
                what: format!("cannot prepare SSH connections: {e}"),
                fix: "check that $TMPDIR is writable".into(),
            });
            return;
        }
    };
    let wait = std::time::Duration::from_secs(30);
    let remote = Remote {
        transport: Arc::clone(&transport),
        store: None,
        secrets: Arc::new(Vec::new()),
        outputs: Arc::new(Mutex::new(Vec::new())),
        slots: Arc::new(Slots::new(1)),
        call_timeout: wait,
        run_deadline: None,
        idle_timeout: wait,
        captured_output: 64 << 10,
        fetch: Default::default(),
        paces: Vec::new(),
        dry_run: false,
        offline: false,
    };
    for host in site.hosts.values() {
        let at =
            key_line(text, &format!("hosts.{}", host.name), "").map_or(file.to_string(), |l| format!("{file}:{l}"));
        if let Err(e) = transport.connect(&host.name) {
            let _ = writeln!(out, "  host {}: cannot connect", host.name);
            problems.push(Problem { at, what: e.to_string(), fix: connect_fix(&e) });
            continue;
        }
        let _ = writeln!(out, "  host {}: connected, host key verified, authenticated", host.name);
        // Is the key held to a forced command? Ask in a way one cannot
        // hijack: offsite's gate answers the probe without running
        // anything; an unrestricted key finds no such program.
        match gate_state(&remote, &host.name) {
            Gate::None => {}
            Gate::Offsite(digest) if Some(&digest) == crate::keys::expected_gate(site, host).as_ref() => {
                for name in crate::keys::unchecked_secrets(site, host) {
                    problems.push(Problem {
                        at: at.clone(),
                        what: format!(
                            "host {}: secret {name:?} cannot pass the key's forced command: its `stdin` does not \
                             hold {{secret}} once, as a double-quoted value ending its line, so the gate cannot tell \
                             it from an option file of someone else's and refuses it",
                            host.name
                        ),
                        fix: format!(
                            "write it like stdin = \"[client]\\npassword=\\\"{{secret}}\\\"\\n\", then reinstall the \
                             line `offsite keys authorized-line {file} {}` prints",
                            host.name
                        ),
                    });
                }
                let _ = writeln!(
                    out,
                    "    the key is restricted to the site's current command lines (authorized_keys command= from \
                     `offsite keys authorized-line`); programs are not looked up, since the key may run nothing else"
                );
                continue;
            }
            Gate::Offsite(_) | Gate::Outdated => {
                problems.push(Problem {
                    at: at.clone(),
                    what: format!(
                        "host {}: the forced command in its authorized_keys allows other command lines than the site \
                         grants now (the grants changed since it was made): the server would refuse or run old commands",
                        host.name
                    ),
                    fix: format!(
                        "install the line `offsite keys authorized-line {file} {}` prints in place of the old one",
                        host.name
                    ),
                });
                continue;
            }
            Gate::Foreign(answer) => {
                let _ = writeln!(
                    out,
                    "    the key seems held to a forced command that is not offsite's (it answered {answer:?}); \
                     programs are not looked up"
                );
                continue;
            }
        }
        let programs: BTreeSet<&str> = host.commands.iter().filter_map(|c| c.first().map(String::as_str)).collect();
        for program in programs {
            match remote_has(&remote, &host.name, program) {
                Ok(true) => {
                    let _ = writeln!(out, "    {program}: found");
                }
                Ok(false) => problems.push(Problem {
                    at: at.clone(),
                    what: format!(
                        "host {}: program {program:?} is granted but not found there (`command -v` failed)",
                        host.name
                    ),
                    fix: format!("install it on {}, or grant its full path", host.address),
                }),
                Err(e) => problems.push(Problem {
                    at: at.clone(),
                    what: format!("host {}: could not look up {program:?}: {e}", host.name),
                    fix: "check the account's shell on the server".into(),
                }),
            }
        }
    }
}

fn connect_fix(e: &crate::transport::TransportError) -> String {
    use crate::transport::TransportError as T;
    match e {
        T::UnknownHostKey { .. } => {
            "check the fingerprint with the server's administrator, then add the line above".into()
        }
        T::ChangedHostKey { .. } => {
            "find out why the key changed before trusting the new one; then replace the old line".into()
        }
        T::AuthFailed { detail, .. } if detail.starts_with("this side") => {
            "make the key usable on this side first (the agent, keychain or `passphrase`), as the message says".into()
        }
        T::AuthFailed { .. } => {
            "install the backup key's public half in the account's authorized_keys, or load it into the agent".into()
        }
        T::Config { .. } => "fix the host's settings as the message says".into(),
        T::Timeout { .. } | T::Unreachable { .. } => "check the address, port, firewall and that sshd runs".into(),
    }
}

/// Runs `command -v PROGRAM` on the host, through the same `Remote::exec`
/// the `ssh` capability uses (timeouts, capture and exit handling).
/// What stands between the key and the account's shell.
enum Gate {
    /// Nothing: the probe is an unknown program there.
    None,
    /// Offsite's gate, allowing the lines with this digest.
    Offsite(String),
    /// Offsite's gate from before the probe existed: it refused the probe.
    Outdated,
    /// Some other forced command, with what it said.
    Foreign(String),
}

fn gate_state(remote: &Remote, host: &str) -> Gate {
    let argv = vec![crate::keys::GATE_PROBE.to_string()];
    let Ok((status, stdout, stderr)) = remote.exec(host, &argv) else { return Gate::None };
    let stdout = String::from_utf8_lossy(&stdout);
    if let Some(digest) = stdout.trim().strip_prefix(&format!("{} ", crate::keys::GATE_PROBE)) {
        return Gate::Offsite(digest.to_string());
    }
    if status == 126 && stderr.contains("this key may only run the commands its site grants") {
        return Gate::Outdated;
    }
    if status == 127 {
        return Gate::None;
    }
    let said = if stdout.trim().is_empty() { stderr.trim().to_string() } else { stdout.trim().to_string() };
    // A forced command's answer is the server's text: cut and escaped,
    // since the report goes to stdout as it is.
    let said = crate::text::truncate(&format!("exit status {status}: {said}"), 200).into_owned();
    Gate::Foreign(crate::text::escape(&said).into_owned())
}

fn remote_has(remote: &Remote, host: &str, program: &str) -> Result<bool, String> {
    let argv: Vec<String> = ["command", "-v", program].iter().map(|s| s.to_string()).collect();
    let (status, _, _) = remote.exec(host, &argv).map_err(|e| crate::caps::describe_error(&e))?;
    Ok(status == 0)
}

/// Sees that `dir` is writable by creating a file there. The file has no
/// name (O_TMPFILE), so nobody listing the store ever sees it, not even
/// while `offsite watch` checks a reloaded site; only where the file
/// system cannot do that is a named probe created and removed.
fn probe_writable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let unnamed = std::fs::OpenOptions::new().write(true).mode(0o600).custom_flags(libc::O_TMPFILE).open(dir);
    match unnamed {
        Ok(_) => return Ok(()),
        Err(e) if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => return Err(e),
        Err(_) => {}
    }
    let probe = dir.join(format!("{}check.{}", crate::store::TEMP_PREFIX, std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

/// Two names that differ by one edit or a swap of neighbours.
fn similar(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len().abs_diff(b.len()) > 1 {
        return false;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut prev2 = prev.clone();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                cur[j] = cur[j].min(prev2[j - 2] + 1);
            }
        }
        prev2 = std::mem::replace(&mut prev, cur);
    }
    prev[b.len()] <= 1
}

pub use crate::site::key_line;

/// A restic repository store: whether it is there, and where its password
/// comes from (never shown). With `--connect`, the password is read (a
/// `password_command` run) and the repository opened with it: what it
/// holds, and who holds its locks.
fn repo_report(
    out: &mut String,
    problems: &mut Vec<Problem>,
    site: &Site,
    spec: &crate::site::RepoStore,
    at: &str,
    connect: bool,
) {
    use crate::site::PasswordFrom;
    match &spec.at {
        crate::site::RepoAt::Dir(path) if path.join("config").is_file() => {
            let _ = writeln!(out, "    (a restic repository is there)");
        }
        crate::site::RepoAt::Dir(path) if path.exists() => {
            let empty = std::fs::read_dir(path).map(|mut d| d.next().is_none()).unwrap_or(false);
            if !empty {
                problems.push(Problem {
                    at: at.to_string(),
                    what: format!("{} is neither a restic repository nor empty", path.display()),
                    fix: "point `store` at a repository, or at a directory of its own".into(),
                });
            } else {
                let _ = writeln!(out, "    (it is empty; the first run creates the repository there)");
            }
        }
        crate::site::RepoAt::Dir(_) => {
            let _ = writeln!(out, "    (it does not exist yet; the first run creates the repository there)");
        }
        crate::site::RepoAt::S3(s3) => {
            let contacted = if connect { "" } else { "; no server contacted" };
            let _ = writeln!(
                out,
                "    (in a bucket: the first run creates the repository if the prefix is empty{contacted})"
            );
            match crate::store::s3::S3Root::open(s3, site.limits.call_timeout) {
                Ok(root) => {
                    let _ = writeln!(out, "    credentials from {}", root.credentials_source());
                }
                Err(e) => problems.push(Problem {
                    at: at.to_string(),
                    what: e.to_string(),
                    fix: "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials \
                          ([s3] profile or AWS_PROFILE)"
                        .into(),
                }),
            }
        }
    }
    let file = match &spec.password {
        PasswordFrom::File(path) => {
            let _ = writeln!(out, "    its password is read from {}", path.display());
            Some(path.clone())
        }
        PasswordFrom::Command(_) => {
            let run = if connect { "run to connect" } else { "not run without --connect" };
            let _ = writeln!(out, "    its password is what [repository] password_command prints ({run})");
            None
        }
        PasswordFrom::EnvFile => match std::env::var_os("RESTIC_PASSWORD_FILE") {
            Some(path) => {
                let _ = writeln!(
                    out,
                    "    its password is read from RESTIC_PASSWORD_FILE ({})",
                    Path::new(&path).display()
                );
                Some(PathBuf::from(path))
            }
            None => {
                problems.push(Problem {
                    at: at.to_string(),
                    what: "the restic repository has no password source".into(),
                    fix: "set [repository] password_file or password_command, or RESTIC_PASSWORD_FILE".into(),
                });
                None
            }
        },
    };
    if let Some(path) = file
        && let Err(e) = check_key_file("repository", &path)
    {
        problems.push(Problem {
            at: at.to_string(),
            what: e.to_string().replace("identity file", "password file").replace("private key", "password file"),
            fix: format!("chmod 600 {}", path.display()),
        });
        return;
    }
    if !connect {
        return;
    }
    use crate::store::backend::Access;
    use crate::store::repo::RepoRoot;
    match RepoRoot::open(spec, Access::Existing, site.limits.call_timeout, None) {
        Ok(root) => match root.survey(&site.name) {
            Ok(lines) => {
                for line in lines {
                    let _ = writeln!(out, "    {line}");
                }
            }
            Err(e) => problems.push(Problem {
                at: at.to_string(),
                what: format!("cannot read the restic repository's snapshots: {e}"),
                fix: "run `restic check` on it".into(),
            }),
        },
        Err(e) if e.is_not_found() => {
            let _ = writeln!(out, "    connected: no repository there yet (the first run creates it)");
        }
        Err(e) => {
            let _ = writeln!(out, "    cannot open the repository");
            let fix = if e.is_config() {
                "check the password source and `store`"
            } else {
                "check that the storage (and the server in front of it) is up"
            };
            problems.push(Problem { at: at.to_string(), what: e.to_string(), fix: fix.into() });
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn imports_are_compared_with_declared_capabilities_and_dead_wasi_named() {
        let imports: Vec<String> = [
            "offsite:backup/types@0.1.0",
            "offsite:backup/meta@0.1.0",
            "offsite:backup/ssh@0.1.0",
            "offsite:backup/archive@0.1.0",
            "wasi:filesystem/preopens@0.2.6",
            "wasi:cli/stdout@0.2.6",
        ]
        .map(String::from)
        .to_vec();
        let (notes, undeclared) = import_notes(&imports, &["archive".to_string(), "scp".to_string()]);
        assert_eq!(undeclared, vec!["ssh"]);
        assert!(notes.iter().any(|n| n.contains("wasi:filesystem")), "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("declares the scp capability but does not import it")), "{notes:?}");
        assert!(!notes.iter().any(|n| n.contains("sockets")), "{notes:?}");
        let (notes, undeclared) = import_notes(&imports[..4], &["ssh".to_string(), "archive".to_string()]);
        assert!(notes.is_empty() && undeclared.is_empty(), "{notes:?} {undeclared:?}");
    }
    use super::*;

    #[test]
    fn the_writability_probe_leaves_no_name_behind() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kept"), b"x").unwrap();
        for _ in 0..3 {
            probe_writable(dir.path()).unwrap();
        }
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["kept"]);
        assert!(probe_writable(&dir.path().join("kept")).is_err(), "a file is not a writable directory");
        assert!(probe_writable(&dir.path().join("absent")).is_err());
    }

    #[test]
    fn key_lines_are_found_per_section() {
        let text = "store = \"/x\"\n\n[params]\ndumps = \"a\"\n\"mode\" = \"b\"\n[hosts.server1]\ncommands = []\n";
        assert_eq!(key_line(text, "", "store"), Some(1));
        assert_eq!(key_line(text, "params", "dumps"), Some(4));
        assert_eq!(key_line(text, "params", "mode"), Some(5));
        assert_eq!(key_line(text, "hosts.server1", "commands"), Some(7));
        assert_eq!(key_line(text, "hosts.server1", ""), Some(6));
        assert_eq!(key_line(text, "params", "store"), None);
    }

    #[test]
    fn similar_names() {
        assert!(similar("dumps", "dumsp"));
        assert!(similar("dumps", "dump"));
        assert!(similar("path", "paht"));
        assert!(!similar("dumps", "mode"));
    }

    #[test]
    fn patterns_in_words() {
        let p: Vec<String> = ["mysqldump", "--single-transaction", "sitedb", "tbl_*..."].map(String::from).to_vec();
        assert_eq!(
            plain_pattern(&p),
            "mysqldump --single-transaction sitedb [any number of arguments matching \"tbl_*\"]"
        );
    }
}
