//! The arc script end to end: real runner binary, real component, archives
//! read back with GNU tar.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use offsite_testkit::{Ran, assert_same_tree, offsite, script, tempfile, tree};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

fn run_in(dir: &Path, args: &[&str]) -> Ran {
    let out = offsite(Path::new(BIN)).current_dir(dir).arg("run").args(args).output().expect("run offsite");
    Ran::from_output(out)
}

/// A tree with the awkward cases: nesting, empty and binary files, a large
/// file spanning many gzip blocks, long and odd names, modes and symlinks.
fn sample_tree(root: &Path) {
    let b = root.join("beoserver");
    std::fs::create_dir_all(b.join("data/deeper/still")).unwrap();
    std::fs::create_dir_all(b.join("empty-dir")).unwrap();
    std::fs::write(b.join("bookl.dat"), b"customer ledger\n").unwrap();
    std::fs::write(b.join("beoserver_ab_off"), b"").unwrap();
    std::fs::write(b.join("name with spaces & $(quotes)'\""), b"odd\n").unwrap();
    let long = format!("{}.txt", "n".repeat(150));
    std::fs::write(b.join("data/deeper").join(long), b"long name\n").unwrap();
    let mut big = Vec::with_capacity(5 << 20);
    let mut x: u32 = 12345;
    for i in 0..(5 << 20) {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        big.push(if i % 3 == 0 { (x >> 16) as u8 } else { b'a' + (i % 26) as u8 });
    }
    std::fs::write(b.join("data/big.bin"), &big).unwrap();
    std::fs::write(b.join("data/deeper/still/script.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(b.join("data/deeper/still/script.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("bookl.dat", b.join("relative-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", b.join("absolute-link")).unwrap();
    std::os::unix::fs::symlink("../../outside", b.join("data/escaping-link")).unwrap();
}

#[test]
fn arc_round_trip_with_gnu_tar() {
    let arc = script("arc");
    let dir = tempfile::tempdir().unwrap();
    sample_tree(dir.path());

    let ran = run_in(dir.path(), &[arc.to_str().unwrap(), "--param", "path=beoserver", "--now", "2004-03-21T01:48:44"]);
    ran.expect_code(0);
    assert_eq!(ran.stdout, "", "quiet on success");
    assert_eq!(ran.stderr, "", "quiet on success");
    let archive = dir.path().join("beoserver.20040321-014844.tgz");
    assert!(archive.is_file(), "exact name from --now; have {:?}", tree(dir.path()));
    let top: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(top.len(), 3, "only the source, the archive and .offsite, no temporary files: {top:?}");
    let runs: Vec<_> = std::fs::read_dir(dir.path().join(".offsite/runs")).unwrap().collect();
    assert!(runs.is_empty(), "nothing left in staging: {runs:?}");

    // GNU tar lists it, and the gzip stream is intact.
    let list = Command::new("tar").arg("-tzf").arg(&archive).output().unwrap();
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    let listing = String::from_utf8(list.stdout).unwrap();
    assert!(listing.lines().any(|l| l.trim_end_matches('/') == "beoserver"), "{listing}");
    assert!(listing.contains("beoserver/data/big.bin"), "{listing}");
    assert!(Command::new("gzip").arg("-t").arg(&archive).status().unwrap().success());

    // GNU tar extracts it byte for byte, with modes and symlinks.
    let out = tempfile::tempdir().unwrap();
    let x = Command::new("tar").arg("-xzf").arg(&archive).arg("-C").arg(out.path()).output().unwrap();
    assert!(x.status.success(), "{}", String::from_utf8_lossy(&x.stderr));
    assert_same_tree(&dir.path().join("beoserver"), &out.path().join("beoserver"));
}

#[test]
fn arc_names_the_archive_after_the_local_clock() {
    let arc = script("arc");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("www")).unwrap();
    std::fs::write(dir.path().join("www/index.html"), "<html>").unwrap();
    run_in(dir.path(), &[arc.to_str().unwrap(), "--param", "path=www"]).expect_code(0);
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let name = names.iter().find(|n| n.ends_with(".tgz")).expect("an archive");
    // www.YYYYMMDD-HHMMSS.tgz
    let stamp = name.strip_prefix("www.").unwrap().strip_suffix(".tgz").unwrap();
    assert_eq!(stamp.len(), 15, "{name}");
    assert!(stamp.chars().enumerate().all(|(i, c)| if i == 8 { c == '-' } else { c.is_ascii_digit() }), "{name}");
}

#[test]
fn arc_with_a_site_file_writes_into_the_store_and_reports_json() {
    let arc = script("arc");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("srv/www");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("index.html"), "<html>").unwrap();
    let site = dir.path().join("web1.toml");
    std::fs::write(
        &site,
        format!(
            "store = \"backups/web1\"\n[read]\nroots = [\"{}\"]\n[params]\npath = \"{}\"\n",
            src.display(),
            src.display()
        ),
    )
    .unwrap();
    let ran = run_in(
        dir.path(),
        &[arc.to_str().unwrap(), "--site", site.to_str().unwrap(), "--now", "2004-03-21T01:48:44Z", "--json"],
    );
    ran.expect_code(0);
    let summary: serde_json::Value = serde_json::from_str(ran.stdout.trim()).expect("one JSON line");
    assert_eq!(summary["status"], "ok");
    assert_eq!(summary["site"], "web1");
    let out = &summary["files"][0];
    assert_eq!(out["path"], "www.20040321-014844.tgz");
    let stored = dir.path().join("backups/web1/www.20040321-014844.tgz");
    let bytes = std::fs::read(&stored).unwrap();
    assert_eq!(out["bytes"], bytes.len() as u64);
    let sha = Command::new("sha256sum").arg(&stored).output().unwrap();
    assert!(String::from_utf8_lossy(&sha.stdout).starts_with(out["sha256"].as_str().unwrap()));
    // Member names drop the leading slash, as GNU tar does.
    let list = Command::new("tar").arg("-tzf").arg(&stored).output().unwrap();
    let listing = String::from_utf8(list.stdout).unwrap();
    let expected = format!("{}/index.html", src.display().to_string().trim_start_matches('/'));
    assert!(listing.lines().any(|l| l == expected), "{listing}");
}

#[test]
fn dry_run_writes_nothing() {
    let arc = script("arc");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("www")).unwrap();
    run_in(dir.path(), &[arc.to_str().unwrap(), "--param", "path=www", "--dry-run"]).expect_code(0);
    assert_eq!(tree(dir.path()), vec![Path::new("www").to_path_buf()]);
    // Not even a missing store directory is created.
    let site = dir.path().join("site.toml");
    std::fs::write(&site, "store = \"new-store\"\n[read]\nroots = [\".\"]\n").unwrap();
    run_in(dir.path(), &[arc.to_str().unwrap(), "--site", site.to_str().unwrap(), "--param", "path=www", "--dry-run"])
        .expect_code(0);
    assert!(!dir.path().join("new-store").exists());
}

#[test]
fn a_missing_source_fails_with_exit_1_and_no_file() {
    let arc = script("arc");
    let dir = tempfile::tempdir().unwrap();
    run_in(dir.path(), &[arc.to_str().unwrap(), "--param", "path=nowhere"])
        .expect_code(1)
        .expect_stderr("backup failed")
        .expect_stderr("nowhere");
    assert!(tree(dir.path()).is_empty(), "{:?}", tree(dir.path()));
}

#[test]
fn inspect_shows_metadata_hash_and_imports() {
    let arc = script("arc");
    let out = offsite(Path::new(BIN)).arg("inspect").arg(&arc).output().unwrap();
    let ran = Ran::from_output(out);
    ran.expect_code(0);
    let sha = Command::new("sha256sum").arg(&arc).output().unwrap();
    let sha = String::from_utf8_lossy(&sha.stdout).split_whitespace().next().unwrap().to_string();
    assert!(ran.stdout.contains(&format!("sha256:      {sha}")), "{}", ran.stdout);
    assert!(ran.stdout.contains("script:      arc "), "{}", ran.stdout);
    assert!(ran.stdout.contains("path (required)"), "{}", ran.stdout);
    assert!(ran.stdout.contains("offsite:backup/archive@0.1.0"), "{}", ran.stdout);
}

/// Runs the noop script in `dir` with its own compile cache `cache`.
fn run_noop_with_cache(dir: &Path, cache: &Path) {
    let out = offsite(Path::new(BIN))
        .env("OFFSITE_CACHE_DIR", cache)
        .current_dir(dir)
        .arg("run")
        .arg(script("noop"))
        .output()
        .unwrap();
    Ran::from_output(out).expect_code(0);
}

#[test]
fn the_compile_cache_is_used_on_the_second_run() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    run_noop_with_cache(dir.path(), &cache);
    let mut entries: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    // The compiled code and its record.
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(entries[0].extension().is_some_and(|e| e == "cwasm"));
    assert_eq!(entries[1], entries[0].with_extension("sum"));
    for e in &entries {
        let mode = std::fs::metadata(e).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "cache files are private");
    }
    // Reused, not rewritten: an entry is replaced by rename (a new inode);
    // a hit only touches its time, for least-recently-used eviction.
    use std::os::unix::fs::MetadataExt;
    let before = std::fs::metadata(&entries[0]).unwrap().ino();
    run_noop_with_cache(dir.path(), &cache);
    assert_eq!(std::fs::metadata(&entries[0]).unwrap().ino(), before, "reused, not rewritten");
}

#[test]
fn a_cache_file_writable_by_others_is_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    run_noop_with_cache(dir.path(), &cache);
    let entry = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .unwrap();
    // Tamper: garbage that would crash if deserialised, made group-writable.
    std::fs::write(&entry, b"not a compiled component").unwrap();
    std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o664)).unwrap();
    run_noop_with_cache(dir.path(), &cache);
    assert_ne!(std::fs::read(&entry).unwrap(), b"not a compiled component", "recompiled and replaced");
}

#[test]
fn now_is_local_time_unless_an_offset_is_given() {
    let arc = script("arc");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("b")).unwrap();
    let run = |now: &str| {
        let out = offsite(Path::new(BIN))
            .env("TZ", "Asia/Kolkata")
            .current_dir(dir.path())
            .args(["run", arc.to_str().unwrap(), "--param", "path=b", "--now", now])
            .output()
            .unwrap();
        Ran::from_output(out).expect_code(0);
    };
    // Local wall-clock time in, the same wall-clock time in the name.
    run("2004-03-21T01:48:44");
    assert!(dir.path().join("b.20040321-014844.tgz").is_file(), "{:?}", tree(dir.path()));
    // An explicit UTC instant is named in local time (+05:30), like `date`.
    run("2004-03-21T01:48:44Z");
    assert!(dir.path().join("b.20040321-071844.tgz").is_file(), "{:?}", tree(dir.path()));
}

/// One unreadable file or directory does not lose the rest: the archive is
/// stored without them, each is named in a warning and in the manifest, and
/// the run is `warning`, not `ok`. `[read] unreadable = "fail"` makes it
/// fatal. Run as `nobody` (root reads everything).
#[test]
fn unreadable_entries_are_left_out_with_a_warning_or_fail_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let src = d.join("src");
    std::fs::create_dir_all(src.join("www/private")).unwrap();
    std::fs::write(src.join("www/index.html"), "hello\n").unwrap();
    std::fs::write(src.join("www/secret.key"), "key\n").unwrap();
    std::fs::write(src.join("www/private/x"), "x\n").unwrap();
    std::fs::create_dir_all(d.join("store")).unwrap();
    std::fs::create_dir_all(d.join("cache")).unwrap();
    let nobody = |p: &Path| {
        Command::new("chown").args(["-R", "nobody:nogroup"]).arg(p).status().unwrap();
    };
    for p in ["src", "store", "cache"] {
        nobody(&d.join(p));
    }
    std::fs::set_permissions(src.join("www/secret.key"), std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(src.join("www/private"), std::fs::Permissions::from_mode(0o000)).unwrap();
    let site = |extra: &str| {
        let file = src.join("site.toml");
        std::fs::write(
            &file,
            format!("store = \"{}\"\n[read]\nroots = [\"{}\"]\n{extra}", d.join("store").display(), src.display()),
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        file
    };
    let run = |file: &Path| {
        let arc = d.join("arc.wasm");
        std::fs::copy(script("arc"), &arc).unwrap();
        std::fs::set_permissions(&arc, std::fs::Permissions::from_mode(0o644)).unwrap();
        Ran::from_output(
            Command::new("setpriv")
                .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
                .arg(BIN)
                .args(["run", "--json"])
                .arg(&arc)
                .arg("--site")
                .arg(file)
                .args(["--param", "path=www", "--now", "2004-03-21T01:48:44"])
                .current_dir(&src)
                .env("OFFSITE_CACHE_DIR", d.join("cache"))
                .env("HOME", d)
                .output()
                .unwrap(),
        )
    };
    let ran = run(&site(""));
    ran.expect_code(0);
    assert!(ran.stdout.contains("\"status\":\"warning\""), "{}\n{}", ran.stdout, ran.stderr);
    for name in ["www/secret.key", "www/private"] {
        assert!(ran.stderr.contains(&format!("{name}: left out of the archive: Permission denied")), "{}", ran.stderr);
    }
    let archive = d.join("store/www.20040321-014844.tgz");
    let listed = Command::new("tar").arg("-tzf").arg(&archive).output().unwrap();
    let listed = String::from_utf8(listed.stdout).unwrap();
    assert!(listed.lines().any(|l| l == "www/index.html"), "{listed}");
    assert!(listed.lines().any(|l| l.trim_end_matches('/') == "www/private"), "the directory itself: {listed}");
    assert!(!listed.contains("secret.key") && !listed.contains("private/x"), "{listed}");
    let manifest = std::fs::read_dir(d.join("store/.offsite/manifests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    assert_eq!(manifest["status"], "warning");
    assert_eq!(manifest["files"][0]["origin"]["skipped"], serde_json::json!(["www/private", "www/secret.key"]));

    let ran = run(&site("unreadable = \"fail\"\n"));
    ran.expect_code(1);
    assert!(ran.stderr.contains("Permission denied"), "{}", ran.stderr);
}
