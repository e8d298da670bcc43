"""A tiny synthetic data root for the model tests: images whose colour depends on their cell, and the tables
of the labels and geocell stages (the geocell contract of issue 4, written by hand here)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.core.paths import DataPaths
from pipeline.core.provinces import PROVINCES
from pipeline.core.store import ImageStore

# two cells per province, centres near real places of that province
CENTRES = {
    0: [(24.86, 67.01), (25.39, 68.37)], 1: [(31.55, 74.34), (30.20, 71.47)], 2: [(34.01, 71.58), (34.77, 72.36)],
    3: [(33.69, 73.05), (33.60, 73.15)], 4: [(35.92, 74.31), (35.30, 75.63)], 5: [(30.18, 66.98), (25.12, 62.33)],
    6: [(34.37, 73.47), (33.86, 73.76)],
}


def build_world(root: Path, per_cell: int = 4, size: int = 48, seed: int = 0, water_rows: int = 0) -> DataPaths:
    rng = np.random.default_rng(seed)
    paths = DataPaths.at(root)
    store = ImageStore(paths.root)
    cells, rows = [], []
    cid = 0
    for pid, centres in CENTRES.items():
        for local, (lat, lon) in enumerate(centres):
            cells.append({"cell_id": cid, "province_id": pid, "local_id": local, "center_lat": lat, "center_lon": lon,
                          "radius_km": 20.0, "count": per_cell, "cap_km": 50.0, "urban": pid in (0, 1, 3)})
            colour = np.array([(37 * cid) % 255, (91 * cid + 40) % 255, (53 * pid + 20) % 255], float)
            for j in range(per_cell):
                arr = np.clip(colour + rng.normal(0, 12, (size, size + 8 * (j % 2), 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG", quality=90)
                image_id, rel = store.put(buf.getvalue())
                koppen = 0 if len(rows) < water_rows else 4 + pid % 20
                doy = None if j == 3 else int(1 + (37 * j + 11 * cid) % 365)
                rows.append({"image_id": image_id, "path": rel, "lat": lat + rng.normal(0, 0.05),
                             "lon": lon + rng.normal(0, 0.05), "province_id": pid, "cell_id": cid,
                             "koppen_id": koppen, "day_of_year": doy, "j": j})
            cid += 1
    df = pd.DataFrame(rows)
    df["province_key"] = df["province_id"].map({p.id: p.key for p in PROVINCES})
    df["koppen_group"] = np.where(df["koppen_id"] == 0, 0, 2)
    angle = 2 * np.pi * (df["day_of_year"].astype(float) - 1) / 365
    df["doy_sin"], df["doy_cos"] = np.sin(angle), np.cos(angle)
    paths.labelled.parent.mkdir(parents=True, exist_ok=True)
    df.drop(columns=["cell_id", "j"]).to_parquet(paths.labelled)
    paths.geocells.parent.mkdir(parents=True, exist_ok=True)
    cells_df = pd.DataFrame(cells)
    cells_df.to_parquet(paths.geocells)
    nb = []
    for a in cells_df.itertuples():
        for b in cells_df.itertuples():
            if a.cell_id != b.cell_id and a.province_id == b.province_id:
                d = 111.2 * np.hypot(a.center_lat - b.center_lat, (a.center_lon - b.center_lon) * np.cos(
                    np.radians(a.center_lat)))
                nb.append({"cell_id": a.cell_id, "neighbour_id": b.cell_id, "distance_km": d})
    pd.DataFrame(nb).to_parquet(paths.geocell_neighbours)
    df[["image_id", "cell_id", "province_id"]].assign(distance_km=1.0).to_parquet(paths.cell_assignments)
    split = np.where(df["j"] == 0, "val", "train")
    paths.splits.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image_id": df["image_id"], "split": split,
                  "group_id": [hashlib.md5(str(c).encode()).hexdigest()[:8] for c in df["cell_id"]]}
                 ).to_parquet(paths.splits)
    return paths
