"""Training objectives (anchor-geopak §6, anchor-phileo §3–4), with the seed's bugs fixed:

- geocell KL is a per-sample mean over the whole batch (GEOPAK summed per-province batch means);
- Köppen coarse logits are the logsumexp of member logits and coarse targets the sum of member targets
  (Phileo averaged both);
- water-only samples (Köppen 0) skip the location and date terms through a NaN-safe masked mean, and a batch
  without any valid sample contributes 0 with a connected graph, not NaN;
- the day of year uses a circular loss, not MSE on encoded sin/cos;
- MvMF uses the exact vMF log-normaliser log(κ / (4π sinh κ)), ``log_softmax`` weights and clamped κ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from geopak_model.config import LossConfig
from geopak_model.geo import haversine_km, haversine_term
from pipeline.labels.koppen import FINE_TO_COARSE, NUM_COARSE_GROUPS, NUM_KOPPEN_CLASSES

LOG_4PI = math.log(4 * math.pi)


def effective_number_weights(counts: np.ndarray, beta: float) -> np.ndarray:
    """Class weights 1/E_n with E_n = (1 − βⁿ)/(1 − β) (Cui et al. 2019), normalised to mean 1 over classes
    present; absent classes get weight 0 (they never occur as targets)."""
    counts = np.asarray(counts, dtype=np.float64)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    present = counts > 0
    eff = np.where(present, (1.0 - np.power(beta, counts)) / (1.0 - beta), np.inf)
    w = np.where(present, 1.0 / eff, 0.0)
    return w / w[present].mean() if present.any() else w


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; NaN/inf outside the mask never leak (where, not multiply); 0 if empty."""
    mask = mask.to(torch.bool)
    safe = torch.where(mask, values, torch.zeros_like(values))
    return safe.sum() / mask.sum().clamp(min=1).to(values.dtype)


def province_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over samples of w[y]·CE. Dividing by the batch size rather than Σw (``F.cross_entropy``'s weighted
    mean) keeps the loss a per-sample mean, so the mean over DDP ranks equals the single-process loss."""
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * class_weights[target]).mean() if class_weights is not None else ce.mean()


def smoothed_cell_target(target_idx: torch.Tensor, target_w: torch.Tensor, width: int) -> torch.Tensor:
    """Dense (B, width) target from per-sample (local ids, weights) of the true cell and its neighbours."""
    q = target_w.new_zeros((target_idx.shape[0], width))
    return q.scatter_add_(1, target_idx, target_w)


def geocell_kl(logits: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, sample_mask: torch.Tensor
               ) -> torch.Tensor:
    """KL(q ‖ softmax(logits)) per sample over its province's cells, averaged over the valid samples."""
    logp = torch.log_softmax(logits.float().masked_fill(~mask, float("-inf")), dim=-1)
    logp = logp.masked_fill(~mask, 0.0)
    kl = (torch.xlogy(target, target) - target * logp).sum(dim=-1)
    return masked_mean(kl, sample_mask)


def haversine_loss(lat: torch.Tensor, lon: torch.Tensor, true_lat: torch.Tensor, true_lon: torch.Tensor,
                   sample_mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(haversine_km(lat.float(), lon.float(), true_lat.float(), true_lon.float()), sample_mask)


_COARSE_MEMBERS = torch.from_numpy(np.eye(NUM_COARSE_GROUPS, dtype=np.float32)[FINE_TO_COARSE.astype(np.int64)])


def koppen_loss(logits: torch.Tensor, target: torch.Tensor, fine_weight: float = 0.5, coarse_weight: float = 0.5
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine CE + coarse CE. ``target`` is class ids (B,) or class fractions (B, 31).

    The coarse logit of a group is logsumexp of its members' logits, so softmax over groups equals the summed
    fine probabilities; the coarse target is the sum of member targets. Returns (weighted sum, coarse CE).
    """
    logits = logits.float()
    probs = F.one_hot(target.long(), NUM_KOPPEN_CLASSES).float() if target.dim() == 1 else target.float()
    members = _COARSE_MEMBERS.to(logits.device)  # (31, 6) one-hot group of each fine class
    fine_logp = torch.log_softmax(logits, dim=-1)
    coarse_logits = torch.logsumexp(logits[:, :, None].masked_fill(members[None] == 0, float("-inf")), dim=1)
    coarse_logp = torch.log_softmax(coarse_logits, dim=-1)
    coarse_t = probs @ members
    fine_ce = -(probs * fine_logp).sum(-1).mean()
    coarse_ce = -(coarse_t * coarse_logp).sum(-1).mean()
    return fine_weight * fine_ce + coarse_weight * coarse_ce, coarse_ce


def doy_loss(pred: torch.Tensor, doy_sin: torch.Tensor, doy_cos: torch.Tensor, sample_mask: torch.Tensor
             ) -> torch.Tensor:
    """1 − cos(Δθ) between the predicted direction (sin, cos) and the true day's angle: 0 when right, 2 when
    half a year off, smooth and periodic. NaN targets (unknown day) must be masked out."""
    pred = pred.float()
    unit = pred / pred.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    cos_delta = unit[:, 0] * torch.nan_to_num(doy_sin.float()) + unit[:, 1] * torch.nan_to_num(doy_cos.float())
    return masked_mean(1.0 - cos_delta, sample_mask)


def log_vmf_density(log_kappa: torch.Tensor, hav: torch.Tensor) -> torch.Tensor:
    """log f(x) = log C(κ) + κ μ·x of a vMF on S², per steradian, with C(κ) = κ / (4π sinh κ) exact.

    Written as log κ − log 4π + log 2 − log(1 − e^{−2κ}) − 2κ·hav(θ) (κ μ·x − log sinh κ cancels κ
    analytically; μ·x − 1 = −2·hav(θ)), so nothing overflows at κ ≈ 10⁶ and metres still count.
    """
    kappa = torch.exp(log_kappa)
    return log_kappa - LOG_4PI + math.log(2.0) - torch.log(-torch.expm1(-2.0 * kappa)) - 2.0 * kappa * hav


def mvmf_nll(logits: torch.Tensor, log_kappa: torch.Tensor, centres: torch.Tensor, lat: torch.Tensor,
             lon: torch.Tensor, sample_mask: torch.Tensor) -> torch.Tensor:
    """−log Σ_j w_j f_j(x) with w = softmax(logits) taken as log_softmax, masked mean over samples."""
    hav = haversine_term(lat.float()[:, None], lon.float()[:, None], centres[None, :, 0], centres[None, :, 1])
    log_comp = log_vmf_density(log_kappa.float()[None, :], hav)
    nll = -torch.logsumexp(torch.log_softmax(logits.float(), dim=-1) + log_comp, dim=-1)
    return masked_mean(nll, sample_mask)


@dataclass
class LossContext:
    """What the loss needs besides model outputs: class weights and the per-cell smoothed targets (tensors)."""

    class_weights: torch.Tensor | None
    target_idx: torch.Tensor  # (N_cells, K+1) local ids
    target_w: torch.Tensor  # (N_cells, K+1)

    def to(self, device: torch.device) -> "LossContext":
        cw = None if self.class_weights is None else self.class_weights.to(device)
        return LossContext(cw, self.target_idx.to(device), self.target_w.to(device))


def weighted_terms(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], ctx: LossContext,
                   cfg: LossConfig, offset_weight: float = 1.0
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every loss term the outputs allow (unweighted, graph-connected) and its weight in the total."""
    terms: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    terms["province"] = province_loss(out["province_logits"], batch["province_id"], ctx.class_weights)
    weights["province"] = cfg.province
    located = torch.ones_like(batch["province_id"], dtype=torch.bool)
    if cfg.water_skips_location and "koppen_id" in batch:
        located = batch["koppen_id"] != 0
    if "cell_logits" in out:
        cells = batch["cell_id"]
        q = smoothed_cell_target(ctx.target_idx[cells], ctx.target_w[cells], out["cell_logits"].shape[1])
        terms["cell"] = geocell_kl(out["cell_logits"], out["cell_mask"], q, located)
        weights["cell"] = cfg.cell
    if "offset_lat" in out:
        terms["offset_km"] = haversine_loss(out["offset_lat"], out["offset_lon"], batch["lat"], batch["lon"], located)
        weights["offset_km"] = cfg.offset * offset_weight
    if "aux_lat" in out:
        terms["aux_km"] = haversine_loss(out["aux_lat"], out["aux_lon"], batch["lat"], batch["lon"], located)
        weights["aux_km"] = cfg.aux
    if "koppen_logits" in out:
        terms["koppen"], _ = koppen_loss(out["koppen_logits"], batch["koppen_id"], cfg.koppen_fine_weight,
                                         cfg.koppen_coarse_weight)
        weights["koppen"] = cfg.koppen
    if "doy" in out:
        known = located & torch.isfinite(batch["doy_sin"]) & torch.isfinite(batch["doy_cos"])
        terms["doy"] = doy_loss(out["doy"], batch["doy_sin"], batch["doy_cos"], known)
        weights["doy"] = cfg.doy
    if "mvmf_logits" in out:
        terms["mvmf"] = mvmf_nll(out["mvmf_logits"], out["mvmf_log_kappa"], out["mvmf_centres"], batch["lat"],
                                 batch["lon"], located)
        weights["mvmf"] = cfg.mvmf
    return terms, weights


def total_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], ctx: LossContext, cfg: LossConfig,
               offset_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of every term the outputs allow, and each term's value (unweighted) for the logs."""
    terms, weights = weighted_terms(out, batch, ctx, cfg, offset_weight)
    total = terms["province"].new_zeros(())
    for k, v in terms.items():
        if weights[k]:
            total = total + weights[k] * v
    logged = {k: float(v.detach()) for k, v in terms.items()}
    logged["total"] = float(total.detach())
    return total, logged
