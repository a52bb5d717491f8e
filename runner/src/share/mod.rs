//! Sharing scripts: registry references, the local script store,
//! signatures, registries, and what a site pins.

#[cfg(feature = "runtime")]
pub mod auth;
pub mod cache;
pub mod reference;
#[cfg(feature = "runtime")]
pub mod registry;
pub mod signing;
