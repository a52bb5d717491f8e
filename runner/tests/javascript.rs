//! Scripts written in JavaScript (guest-sdk/js: esbuild + componentize-js):
//! built with `offsite build`, the same results as the Rust scripts, and
//! the same sandbox whatever language built the component.

use std::path::Path;

use offsite_testkit::{Ran, gunzip, js_script, offsite, script};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

/// `arc` in JavaScript and in Rust, on the same tree with the same --now:
/// the same file name and the same archive (read back with GNU tar).
#[test]
fn javascript_arc_stores_what_the_rust_arc_stores() {
    let js = js_script(Path::new(BIN), "arc-js");
    let tree = tempfile::tempdir().unwrap();
    let src = tree.path().join("beoserver");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("bookl.dat"), "ledger\n".repeat(100)).unwrap();
    std::fs::write(src.join("sub/notes.txt"), "notes").unwrap();
    std::os::unix::fs::symlink("bookl.dat", src.join("link")).unwrap();
    let mut outputs = Vec::new();
    for wasm in [script("arc"), js] {
        let dir = tempfile::tempdir().unwrap();
        let ok =
            std::process::Command::new("cp").arg("-a").arg(&src).arg(dir.path().join("beoserver")).status().unwrap();
        assert!(ok.success());
        let mut cmd = offsite(Path::new(BIN));
        cmd.current_dir(dir.path()).arg("run").arg(&wasm).args([
            "--param",
            "path=beoserver",
            "--now",
            "2004-03-21T01:48:44",
        ]);
        Ran::from_output(cmd.output().unwrap()).expect_code(0);
        let archive = dir.path().join("beoserver.20040321-014844.tgz");
        let listing = std::process::Command::new("tar").arg("-tvzf").arg(&archive).output().unwrap();
        assert!(listing.status.success(), "{}", archive.display());
        outputs.push((String::from_utf8(listing.stdout).unwrap(), gunzip(&archive), dir));
    }
    assert_eq!(outputs[0].0, outputs[1].0, "member names, modes, owners and times");
    assert_eq!(outputs[0].1, outputs[1].1, "the tar streams are identical");
    // It imports what it uses, as the Rust one does: check has nothing to say.
    let shown = Ran::from_output(
        offsite(Path::new(BIN)).arg("inspect").arg(js_script(Path::new(BIN), "arc-js")).output().unwrap(),
    );
    assert!(!shown.stdout.contains("without declaring"), "{}", shown.stdout);
}

/// The sandbox holds for JavaScript: no network, grants enforced (a
/// handled denial is the script's business), one-line errors, and limits
/// end the run with exit 3.
#[test]
fn the_sandbox_holds_for_javascript_scripts() {
    let wasm = js_script(Path::new(BIN), "hostile-js");
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
    case("network").expect_code(1);
    case("archive-outside").expect_code(1).expect_stderr("denied: cannot read \"/etc\"");
    case("list-outside").expect_code(1).expect_stderr("denied");
    case("denied-handled").expect_code(0);
    let ran = case("raise");
    ran.expect_code(1).expect_stderr("TypeError: something went wrong; second line");
    assert_eq!(ran.stderr.lines().count(), 1, "{}", ran.stderr);
    write_site("[limits]\nmemory = \"64MiB\"\n");
    case("allocate").expect_code(3);
    write_site("[limits]\ndeadline = \"2s\"\n");
    case("spin").expect_code(3);
}
