"""Pump: owns the packet engine and its two threads, and is the control side's handle on the routes.

The engine threads are started as Python threads only to have something to join; each one immediately enters
the C loop with the GIL released and stays there until stop().
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Any

from dataplane._engine import Engine, PrefixTable
from dataplane.offload import Offloads
from dataplane.tun import TunDevice, configure_tun, open_tun
from dataplane.udp import enable_offloads, open_udp_socket

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
        offloads: Offloads,
        batch: int = DEFAULT_BATCH,
        check_source: bool = True,
    ) -> None:
        """`offloads` must be what the TUN and socket were actually set up with (dataplane.tun, dataplane.udp)."""
        self.tun = tun
        self.sock = sock
        self.routes = PrefixTable()
        self.offloads = offloads
        self._engine = Engine(
            tun.fd, sock.fileno(), self.routes, batch=batch, check_source=check_source,
            vnet_hdr=offloads.vnet_hdr, gso=offloads.gso, gro=offloads.gro, coalesce=offloads.coalesce,
        )
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    def start(self) -> None:
        for name, loop in (("pump-tx", self._engine.run_tx), ("pump-rx", self._engine.run_rx)):
            thread = threading.Thread(target=self._run, args=(loop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self, loop: Any) -> None:
        try:
            loop()
        except BaseException as exc:  # surfaced by stop(); a dead engine thread must not go unnoticed
            self._errors.append(exc)

    def stop(self) -> None:
        """Stop both threads and wait for them; re-raises (once) the first error a thread died with."""
        self._engine.stop()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def alive(self) -> bool:
        """Both engine threads are running (False before start(), after stop() or once one has died)."""
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def failure(self) -> str | None:
        """Why the engine is not forwarding, or None while it is."""
        if self.alive():
            return None
        return f"engine thread died: {self._errors[0]}" if self._errors else "engine not running"

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

    def stats(self) -> dict[str, Any]:
        """Engine counters (dataplane._engine.COUNTERS, DROPS) and the offloads still on (GSO and coalescing
        switch themselves off if the kernel refuses them at run time)."""
        return self._engine.stats()


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
            return Pump(tun, sock, offloads=offloads, batch=batch, check_source=check_source)
        except BaseException:
            tun.close()
            raise
    except BaseException:
        sock.close()
        raise
