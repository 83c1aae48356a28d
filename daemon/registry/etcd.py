"""EtcdRegistry: flannel's etcd v3 layout, through aetcd (a maintained asyncio etcd v3 client).

Keys: `<prefix>/config` holds the network config; `<prefix>/subnets/<a.b.c.d>-<len>` holds one lease each, its
value the lease JSON (daemon.lease), attached to a 24 h etcd lease. Creating a lease is flannel's transaction:
grant an etcd lease, then put only if the key's version is 0; on failure the etcd lease is revoked. Updating
grants a fresh etcd lease and puts unconditionally (the old one expires with nothing attached, as in flannel).
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd

from daemon.errors import FlannelError
from daemon.lease import Event, Lease, LeaseAttrs, event_from_record, lease_from_record, subnet_key
from daemon.registry import Compacted, ConfigMissing, LeaseExists, Unavailable

T = TypeVar("T")
TIMEOUT = 10  # seconds per request: a dead etcd is reported (and retried) rather than waited on forever


def endpoints(text: str) -> list[tuple[str, int]]:
    """--etcd-endpoints ("http://h:p,https://h:p") as (host, port) pairs."""
    out = []
    for item in text.split(","):
        url = urlsplit(item.strip() if "://" in item else f"http://{item.strip()}")
        if not url.hostname:
            raise FlannelError(f"invalid etcd endpoint {item!r}", status=2)
        out.append((url.hostname, url.port or 2379))
    return out


class EtcdRegistry:
    def __init__(self, endpoint_list: str, prefix: str, *, username: str = "", password: str = "",
                 keyfile: str = "", certfile: str = "") -> None:
        if keyfile or certfile:
            raise FlannelError("etcd TLS (--etcd-keyfile/--etcd-certfile) is not supported yet: "
                               "the aetcd client only opens plain gRPC channels")
        self.prefix = prefix.rstrip("/")
        self._endpoints = endpoints(endpoint_list)
        self._auth = (username or None, password or None)
        self._client: aetcd.Client | None = None

    async def _connected(self) -> aetcd.Client:
        if self._client is not None:
            return self._client
        for host, port in self._endpoints:
            client = aetcd.Client(host, port, username=self._auth[0], password=self._auth[1], timeout=TIMEOUT)
            try:
                await client.connect()
                await client.status()
            except aetcd.ClientError:
                await client.close()
                continue
            self._client = client
            return client
        raise Unavailable(f"no etcd endpoint answered ({', '.join(f'{h}:{p}' for h, p in self._endpoints)})")

    async def _call(self, fn: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        client = await self._connected()
        try:
            return await fn(client)
        except aetcd.RevisionCompactedError:
            raise
        except aetcd.ClientError as exc:
            await self._drop()
            raise Unavailable(f"etcd: {exc}") from None

    async def _drop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(aetcd.ClientError):
                await client.close()

    def _key(self, subnet: ipaddress.IPv4Network) -> bytes:
        return f"{self.prefix}/subnets/{subnet_key(subnet)}".encode()

    async def get_config(self) -> str:
        result: Any = await self._call(lambda c: c.get(f"{self.prefix}/config".encode()))
        if result is None:
            raise ConfigMissing(f"{self.prefix}/config not found in etcd (was it written with the etcd v3 API, "
                                "e.g. etcdctl put, with ETCDCTL_API=3?)")
        return bytes(result.value).decode()

    async def list_leases(self) -> tuple[list[Lease], int]:
        async def op(c: aetcd.Client) -> tuple[list[Lease], int]:
            result = await c.get_prefix(f"{self.prefix}/subnets/".encode())
            leases = []
            for kv in result:
                lease = lease_from_record(bytes(kv.key).decode(errors="replace"), bytes(kv.value))
                if lease is None:
                    continue
                expires = 0.0
                if kv.lease:
                    info = await c.get_lease_info(kv.lease, keys=False)
                    expires = time.time() + max(int(info.TTL), 0)
                leases.append(Lease(lease.subnet, lease.attrs, expires))
            return leases, int(result.header.revision)
        return await self._call(op)

    async def create_lease(self, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs, ttl: int) -> float:
        key = self._key(subnet)

        async def op(c: aetcd.Client) -> float:
            grant = await c.lease(ttl)
            ok, _ = await c.transaction(compare=[c.transactions.version(key) == 0],
                                        success=[c.transactions.put(key, attrs.to_json().encode(), grant.id)],
                                        failure=[])  # aetcd iterates failure even when it is None
            if not ok:
                await c.revoke_lease(grant.id)
                raise LeaseExists(subnet_key(subnet))
            return time.time() + int(grant.ttl)
        return await self._call(op)

    async def update_lease(self, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs, ttl: int) -> float:
        async def op(c: aetcd.Client) -> float:
            grant = await c.lease(ttl)
            await c.put(self._key(subnet), attrs.to_json().encode(), grant.id)
            return time.time() + int(grant.ttl)
        return await self._call(op)

    async def delete_lease(self, subnet: ipaddress.IPv4Network) -> None:
        await self._call(lambda c: c.delete(self._key(subnet)))

    async def watch(self, revision: int) -> AsyncIterator[list[Event]]:
        client = await self._connected()
        prefix = f"{self.prefix}/subnets/".encode()
        try:
            watch = await client.watch_prefix(prefix, start_revision=revision + 1)
            async for ev in watch:
                value = None if ev.kind == "DELETE" else bytes(ev.kv.value)
                event = event_from_record(bytes(ev.kv.key).decode(errors="replace"), value)
                if event is not None:
                    yield [event]
        except aetcd.RevisionCompactedError:
            raise Compacted(revision) from None
        except aetcd.ClientError as exc:
            await self._drop()
            raise Unavailable(f"etcd watch: {exc}") from None
        raise Unavailable("etcd watch ended")

    async def close(self) -> None:
        await self._drop()
