//! Offsite as a system tool: version provenance, completions that load in
//! the real shells, man pages that render, shipped scripts found by name,
//! the systemd units (verified by systemd-analyze), the generator, the
//! journal (a stand-in socket: no journald runs here) and `sd_notify`
//! (a stand-in NOTIFY_SOCKET).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use offsite_testkit::{Ran, offsite, repo_root, script};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

fn run(args: &[&str]) -> Ran {
    Ran::from_output(offsite(Path::new(BIN)).args(args).output().unwrap())
}

#[test]
fn version_names_the_commit_wasmtime_and_the_wit_package() {
    let ran = run(&["--version"]);
    ran.expect_code(0);
    let wit = std::fs::read_to_string(repo_root().join("wit/offsite.wit")).unwrap();
    let package = wit.lines().find_map(|l| l.strip_prefix("package ")).unwrap().trim_end_matches(';');
    assert!(ran.stdout.starts_with(&format!("offsite {}\n", env!("CARGO_PKG_VERSION"))), "{}", ran.stdout);
    assert!(ran.stdout.contains("\nwasmtime: 48."), "{}", ran.stdout);
    assert!(ran.stdout.contains(&format!("\nwit: {package}\n")), "{}", ran.stdout);
    let commit = ran.stdout.lines().find_map(|l| l.strip_prefix("commit: ")).expect("a commit line");
    assert!(commit == "unknown" || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())), "{commit}");
}

#[test]
fn completions_load_in_bash_zsh_and_fish() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let ran = run(&["completions", shell]);
        ran.expect_code(0);
        let file = dir.path().join(shell);
        std::fs::write(&file, &ran.stdout).unwrap();
        // Each shell parses it; bash also loads it and has the completion.
        let check = match shell {
            "bash" => format!("source {} && complete -p offsite", file.display()),
            "zsh" => format!("zsh -n {}", file.display()),
            _ => format!("fish --no-execute {}", file.display()),
        };
        let out = Command::new("bash").args(["-c", &check]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        if shell == "bash" {
            assert!(String::from_utf8_lossy(&out.stdout).contains("offsite"), "no completion registered");
        }
    }
    run(&["completions", "tcsh"]).expect_code(2);
}

/// The pages `generate-docs` writes, by name.
fn generated_pages(dir: &Path) -> Vec<PathBuf> {
    run(&["generate-docs", dir.to_str().unwrap()]).expect_code(0);
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir.join("man1")).unwrap().map(|e| e.unwrap().path()).collect();
    pages.sort();
    pages
}

#[test]
fn every_command_has_a_man_page_with_examples_and_the_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let pages = generated_pages(dir.path());
    let names: Vec<String> = pages.iter().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect();
    for expected in
        ["offsite", "offsite-run", "offsite-check", "offsite-watch", "offsite-script-push", "offsite-completions"]
    {
        assert!(names.iter().any(|n| n == expected), "no page {expected}: {names:?}");
    }
    assert!(!names.iter().any(|n| n.contains("generate-docs")), "hidden commands have no page");
    for page in pages.iter().chain([&dir.path().join("man5/offsite.toml.5")]) {
        let out = Command::new("man")
            .arg("-l")
            .arg(page)
            .env("MANWIDTH", "100")
            .env("MAN_KEEP_FORMATTING", "")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.is_empty(),
            "{}: {}",
            page.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"), "{}", String::from_utf8_lossy(&out.stderr));
        let name = page.file_stem().unwrap().to_string_lossy();
        if name == "offsite.toml" {
            assert!(text.contains("[hosts.NAME]") && text.contains("schedule"), "{text}");
            continue;
        }
        // Group pages (offsite-keys, offsite-script) list their commands.
        let group = name == "offsite-keys" || name == "offsite-script";
        assert!(group || text.contains("EXAMPLES"), "{name} has no examples:\n{text}");
        assert!(text.contains("EXIT STATUS") && text.contains("another run of this site holds its lock"), "{name}");
    }
    // And --help shows the same examples.
    for name in &names {
        let args: Vec<&str> = name.split('-').skip(1).collect();
        let args: Vec<String> = match args.as_slice() {
            ["keys", "authorized", "line"] => vec!["keys".into(), "authorized-line".into()],
            other => other.iter().map(|s| s.to_string()).collect(),
        };
        let mut cmd = offsite(Path::new(BIN));
        cmd.args(&args).arg("--help");
        let ran = Ran::from_output(cmd.output().unwrap());
        ran.expect_code(0);
        assert!(ran.stdout.contains("Examples:"), "offsite {} --help has no example", args.join(" "));
    }
}

#[test]
fn a_shipped_script_is_found_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = dir.path().join("lib/offsite/scripts");
    std::fs::create_dir_all(&shipped).unwrap();
    std::fs::copy(script("arc"), shipped.join("arc.wasm")).unwrap();
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    std::fs::write(dir.path().join("www/index.html"), "hello").unwrap();
    let site = dir.path().join("web.toml");
    std::fs::write(&site, "store = \"store\"\nscript = \"arc\"\n[read]\nroots = [\"www\"]\n[params]\npath = \"www\"\n")
        .unwrap();
    let with_path = |args: &[&str]| {
        let mut cmd = offsite(Path::new(BIN));
        cmd.env("OFFSITE_SCRIPT_PATH", format!("{}:/nonexistent", shipped.display())).args(args);
        Ran::from_output(cmd.output().unwrap())
    };
    let ran = with_path(&["run", "--site", site.to_str().unwrap(), "--json"]);
    ran.expect_code(0);
    assert!(ran.stdout.contains("\"status\":\"ok\""), "{}", ran.stdout);
    let manifest =
        std::fs::read_dir(dir.path().join("store/.offsite/manifests")).unwrap().next().unwrap().unwrap().path();
    let text = std::fs::read_to_string(manifest).unwrap();
    assert!(text.contains(&shipped.join("arc.wasm").display().to_string()), "the manifest names the file: {text}");
    // An unknown name says where it looked and what to do.
    std::fs::write(&site, "store = \"store\"\nscript = \"arcc\"\n").unwrap();
    let ran = with_path(&["run", "--site", site.to_str().unwrap()]);
    ran.expect_code(2).expect_stderr("no shipped script is called \"arcc\"");
    assert!(ran.stderr.contains("./arcc.wasm"), "{}", ran.stderr);
}

/// The units, with ExecStart pointing at this build, pass
/// `systemd-analyze verify`; the generator's drop-ins are valid settings.
#[test]
fn the_systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = repo_root().join("deploy/systemd");
    for (from, to) in [
        ("offsite@.service", "offsite@web1.service"),
        ("offsite@.timer", "offsite@web1.timer"),
        ("offsite-watch.service", "offsite-watch.service"),
    ] {
        let text = std::fs::read_to_string(units.join(from)).unwrap().replace("/usr/bin/offsite", BIN);
        std::fs::write(dir.path().join(to), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(["offsite@web1.service", "offsite@web1.timer", "offsite-watch.service"].map(|u| dir.path().join(u)))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("offsite"), "{stderr}");

    // The generator, by the name systemd runs it under.
    let sites = dir.path().join("etc");
    std::fs::create_dir(&sites).unwrap();
    std::fs::write(sites.join("web1.toml"), "store = \"/srv/my backups/web1\"\nschedule = \"0 3 1 * mon\"\n").unwrap();
    let generator = dir.path().join("offsite-systemd-generator");
    let wrapper = std::fs::read_to_string(units.join("offsite-systemd-generator")).unwrap();
    std::fs::write(&generator, wrapper.replace("/usr/bin/offsite", BIN)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&generator, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out_dir = dir.path().join("generated");
    std::fs::create_dir(&out_dir).unwrap();
    let ran = Ran::from_output(
        Command::new(&generator)
            .arg(&out_dir)
            .arg(&out_dir)
            .arg(&out_dir)
            .env("OFFSITE_CONFIG_DIR", &sites)
            .output()
            .unwrap(),
    );
    ran.expect_code(0);
    let timer = std::fs::read_to_string(out_dir.join("offsite@web1.timer.d/50-offsite-site.conf")).unwrap();
    assert!(timer.contains("OnCalendar=\nOnCalendar=*-*-01 03:00:00\nOnCalendar=Mon *-*-* 03:00:00\n"), "{timer}");
    // systemd reads the generated calendar the way it was meant.
    for spec in ["*-*-01 03:00:00", "Mon *-*-* 03:00:00"] {
        let out = Command::new("systemd-analyze").args(["calendar", spec]).output().unwrap();
        assert!(out.status.success(), "{spec}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // check shows the same calendar.
    let check = run(&["check", sites.join("web1.toml").to_str().unwrap()]);
    assert!(
        check.stdout.contains("as a systemd timer: OnCalendar=*-*-01 03:00:00 and OnCalendar=Mon *-*-* 03:00:00"),
        "{}",
        check.stdout
    );
    let service = std::fs::read_to_string(out_dir.join("offsite@web1.service.d/50-offsite-site.conf")).unwrap();
    assert!(service.contains("ReadWritePaths=-\"/srv/my backups/web1\"\n"), "{service}");
}

/// A stand-in for journald: a datagram socket, and `$JOURNAL_STREAM`
/// naming the file the child's stderr goes to.
struct FakeJournal {
    _dir: tempfile::TempDir,
    socket: UnixDatagram,
    path: PathBuf,
    stderr: PathBuf,
}

impl FakeJournal {
    fn new() -> FakeJournal {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let stderr = dir.path().join("stderr");
        FakeJournal { _dir: dir, socket, path, stderr }
    }

    fn command(&self, mut cmd: Command) -> Command {
        use std::os::unix::fs::MetadataExt;
        let file = std::fs::File::create(&self.stderr).unwrap();
        let meta = file.metadata().unwrap();
        cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
            .env("OFFSITE_JOURNAL_SOCKET", &self.path)
            .stderr(file);
        cmd
    }

    /// The entries received, each as its fields.
    fn entries(&self) -> Vec<std::collections::BTreeMap<String, String>> {
        let mut entries = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = self.socket.recv(&mut buf) {
            let mut fields = std::collections::BTreeMap::new();
            let mut rest = &buf[..n];
            while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                let name = String::from_utf8_lossy(&rest[..nl]).into_owned();
                let len = u64::from_le_bytes(rest[nl + 1..nl + 9].try_into().unwrap()) as usize;
                let value = String::from_utf8_lossy(&rest[nl + 9..nl + 9 + len]).into_owned();
                fields.insert(name, value);
                rest = &rest[nl + 9 + len + 1..];
            }
            entries.push(fields);
        }
        entries
    }
}

#[test]
fn under_systemd_messages_go_to_the_journal_with_priority_and_fields() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    std::fs::write(dir.path().join("www/index.html"), "hello").unwrap();
    let site = dir.path().join("web1.toml");
    std::fs::write(
        &site,
        format!("store = \"store\"\nscript = \"{}\"\n[read]\nroots = [\"www\"]\n", script("arc").display()),
    )
    .unwrap();
    let journal = FakeJournal::new();
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--site"]).arg(&site).args(["--param", "path=www"]);
    let out = journal.command(cmd).output().unwrap();
    assert!(out.status.success());
    let entries = journal.entries();
    let done = entries.iter().find(|e| e["MESSAGE"].contains("of site web1: ok")).expect("a per-run entry");
    assert_eq!(done["PRIORITY"], "6");
    assert_eq!(done["OFFSITE_SITE"], "web1");
    assert_eq!(done["OFFSITE_STATUS"], "ok");
    assert_eq!(done["SYSLOG_IDENTIFIER"], "offsite");
    assert_eq!(done["OFFSITE_SCRIPT_SHA256"].len(), 64);
    assert!(done["MESSAGE"].contains(&done["OFFSITE_RUN_ID"]), "{done:?}");
    assert_eq!(std::fs::read_to_string(&journal.stderr).unwrap(), "", "nothing on the stream itself");

    // A failed run: an error entry (priority 3) with the run's fields.
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--site"]).arg(&site).args(["--param", "path=/etc"]);
    let out = journal.command(cmd).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let entries = journal.entries();
    let error = entries.iter().find(|e| e["PRIORITY"] == "3").expect("an error entry");
    assert!(error["MESSAGE"].starts_with("offsite: error: "), "{error:?}");
    assert_eq!(error["OFFSITE_STATUS"], "failed");
    assert_eq!(error["OFFSITE_SITE"], "web1");

    // The journal not taking it: the stream gets the lines, with the
    // priority prefix journald reads there.
    drop(journal.socket);
    std::fs::remove_file(&journal.path).unwrap();
    let fallback = FakeJournal { socket: UnixDatagram::unbound().unwrap(), ..FakeJournal::new() };
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--site"]).arg(&site).args(["--param", "path=/etc"]);
    let mut cmd = fallback.command(cmd);
    cmd.env("OFFSITE_JOURNAL_SOCKET", dir.path().join("no-such-socket"));
    assert_eq!(cmd.output().unwrap().status.code(), Some(1));
    let text = std::fs::read_to_string(&fallback.stderr).unwrap();
    assert!(text.lines().any(|l| l.starts_with("<3>offsite: error: ")), "{text}");

    // Not under systemd (the stream is not our stderr): plain lines.
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--site"]).arg(&site).args(["--param", "path=/etc"]).env("JOURNAL_STREAM", "1:1");
    let ran = Ran::from_output(cmd.output().unwrap());
    assert!(ran.stderr.lines().any(|l| l.starts_with("offsite: error: ")), "{}", ran.stderr);
    assert!(!ran.stderr.contains("<3>"), "{}", ran.stderr);
}

/// `watch` under `Type=notify`: READY once its sites are loaded, STATUS
/// lines, RELOADING then READY on SIGHUP, STOPPING on SIGTERM.
#[test]
fn watch_tells_systemd_when_it_is_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let site = dir.path().join("web1.toml");
    std::fs::write(
        &site,
        format!("store = \"store\"\nscript = \"{}\"\nschedule = \"0 0 1 1 *\"\n", script("noop").display()),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("watch")
        .arg(&site)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("OFFSITE_CACHE_DIR", offsite_testkit::shared_cache_dir())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Waits for `needle` in what arrived after byte `from`; returns where
    // it ends, and everything received.
    let mut got = String::new();
    let mut wait_for = |needle: &str, from: usize| -> (usize, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        loop {
            if let Some(at) = got[from..].find(needle) {
                return (from + at + needle.len(), got.clone());
            }
            assert!(Instant::now() < deadline, "no {needle:?} after byte {from} in {got:?}");
            if let Ok(n) = sock.recv(&mut buf) {
                got.push_str(&String::from_utf8_lossy(&buf[..n]));
                got.push('\n');
            }
        }
    };
    let (at, text) = wait_for("READY=1", 0);
    assert!(text.contains("STATUS=1 site(s), 0 running; next: web1 at "), "{text}");
    let pid = child.id().to_string();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    let (at, text) = wait_for("RELOADING=1", at);
    assert!(text[at..].starts_with("\nMONOTONIC_USEC="), "{text}");
    let (at, _) = wait_for("READY=1", at);
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    wait_for("STOPPING=1", at);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// Runs `command` (a shell command line) in a pseudo-terminal, as `script`
/// does for a user; returns everything the terminal was sent.
fn in_terminal(command: &str, envs: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("script");
    cmd.args(["-qfec", command, "/dev/null"]).env_remove("NO_COLOR").env("TERM", "xterm");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{command}: {text}");
    text
}

/// On a terminal a run shows a live line per transfer (bytes of the known
/// total, rate, ETA, the file it is on) that updates while it works and is
/// gone when it ends; in a pipe, under cron and with --json, nothing.
#[test]
fn progress_shows_on_a_terminal_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("big");
    std::fs::create_dir(&data).unwrap();
    // Incompressible, so the archive takes a few seconds.
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for name in ["a.bin", "b.bin"] {
        use std::io::Write;
        let mut f = std::fs::File::create(data.join(name)).unwrap();
        for _ in 0..96 {
            for b in chunk.chunks_mut(8) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                b.copy_from_slice(&seed.to_le_bytes());
            }
            f.write_all(&chunk).unwrap();
        }
    }
    let arc = script("arc");
    let run =
        |extra: &str| format!("cd {} && {BIN} run {} --param path=big{extra}", dir.path().display(), arc.display());
    let shown = in_terminal(&run(""), &[]);
    let updates: std::collections::BTreeSet<&str> = shown
        .split('\r')
        .filter_map(|l| l.split(" MiB/192.00 MiB").next().filter(|_| l.contains("/192.00 MiB")))
        .collect();
    assert!(updates.len() >= 3, "the line updates while the archive is written: {shown:?}");
    assert!(shown.contains("ETA") && shown.contains("big/b.bin"), "{shown:?}");
    assert!(shown.contains("\x1b[32m"), "coloured by default: {shown:?}");
    assert!(shown.ends_with("\x1b[2K") || shown.trim_end().ends_with("\x1b[2K"), "cleared at the end: {shown:?}");

    let plain = in_terminal(&run(""), &[("NO_COLOR", "1")]);
    assert!(plain.contains("ETA") && !plain.contains("\x1b[32m"), "NO_COLOR: {plain:?}");

    let json = in_terminal(&run(" --json"), &[]);
    assert!(!json.contains("ETA"), "--json: {json:?}");
    assert!(json.trim_start().starts_with("{\"format\":1"), "{json:?}");

    // Not a terminal (cron, a pipe): nothing at all.
    let ran = Ran::from_output(
        Command::new("sh").args(["-c", &run("")]).stdin(std::process::Stdio::null()).output().unwrap(),
    );
    ran.expect_code(0);
    assert_eq!(ran.stderr, "", "silent off a terminal");
}
