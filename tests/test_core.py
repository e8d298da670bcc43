"""Provinces table, schema validation, content-addressed store."""

from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from pipeline.core import provinces
from pipeline.core.schema import CATALOG_SCHEMA, SchemaError, fill_optional, is_optional, read_table, write_table
from pipeline.core.store import ImageStore, atomic_write_bytes, sha256_hex, sniff_extension
from tests.conftest import jpeg_bytes


def test_province_table_is_canonical():
    assert len(provinces.PROVINCES) == 7
    assert [p.id for p in provinces.PROVINCES] == list(range(7))
    assert provinces.lookup("Islamabad Capital Territory").key == "ict"
    assert provinces.lookup("PK-JK").key == "ajk"
    assert provinces.lookup("Azad Kashmir").key == "ajk"
    # FATA belongs to Khyber Pakhtunkhwa
    assert provinces.lookup("Federally Administered Tribal Areas").key == "kpk"
    assert provinces.BY_ADMIN1["01"].key == "kpk"
    assert provinces.lookup("baluchistan").key == "balochistan"
    with pytest.raises(KeyError):
        provinces.lookup("Kabul")
    shares = provinces.imbalance_shares()
    order = sorted(shares, key=shares.get, reverse=True)
    assert order == ["sindh", "punjab", "kpk", "ict", "balochistan", "gb", "ajk"]


def _row(**kw):
    base = dict(
        image_id="a" * 64, source="test", source_id="1", source_url=None, path="images/aa/aa/x.jpg", lat=30.0,
        lon=70.0, geo_accuracy=None, taken_at=pd.Timestamp("2020-01-01", tz="UTC"), owner="o", license="CC0-1.0",
        title="t", tags="", place_id=None, width=10, height=20,
    )
    base.update(kw)
    return base


def test_schema_roundtrip_keeps_extra_columns(tmp_path):
    df = pd.DataFrame([_row(), _row(image_id="b" * 64, taken_at=None)])
    df["extra"] = [1, 2]
    path = write_table(df, tmp_path / "c.parquet", CATALOG_SCHEMA)
    back = read_table(path, CATALOG_SCHEMA)
    assert list(back.columns[: len(CATALOG_SCHEMA)]) == CATALOG_SCHEMA.names
    assert back["extra"].tolist() == [1, 2]
    assert str(back["taken_at"].dt.tz) == "UTC"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lat": 91.0}, "lat"),
        ({"lon": float("nan")}, "lon"),
        ({"image_id": "XYZ"}, "sha256"),
        ({"width": 0}, "positive"),
        ({"source": None}, "source"),
    ],
)
def test_schema_rejects_bad_values(tmp_path, change, message):
    with pytest.raises(SchemaError, match=message):
        write_table(pd.DataFrame([_row(**change)]), tmp_path / "c.parquet", CATALOG_SCHEMA)
    assert not (tmp_path / "c.parquet").exists()


def test_optional_columns_may_be_left_out_and_are_kept_when_given(tmp_path):
    """A writer (or a file from before the column existed) may omit an optional column: it reads back as null.
    A required column stays required."""
    optional = [f.name for f in CATALOG_SCHEMA if is_optional(f)]
    assert optional == ["taken_at_source", "date_note", "attribution"]
    assert all(CATALOG_SCHEMA.field(n).nullable for n in optional)
    df = pd.DataFrame([_row(), _row(image_id="b" * 64)])
    back = read_table(write_table(df, tmp_path / "c.parquet", CATALOG_SCHEMA), CATALOG_SCHEMA)
    assert back[optional].isna().all().all()
    df["date_note"] = ["flickr datetakengranularity=6 (year)", None]
    back = read_table(write_table(df, tmp_path / "d.parquet", CATALOG_SCHEMA), CATALOG_SCHEMA)
    assert back["date_note"].tolist()[0] == "flickr datetakengranularity=6 (year)"
    table = fill_optional(pa.table({"image_id": ["a" * 64]}), CATALOG_SCHEMA)
    assert table.column_names == ["image_id", *optional] and table["attribution"].null_count == 1


def test_schema_requires_columns(tmp_path):
    with pytest.raises(SchemaError, match="missing columns"):
        write_table(pd.DataFrame([_row()]).drop(columns=["owner"]), tmp_path / "c.parquet", CATALOG_SCHEMA)


def test_store_is_content_addressed_and_idempotent(tmp_path):
    store = ImageStore(tmp_path)
    data = jpeg_bytes()
    image_id, rel = store.put(data)
    assert image_id == sha256_hex(data)
    assert rel == f"images/{image_id[:2]}/{image_id[2:4]}/{image_id}.jpg"
    mtime = store.abspath(rel).stat().st_mtime_ns
    assert store.put(data) == (image_id, rel)
    assert store.abspath(rel).stat().st_mtime_ns == mtime  # stored once
    assert store.read(rel) == data
    assert len(list((tmp_path / "images").rglob("*.*"))) == 1


def test_sniff_extension():
    assert sniff_extension(jpeg_bytes()) == ".jpg"
    assert sniff_extension(b"\x89PNG\r\n\x1a\n....") == ".png"
    assert sniff_extension(b"<!DOCTYPE html>") == ".bin"
    assert sniff_extension(b"") == ".bin"


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_no_dagster_outside_the_code_location():
    """Domain modules and the model package stay plain Python: only pipeline/defs and definitions import dagster."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    offenders = []
    for path in list((repo / "pipeline").rglob("*.py")) + list((repo / "geopak_model").rglob("*.py")):
        rel = path.relative_to(repo).as_posix()
        if rel.startswith("pipeline/defs/") or rel == "pipeline/definitions.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if rel == "pipeline/train_entry.py":  # the trainer's launcher speaks the Pipes protocol, nothing more
                names = [n for n in names if n != "dagster_pipes"]
            if any(n == "dagster" or n.startswith("dagster.") or n.startswith("dagster_") for n in names):
                offenders.append(rel)
    assert offenders == []


def test_sweep_removes_only_orphaned_temp_files(tmp_path):
    import subprocess
    import sys

    from pipeline.core.store import sweep_orphan_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / "ab").mkdir()
    orphan = tmp_path / "ab" / f".x.jpg.{dead_pid}.k2j4_a.tmp"
    live = tmp_path / "ab" / f".y.jpg.{__import__('os').getpid()}.q9w8e7.tmp"
    keep = tmp_path / "ab" / "z.jpg"
    for p in (orphan, live, keep):
        p.write_bytes(b"x")
    assert sweep_orphan_temps(tmp_path) == 1
    assert not orphan.exists() and live.exists() and keep.exists()


def test_every_reason_code_is_defined_and_described_once():
    """A code assigned twice, or described twice, silently overwrites the first description."""

    from pipeline.core import reasons

    tree = ast.parse(Path(reasons.__file__).read_text())
    names = [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Name) and t.id.isupper() and t.id != "DESCRIPTIONS"]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    desc = next(node.value for node in tree.body if isinstance(node, ast.AnnAssign)
                and getattr(node.target, "id", "") == "DESCRIPTIONS")
    keys = [k.id for k in desc.keys]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert set(keys) == set(names)


def test_one_missing_value_predicate_for_every_spelling():
    import numpy as np

    from pipeline.core.values import is_missing

    for v in (None, float("nan"), np.float32("nan"), np.float64("nan"), pd.NA, pd.NaT, np.datetime64("NaT")):
        assert is_missing(v), repr(v)
    for v in (0, 0.0, "x", " x ", pd.Timestamp("2020-01-01"), np.float32(1.5), [1], {"a": 1}, b""):
        assert not is_missing(v), repr(v)
    assert not is_missing("  ") and is_missing("  ", blank_text=True) and is_missing("", blank_text=True)


def test_sweep_keeps_another_hosts_fresh_temp_files(tmp_path):
    """On a shared data root another machine's writer may be mid-write: its temp file is kept (its pid means
    nothing here) until it is stale; this host's dead writer's temp goes at once, a live one stays."""
    import os
    import subprocess
    import time

    from pipeline.core import processes
    from pipeline.core.store import atomic_path, sweep_orphan_temps

    dead = subprocess.Popen(["true"])
    dead.wait()
    other = "0123abcd" if processes.HOST_TAG != "0123abcd" else "fedcba98"
    remote = tmp_path / f".a.parquet.{dead.pid}_{other}.x1.tmp"
    stale = tmp_path / f".b.parquet.{dead.pid}_{other}.x2.tmp"
    local = tmp_path / f".c.parquet.{dead.pid}_{processes.HOST_TAG}.x3.tmp"
    for f in (remote, stale, local):
        f.write_bytes(b"half")
    old = time.time() - processes.FOREIGN_WRITER_STALE_S - 60
    os.utime(stale, (old, old))
    with atomic_path(tmp_path / "d.parquet") as live:
        live.write_bytes(b"being written")
        assert sweep_orphan_temps(tmp_path) == 2
        assert live.exists() and remote.exists() and not stale.exists() and not local.exists()
