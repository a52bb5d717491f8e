//! A blocking S3 client for one store: object_store's S3 implementation
//! (SigV4, retries, conditional requests) on a runtime of its own, with
//! every call bounded by a timeout and every error sorted into what a
//! user can act on.

use std::sync::Arc;
use std::time::{Duration, Instant};

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
/// The longest key S3 allows; a listing with a longer one is refused.
pub const KEY_MAX: usize = 1024;
/// Most bytes of keys one listing may hold in all.
pub const LIST_KEY_BYTES_MAX: usize = 32 << 20;

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
    /// The server answered that it failed (a 5xx: its storage behind the
    /// gateway is down, it is overloaded): an outage, like `Unreachable`,
    /// not a mistake in the site's settings.
    ServerFailed(String),
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
            | S3Error::ServerFailed(m)
            | S3Error::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for S3Error {}

impl From<std::io::Error> for S3Error {
    /// An [`ObjectReader`]'s error back as what it was; any other I/O error
    /// as `Other`.
    fn from(e: std::io::Error) -> S3Error {
        let text = e.to_string();
        match e.into_inner().map(|inner| inner.downcast::<S3Error>()) {
            Some(Ok(s3)) => *s3,
            _ => S3Error::Other(text),
        }
    }
}

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
    /// For the requests object_store does not make (listing and aborting
    /// incomplete uploads), signed with its SigV4 signer.
    raw: RawRequests,
}

struct RawRequests {
    http: reqwest::Client,
    /// `https://HOST[:PORT]` (AWS's regional endpoint unless set).
    endpoint: String,
    path_style: bool,
    region: String,
    credential: object_store::aws::AwsCredential,
}

/// A multipart upload that was begun and neither completed nor aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    pub rel: String,
    pub upload_id: String,
    pub initiated: Option<chrono::DateTime<chrono::Utc>>,
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
        let region = region.unwrap_or("us-east-1").to_string();
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(&region)
            .with_access_key_id(&credentials.access_key_id)
            .with_secret_access_key(&credentials.secret_access_key)
            .with_virtual_hosted_style_request(!settings.path_style)
            .with_client_options(options)
            .with_http_connector(super::bounded::BoundedConnector)
            .with_retry(retry);
        if let Some(token) = &credentials.session_token {
            builder = builder.with_token(token);
        }
        if let Some(endpoint) = client_endpoint(settings, &location.bucket) {
            builder = builder.with_endpoint(endpoint);
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
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(30)))
            .build()
            .map_err(|e| S3Error::Other(format!("cannot start the S3 client: {e}")))?;
        let raw = RawRequests {
            http,
            endpoint: match &settings.endpoint {
                Some(e) => e.trim_end_matches('/').to_string(),
                None => format!("https://s3.{region}.amazonaws.com"),
            },
            path_style: settings.path_style,
            region,
            credential: object_store::aws::AwsCredential {
                key_id: credentials.access_key_id.clone(),
                secret_key: credentials.secret_access_key.clone(),
                token: credentials.session_token.clone(),
            },
        };
        Ok(Bucket { s3: Arc::new(s3), rt, location: location.clone(), timeout, raw })
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

    /// The object `rel` for a message. Keys can come from the server (an
    /// incomplete upload's), so they are escaped.
    pub(super) fn shown(&self, rel: &str) -> String {
        format!("s3://{}/{}", self.location.bucket, crate::text::escape(&self.location.key(rel)))
    }

    /// How long the next call may take: the call timeout, or less when
    /// this thread's deadline ([`deadline_scope`]) comes first (then `true`).
    fn limit(&self) -> (Duration, bool) {
        match DEADLINE.get().map(|until| until.saturating_duration_since(Instant::now())) {
            Some(left) if left < self.timeout => (left, true),
            _ => (self.timeout, false),
        }
    }

    /// What a call to `shown` that ran out of time (see [`limit`](Self::limit)) failed with.
    fn timed_out(&self, shown: &str, by_deadline: bool) -> S3Error {
        S3Error::Unreachable(if by_deadline {
            format!("{shown}: stopped at the run's deadline")
        } else {
            format!("{shown}: no answer within {}", humantime::format_duration(self.timeout))
        })
    }

    /// Runs `f` on the client's runtime within the call timeout.
    pub(super) fn call<T>(&self, rel: &str, f: impl Future<Output = object_store::Result<T>>) -> Result<T, S3Error> {
        let (limit, by_deadline) = self.limit();
        match self.rt.block_on(async { tokio::time::timeout(limit, f).await }) {
            Ok(r) => r.map_err(|e| classify(&self.shown(rel), e)),
            Err(_) => Err(self.timed_out(&self.shown(rel), by_deadline)),
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

    /// `len` bytes of `rel` from `offset`: exactly those, or an error.
    pub fn get_range(&self, rel: &str, offset: u64, len: u64) -> Result<bytes::Bytes, S3Error> {
        let key = self.key(rel);
        let got = self.call(rel, self.s3.get_range(&key, offset..offset + len))?;
        if got.len() as u64 != len {
            return Err(S3Error::Other(format!(
                "{}: asked for {len} bytes at {offset}, the server sent {}",
                self.shown(rel),
                got.len()
            )));
        }
        Ok(got)
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
        self.list_at_most(rel_dir)?
            .ok_or_else(|| S3Error::Other(format!("{}: more than {LIST_MAX} objects", self.shown(rel_dir))))
    }

    /// [`list`](Self::list), with `None` for more than [`LIST_MAX`]
    /// objects, for a caller that can list them a part at a time.
    pub fn list_at_most(&self, rel_dir: &str) -> Result<Option<Vec<Meta>>, S3Error> {
        let prefix = self.key(rel_dir);
        let s3 = Arc::clone(&self.s3);
        let listed = self.call(rel_dir, async move {
            let mut stream = s3.list(Some(&prefix));
            let mut out = Vec::new();
            let mut key_bytes = 0usize;
            while let Some(item) = stream.next().await {
                let item = item?;
                key_bytes += item.location.as_ref().len();
                if item.location.as_ref().len() > KEY_MAX || key_bytes > LIST_KEY_BYTES_MAX {
                    return Err(object_store::Error::Generic {
                        store: "S3",
                        source: format!(
                            "the server listed a key longer than {KEY_MAX} bytes, or more than {} MiB of keys",
                            LIST_KEY_BYTES_MAX >> 20
                        )
                        .into(),
                    });
                }
                out.push(item);
                if out.len() > LIST_MAX {
                    break;
                }
            }
            Ok(out)
        })?;
        if listed.len() > LIST_MAX {
            return Ok(None);
        }
        Ok(Some(listed.into_iter().map(|m| self.meta(m)).collect()))
    }

    /// Opens the object `rel` for reading as it downloads; `None` if there
    /// is no such object. Each chunk must arrive within the call timeout (a
    /// stalled server fails the read, however large the object).
    pub fn reader(&self, rel: &str) -> Result<Option<ObjectReader<'_>>, S3Error> {
        let got = match self.call(rel, self.s3.get(&self.key(rel))) {
            Ok(g) => g,
            Err(S3Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(ObjectReader {
            bucket: self,
            rel: rel.to_string(),
            size: got.meta.size,
            stream: got.into_stream(),
            chunk: bytes::Bytes::new(),
        }))
    }

    /// Streams the object `rel` into `sink`; returns how many bytes came.
    pub fn download(&self, rel: &str, sink: &mut dyn std::io::Write) -> Result<u64, S3Error> {
        let mut reader =
            self.reader(rel)?.ok_or_else(|| S3Error::NotFound(format!("{}: no such object", self.shown(rel))))?;
        let mut total = 0u64;
        while let Some(chunk) = reader.next_chunk()? {
            sink.write_all(&chunk)
                .map_err(|e| S3Error::Other(format!("{}: writing what arrived: {e}", self.shown(rel))))?;
            total += chunk.len() as u64;
        }
        Ok(total)
    }

    /// The multipart uploads begun beneath `rel_dir` and never completed or
    /// aborted (a killed run leaves one), at most [`LIST_MAX`].
    pub fn pending_uploads(&self, rel_dir: &str) -> Result<Vec<PendingUpload>, S3Error> {
        let prefix = match (self.location.prefix.is_empty(), rel_dir.is_empty()) {
            (true, true) => String::new(),
            (false, true) => format!("{}/", self.location.prefix),
            _ => format!("{}/", self.location.key(rel_dir)),
        };
        let mut found = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut query = vec![("uploads", String::new()), ("prefix", prefix.clone())];
            if let Some((key, id)) = &markers {
                query.push(("key-marker", key.clone()));
                query.push(("upload-id-marker", id.clone()));
            }
            let body = self.raw_request(rel_dir, reqwest::Method::GET, "", &query)?;
            for upload in xml_elements(&body, "Upload") {
                let (Some(key), Some(id)) = (xml_text(upload, "Key"), xml_text(upload, "UploadId")) else { continue };
                if key.len() > KEY_MAX || id.len() > KEY_MAX {
                    return Err(S3Error::Other(format!(
                        "{}: the server listed an upload with a key or id longer than {KEY_MAX} bytes",
                        self.shown(rel_dir)
                    )));
                }
                let rel = self.location.rel_of(&key).to_string();
                let initiated = xml_text(upload, "Initiated")
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                    .map(|t| t.with_timezone(&chrono::Utc));
                found.push(PendingUpload { rel, upload_id: id, initiated });
            }
            if found.len() > LIST_MAX {
                return Err(S3Error::Other(format!(
                    "{}: more than {LIST_MAX} incomplete uploads",
                    self.shown(rel_dir)
                )));
            }
            let truncated = xml_text(&body, "IsTruncated").is_some_and(|t| t == "true");
            match (truncated, xml_text(&body, "NextKeyMarker"), xml_text(&body, "NextUploadIdMarker")) {
                (true, Some(k), Some(i)) if markers.as_ref() != Some(&(k.clone(), i.clone())) => markers = Some((k, i)),
                _ => return Ok(found),
            }
        }
    }

    /// Aborts an incomplete upload: the server drops its parts.
    pub fn abort_upload(&self, rel: &str, upload_id: &str) -> Result<(), S3Error> {
        let key = self.location.key(rel);
        match self.raw_request(rel, reqwest::Method::DELETE, &key, &[("uploadId", upload_id.to_string())]) {
            Ok(_) | Err(S3Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One signed request for `key` (empty: the bucket) with `query`;
    /// the response body, bounded to [`super::bounded::ANSWER_MAX`].
    fn raw_request(
        &self,
        rel: &str,
        method: reqwest::Method,
        key: &str,
        query: &[(&str, String)],
    ) -> Result<String, S3Error> {
        let raw = &self.raw;
        let bucket = &self.location.bucket;
        let path: String = key.split('/').map(uri_encode).collect::<Vec<_>>().join("/");
        let mut url = if raw.path_style {
            format!("{}/{bucket}/{path}", raw.endpoint)
        } else {
            let (scheme, host) = raw.endpoint.split_once("://").unwrap_or(("https", &raw.endpoint));
            format!("{scheme}://{bucket}.{host}/{path}")
        };
        let mut sorted: Vec<_> = query.to_vec();
        sorted.sort();
        let pairs: Vec<String> = sorted
            .iter()
            .map(
                |(k, v)| if v.is_empty() && *k == "uploads" { k.to_string() } else { format!("{k}={}", uri_encode(v)) },
            )
            .collect();
        if !pairs.is_empty() {
            url.push('?');
            url.push_str(&pairs.join("&"));
        }
        let uri: http::Uri =
            url.parse().map_err(|e| S3Error::Other(format!("{}: bad request URL: {e}", self.shown(rel))))?;
        let mut request = http::Request::builder()
            .method(method.as_str())
            .uri(uri)
            .body(object_store::client::HttpRequestBody::empty())
            .map_err(|e| S3Error::Other(format!("{}: {e}", self.shown(rel))))?;
        let host = request.uri().authority().map(|a| a.to_string()).unwrap_or_default();
        request.headers_mut().insert(http::header::HOST, host.parse().expect("an authority is a header value"));
        object_store::aws::AwsAuthorizer::new(&raw.credential, "s3", &raw.region)
            .try_authorize(&mut request, None)
            .map_err(|e| S3Error::Other(format!("{}: cannot sign the request: {e}", self.shown(rel))))?;
        let mut send = raw.http.request(method, url);
        for (name, value) in request.headers() {
            send = send.header(name.as_str(), value.as_bytes());
        }
        let shown = self.shown(rel);
        let (limit, by_deadline) = self.limit();
        let result = self.rt.block_on(async {
            tokio::time::timeout(limit, async {
                let response = send.send().await.map_err(|e| {
                    S3Error::Unreachable(format!("{shown}: cannot reach the server: {}", clean(&e.to_string())))
                })?;
                let status = response.status();
                let body = crate::http::read_bounded(response, super::bounded::ANSWER_MAX as usize).await.map_err(
                    |e| match e {
                        crate::http::BodyError::TooLong(_) => {
                            S3Error::Other(format!("{shown}: the answer is too large"))
                        }
                        crate::http::BodyError::Transport(why) => S3Error::Unreachable(format!("{shown}: {why}")),
                    },
                )?;
                Ok::<_, S3Error>((status, String::from_utf8_lossy(&body).into_owned()))
            })
            .await
        });
        let (status, body) = match result {
            Ok(r) => r?,
            Err(_) => return Err(self.timed_out(&shown, by_deadline)),
        };
        if status.is_success() {
            return Ok(body);
        }
        let code = xml_text(&body, "Code").unwrap_or_else(|| status.to_string());
        Err(match code.as_str() {
            "NoSuchBucket" => S3Error::NoBucket(format!("{shown}: the bucket does not exist (create it first)")),
            "NoSuchUpload" | "NoSuchKey" => S3Error::NotFound(format!("{shown}: no such upload")),
            "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "ExpiredToken" | "AccessDenied" => {
                S3Error::Denied(format!("{shown}: the server refused us ({})", clean(&code)))
            }
            _ if status.is_server_error() => {
                S3Error::ServerFailed(format!("{shown}: the server failed: {} {}", status.as_u16(), clean(&code)))
            }
            _ => S3Error::Other(format!("{shown}: {} {}", status.as_u16(), clean(&code))),
        })
    }

    /// Whether the bucket answers to our credentials: one list request.
    pub fn probe(&self) -> Result<(), S3Error> {
        let prefix = self.key(super::META_DIR);
        self.call(super::META_DIR, self.s3.list_with_delimiter(Some(&prefix))).map(|_| ())
    }

    fn meta(&self, m: object_store::ObjectMeta) -> Meta {
        let rel = self.location.rel_of(m.location.as_ref()).to_string();
        Meta { rel, size: m.size, etag: m.e_tag, modified: m.last_modified }
    }
}

thread_local! {
    /// The deadline of the work this thread does; see [`deadline_scope`].
    static DEADLINE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Until the guard is dropped, every call this thread makes to any bucket
/// (each chunk of a download too) also ends by `until`: work a run does
/// after its script, such as copies, stays within the run's deadline.
/// Other threads, such as a lock's heartbeat, are not bounded by it. The
/// deadline before comes back when the guard is dropped.
pub fn deadline_scope(until: Option<Instant>) -> DeadlineScope {
    DeadlineScope { before: DEADLINE.replace(until) }
}

/// See [`deadline_scope`].
#[must_use = "the deadline holds only while the guard lives"]
pub struct DeadlineScope {
    before: Option<Instant>,
}

impl Drop for DeadlineScope {
    fn drop(&mut self) {
        DEADLINE.set(self.before);
    }
}

/// An object being downloaded, read as it arrives ([`Bucket::reader`]).
pub struct ObjectReader<'a> {
    bucket: &'a Bucket,
    rel: String,
    size: u64,
    stream: futures_util::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
    /// What has arrived and not been read yet.
    chunk: bytes::Bytes,
}

impl ObjectReader<'_> {
    /// The object's size, as the server gave it when the download began.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next piece to arrive (or what is left of one); `None` at the end.
    fn next_chunk(&mut self) -> Result<Option<bytes::Bytes>, S3Error> {
        if !self.chunk.is_empty() {
            return Ok(Some(std::mem::take(&mut self.chunk)));
        }
        let stream = &mut self.stream;
        self.bucket.call(&self.rel, async { stream.next().await.transpose() })
    }
}

impl std::io::Read for ObjectReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.chunk.is_empty() {
            match self.next_chunk().map_err(std::io::Error::other)? {
                Some(chunk) => self.chunk = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// Sorts object_store's error into ours. Servers differ in how they say
/// things (AWS, SeaweedFS, MinIO), so the S3 error code in the message
/// decides where the status alone does not.
fn classify(what: &str, e: object_store::Error) -> S3Error {
    use object_store::Error as E;
    let text = e.to_string();
    // The server's error code, from the XML body object_store quotes. (The
    // message also holds the request's URI, which may hold any key, but a
    // URI cannot hold `<`.)
    let code = |code: &str| text.contains(&format!("<Code>{code}</Code>"));
    if code("NoSuchBucket") {
        return S3Error::NoBucket(format!("{what}: the bucket does not exist (create it first)"));
    }
    if let Some(why) = [
        ("InvalidAccessKeyId", "unknown access key"),
        ("ExpiredToken", "expired token"),
        ("SignatureDoesNotMatch", "signature does not match"),
    ]
    .into_iter()
    .find_map(|(c, why)| code(c).then_some(why))
    {
        return S3Error::Denied(format!(
            "{what}: the server refused our credentials ({why}); check the access key and secret"
        ));
    }
    let unanswered = no_answer(&e);
    match e {
        E::NotFound { .. } => S3Error::NotFound(format!("{what}: no such object")),
        E::AlreadyExists { .. } => S3Error::Conflict(format!("{what}: it already exists")),
        E::Precondition { .. } | E::NotModified { .. } => {
            S3Error::Conflict(format!("{what}: it was changed meanwhile"))
        }
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            S3Error::Denied(format!("{what}: access denied: {}", clean(&text)))
        }
        _ if unanswered => S3Error::Unreachable(format!("{what}: cannot reach the server: {}", clean(&text))),
        // object_store's words for an answer it gave up on after retries.
        _ if text.contains("non-2xx status code: 5") => {
            S3Error::ServerFailed(format!("{what}: the server failed: {}", clean(&text)))
        }
        _ => S3Error::Other(format!("{what}: {}", clean(&text))),
    }
}

/// Whether a request got no answer: no connection, or one that broke or
/// timed out on the way, as object_store's HTTP layer sorted it. An answer
/// that could not be decoded is an answer.
fn no_answer(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(http) = err.downcast_ref::<object_store::client::HttpError>() {
            return http.kind() != object_store::client::HttpErrorKind::Decode;
        }
        next = err.source();
    }
    false
}

/// The endpoint object_store wants: for virtual-hosted style on a server
/// of the user's, the bucket's own host name (`https://BUCKET.HOST`);
/// `None` is AWS, whose host names object_store makes itself.
fn client_endpoint(settings: &S3Settings, bucket: &str) -> Option<String> {
    let endpoint = settings.endpoint.as_deref()?.trim_end_matches('/');
    if settings.path_style {
        return Some(endpoint.to_string());
    }
    let (scheme, host) = endpoint.split_once("://")?;
    Some(format!("{scheme}://{bucket}.{host}"))
}

/// S3's URI encoding: everything but unreserved characters, `%XX`.
fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inner texts of every `<tag>…</tag>` in `xml` (S3's answers are
/// flat enough for this; nothing nests a tag inside itself).
fn xml_elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        out.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    out
}

/// The first `<tag>` text in `xml`, with XML's five entities decoded.
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let inner = *xml_elements(xml, tag).first()?;
    Some(
        inner
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// Server text for a message: one line, escaped, bounded.
fn clean(text: &str) -> String {
    crate::text::truncate(&crate::text::escape(text), 400).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_hosted_style_puts_the_bucket_in_the_host_name() {
        let with = |endpoint: Option<&str>, path_style| {
            client_endpoint(
                &S3Settings { endpoint: endpoint.map(str::to_string), path_style, ..Default::default() },
                "bk",
            )
        };
        assert_eq!(with(Some("https://s3.example.net/"), true).as_deref(), Some("https://s3.example.net"));
        assert_eq!(with(Some("https://s3.example.net:9000"), false).as_deref(), Some("https://bk.s3.example.net:9000"));
        assert_eq!(with(None, false), None);
    }

    #[test]
    fn xml_answers_are_read_with_their_entities() {
        let xml = "<R><Upload><Key>a&amp;b &lt;c&gt;</Key><UploadId>1</UploadId></Upload><Upload><Key>d</Key>\
                   <UploadId>2</UploadId></Upload><IsTruncated>false</IsTruncated></R>";
        let uploads = xml_elements(xml, "Upload");
        assert_eq!(uploads.len(), 2);
        assert_eq!(xml_text(uploads[0], "Key").as_deref(), Some("a&b <c>"));
        assert_eq!(xml_text(xml, "IsTruncated").as_deref(), Some("false"));
        assert_eq!(uri_encode("a b&c/~"), "a%20b%26c%2F~");
    }

    #[test]
    fn a_deadline_bounds_its_own_thread_only_and_the_one_before_comes_back() {
        let later = Instant::now() + Duration::from_secs(60);
        {
            let _outer = deadline_scope(Some(later));
            assert_eq!(DEADLINE.get(), Some(later));
            {
                let _inner = deadline_scope(None);
                assert_eq!(DEADLINE.get(), None);
            }
            assert_eq!(DEADLINE.get(), Some(later));
            // A lock's heartbeat runs on a thread of its own.
            assert_eq!(std::thread::spawn(|| DEADLINE.get()).join().unwrap(), None);
        }
        assert_eq!(DEADLINE.get(), None);
    }

    #[test]
    fn errors_are_sorted_by_what_happened_not_by_what_a_key_says() {
        use object_store::client::{HttpError, HttpErrorKind};
        let generic =
            |source: Box<dyn std::error::Error + Send + Sync>| object_store::Error::Generic { store: "S3", source };
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = generic(Box::new(HttpError::new(HttpErrorKind::Connect, refused)));
        assert!(matches!(classify("s3://b/k", e), S3Error::Unreachable(_)));
        // A server's answer that names a key with such words in it.
        let answered = "PUT http://h/b/reconnect-timed-out-NoSuchBucket.tgz - Server returned non-2xx status \
                        code: 500: <Error><Code>InternalError</Code></Error>";
        assert!(matches!(classify("s3://b/k", generic(answered.into())), S3Error::ServerFailed(_)));
        let no_bucket = "Server returned non-2xx status code: 404: <Error><Code>NoSuchBucket</Code></Error>";
        assert!(matches!(classify("s3://b/k", generic(no_bucket.into())), S3Error::NoBucket(_)));
        let denied = "Server returned non-2xx status code: 403: <Error><Code>InvalidAccessKeyId</Code></Error>";
        let sorted = classify("s3://b/k", generic(denied.into()));
        assert!(matches!(&sorted, S3Error::Denied(m) if m.contains("unknown access key")), "{sorted:?}");
    }
}
