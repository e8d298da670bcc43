"""Simple baselines GeoPak must beat, as plain functions of the training split (never of the images scored).

- ``global_geomedian``: one constant answer, the geometric median of every training point;
- ``province_geomedians`` / ``province_densest``: per province, the geometric median of its training points or
  the centre of its densest cluster; placed at the province the model predicts, they are what a province
  classifier alone achieves;
- ``knn_locate``: the k nearest training images in a feature space (the model's encoder features), reduced to
  one point by an estimator (k = 1: the nearest image's location) — retrieval without any trained head.

Their settings (the kNN's k and estimator, the cluster radius) are chosen on the validation split by
``selection.select_baselines`` with the same rule as the model's own settings; the evaluation then applies the
recorded settings to the test split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from geopak_model.geo import haversine_km
from geopak_model.inference import densest_cluster, geometric_median, weighted_mean
from pipeline.core.provinces import NUM_PROVINCES

KNN_ESTIMATORS = ("geomedian", "mode")  # k = 1 is one estimator of its own: the nearest image's location
DENSEST_CANDIDATES = 2000  # cluster centres tried per province (a seeded subsample of larger provinces)


def geomedian_of(lat: np.ndarray, lon: np.ndarray) -> tuple[float, float]:
    """The spherical geometric median of points (``inference.geometric_median`` with equal weights)."""
    la = torch.tensor(np.asarray(lat, float))[None]
    lo = torch.tensor(np.asarray(lon, float))[None]
    m_lat, m_lon = geometric_median(la, lo, torch.ones_like(la), iters=200)
    return float(m_lat[0]), float(m_lon[0])


def global_geomedian(lat: np.ndarray, lon: np.ndarray) -> tuple[float, float]:
    """The constant answer with the least summed great-circle error over the training points."""
    return geomedian_of(lat, lon)


def province_geomedians(lat: np.ndarray, lon: np.ndarray, province: np.ndarray) -> dict[int, tuple[float, float]]:
    """Geometric median of each province's training points; a province without any gets the global one."""
    overall = global_geomedian(lat, lon)
    out = {p: overall for p in range(NUM_PROVINCES)}
    for p in np.unique(province):
        m = province == p
        out[int(p)] = geomedian_of(lat[m], lon[m])
    return out


def densest_point(lat: np.ndarray, lon: np.ndarray, radius_km: float, seed: int = 0) -> tuple[float, float]:
    """The centre of the densest ``radius_km`` cluster of points: the point (of at most ``DENSEST_CANDIDATES``
    tried, a seeded subsample) with the most points within ``radius_km``, refined to the mean of those points.
    Ties go to the first candidate, so the answer is deterministic."""
    la, lo = torch.tensor(np.asarray(lat, float)), torch.tensor(np.asarray(lon, float))
    cand = np.arange(len(la))
    if len(cand) > DENSEST_CANDIDATES:
        cand = np.sort(np.random.default_rng(seed).choice(len(la), DENSEST_CANDIDATES, replace=False))
    counts = torch.zeros(len(cand), dtype=torch.long)
    for start in range(0, len(cand), 256):  # (256 × N) distances at a time
        c = torch.as_tensor(cand[start:start + 256])
        counts[start:start + len(c)] = (haversine_km(la[c, None], lo[c, None], la[None], lo[None])
                                        <= radius_km).sum(1)
    best = int(cand[int(torch.argmax(counts))])
    near = haversine_km(la[best], lo[best], la, lo) <= radius_km
    n = int(near.sum())
    m_lat, m_lon = weighted_mean(la[near][None], lo[near][None], torch.full((1, n), 1.0 / n, dtype=la.dtype))
    return float(m_lat[0]), float(m_lon[0])


def province_densest(lat: np.ndarray, lon: np.ndarray, province: np.ndarray, radius_km: float
                     ) -> dict[int, tuple[float, float]]:
    """The densest ``radius_km`` cluster of each province's training points; the global one where none."""
    overall = densest_point(lat, lon, radius_km)
    out = {p: overall for p in range(NUM_PROVINCES)}
    for p in np.unique(province):
        m = province == p
        out[int(p)] = densest_point(lat[m], lon[m], radius_km)
    return out


def at_province(answers: dict[int, tuple[float, float]], province: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's answer for its (predicted) province."""
    pts = np.array([answers[int(p)] for p in province], dtype=float).reshape(-1, 2)
    return pts[:, 0], pts[:, 1]


def knn_features(clip: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
    """The kNN baseline's feature of an image: both encoders' features, each L2-normalised, side by side."""
    return torch.cat([F.normalize(clip.float(), dim=1), F.normalize(scene.float(), dim=1)], dim=1)


@torch.no_grad()
def knn_neighbours(query: torch.Tensor, gallery: torch.Tensor, k: int, batch: int = 1024) -> torch.Tensor:
    """Indices (Q, k) of the k most cosine-similar gallery rows of each query row, most similar first, in blocks
    so the similarity matrix never exceeds ``batch`` × N."""
    g = F.normalize(gallery.float(), dim=1)
    q = F.normalize(query.float(), dim=1)
    k = min(k, g.shape[0])
    return torch.cat([(q[i:i + batch] @ g.T).topk(k, dim=1).indices for i in range(0, q.shape[0], batch)])


def knn_locate(neighbours: torch.Tensor, lat: np.ndarray, lon: np.ndarray, k: int, estimator: str,
               radius_km: float = 25.0) -> tuple[np.ndarray, np.ndarray]:
    """One point per query from its ``k`` nearest training images (the first ``k`` columns of ``neighbours``):
    the nearest one's location (k = 1), their geometric median, or the centre of their densest
    ``radius_km`` cluster (``estimator`` in ``KNN_ESTIMATORS``)."""
    idx = neighbours[:, :k]
    la = torch.tensor(np.asarray(lat, float))[idx]
    lo = torch.tensor(np.asarray(lon, float))[idx]
    if k == 1:  # whatever the estimator: the nearest image's location
        return la[:, 0].numpy(), lo[:, 0].numpy()
    if estimator not in KNN_ESTIMATORS:
        raise ValueError(f"kNN estimator must be one of {KNN_ESTIMATORS}, got {estimator!r}")
    w = torch.ones_like(la)
    out_lat, out_lon = [], []
    rows = max(1, 2 ** 22 // (k * k))  # the densest cluster compares every pair: bound the (rows, k, k) block
    for i in range(0, la.shape[0], rows):
        part = (la[i:i + rows], lo[i:i + rows], w[i:i + rows])
        m_lat, m_lon = geometric_median(*part) if estimator == "geomedian" else densest_cluster(*part, radius_km)
        out_lat.append(m_lat)
        out_lon.append(m_lon)
    return torch.cat(out_lat).numpy(), torch.cat(out_lon).numpy()
