"""Mixture-of-hypotheses prediction (anchor-geopak §8), the one inference path for validation and prediction.

Top-2 provinces × top-5 cells of each; every hypothesis is the cell centre plus the radius-bounded offset
predicted for that cell; weights P(province)·P(cell | province), normalised; the point estimate is the weighted
mean on the sphere. Provinces without cells cannot host a hypothesis and are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from geopak_model.geo import unit_xyz, xyz_to_latlon
from geopak_model.model import GeopakHeads


@dataclass
class Prediction:
    lat: torch.Tensor  # (B,) mixture estimate
    lon: torch.Tensor
    province_probs: torch.Tensor  # (B, 7), prior-corrected
    province_id: torch.Tensor  # (B,) argmax province
    top_cell: torch.Tensor  # (B,) global id of the most probable hypothesis
    hyp_cell: torch.Tensor  # (B, H) global cell ids (−1 = none)
    hyp_province: torch.Tensor  # (B, H)
    hyp_weight: torch.Tensor  # (B, H) normalised P(prov)·P(cell | prov)
    hyp_lat: torch.Tensor  # (B, H)
    hyp_lon: torch.Tensor
    coverage: torch.Tensor  # (B,) unnormalised Σ P(prov)·P(cell | prov) over the hypotheses (the mass they hold)

    @property
    def top_lat(self) -> torch.Tensor:
        return self.hyp_lat.gather(1, self.hyp_weight.argmax(1, keepdim=True)).squeeze(1)

    @property
    def top_lon(self) -> torch.Tensor:
        return self.hyp_lon.gather(1, self.hyp_weight.argmax(1, keepdim=True)).squeeze(1)


def province_log_probs(heads: GeopakHeads, e: torch.Tensor, prior_correction: bool = True) -> torch.Tensor:
    logits = heads.province_logits(e).float()
    if prior_correction:
        logits = logits + heads.province_prior_shift
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def mixture_predict(heads: GeopakHeads, e: torch.Tensor, top_provinces: int = 2, top_cells: int = 5,
                    prior_correction: bool = True) -> Prediction:
    """Predict from the fused embedding ``e`` (B, d) (``heads.fuse`` of the encoder features)."""
    prov_logp = province_log_probs(heads, e, prior_correction)
    has_cells = heads.cells_per_province > 0
    sel_logp = prov_logp.masked_fill(~has_cells[None, :], float("-inf"))
    k_p = min(top_provinces, int(has_cells.sum()))
    p_logp, p_ids = sel_logp.topk(k_p, dim=1)  # (B, Kp)

    logits_all, mask_all = heads.cell_logits_all(e)  # (B, 7, W), (7, W)
    cell_logp = torch.log_softmax(logits_all.masked_fill(~mask_all[None], float("-inf")), dim=-1)
    cell_logp = cell_logp.gather(1, p_ids[:, :, None].expand(-1, -1, cell_logp.shape[-1]))  # (B, Kp, W)
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
    xyz = (weight[:, :, None] * unit_xyz(lat, lon)).sum(1)
    mlat, mlon = xyz_to_latlon(xyz)
    flat_valid = valid.reshape(b, -1)
    return Prediction(
        lat=mlat, lon=mlon, province_probs=prov_logp.exp(), province_id=prov_logp.argmax(1),
        top_cell=cells.gather(1, weight.argmax(1, keepdim=True)).squeeze(1),
        hyp_cell=torch.where(flat_valid, cells, torch.full_like(cells, -1)),
        hyp_province=p_ids[:, :, None].expand(-1, -1, k_c).reshape(b, -1),
        hyp_weight=weight, hyp_lat=lat, hyp_lon=lon, coverage=coverage,
    )
