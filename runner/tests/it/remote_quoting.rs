//! Quoted argv survives a real sshd and the login shell on the far side.

use std::path::Path;

use offsite::transport::quote::command_line;
use offsite_testkit::sshd::Sshd;

#[test]
fn hostile_argv_arrives_literally_over_real_ssh() {
    let server = Sshd::start("127.0.0.2");
    let args = ["with space", "it's", "$(id)", "`id`", "a;b|c&&d", "line\nbreak", "$HOME", "*", "", "\\"];
    let mut argv = vec!["printf", "%s\\0"];
    argv.extend(args);
    let line = command_line(&argv).unwrap();
    let out = server.ssh().arg("--").arg(&line).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), server.log());
    let mut got: Vec<String> = out.stdout.split(|b| *b == 0).map(|a| String::from_utf8(a.to_vec()).unwrap()).collect();
    got.pop();
    assert_eq!(got, args);
}

/// sshd runs the command line with the account's login shell, which need
/// not be POSIX. The same hostile argv (with fish's backslash escape: two
/// arguments ending in `\`, then shell syntax) must arrive literally, and
/// run nothing, whichever of the common shells the account has.
#[test]
fn hostile_argv_arrives_literally_through_every_login_shell() {
    let server = Sshd::start_as("127.0.0.3", "offsite-shells");
    let pwned = server.files().join("pwned");
    let injected = format!("; touch {}; echo ", pwned.display());
    let args = ["x\\", "y\\", injected.as_str(), "it's", "$(id)", "a''b", "\\'", "line\nbreak", "{a,b}", "~", ""];
    let mut argv = vec!["printf", "%s\\0"];
    argv.extend(args);
    let line = command_line(&argv).unwrap();
    for shell in ["/bin/sh", "/bin/bash", "/bin/dash", "/usr/bin/zsh", "/usr/bin/fish"] {
        assert!(Path::new(shell).exists(), "{shell} is missing (CI installs every shell)");
        set_login_shell(&server.user, shell);
        let out = server.ssh().arg("--").arg(&line).output().unwrap();
        assert!(out.status.success(), "{shell}: {}\n{}", String::from_utf8_lossy(&out.stderr), server.log());
        let mut got: Vec<String> =
            out.stdout.split(|b| *b == 0).map(|a| String::from_utf8(a.to_vec()).unwrap()).collect();
        got.pop();
        assert_eq!(got, args, "through {shell}");
        assert!(!pwned.exists(), "{shell} ran injected syntax");
    }
}

/// The forced-command gate through a real sshd under every login shell,
/// fish included (sshd starts a forced command with the account's shell):
/// the granted line runs, anything else is refused.
#[test]
fn the_gate_works_under_every_login_shell() {
    let server = Sshd::start_as("127.0.0.4", "offsite-gateshell");
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("s.toml");
    std::fs::write(
        &site,
        format!(
            "store = \"b\"\n{}",
            server.host_section("server1", "commands = [[\"printf\", \"%s\", \"it's granted\"]]")
        ),
    )
    .unwrap();
    let out = offsite_testkit::offsite(Path::new(env!("CARGO_BIN_EXE_offsite")))
        .args(["keys", "authorized-line"])
        .arg(&site)
        .arg("server1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.lines().find(|l| !l.starts_with('#')).unwrap();
    std::fs::write(server.authorized_keys(), format!("{line}\n")).unwrap();
    let granted = command_line(&["printf", "%s", "it's granted"]).unwrap();
    for shell in ["/bin/sh", "/bin/bash", "/bin/dash", "/usr/bin/zsh", "/usr/bin/fish"] {
        assert!(Path::new(shell).exists(), "{shell} is missing (CI installs every shell)");
        set_login_shell(&server.user, shell);
        let out = server.ssh().arg("--").arg(&granted).stdin(std::process::Stdio::null()).output().unwrap();
        assert!(out.status.success(), "{shell}: {}\n{}", String::from_utf8_lossy(&out.stderr), server.log());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's granted", "through {shell}");
        let out = server.ssh().arg("--").arg("id").stdin(std::process::Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(126), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Gives `user` the login shell `shell`. usermod refuses while the account
/// still has a process (the last session's may take a moment to go):
/// retried.
fn set_login_shell(user: &str, shell: &str) {
    let set = (0..100).any(|_| {
        let ok = std::process::Command::new("usermod")
            .args(["--shell", shell, user])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        if !ok {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        ok
    });
    assert!(set, "usermod --shell {shell} {user}");
}
