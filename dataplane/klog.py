"""Log lines in klog's format, as flannel (and every Kubernetes component) writes them, so that the tools
operators already point at node logs parse ours:

    I1127 05:06:12.123456    4242 flanneld.py:123] lease 10.244.3.0/24 ready

(severity letter, month and day, time to the microsecond, process id right-aligned to 7, source file and line).
Verbosity follows klog's -v: 0 logs INFO and up; 1 and more adds our DEBUG lines; the libraries underneath
(netlink, gRPC, the Kubernetes client) stay at WARNING below LIBRARY_VERBOSITY, because their debug output would
bury everything else.
"""

from __future__ import annotations

import logging
import os
import time

LIBRARY_VERBOSITY = 6
LIBRARIES = ("pyroute2", "asyncio", "aetcd", "grpc", "kubernetes_asyncio", "aiohttp", "urllib3")
_SEVERITY = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E", logging.CRITICAL: "F"}


class KlogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int((record.created % 1) * 1_000_000)
        head = (f"{_SEVERITY.get(record.levelno, 'I')}{t.tm_mon:02d}{t.tm_mday:02d} "
                f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{micros:06d} {os.getpid():>7d} "
                f"{record.filename}:{record.lineno}]")
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return f"{head} {text}"


def setup(verbosity: int) -> None:
    """Route every logger through one stderr handler in klog's format, at the level -v asks for."""
    handler = logging.StreamHandler()
    handler.setFormatter(KlogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= LIBRARY_VERBOSITY else logging.WARNING)
