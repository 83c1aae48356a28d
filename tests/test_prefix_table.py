"""PrefixTable against a plain-Python longest-prefix match, over random route sets of both families (IPv4 and IPv6
prefixes, IPv4 and IPv6 peers) with overlaps and deletes."""

from __future__ import annotations

import ipaddress
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyflannel.dataplane import _testing
from pyflannel.dataplane._engine import PrefixTable

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Addr = ipaddress.IPv4Address | ipaddress.IPv6Address
V4, V6 = ipaddress.IPv4Network, ipaddress.IPv6Network


def reference(routes: dict[Net, tuple[str, int]], addr: Addr) -> tuple[str, int] | None:
    best = max((net for net in routes if net.version == addr.version and addr in net),
               key=lambda net: net.prefixlen, default=None)
    return None if best is None else routes[best]


# Addresses clustered in a few /8s and /16s (IPv4), or under fd00:10:244::/48 and in a few /64s (IPv6), so that
# random prefixes overlap often; any length.
addresses4 = st.one_of(
    st.integers(0, 2**32 - 1),
    st.builds(lambda lo: (10 << 24) | (244 << 16) | lo, st.integers(0, 2**16 - 1)),
    st.builds(lambda lo: (10 << 24) | lo, st.integers(0, 2**24 - 1)),
).map(ipaddress.IPv4Address)
addresses6 = st.one_of(
    st.integers(0, 2**128 - 1),
    st.builds(lambda lo: (0xFD00_0010_0244 << 80) | lo, st.integers(0, 2**80 - 1)),
    st.builds(lambda mid, lo: (0xFD00_0010_0244 << 80) | (mid << 64) | lo, st.integers(0, 3), st.integers(0, 256)),
).map(ipaddress.IPv6Address)
addresses = st.one_of(addresses4, addresses6)
prefixes = st.one_of(
    st.builds(lambda a, plen: V4((a, plen), strict=False), addresses4, st.integers(0, 32)),
    st.builds(lambda a, plen: V6((a, plen), strict=False), addresses6, st.integers(0, 128)),
)
peers = st.one_of(
    st.builds(lambda a: str(ipaddress.IPv4Address(a)), st.integers(1, 2**32 - 2)),
    st.builds(lambda a: str(ipaddress.IPv6Address((0x2001_0002 << 96) | a)), st.integers(1, 40)),
)
hops = st.tuples(peers, st.integers(1, 65535))
operations = st.lists(st.tuples(st.booleans(), prefixes, hops), max_size=60)


def probes(routes: dict[Net, tuple[str, int]], extra: list[Addr]) -> list[Addr]:
    """Every route's first, last and neighbouring addresses, plus random ones."""
    out = list(extra)
    for net in routes:
        kind = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
        lo, hi = int(net.network_address), int(net.broadcast_address)
        out += [kind(a) for a in (lo, hi, max(lo - 1, 0), min(hi + 1, 2**net.max_prefixlen - 1))]
    return out


@settings(max_examples=300, deadline=None)
@given(operations, st.lists(addresses, max_size=40))
def test_matches_reference(ops: list[tuple[bool, Net, tuple[str, int]]], extra: list[Addr]) -> None:
    table = PrefixTable()
    model: dict[Net, tuple[str, int]] = {}
    for delete, net, hop in ops:
        if delete and net in model:
            table.delete(str(net))
            del model[net]
        else:
            table.set(str(net), *hop)
            model[net] = hop
    assert len(table) == len(model)
    assert {(ipaddress.ip_network(p), (ip, port)) for p, ip, port in table} == set(model.items())
    for addr in probes(model, extra):
        assert table.lookup(str(addr)) == reference(model, addr)


def test_default_route_and_host_route() -> None:
    table = PrefixTable()
    table.update([("0.0.0.0/0", "198.18.0.1", 1), ("10.244.3.7/32", "198.18.0.2", 2)])
    assert table.lookup("1.2.3.4") == ("198.18.0.1", 1)
    assert table.lookup("10.244.3.7") == ("198.18.0.2", 2)
    assert table.lookup("10.244.3.8") == ("198.18.0.1", 1)
    table.delete("0.0.0.0/0")
    assert table.lookup("1.2.3.4") is None


def test_host_bits_are_masked_and_replace_is_in_place() -> None:
    table = PrefixTable()
    table.set("10.244.1.77/24", "198.18.0.1", 8285)
    table.set("10.244.1.0/24", "198.18.0.9", 8285)
    assert list(table) == [("10.244.1.0/24", "198.18.0.9", 8285)]


def test_errors() -> None:
    table = PrefixTable()
    with pytest.raises(KeyError):
        table.delete("10.0.0.0/8")
    with pytest.raises(ValueError):
        table.set("10.0.0.0/33", "198.18.0.1", 1)
    with pytest.raises(ValueError):
        table.set("10.0.0.0/8", "not-an-ip", 1)
    with pytest.raises(ValueError):
        table.set("10.0.0.0/8", "198.18.0.1", 0)
    assert len(table) == 0, "a failed update changes nothing"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_batches_match_reference(data: st.DataObject) -> None:
    """update(set=..., delete=...) in random batches, deletes picked among existing routes (and now and then a
    missing one, which must fail and change nothing), checked against the model after every batch."""
    table = PrefixTable()
    model: dict[Net, tuple[str, int]] = {}
    for _ in range(data.draw(st.integers(1, 10))):
        sets = data.draw(st.lists(st.tuples(prefixes, hops), max_size=12))
        dels = sorted(data.draw(st.sets(st.sampled_from(sorted(model, key=str)))) if model else [], key=str)
        missing = data.draw(st.one_of(st.none(), prefixes.filter(lambda n: n not in model)))
        routes = [(str(n), *hop) for n, hop in sets]
        if missing is not None:
            with pytest.raises(KeyError):
                table.update(set=routes, delete=[*map(str, dels), str(missing)])
        else:
            table.update(set=routes, delete=[str(n) for n in dels])
            for net in dels:
                del model[net]
            model.update(sets)
        assert {(ipaddress.ip_network(p), (ip, port)) for p, ip, port in table} == set(model.items())
        for addr in probes(model, data.draw(st.lists(addresses, max_size=10))):
            assert table.lookup(str(addr)) == reference(model, addr)


def test_delete_hands_addresses_back_to_the_covering_route() -> None:
    table = PrefixTable()
    table.update(set=[("10.0.0.0/8", "198.18.0.1", 1), ("10.244.0.0/16", "198.18.0.2", 2),
                      ("10.244.1.0/24", "198.18.0.3", 3), ("10.244.1.128/25", "198.18.0.4", 4)])
    table.update(delete=["10.244.1.0/24", "10.244.0.0/16"])
    assert table.lookup("10.244.1.1") == ("198.18.0.1", 1)
    assert table.lookup("10.244.1.200") == ("198.18.0.4", 4)
    table.update(set=[("10.244.1.0/24", "198.18.0.5", 5)], delete=["10.244.1.128/25"])
    assert table.lookup("10.244.1.200") == ("198.18.0.5", 5)
    table.update(delete=["10.244.1.0/24", "10.0.0.0/8"])
    assert table.lookup("10.244.1.200") is None and len(table) == 0


def test_a_batch_deletes_before_it_sets() -> None:
    table = PrefixTable()
    table.set("10.244.1.0/24", "198.18.0.1", 1)
    table.update(set=[("10.244.1.0/24", "198.18.0.2", 2)], delete=["10.244.1.0/24"])
    assert list(table) == [("10.244.1.0/24", "198.18.0.2", 2)]


def test_updates_under_a_concurrent_reader() -> None:
    """Batches of changes (replacing peers, deleting, re-adding, nested prefixes) of both families while a C
    thread reads the table the way an engine thread does. Every leaf it sees must be one of the two peers; `make
    debug` runs this under AddressSanitizer, which reports any node freed while the reader could still reach it."""
    subnets = [f"10.{i // 256}.{i % 256}.0/24" for i in range(2_000)] + [f"fd00:{i:x}::/64" for i in range(1_000)]
    batches: list[tuple[list[tuple[str, str, int]], list[str]]] = [
        ([(s, "198.18.0.1", 8285) for s in subnets] + [("10.0.0.0/8", "198.18.0.2", 8285),
                                                       ("fd00::/16", "198.18.0.2", 8285)], [])
    ]
    for round_ in range(60):
        peer = ("198.18.0.1", "198.18.0.2")[round_ % 2]
        part = subnets[round_ * 50 % 3_000:][:300]
        batches.append(([(s, peer, 8285) for s in part], []))
        batches.append(([], part[:150]))
        shorter = [f"{s.rsplit('/')[0]}/{25 if '.' in s else 80}" for s in part[150:]]
        batches.append(([(s, peer, 8285) for s in part[:150]] + [(s, peer, 1) for s in shorter], []))
    probes = array("I", (int(ipaddress.IPv4Address(f"10.{i // 256}.{i % 256}.{i % 200}")) for i in range(2_100)))
    probes6 = b"".join(ipaddress.IPv6Address(f"fd00:{i:x}::{i % 7:x}").packed for i in range(1_100))
    rounds, wrong = _testing.race(_testing.PrefixTable(), batches, probes, "198.18.0.1", "198.18.0.2", probes6)
    assert rounds > 0 and wrong == 0
