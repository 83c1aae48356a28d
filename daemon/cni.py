#!/usr/bin/env python3
"""The `flannel` CNI plugin: builds the delegate config from subnet.env and hands the work to a real plugin.

This file is the whole plugin: `flannel-install-cni` copies it as it is into the CNI bin directory, where kubelet
runs it with the host's python3 (3.9 or newer) and nothing else, so it imports only the standard library and
uses no syntax or call newer than 3.9. The `flannel` console script runs the same code from the package.

Behaviour follows flannel's cni-plugin (flannel.go, flannel_linux.go):
- netconf keys: name, type, subnetFile (/run/flannel/subnet.env), dataDir (/var/lib/cni/flannel), delegate,
  ipam, runtimeConfig, cniVersion.
- the delegate gets, only where absent: type "bridge", ipMasq = not FLANNEL_IPMASQ, mtu = FLANNEL_MTU,
  isGateway true (bridge only); always the netconf's name; ipam from the netconf's ipam with type host-local by
  default, ranges replaced by one range set per family (FLANNEL_SUBNET, then FLANNEL_IPV6_SUBNET), routes = the
  netconf's routes plus one per FLANNEL_NETWORK and FLANNEL_IPV6_NETWORK entry.
- ADD saves the delegate config under dataDir/<container id> (dir 0700, file 0600, fsync) and runs the delegate's
  ADD; DEL runs the delegate's DEL with exactly the saved bytes and removes the file only if that worked (no file,
  or a file that does not parse: success). CHECK does nothing. Errors are CNI error JSON on stdout, exit 1.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SUPPORTED = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"


class CniError(Exception):
    """A CNI error result (spec codes: 4 invalid config, 7 invalid env, 11 try again later, 100+ plugin's own)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


FAMILIES = (("FLANNEL_NETWORK", "FLANNEL_SUBNET", ipaddress.IPv4Interface),
            ("FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET", ipaddress.IPv6Interface))


def load_subnet_env(path: str) -> dict[str, Any]:
    """flannel's loadFlannelSubnetEnv: split each line at the first '=', no quoting; networks of both families
    deduplicated, each subnet masked to its network, MTU an unsigned integer, IPMASQ true only for exactly "true";
    at least one network and one subnet of either family."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise CniError(11, f"failed to load {path}", exc.strerror or "") from None
    raw = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            raw[key] = value
    env: dict[str, Any] = {"networks": [], "subnets": []}
    for network_key, subnet_key, interface in FAMILIES:
        env["networks"] += list(dict.fromkeys(n for n in raw.get(network_key, "").split(",") if n))
        if raw.get(subnet_key):
            try:
                env["subnets"].append(str(interface(raw[subnet_key]).network))
            except ValueError:
                raise CniError(4, f"{path}: invalid {subnet_key} {raw[subnet_key]!r}") from None
    mtu = raw.get("FLANNEL_MTU", "")
    if mtu.isascii() and mtu.isdigit():  # str.isdigit takes "²", which int() refuses
        env["mtu"] = int(mtu)
    if "FLANNEL_IPMASQ" in raw:
        env["ipmasq"] = raw["FLANNEL_IPMASQ"] == "true"
    missing = [name for key, name in (("networks", "FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK"),
                                      ("subnets", "FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET"),
                                      ("mtu", "FLANNEL_MTU"), ("ipmasq", "FLANNEL_IPMASQ"))
               if env.get(key) in (None, [])]
    if missing:
        raise CniError(4, f"{path} is missing {', '.join(missing)}")
    return env


def delegate_config(netconf: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """The config the delegate plugin receives (flannel's doCmdAdd / getDelegateIPAM)."""
    delegate = dict(netconf.get("delegate") or {})
    if "type" in delegate and not isinstance(delegate["type"], str):
        raise CniError(4, "'delegate' dictionary, if present, must have (string) 'type' field")
    for key in ("name", "ipam"):
        if key in delegate:
            raise CniError(4, f"'delegate' dictionary must not have '{key}' field, flannel will set it")
    delegate["name"] = netconf["name"]
    delegate.setdefault("type", "bridge")
    delegate.setdefault("ipMasq", not env["ipmasq"])
    delegate.setdefault("mtu", env["mtu"])
    if delegate["type"] == "bridge":
        delegate.setdefault("isGateway", True)
    if netconf.get("cniVersion"):
        delegate["cniVersion"] = netconf["cniVersion"]
    if "runtimeConfig" in netconf:
        delegate["runtimeConfig"] = netconf["runtimeConfig"]
    ipam = dict(netconf.get("ipam") or {})
    ipam.setdefault("type", "host-local")
    ipam["ranges"] = [[{"subnet": subnet}] for subnet in env["subnets"]]
    ipam["routes"] = list(ipam.get("routes") or []) + [{"dst": net} for net in env["networks"]]
    delegate["ipam"] = ipam
    return delegate


def _environ(*names: str) -> list[str]:
    values = [os.environ.get(name, "") for name in names]
    missing = [n for n, v in zip(names, values) if not v]  # noqa: B905 (zip's strict= is Python 3.10)
    if missing:
        raise CniError(7, f"required environment variables missing: {', '.join(missing)}")
    return values


def _run_delegate(command: str, config: bytes) -> str:
    """Run the delegate plugin found on CNI_PATH with this command and config; its stdout on success."""
    plugin_type = json.loads(config)["type"]
    (cni_path,) = _environ("CNI_PATH")
    exe = shutil.which(plugin_type, path=cni_path)
    if exe is None:
        raise CniError(7, f"failed to find plugin {plugin_type!r} in path [{cni_path}]")
    r = subprocess.run([exe], input=config, capture_output=True, env={**os.environ, "CNI_COMMAND": command},
                       timeout=120)
    if r.returncode != 0:
        try:
            err = json.loads(r.stdout)
            raise CniError(int(err.get("code", 999)), str(err.get("msg", "")), str(err.get("details", "")))
        except (json.JSONDecodeError, AttributeError):
            raise CniError(999, f"delegate {plugin_type} failed", r.stderr.decode(errors="replace")) from None
    return r.stdout.decode()


def cmd_add(netconf: dict[str, Any]) -> str:
    (container_id,) = _environ("CNI_CONTAINERID")
    env = load_subnet_env(netconf.get("subnetFile") or DEFAULT_SUBNET_FILE)
    config = json.dumps(delegate_config(netconf, env)).encode()
    data_dir = Path(netconf.get("dataDir") or DEFAULT_DATA_DIR)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    saved = data_dir / container_id
    fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(config)
        f.flush()
        os.fsync(f.fileno())
    return _run_delegate("ADD", config)


def cmd_del(netconf: dict[str, Any]) -> str:
    (container_id,) = _environ("CNI_CONTAINERID")
    saved = Path(netconf.get("dataDir") or DEFAULT_DATA_DIR) / container_id
    try:
        config = saved.read_bytes()
    except FileNotFoundError:
        return ""  # never added, or already deleted: success, as the spec wants DEL to be idempotent
    try:
        json.loads(config)
    except json.JSONDecodeError:
        print(f"flannel: ignoring unparseable saved config {saved}", file=sys.stderr)
        return ""
    out = _run_delegate("DEL", config)
    saved.unlink()
    return out


def cmd_check(netconf: dict[str, Any]) -> str:
    """flannel's CHECK does nothing."""
    return ""


def main() -> int:
    command = os.environ.get("CNI_COMMAND", "")
    version = "1.0.0"
    try:
        if command == "VERSION":
            print(json.dumps({"cniVersion": version, "supportedVersions": SUPPORTED}))
            return 0
        try:
            netconf = json.loads(sys.stdin.buffer.read() or b"{}")
        except json.JSONDecodeError as exc:
            raise CniError(6, f"failed to parse network config: {exc}") from None
        if not isinstance(netconf, dict) or not isinstance(netconf.get("name"), str):
            raise CniError(4, "network config must be an object with a string 'name'")
        version = str(netconf.get("cniVersion") or version)
        handlers: dict[str, Callable[[dict[str, Any]], str]] = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check}
        if command not in handlers:
            raise CniError(4, f"unknown CNI_COMMAND {command!r}")
        sys.stdout.write(handlers[command](netconf))
        return 0
    except CniError as exc:
        print(json.dumps({"cniVersion": version, "code": exc.code, "msg": exc.msg, "details": exc.details}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
