"""The engine when its TUN device is deleted under it: each thread stops, says why, and burns no CPU."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from conftest import host_socket, inside
from packets import udp4

from bench.rig import NETWORK, Rig
from dataplane import offload
from dataplane.pump import Pump, open_pump


def _wait_for(cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture(params=["auto", "off"])
def pump(rig: Rig, request: pytest.FixtureRequest) -> Iterator[Pump]:
    """A started Pump on the rig's first host (offloads as the parameter says), the second host its peer."""
    a, b = rig.hosts
    with inside(a):
        p = open_pump(iface_ip=a.underlay, port=8285, tun_name="flannel0", subnet=a.subnet, network=NETWORK,
                      mtu=1400, wanted=offload.wanted(request.param))
    p.set_route(str(b.subnet), str(b.underlay))
    p.start()
    try:
        yield p
    finally:
        p.close()


def test_deleted_tun_stops_both_threads_and_says_why(rig: Rig, pump: Pump) -> None:
    a, b = rig.hosts
    assert pump.alive() and pump.failure() is None
    a.run("ip", "link", "del", "flannel0")
    _wait_for(lambda: pump.failure() is not None, timeout=2)
    assert pump.failure() == "flannel0: TX stopped: File descriptor in bad state (EBADFD)"
    assert not pump.alive()
    cpu = time.process_time()
    time.sleep(1)
    assert time.process_time() - cpu < 0.1, "no engine thread spins on the dead device"
    # The RX thread finds out on its next write to the TUN, and stops as well.
    with host_socket(b) as peer:
        peer.bind((str(b.underlay), 0))
        peer.sendto(udp4(str(b.overlay_ip), str(a.overlay_ip), 1, 9, b"late"), (str(a.underlay), 8285))
    _wait_for(lambda: not any(t.is_alive() for t in pump._threads), timeout=2)
    assert pump.failure() == "flannel0: TX stopped: File descriptor in bad state (EBADFD)", "the first reason stays"
    pump.stop()
    pump.stop()


def test_stop_after_a_clean_run_reports_nothing(pump: Pump) -> None:
    pump.stop()
    assert pump.failure() is None and not pump.alive()
