//! Reading backups back: `offsite runs` lists a store's runs, `offsite cat`
//! streams one stored file to stdout, checked against its manifest as it
//! goes. Both read any store kind through the same `Root` the runs write
//! with, and work on a bare store directory without a site file (a new
//! machine after a disaster).

pub mod extract;

use std::io::{self, Read, Write};
use std::path::Path;

use anyhow::{Context, anyhow};
use sha2::Digest;

use crate::exit::{Exit, ExitContext, Failure};
use crate::store::manifest::Manifest;
use crate::store::s3::Root;
use crate::store::{StoredFile, protect};
use crate::verify::HashingReader;

/// How the store is named on the command line, opened.
pub struct Target {
    pub root: Root,
    /// What the output calls it.
    pub shown: String,
    /// The site's `[protect] verify_key`, when a site file named it.
    pub verify_key: Option<std::path::PathBuf>,
}

/// Opens `target`: a store directory, or a site file (or a bare site name,
/// as `run` takes it) whose store it opens, or with `from_copy` (1 for the
/// first) its `[[copy]]` store of that number (when the first store is
/// lost).
pub fn open(target: &Path, from_copy: Option<usize>) -> Result<Target, Failure> {
    if target.is_dir() {
        if from_copy.is_some() {
            return Err(anyhow!("--from-copy needs a site file, which names the copies")).exit(Exit::Usage);
        }
        let store = crate::site::StoreAt::Dir(target.to_path_buf());
        let root = crate::exit::open_existing(&store, crate::site::Limits::default().call_timeout)?;
        return Ok(Target { root, shown: target.display().to_string(), verify_key: None });
    }
    let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
    let file = crate::run::site_path(target);
    let site = crate::site::Site::load(&file, &cwd).exit(Exit::Usage)?;
    let store = match from_copy {
        None => site.store.clone(),
        Some(n) => match n.checked_sub(1).and_then(|i| site.copies.get(i)) {
            Some(copy) => copy.store.clone(),
            None => {
                return Err(anyhow!("--from-copy {n}: {} has {} [[copy]] store(s)", file.display(), site.copies.len()))
                    .exit(Exit::Usage);
            }
        },
    };
    let root = crate::exit::open_existing(&store, site.limits.call_timeout)?;
    Ok(Target { root, shown: store.display(), verify_key: site.protect.verify_key })
}

/// The runs of `target`'s store, newest first: one line each (or one JSON
/// document with `json`).
pub fn runs(target: &Path, from_copy: Option<usize>, json: bool) -> Result<(), Failure> {
    let t = open(target, from_copy)?;
    let (mut all, bad) =
        t.root.manifests().with_context(|| format!("cannot read the store {}", t.shown)).exit(Exit::BackupFailed)?;
    all.reverse();
    let signed_runs =
        t.root.signed_runs().with_context(|| format!("cannot list {}", t.shown)).exit(Exit::BackupFailed)?;
    let signed = |m: &Manifest| signed_runs.contains(&m.run.run_id);
    let rows: Vec<serde_json::Value> = all
        .iter()
        .map(|m| {
            serde_json::json!({
                "run_id": m.run.run_id, "site": m.run.site, "started": m.run.started, "status": m.status.as_str(),
                "files": m.files.len(), "bytes": m.bytes(), "signed": signed(m), "encrypted": encryption(m),
            })
        })
        .collect();
    if json {
        let bad: Vec<serde_json::Value> =
            bad.iter().map(|b| serde_json::json!({ "manifest": b.name, "error": b.error })).collect();
        crate::json::report(serde_json::json!({ "store": t.shown, "runs": rows, "unreadable": bad }));
        return Ok(());
    }
    if all.is_empty() {
        crate::outln!("{}: no runs", t.shown);
    } else {
        crate::outln!(
            "{:<32} {:<25} {:<10} {:>6} {:>12}  signed  encrypted",
            "run",
            "started",
            "status",
            "files",
            "bytes"
        );
    }
    for (m, row) in all.iter().zip(&rows) {
        // Run ids and times are the store's text: escaped.
        crate::outln!(
            "{:<32} {:<25} {:<10} {:>6} {:>12}  {:<6}  {}",
            crate::text::escape(&m.run.run_id),
            crate::status::local(&m.run.started),
            m.status.as_str(),
            m.files.len(),
            m.bytes(),
            if row["signed"] == true { "yes" } else { "no" },
            row["encrypted"].as_str().unwrap_or_default()
        );
    }
    for b in &bad {
        crate::outln!("{}: cannot be read: {}", crate::text::escape(&b.name), crate::text::escape(&b.error));
    }
    Ok(())
}

/// `yes`, `no`, or `partly` (some files sealed with age).
fn encryption(m: &Manifest) -> &'static str {
    let sealed = m.files.iter().filter(|f| f.plain.is_some()).count();
    match sealed {
        0 => "no",
        n if n == m.files.len() => "yes",
        _ => "partly",
    }
}

/// Which run a command means: `latest` (the newest run that published
/// files), `latest-good` (the newest good one), a date `YYYY-MM-DD` (the
/// newest good run that started that day, local time), or a run id.
/// Without one: `latest`.
pub fn select<'a>(all: &'a [Manifest], spec: Option<&str>) -> Result<&'a Manifest, String> {
    let newest = |pick: &dyn Fn(&Manifest) -> bool| all.iter().rev().find(|m| pick(m));
    let found = match spec.unwrap_or("latest") {
        "latest" => newest(&|m| m.status.publishes()),
        "latest-good" => newest(&|m| m.status.is_good()),
        day if chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").is_ok() => {
            let day = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").expect("checked");
            newest(&|m| {
                m.status.is_good()
                    && m.started_at().is_some_and(|t| t.with_timezone(&chrono::Local).date_naive() == day)
            })
        }
        id => all.iter().find(|m| m.run.run_id == id),
    };
    found.ok_or_else(|| match spec {
        None | Some("latest") => "the store has no run that published files".to_string(),
        Some("latest-good") => "the store has no good run".to_string(),
        Some(other) => format!("no run {} in the store (`offsite runs` lists them)", crate::text::escape(other)),
    })
}

/// The run `spec` names, its manifest's signature checked when a key is
/// known (`key`, else the site's `[protect] verify_key`).
fn chosen<'a>(
    t: &Target,
    all: &'a [Manifest],
    spec: Option<&str>,
    key: Option<&Path>,
) -> Result<&'a Manifest, Failure> {
    let m = select(all, spec).map_err(|e| anyhow!("{}: {e}", t.shown)).exit(Exit::Usage)?;
    if let Some(key) = key.map(Path::to_path_buf).or(t.verify_key.clone()) {
        let key = protect::verify_key(&key).exit(Exit::Usage)?;
        let (json, sig) = t
            .root
            .manifest_bytes(&m.run.run_id)
            .with_context(|| format!("cannot read the manifest of run {}", m.run.run_id))
            .exit(Exit::BackupFailed)?;
        let sig =
            sig.ok_or_else(|| anyhow!("run {}: its manifest is not signed", m.run.run_id)).exit(Exit::BackupFailed)?;
        protect::verify(&key, &json, &sig)
            .map_err(|e| anyhow!("run {}: the manifest's signature does not verify: {e}", m.run.run_id))
            .exit(Exit::BackupFailed)?;
    }
    Ok(m)
}

/// The file `name` of run `m` (an encrypted one also by its name
/// without `.age`).
fn find<'a>(m: &'a Manifest, name: &str) -> Result<&'a StoredFile, Failure> {
    let wanted = name.strip_prefix("./").unwrap_or(name);
    m.files
        .iter()
        .find(|f| f.path == wanted || (f.plain.is_some() && f.path.strip_suffix(protect::AGE_SUFFIX) == Some(wanted)))
        .ok_or_else(|| {
            let names: Vec<String> =
                m.files.iter().take(10).map(|f| crate::text::escape(&f.path).into_owned()).collect();
            anyhow!(
                "run {} has no file {} (it has: {}{})",
                m.run.run_id,
                crate::text::escape(wanted),
                names.join(", "),
                if m.files.len() > 10 { ", …" } else { "" }
            )
        })
        .exit(Exit::Usage)
}

fn identities(identity: Option<&Path>) -> Result<Vec<Box<dyn age::Identity>>, Failure> {
    match identity {
        Some(path) => age::IdentityFile::from_file(path.display().to_string())
            .map_err(|e| e.to_string())
            .and_then(|f| f.into_identities().map_err(|e| e.to_string()))
            .map_err(|e| anyhow!("--age-identity {}: {e}", path.display()))
            .exit(Exit::Usage),
        None => Ok(Vec::new()),
    }
}

/// Opens `entry` of run `m` and checks its size before anything is read.
fn open_checked<'a>(t: &'a Target, m: &Manifest, entry: &StoredFile) -> Result<Box<dyn Read + 'a>, Failure> {
    let location = m.location(entry);
    let (size, reader) = t
        .root
        .open_file(&location)
        .with_context(|| format!("{}: cannot be read", location.display()))
        .exit(Exit::BackupFailed)?;
    if size != entry.bytes {
        return Err(anyhow!(
            "{}: {size} bytes, but run {}'s manifest says {}: nothing was written",
            location.display(),
            m.run.run_id,
            entry.bytes
        ))
        .exit(Exit::BackupFailed);
    }
    Ok(reader)
}

/// `offsite cat TARGET [RUN] FILE`: the file's bytes to stdout, decrypted
/// with `identity` when it is encrypted and one is given. Its size is
/// checked before the first byte goes out, and its SHA-256 (and the
/// plaintext's) as it streams: on a mismatch the command fails after the
/// bytes were written, and says they must be discarded.
pub fn cat(target: &Path, run: Option<&str>, file: &str, options: &ReadOptions) -> Result<(), Failure> {
    let ReadOptions { identity, key, from_copy } = *options;
    let t = open(target, from_copy)?;
    let (all, _) =
        t.root.manifests().with_context(|| format!("cannot read the store {}", t.shown)).exit(Exit::BackupFailed)?;
    let m = chosen(&t, &all, run, key)?;
    let entry = find(m, file)?;
    let identities = identities(identity)?;
    let reader = open_checked(&t, m, entry)?;
    let mut out = io::BufWriter::with_capacity(1 << 16, io::stdout().lock());
    stream(reader, entry, &identities, &mut out)
        .and_then(|()| out.flush().map_err(|e| format!("writing to stdout: {e}")))
        .map_err(|e| {
            anyhow!(
                "{}: {e}; the bytes written so far are not the stored file and must be discarded",
                m.location(entry).display()
            )
        })
        .exit(Exit::BackupFailed)
}

/// `offsite ls TARGET [RUN] [FILE]`: a run's files; with a tar archive
/// (`.tar`, `.tgz`, `.tar.gz`, encrypted or not), its entries, read as a
/// stream and checked against the manifest like `cat`. One argument is a
/// run when it names one, else a file of the latest run.
pub fn ls(target: &Path, what: &[String], options: &ReadOptions) -> Result<(), Failure> {
    let ReadOptions { identity, key, from_copy } = *options;
    let t = open(target, from_copy)?;
    let (all, _) =
        t.root.manifests().with_context(|| format!("cannot read the store {}", t.shown)).exit(Exit::BackupFailed)?;
    let (run, file) = match what {
        [] => (None, None),
        [one] if select(&all, Some(one)).is_ok() => (Some(one.as_str()), None),
        [one] => (None, Some(one.as_str())),
        [run, file, ..] => (Some(run.as_str()), Some(file.as_str())),
    };
    let m = chosen(&t, &all, run, key)?;
    let Some(file) = file else {
        crate::outln!(
            "run {} ({}, {}):",
            crate::text::escape(&m.run.run_id),
            m.status,
            crate::status::local(&m.run.started)
        );
        for f in &m.files {
            let from =
                [Some(f.origin.call.as_str()), f.origin.host.as_deref()].into_iter().flatten().collect::<Vec<_>>();
            crate::outln!(
                "{:>14}  {}  {}{}  ({})",
                f.bytes,
                crate::text::escape(&f.sha256.chars().take(12).collect::<String>()),
                crate::text::escape(&f.path),
                if f.kept { " [kept aside]" } else { "" },
                crate::text::escape(&from.join(" "))
            );
        }
        return Ok(());
    };
    let entry = find(m, file)?;
    let plain_name =
        entry.path.strip_suffix(protect::AGE_SUFFIX).filter(|_| entry.plain.is_some()).unwrap_or(&entry.path);
    let gzipped = [".tgz", ".tar.gz"].iter().any(|s| plain_name.ends_with(s));
    if !gzipped && !plain_name.ends_with(".tar") {
        return Err(anyhow!(
            "{}: not a tar archive (.tar, .tgz, .tar.gz): `offsite cat` writes it",
            crate::text::escape(plain_name)
        ))
        .exit(Exit::Usage);
    }
    if entry.plain.is_some() && identity.is_none() {
        return Err(anyhow!("{}: encrypted; give --age-identity to list it", crate::text::escape(&entry.path)))
            .exit(Exit::Usage);
    }
    let identities = identities(identity)?;
    let reader = open_checked(&t, m, entry)?;
    let mut out = io::BufWriter::new(io::stdout().lock());
    let listed = list(reader, entry, &identities, gzipped, &mut out);
    let _ = out.flush();
    listed.map_err(|e| anyhow!("{}: {e}", m.location(entry).display())).exit(Exit::BackupFailed)
}

/// Lists the archive's entries as they stream by, then checks the hashes
/// of all that was read.
fn list(
    reader: Box<dyn Read + '_>,
    entry: &StoredFile,
    identities: &[Box<dyn age::Identity>],
    gzipped: bool,
    out: &mut impl Write,
) -> Result<(), String> {
    let mut stored = HashingReader::new(reader);
    let failed = |what: &str| format!("{what}; the listing above is not to be trusted");
    let mut show = |e: crate::verify::tar_walk::Entry| {
        let kind = match e.kind {
            b'5' => 'd',
            b'2' => 'l',
            b'1' => 'h',
            b'3' | b'4' => 'c',
            b'6' => 'p',
            _ => '-',
        };
        let when = chrono::DateTime::from_timestamp(e.mtime, 0)
            .map(|t| t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_default();
        let link = e.link.filter(|_| matches!(kind, 'l' | 'h')).map(|l| format!(" -> {}", crate::text::escape(&l)));
        let _ = writeln!(
            out,
            "{kind} {:04o} {:>12} {when}  {}{}",
            e.mode & 0o7777,
            e.size,
            crate::text::escape(&e.name),
            link.unwrap_or_default()
        );
    };
    let walked =
        walk_archive(&mut contents(&mut stored, entry, identities).map_err(|e| failed(&e))?, gzipped, |e, _| {
            show(e.clone());
            Ok(())
        });
    finish(stored, entry).map_err(|e| failed(&e))?;
    walked.map(|_| ()).map_err(|e| failed(&e))
}

/// `offsite restore TARGET [RUN] [FILE] --to DIR`: the file (or every
/// file the run published) written beneath `to` under its path in the
/// store, decrypted (and named without `.age`) when an identity is given.
/// Each goes to a temporary name, is checked (size, SHA-256, plaintext's
/// SHA-256) and synced, and only then renamed into place; a file that
/// fails a check is removed. An existing file is left alone unless
/// `overwrite`. Paths a manifest names are checked as a run checks them,
/// and `to` is entered without following links planted beneath it.
/// What every reading command takes: the identity that decrypts, the key
/// that checks manifest signatures, and which copy to read instead of the
/// first store.
#[derive(Clone, Copy, Default)]
pub struct ReadOptions<'a> {
    pub identity: Option<&'a Path>,
    pub key: Option<&'a Path>,
    pub from_copy: Option<usize>,
}

pub struct RestoreOptions<'a> {
    pub to: &'a Path,
    pub overwrite: bool,
    /// Unpack the (one) archive named, or only `what`'s paths after it.
    pub extract: bool,
    pub read: ReadOptions<'a>,
}

pub fn restore(target: &Path, what: &[String], options: &RestoreOptions) -> Result<(), Failure> {
    let RestoreOptions { to, overwrite, extract, read } = *options;
    let ReadOptions { identity, key, from_copy } = read;
    let t = open(target, from_copy)?;
    let (all, _) =
        t.root.manifests().with_context(|| format!("cannot read the store {}", t.shown)).exit(Exit::BackupFailed)?;
    // A first argument names a run when it is one (and something follows
    // it, or nothing needs a file).
    let (run, file, paths) = match what {
        [] => (None, None, &what[..0]),
        [first, rest @ ..] if select(&all, Some(first)).is_ok() && (!extract || !rest.is_empty()) => {
            (Some(first.as_str()), rest.first().map(String::as_str), rest.get(1..).unwrap_or_default())
        }
        [first, rest @ ..] => (None, Some(first.as_str()), rest),
    };
    if !paths.is_empty() && !extract {
        return Err(anyhow!("paths after the file name the entries to unpack: add --extract")).exit(Exit::Usage);
    }
    let m = chosen(&t, &all, run, key)?;
    if extract {
        let file = file.ok_or_else(|| anyhow!("--extract needs the archive's name")).exit(Exit::Usage)?;
        return extract_archive(&t, m, find(m, file)?, paths, to, overwrite, identity);
    }
    let entries: Vec<&StoredFile> = match file {
        Some(file) => vec![find(m, file)?],
        None => m.published().collect(),
    };
    let identities = identities(identity)?;
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display())).exit(Exit::Usage)?;
    let dir = cap_std::fs::Dir::open_ambient_dir(to, cap_std::ambient_authority())
        .with_context(|| format!("cannot open {}", to.display()))
        .exit(Exit::Usage)?;
    let (mut written, mut skipped, mut failed) = (0usize, extract::Names::default(), extract::Names::default());
    for entry in entries {
        let decrypting = entry.plain.is_some() && !identities.is_empty();
        let name = match decrypting {
            true => entry.path.strip_suffix(protect::AGE_SUFFIX).unwrap_or(&entry.path),
            false => &entry.path,
        };
        let shown = crate::text::escape(name).into_owned();
        let rel = match crate::policy::store_path(name) {
            Ok(rel) => rel,
            Err(d) => {
                failed.push(format!("{shown}: the manifest names a path no run may store: {d}"));
                continue;
            }
        };
        if !overwrite && dir.symlink_metadata(&rel).is_ok() {
            skipped.push(shown);
            continue;
        }
        match restore_one(&t, m, entry, &identities, &dir, &rel) {
            Ok(()) => written += 1,
            Err(e) => failed.push(format!("{shown}: {e}")),
        }
    }
    crate::outln!("restored {written} file(s) of run {} into {}", crate::text::escape(&m.run.run_id), to.display());
    if !skipped.is_empty() {
        crate::outln!("left alone, already there (--overwrite replaces them): {skipped}");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("{} file(s) not restored, nothing of them left behind: {failed}", failed.len()))
            .exit(Exit::BackupFailed)
    }
}

/// `restore --extract`: the archive unpacked (or only `paths` of it)
/// into a staging directory beneath `to` as it streams, and moved into
/// place only once the whole stored file matched its manifest; a refused
/// or damaged archive leaves nothing in `to`.
fn extract_archive(
    t: &Target,
    m: &Manifest,
    entry: &StoredFile,
    paths: &[String],
    to: &Path,
    overwrite: bool,
    identity: Option<&Path>,
) -> Result<(), Failure> {
    let plain_name =
        entry.path.strip_suffix(protect::AGE_SUFFIX).filter(|_| entry.plain.is_some()).unwrap_or(&entry.path);
    let gzipped = [".tgz", ".tar.gz"].iter().any(|s| plain_name.ends_with(s));
    if !gzipped && !plain_name.ends_with(".tar") {
        return Err(anyhow!("{}: not a tar archive (.tar, .tgz, .tar.gz)", crate::text::escape(plain_name)))
            .exit(Exit::Usage);
    }
    if entry.plain.is_some() && identity.is_none() {
        return Err(anyhow!("{}: encrypted; give --age-identity to unpack it", crate::text::escape(&entry.path)))
            .exit(Exit::Usage);
    }
    let identities = identities(identity)?;
    let reader = open_checked(t, m, entry)?;
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display())).exit(Exit::Usage)?;
    let target = cap_std::fs::Dir::open_ambient_dir(to, cap_std::ambient_authority())
        .with_context(|| format!("cannot open {}", to.display()))
        .exit(Exit::Usage)?;
    let staging_name = format!(".offsite-restore-{}", std::process::id());
    let _ = target.remove_dir_all(&staging_name);
    target
        .create_dir(&staging_name)
        .with_context(|| format!("cannot create {staging_name} in {}", to.display()))
        .exit(Exit::BackupFailed)?;
    let staging = target.open_dir(&staging_name).exit(Exit::BackupFailed)?;
    let unpacked = unpack(reader, entry, &identities, gzipped, &staging, paths);
    let merged = unpacked.and_then(|done| {
        let mut kept = extract::Names::default();
        extract::merge(&staging, &target, Path::new(""), overwrite, &mut kept)
            .map_err(|e| format!("moving the unpacked files into place: {e}"))?;
        Ok((done, kept))
    });
    let _ = target.remove_dir_all(&staging_name);
    let (done, kept) = merged
        .map_err(|e| anyhow!("{}: {e}; nothing of it was left in {}", m.location(entry).display(), to.display()))
        .exit(Exit::BackupFailed)?;
    let _ = target.open(".").and_then(|d| d.sync_all());
    crate::outln!(
        "unpacked {} file(s), {} director(ies), {} link(s) of {} (run {}) into {}",
        done.files,
        done.dirs,
        done.links,
        crate::text::escape(&entry.path),
        crate::text::escape(&m.run.run_id),
        to.display()
    );
    if !kept.is_empty() {
        crate::outln!("left alone, already there (--overwrite replaces files): {kept}");
    }
    if !done.left_out.is_empty() {
        crate::outln!("left out (devices, FIFOs, sparse entries): {}", done.left_out);
    }
    if done.stripped > 0 {
        crate::outln!("{} entr(ies) lost their setuid, setgid or sticky bit", done.stripped);
    }
    if !paths.is_empty() && done.files + done.dirs + done.links == 0 {
        return Err(anyhow!("no entry of the archive matches {}", crate::text::escape(&paths.join(" "))))
            .exit(Exit::BackupFailed);
    }
    Ok(())
}

/// Streams the archive through its checks into `staging`.
fn unpack(
    reader: Box<dyn Read + '_>,
    entry: &StoredFile,
    identities: &[Box<dyn age::Identity>],
    gzipped: bool,
    staging: &cap_std::fs::Dir,
    paths: &[String],
) -> Result<extract::Extracted, String> {
    let mut stored = HashingReader::new(reader);
    let mut done = extract::Extracted::default();
    let mut dirs = Vec::new();
    let each = |e: &crate::verify::tar_walk::Entry, data: &mut dyn Read| {
        extract::entry(staging, e, data, paths, &mut done, &mut dirs)
    };
    walk_archive(&mut contents(&mut stored, entry, identities)?, gzipped, each)?;
    finish(stored, entry)?;
    extract::finish_dirs(staging, &dirs)?;
    Ok(done)
}

/// One file: temporary name, checked, synced, renamed.
fn restore_one(
    t: &Target,
    m: &Manifest,
    entry: &StoredFile,
    identities: &[Box<dyn age::Identity>],
    dir: &cap_std::fs::Dir,
    rel: &Path,
) -> Result<(), String> {
    let location = m.location(entry);
    let (size, reader) = t.root.open_file(&location).map_err(|e| format!("cannot be read: {e}"))?;
    if size != entry.bytes {
        return Err(format!("{size} bytes, the manifest says {}", entry.bytes));
    }
    let parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(p) = parent {
        dir.create_dir_all(p).map_err(|e| format!("cannot create {}: {e}", p.display()))?;
    }
    let file_name = rel.file_name().ok_or("no file name")?.to_string_lossy().into_owned();
    let tmp = rel.with_file_name(format!(".{file_name}.offsite-restore-{}", std::process::id()));
    let mut options = cap_std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    let file = dir.open_with(&tmp, &options).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let mut out = io::BufWriter::with_capacity(1 << 16, file.into_std());
    let done = stream(reader, entry, identities, &mut out)
        .and_then(|()| out.into_inner().map_err(|e| e.error().to_string()))
        .and_then(|f| f.sync_all().map_err(|e| e.to_string()))
        .and_then(|()| dir.rename(&tmp, dir, rel).map_err(|e| e.to_string()));
    if let Err(e) = done {
        let _ = dir.remove_file(&tmp);
        return Err(e);
    }
    let synced = match parent {
        Some(p) => dir.open_dir(p).and_then(|d| d.open(".")).and_then(|d| d.sync_all()),
        None => dir.open(".").and_then(|d| d.sync_all()),
    };
    synced.map_err(|e| format!("syncing its directory: {e}"))
}

/// What `stored` holds, as it is read: decrypted when the entry is
/// encrypted and identities are given, else the stored bytes.
fn contents<'s>(
    stored: &'s mut HashingReader<Box<dyn Read + '_>>,
    entry: &StoredFile,
    identities: &[Box<dyn age::Identity>],
) -> Result<Box<dyn Read + 's>, String> {
    if entry.plain.is_none() || identities.is_empty() {
        return Ok(Box::new(stored));
    }
    let decryptor = age::Decryptor::new(io::BufReader::new(stored)).map_err(|e| format!("age: {e}"))?;
    let reader = decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|e| format!("age: {e}"))?;
    Ok(Box::new(reader))
}

/// Reads what is left of the stored bytes (age need not read them all)
/// and compares their size and SHA-256 with the manifest's.
fn finish(mut stored: HashingReader<Box<dyn Read + '_>>, entry: &StoredFile) -> Result<(), String> {
    io::copy(&mut stored, &mut io::sink()).map_err(|e| format!("stopped: {e}"))?;
    let sha = hex::encode(stored.hasher.finalize());
    if sha != entry.sha256 || stored.bytes != entry.bytes {
        return Err(format!(
            "its sha256 is {sha} ({} bytes), the manifest says {} ({} bytes)",
            stored.bytes, entry.sha256, entry.bytes
        ));
    }
    Ok(())
}

/// Walks a tar archive's entries in `contents`, gunzipping first when
/// `gzipped` (and reading the gzip stream to its end).
fn walk_archive(
    contents: &mut dyn Read,
    gzipped: bool,
    each: impl FnMut(&crate::verify::tar_walk::Entry, &mut dyn Read) -> Result<(), String>,
) -> Result<u64, String> {
    if !gzipped {
        return crate::verify::tar_walk::walk(&mut &mut *contents, each);
    }
    let mut gz = flate2::read::MultiGzDecoder::new(contents);
    let walked = crate::verify::tar_walk::walk(&mut gz, each);
    let _ = io::copy(&mut gz, &mut io::sink());
    walked
}

/// Copies the stored bytes to `out`, decrypting when `identities` are
/// given and the file is encrypted, and checks both hashes at the end.
fn stream(
    reader: Box<dyn Read + '_>,
    entry: &StoredFile,
    identities: &[Box<dyn age::Identity>],
    out: &mut impl Write,
) -> Result<(), String> {
    let mut stored = HashingReader::new(reader);
    let (plain_sha, plain_bytes) = {
        let mut plain = HashingReader::new(contents(&mut stored, entry, identities)?);
        io::copy(&mut plain, out).map_err(|e| format!("stopped: {e}"))?;
        (hex::encode(plain.hasher.finalize()), plain.bytes)
    };
    finish(stored, entry)?;
    if let Some(p) = entry.plain.as_ref().filter(|_| !identities.is_empty())
        && (plain_sha != p.sha256 || plain_bytes != p.bytes)
    {
        return Err(format!("its plaintext's sha256 is {plain_sha}, the manifest says {}", p.sha256));
    }
    Ok(())
}
