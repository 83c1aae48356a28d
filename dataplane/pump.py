"""Pump: owns the packet engine and its two threads, and is the control side's handle on the routes.

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

from pyflannel.dataplane._engine import Engine, PrefixTable
from pyflannel.dataplane.offload import Offloads
from pyflannel.dataplane.tun import TunDevice, configure_tun, ensure_configured, open_tun
from pyflannel.dataplane.udp import enable_offloads, open_udp_socket

DEFAULT_PORT = 8285
DEFAULT_BATCH = 64


class Pump:
    """Moves packets between a TUN device and a UDP socket; routes map overlay subnets to peers.

    It owns both: close() stops the engine and closes them, which removes the TUN device."""

    def __init__(
        self,
        tun: TunDevice,
        sock: socket.socket,
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
        self.tun = tun
        self.sock = sock
        self.subnet = subnet
        self.network = network
        self.routes = PrefixTable()
        self.offloads = offloads
        self._engine = Engine(
            tun.fd, sock.fileno(), self.routes, batch=batch, check_source=check_source, local_subnet=str(subnet),
            vnet_hdr=offloads.vnet_hdr, gso=offloads.gso, gro=offloads.gro, coalesce=offloads.coalesce,
        )
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start both engine threads, then route the network into the TUN: only now is someone reading it, and
        the routes set so far are already in the table (blocking netlink: call it from a worker thread)."""
        for name, loop in (("pump-tx", self._engine.run_tx), ("pump-rx", self._engine.run_rx)):
            thread = threading.Thread(target=loop, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        with IPRoute() as ipr:
            ensure_configured(ipr, ipr.link_lookup(ifname=self.tun.name)[0], subnet=self.subnet, network=self.network)

    def alive(self) -> bool:
        """Both engine threads are running."""
        return len(self._threads) == 2 and all(thread.is_alive() for thread in self._threads)

    def failure(self) -> str | None:
        """None while healthy; once an engine thread has stopped on its own, one line saying which and why,
        e.g. "flannel0: TX stopped: File descriptor in bad state (EBADFD)" after `ip link del flannel0`."""
        failed = self._engine.failure()
        if failed is None:
            return None
        side, err = failed
        return f"{self.tun.name}: {side} stopped: {os.strerror(err)} ({errno.errorcode.get(err, err)})"

    def stop(self) -> None:
        """Stop both threads and wait for them; also fine after a thread stopped on its own (see failure())."""
        self._engine.stop()
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def close(self) -> None:
        """Stop (if running) and release the TUN device and the socket."""
        try:
            self.stop()
        finally:
            self.tun.close()
            self.sock.close()

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
        """Engine counters (dataplane._engine.COUNTERS, DROPS) and every offload in use: tso and uso as the TUN
        accepted them, the others as still on (GSO and coalescing switch themselves off if the kernel refuses
        them at run time)."""
        out = self._engine.stats()
        out["offloads"] = {"tso": self.offloads.tso, "uso": self.offloads.uso, **out["offloads"]}
        return out


def open_pump(*, iface_ip: ipaddress.IPv4Address, port: int, tun_name: str, subnet: ipaddress.IPv4Network,
              network: ipaddress.IPv4Network, mtu: int, wanted: Offloads, batch: int = DEFAULT_BATCH,
              check_source: bool = True) -> Pump:
    """The udp dataplane as flannel's udp backend sets it up: the socket bound to iface_ip:port, the TUN device
    configured for subnet, network and mtu, and the offloads both accept out of `wanted`. Not started yet;
    DataplaneError (nothing left open) if the host refuses any step."""
    sock = open_udp_socket(iface_ip, port)
    try:
        tun = open_tun(tun_name, wanted)
        try:
            configure_tun(tun, subnet=subnet, network=network, mtu=mtu)
            offloads = enable_offloads(sock, tun.offloads)
            return Pump(tun, sock, subnet=subnet, network=network, offloads=offloads, batch=batch,
                        check_source=check_source)
        except BaseException:
            tun.close()
            raise
    except BaseException:
        sock.close()
        raise
