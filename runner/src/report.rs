//! What a run tells the outside world: the node_exporter textfile and the
//! notifications (a command, an HTTP ping, or both). None of it changes a
//! run's status: a failure here is logged and that is all.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::site::{Notify, Site};
use crate::store::outputs::OutputState;
use crate::store::{Manifest, Status};

/// When a notification is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Start,
    Success,
    Failure,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Start => "start",
            Event::Success => "success",
            Event::Failure => "failure",
        }
    }

    /// The healthchecks.io path suffix.
    fn ping_suffix(self) -> &'static str {
        match self {
            Event::Start => "/start",
            Event::Success => "",
            Event::Failure => "/fail",
        }
    }
}

/// What a notification says about the run.
pub struct Note<'a> {
    pub site: &'a str,
    pub run_id: &'a str,
    pub status: Option<Status>,
    /// The log's last lines (sent on failure).
    pub tail: &'a str,
}

/// Sends `event` to the site's command and URL. Failures are logged.
pub fn notify(notify: &Notify, event: Event, note: &Note<'_>) {
    if !notify.command.is_empty()
        && let Err(e) = run_command(notify, event, note)
    {
        log::warn!(target: "offsite::notify", "notification command {:?} failed ({} event): {e}", notify.command[0], event.as_str());
    }
    if let Some(url) = &notify.url
        && let Err(e) = ping(url, notify.timeout, event, note)
    {
        log::warn!(target: "offsite::notify", "ping to {} failed ({} event): {e}", shown_url(url), event.as_str());
    }
}

fn run_command(notify: &Notify, event: Event, note: &Note<'_>) -> Result<(), String> {
    let mut child = Command::new(&notify.command[0])
        .args(&notify.command[1..])
        .env("OFFSITE_EVENT", event.as_str())
        .env("OFFSITE_SITE", note.site)
        .env("OFFSITE_RUN_ID", note.run_id)
        .env("OFFSITE_STATUS", note.status.map(Status::as_str).unwrap_or("running"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    let body = if event == Event::Failure { note.tail.as_bytes().to_vec() } else { Vec::new() };
    finish(&mut child, &body, notify.timeout)
}

/// A healthchecks.io-style ping through the system's curl: the user's CA
/// store and proxy settings apply, and the URL (which is a credential)
/// travels in curl's config on stdin, never in its argv.
fn ping(url: &str, timeout: Duration, event: Event, note: &Note<'_>) -> Result<(), String> {
    let mut config = String::new();
    config
        .push_str(&format!("url = {}\n", curl_quote(&format!("{}{}", url.trim_end_matches('/'), event.ping_suffix()))));
    config.push_str("silent\nshow-error\nfail\n");
    config.push_str(&format!("max-time = {}\n", timeout.as_secs().max(1)));
    config.push_str("output = \"/dev/null\"\n");
    let body = if event == Event::Failure {
        note.tail.to_string()
    } else {
        format!("offsite: site {} run {}: {}", note.site, note.run_id, event.as_str())
    };
    config.push_str(&format!("data-binary = {}\n", curl_quote(&body)));
    let mut child = Command::new("curl")
        .args(["--config", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run curl (is it installed?): {e}"))?;
    finish(&mut child, config.as_bytes(), timeout + Duration::from_secs(2))
}

/// Feeds `input`, then waits at most `timeout`; kills the child after it.
fn finish(child: &mut std::process::Child, input: &[u8], timeout: Duration) -> Result<(), String> {
    if let Some(mut stdin) = child.stdin.take() {
        // A command that ignores its input must not make this fail.
        let _ = stdin.write_all(input);
    }
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(status) => {
                let mut stderr = String::new();
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut stderr);
                }
                return if status.success() { Ok(()) } else { Err(format!("{status}: {}", stderr.trim())) };
            }
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {}", humantime::format_duration(timeout)));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A double-quoted string for a curl config file.
fn curl_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A URL for a log line: scheme and host only (its path is a credential).
fn shown_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    format!("{scheme}://{}/…", rest.split('/').next().unwrap_or(""))
}

/// Rewrites the site's node_exporter textfile from its newest run and its
/// newest good run, atomically (node_exporter never reads half a file).
pub fn write_prometheus(
    path: &Path,
    site: &Site,
    last: &Manifest,
    last_good: Option<&Manifest>,
    outputs: &[OutputState],
) -> std::io::Result<()> {
    let label = format!("site=\"{}\"", escape_label(&site.name));
    let time = |m: &Manifest| m.ended_at().map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0);
    let duration = match (last.started_at(), last.ended_at()) {
        (Some(s), Some(e)) => (e - s).num_milliseconds() as f64 / 1000.0,
        _ => 0.0,
    };
    let mut text = String::new();
    let mut gauge = |name: &str, help: &str, lines: Vec<(String, f64)>| {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for (labels, value) in lines {
            text.push_str(&format!("{name}{{{labels}}} {value}\n"));
        }
    };
    gauge("offsite_last_run_timestamp_seconds", "When the site's last run ended.", vec![(label.clone(), time(last))]);
    gauge(
        "offsite_last_success_timestamp_seconds",
        "When the site's last good run (ok or warning) ended; 0 if none.",
        vec![(label.clone(), last_good.map_or(0.0, time))],
    );
    gauge(
        "offsite_last_run_status",
        "1 for the last run's status (ok, warning, partial, incomplete, failed), 0 for the others.",
        Status::ALL
            .iter()
            .map(|s| (format!("{label},status=\"{s}\""), if *s == last.status { 1.0 } else { 0.0 }))
            .collect(),
    );
    gauge("offsite_last_run_duration_seconds", "How long the last run took.", vec![(label.clone(), duration)]);
    gauge("offsite_last_run_bytes", "Bytes the last run stored.", vec![(label.clone(), last.bytes() as f64)]);
    gauge("offsite_last_run_files", "Files the last run stored.", vec![(label.clone(), last.files.len() as f64)]);
    // Per output (its name has each time stamp set aside), so a server down
    // for a week shows while the site's other outputs keep coming.
    let shown = &outputs[..outputs.len().min(crate::store::outputs::MAX_REPORTED)];
    let output_label = |o: &OutputState| format!("{label},output=\"{}\"", escape_label(&o.name));
    let stamp = |t: &str| chrono::DateTime::parse_from_rfc3339(t).map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0);
    gauge(
        "offsite_output_last_success_timestamp_seconds",
        "When the newest run that published a copy of the output ended; 0 if none did.",
        shown.iter().map(|o| (output_label(o), o.last_good.as_ref().map_or(0.0, |c| stamp(&c.ended)))).collect(),
    );
    gauge(
        "offsite_output_failing",
        "1 if the output's newest attempt failed (or it never had a good copy), 0 if it succeeded.",
        shown
            .iter()
            .map(|o| (output_label(o), if o.failing.is_some() || o.last_good.is_none() { 1.0 } else { 0.0 }))
            .collect(),
    );
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".offsite-").suffix(".prom.tmp").tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curl_config_strings_are_quoted() {
        assert_eq!(curl_quote("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
    }

    #[test]
    fn urls_are_shown_without_their_path() {
        assert_eq!(shown_url("https://hc-ping.com/6f0c-secret"), "https://hc-ping.com/…");
    }

    #[test]
    fn a_notification_command_gets_the_event_and_the_tail_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let notify = Notify {
            command: vec![
                "sh".into(),
                "-c".into(),
                format!("{{ echo \"$OFFSITE_EVENT $OFFSITE_SITE $OFFSITE_STATUS\"; cat; }} >> {}", out.display()),
            ],
            url: None,
            timeout: Duration::from_secs(5),
        };
        let note = Note { site: "web", run_id: "r1", status: Some(Status::Failed), tail: "line 1\nline 2\n" };
        run_command(&notify, Event::Failure, &note).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "failure web failed\nline 1\nline 2\n");
    }

    #[test]
    fn a_hanging_command_is_killed_after_its_timeout() {
        let notify =
            Notify { command: vec!["sleep".into(), "30".into()], url: None, timeout: Duration::from_millis(200) };
        let note = Note { site: "web", run_id: "r1", status: None, tail: "" };
        let started = Instant::now();
        let err = run_command(&notify, Event::Start, &note).unwrap_err();
        assert!(err.contains("no answer"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
