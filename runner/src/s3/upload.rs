//! Streaming an object into S3 with bounded memory: a multipart upload
//! whose parts (all of one size, as some servers require) go out on the
//! client's runtime while the caller fills the next one. At most
//! [`IN_FLIGHT`] parts are on the wire and one is being filled, so memory
//! is `part_size × (IN_FLIGHT + 1)` whatever the object's size.
//!
//! Nothing is visible until the upload is completed: a run seals each
//! output when it ends ([`ObjectWriter::seal`]: every byte on the server)
//! and completes them only after the whole run has succeeded, so a failed
//! run never replaces an object. A writer or sealed upload dropped before
//! that (a failed run) aborts its upload; a process killed meanwhile
//! leaves an incomplete upload that no reader ever sees, and the next
//! run aborts it ([`Bucket::pending_uploads`](super::Bucket::pending_uploads)).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use object_store::path::Path as Key;
use object_store::{MultipartUpload, ObjectStore, PutMultipartOptions, PutPayload};

use super::client::{Bucket, S3Error};

/// Parts uploading at once.
pub const IN_FLIGHT: usize = 2;
/// S3's most parts per upload.
pub const MAX_PARTS: usize = 10_000;
/// S3's least size of a part that is not the last.
pub const MIN_PART: usize = 5 << 20;
/// What `[s3] part_size` is unless set: objects up to 160 GiB.
pub const DEFAULT_PART: usize = 16 << 20;

/// One object being written; see the module documentation.
pub struct ObjectWriter {
    bucket: Arc<Bucket>,
    rel: String,
    upload: Option<Box<dyn MultipartUpload>>,
    /// The part being filled: always `part_size` long; its first `fill`
    /// bytes are the part's.
    part: Vec<u8>,
    fill: usize,
    part_size: usize,
    parts: usize,
    in_flight: VecDeque<tokio::task::JoinHandle<object_store::Result<()>>>,
    written: u64,
    pool: Pool,
}

/// Part buffers, reused: a buffer comes back when the request that sent
/// it is done with it (retries included), so an upload allocates at most
/// `IN_FLIGHT + 1` of them whatever its size, and the allocator never sees
/// a stream of part-sized blocks to fragment its heap with. A buffer is
/// zeroed once, when allocated, and then read into directly
/// ([`ObjectWriter::spare`]).
#[derive(Clone, Default)]
struct Pool(Arc<Mutex<Vec<Vec<u8>>>>);

impl Pool {
    fn take(&self, size: usize) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_else(|| vec![0; size])
    }

    /// The first `len` bytes of `buf` as a payload that gives the buffer
    /// back when dropped.
    fn payload(&self, buf: Vec<u8>, len: usize) -> PutPayload {
        PutPayload::from(bytes::Bytes::from_owner(Pooled { buf, len, pool: self.clone() }))
    }
}

struct Pooled {
    buf: Vec<u8>,
    len: usize,
    pool: Pool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut free = self.pool.0.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() <= IN_FLIGHT {
            free.push(buf);
        }
    }
}

impl ObjectWriter {
    /// Starts a multipart upload of `rel`.
    pub fn create(bucket: Arc<Bucket>, rel: &str, part_size: usize) -> Result<ObjectWriter, S3Error> {
        let part_size = part_size.max(MIN_PART);
        let key = Key::from(bucket.location().key(rel));
        let s3 = Arc::clone(bucket.s3());
        let upload =
            bucket.call(rel, async move { s3.put_multipart_opts(&key, PutMultipartOptions::default()).await })?;
        let pool = Pool::default();
        Ok(ObjectWriter {
            bucket,
            rel: rel.to_string(),
            upload: Some(upload),
            part: pool.take(part_size),
            fill: 0,
            part_size,
            parts: 0,
            in_flight: VecDeque::new(),
            written: 0,
            pool,
        })
    }

    /// Bytes taken so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Takes `data`, sending each full part.
    pub fn write_all_bytes(&mut self, mut data: &[u8]) -> Result<(), S3Error> {
        while !data.is_empty() {
            let spare = self.spare();
            let n = spare.len().min(data.len());
            spare[..n].copy_from_slice(&data[..n]);
            data = &data[n..];
            self.filled(n)?;
        }
        Ok(())
    }

    /// The rest of the part being filled, to read the next bytes straight
    /// into; [`filled`](Self::filled) takes the first `n`. Never empty.
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.part[self.fill..]
    }

    /// Takes the first `n` bytes of [`spare`](Self::spare), sending the
    /// part once it is full.
    pub fn filled(&mut self, n: usize) -> Result<(), S3Error> {
        assert!(n <= self.part_size - self.fill, "filled more than spare");
        self.fill += n;
        self.written += n as u64;
        if self.fill == self.part_size {
            self.send_part()?;
        }
        Ok(())
    }

    fn send_part(&mut self) -> Result<(), S3Error> {
        if self.parts == MAX_PARTS {
            return Err(S3Error::Other(format!(
                "{}: more than {MAX_PARTS} parts of {} MiB; raise [s3] part_size for outputs this large",
                self.bucket.shown(&self.rel),
                self.part_size >> 20
            )));
        }
        // Room on the wire first: the oldest part must be done.
        while self.in_flight.len() >= IN_FLIGHT {
            let oldest = self.in_flight.pop_front().expect("not empty");
            self.bucket.call(&self.rel, async move { oldest.await.unwrap_or_else(|e| Err(join_error(e))) })?;
        }
        let full = std::mem::replace(&mut self.part, self.pool.take(self.part_size));
        let len = std::mem::take(&mut self.fill);
        let upload = self.upload.as_mut().expect("not finished");
        let sending = upload.put_part(self.pool.payload(full, len));
        self.in_flight.push_back(self.bucket.spawn(sending));
        self.parts += 1;
        Ok(())
    }

    /// Sends the last part and waits for every part: all the bytes are on
    /// the server, and still nothing is visible. A run seals each output
    /// as it ends and completes them all only once the run has succeeded
    /// (see [`SealedUpload`]).
    pub fn seal(mut self) -> Result<SealedUpload, S3Error> {
        if self.fill > 0 || self.parts == 0 {
            self.send_part()?;
        }
        while let Some(part) = self.in_flight.pop_front() {
            self.bucket.call(&self.rel, async move { part.await.unwrap_or_else(|e| Err(join_error(e))) })?;
        }
        let upload = self.upload.take().expect("not sealed twice");
        Ok(SealedUpload {
            bucket: Arc::clone(&self.bucket),
            rel: self.rel.clone(),
            upload: Some(upload),
            bytes: self.written,
        })
    }

    /// [`seal`](Self::seal), then [`SealedUpload::complete`].
    pub fn finish(self) -> Result<String, S3Error> {
        self.seal()?.complete()
    }

    /// Gives up: stops the parts on the wire and aborts the upload, so
    /// the server drops what it has.
    pub fn abort(mut self) -> Result<(), S3Error> {
        self.abort_now()
    }

    fn abort_now(&mut self) -> Result<(), S3Error> {
        // Parts on the wire are let finish first: a part that lands after
        // the abort would bring the upload back on some servers (S3 says
        // an abort may need repeating while parts are in progress).
        for part in std::mem::take(&mut self.in_flight) {
            let _ = self.bucket.call(&self.rel, async move { part.await.unwrap_or_else(|e| Err(join_error(e))) });
        }
        match self.upload.take() {
            Some(mut upload) => self.bucket.call(&self.rel, async move { upload.abort().await }),
            None => Ok(()),
        }
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if self.upload.is_some()
            && let Err(e) = self.abort_now()
        {
            log::warn!(target: "offsite::store", "cannot abort the upload of {}: {e}", self.bucket.shown(&self.rel));
        }
    }
}

impl io::Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all_bytes(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn join_error(e: tokio::task::JoinError) -> object_store::Error {
    object_store::Error::Generic { store: "S3", source: Box::new(e) }
}

/// An upload whose bytes are all on the server, not yet an object:
/// [`complete`](Self::complete) makes it one (atomically: readers see the
/// old object or the whole new one); dropped, it is aborted.
pub struct SealedUpload {
    bucket: Arc<Bucket>,
    rel: String,
    upload: Option<Box<dyn MultipartUpload>>,
    bytes: u64,
}

impl SealedUpload {
    pub fn rel(&self) -> &str {
        &self.rel
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Makes the object visible under its key; returns its ETag.
    pub fn complete(mut self) -> Result<String, S3Error> {
        let mut upload = self.upload.take().expect("completed once");
        let done = self.bucket.call(&self.rel, async move { upload.complete().await })?;
        done.e_tag.ok_or_else(|| S3Error::Other(format!("{}: the server sent no ETag", self.bucket.shown(&self.rel))))
    }
}

impl Drop for SealedUpload {
    fn drop(&mut self) {
        if let Some(mut upload) = self.upload.take()
            && let Err(e) = self.bucket.call(&self.rel, async move { upload.abort().await })
        {
            log::warn!(target: "offsite::store", "cannot abort the upload of {}: {e}", self.bucket.shown(&self.rel));
        }
    }
}
