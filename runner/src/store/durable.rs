//! Writing a store file so that the final `fsync` is cheap and the page
//! cache is left alone.
//!
//! On a local file system that does direct I/O (ext4, XFS), full blocks
//! go to disk with `O_DIRECT` from aligned buffers, written by a thread of
//! their own while the caller fills the next buffer: no copy into the page
//! cache, no writeback to start or wait for later, nothing to drop. The
//! caller can read straight into the buffer ([`DurableFile::spare`]), so a
//! transfer's bytes are copied once, out of the pipe they arrive on. The
//! last partial block goes through the page cache, and the caller's
//! `fsync` makes it and the file's size durable.
//!
//! Elsewhere (tmpfs, network and FUSE file systems, kernels without
//! `STATX_DIOALIGN`) writes are buffered, and writeback starts every
//! [`WINDOW`] bytes as data arrives ([`WriteBehind`]).
//!
//! `docs/BENCHMARKS.md` has the measurements behind both.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

/// Size of one direct write, and of each buffer.
const BLOCK: usize = 1 << 20;
/// Buffers per file: one being filled, the rest written or queued.
const BUFFERS: usize = 3;
/// Scratch buffer for the buffered path's [`DurableFile::spare`].
const SCRATCH: usize = 256 << 10;
/// What a resumed file's length is a multiple of, so that the direct
/// path's blocks stay aligned.
pub const RESUME_UNIT: u64 = BLOCK as u64;
/// Write-behind granularity of the buffered path.
const WINDOW: u64 = 8 << 20;

/// A file being written durably; see the module documentation.
pub struct DurableFile {
    mode: Mode,
}

enum Mode {
    Direct(Direct),
    Buffered { file: WriteBehind, scratch: Vec<u8> },
}

impl DurableFile {
    /// Wraps a newly created, empty file opened for writing.
    pub fn new(file: File) -> DurableFile {
        DurableFile::resume(file, 0).expect("an empty file needs no seek")
    }

    /// Wraps a file opened for writing whose first `at` bytes stay, to
    /// be written on from there (`at` is its length, a multiple of
    /// [`RESUME_UNIT`] for the direct path).
    pub fn resume(file: File, at: u64) -> io::Result<DurableFile> {
        let file = match Direct::start(file, at) {
            Ok(direct) => return Ok(DurableFile { mode: Mode::Direct(direct) }),
            Err(file) => file,
        };
        let mut file = WriteBehind::new(file);
        if at > 0 {
            io::Seek::seek(&mut file.file, io::SeekFrom::Start(at))?;
            (file.written, file.started, file.settled) = (at, at, at);
        }
        Ok(DurableFile { mode: Mode::Buffered { file, scratch: Vec::new() } })
    }

    /// The buffered path only, whatever the file system.
    #[cfg(test)]
    pub fn buffered(file: File) -> DurableFile {
        DurableFile { mode: Mode::Buffered { file: WriteBehind::new(file), scratch: Vec::new() } }
    }

    /// Makes the bytes written so far durable, and says how many that
    /// is: a prefix of what was handed in (the direct path still holds
    /// the blocks in flight, and the one being filled).
    pub fn checkpoint(&mut self) -> io::Result<u64> {
        match &mut self.mode {
            Mode::Direct(d) => {
                let n = d.written;
                d.file.sync_data()?;
                Ok(n)
            }
            Mode::Buffered { file, .. } => {
                file.file.sync_data()?;
                Ok(file.written)
            }
        }
    }

    /// Whether full blocks bypass the page cache.
    #[cfg(test)]
    pub fn is_direct(&self) -> bool {
        matches!(self.mode, Mode::Direct(_))
    }

    /// Space to put the next bytes in; [`filled`](Self::filled) then takes
    /// the first `n` of them. Never empty.
    pub fn spare(&mut self) -> &mut [u8] {
        match &mut self.mode {
            Mode::Direct(d) => d.spare(),
            Mode::Buffered { scratch, .. } => {
                if scratch.is_empty() {
                    scratch.resize(SCRATCH, 0);
                }
                scratch
            }
        }
    }

    /// Takes the first `n` bytes of [`spare`](Self::spare).
    pub fn filled(&mut self, n: usize) -> io::Result<()> {
        match &mut self.mode {
            Mode::Direct(d) => d.filled(n),
            Mode::Buffered { file, scratch } => file.write_all(&scratch[..n]),
        }
    }

    /// Writes what is left and returns the file, for the caller to sync.
    pub fn finish(self) -> io::Result<File> {
        match self.mode {
            Mode::Direct(d) => d.finish(),
            Mode::Buffered { file, .. } => Ok(file.file),
        }
    }
}

impl Write for DurableFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.mode {
            Mode::Direct(d) => {
                let spare = d.spare();
                let n = spare.len().min(buf.len());
                spare[..n].copy_from_slice(&buf[..n]);
                d.filled(n)?;
                Ok(n)
            }
            Mode::Buffered { file, .. } => file.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A buffer aligned for direct I/O.
struct Aligned {
    ptr: std::ptr::NonNull<u8>,
}

// The buffer is owned memory, handed between threads whole.
unsafe impl Send for Aligned {}

impl Aligned {
    const LAYOUT: std::alloc::Layout = match std::alloc::Layout::from_size_align(BLOCK, 4096) {
        Ok(l) => l,
        Err(_) => panic!("a valid layout"),
    };

    fn new() -> Aligned {
        // Zeroed: the bytes are handed out before anything was written.
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::LAYOUT) };
        let ptr = std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(Self::LAYOUT));
        Aligned { ptr }
    }
}

impl std::ops::Deref for Aligned {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), BLOCK) }
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), BLOCK) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::LAYOUT) }
    }
}

/// The direct path: the caller fills `current`; full buffers go to the
/// writer thread, which sends them back empty.
struct Direct {
    current: Aligned,
    fill: usize,
    /// File offset of `current`'s first byte.
    offset: u64,
    /// Every byte before this is written (not yet synced).
    written: u64,
    full: Option<SyncSender<(Aligned, u64)>>,
    /// Buffers back, with the end of what the writer wrote from them
    /// (`None` for the ones it was never given).
    empty: Receiver<io::Result<(Aligned, Option<u64>)>>,
    writer: Option<JoinHandle<File>>,
    /// The file, for syncing while the writer has its own descriptor.
    file: File,
}

impl Direct {
    /// The file back when the file system does not do direct I/O for
    /// it, or needs an alignment our buffers (or `at`) do not have.
    fn start(file: File, at: u64) -> Result<Direct, File> {
        if !at.is_multiple_of(RESUME_UNIT) {
            return Err(file);
        }
        match Direct::begin(&file) {
            Some((full, empty, writer)) => Ok(Direct {
                current: Aligned::new(),
                fill: 0,
                offset: at,
                written: at,
                full: Some(full),
                empty,
                writer: Some(writer),
                file,
            }),
            None => Err(file),
        }
    }

    #[allow(clippy::type_complexity)]
    fn begin(
        file: &File,
    ) -> Option<(SyncSender<(Aligned, u64)>, Receiver<io::Result<(Aligned, Option<u64>)>>, JoinHandle<File>)> {
        use rustix::fs::{AtFlags, StatxFlags, statx};
        let stx = statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN).ok()?;
        let (mem, offset) = (stx.stx_dio_mem_align as usize, stx.stx_dio_offset_align as usize);
        if stx.stx_mask & StatxFlags::DIOALIGN.bits() == 0 || mem == 0 || offset == 0 {
            return None;
        }
        if !4096usize.is_multiple_of(mem) || !BLOCK.is_multiple_of(offset) || !local_block_fs(file) {
            return None;
        }
        let writer_file = file.try_clone().ok()?;
        let (full_tx, full_rx) = sync_channel::<(Aligned, u64)>(BUFFERS);
        let (empty_tx, empty_rx) = sync_channel::<io::Result<(Aligned, Option<u64>)>>(BUFFERS);
        for _ in 1..BUFFERS {
            empty_tx.send(Ok((Aligned::new(), None))).ok()?;
        }
        // The flag is on the open file description, which both descriptors
        // share; it comes off again for the tail, or if this goes no further.
        set_direct(&writer_file, true).ok()?;
        let spawned = std::thread::Builder::new().name("store-write".into()).spawn(move || {
            let mut failed = false;
            for (buf, at) in full_rx {
                // After a failure, buffers go back unwritten: the caller
                // has the error and the file is abandoned.
                let result = if failed { Ok(()) } else { writer_file.write_all_at(&buf, at) };
                let reply = match result {
                    Ok(()) => Ok((buf, Some(at + BLOCK as u64))),
                    Err(e) => {
                        failed = true;
                        Err(e)
                    }
                };
                if empty_tx.send(reply).is_err() {
                    break;
                }
            }
            writer_file
        });
        let Ok(writer) = spawned else {
            let _ = set_direct(file, false);
            return None;
        };
        Some((full_tx, empty_rx, writer))
    }

    fn spare(&mut self) -> &mut [u8] {
        &mut self.current[self.fill..]
    }

    fn filled(&mut self, n: usize) -> io::Result<()> {
        debug_assert!(self.fill + n <= BLOCK);
        self.fill += n;
        if self.fill < BLOCK {
            return Ok(());
        }
        let (next, end) = self.empty.recv().map_err(|_| io::Error::other("the store's writer thread ended"))??;
        if let Some(end) = end {
            // One writer, in order: everything before `end` is written.
            self.written = self.written.max(end);
        }
        let full = std::mem::replace(&mut self.current, next);
        self.full
            .as_ref()
            .expect("open")
            .send((full, self.offset))
            .map_err(|_| io::Error::other("the store's writer thread ended"))?;
        self.offset += BLOCK as u64;
        self.fill = 0;
        Ok(())
    }

    fn finish(mut self) -> io::Result<File> {
        // Waits for every buffer in flight, and any error among them.
        drop(self.full.take());
        let file = self.writer.take().expect("joined once").join().map_err(|_| io::Error::other("writer panicked"))?;
        for reply in self.empty.try_iter() {
            reply?;
        }
        set_direct(&file, false)?;
        file.write_all_at(&self.current[..self.fill], self.offset)?;
        Ok(file)
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        drop(self.full.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    let flags = if on { flags | libc::O_DIRECT } else { flags & !libc::O_DIRECT };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Direct I/O only where we measured it: ext4 (and ext2/3) and XFS.
/// Network and FUSE file systems accept `O_DIRECT` with costs and
/// semantics of their own.
// `f_type`'s type differs between architectures.
#[allow(clippy::unnecessary_cast)]
fn local_block_fs(file: &File) -> bool {
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    rustix::fs::fstatfs(file).is_ok_and(|s| matches!(s.f_type as i64, EXT4 | XFS))
}

/// A buffered file writer that starts writing data back to disk as it
/// goes: every [`WINDOW`] bytes it asks the kernel to begin writeback of
/// that window (without waiting), waits for the window before it, and
/// drops that one from the page cache. The final `fsync` then has little
/// left to do, and dirty memory stays bounded whatever the file's size.
struct WriteBehind {
    file: File,
    written: u64,
    /// Start of the window not yet handed to writeback.
    started: u64,
    /// Everything before this is on disk and dropped from the cache.
    settled: u64,
}

impl WriteBehind {
    fn new(file: File) -> WriteBehind {
        WriteBehind { file, written: 0, started: 0, settled: 0 }
    }

    fn write_behind(&mut self) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// Deterministic bytes that differ at every offset that matters.
    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect()
    }

    fn write_through(file: DurableFile, bytes: &[u8], by_spare: bool, step: usize) -> File {
        let mut file = file;
        let mut at = 0;
        while at < bytes.len() {
            if by_spare {
                let spare = file.spare();
                let n = spare.len().min(step).min(bytes.len() - at);
                spare[..n].copy_from_slice(&bytes[at..at + n]);
                file.filled(n).unwrap();
                at += n;
            } else {
                let n = step.min(bytes.len() - at);
                file.write_all(&bytes[at..at + n]).unwrap();
                at += n;
            }
        }
        file.finish().unwrap()
    }

    fn on_ext4_or_xfs(dir: &std::path::Path) -> bool {
        let f = File::create(dir.join("probe")).unwrap();
        local_block_fs(&f)
    }

    #[test]
    fn both_paths_store_every_byte_at_every_size() {
        // Beside the test binary: the build's own disk, not a tmpfs /tmp.
        let exe = std::env::current_exe().unwrap();
        let dir = tempfile::tempdir_in(exe.parent().unwrap()).unwrap();
        let direct_expected = on_ext4_or_xfs(dir.path());
        let sizes = [0, 1, 4095, 4096, 4097, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 12345, 7 * BLOCK];
        for (i, &size) in sizes.iter().enumerate() {
            let bytes = data(size);
            for (j, (direct, by_spare, step)) in
                [(true, true, 65536), (true, false, 100_000), (false, true, 7777), (false, false, BLOCK)]
                    .into_iter()
                    .enumerate()
            {
                let path = dir.path().join(format!("f{i}.{j}"));
                let file = File::create(&path).unwrap();
                let durable = if direct { DurableFile::new(file) } else { DurableFile::buffered(file) };
                assert_eq!(durable.is_direct(), direct && direct_expected, "{path:?}");
                let file = write_through(durable, &bytes, by_spare, step);
                file.sync_all().unwrap();
                drop(file);
                let back = std::fs::read(&path).unwrap();
                assert_eq!(back.len(), size, "{path:?}");
                assert_eq!(Sha256::digest(&back), Sha256::digest(&bytes), "{path:?}");
            }
        }
    }

    #[test]
    fn a_file_system_without_direct_io_gets_the_buffered_path() {
        let dir = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
        let file = File::create(dir.path().join("f")).unwrap();
        assert!(!DurableFile::new(file).is_direct());
    }
}
