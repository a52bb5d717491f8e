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
}

/// A kept file that becomes visible only when its run publishes (a
/// sealed upload); dropped, it is discarded.
pub trait Unpublished: Send {
    /// Its path in the store.
    fn rel(&self) -> &str;

    /// Makes it visible at its path, whole, replacing what was there.
    fn publish(self: Box<Self>) -> io::Result<()>;
}

/// A directory store: each file is written under a temporary name in the
/// run's staging directory, then synced and renamed there; the run's end
/// moves the staged files into place.
pub struct StagingOutlet(pub Dir);

impl Outlet for StagingOutlet {
    fn create(&self, rel: &Path, final_name: &str) -> io::Result<Box<dyn OutFile>> {
        let parent = make_dirs(&self.0, rel.parent().unwrap_or(Path::new("")))?;
        let tmp_name = temp_name(final_name);
        let file = DurableFile::new(create_new(&parent, &tmp_name)?.into_std());
        Ok(Box::new(StagedFile { parent, tmp_name, final_name: final_name.to_string(), file: Some(file), kept: false }))
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
        let file = self.file.take().expect("kept once").finish()?;
        file.sync_all()?;
        drop(file);
        self.parent.rename(&self.tmp_name, &self.parent, &self.final_name)?;
        self.kept = true;
        sync_dir(&self.parent)?;
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
