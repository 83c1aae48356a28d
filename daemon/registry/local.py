"""LocalRegistry: leases in a SQLite file that several daemons on one machine share (the embedded default).

WAL mode lets readers run beside the one writer; every write happens in a BEGIN IMMEDIATE transaction, so
"create only if absent" is as atomic as etcd's transaction, and reads share a snapshot without a write lock.
Each change is also appended to an event log whose row id is the revision that watchers poll from; the log
keeps the last EVENT_HISTORY changes, and a watcher that falls further behind gets Compacted and lists again,
as with etcd. Expired leases are deleted (with an event) by whichever daemon touches the file next. The network
config comes from a file (--net-config-path).
"""

from __future__ import annotations

import asyncio
import ipaddress
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from daemon.errors import ConfigError, FlannelError
from daemon.lease import Event, Lease, LeaseAttrs, event_from_record, lease_from_record, subnet_key
from daemon.registry import Compacted, LeaseExists

T = TypeVar("T")
POLL_SECONDS = 0.2
EVENT_HISTORY = 10_000
SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (rev INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, value TEXT);
"""


class LocalRegistry:
    def __init__(self, path: str, config_path: str) -> None:
        self.path = path
        self.config_path = config_path
        self._db = _open(path)
        self._lock = asyncio.Lock()

    async def get_config(self) -> str:
        try:
            return Path(self.config_path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read network config {self.config_path}: {exc.strerror}") from None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._lock:
            return await asyncio.to_thread(fn, *args)

    def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(cursor, *args) on one consistent snapshot. Reads (the watch polls several times a second in every
        daemon) take no write lock, unless an expired lease is waiting to be swept: then it is a write."""
        cur = self._db.cursor()
        cur.execute("BEGIN")
        try:
            if cur.execute("SELECT 1 FROM leases WHERE expires < ? LIMIT 1", (time.time(),)).fetchone():
                cur.execute("COMMIT")
                return self._write(fn, *args)
            result = fn(cur, *args)
            cur.execute("COMMIT")
            return result
        except BaseException:
            if self._db.in_transaction:
                cur.execute("ROLLBACK")
            raise

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(cursor, *args) inside one immediate transaction, after sweeping expired leases."""
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            now = time.time()
            for (key,) in cur.execute("SELECT key FROM leases WHERE expires < ?", (now,)).fetchall():
                self._change(cur, key, None)
            result = fn(cur, *args)
            cur.execute("DELETE FROM events WHERE rev <= (SELECT MAX(rev) FROM events) - ?", (EVENT_HISTORY,))
            cur.execute("COMMIT")
            return result
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    @staticmethod
    def _change(cur: sqlite3.Cursor, key: str, value: str | None, expires: float = 0) -> None:
        if value is None:
            cur.execute("DELETE FROM leases WHERE key = ?", (key,))
        else:
            cur.execute("INSERT OR REPLACE INTO leases (key, value, expires) VALUES (?, ?, ?)", (key, value, expires))
        cur.execute("INSERT INTO events (key, value) VALUES (?, ?)", (key, value))

    async def list_leases(self) -> tuple[list[Lease], int]:
        return await self._run(self._read, self._list)

    @staticmethod
    def _list(cur: sqlite3.Cursor) -> tuple[list[Lease], int]:
        rows = cur.execute("SELECT key, value, expires FROM leases").fetchall()
        (rev,) = cur.execute("SELECT COALESCE(MAX(rev), 0) FROM events").fetchone()
        leases = [lease for key, value, expires in rows
                  if (lease := lease_from_record(key, value, expires)) is not None]
        return leases, int(rev)

    async def create_lease(self, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs, ttl: int) -> float:
        return await self._run(self._write, self._create, subnet_key(subnet), attrs.to_json(), ttl)

    def _create(self, cur: sqlite3.Cursor, key: str, value: str, ttl: int) -> float:
        if cur.execute("SELECT 1 FROM leases WHERE key = ?", (key,)).fetchone():
            raise LeaseExists(key)
        expires = time.time() + ttl
        self._change(cur, key, value, expires)
        return expires

    async def update_lease(self, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs, ttl: int) -> float:
        return await self._run(self._write, self._update, subnet_key(subnet), attrs.to_json(), ttl)

    def _update(self, cur: sqlite3.Cursor, key: str, value: str, ttl: int) -> float:
        expires = time.time() + ttl
        self._change(cur, key, value, expires)
        return expires

    async def delete_lease(self, subnet: ipaddress.IPv4Network) -> None:
        await self._run(self._write, self._change, subnet_key(subnet), None)

    async def watch(self, revision: int) -> AsyncIterator[list[Event]]:
        while True:
            rows, oldest = await self._run(self._read, self._events_after, revision)
            if rows and oldest > revision + 1:
                raise Compacted(revision)
            events = [event for _, key, value in rows if (event := event_from_record(key, value)) is not None]
            if rows:
                revision = rows[-1][0]
            if events:
                yield events
            await asyncio.sleep(POLL_SECONDS)

    @staticmethod
    def _events_after(cur: sqlite3.Cursor, revision: int) -> tuple[list[tuple[int, str, str | None]], int]:
        rows = cur.execute("SELECT rev, key, value FROM events WHERE rev > ? ORDER BY rev", (revision,)).fetchall()
        (oldest,) = cur.execute("SELECT COALESCE(MIN(rev), 0) FROM events").fetchone()
        return rows, int(oldest)

    async def close(self) -> None:
        self._db.close()


def _open(path: str) -> sqlite3.Connection:
    """Open (creating if needed) the shared file. Switching to WAL takes an exclusive lock and fails at once,
    without the busy timeout, while another daemon is doing the same: so that step is retried."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise FlannelError(f"cannot open the local registry {path}: {exc}") from None
    deadline = time.monotonic() + 30
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            return db
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise FlannelError(f"cannot use the local registry {path}: {exc}") from None
            time.sleep(0.05)
