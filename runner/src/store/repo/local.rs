//! A restic repository in a directory on this machine, as rustic_core
//! reads and writes it: restic's layout (`config`, `keys/`, `locks/`,
//! `snapshots/`, `index/`, `data/XX/`), every file written under a
//! temporary name, synced and renamed, and its directory synced, so a
//! file is whole or absent after a crash, as restic's own local backend
//! leaves them.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rustic_core::{ErrorKind, FileType, Id, ReadBackend, RusticError, RusticResult, WriteBackend};

/// Files written into a repository directory are its owner's only.
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;

#[derive(Debug, Clone)]
pub struct LocalRepo {
    root: PathBuf,
}

impl LocalRepo {
    pub fn new(root: &Path) -> LocalRepo {
        LocalRepo { root: root.to_path_buf() }
    }

    fn dir_of(&self, tpe: FileType, id: &Id) -> PathBuf {
        match tpe {
            FileType::Config => self.root.clone(),
            FileType::Pack => self.root.join("data").join(&id.to_hex().as_str()[..2]),
            _ => self.root.join(tpe.dirname()),
        }
    }

    pub(crate) fn path_of(&self, tpe: FileType, id: &Id) -> PathBuf {
        match tpe {
            FileType::Config => self.root.join("config"),
            _ => self.dir_of(tpe, id).join(id.to_hex().as_str()),
        }
    }

    /// Writes `name` in `dir` whole: a temporary file, synced, renamed,
    /// and the directory synced.
    pub(crate) fn write_file(dir: &Path, name: &str, buf: &[u8]) -> io::Result<()> {
        let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(buf)?;
            f.sync_all()?;
            fs::rename(&tmp, dir.join(name))?;
            fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

fn io_error(what: &'static str, path: &Path, e: io::Error) -> Box<RusticError> {
    RusticError::with_source(ErrorKind::Backend, what, e).attach_context("path", path.display().to_string())
}

impl ReadBackend for LocalRepo {
    fn location(&self) -> String {
        format!("local:{}", self.root.display())
    }

    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        if tpe == FileType::Config {
            return Ok(match fs::metadata(self.root.join("config")) {
                Ok(m) => vec![(Id::default(), u32::try_from(m.len()).unwrap_or(u32::MAX))],
                Err(_) => Vec::new(),
            });
        }
        let base = self.root.join(tpe.dirname());
        let dirs: Vec<PathBuf> = if tpe == FileType::Pack {
            match fs::read_dir(&base) {
                Ok(entries) => entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(io_error("Cannot list the repository directory `{path}`", &base, e)),
            }
        } else {
            vec![base]
        };
        let mut found = Vec::new();
        for dir in dirs {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("Cannot list the repository directory `{path}`", &dir, e)),
            };
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name();
                // Temporary files and anything else that is not an id.
                let Some(id) = name.to_str().filter(|n| n.len() == 64).and_then(|n| n.parse::<Id>().ok()) else {
                    continue;
                };
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                found.push((id, u32::try_from(size).unwrap_or(u32::MAX)));
            }
        }
        Ok(found)
    }

    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        let path = self.path_of(tpe, id);
        fs::read(&path).map(Bytes::from).map_err(|e| io_error("Cannot read `{path}`", &path, e))
    }

    fn read_partial(&self, tpe: FileType, id: &Id, _cacheable: bool, offset: u32, length: u32) -> RusticResult<Bytes> {
        let path = self.path_of(tpe, id);
        let read = || -> io::Result<Vec<u8>> {
            let mut f = fs::File::open(&path)?;
            f.seek(SeekFrom::Start(offset.into()))?;
            let mut buf = vec![0; length as usize];
            f.read_exact(&mut buf)?;
            Ok(buf)
        };
        read().map(Bytes::from).map_err(|e| io_error("Cannot read part of `{path}`", &path, e))
    }

    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        self.path_of(tpe, id).display().to_string()
    }
}

impl WriteBackend for LocalRepo {
    fn create(&self) -> RusticResult<()> {
        let make = |p: &Path| {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(p)
                .map_err(|e| io_error("Cannot create the repository directory `{path}`", p, e))
        };
        make(&self.root)?;
        for tpe in [FileType::Key, FileType::Snapshot, FileType::Index, FileType::Pack] {
            make(&self.root.join(tpe.dirname()))?;
        }
        make(&self.root.join("locks"))?;
        for i in 0..=255u8 {
            make(&self.root.join("data").join(hex::encode([i])))?;
        }
        Ok(())
    }

    fn write_bytes(&self, tpe: FileType, id: &Id, _cacheable: bool, buf: Bytes) -> RusticResult<()> {
        let path = self.path_of(tpe, id);
        let dir = self.dir_of(tpe, id);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("config").to_string();
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(&dir)
                .map_err(|e| io_error("Cannot create the repository directory `{path}`", &dir, e))?;
        }
        LocalRepo::write_file(&dir, &name, &buf).map_err(|e| io_error("Cannot write `{path}`", &path, e))
    }

    fn remove(&self, tpe: FileType, id: &Id, _cacheable: bool) -> RusticResult<()> {
        let path = self.path_of(tpe, id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("Cannot remove `{path}`", &path, e)),
        }
    }
}

impl super::Storage for LocalRepo {
    fn exists(&self) -> io::Result<bool> {
        Ok(self.root.join("config").is_file())
    }

    fn is_empty(&self) -> io::Result<bool> {
        match fs::read_dir(&self.root) {
            Ok(mut entries) => Ok(entries.next().is_none()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e),
        }
    }

    fn names(&self, dir: &str) -> io::Result<Vec<String>> {
        match fs::read_dir(self.root.join(dir)) {
            Ok(entries) => {
                Ok(entries.filter_map(Result::ok).filter_map(|e| e.file_name().to_str().map(str::to_string)).collect())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn read_small(
        &self,
        dir: &str,
        name: &str,
        max: u64,
    ) -> io::Result<Option<(Vec<u8>, Option<std::time::SystemTime>)>> {
        let path = self.root.join(dir).join(name);
        let file = match fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let modified = meta.modified().ok();
        if meta.len() > max {
            return Ok(Some((Vec::new(), modified)));
        }
        let mut out = Vec::new();
        file.take(max).read_to_end(&mut out)?;
        Ok(Some((out, modified)))
    }

    fn write_whole(&self, dir: &str, name: &str, bytes: &[u8]) -> io::Result<()> {
        let dir = self.root.join(dir);
        fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(&dir)?;
        LocalRepo::write_file(&dir, name, bytes)
    }

    fn remove_file(&self, dir: &str, name: &str) -> io::Result<()> {
        fs::remove_file(self.root.join(dir).join(name))
    }

    fn shown(&self) -> String {
        format!("restic:{}", self.root.display())
    }
}
