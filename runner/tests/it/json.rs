//! `--json` on every command that reports, checked against the documented
//! schema (docs/json-schema.json) for good results, problems and errors
//! (exit 2 and 4 print an error object too).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use offsite_testkit::{Ran, offsite, repo_root, script};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_offsite");

/// The documented schema, checked by an implementation that is not ours
/// and not Rust's: Python's `jsonschema` (which `.ci/run` installs), run
/// once per check. It also checks that the schema is a valid 2020-12 one.
struct Schema {
    path: PathBuf,
}

/// Reads the instance on stdin; prints one line per error, `message at
/// /path`; exits 3 when the schema itself is not valid.
const CHECK: &str = r#"
import json, sys
import jsonschema
schema = json.load(open(sys.argv[1]))
try:
    jsonschema.Draft202012Validator.check_schema(schema)
except jsonschema.SchemaError as e:
    print("the schema is not a valid JSON Schema:", e.message)
    sys.exit(3)
for e in jsonschema.Draft202012Validator(schema).iter_errors(json.load(sys.stdin)):
    print(e.message, "at", "/" + "/".join(str(p) for p in e.absolute_path))
"#;

impl Schema {
    /// Every way `value` does not match, empty when it does.
    fn errors(&self, value: &Value) -> Vec<String> {
        use std::io::Write;
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(CHECK)
            .arg(&self.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3 (.ci/run installs it, with its jsonschema)");
        child.stdin.take().unwrap().write_all(value.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "the schema check did not run: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
    }

    fn is_valid(&self, value: &Value) -> bool {
        self.errors(value).is_empty()
    }
}

fn validator() -> Schema {
    Schema { path: repo_root().join("docs/json-schema.json") }
}

/// Parses the one JSON line of `ran`'s stdout and checks it against the
/// schema, its command and its exit code.
fn checked(v: &Schema, ran: &Ran, command: &str, code: i32) -> Value {
    ran.expect_code(code);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line on stdout: {:?}\nstderr: {}", ran.stdout, ran.stderr);
    let value: Value = serde_json::from_str(lines[0]).unwrap();
    let errors = v.errors(&value);
    assert!(errors.is_empty(), "{value}\ndoes not match the schema:\n{}", errors.join("\n"));
    assert_eq!(value["format"], 1);
    assert_eq!(value["command"], command, "{value}");
    let keys: Vec<&String> = value.as_object().unwrap().keys().take(2).collect();
    assert_eq!(keys, ["format", "command"], "format and command come first");
    value
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("www")).unwrap();
        std::fs::write(dir.path().join("www/index.html"), "hello").unwrap();
        let setup = Setup { dir };
        setup.site("");
        setup
    }

    fn site(&self, extra: &str) -> PathBuf {
        let file = self.dir.path().join("web.toml");
        std::fs::write(
            &file,
            format!(
                "store = \"store\"\nscript = \"{}\"\nschedule = \"0 3 * * *\"\n[read]\nroots = [\"www\"]\n\
                 [params]\npath = \"www\"\n{extra}",
                script("arc").display()
            ),
        )
        .unwrap();
        file
    }

    fn file(&self) -> String {
        self.dir.path().join("web.toml").display().to_string()
    }

    fn run(&self, args: &[&str]) -> Ran {
        let mut cmd = offsite(Path::new(BIN));
        cmd.current_dir(self.dir.path())
            .env("OFFSITE_SCRIPTS_DIR", self.dir.path().join("scripts"))
            .env("OFFSITE_CACHE_DIR", offsite_testkit::shared_cache_dir())
            .args(args);
        Ran::from_output(cmd.output().unwrap())
    }
}

#[test]
fn every_reporting_command_prints_json_that_matches_the_schema() {
    let v = validator();
    let s = Setup::new();
    let site = s.file();

    // run: good, dry, failed (exit 1 with its summary), bad input (exit 2).
    let run = checked(&v, &s.run(&["run", "--site", &site, "--json", "--now", "2004-03-21T01:48:44"]), "run", 0);
    assert_eq!(run["status"], "ok");
    assert_eq!(run["files"][0]["path"], "www.20040321-014844.tgz", "the manifest's name for outputs: {run}");
    let manifest = std::fs::read_dir(s.dir.path().join("store/.offsite/manifests")).unwrap().next().unwrap().unwrap();
    let manifest: Value = serde_json::from_slice(&std::fs::read(manifest.path()).unwrap()).unwrap();
    assert_eq!(run["files"], manifest["files"], "the same fields as the manifest");
    assert_eq!(run["run_id"], manifest["run_id"]);
    checked(&v, &s.run(&["--json", "run", "--site", &site, "--dry-run"]), "run", 0);
    let failed = checked(&v, &s.run(&["run", "--site", &site, "--json", "--param", "path=/etc"]), "run", 1);
    assert_eq!(failed["status"], "failed");
    assert!(failed["error"].as_str().unwrap().contains("denied"), "{failed}");
    let bad = checked(&v, &s.run(&["run", "--site", &site, "--json", "--param", "nosuch=1"]), "run", 2);
    assert_eq!((bad["status"].as_str(), bad["exit"].as_i64()), (Some("error"), Some(2)));
    assert!(bad["error"].as_str().unwrap().contains("nosuch"), "{bad}");

    // check, good and with problems.
    let check = checked(&v, &s.run(&["check", &site, "--json"]), "check", 0);
    assert_eq!(check["script"]["name"], "arc");
    s.site("paht = \"www\"\n");
    let problems = checked(&v, &s.run(&["check", &site, "--json"]), "check", 2);
    assert_eq!(problems["status"], "problems");
    assert!(!problems["problems"].as_array().unwrap().is_empty(), "{problems}");
    s.site("");

    // inspect.
    let inspect = checked(&v, &s.run(&["inspect", script("arc").to_str().unwrap(), "--json"]), "inspect", 0);
    assert_eq!(inspect["name"], "arc");
    assert!(inspect["imports"].as_array().unwrap().iter().any(|i| i.as_str().unwrap().contains("archive")));

    // status, good and failing.
    s.run(&["run", "--site", &site, "--now", "2004-03-21T02:00:00"]).expect_code(0);
    let status = checked(&v, &s.run(&["status", &site, "--json"]), "status", 0);
    assert_eq!(status["sites"][0]["last_run"]["status"], "ok");
    assert!(status["sites"][0]["next_run"]["at"].is_string(), "{status}");
    s.run(&["run", "--site", &site, "--param", "path=/etc"]).expect_code(1);
    let failing = checked(&v, &s.run(&["status", &site, "--json"]), "status", 1);
    assert_eq!(failing["failing"][0], "web");

    // prune: a dry run and a real one.
    s.run(&["run", "--site", &site, "--now", "2004-03-22T01:48:44"]).expect_code(0);
    s.site("[retention]\nkeep_last = 1\n");
    let dry = checked(&v, &s.run(&["prune", &site, "--dry-run", "--json"]), "prune", 0);
    assert!(dry["runs"].as_array().unwrap().iter().any(|r| r["action"] == "prune"), "{dry}");
    let pruned = checked(&v, &s.run(&["prune", &site, "--json"]), "prune", 0);
    assert_eq!(pruned["dry_run"], false);

    // verify, good and with a problem.
    checked(&v, &s.run(&["verify", &site, "--json"]), "verify", 0);
    std::fs::write(s.dir.path().join("store/stray.txt"), "x").unwrap();
    let problems = checked(&v, &s.run(&["verify", &site, "--json"]), "verify", 1);
    assert!(problems["problems"][0].as_str().unwrap().contains("stray.txt"), "{problems}");

    // runs: the one run prune kept.
    let runs = checked(&v, &s.run(&["runs", &site, "--json"]), "runs", 0);
    assert_eq!((&runs["runs"][0]["status"], &runs["runs"][0]["signature"]), (&"ok".into(), &"none".into()), "{runs}");

    // script ls, on an empty script store.
    let ls = checked(&v, &s.run(&["script", "ls", "--json"]), "script ls", 0);
    assert_eq!(ls["scripts"], Value::Array(vec![]));

    // A command with no JSON report refuses --json, in JSON.
    let refused = checked(&v, &s.run(&["build", "--json"]), "?", 2);
    assert!(refused["error"].as_str().unwrap().contains("no JSON output"), "{refused}");
}

/// Exit 4 (another run holds the lock) prints an error object too.
#[test]
fn a_locked_site_says_so_in_json() {
    let v = validator();
    let s = Setup::new();
    // The fixture takes no `path`: a site of its own on the same store.
    let site = s.dir.path().join("fixture.toml");
    std::fs::write(&site, "name = \"web\"\nstore = \"store\"\nshared_store = true\n").unwrap();
    let site = site.display().to_string();
    let mut holder = Command::new(BIN)
        .current_dir(s.dir.path())
        .args(["run", script("fixture").to_str().unwrap(), "--site", &site])
        .args(["--param", "case=sleep", "--param", "arg=20000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let runs = s.dir.path().join("store/.offsite/runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_dir(&runs)
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".journal")))
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "the holder never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let locked = checked(&v, &s.run(&["run", "--site", &s.file(), "--json"]), "run", 4);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(locked["exit"], 4);
    assert!(locked["error"].as_str().unwrap().contains("pid"), "{locked}");
}

/// A run into a restic repository: its archive is a tree, whose file has
/// `tree` and an empty `sha256`, which the schema allows there and only
/// there.
#[test]
fn a_run_into_a_repository_reports_its_archive_as_a_tree() {
    use std::os::unix::fs::PermissionsExt;
    let v = validator();
    let setup = Setup::new();
    let dir = setup.dir.path();
    std::fs::write(dir.join("pass"), "a repository password\n").unwrap();
    std::fs::set_permissions(dir.join("pass"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let file = dir.join("repo.toml");
    std::fs::write(
        &file,
        "store = \"restic:repo\"\n[read]\nroots = [\"www\"]\n[repository]\npassword_file = \"pass\"\n",
    )
    .unwrap();
    let s = script("arc");
    let mut cmd = offsite(Path::new(BIN));
    cmd.current_dir(dir).env_remove("RESTIC_PASSWORD_FILE");
    cmd.args(["run", s.to_str().unwrap(), "--site", file.to_str().unwrap(), "--param", "path=www", "--json"]);
    let value = checked(&v, &Ran::from_output(cmd.output().unwrap()), "run", 0);
    let f = &value["files"][0];
    assert_eq!((f["sha256"].as_str(), f["tree"]["entries"].as_u64()), (Some(""), Some(2)), "{value}");
    // Without `tree`, an empty sha256 does not pass.
    let mut plain = value.clone();
    plain["files"][0].as_object_mut().unwrap().remove("tree");
    assert!(!v.is_valid(&plain), "an empty sha256 passed on a file that is not a tree");
}
