"""STAND-IN geocells and splits for measuring the model before the geocell stage (issue 4) is merged.

NOT the geocell algorithm: per province a plain k-means on the labelled coordinates (about one cell per 40
images, GEOPAK's n/40 cap), radius = the 95th-percentile member distance, neighbours = the 8 nearest cells of the
province, and a location-grouped 80/10/10 split (0.05° grid squares hashed to a split, so a place never spans
train and val). It writes the files of the issue-4 contract under the data root so the model code reads them
exactly as it will read the real ones.

    python bench/standin_cells.py --data-root /tmp/sw3000
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.gazetteer import haversine_km  # noqa: E402
from pipeline.core.paths import DataPaths  # noqa: E402


def write_standin(paths: DataPaths, per_cell: int = 40, seed: int = 0) -> dict[str, int]:
    from sklearn.cluster import KMeans

    lab = pd.read_parquet(paths.labelled, columns=["image_id", "lat", "lon", "province_id"])
    cells, assign = [], []
    gid = 0
    for pid in sorted(lab["province_id"].unique()):
        sub = lab[lab["province_id"] == pid]
        k = max(1, min(len(sub), round(len(sub) / per_cell)))
        xy = np.c_[sub["lat"], sub["lon"] * np.cos(np.radians(sub["lat"].mean()))]
        labels = KMeans(k, n_init=4, random_state=seed).fit_predict(xy) if k > 1 else np.zeros(len(sub), int)
        for local in range(k):
            m = labels == local
            clat, clon = sub["lat"][m].mean(), sub["lon"][m].mean()
            d = haversine_km(sub["lat"][m].to_numpy(), sub["lon"][m].to_numpy(), clat, clon)
            cells.append({"cell_id": gid + local, "province_id": int(pid), "local_id": local, "center_lat": clat,
                          "center_lon": clon, "radius_km": float(np.percentile(d, 95)), "count": int(m.sum()),
                          "cap_km": 50.0, "urban": bool(m.sum() >= per_cell)})
            assign.append(pd.DataFrame({"image_id": sub["image_id"][m], "cell_id": gid + local,
                                        "province_id": int(pid), "distance_km": d}))
        gid += k
    cells_df = pd.DataFrame(cells)
    nb = []
    for pid, grp in cells_df.groupby("province_id"):
        for a in grp.itertuples():
            d = haversine_km(a.center_lat, a.center_lon, grp["center_lat"].to_numpy(), grp["center_lon"].to_numpy())
            for j in np.argsort(d)[1:9]:
                nb.append({"cell_id": a.cell_id, "neighbour_id": int(grp["cell_id"].iloc[j]), "distance_km": d[j]})
    group = (lab["lat"] / 0.05).round().astype(int).astype(str) + "_" + (lab["lon"] / 0.05).round().astype(int).astype(str)
    u = group.map(lambda g: int(hashlib.sha256(f"{seed}:{g}".encode()).hexdigest()[:8], 16) / 2**32)
    split = np.where(u < 0.8, "train", np.where(u < 0.9, "val", "test"))
    for p in (paths.geocells, paths.splits):
        p.parent.mkdir(parents=True, exist_ok=True)
    cells_df.to_parquet(paths.geocells)
    pd.DataFrame(nb, columns=["cell_id", "neighbour_id", "distance_km"]).to_parquet(paths.geocell_neighbours)
    pd.concat(assign).to_parquet(paths.cell_assignments)
    pd.DataFrame({"image_id": lab["image_id"], "split": split, "group_id": group}).to_parquet(paths.splits)
    return {"cells": len(cells_df), "images": len(lab), **pd.Series(split).value_counts().to_dict()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--per-cell", type=int, default=40)
    args = ap.parse_args()
    print("STAND-IN cells/splits (not issue 4's geocells):", write_standin(DataPaths.at(args.data_root),
                                                                            args.per_cell))
