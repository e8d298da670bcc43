"""Rendering a planned sample world into the image store with a pool of spawned worker processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.sources.sample_world.config import LICENSE, MANIFEST_COLUMNS, SOURCE, SampleWorldConfig
from pipeline.sources.sample_world.defects import render_image
from pipeline.sources.sample_world.plan import plan_sample_world
from pipeline.core.values import is_missing

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.core.store import ImageStore
    from pipeline.labels.boundaries import ProvinceBoundaries
    from pipeline.labels.koppen import KoppenRaster

_MIN_ROWS_PER_WORKER = 32  # below 2x this, spawning processes costs more than it saves
_CHUNK = 16  # rows per task: small enough for steady progress reports, large enough to amortise pickling


def _plain_rows(plan: "pd.DataFrame") -> list[dict[str, Any]]:
    """Plan rows as plain Python values, so pickling them to spawned workers does not drag pandas along."""
    out = []
    for rec in plan.to_dict("records"):
        row: dict[str, Any] = {}
        for k, v in rec.items():
            if is_missing(v):
                v = None
            elif hasattr(v, "to_pydatetime"):
                v = v.to_pydatetime()
            elif isinstance(v, np.generic):
                v = v.item()
            row[k] = v
        out.append(row)
    return out


def _render_chunk(rows: list[dict[str, Any]], cfg: SampleWorldConfig) -> list[bytes]:
    """Worker task: pure CPU. Writing happens in the parent's I/O threads so fsync never stalls a render core."""
    return [render_image(r, cfg) for r in rows]


def generate_sample_world(
    cfg: SampleWorldConfig,
    store: "ImageStore",
    progress: Callable[[int, int], None] | None = None,
    workers: int = 2,
    boundaries: "ProvinceBoundaries | None" = None,
    koppen: "KoppenRaster | None" = None,
) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """Render every planned image into ``store``; return (raw_manifest, ground_truth).

    The manifest leaves lat/lon/geo_accuracy/taken_at empty on purpose (they live in EXIF) and never names the
    defect; the ground truth is the plan plus image_id and path. Output does not depend on ``workers``:
    rendering runs in ``workers`` spawned processes (when there are enough rows to pay for starting them),
    results are consumed in row order, and ``progress(done, total)`` counts images already in the store.
    """
    import pandas as pd
    from concurrent.futures import Future, ThreadPoolExecutor

    plan = plan_sample_world(cfg, boundaries, koppen)  # only planning reads them: render workers get plain rows
    rows = _plain_rows(plan)
    n = len(rows)
    chunks = [rows[i : i + _CHUNK] for i in range(0, n, _CHUNK)]
    results: list[tuple[str, str]] = []
    pending: list[Future] = []

    def settle(keep: int) -> None:
        """Collect finished puts, in order, until at most ``keep`` are outstanding; report progress."""
        while len(pending) > keep:
            results.append(pending.pop(0).result())
        if progress is not None:
            progress(len(results), n)

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="sample-world-put") as io_pool:

        def consume(blobs: list[bytes]) -> None:
            settle(keep=_CHUNK)  # keep one chunk of writes in flight while the next one renders
            pending.extend(io_pool.submit(store.put, b) for b in blobs)

        if workers > 1 and n >= 2 * _MIN_ROWS_PER_WORKER:
            from pipeline.core.parallel import chunk_result
            from pipeline.core.processes import spawn_pool, stop_pool

            pool = spawn_pool(workers)  # its workers die with this process, never orphaned
            try:
                futures = [pool.submit(_render_chunk, c, cfg) for c in chunks]
                for i, fut in enumerate(futures):  # in submission order: results line up with rows
                    consume(chunk_result(fut, "_render_chunk (sample world)", i, len(futures)))
            finally:
                stop_pool(pool)  # bounded: never waits on a stuck worker
        else:
            for c in chunks:
                consume(_render_chunk(c, cfg))
        settle(keep=0)

    image_ids = [r[0] for r in results]
    paths = [r[1] for r in results]
    truth = plan.copy()
    truth["image_id"] = image_ids
    truth["path"] = paths
    manifest = pd.DataFrame(
        {
            "source": SOURCE,
            "source_id": plan["source_id"],
            "source_url": [f"sample://world/{cfg.seed}/{i}" for i in range(n)],
            "image_id": image_ids,
            "path": paths,
            "lat": np.full(n, np.nan),
            "lon": np.full(n, np.nan),
            "geo_accuracy": np.full(n, np.nan),
            "taken_at": pd.Series(pd.NaT, index=range(n), dtype="datetime64[ns, UTC]"),
            "owner": plan["owner"],
            "license": LICENSE,
            "title": plan["title"],
            "tags": plan["tags"],
            "place_id": pd.Series([None] * n, dtype=object),
        },
        columns=list(MANIFEST_COLUMNS),
    )
    return manifest, truth
