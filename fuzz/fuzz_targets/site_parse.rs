//! Site file parsing never panics, and every error names the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use offsite::site::Site;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Site::parse(text, Path::new("/fuzz/site.toml"), Path::new("/fuzz")) {
        Ok(site) => {
            // Whatever parsed is fully resolved: a directory is absolute,
            // and so is every copy's.
            for store in std::iter::once(&site.store).chain(site.copies.iter().map(|c| &c.store)) {
                if let Some(dir) = store.dir() {
                    assert!(dir.is_absolute());
                }
            }
            for host in site.hosts.values() {
                assert!(!host.name.is_empty());
            }
        }
        Err(e) => assert!(format!("{e:#}").contains("/fuzz/site.toml"), "error without the file: {e:#}"),
    }
});
