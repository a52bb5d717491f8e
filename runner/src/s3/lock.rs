//! One run per S3 store at a time, across machines.
//!
//! The lock is one object, `PREFIX/.offsite/lock`, holding who has it
//! (a random token, the site, host, process and start time) and whether
//! it is held or free. Every change is a conditional request, so two
//! runners can never both win:
//!
//! - taking a store nobody has used: create (`If-None-Match: *`);
//! - taking a free lock, or a stale one: replace with `If-Match` on the
//!   ETag just read;
//! - the holder's heartbeat: the same replace, every `stale / 10`; a lock
//!   whose object has not changed for `stale` is stale: its holder died or
//!   lost the server;
//! - release: replace with a free body (not a delete: S3 has no
//!   conditional delete that every server honours).
//!
//! Age is measured on the server's clock (the object's Last-Modified
//! against the Last-Modified of a probe object we write), so runners
//! whose clocks disagree still agree on staleness.
//!
//! A holder that cannot renew for half of `stale` counts the lock as
//! lost, and [`S3Lock::confirm`] (a fresh heartbeat) is the last step
//! before a run publishes anything: a runner that stalled and was taken
//! over fails instead of publishing beside the one that took over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::client::{Bucket, Put, S3Error};

/// The lock's key under the store's prefix.
pub const LOCK_KEY: &str = ".offsite/lock";
const CLOCK_DIR: &str = ".offsite/clock";

/// Who holds (or last held) a store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub site: String,
    pub host: String,
    pub pid: u32,
    /// RFC 3339, the holder's clock.
    pub started: String,
    /// The run (or command) holding it.
    #[serde(default)]
    pub run_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Body {
    format: u32,
    state: State,
    token: String,
    #[serde(flatten)]
    holder: Holder,
    /// Heartbeats so far; it changes the body, so every renewal is a
    /// real write with a new ETag and Last-Modified.
    beat: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum State {
    Held,
    Free,
}

#[derive(Debug)]
pub enum LockError {
    /// Another runner holds it and it is not stale.
    Busy {
        holder: Box<Holder>,
        quiet_for: Duration,
        /// How long it must be silent to be taken over.
        stale: Duration,
    },
    S3(S3Error),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Busy { holder, quiet_for, stale } => write!(
                f,
                "another run holds the store: site {:?} on {} (pid {}), started {}, last heard from {} ago (a lock \
                 silent for {} belongs to a dead run and is taken over: [s3] lock_stale)",
                crate::text::escape(&holder.site),
                crate::text::escape(&holder.host),
                holder.pid,
                crate::text::escape(&holder.started),
                humantime::format_duration(Duration::from_secs(quiet_for.as_secs())),
                humantime::format_duration(*stale)
            ),
            LockError::S3(e) => write!(f, "cannot take the store's lock: {e}"),
        }
    }
}

impl From<S3Error> for LockError {
    fn from(e: S3Error) -> Self {
        LockError::S3(e)
    }
}

/// A held lock; renewed by a thread of its own until released or dropped.
pub struct S3Lock {
    shared: Arc<Shared>,
    heartbeat: Option<JoinHandle<()>>,
}

struct Shared {
    bucket: Arc<Bucket>,
    stale: Duration,
    state: Mutex<Owned>,
    stop: Mutex<bool>,
    wake: Condvar,
    lost: AtomicBool,
}

struct Owned {
    body: Body,
    etag: String,
    /// When the server last confirmed a write of ours.
    confirmed: Instant,
    why_lost: Option<String>,
}

impl S3Lock {
    /// Takes the store's lock, or says who has it.
    pub fn acquire(bucket: Arc<Bucket>, holder: Holder, stale: Duration) -> Result<S3Lock, LockError> {
        let token = random_token()?;
        let mut body = Body { format: 1, state: State::Held, token, holder, beat: 0 };
        let sent = Instant::now();
        let etag = match bucket.put(LOCK_KEY, to_json(&body), Put::Create) {
            Ok(etag) => etag,
            Err(S3Error::Conflict(_)) => take_existing(&bucket, &mut body, stale)?,
            Err(e) => return Err(e.into()),
        };
        let shared = Arc::new(Shared {
            bucket,
            stale,
            state: Mutex::new(Owned { body, etag, confirmed: sent, why_lost: None }),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            lost: AtomicBool::new(false),
        });
        let beat = Arc::clone(&shared);
        let heartbeat = std::thread::Builder::new()
            .name("s3-lock".into())
            .spawn(move || beat.heartbeats())
            .map_err(|e| LockError::S3(S3Error::Other(format!("cannot start the lock's heartbeat: {e}"))))?;
        Ok(S3Lock { shared, heartbeat: Some(heartbeat) })
    }

    /// Renews the lock now and says whether it is still ours: call it
    /// right before publishing anything.
    pub fn confirm(&self) -> Result<(), String> {
        self.shared.renew();
        match self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).why_lost.clone() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// Whether the heartbeat has found the lock lost.
    pub fn is_lost(&self) -> bool {
        self.shared.lost.load(Ordering::SeqCst)
    }

    /// Marks the lock free for the next runner.
    pub fn release(mut self) -> Result<(), S3Error> {
        self.free()
    }

    /// Stops the heartbeat and writes a free body over ours, unless the
    /// lock was lost or taken over meanwhile (then it is somebody else's
    /// to free).
    fn free(&mut self) -> Result<(), S3Error> {
        self.stop_heartbeat();
        let mut owned = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if owned.why_lost.is_some() {
            return Ok(());
        }
        let mut body = owned.body.clone();
        body.state = State::Free;
        body.beat += 1;
        match self.shared.bucket.put(LOCK_KEY, to_json(&body), Put::Replace(owned.etag.clone())) {
            Ok(etag) => {
                owned.etag = etag;
                owned.body = body;
                Ok(())
            }
            Err(S3Error::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn stop_heartbeat(&mut self) {
        *self.shared.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.wake.notify_all();
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
    }
}

impl Drop for S3Lock {
    fn drop(&mut self) {
        // Dropped without release (a failed run): the heartbeat stops and
        // the lock goes stale, which is what a crash leaves too; a
        // release is tried so the next run need not wait.
        if self.heartbeat.is_some()
            && let Err(e) = self.free()
        {
            log::warn!(target: "offsite::store", "cannot free the store's lock: {e}");
        }
    }
}

impl Shared {
    fn heartbeats(&self) {
        let every = (self.stale / 10).max(Duration::from_millis(200));
        loop {
            {
                let stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
                if *stop {
                    return;
                }
                let (stop, _) = self.wake.wait_timeout(stop, every).unwrap_or_else(|e| e.into_inner());
                if *stop {
                    return;
                }
            }
            self.renew();
            if self.lost.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    /// One heartbeat: replace our body if it is still the one we wrote.
    fn renew(&self) {
        let mut owned = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if owned.why_lost.is_some() {
            return;
        }
        let mut body = owned.body.clone();
        body.beat += 1;
        let sent = Instant::now();
        match self.bucket.put(LOCK_KEY, to_json(&body), Put::Replace(owned.etag.clone())) {
            Ok(etag) => {
                owned.etag = etag;
                owned.body = body;
                owned.confirmed = sent;
            }
            Err(S3Error::Conflict(_)) => {
                // The write may have landed and its answer been lost (a
                // retried request then fails its own condition): only
                // the token says whose the lock is now.
                match self.bucket.get(LOCK_KEY).map(|got| got.and_then(|(b, etag)| Some((from_json(&b)?, etag)))) {
                    Ok(Some((current, etag))) if current.token == body.token => {
                        owned.etag = etag;
                        owned.body = current;
                        owned.confirmed = sent;
                    }
                    Ok(other) => {
                        let by = other
                            .map(|(b, _)| {
                                let escape = crate::text::escape;
                                format!(" by site {:?} on {}", escape(&b.holder.site), escape(&b.holder.host))
                            })
                            .unwrap_or_default();
                        self.lose(&mut owned, format!("the store's lock was taken over{by}"));
                    }
                    Err(_) => self.lose_if_silent(&mut owned),
                }
            }
            Err(_) => self.lose_if_silent(&mut owned),
        }
    }

    fn lose_if_silent(&self, owned: &mut Owned) {
        if owned.confirmed.elapsed() > self.stale / 2 {
            let silent = humantime::format_duration(Duration::from_secs(owned.confirmed.elapsed().as_secs()));
            self.lose(owned, format!("could not renew the store's lock for {silent}; another run may have taken it"));
        }
    }

    fn lose(&self, owned: &mut Owned, why: String) {
        log::warn!(target: "offsite::store", "{why}");
        owned.why_lost = Some(why);
        self.lost.store(true, Ordering::SeqCst);
    }
}

/// Who holds the store's lock now, as the lock object says (a dead
/// holder's lock says so until it goes stale and is taken over).
pub fn holder(bucket: &Bucket) -> Result<Option<Holder>, S3Error> {
    Ok(bucket.get(LOCK_KEY)?.and_then(|(b, _)| from_json(&b)).filter(|b| b.state == State::Held).map(|b| b.holder))
}

/// The lock exists: take it if it is free or stale, or say who has it.
fn take_existing(bucket: &Bucket, body: &mut Body, stale: Duration) -> Result<String, LockError> {
    // A few rounds: another runner may change it between our read and
    // our replace, and then we look again.
    for _ in 0..5 {
        let Some((bytes, etag)) = bucket.get(LOCK_KEY)? else {
            // Deleted by hand meanwhile: create it again.
            match bucket.put(LOCK_KEY, to_json(body), Put::Create) {
                Ok(etag) => return Ok(etag),
                Err(S3Error::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let current = from_json(&bytes);
        if let Some(current) = &current
            && current.token == body.token
        {
            // Our own create, answered with a conflict after a retry.
            return Ok(etag);
        }
        let free = current.as_ref().is_some_and(|c| c.state == State::Free);
        if !free {
            let quiet_for = quiet_for(bucket)?;
            if quiet_for < stale {
                return Err(match current {
                    Some(c) => LockError::Busy { holder: Box::new(c.holder), quiet_for, stale },
                    None => LockError::S3(S3Error::Other(format!(
                        "{}/{LOCK_KEY} is not a lock offsite wrote; remove it if no run is using the store",
                        bucket.location()
                    ))),
                });
            }
            if let Some(c) = &current {
                log::warn!(
                    target: "offsite::store",
                    "taking over the store's lock from site {:?} on {} (pid {}): nothing heard for {}",
                    crate::text::escape(&c.holder.site),
                    crate::text::escape(&c.holder.host),
                    c.holder.pid,
                    humantime::format_duration(Duration::from_secs(quiet_for.as_secs()))
                );
            }
        }
        match bucket.put(LOCK_KEY, to_json(body), Put::Replace(etag)) {
            Ok(etag) => return Ok(etag),
            Err(S3Error::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(LockError::S3(S3Error::Conflict(format!(
        "{}/{LOCK_KEY} kept changing while we tried to take it; another run is starting",
        bucket.location()
    ))))
}

/// How long the lock object has gone unchanged, on the server's clock: the
/// difference between its Last-Modified and that of a probe object we
/// write now.
fn quiet_for(bucket: &Bucket) -> Result<Duration, S3Error> {
    let lock = bucket.head(LOCK_KEY)?.ok_or_else(|| S3Error::Conflict("the lock vanished".into()))?;
    let probe = format!("{CLOCK_DIR}/{}", random_token()?);
    bucket.put(&probe, Vec::new(), Put::Overwrite)?;
    let now = bucket.head(&probe);
    let _ = bucket.delete(&probe);
    let now = now?.ok_or_else(|| S3Error::Other("the clock probe vanished".into()))?;
    Ok((now.modified - lock.modified).to_std().unwrap_or_default())
}

fn random_token() -> Result<String, S3Error> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| S3Error::Other(format!("cannot read /dev/urandom for the lock's token: {e}")))?;
    Ok(hex::encode(bytes))
}

fn to_json(body: &Body) -> Vec<u8> {
    serde_json::to_vec(body).expect("a lock body serialises")
}

fn from_json(bytes: &[u8]) -> Option<Body> {
    serde_json::from_slice(bytes).ok()
}
