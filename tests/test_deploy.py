"""The deployment files: the manifest's pieces are what flanneld, the plugin and the install step accept.

No Kubernetes cluster can run here, so the manifest is checked for content, not applied."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from daemon import cni, config

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
