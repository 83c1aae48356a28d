"""flanneld's masquerade and forward rules in either of flannel's modes (its trafficmngr): iptables chains
(daemon.iptables, the default) or, with net-conf `EnableNFTables`, flannel's own nftables tables
(daemon.nftables). flanneld holds a list of Rules and treats both modes alike: apply them once, then ensure()
them every --iptables-resync seconds.

At start the other mode's leftovers are removed, as flannel does when a node switches modes; unlike flannel,
which looks for FLANNEL-FWD in the nat table, the forward chain is removed from filter, where it lives.
Every function here blocks (iptables and nft are programs): flanneld calls them in worker threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from pyflannel.daemon import iptables, nftables
from pyflannel.daemon.config import NetworkConfig
from pyflannel.daemon.lease import Lease

log = logging.getLogger("flanneld")


class Rules(Protocol):
    @property
    def name(self) -> str: ...

    def apply(self) -> None: ...

    def ensure(self) -> bool:
        """Re-apply what is missing; True if anything was."""
        ...


@dataclass(frozen=True)
class Chain:
    """One of flannel's iptables chains, in the backend the host uses."""

    backend: iptables.Backend
    rules: iptables.RuleSet

    @property
    def name(self) -> str:
        return f"iptables chain {self.rules.chain} (IPv{self.rules.version})"

    def apply(self) -> None:
        iptables.apply(self.backend, self.rules)

    def ensure(self) -> bool:
        return iptables.ensure(self.backend, self.rules)


@dataclass(frozen=True)
class Table:
    """One of flannel's nftables tables."""

    table: nftables.Table

    @property
    def name(self) -> str:
        return f"nftables table {self.table.family} {self.table.name}"

    def apply(self) -> None:
        nftables.apply(self.table)

    def ensure(self) -> bool:
        return nftables.ensure(self.table)


def plan(cfg: NetworkConfig, lease: Lease, *, masq: bool, forward: bool, fully_random: bool) -> list[Rules]:
    """The rules this node keeps for each of its families, after removing the other mode's. `fully_random` is
    the operator's wish; it is dropped where the tool or kernel cannot do it."""
    families = [(pool.network, subnet) for pool, subnet in ((cfg.ipv4, lease.subnet), (cfg.ipv6, lease.ipv6_subnet))
                if pool is not None and subnet is not None]
    if not (masq or forward) or not families:
        return []
    if cfg.enable_nftables:
        iptables.remove_all(iptables.detect())
        random = fully_random and nftables.supports_fully_random()
        log.info("nftables: tables %s", ", ".join(f"{f} {t}" for f, t in nftables.TABLES))
        return [Table(nftables.table(n, p, masq=masq, forward=forward, fully_random=random)) for n, p in families]
    nftables.remove_all()
    backend = iptables.detect()
    log.info("iptables: %s", backend.tool())
    out: list[Rules] = []
    for n, p in families:
        if masq:
            random = fully_random and iptables.supports_random_fully(backend, p.version)
            out.append(Chain(backend, iptables.masq_rules(n, p, random)))
        if forward:
            out.append(Chain(backend, iptables.forward_rules(n)))
    return out
