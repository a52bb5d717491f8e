//! Offsite: runs sandboxed WebAssembly backup scripts with exactly the
//! capabilities a site file grants.
//!
//! - [`cli`]: the `offsite` command line and its exit codes;
//! - [`engine`]: wasmtime engine, compile cache, limits and epochs;
//! - [`caps`]: one module per WIT interface, each asking [`policy`] first;
//! - [`policy`]: the one place grants are decided;
//! - [`store`]: the site's store: staged, hashed writes, manifests, locks,
//!   recovery and retention;
//! - [`report`]: node_exporter textfile and notifications;
//! - [`reload`]: hot reload for `watch`: the last valid site + script pair;
//! - [`schedule`]: cron expressions in a site's time zone, DST rules;
//! - [`status`]: `offsite status`, each site's last and next run;
//! - [`site`]: site file parsing;
//! - [`check`]: `offsite check`, what a site allows and what is wrong with it;
//! - [`transport`]: SSH connections (the OpenSSH client);
//! - [`s3`]: stores on S3-compatible object storage.
//!
//! Without the default `runtime` feature only the parts that need no
//! WebAssembly engine are built (site files, policy, store, quoting, keys):
//! that is what the fuzz targets in `fuzz/` link against.

#[cfg(feature = "runtime")]
pub mod abort;
#[cfg(feature = "runtime")]
pub mod bindings;
#[cfg(feature = "runtime")]
pub mod build;
#[cfg(feature = "runtime")]
pub mod caps;
#[cfg(feature = "runtime")]
pub mod check;
#[cfg(feature = "runtime")]
pub mod cli;
pub mod compress;
#[cfg(feature = "runtime")]
pub mod copy;
#[cfg(feature = "runtime")]
pub mod docs;
#[cfg(feature = "runtime")]
pub mod engine;
#[cfg(feature = "runtime")]
pub mod exit;
/// The running user's home directory, with or without `HOME`.
pub mod home;
#[cfg(feature = "runtime")]
pub mod http;
#[cfg(feature = "runtime")]
pub mod json;
pub mod keys;
pub mod logging;
#[cfg(feature = "runtime")]
pub mod new;
#[cfg(feature = "runtime")]
pub mod output;
pub mod policy;
#[cfg(feature = "runtime")]
pub mod progress;
#[cfg(feature = "runtime")]
pub mod reload;
pub mod report;
#[cfg(feature = "runtime")]
pub mod restore;
#[cfg(feature = "runtime")]
pub mod run;
pub mod s3;
pub mod schedule;
pub mod share;
pub mod site;
#[cfg(feature = "runtime")]
pub mod sleep;
#[cfg(feature = "runtime")]
pub mod status;
pub mod stdout;
pub mod store;
#[cfg(feature = "runtime")]
pub mod systemd;
pub mod text;
pub mod transport;
#[cfg(feature = "runtime")]
pub mod verify;
#[cfg(feature = "runtime")]
pub mod watch;
