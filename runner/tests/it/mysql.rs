//! The article's scenario end to end: one site file and the one shared
//! `mysql-pull` script back up two servers, each a real sshd with its own
//! login user and a real MariaDB. Every dump is restored into a fresh
//! database and compared by row counts and `CHECKSUM TABLE`.

use std::path::{Path, PathBuf};
use std::process::Command;

use offsite_testkit::mariadb::MariaDb;
use offsite_testkit::shared::Turn;
use offsite_testkit::sshd::Sshd;
use offsite_testkit::{Ran, gunzip, offsite, run_script, script};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");
pub(crate) const SITEDB_TABLES: [&str; 4] = ["tbl_ccode", "tbl_machine", "tbl_session", "tbl_stats"];

/// One simulated server: sshd and MariaDB on the same loopback address.
pub(crate) struct Server {
    pub(crate) ssh: Sshd,
    pub(crate) db: &'static MariaDb,
}

/// The server on `ip`, logging in as `user`: its own sshd, and this test
/// process's MariaDB on the address, emptied for this test (`turn` is the
/// turn at the login accounts).
pub(crate) fn start(turn: &Turn, ip: &'static str, user: &'static str, password_in_file: bool) -> Server {
    let ssh = Sshd::start_as(ip, user);
    let db = MariaDb::shared(ip, turn);
    // Credentials where mysqldump looks by default: the login user's
    // ~/.my.cnf, mode 0600.
    db.write_defaults_file(&ssh.home().join(".my.cnf"), &ssh.user, password_in_file);
    Server { ssh, db }
}

/// The two servers. They log in as the same two accounts in every test,
/// whose `~/.my.cnf` names the MariaDB sockets, and they share this
/// process's MariaDB servers, so the tests here take turns: the guard is
/// held for the whole test.
fn two_servers() -> (Server, Server, Turn) {
    servers(true)
}

fn servers(password_in_file: bool) -> (Server, Server, Turn) {
    let turn = offsite_testkit::shared::turn("mysql-accounts");
    let (server1, server2) = std::thread::scope(|s| {
        let a = s.spawn(|| start(&turn, "127.0.0.2", "offsite-srv1", password_in_file));
        let b = s.spawn(|| start(&turn, "127.0.0.3", "offsite-srv2", password_in_file));
        (a.join().unwrap(), b.join().unwrap())
    });
    populate_sitedb(server1.db);
    populate_transdb(server2.db);
    (server1, server2, turn)
}

pub(crate) fn populate_sitedb(db: &MariaDb) {
    db.sql("CREATE DATABASE sitedb");
    db.sql_in(
        "sitedb",
        "CREATE TABLE tbl_ccode (code CHAR(2) PRIMARY KEY, name VARCHAR(64) NOT NULL) ENGINE=InnoDB;\n\
         INSERT INTO tbl_ccode VALUES ('US','United States'),('FR','France'),('IN','India'),('JP','日本'),('XX','O''Brien; DROP TABLE x; --');\n\
         CREATE TABLE tbl_machine (id INT PRIMARY KEY, hostname VARCHAR(255), ip VARBINARY(16), notes TEXT NULL) ENGINE=InnoDB;\n\
         INSERT INTO tbl_machine SELECT seq, CONCAT('web', seq, '.example.com'), UNHEX(LPAD(HEX(seq), 8, '0')), IF(seq % 3 = 0, NULL, REPEAT('x\\n\\t\"', seq % 7)) FROM seq_1_to_500;\n\
         CREATE TABLE tbl_session (id BIGINT PRIMARY KEY, machine INT, started DATETIME, payload BLOB) ENGINE=InnoDB;\n\
         INSERT INTO tbl_session SELECT seq, seq % 500 + 1, '2004-03-21 01:48:44' + INTERVAL seq SECOND, RANDOM_BYTES(32) FROM seq_1_to_20000;\n\
         CREATE TABLE tbl_stats (day DATE, hits INT UNSIGNED, ratio DOUBLE, PRIMARY KEY (day)) ENGINE=InnoDB;\n\
         INSERT INTO tbl_stats SELECT '2000-01-01' + INTERVAL seq DAY, seq * 37 % 10007, seq / 7 FROM seq_0_to_3000;\n\
         CREATE TABLE tbl_private (secret TEXT);\n\
         INSERT INTO tbl_private VALUES ('not part of the backup');",
    );
}

fn populate_transdb(db: &MariaDb) {
    db.sql("CREATE DATABASE transdb");
    db.sql_in(
        "transdb",
        "CREATE TABLE transactions (id BIGINT PRIMARY KEY, amount DECIMAL(12,2), memo VARCHAR(200)) ENGINE=InnoDB;\n\
         INSERT INTO transactions SELECT seq, seq * 1.25, CONCAT('payment #', seq, ' \\'quoted\\'') FROM seq_1_to_30000;\n\
         CREATE TABLE accounts (id INT PRIMARY KEY, owner VARCHAR(100)) ENGINE=InnoDB;\n\
         INSERT INTO accounts SELECT seq, CONCAT('owner ', seq) FROM seq_1_to_100;",
    );
}

/// The site file: both hosts with exactly the grants the script needs.
fn site_file(dir: &Path, server1: &Server, server2: &Server, grants1: &str, grants2: &str, params: &str) -> PathBuf {
    let host = |name: &str, s: &Server, grants: &str| s.ssh.host_section(name, grants);
    std::fs::write(dir.join("ssh_config"), "").unwrap();
    let text = format!(
        "name = \"article\"\nstore = \"{}\"\nssh_config = \"{}\"\n\n[params]\n{params}\n\n{}\n{}",
        dir.join("backups").display(),
        dir.join("ssh_config").display(),
        host("server1", server1, grants1),
        host("server2", server2, grants2),
    );
    let file = dir.join("article.toml");
    std::fs::write(&file, text).unwrap();
    file
}

fn run(site: &Path) -> Ran {
    run_script(Path::new(BIN), "mysql-pull", site)
}

pub(crate) const DUMP_GRANT_1: &str = "commands = [[\"mysqldump\", \"--single-transaction\", \"--quick\", \"--add-drop-table\", \"sitedb\", \"tbl_*...\"]]";
const DUMP_GRANT_2: &str =
    "commands = [[\"mysqldump\", \"--single-transaction\", \"--quick\", \"--add-drop-table\", \"transdb\"]]";

#[test]
fn one_script_dumps_both_servers_and_every_dump_restores_identically() {
    let (server1, server2, _turn) = two_servers();
    let dir = tempfile::tempdir().unwrap();
    let params = "dumps = \"server1:sitedb:tbl_ccode,tbl_machine,tbl_session,tbl_stats server2:transdb\"";
    let site = site_file(dir.path(), &server1, &server2, DUMP_GRANT_1, DUMP_GRANT_2, params);
    let ran = run(&site);
    ran.expect_code(0);
    assert_eq!(ran.stderr, "", "silent on success, as cron wants");

    let dump1 = dir.path().join("backups/server1/sitedb-20040321-014844.sql.gz");
    let dump2 = dir.path().join("backups/server2/transdb-20040321-014844.sql.gz");
    let sql1 = gunzip(&dump1);
    let sql2 = gunzip(&dump2);
    assert!(String::from_utf8_lossy(&sql1[sql1.len() - 100..]).contains("-- Dump completed"));
    assert!(!String::from_utf8_lossy(&sql1).contains("tbl_private"), "only the named tables");
    assert!(!String::from_utf8_lossy(&sql1).contains(server1.db.backup_password()));

    // Restore each into a fresh database and compare.
    server1.db.load("restored_sitedb", &sql1);
    let original: Vec<_> =
        server1.db.fingerprint("sitedb").into_iter().filter(|(t, _, _)| SITEDB_TABLES.contains(&t.as_str())).collect();
    assert_eq!(original.len(), 4);
    assert_eq!(server1.db.fingerprint("restored_sitedb"), original);
    assert_eq!(original.iter().find(|t| t.0 == "tbl_session").unwrap().1, 20000);
    server2.db.load("restored_transdb", &sql2);
    assert_eq!(server2.db.fingerprint("restored_transdb"), server2.db.fingerprint("transdb"));

    // `verify --restore-test` does the same from the store: it loads each
    // dump into a scratch database, compares row counts, and cleans up.
    let defaults = dir.path().join("verify.cnf");
    std::fs::write(&defaults, format!("[client]\nuser=root\nsocket={}\n", server1.db.socket().display())).unwrap();
    let verify = |db: &str| {
        let mut cmd = offsite(Path::new(BIN));
        cmd.args(["-v", "verify"]).arg(&site).args(["--restore-test", db, "--mysql-defaults"]).arg(&defaults);
        Ran::from_output(cmd.output().unwrap())
    };
    let ran = verify("scratch_restore");
    ran.expect_code(0);
    assert!(ran.stdout.contains("sitedb-20040321-014844.sql.gz: restore test ok (4 tables, "), "{}", ran.stdout);
    assert!(ran.stdout.contains("transdb-20040321-014844.sql.gz: restore test ok"), "{}", ran.stdout);
    assert_eq!(server1.db.sql("SHOW DATABASES LIKE 'scratch_restore'"), "", "the scratch database is dropped");
    // A scratch database that holds tables is never loaded over.
    verify("sitedb").expect_code(1).expect_stderr("the scratch database sitedb is not empty");

    // `restore --into-database` loads a dump for keeps, found by a glob,
    // with the same client modes; row counts checked, every table equal.
    let restore = |args: &[&str]| {
        let mut cmd = offsite(Path::new(BIN));
        cmd.arg("restore").arg(&site).args(args).arg("--mysql-defaults").arg(&defaults);
        Ran::from_output(cmd.output().unwrap())
    };
    let sitedb = ["latest", "server1/sitedb-*.sql.gz", "--into-database"];
    restore(&[&sitedb[..], &["sitedb_back"]].concat()).expect_code(0).expect_stdout("4 tables, 23506 rows");
    assert_eq!(server1.db.fingerprint("sitedb_back"), original);
    restore(&[&sitedb[..], &["sitedb_back"]].concat()).expect_code(1).expect_stderr("sitedb_back is not empty");
    restore(&[&sitedb[..], &["sitedb_back", "--force"]].concat()).expect_code(0);
    assert_eq!(server1.db.fingerprint("sitedb_back"), original, "the dump's DROP TABLEs replace what was there");
    restore(&["latest", "server*/*.sql.gz", "--into-database", "x"]).expect_code(2).expect_stderr("matches 2 files");
    // A manifest that says another hash: the whole dump streams into the
    // client, the check at its end fails, the client is stopped and the
    // database this created is dropped again.
    offsite_testkit::claim_another_hash(&dir.path().join("backups"), &dump1);
    restore(&[&sitedb[..], &["sitedb_tampered"]].concat())
        .expect_code(1)
        .expect_stderr("the manifest says 0000")
        .expect_stderr("was dropped again");
    assert_eq!(server1.db.sql("SHOW DATABASES LIKE 'sitedb_tampered'"), "", "nothing of it left");
}

/// mysql-pull's dump mode written in Python, against the same servers and
/// grants: the same files, each restoring to the live databases.
#[test]
fn the_python_mysql_pull_dumps_both_servers_and_every_dump_restores_identically() {
    let wasm = offsite_testkit::python_script(Path::new(BIN), "mysql-pull-py");
    let (server1, server2, _turn) = two_servers();
    let dir = tempfile::tempdir().unwrap();
    let params = "dumps = \"server1:sitedb:tbl_ccode,tbl_machine,tbl_session,tbl_stats server2:transdb\"";
    let site = site_file(dir.path(), &server1, &server2, DUMP_GRANT_1, DUMP_GRANT_2, params);
    let mut cmd = offsite(Path::new(BIN));
    cmd.arg("run").arg(&wasm).arg("--site").arg(&site).args(["--now", "2004-03-21T01:48:44"]);
    cmd.env("HOME", dir.path()).env_remove("SSH_AUTH_SOCK");
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(0);
    assert_eq!(ran.stderr, "", "silent on success");
    let sql1 = gunzip(&dir.path().join("backups/server1/sitedb-20040321-014844.sql.gz"));
    let sql2 = gunzip(&dir.path().join("backups/server2/transdb-20040321-014844.sql.gz"));
    assert!(!String::from_utf8_lossy(&sql1).contains("tbl_private"), "only the named tables");
    server1.db.load("restored_py_sitedb", &sql1);
    let original: Vec<_> =
        server1.db.fingerprint("sitedb").into_iter().filter(|(t, _, _)| SITEDB_TABLES.contains(&t.as_str())).collect();
    assert_eq!(server1.db.fingerprint("restored_py_sitedb"), original);
    server2.db.load("restored_py_transdb", &sql2);
    assert_eq!(server2.db.fingerprint("restored_py_transdb"), server2.db.fingerprint("transdb"));
}

#[test]
fn a_failing_dump_fails_the_run_but_the_other_server_is_still_backed_up() {
    let (server1, server2, _turn) = two_servers();
    let dir = tempfile::tempdir().unwrap();
    // tbl_missing does not exist: mysqldump prints its header, then fails.
    let params = "dumps = \"server1:sitedb:tbl_ccode,tbl_missing server2:transdb\"";
    let site = site_file(dir.path(), &server1, &server2, DUMP_GRANT_1, DUMP_GRANT_2, params);
    let ran = run(&site);
    ran.expect_code(1);
    assert!(ran.stderr.contains("1 backup(s) failed") && ran.stderr.contains("server1 sitedb"), "{}", ran.stderr);
    assert!(ran.stderr.contains("exit status 6") && ran.stderr.contains("Couldn't find table"), "{}", ran.stderr);
    // The run is partial: server2's complete dump is published, server1's
    // failed one appears nowhere, and the error names what failed.
    assert!(
        ran.stderr.contains(
            "backup partial: 1 output(s) published (server2/transdb-20040321-014844.sql.gz), 1 not made \
             (server1/sitedb-20040321-014844.sql.gz)"
        ),
        "{}",
        ran.stderr
    );
    assert_eq!(
        offsite_testkit::tree(&dir.path().join("backups")),
        vec![PathBuf::from("server2"), PathBuf::from("server2/transdb-20040321-014844.sql.gz")]
    );
    let sql2 = gunzip(&dir.path().join("backups/server2/transdb-20040321-014844.sql.gz"));
    server2.db.load("restored_partial_transdb", &sql2);
    assert_eq!(server2.db.fingerprint("restored_partial_transdb"), server2.db.fingerprint("transdb"));
    let runs = dir.path().join("backups/.offsite/runs");
    let left: Vec<PathBuf> = offsite_testkit::tree(&runs).into_iter().filter(|p| runs.join(p).is_file()).collect();
    assert_eq!(left, Vec::<PathBuf>::new(), "no temporary file, nothing kept aside");
    let manifest = only_manifest(&dir.path().join("backups"));
    assert_eq!(manifest["status"], "partial");
    assert_eq!(manifest["failed"][0]["path"], "server1/sitedb-20040321-014844.sql.gz");
    assert_eq!(manifest["failed"][0]["host"], "server1");
    let verified = offsite(Path::new(BIN)).arg("verify").arg(&site).env("HOME", dir.path()).output().unwrap();
    Ran::from_output(verified).expect_code(0);

    // A table the grant does not cover is refused before anything runs.
    let params = "dumps = \"server1:sitedb:tbl_ccode,mysql.user server2:transdb\"";
    let site = site_file(dir.path(), &server1, &server2, DUMP_GRANT_1, DUMP_GRANT_2, params);
    let ran = run(&site);
    ran.expect_code(1);
    assert!(ran.stderr.contains("denied") && ran.stderr.contains("match no granted pattern"), "{}", ran.stderr);
}

/// The one manifest in `store`.
fn only_manifest(store: &Path) -> serde_json::Value {
    let dir = store.join(".offsite/manifests");
    let names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    serde_json::from_slice(&std::fs::read(&names[0]).unwrap()).unwrap()
}

#[test]
fn a_server_down_for_days_keeps_its_last_dump_and_shows_in_status_while_the_other_is_backed_up() {
    let (server1, server2, _turn) = two_servers();
    let dir = tempfile::tempdir().unwrap();
    let params = "dumps = \"server1:sitedb:tbl_ccode server2:transdb\"";
    let site = site_file(dir.path(), &server1, &server2, DUMP_GRANT_1, DUMP_GRANT_2, params);
    let prom = dir.path().join("offsite.prom");
    let good = format!(
        "{}\n[retention]\nkeep_last = 1\n\n[report]\nprometheus = \"{}\"\n",
        std::fs::read_to_string(&site).unwrap(),
        prom.display()
    );
    std::fs::write(&site, &good).unwrap();
    let run_at = |now: &str| {
        let mut cmd = offsite(Path::new(BIN));
        cmd.arg("run").arg(script("mysql-pull")).arg("--site").arg(&site).args(["--now", now]);
        cmd.env("HOME", dir.path()).env_remove("SSH_AUTH_SOCK");
        Ran::from_output(cmd.output().unwrap())
    };
    let status = || {
        let out = offsite(Path::new(BIN)).arg("status").arg(&site).env("HOME", dir.path()).output().unwrap();
        Ran::from_output(out)
    };
    run_at("2004-03-21T01:48:44").expect_code(0);
    let backups = dir.path().join("backups");
    let first = backups.join("server1/sitedb-20040321-014844.sql.gz");
    assert!(first.is_file());

    // server1 goes down: nothing listens on its port any more.
    let closed = std::net::TcpListener::bind((server1.ssh.addr.ip(), 0)).unwrap().local_addr().unwrap().port();
    let port = format!("port = {}\n", server1.ssh.addr.port());
    assert_eq!(good.matches(&port).count(), 1, "server1's port is its own");
    // One attempt a run (the retries' waits have a test of their own).
    std::fs::write(&site, good.replace(&port, &format!("port = {closed}\nretries = 0\n"))).unwrap();
    for day in ["22", "23", "24"] {
        let ran = run_at(&format!("2004-03-{day}T01:48:44"));
        ran.expect_code(1);
        let said = format!(
            "backup partial: 1 output(s) published (server2/transdb-200403{day}-014844.sql.gz), 1 not made \
             (server1/sitedb-200403{day}-014844.sql.gz); the script failed: 1 backup(s) failed: server1 sitedb: "
        );
        assert!(ran.stderr.contains(&said), "{}", ran.stderr);
        assert!(ran.stderr.contains("Connection refused"), "{}", ran.stderr);
        assert!(backups.join(format!("server2/transdb-200403{day}-014844.sql.gz")).is_file(), "server2 is backed up");
    }
    // keep_last = 1, yet server1's only good dump stays: it is the newest
    // copy of its output (its run is kept whole, server2's dump of that day
    // with it). server2's dumps of the days between went.
    assert!(first.is_file(), "server1's last good dump never ages out while server1 is down");
    let mut server2_dumps: Vec<PathBuf> = offsite_testkit::tree(&backups.join("server2"));
    server2_dumps.sort();
    assert_eq!(
        server2_dumps,
        vec![PathBuf::from("transdb-20040321-014844.sql.gz"), PathBuf::from("transdb-20040324-014844.sql.gz")]
    );
    let shown = status();
    shown.expect_code(1);
    assert!(shown.stdout.contains("partial"), "{}", shown.stdout);
    assert!(shown.stdout.contains("outputs:   1 of 2 not made by the last run:"), "{}", shown.stdout);
    let line = shown
        .stdout
        .lines()
        .find(|l| l.contains("server1/sitedb-#.sql.gz: last good copy started"))
        .unwrap_or_else(|| panic!("{}", shown.stdout));
    assert!(line.contains("failed in run") && line.contains("server1"), "{line}");
    let metrics = std::fs::read_to_string(&prom).unwrap();
    assert!(
        metrics.contains("offsite_output_failing{site=\"article\",output=\"server1/sitedb-#.sql.gz\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("offsite_output_failing{site=\"article\",output=\"server2/transdb-#.sql.gz\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("offsite_last_run_status{site=\"article\",status=\"partial\"} 1"), "{metrics}");

    // server1 is back: a good run, and its old dump is now the rules' to prune.
    std::fs::write(&site, &good).unwrap();
    run_at("2004-03-25T01:48:44").expect_code(0);
    assert!(!first.exists(), "server1's old dump is pruned once a newer one exists");
    assert!(backups.join("server1/sitedb-20040325-014844.sql.gz").is_file());
    let shown = status();
    shown.expect_code(0);
    assert!(!shown.stdout.contains("outputs:"), "{}", shown.stdout);
    let metrics = std::fs::read_to_string(&prom).unwrap();
    assert!(
        metrics.contains("offsite_output_failing{site=\"article\",output=\"server1/sitedb-#.sql.gz\"} 0"),
        "{metrics}"
    );
}

#[test]
fn the_articles_remote_backup_command_then_fetch() {
    let (server1, server2, _turn) = two_servers();
    // The article's dbbackup.sh: dump, then tar czf into a known place.
    for (s, db, name) in [(&server1, "sitedb", "userdb"), (&server2, "transdb", "transdb")] {
        let files = s.ssh.files();
        let script = format!(
            "#!/bin/sh\nset -e\ncd {files}\nmysqldump --single-transaction {db} > {name}.sql\ntar czf {name}.tgz {name}.sql\n",
            files = files.display()
        );
        std::fs::write(files.join("dbbackup.sh"), script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(files.join("dbbackup.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let grant = |s: &Server| {
        let f = s.ssh.files();
        format!("commands = [[\"{0}/dbbackup.sh\"]]\nfetch = [\"{0}/*.tgz\"]", f.display())
    };
    let (f1, f2) = (server1.ssh.files(), server2.ssh.files());
    let params = format!(
        "mode = \"command\"\ncommands = \"server1:{0}/dbbackup.sh:{0}/userdb.tgz server2:{1}/dbbackup.sh:{1}/transdb.tgz\"",
        f1.display(),
        f2.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let site = site_file(dir.path(), &server1, &server2, &grant(&server1), &grant(&server2), &params);
    run(&site).expect_code(0);
    for (s, db, file) in [
        (&server1, "sitedb", "server1/userdb-20040321-014844.tgz"),
        (&server2, "transdb", "server2/transdb-20040321-014844.tgz"),
    ] {
        let archive = dir.path().join("backups").join(file);
        let out = Command::new("tar").arg("-xzOf").arg(&archive).output().unwrap();
        assert!(out.status.success(), "GNU tar reads {}", archive.display());
        s.db.load(&format!("restored_{db}"), &out.stdout);
        assert_eq!(s.db.fingerprint(&format!("restored_{db}")), s.db.fingerprint(db));
    }
}

#[test]
fn the_password_can_live_in_the_site_as_a_secret_the_script_never_sees() {
    let (server1, server2, _turn) = servers(false);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("db.pass");
    std::fs::write(&secret, format!("{}\n", server1.db.backup_password())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let grant = |db: &str| {
        format!(
            "commands = [[\"mysqldump\", \"--defaults-extra-file=/dev/stdin\", \"--single-transaction\", \"--quick\", \"--add-drop-table\", \"{db}\", \"tbl_*...\"],\n  [\"mysqldump\", \"--single-transaction\", \"--quick\", \"--add-drop-table\", \"{db}\", \"tbl_*...\"]]"
        )
    };
    let params = format!(
        "dumps = \"server1:sitedb:tbl_ccode,tbl_stats server2:transdb\"\npassword_secret = \"db\"\n\n[secrets]\ndb = {{ file = \"{}\", stdin = \"[client]\\npassword=\\\"{{secret}}\\\"\\n\", programs = [\"mysqldump\"] }}",
        secret.display()
    );
    let site = site_file(dir.path(), &server1, &server2, &grant("sitedb"), &grant("transdb"), &params);
    let ran = run(&site);
    ran.expect_code(0);
    let sql = gunzip(&dir.path().join("backups/server1/sitedb-20040321-014844.sql.gz"));
    server1.db.load("restored_sitedb", &sql);
    let original: Vec<_> =
        server1.db.fingerprint("sitedb").into_iter().filter(|(t, _, _)| t == "tbl_ccode" || t == "tbl_stats").collect();
    assert_eq!(server1.db.fingerprint("restored_sitedb"), original);
    assert!(dir.path().join("backups/server2/transdb-20040321-014844.sql.gz").exists());

    // Without the secret the same dump cannot log in: the password really
    // came from the site.
    let params = "dumps = \"server1:sitedb:tbl_ccode\"";
    let site = site_file(dir.path(), &server1, &server2, &grant("sitedb"), &grant("transdb"), params);
    let ran = run(&site);
    ran.expect_code(1);
    assert!(ran.stderr.contains("Access denied"), "{}", ran.stderr);
}

/// The gate (`offsite keys authorized-line`) on a key that carries a
/// secret to mysqldump on its stdin: the site's runs still work through
/// it, but whoever steals the key and runs the very same granted line
/// with an option file of their own (writing a file with `result-file`,
/// or reaching another server with `host`) changes nothing and reaches
/// nothing. Without the gate the same attack writes the file.
#[test]
fn a_stolen_gated_key_cannot_feed_mysqldump_its_own_option_file() {
    let (server1, server2, _turn) = servers(false);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("db.pass");
    std::fs::write(&secret, format!("{}\n", server1.db.backup_password())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let argv = [
        "mysqldump",
        "--defaults-extra-file=/dev/stdin",
        "--single-transaction",
        "--quick",
        "--add-drop-table",
        "sitedb",
        "tbl_ccode",
    ];
    let grant = format!("commands = [[{}]]", argv.map(|a| format!("\"{a}\"")).join(", "));
    let params = format!(
        "dumps = \"server1:sitedb:tbl_ccode\"\npassword_secret = \"db\"\n\n[secrets]\ndb = {{ file = \"{}\", stdin = \"[client]\\npassword=\\\"{{secret}}\\\"\\n\", programs = [\"mysqldump\"] }}",
        secret.display()
    );
    let site = site_file(dir.path(), &server1, &server2, &grant, DUMP_GRANT_2, &params);
    let mut cmd = offsite(Path::new(BIN));
    cmd.args(["keys", "authorized-line"]).arg(&site).arg("server1");
    let out = Ran::from_output(cmd.output().unwrap());
    out.expect_code(0);
    let gated = out.stdout.lines().find(|l| !l.starts_with('#')).unwrap().to_string();
    assert!(gated.contains("command=\"/bin/sh -c '"), "{gated}");

    // The hostile option files, each sent with the exact granted line.
    let victim = server1.ssh.files().join("victim");
    let line = offsite::transport::quote::command_line(&argv).unwrap();
    let attack = |option_file: &str| {
        use std::io::Write;
        let mut child = server1
            .ssh
            .ssh()
            .arg("--")
            .arg(&line)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(option_file.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let write_file = format!("[client]\nresult-file={}\n", victim.display());
    let other_server = format!(
        "[client]\npassword=\"x\"\n[mysqldump]\nhost={}\nport={}\nprotocol=tcp\n",
        server2.db.addr.ip(),
        server2.db.addr.port()
    );
    let smuggled = format!("[client]\npassword=\"x\"\nresult-file=\"{}\"\n", victim.display());

    // Unrestricted, the key does what the option file says: the attack is real.
    let key = std::fs::read_to_string(server1.ssh.client_key().with_extension("pub")).unwrap();
    std::fs::write(server1.ssh.authorized_keys(), format!("restrict {}", key)).unwrap();
    attack(&write_file);
    assert!(victim.exists(), "the unrestricted key's mysqldump wrote the attacker's file");
    std::fs::remove_file(&victim).unwrap();

    // Gated, every hostile option file is refused before mysqldump runs.
    std::fs::write(server1.ssh.authorized_keys(), format!("{gated}\n")).unwrap();
    for hostile in [&write_file, &other_server, &smuggled] {
        let out = attack(hostile);
        assert_eq!(out.status.code(), Some(126), "{hostile:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout.is_empty(), "{hostile:?}: nothing dumped");
        assert!(String::from_utf8_lossy(&out.stderr).contains("reads on stdin only what its site sends"));
        assert!(!victim.exists(), "{hostile:?} wrote a file on the server");
    }

    // The site's own run goes through the gate with its secret.
    let ran = run(&site);
    ran.expect_code(0);
    let sql = gunzip(&dir.path().join("backups/server1/sitedb-20040321-014844.sql.gz"));
    assert!(String::from_utf8_lossy(&sql).contains("tbl_ccode"));
    // And check calls the key restricted to the current grants.
    let mut cmd = offsite(Path::new(BIN));
    cmd.args(["check", "--connect"]).arg(&site);
    let checked = Ran::from_output(cmd.output().unwrap());
    assert!(checked.stdout.contains("restricted to the site's current command lines"), "{}", checked.stdout);
}

/// The article's scenario with the backups going to S3-compatible storage
/// (a real SeaweedFS): the dumps arrive as objects, restore to the live
/// databases, and `verify --restore-test` loads them from the bucket.
#[test]
fn the_dumps_go_to_an_s3_store_and_restore_from_it() {
    use offsite_testkit::seaweed::{ACCESS_KEY, S3Space, SECRET_KEY};
    let (server1, server2, _turn) = two_servers();
    let s3 = S3Space::shared();
    s3.create_bucket("offsite");
    let store = s3.url("s3://offsite/article");
    let dir = tempfile::tempdir().unwrap();
    let params = "dumps = \"server1:sitedb:tbl_ccode,tbl_machine,tbl_session,tbl_stats server2:transdb\"";
    let site = site_file(dir.path(), &server1, &server2, DUMP_GRANT_1, DUMP_GRANT_2, params);
    let text = std::fs::read_to_string(&site).unwrap();
    let local_store = format!("store = \"{}\"", dir.path().join("backups").display());
    let text = text.replace(&local_store, &format!("store = \"{store}\""))
        + &format!("\n[s3]\nendpoint = \"{}\"\npath_style = true\n", s3.endpoint());
    std::fs::write(&site, text).unwrap();
    let with_keys = |cmd: &mut Command| {
        cmd.env("HOME", dir.path())
            .env_remove("SSH_AUTH_SOCK")
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    };
    let mut cmd = offsite(Path::new(BIN));
    cmd.arg("run").arg(offsite_testkit::script("mysql-pull")).arg("--site").arg(&site);
    cmd.args(["--now", "2004-03-21T01:48:44"]);
    with_keys(&mut cmd);
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(0);
    assert_eq!(ran.stderr, "", "silent on success");
    assert!(!dir.path().join("backups").exists(), "nothing on local disk");

    // Each dump, downloaded from the bucket, restores to the live data.
    let bucket = {
        use offsite::s3::{Bucket, S3Location, S3Settings, credentials::Credentials};
        let settings = S3Settings { endpoint: Some(s3.endpoint()), path_style: true, ..Default::default() };
        let creds = Credentials {
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: SECRET_KEY.into(),
            session_token: None,
            source: "test".into(),
        };
        let location = S3Location::parse(&store).unwrap();
        Bucket::open(&location, &settings, &creds, None, std::time::Duration::from_secs(20)).unwrap()
    };
    let fetch = |rel: &str| {
        let path = dir.path().join(rel.replace('/', "_"));
        let mut file = std::fs::File::create(&path).unwrap();
        bucket.download(rel, &mut file).unwrap();
        gunzip(&path)
    };
    let sql1 = fetch("server1/sitedb-20040321-014844.sql.gz");
    let sql2 = fetch("server2/transdb-20040321-014844.sql.gz");
    server1.db.load("restored_sitedb", &sql1);
    let original: Vec<_> =
        server1.db.fingerprint("sitedb").into_iter().filter(|(t, _, _)| SITEDB_TABLES.contains(&t.as_str())).collect();
    assert_eq!(server1.db.fingerprint("restored_sitedb"), original);
    server2.db.load("restored_transdb", &sql2);
    assert_eq!(server2.db.fingerprint("restored_transdb"), server2.db.fingerprint("transdb"));

    let defaults = dir.path().join("verify.cnf");
    std::fs::write(&defaults, format!("[client]\nuser=root\nsocket={}\n", server1.db.socket().display())).unwrap();
    let mut cmd = offsite(Path::new(BIN));
    cmd.args(["-v", "verify"])
        .arg(&site)
        .args(["--restore-test", "scratch_restore", "--mysql-defaults"])
        .arg(&defaults);
    with_keys(&mut cmd);
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(0);
    assert!(ran.stdout.contains("sitedb-20040321-014844.sql.gz: restore test ok (4 tables, "), "{}", ran.stdout);
    assert!(ran.stdout.contains("downloaded and hashed"), "{}", ran.stdout);
}
