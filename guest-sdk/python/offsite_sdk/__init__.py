"""Write Offsite backup scripts in Python.

A script subclasses :class:`Script`, sets :attr:`Script.info` and implements
:meth:`Script.run`, and exports itself with ``WitWorld = export(MyScript)``.
Everything it can do goes through the modules here (``clock``, ``log``,
``params``, ``archive``, ``files``, ``ssh``, ``scp``, ``secrets``), and
every call is checked against the site's grants by the runner: a refusal
raises :class:`HostError` with ``kind == "denied"``.

Built with componentize-py against the WIT this package carries
(``offsite_sdk/wit/``); ``offsite build`` does it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, TypeVar

import importlib

import wit_world
from componentize_py_types import Err
from wit_world.imports import meta as _meta


class _Interface:
    """A capability's generated bindings, or a stand-in that says why not.

    ``offsite build`` builds a script against the ``script`` world narrowed
    to the interfaces its code names (as the JavaScript SDK does), so the
    component imports only what the script uses and ``offsite check`` can
    compare that with what it declares. An interface left out has no
    bindings. The import is tried here, while the module loads: that is
    during the build (componentize-py snapshots the loaded modules), since
    a running script has no file system to import from."""

    def __init__(self, name: str):
        self._name = name
        try:
            self._module: object = importlib.import_module(f"wit_world.imports.{name}")
        except ImportError:
            self._module = None

    def __getattr__(self, attr: str) -> object:
        if self._module is None:
            raise HostError(
                "denied",
                f"this script was built without the {self._name} interface: name it in the script's code "
                f"(offsite_sdk.{self._name}) and build again",
            )
        return getattr(self._module, attr)


_archive = _Interface("archive")
_clock = _Interface("clock")
_files = _Interface("files")
_log = _Interface("log")
_params = _Interface("params")
_scp = _Interface("scp")
_secrets = _Interface("secrets")
_ssh = _Interface("ssh")
_types = _Interface("types")

__all__ = [
    "HostError", "Info", "Param", "Script", "export",
    "archive", "clock", "files", "log", "params", "scp", "secrets", "ssh",
    "FileInfo", "Stream",
]

T = TypeVar("T")

# The WIT error cases, by generated class name.
_KINDS = {
    "Error_Denied": "denied",
    "Error_NotFound": "not-found",
    "Error_Io": "io",
    "Error_Timeout": "timeout",
    "Error_RemoteFailed": "remote-failed",
    "Error_InvalidArgument": "invalid-argument",
    "Error_LimitExceeded": "limit-exceeded",
}


class HostError(Exception):
    """A host call failed: the site's grants refused it, or it failed while it ran.

    ``kind`` is the WIT error case (``denied``, ``not-found``, ``io``,
    ``timeout``, ``remote-failed``, ``invalid-argument``, ``limit-exceeded``)
    and ``message`` the runner's words. ``str()`` is ``kind: message``.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    @property
    def denied(self) -> bool:
        return self.kind == "denied"

    @classmethod
    def _from_wit(cls, error: object) -> "HostError":
        kind = _KINDS.get(type(error).__name__, "io")
        return cls(kind, str(getattr(error, "value", error)))


def _host(f: Callable[..., T], *args: object) -> T:
    """Calls a generated import, turning its ``Err`` into :class:`HostError`."""
    try:
        return f(*args)
    except Err as e:
        raise HostError._from_wit(e.value) from None


def __getattr__(name: str) -> object:
    # ``FileInfo`` (what a stored file is), from the bindings of the
    # ``types`` interface, which only a script using a capability has.
    if name == "FileInfo":
        return _types.FileInfo
    raise AttributeError(f"module 'offsite_sdk' has no attribute {name!r}")


# ---------------------------------------------------------------- describe

class Param:
    """A parameter the script reads through ``params``:
    ``Param.required("path", "what to archive")``,
    ``Param.optional("format", "name pattern", default="%Y%m%d")``,
    ``Param.optional("token", "API token", secret=True)``."""

    def __init__(self, name: str, description: str = "", *, is_required: bool = False,
                 default: Optional[str] = None, secret: bool = False):
        self.name = name
        self.description = description
        self.is_required = is_required
        self.default = default
        self.secret = secret

    @classmethod
    def required(cls, name: str, description: str, *, secret: bool = False) -> "Param":
        return cls(name, description, is_required=True, secret=secret)

    @classmethod
    def optional(cls, name: str, description: str, *, default: Optional[str] = None, secret: bool = False) -> "Param":
        return cls(name, description, default=default, secret=secret)

    def _wit(self) -> _meta.ParamSpec:
        return _meta.ParamSpec(self.name, self.description, self.is_required, self.default, self.secret)


@dataclass
class Info:
    """What a script says about itself (``offsite inspect`` shows it)."""

    name: str
    version: str
    description: str = ""
    params: List[Param] = field(default_factory=list)
    capabilities: List[str] = field(default_factory=list)

    def _wit(self) -> _meta.ScriptInfo:
        return _meta.ScriptInfo(
            self.name, self.version, self.description, [p._wit() for p in self.params], list(self.capabilities)
        )


class Script:
    """Subclass it: set ``info`` and implement ``run``."""

    info: Info

    def run(self) -> None:
        raise NotImplementedError


def _one_line(text: str) -> str:
    return "; ".join(line for line in text.splitlines() if line.strip())


def export(script: type) -> type:
    """The ``WitWorld`` class componentize-py exports, for ``script``.

    Whatever leaves ``run`` fails the run with one line: a
    :class:`HostError` as ``kind: message``, anything else as its type and
    message (no traceback)."""

    class _World(wit_world.WitWorld):
        def describe(self) -> _meta.ScriptInfo:
            return script.info._wit()

        def run(self) -> None:
            try:
                script().run()
            except Err:
                raise
            except HostError as e:
                raise Err(_one_line(str(e)))
            except Exception as e:  # one line for cron mail, not a traceback
                raise Err(_one_line(f"{type(e).__name__}: {e}"))

    _World.__name__ = "WitWorld"
    _no_network()
    return _World


def _no_network() -> None:
    """A script has no network; without this a socket call fails with
    whatever the interpreter trips over first (``unknown encoding: idna``)."""
    import socket

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError("scripts have no network (reach hosts with ssh and scp)")

    socket.create_connection = refuse  # type: ignore[assignment]
    socket.getaddrinfo = refuse  # type: ignore[assignment]
    socket.socket.connect = refuse  # type: ignore[method-assign]


# ---------------------------------------------------------------- modules

class _Params:
    """The site's and the command line's parameter values."""

    @staticmethod
    def get(name: str) -> Optional[str]:
        return _host(_params.get, name)

    @staticmethod
    def require(name: str) -> str:
        value = _host(_params.get, name)
        if value is None or value == "":
            raise HostError("not-found", f"parameter {name!r} is not set (set it in [params] or with --param {name}=...)")
        return value


params = _Params()


class Instant:
    """A point in time from ``clock.now()``."""

    def __init__(self, raw: _clock.Instant):
        self._raw = raw
        self.seconds = raw.seconds
        self.nanoseconds = raw.nanoseconds

    def format(self, pattern: str, zone: str = "local") -> str:
        """strftime ``pattern`` in ``zone`` (``local`` or ``utc``)."""
        tz = _clock.Zone.UTC if zone == "utc" else _clock.Zone.LOCAL
        return _host(_clock.format, self._raw, pattern, tz)


class _Clock:
    @staticmethod
    def now() -> Instant:
        return Instant(_clock.now())


clock = _Clock()


class _Log:
    @staticmethod
    def error(message: str) -> None:
        _log.log(_log.Level.ERROR, str(message))

    @staticmethod
    def warn(message: str) -> None:
        _log.log(_log.Level.WARN, str(message))

    @staticmethod
    def info(message: str) -> None:
        _log.log(_log.Level.INFO, str(message))

    @staticmethod
    def debug(message: str) -> None:
        _log.log(_log.Level.DEBUG, str(message))


log = _Log()


class _Archive:
    @staticmethod
    def tar_gz(sources: Sequence[str], dest: str) -> FileInfo:
        """A gzip-compressed tar of ``sources`` (beneath the read roots) at ``dest`` in the store."""
        return _host(_archive.tar_gz, list(sources), dest)


archive = _Archive()


class _Files:
    """A read-only view of the read roots; links are reported, never followed."""

    @property
    def Kind(self) -> object:  # noqa: N802 (the WIT enum, as before)
        return _files.Kind

    @staticmethod
    def list_dir(path: str) -> List[_files.Entry]:
        return _host(_files.list_dir, path)

    @staticmethod
    def stat(path: str) -> _files.Entry:
        return _host(_files.stat, path)

    @staticmethod
    def exists(path: str) -> bool:
        try:
            _host(_files.stat, path)
            return True
        except HostError as e:
            if e.kind == "not-found":
                return False
            raise

    @staticmethod
    def usage(path: str) -> _files.DiskUsage:
        return _host(_files.usage, path)


files = _Files()


@dataclass
class Stream:
    """How ``ssh.exec_to_file`` treats the output: gzip it here, and require a trailer."""

    gzip: bool = False
    require_tail: Optional[str] = None

    def _wit(self) -> _ssh.StreamOptions:
        return _ssh.StreamOptions(self.gzip, self.require_tail)


class Pending:
    """A transfer started in the background; ``wait()`` for its file."""

    def __init__(self, raw: _ssh.Pending):
        self._raw = raw

    def wait(self) -> FileInfo:
        return _host(self._raw.wait)


class _Ssh:
    @property
    def ExecOutput(self) -> object:  # noqa: N802 (the WIT record, as before)
        return _ssh.ExecOutput

    @staticmethod
    def exec(host: str, argv: Sequence[str]) -> _ssh.ExecOutput:
        """Runs ``argv`` on ``host``; ``.status``, ``.stdout`` (bytes), ``.stderr``."""
        return _host(_ssh.exec, host, list(argv))

    @staticmethod
    def exec_to_file(host: str, argv: Sequence[str], dest: str, stream: Optional[Stream] = None) -> FileInfo:
        return _host(_ssh.exec_to_file, host, list(argv), dest, (stream or Stream())._wit())

    @staticmethod
    def start_exec_to_file(host: str, argv: Sequence[str], dest: str, stream: Optional[Stream] = None) -> Pending:
        return Pending(_host(_ssh.start_exec_to_file, host, list(argv), dest, (stream or Stream())._wit()))

    @staticmethod
    def exec_to_file_with_secret(
        host: str, argv: Sequence[str], dest: str, secret: "_secrets.Secret", stream: Optional[Stream] = None
    ) -> FileInfo:
        """Like ``exec_to_file``, sending the secret on stdin as the site's ``[secrets]`` entry says."""
        return _host(_ssh.exec_to_file_with_secret, host, list(argv), dest, (stream or Stream())._wit(), secret, "")

    @staticmethod
    def start_exec_to_file_with_secret(
        host: str, argv: Sequence[str], dest: str, secret: "_secrets.Secret", stream: Optional[Stream] = None
    ) -> Pending:
        """``exec_to_file_with_secret``, started in the background."""
        return Pending(
            _host(_ssh.start_exec_to_file_with_secret, host, list(argv), dest, (stream or Stream())._wit(), secret, "")
        )


ssh = _Ssh()


class _Scp:
    @staticmethod
    def fetch(host: str, remote_path: str, dest: str) -> FileInfo:
        return _host(_scp.fetch, host, remote_path, dest)

    @staticmethod
    def start_fetch(host: str, remote_path: str, dest: str) -> Pending:
        return Pending(_host(_scp.start_fetch, host, remote_path, dest))


scp = _Scp()


class _Secrets:
    @staticmethod
    def open(name: str) -> "_secrets.Secret":
        """A handle to the site's secret ``name``; the value is never readable."""
        return _host(_secrets.open, name)


secrets = _Secrets()
