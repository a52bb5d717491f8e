//! `scp`: copying remote files into the store.

use wasmtime::component::Resource;

use super::Caps;
use super::remote::Job;
use crate::bindings::scp::Host;
use crate::bindings::types::{Error, FileInfo};
use crate::policy::{Call, Grant};

impl Caps {
    /// Checks the path as written, then where it really leads on the
    /// server: a symlink inside a granted directory cannot reach outside.
    fn decide_fetch(&mut self, host: &str, remote_path: &str) -> Result<String, Error> {
        let path = match self.decide(Call::ScpFetch { host, path: remote_path })? {
            Grant::Fetch { path, .. } => path,
            other => unreachable!("fetch granted as {other:?}"),
        };
        let resolved = self.remote(host)?.resolve(host, &path)?;
        if resolved == path {
            return Ok(path);
        }
        match self.decide(Call::ScpFetch { host, path: &resolved }) {
            Ok(_) => Ok(resolved),
            Err(Error::Denied(m)) => {
                Err(Error::Denied(format!("{path:?} resolves on the server to {resolved:?}: {m}")))
            }
            Err(e) => Err(e),
        }
    }
}

impl Host for Caps {
    fn fetch(&mut self, host: String, remote_path: String, dest: String) -> Result<FileInfo, Error> {
        let before = self.denials;
        let result = (|| {
            let path = self.decide_fetch(&host, &remote_path)?;
            let rel = self.decide_write(&dest)?;
            self.remote(&host)?.fetch(&host, &path, &rel)
        })();
        self.noted("scp.fetch", before, result)
    }

    fn start_fetch(&mut self, host: String, remote_path: String, dest: String) -> Result<Resource<Job>, Error> {
        let before = self.denials;
        let result = (|| {
            let path = self.decide_fetch(&host, &remote_path)?;
            let rel = self.decide_write(&dest)?;
            let remote = self.remote(&host)?;
            self.start_job(format!("fetching {host}:{path} into {dest}"), move || remote.fetch(&host, &path, &rel))
        })();
        self.noted("scp.start-fetch", before, result)
    }
}
