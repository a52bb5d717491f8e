//! What a script prints on WASI stdout and stderr goes to the runner's log,
//! line by line, under the script's name: stdout as progress (`-v`), stderr
//! as warnings. Memory stays bounded: an over-long line is split.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::caps::Clock;

const MAX_LINE: usize = 4096;

/// The two output streams of one script call.
#[derive(Clone)]
pub struct ScriptOutput {
    stdout: LineSink,
    stderr: LineSink,
}

impl ScriptOutput {
    pub fn new(script: &str, secrets: Vec<String>) -> ScriptOutput {
        let make = |level| LineSink {
            inner: Arc::new(Mutex::new(Lines {
                target: format!("script:{script}"),
                level,
                pending: Vec::new(),
                secrets: secrets.clone(),
                panic: None,
                panic_at: None,
            })),
        };
        ScriptOutput { stdout: make(log::Level::Info), stderr: make(log::Level::Warn) }
    }

    pub fn stdout(&self) -> LineSink {
        self.stdout.clone()
    }

    pub fn stderr(&self) -> LineSink {
        self.stderr.clone()
    }

    /// The panic the script reported on stderr, as `MESSAGE (at FILE:LINE:COL)`.
    pub fn panic(&self) -> Option<String> {
        self.stderr.inner.lock().unwrap().panic.clone()
    }

    /// Logs any final line that had no newline.
    pub fn flush(&self) {
        for sink in [&self.stdout, &self.stderr] {
            sink.inner.lock().unwrap().emit_pending();
        }
    }
}

/// One stream, shared between the WASI context and the runner.
#[derive(Clone)]
pub struct LineSink {
    inner: Arc<Mutex<Lines>>,
}

struct Lines {
    target: String,
    level: log::Level,
    pending: Vec<u8>,
    secrets: Vec<String>,
    /// A Rust panic seen on this stream: its message and where.
    panic: Option<String>,
    /// The location of a panic whose message is the next line.
    panic_at: Option<String>,
}

impl Lines {
    fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match bytes.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    self.append(&bytes[..i]);
                    self.emit_pending();
                    bytes = &bytes[i + 1..];
                }
                None => {
                    self.append(bytes);
                    bytes = &[];
                }
            }
        }
    }

    fn append(&mut self, mut bytes: &[u8]) {
        while self.pending.len() + bytes.len() > MAX_LINE {
            let take = MAX_LINE - self.pending.len();
            self.pending.extend_from_slice(&bytes[..take]);
            self.emit_pending();
            bytes = &bytes[take..];
        }
        self.pending.extend_from_slice(bytes);
    }

    fn emit_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let line = crate::caps::redact(&self.secrets, &String::from_utf8_lossy(&self.pending));
        self.pending.clear();
        let line = line.trim_end_matches('\r');
        // A Rust panic: `thread '...' panicked at FILE:L:C:`, then the
        // message. A panic ends the script (wasm aborts), and the run's
        // error says it in one line with the script's name: the two lines
        // go to the debug log only, and the advice to set RUST_BACKTRACE
        // (which a sandboxed script cannot use) is dropped.
        if let Some(at) = self.panic_at.take() {
            self.panic.get_or_insert_with(|| format!("{line} (at {at})"));
            log::debug!(target: &self.target, "{line}");
            return;
        } else if line.starts_with("thread '")
            && let Some((_, at)) = line.split_once(" panicked at ")
        {
            self.panic_at = Some(at.trim_end_matches(':').to_string());
            log::debug!(target: &self.target, "{line}");
            return;
        } else if line.starts_with("note: run with `RUST_BACKTRACE=") {
            return;
        }
        log::log!(target: &self.target, self.level, "{line}");
    }
}

impl IsTerminal for LineSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LineSink {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for LineSink {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.inner.lock().unwrap().push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl Pollable for LineSink {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LineSink {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.inner.lock().unwrap().push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// WASI's wall clock follows `--now` too, so `std::time::SystemTime` in a
/// script agrees with the `clock` interface.
pub struct WasiClock(pub Clock);

impl wasmtime_wasi::HostWallClock for WasiClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }

    fn now(&self) -> Duration {
        self.0.now().duration_since(std::time::SystemTime::UNIX_EPOCH).unwrap_or_default()
    }
}
