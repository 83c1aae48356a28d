"""What is particular to IPv6 in the PrefixTable (tests/test_prefix_table.py checks both families against a
reference): the two families never meet, and IPv6 peers live in slots that routes point to."""

from __future__ import annotations

import pytest

from pyflannel.dataplane._engine import PrefixTable


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


def test_an_ipv6_peer_that_returns_is_routed_again() -> None:
    """Routes hold an IPv6 peer's slot: a peer that leaves and returns (in one batch or later) is found again."""
    table = PrefixTable()
    for i in range(3):
        table.set("fd00:10:244:1::/64", f"2001:2::{i + 1}", 8285)
        table.set("fd00:10:244:1::/64", "2001:2::1", 8285)
    assert table.lookup("fd00:10:244:1::1") == ("2001:2::1", 8285)
    assert list(table.peer_counts()) == ["2001:2::1"]
