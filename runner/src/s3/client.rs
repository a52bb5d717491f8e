//! A blocking S3 client for one store: object_store's S3 implementation
//! (SigV4, retries, conditional requests) on a runtime of its own, with
//! every call bounded by a timeout and every error sorted into what a
//! user can act on.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::credentials::Credentials;
use super::location::{S3Location, S3Settings};

/// Most bytes [`Bucket::get`] reads: it is for the store's own small
/// objects (lock, manifests), never for backups.
pub const SMALL_OBJECT_MAX: u64 = 16 << 20;
/// Most keys one [`Bucket::list`] returns.
pub const LIST_MAX: usize = 100_000;

/// What went wrong, sorted by what the user does about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum S3Error {
    /// The key does not exist.
    NotFound(String),
    /// A conditional request's condition failed: the key exists (create)
    /// or has changed (replace).
    Conflict(String),
    /// Wrong or expired credentials, or a policy that refuses us.
    Denied(String),
    /// The bucket does not exist.
    NoBucket(String),
    /// Nothing answered, or not in time.
    Unreachable(String),
    Other(String),
}

impl std::fmt::Display for S3Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            S3Error::NotFound(m)
            | S3Error::Conflict(m)
            | S3Error::Denied(m)
            | S3Error::NoBucket(m)
            | S3Error::Unreachable(m)
            | S3Error::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for S3Error {}

/// How a put treats an existing object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Put {
    Overwrite,
    /// Only if no object has the key (`If-None-Match: *`).
    Create,
    /// Only if the object still has this ETag (`If-Match`).
    Replace(String),
}

/// An object's key (relative to the store's prefix), size and ETag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub rel: String,
    pub size: u64,
    pub etag: Option<String>,
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// One store's bucket and prefix, reached with one set of credentials.
pub struct Bucket {
    s3: Arc<AmazonS3>,
    rt: tokio::runtime::Runtime,
    location: S3Location,
    timeout: Duration,
}

impl Bucket {
    /// Prepares the client; nothing is sent until the first call.
    pub fn open(
        location: &S3Location,
        settings: &S3Settings,
        credentials: &Credentials,
        region: Option<&str>,
        timeout: Duration,
    ) -> Result<Bucket, S3Error> {
        settings.check().map_err(S3Error::Other)?;
        // The OCI client installs the same provider; whichever runs first
        // wins, and both are ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let options = ClientOptions::new()
            .with_timeout(timeout)
            .with_connect_timeout(timeout.min(Duration::from_secs(30)))
            .with_allow_http(settings.endpoint.as_deref().is_some_and(|e| e.starts_with("http://")));
        let retry = object_store::RetryConfig {
            max_retries: 3,
            retry_timeout: timeout.min(Duration::from_secs(120)),
            ..Default::default()
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(region.unwrap_or("us-east-1"))
            .with_access_key_id(&credentials.access_key_id)
            .with_secret_access_key(&credentials.secret_access_key)
            .with_virtual_hosted_style_request(!settings.path_style)
            .with_client_options(options)
            .with_retry(retry);
        if let Some(token) = &credentials.session_token {
            builder = builder.with_token(token);
        }
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/'));
        }
        let s3 = builder.build().map_err(|e| S3Error::Other(format!("{location}: {e}")))?;
        // One worker drives the connections; callers on any thread wait in
        // block_on, so a heartbeat thread and the run share the client.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("s3-client")
            .enable_all()
            .build()
            .map_err(|e| S3Error::Other(format!("cannot start the S3 client: {e}")))?;
        Ok(Bucket { s3: Arc::new(s3), rt, location: location.clone(), timeout })
    }

    pub fn location(&self) -> &S3Location {
        &self.location
    }

    fn key(&self, rel: &str) -> Key {
        Key::from(self.location.key(rel))
    }

    pub(super) fn s3(&self) -> &Arc<AmazonS3> {
        &self.s3
    }

    /// Runs `f` on the client's runtime in the background.
    pub(super) fn spawn<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.rt.spawn(f)
    }

    pub(super) fn shown(&self, rel: &str) -> String {
        format!("s3://{}/{}", self.location.bucket, self.location.key(rel))
    }

    /// Runs `f` on the client's runtime within the call timeout.
    pub(super) fn call<T>(&self, rel: &str, f: impl Future<Output = object_store::Result<T>>) -> Result<T, S3Error> {
        match self.rt.block_on(async { tokio::time::timeout(self.timeout, f).await }) {
            Ok(r) => r.map_err(|e| classify(&self.shown(rel), e)),
            Err(_) => Err(S3Error::Unreachable(format!(
                "{}: no answer within {}",
                self.shown(rel),
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    /// Writes `data` under `rel`; returns the new ETag.
    pub fn put(&self, rel: &str, data: Vec<u8>, mode: Put) -> Result<String, S3Error> {
        let mode = match mode {
            Put::Overwrite => PutMode::Overwrite,
            Put::Create => PutMode::Create,
            Put::Replace(etag) => PutMode::Update(UpdateVersion { e_tag: Some(etag), version: None }),
        };
        let opts = PutOptions { mode, ..Default::default() };
        let key = self.key(rel);
        let done = self.call(rel, self.s3.put_opts(&key, PutPayload::from(data), opts))?;
        done.e_tag.ok_or_else(|| S3Error::Other(format!("{}: the server sent no ETag", self.shown(rel))))
    }

    /// A small object's bytes and ETag; `None` if there is none.
    pub fn get(&self, rel: &str) -> Result<Option<(Vec<u8>, String)>, S3Error> {
        let key = self.key(rel);
        let got = match self.call(rel, self.s3.get(&key)) {
            Ok(g) => g,
            Err(S3Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        if got.meta.size > SMALL_OBJECT_MAX {
            return Err(S3Error::Other(format!(
                "{}: {} bytes, more than the {} this object may have",
                self.shown(rel),
                got.meta.size,
                SMALL_OBJECT_MAX
            )));
        }
        let etag = got.meta.e_tag.clone().unwrap_or_default();
        let bytes = self.call(rel, got.bytes())?;
        Ok(Some((bytes.to_vec(), etag)))
    }

    /// Size and ETag of `rel`; `None` if there is no such object.
    pub fn head(&self, rel: &str) -> Result<Option<Meta>, S3Error> {
        let key = self.key(rel);
        match self.call(rel, self.s3.head(&key)) {
            Ok(m) => Ok(Some(self.meta(m))),
            Err(S3Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn delete(&self, rel: &str) -> Result<(), S3Error> {
        let key = self.key(rel);
        match self.call(rel, self.s3.delete(&key)) {
            Ok(()) | Err(S3Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every object beneath `rel_dir` (recursively), at most [`LIST_MAX`].
    pub fn list(&self, rel_dir: &str) -> Result<Vec<Meta>, S3Error> {
        let prefix = self.key(rel_dir);
        let s3 = Arc::clone(&self.s3);
        let listed = self.call(rel_dir, async move {
            let mut stream = s3.list(Some(&prefix));
            let mut out = Vec::new();
            while let Some(item) = stream.next().await {
                out.push(item?);
                if out.len() > LIST_MAX {
                    break;
                }
            }
            Ok(out)
        })?;
        if listed.len() > LIST_MAX {
            return Err(S3Error::Other(format!("{}: more than {LIST_MAX} objects", self.shown(rel_dir))));
        }
        Ok(listed.into_iter().map(|m| self.meta(m)).collect())
    }

    /// Streams the object `rel` into `sink`; returns how many bytes came.
    /// Each chunk must arrive within the call timeout (a stalled server
    /// fails the read, however large the object).
    pub fn download(&self, rel: &str, sink: &mut dyn std::io::Write) -> Result<u64, S3Error> {
        let key = self.key(rel);
        let got = self.call(rel, self.s3.get(&key))?;
        let mut stream = got.into_stream();
        let mut total = 0u64;
        loop {
            let next = self.call(rel, async { stream.next().await.transpose() })?;
            let Some(chunk) = next else { return Ok(total) };
            sink.write_all(&chunk)
                .map_err(|e| S3Error::Other(format!("{}: writing what arrived: {e}", self.shown(rel))))?;
            total += chunk.len() as u64;
        }
    }

    /// Whether the bucket answers to our credentials: one list request.
    pub fn probe(&self) -> Result<(), S3Error> {
        let prefix = self.key(super::META_DIR);
        self.call(super::META_DIR, self.s3.list_with_delimiter(Some(&prefix))).map(|_| ())
    }

    fn meta(&self, m: object_store::ObjectMeta) -> Meta {
        let full = m.location.to_string();
        let rel = match self.location.prefix.as_str() {
            "" => full,
            p => full.strip_prefix(p).and_then(|r| r.strip_prefix('/')).unwrap_or(&full).to_string(),
        };
        Meta { rel, size: m.size, etag: m.e_tag, modified: m.last_modified }
    }
}

/// Sorts object_store's error into ours. Servers differ in how they say
/// things (AWS, SeaweedFS, MinIO), so the S3 error code in the message
/// decides where the status alone does not.
fn classify(what: &str, e: object_store::Error) -> S3Error {
    use object_store::Error as E;
    let text = e.to_string();
    let has = |code: &str| text.contains(code);
    if has("NoSuchBucket") {
        return S3Error::NoBucket(format!("{what}: the bucket does not exist (create it first)"));
    }
    if has("InvalidAccessKeyId") || has("SignatureDoesNotMatch") || has("ExpiredToken") {
        return S3Error::Denied(format!(
            "{what}: the server refused our credentials ({}); check the access key and secret",
            if has("InvalidAccessKeyId") {
                "unknown access key"
            } else if has("ExpiredToken") {
                "expired token"
            } else {
                "signature does not match"
            }
        ));
    }
    match e {
        E::NotFound { .. } => S3Error::NotFound(format!("{what}: no such object")),
        E::AlreadyExists { .. } => S3Error::Conflict(format!("{what}: it already exists")),
        E::Precondition { .. } | E::NotModified { .. } => {
            S3Error::Conflict(format!("{what}: it was changed meanwhile"))
        }
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            S3Error::Denied(format!("{what}: access denied: {}", clean(&text)))
        }
        _ if has("error sending request") || has("connect") || has("timed out") || has("dns") => {
            S3Error::Unreachable(format!("{what}: cannot reach the server: {}", clean(&text)))
        }
        _ => S3Error::Other(format!("{what}: {}", clean(&text))),
    }
}

/// Server text for a message: one line, escaped, bounded.
fn clean(text: &str) -> String {
    crate::text::truncate(&crate::text::escape(text), 400).into_owned()
}
