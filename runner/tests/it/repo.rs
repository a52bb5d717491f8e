//! Sites whose store is a restic repository (`store = "restic:PATH"`), end
//! to end: the real runner binary, the arc and fixture scripts, and
//! Debian's `restic` reading what the runs made (`snapshots`, `check
//! --read-data`, `dump`, `restore`), and making repositories and locks of
//! its own that the runs must respect.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use offsite_testkit::{Ran, assert_same_tree, offsite, script, tempfile};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");
const PASSWORD: &str = "correct horse battery staple";

/// A site archiving `www` into a restic repository at `repo`, whose
/// password is in `pass` (mode 0600).
struct RepoSite {
    dir: tempfile::TempDir,
    file: PathBuf,
}

impl RepoSite {
    fn new(repository: &str) -> RepoSite {
        let dir = tempfile::tempdir().unwrap();
        let www = dir.path().join("www");
        std::fs::create_dir_all(www.join("img")).unwrap();
        std::fs::write(www.join("index.html"), "<html>hello</html>\n").unwrap();
        std::fs::write(www.join("img/big.bin"), noise(3 << 20, 7)).unwrap();
        write_secret(&dir.path().join("pass"), PASSWORD);
        let site = RepoSite { file: dir.path().join("web1.toml"), dir };
        site.write(repository);
        site
    }

    fn write(&self, repository: &str) {
        let www = self.dir.path().join("www");
        let text =
            format!("store = \"restic:repo\"\n[read]\nroots = [\"{}\"]\n[repository]\n{repository}\n", www.display());
        std::fs::write(&self.file, text).unwrap();
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn offsite(&self, args: &[&str]) -> Command {
        let mut cmd = offsite(Path::new(BIN));
        cmd.current_dir(self.dir.path()).env_remove("RESTIC_PASSWORD_FILE").args(args);
        cmd
    }

    /// `offsite run SCRIPT --site FILE ARGS` (arc archives `www`).
    fn run(&self, name: &str, args: &[&str]) -> Ran {
        let s = script(name);
        let path = format!("path={}", self.dir.path().join("www").display());
        let mut all = vec!["run", s.to_str().unwrap(), "--site", self.file.to_str().unwrap()];
        if name == "arc" {
            all.extend(["--param", &path]);
        }
        all.extend_from_slice(args);
        Ran::from_output(self.offsite(&all).output().unwrap())
    }

    fn command(&self, args: &[&str]) -> Ran {
        let mut all = args.to_vec();
        all.push(self.file.to_str().unwrap());
        Ran::from_output(self.offsite(&all).output().unwrap())
    }

    /// Debian's `restic` on the repository, with the site's password.
    fn restic(&self) -> Command {
        restic(&self.repo(), &self.dir.path().join("pass"))
    }

    fn restic_ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.restic().args(args).output().unwrap();
        assert!(out.status.success(), "restic {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// A run (the fixture sleeping `ms` milliseconds) holding its lock,
    /// once its lock file is there.
    fn hold_lock(&self, ms: u32) -> std::process::Child {
        let s = script("fixture");
        let child = self
            .offsite(&["run", s.to_str().unwrap(), "--site", self.file.to_str().unwrap(), "--param", "case=sleep"])
            .args(["--param", &format!("arg={ms}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let locks = self.repo().join("locks");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::read_dir(&locks).unwrap().next().is_none() {
            assert!(Instant::now() < deadline, "the run took no lock");
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    /// `offsite cat SITE RUN FILE`: a file as Offsite reads it back
    /// (an archive kept as a tree: its tar, every blob checked).
    fn cat(&self, run: &str, file: &str) -> Vec<u8> {
        let out = self.offsite(&["cat", self.file.to_str().unwrap(), run, file]).output().unwrap();
        assert!(out.status.success(), "offsite cat {run} {file}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// Where a file of `www` is in a snapshot whose archive `tar` is a
    /// tree: beneath the archive's directory, at its path in the tar.
    fn in_tree(&self, tar: &str, file: &str) -> String {
        let www = self.dir.path().join("www");
        format!("/{tar}/{}/{file}", www.strip_prefix("/").unwrap().display())
    }

    fn snapshots(&self) -> Vec<serde_json::Value> {
        serde_json::from_slice(&self.restic_ok(&["snapshots", "--json"])).unwrap()
    }
}

fn restic(repo: &Path, pass: &Path) -> Command {
    let mut cmd = Command::new("restic");
    cmd.arg("-r").arg(repo).arg("--no-cache").env("RESTIC_PASSWORD_FILE", pass).env_remove("RESTIC_PASSWORD");
    cmd
}

fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("{text}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Bytes that do not compress or repeat.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn tags(snap: &serde_json::Value) -> Vec<String> {
    snap["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() { dir_size(&entry.path()) } else { meta.len() };
    }
    total
}

#[test]
fn restic_reads_each_run_as_one_snapshot_and_gives_every_output_back_byte_for_byte() {
    let site = RepoSite::new("password_file = \"pass\"");
    // 16 MiB that do not compress, so the archive is many chunks (about
    // 1 MiB each, at most 8 MiB, boundaries set by the repository's own
    // random polynomial).
    std::fs::write(site.dir.path().join("www/img/big.bin"), noise(16 << 20, 7)).unwrap();
    assert!(!site.repo().exists());
    let ran = site.run("arc", &["--now", "2004-03-21T01:48:44Z"]);
    ran.expect_code(0);
    assert_eq!((ran.stdout.as_str(), ran.stderr.as_str()), ("", ""), "quiet on success");
    let first = dir_size(&site.repo());
    // A small change: the archive is stored as a tar, not a gzip (the
    // repository compresses), so only the chunks around the change are
    // new: far less than the archive again, which a store without
    // deduplication would add.
    std::fs::write(site.dir.path().join("www/index.html"), "<html>hello again</html>\n").unwrap();
    site.run("arc", &["--now", "2004-03-21T13:48:44Z"]).expect_code(0);
    let second = dir_size(&site.repo());
    assert!(second - first < first / 4, "the second run grew the repository from {first} to {second} bytes");

    let snaps = site.snapshots();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    let mut runs = Vec::new();
    for snap in &snaps {
        let tags = tags(snap);
        for want in ["offsite", "site=web1", "status=ok"] {
            assert!(tags.iter().any(|t| t == want), "{want} in {tags:?}");
        }
        runs.push(tags.iter().find_map(|t| t.strip_prefix("run=")).unwrap().to_string());
    }
    assert_ne!(runs[0], runs[1]);
    site.restic_ok(&["check", "--read-data"]);

    // Each snapshot holds its run's manifest. The archive is a tree, one
    // node per entry as `restic backup DIR` makes, whose root the
    // manifest records; Offsite reads it back as a tar of the size the
    // manifest says.
    let mut outputs = Vec::new();
    for (snap, run) in snaps.iter().zip(&runs) {
        let id = snap["id"].as_str().unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&site.restic_ok(&["dump", id, "/.offsite/manifest.json"])).unwrap();
        assert_eq!(manifest["run_id"].as_str(), Some(run.as_str()));
        assert_eq!(manifest["status"], "ok");
        let files = manifest["files"].as_array().unwrap();
        assert_eq!(files.len(), 1, "{manifest}");
        let path = files[0]["path"].as_str().unwrap();
        let tree = &files[0]["tree"];
        assert_eq!(tree["id"].as_str().unwrap().len(), 64, "{manifest}");
        assert_eq!(tree["entries"], 4, "www, index.html, img, img/big.bin: {manifest}");
        let bytes = site.cat(run, path);
        assert_eq!(bytes.len() as u64, files[0]["bytes"].as_u64().unwrap());
        let asked = files[0]["asked"].as_str().unwrap();
        assert_eq!(asked, path.replace(".tar", ".tgz"), "the name the script asked for");
        // restic sees a directory of that name holding the tree.
        let listed = String::from_utf8(site.restic_ok(&["ls", "--json", id])).unwrap();
        let index = format!("\"path\":\"{}\"", site.in_tree(path, "index.html"));
        assert!(listed.contains(&index), "{index} in {listed}");
        outputs.push((path.to_string(), bytes, tree.clone()));
    }
    assert_eq!(outputs[0].0, "www.20040321-014844.tar");
    assert_eq!(outputs[1].0, "www.20040321-134844.tar");
    // The second run read only the file that changed: the 16 MiB file
    // was the same (size, times, inode), and its chunks were named again.
    assert_eq!(outputs[0].2.get("unread"), None, "{:?}", outputs[0].2);
    assert_eq!(outputs[1].2["unread"], 1, "{:?}", outputs[1].2);

    // GNU tar extracts the site's tree from Offsite's tar; `restic
    // restore` gives the same tree, and one file alone with --include.
    // (The site names the source by its absolute path; tar keeps it
    // without the leading `/`.)
    let www = site.dir.path().join("www");
    let x = tempfile::tempdir().unwrap();
    let mut tar =
        Command::new("tar").arg("-xf").arg("-").arg("-C").arg(x.path()).stdin(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(tar.stdin.as_mut().unwrap(), &outputs[1].1).unwrap();
    drop(tar.stdin.take());
    assert!(tar.wait().unwrap().success());
    assert_same_tree(&www, &x.path().join(www.strip_prefix("/").unwrap()));
    let out = tempfile::tempdir().unwrap();
    site.restic_ok(&["restore", "latest", "--target", out.path().to_str().unwrap()]);
    assert_same_tree(&www, &out.path().join(&outputs[1].0).join(www.strip_prefix("/").unwrap()));
    let one = tempfile::tempdir().unwrap();
    let big = site.in_tree(&outputs[1].0, "img/big.bin");
    site.restic_ok(&["restore", "latest", "--include", &big, "--target", one.path().to_str().unwrap()]);
    let restored = std::fs::read(one.path().join(big.trim_start_matches('/'))).unwrap();
    assert_eq!(sha256(&restored), sha256(&std::fs::read(www.join("img/big.bin")).unwrap()));
    assert!(!one.path().join(&outputs[1].0).join(www.strip_prefix("/").unwrap()).join("index.html").exists());

    // Offsite cuts each file's chunks where restic does: `restic backup`
    // of the same tree adds not one data blob.
    let backup = site.restic().args(["backup", "--json"]).arg(&www).output().unwrap();
    assert!(backup.status.success(), "{}", String::from_utf8_lossy(&backup.stderr));
    let summary: serde_json::Value = String::from_utf8_lossy(&backup.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message_type"] == "summary")
        .expect("restic's summary");
    assert_eq!(summary["data_blobs"], 0, "{summary}");
    assert!(summary["total_bytes_processed"].as_u64().unwrap() >= 16 << 20, "{summary}");

    // Offsite's own commands read it too.
    let verify = site.command(&["verify"]);
    verify.expect_code(0);
    site.command(&["verify", "--read-data-subset", "1/2"]).expect_code(0);
    let status = site.command(&["status"]);
    status.expect_code(0);
    assert!(status.stdout.contains("ok"), "{}", status.stdout);
    assert!(std::fs::read_dir(site.repo().join("locks")).unwrap().next().is_none(), "a lock was left");
}

#[test]
fn a_repository_restic_made_takes_runs_and_a_wrong_or_readable_password_is_one_clear_line() {
    let site = RepoSite::new("password_file = \"pass\"");
    let init = site.restic().arg("init").output().unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    site.run("arc", &[]).expect_code(0);
    assert_eq!(site.snapshots().len(), 1);
    site.restic_ok(&["check", "--read-data"]);

    // A wrong password: one line, exit 2, nothing written.
    write_secret(&site.dir.path().join("wrong"), "not the password");
    site.write("password_file = \"wrong\"");
    let ran = site.run("arc", &[]);
    ran.expect_code(2);
    assert_eq!(ran.stderr.lines().count(), 1, "{}", ran.stderr);
    assert!(ran.stderr.contains("the password does not open the restic repository"), "{}", ran.stderr);
    assert!(!ran.stderr.contains("not the password"), "{}", ran.stderr);

    // A password file others can read is refused, like a private key.
    write_secret(&site.dir.path().join("open"), PASSWORD);
    std::fs::set_permissions(site.dir.path().join("open"), std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .unwrap();
    site.write("password_file = \"open\"");
    let ran = site.run("arc", &[]);
    ran.expect_code(2);
    assert!(ran.stderr.contains("others can read it"), "{}", ran.stderr);
    assert!(!ran.stderr.contains(PASSWORD), "{}", ran.stderr);
    // A dry run finds it too, writing nothing.
    let ran = site.run("arc", &["--dry-run"]);
    ran.expect_code(2);
    assert!(ran.stderr.contains("others can read it"), "{}", ran.stderr);

    // A password command, as restic takes it; one that fails says so.
    site.write("password_command = \"cat pass\"");
    site.run("arc", &[]).expect_code(0);
    site.write("password_command = \"echo no vault here >&2; exit 3\"");
    let ran = site.run("arc", &[]);
    ran.expect_code(2);
    assert!(ran.stderr.contains("password_command failed") && ran.stderr.contains("no vault here"), "{}", ran.stderr);

    // Nothing in the site file: RESTIC_PASSWORD_FILE, as restic reads it.
    site.write("");
    let s = script("arc");
    let path = format!("path={}", site.dir.path().join("www").display());
    let ran = Ran::from_output(
        site.offsite(&["run", s.to_str().unwrap(), "--site", site.file.to_str().unwrap(), "--param", &path])
            .env("RESTIC_PASSWORD_FILE", site.dir.path().join("pass"))
            .output()
            .unwrap(),
    );
    ran.expect_code(0);
    let ran = site.run("arc", &[]);
    ran.expect_code(2);
    assert!(ran.stderr.contains("RESTIC_PASSWORD_FILE"), "{}", ran.stderr);
    assert_eq!(site.snapshots().len(), 3, "only the three good runs made snapshots");
    site.restic_ok(&["check", "--read-data"]);
}

#[test]
fn a_failed_or_stopped_run_makes_no_snapshot_and_a_partial_one_is_tagged_partial() {
    let site = RepoSite::new("password_file = \"pass\"");
    let www = site.dir.path().join("www");
    let arg = format!("arg={}", www.display());
    site.run("fixture", &["--param", "case=tar", "--param", &arg]).expect_code(0);
    assert_eq!(site.snapshots().len(), 1);

    // Failed, storing nothing: no snapshot.
    site.run("fixture", &["--param", "case=fail"]).expect_code(1);
    assert_eq!(site.snapshots().len(), 1, "a failed run made a snapshot");

    // Stopped in the middle of an output, with data already packed: no
    // snapshot, and what it packed is data no snapshot references, which
    // restic's check accepts.
    std::fs::write(www.join("img/more.bin"), noise(64 << 20, 5)).unwrap();
    let packs = |site: &RepoSite| -> usize {
        std::fs::read_dir(site.repo().join("data"))
            .unwrap()
            .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum()
    };
    let before = packs(&site);
    let s = script("arc");
    let path = format!("path={}", www.display());
    let mut child = site
        .offsite(&["run", s.to_str().unwrap(), "--site", site.file.to_str().unwrap(), "--param", &path])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while packs(&site) < before + 2 {
        assert!(Instant::now() < deadline, "no data was packed");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(!child.wait().unwrap().success(), "a stopped run succeeded");
    assert_eq!(site.snapshots().len(), 1, "a stopped run made a snapshot");
    site.restic_ok(&["check", "--read-data"]);
    std::fs::remove_file(www.join("img/more.bin")).unwrap();

    // The script failed after complete archives: a partial run. In a
    // repository nothing is replaced, so its snapshot holds them all,
    // tagged `status=partial`, each whole.
    let ran = site.run("fixture", &["--param", "case=tar-twice-then-fail", "--param", &arg]);
    ran.expect_code(1);
    let snaps = site.snapshots();
    assert_eq!(snaps.len(), 2);
    let partial = snaps.iter().find(|s| tags(s).iter().any(|t| t == "status=partial")).expect("a partial snapshot");
    let id = partial["id"].as_str().unwrap();
    let listing = String::from_utf8(site.restic_ok(&["ls", id])).unwrap();
    assert!(listing.contains("/fixture.tar") && listing.contains("/second.tar"), "{listing}");
    let tar = site.restic_ok(&["dump", id, "/second.tar"]);
    let mut test = Command::new("tar").arg("-tf").arg("-").stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    std::io::Write::write_all(test.stdin.as_mut().unwrap(), &tar).unwrap();
    assert!(test.wait().unwrap().success());
    // Offsite's status says the last run was partial; its last good run
    // is the first.
    let status = site.command(&["status"]);
    assert!(status.stdout.contains("partial"), "{}", status.stdout);
    site.restic_ok(&["check", "--read-data"]);
}

/// An archive into a repository is kept as a tree (one node per entry),
/// yet `offsite cat` gives back the very tar a directory store keeps
/// (gunzipped), byte for byte, entries a tar header must get right
/// included. A second run reads only the files that changed: one whose
/// bytes changed behind an unchanged size and modification time is read
/// (its change time moved). A pack that rots is an error of every read.
#[test]
fn an_archive_kept_as_a_tree_reads_back_as_the_tar_a_directory_store_keeps() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let site = RepoSite::new("password_file = \"pass\"");
    let dir = site.dir.path();
    let www = dir.join("www");
    let deep = www.join("d".repeat(60)).join("e".repeat(60));
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("a name past the hundred bytes of a tar header.txt"), "deep\n").unwrap();
    std::os::unix::fs::symlink("t".repeat(150), www.join("long-link")).unwrap();
    std::fs::write(www.join("empty"), "").unwrap();
    std::fs::create_dir(www.join("empty-dir")).unwrap();
    std::fs::write(www.join("two-blocks"), [1u8; 1024]).unwrap();
    std::fs::write(www.join(std::ffi::OsStr::from_bytes(b"caf\xe9 latin-1")), "not UTF-8\n").unwrap();
    std::fs::set_permissions(www.join("index.html"), std::fs::Permissions::from_mode(0o4750)).unwrap();
    assert!(Command::new("mkfifo").arg(www.join("pipe")).status().unwrap().success());
    std::fs::create_dir(dir.join("backups")).unwrap();
    let plain = dir.join("plain.toml");
    std::fs::write(&plain, format!("store = \"backups\"\n[read]\nroots = [\"{}\"]\n", www.display())).unwrap();
    let plain_run = |now: &str| {
        let s = script("arc");
        let path = format!("path={}", www.display());
        let args = ["run", s.to_str().unwrap(), "--site", plain.to_str().unwrap(), "--param", &path, "--now", now];
        Ran::from_output(site.offsite(&args).output().unwrap()).expect_code(0);
    };
    let manifest = |id: &str| -> serde_json::Value {
        serde_json::from_slice(&site.restic_ok(&["dump", id, "/.offsite/manifest.json"])).unwrap()
    };

    let mut trees = Vec::new();
    for (now, name) in
        [("2004-03-21T01:48:44Z", "www.20040321-014844"), ("2004-03-21T13:48:44Z", "www.20040321-134844")]
    {
        if trees.len() == 1 {
            // Other bytes, the same size and modification time.
            let big = www.join("img/big.bin");
            let before = std::fs::metadata(&big).unwrap().modified().unwrap();
            std::fs::write(&big, noise(3 << 20, 8)).unwrap();
            std::fs::File::options().write(true).open(&big).unwrap().set_modified(before).unwrap();
            std::fs::write(www.join("new.txt"), "new\n").unwrap();
        }
        site.run("arc", &["--now", now]).expect_code(0);
        plain_run(now);
        let snap = site.snapshots().last().unwrap()["id"].as_str().unwrap().to_string();
        let m = manifest(&snap);
        let file = &m["files"][0];
        assert_eq!(file["path"], format!("{name}.tar"));
        let tar = site.cat(m["run_id"].as_str().unwrap(), &format!("{name}.tar"));
        let expected = offsite_testkit::gunzip(&dir.join(format!("backups/{name}.tgz")));
        assert_eq!(tar.len(), expected.len(), "{name}: the tar's length");
        assert!(tar == expected, "{name}: the tar read back is not the one a directory store keeps");
        assert_eq!(file["bytes"].as_u64().unwrap(), tar.len() as u64);
        trees.push(file["tree"].clone());
    }
    // Six regular files in the first run, all read; in the second, the
    // six that were there before, but the one whose bytes changed.
    assert_eq!(trees[0].get("unread"), None, "{:?}", trees[0]);
    assert_eq!(trees[1]["unread"], 5, "{:?}", trees[1]);
    site.restic_ok(&["check", "--read-data"]);
    let verify = site.command(&["verify", "-v"]);
    verify.expect_code(0);
    let said = format!("{}{}", verify.stdout, verify.stderr);
    assert!(said.contains("as a tree of 14 entries") && said.contains("matches its hash"), "{said}");

    // The packs of img/big.bin's chunks (the only ones of over a MiB)
    // rotted by a byte: reading the archive back fails, with one clear
    // line, and verify says so.
    let m = manifest(site.snapshots().last().unwrap()["id"].as_str().unwrap());
    let mut rotted = 0;
    for d in std::fs::read_dir(site.repo().join("data")).unwrap() {
        for pack in std::fs::read_dir(d.unwrap().path()).unwrap() {
            let pack = pack.unwrap().path();
            let mut bytes = std::fs::read(&pack).unwrap();
            if bytes.len() > 1 << 20 {
                bytes[40] ^= 1;
                std::fs::write(&pack, bytes).unwrap();
                rotted += 1;
            }
        }
    }
    assert!(rotted >= 2, "{rotted} packs");
    let cat = site
        .offsite(&["cat", site.file.to_str().unwrap(), m["run_id"].as_str().unwrap(), "www.20040321-134844.tar"])
        .output()
        .unwrap();
    let ran = Ran::from_output(cat);
    assert_ne!(ran.code, 0, "a rotted archive was read back");
    assert_ne!(ran.code, 101, "{}", ran.stderr);
    assert!(ran.stderr.lines().count() < 4, "{}", ran.stderr);
    assert_ne!(site.command(&["verify"]).code, 0, "verify passed rotted packs");
}

/// Runs and restic's own commands never work on one repository at once:
/// a `restic prune` is refused while a run holds its lock, and a run is
/// refused while restic holds an exclusive lock (a check here), naming it.
#[test]
fn a_run_and_restics_exclusive_commands_take_turns_through_restics_locks() {
    let site = RepoSite::new("password_file = \"pass\"");
    site.run("arc", &[]).expect_code(0);

    // A run holds a lock for as long as it runs.
    let mut child = site.hold_lock(4000);
    let locks = site.repo().join("locks");
    let prune = site.restic().arg("prune").output().unwrap();
    assert!(!prune.status.success(), "restic pruned beside a run");
    assert!(String::from_utf8_lossy(&prune.stderr).contains("locked"), "{}", String::from_utf8_lossy(&prune.stderr));
    // A second run of the same site waits its turn, as with every store.
    let second = site.run("fixture", &["--param", "case=ok"]);
    second.expect_code(4);
    assert!(child.wait().unwrap().success());
    assert!(std::fs::read_dir(&locks).unwrap().next().is_none(), "the run left its lock");

    // restic holds an exclusive lock (a check, stopped while it holds
    // it): the run is refused, naming restic, and writes nothing.
    std::fs::write(site.dir.path().join("www/img/more.bin"), noise(48 << 20, 3)).unwrap();
    site.run("arc", &[]).expect_code(0);
    let before = site.snapshots().len();
    let mut caught = false;
    for _ in 0..10 {
        let mut check = site.restic().args(["check", "--read-data"]).stdout(Stdio::null()).spawn().unwrap();
        // A lock file under its name (restic may write it in place, or
        // under a temporary name first).
        let held = || {
            std::fs::read_dir(&locks).unwrap().any(|e| {
                let e = e.unwrap();
                e.file_name().len() == 64 && e.metadata().unwrap().len() > 0
            })
        };
        while check.try_wait().unwrap().is_none() && !held() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let pid = check.id().to_string();
        let stopped = Command::new("kill").args(["-STOP", &pid]).status().unwrap().success() && held();
        if stopped {
            let ran = site.run("arc", &[]);
            Command::new("kill").args(["-CONT", &pid]).status().unwrap();
            assert!(check.wait().unwrap().success());
            ran.expect_code(4);
            assert!(ran.stderr.contains("restic") && ran.stderr.contains("exclusive lock"), "{}", ran.stderr);
            caught = true;
            break;
        }
        let _ = Command::new("kill").args(["-CONT", &pid]).status();
        let _ = check.wait();
    }
    assert!(caught, "restic's check never held its lock long enough to be caught");
    assert_eq!(site.snapshots().len(), before, "a run wrote beside restic's exclusive lock");
}

/// `[retention]` forgets the snapshots of the runs it prunes and removes
/// the data only they referenced (under restic's exclusive lock), after a
/// good run and with `offsite prune`; what stays reads back whole.
#[test]
fn retention_forgets_old_runs_and_prune_frees_their_data() {
    let site = RepoSite::new("password_file = \"pass\"\n[retention]\nkeep_last = 2");
    let big = site.dir.path().join("www/img/big.bin");
    let mut sizes = Vec::new();
    for i in 0..4u64 {
        // Each run's archive is new data: 3 MiB that no other run has.
        std::fs::write(&big, noise(3 << 20, 100 + i)).unwrap();
        let ran = site.run("arc", &["--now", &format!("2004-03-2{}T01:48:44Z", i + 1)]);
        ran.expect_code(0);
        sizes.push(dir_size(&site.repo()));
    }
    let snaps = site.snapshots();
    assert_eq!(snaps.len(), 2, "keep_last = 2: {snaps:?}");
    // Two runs' data (about 6 MiB), not four.
    let last = *sizes.last().unwrap();
    assert!(last < 9 << 20, "the repository holds {last} bytes after pruning: {sizes:?}");
    site.restic_ok(&["check", "--read-data"]);
    for snap in &snaps {
        let id = snap["id"].as_str().unwrap();
        let listing = String::from_utf8(site.restic_ok(&["ls", id])).unwrap();
        let tar = listing.lines().find(|l| l.ends_with(".tar")).unwrap().to_string();
        let bytes = site.restic_ok(&["dump", id, &tar]);
        assert!(bytes.len() > 3 << 20, "{tar}: {} bytes", bytes.len());
    }
    assert!(std::fs::read_dir(site.repo().join("locks")).unwrap().next().is_none(), "a lock was left");

    // `offsite prune` with a stricter rule, by hand: the newest good run
    // stays, whatever the rule.
    site.write("password_file = \"pass\"\n[retention]\nkeep_daily = 1");
    let pruned = site.command(&["prune"]);
    pruned.expect_code(0);
    assert_eq!(site.snapshots().len(), 1, "{}", pruned.stdout);
    site.restic_ok(&["check", "--read-data"]);
}

/// The same repository in a bucket (`restic:s3://BUCKET/PREFIX`) on a
/// real S3 server (SeaweedFS): restic reads it with its own S3 backend.
#[test]
fn a_repository_in_a_bucket_is_one_restic_reads_from_the_bucket() {
    use offsite_testkit::seaweed::{ACCESS_KEY, S3Space, SECRET_KEY};
    let server = S3Space::shared();
    server.create_bucket("repos");
    let url = server.url("s3://repos/web1");
    let site = RepoSite::new("password_file = \"pass\"");
    let text = std::fs::read_to_string(&site.file).unwrap().replace("restic:repo", &format!("restic:{url}"));
    std::fs::write(&site.file, format!("{text}[s3]\nendpoint = \"{}\"\npath_style = true\n", server.endpoint()))
        .unwrap();
    let run = || {
        let s = script("arc");
        let path = format!("path={}", site.dir.path().join("www").display());
        Ran::from_output(
            site.offsite(&["run", s.to_str().unwrap(), "--site", site.file.to_str().unwrap(), "--param", &path])
                .env("HOME", site.dir.path())
                .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
                .env_remove("AWS_PROFILE")
                .output()
                .unwrap(),
        )
    };
    let ran = run();
    ran.expect_code(0);
    assert_eq!((ran.stdout.as_str(), ran.stderr.as_str()), ("", ""), "quiet on success");
    run().expect_code(0);

    let restic = |args: &[&str]| {
        let bucket_url = url.strip_prefix("s3://").unwrap();
        let out = Command::new("restic")
            .arg("-r")
            .arg(format!("s3:{}/{bucket_url}", server.endpoint()))
            .arg("--no-cache")
            .args(args)
            .env("RESTIC_PASSWORD_FILE", site.dir.path().join("pass"))
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .output()
            .unwrap();
        assert!(out.status.success(), "restic {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let snaps: Vec<serde_json::Value> = serde_json::from_slice(&restic(&["snapshots", "--json"])).unwrap();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    restic(&["check", "--read-data"]);
    let id = snaps[1]["id"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&restic(&["dump", id, "/.offsite/manifest.json"])).unwrap();
    let file = &manifest["files"][0];
    let big = site.in_tree(file["path"].as_str().unwrap(), "img/big.bin");
    let bytes = restic(&["dump", id, &big]);
    assert_eq!(sha256(&bytes), sha256(&std::fs::read(site.dir.path().join("www/img/big.bin")).unwrap()));
    assert!(
        !std::fs::read_dir(site.dir.path()).unwrap().any(|e| e.unwrap().file_name() == "repo"),
        "nothing was written locally"
    );
}

/// The repository is data: a pack cut short, an index or a snapshot file
/// that is not what it claims, each gives a clear error (never a crash, a
/// panic's exit 101) and never a good-looking result.
#[test]
fn a_repository_that_lies_is_an_error_never_a_crash() {
    let fresh = || {
        let site = RepoSite::new("password_file = \"pass\"");
        site.run("arc", &[]).expect_code(0);
        site
    };
    let files = |site: &RepoSite, dir: &str| -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(site.repo().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else {
                out.push(p);
            }
        }
        out.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
        out
    };
    let no_crash = |ran: &Ran, what: &str| {
        assert_ne!(ran.code, 101, "{what}: a panic\n{}", ran.stderr);
        assert!(!ran.stderr.contains("panicked"), "{what}: {}", ran.stderr);
        // One line per error, not rustic's page with a backtrace.
        assert!(!ran.stderr.contains("Backtrace") && ran.stderr.lines().count() < 6, "{what}: {}", ran.stderr);
    };

    // The largest data pack cut in half: verify finds the output it held
    // broken, and says so.
    let site = fresh();
    let pack = files(&site, "data").pop().unwrap();
    let len = std::fs::metadata(&pack).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&pack).unwrap().set_len(len / 2).unwrap();
    let ran = site.command(&["verify"]);
    no_crash(&ran, "truncated pack");
    assert_ne!(ran.code, 0, "verify passed a truncated pack: {}", ran.stdout);

    // Every index file replaced by garbage: a run fails with an error,
    // and no snapshot is made.
    let site = fresh();
    for index in files(&site, "index") {
        std::fs::write(&index, noise(4096, 9)).unwrap();
    }
    let ran = site.run("arc", &[]);
    no_crash(&ran, "garbage index");
    assert_ne!(ran.code, 0, "a run over a garbage index succeeded");
    let ran = site.command(&["status"]);
    no_crash(&ran, "status over a garbage index");

    // A snapshot file replaced by garbage: status and verify say so.
    let site = fresh();
    for snap in files(&site, "snapshots") {
        std::fs::write(&snap, noise(600, 11)).unwrap();
    }
    let ran = site.command(&["status"]);
    no_crash(&ran, "garbage snapshot");
    assert_ne!(ran.code, 0, "status over a garbage snapshot: {}", ran.stdout);
    let ran = site.command(&["verify"]);
    no_crash(&ran, "verify over a garbage snapshot");
    assert_ne!(ran.code, 0);
}

/// `[protect] signing_key`: each snapshot holds the manifest's SSHSIG
/// signature beside it, which `offsite verify` and `ssh-keygen -Y verify`
/// both accept.
#[test]
fn a_signed_site_keeps_each_manifests_signature_in_its_snapshot() {
    let site = RepoSite::new("password_file = \"pass\"");
    let (key, _) = offsite_testkit::ssh_keypair(site.dir.path(), "sign");
    let text = std::fs::read_to_string(&site.file).unwrap();
    std::fs::write(&site.file, format!("{text}[protect]\nsigning_key = \"{}\"\n", key.display())).unwrap();
    site.run("arc", &[]).expect_code(0);
    let id = site.snapshots()[0]["id"].as_str().unwrap().to_string();
    let manifest = site.restic_ok(&["dump", &id, "/.offsite/manifest.json"]);
    let sig = site.restic_ok(&["dump", &id, "/.offsite/manifest.json.sig"]);
    let verify = site.command(&["verify", "-v"]);
    verify.expect_code(0);
    assert!(
        verify.stdout.contains("signature ok") || verify.stderr.contains("signature ok"),
        "{}\n{}",
        verify.stdout,
        verify.stderr
    );

    // OpenSSH's own check of the same bytes.
    let pubkey = std::fs::read_to_string(format!("{}.pub", key.display())).unwrap();
    let signers = site.dir.path().join("allowed_signers");
    std::fs::write(&signers, format!("offsite {pubkey}")).unwrap();
    let sig_file = site.dir.path().join("manifest.sig");
    std::fs::write(&sig_file, &sig).unwrap();
    let mut check = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-n", "offsite-manifest", "-I", "offsite", "-f"])
        .arg(&signers)
        .arg("-s")
        .arg(&sig_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), &manifest).unwrap();
    drop(check.stdin.take());
    assert!(check.wait().unwrap().success(), "ssh-keygen -Y verify refused the snapshot's signature");
}

/// A site that signs its manifests takes files unread only from runs it
/// signed: a run before it signed (or one someone else put into the
/// repository) never gets its chunks named in a manifest this key signs.
#[test]
fn a_signing_site_takes_files_unread_only_from_runs_it_signed() {
    let site = RepoSite::new("password_file = \"pass\"");
    site.run("arc", &["--now", "2004-03-20T01:48:44Z"]).expect_code(0);
    let (key, _) = offsite_testkit::ssh_keypair(site.dir.path(), "sign");
    let text = std::fs::read_to_string(&site.file).unwrap();
    std::fs::write(&site.file, format!("{text}[protect]\nsigning_key = \"{}\"\n", key.display())).unwrap();
    let unread = |site: &RepoSite| {
        let m: serde_json::Value =
            serde_json::from_slice(&site.restic_ok(&["dump", "latest", "/.offsite/manifest.json"])).unwrap();
        m["files"][0]["tree"]["unread"].as_u64().unwrap_or(0)
    };
    site.run("arc", &["--now", "2004-03-20T13:48:44Z"]).expect_code(0);
    assert_eq!(unread(&site), 0, "a signed run took files unread from an unsigned one");
    site.run("arc", &["--now", "2004-03-21T01:48:44Z"]).expect_code(0);
    assert_eq!(unread(&site), 2, "index.html and img/big.bin, unchanged since the signed run");
    site.restic_ok(&["check", "--read-data"]);
}

/// A disk that fills in the middle of a run: the run fails with the
/// system's own words, makes no snapshot, and the last good snapshot stays
/// whole; once there is room, restic's check accepts the repository and
/// the next run goes ahead.
#[test]
fn a_full_disk_fails_the_run_and_keeps_the_last_good_snapshot() {
    let site = RepoSite::new("password_file = \"pass\"");
    let repo = site.repo();
    let _unmount = crate::integrity::mount_tmpfs(&repo, "size=8m,mode=0700");
    site.run("arc", &[]).expect_code(0);
    let snaps = site.snapshots();
    assert_eq!(snaps.len(), 1);
    let manifest: serde_json::Value =
        serde_json::from_slice(&site.restic_ok(&["dump", "latest", "/.offsite/manifest.json"])).unwrap();
    let (run, path) = (manifest["run_id"].as_str().unwrap(), manifest["files"][0]["path"].as_str().unwrap());
    let tar = site.cat(run, path);

    std::fs::write(site.dir.path().join("www/img/more.bin"), noise(12 << 20, 9)).unwrap();
    let ran = site.run("arc", &["--now", "2004-03-21T13:48:44Z"]);
    ran.expect_code(1);
    assert!(ran.stderr.contains("No space left on device"), "{}", ran.stderr);
    assert_eq!(ran.stderr.lines().count(), 1, "one clear line: {}", ran.stderr);

    let grown = Command::new("mount").args(["-o", "remount,size=64m"]).arg(&repo).status().unwrap();
    assert!(grown.success());
    assert_eq!(site.snapshots().len(), 1, "the failed run made a snapshot");
    assert_eq!(site.snapshots()[0]["id"], snaps[0]["id"]);
    assert!(site.cat(run, path) == tar, "the good snapshot changed");
    site.restic_ok(&["check", "--read-data"]);
    site.run("arc", &["--now", "2004-03-21T13:48:44Z"]).expect_code(0);
    assert_eq!(site.snapshots().len(), 2);
    site.restic_ok(&["check", "--read-data"]);
}

/// `offsite check`: without `--connect` nothing is opened or created; with
/// it the password is tried on the repository, and the report says what
/// the repository holds and who holds its lock.
#[test]
fn check_connect_opens_the_repository_and_says_who_holds_its_lock() {
    let site = RepoSite::new("password_file = \"pass\"");
    for args in [&["check"][..], &["check", "--connect"]] {
        let ran = site.command(args);
        ran.expect_code(0);
        assert!(ran.stdout.contains("the first run creates"), "{args:?}: {}", ran.stdout);
        assert!(!site.repo().exists(), "{args:?} created the repository");
    }
    site.run("arc", &[]).expect_code(0);
    let ran = site.command(&["check", "--connect"]);
    ran.expect_code(0);
    assert!(
        ran.stdout.contains("connected: the password opens it; 1 snapshot(s), 1 of them this site's runs"),
        "{}",
        ran.stdout
    );
    assert!(ran.stdout.contains("(ok)") && ran.stdout.contains("not locked"), "{}", ran.stdout);
    assert!(!ran.stdout.contains(PASSWORD), "{}", ran.stdout);

    // A run in progress holds the lock.
    let mut child = site.hold_lock(3000);
    let ran = site.command(&["check", "--connect"]);
    assert!(child.wait().unwrap().success());
    ran.expect_code(0);
    assert!(ran.stdout.contains("locked: offsite run "), "{}", ran.stdout);
    assert!(ran.stdout.contains(&format!(" of site web1 (pid {} on ", child.id())), "{}", ran.stdout);

    // A wrong password: a problem, with the same line a run gives.
    write_secret(&site.dir.path().join("wrong"), "not the password");
    site.write("password_file = \"wrong\"");
    let ran = site.command(&["check", "--connect"]);
    assert_ne!(ran.code, 0);
    assert!(
        ran.stderr.contains("the password does not open the restic repository")
            || ran.stdout.contains("the password does not open the restic repository"),
        "{} {}",
        ran.stdout,
        ran.stderr
    );
    // Without --connect the password is not tried.
    site.command(&["check"]).expect_code(0);
}

/// `[[copy]]` into a repository and out of one. A directory store's runs
/// are copied into a repository (a snapshot per run, with the run's id,
/// the bytes restic gives back the same), and a repository store's runs
/// into a directory; verify checks the copies too.
#[test]
fn runs_are_copied_into_a_repository_and_out_of_one() {
    let site = RepoSite::new("password_file = \"pass\"");
    let dir = site.dir.path();
    std::fs::create_dir(dir.join("copyrepo")).unwrap();
    let www = dir.join("www");
    std::fs::write(
        &site.file,
        format!(
            "store = \"backups\"\n[read]\nroots = [\"{}\"]\n[[copy]]\nstore = \"restic:copyrepo\"\n\
             [copy.repository]\npassword_file = \"pass\"\n",
            www.display()
        ),
    )
    .unwrap();
    // A text file that gzip shrinks, a line of which changes between the
    // runs: each run's .tgz is new bytes after that line, its tar is not.
    let rows = |changed: &str| -> String {
        (0..60_000)
            .map(|i| if i == 30_000 { format!("{changed}\n") } else { format!("row {i} value {}\n", i * 7) })
            .collect()
    };
    let mut grew = Vec::new();
    for (now, row) in [("2004-03-21T01:48:44Z", "first"), ("2004-03-21T13:48:44Z", "second")] {
        std::fs::write(www.join("rows.txt"), rows(row)).unwrap();
        let before = dir_size(&dir.join("copyrepo"));
        let ran = site.run("arc", &["--now", now]);
        ran.expect_code(0);
        assert_eq!((ran.stdout.as_str(), ran.stderr.as_str()), ("", ""), "quiet on success");
        grew.push(dir_size(&dir.join("copyrepo")) - before);
    }
    let copy = |args: &[&str]| {
        let out = restic(&dir.join("copyrepo"), &dir.join("pass")).args(args).output().unwrap();
        assert!(out.status.success(), "restic {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let snaps: Vec<serde_json::Value> = serde_json::from_slice(&copy(&["snapshots", "--json"])).unwrap();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(dir.join("backups/.offsite/manifests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    manifests.sort();
    assert_eq!(manifests.len(), 2);
    for (snap, manifest) in snaps.iter().zip(&manifests) {
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
        let run = m["run_id"].as_str().unwrap();
        assert!(tags(snap).contains(&format!("run={run}")), "{snap} {run}");
        // The .tgz went in as its tar, under the name without `.gz`;
        // the copy's manifest names what was asked for.
        let path = m["files"][0]["path"].as_str().unwrap();
        let tar = path.strip_suffix(".tgz").map(|stem| format!("{stem}.tar")).unwrap();
        let copied = copy(&["dump", snap["id"].as_str().unwrap(), &format!("/{tar}")]);
        assert_eq!(copied, offsite_testkit::gunzip(&dir.join("backups").join(path)), "{path}");
        let there = copy(&["dump", snap["id"].as_str().unwrap(), "/.offsite/manifest.json"]);
        let there: serde_json::Value = serde_json::from_slice(&there).unwrap();
        assert_eq!(
            (there["files"][0]["path"].as_str(), there["files"][0]["asked"].as_str()),
            (Some(&*tar), Some(path))
        );
        assert_eq!(there["files"][0]["sha256"].as_str().unwrap(), sha256(&copied));
    }
    // The second copy stored the chunks around the changed line, not the
    // rest of the tar, nor a second gzip stream.
    let tgz = std::fs::metadata(dir.join("backups").join(manifests_path(&manifests[1]))).unwrap().len();
    assert!(grew[1] * 4 < tgz, "the second copy added {} bytes for a .tgz of {tgz} ({grew:?})", grew[1]);
    copy(&["check", "--read-data"]);
    site.command(&["verify"]).expect_code(0);

    // The other way: a repository store, copied into a directory.
    std::fs::create_dir(dir.join("copydir")).unwrap();
    site.write("password_file = \"pass\"\n[[copy]]\nstore = \"copydir\"");
    site.run("arc", &["--now", "2004-03-22T01:48:44Z"]).expect_code(0);
    let run: serde_json::Value =
        serde_json::from_slice(&site.restic_ok(&["dump", "latest", "/.offsite/manifest.json"])).unwrap();
    let stored = site.cat(run["run_id"].as_str().unwrap(), "www.20040322-014844.tar");
    assert_eq!(std::fs::read(dir.join("copydir/www.20040322-014844.tar")).unwrap(), stored);
    let verify = site.command(&["verify"]);
    verify.expect_code(0);
}

/// A .tgz that rotted in the first store, still starting as gzip does, is
/// not copied into a repository as good: it does not decompress, so it is
/// copied as it is, its hash is judged against its manifest, and the run
/// is left out with a warning that says so; the next good run is copied.
#[test]
fn a_rotted_gzip_file_is_judged_by_its_hash_not_copied_into_a_repository() {
    let site = RepoSite::new("password_file = \"pass\"");
    let dir = site.dir.path();
    std::fs::write(
        &site.file,
        format!(
            "store = \"backups\"\n[read]\nroots = [\"{}\"]\n[[copy]]\nstore = \"restic:copyrepo\"\n\
             [copy.repository]\npassword_file = \"pass\"\n",
            dir.join("www").display()
        ),
    )
    .unwrap();
    // The copy's directory is not there yet: run 1 is not copied.
    let first = site.run("arc", &["--now", "2004-03-21T01:48:44Z"]);
    first.expect_code(0);
    assert!(first.stderr.contains("copy"), "{}", first.stderr);
    let tgz = dir.join("backups/www.20040321-014844.tgz");
    let mut bytes = std::fs::read(&tgz).unwrap();
    let at = bytes.len() / 2;
    bytes[at..].fill(0x55);
    std::fs::write(&tgz, &bytes).unwrap();
    std::fs::create_dir(dir.join("copyrepo")).unwrap();
    let second = site.run("arc", &["--now", "2004-03-21T13:48:44Z"]);
    second.expect_code(0);
    assert!(
        second.stderr.contains("left out run") && second.stderr.contains("but its manifest says"),
        "{}",
        second.stderr
    );
    let snaps: Vec<serde_json::Value> = serde_json::from_slice(
        &restic(&dir.join("copyrepo"), &dir.join("pass")).args(["snapshots", "--json"]).output().unwrap().stdout,
    )
    .unwrap();
    assert_eq!(snaps.len(), 1, "only the second run is in the copy: {snaps:?}");
}

/// The path of the first file a manifest (a file in a directory store) names.
fn manifests_path(manifest: &Path) -> String {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    m["files"][0]["path"].as_str().unwrap().to_string()
}

/// The bucket stops answering in the middle of a run into a repository in
/// it: the run fails within its call timeout, makes no snapshot, and once
/// the server is back the last good snapshot is whole, restic's check
/// accepts the repository, and the next run goes ahead.
#[test]
fn a_bucket_that_stops_answering_mid_run_leaves_the_last_good_snapshot() {
    use offsite_testkit::seaweed::{ACCESS_KEY, S3Space, SECRET_KEY};
    // It stops the server: one of its own.
    let mut server = S3Space::own();
    server.create_bucket("repos");
    let url = server.url("s3://repos/web1");
    let site = RepoSite::new("password_file = \"pass\"");
    let text = std::fs::read_to_string(&site.file).unwrap().replace("restic:repo", &format!("restic:{url}"));
    std::fs::write(
        &site.file,
        format!(
            "{text}[s3]\nendpoint = \"{}\"\npath_style = true\n[limits]\ncall_timeout = \"15s\"\n",
            server.endpoint()
        ),
    )
    .unwrap();
    let s = script("arc");
    let path = format!("path={}", site.dir.path().join("www").display());
    let run = || {
        let mut cmd =
            site.offsite(&["run", s.to_str().unwrap(), "--site", site.file.to_str().unwrap(), "--param", &path]);
        cmd.env("HOME", site.dir.path())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env_remove("AWS_PROFILE");
        cmd
    };
    let restic_at = |endpoint: String| {
        let bucket_url = url.strip_prefix("s3://").unwrap().to_string();
        let pass = site.dir.path().join("pass");
        move |args: &[&str]| {
            Command::new("restic")
                .arg("-r")
                .arg(format!("s3:{endpoint}/{bucket_url}"))
                .arg("--no-cache")
                .args(args)
                .env("RESTIC_PASSWORD_FILE", &pass)
                .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
                .output()
                .unwrap()
        }
    };
    let restic = restic_at(server.endpoint());
    let ok = |args: &[&str]| {
        let out = restic(args);
        assert!(out.status.success(), "restic {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    Ran::from_output(run().output().unwrap()).expect_code(0);
    let manifest: serde_json::Value =
        serde_json::from_slice(&ok(&["dump", "latest", "/.offsite/manifest.json"])).unwrap();
    let big = site.in_tree(manifest["files"][0]["path"].as_str().unwrap(), "img/big.bin");
    let packs = || String::from_utf8_lossy(&ok(&["list", "packs", "--no-lock"])).lines().count();
    let before = packs();

    std::fs::write(site.dir.path().join("www/img/more.bin"), noise(96 << 20, 11)).unwrap();
    let child = run().stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // At the first new pack, the run is paused while the server stops, so
    // that it cannot finish first (waiting for three packs and stopping
    // the server beside the running run lost that race on a quiet machine).
    let deadline = Instant::now() + Duration::from_secs(60);
    while packs() < before + 1 {
        assert!(Instant::now() < deadline, "no data reached the bucket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let signal = |sig: &str| {
        assert!(Command::new("kill").arg(sig).arg(child.id().to_string()).status().unwrap().success(), "kill {sig}");
    };
    signal("-STOP");
    server.stop();
    signal("-CONT");
    let started = Instant::now();
    let ran = Ran::from_output(child.wait_with_output().unwrap());
    ran.expect_code(1);
    assert!(started.elapsed() < Duration::from_secs(60), "the run hung for {:?}", started.elapsed());
    assert_eq!(ran.stderr.lines().count(), 1, "one clear line: {}", ran.stderr);

    server.restart();
    // (Its volumes take a moment to be served again.)
    let deadline = Instant::now() + Duration::from_secs(60);
    while !restic(&["snapshots", "--json", "--no-lock"]).status.success() {
        assert!(Instant::now() < deadline, "the server did not come back");
        std::thread::sleep(Duration::from_millis(500));
    }
    let snaps: Vec<serde_json::Value> = serde_json::from_slice(&ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(snaps.len(), 1, "the failed run made a snapshot");
    let bytes = ok(&["dump", snaps[0]["id"].as_str().unwrap(), &big]);
    assert_eq!(sha256(&bytes), sha256(&std::fs::read(site.dir.path().join("www/img/big.bin")).unwrap()));
    // The failed run could not remove its lock. It is stale (its process
    // is gone): the next run removes it, saying so, and restic's check
    // (which would refuse to start beside any lock) runs after it.
    std::fs::remove_file(site.dir.path().join("www/img/more.bin")).unwrap();
    let ran = Ran::from_output(run().output().unwrap());
    ran.expect_code(0);
    assert!(ran.stderr.contains("removed a stale repository lock"), "{}", ran.stderr);
    assert_eq!(serde_json::from_slice::<Vec<serde_json::Value>>(&ok(&["snapshots", "--json"])).unwrap().len(), 2);
    ok(&["check", "--read-data"]);
}

/// The Prometheus textfile and notifications report runs into a
/// repository as for every store: after a failed run, the last success is
/// still the good run's (read from its snapshot).
#[test]
fn prometheus_and_notifications_report_runs_into_a_repository() {
    let site = RepoSite::new("password_file = \"pass\"");
    let prom = site.dir.path().join("web1.prom");
    let events = site.dir.path().join("events");
    site.write(&format!(
        "password_file = \"pass\"\n[report]\nprometheus = \"{}\"\n[notify]\ncommand = [\"sh\", \"-c\", \"echo \
         $OFFSITE_EVENT $OFFSITE_STATUS >> {}\"]",
        prom.display(),
        events.display()
    ));
    site.run("arc", &[]).expect_code(0);
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(text.contains("offsite_last_run_status{site=\"web1\",status=\"ok\"} 1"), "{text}");
    let success = crate::integrity::metric(&text, "offsite_last_success_timestamp_seconds");
    assert!(success > 1.7e9, "{text}");
    site.run("fixture", &["--param", "case=fail"]).expect_code(1);
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(text.contains("offsite_last_run_status{site=\"web1\",status=\"failed\"} 1"), "{text}");
    assert_eq!(crate::integrity::metric(&text, "offsite_last_success_timestamp_seconds"), success, "{text}");
    assert_eq!(std::fs::read_to_string(&events).unwrap(), "start running\nsuccess ok\nstart running\nfailure failed\n");
}
