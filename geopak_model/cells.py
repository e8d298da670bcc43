"""The geocell table the model is built on, as arrays: read from the geocell stage's Parquet files, stored in
checkpoints as plain tensors (so ``torch.load(weights_only=True)`` reads it back).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.core.provinces import NUM_PROVINCES

CELL_COLUMNS = ("cell_id", "province_id", "local_id", "center_lat", "center_lon", "radius_km")


@dataclass
class CellTable:
    """Cells with global ids 0..N-1 grouped by province; ``local_id`` is the index within the province's head.

    ``neighbour_ids``/``neighbour_km`` (N, K) list up to K same-province neighbours by distance, −1 padded.
    """

    province_id: np.ndarray  # (N,) int64
    local_id: np.ndarray  # (N,) int64
    center_lat: np.ndarray  # (N,) float64
    center_lon: np.ndarray
    radius_km: np.ndarray
    neighbour_ids: np.ndarray  # (N, K) int64, −1 = none
    neighbour_km: np.ndarray  # (N, K) float64

    def __post_init__(self) -> None:
        n = len(self.province_id)
        if n == 0:
            raise ValueError("the geocell table is empty: the model needs at least one cell")
        for p in range(NUM_PROVINCES):
            loc = np.sort(self.local_id[self.province_id == p])
            if not np.array_equal(loc, np.arange(len(loc))):
                raise ValueError(f"province {p}: local cell ids must be 0..n-1, got {loc[:10].tolist()}")
        if ((self.province_id < 0) | (self.province_id >= NUM_PROVINCES)).any():
            raise ValueError("cell province_id outside 0..6")
        if self.neighbour_ids.shape[0] != n:
            raise ValueError("neighbour table does not match the number of cells")

    @property
    def n_cells(self) -> int:
        return len(self.province_id)

    @property
    def counts_per_province(self) -> list[int]:
        return np.bincount(self.province_id, minlength=NUM_PROVINCES).tolist()

    def local_to_global(self) -> np.ndarray:
        """(7, max_n) global id of each province's local cell, −1 padded."""
        width = max(1, max(self.counts_per_province))
        out = np.full((NUM_PROVINCES, width), -1, dtype=np.int64)
        out[self.province_id, self.local_id] = np.arange(self.n_cells)
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.province_id, self.local_id, self.center_lat, self.center_lon, self.radius_km,
                  self.neighbour_ids, self.neighbour_km):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    # --- construction and serialisation -----------------------------------------------------------------------
    @classmethod
    def from_frames(cls, cells: pd.DataFrame, neighbours: pd.DataFrame | None = None, k: int = 8) -> "CellTable":
        missing = [c for c in CELL_COLUMNS if c not in cells.columns]
        if missing:
            raise ValueError(f"cells table lacks columns {missing}")
        cells = cells.sort_values("cell_id")
        ids = cells["cell_id"].to_numpy(np.int64)
        if not np.array_equal(ids, np.arange(len(ids))):
            raise ValueError("cell_id must be contiguous 0..N-1")
        n = len(ids)
        nb_ids = np.full((n, k), -1, dtype=np.int64)
        nb_km = np.full((n, k), np.nan)
        if neighbours is not None and len(neighbours) and k > 0:
            nb = neighbours[(neighbours["cell_id"] != neighbours["neighbour_id"])]
            nb = nb[nb["neighbour_id"].between(0, n - 1) & nb["cell_id"].between(0, n - 1)]
            prov = cells["province_id"].to_numpy(np.int64)
            nb = nb[prov[nb["cell_id"].to_numpy()] == prov[nb["neighbour_id"].to_numpy()]]
            nb = nb.sort_values(["cell_id", "distance_km"], kind="stable")
            rank = nb.groupby("cell_id").cumcount().to_numpy()
            keep = rank < k
            nb = nb[keep]
            nb_ids[nb["cell_id"].to_numpy(), rank[keep]] = nb["neighbour_id"].to_numpy(np.int64)
            nb_km[nb["cell_id"].to_numpy(), rank[keep]] = nb["distance_km"].to_numpy(float)
        return cls(
            province_id=cells["province_id"].to_numpy(np.int64),
            local_id=cells["local_id"].to_numpy(np.int64),
            center_lat=cells["center_lat"].to_numpy(float),
            center_lon=cells["center_lon"].to_numpy(float),
            radius_km=cells["radius_km"].to_numpy(float),
            neighbour_ids=nb_ids,
            neighbour_km=nb_km,
        )

    @classmethod
    def from_parquet(cls, cells_path: str | Path, neighbours_path: str | Path | None, k: int = 8) -> "CellTable":
        cells = pd.read_parquet(cells_path)
        nb = pd.read_parquet(neighbours_path) if neighbours_path and Path(neighbours_path).exists() else None
        return cls.from_frames(cells, nb, k)

    def to_state(self) -> dict[str, torch.Tensor]:
        """Plain tensors for a checkpoint (loadable with ``weights_only=True``)."""
        return {
            "province_id": torch.from_numpy(self.province_id.copy()),
            "local_id": torch.from_numpy(self.local_id.copy()),
            "center_lat": torch.from_numpy(self.center_lat.copy()),
            "center_lon": torch.from_numpy(self.center_lon.copy()),
            "radius_km": torch.from_numpy(self.radius_km.copy()),
            "neighbour_ids": torch.from_numpy(self.neighbour_ids.copy()),
            "neighbour_km": torch.from_numpy(self.neighbour_km.copy()),
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "CellTable":
        return cls(**{k: v.numpy() for k, v in state.items()})

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "cell_id": np.arange(self.n_cells), "province_id": self.province_id, "local_id": self.local_id,
            "center_lat": self.center_lat, "center_lon": self.center_lon, "radius_km": self.radius_km,
        })
