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
    println!("{}", Value::Object(out));
    REPORTED.store(true, Ordering::Relaxed);
}

/// For a command that failed without a report: the error object.
pub fn error_if_unreported(exit: u8, error: &str) {
    if on() && !REPORTED.load(Ordering::Relaxed) {
        report(serde_json::json!({ "status": "error", "exit": exit, "error": error }));
    }
}
