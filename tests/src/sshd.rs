//! A real OpenSSH `sshd` on a loopback address, one per simulated server.
//!
//! Each instance has its own host key, its own client key in its
//! `authorized_keys`, a `known_hosts` line for it, and logs into a scratch
//! directory that disappears with it. The client key logs into a dedicated
//! unprivileged account, [`LOGIN_USER`], created on first use when the tests
//! run as root (as CI does); otherwise into the current user. It listens on a free port of the
//! address it is given (127.0.0.2, 127.0.0.3, ...), so tests run in parallel.

use crate::set_mode;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The account backups log into on the test "servers".
pub const LOGIN_USER: &str = "offsite-backup";

/// A running `sshd`; stopped when dropped.
pub struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The account the client key logs into.
    pub user: String,
    /// `known_hosts` line for this server's host key.
    pub known_hosts_line: String,
}

impl Sshd {
    /// Starts `sshd` on `ip` (a loopback address) and waits until it accepts
    /// connections. Panics with sshd's log if it does not come up.
    pub fn start(ip: &str) -> Sshd {
        Sshd::start_as(ip, LOGIN_USER)
    }

    /// Like [`start`](Self::start), logging into the account `user`
    /// (created if missing), so that two "servers" can have their own home
    /// directories and `~/.my.cnf`.
    pub fn start_as(ip: &str, user: &str) -> Sshd {
        Sshd::start_in(ip, user, None)
    }

    /// Like [`start`](Self::start), on the far side of a simulated WAN:
    /// in the link's network namespace, on its address there, port 22.
    pub fn start_behind(link: &crate::wan::WanLink) -> Sshd {
        Sshd::start_in(&link.there.to_string(), LOGIN_USER, Some(link.netns()))
    }

    fn start_in(ip: &str, user: &str, netns: Option<&str>) -> Sshd {
        let sshd = find_sshd();
        let user = login_user(user);
        let dir = tempfile::tempdir().expect("scratch dir for sshd");
        let d = dir.path();
        // The login user reads authorized_keys and the files under `files`.
        set_mode(d, 0o755);
        keygen(&d.join("host_ed25519"));
        keygen(&d.join("client_ed25519"));
        std::fs::copy(d.join("client_ed25519.pub"), d.join("authorized_keys")).unwrap();
        set_mode(&d.join("authorized_keys"), 0o644);
        std::fs::create_dir(d.join("files")).unwrap();
        set_mode(&d.join("files"), 0o777);
        // The privilege-separation directory sshd insists on.
        std::fs::create_dir_all("/run/sshd").ok();

        // The port is picked free, but another test may bind it before
        // sshd does: then sshd says so and we try again with another.
        let mut tries = 0;
        let (child, addr, port) = loop {
            // A namespace of its own has every port free.
            let port = if netns.is_some() { 22 } else { crate::shared::free_port(ip) };
            let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
            let config = format!(
                "ListenAddress {addr}\n\
                 HostKey {d}/host_ed25519\n\
                 PidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 LogLevel VERBOSE\n",
                d = d.display()
            );
            std::fs::write(d.join("sshd_config"), config).unwrap();
            let _ = std::fs::remove_file(d.join("sshd.log"));
            let mut command = match netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns]).arg(&sshd);
                    c
                }
                None => Command::new(&sshd),
            };
            let mut child = command
                .args(["-D", "-f"])
                .arg(d.join("sshd_config"))
                .arg("-E")
                .arg(d.join("sshd.log"))
                .stdin(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", sshd.display()));
            match wait_ready(&mut child, addr, &d.join("sshd.log")) {
                Ok(()) => break (child, addr, port),
                Err(why) if why.contains("Address already in use") && tries < 5 => tries += 1,
                Err(why) => panic!("{why}"),
            }
        };
        let host_pub = std::fs::read_to_string(d.join("host_ed25519.pub")).unwrap();
        let key = host_pub.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        // OpenSSH names a host on port 22 without brackets or port.
        let name = if port == 22 { ip.to_string() } else { format!("[{ip}]:{port}") };
        let server = Sshd { child, dir, addr, user, known_hosts_line: format!("{name} {key}") };
        std::fs::write(server.dir.path().join("known_hosts"), format!("{}\n", server.known_hosts_line)).unwrap();
        server
    }

    /// Private key that `authorized_keys` accepts (mode 0600, no passphrase).
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_ed25519")
    }

    /// A directory on the "server" that the login user can read and write:
    /// where tests put files to fetch and scripts to run.
    pub fn files(&self) -> PathBuf {
        self.dir.path().join("files")
    }

    /// The login user's home directory on this "server".
    pub fn home(&self) -> PathBuf {
        let out = Command::new("getent").args(["passwd", &self.user]).output().unwrap();
        let line = String::from_utf8(out.stdout).unwrap();
        PathBuf::from(line.trim().split(':').nth(5).expect("home in passwd entry"))
    }

    /// This server's host key (public part), as `type base64`.
    pub fn host_key(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("host_ed25519.pub")).unwrap();
        text.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    }

    /// `SHA256:...` fingerprint of the host key, from `ssh-keygen -l`.
    pub fn host_fingerprint(&self) -> String {
        let out = Command::new("ssh-keygen").arg("-lf").arg(self.dir.path().join("host_ed25519.pub")).output().unwrap();
        String::from_utf8(out.stdout).unwrap().split_whitespace().nth(1).unwrap().to_string()
    }

    /// Stops sshd at once, as if the server died (sessions die with it).
    pub fn kill_all(&mut self) {
        let mut doomed = vec![self.child.id()];
        let mut i = 0;
        while i < doomed.len() {
            doomed.extend(children_of(doomed[i]));
            i += 1;
        }
        for pid in doomed {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        let _ = self.child.wait();
    }

    /// A site file's `[hosts.NAME]` section for this server: address, port,
    /// login user, client key, known_hosts and a 3 s connect timeout, then
    /// `grants` (TOML lines such as `commands = [...]`).
    pub fn host_section(&self, name: &str, grants: &str) -> String {
        format!(
            "[hosts.{name}]\naddress = \"{}\"\nport = {}\nuser = \"{}\"\nidentity = \"{}\"\nknown_hosts = \"{}\"\n\
             connect_timeout = \"3s\"\n{grants}\n",
            self.addr.ip(),
            self.addr.port(),
            self.user,
            self.client_key().display(),
            self.known_hosts().display()
        )
    }

    /// The `authorized_keys` file sshd reads for the login user.
    pub fn authorized_keys(&self) -> PathBuf {
        self.dir.path().join("authorized_keys")
    }

    /// A `known_hosts` file holding exactly this server's key.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// sshd's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// The OpenSSH client, set up for this server: batch mode, strict host
    /// key checking against [`known_hosts`](Self::known_hosts), the client key.
    pub fn ssh(&self) -> Command {
        self.ssh_trusting(&self.known_hosts())
    }

    /// Like [`ssh`](Self::ssh), but checking the host key against `known_hosts`.
    pub fn ssh_trusting(&self, known_hosts: &Path) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-i")
        .arg(self.client_key())
        .arg("-p")
        .arg(self.addr.port().to_string())
        .arg(format!("{}@{}", self.user, self.addr.ip()));
        cmd
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_sshd() -> PathBuf {
    for p in ["/usr/sbin/sshd", "/usr/bin/sshd"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("OpenSSH sshd is not installed (apt-get install openssh-server; .ci/run does this)");
}

fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "offsite-test", "-f"])
        .arg(path)
        .stdout(Stdio::null())
        .status()
        .expect("run ssh-keygen");
    assert!(status.success(), "ssh-keygen failed for {}", path.display());
}

/// Waits until `child` (sshd) accepts connections on `addr`; its log if
/// it exits or does not listen within 15 s.
fn wait_ready(child: &mut Child, addr: SocketAddr, log: &Path) -> Result<(), String> {
    let read_log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("sshd exited with {status}:\n{}", read_log()));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!("sshd did not listen on {addr} within 15 s:\n{}", read_log()))
}

/// Direct children of `pid`, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id -un");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `wanted`, created if missing, when running as root; else the current
/// user (who cannot create accounts).
fn login_user(wanted: &str) -> String {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let me = current_user();
    if me != "root" {
        return me;
    }
    let exists =
        || Command::new("id").arg(wanted).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().success();
    for _ in 0..20 {
        if exists() {
            return wanted.to_string();
        }
        // A password of `*` is "no password" rather than "locked", so sshd
        // accepts the key. (Retried: another test process may hold the lock
        // on /etc/passwd.)
        let _ = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", "--password", "*", wanted])
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("cannot create the test login user {wanted} (useradd)");
}
