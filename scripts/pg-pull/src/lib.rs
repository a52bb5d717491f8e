//! `pg-pull`: backs up PostgreSQL databases on the site's hosts.
//!
//! For each `HOST:DB[:TABLE,...]` in `dumps`, runs `pg_dump` on HOST and
//! streams its plain SQL output, gzip-compressed on the runner's side, into
//! the store as `HOST/DB-YYYYMMDD-HHMMSS.sql.gz`. Hosts are dumped in
//! parallel. A dump counts only if pg_dump exited 0 and its output ends with
//! the `-- PostgreSQL database dump complete` trailer; with tables named, a
//! name that matches no table fails the dump (`--strict-names`).
//!
//! For each HOST in `globals`, also stores what lives outside any database,
//! roles and tablespaces (`pg_dumpall --globals-only`), as
//! `HOST/globals-YYYYMMDD-HHMMSS.sql.gz`, required to end with pg_dumpall's
//! trailer. Role passwords are left out (`--no-role-passwords`), so this
//! needs no superuser; set them again after restoring the roles.
//!
//! Nothing secret is on a command line, and pg_dump never prompts
//! (`--no-password`). The password comes from the login user's `~/.pgpass`
//! on the server (mode 0600), or the login user needs none (peer
//! authentication on the local socket). Where the server listens and as
//! whom to log in can live beside it in `~/.pg_service.conf`: the `service`
//! param names the section.
//!
//! The exact argv, for the site's `commands` grant:
//!
//! ```text
//! pg_dump --no-password --strict-names --dbname=DB [--table=TABLE...]
//! pg_dump --no-password --strict-names "--dbname=service=SERVICE dbname=DB" [--table=TABLE...]
//! pg_dumpall --no-password --globals-only --no-role-passwords [--dbname=service=SERVICE]
//! ```
//!
//! Restore one with `createdb NEW && gunzip -c FILE | psql -v ON_ERROR_STOP=1 NEW`.
//! Every host is attempted; the run fails if any of them failed.

use offsite_sdk::params::HostEntry;
use offsite_sdk::ssh::{self, Stream};
use offsite_sdk::{Param, Result, Script, ScriptInfo, bail, clock, info, params};

struct PgPull;

/// pg_dump's closing comment in plain format.
const TRAILER: &str = "-- PostgreSQL database dump complete";
/// pg_dumpall's.
const CLUSTER_TRAILER: &str = "-- PostgreSQL database cluster dump complete";

impl Script for PgPull {
    fn describe() -> ScriptInfo {
        ScriptInfo::new("pg-pull", env!("CARGO_PKG_VERSION"))
            .description("PostgreSQL backups over SSH: pg_dump streamed into the store, gzip-compressed")
            .param(Param::required(
                "dumps",
                "space-separated HOST:DB[:TABLE,TABLE...] entries; quote a name with a space: \"tbl stats\"",
            ))
            .param(Param::optional(
                "globals",
                "space-separated HOSTs whose roles and tablespaces to store too (without role passwords)",
            ))
            .param(Param::optional(
                "service",
                "section of the login user's ~/.pg_service.conf on each server (host, port, user)",
            ))
            .param(Param::optional("stamp", "strftime pattern for file names").default("%Y%m%d-%H%M%S"))
            .capabilities(["ssh", "clock", "params", "log"])
    }

    fn run() -> Result<()> {
        let stamp = clock::now().format(&params::require("stamp")?)?;
        let dumps = params::require_host_entries("dumps")?;
        let service = params::get("service")?;
        let globals = params::get("globals")?.unwrap_or_default();
        // (host, what, argv, dest, trailer) for every dump to take.
        let mut jobs = Vec::new();
        for dump in &dumps {
            let dest = format!("{}/{}-{stamp}.sql.gz", dump.host, dump.name);
            jobs.push((&*dump.host, &*dump.name, pg_dump_argv(dump, service.as_deref()), dest, TRAILER));
        }
        for host in globals.split_whitespace() {
            let dest = format!("{host}/globals-{stamp}.sql.gz");
            jobs.push((host, "globals", pg_dumpall_argv(service.as_deref()), dest, CLUSTER_TRAILER));
        }
        let mut failures = Vec::new();
        let mut running = Vec::new();
        for (host, what, argv, dest, trailer) in &jobs {
            let stream = Stream::new().gzip().require_tail(trailer);
            match ssh::start_exec_to_file(host, argv, dest, &stream) {
                Ok(job) => running.push((host, what, job)),
                Err(e) => failures.push(format!("{host} {what}: {e}")),
            }
        }
        for (host, what, job) in running {
            match job.wait() {
                Ok(file) => info!("{host}: {what} → {} ({} bytes, sha256 {})", file.path, file.bytes, file.sha256),
                Err(e) => failures.push(format!("{host} {what}: {e}")),
            }
        }
        if !failures.is_empty() {
            bail!("{} backup(s) failed: {}", failures.len(), failures.join("; "));
        }
        Ok(())
    }
}

fn pg_dump_argv(dump: &HostEntry, service: Option<&str>) -> Vec<String> {
    let mut argv: Vec<String> = ["pg_dump", "--no-password", "--strict-names"].map(String::from).into();
    argv.push(match service {
        // A connection string: libpq reads the rest from the service file.
        Some(service) => format!("--dbname=service={} dbname={}", conninfo_value(service), conninfo_value(&dump.name)),
        // A plain name is only ever a database name (a string with `=` in
        // it would be read as a connection string), so quote that case too.
        None if dump.name.contains('=') => format!("--dbname=dbname={}", conninfo_value(&dump.name)),
        None => format!("--dbname={}", dump.name),
    });
    argv.extend(dump.items.iter().map(|t| format!("--table={t}")));
    argv
}

fn pg_dumpall_argv(service: Option<&str>) -> Vec<String> {
    let mut argv: Vec<String> =
        ["pg_dumpall", "--no-password", "--globals-only", "--no-role-passwords"].map(String::from).into();
    if let Some(service) = service {
        argv.push(format!("--dbname=service={}", conninfo_value(service)));
    }
    argv
}

/// A value in a libpq connection string: bare when that is unambiguous,
/// otherwise single-quoted with `\` and `'` escaped.
fn conninfo_value(v: &str) -> String {
    if !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || "_-.$".contains(c)) {
        return v.to_string();
    }
    let mut out = String::from("'");
    for c in v.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

offsite_sdk::script!(PgPull);
