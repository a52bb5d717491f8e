//! `offsite new NAME --lang rust|python [DIR]`: a ready script project. It
//! archives one path (`describe` with one parameter, `run`), and comes
//! with a README giving the one build command and a `test.sh` that builds
//! it and checks a real run. `offsite build` then `offsite run` work as
//! generated.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::build::Lang;

/// Writes the project and returns its directory.
pub fn new(name: &str, lang: Lang, dir: Option<&Path>) -> Result<PathBuf> {
    if name.is_empty()
        || name.len() > 64
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || !name.as_bytes()[0].is_ascii_lowercase()
    {
        bail!("{name:?}: a script name is lowercase letters, digits and '-', starting with a letter");
    }
    let dir = dir.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} exists and is not empty: choose another directory", dir.display());
    }
    let files: Vec<(&str, String)> = match lang {
        Lang::Rust => rust(name),
        Lang::Python => python(name),
        Lang::Js => js(name),
    };
    for (rel, text) in files.iter().chain([("test.sh", test_sh(name)), ("README.md", readme(name, lang))].iter()) {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().expect("in the project"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("test.sh"), std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// Where the installed package keeps the SDKs (`/usr/share/offsite/sdk`
/// beside `/usr/bin/offsite`), or `$OFFSITE_SDK_DIR`; `None` when neither
/// exists (a build from a checkout: the registries' versions are used).
fn packaged_sdks() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("OFFSITE_SDK_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().ok()?.canonicalize().ok()?;
    let dir = exe.parent()?.parent()?.join("share/offsite/sdk");
    dir.is_dir().then_some(dir)
}

/// The one file in `dir` whose name ends with `suffix` (a wheel, a tarball).
fn packaged_file(dir: &Path, suffix: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    found.sort();
    found.pop()
}

/// The Rust SDK dependency: a local checkout's (`$OFFSITE_RUST_SDK`, a
/// path to guest-sdk/rust), the installed package's, or the crate.
fn rust_sdk() -> String {
    match std::env::var("OFFSITE_RUST_SDK") {
        Ok(path) if !path.is_empty() => format!("{{ path = {path:?} }}"),
        _ => match packaged_sdks().map(|d| d.join("rust")).filter(|d| d.join("Cargo.toml").is_file()) {
            Some(dir) => format!("{{ path = {:?} }}", dir.display().to_string()),
            None => "\"0.1\"".to_string(),
        },
    }
}

/// The Python SDK requirement: the installed package's wheel, or the
/// registry's version.
fn python_sdk() -> String {
    match packaged_sdks().and_then(|d| packaged_file(&d.join("python"), ".whl")) {
        Some(wheel) => format!("offsite-sdk @ file://{}", wheel.display()),
        None => "offsite-sdk==0.1.0".to_string(),
    }
}

fn rust(name: &str) -> Vec<(&'static str, String)> {
    let cargo = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
offsite-sdk = {sdk}

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
strip = true

# A project of its own, even inside another workspace.
[workspace]
"#,
        sdk = rust_sdk()
    );
    let lib = format!(
        r#"//! `{name}`: archives one path as PATH.YYYYMMDD-HHMMSS.tgz in the site's store.

use offsite_sdk::{{Param, Result, Script, ScriptInfo, archive, clock, info, params}};

struct Backup;

impl Script for Backup {{
    fn describe() -> ScriptInfo {{
        ScriptInfo::new("{name}", env!("CARGO_PKG_VERSION"))
            .description("Archive one path into the store")
            .param(Param::required("path", "file or directory to archive, beneath the site's read roots"))
            .capabilities(["archive", "clock", "log", "params"])
    }}

    fn run() -> Result<()> {{
        let path = params::require("path")?;
        let stamp = clock::now().format("%Y%m%d-%H%M%S")?;
        let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or("backup").to_string();
        let stored = archive::tar_gz(&[&path], &format!("{{name}}.{{stamp}}.tgz"))?;
        info!("{{}}: {{}} bytes, sha256 {{}}", stored.path, stored.bytes, stored.sha256);
        Ok(())
    }}
}}

offsite_sdk::script!(Backup);
"#
    );
    vec![("Cargo.toml", cargo), ("src/lib.rs", lib), (".gitignore", "/target\n/*.wasm\n".into())]
}

fn python(name: &str) -> Vec<(&'static str, String)> {
    let pyproject = format!(
        r#"[project]
name = "{name}"
version = "0.1.0"
description = "An Offsite backup script"
requires-python = ">=3.10"
dependencies = ["{sdk}", "componentize-py==0.25.1"]
"#,
        sdk = python_sdk()
    );
    let app = format!(
        r#""""`{name}`: archives one path as PATH.YYYYMMDD-HHMMSS.tgz in the site's store."""

from offsite_sdk import Info, Param, Script, archive, clock, export, log, params


class Backup(Script):
    info = Info(
        "{name}",
        "0.1.0",
        "Archive one path into the store",
        params=[Param.required("path", "file or directory to archive, beneath the site's read roots")],
        capabilities=["archive", "clock", "log", "params"],
    )

    def run(self):
        path = params.require("path")
        stamp = clock.now().format("%Y%m%d-%H%M%S")
        name = path.rstrip("/").rsplit("/", 1)[-1] or "backup"
        stored = archive.tar_gz([path], f"{{name}}.{{stamp}}.tgz")
        log.info(f"{{stored.path}}: {{stored.bytes}} bytes, sha256 {{stored.sha256}}")


WitWorld = export(Backup)
"#
    );
    vec![("pyproject.toml", pyproject), ("app.py", app), (".gitignore", "/*.wasm\n__pycache__/\n".into())]
}

/// The JavaScript SDK dependency: a local checkout's (`$OFFSITE_JS_SDK`, a
/// path to guest-sdk/js), the installed package's tarball, or the
/// registry's version.
fn js_sdk() -> String {
    match std::env::var("OFFSITE_JS_SDK") {
        Ok(path) if !path.is_empty() => format!("file:{path}"),
        _ => match packaged_sdks().and_then(|d| packaged_file(&d.join("js"), ".tgz")) {
            Some(tarball) => format!("file:{}", tarball.display()),
            None => "0.1.0".to_string(),
        },
    }
}

fn js(name: &str) -> Vec<(&'static str, String)> {
    let package = format!(
        r#"{{
  "name": "{name}",
  "version": "0.1.0",
  "private": true,
  "type": "module",
  "description": "An Offsite backup script",
  "devDependencies": {{ "offsite-sdk": "{sdk}" }}
}}
"#,
        sdk = js_sdk()
    );
    let app = format!(
        r#"// `{name}`: archives one path as PATH.YYYYMMDD-HHMMSS.tgz in the site's store.
import {{ Info, Param, archive, clock, exportScript, log, params }} from 'offsite-sdk';

const info = Info('{name}', '0.1.0', 'Archive one path into the store', {{
  params: [Param.required('path', "file or directory to archive, beneath the site's read roots")],
  capabilities: ['archive', 'clock', 'log', 'params'],
}});

function backup() {{
  const path = params.require('path');
  const stamp = clock.now().format('%Y%m%d-%H%M%S');
  const name = path.replace(/\/+$/, '').split('/').pop() || 'backup';
  const stored = archive.tarGz([path], `${{name}}.${{stamp}}.tgz`);
  log.info(`${{stored.path}}: ${{stored.bytes}} bytes, sha256 ${{stored.sha256}}`);
}}

export const {{ describe, run }} = exportScript({{ info, run: backup }});
"#
    );
    vec![("package.json", package), ("app.js", app), (".gitignore", "/*.wasm\nnode_modules/\n".into())]
}

fn test_sh(name: &str) -> String {
    format!(
        r#"#!/bin/sh
# Builds the script and runs it for real on a scratch directory: the archive
# must appear under the expected name. Prints "ok" and exits 0 when it does.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if [ -f "$here/package.json" ] && [ ! -d "$here/node_modules" ]; then
  (cd "$here" && npm install --no-audit --no-fund >/dev/null)
fi
offsite build "$here" >/dev/null
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/data"
echo "hello" > "$scratch/data/hello.txt"
(cd "$scratch" && offsite run "$here/{name}.wasm" --param path=data --now 2004-03-21T01:48:44)
tar -tzf "$scratch/data.20040321-014844.tgz" | grep -qx 'data/hello.txt'
echo ok
"#
    )
}

fn readme(name: &str, lang: Lang) -> String {
    let python = match python_sdk().split_once(" @ file://") {
        Some((_, wheel)) => format!("`pip install {wheel} componentize-py==0.25.1` (in a virtualenv)"),
        None => "`pip install offsite-sdk componentize-py==0.25.1` (in a virtualenv)".to_string(),
    };
    let (language, needs) = match lang {
        Lang::Rust => ("Rust", "Rust with the wasm32-wasip2 target (`rustup target add wasm32-wasip2`)".to_string()),
        Lang::Python => ("Python", format!("Python 3 with {python}")),
        Lang::Js => ("JavaScript", "Node.js 20 or later, and `npm install` once".to_string()),
    };
    format!(
        r#"# {name}

An [Offsite](https://github.com/offsite-backup/offsite) backup script in {language}: it
archives one path (`--param path=...`) as `PATH.YYYYMMDD-HHMMSS.tgz` in the site's store.

Build (needs {needs}):

    offsite build

This leaves `{name}.wasm`. Run it once in the current directory, or for a site:

    offsite run {name}.wasm --param path=www
    offsite run {name}.wasm --site /etc/offsite/web1.toml

`./test.sh` builds it and checks a real run. `offsite inspect {name}.wasm` shows what it
declares; `offsite check SITE.toml {name}.wasm` what a site lets it do.
"#
    )
}
