//! Text that a script or a server controls, made safe to show.
//!
//! Script messages, remote stderr, script metadata and file names reach
//! terminals, cron mail, logs and manifests. A carriage return, an escape
//! sequence or a bidirectional override in them could redraw a terminal,
//! forge a log line or hide what follows, so every control and formatting
//! character is written out as an escape (`\n`, `\r`, `\t`, `\e`,
//! `\u{202e}`), and long text is cut at a character boundary.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` must not reach a terminal as itself.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}' // zero-width characters, LRM/RLM
            | '\u{2028}' | '\u{2029}' // line and paragraph separators
            | '\u{202a}'..='\u{202e}' // bidi embeddings and overrides
            | '\u{2060}'..='\u{2064}' // invisible operators
            | '\u{2066}'..='\u{2069}' // bidi isolates
            | '\u{feff}' // byte-order mark
        )
}

/// `s` on one line, with every control and formatting character escaped.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x1b' => out.push_str("\\e"),
            c if unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `s` split into lines, each escaped (tabs kept): for messages of our own
/// that span lines on purpose, with text from elsewhere inside them.
pub fn escape_lines(s: &str) -> Vec<String> {
    s.split('\n')
        .map(|line| {
            let line = line.strip_suffix('\r').unwrap_or(line);
            line.split('\t').map(|part| escape(part).into_owned()).collect::<Vec<_>>().join("\t")
        })
        .collect()
}

/// `s` cut to at most `max` bytes (at a character boundary), saying how
/// much was left out.
pub fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let cut = (0..=max).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
    Cow::Owned(format!("{}… ({} more bytes left out)", &s[..cut], s.len() - cut))
}

/// `s` cut to about `max` bytes by leaving out its middle: the start and the
/// end of a message say what it is about, a value quoted in between may be
/// huge.
pub fn shorten_middle(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let half = max / 2;
    let head = (0..=half).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
    let tail = (s.len() - half..=s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(s.len());
    Cow::Owned(format!("{}…({} bytes left out)…{}", &s[..head], tail - head, &s[tail..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_formatting_characters_are_escaped() {
        assert_eq!(escape("plain ünï ✓"), "plain ünï ✓");
        assert_eq!(escape("a\rb\x1b[2Kc\nd\te"), "a\\rb\\e[2Kc\\nd\\te");
        assert_eq!(escape("x\u{202e}y\u{7f}z\u{9b}"), "x\\u{202e}y\\u{7f}z\\u{9b}");
        assert_eq!(escape_lines("one\r\ntwo\x1b]0;title\x07"), vec!["one", "two\\e]0;title\\u{7}"]);
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("ääää", 3), "ä… (6 more bytes left out)");
        assert_eq!(shorten_middle("abcdefghij", 4), "ab…(6 bytes left out)…ij");
    }
}
