"""The clean picture for a plan row: sky, ground, mountains, landmark, light and sensor noise."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from pipeline.core.values import is_missing

from pipeline.sources.sample_world.config import UTC_OFFSET_HOURS, SampleWorldConfig
from pipeline.sources.sample_world.landmarks import _draw_clutter, _draw_landmark, _hut
from pipeline.sources.sample_world.styles import (
    _SEASON_GROUND,
    _SEASON_TINT,
    _SNOW,
    _draw_treeline,
    _ground,
    _lerp,
    _mountains,
    _noise,
    _style,
)

_ASPECTS: tuple[tuple[int, int], ...] = ((4, 3), (3, 4), (16, 9), (1, 1), (3, 2), (2, 3))


def _row(row: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
    """A field of a plan row (dict, Series or namedtuple-like mapping), ``default`` when absent or missing."""
    try:
        v = row[key]
    except (KeyError, IndexError):
        return default
    return default if is_missing(v) else v

def _local_time(row: Mapping[str, Any]) -> tuple[str, int]:
    """EXIF DateTimeOriginal (local Pakistan time) and the local hour, from the UTC ``taken_at``."""
    import datetime as dt

    t = row["taken_at"]
    t = t.to_pydatetime() if hasattr(t, "to_pydatetime") else t
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    local = t.astimezone(dt.timezone(dt.timedelta(hours=UTC_OFFSET_HOURS)))
    return local.strftime("%Y:%m:%d %H:%M:%S"), local.hour


def render_scene(row: Mapping[str, Any], cfg: SampleWorldConfig) -> Image.Image:
    """The clean picture for a plan row (no defect applied), seeded by ``(cfg.seed, render_index)``."""
    idx = int(_row(row, "render_index", _row(row, "index", 0)))
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, idx, 0xD1CE]))
    st = _style(int(_row(row, "koppen_id", -1)))
    season = str(_row(row, "season", "spring"))
    _, hour = _local_time(row)

    aw, ah = _ASPECTS[int(rng.integers(len(_ASPECTS)))]
    long_side = cfg.image_size
    w, h = (long_side, round(long_side * ah / aw)) if aw >= ah else (round(long_side * aw / ah), long_side)
    margin = 1.0 + rng.uniform(0.04, 0.12)  # render larger, crop at a random offset
    W, H = int(w * margin), int(h * margin)
    hy = int(H * rng.uniform(0.38, 0.58))

    # Season changes what grows and what is white.
    target, wgt = _SEASON_GROUND[season]
    base = _lerp(np.asarray(st.ground, np.float32), target, wgt * st.green * rng.uniform(0.7, 1.3))
    accent = _lerp(np.asarray(st.accent, np.float32), target, wgt * st.green * rng.uniform(0.7, 1.3))
    base = base * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    winter = season == "winter"
    snowline = st.snowline - (0.3 if winter else 0.0) + (0.15 if season == "summer" else 0.0)

    img = np.empty((H, W, 3), np.float32)
    t = (np.arange(hy, dtype=np.float32) / max(hy, 1))[:, None, None] ** 0.8
    sky_top = np.asarray(st.sky_top, np.float32) * rng.uniform(0.9, 1.1)
    sky_hor = np.asarray(st.sky_hor, np.float32)
    img[:hy] = _lerp(sky_top, sky_hor, t)
    cloudy = 0.15 + (0.35 if season in ("summer", "winter") else 0.1)
    if rng.random() < cloudy:
        c = _noise(rng, hy, W, 7, 3)
        cover = np.clip((c - rng.uniform(0.45, 0.7)) * 4.0, 0, 1)[..., None]
        img[:hy] = _lerp(img[:hy], (238, 238, 240), cover * 0.85)
    if rng.random() < st.mountains:
        _mountains(rng, img, st, hy, snowline, sky_hor)
    ground = _ground(rng, st, base, accent, H, W, hy)
    snow_share = st.winter_snow if winter else st.winter_snow * (0.35 if season in ("spring", "autumn") else 0.1)
    if snow_share > 0:
        sn = _noise(rng, H - hy, W, 8, 4)
        cover = np.clip((sn - (1.0 - snow_share)) * 6.0, 0, 1)[..., None]
        ground = _lerp(ground, _SNOW, cover)
    img[hy:] = ground
    # Distance haze at the horizon (more in summer and for dusty classes).
    haze = st.haze * (1.6 if season == "summer" else 1.0)
    dist = np.exp(-np.abs(np.arange(H, dtype=np.float32) - hy) / (0.12 * H))[:, None, None]
    t_h = np.clip(dist * (0.35 + haze), 0, 0.8).astype(np.float32)
    img *= 1.0 - t_h  # in place: this touches every pixel
    img += sky_hor * t_h

    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    if rng.random() < st.treeline:
        _draw_treeline(rng, draw, W, hy, H)
    gid = _row(row, "place_geonameid")
    if gid is not None:
        _draw_clutter(rng, draw, W, H, hy, int(_row(row, "place_population", 0)), int(gid))
        if rng.random() < 0.9:
            scale = H * rng.uniform(0.25, 0.65)  # near or far; sometimes partly out of frame
            _draw_landmark(draw, int(gid), rng.uniform(0.1, 0.9) * W, hy + rng.uniform(0.0, 0.08) * H, scale)
    elif rng.random() < 0.35:
        _hut(rng, draw, W, H, hy)

    ox, oy = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
    pil = pil.crop((ox, oy, ox + w, oy + h))
    # Light (low sun is dimmer and warmer), season tint, summer haze, camera gain and contrast are all affine per
    # channel, so they fold into one lookup table; sensor noise is added from a fixed bank at a random offset.
    # Both run in Pillow's C code: full-image float passes in NumPy were a third of the render time.
    sun = math.sin(math.pi * min(max((hour - 6 + rng.uniform(0, 1)) / 13.0, 0.0), 1.0))
    light = np.array([1.0 + 0.08 * (1 - sun), 1.0, 1.0 - 0.15 * (1 - sun)]) * (0.7 + 0.3 * sun)
    gain = light * np.asarray(_SEASON_TINT[season]) * rng.uniform(0.9, 1.1)
    haze_t = rng.uniform(0.05, 0.2) * (1 + st.haze) if season == "summer" else 0.0
    offset = np.asarray((228.0, 218.0, 198.0)) * haze_t * gain
    gain = gain * (1.0 - haze_t)
    contrast = rng.uniform(0.85, 1.15)
    small = np.asarray(pil.reduce(4), dtype=np.float64)
    mean = float((small.mean(axis=(0, 1)) * gain + offset).mean())
    k = gain * contrast
    bias = offset * contrast + mean * (1.0 - contrast)
    v = np.arange(256, dtype=np.float64)[None, :]
    lut = np.clip(np.rint(v * k[:, None] + bias[:, None]), 0, 255).astype(np.uint8).ravel().tolist()
    pil = pil.point(lut)
    level = int(rng.integers(len(_NOISE_SIGMAS)))
    bank = _noise_bank(level)
    nx, ny = int(rng.integers(0, bank.width - w + 1)), int(rng.integers(0, bank.height - h + 1))
    return ImageChops.add(pil, bank.crop((nx, ny, nx + w, ny + h)), scale=1.0, offset=-128)


_NOISE_SIGMAS: tuple[float, ...] = (1.2, 2.2, 3.4, 5.0)


@lru_cache(maxsize=len(_NOISE_SIGMAS))
def _noise_bank(level: int) -> Image.Image:
    """A fixed field of Gaussian sensor noise around 128; each image reads it at its own offset (cheap, seeded)."""
    side = 1024
    z = np.random.default_rng([0x5E45, level]).standard_normal((side, side, 3), dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(128.0 + z * _NOISE_SIGMAS[level]), 0, 255).astype(np.uint8), "RGB")
