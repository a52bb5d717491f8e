//! Backup integrity and lifecycle, end to end with the real binary:
//! manifests, `verify`, incomplete runs, locks, retention, reports and the
//! fault cases (a full disk, a flipped byte, failed runs, concurrent and
//! killed runs).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use offsite_testkit::{Ran, offsite, script, tempfile, tree};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

/// A site whose store and source live in one scratch directory.
struct Site {
    dir: tempfile::TempDir,
    extra: String,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("src/www")).unwrap();
        std::fs::write(dir.path().join("src/www/index.html"), "<html>hello</html>\n".repeat(100)).unwrap();
        Site { dir, extra: String::new() }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn store(&self) -> PathBuf {
        self.path("store")
    }

    fn file(&self) -> PathBuf {
        // Beside the sources: relative sources (`path=www`) mean the site
        // file's directory.
        let file = self.path("src/site.toml");
        let text = format!(
            "name = \"web\"\nstore = \"{}\"\n[read]\nroots = [\"{}\"]\n{}",
            self.store().display(),
            self.path("src").display(),
            self.extra
        );
        std::fs::write(&file, text).unwrap();
        file
    }

    fn offsite(&self) -> Command {
        let mut cmd = offsite(Path::new(BIN));
        cmd.current_dir(self.path("src"));
        cmd
    }

    /// `offsite run SCRIPT --site SITE ARGS...`.
    fn run(&self, name: &str, args: &[&str]) -> Ran {
        let site = self.file();
        let mut cmd = self.offsite();
        cmd.arg("run").arg(script(name)).arg("--site").arg(&site).args(args);
        Ran::from_output(cmd.output().unwrap())
    }

    /// The fixture script's `case` with `arg` (plus `extra` args).
    fn fixture(&self, case: &str, arg: &str, extra: &[&str]) -> Ran {
        let (case, arg) = (format!("case={case}"), format!("arg={arg}"));
        let mut args = vec!["--param", &case, "--param", &arg];
        args.extend_from_slice(extra);
        self.run("fixture", &args)
    }

    /// A good run storing `www.STAMP.tgz`.
    fn arc(&self, now: &str) -> Ran {
        self.run("arc", &["--param", "path=www", "--now", now])
    }

    fn verify(&self, extra: &[&str]) -> Ran {
        let site = self.file();
        Ran::from_output(self.offsite().arg("-v").arg("verify").arg(&site).args(extra).output().unwrap())
    }

    fn manifests(&self) -> Vec<Value> {
        let dir = self.store().join(".offsite/manifests");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        names.iter().map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()).collect()
    }

    /// Encrypts to a new age identity and signs manifests with a new key:
    /// the identity file and the signing key's path.
    fn protect(&mut self) -> (PathBuf, PathBuf) {
        let keys = self.path("keys");
        std::fs::create_dir(&keys).unwrap();
        let (identity, recipient) = offsite_testkit::age_keypair(&keys);
        let (signing, _) = offsite_testkit::ssh_keypair(&keys, "manifest_key");
        self.extra =
            format!("[protect]\nage_recipients = [\"{recipient}\"]\nsigning_key = \"{}\"\n", signing.display());
        (identity, signing)
    }

    fn backups(&self) -> Vec<String> {
        tree(&self.store()).iter().map(|p| p.display().to_string()).collect()
    }
}

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_good_run_writes_a_manifest_that_verify_and_sha256sum_agree_with() {
    let site = Site::new();
    site.arc("2004-03-21T01:48:44").expect_code(0);
    assert_eq!(site.backups(), vec!["www.20040321-014844.tgz"]);
    let manifests = site.manifests();
    assert_eq!(manifests.len(), 1);
    let m = &manifests[0];
    assert_eq!(m["status"], "ok");
    assert_eq!(m["site"], "web");
    assert_eq!(m["script"]["name"], "arc");
    assert_eq!(m["script"]["sha256"].as_str().unwrap(), sha256sum(&script("arc")));
    assert_eq!(m["grants_sha256"].as_str().unwrap().len(), 64);
    assert!(m["started"].as_str().unwrap() <= m["ended"].as_str().unwrap());
    let f = &m["files"][0];
    assert_eq!(f["path"], "www.20040321-014844.tgz");
    assert_eq!(f["sha256"].as_str().unwrap(), sha256sum(&site.store().join("www.20040321-014844.tgz")));
    assert_eq!(f["origin"]["call"], "archive.tar-gz");
    assert_eq!(f["origin"]["sources"][0], "www");
    // Nothing left in staging, and the store's own files are private.
    assert!(tree(&site.store().join(".offsite/runs")).is_empty());
    let ran = site.verify(&[]);
    ran.expect_code(0);
    assert!(ran.stdout.contains("www.20040321-014844.tgz: ok"), "{}", ran.stdout);
    assert!(ran.stdout.contains("gzip ok, tar of 2 entries"), "{}", ran.stdout);
    assert!(ran.stdout.contains("1 file(s) in 1 run(s) checked, 0 problem(s)"), "{}", ran.stdout);
    // Verify names the store directory just as well.
    Ran::from_output(offsite(Path::new(BIN)).arg("verify").arg(site.store()).output().unwrap()).expect_code(0);
}

#[test]
fn verify_finds_a_flipped_byte_a_missing_file_and_an_unlisted_one() {
    let site = Site::new();
    site.arc("2004-03-21T01:48:44").expect_code(0);
    site.arc("2004-03-21T13:48:44").expect_code(0);
    let first = site.store().join("www.20040321-014844.tgz");
    let mut bytes = std::fs::read(&first).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&first, bytes).unwrap();
    let ran = site.verify(&[]);
    ran.expect_code(1).expect_stderr("www.20040321-014844.tgz: corrupt: sha256");
    assert!(ran.stderr.contains("gzip") || ran.stderr.contains("tar"), "the format check says why too: {}", ran.stderr);
    assert!(!ran.stderr.contains("20040321-134844"), "the other file is fine: {}", ran.stderr);

    std::fs::remove_file(&first).unwrap();
    std::fs::write(site.store().join("stray.txt"), "who put this here").unwrap();
    site.verify(&[])
        .expect_code(1)
        .expect_stderr("www.20040321-014844.tgz: missing")
        .expect_stderr("stray.txt: unlisted");
}

/// `verify --read-data-subset`: part n of t reads the files of its part
/// (and the newest run's, always) whole, and of the others checks that
/// they are there with their size; parts 1/t to t/t together read all.
#[test]
fn verify_reads_a_subset_and_its_parts_together_read_everything() {
    let site = Site::new();
    let stamps = ["01", "02", "03", "04", "05", "06"];
    for hour in stamps {
        site.arc(&format!("2004-03-21T{hour}:00:00")).expect_code(0);
    }
    let flip = |name: &str| {
        let path = site.store().join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
    };
    flip("www.20040321-010000.tgz");
    let mut found = 0;
    for part in ["1/3", "2/3", "3/3"] {
        let ran = site.verify(&["--read-data-subset", part]);
        if ran.code == 1 {
            ran.expect_stderr("www.20040321-010000.tgz: corrupt: sha256");
            found += 1;
        } else {
            ran.expect_code(0);
        }
        ran.expect_stdout(&format!("not read: --read-data-subset {part}"))
            .expect_stdout("only for presence and size: --read-data-subset");
        assert!(
            !ran.stdout.contains("www.20040321-060000.tgz: there"),
            "the newest run is always read: {}",
            ran.stdout
        );
    }
    assert_eq!(found, 1, "exactly one part holds the flipped file");
    site.verify(&["--read-data-subset", "100%"]).expect_code(1).expect_stderr("010000.tgz: corrupt: sha256");

    // The newest run's files are read whatever the subset; a file cut
    // short is found by its size.
    flip("www.20040321-060000.tgz");
    let cut = site.store().join("www.20040321-020000.tgz");
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 1]).unwrap();
    for part in ["1/3", "2/3", "3/3"] {
        site.verify(&["--read-data-subset", part])
            .expect_code(1)
            .expect_stderr("060000.tgz: corrupt: sha256")
            .expect_stderr("020000.tgz: corrupt:");
    }
    for bad in ["0/3", "4/3", "0%", "101%", "half"] {
        let ran = site.verify(&["--read-data-subset", bad]);
        ran.expect_code(2).expect_stderr("give n/t");
    }
}

#[test]
fn a_run_that_fails_after_storing_a_file_is_incomplete_and_replaces_nothing() {
    let site = Site::new();
    // A good backup under the same name first.
    site.fixture("tar", "www", &[]).expect_code(0);
    let good = std::fs::read(site.store().join("fixture.tgz")).unwrap();
    std::fs::write(site.path("src/www/new.html"), "new").unwrap();
    let ran = site.fixture("tar-then-fail", "www", &["--json"]);
    ran.expect_code(1).expect_stderr("failing after storing fixture.tgz");
    let summary: Value = serde_json::from_str(ran.stdout.trim()).unwrap();
    assert_eq!(summary["status"], "incomplete");
    let kept_in = summary["kept_in"].as_str().unwrap();
    assert!(kept_in.starts_with(".offsite/runs/"), "{kept_in}");
    assert_eq!(std::fs::read(site.store().join("fixture.tgz")).unwrap(), good, "the good backup is untouched");
    assert!(site.store().join(kept_in).join("fixture.tgz").is_file(), "the complete file is kept aside");
    let m = site.manifests();
    assert_eq!((m[0]["status"].as_str(), m[1]["status"].as_str()), (Some("ok"), Some("incomplete")));
    // Kept files are listed, so verify checks them and finds nothing wrong.
    site.verify(&[]).expect_code(0);

    // Nothing stored at all: failed.
    site.fixture("fail", "x", &["--json"]).expect_code(1);
    assert_eq!(site.manifests()[2]["status"], "failed");
    // A warning the script logs makes a good run `warning`, exit 0.
    site.fixture("warn", "www", &[]).expect_code(0).expect_stderr("something looked odd");
    let m = site.manifests();
    assert_eq!(m[3]["status"], "warning");
    assert!(m[3]["warnings"][0].as_str().unwrap().contains("something looked odd"), "{}", m[3]);
}

#[test]
fn a_partial_run_publishes_its_new_output_and_keeps_aside_what_would_replace_a_good_file() {
    let site = Site::new();
    site.fixture("tar", "www", &[]).expect_code(0);
    let good = std::fs::read(site.store().join("fixture.tgz")).unwrap();
    std::fs::write(site.path("src/www/new.html"), "new").unwrap();
    let ran = site.fixture("tar-twice-then-fail", "www", &["--json"]);
    ran.expect_code(1)
        .expect_stderr("backup partial: 1 output(s) published (second.tgz), 1 kept aside in .offsite/runs/");
    ran.expect_stderr("the script failed: failing after storing fixture.tgz and second.tgz");
    let summary: Value = serde_json::from_str(ran.stdout.trim()).unwrap();
    assert_eq!(summary["status"], "partial");
    let kept_in = summary["kept_in"].as_str().unwrap();
    assert_eq!(std::fs::read(site.store().join("fixture.tgz")).unwrap(), good, "the good backup is untouched");
    assert!(site.store().join(kept_in).join("fixture.tgz").is_file(), "the would-be replacement is kept aside");
    assert!(!site.store().join(kept_in).join("second.tgz").exists());
    let listed = Command::new("tar").arg("-tzf").arg(site.store().join("second.tgz")).output().unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains("www/new.html"), "GNU tar reads the published one");
    let m = site.manifests();
    assert_eq!(m[1]["status"], "partial");
    assert_eq!((m[1]["files"][0]["kept"].as_bool(), m[1]["files"][1].get("kept")), (Some(true), None));
    // Both files are listed where they are: verify finds nothing wrong.
    site.verify(&[]).expect_code(0);
    // The site is failing until a good run, and nothing is lost meanwhile.
    let status = Ran::from_output(site.offsite().arg("status").arg(site.file()).output().unwrap());
    status.expect_code(1);
    site.fixture("tar", "www", &[]).expect_code(0);
    site.verify(&[]).expect_code(0);
}

#[test]
fn runs_lists_a_store_and_cat_streams_a_file_back_checked() {
    let site = Site::new();
    site.arc("2004-03-21T01:48:44").expect_code(0);
    site.arc("2004-03-22T01:48:44").expect_code(0);
    let store = site.store();
    let first = std::fs::read(store.join("www.20040321-014844.tgz")).unwrap();
    let second = std::fs::read(store.join("www.20040322-014844.tgz")).unwrap();
    let offsite = |args: &[&str]| Ran::from_output(site.offsite().args(args).output().unwrap());
    let bytes = |args: &[&str]| site.offsite().args(args).output().unwrap();
    // On the site file and on the bare store directory alike, newest first.
    let listed = offsite(&["runs", site.file().to_str().unwrap()]);
    listed.expect_code(0);
    let lines: Vec<&str> = listed.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two runs: {}", listed.stdout);
    assert!(lines[1].contains(" ok ") && lines[2].contains(" ok "), "{}", listed.stdout);
    let json = offsite(&["--json", "runs", store.to_str().unwrap()]);
    json.expect_code(0);
    let v: Value = serde_json::from_str(json.stdout.trim()).unwrap();
    let ids: Vec<&str> = v["runs"].as_array().unwrap().iter().map(|r| r["run_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids[0] > ids[1], "newest first: {ids:?}");
    assert_eq!((&v["runs"][0]["signed"], &v["runs"][0]["encrypted"]), (&false.into(), &"no".into()));

    // `cat`: the latest run by default, or a run id; the bytes are the file's.
    let s = store.to_str().unwrap();
    let out = bytes(&["cat", s, "www.20040322-014844.tgz"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, second);
    let out = bytes(&["cat", s, ids[1], "www.20040321-014844.tgz"]);
    assert_eq!(out.stdout, first);
    let today = chrono::Local::now().format("%Y-%m-%d").to_string();
    assert_eq!(bytes(&["cat", s, &today, "www.20040322-014844.tgz"]).stdout, second, "a date: its newest good run");
    offsite(&["cat", s, "www.20040321-014844.tgz"]).expect_code(2).expect_stderr("has no file www.20040321-014844.tgz");
    offsite(&["cat", s, "nosuchrun", "x"]).expect_code(2).expect_stderr("no run nosuchrun");

    // `ls`: a run's files, and an archive's entries, streamed and checked.
    let files = offsite(&["ls", s]);
    files.expect_code(0);
    assert!(
        files.stdout.contains("www.20040322-014844.tgz") && files.stdout.contains("archive.tar-gz"),
        "{}",
        files.stdout
    );
    let older = offsite(&["ls", s, ids[1]]);
    assert!(older.stdout.contains("www.20040321-014844.tgz"), "one argument naming a run: {}", older.stdout);
    let entries = offsite(&["ls", s, "www.20040322-014844.tgz"]);
    entries.expect_code(0);
    let line = entries
        .stdout
        .lines()
        .find(|l| l.ends_with("  www/index.html"))
        .unwrap_or_else(|| panic!("{}", entries.stdout));
    assert!(line.starts_with("- ") && line.contains(" 1900 "), "type, mode, size: {line}");
    offsite(&["ls", s, "latest", "nosuch.tgz"]).expect_code(2).expect_stderr("has no file nosuch.tgz");

    // `restore`: the latest run's files, checked, beneath --to; what is
    // there already stays unless --overwrite.
    let to = site.path("restored");
    let t = to.to_str().unwrap();
    offsite(&["restore", s, "--to", t]).expect_code(0);
    assert_eq!(std::fs::read(to.join("www.20040322-014844.tgz")).unwrap(), second);
    offsite(&["restore", s, "--to", t]).expect_code(0).expect_stdout("left alone, already there");
    offsite(&["restore", s, ids[1], "--to", t]).expect_code(0);
    assert_eq!(std::fs::read(to.join("www.20040321-014844.tgz")).unwrap(), first);

    // A flipped byte: the bytes go out, then the command fails and says to
    // discard them. A truncated file: nothing goes out.
    let path = store.join("www.20040322-014844.tgz");
    let mut flipped = second.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 1;
    std::fs::write(&path, &flipped).unwrap();
    let out = bytes(&["cat", s, "www.20040322-014844.tgz"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be discarded"), "{out:?}");
    offsite(&["ls", s, "www.20040322-014844.tgz"]).expect_code(1).expect_stderr("not to be trusted");
    // A restore of a corrupt file fails and leaves the good copy (and no
    // temporary file) where it was.
    offsite(&["restore", s, "--to", t, "--overwrite"]).expect_code(1).expect_stderr("not restored");
    assert_eq!(std::fs::read(to.join("www.20040322-014844.tgz")).unwrap(), second);
    assert_eq!(std::fs::read_dir(&to).unwrap().count(), 2, "no temporary file left behind");
    std::fs::write(&path, &second[..second.len() - 1]).unwrap();
    let out = bytes(&["cat", s, "www.20040322-014844.tgz"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "nothing written before the size is checked");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was written"), "{out:?}");
}

#[test]
fn restore_extract_unpacks_an_archive_and_refuses_one_that_would_escape() {
    let site = Site::new();
    std::fs::create_dir_all(site.path("src/www/docs")).unwrap();
    std::fs::write(site.path("src/www/docs/manual.txt"), "manual\n").unwrap();
    site.arc("2004-03-21T01:48:44").expect_code(0);
    let store = site.store();
    let s = store.to_str().unwrap();
    let offsite = |args: &[&str]| Ran::from_output(site.offsite().args(args).output().unwrap());
    let to = site.path("restored");
    let t = to.to_str().unwrap();
    let archive = "www.20040321-014844.tgz";
    offsite(&["restore", s, archive, "--extract", "--to", t]).expect_code(0).expect_stdout("unpacked 2 file(s)");
    assert_eq!(
        std::fs::read(to.join("www/index.html")).unwrap(),
        std::fs::read(site.path("src/www/index.html")).unwrap()
    );
    assert_eq!(std::fs::read(to.join("www/docs/manual.txt")).unwrap(), b"manual\n");
    let secs = |p: &Path| {
        let t = std::fs::metadata(p).unwrap().modified().unwrap();
        t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    };
    assert_eq!(secs(&to.join("www/index.html")), secs(&site.path("src/www/index.html")), "mtimes as archived");
    // Only what is asked for, and nothing already there is replaced.
    let only = site.path("only");
    offsite(&["restore", s, archive, "www/docs", "--extract", "--to", only.to_str().unwrap()]).expect_code(0);
    assert!(only.join("www/docs/manual.txt").is_file() && !only.join("www/index.html").exists());
    std::fs::write(to.join("www/index.html"), "mine").unwrap();
    offsite(&["restore", s, archive, "--extract", "--to", t]).expect_code(0).expect_stdout("left alone, already there");
    assert_eq!(std::fs::read(to.join("www/index.html")).unwrap(), b"mine");
    offsite(&["restore", s, archive, "--extract", "--overwrite", "--to", t]).expect_code(0);
    assert_ne!(std::fs::read(to.join("www/index.html")).unwrap(), b"mine");

    // An archive crafted to escape (its manifest made to match it, as a
    // compromised store or server could): refused, nothing left anywhere.
    let outside = tempfile::tempdir().unwrap();
    let crafted: Vec<(&str, Vec<u8>)> = vec![
        ("dotdot", craft(&[(b'0', "../escaped.txt", "")])),
        ("absolute", craft(&[(b'0', "/tmp/offsite-absolute-escape.txt", "")])),
        ("symlink", craft(&[(b'2', "link", outside.path().to_str().unwrap()), (b'0', "link/pwned.txt", "")])),
        ("hardlink", craft(&[(b'1', "hard", "/etc/passwd")])),
    ];
    for (what, bytes) in crafted {
        replace_archive(&store, archive, &bytes);
        let target = site.path(&format!("crafted-{what}"));
        let ran = offsite(&["restore", s, archive, "--extract", "--to", target.to_str().unwrap()]);
        ran.expect_code(1);
        assert!(ran.stderr.contains("nothing of it was left"), "{what}: {}", ran.stderr);
        assert!(ran.stderr.contains("the archive is refused"), "{what}: {}", ran.stderr);
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "{what}: nothing in the target");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "{what}: nothing outside");
        assert!(!site.path("escaped.txt").exists() && !Path::new("/tmp/offsite-absolute-escape.txt").exists());
    }
}

/// A .tgz of raw entries (type, name, link target or data), names written
/// as given, whatever they are.
fn craft(entries: &[(u8, &str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (kind, name, other) in entries {
        let mut h = tar::Header::new_gnu();
        let raw = h.as_gnu_mut().unwrap();
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
        let data: &[u8] = if *kind == b'0' { other.as_bytes() } else { b"" };
        if *kind != b'0' {
            raw.linkname[..other.len()].copy_from_slice(other.as_bytes());
        }
        h.set_entry_type(tar::EntryType::new(*kind));
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    gz.finish().unwrap()
}

/// Puts `bytes` in place of the store's `name`, and makes its manifest
/// say so (size and SHA-256).
fn replace_archive(store: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(store.join(name), bytes).unwrap();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(bytes))
    };
    for entry in std::fs::read_dir(store.join(".offsite/manifests")).unwrap() {
        let path = entry.unwrap().path();
        let mut m: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for f in m["files"].as_array_mut().unwrap() {
            if f["path"] == name {
                f["bytes"] = bytes.len().into();
                f["sha256"] = sha.clone().into();
            }
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    }
}

/// Starts `offsite run fixture case=sleep` and waits until its run has begun
/// (so it holds the lock).
fn hold_lock(site: &Site, millis: &str) -> std::process::Child {
    let file = site.file();
    let child = site
        .offsite()
        .arg("run")
        .arg(script("fixture"))
        .arg("--site")
        .arg(&file)
        .args(["--param", "case=sleep", "--param", &format!("arg={millis}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its run has started once its journal exists (the lock is taken before).
    let runs = site.store().join(".offsite/runs");
    let started = || {
        std::fs::read_dir(&runs)
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".journal")))
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started() {
        assert!(Instant::now() < deadline, "the first run never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

#[test]
fn a_second_concurrent_run_exits_4_naming_the_holder() {
    let site = Site::new();
    let first = hold_lock(&site, "3000");
    let ran = site.arc("2004-03-21T01:48:44");
    ran.expect_code(4)
        .expect_stderr(&format!("pid {}", first.id()))
        .expect_stderr("another run holds the store's lock");
    let host = Command::new("hostname").output().unwrap();
    ran.expect_stderr(String::from_utf8_lossy(&host.stdout).trim());
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(site.backups().is_empty(), "the refused run wrote nothing: {:?}", site.backups());
    assert_eq!(site.manifests().len(), 1, "only the run that ran is recorded");
    // Once the holder is done, the next run goes ahead.
    site.arc("2004-03-21T01:48:44").expect_code(0);
}

#[test]
fn a_lock_left_by_a_killed_run_is_taken_over_and_logged() {
    let site = Site::new();
    let mut first = hold_lock(&site, "60000");
    let pid = first.id();
    first.kill().unwrap();
    first.wait().unwrap();
    let ran = site.arc("2004-03-21T01:48:44");
    ran.expect_code(0)
        .expect_stderr(&format!("took over the store's lock from pid {pid}"))
        .expect_stderr("was interrupted before storing anything: recorded as failed");
    assert_eq!(site.backups(), vec!["www.20040321-014844.tgz"]);
    let m = site.manifests();
    assert_eq!(m[0]["status"], "failed");
    assert!(m[0]["error"].as_str().unwrap().contains("interrupted"), "{}", m[0]);
    // The takeover is worth a look: the new run's status says so.
    assert_eq!(m[1]["status"], "warning");
}

/// Unmounts its directory when dropped.
pub(crate) struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A tmpfs mounted at `dir` (created) with `options`, unmounted when the
/// returned guard drops. Needs root, as CI has.
pub(crate) fn mount_tmpfs(dir: &Path, options: &str) -> Unmount {
    std::fs::create_dir(dir).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", options, "offsite-test"]).arg(dir).status().unwrap();
    assert!(mounted.success(), "this test mounts a tmpfs ({options}) and needs root");
    Unmount(dir.to_path_buf())
}

/// An ext4 file system of `mib` MiB on a loop device, mounted at `dir`
/// (created). The store writes through `O_DIRECT` there (see
/// `store/durable.rs`), unlike on tmpfs. Needs root, as CI has.
fn mount_ext4(dir: &Path, image: &Path, mib: u32) -> Unmount {
    let made = Command::new("truncate").arg(format!("-s{mib}M")).arg(image).status().unwrap();
    assert!(made.success());
    let made = Command::new("mkfs.ext4").args(["-q", "-O", "^has_journal", "-m", "0"]).arg(image).status().unwrap();
    assert!(made.success(), "mkfs.ext4");
    std::fs::create_dir(dir).unwrap();
    let mounted = Command::new("mount").args(["-o", "loop"]).arg(image).arg(dir).status().unwrap();
    assert!(mounted.success(), "this test mounts an ext4 image on a loop device and needs root");
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::remove_dir(dir.join("lost+found")).unwrap();
    Unmount(dir.to_path_buf())
}

/// The first backup fits; the second, with `noise` incompressible bytes
/// more, does not.
fn a_full_disk_fails_the_run_and_keeps_the_older_backup(site: &Site, noise: usize) {
    site.arc("2004-03-21T01:48:44").expect_code(0);
    let good = std::fs::read(site.store().join("www.20040321-014844.tgz")).unwrap();
    let noise = Command::new("head").args(["-c", &noise.to_string(), "/dev/urandom"]).output().unwrap().stdout;
    std::fs::write(site.path("src/www/noise.bin"), noise).unwrap();
    let ran = site.arc("2004-03-21T13:48:44");
    ran.expect_code(1).expect_stderr("the store is full").expect_stderr("No space left on device");
    assert_eq!(site.backups(), vec!["www.20040321-014844.tgz"]);
    assert_eq!(std::fs::read(site.store().join("www.20040321-014844.tgz")).unwrap(), good);
    assert_eq!(site.manifests().last().unwrap()["status"], "failed");
    site.verify(&[]).expect_code(0);
}

#[test]
fn a_full_disk_is_a_clear_error_and_older_backups_stay_intact() {
    let site = Site::new();
    let _unmount = mount_tmpfs(&site.store(), "size=1m,mode=0700");
    a_full_disk_fails_the_run_and_keeps_the_older_backup(&site, 3_000_000);
}

/// The same on a file system where full blocks are written directly: the
/// writer thread's `ENOSPC` reaches the run as the same clear error.
#[test]
fn a_full_disk_written_directly_is_the_same_clear_error() {
    let site = Site::new();
    let _unmount = mount_ext4(&site.store(), &site.path("store.img"), 8);
    a_full_disk_fails_the_run_and_keeps_the_older_backup(&site, 12 << 20);
}

#[test]
fn retention_keeps_the_last_good_backup_through_any_number_of_failures() {
    let mut site = Site::new();
    site.extra = "[retention]\nkeep_last = 2\n".into();
    for hour in ["01", "02", "03"] {
        site.arc(&format!("2004-03-21T{hour}:00:00")).expect_code(0);
    }
    // Retention ran after each good run: the oldest went.
    assert_eq!(site.backups(), vec!["www.20040321-020000.tgz", "www.20040321-030000.tgz"]);
    for _ in 0..4 {
        site.fixture("fail", "x", &[]).expect_code(1);
    }
    site.extra = "[retention]\nkeep_last = 1\n".into();
    let file = site.file();
    let dry = Ran::from_output(site.offsite().args(["prune", "--dry-run"]).arg(&file).output().unwrap());
    dry.expect_code(0);
    assert!(dry.stdout.contains("would remove www.20040321-020000.tgz"), "{}", dry.stdout);
    assert!(dry.stdout.contains("the newest good backup"), "{}", dry.stdout);
    assert!(dry.stdout.contains("failed and no good run is newer"), "{}", dry.stdout);
    assert_eq!(site.backups().len(), 2, "a dry run removes nothing");
    std::fs::write(site.store().join("mine.txt"), "not offsite's").unwrap();
    let pruned = Ran::from_output(site.offsite().arg("prune").arg(&file).output().unwrap());
    pruned.expect_code(0);
    assert!(pruned.stdout.contains("remove www.20040321-020000.tgz"), "{}", pruned.stdout);
    assert!(!pruned.stdout.contains("keep "), "from cron, kept runs are not listed: {}", pruned.stdout);
    assert_eq!(site.backups(), vec!["mine.txt", "www.20040321-030000.tgz"], "unlisted files are never removed");
    assert_eq!(site.manifests().len(), 5, "the newest good run and the four failures after it");
    // Nothing left to remove: silent, as cron wants it.
    let again = Ran::from_output(site.offsite().arg("prune").arg(&file).output().unwrap());
    again.expect_code(0);
    assert_eq!((again.stdout.as_str(), again.stderr.as_str()), ("", ""));
}

#[test]
fn prometheus_textfile_and_notifications_report_each_run() {
    let mut site = Site::new();
    let prom = site.path("offsite-web.prom");
    let events = site.path("events");
    site.extra = format!(
        "[report]\nprometheus = \"{}\"\n[notify]\ncommand = [\"sh\", \"-c\", \"{{ echo $OFFSITE_EVENT $OFFSITE_STATUS; cat; }} >> {}\"]\n",
        prom.display(),
        events.display()
    );
    site.arc("2004-03-21T01:48:44").expect_code(0);
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(text.contains("offsite_last_run_status{site=\"web\",status=\"ok\"} 1"), "{text}");
    assert!(text.contains("offsite_last_run_files{site=\"web\"} 1"), "{text}");
    let success = metric(&text, "offsite_last_success_timestamp_seconds");
    assert!(success > 1.7e9, "{text}");
    assert_eq!(std::fs::read_to_string(&events).unwrap(), "start running\nsuccess ok\n");

    site.fixture("fail", "boom", &[]).expect_code(1);
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(text.contains("offsite_last_run_status{site=\"web\",status=\"failed\"} 1"), "{text}");
    assert_eq!(metric(&text, "offsite_last_success_timestamp_seconds"), success, "still the last good run");
    let log = std::fs::read_to_string(&events).unwrap();
    assert!(log.contains("failure failed\n"), "{log}");
    assert!(log.contains("failing on request: boom"), "the log tail comes with a failure: {log}");

    // A broken notification never changes the run's status.
    site.extra = "[notify]\ncommand = [\"false\"]\nurl = \"http://127.0.0.1:9/ping\"\ntimeout = \"2s\"\n".into();
    let ran = site.arc("2004-03-21T02:48:44");
    ran.expect_code(0)
        .expect_stderr("notification command \"false\" failed")
        .expect_stderr("ping to http://127.0.0.1:9/… failed");
    assert_eq!(site.manifests().last().unwrap()["status"], "ok");
}

#[test]
fn notifications_ping_a_url_healthchecks_style() {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut length = 0;
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let mut stream = stream;
            stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK").unwrap();
            seen.push((request_line.trim().to_string(), String::from_utf8_lossy(&body).into_owned()));
        }
        seen
    });
    let mut site = Site::new();
    site.extra = format!("[notify]\nurl = \"http://127.0.0.1:{port}/ping/6f0c-uuid\"\n");
    site.arc("2004-03-21T01:48:44").expect_code(0);
    site.fixture("fail", "boom", &[]).expect_code(1);
    let seen = server.join().unwrap();
    let lines: Vec<&str> = seen.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(
        lines,
        [
            "POST /ping/6f0c-uuid/start HTTP/1.1",
            "POST /ping/6f0c-uuid HTTP/1.1",
            "POST /ping/6f0c-uuid/start HTTP/1.1",
            "POST /ping/6f0c-uuid/fail HTTP/1.1"
        ]
    );
    assert!(seen[3].1.contains("failing on request: boom"), "{}", seen[3].1);
}

pub(crate) fn metric(text: &str, name: &str) -> f64 {
    let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn encrypted_outputs_open_with_age_and_signed_manifests_verify_with_ssh_keygen() {
    let mut site = Site::new();
    let (identity, signing) = site.protect();
    site.arc("2004-03-21T01:48:44").expect_code(0);
    assert_eq!(site.backups(), vec!["www.20040321-014844.tgz.age"]);

    // age itself decrypts it, and GNU tar reads what comes out.
    let stored = site.store().join("www.20040321-014844.tgz.age");
    let shell = format!("age -d -i {} {} | tar -tzf -", identity.display(), stored.display());
    let listed = Command::new("sh").args(["-c", &shell]).output().unwrap();
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("www/index.html"));
    let m = &site.manifests()[0];
    assert_eq!(m["files"][0]["path"], "www.20040321-014844.tgz.age");
    assert_eq!(m["files"][0]["sha256"].as_str().unwrap(), sha256sum(&stored));
    assert!(m["files"][0]["plain"]["sha256"].as_str().unwrap().len() == 64);

    // ssh-keygen checks the manifest's signature on its own.
    let manifests = site.store().join(".offsite/manifests");
    let manifest = std::fs::read_dir(&manifests)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .unwrap();
    let public = std::fs::read_to_string(signing.with_extension("pub")).unwrap();
    let allowed = site.path("keys/allowed_signers");
    std::fs::write(&allowed, format!("offsite {public}")).unwrap();
    let mut sig = manifest.clone().into_os_string();
    sig.push(".sig");
    let checked = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-I", "offsite", "-n", "offsite-manifest", "-f"])
        .arg(&allowed)
        .arg("-s")
        .arg(&sig)
        .stdin(std::fs::File::open(&manifest).unwrap())
        .output()
        .unwrap();
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));

    // offsite verify: signatures by default (the site's key), contents with
    // the identity.
    let ran = site.verify(&[]);
    ran.expect_code(0);
    assert!(ran.stdout.contains("signature ok") && ran.stdout.contains("contents not checked"), "{}", ran.stdout);
    let ran = site.verify(&["--age-identity", identity.to_str().unwrap()]);
    ran.expect_code(0);
    assert!(ran.stdout.contains("decrypted, gzip ok, tar of 2 entries"), "{}", ran.stdout);
    // A manifest changed after signing is caught.
    let text = std::fs::read_to_string(&manifest).unwrap().replace("\"status\": \"ok\"", "\"status\": \"ok\" ");
    std::fs::write(&manifest, text).unwrap();
    site.verify(&[]).expect_code(1).expect_stderr("the signature does not verify");
}

#[test]
fn status_shows_the_last_run_the_last_good_one_a_running_one_and_the_next() {
    let site = Site::new();
    let status = |site: &Site| {
        let file = site.file();
        Ran::from_output(offsite(Path::new(BIN)).arg("status").arg(&file).output().unwrap())
    };
    // Never run: a failure for a monitoring check.
    let ran = status(&site);
    ran.expect_code(1).expect_stderr("never happened");
    assert!(ran.stdout.contains("last run:  never"), "{}", ran.stdout);
    assert!(ran.stdout.contains("next run:  not scheduled"), "{}", ran.stdout);

    site.arc("2004-03-21T01:48:44").expect_code(0);
    site.fixture("fail", "boom", &[]).expect_code(1);
    // `schedule` is a top-level key: it must come before any [section].
    let file = site.path("site.toml");
    let text = format!(
        "schedule = \"34 3,20 * * *\"\ntimezone = \"Europe/Berlin\"\nname = \"web\"\nstore = \"{}\"\n",
        site.store().display()
    );
    std::fs::write(&file, text).unwrap();
    let ran = Ran::from_output(offsite(Path::new(BIN)).arg("status").arg(site.path("")).output().unwrap());
    ran.expect_code(1).expect_stderr("for: web");
    assert!(ran.stdout.contains(" failed  (0 file(s)"), "{}", ran.stdout);
    assert!(ran.stdout.contains("failing on request: boom"), "{}", ran.stdout);
    assert!(ran.stdout.contains("last good: started 20"), "{}", ran.stdout);
    assert!(ran.stdout.contains("last run:  started 20"), "{}", ran.stdout);
    assert!(ran.stdout.contains("running:   no"), "{}", ran.stdout);
    assert!(ran.stdout.contains("(34 3,20 * * *, Europe/Berlin)"), "{}", ran.stdout);
    // The next run, shown in local time (UTC here), is 03:34 or 20:34 in
    // Berlin, within the coming 17 hours (the longest gap between the two).
    let line = ran.stdout.lines().find(|l| l.contains("next run:")).unwrap();
    let shown = line.split("next run:").nth(1).unwrap().split('(').next().unwrap().trim();
    let date = |tz: &str, fmt: &str| {
        let out = std::process::Command::new("date").env("TZ", tz).args(["-d", shown, fmt]).output().unwrap();
        assert!(out.status.success(), "date -d {shown:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let berlin = date("Europe/Berlin", "+%H:%M");
    assert!(berlin == "03:34" || berlin == "20:34", "next run {shown} is {berlin} in Berlin");
    let ahead = date("UTC", "+%s").parse::<i64>().unwrap()
        - std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((0..17 * 3600).contains(&ahead), "next run {shown} is {ahead} s away");

    let first = hold_lock(&site, "3000");
    let ran = status(&site);
    assert!(ran.stdout.contains(&format!("running:   yes, pid {}", first.id())), "{}", ran.stdout);
    first.wait_with_output().unwrap();
}

/// A directory tree deeper than the descriptors verify may open (a store
/// made before depth was bounded, or by hand): the walk holds a few
/// descriptors, not one per level, so verify still reports on it.
#[test]
fn verify_walks_a_deep_tree_with_few_descriptors() {
    let site = Site::new();
    site.arc("2004-03-21T01:48:44").expect_code(0);
    let deep = site.store().join("d/".repeat(200));
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("bottom.txt"), "deep").unwrap();
    let file = site.file();
    // 64 descriptors: far fewer than the 200 levels.
    let ran = Ran::from_output(
        Command::new("sh")
            .arg("-c")
            .arg("ulimit -n 64 && exec \"$0\" verify \"$1\"")
            .arg(BIN)
            .arg(&file)
            .env("OFFSITE_CACHE_DIR", offsite_testkit::shared_cache_dir())
            .output()
            .unwrap(),
    );
    assert!(!ran.stderr.contains("Too many open files"), "{}", ran.stderr);
    ran.expect_code(1).expect_stderr("bottom.txt: unlisted");
}

/// A run killed with -9 leaves its lock note and journal behind: status
/// says so and fails, instead of showing the previous run as the last one
/// and nothing running. A store the user cannot read fails too.
#[test]
fn status_sees_a_killed_run_and_an_unreadable_store() {
    let site = Site::new();
    site.arc("2004-03-21T01:48:44").expect_code(0);
    let mut held = hold_lock(&site, "30000");
    held.kill().unwrap();
    held.wait().unwrap();
    let file = site.file();
    let ran = Ran::from_output(offsite(Path::new(BIN)).arg("status").arg(&file).output().unwrap());
    ran.expect_code(1);
    assert!(ran.stdout.contains("was killed or crashed before it finished"), "{}", ran.stdout);
    // verify calls its journal what it is, not an unlisted file.
    let verified = Ran::from_output(offsite(Path::new(BIN)).arg("verify").arg(&file).output().unwrap());
    let said = format!("{}{}", verified.stdout, verified.stderr);
    assert!(said.contains(".journal: the journal of run "), "{said}");
    assert!(said.contains("which was interrupted (killed or crashed)"), "{said}");
    assert!(!said.contains("unlisted"), "{said}");

    // Unreadable: a store directory whose .offsite cannot be opened.
    let other = Site::new();
    std::fs::create_dir_all(other.store().join(".offsite")).unwrap();
    std::fs::write(other.store().join(".offsite/runs"), "not a directory").unwrap();
    let file = other.file();
    let ran = Ran::from_output(offsite(Path::new(BIN)).arg("status").arg(&file).output().unwrap());
    ran.expect_code(1);
    assert!(ran.stdout.contains("cannot read the store"), "{}", ran.stdout);
}

/// A dry run on a store the real run cannot write (a read-only mount)
/// fails the same way, without writing anything.
#[test]
fn a_dry_run_finds_a_store_that_cannot_be_written() {
    let site = Site::new();
    let _unmount = mount_tmpfs(&site.store(), "ro,size=1m,mode=0700");
    let real = site.arc("2004-03-21T01:48:44");
    let dry = site.run("arc", &["--param", "path=www", "--dry-run"]);
    dry.expect_code(real.code).expect_stderr("cannot be written");
    assert_eq!(dry.code, 2, "{}", dry.stderr);
}

/// The crontab line a user writes: `offsite run web` (or `--site web`),
/// the site found in the config directory and naming its own script, under
/// cron's empty environment and working directory.
#[test]
fn a_bare_site_name_runs_the_script_the_site_names_as_cron_would() {
    let site = Site::new();
    let config = site.path("etc");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(
        config.join("web.toml"),
        format!(
            "script = \"{}\"\nstore = \"{}\"\n[read]\nroots = [\"{}\"]\n[params]\npath = \"{}\"\n",
            script("arc").display(),
            site.store().display(),
            site.path("src").display(),
            site.path("src/www").display()
        ),
    )
    .unwrap();
    for args in [&["run", "web"][..], &["run", "--site", "web"][..]] {
        let ran = Ran::from_output(
            Command::new(BIN)
                .env_clear()
                .env("HOME", site.path(""))
                .env("PATH", "/usr/bin:/bin")
                .env("OFFSITE_CONFIG_DIR", &config)
                .env("OFFSITE_CACHE_DIR", offsite_testkit::shared_cache_dir())
                .current_dir("/")
                .args(args)
                .args(["--now", "2004-03-21T01:48:44"])
                .output()
                .unwrap(),
        );
        ran.expect_code(0);
        assert_eq!((ran.stdout.as_str(), ran.stderr.as_str()), ("", ""), "silent under cron");
    }
    assert_eq!(site.backups().iter().filter(|b| b.ends_with(".tgz")).count(), 1, "{:?}", site.backups());
    // A site without `script` needs one named.
    std::fs::write(config.join("bare.toml"), format!("store = \"{}\"\n", site.store().display())).unwrap();
    let ran =
        Ran::from_output(Command::new(BIN).env("OFFSITE_CONFIG_DIR", &config).args(["run", "bare"]).output().unwrap());
    ran.expect_code(2).expect_stderr("has no `script`");
}

/// A backup that shrank drastically since the last good run (a database
/// user that lost its grants still dumps, exits 0, and writes the trailer)
/// is a `warning` naming both sizes; `shrink_warning = "off"` turns it off.
#[test]
fn a_drastically_smaller_backup_is_a_warning() {
    let mut site = Site::new();
    let noise = Command::new("head").args(["-c", "200000", "/dev/urandom"]).output().unwrap().stdout;
    std::fs::write(site.path("src/www/data.bin"), noise).unwrap();
    site.arc("2004-03-21T01:48:44").expect_code(0);
    std::fs::remove_file(site.path("src/www/data.bin")).unwrap();
    let ran = site.arc("2004-03-22T01:48:44");
    ran.expect_code(0).expect_stderr("www.20040322-014844.tgz is ").expect_stderr("of www.20040321-014844.tgz");
    assert_eq!(site.manifests().last().unwrap()["status"], "warning");
    // Same size as the last good run: no warning.
    site.arc("2004-03-23T01:48:44").expect_code(0);
    assert_eq!(site.manifests().last().unwrap()["status"], "ok");
    // Off: a shrink is not reported.
    site.extra = "[report]\nshrink_warning = \"off\"\n".into();
    let noise = Command::new("head").args(["-c", "200000", "/dev/urandom"]).output().unwrap().stdout;
    std::fs::write(site.path("src/www/data.bin"), noise).unwrap();
    site.arc("2004-03-24T01:48:44").expect_code(0);
    std::fs::remove_file(site.path("src/www/data.bin")).unwrap();
    site.arc("2004-03-25T01:48:44").expect_code(0);
    assert_eq!(site.manifests().last().unwrap()["status"], "ok");
}

/// The article's flow with no site file: the archive lands in the current
/// directory beside the user's own files, and `offsite verify .` passes on
/// a good backup (the other files are not problems there) and fails on a
/// flipped byte.
#[test]
fn verify_in_the_current_directory_store_checks_backups_not_the_users_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("beoserver")).unwrap();
    std::fs::write(dir.path().join("beoserver/bookl.dat"), "ledger\n".repeat(100)).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    let offsite_here =
        |args: &[&str]| Ran::from_output(offsite(Path::new(BIN)).current_dir(dir.path()).args(args).output().unwrap());
    offsite_here(&[
        "run",
        script("arc").to_str().unwrap(),
        "--param",
        "path=beoserver",
        "--now",
        "2004-03-21T01:48:44",
    ])
    .expect_code(0);
    offsite_here(&["verify", "."]).expect_code(0);
    let archive = dir.path().join("beoserver.20040321-014844.tgz");
    let mut bytes = std::fs::read(&archive).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&archive, bytes).unwrap();
    offsite_here(&["verify", "."]).expect_code(1).expect_stderr("corrupt");
}

/// Runs belong to the store: a renamed site file keeps its history in
/// status and retention, and its first run says once that the store was
/// used under another name.
#[test]
fn a_renamed_site_keeps_its_history_in_status_and_retention() {
    let site = Site::new();
    site.arc("2004-03-21T01:48:44").expect_code(0);
    let renamed = site.path("src/renamed.toml");
    let text = std::fs::read_to_string(site.file()).unwrap().replace("name = \"web\"\n", "");
    std::fs::write(&renamed, format!("{text}[retention]\nkeep_last = 1\n")).unwrap();
    let status = || Ran::from_output(offsite(Path::new(BIN)).arg("status").arg(&renamed).output().unwrap());
    let ran = status();
    ran.expect_code(0);
    assert!(ran.stdout.contains("last good: started"), "{}", ran.stdout);
    assert!(ran.stdout.contains("including those made as site \"web\""), "{}", ran.stdout);
    let run = |now: &str| {
        Ran::from_output(
            site.offsite()
                .arg("run")
                .arg(script("arc"))
                .arg("--site")
                .arg(&renamed)
                .args(["--param", "path=www", "--now", now])
                .output()
                .unwrap(),
        )
    };
    let first = run("2004-03-22T01:48:44");
    first
        .expect_code(0)
        .expect_stderr("was used by site \"web\" (1 run(s) under that name) and now by site \"renamed\"");
    // Retention (last = 1) counted the old name's run as this site's.
    let manifests = site.manifests();
    assert_eq!(manifests.len(), 1, "{manifests:?}");
    assert_eq!(manifests[0]["site"], "renamed");
    assert!(!site.store().join("www.20040321-014844.tgz").exists());
    let second = run("2004-03-23T01:48:44");
    second.expect_code(0);
    assert_eq!(second.stderr, "", "quiet once the store is the renamed site's");
}

/// Two site files on one store by mistake take turns and warn on every
/// run; with `shared_store = true` in both, each sees only its own runs
/// and nothing is said.
#[test]
fn two_sites_on_one_store_warn_until_both_say_it_is_shared() {
    let site = Site::new();
    let web = site.file();
    let other = site.path("src/other.toml");
    let text = std::fs::read_to_string(&web).unwrap();
    std::fs::write(&other, text.replace("name = \"web\"", "name = \"other\"")).unwrap();
    let run = |file: &Path, now: &str| {
        Ran::from_output(
            site.offsite()
                .arg("run")
                .arg(script("arc"))
                .arg("--site")
                .arg(file)
                .args(["--param", "path=www", "--now", now])
                .output()
                .unwrap(),
        )
    };
    run(&web, "2004-03-21T01:00:00").expect_code(0);
    assert_eq!(run(&web, "2004-03-21T02:00:00").stderr, "");
    run(&other, "2004-03-21T03:00:00").expect_code(0).expect_stderr("was used by site \"web\"");
    run(&web, "2004-03-21T04:00:00").expect_code(0).expect_stderr("was used by site \"other\"");

    for file in [&web, &other] {
        let text = std::fs::read_to_string(file).unwrap();
        std::fs::write(file, text.replace("store = ", "shared_store = true\nstore = ")).unwrap();
    }
    assert_eq!(run(&other, "2004-03-21T05:00:00").expect_code(0).stderr, "");
    assert_eq!(run(&web, "2004-03-21T06:00:00").expect_code(0).stderr, "");
    // Each sees its own runs: other's last run failed, web's newer one did
    // not, and other's status must not borrow web's.
    std::fs::remove_dir_all(site.path("src/www")).unwrap();
    run(&other, "2004-03-21T07:00:00").expect_code(1);
    std::fs::create_dir_all(site.path("src/www")).unwrap();
    std::fs::write(site.path("src/www/index.html"), "back").unwrap();
    run(&web, "2004-03-21T08:00:00").expect_code(0);
    let status = |file: &Path| Ran::from_output(offsite(Path::new(BIN)).arg("status").arg(file).output().unwrap());
    let ran = status(&other);
    ran.expect_code(1);
    assert!(ran.stdout.contains("the store is shared; it also holds runs of site \"web\""), "{}", ran.stdout);
    status(&web).expect_code(0);
}

/// A backup file removed by hand: verify fails with `missing` until the
/// loss is recorded with `offsite forget`, which keeps the manifest aside;
/// a run whose files are all there cannot be forgotten.
#[test]
fn forget_records_a_lost_file_so_verify_passes_again() {
    let site = Site::new();
    site.arc("2004-03-21T01:48:44").expect_code(0);
    site.arc("2004-03-22T01:48:44").expect_code(0);
    let runs: Vec<String> = site.manifests().iter().map(|m| m["run_id"].as_str().unwrap().to_string()).collect();
    let file = site.file();
    let forget = |run: &str| Ran::from_output(site.offsite().arg("forget").arg(&file).arg(run).output().unwrap());
    forget(&runs[0]).expect_code(2).expect_stderr("is still there");
    std::fs::remove_file(site.store().join("www.20040321-014844.tgz")).unwrap();
    site.verify(&[]).expect_code(1).expect_stderr("missing");
    let ran = forget(&runs[0]);
    ran.expect_code(0);
    assert!(ran.stdout.contains("lost: www.20040321-014844.tgz"), "{}", ran.stdout);
    site.verify(&[]).expect_code(0);
    assert!(site.store().join(format!(".offsite/forgotten/{}.json", runs[0])).is_file());
    assert_eq!(site.manifests().len(), 1);
    forget("no-such-run").expect_code(2).expect_stderr("no manifest for run");
}

/// Two good runs that name the same file (a pinned --now, a daily name run
/// twice a day): the later file replaces the earlier, and its manifest
/// records which run's file it replaced; verify checks the newer one and
/// says so.
#[test]
fn a_file_replaced_by_a_later_run_of_the_same_name_is_recorded() {
    let site = Site::new();
    site.arc("2004-03-21T01:48:44").expect_code(0);
    std::fs::write(site.path("src/www/more.html"), "more").unwrap();
    site.arc("2004-03-21T01:48:44").expect_code(0);
    let m = site.manifests();
    assert_eq!(m[1]["files"][0]["replaces"]["run"], m[0]["run_id"]);
    assert_eq!(m[1]["files"][0]["replaces"]["sha256"], m[0]["files"][0]["sha256"]);
    let ran = site.verify(&[]);
    ran.expect_code(0);
    assert!(ran.stdout.contains("replaced the file of the same name from run"), "{}", ran.stdout);
}

/// `path = "data/www"` in [params] means the same from cron (working
/// directory `$HOME`, empty environment) as by hand beside the site file:
/// relative to the site file.
#[test]
fn relative_sources_in_a_site_file_resolve_against_the_file_not_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data/www")).unwrap();
    std::fs::write(dir.path().join("data/www/index.html"), "hi").unwrap();
    let site = dir.path().join("web.toml");
    std::fs::write(&site, "store = \"store\"\n[read]\nroots = [\"data\"]\n[params]\npath = \"data/www\"\n").unwrap();
    let ran = Ran::from_output(
        Command::new(BIN)
            .env_clear()
            .env("HOME", "/")
            .env("PATH", "/usr/bin:/bin")
            .env("OFFSITE_CACHE_DIR", offsite_testkit::shared_cache_dir())
            .current_dir("/")
            .arg("run")
            .arg(script("arc"))
            .arg("--site")
            .arg(&site)
            .args(["--now", "2004-03-21T01:48:44"])
            .output()
            .unwrap(),
    );
    ran.expect_code(0);
    let listed =
        Command::new("tar").arg("-tzf").arg(dir.path().join("store/www.20040321-014844.tgz")).output().unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains("data/www/index.html"));
}

/// Usage errors stop before anything runs or is recorded: an empty value
/// for a required parameter, and a bad time pattern for a parameter whose
/// default is one (exit 2, no store, no manifest).
#[test]
fn an_empty_required_parameter_or_a_bad_time_pattern_is_a_usage_error() {
    let site = Site::new();
    site.run("arc", &["--param", "path="]).expect_code(2).expect_stderr("missing or empty");
    site.run("arc", &["--param", "path=www", "--param", "format=%Q"])
        .expect_code(2)
        .expect_stderr("parameter format = \"%Q\"");
    assert!(!site.store().exists(), "nothing was recorded");
}

/// Every way a restore can meet bad data or a bad target: a swapped file,
/// a forged manifest (signing on), a wrong age identity, a target disk
/// that fills. Each exits non-zero with a clear error and leaves nothing
/// under a final name; a dump whose manifest does not say a database tool
/// made it is never loaded.
#[test]
fn restore_faults_fail_clearly_and_leave_nothing_under_a_final_name() {
    let mut site = Site::new();
    let (identity, _) = site.protect();
    // Big enough to fill a small file system.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let noise: Vec<u8> = (0..(256 << 10))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(site.path("src/www/noise.bin"), &noise).unwrap();
    site.arc("2004-03-21T01:48:44").expect_code(0);
    site.arc("2004-03-22T01:48:44").expect_code(0);
    let file = site.file();
    let s = file.to_str().unwrap();
    let id = identity.to_str().unwrap();
    let offsite = |args: &[&str]| Ran::from_output(site.offsite().args(args).output().unwrap());
    let (a, b) = (site.store().join("www.20040321-014844.tgz.age"), site.store().join("www.20040322-014844.tgz.age"));
    let (good_a, good_b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());

    // A glob names the one archive of a run; the site's key checks its
    // manifest; the identity decrypts.
    let to = site.path("restored");
    let t = to.to_str().unwrap();
    offsite(&["restore", s, "latest", "www.*.tgz", "--extract", "--to", t, "--age-identity", id]).expect_code(0);
    assert_eq!(std::fs::read(to.join("www/noise.bin")).unwrap(), noise);
    std::fs::remove_dir_all(&to).unwrap();
    offsite(&["restore", s, "*.tgz", "--to", t]).expect_code(0).expect_stdout("restored 1 file(s)");
    offsite(&["cat", s, "www.2004032?-*.zip"]).expect_code(2).expect_stderr("has no file www.2004032?-*.zip");
    std::fs::remove_dir_all(&to).unwrap();

    // The wrong identity: refused before a byte is written.
    let other = site.path("other");
    std::fs::create_dir(&other).unwrap();
    let (wrong, _) = offsite_testkit::age_keypair(&other);
    let ran = offsite(&["restore", s, "www.*.tgz", "--to", t, "--age-identity", wrong.to_str().unwrap()]);
    ran.expect_code(1).expect_stderr("not restored");
    assert!(!to.join("www.20040322-014844.tgz").exists() && std::fs::read_dir(&to).unwrap().count() == 0);
    let ran = offsite(&["restore", s, "www.*.tgz", "--extract", "--to", t, "--age-identity", wrong.to_str().unwrap()]);
    ran.expect_code(1).expect_stderr("age");
    assert_eq!(std::fs::read_dir(&to).unwrap().count(), 0, "nothing unpacked, no staging left");

    // A swapped object (the older run's file in the newer's place): the
    // hash gives it away and nothing appears.
    std::fs::write(&b, &good_a).unwrap();
    let ran = offsite(&["restore", s, "www.*.tgz", "--extract", "--to", t, "--age-identity", id]);
    ran.expect_code(1).expect_stderr("manifest says");
    assert_eq!(std::fs::read_dir(&to).unwrap().count(), 0);
    offsite(&["restore", s, "www.*.tgz", "--to", t, "--age-identity", id]).expect_code(1).expect_stderr("not restored");
    assert_eq!(std::fs::read_dir(&to).unwrap().count(), 0, "no temporary file left behind");

    // A forged manifest, rewritten to list the swapped file: its signature
    // no longer verifies, so nothing it lists is read.
    let manifests = site.store().join(".offsite/manifests");
    let newest = std::fs::read_dir(&manifests)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .max()
        .unwrap();
    let original = std::fs::read(&newest).unwrap();
    let m: Value = serde_json::from_slice(&original).unwrap();
    let older: Value = serde_json::from_slice(
        &std::fs::read(
            std::fs::read_dir(&manifests)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .min()
                .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let mut forged = m.clone();
    forged["files"][0]["sha256"] = older["files"][0]["sha256"].clone();
    forged["files"][0]["bytes"] = older["files"][0]["bytes"].clone();
    forged["files"][0]["plain"] = older["files"][0]["plain"].clone();
    std::fs::write(&newest, serde_json::to_vec_pretty(&forged).unwrap()).unwrap();
    let ran = offsite(&["restore", s, "www.*.tgz", "--to", t, "--age-identity", id]);
    ran.expect_code(1).expect_stderr("signature does not verify");
    assert_eq!(std::fs::read_dir(&to).unwrap().count(), 0);
    offsite(&["runs", s]).expect_code(1).expect_stdout(" BAD ").expect_stderr("do not trust them");
    std::fs::write(&newest, &original).unwrap();
    std::fs::write(&b, &good_b).unwrap();

    // A target that fills: a clear error, and neither the file nor the
    // unpacked tree is left behind.
    let small = site.path("small");
    let _unmount = mount_tmpfs(&small, "size=128k,mode=0755");
    let sm = small.to_str().unwrap();
    let ran = offsite(&["restore", s, "www.*.tgz", "--to", sm, "--age-identity", id]);
    ran.expect_code(1).expect_stderr("No space left on device");
    assert_eq!(std::fs::read_dir(&small).unwrap().count(), 0, "no partial file");
    let ran = offsite(&["restore", s, "www.*.tgz", "--extract", "--to", sm, "--age-identity", id]);
    ran.expect_code(1).expect_stderr("No space left on device").expect_stderr("nothing of it was left");
    assert_eq!(std::fs::read_dir(&small).unwrap().count(), 0, "no staging directory left");

    // An archive is no dump: nothing is loaded, and no client is needed
    // to say so.
    let ran = offsite(&["restore", s, "www.*.tgz", "--into-database", "x", "--age-identity", id]);
    ran.expect_code(1).expect_stderr("does not say mysqldump or pg_dump made it");
}

/// Owners, setuid bits, device nodes and FIFOs (an archive GNU tar made
/// as root): left to the restoring user, dropped and left out by default;
/// kept, as root, with `--same-owner` and `--preserve-special`.
#[test]
fn same_owner_and_preserve_special_keep_what_root_asks_for_and_nothing_by_default() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let site = Site::new();
    site.arc("2004-03-21T01:48:44").expect_code(0);
    let src = site.path("special");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("owned.txt"), "owned\n").unwrap();
    std::fs::write(src.join("setuid"), "#!/bin/sh\n").unwrap();
    let sh = |cmd: &str| assert!(Command::new("sh").arg("-c").arg(cmd).current_dir(&src).status().unwrap().success());
    sh("chown 1234:2345 owned.txt && chmod 4755 setuid && mkfifo pipe && mknod null c 1 3");
    let archive = site.path("special.tgz");
    sh(&format!("tar czf {} .", archive.display()));
    let name = "www.20040321-014844.tgz";
    replace_archive(&site.store(), name, &std::fs::read(&archive).unwrap());
    let s = site.store();
    let offsite = |args: &[&str]| Ran::from_output(site.offsite().arg("restore").arg(&s).args(args).output().unwrap());

    let plain = site.path("plain");
    let ran = offsite(&[name, "--extract", "--to", plain.to_str().unwrap()]);
    ran.expect_code(0)
        .expect_stdout("left out (devices, FIFOs, sparse entries): ./pipe")
        .expect_stdout("lost their setuid");
    assert!(!plain.join("null").exists() && !plain.join("pipe").exists());
    assert_eq!(std::fs::metadata(plain.join("setuid")).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(std::fs::metadata(plain.join("owned.txt")).unwrap().uid(), 0, "the restoring user's");

    let kept = site.path("kept");
    let ran = offsite(&[name, "--extract", "--same-owner", "--preserve-special", "--to", kept.to_str().unwrap()]);
    ran.expect_code(0);
    let owned = std::fs::metadata(kept.join("owned.txt")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1234, 2345));
    assert_eq!(std::fs::metadata(kept.join("setuid")).unwrap().mode() & 0o7777, 0o4755);
    assert!(std::fs::symlink_metadata(kept.join("pipe")).unwrap().file_type().is_fifo());
    let null = std::fs::symlink_metadata(kept.join("null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), std::fs::metadata("/dev/null").unwrap().rdev());
}
