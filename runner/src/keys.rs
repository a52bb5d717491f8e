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
    match fixed_lines(site, h) {
        Some(lines) => {
            for name in unchecked_secrets(site, h) {
                notes.push(format!(
                    "secret {name:?}: its `stdin` does not hold {{secret}} once, as a quoted value ending its line \
                     (like \"[client]\\npassword=\\\"{{secret}}\\\"\\n\"), so the gate cannot check what arrives \
                     with it and refuses every call that would send it"
                ));
            }
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

/// Every command line the runner could send for these grants, with what
/// it may receive on stdin, if they are all fixed; `None` if any is a
/// pattern.
fn fixed_lines(site: &Site, h: &HostConfig) -> Option<Vec<Allowed>> {
    let is_glob = |s: &str| s.contains(['*', '?', '[', ']', '{', '}', '\\']);
    let mut lines = Vec::new();
    for pattern in &h.commands {
        if pattern.iter().skip(1).any(|a| is_glob(a) || a.ends_with("...")) {
            return None;
        }
        // Only what the site sends with a secret to this program, checked
        // by shape; everything else runs with stdin closed.
        let program = pattern.first().map(String::as_str).unwrap_or_default();
        let templates = site
            .deliveries
            .values()
            .filter(|d| d.programs.iter().any(|p| p == program))
            .filter_map(|d| SecretSlot::of(&d.stdin))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        lines.push(Allowed { line: quote::command_line(pattern).ok()?, stdin: Stdin::Secret(templates) });
    }
    for path in &h.fetch {
        if is_glob(path) {
            return None;
        }
        // What the runner sends to copy that file (see scp.fetch). Our own
        // script reads one line from stdin and compares it: it may have it.
        let argv = ["sh", "-c", crate::transport::FETCH_SCRIPT, "offsite-fetch", path.as_str()];
        lines.push(Allowed { line: quote::command_line(&argv).ok()?, stdin: Stdin::Pass });
    }
    Some(lines)
}

/// One command line a gate allows, and what it may read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allowed {
    line: String,
    stdin: Stdin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stdin {
    /// Offsite's own fetch script, which reads one line and compares it.
    Pass,
    /// Nothing, or one of these texts with a secret in its slot.
    Secret(Vec<SecretSlot>),
}

/// A secret's stdin template that a gate can check: exactly one
/// `{secret}`, standing as a double-quoted option value (`name="{secret}"`
/// ending its line), so that whatever fills the slot, within
/// [`SECRET_PUNCTUATION`] and alphanumerics, is that one value and can
/// name no other option.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretSlot {
    before: String,
    after: String,
}

/// What a secret sent through a gated key may consist of besides letters,
/// digits and spaces: printable ASCII without quotes, backslash, `$` and
/// backtick, so it cannot close the quoted value it stands in (nor the
/// gate's own quoting). `-` ends it, where `tr` reads it literally.
const SECRET_PUNCTUATION: &str = "!#%&()*+,./:;<=>?@^_{|}~-";

impl SecretSlot {
    /// The template's parts around its slot, when a gate can check it.
    pub fn of(template: &str) -> Option<SecretSlot> {
        let (before, after) = template.split_once("{secret}")?;
        if after.contains("{secret}") {
            return None;
        }
        let last = before.rsplit('\n').next().unwrap_or(before);
        let name = last.trim_start().strip_suffix('"')?.trim_end().strip_suffix('=')?.trim_end();
        let named = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        let closed = after.strip_prefix('"').is_some_and(|rest| rest.is_empty() || rest.starts_with('\n'));
        (named && closed).then(|| SecretSlot { before: before.to_string(), after: after.to_string() })
    }
}

/// The secrets sent to a program granted on `h` whose stdin template a
/// gate cannot check, by name: a gated key refuses every call that would
/// send them.
pub fn unchecked_secrets<'a>(site: &'a Site, h: &HostConfig) -> Vec<&'a str> {
    let granted = |p: &String| h.commands.iter().any(|c| c.first() == Some(p));
    site.deliveries
        .iter()
        .filter(|(_, d)| d.programs.iter().any(granted) && SecretSlot::of(&d.stdin).is_none())
        .map(|(n, _)| n.as_str())
        .collect()
}

/// The command a check sends to learn whether a key is held to a gate of
/// ours, and to which grants (see [`gate`]). Unrestricted, the server has
/// no such program; nothing runs.
pub const GATE_PROBE: &str = "offsite-gate";

/// Which gate a digest describes: changed whenever what a gate admits
/// changes, so `check --connect` calls an installed older one stale.
const GATE_VERSION: &str = "gate 2: stdin checked";

/// What identifies a gate: the first 16 hex digits of the SHA-256 of its
/// version, each allowed line and what it may read.
fn gate_digest(lines: &[Allowed]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(GATE_VERSION.as_bytes());
    // Each line, then what it may read: "pass", or each template's parts
    // (lengths first, so no two encodings run together).
    for a in lines {
        h.update(format!("\nline {} {}", a.line.len(), a.line).as_bytes());
        match &a.stdin {
            Stdin::Pass => h.update(b"\nstdin pass"),
            Stdin::Secret(slots) => {
                h.update(b"\nstdin secret");
                for t in slots {
                    h.update(format!(" {} {}{} {}", t.before.len(), t.before, t.after.len(), t.after).as_bytes());
                }
            }
        }
    }
    hex::encode(&h.finalize()[..8])
}

/// The digest a host's gate would answer the probe with; `None` when its
/// grants use patterns (no gate is made for those).
pub fn expected_gate(site: &Site, h: &HostConfig) -> Option<String> {
    fixed_lines(site, h).map(|lines| gate_digest(&lines))
}

fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// The forced command: a POSIX `sh` script, single-quoted, that runs
/// `$SSH_ORIGINAL_COMMAND` only if it is exactly one of `lines`, and then
/// only with the stdin that line may have. It answers [`GATE_PROBE`] with
/// the gate's digest without running anything, so that `check --connect`
/// can tell that the key is restricted, and whether to the site's current
/// grants.
///
/// The script holds no quote and no backslash (lines and templates appear
/// as SHA-256 digests and lengths), so `sh -c '...'` reads the same in
/// every login shell sshd may start it with: sh, bash, dash, zsh, fish.
/// It needs `sha256sum`, `head`, `tail` and `tr` on the server.
fn gate(lines: &[Allowed]) -> String {
    let mut arms = format!(
        "{}) echo {GATE_PROBE} {}; exit 0;; ",
        sha256_hex(&quote::command_line(&[GATE_PROBE]).expect("no NUL")),
        gate_digest(lines)
    );
    let mut slots: Vec<&SecretSlot> = Vec::new();
    let mut most = 0usize;
    for a in lines {
        let allowed = match &a.stdin {
            Stdin::Pass => "p".to_string(),
            Stdin::Secret(templates) => {
                let mut ids = vec!["0".to_string()];
                for t in templates {
                    let id = slots.iter().position(|s| *s == t).unwrap_or_else(|| {
                        slots.push(t);
                        slots.len() - 1
                    });
                    ids.push(format!("s{id}"));
                    most = most.max(t.before.len() + t.after.len() + crate::site::MAX_SECRET_BYTES);
                }
                ids.join(" ")
            }
        };
        arms.push_str(&format!("{}) t=\"{allowed}\";; ", sha256_hex(&a.line)));
    }
    let refuse = "*) echo \"offsite: this key may only run the commands its site grants\" >&2; exit 126;;";
    let mut checks = String::new();
    for (id, t) in slots.iter().enumerate() {
        checks.push_str(&format!(
            "s{id}) p={}; q={}; a={}; b={};; ",
            sha256_hex(&t.before),
            sha256_hex(&t.after),
            t.before.len(),
            t.after.len()
        ));
    }
    let script = format!(
        "LC_ALL=C; export LC_ALL; \
         c=$(printf %s \"$SSH_ORIGINAL_COMMAND\" | sha256sum); c=${{c%% *}}; \
         case $c in {arms}{refuse} esac; \
         if [ \"$t\" = p ]; then eval \"$SSH_ORIGINAL_COMMAND\"; exit; fi; \
         s=$(head -c {limit}; echo x); s=${{s%x}}; \
         if [ -z \"$s\" ]; then eval \"$SSH_ORIGINAL_COMMAND\" </dev/null; exit; fi; \
         n=${{#s}}; ok=; \
         for i in $t; do \
         case $i in {checks}*) continue;; esac; \
         [ $n -gt $((a + b)) ] && [ $n -le $((a + b + {max_secret})) ] || continue; \
         x=$(printf %s \"$s\" | head -c $a | sha256sum); [ \"${{x%% *}}\" = $p ] || continue; \
         x=$(printf %s \"$s\" | tail -c $b | sha256sum); [ \"${{x%% *}}\" = $q ] || continue; \
         x=$(printf %s \"$s\" | head -c $((n - b)) | tail -c $((n - a - b)) | tr -d \" 0-9A-Za-z{SECRET_PUNCTUATION}\" && echo x); \
         [ \"$x\" = x ] || continue; ok=1; break; \
         done; \
         if [ -z \"$ok\" ]; then echo \"offsite: this key reads on stdin only what its site sends with a secret, \
         and a secret may hold only letters, digits, spaces and these: {SECRET_PUNCTUATION}\" >&2; exit 126; fi; \
         printf %s \"$s\" | eval \"$SSH_ORIGINAL_COMMAND\"",
        limit = most + 1,
        max_secret = crate::site::MAX_SECRET_BYTES,
    );
    debug_assert!(!script.contains(['\'', '\\']), "the gate must read the same in every shell");
    format!("/bin/sh -c '{script}'")
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
            compression: None,
            connections: 4,
            parallel_above: 64 << 20,
            bandwidth: None,
            retries: 3,
            retry_streams: false,
            commands: commands.iter().map(|c| c.iter().map(|s| s.to_string()).collect()).collect(),
            fetch: fetch.iter().map(|s| s.to_string()).collect(),
            from: None,
        }
    }

    fn site(deliveries: &[(&str, &str, &str)]) -> Site {
        let mut site = Site::current_dir(&std::env::temp_dir()).unwrap();
        for (name, stdin, program) in deliveries {
            site.deliveries.insert(
                name.to_string(),
                crate::site::Delivery { stdin: stdin.to_string(), programs: vec![program.to_string()] },
            );
        }
        site
    }

    #[test]
    fn fixed_grants_become_exact_lines_and_patterns_none() {
        let h = host(&[&["/home/b/dbbackup.sh"]], &["/home/b/userdb.tgz"]);
        let fetch =
            quote::command_line(&["sh", "-c", crate::transport::FETCH_SCRIPT, "offsite-fetch", "/home/b/userdb.tgz"])
                .unwrap();
        assert_eq!(
            fixed_lines(&site(&[]), &h).unwrap(),
            vec![
                Allowed { line: "'/home/b/dbbackup.sh'".to_string(), stdin: Stdin::Secret(vec![]) },
                Allowed { line: fetch, stdin: Stdin::Pass },
            ]
        );
        assert!(fixed_lines(&site(&[]), &host(&[&["mysqldump", "sitedb", "tbl_*..."]], &[])).is_none());
        assert!(fixed_lines(&site(&[]), &host(&[], &["/var/backups/*.tgz"])).is_none());
    }

    /// Only a template whose slot is one quoted option value can be checked.
    #[test]
    fn a_secret_slot_must_be_a_quoted_value_ending_its_line() {
        for good in
            ["[client]\npassword=\"{secret}\"\n", "password = \"{secret}\"", "[x]\n  pass_word=\"{secret}\"\n[y]\n"]
        {
            assert!(SecretSlot::of(good).is_some(), "{good:?}");
        }
        for bad in [
            "[client]\n{secret}\n",
            "[client]\npassword={secret}\n",
            "password=\"{secret}\" host=x\n",
            "password=\"{secret}\"\npassword2=\"{secret}\"\n",
            "{secret}",
            "=\"{secret}\"",
            "pass word=\"{secret}\"",
        ] {
            assert!(SecretSlot::of(bad).is_none(), "{bad:?}");
        }
    }

    /// A secret whose template a gate cannot check is named for the hosts
    /// whose granted programs it goes to, and only there.
    #[test]
    fn unchecked_secrets_are_named_where_they_are_sent() {
        let site = site(&[("bad", "[client]\n{secret}\n", "mysqldump"), ("good", "p=\"{secret}\"", "mysqldump")]);
        assert_eq!(unchecked_secrets(&site, &host(&[&["mysqldump", "db"]], &[])), ["bad"]);
        assert!(unchecked_secrets(&site, &host(&[&["pg_dump", "db"]], &[])).is_empty());
        let line = fixed_lines(&site, &host(&[&["mysqldump", "db"]], &[])).unwrap();
        assert_eq!(line[0].stdin, Stdin::Secret(vec![SecretSlot::of("p=\"{secret}\"").unwrap()]), "only the good one");
    }

    /// Runs a gate as sshd would: the login shell `shell` with `-c` and the
    /// forced command, `SSH_ORIGINAL_COMMAND` set and `input` on stdin.
    fn through(shell: &str, gate: &str, cmd: &str, input: &[u8]) -> std::process::Output {
        use std::io::Write;
        let mut child = std::process::Command::new(shell)
            .arg("-c")
            .arg(gate)
            .env("SSH_ORIGINAL_COMMAND", cmd)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(input);
        drop(stdin);
        child.wait_with_output().unwrap()
    }

    #[test]
    fn the_gate_accepts_exactly_the_granted_lines() {
        let lines = vec![
            Allowed { line: "'echo' 'it'\\''s \"fine\"'".to_string(), stdin: Stdin::Secret(vec![]) },
            Allowed { line: "'true'".to_string(), stdin: Stdin::Secret(vec![]) },
        ];
        let script = gate(&lines);
        let run = |cmd: &str| through("sh", &script, cmd, b"");
        let ok = run(&lines[0].line);
        assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
        assert_eq!(String::from_utf8_lossy(&ok.stdout), "it's \"fine\"\n");
        assert!(run("'true'").status.success());
        for bad in ["'true' ; id", "'true' 'x'", "id", "'echo' 'it'", "", "offsite-gate"] {
            let out = run(bad);
            assert_eq!(out.status.code(), Some(126), "{bad:?} must be refused");
            assert!(out.stdout.is_empty());
        }
        // The probe, as the runner quotes it, is answered with the gate's
        // digest and runs nothing.
        let probe = quote::command_line(&[GATE_PROBE]).unwrap();
        let out = run(&probe);
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{GATE_PROBE} {}\n", gate_digest(&lines)));
        let out = through("sh", &gate(&[]), &probe, b"");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{GATE_PROBE} {}\n", gate_digest(&[])));
    }

    /// A granted line reads on stdin nothing, or exactly what the site
    /// sends with a secret: the template with a value in its slot. An
    /// option file of the key holder's own never reaches the program.
    #[test]
    fn the_gate_admits_only_the_sites_secret_text_on_stdin() {
        let template = "[client]\npassword=\"{secret}\"\n";
        let site = site(&[("db", template, "cat")]);
        let h = host(&[&["cat"], &["wc", "-c"]], &[]);
        let lines = fixed_lines(&site, &h).unwrap();
        let script = gate(&lines);
        let cat = "'cat'";
        let sent = template.replace("{secret}", "s3cr3t !#%&()*+,./:;<=>?@^_{|}~-X");
        let out = through("sh", &script, cat, sent.as_bytes());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout, sent.as_bytes(), "the site's text arrives whole");
        // No stdin at all: the program runs with it closed.
        let out = through("sh", &script, cat, b"");
        assert!(out.status.success());
        assert!(out.stdout.is_empty());
        let hostile = [
            "[client]\nresult-file=/tmp/x\n".to_string(),
            "[client]\npassword=\"x\"\nresult-file=\"/tmp/x\"\n".to_string(),
            "[client]\npassword=\"x\"\nhost=\"evil\"\n".to_string(),
            template.replace("{secret}", "x\"\nhost=\"evil"),
            template.replace("{secret}", "x\\"),
            template.replace("{secret}", "$(id)"),
            template.replace("{secret}", "a\nb"),
            template.replace("{secret}", ""),
            template.replace("{secret}", &"x".repeat(crate::site::MAX_SECRET_BYTES + 1)),
            format!("{}extra", template.replace("{secret}", "x")),
            template.replace("[client]", "[mysqldump]").replace("{secret}", "x"),
        ];
        for input in &hostile {
            let out = through("sh", &script, cat, input.as_bytes());
            assert_eq!(out.status.code(), Some(126), "{input:?} must be refused");
            assert!(out.stdout.is_empty(), "{input:?} reached the program");
        }
        // A line whose program gets no secret reads nothing.
        let out = through("sh", &script, "'wc' '-c'", b"[client]\npassword=\"x\"\n");
        assert_eq!(out.status.code(), Some(126));
        let out = through("sh", &script, "'wc' '-c'", b"");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    }

    /// sshd starts the forced command with the account's login shell: the
    /// gate reads the same in each, fish included.
    #[test]
    fn the_gate_works_under_every_login_shell() {
        let template = "[client]\npassword=\"{secret}\"\n";
        let lines = fixed_lines(&site(&[("db", template, "cat")]), &host(&[&["cat"]], &[])).unwrap();
        let script = gate(&lines);
        assert!(!script.contains('\\'));
        let sent = template.replace("{secret}", "pw");
        for shell in ["sh", "bash", "dash", "zsh", "fish"] {
            if std::process::Command::new(shell).arg("-c").arg("true").output().is_err() {
                assert!(std::env::var_os("CI").is_none(), "{shell} is missing (CI installs every shell)");
                continue;
            }
            let out = through(shell, &script, "'cat'", sent.as_bytes());
            assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(out.stdout, sent.as_bytes(), "{shell}");
            let out = through(shell, &script, "'cat'", b"[client]\nresult-file=/tmp/x\n");
            assert_eq!(out.status.code(), Some(126), "{shell}");
            let out = through(shell, &script, "id", b"");
            assert_eq!(out.status.code(), Some(126), "{shell}");
        }
    }

    #[test]
    fn escaping_for_authorized_keys() {
        assert_eq!(escape(r#"a "b" \c"#), r#"a \"b\" \c"#);
    }
}
