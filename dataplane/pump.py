"""Pump: owns the packet engine and its two threads, and is the control side's handle on the routes.

Dual stack: the overlay may have an IPv4 subnet, an IPv6 one (subnet6/network6), or both, and the underlay an
IPv4 socket, an IPv6 one, or both; routes of either family may lead to peers of either family (the wire format
stays flannel's: the raw inner packet is the UDP payload, whatever the families).

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
from pyflannel.dataplane.errors import DataplaneError
from pyflannel.dataplane.offload import Offloads
from pyflannel.dataplane.tun import Network, TunDevice, configure_tun, ensure_configured, open_tun, present
from pyflannel.dataplane.udp import enable_offloads, open_udp_socket

DEFAULT_PORT = 8285
DEFAULT_BATCH = 64
IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address


class Pump:
    """Moves packets between a TUN device and the UDP sockets; routes map overlay subnets to peers.

    It owns them: close() stops the engine and closes them, which removes the TUN device."""

    def __init__(
        self,
        tun: TunDevice,
        sock: socket.socket | None,
        *,
        subnet: ipaddress.IPv4Network | None,
        network: ipaddress.IPv4Network | None,
        offloads: Offloads,
        batch: int = DEFAULT_BATCH,
        check_source: bool = True,
        sock6: socket.socket | None = None,
        subnet6: ipaddress.IPv6Network | None = None,
        network6: ipaddress.IPv6Network | None = None,
    ) -> None:
        """`offloads` must be what the TUN and sockets were actually set up with (dataplane.tun, dataplane.udp);
        `sock` is the IPv4 underlay socket and `sock6` the IPv6 one (at least one). With check_source, packets
        that local processes write into flannel0 with an inner source outside this node's `subnet` or `subnet6`
        (which hold flannel0's addresses) are dropped (tx_spoofed_source), as the far end would."""
        self.tun = tun
        self.sock = sock
        self.sock6 = sock6
        self.subnet = subnet
        self.network = network
        self.subnet6 = subnet6
        self.network6 = network6
        self.routes = PrefixTable()
        self.offloads = offloads
        self._engine = Engine(
            tun.fd, -1 if sock is None else sock.fileno(), self.routes, batch=batch, check_source=check_source,
            local_subnet=None if subnet is None else str(subnet), vnet_hdr=offloads.vnet_hdr, gso=offloads.gso,
            gro=offloads.gro, coalesce=offloads.coalesce, sock6_fd=-1 if sock6 is None else sock6.fileno(),
            local_subnet6=None if subnet6 is None else str(subnet6),
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
            ensure_configured(ipr, ipr.link_lookup(ifname=self.tun.name)[0], subnets=self.subnets,
                              networks=self.networks)

    @property
    def subnets(self) -> list[Network]:
        """This node's overlay subnets (flannel0's addresses), IPv4 first."""
        return present(self.subnet, self.subnet6)

    @property
    def networks(self) -> list[Network]:
        """The overlay networks routed into flannel0, IPv4 first."""
        return present(self.network, self.network6)

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
        """Stop (if running) and release the TUN device and the sockets."""
        try:
            self.stop()
        finally:
            self.tun.close()
            for sock in (self.sock, self.sock6):
                if sock is not None:
                    sock.close()

    def set_route(self, subnet: str, peer: str, port: int = DEFAULT_PORT) -> None:
        """Send traffic for subnet (IPv4 or IPv6) to peer:port (add or replace; the peer IPv4 or IPv6)."""
        self.update_routes(set=[(subnet, peer, port)])

    def del_route(self, subnet: str) -> None:
        """Forget the route for exactly this subnet; KeyError if there is none."""
        self.routes.delete(subnet)

    def update_routes(self, set: Iterable[tuple[str, str, int]] = (), delete: Iterable[str] = ()) -> None:
        """Forget the `delete` subnets, then add or replace the `set` (subnet, peer, port) routes, all published
        to the engine at once (one batch of lease events, or every peer at startup); changes nothing on an error
        (ValueError also for a peer of a family this pump has no underlay socket for)."""
        routes = list(set)
        for _, peer, _ in routes:
            if ipaddress.ip_address(peer).version == 6 and self.sock6 is None:
                raise ValueError(f"peer {peer}: no IPv6 underlay socket (open_pump's iface_ip6)")
            if ipaddress.ip_address(peer).version == 4 and self.sock is None:
                raise ValueError(f"peer {peer}: no IPv4 underlay socket (open_pump's iface_ip)")
        self.routes.update(set=routes, delete=delete)

    def stats(self) -> dict[str, Any]:
        """Engine counters (dataplane._engine.COUNTERS, DROPS) and every offload in use: tso and uso as the TUN
        accepted them, the others as still on (GSO and coalescing switch themselves off if the kernel refuses
        them at run time)."""
        out = self._engine.stats()
        out["offloads"] = {"tso": self.offloads.tso, "tso6": self.offloads.tso6, "uso": self.offloads.uso,
                           **out["offloads"]}
        return out


def open_pump(*, iface_ip: IPv4 | None, port: int, tun_name: str, subnet: ipaddress.IPv4Network | None,
              network: ipaddress.IPv4Network | None, mtu: int, wanted: Offloads, batch: int = DEFAULT_BATCH,
              check_source: bool = True, iface_ip6: IPv6 | None = None, subnet6: ipaddress.IPv6Network | None = None,
              network6: ipaddress.IPv6Network | None = None) -> Pump:
    """The udp dataplane as flannel's udp backend sets it up: a socket bound to iface_ip:port and/or one bound to
    iface_ip6:port (the underlay families), the TUN device configured for subnet/network and/or subnet6/network6
    (the overlay families) and mtu, and the offloads all accept out of `wanted`. Not started yet; DataplaneError
    (nothing left open) if the host refuses any step or nothing is given of either pair."""
    if iface_ip is None and iface_ip6 is None:
        raise DataplaneError("no underlay address: give an IPv4 or an IPv6 one")
    if (subnet is None) != (network is None) or (subnet6 is None) != (network6 is None) or not (subnet or subnet6):
        raise DataplaneError("each overlay family needs both its subnet and its network, and one family is needed")
    opened: list[socket.socket] = []
    try:
        sock = None if iface_ip is None else _keep(opened, open_udp_socket(iface_ip, port))
        sock6 = None if iface_ip6 is None else _keep(opened, open_udp_socket(iface_ip6, port))
        tun = open_tun(tun_name, wanted)
        try:
            configure_tun(tun, subnets=present(subnet, subnet6), networks=present(network, network6), mtu=mtu)
            offloads = tun.offloads
            for s in opened:
                offloads = enable_offloads(s, offloads)
            return Pump(tun, sock, subnet=subnet, network=network, offloads=offloads, batch=batch,
                        check_source=check_source, sock6=sock6, subnet6=subnet6, network6=network6)
        except BaseException:
            tun.close()
            raise
    except BaseException:
        for s in opened:
            s.close()
        raise


def _keep(opened: list[socket.socket], sock: socket.socket) -> socket.socket:
    opened.append(sock)
    return sock
