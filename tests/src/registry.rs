//! A real OCI registry (Debian's `docker-registry`, the CNCF distribution
//! server) on a loopback address, over TLS with a CA made for the test, and
//! with htpasswd basic auth.
//!
//! Clients trust it the way users set a registry's CA: a `certs.d/HOST:PORT/ca.crt`
//! (handed to offsite with `OFFSITE_CERTS_D`), never by turning checks off.
//! Credentials go into an auth file in `docker login`'s format.
//!
//! Most tests take a space on the registry their test process shares
//! ([`Registry::shared`]); a test that stops the server or corrupts a blob
//! starts its own ([`Registry::start`]).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const USER: &str = "ops";
pub const PASSWORD: &str = "reg-S3cret-pass";

/// A test's registry: its own server, or a space on the one this test
/// process shares, where every repository it names is beneath a namespace
/// of its own (`offsite/arc` becomes `t7/offsite/arc`), so no test sees
/// another's repositories, tags or signatures.
pub struct Registry {
    server: Held,
    /// `""` on a server of the test's own, `tN/` on the shared one.
    ns: String,
    pub addr: SocketAddr,
}

enum Held {
    Shared(&'static Server),
    Own(Server),
}

/// A running `docker-registry`; stopped when dropped (a shared one lives
/// as long as its test process, see `crate::shared`).
struct Server {
    child: Option<Child>,
    dir: Scratch,
    addr: SocketAddr,
}

enum Scratch {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Scratch {
    fn path(&self) -> &Path {
        match self {
            Scratch::Temp(dir) => dir.path(),
            Scratch::Kept(dir) => dir,
        }
    }
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

impl Registry {
    /// A registry of this test's own, which it may stop, restart or
    /// corrupt (blobs are shared by every repository of a server).
    pub fn start(ip: &str) -> Registry {
        let server = Server::start(ip, false);
        Registry { addr: server.addr, server: Held::Own(server), ns: String::new() }
    }

    /// A space on the registry this test process shares, started on first
    /// use (on `ip`, which every caller must name alike).
    pub fn shared(ip: &str) -> Registry {
        static SHARED: std::sync::OnceLock<Server> = std::sync::OnceLock::new();
        let server = SHARED.get_or_init(|| Server::start(ip, true));
        assert_eq!(server.addr.ip().to_string(), ip, "one shared registry per process");
        Registry { addr: server.addr, server: Held::Shared(server), ns: format!("{}/", crate::shared::unique_tag()) }
    }

    fn server(&self) -> &Server {
        match &self.server {
            Held::Shared(server) => server,
            Held::Own(server) => server,
        }
    }

    fn own_server(&mut self) -> &mut Server {
        match &mut self.server {
            Held::Own(server) => server,
            Held::Shared(_) => panic!("a shared registry is never stopped by a test: use Registry::start"),
        }
    }

    /// Stops the server (the registry is down until `restart`).
    pub fn stop(&mut self) {
        self.own_server().stop();
    }

    pub fn restart(&mut self) {
        let server = self.own_server();
        server.stop();
        server.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.server().dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `HOST:PORT`, as references name it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Repository `repo` as this test's space names it on the server.
    pub fn repo(&self, repo: &str) -> String {
        format!("{}{repo}", self.ns)
    }

    /// `oci://HOST:PORT/REPO_AND_TAG`, in this test's space.
    pub fn reference(&self, repo_and_tag: &str) -> String {
        format!("oci://{}/{}", self.addr, self.repo(repo_and_tag))
    }

    /// The `certs.d` directory holding this registry's CA.
    pub fn certs_d(&self) -> PathBuf {
        self.server().dir.path().join("certs.d")
    }

    pub fn ca_file(&self) -> PathBuf {
        self.server().dir.path().join("ca.crt")
    }

    /// Writes a `docker login`-style auth file for `user`:`password`.
    pub fn auth_file(&self, path: &Path, user: &str, password: &str) {
        let token = base64(format!("{user}:{password}").as_bytes());
        std::fs::write(path, format!("{{\"auths\":{{\"{}\":{{\"auth\":\"{token}\"}}}}}}", self.addr)).unwrap();
    }

    /// Where the registry keeps blobs (for tests that corrupt one; only on
    /// a registry of the test's own).
    pub fn blob_data(&self, hex: &str) -> PathBuf {
        assert!(matches!(self.server, Held::Own(_)), "blobs are shared by every test on a shared registry");
        self.server().dir.path().join("data/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }
}

impl Server {
    fn start(ip: &str, shared: bool) -> Server {
        let dir = if shared {
            Scratch::Kept(crate::shared::shared_scratch("registry"))
        } else {
            Scratch::Temp(tempfile::tempdir().expect("scratch dir for the registry"))
        };
        let d = dir.path();
        let port = crate::shared::free_port(ip);
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        // A CA, and a server certificate for the address signed by it.
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        run(Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .args(["-days", "2", "-subj", "/CN=offsite test registry CA", "-keyout"])
            .arg(d.join("ca.key"))
            .arg("-out")
            .arg(d.join("ca.crt")));
        run(Command::new("openssl")
            .arg("req")
            .args(ec)
            .args(["-subj", &format!("/CN={ip}"), "-keyout"])
            .arg(d.join("key.pem"))
            .arg("-out")
            .arg(d.join("req.csr")));
        std::fs::write(
            d.join("ext.cnf"),
            format!("subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
        )
        .unwrap();
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-in"])
            .arg(d.join("req.csr"))
            .arg("-CA")
            .arg(d.join("ca.crt"))
            .arg("-CAkey")
            .arg(d.join("ca.key"))
            .arg("-CAcreateserial")
            .arg("-extfile")
            .arg(d.join("ext.cnf"))
            .arg("-out")
            .arg(d.join("cert.pem")));
        let htpasswd = run(Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]));
        std::fs::write(d.join("htpasswd"), htpasswd).unwrap();
        std::fs::create_dir_all(d.join("data")).unwrap();
        let certs = d.join("certs.d").join(addr.to_string());
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::copy(d.join("ca.crt"), certs.join("ca.crt")).unwrap();
        std::fs::write(
            d.join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    \
                 enabled: true\nhttp:\n  addr: {addr}\n  secret: offsite-test-secret\n  tls:\n    certificate: {d}/cert.pem\n    \
                 key: {d}/key.pem\nauth:\n  htpasswd:\n    realm: offsite-test\n    path: {d}/htpasswd\n",
                data = d.join("data").display(),
                d = d.display(),
            ),
        )
        .unwrap();
        let mut server = Server { child: None, dir, addr };
        server.spawn_as(shared);
        server
    }

    fn spawn(&mut self) {
        self.spawn_as(false);
    }

    fn spawn_as(&mut self, shared: bool) {
        let d = self.dir.path();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(d.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("registry.log")).unwrap())
            .stderr(std::fs::OpenOptions::new().append(true).create(true).open(d.join("registry.log")).unwrap());
        let child = if shared { crate::shared::spawn_for_process(cmd) } else { cmd.spawn() }
            .expect("start docker-registry (apt-get install docker-registry)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("docker-registry exited with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "docker-registry did not listen:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// "A machine": its own script store, registry credentials and CA setup,
/// applied to a command.
pub struct Machine {
    pub dir: tempfile::TempDir,
}

impl Machine {
    pub fn new(reg: &Registry) -> Machine {
        let dir = tempfile::tempdir().unwrap();
        reg.auth_file(&dir.path().join("auth.json"), USER, PASSWORD);
        Machine { dir }
    }

    pub fn scripts_dir(&self) -> PathBuf {
        self.dir.path().join("scripts")
    }

    pub fn auth_file(&self) -> PathBuf {
        self.dir.path().join("auth.json")
    }

    /// Points `cmd` at this machine's store and credentials and at `reg`'s CA.
    pub fn apply<'a>(&self, reg: &Registry, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("OFFSITE_SCRIPTS_DIR", self.scripts_dir())
            .env("REGISTRY_AUTH_FILE", self.auth_file())
            .env("OFFSITE_CERTS_D", reg.certs_d())
            .env("HOME", self.dir.path())
            .env_remove("DOCKER_CONFIG")
            .env_remove("XDG_RUNTIME_DIR")
    }
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
