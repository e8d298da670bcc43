"""Rate limits for the crawlers: token buckets per API key (or per host's bytes), in-process or shared by every
process through a SQLite file, and this process's buckets by key.

Why a registry: every session made for one key must draw on one bucket, or two sessions would spend the key's
allowance twice. The registry is created on first use (``process_limiters``), never on import.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.core.processes import SQLITE_BUSY_S, begin_immediate


class TokenBucket:
    """Thread-safe token bucket: ``acquire`` blocks until a token is free; reservations keep waiting threads fair."""

    def __init__(self, rate_per_s: float, capacity: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate_per_s <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate_per_s)
        self.capacity = float(capacity)
        self._tokens = float(capacity)
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self, cost: float = 1.0) -> float:
        """Take ``cost`` tokens (a request, or a body's bytes); return the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= cost
            wait_s = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait_s > 0:
            self._sleep(wait_s)
        return wait_s


class SharedTokenBucket:
    """A token bucket whose state lives in a SQLite file, so every process crawling with one key shares its budget.

    Dagster runs each province partition in its own process; an in-process bucket would let seven partitions spend
    seven times the key's allowance. One short ``BEGIN IMMEDIATE`` transaction per token. The clock must be one
    every process reads alike (wall time, the default); ``clock`` and ``sleep`` are injectable as for ``TokenBucket``.
    """

    def __init__(self, db_path: str | Path, name: str, rate_per_s: float, capacity: float = 1.0,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep):
        if rate_per_s <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate_per_s)
        self.capacity = float(capacity)
        self.name = name
        self._clock = clock
        self._sleep = sleep
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(db_path, timeout=SQLITE_BUSY_S, isolation_level=None, check_same_thread=False)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("CREATE TABLE IF NOT EXISTS buckets (name TEXT PRIMARY KEY, tokens REAL, last REAL)")
        self._lock = threading.Lock()

    def acquire(self, cost: float = 1.0) -> float:
        with self._lock:
            begin_immediate(self._con, "taking a token from the shared rate limit")
            try:
                row = self._con.execute("SELECT tokens, last FROM buckets WHERE name = ?", (self.name,)).fetchone()
                now = self._clock()
                tokens = self.capacity if row is None else min(self.capacity, row[0] + (now - row[1]) * self.rate)
                tokens -= cost
                self._con.execute("INSERT OR REPLACE INTO buckets (name, tokens, last) VALUES (?, ?, ?)",
                                  (self.name, tokens, now))
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self._con.execute("COMMIT")
        wait_s = -tokens / self.rate if tokens < 0 else 0.0
        if wait_s > 0:
            self._sleep(wait_s)
        return wait_s


Limiter = TokenBucket | SharedTokenBucket


class Limiters:
    """Buckets by (hashed key, shared file): one per key, replaced when its rate or capacity changes."""

    def __init__(self):
        self._buckets: dict[tuple[str, str], Limiter] = {}
        self._lock = threading.Lock()

    def get(self, key: str, rate_per_s: float, db_path: str | Path | None = None, capacity: float = 1.0) -> Limiter:
        """The bucket for one API key: in this process, or shared by every process through ``db_path``.

        Buckets are named by a hash of the key, so the key itself is never written down."""
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        slot = (name, str(db_path or ""))
        with self._lock:
            bucket = self._buckets.get(slot)
            if bucket is None or bucket.rate != rate_per_s or bucket.capacity != capacity:
                bucket = (SharedTokenBucket(db_path, name, rate_per_s, capacity) if db_path
                          else TokenBucket(rate_per_s, capacity))
                self._buckets[slot] = bucket
            return bucket


_process: Limiters | None = None
_process_lock = threading.Lock()


def process_limiters() -> Limiters:
    """This process's buckets, made on first use."""
    global _process
    with _process_lock:
        if _process is None:
            _process = Limiters()
        return _process


def rate_limiter(key: str, rate_per_s: float, db_path: str | Path | None = None, capacity: float = 1.0) -> Limiter:
    """``process_limiters().get``: the bucket every session of this process uses for ``key``."""
    return process_limiters().get(key, rate_per_s, db_path, capacity)
