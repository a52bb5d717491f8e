//! The `offsite` command line: its definition, and each command's
//! dispatch. Exit codes and failures are in `crate::exit`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use chrono::Local;
use clap::{Parser, Subcommand};

use crate::exit::{EXIT_CODES, Exit, ExitContext, Failure, open_existing, runtime};
use crate::run::{describe, site_path};
use crate::site::Site;
use crate::store::Root;
use crate::store::backend::{Held, LockFailure};
use crate::store::run::{hostname, new_run_id};
use crate::store::{protect, retention};

/// Examples for `offsite --help` and offsite(1).
pub(crate) const TOP_EXAMPLES: &str = "Examples:
  offsite check /etc/offsite/web1.toml --connect
  offsite run --site web1
  systemctl enable --now offsite@web1.timer";

fn top_after_help() -> String {
    let codes: String = EXIT_CODES.iter().map(|(c, text)| format!("  {}  {text}\n", *c as u8)).collect();
    format!(
        "Exit codes:\n{codes}\n{TOP_EXAMPLES}\n\nThe documentation book (installing, site files, stores, schedules, \
         databases, sharing and writing scripts, security, recipes): /usr/share/doc/offsite/html/index.html \
         (docs/ in the source)."
    )
}

/// `offsite --version`: the version, then where it came from.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit: ",
    env!("OFFSITE_COMMIT"),
    "\nwasmtime: ",
    env!("OFFSITE_WASMTIME"),
    "\nwit: ",
    env!("OFFSITE_WIT")
);

#[derive(Parser)]
#[command(
    name = "offsite",
    version,
    long_version = LONG_VERSION,
    about = "Runs sandboxed WebAssembly backup scripts.",
    long_about = "Runs sandboxed WebAssembly backup scripts. A site file (offsite.toml(5)) grants \
                  exactly what a site's script may touch: which directories it reads, which hosts, \
                  commands and remote paths it reaches, and the one store it writes into. \
                  Everything else is denied.",
    after_long_help = top_after_help()
)]
struct Cli {
    /// More output: -v progress, -vv every policy decision.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Print the result as one JSON object on stdout (run, check, inspect,
    /// verify, status, prune, script ls); errors too. See /usr/share/doc/offsite/JSON.md (docs/JSON.md in the source).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a backup script once. Silent on success.
    #[command(
        after_help = "Examples:\n  offsite run --site web1                 # /etc/offsite/web1.toml, its script\n  offsite run arc.wasm --param path=www   # a script on the current directory\n  offsite run --site web1 --dry-run --json"
    )]
    Run(crate::run::Request),
    /// Show a script's metadata, its SHA-256 and the interfaces it imports.
    #[command(
        after_help = "Examples:\n  offsite inspect /usr/lib/offsite/scripts/mysql-pull.wasm\n  offsite inspect oci://registry.example.org/backup/mysql-pull:1.2"
    )]
    Inspect {
        /// The script component (.wasm), or oci://REGISTRY/REPOSITORY:TAG
        /// (pulled into the script store when not there).
        script: String,
    },
    /// Check a site file (and a script against it): print what it allows
    /// and every problem, with the file, line and fix. Exit 2 on problems.
    #[command(
        after_help = "Examples:\n  offsite check /etc/offsite/web1.toml\n  offsite check /etc/offsite/db1.toml --connect   # also log into every host"
    )]
    Check {
        /// The site file.
        site: PathBuf,
        /// The script the site will run (default: the site's `script`): a
        /// file or an oci:// reference.
        script: Option<String>,
        /// Also log into every host and look up each granted program.
        #[arg(long)]
        connect: bool,
    },
    /// Check a store against its manifests: re-hash every file, test gzip
    /// files, list tar archives, and report missing, corrupt or unlisted
    /// files. Exit 1 if anything is wrong.
    #[command(
        after_help = "Examples:\n  offsite verify /etc/offsite/web1.toml\n  offsite verify /srv/backups/db1 --restore-test scratch --mysql-defaults ~/.my.cnf"
    )]
    Verify {
        /// A site file, or a store directory.
        target: PathBuf,
        /// Also load SQL dumps (.sql, .sql.gz) into this scratch database and
        /// compare row counts. MySQL/MariaDB: the database must be missing or
        /// empty. PostgreSQL (told by pg_dump's header): it must be missing;
        /// it is created and dropped, and psql connects the libpq way
        /// (PGHOST, PGUSER, PGSERVICE, ~/.pgpass).
        #[arg(long, value_name = "DATABASE")]
        restore_test: Option<String>,
        /// Option file for the mysql client of --restore-test (credentials
        /// stay out of the command line).
        #[arg(long, value_name = "FILE", requires = "restore_test")]
        mysql_defaults: Option<PathBuf>,
        /// Check manifest signatures with this public key (default: the
        /// site's [protect] verify_key). Unsigned manifests are problems.
        #[arg(long, value_name = "FILE.pub")]
        key: Option<PathBuf>,
        /// Decrypt .age files with this identity file, to check their
        /// contents too (gzip, tar, restore test, plaintext hash).
        #[arg(long, value_name = "FILE")]
        age_identity: Option<PathBuf>,
        /// Read only part of the stored files whole, for a big store: n/t
        /// (part n of t, by each file's path; t runs with n = 1..t read
        /// everything) or a percentage chosen at random (10%). The newest
        /// run's files are always read; of the others, verify checks that
        /// they are there with their size.
        #[arg(long, value_name = "n/t|P%")]
        read_data_subset: Option<crate::verify::Subset>,
    },
    /// List the runs in a store, newest first: id, start time, status,
    /// files, bytes, and whether its manifest is signed and its files
    /// encrypted. Works on a bare store directory (no site file needed).
    #[command(
        after_help = "Examples:\n  offsite runs web1                  # the store of /etc/offsite/web1.toml\n  offsite runs /srv/backups/web1 --json"
    )]
    Runs {
        /// A site file (or a site name), a store directory, or an
        /// s3://BUCKET/PREFIX store.
        target: PathBuf,
        /// Check each signed manifest with this public key (default: the
        /// site's [protect] verify_key): the signed column says ok or BAD.
        #[arg(long, value_name = "FILE.pub")]
        key: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write one stored file to stdout, checked against its run's
    /// manifest as it streams (size first, SHA-256 at the end) and
    /// decrypted with --age-identity. RUN is `latest` (the default: the
    /// newest run that published files), `latest-good`, a date
    /// (YYYY-MM-DD: that day's newest good run) or a run id. On a hash
    /// mismatch it exits 1 after writing: discard what it wrote.
    #[command(
        after_help = "Examples:\n  offsite cat db1 server1/sitedb-20261203-013400.sql.gz | gunzip | mysql sitedb\n  offsite cat /srv/backups/web1 2026-12-03 www.20261203-033400.tgz | tar -tzf -"
    )]
    Cat {
        /// A site file (or a site name), a store directory, or an
        /// s3://BUCKET/PREFIX store.
        target: PathBuf,
        /// RUN then FILE, or just FILE (the file's path in the store, as
        /// `offsite runs --json` and the manifests list it).
        #[arg(required = true, num_args = 1..=2, value_names = ["RUN", "FILE"])]
        what: Vec<String>,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// List a run's files (default: the latest run that published files),
    /// or with a tar archive (.tar, .tgz, .tar.gz; encrypted with
    /// --age-identity) its entries, read as a stream and checked against
    /// the manifest as `cat` checks.
    #[command(
        after_help = "Examples:\n  offsite ls web1                                  # the latest run's files\n  offsite ls web1 latest www.20261203-033400.tgz   # the archive's entries"
    )]
    Ls {
        /// A site file (or a site name), a store directory, or an
        /// s3://BUCKET/PREFIX store.
        target: PathBuf,
        /// [RUN] [FILE]: RUN as for `cat`; one argument is a run when it
        /// names one, else a file of the latest run.
        #[arg(num_args = 0..=2, value_names = ["RUN", "FILE"])]
        what: Vec<String>,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Get files back: the FILE (or every file the run published) written
    /// beneath DIR under its path in the store, each checked against the
    /// manifest (size, SHA-256, and the plaintext's with --age-identity,
    /// which also decrypts) before it appears there by rename. Files
    /// already in DIR are left alone unless --overwrite.
    #[command(
        after_help = "Examples:\n  offsite restore web1 --to /var/restore                    # the latest run, every file\n  offsite restore db1 2026-12-03 server1/sitedb-20261203-013400.sql.gz --to /tmp/r\n  offsite restore web1 www.20261203-033400.tgz var/www/index.html --extract --to /tmp/r\n  offsite restore db1 latest-good 'server1/sitedb-*.sql.gz' --into-database sitedb_restored"
    )]
    Restore {
        /// A site file (or a site name), a store directory, or an
        /// s3://BUCKET/PREFIX store.
        target: PathBuf,
        /// [RUN] [FILE [PATHS...]]: RUN as for `cat`; one argument is a run
        /// when it names one, else a file of the latest run; PATHS (with
        /// --extract) the archive's entries to unpack.
        #[arg(value_names = ["RUN", "FILE"])]
        what: Vec<String>,
        /// Unpack the archive FILE (or only PATHS of it) into DIR, once the
        /// whole stored file matched its manifest. No entry can land outside
        /// DIR; devices are left out and setuid bits dropped (unless
        /// --preserve-special).
        #[arg(long)]
        extract: bool,
        /// The directory to restore into (created if missing).
        #[arg(long, value_name = "DIR", required_unless_present = "into_database")]
        to: Option<PathBuf>,
        /// Replace files that are already there.
        #[arg(long)]
        overwrite: bool,
        /// With --extract, as root: give each entry the archive's numeric
        /// owner and group (as `tar --same-owner`).
        #[arg(long, requires = "extract")]
        same_owner: bool,
        /// With --extract, as root: keep setuid, setgid and sticky bits and
        /// make device nodes and FIFOs.
        #[arg(long, requires = "extract")]
        preserve_special: bool,
        /// Load the dump FILE into this database (created if missing) with
        /// the client modes that keep a dump from running commands here,
        /// and check its row counts. Only for dumps whose manifest says
        /// mysqldump/mariadb-dump or pg_dump made them. PostgreSQL settings
        /// come from PGHOST, PGUSER, ~/.pgpass; MySQL's from option files.
        #[arg(long, value_name = "NAME", conflicts_with_all = ["to", "extract", "overwrite"])]
        into_database: Option<String>,
        /// With --into-database: load into a database that already holds
        /// tables.
        #[arg(long, requires = "into_database")]
        force: bool,
        /// With --into-database: the mysql client's option file
        /// (credentials, socket).
        #[arg(long, value_name = "FILE", requires = "into_database")]
        mysql_defaults: Option<PathBuf>,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// For each site: its last run, last good run, whether it is running,
    /// and its next scheduled run. Exit 1 if any site's last run failed,
    /// it never ran, a run was killed, or its store cannot be read.
    #[command(
        after_help = "Examples:\n  offsite status                  # every site in /etc/offsite\n  offsite status /etc/offsite/web1.toml"
    )]
    Status {
        /// Site files, or directories of them (default: /etc/offsite).
        sites: Vec<PathBuf>,
    },
    /// Run sites on their schedules, in one long-running process, picking
    /// up rebuilt scripts and edited site files as they change (each site
    /// file names its `script`). SIGTERM/SIGINT: stop, letting runs finish
    /// within --grace; SIGHUP: re-read everything.
    #[command(
        after_help = "Examples:\n  offsite watch /etc/offsite\n  offsite watch --run-on-change dev-site.toml   # edit, build, see it run"
    )]
    Watch {
        /// Site files, or directories of them.
        #[arg(required = true)]
        sites: Vec<PathBuf>,
        /// Run a site again each time its script or site file changes
        /// (the script author's edit, build, run loop).
        #[arg(long)]
        run_on_change: bool,
        /// At most this many runs at once.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// Wait this long after a file changes before reading it.
        #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
        debounce: std::time::Duration,
        /// On SIGTERM/SIGINT, how long runs may go on before they are
        /// stopped (cleanly, status failed).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
    },
    /// Apply the site's [retention] rules now and show what goes and why.
    #[command(
        after_help = "Examples:\n  offsite prune /etc/offsite/web1.toml --dry-run\n  offsite prune /etc/offsite/web1.toml"
    )]
    Prune {
        /// The site file.
        site: PathBuf,
        /// Only show what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Record that a run lost files (deleted by hand, a failed disk), so
    /// that `verify` stops reporting them missing. The run's manifest is
    /// kept aside in .offsite/forgotten/, not erased.
    #[command(after_help = "Examples:\n  offsite forget /etc/offsite/web1.toml 20261130T033400.123Z-4242")]
    Forget {
        /// The site file.
        site: PathBuf,
        /// The run id, as `offsite verify` and `status` show it.
        run: String,
    },
    /// Key helpers for the servers a site reaches.
    #[command(subcommand, after_help = "Examples:\n  offsite keys authorized-line /etc/offsite/db1.toml db1")]
    Keys(KeysCommand),
    /// Build the script project in DIR (Rust: Cargo.toml, Python: app.py,
    /// JavaScript: package.json and app.js) and leave DIR/NAME.wasm.
    #[command(
        after_help = "Examples:\n  offsite build              # the project in the current directory\n  offsite build ~/src/site-files"
    )]
    Build {
        /// The project directory (default: the current one).
        dir: Option<PathBuf>,
    },
    /// Start a script project: describe and run with one parameter, a
    /// README with the build command, and a test (test.sh).
    #[command(
        after_help = "Examples:\n  offsite new site-files --lang python\n  offsite new db-pull --lang rust ~/src/db-pull"
    )]
    New {
        /// The script's name (lowercase letters, digits, '-').
        name: String,
        /// rust, python or js.
        #[arg(long, value_parser = ["rust", "python", "js"])]
        lang: String,
        /// Where (default: ./NAME); must be missing or empty.
        dir: Option<PathBuf>,
    },
    /// Share scripts: push, pull, list, sign, verify.
    #[command(
        subcommand,
        after_help = "Examples:\n  offsite script push mysql-pull.wasm oci://registry.example.org/backup/mysql-pull:1.2 --sign ~/.ssh/id_ed25519\n  offsite script update /etc/offsite/db1.toml"
    )]
    Script(crate::share::commands::ScriptCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  offsite completions bash > /etc/bash_completion.d/offsite\n  offsite completions fish > ~/.config/fish/completions/offsite.fish"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// The systemd unit generator (installed as offsite-systemd-generator).
    #[command(hide = true)]
    SystemdGenerator {
        /// systemd's normal, early and late output directories.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Write the man pages and completion scripts into DIR (packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Where: DIR/man1, DIR/man5, DIR/completions.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print the authorized_keys line to install on HOST for the backup key:
    /// restrict, from= and, for fixed grants, a forced command.
    #[command(
        after_help = "Examples:\n  offsite keys authorized-line /etc/offsite/db1.toml db1 >> authorized_keys.db1"
    )]
    AuthorizedLine {
        /// The site file.
        site: PathBuf,
        /// The host's name in the site file.
        host: String,
        /// The public key (default: the host's identity file + .pub).
        #[arg(long, value_name = "FILE.pub")]
        key: Option<PathBuf>,
    },
}

/// What `ls`, `cat` and `restore` read with.
#[derive(clap::Args, Debug)]
struct ReadArgs {
    /// Decrypt encrypted (.age) files with this identity file (without it,
    /// `cat` and `restore` write the encrypted bytes, checked the same).
    #[arg(long, value_name = "FILE")]
    age_identity: Option<PathBuf>,
    /// Check the run's manifest signature with this public key (default:
    /// the site's [protect] verify_key) before trusting it.
    #[arg(long, value_name = "FILE.pub")]
    key: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
}

/// Which store `runs`, `ls`, `cat` and `restore` read, beyond the target.
#[derive(clap::Args, Debug)]
struct StoreArgs {
    /// Read the site's Nth [[copy]] store (1 for the first) instead.
    #[arg(long, value_name = "N")]
    from_copy: Option<usize>,
    /// For an s3:// target without a site file: the S3 endpoint
    /// (https://HOST[:PORT]; default: $AWS_ENDPOINT_URL_S3, then
    /// $AWS_ENDPOINT_URL, then AWS itself). Credentials come from the
    /// environment or ~/.aws as for a run.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// For an s3:// target: https://ENDPOINT/BUCKET/KEY addressing, as
    /// self-hosted servers want it (the default for any endpoint but
    /// AWS's).
    #[arg(long)]
    s3_path_style: bool,
    /// For an s3:// target: the region (default: $AWS_REGION, the
    /// profile's, or us-east-1).
    #[arg(long, value_name = "REGION")]
    s3_region: Option<String>,
    /// For an s3:// target: the profile in ~/.aws (default: $AWS_PROFILE).
    #[arg(long, value_name = "NAME")]
    s3_profile: Option<String>,
}

impl StoreArgs {
    fn choice(&self) -> crate::restore::StoreChoice {
        let endpoint = self.s3_endpoint.clone().or_else(|| {
            ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|e| !e.is_empty()))
        });
        crate::restore::StoreChoice {
            from_copy: self.from_copy,
            s3: crate::s3::S3Settings {
                endpoint: endpoint.clone(),
                region: self.s3_region.clone(),
                path_style: self.s3_path_style || endpoint.as_deref().is_some_and(|e| !e.contains(".amazonaws.com")),
                profile: self.s3_profile.clone(),
            },
        }
    }
}

impl ReadArgs {
    fn options(&self) -> crate::restore::ReadOptions<'_> {
        crate::restore::ReadOptions {
            identity: self.age_identity.as_deref(),
            key: self.key.as_deref(),
            store: self.store.choice(),
        }
    }
}

/// The `"command"` of a command's JSON report; `None` for commands that
/// have none.
fn json_name(command: &Command) -> Option<&'static str> {
    Some(match command {
        Command::Run(_) => "run",
        Command::Check { .. } => "check",
        Command::Inspect { .. } => "inspect",
        Command::Verify { .. } => "verify",
        Command::Status { .. } => "status",
        Command::Runs { .. } => "runs",
        Command::Prune { .. } => "prune",
        Command::Script(crate::share::commands::ScriptCommand::Ls) => "script ls",
        _ => return None,
    })
}

/// The whole command line, for man pages and completions.
pub(crate) fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { Exit::Usage as u8 } else { 0 });
        }
    };
    // A watcher is a service: its own progress (reloads, runs) shows by
    // default; the runs it starts stay as quiet as under cron.
    let watching = matches!(cli.command, Command::Watch { .. });
    crate::logging::init(cli.verbose + u8::from(watching), watching);
    if cli.json {
        let Some(name) = json_name(&cli.command) else {
            let error = "--json: this command has no JSON output (run, check, inspect, verify, status, runs, prune \
                         and script ls have)";
            crate::json::enable("?");
            crate::json::error_if_unreported(Exit::Usage as u8, error);
            crate::logging::emit(log::Level::Error, &format!("offsite: error: {error}\n"));
            return ExitCode::from(Exit::Usage as u8);
        };
        crate::json::enable(name);
    }
    let result = match cli.command {
        Command::Run(mut args) => {
            args.json = cli.json;
            crate::run::run(args)
        }
        Command::Inspect { script } => inspect(&script),
        Command::Check { site, script, connect } => check(&site, script.as_deref(), connect),
        Command::Verify { target, restore_test, mysql_defaults, key, age_identity, read_data_subset } => {
            let keys = VerifyKeys { key, age_identity };
            verify(&target, restore_test.as_deref(), mysql_defaults, keys, read_data_subset, cli.verbose > 0)
        }
        Command::Prune { site, dry_run } => prune(&site, dry_run, cli.verbose > 0),
        Command::Forget { site, run } => forget(&site, &run),
        Command::Status { sites } => status(&sites),
        Command::Runs { target, key, store } => {
            crate::restore::runs(&target, key.as_deref(), &store.choice(), cli.json)
        }
        Command::Restore {
            target,
            what,
            extract,
            to,
            overwrite,
            same_owner,
            preserve_special,
            into_database,
            force,
            mysql_defaults,
            read,
        } => {
            let into = match into_database {
                Some(name) => crate::verify::mysql::Database::new(&name, mysql_defaults)
                    .map(|db| crate::restore::Into::Database { db, force })
                    .map_err(|e| anyhow!("--into-database: {e}"))
                    .exit(Exit::Usage),
                None => Ok(crate::restore::Into::Dir {
                    to: to.expect("clap requires --to"),
                    overwrite,
                    extract,
                    special: crate::restore::extract::Special { same_owner, preserve_special },
                }),
            };
            into.and_then(|into| crate::restore::restore(&target, &what, &into, &read.options()))
        }
        Command::Ls { target, what, read } => crate::restore::ls(&target, &what, &read.options()),
        Command::Cat { target, what, read } => {
            let (run, file) = match what.as_slice() {
                [file] => (None, file),
                [run, file] => (Some(run.as_str()), file),
                _ => unreachable!("clap takes one or two"),
            };
            crate::restore::cat(&target, run, file, &read.options())
        }
        Command::Watch { sites, run_on_change, jobs, debounce, grace } => {
            let options = crate::watch::Options { jobs, debounce, grace, run_on_change, verbose: cli.verbose };
            crate::watch::watch(&sites, options).exit(Exit::Usage)
        }
        Command::Keys(KeysCommand::AuthorizedLine { site, host, key }) => authorized_line(&site, &host, key.as_deref()),
        Command::Script(cmd) => crate::share::commands::main(cmd),
        Command::New { name, lang, dir } => {
            let lang = match lang.as_str() {
                "python" => crate::build::Lang::Python,
                "js" => crate::build::Lang::Js,
                _ => crate::build::Lang::Rust,
            };
            crate::new::new(&name, lang, dir.as_deref())
                .map(|d| crate::outln!("{}: build with `offsite build`, test with ./test.sh", d.display()))
                .exit(Exit::Usage)
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            crate::docs::completions(shell, &mut script);
            crate::out!("{}", String::from_utf8_lossy(&script));
            Ok(())
        }
        Command::SystemdGenerator { dirs } => {
            crate::systemd::generator(&dirs[0]);
            Ok(())
        }
        Command::GenerateDocs { dir } => crate::docs::generate(&dir).exit(Exit::Usage),
        Command::Build { dir } => crate::build::build(dir.as_deref().unwrap_or(Path::new(".")))
            .map(|out| crate::outln!("{}", out.display()))
            .exit(Exit::Usage),
    };
    match result {
        Ok(()) if crate::stdout::failed() => ExitCode::from(Exit::Usage as u8),
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // The error may quote a script or a server: escaped, bounded,
            // and every line carries the prefix.
            let text = crate::text::truncate(&format!("{:#}", f.error), 4 * crate::logging::MAX_MESSAGE).into_owned();
            let mut lines = String::new();
            for (i, line) in crate::text::escape_lines(&text).iter().enumerate() {
                let lead = if i == 0 { "offsite: error: " } else { "offsite: error:   " };
                lines.push_str(&format!("{}{lead}{line}\n", crate::logging::prefix()));
            }
            crate::logging::emit(log::Level::Error, &lines);
            crate::json::error_if_unreported(f.exit as u8, &text);
            ExitCode::from(f.exit as u8)
        }
    }
}

fn check(site_file: &Path, script: Option<&str>, connect: bool) -> Result<(), Failure> {
    let site_file = &site_path(site_file);
    let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
    let text = std::fs::read_to_string(site_file)
        .with_context(|| format!("cannot read site file {}", site_file.display()))
        .exit(Exit::Usage)?;
    let site = Site::parse(&text, site_file, &cwd).exit(Exit::Usage)?;
    // Without a script argument, the script the site names (if it exists:
    // a missing one is reported as a problem below).
    // A script that cannot be had (missing file, registry down and not
    // stored, unsigned) is reported as a problem below.
    let fetched = match (script, &site.script) {
        (Some(arg), _) => Some(crate::share::commands::fetch_arg(arg)?),
        (None, Some(source)) => crate::share::resolve::fetch(source, &site).ok(),
        (None, None) => None,
    };
    let loaded = match &fetched {
        Some(f) => {
            let mut runtime = runtime()?;
            // check is where a damaged compiled copy is caught (and redone).
            runtime.verify_cache_contents(true);
            let script = runtime.load_bytes(&f.path, &f.bytes).exit(Exit::Usage)?;
            let info = describe(&runtime, &script)?;
            Some((runtime, script, info))
        }
        None => None,
    };
    let report = crate::check::check(
        &site,
        site_file,
        &text,
        loaded.as_ref().map(|(r, s, i)| (r, s, i)),
        fetched.as_ref(),
        connect,
    );
    if crate::json::on() {
        let script = loaded.as_ref().map(|(_, s, i)| {
            serde_json::json!({
                "name": i.name, "version": i.version, "sha256": s.sha256,
                "source": fetched.as_ref().map(|f| f.source.clone()),
            })
        });
        crate::json::report(serde_json::json!({
            "status": if report.problems.is_empty() { "ok" } else { "problems" },
            "site": site.name,
            "site_file": site_file.display().to_string(),
            "script": script,
            "problems": report.problems,
            "report": report.text.lines().collect::<Vec<_>>(),
        }));
    } else {
        crate::out!("{}", report.text);
    }
    if report.problems.is_empty() {
        if !crate::json::on() {
            crate::outln!("no problems found");
        }
        return Ok(());
    }
    // A problem may quote a server (a forced command's answer, ssh's
    // errors): each of its lines escaped.
    for p in &report.problems {
        for (i, line) in crate::text::escape_lines(&p.to_string()).iter().enumerate() {
            eprintln!("{}{line}", if i == 0 { "offsite: problem: " } else { "" });
        }
    }
    Err(anyhow!("{}: {} problem(s) found", site_file.display(), report.problems.len())).exit(Exit::Usage)
}

/// The summary's note of files a `--read-data-subset` did not read.
fn not_read(report: &crate::verify::Report) -> String {
    if report.not_read == 0 {
        return String::new();
    }
    format!(" ({} of them only for presence and size: --read-data-subset)", report.not_read)
}

/// `verify`'s keys: for signatures, and for decrypting.
struct VerifyKeys {
    key: Option<PathBuf>,
    age_identity: Option<PathBuf>,
}

fn verify(
    target: &Path,
    restore_test: Option<&str>,
    mysql_defaults: Option<PathBuf>,
    keys: VerifyKeys,
    subset: Option<crate::verify::Subset>,
    verbose: bool,
) -> Result<(), Failure> {
    let (store, copies, site_key, timeout) = if target.is_dir() {
        let dir = crate::site::StoreAt::Dir(target.to_path_buf());
        (dir, Vec::new(), None, crate::site::Limits::default().call_timeout)
    } else {
        let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
        let site = Site::load(target, &cwd).exit(Exit::Usage)?;
        let copies = site.copies.into_iter().map(|c| c.store).collect();
        (site.store, copies, site.protect.verify_key, site.limits.call_timeout)
    };
    let identities = match &keys.age_identity {
        Some(file) => age::IdentityFile::from_file(file.display().to_string())
            .map_err(|e| e.to_string())
            .and_then(|f| f.into_identities().map_err(|e| e.to_string()))
            .map_err(|e| anyhow!("--age-identity {}: {e}", file.display()))
            .exit(Exit::Usage)?,
        None => Vec::new(),
    };
    let options = crate::verify::Options {
        restore_test: restore_test
            .map(|db| crate::verify::mysql::Database::new(db, mysql_defaults))
            .transpose()
            .map_err(|e| anyhow!("--restore-test: {e}"))
            .exit(Exit::Usage)?,
        verify_key: keys.key.or(site_key).as_deref().map(protect::verify_key).transpose().exit(Exit::Usage)?,
        identities,
        subset,
    };
    let root = open_existing(&store, timeout)?;
    let mut report = crate::verify::verify(&root, &options)
        .with_context(|| format!("cannot read the store {}", store.display()))
        .exit(Exit::BackupFailed)?;
    let mut summary = format!(
        "{}: {} file(s) in {} run(s) checked{}, {} problem(s)",
        store.display(),
        report.files,
        report.runs,
        not_read(&report),
        report.problems.len()
    );
    // Each `[[copy]]` store is checked the same way; its lines say which.
    let mut copy_reports = Vec::new();
    for (i, copy) in copies.iter().enumerate() {
        let name = format!("copy {} ({})", i + 1, copy.display());
        let checked = match Root::open_existing(copy, timeout) {
            Ok(root) => crate::verify::verify(&root, &options).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let r = checked.unwrap_or_else(|e| crate::verify::Report {
            problems: vec![format!("cannot be read: {e}")],
            ..Default::default()
        });
        summary.push_str(&format!(
            "\n{name}: {} file(s) in {} run(s) checked{}, {} problem(s)",
            r.files,
            r.runs,
            not_read(&r),
            r.problems.len()
        ));
        // A copy that has a run the first store has no record of: the
        // first store lost runs (an emptied bucket reads as a new store).
        if let Some(newest) = &r.newest
            && report.newest.as_ref().is_none_or(|n| n < newest)
        {
            report.problems.push(format!(
                "{}: has no record of run {newest}, which {name} holds: runs were lost from it (restore them from \
                 the copy)",
                store.display()
            ));
        }
        report.problems.extend(r.problems.iter().map(|p| format!("{name}: {p}")));
        report.checked.extend(r.checked.iter().map(|c| format!("{name}: {c}")));
        copy_reports.push(serde_json::json!({
            "store": copy.display(), "runs": r.runs, "files": r.files, "problems": r.problems.len(),
        }));
        if options.subset.is_some() {
            copy_reports.last_mut().expect("pushed")["not_read"] = r.not_read.into();
        }
    }
    if crate::json::on() {
        let mut json = serde_json::json!({
            "status": if report.problems.is_empty() { "ok" } else { "problems" },
            "store": store.display().to_string(),
            "runs": report.runs,
            "files": report.files,
            "problems": report.problems,
            "checked": report.checked,
            "copies": copy_reports,
        });
        if options.subset.is_some() {
            json["not_read"] = report.not_read.into();
        }
        crate::json::report(json);
        if report.problems.is_empty() {
            return Ok(());
        }
        return Err(anyhow!("verify failed: {summary}")).exit(Exit::BackupFailed);
    }
    // Store paths and manifest fields are script-controlled text: escaped.
    if verbose {
        report.checked.iter().for_each(|l| crate::outln!("{}", crate::text::escape(l)));
    }
    if verbose || std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        crate::outln!("{summary}");
    }
    if report.problems.is_empty() {
        return Ok(());
    }
    for p in &report.problems {
        eprintln!("offsite: problem: {}", crate::text::escape(p));
    }
    Err(anyhow!("verify failed: {summary}")).exit(Exit::BackupFailed)
}

fn status(args: &[PathBuf]) -> Result<(), Failure> {
    let args = if args.is_empty() { vec![PathBuf::from("/etc/offsite")] } else { args.to_vec() };
    let files = crate::status::site_files(&args).exit(Exit::Usage)?;
    if files.is_empty() {
        return Err(anyhow!(
            "no site files in {}",
            args.iter().map(|a| a.display().to_string()).collect::<Vec<_>>().join(", ")
        ))
        .exit(Exit::Usage);
    }
    let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
    let now = chrono::Utc::now();
    let (mut failing, mut sites, mut unreadable) = (Vec::new(), Vec::new(), Vec::new());
    for file in &files {
        match Site::load(file, &cwd) {
            Ok(site) => {
                let s = crate::status::status(&site, file, now);
                if crate::json::on() {
                    sites.push(s.json);
                } else {
                    crate::out!("{}", s.text);
                }
                if s.failing {
                    failing.push(site.name);
                }
            }
            Err(e) => {
                eprintln!("offsite: error: {e:#}");
                unreadable
                    .push(serde_json::json!({ "site_file": file.display().to_string(), "error": format!("{e:#}") }));
            }
        }
    }
    if crate::json::on() {
        let status = if !unreadable.is_empty() {
            "unreadable"
        } else if failing.is_empty() {
            "ok"
        } else {
            "failing"
        };
        crate::json::report(serde_json::json!({
            "status": status, "sites": sites, "failing": failing, "unreadable": unreadable,
        }));
    }
    if !unreadable.is_empty() {
        return Err(anyhow!("{} site file(s) could not be read", unreadable.len())).exit(Exit::Usage);
    }
    if !failing.is_empty() {
        return Err(anyhow!(
            "the last run failed, never happened, was cut short, or its store cannot be read for: {}",
            failing.join(", ")
        ))
        .exit(Exit::BackupFailed);
    }
    Ok(())
}

/// Takes the store's lock for `what` (prune, forget), as a run would:
/// exit 4 naming the holder when a run has it.
fn lock_for(root: &Root, site: &Site, what: &str) -> Result<Box<dyn Held>, Failure> {
    let started = Local::now();
    let header = crate::store::run::RunHeader {
        run_id: format!("{what}-{}", new_run_id(started)),
        site: site.name.clone(),
        hostname: hostname(),
        pid: std::process::id(),
        script: Default::default(),
        grants_sha256: String::new(),
        started: started.to_rfc3339(),
    };
    match root.lock(&header) {
        Ok(locked) => Ok(locked.lock),
        Err(LockFailure::Busy(e)) => Err(anyhow!("site {}: {e}", site.name)).exit(Exit::Locked),
        Err(e) => Err(anyhow!("{e}")).exit(Exit::BackupFailed),
    }
}

/// `forget SITE RUN`: under the store's lock, like a run.
fn forget(site_file: &Path, run_id: &str) -> Result<(), Failure> {
    let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
    let site = Site::load(&site_path(site_file), &cwd).exit(Exit::Usage)?;
    let root = open_existing(&site.store, site.limits.call_timeout)?;
    root.can_forget().map_err(|e| anyhow!("site {}: {e}", site.name)).exit(Exit::Usage)?;
    let _lock = lock_for(&root, &site, "forget")?;
    let forgotten = root.forget(run_id).map_err(|e| anyhow!("site {}: {e}", site.name)).exit(Exit::Usage)?;
    for line in forgotten {
        crate::outln!("{line}");
    }
    Ok(())
}

/// `prune`: from cron it says nothing unless it removed something; with
/// `--dry-run` or `-v` it also lists what it keeps and why.
fn prune(site_file: &Path, dry_run: bool, verbose: bool) -> Result<(), Failure> {
    let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
    let site = Site::load(site_file, &cwd).exit(Exit::Usage)?;
    let json = crate::json::on();
    let show_keeps = (dry_run || verbose) && !json;
    let report = |rules: Option<String>, runs: Vec<serde_json::Value>, done: Vec<String>| {
        crate::json::report(serde_json::json!({
            "site": site.name, "dry_run": dry_run, "rules": rules, "runs": runs, "done": done,
        }));
    };
    if site.retention.is_empty() {
        if show_keeps {
            crate::outln!("{}: no [retention] rules, so every run is kept", site_file.display());
        }
        if json {
            report(None, Vec::new(), Vec::new());
        }
        return Ok(());
    }
    let root = open_existing(&site.store, site.limits.call_timeout)?;
    // Pruning for real takes the lock, like a run; a dry run changes nothing.
    let _lock = if dry_run { None } else { Some(lock_for(&root, &site, "prune")?) };
    let failed = |e: std::io::Error| anyhow!("pruning {}: {e}", site.store.display());
    let mut done = Vec::new();
    if !dry_run {
        for line in root.resume_prune().map_err(failed).exit(Exit::BackupFailed)? {
            if !json {
                crate::outln!("{line}");
            }
            done.push(line);
        }
    }
    let (manifests, _) = root.manifests().map_err(failed).exit(Exit::BackupFailed)?;
    let plan = retention::plan(&manifests, &root.runs_of(&site.name), &site.retention);
    if show_keeps || (!json && plan.iter().any(|v| v.pruned_because.is_some())) {
        crate::outln!("rules: {}", site.retention);
    }
    let mut runs = Vec::new();
    for v in &plan {
        runs.push(serde_json::json!({
            "run_id": v.run_id,
            "status": v.status.to_string(),
            "started": v.started,
            "action": if v.pruned_because.is_some() { "prune" } else { "keep" },
            "reasons": match &v.pruned_because { Some(why) => vec![why.clone()], None => v.kept_because.clone() },
            "files": v.files.iter().map(|(p, b)| serde_json::json!({ "path": p.display().to_string(), "bytes": b })).collect::<Vec<_>>(),
            "shared": v.shared.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        }));
        if json {
            continue;
        }
        match &v.pruned_because {
            None if show_keeps => {
                crate::outln!("keep  {} {:10} {}: {}", v.run_id, v.status, v.started, v.kept_because.join("; "))
            }
            None => {}
            Some(why) => {
                crate::outln!(
                    "{} {} {:10} {}: {why}",
                    if dry_run { "would prune" } else { "prune" },
                    v.run_id,
                    v.status,
                    v.started
                );
                for (path, bytes) in &v.files {
                    crate::outln!(
                        "    {} {} ({bytes} bytes)",
                        if dry_run { "would remove" } else { "remove" },
                        path.display()
                    );
                }
                for path in &v.shared {
                    crate::outln!("    keep {} (a kept run lists it too)", path.display());
                }
            }
        }
    }
    if !dry_run {
        for line in root.prune(&plan).map_err(failed).exit(Exit::BackupFailed)? {
            log::info!(target: "offsite::retention", "{line}");
            done.push(line);
        }
    }
    if json {
        report(Some(site.retention.to_string()), runs, done);
    }
    Ok(())
}

fn authorized_line(site_file: &Path, host: &str, key: Option<&Path>) -> Result<(), Failure> {
    let cwd = std::env::current_dir().context("cannot read the current directory").exit(Exit::Usage)?;
    let site = Site::load(site_file, &cwd).exit(Exit::Usage)?;
    let line = crate::keys::authorized_line(&site, host, key).exit(Exit::Usage)?;
    for note in &line.notes {
        crate::outln!("# {note}");
    }
    crate::outln!("{}", line.line);
    Ok(())
}

fn inspect(arg: &str) -> Result<(), Failure> {
    let fetched = crate::share::commands::fetch_arg(arg)?;
    let runtime = runtime()?;
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&fetched.bytes));
    let had = runtime.is_compiled(&sha).is_some();
    let started = std::time::Instant::now();
    let script = runtime.load_bytes(&fetched.path, &fetched.bytes).exit(Exit::Usage)?;
    let compiled = match (had, runtime.is_compiled(&sha)) {
        (true, _) => "a compiled copy is in the cache".to_string(),
        (false, Some(_)) => format!("compiled now in {:.0?} and cached (runs start from it)", started.elapsed()),
        (false, None) => {
            format!("compiled in {:.0?}; no usable compile cache, so every run compiles", started.elapsed())
        }
    };
    let raw = describe(&runtime, &script)?;
    if crate::json::on() {
        let ty = script.component.component_type();
        let imports: Vec<String> = ty.imports(runtime.engine()).map(|(n, _)| n.to_string()).collect();
        let (notes, undeclared) = crate::check::import_notes(&imports, &raw.capabilities);
        let params: Vec<serde_json::Value> = raw
            .params
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name, "description": p.description, "required": p.required,
                    "secret": p.secret, "default": p.default,
                })
            })
            .collect();
        crate::json::report(serde_json::json!({
            "name": raw.name,
            "version": raw.version,
            "description": raw.description,
            "source": fetched.source,
            "sha256": script.sha256,
            "compiled": match (had, runtime.is_compiled(&sha)) {
                (true, _) => "cached",
                (false, Some(_)) => "compiled-now",
                (false, None) => "not-cached",
            },
            "capabilities": raw.capabilities,
            "params": params,
            "imports": imports,
            "notes": notes,
            "undeclared": undeclared,
        }));
        return Ok(());
    }
    let info = crate::check::shown_info(&raw);
    crate::outln!("script:      {} {}", info.name, info.version);
    crate::outln!("from:        {}", crate::text::escape(&fetched.source));
    crate::outln!("compiled:    {compiled}");
    crate::outln!("sha256:      {}", script.sha256);
    if !info.description.is_empty() {
        crate::outln!("description: {}", info.description);
    }
    crate::outln!(
        "capabilities declared: {}",
        if info.capabilities.is_empty() { "none".into() } else { info.capabilities.join(", ") }
    );
    crate::outln!("parameters:");
    if info.params.is_empty() {
        crate::outln!("  (none)");
    }
    for p in &info.params {
        let mut flags = vec![if p.required { "required" } else { "optional" }];
        if p.secret {
            flags.push("secret");
        }
        let default = p.default.as_ref().map(|d| format!(", default {d:?}")).unwrap_or_default();
        crate::outln!("  {} ({}{default}): {}", p.name, flags.join(", "), p.description);
    }
    crate::outln!("imports:");
    let ty = script.component.component_type();
    let imports: Vec<String> = ty.imports(runtime.engine()).map(|(n, _)| n.to_string()).collect();
    for name in &imports {
        crate::outln!("  {name}");
    }
    let (notes, undeclared) = crate::check::import_notes(&imports, &info.capabilities);
    for note in notes {
        crate::outln!("note: {note}");
    }
    if !undeclared.is_empty() {
        crate::outln!(
            "note: uses {} without declaring it: what it says about itself is incomplete",
            undeclared.join(", ")
        );
    }
    Ok(())
}
