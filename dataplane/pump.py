"""Pump: owns the packet engines and their threads, and is the control side's handle on the routes.

One engine per queue: a TX and an RX thread on that queue's TUN fd and UDP socket, all reading one prefix table
(each thread through its own reader slot). The kernel keeps each flow on one queue (dataplane.tun, dataplane.udp),
so the engines never share a flow and need nothing from each other but the table and the ICMP rate limit.

The engine threads are started as Python threads only to have something to join; each one immediately enters
the C loop with the GIL released and stays there until stop(), or until its TUN or socket is gone: then it
returns on its own and failure() says why (a dead fd never makes a thread spin).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Iterable
from typing import Any

from pyroute2 import IPRoute

from pyflannel.dataplane._engine import COUNTERS, MAX_QUEUES, Engine, PrefixTable
from pyflannel.dataplane.offload import Offloads
from pyflannel.dataplane.tun import TunDevice, configure_tun, ensure_configured, open_tun
from pyflannel.dataplane.udp import enable_offloads, open_udp_sockets

DEFAULT_PORT = 8285
DEFAULT_BATCH = 64
QUEUES_CAP = 4  # the default number of queues is one per online CPU, up to this many


def default_queues() -> int:
    """One queue per online CPU, at most QUEUES_CAP."""
    return max(1, min(int(os.sysconf("SC_NPROCESSORS_ONLN")), QUEUES_CAP, MAX_QUEUES))


class Pump:
    """Moves packets between a TUN device and UDP sockets (one per TUN queue); routes map overlay subnets to peers.

    It owns them: close() stops the engines and closes them, which removes the TUN device."""

    def __init__(
        self,
        tun: TunDevice,
        socks: list[socket.socket],
        *,
        subnet: ipaddress.IPv4Network,
        network: ipaddress.IPv4Network,
        offloads: Offloads,
        batch: int = DEFAULT_BATCH,
        check_source: bool = True,
    ) -> None:
        """`offloads` must be what the TUN and socket were actually set up with (dataplane.tun, dataplane.udp).
        With check_source, packets that local processes write into flannel0 with an inner source outside this
        node's `subnet` (which holds flannel0's address) are dropped (tx_spoofed_source), as the far end would."""
        if len(socks) != len(tun.queues):
            raise ValueError(f"{len(tun.queues)} TUN queues but {len(socks)} sockets")
        self.tun = tun
        self.socks = socks
        self.subnet = subnet
        self.network = network
        self.routes = PrefixTable()
        self.offloads = offloads
        self._engines: list[Engine] = []
        for queue, (fd, sock) in enumerate(zip(tun.fds, socks, strict=True)):
            self._engines.append(Engine(
                fd, sock.fileno(), self.routes, batch=batch, check_source=check_source, local_subnet=str(subnet),
                vnet_hdr=offloads.vnet_hdr, gso=offloads.gso, gro=offloads.gro, coalesce=offloads.coalesce,
                uso=offloads.uso, queue=queue, icmp_shared_with=self._engines[0] if self._engines else None,
            ))
        self._threads: list[threading.Thread] = []

    @property
    def queues(self) -> int:
        return len(self._engines)

    def start(self) -> None:
        """Start every engine thread, then route the network into the TUN: only now is someone reading it, and
        the routes set so far are already in the table (blocking netlink: call it from a worker thread)."""
        for queue, engine in enumerate(self._engines):
            suffix = f"-{queue}" if self.queues > 1 else ""
            for name, loop in ((f"pump-tx{suffix}", engine.run_tx), (f"pump-rx{suffix}", engine.run_rx)):
                thread = threading.Thread(target=loop, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)
        with IPRoute() as ipr:
            ensure_configured(ipr, ipr.link_lookup(ifname=self.tun.name)[0], subnet=self.subnet, network=self.network)

    def alive(self) -> bool:
        """Every engine thread is running."""
        return len(self._threads) == 2 * self.queues and all(thread.is_alive() for thread in self._threads)

    def failure(self) -> str | None:
        """None while healthy; once an engine thread has stopped on its own, one line saying which and why,
        e.g. "flannel0: TX stopped: File descriptor in bad state (EBADFD)" after `ip link del flannel0` (with
        several queues, "flannel0: TX of queue 1 stopped: ..."), the first queue's that failed."""
        for queue, engine in enumerate(self._engines):
            failed = engine.failure()
            if failed is not None:
                side, err = failed
                which = f"{side} of queue {queue}" if self.queues > 1 else side
                return f"{self.tun.name}: {which} stopped: {os.strerror(err)} ({errno.errorcode.get(err, err)})"
        return None

    def stop(self) -> None:
        """Stop every thread and wait for them; also fine after a thread stopped on its own (see failure())."""
        for engine in self._engines:
            engine.stop()
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def close(self) -> None:
        """Stop (if running) and release the TUN device and the sockets."""
        try:
            self.stop()
        finally:
            self.tun.close()
            for sock in self.socks:
                sock.close()

    def set_route(self, subnet: str, peer: str, port: int = DEFAULT_PORT) -> None:
        """Send traffic for subnet to peer:port (add or replace)."""
        self.routes.set(subnet, peer, port)

    def del_route(self, subnet: str) -> None:
        """Forget the route for exactly this subnet; KeyError if there is none."""
        self.routes.delete(subnet)

    def update_routes(self, set: Iterable[tuple[str, str, int]] = (), delete: Iterable[str] = ()) -> None:
        """Forget the `delete` subnets, then add or replace the `set` (subnet, peer, port) routes, all published
        to the engine at once (one batch of lease events, or every peer at startup); changes nothing on an error."""
        self.routes.update(set=set, delete=delete)

    def stats(self) -> dict[str, Any]:
        """Engine counters (dataplane._engine.COUNTERS, DROPS) summed over the queues, and per queue under
        "queues" (a list, in queue order); every offload in use: tso and uso as the TUN accepted them, the others
        as still on in every queue (GSO and coalescing switch themselves off in a queue whose send or write the
        kernel refuses at run time); per peer under "peers" (one table, counted by all queues)."""
        queues = [engine.stats() for engine in self._engines]
        out: dict[str, Any] = {name: sum(q[name] for q in queues) for name in COUNTERS}
        out["drops"] = {reason: sum(q["drops"][reason] for q in queues) for reason in queues[0]["drops"]}
        out["offloads"] = {"tso": self.offloads.tso, "uso": self.offloads.uso,
                           **{name: all(q["offloads"][name] for q in queues) for name in queues[0]["offloads"]}}
        out["peers"] = queues[0]["peers"]
        out["queues"] = [{name: q[name] for name in COUNTERS} | {"drops": q["drops"]} for q in queues]
        return out


def open_pump(*, iface_ip: ipaddress.IPv4Address, port: int, tun_name: str, subnet: ipaddress.IPv4Network,
              network: ipaddress.IPv4Network, mtu: int, wanted: Offloads, batch: int = DEFAULT_BATCH,
              check_source: bool = True, queues: int = 1) -> Pump:
    """The udp dataplane as flannel's udp backend sets it up: the socket bound to iface_ip:port, the TUN device
    configured for subnet, network and mtu, and the offloads both accept out of `wanted`; with several queues,
    that many TUN queues and sockets. Not started yet; DataplaneError (nothing left open) if the host refuses
    any step."""
    socks = open_udp_sockets(iface_ip, port, queues)
    try:
        tun = open_tun(tun_name, wanted, queues)
        try:
            configure_tun(tun, subnet=subnet, network=network, mtu=mtu)
            offloads = tun.offloads
            for sock in socks:
                offloads = enable_offloads(sock, offloads)
            return Pump(tun, socks, subnet=subnet, network=network, offloads=offloads, batch=batch,
                        check_source=check_source)
        except BaseException:
            tun.close()
            raise
    except BaseException:
        for sock in socks:
            sock.close()
        raise
