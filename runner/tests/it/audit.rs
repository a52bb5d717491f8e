//! `--audit FILE`: every policy decision as a JSON line, secrets masked.

use std::path::Path;

use offsite_testkit::sshd::Sshd;
use offsite_testkit::{Ran, offsite, script};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn every_decision_is_recorded_with_site_script_and_call() {
    let server = Sshd::start("127.0.0.2");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ssh_config"), "").unwrap();
    let site = dir.path().join("audited.toml");
    let host = server.host_section("server1", "commands = [[\"echo\", \"*\"]]");
    std::fs::write(&site, format!("store = \"b\"\nssh_config = \"ssh_config\"\n{host}")).unwrap();
    let audit = dir.path().join("audit.jsonl");
    let run = |argv: &str| {
        let mut cmd = offsite(Path::new(BIN));
        cmd.arg("run").arg(script("probe")).arg("--site").arg(&site).arg("--audit").arg(&audit);
        cmd.args(["--param", "op=exec", "--param"]).arg(format!("argv={argv}"));
        Ran::from_output(cmd.env_remove("SSH_AUTH_SOCK").output().unwrap())
    };
    run("echo\u{1f}hello").expect_code(0);
    run("cat\u{1f}/etc/shadow").expect_code(1);

    let sha = {
        let out = std::process::Command::new("sha256sum").arg(script("probe")).output().unwrap();
        String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
    };
    let all = records(&audit);
    assert!(all.iter().all(|r| r["site"] == "audited" && r["script_sha256"] == sha.as_str()), "{all:?}");
    assert!(all.iter().any(|r| r["interface"] == "params" && r["decision"] == "allow"));
    let execs: Vec<_> = all.iter().filter(|r| r["interface"] == "ssh").collect();
    assert_eq!(execs.len(), 2, "{execs:?}");
    assert_eq!(execs[0]["decision"], "allow");
    assert_eq!(execs[0]["call"]["argv"], serde_json::json!(["echo", "hello"]));
    assert_eq!(execs[0]["call"]["host"], "server1");
    assert_eq!(execs[1]["decision"], "deny");
    assert!(execs[1]["reason"].as_str().unwrap().contains("program \"cat\" is not granted"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&audit).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn secret_values_are_masked_in_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let secret = "hunter2-very-secret";
    let mut cmd = offsite(Path::new(BIN));
    cmd.current_dir(dir.path()).arg("run").arg(script("fixture")).arg("--audit").arg(&audit);
    cmd.args(["--param", "case=tar-denied"]).arg("--param").arg(format!("arg=../{secret}"));
    cmd.arg("--param").arg(format!("token={secret}"));
    let ran = Ran::from_output(cmd.output().unwrap());
    ran.expect_code(0);
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains(secret), "{text}");
    assert!(!ran.stderr.contains(secret), "{}", ran.stderr);
    let denied: Vec<_> = records(&audit).into_iter().filter(|r| r["decision"] == "deny").collect();
    assert_eq!(denied.len(), 1, "{text}");
    assert_eq!(denied[0]["call"]["read"], "../***");
}
