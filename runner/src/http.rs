//! Reading an HTTP answer whole, bounded by bytes: the one way any server's
//! answer (an S3 listing or error, a registry manifest, token or error) is
//! held in memory. A claimed length over the bound is refused before the
//! first byte; the rest is counted as it arrives.

/// Why an answer could not be read whole.
#[derive(Debug)]
pub enum BodyError {
    /// It is (or claims to be) longer than the bound.
    TooLong(usize),
    /// The connection failed while it came (the whole chain of causes).
    Transport(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLong(max) => write!(f, "longer than {max} bytes: refused"),
            BodyError::Transport(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for BodyError {}

/// The body of `response`, whole, at most `max` bytes.
pub async fn read_bounded(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, BodyError> {
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLong(max));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| BodyError::Transport(chain(&e)))? {
        if body.len() + chunk.len() > max {
            return Err(BodyError::TooLong(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// An error with its whole chain of causes (a TLS or connection error is
/// in the source).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
