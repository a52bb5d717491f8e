//! A real PostgreSQL server on a loopback address, one per simulated server.
//!
//! Each instance gets a fresh cluster (`initdb`) owned by the `postgres`
//! system account, as a packaged server is. It listens on a free TCP port of
//! its address, where every login needs a password (SCRAM), and on a Unix
//! socket in a directory only `postgres` and root can enter, where the tests
//! administer it without one. It has a `backup` role that may read every
//! table (`pg_read_all_data`); that role's password lives only in a
//! `~/.pgpass` owned by the sshd login user, next to a `~/.pg_service.conf`
//! saying where the server is. A test either starts a server of its own
//! ([`Postgres::start`], which disappears with its scratch directory) or,
//! during its turn at the login accounts, takes this process's server on
//! the address, emptied for it ([`Postgres::shared`]).

use crate::set_mode;
use crate::shared::{DbServer, PerAddress, Turn};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `postgres`; stopped when dropped.
pub struct Postgres {
    child: Child,
    dir: PathBuf,
    /// The scratch directory of a server of one test's own, removed with it.
    _own: Option<tempfile::TempDir>,
    pub addr: SocketAddr,
}

const BACKUP_PASSWORD: &str = "pg-B4ckup-S3cret";
const BACKUP_ROLE: &str = "CREATE ROLE backup LOGIN PASSWORD 'pg-B4ckup-S3cret';\nGRANT pg_read_all_data TO backup;";

impl Postgres {
    /// Initialises a cluster and starts a server of the caller's own on
    /// `ip`: for a test that stops the server or needs one nobody else has
    /// used.
    pub fn start(ip: &str) -> Postgres {
        crate::shared::own_server(ip)
    }

    /// This test process's server on `ip`, started on first use, emptied
    /// for the caller: every database and role a test made is dropped, and
    /// `backup` has its password and membership as new. The caller holds
    /// the turn at the login accounts (`postgres-accounts`), which every
    /// test that uses the shared server takes, so no other test uses it
    /// until that turn ends. It lives as long as the process.
    pub fn shared(ip: &str, _turn: &Turn) -> &'static Postgres {
        static SERVERS: PerAddress<Postgres> = PerAddress::new();
        crate::shared::shared_server(&SERVERS, ip)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("postgres exited with {status}:\n{}", self.log());
            }
            let ok = Command::new(bin("pg_isready"))
                .arg("-q")
                .arg("-h")
                .arg(&self.dir)
                .arg("-p")
                .arg(self.addr.port().to_string())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "postgres did not come up within 60 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The directory of the server's Unix socket (`PGHOST` for a client
    /// that logs in as `postgres` without a password).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The `backup` role's password (only tests see it).
    pub fn backup_password(&self) -> &'static str {
        BACKUP_PASSWORD
    }

    /// Writes what a sysadmin puts in the login user's home on the server:
    /// `~/.pg_service.conf` with a `[service]` section (host, port, user
    /// `backup`), and, when `password` is true, `~/.pgpass` (mode 0600,
    /// libpq ignores it otherwise) with the role's password.
    pub fn write_client_files(&self, home: &Path, owner: &str, service: &str, password: bool) {
        let conf = home.join(".pg_service.conf");
        std::fs::write(
            &conf,
            format!("[{service}]\nhost={}\nport={}\nuser=backup\n", self.addr.ip(), self.addr.port()),
        )
        .unwrap();
        let pgpass = home.join(".pgpass");
        let _ = std::fs::remove_file(&pgpass);
        let mut files = vec![conf];
        if password {
            std::fs::write(&pgpass, format!("{}:{}:*:backup:{BACKUP_PASSWORD}\n", self.addr.ip(), self.addr.port()))
                .unwrap();
            set_mode(&pgpass, 0o600);
            files.push(pgpass);
        }
        for f in files {
            let status = Command::new("chown").arg(owner).arg(&f).status().unwrap();
            assert!(status.success(), "chown {owner} {}", f.display());
        }
    }

    /// Runs SQL as the superuser in `postgres` and returns its output.
    pub fn sql(&self, sql: &str) -> String {
        self.sql_in("postgres", sql)
    }

    /// Runs SQL as the superuser in database `db`: unaligned, tuples only.
    pub fn sql_in(&self, db: &str, sql: &str) -> String {
        let out = self.psql(db).args(["-A", "-t", "-c", sql]).output().expect("run psql");
        assert!(out.status.success(), "SQL failed: {sql}\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn psql(&self, db: &str) -> Command {
        let mut cmd = Command::new(bin("psql"));
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-h"])
            .arg(&self.dir)
            .arg("-p")
            .arg(self.addr.port().to_string())
            .arg("-d")
            .arg(conninfo_dbname(db));
        cmd
    }

    /// Creates `db` and loads a plain SQL dump into it; any error fails.
    pub fn load(&self, db: &str, dump: &[u8]) {
        use std::io::Write;
        self.sql(&format!("CREATE DATABASE \"{db}\""));
        let mut child =
            self.psql(db).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(dump).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "loading the dump into {db} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `(table, rows, md5 of every row's text in order)` for every table
    /// of `db`'s `public` schema, sorted by name.
    pub fn fingerprint(&self, db: &str) -> Vec<(String, u64, String)> {
        let tables = self.sql_in(db, "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename");
        tables
            .lines()
            .map(|t| {
                let row = self.sql_in(
                    db,
                    &format!(
                        "SELECT count(*) || ' ' || coalesce(md5(string_agg(r::text, E'\\n' ORDER BY r::text)), '') FROM \"{t}\" r"
                    ),
                );
                let (rows, sum) = row.trim().split_once(' ').expect("count and md5");
                (t.to_string(), rows.parse().unwrap(), sum.to_string())
            })
            .collect()
    }
}

impl DbServer for Postgres {
    const KIND: &'static str = "postgres";

    fn launch(
        ip: &str,
        d: PathBuf,
        own: Option<tempfile::TempDir>,
        spawn: impl FnOnce(Command) -> std::io::Result<Child>,
    ) -> Postgres {
        let (uid, gid) = account("postgres");
        chown(&d, uid, gid);
        set_mode(&d, 0o700);
        let out = Command::new(bin("initdb"))
            .arg("-D")
            .arg(d.join("data"))
            .args(["--username=postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8"])
            .args(["--locale=C", "--no-sync"])
            .uid(uid)
            .gid(gid)
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = crate::shared::free_port(ip);
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let mut cmd = Command::new(bin("postgres"));
        cmd.arg("-D")
            .arg(d.join("data"))
            .args(["-c", &format!("listen_addresses={ip}"), "-c", &format!("port={port}")])
            .args(["-c", &format!("unix_socket_directories={}", d.display())])
            .args(["-c", "fsync=off", "-c", "shared_buffers=16MB", "-c", "max_connections=20"])
            .args(["-c", "logging_collector=off", "-c", "log_destination=stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("server.log")).unwrap())
            .uid(uid)
            .gid(gid);
        let child = spawn(cmd).expect("start postgres");
        let mut db = Postgres { child, dir: d, _own: own, addr };
        db.wait_ready();
        db.sql(BACKUP_ROLE);
        db
    }

    /// Back to the state `launch` left: only the databases
    /// and roles `initdb` made, and `backup` as it was made.
    fn reset(&self) {
        let databases =
            self.sql("SELECT datname FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1')");
        for db in databases.lines() {
            self.sql(&format!("DROP DATABASE \"{}\" WITH (FORCE)", db.replace('"', "\"\"")));
        }
        let roles = self.sql("SELECT rolname FROM pg_roles WHERE rolname <> 'postgres' AND rolname NOT LIKE 'pg\\_%'");
        for role in roles.lines() {
            let role = role.replace('"', "\"\"");
            self.sql(&format!("DROP OWNED BY \"{role}\";\nDROP ROLE \"{role}\";"));
        }
        self.sql(BACKUP_ROLE);
        let left =
            self.sql("SELECT count(*) FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1')");
        assert_eq!(left.trim(), "0", "the shared PostgreSQL's databases after a reset");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `db` for psql's `-d`, which reads anything with `=` as a connection
/// string: such a name goes in quoted.
fn conninfo_dbname(db: &str) -> String {
    if !db.contains('=') {
        return db.to_string();
    }
    format!("dbname='{}'", db.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A PostgreSQL server program: the newest installed major version's.
fn bin(program: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
    });
    match versions.iter().rev().map(|v| v.join(program)).find(|p| p.exists()) {
        Some(p) => p,
        None => panic!("{program} is not installed (apt-get install postgresql; .ci/run does this)"),
    }
}

/// The uid and gid of a system account.
fn account(name: &str) -> (u32, u32) {
    let out = Command::new("getent").args(["passwd", name]).output().unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = line.trim().split(':').collect();
    assert!(fields.len() > 3, "no {name} account (apt-get install postgresql creates it)");
    (fields[2].parse().unwrap(), fields[3].parse().unwrap())
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}
