"""Lease policy over any registry: acquisition in flannel's order, renewal, and the lease watch.

Acquisition (flannel's tryAcquireLease): a lease already held by this node's public IP is reused (refreshed, or
deleted if the config no longer admits it); else the subnet from the previous subnet.env if free; else one picked
at random among the first 100 free subnets. It is created with "only if absent", and a lost race simply tries
again (flannel exits there, because it compares the wrong error; we do not copy that).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Protocol

from daemon.config import NetworkConfig
from daemon.errors import FlannelError
from daemon.lease import SUBNET_TTL, Event, EventType, Lease, LeaseAttrs, diff
from daemon.registry import Compacted, LeaseExists, Registry, Unavailable

log = logging.getLogger(__name__)

RACE_RETRIES = 10
CANDIDATES = 100
RENEW_RETRY = 60.0
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0


class LeaseRevoked(FlannelError):
    """Our own lease was deleted or expired: flannel exits so that its supervisor restarts it."""


def _fits(cfg: NetworkConfig, subnet: ipaddress.IPv4Network) -> bool:
    return (subnet.prefixlen == cfg.subnet_len and cfg.subnet_min <= subnet.network_address <= cfg.subnet_max)


async def acquire(registry: Registry, cfg: NetworkConfig, attrs: LeaseAttrs,
                  previous: ipaddress.IPv4Network | None) -> Lease:
    """A lease for this node, following flannel's order; FlannelError("out of subnets") when none is free."""
    for _ in range(RACE_RETRIES):
        leases, _ = await registry.list_leases()
        mine = [lease for lease in leases if lease.attrs.public_ip == attrs.public_ip]
        for lease in mine:
            if _fits(cfg, lease.subnet):
                expires = await registry.update_lease(lease.subnet, attrs, SUBNET_TTL)
                log.info("reusing the lease of %s: %s", attrs.public_ip, lease.subnet)
                return Lease(lease.subnet, attrs, expires)
            log.info("deleting lease %s: it no longer fits the network config", lease.subnet)
            await registry.delete_lease(lease.subnet)
        taken = [lease.subnet for lease in leases if lease not in mine]
        subnet = _choose(cfg, taken, previous)
        try:
            expires = await registry.create_lease(subnet, attrs, SUBNET_TTL)
        except LeaseExists:
            log.info("lost the race for %s; trying again", subnet)
            previous = None
            continue
        log.info("acquired lease %s", subnet)
        return Lease(subnet, attrs, expires)
    raise FlannelError("max retries reached trying to acquire a subnet")


def _choose(cfg: NetworkConfig, taken: list[ipaddress.IPv4Network],
            previous: ipaddress.IPv4Network | None) -> ipaddress.IPv4Network:
    free = (s for s in cfg.subnets() if not any(s.overlaps(t) for t in taken))
    if previous is not None:
        if _fits(cfg, previous) and not any(previous.overlaps(t) for t in taken):
            return previous
        log.info("previous subnet %s is taken or does not fit the config; choosing another", previous)
    candidates = []
    for subnet in free:
        candidates.append(subnet)
        if len(candidates) == CANDIDATES:
            break
    if not candidates:
        raise FlannelError(f"out of subnets: every /{cfg.subnet_len} between {cfg.subnet_min} and "
                           f"{cfg.subnet_max} is leased")
    return random.choice(candidates)


async def renew_forever(registry: Registry, lease: Lease, margin_minutes: int) -> None:
    """Renew the lease at expiry minus the margin; retry every minute while the registry fails."""
    expires = lease.expiration
    while True:
        await asyncio.sleep(max(expires - margin_minutes * 60 - time.time(), 0))
        try:
            expires = await registry.update_lease(lease.subnet, lease.attrs, SUBNET_TTL)
            log.info("renewed lease %s until %s", lease.subnet, time.ctime(expires))
        except Unavailable as exc:
            log.error("renewing lease %s failed (%s); retrying in %.0f s", lease.subnet, exc, RENEW_RETRY)
            expires = time.time() + margin_minutes * 60 + RENEW_RETRY


async def watch_leases(registry: Registry, own: ipaddress.IPv4Network) -> AsyncIterator[list[Event]]:
    """Other nodes' lease changes, forever: list, diff against what we knew, watch; after any failure
    (registry down, watch compacted) back off, list again and diff, so no change is missed.
    Raises LeaseRevoked when our own lease disappears."""
    known: dict[ipaddress.IPv4Network, Lease] = {}
    backoff = BACKOFF_MIN
    while True:
        try:
            leases, revision = await registry.list_leases()
            if not any(lease.subnet == own for lease in leases):
                raise LeaseRevoked("Lease has been revoked. Shutting down daemon.", status=0)
            events = diff(known, [lease for lease in leases if lease.subnet != own])
            if events:
                yield events
            backoff = BACKOFF_MIN
            async for batch in registry.watch(revision):
                if any(e.lease.subnet == own and e.type is EventType.REMOVED for e in batch):
                    raise LeaseRevoked("Lease has been revoked. Shutting down daemon.", status=0)
                out = []
                for event in batch:
                    if event.lease.subnet == own:
                        continue
                    if event.type is EventType.REMOVED:
                        gone = known.pop(event.lease.subnet, None)
                        if gone is not None:
                            out.append(Event(EventType.REMOVED, gone))
                    elif (old := known.get(event.lease.subnet)) is None or old.attrs != event.lease.attrs:
                        known[event.lease.subnet] = event.lease
                        out.append(event)
                if out:
                    yield out
        except (Unavailable, Compacted) as exc:
            log.warning("lease watch interrupted (%s); listing again in %.1f s", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)


class Manager(Protocol):
    """Where leases come from: a registry with flannel's allocation policy, or the Kubernetes API."""

    async def get_config(self) -> str: ...

    async def acquire(self, cfg: NetworkConfig, attrs: LeaseAttrs, previous: ipaddress.IPv4Network | None) -> Lease:
        ...

    async def complete(self, lease: Lease) -> None:
        """What the node does with its lease from then on (renew it; tell Kubernetes the network is up)."""

    def watch(self, own: ipaddress.IPv4Network) -> AsyncIterator[list[Event]]: ...

    async def close(self) -> None: ...


class RegistryManager:
    """flannel's LocalManager: the policy above over a storage registry (etcd, or the embedded SQLite one)."""

    def __init__(self, registry: Registry, renew_margin_minutes: int) -> None:
        self.registry = registry
        self.renew_margin = renew_margin_minutes

    async def get_config(self) -> str:
        return await self.registry.get_config()

    async def acquire(self, cfg: NetworkConfig, attrs: LeaseAttrs, previous: ipaddress.IPv4Network | None) -> Lease:
        return await acquire(self.registry, cfg, attrs, previous)

    async def complete(self, lease: Lease) -> None:
        await renew_forever(self.registry, lease, self.renew_margin)

    def watch(self, own: ipaddress.IPv4Network) -> AsyncIterator[list[Event]]:
        return watch_leases(self.registry, own)

    async def close(self) -> None:
        await self.registry.close()
