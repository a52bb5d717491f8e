//! Scripts written in Python (guest-sdk/python, componentize-py): built
//! with `offsite build`, the same results as the Rust scripts, and the same
//! sandbox whatever language built the component.

use std::path::Path;

use offsite_testkit::{Ran, gunzip, offsite, python_script, script};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

fn run_in(dir: &Path, wasm: &Path, args: &[&str]) -> Ran {
    let mut cmd = offsite(Path::new(BIN));
    cmd.current_dir(dir).arg("run").arg(wasm).args(args);
    Ran::from_output(cmd.output().unwrap())
}

/// `arc` in Python and in Rust, on the same tree with the same --now: the
/// same file name and the same archive, member for member (read back
/// with GNU tar).
#[test]
fn python_arc_stores_what_the_rust_arc_stores() {
    let py = python_script(Path::new(BIN), "arc-py");
    let tree = tempfile::tempdir().unwrap();
    let src = tree.path().join("beoserver");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("bookl.dat"), "ledger\n".repeat(100)).unwrap();
    std::fs::write(src.join("sub/notes.txt"), "notes").unwrap();
    std::os::unix::fs::symlink("bookl.dat", src.join("link")).unwrap();
    let mut outputs = Vec::new();
    for (label, wasm) in [("rust", script("arc")), ("python", py)] {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("beoserver");
        let ok = std::process::Command::new("cp").arg("-a").arg(&src).arg(&copy).status().unwrap().success();
        assert!(ok);
        run_in(dir.path(), &wasm, &["--param", "path=beoserver", "--now", "2004-03-21T01:48:44"]).expect_code(0);
        let archive = dir.path().join("beoserver.20040321-014844.tgz");
        assert!(archive.exists(), "{label}: {:?}", std::fs::read_dir(dir.path()).unwrap().collect::<Vec<_>>());
        let listing = std::process::Command::new("tar").arg("-tvzf").arg(&archive).output().unwrap();
        assert!(listing.status.success());
        outputs.push((String::from_utf8(listing.stdout).unwrap(), gunzip(&archive), dir));
    }
    assert_eq!(outputs[0].0, outputs[1].0, "member names, modes, owners and times");
    assert_eq!(outputs[0].1, outputs[1].1, "the tar streams are identical");
}

/// The sandbox holds for Python as it does for Rust: no filesystem, no
/// network, grants enforced (a handled denial is the script's business, an
/// unhandled one fails the run in one line), and limits end the run with
/// exit 3.
#[test]
fn the_sandbox_holds_for_python_scripts() {
    let wasm = python_script(Path::new(BIN), "hostile-py");
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site.toml");
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let write_site = |limits: &str| {
        std::fs::write(
            &site,
            format!("store = \"{}\"\n[read]\nroots = [\"data\"]\n{limits}", dir.path().join("store").display()),
        )
        .unwrap()
    };
    write_site("");
    let case = |case: &str| {
        let mut cmd = offsite(Path::new(BIN));
        cmd.arg("run").arg(&wasm).arg("--site").arg(&site).args(["--param", &format!("case={case}")]);
        Ran::from_output(cmd.output().unwrap())
    };
    for (name, says) in [("read-file", "No such file"), ("write-file", "No such file"), ("network", "")] {
        let ran = case(name);
        ran.expect_code(1);
        assert!(ran.stderr.contains(says), "{name}: {}", ran.stderr);
        assert!(!ran.stderr.contains("root:x:0:0"), "{name}: {}", ran.stderr);
    }
    assert!(!Path::new("/tmp/pwned-by-python").exists());
    let ran = case("archive-outside");
    ran.expect_code(1).expect_stderr("denied: cannot read \"/etc\"");
    case("list-outside").expect_code(1).expect_stderr("denied");
    // A denial the script handles is its business; the run is a warning.
    let ran = case("denied-handled");
    ran.expect_code(0);
    // An exception is one line: its type and message, no traceback.
    let ran = case("raise");
    ran.expect_code(1).expect_stderr("RuntimeError: something went wrong; second line");
    assert_eq!(ran.stderr.lines().count(), 1, "no traceback: {}", ran.stderr);
    // Limits: memory, then the deadline.
    write_site("[limits]\nmemory = \"64MiB\"\n");
    case("allocate").expect_code(3);
    write_site("[limits]\ndeadline = \"2s\"\n");
    case("spin").expect_code(3);
}
