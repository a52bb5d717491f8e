//! The OpenSSH client as a transport.
//!
//! For each host, the first call starts one master connection
//! (`ssh -M -N`, a child of ours) on a private control socket; every remote
//! command then runs as a multiplexed session over it (`ssh -S`), so a run
//! makes one TCP connection, one key exchange and one authentication per
//! host. Using the system client brings the user's `~/.ssh/config` (aliases,
//! `ProxyJump`, ciphers), agent and known_hosts for free, and OpenSSH's
//! crypto is the fastest there is on this machine (see docs/BENCHMARKS.md).
//!
//! What we force on the command line (which overrides ssh_config):
//! - `BatchMode`, no password or keyboard-interactive auth, and no
//!   controlling terminal: it can never prompt;
//! - `StrictHostKeyChecking=yes` and `UpdateHostKeys=no`: unknown or changed
//!   keys fail and known_hosts is never written;
//! - no forwarding of agent, X11 or ports, no tty, no local command;
//! - `ConnectTimeout` and `ServerAlive*` from the host's timeouts.
//!
//! The client's own diagnostics go to a log file (`-E`), never into the
//! remote command's stderr, and are read back to explain failures.
//!
//! Evidence of success: the client exits 0 only when the server sent
//! exit-status 0 (a missing status or an exit-signal makes it exit 255), so
//! `Exit::Status(0)` is only ever reported on real evidence.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Event, Exit, RemoteProcess, Transport, TransportError, check_key_file, keychain};
use crate::site::{HostConfig, SecretSource};

/// Environment variable that turns `offsite` into an askpass helper for
/// the ssh client it started: `file:PATH` or `env:NAME`.
pub const ASKPASS_ENV: &str = "OFFSITE_ASKPASS_SOURCE";

/// OpenSSH client connections for the hosts of one run.
pub struct OpenSsh {
    hosts: BTreeMap<String, Arc<HostConn>>,
    /// Further connections to a host (lane 1, 2, ...), made on first use
    /// by a fetch that spreads over several (see `Transport::spawn_lane`).
    lanes: Mutex<BTreeMap<(String, usize), Arc<HostConn>>>,
    ssh_config: Option<PathBuf>,
    agent: Option<PathBuf>,
    /// Where the agent was looked for, when none was found.
    agent_looked: Vec<String>,
    /// Private directory for control sockets and client logs (0700).
    dir: tempfile::TempDir,
    /// Starts master connections; see [`Spawner`].
    spawner: Spawner,
    /// The run's deadline: no retry waits past it.
    deadline: Option<Instant>,
}

/// A thread that lives as long as the transport and forks the masters.
///
/// Children get `PR_SET_PDEATHSIG` so they die with us, but Linux sends
/// that signal when the *thread* that forked them exits, and calls arrive on
/// short-lived job threads. Masters must outlive those.
struct Spawner {
    requests: Mutex<std::sync::mpsc::Sender<(Command, std::sync::mpsc::Sender<io::Result<Child>>)>>,
}

impl Spawner {
    fn new() -> io::Result<Spawner> {
        let (tx, rx) = std::sync::mpsc::channel::<(Command, std::sync::mpsc::Sender<io::Result<Child>>)>();
        std::thread::Builder::new().name("ssh-masters".into()).spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        })?;
        Ok(Spawner { requests: Mutex::new(tx) })
    }

    fn spawn(&self, cmd: Command) -> io::Result<Child> {
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = self.requests.lock().unwrap_or_else(|e| e.into_inner()).send((cmd, tx));
        sent.map_err(|_| io::Error::other("the ssh spawner thread is gone"))?;
        rx.recv().map_err(|_| io::Error::other("the ssh spawner thread is gone"))?
    }
}

struct HostConn {
    cfg: HostConfig,
    /// 0 for the host's first connection, which every call uses.
    lane: usize,
    /// Connection attempts retried so far in this run.
    retried: std::sync::atomic::AtomicU32,
    control: PathBuf,
    master_log: PathBuf,
    state: Mutex<State>,
}

enum State {
    New,
    Up(Child),
    Failed(TransportError),
}

impl OpenSsh {
    pub fn new(hosts: &BTreeMap<String, HostConfig>, ssh_config: Option<&Path>) -> io::Result<OpenSsh> {
        let dir = tempfile::Builder::new().prefix("offsite-ssh.").tempdir()?;
        let hosts = hosts
            .iter()
            .map(|(name, cfg)| {
                let conn = HostConn {
                    cfg: cfg.clone(),
                    lane: 0,
                    retried: Default::default(),
                    control: dir.path().join(format!("{name}.ctl")),
                    master_log: dir.path().join(format!("{name}.log")),
                    state: Mutex::new(State::New),
                };
                (name.clone(), Arc::new(conn))
            })
            .collect();
        let home = crate::home::home_dir();
        let env_sock = std::env::var("SSH_AUTH_SOCK").ok();
        let (agent, agent_looked) = keychain::find_agent(env_sock.as_deref(), home.as_deref(), &keychain::hostname());
        Ok(OpenSsh {
            hosts,
            ssh_config: ssh_config.map(Path::to_path_buf),
            agent,
            agent_looked,
            lanes: Mutex::new(BTreeMap::new()),
            dir,
            spawner: Spawner::new()?,
            deadline: None,
        })
    }

    /// No connection is retried past `deadline`.
    pub fn until(mut self, deadline: Option<Instant>) -> OpenSsh {
        self.deadline = deadline;
        self
    }

    fn host(&self, host: &str) -> Result<&Arc<HostConn>, TransportError> {
        self.hosts.get(host).ok_or_else(|| TransportError::Config {
            host: host.to_string(),
            detail: "no such host in the site file".into(),
        })
    }

    /// The connection `lane` to `host`: the host's own for 0, else one of
    /// its further connections, set up (not yet connected) on first use.
    fn lane(&self, host: &str, lane: usize) -> Result<Arc<HostConn>, TransportError> {
        let first = self.host(host)?;
        if lane == 0 {
            return Ok(Arc::clone(first));
        }
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let conn = lanes.entry((host.to_string(), lane)).or_insert_with(|| {
            Arc::new(HostConn {
                cfg: first.cfg.clone(),
                lane,
                retried: Default::default(),
                control: self.dir.path().join(format!("{host}.{lane}.ctl")),
                master_log: self.dir.path().join(format!("{host}.{lane}.log")),
                state: Mutex::new(State::New),
            })
        });
        Ok(Arc::clone(conn))
    }

    /// An `ssh` command with everything both masters and sessions share.
    fn command(&self, conn: &HostConn, log: &Path) -> Command {
        let cfg = &conn.cfg;
        let mut cmd = Command::new("ssh");
        if let Some(file) = &self.ssh_config {
            cmd.arg("-F").arg(file);
        }
        cmd.arg("-E").arg(log);
        let mut opts = vec![
            "LogLevel=DEBUG1".to_string(),
            "StrictHostKeyChecking=yes".into(),
            "UpdateHostKeys=no".into(),
            "PasswordAuthentication=no".into(),
            "KbdInteractiveAuthentication=no".into(),
            "ForwardAgent=no".into(),
            "ForwardX11=no".into(),
            "ClearAllForwardings=yes".into(),
            "PermitLocalCommand=no".into(),
            "RequestTTY=no".into(),
            format!("ConnectTimeout={}", cfg.connect_timeout.as_secs().max(1)),
            format!("ServerAliveInterval={}", (cfg.connect_timeout.as_secs() / 3).clamp(1, 15)),
            "ServerAliveCountMax=3".into(),
            format!("ControlPath={}", conn.control.display()),
        ];
        opts.push(if cfg.passphrase.is_some() { "BatchMode=no".into() } else { "BatchMode=yes".into() });
        if let Some(on) = cfg.compression {
            opts.push(format!("Compression={}", if on { "yes" } else { "no" }));
        }
        if let Some(kh) = &cfg.known_hosts {
            opts.push(format!("UserKnownHostsFile={}", kh.display()));
        }
        if let Some(key) = &cfg.identity {
            opts.push(format!("IdentityFile={}", key.display()));
            opts.push("IdentitiesOnly=yes".into());
        }
        for o in opts {
            cmd.arg("-o").arg(o);
        }
        if let Some(port) = cfg.port {
            cmd.arg("-p").arg(port.to_string());
        }
        if let Some(user) = &cfg.user {
            cmd.arg("-l").arg(user);
        }
        cmd.env_remove("SSH_AUTH_SOCK").env_remove("SSH_ASKPASS").env_remove("DISPLAY").env_remove(ASKPASS_ENV);
        if let Some(sock) = &self.agent {
            cmd.env("SSH_AUTH_SOCK", sock);
        }
        match &cfg.passphrase {
            // The passphrase is handed over by our own binary acting as
            // askpass; the value never appears in an argv or our log.
            Some(source) => {
                let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("offsite"));
                cmd.env("SSH_ASKPASS", exe).env("SSH_ASKPASS_REQUIRE", "force").env(
                    ASKPASS_ENV,
                    match source {
                        SecretSource::File(p) => format!("file:{}", p.display()),
                        SecretSource::Env(name) => format!("env:{name}"),
                    },
                );
            }
            None => {
                cmd.env("SSH_ASKPASS_REQUIRE", "never");
            }
        }
        // Our session, without its terminal; see `detach_from_terminal`.
        // And the client dies with us instead of lingering.
        unsafe {
            cmd.pre_exec(|| {
                detach_from_terminal()?;
                rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
                    .map_err(io::Error::from)?;
                Ok(())
            });
        }
        cmd
    }

    /// Starts the master connection for `conn` unless it is up, and returns
    /// the error that made it fail, every time, if it failed.
    ///
    /// A host's first connection retries what may pass (refused, reset,
    /// timed out: never a host key, a login or a setting that failed) up
    /// to the host's `retries`, waiting 1 s, 2 s, 4 s... between, each
    /// logged, and never past the run's deadline. One that was up and got
    /// lost is made again for the next command; the command that was
    /// running on it has failed and is not run again.
    fn ensure_master(&self, conn: &HostConn) -> Result<(), TransportError> {
        let host = &conn.cfg.name;
        let mut state = conn.state.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *state {
            State::Up(child) => match child.try_wait() {
                Ok(None) => return Ok(()),
                _ => {
                    let err = TransportError::Unreachable {
                        host: host.clone(),
                        detail: format!(
                            "the connection to the server was lost: {}",
                            last_errors(&read_lossy(&conn.master_log))
                        ),
                    };
                    if conn.lane != 0 || conn.retried.load(Ordering::Relaxed) >= conn.cfg.retries {
                        *state = State::Failed(err.clone());
                        return Err(err);
                    }
                    log::warn!(target: "offsite::ssh", "{err}; connecting again for the next command");
                }
            },
            State::Failed(err) => return Err(err.clone()),
            State::New => {}
        }
        loop {
            let err = match self.start_master(conn) {
                Ok(child) => {
                    *state = State::Up(child);
                    return Ok(());
                }
                Err(e) => e,
            };
            let tried = conn.retried.load(Ordering::Relaxed);
            let passing = matches!(err, TransportError::Unreachable { .. } | TransportError::Timeout { .. });
            let wait = Duration::from_secs(1 << tried.min(5));
            let in_time = self.deadline.is_none_or(|d| Instant::now() + wait < d);
            if conn.lane != 0 || !passing || tried >= conn.cfg.retries || !in_time || stop_requested() {
                *state = State::Failed(err.clone());
                return Err(err);
            }
            conn.retried.store(tried + 1, Ordering::Relaxed);
            log::warn!(
                target: "offsite::ssh",
                "{err}; retry {} of {} in {}",
                tried + 1,
                conn.cfg.retries,
                humantime::format_duration(wait)
            );
            nap(wait);
        }
    }

    fn start_master(&self, conn: &HostConn) -> Result<Child, TransportError> {
        let cfg = &conn.cfg;
        let host = cfg.name.clone();
        if let Some(key) = &cfg.identity {
            check_key_file(&host, key)?;
        }
        if let Some(SecretSource::File(p)) = &cfg.passphrase {
            check_key_file(&host, p).map_err(|_| TransportError::Config {
                host: host.clone(),
                detail: format!("passphrase file {} must exist and be readable only by its owner", p.display()),
            })?;
        }
        if let Some(SecretSource::Env(name)) = &cfg.passphrase
            && std::env::var_os(name).is_none()
        {
            return Err(TransportError::Config {
                host,
                detail: format!("the passphrase variable {name} named by passphrase_env is not set"),
            });
        }
        let mut cmd = self.command(conn, &conn.master_log);
        cmd.args(["-M", "-N", "-o", "ControlMaster=yes", "-o", "ControlPersist=no", "--"])
            .arg(&cfg.address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        log::debug!(target: "offsite::ssh", "host {host}: connecting to {}", cfg.address);
        let started = Instant::now();
        let mut child = self.spawner.spawn(cmd).map_err(|e| TransportError::Config {
            host: host.clone(),
            detail: format!("cannot start the OpenSSH client `ssh`: {e} (install openssh-client)"),
        })?;
        // TCP connect and the banner are bounded by ConnectTimeout; key
        // exchange and authentication get the same again.
        let limit = cfg.connect_timeout * 2 + Duration::from_secs(1);
        loop {
            if std::fs::symlink_metadata(&conn.control).map(|m| m.file_type().is_socket()).unwrap_or(false) {
                break;
            }
            if let Ok(Some(_)) = child.try_wait() {
                return Err(self.classify_failure(conn));
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TransportError::Timeout {
                    host,
                    detail: format!(
                        "no SSH session with {} within {:?}: {}",
                        cfg.address,
                        limit,
                        last_errors(&read_lossy(&conn.master_log))
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let offered = server_key(&read_lossy(&conn.master_log));
        if let Some(pin) = &cfg.host_key {
            let matches = offered.as_ref().is_some_and(|(_, fp)| fp == pin);
            if !matches {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TransportError::ChangedHostKey {
                    host,
                    detail: format!(
                        "the site pins host_key = {pin}, but the server offered {}",
                        offered.map(|(t, fp)| format!("{t} {fp}")).unwrap_or_else(|| "an unrecognised key".into())
                    ),
                });
            }
        }
        let which = if conn.lane == 0 { String::new() } else { format!(" (connection {})", conn.lane + 1) };
        log::info!(
            target: "offsite::ssh",
            "host {host}: connected to {}{which} in {:.0?} (host key {})",
            cfg.address,
            started.elapsed(),
            offered.map(|(t, fp)| format!("{t} {fp}")).unwrap_or_else(|| "verified".into())
        );
        Ok(child)
    }

    /// Explains why a master connection exited, from its log.
    fn classify_failure(&self, conn: &HostConn) -> TransportError {
        let log = read_lossy(&conn.master_log);
        let host = conn.cfg.name.clone();
        let lines: Vec<&str> = log.lines().filter(|l| !l.starts_with("debug")).collect();
        let find = |needle: &str| lines.iter().find(|l| l.contains(needle)).map(|l| l.to_string());
        if log.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") || log.contains("has changed and you have requested")
        {
            let offered = server_key(&log).map(|(t, fp)| format!("the server now offers {t} {fp}"));
            let offending = find("Offending");
            let detail = [offered, offending].into_iter().flatten().collect::<Vec<_>>().join("; ");
            return TransportError::ChangedHostKey { host, detail };
        }
        if let Some(line) = find("host key is known for") {
            // "No ED25519 host key is known for [127.0.0.2]:2222 and you ..."
            let name = line.split(" is known for ").nth(1).and_then(|r| r.split(' ').next()).unwrap_or("").to_string();
            let offered = server_key(&log);
            let known_hosts_line = offered.as_ref().and_then(|(kind, fp)| self.keyscan_line(conn, &name, kind, fp));
            let file = conn
                .cfg
                .known_hosts
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "~/.ssh/known_hosts".into());
            return TransportError::UnknownHostKey {
                host,
                fingerprint: offered.map(|(t, fp)| format!("{t} {fp}")),
                known_hosts_line,
                file,
            };
        }
        if let Some(line) = find("Permission denied") {
            // With no identity and no agent, this side had no key to offer:
            // say so first, and where the agent was looked for, rather
            // than blame the server.
            // A key with a passphrase that nothing can open (no agent, no
            // `passphrase`): ssh could not use it, so the fault is here too.
            let locked =
                conn.cfg.identity.as_deref().filter(|key| conn.cfg.passphrase.is_none() && key_has_passphrase(key));
            let mut detail = if let Some(key) = locked {
                let agent = match &self.agent {
                    None => format!("no ssh-agent was found ({})", self.agent_looked.join("; ")),
                    Some(sock) => format!("the ssh-agent at {} does not hold it", sock.display()),
                };
                format!(
                    "this side could not use its key: {} has a passphrase and {agent}; add it to the agent \
                     (keychain) for this user, or give the host a `passphrase` (server: {})",
                    key.display(),
                    line.trim()
                )
            } else if self.agent.is_none() && conn.cfg.identity.is_none() {
                format!(
                    "this side had no key to offer: no ssh-agent was found ({}) and the host has no `identity`; \
                     start the agent (keychain) for this user, or set `identity` (server: {})",
                    self.agent_looked.join("; "),
                    line.trim()
                )
            } else {
                format!("the server refused every key offered ({})", line.trim())
            };
            if let Some(load) = find("Load key").or_else(|| find("incorrect passphrase")) {
                detail.push_str(&format!("; {}", load.trim()));
            }
            return TransportError::AuthFailed { host, detail };
        }
        let errors = last_errors(&log);
        if errors.contains("timed out") {
            return TransportError::Timeout { host, detail: errors };
        }
        TransportError::Unreachable { host, detail: errors }
    }

    /// The exact known_hosts line for an unknown server key, fetched with
    /// ssh-keyscan and kept only if it is the key the server offered us.
    fn keyscan_line(&self, conn: &HostConn, name: &str, kind: &str, fp: &str) -> Option<String> {
        let (hostname, port) = self.resolved_address(conn)?;
        let out = Command::new("ssh-keyscan")
            .args(["-T", &conn.cfg.connect_timeout.as_secs().max(1).to_string(), "-p", &port, "-t"])
            .arg(key_type_for_keyscan(kind))
            .arg("--")
            .arg(&hostname)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.split_whitespace().skip(1);
            let (Some(t), Some(b64)) = (parts.next(), parts.next()) else { continue };
            use base64::Engine as _;
            let Ok(blob) = base64::engine::general_purpose::STANDARD.decode(b64) else { continue };
            if t == kind && super::fingerprint(&blob) == fp {
                return Some(format!("{name} {t} {b64}"));
            }
        }
        None
    }

    /// Host name and port after ssh_config, from `ssh -G`.
    fn resolved_address(&self, conn: &HostConn) -> Option<(String, String)> {
        let mut cmd = Command::new("ssh");
        if let Some(file) = &self.ssh_config {
            cmd.arg("-F").arg(file);
        }
        if let Some(port) = conn.cfg.port {
            cmd.arg("-p").arg(port.to_string());
        }
        let out = cmd.arg("-G").arg("--").arg(&conn.cfg.address).stderr(Stdio::null()).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ').map(str::to_string));
        Some((get("hostname")?, get("port")?))
    }
}

/// Runs in a forked `ssh` before exec: a process group of its own, so
/// a Ctrl-C at the terminal reaches only us (and we stop the run in order),
/// and no controlling terminal, so the client can never prompt on it.
///
/// It stays in our session on purpose. A new session (`setsid`) would also
/// be a scheduler autogroup of its own, and the kernel shares CPU between
/// autogroups first: each client would then compete with the whole of the
/// run it works for, instead of the run competing as one job. Measured on
/// two cores with the server on the same machine, that split made a 1 GiB
/// stream 15% slower (docs/BENCHMARKS.md). `TIOCNOTTY` from a process that
/// does not lead its session drops the terminal for that process alone.
///
/// Only async-signal-safe calls: this runs between fork and exec.
fn detach_from_terminal() -> io::Result<()> {
    rustix::process::setpgid(None, None)?;
    // SAFETY: open, ioctl and close on a descriptor of our own, with a
    // static NUL-terminated path; nothing allocates.
    unsafe {
        let fd = libc::open(c"/dev/tty".as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::ioctl(fd, libc::TIOCNOTTY);
            libc::close(fd);
        }
    }
    Ok(())
}

impl Transport for OpenSsh {
    fn connect(&self, host: &str) -> Result<(), TransportError> {
        self.ensure_master(self.host(host)?)
    }

    fn spawn(&self, host: &str, command_line: &str, stdin: bool) -> Result<Box<dyn RemoteProcess>, TransportError> {
        self.spawn_lane(host, 0, command_line, stdin)
    }

    fn spawn_lane(
        &self,
        host: &str,
        lane: usize,
        command_line: &str,
        stdin: bool,
    ) -> Result<Box<dyn RemoteProcess>, TransportError> {
        let conn = self.lane(host, lane)?;
        self.ensure_master(&conn)?;
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let log = self.dir.path().join(format!("{host}.{}.session.log", SEQ.fetch_add(1, Ordering::Relaxed)));
        let mut cmd = self.command(&conn, &log);
        // Only the master may carry sessions: should its socket be gone, the
        // client would try a direct connection, so point that at nothing.
        cmd.args([
            "-o",
            "ControlMaster=no",
            "-o",
            "HostName=offsite-master-gone.invalid",
            "-o",
            "ProxyCommand=none",
            "-o",
            "ProxyJump=none",
            "-T",
            "--",
        ])
        .arg(&conn.cfg.address)
        .arg(command_line)
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| TransportError::Config {
            host: host.to_string(),
            detail: format!("cannot start the OpenSSH client `ssh`: {e}"),
        })?;
        let stdout = child.stdout.take().expect("piped");
        // Bigger pipes mean fewer wake-ups per gigabyte.
        let _ = rustix::pipe::fcntl_setpipe_size(stdout.as_fd(), 1 << 20);
        let stderr = child.stderr.take().expect("piped");
        Ok(Box::new(OpenSshProcess {
            stdin: child.stdin.take(),
            stdout: Some(stdout),
            stderr: Some(stderr),
            child,
            log,
            conn,
        }))
    }
}

impl Drop for OpenSsh {
    fn drop(&mut self) {
        let lanes = std::mem::take(&mut *self.lanes.lock().unwrap_or_else(|e| e.into_inner()));
        for conn in self.hosts.values().chain(lanes.values()) {
            let mut state = conn.state.lock().unwrap_or_else(|e| e.into_inner());
            if let State::Up(child) = &mut *state {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

struct OpenSshProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    log: PathBuf,
    conn: Arc<HostConn>,
}

impl RemoteProcess for OpenSshProcess {
    fn next(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<Event>> {
        use rustix::event::{PollFd, PollFlags, poll};
        loop {
            let (out_open, err_open) = (self.stdout.is_some(), self.stderr.is_some());
            if !out_open && !err_open {
                return Ok(Some(Event::Closed));
            }
            let (out_ready, err_ready) = {
                let mut fds = Vec::with_capacity(2);
                if let Some(s) = &self.stdout {
                    fds.push(PollFd::new(s, PollFlags::IN));
                }
                if let Some(s) = &self.stderr {
                    fds.push(PollFd::new(s, PollFlags::IN));
                }
                let ts = rustix::event::Timespec::try_from(timeout)
                    .unwrap_or(rustix::event::Timespec { tv_sec: i64::MAX / 2, tv_nsec: 0 });
                match poll(&mut fds, Some(&ts)) {
                    Ok(0) => return Ok(None),
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                }
                let ready = |f: &PollFd<'_>| !f.revents().is_empty();
                let mut it = fds.iter();
                let o = if out_open { it.next().is_some_and(ready) } else { false };
                let e = if err_open { it.next().is_some_and(ready) } else { false };
                (o, e)
            };
            // Drain stderr first so a chatty command cannot stall on it.
            if err_ready {
                let n = self.stderr.as_mut().expect("open").read(buf)?;
                if n == 0 {
                    self.stderr = None;
                } else {
                    return Ok(Some(Event::Stderr(n)));
                }
            }
            if out_ready {
                let n = self.stdout.as_mut().expect("open").read(buf)?;
                if n == 0 {
                    self.stdout = None;
                } else {
                    return Ok(Some(Event::Stdout(n)));
                }
            }
        }
    }

    fn write_stdin(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.stdin {
            Some(s) => s.write_all(data).and_then(|_| s.flush()),
            None => Err(io::Error::new(io::ErrorKind::BrokenPipe, "stdin is closed")),
        }
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    fn feed_stdin(&mut self, data: Vec<u8>) {
        // A writer thread of its own: it ends when the data is written, or
        // with EPIPE once the command is killed or its stdin closes.
        if let Some(mut stdin) = self.stdin.take() {
            std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
        }
    }

    fn finish(&mut self, timeout: Duration) -> Result<Exit, TransportError> {
        self.stdin = None;
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                _ => {
                    self.kill();
                    return Err(TransportError::Timeout {
                        host: self.conn.cfg.name.clone(),
                        detail: "the exit status did not arrive in time".into(),
                    });
                }
            }
        };
        let exit = match status.code() {
            Some(255) | None => self.explain_255(),
            Some(code) => Exit::Status(code as u32),
        };
        let _ = std::fs::remove_file(&self.log);
        Ok(exit)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

impl OpenSshProcess {
    /// The client exits 255 for a remote `exit 255`, an exit-signal, a
    /// missing status or a broken connection; the logs tell which.
    fn explain_255(&self) -> Exit {
        let session = read_lossy(&self.log);
        let id = session
            .lines()
            .find_map(|l| l.split("master session id: ").nth(1))
            .and_then(|v| v.trim().parse::<u32>().ok());
        let master = read_lossy(&self.conn.master_log);
        if let Some(id) = id {
            let needle = format!("channel {id} rtype ");
            if let Some(kind) = master.lines().rev().find_map(|l| l.split(&needle).nth(1)) {
                if kind.starts_with("exit-signal") {
                    return Exit::Signal("(name not reported by the OpenSSH client)".into());
                }
                if kind.starts_with("exit-status") {
                    return Exit::Status(255);
                }
            }
        }
        let why = last_errors(&session);
        let why = if why.is_empty() { last_errors(&master) } else { why };
        Exit::Missing(if why.is_empty() { "the connection closed without one".into() } else { why })
    }
}

impl Drop for OpenSshProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// Whether the run was asked to stop (then no retry waits).
/// A retry's back-off: `crate::abort::nap` where there is a run to stop.
fn nap(wait: Duration) {
    #[cfg(feature = "runtime")]
    crate::abort::nap(wait);
    #[cfg(not(feature = "runtime"))]
    std::thread::sleep(wait);
}

fn stop_requested() -> bool {
    #[cfg(feature = "runtime")]
    return crate::abort::requested();
    #[cfg(not(feature = "runtime"))]
    false
}

/// Whether the private key file is protected by a passphrase (OpenSSH's
/// format, or an old PEM file marked ENCRYPTED). A file that cannot be
/// read or parsed counts as not: ssh's own message says what is wrong.
fn key_has_passphrase(path: &Path) -> bool {
    use std::io::Read as _;
    // A private key is a few KiB; whatever the path names, read no more
    // than a bounded start of it.
    let mut text = String::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(1 << 20).read_to_string(&mut text));
    if read.is_err() {
        return false;
    }
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        return true;
    }
    ssh_key::PrivateKey::from_openssh(&text).is_ok_and(|key| key.is_encrypted())
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

/// The client's last few non-debug log lines, joined.
fn last_errors(log: &str) -> String {
    // The client's own chatter at the end of every session is no reason.
    const NOISE: [&str; 4] = ["Transferred: ", "Bytes per second", "Authenticated to ", "Exit status "];
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with("debug") && !l.trim().is_empty() && !NOISE.iter().any(|n| l.starts_with(n)))
        .collect();
    lines[lines.len().saturating_sub(3)..].join("; ")
}

/// `("ssh-ed25519", "SHA256:...")` from `debug1: Server host key: ...`.
fn server_key(log: &str) -> Option<(String, String)> {
    let rest = log.lines().find_map(|l| l.split("Server host key: ").nth(1))?;
    let mut parts = rest.split_whitespace();
    Some((parts.next()?.to_string(), parts.next()?.to_string()))
}

/// ssh-keyscan's `-t` name for a key type OpenSSH logged.
fn key_type_for_keyscan(kind: &str) -> &str {
    match kind {
        "ssh-ed25519" => "ed25519",
        "ssh-rsa" | "rsa-sha2-256" | "rsa-sha2-512" => "rsa",
        k if k.starts_with("ecdsa-sha2-") => "ecdsa",
        k => k,
    }
}

/// Runs as the askpass helper when ssh starts us with [`ASKPASS_ENV`]:
/// prints the passphrase and exits. Returns `false` when not in that mode.
pub fn askpass_main() -> bool {
    let Some(source) = std::env::var_os(ASKPASS_ENV) else { return false };
    let source = source.to_string_lossy().into_owned();
    let value = if let Some(path) = source.strip_prefix("file:") {
        std::fs::read_to_string(path).ok().map(|s| s.trim_end_matches(['\n', '\r']).to_string())
    } else if let Some(name) = source.strip_prefix("env:") {
        std::env::var(name).ok()
    } else {
        None
    };
    match value {
        Some(v) => {
            let mut out = io::stdout();
            let _ = out.write_all(v.as_bytes()).and_then(|_| out.write_all(b"\n"));
            std::process::exit(0)
        }
        None => std::process::exit(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_leaves_out_the_clients_closing_chatter() {
        let log = "debug1: x\nConnection to h closed by remote host.\nTransferred: sent 2352, received 2576 bytes, in 0.1 seconds\nBytes per second: sent 1.0, received 2.0\n";
        assert_eq!(last_errors(log), "Connection to h closed by remote host.");
    }
}
