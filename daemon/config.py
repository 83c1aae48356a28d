"""The network config (etcd `<prefix>/config`, or a net-conf.json file), parsed and checked as flannel does.

flannel decodes it with Go's encoding/json, so keys match case-insensitively and unknown keys are ignored;
EnableIPv4 defaults to true and EnableIPv6 to false; a missing Backend means udp (the documentation says vxlan;
the code says udp). Each enabled family gets a Pool, checked by flannel's CheckNetworkConfig rules, which are the
same for both families with IPv6's numbers (SubnetLen at most /126, a /64 by default, a network no smaller than
/124); IPv6SubnetMin and IPv6SubnetMax are addresses, as SubnetMin and SubnetMax are.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pyflannel.daemon import safejson
from pyflannel.daemon.errors import ConfigError

BACKENDS = ("udp", "vxlan", "host-gw")
MAX_BYTES, MAX_DEPTH = 1 << 20, 32
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def address(version: int, value: int | str) -> Address:
    """The address of that family (ipaddress.ip_address would make a small integer an IPv4 address)."""
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


@dataclass(frozen=True)
class Pool:
    """One family's network and the subnets handed out from it."""

    network: Network
    subnet_len: int
    subnet_min: Address
    subnet_max: Address

    def subnets(self) -> Iterator[Network]:
        """Every allocatable subnet from SubnetMin to SubnetMax, in order, made as they are asked for (an IPv6
        network can hold more /64s than any list could)."""
        step = 1 << (self.network.max_prefixlen - self.subnet_len)
        for a in range(int(self.subnet_min), int(self.subnet_max) + 1, step):
            yield ipaddress.ip_network((address(self.network.version, a), self.subnet_len))

    def fits(self, subnet: Network | None) -> bool:
        """flannel's isSubnetConfigCompat: the configured length, between SubnetMin and SubnetMax."""
        return (subnet is not None and subnet.version == self.network.version
                and subnet.prefixlen == self.subnet_len
                and int(self.subnet_min) <= int(subnet.network_address) <= int(self.subnet_max))


@dataclass(frozen=True)
class NetworkConfig:
    ipv4: Pool | None  # None when EnableIPv4 is false
    ipv6: Pool | None  # None unless EnableIPv6
    backend_type: str
    backend: dict[str, Any] = field(default_factory=dict)  # the Backend object, keys lower-cased
    enable_nftables: bool = False  # masquerade and forward rules in nftables tables instead of iptables chains

    def pools(self) -> list[Pool]:
        return [p for p in (self.ipv4, self.ipv6) if p is not None]

    def backend_option(self, name: str, default: Any) -> Any:
        return self.backend.get(name.lower(), default)

    def backend_bool(self, name: str, default: bool) -> bool:
        """A true/false Backend option (Go decodes these into bools: no strings or numbers)."""
        value = self.backend_option(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"Backend.{name} must be true or false, not {value!r}")
        return value

    def backend_int(self, name: str, default: int, low: int, high: int) -> int:
        """A whole-number Backend option in [low, high] (Go decodes these into ints: no strings, fractions or
        booleans)."""
        value = self.backend_option(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"Backend.{name} must be a whole number from {low} to {high}, not {value!r}")
        return value


@dataclass(frozen=True)
class _Family:
    """What differs between the families' settings: key names, sizes, and flannel's wording."""

    prefix: str  # of the SubnetLen/SubnetMin/SubnetMax keys
    network_key: str
    version: int
    default_len: int  # each host's subnet when SubnetLen is not given and the network is large enough
    too_small: str  # the name flannel's "too small" message starts with

    @property
    def bits(self) -> int:
        return 32 if self.version == 4 else 128


_IPV4 = _Family("", "Network", 4, 24, "network")
_IPV6 = _Family("IPv6", "IPv6Network", 6, 64, "IPv6Network")


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
    enable4, enable6 = _flag(cfg, "EnableIPv4", True), _flag(cfg, "EnableIPv6", False)
    if not (enable4 or enable6):
        raise ConfigError("none defined stack: EnableIPv4 and EnableIPv6 are both false")
    backend, backend_type = _backend(cfg.get("backend"))
    return NetworkConfig(ipv4=_pool(cfg, _IPV4) if enable4 else None, ipv6=_pool(cfg, _IPV6) if enable6 else None,
                         backend_type=backend_type, backend=backend,
                         enable_nftables=_flag(cfg, "EnableNFTables", False))


def _flag(cfg: dict[str, Any], name: str, default: bool) -> bool:
    value = cfg.get(name.lower(), default)
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, not {value!r}")
    return value


def _pool(cfg: dict[str, Any], fam: _Family) -> Pool:
    network = _network(cfg.get(fam.network_key.lower()), fam)
    subnet_len = _subnet_len(cfg.get(f"{fam.prefix}subnetlen".lower(), 0), network, fam)
    size = 1 << (fam.bits - subnet_len)
    first, last = int(network.network_address) + size, int(network.broadcast_address) + 1 - size
    return Pool(network=network, subnet_len=subnet_len,
                subnet_min=_bound(cfg, "SubnetMin", fam, network, subnet_len, first),
                subnet_max=_bound(cfg, "SubnetMax", fam, network, subnet_len, last))


def _network(value: Any, fam: _Family) -> Network:
    if not value:
        raise ConfigError(f"please define a correct {fam.network_key} parameter in the flannel config")
    try:
        network = ipaddress.ip_network(str(value), strict=False)  # Go's ParseCIDR masks host bits
    except ValueError:
        network = None
    if network is None or network.version != fam.version:
        raise ConfigError(f"invalid IPv{fam.version} CIDR format: {value!r}")
    return network


def _subnet_len(value: Any, network: Network, fam: _Family) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{fam.prefix}SubnetLen must be a non-negative integer, not {value!r}")
    if value > 0:
        if value > fam.bits - 2:
            raise ConfigError(f"SubnetLen must be less than /{fam.bits - 1}")
        if value < network.prefixlen + 2:
            raise ConfigError("network must be able to accommodate at least four subnets")
        return value
    if network.prefixlen > fam.bits - 4:
        raise ConfigError(f"{fam.too_small} is too small. Minimum useful network prefix is /{fam.bits - 4}")
    return fam.default_len if network.prefixlen <= fam.default_len - 2 else network.prefixlen + 2


def _bound(cfg: dict[str, Any], which: str, fam: _Family, network: Network, subnet_len: int,
           default: int) -> Address:
    name = fam.prefix + which
    value = cfg.get(name.lower())
    try:
        addr = address(fam.version, str(value)) if value not in (None, "") else None
    except ValueError:
        raise ConfigError(f"{name} {value!r} is not an IPv{fam.version} address") from None
    if addr is None or int(addr) == 0:  # flannel: unset (or the zero address) means the default
        return address(fam.version, default)
    if addr not in network:
        raise ConfigError(f"{name} is not in the range of the {fam.network_key}")
    if int(addr) % (1 << (fam.bits - subnet_len)):
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
