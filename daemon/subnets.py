"""Lease policy over a storage registry (flannel's LocalManager): acquisition, ownership and renewal.

Acquisition (flannel's tryAcquireLease): a lease already held by this node's public IP is reused (refreshed, or
deleted if the config no longer admits it); else the subnet from the previous subnet.env if free; else one picked
at random among the first 100 free subnets. Each family the network has is chosen this way on its own, so
turning IPv6 on keeps a node's IPv4 subnet (flannel renumbers both), and a previous IPv6 subnet another node holds
is never taken (flannel checks only the IPv4 one). On an IPv6-only network a node is known by its PublicIPv6
(flannel compares PublicIP, which is 0.0.0.0 for every node there). It is created with "only if absent", and a
lost race simply tries again (flannel exits there, because it compares the wrong error; we do not copy that).

Ownership, where we differ from flannel on purpose: every write to our own record is conditional on the revision
we last wrote, so a node never overwrites another node's lease. When our record vanishes (etcd lost its data, an
operator deleted it, it expired during a long partition) and the subnet is still free, it is created again with
the same subnet and the routes stay; while the network config is missing too (data loss) we wait for it with the
dataplane untouched. Only when another node now holds our subnet do we exit (status 1, one line). flannel exits 0
whenever its lease is deleted; --exit-on-lease-loss keeps that for operators whose supervisor relies on it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import AsyncGenerator
from typing import Any, Protocol

from pyflannel.daemon import config
from pyflannel.daemon.config import Network, NetworkConfig, Pool
from pyflannel.daemon.errors import FlannelError
from pyflannel.daemon.lease import MAX_VALUE, SUBNET_TTL, BadRecord, Lease, LeaseAttrs, parse_subnet_key
from pyflannel.daemon.lease import decode as decode_lease
from pyflannel.daemon.outage import Outage
from pyflannel.daemon.peers import Changes, Entry, Source
from pyflannel.daemon.registry import ConfigMissing, LeaseChanged, LeaseExists, Record, Registry, Unavailable

log = logging.getLogger(__name__)

RACE_RETRIES = 10
CANDIDATES = 100
RENEW_RETRY = 60.0
CONFIG_POLL = 2.0


class LeaseRevoked(FlannelError):
    """Our own lease was deleted and --exit-on-lease-loss asks for flannel's behaviour: exit 0."""


class LeaseTaken(FlannelError):
    """Another node holds our subnet now: we must not take it back."""


Previous = tuple[ipaddress.IPv4Network | None, ipaddress.IPv6Network | None]  # from subnet.env


def _fits(pool: Pool | None, subnet: Network | None) -> bool:
    """A subnet the config admits for its family: none where the family is off."""
    return pool.fits(subnet) if pool is not None else subnet is None


def decode(record: Record, cfg: NetworkConfig) -> Lease | BadRecord:
    """A registry record checked against the network config."""
    if record.oversize:
        return BadRecord("oversize", f"value of {record.oversize} bytes, more than the {MAX_VALUE} allowed")
    try:
        return decode_lease(record.key, record.value or b"", cfg)
    except BadRecord as exc:
        return exc


class Manager(Protocol):
    """Where leases come from: a registry with flannel's allocation policy, or the Kubernetes API."""

    async def get_config(self) -> str: ...

    async def stored_public_ips(self) -> tuple[str, str]:
        """Public addresses (IPv4, IPv6; "" for none) pinned for this node where the leases live, which win over
        --public-ip/--public-ipv6."""

    async def acquire(self, cfg: NetworkConfig, attrs: LeaseAttrs, previous: Previous) -> Lease:
        ...

    async def complete(self, lease: Lease) -> None:
        """What the node does with its lease from then on (renew it; tell Kubernetes the network is up)."""

    def source(self, cfg: NetworkConfig) -> Source:
        """The other nodes' leases, for daemon.peers.follow."""

    def expiration(self) -> float:
        """When this node's lease expires unless renewed (unix time)."""

    async def close(self) -> None: ...


class OwnLease:
    """This node's record in the registry, and the revision it last wrote there."""

    def __init__(self, registry: Registry, cfg: NetworkConfig, lease: Lease, record: Record, outage: Outage,
                 *, exit_on_loss: bool) -> None:
        self.registry = registry
        self.cfg = cfg
        self.lease = lease
        self.key = record.key
        self.value = lease.attrs.to_json().encode()
        self.revision = record.revision
        self.expires = record.expires
        self.outage = outage
        self.exit_on_loss = exit_on_loss
        self._lock = asyncio.Lock()

    def _taken(self, found: Lease | BadRecord) -> LeaseTaken:
        holder = found.attrs.public() if isinstance(found, Lease) else "an unreadable value"
        return LeaseTaken(f"subnet {self.lease} is now held by {holder}: another node wrote it while this "
                          "node's lease was gone; exiting without touching it (a restart acquires another subnet)")

    async def renew(self) -> None:
        """Refresh the TTL, only if the record is still the one we wrote."""
        async with self._lock:
            for _ in range(2):
                try:
                    written = await self.registry.replace(self.key, self.value, SUBNET_TTL, self.revision)
                except LeaseChanged as exc:
                    if exc.current is None:
                        await self._recreate()
                        return
                    if exc.current.value != self.value:
                        raise self._taken(decode(exc.current, self.cfg)) from None
                    self.revision = exc.current.revision  # our value, written by a call whose answer was lost
                    continue
                self.revision, self.expires = written.revision, written.expires
                log.info("renewed lease %s until %s", self.lease, time.ctime(self.expires))
                return

    async def observe(self, entry: Entry | None) -> None:
        """Our record as the watch shows it: gone (re-create it), someone else's (exit), garbled (restore)."""
        async with self._lock:
            if entry is None:
                await self._recreate()
            elif isinstance(entry.lease, BadRecord):
                log.warning("our lease record %s was overwritten with a bad value (%s); writing ours back",
                            self.key, entry.lease)
                try:
                    written = await self.registry.replace(self.key, self.value, SUBNET_TTL, entry.revision)
                    self.revision, self.expires = written.revision, written.expires
                except LeaseChanged:
                    pass  # changed again meanwhile: the watch shows us what it is now
            elif entry.lease.attrs != self.lease.attrs:
                raise self._taken(entry.lease)
            else:
                self.revision = max(self.revision, entry.revision)

    async def _recreate(self) -> None:
        if self.exit_on_loss:
            raise LeaseRevoked("Lease has been revoked. Shutting down daemon.", status=0)
        await self._wait_for_config()
        try:
            written = await self.registry.create(self.key, self.value, SUBNET_TTL)
        except LeaseExists:
            return  # someone wrote it meanwhile: the watch shows us whose it is
        self.revision, self.expires = written.revision, written.expires
        log.warning("lease %s had gone from the registry (expired, deleted, or lost with the registry's data); "
                    "created it again", self.lease)

    async def _wait_for_config(self) -> None:
        """After a data loss the config is gone too: forward with the routes we have until it is back."""
        while True:
            try:
                text = await self.registry.get_config()
                break
            except ConfigMissing as exc:
                self.outage.failed(f"{exc}; forwarding with the routes we have until it is written again")
            await asyncio.sleep(CONFIG_POLL)
        if config.parse(text) != self.cfg:
            raise FlannelError("the network config changed while flanneld ran; restart flanneld to apply it")


async def acquire(registry: Registry, cfg: NetworkConfig, attrs: LeaseAttrs,
                  previous: Previous) -> tuple[Lease, Record]:
    """A lease for this node, following flannel's order; FlannelError("out of subnets") when none is free."""
    value = attrs.to_json().encode()
    for _ in range(RACE_RETRIES):
        records, _ = await registry.list_records()
        taken, mine = _survey(records, cfg, attrs.public())
        for (subnet, subnet6), record in mine.items():
            lease = Lease(subnet, attrs, 0.0, subnet6)
            try:
                if _fits(cfg.ipv4, subnet) and _fits(cfg.ipv6, subnet6):
                    written = await registry.replace(record.key, value, SUBNET_TTL, record.revision)
                    log.info("reusing the lease of %s: %s", attrs.public(), lease)
                    return Lease(subnet, attrs, written.expires, subnet6), written
                log.info("deleting lease %s: it no longer fits the network config", lease)
                await registry.delete(record.key, record.revision)
            except LeaseChanged:
                break
        else:
            lease = Lease(_choose(cfg.ipv4, taken, previous[0]), attrs, 0.0,  # type: ignore[arg-type]
                          _choose(cfg.ipv6, taken, previous[1]))  # type: ignore[arg-type]
            try:
                written = await registry.create(lease.key(), value, SUBNET_TTL)
            except LeaseExists:
                log.info("lost the race for %s; trying again", lease)
                previous = (None, None)
                continue
            log.info("acquired lease %s", lease)
            return Lease(lease.subnet, attrs, written.expires, lease.ipv6_subnet), written
    raise FlannelError("max retries reached trying to acquire a subnet")


def _survey(records: list[Record], cfg: NetworkConfig, public: ipaddress.IPv4Address | ipaddress.IPv6Address | None
            ) -> tuple[list[Network], dict[Previous, Record]]:
    """Subnets other records occupy (whatever their values), and the records that carry our public address."""
    taken: list[Network] = []
    mine = {}
    for record in records:
        try:
            subnets = parse_subnet_key(record.key)
        except BadRecord:
            continue
        try:
            ipv4 = cfg.ipv4 is not None
            ours = LeaseAttrs.from_json(record.value or b"", ipv4=ipv4, ipv6=not ipv4).public() == public
        except BadRecord:
            ours = False
        if ours:
            mine[subnets] = record
        else:
            taken += [s for s in subnets if s is not None]
    return taken, mine


def _choose(pool: Pool | None, taken: list[Network], previous: Network | None) -> Network | None:
    """This family's subnet: the previous one if it fits and is free, else a random one of the first 100 free."""
    if pool is None:
        return None
    taken = [t for t in taken if t.version == pool.network.version]
    if previous is not None:
        if pool.fits(previous) and not any(previous.overlaps(t) for t in taken):
            return previous
        log.info("previous subnet %s is taken or does not fit the config; choosing another", previous)
    candidates = []
    for subnet in pool.subnets():
        if not any(subnet.overlaps(t) for t in taken):
            candidates.append(subnet)
            if len(candidates) == CANDIDATES:
                break
    if not candidates:
        raise FlannelError(f"out of subnets: every /{pool.subnet_len} between {pool.subnet_min} and "
                           f"{pool.subnet_max} is leased")
    return random.choice(candidates)


class RegistrySource:
    """The registry's lease records as a daemon.peers Source."""

    def __init__(self, registry: Registry, cfg: NetworkConfig, own: OwnLease) -> None:
        self.registry = registry
        self.cfg = cfg
        self.own = own
        self.own_key = own.key

    async def snapshot(self) -> tuple[dict[str, Entry], Any]:
        records, revision = await self.registry.list_records()
        return {r.key: Entry(decode(r, self.cfg), r.revision) for r in records}, revision

    async def changes(self, cursor: Any) -> AsyncGenerator[Changes, None]:
        async for batch in self.registry.watch(cursor):
            yield [(r.key, None if r.value is None and not r.oversize else Entry(decode(r, self.cfg), r.revision))
                   for r in batch]

    async def observe_own(self, entry: Entry | None) -> None:
        await self.own.observe(entry)


class RegistryManager:
    """flannel's LocalManager: the policy above over a storage registry (etcd, or the embedded SQLite one)."""

    def __init__(self, registry: Registry, renew_margin_minutes: int, outage: Outage, *, exit_on_loss: bool) -> None:
        self.registry = registry
        self.renew_margin = renew_margin_minutes
        self.outage = outage
        self.exit_on_loss = exit_on_loss
        self.own: OwnLease | None = None

    async def get_config(self) -> str:
        return await self.registry.get_config()

    async def stored_public_ips(self) -> tuple[str, str]:
        """A registry pins no addresses (flannel's LocalManager neither)."""
        return "", ""

    async def acquire(self, cfg: NetworkConfig, attrs: LeaseAttrs, previous: Previous) -> Lease:
        lease, record = await acquire(self.registry, cfg, attrs, previous)
        self.own = OwnLease(self.registry, cfg, lease, record, self.outage, exit_on_loss=self.exit_on_loss)
        return lease

    def _own(self) -> OwnLease:
        if self.own is None:
            raise RuntimeError("no lease acquired yet")
        return self.own

    async def complete(self, lease: Lease) -> None:
        """Renew at expiry minus the margin; while the registry fails, try again every RENEW_RETRY seconds."""
        own = self._own()
        while True:
            await asyncio.sleep(max(own.expires - self.renew_margin * 60 - time.time(), 0))
            try:
                await own.renew()
            except Unavailable as exc:
                self.outage.failed(f"renewing lease {lease}: {exc}")
                own.expires = time.time() + self.renew_margin * 60 + RENEW_RETRY

    def source(self, cfg: NetworkConfig) -> RegistrySource:
        return RegistrySource(self.registry, cfg, self._own())

    def expiration(self) -> float:
        return self._own().expires

    async def close(self) -> None:
        await self.registry.close()
