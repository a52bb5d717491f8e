"""`arc` in Python: the classic one-line archive script, as a sandboxed component.

`offsite run arc-py.wasm --param path=beoserver` writes
`beoserver.YYYYMMDD-HHMMSS.tgz` into the store, exactly as the Rust `arc` does
(same name, same members: the archive is the host's).
"""

from offsite_sdk import Info, Param, Script, archive, clock, export, log, params


def default_name(path: str):
    """The last normal component: `beoserver` for `/home/u/beoserver/`."""
    for part in reversed(path.split("/")):
        if part and part != ".":
            return part
    return None


class Arc(Script):
    info = Info(
        "arc",
        "0.1.0",
        "Archive a file or directory as NAME.YYYYMMDD-HHMMSS.tgz",
        params=[
            Param.required("path", "file or directory to archive"),
            Param.optional("name", "archive name prefix; defaults to the last component of path"),
            Param.optional("format", "timestamp pattern (strftime)", default="%Y%m%d-%H%M%S"),
        ],
        capabilities=["archive", "clock", "log", "params"],
    )

    def run(self):
        path = params.require("path")
        name = params.get("name") or default_name(path)
        if not name:
            raise ValueError(f"cannot derive an archive name from {path!r}; set --param name=...")
        stamp = clock.now().format(params.require("format"))
        dest = f"{name}.{stamp}.tgz"
        log.info(f"archiving {path} into {dest}")
        stored = archive.tar_gz([path], dest)
        log.info(f"{stored.path} ({stored.bytes} bytes, sha256 {stored.sha256})")


WitWorld = export(Arc)
