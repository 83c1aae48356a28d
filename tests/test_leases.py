"""Lease records as the daemon trusts them: strict decoding, the routed peer table, and this node's ownership of
its own record (conditional renewal, re-creation, never taking back a subnet another node holds), over the real
SQLite registry."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest
from kubernetes_asyncio.client import V1Node, V1NodeSpec, V1ObjectMeta

from pyflannel.daemon import config
from pyflannel.daemon.errors import FlannelError
from pyflannel.daemon.kube import KubeManager
from pyflannel.daemon.lease import BadRecord, EventType, Lease, LeaseAttrs, decode
from pyflannel.daemon.outage import Outage
from pyflannel.daemon.peers import Entry, PeerTable, follow
from pyflannel.daemon.registry import Record, local
from pyflannel.daemon.registry.local import LocalRegistry
from pyflannel.daemon.subnets import LeaseTaken, OwnLease, RegistryManager, RegistrySource

CFG = config.parse('{"Network": "10.244.0.0/16"}')
OK = b'{"PublicIP":"198.18.0.7","PublicIPv6":null}'


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("10.244.3.0-24", b"[" * 5000, "bad_value"),
    ("10.244.3.0-24", b'{"a":' * 2000 + b"1" + b"}" * 2000, "bad_value"),
    ("10.244.3.0-24", b'{"PublicIP":"198.18.0.7","x":"' + b"y" * 20000 + b'"}', "oversize"),
    ("10.244.3.0-24", b"\xff\xfe", "bad_value"),
    ("10.244.3.0-24", b'"198.18.0.7"', "bad_value"),
    ("10.244.3.0-24", b'{"Foo":1}', "bad_public_ip"),
    ("10.244.3.0-24", b'{"PublicIP":5}', "bad_public_ip"),
    ("10.244.3.0-24", b'{"PublicIP":"fc00::1"}', "bad_public_ip"),
    ("10.244.3.0-24", b'{"PublicIP":"0.1.2.3"}', "bad_public_ip"),
    ("10.244.3.0-24", b'{"PublicIP":"127.0.0.1"}', "bad_public_ip"),
    ("10.244.3.0-24", b'{"PublicIP":"239.1.1.1"}', "bad_public_ip"),
    ("10.244.3.0-24", b'{"PublicIP":"255.255.255.255"}', "bad_public_ip"),
    ("10.244.3.0-24", b'{"PublicIP":"198.18.0.7","BackendType":7}', "bad_value"),
    ("evil-10.244.3.0-24", OK, "bad_key"),
    ("10.244.3.0-24x", OK, "bad_key"),
    ("10.244.3.1-24", OK, "bad_key"),
    ("010.244.3.0-24", OK, "bad_key"),
    ("10.244.3.0-24/x", OK, "bad_key"),
    ("10.244.3.0-24\u00e9", OK, "bad_key"),
    ("10.244.300.0-24", OK, "bad_key"),
    ("10.244.3.0-33", OK, "bad_key"),
    ("10.244.3.0-25", OK, "wrong_length"),
    ("10.244.0.0-16", OK, "wrong_length"),
    ("10.99.3.0-24", OK, "outside_network"),
])
def test_every_part_of_a_record_is_checked(key: str, value: bytes, reason: str) -> None:
    with pytest.raises(BadRecord) as bad:
        decode(key, value, CFG)
    assert bad.value.reason == reason, str(bad.value)


def test_a_sound_record_decodes() -> None:
    lease = decode("10.244.3.0-24&fc00::-64", OK, CFG)
    assert lease.subnet == ipaddress.IPv4Network("10.244.3.0/24")
    assert lease.attrs == LeaseAttrs(ipaddress.IPv4Address("198.18.0.7"))


def _lease(subnet: str, ip: str = "198.18.0.7") -> Lease:
    return Lease(ipaddress.IPv4Network(subnet), LeaseAttrs(ipaddress.IPv4Address(ip)))


def test_overlapping_leases_first_holder_wins_and_the_next_waits_its_turn() -> None:
    table = PeerTable(_lease("10.244.1.0/24"))
    first, second = _lease("10.244.8.0/22", "198.18.0.8"), _lease("10.244.9.0/24", "198.18.0.9")
    events = table.apply([("a", Entry(first)), ("b", Entry(second)), ("own", Entry(_lease("10.244.1.0/25")))])
    assert [(e.type, e.lease) for e in events] == [(EventType.ADDED, first)]
    assert table.rejected["overlap"] == 2
    events = table.apply([("a", None)])
    assert [(e.type, e.lease) for e in events] == [(EventType.REMOVED, first), (EventType.ADDED, second)]


def test_a_garbled_update_keeps_the_route_and_a_snapshot_removes_what_is_gone() -> None:
    table = PeerTable(_lease("10.244.1.0/24"))
    peer = _lease("10.244.2.0/24")
    assert [e.type for e in table.apply([("10.244.2.0-24", Entry(peer))])] == [EventType.ADDED]
    assert table.apply([("10.244.2.0-24", Entry(BadRecord("bad_value", "garbage")))]) == []
    assert table.routed == {"10.244.2.0-24": peer} and table.rejected["bad_value"] == 1
    assert [(e.type, e.lease) for e in table.reset({})] == [(EventType.REMOVED, peer)]


def _own(tmp_path: Path) -> tuple[LocalRegistry, OwnLease]:
    conf = tmp_path / "net.json"
    conf.write_text('{"Network": "10.244.0.0/16"}')
    registry = LocalRegistry(str(tmp_path / "r.db"), str(conf))
    return registry, OwnLease(registry, config.parse(conf.read_text()), _lease("10.244.5.0/24"),
                              Record("10.244.5.0-24", None), Outage("registry"), exit_on_loss=False)


def test_renewal_writes_only_over_our_own_record(tmp_path: Path) -> None:
    async def go() -> None:
        registry, own = _own(tmp_path)
        written = await registry.create(own.key, own.value, 3600)
        own.revision = written.revision
        await own.renew()
        (record,), _ = await registry.list_records()
        assert record.revision == own.revision > written.revision, "renewed, conditional on our revision"
        await registry.delete(own.key, own.revision)
        await own.renew()
        (record,), _ = await registry.list_records()
        assert record.value == own.value, "gone while the subnet was free: created again"
        taken = b'{"PublicIP":"198.18.0.99","PublicIPv6":null}'
        await registry.replace(own.key, taken, 3600, record.revision)
        with pytest.raises(LeaseTaken, match=r"is now held by 198\.18\.0\.99"):
            await own.renew()
        (record,), _ = await registry.list_records()
        assert record.value == taken, "the other node's lease is left alone"
        await registry.close()
    asyncio.run(go())


def test_the_watch_restores_a_garbled_own_record_and_exits_on_a_foreign_one(tmp_path: Path) -> None:
    async def go() -> None:
        registry, own = _own(tmp_path)
        written = await registry.create(own.key, b"garbage", 3600)
        await own.observe(Entry(BadRecord("bad_value", "garbage"), written.revision))
        (record,), _ = await registry.list_records()
        assert record.value == own.value and own.revision == record.revision
        with pytest.raises(LeaseTaken):
            await own.observe(Entry(_lease("10.244.5.0/24", "198.18.0.99"), record.revision + 1))
        await registry.close()
    asyncio.run(go())


def test_exit_on_lease_loss_keeps_flannels_behaviour(tmp_path: Path) -> None:
    async def go() -> None:
        registry, own = _own(tmp_path)
        own.exit_on_loss = True
        with pytest.raises(Exception, match="Lease has been revoked") as revoked:
            await own.observe(None)
        assert getattr(revoked.value, "status", None) == 0
        await registry.close()
    asyncio.run(go())


def test_acquire_reuses_our_record_conditionally(tmp_path: Path) -> None:
    async def go() -> None:
        registry, own = _own(tmp_path)
        manager = RegistryManager(registry, 60, Outage("registry"), exit_on_loss=False)
        cfg = own.cfg
        me = LeaseAttrs(ipaddress.IPv4Address("198.18.0.7"))
        first = await manager.acquire(cfg, me, (None, None))
        again = await manager.acquire(cfg, me, (None, None))
        assert again.subnet == first.subnet
        records, _ = await registry.list_records()
        assert len(records) == 1
        await registry.close()
    asyncio.run(go())


def test_a_watch_that_falls_behind_the_history_lists_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "EVENT_HISTORY", 3)

    async def go() -> None:
        registry, own = _own(tmp_path)
        await registry.create(own.key, own.value, 3600)
        other = LocalRegistry(registry.path, registry.config_path)
        await other.create("10.244.9.0-24", OK, 3600)
        outage = Outage("registry")
        table = PeerTable(own.lease)
        events = follow(RegistrySource(registry, own.cfg, own), table, outage)
        # The listing's events: the watch starts from here only when asked for more, so the six records below
        # all land while it is not looking, more than the history keeps.
        assert len(await asyncio.wait_for(anext(events), 10)) == 1
        keys = [f"10.244.{i}.0-24" for i in range(10, 16)]
        for key in keys:
            await other.create(key, OK, 3600)
        while len(table.routed) < len(keys) + 1:
            await asyncio.wait_for(anext(events), 10)
        assert sorted(table.routed) == sorted(["10.244.9.0-24", *keys])
        assert outage.errors >= 1, "the watch was compacted and listed again"
        await events.aclose()
        await other.close()
        await registry.close()
    asyncio.run(go())


@pytest.mark.parametrize("content", [b"", b"SQLite format 3\x00" + b"\x00" * 100, b"not a database" * 100])
def test_a_damaged_registry_file_is_refused_not_recreated(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "r.db"
    path.write_bytes(content)
    with pytest.raises(FlannelError, match=r"local registry .* (damaged|not an SQLite database)"):
        LocalRegistry(str(path), str(tmp_path / "net.json"))
    assert path.read_bytes() == content, "left as it was, for the operator"


@pytest.mark.parametrize(("pod_cidr", "annotations", "reason"), [
    ("10.99.0.0/24", {}, "outside_network"),
    ("10.244.7.0/24", {"public-ip": "0.0.0.0"}, "bad_public_ip"),
    ("10.244.7.0/24", {"public-ip": "224.0.0.1"}, "bad_public_ip"),
    ("10.244.7.0/24", {"public-ip": None}, "bad_public_ip"),
    ("10.244.7.0/24", {"backend-data": "[" * 5000}, "bad_value"),
    ("10.244.7.0/24", {"backend-data": '{"x":"' + "y" * 20000 + '"}'}, "bad_value"),
    ("not-a-cidr", {}, "bad_value"),
])
def test_every_part_of_a_kubernetes_node_lease_is_checked(monkeypatch: pytest.MonkeyPatch, pod_cidr: str,
                                                          annotations: dict[str, str | None], reason: str) -> None:
    """The same checks as registry records, for leases that Nodes advertise (--kube-subnet-mgr)."""
    monkeypatch.setenv("NODE_NAME", "me")
    manager = KubeManager(net_config_path="", kubeconfig="", api_url="", annotation_prefix="flannel.alpha.coreos.com",
                          set_network_unavailable=False)
    source = manager.source(config.parse('{"Network": "10.244.0.0/16"}'))
    prefix = "flannel.alpha.coreos.com/"
    ann = {prefix + "kube-subnet-manager": "true", prefix + "public-ip": "198.18.0.7", prefix + "backend-type": "",
           prefix + "backend-data": "null"}
    ann.update({prefix + k: v for k, v in annotations.items() if v is not None})
    for k in (k for k, v in annotations.items() if v is None):
        del ann[prefix + k]
    node = V1Node(metadata=V1ObjectMeta(name="other", annotations=ann), spec=V1NodeSpec(pod_cidr=pod_cidr))
    entry = source._entry(node)
    assert entry is not None and isinstance(entry.lease, BadRecord) and entry.lease.reason == reason, entry
    table = PeerTable(_lease("10.244.1.0/24"))
    assert table.apply([("other", entry)]) == [] and table.rejected[reason] == 1
