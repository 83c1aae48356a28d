"""Test hosts in network namespaces: the rig every integration test and the benchmark run on.

Each host is a namespace with a veth into a shared underlay (198.18.0.0/15, RFC 2544 benchmarking space) and an
overlay subnet out of 10.244.0.0/16; or, in an IPv6 rig, an underlay from 2001:2::/48 (RFC 5180 benchmarking
space) and a /64 out of fd00:10:244::/48, as a flannel IPv6 network leases them. Nothing is created in the root
namespace: the veth pair is made inside the first host with its peer end placed straight into the second.
Leaving the `with` block (normally, on an exception or on Ctrl-C) kills every process started through the rig
and deletes the namespaces, which takes their interfaces, routes and rules with them.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute, netns

from pyflannel.daemon.backend.vxlan_device import IFA_F_NODAD
from pyflannel.daemon.config import Address, Network

NETWORK = ipaddress.IPv4Network("10.244.0.0/16")
UNDERLAY = ipaddress.IPv4Network("198.18.0.0/24")  # room for the 200 hosts a rig may have
NETWORK6 = ipaddress.IPv6Network("fd00:10:244::/48")
UNDERLAY6 = ipaddress.IPv6Network("2001:2::/64")


def network(version: int) -> Network:
    """The whole overlay network of a family: what every host's subnet is part of."""
    return NETWORK if version == 4 else NETWORK6


def endpoint(subnet: Network) -> Address:
    """The address a pod-side test endpoint uses in a subnet: its first host (as on cni0)."""
    return subnet.network_address + 1


def host_subnet(version: int, i: int) -> Network:
    """The i-th host's overlay subnet (from 1): 10.244.i.0/24, or fd00:10:244:i::/64 (i in hex, as flannel
    spells it)."""
    if version == 4:
        return ipaddress.IPv4Network(f"10.244.{i}.0/24")
    return ipaddress.IPv6Network((int(NETWORK6.network_address) + (i << 64), 64))


@dataclass
class Host:
    """One test host: a namespace, its underlay address and its overlay subnet.

    An empty `ns` is the namespace this process runs in: the real host under `flannel-bench --remote`, where
    iface names the interface holding the underlay address.
    """

    ns: str
    underlay: Address
    subnet: Network
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    iface: str = "eth0"

    @property
    def overlay_ip(self) -> Address:
        """The address a pod-side test endpoint uses: the first host of the subnet (as on cni0)."""
        return endpoint(self.subnet)

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd] if self.ns else list(cmd)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command inside the host and wait for it."""
        return subprocess.run(self.argv(cmd), check=check, timeout=timeout, text=True, capture_output=True, **kw)

    def popen(self, *cmd: str, tied: bool = False, **kw: Any) -> subprocess.Popen[Any]:
        """Start a command inside the host; the rig kills it on exit if it is still running. `tied`: the kernel
        also sends it SIGTERM when the calling thread ends, even by SIGKILL (setpriv --pdeathsig; the parent
        death signal follows the thread, so only a main thread's children may be tied)."""
        argv = self.argv(cmd)
        proc = subprocess.Popen(["setpriv", "--pdeathsig", "TERM", *argv] if tied else argv, **kw)
        self.procs.append(proc)
        return proc

    def ipr(self) -> IPRoute:
        return IPRoute(netns=self.ns) if self.ns else IPRoute()

    def add_overlay_endpoint(self) -> None:
        """Put overlay_ip on lo, standing in for the pods behind this host's subnet.

        lo rather than a dummy device: the kernels these tests run on may be built without the dummy driver.
        """
        with self.ipr() as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=str(self.overlay_ip),
                     prefixlen=self.overlay_ip.max_prefixlen)

    def remove_overlay_endpoint(self) -> None:
        with self.ipr() as ipr:
            ipr.addr("del", index=ipr.link_lookup(ifname="lo")[0], address=str(self.overlay_ip),
                     prefixlen=self.overlay_ip.max_prefixlen)


class RigError(Exception):
    """The rig cannot be built as asked (the message says why, in the user's terms)."""


class Rig:
    """Hosts on one underlay: two joined by a veth, or more joined by a bridge in a namespace of its own.

    version 6 gives every host an IPv6 underlay address and subnet instead of IPv4 ones (an IPv6-only network)."""

    def __init__(self, hosts: int = 2, *, mtu: int = 1500, netem: str | None = None, tag: str = "pf",
                 version: int = 4) -> None:
        if not 2 <= hosts <= 200:
            raise ValueError("a rig has 2 to 200 hosts")
        self.prefix = f"{tag}-{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{self.prefix}-sw"
        self.extra: list[str] = []
        self.mtu = mtu
        self.netem = netem
        self.files = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))   # what the hosts' programs write; goes too
        self.underlay = UNDERLAY if version == 4 else UNDERLAY6
        self.hosts = [Host(f"{self.prefix}-h{i}", self.underlay.network_address + i + 1, host_subnet(version, i + 1))
                      for i in range(hosts)]

    def __enter__(self) -> Rig:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _build(self) -> None:
        for host in self.hosts:
            netns.create(host.ns)
        if len(self.hosts) == 2:
            a, b = self.hosts
            with a.ipr() as ipr:
                ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": b.ns})
        else:
            self._build_switch()
        for host in self.hosts:
            with host.ipr() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                index = ipr.link_lookup(ifname="eth0")[0]
                # no duplicate address detection: an IPv6 address is usable at once (nobody else can hold it)
                ipr.addr("add", index=index, address=str(host.underlay), prefixlen=self.underlay.prefixlen,
                         flags=IFA_F_NODAD)
                ipr.link("set", index=index, mtu=self.mtu, state="up")
            if self.netem:
                _shape(host, self.netem)

    def _build_switch(self) -> None:
        """A bridge in its own namespace, with one veth port per host (eth0 on the host's side)."""
        netns.create(self.switch)
        with IPRoute(netns=self.switch) as sw:
            sw.link("add", ifname="br0", kind="bridge")
            bridge = sw.link_lookup(ifname="br0")[0]
            sw.link("set", index=bridge, mtu=self.mtu, state="up")
            for i, host in enumerate(self.hosts):
                sw.link("add", ifname=f"p{i}", kind="veth", peer={"ifname": "eth0", "net_ns_fd": host.ns})
                port = sw.link_lookup(ifname=f"p{i}")[0]
                sw.link("set", index=port, master=bridge, mtu=self.mtu, state="up")

    def add_namespace(self, name: str) -> Host:
        """A bare namespace (lo up) that goes with the rig, for a pod or a server: no underlay, no subnet."""
        ns = f"{self.prefix}-{name}"
        netns.create(ns)
        self.extra.append(ns)
        host = Host(ns, ipaddress.IPv4Address(0), ipaddress.IPv4Network("0.0.0.0/32"))
        with host.ipr() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return host

    def close(self) -> None:
        """Kill what the rig started and delete its namespaces; safe to call twice."""
        for host in self.hosts:
            for proc in host.procs:
                terminate(proc)
            host.procs.clear()
        for ns in [host.ns for host in self.hosts] + [self.switch, *self.extra]:
            if ns in netns.listnetns():
                netns.remove(ns)
        shutil.rmtree(self.files, ignore_errors=True)


def _shape(host: Host, netem: str) -> None:
    tc = host.run("tc", "qdisc", "add", "dev", "eth0", "root", "netem", *netem.split(), check=False)
    if tc.returncode:
        lines = (tc.stderr or tc.stdout).strip().splitlines()
        raise RigError(f"--netem {netem!r}: tc says: {lines[0] if lines else f'exit {tc.returncode}'}")


def terminate(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM, so that it can remove what it created; SIGKILL if it has not gone after grace seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def leftover_namespaces(tag: str) -> list[str]:
    """Namespaces whose names start with tag- (what a finished rig must not leave behind)."""
    return [name for name in netns.listnetns() if name.startswith(f"{tag}-")]
