"""Outage: one dependency (the registry, iptables) seen failing and recovering, logged once per change of state.

A daemon that retries every few seconds must not write a line per retry, yet an operator must see when trouble
starts, what it is, and when it ends; /readyz and /metrics read the state and the count.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("flanneld")


class Outage:
    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None  # monotonic time of the first failure in this outage
        self.reason = ""
        self.errors = 0

    def failed(self, reason: str) -> None:
        self.errors += 1
        if self.since is None or reason != self.reason:
            log.warning("%s: %s; retrying (logged again when this changes)", self.what, reason)
        if self.since is None:
            self.since = time.monotonic()
        self.reason = reason

    def ok(self) -> None:
        if self.since is not None:
            log.info("%s: working again after %.0f s", self.what, time.monotonic() - self.since)
        self.since, self.reason = None, ""
