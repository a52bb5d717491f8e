//! Scripts written in JavaScript (guest-sdk/js: esbuild + componentize-js):
//! built with `offsite build`, the same results as the Rust scripts, and
//! the same sandbox whatever language built the component.

use std::path::Path;

use offsite_testkit::{HostileSite, Ran, assert_same_archive_as_rust_arc, js_script, offsite};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

/// `arc` in JavaScript and in Rust, on the same tree with the same --now:
/// the same file name and the same archive (read back with GNU tar).
#[test]
fn javascript_arc_stores_what_the_rust_arc_stores() {
    let js = js_script(Path::new(BIN), "arc-js");
    assert_same_archive_as_rust_arc(Path::new(BIN), &js);
    // It imports what it uses, as the Rust one does: nothing undeclared.
    let shown = Ran::from_output(offsite(Path::new(BIN)).arg("inspect").arg(&js).output().unwrap());
    assert!(!shown.stdout.contains("without declaring"), "{}", shown.stdout);
}

/// The sandbox holds for JavaScript: no network, grants enforced (a
/// handled denial is the script's business), one-line errors, and limits
/// end the run with exit 3.
#[test]
fn the_sandbox_holds_for_javascript_scripts() {
    let site = HostileSite::new(Path::new(BIN), &js_script(Path::new(BIN), "hostile-js"));
    site.case("network").expect_code(1).expect_stderr("fetch is not available: scripts have no network");
    site.case("archive-outside").expect_code(1).expect_stderr("denied: cannot read \"/etc\"");
    site.case("list-outside").expect_code(1).expect_stderr("denied");
    site.case("denied-handled").expect_code(0);
    let ran = site.case("raise");
    ran.expect_code(1).expect_stderr("TypeError: something went wrong; second line");
    assert_eq!(ran.stderr.lines().count(), 1, "{}", ran.stderr);
    site.limits("[limits]\nmemory = \"64MiB\"\n");
    site.case("allocate").expect_code(3);
    site.limits("[limits]\ndeadline = \"2s\"\n");
    site.case("spin").expect_code(3);
}
