//! Commands on the site's remote hosts.
//!
//! Hosts are named as the site file names them (`[hosts.server1]` is
//! `"server1"`); the script never sees addresses or keys. Each argument
//! reaches the remote program exactly as written: the runner quotes it for
//! the remote shell, so there is nothing to escape here.

use crate::secrets::Secret;
use crate::wit::offsite::backup::ssh as raw;
use crate::{FileInfo, HostError};

/// What a finished remote command printed, and its exit status.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: u32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    /// True when the command exited with status 0.
    ///
    /// ```
    /// let out = offsite_sdk::ssh::Output { status: 0, stdout: b"ok\n".to_vec(), stderr: String::new() };
    /// assert!(out.success());
    /// assert_eq!(out.stdout_text(), "ok\n");
    /// ```
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// Stdout as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs `argv` on `host` and captures its output (up to the site's
/// `captured_output` limit). A non-zero exit is returned, not an error; a
/// command killed by a signal or a lost connection is an error.
///
/// ```no_run
/// let out = offsite_sdk::ssh::exec("server1", &["test", "-d", "/var/lib/mysql"])?;
/// if !out.success() { offsite_sdk::warn!("no MySQL data directory on server1"); }
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
pub fn exec<S: AsRef<str>>(host: &str, argv: &[S]) -> Result<Output, HostError> {
    let out = raw::exec(host, &strings(argv)).map_err(HostError::from)?;
    Ok(Output { status: out.status, stdout: out.stdout, stderr: out.stderr })
}

/// How [`exec_to_file`] treats the stream.
///
/// ```
/// let o = offsite_sdk::ssh::Stream::new().gzip().require_tail("-- Dump completed");
/// assert!(o.gzip);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Stream {
    /// Compress with gzip on the runner's side.
    pub gzip: bool,
    /// Fail unless the last 4 KiB of output contain this text.
    pub require_tail: Option<String>,
}

impl Stream {
    pub fn new() -> Stream {
        Stream::default()
    }
    pub fn gzip(mut self) -> Stream {
        self.gzip = true;
        self
    }
    pub fn require_tail(mut self, text: &str) -> Stream {
        self.require_tail = Some(text.to_string());
        self
    }
    /// The WIT record, for calling the raw bindings in [`crate::wit`].
    pub fn raw(&self) -> raw::StreamOptions {
        raw::StreamOptions { gzip: self.gzip, require_tail: self.require_tail.clone() }
    }
}

/// Streams the stdout of `argv` on `host` into `dest` in the store. The
/// file appears only if the command exited 0 and the checks passed.
///
/// ```no_run
/// use offsite_sdk::ssh::{self, Stream};
/// let info = ssh::exec_to_file(
///     "server1",
///     &["mysqldump", "--single-transaction", "sitedb"],
///     "sitedb-20040321-014844.sql.gz",
///     &Stream::new().gzip().require_tail("-- Dump completed"),
/// )?;
/// offsite_sdk::info!("{} bytes", info.bytes);
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
pub fn exec_to_file<S: AsRef<str>>(
    host: &str,
    argv: &[S],
    dest: &str,
    options: &Stream,
) -> Result<FileInfo, HostError> {
    raw::exec_to_file(host, &strings(argv), dest, &options.raw()).map_err(HostError::from)
}

/// A transfer running in the background; see [`start_exec_to_file`] and
/// [`crate::scp::start_fetch`].
pub struct Pending(pub(crate) raw::Pending);

impl Pending {
    /// Waits for the transfer to finish.
    pub fn wait(self) -> Result<FileInfo, HostError> {
        self.0.wait().map_err(HostError::from)
    }
}

/// [`exec_to_file`] in the background, so that several hosts are backed up
/// at once (up to the site's `parallel` limit). Grants are checked now.
///
/// ```no_run
/// use offsite_sdk::ssh::{self, Stream};
/// let jobs = ["server1", "server2"].map(|h| {
///     ssh::start_exec_to_file(h, &["dbbackup.sh"], &format!("{h}.tgz"), &Stream::new())
/// });
/// for job in jobs {
///     job?.wait()?;
/// }
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
pub fn start_exec_to_file<S: AsRef<str>>(
    host: &str,
    argv: &[S],
    dest: &str,
    options: &Stream,
) -> Result<Pending, HostError> {
    raw::start_exec_to_file(host, &strings(argv), dest, &options.raw()).map(Pending).map_err(HostError::from)
}

/// [`exec_to_file`] with a secret on the command's stdin: the runner sends
/// what the site file says for that secret (`[secrets.NAME]`'s `stdin`,
/// with `{secret}` replaced by the value), then closes stdin, and only to
/// the programs the site names there. The script never sees the value and
/// chooses neither what is sent nor where; the value never appears in argv,
/// and nothing the server prints during the call comes back to the script.
///
/// ```no_run
/// use offsite_sdk::secrets::Secret;
/// use offsite_sdk::ssh::{self, Stream};
/// // Site: db_password = { file = "...", stdin = "[client]\npassword=\"{secret}\"\n", programs = ["mysqldump"] }
/// let password = Secret::open("db_password")?;
/// ssh::exec_to_file_with_secret(
///     "server1",
///     &["mysqldump", "--defaults-extra-file=/dev/stdin", "--single-transaction", "sitedb"],
///     "sitedb.sql.gz",
///     &Stream::new().gzip().require_tail("-- Dump completed"),
///     &password,
/// )?;
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
pub fn exec_to_file_with_secret<S: AsRef<str>>(
    host: &str,
    argv: &[S],
    dest: &str,
    options: &Stream,
    secret: &Secret,
) -> Result<FileInfo, HostError> {
    raw::exec_to_file_with_secret(host, &strings(argv), dest, &options.raw(), &secret.0, "").map_err(HostError::from)
}

/// [`exec_to_file_with_secret`] in the background.
///
/// ```no_run
/// use offsite_sdk::secrets::Secret;
/// use offsite_sdk::ssh::{self, Stream};
/// let password = Secret::open("db_password")?;
/// let argv = ["mysqldump", "--defaults-extra-file=/dev/stdin", "--quick", "sitedb"];
/// let stream = Stream::new().gzip().require_tail("-- Dump completed");
/// let jobs = [
///     ssh::start_exec_to_file_with_secret("server1", &argv, "server1/sitedb.sql.gz", &stream, &password)?,
///     ssh::start_exec_to_file_with_secret("server2", &argv, "server2/sitedb.sql.gz", &stream, &password)?,
/// ];
/// for job in jobs {
///     job.wait()?;
/// }
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
pub fn start_exec_to_file_with_secret<S: AsRef<str>>(
    host: &str,
    argv: &[S],
    dest: &str,
    options: &Stream,
    secret: &Secret,
) -> Result<Pending, HostError> {
    raw::start_exec_to_file_with_secret(host, &strings(argv), dest, &options.raw(), &secret.0, "")
        .map(Pending)
        .map_err(HostError::from)
}

fn strings<S: AsRef<str>>(argv: &[S]) -> Vec<String> {
    argv.iter().map(|s| s.as_ref().to_string()).collect()
}
