//! `arc`: the classic one-line archive script, as a sandboxed component.
//!
//! `offsite run arc.wasm --param path=beoserver` writes
//! `beoserver.YYYYMMDD-HHMMSS.tgz` into the store (the current directory
//! when no site file is given), stamped with the local time.

use offsite_sdk::{Context, Param, Result, Script, ScriptInfo, archive, clock, info, params};

struct Arc;

impl Script for Arc {
    fn describe() -> ScriptInfo {
        ScriptInfo::new("arc", env!("CARGO_PKG_VERSION"))
            .description("Archive a file or directory as NAME.YYYYMMDD-HHMMSS.tgz")
            .param(Param::required("path", "file or directory to archive"))
            .param(Param::optional("name", "archive name prefix; defaults to the last component of path"))
            .param(Param::optional("format", "timestamp pattern (strftime)").default("%Y%m%d-%H%M%S"))
            .capabilities(["archive", "clock", "log", "params"])
    }

    fn run() -> Result<()> {
        let path = params::require("path")?;
        let name = match params::get("name")? {
            Some(n) if !n.is_empty() => n,
            _ => default_name(&path)
                .with_context(|| format!("cannot derive an archive name from {path:?}; set --param name=..."))?,
        };
        let format = params::require("format")?;
        let stamp = clock::now().format(&format)?;
        let dest = format!("{name}.{stamp}.tgz");
        info!("archiving {path} into {dest}");
        let stored = archive::tar_gz(&[&path], &dest).with_context(|| format!("archiving {path}"))?;
        info!("{} ({} bytes, sha256 {})", stored.path, stored.bytes, stored.sha256);
        Ok(())
    }
}

/// The last normal component: `beoserver` for `/home/u/beoserver/`.
fn default_name(path: &str) -> Option<String> {
    path.split('/').rev().find(|c| !c.is_empty() && *c != ".").map(str::to_string)
}

offsite_sdk::script!(Arc);
