//! Stores on S3-compatible object storage.
//!
//! - [`location`]: `s3://BUCKET/PREFIX` and the `[s3]` settings;
//! - [`credentials`]: keys from the environment or `~/.aws`, never from
//!   the site file;
//! - [`client`]: a blocking client with a timeout on every call;
//! - [`bounded`]: every answer read whole is bounded by bytes;
//! - [`lock`]: one run per store at a time, across machines;
//! - [`upload`]: streaming an object in parts with bounded memory.

#[cfg(feature = "runtime")]
pub mod bounded;
#[cfg(feature = "runtime")]
pub mod client;
#[cfg(feature = "runtime")]
pub mod credentials;
pub mod location;
#[cfg(feature = "runtime")]
pub mod lock;
#[cfg(feature = "runtime")]
pub mod upload;

#[cfg(feature = "runtime")]
pub use self::client::{Bucket, LIST_MAX, Meta, Put, S3Error};
pub use self::location::{S3Location, S3Settings};

/// The runner's own keys under a store's prefix (as in a local store).
pub const META_DIR: &str = ".offsite";
