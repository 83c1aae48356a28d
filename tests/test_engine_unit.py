"""Engine construction failures, without a TUN: no fd that is not the engine's own may be closed."""

from __future__ import annotations

import gc
import os
import socket

import pytest

from pyflannel.dataplane._engine import Engine, PrefixTable


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        (([0], [0], PrefixTable()), {"batch": 0}, ValueError),
        (([0], [0], PrefixTable()), {"coalesce": True}, ValueError),
        (([0], [0], None), {}, TypeError),
        ((["x"], [0], PrefixTable()), {}, ValueError),
        (([], [0], PrefixTable()), {}, ValueError),
        (([0, 0], [0], PrefixTable()), {}, ValueError),
        (([0], [], PrefixTable()), {"socks6": []}, ValueError),
        (([0], [0], PrefixTable()), {"local_subnet": "not a subnet"}, ValueError),
    ],
)
def test_a_failed_engine_closes_no_foreign_fd(args: tuple[object, ...], kwargs: dict[str, object],
                                              error: type[Exception]) -> None:
    a, b = socket.socketpair()
    saved = os.dup(0)
    try:
        os.dup2(a.fileno(), 0)  # fd 0 is a socket this test owns: closing it would be seen
        with pytest.raises(error):
            Engine(*args, **kwargs)  # type: ignore[arg-type]
        gc.collect()
        assert os.fstat(0).st_ino == os.fstat(a.fileno()).st_ino, "fd 0 is still open and still ours"
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        a.close()
        b.close()
