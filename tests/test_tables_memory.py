"""Issue 26: splits, geocells and cell assignment at 10 M rows in compact memory give the same outputs as the code
before, on synthetic rows, with query chunks forced small.

The code before is commit ``bench/scale_labels.py: REFERENCE_COMMIT``; its outputs on these rows are recorded as
fingerprints in ``tests/data/tables_reference.json`` (so a shallow clone checks them too). To record them again from
that commit: ``python tests/test_tables_memory.py --write-reference``."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.schema import CELL_ASSIGNMENTS_SCHEMA, SPLITS_SCHEMA, read_table, write_table
from pipeline.geocells import cells as cells_mod
from pipeline.geocells import splits as splits_mod
from pipeline.geocells.cells import GeocellConfig, assign_cells_file, fit_geocells_file, read_with_split, same_ids
from pipeline.geocells.splits import SplitConfig, id_order, key_codes, make_splits, read_split_inputs

REPO = Path(__file__).resolve().parents[1]
REFERENCE_FILE = Path(__file__).parent / "data" / "tables_reference.json"

TOWNS = [(24.86, 67.01, 0), (25.39, 68.37, 0), (31.55, 74.34, 1), (30.20, 71.47, 1), (30.18, 66.99, 5)]


def fingerprint(value) -> str:
    """sha256 of a frame (CSV: exact float repr), an array (dtype, shape, bytes) or a JSON-able value."""
    if isinstance(value, pd.DataFrame):
        data = value.to_csv().encode()
    elif isinstance(value, np.ndarray):
        data = f"{value.dtype.str}{value.shape}".encode() + np.ascontiguousarray(value).tobytes()
    else:
        data = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    """The recorded fingerprints of the code before on the rows below."""
    return json.loads(REFERENCE_FILE.read_text())


@pytest.fixture(autouse=True)
def tiny_chunks(monkeypatch):
    """Query chunks of a few rows, so every chunk boundary is crossed on small data."""
    monkeypatch.setattr(splits_mod, "QUERY_ROWS", 7)
    monkeypatch.setattr(cells_mod, "QUERY_ROWS", 13)


def _rows(n_per_town: int = 120, seed: int = 0) -> pd.DataFrame:
    """Photos around towns: some owners unknown or empty (owner×day grouping, Delaunay), some shared places,
    dense enough for buffers and for cut giant groups."""
    rng = np.random.default_rng(seed)
    parts = []
    for lat0, lon0, pid in TOWNS:
        dy, dx = rng.normal(0, 2.0, (2, n_per_town))
        parts.append(pd.DataFrame({"lat": lat0 + dy / 111.32, "lon": lon0 + dx / (111.32 * np.cos(np.radians(lat0))),
                                   "province_id": np.int8(pid)}))
    df = pd.concat(parts, ignore_index=True)
    n = len(df)
    df["image_id"] = [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(n)]
    owners = np.array([f"owner{i % 23}" for i in range(n)], dtype=object)
    owners[rng.random(n) < 0.2] = None
    owners[rng.random(n) < 0.05] = ""
    df["owner"] = owners
    places = np.array([f"place{i % 17}" if i % 9 == 0 else None for i in range(n)], dtype=object)
    df["place_id"] = places
    df["taken_at"] = pd.Timestamp("2015-01-01", tz="UTC") + pd.to_timedelta(rng.integers(0, 400, n) * 6, unit="h")
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # rows not in id order


def _split_prints(result) -> dict[str, str]:
    return {"summary": fingerprint(result.summary), "table": fingerprint(result.table.astype(object)),
            "per_province": fingerprint(result.per_province)}


@pytest.mark.parametrize("owner_disjoint", [True, False])
def test_make_splits_matches_reference(reference, owner_disjoint, tmp_path):
    df = _rows()
    cfg = SplitConfig(owner_disjoint=owner_disjoint, min_group_to_tile=20)
    expected = reference[f"splits owner_disjoint={owner_disjoint}"]
    assert _split_prints(make_splits(df, cfg)) == expected
    # the compact reader's frame (Arrow ids, categorical owner and place) gives the same splits
    df.to_parquet(tmp_path / "l.parquet")
    compact = read_split_inputs(tmp_path / "l.parquet")
    assert isinstance(compact["owner"].dtype, pd.CategoricalDtype)
    again = _split_prints(make_splits(compact, cfg))
    assert again["summary"] == expected["summary"] and again["table"] == expected["table"]


def test_read_split_inputs_takes_all_null_columns(tmp_path):
    df = _rows(n_per_town=5).assign(place_id=None, owner=None)
    df.to_parquet(tmp_path / "l.parquet")  # pandas writes all-None columns as Arrow's null type
    compact = read_split_inputs(tmp_path / "l.parquet")
    assert compact["place_id"].isna().all() and compact["owner"].isna().all()
    assert make_splits(compact).table.astype(object).equals(make_splits(df).table.astype(object))


def test_key_codes_same_for_categories_and_strings():
    keys = pd.Series(["b", None, "a", "", "b", "c", None, "a"], dtype=object)
    assert key_codes(keys).tolist() == key_codes(keys.astype("category")).tolist() == [0, -1, 1, -1, 0, 2, -1, 1]
    assert key_codes(keys.astype("category").iloc[[2, 5]].reset_index(drop=True)).tolist() == [0, 1]


def test_id_order_is_string_order_and_refuses_bad_ids():
    ids = pd.Series(["b", "a", "é", "Z", "ab"])
    assert id_order(ids).tolist() == np.argsort(ids.to_numpy().astype(str), kind="stable").tolist()
    with pytest.raises(ValueError, match="unique"):
        id_order(pd.Series(["a", "b", "a"]))
    with pytest.raises(ValueError, match="null"):
        id_order(pd.Series(["a", None], dtype=object))


def _geocell_inputs(tmp_path: Path, shuffled: bool) -> pd.DataFrame:
    """Labelled rows and their splits written as the assets write them; returns the labelled frame."""
    labelled = _rows(n_per_town=150, seed=1)[["image_id", "lat", "lon", "province_id", "place_id", "owner",
                                              "taken_at"]]
    splits = make_splits(labelled, SplitConfig()).table
    if shuffled:  # rows not lined up with the labelled table, one labelled row without a split: the join path
        splits = splits.sample(frac=1.0, random_state=3).iloc[1:]
    labelled.to_parquet(tmp_path / "labelled.parquet")
    write_table(splits, tmp_path / "splits.parquet", SPLITS_SCHEMA)
    return labelled


def _assignment_prints(split: pd.Series, cell_id: np.ndarray, dist: np.ndarray, within_cap: np.ndarray) -> dict:
    """``within_cap``: the share of images within their cell's cap per split, splits in sorted order."""
    split = split.fillna("(none)")
    return {"cell_id": fingerprint(np.asarray(cell_id, np.int64)), "distance_km": fingerprint(np.asarray(dist)),
            "images_by_split": split.value_counts().sort_index().to_dict(),
            "within_cap_by_split": fingerprint(np.round(np.asarray(within_cap, np.float64), 12))}


@pytest.mark.parametrize("shuffled", [False, True])
def test_geocells_and_assignment_files_match_reference(reference, tmp_path, shuffled):
    expected = reference[f"geocells shuffled={shuffled}"]
    labelled = _geocell_inputs(tmp_path, shuffled)
    assert same_ids(tmp_path / "labelled.parquet", tmp_path / "splits.parquet") == (not shuffled)
    joined = read_with_split(tmp_path / "labelled.parquet", tmp_path / "splits.parquet")
    assert fingerprint(joined["split"].to_pylist()) == expected["split"]

    new, no_train = fit_geocells_file(tmp_path / "labelled.parquet", tmp_path / "splits.parquet",
                                      GeocellConfig(max_fit_points=200))
    assert no_train == []
    assert fingerprint(new.cells) == expected["cells"]
    assert fingerprint(np.asarray(new.members)) == expected["members"]
    assert fingerprint(np.asarray(new.distance_km)) == expected["member_distance_km"]

    by_split, used = assign_cells_file(tmp_path / "labelled.parquet", tmp_path / "splits.parquet", new.cells,
                                       tmp_path / "assign.parquet")
    out = read_table(tmp_path / "assign.parquet", CELL_ASSIGNMENTS_SCHEMA)
    assert out["image_id"].tolist() == labelled["image_id"].tolist()
    assert (out["province_id"].to_numpy() == labelled["province_id"].to_numpy()).all()
    split = pd.Series([s if isinstance(s, str) else None for s in joined["split"].to_pylist()], dtype=object)
    prints = _assignment_prints(split, out["cell_id"].to_numpy(), out["distance_km"].to_numpy(),
                                by_split["within_cap"].to_numpy())
    assert prints == expected["assignment"]
    assert used == len(np.unique(out["cell_id"]))
    assert by_split["split"].tolist() == sorted(expected["assignment"]["images_by_split"])


def test_geocells_file_fits_a_province_without_train_rows_on_its_other_rows(tmp_path):
    labelled = _rows(n_per_town=40, seed=2)[["image_id", "lat", "lon", "province_id"]]
    split = np.where(labelled["province_id"] == 5, "val", "train")
    labelled.to_parquet(tmp_path / "labelled.parquet")
    write_table(pd.DataFrame({"image_id": labelled["image_id"], "split": split, "group_id": 0}),
                tmp_path / "splits.parquet", SPLITS_SCHEMA)
    built, no_train = fit_geocells_file(tmp_path / "labelled.parquet", tmp_path / "splits.parquet",
                                        GeocellConfig(max_fit_points=200))
    assert no_train == [5]
    assert sorted(built.cells["province_id"].unique().tolist()) == [0, 1, 5]
    assert len(built.members) == len(labelled)


def test_assignments_check_reads_columns_and_still_fails_a_wrong_cell(tmp_path):
    from pipeline.core.paths import DataPaths
    from pipeline.core.schema import GEOCELLS_SCHEMA
    from pipeline.defs.geocells import assignments_complete_check

    paths = DataPaths.at(tmp_path)
    for path in (paths.labelled, paths.splits, paths.geocells, paths.cell_assignments):
        path.parent.mkdir(parents=True, exist_ok=True)
    labelled = _rows(n_per_town=30, seed=4)
    labelled.to_parquet(paths.labelled)
    write_table(make_splits(labelled).table, paths.splits, SPLITS_SCHEMA)
    built, _ = fit_geocells_file(paths.labelled, paths.splits, GeocellConfig(max_fit_points=200))
    write_table(built.cells, paths.geocells, GEOCELLS_SCHEMA)
    assign_cells_file(paths.labelled, paths.splits, built.cells, paths.cell_assignments)
    ok = assignments_complete_check(paths)
    assert ok.passed and ok.metadata["images"].value == len(labelled)
    out = read_table(paths.cell_assignments, CELL_ASSIGNMENTS_SCHEMA)
    other = built.cells.loc[built.cells["province_id"] != out.loc[0, "province_id"], "cell_id"].iloc[0]
    out.loc[0, "cell_id"] = other  # a cell of another province
    out = out.iloc[::-1].iloc[1:]  # rows not lined up with the labelled table, the last image left without a cell
    write_table(out, paths.cell_assignments, CELL_ASSIGNMENTS_SCHEMA)
    bad = assignments_complete_check(paths)
    assert not bad.passed
    assert bad.metadata["cell_in_other_province"].value == 1 and bad.metadata["without_cell"].value == 1


def write_reference() -> None:
    """Record the fingerprints of the code before (read from git at the bench's REFERENCE_COMMIT) on the rows above."""
    import tempfile

    sys.path.insert(0, str(REPO / "bench"))
    import scale_labels

    old_splits = scale_labels.reference_module("pipeline/geocells/splits.py")
    old_cells = scale_labels.reference_module("pipeline/geocells/cells.py")
    prints: dict[str, dict] = {}
    for owner_disjoint in (True, False):
        result = old_splits.make_splits(_rows(), old_splits.SplitConfig(owner_disjoint=owner_disjoint,
                                                                         min_group_to_tile=20))
        prints[f"splits owner_disjoint={owner_disjoint}"] = _split_prints(result)
    for shuffled in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            labelled = _geocell_inputs(Path(tmp), shuffled)
            splits = read_table(Path(tmp) / "splits.parquet", SPLITS_SCHEMA)
        df = labelled.merge(splits, on="image_id", how="left")  # the old assets' way
        fit = df[df["split"] == old_splits.TRAIN].sort_values("image_id", kind="stable")
        old = old_cells.build_geocells(fit["lat"].to_numpy(), fit["lon"].to_numpy(), fit["province_id"].to_numpy(),
                                       old_cells.GeocellConfig(max_fit_points=200))
        cell_id, dist, within = old_cells.assign_cells(df["lat"], df["lon"], df["province_id"], old.cells)
        split = pd.Series([s if isinstance(s, str) else None for s in df["split"]], dtype=object)
        prints[f"geocells shuffled={shuffled}"] = {
            "split": fingerprint(split.tolist()), "cells": fingerprint(old.cells),
            "members": fingerprint(np.asarray(old.members)), "member_distance_km": fingerprint(np.asarray(old.distance_km)),
            "assignment": _assignment_prints(split, cell_id, dist, pd.Series(within).groupby(
                split.fillna("(none)").to_numpy()).mean().sort_index().to_numpy())}
    REFERENCE_FILE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE_FILE.write_text(json.dumps({"commit": scale_labels.REFERENCE_COMMIT, **prints}, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-reference"]:
        sys.exit("usage: python tests/test_tables_memory.py --write-reference")
    write_reference()
