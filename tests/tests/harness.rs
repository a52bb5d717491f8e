//! The harness's own servers are real: OpenSSH's client talks to them.

use offsite_testkit::sshd::Sshd;

#[test]
fn two_sshd_servers_on_their_own_loopback_addresses() {
    let server1 = Sshd::start("127.0.0.2");
    let server2 = Sshd::start("127.0.0.3");
    assert_ne!(server1.known_hosts_line.split(' ').nth(2), server2.known_hosts_line.split(' ').nth(2), "own host keys");
    for (server, name) in [(&server1, "server1"), (&server2, "server2")] {
        let out = server.ssh().args(["echo", name]).output().unwrap();
        assert!(
            out.status.success(),
            "ssh to {name} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            server.log()
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);
    }
}

#[test]
fn strict_host_key_checking_refuses_the_other_servers_key() {
    let server1 = Sshd::start("127.0.0.2");
    let server2 = Sshd::start("127.0.0.3");
    // server1's known_hosts file, pointed at server2: an unknown key.
    let out = server2.ssh_trusting(&server1.known_hosts()).arg("true").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"));
}
