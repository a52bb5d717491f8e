//! The backup store: the one directory a site's script writes into.
//!
//! All access goes through a `cap_std::fs::Dir` opened on the store root, so
//! a symlink planted inside the store cannot redirect a write elsewhere. A new
//! file is written under a temporary name, synced, and renamed into place; the
//! directory is synced after the rename. Until then nothing is visible under
//! the final name, and an earlier file of that name is untouched.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cap_std::ambient_authority;
use cap_std::fs::{Dir, DirBuilder, File, OpenOptions};
use sha2::{Digest, Sha256};

/// Prefix of in-progress files. Scripts may not name files with it.
pub const TEMP_PREFIX: &str = ".offsite-tmp.";

/// An open store directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    dir: Dir,
    budget: Arc<Budget>,
}

/// What one run may still write: files created and bytes stored, shared by
/// every pending file (and so by parallel transfers).
#[derive(Debug)]
pub struct Budget {
    max_bytes: u64,
    max_files: u64,
    bytes: AtomicU64,
    files: AtomicU64,
}

/// The error a [`Budget`] returns, inside an `io::Error`, so callers can
/// tell it from the file system's own quota errors.
#[derive(Debug)]
pub struct BudgetExceeded(pub String);

impl std::fmt::Display for BudgetExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BudgetExceeded {}

impl Budget {
    pub fn new(max_bytes: u64, max_files: u64) -> Budget {
        Budget { max_bytes, max_files, bytes: AtomicU64::new(0), files: AtomicU64::new(0) }
    }

    fn take_file(&self) -> io::Result<()> {
        if self.files.fetch_add(1, Ordering::Relaxed) >= self.max_files {
            return Err(io::Error::new(
                io::ErrorKind::QuotaExceeded,
                BudgetExceeded(format!("this run reached the site's max_files limit ({} files)", self.max_files)),
            ));
        }
        Ok(())
    }

    fn take_bytes(&self, n: u64) -> io::Result<()> {
        if self.bytes.fetch_add(n, Ordering::Relaxed).saturating_add(n) > self.max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::QuotaExceeded,
                BudgetExceeded(format!("this run reached the site's max_bytes limit ({} bytes)", self.max_bytes)),
            ));
        }
        Ok(())
    }
}

impl Store {
    /// Opens the store at `root`, creating it (mode 0700) if it is missing.
    pub fn open(root: &Path) -> io::Result<Store> {
        if !root.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(root)?;
        }
        let dir = Dir::open_ambient_dir(root, ambient_authority())?;
        Ok(Store { root: root.to_path_buf(), dir, budget: Arc::new(Budget::new(u64::MAX, u64::MAX)) })
    }

    /// Limits what this run may write from now on.
    pub fn with_budget(mut self, budget: Budget) -> Store {
        self.budget = Arc::new(budget);
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Starts writing `rel` (already validated by the policy). Parent
    /// directories are created inside the store as needed.
    pub fn create(&self, rel: &Path) -> io::Result<PendingFile> {
        let file_name =
            rel.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "destination names no file"))?;
        self.budget.take_file()?;
        let parent_rel = rel.parent().filter(|p| !p.as_os_str().is_empty());
        let parent = match parent_rel {
            Some(p) => {
                let mut builder = DirBuilder::new();
                builder.recursive(true);
                {
                    use cap_std::fs::DirBuilderExt;
                    builder.mode(0o700);
                }
                self.dir.create_dir_with(p, &builder)?;
                self.dir.open_dir(p)?
            }
            None => self.dir.try_clone()?,
        };
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp_name = format!(
            "{TEMP_PREFIX}{}.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            file_name.to_string_lossy()
        );
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        {
            use cap_std::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = parent.open_with(&tmp_name, &options)?;
        Ok(PendingFile {
            parent,
            tmp_name,
            final_name: file_name.to_os_string().into(),
            rel: rel.to_path_buf(),
            writer: Some(HashingWriter::new(WriteBehind::new(file))),
            budget: Arc::clone(&self.budget),
        })
    }
}

/// A file being written into the store. Dropping it without [`commit`]
/// removes the temporary file, so a failed call leaves nothing behind.
///
/// [`commit`]: PendingFile::commit
pub struct PendingFile {
    parent: Dir,
    tmp_name: String,
    final_name: PathBuf,
    rel: PathBuf,
    writer: Option<HashingWriter<WriteBehind>>,
    budget: Arc<Budget>,
}

/// What was stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

impl PendingFile {
    /// Syncs the data, renames it into place and syncs the directory.
    pub fn commit(mut self) -> io::Result<StoredFile> {
        let writer = self.writer.take().expect("commit called once");
        let (file, bytes, sha256) = writer.finish();
        let file = file.into_inner();
        file.sync_all()?;
        drop(file);
        if let Err(e) = self.parent.rename(&self.tmp_name, &self.parent, &self.final_name) {
            let _ = self.parent.remove_file(&self.tmp_name);
            return Err(e);
        }
        self.parent.open(".")?.sync_all()?;
        Ok(StoredFile { path: self.rel.to_string_lossy().into_owned(), bytes, sha256 })
    }
}

impl Write for PendingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.budget.take_bytes(buf.len() as u64)?;
        self.writer.as_mut().expect("not committed").write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.as_mut().expect("not committed").flush()
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = self.parent.remove_file(&self.tmp_name);
        }
    }
}

/// A file writer that starts writing data back to disk as it goes.
///
/// Every [`WINDOW`] bytes it asks the kernel to begin writeback of that
/// window (without waiting), waits for the window before it, and drops that
/// one from the page cache. The final `fsync` then has almost nothing left
/// to do, dirty memory stays bounded whatever the file's size, and a backup
/// does not push the server's working set out of the cache.
pub struct WriteBehind {
    file: File,
    written: u64,
    /// Start of the window not yet handed to writeback.
    started: u64,
    /// Everything before this is on disk and dropped from the cache.
    settled: u64,
}

/// Write-behind granularity.
const WINDOW: u64 = 8 << 20;

impl WriteBehind {
    fn new(file: File) -> WriteBehind {
        WriteBehind { file, written: 0, started: 0, settled: 0 }
    }

    fn into_inner(self) -> File {
        self.file
    }

    fn write_behind(&mut self) {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        // Advice only: errors (e.g. a file system without support) are
        // ignored, and the final fsync still guarantees durability.
        unsafe {
            libc::sync_file_range(
                fd,
                self.started as i64,
                (self.written - self.started) as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        if self.started > self.settled {
            let (from, len) = (self.settled as i64, (self.started - self.settled) as i64);
            unsafe {
                libc::sync_file_range(
                    fd,
                    from,
                    len,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
                libc::posix_fadvise(fd, from, len, libc::POSIX_FADV_DONTNEED);
            }
            self.settled = self.started;
        }
        self.started = self.written;
    }
}

impl Write for WriteBehind {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.started >= WINDOW {
            self.write_behind();
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Counts and hashes everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), bytes: 0 }
    }

    /// Returns the inner writer, the byte count and the lower-case hex SHA-256.
    pub fn finish(self) -> (W, u64, String) {
        (self.inner, self.bytes, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn commit_makes_the_file_visible_with_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut f = store.create(Path::new("sub/a.txt")).unwrap();
        f.write_all(b"hello").unwrap();
        assert_eq!(names(&dir.path().join("sub")).len(), 1);
        assert!(!dir.path().join("sub/a.txt").exists(), "invisible before commit");
        let stored = f.commit().unwrap();
        assert_eq!(stored.bytes, 5);
        assert_eq!(stored.sha256, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(std::fs::read(dir.path().join("sub/a.txt")).unwrap(), b"hello");
        assert_eq!(names(&dir.path().join("sub")), vec!["a.txt"]);
    }

    #[test]
    fn large_files_written_behind_are_intact() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut f = store.create(Path::new("big.bin")).unwrap();
        let mut expected = Sha256::new();
        // Three and a half windows, in odd-sized pieces.
        let mut written = 0u64;
        let mut i = 0u32;
        while written < WINDOW * 7 / 2 {
            let chunk: Vec<u8> = (0..100_003u32).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect();
            f.write_all(&chunk).unwrap();
            expected.update(&chunk);
            written += chunk.len() as u64;
            i += 1;
        }
        let stored = f.commit().unwrap();
        assert_eq!(stored.bytes, written);
        assert_eq!(stored.sha256, hex::encode(expected.finalize()));
        let on_disk = std::fs::read(dir.path().join("big.bin")).unwrap();
        assert_eq!(on_disk.len() as u64, written);
        assert_eq!(hex::encode(Sha256::digest(&on_disk)), stored.sha256);
    }

    #[test]
    fn the_budget_caps_files_and_bytes_across_pending_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap().with_budget(Budget::new(10, 2));
        let mut a = store.create(Path::new("a")).unwrap();
        let mut b = store.create(Path::new("b")).unwrap();
        let err = store.create(Path::new("c")).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::QuotaExceeded);
        assert!(err.to_string().contains("max_files"), "{err}");
        a.write_all(b"123456").unwrap();
        let err = b.write_all(b"12345").unwrap_err();
        assert!(err.to_string().contains("max_bytes"), "{err}");
        drop(b);
        a.commit().unwrap();
        assert_eq!(names(dir.path()), vec!["a"], "the over-budget file left nothing");
    }

    #[test]
    fn dropping_an_uncommitted_file_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.tgz"), "good").unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut f = store.create(Path::new("a.tgz")).unwrap();
        f.write_all(b"partial").unwrap();
        drop(f);
        assert_eq!(names(dir.path()), vec!["a.tgz"]);
        assert_eq!(std::fs::read(dir.path().join("a.tgz")).unwrap(), b"good");
    }

    #[test]
    fn a_planted_symlink_cannot_redirect_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let store_root = dir.path().join("store");
        std::fs::create_dir(&store_root).unwrap();
        std::os::unix::fs::symlink(outside.path(), store_root.join("evil")).unwrap();
        let store = Store::open(&store_root).unwrap();
        assert!(store.create(Path::new("evil/x")).is_err());
        assert!(names(outside.path()).is_empty());
    }
}
