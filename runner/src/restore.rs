//! Reading backups back: `offsite runs` lists a store's runs, `offsite cat`
//! streams one stored file to stdout, checked against its manifest as it
//! goes. Both read any store kind through the same `Root` the runs write
//! with, and work on a bare store directory without a site file (a new
//! machine after a disaster).

use std::io::{self, Read, Write};
use std::path::Path;

use anyhow::{Context, anyhow};
use sha2::Digest;

use crate::cli::{Exit, ExitContext, Failure};
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
/// as `run` takes it) whose store it opens.
pub fn open(target: &Path) -> Result<Target, Failure> {
    if target.is_dir() {
        let store = crate::site::StoreAt::Dir(target.to_path_buf());
        let root = crate::cli::open_existing(&store, crate::site::Limits::default().call_timeout)?;
        return Ok(Target { root, shown: target.display().to_string(), verify_key: None });
    }
    let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
    let file = crate::run::site_path(target);
    let site = crate::site::Site::load(&file, &cwd).exit(Exit::Usage)?;
    let root = crate::cli::open_existing(&site.store, site.limits.call_timeout)?;
    Ok(Target { root, shown: site.store.display(), verify_key: site.protect.verify_key })
}

/// The runs of `target`'s store, newest first: one line each (or one JSON
/// document with `json`).
pub fn runs(target: &Path, json: bool) -> Result<(), Failure> {
    let t = open(target)?;
    let (mut all, bad) =
        t.root.manifests().with_context(|| format!("cannot read the store {}", t.shown)).exit(Exit::BackupFailed)?;
    all.reverse();
    let signed = |m: &Manifest| match &t.root {
        Root::Dir(r) => r.manifest_bytes(&m.run.run_id).is_ok_and(|(_, sig)| sig.is_some()),
        Root::S3(r) => r.manifest_bytes(&m.run.run_id).is_ok_and(|(_, sig)| sig.is_some()),
    };
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
            crate::text::escape(&crate::status::local(&m.run.started)),
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

/// `offsite cat TARGET [RUN] FILE`: the file's bytes to stdout, decrypted
/// with `identity` when it is encrypted and one is given. Its size is
/// checked before the first byte goes out, and its SHA-256 (and the
/// plaintext's) as it streams: on a mismatch the command fails after the
/// bytes were written, and says they must be discarded.
pub fn cat(
    target: &Path,
    run: Option<&str>,
    file: &str,
    identity: Option<&Path>,
    key: Option<&Path>,
) -> Result<(), Failure> {
    let t = open(target)?;
    let (all, _) =
        t.root.manifests().with_context(|| format!("cannot read the store {}", t.shown)).exit(Exit::BackupFailed)?;
    let m = select(&all, run).map_err(|e| anyhow!("{}: {e}", t.shown)).exit(Exit::Usage)?;
    // A signed store's manifest is trusted only with a valid signature.
    if let Some(key) = key.map(Path::to_path_buf).or(t.verify_key.clone()) {
        let key = protect::verify_key(&key).exit(Exit::Usage)?;
        let (json, sig) = match &t.root {
            Root::Dir(r) => r.manifest_bytes(&m.run.run_id),
            Root::S3(r) => r.manifest_bytes(&m.run.run_id).map_err(io::Error::other),
        }
        .with_context(|| format!("cannot read the manifest of run {}", m.run.run_id))
        .exit(Exit::BackupFailed)?;
        let sig =
            sig.ok_or_else(|| anyhow!("run {}: its manifest is not signed", m.run.run_id)).exit(Exit::BackupFailed)?;
        protect::verify(&key, &json, &sig)
            .map_err(|e| anyhow!("run {}: the manifest's signature does not verify: {e}", m.run.run_id))
            .exit(Exit::BackupFailed)?;
    }
    let wanted = file.strip_prefix("./").unwrap_or(file);
    let entry = m
        .files
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
        .exit(Exit::Usage)?;
    let identities = match identity {
        Some(path) => age::IdentityFile::from_file(path.display().to_string())
            .map_err(|e| e.to_string())
            .and_then(|f| f.into_identities().map_err(|e| e.to_string()))
            .map_err(|e| anyhow!("--age-identity {}: {e}", path.display()))
            .exit(Exit::Usage)?,
        None => Vec::new(),
    };
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
    let mut out = io::BufWriter::with_capacity(1 << 16, io::stdout().lock());
    stream(reader, entry, &identities, &mut out)
        .and_then(|()| out.flush().map_err(|e| format!("writing to stdout: {e}")))
        .map_err(|e| anyhow!("{}: {e}", location.display()))
        .exit(Exit::BackupFailed)
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
    let failed = |what: &str| format!("{what}; the bytes written so far are not the stored file and must be discarded");
    let plain = match (&entry.plain, identities.is_empty()) {
        (Some(plain), false) => {
            let decryptor = age::Decryptor::new(io::BufReader::new(&mut stored)).map_err(|e| format!("age: {e}"))?;
            let reader = decryptor
                .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
                .map_err(|e| format!("age: {e}"))?;
            let mut decrypted = HashingReader::new(reader);
            io::copy(&mut decrypted, out).map_err(|e| failed(&format!("stopped: {e}")))?;
            let sha = hex::encode(decrypted.hasher.finalize());
            Some((sha, decrypted.bytes, plain.clone()))
        }
        _ => {
            io::copy(&mut stored, out).map_err(|e| failed(&format!("stopped: {e}")))?;
            None
        }
    };
    // What age did not need of the ciphertext is hashed too.
    io::copy(&mut stored, &mut io::sink()).map_err(|e| failed(&format!("stopped: {e}")))?;
    let sha = hex::encode(stored.hasher.finalize());
    if sha != entry.sha256 || stored.bytes != entry.bytes {
        return Err(failed(&format!(
            "its sha256 is {sha} ({} bytes), the manifest says {} ({} bytes)",
            stored.bytes, entry.sha256, entry.bytes
        )));
    }
    if let Some((sha, bytes, plain)) = plain
        && (sha != plain.sha256 || bytes != plain.bytes)
    {
        return Err(failed(&format!("its plaintext's sha256 is {sha}, the manifest says {}", plain.sha256)));
    }
    Ok(())
}
