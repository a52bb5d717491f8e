//! `scp`: copying remote files into the store.

use wasmtime::component::Resource;

use super::Caps;
use super::remote::Job;
use crate::bindings::scp::Host;
use crate::bindings::types::{Error, FileInfo};
use crate::policy::{Call, Grant};

impl Caps {
    /// Decides the path as written; returns it normalised, and the check
    /// the transfer applies to where it really leads on the server (a
    /// symlink inside a granted directory cannot reach outside).
    #[allow(clippy::type_complexity)]
    fn decide_fetch(
        &mut self,
        host: &str,
        remote_path: &str,
    ) -> Result<(String, Box<dyn Fn(&str) -> Result<(), Error> + Send + Sync>), Error> {
        let path = match self.decide(Call::ScpFetch { host, path: remote_path })? {
            Grant::Fetch { path, .. } => path,
            other => unreachable!("fetch granted as {other:?}"),
        };
        let (policy, site, host, written) = (self.policy.clone(), self.site.clone(), host.to_string(), path.clone());
        let allowed = move |resolved: &str| -> Result<(), Error> {
            if resolved == written {
                return Ok(());
            }
            match policy.check(&Call::ScpFetch { host: &host, path: resolved }) {
                Ok(_) => Ok(()),
                Err(denial) => {
                    let message = format!("{written:?} resolves on the server to {resolved:?}: {denial}");
                    ::log::warn!(target: "offsite::policy", "site {site}: refused scp call: denied: {message}");
                    Err(Error::Denied(message))
                }
            }
        };
        Ok((path, Box::new(allowed)))
    }
}

impl Host for Caps {
    fn fetch(&mut self, host: String, remote_path: String, dest: String) -> Result<FileInfo, Error> {
        let before = self.denials;
        let note = self.output_note("scp.fetch", Some(&host), &dest);
        let result = (|| {
            let (path, allowed) = self.decide_fetch(&host, &remote_path)?;
            let rel = self.decide_write(&dest)?;
            self.remote(&host)?.fetch(&host, &path, &rel, &*allowed)
        })();
        note.record(&result);
        self.noted("scp.fetch", before, result)
    }

    fn start_fetch(&mut self, host: String, remote_path: String, dest: String) -> Result<Resource<Job>, Error> {
        let before = self.denials;
        let note = self.output_note("scp.fetch", Some(&host), &dest);
        let prepared = (|| {
            let (path, allowed) = self.decide_fetch(&host, &remote_path)?;
            Ok((path, allowed, self.decide_write(&dest)?, self.remote(&host)?))
        })();
        let what = format!("fetching {host}:{remote_path} into {dest}");
        let result = self.start_output(note, what, prepared, move |(path, allowed, rel, remote)| {
            remote.fetch(&host, &path, &rel, &*allowed)
        });
        self.noted("scp.start-fetch", before, result)
    }
}
