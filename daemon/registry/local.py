"""LocalRegistry: leases in an SQLite file that several daemons on one machine share (the embedded default).

Every write happens in a BEGIN IMMEDIATE transaction, so "create only if absent" and "replace only if still at my
revision" are as atomic as etcd's transactions; reads share a snapshot. Each change is appended to an event log
whose row id is the revision (a lease row keeps the revision that last wrote it); the log keeps the last
EVENT_HISTORY changes, and a watcher that falls further behind gets Compacted and lists again, as with etcd.
Expired leases are deleted (with an event) by whichever daemon touches the file next. The network config comes
from a file (--net-config-path).

The file is trusted no more than etcd is. It is created atomically (built aside, then linked into place), so a
file that does not start with SQLite's header (an empty, truncated one included) or fails SQLite's integrity
check is damaged: flanneld stops at start with one line and never creates a registry over it. The rollback
journal is used rather than WAL: WAL maps a shared-memory file, and a daemon whose -shm file is truncated under
it dies of SIGBUS. Each operation first checks that the path still names the file this daemon opened (device
and inode): a file deleted or replaced while daemons run is reported, the path is opened (created) again, and
the watch's re-list makes every running daemon re-register its own lease there, as after an etcd data loss. A
daemon that creates the file waits CREATED_GRACE before its first listing, so that running daemons have
re-registered before it allocates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from pyflannel.daemon import config
from pyflannel.daemon.errors import FlannelError
from pyflannel.daemon.registry import Compacted, LeaseChanged, LeaseExists, Record, Unavailable

T = TypeVar("T")
log = logging.getLogger(__name__)
POLL_SECONDS = 0.2
CREATED_GRACE = 4 * POLL_SECONDS
EVENT_HISTORY = 10_000
HEADER = b"SQLite format 3\x00"
SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires REAL NOT NULL,
                                   rev INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS events (rev INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, value BLOB);
"""


class LocalRegistry:
    def __init__(self, path: str, config_path: str) -> None:
        self.path = path
        self.config_path = config_path
        self._db, self._identity = _open(path)
        self._lock = asyncio.Lock()
        # Held by the worker thread through each call, and by close(): a task cancelled while awaiting its call
        # releases _lock, but its thread runs on, and closing the connection under it is a use after free.
        self._db_lock = threading.Lock()

    async def get_config(self) -> str:
        return config.read(self.config_path)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._lock:
            return await asyncio.to_thread(self._guarded, fn, *args)

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the file the path names now; SQLite failures (a damaged or unwritable file) become
        Unavailable, retried like an unreachable etcd."""
        with self._db_lock:
            self._follow_path()
            try:
                return fn(*args)
            except sqlite3.Error as exc:
                raise Unavailable(f"local registry {self.path}: {exc}") from None

    def _follow_path(self) -> None:
        try:
            st = os.stat(self.path)
            identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            identity = None
        if identity == self._identity:
            return
        self._db.close()
        what = "deleted" if identity is None else "replaced"
        try:
            self._db, self._identity = _open(self.path)
        except FlannelError as exc:  # replaced by something damaged: retried like an unreachable etcd, with a
            # placeholder connection and an identity no file has, so the next call tries the path again
            self._db, self._identity = sqlite3.connect(":memory:", check_same_thread=False), (-1, -1)
            raise Unavailable(f"local registry {self.path} was {what} while in use: {exc}") from None
        raise Unavailable(f"local registry {self.path} was {what} while in use; now using the file at that path, "
                          "where every running daemon registers its lease again")

    def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(cursor, *args) on one consistent snapshot, without a write lock unless an expired lease is
        waiting to be swept."""
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
            for (key,) in cur.execute("SELECT key FROM leases WHERE expires < ?", (time.time(),)).fetchall():
                self._change(cur, key, None)
            result = fn(cur, *args)
            cur.execute("DELETE FROM events WHERE rev <= (SELECT MAX(rev) FROM events) - ?", (EVENT_HISTORY,))
            cur.execute("COMMIT")
            return result
        except BaseException:
            if self._db.in_transaction:
                cur.execute("ROLLBACK")
            raise

    @staticmethod
    def _change(cur: sqlite3.Cursor, key: str, value: bytes | None, expires: float = 0) -> Record:
        cur.execute("INSERT INTO events (key, value) VALUES (?, ?)", (key, value))
        rev = int(cur.lastrowid or 0)
        if value is None:
            cur.execute("DELETE FROM leases WHERE key = ?", (key,))
        else:
            cur.execute("INSERT OR REPLACE INTO leases (key, value, expires, rev) VALUES (?, ?, ?, ?)",
                        (key, value, expires, rev))
        return Record(key, value, rev, expires)

    @staticmethod
    def _current(cur: sqlite3.Cursor, key: str) -> Record | None:
        row = cur.execute("SELECT value, rev, expires FROM leases WHERE key = ?", (key,)).fetchone()
        return None if row is None else Record(key, bytes(row[0]), int(row[1]), float(row[2]))

    async def list_records(self) -> tuple[list[Record], int]:
        return await self._run(self._read, self._list)

    @staticmethod
    def _list(cur: sqlite3.Cursor) -> tuple[list[Record], int]:
        rows = cur.execute("SELECT key, CAST(value AS BLOB), rev, expires FROM leases").fetchall()
        (rev,) = cur.execute("SELECT COALESCE(MAX(rev), 0) FROM events").fetchone()
        return [Record(key, bytes(value), int(r), float(e)) for key, value, r, e in rows], int(rev)

    async def create(self, key: str, value: bytes, ttl: int) -> Record:
        return await self._run(self._write, self._create, key, value, ttl)

    def _create(self, cur: sqlite3.Cursor, key: str, value: bytes, ttl: int) -> Record:
        if self._current(cur, key) is not None:
            raise LeaseExists(key)
        return self._change(cur, key, value, time.time() + ttl)

    async def replace(self, key: str, value: bytes, ttl: int, revision: int) -> Record:
        return await self._run(self._write, self._replace, key, value, ttl, revision)

    def _replace(self, cur: sqlite3.Cursor, key: str, value: bytes | None, ttl: int, revision: int) -> Record:
        current = self._current(cur, key)
        if current is None or current.revision != revision:
            raise LeaseChanged(current)
        return self._change(cur, key, value, time.time() + ttl)

    async def delete(self, key: str, revision: int) -> None:
        await self._run(self._write, self._replace, key, None, 0, revision)

    async def watch(self, revision: int) -> AsyncIterator[list[Record]]:
        while True:
            rows, oldest = await self._run(self._read, self._events_after, revision)
            if rows and oldest > revision + 1:
                raise Compacted(revision)
            if rows:
                revision = rows[-1][0]
                yield [Record(key, None if value is None else bytes(value), rev) for rev, key, value in rows]
            await asyncio.sleep(POLL_SECONDS)

    @staticmethod
    def _events_after(cur: sqlite3.Cursor, revision: int) -> tuple[list[tuple[int, str, Any]], int]:
        rows = cur.execute("SELECT rev, key, value FROM events WHERE rev > ? ORDER BY rev", (revision,)).fetchall()
        (oldest,) = cur.execute("SELECT COALESCE(MIN(rev), 0) FROM events").fetchone()
        return rows, int(oldest)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._db_lock:
            self._db.close()


def _open(path: str) -> tuple[sqlite3.Connection, tuple[int, int]]:
    """Open (creating if needed) the shared file; FlannelError if it is not a sound SQLite file. Switching the
    journal mode takes an exclusive lock and fails at once, without the busy timeout, while another daemon is
    doing the same: so that step is retried."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        created = _create(path)
        _check_header(path)
        db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise FlannelError(f"cannot open the local registry {path}: {exc}") from None
    deadline = time.monotonic() + 30
    while True:
        try:
            db.execute("PRAGMA journal_mode=DELETE")
            db.executescript(SCHEMA)
            _check_sound(db)
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                db.close()
                raise FlannelError(f"cannot use the local registry {path}: {exc}") from None
            time.sleep(0.05)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise FlannelError(f"local registry {path} is damaged ({exc}): move it away to start a new one") from None
    if created:
        log.warning("created a new local registry %s", path)
        time.sleep(CREATED_GRACE)
    st = os.stat(path)
    return db, (st.st_dev, st.st_ino)


def _create(path: str) -> bool:
    """Put a new registry file at path unless one is there, atomically (built aside, then linked into place), so
    that no daemon ever sees a half-made file; True if this call created it."""
    if os.path.exists(path):
        return False
    tmp = f"{path}.{os.getpid()}.new"
    db = sqlite3.connect(tmp)
    try:
        db.executescript(SCHEMA)
    finally:
        db.close()
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def _check_header(path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(len(HEADER))
    if head != HEADER:
        raise FlannelError(f"local registry {path} is not an SQLite database (damaged?): move it away to start "
                           "a new one")


def _check_sound(db: sqlite3.Connection) -> None:
    (result,) = db.execute("PRAGMA quick_check").fetchone()
    columns = {row[1] for row in db.execute("PRAGMA table_info(leases)")}
    if result != "ok":
        raise sqlite3.DatabaseError(result)
    if "rev" not in columns:  # a file from before leases carried their revision
        db.execute("ALTER TABLE leases ADD COLUMN rev INTEGER NOT NULL DEFAULT 0")
