//! A large `scp.fetch` spread over several SSH connections.
//!
//! One SSH channel carries at most its window (2 MiB in OpenSSH) per round
//! trip, and one TCP connection at most its socket buffers: at 100 ms that
//! is about 160 Mbit/s for one channel, and channels multiplexed on one
//! connection stop near 220 (docs/BENCHMARKS.md, "wan-channels"). Separate
//! connections add up.
//!
//! So a fetch starts as one stream (the process that opened the file and
//! passed the grant check), and a large file goes on in ranges over
//! *lanes* from the byte that stream reached, when either
//! - over a [`MEASURE`] after its [`WARM_UP`] the stream ran slower than
//!   [`SPREAD_BELOW`] and kept at least [`WINDOW_BOUND`] in flight (its
//!   rate times the round trip): its channel's window holds it back, not
//!   the link, and more connections pay; or
//! - the stream broke: the fetch resumes, as a retry.
//!
//! Lane 0 is a new session on the host's connection; every further lane
//! is the same fetch script over a connection of its own
//! ([`Transport::spawn_lane`](crate::transport::Transport)). A short link
//! never spreads: there, more connections would only cost CPU.
//!
//! What holds for every lane:
//! - it proves, before it is sent any request, that it opened the same file
//!   the grant check approved: the same canonical path and identity
//!   (device, inode, size, modification time to the nanosecond); and when
//!   its last range is done it prints the identity again, so a file that
//!   changed meanwhile fails the fetch;
//! - ranges arrive in any order and are put back in order in memory, within
//!   a window of [`WINDOW`] chunks past the one the store takes next, so
//!   memory stays flat whatever the size, and the store hashes the bytes in
//!   order as it always does;
//! - a lane whose connection breaks or stalls hands its unfinished ranges
//!   back to the others, and the fetch goes on while one lane lives.
//!
//! How many lanes: [`Ramp`] starts with two, measures, and doubles while
//! the rate grows by [`GAIN`], up to the host's `connections`; when every
//! lane broke, one starts again from the first range not received, up to
//! the host's `retries`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::remote::{FetchLanes, Pump, Remote};
use crate::bindings::types::Error;
use crate::transport::{Exit, FETCH_BLOCK};

/// What one request asks for: this many of the script's blocks.
const CHUNK_BLOCKS: u64 = 2;
/// Bytes per request.
pub const CHUNK: u64 = FETCH_BLOCK * CHUNK_BLOCKS;
/// Requests each lane keeps in flight, so its stream never waits for the
/// next request to cross the link.
const AHEAD: usize = 2;
/// Chunks past the store's next one that may be asked for: the most memory
/// a fetch holds (`WINDOW` × `CHUNK`, 32 MiB). Twice what four lanes have
/// in flight, so that one slow lane does not hold the others up at once.
pub const WINDOW: u64 = 16;
/// How long a rate is measured before the ramp decides: ten round trips
/// of a 100 ms link, by when a new connection's slow start is over.
pub const MEASURE: Duration = Duration::from_secs(1);
/// A fetch's one stream is measured from this long after its first byte:
/// by then its TCP connection's slow start is over even at 100 ms.
pub const WARM_UP: Duration = Duration::from_millis(500);
/// A fetch that one connection carries faster than this stays on it: the
/// link is short (one SSH channel's window is not what limits it), and
/// more connections would only cost CPU on both ends. 64 MiB/s is what one
/// channel carries at 30 ms; at 100 ms it carries a third of that.
pub const SPREAD_BELOW: u64 = 64 << 20;

/// A stream keeping at least this much in flight (its rate times the
/// round trip) is held by its channel's window (2 MiB in OpenSSH), not by
/// the link: more connections pay. One that keeps less is held by the
/// link's rate, and more connections would only share it.
pub const WINDOW_BOUND: f64 = 1.5 * (1 << 20) as f64;

/// Whether a stream that ran at `rate` (bytes/s) with `in_flight` bytes
/// (rate × round trip) is worth spreading over several connections.
pub fn worth_spreading(rate: f64, in_flight: f64) -> bool {
    rate < SPREAD_BELOW as f64 && in_flight >= WINDOW_BOUND
}

/// Why a fetch goes on in ranges.
pub enum Start {
    /// Its one stream ran at this rate (bytes/s), slower than
    /// [`SPREAD_BELOW`]: start with two lanes and ramp up from there.
    Spread(f64),
    /// Its one stream broke: resume with one lane, as a retry, and ramp
    /// up from there.
    Resume(Error),
    /// An earlier run left the bytes before `from`: start with one lane
    /// there and ramp up as the rate grows.
    Continue,
}
/// A further lane stays only if the rate grew by this factor.
const GAIN: f64 = 1.15;

/// The file as the fetch's first process opened it, which the grant check
/// approved.
#[derive(Debug, Clone)]
pub struct Opened {
    pub host: String,
    /// The path as the script named it (each lane opens that name).
    pub path: String,
    /// What the server says it resolved to.
    pub resolved: String,
    pub size: u64,
    /// `device inode size mtime`, as the fetch script prints it.
    pub identity: String,
}

/// A lane with ranges asked for that delivers none for this long, or
/// for [`STALL_TIMES`] times as long as a lane takes for a range (if
/// longer), while the others delivered [`STALL_OTHERS`] ranges, is
/// stalled: it is stopped, and the others take over its ranges.
pub const STALL_MIN: Duration = Duration::from_secs(10);
const STALL_TIMES: u32 = 5;
const STALL_OTHERS: u64 = 4;

/// What the watch on stalled lanes knows of one lane.
struct Watch {
    /// Ranges it asked for and has not delivered.
    inflight: usize,
    /// When it last delivered, or asked with nothing in flight; and how
    /// many ranges all lanes had delivered then.
    since: (Instant, u64),
    /// Set when it is found stalled: its next read stops it.
    stalled: Arc<AtomicBool>,
}

/// How a lane ended early.
enum Ending {
    /// The file changed, or the server answered what it must not: the
    /// fetch fails.
    Fatal(Error),
    /// The connection broke or stalled: others take over its ranges.
    Broken(Error),
}

struct State {
    chunks: u64,
    /// The next chunk never yet asked for.
    next: u64,
    /// Chunks a broken lane gave back.
    requeued: BTreeSet<u64>,
    /// The chunk the store takes next.
    consumed: u64,
    ready: BTreeMap<u64, Vec<u8>>,
    delivered: u64,
    received: u64,
    failed: Option<Error>,
    /// `failed` says the file is not the one opened (changed, replaced):
    /// what was fetched of it is of no use.
    fatal: bool,
    /// Lanes started and not yet ended.
    live: usize,
    /// Lanes that ask for nothing more (the ramp retired them).
    stopped: BTreeSet<usize>,
    /// When each lane delivered its first chunk.
    first_chunk: BTreeMap<usize, Instant>,
    /// Lanes that could not start or broke.
    gone: BTreeSet<usize>,
    /// Why each lane that broke did, in order.
    breaks: Vec<Error>,
    /// The lanes that run, for the watch on stalls.
    watch: BTreeMap<usize, Watch>,
}

struct Shared {
    /// `host H: fetching PATH`, for messages.
    what: String,
    state: Mutex<State>,
    changed: Condvar,
    /// Set when the fetch is over (done or failed): lanes stop at once.
    cancel: Arc<AtomicBool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next chunk `lane` may ask for. With `wait`, blocks until there
    /// is one or there never will be.
    fn claim(&self, lane: usize, wait: bool) -> Option<u64> {
        let mut st = self.lock();
        loop {
            if st.failed.is_some() || self.cancel.load(Ordering::Relaxed) || st.stopped.contains(&lane) {
                return None;
            }
            let k = if let Some(k) = st.requeued.pop_first() {
                Some(k)
            } else if st.next < st.chunks && st.next + 1 < st.consumed + WINDOW {
                // The chunk the store is copying out counts too: WINDOW in all.
                st.next += 1;
                Some(st.next - 1)
            } else {
                None
            };
            if let Some(k) = k {
                let delivered = st.delivered;
                if let Some(w) = st.watch.get_mut(&lane) {
                    if w.inflight == 0 {
                        w.since = (Instant::now(), delivered);
                    }
                    w.inflight += 1;
                }
                return Some(k);
            }
            if !wait || st.delivered == st.chunks {
                return None;
            }
            st = self.changed.wait_timeout(st, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn deliver(&self, lane: usize, chunk: u64, data: Vec<u8>) {
        let mut st = self.lock();
        st.received += data.len() as u64;
        st.delivered += 1;
        let delivered = st.delivered;
        if let Some(w) = st.watch.get_mut(&lane) {
            w.inflight = w.inflight.saturating_sub(1);
            w.since = (Instant::now(), delivered);
        }
        st.ready.insert(chunk, data);
        st.first_chunk.entry(lane).or_insert_with(Instant::now);
        self.changed.notify_all();
    }

    fn end(&self, lane: usize, result: Result<(), Ending>, unfinished: impl IntoIterator<Item = u64>) {
        let mut st = self.lock();
        st.live -= 1;
        st.watch.remove(&lane);
        match result {
            Ok(()) => {}
            Err(Ending::Fatal(e)) => {
                st.failed.get_or_insert(e);
                st.fatal = true;
            }
            Err(Ending::Broken(e)) => {
                st.requeued.extend(unfinished);
                st.gone.insert(lane);
                st.breaks.push(e);
            }
        }
        self.changed.notify_all();
    }
}

/// The decision of how many lanes: pure, so that it can be tested alone.
#[derive(Debug)]
pub struct Ramp {
    max: usize,
    lanes: usize,
    /// How many the last step added.
    added: usize,
    base: Option<f64>,
    mark: Option<(Instant, u64)>,
    done: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Wait,
    /// Start this many more lanes.
    Add(usize),
    /// Stop this many of the newest lanes; the ramp is done.
    Retire(usize),
}

impl Ramp {
    pub fn new(max: usize) -> Ramp {
        Ramp { max: max.max(1), lanes: 1, added: 0, base: None, mark: None, done: max <= 1 }
    }

    /// A ramp that already measured one lane at `rate`: it starts with
    /// two and goes on doubling from there.
    pub fn measured(max: usize, rate: f64) -> Ramp {
        let lanes = max.clamp(1, 2);
        Ramp { max: max.max(1), lanes, added: lanes - 1, base: Some(rate), mark: None, done: max <= 1 }
    }

    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// Stop adding (a lane could not start).
    pub fn stop(&mut self) {
        self.done = true;
    }

    /// `newest` is when the newest lane delivered its first chunk, if yet;
    /// `received` every byte delivered so far. Each step doubles the
    /// lanes (up to the maximum) while the rate grows by [`GAIN`], and
    /// takes the last ones back when it did not.
    pub fn step(&mut self, now: Instant, newest: Option<Instant>, received: u64) -> Step {
        if self.done || newest.is_none() {
            return Step::Wait;
        }
        let (since, from) = *self.mark.get_or_insert((now, received));
        let elapsed = now.saturating_duration_since(since);
        if elapsed < MEASURE {
            return Step::Wait;
        }
        let rate = (received - from) as f64 / elapsed.as_secs_f64();
        self.mark = None;
        match self.base {
            Some(base) if rate < base * GAIN => {
                self.done = true;
                self.lanes -= self.added;
                Step::Retire(self.added)
            }
            _ => {
                self.base = Some(rate);
                if self.lanes < self.max {
                    self.added = self.lanes.min(self.max - self.lanes);
                    self.lanes += self.added;
                    Step::Add(self.added)
                } else {
                    self.done = true;
                    Step::Wait
                }
            }
        }
    }
}

/// The reading end: the file's bytes in order, from however many lanes.
pub struct Lanes {
    shared: Arc<Shared>,
    /// The number the next lane gets (each is a connection of its own).
    next_index: usize,
    /// The lanes the ramp started, in order.
    ramped: Vec<usize>,
    /// Fresh starts after every lane broke: at most `retries`.
    resumed: u32,
    retries: u32,
    /// The host's most connections, for the ramp after a fresh start.
    connections: usize,
    remote: Remote,
    opened: Arc<Opened>,
    argv: Arc<Vec<String>>,
    threads: Vec<JoinHandle<()>>,
    ramp: Ramp,
    current: Vec<u8>,
    at: usize,
    /// Bytes of the first chunk the one stream delivered already.
    skip: usize,
    /// Bytes of the file handed to the store so far.
    handed: u64,
    /// When the lanes began, and the ranges delivered before.
    began: (Instant, u64),
}

impl Lanes {
    /// Goes on with the file from byte `from` (what its one stream
    /// delivered): lane 0 is a new session on the host's connection, the
    /// others new connections.
    pub fn start(
        remote: Remote,
        argv: Vec<String>,
        opened: Opened,
        from: u64,
        start: Start,
        host: FetchLanes,
    ) -> Lanes {
        let chunks = opened.size.div_ceil(CHUNK);
        let first = from / CHUNK;
        let shared = Arc::new(Shared {
            what: format!("host {}: fetching {}", opened.host, opened.path),
            state: Mutex::new(State {
                chunks,
                next: first,
                requeued: BTreeSet::new(),
                consumed: first,
                ready: BTreeMap::new(),
                delivered: first,
                received: 0,
                failed: None,
                fatal: false,
                live: 0,
                stopped: BTreeSet::new(),
                first_chunk: BTreeMap::new(),
                gone: BTreeSet::new(),
                breaks: Vec::new(),
                watch: BTreeMap::new(),
            }),
            changed: Condvar::new(),
            cancel: Arc::new(AtomicBool::new(false)),
        });
        let ramp = match &start {
            Start::Spread(rate) => Ramp::measured(host.connections, *rate),
            Start::Resume(_) => Ramp::new(host.connections),
            Start::Continue => Ramp::new(host.connections),
        };
        let mut lanes = Lanes {
            shared,
            next_index: 0,
            ramped: Vec::new(),
            resumed: 0,
            retries: host.retries,
            connections: host.connections,
            remote,
            opened: Arc::new(opened),
            argv: Arc::new(argv),
            threads: Vec::new(),
            ramp,
            current: Vec::new(),
            at: 0,
            skip: (from % CHUNK) as usize,
            handed: from,
            began: (Instant::now(), first),
        };
        match start {
            Start::Spread(_) | Start::Continue => {
                for _ in 0..lanes.ramp.lanes() {
                    let lane = lanes.launch();
                    lanes.ramped.push(lane);
                }
            }
            // No lane lives: the first read resumes, as after any break.
            Start::Resume(e) => {
                let e = reword(&e, |m| {
                    format!(
                        "connection 1 broke: {}",
                        m.strip_prefix(&format!("host {}: ", lanes.opened.host)).unwrap_or(m)
                    )
                });
                lanes.shared.lock().breaks.push(e);
                lanes.ramped.push(0);
                lanes.next_index = 1;
            }
        }
        lanes
    }

    /// Starts a lane: 0 over the host's connection, the others each over
    /// a new one. Returns its number.
    fn launch(&mut self) -> usize {
        let lane = self.next_index;
        self.next_index += 1;
        let stalled = Arc::new(AtomicBool::new(false));
        {
            let mut st = self.shared.lock();
            st.live += 1;
            let since = (Instant::now(), st.delivered);
            st.watch.insert(lane, Watch { inflight: 0, since, stalled: Arc::clone(&stalled) });
        }
        let (shared, remote, opened, argv) =
            (Arc::clone(&self.shared), self.remote.clone(), Arc::clone(&self.opened), Arc::clone(&self.argv));
        let thread = std::thread::Builder::new().name(format!("fetch-lane-{lane}")).spawn(move || {
            let mut inflight = VecDeque::new();
            let prefix = format!("host {}: ", opened.host);
            let result =
                run_lane(&shared, &remote, &opened, &argv, lane, &stalled, &mut inflight).map_err(|e| match e {
                    Ending::Broken(e) => Ending::Broken(reword(&e, |m| {
                        format!("connection {} broke: {}", lane + 1, m.strip_prefix(&prefix).unwrap_or(m))
                    })),
                    fatal => fatal,
                });
            let others = {
                let st = shared.lock();
                st.failed.is_none() && st.live > 1
            };
            if let Err(Ending::Broken(e)) = &result
                && others
                && !shared.cancel.load(Ordering::Relaxed)
            {
                ::log::warn!(
                    target: "offsite::scp",
                    "host {}: fetching {}: {}; the other connections take over its ranges",
                    opened.host,
                    opened.path,
                    error_text(e)
                );
            }
            shared.end(lane, result, inflight);
        });
        match thread {
            Ok(t) => self.threads.push(t),
            Err(e) => {
                let e = Error::RemoteFailed(format!("cannot start a thread: {e}"));
                self.shared.end(lane, Err(Ending::Broken(e)), []);
            }
        }
        lane
    }

    /// Reads the next bytes of the file; 0 at its end.
    pub fn read(&mut self, into: &mut [u8]) -> Result<usize, Error> {
        if self.at == self.current.len() {
            match self.next_chunk()? {
                Some(chunk) => (self.current, self.at) = (chunk, std::mem::take(&mut self.skip)),
                None => return Ok(0),
            }
        }
        let n = into.len().min(self.current.len() - self.at);
        into[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        self.handed += n as u64;
        Ok(n)
    }

    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, Error> {
        loop {
            if crate::abort::requested() {
                return Err(Error::RemoteFailed(format!("host {}: {}", self.opened.host, crate::abort::message())));
            }
            let (step, stopped, all_broke) = {
                let mut st = self.shared.lock();
                if let Some(e) = &st.failed {
                    return Err(e.clone());
                }
                if st.consumed == st.chunks {
                    return Ok(None);
                }
                let k = st.consumed;
                if let Some(chunk) = st.ready.remove(&k) {
                    st.consumed += 1;
                    self.shared.changed.notify_all();
                    return Ok(Some(chunk));
                }
                let newest = *self.ramped.last().expect("lane 0");
                let stopped = st.gone.contains(&newest);
                let all_broke = st.live == 0;
                let step = self.ramp.step(Instant::now(), st.first_chunk.get(&newest).copied(), st.received);
                if step == Step::Wait && !all_broke {
                    let _ = self.shared.changed.wait_timeout(st, Duration::from_millis(100));
                }
                (step, stopped, all_broke)
            };
            if stopped || all_broke {
                self.ramp.stop();
            }
            self.watch_for_stalls();
            if all_broke {
                self.resume()?;
                continue;
            }
            match step {
                Step::Wait => {}
                Step::Add(n) => {
                    for _ in 0..n {
                        let lane = self.launch();
                        self.ramped.push(lane);
                    }
                }
                Step::Retire(n) => {
                    for _ in 0..n {
                        let lane = self.ramped.pop().expect("a lane to retire");
                        self.shared.lock().stopped.insert(lane);
                        ::log::debug!(target: "offsite::scp", "{}: connection {} did not make it faster; it stops", self.shared.what, lane + 1);
                    }
                }
            }
        }
    }

    /// Stops each lane that holds ranges and delivers none while the
    /// others deliver (a server or a path that stalls one connection):
    /// see [`STALL_MIN`]. The idle timeout would wait far longer, with
    /// the whole fetch held up behind the one range.
    fn watch_for_stalls(&self) {
        let st = self.shared.lock();
        let now = Instant::now();
        let done = st.delivered - self.began.1;
        // How long one lane takes for a range, as they went so far.
        let typical = match u32::try_from(done) {
            Ok(d) if d > 0 => now.duration_since(self.began.0) * st.live.max(1) as u32 / d,
            _ => STALL_MIN,
        };
        let limit = STALL_MIN.max(typical * STALL_TIMES);
        for (lane, w) in &st.watch {
            let (since, then) = w.since;
            if w.inflight > 0
                && now.duration_since(since) >= limit
                && st.delivered - then >= STALL_OTHERS
                && !w.stalled.swap(true, Ordering::Relaxed)
            {
                ::log::warn!(
                    target: "offsite::scp",
                    "{}: connection {} stalled: no range for {} while the others delivered {}; they take over its ranges",
                    self.shared.what,
                    lane + 1,
                    humantime::format_duration(Duration::from_secs(now.duration_since(since).as_secs())),
                    st.delivered - then
                );
            }
        }
    }

    /// Every lane broke before the end: start again from the first range
    /// not yet delivered, over a new connection that proves the file is
    /// the same, after 1 s, 2 s, 4 s...; or, with the host's `retries`
    /// used up, fail with every reason.
    fn resume(&mut self) -> Result<(), Error> {
        let all = self.shared.lock().breaks.iter().map(error_text).collect::<Vec<_>>().join("; ");
        let wait = Duration::from_secs(1 << self.resumed.min(5));
        let deadline = self.remote.run_deadline.is_some_and(|d| Instant::now() + wait >= d);
        if self.resumed >= self.retries || deadline {
            let last = self.shared.lock().breaks.last().cloned();
            let why = match last {
                Some(e) => reword(&e, |_| {
                    let tries =
                        if self.resumed > 0 { format!(" (after {} retries)", self.resumed) } else { String::new() };
                    format!("{}: {all}{tries}; nothing was stored", self.shared.what)
                }),
                None => {
                    Error::RemoteFailed(format!("{}: every connection ended; nothing was stored", self.shared.what))
                }
            };
            self.shared.lock().failed = Some(why.clone());
            return Err(why);
        }
        self.resumed += 1;
        ::log::warn!(
            target: "offsite::scp",
            "{}: every connection broke ({all}); retry {} of {} in {}, going on from byte {} of {} (the bytes \
             before are stored already)",
            self.shared.what,
            self.resumed,
            self.retries,
            humantime::format_duration(wait),
            self.handed,
            self.opened.size
        );
        if !crate::abort::nap(wait) {
            return Err(Error::RemoteFailed(format!("host {}: {}", self.opened.host, crate::abort::message())));
        }
        self.shared.lock().breaks.clear();
        // From one connection, adding more while they help, as at the
        // start: a link that needed several before the break needs them
        // again, and a short one keeps the one.
        self.ramp = Ramp::new(self.connections);
        let lane = self.launch();
        self.ramped = vec![lane];
        Ok(())
    }

    /// Whether the fetch failed because the file is not the one opened.
    pub fn file_changed(&self) -> bool {
        self.shared.lock().fatal
    }

    /// After the last byte: waits for every lane's closing check.
    /// Returns how many connections carried some of the file.
    pub fn finish(&mut self) -> Result<usize, Error> {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let st = self.shared.lock();
        match &st.failed {
            Some(e) => Err(e.clone()),
            None => Ok(st.first_chunk.len()),
        }
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        self.shared.cancel.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub(super) fn error_text(e: &Error) -> &str {
    match e {
        Error::Denied(s)
        | Error::NotFound(s)
        | Error::InvalidArgument(s)
        | Error::Timeout(s)
        | Error::RemoteFailed(s)
        | Error::LimitExceeded(s)
        | Error::Io(s) => s,
    }
}

/// The same kind of error with its message rewritten.
fn reword(e: &Error, f: impl FnOnce(&str) -> String) -> Error {
    let m = f(error_text(e));
    match e {
        Error::Denied(_) => Error::Denied(m),
        Error::NotFound(_) => Error::NotFound(m),
        Error::InvalidArgument(_) => Error::InvalidArgument(m),
        Error::Timeout(_) => Error::Timeout(m),
        Error::RemoteFailed(_) => Error::RemoteFailed(m),
        Error::LimitExceeded(_) => Error::LimitExceeded(m),
        Error::Io(_) => Error::Io(m),
    }
}

/// One lane: open the file, prove it is the same, then
/// ask for chunks and deliver them until there are none, and check the
/// file once more. `inflight` is left holding what was asked and not
/// delivered.
fn run_lane(
    shared: &Shared,
    remote: &Remote,
    opened: &Opened,
    argv: &[String],
    lane: usize,
    stalled: &Arc<AtomicBool>,
    inflight: &mut VecDeque<u64>,
) -> Result<(), Ending> {
    let host = &opened.host;
    let changed = |what: String| {
        Ending::Fatal(Error::RemoteFailed(format!(
            "host {host}: fetching {}: the file changed while it was fetched ({what}); nothing was stored",
            opened.path
        )))
    };
    let mut pump = remote.spawn_lane(host, lane, argv).map_err(Ending::Broken)?;
    let mut lines = Vec::new();
    for _ in 0..4 {
        match pump.read_line().map_err(Ending::Broken)? {
            Some(line) => lines.push(String::from_utf8_lossy(&line).into_owned()),
            None => {
                let why = pump.closed_early("before it opened the file");
                return Err(Ending::Broken(Error::RemoteFailed(format!("host {host}: {why}"))));
            }
        }
    }
    if lines[0] != opened.resolved || lines[3] != opened.identity {
        pump.kill();
        return Err(changed(format!(
            "connection {} found {:?} ({}), not {:?} ({})",
            lane + 1,
            lines[0],
            lines[3],
            opened.resolved,
            opened.identity
        )));
    }
    pump.cancel = vec![Arc::clone(&shared.cancel), Arc::clone(stalled)];
    let broke = |e: Error| {
        if stalled.load(Ordering::Relaxed) {
            Ending::Broken(Error::RemoteFailed(format!("host {host}: it stalled")))
        } else {
            Ending::Broken(e)
        }
    };
    let send = |pump: &mut Pump, text: &str| {
        pump.process
            .write_stdin(text.as_bytes())
            .map_err(|e| Ending::Broken(Error::RemoteFailed(format!("host {host}: sending a request: {e}"))))
    };
    send(&mut pump, "ranges\n")?;
    loop {
        while inflight.len() < AHEAD {
            let Some(k) = shared.claim(lane, inflight.is_empty()) else { break };
            inflight.push_back(k);
            send(&mut pump, &format!("{} {}\n", k * CHUNK_BLOCKS, CHUNK_BLOCKS))?;
        }
        let Some(&k) = inflight.front() else { break };
        let len = (opened.size - k * CHUNK).min(CHUNK) as usize;
        let mut data = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = pump.read(&mut data[got..]).map_err(broke)?;
            if n == 0 {
                let why = pump.closed_early("");
                return Err(Ending::Broken(Error::RemoteFailed(format!(
                    "host {host}: the connection ended {got} bytes into a range of {len}{why}"
                ))));
            }
            got += n;
        }
        // Each range is followed by `=FIRST`: one that was longer or
        // shorter than asked shows, and is never taken for the file.
        let marker = format!("={}\n", k * CHUNK_BLOCKS);
        let mut said = Vec::with_capacity(marker.len());
        let mut byte = [0u8; 1];
        while said.len() < marker.len() && !said.ends_with(b"\n") {
            if pump.read(&mut byte).map_err(broke)? == 0 {
                break;
            }
            said.push(byte[0]);
        }
        if said.len() < marker.len() && !said.ends_with(b"\n") {
            let why = pump.closed_early("");
            return Err(Ending::Broken(Error::RemoteFailed(format!(
                "host {host}: the connection ended after a range, before its end mark{why}"
            ))));
        }
        if said != marker.as_bytes() {
            pump.kill();
            return Err(Ending::Fatal(Error::RemoteFailed(format!(
                "host {host}: fetching {}: the server's answer to the range at byte {} was not the {len} bytes asked \
                 for (the file changed, or the server is not sending what it must); nothing was stored",
                opened.path,
                k * CHUNK
            ))));
        }
        inflight.pop_front();
        shared.deliver(lane, k, data);
    }
    if shared.cancel.load(Ordering::Relaxed) {
        return Ok(());
    }
    send(&mut pump, "end\n")?;
    pump.process.close_stdin();
    let last = pump.read_line().map_err(Ending::Broken)?.map(|l| String::from_utf8_lossy(&l).into_owned());
    let mut rest = [0u8; 1];
    let extra = pump.read(&mut rest).map_err(Ending::Broken)?;
    let exit = pump.finish().map_err(Ending::Broken)?;
    match last {
        Some(now) if now == opened.identity && extra == 0 && exit == Exit::Status(0) => Ok(()),
        Some(now) if now != opened.identity => {
            Err(changed(format!("it was {} when opened and {now} at the end", opened.identity)))
        }
        _ => {
            let stderr = pump.stderr_text();
            Err(Ending::Fatal(Error::RemoteFailed(format!(
                "host {host}: fetching {}: the server did not end its ranges as it must ({exit}{}); nothing was stored",
                opened.path,
                if stderr.trim().is_empty() { String::new() } else { format!("; stderr: {}", stderr.trim()) }
            ))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ramp_doubles_the_lanes_while_they_help_and_takes_back_those_that_did_not() {
        let t0 = Instant::now();
        let s = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let mut ramp = Ramp::new(8);
        // Nothing until the newest lane delivers, then a full measurement.
        assert_eq!(ramp.step(s(0.5), None, 0), Step::Wait);
        assert_eq!(ramp.step(s(1.0), Some(s(1.0)), 10), Step::Wait);
        assert_eq!(ramp.step(s(1.9), Some(s(1.0)), 100), Step::Wait);
        // 100 MB/s with one lane: a second.
        assert_eq!(ramp.step(s(2.0), Some(s(1.0)), 100_000_010), Step::Add(1));
        assert_eq!(ramp.lanes(), 2);
        // The new lane has not delivered yet: wait for it.
        assert_eq!(ramp.step(s(3.0), None, 300_000_000), Step::Wait);
        // It doubles the rate: keep it, try four.
        assert_eq!(ramp.step(s(3.5), Some(s(3.5)), 300_000_000), Step::Wait);
        assert_eq!(ramp.step(s(4.5), Some(s(3.5)), 500_000_000), Step::Add(2));
        assert_eq!(ramp.lanes(), 4);
        // Four add 5%: both new ones go, and the ramp is done.
        assert_eq!(ramp.step(s(5.0), Some(s(5.0)), 600_000_000), Step::Wait);
        assert_eq!(ramp.step(s(6.0), Some(s(5.0)), 810_000_000), Step::Retire(2));
        assert_eq!(ramp.lanes(), 2);
        assert_eq!(ramp.step(s(20.0), Some(s(5.0)), 9_000_000_000), Step::Wait);
    }

    #[test]
    fn only_a_stream_held_by_its_window_spreads() {
        let mib = f64::from(1u32 << 20);
        // 100 ms, 1 Gbit/s: 19 MiB/s, 1.9 MiB in flight: the window holds it.
        assert!(worth_spreading(19.0 * mib, 1.9 * mib));
        // 20 ms, 50 Mbit/s: 6 MiB/s, 0.12 MiB in flight: the link does.
        assert!(!worth_spreading(6.0 * mib, 0.12 * mib));
        // Loopback: 500 MiB/s with no latency to speak of.
        assert!(!worth_spreading(500.0 * mib, 0.5 * mib));
    }

    #[test]
    fn the_ramp_stops_at_the_hosts_maximum_and_one_means_one() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut ramp = Ramp::new(3);
        assert_eq!(ramp.step(s(0), Some(s(0)), 0), Step::Wait);
        assert_eq!(ramp.step(s(2), Some(s(0)), 100), Step::Add(1));
        assert_eq!(ramp.step(s(2), Some(s(2)), 100), Step::Wait);
        assert_eq!(ramp.step(s(4), Some(s(2)), 1000), Step::Add(1), "two would pass the maximum of three");
        assert_eq!(ramp.step(s(4), Some(s(4)), 1000), Step::Wait);
        assert_eq!(ramp.step(s(6), Some(s(4)), 10000), Step::Wait, "at the maximum, nothing more");
        assert_eq!(ramp.lanes(), 3);
        let mut one = Ramp::new(1);
        assert_eq!(one.step(s(0), Some(s(0)), 0), Step::Wait);
        assert_eq!(one.step(s(9), Some(s(0)), 1 << 30), Step::Wait);
        assert_eq!(one.lanes(), 1);
    }
}
