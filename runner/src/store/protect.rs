//! At-rest protection, optional per site: outputs encrypted to age
//! recipients as they are written (age's STREAM format, 64 KiB chunks, so
//! memory stays flat), and manifests signed with an ed25519 SSH key in the
//! SSHSIG format, which `ssh-keygen -Y verify` checks as well as `offsite
//! verify`.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};

/// The namespace of manifest signatures (`ssh-keygen -Y verify -n`).
pub const NAMESPACE: &str = "offsite-manifest";

/// The suffix of encrypted files and of manifest signatures.
pub const AGE_SUFFIX: &str = ".age";
pub const SIG_SUFFIX: &str = ".sig";

/// Parses age recipients (`age1...`): a list, plus a file with one per
/// line (`#` comments and blank lines allowed, as `age -R` reads it).
pub fn recipients(list: &[String], file: Option<&Path>) -> Result<Vec<age::x25519::Recipient>> {
    let mut texts: Vec<String> = list.to_vec();
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        texts.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
    }
    texts.iter().map(|t| t.parse().map_err(|e| anyhow!("{t:?} is not an age recipient (age1...): {e}"))).collect()
}

/// Reads the manifest signing key: an unencrypted ed25519 key in OpenSSH
/// format that only its owner can read.
pub fn signing_key(path: &Path) -> Result<ssh_key::PrivateKey> {
    if let Err(crate::transport::TransportError::Config { detail, .. }) =
        crate::transport::check_key_file("signing_key", path)
    {
        bail!("{}", detail.replace("identity file", "signing key"));
    }
    let key = ssh_key::PrivateKey::read_openssh_file(path)
        .map_err(|e| anyhow!("cannot read the signing key {}: {e}", path.display()))?;
    if key.algorithm() != ssh_key::Algorithm::Ed25519 {
        bail!(
            "signing key {} is {}, not ed25519 (make one with: ssh-keygen -t ed25519)",
            path.display(),
            key.algorithm()
        );
    }
    if key.is_encrypted() {
        bail!(
            "signing key {} has a passphrase; offsite signs unattended, so it needs a key without one, \
             readable by its owner only",
            path.display()
        );
    }
    Ok(key)
}

/// Reads a public key (`ssh-ed25519 AAAA... comment`).
pub fn verify_key(path: &Path) -> Result<ssh_key::PublicKey> {
    ssh_key::PublicKey::read_openssh_file(path)
        .map_err(|e| anyhow!("cannot read the public key {}: {e}", path.display()))
}

/// An armored SSHSIG signature of `message`.
pub fn sign(key: &ssh_key::PrivateKey, message: &[u8]) -> std::io::Result<Vec<u8>> {
    let sig = key
        .sign(NAMESPACE, ssh_key::HashAlg::Sha512, message)
        .and_then(|s| s.to_pem(ssh_key::LineEnding::LF))
        .map_err(|e| std::io::Error::other(format!("cannot sign the manifest: {e}")))?;
    Ok(sig.into_bytes())
}

/// Checks an armored signature of `message`.
pub fn verify(key: &ssh_key::PublicKey, message: &[u8], signature: &[u8]) -> Result<(), String> {
    let sig = ssh_key::SshSig::from_pem(signature).map_err(|e| format!("the signature cannot be read: {e}"))?;
    key.verify(NAMESPACE, message, &sig).map_err(|e| format!("the signature does not verify: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_the_signed_bytes_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("k");
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "t", "-f"])
            .arg(&key_file)
            .status()
            .unwrap();
        assert!(made.success());
        let key = signing_key(&key_file).unwrap();
        let public = verify_key(&key_file.with_extension("pub")).unwrap();
        let sig = sign(&key, b"manifest").unwrap();
        verify(&public, b"manifest", &sig).unwrap();
        assert!(verify(&public, b"manifest!", &sig).is_err());
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        assert!(signing_key(&key_file).unwrap_err().to_string().contains("others can read it"));
    }

    #[test]
    fn recipients_are_checked() {
        assert!(recipients(&["age1nope".into()], None).is_err());
        let id = age::x25519::Identity::generate();
        let r = recipients(&[id.to_public().to_string()], None).unwrap();
        assert_eq!(r.len(), 1);
    }
}
