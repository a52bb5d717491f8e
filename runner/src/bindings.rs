//! Host-side bindings for the `offsite:backup` world, generated once here and
//! used by every capability module.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "script",
    with: {
        "offsite:backup/ssh.pending": crate::caps::remote::Job,
    },
});

pub use self::offsite::backup::{archive, clock, log, meta, params, scp, ssh, types};
