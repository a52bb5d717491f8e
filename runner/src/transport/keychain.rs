//! Finding the user's ssh-agent when the environment does not say.
//!
//! Under cron `SSH_AUTH_SOCK` is unset. The usual remedy, and the one the
//! article describes, is keychain: it keeps one agent per machine and writes
//! its variables to `~/.keychain/$HOSTNAME-sh` as Bourne shell. We read that
//! file (never run it) and take `SSH_AUTH_SOCK` from it.

use std::path::{Path, PathBuf};

/// The agent socket to use: `SSH_AUTH_SOCK` if it names a live agent, else
/// the one keychain's file for this host name under `home` names, if that
/// is live. Also returns where it looked and what it found there, for an
/// error that says what is wrong on this side when no agent is found.
pub fn find_agent(env_sock: Option<&str>, home: Option<&Path>, hostname: &str) -> (Option<PathBuf>, Vec<String>) {
    let mut looked = Vec::new();
    match env_sock.filter(|s| !s.is_empty()) {
        Some(sock) => match live(Path::new(sock)) {
            Ok(()) => return (Some(PathBuf::from(sock)), looked),
            Err(why) => looked.push(format!("SSH_AUTH_SOCK={sock}: {why}")),
        },
        None => looked.push("SSH_AUTH_SOCK: not set (as under cron)".into()),
    }
    let Some(home) = home else {
        looked.push("~/.keychain: no home directory (HOME is not set, and the password database has none)".into());
        return (None, looked);
    };
    let file = home.join(".keychain").join(format!("{hostname}-sh"));
    let Ok(text) = std::fs::read_to_string(&file) else {
        looked.push(format!("{}: no such file (keychain is not in use)", file.display()));
        return (None, looked);
    };
    let Some(sock) = parse_sh(&text, "SSH_AUTH_SOCK") else {
        looked.push(format!("{}: names no SSH_AUTH_SOCK", file.display()));
        return (None, looked);
    };
    match live(Path::new(&sock)) {
        Ok(()) => {
            log::debug!(target: "offsite::ssh", "using the ssh-agent named in {}", file.display());
            (Some(PathBuf::from(sock)), looked)
        }
        Err(why) => {
            log::warn!(target: "offsite::ssh", "{} names agent socket {sock}: {why}; is the agent still running?", file.display());
            looked.push(format!("{} names {sock}: {why}", file.display()));
            (None, looked)
        }
    }
}

/// The agent socket to use (see [`find_agent`]).
pub fn agent_socket(env_sock: Option<&str>, home: Option<&Path>, hostname: &str) -> Option<PathBuf> {
    find_agent(env_sock, home, hostname).0
}

/// Whether an agent answers on `sock`.
fn live(sock: &Path) -> Result<(), String> {
    match std::os::unix::net::UnixStream::connect(sock) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("no such socket".into()),
        Err(e) => Err(format!("no agent answers there ({e})")),
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
        // A dead socket in the environment is not used, and is named.
        let (found, looked) = find_agent(Some("/env/sock"), Some(home.path()), "h");
        assert_eq!(found, None);
        assert!(looked[0].contains("SSH_AUTH_SOCK=/env/sock: no such socket"), "{looked:?}");
        assert!(looked[1].contains("no such file (keychain is not in use)"), "{looked:?}");
        assert_eq!(agent_socket(None, Some(home.path()), "h"), None);
        std::fs::create_dir(home.path().join(".keychain")).unwrap();
        let sock = home.path().join("agent.sock");
        let _agent = std::os::unix::net::UnixListener::bind(&sock).unwrap();
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
