"""A hostile script in Python (a test script): the sandbox must hold the same
way whatever language built the component. `case` picks the attempt."""

import socket

from offsite_sdk import HostError, Info, Param, Script, archive, export, files, params


class Hostile(Script):
    info = Info(
        "hostile-py",
        "0.1.0",
        "tries what a sandboxed script must not manage (test script)",
        params=[Param.required("case", "which attempt")],
        capabilities=["archive", "files", "params"],
    )

    def run(self):
        case = params.require("case")
        if case == "read-file":
            with open("/etc/passwd") as f:
                print("read:", f.read()[:20])
        elif case == "write-file":
            with open("/tmp/pwned-by-python", "w") as f:
                f.write("pwned")
        elif case == "network":
            socket.create_connection(("127.0.0.1", 22), timeout=2)
        elif case == "archive-outside":
            archive.tar_gz(["/etc"], "etc.tgz")
        elif case == "list-outside":
            files.list_dir("/root")
        elif case == "denied-handled":
            try:
                archive.tar_gz(["/etc"], "etc.tgz")
            except HostError as e:
                print("caught:", e.kind)
                if not e.denied:
                    raise
        elif case == "allocate":
            hog = []
            while True:
                hog.append(bytearray(16 << 20))
        elif case == "spin":
            while True:
                pass
        elif case == "raise":
            raise RuntimeError("something went wrong\nsecond line")
        else:
            raise ValueError(f"unknown case {case!r}")


WitWorld = export(Hostile)
