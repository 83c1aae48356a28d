"""flannel-install-cni: what the DaemonSet's install-cni step does.

The plugin it installs is daemon/cni.py itself, copied byte for byte as a plain executable file: that module is
written to run with only the host's python3 standard library, so kubelet's host needs neither this package nor
its virtual environment (a launcher into the venv, as before, failed every pod ADD with ModuleNotFoundError on a
host without it). The copy goes through a temporary name in the same directory and a rename, so kubelet never
runs a half-written plugin.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from pyflannel.daemon import cni


def main(argv: list[str] | None = None) -> int:
    """Copies the `flannel` plugin into the CNI bin directory and writes the network config (CNI_NETWORK_CONFIG,
    or --conf FILE) as 10-flannel.conflist."""
    p = argparse.ArgumentParser(prog="flannel-install-cni", description=main.__doc__)
    p.add_argument("--cni-bin-dir", default="/opt/cni/bin")
    p.add_argument("--cni-conf-dir", default="/etc/cni/net.d")
    p.add_argument("--conf", help="network config file (default: the CNI_NETWORK_CONFIG variable)")
    args = p.parse_args(argv)
    text = Path(args.conf).read_text() if args.conf else os.environ.get("CNI_NETWORK_CONFIG", "")
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        print(f"flannel-install-cni: error: the network config is not JSON: {exc}", file=sys.stderr)
        return 1
    for directory in (args.cni_bin_dir, args.cni_conf_dir):
        Path(directory).mkdir(parents=True, exist_ok=True)
    install_plugin(Path(args.cni_bin_dir) / "flannel")
    (Path(args.cni_conf_dir) / "10-flannel.conflist").write_text(text)
    print(f"installed {args.cni_bin_dir}/flannel and {args.cni_conf_dir}/10-flannel.conflist", file=sys.stderr)
    return 0


def install_plugin(target: Path) -> None:
    """The plugin's source as an executable file at target (mode 0755), replacing what was there at once."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(cni.__file__, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, target)
