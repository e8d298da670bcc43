"""Every per-image metric in one decode, in worker processes, cached by ``image_id``.

One pass per image: read the file into memory once, check its sha256 against its ``image_id`` (when asked: the
cache does, so a stored file truncated or replaced after it was catalogued is rejected as ``bytes_changed`` rather
than measured under an id it no longer has), read the header from that buffer (size, format, orientation, pixel
limit: a bomb is refused before any pixel is decoded), decode once in JPEG draft mode to the smallest DCT scale
that still covers ``analysis_size`` px (1/8 for a 12 MP photo: no full-size decode; the full entropy-coded stream
is still read, so truncation is detected), orient, make
it 8-bit grey, then measure grey-level spread (standard deviation, 1-99 percentile range), a 256-bit perceptual hash
(pHash with a 16 x 16 DCT block, stored as hex) and sharpness: the variance of the 4-neighbour Laplacian of the grey
image reduced further to ``blur_size`` px. A fixed size makes sharpness measure blur relative to the picture,
whatever its resolution: over five sample worlds (9,100 images of 160 and 256 px) sharpness at 128 px separates the
planted blurred images (at most 3.1) from good ones (at least 3.7), while at 256 px the ranges overlap across sizes.

Training copies: given ``copy_dir``, an image that needs a resized training copy (``pipeline.core.copies``) is
decoded once for both: the draft scale covers the copy's short side too (for a 12 MP photo it is 1/8 either way),
the grey image is the JPEG's Y plane (the very pixels an 'L' decode gives) and the copy, made from the same pixels
as the shard writer would make it, goes to the copy cache. The cache key then names the copy size, since for some
sizes (3-6 MP) the grey image comes from a larger draft.

Thresholds are not applied here: the cache holds measurements, so changing a threshold never re-decodes. The cache
key covers what changes a measurement (metrics version, analysis size, pixel limit, accepted formats). Each row also
records the file's size and mtime when it was read: a later run re-reads (and re-hashes) a file whose size or
mtime changed instead of trusting its cached row. ``cached_metrics`` commits its work to the cache in chunks (at
most ~2,000 images or ~60 s each), so a killed run loses at most one chunk.
This module is imported by spawned workers: it must stay light (no pandas at import, no dagster).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pipeline.core import reasons
from pipeline.core.parallel import map_chunks
from pipeline.core.processes import exit_with_parent, spawn_pool, stop_pool
from pipeline.core.copies import CopyCache, CopySpec, copy_from_rgb, kept_as_is
from pipeline.core.decode import (DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, DecodeError, decode, decode_grey_and_rgb,
                                  open_image)

if TYPE_CHECKING:  # pandas is imported lazily so spawned workers start fast
    import pandas as pd

METRICS_VERSION = 2  # bump when a measurement changes meaning; cached rows with another key are recomputed
Progress = Callable[[int, int], None]

# column -> pandas dtype of the cache table (nullable where a failed decode leaves no value)
COLUMNS: dict[str, str] = {
    "image_id": "string",
    "key": "string",  # MetricsParams.key of the run that measured it
    "error": "string",  # a reason code from pipeline.core.reasons, or null when the image decoded
    "error_detail": "string",
    "format": "string",
    "mode": "string",
    "width": "Int64",  # displayed size (after EXIF orientation), from the header
    "height": "Int64",
    "orientation": "Int64",
    "exif_error": "string",
    "analysis_width": "Int64",
    "analysis_height": "Int64",
    "sharpness": "Float64",  # variance of the Laplacian at blur_size
    "grey_std": "Float64",
    "grey_range": "Float64",  # 99th - 1st percentile of grey levels
    "phash": "string",  # 64 hex digits (256 bits); see pipeline.filters.dedup for why 256 and not 64
    "file_size": "Int64",  # the file as read (bytes): a different size or mtime later forces a re-read
    "file_mtime_ns": "Int64",
}
PHASH_SIZE = 16  # 16 x 16 DCT coefficients = 256 bits


@dataclass(frozen=True)
class MetricsParams:
    """What a measurement depends on (part of the cache key)."""

    analysis_size: int = 256  # long side of the grey image the metrics are measured on
    blur_size: int = 128  # long side at which sharpness is measured (<= analysis_size)
    max_pixels: int = DEFAULT_MAX_PIXELS
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS
    # check the bytes' sha256 against the image_id (not part of the key: it changes no measurement of good bytes)
    verify_bytes: bool = field(default=False, compare=False)
    # training copies made from the same decode (0 = none): the short side is in the key (it can set the draft scale)
    copy_short_side: int = 0
    copy_quality: int = field(default=90, compare=False)
    copy_dir: str | None = field(default=None, compare=False)  # the copy cache; None makes no copies
    _formats: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.analysis_size < 64:
            raise ValueError("analysis_size must be >= 64 px (the 256-bit pHash reads a 64 x 64 image)")
        if not 8 <= self.blur_size <= self.analysis_size:
            raise ValueError("blur_size must lie in [8, analysis_size]")
        object.__setattr__(self, "_formats", frozenset(f.upper() for f in self.allowed_formats))

    @property
    def key(self) -> str:
        text = (f"v{METRICS_VERSION}|a{self.analysis_size}|b{self.blur_size}|px{self.max_pixels}|"
                f"{','.join(sorted(self._formats))}")
        if self.copy_spec is not None:
            text += f"|copy{self.copy_spec.short_side}"
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    @property
    def copy_spec(self) -> CopySpec | None:
        """The training copy made while decoding, or None when none is. A copy smaller than the analysis image is
        left to the shard writer: its draft would be larger than the shard writer's, so its bytes would differ
        (with ``copy_short_side >= analysis_size`` the shard writer's scale is the scale of this decode)."""
        if not self.copy_dir or not self.copy_short_side or self.copy_short_side < self.analysis_size:
            return None
        return CopySpec(self.copy_short_side, self.copy_quality)


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian (the usual focus measure); 0 for images under 3 px a side."""
    a = grey.astype(np.float32, copy=False)
    if min(a.shape) < 3:
        return 0.0
    lap = a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4.0 * a[1:-1, 1:-1]
    return float(lap.var())


def read_once(path: str | Path) -> tuple[bytes, os.stat_result]:
    """The file's bytes, read in one go, and its stat taken on the same open file."""
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        return fh.read(), st


def bytes_changed_detail(image_id: str, actual: str, size: int) -> str:
    return (f"sha256 of the stored file is {actual[:16]}..., its image_id {image_id[:16]}... ({size:,} bytes now): "
            "the file was truncated or replaced after it was catalogued")


def measure(path: str | Path, image_id: str, params: MetricsParams) -> dict[str, Any]:
    """All metrics of one image; decoding failures become ``error`` (a reason code) and ``error_detail``.

    The file is read once; the hash (when ``params.verify_bytes``), the header and the pixels all come from that
    one buffer."""
    row: dict[str, Any] = {"image_id": image_id, "key": params.key}
    try:
        data, st = read_once(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return {**row, "error": reasons.MISSING_FILE, "error_detail": str(path)}
    except OSError as exc:
        return {**row, "error": reasons.UNDECODABLE, "error_detail": f"cannot read {path}: {exc}"[:200]}
    row.update(file_size=st.st_size, file_mtime_ns=st.st_mtime_ns)
    if params.verify_bytes:
        actual = hashlib.sha256(data).hexdigest()
        if actual != image_id:
            return {**row, "error": reasons.BYTES_CHANGED, "error_detail": bytes_changed_detail(image_id, actual,
                                                                                                  len(data))}
    return measure_source(data, row, params)


def _shrink(img: Image.Image, long_side: int) -> Image.Image:
    """``img`` reduced (box filter) to ``long_side`` px on its longer side; unchanged when already that small."""
    if max(img.size) <= long_side:
        return img
    f = long_side / max(img.size)
    return img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BOX)


def measure_source(source: bytes | str | Path, row: dict[str, Any], params: MetricsParams,
                   draft: bool = True) -> dict[str, Any]:
    """Header checks, one decode and every metric, added to ``row``. ``draft=False`` decodes at full size and then
    reduces (the reference the draft-mode values are compared with in ``bench/scale_filter.py``). With
    ``params.copy_spec`` the same decode also makes the image's training copy and stores it in the copy cache."""
    import imagehash

    try:
        opened = open_image(source, params.max_pixels, params._formats)
    except DecodeError as exc:
        return {**row, "error": exc.reason, "error_detail": exc.detail}
    row.update(format=opened.format, mode=opened.mode, width=opened.width, height=opened.height,
               orientation=opened.orientation)
    spec = params.copy_spec
    rgb = None
    try:
        if spec is not None and draft and not kept_as_is(opened, spec.short_side):
            try:
                grey_img, rgb, exif_error = decode_grey_and_rgb(opened, params.analysis_size, spec.short_side,
                                                                params.max_pixels)
            except DecodeError:  # the copy must never change a verdict: measure as without it (same error or not)
                opened.image.close()
                opened = open_image(source, params.max_pixels, params._formats)
                grey_img, exif_error = decode(opened, "L", params.analysis_size, params.max_pixels)
        else:
            grey_img, exif_error = decode(opened, "L", params.analysis_size if draft else None, params.max_pixels)
    except DecodeError as exc:
        return {**row, "error": exc.reason, "error_detail": exc.detail}
    finally:
        opened.image.close()
    grey_img = _shrink(grey_img, params.analysis_size)  # only without draft: decode() already reduced
    grey = np.asarray(grey_img, dtype=np.float32)
    lo, hi = np.percentile(grey, [1, 99]) if grey.size else (0.0, 0.0)
    blur_img = _shrink(grey_img, params.blur_size)
    row.update(
        exif_error=exif_error,
        analysis_width=grey_img.width,
        analysis_height=grey_img.height,
        sharpness=laplacian_variance(np.asarray(blur_img, dtype=np.float32)),
        grey_std=float(grey.std()),
        grey_range=float(hi - lo),
        phash=np.packbits(imagehash.phash(grey_img, hash_size=PHASH_SIZE).hash.ravel()).tobytes().hex(),
    )
    if rgb is not None and spec is not None and params.copy_dir:
        CopyCache(params.copy_dir, spec).put(str(row["image_id"]), copy_from_rgb(rgb, spec))
    return row


def _measure_chunk(items: Sequence[tuple[str, str]], params: MetricsParams) -> list[dict[str, Any]]:
    """Worker task: (image_id, absolute path) pairs -> metric rows."""
    return [measure(path, image_id, params) for image_id, path in items]


MIN_POOL_ITEMS = 128  # below this, a worker's start-up (~1 s of imports) cannot pay off


def measure_many(
    items: Sequence[tuple[str, str]],
    params: MetricsParams,
    workers: int = 2,
    chunk_size: int = 16,
    progress: Progress | None = None,
    min_pool_items: int = MIN_POOL_ITEMS,
    *,
    pool: ProcessPoolExecutor | None = None,
    scheduler_address: str | None = None,
) -> list[dict[str, Any]]:
    """Metrics for (image_id, path) pairs, in order, using ``workers`` processes (this one included), or the
    workers of the Dask cluster at ``scheduler_address`` (``pipeline.core.parallel``; same rows either way).

    ``pool``: spawned workers to use instead of starting (and stopping) ``workers - 1`` new ones, so a caller that
    measures in several calls (``cached_metrics`` commits chunk by chunk) pays their start-up once; it stays open.

    Spawned workers take chunks from the front while this process, which does not wait for them to start, works
    from the back: it takes over every chunk no worker has picked up (a cancelled future) and redoes any it reaches
    that a worker has not finished (at most the two chunks the executor hands a worker ahead). So this process
    never waits on a worker's start-up, the work splits by speed, and the rows never depend on who measured them.
    (Two processes only help when a second core is free: on a machine busy with other work they split the CPU
    time evenly but the wall time stays that of one process.)
    """
    n = len(items)
    chunks = [list(items[i : i + chunk_size]) for i in range(0, n, chunk_size)]
    step = max(chunk_size, n // 10)  # report progress about ten times, not per chunk
    done = reported = 0

    def tick(k: int) -> None:
        nonlocal done, reported
        done += k
        if progress is not None and (done - reported >= step or done == n):
            reported = done
            progress(done, n)

    exit_with_parent()  # in a step worker: stop measuring when the launcher is killed
    if scheduler_address:
        parts = map_chunks(functools.partial(_measure_chunk, params=params), chunks, workers=workers,
                           scheduler_address=scheduler_address,
                           progress=lambda chunks_done, _all: tick(min(n, chunks_done * chunk_size) - done))
        return [row for part in parts for row in part]
    results: list[list[dict[str, Any]]] = []
    own = pool is None
    if (pool is not None and n >= 2 * chunk_size) or (own and workers > 1 and n >= max(min_pool_items, 2 * chunk_size)):
        pool = spawn_pool(workers - 1) if own else pool  # its workers exit when this process dies
        futures = []
        try:
            futures = [pool.submit(_measure_chunk, c, params) for c in chunks]
            for k in range(len(chunks) - 1, -1, -1):
                fut = futures[k]
                part = None
                if not fut.cancel() and fut.done():
                    try:
                        part = fut.result()
                    except Exception:  # noqa: BLE001 - a dead worker: measure here instead
                        part = None
                results.append(part if part is not None else _measure_chunk(chunks[k], params))
                tick(len(chunks[k]))
        finally:
            if own:
                stop_pool(pool)
            else:
                for fut in futures:
                    fut.cancel()  # none should be left; a shared pool must not run stale work
        results.reverse()
    else:
        for c in chunks:
            results.append(_measure_chunk(c, params))
            tick(len(c))
    return [row for part in results for row in part]


@contextlib.contextmanager
def metrics_pool(workers: int, n: int, min_pool_items: int = MIN_POOL_ITEMS) -> Iterator[ProcessPoolExecutor | None]:
    """``workers - 1`` spawned workers for measuring ``n`` images in several calls; None when not worth it."""
    if workers <= 1 or n < min_pool_items:
        yield None
        return
    pool = spawn_pool(workers - 1)
    try:
        yield pool
    finally:
        stop_pool(pool)


@dataclass(frozen=True)
class CachedMetrics:
    metrics: "pd.DataFrame"  # one row per requested image_id, in request order
    computed: int  # images decoded in this call
    reused: int  # images taken from the cache
    rechecked: int = 0  # cached images re-read because their file's size or mtime changed since it was measured
    shards_written: int = 0  # chunks committed to the cache


def changed_files(cached: "pd.DataFrame", path_of: dict[str, str]) -> set[str]:
    """Ids of cached rows whose file now differs in size or mtime from when it was read (or cannot be stat'ed, or
    was measured before rows recorded it): their bytes must be read and hashed again."""
    changed = set()
    sizes = cached["file_size"].fillna(-1).astype("int64").to_numpy()  # -1: not recorded, never a match
    mtimes = cached["file_mtime_ns"].fillna(-1).astype("int64").to_numpy()
    for image_id, size, mtime in zip(cached["image_id"], sizes.tolist(), mtimes.tolist()):
        try:
            st = os.stat(path_of[image_id])
        except OSError:
            changed.add(image_id)
            continue
        if size != st.st_size or mtime != st.st_mtime_ns:
            changed.add(image_id)
    return changed


def cached_metrics(
    items: Sequence[tuple[str, str]],
    params: MetricsParams,
    cache_path: str | Path,
    workers: int = 2,
    chunk_size: int = 32,
    progress: Progress | None = None,
    *,
    commit_rows: int = 2000,
    commit_seconds: float = 60.0,
    verify_bytes: bool = True,
    min_pool_items: int = MIN_POOL_ITEMS,
    scheduler_address: str | None = None,
) -> CachedMetrics:
    """Metrics for (image_id, path) pairs, decoding only the ids the cache lacks under the current key or whose
    file changed since; each chunk of at most ``commit_rows`` images (or about ``commit_seconds`` of work) is added
    to the cache as a shard before the next starts. ``verify_bytes``: reject bytes whose sha256 is not their id."""
    import pandas as pd

    from pipeline.filters.cache import ImageValueCache, commit_in_chunks

    cache = ImageValueCache(cache_path, COLUMNS)
    ids = [i for i, _ in items]
    path_of = dict(items)
    cached, missing = cache.lookup(ids, params.key)
    changed = changed_files(cached, path_of)
    if changed:
        cached = cached[~cached["image_id"].isin(changed)]
        again = set(missing) | changed
        missing = [i for i in dict.fromkeys(ids) if i in again]
    todo = [(i, path_of[i]) for i in missing]
    p = replace(params, verify_bytes=verify_bytes)
    total = len(todo)

    with metrics_pool(1 if scheduler_address else workers, total, min_pool_items) as pool:
        def measure_chunk(chunk: Sequence[tuple[str, str]], offset: int) -> pd.DataFrame:
            tick = None if progress is None else (lambda done, _n: progress(offset + done, total))
            return cache.frame(measure_many(chunk, p, workers, chunk_size, tick, min_pool_items, pool=pool,
                                            scheduler_address=scheduler_address))

        parts = commit_in_chunks(cache, todo, measure_chunk, commit_rows, commit_seconds)
    out = cache.in_order([cached, *parts], ids) if ids else cache.frame()
    return CachedMetrics(cache.frame(out), computed=total, reused=len(set(ids)) - total, rechecked=len(changed),
                         shards_written=len(parts))
