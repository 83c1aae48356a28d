"""Which kernel offloads to use: asked for by --offload and PYFLANNEL_DISABLE_OFFLOADS, then probed.

    tso       the TUN hands over TCP super-packets (IFF_VNET_HDR + TUNSETOFFLOAD TUN_F_CSUM|TUN_F_TSO4)
    tso6      ... and IPv6 TCP super-packets (TUN_F_TSO6)
    uso       ... and UDP super-packets of both families (TUN_F_USO4|TUN_F_USO6, Linux >= 6.2)
    gso       UDP_SEGMENT sends on the underlay sockets, IPv4 and IPv6 (Linux >= 4.18)
    gro       UDP_GRO receives on the underlay sockets (Linux >= 5.12 for a reliable getsockopt probe)
    coalesce  TCP segments (with uso, UDP datagrams too) of one flow, either family, merged into one GSO write to
              the TUN (needs the virtio header)

`--offload off` turns all of them off; `--offload auto` (the default) enables each one the kernel accepts.
PYFLANNEL_DISABLE_OFFLOADS=gso,coalesce (any of the names above, comma-separated) turns single ones off, for
kernels with a broken offload (several have shipped: see ../shared/reference/userspace-dataplane.md section 5).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

from pyflannel.dataplane.errors import DataplaneError

ENV_DISABLE = "PYFLANNEL_DISABLE_OFFLOADS"


@dataclass(frozen=True)
class Offloads:
    tso: bool = False
    tso6: bool = False
    uso: bool = False
    gso: bool = False
    gro: bool = False
    coalesce: bool = False

    @property
    def vnet_hdr(self) -> bool:
        """Whether the TUN must carry virtio headers."""
        return self.tso or self.tso6 or self.uso or self.coalesce

    def describe(self) -> str:
        on = [f.name for f in fields(self) if getattr(self, f.name)]
        return ", ".join(on) if on else "none"


NONE = Offloads()
ALL = Offloads(tso=True, tso6=True, uso=True, gso=True, gro=True, coalesce=True)


def wanted(mode: str, disable: str | None = None) -> Offloads:
    """The offloads to try for --offload MODE, less those named in PYFLANNEL_DISABLE_OFFLOADS."""
    if mode == "off":
        return NONE
    if mode != "auto":
        raise DataplaneError(f"--offload {mode!r} must be auto or off")
    names = {f.name for f in fields(Offloads)}
    text = os.environ.get(ENV_DISABLE, "") if disable is None else disable
    off = {name.strip() for name in text.split(",") if name.strip()}
    unknown = off - names
    if unknown:
        known = ", ".join(sorted(names))
        raise DataplaneError(f"{ENV_DISABLE}: unknown offload {sorted(unknown)[0]!r} (known: {known})")
    return replace(ALL, **{name: False for name in off})
