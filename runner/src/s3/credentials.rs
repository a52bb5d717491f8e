//! S3 credentials from the standard places, never from the site file:
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, or a
//! profile in `~/.aws/credentials` and `~/.aws/config` (as the AWS CLI
//! reads them; `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE` move
//! them). A site that names a `profile` uses that profile even when the
//! variables are set, as `aws --profile` does.
//!
//! Like an SSH private key, a file holding a secret key must not be
//! readable by others: such a file is refused, not used.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A static key pair, maybe with a session token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    /// Where they came from, for messages: "environment" or a file and
    /// profile.
    pub source: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"***")
            .field("session_token", &self.session_token.as_ref().map(|_| "***"))
            .field("source", &self.source)
            .finish()
    }
}

/// What the process environment and HOME say, so tests can pass their own.
pub struct Env {
    pub vars: BTreeMap<String, String>,
    pub home: Option<PathBuf>,
}

impl Env {
    pub fn current() -> Env {
        Env { vars: std::env::vars().collect(), home: crate::home::home_dir() }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn file(&self, var: &str, default: &str) -> Option<PathBuf> {
        match self.var(var) {
            Some(p) => Some(PathBuf::from(p)),
            None => self.home.as_ref().map(|h| h.join(default)),
        }
    }
}

/// The credentials and region for `profile` (the site's, or `None`).
/// The region is `None` when no place names one.
pub fn resolve(profile: Option<&str>, env: &Env) -> Result<(Credentials, Option<String>), String> {
    let env_region = env.var("AWS_REGION").or_else(|| env.var("AWS_DEFAULT_REGION")).map(str::to_string);
    if profile.is_none()
        && let (Some(id), Some(secret)) = (env.var("AWS_ACCESS_KEY_ID"), env.var("AWS_SECRET_ACCESS_KEY"))
    {
        let creds = Credentials {
            access_key_id: id.to_string(),
            secret_access_key: secret.to_string(),
            session_token: env.var("AWS_SESSION_TOKEN").map(str::to_string),
            source: "the environment (AWS_ACCESS_KEY_ID)".into(),
        };
        let region = env_region.or_else(|| profile_region(env, "default"));
        return Ok((creds, region));
    }
    let name = profile.or_else(|| env.var("AWS_PROFILE")).unwrap_or("default");
    let credentials_file = env.file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
    let config_file = env.file("AWS_CONFIG_FILE", ".aws/config");
    let mut looked = Vec::new();
    for (file, section) in [(&credentials_file, name.to_string()), (&config_file, config_section(name))] {
        let Some(file) = file else { continue };
        looked.push(file.display().to_string());
        let Some(values) = read_section(file, &section)? else { continue };
        if let (Some(id), Some(secret)) = (values.get("aws_access_key_id"), values.get("aws_secret_access_key")) {
            check_private(file)?;
            let creds = Credentials {
                access_key_id: id.clone(),
                secret_access_key: secret.clone(),
                session_token: values.get("aws_session_token").cloned(),
                source: format!("{} [{section}]", file.display()),
            };
            let region = env_region.or_else(|| profile_region(env, name));
            return Ok((creds, region));
        }
        if let Some(kind) =
            ["role_arn", "sso_session", "sso_start_url", "credential_process", "web_identity_token_file"]
                .into_iter()
                .find(|k| values.contains_key(*k))
        {
            return Err(format!(
                "profile {name:?} in {} gets its credentials through `{kind}`, which offsite does not run; \
                 give the profile aws_access_key_id and aws_secret_access_key, or set AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY",
                file.display()
            ));
        }
    }
    Err(format!(
        "no S3 credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are {} and profile {name:?} has no \
         aws_access_key_id and aws_secret_access_key in {}",
        if profile.is_some() { "ignored because the site names a profile" } else { "not set" },
        if looked.is_empty() { "any file (HOME is not set)".to_string() } else { looked.join(" or ") }
    ))
}

fn profile_region(env: &Env, name: &str) -> Option<String> {
    let file = env.file("AWS_CONFIG_FILE", ".aws/config")?;
    read_section(&file, &config_section(name)).ok().flatten()?.get("region").cloned()
}

/// A profile's section in the config file: `profile NAME`, but `default`
/// for the default profile (the credentials file uses the bare name).
fn config_section(name: &str) -> String {
    if name == "default" { "default".to_string() } else { format!("profile {name}") }
}

/// The `key = value` pairs of `[section]` in an AWS-style INI file;
/// `None` if the file or the section is missing.
fn read_section(file: &Path, section: &str) -> Result<Option<BTreeMap<String, String>>, String> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
    };
    let mut current: Option<&str> = None;
    let mut found = None::<BTreeMap<String, String>>;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.trim());
            if current == Some(section) && found.is_none() {
                found = Some(BTreeMap::new());
            }
            continue;
        }
        if current == Some(section)
            && let (Some(values), Some((k, v))) = (found.as_mut(), line.split_once('='))
        {
            values.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Ok(found)
}

/// A file with a secret key must be readable by its owner only.
fn check_private(file: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} holds a secret key and is readable by others (mode {:o}); run `chmod 600 {}`",
            file.display(),
            meta.mode() & 0o777,
            file.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn env(dir: &Path, vars: &[(&str, &str)]) -> Env {
        Env { vars: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), home: Some(dir.to_path_buf()) }
    }

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn the_environment_then_the_profile_files() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path();
        write(
            &home.join(".aws/credentials"),
            "[default]\naws_access_key_id = AKDEF\naws_secret_access_key = sdef\n\n[backup]\n\
             aws_access_key_id=AKB\naws_secret_access_key=sb\naws_session_token = tok\n",
            0o600,
        );
        write(
            &home.join(".aws/config"),
            "[default]\nregion = eu-west-1\n[profile backup]\nregion = eu-north-1\n",
            0o644,
        );

        let (c, region) =
            resolve(None, &env(home, &[("AWS_ACCESS_KEY_ID", "AKENV"), ("AWS_SECRET_ACCESS_KEY", "senv")])).unwrap();
        assert_eq!((c.access_key_id.as_str(), region.as_deref()), ("AKENV", Some("eu-west-1")));
        assert!(!format!("{c:?}").contains("senv"), "the secret never shows in Debug");

        let (c, region) = resolve(None, &env(home, &[])).unwrap();
        assert_eq!((c.access_key_id.as_str(), region.as_deref()), ("AKDEF", Some("eu-west-1")));

        let (c, region) = resolve(None, &env(home, &[("AWS_PROFILE", "backup"), ("AWS_REGION", "us-west-2")])).unwrap();
        assert_eq!(c.session_token.as_deref(), Some("tok"));
        assert_eq!(region.as_deref(), Some("us-west-2"));

        // A profile named by the site wins over the variables.
        let vars = [("AWS_ACCESS_KEY_ID", "AKENV"), ("AWS_SECRET_ACCESS_KEY", "senv")];
        let (c, region) = resolve(Some("backup"), &env(home, &vars)).unwrap();
        assert_eq!((c.access_key_id.as_str(), region.as_deref()), ("AKB", Some("eu-north-1")));

        let e = resolve(Some("nope"), &env(home, &vars)).unwrap_err();
        assert!(e.contains("\"nope\"") && e.contains("ignored because the site names a profile"), "{e}");
    }

    #[test]
    fn keys_in_the_config_file_and_what_is_not_supported() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path();
        write(
            &home.join(".aws/config"),
            "[profile keys]\naws_access_key_id = AKC\naws_secret_access_key = sc\n\
             [profile sso]\nsso_session = corp\n",
            0o600,
        );
        assert_eq!(resolve(Some("keys"), &env(home, &[])).unwrap().0.access_key_id, "AKC");
        let e = resolve(Some("sso"), &env(home, &[])).unwrap_err();
        assert!(e.contains("sso_session") && e.contains("does not run"), "{e}");
        let e = resolve(None, &env(home, &[])).unwrap_err();
        assert!(e.contains("no S3 credentials") && e.contains(".aws/credentials"), "{e}");
    }

    #[test]
    fn a_secret_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("creds");
        write(&file, "[default]\naws_access_key_id = AK\naws_secret_access_key = s\n", 0o644);
        let e =
            resolve(None, &env(dir.path(), &[("AWS_SHARED_CREDENTIALS_FILE", file.to_str().unwrap())])).unwrap_err();
        assert!(e.contains("readable by others") && e.contains("chmod 600"), "{e}");
    }
}
