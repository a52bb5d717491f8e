//! `offsite script ...`: push, pull, list, sign and verify shared scripts.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::Subcommand;

use super::cache::{MAX_SCRIPT_BYTES, ScriptCache};
use super::reference::{OciRef, ScriptSource};
use super::registry::{Registry, ScriptMeta};
use super::resolve::{self, Fetched};
use super::signing::{self, AllowedSigners};
use crate::exit::{Exit, ExitContext, Failure};

#[derive(Subcommand)]
pub enum ScriptCommand {
    /// Publish a script to a registry (a standard wasm OCI artifact) and
    /// print its digest reference.
    #[command(
        after_help = "Examples:\n  offsite script push mysql-pull.wasm oci://registry.example.org/backup/mysql-pull:1.2 --sign ~/.ssh/id_ed25519"
    )]
    Push {
        /// The script component (.wasm).
        file: PathBuf,
        /// Where to: oci://REGISTRY/REPOSITORY:TAG.
        reference: String,
        /// Also sign it with this SSH key (a private key file, or the .pub
        /// of a key in your agent).
        #[arg(long, value_name = "KEY")]
        sign: Option<PathBuf>,
    },
    /// Fetch a script into the local script store and print its digest.
    #[command(after_help = "Examples:\n  offsite script pull oci://registry.example.org/backup/mysql-pull:1.2")]
    Pull {
        /// oci://REGISTRY/REPOSITORY:TAG or ...@sha256:DIGEST.
        reference: String,
    },
    /// List the scripts in the local script store.
    #[command(after_help = "Examples:\n  offsite script ls")]
    Ls,
    /// Sign a script: FILE.wasm gets FILE.wasm.sig beside it; a registry
    /// script gets the signature pushed beside it.
    #[command(
        after_help = "Examples:\n  offsite script sign mysql-pull.wasm --key ~/.ssh/id_ed25519\n  offsite script sign oci://registry.example.org/backup/mysql-pull:1.2 --key ~/.ssh/id_ed25519.pub   # a key in your agent"
    )]
    Sign {
        /// FILE.wasm or oci://REGISTRY/REPOSITORY:TAG.
        script: String,
        /// The SSH key to sign with (a private key file, or the .pub of a
        /// key in your agent).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
    },
    /// Pin a site's registry tag: resolve it, pull, check the signers,
    /// show what the new version would do on the site, and record its
    /// digest in SITE.lock (refused, changing nothing, when it asks for
    /// calls the site does not grant or is not signed as the site requires).
    #[command(after_help = "Examples:\n  offsite script update /etc/offsite/db1.toml")]
    Update {
        /// The site file whose `script` is an oci:// tag.
        site: PathBuf,
        /// Take the tag's version even when it is older than the recorded
        /// one, or another script.
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// What would NEW do on a site that OLD does not? Declared metadata and
    /// the calls each makes in a dry run (no server is contacted); exit 1
    /// when NEW asks for calls the site does not grant.
    #[command(
        after_help = "Examples:\n  offsite script diff oci://registry.example.org/backup/mysql-pull:1.2 oci://registry.example.org/backup/mysql-pull:1.3 --site /etc/offsite/db1.toml"
    )]
    Diff {
        /// FILE.wasm or oci://... (the version now).
        old: String,
        /// FILE.wasm or oci://... (the candidate).
        new: String,
        /// The site both would run on.
        #[arg(long)]
        site: PathBuf,
    },
    /// Check a script's signatures against an allowed_signers file; exit 2
    /// when none is by a listed key.
    #[command(
        after_help = "Examples:\n  offsite script verify oci://registry.example.org/backup/mysql-pull:1.2 --signers /etc/offsite/allowed_signers"
    )]
    Verify {
        /// FILE.wasm or oci://REGISTRY/REPOSITORY:TAG.
        script: String,
        /// OpenSSH allowed_signers file (default:
        /// $OFFSITE_CONFIG_DIR/allowed_signers, else /etc/offsite/allowed_signers).
        #[arg(long, value_name = "FILE")]
        signers: Option<PathBuf>,
    },
}

pub fn main(cmd: ScriptCommand) -> Result<(), Failure> {
    match cmd {
        ScriptCommand::Push { file, reference, sign } => push(&file, &reference, sign.as_deref()),
        ScriptCommand::Pull { reference } => pull(&reference),
        ScriptCommand::Ls => ls(),
        ScriptCommand::Sign { script, key } => sign_script(&script, &key),
        ScriptCommand::Verify { script, signers } => verify(&script, signers),
        ScriptCommand::Update { site, allow_downgrade } => update(&site, allow_downgrade),
        ScriptCommand::Diff { old, new, site } => diff(&old, &new, &site),
    }
}

fn oci(text: &str) -> Result<OciRef, Failure> {
    text.parse::<OciRef>().exit(Exit::Usage)
}

fn cache() -> Result<ScriptCache, Failure> {
    ScriptCache::open_default().exit(Exit::Usage)
}

/// What a script declares, for the artifact's annotations and config.
pub fn meta_of(bytes: &[u8], path: &Path) -> Result<ScriptMeta, Failure> {
    let runtime = crate::exit::runtime()?;
    let script = runtime.load_bytes(path, bytes).exit(Exit::Usage)?;
    let info = crate::run::describe(&runtime, &script)?;
    let ty = script.component.component_type();
    Ok(ScriptMeta {
        name: info.name,
        version: info.version,
        description: info.description,
        imports: ty.imports(runtime.engine()).map(|(n, _)| n.to_string()).collect(),
        exports: ty.exports(runtime.engine()).map(|(n, _)| n.to_string()).collect(),
    })
}

fn push(file: &Path, reference: &str, sign: Option<&Path>) -> Result<(), Failure> {
    let r = oci(reference)?;
    if r.digest.is_some() {
        return Err(anyhow!("push to a tag (oci://REGISTRY/REPOSITORY:TAG); the digest is what push prints"))
            .exit(Exit::Usage);
    }
    let fetched = resolve::fetch_file(file).exit(Exit::Usage)?;
    // Only a script that loads and describes itself is published.
    let meta = meta_of(&fetched.bytes, file)?;
    let signature = sign.map(|key| sign_for(&r, key, &fetched.bytes, &meta)).transpose()?;
    let cache = cache()?;
    let registry = Registry::connect(&r.registry).exit(Exit::Usage)?;
    let manifest = registry.push(&cache, &r, &fetched.bytes, &meta, signature.as_deref()).exit(Exit::BackupFailed)?;
    if let Some(sig) = &signature {
        cache
            .add_signature(&hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&fetched.bytes)), sig)
            .exit(Exit::Usage)?;
    }
    crate::outln!("{}", r.pinned(&manifest));
    Ok(())
}

/// A signature for `component` as published at `r`: over a statement of
/// which script, version and repository these bytes are, so it cannot be
/// moved to another repository or stand for another name.
fn sign_for(r: &OciRef, key: &Path, component: &[u8], meta: &ScriptMeta) -> Result<Vec<u8>, Failure> {
    let statement = signing::Statement::now(component, &r.repository_path(), &meta.name, &meta.version);
    signing::sign_statement(key, &statement).exit(Exit::Usage)
}

fn pull(reference: &str) -> Result<(), Failure> {
    let r = oci(reference)?;
    let cache = cache()?;
    let registry = Registry::connect(&r.registry).exit(Exit::Usage)?;
    let pulled = registry.pull(&cache, &r).exit(Exit::Usage)?;
    // Compiled now, into the compile cache, so the first scheduled run
    // does not pay for it.
    let bytes = cache.load(&pulled.record.component).map_err(|e| anyhow!("{r}: {e}")).exit(Exit::Usage)?;
    let runtime = crate::exit::runtime()?;
    runtime.load_bytes(&cache.blob_path(&pulled.record.component), &bytes).exit(Exit::Usage)?;
    log::info!(
        target: "offsite::script",
        "{} {} component sha256:{} ({} bytes, {} signature(s){})",
        pulled.record.name,
        pulled.record.version,
        pulled.record.component,
        pulled.record.size,
        pulled.signatures,
        if pulled.was_cached { ", already stored" } else { "" }
    );
    crate::outln!("{}", pulled.record.reference);
    Ok(())
}

fn ls() -> Result<(), Failure> {
    let cache = cache()?;
    let records = cache.manifests();
    let blobs = cache.blobs();
    let signers_of = |component: &str| -> Vec<String> {
        cache.signatures(component).unwrap_or_default().iter().filter_map(|s| signing::signature_key(s)).collect()
    };
    if crate::json::on() {
        let listed: std::collections::HashSet<&str> = records.iter().map(|r| r.component.as_str()).collect();
        let mut scripts: Vec<serde_json::Value> = records
            .iter()
            .map(|rec| {
                serde_json::json!({
                    "name": rec.name, "version": rec.version, "component": format!("sha256:{}", rec.component),
                    "bytes": rec.size, "source": rec.reference, "signers": signers_of(&rec.component),
                    "stored": cache.has(&rec.component),
                })
            })
            .collect();
        scripts.extend(blobs.iter().filter(|(h, _)| !listed.contains(h.as_str())).map(|(hex, size)| {
            serde_json::json!({
                "name": null, "version": null, "component": format!("sha256:{hex}"), "bytes": size,
                "source": null, "signers": signers_of(hex), "stored": true,
            })
        }));
        crate::json::report(serde_json::json!({ "store": cache.root.display().to_string(), "scripts": scripts }));
        return Ok(());
    }
    if records.is_empty() && blobs.is_empty() {
        eprintln!("offsite: no scripts in {}", cache.root.display());
        return Ok(());
    }
    crate::outln!("{:<20} {:<10} {:<19} {:>9}  {:<24} FROM", "NAME", "VERSION", "COMPONENT", "SIZE", "SIGNED BY");
    let mut listed = std::collections::HashSet::new();
    for rec in &records {
        listed.insert(rec.component.clone());
        let stored = cache.has(&rec.component);
        let signers = signers_of(&rec.component);
        crate::outln!(
            "{:<20} {:<10} sha256:{:<12} {:>9}  {:<24} {}{}",
            crate::text::escape(&crate::text::truncate(&rec.name, 20)),
            crate::text::escape(&crate::text::truncate(&rec.version, 10)),
            &rec.component[..12],
            rec.size,
            if signers.is_empty() { "-".to_string() } else { signers.join(",") },
            rec.reference,
            if stored { "" } else { " (component not stored)" }
        );
    }
    for (hex, size) in blobs.iter().filter(|(h, _)| !listed.contains(h)) {
        crate::outln!("{:<20} {:<10} sha256:{:<12} {:>9}  {:<24} (local file)", "-", "-", &hex[..12], size, "-");
    }
    Ok(())
}

/// A script named on the command line: a file or a registry reference
/// (pulled when not stored).
pub fn fetch_arg(script: &str) -> Result<Fetched, Failure> {
    let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
    match ScriptSource::parse(script, &cwd).exit(Exit::Usage)? {
        ScriptSource::Path(p) => resolve::fetch_file(&p).exit(Exit::Usage),
        ScriptSource::Oci(r) => {
            let cache = cache()?;
            let pinned = match &r.digest {
                Some(_) => r.clone(),
                None => {
                    let hex = Registry::connect(&r.registry).and_then(|reg| reg.resolve(&r)).exit(Exit::Usage)?;
                    r.pinned(&hex)
                }
            };
            resolve::from_store_or_pull(&cache, &pinned).exit(Exit::Usage)
        }
    }
}

fn sign_script(script: &str, key: &Path) -> Result<(), Failure> {
    let fetched = fetch_arg(script)?;
    if fetched.bytes.len() as u64 > MAX_SCRIPT_BYTES {
        return Err(anyhow!("the script is over the limit of {MAX_SCRIPT_BYTES} bytes")).exit(Exit::Usage);
    }
    if script.starts_with(super::reference::SCHEME) {
        let r: OciRef = fetched.source.parse().exit(Exit::Usage)?;
        let sig = sign_for(&r, key, &fetched.bytes, &meta_of(&fetched.bytes, &fetched.path)?)?;
        let fingerprint = signing::signature_key(&sig).unwrap_or_default();
        let manifest = r.digest.clone().expect("pinned");
        Registry::connect(&r.registry)
            .and_then(|reg| reg.push_signature(&r, &manifest, &sig))
            .exit(Exit::BackupFailed)?;
        let hex = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&fetched.bytes));
        cache()?.add_signature(&hex, &sig).exit(Exit::Usage)?;
        crate::outln!("signed {} with {fingerprint}", r);
    } else {
        // A local file has no repository: its signature is over its bytes,
        // exactly what `ssh-keygen -Y sign` makes of the file.
        let sig = signing::sign(key, &fetched.bytes).exit(Exit::Usage)?;
        let fingerprint = signing::signature_key(&sig).unwrap_or_default();
        let path = resolve::sig_path(&fetched.path);
        std::fs::write(&path, &sig).with_context(|| format!("cannot write {}", path.display())).exit(Exit::Usage)?;
        crate::outln!("signed {} with {fingerprint}: {}", fetched.path.display(), path.display());
    }
    Ok(())
}

/// The allowed_signers file used when none is named.
pub fn default_signers() -> PathBuf {
    std::env::var_os("OFFSITE_CONFIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/etc/offsite".into())
        .join("allowed_signers")
}

fn verify(script: &str, signers: Option<PathBuf>) -> Result<(), Failure> {
    let fetched = fetch_arg(script)?;
    let file = signers.unwrap_or_else(default_signers);
    let allowed = AllowedSigners::load(&file).exit(Exit::Usage)?;
    match allowed.verify_script(&fetched.bytes, fetched.repository().as_deref(), &fetched.signatures) {
        Ok((who, _, statement)) => {
            crate::outln!("{}: signed by {who}", fetched.source);
            if let Some(st) = statement {
                crate::outln!(
                    "  as {} {} of {}, at {}",
                    crate::text::escape(&st.name),
                    crate::text::escape(&st.version),
                    crate::text::escape(&st.repository),
                    crate::text::escape(&st.signed)
                );
            }
            Ok(())
        }
        Err(why) => Err(anyhow!("{}: {why}", fetched.source)).exit(Exit::Usage),
    }
}

fn diff(old: &str, new: &str, site_file: &Path) -> Result<(), Failure> {
    let site_file = crate::run::site_path(site_file);
    let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
    crate::site::Site::load(&site_file, &cwd).exit(Exit::Usage)?;
    let old = super::diff::side(fetch_arg(old)?)?;
    let new = super::diff::side(fetch_arg(new)?)?;
    let report = super::diff::diff(&site_file, Some(&old), &new).exit(Exit::Usage)?;
    crate::out!("{}", report.text);
    if report.denied.is_empty() && report.unusable.is_none() {
        Ok(())
    } else {
        Err(anyhow!(
            "{} {} asks for {} call(s) site {} does not grant",
            new.info.name,
            new.info.version,
            report.denied.len(),
            site_file.display()
        ))
        .exit(Exit::BackupFailed)
    }
}

fn update(site_file: &Path, allow_downgrade: bool) -> Result<(), Failure> {
    let site_file = crate::run::site_path(site_file);
    let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
    let site = crate::site::Site::load(&site_file, &cwd).exit(Exit::Usage)?;
    let r = match &site.script {
        Some(ScriptSource::Oci(r)) if r.digest.is_none() => r.clone(),
        Some(ScriptSource::Oci(r)) => {
            return Err(anyhow!("{r} is pinned by its digest in the site file: edit it there to change versions"))
                .exit(Exit::Usage);
        }
        _ => {
            return Err(anyhow!(
                "site {} has no registry tag (script = \"oci://...:TAG\") to update",
                site_file.display()
            ))
            .exit(Exit::Usage);
        }
    };
    let cache = cache()?;
    let manifest = Registry::connect(&r.registry).and_then(|reg| reg.resolve(&r)).exit(Exit::Usage)?;
    let lock = super::lockfile::read(&site_file).exit(Exit::Usage)?.filter(|l| l.reference == r.to_string());
    if lock.as_ref().is_some_and(|l| l.manifest_hex() == manifest) {
        crate::outln!(
            "{r} still points to sha256:{manifest}, which {} records",
            super::lockfile::path_for(&site_file).display()
        );
        return Ok(());
    }
    let new = resolve::from_store_or_pull(&cache, &r.pinned(&manifest)).exit(Exit::Usage)?;
    let signer = resolve::check_signer(&new, site.script_signers.as_deref())
        .map_err(|e| {
            e.context(format!("update refused; {} is unchanged", super::lockfile::path_for(&site_file).display()))
        })
        .exit(Exit::Usage)?;
    let old = match &lock {
        Some(l) => match resolve::from_store_or_pull(&cache, &r.pinned(l.manifest_hex())) {
            Ok(f) => Some(super::diff::side(f)?),
            Err(e) => {
                log::warn!(target: "offsite::script", "the recorded version cannot be had to compare with: {e:#}");
                None
            }
        },
        None => None,
    };
    let new = super::diff::side(new)?;
    let report = super::diff::diff(&site_file, old.as_ref(), &new).exit(Exit::Usage)?;
    crate::out!("{}", report.text);
    let lock_path = super::lockfile::path_for(&site_file);
    match old.as_ref().and_then(|o| super::diff::step_back(&o.info, &new.info)) {
        Some(why) if !allow_downgrade => {
            return Err(anyhow!(
                "update refused: {why}; {} is unchanged (`--allow-downgrade` takes it anyway)",
                lock_path.display()
            ))
            .exit(Exit::Usage);
        }
        Some(why) => log::warn!(target: "offsite::script", "{why}: taken, as --allow-downgrade asks"),
        None => {}
    }
    if !report.denied.is_empty() {
        return Err(anyhow!(
            "update refused: {} {} asks for {} call(s) this site does not grant ({}); {} is unchanged and runs \
             keep the recorded version",
            new.info.name,
            new.info.version,
            report.denied.len(),
            report.denied.join("; "),
            lock_path.display()
        ))
        .exit(Exit::Usage);
    }
    if let Some(why) = &report.unusable {
        return Err(anyhow!(
            "update refused: the new version cannot run on this site ({why}); {} is unchanged",
            lock_path.display()
        ))
        .exit(Exit::Usage);
    }
    let record = super::lockfile::ScriptLock {
        reference: r.to_string(),
        manifest: format!("sha256:{manifest}"),
        component: format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&new.fetched.bytes))),
        signer: signer.map(|v| v.signer.to_string()),
        updated: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    let written = super::lockfile::write(&site_file, &record).exit(Exit::Usage)?;
    crate::outln!("recorded {} in {}", r.pinned(&manifest), written.display());
    Ok(())
}
