"""Baselines the evaluation report must beat, computed from the training split only (never from test labels):

- ``province_medians``: the geometric median of the training images of each province; placed at the province
  the model predicts, it is what a province classifier alone achieves;
- ``knn_locations``: the nearest training image in the embedding space of the encoders GeoPak starts from (the
  embedding cache's frozen features; k = 1), i.e. retrieval without any trained head;
- the majority answers beside every classification metric (``majority_answers``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.provinces import NUM_PROVINCES


def geometric_median(lat: np.ndarray, lon: np.ndarray, iters: int = 200) -> tuple[float, float]:
    """Spherical geometric median of points (Weiszfeld on unit vectors): the point with the least summed
    great-circle distance, hence the best single guess for the median error."""
    la, lo = np.radians(np.asarray(lat, float)), np.radians(np.asarray(lon, float))
    u = np.column_stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)])
    x = u.mean(0)
    x /= np.linalg.norm(x)
    for _ in range(iters):
        d = np.maximum(np.linalg.norm(u - x, axis=1), 1e-12)
        x = (u / d[:, None]).sum(0)
        x /= np.linalg.norm(x)
    return float(np.degrees(np.arctan2(x[2], np.hypot(x[0], x[1])))), float(np.degrees(np.arctan2(x[1], x[0])))


def province_medians(train: pd.DataFrame) -> dict[int, tuple[float, float]]:
    """Geometric median of the training images of every province that has some (others: all training images)."""
    overall = geometric_median(train["lat"], train["lon"])
    out = {p: overall for p in range(NUM_PROVINCES)}
    for pid, g in train.groupby("province_id"):
        out[int(pid)] = geometric_median(g["lat"], g["lon"])
    return out


def majority_answers(train: pd.DataFrame) -> dict[str, object]:
    """The constant answers of a model that learned only the training split's frequencies."""
    from pipeline.labels.dates import decode_day, encode_day

    cells = train["cell_id"].value_counts()
    doy = train["day_of_year"].dropna().to_numpy(float) if "day_of_year" in train else np.array([])
    day = None
    if len(doy):  # the circular mean day of the training photos
        s, c = encode_day(doy, 365)
        day = int(decode_day(np.array([s.mean()]), np.array([c.mean()]), 365)[0])
    return {
        "province_id": int(train["province_id"].value_counts().idxmax()),
        "cells_top5": [int(c) for c in cells.index[:5]],
        "koppen_id": int(train["koppen_id"].value_counts().idxmax()),
        "koppen_group": int(train["koppen_group"].value_counts().idxmax()),
        "day_of_year": day,
    }


def knn_locations(checkpoint_cfg, data_root: Path, train: pd.DataFrame, test: pd.DataFrame,
                  weights_dir: Path | None = None, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) of each test image's nearest training image (cosine over the concatenated, L2-normalised CLIP
    and scene features of the frozen encoders; the embedding cache computes what it lacks). NaN where a test
    image cannot be read."""
    import torch

    from geopak_model.cache import build_embedding_cache
    from geopak_model.encoders import build_encoders
    from geopak_model.precision import amp_dtype, dtype_name
    from geopak_model.retrieval import nearest_neighbour
    from pipeline.core.paths import DataPaths

    cfg = checkpoint_cfg
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = build_encoders(cfg.encoder, weights_dir)
    precision = dtype_name(amp_dtype(device, cfg.amp, cfg.amp_dtype))
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else DataPaths.at(data_root).embeddings_dir
    need = pd.concat([train[["image_id", "path"]], test[["image_id", "path"]]])
    cache, _ = build_embedding_cache(encoder, need, data_root, cache_root, batch_size, device, 0, cfg.amp,
                                     amp_dtype=cfg.amp_dtype, weights_id=encoder.weights_id(precision))
    have = set(cache.index.index)

    def feats(ids: pd.Series) -> torch.Tensor:
        c, s = cache.load(ids)
        n = torch.nn.functional.normalize
        return torch.cat([n(c.float(), dim=1), n(s.float(), dim=1)], dim=1)

    tr = train[train["image_id"].isin(have)].reset_index(drop=True)
    ok = test["image_id"].isin(have).to_numpy()
    lat = np.full(len(test), np.nan)
    lon = np.full(len(test), np.nan)
    if ok.any() and len(tr):
        nn = nearest_neighbour(feats(test.loc[ok, "image_id"]), feats(tr["image_id"])).numpy()
        lat[ok], lon[ok] = tr["lat"].to_numpy(float)[nn], tr["lon"].to_numpy(float)[nn]
    return lat, lon
