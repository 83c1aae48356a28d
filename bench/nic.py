"""What a benchmark host is: kernel, CPUs, and the underlay NIC's MTU and offloads.

The offloads are the ones that decide whether encapsulation is cheap on that NIC: segmentation of UDP-tunnelled
TCP (VXLAN) in hardware, TCP segmentation, receive coalescing, and GRO of forwarded UDP.
"""

from __future__ import annotations

import os
import platform
from typing import Any

from pyflannel.bench.rig import Host

# report name -> the feature's name in `ethtool -k` output
OFFLOADS = {"tx-udp_tnl-segmentation": "tx-udp_tnl-segmentation", "gro": "generic-receive-offload",
            "tso": "tcp-segmentation-offload", "rx-udp-gro-forwarding": "rx-udp-gro-forwarding"}


def machine() -> dict[str, Any]:
    """This machine: kernel, CPU count and model, Python."""
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version()}


def underlay(host: Host) -> dict[str, Any]:
    """The host's underlay interface: name, address, MTU and offloads ("on", "off", "off [fixed]"; "n/a" when
    the kernel does not know the feature, or ethtool is missing)."""
    with host.ipr() as ipr:
        mtu = ipr.get_links(ipr.link_lookup(ifname=host.iface)[0])[0].get("IFLA_MTU")
    try:
        out = host.run("ethtool", "-k", host.iface, check=False).stdout
    except FileNotFoundError:
        out = ""
    states = dict(line.strip().split(": ", 1) for line in out.splitlines() if ": " in line)
    return {"iface": host.iface, "address": str(host.underlay), "mtu": mtu,
            "offloads": {name: states.get(feature, "n/a") for name, feature in OFFLOADS.items()}}


def summary(label: str, host: dict[str, Any]) -> str:
    """One line for the table: `remote  198.18.0.2 eth0 MTU 1500, kernel 6.1: tso on, gro on, ...`."""
    nic = host["underlay"]
    offloads = ", ".join(f"{name} {state}" for name, state in nic["offloads"].items())
    return f"{label}: {nic['address']} {nic['iface']} MTU {nic['mtu']}, kernel {host['kernel']}: {offloads}"
