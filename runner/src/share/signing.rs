//! Script signatures: SSHSIG (the format of `ssh-keygen -Y sign`) over the
//! component's bytes, in the namespace `offsite-script`, checked against an
//! OpenSSH `allowed_signers` file.
//!
//! A signature made here is exactly what
//! `ssh-keygen -Y sign -n offsite-script -f KEY FILE.wasm` makes, and
//! `ssh-keygen -Y verify -n offsite-script -f allowed_signers -I SIGNER
//! -s FILE.wasm.sig < FILE.wasm` checks it. Signing runs `ssh-keygen`, so
//! keys with a passphrase and keys held by an agent work as they do for
//! `ssh`; checking is done here, so a run does not start a process for it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};

/// The SSHSIG namespace of script signatures.
pub const NAMESPACE: &str = "offsite-script";

/// Largest signature file read (an armored SSHSIG of an RSA-16384 key is
/// under 4 KiB).
pub const MAX_SIGNATURE: u64 = 16 * 1024;

/// Largest allowed_signers file read.
const MAX_SIGNERS_FILE: u64 = 4 * 1024 * 1024;

/// The first line of a signed statement.
pub const STATEMENT_HEADER: &str = "offsite script statement v1";

/// What a signature of a published script says: this component is
/// NAME VERSION of this repository, signed at this time. A signature over
/// the bytes alone says nothing of where they belong, so a registry writer
/// could move a tag to any build the key ever signed, under any name.
///
/// The statement is the SSHSIG's message; stored, it comes before the
/// armored signature (see [`split`]), so `ssh-keygen -Y verify` checks the
/// statement once the two are cut apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The component's SHA-256, hex.
    pub component: String,
    /// `REGISTRY/REPOSITORY`.
    pub repository: String,
    pub name: String,
    pub version: String,
    /// When it was signed (RFC 3339, UTC).
    pub signed: String,
}

impl Statement {
    /// The exact text signed: one `key value` line each, in this order.
    pub fn text(&self) -> String {
        format!(
            "{STATEMENT_HEADER}\ncomponent sha256:{}\nrepository {}\nname {}\nversion {}\nsigned {}\n",
            self.component, self.repository, self.name, self.version, self.signed
        )
    }

    /// Reads a statement written by [`Statement::text`], and nothing else.
    pub fn parse(text: &str) -> Result<Statement, String> {
        let mut lines = text.strip_suffix('\n').ok_or("a statement ends with a newline")?.split('\n');
        if lines.next() != Some(STATEMENT_HEADER) {
            return Err("not an offsite script statement".into());
        }
        let mut field = |key: &str| -> Result<String, String> {
            let line = lines.next().ok_or_else(|| format!("the statement has no {key}"))?;
            let value = line.strip_prefix(key).and_then(|v| v.strip_prefix(' ')).ok_or_else(|| {
                format!("the statement's line {:?} is not its {key}", crate::text::truncate(line, 80))
            })?;
            if value.is_empty() || value.chars().any(char::is_control) {
                return Err(format!("the statement's {key} is empty or holds a control character"));
            }
            Ok(value.to_string())
        };
        let component = field("component")?;
        let component = component.strip_prefix("sha256:").ok_or("the statement's component is not sha256")?.to_string();
        let statement = Statement {
            component,
            repository: field("repository")?,
            name: field("name")?,
            version: field("version")?,
            signed: field("signed")?,
        };
        if lines.next().is_some() {
            return Err("the statement has more lines than it should".into());
        }
        Ok(statement)
    }

    /// Makes one for `component` now.
    pub fn now(component: &[u8], repository: &str, name: &str, version: &str) -> Statement {
        use sha2::Digest;
        Statement {
            component: hex::encode(sha2::Sha256::digest(component)),
            repository: repository.to_string(),
            name: name.to_string(),
            version: version.to_string(),
            signed: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }
}

/// A stored signature cut into its statement (none for a signature over
/// the component's bytes alone) and its armored SSHSIG.
pub fn split(stored: &[u8]) -> (Option<&[u8]>, &[u8]) {
    const ARMOR: &[u8] = b"-----BEGIN SSH SIGNATURE-----";
    match stored.windows(ARMOR.len()).position(|w| w == ARMOR) {
        Some(0) | None => (None, stored),
        Some(at) => (Some(&stored[..at]), &stored[at..]),
    }
}

/// Signs `statement` with `key`: the stored form, statement then signature.
pub fn sign_statement(key: &Path, statement: &Statement) -> Result<Vec<u8>> {
    let text = statement.text();
    let mut stored = text.clone().into_bytes();
    stored.extend_from_slice(&sign(key, text.as_bytes())?);
    Ok(stored)
}

/// Who signed a script, as the allowed_signers file names them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Signer {
    /// The principal(s) of the allowed_signers line that matched.
    pub principal: String,
    /// `SHA256:...` of the signing key.
    pub fingerprint: String,
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.principal, self.fingerprint)
    }
}

/// One line of an allowed_signers file.
#[derive(Debug, Clone)]
struct Entry {
    principals: String,
    cert_authority: bool,
    namespaces: Option<Vec<String>>,
    valid_after: Option<DateTime<Utc>>,
    valid_before: Option<DateTime<Utc>>,
    key: ssh_key::public::KeyData,
}

/// A parsed allowed_signers file.
#[derive(Debug, Clone)]
pub struct AllowedSigners {
    pub file: PathBuf,
    entries: Vec<Entry>,
}

impl AllowedSigners {
    /// Reads `file` (OpenSSH's ALLOWED SIGNERS format). A line that cannot
    /// be read is an error naming it: a typo must not silently drop a key.
    pub fn load(file: &Path) -> Result<AllowedSigners> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(file)
            .and_then(|f| f.take(MAX_SIGNERS_FILE).read_to_string(&mut text))
            .with_context(|| format!("cannot read the allowed signers file {}", file.display()))?;
        AllowedSigners::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<AllowedSigners> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let entry = parse_line(line).with_context(|| format!("{}:{}", file.display(), n + 1))?;
            entries.push(entry);
        }
        Ok(AllowedSigners { file: file.to_path_buf(), entries })
    }

    /// Checks the stored `signatures` of the component `bytes`: the first
    /// that passes gives the signer and its statement. A signature with a
    /// statement must name these bytes and, for a script from a registry,
    /// its `repository` (`REGISTRY/REPOSITORY`); one over the bytes alone
    /// is accepted only for a local file, since it binds no repository.
    pub fn verify_script(
        &self,
        bytes: &[u8],
        repository: Option<&str>,
        signatures: &[Vec<u8>],
    ) -> Result<(Signer, usize, Option<Statement>), String> {
        use sha2::Digest;
        if signatures.is_empty() {
            return Err(format!("the script is not signed (signers are checked against {})", self.file.display()));
        }
        let component = hex::encode(sha2::Sha256::digest(bytes));
        let mut why = Vec::new();
        for (i, stored) in signatures.iter().enumerate() {
            let (statement, armored) = split(stored);
            let checked = match statement {
                Some(text) => {
                    let text = String::from_utf8_lossy(text);
                    Statement::parse(&text).and_then(|st| {
                        if st.component != component {
                            return Err(format!(
                                "a statement for another component (sha256:{}) came with this one",
                                crate::text::truncate(&st.component, 64)
                            ));
                        }
                        if let Some(repo) = repository
                            && st.repository != repo
                        {
                            return Err(format!(
                                "signed for {}, not {repo}: a signature moved from elsewhere",
                                crate::text::escape(&crate::text::truncate(&st.repository, 200))
                            ));
                        }
                        self.verify(text.as_bytes(), armored, Utc::now()).map(|s| (s, Some(st)))
                    })
                }
                None if repository.is_some() => Err(format!(
                    "{} signed the bytes alone, which binds no repository, name or version: sign it again with \
                     `offsite script sign REF --key KEY`",
                    signature_key(armored).unwrap_or_else(|| "a key".into())
                )),
                None => self.verify(bytes, armored, Utc::now()).map(|s| (s, None)),
            };
            match checked {
                Ok((signer, statement)) => return Ok((signer, i, statement)),
                Err(e) => why.push(e),
            }
        }
        Err(format!("no signature is from an allowed signer in {}: {}", self.file.display(), why.join("; ")))
    }

    /// Checks `signatures` of `message`: the first one by a listed key,
    /// in our namespace, that verifies gives the signer. Otherwise the
    /// error says, for each signature, whose it was and why it failed.
    pub fn verify_any(&self, message: &[u8], signatures: &[Vec<u8>]) -> Result<Signer, String> {
        self.verify_first(message, signatures).map(|(signer, _)| signer)
    }

    /// Like [`AllowedSigners::verify_any`], also saying which signature
    /// passed (its index in `signatures`).
    pub fn verify_first(&self, message: &[u8], signatures: &[Vec<u8>]) -> Result<(Signer, usize), String> {
        if signatures.is_empty() {
            return Err(format!("the script is not signed (signers are checked against {})", self.file.display()));
        }
        let mut why = Vec::new();
        for (i, sig) in signatures.iter().enumerate() {
            match self.verify(message, sig, Utc::now()) {
                Ok(s) => return Ok((s, i)),
                Err(e) => why.push(e),
            }
        }
        Err(format!("no signature is from an allowed signer in {}: {}", self.file.display(), why.join("; ")))
    }

    fn verify(&self, message: &[u8], armored: &[u8], now: DateTime<Utc>) -> Result<Signer, String> {
        let sig = ssh_key::SshSig::from_pem(armored).map_err(|e| format!("a signature cannot be read ({e})"))?;
        let fingerprint = sig.public_key().fingerprint(ssh_key::HashAlg::Sha256).to_string();
        if sig.namespace() != NAMESPACE {
            return Err(format!(
                "the signature by {fingerprint} is for namespace {:?}, not {NAMESPACE:?}",
                crate::text::truncate(sig.namespace(), 64)
            ));
        }
        let listed: Vec<&Entry> =
            self.entries.iter().filter(|e| !e.cert_authority && e.key == *sig.public_key()).collect();
        if listed.is_empty() {
            return Err(format!("signed by {fingerprint}, a key not listed"));
        }
        let Some(entry) = listed.iter().find(|e| {
            e.namespaces.as_ref().is_none_or(|ns| ns.iter().any(|n| n == NAMESPACE))
                && e.valid_after.is_none_or(|t| now >= t)
                && e.valid_before.is_none_or(|t| now < t)
        }) else {
            return Err(format!(
                "signed by {} ({fingerprint}), whose line does not allow namespace {NAMESPACE:?} now",
                listed[0].principals
            ));
        };
        let key = ssh_key::PublicKey::from(sig.public_key().clone());
        key.verify(NAMESPACE, message, &sig).map_err(|_| {
            format!("the signature by {} ({fingerprint}) is over another build, not this script", entry.principals)
        })?;
        Ok(Signer { principal: entry.principals.clone(), fingerprint })
    }
}

/// The fingerprint of a signature's key, for listings.
pub fn signature_key(stored: &[u8]) -> Option<String> {
    let sig = ssh_key::SshSig::from_pem(split(stored).1).ok()?;
    Some(sig.public_key().fingerprint(ssh_key::HashAlg::Sha256).to_string())
}

/// Signs `message` with `ssh-keygen -Y sign` and the key `key` (a private
/// key file, or the public half of a key held by the agent), as
/// `ssh-keygen` would for a file. Returns the armored signature.
pub fn sign(key: &Path, message: &[u8]) -> Result<Vec<u8>> {
    if !key.exists() {
        bail!("the signing key {} does not exist", key.display());
    }
    let mut child = Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", NAMESPACE, "-f"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start ssh-keygen (install openssh-client)")?;
    let mut stdin = child.stdin.take().expect("piped");
    let message = message.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&message));
    let out = child.wait_with_output().context("ssh-keygen -Y sign")?;
    let _ = writer.join();
    if !out.status.success() {
        bail!(
            "ssh-keygen could not sign with {}: {}",
            key.display(),
            crate::text::escape(String::from_utf8_lossy(&out.stderr).trim())
        );
    }
    if ssh_key::SshSig::from_pem(&out.stdout).is_err() {
        bail!("ssh-keygen -Y sign printed something that is not a signature");
    }
    Ok(out.stdout)
}

fn parse_line(line: &str) -> Result<Entry> {
    let mut rest = line;
    let principals = next_field(&mut rest).context("no principals")?;
    let mut field = next_field(&mut rest).context("no key")?;
    let (mut cert_authority, mut namespaces, mut valid_after, mut valid_before) = (false, None, None, None);
    if field.parse::<ssh_key::Algorithm>().is_err() {
        // Options come before the key type.
        for opt in split_options(&field) {
            let (name, value) = match opt.split_once('=') {
                Some((n, v)) => (n.to_ascii_lowercase(), Some(v.trim_matches('"').to_string())),
                None => (opt.to_ascii_lowercase(), None),
            };
            match (name.as_str(), value) {
                ("cert-authority", None) => cert_authority = true,
                ("namespaces", Some(v)) => namespaces = Some(v.split(',').map(str::to_string).collect()),
                ("valid-after", Some(v)) => valid_after = Some(timestamp(&v)?),
                ("valid-before", Some(v)) => valid_before = Some(timestamp(&v)?),
                (other, _) => bail!("unknown option {other:?}"),
            }
        }
        field = next_field(&mut rest).context("no key after the options")?;
    }
    let data = next_field(&mut rest).context("no key data after the key type")?;
    let key = ssh_key::PublicKey::from_openssh(&format!("{field} {data}"))
        .map_err(|e| anyhow::anyhow!("the key cannot be read: {e}"))?;
    Ok(Entry { principals, cert_authority, namespaces, valid_after, valid_before, key: key.key_data().clone() })
}

/// The next whitespace-separated field; double quotes group (as in
/// `namespaces="a,b"` or a quoted principal list).
fn next_field(rest: &mut &str) -> Option<String> {
    let s = rest.trim_start();
    if s.is_empty() {
        return None;
    }
    let mut quoted = false;
    let mut end = s.len();
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    *rest = &s[end..];
    let field = &s[..end];
    Some(if field.starts_with('"') && field.ends_with('"') && field.len() >= 2 {
        field[1..field.len() - 1].to_string()
    } else {
        field.to_string()
    })
}

fn split_options(field: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    for c in field.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                out.last_mut().unwrap().push(c);
            }
            ',' if !quoted => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out
}

/// `YYYYMMDD[Z]` or `YYYYMMDDHHMM[SS][Z]`: UTC with `Z`, local time otherwise.
fn timestamp(v: &str) -> Result<DateTime<Utc>> {
    let (digits, utc) = match v.strip_suffix(['Z', 'z']) {
        Some(d) => (d, true),
        None => (v, false),
    };
    let naive = match digits.len() {
        8 => NaiveDate::parse_from_str(digits, "%Y%m%d").map(|d| d.and_hms_opt(0, 0, 0).expect("midnight")),
        12 => NaiveDateTime::parse_from_str(digits, "%Y%m%d%H%M"),
        14 => NaiveDateTime::parse_from_str(digits, "%Y%m%d%H%M%S"),
        _ => bail!("{v:?} is not a time (YYYYMMDD[Z] or YYYYMMDDHHMM[SS][Z])"),
    }
    .with_context(|| format!("{v:?} is not a time"))?;
    if utc {
        Ok(Utc.from_utc_datetime(&naive))
    } else {
        chrono::Local
            .from_local_datetime(&naive)
            .earliest()
            .map(|t| t.with_timezone(&Utc))
            .with_context(|| format!("{v:?} does not exist in the local time zone"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_check_against_principal_namespace_time_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, alice_pub) = offsite_testkit::ssh_keypair(dir.path(), "alice");
        let (mallory, _) = offsite_testkit::ssh_keypair(dir.path(), "mallory");
        let script = b"\0asm pretend component".to_vec();
        let good = sign(&alice, &script).unwrap();
        let file = dir.path().join("allowed_signers");
        let signers = AllowedSigners::parse(&file, &format!("# team\nalice@example.org {alice_pub}\n")).unwrap();
        let who = signers.verify_any(&script, std::slice::from_ref(&good)).unwrap();
        assert_eq!(who.principal, "alice@example.org");
        assert!(who.fingerprint.starts_with("SHA256:"));

        let other_build = signers.verify_any(b"\0asm another build", std::slice::from_ref(&good)).unwrap_err();
        assert!(other_build.contains("over another build"), "{other_build}");
        let unknown = signers.verify_any(&script, &[sign(&mallory, &script).unwrap()]).unwrap_err();
        assert!(unknown.contains("a key not listed") && unknown.contains("allowed_signers"), "{unknown}");
        assert!(signers.verify_any(&script, &[]).unwrap_err().contains("not signed"));
        // The first good signature wins over bad ones.
        assert!(signers.verify_any(&script, &[sign(&mallory, &script).unwrap(), good.clone()]).is_ok());

        let git_only =
            AllowedSigners::parse(&file, &format!("alice@example.org namespaces=\"git\" {alice_pub}\n")).unwrap();
        assert!(git_only.verify_any(&script, std::slice::from_ref(&good)).unwrap_err().contains("namespace"));
        let expired =
            AllowedSigners::parse(&file, &format!("alice@example.org valid-before=20200101Z {alice_pub}\n")).unwrap();
        assert!(expired.verify_any(&script, std::slice::from_ref(&good)).is_err());
        let both = AllowedSigners::parse(
            &file,
            &format!(
                "alice@example.org,ops@example.org namespaces=\"git,offsite-script\",valid-after=20200101 {alice_pub}\n"
            ),
        )
        .unwrap();
        assert_eq!(both.verify_any(&script, &[good]).unwrap().principal, "alice@example.org,ops@example.org");
    }

    /// A published script's signature is over a statement binding its
    /// component to a repository, name and version: moved to another
    /// repository it fails, and one over the bytes alone binds nothing, so
    /// it passes for a local file only.
    #[test]
    fn statements_bind_a_signature_to_its_repository() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, alice_pub) = offsite_testkit::ssh_keypair(dir.path(), "alice");
        let signers =
            AllowedSigners::parse(&dir.path().join("s"), &format!("alice@example.org {alice_pub}\n")).unwrap();
        let script = b"\0asm pretend component".to_vec();
        let st = Statement::now(&script, "reg.example:5000/backup/mysql-pull", "mysql-pull", "0.2.0");
        assert_eq!(Statement::parse(&st.text()).unwrap(), st);
        let stored = sign_statement(&alice, &st).unwrap();
        let (text, armored) = split(&stored);
        assert_eq!(text.unwrap(), st.text().as_bytes());
        assert!(armored.starts_with(b"-----BEGIN SSH SIGNATURE-----"));

        let repo = Some("reg.example:5000/backup/mysql-pull");
        let (who, i, found) = signers.verify_script(&script, repo, std::slice::from_ref(&stored)).unwrap();
        assert_eq!((who.principal.as_str(), i, found.as_ref()), ("alice@example.org", 0, Some(&st)));
        // The same signature on another repository's tag.
        let moved = signers
            .verify_script(&script, Some("reg.example:5000/backup/dump-everything"), std::slice::from_ref(&stored))
            .unwrap_err();
        assert!(moved.contains("signed for reg.example:5000/backup/mysql-pull, not"), "{moved}");
        // Another component under this statement.
        let other = signers.verify_script(b"\0asm other", repo, std::slice::from_ref(&stored)).unwrap_err();
        assert!(other.contains("another component"), "{other}");
        // A statement edited after signing.
        let forged = String::from_utf8(stored.clone()).unwrap().replace("0.2.0", "9.9.9").into_bytes();
        assert!(signers.verify_script(&script, repo, &[forged]).unwrap_err().contains("over another build"));
        // A signature over the bytes alone: a local file's, not a registry's.
        let bare = sign(&alice, &script).unwrap();
        let refused = signers.verify_script(&script, repo, std::slice::from_ref(&bare)).unwrap_err();
        assert!(refused.contains("signed the bytes alone"), "{refused}");
        assert!(signers.verify_script(&script, None, &[bare]).is_ok());
        // Statements are read strictly.
        for bad in [
            st.text().replace("version 0.2.0\n", ""),
            st.text().replace("name mysql-pull", "name mysql\u{1b}pull"),
            format!("{}extra line\n", st.text()),
            st.text().trim_end().to_string(),
        ] {
            assert!(Statement::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_allowed_signers_line_is_an_error_naming_it() {
        for bad in ["alice", "alice ssh-ed25519", "alice bogus-opt ssh-ed25519 AAAA", "alice ssh-ed25519 !!!"] {
            let e = AllowedSigners::parse(Path::new("/etc/offsite/allowed_signers"), bad).unwrap_err();
            assert!(format!("{e:#}").contains("allowed_signers:1"), "{bad}: {e:#}");
        }
    }
}
