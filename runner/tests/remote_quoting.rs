//! Quoted argv survives a real sshd and the login shell on the far side.

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
