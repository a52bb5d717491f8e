//! `secrets`: opaque handles on the site's named secrets.
//!
//! The value is read when the script opens the handle, added to the run's
//! redaction list at once, and only ever leaves the runner on a remote
//! command's stdin (see `ssh.exec-to-file-with-secret`).

use wasmtime::component::Resource;

use super::Caps;
use crate::bindings::secrets::{Host, HostSecret};
use crate::bindings::types::Error;
use crate::policy::Call;
use crate::site::SecretSource;

/// Most secret handles a script may hold at once.
pub const MAX_OPEN_SECRETS: usize = 64;

/// A secret the script holds a handle to. Not `Debug`: it must never be
/// printed.
pub struct SecretHandle {
    name: String,
    value: String,
}

impl SecretHandle {
    pub fn value(&self) -> &str {
        &self.value
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

pub use crate::site::MAX_SECRET_BYTES;

impl Host for Caps {
    fn open(&mut self, name: String) -> Result<Resource<SecretHandle>, Error> {
        let before = self.denials;
        let result = (|| {
            self.decide(Call::SecretOpen { name: &name })?;
            if self.open_secrets >= MAX_OPEN_SECRETS {
                return Err(Error::LimitExceeded(format!(
                    "a run may hold at most {MAX_OPEN_SECRETS} secret handles at once"
                )));
            }
            let source = self
                .secret_sources
                .get(&name)
                .cloned()
                .ok_or_else(|| Error::Denied(format!("secret {name:?} is not declared")))?;
            let value = read_secret(&name, &source)?;
            if value.is_empty() {
                return Err(Error::InvalidArgument(format!("secret {name:?} is empty")));
            }
            if value.len() > MAX_SECRET_BYTES {
                return Err(Error::LimitExceeded(format!("secret {name:?} is longer than {MAX_SECRET_BYTES} bytes")));
            }
            // From now on every log line, error and report masks it.
            if !self.secrets.contains(&value) {
                self.secrets.push(value.clone());
            }
            let handle = self
                .table
                .push(SecretHandle { name, value })
                .map_err(|e| Error::LimitExceeded(format!("too many open secrets: {e}")))?;
            self.open_secrets += 1;
            Ok(handle)
        })();
        self.noted("secrets.open", before, result)
    }
}

impl HostSecret for Caps {
    fn name(&mut self, secret: Resource<SecretHandle>) -> String {
        self.table.get(&secret).map(|s| s.name.clone()).unwrap_or_default()
    }

    fn drop(&mut self, secret: Resource<SecretHandle>) -> wasmtime::Result<()> {
        self.table.delete(secret)?;
        self.open_secrets -= 1;
        Ok(())
    }
}

/// Reads a secret's value: a file readable by its owner only (trailing
/// newlines dropped), or an environment variable.
fn read_secret(name: &str, source: &SecretSource) -> Result<String, Error> {
    match source {
        SecretSource::File(path) => {
            crate::transport::check_key_file(name, path).map_err(|e| {
                Error::Denied(format!(
                    "secret {name:?}: {}",
                    e.to_string().trim_start_matches(&format!("host {name}: "))
                ))
            })?;
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::NotFound(format!("secret {name:?}: cannot read {}: {e}", path.display())))?;
            Ok(text.trim_end_matches(['\n', '\r']).to_string())
        }
        SecretSource::Env(var) => std::env::var(var)
            .map_err(|_| Error::NotFound(format!("secret {name:?}: environment variable {var} is not set"))),
    }
}
