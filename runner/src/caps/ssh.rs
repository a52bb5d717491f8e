//! `ssh`: remote commands, captured or streamed into the store.

use wasmtime::component::Resource;

use super::Caps;
use super::remote::Job;
use super::secrets::SecretHandle;
use crate::bindings::ssh::{ExecOutput, Host, HostPending, StreamOptions};
use crate::bindings::types::{Error, FileInfo};
use crate::policy::{Call, Grant};

impl Host for Caps {
    fn exec(&mut self, host: String, argv: Vec<String>) -> Result<ExecOutput, Error> {
        let before = self.denials;
        let result = (|| {
            self.decide(Call::SshExec { host: &host, argv: &argv })?;
            let (status, stdout, stderr) = self.remote(&host)?.exec(&host, &argv)?;
            Ok(ExecOutput { status, stdout, stderr })
        })();
        self.noted("ssh.exec", before, result)
    }

    fn exec_to_file(
        &mut self,
        host: String,
        argv: Vec<String>,
        dest: String,
        options: StreamOptions,
    ) -> Result<FileInfo, Error> {
        let before = self.denials;
        let note = self.output_note("ssh.exec-to-file", Some(&host), &dest);
        let result = (|| {
            let rel = self.decide_stream(&host, &argv, &dest)?;
            self.remote(&host)?.exec_to_file(&host, &argv, &rel, &options, None)
        })();
        note.record(&result);
        self.noted("ssh.exec-to-file", before, result)
    }

    fn start_exec_to_file(
        &mut self,
        host: String,
        argv: Vec<String>,
        dest: String,
        options: StreamOptions,
    ) -> Result<Resource<Job>, Error> {
        let before = self.denials;
        let note = self.output_note("ssh.exec-to-file", Some(&host), &dest);
        let prepared = (|| Ok((self.decide_stream(&host, &argv, &dest)?, self.remote(&host)?)))();
        let what = format!("streaming from {host} into {dest}");
        let result = self.start_output(note, what, prepared, move |(rel, remote)| {
            remote.exec_to_file(&host, &argv, &rel, &options, None)
        });
        self.noted("ssh.start-exec-to-file", before, result)
    }

    fn exec_to_file_with_secret(
        &mut self,
        host: String,
        argv: Vec<String>,
        dest: String,
        options: StreamOptions,
        secret: Resource<SecretHandle>,
        stdin_template: String,
    ) -> Result<FileInfo, Error> {
        let before = self.denials;
        let note = self.output_note("ssh.exec-to-file", Some(&host), &dest);
        let result = (|| {
            let rel = self.decide_stream(&host, &argv, &dest)?;
            let stdin = self.secret_stdin(&argv, &secret, &stdin_template)?;
            self.remote(&host)?.exec_to_file(&host, &argv, &rel, &options, Some(&stdin))
        })();
        note.record(&result);
        self.noted("ssh.exec-to-file-with-secret", before, result)
    }

    fn start_exec_to_file_with_secret(
        &mut self,
        host: String,
        argv: Vec<String>,
        dest: String,
        options: StreamOptions,
        secret: Resource<SecretHandle>,
        stdin_template: String,
    ) -> Result<Resource<Job>, Error> {
        let before = self.denials;
        let note = self.output_note("ssh.exec-to-file", Some(&host), &dest);
        let prepared = (|| {
            let rel = self.decide_stream(&host, &argv, &dest)?;
            let stdin = self.secret_stdin(&argv, &secret, &stdin_template)?;
            Ok((rel, stdin, self.remote(&host)?))
        })();
        let what = format!("streaming from {host} into {dest}");
        let result = self.start_output(note, what, prepared, move |(rel, stdin, remote)| {
            remote.exec_to_file(&host, &argv, &rel, &options, Some(&stdin))
        });
        self.noted("ssh.start-exec-to-file-with-secret", before, result)
    }
}

impl HostPending for Caps {
    fn wait(&mut self, job: Resource<Job>) -> Result<FileInfo, Error> {
        let before = self.denials;
        let result = match self.table.get(&job) {
            Ok(job) => job.wait(),
            Err(e) => Err(Error::InvalidArgument(format!("no such pending transfer: {e}"))),
        };
        self.noted("ssh.pending.wait", before, result)
    }

    fn drop(&mut self, job: Resource<Job>) -> wasmtime::Result<()> {
        // The job keeps running; `settle` waits for it at the end of the run.
        self.table.delete(job)?;
        Ok(())
    }
}

impl Caps {
    /// The two grants a streamed call needs: running `argv` on `host`, and
    /// writing `dest` into the store.
    fn decide_stream(&mut self, host: &str, argv: &[String], dest: &str) -> Result<std::path::PathBuf, Error> {
        self.decide(Call::SshExec { host, argv })?;
        self.decide_write(dest)
    }

    /// The bytes to send on stdin for a secret: the site's template for
    /// that secret with `{secret}` replaced, after the policy agreed that
    /// the secret may go to `argv[0]`. The script's own template must be
    /// empty or the site's, word for word: the site, not the script, owns
    /// what is sent with a secret.
    fn secret_stdin(
        &mut self,
        argv: &[String],
        secret: &Resource<SecretHandle>,
        template: &str,
    ) -> Result<Vec<u8>, Error> {
        let handle =
            self.table.get(secret).map_err(|e| Error::InvalidArgument(format!("no such secret handle: {e}")))?;
        let name = handle.name().to_string();
        self.decide(Call::SecretSend { name: &name, program: &argv[0] })?;
        let delivery = self.deliveries.get(&name).cloned().ok_or_else(|| {
            Error::Denied(format!("secret {name:?} may not be sent anywhere: the site gives it no `stdin`"))
        })?;
        if !template.is_empty() && template != delivery.stdin {
            self.denials += 1;
            ::log::warn!(target: "offsite::policy", "site {}: refused a stdin template for secret {name:?} that is not the site's", self.site);
            return Err(Error::Denied(format!(
                "secret {name:?}: the site decides what is sent with a secret ([secrets.{name}] stdin); pass an \
                 empty stdin template"
            )));
        }
        let handle =
            self.table.get(secret).map_err(|e| Error::InvalidArgument(format!("no such secret handle: {e}")))?;
        Ok(delivery.stdin.replace("{secret}", handle.value()).into_bytes())
    }

    /// Asks the policy about writing `dest` into the store.
    pub(super) fn decide_write(&mut self, dest: &str) -> Result<std::path::PathBuf, Error> {
        match self.decide(Call::StoreWrite { dest })? {
            Grant::Write { rel } => Ok(rel),
            other => unreachable!("store write granted as {other:?}"),
        }
    }
}
