"""mk-docker-opts: Docker daemon options from subnet.env, with the options, files and output of flannel's
dist/mk-docker-opts.sh. The env file is read as KEY=value lines (quotes and `export` understood) rather than
sourced by a shell."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

USAGE = """{prog} [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

Generate Docker daemon options based on flannel env file
OPTIONS:
\t-f\tPath to flannel env file. Defaults to /run/flannel/subnet.env
\t-d\tPath to Docker env file to write to. Defaults to /run/docker_opts.env
\t-i\tOutput each Docker option as individual var. e.g. DOCKER_OPT_MTU=1500
\t-c\tOutput combined Docker options into DOCKER_OPTS var
\t-k\tSet the combined options key to this value (default DOCKER_OPTS=)
\t-m\tDo not output --ip-masq (useful for older Docker version)
"""


def _read_env(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if not os.path.isfile(path):
        return out
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and key and not key.startswith("#"):
            out[key.strip()] = value.strip().strip("\"'")
    return out


def _getopt(argv: list[str]) -> dict[str, str | bool] | None:
    """getopts "f:d:icmk:?h"; None for -h, -? or an unknown option."""
    opts: dict[str, str | bool] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        letters = argv[i][1:]
        i += 1
        for j, letter in enumerate(letters):
            if letter in "fdk":
                value = letters[j + 1:] or (argv[i] if i < len(argv) else None)
                if value is None:
                    return None
                if not letters[j + 1:]:
                    i += 1
                opts[letter] = value
                break
            if letter not in "icm":
                return None
            opts[letter] = True
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = _getopt(argv)
    if opts is None:
        print(USAGE.format(prog="mk-docker-opts"), file=sys.stderr)
        return 1
    indiv, combined = bool(opts.get("i")), bool(opts.get("c"))
    if not indiv and not combined:
        indiv = combined = True
    env = _read_env(str(opts.get("f", "/run/flannel/subnet.env")))
    key = str(opts.get("k", "DOCKER_OPTS"))
    values: dict[str, str] = {}
    if env.get("FLANNEL_SUBNET"):
        values["DOCKER_OPT_BIP"] = f"--bip={env['FLANNEL_SUBNET']}"
    if env.get("FLANNEL_MTU"):
        values["DOCKER_OPT_MTU"] = f"--mtu={env['FLANNEL_MTU']}"
    if env.get("FLANNEL_IPMASQ") and not opts.get("m"):
        if env["FLANNEL_IPMASQ"] not in ("true", "false"):
            print(f"Invalid value of FLANNEL_IPMASQ: {env['FLANNEL_IPMASQ']}", file=sys.stderr)
            return 1
        values["DOCKER_OPT_IPMASQ"] = f"--ip-masq={'false' if env['FLANNEL_IPMASQ'] == 'true' else 'true'}"
    current = env.get(key, os.environ.get(key, ""))
    docker_opts = f"{current} " if current else ""
    lines = []
    for name in sorted(values):  # the shell's `set` lists variables alphabetically
        if indiv:
            lines.append(f'{name}="{values[name]}"')
        docker_opts += f" {values[name]}"
    if combined:
        lines.append(f'{key}="{docker_opts}"')
    Path(str(opts.get("d", "/run/docker_opts.env"))).write_text("".join(f"{line}\n" for line in lines))
    return _check_routes(env.get("FLANNEL_SUBNET", ""))


def _check_routes(subnet: str) -> int:
    """flannel's final check: a route to our subnet via a gateway means some other route already owns it."""
    try:
        net = ipaddress.IPv4Interface(subnet).network
    except ValueError:
        return 0
    routes = subprocess.run(["ip", "route", "show"], capture_output=True, text=True).stdout
    if any(line.startswith(str(net)) and " via " in line for line in routes.splitlines()):
        print(f"Your routing table already contains the subnet {net}, which conflicts with the flannel subnet; "
              "remove it before starting Docker", file=sys.stderr)
        return 1
    return 0
