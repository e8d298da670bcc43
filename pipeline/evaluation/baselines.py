"""Baselines the evaluation report must beat, all from the training split (never from test labels):

- ``province_median`` / ``province_cluster``: the geometric median, or the densest cluster, of the training points
  of the province the model predicts (what a province classifier alone achieves);
- ``knn``: the k nearest training images in the model's encoder feature space, one point by an estimator;
- ``global_median``: one constant answer, the geometric median of every training point;
- ``majority``: the training set's most frequent cell's centre, and the majority answers beside every
  classification metric (``majority_answers``).

Their settings (k, estimator, cluster radius) were chosen on the validation split when the model was exported,
with the model's own selection rule, and are recorded with their val scores and the training-only answers in
``model.pt`` (``selection.select_baselines``); here they are only applied to the test predictions. The kNN uses
the test images' features from the predictor's single read of each image. A checkpoint without that record (an
older or an untrained one) gets the settingless baselines recomputed from the training split and the others at
stated defaults, and the report says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from geopak_model import baselines as predictors
from geopak_model.retrieval import Gallery

DEFAULT_CLUSTER_KM = 25.0  # without a val-chosen radius (a checkpoint without a selection record)


def majority_answers(train: pd.DataFrame) -> dict[str, object]:
    """The constant answers of a model that learned only the training split's frequencies."""
    from pipeline.core.day_of_year import decode_day, encode_day

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


def _points(recorded: dict[str, list[float]]) -> dict[int, tuple[float, float]]:
    return {int(p): (float(a[0]), float(a[1])) for p, a in recorded.items()}


def baseline_answers(chosen: dict[str, Any] | None, train: pd.DataFrame, pred_province: np.ndarray,
                     test_features: np.ndarray | None, knn_gallery: Gallery | None
                     ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """(lat, lon) per test row of every baseline that can be computed, and a line per baseline saying its
    settings and where they came from. ``chosen``: the checkpoint's ``selection["baselines"]["chosen"]`` (None:
    none recorded); ``pred_province``: the model's predicted province per test row; ``test_features``: the
    predictor's kNN features per test row; ``knn_gallery``: the training images' features (``knn_gallery.npz``)."""
    n = len(pred_province)
    answers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    settings: dict[str, str] = {}
    lat, lon, prov = (train[c].to_numpy() for c in ("lat", "lon", "province_id"))
    if chosen:
        med, where = _points(chosen["province_median"]["points"]), "recorded at export"
        clu, radius = _points(chosen["province_cluster"]["points"]), chosen["province_cluster"]["radius_km"]
        g = tuple(chosen["global_median"]["point"])
        settings["province_cluster"] = f"radius {radius:g} km (chosen on val)"
    else:
        med, where = predictors.province_geomedians(lat, lon, prov), "recomputed from the training split"
        clu = predictors.province_densest(lat, lon, prov, DEFAULT_CLUSTER_KM)
        g = predictors.global_geomedian(lat, lon)
        settings["province_cluster"] = f"radius {DEFAULT_CLUSTER_KM:g} km (default: no val selection recorded)"
    answers["province_median"] = predictors.at_province(med, pred_province)
    answers["province_cluster"] = predictors.at_province(clu, pred_province)
    answers["global_median"] = (np.full(n, g[0]), np.full(n, g[1]))
    settings["province_median"] = f"no setting ({where})"
    settings["global_median"] = f"no setting; ({g[0]:.3f}, {g[1]:.3f}) ({where})"
    if knn_gallery is not None and test_features is not None and len(knn_gallery):
        k, est = (chosen["knn"]["k"], chosen["knn"]["estimator"]) if chosen and "knn" in chosen else (1, "nearest")
        nn = predictors.knn_neighbours(torch.as_tensor(test_features), knn_gallery.emb, k)
        answers["knn"] = predictors.knn_locate(nn, knn_gallery.lat.numpy(), knn_gallery.lon.numpy(), k, est)
        settings["knn"] = f"k = {k}, {est}" + (" (chosen on val)" if chosen and "knn" in chosen
                                              else " (default: no val selection recorded)")
    else:
        settings["knn"] = "not computed: no knn_gallery.npz beside the checkpoint"
    return answers, settings
