//! Path normalisation: whatever is accepted stays inside its root.
//! - store destinations: relative, only plain components, never the
//!   runner's temporary prefix;
//! - remote fetch paths: absolute, canonical (no `.`, `..` or empty
//!   components), and matched by the same glob as before normalising
//!   only if the normal form matches.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use offsite::policy::{remote_path, store_path};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(rel) = store_path(text) {
        assert!(!rel.as_os_str().is_empty());
        assert!(rel.components().all(|c| matches!(c, Component::Normal(_))), "{text:?} -> {rel:?}");
        let joined = Path::new("/store").join(&rel);
        assert!(joined.starts_with("/store"), "{text:?} escapes: {joined:?}");
        assert!(!text.contains('\0'));
    }
    if let Ok(path) = remote_path(text) {
        assert!(path.starts_with('/'), "{text:?} -> {path:?}");
        let parts: Vec<&str> = path[1..].split('/').collect();
        assert!(parts.iter().all(|p| !p.is_empty() && *p != "." && *p != ".."), "{text:?} -> {path:?}");
        assert!(!path.contains('\0'));
        // Normalising is idempotent.
        assert_eq!(remote_path(&path).as_deref(), Ok(path.as_str()));
    }
});
