//! `offsite build [DIR]`: builds the script project in DIR with its
//! language's toolchain and leaves `DIR/NAME.wasm`, NAME as the project
//! names itself (hyphens kept: `mysql-pull.wasm`, not cargo's
//! `mysql_pull.wasm`).
//!
//! - Rust (`Cargo.toml`): `cargo build --release --target wasm32-wasip2`.
//! - Python (`app.py`): `componentize-py` against the SDK's WIT, with the
//!   installed `offsite_sdk` package on its path, and the `script` world
//!   narrowed to the interfaces the project's code names, so the component
//!   imports only what the script uses (as a Rust or JavaScript one does).
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
    let used = python_interfaces(dir)?;
    let narrowed =
        tempfile::Builder::new().prefix("offsite-wit.").tempdir().context("cannot create a scratch directory")?;
    let text = std::fs::read_to_string(wit.join("offsite.wit"))
        .with_context(|| format!("cannot read {}", wit.join("offsite.wit").display()))?;
    std::fs::write(narrowed.path().join("offsite.wit"), narrow_world(&text, &used)?)
        .context("cannot write the narrowed WIT")?;
    let out = dir.join(format!(".{name}.wasm.building"));
    run(
        Command::new("componentize-py")
            .arg("-d")
            .arg(narrowed.path())
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

/// The SDK's capability modules, each the WIT interface of its name.
const PYTHON_INTERFACES: [&str; 8] = ["archive", "clock", "files", "log", "params", "scp", "secrets", "ssh"];

/// Reads every `.py` file of a project (Python's own parser, in python3)
/// and prints the SDK modules its code names: `from offsite_sdk import
/// ssh`, `offsite_sdk.ssh` after `import offsite_sdk [as x]`, and every
/// one for `from offsite_sdk import *`.
const PYTHON_SCAN: &str = r#"
import ast, pathlib, sys
names = set(sys.argv[2].split())
root = pathlib.Path(sys.argv[1])
used = set()
for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root).parts
    if any(p == "__pycache__" or p.startswith(".") for p in rel):
        continue
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "offsite_sdk":
            for a in node.names:
                if a.name == "*":
                    used |= names
                elif a.name in names:
                    used.add(a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "offsite_sdk":
                    aliases.add(a.asname or "offsite_sdk")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr in names:
                used.add(node.attr)
print(" ".join(sorted(used)))
"#;

/// The interfaces the Python project in `dir` uses (see [`PYTHON_SCAN`]).
fn python_interfaces(dir: &Path) -> Result<std::collections::BTreeSet<String>> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(PYTHON_SCAN)
        .arg(dir)
        .arg(PYTHON_INTERFACES.join(" "))
        .output()
        .map_err(|e| anyhow!("cannot run python3 to read the project: {e}"))?;
    if !out.status.success() {
        bail!(
            "cannot read the project's Python code: {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("python3 failed")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect())
}

/// The WIT with the `script` world importing only the interfaces in
/// `used` (the others stay defined, unused).
fn narrow_world(wit: &str, used: &std::collections::BTreeSet<String>) -> Result<String> {
    let start = wit.find("world script {").ok_or_else(|| anyhow!("the SDK's WIT has no `world script`"))?;
    let len = wit[start..].find("\n}").ok_or_else(|| anyhow!("the SDK's WIT has no end to `world script`"))?;
    let body: Vec<&str> = wit[start..start + len]
        .lines()
        .filter(|line| match line.trim().strip_prefix("import ").and_then(|r| r.strip_suffix(';')) {
            Some(name) => used.contains(name.trim()),
            None => true,
        })
        .collect();
    Ok(format!("{}{}{}", &wit[..start], body.join("\n"), &wit[start + len..]))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_python_world_is_narrowed_to_what_the_code_names() {
        let wit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../wit/offsite.wit")).unwrap();
        let used = ["archive", "params"].iter().map(|s| s.to_string()).collect();
        let narrowed = narrow_world(&wit, &used).unwrap();
        let world = &narrowed[narrowed.find("world script {").unwrap()..];
        assert!(world.contains("  import archive;\n") && world.contains("  import params;\n"), "{world}");
        for gone in ["ssh", "scp", "files", "secrets", "clock", "log"] {
            assert!(!world.contains(&format!("import {gone};")), "{world}");
            // The interface itself stays defined.
            assert!(narrowed.contains(&format!("interface {gone} {{")), "{gone}");
        }
        assert!(world.contains("export run: func()"), "{world}");
    }
}
