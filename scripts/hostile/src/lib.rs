//! Test fixture: a hostile script. `--param case=NAME` picks one attack;
//! the script attempts it and returns whatever the runner answered, so the
//! end-to-end suite (runner/tests/hostile.rs) can check that every attack
//! is contained, reported with the right error and exit code, and leaves
//! nothing outside the store. Not an example to copy.

use offsite_sdk::secrets::Secret;
use offsite_sdk::ssh::{self, Stream};
use offsite_sdk::wit::offsite::backup::ssh as raw_ssh;
use offsite_sdk::{Param, Result, Script, ScriptInfo, anyhow, archive, bail, clock, params, scp};

struct Hostile;

impl Script for Hostile {
    fn describe() -> ScriptInfo {
        ScriptInfo::new("hostile", env!("CARGO_PKG_VERSION"))
            // With a terminal trick: erase the line and draw a fake digest.
            .description("attacks its sandbox, one case at a time\x1b[2K\rsha256:      0000 (fake)\nimports:\x1b[8m")
            .param(Param::required("case", "the attack"))
            .param(Param::optional("arg", "a path or value the attack uses"))
            .param(Param::optional("hidden", "a secret parameter it must never read").secret().default("s3cret-param"))
            .capabilities(["ssh", "scp", "archive", "secrets", "clock", "params", "log"])
    }

    fn run() -> Result<()> {
        let arg = params::get("arg")?.unwrap_or_default();
        match params::require("case")?.as_str() {
            // Sandbox.
            "spin" => loop {
                std::hint::black_box(0u64);
            },
            "spin-between-host-calls" => loop {
                std::hint::black_box(clock::now());
            },
            "hoard-memory" => {
                let mut hoard = Vec::new();
                loop {
                    let mut block = vec![1u8; 1 << 20];
                    block[4095] = 2;
                    hoard.push(std::hint::black_box(block));
                }
            }
            #[allow(unconditional_recursion)]
            "recurse" => {
                fn down(n: u64) -> u64 {
                    std::hint::black_box(down(std::hint::black_box(n + 1))) + 1
                }
                down(0);
                Ok(())
            }
            "huge-param-name" => {
                params::get(&"p".repeat(16 << 20))?;
                Ok(())
            }
            "huge-argv" => {
                let argv = vec!["echo".to_string(); 100_000];
                ssh::exec("server1", &argv)?;
                Ok(())
            }
            "huge-source-list" => {
                let sources = vec!["nothing-here".to_string(); 200_000];
                archive::tar_gz(&sources, "x.tgz")?;
                Ok(())
            }
            "secret-handle-flood" => {
                let mut held = Vec::new();
                loop {
                    held.push(Secret::open("token")?);
                }
            }
            "connection-flood" => {
                for _ in 0..40 {
                    ssh::exec("server1", &["echo", "again"])?;
                }
                Ok(())
            }
            "wasi-read-file" => {
                std::fs::read(&arg).map_err(|e| anyhow!("reading {arg}: {e}"))?;
                bail!("read {arg} through WASI")
            }
            "wasi-write-file" => {
                std::fs::write(&arg, "pwned").map_err(|e| anyhow!("writing {arg}: {e}"))?;
                bail!("wrote {arg} through WASI")
            }
            "wasi-env" => match std::env::vars().next() {
                Some((k, _)) => bail!("saw environment variable {k}"),
                None => bail!("environment: empty"),
            },
            "wasi-connect" => {
                std::net::TcpStream::connect(arg.as_str()).map_err(|e| anyhow!("connecting to {arg}: {e}"))?;
                bail!("connected to {arg}")
            }
            // Policy.
            "host-not-granted" => {
                ssh::exec("server9", &["echo", "hi"])?;
                Ok(())
            }
            "program-not-granted" => {
                ssh::exec("server1", &["cat", "/etc/shadow"])?;
                Ok(())
            }
            "argument-not-granted" => {
                // `sh -c SCRIPT` is granted; a further argument is not.
                ssh::exec("server1", &["sh", "-c", "true", "extra-argument"])?;
                Ok(())
            }
            "metacharacters-arrive-literally" => {
                let out = ssh::exec("server1", &["echo", &format!("$(touch {arg}); touch {arg} `touch {arg}`")])?;
                if !out.success() || !out.stdout_text().contains("$(touch") {
                    bail!("unexpected: {:?}", out.stdout_text());
                }
                Ok(())
            }
            "nul-in-argv" => {
                ssh::exec("server1", &["echo", "a\0b"])?;
                Ok(())
            }
            "fetch-dotdot" => {
                scp::fetch("server1", &format!("{arg}/../../etc/passwd"), "passwd")?;
                Ok(())
            }
            "fetch-absolute-outside" => {
                scp::fetch("server1", "/etc/passwd", "passwd")?;
                Ok(())
            }
            "fetch-remote-symlink" => {
                scp::fetch("server1", &format!("{arg}/escape.tgz"), "escape.tgz")?;
                Ok(())
            }
            "store-dotdot" => store_write("../outside/pwned.tgz"),
            "store-absolute" => store_write(&format!("{arg}/pwned.tgz")),
            "store-nul" => store_write("a\0b.tgz"),
            "store-planted-symlink" => store_write("planted/pwned.tgz"),
            "store-reserved-name" => store_write(".offsite-tmp.1.2.x"),
            "store-forge-manifest" => store_write(".offsite/manifests/99999999T000000.000Z-1.json"),
            // A path so deep that every later walk of the store runs out of
            // file descriptors.
            "store-deep-path" => store_write(&("d/".repeat(2000) + "x.tgz")),
            // The longest legal file name (255 bytes minus a little): its
            // temporary name must stay legal too. Not hostile; stored.
            "store-long-name" => store_write(&format!("{}.tgz", "n".repeat(240))),
            // A store name and an error that try to drive the terminal of
            // whoever runs verify or status later.
            "store-escape-name" => {
                store_write("x\x1b[2J\x1b]0;owned\x07.tgz")?;
                bail!("failing\x1b[31m on purpose\r")
            }
            "read-dotdot" => {
                archive::tar_gz(&["../outside"], "r.tgz")?;
                Ok(())
            }
            "read-absolute-outside" => {
                archive::tar_gz(&[&arg], "r.tgz")?;
                Ok(())
            }
            "read-through-symlink" => {
                archive::tar_gz(&["root/escape/secret.txt"], "r.tgz")?;
                Ok(())
            }
            "undeclared-param" => {
                params::get("not-declared")?;
                Ok(())
            }
            // Secrets.
            "secret-undeclared" => {
                Secret::open("root-password")?;
                Ok(())
            }
            "secret-echoed-by-failing-command" => {
                let token = Secret::open("token")?;
                ssh::exec_to_file_with_secret(
                    "server1",
                    &["sh", "-c", "cat >&2; exit 3"],
                    "out",
                    &Stream::new(),
                    &token,
                )?;
                Ok(())
            }
            "secret-stored-then-script-fails" => {
                let token = Secret::open("token")?;
                ssh::exec_to_file_with_secret("server1", &["sh", "-c", "cat"], "leak.txt", &Stream::new(), &token)?;
                bail!("failing on purpose after storing {}", token.name())
            }
            // A template of the script's own: an option file that makes the
            // program echo the value, or send it elsewhere.
            "secret-script-chosen-template" => {
                let token = Secret::open("token")?;
                raw_ssh::exec_to_file_with_secret(
                    "server1",
                    &["sh".to_string(), "-c".into(), "cat >&2; exit 3".into()],
                    "t",
                    &Stream::new().raw(),
                    token.raw(),
                    "[mysqldump]\nquick={secret}\nresult-file=/tmp/x\n",
                )
                .map_err(offsite_sdk::HostError::from)?;
                Ok(())
            }
            "secret-to-another-program" => {
                let token = Secret::open("token")?;
                ssh::exec_to_file_with_secret("server1", &["echo", "x"], "t", &Stream::new(), &token)?;
                Ok(())
            }
            // The truncation walk: pad the echoed value so that the cut to
            // the last 16 KiB of stderr falls inside it, once per offset,
            // and collect what comes back.
            "secret-truncation-walk" => {
                let token = Secret::open("token")?;
                let mut seen = Vec::new();
                for pad in (16 << 10) - 16..(16 << 10) {
                    let cmd = format!("cat >&2; head -c {pad} /dev/zero | tr '\\0' . >&2; exit 3");
                    if let Err(e) =
                        ssh::exec_to_file_with_secret("server1", &["sh", "-c", &cmd], "w", &Stream::new(), &token)
                    {
                        let text = e.to_string();
                        let after = text.split_once("stderr: ").map_or(text.as_str(), |(_, a)| a);
                        seen.push(after.chars().take(40).collect::<String>());
                    }
                }
                bail!("collected: {}", seen.join(" | "))
            }
            // Host work that would outlive the run's deadline: a blocking
            // call, and background transfers the script never waits for.
            "host-call-outlives-deadline" => {
                ssh::exec_to_file("server1", &["sh", "-c", "sleep 120"], "slow", &Stream::new())?;
                Ok(())
            }
            "jobs-outlive-deadline" => {
                for i in 0..6 {
                    drop(ssh::start_exec_to_file(
                        "server1",
                        &["sh", "-c", "sleep 120"],
                        &format!("j{i}"),
                        &Stream::new(),
                    )?);
                }
                Ok(())
            }
            // Fetch a name that a local user on the server keeps swapping
            // between a granted file and a symlink to a private one.
            "fetch-race" => {
                let (mut stored, mut refused) = (0, 0);
                for i in 0..25 {
                    match scp::fetch("server1", &format!("{arg}/swap.tgz"), &format!("r{i}.tgz")) {
                        Ok(_) => stored += 1,
                        Err(_) => refused += 1,
                    }
                }
                eprintln!("stored {stored}, refused {refused}");
                Ok(())
            }
            // Failures the script catches and ignores.
            "swallow-failures" => {
                let _ = scp::fetch("server1", &format!("{arg}/missing.tgz"), "m.tgz");
                let _ = ssh::exec_to_file("server1", &["sh", "-c", "exit 7"], "e", &Stream::new());
                let _ = archive::tar_gz(&["root/missing"], "n.tgz");
                Ok(())
            }
            // Floods: a loop of log lines and clock reads, and a few huge
            // messages, each meant to swamp the log, the audit file, the
            // memory or the manifest.
            "log-flood" => {
                for i in 0..200_000u32 {
                    offsite_sdk::log::warn(format!("flood line {i}\r\x1b[2K"));
                    std::hint::black_box(clock::now());
                }
                Ok(())
            }
            "huge-log" => {
                let big = "x".repeat(8 << 20);
                for _ in 0..20 {
                    offsite_sdk::log::warn(&big);
                }
                Ok(())
            }
            "forge-log-line" => {
                offsite_sdk::log::warn("done\noffsite: error: forged\r\x1b[31mred\x1b]0;title\x07");
                eprintln!("printed\roffsite: forged too");
                Ok(())
            }
            "secret-param-read" => {
                let value = params::get("hidden")?;
                bail!("read the secret parameter: {value:?}")
            }
            "secret-name-where-value-expected" => {
                let token = Secret::open("token")?;
                let out = ssh::exec("server1", &["echo", &token.name()])?;
                bail!("the command saw {:?}", out.stdout_text().trim())
            }
            other => bail!("unknown case {other:?}"),
        }
    }
}

fn store_write(dest: &str) -> Result<()> {
    archive::tar_gz(&["root"], dest)?;
    Ok(())
}

offsite_sdk::script!(Hostile);
