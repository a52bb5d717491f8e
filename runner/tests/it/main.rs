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

/// Most of these tests spend their time waiting, not computing: on
/// servers starting, on timeouts and stalls they provoke, on simulated
/// links with their delay, on `watch`'s polls. So unless told otherwise
/// (`--test-threads N` or `RUST_TEST_THREADS`, which win), the program runs
/// twice as many tests at once as the machine has cores. On two cores,
/// with the guests already built and compiled, that took the program's
/// wall time from 389 s to 228 s, the CPU busy 73% of it. A first run
/// (guests to build and compile) is CPU-bound and gains little
/// (docs/TESTING.md).
///
/// libtest reads `RUST_TEST_THREADS` when it starts, so the default is
/// set before `main`, from the program's initialisers.
#[used]
#[unsafe(link_section = ".init_array")]
static TWICE_THE_CORES: extern "C" fn() = twice_the_cores;

extern "C" fn twice_the_cores() {
    if std::env::var_os("RUST_TEST_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: initialisers run before `main`, on the only thread.
        unsafe { std::env::set_var("RUST_TEST_THREADS", (2 * cores).to_string()) };
    }
}

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
