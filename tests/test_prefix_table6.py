"""PrefixTable with IPv6 prefixes and IPv6 peers, against Python's ipaddress: random route sets of both families
with overlaps and deletes, and the lock-free reader racing the writer over both tries."""

from __future__ import annotations

import ipaddress
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane._engine import PrefixTable, _testhelper_race

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Addr = ipaddress.IPv4Address | ipaddress.IPv6Address
V6 = ipaddress.IPv6Network


def reference(routes: dict[Net, tuple[str, int]], addr: Addr) -> tuple[str, int] | None:
    """The longest prefix of addr's family that holds it, the slow obvious way."""
    best = max((net for net in routes if net.version == addr.version and addr in net),
               key=lambda net: net.prefixlen, default=None)
    return None if best is None else routes[best]


# Addresses clustered under fd00:10:244::/48 and in a few /64s so that random prefixes overlap; any length.
addresses6 = st.one_of(
    st.integers(0, 2**128 - 1),
    st.builds(lambda lo: (0xFD00_0010_0244 << 80) | lo, st.integers(0, 2**80 - 1)),
    st.builds(lambda mid, lo: (0xFD00_0010_0244 << 80) | (mid << 64) | lo, st.integers(0, 3), st.integers(0, 2**8)),
).map(ipaddress.IPv6Address)
addresses4 = st.builds(lambda lo: ipaddress.IPv4Address((10 << 24) | (244 << 16) | lo), st.integers(0, 2**16 - 1))
prefixes = st.one_of(
    st.builds(lambda a, plen: V6((a, plen), strict=False), addresses6, st.integers(0, 128)),
    st.builds(lambda a, plen: ipaddress.IPv4Network((a, plen), strict=False), addresses4, st.integers(8, 32)),
)
peers = st.one_of(
    st.builds(lambda a: str(ipaddress.IPv6Address((0x2001_0002 << 96) | a)), st.integers(1, 40)),
    st.builds(lambda a: str(ipaddress.IPv4Address("198.18.0.0") + a), st.integers(1, 40)),
)
hops = st.tuples(peers, st.integers(1, 65535))
operations = st.lists(st.tuples(st.booleans(), prefixes, hops), max_size=60)


def probes(routes: dict[Net, tuple[str, int]], extra: list[Addr]) -> list[Addr]:
    """Every route's first and last addresses and their neighbours, plus random ones."""
    out = list(extra)
    for net in routes:
        top = 2 ** net.max_prefixlen - 1
        lo, hi = int(net.network_address), int(net.broadcast_address)
        out += [ipaddress.ip_address(a) if net.version == 4 else ipaddress.IPv6Address(a)
                for a in (lo, hi, max(lo - 1, 0), min(hi + 1, top))]
    return out


@settings(max_examples=300, deadline=None)
@given(operations, st.lists(st.one_of(addresses6, addresses4), max_size=40))
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
        assert table.lookup(str(addr)) == reference(model, addr), addr


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_batches_match_reference(data: st.DataObject) -> None:
    """Mixed-family batches, a missing delete failing the whole batch, checked after every batch."""
    table = PrefixTable()
    model: dict[Net, tuple[str, int]] = {}
    for _ in range(data.draw(st.integers(1, 8))):
        sets = data.draw(st.lists(st.tuples(prefixes, hops), max_size=12))
        dels = data.draw(st.sets(st.sampled_from(sorted(model, key=str)))) if model else set()
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
        for addr in probes(model, []):
            assert table.lookup(str(addr)) == reference(model, addr), addr


def test_families_are_separate_tries() -> None:
    """::/0 routes no IPv4 address, 0.0.0.0/0 no IPv6 one, and ::a.b.c.d is not a.b.c.d."""
    table = PrefixTable()
    table.update([("::/0", "2001:2::1", 1), ("0.0.0.0/0", "198.18.0.1", 2), ("::10.244.1.0/120", "2001:2::2", 3)])
    assert table.lookup("10.244.1.1") == ("198.18.0.1", 2)
    assert table.lookup("::10.244.1.1") == ("2001:2::2", 3)
    assert table.lookup("fd00::1") == ("2001:2::1", 1)
    table.delete("::/0")
    assert table.lookup("fd00::1") is None and table.lookup("1.2.3.4") == ("198.18.0.1", 2)


def test_host_routes_and_errors() -> None:
    table = PrefixTable()
    table.set("fd00:10:244:1::7/128", "2001:2::1", 8285)
    table.set("fd00:10:244:1::77/64", "198.18.0.9", 8285)
    assert table.lookup("fd00:10:244:1::7") == ("2001:2::1", 8285)
    assert table.lookup("fd00:10:244:1::8") == ("198.18.0.9", 8285)
    assert ("fd00:10:244:1::/64", "198.18.0.9", 8285) in list(table)
    with pytest.raises(ValueError):
        table.set("fd00::/129", "2001:2::1", 1)
    with pytest.raises(ValueError):
        table.set("fd00::/64", "2001:2::zz", 1)
    with pytest.raises(KeyError):
        table.delete("fd00:1::/64")
    assert len(table) == 2, "a failed update changes nothing"


def test_an_ipv6_peer_keeps_its_slot_and_counts_stay_bounded() -> None:
    """Routes hold an IPv6 peer's slot: a peer that comes back gets it again, and distinct addresses beyond the
    table's size are refused with a clear error instead of being mixed up."""
    table = PrefixTable()
    for i in range(3):
        table.set("fd00:10:244:1::/64", f"2001:2::{i + 1}", 8285)
        table.set("fd00:10:244:1::/64", "2001:2::1", 8285)
    assert table.lookup("fd00:10:244:1::1") == ("2001:2::1", 8285)
    table.update(set=[(f"fd00:10:244:{i:x}::/64", f"2001:2::1:{i:x}", 8285) for i in range(2, 2046)])
    with pytest.raises(ValueError, match="IPv6 peer addresses"):
        table.update(set=[(f"fd00:10:245:{i:x}::/64", f"2001:2::2:{i:x}", 8285) for i in range(3)])
    assert table.lookup("fd00:10:245:1::1") is None


def test_updates_under_a_concurrent_reader() -> None:
    """As test_prefix_table's race, with IPv6 prefixes (their lookups walk up to 16 levels) in every batch;
    `make debug` runs it under AddressSanitizer."""
    subnets = [f"fd00:10:244:{i:x}::/64" for i in range(1_000)]
    batches: list[tuple[list[tuple[str, str, int]], list[str]]] = [
        ([(s, "198.18.0.1", 8285) for s in subnets] + [("fd00:10:244::/48", "198.18.0.2", 8285),
                                                       ("10.0.0.0/8", "198.18.0.2", 8285)], [])
    ]
    for round_ in range(40):
        peer = ("198.18.0.1", "198.18.0.2")[round_ % 2]
        part = subnets[round_ * 25 % 1_000:][:200]
        batches.append(([(s, peer, 8285) for s in part], []))
        batches.append(([], part[:100]))
        batches.append(([(s, peer, 8285) for s in part[:100]] + [(f"{s[:-3]}/80", peer, 1) for s in part[100:]], []))
    probes4 = array("I", (int(ipaddress.IPv4Address(f"10.{i // 256}.{i % 256}.1")) for i in range(200)))
    probes6 = b"".join(ipaddress.IPv6Address(f"fd00:10:244:{i:x}::{i % 7:x}").packed for i in range(1_100))
    rounds, wrong = _testhelper_race(PrefixTable(), batches, probes4, "198.18.0.1", "198.18.0.2", probes6)
    assert rounds > 0 and wrong == 0
