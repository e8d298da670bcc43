"""Every inference setting, and every baseline's setting, chosen on the validation split by ONE stated rule.

``RULE``: the lowest validation median error (compared at the report's 0.1 km), then the highest share within
25 km; a tie keeps the candidate listed first (the simpler one: no calibration, no refinement, fewer hypotheses).

What it chooses (``GRID``), in two stages because refinement starts from the classifier's point:

1. the classifier: the calibration (none, or temperatures fitted continuously on the val NLL — so it is kept
   only if it improves the rule's metric on val), the hypotheses (top provinces × top cells: K) and the point
   estimator, jointly;
2. retrieval refinement given those: off, or on with its neighbours, softmax temperature and search radius.

Baselines get the same treatment (``select_baselines``): the kNN's k and estimator, the province cluster's
radius. Each candidate's val score is kept, so the report shows what every choice scored. The val scores of the
chosen settings are optimistic (they won a comparison on the same images); the test split is the honest
estimate, and the report shows the gap.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from geopak_model.baselines import (
    KNN_ESTIMATORS,
    at_province,
    global_geomedian,
    knn_locate,
    knn_neighbours,
    province_densest,
    province_geomedians,
)
from geopak_model.geo import haversine_km
from geopak_model.inference import POINT_METHODS, Prediction, fit_calibration, mixture_predict, restrict
from geopak_model.model import GeopakHeads
from geopak_model.retrieval import Gallery, refine_settings

RULE = ("lowest val median km (at 0.1 km), then highest val share within 25 km; a tie keeps the candidate listed "
        "first (the simpler one)")
GRID: dict[str, tuple] = {
    "calibration": ("none", "fitted"),
    "top_provinces": (2, 7),
    "top_cells": (5, 16, 64),
    "point": POINT_METHODS,
    "refine_neighbours": (4, 16, 64),
    "refine_temperature": (0.03, 0.1, 0.3),
    "refine_radius_km": (50.0, 100.0, 200.0),
    "knn_k": (1, 4, 16, 64, 256),
    "knn_estimator": KNN_ESTIMATORS,
    "province_cluster_km": (10.0, 25.0, 50.0),
}
CLASSIFIER_KEYS = ("calibration", "top_provinces", "top_cells", "point")
REFINE_KEYS = ("refine", "refine_neighbours", "refine_temperature", "refine_radius_km")


@dataclass(frozen=True)
class Score:
    """A candidate's validation score under ``RULE``."""

    median_km: float
    acc_25km: float

    @property
    def key(self) -> tuple[float, float]:
        return round(self.median_km, 1), -self.acc_25km

    def as_dict(self, prefix: str = "val_") -> dict[str, float]:
        return {f"{prefix}median_km": self.median_km, f"{prefix}acc_25km": self.acc_25km}


def score(err_km: np.ndarray) -> Score:
    err = np.asarray(err_km, dtype=float)
    return Score(float(np.median(err)), float(np.mean(err <= 25.0)))


def errors_km(lat: np.ndarray, lon: np.ndarray, true_lat: np.ndarray, true_lon: np.ndarray) -> np.ndarray:
    return haversine_km(*(torch.as_tensor(np.asarray(a, float)) for a in (lat, lon, true_lat, true_lon))).numpy()


def best_index(scores: list[Score]) -> int:
    """The index ``RULE`` picks: the smallest key, the first such on a tie."""
    return min(range(len(scores)), key=lambda i: (scores[i].key, i))


def _choose(rows: list[dict[str, Any]], scores: list[Score]) -> int:
    i = best_index(scores)
    for j, r in enumerate(rows):
        r.update(scores[j].as_dict())
        r["chosen"] = j == i
    return i


# --- the model's own settings ----------------------------------------------------------------------------------
def _joined(preds: list[Prediction]) -> Prediction:
    """The predictions of many row blocks as one (same hypotheses layout in each)."""
    return Prediction(**{f.name: torch.cat([getattr(p, f.name) for p in preds])
                         for f in fields(Prediction) if f.name != "grid"}, grid=preds[0].grid)


def _classify(heads: GeopakHeads, e: torch.Tensor, top_provinces: int, top_cells: int, point: str,
              mode_radius_km: float, prior_correction: bool, batch: int = 64) -> list[Prediction]:
    """Mixture predictions in row blocks (the densest-cluster point compares every pair of hypotheses)."""
    return [mixture_predict(heads, e[i:i + batch], top_provinces, top_cells, prior_correction, point,
                            mode_radius_km) for i in range(0, e.shape[0], batch)]


def _latlon(preds: list[Prediction]) -> tuple[np.ndarray, np.ndarray]:
    return (torch.cat([p.lat for p in preds]).double().cpu().numpy(),
            torch.cat([p.lon for p in preds]).double().cpu().numpy())


def _set_temperatures(heads: GeopakHeads, tp: float, tc: float) -> None:
    heads.province_calibration.fill_(tp)
    heads.cell_calibration.fill_(tc)


@torch.no_grad()
def select_inference(heads: GeopakHeads, e: torch.Tensor, cell_ids: torch.Tensor, lat: np.ndarray,
                     lon: np.ndarray, gallery: Gallery | None, mode_radius_km: float = 25.0,
                     prior_correction: bool = True, batch: int = 64) -> dict[str, Any]:
    """Choose the calibration, hypotheses, point estimator and refinement on val (``RULE``, ``GRID``).

    ``e``: the val images' fused embeddings; ``cell_ids``/``lat``/``lon``: their truth. Leaves the heads'
    calibration buffers at the chosen temperatures. Returns the record ``model.pt`` keeps: the chosen
    ``inference`` settings, the ``calibration`` (fitted values, whether kept), every ``candidate`` with its val
    score, the chosen classifier's and end-to-end val scores, and the val images' predicted provinces (for the
    province baselines, which use the model's province)."""
    heads.eval()
    fitted = fit_calibration(heads, e, cell_ids, prior_correction)
    temps = {"none": (1.0, 1.0), "fitted": (fitted["province_temperature"], fitted["cell_temperature"])}
    rows, scores = [], []
    for cal in GRID["calibration"]:
        _set_temperatures(heads, *temps[cal])
        # the heads run once per calibration, with the most hypotheses; every smaller K is a restriction
        full = _classify(heads, e, max(GRID["top_provinces"]), max(GRID["top_cells"]), "mean", mode_radius_km,
                         prior_correction, batch)
        for tp in GRID["top_provinces"]:
            for tc in GRID["top_cells"]:
                for point in GRID["point"]:
                    p = [restrict(f, tp, tc, point, mode_radius_km) for f in full]
                    rows.append({"stage": "classifier", "calibration": cal, "top_provinces": tp, "top_cells": tc,
                                 "point": point})
                    scores.append(score(errors_km(*_latlon(p), lat, lon)))
    c = _choose(rows, scores)
    chosen = {k: rows[c][k] for k in CLASSIFIER_KEYS}
    _set_temperatures(heads, *temps[chosen["calibration"]])
    classifier_preds = _classify(heads, e, chosen["top_provinces"], chosen["top_cells"], chosen["point"],
                                 mode_radius_km, prior_correction, batch)
    classifier_score = score(errors_km(*_latlon(classifier_preds), lat, lon))  # as the predictor will compute it

    r_rows: list[dict[str, Any]] = [{"stage": "refinement", "refine": False}]
    r_scores = [classifier_score]
    if gallery is not None and len(gallery):
        joined = _joined(classifier_preds)  # refinement takes the whole set, in its own (larger, faster) batches
        answers = {radius: refine_settings(joined, e, gallery, radius, GRID["refine_neighbours"],
                                           GRID["refine_temperature"], mode_radius_km)
                   for radius in GRID["refine_radius_km"]}  # one candidate search per radius
        for nb in GRID["refine_neighbours"]:
            for t in GRID["refine_temperature"]:
                for radius in GRID["refine_radius_km"]:
                    la, lo = (x.numpy() for x in answers[radius][nb, t])
                    r_rows.append({"stage": "refinement", "refine": True, "refine_neighbours": nb,
                                   "refine_temperature": t, "refine_radius_km": radius})
                    r_scores.append(score(errors_km(la, lo, lat, lon)))
    r = _choose(r_rows, r_scores)
    for row in rows:
        row.update(dict.fromkeys(REFINE_KEYS))
    for row in r_rows:
        row.update({k: chosen[k] for k in CLASSIFIER_KEYS})
    refined = {k: r_rows[r].get(k) for k in REFINE_KEYS}
    inference = {"top_provinces": chosen["top_provinces"], "top_cells": chosen["top_cells"],
                 "point": chosen["point"], "refine": bool(refined["refine"])}
    if refined["refine"]:
        inference.update({k: refined[k] for k in ("refine_neighbours", "refine_temperature", "refine_radius_km")})
    kept = chosen["calibration"] == "fitted"
    return {
        "rule": RULE,
        "val_images": int(e.shape[0]),
        "inference": inference,
        "calibration": {**fitted, "kept": kept, "province_temperature_used": temps[chosen["calibration"]][0],
                        "cell_temperature_used": temps[chosen["calibration"]][1]},
        "classifier_val": classifier_score.as_dict(""),
        "val": r_scores[r].as_dict(""),
        "candidates": rows + r_rows,
        "val_pred_province": torch.cat([p.province_id for p in classifier_preds]).cpu().numpy(),
    }


def setting_scores(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting and value tried: the best val score of the candidates with that value (in the stage that
    chose it), and whether it is the chosen value. What the report shows for "every choice with its val score"."""
    out = []
    for key in (*CLASSIFIER_KEYS, *REFINE_KEYS):
        stage = "classifier" if key in CLASSIFIER_KEYS else "refinement"
        rows = [r for r in candidates if r.get("stage") == stage and r.get(key) is not None]
        chosen = next((r[key] for r in rows if r.get("chosen")), None)
        for value in dict.fromkeys(r[key] for r in rows):
            same = [r for r in rows if r[key] == value]
            best = same[best_index([Score(r["val_median_km"], r["val_acc_25km"]) for r in same])]
            out.append({"setting": key, "value": value, "chosen": value == chosen,
                        "val_median_km": best["val_median_km"], "val_acc_25km": best["val_acc_25km"]})
    return out


# --- the baselines' settings -----------------------------------------------------------------------------------
def select_baselines(train_lat: np.ndarray, train_lon: np.ndarray, train_province: np.ndarray,
                     train_features: torch.Tensor | None, val_features: torch.Tensor | None, val_lat: np.ndarray,
                     val_lon: np.ndarray, val_pred_province: np.ndarray) -> dict[str, Any]:
    """Each baseline's settings on val by ``RULE``: the kNN's k and estimator (over ``train_features``), the
    province cluster's radius; the settingless ones (province and global geometric median) get their val score.
    ``val_pred_province``: the model's predicted province of each val image (chosen classifier settings). The
    answers that depend on the training points only (per-province points, the global median) are returned too,
    so the evaluation looks them up instead of recomputing them from another copy of the training split."""
    chosen: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []

    def points(answers: dict[int, tuple[float, float]]) -> dict[str, list[float]]:
        return {str(p): [float(a[0]), float(a[1])] for p, a in sorted(answers.items())}

    med = province_geomedians(train_lat, train_lon, train_province)
    chosen["province_median"] = {"points": points(med),
                                 **score(errors_km(*at_province(med, val_pred_province), val_lat, val_lon)).as_dict()}
    g = global_geomedian(train_lat, train_lon)
    chosen["global_median"] = {"point": [g[0], g[1]], **score(errors_km(np.full(len(val_lat), g[0]),
                                                                        np.full(len(val_lon), g[1]), val_lat,
                                                                        val_lon)).as_dict()}

    c_rows, c_scores, c_points = [], [], []
    for radius in GRID["province_cluster_km"]:
        c_points.append(province_densest(train_lat, train_lon, train_province, radius))
        c_rows.append({"baseline": "province_cluster", "radius_km": radius})
        c_scores.append(score(errors_km(*at_province(c_points[-1], val_pred_province), val_lat, val_lon)))
    i = _choose(c_rows, c_scores)
    chosen["province_cluster"] = {"radius_km": c_rows[i]["radius_km"], "points": points(c_points[i]),
                                  **c_scores[i].as_dict()}
    rows += c_rows

    if train_features is not None and val_features is not None and len(train_features):
        nn = knn_neighbours(val_features, train_features, max(GRID["knn_k"]))
        k_rows, k_scores = [], []
        for k in GRID["knn_k"]:
            if k > nn.shape[1]:
                continue
            for est in (("nearest",) if k == 1 else GRID["knn_estimator"]):
                k_rows.append({"baseline": "knn", "k": k, "estimator": est})
                k_scores.append(score(errors_km(*knn_locate(nn, train_lat, train_lon, k, est), val_lat, val_lon)))
        i = _choose(k_rows, k_scores)
        chosen["knn"] = {"k": k_rows[i]["k"], "estimator": k_rows[i]["estimator"], **k_scores[i].as_dict()}
        rows += k_rows
    return {"rule": RULE, "chosen": chosen, "candidates": rows}
