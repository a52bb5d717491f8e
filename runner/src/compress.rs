//! Parallel gzip: the input is cut into fixed-size blocks, each block is
//! compressed on a worker thread as a complete gzip member, and the members
//! are written out in order. Concatenated members are one valid gzip stream
//! (RFC 1952 §2.2), which `gzip -d` and GNU tar read as a whole.
//!
//! Memory is bounded by the block size times the number of blocks in flight,
//! whatever the size of the input. The blocks and the members' buffers are
//! reused, so a long input costs no allocation per block (each would be an
//! mmap and its page faults: see `fixed_mmap_threshold` in main.rs).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::Compression;
use flate2::write::GzEncoder;

/// Size of one independently compressed block.
pub const BLOCK_SIZE: usize = 1 << 20;

/// A block to compress, and the buffer to compress it into.
type Job = (u64, Vec<u8>, Vec<u8>);
/// The member (or why not), and the block's buffer back.
type Done = (u64, io::Result<Vec<u8>>, Vec<u8>);

/// A `Write` that gzips onto `out` using `workers` threads.
pub struct ParallelGz<W: Write> {
    out: Option<W>,
    block: Vec<u8>,
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    next_submit: u64,
    next_write: u64,
    finished: BTreeMap<u64, Vec<u8>>,
    max_in_flight: u64,
    /// Emptied block and member buffers, for the next blocks.
    free_blocks: Vec<Vec<u8>>,
    free_members: Vec<Vec<u8>>,
    /// The first error: once the output has lost a member, every later
    /// write fails with it (a member in the middle cannot be written again,
    /// and waiting for it would wait forever).
    broken: Option<Box<(io::ErrorKind, String)>>,
}

impl<W: Write> ParallelGz<W> {
    /// `workers` of 0 means one per available core. `level` is gzip's 1..=9.
    pub fn new(out: W, level: u32, workers: usize) -> Self {
        let workers = if workers == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { workers };
        let (job_tx, job_rx) = sync_channel::<Job>(workers);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = channel::<Done>();
        let level = Compression::new(level.clamp(1, 9));
        let handles = (0..workers)
            .map(|i| {
                let rx = Arc::clone(&job_rx);
                let tx: Sender<Done> = done_tx.clone();
                std::thread::Builder::new()
                    .name(format!("gzip-{i}"))
                    .spawn(move || worker(rx, tx, level))
                    .expect("spawn gzip worker")
            })
            .collect();
        ParallelGz {
            out: Some(out),
            block: Vec::with_capacity(BLOCK_SIZE),
            jobs: Some(job_tx),
            done: done_rx,
            workers: handles,
            next_submit: 0,
            next_write: 0,
            finished: BTreeMap::new(),
            max_in_flight: 2 * workers as u64,
            free_blocks: Vec::new(),
            free_members: Vec::new(),
            broken: None,
        }
    }

    /// Fails with the first error, if there was one.
    fn intact(&self) -> io::Result<()> {
        match &self.broken {
            Some(b) => Err(io::Error::new(b.0, b.1.clone())),
            None => Ok(()),
        }
    }

    /// Sends the block off; after an error, remembers it (see `broken`).
    fn submit_block(&mut self) -> io::Result<()> {
        self.intact()?;
        let sent = self.send_block();
        if let Err(e) = &sent {
            self.broken = Some(Box::new((e.kind(), e.to_string())));
        }
        sent
    }

    fn send_block(&mut self) -> io::Result<()> {
        while self.next_submit - self.next_write >= self.max_in_flight {
            self.wait_one()?;
        }
        let next = self.free_blocks.pop().unwrap_or_else(|| Vec::with_capacity(BLOCK_SIZE));
        let data = std::mem::replace(&mut self.block, next);
        let member = self.free_members.pop().unwrap_or_else(|| Vec::with_capacity(BLOCK_SIZE / 2 + 64));
        let jobs = self.jobs.as_ref().expect("not finished");
        jobs.send((self.next_submit, data, member)).map_err(|_| io::Error::other("gzip worker stopped"))?;
        self.next_submit += 1;
        self.drain_ready()
    }

    /// Blocks until at least one more member has been written out.
    fn wait_one(&mut self) -> io::Result<()> {
        let before = self.next_write;
        while self.next_write == before {
            let done = self.done.recv().map_err(|_| io::Error::other("gzip worker stopped"))?;
            self.take(done)?;
            self.write_in_order()?;
        }
        Ok(())
    }

    fn drain_ready(&mut self) -> io::Result<()> {
        while let Ok(done) = self.done.try_recv() {
            self.take(done)?;
        }
        self.write_in_order()
    }

    /// Keeps a compressed member for writing out, and its block's buffer
    /// for a next block.
    fn take(&mut self, (seq, result, mut block): Done) -> io::Result<()> {
        block.clear();
        self.free_blocks.push(block);
        self.finished.insert(seq, result?);
        Ok(())
    }

    fn write_in_order(&mut self) -> io::Result<()> {
        while let Some(mut member) = self.finished.remove(&self.next_write) {
            self.out.as_mut().expect("not finished").write_all(&member)?;
            self.next_write += 1;
            member.clear();
            self.free_members.push(member);
        }
        Ok(())
    }

    /// Compresses what is left, writes every member and returns the output.
    /// An empty input still produces one (empty) gzip member.
    pub fn finish(mut self) -> io::Result<W> {
        self.intact()?;
        if !self.block.is_empty() || self.next_submit == 0 {
            self.submit_block()?;
        }
        while self.next_write < self.next_submit {
            self.wait_one()?;
        }
        self.shutdown();
        let mut out = self.out.take().expect("finish called once");
        out.flush()?;
        Ok(out)
    }

    fn shutdown(&mut self) {
        self.jobs = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

impl<W: Write> Write for ParallelGz<W> {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        self.intact()?;
        let total = buf.len();
        while !buf.is_empty() {
            let room = BLOCK_SIZE - self.block.len();
            let take = room.min(buf.len());
            self.block.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.block.len() == BLOCK_SIZE {
                self.submit_block()?;
            }
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for ParallelGz<W> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn worker(jobs: Arc<Mutex<Receiver<Job>>>, done: Sender<Done>, level: Compression) {
    loop {
        let job = jobs.lock().map(|rx| rx.recv());
        let Ok(Ok((seq, data, member))) = job else { return };
        let result = (|| {
            let mut enc = GzEncoder::new(member, level);
            enc.write_all(&data)?;
            enc.finish()
        })();
        if done.send((seq, result, data)).is_err() {
            return;
        }
    }
}

/// Bytes on their way to `W`: gzipped, or as they are (a store that
/// compresses what it stores, such as a restic repository).
pub enum MaybeGz<W: Write> {
    Gz(ParallelGz<W>),
    Plain(W),
}

impl<W: Write + Send + 'static> MaybeGz<W> {
    /// Every byte written (and compressed), `W` back.
    pub fn finish(self) -> io::Result<W> {
        match self {
            MaybeGz::Gz(g) => g.finish(),
            MaybeGz::Plain(w) => Ok(w),
        }
    }
}

impl<W: Write + Send + 'static> Write for MaybeGz<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            MaybeGz::Gz(g) => g.write(buf),
            MaybeGz::Plain(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            MaybeGz::Gz(g) => g.flush(),
            MaybeGz::Plain(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn roundtrip(input: &[u8], workers: usize) -> Vec<u8> {
        let mut gz = ParallelGz::new(Vec::new(), 6, workers);
        // Uneven write sizes cross block boundaries.
        for chunk in input.chunks(777_777) {
            gz.write_all(chunk).unwrap();
        }
        let compressed = gz.finish().unwrap();
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&compressed[..]).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn multi_block_output_decodes_to_the_input_in_order() {
        let input: Vec<u8> = (0..5 * BLOCK_SIZE + 1234).map(|i| (i / 4099 % 251) as u8).collect();
        assert_eq!(roundtrip(&input, 2), input);
        assert_eq!(roundtrip(&input, 1), input);
        assert_eq!(roundtrip(&input, 3), input);
    }

    /// A writer that takes `room` bytes, then fails (a full disk, a
    /// store's byte limit).
    struct Full {
        room: usize,
    }

    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if buf.len() > self.room {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "no room"));
            }
            self.room -= buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Once the output has failed, every later write and the finish fail
    /// at once with that error: a member lost in the middle is never
    /// waited for (a tar builder writes its end on drop, after the error).
    #[test]
    fn after_the_output_fails_every_write_fails_and_none_waits() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            let noise: Vec<u8> = (0..12 * BLOCK_SIZE)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let mut gz = ParallelGz::new(Full { room: 2 * BLOCK_SIZE }, 1, 2);
            let first = noise.chunks(BLOCK_SIZE / 3).map(|c| gz.write_all(c)).find_map(Result::err);
            let later = gz.write_all(&[0; 2 * BLOCK_SIZE]).unwrap_err();
            let finished = gz.finish().err();
            let _ = tx.send((first.map(|e| e.kind()), later.kind(), finished.map(|e| e.kind())));
        });
        let outcome = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("no write waits forever");
        let full = io::ErrorKind::StorageFull;
        assert_eq!(outcome, (Some(full), full, Some(full)));
    }

    #[test]
    fn empty_input_is_a_valid_gzip_stream() {
        assert_eq!(roundtrip(b"", 2), b"");
        let gz = ParallelGz::new(Vec::new(), 6, 2);
        let out = gz.finish().unwrap();
        assert_eq!(&out[..2], &[0x1f, 0x8b]);
    }
}
