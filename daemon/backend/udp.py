"""The udp backend: flannel0 and the pyflannel packet engine (flannel pkg/backend/udp).

Design notes. As flannel: lease attributes are only PublicIP; the TUN is named by the kernel from `flannel%d`
(normally flannel0), with the lease's network address as a /32, MTU = external MTU - 28 and a route for the whole
network; the UDP socket is bound to the external interface's address on Backend.Port (default 8285), and every
node must use the same port because leases do not carry it; BackendType is not checked on peers' leases. Ours:
the engine batches and uses kernel offloads (PYFLANNEL_OFFLOAD=off turns them off, PYFLANNEL_DISABLE_OFFLOADS
single ones, see dataplane.offload), and it checks that packets come from the peer owning their source subnet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from daemon.backend.base import Context, Idle
from daemon.errors import FlannelError
from daemon.lease import Event, EventType, Lease, LeaseAttrs
from dataplane import offload
from dataplane.errors import DataplaneError
from dataplane.pump import DEFAULT_PORT, Pump, open_pump
from dataplane.tun import ENCAP_OVERHEAD

log = logging.getLogger(__name__)


class UdpNetwork(Idle):
    def __init__(self, lease: Lease, mtu: int, pump: Pump, port: int) -> None:
        self.lease = lease
        self.mtu = mtu
        self.pump = pump
        self.port = port

    def handle(self, events: list[Event]) -> None:
        for event in events:
            subnet = str(event.lease.subnet)
            if event.type is EventType.ADDED:
                log.info("route %s -> %s:%d", subnet, event.lease.attrs.public_ip, self.port)
                self.pump.set_route(subnet, str(event.lease.attrs.public_ip), self.port)
            elif subnet in self.pump.routes:
                log.info("route %s removed", subnet)
                self.pump.del_route(subnet)

    def close(self) -> None:
        self.pump.close()

    def failure(self) -> str | None:
        try:
            socket.if_nametoindex(self.pump.tun.name)
        except OSError:
            return f"{self.pump.tun.name} is gone"
        return None

    def metrics(self) -> dict[str, float]:
        stats = self.pump.stats()
        out: dict[str, float] = {}
        for direction in ("tx", "rx"):
            out[f'pyflannel_packets_total{{direction="{direction}"}}'] = stats[f"{direction}_packets"]
            out[f'pyflannel_bytes_total{{direction="{direction}"}}'] = stats[f"{direction}_bytes"]
        for reason, n in stats["drops"].items():
            out[f'pyflannel_drops_total{{reason="{reason}"}}'] = n
        for peer, counts in stats["peers"].items():
            for direction in ("tx", "rx"):
                labels = f'peer="{peer}",direction="{direction}"'
                out[f"pyflannel_peer_packets_total{{{labels}}}"] = counts[f"{direction}_packets"]
                out[f"pyflannel_peer_bytes_total{{{labels}}}"] = counts[f"{direction}_bytes"]
        return out


async def register(ctx: Context) -> UdpNetwork:
    lease = await ctx.acquire(LeaseAttrs(public_ip=ctx.ext.public_ip))
    try:
        return await asyncio.to_thread(_start, ctx, lease)
    except DataplaneError as exc:  # port in use, no /dev/net/tun, ...: the user's to fix, one line
        raise FlannelError(str(exc)) from None


def _start(ctx: Context, lease: Lease) -> UdpNetwork:
    """flannel0, the socket and the engine threads (blocking netlink calls: run in a worker thread)."""
    port = int(ctx.config.backend_option("port", DEFAULT_PORT))
    mtu = ctx.ext.mtu - ENCAP_OVERHEAD
    pump = open_pump(iface_ip=ctx.ext.addr, port=port, tun_name="flannel%d", subnet=lease.subnet,
                     network=ctx.config.network, mtu=mtu,
                     wanted=offload.wanted(os.environ.get("PYFLANNEL_OFFLOAD", "auto")))
    pump.start()
    log.info("%s up: mtu %d, udp %s:%d, offloads: %s", pump.tun.name, mtu, ctx.ext.addr, port,
             pump.offloads.describe())
    return UdpNetwork(lease, mtu, pump, port)
