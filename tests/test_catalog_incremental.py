"""The incremental catalog equals a from-scratch build: manifests added, changed, removed; stored files truncated or
replaced; the clock moving past a photo's date. And it reads only what changed."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pandas as pd
import pytest
import pyarrow.parquet as pq

from pipeline.catalog.build import build_catalog, build_catalog_files
from pipeline.core import reasons
from pipeline.core.schema import CATALOG_SCHEMA, RAW_MANIFEST_SCHEMA, REJECTIONS_SCHEMA, read_table, write_table
from pipeline.core.store import ImageStore
from tests.conftest import gps_exif, jpeg_bytes

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _row(store: ImageStore, data: bytes | None, source: str, sid: str, **kw) -> dict:
    image_id, rel = store.put(data) if data is not None else ("e" * 64, "images/ee/ee/gone.jpg")
    row = dict(source=source, source_id=sid, source_url=None, image_id=image_id, path=rel, lat=None, lon=None,
               geo_accuracy=None, taken_at=None, owner="me", license="CC0-1.0", title=None, tags=None, place_id=None)
    row.update(kw)
    return row


def _img(i: int, **exif) -> bytes:
    return jpeg_bytes(colour=(i % 250, (7 * i) % 250, 90), exif=gps_exif(30 + i / 100, 70 + i / 100, **exif))


def _write(root: Path, name: str, rows: list[dict]) -> Path:
    path = root / "raw" / name / "manifest.parquet"
    write_table(pd.DataFrame(rows), path, RAW_MANIFEST_SCHEMA, check_values=False)
    return path


def _build(root: Path, out: Path, state: Path, now=NOW):
    manifests = sorted((root / "raw").glob("**/manifest.parquet"))
    stats = build_catalog_files(manifests, ImageStore(root), out / "catalog.parquet", out / "rejections.parquet",
                                state, now=now, workers=1)
    return stats, pq.read_table(out / "catalog.parquet"), pq.read_table(out / "rejections.parquet")


def _same_as_scratch(root: Path, tmp_path: Path, cat, rej, now=NOW, tag="scratch"):
    _, cat2, rej2 = _build(root, tmp_path / tag, tmp_path / tag / "state", now)
    assert cat.equals(cat2), "incremental catalog differs from a from-scratch build"
    assert rej.equals(rej2), "incremental rejections differ from a from-scratch build"


def test_incremental_equals_full_rebuild(tmp_path):
    root = tmp_path / "root"
    store = ImageStore(root)
    a = [_row(store, _img(i), "a", f"a{i}") for i in range(6)]
    a.append(_row(store, None, "a", "missing"))
    a.append(_row(store, b"<html>429</html>", "a", "html"))
    b = [_row(store, _img(10 + i), "b", f"b{i}", lat=25.0, lon=67.0) for i in range(4)]
    b.append(_row(store, _img(3), "b", "dup-of-a3"))  # a3 is kept first: this one is a duplicate
    c = [_row(store, _img(20 + i), "c", f"c{i}") for i in range(4)]
    c.append(_row(store, _img(30, when="2027:06:01 12:00:00"), "c", "future"))  # future at NOW, past later
    pa_, pb, pc_ = _write(root, "a", a), _write(root, "b", b), _write(root, "c", c)
    state, out = root / "catalog" / "state", root / "catalog"

    stats, cat, rej = _build(root, out, state)
    assert stats.manifests_resolved == 3 and stats.headers_read == 16  # 17 files, a3's bytes read once
    assert len(cat) == 14 and len(rej) == 4
    assert dict(zip(rej["source_id"].to_pylist(), rej["reason"].to_pylist())) == {
        "missing": reasons.MISSING_FILE, "html": reasons.NOT_AN_IMAGE, "dup-of-a3": reasons.DUPLICATE_BYTES,
        "future": reasons.FUTURE_DATE}
    _same_as_scratch(root, tmp_path, cat, rej)
    read_table(out / "catalog.parquet", CATALOG_SCHEMA)  # what every reader does
    read_table(out / "rejections.parquet", REJECTIONS_SCHEMA)

    # nothing changed: nothing re-read, same files
    stats, cat_again, rej_again = _build(root, out, state)
    assert (stats.manifests_resolved, stats.headers_read) == (0, 0)
    assert cat_again.equals(cat) and rej_again.equals(rej)

    # add a manifest, change one, remove one, truncate one stored file, replace another with other bytes
    _write(root, "d", [_row(store, _img(40 + i), "d", f"d{i}") for i in range(3)]
           + [_row(store, _img(1), "d", "dup-of-a1")])
    _write(root, "b", b[:2] + [_row(store, _img(50), "b", "b-new")] + b[3:])
    pa_.unlink()  # a goes: d's copy of a1's bytes is now kept, b's copy of a3 too
    truncated = root / c[0]["path"]
    truncated.write_bytes(truncated.read_bytes()[:40])
    replaced = root / c[1]["path"]
    replaced.write_bytes(_img(99))  # same name, other bytes (a header with other coordinates)
    os.utime(replaced, ns=(1, 1))

    stats, cat, rej = _build(root, out, state)
    assert stats.manifests_removed == 1
    assert stats.manifests_resolved == 3  # b (changed), c (its stored files changed), d (new)
    assert stats.headers_read == 6  # b-new, c0, c1, d0-d2: the other rows' files are known (a1's too)
    _same_as_scratch(root, tmp_path, cat, rej, tag="scratch2")
    got = dict(zip(rej["source_id"].to_pylist(), rej["reason"].to_pylist()))
    assert "dup-of-a1" not in got and "dup-of-a3" not in got and got["c0"] == reasons.NOT_AN_IMAGE
    assert cat.to_pandas().set_index("source_id").loc["c1", "lat"] == pytest.approx(30.99)

    # the clock moves past the photo's date: accepted without re-resolving anything
    later = dt.datetime(2028, 1, 1, tzinfo=dt.timezone.utc)
    stats, cat, rej = _build(root, out, state, now=later)
    assert (stats.manifests_resolved, stats.headers_read) == (0, 0)
    assert "future" in cat["source_id"].to_pylist()
    _same_as_scratch(root, tmp_path, cat, rej, now=later, tag="scratch3")

    # only a removal: its rows go, nothing is re-read, and the next build has nothing left to do
    (root / "raw" / "d" / "manifest.parquet").unlink()
    stats, cat, rej = _build(root, out, state, now=later)
    assert (stats.manifests_removed, stats.manifests_resolved, stats.headers_read) == (1, 0, 0)
    assert "d" not in cat["source"].to_pylist() and "dup-of-a3" in cat["source_id"].to_pylist()
    _same_as_scratch(root, tmp_path, cat, rej, now=later, tag="scratch4")
    stats, _, _ = _build(root, out, state, now=later)
    assert (stats.manifests_removed, stats.manifests_resolved) == (0, 0)


def test_in_memory_build_matches_files(tmp_path):
    """``build_catalog`` (frames in, frames out) is the same engine: same rows as the file build."""
    root = tmp_path / "root"
    store = ImageStore(root)
    rows = [_row(store, _img(i), "x", f"x{i}") for i in range(5)] + [_row(store, _img(2), "x", "again")]
    _write(root, "x", rows)
    _, cat, rej = _build(root, tmp_path / "out", tmp_path / "out" / "state")
    mem_cat, mem_rej = build_catalog([pd.DataFrame(rows)], store, now=NOW)
    assert mem_cat["source_id"].tolist() == cat["source_id"].to_pylist()
    assert mem_rej["detail"].tolist() == rej["detail"].to_pylist() == ["kept x:x2"]


def test_parallel_reads_match_one_process(tmp_path, monkeypatch):
    """Header reads and re-stats in worker processes give the files one process gives."""
    from pipeline.catalog import build as catalog_mod

    root = tmp_path / "root"
    store = ImageStore(root)
    _write(root, "p", [_row(store, _img(i), "p", f"p{i}") for i in range(12)])
    _write(root, "q", [_row(store, _img(20 + i), "q", f"q{i}") for i in range(6)] + [_row(store, None, "q", "gone")])
    _, one_cat, one_rej = _build(root, tmp_path / "one", tmp_path / "one" / "state")
    monkeypatch.setattr(catalog_mod, "POOL_MIN_FILES", 1)
    monkeypatch.setattr(catalog_mod, "STAT_POOL_MIN_ROWS", 1)
    manifests = sorted((root / "raw").glob("**/manifest.parquet"))
    out = tmp_path / "many"
    for _ in range(2):  # the second build re-stats in the workers
        stats = build_catalog_files(manifests, store, out / "catalog.parquet", out / "rejections.parquet",
                                    out / "state", now=NOW, workers=2)
    assert stats.manifests_resolved == 0
    assert pq.read_table(out / "catalog.parquet").equals(one_cat)
    assert pq.read_table(out / "rejections.parquet").equals(one_rej)


def test_engine_version_bump_reads_headers_again(tmp_path, monkeypatch):
    """A new ENGINE_VERSION (the resolution or header reading changed) must not reuse header facts the old engine
    cached: every manifest is resolved again from the files' headers, and the catalog shows the new reading."""
    from pipeline.catalog import build as catalog_mod

    root = tmp_path / "root"
    store = ImageStore(root)
    _write(root, "v", [_row(store, _img(i), "v", f"v{i}") for i in range(3)])
    state, out = tmp_path / "state", tmp_path / "out"
    _build(root, out, state)
    old_headers = catalog_mod.header_dir(state)
    assert any(old_headers.glob("*.parquet"))
    real = catalog_mod.header_facts

    def moved(data: bytes, fast: bool = True) -> tuple:  # the "new engine" reads every GPS 1 degree further north
        facts = list(real(data, fast))
        facts[4] += 1.0
        return tuple(facts)

    monkeypatch.setattr(catalog_mod, "header_facts", moved)
    monkeypatch.setattr(catalog_mod, "ENGINE_VERSION", catalog_mod.ENGINE_VERSION + 1)
    stats, cat, _ = _build(root, out, state)
    assert (stats.manifests_resolved, stats.headers_read, stats.headers_cached) == (1, 3, 0)
    assert not old_headers.exists()  # the old engine's cache is removed, not kept forever
    assert cat.to_pandas().set_index("source_id").loc["v1", "lat"] == pytest.approx(31.01)
