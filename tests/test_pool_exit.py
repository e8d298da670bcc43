"""Pools end, and the processes that own them exit (issue 21, the filter's exit hang).

Root cause: in a ``multiprocessing`` child (a Dagster step), a pool left with ``shutdown(wait=False)`` races the
process's exit path, which closes the call queue's feeder thread and joins the pool's worker *before* the executor
can send that worker its shutdown sentinel; the worker then waits on its task pipe forever and the step with it.
On the code before ``stop_pool`` the step below hung in 5 of 6 tries (1 in 2 in this test's 4 tries, at least).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.processes import pid_running, spawn_pool, stop_pool
from pipeline.filters.metrics import MetricsParams, cached_metrics

N_IMAGES = 128
EXIT_DEADLINE_S = 60.0


def _photos(folder: Path, n: int = N_IMAGES) -> list[tuple[str, str]]:
    """Camera-like JPEGs (noise: nothing compresses away), as a crawl stores them: named by their sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        path = folder / f"{i}.jpg"
        Image.fromarray((rng.random((480, 640, 3)) * 255).astype("uint8")).save(path, quality=90)
        items.append((hashlib.sha256(path.read_bytes()).hexdigest(), str(path)))
    return items


def _filter_step(items: list[tuple[str, str]], cache: str) -> None:
    """What the filter's step process does with its images: measure them with 2 workers, then return."""
    result = cached_metrics(items, MetricsParams(), cache, workers=2)
    assert result.computed == len(items)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def test_a_step_that_measured_with_two_workers_exits(tmp_path):
    items = _photos(tmp_path / "images")
    ctx = mp.get_context("spawn")  # as Dagster's multiprocess executor starts a step
    for attempt in range(4):
        step = ctx.Process(target=_filter_step, args=(items, str(tmp_path / f"cache{attempt}")))
        step.start()
        step.join(EXIT_DEADLINE_S)
        hung = step.is_alive()
        if hung:
            for pid in _children(step.pid):
                os.kill(pid, 9)
            step.kill()
            step.join()
        assert not hung, f"the step process did not exit within {EXIT_DEADLINE_S:g} s (try {attempt + 1})"
        assert step.exitcode == 0


def _sleep_forever(_: int) -> None:
    time.sleep(3600)


def test_stop_pool_terminates_a_worker_that_does_not_finish():
    pool = spawn_pool(1)
    pool.submit(_sleep_forever, 0)
    workers = list(pool._processes.values())  # noqa: SLF001 - the test checks the processes themselves
    time.sleep(1.0)  # the worker picks up the task
    start = time.monotonic()
    assert stop_pool(pool, grace_s=1.0) is False
    assert time.monotonic() - start < 15.0
    assert not any(pid_running(w.pid) for w in workers)


def test_stop_pool_waits_for_idle_workers_to_exit_by_themselves():
    pool = spawn_pool(2)
    assert pool.submit(abs, -3).result(timeout=60) == 3
    workers = list(pool._processes.values())  # noqa: SLF001
    assert stop_pool(pool, grace_s=30.0) is True
    assert not any(w.is_alive() for w in workers)
