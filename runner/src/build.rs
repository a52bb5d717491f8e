//! `offsite build [DIR]`: builds the script project in DIR with its
//! language's toolchain and leaves `DIR/NAME.wasm`, NAME as the project
//! names itself (hyphens kept: `mysql-pull.wasm`, not cargo's
//! `mysql_pull.wasm`).
//!
//! - Rust (`Cargo.toml`): `cargo build --release --target wasm32-wasip2`.
//! - Python (`app.py`): `componentize-py` against the SDK's WIT, with the
//!   installed `offsite_sdk` package on its path.
//! - JavaScript (`package.json` and `app.js`): the SDK's own
//!   `offsite-sdk-build` (esbuild bundle, then componentize-js), from the
//!   project's `node_modules` (`npm install` first).
//!
//! Each tool's output goes to the terminal as it comes; a missing tool is
//! one line saying what to install.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};

/// The kinds of project `build` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

/// Which language the project in `dir` is written in.
pub fn detect(dir: &Path) -> Result<Lang> {
    if dir.join("Cargo.toml").is_file() {
        Ok(Lang::Rust)
    } else if dir.join("app.py").is_file() {
        Ok(Lang::Python)
    } else if dir.join("package.json").is_file() && dir.join("app.js").is_file() {
        Ok(Lang::Js)
    } else {
        bail!(
            "{} holds no script project: a Rust one has Cargo.toml, a Python one app.py, a JavaScript one \
             package.json and app.js (start one with `offsite new`)",
            dir.display()
        )
    }
}

/// Builds the project in `dir` and returns the component's path.
pub fn build(dir: &Path) -> Result<PathBuf> {
    let dir = dir.canonicalize().with_context(|| format!("cannot open {}", dir.display()))?;
    match detect(&dir)? {
        Lang::Rust => build_rust(&dir),
        Lang::Python => build_python(&dir),
        Lang::Js => build_js(&dir),
    }
}

fn run(cmd: &mut Command, tool: &str, install: &str) -> Result<()> {
    let status = cmd.status().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!("{tool} is not installed: {install}"),
        _ => anyhow!("cannot start {tool}: {e}"),
    })?;
    if !status.success() {
        bail!("{tool} failed ({status}); its output is above");
    }
    Ok(())
}

fn build_rust(dir: &Path) -> Result<PathBuf> {
    let manifest = dir.join("Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(["metadata", "--no-deps", "--format-version", "1", "--manifest-path"])
        .arg(&manifest)
        .output()
        .map_err(|e| anyhow!("cannot run cargo (install Rust with rustup): {e}"))?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).context("cargo metadata printed no JSON")?;
    let package = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["manifest_path"].as_str().is_some_and(|m| Path::new(m) == manifest))
        .ok_or_else(|| anyhow!("{} names no package (a workspace root? build a member)", manifest.display()))?;
    let name = package["name"].as_str().unwrap_or_default().to_string();
    let lib = package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "cdylib")))
        .ok_or_else(|| anyhow!("package {name} has no cdylib target: add `[lib] crate-type = [\"cdylib\"]`"))?;
    let lib_name = lib["name"].as_str().unwrap_or_default().replace('-', "_");
    let target_dir = PathBuf::from(meta["target_directory"].as_str().unwrap_or("target"));
    run(
        Command::new(&cargo)
            .args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
            .arg(&manifest)
            .args(["-p", &name]),
        "cargo",
        "install Rust with rustup, then `rustup target add wasm32-wasip2`",
    )?;
    let built = target_dir.join("wasm32-wasip2/release").join(format!("{lib_name}.wasm"));
    place(&built, &dir.join(format!("{name}.wasm")))
}

/// The Python project's name: `[project] name` in pyproject.toml, else the
/// directory's name.
fn python_name(dir: &Path) -> String {
    let from_pyproject = std::fs::read_to_string(dir.join("pyproject.toml"))
        .ok()
        .and_then(|t| toml::from_str::<toml::Value>(&t).ok())
        .and_then(|v| v.get("project")?.get("name")?.as_str().map(str::to_string));
    from_pyproject.unwrap_or_else(|| dir.file_name().map_or("script".into(), |n| n.to_string_lossy().into_owned()))
}

/// Where `offsite_sdk` is installed for `python3` (found without importing
/// it: it only imports inside a component).
fn python_sdk() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("OFFSITE_PYTHON_SDK").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import importlib.util as u, os\ns = u.find_spec('offsite_sdk')\n\
             print(os.path.dirname(s.submodule_search_locations[0]) if s else '')",
        ])
        .output()
        .map_err(|e| anyhow!("cannot run python3: {e}"))?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if dir.is_empty() {
        bail!(
            "the Python SDK is not installed for python3: pip install offsite-sdk (or the guest-sdk/python directory)"
        );
    }
    Ok(PathBuf::from(dir))
}

fn build_python(dir: &Path) -> Result<PathBuf> {
    let name = python_name(dir);
    let sdk = python_sdk()?;
    let wit = sdk.join("offsite_sdk/wit");
    if !wit.join("offsite.wit").is_file() {
        bail!("{} has no offsite.wit: reinstall the Python SDK", wit.display());
    }
    let out = dir.join(format!(".{name}.wasm.building"));
    run(
        Command::new("componentize-py")
            .arg("-d")
            .arg(&wit)
            .args(["-w", "script", "componentize", "-p"])
            .arg(dir)
            .arg("-p")
            .arg(&sdk)
            .arg("app")
            .arg("-o")
            .arg(&out)
            .current_dir(dir),
        "componentize-py",
        "pip install componentize-py==0.25.1",
    )?;
    place(&out, &dir.join(format!("{name}.wasm")))
}

fn build_js(dir: &Path) -> Result<PathBuf> {
    let tool = dir.join("node_modules/offsite-sdk/build.mjs");
    if !tool.is_file() {
        bail!("the JavaScript SDK is not installed in {}: run `npm install` there first", dir.display());
    }
    let out = Command::new("node")
        .arg(&tool)
        .arg(dir)
        .current_dir(dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!("node is not installed: install Node.js 20 or later"),
            _ => anyhow!("cannot start node: {e}"),
        })?;
    if !out.status.success() {
        bail!("offsite-sdk-build failed ({}); its output is above", out.status);
    }
    let built = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
    if built.is_empty() || !Path::new(&built).is_file() {
        bail!("offsite-sdk-build left no component");
    }
    Ok(PathBuf::from(built))
}

/// Moves or copies the built component to `dest` atomically.
fn place(built: &Path, dest: &Path) -> Result<PathBuf> {
    if !built.is_file() {
        bail!("the build left no {}", built.display());
    }
    let temp = dest.with_extension("wasm.tmp");
    std::fs::copy(built, &temp).with_context(|| format!("cannot write {}", temp.display()))?;
    std::fs::rename(&temp, dest).with_context(|| format!("cannot write {}", dest.display()))?;
    if built.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".building")) {
        let _ = std::fs::remove_file(built);
    }
    Ok(dest.to_path_buf())
}
