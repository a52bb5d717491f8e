//! `offsite new` + `offsite build` + `offsite run`, for each language, from
//! an empty directory outside the repository: the generated project builds
//! and its own test passes as generated, against the SDK as its package
//! (a `cargo package` crate, a `pip install`ed package, an `npm pack`
//! tarball), never against this checkout's files.

use std::path::Path;
use std::process::Command;

use offsite_testkit::{Ran, offsite, repo_root};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

/// PATH with this `offsite` first, as an installed one would be.
fn path_with_offsite() -> String {
    let bin_dir = Path::new(BIN).parent().unwrap().display().to_string();
    format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default())
}

fn new_project(lang: &str, name: &str, sdk: &[(&str, &Path)]) -> tempfile::TempDir {
    let outside = tempfile::tempdir().unwrap();
    let mut cmd = offsite(Path::new(BIN));
    cmd.current_dir(outside.path()).args(["new", name, "--lang", lang]);
    for (k, v) in sdk {
        cmd.env(k, v);
    }
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

/// Runs `cmd`, failing the test with its output unless it succeeds.
fn must(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The contract every SDK carries is the repository's, byte for byte (the
/// JavaScript one is a copy: npm does not pack symlinks).
#[test]
fn every_sdk_carries_the_contract_as_it_is() {
    let wit = std::fs::read(repo_root().join("wit/offsite.wit")).unwrap();
    for sdk in ["guest-sdk/rust/wit", "guest-sdk/python/offsite_sdk/wit", "guest-sdk/js/wit"] {
        let copy = std::fs::read(repo_root().join(sdk).join("offsite.wit")).unwrap();
        assert!(copy == wit, "{sdk}/offsite.wit differs from wit/offsite.wit: copy it there");
    }
}

#[test]
fn a_new_rust_project_builds_runs_and_passes_its_test() {
    // The crate as `cargo package` makes it, unpacked outside the checkout.
    let packaged = tempfile::tempdir().unwrap();
    must(
        Command::new("cargo")
            .args(["package", "--no-verify", "--allow-dirty", "--quiet", "--target-dir"])
            .arg(packaged.path())
            .current_dir(repo_root().join("guest-sdk/rust")),
        "cargo package of the Rust SDK",
    );
    let krate = packaged.path().join("package/offsite-sdk-0.1.0.crate");
    must(Command::new("tar").arg("xzf").arg(&krate).arg("-C").arg(packaged.path()), "unpacking the crate");
    let sdk = packaged.path().join("offsite-sdk-0.1.0");
    assert!(sdk.join("wit/offsite.wit").symlink_metadata().unwrap().is_file(), "the crate carries its WIT");

    let outside = new_project("rust", "web-files", &[("OFFSITE_RUST_SDK", &sdk)]);
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
    // The package as pip installs it (its WIT a file of its own), in a
    // directory of its own.
    let installed = tempfile::tempdir().unwrap();
    must(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
            .arg(installed.path())
            .arg(repo_root().join("guest-sdk/python")),
        "pip install of the Python SDK",
    );
    let wit = installed.path().join("offsite_sdk/wit/offsite.wit");
    assert!(wit.symlink_metadata().unwrap().is_file(), "the package carries its WIT");
    let outside = new_project("python", "db-files", &[]);
    let dir = outside.path().join("db-files");
    run_test_sh(&dir, &[("OFFSITE_PYTHON_SDK", installed.path().display().to_string())]);
    assert!(dir.join("db-files.wasm").is_file());
    // It imports what its code uses, and no other capability, so the fresh
    // project passes `check` (and a watcher takes it).
    let site = outside.path().join("site.toml");
    std::fs::write(
        &site,
        format!(
            "store = \"{}\"\n[read]\nroots = [\"{}\"]\n[params]\npath = \"{}\"\n",
            outside.path().join("store").display(),
            dir.display(),
            dir.display()
        ),
    )
    .unwrap();
    let checked = Ran::from_output(
        offsite(Path::new(BIN)).arg("check").arg(&site).arg(dir.join("db-files.wasm")).output().unwrap(),
    );
    checked.expect_code(0);
    let imports = checked.stdout.lines().find(|l| l.trim_start().starts_with("imports:")).unwrap_or_default();
    assert!(imports.contains("archive") && imports.contains("params"), "{}", checked.stdout);
    for unused in ["ssh", "scp", "files", "secrets"] {
        assert!(!imports.contains(unused), "imports {unused}: {}", checked.stdout);
    }
}

#[test]
fn a_new_javascript_project_builds_runs_and_passes_its_test() {
    // The package as `npm pack` makes it; the project installs the tarball
    // (its dependencies from the npm cache the SDK's own install filled).
    offsite_testkit::js_script(Path::new(BIN), "arc-js");
    let packed = tempfile::tempdir().unwrap();
    let name = must(
        Command::new("npm")
            .args(["pack", "--silent", "--pack-destination"])
            .arg(packed.path())
            .current_dir(repo_root().join("guest-sdk/js")),
        "npm pack of the JavaScript SDK",
    );
    let tarball = packed.path().join(name.trim());
    let listed = must(Command::new("tar").arg("tzf").arg(&tarball), "listing the tarball");
    for file in ["package/wit/offsite.wit", "package/build.mjs", "package/index.js", "package/lib/ssh.js"] {
        assert!(listed.lines().any(|l| l == file), "the package lacks {file}:\n{listed}");
    }
    let outside = new_project("js", "site-files", &[("OFFSITE_JS_SDK", &tarball)]);
    let dir = outside.path().join("site-files");
    run_test_sh(&dir, &[("npm_config_prefer_offline", "true".into())]);
    assert!(dir.join("site-files.wasm").is_file());
    assert!(dir.join("node_modules/offsite-sdk/wit/offsite.wit").is_file(), "installed from the tarball, not linked");
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
