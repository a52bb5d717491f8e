//! The disaster-recovery drill: the storage box is lost. On a new machine
//! with nothing but the binary, the bucket's keys, the age identity and the
//! manifest signing key's public half, the README's commands bring back
//! web1's tree and db1's dump, and both are what was backed up.
//!
//! The commands are read from the README's "If the storage box is lost"
//! section and run by bash as written; only the example values of its
//! `export` line and its bucket, endpoint and target names are swapped for
//! the test's (each must be found, so an edited README fails here first).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use offsite_testkit::mariadb::MariaDb;
use offsite_testkit::seaweed::{ACCESS_KEY, S3Space, SECRET_KEY};
use offsite_testkit::{Ran, age_keypair, offsite, repo_root, script, ssh_keypair};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

/// The first ```sh block of the README's section `heading`.
fn readme_block(heading: &str) -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let section = readme.split(heading).nth(1).unwrap_or_else(|| panic!("README has no {heading:?}"));
    let block = section.split("```sh\n").nth(1).expect("a sh block in the section");
    block.split("\n```").next().unwrap().to_string()
}

/// A tree as a web server's would be: nested directories, modes other
/// than the umask's, an executable, a private file, a link, and times
/// from the past.
fn make_www(www: &Path) {
    std::fs::create_dir_all(www.join("img/icons")).unwrap();
    std::fs::create_dir_all(www.join("cgi-bin")).unwrap();
    std::fs::write(www.join("index.html"), "<html>hello</html>\n").unwrap();
    std::fs::write(www.join("img/logo.bin"), (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>()).unwrap();
    std::fs::write(www.join("img/icons/a.png"), b"\x89PNG fake").unwrap();
    std::fs::write(www.join("cgi-bin/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::write(www.join(".htpasswd"), "admin:$apr1$x$y\n").unwrap();
    std::fs::write(www.join("name with spaces é.txt"), "unicode\n").unwrap();
    std::os::unix::fs::symlink("index.html", www.join("home.html")).unwrap();
    for (rel, mode) in [("cgi-bin/run.sh", 0o755), (".htpasswd", 0o600), ("img/icons", 0o750), ("cgi-bin", 0o711)] {
        std::fs::set_permissions(www.join(rel), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    // Files first, then directories deepest first: setting a file's time
    // does not touch its directory's.
    let mut day = 0;
    for rel in offsite_testkit::tree(www).iter().rev() {
        let path = www.join(rel);
        if path.is_symlink() {
            continue;
        }
        day += 1;
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000 + day * 86_400);
        let f = std::fs::File::open(&path).unwrap();
        f.set_times(std::fs::FileTimes::new().set_modified(t)).unwrap();
    }
}

/// Same entries, bytes, modes, link targets, and modification times of
/// files and directories.
#[track_caller]
fn assert_same_tree_and_times(expected: &Path, actual: &Path) {
    offsite_testkit::assert_same_tree(expected, actual);
    for rel in offsite_testkit::tree(expected) {
        let (x, y) = (
            std::fs::symlink_metadata(expected.join(&rel)).unwrap(),
            std::fs::symlink_metadata(actual.join(&rel)).unwrap(),
        );
        if !x.file_type().is_symlink() {
            assert_eq!(x.mtime(), y.mtime(), "modification time of {}", rel.display());
        }
    }
    let (x, y) = (std::fs::metadata(expected).unwrap(), std::fs::metadata(actual).unwrap());
    assert_eq!((x.mode() & 0o7777, x.mtime()), (y.mode() & 0o7777, y.mtime()), "the tree's top directory");
}

#[test]
fn the_storage_box_is_lost_and_the_readmes_commands_bring_everything_back() {
    let turn = offsite_testkit::shared::turn("mysql-accounts");
    let db1 = crate::mysql::start(&turn, "127.0.0.2", "offsite-srv1", true);
    crate::mysql::populate_sitedb(db1.db);
    let s3 = S3Space::shared();
    s3.create_bucket("backups");

    // The storage box: two sites, encrypted and signed, into one bucket.
    let old = tempfile::tempdir().unwrap();
    let keys = old.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let (identity, recipient) = age_keypair(&keys);
    let (signing, _) = ssh_keypair(&keys, "manifests");
    let www = old.path().join("var/www");
    make_www(&www);
    let common = format!(
        "[protect]\nage_recipients = [\"{recipient}\"]\nsigning_key = \"{}\"\n[s3]\nendpoint = \"{}\"\npath_style = true\n",
        signing.display(),
        s3.endpoint()
    );
    let web1 = old.path().join("web1.toml");
    std::fs::write(
        &web1,
        format!(
            "store = \"{}\"\n[read]\nroots = [\"{}\"]\n[params]\npath = \"{}\"\n{common}",
            s3.url("s3://backups/web1"),
            www.display(),
            www.display()
        ),
    )
    .unwrap();
    std::fs::write(old.path().join("ssh_config"), "").unwrap();
    let db1_site = old.path().join("db1.toml");
    std::fs::write(
        &db1_site,
        format!(
            "store = \"{}\"\nssh_config = \"{}\"\n[params]\ndumps = \"server1:sitedb:{}\"\n\n{}\n{common}",
            s3.url("s3://backups/db1"),
            old.path().join("ssh_config").display(),
            crate::mysql::SITEDB_TABLES.join(","),
            db1.ssh.host_section("server1", crate::mysql::DUMP_GRANT_1),
        ),
    )
    .unwrap();
    for (name, site) in [("arc", &web1), ("mysql-pull", &db1_site)] {
        let mut cmd = offsite(Path::new(BIN));
        cmd.arg("run").arg(script(name)).arg("--site").arg(site);
        cmd.env("HOME", old.path())
            .env_remove("SSH_AUTH_SOCK")
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        Ran::from_output(cmd.output().unwrap()).expect_code(0);
    }

    // The new machine: the identity and the public key (under the
    // README's names), a fresh MariaDB the client's ~/.my.cnf names, and
    // nothing else of the old box.
    let fresh = MariaDb::start("127.0.0.3");
    let new = tempfile::tempdir().unwrap();
    std::fs::copy(&identity, new.path().join("backup-identity.txt")).unwrap();
    std::fs::copy(signing.with_extension("pub"), new.path().join("manifest-signing.pub")).unwrap();
    std::fs::write(new.path().join(".my.cnf"), format!("[client]\nuser=root\nsocket={}\n", fresh.socket().display()))
        .unwrap();
    let restored = new.path().join("var/www-restored");

    let mut block = readme_block("## If the storage box is lost");
    for (example, ours) in [
        ("AKIAEXAMPLE", ACCESS_KEY.to_string()),
        ("example-secret", SECRET_KEY.to_string()),
        ("https://s3.example.net", s3.endpoint()),
        ("s3://backups/web1", s3.url("s3://backups/web1")),
        ("s3://backups/db1", s3.url("s3://backups/db1")),
        ("/var/www-restored", restored.display().to_string()),
    ] {
        assert!(block.contains(example), "the README's drill no longer names {example}:\n{block}");
        block = block.replace(example, &ours);
    }
    let bin_dir = Path::new(BIN).parent().unwrap();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &block])
        .current_dir(new.path())
        .env_clear()
        .env("PATH", format!("{}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", bin_dir.display()))
        .env("HOME", new.path())
        .env("TZ", "UTC")
        .env("OFFSITE_CACHE_DIR", new.path().join(".cache"))
        .output()
        .unwrap();
    let ran = Ran::from_output(out);
    ran.expect_code(0);
    // `runs` checked each signature.
    assert_eq!(ran.stdout.lines().filter(|l| l.contains(" ok ") && l.contains(" yes")).count(), 1, "{}", ran.stdout);
    ran.expect_stdout("loaded server1/sitedb-").expect_stdout("4 tables");

    // As `tar czf` stores it: the tree under its whole path, less the `/`.
    let back = restored.join(www.strip_prefix("/").unwrap());
    assert_same_tree_and_times(&www, &back);
    let original: Vec<_> = db1
        .db
        .fingerprint("sitedb")
        .into_iter()
        .filter(|(t, _, _)| crate::mysql::SITEDB_TABLES.contains(&t.as_str()))
        .collect();
    assert_eq!(original.len(), 4);
    assert_eq!(fresh.fingerprint("sitedb"), original, "every table, row for row");

    // Run again, the same commands refuse to load over the restored
    // database and leave the tree as it is (exit 1, both said).
    let again = Command::new("bash")
        .args(["-uo", "pipefail", "-c", &block])
        .current_dir(new.path())
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", bin_dir.display()))
        .env("HOME", new.path())
        .env("TZ", "UTC")
        .output()
        .unwrap();
    let again = Ran::from_output(again);
    again.expect_stderr("the database sitedb is not empty").expect_stdout("left alone, already there");
    assert_same_tree_and_times(&www, &back);
}
