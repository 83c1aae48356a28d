"""subnet.env: what the CNI plugin and mk-docker-opts read, written as flannel writes it.

Order and format (pkg/subnet/subnet.go WriteSubnetFile): FLANNEL_NETWORK and FLANNEL_SUBNET (the lease's first
address with its prefix length) if the network has IPv4, FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET if it has
IPv6, then FLANNEL_MTU and FLANNEL_IPMASQ; no quoting. Written to a temporary file in the same
directory and renamed over the old one (mode 0644), so a reader never sees half a file.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from pathlib import Path

from pyflannel.daemon.config import Network, NetworkConfig
from pyflannel.daemon.errors import FlannelError
from pyflannel.daemon.lease import Lease

MAX_BYTES = 64 * 1024
KEYS = {4: ("FLANNEL_NETWORK", "FLANNEL_SUBNET"), 6: ("FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET")}


def render(cfg: NetworkConfig, lease: Lease, *, mtu: int, ip_masq: bool) -> str:
    text = ""
    for pool, subnet in ((cfg.ipv4, lease.subnet), (cfg.ipv6, lease.ipv6_subnet)):
        if pool is not None and subnet is not None:
            network_key, subnet_key = KEYS[subnet.version]
            text += (f"{network_key}={pool.network}\n"
                     f"{subnet_key}={subnet.network_address + 1}/{subnet.prefixlen}\n")
    return text + f"FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={'true' if ip_masq else 'false'}\n"


def write(path: str, content: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_target(path: str) -> None:
    """FlannelError now, before anything is set up, if subnet.env could not be written at the end."""
    target = Path(path)
    if target.is_dir():
        raise FlannelError(f"--subnet-file {path} is a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise FlannelError(f"cannot write --subnet-file {path}: {exc.strerror}") from None


def previous_subnets(path: str) -> tuple[ipaddress.IPv4Network | None, ipaddress.IPv6Network | None]:
    """FLANNEL_SUBNET and FLANNEL_IPV6_SUBNET from an earlier run, masked to their networks (10.5.72.1/24 ->
    10.5.72.0/24); None where absent, not of that family, or a list (flannel treats more than one value as no
    previous value); FlannelError if the file is not text."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise FlannelError(f"cannot read --subnet-file {path}: {exc.strerror}") from None
    try:
        text = data.decode() if len(data) <= MAX_BYTES and b"\0" not in data else None
    except UnicodeDecodeError:
        text = None
    if text is None:
        raise FlannelError(f"--subnet-file {path} is not a subnet.env (binary data): remove it")
    values = {}
    for line in text.splitlines():
        key, sep, value = line.removeprefix("export ").partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("\"'")
    v4, v6 = (_network(values.get(KEYS[version][1], ""), version) for version in (4, 6))
    return v4, v6  # type: ignore[return-value]


def _network(value: str, version: int) -> Network | None:
    try:
        network = ipaddress.ip_network(value, strict=False) if value and "," not in value else None
    except ValueError:
        return None
    return network if network is not None and network.version == version else None
