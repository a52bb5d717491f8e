//! Write [Offsite] backup scripts in Rust.
//!
//! A script is a `cdylib` crate built for `wasm32-wasip2`. It implements
//! [`Script`] and registers it with [`script!`]. Everything it can do goes
//! through the modules here ([`clock`], [`log`], [`params`], [`archive`],
//! [`files`], [`ssh`], [`scp`], [`secrets`]),
//! and every call is checked against the site's grants by the runner. A
//! refusal is an ordinary [`HostError`], so `?` works on every call.
//!
//! ```no_run
//! use offsite_sdk::{Param, Result, Script, ScriptInfo, archive, clock, params};
//!
//! struct Arc;
//!
//! impl Script for Arc {
//!     fn describe() -> ScriptInfo {
//!         ScriptInfo::new("arc", "0.1.0")
//!             .description("tar czf PATH.YYYYmmdd-HHMMSS.tgz PATH")
//!             .param(Param::required("path", "directory to archive"))
//!             .capabilities(["archive", "clock", "params"])
//!     }
//!
//!     fn run() -> Result<()> {
//!         let path = params::require("path")?;
//!         let stamp = clock::now().format("%Y%m%d-%H%M%S")?;
//!         archive::tar_gz(&[&path], &format!("{path}.{stamp}.tgz"))?;
//!         Ok(())
//!     }
//! }
//!
//! offsite_sdk::script!(Arc);
//! ```
//!
//! [Offsite]: https://crates.io/crates/offsite

extern crate self as offsite_sdk;

/// The raw generated bindings. Not part of the API: use the modules above.
#[doc(hidden)]
pub mod wit {
    wit_bindgen::generate!({
        path: "wit",
        world: "script",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "offsite_sdk::wit",
        runtime_path: "offsite_sdk::__private::wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;
}

pub use anyhow::{Context, Error, Result, anyhow, bail, ensure};

/// ```
/// use offsite_sdk::{Param, ParamSpec};
/// let spec: ParamSpec = Param::required("path", "what to archive").into();
/// assert_eq!(spec.name, "path");
/// ```
#[doc(inline)]
pub use crate::wit::offsite::backup::meta::ParamSpec;
/// ```
/// let info = offsite_sdk::ScriptInfo::new("arc", "0.1.0");
/// assert_eq!(info.version, "0.1.0");
/// ```
#[doc(inline)]
pub use crate::wit::offsite::backup::meta::ScriptInfo;
/// The cases of a [`HostError`], to match on.
///
/// ```
/// use offsite_sdk::{HostError, HostErrorKind};
/// let e = HostError::from(HostErrorKind::NotFound("beoserver".into()));
/// match e.kind() {
///     HostErrorKind::NotFound(what) => assert_eq!(what, "beoserver"),
///     other => panic!("{other:?}"),
/// }
/// ```
#[doc(inline)]
pub use crate::wit::offsite::backup::types::Error as HostErrorKind;
/// ```no_run
/// let stored: offsite_sdk::FileInfo = offsite_sdk::archive::tar_gz(&["www"], "www.tgz")?;
/// assert_eq!(stored.sha256.len(), 64);
/// # Ok::<(), offsite_sdk::HostError>(())
/// ```
#[doc(inline)]
pub use crate::wit::offsite::backup::types::FileInfo;

pub mod archive;
pub mod clock;
pub mod files;
pub mod log;
mod meta;
pub mod params;
pub mod scp;
pub mod secrets;
pub mod ssh;

pub use meta::Param;

/// A backup script: its metadata and its work.
///
/// ```no_run
/// use offsite_sdk::{Result, Script, ScriptInfo};
///
/// struct Noop;
///
/// impl Script for Noop {
///     fn describe() -> ScriptInfo {
///         ScriptInfo::new("noop", "1.0.0")
///     }
///     fn run() -> Result<()> {
///         Ok(())
///     }
/// }
/// offsite_sdk::script!(Noop);
/// ```
pub trait Script {
    /// Static metadata. It runs with every capability denied, so it must
    /// only build and return the value.
    fn describe() -> ScriptInfo;

    /// Does the backup. An `Err` makes the run fail (exit code 1), with the
    /// error and its context chain as the reason.
    fn run() -> Result<()>;
}

/// Exports a [`Script`] implementation as the component's `run` and
/// `describe`. Use it once per script crate.
///
/// ```no_run
/// # use offsite_sdk::{Result, Script, ScriptInfo};
/// struct Mine;
/// impl Script for Mine {
///     fn describe() -> ScriptInfo { ScriptInfo::new("mine", "0.1.0") }
///     fn run() -> Result<()> { Ok(()) }
/// }
/// offsite_sdk::script!(Mine);
/// ```
#[macro_export]
macro_rules! script {
    ($ty:ty) => {
        const _: () = {
            struct __OffsiteExport;

            impl $crate::wit::Guest for __OffsiteExport {
                fn describe() -> $crate::ScriptInfo {
                    <$ty as $crate::Script>::describe()
                }

                fn run() -> ::core::result::Result<(), ::std::string::String> {
                    <$ty as $crate::Script>::run().map_err(|e| ::std::format!("{e:#}"))
                }
            }

    $crate::wit::__export_world!(__OffsiteExport with_types_in $crate::wit);
        };
    };
}

/// Why a host call failed: the site's grants refused it, or it failed while
/// it ran. Its `Display` is `kind: message`, e.g. `denied: host db9 is not
/// granted`.
///
/// ```
/// use offsite_sdk::{HostError, HostErrorKind};
/// let e = HostError::from(HostErrorKind::Denied("host db9 is not granted".into()));
/// assert_eq!(e.to_string(), "denied: host db9 is not granted");
/// assert!(e.is_denied());
/// ```
#[derive(Debug, Clone)]
pub struct HostError(HostErrorKind);

impl HostError {
    /// The WIT error case, to match on.
    ///
    /// ```
    /// use offsite_sdk::{HostError, HostErrorKind};
    /// let e = HostError::from(HostErrorKind::Timeout("slow".into()));
    /// assert!(matches!(e.kind(), HostErrorKind::Timeout(_)));
    /// ```
    pub fn kind(&self) -> &HostErrorKind {
        &self.0
    }

    /// True when the site's grants refused the call.
    ///
    /// ```
    /// use offsite_sdk::{HostError, HostErrorKind};
    /// assert!(HostError::from(HostErrorKind::Denied("no".into())).is_denied());
    /// assert!(!HostError::from(HostErrorKind::Io("disk".into())).is_denied());
    /// ```
    pub fn is_denied(&self) -> bool {
        matches!(self.0, HostErrorKind::Denied(_))
    }

    /// The host's message, without the kind.
    ///
    /// ```
    /// use offsite_sdk::{HostError, HostErrorKind};
    /// assert_eq!(HostError::from(HostErrorKind::Io("disk full".into())).message(), "disk full");
    /// ```
    pub fn message(&self) -> &str {
        match &self.0 {
            HostErrorKind::Denied(m)
            | HostErrorKind::NotFound(m)
            | HostErrorKind::Io(m)
            | HostErrorKind::Timeout(m)
            | HostErrorKind::RemoteFailed(m)
            | HostErrorKind::InvalidArgument(m)
            | HostErrorKind::LimitExceeded(m) => m,
        }
    }
}

impl From<HostErrorKind> for HostError {
    fn from(kind: HostErrorKind) -> HostError {
        HostError(kind)
    }
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.0 {
            HostErrorKind::Denied(_) => "denied",
            HostErrorKind::NotFound(_) => "not found",
            HostErrorKind::Io(_) => "I/O error",
            HostErrorKind::Timeout(_) => "timed out",
            HostErrorKind::RemoteFailed(_) => "remote command failed",
            HostErrorKind::InvalidArgument(_) => "invalid argument",
            HostErrorKind::LimitExceeded(_) => "limit exceeded",
        };
        write!(f, "{kind}: {}", self.message())
    }
}

impl std::error::Error for HostError {}
