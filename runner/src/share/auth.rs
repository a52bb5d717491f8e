//! Registry credentials and certificate authorities, from where users
//! already keep them.
//!
//! Credentials: the first of these files with an entry for the registry:
//! `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
//! `~/.config/containers/auth.json` (podman, skopeo, buildah),
//! `$DOCKER_CONFIG/config.json` or `~/.docker/config.json` (docker). An
//! entry is `auth` (base64 of `user:password`) or a credential helper
//! (`credHelpers`, `credsStore`: `docker-credential-NAME get`). None found
//! means anonymous. Nothing goes into argv or logs.
//!
//! CAs: `*.crt` in `certs.d/HOST:PORT/` under `/etc/containers`,
//! `/etc/docker` and `~/.config/containers` (or the directories in
//! `$OFFSITE_CERTS_D`), on top of the system's CA store.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use oci_client::secrets::RegistryAuth;

const MAX_AUTH_FILE: u64 = 1024 * 1024;

fn home() -> Option<PathBuf> {
    crate::home::home_dir()
}

/// The auth files, in the order they are consulted.
pub fn auth_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|f| !f.is_empty()) {
        files.push(PathBuf::from(f));
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        files.push(PathBuf::from(d).join("containers/auth.json"));
    }
    if let Some(h) = home() {
        files.push(h.join(".config/containers/auth.json"));
    }
    match std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        Some(d) => files.push(PathBuf::from(d).join("config.json")),
        None => {
            if let Some(h) = home() {
                files.push(h.join(".docker/config.json"));
            }
        }
    }
    files
}

/// The credentials for `registry` (`host[:port]`).
pub fn credentials(registry: &str) -> Result<RegistryAuth> {
    for file in auth_files() {
        let mut text = String::new();
        match std::fs::File::open(&file) {
            Ok(f) => f
                .take(MAX_AUTH_FILE)
                .read_to_string(&mut text)
                .with_context(|| format!("cannot read {}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read the registry auth file {}", file.display())),
        };
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("the registry auth file {} is not JSON", file.display()))?;
        if let Some(found) = from_config(&config, registry, &file)? {
            return Ok(found);
        }
    }
    Ok(RegistryAuth::Anonymous)
}

fn from_config(config: &serde_json::Value, registry: &str, file: &std::path::Path) -> Result<Option<RegistryAuth>> {
    if let Some(helper) = config.get("credHelpers").and_then(|h| h.get(registry)).and_then(|h| h.as_str()) {
        return helper_get(helper, registry).map(Some);
    }
    if let Some(auths) = config.get("auths").and_then(|a| a.as_object()) {
        let entry = auths.iter().find(|(key, _)| same_registry(key, registry)).map(|(_, v)| v);
        if let Some(entry) = entry {
            if let Some(encoded) = entry.get("auth").and_then(|a| a.as_str()).filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .ok()
                    .and_then(|d| String::from_utf8(d).ok())
                    .with_context(|| {
                        format!("{}: the auth entry for {registry} is not base64 of user:password", file.display())
                    })?;
                let Some((user, password)) = decoded.split_once(':') else {
                    bail!("{}: the auth entry for {registry} is not user:password", file.display());
                };
                return Ok(Some(RegistryAuth::Basic(user.to_string(), password.to_string())));
            }
            if let (Some(u), Some(p)) =
                (entry.get("username").and_then(|u| u.as_str()), entry.get("password").and_then(|p| p.as_str()))
            {
                return Ok(Some(RegistryAuth::Basic(u.to_string(), p.to_string())));
            }
        }
    }
    if let Some(store) = config.get("credsStore").and_then(|s| s.as_str()).filter(|s| !s.is_empty()) {
        return helper_get(store, registry).map(Some);
    }
    Ok(None)
}

/// Whether an auths key (`host:port`, `https://host:port/v1/`, ...) names `registry`.
fn same_registry(key: &str, registry: &str) -> bool {
    let k = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let k = k.split('/').next().unwrap_or(k);
    k == registry
}

/// Asks a docker credential helper: the registry on stdin, JSON back.
fn helper_get(helper: &str, registry: &str) -> Result<RegistryAuth> {
    if helper.is_empty() || !helper.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        bail!("credential helper name {:?} is not a plain name", crate::text::truncate(helper, 64));
    }
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start the credential helper {program}"))?;
    child.stdin.take().expect("piped").write_all(registry.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("the credential helper {program} has no credentials for {registry}");
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{program} answered something that is not JSON"))?;
    let user = v.get("Username").and_then(|u| u.as_str()).unwrap_or_default();
    let secret = v.get("Secret").and_then(|s| s.as_str()).unwrap_or_default();
    Ok(if user == "<token>" {
        RegistryAuth::Bearer(secret.to_string())
    } else {
        RegistryAuth::Basic(user.to_string(), secret.to_string())
    })
}

/// The `certs.d` directories consulted.
pub fn certs_dirs() -> Vec<PathBuf> {
    if let Some(list) = std::env::var_os("OFFSITE_CERTS_D") {
        return std::env::split_paths(&list).filter(|p| !p.as_os_str().is_empty()).collect();
    }
    let mut dirs = vec![PathBuf::from("/etc/containers/certs.d"), PathBuf::from("/etc/docker/certs.d")];
    if let Some(h) = home() {
        dirs.push(h.join(".config/containers/certs.d"));
    }
    dirs
}

/// The PEM CA certificates configured for `registry`.
pub fn registry_cas(registry: &str) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for dir in certs_dirs() {
        let dir = dir.join(registry);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut names: Vec<PathBuf> =
            entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "crt")).collect();
        names.sort();
        for p in names {
            let mut bytes = Vec::new();
            std::fs::File::open(&p)
                .and_then(|f| f.take(MAX_AUTH_FILE).read_to_end(&mut bytes))
                .with_context(|| format!("cannot read the registry CA {}", p.display()))?;
            out.push(bytes);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_entries_are_found_by_host_and_port_in_any_spelling() {
        let file = std::path::Path::new("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("ops:s3cret");
        for key in ["reg.example:5000", "https://reg.example:5000", "https://reg.example:5000/v1/"] {
            let config = serde_json::json!({ "auths": { key: { "auth": b64 } } });
            match from_config(&config, "reg.example:5000", file).unwrap() {
                Some(RegistryAuth::Basic(u, p)) => assert_eq!((u.as_str(), p.as_str()), ("ops", "s3cret")),
                other => panic!("{key}: {other:?}"),
            }
        }
        let config = serde_json::json!({ "auths": { "reg.example": { "auth": b64 } } });
        assert!(from_config(&config, "reg.example:5000", file).unwrap().is_none(), "another port is another registry");
        let bad = serde_json::json!({ "auths": { "reg.example": { "auth": "!!" } } });
        assert!(from_config(&bad, "reg.example", file).is_err());
    }
}
