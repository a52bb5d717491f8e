//! The harness's own servers are real: OpenSSH's client talks to them.

use offsite_testkit::sshd::Sshd;

#[test]
fn two_sshd_servers_on_their_own_loopback_addresses() {
    let server1 = Sshd::start("127.0.0.2");
    let server2 = Sshd::start("127.0.0.3");
    assert_ne!(server1.known_hosts_line.split(' ').nth(2), server2.known_hosts_line.split(' ').nth(2), "own host keys");
    for (server, name) in [(&server1, "server1"), (&server2, "server2")] {
        let out = server.ssh().args(["echo", name]).output().unwrap();
        assert!(
            out.status.success(),
            "ssh to {name} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            server.log()
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);
    }
}

#[test]
fn strict_host_key_checking_refuses_the_other_servers_key() {
    let server1 = Sshd::start("127.0.0.2");
    let server2 = Sshd::start("127.0.0.3");
    // server1's known_hosts file, pointed at server2: an unknown key.
    let out = server2.ssh_trusting(&server1.known_hosts()).arg("true").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"));
}

/// A shared database server is, at every turn, what a new one is: what
/// the last test made (databases, accounts, a changed `backup` account)
/// is gone.
#[test]
fn a_shared_database_server_is_emptied_for_every_turn() {
    use offsite_testkit::mariadb::MariaDb;
    use offsite_testkit::postgres::Postgres;
    use offsite_testkit::shared::turn;

    let mariadb_state = |db: &MariaDb| {
        [
            db.sql("SHOW DATABASES"),
            db.sql("SELECT user, host, authentication_string FROM mysql.user ORDER BY 1, 2"),
            db.sql("SHOW GRANTS FOR 'backup'@'localhost'"),
        ]
    };
    let new = {
        let first = turn("mysql-accounts");
        let db = MariaDb::shared("127.0.0.2", &first);
        let new = mariadb_state(db);
        db.sql(
            "CREATE DATABASE left_over; CREATE TABLE left_over.t (x INT);\n\
             CREATE USER 'intruder'@'%' IDENTIFIED BY 'x';\n\
             ALTER USER 'backup'@'localhost' IDENTIFIED BY 'changed';\n\
             GRANT ALL ON *.* TO 'backup'@'localhost';",
        );
        assert_ne!(mariadb_state(db), new);
        new
    };
    let mysql_turn = turn("mysql-accounts");
    assert_eq!(mariadb_state(MariaDb::shared("127.0.0.2", &mysql_turn)), new, "MariaDB after a reset");
    drop(mysql_turn);

    let postgres_state = |db: &Postgres| {
        [
            db.sql("SELECT datname FROM pg_database ORDER BY 1"),
            db.sql("SELECT rolname FROM pg_roles ORDER BY 1"),
            db.sql("SELECT roleid::regrole FROM pg_auth_members WHERE member = 'backup'::regrole ORDER BY 1"),
        ]
    };
    let new = {
        let first = turn("postgres-accounts");
        let db = Postgres::shared("127.0.0.3", &first);
        let new = postgres_state(db);
        db.sql("CREATE DATABASE left_over");
        db.sql_in("left_over", "CREATE TABLE t (x INT)");
        db.sql("CREATE ROLE intruder LOGIN PASSWORD 'x'; ALTER ROLE backup PASSWORD 'changed'");
        db.sql("GRANT pg_write_all_data TO backup");
        assert_ne!(postgres_state(db), new);
        new
    };
    let pg_turn = turn("postgres-accounts");
    assert_eq!(postgres_state(Postgres::shared("127.0.0.3", &pg_turn)), new, "PostgreSQL after a reset");
}
