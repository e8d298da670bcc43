"""Bytes are verified where they are read: the filter's one read of a file hashes it against its image_id, and a
cached measurement is not trusted once the stored file's size or mtime changed."""

from __future__ import annotations

import builtins
import hashlib
import os
from pathlib import Path

import pandas as pd

from pipeline.core import reasons
from pipeline.core.store import ImageStore
from pipeline.filters.metrics import MetricsParams, cached_metrics, measure
from tests.filter_corpus import Case, encode, scene
from tests.test_filters import catalog_of, offline_clip, run_stage  # noqa: F401 - offline_clip is a fixture


def _world(tmp_path: Path, n: int = 5) -> pd.DataFrame:
    cases = [Case(f"train{k}", encode(scene(700 + k), quality=90), None, (240, 180)) for k in range(n)]
    return catalog_of(ImageStore(tmp_path), cases)


def _outcome(res, source_id: str) -> tuple[str, str]:
    row = res.outcomes.set_index("source_id").loc[source_id]
    return row["outcome"], row["detail"]


def test_truncated_stored_image_after_a_first_run_is_rejected(tmp_path, boundaries, offline_clip):
    catalog = _world(tmp_path)
    first = run_stage(tmp_path, catalog, boundaries, offline_clip)
    assert len(first.kept) == 5 and first.metrics_computed == 5
    victim = catalog.iloc[2]
    path = tmp_path / victim["path"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated in place, e.g. a disk copy that stopped half way

    again = run_stage(tmp_path, catalog, boundaries, offline_clip)
    code, detail = _outcome(again, "train2")
    assert code == reasons.BYTES_CHANGED
    assert victim["image_id"][:16] in detail  # the expected id prefix
    actual = hashlib.sha256(data[: len(data) // 2]).hexdigest()
    assert actual[:16] in detail and f"{len(data) // 2:,} bytes" in detail
    assert (again.metrics_computed, again.metrics_reused, again.metrics_rechecked) == (1, 4, 1)
    assert len(again.kept) == 4 and reasons.BYTES_CHANGED in reasons.DESCRIPTIONS
    rej = again.rejections.set_index("source_id").loc["train2"]
    assert rej["reason"] == reasons.BYTES_CHANGED and rej["stage"] == "filter"

    # restoring the bytes restores the image (its size/mtime changed again, so it is re-read, not trusted)
    path.write_bytes(data)
    restored = run_stage(tmp_path, catalog, boundaries, offline_clip)
    assert _outcome(restored, "train2")[0] == "kept" and restored.metrics_rechecked == 1


def test_replaced_file_of_the_same_size_is_caught_by_its_mtime(tmp_path, boundaries, offline_clip):
    catalog = _world(tmp_path, 3)
    assert len(run_stage(tmp_path, catalog, boundaries, offline_clip).kept) == 3
    path = tmp_path / catalog.iloc[0]["path"]
    st = path.stat()
    other = encode(scene(999), quality=90)
    other = (other + b"\0" * st.st_size)[: st.st_size] if len(other) < st.st_size else other[: st.st_size]
    path.write_bytes(other)  # same size, other bytes
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    res = run_stage(tmp_path, catalog, boundaries, offline_clip)
    assert _outcome(res, "train0")[0] == reasons.BYTES_CHANGED and res.metrics_rechecked == 1


def test_file_changed_before_the_first_run_is_rejected_by_its_hash(tmp_path, boundaries, offline_clip):
    catalog = _world(tmp_path, 3)
    path = tmp_path / catalog.iloc[1]["path"]
    path.write_bytes(path.read_bytes()[:-100])
    res = run_stage(tmp_path, catalog, boundaries, offline_clip)
    assert _outcome(res, "train1")[0] == reasons.BYTES_CHANGED
    assert res.metrics_computed == 3 and res.metrics_rechecked == 0


def test_cached_rows_without_a_file_stamp_are_read_again(tmp_path):
    """Rows from the older cache layout recorded no size/mtime: their bytes were never hashed, so they are re-read
    once, then trusted."""
    catalog = _world(tmp_path, 2)
    items = [(i, str(tmp_path / p)) for i, p in zip(catalog["image_id"], catalog["path"])]
    cache = tmp_path / "metrics.parquet"
    first = cached_metrics(items, MetricsParams(), cache, workers=1)
    legacy = first.metrics.drop(columns=["file_size", "file_mtime_ns"])
    for shard in cache.glob("part-*.parquet"):  # the cache is a folder of shards now
        shard.unlink()
    cache.rmdir()
    legacy.to_parquet(cache)  # the one-file layout, without stamps
    again = cached_metrics(items, MetricsParams(), cache, workers=1)
    assert (again.computed, again.rechecked) == (2, 2) and cache.is_dir()
    third = cached_metrics(items, MetricsParams(), cache, workers=1)
    assert (third.computed, third.reused) == (0, 2)
    pd.testing.assert_frame_equal(third.metrics, first.metrics)


def test_measurement_reads_the_file_once(tmp_path, monkeypatch):
    catalog = _world(tmp_path, 1)
    path = str(tmp_path / catalog.iloc[0]["path"])
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    row = measure(path, catalog.iloc[0]["image_id"], MetricsParams(verify_bytes=True))
    assert row.get("error") is None and row["phash"]
    assert opened.count(path) == 1 and row["file_size"] == Path(path).stat().st_size
