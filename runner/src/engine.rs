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

impl Runtime {
    /// Builds the engine, the linker with every capability, and the epoch
    /// ticker. `cache` is the compiled-component cache directory, if any.
    pub fn new(cache: Option<PathBuf>) -> Result<Runtime> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.max_wasm_stack(1 << 20);
        let engine = Engine::new(&config)?;
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
        Ok(Runtime { engine, linker, cache, stop_ticker })
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

    /// The cache entry file for the script `sha256` under this engine.
    fn cache_file(&self, dir: &Path, sha256: &str) -> PathBuf {
        let mut key = Sha256::new();
        key.update(sha256.as_bytes());
        self.engine.precompile_compatibility_hash().hash(&mut HashInto(&mut key));
        dir.join(format!("{}.cwasm", hex::encode(&key.finalize()[..16])))
    }

    /// Whether a compiled copy of the script `sha256` is in the cache
    /// (`inspect` says so; the first run of a big script pays its compile).
    pub fn is_compiled(&self, sha256: &str) -> Option<PathBuf> {
        let dir = self.cache.as_deref()?;
        let file = self.cache_file(dir, sha256);
        std::fs::symlink_metadata(&file).is_ok_and(|m| m.is_file()).then_some(file)
    }

    fn compile_cached(&self, bytes: &[u8], sha256: &str) -> Result<Component> {
        let Some(dir) = self.cache.as_deref().filter(|d| cache_dir_is_safe(d)) else {
            return Ok(Component::new(&self.engine, bytes)?);
        };
        let file = self.cache_file(dir, sha256);
        match read_cache_entry(&file, sha256) {
            // SAFETY: the payload is one this runner wrote for exactly this
            // script: the entry is a regular file owned by us and writable
            // by nobody else, in a directory chain nobody else can rename
            // into, and it names the script's SHA-256 and its own payload's
            // SHA-256, both checked before this call. Its name binds it to
            // this engine's compatibility hash.
            Ok(Some(payload)) => match unsafe { Component::deserialize(&self.engine, &payload) } {
                Ok(c) => {
                    // Used now: eviction goes by least recent use.
                    let _ = std::fs::File::options()
                        .write(true)
                        .open(&file)
                        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                    return Ok(c);
                }
                Err(e) => log::debug!(target: "offsite::engine", "ignoring cache entry {}: {e:#}", file.display()),
            },
            Ok(None) => {}
            Err(why) => log::info!(target: "offsite::engine", "ignoring cache entry {}: {why}", file.display()),
        }
        let compiled = self.engine.precompile_component(bytes)?;
        if let Err(e) = write_cache_file(dir, &file, sha256, &compiled) {
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
            limiter: Limiter { memory: limits.memory as usize, hit: None },
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
/// trap.
struct Limiter {
    memory: usize,
    hit: Option<String>,
}

const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory {
            let msg = format!(
                "the script tried to grow its memory to {} MiB, over its limit of {} MiB",
                desired >> 20,
                self.memory >> 20
            );
            self.hit = Some(msg.clone());
            return Err(wasmtime::Error::msg(msg));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            let msg = format!(
                "the script tried to grow a table to {desired} elements, over the limit of {MAX_TABLE_ELEMENTS}"
            );
            self.hit = Some(msg.clone());
            return Err(wasmtime::Error::msg(msg));
        }
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

/// What starts every compile-cache entry, before the script's SHA-256 and
/// the payload's SHA-256 (32 bytes each) and the payload.
const CACHE_MAGIC: &[u8; 16] = b"offsite-cwasm-1\n";

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

/// A cache entry's payload, when the entry is there and is ours for the
/// script `sha256`; `Err` says why an entry that is there was refused.
fn read_cache_entry(file: &Path, sha256: &str) -> std::result::Result<Option<Vec<u8>>, String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut f =
        match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
    // Checked on what was opened, not on the name.
    let meta = f.metadata().map_err(|e| e.to_string())?;
    let uid = rustix::process::geteuid().as_raw();
    if !meta.file_type().is_file() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err("not a regular file of ours that only we can write".into());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    let header = CACHE_MAGIC.len() + 64;
    if bytes.len() < header || &bytes[..CACHE_MAGIC.len()] != CACHE_MAGIC {
        return Err("not an entry of this runner's format".into());
    }
    let script = &bytes[CACHE_MAGIC.len()..CACHE_MAGIC.len() + 32];
    if hex::encode(script) != sha256 {
        return Err(format!("it holds the compiled code of script {}, not of {sha256}", hex::encode(script)));
    }
    let payload_sha = &bytes[CACHE_MAGIC.len() + 32..header];
    if Sha256::digest(&bytes[header..]).as_slice() != payload_sha {
        return Err("its compiled code does not match its checksum".into());
    }
    bytes.drain(..header);
    Ok(Some(bytes))
}

fn write_cache_file(dir: &Path, file: &Path, sha256: &str, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let tmp = dir.join(format!(".tmp.{}.{}", std::process::id(), file.file_name().unwrap().to_string_lossy()));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    let script = hex::decode(sha256)?;
    let result = f
        .write_all(CACHE_MAGIC)
        .and_then(|_| f.write_all(&script))
        .and_then(|_| f.write_all(&Sha256::digest(bytes)))
        .and_then(|_| f.write_all(bytes))
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, file));
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
/// until it holds at most `limit` bytes; `keep` (just written) stays.
pub fn evict(dir: &Path, keep: &Path, limit: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            m.is_file().then(|| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len(), e.path()))
        })
        .collect();
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

/// The default cache directory: `$OFFSITE_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/offsite`, else `~/.cache/offsite`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("OFFSITE_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("offsite"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/offsite"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compile_cache_evicts_least_recently_used_entries_past_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let day = std::time::Duration::from_secs(86400);
        let now = std::time::SystemTime::now();
        for (name, age_days) in [("old.cwasm", 3), ("used.cwasm", 1), ("new.cwasm", 0), ("mid.cwasm", 2)] {
            let f = std::fs::File::create(dir.path().join(name)).unwrap();
            f.set_len(100).unwrap();
            f.set_modified(now - day * age_days).unwrap();
        }
        std::fs::write(dir.path().join("not-an-entry.txt"), [0u8; 1000]).unwrap();
        // The entry just written stays even when it is the oldest.
        evict(dir.path(), &dir.path().join("old.cwasm"), 250);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["new.cwasm", "not-an-entry.txt", "old.cwasm"]);
    }
}
