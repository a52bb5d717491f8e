//! `--json`: one JSON object on stdout per command, with `"format"` (this
//! schema's version) and `"command"` first, and the manifest's field names.
//! A command that fails before it can report (exit 2, exit 4, ...) prints
//! an error object instead. The schema is docs/json-schema.json, described
//! in docs/JSON.md.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value};

/// The version of the JSON this runner prints.
pub const FORMAT: u32 = 1;

static COMMAND: OnceLock<&'static str> = OnceLock::new();
static REPORTED: AtomicBool = AtomicBool::new(false);

/// Turns JSON output on for `command` (`"run"`, `"script ls"`, ...).
pub fn enable(command: &'static str) {
    let _ = COMMAND.set(command);
}

/// Whether `--json` was given.
pub fn on() -> bool {
    COMMAND.get().is_some()
}

/// Prints the command's report: `fields` (an object) after `format` and
/// `command`.
pub fn report(fields: impl serde::Serialize) {
    let mut out = Map::new();
    out.insert("format".into(), FORMAT.into());
    out.insert("command".into(), COMMAND.get().copied().unwrap_or("?").into());
    match serde_json::to_value(fields).expect("reports serialise") {
        Value::Object(map) => out.extend(map),
        other => {
            out.insert("result".into(), other);
        }
    }
    crate::outln!("{}", terminal_safe(&Value::Object(out).to_string()));
    REPORTED.store(true, Ordering::Relaxed);
}

/// For a command that failed without a report: the error object.
pub fn error_if_unreported(exit: u8, error: &str) {
    if on() && !REPORTED.load(Ordering::Relaxed) {
        report(serde_json::json!({ "status": "error", "exit": exit, "error": error }));
    }
}

/// serde_json escapes C0 controls but leaves C1 controls (U+0080..U+009F,
/// which some terminals read as escape sequences) and bidi overrides as
/// they are. They can only stand inside strings, so writing them as
/// `\uXXXX` keeps the JSON the same value and the terminal safe from what a
/// script or server put in an error or a name.
fn terminal_safe(json: &str) -> String {
    let risky = |c: char| matches!(c, '\u{7f}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}');
    if !json.chars().any(risky) {
        return json.to_string();
    }
    json.chars().map(|c| if risky(c) { format!("\\u{:04x}", c as u32) } else { c.to_string() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_bidi_characters_are_escaped_and_the_value_kept() {
        let value = serde_json::json!({ "error": "a\u{9b}31mred\u{202e}txt\u{1b}[0m" });
        let text = terminal_safe(&value.to_string());
        assert!(text.is_ascii(), "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), value);
    }
}
