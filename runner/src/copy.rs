//! `[[copy]]`: after a good run, its files and manifest go to each further
//! store of the site (a directory, or S3), each with its own retention.
//!
//! A copy is a run in the other store with the same run id, header and
//! records: each file is streamed from the store that has it into the
//! copy's store through the same staged, hashed and atomic path a run's
//! files take, and must hash to what its manifest says (so a file that
//! rotted in the first store is not copied as good). The copy's manifest
//! comes last, as for any run.
//!
//! A copy that fails is a warning on the run, never a failed backup: the
//! run itself is safe in the first store. The next run copies every good
//! run newer than the copy's newest (those its retention would keep), so
//! a copy missed once catches up.
//!
//! Copies are part of the run, so the run's deadline bounds them: every
//! call to an S3 store ends by it ([`deadline_scope`]), and a file being
//! copied stops at it. What a stopped copy must undo (its uploads, its
//! lock) gets [`CLEANUP`] more.

use std::io::{self, BufRead, Write};
use std::time::{Duration, Instant};

use sha2::Digest;

use crate::s3::client::{DeadlineScope, deadline_scope};
use crate::site::{CopyTo, Site};
use crate::store::backend::{self, Access, Held, LockFailure};
use crate::store::retention;
use crate::store::run::{Outcome, RunHeader};
use crate::store::{Budget, Manifest, Root, Status, StoredFile};

/// How long a copy stopped by the run's deadline has to undo what it
/// started (abort its uploads, free its lock).
pub const CLEANUP: Duration = Duration::from_secs(30);

/// Copies to every `[[copy]]` store of `site` what it lacks of `from`,
/// taking each copy's lock as `me`, all by `until` (the run's deadline).
/// Returns one warning per copy that failed (the rest is logged).
pub fn copy_all(
    from: &Root,
    site: &Site,
    me: &RunHeader,
    signer: Option<&ssh_key::PrivateKey>,
    until: Option<Instant>,
) -> Vec<String> {
    let mut failed = Vec::new();
    let _bounded = deadline_scope(until);
    for (i, copy) in site.copies.iter().enumerate() {
        if let Some(until) = until
            && Instant::now() >= until
        {
            failed.push(format!(
                "copy {} to {} did not start: the run's deadline ({}) had passed; the run is safe in {}, and the \
                 next run copies it",
                i + 1,
                copy.store.display(),
                humantime::format_duration(site.limits.deadline),
                site.store.display()
            ));
            continue;
        }
        match copy_to(from, site, copy, me, signer, until) {
            Ok((lines, skipped)) => {
                lines.iter().for_each(|l| log::info!(target: "offsite::copy", "{l}"));
                failed.extend(
                    skipped.into_iter().map(|why| format!("copy {} to {}: {why}", i + 1, copy.store.display())),
                );
            }
            Err(e) => failed.push(format!(
                "copy {} to {} failed: {e}; the run is safe in {}, and the next run copies it again",
                i + 1,
                copy.store.display(),
                site.store.display()
            )),
        }
    }
    failed
}

/// A copy's store, opened and locked for this process.
struct Target {
    root: Root,
    lock: Box<dyn Held>,
}

/// After a failure, while the guard lives: what is left to undo gets
/// [`CLEANUP`] more than the deadline (which may have passed).
fn cleanup_time(until: Option<Instant>) -> DeadlineScope {
    deadline_scope(until.map(|u| u.max(Instant::now()) + CLEANUP))
}

fn open(
    copy: &CopyTo,
    site: &Site,
    me: &RunHeader,
    signer: Option<&ssh_key::PrivateKey>,
    until: Option<Instant>,
) -> io::Result<Target> {
    let root = backend::open(&copy.store, Access::Copy, site.limits.call_timeout, signer.cloned()).map_err(|e| {
        let kind = if e.is_not_found() { io::ErrorKind::NotFound } else { io::ErrorKind::Other };
        io::Error::new(kind, e.to_string())
    })?;
    let lock = match root.lock(me) {
        Ok(locked) => locked.lock,
        Err(e @ LockFailure::Busy(_)) => return Err(io::Error::new(io::ErrorKind::ResourceBusy, e.to_string())),
        Err(e) => return Err(io::Error::other(e.to_string())),
    };
    let recovered = match root.recover() {
        Ok(lines) => lines,
        Err(e) => {
            let _grace = cleanup_time(until);
            drop(lock);
            return Err(e);
        }
    };
    for line in recovered {
        log::warn!(target: "offsite::copy", "{}: {line}", copy.store.display());
    }
    Ok(Target { root, lock })
}

fn copy_to(
    from: &Root,
    site: &Site,
    copy: &CopyTo,
    me: &RunHeader,
    signer: Option<&ssh_key::PrivateKey>,
    until: Option<Instant>,
) -> io::Result<(Vec<String>, Vec<String>)> {
    let target = open(copy, site, me, signer, until)?;
    let lines = match copy_runs(from, site, copy, &target, until) {
        Ok(lines) => lines,
        Err(e) => {
            let _grace = cleanup_time(until);
            drop(target);
            return Err(e);
        }
    };
    if let Err(e) = target.lock.release() {
        log::warn!(target: "offsite::copy", "cannot free the lock of {}: {e}", copy.store.display());
    }
    Ok(lines)
}

/// What the copy in `target` lacks, copied; then its retention.
fn copy_runs(
    from: &Root,
    site: &Site,
    copy: &CopyTo,
    target: &Target,
    until: Option<Instant>,
) -> io::Result<(Vec<String>, Vec<String>)> {
    let to = &target.root;
    let (there, _) = to.manifests()?;
    let newest_there = there.iter().filter(|m| m.status.publishes()).map(|m| m.run.run_id.clone()).max();
    let (here, _) = from.manifests()?;
    let runs = from.runs_of(&site.name);
    let good: Vec<&Manifest> = here.iter().filter(|m| runs.includes(m) && m.status.publishes()).collect();
    // Every good or partial run newer than the copy's newest one, but not those
    // the copy's own retention would prune at once (a new copy of a long
    // history with `keep_last = 7` gets seven runs, not all).
    let mut todo: Vec<&Manifest> =
        good.into_iter().filter(|m| newest_there.as_ref().is_none_or(|n| m.run.run_id > *n)).collect();
    if !copy.retention.is_empty() && !todo.is_empty() {
        let mut combined: Vec<Manifest> = there.clone();
        combined.extend(todo.iter().map(|m| (*m).clone()));
        combined.sort_by(|a, b| a.run.run_id.cmp(&b.run.run_id));
        let plan = retention::plan(&combined, &to.runs_of(&site.name), &copy.retention);
        let kept: std::collections::BTreeSet<&str> =
            plan.iter().filter(|v| v.keep()).map(|v| v.run_id.as_str()).collect();
        todo.retain(|m| kept.contains(m.run.run_id.as_str()));
    }
    let mut lines = Vec::new();
    let mut skipped = Vec::new();
    for m in todo {
        // A run whose files are gone or not what its manifest says (lost
        // or rotted in the first store, a manifest naming a path no run
        // may store) is left out for good, with a warning: trying it again would block every
        // newer run. Anything else (the network, a full disk) stops here
        // and is tried again by the next run.
        if let Err(e) = copy_run(from, target, m, until) {
            if !matches!(e.kind(), io::ErrorKind::InvalidData | io::ErrorKind::NotFound) {
                return Err(e);
            }
            skipped.push(format!("left out run {}, which cannot be copied as it is: {e}", m.run.run_id));
            continue;
        }
        lines.push(format!(
            "copied run {} ({} file(s), {} bytes) to {}",
            m.run.run_id,
            m.files.len(),
            m.bytes(),
            copy.store.display()
        ));
    }
    if !copy.retention.is_empty() {
        lines.extend(to.resume_prune()?);
        let (manifests, _) = to.manifests()?;
        let plan = retention::plan(&manifests, &to.runs_of(&site.name), &copy.retention);
        lines.extend(to.prune(&plan)?.into_iter().map(|l| format!("{}: {l}", copy.store.display())));
    }
    Ok((lines, skipped))
}

/// One run into the copy: each file streamed and checked, then the
/// manifest. A copy that fails leaves nothing in the copy's store (no
/// manifest either), so the next run tries it again.
fn copy_run(from: &Root, to: &Target, m: &Manifest, until: Option<Instant>) -> io::Result<()> {
    let store = to.root.begin_run(&m.run, Budget::unlimited(), Vec::new())?;
    let copied = (|| {
        for f in m.published() {
            // A manifest is data another machine may have written: only a
            // path a script could have stored is copied.
            let rel = crate::policy::store_path(&f.path).map_err(|d| {
                io::Error::new(io::ErrorKind::InvalidData, format!("its manifest names a file the copy refuses: {d}"))
            })?;
            copy_file(from, &store, m, f, &rel, until)?;
        }
        Ok::<(), io::Error>(())
    })();
    if let Err(e) = copied {
        let _grace = cleanup_time(until);
        to.root.abandon_run(store)?;
        return Err(io::Error::new(e.kind(), format!("copying run {}: {e}", m.run.run_id)));
    }
    // A partial run stays partial in the copy, with what it published.
    let outcome = match m.status {
        Status::Partial => Outcome {
            error: m.error.clone(),
            warnings: m.warnings.clone(),
            publish_completed: true,
            failed: m.failed.clone(),
            aborted: false,
        },
        _ => Outcome { warnings: m.warnings.clone(), ..Outcome::default() },
    };
    let recorded = to.root.finish_run(&m.run, &store, &outcome, to.lock.as_ref())?;
    if !recorded.status.publishes() {
        return Err(io::Error::other(recorded.error.unwrap_or_else(|| format!("run {} was not copied", m.run.run_id))));
    }
    Ok(())
}

/// One file of `m` into the copy's run. A gzip file goes into a store that
/// compresses what it stores (a restic repository) as its plaintext, as a
/// run's own gzip outputs do there, so that a dump that changes a little
/// stores only the changed chunks; the gzip bytes read must still be the
/// manifest's. Anything else is copied byte for byte.
fn copy_file(
    from: &Root,
    store: &crate::store::Store,
    m: &Manifest,
    f: &StoredFile,
    rel: &std::path::Path,
    until: Option<Instant>,
) -> io::Result<()> {
    let gzip_name = crate::store::uncompressed_name(&f.path) != f.path;
    if gzip_name && f.plain.is_none() && f.asked.is_none() {
        let (_, file) = from.open_file(&m.location(f))?;
        let mut file = io::BufReader::with_capacity(256 << 10, file);
        if file.fill_buf()?.starts_with(&[0x1f, 0x8b]) {
            let (mut pending, caller_gzips) = store.create_gzipped(rel)?;
            if caller_gzips {
                copy_stream(&mut file, &mut Until { inner: &mut pending, until })?;
                pending.commit_copy(f)?;
                return Ok(());
            }
            let mut read = crate::verify::HashingReader::new(file);
            let unzipped = (|| {
                let mut gz = flate2::read::MultiGzDecoder::new(&mut read);
                copy_stream(&mut gz, &mut Until { inner: &mut pending, until })?;
                // Whatever follows the last member counts too.
                io::copy(&mut read, &mut io::sink())
            })();
            match unzipped {
                Ok(_) => {
                    let sha256 = hex::encode(read.hasher.finalize_reset());
                    pending.commit_gunzipped_copy(f, read.bytes, &sha256)?;
                    return Ok(());
                }
                // Not gzip after all (a name and two bytes can lie): the
                // file is copied as it is, and its hash judges it.
                Err(e) if matches!(e.kind(), io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData) => drop(pending),
                Err(e) => return Err(e),
            }
        }
    }
    let mut pending = store.create(rel)?;
    let (_, mut file) = from.open_file(&m.location(f))?;
    copy_stream(&mut file, &mut Until { inner: &mut pending, until })?;
    pending.commit_copy(f)?;
    Ok(())
}

/// Copies all of `from` into `to` in large pieces (an object arrives in
/// pieces of about that size; a file is read with as few calls).
fn copy_stream(from: &mut dyn io::Read, to: &mut dyn Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// A writer that fails once `until` has passed.
struct Until<'a, W> {
    inner: &'a mut W,
    until: Option<Instant>,
}

impl<W: Write> Write for Until<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.until.is_some_and(|u| Instant::now() >= u) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "stopped at the run's deadline"));
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_passes_bytes_before_the_deadline_and_stops_at_it() {
        let mut out = Vec::new();
        let later = Instant::now() + Duration::from_secs(3600);
        Until { inner: &mut out, until: Some(later) }.write_all(b"abc").unwrap();
        Until { inner: &mut out, until: None }.write_all(b"def").unwrap();
        assert_eq!(out, b"abcdef");
        let passed = Instant::now();
        let e = Until { inner: &mut out, until: Some(passed) }.write_all(b"ghi").unwrap_err();
        assert_eq!((e.kind(), out.len()), (io::ErrorKind::TimedOut, 6));
    }
}
