//! `mysql-pull`: backs up MySQL/MariaDB databases on the site's hosts.
//!
//! One script serves every site; the site's params say what to back up and
//! its grants say what that may touch. Two modes:
//!
//! - **dump** (default): for each `HOST:DB[:TABLE,...]` in `dumps`, runs
//!   `mysqldump` on HOST and streams its output, gzip-compressed on the
//!   runner's side, into the store as `HOST/DB-YYYYMMDD-HHMMSS.sql.gz`.
//!   Hosts are dumped in parallel. A dump counts only if mysqldump exited 0
//!   and its output ends with the `-- Dump completed` trailer.
//! - **command**: for each `HOST:COMMAND:FILE` in `commands`, runs the
//!   existing remote backup program COMMAND (no arguments) on HOST, then
//!   fetches FILE into the store as `HOST/NAME-YYYYMMDD-HHMMSS.EXT`: the
//!   2004 article's `dbbackup.sh` followed by `scp`.
//!
//! Credentials never appear on a command line. Either mysqldump reads them
//! from an option file on the server (the login user's `~/.my.cnf`, or the
//! file named by `defaults_file`), or the site holds the password as a
//! secret named by `password_secret`: the runner then sends mysqldump the
//! option file the site gives for that secret on its stdin (see the README:
//! `stdin = "[client]\npassword=\"{secret}\"\n"`, `programs = ["mysqldump"]`),
//! and the script itself never sees the value or chooses what is sent.
//!
//! The exact argv, for the site's `commands` grant:
//!
//! ```text
//! mysqldump [--defaults-extra-file=FILE | --defaults-extra-file=/dev/stdin] --single-transaction --quick --add-drop-table DB [TABLE...]
//! ```
//!
//! Every host is attempted; the run fails if any of them failed.

use offsite_sdk::params::HostEntry;
use offsite_sdk::secrets::Secret;
use offsite_sdk::ssh::{self, Stream};
use offsite_sdk::{Param, Result, Script, ScriptInfo, bail, clock, info, params, scp};

struct MysqlPull;

/// mysqldump's last line when it finished: `-- Dump completed on ...`.
const TRAILER: &str = "-- Dump completed";

impl Script for MysqlPull {
    fn describe() -> ScriptInfo {
        ScriptInfo::new("mysql-pull", env!("CARGO_PKG_VERSION"))
            .description("MySQL/MariaDB backups over SSH: streamed mysqldump, or a remote backup command plus fetch")
            .param(Param::optional("mode", "dump (mysqldump streamed into the store) or command").default("dump"))
            .param(Param::optional(
                "dumps",
                "dump mode: space-separated HOST:DB[:TABLE,TABLE...] entries; quote a name with a space: \"tbl stats\"",
            ))
            .param(Param::optional(
                "commands",
                "command mode: space-separated HOST:COMMAND:FILE entries (run COMMAND, then fetch FILE)",
            ))
            .param(Param::optional(
                "defaults_file",
                "remote MySQL option file with the credentials (default: the login user's ~/.my.cnf)",
            ))
            .param(Param::optional(
                "password_secret",
                "name of a site secret holding the MySQL password, sent to mysqldump on stdin",
            ))
            .param(Param::optional("stamp", "strftime pattern for file names").default("%Y%m%d-%H%M%S"))
            .capabilities(["ssh", "scp", "secrets", "clock", "params", "log"])
    }

    fn run() -> Result<()> {
        let stamp = clock::now().format(&params::require("stamp")?)?;
        let failures = match params::require("mode")?.as_str() {
            "dump" => dump_all(&stamp)?,
            "command" => command_all(&params::get("commands")?.unwrap_or_default(), &stamp)?,
            other => bail!("unknown mode {other:?}; use dump or command"),
        };
        if !failures.is_empty() {
            bail!("{} backup(s) failed: {}", failures.len(), failures.join("; "));
        }
        Ok(())
    }
}

fn mysqldump_argv(dump: &HostEntry, defaults_file: Option<&str>) -> Vec<String> {
    let mut argv = vec!["mysqldump".to_string()];
    if let Some(file) = defaults_file {
        // mysqldump requires this to be the first option.
        argv.push(format!("--defaults-extra-file={file}"));
    }
    argv.extend(["--single-transaction", "--quick", "--add-drop-table"].map(String::from));
    argv.push(dump.name.clone());
    argv.extend(dump.items.iter().cloned());
    argv
}

/// Starts every dump, then waits for each; returns what failed.
fn dump_all(stamp: &str) -> Result<Vec<String>> {
    let dumps = params::require_host_entries("dumps")?;
    let secret = match params::get("password_secret")? {
        Some(name) => Some(Secret::open(&name)?),
        None => None,
    };
    let defaults_file = match (params::get("defaults_file")?, &secret) {
        (Some(_), Some(_)) => bail!("set defaults_file or password_secret, not both"),
        (file, None) => file,
        (None, Some(_)) => Some("/dev/stdin".to_string()),
    };
    #[cfg(feature = "list-databases")]
    list_databases(&dumps, defaults_file.as_deref())?;
    let stream = Stream::new().gzip().require_tail(TRAILER);
    let mut failures = Vec::new();
    let mut running = Vec::new();
    for dump in &dumps {
        let dest = format!("{}/{}-{stamp}.sql.gz", dump.host, dump.name);
        let argv = mysqldump_argv(dump, defaults_file.as_deref());
        let started = match &secret {
            Some(secret) => ssh::start_exec_to_file_with_secret(&dump.host, &argv, &dest, &stream, secret),
            None => ssh::start_exec_to_file(&dump.host, &argv, &dest, &stream),
        };
        match started {
            Ok(job) => running.push((dump, job)),
            Err(e) => failures.push(report(&dump.host, &dump.name, &e.to_string())),
        }
    }
    for (dump, job) in running {
        match job.wait() {
            Ok(file) => {
                info!("{}: {} → {} ({} bytes, sha256 {})", dump.host, dump.name, file.path, file.bytes, file.sha256)
            }
            Err(e) => failures.push(report(&dump.host, &dump.name, &e.to_string())),
        }
    }
    Ok(failures)
}

/// A later version's extra step (built as the test script
/// `mysql-pull-next`): lists each host's databases first. It needs a
/// `mysql` grant the site may not have, which is what `offsite script
/// update` must notice before the version runs.
#[cfg(feature = "list-databases")]
fn list_databases(dumps: &[HostEntry], defaults_file: Option<&str>) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for dump in dumps.iter().filter(|d| seen.insert(d.host.clone())) {
        let mut argv = vec!["mysql".to_string()];
        if let Some(file) = defaults_file.filter(|f| *f != "/dev/stdin") {
            argv.push(format!("--defaults-extra-file={file}"));
        }
        argv.extend(["-N", "-e", "SHOW DATABASES"].map(String::from));
        let out = ssh::exec(&dump.host, &argv)?;
        info!("{}: {} database(s)", dump.host, out.stdout_text().lines().count());
    }
    Ok(())
}

/// Runs each remote backup command and fetches what it left.
fn command_all(spec: &str, stamp: &str) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    let entries: Vec<&str> = spec.split_whitespace().collect();
    if entries.is_empty() {
        bail!(
            "nothing to back up: set the commands param, e.g. \"server1:/home/backup/dbbackup.sh:/home/backup/userdb.tgz\""
        );
    }
    for entry in entries {
        let parts: Vec<&str> = entry.splitn(3, ':').collect();
        let [host, command, file] = parts[..] else {
            bail!("commands entry {entry:?} must be HOST:COMMAND:FILE");
        };
        if let Err(e) = run_and_fetch(host, command, file, stamp) {
            failures.push(report(host, command, &format!("{e:#}")));
        }
    }
    Ok(failures)
}

fn run_and_fetch(host: &str, command: &str, file: &str, stamp: &str) -> Result<()> {
    let out = ssh::exec(host, &[command])?;
    if !out.success() {
        bail!("{command} exited with status {}: {}", out.status, out.stderr.trim());
    }
    let name = file.rsplit('/').next().unwrap_or(file);
    let (base, ext) = match name.find('.') {
        Some(i) => (&name[..i], &name[i..]),
        None => (name, ""),
    };
    let stored = scp::fetch(host, file, &format!("{host}/{base}-{stamp}{ext}"))?;
    info!("{host}: {file} → {} ({} bytes, sha256 {})", stored.path, stored.bytes, stored.sha256);
    Ok(())
}

/// One failure, for the run's error (which cron mails).
fn report(host: &str, what: &str, why: &str) -> String {
    format!("{host} {what}: {why}")
}

offsite_sdk::script!(MysqlPull);
