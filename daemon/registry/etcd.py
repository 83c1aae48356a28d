"""EtcdRegistry: flannel's etcd v3 layout, through aetcd's connection and its generated gRPC stubs.

Keys: `<prefix>/config` holds the network config; `<prefix>/subnets/<a.b.c.d>-<len>` holds one lease each, its
value the lease JSON (daemon.lease), attached to a 24 h etcd lease. Every write is one transaction that also
returns the record when its condition fails: create puts only if the key's version is 0 (flannel's), replace
and delete only if its mod revision is still the one this node wrote, so a node never overwrites a lease that
another node took while it was away (flannel's renewal is an unconditional put).

The connection is aetcd's Client with its `connect` replaced (_Client): aetcd 1.0 opens only plain-text
channels and folds authentication errors into one generic error, so the subclass opens the grpc.aio channel
itself (TLS through grpc's own ssl_channel_credentials, the TLS stack grpc.aio speaks) and authenticates with
errors that say what failed; the stubs, get, lease, status and close stay aetcd's. A maintained asyncio client
with TLS was the other route, but it would have meant rewriting the paging, conditional writes and watch below
for no gain: they talk to the generated stubs either way. Listing and watching speak to the stubs directly,
because aetcd's range call has no limit or revision (needed to page through a large prefix at one revision) and
its watcher hides the batches and the stream's end.

Security follows flannel's etcd client (clientv3): an `https://` endpoint always speaks TLS (with the CA file,
or the system's roots); an `http://` endpoint never does; a bare `host:port` does when a client certificate is
given. With a username, etcd hands out a token that expires after --auth-token-ttl seconds without use; a call
refused for an expired token reconnects, authenticates again and is tried once more, as clientv3 does.

The channel sends gRPC keepalive pings, so a half-open connection (the etcd host rebooted or cut off without a
reset) fails the watch within KEEPALIVE_S + KEEPALIVE_TIMEOUT_S seconds instead of waiting for TCP to give up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import grpc
from aetcd import rpc

from pyflannel.daemon.errors import FlannelError
from pyflannel.daemon.lease import MAX_VALUE
from pyflannel.daemon.registry import Compacted, ConfigMissing, LeaseChanged, LeaseExists, Record, Unavailable

log = logging.getLogger(__name__)
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


class _TokenExpired(Unavailable):
    """etcd refused the auth token (it expires after --auth-token-ttl seconds unused)."""


class AuthFailed(FlannelError):
    """etcd refused the username or password: retrying cannot help, so flanneld stops with this one line."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Security:
    """TLS material (read and checked once, at startup) and credentials, shared by every connection."""
    credentials: grpc.ChannelCredentials | None = None
    username: str = ""
    password: str = ""
    client_cert: bool = False

    @classmethod
    def build(cls, *, cafile: str, certfile: str, keyfile: str, username: str, password: str) -> Security:
        if bool(certfile) != bool(keyfile):
            raise FlannelError("--etcd-certfile and --etcd-keyfile go together: give both or neither", status=2)
        if bool(username) != bool(password):
            raise FlannelError("--etcd-username and --etcd-password go together: give both or neither", status=2)
        _check_tls_files(cafile, certfile, keyfile)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(cafile) if cafile else None,
            private_key=_read(keyfile) if keyfile else None,
            certificate_chain=_read(certfile) if certfile else None)
        return cls(credentials, username, password, client_cert=bool(certfile))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _check_tls_files(cafile: str, certfile: str, keyfile: str) -> None:
    """Load the files with the standard library's TLS once, so that a missing file, a key that does not match
    its certificate or a file that is not PEM is one line at startup, not a handshake failure retried forever."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if cafile:
            ctx.load_verify_locations(cafile)
        if certfile:
            ctx.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise FlannelError(f"etcd TLS files (--etcd-cafile {cafile or '-'}, --etcd-certfile {certfile or '-'}, "
                           f"--etcd-keyfile {keyfile or '-'}): {exc.strerror or exc}") from None


def endpoints(text: str, client_cert: bool = False) -> list[Endpoint]:
    """--etcd-endpoints ("http://h:p,https://h:p,h:p"): https always speaks TLS, http never, a bare host:port
    when a client certificate is given (clientv3's rule)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        bad = FlannelError(f"invalid etcd endpoint {item!r} (expected http://HOST:PORT or https://HOST:PORT)",
                           status=2)
        try:
            url = urlsplit(item if "://" in item else f"//{item}")
            port = url.port   # ValueError when out of range, as urlsplit's for a broken [IPv6] host
        except ValueError:
            raise bad from None
        if url.scheme not in ("", "http", "https") or not url.hostname:
            raise bad
        tls = url.scheme == "https" or (url.scheme == "" and client_cert)
        out.append(Endpoint(url.hostname, port or 2379, tls))
    return out


class _Client(aetcd.Client):  # type: ignore[misc]  # aetcd has no type hints
    """aetcd's client on a channel this module opens (plain or TLS), authenticated with errors that say why."""

    def __init__(self, endpoint: Endpoint, security: Security) -> None:
        super().__init__(endpoint.host, endpoint.port, timeout=TIMEOUT, options=CHANNEL_OPTIONS)
        self.endpoint = endpoint
        self.security = security

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target, options = f"{self.endpoint.host}:{self.endpoint.port}", list(self._options.items())
        if self.endpoint.tls:
            assert self.security.credentials is not None
            self.channel = grpc.aio.secure_channel(target, self.security.credentials, options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options)
        if self.security.username:
            self.metadata = await self._authenticate()
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._connected.set()

    async def _authenticate(self) -> tuple[tuple[str, str], ...] | None:
        """The token etcd gives for the username and password, sent with every call. A wrong name or password
        is AuthFailed; etcd without auth enabled is told and used without a token (clientv3 does the same)."""
        request = rpc.AuthenticateRequest(name=self.security.username, password=self.security.password)
        try:
            resp = await rpc.AuthStub(self.channel).Authenticate(request, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.FAILED_PRECONDITION and "not enabled" in (exc.details() or ""):
                log.warning("etcd at %s has authentication off; --etcd-username is not used", self.endpoint)
                return None
            if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                raise AuthFailed(f"etcd at {self.endpoint}: authentication failed for user "
                                 f"{self.security.username!r}: {exc.details()}") from None
            raise
        return (("token", resp.token),)

    async def reauthenticate(self) -> None:
        """A new token for the same channel; calls and streams already under way keep theirs."""
        self.metadata = await self._authenticate()


def _prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with prefix (etcd's GetPrefixRangeEnd)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdRegistry:
    def __init__(self, endpoint_list: str, prefix: str, *, username: str = "", password: str = "",
                 keyfile: str = "", certfile: str = "", cafile: str = "") -> None:
        self.prefix = prefix.rstrip("/")
        self._subnets = f"{self.prefix}/subnets/".encode()
        self._security = Security.build(cafile=cafile, certfile=certfile, keyfile=keyfile, username=username,
                                        password=password)
        self._endpoints = endpoints(endpoint_list, self._security.client_cert)
        if plain := [str(e) for e in self._endpoints if not e.tls]:
            log.warning("no certificate provided: connecting to etcd with http. This is insecure (%s)",
                        ", ".join(plain))
        self._client: _Client | None = None

    async def _connected(self) -> _Client:
        if self._client is not None:
            return self._client
        reasons = []
        for endpoint in self._endpoints:
            client = _Client(endpoint, self._security)
            try:
                await client.connect()
                await client.status()
            except (aetcd.ClientError, grpc.aio.AioRpcError, TimeoutError) as exc:
                await _close(client)
                reasons.append(f"{endpoint}: {_reason(exc)}")
                continue
            except AuthFailed:
                await _close(client)
                raise
            self._client = client
            return client
        raise Unavailable(f"no etcd endpoint answered ({'; '.join(reasons)})")

    async def _call(self, fn: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """fn on a connected client; a call refused for an expired auth token authenticates again on the same
        channel (so the watch streaming on it goes on) and is tried once more; a second refusal is an outage."""
        try:
            return await self._call_once(fn)
        except _TokenExpired:
            log.info("etcd auth token expired; authenticating again")
            await self._call_once(_Client.reauthenticate)
            return await self._call_once(fn)

    async def _call_once(self, fn: Callable[[_Client], Awaitable[T]]) -> T:
        """fn on a connected client; a failed connection is dropped and becomes Unavailable (see _lost)."""
        client = await self._connected()
        try:
            return await fn(client)
        except (grpc.aio.AioRpcError, aetcd.ClientError, TimeoutError, asyncio.CancelledError) as exc:
            if _token_expired(exc):
                raise _TokenExpired(f"etcd: {_reason(exc)}") from None
            raise await self._lost(client, "etcd", exc) from None

    async def _lost(self, client: _Client, what: str, exc: BaseException) -> Unavailable:
        """The Unavailable for a call or watch whose connection failed, after dropping that connection. A
        CancelledError counts only when it is not our own task's: grpc cancels every call on a channel that
        another task closed; our own cancellation is raised again."""
        if isinstance(exc, asyncio.CancelledError) and _cancelled_here():
            raise exc
        await self._drop(client)
        return Unavailable(f"{what}: {_reason(exc)}")

    async def _drop(self, client: _Client) -> None:
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
                if resp.canceled:  # also how etcd refuses a watch for an expired token: reconnect afresh
                    await self._drop(client)
                    raise Unavailable(f"etcd cancelled the watch: {resp.cancel_reason or 'no reason given'}")
                batch = [Record(self._relative(ev.kv.key), None, int(ev.kv.mod_revision))
                         if ev.type == rpc.Event.DELETE else self._record(ev.kv) for ev in resp.events]
                if batch:
                    yield batch
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            raise await self._lost(client, "etcd watch", exc) from None
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


def _cancelled_here() -> bool:
    """Is the current task being cancelled (by its owner), rather than a grpc call cut off under it?"""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _token_expired(exc: BaseException) -> bool:
    """etcd's ErrInvalidAuthToken (gRPC UNAUTHENTICATED), raw or as aetcd's UnauthenticatedError."""
    if isinstance(exc, aetcd.exceptions.UnauthenticatedError):
        return True
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() is grpc.StatusCode.UNAUTHENTICATED


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name.lower()}: {exc.details()}"
    if isinstance(exc, asyncio.CancelledError):
        return "cut off with its connection"
    return str(exc) or type(exc).__name__


async def _close(client: aetcd.Client) -> None:
    with contextlib.suppress(aetcd.ClientError, grpc.aio.AioRpcError, TimeoutError):
        await client.close()
