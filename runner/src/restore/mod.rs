//! Reading backups back: `offsite runs` lists a store's runs, `ls` a run's
//! files or an archive's entries, `cat` streams one stored file to stdout,
//! and `restore` writes files beneath a directory, unpacks an archive
//! (`extract`) or loads a dump into a database. Every byte goes through
//! one `Verified` reader, which ends only once the stored file matched
//! its manifest. They read any store kind through the same `Root` the runs
//! write with: a site's store or one of its copies, a bare directory, or a
//! bare `s3://` bucket (a new machine after a disaster).

pub mod extract;

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, anyhow};
use sha2::Digest;

use crate::exit::{Exit, ExitContext, Failure};
use crate::store::Root;
use crate::store::manifest::Manifest;
use crate::store::{StoredFile, protect};
use crate::verify::HashingReader;

/// How the store is named on the command line, opened.
pub struct Target {
    pub root: Root,
    /// What the output calls it.
    pub shown: String,
    /// The site's `[protect] verify_key`, when a site file named it.
    pub verify_key: Option<std::path::PathBuf>,
    /// How many `[[copy]]` stores the site file names (0 without one).
    pub copies: usize,
    /// Which of them this is (1 for the first), or `None` for the store.
    pub copy: Option<usize>,
}

/// Which store a reading command opens, beyond its target: a site's
/// `[[copy]]` (1 for the first), and for a bare `s3://` target the
/// settings a site's `[s3]` table would give.
#[derive(Clone, Debug, Default)]
pub struct StoreChoice {
    pub from_copy: Option<usize>,
    pub s3: crate::s3::S3Settings,
}

/// Opens `target`: a store directory, an `s3://BUCKET/PREFIX` store (a
/// new machine after a disaster has no site file), or a site file (or a
/// bare site name, as `run` takes it) whose store it opens, or with
/// `from_copy` (1 for the first) its `[[copy]]` store of that number (when
/// the first store is lost).
pub fn open(target: &Path, choice: &StoreChoice) -> Result<Target, Failure> {
    let from_copy = choice.from_copy;
    if let Some(url) = target.to_str().filter(|t| t.starts_with("s3://")) {
        if from_copy.is_some() {
            return Err(anyhow!("--from-copy needs a site file, which names the copies")).exit(Exit::Usage);
        }
        let location = crate::s3::S3Location::parse(url).map_err(|e| anyhow!("{e}")).exit(Exit::Usage)?;
        choice.s3.check().map_err(|e| anyhow!("--s3-endpoint: {e}")).exit(Exit::Usage)?;
        let store = crate::site::StoreAt::S3(Box::new(crate::site::S3Store {
            location,
            settings: choice.s3.clone(),
            part_size: crate::site::DEFAULT_PART_SIZE,
            lock_stale: crate::site::DEFAULT_LOCK_STALE,
        }));
        let root = crate::exit::open_existing(&store, crate::site::Limits::default().call_timeout)?;
        return Ok(Target { root, shown: store.display(), verify_key: None, copies: 0, copy: None });
    }
    if target.is_dir() {
        if from_copy.is_some() {
            return Err(anyhow!("--from-copy needs a site file, which names the copies")).exit(Exit::Usage);
        }
        let store = crate::site::StoreAt::Dir(target.to_path_buf());
        let root = crate::exit::open_existing(&store, crate::site::Limits::default().call_timeout)?;
        return Ok(Target { root, shown: target.display().to_string(), verify_key: None, copies: 0, copy: None });
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
    Ok(Target {
        root,
        shown: store.display(),
        verify_key: site.protect.verify_key,
        copies: site.copies.len(),
        copy: from_copy,
    })
}

/// A store's runs, as `Root::manifests` reads them.
type Runs = (Vec<Manifest>, Vec<crate::store::run::BadManifest>);

/// Opens the store a command reads, with its runs. When a site's first
/// store cannot be read, or `wanted` finds nothing there (a run or file
/// that is missing), the first of its `[[copy]]` stores where `wanted`
/// does is read instead, and a note on stderr says so. `--from-copy`
/// reads only the copy it names.
fn open_runs(
    target: &Path,
    choice: &StoreChoice,
    wanted: &dyn Fn(&[Manifest]) -> bool,
) -> Result<(Target, Runs), Failure> {
    let read = |choice: &StoreChoice| -> Result<(Target, Runs), Failure> {
        let t = open(target, choice)?;
        let runs = t
            .root
            .manifests()
            .with_context(|| format!("cannot read the store {}", t.shown))
            .exit(Exit::BackupFailed)?;
        Ok((t, runs))
    };
    let first = read(choice);
    let (why, copies) = match &first {
        Ok((t, (all, _))) if wanted(all) || t.copies == 0 || choice.from_copy.is_some() => return first,
        Ok((t, _)) => (format!("{} has no such run or file", t.shown), t.copies),
        Err(_) if choice.from_copy.is_some() || target.is_dir() => return first,
        Err(e) => {
            // How many copies the site names, its first store unreadable.
            let file = crate::run::site_path(target);
            let cwd = std::env::current_dir().unwrap_or_default();
            match crate::site::Site::load(&file, &cwd) {
                Ok(site) if !site.copies.is_empty() => (format!("{:#}", e.error), site.copies.len()),
                _ => return first,
            }
        }
    };
    for n in 1..=copies {
        let copy = StoreChoice { from_copy: Some(n), ..choice.clone() };
        if let Ok((t, runs)) = read(&copy)
            && wanted(&runs.0)
        {
            eprintln!("offsite: note: {}; reading [[copy]] {n} ({}) instead", crate::text::escape(&why), t.shown);
            return Ok((t, runs));
        }
    }
    first
}

/// The runs of `target`'s store, newest first: one line each (or one JSON
/// document with `json`).
pub fn runs(target: &Path, key: Option<&Path>, choice: &StoreChoice, json: bool) -> Result<(), Failure> {
    let (t, (mut all, bad)) = open_runs(target, choice, &|_| true)?;
    all.reverse();
    // Reading a site's store: which of its copies hold each run.
    let copies: Vec<CopyView> = match t.copy {
        None => (1..=t.copies).map(|n| copy_view(target, choice, n)).collect(),
        Some(_) => Vec::new(),
    };
    let held_by = |m: &Manifest| -> Vec<usize> {
        copies.iter().filter(|c| c.runs.contains(&m.run.run_id)).map(|c| c.number).collect()
    };
    let signed_runs =
        t.root.signed_runs().with_context(|| format!("cannot list {}", t.shown)).exit(Exit::BackupFailed)?;
    let key = match key.map(Path::to_path_buf).or(t.verify_key.clone()) {
        Some(k) => Some(protect::verify_key(&k).exit(Exit::Usage)?),
        None => None,
    };
    // With a key, each signature is checked; without, a signed run is
    // only said to be signed.
    let signature = |m: &Manifest| -> Signature {
        let id = &m.run.run_id;
        match (&key, signed_runs.contains(id)) {
            (_, false) => Signature::None,
            (None, true) => Signature::Unchecked,
            (Some(key), true) => match t.root.manifest_bytes(id) {
                Ok((json, Some(sig))) if protect::verify(key, &json, &sig).is_ok() => Signature::Verified,
                _ => Signature::Bad,
            },
        }
    };
    let sigs: Vec<Signature> = all.iter().map(signature).collect();
    let rows: Vec<serde_json::Value> = all
        .iter()
        .zip(&sigs)
        .map(|(m, sig)| {
            serde_json::json!({
                "run_id": m.run.run_id, "site": m.run.site, "started": m.run.started, "status": m.status.as_str(),
                "files": m.files.len(), "bytes": m.bytes(), "signed": *sig != Signature::None,
                "signature": sig.json(), "encrypted": encryption(m), "copies": held_by(m),
            })
        })
        .collect();
    if json {
        let bad: Vec<serde_json::Value> =
            bad.iter().map(|b| serde_json::json!({ "manifest": b.name, "error": b.error })).collect();
        let views: Vec<serde_json::Value> = copies
            .iter()
            .map(|c| {
                serde_json::json!({ "copy": c.number, "store": c.shown, "runs": c.runs.len(),
                    "only_there": c.only_there(&all),
                    "error": c.error })
            })
            .collect();
        crate::json::report(serde_json::json!({ "store": t.shown, "runs": rows, "unreadable": bad, "copies": views }));
    } else {
        if all.is_empty() {
            crate::outln!("{}: no runs", t.shown);
        } else {
            crate::outln!(
                "{:<32} {:<25} {:<10} {:>6} {:>12}  signed  encrypted{}",
                "run",
                "started",
                "status",
                "files",
                "bytes",
                if copies.is_empty() { "" } else { "  copies" }
            );
        }
        for ((m, row), sig) in all.iter().zip(&rows).zip(&sigs) {
            // Run ids and times are the store's text: escaped.
            let held = match (copies.is_empty(), held_by(m)) {
                (true, _) => String::new(),
                (false, h) if h.is_empty() => "  -".into(),
                (false, h) => format!("  {}", h.iter().map(usize::to_string).collect::<Vec<_>>().join(",")),
            };
            crate::outln!(
                "{:<32} {:<25} {:<10} {:>6} {:>12}  {:<6}  {:<9}{held}",
                crate::text::escape(&m.run.run_id),
                crate::status::local(&m.run.started),
                m.status.as_str(),
                m.files.len(),
                m.bytes(),
                sig.text(),
                row["encrypted"].as_str().unwrap_or_default(),
            );
        }
        for c in &copies {
            let only = c.only_there(&all);
            match &c.error {
                Some(e) => crate::outln!("copy {} ({}): cannot be read: {}", c.number, c.shown, crate::text::escape(e)),
                None if only > 0 => crate::outln!(
                    "copy {} ({}): {} run(s), {only} of them no longer in the store (`--from-copy {}` reads them)",
                    c.number,
                    c.shown,
                    c.runs.len(),
                    c.number
                ),
                None => crate::outln!("copy {} ({}): {} run(s)", c.number, c.shown, c.runs.len()),
            }
        }
        for b in &bad {
            crate::outln!("{}: cannot be read: {}", crate::text::escape(&b.name), crate::text::escape(&b.error));
        }
    }
    let forged = sigs.iter().filter(|s| **s == Signature::Bad).count();
    if forged > 0 {
        return Err(anyhow!("{forged} run(s) whose manifest signature does not verify: do not trust them"))
            .exit(Exit::BackupFailed);
    }
    Ok(())
}

/// A run's manifest signature, as `runs` found it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Signature {
    None,
    Unchecked,
    Verified,
    Bad,
}

impl Signature {
    /// The `signed` column.
    fn text(self) -> &'static str {
        match self {
            Signature::None => "no",
            Signature::Unchecked => "yes",
            Signature::Verified => "ok",
            Signature::Bad => "BAD",
        }
    }

    /// The JSON `signature`.
    fn json(self) -> &'static str {
        match self {
            Signature::None => "none",
            Signature::Unchecked => "unchecked",
            Signature::Verified => "verified",
            Signature::Bad => "bad",
        }
    }
}

/// What one `[[copy]]` store holds, for `runs`.
struct CopyView {
    number: usize,
    shown: String,
    runs: std::collections::BTreeSet<String>,
    error: Option<String>,
}

impl CopyView {
    /// How many of its runs the store itself (`all`) no longer has.
    fn only_there(&self, all: &[Manifest]) -> usize {
        let store: std::collections::BTreeSet<&str> = all.iter().map(|m| m.run.run_id.as_str()).collect();
        self.runs.iter().filter(|id| !store.contains(id.as_str())).count()
    }
}

fn copy_view(target: &Path, choice: &StoreChoice, number: usize) -> CopyView {
    let copy = StoreChoice { from_copy: Some(number), ..choice.clone() };
    match open(target, &copy) {
        Ok(t) => match t.root.manifests() {
            Ok((all, _)) => {
                CopyView { number, shown: t.shown, runs: all.into_iter().map(|m| m.run.run_id).collect(), error: None }
            }
            Err(e) => CopyView { number, shown: t.shown, runs: Default::default(), error: Some(e.to_string()) },
        },
        Err(f) => CopyView {
            number,
            shown: format!("[[copy]] {number}"),
            runs: Default::default(),
            error: Some(format!("{:#}", f.error)),
        },
    }
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
            .map_err(|e| anyhow!("run {}'s manifest: {e}", m.run.run_id))
            .exit(Exit::BackupFailed)?;
    }
    Ok(m)
}

/// The file `name` of run `m` (an encrypted one also by its name
/// without `.age`). A name with `*` or `?` (which match within one path
/// component) must match exactly one file: `server1/sitedb-*.sql.gz`
/// names a dump without knowing its time stamp.
fn find<'a>(m: &'a Manifest, name: &str) -> Result<&'a StoredFile, Failure> {
    let wanted = name.strip_prefix("./").unwrap_or(name);
    let names = |f: &'a StoredFile| [f.path.as_str(), f.plain_path()];
    let pattern = wanted.contains(['*', '?']);
    let found: Vec<&StoredFile> = m
        .files
        .iter()
        .filter(|f| names(f).iter().any(|n| if pattern { glob(wanted.as_bytes(), n.as_bytes()) } else { *n == wanted }))
        .collect();
    let listed = |files: &mut dyn Iterator<Item = &StoredFile>| {
        let names: Vec<String> = files.take(10).map(|f| crate::text::escape(&f.path).into_owned()).collect();
        names.join(", ")
    };
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(anyhow!(
            "run {} has no file {} (it has: {}{})",
            crate::text::escape(&m.run.run_id),
            crate::text::escape(wanted),
            listed(&mut m.files.iter()),
            if m.files.len() > 10 { ", …" } else { "" }
        ))
        .exit(Exit::Usage),
        many => Err(anyhow!(
            "{} matches {} files of run {} ({}{}): name one",
            crate::text::escape(wanted),
            many.len(),
            crate::text::escape(&m.run.run_id),
            listed(&mut many.iter().copied()),
            if many.len() > 10 { ", …" } else { "" }
        ))
        .exit(Exit::Usage),
    }
}

/// Shell-style matching, component by component: `*` any run of bytes
/// and `?` one byte, neither crossing a `/`.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut pattern, mut name) = (pattern.split(|&b| b == b'/'), name.split(|&b| b == b'/'));
    loop {
        match (pattern.next(), name.next()) {
            (None, None) => return true,
            (Some(p), Some(n)) if glob_component(p, n) => {}
            _ => return false,
        }
    }
}

/// One component: the usual two-pointer walk, going back to the last `*`
/// on a mismatch (linear in practice, never exponential).
fn glob_component(p: &[u8], n: &[u8]) -> bool {
    let (mut i, mut j, mut star) = (0, 0, None);
    while j < n.len() {
        if i < p.len() && (p[i] == b'?' || p[i] == n[j]) && p[i] != b'*' {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&b| b == b'*')
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

/// The identities that decrypt `entry`, which an encrypted file needs
/// before anything can `verb` it.
fn identities_for(
    entry: &StoredFile,
    identity: Option<&Path>,
    verb: &str,
) -> Result<Vec<Box<dyn age::Identity>>, Failure> {
    if entry.plain.is_some() && identity.is_none() {
        return Err(anyhow!("{}: encrypted; give --age-identity to {verb} it", crate::text::escape(&entry.path)))
            .exit(Exit::Usage);
    }
    identities(identity)
}

/// Whether `entry` is a gzipped tar archive (`.tgz`, `.tar.gz`) or a
/// plain one (`.tar`); anything else is refused.
fn archive_kind(entry: &StoredFile) -> Result<bool, Failure> {
    let name = entry.plain_path();
    let gzipped = [".tgz", ".tar.gz"].iter().any(|s| name.ends_with(s));
    if !gzipped && !name.ends_with(".tar") {
        return Err(anyhow!(
            "{}: not a tar archive (.tar, .tgz, .tar.gz): `offsite cat` writes it",
            crate::text::escape(name)
        ))
        .exit(Exit::Usage);
    }
    Ok(gzipped)
}

/// Opens `entry` of run `m` and checks its size before anything is read.
fn open_sized<'a>(t: &'a Target, m: &Manifest, entry: &StoredFile) -> Result<Box<dyn Read + 'a>, String> {
    let (size, reader) = t.root.open_file(&m.location(entry)).map_err(|e| format!("cannot be read: {e}"))?;
    if size != entry.bytes {
        return Err(format!("{size} bytes, but the manifest says {}: nothing was written", entry.bytes));
    }
    Ok(reader)
}

/// [`open_sized`] for a command that reads one file.
fn open_checked<'a>(t: &'a Target, m: &Manifest, entry: &StoredFile) -> Result<Box<dyn Read + 'a>, Failure> {
    open_sized(t, m, entry).map_err(|e| anyhow!("{}: {e}", m.location(entry).display())).exit(Exit::BackupFailed)
}

/// `offsite cat TARGET [RUN] FILE`: the file's bytes to stdout, decrypted
/// with `identity` when it is encrypted and one is given. Its size is
/// checked before the first byte goes out, and its SHA-256 (and the
/// plaintext's) as it streams: on a mismatch the command fails after the
/// bytes were written, and says they must be discarded.
pub fn cat(target: &Path, run: Option<&str>, file: &str, options: &ReadOptions) -> Result<(), Failure> {
    let ReadOptions { identity, key, ref store } = *options;
    let holds = |all: &[Manifest]| select(all, run).is_ok_and(|m| find(m, file).is_ok());
    let (t, (all, _)) = open_runs(target, store, &holds)?;
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

/// `ls`'s RUN and FILE: one argument is a run when it names one in `all`.
fn ls_args<'w>(all: &[Manifest], what: &'w [String]) -> (Option<&'w str>, Option<&'w str>) {
    match what {
        [] => (None, None),
        [one] if select(all, Some(one)).is_ok() => (Some(one.as_str()), None),
        [one] => (None, Some(one.as_str())),
        [run, file, ..] => (Some(run.as_str()), Some(file.as_str())),
    }
}

/// Whether `all` holds the run, and the file in it when one is named.
fn resolves(all: &[Manifest], (run, file): (Option<&str>, Option<&str>)) -> bool {
    select(all, run).is_ok_and(|m| file.is_none_or(|f| find(m, f).is_ok()))
}

/// `offsite ls TARGET [RUN] [FILE]`: a run's files; with a tar archive
/// (`.tar`, `.tgz`, `.tar.gz`, encrypted or not), its entries, read as a
/// stream and checked against the manifest like `cat`. One argument is a
/// run when it names one, else a file of the latest run.
pub fn ls(target: &Path, what: &[String], options: &ReadOptions) -> Result<(), Failure> {
    let ReadOptions { identity, key, ref store } = *options;
    let (t, (all, _)) = open_runs(target, store, &|all| resolves(all, ls_args(all, what)))?;
    let (run, file) = ls_args(&all, what);
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
                crate::text::escape(&f.tree.as_ref().map_or(&f.sha256, |t| &t.id).chars().take(12).collect::<String>()),
                crate::text::escape(&f.path),
                if f.kept { " [kept aside]" } else { "" },
                crate::text::escape(&from.join(" "))
            );
        }
        return Ok(());
    };
    let entry = find(m, file)?;
    let gzipped = archive_kind(entry)?;
    let identities = identities_for(entry, identity, "list")?;
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
    let mut contents = verified(reader, entry, identities).map_err(|e| failed(&e))?;
    let walked = walk_archive(&mut contents, gzipped, |e, _| {
        show(e.clone());
        Ok(())
    });
    contents.finish().map_err(|e| failed(&e))?;
    walked.map(|_| ()).map_err(|e| failed(&e))
}

/// What every reading command takes: the identity that decrypts, the key
/// that checks manifest signatures, and which copy to read instead of the
/// first store.
#[derive(Clone, Default)]
pub struct ReadOptions<'a> {
    pub identity: Option<&'a Path>,
    pub key: Option<&'a Path>,
    pub store: StoreChoice,
}

/// Where `restore` puts what it reads.
pub enum Into {
    /// Files beneath `to`; with `extract`, the one archive named unpacked
    /// there (or only the paths after its name).
    Dir { to: std::path::PathBuf, overwrite: bool, extract: bool, special: extract::Special },
    /// The one dump named, loaded into a database.
    Database { db: crate::verify::mysql::Database, force: bool },
}

/// `restore`'s RUN, FILE and PATHS: a first argument names a run when it
/// is one in `all` (and something follows it, or nothing needs a file).
fn restore_args<'w>(
    all: &[Manifest],
    what: &'w [String],
    needs_file: bool,
) -> (Option<&'w str>, Option<&'w str>, &'w [String]) {
    match what {
        [] => (None, None, &what[..0]),
        [first, rest @ ..] if select(all, Some(first)).is_ok() && (!needs_file || !rest.is_empty()) => {
            (Some(first.as_str()), rest.first().map(String::as_str), rest.get(1..).unwrap_or_default())
        }
        [first, rest @ ..] => (None, Some(first.as_str()), rest),
    }
}

/// `offsite restore TARGET [RUN] [FILE] --to DIR`: the file (or every
/// file the run published) written beneath `to` under its path in the
/// store, decrypted (and named without `.age`) when an identity is given.
/// Each goes to a temporary name, is checked (size, SHA-256, plaintext's
/// SHA-256) and synced, and only then renamed into place; a file that
/// fails a check is removed. An existing file is left alone unless
/// `overwrite`. Paths a manifest names are checked as a run checks them,
/// and `to` is entered without following links planted beneath it.
/// With `--extract`, the archive is unpacked instead (`extract_archive`);
/// with `--into-database`, the dump is loaded (`into_database`).
pub fn restore(target: &Path, what: &[String], into: &Into, read: &ReadOptions) -> Result<(), Failure> {
    let ReadOptions { identity, key, ref store } = *read;
    let (to, overwrite, extract, special) = match into {
        Into::Dir { to, overwrite, extract, special } => (to.as_path(), *overwrite, *extract, *special),
        Into::Database { .. } => (Path::new(""), false, false, extract::Special::default()),
    };
    if (special.same_owner || special.preserve_special) && !rustix::process::geteuid().is_root() {
        return Err(anyhow!("--same-owner and --preserve-special are for root (other users cannot give files away)"))
            .exit(Exit::Usage);
    }
    let needs_file = extract || matches!(into, Into::Database { .. });
    let args = |all: &[Manifest]| restore_args(all, what, needs_file);
    let (t, (all, _)) = open_runs(target, store, &|all| {
        let (run, file, _) = args(all);
        resolves(all, (run, file))
    })?;
    let (run, file, paths) = args(&all);
    if !paths.is_empty() && !extract {
        return Err(anyhow!("paths after the file name the entries to unpack: add --extract")).exit(Exit::Usage);
    }
    let m = chosen(&t, &all, run, key)?;
    if let Into::Database { db, force } = into {
        let file = file.ok_or_else(|| anyhow!("--into-database needs the dump's name")).exit(Exit::Usage)?;
        return into_database(&t, m, find(m, file)?, db, *force, identity);
    }
    if extract {
        let file = file.ok_or_else(|| anyhow!("--extract needs the archive's name")).exit(Exit::Usage)?;
        return extract_archive(&t, m, find(m, file)?, paths, (to, overwrite, special), identity);
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
        let name = if identities.is_empty() { &entry.path } else { entry.plain_path() };
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

/// `restore --into-database`: the dump streamed into the database as it
/// is read, decrypted and gunzipped on the way; a stored file that does
/// not match its manifest fails the load at its end, before it commits.
fn into_database(
    t: &Target,
    m: &Manifest,
    entry: &StoredFile,
    db: &crate::verify::mysql::Database,
    force: bool,
    identity: Option<&Path>,
) -> Result<(), Failure> {
    let identities = identities_for(entry, identity, "load")?;
    let engine = crate::verify::Engine::of(entry);
    let rel = Path::new(entry.plain_path());
    let reader = open_checked(t, m, entry)?;
    let contents = verified(reader, entry, &identities)
        .map_err(|e| anyhow!("{}: {e}", m.location(entry).display()))
        .exit(Exit::BackupFailed)?;
    let done = crate::verify::load_into(Box::new(contents), rel, engine, db, force)
        .map_err(|e| anyhow!("{} (run {}): {e}", crate::text::escape(&entry.path), crate::text::escape(&m.run.run_id)))
        .exit(Exit::BackupFailed)?;
    crate::outln!("{} (run {})", crate::text::escape(&done), crate::text::escape(&m.run.run_id));
    Ok(())
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
    (to, overwrite, special): (&Path, bool, extract::Special),
    identity: Option<&Path>,
) -> Result<(), Failure> {
    let gzipped = archive_kind(entry)?;
    let identities = identities_for(entry, identity, "unpack")?;
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
    let unpacked = unpack(reader, entry, &identities, gzipped, &staging, (paths, special));
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
    (paths, special): (&[String], extract::Special),
) -> Result<extract::Extracted, String> {
    let mut done = extract::Extracted::default();
    let mut dirs = Vec::new();
    let each = |e: &crate::verify::tar_walk::Entry, data: &mut dyn Read| {
        extract::entry(staging, e, data, paths, special, &mut done, &mut dirs)
    };
    let mut contents = verified(reader, entry, identities)?;
    let walked = walk_archive(&mut contents, gzipped, each);
    contents.finish()?;
    walked?;
    extract::finish_dirs(staging, &dirs)?;
    // Everything unpacked reaches the disk before any of it is moved into
    // place: one syncfs for the whole tree, rather than an fsync a file.
    // (A cap-std directory handle is O_PATH, which syncfs refuses.)
    staging
        .open(".")
        .and_then(|d| rustix::fs::syncfs(&d).map_err(io::Error::from))
        .map_err(|e| format!("cannot sync what was unpacked: {e}"))?;
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
    let reader = open_sized(t, m, entry)?;
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

/// A stored file's contents as they stream (decrypted when it is
/// encrypted and identities are given), whose end is reported only once
/// the stored bytes, and the plaintext, matched the manifest's size and
/// SHA-256. Otherwise the read at the end fails (`InvalidData`), and keeps
/// failing: whatever consumes it (a file, stdout, an archive walk, a
/// database client that commits at the end of its input) sees an error,
/// never a clean end.
struct Verified<'a> {
    contents: Box<dyn Read + 'a>,
    stored: Rc<RefCell<HashingReader<Box<dyn Read + 'a>>>>,
    entry: &'a StoredFile,
    /// The plaintext's hash and size, when decrypting (else the contents
    /// are the stored bytes, hashed once already).
    plain: Option<(sha2::Sha256, u64)>,
    checked: Option<Result<(), String>>,
}

/// One reader shared by the decryptor and the final check.
struct Shared<R>(Rc<RefCell<R>>);

impl<R: Read> Read for Shared<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

fn verified<'a>(
    reader: Box<dyn Read + 'a>,
    entry: &'a StoredFile,
    identities: &'a [Box<dyn age::Identity>],
) -> Result<Verified<'a>, String> {
    let stored = Rc::new(RefCell::new(HashingReader::new(reader)));
    let decrypting = entry.plain.is_some() && !identities.is_empty();
    let contents: Box<dyn Read + 'a> = if decrypting {
        crate::verify::decrypt(Shared(stored.clone()), identities)?
    } else {
        Box::new(Shared(stored.clone()))
    };
    let plain = decrypting.then(|| (sha2::Sha256::new(), 0));
    Ok(Verified { contents, stored, entry, plain, checked: None })
}

impl Verified<'_> {
    /// Reads what is left of the stored bytes (age need not read them all)
    /// and compares both hashes with the manifest's.
    fn check(&mut self) -> Result<(), String> {
        let mut stored = self.stored.borrow_mut();
        io::copy(&mut *stored, &mut io::sink()).map_err(|e| format!("stopped: {e}"))?;
        let sha = hex::encode(stored.hasher.clone().finalize());
        // An archive stored as a tree: the reader checked every blob
        // against its id and the root against the manifest's.
        let hashed = self.entry.tree.is_some() || sha == self.entry.sha256;
        if !hashed || stored.bytes != self.entry.bytes {
            return Err(format!(
                "its sha256 is {sha} ({} bytes), the manifest says {} ({} bytes)",
                stored.bytes, self.entry.sha256, self.entry.bytes
            ));
        }
        if let (Some(p), Some((hasher, bytes))) = (self.entry.plain.as_ref(), &self.plain) {
            let plain_sha = hex::encode(hasher.clone().finalize());
            if plain_sha != p.sha256 || *bytes != p.bytes {
                return Err(format!("its plaintext's sha256 is {plain_sha}, the manifest says {}", p.sha256));
            }
        }
        Ok(())
    }

    /// Reads to the end: the check's outcome.
    fn finish(mut self) -> Result<(), String> {
        io::copy(&mut self, &mut io::sink()).map(drop).map_err(reason)
    }
}

impl Read for Verified<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.checked.is_none() {
            let n = self.contents.read(buf).map_err(|e| io::Error::other(format!("stopped: {e}")))?;
            if let Some((hasher, bytes)) = &mut self.plain {
                hasher.update(&buf[..n]);
                *bytes += n as u64;
            }
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            self.checked = Some(self.check());
        }
        match self.checked.as_ref().expect("set above") {
            Ok(()) => Ok(0),
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e.clone())),
        }
    }
}

/// What went wrong in copying a [`Verified`] somewhere: its own errors
/// carry their message; an error of the system's is the writer's (a full
/// disk, a closed pipe).
fn reason(e: io::Error) -> String {
    match e.get_ref() {
        Some(inner) => inner.to_string(),
        None => format!("cannot write: {e}"),
    }
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

/// Copies the file's contents to `out` (decrypted when `identities` are
/// given and it is encrypted), failing at the end unless both hashes
/// matched.
fn stream(
    reader: Box<dyn Read + '_>,
    entry: &StoredFile,
    identities: &[Box<dyn age::Identity>],
    out: &mut impl Write,
) -> Result<(), String> {
    let mut contents = verified(reader, entry, identities)?;
    // Large reads: a syscall per 8 KiB (io::copy's buffer) costs more than
    // the copy itself.
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match contents.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => out.write_all(&buf[..n]).map_err(reason)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(reason(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs_match_within_a_component_only() {
        let yes = |p: &str, n: &str| assert!(glob(p.as_bytes(), n.as_bytes()), "{p} should match {n}");
        let no = |p: &str, n: &str| assert!(!glob(p.as_bytes(), n.as_bytes()), "{p} should not match {n}");
        yes("server1/sitedb-*.sql.gz", "server1/sitedb-20261203-013400.sql.gz");
        yes("*/sitedb-*.sql.gz", "server1/sitedb-20261203-013400.sql.gz");
        yes("www.*.tgz", "www.20261203.tgz");
        yes("a?c", "abc");
        yes("*", "x");
        yes("a*b*c", "aXbYbZc");
        no("*.sql.gz", "server1/sitedb.sql.gz");
        no("server1/*", "server1/a/b");
        no("a?c", "a/c");
        no("a*b", "a/b");
        no("sitedb-*.sql", "sitedb-1.sql.gz");
        // Many stars against a long name stay quick.
        let long = "a".repeat(4000);
        no(&("a*".repeat(50) + "c"), &(long + "b"));
    }
}
