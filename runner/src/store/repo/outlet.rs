//! A run's files, streamed into a restic repository as they are written.
//!
//! Each file is stored by `packer.rs` on a thread of its own, reading
//! the bytes the run writes through a bounded channel (a few MiB in
//! flight, whatever the file's size): it chunks them (content-defined,
//! so a dump that changes a little stores only the changed chunks),
//! compresses, encrypts and packs them, and writes an index file for its
//! packs. What a kept file leaves is its list of chunks and its size,
//! for the snapshot the run's end writes (see `trees.rs`). A file dropped
//! before it is kept stops its thread; the packs already written are
//! data that no index or snapshot names, which a prune removes.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use std::collections::HashMap;

use rustic_core::{DataId, TreeId};

use super::packer::{self, Known, Sink, Stored};
use super::tree_out::RepoTree;
use crate::store::outlet::{OutFile, Outlet, Unpublished};
use crate::store::tree::TreeOut;

/// How many bytes go to the archiver at a time.
const PIECE: usize = 1 << 20;
/// How many pieces may wait for it.
const IN_FLIGHT: usize = 4;
/// At most this many threads compress and seal a file's chunks.
const MAX_WORKERS: usize = 4;

/// What a run has stored: each kept file's path, chunks and size, and
/// each archive stored as a tree, by path and root tree.
#[derive(Default)]
pub struct Archived {
    pub files: Mutex<Vec<(String, Vec<DataId>, u64)>>,
    pub trees: Mutex<Vec<(String, TreeId)>>,
}

/// Where a run's files go: what the repository has, and how to add to it.
#[derive(Clone)]
pub struct Target {
    pub known: Arc<Known>,
    pub sink: Sink,
}

/// The outlet of a run into a repository.
pub struct RepoOutlet {
    pub target: Target,
    pub archived: Arc<Archived>,
    /// The archives of the site's last runs, by output name: the parents
    /// of this run's archives of the same output.
    pub parents: HashMap<String, TreeId>,
}

impl Outlet for RepoOutlet {
    fn create(&self, rel: &Path, final_name: &str) -> io::Result<Box<dyn OutFile>> {
        let path = rel.with_file_name(final_name);
        Ok(Box::new(ArchivedFile::start(&self.target, path, Arc::clone(&self.archived))?))
    }

    fn compresses(&self) -> bool {
        true
    }

    fn keeps_trees(&self) -> bool {
        true
    }

    fn create_tree(&self, rel: &Path, final_name: &str) -> io::Result<Option<Box<dyn TreeOut>>> {
        let path = rel.with_file_name(final_name).to_string_lossy().into_owned();
        let parent = self.parents.get(&crate::store::manifest::output_name(&path)).copied();
        Ok(Some(Box::new(RepoTree::start(&self.target, Arc::clone(&self.archived), path, parent)?)))
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
    archiver: Option<std::thread::JoinHandle<io::Result<Stored>>>,
    archived: Arc<Archived>,
    known: Arc<Known>,
}

impl ArchivedFile {
    pub fn start(target: &Target, path: PathBuf, archived: Arc<Archived>) -> io::Result<Self> {
        let (tx, rx) = sync_channel(IN_FLIGHT);
        let (back, free) = sync_channel(IN_FLIGHT + 2);
        let mut reader = ChannelReader { rx, back, piece: Vec::new(), len: 0, at: 0, ended: false };
        let target = target.clone();
        let known = Arc::clone(&target.known);
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS));
        let archiver = std::thread::Builder::new()
            .name("offsite-chunk".into())
            .spawn(move || packer::store(&mut reader, &target.known, &target.sink, workers))?;
        Ok(ArchivedFile {
            path,
            buf: vec![0; PIECE],
            used: 0,
            sent: 0,
            tx: Some(tx),
            free,
            archiver: Some(archiver),
            archived,
            known,
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
            Some(Ok(Err(e))) => io::Error::other(format!("the repository refused the file: {e}")),
            _ => io::Error::other("the repository's archiver stopped"),
        }
    }

    /// Sends the end, waits for the archiver and checks what it stored:
    /// the file's chunks, once its packs and their index are written.
    pub fn finish(&mut self) -> io::Result<Vec<DataId>> {
        self.send_buffer()?;
        let tx = self.tx.take().expect("finished once");
        tx.send(Piece::End).map_err(|_| self.archiver_gone())?;
        drop(tx);
        let stored = match self.archiver.take().expect("finished once").join() {
            Ok(Ok(stored)) => stored,
            Ok(Err(e)) => return Err(io::Error::other(format!("the repository refused the file: {e}"))),
            Err(_) => return Err(io::Error::other("the repository's archiver panicked")),
        };
        // Evidence: the chunks hold exactly the bytes sent.
        if stored.bytes != self.sent {
            return Err(io::Error::other(format!(
                "the repository stored {} bytes, but {} bytes were written",
                stored.bytes, self.sent
            )));
        }
        // Its chunks are in an index now: later files of the run may
        // name them.
        self.known.add(stored.new);
        Ok(stored.content)
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
        let content = self.finish()?;
        let path = self.path.to_string_lossy().into_owned();
        let bytes = self.sent;
        self.archived.files.lock().unwrap_or_else(|e| e.into_inner()).push((path, content, bytes));
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

/// The bytes of one file, as they come through the channel.
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
