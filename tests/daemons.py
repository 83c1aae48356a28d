"""Helpers for flanneld tests: etcd in a test host, flanneld processes, reading subnet.env and etcd keys."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.rig import Host

FLANNELD = str(Path(sys.executable).with_name("flanneld"))
ETCD_PORT = 2379
ETCD_TOOL = str(Path(__file__).with_name("etcd_tool.py"))


def wait_for(cond: Callable[[], object], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (result := cond()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return result


class Etcd:
    """Debian's etcd-server in a test host, on the underlay address."""

    def __init__(self, host: Host, data: Path) -> None:
        self.host = host
        self.data = data
        self.url = f"http://{host.underlay}:{ETCD_PORT}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.data.with_suffix(".log"), "ab")  # noqa: SIM115 (the process owns it)
        self.proc = self.host.popen(
            "etcd", "--name", "test", "--data-dir", str(self.data), "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url, "--listen-peer-urls", "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "test=http://127.0.0.1:2380", stdout=log, stderr=log)
        wait_for(lambda: self._answers(), 30, "etcd to answer")

    def _answers(self) -> bool:
        return self._tool("status", check=False).returncode == 0

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(20)

    def _tool(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.host.run(sys.executable, ETCD_TOOL, f"{self.host.underlay}:{ETCD_PORT}", *args, check=check)

    def put(self, key: str, value: str) -> None:
        self._tool("put", key, value)

    def delete(self, key: str) -> None:
        self._tool("delete", key)

    def items(self, prefix: str) -> dict[str, str]:
        return dict(json.loads(self._tool("dump", prefix).stdout))


def start_flanneld(host: Host, registry: list[str], subnet_file: Path, *extra: str,
                   iface: tuple[str, ...] = ("--iface", "eth0")) -> subprocess.Popen[str]:
    """flanneld on host; the test hosts have no default route, so the interface is named unless `iface` says how
    else to find it."""
    return host.popen(FLANNELD, *registry, "--subnet-file", str(subnet_file), *iface, *extra,
                      stderr=subprocess.PIPE, text=True)


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def wait_for_env(path: Path, proc: subprocess.Popen[str], timeout: float = 30) -> dict[str, str]:
    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"flanneld exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        return path.exists()
    wait_for(ready, timeout, f"{path}")
    return read_env(path)
