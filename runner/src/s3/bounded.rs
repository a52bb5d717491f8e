//! Every answer an S3 server sends, bounded by bytes before it is held.
//!
//! object_store reads a listing page, an upload's answer and every error
//! whole before it parses them, trusting the server's length. Its HTTP
//! client is wrapped here so that such bodies end in an error past
//! [`ANSWER_MAX`] bytes, and claim no size that would make a reader
//! reserve memory up front. Only a successful download of an object, which
//! callers stream chunk by chunk, is left unbounded.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpResponseBody, HttpService,
};

/// Most bytes of one answer that is read whole (a listing page of 1,000
/// keys of 1,024 bytes with their metadata is about 1.5 MB).
pub const ANSWER_MAX: u64 = 8 << 20;

/// Connects object_store through a client whose whole-read answers are
/// bounded.
#[derive(Debug, Default)]
pub struct BoundedConnector;

impl HttpConnector for BoundedConnector {
    fn connect(&self, options: &object_store::ClientOptions) -> object_store::Result<HttpClient> {
        let inner = object_store::client::ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(Bounded { inner, max: ANSWER_MAX }))
    }
}

#[derive(Debug)]
struct Bounded {
    inner: HttpClient,
    max: u64,
}

#[async_trait::async_trait]
impl HttpService for Bounded {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let download = is_download(&req);
        let response = self.inner.execute(req).await?;
        if download && response.status().is_success() {
            return Ok(response);
        }
        let (parts, body) = response.into_parts();
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(Limited { inner: body, left: self.max })))
    }
}

/// A GET of one object (no query string: a listing has `list-type=2`, the
/// multipart listing `uploads`): the only answer read as a stream.
fn is_download(req: &HttpRequest) -> bool {
    req.method() == http::Method::GET && req.uri().query().is_none_or(str::is_empty)
}

/// A body that fails once more than `left` bytes have come.
struct Limited {
    inner: HttpResponseBody,
    left: u64,
}

impl Body for Limited {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &poll
            && let Some(data) = frame.data_ref()
        {
            let n = data.len() as u64;
            if n > self.left {
                self.left = 0;
                return Poll::Ready(Some(Err(too_large())));
            }
            self.left -= n;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // The server's Content-Length is its claim: none is passed on, so
        // no reader reserves memory for it.
        SizeHint::new()
    }
}

fn too_large() -> HttpError {
    HttpError::new(
        HttpErrorKind::Decode,
        std::io::Error::other(format!("the server's answer is longer than {} MiB", ANSWER_MAX >> 20)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: http::Method, uri: &str) -> HttpRequest {
        http::Request::builder().method(method).uri(uri).body(object_store::client::HttpRequestBody::empty()).unwrap()
    }

    #[test]
    fn only_object_downloads_are_streams() {
        assert!(is_download(&request(http::Method::GET, "http://h/b/key")));
        assert!(!is_download(&request(http::Method::GET, "http://h/b?list-type=2&prefix=x")));
        assert!(!is_download(&request(http::Method::GET, "http://h/b?uploads")));
        assert!(!is_download(&request(http::Method::POST, "http://h/b/key?uploads")));
        assert!(!is_download(&request(http::Method::PUT, "http://h/b/key")));
    }

    #[test]
    fn a_long_answer_fails_and_claims_no_size() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let body = HttpResponseBody::from(vec![b'x'; 100]);
        let limited = HttpResponseBody::new(Limited { inner: body, left: 99 });
        assert_eq!(Body::size_hint(&limited).lower(), 0);
        let err = rt.block_on(limited.bytes()).unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
        let body = HttpResponseBody::from(vec![b'x'; 100]);
        let whole = rt.block_on(HttpResponseBody::new(Limited { inner: body, left: 100 }).bytes()).unwrap();
        assert_eq!(whole.len(), 100);
    }
}
