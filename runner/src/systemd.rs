//! Living under systemd: the unit generator that gives each site's
//! `offsite@SITE.timer` its schedule, and `sd_notify` for `offsite watch`.
//!
//! **The generator.** Installed as
//! `/lib/systemd/system-generators/offsite-systemd-generator` (a wrapper
//! that runs `offsite systemd-generator`), it runs at boot and on `systemctl daemon-reload`. For
//! every `/etc/offsite/SITE.toml` it writes drop-ins into the generator
//! directory: the timer's `OnCalendar=` lines from the site's `schedule`
//! (in its `timezone`), and the service's `ReadWritePaths=` (the store), so
//! that `ProtectSystem=strict` leaves the run exactly the one directory it
//! writes. Drop-ins an administrator writes under /etc/systemd/system win.
//!
//! Cron and systemd read a schedule the same way but for one rule: when
//! both day-of-month and day-of-week are restricted, cron runs on either
//! (`0 3 1 * Mon`: the 1st, and every Monday); systemd needs both, so such a
//! schedule becomes two `OnCalendar=` lines. At daylight saving changes
//! systemd decides (a run in a skipped hour happens after the change, as
//! `watch` does; one in a repeated hour may happen once or twice).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};

use crate::schedule::{Schedule, Zone};

/// The name the generator is installed under (a wrapper that runs
/// `offsite systemd-generator`).
const GENERATOR_NAME: &str = "offsite-systemd-generator";

/// Where the generator reads site files (systemd runs generators with an
/// empty environment; `$OFFSITE_CONFIG_DIR` is for trying it by hand).
const SITES_DIR: &str = "/etc/offsite";

/// One cron field: its name, range, and value names.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MINUTE: Field = Field { name: "minute", min: 0, max: 59, names: &[] };
const HOUR: Field = Field { name: "hour", min: 0, max: 23, names: &[] };
const DOM: Field = Field { name: "day-of-month", min: 1, max: 31, names: &[] };
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
};
/// 0 and 7 are Sunday, as in cron.
const DOW: Field =
    Field { name: "day-of-week", min: 0, max: 7, names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"] };

impl Field {
    fn value(&self, text: &str) -> Result<u32> {
        let lower = text.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            // Months count from 1 (jan), weekdays from 0 (sun).
            return Ok(i as u32 + u32::from(self.names.len() == 12));
        }
        let v: u32 = text.parse().map_err(|_| anyhow!("{} {text:?} is not a number", self.name))?;
        if v < self.min || v > self.max {
            bail!("{} {v} is outside {}-{}", self.name, self.min, self.max);
        }
        Ok(v)
    }

    /// Every value the field matches.
    fn expand(&self, text: &str) -> Result<BTreeSet<u32>> {
        let mut set = BTreeSet::new();
        for item in text.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => {
                    let step: u32 = s.parse().map_err(|_| anyhow!("{} step {s:?} is not a number", self.name))?;
                    if step == 0 {
                        bail!("{} step 0", self.name);
                    }
                    (r, step)
                }
                None => (item, 1),
            };
            let (lo, hi) = if range == "*" || range == "?" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                (self.value(a)?, self.value(b)?)
            } else if step > 1 {
                // `5/15`: from 5 to the end of the range.
                (self.value(range)?, self.max)
            } else {
                let v = self.value(range)?;
                (v, v)
            };
            if lo > hi {
                bail!("{} range {range:?} runs backwards", self.name);
            }
            set.extend((lo..=hi).step_by(step as usize));
        }
        Ok(set)
    }
}

/// Runs of consecutive values as `a..b` (three or more), others listed.
fn compress(values: &[u32], show: impl Fn(u32) -> String) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < values.len() {
        let mut j = i;
        while j + 1 < values.len() && values[j + 1] == values[j] + 1 {
            j += 1;
        }
        if j - i >= 2 {
            parts.push(format!("{}..{}", show(values[i]), show(values[j])));
            i = j + 1;
        } else {
            parts.push(show(values[i]));
            i += 1;
        }
    }
    parts.join(",")
}

fn numbers(field: &Field, text: &str) -> Result<String> {
    let set = field.expand(text)?;
    if set.len() as u32 == field.max - field.min + 1 {
        return Ok("*".into());
    }
    let values: Vec<u32> = set.into_iter().collect();
    Ok(compress(&values, |v| format!("{v:02}")))
}

/// Weekdays in systemd's order (Mon=1 .. Sun=7); `None` for every day.
fn weekdays(text: &str) -> Result<Option<String>> {
    let set: BTreeSet<u32> = DOW.expand(text)?.into_iter().map(|d| if d == 0 { 7 } else { d }).collect();
    if set.len() == 7 {
        return Ok(None);
    }
    const NAMES: [&str; 8] = ["", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    let values: Vec<u32> = set.into_iter().collect();
    Ok(Some(compress(&values, |d| NAMES[d as usize].to_string())))
}

/// The `OnCalendar=` values a schedule becomes (one, or two when cron's
/// day-of-month/day-of-week "or" applies).
pub fn on_calendar(schedule: &Schedule) -> Result<Vec<String>> {
    let fields: Vec<&str> = schedule.expression.split_whitespace().collect();
    let [minute, hour, dom, month, dow] = fields[..] else {
        bail!("{:?} does not have five fields", schedule.expression);
    };
    for f in &fields {
        if f.contains(['L', 'W', '#']) {
            bail!("{:?}: `L`, `W` and `#` have no systemd calendar equivalent", schedule.expression);
        }
    }
    let (minute, hour, month) = (numbers(&MINUTE, minute)?, numbers(&HOUR, hour)?, numbers(&MONTH, month)?);
    let zone = match schedule.zone {
        Zone::Local => String::new(),
        Zone::Named(tz) => format!(" {}", tz.name()),
    };
    let star = |f: &str| f == "*" || f == "?";
    let line = |days: &str, weekdays: Option<String>| {
        let prefix = weekdays.map(|w| format!("{w} ")).unwrap_or_default();
        format!("{prefix}*-{month}-{days} {hour}:{minute}:00{zone}")
    };
    Ok(if !star(dom) && !star(dow) {
        vec![line(&numbers(&DOM, dom)?, None), line("*", weekdays(dow)?)]
    } else {
        vec![line(&numbers(&DOM, dom)?, weekdays(dow)?)]
    })
}

/// `offsite systemd-generator NORMAL_DIR [EARLY_DIR LATE_DIR]`, run by
/// systemd through the `offsite-systemd-generator` wrapper. A site it
/// cannot read must not fail the boot: it is said on stderr (the journal),
/// and `offsite check` tells the whole story.
pub fn generator(out: &Path) {
    let sites = std::env::var_os("OFFSITE_CONFIG_DIR").map_or_else(|| PathBuf::from(SITES_DIR), PathBuf::from);
    for problem in generate(&sites, out) {
        eprintln!("{GENERATOR_NAME}: {problem}");
    }
}

/// Whether `site_file` is one the generator writes units for
/// (`/etc/offsite/NAME.toml`, or in `OFFSITE_CONFIG_DIR`).
pub fn serves(site_file: &Path) -> bool {
    let sites = std::env::var_os("OFFSITE_CONFIG_DIR").map_or_else(|| PathBuf::from(SITES_DIR), PathBuf::from);
    std::path::absolute(site_file)
        .is_ok_and(|p| p.parent() == Some(sites.as_path()) && p.extension().is_some_and(|x| x == "toml"))
}

/// Where `offsite-watch.service` may write only through the generator's
/// drop-in (read-only under its `ProtectSystem=full` and
/// `ProtectHome=read-only`).
pub fn watch_needs_reload(path: &Path) -> bool {
    ["/home", "/root", "/run/user", "/etc", "/usr", "/boot"].iter().any(|p| path.starts_with(p))
}

/// `offsite@NAME.timer` when `site_file` is a site the generator serves
/// (`/etc/offsite/NAME.toml`, or in `OFFSITE_CONFIG_DIR`) and that timer
/// is enabled (`systemctl enable` links it into `timers.target.wants`).
pub fn enabled_timer(site_file: &Path) -> Option<String> {
    if !serves(site_file) {
        return None;
    }
    let absolute = std::path::absolute(site_file).ok()?;
    let timer = format!("offsite@{}.timer", absolute.file_stem()?.to_str()?);
    let units =
        std::env::var_os("OFFSITE_SYSTEMD_DIR").map_or_else(|| PathBuf::from("/etc/systemd/system"), PathBuf::from);
    units.join("timers.target.wants").join(&timer).symlink_metadata().is_ok().then_some(timer)
}

/// Writes the drop-ins for every site file in `sites` into `out`; returns
/// what it could not do, one line a site.
pub fn generate(sites: &Path, out: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let mut watch = Vec::new();
    let Ok(entries) = std::fs::read_dir(sites) else { return problems };
    let mut files: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect();
    files.sort();
    for file in files {
        let Some(instance) = file.file_stem().map(|s| s.to_string_lossy().into_owned()) else { continue };
        if instance.is_empty()
            || !instance.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            || instance.starts_with('.')
        {
            problems.push(format!(
                "{}: no timer: a site file for systemd is named with letters, digits, '-', '_', '.' and ':'",
                file.display()
            ));
            continue;
        }
        match site_dropins(&file, &instance, out) {
            Ok(paths) => watch.extend(paths),
            Err(e) => problems.push(format!("{}: {e:#}", file.display())),
        }
    }
    // offsite-watch.service runs every site: each site's store, copy
    // directories and textfile directory are writable for it too (under
    // ProtectHome= as well), once `systemctl daemon-reload` has run.
    let mut seen = BTreeSet::new();
    watch.retain(|line| seen.insert(line.clone()));
    let mut text = String::from(
        "# Generated by offsite-systemd-generator: the paths the sites in the config directory write.\n[Service]\n",
    );
    for line in &watch {
        let _ = writeln!(text, "{line}");
    }
    if let Err(e) = write_dropin(out, "offsite-watch.service", &text) {
        problems.push(format!("offsite-watch.service: {e:#}"));
    }
    problems
}

/// Only what the units need is read (store, copy stores, textfile,
/// schedule, timezone): a site whose read roots are not there yet still
/// gets its timer, and its run says what is wrong. Returns the service's
/// lines that open paths (for the watcher's drop-in).
fn site_dropins(file: &Path, instance: &str, out: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(file)?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| anyhow!("not a site file: {}", e.message()))?;
    // Every value that reaches a unit file: systemd ends a line at a
    // newline and at a carriage return alike, so no control character of
    // any kind may pass into one.
    let text_of = |key: &str| -> Result<Option<&str>> {
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) if s.chars().any(char::is_control) => {
                bail!("`{key}` holds a control character ({}); no unit is written for it", crate::text::escape(s))
            }
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(_) => bail!("`{key}` must be a string"),
        }
    };
    let store = text_of("store")?.ok_or_else(|| anyhow!("no `store`"))?;
    let mut service = String::from("# Generated by offsite-systemd-generator from the site file.\n[Service]\n");
    let mut paths = Vec::new();
    // A restic repository's place is after its prefix (a directory or a
    // bucket, as for any store).
    let place = store.strip_prefix(crate::site::RESTIC_PREFIX).unwrap_or(store);
    if place.starts_with("s3://") {
        // Runs write to the bucket, and nothing on this machine.
        let _ = writeln!(service, "# The store is {store}: no local path to open.");
    } else {
        let store = crate::site::expand_home(Path::new(place), file.parent().unwrap_or(Path::new(SITES_DIR)));
        // The one directory a run writes; quoted for systemd. `-`: a store
        // that does not exist yet is left out, rather than failing the
        // unit, so it is created first, outside the sandbox (`+`), as the
        // run itself would (parents too; mode 0700 from the unit's UMask=).
        let shown = store.display().to_string();
        paths.push(format!("ExecStartPre=+/bin/mkdir -p -- {}", unit_quote(&shown.replace('$', "$$"))));
        paths.push(format!("ReadWritePaths=-{}", unit_quote(&shown)));
    }
    // Each `[[copy]]` directory is written too. Never created: a copy goes
    // only into a directory that is there (a disk not mounted stays empty).
    let copies = match table.get("copy") {
        None => &Vec::new(),
        Some(toml::Value::Array(copies)) => copies,
        Some(_) => bail!("`copy` must be an array of tables ([[copy]])"),
    };
    for copy in copies {
        match copy.get("store") {
            Some(toml::Value::String(s)) if s.chars().any(char::is_control) => {
                bail!(
                    "a `[[copy]]` store holds a control character ({}); no unit is written for it",
                    crate::text::escape(s)
                )
            }
            Some(toml::Value::String(s))
                if s.strip_prefix(crate::site::RESTIC_PREFIX).unwrap_or(s).starts_with("s3://") => {}
            Some(toml::Value::String(s)) => {
                // A repository copy's place is its directory, as for the store.
                let s = s.strip_prefix(crate::site::RESTIC_PREFIX).unwrap_or(s);
                let dir = crate::site::expand_home(Path::new(s), file.parent().unwrap_or(Path::new(SITES_DIR)));
                paths.push(format!("ReadWritePaths=-{}", unit_quote(&dir.display().to_string())));
            }
            _ => bail!("each `[[copy]]` needs a `store` string"),
        }
    }
    // The node_exporter textfile is replaced by rename in its directory.
    let textfile = match table.get("report").and_then(|r| r.get("prometheus")) {
        None => None,
        Some(toml::Value::String(s)) if s.chars().any(char::is_control) => bail!(
            "`[report] prometheus` holds a control character ({}); no unit is written for it",
            crate::text::escape(s)
        ),
        Some(toml::Value::String(s)) => Some(s.as_str()),
        Some(_) => bail!("`[report] prometheus` must be a string"),
    };
    if let Some(textfile) = textfile {
        let path = crate::site::expand_home(Path::new(textfile), file.parent().unwrap_or(Path::new(SITES_DIR)));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            paths.push(format!("ReadWritePaths=-{}", unit_quote(&dir.display().to_string())));
        }
    }
    for line in &paths {
        let _ = writeln!(service, "{line}");
    }
    write_dropin(out, &format!("offsite@{instance}.service"), &service)?;
    if let Some(expression) = text_of("schedule")? {
        let calendar = Schedule::parse(expression, text_of("timezone")?).and_then(|s| Ok((on_calendar(&s)?, s)));
        let (lines, schedule) = match calendar {
            Ok(found) => found,
            Err(e) => {
                // Not the template's daily calendar in its place: a timer
                // with no calendar at all, which systemd refuses to load,
                // so `systemctl status` shows the unit as bad and says why
                // in its description, and the journal has this line.
                let why = format!("{e:#}");
                // One line of a unit, with no specifier in it.
                let plain = |t: &str| t.chars().filter(|c| !c.is_control()).collect::<String>().replace('%', "%%");
                let timer = format!(
                    "# Generated by offsite-systemd-generator: the site's schedule cannot be used.\n[Unit]\n\
                     Description=Offsite schedule of site %i: INVALID schedule in {}: {}\n[Timer]\nOnCalendar=\n",
                    plain(&file.display().to_string()),
                    plain(&why)
                );
                write_dropin(out, &format!("offsite@{instance}.timer"), &timer)?;
                bail!("invalid `schedule`; offsite@{instance}.timer will not start until it is fixed: {why}");
            }
        };
        let mut timer = format!(
            "# Generated by offsite-systemd-generator from `schedule = {:?}` ({}).\n[Timer]\nOnCalendar=\n",
            schedule.expression, schedule.zone
        );
        for l in lines {
            let _ = writeln!(timer, "OnCalendar={l}");
        }
        write_dropin(out, &format!("offsite@{instance}.timer"), &timer)?;
    }
    Ok(paths)
}

fn write_dropin(out: &Path, unit: &str, text: &str) -> Result<()> {
    let dir = out.join(format!("{unit}.d"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("50-offsite-site.conf"), text)?;
    Ok(())
}

/// A path as one word of a systemd setting: `%` doubled, and quoted with
/// C-style escapes when it has spaces, quotes or backslashes.
fn unit_quote(path: &str) -> String {
    let path = path.replace('%', "%%");
    if !path.contains([' ', '"', '\'', '\\']) && !path.contains(char::is_control) {
        return path;
    }
    let mut q = String::from("\"");
    for c in path.chars() {
        match c {
            '"' | '\\' => {
                q.push('\\');
                q.push(c);
            }
            '\t' => q.push_str("\\t"),
            '\n' => q.push_str("\\n"),
            c if c.is_control() => {
                for b in c.to_string().bytes() {
                    q.push_str(&format!("\\x{b:02x}"));
                }
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// Tells the service manager about `watch` (`READY=1`, `RELOADING=1`,
/// `STOPPING=1`, `STATUS=...`), when it started us with `$NOTIFY_SOCKET`;
/// nothing otherwise. Failures are ignored: notification is advisory.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let socket = socket.to_string_lossy().into_owned();
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let addr = if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        std::os::unix::net::SocketAddr::from_pathname(&socket)
    };
    if let Ok(addr) = addr {
        let _ = sock.send_to_addr(state.as_bytes(), &addr);
    }
}

/// `MONOTONIC_USEC=` for a `RELOADING=1` message (systemd 253 and later
/// want it to time the reload).
pub fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cal(expr: &str, zone: Option<&str>) -> Vec<String> {
        on_calendar(&Schedule::parse(expr, zone).unwrap()).unwrap()
    }

    #[test]
    fn cron_schedules_become_the_calendar_events_systemd_reads() {
        assert_eq!(cal("34 3,20 * * *", None), ["*-*-* 03,20:34:00"]);
        assert_eq!(cal("34 3,20 * * *", Some("Europe/Berlin")), ["*-*-* 03,20:34:00 Europe/Berlin"]);
        assert_eq!(cal("*/15 * * * *", None), ["*-*-* *:00,15,30,45:00"]);
        assert_eq!(cal("0 2 * * 1-5", None), ["Mon..Fri *-*-* 02:00:00"]);
        assert_eq!(cal("0 2 * * sat,sun", None), ["Sat,Sun *-*-* 02:00:00"]);
        assert_eq!(cal("0 2 * * 0,7", None), ["Sun *-*-* 02:00:00"]);
        assert_eq!(cal("0 2 * * *", None), ["*-*-* 02:00:00"]);
        assert_eq!(cal("0 2 * * 0-6", None), ["*-*-* 02:00:00"]);
        assert_eq!(cal("30 4 1 jan,jul *", None), ["*-01,07-01 04:30:00"]);
        assert_eq!(cal("5 0 1-3 * *", None), ["*-*-01..03 00:05:00"]);
        assert_eq!(cal("10/20 8-17/3 * * *", None), ["*-*-* 08,11,14,17:10,30,50:00"]);
        // cron's "either day" rule: two events.
        assert_eq!(cal("0 3 1,15 * mon", None), ["*-*-01,15 03:00:00", "Mon *-*-* 03:00:00"]);
    }

    #[test]
    fn what_systemd_cannot_express_is_refused() {
        let mut parsed = 0;
        for expr in ["0 0 L * *", "0 0 * * 5#2", "0 0 15W * *"] {
            if let Ok(s) = Schedule::parse(expr, None) {
                parsed += 1;
                assert!(on_calendar(&s).is_err(), "{expr}");
            }
        }
        assert!(parsed > 0, "croner reads at least one of them");
    }

    #[test]
    fn paths_are_one_word_of_a_unit_setting() {
        assert_eq!(unit_quote("/srv/offsite/web1"), "/srv/offsite/web1");
        assert_eq!(unit_quote("/srv/a b"), "\"/srv/a b\"");
        assert_eq!(unit_quote("/srv/100%"), "/srv/100%%");
        assert_eq!(unit_quote("/srv/a\nOnCalendar=x"), "\"/srv/a\\nOnCalendar=x\"", "one line, whatever the path");
    }

    #[test]
    fn the_generator_writes_a_timer_and_a_service_dropin_per_site() {
        let sites = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        std::fs::write(
            sites.path().join("web1.toml"),
            "store = \"/srv/offsite/web1\"\nschedule = \"34 3,20 * * *\"\ntimezone = \"Europe/Berlin\"\n",
        )
        .unwrap();
        std::fs::write(
            sites.path().join("adhoc.toml"),
            "store = \"/srv/off site/$HOME%n\"\n[[copy]]\nstore = \"/mnt/usb/adhoc\"\n[[copy]]\nstore = \
             \"s3://bucket/adhoc\"\n[[copy]]\nstore = \"copies/adhoc\"\n[[copy]]\nstore = \"restic:/mnt/usb/repo\"\n\
             [[copy]]\nstore = \"restic:s3://bucket/repo\"\n",
        )
        .unwrap();
        std::fs::write(sites.path().join("broken.toml"), "store = \n").unwrap();
        std::fs::write(sites.path().join("bad name.toml"), "store = \"/x\"\n").unwrap();
        let problems = generate(sites.path(), out.path());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("broken.toml")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("bad name.toml") && p.contains("no timer")), "{problems:?}");
        let read = |p: &str| std::fs::read_to_string(out.path().join(p)).unwrap();
        let timer = read("offsite@web1.timer.d/50-offsite-site.conf");
        assert!(timer.contains("OnCalendar=\nOnCalendar=*-*-* 03,20:34:00 Europe/Berlin\n"), "{timer}");
        let web1 = read("offsite@web1.service.d/50-offsite-site.conf");
        // The store is created before the run, outside the sandbox, then
        // made the one writable path.
        assert!(
            web1.contains("ExecStartPre=+/bin/mkdir -p -- /srv/offsite/web1\nReadWritePaths=-/srv/offsite/web1\n"),
            "{web1}"
        );
        // Neither a specifier nor a variable is expanded in a store's path.
        let adhoc = read("offsite@adhoc.service.d/50-offsite-site.conf");
        assert!(adhoc.contains("ExecStartPre=+/bin/mkdir -p -- \"/srv/off site/$$HOME%%n\"\n"), "{adhoc}");
        assert!(adhoc.contains("ReadWritePaths=-\"/srv/off site/$HOME%%n\"\n"), "{adhoc}");
        // Copy directories are writable too (relative ones beside the site
        // file), never created; a bucket needs no path.
        let copies = format!(
            "ReadWritePaths=-/mnt/usb/adhoc\nReadWritePaths=-{}/copies/adhoc\nReadWritePaths=-/mnt/usb/repo\n",
            sites.path().display()
        );
        assert!(adhoc.ends_with(&copies), "{adhoc}");
        assert_eq!(adhoc.matches("ExecStartPre").count(), 1, "{adhoc}");
        assert!(!out.path().join("offsite@adhoc.timer.d").exists(), "no schedule: the template's calendar");
        // The watcher runs every site: it may write what each one writes.
        let watch = read("offsite-watch.service.d/50-offsite-site.conf");
        for line in web1
            .lines()
            .chain(adhoc.lines())
            .filter(|l| l.starts_with("ReadWritePaths=") || l.starts_with("ExecStartPre="))
        {
            assert!(watch.contains(&format!("{line}\n")), "{line} missing from the watcher's drop-in:\n{watch}");
        }
    }

    #[test]
    fn a_restic_repository_store_is_writable_at_its_path_and_a_bucket_needs_none() {
        let sites = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        std::fs::write(sites.path().join("db1.toml"), "store = \"restic:/srv/offsite/repo\"\n").unwrap();
        std::fs::write(sites.path().join("db2.toml"), "store = \"restic:s3://bucket/repo\"\n").unwrap();
        assert!(generate(sites.path(), out.path()).is_empty());
        let read = |p: &str| std::fs::read_to_string(out.path().join(p)).unwrap();
        let db1 = read("offsite@db1.service.d/50-offsite-site.conf");
        assert!(
            db1.contains("ExecStartPre=+/bin/mkdir -p -- /srv/offsite/repo\nReadWritePaths=-/srv/offsite/repo\n"),
            "{db1}"
        );
        let db2 = read("offsite@db2.service.d/50-offsite-site.conf");
        assert!(!db2.contains("ReadWritePaths") && !db2.contains("ExecStartPre"), "{db2}");
    }

    #[test]
    fn a_textfile_directory_is_writable_for_the_site_and_the_watcher() {
        let sites = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        std::fs::write(
            sites.path().join("web1.toml"),
            "store = \"/home/backup/web1\"\n[report]\nprometheus = \"/var/lib/prometheus/node-exporter/web1.prom\"\n",
        )
        .unwrap();
        assert!(generate(sites.path(), out.path()).is_empty());
        let read = |p: &str| std::fs::read_to_string(out.path().join(p)).unwrap();
        for unit in ["offsite@web1.service", "offsite-watch.service"] {
            let text = read(&format!("{unit}.d/50-offsite-site.conf"));
            assert!(text.contains("ReadWritePaths=-/var/lib/prometheus/node-exporter\n"), "{unit}: {text}");
            assert!(text.contains("ReadWritePaths=-/home/backup/web1\n"), "{unit}: {text}");
        }
    }

    #[test]
    fn an_invalid_schedule_leaves_a_timer_systemd_refuses_and_says_why() {
        let sites = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        std::fs::write(sites.path().join("db1.toml"), "store = \"/srv/db1\"\nschedule = \"61 3 * * *\"\n").unwrap();
        std::fs::write(sites.path().join("db2.toml"), "store = \"/srv/db2\"\nschedule = \"0 3 * * 1#2\"\n").unwrap();
        let problems = generate(sites.path(), out.path());
        assert_eq!(problems.len(), 2, "{problems:?}");
        for site in ["db1", "db2"] {
            assert!(
                problems
                    .iter()
                    .any(|p| p
                        .contains(&format!("{site}.toml: invalid `schedule`; offsite@{site}.timer will not start"))),
                "{problems:?}"
            );
            let timer =
                std::fs::read_to_string(out.path().join(format!("offsite@{site}.timer.d/50-offsite-site.conf")))
                    .unwrap();
            // No calendar at all (the template's `daily` is cleared), and
            // the reason where `systemctl status` shows it.
            assert!(timer.ends_with("[Timer]\nOnCalendar=\n"), "{timer}");
            assert!(timer.contains("Description=Offsite schedule of site %i: INVALID schedule in "), "{timer}");
        }
    }

    /// systemd ends a line at a carriage return too: no value with a
    /// control character reaches a unit file, whichever key holds it.
    #[test]
    fn control_characters_in_any_value_write_no_unit() {
        let injected = "\\rExecStartPre=/bin/touch /tmp/pwned";
        let cases = [
            format!("store = \"/srv/a{injected}\"\n"),
            format!("store = \"s3://bucket/a{injected}\"\n"),
            format!("store = \"/srv/a\"\nschedule = \"0 3 * * *{injected}\"\n"),
            format!("store = \"/srv/a\"\nschedule = \"0 3 * * *\"\ntimezone = \"UTC{injected}\"\n"),
            "store = \"/srv/a\\u0085b\"\n".to_string(),
            "store = \"/srv/a\\u000bb\"\n".to_string(),
            format!("store = \"/srv/a\"\n[[copy]]\nstore = \"/mnt/b{injected}\"\n"),
        ];
        for (i, text) in cases.iter().enumerate() {
            let sites = tempfile::tempdir().unwrap();
            let out = tempfile::tempdir().unwrap();
            std::fs::write(sites.path().join("s.toml"), text).unwrap();
            let problems = generate(sites.path(), out.path());
            assert!(problems.len() == 1 && problems[0].contains("control character"), "case {i}: {problems:?}");
            for f in offsite_testkit::tree(out.path()).iter().map(|f| out.path().join(f)).filter(|f| f.is_file()) {
                let unit = std::fs::read_to_string(&f).unwrap();
                assert!(!unit.contains(|c: char| c.is_control() && c != '\n'), "case {i}: {unit:?}");
                assert!(!unit.contains("pwned"), "case {i}: {unit}");
            }
            // And the site itself is refused where `check` reads it.
            if i < 2 {
                let parsed = crate::site::Site::parse(text, &sites.path().join("s.toml"), sites.path());
                assert!(parsed.unwrap_err().to_string().contains("control character"), "case {i}");
            }
        }
        assert_eq!(unit_quote("/a\rb"), "\"/a\\x0db\"");
    }
}
