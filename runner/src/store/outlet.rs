//! Where a run's files go while it runs: the write half of a [`Backend`].
//!
//! A [`super::Store`] counts, hashes and (for a site that encrypts)
//! encrypts every file; what it does not know is where the bytes end.
//! That is an [`Outlet`]: a directory store stages each file under a
//! temporary name in the run's staging directory (`StagingOutlet`), a
//! bucket uploads it to its final key (`s3.rs`). Either way a file kept
//! by [`OutFile::keep`] is durable and still unseen: the backend's
//! `finish_run` makes it visible, or not.
//!
//! [`Backend`]: super::backend::Backend

use std::io::{self, Write};
use std::path::Path;

use cap_std::fs::Dir;

use super::durable::DurableFile;
use super::{create_new, make_dirs, sync_dir, temp_name};

/// Where one run's files go.
pub trait Outlet: Send + Sync {
    /// Starts the file at `rel` (already checked by the policy and
    /// claimed by the run), stored as `final_name` in `rel`'s directory.
    fn create(&self, rel: &Path, final_name: &str) -> io::Result<Box<dyn OutFile>>;

    /// Like [`create`](Self::create), for the copy of `of`, whose bytes
    /// outlive a run that does not finish them (see [`Partial`]); the
    /// next run that copies the same, unchanged file goes on from them.
    /// `None` where the outlet keeps no partial files.
    fn create_resumable(&self, rel: &Path, final_name: &str, of: &RemoteFile) -> io::Result<Option<Resumed>> {
        let _ = (rel, final_name, of);
        Ok(None)
    }

    /// Whether the outlet compresses what it stores (a restic
    /// repository): then a file asked for gzipped is stored as it is, so
    /// that what changes little between runs is stored once.
    fn compresses(&self) -> bool {
        false
    }

    /// Whether an archive may go in as a tree of nodes (see
    /// [`super::tree`]) rather than as a tar file.
    fn keeps_trees(&self) -> bool {
        false
    }

    /// Starts the archive at `rel`, stored as `final_name`, as a tree.
    fn create_tree(&self, rel: &Path, final_name: &str) -> io::Result<Option<Box<dyn super::tree::TreeOut>>> {
        let _ = (rel, final_name);
        Ok(None)
    }
}

/// A file on a server, as a fetch opened it: what a partial copy of it
/// is kept under, and must match to be used again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteFile {
    pub host: String,
    /// Its canonical path on the server.
    pub path: String,
    /// `device inode size mtime`, as the server reported it.
    pub identity: String,
    pub size: u64,
}

/// A resumable file: its first `bytes` bytes are already in it, readable
/// from `prefix` (for the store to count and hash), and `out` writes on
/// from there.
pub struct Resumed {
    pub out: Box<dyn OutFile>,
    pub bytes: u64,
    pub prefix: std::fs::File,
}

/// One file's bytes on their way. Dropped before [`keep`](Self::keep)
/// (a failed call, bytes that did not hash right), it leaves nothing: a
/// temporary file is removed, an upload aborted.
pub trait OutFile: Write + Send {
    /// Space to read the next bytes into, so they need not be copied
    /// again; [`filled`](Self::filled) takes the first `n`. Never empty.
    fn spare(&mut self) -> &mut [u8];

    /// Writes the first `n` bytes of [`spare`](Self::spare).
    fn filled(&mut self, n: usize) -> io::Result<()>;

    /// Every byte has been written: makes them durable, still unseen by
    /// readers of the store. What the run's end must still do to publish
    /// the file, if anything, comes back.
    fn keep(self: Box<Self>) -> io::Result<Option<Box<dyn Unpublished>>>;

    /// A resumable file makes what it has durable, and notes how much
    /// that is, for a later run to go on from. Others do nothing.
    fn checkpoint(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// A resumable file's bytes are of no use to a later run (the file
    /// changed as it was read): dropped, it leaves nothing.
    fn discard(&mut self) {}
}

/// A kept file that becomes visible only when its run publishes (a
/// sealed upload); dropped, it is discarded.
pub trait Unpublished: Send {
    /// Its path in the store.
    fn rel(&self) -> &str;

    /// Makes it visible at its path, whole, replacing what was there.
    fn publish(self: Box<Self>) -> io::Result<()>;
}

/// Writes what is left of `file`, syncs it, renames it from `from` to
/// `to` and syncs `to`'s directory: whole and durable under its name.
fn settle(file: DurableFile, from: (&Dir, &str), to: (&Dir, &str)) -> io::Result<()> {
    let file = file.finish()?;
    file.sync_all()?;
    drop(file);
    from.0.rename(from.1, to.0, to.1)?;
    sync_dir(to.0)
}

/// A directory store: each file is written under a temporary name in the
/// run's staging directory, then synced and renamed there; the run's end
/// moves the staged files into place. Large fetches are written in the
/// store's [`Partial`] directory instead, and renamed into the staging
/// directory when whole.
pub struct StagingOutlet {
    pub staging: Dir,
    pub partial: Option<Partial>,
}

impl Outlet for StagingOutlet {
    fn create(&self, rel: &Path, final_name: &str) -> io::Result<Box<dyn OutFile>> {
        let parent = make_dirs(&self.staging, rel.parent().unwrap_or(Path::new("")))?;
        let tmp_name = temp_name(final_name);
        let file = DurableFile::new(create_new(&parent, &tmp_name)?.into_std());
        Ok(Box::new(StagedFile { parent, tmp_name, final_name: final_name.to_string(), file: Some(file), kept: false }))
    }

    fn create_resumable(&self, rel: &Path, final_name: &str, of: &RemoteFile) -> io::Result<Option<Resumed>> {
        let Some(partial) = &self.partial else { return Ok(None) };
        let parent = make_dirs(&self.staging, rel.parent().unwrap_or(Path::new("")))?;
        partial.open(parent, final_name, of)
    }
}

/// `.offsite/partial/` of a directory store: the bytes of large fetches
/// in progress, or left by a run that did not finish them. Each is named
/// by a hash of its site, host and remote path (`KEY`, at most one per
/// file), beside `KEY.json`, the note of which file it is a copy of and
/// how many of its bytes are durable. A fetch of the same file by the
/// same site, with the same identity, goes on from those bytes; any
/// other fetch of it starts again and replaces them. A finished copy is
/// renamed into its run's staging directory, so a partial file is never
/// seen as a backup. Removed when they have not been touched for
/// [`PARTIAL_KEEP_DAYS`] days (`StoreRoot::recover`).
pub struct Partial {
    pub dir: Dir,
    pub site: String,
    /// Keys a file of this run is writing: a second fetch of the same
    /// file at once (another destination) writes a staged file of its own.
    pub busy: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// How long a partial file waits for the run that would use it.
pub const PARTIAL_KEEP_DAYS: u64 = 7;

/// A partial file's note.
#[derive(serde::Serialize, serde::Deserialize)]
struct Note {
    site: String,
    #[serde(flatten)]
    of: RemoteFile,
    /// How many of its first bytes are durable.
    bytes: u64,
}

impl Partial {
    fn key(&self, of: &RemoteFile) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for part in [&self.site, &of.host, &of.path] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(&h.finalize()[..16])
    }

    /// The durable bytes of an earlier copy of `of`, if a note says there
    /// are some; else a new, empty file.
    fn open(&self, parent: Dir, final_name: &str, of: &RemoteFile) -> io::Result<Option<Resumed>> {
        let key = self.key(of);
        if !self.busy.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone()) {
            return Ok(None);
        }
        let busy = Busy { set: std::sync::Arc::clone(&self.busy), key: key.clone() };
        let note_name = format!("{key}.json");
        let usable = self
            .dir
            .read(&note_name)
            .ok()
            .and_then(|b| serde_json::from_slice::<Note>(&b).ok())
            .filter(|n| n.site == self.site && n.of == *of)
            // Never all of it: the fetch still opens and checks the file.
            .map(|n| n.bytes.min(of.size.saturating_sub(1)) / super::durable::RESUME_UNIT * super::durable::RESUME_UNIT)
            .unwrap_or(0);
        let mut options = cap_std::fs::OpenOptions::new();
        options.read(true).write(true).create(true);
        {
            use cap_std::fs::OpenOptionsExt;
            options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
        }
        let file = self.dir.open_with(&key, &options)?.into_std();
        let have = file.metadata()?.len();
        let bytes = if have >= usable { usable } else { 0 };
        file.set_len(bytes)?;
        // A description of its own: the writer's offset and flags stay.
        let prefix = self.dir.open(&key)?.into_std();
        // A new note now: the old one may say more than what stays.
        let note = Note { site: self.site.clone(), of: of.clone(), bytes };
        super::write_atomic(&self.dir, &note_name, &serde_json::to_vec(&note).expect("a note serialises"))?;
        let file = DurableFile::resume(file, bytes)?;
        let out = ResumableFile {
            _busy: busy,
            partial: self.dir.try_clone()?,
            key,
            note,
            parent,
            final_name: final_name.to_string(),
            file: Some(file),
            done: false,
            discard: false,
        };
        Ok(Some(Resumed { out: Box::new(out), bytes, prefix }))
    }
}

/// A key of [`Partial::busy`], given back when its file is done with.
struct Busy {
    set: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    key: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

/// A file written in [`Partial`]: kept there, with a note of its durable
/// length, when it is dropped before it is whole.
struct ResumableFile {
    /// Dropped last (after `Drop` below has synced or removed the file).
    _busy: Busy,
    partial: Dir,
    key: String,
    note: Note,
    parent: Dir,
    final_name: String,
    file: Option<DurableFile>,
    /// Renamed into the staging directory, or removed.
    done: bool,
    discard: bool,
}

impl ResumableFile {
    fn file(&mut self) -> &mut DurableFile {
        self.file.as_mut().expect("a partial file is written until kept")
    }

    fn note(&mut self, bytes: u64) -> io::Result<()> {
        if bytes == self.note.bytes {
            return Ok(());
        }
        self.note.bytes = bytes;
        let name = format!("{}.json", self.key);
        super::write_atomic(&self.partial, &name, &serde_json::to_vec(&self.note).expect("a note serialises"))
    }

    fn remove(&mut self) {
        drop(self.file.take());
        let _ = self.partial.remove_file(format!("{}.json", self.key));
        let _ = self.partial.remove_file(&self.key);
        self.done = true;
    }
}

impl OutFile for ResumableFile {
    fn spare(&mut self) -> &mut [u8] {
        self.file().spare()
    }

    fn filled(&mut self, n: usize) -> io::Result<()> {
        self.file().filled(n)
    }

    fn keep(mut self: Box<Self>) -> io::Result<Option<Box<dyn Unpublished>>> {
        let file = self.file.take().expect("kept once");
        settle(file, (&self.partial, &self.key), (&self.parent, &self.final_name))?;
        self.done = true;
        let _ = self.partial.remove_file(format!("{}.json", self.key));
        sync_dir(&self.partial)?;
        Ok(None)
    }

    fn checkpoint(&mut self) -> io::Result<()> {
        let bytes = self.file().checkpoint()?;
        self.note(bytes)
    }

    fn discard(&mut self) {
        self.discard = true;
    }
}

impl Write for ResumableFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

impl Drop for ResumableFile {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.discard {
            self.remove();
            return;
        }
        // What was written stays for the next run, once durable.
        let kept = self.file.take().map(|f| f.finish().and_then(|f| f.sync_data().map(|()| f.metadata())));
        match kept {
            Some(Ok(Ok(meta))) if meta.len() > 0 => {
                if self.note(meta.len()).is_err() {
                    self.remove();
                }
            }
            _ => self.remove(),
        }
    }
}

struct StagedFile {
    parent: Dir,
    tmp_name: String,
    final_name: String,
    file: Option<DurableFile>,
    /// Renamed to its final name: nothing to remove.
    kept: bool,
}

impl StagedFile {
    fn file(&mut self) -> &mut DurableFile {
        self.file.as_mut().expect("a staged file is written until kept")
    }
}

impl OutFile for StagedFile {
    fn spare(&mut self) -> &mut [u8] {
        self.file().spare()
    }

    fn filled(&mut self, n: usize) -> io::Result<()> {
        self.file().filled(n)
    }

    fn keep(mut self: Box<Self>) -> io::Result<Option<Box<dyn Unpublished>>> {
        let file = self.file.take().expect("kept once");
        settle(file, (&self.parent, &self.tmp_name), (&self.parent, &self.final_name))?;
        self.kept = true;
        Ok(None)
    }
}

impl Write for StagedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.kept {
            drop(self.file.take());
            let _ = self.parent.remove_file(&self.tmp_name);
        }
    }
}
