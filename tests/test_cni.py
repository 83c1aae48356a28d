"""The flannel CNI plugin with Debian's real plugins (bridge, host-local), pods across nodes, mk-docker-opts and
the install step."""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from daemons import add_ipv6_underlay, pings, start_flanneld, wait_for, wait_for_env
from traffic import start_transfer

from pyflannel.bench.rig import Host, Rig
from pyflannel.daemon import cni

BIN = Path(sys.executable).parent
PLUGIN = str(BIN / "flannel")
MK_DOCKER_OPTS = str(BIN / "mk-docker-opts")
CNI_PATH = "/usr/lib/cni"
FLANNEL_TEST_ENV = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"


def test_delegate_config_matches_flannels_golden_output(tmp_path: Path) -> None:
    env_file = tmp_path / "subnet.env"
    env_file.write_text(FLANNEL_TEST_ENV)
    netconf = {"name": "cni-flannel", "type": "flannel", "subnetFile": str(env_file)}
    delegate = cni.delegate_config(netconf, cni.load_subnet_env(str(env_file)))
    assert delegate == {
        "name": "cni-flannel", "type": "bridge", "ipMasq": False, "isGateway": True, "mtu": 1472,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.1.17.0/24"}]], "routes": [{"dst": "10.1.0.0/16"}]},
    }


def test_delegate_keeps_what_it_is_given(tmp_path: Path) -> None:
    env_file = tmp_path / "subnet.env"
    env_file.write_text("FLANNEL_NETWORK=10.1.0.0/16,10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1400\n"
                        "FLANNEL_IPMASQ=false\n")
    netconf = {"name": "cbr0", "cniVersion": "1.0.0", "delegate": {"hairpinMode": True, "isDefaultGateway": True,
                                                                  "mtu": 1300},
               "ipam": {"routes": [{"dst": "192.0.2.0/24"}], "dataDir": "/x"}, "runtimeConfig": {"a": 1}}
    delegate = cni.delegate_config(netconf, cni.load_subnet_env(str(env_file)))
    assert delegate["hairpinMode"] is True and delegate["isDefaultGateway"] is True
    assert delegate["mtu"] == 1300 and delegate["ipMasq"] is True and delegate["cniVersion"] == "1.0.0"
    assert delegate["runtimeConfig"] == {"a": 1}
    assert delegate["ipam"] == {"type": "host-local", "dataDir": "/x", "ranges": [[{"subnet": "10.1.17.0/24"}]],
                                "routes": [{"dst": "192.0.2.0/24"}, {"dst": "10.1.0.0/16"}]}


def _plugin(command: str, netconf: dict[str, Any] | str, **env: str) -> subprocess.CompletedProcess[str]:
    stdin = netconf if isinstance(netconf, str) else json.dumps(netconf)
    return subprocess.run([PLUGIN], input=stdin, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CNI_COMMAND": command, "CNI_PATH": CNI_PATH, **env})


@pytest.mark.parametrize(("netconf", "env", "code", "msg"), [
    ({"name": "n", "delegate": {"name": "x"}}, FLANNEL_TEST_ENV, 4, "'delegate' dictionary must not have 'name'"),
    ({"name": "n", "delegate": {"type": 7}}, FLANNEL_TEST_ENV, 4, "must have (string) 'type' field"),
    ({"name": "n"}, "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\n", 4,
     "is missing FLANNEL_MTU, FLANNEL_IPMASQ"),
    ({"name": "n"}, "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=\u00b2\n"
     "FLANNEL_IPMASQ=true\n", 4, "is missing FLANNEL_MTU"),
    ({"name": "n", "delegate": {"type": "no-such-plugin"}}, FLANNEL_TEST_ENV, 7,
     "failed to find plugin 'no-such-plugin'"),
])
def test_errors_are_cni_error_json(tmp_path: Path, netconf: dict[str, Any], env: str, code: int, msg: str) -> None:
    (tmp_path / "subnet.env").write_text(env)
    conf = {**netconf, "cniVersion": "1.0.0", "subnetFile": str(tmp_path / "subnet.env"),
            "dataDir": str(tmp_path / "data")}
    r = _plugin("ADD", conf, CNI_CONTAINERID="c1", CNI_NETNS="/nonexistent", CNI_IFNAME="eth0")
    assert r.returncode == 1
    err = json.loads(r.stdout)
    assert err["code"] == code and msg in err["msg"] and err["cniVersion"] == "1.0.0"


def test_version_and_bad_input() -> None:
    r = _plugin("VERSION", "")
    assert r.returncode == 0 and "1.0.0" in json.loads(r.stdout)["supportedVersions"]
    r = _plugin("ADD", "{not json")
    assert r.returncode == 1 and json.loads(r.stdout)["code"] == 6
    r = _plugin("DEL", {"name": "n"}, CNI_CONTAINERID="never-added")
    assert r.returncode == 0, "DEL of something never added succeeds"


def _cni(node: Host, command: str, pod: Host, netconf: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": pod.ns, "CNI_NETNS": f"/run/netns/{pod.ns}",
           "CNI_IFNAME": "eth0", "CNI_PATH": CNI_PATH}
    return node.run(PLUGIN, input=json.dumps(netconf), env=env, check=False)


@pytest.mark.parametrize("registry", ["embedded", "etcd"])
def test_pods_across_nodes(registry: str, tmp_path: Path) -> None:
    from daemons import Etcd

    (tmp_path / "net-conf.json").write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}')
    with Rig(3, tag="pfc") as rig:
        nodes = rig.hosts[:2]
        if registry == "etcd":
            etcd = Etcd(rig.hosts[2], tmp_path / "etcd")
            etcd.start()
            etcd.put("/coreos.com/network/config", (tmp_path / "net-conf.json").read_text())
            reg = ["--etcd-endpoints", etcd.url]
        else:
            reg = ["--local-registry", str(tmp_path / "leases.db"),
                   "--net-config-path", str(tmp_path / "net-conf.json")]
        pods, confs = [], []
        for i, node in enumerate(nodes):
            node.run("sysctl", "-qw", "net.ipv4.ip_forward=1")  # as on any Kubernetes node
            env_file = tmp_path / f"node{i}.env"
            wait_for_env(env_file, start_flanneld(node, reg, env_file))
            conf: dict[str, Any] = {
                "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel", "subnetFile": str(env_file),
                "dataDir": str(tmp_path / f"node{i}-flannel"),
                "delegate": {"hairpinMode": True, "isDefaultGateway": True},
                "ipam": {"dataDir": str(tmp_path / f"node{i}-ipam")}}
            pod = rig.add_namespace(f"pod{i}")
            r = _cni(node, "ADD", pod, conf)
            assert r.returncode == 0, r.stdout + r.stderr
            result = json.loads(r.stdout)
            pod.underlay = ipaddress.IPv4Interface(result["ips"][0]["address"]).ip  # the pod's address
            node_subnet = (tmp_path / f"node{i}.env").read_text().split("FLANNEL_SUBNET=")[1].split()[0]
            assert pod.underlay in ipaddress.IPv4Interface(node_subnet).network
            pods.append(pod)
            confs.append(conf)
        a, b = pods
        # Leases reach the other node through the registry watch: wait for the first packet to make it.
        wait_for(lambda: "1 received" in a.run("ping", "-c", "1", "-W", "1", str(b.underlay), check=False).stdout,
                 20, "pod to pod")
        transfer = start_transfer(_as_endpoint(a), _as_endpoint(b), 50 << 20)
        transfer.join()
        assert transfer.received == transfer.sent and transfer.received_bytes == 50 << 20
        out = a.run("ping", "-c", "2", "-W", "2", str(nodes[1].underlay), check=False).stdout
        assert "2 received" in out, "pod to the remote node"
        for node, pod, conf in zip(nodes, pods, confs, strict=True):
            assert _cni(node, "DEL", pod, conf).returncode == 0
            assert "eth0" not in pod.run("ip", "link").stdout, "the pod's interface is gone"
            assert not list((Path(conf["ipam"]["dataDir"]) / "cbr0").glob("10.*")), "the address is released"
            assert not (Path(conf["dataDir"]) / pod.ns).exists()
            assert _cni(node, "DEL", pod, conf).returncode == 0, "a second DEL is fine"


def test_dual_stack_pods_across_nodes(tmp_path: Path) -> None:
    """The delegate's two range sets and both networks' routes give each pod an address of each family through
    Debian's bridge and host-local; pods reach each other over both, across vxlan's two devices."""
    (tmp_path / "net-conf.json").write_text('{"Network": "10.244.0.0/16", "EnableIPv6": true, '
                                            '"IPv6Network": "fd00:10:244::/48", "Backend": {"Type": "vxlan"}}')
    reg = ["--local-registry", str(tmp_path / "leases.db"), "--net-config-path", str(tmp_path / "net-conf.json")]
    with Rig(2, tag="pfc") as rig:
        add_ipv6_underlay(rig.hosts)
        pods: list[tuple[Host, dict[int, str]]] = []
        for i, node in enumerate(rig.hosts):
            node.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
            env_file = tmp_path / f"node{i}.env"
            env = wait_for_env(env_file, start_flanneld(node, reg, env_file))
            conf = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel", "subnetFile": str(env_file),
                    "dataDir": str(tmp_path / f"node{i}-flannel"), "delegate": {"isDefaultGateway": True},
                    "ipam": {"dataDir": str(tmp_path / f"node{i}-ipam")}}
            pod = rig.add_namespace(f"pod{i}")
            r = _cni(node, "ADD", pod, conf)
            assert r.returncode == 0, r.stdout + r.stderr
            ips = [ipaddress.ip_interface(ip["address"]) for ip in json.loads(r.stdout)["ips"]]
            assert [ip.network for ip in ips] == [ipaddress.ip_network(env[k], strict=False)
                                                  for k in ("FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET")]
            pods.append((pod, {ip.version: str(ip.ip) for ip in ips}))
        (a, a_ips), (b, b_ips) = pods
        for version in (4, 6):
            wait_for(partial(pings, a, a_ips[version], b_ips[version]), 20, f"pod to pod, IPv{version}")
        transfer = start_transfer(a, b, 8 << 20, addrs=(a_ips[6], b_ips[6]))
        transfer.join()
        assert transfer.received == transfer.sent and transfer.received_bytes == 8 << 20


def _as_endpoint(pod: Host) -> Host:
    """traffic.start_transfer talks between overlay_ip addresses (subnet base + 1): make that the pod's address."""
    return Host(pod.ns, pod.underlay, ipaddress.IPv4Network(f"{pod.underlay - 1}/32"))


def test_mk_docker_opts(tmp_path: Path) -> None:
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")
    out = tmp_path / "docker_opts.env"

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MK_DOCKER_OPTS, "-f", str(env), "-d", str(out), *args], capture_output=True,
                              text=True, env={**os.environ, **extra}, timeout=30)

    assert run().returncode == 0
    assert out.read_text() == ('DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=true"\n'
                               'DOCKER_OPT_MTU="--mtu=1472"\nDOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true '
                               '--mtu=1472"\n')
    assert run("-c").returncode == 0
    assert out.read_text() == 'DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'
    assert run("-i", "-m").returncode == 0
    assert out.read_text() == 'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_MTU="--mtu=1472"\n'
    assert run("-c", "-k", "EXTRA", EXTRA="--debug").returncode == 0
    assert out.read_text() == 'EXTRA="--debug  --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'
    env.write_text("FLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_IPMASQ=maybe\n")
    r = run()
    assert r.returncode == 1 and "Invalid value of FLANNEL_IPMASQ: maybe" in r.stderr
    assert run("-x").returncode == 1 and run("-h").returncode == 1


def _install(tmp_path: Path) -> Path:
    conflist = '{"name": "cbr0", "cniVersion": "1.0.0", "plugins": [{"type": "flannel"}]}'
    r = subprocess.run([str(BIN / "flannel-install-cni"), "--cni-bin-dir", str(tmp_path / "bin"), "--cni-conf-dir",
                        str(tmp_path / "net.d")], env={**os.environ, "CNI_NETWORK_CONFIG": conflist},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "net.d" / "10-flannel.conflist").read_text() == conflist
    return tmp_path / "bin" / "flannel"


def test_install_cni_copies_a_plain_self_contained_file(tmp_path: Path) -> None:
    plugin = _install(tmp_path)
    assert not plugin.is_symlink() and plugin.stat().st_mode & 0o777 == 0o755
    source = plugin.read_text()
    assert source.startswith("#!/usr/bin/env python3\n") and source == Path(cni.__file__).read_text()
    tree = ast.parse(source, feature_version=(3, 9))  # no syntax newer than the oldest python3 it promises
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= sys.stdlib_module_names, f"not in the standard library: {imported - sys.stdlib_module_names}"
    v = subprocess.run([str(plugin)], env={"PATH": "/usr/bin:/bin", "CNI_COMMAND": "VERSION"},
                       capture_output=True, text=True, timeout=30)
    assert v.returncode == 0 and "supportedVersions" in v.stdout


def test_installed_plugin_on_bare_python3(tmp_path: Path) -> None:
    """The installed file under the host's python3 with no site-packages (-I -S) and a bare environment, through
    VERSION, ADD, CHECK and DEL with the real bridge and host-local plugins: the pod gets an address in the
    node's subnet and reaches the node, and DEL takes it all away."""
    plugin = _install(tmp_path)
    (tmp_path / "subnet.env").write_text("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.9.1/24\n"
                                         "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n")
    conf = json.dumps({"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
                       "subnetFile": str(tmp_path / "subnet.env"), "dataDir": str(tmp_path / "flannel"),
                       "ipam": {"dataDir": str(tmp_path / "ipam")}})
    with Rig(2, tag="pfb") as rig:  # a rig has at least two hosts; the second stays idle
        node, pod = rig.hosts[0], rig.add_namespace("pod")

        def run(command: str) -> subprocess.CompletedProcess[str]:
            env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": pod.ns,
                   "CNI_NETNS": f"/run/netns/{pod.ns}", "CNI_IFNAME": "eth0", "CNI_PATH": CNI_PATH}
            return node.run("/usr/bin/python3", "-I", "-S", str(plugin), input=conf, env=env, check=False,
                            cwd=str(tmp_path))

        version = run("VERSION")
        assert version.returncode == 0 and "1.0.0" in json.loads(version.stdout)["supportedVersions"]
        add = run("ADD")
        assert add.returncode == 0, add.stdout + add.stderr
        address = ipaddress.IPv4Interface(json.loads(add.stdout)["ips"][0]["address"])
        assert address.ip in ipaddress.IPv4Network("10.244.9.0/24")
        assert json.loads((tmp_path / "flannel" / pod.ns).read_text())["mtu"] == 1472
        assert "1 received" in pod.run("ping", "-c", "1", "-W", "2", "10.244.9.1", check=False).stdout
        assert run("CHECK").returncode == 0
        delete = run("DEL")
        assert delete.returncode == 0, delete.stdout + delete.stderr
        assert "eth0" not in pod.run("ip", "link").stdout
        assert not (tmp_path / "flannel" / pod.ns).exists()
        assert run("DEL").returncode == 0, "a second DEL is fine"
