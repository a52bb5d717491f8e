//! Remote quoting: a quoted argument, read back by a real POSIX `sh`, is
//! exactly the original; NUL is refused.
#![no_main]

use std::process::Command;

use libfuzzer_sys::fuzz_target;
use offsite::transport::quote::quote_arg;

fuzz_target!(|data: &[u8]| {
    let Ok(arg) = std::str::from_utf8(data) else { return };
    let Some(quoted) = quote_arg(arg) else {
        assert!(arg.contains('\0'), "only NUL may be refused: {arg:?}");
        return;
    };
    let out = Command::new("sh").arg("-c").arg(format!("printf '%s' {quoted}")).output().expect("run sh");
    assert!(out.status.success(), "sh rejected {quoted:?}");
    assert_eq!(out.stdout, arg.as_bytes(), "sh read {quoted:?} back differently");
});
