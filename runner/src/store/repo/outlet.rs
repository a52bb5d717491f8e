//! A run's files, streamed into a restic repository as they are written.
//!
//! Each file is archived by rustic_core on a thread of its own, reading
//! the bytes the run writes through a bounded channel (a few MiB in
//! flight, whatever the file's size): rustic chunks them (content-defined,
//! so a dump that changes a little stores only the changed chunks),
//! compresses, encrypts and packs them. What it makes is one tree per
//! file. The snapshot it would save for that tree is held back (see
//! [`super::Holding`]): only the run's end saves a snapshot, one for the
//! whole run, when the run is recorded. A file dropped before it is kept
//! makes its archive fail; the chunks already packed stay as data no
//! snapshot references, which a prune removes.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use rustic_core::repofile::{Metadata, Node, NodeType, SnapshotFile};
use rustic_core::{
    BackupOptions, IndexedIdsStatus, ParentOptions, ReadSource, ReadSourceEntry, ReadSourceOpen, Repository,
    RusticResult, SnapshotOptions, TreeId,
};

use crate::store::outlet::{OutFile, Outlet, Unpublished};

/// How many bytes go to the archiver at a time.
const PIECE: usize = 1 << 20;
/// How many pieces may wait for it.
const IN_FLIGHT: usize = 4;

/// What a run has archived: each kept file's path and tree.
#[derive(Default)]
pub struct Archived {
    /// Path, tree and size of each.
    pub trees: Mutex<Vec<(String, TreeId, u64)>>,
}

/// The outlet of a run into a repository.
pub struct RepoOutlet {
    pub repo: Arc<Repository<IndexedIdsStatus>>,
    pub archived: Arc<Archived>,
}

impl Outlet for RepoOutlet {
    fn create(&self, rel: &Path, final_name: &str) -> io::Result<Box<dyn OutFile>> {
        let path = rel.with_file_name(final_name);
        Ok(Box::new(ArchivedFile::start(&self.repo, path, Arc::clone(&self.archived))?))
    }

    fn compresses(&self) -> bool {
        true
    }
}

enum Piece {
    /// A buffer, and how many of its first bytes are the file's.
    Bytes(Vec<u8>, usize),
    /// Every byte was sent: the reader ends here, not at a hang-up.
    End,
}

/// One file on its way into the repository.
pub struct ArchivedFile {
    path: PathBuf,
    buf: Vec<u8>,
    used: usize,
    sent: u64,
    tx: Option<SyncSender<Piece>>,
    /// Buffers the reader is done with, to fill again (no allocation,
    /// zeroing or page faults per MiB).
    free: Receiver<Vec<u8>>,
    archiver: Option<std::thread::JoinHandle<RusticResult<SnapshotFile>>>,
    archived: Arc<Archived>,
}

impl ArchivedFile {
    pub fn start(repo: &Arc<Repository<IndexedIdsStatus>>, path: PathBuf, archived: Arc<Archived>) -> io::Result<Self> {
        let (tx, rx) = sync_channel(IN_FLIGHT);
        let (back, free) = sync_channel(IN_FLIGHT + 2);
        let source = ChannelSource { path: path.clone(), rx: Mutex::new(Some((rx, back))) };
        let repo = Arc::clone(repo);
        let archiver = std::thread::Builder::new().name("offsite-archive".into()).spawn(move || {
            // No parent: every byte is read and chunked, never taken from
            // an earlier snapshot by its metadata.
            let opts = BackupOptions::default().parent_opts(ParentOptions::default().force(true)).no_scan(true);
            let snap = SnapshotOptions::default().to_snapshot()?;
            let paths = [source.path.clone()];
            repo.archive(&opts, &source, snap, &paths)
        })?;
        Ok(ArchivedFile {
            path,
            buf: vec![0; PIECE],
            used: 0,
            sent: 0,
            tx: Some(tx),
            free,
            archiver: Some(archiver),
            archived,
        })
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        if self.used == 0 {
            return Ok(());
        }
        let next = self.free.try_recv().unwrap_or_else(|_| vec![0; PIECE]);
        let piece = std::mem::replace(&mut self.buf, next);
        let used = std::mem::take(&mut self.used);
        self.sent += used as u64;
        let tx = self.tx.as_ref().expect("not kept");
        tx.send(Piece::Bytes(piece, used)).map_err(|_| self.archiver_gone())
    }

    /// The archiver stopped reading: its error, if it has one yet.
    fn archiver_gone(&mut self) -> io::Error {
        match self.archiver.take().map(std::thread::JoinHandle::join) {
            Some(Ok(Err(e))) => {
                io::Error::other(format!("the repository refused the file: {}", super::rustic_text(&e)))
            }
            _ => io::Error::other("the repository's archiver stopped"),
        }
    }

    /// Sends the end, waits for the archiver and checks what it made.
    pub fn finish(&mut self) -> io::Result<TreeId> {
        self.send_buffer()?;
        let tx = self.tx.take().expect("finished once");
        tx.send(Piece::End).map_err(|_| self.archiver_gone())?;
        drop(tx);
        let snap = match self.archiver.take().expect("finished once").join() {
            Ok(Ok(snap)) => snap,
            Ok(Err(e)) => return Err(io::Error::other(super::rustic_text(&e))),
            Err(_) => return Err(io::Error::other("the repository's archiver panicked")),
        };
        // Evidence: rustic archived exactly one file of exactly the bytes
        // sent. (It skips a file whose reading failed, with a warning.)
        let summary = snap.summary.unwrap_or_default();
        if summary.total_files_processed != 1 || summary.total_bytes_processed != self.sent {
            return Err(io::Error::other(format!(
                "the repository archived {} file(s) of {} bytes, but {} bytes were written",
                summary.total_files_processed, summary.total_bytes_processed, self.sent
            )));
        }
        Ok(snap.tree)
    }
}

impl Write for ArchivedFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(PIECE - self.used);
        self.buf[self.used..self.used + n].copy_from_slice(&data[..n]);
        self.used += n;
        if self.used == PIECE {
            self.send_buffer()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl OutFile for ArchivedFile {
    fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.used..]
    }

    fn filled(&mut self, n: usize) -> io::Result<()> {
        assert!(n <= PIECE - self.used);
        self.used += n;
        if self.used == PIECE {
            self.send_buffer()?;
        }
        Ok(())
    }

    fn keep(mut self: Box<Self>) -> io::Result<Option<Box<dyn Unpublished>>> {
        let tree = self.finish()?;
        let path = self.path.to_string_lossy().into_owned();
        let bytes = self.sent;
        self.archived.trees.lock().unwrap_or_else(|e| e.into_inner()).push((path, tree, bytes));
        Ok(None)
    }
}

impl Drop for ArchivedFile {
    /// Not kept: the reader sees the channel close without an end, fails,
    /// and the archiver stops; it is waited for, so nothing of this file
    /// is still being written after the run moves on.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.archiver.take() {
            let _ = t.join();
        }
    }
}

/// One file whose bytes come through a channel.
struct ChannelSource {
    path: PathBuf,
    rx: Mutex<Option<Pipe>>,
}

/// The pieces coming, and the way buffers go back.
type Pipe = (Receiver<Piece>, SyncSender<Vec<u8>>);

impl ReadSource for ChannelSource {
    type Open = ChannelOpen;
    type Iter = std::iter::Once<RusticResult<ReadSourceEntry<ChannelOpen>>>;

    fn size(&self) -> RusticResult<Option<u64>> {
        Ok(None)
    }

    fn entries(&self) -> Self::Iter {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let name = self.path.file_name().unwrap_or_default();
        // The size is unknown until the end (the run's end writes the
        // true one into the snapshot's trees). rustic's chunker takes it
        // as a hint of how much to read at once: 0 would make it grow
        // each chunk's buffer from nothing, in small reads.
        let meta = Metadata {
            mode: Some(0o600),
            mtime: Some(rustic_core::jiff::Timestamp::now()),
            size: 1 << 40,
            ..Default::default()
        };
        let node = Node::new_node(name, NodeType::File, meta);
        std::iter::once(Ok(ReadSourceEntry { path: self.path.clone(), node, open: rx.map(ChannelOpen) }))
    }
}

struct ChannelOpen(Pipe);

impl ReadSourceOpen for ChannelOpen {
    type Reader = ChannelReader;

    fn open(self) -> RusticResult<ChannelReader> {
        let (rx, back) = self.0;
        Ok(ChannelReader { rx, back, piece: Vec::new(), len: 0, at: 0, ended: false })
    }
}

struct ChannelReader {
    rx: Receiver<Piece>,
    /// Where read buffers go back to the writer.
    back: SyncSender<Vec<u8>>,
    piece: Vec<u8>,
    len: usize,
    at: usize,
    ended: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.len {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Piece::Bytes(p, len)) => {
                    let done = std::mem::replace(&mut self.piece, p);
                    if done.len() == PIECE {
                        let _ = self.back.try_send(done);
                    }
                    self.len = len.min(self.piece.len());
                    self.at = 0;
                }
                Ok(Piece::End) => self.ended = true,
                Err(_) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file was abandoned before its end"));
                }
            }
        }
        let n = out.len().min(self.len - self.at);
        out[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
