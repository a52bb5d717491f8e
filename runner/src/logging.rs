//! The runner's log: plain lines on stderr, quiet by default.
//!
//! Under cron everything printed is mailed, so a successful run prints
//! nothing: the default level shows warnings and errors only, `-v` adds
//! progress (`info`), `-vv` adds every policy decision (`debug`).
//!
//! Under systemd (`$JOURNAL_STREAM` names our stderr), each message goes to
//! the journal itself, with its priority and the run's fields (`OFFSITE_SITE`,
//! `OFFSITE_RUN_ID`, `OFFSITE_SCRIPT_SHA256`, `OFFSITE_STATUS`), so
//! `journalctl -u offsite@web1 -p warning` and `journalctl OFFSITE_SITE=web1`
//! work. Should the journal's socket not take it, the line goes to stderr
//! with a `<N>` priority prefix, which the journal reads on that stream too.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLog {
    level: LevelFilter,
}

static LOGGER: OnceLock<StderrLog> = OnceLock::new();

/// Installs the logger; `verbosity` is the number of `-v` flags;
/// `timestamps` starts every line with the time (see [`prefix`]).
pub fn init(verbosity: u8, timestamps: bool) {
    let timestamps =
        (timestamps || std::env::var_os(LOG_TIME_VAR).is_some()) && std::env::var_os("JOURNAL_STREAM").is_none();
    TIMESTAMPS.store(timestamps, std::sync::atomic::Ordering::Relaxed);
    let level = match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    let logger = LOGGER.get_or_init(|| StderrLog { level });
    if log::set_logger(logger).is_ok() {
        // Progress lines always reach the logger, for a run's log tail.
        log::set_max_level(level.max(LevelFilter::Info));
    }
}

/// Set by `offsite watch` for the runs it starts: their lines carry the
/// time too.
pub const LOG_TIME_VAR: &str = "OFFSITE_LOG_TIME";

static TIMESTAMPS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What starts every line on stderr: a local timestamp for a long-running
/// `offsite watch` and the runs it starts (`$OFFSITE_LOG_TIME`), unless
/// systemd's journal, which stamps lines itself, is reading them; then
/// `$OFFSITE_LOG_PREFIX`, which `offsite watch` sets to tell its sites'
/// runs apart in one log.
pub fn prefix() -> String {
    static PREFIX: OnceLock<String> = OnceLock::new();
    let prefix = PREFIX.get_or_init(|| std::env::var("OFFSITE_LOG_PREFIX").unwrap_or_default());
    if TIMESTAMPS.load(std::sync::atomic::Ordering::Relaxed) {
        format!("{} {prefix}", chrono::Local::now().format("%Y-%m-%dT%H:%M:%S%.3f%:z"))
    } else {
        prefix.clone()
    }
}

/// What a run logged: its warnings (they make a good run's status
/// `warning`) and the last lines, for a failure notification.
#[derive(Debug, Default)]
pub struct Capture {
    pub warnings: Vec<String>,
    pub tail: VecDeque<String>,
    /// Warnings were left out (the note is the last one kept).
    left_out: bool,
}

/// Lines kept for the tail, and warnings kept for the manifest.
const TAIL_LINES: usize = 100;
const MAX_WARNINGS: usize = 50;
/// Most bytes of warnings kept for the manifest, so that what a script logs
/// cannot grow a manifest past about this.
const MAX_WARNING_BYTES: usize = 64 << 10;
/// Longest message logged whole (a script's, or one quoting a server).
pub const MAX_MESSAGE: usize = 4096;
/// Most lines a script may log in one run (its `log` calls and what it
/// prints); the rest are counted, not shown.
pub const MAX_SCRIPT_LINES: usize = 1000;

static SCRIPT_LINES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts one script line; false once the run's budget is spent (the
/// first line over it says so).
fn script_budget() -> bool {
    let n = SCRIPT_LINES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if n == MAX_SCRIPT_LINES {
        log::warn!(
            target: "offsite::log",
            "the script logged more than {MAX_SCRIPT_LINES} lines; the rest of its messages are counted, not shown"
        );
    }
    n < MAX_SCRIPT_LINES
}

/// How many script lines were not shown (for the run's summary).
pub fn script_lines_dropped() -> usize {
    SCRIPT_LINES.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(MAX_SCRIPT_LINES)
}

/// Targets whose warnings never change a run's status: a notification or
/// report that failed after (or around) the run.
const NOT_THE_RUNS: [&str; 2] = ["offsite::notify", "offsite::report"];

static CAPTURE: Mutex<Option<Capture>> = Mutex::new(None);

/// Starts collecting this process's warnings and log tail.
pub fn capture_start() {
    *CAPTURE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Capture::default());
}

/// What was collected since [`capture_start`]; collection goes on.
pub fn capture_snapshot() -> Capture {
    let guard = CAPTURE.lock().unwrap_or_else(|e| e.into_inner());
    match &*guard {
        Some(c) => Capture { warnings: c.warnings.clone(), tail: c.tail.clone(), left_out: c.left_out },
        None => Capture::default(),
    }
}

fn capture(record: &Record<'_>, line: &str) {
    let mut guard = CAPTURE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = guard.as_mut() else { return };
    if record.level() == Level::Warn && !NOT_THE_RUNS.contains(&record.target()) {
        // What reaches the manifest is bounded in lines and in bytes.
        let kept: usize = c.warnings.iter().map(String::len).sum();
        let full = c.warnings.len() >= MAX_WARNINGS || kept + line.len() > MAX_WARNING_BYTES;
        if !full {
            c.warnings.push(line.to_string());
        } else if !c.left_out {
            c.left_out = true;
            c.warnings.push("(more warnings were left out)".to_string());
        }
    }
    if c.tail.len() == TAIL_LINES {
        c.tail.pop_front();
    }
    c.tail.push_back(line.to_string());
}

impl Log for StderrLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        // Wasmtime's and Cranelift's own chatter only at -vvv.
        let ours = metadata.target().starts_with("offsite") || metadata.target().starts_with("script");
        metadata.level() <= self.level && (ours || self.level >= LevelFilter::Trace)
    }

    fn log(&self, record: &Record<'_>) {
        let ours = record.target().starts_with("offsite") || record.target().starts_with("script");
        let shown = self.enabled(record.metadata());
        let captured = ours && record.level() <= Level::Info;
        if !shown && !captured {
            return;
        }
        let who = record.target().strip_prefix("script:").unwrap_or("offsite");
        let level = match record.level() {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            Level::Info => "",
            Level::Debug => "debug: ",
            Level::Trace => "trace: ",
        };
        let script = record.target().starts_with("script:");
        if script && !script_budget() {
            return;
        }
        // Every line is escaped (no terminal control, no forged line), cut
        // to a bounded length, and a message of several lines keeps its
        // writer and level on each, so no line passes for another's.
        let message = crate::text::truncate(&record.args().to_string(), MAX_MESSAGE).into_owned();
        let lines = crate::text::escape_lines(&message);
        let mut text = String::new();
        for (i, part) in lines.iter().enumerate() {
            let line = if i == 0 { format!("{who}: {level}{part}") } else { format!("{who}: {level}  {part}") };
            if captured {
                capture(record, &line);
            }
            text.push_str(&prefix());
            text.push_str(&line);
            text.push('\n');
        }
        if shown {
            emit(record.level(), &text);
        }
    }

    fn flush(&self) {}
}

/// Writes `text` (whole lines, each with its prefix) at `level`: to the
/// journal when systemd reads our stderr, else to stderr.
pub fn emit(level: Level, text: &str) {
    let Some(journal) = journal::get() else {
        let write = || {
            let _ = std::io::stderr().lock().write_all(text.as_bytes());
        };
        // Between redraws of the progress lines, when there are any.
        #[cfg(feature = "runtime")]
        crate::progress::suspend(write);
        #[cfg(not(feature = "runtime"))]
        write();
        return;
    };
    let priority = match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    };
    if !journal.send(priority, text.trim_end_matches('\n')) {
        let prefixed: String = text.lines().map(|l| format!("<{priority}>{l}\n")).collect();
        let _ = std::io::stderr().lock().write_all(prefixed.as_bytes());
    }
}

/// Whether messages go to systemd's journal.
pub fn to_journal() -> bool {
    journal::get().is_some()
}

/// Sets a field every later journal message carries (`OFFSITE_SITE`, ...).
pub fn set_field(name: &'static str, value: &str) {
    let mut fields = journal::FIELDS.lock().unwrap_or_else(|e| e.into_inner());
    fields.retain(|(n, _)| *n != name);
    fields.push((name, value.to_string()));
}

mod journal {
    use std::os::unix::net::UnixDatagram;
    use std::path::PathBuf;
    use std::sync::{Mutex, OnceLock};

    /// The run's fields, added to every message.
    pub(super) static FIELDS: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());

    pub(super) struct Journal {
        socket: UnixDatagram,
        path: PathBuf,
    }

    /// The journal, when systemd connected our stderr to it: `$JOURNAL_STREAM`
    /// is `DEVICE:INODE` of that stream, and it must be our stderr still
    /// (not a stream inherited by a child whose stderr went elsewhere).
    pub(super) fn get() -> Option<&'static Journal> {
        static JOURNAL: OnceLock<Option<Journal>> = OnceLock::new();
        JOURNAL.get_or_init(detect).as_ref()
    }

    fn detect() -> Option<Journal> {
        let stream = std::env::var("JOURNAL_STREAM").ok()?;
        let (dev, ino) = stream.split_once(':')?;
        let stat = rustix::fs::fstat(std::io::stderr()).ok()?;
        if dev.parse::<u64>().ok()? != stat.st_dev as u64 || ino.parse::<u64>().ok()? != stat.st_ino as u64 {
            return None;
        }
        // `$OFFSITE_JOURNAL_SOCKET` stands in for journald in tests.
        let path = std::env::var_os("OFFSITE_JOURNAL_SOCKET")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/systemd/journal/socket"));
        Some(Journal { socket: UnixDatagram::unbound().ok()?, path })
    }

    impl Journal {
        /// One entry in journald's native protocol; false when it was not
        /// taken. Values go length-prefixed, so newlines in them are safe.
        pub(super) fn send(&self, priority: u8, message: &str) -> bool {
            let mut entry = Vec::with_capacity(message.len() + 256);
            let mut field = |name: &str, value: &[u8]| {
                entry.extend_from_slice(name.as_bytes());
                entry.push(b'\n');
                entry.extend_from_slice(&(value.len() as u64).to_le_bytes());
                entry.extend_from_slice(value);
                entry.push(b'\n');
            };
            field("PRIORITY", priority.to_string().as_bytes());
            field("SYSLOG_IDENTIFIER", b"offsite");
            field("MESSAGE", message.as_bytes());
            for (name, value) in FIELDS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                field(name, value.as_bytes());
            }
            self.socket.send_to(&entry, &self.path).is_ok_and(|n| n == entry.len())
        }
    }
}
