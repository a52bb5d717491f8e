//! Man pages and shell completions, generated from the command-line
//! definitions so they never drift from `--help`: `offsite completions
//! SHELL` for people who install from source, and the hidden
//! `offsite generate-docs DIR` the package build runs.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use clap::Command;
use clap_complete::Shell;

/// The site file's page, written by hand (it documents TOML, not flags).
const SITE_FILE_PAGE: &str = include_str!("../../docs/offsite.toml.5");

/// Writes the completion script for `shell`.
pub fn completions(shell: Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut crate::cli::command(), "offsite", out);
}

/// Writes DIR/man1/offsite.1 and one page per subcommand
/// (offsite-run.1, offsite-script-push.1, ...), DIR/man5/offsite.toml.5,
/// and DIR/completions/{offsite.bash,_offsite,offsite.fish}.
pub fn generate(dir: &Path) -> Result<()> {
    let man1 = dir.join("man1");
    let man5 = dir.join("man5");
    let comp = dir.join("completions");
    for d in [&man1, &man5, &comp] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let mut pages = Vec::new();
    collect(crate::cli::command(), "offsite", &mut pages);
    for (name, cmd) in pages {
        let page = page(&name, cmd)?;
        let file = man1.join(format!("{name}.1"));
        std::fs::write(&file, page).with_context(|| format!("cannot write {}", file.display()))?;
    }
    std::fs::write(man5.join("offsite.toml.5"), SITE_FILE_PAGE)?;
    for (shell, name) in [(Shell::Bash, "offsite.bash"), (Shell::Zsh, "_offsite"), (Shell::Fish, "offsite.fish")] {
        let mut text = Vec::new();
        completions(shell, &mut text);
        std::fs::write(comp.join(name), text)?;
    }
    Ok(())
}

/// One page: clap_mangen's sections, then the examples (the command's
/// `after_help`), the exit codes, the version and where to read on.
fn page(name: &str, cmd: Command) -> Result<Vec<u8>> {
    let examples = cmd.get_after_help().or(cmd.get_after_long_help()).map(|h| h.to_string()).unwrap_or_default();
    let examples = examples.split_once("Examples:\n").map(|(_, e)| e.to_string()).unwrap_or_default();
    let subcommands = cmd.has_subcommands();
    let man_has_version = cmd.get_version().is_some() || cmd.get_long_version().is_some();
    let man = clap_mangen::Man::new(cmd).section("1").source(format!("offsite {}", env!("CARGO_PKG_VERSION")));
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    if subcommands {
        man.render_subcommands_section(&mut out)?;
    }
    if !examples.is_empty() {
        writeln!(out, ".SH EXAMPLES\n.EX\n{}\n.EE", roff_text(examples.trim_end()))?;
    }
    writeln!(out, ".SH \"EXIT STATUS\"")?;
    for (code, text) in crate::exit::EXIT_CODES {
        writeln!(out, ".TP\n.B {}\n{}", *code as u8, roff_text(text))?;
    }
    if man_has_version {
        man.render_version_section(&mut out)?;
    }
    let mut see = vec!["offsite(1)".to_string(), "offsite.toml(5)".to_string()];
    see.retain(|s| !s.starts_with(&format!("{name}(")));
    let refs: Vec<String> = see
        .iter()
        .map(|s| {
            let (page, section) = s.trim_end_matches(')').split_once('(').unwrap();
            format!(".BR {page} ({section})")
        })
        .collect();
    writeln!(out, ".SH \"SEE ALSO\"\n{}", refs.join(",\n"))?;
    Ok(out)
}

/// Text for a roff body: backslashes escaped, and no line may start with
/// a control character.
fn roff_text(text: &str) -> String {
    text.replace('\\', "\\e")
        .lines()
        .map(|l| if l.starts_with('.') || l.starts_with('\'') { format!("\\&{l}") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `cmd` as page `name`, then each visible subcommand as `name-sub`.
fn collect(cmd: Command, name: &str, pages: &mut Vec<(String, Command)>) {
    let cmd = cmd.name(name.to_string()).bin_name(name.replace('-', " "));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        collect(sub.clone(), &format!("{name}-{}", sub.get_name()), pages);
    }
    pages.push((name.to_string(), cmd));
}
