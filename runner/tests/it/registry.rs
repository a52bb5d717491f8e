//! Sharing scripts through a real OCI registry (Debian's docker-registry,
//! over TLS with htpasswd auth): push, pull, signatures, pinned runs with
//! the registry down, and every way a registry can hand us something we
//! must not run.

use std::path::{Path, PathBuf};
use std::process::Command;

use offsite_testkit::registry::{Machine, PASSWORD, Registry, USER};
use offsite_testkit::{Ran, offsite, peak_memory_mib, rebuilt, script, ssh_keypair, with_peak_memory};

const BIN: &str = env!("CARGO_BIN_EXE_offsite");
const IP: &str = "127.0.0.5";

fn on(machine: &Machine, reg: &Registry, args: &[&str]) -> Ran {
    let mut cmd = offsite(Path::new(BIN));
    machine.apply(reg, &mut cmd);
    Ran::from_output(cmd.args(args).output().unwrap())
}

/// The digest reference `push` printed (its only stdout line).
fn pushed(ran: &Ran) -> String {
    ran.expect_code(0);
    let line = ran.stdout.trim().to_string();
    assert!(line.contains("@sha256:"), "{line}");
    line
}

/// Runs Python with the `oras` client against `reg`, trusting its CA.
fn oras(reg: &Registry, body: &str) -> String {
    let program = format!(
        "import oras.client, hashlib, json, sys\nc = oras.client.OrasClient(hostname='{host}', auth_backend='basic')\n\
         c.login(username='{USER}', password='{PASSWORD}', hostname='{host}')\n{body}\n",
        host = reg.host()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(program)
        .env("REQUESTS_CA_BUNDLE", reg.ca_file())
        .env_remove("CURL_CA_BUNDLE")
        .output()
        .expect("python3 with oras (pip install oras)");
    assert!(
        out.status.success(),
        "oras: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut out = out;
    out.stdin.take().unwrap().write_all(bytes).unwrap();
    let o = out.wait_with_output().unwrap();
    String::from_utf8(o.stdout).unwrap()[..64].to_string()
}

/// What we push, an independent client pulls (same bytes, the standard
/// media types); what it pushes, we pull and run.
#[test]
fn pushed_scripts_interoperate_with_an_independent_oci_client() {
    let reg = Registry::shared(IP);
    let m = Machine::new(&reg);
    let arc = std::fs::read(script("arc")).unwrap();
    let r = reg.reference("offsite/arc:1.0");
    let digest_ref = pushed(&on(&m, &reg, &["script", "push", script("arc").to_str().unwrap(), &r]));
    let out = oras(
        &reg,
        &format!(
            "files = c.pull(target='{host}/{repo}:1.0', outdir='{out}')\n\
             m = c.get_manifest('{host}/{repo}:1.0')\n\
             print(json.dumps({{'config': m['config']['mediaType'], 'layers': [l['mediaType'] for l in m['layers']], \
             'sha': [hashlib.sha256(open(f,'rb').read()).hexdigest() for f in files]}}))",
            host = reg.host(),
            repo = reg.repo("offsite/arc"),
            out = m.dir.path().join("oras-out").display()
        ),
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["config"], "application/vnd.wasm.config.v0+json");
    assert_eq!(v["layers"], serde_json::json!(["application/wasm"]));
    assert_eq!(v["sha"], serde_json::json!([sha256_hex(&arc)]));

    // The other way: oras pushes a component in the standard layout.
    let theirs = m.dir.path().join("theirs.wasm");
    std::fs::write(&theirs, rebuilt(&arc, "pushed by oras")).unwrap();
    let config = m.dir.path().join("config.json");
    std::fs::write(&config, r#"{"architecture":"wasm","os":"wasip2","layerDigests":[]}"#).unwrap();
    oras(
        &reg,
        &format!(
            "import os\nos.chdir('{dir}')\nc.push(target='{host}/{repo}:2.0', files=['theirs.wasm:application/wasm'], \
             manifest_config='config.json:application/vnd.wasm.config.v0+json')",
            dir = m.dir.path().display(),
            host = reg.host(),
            repo = reg.repo("offsite/theirs")
        ),
    );
    let other = Machine::new(&reg);
    let pulled = on(&other, &reg, &["script", "pull", &reg.reference("offsite/theirs:2.0")]);
    pulled.expect_code(0);
    assert!(pulled.stdout.contains("offsite/theirs:2.0@sha256:"), "{}", pulled.stdout);
    let src = other.dir.path().join("src");
    std::fs::create_dir_all(src.join("www")).unwrap();
    std::fs::write(src.join("www/index.html"), "hello").unwrap();
    let site = other.dir.path().join("site.toml");
    std::fs::write(
        &site,
        format!(
            "store = \"{}\"\nscript = \"{}\"\n[read]\nroots = [\"{}\"]\n[params]\npath = \"src/www\"\n",
            other.dir.path().join("store").display(),
            pulled.stdout.trim(),
            src.display()
        ),
    )
    .unwrap();
    // Pinned by digest and stored: runs, silently.
    let ran = on(&other, &reg, &["run", "--site", site.to_str().unwrap()]);
    ran.expect_code(0);
    assert_eq!(ran.stderr, "");
    let _ = digest_ref;
}

/// Signatures: ours verify with plain `ssh-keygen -Y verify`, and
/// `ssh-keygen -Y sign`'s verify with us; in a registry they travel under
/// the `sha256-<digest>.sig` tag to another machine.
#[test]
fn signatures_are_plain_sshsig_and_travel_with_the_script() {
    let reg = Registry::shared(IP);
    let m = Machine::new(&reg);
    let (alice, alice_pub) = ssh_keypair(m.dir.path(), "alice");
    let signers = m.dir.path().join("allowed_signers");
    std::fs::write(&signers, format!("alice@example.org {alice_pub}\n")).unwrap();

    // A local file: offsite signs, ssh-keygen verifies.
    let file = m.dir.path().join("arc.wasm");
    std::fs::copy(script("arc"), &file).unwrap();
    on(&m, &reg, &["script", "sign", file.to_str().unwrap(), "--key", alice.to_str().unwrap()]).expect_code(0);
    let sig = m.dir.path().join("arc.wasm.sig");
    let verified = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-n", "offsite-script", "-I", "alice@example.org", "-f"])
        .arg(&signers)
        .arg("-s")
        .arg(&sig)
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
    // ssh-keygen signs, offsite verifies.
    std::fs::remove_file(&sig).unwrap();
    let made = Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", "offsite-script", "-f"])
        .arg(&alice)
        .arg(&file)
        .status()
        .unwrap();
    assert!(made.success());
    let ok = on(&m, &reg, &["script", "verify", file.to_str().unwrap(), "--signers", signers.to_str().unwrap()]);
    ok.expect_code(0);
    assert!(ok.stdout.contains("signed by alice@example.org"), "{}", ok.stdout);
    // Another build under the same signature is refused, naming the signer.
    std::fs::write(&file, rebuilt(&std::fs::read(script("arc")).unwrap(), "tampered")).unwrap();
    on(&m, &reg, &["script", "verify", file.to_str().unwrap(), "--signers", signers.to_str().unwrap()])
        .expect_code(2)
        .expect_stderr("the signature by alice@example.org");

    // Through the registry, to a machine that has never seen it.
    let r = reg.reference("offsite/arc:1.0");
    pushed(&on(&m, &reg, &["script", "push", script("arc").to_str().unwrap(), &r, "--sign", alice.to_str().unwrap()]));
    let other = Machine::new(&reg);
    let ok = on(&other, &reg, &["script", "verify", &r, "--signers", signers.to_str().unwrap()]);
    ok.expect_code(0);
    assert!(ok.stdout.contains("signed by alice@example.org"), "{}", ok.stdout);
    let (mallory, _) = ssh_keypair(m.dir.path(), "mallory");
    let r2 = reg.reference("offsite/arc:evil");
    let evil = m.dir.path().join("evil.wasm");
    std::fs::write(&evil, rebuilt(&std::fs::read(script("arc")).unwrap(), "evil")).unwrap();
    pushed(&on(&m, &reg, &["script", "push", evil.to_str().unwrap(), &r2, "--sign", mallory.to_str().unwrap()]));
    let third = Machine::new(&reg);
    let bad = on(&third, &reg, &["script", "verify", &r2, "--signers", signers.to_str().unwrap()]);
    bad.expect_code(2).expect_stderr("a key not listed");
    assert!(bad.stderr.contains(signers.to_str().unwrap()), "names the file consulted: {}", bad.stderr);
}

/// A site pinned to a stored digest runs with the registry down, without
/// a word; a machine without it fails clearly with exit 2.
#[test]
fn a_pinned_stored_script_runs_with_the_registry_down() {
    let mut reg = Registry::start(IP);
    let m = Machine::new(&reg);
    let digest_ref =
        pushed(&on(&m, &reg, &["script", "push", script("arc").to_str().unwrap(), &reg.reference("offsite/arc:1.0")]));
    let site = |machine: &Machine| {
        let src = machine.dir.path().join("src");
        std::fs::create_dir_all(src.join("www")).unwrap();
        std::fs::write(src.join("www/index.html"), "hello").unwrap();
        let site = machine.dir.path().join("web.toml");
        std::fs::write(
            &site,
            format!(
                "store = \"{}\"\nscript = \"{digest_ref}\"\n[read]\nroots = [\"{}\"]\n[params]\npath = \"src/www\"\n",
                machine.dir.path().join("store").display(),
                src.display()
            ),
        )
        .unwrap();
        site
    };
    let web = site(&m);
    reg.stop();
    let ran = on(&m, &reg, &["run", "--site", web.to_str().unwrap()]);
    ran.expect_code(0);
    assert_eq!(ran.stderr, "", "silent under cron");
    let manifest =
        std::fs::read_dir(m.dir.path().join("store/.offsite/manifests")).unwrap().next().unwrap().unwrap().path();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    assert_eq!(v["script"]["source"], digest_ref.as_str(), "the manifest records where the script came from");

    let other = Machine::new(&reg);
    let web2 = site(&other);
    let ran = on(&other, &reg, &["run", "--site", web2.to_str().unwrap()]);
    ran.expect_code(2).expect_stderr("is not in the local script store");
    assert!(
        !other.dir.path().join("store/.offsite/manifests").exists()
            || std::fs::read_dir(other.dir.path().join("store/.offsite/manifests")).unwrap().next().is_none()
    );
    // A tag with no recorded digest is refused before anything else.
    std::fs::write(
        &web2,
        std::fs::read_to_string(&web2).unwrap().replace(&digest_ref, &reg.reference("offsite/arc:1.0")),
    )
    .unwrap();
    on(&other, &reg, &["run", "--site", web2.to_str().unwrap()]).expect_code(2).expect_stderr("offsite script update");
}

/// Wrong credentials, an unknown CA: clear errors, nothing stored.
#[test]
fn wrong_credentials_and_an_untrusted_certificate_are_clear_errors() {
    let reg = Registry::shared(IP);
    let m = Machine::new(&reg);
    pushed(&on(&m, &reg, &["script", "push", script("arc").to_str().unwrap(), &reg.reference("offsite/arc:1.0")]));
    let other = Machine::new(&reg);
    reg.auth_file(&other.auth_file(), USER, "wrong");
    on(&other, &reg, &["script", "pull", &reg.reference("offsite/arc:1.0")])
        .expect_code(2)
        .expect_stderr("refused the credentials");
    assert!(
        !other.scripts_dir().join("blobs/sha256").exists()
            || std::fs::read_dir(other.scripts_dir().join("blobs/sha256")).unwrap().next().is_none()
    );
    let third = Machine::new(&reg);
    let mut cmd = offsite(Path::new(BIN));
    third.apply(&reg, &mut cmd).env("OFFSITE_CERTS_D", third.dir.path());
    let ran = Ran::from_output(cmd.args(["script", "pull", &reg.reference("offsite/arc:1.0")]).output().unwrap());
    ran.expect_code(2);
    assert!(ran.stderr.to_lowercase().contains("certificate"), "{}", ran.stderr);
}

/// A registry that serves a blob whose bytes do not match its digest: the
/// pull is refused and nothing is stored; a corrupt stored copy is refused
/// and pulled again.
#[test]
fn a_blob_that_does_not_match_its_digest_is_refused_and_nothing_is_stored() {
    let reg = Registry::start(IP);
    let m = Machine::new(&reg);
    let arc = std::fs::read(script("arc")).unwrap();
    let digest_ref =
        pushed(&on(&m, &reg, &["script", "push", script("arc").to_str().unwrap(), &reg.reference("offsite/arc:1.0")]));
    // A corrupt stored copy: detected, removed, pulled again.
    let stored = m.scripts_dir().join("blobs/sha256").join(sha256_hex(&arc));
    std::fs::write(&stored, rebuilt(&arc, "bit rot")).unwrap();
    on(&m, &reg, &["script", "verify", &digest_ref, "--signers", "/dev/null"])
        .expect_code(2)
        .expect_stderr("not signed");
    assert_eq!(sha256_hex(&std::fs::read(&stored).unwrap()), sha256_hex(&arc), "pulled again");

    let data = reg.blob_data(&sha256_hex(&arc));
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&data, bytes).unwrap();
    let other = Machine::new(&reg);
    let ran = on(&other, &reg, &["script", "pull", &reg.reference("offsite/arc:1.0")]);
    ran.expect_code(2);
    assert!(ran.stderr.contains("hash") || ran.stderr.contains("digest"), "{}", ran.stderr);
    let blobs = other.scripts_dir().join("blobs/sha256");
    let left: Vec<_> = std::fs::read_dir(&blobs).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "nothing stored, nothing half-written: {left:?}");
}

/// Pushes `blobs` and a manifest made of them, as raw as a hostile
/// registry user could: (repo, tag, [(media type, bytes, claimed size)], config media type).
fn push_raw(reg: &Registry, repo: &str, tag: &str, layers: &[(&str, &[u8], Option<u64>)], config_type: &str) {
    let layers_py: Vec<String> = layers
        .iter()
        .map(|(t, b, claimed)| {
            format!("('{t}', bytes.fromhex('{}'), {})", hex(b), claimed.map_or("None".into(), |c| c.to_string()))
        })
        .collect();
    let program = format!(
        "import requests, hashlib, json\nbase='https://{host}/v2/{repo}'\ns=requests.Session(); s.auth=('{USER}','{PASSWORD}'); s.verify='{ca}'\n\
         def blob(b):\n  d='sha256:'+hashlib.sha256(b).hexdigest()\n  r=s.post(base+'/blobs/uploads/'); r.raise_for_status()\n  \
         loc=r.headers['Location']; loc = loc if loc.startswith('http') else 'https://{host}'+loc\n  \
         r=s.put(loc+('&' if '?' in loc else '?')+'digest='+d, data=b, headers={{'Content-Type':'application/octet-stream'}}); r.raise_for_status()\n  return d\n\
         cfg=b'{{}}'\nlayers=[]\nfor t,b,claimed in [{layers}]:\n  layers.append({{'mediaType':t,'digest':blob(b),'size':claimed if claimed is not None else len(b)}})\n\
         m={{'schemaVersion':2,'mediaType':'application/vnd.oci.image.manifest.v1+json','config':{{'mediaType':'{config_type}','digest':blob(cfg),'size':2}},'layers':layers}}\n\
         r=s.put(base+'/manifests/{tag}', data=json.dumps(m), headers={{'Content-Type':'application/vnd.oci.image.manifest.v1+json'}}); r.raise_for_status()\n",
        host = reg.host(),
        repo = reg.repo(repo),
        ca = reg.ca_file().display(),
        layers = layers_py.join(", "),
    );
    // requests prefers REQUESTS_CA_BUNDLE over a session's own CA. The
    // program (with the blobs in it) goes on stdin.
    let mut child = Command::new("python3")
        .arg("-")
        .env("REQUESTS_CA_BUNDLE", reg.ca_file())
        .env_remove("CURL_CA_BUNDLE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), program.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Manifests that are not one wasm layer under the wasm config, a
/// component over the size limit, and a blob longer than its manifest
/// says, are refused; nothing is stored or left half-written.
#[test]
fn artifacts_that_are_not_one_wasm_component_are_refused() {
    let reg = Registry::shared(IP);
    let m = Machine::new(&reg);
    let wasm: &[u8] = b"\0asm\x0d\0\x01\0";
    let wasm_config = "application/vnd.wasm.config.v0+json";
    push_raw(
        &reg,
        "bad/two",
        "1",
        &[("application/wasm", wasm, None), ("application/wasm", b"\0asm second", None)],
        wasm_config,
    );
    push_raw(
        &reg,
        "bad/image",
        "1",
        &[("application/vnd.oci.image.layer.v1.tar+gzip", wasm, None)],
        "application/vnd.oci.image.config.v1+json",
    );
    push_raw(&reg, "bad/layer", "1", &[("application/octet-stream", wasm, None)], wasm_config);
    push_raw(&reg, "bad/huge", "1", &[("application/wasm", wasm, Some(65 * 1024 * 1024))], wasm_config);
    // 64 KiB of bytes behind a descriptor that says 8.
    let long = [wasm, &[7u8; 65536][..]].concat();
    push_raw(&reg, "bad/long", "1", &[("application/wasm", &long, Some(8))], wasm_config);
    for (repo, says) in [
        ("bad/two:1", "2 layers"),
        ("bad/image:1", "not a wasm component artifact"),
        ("bad/layer:1", "not application/wasm"),
        ("bad/huge:1", "over the limit"),
        ("bad/long:1", "over the limit"),
    ] {
        let ran = on(&m, &reg, &["script", "pull", &reg.reference(repo)]);
        ran.expect_code(2).expect_stderr(says);
    }
    let blobs = m.scripts_dir().join("blobs/sha256");
    let left: Vec<_> = std::fs::read_dir(&blobs).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// Several pulls of one digest at once (two sites starting together):
/// all succeed, one stored copy, no temporary files left.
#[test]
fn concurrent_pulls_of_one_digest_all_succeed() {
    let reg = Registry::shared(IP);
    let m = Machine::new(&reg);
    let r = reg.reference("offsite/arc:1.0");
    pushed(&on(&m, &reg, &["script", "push", script("arc").to_str().unwrap(), &r]));
    let other = Machine::new(&reg);
    let children: Vec<_> = (0..4)
        .map(|_| {
            let mut cmd = offsite(Path::new(BIN));
            other.apply(&reg, &mut cmd);
            cmd.args(["script", "pull", &r])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        Ran::from_output(c.wait_with_output().unwrap()).expect_code(0);
    }
    let names: Vec<String> = std::fs::read_dir(other.scripts_dir().join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![sha256_hex(&std::fs::read(script("arc")).unwrap())]);
}

/// A site that names `script_signers` runs only scripts signed by a listed
/// key: unsigned, an unknown key and a signature over another build are
/// each refused with exit 2, naming the signer found and the file.
#[test]
fn a_site_with_script_signers_refuses_what_they_did_not_sign() {
    let reg = Registry::shared(IP);
    let m = Machine::new(&reg);
    let dir = m.dir.path();
    let (alice, alice_pub) = ssh_keypair(dir, "alice");
    let (mallory, _) = ssh_keypair(dir, "mallory");
    let signers = dir.join("allowed_signers");
    std::fs::write(&signers, format!("alice@example.org {alice_pub}\n")).unwrap();
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("www")).unwrap();
    std::fs::write(src.join("www/index.html"), "hello").unwrap();
    let site = |script: &str| {
        let site = dir.join("web.toml");
        std::fs::write(
            &site,
            format!(
                "store = \"{}\"\nscript = \"{script}\"\nscript_signers = \"{}\"\n[read]\nroots = [\"{}\"]\n[params]\npath = \"src/www\"\n",
                dir.join("store").display(),
                signers.display(),
                src.display()
            ),
        )
        .unwrap();
        site
    };
    let run = |site: &Path| on(&m, &reg, &["run", "--site", site.to_str().unwrap()]);
    let unsigned = pushed(&on(
        &m,
        &reg,
        &["script", "push", script("arc").to_str().unwrap(), &reg.reference("offsite/arc:unsigned")],
    ));
    run(&site(&unsigned)).expect_code(2).expect_stderr("not signed");
    // Signed in the registry afterwards, from another machine: the next run
    // asks the registry for signatures, and runs, without a `script pull`.
    let other_machine = Machine::new(&reg);
    on(
        &other_machine,
        &reg,
        &["script", "sign", &reg.reference("offsite/arc:unsigned"), "--key", alice.to_str().unwrap()],
    )
    .expect_code(0);
    run(&site(&unsigned)).expect_code(0);
    std::fs::remove_dir_all(dir.join("store")).unwrap();
    let other = rebuilt(&std::fs::read(script("arc")).unwrap(), "mallory's");
    std::fs::write(dir.join("other.wasm"), &other).unwrap();
    let by_mallory = pushed(&on(
        &m,
        &reg,
        &[
            "script",
            "push",
            dir.join("other.wasm").to_str().unwrap(),
            &reg.reference("offsite/arc:mallory"),
            "--sign",
            mallory.to_str().unwrap(),
        ],
    ));
    let ran = run(&site(&by_mallory));
    ran.expect_code(2).expect_stderr("a key not listed");
    assert!(ran.stderr.contains("SHA256:") && ran.stderr.contains("allowed_signers"), "{}", ran.stderr);
    // A local file with alice's signature of another build beside it.
    let local = dir.join("arc.wasm");
    std::fs::write(&local, &other).unwrap();
    let sig = Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", "offsite-script", "-f"])
        .arg(&alice)
        .stdin(std::fs::File::open(script("arc")).unwrap())
        .output()
        .unwrap();
    std::fs::write(dir.join("arc.wasm.sig"), sig.stdout).unwrap();
    run(&site(local.to_str().unwrap())).expect_code(2).expect_stderr("over another build");
    // Signed by alice: runs, and the manifest names her.
    let good = pushed(&on(
        &m,
        &reg,
        &[
            "script",
            "push",
            script("arc").to_str().unwrap(),
            &reg.reference("offsite/arc:1.0"),
            "--sign",
            alice.to_str().unwrap(),
        ],
    ));
    run(&site(&good)).expect_code(0);
    let manifests: Vec<_> =
        std::fs::read_dir(dir.join("store/.offsite/manifests")).unwrap().flatten().map(|e| e.path()).collect();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifests[0]).unwrap()).unwrap();
    assert!(v["script"]["signer"].as_str().unwrap().starts_with("alice@example.org"), "{v}");
}

/// The story end to end: `mysql-pull` is published once and signed; two
/// sites on two machines (two config roots, two script stores) pin it with
/// `script update` and run it; a new version that also wants to run
/// `mysql -e 'SHOW DATABASES'` is pushed under the same tag; `update` on
/// the first site shows that call, says the site does not grant it, and
/// refuses, leaving the lock (and what runs) as it was.
#[test]
fn two_sites_share_a_signed_script_and_an_update_wanting_more_is_refused() {
    let server = offsite_testkit::sshd::Sshd::start("127.0.0.2");
    let reg = Registry::shared(IP);
    let publisher = Machine::new(&reg);
    let (alice, alice_pub) = ssh_keypair(publisher.dir.path(), "alice");
    let tag = reg.reference("backup/mysql-pull:stable");
    let v1 = pushed(&on(
        &publisher,
        &reg,
        &["script", "push", script("mysql-pull").to_str().unwrap(), &tag, "--sign", alice.to_str().unwrap()],
    ));

    let grants = "commands = [[\"mysqldump\", \"--single-transaction\", \"--quick\", \"--add-drop-table\", \"*\"]]";
    let machines: Vec<(Machine, PathBuf)> = ["db1", "db2"]
        .iter()
        .map(|name| {
            let m = Machine::new(&reg);
            let etc = m.dir.path().join("etc");
            std::fs::create_dir_all(&etc).unwrap();
            std::fs::write(etc.join("allowed_signers"), format!("alice@example.org {alice_pub}\n")).unwrap();
            let site = etc.join(format!("{name}.toml"));
            std::fs::write(
                &site,
                format!(
                    "store = \"{}\"\nscript = \"{tag}\"\nscript_signers = \"allowed_signers\"\n[params]\ndumps = \"server1:shop\"\n{}",
                    m.dir.path().join("store").display(),
                    server.host_section("server1", grants)
                ),
            )
            .unwrap();
            (m, site)
        })
        .collect();
    for (m, site) in &machines {
        // Before update: a tag with nothing recorded does not run.
        on(m, &reg, &["run", "--site", site.to_str().unwrap(), "--dry-run"])
            .expect_code(2)
            .expect_stderr("script update");
        // The second machine's admin names the site file from its own
        // directory, as a bare file name.
        let up = if site.ends_with("db2.toml") {
            let mut cmd = offsite(Path::new(BIN));
            m.apply(&reg, &mut cmd);
            Ran::from_output(
                cmd.current_dir(site.parent().unwrap()).args(["script", "update", "db2.toml"]).output().unwrap(),
            )
        } else {
            on(m, &reg, &["script", "update", site.to_str().unwrap()])
        };
        up.expect_code(0);
        assert!(
            up.stdout.contains("runs `mysqldump --single-transaction --quick --add-drop-table shop` on server1"),
            "{}",
            up.stdout
        );
        assert!(up.stdout.contains(&format!("recorded {v1}")), "{}", up.stdout);
        let lock = std::fs::read_to_string(site.with_extension("lock")).unwrap();
        assert!(lock.contains("alice@example.org"), "{lock}");
        let check = on(m, &reg, &["check", site.to_str().unwrap(), "--connect"]);
        assert!(check.stdout.contains("stored locally"), "{}", check.stdout);
        assert!(check.stdout.contains("signed by alice@example.org"), "{}", check.stdout);
        assert!(check.stdout.contains("still points there"), "{}", check.stdout);
        on(m, &reg, &["run", "--site", site.to_str().unwrap(), "--dry-run"]).expect_code(0);
    }

    // The tag moves to an unsigned build: update refuses, the lock stays.
    let (m, site) = &machines[1];
    let lock_before = std::fs::read_to_string(site.with_extension("lock")).unwrap();
    let unsigned = m.dir.path().join("unsigned.wasm");
    std::fs::write(&unsigned, rebuilt(&std::fs::read(script("mysql-pull")).unwrap(), "unsigned")).unwrap();
    pushed(&on(&publisher, &reg, &["script", "push", unsigned.to_str().unwrap(), &tag]));
    on(m, &reg, &["script", "update", site.to_str().unwrap()]).expect_code(2).expect_stderr("not signed");
    assert_eq!(std::fs::read_to_string(site.with_extension("lock")).unwrap(), lock_before);
    let shown = on(m, &reg, &["inspect", &tag]);
    shown.expect_code(0);
    assert!(shown.stdout.contains("script:      mysql-pull 0.1.0"), "{}", shown.stdout);

    // The next release wants one more command.
    let v2 = pushed(&on(
        &publisher,
        &reg,
        &["script", "push", script("mysql-pull-next").to_str().unwrap(), &tag, "--sign", alice.to_str().unwrap()],
    ));
    assert_ne!(v1, v2);
    let (m, site) = &machines[0];
    let lock_before = std::fs::read_to_string(site.with_extension("lock")).unwrap();
    let check = on(m, &reg, &["check", site.to_str().unwrap(), "--connect"]);
    assert!(check.stdout.contains("has moved to"), "{}", check.stdout);
    let up = on(m, &reg, &["script", "update", site.to_str().unwrap()]);
    up.expect_code(2).expect_stderr("update refused");
    assert!(
        up.stdout.contains("old: mysql-pull 0.1.0") && up.stdout.contains("new: mysql-pull 0.2.0"),
        "{}",
        up.stdout
    );
    assert!(up.stdout.contains("+ runs `mysql -N -e 'SHOW DATABASES'` on server1: not granted"), "{}", up.stdout);
    assert_eq!(std::fs::read_to_string(site.with_extension("lock")).unwrap(), lock_before, "the lock is unchanged");
    // What runs is still v1, from the store, with the registry down too.
    drop(reg);
    let audit = m.dir.path().join("audit.jsonl");
    on_offline(m, &["run", "--site", site.to_str().unwrap(), "--dry-run", "--audit", audit.to_str().unwrap()])
        .expect_code(0);
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains("SHOW DATABASES"), "{text}");
}

/// `on` for a machine whose registry is gone.
fn on_offline(machine: &Machine, args: &[&str]) -> Ran {
    let mut cmd = offsite(Path::new(BIN));
    cmd.env("OFFSITE_SCRIPTS_DIR", machine.scripts_dir())
        .env("REGISTRY_AUTH_FILE", machine.auth_file())
        .env("HOME", machine.dir.path());
    Ran::from_output(cmd.args(args).output().unwrap())
}

/// `watch` with a followed tag: a build pushed unsigned is refused (once,
/// however many times the tag is looked at) and the signed version keeps
/// running; a signed new build is swapped in; a registry that goes down is
/// warned about once.
#[test]
fn watch_follows_a_tag_but_only_to_signed_versions() {
    let mut reg = Registry::start(IP);
    let m = Machine::new(&reg);
    let dir = m.dir.path();
    let (alice, alice_pub) = ssh_keypair(dir, "alice");
    std::fs::write(dir.join("allowed_signers"), format!("alice@example.org {alice_pub}\n")).unwrap();
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/index.html"), "hello").unwrap();
    let tag = reg.reference("offsite/arc:live");
    let arc = std::fs::read(script("arc")).unwrap();
    let push = |bytes: &[u8], name: &str, sign: bool| {
        let file = dir.join(name);
        std::fs::write(&file, bytes).unwrap();
        let mut args = vec!["script", "push", file.to_str().unwrap(), &tag];
        if sign {
            args.extend(["--sign", alice.to_str().unwrap()]);
        }
        pushed(&on(&m, &reg, &args))
    };
    push(&arc, "v1.wasm", true);
    let site = followed_arc_site(dir, &tag, "script_signers = \"allowed_signers\"\n");
    let log = dir.join("watch.log");
    let mut child = watch(&m, &reg, &site, &log);
    let wait_for = |needle: &str, count: usize| wait_for_log(&log, needle, count);
    wait_for("watching site web", 1);
    push(&rebuilt(&arc, "unsigned"), "v2.wasm", false);
    let text = wait_for("keeping the running one", 1);
    assert!(text.contains("not signed"), "{text}");
    // Two more looks at the tag: the refusal is not logged again.
    std::thread::sleep(std::time::Duration::from_secs(21));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("keeping the running one").count(), 1, "{text}");
    push(&rebuilt(&arc, "signed v3"), "v3.wasm", true);
    wait_for("reloaded arc", 1);
    // The registry goes down: said once, however many looks fail, and
    // the version pulled last keeps running.
    reg.stop();
    wait_for("cannot reach the registry to follow", 1);
    std::thread::sleep(std::time::Duration::from_secs(21));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("cannot reach the registry").count(), 1, "{text}");
    assert_eq!(text.matches("is not valid").count(), 1, "only the unsigned build was refused: {text}");
    let _ = child.kill();
    let _ = child.wait();
    assert!(!text.contains("panicked"), "{text}");
}

/// `web.toml` in `dir`: the arc script of `reference`, followed (a look
/// every 10 s), scheduled once a year, archiving `dir/www`; `extra` is
/// more top-level settings.
fn followed_arc_site(dir: &Path, reference: &str, extra: &str) -> PathBuf {
    let site = dir.join("web.toml");
    std::fs::write(
        &site,
        format!(
            "store = \"{}\"\nscript = \"{reference}\"\nscript_update = \"follow\"\nscript_poll = \"10s\"\n{extra}\
             schedule = \"0 0 1 1 *\"\n[read]\nroots = [\"{}\"]\n[params]\npath = \"www\"\n",
            dir.join("store").display(),
            dir.display()
        ),
    )
    .unwrap();
    site
}

/// `offsite watch SITE` on machine `m`, its log (stderr) in `log`.
fn watch(m: &Machine, reg: &Registry, site: &Path, log: &Path) -> std::process::Child {
    let mut cmd = offsite(Path::new(BIN));
    m.apply(reg, &mut cmd);
    cmd.arg("watch")
        .arg(site)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits (a minute at most) until `log` says `needle` `count` times; the log.
fn wait_for_log(log: &Path, needle: &str, count: usize) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(needle).count() >= count {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "no {needle:?} ({count}) in:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Anyone who can write to the registry can point a tag back at an older
/// build the same key signed, signature and all: `script update` refuses
/// to take a site back (or to another script) unless asked, and says what
/// changed.
#[test]
fn a_tag_moved_back_to_an_older_signed_version_is_refused() {
    let server = offsite_testkit::sshd::Sshd::start("127.0.0.2");
    let reg = Registry::shared(IP);
    let publisher = Machine::new(&reg);
    let (alice, alice_pub) = ssh_keypair(publisher.dir.path(), "alice");
    let tag = reg.reference("backup/mysql-pull:stable");
    let push = |name: &str| {
        pushed(&on(
            &publisher,
            &reg,
            &["script", "push", script(name).to_str().unwrap(), &tag, "--sign", alice.to_str().unwrap()],
        ))
    };
    let m = Machine::new(&reg);
    let etc = m.dir.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("allowed_signers"), format!("alice@example.org {alice_pub}\n")).unwrap();
    let site = etc.join("db1.toml");
    let grants = "commands = [[\"mysqldump\", \"--single-transaction\", \"--quick\", \"--add-drop-table\", \"*\"], \
                  [\"mysql\", \"-N\", \"-e\", \"SHOW DATABASES\"]]";
    std::fs::write(
        &site,
        format!(
            "store = \"{}\"\nscript = \"{tag}\"\nscript_signers = \"allowed_signers\"\n[params]\ndumps = \"server1:shop\"\n{}",
            m.dir.path().join("store").display(),
            server.host_section("server1", grants)
        ),
    )
    .unwrap();
    push("mysql-pull");
    let v2 = push("mysql-pull-next");
    let up = on(&m, &reg, &["script", "update", site.to_str().unwrap()]);
    up.expect_code(0);
    assert!(up.stdout.contains(&format!("recorded {v2}")), "{}", up.stdout);
    let lock = std::fs::read_to_string(site.with_extension("lock")).unwrap();

    // The tag goes back to 0.1.0 (a manifest of its own, the same
    // component), still signed by alice.
    let back = push("mysql-pull");
    let up = on(&m, &reg, &["script", "update", site.to_str().unwrap()]);
    up.expect_code(2).expect_stderr("mysql-pull 0.1.0 is older than the recorded 0.2.0");
    assert!(up.stderr.contains("--allow-downgrade"), "{}", up.stderr);
    assert_eq!(std::fs::read_to_string(site.with_extension("lock")).unwrap(), lock, "the lock is unchanged");
    // Asked for, it is taken.
    let up = on(&m, &reg, &["script", "update", site.to_str().unwrap(), "--allow-downgrade"]);
    up.expect_code(0);
    assert!(up.stdout.contains(&format!("recorded {back}")), "{}", up.stdout);

    // Another script under the same tag, signed by the same key.
    pushed(&on(
        &publisher,
        &reg,
        &["script", "push", script("noop").to_str().unwrap(), &tag, "--sign", alice.to_str().unwrap()],
    ));
    on(&m, &reg, &["script", "update", site.to_str().unwrap()])
        .expect_code(2)
        .expect_stderr("the tag now holds script noop where mysql-pull was recorded");
}

/// A TCP relay in front of `reg` on another port of its address (its TLS
/// certificate names the address, so clients accept it there), which holds
/// every byte while `stall` is set: a registry that stops answering.
fn stalling_relay(reg: &Registry, stall: std::sync::Arc<std::sync::atomic::AtomicBool>) -> String {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let target: std::net::SocketAddr = reg.host().parse().unwrap();
    let listener = std::net::TcpListener::bind((target.ip(), 0)).unwrap();
    let relay = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(200) {
            let Ok(client) = conn else { return };
            let Ok(server) = std::net::TcpStream::connect(target) else { return };
            for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                let stall = std::sync::Arc::clone(&stall);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 << 10];
                    loop {
                        let Ok(n) = from.read(&mut buf) else { return };
                        if n == 0 {
                            let _ = to.shutdown(std::net::Shutdown::Write);
                            return;
                        }
                        while stall.load(Ordering::Relaxed) {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    relay
}

/// A followed tag whose registry stops answering holds nothing up: the
/// watcher answers SIGTERM at once (the look at the tag used to run in its
/// main loop, which then heard nothing until the registry client's read
/// timeout).
#[test]
fn a_registry_that_stops_answering_never_holds_up_the_watcher() {
    let reg = Registry::start(IP);
    let m = Machine::new(&reg);
    let dir = m.dir.path();
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/index.html"), "hello").unwrap();
    pushed(&on(&m, &reg, &["script", "push", script("arc").to_str().unwrap(), &reg.reference("offsite/arc:live")]));
    let stall = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let relay = stalling_relay(&reg, std::sync::Arc::clone(&stall));
    // The relay is the registry's address to this machine: its CA and
    // credentials, under the relay's HOST:PORT.
    let certs = reg.certs_d().join(&relay);
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(reg.ca_file(), certs.join("ca.crt")).unwrap();
    let auth = std::fs::read_to_string(m.auth_file()).unwrap().replace(&reg.host(), &relay);
    std::fs::write(m.auth_file(), auth).unwrap();
    let site = followed_arc_site(dir, &format!("oci://{relay}/offsite/arc:live"), "");
    let log = dir.join("watch.log");
    let mut child = watch(&m, &reg, &site, &log);
    wait_for_log(&log, "watching site web", 1);
    // The registry stops answering; the next look at the tag (10 s after
    // the start) hangs there.
    stall.store(true, std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(std::time::Duration::from_secs(13));
    let asked = std::time::Instant::now();
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if asked.elapsed() > std::time::Duration::from_secs(20) {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let took = asked.elapsed();
    let text = std::fs::read_to_string(&log).unwrap();
    stall.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(took < std::time::Duration::from_secs(2), "SIGTERM answered after {took:?}:\n{text}");
    assert!(status.success(), "{status}:\n{text}");
    assert!(text.contains("stopped"), "{text}");
}

/// A registry that answers a manifest request with 512 MiB: the pull is
/// refused after the manifest's bound, in bounded memory (oci-client read
/// such an answer whole before anything checked its size).
#[test]
fn a_huge_manifest_is_refused_without_being_held() {
    let reg = Registry::start(IP);
    let m = Machine::new(&reg);
    let keys = reg.ca_file().parent().unwrap().to_path_buf();
    // A TLS server with the registry's certificate that sends files as
    // they are (`openssl s_server -HTTP`): the manifest is a header and
    // 512 MiB of sparse zeros.
    let www = tempfile::tempdir().unwrap();
    let manifests = www.path().join("v2/offsite/arc/manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let file = std::fs::File::create(manifests.join("live")).unwrap();
    std::io::Write::write_all(
        &mut &file,
        b"HTTP/1.0 200 ok\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\r\n",
    )
    .unwrap();
    file.set_len(512 << 20).unwrap();
    let port = std::net::TcpListener::bind((IP, 0)).unwrap().local_addr().unwrap().port();
    let addr = format!("{IP}:{port}");
    let mut server = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-HTTP", "-accept", &addr, "-cert"])
        .arg(keys.join("cert.pem"))
        .arg("-key")
        .arg(keys.join("key.pem"))
        .current_dir(www.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "openssl s_server did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let certs = reg.certs_d().join(&addr);
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(reg.ca_file(), certs.join("ca.crt")).unwrap();
    let errors = m.dir.path().join("stderr");
    let peak = m.dir.path().join("peak");
    let mut cmd = offsite(Path::new(BIN));
    m.apply(&reg, &mut cmd);
    cmd.args(["script", "pull", &format!("oci://{addr}/offsite/arc:live")]);
    let status = with_peak_memory(&cmd, &peak)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&errors).unwrap())
        .status()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let stderr = std::fs::read_to_string(&errors).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the manifest is longer than 262144 bytes"), "{stderr}");
    let peak_mib = peak_memory_mib(&peak);
    assert!(peak_mib < 128, "the pull peaked at {peak_mib} MiB on a 512 MiB answer");
}

/// A signature pushed with a script is over a statement naming its
/// repository, name and version (which OpenSSH checks too, once cut from
/// the signature); copied to another repository's build of the same
/// bytes, it is refused (a signature over the bytes alone passed there).
#[test]
fn a_signature_moved_to_another_repository_is_refused() {
    let reg = Registry::shared(IP);
    let m = Machine::new(&reg);
    let (alice, alice_pub) = ssh_keypair(m.dir.path(), "alice");
    let signers = m.dir.path().join("allowed_signers");
    std::fs::write(&signers, format!("alice@example.org {alice_pub}\n")).unwrap();
    let arc = script("arc");
    let a = reg.reference("offsite/arc:1.0");
    pushed(&on(&m, &reg, &["script", "push", arc.to_str().unwrap(), &a, "--sign", alice.to_str().unwrap()]));
    let ok = on(&m, &reg, &["script", "verify", &a, "--signers", signers.to_str().unwrap()]);
    ok.expect_code(0);
    let shown = format!("as arc 0.1.0 of {}/{}, at ", reg.host(), reg.repo("offsite/arc"));
    assert!(ok.stdout.contains(&shown), "{}", ok.stdout);

    // The stored signature: the statement, then the SSHSIG over it.
    let component = sha256_hex(&std::fs::read(&arc).unwrap());
    let sig_dir = m.scripts_dir().join("sigs/sha256").join(&component);
    let stored = std::fs::read_dir(&sig_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", sig_dir.display()))
        .flatten()
        .map(|e| std::fs::read(e.path()).unwrap())
        .next()
        .unwrap();
    let text = String::from_utf8(stored.clone()).unwrap();
    let (statement, armored) = text.split_at(text.find("-----BEGIN SSH SIGNATURE-----").unwrap());
    assert!(statement.starts_with("offsite script statement v1\ncomponent sha256:"), "{statement}");
    let sig = m.dir.path().join("statement.sig");
    std::fs::write(&sig, armored).unwrap();
    let statement_file = m.dir.path().join("statement");
    std::fs::write(&statement_file, statement).unwrap();
    let verified = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-n", "offsite-script", "-I", "alice@example.org", "-f"])
        .arg(&signers)
        .arg("-s")
        .arg(&sig)
        .stdin(std::fs::File::open(&statement_file).unwrap())
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));

    // Whoever can write to the registry copies it to another repository.
    let b = reg.reference("offsite/dump-everything:1.0");
    let b_pinned = pushed(&on(&m, &reg, &["script", "push", arc.to_str().unwrap(), &b]));
    let b_manifest = b_pinned.rsplit("sha256:").next().unwrap();
    push_raw(
        &reg,
        "offsite/dump-everything",
        &format!("sha256-{b_manifest}.sig"),
        &[("application/vnd.offsite.sshsig.v1", &stored, None)],
        "application/vnd.oci.empty.v1+json",
    );
    let other = Machine::new(&reg);
    let bad = on(&other, &reg, &["script", "verify", &b, "--signers", signers.to_str().unwrap()]);
    bad.expect_code(2).expect_stderr(&format!("signed for {}/{}, not", reg.host(), reg.repo("offsite/arc")));
}
