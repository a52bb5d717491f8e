//! `verify --restore-test` for MySQL/MariaDB: loads each dump into a scratch
//! database and checks that the load succeeds and that every table holds
//! as many rows as the dump's INSERT statements carry.
//!
//! The scratch database must be missing or empty: we never load over data.
//! A database we created is dropped afterwards; one that existed (empty)
//! gets the dump's tables dropped again. `USE` and `CREATE DATABASE` lines
//! (from `mysqldump --databases`) are left out, so a dump can never load
//! into the database it came from. Credentials come from a defaults file,
//! never from the command line. The dump is streamed line by line.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A database dumps are loaded into: the scratch database of a restore
/// test, or the one `restore --into-database` names.
#[derive(Debug, Clone)]
pub struct Database {
    pub database: String,
    /// `--defaults-file` for the mysql client (else its usual option files).
    pub defaults_file: Option<PathBuf>,
}

impl Database {
    pub fn new(database: &str, defaults_file: Option<PathBuf>) -> Result<Database, String> {
        if database.is_empty()
            || database.len() > 64
            || !database.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(format!("database name {database:?}: use letters, digits and `_` only"));
        }
        Ok(Database { database: database.to_string(), defaults_file })
    }

    fn client(&self) -> Command {
        let mut cmd = Command::new("mysql");
        if let Some(f) = &self.defaults_file {
            cmd.arg(format!("--defaults-file={}", f.display()));
        }
        // The dump is data: --sandbox refuses the client commands that
        // reach the file system or a shell (`system`, `\!`, `source`, `tee`),
        // --binary-mode stops the parsing of client commands altogether,
        // and --local-infile=0 keeps LOAD DATA LOCAL from reading our files.
        cmd.args(["--batch", "--skip-column-names", "--sandbox", "--binary-mode", "--local-infile=0"]);
        cmd
    }

    /// How many tables the database holds; `None` when it does not exist.
    fn tables(&self) -> Result<Option<u64>, String> {
        let db = &self.database;
        let exists =
            self.query(&format!("SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = '{db}'"))?;
        if exists.trim() == "0" {
            return Ok(None);
        }
        let tables =
            self.query(&format!("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = '{db}'"))?;
        tables
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("the mysql client answered {:?} for a count", tables.trim()))
    }

    /// Runs one statement; returns its output.
    fn query(&self, sql: &str) -> Result<String, String> {
        let mut client = self.client();
        client.args(["-e", sql]);
        super::client::output(client, "the mysql client")
    }
}

/// Loads the dump `reader` yields (plain SQL, named `rel`) and compares row
/// counts.
pub fn restore_test(reader: Box<dyn BufRead + '_>, rel: &Path, scratch: &Database) -> Result<String, String> {
    let db = &scratch.database;
    let tables = scratch.tables()?;
    let existed = tables.is_some();
    match tables {
        Some(0) => {}
        Some(_) => {
            return Err(format!("the scratch database {db} is not empty; refusing to load a dump over its tables"));
        }
        None => drop(scratch.query(&format!("CREATE DATABASE `{db}`"))?),
    }
    let result = load_and_count(reader, scratch);
    let cleanup = match (&result, existed) {
        (_, false) => scratch.query(&format!("DROP DATABASE `{db}`")).map(drop),
        (Ok(counts), true) => {
            let tables: Vec<String> = counts.keys().map(|t| format!("`{db}`.{}", quote_ident(t))).collect();
            if tables.is_empty() {
                Ok(())
            } else {
                scratch.query(&format!("DROP TABLE IF EXISTS {}", tables.join(", "))).map(drop)
            }
        }
        (Err(_), true) => Ok(()),
    };
    let counts = result?;
    cleanup.map_err(|e| format!("loaded and checked, but cleaning up the scratch database failed: {e}"))?;
    let rows: u64 = counts.values().sum();
    Ok(format!("{}: restore test ok ({} tables, {rows} rows)", rel.display(), counts.len()))
}

/// `restore --into-database`: loads the dump into `target` and checks its
/// row counts, keeping it. A database that holds tables is refused unless
/// `force`. A database created here is dropped again when the load fails
/// or the stored file does not match its manifest (the reader fails at its
/// end then); MySQL cannot roll back tables, so a load over an existing
/// database that fails says the database may hold part of the dump.
pub fn load_into(reader: Box<dyn BufRead + '_>, target: &Database, force: bool) -> Result<(usize, u64), String> {
    let db = &target.database;
    let tables = target.tables()?;
    let existed = tables.is_some();
    match tables {
        Some(n) if n > 0 && !force => {
            return Err(format!("the database {db} is not empty ({n} tables); --force loads over it"));
        }
        Some(_) => {}
        None => drop(target.query(&format!("CREATE DATABASE `{db}`"))?),
    }
    match load_and_count(reader, target) {
        Ok(counts) => Ok((counts.len(), counts.values().sum())),
        Err(e) if !existed => {
            let dropped = target.query(&format!("DROP DATABASE `{db}`"));
            Err(match dropped {
                Ok(_) => format!("{e}; the database {db} this created was dropped again"),
                Err(d) => format!("{e}; dropping the database {db} this created failed too: {d}"),
            })
        }
        Err(e) => Err(format!("{e}; the database {db} may hold part of the dump")),
    }
}

/// Streams the dump into the client, counting rows per table on the way;
/// then compares with `COUNT(*)` in the scratch database.
fn load_and_count(reader: Box<dyn BufRead + '_>, scratch: &Database) -> Result<BTreeMap<String, u64>, String> {
    let mut client = scratch.client();
    client.arg(&scratch.database);
    let mut counter = InsertCounter::default();
    super::client::load_lines(client, "the mysql client", b"", reader, |line| {
        if selects_database(line) {
            return false;
        }
        counter.feed(line);
        true
    })?;
    let counts = counter.counts;
    if counts.is_empty() {
        return Err("the dump creates no tables".into());
    }
    let query: Vec<String> = counts
        .keys()
        .map(|t| {
            format!(
                "SELECT '{}', COUNT(*) FROM `{}`.{}",
                t.replace('\\', "\\\\").replace('\'', "\\'"),
                scratch.database,
                quote_ident(t)
            )
        })
        .collect();
    let out = scratch.query(&query.join(" UNION ALL "))?;
    let loaded: BTreeMap<String, u64> = out
        .lines()
        .filter_map(|l| l.rsplit_once('\t'))
        .filter_map(|(t, n)| Some((t.to_string(), n.parse().ok()?)))
        .collect();
    let mismatches: Vec<String> = counts
        .iter()
        .filter(|(t, n)| loaded.get(*t) != Some(n))
        .map(|(t, n)| {
            format!("{t}: {n} rows in the dump, {} loaded", loaded.get(t).map_or("?".into(), |l| l.to_string()))
        })
        .collect();
    if !mismatches.is_empty() {
        return Err(format!("row counts differ: {}", mismatches.join("; ")));
    }
    Ok(counts)
}

fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// `USE ...;` and `CREATE DATABASE ...;` lines.
fn selects_database(line: &[u8]) -> bool {
    line.starts_with(b"USE ") || line.starts_with(b"CREATE DATABASE ")
}

/// A backquoted name at the start of `s`; returns it and the rest.
fn ident(s: &[u8]) -> Option<(String, &[u8])> {
    let s = s.strip_prefix(b"`")?;
    let mut name = Vec::new();
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'`' {
            if s.get(i + 1) == Some(&b'`') {
                name.push(b'`');
                i += 2;
                continue;
            }
            return Some((String::from_utf8_lossy(&name).into_owned(), &s[i + 1..]));
        }
        name.push(s[i]);
        i += 1;
    }
    None
}

/// `CREATE TABLE `t` (`: the table's name.
fn created_table(line: &[u8]) -> Option<String> {
    let rest = line.strip_prefix(b"CREATE TABLE ")?;
    let rest = rest.strip_prefix(b"IF NOT EXISTS ").unwrap_or(rest);
    ident(rest).map(|(name, _)| name)
}

/// Counts the rows of `INSERT INTO `t` [(cols)] VALUES (...),(...);`
/// statements, fed line by line: a statement may span lines (MariaDB's
/// mysqldump puts each row on its own line). Rows are the top-level tuples;
/// quotes and backslash escapes inside values are skipped.
#[derive(Debug, Default)]
pub struct InsertCounter {
    pub counts: BTreeMap<String, u64>,
    current: Option<Insert>,
}

#[derive(Debug)]
struct Insert {
    table: String,
    in_values: bool,
    depth: u32,
    in_string: bool,
    escaped: bool,
}

impl InsertCounter {
    pub fn feed(&mut self, line: &[u8]) {
        let mut rest = line;
        if self.current.is_none() {
            if let Some(table) = created_table(line) {
                self.counts.entry(table).or_insert(0);
                return;
            }
            let Some(after) = line.strip_prefix(b"INSERT INTO ") else { return };
            let Some((table, after)) = ident(after) else { return };
            self.counts.entry(table.clone()).or_insert(0);
            self.current = Some(Insert { table, in_values: false, depth: 0, in_string: false, escaped: false });
            rest = after;
        }
        let Some(ins) = self.current.as_mut() else { return };
        if !ins.in_values {
            let Some(at) = rest.windows(6).position(|w| w == b"VALUES") else { return };
            ins.in_values = true;
            rest = &rest[at + 6..];
        }
        for &b in rest {
            if ins.in_string {
                match b {
                    _ if ins.escaped => ins.escaped = false,
                    b'\\' => ins.escaped = true,
                    b'\'' => ins.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'\'' => ins.in_string = true,
                b'(' => {
                    if ins.depth == 0 {
                        *self.counts.entry(ins.table.clone()).or_insert(0) += 1;
                    }
                    ins.depth += 1;
                }
                b')' => ins.depth = ins.depth.saturating_sub(1),
                b';' if ins.depth == 0 => {
                    self.current = None;
                    return;
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_counted_past_quotes_escapes_and_parentheses() {
        let mut c = InsertCounter::default();
        c.feed(b"CREATE TABLE `empty` (\n");
        c.feed(b"  `a` int(11) DEFAULT NULL\n");
        c.feed(br"INSERT INTO `books` VALUES (1,'a (b); c',NULL),(2,'it\'s (',0x28),(3,'\\',')');");
        c.feed(b"INSERT INTO `we``ird` (`a`, `b`) VALUES (1,2);\n");
        c.feed(b"-- INSERT INTO `x` VALUES (1);\n");
        // MariaDB's layout: one row per line.
        c.feed(b"INSERT INTO `rows` VALUES\n");
        c.feed(b"(1,'x'),\n");
        c.feed(b"(2,'y;'),\n");
        c.feed(b"(3,'z');\n");
        c.feed(b"UNLOCK TABLES;\n");
        let expected: BTreeMap<String, u64> =
            [("books", 3), ("empty", 0), ("rows", 3), ("we`ird", 1)].iter().map(|(t, n)| (t.to_string(), *n)).collect();
        assert_eq!(c.counts, expected);
        assert!(selects_database(b"USE `sitedb`;\n"));
    }

    #[test]
    fn scratch_names_are_plain() {
        assert!(Database::new("restore_test", None).is_ok());
        assert!(Database::new("x`; DROP DATABASE y", None).is_err());
        assert!(Database::new("", None).is_err());
    }
}
