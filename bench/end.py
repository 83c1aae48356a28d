"""The two ends of a benchmark path, and joining them as a mode does.

An end is one host's half: a LocalEnd works on a Host in this process's reach (a rig namespace, or this machine
under `flannel-bench --remote` and `flannel-bench agent`); bench.remote.RemoteEnd is the same end driven through
the agent over ssh. Measurements only ever talk to an End, so they run alike on a rig and across a real link.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pyflannel.bench import modes, nic
from pyflannel.bench.modes import Lease, ModeUnavailable, Tunnel
from pyflannel.bench.rig import Host, network, terminate
from pyflannel.daemon.config import Address, Network

CLK_TCK = os.sysconf("SC_CLK_TCK")
RR_PORT = 5202  # the request/response probe's, beside iperf3's 5201


class End(Protocol):
    """One host's half of a mode, and what a measurement asks of the host that serves it."""

    def prepare(self, mode: str) -> Lease: ...
    def connect(self, mode: str, peer: Lease) -> None: ...
    def serve(self, addr: Address, port: int) -> None: ...
    def engine_stats(self) -> dict[str, Any] | None: ...
    def busy_seconds(self) -> float: ...
    def reset(self) -> None: ...


class HostUnfit(Exception):
    """This machine cannot be a benchmark end as it is (the message says why)."""


class LocalEnd:
    """An end on a Host this process can reach; reset() removes whatever the end has set up so far."""

    def __init__(self, host: Host, files: Path) -> None:
        self.host = host
        self.files = files
        self.tunnel: Tunnel | None = None
        self._undo = ExitStack()

    @classmethod
    def this_host(cls, underlay: Address, subnet: Network, files: Path) -> LocalEnd:
        """This machine as an end, on the interface that holds `underlay` (either family, and subnet of the same);
        HostUnfit if it is not free for it."""
        links = json.loads(subprocess.run(["ip", "-j", "addr", "show"], check=True, capture_output=True,
                                          text=True).stdout)
        ifaces = [link["ifname"] for link in links for a in link.get("addr_info", [])
                  if a.get("local") and ipaddress.ip_address(a["local"]) == underlay]
        if not ifaces:
            raise HostUnfit(f"{underlay} is not an address of this host")
        taken = [link["ifname"] for link in links if link["ifname"] in ("flannel0", *modes.VTEPS)]
        overlay = network(subnet.version)
        routed = subprocess.run(["ip", f"-{subnet.version}", "route", "show", "root", str(overlay)], check=True,
                                capture_output=True, text=True).stdout.split()
        if taken or routed:
            what = taken[0] if taken else f"a route into {overlay} ({routed[0]})"
            raise HostUnfit(f"this host has {what} already (is flannel running?); the benchmark needs it free")
        return cls(Host("", underlay, subnet, iface=ifaces[0]), files)

    def describe(self) -> dict[str, Any]:
        """Machine and underlay NIC, for the report."""
        return {**nic.machine(), "underlay": nic.underlay(self.host)}

    def prepare(self, mode: str) -> Lease:
        return modes.prepare(mode, self.host, self._undo)

    def connect(self, mode: str, peer: Lease) -> None:
        self.tunnel = modes.connect(mode, self.host, peer, self._undo, self.files)

    def serve(self, addr: Address, port: int) -> None:
        """An iperf3 server on addr:port and the request/response probe's (bench.rr) on addr:RR_PORT until reset()
        or this process's end, however it ends; returns once both listen."""
        self._listen("iperf3", addr, port, "iperf3", "-s", "-p", str(port), "-B", str(addr))
        self._listen("request/response", addr, RR_PORT, sys.executable, "-m", "pyflannel.bench.rr", "serve", str(addr),
                     str(RR_PORT))

    def _listen(self, name: str, addr: Address, port: int, *argv: str) -> None:
        proc = self.host.popen(*argv, tied=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._undo.callback(terminate, proc)
        listening = f"{addr}:{port} " if addr.version == 4 else f"[{addr}]:{port} "   # as ss prints it
        deadline = time.monotonic() + 10
        while listening not in self.host.run("ss", "-ltnH").stdout:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ModeUnavailable(f"the {name} server did not start on {addr}:{port}")
            time.sleep(0.05)

    def engine_stats(self) -> dict[str, Any] | None:
        """The udp engine's counters now; None when the mode has no engine."""
        return self.tunnel.stats() if self.tunnel else None

    def busy_seconds(self) -> float:
        """CPU time spent not idle, all CPUs, whole machine (a rig's namespaces share the kernel and the cores)."""
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return (sum(fields[:8]) - idle) / CLK_TCK

    def reset(self) -> None:
        self.tunnel = None
        self._undo.close()


@dataclass(frozen=True)
class Endpoints:
    """Where measurement traffic flows: from the client end's address to the server end's.

    separate_machines: the two ends' busy_seconds count different CPUs (real hosts), so CPU is per end."""

    client: LocalEnd
    client_addr: Address
    server: End
    server_addr: Address
    separate_machines: bool = False


def join(mode: str, client: LocalEnd, server: End, *, separate_machines: bool = False) -> Endpoints:
    """Both halves of the mode, in flanneld's order: each host prepares, then each connects to the other's lease."""
    mine, theirs = client.prepare(mode), server.prepare(mode)
    client.connect(mode, theirs)
    server.connect(mode, mine)
    if modes.backend(mode) == "none":
        return Endpoints(client, mine.public_ip, server, theirs.public_ip, separate_machines)
    return Endpoints(client, mine.overlay_ip, server, theirs.overlay_ip, separate_machines)
