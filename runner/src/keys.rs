//! `offsite keys authorized-line SITE HOST`: the `authorized_keys` line to
//! install on a server for the backup key, matching the site's grants.
//!
//! Defence in depth: even if the offsite server were taken over, the key
//! could do on the server only what the site grants.
//! - `restrict` always: no pty, no agent, X11 or port forwarding.
//! - `from="..."` when the host section says where we connect from.
//! - `command="..."` when every grant is a fixed command line (no glob):
//!   one allowed line is forced directly; several go through a `case` on
//!   `$SSH_ORIGINAL_COMMAND` that runs a request only if it is, byte for
//!   byte, one of the lines the runner would send. Patterns cannot be
//!   expressed that way safely (a shell `case` glob would also match
//!   smuggled extra arguments), so with any pattern the line has no
//!   `command=` and says why.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};

use crate::site::{HostConfig, Site};
use crate::transport::quote;

/// The line, and notes to show the user (as `#` comments).
pub struct AuthorizedLine {
    pub line: String,
    pub notes: Vec<String>,
}

/// Builds the line for `host` of `site`; the public key is `key` or the
/// host's `identity` with `.pub` appended.
pub fn authorized_line(site: &Site, host: &str, key: Option<&Path>) -> Result<AuthorizedLine> {
    let h = site.hosts.get(host).ok_or_else(|| {
        anyhow!(
            "site {} has no [hosts.{host}] (it has: {})",
            site.name,
            site.hosts.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let public = public_key(h, key)?;
    let mut options = vec!["restrict".to_string()];
    let mut notes = Vec::new();
    match &h.from {
        Some(from) => options.push(format!("from=\"{from}\"")),
        None => notes.push(format!(
            "no from=: set `from = \"ADDRESS\"` in [hosts.{host}] to accept this key only from the offsite server"
        )),
    }
    match fixed_lines(h) {
        Some(lines) => {
            if lines.is_empty() {
                notes.push("the site grants nothing on this host; the forced command refuses everything".into());
            }
            notes.push(
                "regenerate and reinstall this line whenever the site's commands or fetch paths change: \
                 `offsite check --connect` says when the installed one is stale"
                    .into(),
            );
            options.push(format!("command=\"{}\"", escape(&gate(&lines))));
        }
        None => notes.push(
            "no command=: the grants use patterns, which a forced command cannot check safely; \
             the key is limited by restrict (and from=, if set) and the runner's policy"
                .into(),
        ),
    }
    Ok(AuthorizedLine { line: format!("{} {public}", options.join(",")), notes })
}

/// `type base64 [comment]` from the .pub file.
fn public_key(h: &HostConfig, key: Option<&Path>) -> Result<String> {
    let path = match (key, &h.identity) {
        (Some(k), _) => k.to_path_buf(),
        (None, Some(id)) => {
            let mut p = id.clone().into_os_string();
            p.push(".pub");
            p.into()
        }
        (None, None) => bail!(
            "host {} has no `identity`, so the key is whatever the agent or ssh_config offers; \
             name its public half with --key FILE.pub",
            h.name
        ),
    };
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("cannot read the public key {} (ssh-keygen -y -f KEY > KEY.pub makes it)", path.display())
    })?;
    let line = text.lines().find(|l| !l.trim().is_empty() && !l.starts_with('#')).unwrap_or("").trim().to_string();
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(kind), Some(_)) if kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-") => {
            Ok(line)
        }
        _ => bail!("{} does not look like an OpenSSH public key", path.display()),
    }
}

/// Every command line the runner could send for these grants, if they are
/// all fixed; `None` if any is a pattern.
fn fixed_lines(h: &HostConfig) -> Option<Vec<String>> {
    let is_glob = |s: &str| s.contains(['*', '?', '[', ']', '{', '}', '\\']);
    let mut lines = Vec::new();
    for pattern in &h.commands {
        if pattern.iter().skip(1).any(|a| is_glob(a) || a.ends_with("...")) {
            return None;
        }
        lines.push(quote::command_line(pattern).ok()?);
    }
    for path in &h.fetch {
        if is_glob(path) {
            return None;
        }
        // What the runner sends to copy that file (see scp.fetch).
        let argv = ["sh", "-c", crate::transport::FETCH_SCRIPT, "offsite-fetch", path.as_str()];
        lines.push(quote::command_line(&argv).ok()?);
    }
    Some(lines)
}

/// The command a check sends to learn whether a key is held to a gate of
/// ours, and to which grants (see [`gate`]). Unrestricted, the server has
/// no such program; nothing runs.
pub const GATE_PROBE: &str = "offsite-gate";

/// What identifies a set of allowed lines: the first 16 hex digits of
/// their SHA-256, one line each.
pub fn gate_digest(lines: &[String]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(lines.join("\n").as_bytes())[..8])
}

/// The lines a host's gate would allow, as [`gate_digest`] names them;
/// `None` when its grants use patterns (no gate is made for those).
pub fn expected_gate(h: &HostConfig) -> Option<String> {
    fixed_lines(h).map(|lines| gate_digest(&lines))
}

/// A shell snippet that runs `$SSH_ORIGINAL_COMMAND` only if it is exactly
/// one of `lines`, and answers [`GATE_PROBE`] with the lines' digest
/// without running anything, so that `check --connect` can tell that the
/// key is restricted, and whether to the site's current grants.
fn gate(lines: &[String]) -> String {
    let allowed: Vec<String> = lines.iter().map(|l| quote::quote_arg(l).expect("no NUL")).collect();
    let probe = format!(
        "{}) echo '{GATE_PROBE} {}';;",
        quote::quote_arg(&quote::quote_arg(GATE_PROBE).expect("no NUL")).expect("no NUL"),
        gate_digest(lines)
    );
    let refuse = "*) echo 'offsite: this key may only run the commands its site grants' >&2; exit 126;;";
    if allowed.is_empty() {
        return format!("case \"$SSH_ORIGINAL_COMMAND\" in {probe} {refuse} esac");
    }
    format!(
        "case \"$SSH_ORIGINAL_COMMAND\" in {probe} {}) eval \"$SSH_ORIGINAL_COMMAND\";; {refuse} esac",
        allowed.join("|")
    )
}

/// Escapes for a double-quoted authorized_keys option: sshd only treats
/// `\"` specially there.
fn escape(s: &str) -> String {
    s.replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(commands: &[&[&str]], fetch: &[&str]) -> HostConfig {
        HostConfig {
            name: "server1".into(),
            address: "server1".into(),
            port: None,
            user: None,
            identity: None,
            passphrase: None,
            known_hosts: None,
            host_key: None,
            connect_timeout: std::time::Duration::from_secs(1),
            idle_timeout: std::time::Duration::from_secs(1),
            commands: commands.iter().map(|c| c.iter().map(|s| s.to_string()).collect()).collect(),
            fetch: fetch.iter().map(|s| s.to_string()).collect(),
            from: None,
        }
    }

    #[test]
    fn fixed_grants_become_exact_lines_and_patterns_none() {
        let h = host(&[&["/home/b/dbbackup.sh"]], &["/home/b/userdb.tgz"]);
        assert_eq!(
            fixed_lines(&h).unwrap(),
            vec![
                "'/home/b/dbbackup.sh'".to_string(),
                quote::command_line(&[
                    "sh",
                    "-c",
                    crate::transport::FETCH_SCRIPT,
                    "offsite-fetch",
                    "/home/b/userdb.tgz"
                ])
                .unwrap()
            ]
        );
        assert!(fixed_lines(&host(&[&["mysqldump", "sitedb", "tbl_*..."]], &[])).is_none());
        assert!(fixed_lines(&host(&[], &["/var/backups/*.tgz"])).is_none());
    }

    #[test]
    fn the_gate_accepts_exactly_the_granted_lines() {
        // Run the gate under sh with SSH_ORIGINAL_COMMAND set, as sshd would.
        let lines = vec!["'echo' 'it'\\''s \"fine\"'".to_string(), "'true'".to_string()];
        let script = gate(&lines);
        let run = |cmd: &str| {
            std::process::Command::new("sh").arg("-c").arg(&script).env("SSH_ORIGINAL_COMMAND", cmd).output().unwrap()
        };
        let ok = run(&lines[0]);
        assert!(ok.status.success());
        assert_eq!(String::from_utf8_lossy(&ok.stdout), "it's \"fine\"\n");
        assert!(run("'true'").status.success());
        for bad in ["'true' ; id", "'true' 'x'", "id", "'echo' 'it'", "", "offsite-gate"] {
            let out = run(bad);
            assert_eq!(out.status.code(), Some(126), "{bad:?} must be refused");
            assert!(out.stdout.is_empty());
        }
        // The probe, as the runner quotes it, is answered with the lines'
        // digest and runs nothing.
        let probe = quote::command_line(&[GATE_PROBE]).unwrap();
        let out = run(&probe);
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{GATE_PROBE} {}\n", gate_digest(&lines)));
        let empty = gate(&[]);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&empty)
            .env("SSH_ORIGINAL_COMMAND", &probe)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{GATE_PROBE} {}\n", gate_digest(&[])));
    }

    #[test]
    fn escaping_for_authorized_keys() {
        assert_eq!(escape(r#"a "b" \c"#), r#"a \"b\" \c"#);
    }
}
