//! `offsite watch` end to end: the real binary watching real files, reloading
//! scripts replaced by rename, rebuilt by cargo or rewritten in place,
//! refusing bad versions, sharing the store lock with `offsite run`, and
//! stopping cleanly on SIGTERM. Runs are started with `--run-on-change`, so
//! nothing here waits for a wall-clock schedule (the schedule itself is
//! tested with an injected clock in `runner/src/watch.rs`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use offsite_testkit::sshd::Sshd;
use offsite_testkit::{offsite, rebuilt, script, tree};
use rustix::process::Signal;

const BIN: &str = env!("CARGO_BIN_EXE_offsite");
/// Long enough for a debug build on a busy two-core machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// A directory with a site file, its script (a copy of `fixture`) and a
/// read root `src`.
struct Site {
    dir: tempfile::TempDir,
    good: Vec<u8>,
    /// Top-level lines added to site.toml.
    top: String,
}

impl Site {
    fn new(params: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        std::fs::write(dir.path().join("src/file"), "data\n").unwrap();
        let good = std::fs::read(script("fixture")).unwrap();
        std::fs::write(dir.path().join("fixture.wasm"), &good).unwrap();
        let site = Site { dir, good, top: String::new() };
        site.write_site("[\"src\"]", params);
        site
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn script(&self) -> PathBuf {
        self.path("fixture.wasm")
    }

    /// Writes site.toml (by rename, as editors do).
    fn write_site(&self, roots: &str, params: &str) {
        let text = format!(
            "name = \"w\"\nstore = \"store\"\nscript = \"fixture.wasm\"\n{}[read]\nroots = {roots}\n[params]\n{params}\n",
            self.top
        );
        replace(&self.path("site.toml"), text.as_bytes());
    }

    /// The manifests of the site's runs, oldest first.
    fn manifests(&self) -> Vec<serde_json::Value> {
        manifests(&self.path("store"))
    }

    fn watch(&self, extra: &[&str]) -> Watcher {
        let mut cmd = offsite(Path::new(BIN));
        cmd.arg("watch").arg(self.path("site.toml")).arg("--run-on-change").arg("--debounce").arg("50ms");
        cmd.args(extra);
        Watcher::start(cmd)
    }
}

/// The manifest files of the runs in `store`, oldest first.
fn manifest_files(store: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(store.join(".offsite/manifests")) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// The manifests of the runs in `store`, oldest first.
fn manifests(store: &Path) -> Vec<serde_json::Value> {
    manifest_files(store).iter().map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()).collect()
}

/// Replaces `path` the way cargo and most editors do: write aside, rename.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

/// A running `offsite watch`, its log collected line by line.
struct Watcher {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Lines before this one were already matched by `wait_for`.
    seen: usize,
}

impl Watcher {
    fn start(mut cmd: Command) -> Watcher {
        let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (err, sink) = (child.stderr.take().unwrap(), Arc::clone(&lines));
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { return };
                eprintln!("watch| {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let mut w = Watcher { child, lines, seen: 0 };
        w.wait_for("watching site");
        w
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits for a line containing `needle` after the last one matched.
    #[track_caller]
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                if let Some(i) = lines[self.seen..].iter().position(|l| l.contains(needle)) {
                    self.seen += i + 1;
                    return lines[self.seen - 1].clone();
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("watch exited ({status}) before logging {needle:?}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, signal: Signal) {
        send(self.child.id(), signal);
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> ExitStatus {
        self.stop_with(Signal::TERM)
    }

    fn stop_with(&mut self, signal: Signal) -> ExitStatus {
        self.signal(signal);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "watch did not stop:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send(pid: u32, signal: Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, signal).unwrap();
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn scripts_replaced_by_rename_or_rewritten_in_place_reload_and_bad_ones_keep_the_old() {
    let site = Site::new("case = \"tar\"\narg = \"src\"");
    let mut w = site.watch(&[]);
    let v1 = sha256(&site.good);

    // Rebuilt and renamed into place: reloaded, and the next run uses it.
    let v2_bytes = rebuilt(&site.good, "v2");
    let v2 = sha256(&v2_bytes);
    replace(&site.script(), &v2_bytes);
    let line = w.wait_for("reloaded");
    assert!(line.contains(&format!("script sha256 {v1} -> {v2}")), "{line}");
    w.wait_for("run succeeded");
    assert_eq!(site.manifests().last().unwrap()["script"]["sha256"], v2.as_str());

    // Garbage written in place: refused with the reason, the old one kept,
    // and no run.
    std::fs::write(site.script(), b"not wasm").unwrap();
    let line = w.wait_for("not valid");
    assert!(line.contains(&v2) && line.contains("fixture.wasm"), "{line}");
    // A site edit now runs with the kept script.
    site.write_site("[\"src\"]", "case = \"tar\"\narg = \"src\"\n# edited");
    w.wait_for("reloaded");
    w.wait_for("run succeeded");
    assert_eq!(site.manifests().len(), 2, "the bad script never ran");
    assert_eq!(site.manifests().last().unwrap()["script"]["sha256"], v2.as_str());

    // Truncated, then written in two halves with a pause longer than the
    // debounce between them: the half-written file is refused, the whole
    // one is taken.
    let v3_bytes = rebuilt(&site.good, "v3");
    let v3 = sha256(&v3_bytes);
    let mut f = std::fs::File::create(site.script()).unwrap();
    let half = v3_bytes.len() / 2;
    f.write_all(&v3_bytes[..half]).unwrap();
    f.flush().unwrap();
    w.wait_for("not valid");
    f.write_all(&v3_bytes[half..]).unwrap();
    drop(f);
    let line = w.wait_for("reloaded");
    assert!(line.contains(&format!("-> {v3}")), "{line}");
    w.wait_for("run succeeded");
    let shas: Vec<String> =
        site.manifests().iter().map(|m| m["script"]["sha256"].as_str().unwrap().to_string()).collect();
    assert_eq!(shas, [v2.clone(), v2, v3], "no run ever used a half-written script");

    assert!(w.stop().success(), "{}", w.log());
}

#[test]
fn a_site_edit_that_changes_grants_applies_to_the_next_run() {
    let site = Site::new("case = \"tar\"\narg = \"src\"");
    std::fs::create_dir(site.path("www")).unwrap();
    std::fs::write(site.path("www/index.html"), "<p>hi</p>\n").unwrap();
    let mut w = site.watch(&[]);

    // Archiving www without a grant for it: denied, the run fails.
    site.write_site("[\"src\"]", "case = \"tar\"\narg = \"www\"");
    w.wait_for("reloaded");
    w.wait_for("run failed (exit 1)");
    assert!(w.log().contains("denied"), "{}", w.log());
    // The grant added: the same script now archives it.
    site.write_site("[\"src\", \"www\"]", "case = \"tar\"\narg = \"www\"");
    w.wait_for("reloaded");
    w.wait_for("run succeeded");
    let m = site.manifests();
    assert_eq!((m[0]["status"].as_str(), m[1]["status"].as_str()), (Some("failed"), Some("ok")));
    assert_ne!(m[0]["grants_sha256"], m[1]["grants_sha256"]);
    assert_eq!(tree(&site.path("store")), [PathBuf::from("fixture.tgz")]);
    assert!(w.stop().success());
}

#[test]
fn a_run_keeps_the_version_it_started_with_and_the_next_run_takes_the_new_one() {
    let site = Site::new("case = \"tar\"\narg = \"src\"");
    let mut w = site.watch(&[]);
    let v1 = sha256(&site.good);
    // A run that holds on for a while...
    site.write_site("[\"src\"]", "case = \"sleep\"\narg = \"2000\"");
    w.wait_for("run started");
    // ...while the script is replaced.
    let v2_bytes = rebuilt(&site.good, "v2");
    replace(&site.script(), &v2_bytes);
    w.wait_for("reloaded");
    w.wait_for("run succeeded");
    w.wait_for("run started (its files changed during the last run)");
    w.wait_for("run succeeded");
    let shas: Vec<String> =
        site.manifests().iter().map(|m| m["script"]["sha256"].as_str().unwrap().to_string()).collect();
    assert_eq!(shas, [v1, sha256(&v2_bytes)]);
    assert!(w.stop().success());
}

/// The `[profile.release]` section of scripts/Cargo.toml.
fn release_profile(repo: &Path) -> String {
    let text = std::fs::read_to_string(repo.join("scripts/Cargo.toml")).unwrap();
    let start = text.find("[profile.release]").expect("scripts/Cargo.toml has [profile.release]");
    let rest = &text[start..];
    let end = rest[1..].find("\n[").map_or(rest.len(), |i| i + 1);
    rest[..end].to_string()
}

#[test]
fn a_real_cargo_build_of_a_script_crate_is_picked_up() {
    // A script crate of its own, built with cargo against the SDK, sharing
    // scripts/target and its release profile so that its dependencies are
    // already compiled.
    let krate = tempfile::tempdir().unwrap();
    let repo = offsite_testkit::repo_root();
    std::fs::create_dir(krate.path().join("src")).unwrap();
    std::fs::write(
        krate.path().join("Cargo.toml"),
        format!(
            "[package]\nname = \"watched\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n\
             [dependencies]\noffsite-sdk = {{ path = \"{}\" }}\n\n[workspace]\n\n{}",
            repo.join("guest-sdk/rust").display(),
            release_profile(&repo)
        ),
    )
    .unwrap();
    std::fs::copy(repo.join("scripts/Cargo.lock"), krate.path().join("Cargo.lock")).unwrap();
    let source = |version: &str| {
        format!(
            "use offsite_sdk::{{Result, Script, ScriptInfo}};\nstruct W;\nimpl Script for W {{\n    fn describe() -> \
             ScriptInfo {{ ScriptInfo::new(\"watched\", \"{version}\") }}\n    fn run() -> Result<()> {{ Ok(()) }}\n}}\n\
             offsite_sdk::script!(W);\n"
        )
    };
    let target = repo.join("scripts/target");
    let build = |version: &str| {
        std::fs::write(krate.path().join("src/lib.rs"), source(version)).unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--quiet", "--offline", "--target", "wasm32-wasip2"])
            .current_dir(krate.path())
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .status()
            .unwrap();
        assert!(status.success(), "cargo build of the watched crate failed");
    };
    build("1.0.0");
    let built = target.join("wasm32-wasip2/release/watched.wasm");

    let dir = tempfile::tempdir().unwrap();
    let site_file = dir.path().join("site.toml");
    std::fs::write(&site_file, format!("name = \"w\"\nstore = \"store\"\nscript = \"{}\"\n", built.display())).unwrap();
    let mut cmd = offsite(Path::new(BIN));
    cmd.arg("watch").arg(&site_file).arg("--run-on-change");
    let mut w = Watcher::start(cmd);
    build("2.0.0");
    let line = w.wait_for("reloaded");
    assert!(line.contains("watched 2.0.0"), "{line}");
    w.wait_for("run succeeded");
    let [manifest] = &manifests(&dir.path().join("store"))[..] else { panic!("not one run") };
    assert_eq!(manifest["script"]["version"], "2.0.0");
    assert_eq!(manifest["script"]["sha256"], sha256(&std::fs::read(&built).unwrap()).as_str());
    assert!(w.stop().success());
}

#[test]
fn watch_and_offsite_run_never_run_a_site_twice_at_once() {
    let site = Site::new("case = \"tar\"\narg = \"src\"");
    let mut w = site.watch(&[]);

    // A cron run holds the store: the watcher's run is skipped.
    let mut cron = offsite(Path::new(BIN))
        .arg("run")
        .arg(site.script())
        .arg("--site")
        .arg(site.path("site.toml"))
        .args(["--param", "case=sleep", "--param", "arg=3000"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lock = site.path("store/.offsite/lock");
    let deadline = Instant::now() + PATIENCE;
    while std::fs::read_to_string(&lock).map_or(true, |t| t.trim().is_empty()) {
        assert!(Instant::now() < deadline, "the cron run never took the lock");
        std::thread::sleep(Duration::from_millis(10));
    }
    site.write_site("[\"src\"]", "case = \"tar\"\narg = \"src\"\n# edited");
    w.wait_for("run skipped: another run of this store holds its lock");
    assert!(w.log().contains("another run holds the store's lock: pid"), "{}", w.log());
    assert!(cron.wait().unwrap().success());

    // The watcher's run holds it: `offsite run` exits 4.
    site.write_site("[\"src\"]", "case = \"sleep\"\narg = \"3000\"");
    w.wait_for("run started");
    while std::fs::read_to_string(&lock).map_or(true, |t| t.trim().is_empty()) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = offsite(Path::new(BIN))
        .arg("run")
        .arg(site.script())
        .arg("--site")
        .arg(site.path("site.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    w.wait_for("run succeeded");
    // One run by cron, one by the watcher: nothing else.
    assert_eq!(site.manifests().len(), 2);
    assert!(w.stop().success());
}

/// A site whose `probe` streams a megabyte from a real sshd and then waits
/// a minute before its command exits.
fn slow_stream_site(server: &Sshd) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("home")).unwrap();
    std::fs::write(dir.path().join("ssh_config"), "").unwrap();
    std::fs::copy(script("probe"), dir.path().join("probe.wasm")).unwrap();
    let argv = ["sh", "-c", "head -c 1000000 /dev/zero; sleep 60"].join("\u{1f}");
    let text = format!(
        "name = \"slow\"\nstore = \"store\"\nscript = \"probe.wasm\"\nssh_config = \"{}\"\n[params]\nop = \
         \"stream\"\nargv = \"{}\"\ndest = \"dump.bin\"\n{}\n",
        dir.path().join("ssh_config").display(),
        argv.replace('\u{1f}', "\\u001f"),
        server.host_section("server1", "commands = [[\"sh\", \"-c\", \"**\"]]")
    );
    std::fs::write(dir.path().join("site.toml"), text).unwrap();
    dir
}

/// Waits until the store's staging area holds a temporary file.
fn wait_for_temporary_file(store: &Path) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let runs = store.join(".offsite/runs");
        if runs.exists() && tree(&runs).iter().any(|f| f.to_string_lossy().contains(".offsite-tmp")) {
            return;
        }
        assert!(Instant::now() < deadline, "the transfer never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// After a clean abort: nothing visible, no temporary file, and a `failed`
/// manifest that says why.
#[track_caller]
fn assert_aborted_cleanly(store: &Path) {
    assert_eq!(tree(store), Vec::<PathBuf>::new(), "a partial file became visible");
    let runs = store.join(".offsite/runs");
    let leftovers: Vec<PathBuf> =
        tree(&runs).into_iter().filter(|f| f.to_string_lossy().contains(".offsite-tmp")).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let [m] = &manifests(store)[..] else { panic!("not one run: {:?}", manifest_files(store)) };
    assert_eq!(m["status"], "failed", "{m}");
    assert!(m["error"].as_str().unwrap().contains("aborted: received SIGTERM"), "{m}");
    assert!(
        !store.join(".offsite/lock").exists()
            || std::fs::read_to_string(store.join(".offsite/lock")).unwrap().trim().is_empty()
    );
}

#[test]
fn sigterm_in_the_middle_of_a_run_leaves_nothing_partial() {
    let server = Sshd::start("127.0.0.2");
    let dir = slow_stream_site(&server);
    let store = dir.path().join("store");

    // Under watch: the run outlives the grace period and is aborted.
    let mut cmd = offsite(Path::new(BIN));
    cmd.arg("watch").arg(dir.path().join("site.toml")).args(["--run-on-change", "--grace", "1s"]);
    cmd.env("HOME", dir.path().join("home")).env_remove("SSH_AUTH_SOCK");
    let mut w = Watcher::start(cmd);
    let text = std::fs::read_to_string(dir.path().join("site.toml")).unwrap();
    replace(&dir.path().join("site.toml"), format!("{text}# go\n").as_bytes());
    w.wait_for("run started");
    wait_for_temporary_file(&store);
    let started = Instant::now();
    let status = w.stop();
    assert!(status.success(), "{status}\n{}", w.log());
    assert!(started.elapsed() < Duration::from_secs(30), "the abort took {:?}", started.elapsed());
    let log = w.log();
    assert!(log.contains("get 1s to finish") && log.contains("stopping it (SIGTERM)"), "{log}");
    assert!(log.contains("run failed (exit 1)"), "{log}");
    assert_aborted_cleanly(&store);
    std::fs::remove_dir_all(&store).unwrap();

    // `offsite run` itself (cron, a systemd timer being stopped).
    let run = offsite(Path::new(BIN))
        .arg("run")
        .arg(dir.path().join("probe.wasm"))
        .arg("--site")
        .arg(dir.path().join("site.toml"))
        .env("HOME", dir.path().join("home"))
        .env_remove("SSH_AUTH_SOCK")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_temporary_file(&store);
    send(run.id(), Signal::TERM);
    let out = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("backup aborted: received SIGTERM"), "{stderr}");
    assert_aborted_cleanly(&store);
}

#[test]
fn a_run_that_ends_within_the_grace_period_finishes_normally() {
    let site = Site::new("case = \"tar\"\narg = \"src\"");
    let mut w = site.watch(&["--grace", "30s"]);
    site.write_site("[\"src\"]", "case = \"sleep\"\narg = \"1500\"");
    w.wait_for("run started");
    // SIGINT (Ctrl-C) is SIGTERM's twin.
    assert!(w.stop_with(Signal::INT).success());
    assert!(w.log().contains("received SIGINT: no new runs; 1 run(s) in progress get 30s to finish"), "{}", w.log());
    assert!(w.log().contains("run succeeded"), "{}", w.log());
    assert_eq!(site.manifests().last().unwrap()["status"], "ok");
}

#[test]
fn sighup_rereads_and_picks_up_new_sites_in_a_directory() {
    let (dir, sites) = sites_dir();
    let mut cmd = offsite(Path::new(BIN));
    cmd.arg("watch").arg(&sites).arg("--run-on-change");
    let mut w = Watcher::start(cmd);
    std::fs::write(sites.join("b.toml"), dir_site("b")).unwrap();
    w.signal(Signal::HUP);
    w.wait_for("re-reading every site and script");
    w.wait_for("site b: added");
    // Both sites share the script: a rebuild reloads both.
    let good = std::fs::read(dir.path().join("fixture.wasm")).unwrap();
    replace(&dir.path().join("fixture.wasm"), &rebuilt(&good, "shared"));
    let first = w.wait_for("reloaded");
    let second = w.wait_for("reloaded");
    assert!(first.contains("site a:") != second.contains("site a:"), "{first}\n{second}");
    assert!(w.stop().success());
}

/// One bad site file never stops the watcher (nor, under systemd, every
/// other site with it): it is refused and logged once, the good site runs
/// on, and the bad one joins once it is fixed.
#[test]
fn a_site_that_does_not_load_is_refused_and_the_others_run_on() {
    let (dir, sites) = sites_dir();
    std::fs::write(dir.path().join("src/file"), "data\n").unwrap();
    std::fs::write(sites.join("b.toml"), "name = \"b\"\nstore = \n").unwrap();
    let mut cmd = offsite(Path::new(BIN));
    cmd.arg("watch").arg(&sites).arg("--run-on-change").arg("--debounce").arg("50ms");
    // Refused before the good site is watched (which `start` waits for).
    let mut w = Watcher::start(cmd);
    assert!(w.log().contains("b.toml is refused, and the other sites keep their schedules"), "{}", w.log());
    // The good site runs on a change of its own.
    replace(&sites.join("a.toml"), format!("{}# edited\n", dir_site("a")).as_bytes());
    w.wait_for("site a: reloaded");
    let deadline = Instant::now() + PATIENCE;
    while manifests(&dir.path().join("store-a")).is_empty() {
        assert!(Instant::now() < deadline, "site a never ran:\n{}", w.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The same mistake saved again is not logged again; the fix is taken.
    std::fs::write(sites.join("b.toml"), "name = \"b\"\nstore = \n").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(sites.join("b.toml"), dir_site("b")).unwrap();
    w.wait_for("site b: ");
    assert!(w.log().contains("b.toml loads now; added"), "{}", w.log());
    assert_eq!(w.log().matches("is refused").count(), 1, "{}", w.log());
    assert!(w.stop().success());
}

#[test]
fn a_thousand_reloads_grow_neither_memory_nor_file_descriptors() {
    let mut site = Site::new("case = \"tar\"\narg = \"src\"");
    // Without --run-on-change (this is about reloading), so with a schedule.
    site.top = "schedule = \"0 0 1 1 *\"\n".into();
    site.write_site("[\"src\"]", "case = \"tar\"\narg = \"src\"");
    let mut cmd = offsite(Path::new(BIN));
    cmd.arg("watch").arg(site.path("site.toml")).args(["--debounce", "0s"]);
    let mut w = Watcher::start(cmd);
    let versions = [rebuilt(&site.good, "a"), rebuilt(&site.good, "b")];
    let reload = |w: &mut Watcher, bytes: &[u8]| {
        replace(&site.script(), bytes);
        w.wait_for("reloaded");
    };
    for v in versions.iter().cycle().take(20) {
        reload(&mut w, v);
    }
    let (fds, rss) = (open_fds(w.pid()), rss_kib(w.pid()));
    for v in versions.iter().cycle().take(1000) {
        reload(&mut w, v);
    }
    let (fds_after, rss_after) = (open_fds(w.pid()), rss_kib(w.pid()));
    assert!(fds_after <= fds + 2, "file descriptors went from {fds} to {fds_after} over 1000 reloads");
    assert!(rss_after < rss + (32 << 10), "resident memory went from {rss} KiB to {rss_after} KiB over 1000 reloads");
    assert!(w.stop().success());
}

#[test]
fn runs_are_bounded_by_jobs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    let good = std::fs::read(script("fixture")).unwrap();
    std::fs::write(dir.path().join("fixture.wasm"), &good).unwrap();
    let mut cmd = offsite(Path::new(BIN));
    cmd.arg("watch").args(["--run-on-change", "--jobs", "1", "--debounce", "50ms"]);
    for name in ["a", "b"] {
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "name = \"{name}\"\nstore = \"store-{name}\"\nscript = \"fixture.wasm\"\n[read]\nroots = \
                 [\"src\"]\n[params]\ncase = \"sleep\"\narg = \"700\"\n"
            ),
        )
        .unwrap();
        cmd.arg(file);
    }
    let mut w = Watcher::start(cmd);
    // One rebuild of the shared script makes both sites due at once.
    replace(&dir.path().join("fixture.wasm"), &rebuilt(&good, "v2"));
    for _ in 0..2 {
        w.wait_for("run started");
        w.wait_for("run succeeded");
    }
    let span = |name: &str| {
        let [m] = &manifests(&dir.path().join(format!("store-{name}")))[..] else { panic!("site {name}: not one run") };
        (m["started"].as_str().unwrap().to_string(), m["ended"].as_str().unwrap().to_string())
    };
    let (a, b) = (span("a"), span("b"));
    // RFC 3339 in one zone with the same precision: ordered as strings.
    assert!(a.1 <= b.0 || b.1 <= a.0, "the runs overlapped: a {a:?}, b {b:?}");
    assert!(w.stop().success());
}

#[test]
fn at_start_up_a_missed_run_runs_once_or_is_skipped_by_policy() {
    for (policy, runs) in [("run-once", true), ("skip", false)] {
        let mut site = Site::new("case = \"tar\"\narg = \"src\"");
        site.top = format!("schedule = \"34 3,20 * * *\"\nmissed = \"{policy}\"\n");
        site.write_site("[\"src\"]", "case = \"tar\"\narg = \"src\"");
        // A run, then pretend it was three days ago: two runs a day were
        // missed since.
        let ran = offsite(Path::new(BIN))
            .arg("run")
            .arg(site.script())
            .arg("--site")
            .arg(site.path("site.toml"))
            .current_dir(site.dir.path())
            .output()
            .unwrap();
        assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
        let [file] = &manifest_files(&site.path("store"))[..] else { panic!("not one run") };
        let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        let three_days_ago = {
            let out = Command::new("date").args(["-u", "-d", "3 days ago", "+%Y-%m-%dT%H:%M:%S+00:00"]).output();
            String::from_utf8(out.unwrap().stdout).unwrap().trim().to_string()
        };
        m["started"] = three_days_ago.clone().into();
        m["ended"] = three_days_ago.into();
        std::fs::write(file, serde_json::to_vec_pretty(&m).unwrap()).unwrap();

        let mut cmd = offsite(Path::new(BIN));
        cmd.arg("watch").arg(site.path("site.toml"));
        let mut w = Watcher::start(cmd);
        // Start-up logs the missed run before it says it is watching.
        if runs {
            assert!(w.log().contains("running it now (missed = \"run-once\")"), "{}", w.log());
            w.wait_for("run started (missed its run at");
            w.wait_for("run succeeded");
            assert_eq!(site.manifests().len(), 2);
        } else {
            assert!(w.log().contains("skipped (missed = \"skip\")"), "{}", w.log());
            // A queued run starts before the loop first waits, so before it
            // handles the SIGTERM: none may have started by the time it stops.
            assert!(w.stop().success());
            assert!(!w.log().contains("run started"), "{}", w.log());
            assert_eq!(site.manifests().len(), 1);
            continue;
        }
        assert!(w.stop().success());
    }
}

/// The watcher's lines, and its runs' lines, start with the time; one bad
/// version written several times is refused in one line, not once per
/// write.
#[test]
fn lines_carry_the_time_and_a_refusal_is_logged_once() {
    let site = Site::new("case = \"tar\"\narg = \"src\"");
    let mut w = site.watch(&[]);
    for _ in 0..5 {
        std::fs::write(site.script(), b"not wasm").unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    w.wait_for("not valid");
    // A good version afterwards is taken (and runs), so the watcher did
    // see every write before this point.
    replace(&site.script(), &rebuilt(&site.good, "after"));
    w.wait_for("reloaded");
    w.wait_for("run succeeded");
    let log = w.log();
    assert_eq!(log.matches("not valid").count(), 1, "{log}");
    let stamped = |l: &str| {
        let b = l.as_bytes();
        b.len() > 20 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[10] == b'T'
    };
    assert!(log.lines().all(stamped), "every line starts with the time:\n{log}");
    assert!(w.stop().success(), "{log}");
}

/// DIR with `sites/a.toml` (see [`dir_site`]), an empty `src/` and the
/// fixture at `fixture.wasm`; returns DIR and its `sites/`.
fn sites_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sites = dir.path().join("sites");
    std::fs::create_dir(&sites).unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::copy(script("fixture"), dir.path().join("fixture.wasm")).unwrap();
    std::fs::write(sites.join("a.toml"), dir_site("a")).unwrap();
    (dir, sites)
}

/// A site file for `DIR/sites/`: the fixture at `DIR/fixture.wasm`
/// archiving `DIR/src` into `DIR/store-NAME`.
fn dir_site(name: &str) -> String {
    format!(
        "name = \"{name}\"\nstore = \"../store-{name}\"\nscript = \"../fixture.wasm\"\n[read]\nroots = \
         [\"../src\"]\n[params]\ncase = \"tar\"\narg = \"../src\"\n"
    )
}
