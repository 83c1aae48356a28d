"""Micro-benchmarks of the engine's C paths (pytest-benchmark): `make micro`, results in bench/RESULTS.md.

Prefix-table lookups go through PrefixTable.count_matches, which loops in C, so the figure is the C lookup and
not Python call overhead; split and coalesce include building the Python bytes objects they return.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from array import array
from typing import Any

import pytest

from pyflannel.dataplane._engine import PrefixTable
from pyflannel.dataplane._testing import GSO_TCPV4, checksum, coalesce, split, steer_counts
from pyflannel.dataplane.tunnel import all_peers, parse_config

LOOKUPS = 100_000
Benchmark = Any  # pytest-benchmark's fixture type is not exported


def _table(routes: int) -> PrefixTable:
    """`routes` /26 leases scattered over 10.0.0.0/8, under a /8 route that catches the rest."""
    rng = random.Random(routes)
    table = PrefixTable()
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    subnets = rng.sample(range(1 << 18), routes)
    table.update((f"{ipaddress.IPv4Address(base + (s << 6))}/26", "198.18.0.1", 8285) for s in subnets)
    table.set("10.0.0.0/8", "198.18.0.2", 8285)
    return table


@pytest.mark.parametrize("routes", [10, 1_000, 100_000])
@pytest.mark.parametrize("pattern", ["random", "sequential"])
def test_prefix_table_lookup(benchmark: Benchmark, routes: int, pattern: str) -> None:
    table = _table(routes)
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    if pattern == "random":
        rng = random.Random(1)
        addrs = array("I", (base + rng.randrange(1 << 24) for _ in range(LOOKUPS)))
    else:
        addrs = array("I", range(base, base + LOOKUPS))
    benchmark.extra_info["lookups_per_call"] = LOOKUPS
    hits = benchmark(table.count_matches, addrs)
    assert hits == LOOKUPS


def test_steer_hash(benchmark: Benchmark) -> None:
    """The flow hash the TX side computes per segment with GSO (steering.h), 100,000 TCP headers of many flows."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0x4000, 64, 6, 0, bytes([10, 244, 1, 2]), bytes([10, 244, 2, 3]))
    packets = b"".join(ip + struct.pack("!HHIIBBHHH", 32768 + i % 20000, 5201, i, 1, 0x50, 0x10, 512, 0, 0)
                       for i in range(LOOKUPS))
    benchmark.extra_info["packets_per_call"] = LOOKUPS
    counts = benchmark(steer_counts, packets, 40, 4)
    assert sum(counts) == LOOKUPS and min(counts) > LOOKUPS // 8


def _super_packet() -> bytes:
    payload = bytes(range(256)) * 255  # 65280 bytes: 45 segments of 1448 after headers
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 0x50, 0x10, 512, 0, 0)
    total = 20 + len(tcp) + 65535 - 20 - 20 - 1
    body = tcp + payload[: total - 40]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0x4000, 64, 6, 0, bytes([10, 244, 1, 2]),
                     bytes([10, 244, 2, 3]))
    return ip + body


def test_split_64k(benchmark: Benchmark) -> None:
    packet = _super_packet()
    segments = benchmark(split, packet, GSO_TCPV4, 1448)
    assert len(segments) == 46


def test_coalesce_64k(benchmark: Benchmark) -> None:
    segments = split(_super_packet(), GSO_TCPV4, 1448)
    written = benchmark(coalesce, segments)
    assert len(written) == 1


def test_checksum_1500(benchmark: Benchmark) -> None:
    data = bytes(range(256)) * 6
    benchmark(checksum, data[:1500])


ROUTES = 20_000
CHANGES = 20  # per round: CHANGES/2 new routes set, then deleted again


def _new_prefixes(count: int) -> list[str]:
    """/26 prefixes in 11.0.0.0/8, outside every _table route, so each set adds and each delete removes one."""
    return [f"{ipaddress.IPv4Address((11 << 24) + (i << 6))}/26" for i in range(count)]


def test_route_changes_one_at_a_time(benchmark: Benchmark) -> None:
    """Single set()/delete() calls at 20,000 routes, each published on its own (a lease event each)."""
    table = _table(ROUTES)
    prefixes = _new_prefixes(CHANGES // 2)

    def change() -> None:
        for prefix in prefixes:
            table.set(prefix, "198.18.0.3", 8285)
        for prefix in prefixes:
            table.delete(prefix)

    benchmark.extra_info["changes_per_call"] = CHANGES
    benchmark.pedantic(change, rounds=5, warmup_rounds=1)
    assert len(table) == ROUTES + 1


def test_route_changes_in_batches(benchmark: Benchmark) -> None:
    """update() batches of 1,000 changes at 20,000 routes (one batch of lease events, one publish)."""
    table = _table(ROUTES)
    prefixes = _new_prefixes(1_000)

    def change() -> None:
        table.update(set=[(prefix, "198.18.0.3", 8285) for prefix in prefixes])
        table.update(delete=prefixes)

    benchmark.extra_info["changes_per_call"] = 2 * len(prefixes)
    benchmark.pedantic(change, rounds=5, warmup_rounds=1)
    assert len(table) == ROUTES + 1


PEERS = [(f"{ipaddress.IPv4Address('10.0.0.0') + (i << 8)}/24", str(ipaddress.IPv4Address("198.18.0.1") + i), 8285)
         for i in range(4_000)]


def test_startup_4000_peers_one_at_a_time(benchmark: Benchmark) -> None:
    """flannel-tunnel's start with 4,000 peers: one set() per peer, from an empty table."""

    def build() -> PrefixTable:
        table = PrefixTable()
        for route in PEERS:
            table.set(*route)
        return table

    table = benchmark.pedantic(build, rounds=3)
    assert len(table) == 4_000


def test_startup_4000_peers_one_batch(benchmark: Benchmark) -> None:
    """The same 4,000 peers as one update() batch."""

    def build() -> PrefixTable:
        table = PrefixTable()
        table.update(set=PEERS)
        return table

    table = benchmark.pedantic(build, rounds=5)
    assert len(table) == 4_000


def test_peers_file_4000_checked(benchmark: Benchmark, tmp_path: Any) -> None:
    """flannel-tunnel's start with 4,000 peers in --peers-file: read, parsed and checked for overlaps (the part
    of the start before the table; was quadratic in peers)."""
    path = tmp_path / "peers"
    path.write_text("".join(f"{subnet}={peer}\n" for subnet, peer, _ in PEERS))
    cfg = parse_config(["--iface-ip", "198.18.0.1", "--subnet", "10.255.0.0/24", "--network", "10.0.0.0/8",
                        "--peers-file", str(path)])
    peers = benchmark.pedantic(all_peers, args=(cfg,), rounds=3)
    assert len(peers) == 4_000
