//! PostgreSQL end to end: one site file and the shared `pg-pull` script
//! back up two servers, each a real sshd with its own login user and a real
//! PostgreSQL whose password is only in that user's `~/.pgpass`. Every dump
//! is restored into a fresh database and compared table by table (row
//! count and an md5 over every row's text).

use std::path::{Path, PathBuf};

use offsite_testkit::postgres::Postgres;
use offsite_testkit::sshd::Sshd;
use offsite_testkit::{Ran, gunzip, offsite, run_script};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");
const SITEDB_TABLES: [&str; 4] = ["tbl_ccode", "tbl_machine", "tbl_session", "tbl_stats"];
/// A database name that needs quoting in a libpq connection string.
const ODD_DB: &str = "it's=odd";

struct Server {
    ssh: Sshd,
    db: &'static Postgres,
}

/// The two servers: each its own sshd, and this test process's PostgreSQL
/// on the address, emptied for this test. Their login users' `~/.pgpass`
/// and `~/.pg_service.conf` name those servers, so the tests here take
/// turns: the guard is held for the whole test.
fn two_servers() -> (Server, Server, offsite_testkit::shared::Turn) {
    let turn = offsite_testkit::shared::turn("postgres-accounts");
    let start = |ip: &'static str, user: &'static str| {
        let ssh = Sshd::start_as(ip, user);
        let db = Postgres::shared(ip, &turn);
        db.write_client_files(&ssh.home(), &ssh.user, "offsite", true);
        Server { ssh, db }
    };
    let (server1, server2) = std::thread::scope(|s| {
        let a = s.spawn(|| start("127.0.0.2", "offsite-pg1"));
        let b = s.spawn(|| start("127.0.0.3", "offsite-pg2"));
        (a.join().unwrap(), b.join().unwrap())
    });
    populate_sitedb(server1.db);
    populate_transdb(server2.db);
    (server1, server2, turn)
}

fn populate_sitedb(db: &Postgres) {
    db.sql("CREATE DATABASE sitedb");
    db.sql_in(
        "sitedb",
        "CREATE TABLE tbl_ccode (code CHAR(2) PRIMARY KEY, name TEXT NOT NULL);\n\
         INSERT INTO tbl_ccode VALUES ('US','United States'),('FR','France'),('JP','日本'),('XX','O''Brien; DROP TABLE x; --');\n\
         CREATE TABLE tbl_machine (id INT PRIMARY KEY, hostname TEXT, ip INET, notes TEXT);\n\
         INSERT INTO tbl_machine SELECT i, 'web' || i || '.example.com', ('10.0.' || i / 256 || '.' || i % 256)::inet, \
           CASE WHEN i % 3 = 0 THEN NULL ELSE repeat(E'x\\n\\t\"\\\\', i % 7) END FROM generate_series(1, 500) i;\n\
         CREATE TABLE tbl_session (id BIGINT PRIMARY KEY, machine INT, started TIMESTAMPTZ, payload BYTEA);\n\
         INSERT INTO tbl_session SELECT i, i % 500 + 1, TIMESTAMPTZ '2004-03-21 01:48:44+00' + i * INTERVAL '1 second', \
           decode(md5(i::text), 'hex') FROM generate_series(1, 20000) i;\n\
         CREATE TABLE tbl_stats (day DATE PRIMARY KEY, hits INT, ratio DOUBLE PRECISION, amount NUMERIC(12,2));\n\
         INSERT INTO tbl_stats SELECT DATE '2000-01-01' + i, i * 37 % 10007, i / 7.0, i * 1.25 FROM generate_series(0, 3000) i;\n\
         CREATE TABLE tbl_private (secret TEXT);\n\
         INSERT INTO tbl_private VALUES ('not part of the backup');",
    );
}

fn populate_transdb(db: &Postgres) {
    db.sql("CREATE DATABASE transdb");
    db.sql_in(
        "transdb",
        "CREATE TABLE transactions (id BIGINT PRIMARY KEY, amount NUMERIC(12,2), memo TEXT);\n\
         INSERT INTO transactions SELECT i, i * 1.25, 'payment #' || i || ' ''quoted''' FROM generate_series(1, 30000) i;\n\
         CREATE TABLE accounts (id INT PRIMARY KEY, owner TEXT);\n\
         INSERT INTO accounts SELECT i, 'owner ' || i FROM generate_series(1, 100) i;",
    );
}

/// The site file: both hosts with exactly the grants the script needs.
fn site_file(dir: &Path, server1: &Server, server2: &Server, params: &str) -> PathBuf {
    let grant1 = "commands = [[\"pg_dump\", \"--no-password\", \"--strict-names\", \
                  \"--dbname=service=offsite dbname=sitedb\", \"--table=tbl_*...\"],\n\
                  [\"pg_dumpall\", \"--no-password\", \"--globals-only\", \"--no-role-passwords\", \
                  \"--dbname=service=offsite\"]]";
    // Any database on server2, whole.
    let grant2 =
        "commands = [[\"pg_dump\", \"--no-password\", \"--strict-names\", \"--dbname=service=offsite dbname=*\"]]";
    std::fs::write(dir.join("ssh_config"), "").unwrap();
    let text = format!(
        "name = \"pg\"\nstore = \"{}\"\nssh_config = \"{}\"\n\n[params]\nservice = \"offsite\"\n{params}\n\n{}\n{}",
        dir.join("backups").display(),
        dir.join("ssh_config").display(),
        server1.ssh.host_section("server1", grant1),
        server2.ssh.host_section("server2", grant2),
    );
    let file = dir.join("pg.toml");
    std::fs::write(&file, text).unwrap();
    file
}

fn run(site: &Path) -> Ran {
    run_script(Path::new(BIN), "pg-pull", site)
}

#[test]
fn one_script_dumps_both_servers_and_every_dump_restores_identically() {
    let (server1, server2, _turn) = two_servers();
    server2.db.sql(&format!("CREATE DATABASE \"{}\"", ODD_DB.replace('"', "\"\"")));
    server2.db.sql_in(
        ODD_DB,
        "CREATE TABLE t (v TEXT); INSERT INTO t VALUES ('odd one');\n\
         CREATE TABLE \"we\"\"ird (name)\" (v INT); INSERT INTO \"we\"\"ird (name)\" VALUES (1), (2), (3);",
    );
    let dir = tempfile::tempdir().unwrap();
    let params = format!(
        "dumps = \"server1:sitedb:tbl_ccode,tbl_machine,tbl_session,tbl_stats server2:transdb server2:{ODD_DB}\"\n\
         globals = \"server1\""
    );
    let site = site_file(dir.path(), &server1, &server2, &params);
    let ran = run(&site);
    ran.expect_code(0);
    assert_eq!(ran.stderr, "", "silent on success, as cron wants");

    let backups = dir.path().join("backups");
    let sql1 = gunzip(&backups.join("server1/sitedb-20040321-014844.sql.gz"));
    let sql2 = gunzip(&backups.join("server2/transdb-20040321-014844.sql.gz"));
    let text1 = String::from_utf8_lossy(&sql1);
    assert!(text1[text1.len() - 200..].contains("-- PostgreSQL database dump complete"));
    assert!(!text1.contains("tbl_private") && !text1.contains("not part of the backup"), "only the named tables");
    assert!(!text1.contains(server1.db.backup_password()));

    server1.db.load("restored_sitedb", &sql1);
    let original: Vec<_> =
        server1.db.fingerprint("sitedb").into_iter().filter(|(t, _, _)| SITEDB_TABLES.contains(&t.as_str())).collect();
    assert_eq!(original.len(), 4);
    assert_eq!(server1.db.fingerprint("restored_sitedb"), original);
    assert_eq!(original.iter().find(|t| t.0 == "tbl_session").unwrap().1, 20000);
    server2.db.load("restored_transdb", &sql2);
    let transdb = server2.db.fingerprint("transdb");
    assert_eq!(transdb.iter().map(|t| t.1).collect::<Vec<_>>(), [100, 30000]);
    assert_eq!(server2.db.fingerprint("restored_transdb"), transdb);

    // server1's roles, without their passwords (the backup role has one).
    let globals = String::from_utf8(gunzip(&backups.join("server1/globals-20040321-014844.sql.gz"))).unwrap();
    assert!(globals.contains("CREATE ROLE backup;") && globals.contains("GRANT pg_read_all_data TO backup"));
    assert!(globals.trim_end().ends_with("-- PostgreSQL database cluster dump complete\n--"), "{globals}");
    assert!(!globals.contains("PASSWORD") && !globals.contains("SCRAM-SHA-256$"), "{globals}");
    assert!(!globals.contains("CREATE DATABASE"), "roles and tablespaces only");

    // The name that needed quoting reached pg_dump intact.
    let odd = gunzip(&backups.join(format!("server2/{ODD_DB}-20040321-014844.sql.gz")));
    server2.db.load("restored_odd", &odd);
    assert_eq!(server2.db.sql_in("restored_odd", "SELECT v FROM t").trim(), "odd one");

    // `verify --restore-test` does it from the store: it tells pg_dump's
    // format by its header, loads each dump into a scratch database it
    // creates on the server libpq's environment names, compares row counts
    // with the COPY data, and drops the database.
    let verify = |db: &str| {
        let mut cmd = offsite(Path::new(BIN));
        cmd.args(["-v", "verify"]).arg(&site).args(["--restore-test", db]);
        cmd.env("PGHOST", server1.db.socket_dir()).env("PGPORT", server1.db.addr.port().to_string());
        cmd.env("PGUSER", "postgres");
        Ran::from_output(cmd.output().unwrap())
    };
    let ran = verify("scratch_restore");
    ran.expect_code(0);
    for line in [
        "sitedb-20040321-014844.sql.gz: restore test ok (4 tables, 23505 rows; PostgreSQL)",
        "transdb-20040321-014844.sql.gz: restore test ok (2 tables, 30100 rows; PostgreSQL)",
        "odd-20040321-014844.sql.gz: restore test ok (2 tables, 4 rows; PostgreSQL)",
        "globals-20040321-014844.sql.gz: not loaded: a PostgreSQL cluster-wide dump (roles, tablespaces)",
    ] {
        assert!(ran.stdout.contains(line), "{line:?} in:\n{}", ran.stdout);
    }
    let left = server1.db.sql("SELECT count(*) FROM pg_database WHERE datname = 'scratch_restore'");
    assert_eq!(left.trim(), "0", "the scratch database is dropped");
    // A database that exists is never loaded into.
    verify("sitedb").expect_code(1).expect_stderr("the scratch database sitedb exists");

    // `restore --into-database`: the same restricted psql, one
    // transaction, kept; every table equal.
    let restore = |args: &[&str]| {
        let mut cmd = offsite(Path::new(BIN));
        cmd.arg("restore").arg(&site).args(args);
        cmd.env("PGHOST", server1.db.socket_dir()).env("PGPORT", server1.db.addr.port().to_string());
        cmd.env("PGUSER", "postgres");
        Ran::from_output(cmd.output().unwrap())
    };
    let sitedb = ["latest", "server1/sitedb-*.sql.gz", "--into-database"];
    restore(&[&sitedb[..], &["sitedb_back"]].concat())
        .expect_code(0)
        .expect_stdout("PostgreSQL database sitedb_back: 4 tables");
    assert_eq!(server1.db.fingerprint("sitedb_back"), original);
    restore(&[&sitedb[..], &["sitedb_back"]].concat()).expect_code(1).expect_stderr("sitedb_back is not empty");
    // Forced over the tables it made, the dump's CREATE TABLE fails: the
    // one transaction is rolled back and the database is as it was.
    restore(&[&sitedb[..], &["sitedb_back", "--force"]].concat())
        .expect_code(1)
        .expect_stderr("rolled back: sitedb_back is as it was");
    assert_eq!(server1.db.fingerprint("sitedb_back"), original);
    restore(&["latest", "server1/globals-*.sql.gz", "--into-database", "x"])
        .expect_code(1)
        .expect_stderr("a pg_dumpall dump");
    // A manifest that says another hash: the check at the dump's end
    // fails before psql may commit; the database this created is dropped.
    offsite_testkit::claim_another_hash(&backups, &backups.join("server1/sitedb-20040321-014844.sql.gz"));
    restore(&[&sitedb[..], &["sitedb_tampered"]].concat())
        .expect_code(1)
        .expect_stderr("the manifest says 0000")
        .expect_stderr("was dropped again");
    let left = server1.db.sql("SELECT count(*) FROM pg_database WHERE datname = 'sitedb_tampered'");
    assert_eq!(left.trim(), "0");
    // Into a database that exists and is empty: the failed check leaves
    // it empty (the transaction never committed).
    server1.db.sql("CREATE DATABASE sitedb_empty");
    restore(&[&sitedb[..], &["sitedb_empty"]].concat()).expect_code(1).expect_stderr("rolled back");
    assert_eq!(server1.db.fingerprint("sitedb_empty"), vec![], "nothing of the dump committed");
}

#[test]
fn failures_publish_only_the_dumps_that_succeeded_and_say_why() {
    let (server1, server2, _turn) = two_servers();
    let dir = tempfile::tempdir().unwrap();
    let backups = dir.path().join("backups");

    // tbl_missing matches no table: --strict-names makes pg_dump fail
    // rather than quietly dump less than was asked for.
    let site =
        site_file(dir.path(), &server1, &server2, "dumps = \"server1:sitedb:tbl_ccode,tbl_missing server2:transdb\"");
    let ran = run(&site);
    ran.expect_code(1);
    assert!(ran.stderr.contains("1 backup(s) failed") && ran.stderr.contains("server1 sitedb"), "{}", ran.stderr);
    assert!(ran.stderr.contains("no matching tables were found"), "{}", ran.stderr);
    // The run is partial: server2's complete dump is published, nothing of
    // server1's failed one appears, and no temporary file is left.
    assert!(ran.stderr.contains("backup partial: 1 output(s) published (server2/transdb-"), "{}", ran.stderr);
    let published = vec![PathBuf::from("server2"), PathBuf::from("server2/transdb-20040321-014844.sql.gz")];
    assert_eq!(offsite_testkit::tree(&backups), published);
    let runs = backups.join(".offsite/runs");
    let left: Vec<PathBuf> = offsite_testkit::tree(&runs).into_iter().filter(|p| runs.join(p).is_file()).collect();
    assert_eq!(left, Vec::<PathBuf>::new());

    // A database that does not exist.
    let site = site_file(dir.path(), &server1, &server2, "dumps = \"server2:nosuchdb\"");
    let ran = run(&site);
    ran.expect_code(1);
    assert!(ran.stderr.contains("database \"nosuchdb\" does not exist"), "{}", ran.stderr);

    // A table outside the grant is refused before anything runs.
    let site = site_file(dir.path(), &server1, &server2, "dumps = \"server1:sitedb:tbl_ccode,pg_authid\"");
    let ran = run(&site);
    ran.expect_code(1);
    assert!(ran.stderr.contains("denied") && ran.stderr.contains("match no granted pattern"), "{}", ran.stderr);

    // Without ~/.pgpass pg_dump has no password, and it does not prompt.
    server1.db.write_client_files(&server1.ssh.home(), &server1.ssh.user, "offsite", false);
    let site = site_file(dir.path(), &server1, &server2, "dumps = \"server1:sitedb:tbl_ccode\"");
    let ran = run(&site);
    ran.expect_code(1);
    assert!(ran.stderr.contains("no password supplied"), "{}", ran.stderr);
    assert_eq!(offsite_testkit::tree(&backups), published, "no dump of server1 appears");
}
