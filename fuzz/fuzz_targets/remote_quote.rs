//! Remote quoting: a quoted argument, read back by every login shell sshd
//! may hand it to (sh, bash, dash, zsh with and without RC_QUOTES, fish),
//! is exactly the original; NUL is refused. The argument is followed by a
//! marker so that one that escapes its quotes shows as a changed marker.
#![no_main]

use std::process::Command;

use libfuzzer_sys::fuzz_target;
use offsite::transport::quote::quote_arg;

const SHELLS: &[&[&str]] = &[&["sh"], &["bash"], &["dash"], &["zsh", "-o", "rcquotes"], &["fish"]];

fuzz_target!(|data: &[u8]| {
    let Ok(arg) = std::str::from_utf8(data) else { return };
    let Some(quoted) = quote_arg(arg) else {
        assert!(arg.contains('\0'), "only NUL may be refused: {arg:?}");
        return;
    };
    for shell in SHELLS {
        let out = Command::new(shell[0])
            .args(&shell[1..])
            .arg("-c")
            .arg(format!("printf '%s|' {quoted} {quoted} 'end'"))
            .output()
            .expect("run the shell");
        assert!(out.status.success(), "{shell:?} rejected {quoted:?}");
        let want = format!("{arg}|{arg}|end|");
        assert_eq!(out.stdout, want.as_bytes(), "{shell:?} read {quoted:?} back differently");
    }
});
