//! SSH transports: how a remote command is started and its bytes carried.
//!
//! A backend implements [`Transport`] (connect once per host, start remote
//! commands over that connection) and hands back a [`RemoteProcess`], whose
//! stdout and stderr are read through [`RemoteProcess::next`] with a
//! timeout. Everything above this layer (capture caps, streaming into the
//! store, the scp protocol, timeouts) is written once against these traits,
//! so every backend passes the same capability tests.

pub mod keychain;
pub mod openssh;
pub mod quote;

use std::fmt;
use std::io;
use std::time::Duration;

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The server reported this exit status.
    Status(u32),
    /// The server reported that the command was killed by a signal.
    Signal(String),
    /// No exit status arrived (connection lost, channel closed early...).
    Missing(String),
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Status(n) => write!(f, "exit status {n}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
            Exit::Missing(why) => write!(f, "no exit status received ({why})"),
        }
    }
}

/// One piece of output from a remote command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `n` bytes of stdout were read into the buffer.
    Stdout(usize),
    /// `n` bytes of stderr were read into the buffer.
    Stderr(usize),
    /// Both streams have ended.
    Closed,
}

/// What `scp.fetch` runs on the server (POSIX sh, Linux `/proc`, GNU or
/// busybox coreutils): open the file once as fd 3; print the canonical path
/// of what fd 3 is, its size, its type and its identity (device, inode,
/// size, modification time); then wait for a word on stdin.
///
/// - `go`: send exactly that many bytes from fd 3, and end.
/// - `ranges`: read requests `FIRST COUNT` (in MiB blocks) and send each
///   range from the same open file (`/proc/$$/fd/3` opens the file fd 3
///   is, not whatever the name leads to now), until `end`; then print the
///   identity again, so the runner sees a file that changed meanwhile.
///
/// A FIFO is refused before the open (which would block); the type of what
/// was opened is checked again by the runner. One line, so that it fits a
/// forced `command=` in authorized_keys.
pub const FETCH_SCRIPT: &str = concat!(
    r#"if [ ! -e "$1" ] && [ ! -L "$1" ]; then echo "$1: No such file or directory" >&2; exit 3; fi; "#,
    r#"[ -f "$1" ] || { echo "$1: not a regular file" >&2; exit 3; }; "#,
    r#"exec 3< "$1" || exit 3; f=/proc/$$/fd/3; "#,
    r#"p=$(readlink -e "$f") && s=$(stat -L -c %s "$f") && t=$(stat -L -c %F "$f") "#,
    r#"&& i=$(stat -L -c '%d %i %s %y' "$f") || exit 4; "#,
    r#"printf '%s\n%s\n%s\n%s\n' "$p" "$s" "$t" "$i"; "#,
    r#"IFS= read -r go || exit 5; "#,
    r#"if [ "$go" = go ]; then exec head -c "$s" <&3; fi; "#,
    r#"[ "$go" = ranges ] || exit 5; "#,
    r#"while read -r a b && [ "$a" != end ]; do "#,
    r#"dd if="$f" bs=1048576 skip="$a" count="$b" 2>/dev/null || exit 6; echo "=$a"; done; "#,
    r#"stat -L -c '%d %i %s %y' "$f""#
);

/// The unit of `FETCH_SCRIPT`'s ranges: its `dd` block size.
pub const FETCH_BLOCK: u64 = 1 << 20;

/// A remote command that is running.
pub trait RemoteProcess: Send {
    /// Waits at most `timeout` for output and reads some into `buf`.
    /// `Ok(None)` means nothing arrived in time.
    fn next(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<Event>>;
    /// Sends bytes to the command's stdin.
    fn write_stdin(&mut self, data: &[u8]) -> io::Result<()>;
    /// Closes stdin (the command sees end of file).
    fn close_stdin(&mut self);
    /// Sends `data` to stdin and then closes it, without waiting: a command
    /// that does not read (or echoes into a full pipe) cannot block the
    /// caller, which keeps reading output and honouring every timeout.
    fn feed_stdin(&mut self, data: Vec<u8>) {
        let _ = self.write_stdin(&data);
        self.close_stdin();
    }
    /// Waits up to `timeout` for the exit status after the output closed.
    fn finish(&mut self, timeout: Duration) -> Result<Exit, TransportError>;
    /// Stops the command's local end at once (the remote side sees the
    /// channel close).
    fn kill(&mut self);
}

/// A connection factory for the hosts of one site.
pub trait Transport: Send + Sync {
    /// Starts `command_line` (already quoted for the remote shell) on
    /// `host`, connecting first if this run has not yet.
    fn spawn(&self, host: &str, command_line: &str, stdin: bool) -> Result<Box<dyn RemoteProcess>, TransportError>;
    /// Like `spawn`, over the host's connection number `lane`: 0 is the
    /// one `spawn` uses; each other is a TCP connection of its own (its
    /// own window and socket buffers), made on first use, verified and
    /// authenticated like the first. A transport with one connection per
    /// host runs every lane over it.
    fn spawn_lane(
        &self,
        host: &str,
        lane: usize,
        command_line: &str,
        stdin: bool,
    ) -> Result<Box<dyn RemoteProcess>, TransportError> {
        let _ = lane;
        self.spawn(host, command_line, stdin)
    }
    /// Connects to `host` (if not yet) without running anything: the host
    /// key is verified and authentication done.
    fn connect(&self, host: &str) -> Result<(), TransportError>;
}

/// Why a host could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// The server's host key is not in known_hosts.
    UnknownHostKey { host: String, fingerprint: Option<String>, known_hosts_line: Option<String>, file: String },
    /// The server's host key differs from the known or pinned one.
    ChangedHostKey { host: String, detail: String },
    /// The server refused our credentials.
    AuthFailed { host: String, detail: String },
    /// Local configuration is unusable (key file mode, passphrase source...).
    Config { host: String, detail: String },
    /// Connecting or waiting took longer than allowed.
    Timeout { host: String, detail: String },
    /// The host could not be reached or the connection broke.
    Unreachable { host: String, detail: String },
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::UnknownHostKey { host, fingerprint, known_hosts_line, file } => {
                write!(f, "host {host}: the server's host key is not known (refusing to connect)")?;
                if let Some(fp) = fingerprint {
                    write!(f, "; it offered {fp}")?;
                }
                match known_hosts_line {
                    Some(line) => write!(
                        f,
                        "; after checking that fingerprint with the server's administrator, add this line to {file}:\n{line}"
                    ),
                    None => write!(f, "; add the server's key to {file} (ssh-keyscan prints it)"),
                }
            }
            TransportError::ChangedHostKey { host, detail } => write!(
                f,
                "host {host}: THE SERVER'S HOST KEY HAS CHANGED; refusing to connect (this may be a \
                 man-in-the-middle attack, or the server was reinstalled): {detail}"
            ),
            TransportError::AuthFailed { host, detail } => write!(f, "host {host}: authentication failed: {detail}"),
            TransportError::Config { host, detail } => write!(f, "host {host}: {detail}"),
            TransportError::Timeout { host, detail } => write!(f, "host {host}: timed out: {detail}"),
            TransportError::Unreachable { host, detail } => write!(f, "host {host}: {detail}"),
        }
    }
}

impl std::error::Error for TransportError {}

/// `SHA256:...` fingerprint of a public key blob, as `ssh-keygen -l` prints it.
pub fn fingerprint(key_blob: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(key_blob);
    format!("SHA256:{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest))
}

/// Refuses a private key file that group or others may read, as OpenSSH does.
pub fn check_key_file(host: &str, path: &std::path::Path) -> Result<(), TransportError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| TransportError::Config {
        host: host.to_string(),
        detail: format!("cannot read identity file {}: {e}", path.display()),
    })?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TransportError::Config {
            host: host.to_string(),
            detail: format!(
                "private key {} has mode {mode:04o}, so others can read it; refusing to use it \
                 (fix with: chmod 600 {})",
                path.display(),
                path.display()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_match_ssh_keygen() {
        // ssh-keygen -lf of "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAA...": the
        // blob here is arbitrary; the format is what matters.
        let fp = fingerprint(b"abc");
        assert_eq!(fp, "SHA256:ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0");
    }

    #[test]
    fn loose_key_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id");
        std::fs::write(&key, "k").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(check_key_file("h", &key).is_ok());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = check_key_file("h", &key).unwrap_err().to_string();
        assert!(err.contains("0640") && err.contains("chmod 600"), "{err}");
    }
}
