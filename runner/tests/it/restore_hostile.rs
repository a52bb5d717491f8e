//! `verify --restore-test` against dumps from a compromised server: the
//! dump is data, and nothing in it may run on the storage box. The fake
//! `mysqldump` and `pg_dump` on the (real) sshd print dumps full of client
//! commands (`\!`, `system`, `\o |cmd`, `\copy ... program`), mid-line too;
//! the restore test must refuse them, and load only what a manifest says a
//! database dump tool made.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use offsite_testkit::mariadb::MariaDb;
use offsite_testkit::postgres::Postgres;
use offsite_testkit::sshd::Sshd;
use offsite_testkit::{Ran, offsite, script};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

fn executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs the probe script on `site` to stream what `argv` (arguments split
/// by U+001F) prints on the server into `dest` in the store; it must work.
fn stream_into_store(site: &Path, home: &Path, argv: &str, dest: &str) {
    let mut cmd = offsite(Path::new(BIN));
    cmd.arg("run").arg(script("probe")).arg("--site").arg(site);
    cmd.args(["--param", "op=stream", "--param"]).arg(format!("dest={dest}"));
    cmd.arg("--param").arg(format!("argv={argv}"));
    cmd.env("HOME", home).env_remove("SSH_AUTH_SOCK");
    Ran::from_output(cmd.output().unwrap()).expect_code(0);
}

#[test]
fn client_commands_in_a_stored_dump_never_run_on_the_storage_box() {
    let server = Sshd::start("127.0.0.2");
    let (mysql, pg) = (MariaDb::start("127.0.0.2"), Postgres::start("127.0.0.3"));
    let dir = tempfile::tempdir().unwrap();
    let marker = |n: u32| dir.path().join(format!("pwned-{n}"));
    let files = server.files();
    // Each line would touch a marker on the machine that loads the dump.
    let m = |n: u32| marker(n).display().to_string();
    executable(
        &files.join("mysqldump"),
        &format!(
            "#!/bin/sh\ncat <<'EOF'\n-- MySQL dump 10.19\nCREATE TABLE t (id INT);\nINSERT INTO t VALUES (1),(2);\n\
             \\! touch {}\nsystem touch {}\nSELECT 1; \\! touch {}\n-- Dump completed on 2026-11-30\nEOF\n",
            m(1),
            m(2),
            m(3)
        ),
    );
    executable(
        &files.join("pg_dump"),
        &format!(
            "#!/bin/sh\ncat <<'EOF'\n--\n-- PostgreSQL database dump\n--\n\\unrestrict guessed\n\
             CREATE TABLE public.t (id integer);\n\\! touch {}\nSELECT 1; \\! touch {}\n\\o |touch {}\n\
             \\copy public.t from program 'touch {}'\nCOPY public.t (id) FROM stdin;\n1\n\\.\n\
             -- PostgreSQL database dump complete\nEOF\n",
            m(4),
            m(5),
            m(6),
            m(7)
        ),
    );
    // A dump that a plain `cat` stored under a .sql name.
    std::fs::write(files.join("plain.sql"), format!("\\! touch {}\n", m(8))).unwrap();
    std::fs::write(dir.path().join("ssh_config"), "").unwrap();
    let grants =
        format!("commands = [[\"{0}/mysqldump\"], [\"{0}/pg_dump\"], [\"cat\", \"{0}/plain.sql\"]]", files.display());
    let site = dir.path().join("site.toml");
    std::fs::write(
        &site,
        format!("store = \"store\"\nssh_config = \"ssh_config\"\n{}", server.host_section("server1", &grants)),
    )
    .unwrap();
    let f = files.display();
    for (argv, dest) in [
        (format!("{f}/mysqldump"), "evil-mysql.sql"),
        (format!("{f}/pg_dump"), "evil-pg.sql"),
        (format!("cat\u{1f}{f}/plain.sql"), "plain.sql"),
    ] {
        stream_into_store(&site, dir.path(), &argv, dest);
    }

    let defaults = dir.path().join("verify.cnf");
    std::fs::write(&defaults, format!("[client]\nuser=root\nsocket={}\n", mysql.socket().display())).unwrap();
    let mut cmd = offsite(Path::new(BIN));
    cmd.args(["-v", "verify"])
        .arg(&site)
        .args(["--restore-test", "scratch_hostile", "--mysql-defaults"])
        .arg(&defaults);
    cmd.env("PGHOST", pg.socket_dir()).env("PGPORT", pg.addr.port().to_string()).env("PGUSER", "postgres");
    let ran = Ran::from_output(cmd.output().unwrap());
    for n in 1..=8 {
        assert!(
            !marker(n).exists(),
            "marker {n}: a command in a dump ran on the storage box:\n{}\n{}",
            ran.stdout,
            ran.stderr
        );
    }
    ran.expect_code(1);
    assert!(ran.stderr.contains("evil-mysql.sql: restore test failed"), "{}", ran.stderr);
    assert!(ran.stderr.contains("evil-pg.sql: restore test failed"), "{}", ran.stderr);
    assert!(
        ran.stdout.contains("plain.sql: not loaded: its manifest does not say mysqldump or pg_dump made it"),
        "{}",
        ran.stdout
    );
    // And the scratch databases are gone.
    assert_eq!(mysql.sql("SHOW DATABASES LIKE 'scratch_hostile'"), "");
    assert_eq!(pg.sql("SELECT count(*) FROM pg_database WHERE datname = 'scratch_hostile'").trim(), "0");
}

/// A compromised server sizes what it sends: an archive whose GNU long
/// name is 2 MB, and a dump with a 20 MB line. verify reports each as a
/// problem (it used to hold them whole, and pass the archive), and the
/// restore test loads nothing of the dump.
#[test]
fn oversized_items_a_server_sends_are_problems_not_held_whole() {
    let server = Sshd::start("127.0.0.2");
    let mysql = MariaDb::start("127.0.0.2");
    let dir = tempfile::tempdir().unwrap();
    let files = server.files();
    std::fs::create_dir_all(files.join("big")).unwrap();
    // The archive: a valid GNU tar whose first entry's long name record
    // holds 2 MB.
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    let long = format!("{}/f", "d".repeat(2 << 20));
    header.set_size(1);
    header.set_mode(0o644);
    builder.append_data(&mut header, &long, &b"x"[..]).unwrap();
    std::fs::write(files.join("big/evil.tar"), builder.into_inner().unwrap()).unwrap();
    executable(
        &files.join("big/mysqldump"),
        "#!/bin/sh\nprintf -- '-- MySQL dump 10.19\\nCREATE TABLE t (id INT);\\nINSERT INTO t VALUES (1);'\n\
         head -c 20000000 /dev/zero | tr '\\0' ' '\nprintf '\\n-- Dump completed on 2026-12-04\\n'\n",
    );
    std::fs::write(dir.path().join("ssh_config"), "").unwrap();
    let f = files.display();
    let grants = format!("commands = [[\"{f}/big/mysqldump\"], [\"cat\", \"{f}/big/evil.tar\"]]");
    let site = dir.path().join("site.toml");
    std::fs::write(
        &site,
        format!("store = \"store\"\nssh_config = \"ssh_config\"\n{}", server.host_section("server1", &grants)),
    )
    .unwrap();
    for (argv, dest) in [(format!("{f}/big/mysqldump"), "big.sql"), (format!("cat\u{1f}{f}/big/evil.tar"), "evil.tar")]
    {
        stream_into_store(&site, dir.path(), &argv, dest);
    }
    // GNU tar reads the archive: it is well-formed, only oversized.
    let mut plain = offsite(Path::new(BIN));
    let ran = Ran::from_output(plain.args(["verify"]).arg(&site).output().unwrap());
    ran.expect_code(1);
    assert!(ran.stderr.contains("evil.tar") && ran.stderr.contains("more than any archiver writes"), "{}", ran.stderr);

    let defaults = dir.path().join("verify.cnf");
    std::fs::write(&defaults, format!("[client]\nuser=root\nsocket={}\n", mysql.socket().display())).unwrap();
    let mut cmd = offsite(Path::new(BIN));
    cmd.args(["verify"]).arg(&site).args(["--restore-test", "scratch_big", "--mysql-defaults"]).arg(&defaults);
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(1);
    assert!(ran.stderr.contains("big.sql: restore test failed"), "{}", ran.stderr);
    assert!(ran.stderr.contains("line 3 of the dump: longer than 16 MiB"), "{}", ran.stderr);
    assert!(ran.stderr.len() < 64 << 10, "the problem lines stay short: {} bytes", ran.stderr.len());
    assert_eq!(mysql.sql("SHOW DATABASES LIKE 'scratch_big'"), "");
}
