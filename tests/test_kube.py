"""flanneld --kube-subnet-mgr against the fake API server (tests/fake_kube.py): leases from podCIDRs,
annotations, the NetworkUnavailable condition, peers from other Nodes, and the documented errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from conftest import host_socket
from daemons import (
    FLANNELD,
    IFA_F_NODAD,
    add_ipv6_underlay,
    assert_all_pairs_reach,
    send_and_catch,
    underlay6,
    unreachable,
    wait_for,
    wait_for_env,
)
from fake_kube import FakeKube

from pyflannel.bench.rig import Host, Rig

P = "flannel.alpha.coreos.com/"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Rig, FakeKube, Path]]:
    """Two nodes and an API server host; kubeconfig and net-conf.json written to tmp_path."""
    with Rig(3, tag="pfk") as rig:
        api_host = rig.hosts[2]
        sock = host_socket(api_host, socket.SOCK_STREAM)
        sock.bind((str(api_host.underlay), 6443))
        sock.listen()
        kube = FakeKube()
        kube.start(sock)
        (tmp_path / "kubeconfig").write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://{api_host.underlay}:6443"}}],
            "users": [{"name": "flannel", "user": {}}],
            "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "flannel"}}]}))
        (tmp_path / "net-conf.json").write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}')
        try:
            yield rig, kube, tmp_path
        finally:
            rig.close()
            kube.stop()


def _flanneld(node: Host, name: str, tmp: Path) -> subprocess.Popen[str]:
    return node.popen(FLANNELD, "--kube-subnet-mgr", "--kubeconfig-file", str(tmp / "kubeconfig"),
                      "--net-config-path", str(tmp / "net-conf.json"), "--subnet-file", str(tmp / f"{name}.env"),
                      "--iface", "eth0", stderr=subprocess.PIPE, text=True, env={**os.environ, "NODE_NAME": name})


def test_nodes_get_their_pod_cidrs_and_reach_each_other(cluster: tuple[Rig, FakeKube, Path]) -> None:
    rig, kube, tmp = cluster
    nodes = rig.hosts[:2]
    for i in range(2):
        kube.add_node(f"n{i}", f"10.244.{i + 1}.0/24")
    envs = []
    for i, node in enumerate(nodes):
        env = wait_for_env(tmp / f"n{i}.env", _flanneld(node, f"n{i}", tmp))
        assert env["FLANNEL_SUBNET"] == f"10.244.{i + 1}.1/24", "the lease is the Node's podCIDR"
        with node.ipr() as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=f"10.244.{i + 1}.1", prefixlen=32)
        envs.append(env)
    for i, node in enumerate(nodes):
        obj = wait_for(partial(_network_up, kube, f"n{i}"), 20, "NetworkUnavailable=False")
        assert {k: v for k, v in obj["metadata"]["annotations"].items() if k.startswith(P)} == {
            P + "backend-data": "null", P + "backend-type": "", P + "kube-subnet-manager": "true",
            P + "public-ip": str(node.underlay)}
    assert all(ctype == "application/strategic-merge-patch+json" for ctype, _ in kube.patches)
    assert_all_pairs_reach(nodes, envs)

    # A flannel node elsewhere, announced only through its Node object.
    api_host = rig.hosts[2]
    api_host.run("ip", "addr", "add", "198.18.0.99/24", "dev", "eth0")
    _far_node_is_reached(kube, api_host, nodes)
    kube.delete_node("far")
    for i, node in enumerate(nodes):
        wait_for(partial(unreachable, node, f"10.244.{i + 1}.1"), 20, "the route to go")

    # The API server forgets its history (410 Gone on resuming): the far node added meanwhile is still found.
    kube.compact()
    _far_node_is_reached(kube, api_host, nodes)
    assert kube.watch_410s >= 2, "both nodes resumed their watch and were told 410 Gone"


def test_dual_stack_nodes_from_their_pod_cidrs(cluster: tuple[Rig, FakeKube, Path]) -> None:
    """podCIDRs of both families become the lease; each node writes the IPv6 annotations (backend-v6-data with
    flannel-v6.1's MAC, public-ipv6) beside the IPv4 ones, and reads the other's to reach it over both."""
    rig, kube, tmp = cluster
    nodes = rig.hosts[:2]
    add_ipv6_underlay(nodes)
    (tmp / "net-conf.json").write_text('{"Network": "10.244.0.0/16", "EnableIPv6": true, '
                                       '"IPv6Network": "fd00:10:244::/48", "Backend": {"Type": "vxlan"}}')
    envs = []
    for i, node in enumerate(nodes):
        kube.add_node(f"n{i}", pod_cidrs=[f"10.244.{i + 1}.0/24", f"fd00:10:244:{i + 1}::/64"])
        env = wait_for_env(tmp / f"n{i}.env", _flanneld(node, f"n{i}", tmp))
        assert (env["FLANNEL_SUBNET"], env["FLANNEL_IPV6_SUBNET"]) == (f"10.244.{i + 1}.1/24",
                                                                       f"fd00:10:244:{i + 1}::1/64")
        with node.ipr() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.addr("add", index=lo, address=f"10.244.{i + 1}.1", prefixlen=32)
            ipr.addr("add", index=lo, address=f"fd00:10:244:{i + 1}::1", prefixlen=128, flags=IFA_F_NODAD)
        envs.append(env)
    for i, node in enumerate(nodes):
        obj = wait_for(partial(_network_up, kube, f"n{i}"), 20, "NetworkUnavailable=False")
        macs = [node.run("cat", f"/sys/class/net/{dev}/address").stdout.strip() for dev in ("flannel.1",
                                                                                           "flannel-v6.1")]
        assert {k: v for k, v in obj["metadata"]["annotations"].items() if k.startswith(P)} == {
            P + "backend-data": f'{{"VNI":1,"VtepMAC":"{macs[0]}"}}', P + "backend-type": "vxlan",
            P + "backend-v6-data": f'{{"VNI":1,"VtepMAC":"{macs[1]}"}}', P + "kube-subnet-manager": "true",
            P + "public-ip": str(node.underlay), P + "public-ipv6": underlay6(node)}
    assert_all_pairs_reach(nodes, envs)
    assert_all_pairs_reach(nodes, envs, "FLANNEL_IPV6_SUBNET")


def _far_node_is_reached(kube: FakeKube, api_host: Host, nodes: list[Host]) -> None:
    """Announce a flannel node at 198.18.0.99 through its Node object only; every node routes to it."""
    kube.add_node("far", "10.244.200.0/24", {P + "kube-subnet-manager": "true", P + "public-ip": "198.18.0.99",
                                             P + "backend-type": "", P + "backend-data": "null"})
    with host_socket(api_host) as flannel_node:
        flannel_node.bind(("198.18.0.99", 8285))
        flannel_node.settimeout(1)
        for i, node in enumerate(nodes):
            pkt = wait_for(partial(send_and_catch, node, f"10.244.{i + 1}.1", flannel_node), 20, "route to far")
            assert pkt is not None and pkt.dst == "10.244.200.7"


def _network_up(kube: FakeKube, name: str) -> dict[str, object] | None:
    node = kube.node(name)
    conds = [c for c in node["status"]["conditions"] if c["type"] == "NetworkUnavailable"]
    if conds and conds[0]["status"] == "False" and conds[0]["reason"] == "FlannelIsUp":
        return node
    return None


def test_pod_cidr_outside_the_network_and_missing(cluster: tuple[Rig, FakeKube, Path]) -> None:
    rig, kube, tmp = cluster
    kube.add_node("n0", "10.99.1.0/24")
    proc = _flanneld(rig.hosts[0], "n0", tmp)
    assert proc.wait(30) == 1 and proc.stderr is not None
    assert proc.stderr.read().strip().endswith(
        "subnet 10.99.1.0/24 (the podCIDR of node n0) is not inside the network 10.244.0.0/16")
    kube.add_node("n1")
    proc = _flanneld(rig.hosts[1], "n1", tmp)
    assert proc.wait(60) == 1 and proc.stderr is not None
    assert proc.stderr.read().strip().endswith("node n1 pod cidr not assigned")


def test_waits_for_a_pod_cidr_to_be_assigned(cluster: tuple[Rig, FakeKube, Path]) -> None:
    rig, kube, tmp = cluster
    kube.add_node("n0")
    proc = _flanneld(rig.hosts[0], "n0", tmp)
    wait_for(lambda: kube.node_gets["n0"] >= 3, 20, "a third look at the Node (every 3 s)")
    assert proc.poll() is None and kube.patches == [] and not (tmp / "n0.env").exists(), "still waiting"
    kube.set_pod_cidr("n0", "10.244.7.0/24")
    assert wait_for_env(tmp / "n0.env", proc)["FLANNEL_SUBNET"] == "10.244.7.1/24"


def test_node_name_is_required(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_NAME", "POD_NAME", "POD_NAMESPACE")}
    r = subprocess.run([FLANNELD, "--kube-subnet-mgr"], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == "flanneld: error: env variables POD_NAME and POD_NAMESPACE must be set (or NODE_NAME)"


def test_node_public_ip_annotations_pin_the_public_addresses(cluster: tuple[Rig, FakeKube, Path]) -> None:
    """node-public-ip, read at startup, wins over the interface's address (flannel's GetStoredPublicIP): the lease
    is announced with it. A value that is no IPv4 address is a one-line error naming the annotation."""
    rig, kube, tmp = cluster
    node = rig.hosts[0]
    with node.ipr() as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address="198.18.0.60", prefixlen=24)
    kube.add_node("n0", "10.244.1.0/24", {P + "node-public-ip": "198.18.0.60"})
    proc = _flanneld(node, "n0", tmp)
    try:
        wait_for_env(tmp / "n0.env", proc)
        obj = wait_for(partial(_network_up, kube, "n0"), 20, "NetworkUnavailable=False")
        assert obj["metadata"]["annotations"][P + "public-ip"] == "198.18.0.60"
    finally:
        proc.terminate()
        proc.wait(30)
    kube.add_node("n1", "10.244.2.0/24", {P + "node-public-ip": "198.18.0.60/24"})
    assert _refused_annotation(rig.hosts[1], "n1", tmp) == "node-public-ip '198.18.0.60/24'"


def _refused_annotation(node: Host, name: str, tmp: Path) -> str:
    """flanneld on the node exits 2 on a Node annotation that is no IPv4 address: which one and its value, as the
    one-line error gives them."""
    proc = _flanneld(node, name, tmp)
    assert proc.wait(30) == 2 and proc.stderr is not None
    err = proc.stderr.read().strip().splitlines()
    prefix, suffix = f"flanneld: error: node {name}: annotation {P}", " is not an IPv4 address"
    assert err[-1].startswith(prefix) and err[-1].endswith(suffix), err
    return err[-1][len(prefix):-len(suffix)]


def test_a_public_ip_overwrite_that_is_no_address_is_refused(cluster: tuple[Rig, FakeKube, Path]) -> None:
    """public-ip-overwrite is announced to every node as this node's address; flannel writes whatever it holds,
    which each peer then cannot use. Refused here, in one line naming the annotation, before anything is written."""
    rig, kube, tmp = cluster
    kube.add_node("n0", "10.244.1.0/24", {P + "public-ip-overwrite": "nat.example"})
    assert _refused_annotation(rig.hosts[0], "n0", tmp) == "public-ip-overwrite 'nat.example'"
    assert kube.patches == [], "nothing announced"
