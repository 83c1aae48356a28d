"""subnet.env: what the CNI plugin and mk-docker-opts read, written as flannel writes it.

Order and format (pkg/subnet/subnet.go WriteSubnetFile): FLANNEL_NETWORK, FLANNEL_SUBNET (the lease's first
address with its prefix length), FLANNEL_MTU, FLANNEL_IPMASQ; no quoting. Written to a temporary file in the same
directory and renamed over the old one (mode 0644), so a reader never sees half a file.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from pathlib import Path

from pyflannel.daemon.errors import FlannelError

MAX_BYTES = 64 * 1024


def render(*, network: ipaddress.IPv4Network, subnet: ipaddress.IPv4Network, mtu: int, ip_masq: bool) -> str:
    return (f"FLANNEL_NETWORK={network}\n"
            f"FLANNEL_SUBNET={subnet.network_address + 1}/{subnet.prefixlen}\n"
            f"FLANNEL_MTU={mtu}\n"
            f"FLANNEL_IPMASQ={'true' if ip_masq else 'false'}\n")


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


def previous_subnet(path: str) -> ipaddress.IPv4Network | None:
    """FLANNEL_SUBNET from an earlier run, masked to its network (10.5.72.1/24 -> 10.5.72.0/24); None if absent
    or a list (flannel treats more than one value as no previous value); FlannelError if it is not text."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FlannelError(f"cannot read --subnet-file {path}: {exc.strerror}") from None
    try:
        text = data.decode() if len(data) <= MAX_BYTES and b"\0" not in data else None
    except UnicodeDecodeError:
        text = None
    if text is None:
        raise FlannelError(f"--subnet-file {path} is not a subnet.env (binary data): remove it")
    lines = text.splitlines()
    for line in lines:
        key, sep, value = line.removeprefix("export ").partition("=")
        if sep and key.strip() == "FLANNEL_SUBNET":
            value = value.strip().strip("\"'")
            if "," in value:
                return None
            try:
                return ipaddress.IPv4Network(value, strict=False)
            except ValueError:
                return None
    return None
