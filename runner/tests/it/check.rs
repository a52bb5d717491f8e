//! `offsite check`: what a site allows, in words, and each problem with its
//! file, line and fix; `--connect` against a real sshd.

use std::path::Path;

use offsite_testkit::sshd::Sshd;
use offsite_testkit::{Ran, offsite, script};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

fn check(site: &Path, args: &[&str]) -> Ran {
    let mut cmd = offsite(Path::new(BIN));
    cmd.arg("check").arg(site).args(args).env_remove("SSH_AUTH_SOCK");
    Ran::from_output(cmd.output().unwrap())
}

#[test]
fn a_good_site_and_script_are_described_in_plain_words() {
    let server = Sshd::start("127.0.0.2");
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("db.toml");
    std::fs::write(dir.path().join("ssh_config"), "").unwrap();
    std::fs::write(
        &site,
        format!(
            "store = \"backups\"\nssh_config = \"ssh_config\"\n[params]\ndumps = \"server1:sitedb\"\n\n{}",
            server.host_section(
                "server1",
                "commands = [[\"mysqldump\", \"--single-transaction\", \"--quick\", \"--add-drop-table\", \"sitedb\", \"tbl_*...\"]]\nfetch = [\"/var/backups/*.tgz\"]"
            )
        ),
    )
    .unwrap();
    let ran = check(&site, &[script("mysql-pull").to_str().unwrap()]);
    ran.expect_code(0);
    for want in [
        "writes files only beneath",
        "may run: mysqldump --single-transaction --quick --add-drop-table sitedb [any number of arguments matching \"tbl_*\"]",
        "may copy files matching /var/backups/*.tgz",
        "param dumps = \"server1:sitedb\" (site)",
        "param mode = \"dump\" (default)",
        "no problems found",
    ] {
        assert!(ran.stdout.contains(want), "missing {want:?} in\n{}", ran.stdout);
    }
    assert!(!ran.stdout.contains("reaches no remote hosts"), "{}", ran.stdout);
    assert_eq!(ran.stderr, "");
}

#[test]
fn a_store_the_watcher_cannot_write_until_a_reload_is_said_to_need_one() {
    let sites = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir(src.path().join("www")).unwrap();
    let site = sites.path().join("web1.toml");
    let write = |store: &str| {
        let text = format!(
            "store = \"{store}\"\nscript = \"{}\"\n[read]\nroots = [\"{}\"]\n[params]\npath = \"{}\"\n",
            script("arc").display(),
            src.path().display(),
            src.path().join("www").display()
        );
        std::fs::write(&site, text).unwrap();
    };
    let checked = || {
        let mut cmd = offsite(Path::new(BIN));
        cmd.arg("check").arg(&site).env("OFFSITE_CONFIG_DIR", sites.path());
        Ran::from_output(cmd.output().unwrap())
    };
    let note = "under offsite-watch.service it is writable only after `systemctl daemon-reload";
    // Under /home (read-only for the watcher but for the generator's
    // drop-in), for a site file the generator serves: said.
    write("/home/offsite-check-test-no-such-user/web1");
    let ran = checked();
    ran.expect_code(0);
    assert!(ran.stdout.contains(note), "{}", ran.stdout);
    // Under /srv, writable for the watcher as it is: not said.
    write("/srv/offsite-check-test/web1");
    let ran = checked();
    ran.expect_code(0);
    assert!(!ran.stdout.contains(note), "{}", ran.stdout);
}

#[test]
fn problems_name_the_file_the_line_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("web1.toml");
    // A typo in a param key, and a script that needs ssh on a site with no hosts.
    std::fs::write(&site, "store = \"backups\"\n\n[params]\nmode = \"dump\"\ndumsp = \"server1:sitedb\"\n").unwrap();
    let ran = check(&site, &[script("mysql-pull").to_str().unwrap()]);
    ran.expect_code(2);
    let file = site.display().to_string();
    assert!(ran.stderr.contains(&format!("{file}:5: [params] sets \"dumsp\"")), "{}", ran.stderr);
    assert!(ran.stderr.contains("did you mean `dumps`?"), "{}", ran.stderr);
    assert!(ran.stderr.contains("uses the ssh capability, but the site has no [hosts.NAME] section"), "{}", ran.stderr);
    assert!(ran.stderr.contains("3 problem(s) found"), "ssh and scp both: {}", ran.stderr);

    // A required parameter nobody sets.
    std::fs::write(&site, "store = \"backups\"\n").unwrap();
    let ran = check(&site, &[script("arc").to_str().unwrap()]);
    ran.expect_code(2);
    assert!(ran.stderr.contains("needs parameter \"path\"") && ran.stderr.contains("under [params]"), "{}", ran.stderr);
    assert!(ran.stderr.contains("uses the archive capability, but the site grants no read roots"), "{}", ran.stderr);

    // Without a script argument, the site's own `script`: checked against
    // the site when it exists, a problem when it does not.
    std::fs::copy(script("arc"), dir.path().join("arc.wasm")).unwrap();
    std::fs::write(&site, "store = \"backups\"\nscript = \"arc.wasm\"\n").unwrap();
    let ran = check(&site, &[]);
    ran.expect_code(2);
    assert!(ran.stdout.contains("runs ") && ran.stdout.contains("arc.wasm under offsite watch"), "{}", ran.stdout);
    assert!(ran.stderr.contains("needs parameter \"path\""), "{}", ran.stderr);
    std::fs::write(&site, "store = \"backups\"\nscript = \"gone.wasm\"\n").unwrap();
    let ran = check(&site, &[]);
    ran.expect_code(2);
    assert!(ran.stderr.contains(&format!("{file}:2: the script ")), "{}", ran.stderr);
    assert!(ran.stderr.contains("gone.wasm does not exist"), "{}", ran.stderr);

    // A secret file that others can read.
    let pass = dir.path().join("db.pass");
    std::fs::write(&pass, "pw").unwrap();
    std::fs::write(&site, format!("store = \"backups\"\n[secrets]\ndb = {{ file = \"{}\" }}\n", pass.display()))
        .unwrap();
    let ran = check(&site, &[]);
    ran.expect_code(2);
    assert!(ran.stderr.contains(&format!("{file}:3: secret db")) && ran.stderr.contains("chmod 600"), "{}", ran.stderr);
    assert!(!ran.stdout.contains("pw\n") && !ran.stderr.contains(": pw"), "never the value");

    // Retention, reports, notifications and protection that would fail.
    let key = dir.path().join("manifest_key");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    }
    std::fs::write(
        &site,
        format!(
            "store = \"backups\"\n[retention]\nkeep_daily = 7\n[report]\nprometheus = \"/nonexistent/textfile/web1.prom\"\n\
             [notify]\ncommand = [\"/nonexistent/page-me\"]\n[protect]\nsigning_key = \"{}\"\n",
            key.display()
        ),
    )
    .unwrap();
    let ran = check(&site, &[]);
    ran.expect_code(2);
    assert!(
        ran.stdout.contains("after each good run keeps: daily 7 (and always the newest good run)"),
        "{}",
        ran.stdout
    );
    assert!(
        ran.stderr.contains(&format!("{file}:5: the directory /nonexistent/textfile does not exist")),
        "{}",
        ran.stderr
    );
    assert!(ran.stderr.contains(&format!("{file}:7: the notification program")), "{}", ran.stderr);
    assert!(
        ran.stderr.contains(&format!("{file}:9: private key")) && ran.stderr.contains("mode 0640"),
        "{}",
        ran.stderr
    );

    // A syntax error is reported with its line and column, like `run` does.
    std::fs::write(&site, "store = \"backups\"\n[limits]\nmemroy = \"1GiB\"\n").unwrap();
    let ran = check(&site, &[]);
    ran.expect_code(2);
    assert!(ran.stderr.contains(&format!("{file}:3:1: key `memroy`")), "{}", ran.stderr);
}

#[test]
fn connect_logs_in_and_looks_up_every_granted_program() {
    let server = Sshd::start("127.0.0.2");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ssh_config"), "").unwrap();
    let site = dir.path().join("s.toml");
    let write = |grants: &str| {
        std::fs::write(
            &site,
            format!("store = \"b\"\nssh_config = \"ssh_config\"\n{}", server.host_section("server1", grants)),
        )
        .unwrap();
    };
    write("commands = [[\"tar\", \"*...\"], [\"sh\", \"-c\", \"**\"]]");
    let ran = check(&site, &["--connect"]);
    ran.expect_code(0);
    assert!(ran.stdout.contains("host server1: connected, host key verified, authenticated"), "{}", ran.stdout);
    assert!(ran.stdout.contains("tar: found") && ran.stdout.contains("sh: found"), "{}", ran.stdout);

    write("commands = [[\"no-such-backup-tool\"]]");
    let ran = check(&site, &["--connect"]);
    ran.expect_code(2);
    assert!(ran.stderr.contains("program \"no-such-backup-tool\" is granted but not found"), "{}", ran.stderr);
    assert!(ran.stderr.contains(&format!("{}:3", site.display())), "points at the host section: {}", ran.stderr);

    // An unknown host key: the problem carries the line to add.
    std::fs::write(server.known_hosts(), "").unwrap();
    let ran = check(&site, &["--connect"]);
    ran.expect_code(2);
    assert!(ran.stderr.contains(&server.known_hosts_line), "{}", ran.stderr);
    assert!(ran.stderr.contains("check the fingerprint"), "{}", ran.stderr);

    // A host that refuses is reported at once, not tried again as a run
    // would (its `retries`, 3 by default, would wait 1 + 2 + 4 s).
    let closed = std::net::TcpListener::bind("127.0.0.2:0").unwrap().local_addr().unwrap().port();
    let text = std::fs::read_to_string(&site).unwrap();
    std::fs::write(&site, text.replace(&format!("port = {}", server.addr.port()), &format!("port = {closed}")))
        .unwrap();
    let started = std::time::Instant::now();
    let ran = check(&site, &["--connect"]);
    ran.expect_code(2);
    assert!(ran.stderr.contains("Connection refused"), "{}", ran.stderr);
    assert!(!ran.stderr.contains("retry"), "{}", ran.stderr);
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
}

fn authorized_line(site: &Path, host: &str) -> String {
    let mut cmd = offsite(Path::new(BIN));
    cmd.args(["keys", "authorized-line"]).arg(site).arg(host);
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(0);
    ran.stdout.lines().find(|l| !l.starts_with('#')).unwrap().to_string()
}

#[test]
fn the_authorized_keys_line_lets_the_key_do_only_what_the_site_grants() {
    let server = Sshd::start("127.0.0.2");
    let files = server.files();
    std::fs::write(files.join("dbbackup.sh"), "#!/bin/sh\necho dumped\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(files.join("dbbackup.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(files.join("userdb.tgz"), "archive").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ssh_config"), "").unwrap();
    let site = dir.path().join("s.toml");
    let write = |from: &str| {
        let grants = format!(
            "from = \"{from}\"\ncommands = [[\"{0}/dbbackup.sh\"]]\nfetch = [\"{0}/userdb.tgz\"]",
            files.display()
        );
        std::fs::write(
            &site,
            format!("store = \"b\"\nssh_config = \"ssh_config\"\n{}", server.host_section("server1", &grants)),
        )
        .unwrap();
    };
    write("127.0.0.0/8");
    let line = authorized_line(&site, "server1");
    assert!(line.starts_with("restrict,from=\"127.0.0.0/8\",command=\"/bin/sh -c '"), "{line}");
    std::fs::write(server.authorized_keys(), format!("{line}\n")).unwrap();

    // What the site grants still works through the runner...
    let probe = |params: &[String]| {
        let mut cmd = offsite(Path::new(BIN));
        cmd.arg("-v").arg("run").arg(script("probe")).arg("--site").arg(&site);
        for p in params {
            cmd.arg("--param").arg(p);
        }
        Ran::from_output(cmd.env_remove("SSH_AUTH_SOCK").output().unwrap())
    };
    let ran = probe(&["op=exec".into(), format!("argv={}/dbbackup.sh", files.display())]);
    ran.expect_code(0);
    assert!(ran.stderr.contains("stdout=\"dumped\\n\""), "{}", ran.stderr);
    probe(&["op=fetch".into(), format!("path={}/userdb.tgz", files.display()), "dest=u.tgz".into()]).expect_code(0);
    assert_eq!(std::fs::read_to_string(dir.path().join("b/u.tgz")).unwrap(), "archive");

    // ...while the key itself, used directly, can do nothing else.
    let out = server.ssh().arg("id").output().unwrap();
    assert_eq!(out.status.code(), Some(126), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("may only run the commands its site grants"));

    // check --connect sees the restricted key, runs nothing through it (no
    // `command -v`, which the forced command would refuse or hijack), and
    // says the line is current...
    let ran = check(&site, &["--connect"]);
    ran.expect_code(0);
    assert!(ran.stdout.contains("restricted to the site's current command lines"), "{}", ran.stdout);
    // ...until the grants change and the installed line is stale.
    let grants = format!(
        "from = \"127.0.0.0/8\"\ncommands = [[\"{0}/dbbackup.sh\"], [\"{0}/dbbackup.sh\", \"--full\"]]\nfetch = [\"{0}/userdb.tgz\"]",
        files.display()
    );
    std::fs::write(
        &site,
        format!("store = \"b\"\nssh_config = \"ssh_config\"\n{}", server.host_section("server1", &grants)),
    )
    .unwrap();
    let ran = check(&site, &["--connect"]);
    ran.expect_code(2).expect_stderr("allows other command lines than the site grants now");
    assert!(ran.stderr.contains("offsite keys authorized-line"), "{}", ran.stderr);

    // And from= keeps it from working from anywhere else.
    write("192.0.2.1");
    std::fs::write(server.authorized_keys(), format!("{}\n", authorized_line(&site, "server1"))).unwrap();
    let ran = probe(&["op=exec".into(), format!("argv={}/dbbackup.sh", files.display())]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("authentication failed"), "{}", ran.stderr);
}

#[test]
fn patterns_get_no_forced_command_and_say_why() {
    let server = Sshd::start("127.0.0.2");
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("s.toml");
    std::fs::write(
        &site,
        format!("store = \"b\"\n{}", server.host_section("server1", "commands = [[\"mysqldump\", \"*...\"]]")),
    )
    .unwrap();
    let mut cmd = offsite(Path::new(BIN));
    cmd.args(["keys", "authorized-line"]).arg(&site).arg("server1");
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(0);
    assert!(ran.stdout.contains("# no command=: the grants use patterns"), "{}", ran.stdout);
    assert!(ran.stdout.contains("# no from=:"), "{}", ran.stdout);
    let line = ran.stdout.lines().last().unwrap();
    let key = std::fs::read_to_string(server.client_key().with_extension("pub")).unwrap();
    assert_eq!(line, format!("restrict {}", key.trim()));

    let mut cmd = offsite(Path::new(BIN));
    cmd.args(["keys", "authorized-line"]).arg(&site).arg("server9");
    Ran::from_output(cmd.output().unwrap()).expect_code(2).expect_stderr("has no [hosts.server9]");
}

/// `check` says in words what each command pattern admits, warns about
/// grants that admit more than they read as, and shows exactly what each
/// secret is sent as and to which granted programs.
#[test]
fn broad_grants_are_warned_about_and_secret_deliveries_shown() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("broad.toml");
    let pass = dir.path().join("db.pass");
    std::fs::write(&pass, "x\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        &site,
        format!(
            "store = \"b\"\n[secrets]\ndb = {{ file = \"{}\", stdin = \"[client]\\npassword={{secret}}\\n\", programs = [\"mysqldump\"] }}\n\
             [hosts.server1]\ncommands = [[\"sh\", \"-c\", \"**\"], [\"tar\", \"-czf\", \"-\", \"*.log...\"], \
             [\"mysqldump\", \"--defaults-extra-file=/dev/stdin\", \"sitedb\"]]\n",
            pass.display()
        ),
    )
    .unwrap();
    let ran = check(&site, &[]);
    ran.expect_code(0);
    for want in [
        "warning: \"sh\" runs what its arguments say, and this grant leaves an argument open: it admits any command",
        "warning: argument 2 is `**`: it admits any argument, options and `..` included",
        "then any number of further arguments, each an argument matching \"*.log\" (wildcards stay within one \
         directory, never an option starting with `-`, never `..`)",
        "secret db is sent only as the stdin \"[client]\\\\npassword=<value>\\\\n\", and only to \"mysqldump\"",
        "\"mysqldump\" is granted on server1",
    ] {
        assert!(ran.stdout.contains(want), "missing {want:?} in\n{}", ran.stdout);
    }
    assert!(!ran.stdout.contains("warning: \"tar\""), "{}", ran.stdout);
}

/// A version under review that never ends its dry run (a hostile spin) is
/// stopped at the probe's own time limit and reported as unusable, instead
/// of holding `script diff` (and `update`, and a watcher) for the site's
/// whole deadline.
#[test]
fn a_version_whose_dry_run_never_ends_is_stopped_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site.toml");
    std::fs::write(&site, format!("store = \"{}\"\n[params]\ncase = \"loop\"\n", dir.path().join("store").display()))
        .unwrap();
    let started = std::time::Instant::now();
    let ran = Ran::from_output(
        offsite(Path::new(BIN))
            .env("OFFSITE_PROBE_TIMEOUT", "2s")
            .args(["script", "diff"])
            .arg(script("noop"))
            .arg(script("fixture"))
            .arg("--site")
            .arg(&site)
            .output()
            .unwrap(),
    );
    ran.expect_code(1);
    assert!(
        ran.stdout.contains("the new version's dry run failed: its dry run did not finish within 2s"),
        "{}",
        ran.stdout
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "took {:?}", started.elapsed());
}

/// `script diff` (and `script update`, which shows it) says its dry runs
/// contact no server: a version that fetches a file must not log in to
/// look it up either. The same site's plain dry run does log in, so the
/// check of sshd's log can fail.
#[test]
fn script_diff_logs_in_nowhere_even_for_a_script_that_fetches() {
    let server = Sshd::start("127.0.0.2");
    let files = server.files();
    std::fs::write(files.join("userdb.tgz"), "archive").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ssh_config"), "").unwrap();
    let site = dir.path().join("db.toml");
    std::fs::write(
        &site,
        format!(
            "store = \"b\"\nssh_config = \"ssh_config\"\n[params]\nmode = \"command\"\n\
             commands = \"server1:{0}/dbbackup.sh:{0}/userdb.tgz\"\n\n{1}",
            files.display(),
            server.host_section(
                "server1",
                &format!("commands = [[\"{0}/dbbackup.sh\"]]\nfetch = [\"{0}/*.tgz\"]", files.display())
            )
        ),
    )
    .unwrap();
    // With the site and no agent (the key is the site's `identity`).
    let with_site = |args: &[&std::ffi::OsStr]| {
        Ran::from_output(
            offsite(Path::new(BIN)).args(args).arg("--site").arg(&site).env_remove("SSH_AUTH_SOCK").output().unwrap(),
        )
    };
    // From a script that calls nothing, so every call is new and listed.
    let (noop, mysql_pull) = (script("noop"), script("mysql-pull"));
    let ran = with_site(&["script".as_ref(), "diff".as_ref(), noop.as_os_str(), mysql_pull.as_os_str()]);
    ran.expect_code(0);
    assert!(ran.stdout.contains("no server contacted"), "{}", ran.stdout);
    assert!(ran.stdout.contains("userdb.tgz"), "the fetch is among the calls: {}", ran.stdout);
    let log = server.log();
    assert!(!log.contains("Accepted"), "script diff logged in:\n{log}");

    let dry = with_site(&["run".as_ref(), "--dry-run".as_ref(), mysql_pull.as_os_str()]);
    dry.expect_code(0);
    assert!(server.log().contains("Accepted"), "a plain dry run logs in:\n{}", server.log());
}

/// A site's lock file that cannot be read stops every run of a registry
/// script; check says so instead of passing.
#[test]
fn check_reports_a_lock_file_runs_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("web.toml");
    std::fs::write(
        &site,
        format!("store = \"{}\"\nscript = \"oci://127.0.0.1:9/backup/arc:1\"\n", dir.path().join("store").display()),
    )
    .unwrap();
    std::fs::write(dir.path().join("web.lock"), "reference = 42\n").unwrap();
    let ran = Ran::from_output(
        offsite(Path::new(BIN))
            .env("OFFSITE_SCRIPTS_DIR", dir.path().join("scripts"))
            .arg("check")
            .arg(&site)
            .output()
            .unwrap(),
    );
    assert_ne!(ran.code, 0, "{}", ran.stdout);
    assert!(
        format!("{}{}", ran.stdout, ran.stderr).contains("web.lock cannot be read"),
        "{}\n{}",
        ran.stdout,
        ran.stderr
    );
}

/// `offsite inspect X | head` and the like: a reader that goes away ends
/// the command quietly, as `ls | head` ends (no panic, no backtrace), and
/// its exit code is what the command itself decided.
#[test]
fn every_printing_command_ends_quietly_when_its_reader_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("s.toml");
    std::fs::write(&site, "store = \"b\"\n").unwrap();
    let noop = script("noop");
    let commands: Vec<Vec<&std::ffi::OsStr>> = vec![
        vec!["inspect".as_ref(), noop.as_os_str()],
        vec!["completions".as_ref(), "bash".as_ref()],
        vec!["check".as_ref(), site.as_os_str(), noop.as_os_str()],
        vec!["run".as_ref(), noop.as_os_str(), "--site".as_ref(), site.as_os_str(), "--json".as_ref()],
        vec!["status".as_ref(), site.as_os_str()],
    ];
    for args in commands {
        let mut cmd = offsite(Path::new(BIN));
        cmd.args(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        // The reader is gone before the first byte is written.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    }
    // Output lost any other way is a failure, said once.
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out = offsite(Path::new(BIN)).args(["completions", "bash"]).stdout(full).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.matches("cannot write to standard output").count(), 1, "{stderr}");
}
