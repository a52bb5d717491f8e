//! What `ssh` and `scp` share: running one remote command through a
//! [`Transport`] with its timeouts, keeping stderr apart from stdout,
//! streaming into the store, and the background jobs behind `pending`.
//!
//! Everything here runs on plain data (`Remote`) so that a job can move to
//! its own thread; none of it touches the wasm store.

use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::lanes::error_text;
use super::pace::Pace;
use super::{StreamRedactor, io_error, lanes};
use crate::bindings::ssh::StreamOptions;
use crate::bindings::types::{Error, FileInfo};
use crate::compress::ParallelGz;
use crate::store::outlet::RemoteFile;
use crate::store::{Origin, PendingFile, Store, StoredFile};
use crate::transport::{Event, Exit, RemoteProcess, Transport, TransportError, quote};

/// How much of the end of a stream `require-tail` looks at.
pub const TAIL_BYTES: usize = 4096;
/// How much stderr a streamed call keeps (the end of it) for logs and errors.
const STDERR_KEEP: usize = 16 << 10;
/// Most background transfers one run may have started.
pub const MAX_JOBS: usize = 256;

/// A host's `connections` and `parallel_above`: a fetch of a file larger
/// than `parallel_above` may use up to `connections` connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchLanes {
    pub connections: usize,
    pub parallel_above: u64,
    /// Fresh starts of a fetch whose every connection broke; runs again
    /// of a stream whose connection was lost before its first byte.
    pub retries: u32,
    /// Whether a stream may run again at all (the host's `retry_streams`).
    pub retry_streams: bool,
}

impl Default for FetchLanes {
    fn default() -> Self {
        use crate::site::{DEFAULT_CONNECTIONS, DEFAULT_PARALLEL_ABOVE, DEFAULT_RETRIES};
        FetchLanes {
            connections: DEFAULT_CONNECTIONS,
            parallel_above: DEFAULT_PARALLEL_ABOVE,
            retries: DEFAULT_RETRIES,
            retry_streams: false,
        }
    }
}

/// Everything a remote call needs, cheap to clone into a job thread.
#[derive(Clone)]
pub struct Remote {
    pub transport: Arc<dyn Transport>,
    pub store: Option<Arc<Store>>,
    pub secrets: Arc<Vec<String>>,
    pub outputs: Arc<Mutex<Vec<StoredFile>>>,
    pub slots: Arc<Slots>,
    pub call_timeout: Duration,
    /// The run's deadline, which bounds every call (see `Caps`).
    pub run_deadline: Option<Instant>,
    pub idle_timeout: Duration,
    pub captured_output: u64,
    /// How this host's large fetches may spread over connections.
    pub fetch: FetchLanes,
    /// Bandwidth limits this host's transfers share (the host's, the
    /// site's).
    pub paces: Vec<Arc<Pace>>,
    pub dry_run: bool,
    /// Dry, and without even connecting (see `Caps::offline`).
    pub offline: bool,
}

impl Remote {
    fn redact(&self, text: &str) -> String {
        super::redact(&self.secrets, text)
    }

    /// `argv` as the log shows it: secrets masked, long lines cut.
    fn show(&self, argv: &[String]) -> String {
        let mut s = self.redact(&argv.join(" "));
        if s.len() > 200 {
            let cut = (0..=200).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
            s.truncate(cut);
            s.push('…');
        }
        s
    }

    fn spawn(&self, host: &str, argv: &[String], stdin: bool) -> Result<Pump, Error> {
        self.spawn_on(host, 0, argv, stdin)
    }

    /// `argv` with stdin over the host's connection `lane` (see
    /// `Transport::spawn_lane`).
    pub(super) fn spawn_lane(&self, host: &str, lane: usize, argv: &[String]) -> Result<Pump, Error> {
        self.spawn_on(host, lane, argv, true)
    }

    fn spawn_on(&self, host: &str, lane: usize, argv: &[String], stdin: bool) -> Result<Pump, Error> {
        let line = quote::command_line(argv).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let process = self
            .transport
            .spawn_lane(host, lane, &line, stdin)
            .map_err(|e| transport_error(&self.redact(&e.to_string()), &e))?;
        let mut pump = Pump::new(process, host, self.idle_timeout, self.call_timeout, self.run_deadline);
        pump.redactor = StreamRedactor::new(&self.secrets);
        pump.paces = self.paces.clone();
        Ok(pump)
    }

    /// `ssh.exec`: runs `argv` and captures both streams, each capped.
    pub fn exec(&self, host: &str, argv: &[String]) -> Result<(u32, Vec<u8>, String), Error> {
        if self.dry_run {
            self.connect(host)?;
            ::log::info!(target: "offsite::ssh", "dry run: would run on {host}: {}", self.show(argv));
            return Ok((0, Vec::new(), String::new()));
        }
        let _slot = self.slots.acquire();
        let mut pump = self.spawn(host, argv, false)?;
        pump.stderr_cap = self.captured_output as usize;
        let mut stdout = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = pump.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if (stdout.len() + n) as u64 > self.captured_output {
                pump.kill();
                return Err(Error::LimitExceeded(format!(
                    "host {host}: `{}` printed more than the captured_output limit of {} bytes; \
                     stream large output into the store with exec-to-file",
                    self.show(argv),
                    self.captured_output
                )));
            }
            stdout.extend_from_slice(&buf[..n]);
        }
        if pump.stderr_total > self.captured_output {
            return Err(Error::LimitExceeded(format!(
                "host {host}: `{}` wrote more than {} bytes to stderr",
                self.show(argv),
                self.captured_output
            )));
        }
        let exit = pump.finish()?;
        let stderr = self.redact(&pump.stderr_text());
        match exit {
            Exit::Status(status) => Ok((status, stdout, stderr)),
            other => Err(Error::RemoteFailed(format!("host {host}: `{}` {other}; stderr: {stderr}", self.show(argv)))),
        }
    }

    /// `ssh.exec-to-file`: streams stdout into `dest`; stores it only when
    /// the command exited 0 and the checks passed.
    pub fn exec_to_file(
        &self,
        host: &str,
        argv: &[String],
        dest: &Path,
        options: &StreamOptions,
        stdin: Option<&[u8]>,
    ) -> Result<FileInfo, Error> {
        let shown_dest = dest.display().to_string();
        if self.dry_run {
            self.connect(host)?;
            ::log::info!(target: "offsite::ssh", "dry run: would stream `{}` on {host} into {shown_dest}", self.show(argv));
            return Ok(dry_info(dest));
        }
        let store = self.store.as_ref().ok_or_else(|| Error::Denied("no store is open".into()))?;
        let _slot = self.slots.acquire();
        let mut tries = 0;
        loop {
            let mut lost_before_output = false;
            let result = self.stream_once(host, argv, dest, options, stdin, store, &mut lost_before_output);
            let Err(e) = result else { return result };
            // Run again only what produced nothing, lost with its
            // connection, on a host that allows it; never past the
            // run's deadline.
            let wait = Duration::from_secs(1 << tries.min(5));
            let in_time = self.run_deadline.is_none_or(|d| Instant::now() + wait < d);
            if !(lost_before_output && self.fetch.retry_streams && tries < self.fetch.retries && in_time) {
                return Err(e);
            }
            tries += 1;
            ::log::warn!(
                target: "offsite::ssh",
                "{}; it produced nothing, so it runs again (retry_streams): retry {tries} of {} in {}",
                error_text(&e),
                self.fetch.retries,
                humantime::format_duration(wait)
            );
            if !crate::abort::nap(wait) {
                return Err(e);
            }
        }
    }

    /// One try of [`exec_to_file`](Self::exec_to_file). Sets
    /// `lost_before_output` when it failed because the connection was
    /// lost (no exit status) before the command wrote a byte.
    #[allow(clippy::too_many_arguments)]
    fn stream_once(
        &self,
        host: &str,
        argv: &[String],
        dest: &Path,
        options: &StreamOptions,
        stdin: Option<&[u8]>,
        store: &Store,
        lost_before_output: &mut bool,
    ) -> Result<FileInfo, Error> {
        let shown_dest = dest.display().to_string();
        let started = Instant::now();
        let mut pump = self.spawn(host, argv, stdin.is_some())?;
        if let Some(input) = stdin {
            // Written beside the reading, never before it: a command that
            // does not read its stdin, or echoes it into a full pipe, cannot
            // hold the run past its timeouts.
            pump.process.feed_stdin(input.to_vec());
        }
        // Nothing the server says during a call that carried a secret goes
        // back to the script (the run log has it, masked): a script must
        // not be able to make the server echo the value back to it.
        let withheld = stdin.is_some();
        let (pending, gzip) = match options.gzip {
            true => store.create_gzipped(dest),
            false => store.create(dest).map(|p| (p, false)),
        }
        .map_err(|e| io_error(&shown_dest, e))?;
        let mut sink = if gzip {
            Sink::Gz(ParallelGz::new(pending, 6, 0), shown_dest.clone())
        } else {
            Sink::Plain(pending, shown_dest.clone())
        };
        let mut tail = Tail::default();
        let mut buf = Vec::new();
        let mut bytes = 0u64;
        let bar = crate::progress::Bar::new(&format!("{host}: {shown_dest}"), None);
        loop {
            let n = sink.receive(&mut buf, |into| {
                let n = pump.read(into)?;
                tail.push(&into[..n]);
                Ok(n)
            })?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            bar.inc(n as u64);
        }
        drop(bar);
        let exit = pump.finish()?;
        let stderr = self.redact(&pump.stderr_text());
        // On success stderr is worth a warning; on failure the error says
        // it (or the log, for a call that carried a secret), once.
        if exit == Exit::Status(0) || withheld {
            log_stderr(host, &stderr);
        }
        if exit != Exit::Status(0) {
            *lost_before_output = bytes == 0 && matches!(exit, Exit::Missing(_));
            let said = if withheld {
                "; its stderr is in the run log, not shown to the script (the call carried a secret)".to_string()
            } else {
                stderr_suffix(&stderr)
            };
            return Err(Error::RemoteFailed(format!(
                "host {host}: `{}` {exit} after {bytes} bytes of output; nothing was stored{said}",
                self.show(argv),
            )));
        }
        if let Some(want) = &options.require_tail
            && !tail.contains(want.as_bytes())
        {
            return Err(Error::RemoteFailed(format!(
                "host {host}: the output of `{}` does not end with {want:?} ({bytes} bytes): it is \
                 incomplete, so nothing was stored",
                self.show(argv)
            )));
        }
        let origin = Origin {
            call: "ssh.exec-to-file".into(),
            host: Some(host.to_string()),
            remote: Some(self.show(argv)),
            exit_status: Some(0),
            ..Origin::default()
        };
        let stored = sink.finish().and_then(|p| p.commit(origin)).map_err(|e| io_error(&shown_dest, e))?;
        ::log::info!(
            target: "offsite::ssh",
            "host {host}: stored {} ({bytes} bytes from the command, {} stored, sha256 {}) in {:.1?}",
            stored.path, stored.bytes, stored.sha256, started.elapsed()
        );
        Ok(self.record(stored))
    }

    /// `scp.fetch`: copies the remote file `path` into `dest`, reading it
    /// through one open descriptor on the server. The server opens the
    /// file once, reports the canonical path of *what it opened*
    /// (`/proc/self/fd`), its size and type, and waits; `allowed` decides on
    /// that path (symlinks and `..` resolved by the server), and only then
    /// are exactly that many bytes read from the same descriptor. A name
    /// swapped for a symlink between a check and a copy cannot lead
    /// outside the grant: there is no second lookup of the name.
    pub fn fetch(
        &self,
        host: &str,
        path: &str,
        dest: &Path,
        allowed: &(dyn Fn(&str) -> Result<(), Error> + Send + Sync),
    ) -> Result<FileInfo, Error> {
        let shown_dest = dest.display().to_string();
        if self.dry_run && self.offline {
            // Nothing may reach the server, not even the lookup of the
            // file: the grant is checked on the path as the script named it.
            allowed(path)?;
            ::log::info!(target: "offsite::scp", "dry run: would fetch {host}:{path} into {shown_dest}");
            return Ok(dry_info(dest));
        }
        if self.dry_run {
            self.connect(host)?;
        }
        let store = match (&self.store, self.dry_run) {
            (Some(store), _) => Some(store),
            (None, true) => None,
            (None, false) => return Err(Error::Denied("no store is open".into())),
        };
        let _slot = self.slots.acquire();
        let started = Instant::now();
        let argv: Vec<String> =
            ["sh", "-c", crate::transport::FETCH_SCRIPT, "offsite-fetch", path].iter().map(|s| s.to_string()).collect();
        let spawned = Instant::now();
        let mut pump = self.spawn(host, &argv, true)?;
        let failed = |what: String| Error::RemoteFailed(format!("host {host}: fetching {path}: {what}"));
        let mut lines = Vec::new();
        // From asking for the session to its first line is at least two
        // round trips (the channel opens, then the command's answer), so
        // half of it bounds the round trip from above (see `fetch_into`).
        let mut round_trip = Duration::MAX;
        for _ in 0..4 {
            match pump.read_line()? {
                Some(line) => {
                    if lines.is_empty() {
                        round_trip = spawned.elapsed() / 2;
                    }
                    lines.push(line)
                }
                None => {
                    let exit = pump.finish()?;
                    let stderr = self.redact(&pump.stderr_text()).trim().to_string();
                    return Err(if stderr.contains("No such file") {
                        Error::NotFound(format!("host {host}: {path}: No such file or directory"))
                    } else if stderr.contains("Permission denied") {
                        Error::Denied(format!("host {host}: {path}: the server refused to open it: Permission denied"))
                    } else if stderr.contains("not a regular file") {
                        failed("it is not a regular file".into())
                    } else {
                        failed(format!("the server could not open it ({exit}){}", stderr_suffix(&stderr)))
                    });
                }
            }
        }
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
        let (Some(resolved), Some(size), Some(kind), Some(identity)) =
            (text(&lines[0]), text(&lines[1]), text(&lines[2]), text(&lines[3]))
        else {
            pump.kill();
            return Err(failed("the server's answer is not UTF-8 text".into()));
        };
        let size: u64 = size.parse().map_err(|_| failed(format!("unexpected size {size:?} from the server")))?;
        if kind != "regular file" && kind != "regular empty file" {
            pump.kill();
            return Err(failed(format!("it is a {kind}, not a regular file")));
        }
        if let Err(e) = allowed(&resolved) {
            pump.kill();
            return Err(e);
        }
        if self.dry_run {
            pump.kill();
            ::log::info!(target: "offsite::scp", "dry run: would fetch {host}:{resolved} ({size} bytes) into {shown_dest}");
            return Ok(dry_info(dest));
        }
        let store = store.expect("not a dry run");
        // A large file resumes after a break even on one connection, and
        // what a run fetched of it waits for the next run if this one
        // does not finish (`store::outlet::Partial`).
        let resumable = size > self.fetch.parallel_above;
        let (pending, partial) = if resumable {
            let of = RemoteFile { host: host.to_string(), path: resolved.clone(), identity: identity.clone(), size };
            store.create_resumable(dest, &of)
        } else {
            store.create(dest).map(|p| (p, None))
        }
        .map_err(|e| io_error(&shown_dest, e))?;
        let kept = partial.unwrap_or(0);
        let mut sink = Sink::Plain(pending, shown_dest.clone());
        let mut buf = Vec::new();
        let mut got = kept;
        let bar = crate::progress::Bar::new(&format!("{host}:{resolved}"), Some(size));
        bar.inc(kept);
        let result = self.fetch_into(
            &mut sink,
            &mut buf,
            &mut pump,
            &bar,
            (host, path, &resolved, size, identity),
            round_trip,
            argv,
            &mut got,
        );
        drop(bar);
        let connections = match result {
            Ok(connections) => connections,
            Err((e, changed)) => {
                if changed {
                    sink.discard_partial();
                } else if partial.is_some() && got > 0 {
                    ::log::warn!(
                        target: "offsite::scp",
                        "host {host}: {resolved}: the {got} bytes fetched so far are kept; the next run that fetches \
                         this file, unchanged, goes on from them"
                    );
                }
                return Err(e);
            }
        };
        let origin = Origin {
            call: "scp.fetch".into(),
            host: Some(host.to_string()),
            remote: Some(resolved.clone()),
            exit_status: Some(0),
            ..Origin::default()
        };
        let stored = sink.finish().and_then(|p| p.commit(origin)).map_err(|e| io_error(&shown_dest, e))?;
        ::log::info!(
            target: "offsite::scp",
            "host {host}: stored {resolved} as {} ({} bytes, sha256 {}) in {:.1?}{}{}",
            stored.path, stored.bytes, stored.sha256, started.elapsed(),
            if connections > 1 { format!(" over {connections} connections") } else { String::new() },
            if kept > 0 { format!(", going on from the {kept} bytes an earlier run fetched") } else { String::new() }
        );
        Ok(self.record(stored))
    }

    /// The copying half of [`fetch`](Self::fetch): from byte `got` to the
    /// end, over the stream `pump` opened (or lanes). Returns how many
    /// connections carried the file; an error says whether the file
    /// changed, so that its bytes are of no use.
    #[allow(clippy::too_many_arguments)]
    fn fetch_into(
        &self,
        sink: &mut Sink,
        buf: &mut Vec<u8>,
        pump: &mut Pump,
        bar: &crate::progress::Bar,
        (host, path, resolved, size, identity): (&str, &str, &str, u64, String),
        round_trip: Duration,
        argv: Vec<String>,
        got: &mut u64,
    ) -> Result<usize, (Error, bool)> {
        let failed = |what: String| Error::RemoteFailed(format!("host {host}: fetching {path}: {what}"));
        let plain = |e: Error| (e, false);
        let resumable = size > self.fetch.parallel_above;
        // One stream first. A large file whose stream runs slower than
        // one connection carries on a short link, or whose connection
        // breaks, goes on in ranges over several (see `lanes`), from the
        // byte it reached. One an earlier run began goes on in ranges at
        // once.
        let may_spread = resumable && self.fetch.connections > 1;
        let mut checkpointed = (Instant::now(), *got);
        if *got > 0 {
            ::log::info!(
                target: "offsite::scp",
                "host {host}: {resolved}: going on from byte {got} of {size}, which an earlier run fetched (the file is \
                 unchanged: same device, inode, size and modification time)"
            );
        }
        let mut went_on: Option<lanes::Start> = (*got > 0).then_some(lanes::Start::Continue);
        if went_on.is_none() {
            pump.process.feed_stdin(b"go\n".to_vec());
        }
        // From `go` to the first byte is one round trip (and a `head`
        // starting): what the link's latency is.
        let asked = Instant::now();
        // The stream's first byte, and where its rate is measured from:
        // after its slow start (`lanes::WARM_UP`).
        let (mut streaming, mut mark, mut decided) = (None::<Instant>, None::<(Instant, u64)>, !may_spread);
        while *got < size && went_on.is_none() {
            let mut broke = None;
            let received = sink.receive(buf, |into| {
                let want = into.len().min((size - *got) as usize);
                pump.read(&mut into[..want]).inspect_err(|e| broke = Some(e.clone()))
            });
            let n = match received {
                Ok(n) => n,
                Err(_) if resumable && broke.is_some() => {
                    went_on = Some(lanes::Start::Resume(broke.expect("a read error")));
                    break;
                }
                Err(e) => return Err(plain(e)),
            };
            if n == 0 {
                let why = pump.closed_early("");
                if resumable {
                    let e = Error::RemoteFailed(format!("the connection ended after {got} of {size} bytes{why}"));
                    went_on = Some(lanes::Start::Resume(e));
                    break;
                }
                return Err(plain(failed(format!(
                    "the transfer stopped after {got} of {size} bytes{why}; nothing was stored"
                ))));
            }
            *got += n as u64;
            bar.inc(n as u64);
            sink.checkpoint(&mut checkpointed, *got).map_err(plain)?;
            let first = *streaming.get_or_insert_with(Instant::now);
            if !decided && mark.is_none() && first.elapsed() >= lanes::WARM_UP {
                mark = Some((Instant::now(), *got));
            }
            if let Some((since, from)) = mark
                && !decided
                && since.elapsed() >= lanes::MEASURE
            {
                decided = true;
                let rate = (*got - from) as f64 / since.elapsed().as_secs_f64();
                // Two bounds from above of the round trip: the smaller is
                // nearer. `go` alone can read high by a delayed ACK's
                // 40 ms (it is a small write behind others).
                let rtt = first.duration_since(asked).min(round_trip);
                let in_flight = rate * rtt.as_secs_f64();
                // Under a bandwidth limit it nearly reaches, the limit is
                // what holds the stream back: more connections would not help.
                let limit = self.paces.iter().map(|p| p.rate()).min();
                if lanes::worth_spreading(rate, in_flight) && limit.is_none_or(|l| rate < 0.8 * l as f64) {
                    went_on = Some(lanes::Start::Spread(rate));
                    break;
                }
            }
        }
        let Some(start) = went_on else {
            buf.resize(4096, 0);
            if pump.read(buf).map_err(plain)? != 0 {
                return Err(plain(failed("unexpected data after the file".into())));
            }
            let exit = pump.finish().map_err(plain)?;
            if exit != Exit::Status(0) {
                let stderr = self.redact(&pump.stderr_text());
                return Err(plain(failed(format!("{exit}; nothing was stored{}", stderr_suffix(&stderr)))));
            }
            return Ok(1);
        };
        pump.kill();
        let opened = lanes::Opened {
            host: host.to_string(),
            path: path.to_string(),
            resolved: resolved.to_string(),
            size,
            identity,
        };
        let mut lanes = lanes::Lanes::start(self.clone(), argv, opened, *got, start, self.fetch);
        let copied = (|| {
            while *got < size {
                let n = sink.receive(buf, |into| lanes.read(into))?;
                if n == 0 {
                    return Err(failed(format!(
                        "the transfer stopped after {got} of {size} bytes; nothing was stored"
                    )));
                }
                *got += n as u64;
                bar.inc(n as u64);
                sink.checkpoint(&mut checkpointed, *got)?;
            }
            lanes.finish()
        })();
        copied.map_err(|e| (e, lanes.file_changed()))
    }

    fn connect(&self, host: &str) -> Result<(), Error> {
        if self.offline {
            return Ok(());
        }
        self.transport.connect(host).map_err(|e| transport_error(&self.redact(&e.to_string()), &e))
    }

    fn record(&self, stored: StoredFile) -> FileInfo {
        let info = FileInfo { path: stored.path.clone(), bytes: stored.bytes, sha256: stored.sha256.clone() };
        self.outputs.lock().unwrap_or_else(|e| e.into_inner()).push(stored);
        info
    }
}

fn dry_info(dest: &Path) -> FileInfo {
    FileInfo { path: dest.to_string_lossy().into_owned(), bytes: 0, sha256: String::new() }
}

fn stderr_suffix(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() { String::new() } else { format!("; stderr: {s}") }
}

fn log_stderr(host: &str, stderr: &str) {
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        ::log::warn!(target: "offsite::ssh", "host {host}: stderr: {line}");
    }
}

/// Maps a transport failure to the error the script sees.
fn transport_error(message: &str, e: &TransportError) -> Error {
    match e {
        TransportError::Timeout { .. } => Error::Timeout(message.to_string()),
        TransportError::Config { .. } => Error::InvalidArgument(message.to_string()),
        _ => Error::RemoteFailed(message.to_string()),
    }
}

/// Where streamed output goes: the pending file, maybe through gzip; and
/// the destination as the script named it, for errors.
enum Sink {
    Plain(PendingFile, String),
    Gz(ParallelGz<PendingFile>, String),
}

impl Sink {
    /// Lets `read` put the next bytes where they go (straight into the
    /// file's own buffer when nothing transforms them on the way; through
    /// `scratch` into gzip otherwise) and takes them. Returns how many.
    fn receive(
        &mut self,
        scratch: &mut Vec<u8>,
        read: impl FnOnce(&mut [u8]) -> Result<usize, Error>,
    ) -> Result<usize, Error> {
        match self {
            Sink::Plain(f, dest) => {
                let n = read(f.spare())?;
                f.filled(n).map_err(|e| io_error(dest, e))?;
                Ok(n)
            }
            Sink::Gz(g, dest) => {
                scratch.resize(256 << 10, 0);
                let n = read(scratch)?;
                g.write_all(&scratch[..n]).map_err(|e| io_error(dest, e))?;
                Ok(n)
            }
        }
    }

    fn finish(self) -> io::Result<PendingFile> {
        match self {
            Sink::Plain(f, _) => Ok(f),
            Sink::Gz(g, _) => g.finish(),
        }
    }

    /// Every [`CHECKPOINT_BYTES`] or [`CHECKPOINT_EVERY`] (whichever
    /// comes first), makes what was received durable where a later run
    /// can go on from it; `last` is when, and at which byte, it last did.
    fn checkpoint(&mut self, last: &mut (Instant, u64), got: u64) -> Result<(), Error> {
        if got - last.1 < CHECKPOINT_BYTES && last.0.elapsed() < CHECKPOINT_EVERY {
            return Ok(());
        }
        *last = (Instant::now(), got);
        match self {
            Sink::Plain(f, dest) => f.checkpoint().map_err(|e| io_error(dest, e)),
            Sink::Gz(..) => Ok(()),
        }
    }

    fn discard_partial(&mut self) {
        if let Sink::Plain(f, _) = self {
            f.discard_partial();
        }
    }
}

/// The last [`TAIL_BYTES`] of a stream.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, data: &[u8]) {
        if data.len() >= TAIL_BYTES {
            self.0.clear();
            self.0.extend_from_slice(&data[data.len() - TAIL_BYTES..]);
        } else {
            self.0.extend_from_slice(data);
            if self.0.len() > TAIL_BYTES {
                self.0.drain(..self.0.len() - TAIL_BYTES);
            }
        }
    }
    fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.0.windows(needle.len()).any(|w| w == needle)
    }
}

/// How much a resumable fetch receives, at most, between making its bytes
/// durable for a later run: what a killed run can lose.
const CHECKPOINT_BYTES: u64 = 256 << 20;
/// And how long, at most.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// How often a quiet remote command looks whether the run must stop.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Reads one remote command's stdout with its idle and call timeouts,
/// keeping stderr on the side.
pub(super) struct Pump {
    pub(super) process: Box<dyn RemoteProcess>,
    /// Set by whoever gives up on this command (a fetch that ended, or
    /// found this lane stalled): the next read kills it.
    pub(super) cancel: Vec<Arc<std::sync::atomic::AtomicBool>>,
    /// Bandwidth limits every byte of stdout is paid to.
    paces: Vec<Arc<Pace>>,
    host: String,
    idle: Duration,
    deadline: Instant,
    /// The run's deadline, not the call's timeout, sets `deadline`.
    by_run: bool,
    stderr: Vec<u8>,
    stderr_total: u64,
    /// Keep at most this much stderr (its end).
    stderr_cap: usize,
    /// Masks secrets in stderr before any of it is kept or cut.
    redactor: StreamRedactor,
    scratch: Vec<u8>,
}

impl Pump {
    fn new(
        process: Box<dyn RemoteProcess>,
        host: &str,
        idle: Duration,
        call_timeout: Duration,
        run_deadline: Option<Instant>,
    ) -> Pump {
        let (deadline, by_run) = super::Caps::call_deadline(call_timeout, run_deadline);
        Pump {
            process,
            host: host.to_string(),
            idle,
            deadline,
            by_run,
            stderr: Vec::new(),
            stderr_total: 0,
            stderr_cap: STDERR_KEEP,
            redactor: StreamRedactor::new(&[]),
            scratch: vec![0u8; 8192],
            cancel: Vec::new(),
            paces: Vec::new(),
        }
    }

    /// Reads stdout; 0 means both streams ended. Gives up when nothing
    /// arrived for the idle timeout, at the call's deadline, or when the
    /// process is asked to stop (crate::abort), killing the command.
    pub(super) fn read(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        let mut quiet_since = Instant::now();
        loop {
            if crate::abort::requested() {
                self.kill();
                return Err(Error::RemoteFailed(format!("host {}: {}", self.host, crate::abort::message())));
            }
            if self.cancel.iter().any(|c| c.load(Ordering::Relaxed)) {
                self.kill();
                return Err(Error::RemoteFailed(format!("host {}: the transfer was called off", self.host)));
            }
            let now = Instant::now();
            if now >= self.deadline {
                self.kill();
                let what = if self.by_run { "the run's deadline" } else { "its call_timeout" };
                return Err(Error::Timeout(format!("host {}: the call ran past {what}", self.host)));
            }
            if now >= quiet_since + self.idle {
                self.kill();
                return Err(Error::Timeout(format!(
                    "host {}: nothing arrived for {} (idle_timeout); gave up",
                    self.host,
                    humantime::format_duration(self.idle)
                )));
            }
            let wait = (quiet_since + self.idle).min(self.deadline) - now;
            let event = self.process.next(buf, wait.min(STOP_POLL)).map_err(|e| {
                Error::RemoteFailed(format!("host {}: reading from the remote command: {e}", self.host))
            })?;
            match event {
                Some(Event::Stdout(n)) => {
                    self.pay(n)?;
                    return Ok(n);
                }
                Some(Event::Stderr(n)) => {
                    // Move it out of `buf`, which belongs to stdout.
                    self.scratch.clear();
                    self.scratch.extend_from_slice(&buf[..n]);
                    self.push_stderr();
                    quiet_since = Instant::now();
                }
                Some(Event::Closed) => return Ok(0),
                None => continue,
            }
        }
    }

    fn push_stderr(&mut self) {
        self.stderr_total += self.scratch.len() as u64;
        let clean = self.redactor.push(&self.scratch);
        self.keep_stderr(&clean);
    }

    /// Stderr as kept (its end, secrets masked before the cut), as text.
    /// Waits until `n` bytes just read are within every bandwidth limit,
    /// still honouring a stop, a cancel and the deadline.
    fn pay(&mut self, n: usize) -> Result<(), Error> {
        let now = Instant::now();
        let Some(wait) = self.paces.iter().map(|p| p.take(n as u64, now)).max() else { return Ok(()) };
        let until = now + wait;
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            if crate::abort::requested() || self.cancel.iter().any(|c| c.load(Ordering::Relaxed)) {
                return Ok(()); // the next read says why
            }
            if now >= self.deadline {
                self.kill();
                let what = if self.by_run { "the run's deadline" } else { "its call_timeout" };
                return Err(Error::Timeout(format!("host {}: the call ran past {what}", self.host)));
            }
            std::thread::sleep((until - now).min(STOP_POLL));
        }
    }

    pub(super) fn stderr_text(&mut self) -> String {
        let rest = self.redactor.finish();
        self.keep_stderr(&rest);
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    fn keep_stderr(&mut self, clean: &[u8]) {
        self.stderr.extend_from_slice(clean);
        if self.stderr.len() > self.stderr_cap {
            let cut = self.stderr.len() - self.stderr_cap;
            self.stderr.drain(..cut);
        }
    }

    /// One protocol line (up to `\n`), read a byte at a time so nothing
    /// after it is consumed. `None` at end of stream.
    pub(super) fn read_line(&mut self) -> Result<Option<Vec<u8>>, Error> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            if self.read(&mut byte)? == 0 {
                return Ok(if line.is_empty() { None } else { Some(line) });
            }
            if byte[0] == b'\n' {
                return Ok(Some(line));
            }
            if line.len() > 4096 {
                return Err(Error::RemoteFailed(format!("host {}: protocol line too long", self.host)));
            }
            line.push(byte[0]);
        }
    }

    /// Why the stream ended early, for a message.
    pub(super) fn closed_early(&mut self, when: &str) -> String {
        let exit = self.process.finish(Duration::from_secs(5)).map(|e| e.to_string()).unwrap_or_else(|e| e.to_string());
        let stderr = self.stderr_text().trim().to_string();
        let mut s = if when.is_empty() { format!(" ({exit})") } else { format!(" {when} ({exit})") };
        if !stderr.is_empty() {
            s.push_str(&format!("; stderr: {stderr}"));
        }
        s
    }

    pub(super) fn finish(&mut self) -> Result<Exit, Error> {
        let left = self.deadline.saturating_duration_since(Instant::now()).min(self.idle);
        self.process.finish(left).map_err(|e| match e {
            TransportError::Timeout { .. } => Error::Timeout(e.to_string()),
            _ => Error::RemoteFailed(e.to_string()),
        })
    }

    pub(super) fn kill(&mut self) {
        self.process.kill();
    }
}

/// A counting semaphore bounding transfers that run at once.
pub struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    pub fn new(n: usize) -> Slots {
        Slots { free: Mutex::new(n.max(1)), freed: Condvar::new() }
    }

    pub fn acquire(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        SlotGuard(self)
    }
}

pub struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// A background transfer: the `pending` resource.
pub struct Job {
    slot: Arc<JobSlot>,
}

#[derive(Default)]
pub struct JobSlot {
    result: Mutex<Option<Result<FileInfo, Error>>>,
    done: Condvar,
    /// The script called `wait` and so saw the result.
    observed: std::sync::atomic::AtomicBool,
    pub what: String,
}

impl JobSlot {
    fn wait(&self) -> Result<FileInfo, Error> {
        let mut result = self.result.lock().unwrap_or_else(|e| e.into_inner());
        while result.is_none() {
            result = self.done.wait(result).unwrap_or_else(|e| e.into_inner());
        }
        result.clone().expect("set")
    }
}

impl Job {
    /// Runs `work` on its own thread.
    pub fn start(
        what: String,
        failures: Arc<AtomicU32>,
        work: impl FnOnce() -> Result<FileInfo, Error> + Send + 'static,
    ) -> (Job, Arc<JobSlot>) {
        let slot = Arc::new(JobSlot { what, ..Default::default() });
        let theirs = Arc::clone(&slot);
        std::thread::spawn(move || {
            let result = work();
            if result.is_err() {
                failures.fetch_add(1, Ordering::Relaxed);
            }
            *theirs.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            theirs.done.notify_all();
        });
        (Job { slot: Arc::clone(&slot) }, slot)
    }

    pub fn wait(&self) -> Result<FileInfo, Error> {
        self.slot.observed.store(true, Ordering::Relaxed);
        self.slot.wait()
    }
}

/// Waits for every job and returns the errors of those whose result the
/// script never looked at: a failure it did not see still fails the run.
pub fn settle(jobs: &[Arc<JobSlot>]) -> Vec<String> {
    let mut unseen = Vec::new();
    for job in jobs {
        if let Err(e) = job.wait()
            && !job.observed.load(Ordering::Relaxed)
        {
            unseen.push(format!("{}: {}", job.what, super::describe_error(&e)));
        }
    }
    unseen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end_across_pushes() {
        let mut t = Tail::default();
        t.push(&vec![b'x'; 10_000]);
        t.push(b"-- Dump com");
        t.push(b"pleted on 2026-11-26\n");
        assert!(t.contains(b"-- Dump completed"));
        assert_eq!(t.0.len(), TAIL_BYTES);
        t.push(&vec![b'y'; TAIL_BYTES]);
        assert!(!t.contains(b"-- Dump completed"));
    }

    #[test]
    fn slots_bound_concurrency() {
        let slots = Arc::new(Slots::new(2));
        let running = Arc::new(AtomicU32::new(0));
        let peak = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (slots, running, peak) = (Arc::clone(&slots), Arc::clone(&running), Arc::clone(&peak));
                std::thread::spawn(move || {
                    let _g = slots.acquire();
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }
}
