//! The wasmtime side: one `Engine` and one `Linker` per process, a cache of
//! compiled components, and a fresh `Store` with limits for every call into a
//! script.

use std::hash::Hash as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::{Script as ScriptWorld, ScriptPre, meta::ScriptInfo};
use crate::caps::Caps;
use crate::output::ScriptOutput;

/// How often the epoch advances; deadlines are counted in these ticks.
const TICK: Duration = Duration::from_millis(10);
/// Deadline for `describe`, which must not do any work.
const DESCRIBE_DEADLINE: Duration = Duration::from_secs(5);

/// Sandbox limits for one store.
#[derive(Debug, Clone, Copy)]
pub struct SandboxLimits {
    pub deadline: Duration,
    pub memory: u64,
}

/// The process-wide runtime.
pub struct Runtime {
    engine: Engine,
    linker: Linker<RunState>,
    cache: Option<PathBuf>,
    /// Whether cached code is re-hashed on load ([`Runtime::verify_cache_contents`]).
    verify_cache: bool,
    stop_ticker: Arc<AtomicBool>,
}

/// A loaded, validated script.
pub struct Script {
    pub path: PathBuf,
    pub sha256: String,
    pub component: Component,
    pre: ScriptPre<RunState>,
}

/// Why a call into a script failed.
#[derive(Debug)]
pub enum ScriptFailure {
    /// The script hit a sandbox limit (deadline, memory, stack): exit 3.
    Limit(String),
    /// The script trapped or otherwise failed: exit 1.
    Trap(String),
    /// The process was asked to stop (crate::abort): exit 1.
    Aborted(String),
}

/// Store data for one call into a script.
pub struct RunState {
    pub caps: Caps,
    wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    limiter: Limiter,
    /// When the call must end (its sandbox deadline).
    pub(crate) deadline: Instant,
    /// Zero of the script's monotonic clock (crate::sleep).
    pub(crate) clock_base: Instant,
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The engine's configuration: epochs for deadlines, a bounded stack, and
/// only the WebAssembly features our SDKs' scripts use.
///
/// On (what Rust, componentize-py and componentize-js emit): the component
/// model, multi-value, bulk memory, reference types, SIMD and relaxed
/// SIMD, tail calls and extended constants.
/// Off, because no script needs them and each widens what a hostile one
/// can do: multi-memory and 64-bit memories (more memory than a 32-bit
/// one, and a memory limit is easier to hold over fewer), custom page
/// sizes, wide arithmetic and stack switching; threads, GC, exceptions and
/// the component model's async are not built into our wasmtime.
fn config() -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.max_wasm_stack(1 << 20);
    config
        .wasm_multi_memory(false)
        .wasm_memory64(false)
        .wasm_custom_page_sizes(false)
        .wasm_wide_arithmetic(false)
        .wasm_stack_switching(false);
    config
}

impl Runtime {
    /// Builds the engine, the linker with every capability, and the epoch
    /// ticker. `cache` is the compiled-component cache directory, if any.
    pub fn new(cache: Option<PathBuf>) -> Result<Runtime> {
        let engine = Engine::new(&config())?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        // Sleeps end at the deadline and on a stop request.
        crate::sleep::add_to_linker(&mut linker)?;
        ScriptWorld::add_to_linker::<RunState, HasSelf<Caps>>(&mut linker, |s: &mut RunState| &mut s.caps)?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (weak, stop) = (engine.weak(), Arc::clone(&stop_ticker));
        std::thread::Builder::new().name("epoch".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            }
        })?;
        Ok(Runtime { engine, linker, cache, verify_cache: false, stop_ticker })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Reads, compiles (or loads from the cache) and type-checks a script.
    /// Every error names the file and says why it is not a usable script.
    pub fn load(&self, path: &Path) -> Result<Script> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read script {}", path.display()))?;
        self.load_bytes(path, &bytes)
    }

    /// Like [`Runtime::load`], for bytes already read from `path`.
    pub fn load_bytes(&self, path: &Path, bytes: &[u8]) -> Result<Script> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        if !bytes.starts_with(b"\0asm") {
            bail!(
                "{} is not a WebAssembly component: it does not start with the WebAssembly magic bytes (is it \
                 the right file?)",
                path.display()
            );
        }
        let component = self.compile_cached(bytes, &sha256).map_err(|e| {
            log::debug!(target: "offsite::engine", "compiling {}: {e:?}", path.display());
            anyhow!("{} is not a valid WebAssembly component: {}", path.display(), one_line(&format!("{e:#}")))
        })?;
        let instance_pre = self.linker.instantiate_pre(&component).map_err(|e| {
            anyhow!(
                "{} cannot run under offsite: it needs something this runner does not provide: {e:#}",
                path.display()
            )
        })?;
        let pre = ScriptPre::new(instance_pre)
            .map_err(|e| anyhow!("{} is not an offsite:backup/script component: {e:#}", path.display()))?;
        Ok(Script { path: path.to_path_buf(), sha256, component, pre })
    }

    /// The cache entry (compiled code) for the script `sha256` under this
    /// engine; its record is the same name with `.sum`.
    fn cache_file(&self, dir: &Path, sha256: &str) -> PathBuf {
        let mut key = Sha256::new();
        key.update(sha256.as_bytes());
        self.engine.precompile_compatibility_hash().hash(&mut HashInto(&mut key));
        dir.join(format!("{}.cwasm", hex::encode(&key.finalize()[..16])))
    }

    /// Whether a usable compiled copy of the script `sha256` is in the
    /// cache (`inspect` says so; the first run of a big script pays its
    /// compile).
    pub fn is_compiled(&self, sha256: &str) -> Option<PathBuf> {
        let dir = self.cache.as_deref()?;
        let file = self.cache_file(dir, sha256);
        open_cache_entry(&file, sha256, false).ok().flatten().map(|_| file)
    }

    /// Makes loads re-hash a cached entry's whole compiled code against
    /// its record (`offsite check` does; runs trust the record's binding to
    /// the file and skip the tens of milliseconds a big script's hash costs).
    pub fn verify_cache_contents(&mut self, on: bool) {
        self.verify_cache = on;
    }

    fn compile_cached(&self, bytes: &[u8], sha256: &str) -> Result<Component> {
        let Some(dir) = self.cache.as_deref().filter(|d| cache_dir_is_safe(d)) else {
            return Ok(Component::new(&self.engine, bytes)?);
        };
        let file = self.cache_file(dir, sha256);
        match open_cache_entry(&file, sha256, self.verify_cache) {
            // SAFETY: the code is what this runner wrote for exactly this
            // script and engine: the entry was opened without following
            // links and is a regular file owned by us that nobody else can
            // write, in a directory chain nobody else can rename into; its
            // record names the script's SHA-256 and this very file (device,
            // inode, size), so no other entry can stand in for it; entries
            // are written whole (fsync, then rename) and never changed in
            // place, so a mapped entry is never truncated under a run. The
            // load goes through
            // the descriptor already checked, not the name. Its name binds it
            // to this engine's compatibility hash, and wasmtime checks that
            // again.
            Ok(Some(entry)) => match unsafe { entry.load(&self.engine) } {
                Ok(c) => {
                    // Used now: eviction goes by least recent use.
                    let _ = entry.file.set_modified(std::time::SystemTime::now());
                    return Ok(c);
                }
                Err(e) => log::debug!(target: "offsite::engine", "ignoring cache entry {}: {e:#}", file.display()),
            },
            Ok(None) => {}
            Err(why) => log::info!(target: "offsite::engine", "ignoring cache entry {}: {why}", file.display()),
        }
        // Runs that start together (a timer's and `offsite check`'s, or
        // `watch`'s sites sharing a script) compile it once: the others
        // wait for the entry and load it.
        let compiling = CompileLock::take(dir, &file, COMPILE_LOCK_WAIT);
        if compiling.is_some()
            && let Ok(Some(entry)) = open_cache_entry(&file, sha256, self.verify_cache)
        {
            // SAFETY: as above: the entry another run of ours has just
            // written, opened and checked the same way.
            if let Ok(c) = unsafe { entry.load(&self.engine) } {
                return Ok(c);
            }
        }
        #[cfg(test)]
        COMPILED.lock().unwrap().push(sha256.to_string());
        let compiled = self.engine.precompile_component(bytes)?;
        if let Err(e) = write_cache_entry(dir, &file, sha256, &compiled) {
            log::info!(target: "offsite::engine", "cannot write compile cache {}: {e:#}", file.display());
        }
        evict(dir, &file, cache_limit());
        // SAFETY: `compiled` was produced by this engine just now.
        Ok(unsafe { Component::deserialize(&self.engine, &compiled) }?)
    }

    /// Calls the script's `describe` with every capability denied.
    pub fn describe(&self, script: &Script, caps: Caps) -> Result<ScriptInfo, ScriptFailure> {
        let limits = SandboxLimits { deadline: DESCRIBE_DEADLINE, memory: 64 << 20 };
        let (result, _) = self.call(script, caps, limits, |bindings, store| bindings.call_describe(store));
        result
    }

    /// Calls the script's `run`. Returns the script's own verdict (its `err`
    /// string) inside `Ok`, and the capability state for reporting.
    pub fn run(
        &self,
        script: &Script,
        caps: Caps,
        limits: SandboxLimits,
    ) -> (Result<Result<(), String>, ScriptFailure>, Caps) {
        self.call(script, caps, limits, |bindings, store| bindings.call_run(store))
    }

    fn call<R>(
        &self,
        script: &Script,
        caps: Caps,
        limits: SandboxLimits,
        f: impl FnOnce(&ScriptWorld, &mut Store<RunState>) -> wasmtime::Result<R>,
    ) -> (Result<R, ScriptFailure>, Caps) {
        let output = ScriptOutput::new(&caps.script, caps.secrets.clone());
        // WASI with nothing granted: no preopened directories, no environment,
        // no arguments, no sockets, no name lookups. Everything a script may
        // touch goes through the offsite:backup interfaces and the policy.
        let mut wasi = WasiCtx::builder();
        wasi.stdout(output.stdout()).stderr(output.stderr());
        wasi.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        wasi.socket_addr_check(|_, _| Box::pin(async { false }));
        wasi.wall_clock(crate::output::WasiClock(caps.clock));
        // Wall time, so that time spent in host calls counts too.
        let deadline = Instant::now() + limits.deadline;
        let state = RunState {
            caps,
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: Limiter::new(limits.memory as usize),
            deadline,
            clock_base: Instant::now(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Every tick: stop if the process is asked to (crate::abort), trap
        // once the deadline has passed.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if crate::abort::requested() {
                return Err(wasmtime::Error::msg(crate::abort::message()));
            }
            Ok(if Instant::now() >= deadline { UpdateDeadline::Interrupt } else { UpdateDeadline::Continue(1) })
        });

        let result = script.pre.instantiate(&mut store).and_then(|bindings| f(&bindings, &mut store)).map_err(|e| {
            output.flush();
            let name = store.data().caps.script.clone();
            classify(e, store.data().limiter.hit.as_deref(), limits, output.panic(), &name)
        });
        output.flush();
        (result, store.into_data().caps)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

fn classify(
    e: wasmtime::Error,
    limit_hit: Option<&str>,
    limits: SandboxLimits,
    panic: Option<String>,
    script: &str,
) -> ScriptFailure {
    // The wasm backtrace (function numbers) helps nobody reading cron
    // mail; it is in the log at -vv.
    log::debug!(target: "offsite::engine", "the script stopped: {e:?}");
    if let Some(hit) = limit_hit {
        return ScriptFailure::Limit(hit.to_string());
    }
    if crate::abort::requested() {
        return ScriptFailure::Aborted(crate::abort::message());
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => ScriptFailure::Limit(format!(
            "the script ran past its deadline of {}",
            humantime::format_duration(limits.deadline)
        )),
        Some(Trap::StackOverflow) => ScriptFailure::Limit("the script overflowed its stack".into()),
        Some(trap) => ScriptFailure::Trap(match panic {
            Some(p) => format!("script {} panicked: {p}", crate::text::escape(script)),
            None => format!("the script trapped: {trap}"),
        }),
        None => ScriptFailure::Trap(format!("the script failed: {}", one_line(&e.root_cause().to_string()))),
    }
}

/// `text` on one line with its runs of white space folded, cut to 300
/// bytes: wasmtime's errors span lines (byte dumps, backtraces).
pub fn one_line(text: &str) -> String {
    let folded = text.split_whitespace().collect::<Vec<_>>().join(" ");
    crate::text::truncate(&folded, 300).into_owned()
}

/// Caps memory and table growth and instance counts, and remembers which
/// limit was hit so that the run can report it (exit 3) rather than a bare
/// trap. The limits bound the sum over every memory and every table of the
/// store: a component may instantiate many core modules, each with its
/// own memory.
struct Limiter {
    memory: usize,
    memory_used: usize,
    table_used: usize,
    hit: Option<String>,
}

/// Most table elements a script's tables may hold together.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl Limiter {
    fn new(memory: usize) -> Limiter {
        Limiter { memory, memory_used: 0, table_used: 0, hit: None }
    }

    fn refuse(&mut self, msg: String) -> wasmtime::Result<bool> {
        self.hit = Some(msg.clone());
        Err(wasmtime::Error::msg(msg))
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        // `current` is already counted: a new memory starts at 0.
        let total = self.memory_used.saturating_sub(current).saturating_add(desired);
        if total > self.memory {
            return self.refuse(format!(
                "the script tried to grow its memory to {} MiB in all, over its limit of {} MiB",
                total >> 20,
                self.memory >> 20
            ));
        }
        self.memory_used = total;
        Ok(true)
    }

    fn table_growing(&mut self, current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.table_used.saturating_sub(current).saturating_add(desired);
        if total > MAX_TABLE_ELEMENTS {
            return self.refuse(format!(
                "the script tried to grow its tables to {total} elements in all, over the limit of {MAX_TABLE_ELEMENTS}"
            ));
        }
        self.table_used = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        64
    }
    fn tables(&self) -> usize {
        64
    }
    fn memories(&self) -> usize {
        16
    }
}

/// Whether `dir` and every directory above it are safe to keep compiled
/// code in: nobody but us (or root) can put or rename anything there. A
/// directory others may write to is accepted only with the sticky bit (like
/// `/tmp`), and then what follows in the path must be ours.
fn cache_dir_is_safe(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let uid = rustix::process::geteuid().as_raw();
    let Ok(dir) = dir.canonicalize() else {
        // Not there yet: its parent decides (it is created 0700).
        return dir.parent().is_some_and(cache_dir_is_safe);
    };
    let mut why = None;
    for path in dir.ancestors() {
        let Ok(meta) = std::fs::metadata(path) else { return false };
        let owner_ok = meta.uid() == uid || meta.uid() == 0;
        let others_write = meta.mode() & 0o022 != 0;
        let sticky = meta.mode() & 0o1000 != 0;
        if !owner_ok || (others_write && (path == dir || !sticky)) {
            why =
                Some(format!("{} is owned by uid {} with mode {:o}", path.display(), meta.uid(), meta.mode() & 0o7777));
            break;
        }
    }
    match why {
        None => true,
        Some(why) => {
            log::warn!(
                target: "offsite::engine",
                "not using the compile cache {}: others could put code in it ({why}); scripts are compiled each run",
                dir.display()
            );
            false
        }
    }
}

/// The scripts this process has compiled for a cache (for the test of the
/// cache's lock).
#[cfg(test)]
static COMPILED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The longest a run waits for another run's compile of the same script.
const COMPILE_LOCK_WAIT: Duration = Duration::from_secs(60);

/// A hold on the compile of one cache entry (`NAME.lock` beside
/// `NAME.cwasm`), released when dropped. Taking it waits for a run that
/// holds it, which is compiling the same script for the same engine, for
/// at most [`COMPILE_LOCK_WAIT`].
struct CompileLock {
    file: std::fs::File,
    path: PathBuf,
}

impl Drop for CompileLock {
    /// Removes the lock file before letting go of it, so the cache holds
    /// only entries and their records. A run that arrives later finds the
    /// entry; one that was waiting checks for the entry again once it has
    /// the (removed) lock. At worst, when the entry could not be written,
    /// two runs compile the script at once, as without a lock.
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let ours = |m: &std::fs::Metadata| self.file.metadata().is_ok_and(|f| (f.dev(), f.ino()) == (m.dev(), m.ino()));
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| ours(&m)) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl CompileLock {
    /// `None` when the lock cannot be had within `wait` (the
    /// run then compiles without it: the entry is still written whole, only
    /// maybe twice).
    fn take(dir: &Path, entry: &Path, wait: Duration) -> Option<CompileLock> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).ok()?;
        let path = entry.with_extension("lock");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .ok()?;
        // Bounded: a run stuck while holding it (stopped, or compiling a
        // huge script) must not stall every later run; past the bound this
        // run compiles for itself, as without a lock.
        let deadline = Instant::now() + wait;
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Some(CompileLock { file, path }),
                Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(_) => return None,
            }
        }
    }
}

/// The first line of an entry's record (`NAME.sum` beside `NAME.cwasm`).
const RECORD_MAGIC: &str = "offsite-cwasm-2";

/// A cache entry opened and checked for loading.
struct CacheEntry {
    file: std::fs::File,
}

impl CacheEntry {
    /// Loads the checked file itself, whatever happens to its name
    /// meanwhile: wasmtime maps it through `/proc/self/fd` (no copy, and its
    /// memory images are mapped copy-on-write), or, without `/proc`, it is
    /// read from the descriptor.
    ///
    /// # Safety
    /// As [`Component::deserialize_file`]: the file must be compiled code
    /// this engine wrote.
    unsafe fn load(&self, engine: &Engine) -> Result<Component> {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()));
        if by_fd.exists() {
            return Ok(unsafe { Component::deserialize_file(engine, by_fd) }?);
        }
        let mut code = Vec::new();
        (&self.file).read_to_end(&mut code)?;
        Ok(unsafe { Component::deserialize(engine, &code) }?)
    }
}

/// An entry's record: what it was compiled from and which file it is.
#[derive(Debug, PartialEq)]
struct Record {
    script: String,
    code: String,
    size: u64,
    dev: u64,
    ino: u64,
}

impl Record {
    fn render(&self) -> String {
        format!(
            "{RECORD_MAGIC}\nscript {}\ncode {}\nsize {}\ndev {}\nino {}\n",
            self.script, self.code, self.size, self.dev, self.ino
        )
    }

    fn parse(text: &str) -> Option<Record> {
        let mut lines = text.lines();
        if lines.next()? != RECORD_MAGIC {
            return None;
        }
        let mut field = |name: &str| lines.next()?.strip_prefix(name)?.strip_prefix(' ').map(str::to_string);
        let (script, code) = (field("script")?, field("code")?);
        let (size, dev, ino) = (field("size")?.parse().ok()?, field("dev")?.parse().ok()?, field("ino")?.parse().ok()?);
        let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        (hex64(&script) && hex64(&code) && lines.next().is_none()).then_some(Record { script, code, size, dev, ino })
    }
}

/// Opens a file of the cache without following links, and checks what was
/// opened: a regular file of ours that only we can write.
fn open_ours(file: &Path) -> std::result::Result<Option<(std::fs::File, std::fs::Metadata)>, String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let meta = f.metadata().map_err(|e| e.to_string())?;
    let uid = rustix::process::geteuid().as_raw();
    if !meta.file_type().is_file() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err(format!("{} is not a regular file of ours that only we can write", file.display()));
    }
    Ok(Some((f, meta)))
}

/// The cache entry `file` when it is there and is ours for the script
/// `sha256`; `Err` says why an entry that is there was refused. `verify`
/// re-hashes the whole compiled code against the record.
fn open_cache_entry(file: &Path, sha256: &str, verify: bool) -> std::result::Result<Option<CacheEntry>, String> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let Some((code, meta)) = open_ours(file)? else { return Ok(None) };
    let Some((record, _)) = open_ours(&file.with_extension("sum"))? else {
        return Err("it has no record (an older runner's entry, or its writer was interrupted)".into());
    };
    let mut text = String::new();
    record.take(1024).read_to_string(&mut text).map_err(|e| e.to_string())?;
    let record = Record::parse(&text).ok_or("its record is not in this runner's format")?;
    if record.script != sha256 {
        return Err(format!("it holds the compiled code of script {}, not of {sha256}", record.script));
    }
    if (record.dev, record.ino, record.size) != (meta.dev(), meta.ino(), meta.len()) {
        return Err("its record describes another file (the entry was replaced by something else)".into());
    }
    if verify {
        let mut hash = Sha256::new();
        std::io::copy(&mut (&code).take(record.size), &mut hash).map_err(|e| e.to_string())?;
        if hex::encode(hash.finalize()) != record.code {
            return Err("its compiled code does not match its recorded checksum".into());
        }
    }
    Ok(Some(CacheEntry { file: code }))
}

/// Writes an entry and then its record, each whole (fsync, then rename).
fn write_cache_entry(dir: &Path, file: &Path, sha256: &str, code: &[u8]) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = write_whole(dir, file, code)?;
    let record = Record {
        script: sha256.to_string(),
        code: hex::encode(Sha256::digest(code)),
        size: meta.len(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    write_whole(dir, &file.with_extension("sum"), record.render().as_bytes())?;
    Ok(())
}

/// Writes `bytes` to a private temporary file in `dir`, syncs it and
/// renames it to `file`; returns the written file's metadata.
fn write_whole(dir: &Path, file: &Path, bytes: &[u8]) -> Result<std::fs::Metadata> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".tmp.{}.{}", std::process::id(), file.file_name().unwrap().to_string_lossy()));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    let result = f.write_all(bytes).and_then(|_| f.sync_all()).and_then(|_| f.metadata());
    let result = result.and_then(|meta| std::fs::rename(&tmp, file).map(|_| meta));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(result?)
}

/// The compile cache's size limit: `$OFFSITE_CACHE_MAX` (e.g. `2GiB`),
/// default 1 GiB.
pub fn cache_limit() -> u64 {
    const DEFAULT: u64 = 1 << 30;
    match std::env::var("OFFSITE_CACHE_MAX") {
        Ok(v) => crate::site::parse_size(&v).unwrap_or_else(|e| {
            log::warn!(target: "offsite::engine", "OFFSITE_CACHE_MAX={v:?}: {e}; using 1GiB");
            DEFAULT
        }),
        Err(_) => DEFAULT,
    }
}

/// Removes the least recently used entries of the compile cache `dir`
/// (each with its record) until it holds at most `limit` bytes; `keep`
/// (just written) stays. Records without an entry, and temporary files
/// and compile locks left over an hour ago, go too.
pub fn evict(dir: &Path, keep: &Path, limit: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let now = std::time::SystemTime::now();
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
    for e in entries.flatten() {
        let (path, name) = (e.path(), e.file_name());
        let Ok(m) = e.metadata() else { continue };
        let modified = m.modified().unwrap_or(std::time::UNIX_EPOCH);
        let stale = now.duration_since(modified).is_ok_and(|age| age > Duration::from_secs(3600));
        if !m.is_file() {
            continue;
        } else if path.extension().is_some_and(|x| x == "cwasm") {
            files.push((modified, m.len(), path));
        } else if (path.extension().is_some_and(|x| x == "sum") && !path.with_extension("cwasm").exists())
            || (name.as_encoded_bytes().starts_with(b".tmp.") && stale)
            || (path.extension().is_some_and(|x| x == "lock") && !path.with_extension("cwasm").exists() && stale)
        {
            let _ = std::fs::remove_file(&path);
        }
    }
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= limit {
            break;
        }
        if path == keep {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            let _ = std::fs::remove_file(path.with_extension("sum"));
            log::info!(target: "offsite::engine", "compile cache over {limit} bytes: evicted {}", path.display());
            total -= len;
        }
    }
}

/// Feeds a `Hash` implementation into SHA-256.
struct HashInto<'a>(&'a mut Sha256);

impl std::hash::Hasher for HashInto<'_> {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Where root's compiled scripts are kept (the units' `CacheDirectory=offsite`).
pub const ROOT_CACHE_DIR: &str = "/var/cache/offsite";

/// The default cache directory: `$OFFSITE_CACHE_DIR`, else
/// `/var/cache/offsite` for root (the directory the shipped units use, so
/// that `offsite check` as root warms the cache the timer's run reads),
/// else `$XDG_CACHE_HOME/offsite`, else `~/.cache/offsite`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("OFFSITE_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    if rustix::process::geteuid().is_root() {
        return Some(PathBuf::from(ROOT_CACHE_DIR));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("offsite"));
    }
    crate::home::home_dir().map(|h| h.join(".cache/offsite"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory limit holds for all of a store's memories together: two
    /// instances of a module, each growing to 60% of the limit, cannot both
    /// have it. Tables are summed the same way.
    #[test]
    fn the_memory_limit_bounds_the_sum_of_every_memory_and_table() {
        let engine = Engine::new(&config()).unwrap();
        let module = wasmtime::Module::new(
            &engine,
            offsite_testkit::wat(
                r#"(module
                     (memory 1)
                     (table 1 funcref)
                     (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
                     (func (export "grow_table") (param i32) (result i32) (table.grow (ref.null func) (local.get 0))))"#,
            ),
        )
        .unwrap();
        let mut store = Store::new(&engine, Limiter::new(10 << 20));
        store.limiter(|l| l);
        store.set_epoch_deadline(1 << 40);
        let a = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        let b = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        let grow = |store: &mut Store<Limiter>, i: &wasmtime::Instance, pages: i32| {
            i.get_typed_func::<i32, i32>(&mut *store, "grow").unwrap().call(&mut *store, pages)
        };
        // 6 MiB each: 96 pages beyond the first.
        assert_eq!(grow(&mut store, &a, 95).unwrap(), 1);
        assert!(grow(&mut store, &b, 95).is_err(), "12 MiB in all is over 10 MiB");
        assert!(store.data().hit.as_deref().unwrap().contains("over its limit of 10 MiB"));
        // What is left under the limit is still there for either.
        assert_eq!(grow(&mut store, &b, 50).unwrap(), 1);

        let grow_table = |store: &mut Store<Limiter>, i: &wasmtime::Instance, n: i32| {
            i.get_typed_func::<i32, i32>(&mut *store, "grow_table").unwrap().call(&mut *store, n)
        };
        assert_eq!(grow_table(&mut store, &a, 60_000).unwrap(), 1);
        assert!(grow_table(&mut store, &b, 60_000).is_err(), "120,000 elements in all");
    }

    /// Features no script needs are refused at compile time.
    #[test]
    fn modules_with_several_memories_or_64_bit_memory_do_not_compile() {
        let engine = Engine::new(&config()).unwrap();
        for text in ["(module (memory 1) (memory 1))", "(module (memory i64 1))"] {
            let err = wasmtime::Module::new(&engine, offsite_testkit::wat(text)).unwrap_err();
            assert!(format!("{err:#}").contains("memor"), "{text}: {err:#}");
        }
    }

    #[test]
    fn the_compile_cache_evicts_least_recently_used_entries_past_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let day = std::time::Duration::from_secs(86400);
        let now = std::time::SystemTime::now();
        for (name, age_days) in [("old", 3), ("used", 1), ("new", 0), ("mid", 2)] {
            let f = std::fs::File::create(dir.path().join(format!("{name}.cwasm"))).unwrap();
            f.set_len(100).unwrap();
            f.set_modified(now - day * age_days).unwrap();
            std::fs::write(dir.path().join(format!("{name}.sum")), "record").unwrap();
        }
        std::fs::write(dir.path().join("not-an-entry.txt"), [0u8; 1000]).unwrap();
        // Left by killed writers: one long ago, one maybe still writing.
        for (name, age_days) in [(".tmp.1.gone.cwasm", 1), (".tmp.2.busy.cwasm", 0)] {
            std::fs::File::create(dir.path().join(name)).unwrap().set_modified(now - day * age_days).unwrap();
        }
        std::fs::write(dir.path().join("orphan.sum"), "record").unwrap();
        // Compile locks: kept while their entry is there or they are new.
        for (name, age_days) in [("new.lock", 1), ("gone.lock", 1), ("compiling.lock", 0)] {
            std::fs::File::create(dir.path().join(name)).unwrap().set_modified(now - day * age_days).unwrap();
        }
        // The entry just written stays even when it is the oldest.
        evict(dir.path(), &dir.path().join("old.cwasm"), 250);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                ".tmp.2.busy.cwasm",
                "compiling.lock",
                "new.cwasm",
                "new.lock",
                "new.sum",
                "not-an-entry.txt",
                "old.cwasm",
                "old.sum"
            ]
        );
    }

    /// Runs that load one script at the same time compile it once: the
    /// others wait for the entry and load it.
    #[test]
    fn runs_that_load_a_script_together_compile_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        // Enough functions that the compile takes a while.
        let funcs: String = (0..3000).map(|i| format!("(func (export \"f{i}\") (result i32) i32.const {i})")).collect();
        let bytes = offsite_testkit::wat(&format!("(component (core module {funcs}))"));
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let start = std::sync::Barrier::new(3);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    let runtime = Runtime::new(Some(cache.clone())).unwrap();
                    start.wait();
                    runtime.compile_cached(&bytes, &sha256).unwrap();
                });
            }
        });
        let compiled = COMPILED.lock().unwrap().iter().filter(|s| **s == sha256).count();
        assert_eq!(compiled, 1, "three runs at once compiled the script {compiled} times");
        let runtime = Runtime::new(Some(cache.clone())).unwrap();
        assert!(runtime.is_compiled(&sha256).is_some());
        let mut left: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path().extension().unwrap().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["cwasm", "sum"], "the entry and its record, no lock left");
    }

    /// A run stuck holding the compile lock stalls others only up to the
    /// bound; then they compile for themselves.
    #[test]
    fn a_held_compile_lock_is_waited_for_only_up_to_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let entry = dir.path().join("x.cwasm");
        let held = CompileLock::take(dir.path(), &entry, Duration::ZERO).expect("a free lock");
        let started = Instant::now();
        assert!(CompileLock::take(dir.path(), &entry, Duration::from_millis(200)).is_none());
        assert!(started.elapsed() >= Duration::from_millis(200) && started.elapsed() < Duration::from_secs(5));
        drop(held);
        assert!(CompileLock::take(dir.path(), &entry, Duration::ZERO).is_some(), "free again");
    }

    #[test]
    fn an_entry_record_reads_back_and_nothing_else_passes_for_one() {
        let record = Record { script: "a".repeat(64), code: "b".repeat(64), size: 7, dev: 2049, ino: 12 };
        assert_eq!(Record::parse(&record.render()), Some(record));
        let good = Record { script: "a".repeat(64), code: "b".repeat(64), size: 7, dev: 1, ino: 2 }.render();
        for bad in [
            good.replace(RECORD_MAGIC, "offsite-cwasm-1"),
            good.replace("size 7", "size -7"),
            good.replace(&"a".repeat(64), "a"),
            format!("{good}extra 1\n"),
            good.replace("dev 1\n", ""),
            String::new(),
        ] {
            assert_eq!(Record::parse(&bad), None, "{bad}");
        }
    }
}
