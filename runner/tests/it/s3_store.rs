//! Sites whose store is `s3://…`, end to end: the real runner binary and
//! the arc script against a real S3-compatible server (SeaweedFS on
//! loopback), archives restored with GNU tar, and every way a run can go
//! wrong leaving the last good backup alone and nothing half-visible.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use offsite::s3::credentials::Credentials;
use offsite::s3::{Bucket, Put, S3Location, S3Settings};
use offsite_testkit::seaweed::{ACCESS_KEY, S3Space, SECRET_KEY};
use offsite_testkit::{Ran, age_keypair, assert_same_tree, offsite, script, ssh_keypair, tempfile};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");
const NOW: &str = "2004-03-21T01:48:44Z";
const ARCHIVE: &str = "www.20040321-014844.tgz";

/// A site whose store is a prefix of a bucket on `server`, archiving
/// `www` beneath its directory; `extra` is appended to the site file.
struct S3Site {
    dir: tempfile::TempDir,
    file: PathBuf,
    url: String,
    endpoint: String,
}

impl S3Site {
    fn new(server: &S3Space, url: &str, extra: &str) -> S3Site {
        let dir = tempfile::tempdir().unwrap();
        let www = dir.path().join("www");
        std::fs::create_dir_all(www.join("img")).unwrap();
        std::fs::write(www.join("index.html"), "<html>hello</html>\n").unwrap();
        std::fs::write(www.join("img/logo.bin"), (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>())
            .unwrap();
        let site =
            S3Site { file: dir.path().join("web1.toml"), dir, url: server.url(url), endpoint: server.endpoint() };
        site.write(extra);
        site
    }

    fn write(&self, extra: &str) {
        let www = self.dir.path().join("www");
        let text = format!(
            "store = \"{}\"\n[read]\nroots = [\"{}\"]\n[params]\npath = \"{}\"\n{extra}\n[s3]\nendpoint = \"{}\"\n\
             path_style = true\npart_size = \"5MiB\"\nlock_stale = \"10s\"\n",
            self.url,
            www.display(),
            www.display(),
            self.endpoint
        );
        std::fs::write(&self.file, text).unwrap();
    }

    fn www(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    /// `offsite ARGS` with the test server's credentials in the
    /// environment, and a HOME with no `~/.aws`.
    fn offsite(&self, args: &[&str]) -> Command {
        let mut cmd = offsite(Path::new(BIN));
        cmd.current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .args(args);
        cmd
    }

    fn run(&self, extra_args: &[&str]) -> Ran {
        let arc = script("arc");
        let mut args = vec!["run", arc.to_str().unwrap(), "--site", self.file.to_str().unwrap()];
        args.extend_from_slice(extra_args);
        Ran::from_output(self.offsite(&args).output().unwrap())
    }

    fn command(&self, args: &[&str]) -> Ran {
        let mut all: Vec<&str> = args.to_vec();
        all.push(self.file.to_str().unwrap());
        Ran::from_output(self.offsite(&all).output().unwrap())
    }
}

/// The test's own view of the bucket, as another machine would have it.
fn bucket(server: &S3Space, url: &str) -> Arc<Bucket> {
    let settings = S3Settings { endpoint: Some(server.endpoint()), path_style: true, ..Default::default() };
    let credentials = Credentials {
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: SECRET_KEY.into(),
        session_token: None,
        source: "test".into(),
    };
    let location = S3Location::parse(&server.url(url)).unwrap();
    Arc::new(Bucket::open(&location, &settings, &credentials, None, Duration::from_secs(20)).unwrap())
}

/// The keys under the prefix, sorted.
fn keys(b: &Bucket) -> Vec<String> {
    let mut keys: Vec<String> = b.list("").unwrap().into_iter().map(|m| m.rel).collect();
    keys.sort();
    keys
}

fn manifests(b: &Bucket) -> Vec<serde_json::Value> {
    keys(b)
        .iter()
        .filter(|k| k.starts_with(".offsite/manifests/") && k.ends_with(".json"))
        .map(|k| serde_json::from_slice(&b.get(k).unwrap().unwrap().0).unwrap())
        .collect()
}

fn download(b: &Bucket, rel: &str) -> Vec<u8> {
    let mut out = Vec::new();
    b.download(rel, &mut out).unwrap();
    out
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A file of `mib` MiB that gzip cannot shrink, so the archive is as big.
fn incompressible(path: &Path, mib: usize) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut data = Vec::with_capacity(mib << 20);
    while data.len() < mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, data).unwrap();
}

#[test]
fn arc_into_an_s3_store_then_restored_from_it_with_gnu_tar() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let site = S3Site::new(&server, "s3://backups/web1", "");
    let ran = site.run(&["--now", NOW]);
    ran.expect_code(0);
    assert_eq!((ran.stdout.as_str(), ran.stderr.as_str()), ("", ""), "quiet on success");

    let b = bucket(&server, "s3://backups/web1");
    let all = keys(&b);
    let manifest_keys: Vec<&String> = all.iter().filter(|k| k.starts_with(".offsite/manifests/")).collect();
    assert!(all.contains(&ARCHIVE.to_string()), "{all:?}");
    assert_eq!(manifest_keys.len(), 1, "{all:?}");
    assert!(!all.iter().any(|k| k.starts_with(".offsite/runs/")), "no run record left: {all:?}");
    assert_eq!(server.pending_uploads("backups"), 0, "every upload completed");

    // The manifest has the object's size and SHA-256.
    let m = &manifests(&b)[0];
    assert_eq!(m["status"], "ok");
    let archive = download(&b, ARCHIVE);
    assert_eq!(m["files"][0]["path"], ARCHIVE);
    assert_eq!(m["files"][0]["bytes"], archive.len() as u64);
    assert_eq!(m["files"][0]["sha256"], sha256(&archive));

    // Restored: GNU tar reads it back byte for byte.
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join(ARCHIVE), &archive).unwrap();
    let x = Command::new("tar").arg("-xzf").arg(out.path().join(ARCHIVE)).arg("-C").arg(out.path()).output().unwrap();
    assert!(x.status.success(), "{}", String::from_utf8_lossy(&x.stderr));
    // (The site names the source by its absolute path; tar keeps it
    // without the leading `/`, as GNU tar does.)
    assert_same_tree(&site.www(), &out.path().join(site.www().strip_prefix("/").unwrap()));

    // verify downloads and hashes; status reads the manifests.
    let verified = site.command(&["verify", "-v"]);
    verified.expect_code(0);
    assert!(verified.stdout.contains("downloaded and hashed"), "{}", verified.stdout);
    assert!(verified.stdout.contains("1 file(s) in 1 run(s) checked, 0 problem(s)"), "{}", verified.stdout);
    let status = site.command(&["status"]);
    status.expect_code(0);
    assert!(status.stdout.contains(" ok "), "{}", status.stdout);
    assert!(status.stdout.contains("running:   no"), "{}", status.stdout);

    // check --connect says where the credentials came from, never what.
    let check = site.command(&["check", "--connect"]);
    check.expect_code(0);
    assert!(check.stdout.contains("credentials from the environment"), "{}", check.stdout);
    assert!(check.stdout.contains("connected"), "{}", check.stdout);
    assert!(!check.stdout.contains(SECRET_KEY) && !check.stderr.contains(SECRET_KEY));

    // The same name again (a pinned clock): the new object replaces the
    // old one, and the manifest says whose it replaced.
    std::fs::write(site.www().join("index.html"), "<html>changed</html>\n").unwrap();
    site.run(&["--now", NOW]).expect_code(0);
    let ms = manifests(&b);
    assert_eq!(ms.len(), 2);
    assert_eq!(ms[1]["files"][0]["replaces"]["run"], ms[0]["run_id"]);
    assert_ne!(download(&b, ARCHIVE), archive);
}

#[test]
fn wrong_credentials_or_a_missing_bucket_exit_2_and_say_so() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let site = S3Site::new(&server, "s3://backups/web1", "");
    let arc = script("arc");
    let args = ["run", arc.to_str().unwrap(), "--site", site.file.to_str().unwrap()];
    let ran = Ran::from_output(site.offsite(&args).env("AWS_SECRET_ACCESS_KEY", "wrong").output().unwrap());
    ran.expect_code(2).expect_stderr("refused our credentials");
    assert!(!ran.stderr.contains("wrong"), "no secret in messages: {}", ran.stderr);

    let ran = Ran::from_output(
        site.offsite(&args).env_remove("AWS_ACCESS_KEY_ID").env_remove("AWS_SECRET_ACCESS_KEY").output().unwrap(),
    );
    ran.expect_code(2).expect_stderr("AWS_ACCESS_KEY_ID");

    let missing = S3Site::new(&server, "s3://no-such-bucket/web1", "");
    missing.run(&[]).expect_code(2).expect_stderr("does not exist");
    let check = missing.command(&["check", "--connect"]);
    assert_ne!(check.code, 0);
    assert!(
        check.stdout.contains("cannot reach the store") || check.stderr.contains("create the bucket"),
        "{}{}",
        check.stdout,
        check.stderr
    );
    assert_eq!(keys(&bucket(&server, "s3://backups/web1")), Vec::<String>::new(), "nothing was written");
}

#[test]
fn a_failed_run_publishes_nothing_and_leaves_the_last_good_object_alone() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let site = S3Site::new(&server, "s3://backups/web1", "");
    site.run(&["--now", NOW]).expect_code(0);
    let b = bucket(&server, "s3://backups/web1");
    let good = download(&b, ARCHIVE);

    // Bigger than the run may store: it fails after uploading a part.
    incompressible(&site.www().join("big.bin"), 12);
    site.write("[limits]\nmax_bytes = \"8MiB\"\n");
    let ran = site.run(&["--now", NOW, "--json"]);
    ran.expect_code(1).expect_stderr("max_bytes");
    let summary: serde_json::Value = serde_json::from_str(ran.stdout.trim()).unwrap();
    assert_eq!((summary["status"].as_str(), &summary["files"]), (Some("failed"), &serde_json::json!([])));
    assert_eq!(download(&b, ARCHIVE), good, "the good object is untouched");
    assert_eq!(server.pending_uploads("backups"), 0, "the failed upload was aborted");
    let ms = manifests(&b);
    assert_eq!(ms.len(), 2);
    assert_eq!(ms[1]["status"], "failed");
    assert_eq!(ms[1]["files"], serde_json::json!([]));
    assert!(!keys(&b).iter().any(|k| k.starts_with(".offsite/runs/")));
    site.command(&["verify"]).expect_code(0);
    // The last run failed: status says so.
    site.command(&["status"]).expect_code(1);
}

/// A partial run into a bucket: the upload of its new output is
/// completed, the one that would replace an object is aborted, and the
/// manifest says which.
#[test]
fn a_partial_run_completes_only_the_uploads_whose_calls_succeeded_and_replace_nothing() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let site = S3Site::new(&server, "s3://backups/partial", "");
    let www = site.www();
    // The fixture takes `case` and `arg`, not arc's `path`.
    let text = std::fs::read_to_string(&site.file).unwrap();
    std::fs::write(&site.file, text.replace(&format!("path = \"{}\"\n", www.display()), "")).unwrap();
    let fixture = |case: &str| {
        let (script, file) = (script("fixture"), site.file.to_str().unwrap().to_string());
        let (case, arg) = (format!("case={case}"), format!("arg={}", www.display()));
        let args = ["run", script.to_str().unwrap(), "--site", &file, "--param", &case, "--param", &arg, "--json"];
        Ran::from_output(site.offsite(&args).output().unwrap())
    };
    fixture("tar").expect_code(0);
    let b = bucket(&server, "s3://backups/partial");
    let good = download(&b, "fixture.tgz");
    std::fs::write(www.join("index.html"), "<html>changed</html>\n").unwrap();
    let ran = fixture("tar-twice-then-fail");
    ran.expect_code(1).expect_stderr("backup partial: 1 output(s) published (second.tgz)");
    let summary: serde_json::Value = serde_json::from_str(ran.stdout.trim()).unwrap();
    assert_eq!(summary["status"], "partial");
    assert_eq!(download(&b, "fixture.tgz"), good, "a partial run replaces no object");
    let listed = Command::new("tar").arg("-tzf").arg("-").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn();
    let mut tar = listed.unwrap();
    std::io::Write::write_all(tar.stdin.as_mut().unwrap(), &download(&b, "second.tgz")).unwrap();
    let out = tar.wait_with_output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("index.html"), "GNU tar reads it");
    assert_eq!(server.pending_uploads("backups"), 0, "the other upload was aborted");
    let ms = manifests(&b);
    assert_eq!(ms[1]["status"], "partial");
    let files: Vec<&str> = ms[1]["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(files, vec!["second.tgz"]);
    assert!(ms[1]["warnings"].to_string().contains("discarded instead of replacing"), "{}", ms[1]);
    site.command(&["verify"]).expect_code(0);
}

/// A run killed while it uploads: nothing appears under the archive's
/// name, and the next run records the dead run, aborts its upload and
/// backs up as usual.
#[test]
fn a_run_killed_mid_upload_leaves_nothing_visible_and_the_next_run_recovers() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let site = S3Site::new(&server, "s3://backups/web1", "");
    incompressible(&site.www().join("big.bin"), 96);
    let arc = script("arc");
    let mut child = site
        .offsite(&["run", arc.to_str().unwrap(), "--site", site.file.to_str().unwrap(), "--now", NOW])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.pending_uploads("backups") == 0 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it began uploading");
        assert!(Instant::now() < deadline, "no upload began");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();

    let b = bucket(&server, "s3://backups/web1");
    assert_eq!(b.head(ARCHIVE).unwrap(), None, "nothing visible");
    assert!(server.pending_uploads("backups") > 0, "the killed run's upload is left");
    assert!(keys(&b).iter().any(|k| k.ends_with(".journal")), "{:?}", keys(&b));
    // Its lock object is still fresh, but status on this machine sees that
    // its process is gone.
    let status = site.command(&["status"]);
    status.expect_code(1);
    assert!(status.stdout.contains("was killed or crashed before it finished"), "{}", status.stdout);
    assert!(!status.stdout.contains("running:   yes"), "{}", status.stdout);

    // Its lock is stale after 10 s (the site's lock_stale): until then
    // the next run is turned away, after it the next run takes over.
    std::fs::remove_file(site.www().join("big.bin")).unwrap();
    let ran = site.run(&["--now", NOW]);
    ran.expect_code(4).expect_stderr("another run holds the store").expect_stderr("silent for 10s");
    let deadline = Instant::now() + Duration::from_secs(60);
    let ran = loop {
        std::thread::sleep(Duration::from_secs(1));
        let ran = site.run(&["--now", NOW]);
        if ran.code != 4 || Instant::now() > deadline {
            break ran;
        }
    };
    ran.expect_code(0);
    assert!(ran.stderr.contains("was interrupted before it published anything"), "{}", ran.stderr);
    assert!(ran.stderr.contains("aborted 1 incomplete upload"), "{}", ran.stderr);
    assert_eq!(server.pending_uploads("backups"), 0);
    let ms = manifests(&b);
    // The run that found the dead one says so: a warning, as on a local
    // store.
    assert_eq!(ms.iter().map(|m| m["status"].as_str().unwrap()).collect::<Vec<_>>(), ["failed", "warning"]);
    assert!(ms[0]["error"].as_str().unwrap().contains("interrupted"), "{}", ms[0]);
    site.command(&["verify"]).expect_code(0);
}

/// The server goes away in the middle of an upload: the run fails with
/// a clear error; when it is back, nothing of the run is visible and the
/// next run cleans up and succeeds.
#[test]
fn the_server_stopping_mid_run_fails_the_run_and_nothing_is_half_visible() {
    // It stops the server: one of its own.
    let mut server = S3Space::own();
    server.create_bucket("backups");
    let site = S3Site::new(&server, "s3://backups/web1", "[limits]\ncall_timeout = \"15s\"\n");
    site.run(&["--now", NOW]).expect_code(0);
    let b = bucket(&server, "s3://backups/web1");
    let good = download(&b, ARCHIVE);
    incompressible(&site.www().join("big.bin"), 96);
    let arc = script("arc");
    let child = site
        .offsite(&["run", arc.to_str().unwrap(), "--site", site.file.to_str().unwrap(), "--now", NOW])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.pending_uploads("backups") == 0 {
        assert!(Instant::now() < deadline, "no upload began");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.stop();
    let ran = Ran::from_output(child.wait_with_output().unwrap());
    ran.expect_code(1);
    assert!(ran.stderr.contains("backup failed"), "{}", ran.stderr);

    server.restart();
    // (Its volumes take a moment to be served again.)
    let deadline = Instant::now() + Duration::from_secs(60);
    let again = loop {
        let mut out = Vec::new();
        match b.download(ARCHIVE, &mut out) {
            Ok(_) => break out,
            Err(e) if Instant::now() > deadline => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    assert_eq!(again, good, "the good object is untouched");
    std::fs::remove_file(site.www().join("big.bin")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ran = loop {
        let ran = site.run(&["--now", NOW]);
        if ran.code != 4 || Instant::now() > deadline {
            break ran;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    ran.expect_code(0);
    assert_eq!(server.pending_uploads("backups"), 0);
    site.command(&["verify"]).expect_code(0);
}

/// An outage exits 1 (the backup failed) whichever part of the server is
/// down: nothing listening, or a gateway that answers but whose storage
/// fails (5xx). Only the site's own settings (keys, bucket) exit 2.
#[test]
fn an_outage_exits_1_whichever_part_of_the_server_is_down() {
    use std::io::{BufRead, BufReader, Write};
    let failing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let failing_endpoint = format!("http://{}", failing.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in failing.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let body = "<?xml version=\"1.0\"?><Error><Code>ServiceUnavailable</Code><Message>the storage \
                            behind this gateway is down</Message></Error>";
                let _ = write!(
                    &stream,
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let server = S3Space::shared();
    for endpoint in [failing_endpoint, closed] {
        let mut site = S3Site::new(&server, "s3://backups/web1", "[limits]\ncall_timeout = \"10s\"\n");
        site.endpoint = endpoint.clone();
        site.write("[limits]\ncall_timeout = \"10s\"\n");
        let ran = site.run(&["--now", NOW]);
        assert_eq!(ran.code, 1, "{endpoint}: {}", ran.stderr);
    }
    // The same site against the real server with a bucket that is not
    // there: the site's mistake, exit 2.
    let site = S3Site::new(&server, "s3://never-made/web1", "");
    site.run(&["--now", NOW]).expect_code(2).expect_stderr("does not exist");
}

#[test]
fn two_runners_racing_for_one_store_never_both_run() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    // Two machines: two site files (two working directories) on one store.
    let a = S3Site::new(&server, "s3://backups/shared", "");
    let b = S3Site::new(&server, "s3://backups/shared", "");
    incompressible(&a.www().join("big.bin"), 48);
    let arc = script("arc");
    let spawn = |site: &S3Site| {
        site.offsite(&["run", arc.to_str().unwrap(), "--site", site.file.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = spawn(&a);
    let view = bucket(&server, "s3://backups/shared");
    let deadline = Instant::now() + Duration::from_secs(60);
    while view.get(".offsite/lock").unwrap().is_none_or(|(b, _)| !String::from_utf8_lossy(&b).contains("held")) {
        assert!(Instant::now() < deadline, "the first run never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = Ran::from_output(spawn(&b).wait_with_output().unwrap());
    second.expect_code(4).expect_stderr("another run holds the store");
    Ran::from_output(first.wait_with_output().unwrap()).expect_code(0);
    let ms = manifests(&view);
    assert_eq!(ms.len(), 1, "only the first ran");
}

#[test]
fn verify_catches_a_flipped_byte_in_an_object() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let site = S3Site::new(&server, "s3://backups/web1", "");
    site.run(&["--now", NOW]).expect_code(0);
    // Objects are checked as they download, never written locally: a
    // runner with no room for them (here, no temporary directory at all)
    // verifies them all the same.
    let no_room = site.dir.path().join("no-such-dir");
    let ran = Ran::from_output(
        site.offsite(&["verify", "-v", site.file.to_str().unwrap()]).env("TMPDIR", &no_room).output().unwrap(),
    );
    ran.expect_code(0);
    assert!(ran.stdout.contains("gzip ok, tar of"), "{}", ran.stdout);
    let b = bucket(&server, "s3://backups/web1");
    let mut bytes = download(&b, ARCHIVE);
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    let bytes_len = bytes.len();
    b.put(ARCHIVE, bytes, Put::Overwrite).unwrap();
    let ran = site.command(&["verify"]);
    ran.expect_code(1).expect_stderr("corrupt: sha256");
    // A subset reads the newest run whole and asks of the older object
    // only its size (a HEAD): exactly one of two parts finds the flip.
    site.run(&["--now", "2004-03-21T13:48:44Z"]).expect_code(0);
    let mut found = 0;
    for part in ["1/2", "2/2"] {
        let ran = site.command(&["verify", "-v", "--read-data-subset", part]);
        if ran.code == 1 {
            ran.expect_stderr(&format!("{ARCHIVE}: corrupt: sha256"));
            found += 1;
        } else {
            ran.expect_code(0).expect_stdout(&format!("{ARCHIVE}: there, {} bytes (not read", bytes_len));
        }
    }
    assert_eq!(found, 1, "exactly one part reads the older object");
    // An object no manifest lists is a problem too.
    b.put("stray.txt", b"?".to_vec(), Put::Create).unwrap();
    site.command(&["verify"]).expect_code(1).expect_stderr("stray.txt: unlisted");
}

#[test]
fn retention_prunes_old_runs_and_never_the_last_good_one() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let site = S3Site::new(&server, "s3://backups/web1", "[retention]\nkeep_last = 1\n");
    let b = bucket(&server, "s3://backups/web1");
    site.run(&["--now", "2004-03-21T01:48:44Z"]).expect_code(0);
    site.run(&["--now", "2004-03-22T01:48:44Z"]).expect_code(0);
    let archives = |b: &Bucket| keys(b).into_iter().filter(|k| k.ends_with(".tgz")).collect::<Vec<_>>();
    assert_eq!(archives(&b), ["www.20040322-014844.tgz"], "the older run was pruned");
    // A failed run prunes nothing, and the last good run stays.
    incompressible(&site.www().join("big.bin"), 12);
    site.write("[retention]\nkeep_last = 1\n[limits]\nmax_bytes = \"8MiB\"\n");
    site.run(&["--now", "2004-03-23T01:48:44Z"]).expect_code(1);
    site.command(&["prune"]).expect_code(0);
    assert_eq!(archives(&b), ["www.20040322-014844.tgz"]);
    let statuses: Vec<String> = manifests(&b).iter().map(|m| m["status"].as_str().unwrap().to_string()).collect();
    assert_eq!(statuses, ["ok", "failed"]);
    site.command(&["verify"]).expect_code(0);
    // forget is for directory stores: refused before the store's lock is
    // touched (a run may hold it), saying what to do instead.
    let lock = String::from_utf8(download(&b, ".offsite/lock")).unwrap();
    let run_id = manifests(&b)[0]["run_id"].as_str().unwrap().to_string();
    let file = site.file.to_str().unwrap().to_string();
    let refused = Ran::from_output(site.offsite(&["forget", &file, &run_id]).output().unwrap());
    refused.expect_code(2);
    assert!(refused.stderr.contains("forget works on a store in a directory"), "{}", refused.stderr);
    assert_eq!(String::from_utf8(download(&b, ".offsite/lock")).unwrap(), lock, "the lock was not taken");
}

/// `[[copy]]` for S3: the endpoint of `server`.
fn copy_table(server: &S3Space, url: &str, retention: &str) -> String {
    format!(
        "[[copy]]\nstore = \"{}\"\n[copy.s3]\nendpoint = \"{}\"\npath_style = true\npart_size = \"5MiB\"\n{retention}",
        server.url(url),
        server.endpoint()
    )
}

/// The 3-2-1 rule: a run goes to its store and to two copies (a directory
/// and another bucket with retention of its own); when the first store is
/// lost, the copies restore it.
#[test]
fn copies_in_two_more_stores_survive_the_loss_of_the_first() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    server.create_bucket("vault");
    let site = S3Site::new(&server, "s3://backups/web1", "");
    let local = site.dir.path().join("copy/web1");
    std::fs::create_dir_all(&local).unwrap();
    let copies = format!(
        "[[copy]]\nstore = \"copy/web1\"\n{}",
        copy_table(&server, "s3://vault/web1", "[copy.retention]\nkeep_last = 1\n")
    );
    site.write(&copies);
    site.run(&["--now", "2004-03-21T01:48:44Z"]).expect_code(0);
    let ran = site.run(&["--now", "2004-03-22T01:48:44Z"]);
    ran.expect_code(0);
    assert_eq!(ran.stderr, "", "quiet on success");

    // The directory keeps both runs, the vault its newest (keep_last = 1).
    let first = bucket(&server, "s3://backups/web1");
    let vault = bucket(&server, "s3://vault/web1");
    let archives = |names: Vec<String>| names.into_iter().filter(|k| k.ends_with(".tgz")).collect::<Vec<_>>();
    assert_eq!(archives(keys(&first)), ["www.20040321-014844.tgz", "www.20040322-014844.tgz"]);
    assert_eq!(archives(keys(&vault)), ["www.20040322-014844.tgz"]);
    let mut in_dir: Vec<String> = std::fs::read_dir(&local)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tgz"))
        .collect();
    in_dir.sort();
    assert_eq!(in_dir, ["www.20040321-014844.tgz", "www.20040322-014844.tgz"]);
    // The copies' manifests are the runs' own: same ids, same hashes.
    let ms = manifests(&first);
    let copied: serde_json::Value = serde_json::from_slice(
        &std::fs::read(local.join(format!(".offsite/manifests/{}.json", ms[1]["run_id"].as_str().unwrap()))).unwrap(),
    )
    .unwrap();
    assert_eq!(copied["files"], ms[1]["files"]);
    assert_eq!(manifests(&vault)[0]["files"], ms[1]["files"]);

    let verified = site.command(&["verify", "-v"]);
    verified.expect_code(0);
    assert!(
        verified.stdout.contains("copy 1 (")
            && verified.stdout.contains(&format!("copy 2 ({})", server.url("s3://vault/web1"))),
        "{}",
        verified.stdout
    );
    let status = site.command(&["status"]);
    status.expect_code(0);
    assert_eq!(status.stdout.matches("up to date").count(), 2, "{}", status.stdout);
    // A copy's manifests are the copy store's text: a forged run id with
    // a terminal escape reaches status escaped.
    let forged_id = "99990101T000000.000Z-1\u{1b}[2J";
    let mut forged = copied.clone();
    forged["run_id"] = forged_id.into();
    std::fs::write(local.join(format!(".offsite/manifests/{forged_id}.json")), serde_json::to_vec(&forged).unwrap())
        .unwrap();
    let status = site.command(&["status"]);
    assert!(status.stdout.contains("99990101T000000.000Z-1\\e[2J"), "{}", status.stdout);
    assert!(!status.stdout.contains('\u{1b}'), "{}", status.stdout);
    std::fs::remove_file(local.join(format!(".offsite/manifests/{forged_id}.json"))).unwrap();

    // `runs` shows which copies hold each run: the vault only the newest.
    let listed = site.command(&["runs"]);
    listed.expect_code(0);
    let lines: Vec<&str> = listed.stdout.lines().collect();
    assert!(
        lines[0].ends_with("  copies") && lines[1].ends_with("  1,2") && lines[2].ends_with("  1"),
        "{}",
        listed.stdout
    );
    assert!(
        listed.stdout.contains(&format!("copy 2 ({}): 1 run(s)", server.url("s3://vault/web1"))),
        "{}",
        listed.stdout
    );

    // The first store is lost: every object under its prefix goes.
    for key in keys(&first) {
        first.delete(&key).unwrap();
    }
    site.command(&["verify"]).expect_code(1).expect_stderr("runs were lost from it");
    site.command(&["runs"]).expect_code(0).expect_stdout("2 run(s), 2 of them no longer in the store");
    // The copies restore it: GNU tar reads the directory's and the
    // vault's archive back to the tree.
    let out = tempfile::tempdir().unwrap();
    let from_vault = out.path().join("vault.tgz");
    std::fs::write(&from_vault, download(&vault, "www.20040322-014844.tgz")).unwrap();
    for archive in [local.join("www.20040322-014844.tgz"), from_vault] {
        let into = tempfile::tempdir_in(out.path()).unwrap();
        let x = Command::new("tar").arg("-xzf").arg(&archive).arg("-C").arg(into.path()).output().unwrap();
        assert!(x.status.success(), "{}", String::from_utf8_lossy(&x.stderr));
        assert_same_tree(&site.www(), &into.path().join(site.www().strip_prefix("/").unwrap()));
    }
    Ran::from_output(offsite(Path::new(BIN)).arg("verify").arg(&local).output().unwrap()).expect_code(0);
    // Offsite reads them back by the site's copy numbers: the vault's one
    // run, a file from the directory copy, a tree unpacked from the vault.
    let file = site.file.to_str().unwrap();
    let listed = Ran::from_output(site.offsite(&["runs", file, "--from-copy", "2", "--json"]).output().unwrap());
    listed.expect_code(0);
    let v: serde_json::Value = serde_json::from_str(listed.stdout.trim()).unwrap();
    assert_eq!(v["runs"].as_array().unwrap().len(), 1, "{v}");
    let cat = site.offsite(&["cat", file, "www.20040322-014844.tgz", "--from-copy", "1"]).output().unwrap();
    assert!(cat.status.success(), "{}", String::from_utf8_lossy(&cat.stderr));
    assert_eq!(cat.stdout, std::fs::read(local.join("www.20040322-014844.tgz")).unwrap());
    let into = out.path().join("from-vault");
    let args =
        ["restore", file, "www.20040322-014844.tgz", "--extract", "--from-copy", "2", "--to", into.to_str().unwrap()];
    Ran::from_output(site.offsite(&args).output().unwrap()).expect_code(0);
    assert_same_tree(&site.www(), &into.join(site.www().strip_prefix("/").unwrap()));
    Ran::from_output(site.offsite(&["runs", file, "--from-copy", "3"]).output().unwrap())
        .expect_code(2)
        .expect_stderr("has 2 [[copy]] store(s)");
    // Without --from-copy, the first copy that holds what is asked for is
    // read, and stderr says so: the directory copy, then (gone too) the
    // vault.
    let cat = site.offsite(&["cat", file, "www.20040322-014844.tgz"]).output().unwrap();
    assert!(cat.status.success(), "{}", String::from_utf8_lossy(&cat.stderr));
    assert_eq!(cat.stdout, std::fs::read(local.join("www.20040322-014844.tgz")).unwrap());
    let said = String::from_utf8_lossy(&cat.stderr);
    assert!(said.contains("has no such run or file; reading [[copy]] 1 ("), "{said}");
    // --from-copy reads the copy it names and no other: the vault lacks
    // the older archive, which copy 1 has.
    let older = ms[0]["run_id"].as_str().unwrap();
    let args = ["cat", file, older, "www.20040321-014844.tgz", "--from-copy", "2"];
    let ran = Ran::from_output(site.offsite(&args).output().unwrap());
    ran.expect_code(2).expect_stderr(&format!("no run {older}"));
    assert!(!ran.stderr.contains("reading [[copy]]"), "{}", ran.stderr);
    std::fs::rename(&local, local.with_extension("gone")).unwrap();
    let into = out.path().join("from-vault-again");
    let args = ["restore", file, "latest", "www.*.tgz", "--extract", "--to", into.to_str().unwrap()];
    let ran = Ran::from_output(site.offsite(&args).output().unwrap());
    ran.expect_code(0).expect_stderr(&format!("reading [[copy]] 2 ({})", server.url("s3://vault/web1")));
    assert_same_tree(&site.www(), &into.join(site.www().strip_prefix("/").unwrap()));
}

/// A copy whose store is not there yet: the run is good and says the
/// copy failed (a warning, exit 0); once the store is there, the next
/// run copies both runs.
#[test]
fn a_failed_copy_is_a_warning_and_the_next_run_catches_up() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let site = S3Site::new(&server, "s3://backups/web1", "");
    site.write(&format!("[[copy]]\nstore = \"usb/web1\"\n{}", copy_table(&server, "s3://late/web1", "")));
    let ran = site.run(&["--now", "2004-03-21T01:48:44Z"]);
    let late_failed = format!("copy 2 to {} failed", server.url("s3://late/web1"));
    ran.expect_code(0).expect_stderr(&late_failed);
    assert!(ran.stderr.contains("does not exist"), "{}", ran.stderr);
    // A copy directory that is not there (a disk not mounted) is never
    // made: the copy fails instead of landing under the mount point.
    assert!(ran.stderr.contains("a disk not mounted?"), "{}", ran.stderr);
    assert!(!site.dir.path().join("usb").exists());
    // check names both copies and what is wrong with each.
    let checked = site.command(&["check", "--connect"]);
    assert!(checked.stdout.contains("usb/web1 (copy 1)"), "{}", checked.stdout);
    assert!(checked.stdout.contains("copy 1 fails with a warning until it is there"), "{}", checked.stdout);
    assert!(checked.stdout.contains("late"), "{}", checked.stdout);
    assert!(checked.stdout.contains("(copy 2)"), "{}", checked.stdout);
    checked.expect_code(2);
    assert!(
        checked.stderr.contains("[[copy]] 2") && checked.stderr.contains("create the bucket"),
        "{}",
        checked.stderr
    );
    let first = bucket(&server, "s3://backups/web1");
    let ms = manifests(&first);
    assert_eq!(ms[0]["status"], "warning", "the manifest records the failed copy");
    assert!(ms[0]["warnings"].to_string().contains(&late_failed), "{}", ms[0]);
    let status = site.command(&["status"]);
    assert!(status.stdout.contains("cannot be read"), "{}", status.stdout);

    server.create_bucket("late");
    std::fs::create_dir_all(site.dir.path().join("usb/web1")).unwrap();
    site.run(&["--now", "2004-03-22T01:48:44Z"]).expect_code(0);
    assert_eq!(
        std::fs::read_dir(site.dir.path().join("usb/web1/.offsite/manifests")).unwrap().count(),
        2,
        "both runs are in the directory copy too"
    );
    let late = bucket(&server, "s3://late/web1");
    let copied: Vec<String> = manifests(&late).iter().map(|m| m["run_id"].as_str().unwrap().to_string()).collect();
    let ran_ids: Vec<String> = manifests(&first).iter().map(|m| m["run_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(copied, ran_ids, "both runs are in the copy");
    site.command(&["verify"]).expect_code(0);
    assert_eq!(site.command(&["status"]).stdout.matches("up to date").count(), 2);
}

/// Copies are part of the run: a copy store that accepts connections and
/// never answers holds the run up to its deadline, not for the hour of
/// `call_timeout`. The run is a warning and its backup stays good.
#[test]
fn a_copy_to_a_silent_store_ends_at_the_runs_deadline() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming() {
            held.push(conn);
        }
    });
    let site = S3Site::new(&server, "s3://backups/web1", "");
    site.write(&format!(
        "[limits]\ndeadline = \"8s\"\ncall_timeout = \"1h\"\n[[copy]]\nstore = \"s3://silent/web1\"\n[copy.s3]\n\
         endpoint = \"http://127.0.0.1:{port}\"\npath_style = true\n"
    ));
    let started = Instant::now();
    let ran = site.run(&["--now", NOW]);
    let took = started.elapsed();
    ran.expect_code(0).expect_stderr("copy 1 to s3://silent/web1 failed");
    assert!(ran.stderr.contains("stopped at the run's deadline"), "{}", ran.stderr);
    assert!(took < Duration::from_secs(40), "the run took {took:?}");
    let ms = manifests(&bucket(&server, "s3://backups/web1"));
    assert_eq!(ms[0]["status"], "warning", "{}", ms[0]);
    assert_eq!(ms[0]["files"].as_array().unwrap().len(), 1, "the backup itself is in place");
}

/// Encryption happens before the upload, and manifests are signed, as in
/// a directory: age decrypts what the bucket holds, ssh-keygen checks the
/// signature object, and verify checks both.
#[test]
fn an_s3_store_holds_age_encrypted_outputs_and_signed_manifests() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let site = S3Site::new(&server, "s3://backups/web1", "");
    let keys = site.dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let (identity, recipient) = age_keypair(&keys);
    let (signing, _) = ssh_keypair(&keys, "offsite");
    site.write(&format!("[protect]\nage_recipients = [\"{recipient}\"]\nsigning_key = \"{}\"\n", signing.display()));
    site.run(&["--now", NOW]).expect_code(0);

    let b = bucket(&server, "s3://backups/web1");
    let name = format!("{ARCHIVE}.age");
    let stored = download(&b, &name);
    assert!(stored.starts_with(b"age-encryption.org/v1"), "encrypted before it left");
    let m = &manifests(&b)[0];
    assert_eq!(
        (m["files"][0]["path"].as_str(), m["files"][0]["sha256"].as_str()),
        (Some(name.as_str()), Some(sha256(&stored).as_str()))
    );
    let scratch = tempfile::tempdir().unwrap();
    std::fs::write(scratch.path().join("a.age"), &stored).unwrap();
    let shell = format!("age -d -i {} {} | tar -tzf -", identity.display(), scratch.path().join("a.age").display());
    let listed = Command::new("sh").args(["-c", &shell]).output().unwrap();
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("www/index.html"));

    // The signature object, checked by ssh-keygen.
    let manifest_key = keys_of(&b).into_iter().find(|k| k.ends_with(".json")).unwrap();
    std::fs::write(scratch.path().join("m.json"), b.get(&manifest_key).unwrap().unwrap().0).unwrap();
    std::fs::write(scratch.path().join("m.json.sig"), b.get(&format!("{manifest_key}.sig")).unwrap().unwrap().0)
        .unwrap();
    let public = std::fs::read_to_string(signing.with_extension("pub")).unwrap();
    std::fs::write(scratch.path().join("allowed"), format!("offsite {public}")).unwrap();
    let checked = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-I", "offsite", "-n", "offsite-manifest", "-f"])
        .arg(scratch.path().join("allowed"))
        .arg("-s")
        .arg(scratch.path().join("m.json.sig"))
        .stdin(std::fs::File::open(scratch.path().join("m.json")).unwrap())
        .output()
        .unwrap();
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));

    let ran = site.command(&[
        "verify",
        "-v",
        "--key",
        signing.with_extension("pub").to_str().unwrap(),
        "--age-identity",
        identity.to_str().unwrap(),
    ]);
    ran.expect_code(0);
    assert!(ran.stdout.contains("signature ok") && ran.stdout.contains("decrypted, gzip ok"), "{}", ran.stdout);

    // `runs` and `cat` read it back from the bucket: the manifest's
    // signature checked first, the object checked and decrypted as it
    // streams.
    let file = site.file.to_str().unwrap();
    let runs = Ran::from_output(site.offsite(&["runs", file, "--json"]).output().unwrap());
    runs.expect_code(0);
    let listed: serde_json::Value = serde_json::from_str(runs.stdout.trim()).unwrap();
    assert_eq!((&listed["runs"][0]["signed"], &listed["runs"][0]["encrypted"]), (&true.into(), &"yes".into()));
    let public = signing.with_extension("pub");
    let cat = |args: &[&str]| {
        let mut all = vec!["cat", file];
        all.extend_from_slice(args);
        site.offsite(&all).output().unwrap()
    };
    let out = cat(&[ARCHIVE, "--age-identity", identity.to_str().unwrap(), "--key", public.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut tar = Command::new("tar").args(["-tzf", "-"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(tar.stdin.as_mut().unwrap(), &out.stdout).unwrap();
    let entries = tar.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&entries.stdout).contains("www/index.html"), "GNU tar reads what cat wrote");
    let mut ls = vec!["ls", file, ARCHIVE, "--age-identity", identity.to_str().unwrap()];
    let listed = Ran::from_output(site.offsite(&ls).output().unwrap());
    listed.expect_code(0);
    assert!(listed.stdout.contains("www/index.html"), "{}", listed.stdout);
    ls.truncate(3);
    Ran::from_output(site.offsite(&ls).output().unwrap()).expect_code(2).expect_stderr("give --age-identity");
    let to = scratch.path().join("restored");
    let restore = ["restore", file, "--to", to.to_str().unwrap(), "--age-identity", identity.to_str().unwrap()];
    Ran::from_output(site.offsite(&restore).output().unwrap()).expect_code(0);
    let tar = Command::new("tar").arg("-tzf").arg(to.join(ARCHIVE)).output().unwrap();
    assert!(
        String::from_utf8_lossy(&tar.stdout).contains("www/index.html"),
        "restored decrypted, under its plain name"
    );
    let raw = cat(&["latest", &name]);
    assert!(raw.status.success(), "{}", String::from_utf8_lossy(&raw.stderr));
    assert_eq!(sha256(&raw.stdout), sha256(&stored), "without an identity: the stored bytes, checked");
    // A manifest whose signature does not verify is not trusted.
    let (other, _) = ssh_keypair(&keys, "other");
    let refused = cat(&[ARCHIVE, "--key", other.with_extension("pub").to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(refused.stdout.is_empty());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("signature does not verify"), "{refused:?}");

    // A flipped byte in the encrypted object: decryption stops at it, and
    // the report names the hash that no longer matches.
    let mut flipped = stored.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    b.put(&name, flipped, Put::Overwrite).unwrap();
    let ran = site.command(&["verify", "--age-identity", identity.to_str().unwrap()]);
    ran.expect_code(1).expect_stderr("corrupt: sha256");
    let out = cat(&[&name]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be discarded"), "{out:?}");
}

fn keys_of(b: &Bucket) -> Vec<String> {
    keys(b).into_iter().filter(|k| k.starts_with(".offsite/manifests/")).collect()
}

/// Memory stays flat whatever the size of an output: one four times the
/// size of another (both many parts long) takes no more, and both stay
/// under 64 MiB plus three parts (the one filling and two on the wire).
#[test]
fn memory_stays_flat_whatever_the_size_of_an_output() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let site = S3Site::new(&server, "s3://backups/web1", "");
    let peak = |now: &str| {
        let ran = site.run(&["--now", now, "--json"]);
        ran.expect_code(0);
        let summary: serde_json::Value = serde_json::from_str(ran.stdout.trim()).unwrap();
        summary["peak_rss_kib"].as_u64().unwrap()
    };
    incompressible(&site.www().join("big.bin"), 24);
    let medium = peak("2004-03-21T01:48:44Z");
    incompressible(&site.www().join("big.bin"), 96);
    let large = peak("2004-03-22T01:48:44Z");
    let bound = (64 + 3 * 5) << 10;
    assert!(medium < bound && large < bound, "peak RSS {medium} KiB and {large} KiB, bound {bound} KiB");
    eprintln!("peak RSS: 24 MiB output {medium} KiB, 96 MiB output {large} KiB");
    assert!(large < medium + (6 << 10), "96 MiB took {large} KiB, 24 MiB {medium} KiB");
}

/// A manifest is data anyone with write access to the bucket can change.
/// One that names the store's own objects is never acted on: retention
/// does not delete them, and a copy leaves its run out (with a warning)
/// and goes on with the others.
#[test]
fn a_tampered_manifest_neither_deletes_the_stores_objects_nor_blocks_copies() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let site = S3Site::new(&server, "s3://backups/web1", "");
    site.run(&["--now", "2004-03-21T01:48:44Z"]).expect_code(0);
    let b = bucket(&server, "s3://backups/web1");
    let first = manifests(&b).remove(0);
    let first_key = format!(".offsite/manifests/{}.json", first["run_id"].as_str().unwrap());
    let size = b.head(&first_key).unwrap().unwrap().size;
    // An older "run" whose one file is the first run's manifest.
    let mut fake = first.clone();
    fake["run_id"] = "20000101T000000.000Z-1".into();
    fake["files"][0]["path"] = first_key.clone().into();
    fake["files"][0]["bytes"] = size.into();
    b.put(".offsite/manifests/20000101T000000.000Z-1.json", serde_json::to_vec(&fake).unwrap(), Put::Create).unwrap();

    let copy = site.dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    site.write("[retention]\nkeep_last = 1\n[[copy]]\nstore = \"copy\"\n");
    let ran = site.run(&["--now", "2004-03-22T01:48:44Z"]);
    ran.expect_code(0);
    assert!(ran.stderr.contains("left out run 20000101T000000.000Z-1"), "{}", ran.stderr);
    assert!(ran.stderr.contains("refuses"), "{}", ran.stderr);
    // The other runs were copied; retention pruned the first run's
    // archive (its own manifest told it to) and left its manifest object
    // alone when the fake listed it.
    let copied = std::fs::read_dir(copy.join(".offsite/manifests")).unwrap().count();
    assert_eq!(copied, 2, "the two real runs are in the copy");
    let all = keys(&b);
    assert!(!all.contains(&ARCHIVE.to_string()), "{all:?}");
    assert!(all.contains(&"www.20040322-014844.tgz".to_string()), "{all:?}");
    assert!(!all.iter().any(|k| k.starts_with(".offsite/manifests/20000101")), "the fake was pruned: {all:?}");
}

/// Reading back from a bucket streams: `cat` and `restore --extract` of a
/// 96 MiB archive stay within 64 MiB of memory. A connection that drops
/// mid-download fails `cat` clearly (exit 1, what it wrote to be
/// discarded).
#[test]
fn reading_back_stays_flat_in_memory_and_a_dropped_connection_fails_clearly() {
    let mut server = S3Space::own();
    server.create_bucket("backups");
    let site = S3Site::new(&server, "s3://backups/web1", "");
    incompressible(&site.www().join("big.bin"), 96);
    site.run(&["--now", NOW]).expect_code(0);
    let file = site.file.to_str().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let to = scratch.path().join("restored");
    let cat = ["cat", file, ARCHIVE];
    let extract = ["restore", file, ARCHIVE, "--extract", "--to", to.to_str().unwrap()];
    for args in [&cat[..], &extract[..]] {
        let peak = scratch.path().join("peak");
        let mut cmd = offsite_testkit::with_peak_memory(&site.offsite(args), &peak);
        let out = cmd.stdout(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let mib = offsite_testkit::peak_memory_mib(&peak);
        eprintln!("{}: peak RSS {mib} MiB", args[0]);
        assert!(mib <= 64, "{args:?} peaked at {mib} MiB");
    }
    assert_same_tree(&site.www(), &to.join(site.www().strip_prefix("/").unwrap()));

    // The server goes away after the first megabytes have arrived.
    let mut child = site.offsite(&cat).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = vec![0u8; 4 << 20];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    server.stop();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stdout, &mut rest);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(first.len() + rest.len() < 96 << 20, "it did not get the whole file");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("must be discarded"), "{said}");
}
