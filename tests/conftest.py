"""Shared fixtures: test hosts in network namespaces and flannel-tunnel running on them.

Everything crosses a real kernel: TUN devices, veths and UDP sockets inside namespaces that each test creates and
always deletes (bench.rig). Sockets for test traffic are opened from this process by entering a host's namespace
on the current thread only (setns), so the traffic endpoints need no helper processes.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pyflannel.bench.rig import Host, Rig

KLOG = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] (.*)")  # the message is group 1
TUNNEL = str(Path(sys.executable).with_name("flannel-tunnel"))
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def inside(host: Host) -> Iterator[None]:
    """Run the block with this thread in the host's network namespace."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{host.ns}", os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(home)
        os.close(home)
        os.close(target)


def host_socket(host: Host, kind: int = socket.SOCK_DGRAM, proto: int = 0, family: int = socket.AF_INET
                ) -> socket.socket:
    """A socket (IPv4 unless `family` says otherwise) that lives in the host's namespace."""
    with inside(host):
        return socket.socket(family, kind, proto)


def flannel_peer_and_app(a: Host, b: Host) -> tuple[socket.socket, socket.socket]:
    """What flannel's C proxy has on b (one plain socket on :8285, raw IPv4 payloads), and an application
    socket on a's overlay address, port 7001."""
    peer = host_socket(b)
    peer.bind((str(b.underlay), 8285))
    peer.settimeout(5)
    app = host_socket(a)
    app.bind((str(a.overlay_ip), 7001))
    app.settimeout(5)
    return peer, app


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig(tag="pft") as r:
        for host in r.hosts:
            host.add_overlay_endpoint()
        yield r


class Tunnel:
    """flannel-tunnel on one host, with its stats readable on demand."""

    def __init__(self, host: Host, proc: subprocess.Popen[Any], stats_file: Path) -> None:
        self.host = host
        self.proc = proc
        self.stats_file = stats_file

    def stats(self) -> dict[str, Any]:
        """Ask the running tunnel for its counters (SIGUSR1) and return them."""
        self.stats_file.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not self.stats_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("flannel-tunnel did not write its stats")
            time.sleep(0.02)
        return dict(json.loads(self.stats_file.read_text()))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)

    def stop_and_log(self) -> list[str]:
        """Stop the tunnel (it must exit 0) and return its log messages; every line must be klog's."""
        assert self.stop() == 0 and self.proc.stderr is not None
        lines = str(self.proc.stderr.read()).splitlines()
        messages = [KLOG.fullmatch(line) for line in lines]
        assert all(messages), lines
        return [m.group(1) for m in messages if m]


def start_tunnel(host: Host, peers: list[Host], tmp_path: Path, *extra: str, env: dict[str, str] | None = None
                 ) -> Tunnel:
    """Start flannel-tunnel on host with the given peers and wait until flannel0 carries its route."""
    stats = tmp_path / f"{host.ns}.stats.json"
    argv = [TUNNEL, "--iface-ip", str(host.underlay), "--subnet", str(host.subnet), "--network", "10.244.0.0/16",
            "--stats-file", str(stats), *extra]
    for peer in peers:
        argv += ["--peer", f"{peer.subnet}={peer.underlay}"]
    proc = host.popen(*argv, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 15
    while "10.244.0.0/16 dev flannel0" not in host.run("ip", "route").stdout:
        if proc.poll() is not None:
            raise RuntimeError(f"flannel-tunnel exited: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError("flannel0 did not come up")
        time.sleep(0.05)
    return Tunnel(host, proc, stats)


@pytest.fixture
def tunnels(rig: Rig, tmp_path: Path) -> tuple[Tunnel, Tunnel]:
    """flannel-tunnel on both hosts of the rig, each the other's peer."""
    a, b = rig.hosts
    return start_tunnel(a, [b], tmp_path), start_tunnel(b, [a], tmp_path)
