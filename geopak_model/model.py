"""GEOPAK's heads on top of the two encoders (anchor §5), plus Phileo's geo-aware auxiliary heads.

``GeopakHeads`` works on encoder features, so phases 0–1 train it from the embedding cache; ``GeopakModel`` adds
the encoders for phase 2 and prediction. Cell geometry lives in buffers (centres, radii, local→global ids), so a
checkpoint's state dict is self-contained.
"""

from __future__ import annotations

import torch
from torch import nn

from geopak_model.cells import CellTable
from geopak_model.config import ModelConfig
from geopak_model.encoders import DualEncoder
from geopak_model.geo import km_to_deg
from pipeline.core.gazetteer import EARTH_RADIUS_KM
from pipeline.core.koppen_classes import NUM_KOPPEN_CLASSES
from pipeline.core.provinces import NUM_PROVINCES

AUX_CENTRE = (30.0, 69.5)  # the aux head predicts degrees around Pakistan's middle, scaled, not from (0, 0)
AUX_SCALE_DEG = 5.0


def _proj(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.GELU())


class OffsetHead(nn.Module):
    """LN on (image 512, cell 96, province 32) → 640→256 LN GELU Dropout → 256→256 LN (+residual) → 128 → 2."""

    def __init__(self, d_img: int, d_cell: int, d_prov: int, hidden: int, dropout: float):
        super().__init__()
        self.ln_img, self.ln_cell, self.ln_prov = nn.LayerNorm(d_img), nn.LayerNorm(d_cell), nn.LayerNorm(d_prov)
        self.inp = nn.Sequential(nn.Linear(d_img + d_cell + d_prov, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                 nn.Dropout(dropout))
        self.res = nn.Sequential(nn.Linear(hidden, hidden), nn.LayerNorm(hidden))
        self.out = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.GELU(), nn.Linear(hidden // 2, 2))

    def forward(self, e: torch.Tensor, cell: torch.Tensor, prov: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat((self.ln_img(e), self.ln_cell(cell), self.ln_prov(prov)), dim=-1))
        return self.out(h + self.res(h))


class GeopakHeads(nn.Module):
    def __init__(self, cells: CellTable, clip_dim: int, scene_dim: int, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.proj_dim
        self.proj_clip = _proj(clip_dim, d)
        self.proj_scene = _proj(scene_dim, d)
        self.gate = nn.Linear(2 * d, 1)
        nn.init.normal_(self.gate.weight, 0.0, 0.01)
        nn.init.constant_(self.gate.bias, -0.4)
        self.province_head = nn.Sequential(nn.Linear(d, cfg.province_hidden), nn.LayerNorm(cfg.province_hidden),
                                           nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.province_hidden,
                                                                                         NUM_PROVINCES))
        self.register_buffer("temperature", torch.tensor(float(cfg.temperature)))
        # log(true prior / trained prior) added to province logits at inference (set by training; 0 = none)
        self.register_buffer("province_prior_shift", torch.zeros(NUM_PROVINCES))
        # inference temperatures of the province and cell logits, fitted on the validation split after training
        # (``inference.fit_calibration``); 1 = uncalibrated
        self.register_buffer("province_calibration", torch.tensor(1.0))
        self.register_buffer("cell_calibration", torch.tensor(1.0))

        counts = cells.counts_per_province
        self.counts = list(counts)  # plain ints: no device sync per province and batch
        self.cell_heads = nn.ModuleList()
        for n in counts:
            h = cfg.cell_head_small if n < cfg.cell_head_threshold else cfg.cell_head_large
            self.cell_heads.append(
                nn.Sequential(nn.Linear(d, h), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, n)) if n else nn.Identity())
        self.register_buffer("cells_per_province", torch.tensor(counts, dtype=torch.long))
        self.register_buffer("local_to_global", torch.from_numpy(cells.local_to_global()))
        self.register_buffer("cell_province", torch.from_numpy(cells.province_id.copy()))
        self.register_buffer("cell_local", torch.from_numpy(cells.local_id.copy()))
        self.register_buffer("cell_lat", torch.tensor(cells.center_lat, dtype=torch.float32))
        self.register_buffer("cell_lon", torch.tensor(cells.center_lon, dtype=torch.float32))
        self.register_buffer("cell_radius_km", torch.tensor(cells.radius_km, dtype=torch.float32))

        self.cell_emb = nn.Embedding(cells.n_cells, cfg.cell_emb_dim)
        self.province_emb = nn.Embedding(NUM_PROVINCES, cfg.province_emb_dim)
        self.offset_head = OffsetHead(d, cfg.cell_emb_dim, cfg.province_emb_dim, cfg.offset_hidden, cfg.dropout)
        self.aux_head = nn.Sequential(nn.Linear(d, 256), nn.GELU(), nn.Linear(256, 2))
        self.koppen_head = nn.Sequential(nn.Linear(d, 256), nn.GELU(), nn.Linear(256, NUM_KOPPEN_CLASSES)) \
            if cfg.koppen_head else None
        self.doy_head = nn.Sequential(nn.Linear(d, 128), nn.GELU(), nn.Linear(128, 2)) if cfg.doy_head else None
        if cfg.mvmf_head:
            self.mvmf_head = nn.Linear(d, cells.n_cells)
            self.register_buffer("mvmf_centres", torch.stack((self.cell_lat, self.cell_lon), dim=1))
            sigma = (torch.tensor(cells.radius_km, dtype=torch.float32).clamp(min=5.0) / EARTH_RADIUS_KM)
            self.mvmf_log_kappa = nn.Parameter((-2 * torch.log(sigma)).clamp(cfg.log_kappa_min, cfg.log_kappa_max))
        else:
            self.mvmf_head = None

    # --- pieces ---------------------------------------------------------------------------------------------
    def fuse(self, clip_feat: torch.Tensor, scene_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated fusion e = α·scene + (1 − α)·clip with α = σ(W[clip; scene] + b)."""
        pc, ps = self.proj_clip(clip_feat), self.proj_scene(scene_feat)
        alpha = torch.sigmoid(self.gate(torch.cat((pc, ps), dim=-1)))
        return alpha * ps + (1 - alpha) * pc, alpha.squeeze(-1)

    def province_logits(self, e: torch.Tensor) -> torch.Tensor:
        return self.province_head(e) / self.temperature

    def cell_logits_true(self, e: torch.Tensor, province_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: each sample through its true province's head → padded logits (B, max_n) and validity mask.

        Every head runs on the whole batch and each row keeps its own province's logits (a gather): no
        per-province ``nonzero()``, whose variable-sized result makes the host wait for the device once per
        province and step. The heads are small next to the encoders; the kept values and their gradients equal
        the per-province subsets', and every head stays in the graph (a head whose province is absent from a
        rank's batch gets a zero gradient, so DDP needs no unused-parameter search)."""
        return self.true_province_logits(self.cell_logits_all(e)[0], province_ids)

    def true_province_logits(self, logits_all: torch.Tensor, province_ids: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's own province's logits (B, max_n) and mask, cut from ``cell_logits_all``'s (B, 7, max_n)
        (0 beyond a province's cells)."""
        logits = logits_all.gather(1, province_ids.view(-1, 1, 1).expand(-1, 1, logits_all.shape[-1]))[:, 0]
        width = self.local_to_global.shape[1]
        mask = torch.arange(width, device=logits_all.device)[None, :] < \
            self.cells_per_province[province_ids][:, None]
        return logits, mask

    def cell_logits_all(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: every province's head → (B, 7, max_n) logits and (7, max_n) mask."""
        width = self.local_to_global.shape[1]
        out = e.new_zeros((e.shape[0], NUM_PROVINCES, width), dtype=torch.float32)
        for p, n in enumerate(self.counts):
            if n:
                out[:, p, :n] = self.cell_heads[p](e).float()
        return out, self.local_to_global >= 0

    def offsets(self, e: torch.Tensor, cell_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted points (lat, lon) for cells ``cell_ids`` (B,) or (B, K): centre + offset bounded by the radius.

        The bound is the same in training and at inference: |Δlat| ≤ r/111 km, |Δlon| ≤ r/(111·cos lat), via tanh.
        """
        shape = cell_ids.shape
        flat = cell_ids.reshape(-1)
        e_rep = e if cell_ids.dim() == 1 else e[:, None, :].expand(*shape, e.shape[-1]).reshape(-1, e.shape[-1])
        raw = self.offset_head(e_rep, self.cell_emb(flat), self.province_emb(self.cell_province[flat])).float()
        lat_c, lon_c = self.cell_lat[flat], self.cell_lon[flat]
        r = self.cell_radius_km[flat].clamp(min=self.cfg.min_offset_radius_km) * self.cfg.offset_radius_scale
        dlat, dlon = km_to_deg(r, lat_c)
        lat = lat_c + torch.tanh(raw[:, 0]) * dlat
        lon = lon_c + torch.tanh(raw[:, 1]) * dlon
        return lat.reshape(shape), lon.reshape(shape)

    def aux_latlon(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.aux_head(e).float()
        return AUX_CENTRE[0] + AUX_SCALE_DEG * raw[:, 0], AUX_CENTRE[1] + AUX_SCALE_DEG * raw[:, 1]

    def log_kappa(self) -> torch.Tensor:
        return self.mvmf_log_kappa.clamp(self.cfg.log_kappa_min, self.cfg.log_kappa_max)

    # --- whole forward --------------------------------------------------------------------------------------
    def forward(self, clip_feat: torch.Tensor, scene_feat: torch.Tensor, province_ids: torch.Tensor | None = None,
                cell_ids: torch.Tensor | None = None, parts: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """With the true ``province_ids``/``cell_ids`` (training, validation loss) the geocell logits come from the
        true province's head and the offset from the true cell; without them all heads run (inference).
        ``parts`` limits the work (phase 0 needs only the province logits)."""
        e, alpha = self.fuse(clip_feat, scene_feat)
        out: dict[str, torch.Tensor] = {"embedding": e, "gate": alpha, "province_logits": self.province_logits(e)}
        want = set(parts) if parts else {"cell", "offset", "aux", "koppen", "doy", "mvmf"}
        if "cell" in want:  # every province's logits too: validation's inference reuses them (heads run once)
            out["cell_logits_all"], out["cell_mask_all"] = self.cell_logits_all(e)
            if province_ids is not None:
                out["cell_logits"], out["cell_mask"] = self.true_province_logits(out["cell_logits_all"],
                                                                                 province_ids)
        if "offset" in want and cell_ids is not None:
            out["offset_lat"], out["offset_lon"] = self.offsets(e, cell_ids)
        if "aux" in want:
            out["aux_lat"], out["aux_lon"] = self.aux_latlon(e)
        if "koppen" in want and self.koppen_head is not None:
            out["koppen_logits"] = self.koppen_head(e).float()
        if "doy" in want and self.doy_head is not None:
            out["doy"] = self.doy_head(e).float()
        if "mvmf" in want and self.mvmf_head is not None:
            out["mvmf_logits"] = self.mvmf_head(e).float()
            out["mvmf_log_kappa"] = self.log_kappa()
            out["mvmf_centres"] = self.mvmf_centres
        return out

    def param_groups(self, phase: int) -> list[nn.Parameter]:
        """Phase 0 trains fusion + province head; later phases train every head."""
        if phase == 0:
            mods = [self.proj_clip, self.proj_scene, self.gate, self.province_head]
            return [p for m in mods for p in m.parameters()]
        return list(self.parameters())


class GeopakModel(nn.Module):
    """Encoders + heads. ``forward`` takes images in [0, 1] (B, 3, H, W)."""

    def __init__(self, encoder: DualEncoder, heads: GeopakHeads):
        super().__init__()
        self.encoder = encoder
        self.heads = heads

    def forward(self, images: torch.Tensor, province_ids: torch.Tensor | None = None,
                cell_ids: torch.Tensor | None = None, parts: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        clip_feat, scene_feat = self.encoder(images)
        return self.heads(clip_feat, scene_feat, province_ids, cell_ids, parts)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

