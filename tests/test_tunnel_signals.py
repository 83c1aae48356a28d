"""flannel-tunnel and signals: none kills it, SIGHUP re-reads --peers-file without a gap, stats are written safely."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
from conftest import Tunnel, start_tunnel

from pyflannel.bench.rig import Host, Rig
from pyflannel.dataplane import offload
from pyflannel.dataplane import tunnel as tunnel_cli
from pyflannel.dataplane.keeper import Keeper, PumpSpec

SETUP_SIGNALS = [signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR2, signal.SIGALRM, signal.SIGRTMIN + 3]



def _wait_until(done: Callable[[], bool], seconds: float = 10, interval: float = 0.02) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)


def _blocked(pid: int) -> int:
    """The signal mask of pid's main thread (0 while it is not running yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    return next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigBlk:"))


def test_signals_during_setup_wait_and_none_kills_it(rig: Rig, tmp_path: Path) -> None:
    a, b = rig.hosts
    wanted = sum(1 << (sig - 1) for sig in SETUP_SIGNALS)
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(start_tunnel, a, [b], tmp_path)
        _wait_until(lambda: bool(a.procs), interval=0.001)
        pid = a.procs[-1].pid
        _wait_until(lambda: _blocked(pid) & wanted == wanted, interval=0.001)
        for sig in SETUP_SIGNALS:
            a.procs[-1].send_signal(sig)
        during_setup = "10.244.0.0/16" not in a.run("ip", "route").stdout
        tunnel = starting.result()
    assert during_setup, "the signals went in before flannel0 was configured"
    start_tunnel(b, [a], tmp_path)
    assert a.run("ping", "-c", "1", "-W", "2", "-I", str(a.overlay_ip), str(b.overlay_ip), check=False).returncode == 0
    _wait_until(tunnel.stats_file.exists)  # the SIGUSR1 from setup, served once it is done
    log = tunnel.stop_and_log()
    assert "SIGHUP: no --peers-file to re-read" in log
    for name in ("SIGUSR2", "SIGALRM", "SIGRTMIN+3"):
        assert f"ignored {name} from pid {os.getpid()}" in log, log
    assert log[-1] == "stopped on SIGTERM"


def test_stats_never_follow_a_planted_symlink(rig: Rig, tmp_path: Path) -> None:
    a, b = rig.hosts
    victim = tmp_path / "victim"
    victim.write_text("precious")
    tunnel = start_tunnel(a, [b], tmp_path)
    tunnel.stats_file.symlink_to(victim)
    tunnel.proc.send_signal(signal.SIGUSR1)
    _wait_until(lambda: not tunnel.stats_file.is_symlink())
    assert victim.read_text() == "precious" and "drops" in json.loads(tunnel.stats_file.read_text())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary file left"
    assert tunnel.stop() == 0


def test_the_temporary_stats_file_is_new_never_a_planted_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """Whoever knows the temporary name the stats writer will try first (fixed here through tempfile's name
    generator) and plants a symlink there: the writer must take another name (O_EXCL), not write through it."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    names = iter(["planted", "fresh"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    (tmp_path / ".stats.json.planted").symlink_to(victim)
    keeper = Keeper(PumpSpec(iface_ip=None, port=8285, tun_name="flannel0", subnet=None, network=None, mtu=1400,
                             wanted=offload.NONE))
    tunnel_cli._write_stats(str(tmp_path / "stats.json"), keeper)
    assert victim.read_text() == "precious" and (tmp_path / ".stats.json.planted").is_symlink()
    assert json.loads((tmp_path / "stats.json").read_text()) is None, "no engine yet: null"
    assert not (tmp_path / "stats.json").is_symlink() and not (tmp_path / ".stats.json.fresh").exists()


def test_stats_file_errors_are_logged_and_survived(rig: Rig, tmp_path: Path) -> None:
    a, b = rig.hosts
    (tmp_path / "a-dir").mkdir()
    for path, reason in ((tmp_path / "missing" / "stats.json", "No such file or directory"),
                         (tmp_path / "a-dir", "Is a directory")):
        tunnel = start_tunnel(a, [b], tmp_path, "--stats-file", str(path))
        tunnel.proc.send_signal(signal.SIGUSR1)
        log = tunnel.stop_and_log()
        assert log.count(f"cannot write stats to {path}: {reason}") == 2, log  # SIGUSR1, stop
        assert len(log) == 4 and log[-1] == "stopped on SIGTERM"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir"]
    assert list((tmp_path / "a-dir").iterdir()) == []


def _flood(a: Host, b: Host, count: int, out: list[str]) -> threading.Thread:
    def ping() -> None:
        out.append(a.run("ping", "-q", "-c", str(count), "-i", "0.002", "-W", "2", "-I", str(a.overlay_ip),
                         str(b.overlay_ip), check=False).stdout)
    thread = threading.Thread(target=ping)
    thread.start()
    return thread


def _sent_to(tunnel: Tunnel, peer: Host) -> int:
    return int(tunnel.stats()["peers"][str(peer.underlay)]["tx_packets"])


def _flooded(tunnel: Tunnel, peer: Host, packets: int) -> bool:
    return _sent_to(tunnel, peer) >= packets


def test_sighup_applies_the_peers_file_as_a_difference(tmp_path: Path) -> None:
    with Rig(3, tag="pft") as rig:
        for host in rig.hosts:
            host.add_overlay_endpoint()
        a, b, c = rig.hosts
        peers = tmp_path / "peers"
        every = f"# the cluster\n{b.subnet}={b.underlay}\n\n{c.subnet} = {c.underlay}  # c\n"
        peers.write_text(every)
        tunnel = start_tunnel(a, [], tmp_path, "--peers-file", str(peers))
        for host in (b, c):
            start_tunnel(host, [a], tmp_path)

        def reach(host: Host) -> bool:
            return a.run("ping", "-c", "1", "-W", "1", "-I", str(a.overlay_ip), str(host.overlay_ip),
                         check=False).returncode == 0

        assert reach(b) and reach(c)
        flood: list[str] = []
        pinging = _flood(a, b, 1500, flood)
        sent = 0
        for text, routed in ((f"{b.subnet}={b.underlay}\n", 1), (f"{b.subnet}={b.underlay}\ngarbage\n", 1),
                             (every, 2)):
            _wait_until(partial(_flooded, tunnel, b, sent + 200))  # each reload well inside the flood
            sent = _sent_to(tunnel, b)
            peers.write_text(text)
            tunnel.proc.send_signal(signal.SIGHUP)
            assert tunnel.stats()["routes"]["routed"] == routed, "SIGHUP is served before the SIGUSR1 after it"
            assert reach(c) is (routed == 2), "c's route is gone, then back"
        pinging.join()
        assert reach(c)
        assert "1500 packets transmitted, 1500 received, 0% packet loss" in flood[0], flood
        log = tunnel.stop_and_log()
    assert [line for line in log if "SIGHUP" in line] == [
        f"SIGHUP: 1 peers from {peers}: 0 routes added or changed, 1 removed",
        f"SIGHUP: kept the 1 routes in use: {peers}:2: 'garbage' must look like CIDR=IP",
        f"SIGHUP: 2 peers from {peers}: 1 routes added or changed, 0 removed",
    ]
