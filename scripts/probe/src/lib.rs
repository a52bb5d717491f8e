//! Test fixture: calls one remote capability as its parameters say and
//! prints what came back, so the runner's end-to-end tests can check every
//! case of `ssh` and `scp` against a real sshd. Not an example to copy.
//!
//! `argv` is split on the ASCII unit separator (U+001F), so arguments may
//! hold spaces, quotes and newlines.

use offsite_sdk::secrets::Secret;
use offsite_sdk::ssh::{self, Stream};
use offsite_sdk::wit::offsite::backup::ssh as raw_ssh;
use offsite_sdk::{Param, Result, Script, ScriptInfo, bail, files, params, scp};

struct Probe;

impl Script for Probe {
    fn describe() -> ScriptInfo {
        ScriptInfo::new("probe", env!("CARGO_PKG_VERSION"))
            .description("drives ssh and scp for tests")
            .param(Param::required("op", "exec, stream, fetch, parallel-stream, parallel-fetch, unwaited"))
            .param(Param::optional("host", "host name").default("server1"))
            .param(Param::optional("argv", "the command, split on U+001F"))
            .param(Param::optional("dest", "store destination"))
            .param(Param::optional("path", "remote path"))
            .param(Param::optional("gzip", "compress: true or false").default("false"))
            .param(Param::optional("tail", "required tail text"))
            .param(Param::optional("hosts", "comma-separated hosts for the parallel ops"))
            .param(Param::optional("secret", "name of a site secret, for stream-secret"))
            .param(Param::optional(
                "template",
                "stdin template the script asks for, for stream-secret (empty: the site's)",
            ))
            .capabilities(["ssh", "scp", "secrets", "params", "files"])
    }

    fn run() -> Result<()> {
        let host = params::require("host")?;
        let argv: Vec<String> =
            params::get("argv")?.map(|a| a.split('\u{1f}').map(str::to_string).collect()).unwrap_or_default();
        let dest = params::get("dest")?.unwrap_or_default();
        let path = params::get("path")?.unwrap_or_default();
        let mut stream = Stream::new();
        if params::require("gzip")? == "true" {
            stream = stream.gzip();
        }
        if let Some(tail) = params::get("tail")? {
            stream = stream.require_tail(&tail);
        }
        let hosts: Vec<String> =
            params::get("hosts")?.map(|h| h.split(',').map(str::to_string).collect()).unwrap_or_default();
        match params::require("op")?.as_str() {
            "exec" => {
                let out = ssh::exec(&host, &argv)?;
                // One line per field, escaped, for the test to parse.
                println!("status={}", out.status);
                println!("stdout={:?}", out.stdout_text());
                println!("stderr={:?}", out.stderr);
            }
            "stream" => {
                let info = ssh::exec_to_file(&host, &argv, &dest, &stream)?;
                println!("stored={} bytes={} sha256={}", info.path, info.bytes, info.sha256);
            }
            "fetch" => {
                let info = scp::fetch(&host, &path, &dest)?;
                println!("stored={} bytes={} sha256={}", info.path, info.bytes, info.sha256);
            }
            "parallel-stream" => {
                let jobs: Vec<_> = hosts
                    .iter()
                    .enumerate()
                    .map(|(i, h)| ssh::start_exec_to_file(h, &argv, &job_dest(&hosts, i, &dest), &stream))
                    .collect::<std::result::Result<_, _>>()?;
                for job in jobs {
                    let info = job.wait()?;
                    println!("stored={} bytes={}", info.path, info.bytes);
                }
            }
            "parallel-fetch" => {
                let jobs: Vec<_> = hosts
                    .iter()
                    .enumerate()
                    .map(|(i, h)| scp::start_fetch(h, &path, &job_dest(&hosts, i, &dest)))
                    .collect::<std::result::Result<_, _>>()?;
                for job in jobs {
                    job.wait()?;
                }
            }
            "stream-secret" => {
                let secret = Secret::open(&params::require("secret")?)?;
                let template = params::get("template")?.unwrap_or_default();
                println!("secret name={}", secret.name());
                let info = if template.is_empty() {
                    ssh::exec_to_file_with_secret(&host, &argv, &dest, &stream, &secret)?
                } else {
                    // What a hostile script would do: the raw call with a
                    // template of its own.
                    raw_ssh::exec_to_file_with_secret(&host, &argv, &dest, &stream.raw(), secret.raw(), &template)
                        .map_err(offsite_sdk::HostError::from)?
                };
                println!("stored={} bytes={}", info.path, info.bytes);
            }
            // The read-only view: one line per entry, for the test to parse.
            "list" => {
                for e in files::list_dir(&path)? {
                    println!("{} {:?} {} {:o}", e.name, e.kind, e.size, e.mode);
                }
            }
            "stat" => {
                let e = files::stat(&path)?;
                println!("{} {:?} {} {:o} {}", e.name, e.kind, e.size, e.mode, e.modified);
            }
            "usage" => {
                let u = files::usage(&path)?;
                println!("files={} directories={} others={} bytes={}", u.files, u.directories, u.others, u.bytes);
            }
            "exists" => println!("exists={}", files::exists(&path)?),
            // Starts a transfer and never waits for it.
            "unwaited" => {
                let _job = ssh::start_exec_to_file(&host, &argv, &dest, &stream)?;
            }
            other => bail!("unknown op {other:?}"),
        }
        Ok(())
    }
}

offsite_sdk::script!(Probe);

/// `HOST-DEST` for a host's first job, `HOST-DEST-N` for its Nth (a run
/// writes each file once).
fn job_dest(hosts: &[String], i: usize, dest: &str) -> String {
    let h = &hosts[i];
    match hosts[..i].iter().filter(|x| *x == h).count() {
        0 => format!("{h}-{dest}"),
        n => format!("{h}-{dest}-{n}"),
    }
}
