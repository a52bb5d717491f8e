//! Misbehaving scripts and bad input: each is contained, reported clearly
//! and mapped to its documented exit code, and nothing outside the store is
//! written.

use std::path::{Path, PathBuf};

use offsite_testkit::{Ran, offsite, script, tempfile, tree, wat};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

/// A scratch area with a store (the cwd) and a directory beside it that no
/// grant covers.
struct Scratch {
    _dir: tempfile::TempDir,
    work: PathBuf,
    outside: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret.txt"), "top secret").unwrap();
        Scratch { _dir: dir, work, outside }
    }

    fn run(&self, args: &[&str]) -> Ran {
        Ran::from_output(offsite(Path::new(BIN)).current_dir(&self.work).args(args).output().unwrap())
    }

    fn fixture(&self, case: &str, extra: &[&str]) -> Ran {
        let fixture = script("fixture");
        let case = format!("case={case}");
        let mut args = vec!["run", fixture.to_str().unwrap(), "--param", &case];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// A site file in the work dir with the given `[limits]` lines.
    fn site_with_limits(&self, limits: &str) -> String {
        let site = self.work.join("site.toml");
        std::fs::write(&site, format!("store = \"store\"\n[read]\nroots = [\".\"]\n[limits]\n{limits}\n")).unwrap();
        site.display().to_string()
    }

    /// Nothing outside the work dir changed.
    #[track_caller]
    fn assert_outside_untouched(&self) {
        assert_eq!(tree(&self.outside), vec![PathBuf::from("secret.txt")]);
        assert_eq!(std::fs::read(self.outside.join("secret.txt")).unwrap(), b"top secret");
    }
}

#[test]
fn a_script_that_traps_fails_with_exit_1() {
    let s = Scratch::new();
    let ran = s.fixture("trap", &[]);
    ran.expect_code(1);
    // One line that says what happened and whose, not a wasm backtrace,
    // the guest's own panic lines or advice to set RUST_BACKTRACE.
    let lines: Vec<&str> = ran.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", ran.stderr);
    assert!(
        lines[0].starts_with(
            "offsite: error: backup failed: script fixture panicked: trapping on request (at fixture/src/lib.rs:"
        ),
        "{}",
        ran.stderr
    );
    assert!(!ran.stderr.contains("RUST_BACKTRACE") && !ran.stderr.contains("wasm function"), "{}", ran.stderr);
    s.assert_outside_untouched();
}

#[test]
fn a_script_error_fails_with_exit_1_and_its_reason() {
    let s = Scratch::new();
    s.fixture("fail", &["--param", "arg=dump was short"]).expect_code(1).expect_stderr("dump was short");
}

#[test]
fn a_script_sleeping_past_its_deadline_is_stopped_at_the_deadline() {
    let s = Scratch::new();
    let site = s.site_with_limits("deadline = \"1s\"");
    // A WASI sleep is a host call, which epochs cannot interrupt; the
    // runner's own timers end it at the deadline.
    let started = std::time::Instant::now();
    s.fixture("sleep", &["--site", &site, "--param", "arg=120000"]).expect_code(3).expect_stderr("deadline of 1s");
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "slept {:?}", started.elapsed());
    // A sleep within the deadline lasts as long as asked.
    let site = s.site_with_limits("deadline = \"30s\"");
    let started = std::time::Instant::now();
    s.fixture("sleep", &["--site", &site, "--param", "arg=700"]).expect_code(0);
    assert!(started.elapsed() >= std::time::Duration::from_millis(700), "slept {:?}", started.elapsed());
}

#[test]
fn sigterm_stops_a_sleeping_script_and_the_run_fails_cleanly() {
    let s = Scratch::new();
    let site = s.site_with_limits("");
    let mut run = offsite(Path::new(BIN))
        .current_dir(&s.work)
        .args(["run", script("fixture").to_str().unwrap(), "--site", &site])
        .args(["--param", "case=sleep", "--param", "arg=120000"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the run holds the store's lock, it is in the script.
    let lock = s.work.join("store/.offsite/lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string(&lock).map_or(true, |t| t.trim().is_empty()) {
        assert!(std::time::Instant::now() < deadline, "the run never started");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let pid = rustix::process::Pid::from_raw(run.id() as i32).unwrap();
    let sent = std::time::Instant::now();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = run.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("backup aborted: received SIGTERM"), "{stderr}");
    assert!(sent.elapsed() < std::time::Duration::from_secs(30), "stopping took {:?}", sent.elapsed());
    let manifests = s.work.join("store/.offsite/manifests");
    let file = std::fs::read_dir(manifests).unwrap().next().unwrap().unwrap().path();
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains("\"status\": \"failed\""), "{text}");
}

#[test]
fn an_infinite_loop_is_stopped_by_the_deadline_with_exit_3() {
    let s = Scratch::new();
    let site = s.site_with_limits("deadline = \"1s\"");
    let started = std::time::Instant::now();
    s.fixture("loop", &["--site", &site]).expect_code(3).expect_stderr("deadline of 1s");
    // Generous bound: only checks that the deadline, not something else, ended it.
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    s.assert_outside_untouched();
}

#[test]
fn unbounded_memory_growth_is_stopped_with_exit_3() {
    let s = Scratch::new();
    let site = s.site_with_limits("memory = \"32MiB\"");
    s.fixture("memory", &["--site", &site]).expect_code(3).expect_stderr("over its limit of 32 MiB");
}

#[test]
fn deep_recursion_is_stopped_with_exit_3() {
    let s = Scratch::new();
    s.fixture("recurse", &[]).expect_code(3).expect_stderr("stack");
}

#[test]
fn reading_outside_the_roots_through_dotdot_is_denied() {
    let s = Scratch::new();
    // The script sees a typed denial it can handle...
    s.fixture("tar-denied", &["--param", "arg=../outside"]).expect_code(0);
    // ...and one it propagates fails the backup, naming the reason.
    s.fixture("tar", &["--param", "arg=../outside/secret.txt"])
        .expect_code(1)
        .expect_stderr("denied")
        .expect_stderr("`..`");
    assert!(tree(&s.work).is_empty(), "{:?}", tree(&s.work));
    s.assert_outside_untouched();
}

#[test]
fn reading_outside_the_roots_through_an_absolute_path_is_denied() {
    let s = Scratch::new();
    let target = s.outside.join("secret.txt");
    let arg = format!("arg={}", target.display());
    s.fixture("tar-denied", &["--param", &arg]).expect_code(0);
    assert!(tree(&s.work).is_empty());
}

#[test]
fn reading_outside_the_roots_through_a_symlink_is_denied() {
    let s = Scratch::new();
    std::os::unix::fs::symlink(&s.outside, s.work.join("link")).unwrap();
    s.fixture("tar", &["--param", "arg=link/secret.txt"]).expect_code(1).expect_stderr("outside the read roots");
    // Archiving the link itself stores the link, not what it points to.
    s.fixture("tar", &["--param", "arg=link"]).expect_code(0);
    let list = std::process::Command::new("tar").arg("-tvzf").arg(s.work.join("fixture.tgz")).output().unwrap();
    let listing = String::from_utf8_lossy(&list.stdout);
    assert!(listing.contains("link ->"), "{listing}");
    assert!(!listing.contains("secret"), "{listing}");
    s.assert_outside_untouched();
}

#[test]
fn wasi_gives_no_filesystem_environment_or_network() {
    let s = Scratch::new();
    // A listener the script could reach if sockets were granted.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let arg = format!("arg={}", listener.local_addr().unwrap());
    let out = offsite(Path::new(BIN))
        .current_dir(&s.work)
        .env("OFFSITE_TEST_SECRET_ENV", "leak")
        .args(["run", script("fixture").to_str().unwrap(), "--param", "case=wasi-escape", "--param", &arg])
        .output()
        .unwrap();
    Ran::from_output(out).expect_code(0);
}

#[test]
fn undeclared_params_are_denied_to_the_script() {
    Scratch::new().fixture("undeclared-param", &[]).expect_code(0);
}

#[test]
fn script_output_goes_to_the_log_under_its_name() {
    let s = Scratch::new();
    let quiet = s.fixture("print", &["--param", "arg=hello"]);
    quiet.expect_code(0);
    assert!(!quiet.stderr.contains("out: hello"), "stdout is progress, hidden without -v: {}", quiet.stderr);
    assert!(quiet.stderr.contains("fixture: warning: err: hello"), "{}", quiet.stderr);
    assert_eq!(quiet.stdout, "");
    let verbose = s.fixture("print", &["--param", "arg=hello", "-v"]);
    verbose.expect_stderr("fixture: out: hello");
}

#[test]
fn secret_params_never_reach_the_log_or_errors() {
    let s = Scratch::new();
    let ran = s.fixture("fail", &["--param", "token=hunter2-s3cr3t", "--param", "arg=token is hunter2-s3cr3t"]);
    ran.expect_code(1).expect_stderr("token is ***");
    assert!(!ran.stderr.contains("hunter2-s3cr3t"), "{}", ran.stderr);
    let ran = s.fixture("print", &["--param", "token=hunter2-s3cr3t", "--param", "arg=hunter2-s3cr3t", "-v"]);
    assert!(!ran.stderr.contains("hunter2-s3cr3t"), "{}", ran.stderr);
}

#[test]
fn a_malformed_module_is_exit_2_naming_the_file() {
    let s = Scratch::new();
    let bad = s.work.join("garbage.wasm");
    std::fs::write(&bad, b"\0asm\x0d\0\x01\0this is not wasm").unwrap();
    s.run(&["run", bad.to_str().unwrap()])
        .expect_code(2)
        .expect_stderr("garbage.wasm")
        .expect_stderr("not a valid WebAssembly component");
    let text = s.work.join("text.wasm");
    std::fs::write(&text, b"#!/bin/sh\nrm -rf /\n").unwrap();
    let ran = s.run(&["run", text.to_str().unwrap()]);
    ran.expect_code(2).expect_stderr("text.wasm").expect_stderr("does not start with the WebAssembly magic bytes");
    assert_eq!(ran.stderr.lines().count(), 1, "one line, not a byte dump: {}", ran.stderr);
    s.run(&["run", "/no/such/script.wasm"]).expect_code(2).expect_stderr("/no/such/script.wasm");
}

#[test]
fn a_core_module_or_a_component_of_another_world_is_exit_2() {
    let s = Scratch::new();
    let core = s.work.join("core.wasm");
    std::fs::write(&core, wat("(module (func (export \"run\")))")).unwrap();
    s.run(&["run", core.to_str().unwrap()]).expect_code(2).expect_stderr("core.wasm");
    let other = s.work.join("other-world.wasm");
    std::fs::write(&other, wat("(component (core module) )")).unwrap();
    s.run(&["run", other.to_str().unwrap()])
        .expect_code(2)
        .expect_stderr("other-world.wasm")
        .expect_stderr("not an offsite:backup/script component");
    let needs = s.work.join("needs-http.wasm");
    std::fs::write(
        &needs,
        wat("(component (import \"wasi:http/outgoing-handler@0.2.0\" (instance (export \"handle\" (func)))))"),
    )
    .unwrap();
    s.run(&["run", needs.to_str().unwrap()]).expect_code(2).expect_stderr("does not provide");
}

#[test]
fn a_missing_required_param_is_exit_2_naming_it() {
    let s = Scratch::new();
    s.run(&["run", script("arc").to_str().unwrap()]).expect_code(2).expect_stderr("needs parameter path");
    s.run(&["run", script("arc").to_str().unwrap(), "--param", "path=x", "--param", "paht=y"])
        .expect_code(2)
        .expect_stderr("unknown parameter \"paht\"");
}

#[test]
fn a_bad_site_file_is_exit_2_with_file_line_and_key() {
    let s = Scratch::new();
    let site = s.work.join("bad.toml");
    std::fs::write(&site, "store = \"store\"\n\n[limits]\ndeadline = \"soon\"\n").unwrap();
    s.run(&["run", script("arc").to_str().unwrap(), "--site", site.to_str().unwrap()])
        .expect_code(2)
        .expect_stderr("bad.toml:4:")
        .expect_stderr("key `deadline`");
    assert!(!s.work.join("store").exists(), "nothing was created for a bad site");
}

#[test]
fn a_pinned_hash_mismatch_refuses_to_run() {
    let s = Scratch::new();
    let site = s.work.join("pinned.toml");
    std::fs::write(&site, format!("store = \"store\"\nscript_sha256 = \"{}\"\n", "0".repeat(64))).unwrap();
    s.run(&["run", script("noop").to_str().unwrap(), "--site", site.to_str().unwrap()])
        .expect_code(2)
        .expect_stderr("refusing to run");
}

#[test]
fn usage_errors_are_exit_2() {
    let s = Scratch::new();
    s.run(&["run"]).expect_code(2);
    s.run(&["frobnicate"]).expect_code(2);
    s.run(&["run", script("noop").to_str().unwrap(), "--now", "yesterday"]).expect_code(2).expect_stderr("--now");
    s.run(&["run", script("noop").to_str().unwrap(), "--param", "novalue"]).expect_code(2).expect_stderr("KEY=VALUE");
}
