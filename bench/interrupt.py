"""Signals that end a flannel-bench process the way Ctrl-C does, so that what it set up is removed on the way out."""

from __future__ import annotations

import os
import signal
from types import FrameType

_MAIN_PID = os.getpid()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """KeyboardInterrupt in this process only: pyroute2 forks helpers that inherit the handler."""
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt


def like_ctrl_c(*signums: signal.Signals) -> None:
    for signum in signums:
        signal.signal(signum, _interrupt)
