"""The stored bytes of a plan row: EXIF, JPEG, and the deliberate defects (blur, truncation, copies, ...)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageFilter

from pipeline.sources.sample_world.config import CAMERA_MAKE, CAMERA_MODEL, RENDER_VERSION, UTC_OFFSET_HOURS, SampleWorldConfig
from pipeline.sources.sample_world.scene import _local_time, _row, render_scene


def _dms(value: float) -> tuple[float, float, float]:
    v = abs(value)
    deg = math.floor(v)
    minutes = math.floor((v - deg) * 60.0)
    sec = round((v - deg - minutes / 60.0) * 3600.0, 4)
    return float(deg), float(minutes), sec


def _exif(row: Mapping[str, Any], *, gps: bool = True) -> Image.Exif:
    """EXIF as a phone would write it: GPS, local DateTimeOriginal + offset, camera make/model."""
    ex = Image.Exif()
    ex[ExifTags.Base.Make] = CAMERA_MAKE
    ex[ExifTags.Base.Model] = CAMERA_MODEL
    ex[ExifTags.Base.Software] = f"geopak sample_world v{RENDER_VERSION}"
    local, _ = _local_time(row)
    sub = ex.get_ifd(ExifTags.IFD.Exif)
    sub[ExifTags.Base.DateTimeOriginal] = local
    sub[ExifTags.Base.OffsetTimeOriginal] = f"+{UTC_OFFSET_HOURS:02d}:00"
    if gps:
        lat, lon = float(row["lat"]), float(row["lon"])
        g = ex.get_ifd(ExifTags.IFD.GPSInfo)
        g[ExifTags.GPS.GPSVersionID] = b"\x02\x03\x00\x00"
        g[ExifTags.GPS.GPSLatitudeRef] = "N" if lat >= 0 else "S"
        g[ExifTags.GPS.GPSLatitude] = _dms(lat)
        g[ExifTags.GPS.GPSLongitudeRef] = "E" if lon >= 0 else "W"
        g[ExifTags.GPS.GPSLongitude] = _dms(lon)
        acc = _row(row, "geo_accuracy")
        if acc is not None:
            g[ExifTags.GPS.GPSHPositioningError] = float(acc)
    return ex


def _jpeg(img: Image.Image, ex: Image.Exif, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=ex, quality=int(quality))
    return buf.getvalue()


def render_image(row: Mapping[str, Any], cfg: SampleWorldConfig) -> bytes:
    """The stored bytes for one plan row: a JPEG with EXIF, or the row's deliberate defect."""
    defect = str(_row(row, "defect", "") or "")
    index = int(_row(row, "index", 0))
    drng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index, 0xBAD]))
    if defect == "not_an_image":
        return (
            b"<!DOCTYPE html><html><head><title>429 Too Many Requests</title></head><body>"
            b"<h1>429 Too Many Requests</h1><p>Rate limit exceeded. Request id "
            + f"{int(drng.integers(1 << 62)):016x}".encode()
            + b".</p></body></html>\n"
        )
    if defect == "blank":
        h, w = (cfg.image_size * 3) // 4, cfg.image_size
        grey = drng.uniform(60, 200)
        arr = grey + drng.standard_normal((h, w, 1), dtype=np.float32) * 1.2 + drng.uniform(-2, 2, 3)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
        return _jpeg(img, _exif(row), int(drng.integers(80, 96)))

    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, int(_row(row, "render_index", index)), 0x7E6]))
    quality = int(rng.integers(80, 96))
    img = render_scene(row, cfg)
    if defect == "near_duplicate":
        # The copy someone re-posted: the source's JPEG decoded, resized and re-compressed.
        src = Image.open(io.BytesIO(_jpeg(img, Image.Exif(), quality))).convert("RGB")
        f = drng.uniform(0.6, 0.85)
        img = src.resize((max(16, round(src.width * f)), max(16, round(src.height * f))), Image.Resampling.BILINEAR)
        return _jpeg(img, _exif(row), int(drng.integers(70, 90)))
    if defect == "blurred":
        img = img.filter(ImageFilter.GaussianBlur(radius=cfg.image_size * drng.uniform(0.03, 0.045)))
    elif defect == "tiny":
        short = int(drng.integers(40, 57))
        f = short / min(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.LANCZOS)
    data = _jpeg(img, _exif(row, gps=defect != "no_gps"), quality)
    if defect == "truncated":
        return data[: len(data) // 2]
    return data  # includes exact_duplicate: same render_index, same EXIF -> the same bytes as its source
