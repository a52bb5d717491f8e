//! `files`: a read-only view of the read roots (list, stat, usage), under
//! the same policy and path rules as `archive`. Nothing is opened for
//! reading file contents, and links are reported, never followed: every
//! look goes through the root's `Dir` with `symlink_metadata`.

use std::path::{Path, PathBuf};

use cap_std::fs::{Dir, Metadata, MetadataExt};

use super::{Caps, io_error};
use crate::bindings::files::{DiskUsage, Entry, Host, Kind};
use crate::bindings::types::Error;
use crate::policy::{Call, Grant};

/// Most entries one `list` returns.
pub const MAX_LIST: usize = 100_000;

impl Caps {
    /// Decides a view of `path` and returns its root and relative path.
    fn view(&mut self, op: &'static str, path: &str) -> Result<(usize, PathBuf), Error> {
        match self.decide(Call::FilesView { op, path })? {
            Grant::Read { root, rel, .. } => Ok((root, rel)),
            other => unreachable!("files view granted as {other:?}"),
        }
    }
}

impl Caps {
    /// A view that failed is recorded like any failed call, except "not
    /// found": asking whether a path exists is an answer, not a failure.
    fn noted_view<T>(&mut self, what: &str, before: u32, result: Result<T, Error>) -> Result<T, Error> {
        match result {
            Err(Error::NotFound(m)) => Err(Error::NotFound(m)),
            other => self.noted(what, before, other),
        }
    }
}

impl Host for Caps {
    fn list_dir(&mut self, path: String) -> Result<Vec<Entry>, Error> {
        let before = self.denials;
        let result = (|| {
            let (root, rel) = self.view("list", &path)?;
            let dir = self.read_dir(root)?;
            let meta = dir.symlink_metadata(&rel).map_err(|e| io_error(&path, e))?;
            if meta.file_type().is_symlink() {
                return Err(Error::InvalidArgument(format!("{path:?} is a symbolic link; links are not followed")));
            }
            if !meta.is_dir() {
                return Err(Error::InvalidArgument(format!("{path:?} is not a directory")));
            }
            let mut out = Vec::new();
            for entry in dir.read_dir(&rel).map_err(|e| io_error(&path, e))? {
                let entry = entry.map_err(|e| io_error(&path, e))?;
                if out.len() == MAX_LIST {
                    return Err(Error::LimitExceeded(format!("{path:?} has more than {MAX_LIST} entries")));
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                let child = rel.join(entry.file_name());
                let meta = dir.symlink_metadata(&child).map_err(|e| io_error(&format!("{path}/{name}"), e))?;
                out.push(entry_of(name, &meta, dir, &child));
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })();
        self.noted_view("files.list", before, result)
    }

    fn stat(&mut self, path: String) -> Result<Entry, Error> {
        let before = self.denials;
        let result = (|| {
            let (root, rel) = self.view("stat", &path)?;
            let dir = self.read_dir(root)?;
            let meta = dir.symlink_metadata(&rel).map_err(|e| io_error(&path, e))?;
            Ok(entry_of(path.clone(), &meta, dir, &rel))
        })();
        self.noted_view("files.stat", before, result)
    }

    fn usage(&mut self, path: String) -> Result<DiskUsage, Error> {
        let before = self.denials;
        let deadline = Caps::call_deadline(self.call_timeout, self.run_deadline).0;
        let result = (|| {
            let (root, rel) = self.view("usage", &path)?;
            let dir = self.read_dir(root)?;
            let mut usage = DiskUsage { files: 0, directories: 0, others: 0, bytes: 0 };
            // Iterative, one directory listed at a time, however deep.
            let mut stack = vec![rel];
            while let Some(here) = stack.pop() {
                if std::time::Instant::now() >= deadline {
                    return Err(Error::Timeout(format!("measuring {path:?} took longer than the call's timeout")));
                }
                let meta = dir.symlink_metadata(&here).map_err(|e| io_error(&path, e))?;
                let ft = meta.file_type();
                if ft.is_dir() {
                    usage.directories += 1;
                    for entry in dir.read_dir(&here).map_err(|e| io_error(&path, e))? {
                        let entry = entry.map_err(|e| io_error(&path, e))?;
                        stack.push(here.join(entry.file_name()));
                    }
                } else if ft.is_file() {
                    usage.files += 1;
                    usage.bytes += meta.len();
                } else {
                    usage.others += 1;
                }
            }
            Ok(usage)
        })();
        self.noted_view("files.usage", before, result)
    }
}

fn entry_of(name: String, meta: &Metadata, dir: &Dir, rel: &Path) -> Entry {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_dir() {
        Kind::Directory
    } else if ft.is_file() {
        Kind::File
    } else {
        Kind::Other
    };
    let size = match kind {
        Kind::Symlink => dir.read_link_contents(rel).map_or(meta.len(), |t| t.as_os_str().len() as u64),
        _ => meta.len(),
    };
    Entry { name, kind, size, modified: meta.mtime(), mode: meta.mode() & 0o7777 }
}
