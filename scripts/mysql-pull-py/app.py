"""`mysql-pull` in Python, dump mode: for each `HOST:DB[:TABLE,...]` in
`dumps`, runs mysqldump on HOST and streams its output, gzipped on the
runner's side, into the store as `HOST/DB-YYYYMMDD-HHMMSS.sql.gz`. Hosts are
dumped in parallel; a dump counts only if mysqldump exited 0 and its output
ends with the `-- Dump completed` trailer. Credentials come from an option
file on the server (`~/.my.cnf`, or `defaults_file`). The argv is the Rust
mysql-pull's, so the same site grants serve both.
"""

from offsite_sdk import HostError, Info, Param, Script, Stream, clock, export, log, params, ssh

TRAILER = "-- Dump completed"


def entries(spec: str):
    """`HOST:DB[:TABLE,TABLE...]` entries, separated by white space."""
    out = []
    for entry in spec.split():
        parts = entry.split(":", 2)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise ValueError(f"dumps entry {entry!r} must be HOST:DB[:TABLE,...]")
        tables = [t for t in parts[2].split(",") if t] if len(parts) == 3 else []
        out.append((parts[0], parts[1], tables))
    if not out:
        raise ValueError('nothing to back up: set dumps, e.g. "server1:sitedb"')
    return out


class MysqlPull(Script):
    info = Info(
        "mysql-pull-py",
        "0.1.0",
        "MySQL/MariaDB dumps over SSH, streamed into the store (mysql-pull's dump mode, in Python)",
        params=[
            Param.required("dumps", "space-separated HOST:DB[:TABLE,TABLE...] entries"),
            Param.optional("defaults_file", "remote MySQL option file (default: the login user's ~/.my.cnf)"),
            Param.optional("stamp", "strftime pattern for file names", default="%Y%m%d-%H%M%S"),
        ],
        capabilities=["ssh", "clock", "params", "log"],
    )

    def run(self):
        stamp = clock.now().format(params.require("stamp"))
        defaults = params.get("defaults_file")
        stream = Stream(gzip=True, require_tail=TRAILER)
        running, failures = [], []
        for host, db, tables in entries(params.require("dumps")):
            argv = ["mysqldump"]
            if defaults:
                argv.append(f"--defaults-extra-file={defaults}")
            argv += ["--single-transaction", "--quick", "--add-drop-table", db, *tables]
            try:
                running.append((host, db, ssh.start_exec_to_file(host, argv, f"{host}/{db}-{stamp}.sql.gz", stream)))
            except HostError as e:
                failures.append(f"{host} {db}: {e}")
        for host, db, job in running:
            try:
                stored = job.wait()
                log.info(f"{host}: {db} -> {stored.path} ({stored.bytes} bytes, sha256 {stored.sha256})")
            except HostError as e:
                failures.append(f"{host} {db}: {e}")
        if failures:
            raise RuntimeError(f"{len(failures)} backup(s) failed: " + "; ".join(failures))


WitWorld = export(MysqlPull)
