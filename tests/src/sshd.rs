//! A real OpenSSH `sshd` on a loopback address, one per simulated server.
//!
//! Each instance has its own host key, its own client key in its
//! `authorized_keys`, a `known_hosts` line for it, and logs into a scratch
//! directory that disappears with it. It listens on a free port of the
//! address it is given (127.0.0.2, 127.0.0.3, ...), so tests run in parallel.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
        let sshd = find_sshd();
        let dir = tempfile::tempdir().expect("scratch dir for sshd");
        let d = dir.path();
        keygen(&d.join("host_ed25519"));
        keygen(&d.join("client_ed25519"));
        std::fs::copy(d.join("client_ed25519.pub"), d.join("authorized_keys")).unwrap();
        // The privilege-separation directory sshd insists on.
        std::fs::create_dir_all("/run/sshd").ok();

        let port = free_port(ip);
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
        let child = Command::new(&sshd)
            .args(["-D", "-f"])
            .arg(d.join("sshd_config"))
            .arg("-E")
            .arg(d.join("sshd.log"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", sshd.display()));
        let host_pub = std::fs::read_to_string(d.join("host_ed25519.pub")).unwrap();
        let key = host_pub.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        let mut server =
            Sshd { child, dir, addr, user: current_user(), known_hosts_line: format!("[{ip}]:{port} {key}") };
        server.wait_ready();
        std::fs::write(server.dir.path().join("known_hosts"), format!("{}\n", server.known_hosts_line)).unwrap();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("sshd exited with {status}:\n{}", self.log());
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("sshd did not listen on {} within 15 s:\n{}", self.addr, self.log());
    }

    /// Private key that `authorized_keys` accepts (mode 0600, no passphrase).
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_ed25519")
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

fn free_port(ip: &str) -> u16 {
    let listener = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("cannot bind {ip}: {e}"));
    listener.local_addr().unwrap().port()
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id -un");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
