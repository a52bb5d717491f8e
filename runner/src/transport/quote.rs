//! Quoting argv for the remote shell.
//!
//! SSH carries a single command string, which the server runs with the
//! account's login shell (`$SHELL -c STRING`). That shell is not always a
//! POSIX one: fish reads `\'` and `\\` as escapes even inside single quotes,
//! so the classic POSIX `'\''` trick lets two backslash-terminated arguments
//! turn the next one into shell syntax there. The quoting here therefore
//! uses only what sh, bash, dash, zsh (with or without `RC_QUOTES`) and fish
//! all read the same way:
//!
//! - every run of characters other than `'` and `\` goes inside single
//!   quotes, where none of those shells gives a character a meaning;
//! - `'` and `\` are written outside quotes, each escaped with a backslash
//!   (`\'`, `\\`), which all of them read as the literal character;
//! - no two quoted runs touch (`''` never appears inside a word, so zsh's
//!   `RC_QUOTES` cannot join them), and the empty argument is `''`.
//!
//! NUL cannot be carried at all (C strings end there), so it is refused
//! rather than truncated. csh and tcsh read a newline inside quotes as an
//! error and `!` as history even in quotes; accounts with those login shells
//! are not supported (README, "Security").

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

/// Quotes one argument so that sh, bash, dash, zsh and fish all read it
/// back unchanged.
pub fn quote_arg(arg: &str) -> Option<String> {
    if arg.contains('\0') {
        return None;
    }
    if arg.is_empty() {
        return Some("''".into());
    }
    let mut out = String::with_capacity(arg.len() + 2);
    let mut open = false;
    for c in arg.chars() {
        if c == '\'' || c == '\\' {
            if open {
                out.push('\'');
                open = false;
            }
            out.push('\\');
            out.push(c);
        } else {
            if !open {
                out.push('\'');
                open = true;
            }
            out.push(c);
        }
    }
    if open {
        out.push('\'');
    }
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

    /// The login shells quoting must hold for, as `sshd` runs them
    /// (`SHELL -c LINE`), with the options that change quoting.
    pub const SHELLS: &[&[&str]] =
        &[&["sh"], &["bash"], &["bash", "--posix"], &["dash"], &["zsh"], &["zsh", "-o", "rcquotes"], &["fish"]];

    /// What `shell` makes of a command line: each argument on its own,
    /// NUL-separated so newlines survive.
    fn parse(shell: &[&str], line: &str) -> Vec<String> {
        let script = format!("printf '%s\\0' {line}");
        let out = Command::new(shell[0])
            .args(&shell[1..])
            .arg("-c")
            .arg(script)
            .output()
            .unwrap_or_else(|e| panic!("run {shell:?} (CI installs every shell here): {e}"));
        assert!(out.status.success(), "{shell:?} rejected {line:?}: {}", String::from_utf8_lossy(&out.stderr));
        let mut args: Vec<String> =
            out.stdout.split(|b| *b == 0).map(|a| String::from_utf8(a.to_vec()).unwrap()).collect();
        args.pop(); // after the final NUL
        args
    }

    const HOSTILE: &[&str] = &[
        "with space",
        "it's",
        "''",
        "\"double\"",
        "$(touch /tmp/offsite-pwned)",
        "`id`",
        "a;b&&c||d|e",
        "line\nbreak",
        "tab\there",
        "$HOME ${PATH} $1 $@ $* $status",
        "*.sql ?[a-z] {a,b}",
        "back\\slash\\",
        "~root",
        "-e",
        "#not a comment",
        "",
        "ünïcødé ✓",
        "<in >out 2>&1 ^err",
        "!!",
        // The fish escape: two arguments ending in a backslash, then shell
        // syntax, which POSIX quoting would have let fish run.
        "x\\",
        "y\\",
        "; touch /tmp/offsite-pwned; echo ",
        "\\'",
        "'\\",
        "a''b",
        "%self (echo) $(echo)",
    ];

    #[test]
    fn hostile_arguments_arrive_literally_through_every_login_shell() {
        let line = command_line(HOSTILE).unwrap();
        let expected: Vec<String> = HOSTILE.iter().map(|s| s.to_string()).collect();
        for shell in SHELLS {
            assert_eq!(parse(shell, &line), expected, "through {shell:?}");
        }
        assert!(!std::path::Path::new("/tmp/offsite-pwned").exists());
    }

    #[test]
    fn every_byte_but_nul_round_trips_in_every_shell() {
        let all: String = (1u8..=127).map(char::from).collect();
        let line = command_line(&[all.as_str(), "\\", &all]).unwrap();
        for shell in SHELLS {
            assert_eq!(parse(shell, &line), vec![all.clone(), "\\".into(), all.clone()], "through {shell:?}");
        }
    }

    #[test]
    fn the_empty_argument_is_an_empty_quoted_word() {
        assert_eq!(quote_arg("").unwrap(), "''");
        assert_eq!(quote_arg("a'b").unwrap(), "'a'\\''b'");
    }

    #[test]
    fn nul_is_refused_naming_the_argument() {
        let err = command_line(&["ok", "bad\0arg"]).unwrap_err();
        assert_eq!(err, QuoteError { index: 1 });
        assert!(err.to_string().contains("argument 1"));
    }
}
