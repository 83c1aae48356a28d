"""flanneld's command line: flannel's flag names and defaults, Go flag syntax, and FLANNELD_* variables.

Go's flag package takes `-name` and `--name`, `-name value` and `-name=value`, and boolean flags only as `-name`
or `-name=false`. Variables FLANNELD_<NAME> (upper case, `-` and `.` as `_`) fill in flags not given on the
command line, when non-empty (coreos flagutil). Unlike flannel, whose usage function exits 0 even for an unknown
flag, a bad flag or value exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NoReturn

from pyflannel.daemon.errors import FlannelError

PROG = "flanneld"


@dataclass(frozen=True)
class Flag:
    name: str
    default: object
    help: str
    repeat: bool = False
    bounds: tuple[int, int] | None = None   # an int flag's accepted range, inclusive
    unit: str = ""

    @property
    def kind(self) -> type:
        return type(self.default) if not self.repeat else list

    @property
    def env(self) -> str:
        return "FLANNELD_" + self.name.upper().replace("-", "_").replace(".", "_")


FLAGS = (
    Flag("etcd-endpoints", "http://127.0.0.1:4001,http://127.0.0.1:2379", "a comma-delimited list of etcd endpoints"),
    Flag("etcd-prefix", "/coreos.com/network", "etcd prefix"),
    Flag("etcd-keyfile", "", "SSL key file used to secure etcd communication"),
    Flag("etcd-certfile", "", "SSL certification file used to secure etcd communication"),
    Flag("etcd-cafile", "", "SSL Certificate Authority file used to secure etcd communication"),
    Flag("etcd-username", "", "username for BasicAuth to etcd"),
    Flag("etcd-password", "", "password for BasicAuth to etcd"),
    Flag("local-registry", "", "pyflannel: use the SQLite registry at this path instead of etcd"),
    Flag("kube-subnet-mgr", False, "contact the Kubernetes API for subnet assignment instead of etcd"),
    Flag("kube-api-url", "", "Kubernetes API server URL"),
    Flag("kubeconfig-file", "", "kubeconfig file location"),
    Flag("kube-annotation-prefix", "flannel.alpha.coreos.com", "Kubernetes annotation prefix"),
    Flag("net-config-path", "/etc/kube-flannel/net-conf.json", "path to the network configuration file"),
    Flag("iface", [], "interface to use (IP or name) for inter-host communication", repeat=True),
    Flag("iface-regex", [], "regex expression to match the first interface to use", repeat=True),
    Flag("iface-can-reach", "", "detect the interface by the route to this IP"),
    Flag("public-ip", "", "IP accessible by other nodes for inter-host communication"),
    Flag("public-ipv6", "", "IPv6 accessible by other nodes for inter-host communication"),
    Flag("subnet-file", "/run/flannel/subnet.env", "filename where env variables (subnet, MTU, ...) are written"),
    Flag("subnet-lease-renew-margin", 60, "subnet lease renewal margin, in minutes (1-1439)", bounds=(1, 1439),
         unit="minutes"),
    Flag("exit-on-lease-loss", False, "pyflannel: exit 0 when this node's lease is deleted, as flannel does, "
         "instead of creating it again while the subnet is free"),
    Flag("ip-masq", False, "setup IP masquerade rule for traffic destined outside of overlay network"),
    Flag("ip-masq-fully-random-disable", False, "disable --random-fully on the MASQUERADE rules"),
    Flag("iptables-resync", 5, "resync period for iptables rules, in seconds", bounds=(1, 86400), unit="seconds"),
    Flag("iptables-forward-rules", True, "add default accept rules to the FORWARD chain"),
    Flag("ip-blackhole-route", False, "add a blackhole route for the node's own subnet"),
    Flag("healthz-ip", "0.0.0.0", "the IP address for the healthz server to listen on"),
    Flag("healthz-port", 0, "the port for the healthz server to listen on (0 to disable)", bounds=(0, 65535)),
    Flag("set-node-network-unavailable", True, "set NetworkUnavailable=False on the Node (kube mode)"),
    Flag("version", False, "print version and exit"),
    Flag("v", 0, "log verbosity"),
    Flag("vmodule", "", "accepted for compatibility with flannel's klog flags; ignored"),
    Flag("log_backtrace_at", "", "accepted for compatibility with flannel's klog flags; ignored"),
)


@dataclass(frozen=True)
class Options:
    etcd_endpoints: str
    etcd_prefix: str
    etcd_keyfile: str
    etcd_certfile: str
    etcd_cafile: str
    etcd_username: str
    etcd_password: str
    local_registry: str
    kube_subnet_mgr: bool
    kube_api_url: str
    kubeconfig_file: str
    kube_annotation_prefix: str
    net_config_path: str
    iface: list[str]
    iface_regex: list[str]
    iface_can_reach: str
    public_ip: str
    public_ipv6: str
    subnet_file: str
    subnet_lease_renew_margin: int
    exit_on_lease_loss: bool
    ip_masq: bool
    ip_masq_fully_random_disable: bool
    iptables_resync: int
    iptables_forward_rules: bool
    ip_blackhole_route: bool
    healthz_ip: str
    healthz_port: int
    set_node_network_unavailable: bool
    version: bool
    v: int
    vmodule: str
    log_backtrace_at: str


assert [f.name.replace("-", "_") for f in FLAGS] == [f.name for f in fields(Options)]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise FlannelError(message, status=2)


def _bool(text: str) -> bool:
    """Go's strconv.ParseBool."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {text!r}")


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer value {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, add_help=False, allow_abbrev=False)
    p.add_argument("-h", "--help", action="help")
    for flag in FLAGS:
        kinds: dict[type, Callable[[str], object]] = {bool: _bool, int: _int, str: str, list: str}
        kind = kinds[flag.kind]
        action = "append" if flag.repeat else "store"
        default = ",".join(flag.default) if isinstance(flag.default, list) else flag.default
        p.add_argument(f"--{flag.name}", type=kind, action=action, default=None,
                       help=f"{flag.help} (default {default!r}; or ${flag.env})",
                       metavar=None if flag.kind is not bool else "BOOL")
    return p


def _normalize(argv: list[str]) -> list[str]:
    """Go flag syntax to argparse's: `-name` becomes `--name` (one-letter names too: `-v 2`), a bare boolean flag
    becomes `--name=true`. A negative number stays a value."""
    bools = {f.name for f in FLAGS if f.kind is bool}
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and arg != "-h" and len(arg) >= 2 and \
                not arg[1].isdigit():
            arg = "-" + arg
        if arg.startswith("--") and arg[2:] in bools:
            arg += "=true"
        out.append(arg)
    return out


def parse(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Options:
    """Flags from argv, then FLANNELD_* for the rest; FlannelError(status=2) for anything invalid."""
    argv = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ) if environ is None else environ
    parser = _parser()
    ns = parser.parse_args(_normalize(argv))
    values = {}
    for flag in FLAGS:
        attr = flag.name.replace("-", "_")
        value = getattr(ns, attr)
        if value is None and environ.get(flag.env):
            text = environ[flag.env]
            value = [text] if flag.repeat else _from_env(parser, flag, text)
        values[attr] = flag.default if value is None else value
    opts = Options(**values)  # type: ignore[arg-type]
    if not opts.version:
        _check_bounds(opts)
    return opts


def _check_bounds(opts: Options) -> None:
    """Numbers out of range would fail later, deep inside (a bind, a timer), instead of as a flag error."""
    for flag in FLAGS:
        value = getattr(opts, flag.name.replace("-", "_"))
        if flag.bounds and not flag.bounds[0] <= value <= flag.bounds[1]:
            unit = f" {flag.unit}" if flag.unit else ""
            raise FlannelError(f"invalid {flag.name} {value}: must be between {flag.bounds[0]} and "
                               f"{flag.bounds[1]}{unit}", status=2)


def _from_env(parser: argparse.ArgumentParser, flag: Flag, text: str) -> object:
    ns = parser.parse_args([f"--{flag.name}={text}"])
    return getattr(ns, flag.name.replace("-", "_"))
