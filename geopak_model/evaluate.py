"""End-to-end validation: the same mixture inference the predictor uses, plus the losses and the baselines.

``val_joint_nll`` (−log P(true cell) under P(province)·P(cell | province), prior-corrected) and
``val_province_nll`` are the checkpoint-selection criteria: a log-likelihood averages every image's evidence,
where the median error over a few hundred images swings by tens of km between epochs of equal loss.

Oracle numbers (true cell + predicted offset, what GEOPAK logged and selected on) are reported under keys
starting with ``oracle_`` and never used for model selection.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from geopak_model import precision
from geopak_model.config import InferenceConfig, LossConfig
from geopak_model.data import FeatureData
from geopak_model.geo import haversine_km
from geopak_model.inference import head_log_probs, mixture_predict, true_cell_log_probs
from geopak_model.losses import LossContext, loss_terms
from geopak_model.model import GeopakHeads
from geopak_model.report import ACC_KM



def error_summary(err_km: np.ndarray, prefix: str) -> dict[str, float]:
    err = np.asarray(err_km, dtype=float)
    if not len(err):
        return {}
    out = {f"{prefix}median_km": float(np.median(err)), f"{prefix}mean_km": float(err.mean()),
           f"{prefix}p90_km": float(np.percentile(err, 90))}
    out.update({f"{prefix}acc_{k}km": float((err <= k).mean()) for k in ACC_KM})
    return out


@torch.no_grad()
def evaluate_features(heads: GeopakHeads, data: FeatureData, ctx: LossContext, loss_cfg: LossConfig,
                      inf: InferenceConfig, device: torch.device, batch_size: int = 512, amp: bool = False,
                      amp_dtype: str = "auto",
                      parts: tuple[str, ...] = ()) -> dict[str, float]:
    """Validation metrics ``val_*`` over every row of ``data``."""
    was_training = heads.training
    heads.eval()
    errs, top_errs, oracle_errs, prov_ok, cell_ok = [], [], [], [], []
    loss_sums: dict[str, torch.Tensor] = {}
    n = len(data)
    for start in range(0, n, batch_size):  # everything stays on the device until the end: one host read
        rows = torch.arange(start, min(n, start + batch_size))
        b = data.batch(rows, device)
        with precision.autocast(device, precision.amp_dtype(device, amp, amp_dtype)):
            out = heads(b["clip"], b["scene"], b["province_id"], b["cell_id"], parts)
            _, logged = loss_terms(out, b, ctx, loss_cfg)
            for k, v in logged.items():
                loss_sums[k] = loss_sums.get(k, 0.0) + v.double() * len(rows)
            logp = head_log_probs(heads, out["embedding"], inf.prior_correction, out)  # the logits above
            pred = mixture_predict(heads, out["embedding"], inf.top_provinces, inf.top_cells, inf.prior_correction,
                                   inf.point, inf.mode_radius_km, logp)
            # the checkpoint-selection criteria (val_joint_nll, val_province_nll): −log-likelihoods of the truth
            # under the inference distribution
            nll = {"joint_nll": -true_cell_log_probs(heads, out["embedding"], b["cell_id"], log_probs=logp),
                   "province_nll": -logp[0].gather(1, b["province_id"][:, None]).clamp(min=-50.0)}
            for k, v in nll.items():
                loss_sums[k] = loss_sums.get(k, 0.0) + v.double().sum()
        lat, lon = b["lat"].double(), b["lon"].double()
        errs.append(haversine_km(pred.lat.double(), pred.lon.double(), lat, lon))
        top_errs.append(haversine_km(pred.top_lat.double(), pred.top_lon.double(), lat, lon))
        if "offset_lat" in out:
            oracle_errs.append(haversine_km(out["offset_lat"].double(), out["offset_lon"].double(), lat, lon))
        prov_ok.append(pred.province_id == b["province_id"])
        cell_ok.append(pred.top_cell == b["cell_id"])
    if was_training:
        heads.train()
    if not n:
        return {"val_images": 0.0, "val_province_acc": float("nan"), "val_cell_acc": float("nan")}
    sums = dict(zip(loss_sums, torch.stack(list(loss_sums.values())).cpu().tolist())) if loss_sums else {}
    metrics = {f"val_{k}": v / n for k, v in sums.items()}
    metrics["val_images"] = float(n)
    metrics["val_province_acc"] = float(torch.cat(prov_ok).float().mean())
    metrics["val_cell_acc"] = float(torch.cat(cell_ok).float().mean())
    metrics.update(error_summary(torch.cat(errs).cpu().numpy(), "val_"))
    metrics.update(error_summary(torch.cat(top_errs).cpu().numpy(), "val_top1_"))
    if oracle_errs:
        metrics.update(error_summary(torch.cat(oracle_errs).cpu().numpy(), "oracle_val_"))
    return metrics


def majority_baselines(train: pd.DataFrame, val: pd.DataFrame, cell_lat: np.ndarray, cell_lon: np.ndarray
                       ) -> dict[str, float]:
    """Most frequent training province and cell, and the constant guess at that cell's centre, on val."""
    if not len(val) or not len(train):
        return {}
    prov = int(train["province_id"].value_counts().idxmax())
    cell = int(train["cell_id"].value_counts().idxmax())
    err = haversine_km(torch.tensor(val["lat"].to_numpy(float)), torch.tensor(val["lon"].to_numpy(float)),
                       torch.full((len(val),), float(cell_lat[cell]), dtype=torch.float64),
                       torch.full((len(val),), float(cell_lon[cell]), dtype=torch.float64)).numpy()
    out = {"majority_province": prov, "majority_cell": cell,
           "majority_province_acc": float((val["province_id"] == prov).mean()),
           "majority_cell_acc": float((val["cell_id"] == cell).mean())}
    out.update(error_summary(err, "majority_cell_centre_"))
    return out

