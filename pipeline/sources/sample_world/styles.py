"""How a Köppen class and a season look: palettes, ground textures, mountains and tree lines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class _Style:
    """How a Köppen class looks: ground colours and texture, sky, mountains, vegetation and snow behaviour."""

    ground: RGB
    accent: RGB
    texture: str  # dunes | patchy | fields | forest | rock | snow | water
    sky_top: RGB
    sky_hor: RGB
    mountains: float  # probability of a mountain silhouette behind the horizon
    mountain: RGB = (120, 112, 104)
    green: float = 0.0  # how much the season changes vegetation (0 bare ... 1 lush)
    snowline: float = 2.0  # fraction of mountain height above which there is snow (> 1: none)
    winter_snow: float = 0.0  # share of the ground under snow in winter
    treeline: float = 0.0  # probability of a conifer band at the horizon
    haze: float = 0.1


_BLUE_SKY: tuple[RGB, RGB] = ((70, 125, 205), (185, 210, 235))
_DUSTY_SKY: tuple[RGB, RGB] = ((105, 150, 205), (222, 214, 196))
_STYLES: dict[str, _Style] = {
    "Water": _Style((38, 88, 138), (78, 135, 175), "water", *_BLUE_SKY, 0.0, haze=0.15),
    "Aw": _Style((118, 138, 62), (88, 108, 42), "patchy", *_BLUE_SKY, 0.1, green=0.6),
    "BWh": _Style((214, 178, 120), (186, 146, 92), "dunes", *_DUSTY_SKY, 0.1, (160, 128, 98), haze=0.25),
    "BWk": _Style((178, 160, 132), (146, 126, 102), "rock", *_DUSTY_SKY, 0.6, (142, 116, 96), snowline=0.8,
                  winter_snow=0.1, haze=0.2),
    "BSh": _Style((190, 170, 104), (148, 140, 72), "patchy", *_DUSTY_SKY, 0.15, (150, 128, 100), green=0.25,
                  haze=0.2),
    "BSk": _Style((166, 150, 110), (128, 120, 86), "patchy", *_BLUE_SKY, 0.55, (126, 110, 96), green=0.2,
                  snowline=0.75, winter_snow=0.25, haze=0.12),
    "Csa": _Style((130, 150, 70), (100, 120, 50), "fields", *_BLUE_SKY, 0.35, (118, 112, 100), green=0.6,
                  snowline=0.85, winter_snow=0.05),
    "Csb": _Style((105, 140, 70), (80, 110, 55), "fields", *_BLUE_SKY, 0.5, (112, 108, 104), green=0.6,
                  snowline=0.8, winter_snow=0.15, treeline=0.3),
    "Cwa": _Style((95, 150, 60), (140, 170, 70), "fields", *_BLUE_SKY, 0.1, green=0.85, haze=0.15),
    "Cwb": _Style((80, 135, 65), (60, 100, 50), "forest", *_BLUE_SKY, 0.5, (104, 110, 108), green=0.7,
                  snowline=0.8, winter_snow=0.1, treeline=0.6),
    "Cfa": _Style((85, 145, 65), (122, 165, 80), "fields", *_BLUE_SKY, 0.15, green=0.85, haze=0.15),
    "Cfb": _Style((70, 125, 70), (50, 95, 55), "forest", *_BLUE_SKY, 0.6, (100, 106, 110), green=0.7,
                  snowline=0.75, winter_snow=0.2, treeline=0.7),
    "Dsb": _Style((128, 118, 102), (96, 92, 84), "rock", (60, 115, 210), (175, 200, 230), 0.9, (112, 112, 120),
                  green=0.2, snowline=0.55, winter_snow=0.6, treeline=0.4),
    "Dfc": _Style((48, 78, 54), (96, 100, 98), "forest", (60, 115, 210), (175, 200, 230), 0.9, (108, 110, 122),
                  green=0.3, snowline=0.5, winter_snow=0.75, treeline=0.9),
    "ET": _Style((150, 150, 152), (232, 238, 246), "snow", (55, 110, 210), (190, 210, 235), 1.0, (128, 130, 140),
                 snowline=0.3, winter_snow=0.9),
    "EF": _Style((236, 241, 250), (198, 214, 236), "snow", (50, 105, 210), (200, 218, 240), 1.0, (210, 220, 235),
                 snowline=0.1, winter_snow=1.0),
}
for _code, _like in (("Csc", "Csb"), ("Cwc", "Cwb"), ("Cfc", "Cfb"), ("Dsa", "Dsb"), ("Dsc", "Dsb"),
                     ("Dsd", "Dsb"), ("Dwa", "Dfc"), ("Dwb", "Dfc"), ("Dwc", "Dfc"), ("Dwd", "Dfc"), ("Dfa", "Dfc"),
                     ("Dfd", "Dfc"), ("Af", "Aw"), ("Am", "Aw")):
    _STYLES[_code] = _STYLES[_like]  # classes that barely occur in Pakistan share a close neighbour's look
# Dfb (forest below the Dfc belt) is a little greener and has less snow than Dfc.
_STYLES["Dfb"] = _Style((62, 96, 60), (100, 108, 96), "forest", (60, 115, 210), (175, 200, 230), 0.8,
                        (108, 110, 122), green=0.4, snowline=0.6, winter_snow=0.6, treeline=0.8)


def _style(koppen_id: int) -> _Style:
    from pipeline.core.koppen_classes import KOPPEN_CODES

    if 0 <= koppen_id < len(KOPPEN_CODES):
        return _STYLES[KOPPEN_CODES[koppen_id]]
    return _STYLES["BWh"]  # outside the raster: the region's most common class


def _noise(rng: np.random.Generator, h: int, w: int, cells_x: int, cells_y: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: a small random grid upsampled bicubically (cheap and good enough)."""
    grid = Image.fromarray(rng.random((cells_y + 1, cells_x + 1), dtype=np.float32), mode="F")
    return np.clip(np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC)), 0.0, 1.0)


def _lerp(a: np.ndarray | float, b: Any, t: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float32) + (np.asarray(b, dtype=np.float32) - a) * t


_SEASON_GROUND: dict[str, tuple[RGB, float]] = {  # vegetation target colour and weight (times style.green)
    "winter": ((138, 124, 92), 0.55),
    "spring": ((112, 172, 70), 0.35),
    "summer": ((70, 140, 52), 0.25),
    "autumn": ((176, 142, 62), 0.45),
}
_SEASON_TINT: dict[str, RGB] = {
    "winter": (0.94, 0.98, 1.06),
    "spring": (1.0, 1.02, 0.98),
    "summer": (1.05, 1.0, 0.92),
    "autumn": (1.05, 0.99, 0.93),
}
_SNOW: RGB = (236, 240, 248)


def _ground(rng: np.random.Generator, st: _Style, base: np.ndarray, accent: np.ndarray, h: int, w: int,
            hy: int) -> np.ndarray:
    """Ground below the horizon (rows hy..h), textured in a rough ground-plane perspective."""
    gh = h - hy
    y = (np.arange(gh, dtype=np.float32)[:, None] + 1.0) / gh  # 0 at the horizon, 1 at the bottom
    x = (np.arange(w, dtype=np.float32)[None, :] - w / 2) / w
    z = np.minimum(1.0 / y, 40.0)  # distance
    gx = x * z  # lateral position on the ground plane
    n1 = _noise(rng, gh, w, 6, 3)
    n2 = _noise(rng, gh, w, 24, 10)
    t = st.texture
    if t == "dunes":
        f, g, ph = rng.uniform(4, 9), rng.uniform(0.6, 1.4), rng.uniform(0, 2 * np.pi)
        v = 0.5 + 0.5 * np.sin(gx * f + z * g + ph + 3.0 * n1)
        mix = 0.55 * v + 0.3 * n2
    elif t == "fields":
        sx, sz = rng.uniform(0.25, 0.6), rng.uniform(0.6, 1.6)
        ix = np.floor(gx / sx + rng.uniform(0, 1)).astype(np.int64)
        iz = np.floor(z / sz + rng.uniform(0, 1)).astype(np.int64)
        lut = rng.random(61).astype(np.float32)
        cell = lut[((ix * 92837111) ^ (iz * 689287499)) % 61]
        furrow = 0.5 + 0.5 * np.sin(gx * rng.uniform(40, 70) * np.where(cell > 0.5, 1.0, 0.3))
        mix = 0.8 * cell + 0.12 * furrow + 0.15 * n2
        fallow = cell > 0.8  # some fields ploughed bare
        out = _lerp(base, accent, np.clip(mix, 0, 1)[..., None])
        out[fallow] = _lerp(out[fallow], (150, 122, 86), 0.6)
        return out
    elif t == "forest":
        mix = np.where(n2 > 0.55, 0.9, 0.25 * n1)
    elif t == "rock":
        n3 = _noise(rng, gh, w, 48, 20)
        mix = 0.5 * n1 + 0.35 * n3 + 0.25 * (n2 > 0.7)
    elif t == "snow":
        rockiness = rng.uniform(0.45, 0.75)
        out = _lerp(np.asarray(_SNOW, np.float32), accent, n1[..., None] * 0.7)
        rocks = (0.6 * n2 + 0.4 * n1) > rockiness
        out[rocks] = _lerp(base, (90, 90, 96), n2[rocks][:, None])
        return out
    elif t == "water":
        v = 0.5 + 0.5 * np.sin(z * rng.uniform(6, 14) + 2.5 * n2 + gx * rng.uniform(-1, 1))
        out = _lerp(base, accent, (0.6 * v + 0.4 * n1)[..., None])
        out[v > 0.97] = _lerp(out[v > 0.97], (230, 235, 240), 0.6)
        return out
    else:  # patchy grass / scrub
        mix = 0.6 * n1 + 0.4 * n2
        mix = np.where(n2 > 0.72, 1.0, mix)  # bushes
    return _lerp(base, accent, np.clip(mix, 0, 1)[..., None])


def _mountains(rng: np.random.Generator, img: np.ndarray, st: _Style, hy: int, snowline: float,
               haze_rgb: np.ndarray) -> None:
    """One or two ridge silhouettes above the horizon, far ridge hazier, snow above ``snowline``."""
    h, w, _ = img.shape
    yy = np.arange(hy, dtype=np.float32)[:, None]
    for layer in range(int(rng.integers(1, 3))):
        height = rng.uniform(0.25, 0.75) * hy * (1.0 if layer == 0 else 0.6)
        k = int(rng.integers(3, 8))
        ridge = np.interp(np.arange(w), np.linspace(0, w - 1, k), rng.random(k))
        ridge += 0.25 * np.interp(np.arange(w), np.linspace(0, w - 1, 4 * k), rng.random(4 * k))
        ridge = (ridge - ridge.min()) / max(float(np.ptp(ridge)), 1e-6)
        top = hy - height * (0.35 + 0.65 * ridge)  # y of the ridge per column
        mask = yy >= top[None, :]
        rel = ((hy - yy) / max(height, 1.0))  # 0 at the horizon, ~1 at the highest peak
        col = np.asarray(st.mountain, np.float32) * (0.85 + 0.3 * rng.random())
        far = 0.45 if layer == 0 else 0.15
        shade = (0.9 + 0.2 * np.sin(np.arange(w) * rng.uniform(0.05, 0.2)))[None, :, None]
        m = _lerp(col * shade, haze_rgb, far)
        wobble = np.interp(np.arange(w), np.linspace(0, w - 1, 3 * k), rng.uniform(-0.08, 0.08, 3 * k))
        snow = rel[..., None] > snowline + wobble[None, :, None]
        m = np.where(snow, _lerp(np.asarray(_SNOW, np.float32), haze_rgb, far * 0.5), m)
        img[:hy][mask] = m[mask]


def _draw_treeline(rng: np.random.Generator, draw: ImageDraw.ImageDraw, w: int, hy: int, h: int) -> None:
    """A band of conifer triangles along the horizon plus a few foreground trees."""
    x = -5.0
    base_h = h * rng.uniform(0.04, 0.09)
    while x < w + 5:
        th = base_h * rng.uniform(0.6, 1.5)
        tw = th * rng.uniform(0.35, 0.55)
        g = int(rng.integers(35, 70))
        draw.polygon([(x, hy + 2), (x + tw / 2, hy - th), (x + tw, hy + 2)], fill=(g // 2, g, g // 2 + 8))
        x += tw * rng.uniform(0.5, 0.9)
    for _ in range(int(rng.integers(0, 6))):
        bx, by = rng.uniform(0, w), rng.uniform(hy + 0.1 * (h - hy), h)
        th = (by - hy) * rng.uniform(0.5, 1.2)
        tw = th * 0.4
        draw.polygon([(bx, by), (bx + tw / 2, by - th), (bx + tw, by)], fill=(25, 55, 32))
