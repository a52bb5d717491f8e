//! A real MariaDB server on a loopback address, one per simulated server.
//!
//! Each instance gets a fresh data directory (`mariadb-install-db`), listens
//! on a free port of its address and on a Unix socket that the sshd login
//! user can reach. It has a `backup` account with the privileges mysqldump
//! needs, whose password lives only in an option file owned by the login
//! user. A test either starts a server of its own ([`MariaDb::start`],
//! which disappears with its scratch directory) or, during its turn at the
//! login accounts, takes this process's server on the address, emptied for
//! it ([`MariaDb::shared`]).

use crate::set_mode;
use crate::shared::{DbServer, PerAddress, Turn};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `mariadbd`; stopped when dropped.
pub struct MariaDb {
    child: Child,
    dir: PathBuf,
    /// The scratch directory of a server of one test's own, removed with it.
    _own: Option<tempfile::TempDir>,
    /// The accounts the server had when it was ready, `backup` included.
    accounts: Vec<String>,
    pub addr: SocketAddr,
}

/// Options shared by install and server so the data files agree, kept
/// small so a test server is cheap.
const SMALL: &[&str] = &[
    "--innodb-buffer-pool-size=16M",
    "--innodb-log-file-size=8M",
    "--skip-log-bin",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_general_ci",
];

/// The databases of a new server, which a reset keeps.
const SYSTEM_DATABASES: &str = "'information_schema', 'mysql', 'performance_schema', 'sys'";

const BACKUP_PASSWORD: &str = "Sup3r-S3cret-PW";
const BACKUP_ACCOUNT: &str = "CREATE USER 'backup'@'localhost' IDENTIFIED BY 'Sup3r-S3cret-PW';\n\
     GRANT SELECT, LOCK TABLES, SHOW VIEW, TRIGGER, EVENT, RELOAD ON *.* TO 'backup'@'localhost';";

impl MariaDb {
    /// Initialises a data directory and starts a server of the caller's
    /// own on `ip`: for a test that stops the server or needs one nobody
    /// else has used.
    pub fn start(ip: &str) -> MariaDb {
        crate::shared::own_server(ip)
    }

    /// This test process's server on `ip`, started on first use, emptied
    /// for the caller: every database and account a test made is dropped,
    /// and `backup` has its password and privileges as new. The caller
    /// holds the turn at the login accounts (`mysql-accounts`), which every
    /// test that uses the shared server takes, so no other test uses it
    /// until that turn ends. It lives as long as the process.
    pub fn shared(ip: &str, _turn: &Turn) -> &'static MariaDb {
        static SERVERS: PerAddress<MariaDb> = PerAddress::new();
        crate::shared::shared_server(&SERVERS, ip)
    }

    /// Every account, as `'user'@'host'`.
    fn account_list(&self) -> Vec<String> {
        self.sql("SELECT CONCAT(QUOTE(user), '@', QUOTE(host)) FROM mysql.user ORDER BY 1")
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("mariadbd exited with {status}:\n{}", self.log());
            }
            let ok = Command::new(find("mariadb-admin"))
                .arg("--no-defaults")
                .arg(format!("--socket={}", self.socket().display()))
                .args(["-uroot", "ping"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "mariadbd did not come up within 60 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("mysql.sock")
    }

    /// The error log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// The `backup` account's password (only tests see it).
    pub fn backup_password(&self) -> &'static str {
        BACKUP_PASSWORD
    }

    /// Writes a client option file for the `backup` account at `path`,
    /// mode 0600, owned by `owner`, as a sysadmin would on the server; with
    /// `password` false it leaves the password out (it then comes from a
    /// site secret).
    pub fn write_defaults_file(&self, path: &Path, owner: &str, password: bool) {
        let password = if password { format!("password={}\n", self.backup_password()) } else { String::new() };
        std::fs::write(path, format!("[client]\nuser=backup\n{password}socket={}\n", self.socket().display())).unwrap();
        set_mode(path, 0o600);
        let status = Command::new("chown").arg(owner).arg(path).status().unwrap();
        assert!(status.success(), "chown {owner} {}", path.display());
    }

    /// Runs SQL as root and returns its tab-separated output.
    pub fn sql(&self, sql: &str) -> String {
        self.sql_in("", sql)
    }

    /// Runs SQL as root in database `db` (or none when empty).
    pub fn sql_in(&self, db: &str, sql: &str) -> String {
        let mut cmd = Command::new(find("mariadb"));
        cmd.arg("--no-defaults").arg(format!("--socket={}", self.socket().display())).args(["-uroot", "-N", "-B"]);
        if !db.is_empty() {
            cmd.arg(db);
        }
        let out = cmd.arg("-e").arg(sql).output().expect("run mariadb");
        assert!(out.status.success(), "SQL failed: {sql}\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Loads an SQL dump (plain text) into `db`, creating it.
    pub fn load(&self, db: &str, dump: &[u8]) {
        use std::io::Write;
        self.sql(&format!("CREATE DATABASE `{db}`"));
        let mut child = Command::new(find("mariadb"))
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-uroot", db])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(dump).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "loading the dump into {db} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `(table, rows, CHECKSUM TABLE)` for every table of `db`, sorted.
    pub fn fingerprint(&self, db: &str) -> Vec<(String, u64, String)> {
        let tables = self.sql(&format!(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = '{db}' ORDER BY table_name"
        ));
        tables
            .lines()
            .map(|t| {
                let rows = self.sql_in(db, &format!("SELECT COUNT(*) FROM `{t}`")).trim().parse().unwrap();
                let sum = self.sql_in(db, &format!("CHECKSUM TABLE `{t}`"));
                let sum = sum.split_whitespace().nth(1).unwrap_or("").to_string();
                (t.to_string(), rows, sum)
            })
            .collect()
    }
}

impl DbServer for MariaDb {
    const KIND: &'static str = "mariadb";

    fn launch(
        ip: &str,
        d: PathBuf,
        own: Option<tempfile::TempDir>,
        spawn: impl FnOnce(Command) -> std::io::Result<Child>,
    ) -> MariaDb {
        set_mode(&d, 0o755);
        // Its own tmpdir: servers bootstrapping side by side in one shared
        // /tmp trip over each other's temporary tables.
        std::fs::create_dir(d.join("tmp")).unwrap();
        let tmpdir = format!("--tmpdir={}", d.join("tmp").display());
        let out = Command::new(find("mariadb-install-db"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .args(["--user=root", "--auth-root-authentication-method=normal", "--skip-test-db"])
            .args(SMALL)
            .arg(&tmpdir)
            .output()
            .expect("run mariadb-install-db");
        assert!(out.status.success(), "mariadb-install-db failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = crate::shared::free_port(ip);
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let mut cmd = Command::new(find("mariadbd"));
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--socket={}", d.join("mysql.sock").display()))
            .arg(format!("--pid-file={}", d.join("mariadb.pid").display()))
            .arg(format!("--log-error={}", d.join("error.log").display()))
            .arg(format!("--bind-address={ip}"))
            .arg(format!("--port={port}"))
            .arg("--user=root")
            .args(SMALL)
            .arg(&tmpdir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn(cmd).expect("start mariadbd");
        let mut db = MariaDb { child, dir: d, _own: own, accounts: Vec::new(), addr };
        db.wait_ready();
        db.sql(BACKUP_ACCOUNT);
        db.accounts = db.account_list();
        db
    }

    /// Back to the state `launch` left: only the system
    /// databases, the accounts it had, and `backup` as it was made.
    fn reset(&self) {
        let databases = self.sql(&format!(
            "SELECT schema_name FROM information_schema.schemata WHERE schema_name NOT IN ({SYSTEM_DATABASES})"
        ));
        let mut sql: String =
            databases.lines().map(|db| format!("DROP DATABASE `{}`;\n", db.replace('`', "``"))).collect();
        for account in self.account_list() {
            if !self.accounts.contains(&account) {
                sql.push_str(&format!("DROP USER {account};\n"));
            }
        }
        sql.push_str("DROP USER 'backup'@'localhost';\n");
        sql.push_str(BACKUP_ACCOUNT);
        self.sql(&sql);
        assert_eq!(self.account_list(), self.accounts, "the shared MariaDB's accounts after a reset");
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find(program: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(program);
        if p.exists() {
            return p;
        }
    }
    panic!("{program} is not installed (apt-get install mariadb-server mariadb-client; .ci/run does this)");
}
