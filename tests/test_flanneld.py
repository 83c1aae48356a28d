"""flanneld on test hosts: leases, subnet.env, routes over udp, host-gw and vxlan, with the embedded registry and
with Debian's etcd; flannel's etcd layout byte for byte; restarts, races and an etcd outage."""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from conftest import host_socket
from daemons import (
    NET,
    PREFIX,
    Etcd,
    Log,
    assert_all_pairs_reach,
    embedded_registry,
    http,
    pings,
    read_env,
    scrape,
    send_and_catch,
    serves,
    start_flanneld,
    start_nodes,
    unreachable,
    wait_for,
    wait_for_env,
    write_leases,
)
from packets import udp4

from pyflannel.bench.rig import Rig


@pytest.fixture
def rig4() -> Iterator[Rig]:
    """Three nodes and an etcd host on one bridge."""
    with Rig(4, tag="pfd") as r:
        yield r




def _assert_env_format(env_text: str, network: str, mtu: int) -> None:
    lines = env_text.splitlines()
    assert [line.split("=")[0] for line in lines] == ["FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_MTU",
                                                      "FLANNEL_IPMASQ"]
    env = dict(line.split("=", 1) for line in lines)
    assert env["FLANNEL_NETWORK"] == network and env["FLANNEL_MTU"] == str(mtu) and env["FLANNEL_IPMASQ"] == "false"
    subnet = ipaddress.IPv4Interface(env["FLANNEL_SUBNET"])
    assert subnet.ip == subnet.network.network_address + 1 and subnet.network.prefixlen == 24


MTU = {"udp": 1472, "host-gw": 1500, "vxlan": 1450}


@pytest.mark.parametrize("backend", ["udp", "host-gw", "vxlan"])
def test_three_nodes_on_the_embedded_registry(backend: str, tmp_path: Path) -> None:
    conf = tmp_path / "net-conf.json"
    conf.write_text(NET % backend)
    with Rig(3, tag="pfd") as rig:
        nodes = rig.hosts
        started = start_nodes(rig, nodes, ["--local-registry", str(tmp_path / "leases.db"),
                                            "--net-config-path", str(conf)], tmp_path)
        envs = [env for _, env in started]
        assert len({env["FLANNEL_SUBNET"] for env in envs}) == 3, "distinct subnets"
        for node in nodes:
            _assert_env_format((tmp_path / f"{node.ns}.env").read_text(), "10.244.0.0/16", MTU[backend])
        assert_all_pairs_reach(nodes, envs)


@pytest.mark.parametrize("backend", ["udp", "host-gw", "vxlan"])
def test_three_nodes_on_etcd_with_flannels_layout(rig4: Rig, backend: str, tmp_path: Path) -> None:
    *nodes, etcd_host = rig4.hosts
    etcd = Etcd(etcd_host, tmp_path / "etcd")
    etcd.start()
    etcd.put(f"{PREFIX}/config", NET % backend)
    started = start_nodes(rig4, nodes, ["--etcd-endpoints", etcd.url], tmp_path)
    envs = [env for _, env in started]
    keys = etcd.items(f"{PREFIX}/subnets/")
    expected = {}
    for node, env in zip(nodes, envs, strict=True):
        subnet = ipaddress.IPv4Interface(env["FLANNEL_SUBNET"]).network
        key = f"{PREFIX}/subnets/{subnet.network_address}-24"
        if backend == "udp":
            expected[key] = f'{{"PublicIP":"{node.underlay}","PublicIPv6":null}}'
        elif backend == "host-gw":
            expected[key] = f'{{"PublicIP":"{node.underlay}","PublicIPv6":null,"BackendType":"host-gw"}}'
        else:
            mac = node.run("cat", "/sys/class/net/flannel.1/address").stdout.strip()
            expected[key] = (f'{{"PublicIP":"{node.underlay}","PublicIPv6":null,"BackendType":"vxlan",'
                             f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}')
    assert keys == expected, "keys and values exactly as flannel writes them"
    assert_all_pairs_reach(nodes, envs)


def test_a_flannel_nodes_hand_written_lease_becomes_a_route(rig4: Rig, tmp_path: Path) -> None:
    *nodes, etcd_host = rig4.hosts
    etcd = Etcd(etcd_host, tmp_path / "etcd")
    etcd.start()
    etcd.put(f"{PREFIX}/config", NET % "udp")
    started = start_nodes(rig4, nodes, ["--etcd-endpoints", etcd.url], tmp_path)
    # A flannel node with the udp backend at 198.18.0.99 (a second address on the etcd host), subnet .200.
    etcd_host.run("ip", "addr", "add", "198.18.0.99/24", "dev", "eth0")
    flannel_node = host_socket(etcd_host)
    flannel_node.bind(("198.18.0.99", 8285))
    flannel_node.settimeout(1)
    key = f"{PREFIX}/subnets/10.244.200.0-24"
    etcd.put(key, '{"PublicIP":"198.18.0.99","PublicIPv6":null}')
    with flannel_node:
        for node, (_, env) in zip(nodes, started, strict=True):
            src = env["FLANNEL_SUBNET"].split("/")[0]
            got = wait_for(partial(send_and_catch, node, src, flannel_node), 20, "the new route")
            assert got.src == src and got.dst == "10.244.200.7"
        etcd.delete(key)
        for node, (_, env) in zip(nodes, started, strict=True):
            src = env["FLANNEL_SUBNET"].split("/")[0]
            wait_for(partial(unreachable, node, src), 20, "the route to go")


def test_restart_gets_the_same_subnet(tmp_path: Path) -> None:
    conf = tmp_path / "net-conf.json"
    conf.write_text(NET % "udp")
    registry = ["--local-registry", str(tmp_path / "leases.db"), "--net-config-path", str(conf)]
    env_file = tmp_path / "node.env"
    with Rig(2, tag="pfd") as rig:
        node = rig.hosts[0]
        proc = start_flanneld(node, registry, env_file)
        first = wait_for_env(env_file, proc)["FLANNEL_SUBNET"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "flannel0" not in node.run("ip", "link").stdout, "flannel0 goes with the process"
        env_file.unlink()
        proc = start_flanneld(node, registry, env_file)
        assert wait_for_env(env_file, proc)["FLANNEL_SUBNET"] == first, "from the registry (same PublicIP)"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        # A new registry, but the old subnet.env: the previous subnet is taken again.
        registry[1] = str(tmp_path / "fresh.db")
        written = env_file.stat().st_mtime_ns
        proc = start_flanneld(node, registry, env_file)
        wait_for(lambda: env_file.stat().st_mtime_ns != written, 30, "subnet.env written by the new run")
        assert read_env(env_file)["FLANNEL_SUBNET"] == first, "from subnet.env"
        leases = sqlite3.connect(tmp_path / "fresh.db").execute("SELECT key FROM leases").fetchall()
        assert leases == [(first.split("/")[0].rsplit(".", 1)[0] + ".0-24",)], "and leased in the new registry"


def test_twenty_daemons_racing_for_subnets(tmp_path: Path) -> None:
    with Rig(21, tag="pfd") as rig:
        *nodes, etcd_host = rig.hosts
        etcd = Etcd(etcd_host, tmp_path / "etcd")
        etcd.start()
        etcd.put(f"{PREFIX}/config", '{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}')
        procs = [start_flanneld(node, ["--etcd-endpoints", etcd.url], tmp_path / f"{node.ns}.env")
                 for node in nodes]
        envs = [wait_for_env(tmp_path / f"{node.ns}.env", proc, timeout=120) for node, proc in zip(nodes, procs,
                                                                                                     strict=True)]
        assert len({env["FLANNEL_SUBNET"] for env in envs}) == 20
        assert all(proc.poll() is None for proc in procs), "nobody exited"
        assert len(etcd.items(f"{PREFIX}/subnets/")) == 20


def test_etcd_outage_keeps_traffic_and_catches_up(rig4: Rig, tmp_path: Path) -> None:
    *nodes, etcd_host = rig4.hosts
    etcd = Etcd(etcd_host, tmp_path / "etcd")
    etcd.start()
    etcd.put(f"{PREFIX}/config", NET % "udp")
    started = start_nodes(rig4, nodes, ["--etcd-endpoints", etcd.url], tmp_path, "--healthz-port", "8471")
    envs = [env for _, env in started]
    etcd.stop()
    for node in nodes:
        wait_for(partial(serves, node, "/readyz", "registry unreachable"), 20, "the outage noticed")
    assert_all_pairs_reach(nodes, envs)  # forwarding goes on with the last known routes
    etcd.start()
    etcd_host.run("ip", "addr", "add", "198.18.0.99/24", "dev", "eth0")
    etcd.put(f"{PREFIX}/subnets/10.244.200.0-24", '{"PublicIP":"198.18.0.99","PublicIPv6":null}')
    with host_socket(etcd_host) as flannel_node:
        flannel_node.bind(("198.18.0.99", 8285))
        flannel_node.settimeout(1)
        for node, env in zip(nodes, envs, strict=True):
            src = env["FLANNEL_SUBNET"].split("/")[0]
            wait_for(partial(send_and_catch, node, src, flannel_node), 40, "the lease added during the outage")
    assert all(proc.poll() is None for proc, _ in started)
    for node in nodes:
        wait_for(partial(serves, node, "/readyz", "flanneld is ready"), 20, "the registry back")


def test_metrics_and_readiness(tmp_path: Path) -> None:
    conf = tmp_path / "net-conf.json"
    conf.write_text(NET % "udp")
    registry = ["--local-registry", str(tmp_path / "l.db"), "--net-config-path", str(conf)]
    with Rig(2, tag="pfd") as rig:
        node, peer = rig.hosts
        proc = start_flanneld(node, registry, tmp_path / "n.env", "--healthz-port", "8471",
                              iface=("--iface-can-reach", "198.18.0.2"))
        env = wait_for_env(tmp_path / "n.env", proc)
        peer_env = wait_for_env(tmp_path / "p.env", start_flanneld(peer, registry, tmp_path / "p.env"))
        src, dst = env["FLANNEL_SUBNET"].split("/")[0], peer_env["FLANNEL_SUBNET"].split("/")[0]
        for host, addr in ((node, src), (peer, dst)):
            with host.ipr() as ipr:
                ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=addr, prefixlen=32)
        wait_for(partial(pings, node, src, dst), 20, "a ping between the nodes")
        before = scrape(node)
        subnet = str(ipaddress.IPv4Interface(env["FLANNEL_SUBNET"]).network)
        assert before[("flannel_lease_info", (("subnet", subnet),))] == 1
        assert before[("flannel_peers", ())] == 1 and before[("flannel_ready", ())] == 1
        expires = before[("flannel_lease_expiration_timestamp_seconds", ())]
        assert time.time() + 24 * 3600 - 120 < expires <= time.time() + 24 * 3600
        assert before[("flannel_drops_total", (("reason", "rx_spoofed_source"),))] == 0
        with host_socket(node) as s:
            s.bind((src, 0))
            for _ in range(5):
                s.sendto(b"x" * 100, (dst, 9))
        peer_tx = ("flannel_peer_packets_total", (("direction", "tx"), ("peer", "198.18.0.2")))
        wait_for(lambda: scrape(node)[peer_tx] >= before[peer_tx] + 5, 10, "the datagrams counted")
        after = scrape(node)
        for sample, moved in ((peer_tx, 5), (("flannel_packets_total", (("direction", "tx"),)), 5),
                              (("flannel_bytes_total", (("direction", "tx"),)), 5 * 128)):
            assert after[sample] - before[sample] == moved, sample
        assert ("process_cpu_seconds_total", ()) in after
        assert http(node, "/readyz").startswith("HTTP/1.0 200") and "flanneld is ready" in http(node, "/readyz")
        assert "flanneld is running" in http(node, "/healthz")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0 and proc.stderr is not None
        lines = proc.stderr.read().splitlines()
        assert any("using interface eth0 (198.18.0.1)" in line for line in lines), "found by the route to 198.18.0.2"
        klog_line = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] .+")
        assert all(klog_line.fullmatch(line) for line in lines), lines


def test_ports_in_use_are_one_line_errors(tmp_path: Path) -> None:
    conf = tmp_path / "net-conf.json"
    conf.write_text(NET % "udp")
    registry = ["--local-registry", str(tmp_path / "l.db"), "--net-config-path", str(conf)]
    with Rig(2, tag="pfd") as rig:
        node = rig.hosts[0]
        for port, extra, message in ((8285, [], "UDP port 8285 on 198.18.0.1 is already in use"),
                                     (8471, ["--healthz-port", "8471"], "healthz port 0.0.0.0:8471 is already in use")):
            with host_socket(node, socket.SOCK_DGRAM if port == 8285 else socket.SOCK_STREAM) as squatter:
                squatter.bind(("198.18.0.1" if port == 8285 else "0.0.0.0", port))
                if port == 8471:
                    squatter.listen()
                proc = start_flanneld(node, registry, tmp_path / "n.env", *extra)
                proc.wait(30)
                assert proc.stderr is not None
                err = proc.stderr.read()
                assert proc.returncode == 1 and err.strip().endswith(message) and "Traceback" not in err, err
        assert "flannel0" not in node.run("ip", "link").stdout
        proc = start_flanneld(node, registry, tmp_path / "n.env", env={"PYFLANNEL_UDP_QUEUES": "9"})
        assert proc.wait(30) == 1 and proc.stderr is not None
        err = proc.stderr.read()
        assert err.strip().endswith("PYFLANNEL_UDP_QUEUES='9' is not a number of queues from 1 to 8"), err
        for backend, message in (('{"Type": "udp", "Port": 0}', "Backend.Port must be a whole number from 1 to 65535"),
                                 ('{"Type": "vxlan", "VNI": "4"}', "Backend.VNI must be a whole number from 0 to")):
            conf.write_text(f'{{"Network": "10.244.0.0/16", "Backend": {backend}}}')
            proc = start_flanneld(node, registry, tmp_path / "n.env")
            assert proc.wait(30) == 1 and proc.stderr is not None
            err = proc.stderr.read()
            last = err.strip().splitlines()[-1]
            assert last.startswith("flanneld: error: ") and message in last and "Traceback" not in err, err
        conf.write_text(NET % "udp")
        proc = start_flanneld(node, registry, tmp_path / "n.env", env={"PYFLANNEL_UDP_QUEUES": "3"})
        wait_for_env(tmp_path / "n.env", proc)
        wait_for(lambda: "tx-2" in node.run("ls", "/sys/class/net/flannel0/queues").stdout, 10, "three queues")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_waits_for_etcd_to_come_up(rig4: Rig, tmp_path: Path) -> None:
    node, etcd_host = rig4.hosts[0], rig4.hosts[3]
    etcd = Etcd(etcd_host, tmp_path / "etcd")
    log = Log(start_flanneld(node, ["--etcd-endpoints", etcd.url], tmp_path / "n.env"))
    log.wait_for("registry: reading the network config: no etcd endpoint answered")
    assert log.proc.poll() is None, "etcd down at start: flanneld keeps trying, as flannel does"
    etcd.start()
    etcd.put(f"{PREFIX}/config", NET % "host-gw")
    assert wait_for(lambda: (tmp_path / "n.env").exists(), 40, "subnet.env") and log.proc.poll() is None
    assert read_env(tmp_path / "n.env")["FLANNEL_MTU"] == "1500"


def test_own_lease_deleted_is_created_again_or_exits_0_on_request_and_bad_config_exits_1(rig4: Rig, tmp_path: Path
                                                                                         ) -> None:
    node, etcd_host = rig4.hosts[0], rig4.hosts[3]
    etcd = Etcd(etcd_host, tmp_path / "etcd")
    etcd.start()
    etcd.put(f"{PREFIX}/config", NET % "host-gw")
    proc = start_flanneld(node, ["--etcd-endpoints", etcd.url], tmp_path / "n.env", "--ip-blackhole-route")
    subnet = ipaddress.IPv4Interface(wait_for_env(tmp_path / "n.env", proc)["FLANNEL_SUBNET"]).network
    assert f"blackhole {subnet}" in node.run("ip", "route").stdout
    key = f"{PREFIX}/subnets/{subnet.network_address}-24"
    value = etcd.items(key)[key]
    etcd.delete(key)
    wait_for(lambda: etcd.items(key).get(key) == value, 20, "the lease created again, same subnet and value")
    assert proc.poll() is None, "the node keeps running: its subnet was still free"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    (tmp_path / "n.env").unlink()
    proc = start_flanneld(node, ["--etcd-endpoints", etcd.url], tmp_path / "n.env", "--exit-on-lease-loss")
    wait_for_env(tmp_path / "n.env", proc)
    etcd.delete(key)
    assert proc.wait(30) == 0, "--exit-on-lease-loss: flannel's exit 0, for its supervisor to restart it"
    assert proc.stderr is not None and "Lease has been revoked" in proc.stderr.read()
    etcd.put(f"{PREFIX}/config", '{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard"}}')
    proc = start_flanneld(node, ["--etcd-endpoints", etcd.url], tmp_path / "m.env")
    assert proc.wait(30) == 1
    assert proc.stderr is not None
    assert proc.stderr.read().strip().endswith("unknown backend type: 'wireguard' (pyflannel supports udp, vxlan, "
                                               "host-gw)")


def test_masquerade_rules_and_host_gw_routes_are_put_back(tmp_path: Path) -> None:
    conf = tmp_path / "net-conf.json"
    conf.write_text(NET % "host-gw")
    registry = ["--local-registry", str(tmp_path / "l.db"), "--net-config-path", str(conf)]
    with Rig(2, tag="pfd") as rig:
        started = start_nodes(rig, rig.hosts, registry, tmp_path, "--ip-masq", "--iptables-resync", "1")
        node, peer_env = rig.hosts[0], started[1][1]
        subnet = ipaddress.IPv4Interface(started[0][1]["FLANNEL_SUBNET"]).network
        rules = node.run("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout
        assert f"-A FLANNEL-POSTRTG -s {subnet} -d 10.244.0.0/16" in rules and "MASQUERADE" in rules
        node.run("iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
        wait_for(lambda: node.run("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout == rules, 10,
                 "the masquerade rules restored")
        peer = str(ipaddress.IPv4Interface(peer_env["FLANNEL_SUBNET"]).network)
        node.run("ip", "route", "del", peer)
        wait_for(lambda: f"{peer} via 198.18.0.2" in node.run("ip", "route").stdout, 20, "the route re-added")
        assert all(proc.poll() is None for proc, _ in started)


def test_rules_land_in_the_iptables_backend_the_host_uses(tmp_path: Path) -> None:
    """A host whose rules are in iptables-legacy (kube-proxy in legacy mode) gets flannel's there, not in nft."""
    conf = tmp_path / "net-conf.json"
    conf.write_text(NET % "host-gw")
    with Rig(2, tag="pfd") as rig:
        node = rig.hosts[0]
        node.run("iptables-legacy", "-t", "nat", "-N", "KUBE-POSTROUTING")
        node.run("iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-j", "KUBE-POSTROUTING")
        proc = start_flanneld(node, ["--local-registry", str(tmp_path / "l.db"), "--net-config-path", str(conf)],
                              tmp_path / "n.env", "--ip-masq")
        wait_for_env(tmp_path / "n.env", proc)
        assert "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG" in node.run(
            "iptables-legacy-save", "-t", "nat").stdout
        assert "FLANNEL" not in node.run("iptables-nft-save").stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0 and proc.stderr is not None
        assert "iptables: iptables-legacy" in proc.stderr.read()


def test_the_udp_backends_source_check_can_be_turned_off(tmp_path: Path) -> None:
    """A router that forwards into the overlay through a node: a datagram carrying a packet from a host behind
    it (192.168.5.9, in no node's subnet) from an address that holds no lease. Dropped as rx_unknown_peer by
    default; delivered with "SourceCheck": false; a value that is not a bool is one line and exit 1."""
    conf = tmp_path / "net-conf.json"
    registry = ["--local-registry", str(tmp_path / "l.db"), "--net-config-path", str(conf)]
    unknown = ("flannel_drops_total", (("reason", "rx_unknown_peer"),))
    with Rig(2, tag="pfd") as rig:
        node, router = rig.hosts
        for backend in ({"Type": "udp"}, {"Type": "udp", "SourceCheck": False}):
            conf.write_text(json.dumps({"Network": "10.244.0.0/16", "Backend": backend}))
            proc = start_flanneld(node, registry, tmp_path / "n.env", "--healthz-port", "8471")
            pod = wait_for_env(tmp_path / "n.env", proc)["FLANNEL_SUBNET"].split("/")[0]
            node.run("ip", "addr", "replace", f"{pod}/32", "dev", "lo")
            with host_socket(node) as app, host_socket(router) as forwarder:
                app.bind((pod, 7001))
                forwarder.sendto(udp4("192.168.5.9", pod, 5000, 7001, b"via the router"), ("198.18.0.1", 8285))
                if "SourceCheck" in backend:
                    app.settimeout(5)
                    assert app.recv(100) == b"via the router"
                    assert scrape(node)[unknown] == 0
                else:
                    wait_for(lambda: scrape(node)[unknown] == 1, 10, "the datagram dropped")
                    app.setblocking(False)
                    with pytest.raises(BlockingIOError):
                        app.recv(100)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0 and proc.stderr is not None
            assert ("source check off (Backend.SourceCheck)" in proc.stderr.read()) is ("SourceCheck" in backend)
            (tmp_path / "n.env").unlink()
        conf.write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "SourceCheck": "no"}}')
        proc = start_flanneld(node, registry, tmp_path / "n.env")
        assert proc.wait(30) == 1 and proc.stderr is not None
        err = proc.stderr.read()
        assert err.strip().splitlines()[-1] == "flanneld: error: Backend.SourceCheck must be true or false, not 'no'"


def test_a_host_gw_route_the_kernel_refuses_is_retried_and_unready_meanwhile(tmp_path: Path) -> None:
    """A peer whose gateway is not on the node's link: its route is refused (one line), /readyz says so while
    the other routes stand, and the route is in place at the first recheck after the link is there."""
    registry = embedded_registry(tmp_path, NET % "host-gw")
    with Rig(2, tag="pfd") as rig:
        node = rig.hosts[0]
        log = Log(start_flanneld(node, registry, tmp_path / "n.env", "--healthz-port", "8471"))
        wait_for_env(tmp_path / "n.env", log.proc)
        write_leases(tmp_path / "leases.db", {
            "10.244.200.0-24": '{"PublicIP":"198.19.5.5","PublicIPv6":null,"BackendType":"host-gw"}',
            "10.244.201.0-24": '{"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"host-gw"}'})
        line = log.wait_for("route 10.244.200.0/24 via 198.19.5.5 refused: ")
        assert line.rstrip().endswith("trying again every 10 s"), line
        wait_for(partial(serves, node, "/readyz", "1 peer subnet(s) not routed: 10.244.200.0/24 ("), 20, "unready")
        assert "10.244.201.0/24 via 198.18.0.2 dev eth0" in node.run("ip", "route").stdout
        node.run("ip", "addr", "add", "198.19.5.1/24", "dev", "eth0")
        wait_for(partial(serves, node, "/readyz", "flanneld is ready"), 30, "the route in place")
        assert "10.244.200.0/24 via 198.19.5.5 dev eth0" in node.run("ip", "route").stdout
        log.wait_for("route 10.244.200.0/24 via 198.19.5.5 in place")
        log.proc.send_signal(signal.SIGTERM)
        assert log.proc.wait(20) == 0 and log.text().count("refused") == 1
