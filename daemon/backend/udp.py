"""The udp backend: flannel0 and the pyflannel packet engine (flannel pkg/backend/udp).

Design notes. As flannel: lease attributes are only PublicIP (and PublicIPv6, below); the TUN is named by the kernel
from `flannel%d` (normally flannel0), with the lease's network address as a /32, MTU = external MTU - 28 and a route
for the whole network; the UDP socket is bound to the external interface's address on Backend.Port (default 8285),
and every node must use the same port because leases do not carry it; BackendType is not checked on peers' leases.
Ours: the engine batches and uses kernel offloads (PYFLANNEL_OFFLOAD=off turns them off, PYFLANNEL_DISABLE_OFFLOADS
single ones, see dataplane.offload), runs one TX/RX thread pair per TUN queue (PYFLANNEL_UDP_QUEUES, default one per
two online CPUs up to 4: a host setting, so not a flag of flannel's), and it checks that packets come from the peer
owning their source subnet, in both directions. Backend option `"SourceCheck": false` turns that check off (as
flannel-tunnel's --no-source-check), for a network where the check refuses good traffic: a router forwarding into
the overlay through a node (a static route to the pod network), or NAT changing a sender's address. Named as
flannel names its backend options, a feature's name with a JSON bool (vxlan's DirectRouting, Learning, GBP):
true, the default, is flannel-tunnel's behaviour without the flag.
A dataplane.keeper.Keeper owns the engine: a batch of lease events is one route-table update (the events' effects
in order), and every second the keeper retries the routes the table refused and repairs flannel0 (deleted, set
down, its address or route removed) or a dead engine, with every route; /healthz reports what it could not
repair, /readyz a peer subnet that could not be routed.

IPv6 (EnableIPv6), beyond flannel, whose udp backend is IPv4 only: dual-stack and IPv6-only networks. The lease
carries PublicIPv6 beside PublicIP (as host-gw's), each family's subnet is routed to the peer's address of the
same family (Lease.routes), so the engine gets a socket per family in use, bound to the interface's address of
that family (the same port), flannel0 the IPv6 subnet's /128 and the IPv6 network route, and MTU = external MTU
- 48 (outer IPv6 and UDP headers) when IPv6 is in use, the larger overhead of the two. A flannel node never sees
IPv6 from us: it routes no IPv6 to its udp backend.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from pyflannel.daemon.backend.base import Context, Idle, unrouted_line
from pyflannel.daemon.errors import FlannelError
from pyflannel.daemon.lease import Event, EventType, Lease, LeaseAttrs
from pyflannel.dataplane import offload
from pyflannel.dataplane._engine import MAX_QUEUES
from pyflannel.dataplane.errors import DataplaneError
from pyflannel.dataplane.keeper import Keeper, PumpSpec
from pyflannel.dataplane.pump import DEFAULT_PORT, default_queues
from pyflannel.dataplane.tun import ENCAP_OVERHEAD, ENCAP_OVERHEAD6

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
        """One batch of lease events, one table update, with the events' effects in their order: a lease added
        and removed in one batch ends unrouted, one removed and added again ends routed."""
        changes: dict[str, tuple[str, int] | None] = {}
        for event in events:
            if event.type is EventType.REMOVED:
                changes.update(dict.fromkeys(map(str, event.lease.subnets())))
            else:
                changes.update({str(subnet): (str(peer), self.port) for subnet, peer in event.lease.routes()})
        for subnet, hop in changes.items():
            if hop is not None:
                log.info("route %s -> %s:%d", subnet, *hop)
        _, gone = self.keeper.update(changes)
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

    def unrouted(self) -> str | None:
        return unrouted_line(self.keeper.unrouted)

    def engine_stats(self) -> dict[str, Any] | None:
        return self.keeper.stats()


async def register(ctx: Context) -> UdpNetwork:
    """The lease (PublicIP and PublicIPv6 for the families in use), then flannel0 and the engine for them; the
    interface has an address of each family the network uses (interface.select made sure)."""
    pool, pool6, ext = ctx.config.ipv4, ctx.config.ipv6, ctx.ext
    lease = await ctx.acquire(LeaseAttrs(public_ip=ext.public_ip, public_ipv6=ext.public_ipv6))
    if (pool is not None and lease.subnet is None) or (pool6 is not None and lease.ipv6_subnet is None):
        raise FlannelError(f"lease {lease} lacks the subnet of a family the network uses")
    port = ctx.config.backend_int("Port", DEFAULT_PORT, 1, 65535)
    check_source = ctx.config.backend_bool("SourceCheck", True)
    spec = PumpSpec(iface_ip=ext.addr, port=port, tun_name="flannel%d", check_source=check_source,
                    subnet=lease.subnet, network=pool and pool.network,  # type: ignore[arg-type]
                    iface_ip6=ext.addr6, subnet6=lease.ipv6_subnet,
                    network6=pool6 and pool6.network,  # type: ignore[arg-type]
                    mtu=ext.mtu - (ENCAP_OVERHEAD6 if pool6 else ENCAP_OVERHEAD),
                    wanted=offload.wanted(os.environ.get("PYFLANNEL_OFFLOAD", "auto")), queues=_queues())
    try:
        return await asyncio.to_thread(_start, spec, lease)
    except DataplaneError as exc:  # port in use, no /dev/net/tun, ...: the user's to fix, one line
        raise FlannelError(str(exc)) from None


def _start(spec: PumpSpec, lease: Lease) -> UdpNetwork:
    """flannel0, the socket and the engine threads (blocking netlink calls: run in a worker thread)."""
    keeper = Keeper(spec)
    pump = keeper.start()
    log.info("%s up: mtu %d, udp %s port %d, queues %d, engine memory %.1f MiB, offloads: %s%s", pump.tun.name,
             spec.mtu, " ".join(str(ip) for ip in (spec.iface_ip, spec.iface_ip6) if ip is not None), spec.port,
             pump.queues, sum(pump.memory().values()) / (1 << 20), pump.offloads.describe(),
             "" if spec.check_source else "; source check off (Backend.SourceCheck)")
    return UdpNetwork(lease, spec.mtu, keeper, spec.port)


def _queues() -> int:
    text = os.environ.get(ENV_QUEUES, "").strip()
    if not text:
        return default_queues()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_QUEUES:  # str.isdigit takes "²", int not
        raise FlannelError(f"{ENV_QUEUES}={text!r} is not a number of queues from 1 to {MAX_QUEUES}")
    return int(text)
