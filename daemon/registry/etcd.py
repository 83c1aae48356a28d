"""EtcdRegistry: flannel's etcd v3 layout, through aetcd's connection and its generated gRPC stubs.

Keys: `<prefix>/config` holds the network config; `<prefix>/subnets/<a.b.c.d>-<len>` holds one lease each, its
value the lease JSON (daemon.lease), attached to a 24 h etcd lease. Every write is one transaction that also
returns the record when its condition fails: create puts only if the key's version is 0 (flannel's), replace
and delete only if its mod revision is still the one this node wrote, so a node never overwrites a lease that
another node took while it was away (flannel's renewal is an unconditional put).

aetcd opens the channel and authenticates; listing and watching speak to the stubs directly, because aetcd's
range call has no limit or revision (needed to page through a large prefix at one revision) and its watcher
hides the batches and the stream's end. The channel sends gRPC keepalive pings, so a half-open connection (the
etcd host rebooted or cut off without a reset) fails the watch within KEEPALIVE_S + KEEPALIVE_TIMEOUT_S
seconds instead of waiting for TCP to give up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import grpc
from aetcd import rpc

from daemon.errors import FlannelError
from daemon.lease import MAX_VALUE
from daemon.registry import Compacted, ConfigMissing, LeaseChanged, LeaseExists, Record, Unavailable

T = TypeVar("T")
TIMEOUT = 10  # seconds per request: a dead etcd is reported (and retried) rather than waited on forever
KEEPALIVE_S, KEEPALIVE_TIMEOUT_S = 10, 5  # etcd's default --grpc-keepalive-min-time is 5 s
PAGE = 64  # records per range request: a prefix full of large values still lists in bounded messages
CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": KEEPALIVE_S * 1000,
    "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_S * 1000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.max_receive_message_length": 64 << 20,
}


def endpoints(text: str) -> list[tuple[str, int]]:
    """--etcd-endpoints ("http://h:p,https://h:p") as (host, port) pairs."""
    out = []
    for item in text.split(","):
        url = urlsplit(item.strip() if "://" in item else f"http://{item.strip()}")
        if not url.hostname:
            raise FlannelError(f"invalid etcd endpoint {item!r}", status=2)
        out.append((url.hostname, url.port or 2379))
    return out


def _prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with prefix (etcd's GetPrefixRangeEnd)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdRegistry:
    def __init__(self, endpoint_list: str, prefix: str, *, username: str = "", password: str = "",
                 keyfile: str = "", certfile: str = "") -> None:
        if keyfile or certfile:
            raise FlannelError("etcd TLS (--etcd-keyfile/--etcd-certfile) is not supported yet: "
                               "the aetcd client only opens plain gRPC channels")
        self.prefix = prefix.rstrip("/")
        self._subnets = f"{self.prefix}/subnets/".encode()
        self._endpoints = endpoints(endpoint_list)
        self._auth = (username or None, password or None)
        self._client: aetcd.Client | None = None

    async def _connected(self) -> aetcd.Client:
        if self._client is not None:
            return self._client
        for host, port in self._endpoints:
            client = aetcd.Client(host, port, username=self._auth[0], password=self._auth[1], timeout=TIMEOUT,
                                  options=CHANNEL_OPTIONS)
            try:
                await client.connect()
                await client.status()
            except (aetcd.ClientError, TimeoutError):
                await _close(client)
                continue
            self._client = client
            return client
        raise Unavailable(f"no etcd endpoint answered ({', '.join(f'{h}:{p}' for h, p in self._endpoints)})")

    async def _call(self, fn: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """fn on a connected client. Transport failures drop the connection and become Unavailable; so does a
        CancelledError that is not ours (grpc cancels every call on a channel that another task closed)."""
        client = await self._connected()
        try:
            return await fn(client)
        except (grpc.aio.AioRpcError, aetcd.ClientError, TimeoutError) as exc:
            await self._drop(client)
            raise Unavailable(f"etcd: {_reason(exc)}") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            await self._drop(client)
            raise Unavailable("etcd: the call was cut off with its connection") from None

    async def _drop(self, client: aetcd.Client) -> None:
        if self._client is client:
            self._client = None
            await _close(client)

    def _key(self, key: str) -> bytes:
        return self._subnets + key.encode()

    def _relative(self, key: bytes) -> str:
        return bytes(key[len(self._subnets):]).decode(errors="replace")

    def _record(self, kv: Any) -> Record:
        return Record(self._relative(kv.key), bytes(kv.value), int(kv.mod_revision))

    async def get_config(self) -> str:
        result: Any = await self._call(lambda c: c.get(f"{self.prefix}/config".encode()))
        if result is None:
            raise ConfigMissing(f"{self.prefix}/config not found in etcd (was it written with the etcd v3 API, "
                                "e.g. etcdctl put, with ETCDCTL_API=3?)")
        return bytes(result.value).decode(errors="replace")

    async def list_records(self) -> tuple[list[Record], int]:
        return await self._call(self._list)

    async def _list(self, c: aetcd.Client) -> tuple[list[Record], int]:
        """Page through the prefix at one revision. Values larger than MAX_VALUE are left out (Record.oversize);
        a page too large for one message is fetched again in smaller pages, down to keys alone."""
        records: list[Record] = []
        start, end, revision, limit = self._subnets, _prefix_end(self._subnets), 0, PAGE
        while True:
            request = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision,
                                       sort_order=rpc.RangeRequest.ASCEND, keys_only=limit == 0)
            try:
                resp = await c.kvstub.Range(request, timeout=TIMEOUT, metadata=c.metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or limit == 0:
                    raise
                limit //= 2
                continue
            revision = revision or int(resp.header.revision)
            for kv in resp.kvs:
                if limit == 0 or len(kv.value) > MAX_VALUE:
                    records.append(Record(self._relative(kv.key), None, int(kv.mod_revision),
                                          oversize=max(len(kv.value), MAX_VALUE + 1)))
                else:
                    records.append(self._record(kv))
            if not resp.more or not resp.kvs:
                return records, revision
            start, limit = bytes(resp.kvs[-1].key) + b"\0", limit or 1

    async def _txn(self, key: str, compare: Any, success: Any, ttl: int) -> tuple[Record | None, Record | None]:
        """One conditional write under a fresh etcd lease (revoked if the condition fails): the record written
        (its mod revision is the transaction's revision) or None, and the record that stands if it failed."""
        k = self._key(key)

        async def op(c: aetcd.Client) -> tuple[Record | None, Record | None]:
            grant = await c.lease(ttl) if ttl else None
            request = rpc.TxnRequest(compare=[compare(k)], success=[success(k, grant.id if grant else 0)],
                                     failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k))])
            resp = await c.kvstub.Txn(request, timeout=TIMEOUT, metadata=c.metadata)
            if not resp.succeeded:
                if grant is not None:
                    await c.revoke_lease(grant.id)
                kvs = resp.responses[0].response_range.kvs
                return None, self._record(kvs[0]) if kvs else None
            expires = time.time() + int(grant.ttl) if grant else 0.0
            return Record(key, None, int(resp.header.revision), expires), None
        return await self._call(op)

    async def create(self, key: str, value: bytes, ttl: int) -> Record:
        written, _ = await self._txn(key, _compare(rpc.Compare.VERSION, version=0), _put(value), ttl)
        if written is None:
            raise LeaseExists(key)
        return dataclasses.replace(written, value=value)

    async def replace(self, key: str, value: bytes, ttl: int, revision: int) -> Record:
        written, current = await self._txn(key, _compare(rpc.Compare.MOD, mod_revision=revision), _put(value), ttl)
        if written is None:
            raise LeaseChanged(current)
        return dataclasses.replace(written, value=value)

    async def delete(self, key: str, revision: int) -> None:
        written, current = await self._txn(key, _compare(rpc.Compare.MOD, mod_revision=revision), _delete, 0)
        if written is None:
            raise LeaseChanged(current)

    async def watch(self, revision: int) -> AsyncIterator[list[Record]]:
        client = await self._connected()
        call = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
        create = rpc.WatchCreateRequest(key=self._subnets, range_end=_prefix_end(self._subnets),
                                        start_revision=revision + 1)
        try:
            await call.write(rpc.WatchRequest(create_request=create))
            while (resp := await call.read()) is not grpc.aio.EOF:
                if resp.compact_revision:
                    raise Compacted(revision)
                if resp.canceled:
                    raise Unavailable(f"etcd cancelled the watch: {resp.cancel_reason or 'no reason given'}")
                batch = [Record(self._relative(ev.kv.key), None, int(ev.kv.mod_revision))
                         if ev.type == rpc.Event.DELETE else self._record(ev.kv) for ev in resp.events]
                if batch:
                    yield batch
        except grpc.aio.AioRpcError as exc:
            await self._drop(client)
            raise Unavailable(f"etcd watch: {_reason(exc)}") from None
        finally:
            call.cancel()
        raise Unavailable("etcd ended the watch")

    async def close(self) -> None:
        if self._client is not None:
            await self._drop(self._client)


def _compare(target: Any, **value: int) -> Callable[[bytes], Any]:
    return lambda key: rpc.Compare(result=rpc.Compare.EQUAL, target=target, key=key, **value)


def _put(value: bytes) -> Callable[[bytes, int], Any]:
    return lambda key, lease: rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def _delete(key: bytes, _lease: int) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name.lower()}: {exc.details()}"
    return str(exc) or type(exc).__name__


async def _close(client: aetcd.Client) -> None:
    with contextlib.suppress(aetcd.ClientError, grpc.aio.AioRpcError, TimeoutError):
        await client.close()
