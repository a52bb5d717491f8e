//! The hostile-script suite: every case runs the `hostile` script with one
//! attack against a fresh site and a real sshd, and checks
//! - the exit code and the error it must produce;
//! - that the site's secret appears nowhere in the output or audit log;
//! - that nothing outside the store changed: the site's directories
//!   (including an `outside` directory next to the read root) and the
//!   server's files are snapshotted before and after.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use offsite_testkit::sshd::Sshd;
use offsite_testkit::{Ran, offsite, script};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");
const SECRET: &str = "T0ken-Value-77";

struct Env {
    dir: tempfile::TempDir,
    /// Outside the snapshot: the audit log.
    logs: tempfile::TempDir,
    server: Option<Sshd>,
}

impl Env {
    fn new(remote: bool) -> Env {
        let env = Env {
            dir: tempfile::tempdir().unwrap(),
            logs: tempfile::tempdir().unwrap(),
            server: remote.then(|| Sshd::start("127.0.0.2")),
        };
        let d = env.dir.path();
        for sub in ["base/root/www", "base/outside", "store", "home"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(d.join("base/root/www/index.html"), "hello").unwrap();
        std::fs::write(d.join("base/outside/secret.txt"), "not yours").unwrap();
        std::os::unix::fs::symlink("../outside", d.join("base/root/escape")).unwrap();
        std::os::unix::fs::symlink("../base/outside", d.join("store/planted")).unwrap();
        std::fs::write(d.join("home/token"), format!("{SECRET}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join("home/token"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(d.join("ssh_config"), "").unwrap();
        let mut site = String::from(
            "name = \"hostile\"\nstore = \"../store\"\nssh_config = \"../ssh_config\"\n\n[read]\nroots = [\"root\"]\n\n\
             [limits]\ndeadline = \"3s\"\nmemory = \"64MiB\"\n\n[secrets]\ntoken = { file = \"../home/token\", stdin = \"value={secret}\\n\", programs = [\"sh\"] }\n",
        );
        if let Some(server) = &env.server {
            let files = server.files();
            std::fs::write(files.join("a.tgz"), "archive").unwrap();
            std::os::unix::fs::symlink("/etc/passwd", files.join("escape.tgz")).unwrap();
            let grants = format!(
                "commands = [[\"echo\", \"**\"], [\"sh\", \"-c\", \"**\"], [\"echo\", \"*...\"]]\nfetch = [\"{}/*.tgz\"]",
                files.display()
            );
            site.push('\n');
            site.push_str(&server.host_section("server1", &grants));
        }
        // In `base`, the directory the script's relative sources mean.
        std::fs::write(d.join("base/site.toml"), site).unwrap();
        env
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `offsite run hostile.wasm --site base/site.toml`, started in `base`.
    fn run(&self) -> std::process::Command {
        let mut cmd = offsite(Path::new(BIN));
        cmd.current_dir(self.path("base"))
            .arg("run")
            .arg(script("hostile"))
            .arg("--site")
            .arg(self.path("base/site.toml"));
        cmd
    }

    fn files(&self) -> PathBuf {
        self.server.as_ref().expect("a remote case").files()
    }

    /// Everything outside the store: the site's tree and the server's files.
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        walk(self.dir.path(), &self.path("store"), &mut out);
        if let Some(server) = &self.server {
            walk(&server.files(), Path::new("/nonexistent"), &mut out);
        }
        out
    }
}

fn walk(dir: &Path, skip: &Path, out: &mut BTreeMap<PathBuf, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path == skip {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let what = if meta.file_type().is_symlink() {
            format!("link {}", std::fs::read_link(&path).unwrap().display())
        } else if meta.is_dir() {
            walk(&path, skip, out);
            "dir".to_string()
        } else {
            let data = std::fs::read(&path).unwrap();
            format!("file of {} bytes: {:.60}", data.len(), String::from_utf8_lossy(&data))
        };
        out.insert(path, what);
    }
}

/// Runs one case and checks everything the suite promises.
fn case(name: &str, remote: bool, arg: impl Fn(&Env) -> String, code: i32, needles: &[&str]) {
    let env = Env::new(remote);
    let before = env.snapshot();
    let audit = env.logs.path().join("audit.jsonl");
    let mut cmd = env.run();
    cmd.arg("--audit").arg(&audit).arg("--json");
    cmd.args(["--param", &format!("case={name}")]).arg("--param").arg(format!("arg={}", arg(&env)));
    cmd.env("HOME", env.path("home")).env_remove("SSH_AUTH_SOCK");
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(code);
    for needle in needles {
        assert!(ran.stderr.contains(needle), "case {name}: expected {needle:?} in stderr:\n{}", ran.stderr);
    }
    let audit_text = std::fs::read_to_string(&audit).unwrap_or_default();
    for (what, text) in [("stdout", &ran.stdout), ("stderr", &ran.stderr), ("audit log", &audit_text)] {
        // Not the value, and no piece of it that a cut could have left.
        for len in 5..=SECRET.len() {
            for part in [&SECRET[..len], &SECRET[SECRET.len() - len..]] {
                assert!(!text.contains(part), "case {name}: {part:?} of the secret leaked into the {what}:\n{text}");
            }
        }
    }
    let after = env.snapshot();
    assert_eq!(before, after, "case {name}: something outside the store changed");
    // The store holds no leftover temporary file.
    let mut stored = BTreeMap::new();
    walk(&env.path("store"), Path::new("/nonexistent"), &mut stored);
    assert!(
        stored.keys().all(|p| !p.to_string_lossy().contains(".offsite-tmp")),
        "case {name}: temporary files left: {stored:?}"
    );
}

fn none(_: &Env) -> String {
    String::new()
}

macro_rules! hostile {
    ($($name:ident: $remote:expr, $arg:expr => $code:expr, [$($needle:expr),*];)*) => {
        $(
            #[test]
            fn $name() {
                case(&stringify!($name).replace('_', "-"), $remote, $arg, $code, &[$($needle),*]);
            }
        )*
    };
}

hostile! {
    // The sandbox.
    spin: false, none => 3, ["deadline"];
    spin_between_host_calls: false, none => 3, ["deadline"];
    hoard_memory: false, none => 3, ["memory"];
    recurse: false, none => 3, ["stack"];
    huge_param_name: false, none => 1, ["denied", "not declared"];
    huge_argv: true, none => 1, ["invalid argument", "at most 4096 arguments"];
    huge_source_list: false, none => 1, ["denied", "outside the read roots"];
    secret_handle_flood: false, none => 1, ["limit exceeded", "secret handles"];
    wasi_read_file: false, |e: &Env| e.path("base/outside/secret.txt").display().to_string() => 1, ["reading", "secret.txt"];
    wasi_write_file: false, |e: &Env| e.path("base/outside/pwned").display().to_string() => 1, ["writing"];
    wasi_env: false, none => 1, ["environment: empty"];
    wasi_connect: true, |e: &Env| e.server.as_ref().unwrap().addr.to_string() => 1, ["connecting to"];
    // The policy.
    host_not_granted: true, none => 1, ["denied", "\"server9\" is not granted"];
    program_not_granted: true, none => 1, ["denied", "program \"cat\" is not granted"];
    argument_not_granted: true, none => 1, ["denied", "match no granted pattern"];
    metacharacters_arrive_literally: true, |e: &Env| e.files().join("marker").display().to_string() => 0, [];
    nul_in_argv: true, none => 1, ["invalid argument", "NUL"];
    fetch_dotdot: true, |e: &Env| e.files().display().to_string() => 1, ["denied", "`..`"];
    fetch_absolute_outside: true, none => 1, ["denied", "\"/etc/passwd\" is not granted"];
    fetch_remote_symlink: true, |e: &Env| e.files().display().to_string() => 1, ["denied", "resolves on the server to \"/etc/passwd\""];
    store_dotdot: false, none => 1, ["denied", "`..`"];
    store_absolute: false, |e: &Env| e.path("base/outside").display().to_string() => 1, ["denied", "is absolute"];
    store_nul: false, none => 1, ["invalid argument", "NUL"];
    store_planted_symlink: false, none => 1, ["planted/pwned.tgz"];
    store_reserved_name: false, none => 1, ["denied", "reserved prefix"];
    store_forge_manifest: false, none => 1, ["denied", "the runner's own directory"];
    store_deep_path: false, none => 1, ["invalid argument", "at most 32 are allowed"];
    store_long_name: false, none => 0, [];
    read_dotdot: false, none => 1, ["denied", "`..`"];
    read_absolute_outside: false, |e: &Env| e.path("base/outside").display().to_string() => 1, ["denied", "outside the read roots"];
    read_through_symlink: false, none => 1, ["denied", "outside the read roots"];
    undeclared_param: false, none => 1, ["denied", "not declared"];
    connection_flood: true, none => 0, [];
    // Secrets.
    secret_undeclared: false, none => 1, ["denied", "\"root-password\" is not declared"];
    secret_echoed_by_failing_command: true, none => 1, ["exit status 3", "value=***", "not shown to the script"];
    secret_stored_then_script_fails: true, none => 1, ["failing on purpose after storing token"];
    secret_script_chosen_template: true, none => 1, ["denied", "the site decides what is sent"];
    secret_to_another_program: true, none => 1, ["denied", "may be sent only to \"sh\", not to \"echo\""];
    secret_truncation_walk: true, none => 1, ["collected: ", "value=***"];
    secret_param_read: false, none => 1, ["denied", "declared secret"];
    secret_name_where_value_expected: true, none => 1, ["the command saw \"token\""];
}

#[test]
fn forty_calls_to_one_host_share_one_connection() {
    let env = Env::new(true);
    let mut cmd = env.run();
    cmd.args(["--param", "case=connection-flood"]).env("HOME", env.path("home"));
    Ran::from_output(cmd.output().unwrap()).expect_code(0);
    let log = env.server.as_ref().unwrap().log();
    assert_eq!(log.matches("Accepted publickey").count(), 1, "{log}");
}

/// The runner's bound on a script's log lines in one run.
const MAX_SCRIPT_LINES: usize = 1000;

/// Runs a flooding case; returns what it printed, the audit file's size and
/// the sizes of the manifests it left.
fn flood(name: &str) -> (Ran, u64, Vec<u64>) {
    let env = Env::new(false);
    let audit = env.logs.path().join("audit.jsonl");
    let mut cmd = env.run();
    cmd.arg("--audit").arg(&audit).args(["--param", &format!("case={name}")]);
    cmd.env("HOME", env.path("home"));
    let ran = Ran::from_output(cmd.output().unwrap());
    let audit_size = std::fs::metadata(&audit).map(|m| m.len()).unwrap_or(0);
    let manifests = std::fs::read_dir(env.path("store/.offsite/manifests"))
        .map(|d| d.map(|e| e.unwrap().metadata().unwrap().len()).collect())
        .unwrap_or_default();
    (ran, audit_size, manifests)
}

#[test]
fn a_log_flood_is_bounded_in_the_log_and_the_audit_file() {
    let (ran, audit, _) = flood("log-flood");
    ran.expect_code(0);
    let lines = ran.stderr.lines().count();
    assert!(lines <= MAX_SCRIPT_LINES + 20, "{lines} lines on stderr");
    assert!(ran.stderr.contains("logged more than 1000 lines"), "{}", &ran.stderr[ran.stderr.len() - 500..]);
    assert!(audit < 1 << 20, "the audit file grew to {audit} bytes from log and clock calls");
    assert!(!ran.stderr.contains('\x1b') && !ran.stderr.contains('\r'), "control characters reached stderr");
}

#[test]
fn huge_messages_are_cut_before_the_log_and_the_manifest() {
    let (ran, _, manifests) = flood("huge-log");
    ran.expect_code(0);
    assert!(ran.stderr.len() < 200 << 10, "stderr has {} bytes", ran.stderr.len());
    assert_eq!(manifests.len(), 1, "{manifests:?}");
    let size = manifests[0];
    assert!(size < 128 << 10, "the manifest has {size} bytes");
}

#[test]
fn script_text_cannot_forge_log_lines_or_drive_the_terminal() {
    let (ran, _, _) = flood("forge-log-line");
    ran.expect_code(0);
    for line in ran.stderr.lines() {
        assert!(line.starts_with("hostile: "), "a line not attributed to the script: {line:?}\n{}", ran.stderr);
    }
    assert!(!ran.stderr.contains('\x1b') && !ran.stderr.contains('\r') && !ran.stderr.contains('\x07'));
    assert!(ran.stderr.contains("\\e[31mred"), "{}", ran.stderr);
}

/// The run's deadline (3 s here) bounds what the run started on the host
/// side too: a blocking remote call and background transfers left running
/// end with it, not after their own call_timeout (1 h) or idle_timeout.
#[test]
fn the_deadline_bounds_host_calls_and_background_jobs() {
    for name in ["host-call-outlives-deadline", "jobs-outlive-deadline"] {
        let env = Env::new(true);
        let mut cmd = offsite(Path::new(BIN));
        cmd.current_dir(env.path("base"))
            .arg("run")
            .arg(script("hostile"))
            .arg("--site")
            .arg(env.path("base/site.toml"));
        cmd.args(["--param", &format!("case={name}")]).env("HOME", env.path("home")).env_remove("SSH_AUTH_SOCK");
        let started = std::time::Instant::now();
        let ran = Ran::from_output(cmd.output().unwrap());
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(20), "{name}: the run took {took:?}:\n{}", ran.stderr);
        assert!(ran.code == 1 || ran.code == 3, "{name}: exit {}:\n{}", ran.code, ran.stderr);
        assert!(ran.stderr.contains("deadline"), "{name}: {}", ran.stderr);
    }
}

/// A script that catches failed calls and returns success still leaves a
/// run of status `warning`, with each failure named, never `ok`.
#[test]
fn failures_the_script_swallows_make_the_run_a_warning() {
    let env = Env::new(true);
    let mut cmd = env.run();
    cmd.args(["--json", "--param", "case=swallow-failures", "--param"]).arg(format!("arg={}", env.files().display()));
    cmd.env("HOME", env.path("home")).env_remove("SSH_AUTH_SOCK");
    let ran = Ran::from_output(cmd.output().unwrap());
    assert!(ran.stdout.contains("\"status\":\"warning\""), "{}\n{}", ran.stdout, ran.stderr);
    for needle in ["scp.fetch failed", "ssh.exec-to-file failed", "archive.tar-gz failed"] {
        assert!(ran.stderr.contains(needle), "{needle}: {}", ran.stderr);
    }
}

/// What a script says about itself reaches `inspect` and `check` escaped:
/// the hostile script's description tries to erase its line and draw a
/// fake sha256 line and import list.
#[test]
fn script_metadata_is_escaped_in_inspect_and_check() {
    let env = Env::new(false);
    let inspect = Ran::from_output(offsite(Path::new(BIN)).arg("inspect").arg(script("hostile")).output().unwrap());
    inspect.expect_code(0);
    let check = Ran::from_output(
        offsite(Path::new(BIN)).arg("check").arg(env.path("base/site.toml")).arg(script("hostile")).output().unwrap(),
    );
    for (what, out) in [("inspect", &inspect.stdout), ("check", &check.stdout)] {
        assert!(!out.contains('\x1b') && !out.contains('\r'), "{what} printed control characters:\n{out}");
    }
    assert!(inspect.stdout.contains("\\e[2K\\rsha256:      0000 (fake)\\nimports:"), "{}", inspect.stdout);
    assert_eq!(inspect.stdout.lines().filter(|l| l.starts_with("sha256:")).count(), 1, "{}", inspect.stdout);
    assert_eq!(inspect.stdout.lines().filter(|l| l.starts_with("imports:")).count(), 1, "{}", inspect.stdout);
    // Its std::fs and socket calls import WASI interfaces that give
    // nothing: both commands say what will happen.
    assert!(inspect.stdout.contains("note: imports wasi:filesystem: file calls"), "{}", inspect.stdout);
    assert!(check.stdout.contains("imports wasi:filesystem: file calls"), "{}", check.stdout);
    assert!(check.stdout.contains("imports wasi:sockets: network calls will fail"), "{}", check.stdout);
}

/// The compile cache: an entry renamed over another script's entry is
/// refused (each entry's record names its script's SHA-256 and the very
/// file it describes), a damaged entry is caught by `check`, and a cache
/// directory others can write to is not used at all.
#[test]
fn compile_cache_entries_cannot_be_swapped_or_planted() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let inspect = |name: &str| {
        let mut cmd = offsite(Path::new(BIN));
        cmd.env("OFFSITE_CACHE_DIR", &cache).args(["-v", "inspect"]).arg(script(name));
        Ran::from_output(cmd.output().unwrap())
    };
    let entries = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&cache)
            .map(|d| d.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "cwasm")).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let cached_again = |entry: &Path| {
        let ran = inspect("noop");
        ran.expect_code(0);
        assert!(ran.stdout.starts_with("script:      noop "), "{}", ran.stdout);
        assert!(ran.stdout.contains("compiled now in"), "{}", ran.stdout);
        assert!(entry.with_extension("sum").exists(), "the entry was written again");
        ran
    };
    inspect("noop").expect_code(0);
    let noop_entry = entries().pop().expect("noop was cached");
    inspect("fixture").expect_code(0);
    let fixture_entry = entries().into_iter().find(|p| *p != noop_entry).expect("fixture was cached");
    // Another user who can rename in the cache puts fixture's compiled
    // code under noop's name: noop must still run as noop.
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to).unwrap();
        std::fs::copy(from.with_extension("sum"), to.with_extension("sum")).unwrap();
    };
    let fixture_saved = dir.path().join("fixture.cwasm");
    copy(&fixture_entry, &fixture_saved);
    std::fs::rename(&fixture_entry, &noop_entry).unwrap();
    let ran = cached_again(&noop_entry);
    assert!(ran.stderr.contains("its record describes another file"), "{}", ran.stderr);
    // The same with its record: the record names another script.
    copy(&fixture_saved, &fixture_entry);
    std::fs::rename(&fixture_entry, &noop_entry).unwrap();
    std::fs::rename(fixture_entry.with_extension("sum"), noop_entry.with_extension("sum")).unwrap();
    let ran = cached_again(&noop_entry);
    assert!(ran.stderr.contains("holds the compiled code of script"), "{}", ran.stderr);

    // A flipped byte in the compiled code, in place: runs trust the
    // record's binding to the file, check re-hashes and compiles again.
    let mut code = std::fs::read(&noop_entry).unwrap();
    let middle = code.len() / 2;
    code[middle] ^= 0x40;
    std::fs::OpenOptions::new().write(true).open(&noop_entry).unwrap().write_all(&code).unwrap();
    let site = dir.path().join("site.toml");
    std::fs::write(
        &site,
        format!("store = \"{}\"\nscript = \"{}\"\n", dir.path().join("store").display(), script("noop").display()),
    )
    .unwrap();
    let ran = Ran::from_output(
        offsite(Path::new(BIN)).env("OFFSITE_CACHE_DIR", &cache).args(["-v", "check"]).arg(&site).output().unwrap(),
    );
    ran.expect_code(0);
    assert!(ran.stderr.contains("does not match its recorded checksum"), "{}", ran.stderr);
    assert_eq!(std::fs::read(&noop_entry).unwrap()[middle], code[middle] ^ 0x40, "check wrote a good copy");

    // A cache directory others may write to is not used.
    use std::os::unix::fs::PermissionsExt;
    std::fs::remove_dir_all(&cache).unwrap();
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let ran = inspect("noop");
    ran.expect_code(0);
    assert!(ran.stderr.contains("not using the compile cache"), "{}", ran.stderr);
    assert!(entries().is_empty(), "an entry was written into a directory others can write to");
}

/// A local user on the server swaps the fetched name between the granted
/// file and a symlink to a private file, as fast as it can. The check and
/// the read are one open on the server, so what is stored is always the
/// granted file, never the private one.
#[test]
fn a_symlink_swapped_in_during_a_fetch_never_stores_the_target() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = Env::new(true);
    let files = env.files();
    std::fs::write(files.join("swap.tgz"), "GRANTED").unwrap();
    std::fs::write(files.join("private.key"), "PRIVATE KEY").unwrap();
    std::os::unix::fs::symlink(files.join("private.key"), files.join("other")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, files) = (Arc::clone(&stop), files.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    files.join("swap.tgz"),
                    rustix::fs::CWD,
                    files.join("other"),
                    rustix::fs::RenameFlags::EXCHANGE,
                );
            }
        })
    };
    let mut cmd = env.run();
    cmd.args(["--param", "case=fetch-race", "--param"]).arg(format!("arg={}", files.display()));
    cmd.env("HOME", env.path("home")).env_remove("SSH_AUTH_SOCK");
    let ran = Ran::from_output(cmd.output().unwrap());
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(ran.code == 0, "{}", ran.stderr);
    let mut stored = BTreeMap::new();
    walk(&env.path("store"), Path::new("/nonexistent"), &mut stored);
    let fetched: Vec<_> = stored.iter().filter(|(p, _)| p.to_string_lossy().ends_with(".tgz")).collect();
    for (path, content) in &fetched {
        assert_eq!(content.as_str(), "file of 7 bytes: GRANTED", "{} holds the private file", path.display());
    }
    assert!(ran.stderr.contains("stored "), "{}", ran.stderr);
}

/// What a script put in a store path or its error reaches `verify -v` and
/// `status` escaped, long after the run.
#[test]
fn store_names_and_errors_are_escaped_in_verify_and_status() {
    let env = Env::new(false);
    let mut cmd = env.run();
    cmd.args(["--param", "case=store-escape-name"]).env("HOME", env.path("home"));
    Ran::from_output(cmd.output().unwrap()).expect_code(1);
    let verify = Ran::from_output(
        offsite(Path::new(BIN)).args(["-v", "verify"]).arg(env.path("base/site.toml")).output().unwrap(),
    );
    let status =
        Ran::from_output(offsite(Path::new(BIN)).arg("status").arg(env.path("base/site.toml")).output().unwrap());
    for (what, out) in [("verify", &verify.stdout), ("verify", &verify.stderr), ("status", &status.stdout)] {
        assert!(!out.contains('\x1b') && !out.contains('\x07') && !out.contains('\r'), "{what}: {out:?}");
    }
    assert!(verify.stdout.contains("x\\e[2J"), "{}", verify.stdout);
    assert!(status.stdout.contains("failing\\e[31m on purpose"), "{}", status.stdout);
}
