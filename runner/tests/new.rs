//! `offsite new` + `offsite build` + `offsite run`, for each language, from
//! an empty directory outside the repository: the generated project builds
//! and its own test passes as generated.

use std::path::Path;
use std::process::Command;

use offsite_testkit::{Ran, offsite, repo_root};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

/// PATH with this `offsite` first, as an installed one would be.
fn path_with_offsite() -> String {
    let bin_dir = Path::new(BIN).parent().unwrap().display().to_string();
    format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default())
}

fn new_project(lang: &str, name: &str) -> tempfile::TempDir {
    let outside = tempfile::tempdir().unwrap();
    let mut cmd = offsite(Path::new(BIN));
    cmd.current_dir(outside.path()).args(["new", name, "--lang", lang]);
    cmd.env("OFFSITE_RUST_SDK", repo_root().join("guest-sdk/rust"));
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(0);
    let dir = outside.path().join(name);
    for f in ["README.md", "test.sh"] {
        assert!(dir.join(f).is_file(), "{lang}: no {f}");
    }
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(readme.contains("offsite build"), "{readme}");
    outside
}

fn run_test_sh(dir: &Path, envs: &[(&str, String)]) {
    let mut cmd = Command::new(dir.join("test.sh"));
    cmd.env("PATH", path_with_offsite()).env("OFFSITE_CACHE_DIR", offsite_testkit::shared_cache_dir());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim_end().ends_with("ok"),
        "test.sh in {}:\n{}\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_new_rust_project_builds_runs_and_passes_its_test() {
    let outside = new_project("rust", "web-files");
    let dir = outside.path().join("web-files");
    // Pinned to the versions the scripts use, and built where they are, so
    // the SDK's dependencies compile once.
    std::fs::copy(repo_root().join("scripts/Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let target = repo_root().join("scripts/target").display().to_string();
    run_test_sh(&dir, &[("CARGO_TARGET_DIR", target)]);
    // A hyphenated name, as the project names itself.
    assert!(dir.join("web-files.wasm").is_file());
    let shown =
        Ran::from_output(offsite(Path::new(BIN)).arg("inspect").arg(dir.join("web-files.wasm")).output().unwrap());
    shown.expect_code(0);
    assert!(shown.stdout.contains("script:      web-files 0.1.0"), "{}", shown.stdout);
}

#[test]
fn a_new_python_project_builds_runs_and_passes_its_test() {
    let outside = new_project("python", "db-files");
    let dir = outside.path().join("db-files");
    run_test_sh(&dir, &[("OFFSITE_PYTHON_SDK", repo_root().join("guest-sdk/python").display().to_string())]);
    assert!(dir.join("db-files.wasm").is_file());
}

#[test]
fn a_new_javascript_project_builds_runs_and_passes_its_test() {
    let mut cmd = offsite(Path::new(BIN));
    let outside = tempfile::tempdir().unwrap();
    cmd.current_dir(outside.path()).args(["new", "site-files", "--lang", "js"]);
    cmd.env("OFFSITE_JS_SDK", repo_root().join("guest-sdk/js"));
    Ran::from_output(cmd.output().unwrap()).expect_code(0);
    let dir = outside.path().join("site-files");
    // The SDK's own dependencies (componentize-js, esbuild) are installed
    // once in guest-sdk/js; the project links to it.
    offsite_testkit::js_script(Path::new(BIN), "arc-js");
    run_test_sh(&dir, &[]);
    assert!(dir.join("site-files.wasm").is_file());
}

#[test]
fn new_refuses_bad_names_and_a_directory_in_use() {
    let outside = tempfile::tempdir().unwrap();
    let new = |args: &[&str]| {
        Ran::from_output(offsite(Path::new(BIN)).current_dir(outside.path()).arg("new").args(args).output().unwrap())
    };
    new(&["Bad_Name", "--lang", "rust"]).expect_code(2).expect_stderr("lowercase");
    std::fs::create_dir(outside.path().join("taken")).unwrap();
    std::fs::write(outside.path().join("taken/file"), "x").unwrap();
    new(&["taken", "--lang", "python"]).expect_code(2).expect_stderr("not empty");
    new(&["ok", "--lang", "cobol"]).expect_code(2);
}
