//! Offsite: runs sandboxed WebAssembly backup scripts with exactly the
//! capabilities a site file grants.
//!
//! - [`cli`]: the `offsite` command line and its exit codes;
//! - [`engine`]: wasmtime engine, compile cache, limits and epochs;
//! - [`caps`]: one module per WIT interface, each asking [`policy`] first;
//! - [`policy`]: the one place grants are decided;
//! - [`store`]: atomic, hashed writes into the site's store;
//! - [`site`]: site file parsing;
//! - [`check`]: `offsite check`, what a site allows and what is wrong with it;
//! - [`transport`]: SSH connections (the OpenSSH client).

pub mod bindings;
pub mod caps;
pub mod check;
pub mod cli;
pub mod compress;
pub mod engine;
pub mod keys;
pub mod logging;
pub mod output;
pub mod policy;
pub mod site;
pub mod store;
pub mod transport;
