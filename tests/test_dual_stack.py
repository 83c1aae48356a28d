"""Dual stack and IPv6-only networks, as flannel runs them: three nodes with an IPv4 and an IPv6 underlay
(2001:2::/48) on etcd and on the embedded registry, each with vxlan (flannel.1 and flannel-v6.1) and host-gw,
and beyond flannel with udp (flannel0 carrying both families, each over the underlay of its family), switched by
restarting the daemons on a new config; both families ping and carry a SHA-256-checked transfer; flannel's etcd
layout byte for byte; hostile IPv6 records refused by reason; and an IPv6-only network (vxlan, then udp)."""

from __future__ import annotations

import ipaddress
import json
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import (
    FLANNELD,
    PREFIX,
    Etcd,
    Log,
    add_ipv6_underlay,
    assert_all_pairs_reach,
    embedded_registry,
    scrape,
    start_flanneld,
    start_nodes,
    underlay6,
    wait_for,
    wait_for_env,
    write_leases,
)
from traffic import start_transfer

from pyflannel.bench.rig import Host, Rig

DUAL = ('{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48",'
        '"Backend":{"Type":"%s"}}')
V6_ONLY = '{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"%s"}}'
# vxlan: the smaller of flannel.1's 1450 and flannel-v6.1's 1430; udp: flannel0's 1500 - 48 (outer IPv6 + UDP)
MTU = {"host-gw": 1500, "vxlan": 1430, "udp": 1452}
SIZE = 3 << 20


@pytest.fixture
def rig4() -> Iterator[Rig]:
    """Three nodes and an etcd host on one bridge, the nodes with IPv6 underlay addresses too."""
    with Rig(4, tag="pfs") as r:
        add_ipv6_underlay(r.hosts[:3])
        yield r


def _v6(env: dict[str, str]) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Interface(env["FLANNEL_IPV6_SUBNET"]).network


def _v4(env: dict[str, str]) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Interface(env["FLANNEL_SUBNET"]).network


def _key(env: dict[str, str]) -> str:
    v4, v6 = (_v4(env) if "FLANNEL_SUBNET" in env else None), _v6(env)
    head = f"{v4.network_address}-{v4.prefixlen}" if v4 else "0.0.0.0-0"
    return f"{head}&{v6.network_address}-{v6.prefixlen}"


def _expected_value(node: Host, backend: str, ipv4: bool = True) -> str:
    """The lease value flannel writes for this node (pkg/lease LeaseAttrs, Go field order)."""
    public = f'"PublicIP":"{node.underlay if ipv4 else "0.0.0.0"}","PublicIPv6":"{underlay6(node)}"'
    if backend == "host-gw":
        return f'{{{public},"BackendType":"host-gw"}}'
    def data(dev: str) -> str:
        mac = node.run("cat", f"/sys/class/net/{dev}/address").stdout.strip()
        return f'{{"VNI":1,"VtepMAC":"{mac}"}}'
    v4 = f',"BackendData":{data("flannel.1")}' if ipv4 else ""
    return f'{{{public},"BackendType":"vxlan"{v4},"BackendV6Data":{data("flannel-v6.1")}}}'


def _assert_env(path: Path, backend: str, ipv4: bool = True) -> None:
    lines = path.read_text().splitlines()
    keys = ["FLANNEL_NETWORK", "FLANNEL_SUBNET"] if ipv4 else []
    keys += ["FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ"]
    assert [line.split("=")[0] for line in lines] == keys, lines
    env = dict(line.split("=", 1) for line in lines)
    assert env["FLANNEL_IPV6_NETWORK"] == "fd00:10:244::/48" and env["FLANNEL_MTU"] == str(MTU[backend])
    subnet = ipaddress.IPv6Interface(env["FLANNEL_IPV6_SUBNET"])
    assert subnet.ip == subnet.network.network_address + 1 and subnet.network.prefixlen == 64
    assert subnet.network.subnet_of(ipaddress.IPv6Network("fd00:10:244::/48"))


def _both_families_carry_traffic(nodes: list[Host], envs: list[dict[str, str]], ipv4: bool = True) -> None:
    keys = ["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"] if ipv4 else ["FLANNEL_IPV6_SUBNET"]
    for key in keys:
        assert_all_pairs_reach(nodes, envs, key)
        src, dst = (env[key].split("/")[0] for env in envs[:2])
        transfer = start_transfer(nodes[0], nodes[1], SIZE, port=5201, addrs=(src, dst))
        transfer.join()
        assert transfer.received_bytes == SIZE and transfer.received == transfer.sent, key


def _restart(rig: Rig, started: list[tuple[subprocess.Popen[str], dict[str, str]]], registry: list[str],
             tmp_path: Path) -> list[dict[str, str]]:
    """Stop every daemon (exit 0), then start them again on the same subnet.env files: the same subnets."""
    for proc, _ in started:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    nodes = rig.hosts[:len(started)]
    before = [(tmp_path / f"{node.ns}.env").read_text() for node in nodes]
    for node in nodes:
        (tmp_path / f"{node.ns}.env").unlink()
    envs = [env for _, env in start_nodes(rig, nodes, registry, tmp_path)]
    assert [(tmp_path / f"{node.ns}.env").read_text().split("FLANNEL_MTU")[0] for node in nodes] == \
        [text.split("FLANNEL_MTU")[0] for text in before], "each node keeps its subnets (its lease, by public IP)"
    return envs


def _hostile_ipv6_records(victim: ipaddress.IPv6Network) -> dict[str, tuple[str, str]]:
    """key -> (value, the reason it must be refused for)."""
    sub = f"{PREFIX}/subnets/"
    ok = '{"PublicIP":"198.18.0.99","PublicIPv6":"2001:2::99","BackendType":"vxlan"}'
    return {
        f"{sub}10.244.250.0-24&fd00:10:244:fa::1-64": (ok, "bad_key"),  # host bits
        f"{sub}10.244.250.0-24&fd00:10:244:00fa::-64": (ok, "bad_key"),  # not flannel's spelling
        f"{sub}10.244.250.0-24&FD00:10:244:fa::-64": (ok, "bad_key"),
        f"{sub}10.244.250.0-24&fd00:10:244:fa::": (ok, "bad_key"),
        f"{sub}10.244.249.0-24&fd00:99::-64": (ok, "outside_network"),
        f"{sub}10.244.248.0-24&fd00:10:244:f800::-56": (ok, "wrong_length"),
        f"{sub}10.244.247.0-24&fd00:10:244:f7::-64": ('{"PublicIP":"198.18.0.99","PublicIPv6":"::"}',
                                                      "bad_public_ipv6"),
        f"{sub}10.244.246.0-24&fd00:10:244:f6::-64": ('{"PublicIP":"198.18.0.99","PublicIPv6":"::1"}',
                                                      "bad_public_ipv6"),
        f"{sub}10.244.245.0-24&fd00:10:244:f5::-64": ('{"PublicIP":"198.18.0.99","PublicIPv6":"ff02::1"}',
                                                      "bad_public_ipv6"),
        f"{sub}10.244.244.0-24&fd00:10:244:f4::-64": ('{"PublicIP":"198.18.0.99","PublicIPv6":"fe80::1"}',
                                                      "bad_public_ipv6"),
        f"{sub}10.244.243.0-24&fd00:10:244:f3::-64": ('{"PublicIP":"198.18.0.99","PublicIPv6":"::ffff:198.18.0.9"}',
                                                      "bad_public_ipv6"),
        f"{sub}10.244.242.0-24&fd00:10:244:f2::-64": ('{"PublicIP":"198.18.0.99","PublicIPv6":7}', "bad_public_ipv6"),
        f"{sub}10.244.241.0-24&fd00:10:244:f1::-64": ('{"PublicIP":"198.18.0.99"}', "bad_public_ipv6"),
        f"{sub}10.244.240.0-24&{victim.network_address}-64": (ok, "overlap"),  # a new IPv4 subnet, the victim's IPv6
    }


def _rejected(node: Host) -> dict[str, int]:
    return {dict(labels)["reason"]: int(value) for (name, labels), value in scrape(node).items()
            if name == "flannel_lease_records_rejected_total"}


def test_dual_stack_on_etcd_vxlan_then_host_gw(rig4: Rig, tmp_path: Path) -> None:
    *nodes, etcd_host = rig4.hosts
    etcd = Etcd(etcd_host, tmp_path / "etcd")
    etcd.start()
    etcd.put(f"{PREFIX}/config", DUAL % "vxlan")
    registry = ["--etcd-endpoints", etcd.url]
    started = start_nodes(rig4, nodes, registry, tmp_path, "--ip-masq", "--healthz-port", "8471")
    envs = [env for _, env in started]
    for node in nodes:
        _assert_env(tmp_path / f"{node.ns}.env", "vxlan")
        link = node.run("ip", "-d", "link", "show", "flannel-v6.1").stdout
        assert f"vxlan id 1 local {underlay6(node)} dev eth0" in link and "mtu 1430" in link, link
        nat = node.run("ip6tables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout
        assert '-s fd00:10:244::/48 ! -d ff00::/8 -m comment --comment "flanneld masq" -j MASQUERADE' in nat, nat
    assert etcd.items(f"{PREFIX}/subnets/") == {f"{PREFIX}/subnets/{_key(env)}": _expected_value(node, "vxlan")
                                                for node, env in zip(nodes, envs, strict=True)}
    hostile = _hostile_ipv6_records(_v6(envs[0]))
    for key, (value, _) in hostile.items():
        etcd.put(key, value)
    wanted: dict[str, int] = {}
    for _, reason in hostile.values():
        wanted[reason] = wanted.get(reason, 0) + 1
    wait_for(lambda: _rejected(nodes[1]) == wanted, 20, f"the hostile records refused by reason: {wanted}")
    _both_families_carry_traffic(nodes, envs)
    for key in hostile:
        etcd.delete(key)

    etcd.put(f"{PREFIX}/config", DUAL % "host-gw")
    envs = _restart(rig4, started, registry, tmp_path)
    assert etcd.items(f"{PREFIX}/subnets/") == {f"{PREFIX}/subnets/{_key(env)}": _expected_value(node, "host-gw")
                                                for node, env in zip(nodes, envs, strict=True)}
    routes = nodes[0].run("ip", "-6", "route").stdout
    assert f"{_v6(envs[1])} via {underlay6(nodes[1])} dev eth0" in routes, routes
    _both_families_carry_traffic(nodes, envs)


def test_dual_stack_on_the_embedded_registry_host_gw_then_vxlan(tmp_path: Path) -> None:
    registry = embedded_registry(tmp_path, DUAL % "host-gw")
    with Rig(3, tag="pfs") as rig:
        nodes = rig.hosts
        add_ipv6_underlay(nodes)
        # The kubelet's marker in ip6tables-legacy alone says where this host's rules are, as iptables-wrapper reads it.
        nodes[0].run("ip6tables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
        started = start_nodes(rig, nodes, registry, tmp_path, "--ip-masq", "--iptables-resync", "1")
        envs = [env for _, env in started]
        for node in nodes:
            _assert_env(tmp_path / f"{node.ns}.env", "host-gw")
        rules = nodes[0].run("ip6tables-legacy", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout
        assert f"-A FLANNEL-POSTRTG -s {_v6(envs[0])} -d fd00:10:244::/48" in rules, rules
        assert "FLANNEL" not in nodes[0].run("ip6tables-nft-save").stdout + nodes[0].run("iptables-nft-save").stdout
        nodes[0].run("ip6tables-legacy", "-t", "nat", "-F", "FLANNEL-POSTRTG")
        wait_for(lambda: nodes[0].run("ip6tables-legacy", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout == rules, 10,
                 "the ip6tables masquerade rules restored")
        keys = {key for (key,) in sqlite3.connect(tmp_path / "leases.db").execute("SELECT key FROM leases")}
        assert keys == {_key(env) for env in envs}
        _both_families_carry_traffic(nodes, envs)

        embedded_registry(tmp_path, DUAL % "vxlan")
        envs = _restart(rig, started, registry, tmp_path)
        for node in nodes:
            _assert_env(tmp_path / f"{node.ns}.env", "vxlan")
        _both_families_carry_traffic(nodes, envs)

        embedded_registry(tmp_path, DUAL % "udp")
        envs = _restart(rig, started, registry, tmp_path)
        _assert_udp(nodes, envs, tmp_path, ipv4=True)


def _assert_udp(nodes: list[Host], envs: list[dict[str, str]], tmp_path: Path, *, ipv4: bool) -> None:
    """The udp backend on every node: its lease carries PublicIPv6, flannel0 has the subnets' addresses and the
    network route of IPv6, the engine listens on the IPv6 underlay address (and the IPv4 one for dual stack), and
    both families (or IPv6 alone) carry traffic."""
    rows = dict(sqlite3.connect(tmp_path / "leases.db").execute("SELECT key, CAST(value AS TEXT) FROM leases"))
    for node, env in zip(nodes, envs, strict=True):
        _assert_env(tmp_path / f"{node.ns}.env", "udp", ipv4=ipv4)
        assert json.loads(rows[_key(env)])["PublicIPv6"] == underlay6(node)
        addrs = node.run("ip", "addr", "show", "flannel0").stdout
        assert f"inet6 {_v6(env).network_address}/128" in addrs and (f"inet {_v4(env).network_address}/32" in addrs
                                                                      if ipv4 else " inet " not in addrs), addrs
        assert "fd00:10:244::/48 dev flannel0" in node.run("ip", "-6", "route").stdout
        sockets = node.run("ss", "-Hulnp").stdout
        assert f"[{underlay6(node)}]:8285" in sockets and (f"{node.underlay}:8285" in sockets) == ipv4, sockets
    _both_families_carry_traffic(nodes, envs, ipv4=ipv4)


def test_ipv6_only_network(tmp_path: Path) -> None:
    registry = embedded_registry(tmp_path, V6_ONLY % "vxlan")
    db = tmp_path / "leases.db"
    with Rig(3, tag="pfs") as rig:
        nodes = rig.hosts
        add_ipv6_underlay(nodes)
        started = start_nodes(rig, nodes, registry, tmp_path, "--ip-blackhole-route")
        envs = [env for _, env in started]
        for node, env in zip(nodes, envs, strict=True):
            _assert_env(tmp_path / f"{node.ns}.env", "vxlan", ipv4=False)
            assert "flannel.1" not in node.run("ip", "link").stdout, "no IPv4 device"
            assert f"blackhole {_v6(env)}" in node.run("ip", "-6", "route").stdout
        rows = dict(sqlite3.connect(db).execute("SELECT key, CAST(value AS TEXT) FROM leases").fetchall())
        assert rows == {_key(env): _expected_value(node, "vxlan", ipv4=False)
                        for node, env in zip(nodes, envs, strict=True)}
        assert all(key.startswith("0.0.0.0-0&fd00:10:244:") for key in rows), "flannel's MakeSubnetKey"
        _both_families_carry_traffic(nodes, envs, ipv4=False)
        # A restart (the interface named by its IPv6 address) finds its lease by PublicIPv6 (flannel compares
        # PublicIP, 0.0.0.0 for every node here).
        proc, _ = started[2]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        env_file = tmp_path / f"{nodes[2].ns}.env"
        env_file.unlink()
        proc = start_flanneld(nodes[2], registry, env_file, iface=("--iface", underlay6(nodes[2])))
        again = wait_for_env(env_file, proc)
        started[2] = (proc, again)
        assert again["FLANNEL_IPV6_SUBNET"] == envs[2]["FLANNEL_IPV6_SUBNET"]
        assert len(sqlite3.connect(db).execute("SELECT key FROM leases").fetchall()) == 3
        bad = nodes[0].run(FLANNELD, *registry, "--iface", "eth0",
                           "--public-ipv6", "fe80::1", "--subnet-file", str(tmp_path / "bad.env"), check=False)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert bad.stderr.splitlines()[-1] == ("flanneld: error: --public-ipv6 'fe80::1' is not a global or "
                                               "unique-local IPv6 address")
        assert json.loads(rows[_key(envs[0])])["PublicIP"] == "0.0.0.0"

        registry = embedded_registry(tmp_path, V6_ONLY % "udp")
        _assert_udp(nodes, _restart(rig, started, registry, tmp_path), tmp_path, ipv4=False)


def _metric(node: Host, name: str, **labels: str) -> float:
    return scrape(node).get((name, tuple(sorted(labels.items()))), -1)


def test_tens_of_thousands_of_peers_come_and_go_through_flanneld(tmp_path: Path) -> None:
    """25 rounds of 1,000 dual-stack leases that replace the round before in one registry transaction: 50,000
    distinct peer addresses (25,000 of each family) through one flanneld's engine. Then a real node joins, and
    both families reach it and carry a checked transfer; only its per-peer series are left in /metrics."""
    conf = ('{"Network":"10.244.0.0/16","SubnetLen":28,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48",'
            '"Backend":{"Type":"udp"}}')
    registry = embedded_registry(tmp_path, conf)
    with Rig(2, tag="pfs") as rig:
        node, joiner = rig.hosts
        add_ipv6_underlay(rig.hosts)
        ((proc, env),) = start_nodes(rig, [node], registry, tmp_path, "--healthz-port", "8471")
        log = Log(proc)  # a line per route: read as it comes, or flanneld blocks on a full pipe
        own = (_v4(env), _v6(env))
        subnets = [(s, ipaddress.IPv6Network(f"fd00:10:244:{0x100 + i:x}::/64"))
                   for i, s in enumerate(ipaddress.IPv4Network("10.244.0.0/16").subnets(new_prefix=28))
                   if i and not (s.overlaps(own[0]) or f"fd00:10:244:{0x100 + i:x}::/64" == str(own[1]))][:2_000]
        previous: list[str] = []
        for r in range(25):
            batch = subnets[r % 2 * 1_000:][:1_000]
            leases = {}
            for i, (v4, v6) in enumerate(batch):
                n = r * 1_000 + i
                public = ipaddress.IPv4Address("198.18.16.0") + n
                leases[f"{v4.network_address}-28&{v6.network_address}-64"] = \
                    f'{{"PublicIP":"{public}","PublicIPv6":"2001:2::1:{n:x}"}}'
            write_leases(tmp_path / "leases.db", dict.fromkeys(previous) | leases)
            previous = list(leases)
            wait_for(lambda: _metric(node, "flannel_routes", state="routed") == 2_000, 60, f"round {r} routed")
        write_leases(tmp_path / "leases.db", dict.fromkeys(previous))
        wait_for(lambda: _metric(node, "flannel_routes", state="routed") == 0, 60, "the last round gone")
        ((_, joiner_env),) = start_nodes(rig, [joiner], registry, tmp_path)
        _both_families_carry_traffic([node, joiner], [env, joiner_env])
        samples = scrape(node)
        peers = {dict(labels)["peer"] for (name, labels) in samples if name == "flannel_peer_packets_total"}
        assert peers == {str(joiner.underlay), underlay6(joiner)}
        assert samples[("flannel_route_refusals_total", ())] == 0
        assert samples[("flannel_routes", (("state", "routed"),))] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0 and "refused" not in log.text() and "failed" not in log.text()
