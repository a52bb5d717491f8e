//! Talking to OCI registries: pushing a script as a standard wasm artifact,
//! pulling one into the script store, and the signatures that travel beside
//! it under the tag `sha256-<manifest digest>.sig` (the cosign convention,
//! which needs no referrers API).
//!
//! The artifact is the CNCF wasm OCI layout that `wkg oci` and wasmCloud
//! use: an OCI image manifest whose config is
//! `application/vnd.wasm.config.v0+json` and whose one layer is
//! `application/wasm`. Anything else is refused before a byte of it is
//! stored. HTTPS only; certificates are checked against the system's CA
//! store plus the registry's own CA in `certs.d` (as podman and docker
//! read it); credentials come from the auth files `docker login` and
//! `podman login` write (see [`super::auth`]).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use sha2::{Digest, Sha256};

use super::auth;
use super::cache::{MAX_SCRIPT_BYTES, ManifestRecord, ScriptCache};
use super::reference::OciRef;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// The artifact type and layer type of a signature artifact.
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.offsite.script.signature.v1";
pub const SIGNATURE_MEDIA_TYPE: &str = "application/vnd.offsite.sshsig.v1";
const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";

/// Largest manifest accepted.
const MAX_MANIFEST_BYTES: usize = 256 * 1024;
/// Most signatures kept for one script.
const MAX_SIGNATURES: usize = 32;

/// Bounds on every registry call: connecting, each read, and the whole
/// operation (a registry that trickles bytes cannot hold a run forever).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(30);
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(300);

/// What a script declares, for the artifact's config and annotations.
#[derive(Debug, Clone, Default)]
pub struct ScriptMeta {
    pub name: String,
    pub version: String,
    pub description: String,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
}

/// A registry reached over HTTPS with the user's credentials for it.
pub struct Registry {
    client: oci_client::Client,
    /// Everything read (manifests, tokens, blobs) goes through this
    /// bounded client; oci-client only pushes.
    reader: super::pull::Reader,
    auth: oci_client::secrets::RegistryAuth,
    rt: tokio::runtime::Runtime,
    registry: String,
}

/// What a pull found.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub record: ManifestRecord,
    /// Signatures found beside it (stored, not yet checked).
    pub signatures: usize,
    /// The component was already stored; no bytes were downloaded.
    pub was_cached: bool,
}

impl Registry {
    pub fn connect(registry: &str) -> Result<Registry> {
        // rustls needs a crypto provider; ring is the one built in.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cas = auth::registry_cas(registry)?;
        let certs =
            cas.iter().map(|data| Certificate { encoding: CertificateEncoding::Pem, data: data.clone() }).collect();
        let config = ClientConfig {
            protocol: ClientProtocol::Https,
            extra_root_certificates: certs,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            user_agent: concat!("offsite/", env!("CARGO_PKG_VERSION")),
            platform_resolver: None,
            max_concurrent_download: 2,
            max_concurrent_upload: 2,
            ..Default::default()
        };
        let client =
            oci_client::Client::try_from(config).map_err(|e| anyhow!("cannot set up the registry client: {e}"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the registry client's runtime")?;
        let auth = auth::credentials(registry)?;
        let reader = super::pull::Reader::new(registry, &cas, auth.clone(), CONNECT_TIMEOUT, READ_TIMEOUT)?;
        Ok(Registry { client, reader, auth, rt, registry: registry.to_string() })
    }

    /// Runs one read with the whole-operation timeout.
    fn read<T>(&self, what: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        self.rt.block_on(async {
            match tokio::time::timeout(OPERATION_TIMEOUT, f).await {
                Ok(r) => r,
                Err(_) => bail!("{what}: the registry {} did not finish within {OPERATION_TIMEOUT:?}", self.registry),
            }
        })
    }

    /// GETs `path` of `r`'s repository: the answer, or what went wrong in
    /// words (`what` names the thing fetched).
    async fn get(&self, r: &OciRef, path: &str, accept: Option<&str>, what: &str) -> Result<reqwest::Response> {
        match self.reader.get(&r.repository, path, accept).await {
            Ok(super::pull::Found::Yes(response)) => Ok(response),
            Ok(super::pull::Found::No) => {
                Err(anyhow::Error::new(NotFound(format!("{r}: the registry has no {what} there (not found)"))))
            }
            Err(e) if e.downcast_ref::<super::pull::Refused>().is_some() => Err(anyhow!(
                "{r}: {what}: the registry {} refused the credentials (or asked for some and none were found): log \
                 in with `docker login {0}` or `podman login {0}`",
                r.registry
            )),
            Err(e) => {
                Err(anyhow!("{r}: {what}: {}", crate::text::escape(&crate::text::truncate(&format!("{e:#}"), 500))))
            }
        }
    }

    /// Runs one operation with the whole-operation timeout.
    fn block<T>(&self, what: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        self.rt.block_on(async {
            self.client.store_auth_if_needed(&self.registry, &self.auth).await;
            match tokio::time::timeout(OPERATION_TIMEOUT, f).await {
                Ok(r) => r,
                Err(_) => bail!("{what}: the registry {} did not finish within {OPERATION_TIMEOUT:?}", self.registry),
            }
        })
    }

    /// The manifest digest a tag points at now.
    pub fn resolve(&self, r: &OciRef) -> Result<String> {
        let (_, digest) = self.manifest(r)?;
        Ok(digest)
    }

    /// Fetches and checks the image manifest of `r`: (manifest, its hex
    /// digest). At most [`MAX_MANIFEST_BYTES`] are read.
    fn manifest(&self, r: &OciRef) -> Result<(OciImageManifest, String)> {
        let reference = match &r.digest {
            Some(d) => format!("sha256:{d}"),
            None => r.tag_or_latest().to_string(),
        };
        let (bytes, said) = self.read(&format!("fetching the manifest of {r}"), async {
            let response =
                self.get(r, &format!("manifests/{reference}"), Some(MANIFEST_MEDIA_TYPE), "the manifest").await?;
            let said =
                response.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_string);
            let bytes = super::pull::read_bounded(response, MAX_MANIFEST_BYTES, "the manifest")
                .await
                .map_err(|e| anyhow!("{r}: {e:#}"))?;
            Ok((bytes, said))
        })?;
        let hex = hex::encode(Sha256::digest(&bytes));
        if said.is_some_and(|d| d != format!("sha256:{hex}")) || r.digest.as_ref().is_some_and(|d| *d != hex) {
            bail!("{r}: the manifest received does not hash to its digest: refused");
        }
        let manifest: OciImageManifest = serde_json::from_slice(&bytes)
            .map_err(|e| anyhow!("{r}: the manifest is not an OCI image manifest: {e}"))?;
        Ok((manifest, hex))
    }

    /// Pulls `r` into `cache` (the component, checked against its digest
    /// as it streams to disk, and any signatures), and records it.
    pub fn pull(&self, cache: &ScriptCache, r: &OciRef) -> Result<Pulled> {
        let (manifest, manifest_hex) = self.manifest(r)?;
        let layer = wasm_layer(r, &manifest)?;
        let component =
            layer.digest.strip_prefix("sha256:").map(str::to_string).context("the layer digest is not sha256")?;
        super::cache::check_hex(&component)?;
        let was_cached = cache.load(&component).is_ok();
        if !was_cached {
            let limit = (layer.size as u64).min(MAX_SCRIPT_BYTES);
            let mut writer = cache.writer(&component)?;
            self.read(&format!("downloading {r}"), async {
                let mut response = self.get(r, &format!("blobs/{}", layer.digest), None, "the component").await?;
                while let Some(chunk) = response
                    .chunk()
                    .await
                    .map_err(|e| anyhow!("{r}: downloading the component: {}", crate::http::chain(&e)))?
                {
                    writer.write(&chunk, limit).with_context(|| format!("{r}"))?;
                }
                Ok(())
            })?;
            writer.finish().with_context(|| format!("{r}"))?;
        }
        let signatures = self.pull_signatures(cache, r, &manifest_hex, &component)?;
        let annotations = manifest.annotations.clone().unwrap_or_default();
        let record = ManifestRecord {
            manifest: manifest_hex.clone(),
            component,
            size: layer.size as u64,
            reference: r.pinned(&manifest_hex).to_string(),
            fetched: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            name: annotation(&annotations, "org.opencontainers.image.title"),
            version: annotation(&annotations, "org.opencontainers.image.version"),
        };
        cache.record_manifest(&record)?;
        Ok(Pulled { record, signatures, was_cached })
    }

    /// Fetches the signature artifact of `manifest_hex`, stores each
    /// signature in it under `component`, and returns how many there are.
    /// The signatures the registry has now for the stored manifest `r`
    /// pins, added to the store. Nothing else changes: not the manifest's
    /// record, nor when it was pulled, which a followed tag falls back on
    /// when the registry is down.
    pub fn refresh_signatures(&self, cache: &ScriptCache, r: &OciRef) -> Result<Vec<Vec<u8>>> {
        let hex = r.digest.as_deref().ok_or_else(|| anyhow!("{r} names no digest"))?;
        let record = cache.manifest(hex).ok_or_else(|| anyhow!("{r} is not in the local script store"))?;
        self.pull_signatures(cache, r, hex, &record.component)?;
        cache.signatures(&record.component)
    }

    fn pull_signatures(&self, cache: &ScriptCache, r: &OciRef, manifest_hex: &str, component: &str) -> Result<usize> {
        let Some((sig_manifest, _)) = self.signature_manifest(r, manifest_hex)? else { return Ok(0) };
        let mut found = 0;
        for layer in sig_manifest.layers.iter().filter(|l| l.media_type == SIGNATURE_MEDIA_TYPE).take(MAX_SIGNATURES) {
            if layer.size < 0 || layer.size as u64 > super::signing::MAX_SIGNATURE {
                continue;
            }
            let bytes = self.blob(r, layer)?;
            cache.add_signature(component, &bytes)?;
            found += 1;
        }
        Ok(found)
    }

    /// The signature artifact for `manifest_hex`, if one was pushed.
    fn signature_manifest(&self, r: &OciRef, manifest_hex: &str) -> Result<Option<(OciImageManifest, String)>> {
        let sig_ref = OciRef { tag: Some(signature_tag(manifest_hex)), digest: None, ..r.clone() };
        match self.manifest(&sig_ref) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.downcast_ref::<NotFound>().is_some() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A small blob, whole, checked against its digest.
    fn blob(&self, r: &OciRef, layer: &OciDescriptor) -> Result<Vec<u8>> {
        let size = usize::try_from(layer.size).unwrap_or(0);
        // The digest names a URL path: only `sha256:` and 64 hex digits.
        super::cache::check_hex(layer.digest.strip_prefix("sha256:").unwrap_or_default())
            .map_err(|_| anyhow!("{r}: a layer's digest is not sha256: refused"))?;
        let out = self.read(&format!("downloading a blob of {r}"), async {
            let response = self.get(r, &format!("blobs/{}", layer.digest), None, "a signature").await?;
            crate::http::read_bounded(response, size).await.map_err(|e| match e {
                crate::http::BodyError::TooLong(_) => anyhow!("{r}: a blob is larger than its descriptor says"),
                crate::http::BodyError::Transport(why) => anyhow!("{r}: downloading a blob: {why}"),
            })
        })?;
        if format!("sha256:{}", hex::encode(Sha256::digest(&out))) != layer.digest {
            bail!("{r}: a blob does not hash to its digest: refused");
        }
        Ok(out)
    }

    /// Pushes `component` to `r` as a wasm artifact and returns the
    /// manifest's hex digest. Also records it in `cache`.
    ///
    /// The manifest goes up by digest first, then `signature` (if any),
    /// and only then is the tag moved: someone following the tag never
    /// sees the new build before its signature is there.
    pub fn push(
        &self,
        cache: &ScriptCache,
        r: &OciRef,
        component: &[u8],
        meta: &ScriptMeta,
        signature: Option<&[u8]>,
    ) -> Result<String> {
        let reference = client_ref(r);
        let layer_digest = format!("sha256:{}", hex::encode(Sha256::digest(component)));
        let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let config = serde_json::to_vec(&serde_json::json!({
            "created": created,
            "architecture": "wasm",
            "os": "wasip2",
            "layerDigests": [layer_digest],
            "component": { "exports": meta.exports, "imports": meta.imports, "target": null },
        }))?;
        let config_digest = format!("sha256:{}", hex::encode(Sha256::digest(&config)));
        let mut annotations = BTreeMap::new();
        annotations.insert("org.opencontainers.image.created".to_string(), created.clone());
        for (key, value) in [
            ("org.opencontainers.image.title", &meta.name),
            ("org.opencontainers.image.version", &meta.version),
            ("org.opencontainers.image.description", &meta.description),
        ] {
            if !value.is_empty() {
                annotations.insert(key.to_string(), value.clone());
            }
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": { "mediaType": WASM_CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config.len() },
            "layers": [{ "mediaType": WASM_LAYER_MEDIA_TYPE, "digest": layer_digest, "size": component.len() }],
            "annotations": annotations,
        }))?;
        let manifest_hex = hex::encode(Sha256::digest(&manifest));
        let by_digest = client_ref(&OciRef { digest: Some(manifest_hex.clone()), ..r.clone() });
        let component_bytes = bytes::Bytes::copy_from_slice(component);
        self.block(&format!("pushing {r}"), async {
            self.client
                .push_blob(&reference, component_bytes, &layer_digest)
                .await
                .map_err(|e| describe(e, r, "the component"))?;
            self.client
                .push_blob(&reference, config, &config_digest)
                .await
                .map_err(|e| describe(e, r, "the config"))?;
            self.client
                .push_manifest_raw(&by_digest, manifest.clone(), http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE))
                .await
                .map_err(|e| describe(e, r, "the manifest"))?;
            Ok(())
        })?;
        if let Some(sig) = signature {
            self.push_signature(r, &manifest_hex, sig)?;
        }
        self.block(&format!("tagging {r}"), async {
            self.client
                .push_manifest_raw(&reference, manifest, http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE))
                .await
                .map_err(|e| describe(e, r, "the tag"))?;
            Ok(())
        })?;
        let hex = cache.store_bytes(component)?;
        cache.record_manifest(&ManifestRecord {
            manifest: manifest_hex.clone(),
            component: hex,
            size: component.len() as u64,
            reference: r.pinned(&manifest_hex).to_string(),
            fetched: created,
            name: meta.name.clone(),
            version: meta.version.clone(),
        })?;
        Ok(manifest_hex)
    }

    /// Adds `signature` to the signature artifact of `manifest_hex`,
    /// keeping the signatures already there.
    pub fn push_signature(&self, r: &OciRef, manifest_hex: &str, signature: &[u8]) -> Result<()> {
        let sig_ref = OciRef { tag: Some(signature_tag(manifest_hex)), digest: None, ..r.clone() };
        let mut layers: Vec<serde_json::Value> = Vec::new();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(signature)));
        if let Some((existing, _)) = self.signature_manifest(r, manifest_hex)? {
            for l in existing.layers.iter().filter(|l| l.media_type == SIGNATURE_MEDIA_TYPE).take(MAX_SIGNATURES - 1) {
                if l.digest != digest {
                    layers.push(serde_json::json!({ "mediaType": l.media_type, "digest": l.digest, "size": l.size }));
                }
            }
        }
        layers
            .push(serde_json::json!({ "mediaType": SIGNATURE_MEDIA_TYPE, "digest": digest, "size": signature.len() }));
        let empty = b"{}".to_vec();
        let empty_digest = format!("sha256:{}", hex::encode(Sha256::digest(&empty)));
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "artifactType": SIGNATURE_ARTIFACT_TYPE,
            "config": { "mediaType": EMPTY_CONFIG_MEDIA_TYPE, "digest": empty_digest, "size": 2 },
            "layers": layers,
            "annotations": { "org.opencontainers.image.ref.name": signature_tag(manifest_hex) },
        }))?;
        let reference = client_ref(&sig_ref);
        let signature = bytes::Bytes::copy_from_slice(signature);
        self.block(&format!("pushing a signature to {sig_ref}"), async {
            self.client.push_blob(&reference, signature, &digest).await.map_err(|e| describe(e, r, "a signature"))?;
            self.client.push_blob(&reference, empty, &empty_digest).await.map_err(|e| describe(e, r, "a config"))?;
            self.client
                .push_manifest_raw(&reference, manifest, http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE))
                .await
                .map_err(|e| describe(e, r, "the signature manifest"))?;
            Ok(())
        })
    }
}

/// The reference the OCI client takes: by digest when there is one.
fn client_ref(r: &OciRef) -> oci_client::Reference {
    match &r.digest {
        Some(d) => oci_client::Reference::with_digest(r.registry.clone(), r.repository.clone(), format!("sha256:{d}")),
        None => {
            oci_client::Reference::with_tag(r.registry.clone(), r.repository.clone(), r.tag_or_latest().to_string())
        }
    }
}

/// The tag a manifest's signatures are pushed under.
pub fn signature_tag(manifest_hex: &str) -> String {
    format!("sha256-{manifest_hex}.sig")
}

/// The one wasm layer of a wasm artifact; anything else is refused.
fn wasm_layer(r: &OciRef, m: &OciImageManifest) -> Result<OciDescriptor> {
    if let Some(t) = &m.media_type
        && t != MANIFEST_MEDIA_TYPE
    {
        bail!("{r}: the manifest is {:?}, not an OCI image manifest", crate::text::truncate(t, 100));
    }
    if m.config.media_type != WASM_CONFIG_MEDIA_TYPE {
        bail!(
            "{r} is not a wasm component artifact: its config is {:?}, not {WASM_CONFIG_MEDIA_TYPE}",
            crate::text::truncate(&m.config.media_type, 100)
        );
    }
    let [layer] = m.layers.as_slice() else {
        bail!("{r} has {} layers; a script artifact has exactly one, {WASM_LAYER_MEDIA_TYPE}", m.layers.len());
    };
    if layer.media_type != WASM_LAYER_MEDIA_TYPE {
        bail!("{r}: its layer is {:?}, not {WASM_LAYER_MEDIA_TYPE}", crate::text::truncate(&layer.media_type, 100));
    }
    if layer.size < 0 || layer.size as u64 > MAX_SCRIPT_BYTES {
        bail!("{r}: its component is {} bytes, over the limit of {MAX_SCRIPT_BYTES}", layer.size);
    }
    Ok(layer.clone())
}

fn annotation(a: &BTreeMap<String, String>, key: &str) -> String {
    a.get(key).map(|v| crate::text::truncate(v, 200).into_owned()).unwrap_or_default()
}

/// A manifest or tag the registry does not have.
#[derive(Debug)]
pub struct NotFound(pub String);

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for NotFound {}

/// One line for a client error, with what the registry said escaped.
fn describe(e: OciDistributionError, r: &OciRef, what: &str) -> anyhow::Error {
    let not_found = match &e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => {
            envelope.errors.iter().any(|x| matches!(x.code, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown))
        }
        OciDistributionError::ServerError { code, .. } => *code == 404,
        _ => false,
    };
    if not_found {
        return anyhow::Error::new(NotFound(format!("{r}: the registry has no {what} there (not found)")));
    }
    let text = match &e {
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            format!(
                "the registry {} refused the credentials (or asked for some and none were found): log in with \
                 `docker login {0}` or `podman login {0}`",
                r.registry
            )
        }
        OciDistributionError::RequestError(re) => {
            // The whole chain: a TLS or connection error is in the source.
            let mut s = re.to_string();
            let mut src = std::error::Error::source(re);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            s
        }
        other => other.to_string(),
    };
    anyhow!("{r}: {what}: {}", crate::text::escape(&crate::text::truncate(&text, 500)))
}
