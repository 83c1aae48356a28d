"""The network config (etcd `<prefix>/config`, or a net-conf.json file), parsed and checked as flannel does.

flannel decodes it with Go's encoding/json, so keys match case-insensitively and unknown keys are ignored;
EnableIPv4 defaults to true; a missing Backend means udp (the documentation says vxlan; the code says udp).
IPv4 only here: IPv6 settings are accepted and rejected with a clear message if enabled.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from pyflannel.daemon import safejson
from pyflannel.daemon.errors import ConfigError

BACKENDS = ("udp", "vxlan", "host-gw")
MAX_BYTES, MAX_DEPTH = 1 << 20, 32


@dataclass(frozen=True)
class NetworkConfig:
    network: ipaddress.IPv4Network
    subnet_len: int
    subnet_min: ipaddress.IPv4Address
    subnet_max: ipaddress.IPv4Address
    backend_type: str
    backend: dict[str, Any] = field(default_factory=dict)  # the Backend object, keys lower-cased

    def subnets(self) -> list[ipaddress.IPv4Network]:
        """Every allocatable subnet from SubnetMin to SubnetMax, in order."""
        step = 1 << (32 - self.subnet_len)
        first, last = int(self.subnet_min), int(self.subnet_max)
        return [ipaddress.IPv4Network((a, self.subnet_len)) for a in range(first, last + 1, step)]

    def backend_option(self, name: str, default: Any) -> Any:
        return self.backend.get(name.lower(), default)


def read(path: str) -> str:
    """A network config file's text (net-conf.json); ConfigError for a file that cannot be read or is not text."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read network config {path}: {exc.strerror}") from None
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"network config {path} is not UTF-8 text") from None


def _folded(obj: dict[str, Any]) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in obj.items()}


def parse(text: str) -> NetworkConfig:
    """Parse and validate (flannel's ParseConfig + CheckNetworkConfig); ConfigError says what is wrong."""
    try:
        raw = safejson.loads(text, max_bytes=MAX_BYTES, max_depth=MAX_DEPTH)
    except ValueError as exc:
        raise ConfigError(f"invalid network config: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("invalid network config: expected a JSON object")
    cfg = _folded(raw)
    if cfg.get("enableipv6"):
        raise ConfigError("EnableIPv6 is not supported by pyflannel yet")
    if cfg.get("enablenftables"):
        raise ConfigError("EnableNFTables is not supported by pyflannel yet: use iptables mode")
    if cfg.get("enableipv4", True) is False:
        raise ConfigError("none defined stack: EnableIPv4 and EnableIPv6 are both false")
    network = _network(cfg.get("network"))
    subnet_len = _subnet_len(cfg.get("subnetlen", 0), network)
    size = 1 << (32 - subnet_len)
    subnet_min = _bound(cfg, "SubnetMin", network, subnet_len, network.network_address + size)
    subnet_max = _bound(cfg, "SubnetMax", network, subnet_len, network.broadcast_address + 1 - size)
    backend, backend_type = _backend(cfg.get("backend"))
    return NetworkConfig(network=network, subnet_len=subnet_len, subnet_min=subnet_min, subnet_max=subnet_max,
                         backend_type=backend_type, backend=backend)


def _network(value: Any) -> ipaddress.IPv4Network:
    if not value:
        raise ConfigError("please define a correct Network parameter in the flannel config")
    try:
        return ipaddress.IPv4Network(str(value), strict=False)  # Go's ParseCIDR masks host bits
    except ValueError:
        raise ConfigError(f"invalid IPv4 CIDR format: {value!r}") from None


def _subnet_len(value: Any, network: ipaddress.IPv4Network) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"SubnetLen must be a non-negative integer, not {value!r}")
    if value > 0:
        if value > 30:
            raise ConfigError("SubnetLen must be less than /31")
        if value < network.prefixlen + 2:
            raise ConfigError("network must be able to accommodate at least four subnets")
        return value
    if network.prefixlen > 28:
        raise ConfigError("network is too small. Minimum useful network prefix is /28")
    return 24 if network.prefixlen <= 22 else network.prefixlen + 2


def _bound(cfg: dict[str, Any], name: str, network: ipaddress.IPv4Network, subnet_len: int,
           default: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
    value = cfg.get(name.lower())
    if value in (None, ""):
        return default
    try:
        addr = ipaddress.IPv4Address(str(value))
    except ValueError:
        raise ConfigError(f"{name} {value!r} is not an IPv4 address") from None
    if addr not in network:
        raise ConfigError(f"{name} is not in the range of the Network")
    if int(addr) % (1 << (32 - subnet_len)):
        raise ConfigError(f"{name} is not on a SubnetLen boundary: {addr}")
    return addr


def _backend(value: Any) -> tuple[dict[str, Any], str]:
    if value in (None, {}):
        return {}, "udp"
    if not isinstance(value, dict):
        raise ConfigError("Backend must be a JSON object")
    backend = _folded(value)
    backend_type = str(backend.get("type", "")).lower()
    if backend_type not in BACKENDS:
        known = ", ".join(BACKENDS)
        raise ConfigError(f"unknown backend type: {backend_type!r} (pyflannel supports {known})")
    return backend, backend_type
