//! Provenance for `offsite --version`: the git commit the binary was built
//! from, the wasmtime version it embeds (from Cargo.lock) and the WIT
//! package its scripts are built against. Each is "unknown" when its source
//! is not there (a build outside a checkout).

use std::path::Path;
use std::process::Command;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let commit = std::env::var("OFFSITE_BUILD_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        let out = Command::new("git").arg("-C").arg(&root).args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap_or_default();
    let wasmtime = lock
        .split("[[package]]")
        .find(|p| p.contains("\nname = \"wasmtime\"\n"))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"').map(str::to_string)));
    let wit = std::fs::read_to_string(root.join("wit/offsite.wit")).unwrap_or_default();
    let package = wit.lines().find_map(|l| l.trim().strip_prefix("package ")?.strip_suffix(';').map(str::to_string));
    let unknown = || "unknown".to_string();
    println!("cargo:rustc-env=OFFSITE_COMMIT={}", commit.unwrap_or_else(unknown));
    println!("cargo:rustc-env=OFFSITE_WASMTIME={}", wasmtime.unwrap_or_else(unknown));
    println!("cargo:rustc-env=OFFSITE_WIT={}", package.unwrap_or_else(unknown));
    // Only what exists: cargo treats a missing file as changed, and would
    // run this script (and rebuild the crate) on every build. A branch
    // packed later (`git gc`) leaves `refs/heads`, which is watched.
    for watched in [".git/HEAD", ".git/refs/heads", ".git/packed-refs", "Cargo.lock", "wit/offsite.wit"] {
        let path = root.join(watched);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    println!("cargo:rerun-if-env-changed=OFFSITE_BUILD_COMMIT");
}
