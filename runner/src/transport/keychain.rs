//! Finding the user's ssh-agent when the environment does not say.
//!
//! Under cron `SSH_AUTH_SOCK` is unset. The usual remedy, and the one the
//! article describes, is keychain: it keeps one agent per machine and writes
//! its variables to `~/.keychain/$HOSTNAME-sh` as Bourne shell. We read that
//! file (never run it) and take `SSH_AUTH_SOCK` from it.

use std::path::{Path, PathBuf};

/// The agent socket to use: `SSH_AUTH_SOCK` if set, else keychain's file for
/// this host name under `home`, if it names a socket that exists.
pub fn agent_socket(env_sock: Option<&str>, home: Option<&Path>, hostname: &str) -> Option<PathBuf> {
    if let Some(sock) = env_sock.filter(|s| !s.is_empty()) {
        return Some(PathBuf::from(sock));
    }
    let file = home?.join(".keychain").join(format!("{hostname}-sh"));
    let text = std::fs::read_to_string(&file).ok()?;
    let sock = parse_sh(&text, "SSH_AUTH_SOCK")?;
    let sock = PathBuf::from(sock);
    if sock.exists() {
        log::debug!(target: "offsite::ssh", "using the ssh-agent named in {}", file.display());
        Some(sock)
    } else {
        log::warn!(
            target: "offsite::ssh",
            "{} names agent socket {}, which no longer exists; is the agent still running?",
            file.display(),
            sock.display()
        );
        None
    }
}

/// The value of `NAME=value; export NAME;` in keychain's sh file.
fn parse_sh(text: &str, name: &str) -> Option<String> {
    for statement in text.split([';', '\n']) {
        let statement = statement.trim();
        if let Some(value) = statement.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
            if !value.is_empty() {
                return Some(value.to_string());
            }
        }
    }
    None
}

/// This machine's host name, as keychain uses it.
pub fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_keychain_sh_files() {
        let text = "SSH_AUTH_SOCK=/tmp/ssh-XXXXabc/agent.123; export SSH_AUTH_SOCK;\nSSH_AGENT_PID=124; export SSH_AGENT_PID;\n";
        assert_eq!(parse_sh(text, "SSH_AUTH_SOCK").as_deref(), Some("/tmp/ssh-XXXXabc/agent.123"));
        assert_eq!(parse_sh(text, "SSH_AGENT_PID").as_deref(), Some("124"));
        assert_eq!(parse_sh("", "SSH_AUTH_SOCK"), None);
    }

    #[test]
    fn environment_wins_then_keychain_file() {
        let home = tempfile::tempdir().unwrap();
        assert_eq!(agent_socket(Some("/env/sock"), Some(home.path()), "h"), Some(PathBuf::from("/env/sock")));
        assert_eq!(agent_socket(None, Some(home.path()), "h"), None);
        std::fs::create_dir(home.path().join(".keychain")).unwrap();
        let sock = home.path().join("agent.sock");
        std::fs::write(&sock, "").unwrap();
        std::fs::write(
            home.path().join(".keychain/h-sh"),
            format!("SSH_AUTH_SOCK={}; export SSH_AUTH_SOCK;\n", sock.display()),
        )
        .unwrap();
        assert_eq!(agent_socket(None, Some(home.path()), "h"), Some(sock.clone()));
        assert_eq!(agent_socket(Some(""), Some(home.path()), "h"), Some(sock));
        assert_eq!(agent_socket(None, Some(home.path()), "other"), None);
    }
}
