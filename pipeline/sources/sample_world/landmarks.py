"""Per-place landmark silhouettes and clutter: pure functions of the GeoNames id."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import ImageDraw

Shape = tuple[str, tuple[float, ...], tuple[int, int, int]]  # kind, unit coordinates, colour

LANDMARK_KINDS: tuple[str, ...] = ("mosque", "tower", "gate", "fort", "clock_tower", "shrine", "skyline")


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


@lru_cache(maxsize=2048)
def landmark_shapes(geonameid: int) -> tuple[str, tuple[Shape, ...]]:
    """The landmark of a place: its kind and shapes in unit coordinates (x centred, y up from the ground).

    Deterministic in the geonameid alone (not the seed): a place looks the same in every sample world.
    """
    r = np.random.default_rng(np.random.SeedSequence([int(geonameid), 0x1A4D]))
    kind = LANDMARK_KINDS[int(r.integers(len(LANDMARK_KINDS)))]
    hue = float(r.random())
    main = _hsv(hue, r.uniform(0.35, 0.85), r.uniform(0.55, 0.95))
    second = _hsv(hue + r.uniform(0.25, 0.75), r.uniform(0.4, 0.9), r.uniform(0.45, 0.95))
    dark = _hsv(hue, 0.5, r.uniform(0.12, 0.3))
    s: list[Shape] = []

    def rect(x0: float, y0: float, x1: float, y1: float, c: tuple[int, int, int]) -> None:
        s.append(("rect", (x0, y0, x1, y1), c))

    def ell(cx: float, cy: float, rx: float, ry: float, c: tuple[int, int, int]) -> None:
        s.append(("ellipse", (cx - rx, cy - ry, cx + rx, cy + ry), c))

    def poly(pts: Sequence[float], c: tuple[int, int, int]) -> None:
        s.append(("poly", tuple(pts), c))

    def windows(x0: float, y0: float, x1: float, y1: float, nx: int, ny: int) -> None:
        dx, dy = (x1 - x0) / nx, (y1 - y0) / ny
        for i in range(nx):
            for j in range(ny):
                rect(x0 + (i + 0.3) * dx, y0 + (j + 0.3) * dy, x0 + (i + 0.7) * dx, y0 + (j + 0.75) * dy, dark)

    if kind == "mosque":
        hw, hh = r.uniform(0.3, 0.45), r.uniform(0.22, 0.38)
        rect(-hw, 0, hw, hh, main)
        dr = r.uniform(0.14, 0.24)
        ell(0, hh, dr, dr * r.uniform(0.9, 1.3), second)
        rect(-0.008, hh + dr * 1.2, 0.008, hh + dr * 1.2 + 0.08, second)
        if r.random() < 0.6:
            for sx in (-1, 1):
                ell(sx * hw * 0.6, hh, dr * 0.45, dr * 0.5, second)
        ell(0, hh * 0.3, 0.07, 0.08, dark)
        rect(-0.07, 0, 0.07, hh * 0.3, dark)
        nm = int(r.choice([2, 4]))
        mh, mw = r.uniform(0.65, 1.0), r.uniform(0.03, 0.06)
        xs = [-hw - mw, hw + mw] if nm == 2 else [-hw - mw, -hw * 0.55, hw * 0.55, hw + mw]
        for mx in xs:
            rect(mx - mw / 2, 0, mx + mw / 2, mh, main)
            rect(mx - mw, mh * 0.7, mx + mw, mh * 0.73, second)
            poly((mx - mw / 2, mh, mx, mh + mw * 2.5, mx + mw / 2, mh), second)
    elif kind == "tower":
        bw, tw, th = r.uniform(0.12, 0.2), r.uniform(0.04, 0.09), r.uniform(0.8, 1.05)
        poly((-bw, 0, -tw, th, tw, th, bw, 0), main)
        for k in range(int(r.integers(2, 6))):
            y = th * (k + 1) / 7.0
            wy = bw + (tw - bw) * y / th
            rect(-wy - 0.01, y, wy + 0.01, y + 0.025, second)
        ell(0, th, tw * 1.3, tw * 1.1, second)
    elif kind == "gate":
        gw, gh = r.uniform(0.38, 0.55), r.uniform(0.35, 0.55)
        rect(-gw, 0, gw, gh, main)
        na = int(r.integers(1, 4))
        aw = gw * 2 / (2 * na + 1)
        for k in range(na):
            x0 = -gw + aw * (2 * k + 1)
            rect(x0, 0, x0 + aw, gh * 0.55, dark)
            ell(x0 + aw / 2, gh * 0.55, aw / 2, aw / 2, dark)
        for k in range(int(r.integers(2, 5))):
            cx = -gw * 0.8 + 1.6 * gw * k / 3
            rect(cx - 0.03, gh, cx + 0.03, gh + 0.06, second)
            ell(cx, gh + 0.06, 0.045, 0.04, second)
    elif kind == "fort":
        fw, fh = r.uniform(0.5, 0.65), r.uniform(0.18, 0.3)
        rect(-fw, 0, fw, fh, main)
        teeth = int(r.integers(8, 16))
        for k in range(teeth):
            x0 = -fw + 2 * fw * k / teeth
            rect(x0, fh, x0 + fw / teeth, fh + 0.035, main)
        for k in range(int(r.integers(2, 4))):
            cx = -fw + 2 * fw * (k + 0.5) / 3 if k < 3 else 0
            rect(cx - 0.07, 0, cx + 0.07, fh * 1.45, second)
            ell(cx, fh * 1.45, 0.07, 0.05, second)
        rect(-0.05, 0, 0.05, fh * 0.6, dark)
    elif kind == "clock_tower":
        cw, ch = r.uniform(0.09, 0.14), r.uniform(0.65, 0.9)
        rect(-cw, 0, cw, ch, main)
        ell(0, ch * 0.82, cw * 0.7, cw * 0.7, (240, 238, 225))
        poly((-cw * 1.2, ch, 0, ch + r.uniform(0.12, 0.25), cw * 1.2, ch), second)
        windows(-cw * 0.8, ch * 0.1, cw * 0.8, ch * 0.65, 2, int(r.integers(3, 6)))
    elif kind == "shrine":
        bw, bh = r.uniform(0.25, 0.38), r.uniform(0.15, 0.25)
        rect(-bw, 0, bw, bh, main)
        rect(-bw * 0.6, bh, bw * 0.6, bh + 0.08, main)
        dr = bw * r.uniform(0.55, 0.75)
        ell(0, bh + 0.08, dr, dr * r.uniform(1.0, 1.4), second)
        poly((-dr * 0.3, bh + 0.08 + dr * 1.1, 0, bh + 0.08 + dr * 1.6, dr * 0.3, bh + 0.08 + dr * 1.1), second)
        for k in range(int(r.integers(2, 6))):
            x0 = -bw + 2 * bw * (k + 0.5) / 5
            rect(x0, bh * 0.1, x0 + bw * 0.15, bh * 0.7, dark)
    else:  # skyline: a few towers with lit windows
        nb = int(r.integers(3, 6))
        x = -0.5
        for _ in range(nb):
            bw, bh = r.uniform(0.12, 0.22), r.uniform(0.35, 1.0)
            col = main if r.random() < 0.6 else second
            rect(x, 0, x + bw, bh, col)
            windows(x + 0.01, bh * 0.08, x + bw - 0.01, bh * 0.92, 3, int(r.integers(4, 9)))
            x += bw + r.uniform(0.0, 0.05)
    return kind, tuple(s)


def _draw_landmark(draw: ImageDraw.ImageDraw, geonameid: int, cx: float, base_y: float, scale: float) -> None:
    _, shapes = landmark_shapes(int(geonameid))
    for kind, c, col in shapes:
        if kind == "poly":
            pts = [(cx + c[i] * scale, base_y - c[i + 1] * scale) for i in range(0, len(c), 2)]
            draw.polygon(pts, fill=col)
        else:
            x0, y0, x1, y1 = cx + c[0] * scale, base_y - c[3] * scale, cx + c[2] * scale, base_y - c[1] * scale
            box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            (draw.rectangle if kind == "rect" else draw.ellipse)(box, fill=col)


@lru_cache(maxsize=2048)
def place_palette(geonameid: int) -> tuple[tuple[int, int, int], ...]:
    """A place's building materials (three colours): brick, whitewash, concrete, mud... fixed per geonameid."""
    r = np.random.default_rng(np.random.SeedSequence([int(geonameid), 0xB41C]))
    hue = float(r.random())
    return tuple(_hsv(hue + r.uniform(-0.08, 0.08), r.uniform(0.15, 0.5), r.uniform(0.45, 0.9)) for _ in range(3))


def _draw_clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, w: int, h: int, hy: int,
                  population: int, geonameid: int) -> None:
    """Low buildings along the horizon in the place's own materials; more of them for bigger places."""
    k = int(np.clip((math.log10(max(population, 1)) - 2.5) * 3.0, 2, 14))
    palette = place_palette(geonameid)
    for _ in range(k):
        bw, bh = w * rng.uniform(0.05, 0.14), h * rng.uniform(0.04, 0.18)
        x0 = rng.uniform(-bw / 2, w)
        base = palette[int(rng.integers(len(palette)))]
        f = rng.uniform(0.9, 1.08)
        col = tuple(int(min(255, c * f)) for c in base)
        draw.rectangle((x0, hy - bh, x0 + bw, hy + 2), fill=col)
        if rng.random() < 0.5:  # a darker row of windows
            wy = hy - bh * rng.uniform(0.4, 0.7)
            draw.rectangle((x0 + bw * 0.15, wy, x0 + bw * 0.85, wy + max(1.0, bh * 0.12)),
                           fill=tuple(int(c * 0.45) for c in base))


def _hut(rng: np.random.Generator, draw: ImageDraw.ImageDraw, w: int, h: int, hy: int) -> None:
    """The generic rural structure: a mud-brick hut, the same kind everywhere."""
    s = h * rng.uniform(0.06, 0.14)
    x = rng.uniform(0.1, 0.8) * w
    y = hy + (h - hy) * rng.uniform(0.05, 0.4)
    draw.rectangle((x, y - s, x + 1.6 * s, y), fill=(150, 118, 84))
    draw.rectangle((x + 0.6 * s, y - 0.55 * s, x + 0.95 * s, y), fill=(60, 44, 32))
