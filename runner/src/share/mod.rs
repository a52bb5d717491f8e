//! Sharing scripts: registry references, the local script store,
//! signatures, registries, and what a site pins.

#[cfg(feature = "runtime")]
pub mod auth;
pub mod cache;
#[cfg(feature = "runtime")]
pub mod commands;
#[cfg(feature = "runtime")]
pub mod diff;
pub mod lockfile;
#[cfg(feature = "runtime")]
pub mod pull;
pub mod reference;
#[cfg(feature = "runtime")]
pub mod registry;
#[cfg(feature = "runtime")]
pub mod resolve;
pub mod signing;
