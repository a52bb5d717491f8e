//! `offsite verify`: reads a store back and checks it against its
//! manifests. Every file a manifest lists is re-hashed; gzip files are
//! decompressed whole (which checks every member's CRC and length); tar
//! archives are listed entry by entry. Files that are missing, corrupt or
//! that no manifest lists are reported.
//!
//! When several manifests list the same path (a script that rewrites a
//! fixed name), the newest one owns it: older entries were superseded.

pub mod client;
pub mod mysql;
pub mod postgres;
pub mod tar_walk;

use std::collections::BTreeMap;
use std::io::{self, BufRead, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::store::{META_DIR, Manifest, Root, StoredFile, protect};

/// What to check beyond hashes and formats.
#[derive(Default)]
pub struct Options {
    /// Load SQL dumps into this scratch database and compare row counts.
    pub restore_test: Option<mysql::Database>,
    /// Every manifest must carry a signature by this key.
    pub verify_key: Option<ssh_key::PublicKey>,
    /// Decrypt `.age` files with these, to check their contents too.
    pub identities: Vec<Box<dyn age::Identity>>,
    /// Read only these files whole (and every file of the newest run
    /// that has files);
    /// of the others, only that they are there with their size.
    pub subset: Option<Subset>,
}

/// Which stored files a `verify --read-data-subset` reads whole.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Subset {
    /// Part `n` of `of` (from 1), by a hash of each file's path: the
    /// parts of `1/of` to `of/of` together are every file, whatever
    /// runs were added in between.
    Part { n: u64, of: u64 },
    /// About this percentage, chosen anew each time.
    Percent(f64),
}

impl std::str::FromStr for Subset {
    type Err = String;

    fn from_str(s: &str) -> Result<Subset, String> {
        let bad = || format!("{s:?}: give n/t (part n of t, as 1/5) or a percentage (as 10%)");
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            return if p > 0.0 && p <= 100.0 { Ok(Subset::Percent(p)) } else { Err(bad()) };
        }
        let (n, of) = s.split_once('/').ok_or_else(bad)?;
        let (n, of): (u64, u64) = (n.trim().parse().map_err(|_| bad())?, of.trim().parse().map_err(|_| bad())?);
        if n == 0 || n > of {
            return Err(bad());
        }
        Ok(Subset::Part { n, of })
    }
}

impl std::fmt::Display for Subset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subset::Part { n, of } => write!(f, "{n}/{of}"),
            Subset::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Subset {
    /// Whether the file at `location` is read whole.
    fn takes(&self, location: &Path) -> bool {
        match *self {
            Subset::Part { n, of } => {
                let digest = Sha256::digest(location.as_os_str().as_encoded_bytes());
                let h = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
                h % of == n - 1
            }
            Subset::Percent(p) => {
                let mut r = [0u8; 8];
                if getrandom::fill(&mut r).is_err() {
                    return true;
                }
                (u64::from_le_bytes(r) % 1_000_000) as f64 / 10_000.0 < p
            }
        }
    }
}

/// The outcome: problems make `verify` exit non-zero.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    /// One line per file checked, for `-v`.
    pub checked: Vec<String>,
    pub files: usize,
    /// Of those, how many were not read whole (`--read-data-subset`).
    pub not_read: usize,
    pub runs: usize,
    /// The newest run the store has a manifest of.
    pub newest: Option<String>,
}

/// Checks the store at `root`. Objects in an S3 store are checked as they
/// download, the same way as files (nothing is written to disk, so a
/// runner with little room can verify any size of object): the server's
/// own checksums are not relied on, since not every server keeps a
/// SHA-256.
pub fn verify(root: &Root, options: &Options) -> io::Result<Report> {
    let mut report = Report::default();
    let (manifests, bad) = root.manifests()?;
    for b in bad {
        report.problems.push(format!("{META_DIR}/manifests/{}: cannot be read: {}", b.name, b.error));
    }
    report.runs = manifests.len();
    report.newest = manifests.iter().map(|m| m.run.run_id.clone()).max();
    if let Some(key) = &options.verify_key {
        for m in &manifests {
            let name = format!("{META_DIR}/manifests/{}.json", m.run.run_id);
            match root.manifest_bytes(&m.run.run_id) {
                Ok((_, None)) => report.problems.push(format!("{name}: unsigned, but signatures are required")),
                Ok((json, Some(sig))) => match protect::verify(key, &json, &sig) {
                    Ok(()) => report.checked.push(format!("{name}: signature ok")),
                    Err(e) => report.problems.push(format!("{name}: {e}")),
                },
                Err(e) => report.problems.push(format!("{name}: cannot be read: {e}")),
            }
        }
    }
    // The newest manifest listing a location owns it.
    let mut owners: BTreeMap<PathBuf, (&Manifest, &StoredFile)> = BTreeMap::new();
    for m in &manifests {
        for f in &m.files {
            owners.insert(m.location(f), (m, f));
        }
    }
    let source = Source(root);
    // A subset always reads the newest run that stored files.
    let newest_with_files = owners.values().map(|(m, _)| m.run.run_id.as_str()).max();
    for (location, (m, f)) in &owners {
        if let Some(r) = &f.replaces {
            report.checked.push(format!(
                "{}: run {} replaced the file of the same name from run {} (sha256 {})",
                location.display(),
                m.run.run_id,
                r.run,
                r.sha256
            ));
        }
        report.files += 1;
        if let Some(subset) = options.subset
            && newest_with_files != Some(m.run.run_id.as_str())
            && !subset.takes(location)
        {
            report.not_read += 1;
            match source.size(location) {
                Ok(size) if size == f.bytes => report.checked.push(format!(
                    "{}: there, {size} bytes (not read: --read-data-subset {subset})",
                    location.display()
                )),
                Ok(size) => report.problems.push(format!(
                    "{}: corrupt: {size} bytes, the manifest says {} (run {}, status {})",
                    location.display(),
                    f.bytes,
                    m.run.run_id,
                    m.status
                )),
                Err(e) => report.problems.push(format!(
                    "{}: {e} (run {}, status {})",
                    location.display(),
                    m.run.run_id,
                    m.status
                )),
            }
            continue;
        }
        match check_file(&source, location, f, &options.identities) {
            Ok(line) => {
                report.checked.push(line);
                let plain_name = plain_name(location);
                let readable = !is_encrypted(location) || !options.identities.is_empty();
                if let Some(scratch) = &options.restore_test
                    && m.published().any(|p| std::ptr::eq(p, *f))
                    && readable
                    && is_dump(&plain_name)
                {
                    let opened = open_plain(&source, location, &options.identities);
                    match opened.and_then(|r| restore_test(r, &plain_name, Engine::of(f), scratch)) {
                        Ok(line) => report.checked.push(line),
                        Err(e) => report.problems.push(format!("{}: restore test failed: {e}", location.display())),
                    }
                }
            }
            Err(e) => {
                report.problems.push(format!("{}: {e} (run {}, status {})", location.display(), m.run.run_id, m.status))
            }
        }
    }
    let found = root.unlisted(&|rel| owners.contains_key(rel))?;
    report.problems.extend(found.problems);
    report.checked.extend(found.notes);
    Ok(report)
}

/// Where the stored files are read from: the store, with the report's
/// words for what went wrong.
struct Source<'a>(&'a Root);

impl<'a> Source<'a> {
    fn open(&self, rel: &Path) -> Result<(u64, Box<dyn Read + 'a>), String> {
        self.0.open_file(rel).map_err(|e| Self::why(&e))
    }

    fn size(&self, rel: &Path) -> Result<u64, String> {
        self.0.file_size(rel).map_err(|e| Self::why(&e))
    }

    fn why(e: &io::Error) -> String {
        match e.kind() {
            io::ErrorKind::NotFound => "missing".to_string(),
            io::ErrorKind::InvalidData => format!("corrupt: {e}"),
            _ => format!("cannot be read: {e}"),
        }
    }
}

fn is_encrypted(path: &Path) -> bool {
    path.to_string_lossy().ends_with(protect::AGE_SUFFIX)
}

/// A file the restore test loads: `.sql` or `.sql.gz`.
fn is_dump(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    name.ends_with(".sql") || name.ends_with(".sql.gz")
}

/// Which database tool made a stored file, as its manifest says: the
/// program of the remote command it was streamed from. Only such files are
/// loaded; a `.sql` name alone proves nothing (any script can store bytes
/// under one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Mysql,
    Postgres,
    /// pg_dumpall: roles and tablespaces, never loaded.
    PostgresCluster,
}

impl Engine {
    pub fn of(f: &crate::store::StoredFile) -> Option<Engine> {
        if f.origin.call != "ssh.exec-to-file" || f.origin.exit_status != Some(0) {
            return None;
        }
        let remote = f.origin.remote.as_deref()?;
        let program = remote.split(' ').next()?.rsplit('/').next()?;
        match program {
            "mysqldump" | "mariadb-dump" => Some(Engine::Mysql),
            "pg_dump" => Some(Engine::Postgres),
            "pg_dumpall" => Some(Engine::PostgresCluster),
            _ => None,
        }
    }
}

/// Loads one dump (`rel`; `.gz` is decompressed on the way) made by
/// `engine` into the scratch database and compares row counts. The clients
/// run in modes where nothing in the dump can reach the storage box: the
/// dump is data from a server that may be compromised, and the mysql and
/// psql clients run commands (`\!`, `system`, `\copy ... program`) found in
/// their input.
fn restore_test(
    file: Box<dyn Read + '_>,
    rel: &Path,
    engine: Option<Engine>,
    scratch: &mysql::Database,
) -> Result<String, String> {
    let Some(engine) = engine else {
        return Ok(format!("{}: not loaded: its manifest does not say mysqldump or pg_dump made it", rel.display()));
    };
    if engine == Engine::PostgresCluster {
        return Ok(format!("{}: not loaded: a PostgreSQL cluster-wide dump (roles, tablespaces)", rel.display()));
    }
    let reader = dump_reader(file, rel, engine)?;
    match engine {
        Engine::Postgres | Engine::PostgresCluster => {
            let (tables, rows) = postgres::restore_test(reader, &scratch.database)?;
            Ok(format!("{}: restore test ok ({tables} tables, {rows} rows; PostgreSQL)", rel.display()))
        }
        Engine::Mysql => mysql::restore_test(reader, rel, scratch),
    }
}

/// `restore --into-database`: loads one dump (named `rel`, made by
/// `engine` as its manifest says) into `target`, kept, with the same
/// client modes as the restore test. `file` must fail at its end when the
/// stored bytes do not match the manifest: the load is stopped then.
pub fn load_into(
    file: Box<dyn Read + '_>,
    rel: &Path,
    engine: Option<Engine>,
    target: &mysql::Database,
    force: bool,
) -> Result<String, String> {
    let db = &target.database;
    let reader = match engine {
        None => {
            return Err("its manifest does not say mysqldump or pg_dump made it, so it is not loaded; `offsite cat` \
                        writes it for loading by hand"
                .into());
        }
        Some(Engine::PostgresCluster) => {
            return Err("a pg_dumpall dump (roles, tablespaces, every database) is not loaded into one database; \
                        `offsite cat` writes it for psql"
                .into());
        }
        Some(engine) => dump_reader(file, rel, engine)?,
    };
    let (tables, rows, kind) = match engine {
        Some(Engine::Mysql) => mysql::load_into(reader, target, force).map(|(t, r)| (t, r, "MySQL/MariaDB"))?,
        _ => postgres::load_into(reader, db, force).map(|(t, r)| (t, r, "PostgreSQL"))?,
    };
    Ok(format!(
        "loaded {} into the {kind} database {db}: {tables} tables, {rows} rows, as the dump holds",
        rel.display()
    ))
}

/// A dump's SQL, line-buffered: gunzipped when `rel` ends in `.gz`, and a
/// pg_dump file checked to start with pg_dump's plain-format header.
fn dump_reader<'a>(file: Box<dyn Read + 'a>, rel: &Path, engine: Engine) -> Result<Box<dyn BufRead + 'a>, String> {
    let plain: Box<dyn Read + 'a> = if rel.to_string_lossy().to_ascii_lowercase().ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        file
    };
    let mut reader = io::BufReader::with_capacity(1 << 20, plain);
    let head = reader.fill_buf().map_err(|e| format!("reading the dump: {e}"))?;
    let head = &head[..head.len().min(256)];
    let has = |text: &[u8]| head.windows(text.len()).any(|w| w == text);
    if engine == Engine::Postgres && (!has(postgres::HEADER) || has(postgres::CLUSTER_HEADER)) {
        return Err("pg_dump made it, but it does not start with pg_dump's plain-format header".into());
    }
    Ok(Box::new(reader))
}

/// The name without `.age`: what the contents are.
fn plain_name(path: &Path) -> PathBuf {
    let text = path.to_string_lossy();
    PathBuf::from(text.strip_suffix(protect::AGE_SUFFIX).unwrap_or(&text))
}

/// The file's contents, decrypted if it is an age file.
fn open_plain<'a>(
    source: &Source<'a>,
    rel: &Path,
    identities: &[Box<dyn age::Identity>],
) -> Result<Box<dyn Read + 'a>, String> {
    let (_, file) = source.open(rel)?;
    if !is_encrypted(rel) {
        return Ok(file);
    }
    decrypt(file, identities)
}

/// `cipher` decrypted with the first of `identities` that opens it.
pub(crate) fn decrypt<'a>(
    cipher: impl Read + 'a,
    identities: &[Box<dyn age::Identity>],
) -> Result<Box<dyn Read + 'a>, String> {
    let decryptor = age::Decryptor::new(io::BufReader::new(cipher)).map_err(|e| format!("age: {e}"))?;
    let reader = decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|e| format!("age: {e}"))?;
    Ok(Box::new(reader))
}

/// Re-reads one file, once: size, SHA-256, and its format when the name
/// says gzip or tar. An encrypted file is decrypted (given identities) as
/// it is read, and its plaintext checked the same way.
fn check_file(
    source: &Source,
    rel: &Path,
    entry: &StoredFile,
    identities: &[Box<dyn age::Identity>],
) -> Result<String, String> {
    let (size, file) = source.open(rel)?;
    if size != entry.bytes {
        return Err(format!("corrupt: {size} bytes, the manifest says {}", entry.bytes));
    }
    let encrypted = is_encrypted(rel);
    let format = Format::of(&plain_name(rel));
    let mut reader = HashingReader { inner: file, hasher: Sha256::new(), bytes: 0 };
    let checked = match (encrypted, identities.is_empty()) {
        (false, _) => format.check(&mut reader),
        (true, true) => Ok(", encrypted (age): contents not checked without --age-identity".into()),
        (true, false) => check_plain(&mut reader, format, entry, identities),
    };
    // Whatever the checks read, hash the rest too.
    io::copy(&mut reader, &mut io::sink()).map_err(|e| format!("cannot be read: {e}"))?;
    let sha256 = hex::encode(reader.hasher.finalize());
    if let Some(tree) = &entry.tree {
        // Its evidence is the tree the reader checked as it went: every
        // tree and chunk against its id, the root against the manifest's,
        // the tar's length against its bytes.
        if reader.bytes != entry.bytes {
            return Err(format!("corrupt: {} bytes, the manifest says {}", reader.bytes, entry.bytes));
        }
        let what = checked.map_err(|e| format!("corrupt: {e}, although every blob matches its id"))?;
        return Ok(format!(
            "{}: ok ({} bytes as a tree of {} entries, id {}: every tree and chunk matches its hash; the tar's sha256 \
             {sha256}{what})",
            rel.display(),
            entry.bytes,
            tree.entries,
            tree.id
        ));
    }
    if sha256 != entry.sha256 {
        let detail = checked.err().map(|e| format!("; {e}")).unwrap_or_default();
        return Err(format!("corrupt: sha256 {sha256}, the manifest says {}{detail}", entry.sha256));
    }
    let what = checked.map_err(|e| format!("corrupt: {e}, although its sha256 matches the manifest"))?;
    Ok(format!("{}: ok ({} bytes, sha256 {}{what})", rel.display(), entry.bytes, entry.sha256))
}

/// Decrypts an age file as it is read and checks the plaintext: its
/// format, and its size and SHA-256 against the manifest's.
fn check_plain(
    cipher: &mut impl Read,
    format: Format,
    entry: &StoredFile,
    identities: &[Box<dyn age::Identity>],
) -> Result<String, String> {
    let mut plain = HashingReader { inner: decrypt(cipher, identities)?, hasher: Sha256::new(), bytes: 0 };
    let checked = format.check(&mut plain);
    io::copy(&mut plain, &mut io::sink()).map_err(|e| format!("cannot be decrypted: {e}"))?;
    let plain_sha = hex::encode(plain.hasher.finalize());
    if let Some(p) = &entry.plain
        && (p.sha256 != plain_sha || p.bytes != plain.bytes)
    {
        return Err(format!("its plaintext has sha256 {plain_sha}, the manifest says {}", p.sha256));
    }
    Ok(format!(", decrypted{}", checked?))
}

/// What a file's name says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    TarGz,
    Tar,
    Gz,
    Other,
}

impl Format {
    fn of(path: &Path) -> Format {
        let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        if name.ends_with(".tgz") || name.ends_with(".tar.gz") {
            Format::TarGz
        } else if name.ends_with(".tar") {
            Format::Tar
        } else if name.ends_with(".gz") {
            Format::Gz
        } else {
            Format::Other
        }
    }

    /// Reads the file through its format; returns a note for the report.
    fn check(self, reader: &mut impl Read) -> Result<String, String> {
        match self {
            Format::Other => Ok(String::new()),
            Format::Gz => {
                let n = io::copy(&mut flate2::read::MultiGzDecoder::new(reader), &mut io::sink())
                    .map_err(|e| format!("gzip: {e}"))?;
                Ok(format!(", gzip ok, {n} bytes uncompressed"))
            }
            Format::Tar => tar_walk::count_entries(reader).map(|n| format!(", tar of {n} entries")),
            Format::TarGz => {
                let mut gz = flate2::read::MultiGzDecoder::new(reader);
                let n = tar_walk::count_entries(&mut gz)?;
                // The end of the archive is not the end of the gzip stream.
                io::copy(&mut gz, &mut io::sink()).map_err(|e| format!("gzip: {e}"))?;
                Ok(format!(", gzip ok, tar of {n} entries"))
            }
        }
    }
}

/// A reader that hashes (SHA-256) and counts what passes through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    pub(crate) hasher: Sha256,
    pub(crate) bytes: u64,
}

impl<R> HashingReader<R> {
    pub(crate) fn new(inner: R) -> HashingReader<R> {
        HashingReader { inner, hasher: Sha256::new(), bytes: 0 }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod subset_tests {
    use super::*;

    #[test]
    fn subsets_parse_and_parts_split_every_path_once() {
        assert_eq!("2/5".parse::<Subset>(), Ok(Subset::Part { n: 2, of: 5 }));
        assert_eq!("12.5%".parse::<Subset>(), Ok(Subset::Percent(12.5)));
        for bad in ["0/5", "6/5", "5", "/5", "0%", "150%", "x%"] {
            assert!(bad.parse::<Subset>().is_err(), "{bad}");
        }
        let paths: Vec<PathBuf> = (0..300).map(|i| PathBuf::from(format!("db/dump.{i}.sql"))).collect();
        let mut counts = [0usize; 3];
        for p in &paths {
            let parts: Vec<u64> = (1..=3).filter(|&n| Subset::Part { n, of: 3 }.takes(p)).collect();
            assert_eq!(parts.len(), 1, "{}", p.display());
            counts[parts[0] as usize - 1] += 1;
        }
        assert!(counts.iter().all(|&c| c > 60), "parts of very different sizes: {counts:?}");
        assert!(paths.iter().all(|p| Subset::Percent(100.0).takes(p)));
        let some = paths.iter().filter(|p| Subset::Percent(10.0).takes(p)).count();
        assert!((5..=80).contains(&some), "10% of 300 took {some}");
    }
}
