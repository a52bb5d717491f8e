//! `verify --restore-test` for PostgreSQL dumps (`pg_dump`'s plain SQL):
//! creates the scratch database, loads the dump with `psql` in one
//! transaction that stops at the first error, checks that every table holds
//! as many rows as the dump's `COPY` data carries, and drops the database.
//!
//! The scratch database must not exist: it is created for the test and
//! dropped afterwards, so nothing is ever loaded over data. `\connect` and
//! `CREATE DATABASE` lines (from `pg_dump --create`) are left out, so a dump
//! can never load into the database it came from. Connection settings and
//! the password come the libpq way (`PGHOST`, `PGUSER`, `PGSERVICE`,
//! `~/.pgpass`), never from the command line; psql never prompts. The dump
//! is streamed line by line.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::Command;

/// pg_dump's first comment in plain format.
pub const HEADER: &[u8] = b"-- PostgreSQL database dump";
/// pg_dumpall's: roles and tablespaces, which a test must not load into a
/// server's shared namespace.
pub const CLUSTER_HEADER: &[u8] = b"-- PostgreSQL database cluster dump";

/// The psql client, quiet, stopping at the first error, never prompting.
fn psql(database: &str) -> Command {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-q", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-d"]).arg(format!("dbname={database}"));
    cmd
}

/// Runs SQL in the maintenance database `postgres`; returns its output.
fn admin(sql: &str) -> Result<String, String> {
    query("postgres", sql)
}

fn query(database: &str, sql: &str) -> Result<String, String> {
    let mut client = psql(database);
    client.args(["-c", sql]);
    super::client::output(client, "the PostgreSQL client psql")
}

/// Loads the plain-SQL dump `reader` yields into the scratch database
/// `database` (a plain name, checked by the caller) and compares row counts.
pub fn restore_test(reader: Box<dyn BufRead + '_>, database: &str) -> Result<(usize, u64), String> {
    require_restricted_mode()?;
    let exists = admin(&format!("SELECT count(*) FROM pg_database WHERE datname = '{database}'"))?;
    if exists.trim() != "0" {
        return Err(format!(
            "the scratch database {database} exists; name one that does not (it is created for the test and dropped)"
        ));
    }
    admin(&format!("CREATE DATABASE \"{database}\""))?;
    let result = load_and_count(reader, database);
    let dropped = admin(&format!("DROP DATABASE \"{database}\""));
    let counts = result?;
    dropped.map_err(|e| format!("loaded and checked, but dropping the scratch database failed: {e}"))?;
    Ok((counts.len(), counts.values().sum()))
}

/// `restore --into-database`: loads the dump into `database` (a plain
/// name, checked by the caller) in one transaction and checks its row
/// counts, keeping it. A database that holds tables or views is refused
/// unless `force`. A failed load, or a stored file that does not match
/// its manifest (the reader fails at its end, before psql may commit),
/// leaves an existing database as it was and drops one created here.
pub fn load_into(reader: Box<dyn BufRead + '_>, database: &str, force: bool) -> Result<(usize, u64), String> {
    require_restricted_mode()?;
    let exists = admin(&format!("SELECT count(*) FROM pg_database WHERE datname = '{database}'"))?;
    let existed = exists.trim() != "0";
    if existed {
        let objects = query(
            database,
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
             AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
        )?;
        if objects.trim() != "0" && !force {
            return Err(format!(
                "the database {database} is not empty ({} tables or views); --force loads over it",
                objects.trim()
            ));
        }
    } else {
        admin(&format!("CREATE DATABASE \"{database}\""))?;
    }
    let loaded = load(reader, database).map_err(|e| (e, true));
    let checked = loaded.and_then(|counts| compare(database, &counts).map(|()| counts).map_err(|e| (e, false)));
    match checked {
        Ok(counts) => Ok((counts.len(), counts.values().sum())),
        Err((e, _)) if !existed => {
            let dropped = admin(&format!("DROP DATABASE \"{database}\""));
            Err(match dropped {
                Ok(_) => format!("{e}; the database {database} this created was dropped again"),
                Err(d) => format!("{e}; dropping the database {database} this created failed too: {d}"),
            })
        }
        Err((e, true)) => Err(format!("{e}; the load was one transaction, rolled back: {database} is as it was")),
        Err((e, false)) => Err(format!("loaded into {database}, but {e}")),
    }
}

fn load_and_count(reader: Box<dyn BufRead + '_>, database: &str) -> Result<BTreeMap<String, u64>, String> {
    let counts = load(reader, database)?;
    compare(database, &counts)?;
    Ok(counts)
}

/// Streams the dump into psql in one transaction, counting each table's
/// `COPY` rows on the way.
fn load(reader: Box<dyn BufRead + '_>, database: &str) -> Result<BTreeMap<String, u64>, String> {
    let mut client = psql(database);
    client.arg("--single-transaction");
    let mut counter = CopyCounter::default();
    // psql runs meta-commands anywhere in its input (`\!`, `\o |cmd`,
    // `\copy ... program`), even mid-line, so no line filter can keep them
    // out. Restricted mode can: after `\restrict KEY` psql refuses every
    // meta-command but `\unrestrict KEY`, and the key is random and never
    // in the dump. The dump's own \restrict / \unrestrict lines (pg_dump
    // writes them too) are left out.
    let first = format!("\\restrict {}\n", restrict_key());
    super::client::load_lines(client, "the PostgreSQL client psql", first.as_bytes(), reader, |line| {
        if !counter.in_copy()
            && (selects_database(line) || line.starts_with(b"\\restrict ") || line.starts_with(b"\\unrestrict "))
        {
            return false;
        }
        counter.feed(line);
        true
    })?;
    if counter.counts.is_empty() {
        return Err("the dump creates no tables".into());
    }
    Ok(counter.counts)
}

/// Compares the tables' row counts with the dump's.
fn compare(database: &str, counts: &BTreeMap<String, u64>) -> Result<(), String> {
    let mut mismatches = Vec::new();
    for (table, rows) in counts {
        // `table` is the name exactly as pg_dump wrote it: qualified and
        // quoted where needed, so it is valid SQL as it stands.
        let loaded = query(database, &format!("SELECT count(*) FROM {table}"))?;
        if loaded.trim().parse::<u64>().ok() != Some(*rows) {
            mismatches.push(format!("{table}: {rows} rows in the dump, {} loaded", loaded.trim()));
        }
    }
    if !mismatches.is_empty() {
        return Err(format!("row counts differ: {}", mismatches.join("; ")));
    }
    Ok(())
}

/// A key for `\restrict`: 32 random hex digits.
fn restrict_key() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    hex::encode(bytes)
}

/// Refuses a psql without `\restrict` (before 17.6, 16.10, 15.14, 14.19 and
/// 13.22): it would run whatever meta-commands a dump holds.
fn require_restricted_mode() -> Result<(), String> {
    let out = Command::new("psql")
        .arg("--help=commands")
        .output()
        .map_err(|e| format!("cannot run the PostgreSQL client psql: {e}"))?;
    if String::from_utf8_lossy(&out.stdout).contains("\\restrict") {
        Ok(())
    } else {
        Err("this psql has no \\restrict, so a dump could run client commands on this machine; install a \
             PostgreSQL client of 17.6, 16.10, 15.14, 14.19 or 13.22 or later"
            .into())
    }
}

/// `\connect ...` and `CREATE DATABASE ...` lines.
fn selects_database(line: &[u8]) -> bool {
    line.starts_with(b"\\connect ") || line.starts_with(b"CREATE DATABASE ")
}

/// Counts the rows of each table's `COPY name (cols) FROM stdin;` block (one
/// row per line up to `\.`), and notes tables from `CREATE TABLE` that
/// have none.
#[derive(Debug, Default)]
pub struct CopyCounter {
    pub counts: BTreeMap<String, u64>,
    copying: Option<String>,
}

impl CopyCounter {
    fn in_copy(&self) -> bool {
        self.copying.is_some()
    }

    pub fn feed(&mut self, line: &[u8]) {
        if let Some(table) = &self.copying {
            if line == b"\\.\n" || line == b"\\." {
                self.copying = None;
            } else {
                *self.counts.entry(table.clone()).or_insert(0) += 1;
            }
            return;
        }
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end();
        if let Some(rest) = text.strip_prefix("CREATE TABLE ") {
            // `CREATE TABLE public.t (` ; a partition's parent is a table too.
            if let Some(name) = rest.strip_suffix(" (") {
                self.counts.entry(name.to_string()).or_insert(0);
            }
        } else if let Some(rest) = text.strip_prefix("COPY ")
            && let Some(head) = rest.strip_suffix(" FROM stdin;")
        {
            let name = leading_name(head);
            self.counts.entry(name.to_string()).or_insert(0);
            self.copying = Some(name.to_string());
        }
    }
}

/// The (possibly qualified, possibly quoted) name at the start of `s`: up
/// to the first space outside double quotes (`""` inside quotes is a quote).
fn leading_name(s: &str) -> &str {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            // A doubled quote inside quotes toggles twice: no change.
            '"' => quoted = !quoted,
            ' ' if !quoted => return &s[..i],
            _ => {}
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_are_counted_and_empty_tables_kept() {
        let mut c = CopyCounter::default();
        for line in [
            "CREATE TABLE public.empty (\n",
            "    id integer\n",
            ");\n",
            "CREATE TABLE public.\"Weird (name)\" (\n",
            "COPY public.books (id, title) FROM stdin;\n",
            "1\tit's\n",
            "2\t\\\\.\n",
            "3\tCOPY x FROM stdin;\n",
            "\\.\n",
            "COPY public.\"Weird (name)\" (a) FROM stdin;\n",
            "x\n",
            "\\.\n",
            "COPY \"a \"\" b\".t FROM stdin;\n",
            "x\n",
            "\\.\n",
            "-- COPY public.nope (a) FROM stdin;\n",
        ] {
            c.feed(line.as_bytes());
        }
        let expected: BTreeMap<String, u64> =
            [("\"a \"\" b\".t", 1), ("public.books", 3), ("public.empty", 0), ("public.\"Weird (name)\"", 1)]
                .iter()
                .map(|(t, n)| (t.to_string(), *n))
                .collect();
        assert_eq!(c.counts, expected);
        assert!(selects_database(b"\\connect sitedb\n"));
        assert!(!c.in_copy());
    }
}
