//! The runner's integration tests, as one program: each module is what was
//! once a test binary of its own (`registry::...` was `--test registry`),
//! and the heavy dependency graph (wasmtime, object_store, oci-client,
//! reqwest) is linked once instead of once a module.
//!
//! Every test starts the real parts it needs through `offsite-testkit`
//! (sshd, MariaDB, PostgreSQL, SeaweedFS, an OCI registry) on free ports of
//! loopback addresses, in scratch directories of its own, so tests of any
//! module run side by side and in any order. Modules that share an account
//! across tests (mysql's and postgres's login users, whose option files
//! name one server at a time) take turns through a lock of their own.

mod arc;
mod audit;
mod check;
mod drill;
mod files;
mod hostile;
mod integrity;
mod javascript;
mod json;
mod mysql;
mod new;
mod postgres;
mod python;
mod registry;
mod remote_quoting;
mod repo;
mod restore_hostile;
mod s3;
mod s3_store;
mod sandbox;
mod ssh;
mod system;
mod watch;
