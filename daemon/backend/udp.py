"""The udp backend: flannel0 and the pyflannel packet engine (flannel pkg/backend/udp).

Design notes. As flannel: lease attributes are only PublicIP; the TUN is named by the kernel from `flannel%d`
(normally flannel0), with the lease's network address as a /32, MTU = external MTU - 28 and a route for the whole
network; the UDP socket is bound to the external interface's address on Backend.Port (default 8285), and every
node must use the same port because leases do not carry it; BackendType is not checked on peers' leases. Ours:
the engine batches and uses kernel offloads (PYFLANNEL_OFFLOAD=off turns them off, PYFLANNEL_DISABLE_OFFLOADS
single ones, see dataplane.offload), runs one TX/RX thread pair per TUN queue (PYFLANNEL_UDP_QUEUES, default one
per online CPU up to 4: a host setting, so not a flag of flannel's), and it checks that packets come from the
peer owning their source subnet.
A dataplane.keeper.Keeper owns the engine: a batch of lease events is one route-table update, and every second
the keeper repairs flannel0 (deleted, set down, its address or route removed) or a dead engine, with every
route; /healthz reports what it could not repair.

IPv6 (EnableIPv6) is refused with one line until the engine carries it: flannel's udp backend never did. The
event handling is already per family (Lease.routes: each subnet with the peer's address of that family); wiring
it needs the engine to take an IPv6 subnet and network at open (open_pump(subnet6=..., network6=...), flannel0
getting the IPv6 /128 and the IPv6 network route) and IPv6 subnets with IPv6 peer addresses in its route table
(Keeper.update), over a socket bound to the interface's address of each family.
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
from pyflannel.dataplane._engine import MAX_QUEUES
from pyflannel.dataplane.errors import DataplaneError
from pyflannel.dataplane.keeper import Keeper, PumpSpec
from pyflannel.dataplane.pump import DEFAULT_PORT, default_queues
from pyflannel.dataplane.tun import ENCAP_OVERHEAD

log = logging.getLogger(__name__)
CHECK_SECONDS = 1.0
ENV_QUEUES = "PYFLANNEL_UDP_QUEUES"


class UdpNetwork(Idle):
    def __init__(self, lease: Lease, mtu: int, keeper: Keeper, port: int) -> None:
        self.lease = lease
        self.mtu = mtu
        self.keeper = keeper
        self.port = port

    def handle(self, events: list[Event]) -> None:
        """One batch of lease events, one table update."""
        added = {str(subnet): (str(peer), self.port)
                 for e in events if e.type is EventType.ADDED for subnet, peer in e.lease.routes()}
        removed = [str(subnet) for e in events if e.type is EventType.REMOVED for subnet in e.lease.subnets()]
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
    pool, addr = ctx.config.ipv4, ctx.ext.addr
    if ctx.config.ipv6 is not None or pool is None or addr is None:
        raise FlannelError("the udp backend does not carry IPv6 yet (EnableIPv6 is set): use vxlan or host-gw "
                           "for a network with IPv6")
    lease = await ctx.acquire(LeaseAttrs(public_ip=ctx.ext.public_ip))
    if lease.subnet is None:
        raise FlannelError(f"lease {lease} has no IPv4 subnet")
    spec = PumpSpec(iface_ip=addr, port=int(ctx.config.backend_option("port", DEFAULT_PORT)), tun_name="flannel%d",
                    subnet=lease.subnet, network=pool.network,  # type: ignore[arg-type]
                    mtu=ctx.ext.mtu - ENCAP_OVERHEAD,
                    wanted=offload.wanted(os.environ.get("PYFLANNEL_OFFLOAD", "auto")), queues=_queues())
    try:
        return await asyncio.to_thread(_start, spec, lease)
    except DataplaneError as exc:  # port in use, no /dev/net/tun, ...: the user's to fix, one line
        raise FlannelError(str(exc)) from None


def _start(spec: PumpSpec, lease: Lease) -> UdpNetwork:
    """flannel0, the socket and the engine threads (blocking netlink calls: run in a worker thread)."""
    keeper = Keeper(spec)
    pump = keeper.start()
    log.info("%s up: mtu %d, udp %s:%d, queues %d, offloads: %s", pump.tun.name, spec.mtu, spec.iface_ip, spec.port,
             pump.queues, pump.offloads.describe())
    return UdpNetwork(lease, spec.mtu, keeper, spec.port)


def _queues() -> int:
    text = os.environ.get(ENV_QUEUES, "").strip()
    if not text:
        return default_queues()
    if not text.isdigit() or not 1 <= int(text) <= MAX_QUEUES:
        raise FlannelError(f"{ENV_QUEUES}={text!r} is not a number of queues from 1 to {MAX_QUEUES}")
    return int(text)
