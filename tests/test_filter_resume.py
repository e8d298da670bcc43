"""Nothing long is lost to a kill: the filter commits its measurements chunk by chunk (one Parquet shard each), so a
run killed with SIGKILL resumes where it stopped, losing at most one chunk, and ends with the same result as a run
that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.core.store import ImageStore
from pipeline.filters.cache import ImageValueCache, commit_in_chunks
from pipeline.filters.indoor import ClipSpec
from pipeline.filters.stage import FilterConfig, filter_catalog
from tests.filter_corpus import Case, encode, scene
from tests.process_support import wait_until
from tests.test_filters import catalog_of

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 320
COMMIT_ROWS = 16
KILL_AFTER_SHARDS = 3

# the filter stage in a child process: catalog from a Parquet file, two measuring processes, progress to a file
CHILD = """
import sys
import pandas as pd
from pipeline.core.store import ImageStore
from pipeline.filters.indoor import ClipSpec
from pipeline.filters.stage import FilterConfig, filter_catalog
from pipeline.labels.boundaries import ProvinceBoundaries

root, boundaries, hf_cache, commit_rows, log = sys.argv[1:6]
out = open(log, "a", buffering=1)
cfg = FilterConfig(clip=ClipSpec(cache_dir=hf_cache), workers=2, chunk_size=4, commit_rows=int(commit_rows),
                   commit_seconds=3600.0)
filter_catalog(pd.read_parquet(root + "/catalog.parquet"), ImageStore(root), ProvinceBoundaries.load(boundaries), cfg,
               root + "/f/metrics.parquet", root + "/f/indoor.parquet", progress=lambda d, n: out.write(f"{d}\\n"))
out.write("finished\\n")
"""


def _config(hf_cache: Path) -> FilterConfig:
    return FilterConfig(clip=ClipSpec(cache_dir=str(hf_cache)), workers=2, chunk_size=4, commit_rows=COMMIT_ROWS,
                        commit_seconds=3600.0)


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("resume")
    cases = [Case(f"img{k:04d}", encode(scene(3000 + k), quality=90), None, (240, 180))
             for k in range(N_IMAGES)]
    catalog = catalog_of(ImageStore(root), cases)
    catalog.to_parquet(root / "catalog.parquet")
    (root / "hf-empty").mkdir()
    return root, catalog


def test_sigkill_mid_run_loses_at_most_one_chunk(world, boundaries, boundaries_path):
    root, catalog = world
    cache_dir = root / "f" / "metrics.parquet"
    log = root / "progress.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    # images are measured in catalog order: one image of the 4th chunk becomes a FIFO, so the child commits 3
    # shards, then blocks reading it (no race between a poll and the child) until it is killed
    blocked = ImageStore(root).abspath(catalog["path"].iloc[KILL_AFTER_SHARDS * COMMIT_ROWS + 1])
    real_bytes = blocked.read_bytes()
    blocked.unlink()
    os.mkfifo(blocked)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(boundaries_path), str(root / "hf-empty"),
                             str(COMMIT_ROWS), str(log)], cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: len(_shards(cache_dir)) >= KILL_AFTER_SHARDS or proc.poll() is not None, 120)
        seen = len(_shards(cache_dir))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        err = proc.stderr.read().decode(errors="replace")[-2000:]
        blocked.unlink()
        blocked.write_bytes(real_bytes)
    assert proc.returncode == -signal.SIGKILL, f"the child was not killed mid-run (rc {proc.returncode}): {err}"
    assert seen == KILL_AFTER_SHARDS  # blocked in the 4th chunk: exactly three committed
    shards = _shards(cache_dir)
    sizes = [pq.ParquetFile(s).metadata.num_rows for s in shards]
    committed = sum(sizes)
    assert all(0 < s <= COMMIT_ROWS for s in sizes) and committed >= KILL_AFTER_SHARDS * COMMIT_ROWS
    assert committed < N_IMAGES, "the killed run had already measured everything"
    assert len(pd.read_parquet(cache_dir)) == committed  # every committed shard is whole and readable
    reported = [int(x) for x in log.read_text().split() if x.isdigit()]
    assert reported and max(reported) <= committed + COMMIT_ROWS  # measured but not committed: at most one chunk

    resumed = filter_catalog(catalog, ImageStore(root), boundaries, _config(root / "hf-empty"), cache_dir,
                             root / "f" / "indoor.parquet")
    assert resumed.metrics_reused == committed
    assert resumed.metrics_computed == N_IMAGES - committed <= N_IMAGES - KILL_AFTER_SHARDS * COMMIT_ROWS

    fresh = filter_catalog(catalog, ImageStore(root), boundaries, _config(root / "hf-empty"), root / "g" / "m.parquet",
                           root / "g" / "indoor.parquet")
    assert fresh.metrics_computed == N_IMAGES
    pd.testing.assert_frame_equal(resumed.outcomes, fresh.outcomes)
    pd.testing.assert_frame_equal(resumed.kept, fresh.kept)
    pd.testing.assert_frame_equal(resumed.rejections, fresh.rejections)
    cached = ImageValueCache(cache_dir, {"image_id": "string", "key": "string"}).load()
    assert sorted(cached["image_id"]) == sorted(catalog["image_id"])  # every image now committed exactly once


def test_chunks_are_appended_as_shards_and_compacted(tmp_path):
    """Each chunk is one new shard (nothing rewritten); many small shards are merged, later rows still win."""
    cols = {"image_id": "string", "key": "string", "v": "Float64"}
    cache = ImageValueCache(tmp_path / "c", cols, max_shards=4, compact_rows=400)
    seen_rows: list[int] = []

    def compute(chunk, offset):
        seen_rows.append(len(chunk))
        first = cache.shards()[:1]
        stamp = first[0].stat().st_mtime_ns if first else None
        out = cache.frame([{"image_id": f"id{i}", "key": "k", "v": float(i)} for i in chunk])
        assert not first or first[0].stat().st_mtime_ns == stamp  # existing shards untouched
        return out

    parts = commit_in_chunks(cache, list(range(10)), compute, max_rows=3, max_seconds=3600)
    assert seen_rows == [3, 3, 3, 1] and len(parts) == 4
    assert len(cache.shards()) == 4  # not yet above max_shards
    cache.add(cache.frame([{"image_id": "id1", "key": "k", "v": 100.0}]))  # a re-measured image: a 5th shard
    assert len(cache.shards()) == 1  # compacted into one
    got, missing = cache.lookup(["id1", "id9", "id42"], "k", columns=["v"])
    assert missing == ["id42"] and dict(zip(got["image_id"], got["v"])) == {"id1": 100.0, "id9": 9.0}
    assert list(got.columns) == ["image_id", "key", "v"]
    assert cache.lookup(["id1"], "other-key")[1] == ["id1"]
