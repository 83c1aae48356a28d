"""flannel's nftables mode (net-conf `EnableNFTables`; pkg/trafficmngr/nftables): the masquerade and forward policy
of daemon.iptables, kept in flannel's own tables `ip flannel-ipv4` and `ip6 flannel-ipv6` instead of the shared
iptables chains.

Each family's table holds two base chains, both `policy accept` so that they never drop what other tables let
through:
    forward  (filter hook forward, priority filter): accept from N, accept to N
    postrtg  (nat hook postrouting, priority srcnat): return for the kube-proxy mark 0x4000, P->N, N->P and !N->P;
             masquerade (fully-random when nft accepts it) N->!multicast and !N->N
A table is declared, its chains added and flushed, and their rules written in one `nft -f -` transaction, so a
reader never sees a half-filled chain. flannel sets the tables up once; here ensure() also re-applies a family's
table when its rule count differs from ours (a flushed chain, a deleted table), as the iptables resync does.

One correction to flannel: its fourth postrtg rule is `saddr != P daddr N return`. That returns for every source
outside this node's subnet, so the last rule can never match and host traffic to remote pods leaves
unmasqueraded; flannel's iptables mode has `! -s N -d P`, and so does this one (`saddr != N daddr P return`).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from dataclasses import dataclass

from pyflannel.daemon.errors import FlannelError
from pyflannel.daemon.iptables import TIMEOUT, IptablesError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
TABLES = (("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6"))
KUBE_PROXY_MARK = "0x4000"
Chain = tuple[str, str, str, tuple[str, ...]]  # name, comment, base-chain spec, rules


@dataclass(frozen=True)
class Table:
    """One family's flannel table and the rules it should hold, rendered for `nft -f`."""

    family: str  # "ip" or "ip6"
    name: str
    chains: tuple[Chain, ...]

    def script(self) -> str:
        t = f"{self.family} {self.name}"
        lines = [f'add table {t} {{ comment "rules for {self.name}" ; }}']
        for chain, comment, spec, rules in self.chains:
            lines += [f'add chain {t} {chain} {{ comment "{comment}" ; {spec} ; }}', f"flush chain {t} {chain}"]
            lines += [f"add rule {t} {chain} {rule}" for rule in rules]
        return "\n".join(lines) + "\n"

    def rule_count(self) -> int:
        return sum(len(rules) for *_, rules in self.chains)


def table(network: Network, subnet: Network | None, *, masq: bool, forward: bool, fully_random: bool) -> Table:
    """The family's table for network N and this node's subnet P (masquerade needs P)."""
    family, name = TABLES[network.version == 6]
    chains: list[Chain] = []
    if forward:
        chains.append(("forward", "chain to accept flannel traffic",
                       "type filter hook forward priority filter ; policy accept",
                       (f"{family} saddr {network} accept", f"{family} daddr {network} accept")))
    if masq and subnet is not None:
        chains.append(("postrtg", "chain to manage traffic masquerading by flannel",
                       "type nat hook postrouting priority srcnat ; policy accept",
                       _masq_rules(family, network, subnet, fully_random)))
    return Table(family, name, tuple(chains))


def _masq_rules(family: str, n: Network, p: Network, fully_random: bool) -> tuple[str, ...]:
    multicast = "224.0.0.0/4" if family == "ip" else "ff00::/8"
    masquerade = "masquerade fully-random" if fully_random else "masquerade"
    return (
        f"meta mark {KUBE_PROXY_MARK} return",
        f"{family} saddr {p} {family} daddr {n} return",
        f"{family} saddr {n} {family} daddr {p} return",
        f"{family} saddr != {n} {family} daddr {p} return",
        f"{family} saddr {n} {family} daddr != {multicast} {masquerade}",
        f"{family} saddr != {n} {family} daddr {n} {masquerade}",
    )


def supports_fully_random() -> bool:
    """Whether this nft and kernel take `masquerade fully-random`: a throwaway table is checked, never committed
    (flannel probes the same way)."""
    probe = Table("ip", "flannel-probe", (("masqueradeTest", "probe",
                                          "type nat hook postrouting priority srcnat ; policy accept",
                                          ("masquerade fully-random",)),))
    return _nft(["--check", "-f", "-"], probe.script()).returncode == 0


def apply(t: Table) -> None:
    _must(["-f", "-"], t.script(), f"install table {t.family} {t.name}")


def ensure(t: Table) -> bool:
    """Re-apply the table if its rules are not all there; True if it had to."""
    if _rule_count(t) == t.rule_count():
        return False
    apply(t)
    return True


def _rule_count(t: Table) -> int:
    """The rules the table holds now, or -1 when it does not exist."""
    r = _nft(["--json", "list", "table", t.family, t.name])
    if r.returncode != 0:
        return -1
    return sum("rule" in item for item in json.loads(r.stdout)["nftables"])


def remove_all() -> None:
    """Delete both flannel tables if they exist: what iptables mode does at start (flannel's CleanUp). Without
    nft installed there can be none."""
    if not shutil.which("nft"):
        return
    for family, name in TABLES:
        if _nft(["list", "table", family, name]).returncode == 0:
            _must(["delete", "table", family, name], None, f"delete table {family} {name}")


def _nft(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
    except FileNotFoundError:
        raise FlannelError("nft not found: install nftables (EnableNFTables needs it)") from None
    except subprocess.TimeoutExpired:
        raise IptablesError(f"nft did not finish within {TIMEOUT} s") from None


def _must(args: list[str], stdin: str | None, what: str) -> None:
    r = _nft(args, stdin)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        raise IptablesError(f"nft could not {what}: {lines[-1] if lines else 'no message'}")
