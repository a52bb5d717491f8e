//! Host-side bindings for the `offsite:backup` world, generated once here and
//! used by every capability module.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "script",
    with: {
        "offsite:backup/ssh.pending": crate::caps::remote::Job,
        "offsite:backup/secrets.secret": crate::caps::secrets::SecretHandle,
    },
});

pub use self::offsite::backup::{archive, clock, files, log, meta, params, scp, secrets, ssh, types};
