//! The `ssh` and `scp` capabilities end to end: the real `offsite` binary
//! runs the `probe` script against real OpenSSH `sshd`s on 127.0.0.2 and
//! 127.0.0.3, logging into an unprivileged account with the harness's keys.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use offsite_testkit::sshd::Sshd;
use offsite_testkit::{Ran, gunzip, offsite, script, tree};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

/// A site with some hosts, a store and a private HOME.
struct Site {
    dir: tempfile::TempDir,
    hosts: Vec<String>,
    extra: String,
    /// The store is a restic repository (`restic:STORE`, password in `pass`).
    repo: bool,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("home")).unwrap();
        std::fs::write(dir.path().join("ssh_config"), "").unwrap();
        Site { dir, hosts: Vec::new(), extra: String::new(), repo: false }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn store(&self) -> PathBuf {
        self.path("store")
    }

    /// Adds `[hosts.NAME]` for `server` with its key and known_hosts, plus
    /// `grants` (TOML lines).
    fn host(&mut self, name: &str, server: &Sshd, grants: &str) -> &mut Site {
        self.hosts.push(server.host_section(name, grants));
        self
    }

    fn write(&self) -> PathBuf {
        let (restic, repository) = if self.repo {
            ("restic:", format!("[repository]\npassword_file = \"{}\"\n", self.path("pass").display()))
        } else {
            ("", String::new())
        };
        let text = format!(
            "name = \"test\"\nstore = \"{restic}{}\"\nssh_config = \"{}\"\n{repository}{}\n{}",
            self.store().display(),
            self.path("ssh_config").display(),
            self.extra,
            self.hosts.join("\n")
        );
        let file = self.path("site.toml");
        std::fs::write(&file, text).unwrap();
        file
    }

    /// The probe with `params`, ready to run.
    fn probe(&self, params: &[(&str, &str)]) -> Command {
        let site = self.write();
        let mut cmd = offsite(Path::new(BIN));
        cmd.arg("-v").arg("run").arg(script("probe")).arg("--site").arg(&site);
        for (k, v) in params {
            cmd.arg("--param").arg(format!("{k}={v}"));
        }
        cmd.env("HOME", self.path("home")).env_remove("SSH_AUTH_SOCK");
        cmd
    }

    /// Runs the probe with `params`.
    fn run(&self, params: &[(&str, &str)]) -> Ran {
        Ran::from_output(self.probe(params).output().unwrap())
    }

    /// Waits until a transfer is writing a temporary file in the store.
    fn wait_for_temporary_file(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.stored().iter().any(|n| n.starts_with(".offsite-tmp")) {
            assert!(Instant::now() < deadline, "the transfer never started");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until a transfer has written at least `bytes` into its
    /// temporary file in the run's staging directory.
    fn wait_for_staged_bytes(&self, bytes: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        // A large fetch writes in `.offsite/partial`, others in the run's
        // staging directory.
        let staged = || {
            let runs = self.store().join(".offsite/runs");
            let files = if runs.exists() { tree(&runs) } else { Vec::new() };
            let partial = self.partial_files().into_iter().map(|(_, len)| len);
            files
                .iter()
                .filter(|f| f.file_name().unwrap().to_string_lossy().starts_with(".offsite-tmp."))
                .filter_map(|f| std::fs::metadata(runs.join(f)).ok())
                .map(|m| m.len())
                .chain(partial)
                .max()
                .unwrap_or(0)
        };
        while staged() < bytes {
            assert!(Instant::now() < deadline, "the transfer never wrote {bytes} bytes");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The partial copies of large fetches (`.offsite/partial`, not their
    /// notes) and their lengths.
    fn partial_files(&self) -> Vec<(PathBuf, u64)> {
        let dir = self.store().join(".offsite/partial");
        let Ok(rd) = std::fs::read_dir(&dir) else { return Vec::new() };
        rd.filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_none() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .filter_map(|p| std::fs::metadata(&p).ok().map(|m| (p, m.len())))
            .collect()
    }

    /// How many bytes the notes of partial copies say are durable.
    fn partial_noted(&self) -> u64 {
        let dir = self.store().join(".offsite/partial");
        let Ok(rd) = std::fs::read_dir(&dir) else { return 0 };
        rd.filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter_map(|v| v["bytes"].as_u64())
            .max()
            .unwrap_or(0)
    }

    /// Files in the store, and any temporary file left in the store's
    /// staging area (so leftovers show).
    fn stored(&self) -> Vec<String> {
        let mut names: Vec<String> = match std::fs::read_dir(self.store()) {
            Ok(rd) => {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n != ".offsite").collect()
            }
            Err(_) => Vec::new(),
        };
        let runs = self.store().join(".offsite/runs");
        if runs.exists() {
            for f in tree(&runs) {
                let name = f.file_name().unwrap().to_string_lossy().into_owned();
                if name.starts_with(".offsite-tmp.") {
                    names.push(name);
                }
            }
        }
        names.sort();
        names
    }
}

fn argv(parts: &[&str]) -> String {
    parts.join("\u{1f}")
}

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

#[test]
fn exec_returns_status_and_both_streams_with_hostile_arguments_intact() {
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    site.host("server1", &server, "commands = [[\"printf\", \"**...\"], [\"sh\", \"-c\", \"**\"], [\"id\", \"-un\"]]");
    let hostile = ["a b", "it's", "$(id)", "`id`", "x;y|z&&w", "line1\nline2", "$HOME", "*", "\\"];
    let mut cmd = vec!["printf", "[%s]"];
    cmd.extend(hostile);
    let ran = site.run(&[("op", "exec"), ("argv", &argv(&cmd))]);
    ran.expect_code(0);
    let expected: String = hostile.iter().map(|a| format!("[{a}]")).collect();
    assert!(ran.stderr.contains(&format!("stdout={expected:?}")), "{}", ran.stderr);
    assert!(ran.stderr.contains("status=0"), "{}", ran.stderr);

    let ran = site.run(&[("op", "exec"), ("argv", &argv(&["sh", "-c", "echo out; echo err >&2; exit 7"]))]);
    ran.expect_code(0);
    for want in ["status=7", "stdout=\"out\\n\"", "stderr=\"err\\n\""] {
        assert!(ran.stderr.contains(want), "missing {want}: {}", ran.stderr);
    }

    // The dedicated, unprivileged login account.
    let ran = site.run(&[("op", "exec"), ("argv", &argv(&["id", "-un"]))]);
    ran.expect_code(0);
    assert!(ran.stderr.contains(&format!("stdout={:?}", format!("{}\n", server.user))), "{}", ran.stderr);
}

#[test]
fn exec_output_over_the_cap_is_a_limit_error() {
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    site.extra = "[limits]\ncaptured_output = \"64KiB\"\n".into();
    site.host("server1", &server, "commands = [[\"head\", \"-c\", \"*\", \"/dev/zero\"]]");
    let ran = site.run(&[("op", "exec"), ("argv", &argv(&["head", "-c", "1000000", "/dev/zero"]))]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("limit exceeded") && ran.stderr.contains("exec-to-file"), "{}", ran.stderr);
}

#[test]
fn exec_to_file_streams_stdout_only_through_gzip() {
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    site.host("server1", &server, "commands = [[\"sh\", \"-c\", \"**\"]]");
    let ran = site.run(&[
        ("op", "stream"),
        ("argv", &argv(&["sh", "-c", "echo noise >&2; seq 1 200000; echo more noise >&2"])),
        ("dest", "seq.txt.gz"),
        ("gzip", "true"),
    ]);
    ran.expect_code(0);
    let data = gunzip(&site.store().join("seq.txt.gz"));
    let expected: String = (1..=200000).map(|i| format!("{i}\n")).collect();
    assert!(data == expected.as_bytes(), "stdout arrived intact and without stderr");
    assert!(ran.stderr.contains("stderr: noise") && ran.stderr.contains("stderr: more noise"), "{}", ran.stderr);
    let reported = ran.stderr.lines().find_map(|l| l.split("sha256=").nth(1)).unwrap().trim().to_string();
    assert_eq!(reported, sha256sum(&site.store().join("seq.txt.gz")));
    assert_eq!(site.stored(), ["seq.txt.gz"]);
}

/// Into a restic repository store: a stream and a fetch over real sshd go
/// into the repository (the gzip asked for stored as plain text, which the
/// repository compresses), and restic gives back the bytes; a command that
/// fails half way makes no snapshot, and the repository stays sound.
#[test]
fn streams_and_fetches_go_into_a_repository_store() {
    let server = Sshd::start("127.0.0.2");
    let files = server.files();
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(files.join("db.tgz"), &data).unwrap();
    let mut site = Site::new();
    site.repo = true;
    std::fs::write(site.path("pass"), "sshd repo password\n").unwrap();
    std::fs::set_permissions(site.path("pass"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    site.host(
        "server1",
        &server,
        &format!("commands = [[\"sh\", \"-c\", \"**\"]]\nfetch = [\"{}/*.tgz\"]", files.display()),
    );
    let restic = |args: &[&str]| {
        let out = Command::new("restic")
            .arg("-r")
            .arg(site.store())
            .arg("--no-cache")
            .args(args)
            .env("RESTIC_PASSWORD_FILE", site.path("pass"))
            .output()
            .unwrap();
        assert!(out.status.success(), "restic {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let seq = &argv(&["sh", "-c", "seq 1 200000"]);
    site.run(&[("op", "stream"), ("argv", seq), ("dest", "seq.txt.gz"), ("gzip", "true")]).expect_code(0);
    let expected: String = (1..=200000).map(|i| format!("{i}\n")).collect();
    assert!(restic(&["dump", "latest", "/seq.txt"]) == expected.as_bytes(), "the stream, stored as plain text");
    let remote = format!("{}/db.tgz", files.display());
    site.run(&[("op", "fetch"), ("path", &remote), ("dest", "server1/db.tgz")]).expect_code(0);
    assert!(restic(&["dump", "latest", "/server1/db.tgz"]) == data, "the fetched file");

    let failing = &argv(&["sh", "-c", "seq 1 100000; exit 3"]);
    let ran = site.run(&[("op", "stream"), ("argv", failing), ("dest", "dump.sql")]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("exit status 3"), "{}", ran.stderr);
    let snaps: Vec<serde_json::Value> = serde_json::from_slice(&restic(&["snapshots", "--json"])).unwrap();
    assert_eq!(snaps.len(), 2, "the failed run made a snapshot: {snaps:?}");
    restic(&["check", "--read-data"]);
}

#[test]
fn failures_after_partial_output_store_nothing_and_keep_the_old_file() {
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    site.host("server1", &server, "commands = [[\"sh\", \"-c\", \"**\"]]");
    std::fs::create_dir_all(site.store()).unwrap();
    std::fs::write(site.store().join("dump.sql"), "GOOD OLD BACKUP").unwrap();
    let cases = [
        ("seq 1 100000; echo failing >&2; exit 3", "exit status 3"),
        // $PPID is the login shell sshd started: the session itself dies.
        ("seq 1 100000; kill -9 $PPID", "killed by signal"),
        ("seq 1 100000; kill -TERM $PPID", "killed by signal"),
        // A command killed under the login shell: the shell reports 128+9.
        ("seq 1 100000; kill -9 $$", "exit status 137"),
        ("seq 1 100000", "does not end with"),
    ];
    for (command, reason) in cases {
        let ran = site.run(&[
            ("op", "stream"),
            ("argv", &argv(&["sh", "-c", command])),
            ("dest", "dump.sql"),
            ("tail", "-- Dump completed"),
        ]);
        ran.expect_code(1);
        assert!(ran.stderr.contains(reason), "{command}: expected {reason:?} in\n{}", ran.stderr);
        assert!(ran.stderr.contains("remote command failed"), "{}", ran.stderr);
        assert_eq!(std::fs::read_to_string(site.store().join("dump.sql")).unwrap(), "GOOD OLD BACKUP");
        assert_eq!(site.stored(), ["dump.sql"], "no temporary file is left behind");
    }
    let ran = site.run(&[
        ("op", "stream"),
        ("argv", &argv(&["sh", "-c", "echo data; echo '-- Dump completed on 2026-11-26 21:00:00'"])),
        ("dest", "dump.sql"),
        ("tail", "-- Dump completed"),
    ]);
    ran.expect_code(0);
    assert!(std::fs::read_to_string(site.store().join("dump.sql")).unwrap().starts_with("data\n"));
}

#[test]
fn fetch_copies_a_file_exactly_and_refuses_paths_outside_the_grant() {
    let server = Sshd::start("127.0.0.2");
    let files = server.files();
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(files.join("db.tgz"), &data).unwrap();
    std::fs::write(files.join("secret.key"), "no").unwrap();
    let mut site = Site::new();
    site.host("server1", &server, &format!("fetch = [\"{}/*.tgz\"]", files.display()));
    let remote = format!("{}/db.tgz", files.display());
    let ran = site.run(&[("op", "fetch"), ("path", &remote), ("dest", "server1/db.tgz")]);
    ran.expect_code(0);
    let stored = site.store().join("server1/db.tgz");
    assert!(std::fs::read(&stored).unwrap() == data);
    assert!(ran.stderr.contains(&format!("bytes={} sha256={}", data.len(), sha256sum(&stored))), "{}", ran.stderr);

    let denied = [
        format!("{}/secret.key", files.display()),
        format!("{}/../files/db.tgz", files.display()),
        "db.tgz".to_string(),
    ];
    for path in denied {
        let ran = site.run(&[("op", "fetch"), ("path", &path), ("dest", "x")]);
        ran.expect_code(1);
        assert!(ran.stderr.contains("denied"), "{path}: {}", ran.stderr);
    }
    let ran = site.run(&[("op", "fetch"), ("path", &format!("{}/missing.tgz", files.display())), ("dest", "x")]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("not found") && ran.stderr.contains("No such file"), "{}", ran.stderr);
    assert!(!site.store().join("x").exists());
}

#[test]
fn hosts_and_commands_outside_the_grants_are_denied_before_connecting() {
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    site.host("server1", &server, "commands = [[\"echo\", \"hello\"]]");
    for (host, cmd, why) in [
        ("server9", vec!["echo", "hello"], "not granted to this site"),
        ("server1", vec!["cat", "/etc/shadow"], "program \"cat\" is not granted"),
        ("server1", vec!["echo", "hello", "; rm -rf /"], "match no granted pattern"),
    ] {
        let ran = site.run(&[("op", "exec"), ("host", host), ("argv", &argv(&cmd))]);
        ran.expect_code(1);
        assert!(ran.stderr.contains("denied") && ran.stderr.contains(why), "{cmd:?}: {}", ran.stderr);
    }
    assert!(!server.log().contains("Accepted publickey"), "no connection was made:\n{}", server.log());
}

#[test]
fn an_unknown_host_key_fails_with_the_line_to_add_and_known_hosts_is_untouched() {
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    site.host("server1", &server, "commands = [[\"true\"]]");
    std::fs::write(server.known_hosts(), "").unwrap();
    let ran = site.run(&[("op", "exec"), ("argv", "true")]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("host key is not known"), "{}", ran.stderr);
    assert!(ran.stderr.contains(&server.host_fingerprint()), "fingerprint shown: {}", ran.stderr);
    assert!(ran.stderr.contains(&server.known_hosts_line), "exact line shown: {}", ran.stderr);
    assert_eq!(std::fs::read_to_string(server.known_hosts()).unwrap(), "", "never written");
}

#[test]
fn a_changed_or_unpinned_host_key_is_refused_loudly() {
    let server1 = Sshd::start("127.0.0.2");
    let server2 = Sshd::start("127.0.0.3");
    let mut site = Site::new();
    site.host("server1", &server1, "commands = [[\"true\"]]");
    // server1's address with server2's key: what a man in the middle looks like.
    let forged = format!("{} {}\n", server1.known_hosts_line.split(' ').next().unwrap(), server2.host_key());
    std::fs::write(server1.known_hosts(), &forged).unwrap();
    let ran = site.run(&[("op", "exec"), ("argv", "true")]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("HOST KEY HAS CHANGED"), "{}", ran.stderr);
    assert!(ran.stderr.contains(&server1.host_fingerprint()), "{}", ran.stderr);
    assert_eq!(std::fs::read_to_string(server1.known_hosts()).unwrap(), forged, "never written");

    // A pin that does not match refuses even a key known_hosts accepts.
    std::fs::write(server1.known_hosts(), format!("{}\n", server1.known_hosts_line)).unwrap();
    let mut pinned = Site::new();
    let pin = format!("host_key = \"{}\"\ncommands = [[\"true\"]]", server2.host_fingerprint());
    pinned.host("server1", &server1, &pin);
    let ran = pinned.run(&[("op", "exec"), ("argv", "true")]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("pins host_key"), "{}", ran.stderr);
    let mut pinned = Site::new();
    let pin = format!("host_key = \"{}\"\ncommands = [[\"true\"]]", server1.host_fingerprint());
    pinned.host("server1", &server1, &pin);
    pinned.run(&[("op", "exec"), ("argv", "true")]).expect_code(0);
}

#[test]
fn a_wrong_or_exposed_key_is_refused() {
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    site.host("server1", &server, "commands = [[\"true\"]]");
    let key = site.path("home/id_other");
    let status = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).status().unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(site.write()).unwrap();
    std::fs::write(
        site.path("site.toml"),
        text.replace(&server.client_key().display().to_string(), &key.display().to_string()),
    )
    .unwrap();
    let mut cmd = offsite(Path::new(BIN));
    cmd.args(["run"]).arg(script("probe")).arg("--site").arg(site.path("site.toml"));
    cmd.args(["--param", "op=exec", "--param", "argv=true"]).env("HOME", site.path("home")).env_remove("SSH_AUTH_SOCK");
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(1);
    assert!(ran.stderr.contains("authentication failed"), "{}", ran.stderr);

    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(1);
    assert!(ran.stderr.contains("mode 0644") && ran.stderr.contains("chmod 600"), "{}", ran.stderr);
}

#[test]
fn a_silent_port_and_a_closed_port_fail_within_the_timeout() {
    let server = Sshd::start("127.0.0.2");
    let silent = TcpListener::bind("127.0.0.2:0").unwrap();
    let mut site = Site::new();
    // One attempt: retries have a test of their own.
    site.host("server1", &server, "retries = 0\ncommands = [[\"true\"]]");
    let text = std::fs::read_to_string(site.write()).unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::fs::write(
        site.path("site.toml"),
        text.replace(&format!("port = {}", server.addr.port()), &format!("port = {silent_port}")),
    )
    .unwrap();
    let mut cmd = offsite(Path::new(BIN));
    cmd.args(["run"]).arg(script("probe")).arg("--site").arg(site.path("site.toml"));
    cmd.args(["--param", "op=exec", "--param", "argv=true"]).env("HOME", site.path("home"));
    let started = Instant::now();
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(1);
    assert!(ran.stderr.contains("timed out"), "{}", ran.stderr);
    // connect_timeout is 3 s; generous slack for a loaded machine.
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    drop(silent);

    let closed = TcpListener::bind("127.0.0.2:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        site.path("site.toml"),
        text.replace(&format!("port = {}", server.addr.port()), &format!("port = {closed}")),
    )
    .unwrap();
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(1);
    assert!(ran.stderr.contains("Connection refused"), "{}", ran.stderr);
}

#[test]
fn sshd_dying_mid_transfer_stores_nothing() {
    let mut server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    site.host("server1", &server, "commands = [[\"sh\", \"-c\", \"**\"]]");
    let slow = argv(&["sh", "-c", "head -c 50000000 /dev/zero; sleep 60"]);
    let mut cmd = site.probe(&[("op", "stream"), ("dest", "big.bin"), ("argv", &slow)]);
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Wait until data is flowing into a temporary file, then kill sshd.
    site.wait_for_temporary_file();
    server.kill_all();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("remote command failed"), "{stderr}");
    assert!(site.stored().is_empty(), "nothing stored, no temporary file left: {:?}", site.stored());
}

#[test]
fn a_runner_killed_mid_fetch_leaves_only_complete_files_and_the_next_run_cleans_up() {
    let server = Sshd::start("127.0.0.2");
    let files = server.files();
    std::fs::write(files.join("small.bin"), "small and complete").unwrap();
    // Sparse: cheap to make, and long enough to be caught in the middle.
    let big = std::fs::File::create(files.join("big.bin")).unwrap();
    big.set_len(8 << 30).unwrap();
    let mut site = Site::new();
    site.host("server1", &server, &format!("fetch = [\"{}/*.bin\"]", files.display()));
    let small = format!("{}/small.bin", files.display());
    site.run(&[("op", "fetch"), ("path", &small), ("dest", "good.bin")]).expect_code(0);

    let big = format!("{}/big.bin", files.display());
    let mut cmd = site.probe(&[("op", "fetch"), ("dest", "big.bin"), ("path", &big)]);
    let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    // A large fetch writes in `.offsite/partial`, never where a backup is.
    site.wait_for_staged_bytes(1);
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let stored = site.stored();
    assert_eq!(stored, vec!["good.bin"]);
    assert_eq!(site.partial_files().len(), 1, "killed: what it fetched waits for the next run");

    // The next run takes over and records the killed run; the good backup
    // is untouched, and the partial copy waits for a fetch of big.bin.
    let ran = site.run(&[("op", "fetch"), ("path", &small), ("dest", "again.bin")]);
    ran.expect_code(0);
    assert!(ran.stderr.contains("took over the store's lock"), "{}", ran.stderr);
    assert!(ran.stderr.contains("was interrupted before storing anything"), "{}", ran.stderr);
    assert_eq!(site.stored(), vec!["again.bin", "good.bin"]);
    assert!(tree(&site.store().join(".offsite/runs")).is_empty());
    assert_eq!(site.partial_files().len(), 1);
    assert_eq!(std::fs::read(site.store().join("good.bin")).unwrap(), b"small and complete");
    let verify = offsite(Path::new(BIN)).arg("verify").arg(site.write()).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}

#[test]
fn background_transfers_to_two_hosts_overlap_and_share_one_connection_each() {
    let server1 = Sshd::start("127.0.0.2");
    let server2 = Sshd::start("127.0.0.3");
    let mut site = Site::new();
    let grant = "commands = [[\"sh\", \"-c\", \"**\"]]";
    site.host("server1", &server1, grant).host("server2", &server2, grant);
    // Each command prints when it started and ended.
    let timed = argv(&["sh", "-c", "date +%s.%N; sleep 1; date +%s.%N"]);
    let run = |site: &Site| {
        site.run(&[("op", "parallel-stream"), ("hosts", "server1,server2,server1"), ("argv", &timed), ("dest", "t")])
            .expect_code(0);
        let spans: Vec<(f64, f64)> = ["server1-t", "server2-t"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(site.store().join(f)).unwrap();
                let v: Vec<f64> = text.lines().map(|l| l.parse().unwrap()).collect();
                (v[0], v[1])
            })
            .collect();
        spans[0].0 < spans[1].1 && spans[1].0 < spans[0].1
    };
    assert!(run(&site), "with parallel = 4 (the default) the two hosts overlap");
    assert_eq!(server1.log().matches("Accepted publickey").count(), 1, "one connection for two sessions");
    site.extra = "[limits]\nparallel = 1\n".into();
    assert!(!run(&site), "with parallel = 1 they do not");
}

#[test]
fn a_failed_background_transfer_the_script_never_waited_for_fails_the_run() {
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    site.host("server1", &server, "commands = [[\"sh\", \"-c\", \"**\"]]");
    let ran = site.run(&[("op", "unwaited"), ("argv", &argv(&["sh", "-c", "echo x; exit 2"])), ("dest", "u")]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("never waited") && ran.stderr.contains("exit status 2"), "{}", ran.stderr);
    assert!(site.stored().is_empty());
}

#[test]
fn agent_from_keychain_file_and_passphrase_keys_work_without_prompting() {
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    // A passphrase-protected copy of the authorized key.
    let key = passphrase_copy(&server.client_key(), &site.path("home/id_pass"), "correct horse");
    std::fs::write(site.path("home/pass"), "correct horse\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(site.path("home/pass"), std::fs::Permissions::from_mode(0o600)).unwrap();
    site.host("server1", &server, "commands = [[\"true\"]]");
    let text = std::fs::read_to_string(site.write()).unwrap().replace(
        &format!("identity = \"{}\"", server.client_key().display()),
        &format!("identity = \"{}\"\npassphrase_file = \"{}\"", key.display(), site.path("home/pass").display()),
    );
    std::fs::write(site.path("site.toml"), &text).unwrap();
    let mut cmd = offsite(Path::new(BIN));
    cmd.arg("run").arg(script("probe")).arg("--site").arg(site.path("site.toml"));
    cmd.args(["--param", "op=exec", "--param", "argv=true"]).env("HOME", site.path("home")).env_remove("SSH_AUTH_SOCK");
    Ran::from_output(cmd.output().unwrap()).expect_code(0);
    assert!(!text.contains("correct horse"));

    // The same key held by an agent that only keychain's file names (cron).
    let sock = site.path("home/agent.sock");
    let agent = Command::new("ssh-agent").arg("-D").arg("-a").arg(&sock).stdout(std::process::Stdio::null()).spawn();
    let mut agent = agent.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "ssh-agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let added = Command::new("ssh-add").arg(server.client_key()).env("SSH_AUTH_SOCK", &sock).output().unwrap();
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    std::fs::create_dir(site.path("home/.keychain")).unwrap();
    let hostname = String::from_utf8(Command::new("uname").arg("-n").output().unwrap().stdout).unwrap();
    std::fs::write(
        site.path(&format!("home/.keychain/{}-sh", hostname.trim())),
        format!(
            "SSH_AUTH_SOCK={}; export SSH_AUTH_SOCK;\nSSH_AGENT_PID={}; export SSH_AGENT_PID;\n",
            sock.display(),
            agent.id()
        ),
    )
    .unwrap();
    let no_identity: String = text
        .lines()
        .filter(|l| !l.starts_with("identity") && !l.starts_with("passphrase"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(site.path("site.toml"), no_identity).unwrap();
    let ran = Ran::from_output(cmd.output().unwrap());
    let _ = agent.kill();
    let _ = agent.wait();
    ran.expect_code(0);
}

#[test]
fn ssh_config_aliases_supply_address_port_user_key_and_known_hosts() {
    let server = Sshd::start("127.0.0.2");
    let site = Site::new();
    std::fs::write(
        site.path("ssh_config"),
        format!(
            "Host db1\n  HostName {}\n  Port {}\n  User {}\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n",
            server.addr.ip(),
            server.addr.port(),
            server.user,
            server.client_key().display(),
            server.known_hosts().display()
        ),
    )
    .unwrap();
    // The site names only the alias; everything else comes from ssh_config.
    std::fs::write(
        site.path("site.toml"),
        format!(
            "store = \"{}\"\nssh_config = \"{}\"\n[hosts.server1]\naddress = \"db1\"\ncommands = [[\"id\", \"-un\"]]\n",
            site.store().display(),
            site.path("ssh_config").display()
        ),
    )
    .unwrap();
    let mut cmd = offsite(Path::new(BIN));
    cmd.args(["-v", "run"]).arg(script("probe")).arg("--site").arg(site.path("site.toml"));
    cmd.args(["--param", "op=exec", "--param"]).arg(format!("argv={}", argv(&["id", "-un"])));
    cmd.env("HOME", site.path("home")).env_remove("SSH_AUTH_SOCK");
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(0);
    assert!(ran.stderr.contains(&format!("stdout={:?}", format!("{}\n", server.user))), "{}", ran.stderr);
}

#[test]
fn a_dry_run_connects_and_checks_but_runs_and_stores_nothing() {
    let server = Sshd::start("127.0.0.2");
    let marker = server.files().join("ran");
    let mut site = Site::new();
    site.host("server1", &server, "commands = [[\"touch\", \"**\"]]");
    let site_file = site.write();
    let mut cmd = offsite(Path::new(BIN));
    cmd.args(["run", "--dry-run"]).arg(script("probe")).arg("--site").arg(&site_file);
    cmd.args(["--param", "op=stream", "--param", "dest=x"])
        .arg("--param")
        .arg(format!("argv=touch\u{1f}{}", marker.display()));
    cmd.env("HOME", site.path("home"));
    Ran::from_output(cmd.output().unwrap()).expect_code(0);
    assert!(!marker.exists(), "the remote command did not run");
    assert!(site.stored().is_empty());
    assert_eq!(server.log().matches("Accepted publickey").count(), 1, "but it did connect and authenticate");

    // And a host that cannot be reached fails the dry run.
    std::fs::write(server.known_hosts(), "").unwrap();
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(1);
    assert!(ran.stderr.contains("host key is not known"), "{}", ran.stderr);
}

#[test]
fn per_run_byte_and_file_limits_stop_a_run_without_storing_the_excess() {
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    site.extra = "[limits]\nmax_bytes = \"100KiB\"\nmax_files = 2\n".into();
    site.host("server1", &server, "commands = [[\"sh\", \"-c\", \"**\"]]");
    let ran = site.run(&[("op", "stream"), ("argv", &argv(&["sh", "-c", "seq 1 200000"])), ("dest", "big.txt")]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("limit exceeded") && ran.stderr.contains("max_bytes"), "{}", ran.stderr);
    assert!(site.stored().is_empty(), "{:?}", site.stored());

    // Three small files: the third is refused, the first two stand.
    let ran = site.run(&[
        ("op", "parallel-stream"),
        ("hosts", "server1,server1,server1"),
        ("argv", &argv(&["sh", "-c", "echo small"])),
        ("dest", "s"),
    ]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("max_files"), "{}", ran.stderr);
}

/// Waits for `started` to appear (the remote command is running), reads
/// every process's command line once, then creates `scanned` to let the
/// command finish. Returns the command lines that contained `needle`.
fn scan_cmdlines_during(
    needle: &'static str,
    started: PathBuf,
    scanned: PathBuf,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !started.exists() {
            assert!(Instant::now() < deadline, "the remote command never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut seen = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
                let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if text.contains(needle) {
                    seen.push(text);
                }
            }
        }
        std::fs::write(&scanned, "").unwrap();
        seen
    })
}

#[test]
fn secrets_reach_the_remote_only_on_stdin_and_appear_nowhere_else() {
    const SECRET: &str = "s3cr3t-Value-42";
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    let token = site.path("home/token");
    std::fs::write(&token, format!("{SECRET}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    site.extra = format!(
        "[secrets]\ntoken = {{ file = \"{}\", stdin = \"[client]\\npassword={{secret}}\\n\", programs = [\"sh\"] }}\n",
        token.display()
    );
    site.host("server1", &server, "commands = [[\"sh\", \"-c\", \"**\"]]");
    let audit = site.path("audit.jsonl");
    let (started, scanned) = (server.files().join("started"), server.files().join("scanned"));
    // The remote side says it runs, then waits until the scan is done.
    let gate = format!("touch {}; until [ -e {} ]; do sleep 0.02; done", started.display(), scanned.display());
    let run = |command: &str, secret: &str| {
        let _ = std::fs::remove_file(&started);
        let _ = std::fs::remove_file(&scanned);
        let site_file = site.write();
        let mut cmd = offsite(Path::new(BIN));
        cmd.args(["-vv", "run", "--json", "--audit"]).arg(&audit).arg(script("probe")).arg("--site").arg(&site_file);
        cmd.args(["--param", "op=stream-secret", "--param", "dest=out.cnf"]);
        cmd.arg("--param").arg(format!("secret={secret}"));
        cmd.arg("--param").arg(format!("argv={}", argv(&["sh", "-c", command])));
        cmd.env("HOME", site.path("home")).env_remove("SSH_AUTH_SOCK");
        let watcher = (secret == "token" && command.contains("until"))
            .then(|| scan_cmdlines_during(SECRET, started.clone(), scanned.clone()));
        let ran = Ran::from_output(cmd.output().unwrap());
        if let Some(watcher) = watcher {
            let seen = watcher.join().unwrap();
            assert!(seen.is_empty(), "the secret was in a command line: {seen:?}");
        }
        for (what, text) in [("stdout", &ran.stdout), ("stderr", &ran.stderr)] {
            assert!(!text.contains(SECRET), "the secret leaked into {what}:\n{text}");
        }
        ran
    };
    // Delivered: the remote command read it from stdin (and is slow enough
    // for the watcher to look at every process meanwhile).
    let ran = run(&format!("cat; {gate}"), "token");
    ran.expect_code(0);
    assert!(ran.stdout.contains("\"status\":\"ok\""), "{}", ran.stdout);
    assert!(ran.stderr.contains("secret name=token"), "{}", ran.stderr);
    assert_eq!(
        std::fs::read_to_string(site.store().join("out.cnf")).unwrap(),
        format!("[client]\npassword={SECRET}\n")
    );

    // A failing command that echoes it to stderr: the error is masked.
    let ran = run(&format!("cat >&2; {gate}; exit 3"), "token");
    ran.expect_code(1);
    assert!(ran.stderr.contains("exit status 3") && ran.stderr.contains("password=***"), "{}", ran.stderr);

    // An undeclared secret is denied.
    let ran = run("cat", "other");
    ran.expect_code(1);
    assert!(ran.stderr.contains("denied") && ran.stderr.contains("not declared under [secrets]"), "{}", ran.stderr);
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(!log.contains(SECRET), "{log}");
    assert!(log.contains("\"interface\":\"secrets\""), "{log}");

    // A secret file others can read is refused, without showing its value.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ran = run("cat", "token");
    ran.expect_code(1);
    assert!(ran.stderr.contains("mode 0644"), "{}", ran.stderr);
}

/// A failed remote command's stderr reaches cron mail once, in the error:
/// not again as separate warning lines.
#[test]
fn a_failed_commands_stderr_is_reported_once() {
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    site.host("server1", &server, "commands = [[\"sh\", \"-c\", \"**\"]]");
    let ran =
        site.run(&[("op", "stream"), ("argv", &argv(&["sh", "-c", "x=boom; echo $x-7 >&2; exit 3"])), ("dest", "x")]);
    ran.expect_code(1).expect_stderr("exit status 3");
    // (This run has -v, whose progress lines may repeat it; cron sees only
    // warnings and errors.)
    let loud = ran.stderr.lines().filter(|l| l.contains("warning:") || l.contains("error:"));
    assert_eq!(loud.filter(|l| l.contains("boom-7")).count(), 1, "{}", ran.stderr);
}

/// Agent-only hosts (no `identity`) under cron: with SSH_AUTH_SOCK unset,
/// or naming a socket nobody answers on, the error says this side had no
/// key and where the agent was looked for, instead of blaming the server.
#[test]
fn no_agent_is_reported_on_this_side_with_where_it_was_looked_for() {
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    let section = server.host_section("server1", "commands = [[\"true\"]]");
    let without_identity: String =
        section.lines().filter(|l| !l.starts_with("identity")).map(|l| format!("{l}\n")).collect();
    site.hosts.push(without_identity);
    let ran = site.run(&[("op", "exec"), ("argv", "true")]);
    ran.expect_code(1);
    for want in ["this side had no key to offer", "SSH_AUTH_SOCK: not set", ".keychain/", "no such file"] {
        assert!(ran.stderr.contains(want), "missing {want:?}: {}", ran.stderr);
    }
    let dead = site.path("dead.sock");
    let mut cmd = site.probe(&[("op", "exec"), ("argv", "true")]);
    let ran = Ran::from_output(cmd.env("SSH_AUTH_SOCK", &dead).output().unwrap());
    ran.expect_code(1);
    assert!(ran.stderr.contains(&format!("SSH_AUTH_SOCK={}: no such socket", dead.display())), "{}", ran.stderr);

    // An `identity` with a passphrase and no agent to open it: also this
    // side's fault, never "the server refused every key".
    let key = passphrase_copy(&server.client_key(), &site.path("home/id_pass"), "correct horse");
    site.hosts.clear();
    site.hosts.push(format!("{section}\n").replace(
        &format!("identity = \"{}\"", server.client_key().display()),
        &format!("identity = \"{}\"", key.display()),
    ));
    let ran = site.run(&[("op", "exec"), ("argv", "true")]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("this side could not use its key"), "{}", ran.stderr);
    assert!(ran.stderr.contains("has a passphrase and no ssh-agent was found"), "{}", ran.stderr);
    assert!(!ran.stderr.contains("refused every key"), "{}", ran.stderr);
}

/// The clients stay in the run's session (one scheduler autogroup: the run
/// competes for CPU as one job, and a stream is not slowed by its own
/// client being weighed against it), in a process group of their own (a
/// Ctrl-C at the terminal goes to the runner, which stops in order), and
/// without the terminal (nothing can prompt). Checked from inside each
/// `ssh` the runner starts, under a pseudo-terminal.
#[test]
fn ssh_clients_share_the_runs_session_but_not_its_terminal_or_process_group() {
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    site.host("server1", &server, "commands = [[\"echo\", \"**\"]]");
    let site_file = site.write();
    let real_ssh = String::from_utf8(Command::new("sh").args(["-c", "command -v ssh"]).output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let wrap = site.path("wrap");
    std::fs::create_dir(&wrap).unwrap();
    let log = site.path("wrap.log");
    // Fields 5-7 of /proc/PID/stat: process group, session, tty.
    let wrapper = format!(
        "#!/bin/sh\n\
         read -r _ _ _ _ pgrp sid tty _ < /proc/$$/stat\n\
         read -r _ _ _ _ ppgrp psid ptty _ < /proc/$PPID/stat\n\
         case \"$*\" in *ControlPath=*) echo \"$pgrp $sid $tty $ppgrp $psid $ptty\" >> {log} ;; esac\n\
         exec {real_ssh} \"$@\"\n",
        log = log.display()
    );
    let ssh = wrap.join("ssh");
    std::fs::write(&ssh, wrapper).unwrap();
    std::process::Command::new("chmod").arg("755").arg(&ssh).status().unwrap();
    let line = format!(
        "{BIN} run {} --site {} --param op=exec --param host=server1 --param argv=echo\u{1f}hi",
        script("probe").display(),
        site_file.display()
    );
    let out = Command::new("script")
        .args(["-qfec", &line, "/dev/null"])
        .env("PATH", format!("{}:{}", wrap.display(), std::env::var("PATH").unwrap()))
        .env("HOME", site.path("home"))
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    let seen = std::fs::read_to_string(&log).unwrap();
    let rows: Vec<Vec<i64>> =
        seen.lines().map(|l| l.split_whitespace().map(|f| f.parse().unwrap()).collect()).collect();
    assert!(rows.len() >= 2, "a master and a session were started: {seen}");
    for row in rows {
        let [pgrp, sid, tty, runner_pgrp, runner_sid, runner_tty] = row[..] else { panic!("{seen}") };
        assert_ne!(runner_tty, 0, "the runner has the terminal: {seen}");
        assert_eq!(sid, runner_sid, "the client is in the run's session: {seen}");
        assert_ne!(pgrp, runner_pgrp, "the client has a process group of its own: {seen}");
        assert_eq!(tty, 0, "the client has no controlling terminal: {seen}");
    }
}

/// A copy of the private key `key` at `to`, locked with `passphrase`.
fn passphrase_copy(key: &Path, to: &Path, passphrase: &str) -> PathBuf {
    std::fs::copy(key, to).unwrap();
    let status =
        Command::new("ssh-keygen").args(["-q", "-p", "-P", "", "-N", passphrase, "-f"]).arg(to).status().unwrap();
    assert!(status.success(), "ssh-keygen -p {}", to.display());
    to.to_path_buf()
}

/// Over a simulated WAN (40 ms, 100 Mbit/s; `offsite_testkit::wan`): a
/// fetch stores the file whole, and a link that goes dead mid-fetch fails
/// the run within the host's timeouts, with nothing of that file in the
/// store and the earlier file untouched.
#[test]
fn over_a_wan_a_fetch_is_whole_and_a_dead_link_fails_within_the_timeouts_storing_nothing() {
    let link = offsite_testkit::wan::WanLink::start(Duration::from_millis(40), 100);
    let server = Sshd::start_behind(&link);
    let mut site = Site::new();
    site.host("far", &server, &format!("fetch = [\"{}/**\"]", server.files().display()));
    let (small, big) = (server.files().join("small.bin"), server.files().join("big.bin"));
    let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&small, pattern.repeat(4)).unwrap();
    std::fs::write(&big, pattern.repeat(96)).unwrap();

    let started = Instant::now();
    let ran = site.run(&[("op", "fetch"), ("host", "far"), ("path", small.to_str().unwrap()), ("dest", "small.bin")]);
    ran.expect_code(0);
    assert_eq!(sha256sum(&site.store().join("small.bin")), sha256sum(&small));
    // A round trip is really 40 ms: connecting alone takes several.
    assert!(started.elapsed() > Duration::from_millis(200), "{:?}", started.elapsed());

    let mut cmd = site.probe(&[("op", "fetch"), ("host", "far"), ("path", big.to_str().unwrap()), ("dest", "big.bin")]);
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    site.wait_for_staged_bytes(8 << 20);
    link.cut(Duration::from_secs(120));
    let cut = Instant::now();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    // connect_timeout = 3s: keepalives every second, three missed.
    assert!(cut.elapsed() < Duration::from_secs(30), "the dead link was noticed after {:?}", cut.elapsed());
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("host far: fetching"), "the error names the host and the call: {stderr}");
    assert!(stderr.contains("not responding"), "and says why: {stderr}");
    assert_eq!(site.stored(), ["small.bin"], "{stderr}");
    assert_eq!(sha256sum(&site.store().join("small.bin")), sha256sum(&small));
}

/// `compression = true` turns on OpenSSH's compression for that host: over
/// a 20 Mbit/s link a 40 MiB text dump arrives in far less time than its
/// bytes take on the line, and whole.
#[test]
fn compression_on_a_slow_link_carries_a_text_dump_faster_than_the_line() {
    let mbit = 20;
    let link = offsite_testkit::wan::WanLink::start(Duration::from_millis(20), mbit);
    let server = Sshd::start_behind(&link);
    let mut site = Site::new();
    let grants = format!("compression = true\nfetch = [\"{}/**\"]", server.files().display());
    site.host("far", &server, &grants);
    let dump = server.files().join("sitedb.sql");
    let mut text = String::new();
    let mut i = 0u32;
    while text.len() < 40 << 20 {
        text.push_str(&format!(
            "INSERT INTO tbl_session VALUES ({i},{},'2004-03-21 01:48:44','web{}');\n",
            i % 500,
            i % 7
        ));
        i += 1;
    }
    std::fs::write(&dump, &text.as_bytes()[..40 << 20]).unwrap();
    let on_the_line = Duration::from_secs_f64((40u64 << 20) as f64 * 8.0 / (f64::from(mbit) * 1e6));
    let started = Instant::now();
    let ran = site.run(&[("op", "fetch"), ("host", "far"), ("path", dump.to_str().unwrap()), ("dest", "sitedb.sql")]);
    let took = started.elapsed();
    ran.expect_code(0);
    assert_eq!(sha256sum(&site.store().join("sitedb.sql")), sha256sum(&dump));
    assert!(took < on_the_line / 2, "took {took:?}; uncompressed the line needs {on_the_line:?}");
}

/// `len` bytes in which no 8-byte word repeats, so a range stored at the
/// wrong place, twice or not at all changes the hash.
fn unrepeating(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Over a long fat link (100 ms, 1 Gbit/s) one SSH channel carries about
/// 160 Mbit/s: a large fetch spreads over further connections while they
/// help, through the forced-command gate of `offsite keys authorized-line`
/// (which admits the ranged reads and nothing more), and the stored file
/// is the file.
#[test]
fn over_a_long_link_a_large_fetch_spreads_over_connections_through_the_gate_and_is_whole() {
    let link = offsite_testkit::wan::WanLink::start(Duration::from_millis(100), 1000);
    let server = Sshd::start_behind(&link);
    let mut site = Site::new();
    let big = server.files().join("big.bin");
    site.host("far", &server, &format!("parallel_above = \"8MiB\"\nfetch = [\"{}\"]", big.display()));
    std::fs::write(&big, unrepeating((150 << 20) + 12345)).unwrap();
    let mut keys = offsite(Path::new(BIN));
    keys.args(["keys", "authorized-line"]).arg(site.write()).arg("far");
    let line = Ran::from_output(keys.output().unwrap());
    line.expect_code(0);
    let line = line.stdout.lines().find(|l| !l.starts_with('#')).unwrap().to_string();
    assert!(line.contains("command="), "{line}");
    std::fs::write(server.authorized_keys(), format!("{line}\n")).unwrap();
    let out = server.ssh().arg("cat").arg(&big).output().unwrap();
    assert_eq!(out.status.code(), Some(126), "the key can do nothing else");

    let ran = site.run(&[("op", "fetch"), ("host", "far"), ("path", big.to_str().unwrap()), ("dest", "big.bin")]);
    ran.expect_code(0);
    assert_eq!(sha256sum(&site.store().join("big.bin")), sha256sum(&big));
    let used: usize = ran
        .stderr
        .split(" over ")
        .nth(1)
        .and_then(|r| r.split(" connections").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the fetch used one connection:\n{}", ran.stderr));
    assert!(used >= 2, "{}", ran.stderr);
    assert!(server.log().matches("Accepted publickey").count() >= used, "{}", server.log());
}

/// A file that changes while its ranges are read (written in place, or
/// grown) fails the fetch with the reason, and nothing is stored; the
/// next fetch of the settled file stores it whole.
#[test]
fn a_file_that_changes_during_a_spread_fetch_fails_it_and_nothing_is_stored() {
    // 100 ms and 1 Gbit/s: one stream is held by its window, so it spreads.
    let link = offsite_testkit::wan::WanLink::start(Duration::from_millis(100), 1000);
    let server = Sshd::start_behind(&link);
    let mut site = Site::new();
    let big = server.files().join("big.bin");
    site.host("far", &server, &format!("parallel_above = \"1MiB\"\nfetch = [\"{}\"]", big.display()));
    let data = unrepeating(96 << 20);
    for change in ["in place", "grown"] {
        std::fs::write(&big, &data).unwrap();
        let mut cmd = site.probe(&[("op", "fetch"), ("host", "far"), ("path", big.to_str().unwrap()), ("dest", "b")]);
        let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        site.wait_for_staged_bytes(8 << 20);
        let mut f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
        use std::io::{Seek, Write};
        match change {
            "in place" => f.seek(std::io::SeekFrom::Start(50 << 20)).unwrap(),
            _ => f.seek(std::io::SeekFrom::End(0)).unwrap(),
        };
        f.write_all(b"changed").unwrap();
        drop(f);
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(1), "{change}: {stderr}");
        assert!(stderr.contains("the file changed while it was fetched"), "{change}: {stderr}");
        assert!(site.stored().is_empty(), "{change}: {:?}", site.stored());
        // What was fetched of it is of no use to a later run either.
        assert!(site.partial_files().is_empty(), "{change}: {:?}", site.partial_files());
    }
    let ran = site.run(&[("op", "fetch"), ("host", "far"), ("path", big.to_str().unwrap()), ("dest", "b")]);
    ran.expect_code(0);
    assert_eq!(sha256sum(&site.store().join("b")), sha256sum(&big));
}

/// Puts a fault in the server's `dd` (the ranged reads) and `head` (the
/// one stream): the account's key gets a forced command that runs what it
/// was asked with a PATH where both are shell scripts. `dd` misbehaves
/// with `fault` (shell) on its `nth` call, otherwise reads as usual.
/// `head` sends only `head_bytes` of the file (`None`: all of it), so
/// that a fetch goes on in ranges even over loopback.
fn fault_in_ranges(server: &Sshd, nth: u32, fault: &str, head_bytes: Option<u64>) {
    let bin = server.files().join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    // The login account counts the calls in it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o777)).unwrap();
    let count = bin.join("count");
    let dd = format!(
        "#!/bin/sh\nn=$(( $(cat {c} 2>/dev/null || echo 0) + 1 )); echo $n > {c}\n\
         if [ $n -eq {nth} ]; then {fault}; fi\nexec /bin/dd \"$@\"\n",
        c = count.display()
    );
    let head = match head_bytes {
        Some(n) => format!("#!/bin/sh\nexec /usr/bin/head -c {n}\n"),
        None => "#!/bin/sh\nexec /usr/bin/head \"$@\"\n".to_string(),
    };
    for (name, text) in [("dd", dd), ("head", head)] {
        std::fs::write(bin.join(name), text).unwrap();
        std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let key = std::fs::read_to_string(server.client_key().with_extension("pub")).unwrap();
    let line = format!(
        "command=\"PATH={}:/usr/bin:/bin; export PATH; eval \\\"$SSH_ORIGINAL_COMMAND\\\"\" {}",
        bin.display(),
        key.trim()
    );
    std::fs::write(server.authorized_keys(), format!("{line}\n")).unwrap();
}

/// A streamed command whose connection is lost before it wrote a byte
/// runs again only on a host with `retry_streams = true`, and never one
/// that had written something: a dump that began is not started twice.
#[test]
fn a_stream_lost_before_its_first_byte_runs_again_only_where_the_host_allows() {
    let server = Sshd::start("127.0.0.2");
    let flaky = server.files().join("flaky.sh");
    let count = server.files().join("flaky.count");
    // Its first run kills the server's sshd process of its own connection,
    // `early` before writing anything, `late` after a line.
    let text = format!(
        "#!/bin/sh\nn=$(( $(cat {c} 2>/dev/null || echo 0) + 1 )); echo $n > {c}\n\
         if [ $n -eq 1 ]; then\n  [ \"$1\" = late ] && echo 'first line' && sleep 0.5\n\
         p=$$; while [ \"$p\" -gt 1 ]; do p=$(cut -d' ' -f4 /proc/$p/stat)\n\
         case \"$(cat /proc/$p/comm)\" in sshd*) kill -9 $p; sleep 5; exit 1;; esac; done\nfi\n\
         echo \"dump of run $n\"\n",
        c = count.display()
    );
    std::fs::write(&flaky, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&flaky, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = |allow: bool, when: &str| {
        let _ = std::fs::remove_file(&count);
        let mut site = Site::new();
        let grants = format!("retry_streams = {allow}\ncommands = [[\"{}\", \"*\"]]", flaky.display());
        site.host("a", &server, &grants);
        let mut cmd = site.probe(&[("op", "stream"), ("host", "a"), ("dest", "d.sql")]);
        cmd.arg("--param").arg(format!("argv={}", argv(&[flaky.to_str().unwrap(), when])));
        let ran = Ran::from_output(cmd.output().unwrap());
        let runs = std::fs::read_to_string(&count).unwrap().trim().to_string();
        (ran, runs, site)
    };
    let (ran, runs, _) = run(false, "early");
    ran.expect_code(1);
    assert!(ran.stderr.contains("no exit status received"), "{}", ran.stderr);
    assert_eq!(runs, "1");

    let (ran, runs, site) = run(true, "early");
    ran.expect_code(0);
    assert!(
        ran.stderr.contains("it produced nothing, so it runs again (retry_streams): retry 1 of 3"),
        "{}",
        ran.stderr
    );
    assert_eq!(runs, "2");
    assert_eq!(std::fs::read_to_string(site.store().join("d.sql")).unwrap(), "dump of run 2\n");

    let (ran, runs, site) = run(true, "late");
    ran.expect_code(1);
    assert!(ran.stderr.contains("no exit status received"), "{}", ran.stderr);
    assert_eq!(runs, "1", "{}", ran.stderr);
    assert!(site.stored().is_empty(), "{:?}", site.stored());
}

/// A server that answers one range with a byte too few, or too many,
/// fails the fetch with the reason; nothing is stored, and nothing is kept
/// for a later run.
#[test]
fn a_range_answered_with_the_wrong_length_fails_the_fetch_and_nothing_is_kept() {
    let server = Sshd::start("127.0.0.2");
    let mut site = Site::new();
    let big = server.files().join("big.bin");
    site.host("a", &server, &format!("parallel_above = \"1MiB\"\nretries = 1\nfetch = [\"{}\"]", big.display()));
    std::fs::write(&big, unrepeating(24 << 20)).unwrap();
    for (how, fault) in
        [("short", "/bin/dd \"$@\" | /usr/bin/head -c -1; exit 0"), ("long", "/bin/dd \"$@\"; printf x; exit 0")]
    {
        let _ = std::fs::remove_file(server.files().join("fakebin/count"));
        fault_in_ranges(&server, 3, fault, Some(5 << 20));
        let ran = site.run(&[("op", "fetch"), ("host", "a"), ("path", big.to_str().unwrap()), ("dest", how)]);
        ran.expect_code(1);
        assert!(ran.stderr.contains("was not the 2097152 bytes asked for"), "{how}: {}", ran.stderr);
        assert!(site.stored().is_empty(), "{how}: {:?}", site.stored());
        assert!(site.partial_files().is_empty(), "{how}: {:?}", site.partial_files());
    }
    // The same through the well-behaved `dd`: whole.
    fault_in_ranges(&server, 0, ":", Some(5 << 20));
    let ran = site.run(&[("op", "fetch"), ("host", "a"), ("path", big.to_str().unwrap()), ("dest", "whole")]);
    ran.expect_code(0);
    assert!(ran.stderr.contains("going on from byte 5242880"), "{}", ran.stderr);
    assert_eq!(sha256sum(&site.store().join("whole")), sha256sum(&big));
}

/// One connection of a spread fetch that stalls (its server-side read
/// hangs) is stopped once the others have gone on without it, and they
/// take over its ranges: the fetch completes, whole, long before the
/// host's idle timeout.
#[test]
fn a_stalled_connection_of_a_spread_fetch_is_stopped_and_the_others_take_over() {
    let link = offsite_testkit::wan::WanLink::start(Duration::from_millis(100), 1000);
    let server = Sshd::start_behind(&link);
    let mut site = Site::new();
    let big = server.files().join("big.bin");
    let grants = format!("parallel_above = \"1MiB\"\nidle_timeout = \"10m\"\nfetch = [\"{}\"]", big.display());
    site.host("far", &server, &grants);
    std::fs::write(&big, unrepeating(96 << 20)).unwrap();
    fault_in_ranges(&server, 4, "exec sleep 120", None);
    let started = Instant::now();
    let ran = site.run(&[("op", "fetch"), ("host", "far"), ("path", big.to_str().unwrap()), ("dest", "big.bin")]);
    ran.expect_code(0);
    assert!(ran.stderr.contains("stalled: no range for"), "{}", ran.stderr);
    assert_eq!(sha256sum(&site.store().join("big.bin")), sha256sum(&big));
    assert!(started.elapsed() < Duration::from_secs(90), "{:?}", started.elapsed());
}

/// A run killed in the middle of a large fetch leaves what it fetched in
/// `.offsite/partial`, durable up to its last note; the next run that
/// fetches the same, unchanged file goes on from there (hashing those
/// bytes, not fetching them again), and the file it stores is whole. A
/// file changed since is fetched from its start.
#[test]
fn a_fetch_killed_mid_run_is_taken_up_by_the_next_run_from_its_durable_bytes() {
    let link = offsite_testkit::wan::WanLink::start(Duration::from_millis(40), 100);
    let server = Sshd::start_behind(&link);
    let mut site = Site::new();
    let big = server.files().join("big.bin");
    site.host("far", &server, &format!("parallel_above = \"1MiB\"\nfetch = [\"{}\"]", big.display()));
    let size = 128u64 << 20;
    std::fs::write(&big, unrepeating(size as usize)).unwrap();
    let fetch =
        |dest: &str| site.probe(&[("op", "fetch"), ("host", "far"), ("path", big.to_str().unwrap()), ("dest", dest)]);
    let mut child =
        fetch("first.bin").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while site.partial_noted() < size / 3 {
        assert!(Instant::now() < deadline, "no note of durable bytes");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let noted = site.partial_noted();
    assert!(site.stored().iter().all(|n| n.starts_with(".offsite-tmp")), "{:?}", site.stored());

    // The next run (another name: the script's timestamp moved on).
    let before = link.carried_here();
    let ran = Ran::from_output(fetch("second.bin").output().unwrap());
    ran.expect_code(0);
    assert!(ran.stderr.contains("was interrupted"), "{}", ran.stderr);
    assert!(ran.stderr.contains("which an earlier run fetched"), "{}", ran.stderr);
    assert_eq!(sha256sum(&site.store().join("second.bin")), sha256sum(&big));
    let carried = link.carried_here() - before;
    let rest = size - noted / (1 << 20) * (1 << 20);
    // A connection starved of CPU on a loaded machine may be stopped as
    // stalled: the ranges it held (at most the window) are fetched again.
    let again = if ran.stderr.contains("stalled") { 32 << 20 } else { 0 };
    assert!(
        carried as f64 <= rest as f64 * 1.1 + again as f64,
        "{carried} bytes carried for the {rest} not yet fetched: {}",
        ran.stderr
    );
    assert!(site.partial_files().is_empty(), "{:?}", site.partial_files());

    // Killed again, and the file changes before the next run: it is
    // fetched whole, from the start.
    let mut child =
        fetch("third.bin").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while site.partial_noted() < size / 4 {
        assert!(Instant::now() < deadline, "no note of durable bytes");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mut changed = unrepeating(size as usize);
    changed[0] ^= 1;
    std::fs::write(&big, &changed).unwrap();
    let ran = Ran::from_output(fetch("fourth.bin").output().unwrap());
    ran.expect_code(0);
    assert!(!ran.stderr.contains("which an earlier run fetched"), "{}", ran.stderr);
    assert_eq!(sha256sum(&site.store().join("fourth.bin")), sha256sum(&big));
}

/// `bandwidth` holds a run's transfers to the rate: a host's own for its
/// transfers, and `[limits] bandwidth` for every transfer of the run
/// together (two hosts streaming at once share it). The lower bound is
/// the point (the limit holds); the upper one only catches a pace far off.
#[test]
fn bandwidth_limits_hold_a_hosts_transfers_and_the_whole_runs_to_their_rate() {
    let server = Sshd::start("127.0.0.2");
    let grants = "commands = [[\"head\", \"-c\", \"*\", \"/dev/zero\"]]";
    let mib = 12u64;
    let argv = format!("argv={}", argv(&["head", "-c", &(mib << 20).to_string(), "/dev/zero"]));
    let timed = |site: &Site, params: &[(&str, &str)]| {
        let started = Instant::now();
        let mut cmd = site.probe(params);
        cmd.arg("--param").arg(&argv);
        let ran = Ran::from_output(cmd.output().unwrap());
        ran.expect_code(0);
        started.elapsed()
    };
    // One host at 4 MiB/s: 12 MiB take 3 s, less the quarter second of burst.
    let mut one = Site::new();
    one.host("a", &server, &format!("bandwidth = \"4MiB/s\"\n{grants}"));
    let took = timed(&one, &[("op", "stream"), ("host", "a"), ("dest", "a.bin")]);
    assert!(took >= Duration::from_millis(2700), "{took:?}");
    assert!(took < Duration::from_secs(9), "{took:?}");
    assert_eq!(std::fs::metadata(one.store().join("a.bin")).unwrap().len(), mib << 20);

    // Two hosts at once under the site's 4 MiB/s: 24 MiB take 6 s.
    let mut both = Site::new();
    both.extra = "[limits]\nbandwidth = \"4MiB/s\"\n".into();
    both.host("a", &server, grants).host("b", &server, grants);
    let took = timed(&both, &[("op", "parallel-stream"), ("hosts", "a,b"), ("dest", "x.bin")]);
    assert!(took >= Duration::from_millis(5700), "{took:?}");
    assert!(took < Duration::from_secs(18), "{took:?}");
    assert_eq!(both.stored().len(), 2, "{:?}", both.stored());
}

/// A connection that fails in a way that may pass (here: timed out, the
/// link is down for eight seconds) is tried again after 1 s, 2 s..., each
/// retry logged, up to the host's `retries`; `retries = 0` fails at once.
#[test]
fn a_connection_that_times_out_is_retried_with_backoff_up_to_the_hosts_retries() {
    let link = offsite_testkit::wan::WanLink::start(Duration::from_millis(20), 100);
    let server = Sshd::start_behind(&link);
    for (retries, code) in [(0, 1), (3, 0)] {
        let mut site = Site::new();
        // connect_timeout = 3s: tries at 0 s, 4 s (after 1 s) and 9 s (after 2 s).
        site.host("far", &server, &format!("retries = {retries}\ncommands = [[\"true\"]]"));
        link.cut(Duration::from_secs(8));
        let ran = site.run(&[("op", "exec"), ("host", "far"), ("argv", "true")]);
        ran.expect_code(code);
        if retries == 0 {
            assert!(ran.stderr.contains("timed out"), "{}", ran.stderr);
            assert!(!ran.stderr.contains("retry"), "{}", ran.stderr);
        } else {
            assert!(ran.stderr.contains("retry 1 of 3 in 1s"), "{}", ran.stderr);
            assert!(ran.stderr.contains("retry 2 of 3 in 2s"), "{}", ran.stderr);
            assert!(ran.stderr.contains("status=0"), "{}", ran.stderr);
        }
        link.mend();
    }
}

/// A fetch whose every connection breaks (the link goes down for eight
/// seconds halfway) starts again over a new connection, which proves the
/// file is the same, from the first range not yet received: the stored
/// file is whole, and the link carried little more than the file once.
#[test]
fn a_fetch_whose_connections_break_resumes_where_it_was_and_carries_the_file_about_once() {
    let link = offsite_testkit::wan::WanLink::start(Duration::from_millis(40), 100);
    let server = Sshd::start_behind(&link);
    let mut site = Site::new();
    let big = server.files().join("big.bin");
    // One connection at a time (`connections = 1`): a resume is not a spread.
    let grants = format!("connections = 1\nparallel_above = \"1MiB\"\nfetch = [\"{}\"]", big.display());
    site.host("far", &server, &grants);
    let size = 128u64 << 20;
    std::fs::write(&big, unrepeating(size as usize)).unwrap();
    let before = link.carried_here();
    let mut cmd = site.probe(&[("op", "fetch"), ("host", "far"), ("path", big.to_str().unwrap()), ("dest", "big.bin")]);
    let child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    site.wait_for_staged_bytes(size / 2);
    link.cut(Duration::from_secs(8));
    let ran = Ran::from_output(child.wait_with_output().unwrap());
    ran.expect_code(0);
    assert!(ran.stderr.contains("every connection broke"), "{}", ran.stderr);
    assert!(ran.stderr.contains("retry 1 of 3"), "{}", ran.stderr);
    assert_eq!(sha256sum(&site.store().join("big.bin")), sha256sum(&big));
    let carried = link.carried_here() - before;
    // IP, TCP and SSH framing add about 5%; a resume may fetch again what
    // was in flight when the link went down (a few MiB).
    assert!(carried as f64 <= size as f64 * 1.1, "{carried} bytes carried for a file of {size}");
}
