"""What every backend provides (flannel's pkg/backend/common.go): register to get a lease and forwarding state,
then turn other nodes' lease events into that state."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pyflannel.daemon.config import NetworkConfig
from pyflannel.daemon.interface import ExternalInterface
from pyflannel.daemon.lease import Event, Lease, LeaseAttrs

Acquire = Callable[[LeaseAttrs], Awaitable[Lease]]


@dataclass(frozen=True)
class Context:
    ext: ExternalInterface
    config: NetworkConfig
    acquire: Acquire  # leases a subnet for these attributes (daemon.subnets.acquire over the registry)


class Network(Protocol):
    lease: Lease
    mtu: int  # FLANNEL_MTU for subnet.env

    def handle(self, events: list[Event]) -> None:
        """Apply other nodes' lease changes (called in a worker thread: it may block on netlink)."""

    async def run(self) -> None:
        """Background upkeep (host-gw re-adds missing routes); returns only when cancelled."""

    def close(self) -> None:
        """Release what must not outlive the process (udp: the engine and flannel0). Kernel state that a restart
        can reuse (routes, vxlan device) stays, as with flannel."""

    def failure(self) -> str | None:
        """Why forwarding is broken right now (for /healthz), or None."""

    def unrouted(self) -> str | None:
        """Other nodes' subnets that the dataplane refused to route for now (retried; for /readyz), or None."""

    def engine_stats(self) -> dict[str, Any] | None:
        """The packet engine's counters (dataplane.metrics exports them), or None for a kernel dataplane."""


def unrouted_line(refused: Mapping[Any, str]) -> str | None:
    """Network.unrouted's line for these refused routes ({subnet: why}), the first three named; None if none."""
    if not refused:
        return None
    first = ", ".join(f"{subnet} ({why})" for subnet, why in sorted(refused.items(), key=lambda item: str(item[0]))[:3])
    return f"{len(refused)} peer subnet(s) not routed: {first}{', ...' if len(refused) > 3 else ''}"


class Idle:
    """Mixin: the defaults, no background upkeep, nothing to close, nothing to report; a network overrides what
    it needs."""

    async def run(self) -> None:
        await asyncio.Event().wait()

    def close(self) -> None:
        return None

    def failure(self) -> str | None:
        return None

    def unrouted(self) -> str | None:
        return None

    def engine_stats(self) -> dict[str, Any] | None:
        return None
