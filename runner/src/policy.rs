//! The one place where grants are decided.
//!
//! Every host function starts by describing what it is about to do as a
//! [`Call`] and asking [`Policy::check`]. The match in `check` is exhaustive,
//! so a new capability cannot ship without a decision here. A refusal is a
//! [`Denial`], which the capability turns into the WIT `error` the script
//! sees; it is never a trap and never a silent no-op.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::site::Site;

/// Something a script asked the host to do.
#[derive(Debug)]
pub enum Call<'a> {
    ClockNow,
    ClockFormat,
    Log,
    ParamGet {
        name: &'a str,
    },
    /// Read `source` (as the script wrote it) for an archive.
    ArchiveRead {
        source: &'a str,
    },
    /// Look at `path` (list, stat or measure) through the read-only view.
    FilesView {
        op: &'static str,
        path: &'a str,
    },
    /// Write `dest` (as the script wrote it) into the store.
    StoreWrite {
        dest: &'a str,
    },
    /// Run `argv` on the host the script calls `host`.
    SshExec {
        host: &'a str,
        argv: &'a [String],
    },
    /// Copy the remote file `path` from `host`.
    ScpFetch {
        host: &'a str,
        path: &'a str,
    },
    /// Open the secret the site calls `name`.
    SecretOpen {
        name: &'a str,
    },
    /// Send the secret `name` (as the site's delivery says) to `program`.
    SecretSend {
        name: &'a str,
        program: &'a str,
    },
}

impl Call<'_> {
    /// The call's arguments as JSON, for the audit log (the caller redacts).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Call::ClockNow => json!({"fn": "now"}),
            Call::ClockFormat => json!({"fn": "format"}),
            Call::Log => json!({"fn": "log"}),
            Call::ParamGet { name } => json!({"fn": "get", "name": name}),
            Call::ArchiveRead { source } => json!({"fn": "tar-gz", "read": source}),
            Call::StoreWrite { dest } => json!({"fn": "write", "dest": dest}),
            Call::FilesView { op, path } => json!({"fn": op, "path": path}),
            Call::SshExec { host, argv } => json!({"fn": "exec", "host": host, "argv": argv}),
            Call::ScpFetch { host, path } => json!({"fn": "fetch", "host": host, "path": path}),
            Call::SecretOpen { name } => json!({"fn": "open", "name": name}),
            Call::SecretSend { name, program } => json!({"fn": "send", "name": name, "program": program}),
        }
    }

    /// The WIT interface the call belongs to, for logs.
    pub fn interface(&self) -> &'static str {
        match self {
            Call::ClockNow | Call::ClockFormat => "clock",
            Call::Log => "log",
            Call::ParamGet { .. } => "params",
            Call::ArchiveRead { .. } | Call::StoreWrite { .. } => "archive",
            Call::FilesView { .. } => "files",
            Call::SshExec { .. } => "ssh",
            Call::ScpFetch { .. } => "scp",
            Call::SecretOpen { .. } | Call::SecretSend { .. } => "secrets",
        }
    }
}

/// What an allowed call may touch.
#[derive(Debug, PartialEq, Eq)]
pub enum Grant {
    /// Needs no resource (clock, log).
    Unrestricted,
    /// The parameter exists; reading it is allowed.
    Param,
    /// Read `rel` beneath read root number `root`; `member` is the name the
    /// entry gets in an archive.
    Read { root: usize, rel: PathBuf, member: PathBuf },
    /// Write `rel` beneath the store.
    Write { rel: PathBuf },
    /// Run the (checked) argv on the named host.
    Exec { host: String },
    /// Fetch the normalised absolute `path` from the named host.
    Fetch { host: String, path: String },
    /// The secret exists; a handle may be made.
    Secret,
}

/// Why a call was refused or malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    Denied(String),
    InvalidArgument(String),
    NotFound(String),
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::Denied(m) => write!(f, "denied: {m}"),
            Denial::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Denial::NotFound(m) => write!(f, "not found: {m}"),
        }
    }
}

/// The grants of one site, resolved once per run.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Canonical read roots.
    read_roots: Vec<PathBuf>,
    /// Directory relative archive sources resolve against.
    base_dir: PathBuf,
    /// Parameters the script declared, with their values and secrecy.
    params: BTreeMap<String, ParamGrant>,
    /// Remote hosts by the name scripts use.
    hosts: BTreeMap<String, HostGrants>,
    /// Names of the secrets the site declares.
    secrets: std::collections::BTreeSet<String>,
    /// The programs each deliverable secret may be sent to.
    deliveries: BTreeMap<String, Vec<String>>,
}

/// What may be done on one host, compiled from its site section.
#[derive(Debug, Clone)]
struct HostGrants {
    commands: Vec<CommandPattern>,
    fetch: Vec<PathPattern>,
}

#[derive(Debug, Clone)]
pub struct ParamGrant {
    pub value: Option<String>,
    pub secret: bool,
}

impl Policy {
    /// A policy that denies everything: used while calling `describe`.
    pub fn deny_all() -> Policy {
        Policy {
            read_roots: Vec::new(),
            base_dir: PathBuf::from("/nonexistent"),
            params: BTreeMap::new(),
            hosts: BTreeMap::new(),
            secrets: Default::default(),
            deliveries: BTreeMap::new(),
        }
    }

    pub fn for_site(site: &Site, params: BTreeMap<String, ParamGrant>) -> Policy {
        let hosts = site
            .hosts
            .iter()
            .map(|(name, h)| {
                let grants = HostGrants {
                    // Validated when the site was parsed.
                    commands: h.commands.iter().map(|c| CommandPattern::new(c).expect("validated")).collect(),
                    fetch: h.fetch.iter().map(|p| PathPattern::new(p).expect("validated")).collect(),
                };
                (name.clone(), grants)
            })
            .collect();
        Policy {
            read_roots: site.read_roots.clone(),
            base_dir: site.base_dir.clone(),
            params,
            hosts,
            secrets: site.secrets.keys().cloned().collect(),
            deliveries: site.deliveries.iter().map(|(k, d)| (k.clone(), d.programs.clone())).collect(),
        }
    }

    pub fn read_roots(&self) -> &[PathBuf] {
        &self.read_roots
    }

    pub fn param(&self, name: &str) -> Option<&ParamGrant> {
        self.params.get(name)
    }

    /// Decides one call. Exhaustive by construction.
    pub fn check(&self, call: &Call<'_>) -> Result<Grant, Denial> {
        match call {
            Call::ClockNow | Call::ClockFormat | Call::Log => Ok(Grant::Unrestricted),
            Call::ParamGet { name } => match self.params.get(*name) {
                Some(p) if p.secret => Err(Denial::Denied(format!(
                    "parameter {name:?} is declared secret, and scripts never read secret values; put the value \
                     under [secrets] in the site file and open a handle to it"
                ))),
                Some(_) => Ok(Grant::Param),
                None => Err(Denial::Denied(format!("parameter {name:?} is not declared by the script's describe()"))),
            },
            Call::ArchiveRead { source } => self.check_read(source),
            // The same roots and path rules as archive: what may be read
            // may be looked at.
            Call::FilesView { path, .. } => match path.trim_end_matches('/') {
                // `.` is the directory relative paths start from.
                "." => self.check_read(&self.base_dir.to_string_lossy()),
                _ => self.check_read(path),
            },
            Call::StoreWrite { dest } => store_path(dest).map(|rel| Grant::Write { rel }),
            Call::SshExec { host, argv } => self.check_exec(host, argv),
            Call::ScpFetch { host, path } => self.check_fetch(host, path),
            Call::SecretOpen { name } => match self.secrets.contains(*name) {
                true => Ok(Grant::Secret),
                false => {
                    Err(Denial::Denied(format!("secret {name:?} is not declared under [secrets] in the site file")))
                }
            },
            Call::SecretSend { name, program } => match self.deliveries.get(*name) {
                None => Err(Denial::Denied(format!(
                    "secret {name:?} may not be sent anywhere: the site gives it no `stdin` and `programs`"
                ))),
                Some(programs) if programs.iter().any(|p| p == program) => Ok(Grant::Secret),
                Some(programs) => Err(Denial::Denied(format!(
                    "secret {name:?} may be sent only to {}, not to {program:?}",
                    programs.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ")
                ))),
            },
        }
    }

    fn host(&self, host: &str) -> Result<&HostGrants, Denial> {
        self.hosts.get(host).ok_or_else(|| {
            let known = self.hosts.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
            Denial::Denied(format!(
                "host {host:?} is not granted to this site (granted: {})",
                if known.is_empty() { "none" } else { &known }
            ))
        })
    }

    fn check_exec(&self, host: &str, argv: &[String]) -> Result<Grant, Denial> {
        let grants = self.host(host)?;
        if argv.is_empty() {
            return Err(Denial::InvalidArgument("an empty argv names no command".into()));
        }
        let bytes: usize = argv.iter().map(|a| a.len() + 3).sum();
        if argv.len() > MAX_ARGS || bytes > MAX_COMMAND_BYTES {
            return Err(Denial::InvalidArgument(format!(
                "the command has {} arguments and {bytes} bytes; at most {MAX_ARGS} arguments and {MAX_COMMAND_BYTES} bytes may be sent",
                argv.len()
            )));
        }
        if let Some(index) = argv.iter().position(|a| a.contains('\0')) {
            return Err(Denial::InvalidArgument(format!(
                "argument {index} contains a NUL byte, which a remote command cannot receive"
            )));
        }
        if grants.commands.iter().any(|p| p.matches(argv)) {
            return Ok(Grant::Exec { host: host.to_string() });
        }
        let same_program = grants.commands.iter().any(|p| p.program == argv[0]);
        Err(Denial::Denied(if same_program {
            format!("host {host:?}: the arguments of {argv:?} match no granted pattern for {:?}", argv[0])
        } else {
            format!("host {host:?}: program {:?} is not granted", argv[0])
        }))
    }

    fn check_fetch(&self, host: &str, path: &str) -> Result<Grant, Denial> {
        let grants = self.host(host)?;
        let normal = remote_path(path)?;
        if grants.fetch.iter().any(|p| p.matches(&normal)) {
            return Ok(Grant::Fetch { host: host.to_string(), path: normal });
        }
        Err(Denial::Denied(format!("host {host:?}: fetching {normal:?} is not granted")))
    }

    fn check_read(&self, source: &str) -> Result<Grant, Denial> {
        if self.read_roots.is_empty() {
            return Err(Denial::Denied(format!("cannot read {source:?}: this site grants no read roots")));
        }
        let lexical = plain_path(source)?;
        let member: PathBuf = lexical.components().filter(|c| matches!(c, Component::Normal(_))).collect();
        if member.as_os_str().is_empty() {
            return Err(Denial::InvalidArgument(format!("{source:?} names no file or directory")));
        }
        let absolute = self.base_dir.join(&lexical);
        // Resolve the parent through the file system so that a symlinked
        // directory on the way cannot lead outside; the final component is
        // archived as what it is (a link stays a link).
        let parent = absolute.parent().unwrap_or(Path::new("/"));
        let name = absolute
            .file_name()
            .ok_or_else(|| Denial::InvalidArgument(format!("{source:?} names no file or directory")))?;
        let parent = parent.canonicalize().map_err(|e| Denial::NotFound(format!("cannot read {source:?}: {e}")))?;
        let resolved = parent.join(name);
        for (index, root) in self.read_roots.iter().enumerate() {
            if let Ok(rel) = resolved.strip_prefix(root) {
                if rel.as_os_str().is_empty() {
                    // The root itself: archive it as ".".
                    return Ok(Grant::Read { root: index, rel: PathBuf::from("."), member });
                }
                return Ok(Grant::Read { root: index, rel: rel.to_path_buf(), member });
            }
        }
        Err(Denial::Denied(format!(
            "cannot read {source:?}: {} is outside the read roots ({})",
            resolved.display(),
            self.read_roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
        )))
    }
}

/// A path with no NUL and no `..`. `.` components are dropped.
fn plain_path(p: &str) -> Result<PathBuf, Denial> {
    if p.is_empty() {
        return Err(Denial::InvalidArgument("empty path".into()));
    }
    if p.contains('\0') {
        return Err(Denial::InvalidArgument(format!("path {:?} contains a NUL byte", p.replace('\0', "\\0"))));
    }
    let path = Path::new(p);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(Denial::Denied(format!("path {p:?} contains `..`, which is never allowed")));
    }
    Ok(path.components().filter(|c| *c != Component::CurDir).collect())
}

/// Most arguments one remote command may have.
pub const MAX_ARGS: usize = 4096;
/// Most bytes one quoted remote command line may have (below what sshd and
/// the remote kernel accept).
pub const MAX_COMMAND_BYTES: usize = 256 << 10;

/// An allowed command: the program exactly, then one pattern per argument.
/// A last pattern ending in `...` matches zero or more further arguments,
/// each against the pattern before the dots.
///
/// Argument patterns are globs with the same rules as fetch paths, plus two
/// that keep a glob from admitting more than it appears to:
///
/// - `*`, `?` and `[...]` stay within one `/`-separated component; `**`
///   inside a pattern crosses directories (`/var/log/**`);
/// - a wildcard never admits a `..` component (split at `/` and `=`), so
///   `/var/log/app/*` does not admit `/var/log/app/../../etc/shadow`: such an
///   argument matches only a pattern that spells it out exactly;
/// - an argument that starts with `-` (an option) matches only a pattern
///   that starts with `-`, so `*.log` does not admit
///   `--checkpoint-action=exec=CMD #.log`;
/// - a pattern that is exactly `**` admits any argument at all (options,
///   paths, `..`); `offsite check` warns about it.
///
/// Shell characters such as `$`, `;` or `|` are plain characters, and the
/// host quotes every argument anyway.
#[derive(Debug, Clone)]
pub struct CommandPattern {
    program: String,
    args: Vec<ArgPattern>,
    rest: Option<ArgPattern>,
}

/// One argument pattern of a [`CommandPattern`].
#[derive(Debug, Clone)]
pub struct ArgPattern {
    text: String,
    kind: ArgKind,
}

#[derive(Debug, Clone)]
enum ArgKind {
    /// `**`: anything.
    Any,
    /// No glob syntax: this exact argument.
    Exact,
    Glob {
        matcher: globset::GlobMatcher,
        option: bool,
    },
}

impl ArgPattern {
    fn new(text: &str) -> Result<ArgPattern, String> {
        let kind = if text == "**" {
            ArgKind::Any
        } else if !text.contains(['*', '?', '[', '{', '\\']) {
            ArgKind::Exact
        } else {
            let matcher = globset::GlobBuilder::new(text)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map(|g| g.compile_matcher())
                .map_err(|e| format!("bad pattern {text:?}: {e}"))?;
            ArgKind::Glob { matcher, option: text.starts_with('-') }
        };
        Ok(ArgPattern { text: text.to_string(), kind })
    }

    pub fn matches(&self, arg: &str) -> bool {
        match &self.kind {
            ArgKind::Any => true,
            ArgKind::Exact => arg == self.text,
            ArgKind::Glob { matcher, option } => {
                (*option || !arg.starts_with('-')) && !has_dotdot(arg) && matcher.is_match(arg)
            }
        }
    }

    /// What the pattern admits, in words, for `offsite check`.
    pub fn describe(&self) -> String {
        match &self.kind {
            ArgKind::Any => "any argument at all (options, any path, `..`)".into(),
            ArgKind::Exact => format!("exactly {:?}", self.text),
            ArgKind::Glob { option, .. } => {
                let crosses = self.text.contains("**");
                format!(
                    "an argument matching {:?} ({}{}, never `..`)",
                    self.text,
                    if crosses { "`**` crosses directories" } else { "wildcards stay within one directory" },
                    if *option { "" } else { ", never an option starting with `-`" }
                )
            }
        }
    }

    /// A warning when the pattern admits more than it appears to.
    pub fn is_any(&self) -> bool {
        matches!(self.kind, ArgKind::Any)
    }
}

/// Whether `arg` has a `..` component, taking `/` and `=` as separators
/// (`--file=../x`).
fn has_dotdot(arg: &str) -> bool {
    arg.split(['/', '=']).any(|part| part == "..")
}

/// Programs that run whatever their arguments say: a grant of one of them
/// with a free argument is a grant of any command.
const INTERPRETERS: &[&str] = &[
    "sh", "bash", "dash", "zsh", "fish", "ksh", "csh", "tcsh", "env", "xargs", "sudo", "su", "doas", "nice", "nohup",
    "timeout", "ionice", "perl", "python", "python3", "ruby", "php", "node", "awk", "gawk", "mawk", "find", "eval",
    "exec", "busybox", "ssh", "scp", "rsync",
];

impl CommandPattern {
    pub fn new(pattern: &[String]) -> Result<CommandPattern, String> {
        let (program, args) = pattern.split_first().ok_or("an empty command pattern allows nothing")?;
        if program.is_empty() {
            return Err("the program name is empty".into());
        }
        let mut compiled = Vec::new();
        let mut rest = None;
        for (i, arg) in args.iter().enumerate() {
            match arg.strip_suffix("...") {
                Some(repeated) if i + 1 == args.len() => rest = Some(ArgPattern::new(repeated)?),
                Some(_) => return Err(format!("only the last argument pattern may end in `...` ({arg:?})")),
                None => compiled.push(ArgPattern::new(arg)?),
            }
        }
        Ok(CommandPattern { program: program.clone(), args: compiled, rest })
    }

    pub fn matches(&self, argv: &[String]) -> bool {
        let Some((program, args)) = argv.split_first() else { return false };
        if *program != self.program || args.len() < self.args.len() {
            return false;
        }
        let (fixed, extra) = args.split_at(self.args.len());
        if !fixed.iter().zip(&self.args).all(|(a, g)| g.matches(a)) {
            return false;
        }
        match &self.rest {
            None => extra.is_empty(),
            Some(g) => extra.iter().all(|a| g.matches(a)),
        }
    }

    /// What the pattern admits, in words: one line per argument.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = vec![format!("program {:?} (exactly)", self.program)];
        for (i, a) in self.args.iter().enumerate() {
            lines.push(format!("argument {}: {}", i + 1, a.describe()));
        }
        match &self.rest {
            Some(r) => lines.push(format!("then any number of further arguments, each {}", r.describe())),
            None => lines.push("and no further arguments".into()),
        }
        lines
    }

    /// Why this grant admits more than it appears to, if it does.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let base = self.program.rsplit('/').next().unwrap_or(&self.program);
        let free = self.args.iter().chain(self.rest.as_ref()).any(|a| !matches!(a.kind, ArgKind::Exact));
        if free && INTERPRETERS.iter().any(|p| base == *p || base.starts_with(&format!("{p}."))) {
            out.push(format!(
                "{:?} runs what its arguments say, and this grant leaves an argument open: it admits any command",
                self.program
            ));
        }
        for (i, a) in self.args.iter().enumerate() {
            if a.is_any() {
                out.push(format!("argument {} is `**`: it admits any argument, options and `..` included", i + 1));
            }
        }
        if self.rest.as_ref().is_some_and(ArgPattern::is_any) {
            out.push("`**...` admits any further arguments, options and `..` included".into());
        }
        out
    }
}

/// A remote path glob. `*` and `?` stay within one path component; `**`
/// crosses directories.
#[derive(Debug, Clone)]
pub struct PathPattern(globset::GlobMatcher);

impl PathPattern {
    pub fn new(pattern: &str) -> Result<PathPattern, String> {
        if !pattern.starts_with('/') {
            return Err(format!("remote path pattern {pattern:?} must be absolute"));
        }
        if pattern.split('/').any(|c| c == "..") {
            return Err(format!("remote path pattern {pattern:?} contains `..`"));
        }
        let glob = globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("bad pattern {pattern:?}: {e}"))?;
        Ok(PathPattern(glob.compile_matcher()))
    }

    pub fn matches(&self, normalised: &str) -> bool {
        self.0.is_match(normalised)
    }
}

/// Normalises a remote path: absolute, no NUL, no `..`; `.` and repeated
/// slashes are dropped.
pub fn remote_path(path: &str) -> Result<String, Denial> {
    if path.contains('\0') {
        return Err(Denial::InvalidArgument(format!(
            "remote path {:?} contains a NUL byte",
            path.replace('\0', "\\0")
        )));
    }
    if !path.starts_with('/') {
        return Err(Denial::Denied(format!("remote path {path:?} must be absolute")));
    }
    let mut out = String::with_capacity(path.len());
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(Denial::Denied(format!("remote path {path:?} contains `..`, which is never allowed")));
        }
        out.push('/');
        out.push_str(part);
    }
    if out.is_empty() {
        return Err(Denial::InvalidArgument(format!("remote path {path:?} names no file")));
    }
    Ok(out)
}

/// Most directory levels a store path may have: enough for any backup
/// layout, few enough that every walk of the store (verify, cleanup) stays
/// within its file descriptors.
pub const MAX_STORE_DEPTH: usize = 32;

/// Validates a destination in the store: relative, plain components only,
/// and not one of the runner's own temporary names.
pub fn store_path(dest: &str) -> Result<PathBuf, Denial> {
    let rel = plain_path(dest)?;
    if rel.is_absolute() {
        return Err(Denial::Denied(format!(
            "store destination {dest:?} is absolute; it must be a path relative to the store"
        )));
    }
    if rel.as_os_str().is_empty() {
        return Err(Denial::InvalidArgument(format!("store destination {dest:?} names no file")));
    }
    for c in rel.components() {
        if let Component::Normal(part) = c
            && part.to_string_lossy().starts_with(crate::store::TEMP_PREFIX)
        {
            return Err(Denial::Denied(format!("store destination {dest:?} uses the runner's reserved prefix")));
        }
    }
    let depth = rel.components().count();
    if depth > MAX_STORE_DEPTH {
        return Err(Denial::InvalidArgument(format!(
            "store destination {} has {depth} levels; at most {MAX_STORE_DEPTH} are allowed",
            crate::text::shorten_middle(dest, 200)
        )));
    }
    if rel.components().next() == Some(Component::Normal(crate::store::META_DIR.as_ref())) {
        return Err(Denial::Denied(format!(
            "store destination {dest:?} is inside {}, the runner's own directory",
            crate::store::META_DIR
        )));
    }
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(roots: &[&Path], base: &Path) -> Policy {
        Policy {
            read_roots: roots.iter().map(|r| r.canonicalize().unwrap()).collect(),
            base_dir: base.to_path_buf(),
            params: BTreeMap::from([("path".to_string(), ParamGrant { value: Some("x".into()), secret: false })]),
            hosts: BTreeMap::new(),
            secrets: Default::default(),
            deliveries: BTreeMap::new(),
        }
    }

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn remote_policy() -> Policy {
        let mut p = Policy::deny_all();
        let commands = [
            argv(&["mysqldump", "--single-transaction", "sitedb", "[a-z_]*..."]),
            argv(&["/usr/local/bin/dbbackup.sh"]),
            argv(&["echo", "$(id)"]),
        ];
        p.hosts.insert(
            "server1".into(),
            HostGrants {
                commands: commands.iter().map(|c| CommandPattern::new(c).unwrap()).collect(),
                fetch: vec![PathPattern::new("/var/backups/*.tgz").unwrap()],
            },
        );
        p
    }

    #[test]
    fn commands_match_program_exactly_and_arguments_by_glob() {
        let p = remote_policy();
        let exec = |host: &str, a: &[&str]| p.check(&Call::SshExec { host, argv: &argv(a) });
        assert!(exec("server1", &["mysqldump", "--single-transaction", "sitedb"]).is_ok());
        assert!(exec("server1", &["mysqldump", "--single-transaction", "sitedb", "users", "news_items"]).is_ok());
        assert!(exec("server1", &["/usr/local/bin/dbbackup.sh"]).is_ok());
        // Wrong program, extra argument, argument outside the glob, other host.
        assert!(matches!(exec("server1", &["mysql"]), Err(Denial::Denied(m)) if m.contains("not granted")));
        assert!(exec("server1", &["/usr/local/bin/dbbackup.sh", "--all"]).is_err());
        assert!(exec("server1", &["mysqldump", "--single-transaction", "sitedb", "Users;rm"]).is_err());
        assert!(exec("server1", &["mysqldump", "--single-transaction", "otherdb"]).is_err());
        assert!(exec("server2", &["/usr/local/bin/dbbackup.sh"]).is_err());
        assert!(exec("server1", &["dbbackup.sh"]).is_err(), "program names are exact, not basenames");
        // Shell syntax in a pattern is literal.
        assert!(exec("server1", &["echo", "$(id)"]).is_ok());
        assert!(exec("server1", &["echo", "root"]).is_err());
        assert!(matches!(exec("server1", &["echo", "a\0b"]), Err(Denial::InvalidArgument(_))));
        assert!(matches!(exec("server1", &[]), Err(Denial::InvalidArgument(_))));
    }

    #[test]
    fn command_globs_stay_in_one_directory_and_admit_no_options_or_dotdot() {
        let p = |pattern: &[&str]| CommandPattern::new(&argv(pattern)).unwrap();
        let cat = p(&["cat", "/var/log/app/*"]);
        assert!(cat.matches(&argv(&["cat", "/var/log/app/x.log"])));
        assert!(!cat.matches(&argv(&["cat", "/var/log/app/../../../etc/shadow"])), "`*` crossed `/`");
        assert!(!cat.matches(&argv(&["cat", "/var/log/app/.."])), "`*` admitted `..`");
        assert!(!cat.matches(&argv(&["cat", "/var/log/app/sub/x.log"])));
        let deep = p(&["cat", "/var/log/**"]);
        assert!(deep.matches(&argv(&["cat", "/var/log/app/sub/x.log"])));
        assert!(!deep.matches(&argv(&["cat", "/var/log/app/../../etc/shadow"])), "`**` admitted `..`");
        // The tar checkpoint trick: an option disguised as a file name.
        let tar = p(&["tar", "-czf", "-", "-C", "/var/log", "*.log..."]);
        assert!(tar.matches(&argv(&["tar", "-czf", "-", "-C", "/var/log", "a.log", "b.log"])));
        assert!(!tar.matches(&argv(&["tar", "-czf", "-", "-C", "/var/log", "--checkpoint-action=exec=id #.log"])));
        assert!(!tar.matches(&argv(&["tar", "-czf", "-", "-C", "/var/log", "-x.log"])));
        // A pattern that starts with `-` may admit options; `=..` is still `..`.
        let opt = p(&["pg_dump", "--table=*"]);
        assert!(opt.matches(&argv(&["pg_dump", "--table=tbl_a"])));
        assert!(!opt.matches(&argv(&["pg_dump", "--table=.."])));
        // Exact arguments are exact, `..` included when spelled out.
        assert!(p(&["cat", "/a/../b"]).matches(&argv(&["cat", "/a/../b"])));
        // `**` alone admits anything, and check says so.
        let any = p(&["sh", "-c", "**"]);
        assert!(any.matches(&argv(&["sh", "-c", "cat /etc/../etc/shadow; -x"])));
        assert!(any.warnings().iter().any(|w| w.contains("any command")));
        assert!(any.warnings().iter().any(|w| w.contains("`**`")));
        assert!(p(&["mysqldump", "sitedb", "tbl_*..."]).warnings().is_empty());
        let words = tar.describe().join("\n");
        assert!(words.contains("never an option starting with `-`") && words.contains("never `..`"), "{words}");
    }

    #[test]
    fn fetch_paths_are_normalised_then_matched() {
        let p = remote_policy();
        let fetch = |path: &str| p.check(&Call::ScpFetch { host: "server1", path });
        assert_eq!(
            fetch("/var//backups/./db.tgz"),
            Ok(Grant::Fetch { host: "server1".into(), path: "/var/backups/db.tgz".into() })
        );
        assert!(fetch("/var/backups/sub/db.tgz").is_err(), "* stays inside one directory");
        assert!(matches!(fetch("/var/backups/../../etc/x.tgz"), Err(Denial::Denied(_))));
        assert!(matches!(fetch("var/backups/db.tgz"), Err(Denial::Denied(_))));
        assert!(matches!(fetch("/var/backups/a\0.tgz"), Err(Denial::InvalidArgument(_))));
        assert!(fetch("/etc/shadow").is_err());
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(CommandPattern::new(&[]).is_err());
        assert!(CommandPattern::new(&argv(&["a", "x...", "y"])).is_err());
        assert!(CommandPattern::new(&argv(&["a", "[z"])).is_err());
        assert!(PathPattern::new("relative").is_err());
        assert!(PathPattern::new("/a/../b").is_err());
    }

    #[test]
    fn reads_inside_a_root_are_granted_with_the_member_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("beoserver")).unwrap();
        let p = policy(&[dir.path()], dir.path());
        let grant = p.check(&Call::ArchiveRead { source: "beoserver" }).unwrap();
        assert_eq!(grant, Grant::Read { root: 0, rel: "beoserver".into(), member: "beoserver".into() });
        let abs = dir.path().canonicalize().unwrap().join("beoserver");
        let grant = p.check(&Call::ArchiveRead { source: abs.to_str().unwrap() }).unwrap();
        let Grant::Read { rel, member, .. } = grant else { panic!() };
        assert_eq!(rel, Path::new("beoserver"));
        assert!(!member.is_absolute(), "leading / is stripped like GNU tar does");
    }

    #[test]
    fn dotdot_and_outside_paths_are_denied() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        let p = policy(&[&dir.path().join("a")], &dir.path().join("a"));
        assert!(matches!(p.check(&Call::ArchiveRead { source: "../a" }), Err(Denial::Denied(_))));
        assert!(matches!(p.check(&Call::ArchiveRead { source: "/etc/passwd" }), Err(Denial::Denied(_))));
        assert!(matches!(p.check(&Call::ArchiveRead { source: "x\0y" }), Err(Denial::InvalidArgument(_))));
    }

    #[test]
    fn a_symlinked_parent_cannot_lead_outside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(dir.path().join("secret")).unwrap();
        std::fs::write(dir.path().join("secret/key"), "k").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        let p = policy(&[&root], &root);
        let err = p.check(&Call::ArchiveRead { source: "link/key" }).unwrap_err();
        assert!(matches!(err, Denial::Denied(ref m) if m.contains("outside the read roots")), "{err:?}");
        // The link itself is inside and is archived as a link.
        assert!(p.check(&Call::ArchiveRead { source: "link" }).is_ok());
    }

    #[test]
    fn no_read_roots_means_no_reads() {
        let p = Policy::deny_all();
        assert!(matches!(p.check(&Call::ArchiveRead { source: "x" }), Err(Denial::Denied(_))));
        assert!(matches!(p.check(&Call::ParamGet { name: "path" }), Err(Denial::Denied(_))));
    }

    #[test]
    fn undeclared_params_are_denied() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(&[dir.path()], dir.path());
        assert_eq!(p.check(&Call::ParamGet { name: "path" }), Ok(Grant::Param));
        assert!(p.check(&Call::ParamGet { name: "other" }).is_err());
    }

    #[test]
    fn store_destinations() {
        assert_eq!(store_path("a/b.tgz").unwrap(), Path::new("a/b.tgz"));
        assert_eq!(store_path("./b.tgz").unwrap(), Path::new("b.tgz"));
        assert!(matches!(store_path("/tmp/x"), Err(Denial::Denied(_))));
        assert!(matches!(store_path("../x"), Err(Denial::Denied(_))));
        assert!(matches!(store_path("a\0b"), Err(Denial::InvalidArgument(_))));
        assert!(matches!(store_path("."), Err(Denial::InvalidArgument(_))));
        assert!(matches!(store_path(""), Err(Denial::InvalidArgument(_))));
        assert!(store_path(&format!("{}x", crate::store::TEMP_PREFIX)).is_err());
        assert!(store_path(".offsite/manifests/x.json").is_err());
        assert!(store_path("./.offsite/lock").is_err());
        assert!(store_path("sub/.offsite/x").is_ok());
        assert!(store_path(&("d/".repeat(MAX_STORE_DEPTH - 1) + "f")).is_ok());
        assert!(
            matches!(store_path(&("d/".repeat(2000) + "f")), Err(Denial::InvalidArgument(m)) if m.contains("levels"))
        );
    }
}
