"""Every wait has a bound and says what it waited for (issue 21.3): a stuck chunk of per-image work, a SQLite file
another process keeps locked, the limits' settings. (A run waiting on a pool slot: tests/test_runs_slots.py; a
trainer past its time limit: tests/test_training_pipes.py; a trickling download: tests/test_crawl_http.py.)"""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import time

import pytest

from pipeline.core import parallel
from pipeline.core.processes import begin_immediate
from pipeline.defs.executors import DEFAULT_POOL_WAIT_S, POOL_WAIT_ENV, POOL_WAIT_TAG, pool_wait_limit


def _stuck_on_the_third(chunk: int) -> int:
    if chunk == 2:
        time.sleep(30)  # a file it "never" finishes (a hung filesystem): without the bound map_chunks returns late
    return chunk * 10


def test_a_stuck_chunk_fails_its_stage_and_its_workers_are_stopped(monkeypatch):
    monkeypatch.setenv(parallel.CHUNK_TIMEOUT_ENV, "10")  # worker start-up included
    before = {proc.pid for proc in mp.active_children()}
    start = time.monotonic()
    with pytest.raises(parallel.ChunkTimeout) as caught:
        parallel.map_chunks(_stuck_on_the_third, list(range(4)), workers=2)
    message = str(caught.value)
    assert "chunk 3 of 4 of _stuck_on_the_third on 2 local worker processes" in message
    assert "within 10 s" in message and parallel.CHUNK_TIMEOUT_ENV in message
    assert not {proc.pid for proc in mp.active_children()} - before, "the stuck worker was left running"
    assert time.monotonic() - start < 60


def test_a_locked_sqlite_file_is_named_with_what_waited(tmp_path, monkeypatch):
    path = tmp_path / "state.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")  # another process mid-write
    waiter = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError) as caught:
        begin_immediate(waiter, "writing the crawl state")
    assert str(caught.value).startswith(f"writing the crawl state: {path} stayed locked by another process's write")
    assert "fuser" in str(caught.value)


def test_limits_read_from_settings():
    assert pool_wait_limit({}, {}) == DEFAULT_POOL_WAIT_S
    assert pool_wait_limit({}, {POOL_WAIT_ENV: "0"}) == 0  # no limit
    assert pool_wait_limit({POOL_WAIT_TAG: "5"}, {POOL_WAIT_ENV: "0"}) == 5  # the run's tag wins
    with pytest.raises(ValueError, match=f"run tag {POOL_WAIT_TAG} must be a number of seconds"):
        pool_wait_limit({POOL_WAIT_TAG: "soon"}, {})
    with pytest.raises(ValueError, match=POOL_WAIT_ENV):
        pool_wait_limit({}, {POOL_WAIT_ENV: "-1"})
