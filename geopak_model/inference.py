"""Mixture-of-hypotheses prediction (anchor-geopak §8), the one inference path for validation and prediction.

Top-P provinces × top-C cells of each; every hypothesis is the cell centre plus the radius-bounded offset
predicted for that cell; weights P(province)·P(cell | province), normalised. Provinces without cells cannot host a
hypothesis and are skipped.

The point estimate is never the probability-weighted mean (GEOPAK's): with hypotheses in two cities the mean lands
between them, where nobody took the photo. ``point`` chooses a mode-seeking estimate instead:

- ``geomedian``: the spherical geometric median of the weighted hypotheses (Weiszfeld), the point that minimises
  the expected great-circle error under the model's own distribution; it moves to a city once that city holds
  more than half the mass, and stays central while the model is unsure;
- ``mode``: the densest cluster, the hypothesis with the most weight within ``mode_radius_km``, refined to the
  weighted mean of that cluster (best for the share within a few km, worse for the median when unsure);
- ``mean``: the old weighted mean, kept only to measure the others against.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from geopak_model.geo import unit_xyz, xyz_to_latlon
from geopak_model.model import GeopakHeads
from pipeline.core.gazetteer import EARTH_RADIUS_KM


POINT_METHODS = ("geomedian", "mode", "mean")


@dataclass
class Prediction:
    lat: torch.Tensor  # (B,) point estimate (``point`` method)
    lon: torch.Tensor
    mean_lat: torch.Tensor  # (B,) probability-weighted mean of the hypotheses, for comparison only
    mean_lon: torch.Tensor
    province_probs: torch.Tensor  # (B, 7), prior-corrected
    province_id: torch.Tensor  # (B,) argmax province
    top_cell: torch.Tensor  # (B,) global id of the most probable hypothesis
    hyp_cell: torch.Tensor  # (B, H) global cell ids (−1 = none)
    hyp_province: torch.Tensor  # (B, H)
    hyp_weight: torch.Tensor  # (B, H) normalised P(prov)·P(cell | prov)
    hyp_lat: torch.Tensor  # (B, H)
    hyp_lon: torch.Tensor
    coverage: torch.Tensor  # (B,) unnormalised Σ P(prov)·P(cell | prov) over the hypotheses (the mass they hold)
    grid: tuple[int, int] = (0, 0)  # the hypotheses' layout: (provinces, cells per province), row-major

    @property
    def top_lat(self) -> torch.Tensor:
        return self.hyp_lat.gather(1, self.hyp_weight.argmax(1, keepdim=True)).squeeze(1)

    @property
    def top_lon(self) -> torch.Tensor:
        return self.hyp_lon.gather(1, self.hyp_weight.argmax(1, keepdim=True)).squeeze(1)


def province_log_probs(heads: GeopakHeads, e: torch.Tensor, prior_correction: bool = True) -> torch.Tensor:
    """log P(province | image) at inference: temperature-calibrated, then prior-corrected (optionally).

    The prior shift log(true prior / trained prior) is a change of the class prior, which Bayes' rule adds to the
    calibrated log-odds; dividing it by the temperature (the old order) would shrink the correction whenever the
    temperature is above 1."""
    return _province_logp(heads, heads.province_logits(e).float(), prior_correction)


def _province_logp(heads: GeopakHeads, logits: torch.Tensor, prior_correction: bool) -> torch.Tensor:
    logits = logits / heads.province_calibration
    if prior_correction:
        logits = logits + heads.province_prior_shift
    return torch.log_softmax(logits, dim=-1)


def _cell_logp(heads: GeopakHeads, logits_all: torch.Tensor, mask_all: torch.Tensor) -> torch.Tensor:
    """log P(cell | province, image) for every province: (B, 7, W), −inf on padding; temperature-calibrated."""
    logits_all = logits_all / heads.cell_calibration
    return torch.log_softmax(logits_all.masked_fill(~mask_all[None], float("-inf")), dim=-1)


LogProbs = tuple[torch.Tensor, torch.Tensor]  # (log P(province) (B, 7), log P(cell | province) (B, 7, W))


def head_log_probs(heads: GeopakHeads, e: torch.Tensor, prior_correction: bool = True,
                   out: dict[str, torch.Tensor] | None = None) -> LogProbs:
    """Both inference log-probabilities of ``e``, from the logits ``out`` (``heads(...)``'s output for ``e``)
    already holds where it has them: validation runs the heads once per batch, not once per use."""
    out = out or {}
    p_logits = out["province_logits"] if "province_logits" in out else heads.province_logits(e)
    c_logits = (out["cell_logits_all"], out["cell_mask_all"]) if "cell_logits_all" in out else \
        heads.cell_logits_all(e)
    return _province_logp(heads, p_logits.float(), prior_correction), _cell_logp(heads, *c_logits)


def joint_log_probs(province_logp: torch.Tensor, cell_logp: torch.Tensor, heads: GeopakHeads) -> torch.Tensor:
    """log P(province)·P(cell | province) over the global cells: (B, N)."""
    glob = heads.local_to_global  # (7, W)
    valid = glob >= 0
    joint = province_logp[:, :, None] + cell_logp  # (B, 7, W)
    out = joint.new_full((joint.shape[0], heads.cell_lat.shape[0]), float("-inf"))
    out[:, glob[valid]] = joint[:, valid]
    return out


TEMPERATURE_BOUNDS = (0.05, 20.0)  # the continuous fit's search interval; an optimum at either end is flagged


def true_cell_log_probs(heads: GeopakHeads, e: torch.Tensor, cell_ids: torch.Tensor,
                        prior_correction: bool = True, log_probs: LogProbs | None = None) -> torch.Tensor:
    """log P(province of the true cell) + log P(true cell | that province) per row, clamped at −50 so a cell the
    model rules out (a province without training images) costs a large but finite amount. ``log_probs``: those
    of ``e`` (``head_log_probs``) when the caller has them."""
    joint = joint_log_probs(*(log_probs or head_log_probs(heads, e, prior_correction)), heads)
    return joint.gather(1, cell_ids[:, None]).squeeze(1).clamp(min=-50.0)


@torch.no_grad()
def fit_calibration(heads: GeopakHeads, e: torch.Tensor, cell_ids: torch.Tensor, prior_correction: bool = True
                    ) -> dict[str, float | bool]:
    """Temperature scaling (Guo et al. 2017) of the province and cell logits on held-out images, fitted
    continuously: the temperatures that minimise the negative log-likelihood of the true cell under
    P(province)·P(cell | province).

    The NLL separates into a province term (in the province temperature) and a cell term (in the cell
    temperature), each convex in 1/T, so each is a bounded 1-D minimisation over log T in ``TEMPERATURE_BOUNDS``;
    an optimum at a bound is reported (``*_at_bound``), never silently used as if interior. Sets the heads'
    buffers and returns the temperatures with the NLL before and after. Whether the fit is KEPT is not decided
    here: ``selection.select_inference`` keeps it only if it improves the selection metric on val."""
    from scipy.optimize import minimize_scalar

    old = float(heads.province_calibration), float(heads.cell_calibration)
    p_logits, (c_logits, c_mask) = heads.province_logits(e).float(), heads.cell_logits_all(e)  # once, not per T

    def nll(tp: float, tc: float) -> float:
        heads.province_calibration.fill_(tp)
        heads.cell_calibration.fill_(tc)
        joint = joint_log_probs(_province_logp(heads, p_logits, prior_correction),
                                _cell_logp(heads, c_logits, c_mask), heads)
        return float(-joint.gather(1, cell_ids[:, None]).clamp(min=-50.0).mean())

    before = nll(1.0, 1.0)
    lo, hi = math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1])
    # the province term varies with tp only (tc fixed at 1) and the cell term with tc only (tp fixed at the fit)
    tp = round(math.exp(minimize_scalar(lambda x: nll(math.exp(x), 1.0), bounds=(lo, hi), method="bounded",
                                        options={"xatol": 1e-4}).x), 4)
    tc = round(math.exp(minimize_scalar(lambda x: nll(tp, math.exp(x)), bounds=(lo, hi), method="bounded",
                                        options={"xatol": 1e-4}).x), 4)
    after = nll(tp, tc)  # leaves the buffers at the fitted (rounded) temperatures
    if not math.isfinite(after):
        heads.province_calibration.fill_(old[0])
        heads.cell_calibration.fill_(old[1])
        raise ValueError("calibration NLL is not finite")

    def at_bound(t: float) -> bool:
        return abs(math.log(t) - lo) < 1e-2 or abs(math.log(t) - hi) < 1e-2

    return {"province_temperature": tp, "cell_temperature": tc,
            "province_temperature_at_bound": at_bound(tp), "cell_temperature_at_bound": at_bound(tc),
            "val_cell_nll_uncalibrated": before, "val_cell_nll_calibrated": after}


def weighted_mean(lat: torch.Tensor, lon: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean on the sphere of (B, H) points."""
    return xyz_to_latlon((weight[..., None] * unit_xyz(lat, lon)).sum(-2))


def geometric_median(lat: torch.Tensor, lon: torch.Tensor, weight: torch.Tensor, iters: int = 50
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted geometric median of (B, H) points on the sphere: Weiszfeld's iteration on unit vectors (chordal
    distance, which ranks like the great-circle one at these scales), started at the weighted mean."""
    u = unit_xyz(lat.double(), lon.double())
    w = weight.double()
    x = torch.nn.functional.normalize((w[..., None] * u).sum(-2), dim=-1)
    for _ in range(iters):
        d = (u - x[..., None, :]).norm(dim=-1).clamp(min=1e-9)  # (B, H)
        x = torch.nn.functional.normalize(((w / d)[..., None] * u).sum(-2), dim=-1)
    mlat, mlon = xyz_to_latlon(x)
    return mlat.to(lat.dtype), mlon.to(lon.dtype)


def densest_cluster(lat: torch.Tensor, lon: torch.Tensor, weight: torch.Tensor, radius_km: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The hypothesis with the most weight within ``radius_km`` of it, refined to the weighted mean of the
    hypotheses in that radius: the densest cluster, not a point between clusters."""
    # within radius_km on the sphere <=> chord between unit vectors <= 2 sin(r / 2R): one batched cdist, no
    # trigonometry per pair (this runs for every candidate setting the val selection tries)
    u = unit_xyz(lat.double(), lon.double())
    chord = 2.0 * math.sin(radius_km / (2.0 * EARTH_RADIUS_KM))
    near = (torch.cdist(u, u) <= chord).to(weight.dtype)  # (B, H, H)
    density = torch.bmm(near, weight[:, :, None]).squeeze(-1)
    best = density.argmax(1)
    members = near[torch.arange(lat.shape[0]), best] * weight  # (B, H)
    return weighted_mean(lat, lon, members / members.sum(1, keepdim=True).clamp(min=1e-12))


def point_estimate(lat: torch.Tensor, lon: torch.Tensor, weight: torch.Tensor, method: str = "geomedian",
                   radius_km: float = 25.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One point per row of weighted (B, H) hypotheses (zero weight = absent); ``method`` in ``POINT_METHODS``."""
    if method == "geomedian":
        return geometric_median(lat, lon, weight)
    if method == "mode":
        return densest_cluster(lat, lon, weight, radius_km)
    if method == "mean":
        return weighted_mean(lat, lon, weight)
    raise ValueError(f"point method must be one of {POINT_METHODS}, got {method!r}")


@torch.no_grad()
def mixture_predict(heads: GeopakHeads, e: torch.Tensor, top_provinces: int = 2, top_cells: int = 5,
                    prior_correction: bool = True, point: str = "geomedian", mode_radius_km: float = 25.0,
                    log_probs: LogProbs | None = None) -> Prediction:
    """Predict from the fused embedding ``e`` (B, d) (``heads.fuse`` of the encoder features); ``log_probs``:
    ``head_log_probs`` of ``e`` with the same ``prior_correction`` when the caller has them."""
    prov_logp, all_cell_logp = log_probs or head_log_probs(heads, e, prior_correction)
    has_cells = heads.cells_per_province > 0
    sel_logp = prov_logp.masked_fill(~has_cells[None, :], float("-inf"))
    k_p = min(top_provinces, int(has_cells.sum()))
    p_logp, p_ids = sel_logp.topk(k_p, dim=1)  # (B, Kp)

    cell_logp = all_cell_logp.gather(1, p_ids[:, :, None].expand(-1, -1, all_cell_logp.shape[-1]))  # (B, Kp, W)
    k_c = min(top_cells, cell_logp.shape[-1])
    c_logp, c_local = cell_logp.topk(k_c, dim=-1)  # (B, Kp, Kc); −inf where a province has fewer cells
    glob = heads.local_to_global[p_ids[:, :, None].expand(-1, -1, k_c), c_local]  # (B, Kp, Kc), −1 invalid
    joint = p_logp[:, :, None] + c_logp
    valid = (glob >= 0) & torch.isfinite(joint)
    joint = joint.masked_fill(~valid, float("-inf"))

    b = e.shape[0]
    cells = glob.clamp(min=0).reshape(b, -1)
    lat, lon = heads.offsets(e, cells)
    weight = torch.softmax(joint.reshape(b, -1), dim=-1)  # normalised P(prov)·P(cell|prov) over hypotheses
    coverage = torch.logsumexp(joint.reshape(b, -1), dim=-1).exp()
    mean_lat, mean_lon = weighted_mean(lat, lon, weight)
    plat, plon = point_estimate(lat, lon, weight, point, mode_radius_km)
    flat_valid = valid.reshape(b, -1)
    return Prediction(
        lat=plat, lon=plon, mean_lat=mean_lat, mean_lon=mean_lon, province_probs=prov_logp.exp(), province_id=prov_logp.argmax(1),
        top_cell=cells.gather(1, weight.argmax(1, keepdim=True)).squeeze(1),
        hyp_cell=torch.where(flat_valid, cells, torch.full_like(cells, -1)),
        hyp_province=p_ids[:, :, None].expand(-1, -1, k_c).reshape(b, -1),
        hyp_weight=weight, hyp_lat=lat, hyp_lon=lon, coverage=coverage, grid=(k_p, k_c),
    )


def restrict(pred: Prediction, top_provinces: int, top_cells: int, point: str = "geomedian",
             mode_radius_km: float = 25.0) -> Prediction:
    """What ``mixture_predict`` gives with ``top_provinces`` × ``top_cells`` hypotheses, taken from a prediction
    of the same heads with at least as many (its first provinces and cells: both are in descending order), the
    weights renormalised and the point estimated by ``point``: the val selection tries every K and point
    estimator without running the heads again."""
    kp, kc = pred.grid
    tp, tc = min(top_provinces, kp), min(top_cells, kc)
    b = pred.lat.shape[0]

    def cut(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, kp, kc)[:, :tp, :tc].reshape(b, -1)

    held = cut(pred.hyp_weight)
    mass = held.sum(1)
    weight = held / mass[:, None].clamp(min=1e-30)
    lat, lon, cells = cut(pred.hyp_lat), cut(pred.hyp_lon), cut(pred.hyp_cell)
    mean_lat, mean_lon = weighted_mean(lat, lon, weight)
    plat, plon = point_estimate(lat, lon, weight, point, mode_radius_km)
    return Prediction(lat=plat, lon=plon, mean_lat=mean_lat, mean_lon=mean_lon, province_probs=pred.province_probs,
                      province_id=pred.province_id, top_cell=cells.gather(1, weight.argmax(1, keepdim=True)).squeeze(1),
                      hyp_cell=cells, hyp_province=cut(pred.hyp_province), hyp_weight=weight, hyp_lat=lat,
                      hyp_lon=lon, coverage=pred.coverage * mass, grid=(tp, tc))
