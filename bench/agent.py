"""flannel-bench agent: the far end of a two-host run, driven by the near end's flannel-bench through ssh.

Requests and replies are JSON objects, one a line, on stdin and stdout: {"op": NAME, "args": {...}} is answered by
{"ok": RESULT} or {"error": MESSAGE, "skip": BOOL} (skip: only the current mode failed). No port is opened and
no credential exists beyond the ssh session itself. What the agent set up is removed when stdin closes (the
session ended, however it ended), on SIGHUP, SIGTERM or SIGINT, and after --idle-timeout seconds without a
request, which is how a link that died without closing the session is noticed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pyflannel.bench.args import Parser
from pyflannel.bench.end import LocalEnd
from pyflannel.bench.interrupt import like_ctrl_c
from pyflannel.bench.modes import Lease

VERSION = version("pyflannel")
MODE_OPS = {"prepare", "connect", "serve", "engine_stats"}


class Agent:
    """The request loop's state: this host's end, once the near end has said which address and subnet it has."""

    def __init__(self, files: Path) -> None:
        self.files = files
        self.end: LocalEnd | None = None

    def handle(self, line: str) -> dict[str, Any]:
        request = json.loads(line)
        op, args = request["op"], request.get("args", {})
        try:
            return {"ok": self._call(op, args)}
        except Exception as exc:
            return {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__, "skip": op in MODE_OPS}

    def _call(self, op: str, args: dict[str, Any]) -> Any:
        if op == "hello":
            return {"version": VERSION, "uid": os.geteuid(), "ssh_connection": os.environ.get("SSH_CONNECTION", "")}
        if op == "open":   # again for another family: the end of the one before is reset first
            if self.end is not None:
                self.end.reset()
            self.end = LocalEnd.this_host(ipaddress.ip_address(args["underlay"]), ipaddress.ip_network(args["subnet"]),
                                          self.files)
            return self.end.describe()
        if self.end is None:
            raise RuntimeError(f"{op} before open")
        match op:
            case "prepare":
                return self.end.prepare(args["mode"]).to_json()
            case "connect":
                return self.end.connect(args["mode"], Lease.from_json(args["peer"]))
            case "serve":
                return self.end.serve(ipaddress.ip_address(args["addr"]), args["port"])
            case "engine_stats":
                return self.end.engine_stats()
            case "busy_seconds":
                return self.end.busy_seconds()
            case "reset":
                return self.end.reset()
        raise RuntimeError(f"unknown request {op!r}")

    def close(self) -> None:
        if self.end is not None:
            self.end.reset()
        shutil.rmtree(self.files, ignore_errors=True)


def requests(fd: int, idle_timeout: float) -> Iterator[str]:
    """Lines from fd until it closes or stays silent for idle_timeout seconds."""
    pending = b""
    while True:
        while b"\n" not in pending:
            if not select.select([fd], [], [], idle_timeout)[0]:
                return
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            pending += chunk
        line, pending = pending.split(b"\n", 1)
        yield line.decode()


def main(argv: list[str]) -> int:
    p = Parser(prog="flannel-bench agent", description="the far end of flannel-bench --remote (JSON on stdin/stdout)")
    p.add_argument("--idle-timeout", type=float, default=600, help="clean up after this many silent seconds (600)")
    args = p.parse_args(argv)
    like_ctrl_c(signal.SIGTERM, signal.SIGHUP)
    agent = Agent(Path(tempfile.mkdtemp(prefix="flannel-bench-agent-")))
    try:
        for line in requests(sys.stdin.fileno(), args.idle_timeout):
            sys.stdout.write(json.dumps(agent.handle(line)) + "\n")
            sys.stdout.flush()
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        agent.close()
    return 0
