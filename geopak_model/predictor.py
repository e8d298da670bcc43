"""``GeopakPredictor``: the API GEOPAK's README promised, over a GeoPak checkpoint.

Prediction is the same mixture of hypotheses that validation uses (``inference.mixture_predict``): top-K provinces ×
top-K cells, each hypothesis = cell centre + radius-clamped offset, weighted by P(province)·P(cell | province).

``confidence`` is the model's probability mass on the hypotheses that lie within ``CONFIDENCE_KM`` of the returned
point: P(province)·P(cell | province) summed over those hypotheses, without renormalising. It is high only when the
model is both sure of the place and its hypotheses agree.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from geopak_model.checkpoint import load_model
from geopak_model.data import eval_view
from geopak_model.geo import haversine_km
from geopak_model.inference import mixture_predict
from pipeline.core.provinces import PROVINCES
from pipeline.labels.dates import decode_day
from pipeline.labels.koppen import KOPPEN_CODES

ImageInput = Union[str, Path, bytes, Image.Image]
CONFIDENCE_KM = 25.0


class ImageLoadError(ValueError):
    """An input that is not a readable image (missing file, not an image, truncated)."""


def load_input(x: ImageInput) -> Image.Image:
    """A path, bytes or PIL image as an upright RGB image; a clear ``ImageLoadError`` otherwise."""
    try:
        if isinstance(x, Image.Image):
            img = x
        elif isinstance(x, (bytes, bytearray)):
            img = Image.open(io.BytesIO(bytes(x)))
        elif isinstance(x, (str, Path)):
            if not Path(x).is_file():
                raise ImageLoadError(f"{x}: no such file")
            img = Image.open(x)
        else:
            raise ImageLoadError(f"cannot read an image from {type(x).__name__}")
        img.load()
        return ImageOps.exif_transpose(img).convert("RGB")
    except ImageLoadError:
        raise
    except Exception as exc:  # PIL raises many types for broken input
        name = x if isinstance(x, (str, Path)) else type(x).__name__
        raise ImageLoadError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from exc


class GeopakPredictor:
    def __init__(self, model: torch.nn.Module, cfg, device: torch.device):
        self.model = model.eval().to(device)
        self.cfg = cfg
        self.device = device
        heads = model.heads
        self._center_lat = heads.cell_lat.detach().cpu().numpy().astype(float)
        self._center_lon = heads.cell_lon.detach().cpu().numpy().astype(float)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device | None = None, weights_dir: str | Path | None = None
    ) -> "GeopakPredictor":
        if not Path(path).is_file():
            raise FileNotFoundError(f"no checkpoint at {path}: train one (geopak_model asset) or pass --checkpoint")
        model, cfg = load_model(path, weights_dir)
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, cfg, dev)

    @torch.no_grad()
    def predict(
        self,
        x: ImageInput | Sequence[ImageInput],
        top_provinces: int | None = None,
        top_cells: int | None = None,
        batch_size: int = 32,
        oracle_cells: Sequence[int] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """One dict per image (a list for a list input); images are read batch by batch. Unreadable inputs raise
        ``ImageLoadError``. ``oracle_cells`` (evaluation only): the true cell of each image, to add the ORACLE
        estimate (true cell centre + predicted offset) that GEOPAK reported instead of an end-to-end error."""
        single = not isinstance(x, (list, tuple))
        items = [x] if single else list(x)
        out: list[dict[str, Any]] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            views = torch.stack([eval_view(load_input(i), self.cfg.encoder.image_size) for i in chunk])
            oracle = None if oracle_cells is None else torch.as_tensor(list(oracle_cells[start : start + batch_size]))
            out.extend(self._predict_batch(views, top_provinces, top_cells, oracle))
        return out[0] if single else out

    def _predict_batch(self, images: torch.Tensor, top_provinces: int | None, top_cells: int | None,
                       oracle_cells: torch.Tensor | None = None) -> list[dict]:
        inf = self.cfg.inference
        heads = self.model.heads
        clip_feat, scene_feat = self.model.encoder(images.to(self.device))
        res = heads(clip_feat, scene_feat, None, None, ("koppen", "doy", "aux"))
        if oracle_cells is not None:
            o_lat, o_lon = heads.offsets(res["embedding"], oracle_cells.to(self.device))
        pred = mixture_predict(
            heads, res["embedding"], top_provinces or inf.top_provinces, top_cells or inf.top_cells, inf.prior_correction
        )
        dist = haversine_km(pred.hyp_lat.double(), pred.hyp_lon.double(), pred.lat.double()[:, None],
                            pred.lon.double()[:, None])
        mass = pred.hyp_weight.double() * pred.coverage.double()[:, None]
        valid = pred.hyp_cell >= 0
        confidence = (mass * ((dist <= CONFIDENCE_KM) & valid)).sum(1)
        koppen = res["koppen_logits"].argmax(1).cpu().numpy() if "koppen_logits" in res else None
        doy = None
        if "doy" in res:  # (sin, cos) of the day's angle, as the labels encode it
            d = res["doy"].float().cpu().numpy()
            doy = decode_day(d[:, 0], d[:, 1], 365)
        results = []
        for b in range(images.shape[0]):
            hyps = []
            for h in range(pred.hyp_cell.shape[1]):
                cell = int(pred.hyp_cell[b, h])
                if cell < 0:
                    continue
                lat, lon = float(pred.hyp_lat[b, h]), float(pred.hyp_lon[b, h])
                hyps.append({
                    "cell_id": cell,
                    "province": PROVINCES[int(pred.hyp_province[b, h])].key,
                    "weight": float(pred.hyp_weight[b, h]),
                    "probability": float(mass[b, h]),
                    "center_lat": self._center_lat[cell],
                    "center_lon": self._center_lon[cell],
                    "offset_lat": lat - self._center_lat[cell],
                    "offset_lon": lon - self._center_lon[cell],
                    "lat": lat,
                    "lon": lon,
                })
            hyps.sort(key=lambda d: -d["weight"])
            probs = pred.province_probs[b].cpu().numpy()
            pid = int(pred.province_id[b])
            item = {
                "lat": float(pred.lat[b]),
                "lon": float(pred.lon[b]),
                "province": PROVINCES[pid].key,
                "province_name": PROVINCES[pid].name,
                "province_probs": {p.key: float(probs[p.id]) for p in PROVINCES},
                "confidence": float(confidence[b]),
                "top_cells": [h["cell_id"] for h in hyps],
                "hypotheses": hyps,
            }
            item["aux_lat"], item["aux_lon"] = float(res["aux_lat"][b]), float(res["aux_lon"][b])
            if oracle_cells is not None:
                item["oracle_lat"], item["oracle_lon"] = float(o_lat[b]), float(o_lon[b])
            if koppen is not None:
                item["koppen"] = KOPPEN_CODES[int(koppen[b])]
                item["koppen_id"] = int(koppen[b])
            if doy is not None:
                item["day_of_year"] = int(doy[b])
            results.append(item)
        return results
