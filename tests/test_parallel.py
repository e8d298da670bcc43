"""Issue 14.2: per-image work fans out over local processes or a real Dask cluster with identical results.

The cluster (a scheduler and two one-thread workers, separate processes on 127.0.0.1) is started once for this
module; if it cannot start, the tests FAIL with the reason."""

from __future__ import annotations

import os
import time

import pandas as pd
import pytest

from pipeline.core import parallel
from pipeline.core.parallel import chunked, map_chunks
from pipeline.core.store import ImageStore
from pipeline.filters.metrics import MetricsParams, cached_metrics, measure
from pipeline.sources.local import LocalSource, LocalSourceConfig
from tests.cluster_support import dask_cluster, required
from tests.conftest import gps_exif, jpeg_bytes

PARAMS = MetricsParams()


def measure_chunk(items: list[tuple[str, str]]) -> list[dict]:
    """Filter-like work on one chunk: every metric of each (image_id, path)."""
    return [measure(path, image_id, PARAMS) for image_id, path in items]


def slow_square(chunk: list[int]) -> tuple[list[int], int]:
    """Earlier chunks take longer, so completion order differs from chunk order; reports which process ran it."""
    time.sleep(0.05 * (3 - min(chunk[0], 3)))
    return [x * x for x in chunk], os.getpid()


def fail_on_three(chunk: list[int]) -> list[int]:
    if 3 in chunk:
        raise ValueError("chunk with 3")
    return chunk


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with required("the Dask cluster"), dask_cluster(workers=2, log_dir=tmp_path_factory.mktemp("dask")) as c:
        yield c


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of 70 small geotagged JPEGs (some outside Pakistan, some without GPS, one broken file)."""
    folder = tmp_path_factory.mktemp("photos")
    for i in range(70):
        lat, lon = (24.5 + 0.15 * i, 67.0 + 0.1 * i) if i % 7 else (51.5, -0.12)
        exif = gps_exif(lat, lon) if i % 11 else None
        (folder / f"p{i:03d}.jpg").write_bytes(jpeg_bytes(size=(64 + i, 48), colour=(i, 90, 200 - i), exif=exif))
    (folder / "broken.jpg").write_bytes(b"<html>not an image</html>")
    return folder


def test_local_processes_and_dask_give_the_same_ordered_results(cluster):
    chunks = chunked(range(12), 3)
    expected = [[x * x for x in c] for c in chunks]
    ticks: list[tuple[int, int]] = []
    here = map_chunks(slow_square, chunks, workers=1)
    local = map_chunks(slow_square, chunks, workers=2, progress=lambda d, n: ticks.append((d, n)))
    on_dask = map_chunks(slow_square, chunks, workers=1, scheduler_address=cluster.address)
    assert [r for r, _ in here] == [r for r, _ in local] == [r for r, _ in on_dask] == expected
    assert {pid for _, pid in here} == {os.getpid()}
    assert os.getpid() not in {pid for _, pid in local}
    assert os.getpid() not in {pid for _, pid in on_dask}
    assert ticks[-1] == (4, 4) and len(ticks) == 4
    assert map_chunks(slow_square, [], workers=2, scheduler_address=cluster.address) == []


def test_errors_come_back_with_their_message(cluster):
    chunks = chunked(range(6), 2)
    for kw in ({"workers": 2}, {"workers": 1, "scheduler_address": cluster.address}):
        with pytest.raises(ValueError, match="chunk with 3"):
            map_chunks(fail_on_three, chunks, **kw)


def test_unreachable_scheduler_is_a_clear_error(monkeypatch):
    from tests.cluster_support import free_port

    monkeypatch.setattr(parallel, "DASK_CONNECT_TIMEOUT_S", 2.0)
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match="cannot reach the Dask scheduler at " + address):
        map_chunks(slow_square, [[1]], workers=1, scheduler_address=address)


def test_filter_metrics_identical_locally_and_on_dask(cluster, photos, tmp_path):
    """The filter stage's own path (cached, chunk-committed metrics) gives the same rows on the cluster."""
    items = [(p.stem, str(p)) for p in sorted(photos.glob("*.jpg"))]
    chunks = chunked(items, 8)
    flat = lambda parts: [row for part in parts for row in part]  # noqa: E731
    local = flat(map_chunks(measure_chunk, chunks, workers=2))
    assert len(local) == len(items)
    here = cached_metrics(items, PARAMS, tmp_path / "here", workers=2, chunk_size=8, verify_bytes=False,
                          min_pool_items=1).metrics
    seen: list[tuple[int, int]] = []
    on_dask = cached_metrics(items, PARAMS, tmp_path / "dask", workers=2, chunk_size=8, verify_bytes=False,
                             scheduler_address=cluster.address, progress=lambda d, n: seen.append((d, n))).metrics
    pd.testing.assert_frame_equal(here, on_dask)
    assert list(here["image_id"]) == [r["image_id"] for r in local]
    assert here["sharpness"].astype(float).fillna(-1).tolist() == [r.get("sharpness", -1) for r in local]
    assert seen and seen[-1] == (len(items), len(items))


def test_local_source_hashing_identical_with_and_without_dask(cluster, photos, tmp_path, boundaries):
    inside = lambda la, lo: boundaries.locate(la, lo) >= 0  # noqa: E731
    results = {}
    for name, kw in {"here": {}, "processes": {"workers": 2},
                     "dask": {"scheduler_address": cluster.address}}.items():
        root = tmp_path / name
        results[name] = LocalSource(LocalSourceConfig(folder=str(photos)), ImageStore(root), inside, **kw).run()
        # exactly the accepted images were copied into this run's store, under the workers' hashes
        assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg")) == \
            sorted(results[name].manifest["path"])
    here = results["here"]
    assert here.stats["accepted"] > 40 and set(here.rejections["reason"]) >= {"outside_pakistan", "no_coordinates",
                                                                              "not_an_image"}
    for other in ("processes", "dask"):
        pd.testing.assert_frame_equal(results[other].manifest, here.manifest)
        pd.testing.assert_frame_equal(results[other].rejections, here.rejections)
        assert results[other].stats == here.stats
