//! Test harness for Offsite's end-to-end scenarios.
//!
//! It builds the guest scripts (once per test process; cargo serialises
//! concurrent builds), gives every test its own scratch directory, and runs
//! the real `offsite` binary with a compile cache shared by all tests so a
//! script is compiled by wasmtime only once per test run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Path of the built component for script crate `name` (in `scripts/`),
/// building the scripts workspace first if this process has not yet.
pub fn script(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let out = BUILT.get_or_init(|| {
        let dir = repo_root().join("scripts");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--quiet"])
            // .cargo/config.toml (the wasm32-wasip2 target) is found from the cwd.
            .current_dir(&dir)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .status()
            .expect("run cargo to build scripts/");
        assert!(status.success(), "building scripts/ for wasm32-wasip2 failed");
        dir.join("target/wasm32-wasip2/release")
    });
    // Cargo names a cdylib after the crate with `-` turned into `_`.
    let path = out.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The component of the Python script project `scripts/NAME`, built with
/// `offsite build` (the binary at `bin`) against the SDK in
/// `guest-sdk/python`, once per checkout: see [`guest_build`].
pub fn python_script(bin: &Path, name: &str) -> PathBuf {
    // One build of a project at a time, in this test process or another.
    let _one_at_a_time = shared::turn(&format!("guest-{name}"));
    let root = repo_root();
    let dir = root.join("scripts").join(name);
    let sdk = root.join("guest-sdk/python");
    let mut sources = vec![dir.join("app.py"), sdk.join("pyproject.toml")];
    sources.extend(files_under(&sdk.join("offsite_sdk")));
    let tools = [tool_version("componentize-py", &["--version"])];
    guest_build(name, &sources, &tools, || {
        let status = Command::new(bin)
            .arg("build")
            .arg(&dir)
            .env("OFFSITE_PYTHON_SDK", &sdk)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run offsite build");
        assert!(status.success(), "offsite build {} failed (pip install componentize-py==0.25.1?)", dir.display());
        dir.join(format!("{name}.wasm"))
    })
}

/// The component of the JavaScript script project `scripts/NAME`, built
/// with `offsite build` against the SDK in `guest-sdk/js` (whose npm
/// dependencies, and the project's link to it, are installed first when
/// missing), once per checkout: see [`guest_build`].
pub fn js_script(bin: &Path, name: &str) -> PathBuf {
    // One build of a project at a time, in this test process or another.
    let _one_at_a_time = shared::turn(&format!("guest-{name}"));
    let root = repo_root();
    let dir = root.join("scripts").join(name);
    let sdk = root.join("guest-sdk/js");
    // package-lock.json pins esbuild and componentize-js.
    let mut sources = vec![
        dir.join("app.js"),
        dir.join("package.json"),
        sdk.join("index.js"),
        sdk.join("build.mjs"),
        sdk.join("package.json"),
        sdk.join("package-lock.json"),
    ];
    sources.extend(files_under(&sdk.join("lib")));
    sources.extend(files_under(&sdk.join("wit")));
    let tools = [tool_version("node", &["--version"])];
    let npm_install = |at: &Path| {
        // npm writes node_modules/.package-lock.json when an install is
        // complete: a half-done one (another test's, or a killed one) is
        // not taken for done.
        if at.join("node_modules/.package-lock.json").is_file() {
            return;
        }
        // Exactly the locked versions where there is a lock (the SDK).
        let verb = if at.join("package-lock.json").is_file() { "ci" } else { "install" };
        let ok = Command::new("npm")
            .args([verb, "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(at)
            .status()
            .expect("npm (install Node.js)")
            .success();
        assert!(ok, "npm install in {} failed", at.display());
    };
    // The SDK's own install also fills npm's cache, which other tests use;
    // every JavaScript project's build waits for it.
    {
        let _sdk_install = shared::turn("npm-guest-sdk-js");
        npm_install(&sdk);
    }
    guest_build(name, &sources, &tools, || {
        npm_install(&dir);
        let status = Command::new(bin)
            .arg("build")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run offsite build");
        assert!(status.success(), "offsite build {} failed", dir.display());
        dir.join(format!("{name}.wasm"))
    })
}

/// A guest component built once per checkout: the build's result is kept
/// in `target/offsite-guests/NAME-KEY.wasm`, where KEY hashes the
/// contents of every source the build reads (the project, the SDK, the
/// WIT, and `offsite build`'s own recipe in `runner/src/build.rs`) and the
/// versions of the tools it runs. A later test, or a later `cargo test`,
/// with the same key reuses the file and builds nothing; any change to a
/// source or a tool makes a new key. (Rust guests are built by cargo,
/// whose fingerprints already key on sources and the compiler.)
fn guest_build(name: &str, sources: &[PathBuf], tools: &[String], build: impl FnOnce() -> PathBuf) -> PathBuf {
    use sha2::{Digest, Sha256};
    let root = repo_root();
    let mut hash = Sha256::new();
    let mut add = |label: &str, bytes: &[u8]| {
        hash.update((label.len() as u64).to_le_bytes());
        hash.update(label.as_bytes());
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    add("name", name.as_bytes());
    let mut sources = sources.to_vec();
    sources.push(root.join("wit/offsite.wit"));
    sources.push(root.join("runner/src/build.rs"));
    sources.sort();
    for source in &sources {
        let bytes = std::fs::read(source).unwrap_or_else(|e| panic!("read {}: {e}", source.display()));
        add(&source.strip_prefix(&root).unwrap_or(source).to_string_lossy(), &bytes);
    }
    for tool in tools {
        add("tool", tool.as_bytes());
    }
    let key: String = hash.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
    let kept_dir = root.join("target/offsite-guests");
    let kept = kept_dir.join(format!("{name}-{key}.wasm"));
    if kept.is_file() {
        return kept;
    }
    let built = build();
    std::fs::create_dir_all(&kept_dir).expect("create target/offsite-guests");
    // Copied under a temporary name and renamed: another test process
    // never sees half a component.
    let partial = kept_dir.join(format!(".{name}-{key}.{}.partial", std::process::id()));
    std::fs::copy(&built, &partial).unwrap_or_else(|e| panic!("keep {}: {e}", built.display()));
    std::fs::rename(&partial, &kept).expect("rename the kept component");
    kept
}

/// The regular files under `dir`, skipping caches (`__pycache__`).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    tree(dir)
        .into_iter()
        .map(|relative| dir.join(relative))
        .filter(|p| p.is_file() && !p.components().any(|c| c.as_os_str() == "__pycache__"))
        .collect()
}

/// What `tool ARGS` prints, as part of a build's key (or a note that it
/// is missing, so that installing it later makes a new key).
fn tool_version(tool: &str, args: &[&str]) -> String {
    match Command::new(tool).args(args).output() {
        Ok(out) => format!("{tool}: {}", String::from_utf8_lossy(&out.stdout).trim()),
        Err(_) => format!("{tool}: missing"),
    }
}

/// Runs the Rust `arc` and `other` (the same script in another language)
/// on the same tree (files, a subdirectory, a symlink) with the same
/// `--now`, and asserts both stored the same file name with the same
/// members (as GNU tar lists them) and the same tar stream.
pub fn assert_same_archive_as_rust_arc(bin: &Path, other: &Path) {
    let tree = tempfile::tempdir().unwrap();
    let src = tree.path().join("beoserver");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("bookl.dat"), "ledger\n".repeat(100)).unwrap();
    std::fs::write(src.join("sub/notes.txt"), "notes").unwrap();
    std::os::unix::fs::symlink("bookl.dat", src.join("link")).unwrap();
    let mut outputs = Vec::new();
    for wasm in [script("arc"), other.to_path_buf()] {
        let dir = tempfile::tempdir().unwrap();
        let copied = Command::new("cp").arg("-a").arg(&src).arg(dir.path().join("beoserver")).status().unwrap();
        assert!(copied.success());
        let mut cmd = offsite(bin);
        cmd.current_dir(dir.path()).arg("run").arg(&wasm).args([
            "--param",
            "path=beoserver",
            "--now",
            "2004-03-21T01:48:44",
        ]);
        Ran::from_output(cmd.output().unwrap()).expect_code(0);
        let archive = dir.path().join("beoserver.20040321-014844.tgz");
        let listing = Command::new("tar").arg("-tvzf").arg(&archive).output().unwrap();
        assert!(listing.status.success(), "{} stored no {}", wasm.display(), archive.display());
        outputs.push((String::from_utf8(listing.stdout).unwrap(), gunzip(&archive)));
    }
    assert_eq!(outputs[0].0, outputs[1].0, "member names, modes, owners and times");
    assert_eq!(outputs[0].1, outputs[1].1, "the tar streams are identical");
}

/// A site for the hostile scripts of every language: reads `data/`,
/// stores in `store/`, with `[limits]` lines as given; `case(NAME)` runs
/// `wasm` with `--param case=NAME`.
pub struct HostileSite {
    dir: tempfile::TempDir,
    bin: PathBuf,
    wasm: PathBuf,
}

impl HostileSite {
    pub fn new(bin: &Path, wasm: &Path) -> HostileSite {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let site = HostileSite { dir, bin: bin.to_path_buf(), wasm: wasm.to_path_buf() };
        site.limits("");
        site
    }

    pub fn limits(&self, limits: &str) {
        let text =
            format!("store = \"{}\"\n[read]\nroots = [\"data\"]\n{limits}", self.dir.path().join("store").display());
        std::fs::write(self.dir.path().join("site.toml"), text).unwrap();
    }

    pub fn case(&self, case: &str) -> Ran {
        let mut cmd = offsite(&self.bin);
        cmd.arg("run").arg(&self.wasm).arg("--site").arg(self.dir.path().join("site.toml"));
        cmd.args(["--param", &format!("case={case}")]);
        Ran::from_output(cmd.output().unwrap())
    }
}

/// The same component with a custom section appended: as valid, with
/// another SHA-256 (a rebuild that changed something).
pub fn rebuilt(bytes: &[u8], tag: &str) -> Vec<u8> {
    let name = b"offsite-test";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    assert!(payload.len() < 128, "one-byte LEB128 length");
    let mut out = bytes.to_vec();
    out.push(0); // custom section
    out.push(payload.len() as u8);
    out.extend_from_slice(&payload);
    out
}

/// Compiles WebAssembly text to binary, for hand-made bad modules.
pub fn wat(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("valid WAT")
}

/// A compile cache shared by every test of this run.
pub fn shared_cache_dir() -> PathBuf {
    repo_root().join("target/offsite-test-cache")
}

/// `offsite` at `bin`, with the shared compile cache and a clean
/// environment for what the runner reads.
pub fn offsite(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env("OFFSITE_CACHE_DIR", shared_cache_dir()).env_remove("RUST_LOG").env("TZ", "UTC");
    cmd
}

/// `cmd` (its program, arguments, environment and directory) run under a
/// small python3 that writes the peak resident memory of what it ran, in
/// KiB, to `peak_file`. A child forked straight from the test process
/// would report the test process's memory at the fork as its own peak
/// (Linux keeps `ru_maxrss` across exec), which in one test binary with
/// many tests running is anything.
pub fn with_peak_memory(cmd: &Command, peak_file: &Path) -> Command {
    const MEASURE: &str = "import resource, subprocess, sys\n\
        code = subprocess.run(sys.argv[2:]).returncode\n\
        open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n\
        sys.exit(code if code >= 0 else 128 - code)\n";
    let mut wrapped = Command::new("python3");
    wrapped.arg("-c").arg(MEASURE).arg(peak_file).arg(cmd.get_program()).args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

/// The peak written by a [`with_peak_memory`] command, in MiB.
pub fn peak_memory_mib(peak_file: &Path) -> u64 {
    let text = std::fs::read_to_string(peak_file).unwrap_or_else(|e| panic!("read {}: {e}", peak_file.display()));
    text.trim().parse::<u64>().unwrap_or_else(|e| panic!("peak {text:?}: {e}")) / 1024
}

/// The result of one run, with helpers for assertions.
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn from_output(out: Output) -> Ran {
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics with both streams unless the exit code is `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Ran {
        assert_eq!(self.code, code, "exit code\n--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr);
        self
    }

    #[track_caller]
    pub fn expect_stderr(&self, needle: &str) -> &Ran {
        assert!(self.stderr.contains(needle), "stderr lacks {needle:?}:\n{}", self.stderr);
        self
    }

    #[track_caller]
    pub fn expect_stdout(&self, needle: &str) -> &Ran {
        assert!(self.stdout.contains(needle), "stdout lacks {needle:?}:\n{}", self.stdout);
        self
    }
}

/// Every file and directory below `dir`, relative, sorted, leaving out
/// the store's own `.offsite` directory (manifests, lock, and the files of
/// runs that did not succeed): what a user sees as backups.
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if dir == base && entry.file_name() == ".offsite" {
                continue;
            }
            out.push(path.strip_prefix(base).unwrap().to_path_buf());
            if entry.file_type().unwrap().is_dir() {
                walk(base, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Asserts that two trees have the same entries, file bytes, modes and
/// symlink targets.
#[track_caller]
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let (a, b) = (tree(expected), tree(actual));
    assert_eq!(a, b, "entries differ");
    for rel in &a {
        let (x, y) = (expected.join(rel), actual.join(rel));
        let (mx, my) = (std::fs::symlink_metadata(&x).unwrap(), std::fs::symlink_metadata(&y).unwrap());
        assert_eq!(mx.file_type().is_symlink(), my.file_type().is_symlink(), "{}", rel.display());
        if mx.file_type().is_symlink() {
            assert_eq!(std::fs::read_link(&x).unwrap(), std::fs::read_link(&y).unwrap(), "{}", rel.display());
            continue;
        }
        assert_eq!(mx.permissions().mode() & 0o7777, my.permissions().mode() & 0o7777, "mode of {}", rel.display());
        if mx.is_file() {
            assert!(std::fs::read(&x).unwrap() == std::fs::read(&y).unwrap(), "contents of {} differ", rel.display());
        }
    }
}

/// The whole of a gzip file, decompressed by GNU gzip (so GNU gzip is
/// what reads our output).
#[track_caller]
pub fn gunzip(path: &Path) -> Vec<u8> {
    let out = Command::new("gzip").arg("-dc").arg(path).output().unwrap();
    assert!(out.status.success(), "gzip -dc {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// `offsite run` of the built script `name` with `site`, as cron would run
/// it: HOME is the site file's directory and no ssh-agent is reachable.
/// The clock is the article's (`--now 2004-03-21T01:48:44`), so file names
/// are known.
pub fn run_script(bin: &Path, name: &str, site: &Path) -> Ran {
    let mut cmd = offsite(bin);
    cmd.arg("run").arg(script(name)).arg("--site").arg(site).args(["--now", "2004-03-21T01:48:44"]);
    cmd.env("HOME", site.parent().expect("a site file in a directory")).env_remove("SSH_AUTH_SOCK");
    Ran::from_output(cmd.output().unwrap())
}

pub(crate) fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Makes the manifest of directory store `store` that lists `file` (a
/// file of the store) say another SHA-256 for it, as a tampered or damaged
/// manifest would: the file itself stays as it is.
pub fn claim_another_hash(store: &Path, file: &Path) {
    let out = Command::new("sha256sum").arg(file).output().unwrap();
    let real = String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string();
    let manifests = store.join(".offsite/manifests");
    let mut changed = 0;
    for entry in std::fs::read_dir(&manifests).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if path.extension().is_some_and(|x| x == "json") && text.contains(&real) {
            std::fs::write(&path, text.replace(&real, &"0".repeat(64))).unwrap();
            changed += 1;
        }
    }
    assert!(changed > 0, "no manifest in {} lists {}", manifests.display(), file.display());
}

/// A new passphrase-less ed25519 key `dir/name` (comment `name`): its
/// path and its public line (`ssh-ed25519 AAAA... name`).
pub fn ssh_keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen")
        .success();
    assert!(ok, "ssh-keygen failed for {}", key.display());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public.trim().to_string())
}

/// A new age identity file `dir/age.txt`: its path and its recipient
/// (`age1...`), made with age-keygen.
pub fn age_keypair(dir: &Path) -> (PathBuf, String) {
    let identity = dir.join("age.txt");
    assert!(Command::new("age-keygen").arg("-o").arg(&identity).output().expect("age-keygen").status.success());
    let recipient = Command::new("age-keygen").arg("-y").arg(&identity).output().expect("age-keygen -y").stdout;
    (identity, String::from_utf8(recipient).unwrap().trim().to_string())
}

pub mod mariadb;
pub mod postgres;
pub mod registry;
pub mod seaweed;
pub mod shared;
pub mod sshd;
pub mod wan;

pub use tempfile;
