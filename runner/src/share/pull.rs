//! The read side of a registry, with every answer bounded by bytes.
//!
//! oci-client reads a manifest, a token and every error answer whole before
//! anything checks its size, so a hostile or broken registry could make a
//! pull (and `watch`, following a tag) hold gigabytes. Reading goes through
//! this small client instead: each answer read whole is read chunk by chunk
//! up to its bound (a claimed length over it is refused before the first
//! byte), and a blob streams to its caller. It speaks the distribution
//! API's GET with the authorization a 401 asks for: HTTP Basic with the
//! user's credentials, or a Bearer token from the challenge's realm.
//! Pushing stays with oci-client: it goes to a registry one publishes to.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use base64::Engine as _;
use oci_client::secrets::RegistryAuth;

/// Most bytes of a token answer.
pub const MAX_TOKEN_BYTES: usize = 64 << 10;
/// Most bytes of an error answer kept (for its message).
const MAX_ERROR_BYTES: usize = 16 << 10;
/// Longest `WWW-Authenticate` challenge read.
const MAX_CHALLENGE_BYTES: usize = 4 << 10;

/// A registry's read side, for one registry and the user's credentials.
pub struct Reader {
    http: reqwest::Client,
    registry: String,
    auth: RegistryAuth,
    /// The `Authorization` a challenge asked for, per repository.
    granted: Mutex<BTreeMap<String, String>>,
}

/// What a GET found.
pub enum Found {
    Yes(reqwest::Response),
    /// 404: the registry has nothing there.
    No,
}

/// The registry refused the credentials (or asked for some and none were
/// configured).
#[derive(Debug)]
pub struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the registry refused the credentials")
    }
}

impl std::error::Error for Refused {}

impl Reader {
    /// `cas` are extra PEM CAs (the registry's `certs.d`), on top of the
    /// system's.
    pub fn new(registry: &str, cas: &[Vec<u8>], auth: RegistryAuth, connect: Duration, read: Duration) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(connect)
            .read_timeout(read)
            .https_only(true)
            .user_agent(concat!("offsite/", env!("CARGO_PKG_VERSION")));
        for pem in cas {
            let cert = reqwest::Certificate::from_pem(pem).map_err(|e| anyhow!("a CA for {registry}: {e}"))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| anyhow!("cannot set up the registry client: {e}"))?;
        Ok(Reader { http, registry: registry.to_string(), auth, granted: Mutex::new(BTreeMap::new()) })
    }

    /// GETs `/v2/REPOSITORY/PATH`, authorizing as the registry asks.
    pub async fn get(&self, repository: &str, path: &str, accept: Option<&str>) -> Result<Found> {
        let url = format!("https://{}/v2/{repository}/{path}", self.registry);
        let granted = self.granted.lock().unwrap_or_else(|e| e.into_inner()).get(repository).cloned();
        let mut response = self.send(&url, accept, granted.as_deref()).await?;
        if response.status() == reqwest::StatusCode::UNAUTHORIZED && granted.is_none() {
            let authorization = self.authorize(repository, &response).await?;
            self.granted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(repository.to_string(), authorization.clone());
            response = self.send(&url, accept, Some(&authorization)).await?;
        }
        let status = response.status();
        if status.is_success() {
            return Ok(Found::Yes(response));
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(Found::No);
        }
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(anyhow::Error::new(Refused));
        }
        let said = read_bounded(response, MAX_ERROR_BYTES, "an error answer").await.unwrap_or_default();
        let said = crate::text::truncate(&String::from_utf8_lossy(&said), 300).into_owned();
        bail!("{status}: {}", crate::text::escape(&said))
    }

    async fn send(&self, url: &str, accept: Option<&str>, authorization: Option<&str>) -> Result<reqwest::Response> {
        let mut request = self.http.get(url);
        if let Some(a) = accept {
            request = request.header(reqwest::header::ACCEPT, a);
        }
        if let Some(a) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, a);
        }
        request.send().await.map_err(|e| anyhow!("{}", crate::http::chain(&e)))
    }

    /// The `Authorization` a 401's challenge asks for.
    async fn authorize(&self, repository: &str, response: &reqwest::Response) -> Result<String> {
        let challenge = response
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= MAX_CHALLENGE_BYTES)
            .unwrap_or_default()
            .to_string();
        let basic = match &self.auth {
            RegistryAuth::Basic(user, password) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )),
            _ => None,
        };
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge.as_str(), ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return basic.ok_or_else(|| anyhow::Error::new(Refused));
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(anyhow::Error::new(Refused));
        }
        let params = challenge_params(params);
        let realm = params.get("realm").ok_or_else(|| anyhow!("the registry's challenge names no token realm"))?;
        let realm = reqwest::Url::parse(realm).map_err(|e| anyhow!("the registry's token realm: {e}"))?;
        if realm.scheme() != "https" {
            bail!("the registry's token realm is not HTTPS: refused");
        }
        let scope = format!("repository:{repository}:pull");
        let mut request = self.http.get(realm).query(&[("scope", scope.as_str())]);
        if let Some(service) = params.get("service") {
            request = request.query(&[("service", service.as_str())]);
        }
        if let Some(b) = &basic {
            request = request.header(reqwest::header::AUTHORIZATION, b);
        } else if let RegistryAuth::Bearer(token) = &self.auth {
            return Ok(format!("Bearer {token}"));
        }
        let answer = request.send().await.map_err(|e| anyhow!("{}", crate::http::chain(&e)))?;
        if !answer.status().is_success() {
            return Err(anyhow::Error::new(Refused));
        }
        let body = read_bounded(answer, MAX_TOKEN_BYTES, "the token answer").await?;
        let value: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| anyhow!("the token answer is not JSON: {e}"))?;
        let token = value
            .get("token")
            .or_else(|| value.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| anyhow!("the token answer holds no token"))?;
        Ok(format!("Bearer {token}"))
    }
}

/// A response's body, whole, at most `max` bytes (`what` names it).
pub async fn read_bounded(response: reqwest::Response, max: usize, what: &str) -> Result<Vec<u8>> {
    crate::http::read_bounded(response, max).await.map_err(|e| match e {
        crate::http::BodyError::TooLong(_) => anyhow!("{what} is {e}"),
        crate::http::BodyError::Transport(why) => anyhow!("{what}: {why}"),
    })
}

/// `key="value", key=value` pairs of a challenge.
fn challenge_params(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((v, n)) => (v, n),
                None => (quoted, ""),
            }
        } else {
            match after.split_once(',') {
                Some((v, n)) => (v.trim(), n),
                None => (after.trim(), ""),
            }
        };
        out.insert(key, value.to_string());
        rest = next.trim_start_matches(',').trim();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_read_with_quoted_and_bare_values() {
        let p = challenge_params(r#"realm="https://auth.example/token",service="registry.example",scope="a:b:pull""#);
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "a:b:pull");
        let p = challenge_params("realm=https://x/t, service=reg");
        assert_eq!((p["realm"].as_str(), p["service"].as_str()), ("https://x/t", "reg"));
    }
}
