//! Quoting argv for the remote shell.
//!
//! SSH carries a single command string, which the server runs with the
//! user's shell (`$SHELL -c STRING`). To make every argument arrive
//! literally, each one is wrapped in single quotes, inside which a POSIX
//! shell gives no character a special meaning; a single quote itself is
//! written as `'\''` (close, escaped quote, reopen). NUL cannot be carried
//! at all (C strings end there), so it is refused rather than truncated.

use std::fmt;

/// An argument that cannot be passed through a remote shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteError {
    /// Index of the offending argument in argv.
    pub index: usize,
}

impl fmt::Display for QuoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "argument {} contains a NUL byte, which a remote command cannot receive", self.index)
    }
}

impl std::error::Error for QuoteError {}

/// Quotes one argument so that a POSIX shell reads it back unchanged.
pub fn quote_arg(arg: &str) -> Option<String> {
    if arg.contains('\0') {
        return None;
    }
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('\'');
    for c in arg.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    Some(out)
}

/// The remote command line for `argv`: every argument quoted, separated by
/// single spaces.
pub fn command_line<S: AsRef<str>>(argv: &[S]) -> Result<String, QuoteError> {
    let mut parts = Vec::with_capacity(argv.len());
    for (index, arg) in argv.iter().enumerate() {
        parts.push(quote_arg(arg.as_ref()).ok_or(QuoteError { index })?);
    }
    Ok(parts.join(" "))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// What `sh` makes of a command line: each argument on its own,
    /// NUL-separated so newlines survive.
    fn sh_parse(line: &str) -> Vec<String> {
        let script = format!("printf '%s\\0' {line}");
        let out = Command::new("sh").arg("-c").arg(script).output().expect("run sh");
        assert!(out.status.success(), "sh rejected {line:?}: {}", String::from_utf8_lossy(&out.stderr));
        let mut args: Vec<String> =
            out.stdout.split(|b| *b == 0).map(|a| String::from_utf8(a.to_vec()).unwrap()).collect();
        args.pop(); // after the final NUL
        args
    }

    #[test]
    fn hostile_arguments_arrive_literally_through_a_real_shell() {
        let argv = [
            "mysqldump",
            "with space",
            "it's",
            "''",
            "\"double\"",
            "$(touch /tmp/offsite-pwned)",
            "`id`",
            "a;b&&c||d|e",
            "line\nbreak",
            "tab\there",
            "$HOME ${PATH} $1 $@ $*",
            "*.sql ?[a-z]",
            "back\\slash\\",
            "~root",
            "-e",
            "#not a comment",
            "",
            "ünïcødé ✓",
            "<in >out 2>&1",
            "!!",
        ];
        let line = command_line(&argv).unwrap();
        let expected: Vec<String> = argv[1..].iter().map(|s| s.to_string()).collect();
        assert_eq!(sh_parse(line.split_once(' ').unwrap().1), expected);
        assert!(!std::path::Path::new("/tmp/offsite-pwned").exists());
    }

    #[test]
    fn every_byte_but_nul_round_trips() {
        let all: String = (1u8..=127).map(char::from).collect();
        let line = command_line(&[all.as_str()]).unwrap();
        assert_eq!(sh_parse(&line), vec![all]);
    }

    #[test]
    fn nul_is_refused_naming_the_argument() {
        let err = command_line(&["ok", "bad\0arg"]).unwrap_err();
        assert_eq!(err, QuoteError { index: 1 });
        assert!(err.to_string().contains("argument 1"));
    }
}
