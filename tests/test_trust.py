"""flanneld under what operators and attackers do to it: hostile registry records, etcd losing its data or
vanishing without a reset, a node away longer than its lease, the embedded registry's file deleted or damaged,
and bad local files. Three nodes carry traffic through the udp backend while it happens; Debian's etcd runs in a
test host."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from daemons import (
    NET,
    PREFIX,
    Etcd,
    Log,
    assert_all_pairs_reach,
    http,
    pings,
    scrape,
    serves,
    start_flanneld,
    start_nodes,
    wait_for,
    wait_for_env,
)

from pyflannel.bench.rig import Host, Rig


@pytest.fixture
def rig5() -> Iterator[Rig]:
    """Four nodes and an etcd host on one bridge."""
    with Rig(5, tag="pft") as r:
        yield r


def _etcd_cluster(rig: Rig, tmp_path: Path, count: int = 3, *extra: str
                  ) -> tuple[Etcd, list[Host], list[subprocess.Popen[str]], list[dict[str, str]]]:
    etcd = Etcd(rig.hosts[-1], tmp_path / "etcd")
    etcd.start()
    etcd.put(f"{PREFIX}/config", NET % "udp")
    nodes = rig.hosts[:count]
    started = start_nodes(rig, nodes, ["--etcd-endpoints", etcd.url], tmp_path, "--healthz-port", "8471", *extra)
    return etcd, nodes, [p for p, _ in started], [env for _, env in started]


def _subnet(env: dict[str, str]) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Interface(env["FLANNEL_SUBNET"]).network


def _key(subnet: ipaddress.IPv4Network) -> str:
    return f"{PREFIX}/subnets/{subnet.network_address}-{subnet.prefixlen}"


def _rejected(node: Host) -> int:
    body = http(node, "/metrics")
    return sum(int(float(n)) for n in re.findall(r"^flannel_lease_records_rejected_total\{[^}]*\} (\S+)$", body,
                                                 re.M))


def _no_closing_connections(host: Host) -> bool:
    """No TCP connection of port 2379 on host is still closing (resending its FIN)."""
    closing = host.run("ss", "-tanH", "state", "fin-wait-1", "state", "closing", "state", "last-ack").stdout
    return ":2379 " not in closing


def _peers_routed(node: Host, count: int) -> bool:
    return scrape(node)[("flannel_peers", ())] == count


def test_hostile_records_change_no_route_and_stop_no_daemon(rig5: Rig, tmp_path: Path) -> None:
    etcd, nodes, procs, envs = _etcd_cluster(rig5, tmp_path)
    victim = _subnet(envs[0])
    v = victim.network_address
    sub = f"{PREFIX}/subnets/"
    attacker = '{"PublicIP":"198.18.0.99","PublicIPv6":null}'
    corpus = {
        f"{sub}10.244.250.0-24": "[" * 5000,
        f"{sub}10.244.251.0-24": '{"a":' * 3000 + "1" + "}" * 3000,
        f"{sub}evil-{v}-24": attacker,
        f"{sub}{v}-24x": attacker,
        f"{sub}{victim.network_address + 1}-24": attacker,  # the victim's subnet with host bits set
        f"{sub}{v}-25": attacker,  # the victim's first half, wrong length
        f"{sub}{v}-16": attacker,
        f"{sub}10.99.0.0-24": attacker,  # outside the network
        f"{sub}10.244.252.0-24": '{"Foo":1}',  # no PublicIP: flannel routed it to 0.0.0.0:8285
        f"{sub}10.244.253.0-24": '{"PublicIP":5}',
        f"{sub}10.244.254.0-24": '{"PublicIP":"255.255.255.255"}',
        f"{sub}10.244.249.0-24": '{"PublicIP":"127.0.0.1"}',
        f"{sub}10.244.248.0-24": '{"PublicIP":"224.0.0.1"}',
        f"{sub}10.244.247.0-24": '{"PublicIP":"0.0.0.0"}',
        f"{sub}10.244.246.0-24": '["PublicIP","198.18.0.99"]',
        f"{sub}10.244.245.0-24": '{"PublicIP":"198.18.0.99","BackendType":{"x":1}}',
        f"{sub}10.244.244.0-24": "\udcff\udcfe".encode("utf-8", "surrogateescape").decode("latin-1"),
        f"{sub}10.244.243.0-24\u00e9": attacker,
        f"{sub}010.244.242.0-24": attacker,
        f"{sub}10.244.241.0-24/extra": attacker,
    }
    for key, value in corpus.items():
        etcd.put(key, value)
    big = tmp_path / "big"
    big.write_bytes(b'{"PublicIP":"198.18.0.99","Pad":"' + b"x" * 1_000_000 + b'"}')
    for i in range(5):  # together more than gRPC's 4 MiB default message: listing must still work
        etcd.put_file(f"{sub}10.244.{230 + i}.0-24", big)
    wait_for(lambda: _rejected(nodes[1]) >= len(corpus) - 1, 20, "the records to be seen and rejected")
    assert all(p.poll() is None for p in procs), "no daemon exits"
    assert_all_pairs_reach(nodes, envs)  # the victim's traffic still goes to the victim
    for node in nodes:
        routes = node.run("ip", "route").stdout
        assert "10.244.252.0" not in routes and "10.99.0.0" not in routes
    for key in corpus:
        etcd.delete(key)
    # A valid lease after the deletions: once every node routes it (and no longer), they have seen them all.
    for change, peers in ((partial(etcd.put, f"{sub}10.244.240.0-24", attacker), 3),
                          (partial(etcd.delete, f"{sub}10.244.240.0-24"), 2)):
        change()
        for node in nodes:
            wait_for(partial(_peers_routed, node, peers), 20, "the sentinel lease to come and go")
    assert all(p.poll() is None for p in procs), "deleting the hostile keys removes nothing real"
    assert_all_pairs_reach(nodes, envs)
    # A node that joins now lists past five 1 MB values and gets a lease.
    joiner = rig5.hosts[3]
    env = wait_for_env(tmp_path / "joiner.env",
                       start_flanneld(joiner, ["--etcd-endpoints", etcd.url], tmp_path / "joiner.env"))
    assert _subnet(env) not in {_subnet(e) for e in envs}


def test_etcd_wiped_every_node_keeps_its_subnet(rig5: Rig, tmp_path: Path) -> None:
    etcd, nodes, procs, envs = _etcd_cluster(rig5, tmp_path)
    before = etcd.items(f"{PREFIX}/subnets/")
    etcd.stop()
    shutil.rmtree(etcd.data)
    etcd.start()
    for node in nodes:
        wait_for(partial(serves, node, "/readyz", "forwarding with the routes we have until it is written again"),
                 30, "the node to wait for the config")
    assert all(p.poll() is None for p in procs), "nodes wait for the config instead of exiting"
    assert_all_pairs_reach(nodes, envs)  # the dataplane stays up while the config is missing
    etcd.put(f"{PREFIX}/config", NET % "udp")
    wait_for(lambda: etcd.items(f"{PREFIX}/subnets/") == before, 30, "every node's lease, as it was")
    assert_all_pairs_reach(nodes, envs)
    assert all(p.poll() is None for p in procs)


def test_etcd_host_lost_without_a_reset_is_noticed(rig5: Rig, tmp_path: Path) -> None:
    etcd, nodes, procs, envs = _etcd_cluster(rig5, tmp_path)
    etcd_host = rig5.hosts[-1]
    # A reboot, as the clients see it: the server forgets the connections without a word. Cut both ways, kill
    # etcd, and let its kernel give up on the FIN it keeps resending (one retry), before the cable is back.
    etcd_host.run("sysctl", "-qw", "net.ipv4.tcp_orphan_retries=1")
    cut = (("INPUT", "--dport"), ("OUTPUT", "--sport"))
    for chain, port in cut:
        etcd_host.run("iptables", "-I", chain, "-p", "tcp", port, "2379", "-j", "DROP")
    assert etcd.proc is not None
    etcd.proc.send_signal(signal.SIGKILL)
    etcd.proc.wait()
    etcd.start_unchecked()
    wait_for(partial(_no_closing_connections, etcd_host), 30, "the killed etcd's connections to give up")
    for chain, port in cut:
        etcd_host.run("iptables", "-D", chain, "-p", "tcp", port, "2379", "-j", "DROP")
    joiner = rig5.hosts[3]
    env = wait_for_env(tmp_path / "joiner.env",
                       start_flanneld(joiner, ["--etcd-endpoints", etcd.url], tmp_path / "joiner.env"))
    addr = env["FLANNEL_SUBNET"].split("/")[0]
    with joiner.ipr() as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=addr, prefixlen=32)
    for node, node_env in zip(nodes, envs, strict=True):
        src = node_env["FLANNEL_SUBNET"].split("/")[0]
        wait_for(partial(pings, node, src, addr), 40, f"the joiner from {node.ns}")
    assert all(p.poll() is None for p in procs)


def test_node_away_longer_than_its_lease_never_takes_it_back(rig5: Rig, tmp_path: Path) -> None:
    etcd, nodes, procs, envs = _etcd_cluster(rig5, tmp_path)
    away, subnet = nodes[0], _subnet(envs[0])
    away.run("iptables", "-I", "OUTPUT", "-p", "tcp", "--dport", "2379", "-j", "DROP")
    etcd.delete(_key(subnet))  # as the lease's expiry would
    taken = '{"PublicIP":"198.18.0.99","PublicIPv6":null}'
    etcd.put(_key(subnet), taken)  # another node took the free subnet
    away.run("iptables", "-D", "OUTPUT", "-p", "tcp", "--dport", "2379", "-j", "DROP")
    assert procs[0].wait(60) == 1
    assert procs[0].stderr is not None
    err = procs[0].stderr.read()
    assert f"subnet {subnet} is now held by 198.18.0.99" in err and "Traceback" not in err, err
    assert etcd.items(_key(subnet)) == {_key(subnet): taken}, "the new holder's lease is untouched"
    assert all(p.poll() is None for p in procs[1:])


def test_embedded_registry_deleted_then_damaged(tmp_path: Path) -> None:
    conf = tmp_path / "net-conf.json"
    conf.write_text(NET % "udp")
    db = tmp_path / "leases.db"
    registry = ["--local-registry", str(db), "--net-config-path", str(conf)]
    with Rig(3, tag="pft") as rig:
        nodes = rig.hosts[:2]
        started = start_nodes(rig, nodes, registry, tmp_path)
        procs, envs = [p for p, _ in started], [env for _, env in started]
        logs = [Log(p) for p in procs]
        keys = sorted(f"{_subnet(env).network_address}-24" for env in envs)
        db.unlink()

        def registered() -> bool:
            try:
                readonly = sqlite3.connect(f"file:{db}?mode=ro", uri=True)  # never creating the file itself
                return sorted(k for (k,) in readonly.execute("SELECT key FROM leases")) == keys
            except sqlite3.Error:
                return False
        wait_for(registered, 20, "the running nodes to register again in a new file")
        third = wait_for_env(tmp_path / "third.env", start_flanneld(rig.hosts[2], registry, tmp_path / "third.env"))
        assert _subnet(third) not in {_subnet(env) for env in envs}, "no duplicate after the deletion"
        with open(db, "r+b") as f:  # damaged in place: same file, garbage header
            f.write(b"this is not a database" * 10)
        for log in logs:
            log.wait_for("file is not a database; retrying")
        assert all(p.poll() is None for p in procs), "a damaged file is retried, not fatal, while running"
        assert_all_pairs_reach(nodes, envs)
        again = start_flanneld(rig.hosts[2], registry, tmp_path / "again.env")
        assert again.wait(30) == 1 and again.stderr is not None
        err = again.stderr.read()
        assert err.strip().splitlines()[-1].endswith("is not an SQLite database (damaged?): move it away to start "
                                                     "a new one"), err
        assert "Traceback" not in err


@pytest.mark.parametrize("case", ["binary subnet.env", "subnet.env is a directory", "binary net-config",
                                  "deep net-config"])
def test_bad_local_files_exit_1_before_anything_is_set_up(case: str, tmp_path: Path) -> None:
    conf, env = tmp_path / "net-conf.json", tmp_path / "subnet.env"
    conf.write_text(NET % "udp")
    if case == "binary subnet.env":
        env.write_bytes(b"FLANNEL_SUBNET=\xff\xfe\x00\x01")
        expected = "is not a subnet.env (binary data): remove it"
    elif case == "subnet.env is a directory":
        env.mkdir()
        expected = f"--subnet-file {env} is a directory"
    elif case == "binary net-config":
        conf.write_bytes(b'{"Network": "\xff\xfe"}')
        expected = f"network config {conf} is not UTF-8 text"
    else:
        conf.write_text("[" * 5000)
        expected = "invalid network config: nested deeper than 32 levels"
    with Rig(2, tag="pft") as rig:
        proc = start_flanneld(rig.hosts[0], ["--local-registry", str(tmp_path / "l.db"), "--net-config-path",
                                             str(conf)], env)
        assert proc.wait(30) == 1 and proc.stderr is not None
        err = proc.stderr.read()
        assert err.strip().splitlines()[-1].endswith(expected) and "Traceback" not in err, err
        assert "flannel" not in rig.hosts[0].run("ip", "link").stdout, "nothing was set up"


def test_calls_cut_off_with_their_connection_are_unavailable_not_cancelled(rig5: Rig, tmp_path: Path) -> None:
    etcd = Etcd(rig5.hosts[-1], tmp_path / "etcd")
    etcd.start()
    outcomes = json.loads(etcd.tool("race").stdout)
    assert set(outcomes) <= {"ok", "unavailable"}, outcomes
    assert outcomes.get("unavailable", 0) > 0, "the race was run: some calls lost their connection"


def test_flannel0_lost_under_flanneld_is_recreated_and_health_says_so_meanwhile(tmp_path: Path) -> None:
    conf = tmp_path / "net-conf.json"
    conf.write_text(NET % "udp")
    registry = ["--local-registry", str(tmp_path / "l.db"), "--net-config-path", str(conf)]
    with Rig(2, tag="pft") as rig:
        started = start_nodes(rig, rig.hosts, registry, tmp_path, "--healthz-port", "8471")
        node, envs = rig.hosts[0], [env for _, env in started]
        assert "flanneld is running" in http(node, "/healthz")
        node.run("ip", "link", "del", "flannel0")
        assert_all_pairs_reach(rig.hosts, envs)  # recreated, with its route to the peer
        # Taken by a device that is not ours: nothing to repair with, and /healthz says why until it is gone.
        node.run("ip", "link", "del", "flannel0")
        node.run("ip", "link", "add", "flannel0", "type", "veth", "peer", "name", "squatter")
        wait_for(partial(serves, node, "/healthz", "500 Internal Server Error"), 20, "/healthz to fail")
        assert "flannel0" in http(node, "/healthz") and "flannel0" in http(node, "/readyz")
        node.run("ip", "link", "del", "flannel0")
        wait_for(partial(serves, node, "/healthz", "flanneld is running"), 20, "/healthz to recover")
        assert_all_pairs_reach(rig.hosts, envs)
        assert all(proc.poll() is None for proc, _ in started)
        started[0][0].send_signal(signal.SIGTERM)
        assert started[0][0].wait(20) == 0 and started[0][0].stderr is not None
        assert "flannel0 was deleted; recreated it with 1 routes" in started[0][0].stderr.read()


def test_stray_signals_neither_kill_nor_stop_flanneld(tmp_path: Path) -> None:
    conf = tmp_path / "net-conf.json"
    conf.write_text(NET % "host-gw")
    with Rig(2, tag="pft") as rig:
        node = rig.hosts[0]
        proc = start_flanneld(node, ["--local-registry", str(tmp_path / "l.db"), "--net-config-path", str(conf)],
                              tmp_path / "n.env")
        wait_for_env(tmp_path / "n.env", proc)
        log = Log(proc)
        stray = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGPWR)
        for sig in stray:
            proc.send_signal(sig)
            log.wait_for(f"ignored {sig.name}")
        assert proc.poll() is None, "still running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
