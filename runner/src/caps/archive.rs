//! `archive.tar-gz`: a streamed, parallel-gzipped tar of read-root sources.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use cap_fs_ext::{FollowSymlinks, OpenOptionsFollowExt};
use cap_std::fs::{Dir, MetadataExt, OpenOptions};

use super::{Caps, io_error};
use crate::bindings::archive::Host;
use crate::bindings::types::{Error, FileInfo};
use crate::compress::{MaybeGz, ParallelGz};
use crate::policy::{Call, Grant};
use crate::store::tree::{self, Entry, EntryMeta};
use crate::store::{Origin, PendingFile, PendingTree};

/// gzip's default level, the one `tar czf` uses.
const GZIP_LEVEL: u32 = 6;

impl Host for Caps {
    fn tar_gz(&mut self, sources: Vec<String>, dest: String) -> Result<FileInfo, Error> {
        let before = self.denials;
        let note = self.output_note("archive.tar-gz", None, &dest);
        let result = (|| {
            let mut reads = Vec::with_capacity(sources.len());
            for source in &sources {
                match self.decide(Call::ArchiveRead { source })? {
                    Grant::Read { root, rel, member } => reads.push((root, rel, member)),
                    other => unreachable!("archive read granted as {other:?}"),
                }
            }
            let rel_dest = match self.decide(Call::StoreWrite { dest: &dest })? {
                Grant::Write { rel } => rel,
                other => unreachable!("store write granted as {other:?}"),
            };
            if reads.is_empty() {
                return Err(Error::InvalidArgument("tar-gz needs at least one source".into()));
            }
            let deadline = Deadline(Caps::call_deadline(self.call_timeout, self.run_deadline).0);
            let started = Instant::now();

            // A dry run walks and opens the same entries, writing nothing.
            // A store that keeps trees (a restic repository) takes each
            // entry as a node, unless two sources overlap (a tar may hold
            // a path twice, a tree may not).
            let members: Vec<&PathBuf> = reads.iter().map(|(_, _, m)| m).collect();
            let overlap = members
                .iter()
                .enumerate()
                .any(|(i, a)| members[i + 1..].iter().any(|b| a.starts_with(b) || b.starts_with(a)));
            let mut out = if self.dry_run {
                None
            } else if let Some(tree) = (!overlap)
                .then(|| self.store()?.create_tree(&rel_dest).map_err(|e| io_error(&dest, e)))
                .transpose()?
                .flatten()
            {
                Some(Out::Tree(tree))
            } else {
                let (pending, gzip) = self.store()?.create_gzipped(&rel_dest).map_err(|e| io_error(&dest, e))?;
                Some(Out::Tar(Box::new(match gzip {
                    true => MaybeGz::Gz(ParallelGz::new(pending, GZIP_LEVEL, 0)),
                    false => MaybeGz::Plain(pending),
                })))
            };
            let mut entries = 0u64;
            let mut skipped = Skipped { fatal: self.unreadable_fatal, names: Vec::new() };
            // On a terminal: a line with the total known up front (one
            // more walk of the sources, stat only; nothing of it otherwise).
            let bar = match out.is_some() && crate::progress::shown() {
                true => {
                    let mut total = 0u64;
                    for (root, rel, _) in &reads {
                        total += size_of(self.read_dir(*root)?, rel, &deadline);
                    }
                    crate::progress::Bar::new(&dest, Some(total))
                }
                false => crate::progress::Bar::new(&dest, None),
            };
            for (root, rel, member) in &reads {
                let dir = self.read_dir(*root)?;
                if let Some(Out::Tree(tree)) = out.as_mut() {
                    tree.member(member).map_err(|e| io_error(&dest, e))?;
                }
                entries += walk(dir, rel, member, &deadline, out.as_mut(), &mut skipped, &bar)?;
            }
            drop(bar);
            let Some(out) = out else {
                ::log::info!(target: "offsite::archive", "dry run: would write {dest} from {entries} entries");
                return Ok(FileInfo { path: rel_dest.to_string_lossy().into_owned(), bytes: 0, sha256: String::new() });
            };
            let origin = Origin {
                call: "archive.tar-gz".into(),
                sources: sources.clone(),
                skipped: skipped.names,
                ..Origin::default()
            };
            let stored = match out {
                Out::Tar(mut gz) => {
                    gz.write_all(&[0; tree::END]).map_err(|e| io_error(&dest, e))?;
                    let pending = gz.finish().map_err(|e| io_error(&dest, e))?;
                    pending.commit(origin)
                }
                Out::Tree(tree) => tree.commit(origin),
            }
            .map_err(|e| io_error(&dest, e))?;
            ::log::info!(
                target: "offsite::archive",
                "stored {} ({} entries, {} bytes, {}) in {:.1?}",
                stored.path,
                entries,
                stored.bytes,
                match &stored.tree {
                    Some(tree) => format!("as a tree, id {}", tree.id),
                    None => format!("sha256 {}", stored.sha256),
                },
                started.elapsed()
            );
            // An archive stored as a tree: its root tree's id, the SHA-256 of
            // the tree that names all it holds by their SHA-256.
            let sha256 = stored.tree.as_ref().map_or(&stored.sha256, |t| &t.id).clone();
            let info = FileInfo { path: stored.path.clone(), bytes: stored.bytes, sha256 };
            self.outputs.lock().unwrap_or_else(|e| e.into_inner()).push(stored);
            Ok(info)
        })();
        note.record(&result);
        self.noted("archive.tar-gz", before, result)
    }
}

/// The per-call timeout, checked between entries and on every read; a stop
/// asked for (crate::abort) ends the call there too.
struct Deadline(Instant);

impl Deadline {
    fn check(&self, what: &Path) -> Result<(), Error> {
        if crate::abort::requested() {
            return Err(Error::Io(format!("tar-gz {} at {}", crate::abort::message(), what.display())));
        }
        if Instant::now() > self.0 {
            return Err(Error::Timeout(format!(
                "tar-gz ran past its call timeout or the run's deadline at {}",
                what.display()
            )));
        }
        Ok(())
    }
}

/// Archives `rel` (beneath `dir`) and, for a directory, everything below it,
/// without following any symbolic link, into `tar`; with no `tar` (a dry run)
/// it only checks that every entry can be read. Returns the number of entries.
/// Entries the walk could not read, and whether that fails the call.
struct Skipped {
    /// `[read] unreadable = "fail"`.
    fatal: bool,
    names: Vec<String>,
}

impl Skipped {
    /// An entry that cannot be read: with `fatal`, the call fails;
    /// otherwise it is left out and logged as a warning (so the run is at
    /// best `warning`), and the archive lists it in its origin, as tar,
    /// restic and borg keep the rest and say what they left out.
    fn skip(&mut self, member: &Path, e: io::Error) -> Result<(), Error> {
        let shown = member.display().to_string();
        if self.fatal || e.kind() != io::ErrorKind::PermissionDenied {
            return Err(io_error(&shown, e));
        }
        ::log::warn!(target: "offsite::archive", "{shown}: left out of the archive: {e}");
        self.names.push(shown);
        Ok(())
    }
}

/// Where the walk's entries go: a tar stream (gzipped or not), or a
/// store's tree.
enum Out {
    Tar(Box<MaybeGz<PendingFile>>),
    Tree(PendingTree),
}

impl Out {
    /// One entry: in a tar, its header (see [`tree::tar_header`]), its
    /// data and the padding to the next block.
    fn add(&mut self, path: &Path, meta: &EntryMeta, entry: Entry<'_>) -> io::Result<()> {
        match self {
            Out::Tree(tree) => tree.add(path, meta, entry),
            Out::Tar(w) => {
                let link = match &entry {
                    Entry::Symlink(target) => Some(*target),
                    _ => None,
                };
                w.write_all(&tree::tar_header(path, meta, link)?)?;
                if let Entry::File(reader) = entry {
                    io::copy(reader, w)?;
                    w.write_all(&[0; 512][..tree::padding(meta.size)])?;
                }
                Ok(())
            }
        }
    }
}

fn walk(
    dir: &Dir,
    rel: &Path,
    member: &Path,
    deadline: &Deadline,
    mut out: Option<&mut Out>,
    skipped: &mut Skipped,
    bar: &crate::progress::Bar,
) -> Result<u64, Error> {
    let mut stack: Vec<(PathBuf, PathBuf)> = vec![(rel.to_path_buf(), member.to_path_buf())];
    let mut entries = 0u64;
    while let Some((rel, member)) = stack.pop() {
        deadline.check(&member)?;
        let shown = member.display().to_string();
        let meta = dir.symlink_metadata(&rel).map_err(|e| io_error(&shown, e))?;
        let file_type = meta.file_type();
        let mut em = EntryMeta::of(&meta);
        entries += 1;
        if file_type.is_dir() {
            let listed = dir.read_dir(&rel).and_then(|d| d.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>());
            let mut names: Vec<_> = match listed {
                Ok(names) => names,
                Err(e) => {
                    // The directory itself is archived, its contents not.
                    skipped.skip(&member, e)?;
                    Vec::new()
                }
            };
            names.sort();
            for name in names.into_iter().rev() {
                stack.push((rel.join(&name), member.join(&name)));
            }
            if let Some(o) = out.as_deref_mut() {
                o.add(&member, &em, Entry::Dir).map_err(|e| io_error(&shown, e))?;
            }
        } else if file_type.is_symlink() {
            let target = dir.read_link_contents(&rel).map_err(|e| io_error(&shown, e))?;
            if let Some(o) = out.as_deref_mut() {
                o.add(&member, &em, Entry::Symlink(&target)).map_err(|e| io_error(&shown, e))?;
            }
        } else if file_type.is_file() {
            // Non-blocking: a name swapped for a FIFO between the stat
            // above and this open would otherwise wait for a writer forever
            // (open(2) on a FIFO blocks), past every deadline. The type is
            // then checked again on what was really opened.
            let mut options = OpenOptions::new();
            options.read(true).follow(FollowSymlinks::No);
            {
                use cap_std::fs::OpenOptionsExt;
                options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
            }
            let file = match dir.open_with(&rel, &options) {
                Ok(file) => file,
                Err(e) => {
                    skipped.skip(&member, e)?;
                    entries -= 1;
                    continue;
                }
            };
            let opened = file.metadata().map_err(|e| io_error(&shown, e))?;
            if !opened.is_file() || opened.ino() != meta.ino() || opened.dev() != meta.dev() {
                return Err(Error::Io(format!(
                    "{shown}: it was replaced while being archived (a regular file when listed, something else when \
                     opened); archive it again"
                )));
            }
            if let Some(o) = out.as_deref_mut() {
                // Size from the open file, so header and data agree.
                let size = opened.len();
                em.size = size;
                bar.set_message(|| shown.clone());
                let mut reader = ExactReader { inner: file, remaining: size, member: &member, deadline, bar };
                o.add(&member, &em, Entry::File(&mut reader)).map_err(|e| map_read_error(&shown, e))?;
                // A file a tree took unread (unchanged since the last good
                // run) still counts on the progress line.
                bar.inc(reader.remaining);
                if reader.inner.metadata().map(|m| m.len()).unwrap_or(size) > size {
                    ::log::warn!(target: "offsite::archive", "{shown}: file grew while being archived; stored its first {size} bytes");
                }
            }
        } else {
            if em.entry_type().is_none() {
                ::log::info!(target: "offsite::archive", "{shown}: socket ignored");
                entries -= 1;
                continue;
            }
            if let Some(o) = out.as_deref_mut() {
                o.add(&member, &em, Entry::Special).map_err(|e| io_error(&shown, e))?;
            }
        }
    }
    Ok(entries)
}

/// The bytes of the regular files beneath `rel` (links not followed), for
/// a progress line's total; what cannot be read counts nothing.
fn size_of(dir: &Dir, rel: &Path, deadline: &Deadline) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![rel.to_path_buf()];
    while let Some(rel) = stack.pop() {
        if Instant::now() > deadline.0 {
            break;
        }
        let Ok(meta) = dir.symlink_metadata(&rel) else { continue };
        if meta.is_file() {
            total += meta.len();
        } else if meta.is_dir()
            && let Ok(entries) = dir.read_dir(&rel)
        {
            stack.extend(entries.flatten().map(|e| rel.join(e.file_name())));
        }
    }
    total
}

fn map_read_error(what: &str, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::TimedOut {
        return Error::Timeout(format!("{what}: {e}"));
    }
    io_error(what, e)
}

/// Yields exactly `remaining` bytes of `inner`, failing if the file ends
/// early (it shrank while being read) or the call's deadline passes. A short
/// file would otherwise produce a tar whose header lies about its data.
struct ExactReader<'a> {
    inner: cap_std::fs::File,
    remaining: u64,
    member: &'a Path,
    deadline: &'a Deadline,
    bar: &'a crate::progress::Bar,
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        if Instant::now() > self.deadline.0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "tar-gz ran past its call timeout"));
        }
        let want = buf.len().min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank by {} bytes while being archived", self.member.display(), self.remaining),
            ));
        }
        self.remaining -= n as u64;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use std::sync::Arc;
    use tar::EntryType;

    use super::*;
    use crate::caps::Clock;
    use crate::policy::Policy;
    use crate::site::Site;
    use crate::store::{Budget, StoreRoot, run::RunHeader};

    fn caps_in(dir: &Path) -> Caps {
        let site = Site::current_dir(dir).unwrap();
        let mut caps = Caps::new("t", "s", Policy::for_site(&site, BTreeMap::new()), Clock::System);
        let header = RunHeader {
            run_id: "r".into(),
            site: "s".into(),
            hostname: "h".into(),
            pid: 1,
            script: crate::store::manifest::ScriptRef {
                name: "t".into(),
                version: "1".into(),
                sha256: String::new(),
                ..Default::default()
            },
            grants_sha256: String::new(),
            started: String::new(),
        };
        let store =
            StoreRoot::open(site.store.dir().unwrap()).unwrap().begin_run(&header, Budget::unlimited()).unwrap();
        caps.store = Some(Arc::new(store));
        caps
    }

    /// The run's files (staged until it ends) and the source tree, without
    /// the store's own directory.
    fn staged(dir: &Path, name: &str) -> std::path::PathBuf {
        dir.join(".offsite/runs/r").join(name)
    }

    fn names(dir: &Path) -> Vec<std::ffi::OsString> {
        let mut v: Vec<_> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n != ".offsite").collect();
        v.sort();
        v
    }

    fn list(archive: &Path) -> Vec<(String, EntryType, Vec<u8>)> {
        let file = std::fs::File::open(archive).unwrap();
        let mut ar = tar::Archive::new(flate2::read::MultiGzDecoder::new(file));
        ar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let kind = e.header().entry_type();
                let mut data = Vec::new();
                if kind == EntryType::Symlink {
                    data = e.link_name_bytes().unwrap().into_owned();
                } else {
                    e.read_to_end(&mut data).unwrap();
                }
                (name, kind, data)
            })
            .collect()
    }

    /// A local user who can write under a read root swaps a listed file for
    /// a FIFO (renameat2 RENAME_EXCHANGE) between the walk's stat and its
    /// open. Before the fix the open waited for a writer forever; now every
    /// call ends, the swapped-in FIFO is never read, and a call that lost
    /// the race fails with a clear error.
    #[test]
    fn a_fifo_swapped_in_during_the_walk_never_hangs_the_call() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("data"), "real").unwrap();
        rustix::fs::mknodat(rustix::fs::CWD, src.join("pipe"), rustix::fs::FileType::Fifo, 0o600.into(), 0).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (stop, src) = (Arc::clone(&stop), src.clone());
            std::thread::spawn(move || {
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    rustix::fs::renameat_with(
                        rustix::fs::CWD,
                        src.join("data"),
                        rustix::fs::CWD,
                        src.join("pipe"),
                        rustix::fs::RenameFlags::EXCHANGE,
                    )
                    .unwrap();
                    swaps += 1;
                }
                swaps
            })
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let worker = {
            let dir = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let mut caps = caps_in(&dir);
                let (mut ok, mut replaced) = (0, 0);
                for i in 0..300 {
                    match caps.tar_gz(vec!["src".into()], format!("a{i}.tgz")) {
                        Ok(_) => ok += 1,
                        Err(Error::Io(m)) if m.contains("replaced while being archived") => replaced += 1,
                        Err(e) => panic!("unexpected error: {e:?}"),
                    }
                }
                done_tx.send((ok, replaced)).unwrap();
            })
        };
        let result = done_rx.recv_timeout(std::time::Duration::from_secs(60));
        stop.store(true, Ordering::Relaxed);
        let swaps = swapper.join().unwrap();
        let (ok, replaced) = result.expect("an archive call hung on a FIFO swapped in by a local user");
        worker.join().unwrap();
        assert!(swaps > 0 && ok + replaced == 300, "ok {ok}, replaced {replaced}, swaps {swaps}");
    }

    #[test]
    fn archives_files_dirs_and_symlinks_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("beoserver");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("book1.dat"), b"chapter one").unwrap();
        std::fs::write(src.join("sub/deep.txt"), vec![7u8; 3 << 20]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("passwd-link")).unwrap();
        let mut caps = caps_in(dir.path());
        let info = caps.tar_gz(vec!["beoserver".into()], "out.tgz".into()).unwrap();
        assert_eq!(info.path, "out.tgz");
        let on_disk = std::fs::read(staged(dir.path(), "out.tgz")).unwrap();
        assert_eq!(info.bytes, on_disk.len() as u64);
        assert_eq!(caps.outputs().len(), 1);
        let entries = list(&staged(dir.path(), "out.tgz"));
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["beoserver", "beoserver/book1.dat", "beoserver/passwd-link", "beoserver/sub", "beoserver/sub/deep.txt"]
        );
        assert_eq!(entries[1].2, b"chapter one");
        assert_eq!(entries[2].1, EntryType::Symlink);
        assert_eq!(entries[2].2, b"/etc/passwd", "the link is stored, not followed");
        assert_eq!(entries[4].2.len(), 3 << 20);
    }

    #[test]
    fn denied_sources_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut caps = caps_in(dir.path());
        let err = caps.tar_gz(vec!["/etc".into()], "x.tgz".into()).unwrap_err();
        assert!(matches!(err, Error::Denied(_)), "{err:?}");
        let err = caps.tar_gz(vec!["../x".into()], "x.tgz".into()).unwrap_err();
        assert!(matches!(err, Error::Denied(_)), "{err:?}");
        assert!(names(dir.path()).is_empty());
        assert!(names(&staged(dir.path(), "")).is_empty());
        assert_eq!(caps.denials, 2);
    }

    #[test]
    fn a_missing_source_fails_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        let mut caps = caps_in(dir.path());
        let err = caps.tar_gz(vec!["a".into(), "nope".into()], "x.tgz".into()).unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err:?}");
        assert_eq!(names(dir.path()), ["a"]);
        assert!(names(&staged(dir.path(), "")).is_empty());
    }

    #[test]
    fn an_expired_deadline_is_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let mut caps = caps_in(dir.path());
        caps.call_timeout = std::time::Duration::ZERO;
        std::thread::sleep(std::time::Duration::from_millis(2));
        let err = caps.tar_gz(vec!["f".into()], "x.tgz".into()).unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    }

    #[test]
    fn dry_run_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let mut caps = caps_in(dir.path());
        caps.dry_run = true;
        caps.tar_gz(vec!["f".into()], "x.tgz".into()).unwrap();
        assert!(!staged(dir.path(), "x.tgz").exists());
    }
}
