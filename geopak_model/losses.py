"""Training objectives (anchor-geopak §6, anchor-phileo §3–4), with the seed's bugs fixed:

- geocell KL is a per-sample mean over the whole batch (GEOPAK summed per-province batch means);
- Köppen coarse logits are the logsumexp of member logits and coarse targets the sum of member targets
  (Phileo averaged both);
- location terms are normalised (offset error in units of the true cell's radius, auxiliary error in units of
  ``aux_scale_km``), so no raw-km term swamps the shared fusion layer's gradient (GEOPAK's aux km did, ~30×);
- the geocell target is PIGEON's haversine label smoothing over the province's cells, with a temperature tied to
  the true cell's size (GEOPAK's fixed 30-100 km τ left a 5 km urban cell ~0.15 of its own target mass);
- no "water" rule: it comes from satellite patches (Phileo); a ground photo taken at a lake is still located;
- unknown dates are masked out of the date term through a NaN-safe masked mean;
- the day of year uses a circular loss, not MSE on encoded sin/cos;
- MvMF uses the exact vMF log-normaliser log(κ / (4π sinh κ)), ``log_softmax`` weights and clamped κ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from geopak_model.cells import CellTable
from geopak_model.config import LossConfig
from geopak_model.geo import haversine_km, haversine_term
from pipeline.core.koppen_classes import FINE_TO_COARSE, NUM_COARSE_GROUPS, NUM_KOPPEN_CLASSES
from pipeline.core.provinces import PROVINCES

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


def smoothed_cell_target(lat: torch.Tensor, lon: torch.Tensor, cell_ids: torch.Tensor, province_ids: torch.Tensor,
                         ctx: "LossContext", cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PIGEON's haversine smoothing: over the cells of the sample's province (local ids, padded to W),
    q_j ∝ exp(−(d(x, c_j) − d(x, c_true)) / τ), x the true point, c the cell centres.

    τ = clamp(``smooth_radius_factor`` · r_true, ``smooth_min_km``, τ_province): tied to the true cell's size, so
    a 5 km urban cell keeps most of its own mass while a 50 km rural cell shares it with its neighbours.
    Returns the (B, W) target and the true cell's share of it (B,) for the logs.
    """
    glob = ctx.local_to_global[province_ids]  # (B, W) global ids, −1 padded
    valid = glob >= 0
    safe = glob.clamp(min=0)
    lat64, lon64 = lat.double()[:, None], lon.double()[:, None]
    d = haversine_km(lat64, lon64, ctx.cell_lat[safe].double(), ctx.cell_lon[safe].double())
    d_true = haversine_km(lat.double(), lon.double(), ctx.cell_lat[cell_ids].double(),
                          ctx.cell_lon[cell_ids].double())
    r = ctx.cell_radius_km[cell_ids].double()
    tau = (cfg.smooth_radius_factor * r).clamp(min=cfg.smooth_min_km)
    tau = torch.minimum(tau, ctx.province_tau_km[province_ids].double())
    logits = (-(d - d_true[:, None]) / tau[:, None]).masked_fill(~valid, float("-inf"))
    q = torch.softmax(logits, dim=-1).float()
    true_local = ctx.cell_local[cell_ids]
    return q, q.gather(1, true_local[:, None]).squeeze(1)


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
    half a year off, smooth and periodic. NaN targets (unknown day) must be masked out.

    Summed over the known dates and divided by the whole batch (an unknown date counts 0), not by the number of
    known dates: a per-sample mean, so the mean over DDP ranks equals the single-process loss whatever the
    ranks' shares of dated photos."""
    pred = pred.float()
    unit = pred / pred.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    cos_delta = unit[:, 0] * torch.nan_to_num(doy_sin.float()) + unit[:, 1] * torch.nan_to_num(doy_cos.float())
    mask = sample_mask.to(torch.bool)
    per = torch.where(mask, 1.0 - cos_delta, torch.zeros_like(cos_delta))
    return per.sum() / max(1, per.shape[0])


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
    """What the loss needs besides model outputs: class weights and the cell geometry (tensors)."""

    class_weights: torch.Tensor | None  # (7,)
    local_to_global: torch.Tensor  # (7, W) global cell id of each province's local cell, −1 padded
    cell_local: torch.Tensor  # (N,) local id of each cell
    cell_lat: torch.Tensor  # (N,) centres, degrees (float64)
    cell_lon: torch.Tensor
    cell_radius_km: torch.Tensor  # (N,)
    province_tau_km: torch.Tensor  # (7,) upper bound of the smoothing temperature

    @classmethod
    def build(cls, cells: CellTable, class_weights: np.ndarray | None, cfg: LossConfig) -> "LossContext":
        tau = torch.tensor([float(cfg.tau_km.get(p.key, 50.0)) for p in PROVINCES], dtype=torch.float64)
        if (tau <= 0).any() or cfg.smooth_radius_factor <= 0 or cfg.smooth_min_km <= 0:
            raise ValueError("smoothing temperatures (tau_km, smooth_radius_factor, smooth_min_km) must be positive")
        return cls(
            class_weights=None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32),
            local_to_global=torch.from_numpy(cells.local_to_global()),
            cell_local=torch.from_numpy(cells.local_id.copy()),
            cell_lat=torch.from_numpy(cells.center_lat.astype(np.float64)),
            cell_lon=torch.from_numpy(cells.center_lon.astype(np.float64)),
            cell_radius_km=torch.from_numpy(cells.radius_km.astype(np.float64)),
            province_tau_km=tau,
        )

    def to(self, device: torch.device) -> "LossContext":
        return LossContext(*(None if v is None else v.to(device) for v in (
            self.class_weights, self.local_to_global, self.cell_local, self.cell_lat, self.cell_lon,
            self.cell_radius_km, self.province_tau_km)))


def weighted_terms(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], ctx: LossContext,
                   cfg: LossConfig, offset_weight: float = 1.0
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every loss term the outputs allow (unweighted, graph-connected) and its weight in the total.

    Terms with weight 0 are monitors, logged but not optimised: ``offset_km``/``aux_km`` (the errors in km) and
    ``target_true_mass`` (the true cell's share of the smoothed target).
    """
    terms: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    terms["province"] = province_loss(out["province_logits"], batch["province_id"], ctx.class_weights)
    weights["province"] = cfg.province
    everyone = torch.ones_like(batch["province_id"], dtype=torch.bool)
    if "cell_logits" in out:
        q, true_mass = smoothed_cell_target(batch["lat"], batch["lon"], batch["cell_id"], batch["province_id"],
                                            ctx, cfg)
        terms["cell"] = geocell_kl(out["cell_logits"], out["cell_mask"], q, everyone)
        weights["cell"] = cfg.cell
        terms["target_true_mass"], weights["target_true_mass"] = true_mass.mean(), 0.0
    if "offset_lat" in out:
        km = haversine_km(out["offset_lat"].float(), out["offset_lon"].float(), batch["lat"].float(),
                          batch["lon"].float())
        r = ctx.cell_radius_km[batch["cell_id"]].float().clamp(min=cfg.offset_min_radius_km)
        terms["offset"] = masked_mean(km / r, everyone)
        weights["offset"] = cfg.offset * offset_weight
        terms["offset_km"], weights["offset_km"] = km.mean(), 0.0
    if "aux_lat" in out:
        km = haversine_km(out["aux_lat"].float(), out["aux_lon"].float(), batch["lat"].float(), batch["lon"].float())
        terms["aux"] = masked_mean(km / cfg.aux_scale_km, everyone)
        weights["aux"] = cfg.aux
        terms["aux_km"], weights["aux_km"] = km.mean(), 0.0
    if "koppen_logits" in out:
        terms["koppen"], _ = koppen_loss(out["koppen_logits"], batch["koppen_id"], cfg.koppen_fine_weight,
                                         cfg.koppen_coarse_weight)
        weights["koppen"] = cfg.koppen
    if "doy" in out:
        known = torch.isfinite(batch["doy_sin"]) & torch.isfinite(batch["doy_cos"])
        terms["doy"] = doy_loss(out["doy"], batch["doy_sin"], batch["doy_cos"], known)
        weights["doy"] = cfg.doy
    if "mvmf_logits" in out:
        terms["mvmf"] = mvmf_nll(out["mvmf_logits"], out["mvmf_log_kappa"], out["mvmf_centres"], batch["lat"],
                                 batch["lon"], everyone)
        weights["mvmf"] = cfg.mvmf
    return terms, weights


def loss_terms(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], ctx: LossContext, cfg: LossConfig,
               offset_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of every term the outputs allow, and each term's value (unweighted, detached, 0-dim, on the
    device) plus ``total`` for the logs: a training loop adds these up on the device and reads them once."""
    terms, weights = weighted_terms(out, batch, ctx, cfg, offset_weight)
    total = terms["province"].new_zeros(())
    for k, v in terms.items():
        if weights[k]:
            total = total + weights[k] * v
    logged = {k: v.detach() for k, v in terms.items()}
    logged["total"] = total.detach()
    return total, logged


def total_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], ctx: LossContext, cfg: LossConfig,
               offset_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """``loss_terms`` with the logged values as floats (one host read for all of them)."""
    total, logged = loss_terms(out, batch, ctx, cfg, offset_weight)
    values = torch.stack([v.double() for v in logged.values()]).tolist()
    return total, dict(zip(logged, values))
