//! Files' bytes into a repository's packs, as restic stores them.
//!
//! The bytes are cut into chunks (`chunker.rs`) on the thread that reads
//! them, and each chunk is named by the SHA-256 of its bytes. A chunk the
//! repository has (in its index when the run began, or stored by a file
//! of this run that was kept) is only named again. A new one goes to a
//! few workers, which compress it (zstd), encrypt it (nonce, AES-256-CTR,
//! Poly1305-AES) and add it to the session's current pack; a full pack is
//! written (header encrypted, then its length; named by its SHA-256). A
//! session is one output's file, or a run's manifest and signature; when
//! it finishes, the last pack is written, then one index file for them
//! all: a pack is always written before any index names it, and an index
//! before any snapshot uses it.
//!
//! Memory is bounded by the chunk size (8 MiB at most) times the chunks
//! in flight, and the pack size times the workers, whatever the file's
//! size.

use std::collections::HashSet;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use rustic_core::repofile::MasterKey;
use rustic_core::{DataId, FileType, Id, IndexedFullStatus, Repository, WriteBackend};
use sha2::{Digest, Sha256};

use super::chunker::Chunker;
use super::lock::encrypt;

/// What the repository has: its index as the run began, and the chunks
/// of this run's kept files.
pub struct Known {
    pub repo: Arc<Repository<IndexedFullStatus>>,
    /// Data blobs.
    pub stored: Mutex<HashSet<Id>>,
    /// Tree blobs (a type of their own: a file's chunk that happens to
    /// hold a tree's bytes never stands for that tree).
    pub trees: Mutex<HashSet<Id>>,
}

impl Known {
    pub fn new(repo: Arc<Repository<IndexedFullStatus>>) -> Known {
        Known { repo, stored: Mutex::default(), trees: Mutex::default() }
    }

    pub fn has(&self, id: &Id) -> bool {
        self.stored.lock().unwrap_or_else(|e| e.into_inner()).contains(id)
            || self.repo.get_index_entry(&DataId::from(*id)).is_ok()
    }

    pub fn has_tree(&self, id: &Id) -> bool {
        self.trees.lock().unwrap_or_else(|e| e.into_inner()).contains(id)
            || self.repo.get_index_entry(&rustic_core::TreeId::from(*id)).is_ok()
    }

    /// What a finished session stored is in an index now: later files of
    /// the run may name it.
    pub fn add(&self, new: New) {
        self.stored.lock().unwrap_or_else(|e| e.into_inner()).extend(new.data);
        self.trees.lock().unwrap_or_else(|e| e.into_inner()).extend(new.trees);
    }
}

/// The blobs a session stored.
#[derive(Default)]
pub struct New {
    pub data: HashSet<Id>,
    pub trees: HashSet<Id>,
}

/// Where packs go, and how they are sealed.
#[derive(Clone)]
pub struct Sink {
    pub be: Arc<dyn WriteBackend>,
    pub key: MasterKey,
    /// zstd's level (0: its default); `None` in a version 1 repository,
    /// which stores chunks uncompressed.
    pub level: Option<i32>,
    /// A pack is written once it holds this many bytes.
    pub pack_size: usize,
}

/// A file as stored: its chunks in order, and its size.
pub struct Stored {
    pub content: Vec<DataId>,
    pub bytes: u64,
    /// The chunks that were new, and so stored by this file.
    pub new: New,
}

/// Reads `from` to its end and stores it; `workers` compress and seal.
pub fn store(from: &mut dyn Read, known: &Arc<Known>, sink: &Sink, workers: usize) -> io::Result<Stored> {
    let mut session = Session::new(Arc::clone(known), sink, workers)?;
    let (content, bytes) = session.file(from)?;
    let new = session.finish()?;
    Ok(Stored { content, bytes, new })
}

/// Files into packs through one set of workers: their new chunks share
/// packs, and one index file names them all once the session finishes.
/// Until then no chunk it stored is in an index, so nothing outside the
/// session may name one (a snapshot waits for [`Session::finish`]).
pub struct Session {
    known: Arc<Known>,
    sink: Sink,
    chunker: Chunker,
    tx: Option<SyncSender<Blob>>,
    handles: Vec<std::thread::JoinHandle<io::Result<()>>>,
    packs: Arc<Packs>,
    /// The blobs this session stores (sent to the workers).
    new: New,
    /// What a file is read into, kept from one file to the next.
    buf: Vec<u8>,
}

/// A blob for the workers: its id, whether it is a tree, its bytes.
type Blob = ([u8; 32], bool, Vec<u8>);

impl Session {
    pub fn new(known: Arc<Known>, sink: &Sink, workers: usize) -> io::Result<Session> {
        let config = known.repo.config();
        if config.chunker() != rustic_core::repofile::Chunker::Rabin {
            return Err(io::Error::other("the repository chunks at fixed sizes; Offsite writes only restic's chunks"));
        }
        let poly = config.poly().map_err(|e| io::Error::other(super::rustic_text(&e)))?;
        let chunker = Chunker::new(poly, config.chunk_size(), config.chunk_min_size(), config.chunk_max_size())
            .map_err(io::Error::other)?;
        let packs = Arc::new(Packs::default());
        let (tx, rx) = sync_channel::<Blob>(workers);
        let rx = Arc::new(Mutex::new(rx));
        let handles = (0..workers.max(1))
            .map(|_| {
                let (rx, packs, sink) = (Arc::clone(&rx), Arc::clone(&packs), sink.clone());
                std::thread::Builder::new().name("offsite-pack".into()).spawn(move || work(&rx, &packs, &sink))
            })
            .collect::<io::Result<Vec<_>>>()?;
        // Only the workers hold the receiver: when they all stop (a write
        // failed), sending fails instead of waiting for room forever.
        drop(rx);
        Ok(Session {
            known,
            sink: sink.clone(),
            chunker,
            tx: Some(tx),
            handles,
            packs,
            new: New::default(),
            buf: vec![0; 256 << 10],
        })
    }

    /// Reads `from` to its end as one file: returns its chunks and size.
    /// An error ends the session: the workers are waited for, and the
    /// error is theirs if they stopped first (why the chunks stopped
    /// flowing).
    pub fn file(&mut self, from: &mut dyn Read) -> io::Result<(Vec<DataId>, u64)> {
        self.file_sized(from, u64::MAX)
    }

    /// [`file`](Self::file) for a file of about `size` bytes: a small
    /// one takes no more memory than it needs on its way to the workers.
    pub fn file_sized(&mut self, from: &mut dyn Read, size: u64) -> io::Result<(Vec<DataId>, u64)> {
        self.chunker.reset();
        let tx = self.tx.as_ref().ok_or_else(|| io::Error::other("the packing session has ended"))?;
        let read = (&mut *self.buf, size);
        match chunk_all(from, read, &mut self.chunker, &self.known, tx, &self.packs.broken, &mut self.new.data) {
            Ok(stored) => Ok(stored),
            Err(e) => Err(self.stop().err().unwrap_or(e)),
        }
    }

    /// A chunk that is already stored (its id checked by the caller as the
    /// repository's or this session's): named only.
    pub fn has(&self, id: &Id) -> bool {
        self.new.data.contains(id) || self.known.has(id)
    }

    /// Stores a tree blob, serialised, unless the repository or this
    /// session has it; returns its id (the SHA-256 of `bytes`).
    pub fn tree(&mut self, bytes: Vec<u8>) -> io::Result<Id> {
        let raw: [u8; 32] = Sha256::digest(&bytes).into();
        let id = Id::new(raw);
        if self.new.trees.contains(&id) || self.known.has_tree(&id) {
            return Ok(id);
        }
        self.new.trees.insert(id);
        let tx = self.tx.as_ref().ok_or_else(|| io::Error::other("the packing session has ended"))?;
        if tx.send((raw, true, bytes)).is_err() {
            return Err(self.stop().err().unwrap_or_else(|| io::Error::other("the packing threads stopped")));
        }
        Ok(id)
    }

    /// Stops the workers once they have packed what was sent; their error
    /// if one failed.
    fn stop(&mut self) -> io::Result<()> {
        self.tx.take();
        let mut failed = None;
        for h in self.handles.drain(..) {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(_) => failed = failed.or(Some(io::Error::other("a packing thread panicked"))),
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Writes the last pack, then one index file for all the session's
    /// packs; returns the blobs it stored.
    pub fn finish(mut self) -> io::Result<New> {
        self.stop()?;
        let packs = &self.packs;
        for open in [&packs.open, &packs.open_trees] {
            let open = std::mem::take(&mut *open.lock().unwrap_or_else(|e| e.into_inner()));
            if !open.blobs.is_empty() {
                flush(open, packs, &self.sink)?;
            }
        }
        let done = std::mem::take(&mut *packs.done.lock().unwrap_or_else(|e| e.into_inner()));
        write_index(&*self.sink.be, &self.sink.key, &done)?;
        Ok(std::mem::take(&mut self.new))
    }
}

impl Drop for Session {
    /// Not finished: the workers stop; what they wrote is data no index
    /// names, which a prune removes.
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Cuts `from` into chunks (read through `buf`; `size`, about how many
/// bytes it holds, sets the room each chunk starts with) and sends the
/// new ones to the workers.
fn chunk_all(
    from: &mut dyn Read,
    (buf, size): (&mut [u8], u64),
    chunker: &mut Chunker,
    known: &Known,
    tx: &SyncSender<Blob>,
    broken: &AtomicBool,
    new: &mut HashSet<Id>,
) -> io::Result<(Vec<DataId>, u64)> {
    let mut content = Vec::new();
    let mut bytes = 0u64;
    // Room for a chunk of 1 MiB (the average), or for what is left of a
    // smaller file: a small file's chunk takes no more (at 1 MiB, the
    // allocator maps and unmaps pages for each).
    let room = |emitted: u64| usize::try_from(size.saturating_sub(emitted).min(1 << 20)).unwrap_or(1 << 20);
    let mut emitted = 0u64;
    let mut chunk: Vec<u8> = Vec::with_capacity(room(0));
    let mut hasher = Sha256::new();
    let mut emit = |chunk: &mut Vec<u8>, hasher: &mut Sha256| -> io::Result<()> {
        emitted += chunk.len() as u64;
        let raw: [u8; 32] = hasher.finalize_reset().into();
        let id = Id::new(raw);
        content.push(DataId::from(id));
        if new.contains(&id) || known.has(&id) {
            chunk.clear();
            return Ok(());
        }
        new.insert(id);
        if broken.load(Ordering::SeqCst) {
            return Err(io::Error::other("the packing threads stopped"));
        }
        let full = std::mem::replace(chunk, Vec::with_capacity(room(emitted)));
        tx.send((raw, false, full)).map_err(|_| io::Error::other("the packing threads stopped"))
    };
    loop {
        let n = match from.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        bytes += n as u64;
        let mut rest = &buf[..n];
        while let Some(cut) = chunker.cut(rest) {
            chunk.extend_from_slice(&rest[..cut]);
            hasher.update(&rest[..cut]);
            emit(&mut chunk, &mut hasher)?;
            rest = &rest[cut..];
        }
        chunk.extend_from_slice(rest);
        hasher.update(rest);
    }
    if !chunk.is_empty() {
        emit(&mut chunk, &mut hasher)?;
    }
    Ok((content, bytes))
}

/// A blob in a pack, as the pack's header and the index name it.
pub struct Placed {
    pub id: [u8; 32],
    /// A tree blob; else a data blob.
    pub tree: bool,
    pub offset: usize,
    /// Its sealed length in the pack.
    pub length: u32,
    /// Its length before compression; `None`: stored uncompressed.
    pub plain: Option<u32>,
}

#[derive(Default)]
struct Pack {
    body: Vec<u8>,
    blobs: Vec<Placed>,
}

#[derive(Default)]
struct Packs {
    /// The pack being filled, of data blobs.
    open: Mutex<Pack>,
    /// Tree blobs, in packs of their own as restic keeps them.
    open_trees: Mutex<Pack>,
    /// Packs written: their ids and blobs.
    done: Mutex<Vec<(Id, Vec<Placed>)>>,
    /// A worker failed: reading stops.
    broken: AtomicBool,
}

fn work(rx: &Mutex<Receiver<Blob>>, packs: &Packs, sink: &Sink) -> io::Result<()> {
    // One compression context for all the worker's chunks: making one
    // per chunk costs more than compressing a small file's chunk.
    let mut zstd = sink.level.map(zstd::bulk::Compressor::new).transpose()?;
    loop {
        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((id, tree, plain)) = next else { return Ok(()) };
        let sealed = match zstd.as_mut() {
            Some(zstd) => encrypt(&sink.key, &zstd.compress(&plain)?),
            None => encrypt(&sink.key, &plain),
        };
        let sealed = sealed.inspect_err(|_| packs.broken.store(true, Ordering::SeqCst))?;
        let too_large = || io::Error::other("a chunk is too large for a pack");
        let length = u32::try_from(sealed.len()).map_err(|_| too_large())?;
        let plain = u32::try_from(plain.len()).map_err(|_| too_large())?;
        let full = {
            let mut open = match tree {
                true => packs.open_trees.lock(),
                false => packs.open.lock(),
            }
            .unwrap_or_else(|e| e.into_inner());
            let offset = open.body.len();
            open.body.extend_from_slice(&sealed);
            open.blobs.push(Placed { id, tree, offset, length, plain: sink.level.map(|_| plain) });
            (open.body.len() >= sink.pack_size).then(|| std::mem::take(&mut *open))
        };
        if let Some(pack) = full {
            flush(pack, packs, sink).inspect_err(|_| packs.broken.store(true, Ordering::SeqCst))?;
        }
    }
}

/// Writes a full pack and records it for the index.
fn flush(pack: Pack, packs: &Packs, sink: &Sink) -> io::Result<()> {
    let id = write_pack(&*sink.be, &sink.key, pack.body, &pack.blobs)?;
    packs.done.lock().unwrap_or_else(|e| e.into_inner()).push((id, pack.blobs));
    Ok(())
}

/// Writes `body` (the sealed `blobs` at their offsets) as a pack: then
/// its header, sealed, and the header's length. Returns the pack's id.
pub fn write_pack(be: &dyn WriteBackend, key: &MasterKey, mut body: Vec<u8>, blobs: &[Placed]) -> io::Result<Id> {
    let mut header = Vec::with_capacity(blobs.len() * 41);
    for blob in blobs {
        // Data 0, tree 1; compressed, 2 more (with the length before).
        header.push(u8::from(blob.tree) | if blob.plain.is_some() { 2 } else { 0 });
        header.extend_from_slice(&blob.length.to_le_bytes());
        if let Some(plain) = blob.plain {
            header.extend_from_slice(&plain.to_le_bytes());
        }
        header.extend_from_slice(&blob.id);
    }
    let sealed = encrypt(key, &header)?;
    body.extend_from_slice(&sealed);
    body.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
    let id = Id::new(Sha256::digest(&body).into());
    be.write_bytes(FileType::Pack, &id, false, body.into()).map_err(|e| io::Error::other(super::rustic_text(&e)))?;
    Ok(id)
}

/// One index file naming every blob of `packs`.
pub fn write_index(be: &dyn WriteBackend, key: &MasterKey, packs: &[(Id, Vec<Placed>)]) -> io::Result<()> {
    if packs.is_empty() {
        return Ok(());
    }
    let packs: Vec<serde_json::Value> = packs
        .iter()
        .map(|(id, blobs)| {
            let blobs: Vec<serde_json::Value> = blobs
                .iter()
                .map(|b| {
                    let mut blob = serde_json::json!({
                        "id": hex::encode(b.id),
                        "type": if b.tree { "tree" } else { "data" },
                        "offset": b.offset,
                        "length": b.length,
                    });
                    if let Some(plain) = b.plain {
                        blob["uncompressed_length"] = plain.into();
                    }
                    blob
                })
                .collect();
            serde_json::json!({ "id": id.to_hex().as_str(), "blobs": blobs })
        })
        .collect();
    let json = serde_json::to_vec(&serde_json::json!({ "packs": packs })).expect("an index serialises");
    let sealed = encrypt(key, &json)?;
    let id = Id::new(Sha256::digest(&sealed).into());
    be.write_bytes(FileType::Index, &id, true, sealed.into()).map_err(|e| io::Error::other(super::rustic_text(&e)))
}
