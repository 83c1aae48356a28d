"""The deployment files: the manifest's pieces are what flanneld, the plugin and the install step accept.

No Kubernetes cluster can run here, so the manifest is checked for content, not applied."""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from pyflannel.daemon import cni, config, flags, subnet_env
from pyflannel.dataplane import tunnel

DEPLOY = Path(__file__).parent.parent / "daemon" / "deploy"


def _docs() -> dict[str, Any]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / "kube-pyflannel.yml").read_text()) if doc}


def test_rbac_is_flannels() -> None:
    rules = {tuple(r["resources"]): sorted(r["verbs"]) for r in _docs()["ClusterRole"]["rules"]}
    assert rules == {("pods",): ["get"], ("nodes",): ["get", "list", "watch"], ("nodes/status",): ["patch"]}


def test_configmap_is_usable(tmp_path: Path) -> None:
    data = _docs()["ConfigMap"]["data"]
    net = config.parse(data["net-conf.json"])
    assert str(net.network) == "10.244.0.0/16" and net.backend_type == "udp"
    conflist = json.loads(data["cni-conf.json"])
    plugin = {**conflist["plugins"][0], "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1472\n"
                   "FLANNEL_IPMASQ=true\n")
    delegate = cni.delegate_config(plugin, cni.load_subnet_env(str(env)))
    assert delegate["hairpinMode"] is True and delegate["isDefaultGateway"] is True and delegate["ipMasq"] is False


def test_daemonset_runs_pyflannels_commands() -> None:
    spec = _docs()["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["serviceAccountName"] == "flannel"
    (main,) = spec["containers"]
    assert main["command"][:3] == ["flanneld", "--ip-masq", "--kube-subnet-mgr"]
    assert {"NET_ADMIN", "NET_RAW"} <= set(main["securityContext"]["capabilities"]["add"])
    (install,) = spec["initContainers"]
    assert install["command"][0] == "flannel-install-cni"
    mounts = {v["name"] for v in spec["volumes"]}
    assert {"run", "cni-bin", "cni-conf", "flannel-cfg", "xtables-lock", "dev-net-tun"} <= mounts


SYSTEMD = DEPLOY / "systemd"


def _unit(name: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """A unit file's settings ({key: values in order}) and the example variables in its comments."""
    settings: dict[str, list[str]] = {}
    examples = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        if line.startswith("#") and "=" in line and line[1:].strip().split("=")[0].isupper():
            key, _, value = line[1:].strip().partition("=")
            examples[key] = value
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings, examples


def test_systemd_units_run_what_they_say() -> None:
    flanneld, env = _unit("flanneld.service")
    assert flanneld["ExecStart"] == ["/usr/local/bin/flanneld"] and flanneld["Restart"] == ["always"]
    opts = flags.parse([], environ=env)
    assert opts.etcd_endpoints == "https://198.18.0.9:2379" and opts.iface == ["eth0"] and opts.ip_masq
    tunnel_unit, env = _unit("flannel-tunnel.service")
    assert tunnel_unit["ExecStart"] == ["/usr/local/bin/flannel-tunnel $FLANNEL_TUNNEL_ARGS"]
    assert tunnel_unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"], "reload is SIGHUP: the peers file again"
    cfg = tunnel.parse_config(env["FLANNEL_TUNNEL_ARGS"].split())
    assert cfg.peers_file == "/etc/flannel/peers" and str(cfg.subnet) == "10.244.1.0/24"
    scripts = tomllib.loads((DEPLOY.parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"flanneld", "flannel-tunnel"} <= set(scripts)


def test_docker_drop_in_reads_what_flanneld_writes() -> None:
    docker, _ = _unit("docker-flannel.conf")
    assert docker["EnvironmentFile"] == ["/run/flannel/subnet.env"] and docker["ExecStart"][0] == ""
    written = subnet_env.render(network=ipaddress.IPv4Network("10.244.0.0/16"),
                                subnet=ipaddress.IPv4Network("10.244.3.0/24"), mtu=1472, ip_masq=True)
    variables = {line.split("=")[0] for line in written.splitlines()}
    used = set(re.findall(r"\$\{(\w+)\}", docker["ExecStart"][1]))
    assert used and used <= variables


def test_manifest_is_valid_kubernetes_and_what_an_operator_applies() -> None:
    docs = _docs()
    for doc in docs.values():
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    assert docs["Namespace"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}]
    (flanneld,) = pod["containers"]
    assert all(not c["image"].endswith(":latest") and ":" in c["image"] for c in pod["containers"] +
               pod["initContainers"]), "a pinned tag"
    assert flanneld["resources"]["requests"] == {"cpu": "100m", "memory": "50Mi"}
    assert flanneld["ports"] == [{"name": "healthz", "containerPort": 8471}]
    assert flanneld["livenessProbe"]["httpGet"]["port"] == flanneld["readinessProbe"]["httpGet"]["port"] == "healthz"
    port = flanneld["command"][flanneld["command"].index("--healthz-port") + 1]
    assert port == "8471", "the named port is the one flanneld serves"
    assert {doc["metadata"].get("namespace") for doc in docs.values()} - {None} == {"kube-pyflannel"}


def test_dockerignore_keeps_local_environments_out_of_the_image() -> None:
    ignored = (DEPLOY.parent.parent / ".dockerignore").read_text().split()
    assert {".venv", ".git", "build", "**/*.so"} <= set(ignored)
