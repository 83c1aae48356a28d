"""The package as an operator gets it: an sdist that builds, and a wheel that installs into a fresh environment
with each command working and without the benchmark's dependencies."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_sdist_and_wheel_build_and_the_wheel_installs_alone(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], check=True,
                   capture_output=True, timeout=600)  # the wheel is built from the sdist: both must be complete
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert any(n.endswith("src_ext/engine.pyx") for n in names) and any(n.endswith(".pxi") for n in names)
    with zipfile.ZipFile(wheel) as archive:
        tops = {n.split("/")[0] for n in archive.namelist()}
    assert tops == {"pyflannel", "pyflannel-0.1.0.dist-info"}, "one import namespace: nothing else is claimed"
    venv.create(tmp_path / "env", with_pip=True)
    bin_dir = tmp_path / "env" / "bin"
    subprocess.run([bin_dir / "pip", "install", "-q", str(wheel)], check=True, capture_output=True, timeout=600)
    for command in ("flanneld", "flannel-tunnel", "flannel-bench", "flannel-install-cni", "mk-docker-opts"):
        r = subprocess.run([bin_dir / command, "--help"], capture_output=True, text=True, timeout=60)
        if command == "mk-docker-opts":  # flannel's script prints its usage and exits 1 for any -h or bad option
            assert r.returncode == 1 and r.stderr.startswith("mk-docker-opts [-f FLANNEL-ENV-FILE]"), r.stderr
            continue
        assert r.returncode == 0 and "usage:" in r.stdout + r.stderr, (command, r.stderr)
    r = subprocess.run([bin_dir / "flannel"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "CNI_COMMAND": "VERSION"})
    assert r.returncode == 0 and '"supportedVersions"' in r.stdout, r.stdout
    r = subprocess.run([bin_dir / "python", "-c", "import matplotlib"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, "the benchmark's dependencies stay in the [bench] extra"
