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
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import as_completed
from typing import Any, TypeVar

from pipeline.core.processes import spawn_pool, stop_pool

T = TypeVar("T")
R = TypeVar("R")
Progress = Callable[[int, int], None]  # (chunks done, chunks in all)
DASK_CONNECT_TIMEOUT_S = 30.0


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
    results: list[Any] = [None] * len(chunks)
    pool = spawn_pool(workers)
    try:
        futures = {pool.submit(fn, c): i for i, c in enumerate(chunks)}
        for done, fut in enumerate(as_completed(futures), start=1):
            results[futures[fut]] = fut.result()
            if progress is not None:
                progress(done, len(chunks))
    finally:
        stop_pool(pool, grace_s=30.0)  # bounded: a stuck worker is terminated, never waited on forever
    return results


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
        try:
            if progress is not None:  # in chunk order (as_completed would need a default client)
                for done, fut in enumerate(futures, start=1):
                    fut.result()
                    progress(done, len(chunks))
            return client.gather(futures)
        finally:
            client.cancel(futures)  # on an error or interrupt nothing keeps running for a result nobody reads
