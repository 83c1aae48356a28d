"""flannel's nftables mode, applied with the real nft in a namespace and read back as nft lists it: flannel's
e2e golden chains (e2e/rules.go), with the one rule corrected, re-applied when flushed or deleted; and flanneld
switching a node between the iptables and nftables modes."""

from __future__ import annotations

import ipaddress
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import inside
from daemons import start_flanneld, wait_for, wait_for_env

from pyflannel.bench.rig import Host, Rig
from pyflannel.daemon import nftables

N4, P4 = ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("10.244.3.0/24")
N6, P6 = ipaddress.ip_network("fd00:10:244::/48"), ipaddress.ip_network("fd00:10:244:3::/64")


def golden_postrtg(family: str, table: str, n: str, p: str, multicast: str) -> str:
    """flannel's expectedNftPostrouting, except the fourth rule (`saddr != N daddr P`, see daemon/nftables.py)."""
    return "\n".join([
        f"table {family} {table} {{",
        "\tchain postrtg {",
        '\t\tcomment "chain to manage traffic masquerading by flannel"',
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        "\t\tmeta mark 0x00004000 return",
        f"\t\t{family} saddr {p} {family} daddr {n} return",
        f"\t\t{family} saddr {n} {family} daddr {p} return",
        f"\t\t{family} saddr != {n} {family} daddr {p} return",
        f"\t\t{family} saddr {n} {family} daddr != {multicast} masquerade fully-random",
        f"\t\t{family} saddr != {n} {family} daddr {n} masquerade fully-random",
        "\t}",
        "}",
    ])


def golden_forward(family: str, table: str, n: str) -> str:
    return "\n".join([
        f"table {family} {table} {{",
        "\tchain forward {",
        '\t\tcomment "chain to accept flannel traffic"',
        "\t\ttype filter hook forward priority filter; policy accept;",
        f"\t\t{family} saddr {n} accept",
        f"\t\t{family} daddr {n} accept",
        "\t}",
        "}",
    ])


@pytest.fixture
def node() -> Iterator[Host]:
    with Rig(tag="pfnft") as r:
        yield r.hosts[0]


def listed(node: Host, family: str, table: str, chain: str) -> str:
    return node.run("nft", "list", "chain", family, table, chain).stdout.rstrip("\n")


@pytest.mark.parametrize(("n", "p", "family", "name", "multicast"), [
    (N4, P4, "ip", "flannel-ipv4", "224.0.0.0/4"),
    (N6, P6, "ip6", "flannel-ipv6", "ff00::/8"),
])
def test_tables_are_flannels_and_come_back_when_flushed_or_deleted(
        node: Host, n: ipaddress.IPv4Network | ipaddress.IPv6Network, p: ipaddress.IPv4Network | ipaddress.IPv6Network,
        family: str, name: str, multicast: str) -> None:
    with inside(node):
        assert nftables.supports_fully_random()
        t = nftables.table(n, p, masq=True, forward=True, fully_random=True)
        nftables.apply(t)
        assert listed(node, family, name, "postrtg") == golden_postrtg(family, name, str(n), str(p), multicast)
        assert listed(node, family, name, "forward") == golden_forward(family, name, str(n))
        assert node.run("nft", "list", "tables").stdout.split().count(name) == 1, "the probe table is never left"

        assert not nftables.ensure(t)
        nftables.apply(t)  # applying again (a restart) leaves one copy of each rule
        assert listed(node, family, name, "postrtg") == golden_postrtg(family, name, str(n), str(p), multicast)
        node.run("nft", "flush", "chain", family, name, "postrtg")
        assert nftables.ensure(t)
        assert listed(node, family, name, "postrtg") == golden_postrtg(family, name, str(n), str(p), multicast)
        node.run("nft", "delete", "table", family, name)
        assert nftables.ensure(t)
        assert listed(node, family, name, "forward") == golden_forward(family, name, str(n))

        nftables.remove_all()
        assert name not in node.run("nft", "list", "tables").stdout


def test_without_masquerade_only_the_forward_chain_is_made(node: Host) -> None:
    with inside(node):
        nftables.apply(nftables.table(N4, P4, masq=False, forward=True, fully_random=False))
        out = node.run("nft", "list", "table", "ip", "flannel-ipv4").stdout
    assert "chain forward" in out and "postrtg" not in out


def test_flanneld_switches_a_node_between_iptables_and_nftables_modes(node: Host, tmp_path: Path) -> None:
    """Each mode removes the other's rules at start, as flannel does; nftables mode keeps its table as the
    iptables resync keeps the chains."""
    conf = tmp_path / "net-conf.json"
    registry = ["--local-registry", str(tmp_path / "l.db"), "--net-config-path", str(conf)]
    runs: list[bool] = []

    def run(nft: bool, check: Callable[[], None]) -> None:
        runs.append(nft)
        conf.write_text(json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"},
                                    "EnableNFTables": nft}))
        env = tmp_path / f"run{len(runs)}.env"
        proc = start_flanneld(node, registry, env, "--ip-masq", "--iptables-resync", "1")
        try:
            wait_for_env(env, proc)
            check()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0

    def iptables_mode() -> None:
        assert "FLANNEL-POSTRTG" in node.run("iptables-save", "-t", "nat").stdout
        assert "flannel-ipv4" not in node.run("nft", "list", "tables").stdout

    def nftables_mode() -> None:
        assert "FLANNEL" not in node.run("iptables-save").stdout, "the iptables chains and jumps are gone"
        postrtg = listed(node, "ip", "flannel-ipv4", "postrtg")
        assert "ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade" in postrtg
        node.run("nft", "flush", "chain", "ip", "flannel-ipv4", "postrtg")
        wait_for(lambda: listed(node, "ip", "flannel-ipv4", "postrtg") == postrtg, 10, "the table restored")

    run(False, iptables_mode)
    run(True, nftables_mode)
    run(False, iptables_mode)
