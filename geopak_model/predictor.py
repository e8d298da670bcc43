"""``GeopakPredictor``: the API GEOPAK's README promised, over a GeoPak checkpoint.

Prediction is the same mixture of hypotheses that validation uses (``inference.mixture_predict``): top-K provinces ×
top-K cells, each hypothesis = cell centre + radius-clamped offset, weighted by P(province)·P(cell | province).

``confidence`` is the model's probability mass on the hypotheses that lie within ``CONFIDENCE_KM`` of the returned
point: P(province)·P(cell | province) summed over those hypotheses, without renormalising. It is high only when the
model is both sure of the place and its hypotheses agree.

Precision: the encoders and heads run under the autocast dtype that training used for the embedding cache and
validation, derived the same way from the checkpoint's config (``amp``, ``amp_dtype``) by ``precision.amp_dtype``
for the predictor's device: bf16 (or fp16 where the GPU has no bf16) on CUDA, float32 on CPU. A GPU-trained
checkpoint used on CPU therefore runs in float32, not bf16: CPU autocast to bf16 is several times slower than
float32 on CPUs without bf16 matrix units, and float32 is the more exact of the two (the features differ by
bf16 rounding only). ``GeopakPredictor.precision`` says which one a predictor uses.

Preprocessing is the embedding cache's (``data.load_image`` with DCT-scaled JPEG decoding to >= the input size,
then ``data.eval_view``), so a file or bytes input gives the same view the cache computed features from.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image, ImageOps

from geopak_model.baselines import knn_features
from geopak_model.checkpoint import load_model
from geopak_model.config import TrainConfig
from geopak_model.data import eval_view, load_image
from geopak_model.geo import haversine_km
from geopak_model.inference import mixture_predict, province_log_probs
from geopak_model.retrieval import Gallery, load_gallery_for, refine
from geopak_model.precision import amp_dtype, autocast, dtype_name
from pipeline.core.day_of_year import decode_day
from pipeline.core.koppen_classes import KOPPEN_CODES
from pipeline.core.provinces import PROVINCES

ImageInput = Union[str, Path, bytes, Image.Image]
CONFIDENCE_KM = 25.0
LISTED_HYPOTHESES = 10  # the output lists the most probable ones; the estimate uses them all


class ImageLoadError(ValueError):
    """An input that is not a readable image (missing file, not an image, truncated)."""


def load_input(x: ImageInput, min_side: int | None = None) -> Image.Image:
    """A path, bytes or PIL image as an upright RGB image; a clear ``ImageLoadError`` otherwise.

    ``min_side``: decode a large JPEG file or bytes at a reduced DCT scale whose short side stays >= ``min_side``,
    exactly as the embedding cache reads its images (``data.load_image``). A PIL image is used as given.
    """
    try:
        if isinstance(x, Image.Image):
            x.load()
            return ImageOps.exif_transpose(x).convert("RGB")
        if isinstance(x, (bytes, bytearray)):
            return load_image(io.BytesIO(bytes(x)), min_side)
        if isinstance(x, (str, Path)):
            if not Path(x).is_file():
                raise ImageLoadError(f"{x}: no such file")
            return load_image(x, min_side)
        raise ImageLoadError(f"cannot read an image from {type(x).__name__}")
    except ImageLoadError:
        raise
    except Exception as exc:  # PIL raises many types for broken input
        name = x if isinstance(x, (str, Path)) else type(x).__name__
        raise ImageLoadError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from exc


class GeopakPredictor:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                 dtype: torch.dtype | None = None, gallery: Gallery | None = None):
        """``dtype``: the autocast dtype (None: float32); ``from_checkpoint`` takes it from the training config.
        ``gallery``: training images in the fused embedding space, for retrieval refinement (None: no
        refinement; ``from_checkpoint`` loads the one saved beside the checkpoint)."""
        self.model = model.eval().to(device)
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.gallery = gallery
        heads = model.heads
        self._center_lat = heads.cell_lat.detach().cpu().numpy().astype(float)
        self._center_lon = heads.cell_lon.detach().cpu().numpy().astype(float)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device | None = None, weights_dir: str | Path | None = None,
        ckpt: dict | None = None, sha256: str | None = None,
    ) -> "GeopakPredictor":
        """Model and config from ``path``. ``weights_dir``: where encoder weights files named relative to
        ``<data root>/weights/`` are (``DataPaths.weights_dir``; the pipeline and ``geopak predict`` pass it).
        ``ckpt`` / ``sha256``: the checkpoint already read (``read_checkpoint``) / hashed by the caller, so an
        evaluation reads and hashes the file once."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no checkpoint at {path}: train one (geopak_model asset) or pass --checkpoint")
        model, cfg = load_model(path, weights_dir, ckpt)
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # the checkpoint's own precision setting (configs written before amp_dtype existed mean "auto")
        return cls(model, cfg, dev, amp_dtype(dev, cfg.amp, getattr(cfg, "amp_dtype", "auto")),
                   load_gallery_for(path, sha256=sha256))

    @property
    def precision(self) -> str:
        """"fp32", "bf16" or "fp16": what the encoders and heads compute in."""
        return dtype_name(self.dtype)

    def view(self, x: ImageInput) -> torch.Tensor:
        """The (3, S, S) input tensor in [0, 1] of one image: the embedding cache's preprocessing."""
        size = self.cfg.encoder.image_size
        return eval_view(load_input(x, size), size)

    @torch.no_grad()
    def predict(
        self,
        x: ImageInput | Sequence[ImageInput],
        top_provinces: int | None = None,
        top_cells: int | None = None,
        batch_size: int = 32,
        oracle_cells: Sequence[int] | None = None,
        features: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """One dict per image (a list for a list input); images are read batch by batch. Unreadable inputs raise
        ``ImageLoadError``. ``oracle_cells`` (evaluation only): the true cell of each image, to add the ORACLE
        estimate (true cell centre + predicted offset) that GEOPAK reported instead of an end-to-end error.
        ``features`` (evaluation only): add ``encoder_features``, the image's kNN-baseline feature
        (``baselines.knn_features`` of the encoders' output), so baselines reuse this read of the image."""
        single = not isinstance(x, (list, tuple))
        items = [x] if single else list(x)
        out: list[dict[str, Any]] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            views = torch.stack([self.view(i) for i in chunk])
            oracle = None if oracle_cells is None else torch.as_tensor(list(oracle_cells[start : start + batch_size]))
            out.extend(self._predict_batch(views, top_provinces, top_cells, oracle, features))
        return out[0] if single else out

    def _predict_batch(self, images: torch.Tensor, top_provinces: int | None, top_cells: int | None,
                       oracle_cells: torch.Tensor | None = None, features: bool = False) -> list[dict]:
        inf = self.cfg.inference
        heads = self.model.heads
        with autocast(self.device, self.dtype):  # as evaluate_features: encoders, heads and mixture
            clip_feat, scene_feat = self.model.encoder(images.to(self.device))
            res = heads(clip_feat, scene_feat, None, None, ("koppen", "doy", "aux"))
            if oracle_cells is not None:
                o_lat, o_lon = heads.offsets(res["embedding"], oracle_cells.to(self.device))
            pred = mixture_predict(heads, res["embedding"], top_provinces or inf.top_provinces,
                                   top_cells or inf.top_cells, inf.prior_correction, inf.point, inf.mode_radius_km)
            uncorrected = province_log_probs(heads, res["embedding"], prior_correction=False).argmax(1)
        knn = knn_features(clip_feat, scene_feat).cpu().numpy() if features else None
        refined = None
        if self.gallery is not None:
            refined = refine(pred, res["embedding"], self.gallery, inf.refine_radius_km, inf.refine_neighbours,
                             inf.refine_temperature, inf.mode_radius_km)
        ans_lat, ans_lon = pred.lat.double().cpu(), pred.lon.double().cpu()
        if refined is not None and inf.refine:
            ans_lat, ans_lon = refined
        dist = haversine_km(pred.hyp_lat.double().cpu(), pred.hyp_lon.double().cpu(), ans_lat[:, None],
                            ans_lon[:, None])
        mass = (pred.hyp_weight.double() * pred.coverage.double()[:, None]).cpu()
        valid = (pred.hyp_cell >= 0).cpu()
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
            hyps = sorted(hyps, key=lambda d: -d["weight"])[:LISTED_HYPOTHESES]
            probs = pred.province_probs[b].cpu().numpy()
            pid = int(pred.province_id[b])
            item = {
                # the answer: refined by retrieval when there is a gallery and the config says so
                "lat": float(ans_lat[b]),
                "lon": float(ans_lon[b]),
                "classifier_lat": float(pred.lat[b]),  # the classifier's own point estimate (``inference.point``)
                "classifier_lon": float(pred.lon[b]),
                "province": PROVINCES[pid].key,
                "province_name": PROVINCES[pid].name,
                "province_probs": {p.key: float(probs[p.id]) for p in PROVINCES},
                "confidence": float(confidence[b]),
                "top_cells": [h["cell_id"] for h in hyps],
                "hypotheses": hyps,
                "mean_lat": float(pred.mean_lat[b]),  # GEOPAK's probability-weighted mean, for comparison
                "mean_lon": float(pred.mean_lon[b]),
                "province_without_prior_correction": PROVINCES[int(uncorrected[b])].key,
            }
            if refined is not None:
                item["refined_lat"], item["refined_lon"] = float(refined[0][b]), float(refined[1][b])
            item["aux_lat"], item["aux_lon"] = float(res["aux_lat"][b]), float(res["aux_lon"][b])
            if oracle_cells is not None:
                item["oracle_lat"], item["oracle_lon"] = float(o_lat[b]), float(o_lon[b])
            if knn is not None:
                item["encoder_features"] = knn[b]
            if koppen is not None:
                item["koppen"] = KOPPEN_CODES[int(koppen[b])]
                item["koppen_id"] = int(koppen[b])
            if doy is not None:
                item["day_of_year"] = int(doy[b])
            results.append(item)
        return results
