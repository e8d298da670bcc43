"""One way to fan the per-image work inside a stage out: local spawned processes, or a Dask cluster.

Dagster's executors (multiprocess, ``dagster-dask``) place whole **steps**; the thousands of images inside one step
are this module's job. A stage cuts its items into chunks and calls::

    results = map_chunks(measure_chunk, chunks, workers=4, scheduler_address=None, progress=tick)

and gets one result per chunk, **in the order of** ``chunks``, whoever computed it. So a stage's output never depends
on where it ran (``tests/test_parallel.py`` checks local processes against a real two-worker cluster).

* ``scheduler_address`` empty/None: ``workers`` local processes from ``pipeline.core.processes.spawn_pool`` (spawned,
  so no CUDA or lock state is forked; they die with this process). ``workers <= 1`` or a single chunk runs here,
  in this process, with no pool at all.
* ``scheduler_address`` set (``tcp://host:8786``): the chunks are submitted to that ``dask.distributed`` scheduler
  and run on its workers. Every worker must import this project (same version) and see the same data root at the
  same path (a shared filesystem, see deploy/README.md): the chunks carry paths, never image bytes.

Rules for ``fn``: a module-level function (pickled by reference), taking one chunk and returning a picklable
value; it must not depend on per-process state of the caller (open files, a Dagster context, lambdas). An
exception in ``fn`` is raised here, with the worker's traceback, and the remaining chunks are cancelled.
In Dagster code take the address from the ``compute`` resource (``ComputeResource`` in pipeline.defs.resources,
env ``GEOPAK_DASK_SCHEDULER``) and call ``compute.map_chunks(fn, chunks, progress=...)``.

No chunk is waited for forever: a worker stuck on one file (a hung network filesystem, a decoder that loops)
would otherwise hold its stage, and its run, for good. Each result is awaited at most ``GEOPAK_CHUNK_TIMEOUT_S``
(default 1 h; a chunk is a few hundred images at most), then ``ChunkTimeout`` says which function and chunk hung,
the pool's workers are stopped and the Dask futures cancelled.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

from pipeline.core.processes import spawn_pool, stop_pool, wait_limit

T = TypeVar("T")
R = TypeVar("R")
Progress = Callable[[int, int], None]  # (chunks done, chunks in all)
DASK_CONNECT_TIMEOUT_S = 30.0
CHUNK_TIMEOUT_ENV = "GEOPAK_CHUNK_TIMEOUT_S"
DEFAULT_CHUNK_TIMEOUT_S = 3600.0


class ChunkTimeout(TimeoutError):
    """A chunk of per-image work gave no result within the chunk time limit."""


class _Result(Protocol):  # concurrent.futures.Future and distributed.Future alike
    def result(self, timeout: float | None = None) -> Any: ...

    def done(self) -> bool: ...


def chunk_timeout_s() -> float | None:
    """Seconds to wait for one chunk's result (``GEOPAK_CHUNK_TIMEOUT_S``, read at each call; default 1 h); None:
    no limit (the variable set to 0)."""
    return wait_limit(os.environ.get(CHUNK_TIMEOUT_ENV), CHUNK_TIMEOUT_ENV, DEFAULT_CHUNK_TIMEOUT_S) or None


def chunk_result(fut: _Result, what: str, index: int, total: int) -> Any:
    """``fut.result()``, waiting at most the chunk time limit; past it ``ChunkTimeout`` names ``what`` (the
    function and where it runs) and the chunk."""
    limit = chunk_timeout_s()
    try:
        return fut.result(timeout=limit)
    except TimeoutError as exc:
        if fut.done():  # the worker's own error (a socket timeout, a nested ChunkTimeout), not our wait running out
            raise
        raise ChunkTimeout(
            f"chunk {index + 1} of {total} of {what} gave no result within {limit:g} s: a worker is probably stuck "
            f"on one of its files (a hung network filesystem, an image its decoder never finishes). The stage "
            f"stops its workers and fails; run it again, or raise {CHUNK_TIMEOUT_ENV} (0 = no limit) if a chunk "
            "really takes that long") from exc


def results_in_order(futures: Sequence[_Result], what: str, progress: Progress | None = None) -> list:
    """Each future's result in order, each awaited at most the chunk time limit, reporting progress."""
    out = []
    for i, fut in enumerate(futures):
        out.append(chunk_result(fut, what, i, len(futures)))
        if progress is not None:
            progress(i + 1, len(futures))
    return out


def map_in_pool(pool: Executor, fn: Callable[[Any], R], items: Sequence[Any], progress: Progress | None = None,
                where: str = "local worker processes") -> list[R]:
    """``[fn(x) for x in items]`` on ``pool``, in order, each result awaited at most the chunk time limit; on an
    error or a timeout the chunks not started yet are cancelled."""
    futures = [pool.submit(fn, item) for item in items]
    try:
        return results_in_order(futures, f"{getattr(fn, '__name__', 'a function')} on {where}", progress)
    finally:
        for fut in futures:
            fut.cancel()


def chunked(items: Sequence[T] | Iterable[T], size: int) -> list[list[T]]:
    """``items`` cut into consecutive lists of at most ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, not {size}")
    seq = list(items)
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def map_chunks(
    fn: Callable[[Any], R],
    chunks: Sequence[Any],
    *,
    workers: int,
    scheduler_address: str | None = None,
    progress: Progress | None = None,
) -> list[R]:
    """``[fn(c) for c in chunks]``, computed in local processes or on a Dask cluster; results in chunk order."""
    chunks = list(chunks)
    if not chunks:
        return []
    if scheduler_address:
        return _on_dask(fn, chunks, scheduler_address, progress)
    if workers <= 1 or len(chunks) == 1:
        out = []
        for i, chunk in enumerate(chunks):
            out.append(fn(chunk))
            if progress is not None:
                progress(i + 1, len(chunks))
        return out
    return _on_processes(fn, chunks, min(workers, len(chunks)), progress)


def _on_processes(fn: Callable[[Any], R], chunks: list, workers: int, progress: Progress | None) -> list[R]:
    pool = spawn_pool(workers)
    grace_s = 30.0  # bounded: a stuck worker is terminated, never waited on forever
    try:
        return map_in_pool(pool, fn, chunks, progress, f"{workers} local worker processes")
    except ChunkTimeout:
        grace_s = 1.0  # a worker is known to be stuck: waiting for it is no use
        raise
    finally:
        stop_pool(pool, grace_s=grace_s)


def _on_dask(fn: Callable[[Any], R], chunks: list, address: str, progress: Progress | None) -> list[R]:
    try:
        from distributed import Client
    except ImportError as exc:  # the package is a dependency; a broken install must say so, not run locally
        raise RuntimeError(f"a Dask scheduler ({address}) is configured but 'distributed' cannot be imported: {exc}")
    try:
        client = Client(address, timeout=DASK_CONNECT_TIMEOUT_S, set_as_default=False)
    except OSError as exc:
        raise RuntimeError(f"cannot reach the Dask scheduler at {address} (GEOPAK_DASK_SCHEDULER): {exc}") from exc
    with client:
        name = getattr(fn, "__name__", "chunk")
        # unique keys: two stages (or runs) mapping the same function never share or overwrite results
        keys = [f"geopak-{name}-{uuid.uuid4().hex}-{i}" for i in range(len(chunks))]
        futures = client.map(fn, chunks, key=keys, pure=False)
        try:  # in chunk order (as_completed would need a default client)
            return results_in_order(futures, f"{name} on the Dask cluster at {address}", progress)
        finally:
            client.cancel(futures)  # on an error or interrupt nothing keeps running for a result nobody reads
