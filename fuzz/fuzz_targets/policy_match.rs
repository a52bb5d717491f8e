//! Command patterns: compiling and matching never panic, and a pattern
//! with no glob syntax matches exactly the argv it spells, nothing else.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offsite::policy::CommandPattern;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // "pattern parts \u{1} argv parts", parts split by \u{0}.
    let (pattern, argv) = text.split_once('\u{1}').unwrap_or((text, ""));
    let pattern: Vec<String> = pattern.split('\0').map(str::to_string).collect();
    let argv: Vec<String> = if argv.is_empty() { Vec::new() } else { argv.split('\0').map(str::to_string).collect() };
    let Ok(compiled) = CommandPattern::new(&pattern) else { return };
    let matched = compiled.matches(&argv);
    let literal =
        pattern.iter().skip(1).all(|p| !p.contains(['*', '?', '[', ']', '{', '}', '\\']) && !p.ends_with("..."));
    if literal {
        assert_eq!(matched, argv == pattern, "literal pattern {pattern:?} vs argv {argv:?}");
    }
    if matched {
        assert_eq!(argv.first(), pattern.first(), "the program must match exactly");
    }
});
