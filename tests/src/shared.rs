//! What the tests of one test process share, and what they share with
//! other test processes.
//!
//! **Shared servers.** Starting SeaweedFS takes about three seconds and a
//! registry needs a CA and a certificate first, so the tests of one
//! process share one of each ([`crate::seaweed::S3Space::shared`],
//! [`crate::registry::Registry::shared`]), started on first use. That is
//! safe because every test works in a space of its own on it: buckets and
//! repositories whose names carry a tag no other test uses, its own
//! credentials files and scratch directories. Nothing a test asserts
//! depends on a server-wide state (a catalog, a log, the server's
//! health), and a test that stops, kills, reconfigures or corrupts a server starts
//! one of its own. A shared server lives as long as its test process: it
//! is started from a thread that never ends, with the kernel told to kill
//! it when that thread's process goes ([`spawn_for_process`]), and its
//! scratch directory is removed by the next test process that starts one.
//!
//! **Databases.** MariaDB and PostgreSQL are shared too, one of each per
//! test process and loopback address ([`crate::mariadb::MariaDb::shared`],
//! [`crate::postgres::Postgres::shared`]), but differently: the tests that
//! use them log in as the same fixed accounts on the test "servers", whose
//! `~/.my.cnf` and `~/.pgpass` name the server, so those tests take turns
//! anyway ([`turn`]), and a test takes the shared server only under its
//! turn, which it holds to its end. Taking it empties it: every database
//! and account a test made is dropped, and the `backup` account is made
//! again with its password and privileges. So a test sees what a new
//! server has, and no other test uses the server meanwhile. A test that
//! stops a server, or needs one nobody has used (the restore drill's new
//! machine, the hostile-restore tests), starts one of its own.
//!
//! `sshd` stays one per test: it starts in tens of milliseconds, and its
//! configuration (host key, authorized keys, forced commands, login shell)
//! is what the tests vary.
//!
//! **Turns.** Tests that use one fixed resource of the machine (a login
//! account's home directory on the test "servers") take turns through a
//! lock file, which holds across test processes too (cargo-nextest runs
//! each test in a process of its own).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Mutex, OnceLock};

type Spawn = (Command, Sender<std::io::Result<Child>>);

/// Spawns `cmd` as a server shared by this process's tests: it is killed
/// (SIGKILL) when this process ends, however it ends, since no destructor
/// runs for a shared server.
///
/// The kernel's parent-death signal fires when the *thread* that spawned
/// the child ends, so every shared server is spawned from one thread that
/// lives as long as the process.
pub(crate) fn spawn_for_process(cmd: Command) -> std::io::Result<Child> {
    static KEEPER: OnceLock<Sender<Spawn>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (requests, incoming) = channel::<Spawn>();
        std::thread::Builder::new()
            .name("shared-servers".into())
            .spawn(move || {
                // Ends only with the process: the sender is in a static.
                for (mut cmd, reply) in incoming {
                    // SAFETY: prctl and getppid are async-signal-safe and
                    // touch no memory of the parent.
                    unsafe {
                        cmd.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the thread that owns shared servers");
        requests
    });
    let (reply, answer) = channel();
    keeper.send((cmd, reply)).expect("the shared-servers thread runs");
    answer.recv().expect("the shared-servers thread answers")
}

/// A scratch directory for a shared server of kind `kind`, named after
/// this process; directories that earlier test processes left (their pid
/// no longer runs) are removed first.
pub(crate) fn shared_scratch(kind: &str) -> PathBuf {
    let base = std::env::temp_dir().join("offsite-test-shared");
    std::fs::create_dir_all(&base).expect("create the shared servers' scratch directory");
    // Login users of the test servers reach a shared database's socket
    // through it.
    crate::set_mode(&base, 0o755);
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|pid| pid != std::process::id() && !PathBuf::from(format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = base.join(format!("{kind}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a shared server's scratch directory");
    dir
}

/// Servers of one kind that this process's tests share, one per address,
/// each started on first use (see the module's docs).
pub(crate) struct PerAddress<T: 'static>(Mutex<Vec<(String, &'static OnceLock<T>)>>);

impl<T: Send + Sync> PerAddress<T> {
    pub(crate) const fn new() -> Self {
        PerAddress(Mutex::new(Vec::new()))
    }

    /// The server on `ip`, and whether it is new: `start` starts it on
    /// first use. Servers on other addresses start side by side.
    pub(crate) fn get(&self, ip: &str, start: impl FnOnce() -> T) -> (&'static T, bool) {
        let cell = {
            let mut servers = self.0.lock().unwrap_or_else(|e| e.into_inner());
            match servers.iter().find(|(at, _)| at == ip) {
                Some((_, cell)) => *cell,
                None => {
                    let cell: &'static OnceLock<T> = Box::leak(Box::default());
                    servers.push((ip.to_string(), cell));
                    cell
                }
            }
        };
        let mut new = false;
        let server = cell.get_or_init(|| {
            new = true;
            start()
        });
        (server, new)
    }
}

/// A database server the tests start on a loopback address: one of a
/// test's own ([`own_server`]) or this process's shared one
/// ([`shared_server`]; see the module's docs).
pub(crate) trait DbServer: Sized + Send + Sync + 'static {
    /// Names its scratch directories.
    const KIND: &'static str;
    /// Makes a data directory in `dir` (removed with `own`, if any) and
    /// starts the server on `ip` through `spawn`.
    fn launch(
        ip: &str,
        dir: PathBuf,
        own: Option<tempfile::TempDir>,
        spawn: impl FnOnce(Command) -> std::io::Result<Child>,
    ) -> Self;
    /// Empties the server for the next test.
    fn reset(&self);
}

/// A server of the caller's own on `ip`, gone with its scratch directory
/// when dropped.
pub(crate) fn own_server<T: DbServer>(ip: &str) -> T {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("a scratch directory for {}: {e}", T::KIND));
    let path = dir.path().to_path_buf();
    T::launch(ip, path, Some(dir), |mut cmd| cmd.spawn())
}

/// This process's server on `ip` among `servers`, started on first use and
/// emptied for every later caller.
pub(crate) fn shared_server<T: DbServer>(servers: &'static PerAddress<T>, ip: &str) -> &'static T {
    let (server, new) =
        servers.get(ip, || T::launch(ip, shared_scratch(&format!("{}-{ip}", T::KIND)), None, spawn_for_process));
    if !new {
        server.reset();
    }
    server
}

/// A port on `ip` that nothing listens on now, for a server to take.
pub(crate) fn free_port(ip: &str) -> u16 {
    let listener = std::net::TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("cannot bind {ip}: {e}"));
    listener.local_addr().unwrap().port()
}

/// A tag no other space of this process has, for names on shared servers.
pub(crate) fn unique_tag() -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
    format!("t{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// A turn at the resource `name`, held until dropped; waits for the test
/// (in this process or another) that holds it.
pub struct Turn {
    _file: std::fs::File,
}

/// Waits for, and takes, the turn at `name` (see the module's docs).
pub fn turn(name: &str) -> Turn {
    take_turn(name, true).expect("a blocking turn is always taken")
}

/// Takes the turn at `name` if nobody holds it.
pub fn try_turn(name: &str) -> Option<Turn> {
    take_turn(name, false)
}

fn take_turn(name: &str, wait: bool) -> Option<Turn> {
    use std::os::fd::AsRawFd;
    let dir = std::env::temp_dir().join("offsite-test-turns");
    std::fs::create_dir_all(&dir).expect("create the turns directory");
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{name}.lock")))
        .expect("open a turn's lock file");
    let how = if wait { libc::LOCK_EX } else { libc::LOCK_EX | libc::LOCK_NB };
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), how) } != 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EWOULDBLOCK), "flock {name}: {e}");
        return None;
    }
    Some(Turn { _file: file })
}
