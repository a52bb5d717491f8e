//! Where an S3 store is: `s3://BUCKET/PREFIX` and how to reach it.

use std::fmt;

/// A bucket and a key prefix inside it, parsed strictly: the bucket
/// follows S3's naming rules, the prefix is plain `/`-separated names
/// (no empty, `.` or `..` segments, no control characters), so every key
/// the store makes is one the user can predict and list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty (the whole bucket).
    pub prefix: String,
}

impl S3Location {
    /// Parses `s3://BUCKET` or `s3://BUCKET/PREFIX`.
    pub fn parse(url: &str) -> Result<S3Location, String> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| format!("{url:?} does not start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        check_bucket(bucket).map_err(|why| format!("{url:?}: bucket {bucket:?} {why}"))?;
        let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
        if !prefix.is_empty() {
            for segment in prefix.split('/') {
                if segment.is_empty() || segment == "." || segment == ".." {
                    return Err(format!("{url:?}: the prefix has an empty, `.` or `..` part"));
                }
                if segment.chars().any(|c| c.is_control()) {
                    return Err(format!("{url:?}: the prefix has a control character"));
                }
            }
        }
        if prefix.len() > 512 {
            return Err(format!("{url:?}: the prefix is longer than 512 bytes"));
        }
        Ok(S3Location { bucket: bucket.to_string(), prefix: prefix.to_string() })
    }

    /// The full key of `rel` (a `/`-separated path) under the prefix.
    pub fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() { rel.to_string() } else { format!("{}/{rel}", self.prefix) }
    }

    /// The path of `key` under the prefix: the inverse of [`key`](Self::key)
    /// (a key outside the prefix comes back whole).
    pub fn rel_of<'a>(&self, key: &'a str) -> &'a str {
        match self.prefix.as_str() {
            "" => key,
            p => key.strip_prefix(p).and_then(|k| k.strip_prefix('/')).unwrap_or(key),
        }
    }
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// S3's bucket naming rules (the general-purpose bucket ones).
fn check_bucket(name: &str) -> Result<(), &'static str> {
    if !(3..=63).contains(&name.len()) {
        return Err("must be 3 to 63 characters long");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.') {
        return Err("may only have lower-case letters, digits, `-` and `.`");
    }
    let first_last = [name.as_bytes()[0], name.as_bytes()[name.len() - 1]];
    if !first_last.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        return Err("must start and end with a letter or digit");
    }
    if name.contains("..") {
        return Err("may not have two dots in a row");
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err("may not look like an IP address");
    }
    Ok(())
}

/// How to reach the server: the `[s3]` table of a site file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct S3Settings {
    /// `https://…` (or `http://` for a server on this machine's loopback);
    /// `None` is AWS itself.
    pub endpoint: Option<String>,
    /// `None`: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's, or
    /// `us-east-1`.
    pub region: Option<String>,
    /// `https://ENDPOINT/BUCKET/KEY` rather than `https://BUCKET.ENDPOINT/KEY`
    /// (most self-hosted servers want this).
    pub path_style: bool,
    /// The profile in `~/.aws/credentials` and `~/.aws/config`; `None`:
    /// `AWS_PROFILE`, else `default`.
    pub profile: Option<String>,
}

impl S3Settings {
    /// Refuses an endpoint that would send credentials in the clear to
    /// another machine: plain `http://` is only for loopback addresses.
    pub fn check(&self) -> Result<(), String> {
        let Some(endpoint) = &self.endpoint else { return Ok(()) };
        let (scheme, rest) = endpoint
            .split_once("://")
            .ok_or_else(|| format!("endpoint {endpoint:?} is not a URL (https://HOST[:PORT])"))?;
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        if host.is_empty() || host.contains('@') {
            return Err(format!("endpoint {endpoint:?} must be https://HOST[:PORT], without a user name"));
        }
        if rest.len() > host.len() && rest[host.len()..] != *"/" {
            return Err(format!("endpoint {endpoint:?} must not have a path; the bucket and prefix go in `store`"));
        }
        match scheme {
            "https" => Ok(()),
            "http" if is_loopback(host) => Ok(()),
            "http" => Err(format!(
                "endpoint {endpoint:?} is plain http to another machine: requests, credentials' signatures \
                 and backups would cross the network unencrypted; use https"
            )),
            _ => Err(format!("endpoint {endpoint:?} must start with https://")),
        }
    }
}

fn is_loopback(host_port: &str) -> bool {
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.rsplit_once(':').map_or(host_port, |(h, _)| h)
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_strictly() {
        let l = S3Location::parse("s3://backups/web1/daily/").unwrap();
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("backups", "web1/daily"));
        assert_eq!(l.key("x.tgz"), "web1/daily/x.tgz");
        assert_eq!(l.rel_of(&l.key("a/x.tgz")), "a/x.tgz");
        assert_eq!(l.rel_of("web1/dailyx"), "web1/dailyx");
        assert_eq!(l.to_string(), "s3://backups/web1/daily");
        let whole = S3Location::parse("s3://backups").unwrap();
        assert_eq!((whole.prefix.as_str(), whole.key("a"), whole.rel_of("a")), ("", "a".to_string(), "a"));
        for bad in [
            "backups/web1",
            "s3://",
            "s3://ab",
            "s3://Backups",
            "s3://-backups",
            "s3://back..ups",
            "s3://192.168.1.1",
            "s3://backups/a//b",
            "s3://backups/a/../b",
            "s3://backups/./b",
            "s3://backups/a\nb",
        ] {
            assert!(S3Location::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_http_only_to_loopback() {
        let with = |e: &str| S3Settings { endpoint: Some(e.into()), ..Default::default() }.check();
        assert!(with("https://s3.example.net").is_ok());
        assert!(with("https://s3.example.net:9000/").is_ok());
        assert!(with("http://127.0.0.1:8333").is_ok());
        assert!(with("http://localhost:8333").is_ok());
        assert!(with("http://[::1]:8333").is_ok());
        assert!(with("http://s3.example.net").unwrap_err().contains("unencrypted"));
        assert!(with("http://10.0.0.5:9000").unwrap_err().contains("unencrypted"));
        assert!(with("https://s3.example.net/backups").unwrap_err().contains("path"));
        assert!(with("https://user@s3.example.net").is_err());
        assert!(with("ftp://s3.example.net").is_err());
        assert!(with("s3.example.net").is_err());
    }
}
