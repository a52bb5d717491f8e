//! Scripts written in Python (guest-sdk/python, componentize-py): built
//! with `offsite build`, the same results as the Rust scripts, and the same
//! sandbox whatever language built the component.

use std::path::Path;

use offsite_testkit::{HostileSite, assert_same_archive_as_rust_arc, python_script};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

/// `arc` in Python and in Rust, on the same tree with the same --now: the
/// same file name and the same archive, member for member (read back
/// with GNU tar).
#[test]
fn python_arc_stores_what_the_rust_arc_stores() {
    assert_same_archive_as_rust_arc(Path::new(BIN), &python_script(Path::new(BIN), "arc-py"));
}

/// The sandbox holds for Python as it does for Rust: no filesystem, no
/// network, grants enforced (a handled denial is the script's business, an
/// unhandled one fails the run in one line), and limits end the run with
/// exit 3.
#[test]
fn the_sandbox_holds_for_python_scripts() {
    let site = HostileSite::new(Path::new(BIN), &python_script(Path::new(BIN), "hostile-py"));
    for (name, says) in
        [("read-file", "No such file"), ("write-file", "No such file"), ("network", "scripts have no network")]
    {
        let ran = site.case(name);
        ran.expect_code(1);
        assert!(ran.stderr.contains(says), "{name}: {}", ran.stderr);
        assert!(!ran.stderr.contains("root:x:0:0"), "{name}: {}", ran.stderr);
    }
    assert!(!Path::new("/tmp/pwned-by-python").exists());
    site.case("archive-outside").expect_code(1).expect_stderr("denied: cannot read \"/etc\"");
    site.case("list-outside").expect_code(1).expect_stderr("denied");
    // A denial the script handles is its business.
    site.case("denied-handled").expect_code(0);
    // An exception is one line: its type and message, no traceback.
    let ran = site.case("raise");
    ran.expect_code(1).expect_stderr("RuntimeError: something went wrong; second line");
    assert_eq!(ran.stderr.lines().count(), 1, "no traceback: {}", ran.stderr);
    site.limits("[limits]\nmemory = \"64MiB\"\n");
    site.case("allocate").expect_code(3);
    site.limits("[limits]\ndeadline = \"2s\"\n");
    site.case("spin").expect_code(3);
}
