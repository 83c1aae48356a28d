"""Peer slots (src_ext/peer_slots.h): no lifetime limit, a full table refuses just the routes to new peers, and a
slot is never reused while an engine thread can still see it. `make debug` runs this file under AddressSanitizer."""

from __future__ import annotations

import ipaddress
from array import array

from pyflannel.dataplane import _testing
from pyflannel.dataplane._engine import PEER_CAPACITY, PrefixTable

PER_FAMILY = PEER_CAPACITY[4]
assert PEER_CAPACITY[6] == PER_FAMILY


def _v4(n: int) -> str:
    return str(ipaddress.IPv4Address(0x0A000000 + n))


def _v6(n: int) -> str:
    return str(ipaddress.IPv6Address((0x20010002 << 96) + n))


def test_tens_of_thousands_of_distinct_peers_over_one_tables_life() -> None:
    """Routes to 60,000 distinct peers of each family, 1,000 at a time, each set removed before the next comes:
    far more than the table holds at once, and the last ones route and count like the first."""
    table = PrefixTable()
    subnets = [f"10.244.{i // 16}.{i % 16 * 16}/28" for i in range(1_000)]
    subnets6 = [f"fd00:10:244:{i:x}::/64" for i in range(1_000)]
    for round_ in range(60):
        base = round_ * 1_000
        refused = table.update(set=[(s, _v4(base + i), 8285) for i, s in enumerate(subnets)]
                               + [(s, _v6(base + i), 8285) for i, s in enumerate(subnets6)])
        assert refused == {}
        assert table.lookup("10.244.62.77") == (_v4(base + 996), 8285)
        assert table.lookup("fd00:10:244:3e7::1") == (_v6(base + 999), 8285)
        if round_ % 2 == 0:  # every other round empties the table; the others replace every peer in one batch
            table.update(delete=subnets + subnets6)
    counts = table.peer_counts()
    assert len(counts) == 2_000 and _v4(59_000) in counts and _v6(59_999) in counts and _v4(0) not in counts


def test_a_full_table_refuses_only_routes_to_new_peers_until_slots_free() -> None:
    table = PrefixTable()
    full = [(f"10.{i >> 8 & 255}.{i & 255}.0/24", _v4(i), 8285) for i in range(PER_FAMILY - 1)]
    full6 = [(f"fd00:{i:x}::/64", _v6(i), 8285) for i in range(PER_FAMILY)]
    assert table.update(set=full + full6) == {}
    assert table.set("10.244.0.0/24", "198.18.0.1", 8285) == {}, "the last IPv4 slot"
    refused = table.update(set=[("172.16.0.0/24", _v4(0), 1),       # a peer that has a slot: routed
                                ("172.16.1.0/24", "198.18.0.2", 2),  # a new peer: no slot left
                                ("fd00:ffff::/64", "2001:db8::2", 3),  # the same for IPv6
                                ("10.244.0.0/24", "198.18.0.3", 4)])  # a route moving to a new peer
    assert refused == {
        "172.16.1.0/24": f"the IPv4 peer table is full ({PER_FAMILY} peers)",
        "fd00:ffff::/64": f"the IPv6 peer table is full ({PER_FAMILY} peers)",
        "10.244.0.0/24": f"the IPv4 peer table is full ({PER_FAMILY} peers)",
    }
    assert table.lookup("172.16.0.1") == (_v4(0), 1)
    assert table.lookup("172.16.1.1") is None and table.lookup("fd00:ffff::1") is None
    assert table.lookup("10.244.0.1") is None, "a refused route leaves no route to the old peer"
    assert len(table) == 2 * PER_FAMILY
    table.update(delete=[prefix for prefix, _, _ in full[:2] + full6[:1]])
    assert table.update(set=[("172.16.1.0/24", "198.18.0.2", 2), ("fd00:ffff::/64", "2001:db8::2", 3),
                             ("10.244.0.0/24", "198.18.0.3", 4)]) == {}
    assert table.lookup("fd00:ffff::1") == ("2001:db8::2", 3) and table.lookup("10.244.0.1") == ("198.18.0.3", 4)


def test_a_failed_update_keeps_no_slot() -> None:
    """A batch refused as a whole (here: a delete of a prefix that has no route) takes no peer's slot."""
    table = PrefixTable()
    full = [(f"fd00:{i:x}::/64", _v6(i), 8285) for i in range(PER_FAMILY - 1)]
    assert table.update(set=full) == {}
    for n in range(3):
        try:
            table.update(set=[("fd00:ffff::/64", _v6(100_000 + n), 1)], delete=["fd00:eeee::/64"])
        except KeyError:
            pass
        else:
            raise AssertionError("the delete of a missing route must fail")
    assert table.update(set=[("fd00:ffff::/64", _v6(200_000), 1)]) == {}, "the last slot is still free"
    assert table.lookup("fd00:ffff::1") == (_v6(200_000), 1) and len(table.peer_counts()) == PER_FAMILY


def test_slots_are_not_reused_under_a_reader() -> None:
    """A C thread follows routes to their peers' slots as the engine threads do (by slot number for IPv6
    peers, by address for IPv4 ones), while every route moves to a new peer in each of 800 batches: 51,200
    distinct peers of each family through 8,192 slots, so slots are reused all along. The reader must never
    see a slot of another prefix's peer, nor a slot change owner while it holds the table."""
    prefixes = [f"10.244.{k}.0/24" for k in range(64)]
    prefixes6 = [f"fd00:10:244:{k:x}::/64" for k in range(64)]
    batches: list[tuple[list[tuple[str, str, int]], list[str]]] = []
    for r in range(800):
        # The peer of prefix k ends in the byte k; half the prefixes of each family have IPv6 peers.
        peer4 = [_v4(r << 8 | k) if k % 2 else _v6(r << 16 | k) for k in range(64)]
        peer6 = [_v6(r << 16 | k) if k % 2 else _v4(r << 8 | k) for k in range(64)]
        batches.append(([(p, peer4[k], 8285) for k, p in enumerate(prefixes)]
                        + [(p, peer6[k], 8285) for k, p in enumerate(prefixes6)], []))
    probes = array("I", (int(ipaddress.IPv4Address(f"10.244.{k}.9")) for k in range(64)))
    probes6 = b"".join(ipaddress.IPv6Address(f"fd00:10:244:{k:x}::9").packed for k in range(64))
    table = _testing.PrefixTable()
    rounds, found, wrong = _testing.slot_race(table, batches, probes, probes6)
    assert rounds > 0 and found > 0 and wrong == 0
    assert len(table.peer_counts()) == 128
