//! The `files` interface: a read-only view of the read roots (list, stat,
//! usage) with archive's path rules; links reported, never followed.

use std::path::Path;

use offsite_testkit::{Ran, offsite, script};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    /// src/ is the read root and holds the site file; src/www has two
    /// files in two directories, a link to /etc and a FIFO.
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("www/sub")).unwrap();
        std::fs::write(src.join("www/a.txt"), "hello").unwrap();
        std::fs::write(src.join("www/sub/b.txt"), "x".repeat(1000)).unwrap();
        std::os::unix::fs::symlink("/etc", src.join("www/link")).unwrap();
        let ok = std::process::Command::new("mkfifo").arg(src.join("www/fifo")).status().unwrap().success();
        assert!(ok);
        std::fs::write(dir.path().join("outside.txt"), "secret").unwrap();
        std::fs::write(
            src.join("site.toml"),
            format!("store = \"{}\"\n[read]\nroots = [\".\"]\n", dir.path().join("store").display()),
        )
        .unwrap();
        Env { dir }
    }

    /// The probe's printed lines (with `-v` a script's stdout goes to
    /// stderr as `probe: LINE`) are in `out`.
    fn probe(&self, op: &str, path: &str) -> Probed {
        let ran = self.run(op, path, true);
        let out = ran.stderr.lines().filter_map(|l| l.strip_prefix("probe: ")).collect::<Vec<_>>().join("\n");
        Probed { ran, out }
    }

    fn run(&self, op: &str, path: &str, verbose: bool) -> Ran {
        let site = self.dir.path().join("src/site.toml");
        let mut cmd = offsite(Path::new(BIN));
        if verbose {
            cmd.arg("-v");
        }
        cmd.arg("run").arg(script("probe")).arg("--site").arg(&site);
        cmd.args(["--param", "host=none", "--param", &format!("op={op}"), "--param", &format!("path={path}")]);
        Ran::from_output(cmd.output().unwrap())
    }
}

struct Probed {
    ran: Ran,
    out: String,
}

impl std::ops::Deref for Probed {
    type Target = Ran;
    fn deref(&self) -> &Ran {
        &self.ran
    }
}

#[test]
fn a_directory_is_listed_sorted_with_links_and_fifos_reported_not_followed() {
    let env = Env::new();
    let ran = env.probe("list", "www");
    ran.expect_code(0);
    let lines: Vec<&str> = ran.out.lines().collect();
    let kinds: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            let mut w = l.split(' ');
            (w.next().unwrap(), w.next().unwrap())
        })
        .collect();
    assert_eq!(
        kinds,
        vec![("a.txt", "Kind::File"), ("fifo", "Kind::Other"), ("link", "Kind::Symlink"), ("sub", "Kind::Directory")]
    );
    assert!(lines[0].starts_with("a.txt Kind::File 5 "), "{}", lines[0]);
    assert!(lines[2].starts_with("link Kind::Symlink 4 "), "a link's size is its target's length: {}", lines[2]);
    // A link is not a directory to list, even to a directory.
    env.probe("list", "www/link").expect_code(1).expect_stderr("symbolic link");
    // "." is the site file's directory, here the root itself.
    let root = env.probe("list", ".");
    root.expect_code(0);
    assert!(root.out.contains("www Kind::Directory"), "{}", root.stderr);
}

#[test]
fn stat_and_usage_measure_without_following_links() {
    let env = Env::new();
    let ran = env.probe("stat", "www/a.txt");
    ran.expect_code(0);
    assert!(ran.out.starts_with("www/a.txt Kind::File 5 "), "{}", ran.stderr);
    let ran = env.probe("stat", "www/link");
    ran.expect_code(0);
    assert!(ran.out.starts_with("www/link Kind::Symlink 4 "), "{}", ran.stderr);
    let ran = env.probe("usage", "www");
    ran.expect_code(0);
    assert_eq!(ran.out, "files=2 directories=2 others=2 bytes=1005", "{}", ran.stderr);
    // Whether a path exists is an answer, not a failure: the run stays ok
    // and silent.
    let ran = env.probe("exists", "www/nope");
    ran.expect_code(0);
    assert_eq!(ran.out, "exists=false");
    let quiet = env.run("exists", "www/nope", false);
    quiet.expect_code(0);
    assert_eq!(quiet.stderr, "");
}

#[test]
fn paths_outside_the_read_roots_are_denied() {
    let env = Env::new();
    for (op, path) in [("list", "/etc"), ("stat", "../outside.txt"), ("usage", "/usr"), ("stat", "www/link/passwd")] {
        let ran = env.probe(op, path);
        ran.expect_code(1);
        assert!(ran.stderr.contains("denied"), "{op} {path}: {}", ran.stderr);
        assert!(ran.out.is_empty(), "{}", ran.stderr);
    }
}
