"""The udp backend: flannel0 and the pyflannel packet engine (flannel pkg/backend/udp).

Design notes. As flannel: lease attributes are only PublicIP; the TUN is named by the kernel from `flannel%d`
(normally flannel0), with the lease's network address as a /32, MTU = external MTU - 28 and a route for the whole
network; the UDP socket is bound to the external interface's address on Backend.Port (default 8285), and every
node must use the same port because leases do not carry it; BackendType is not checked on peers' leases. Ours:
the engine batches and uses kernel offloads (PYFLANNEL_OFFLOAD=off turns them off, PYFLANNEL_DISABLE_OFFLOADS
single ones, see dataplane.offload), and it checks that packets come from the peer owning their source subnet.
A dataplane.keeper.Keeper owns the engine: a batch of lease events is one route-table update, and every second
the keeper repairs flannel0 (deleted, set down, its address or route removed) or a dead engine, with every
route; /healthz reports what it could not repair.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from pyflannel.daemon.backend.base import Context, Idle
from pyflannel.daemon.errors import FlannelError
from pyflannel.daemon.lease import Event, EventType, Lease, LeaseAttrs
from pyflannel.dataplane import offload
from pyflannel.dataplane.errors import DataplaneError
from pyflannel.dataplane.keeper import Keeper, PumpSpec
from pyflannel.dataplane.pump import DEFAULT_PORT
from pyflannel.dataplane.tun import ENCAP_OVERHEAD

log = logging.getLogger(__name__)
CHECK_SECONDS = 1.0


class UdpNetwork(Idle):
    def __init__(self, lease: Lease, mtu: int, keeper: Keeper, port: int) -> None:
        self.lease = lease
        self.mtu = mtu
        self.keeper = keeper
        self.port = port

    def handle(self, events: list[Event]) -> None:
        """One batch of lease events, one table update."""
        added = {str(e.lease.subnet): (str(e.lease.attrs.public_ip), self.port)
                 for e in events if e.type is EventType.ADDED}
        removed = [str(e.lease.subnet) for e in events if e.type is EventType.REMOVED]
        for subnet, (peer, port) in added.items():
            log.info("route %s -> %s:%d", subnet, peer, port)
        _, gone = self.keeper.update(set=added, delete=removed)
        if gone:
            log.info("%d route(s) removed", gone)

    async def run(self) -> None:
        """Keep flannel0 and the engine alive (dataplane.keeper): a failed repair is logged and tried again."""
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            try:
                await asyncio.to_thread(self.keeper.check)
            except DataplaneError as exc:
                log.error("%s", exc)

    def close(self) -> None:
        self.keeper.close()

    def failure(self) -> str | None:
        return self.keeper.failure

    def engine_stats(self) -> dict[str, Any] | None:
        return self.keeper.stats()


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
    keeper = Keeper(PumpSpec(iface_ip=ctx.ext.addr, port=port, tun_name="flannel%d", subnet=lease.subnet,
                             network=ctx.config.network, mtu=mtu,
                             wanted=offload.wanted(os.environ.get("PYFLANNEL_OFFLOAD", "auto"))))
    pump = keeper.start()
    log.info("%s up: mtu %d, udp %s:%d, offloads: %s", pump.tun.name, mtu, ctx.ext.addr, port,
             pump.offloads.describe())
    return UdpNetwork(lease, mtu, keeper, port)
