"""Train / val / test splits that keep places apart (GEOPAK split images at random and leaked places).

Groups are the connected components of three relations, and a group goes to one split whole:

- **proximity**: two images within ``min_distance_km`` (1 km) of each other. Components come from the Delaunay
  triangulation on an azimuthal equidistant plane (the Euclidean minimum spanning tree is a subgraph of it), so
  dense cities cost O(n log n), not the millions of pairs a radius query would return;
- **place**: the same ``place_id`` (a Google place, a landmark);
- **owner-day**: the same ``owner`` on the same local day (``taken_at`` + ``utc_offset_hours``).

A dense city is one giant component at 1 km. Putting it whole into train would leave val and test without the
most photographed places, so groups larger than ``max(min_group_to_tile, max_group_share · n_province)`` are cut
into ``tile_km`` square tiles (still joined by place; an owner's day then joins images within one tile only, so a
day trip across town does not re-join the city). Groups are assigned per province (a group's
province is its members' most common one) in a seeded random order, each to the split furthest below its target
fraction. Finally every train image within ``min_distance_km`` of a val or test image — possible only across the
tiles of a cut group — becomes ``buffer`` (in no split), so no val/test image lies within 1 km of a train image.
Deterministic for a given set of images and seed (rows are processed in ``image_id`` order). No Dagster here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import Delaunay, QhullError, cKDTree

from pipeline.core.provinces import BY_ID
from pipeline.geocells.geometry import EARTH_RADIUS_KM, Projector, arc_km, km_to_chord, unit_vectors

TRAIN, VAL, TEST, BUFFER = "train", "val", "test", "buffer"
SPLITS = (TRAIN, VAL, TEST)
SPLIT_COLUMNS = ("image_id", "split", "group_id")


@dataclass(frozen=True)
class SplitConfig:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    seed: int = 0
    min_distance_km: float = 1.0
    max_group_share: float = 0.05
    min_group_to_tile: int = 50
    tile_km: float = 10.0
    utc_offset_hours: float = 5.0  # Pakistan Standard Time, for the owner's local day

    def __post_init__(self) -> None:
        fr = (self.train, self.val, self.test)
        if min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be ≥ 0 and sum to 1, got {fr}")
        if self.min_distance_km <= 0 or self.tile_km <= 0:
            raise ValueError("min_distance_km and tile_km must be positive")

    @property
    def fractions(self) -> np.ndarray:
        return np.array([self.train, self.val, self.test])


@dataclass
class SplitResult:
    table: pd.DataFrame  # SPLIT_COLUMNS, in the input's row order
    per_province: pd.DataFrame
    summary: dict


def _components(n: int, edges: list[np.ndarray]) -> np.ndarray:
    """Connected components of the graph on ``n`` nodes, labelled 0.. in order of each one's first node."""
    e = np.concatenate([x for x in edges if len(x)] or [np.empty((0, 2), dtype=np.int64)])
    graph = coo_matrix((np.ones(len(e), dtype=np.int8), (e[:, 0], e[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.ravel()]


def close_pairs(lat: np.ndarray, lon: np.ndarray, km: float) -> np.ndarray:
    """Edges (i, j) whose connected components join every pair of points within ``km`` (great circle).

    Delaunay edges up to ``km`` times the projection's largest scale factor (a slight over-merge, never an
    under-merge), plus edges between identical coordinates; a radius query when the points are degenerate.
    """
    n = len(lat)
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    coords = np.column_stack([np.asarray(lat, float), np.asarray(lon, float)])
    inverse = _row_codes(coords, np.ones(n, dtype=bool))
    first = np.full(inverse.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, inverse, np.arange(n))
    uniq = coords[first]
    dup = np.flatnonzero(first[inverse] != np.arange(n))
    edges = [np.column_stack([dup, first[inverse[dup]]])]
    proj = Projector.centred_on(uniq[:, 0], uniq[:, 1])
    xy = proj.xy(uniq[:, 0], uniq[:, 1])
    rho = float(np.sqrt((xy**2).sum(axis=1)).max()) / EARTH_RADIUS_KM  # largest angular distance from the centre
    scale = rho / np.sin(rho) if 1e-9 < rho < np.pi else 1.0  # aeqd's largest (tangential) scale factor
    try:
        if len(uniq) < 3:
            raise QhullError("fewer than 3 distinct points")
        tri = Delaunay(xy)
        s = tri.simplices
        pairs = np.concatenate([s[:, [0, 1]], s[:, [1, 2]], s[:, [0, 2]]])
        length = np.sqrt(((xy[pairs[:, 0]] - xy[pairs[:, 1]]) ** 2).sum(axis=1))
        pairs = pairs[length <= km * scale * (1 + 1e-9)]
    except (QhullError, ValueError):  # collinear or too few points: exact radius query on the sphere
        u = unit_vectors(uniq[:, 0], uniq[:, 1])
        pairs = cKDTree(u).query_pairs(km_to_chord(km) * (1 + 1e-9), output_type="ndarray")
    edges.append(first[pairs])
    return np.concatenate(edges).astype(np.int64)


def key_codes(keys: pd.Series) -> np.ndarray:
    """Integer code per row for a shared identity (place id); -1 where it is null or empty."""
    text = keys.astype("string")
    codes, _ = pd.factorize(text.where(text.str.len() > 0), use_na_sentinel=True)
    return np.asarray(codes, dtype=np.int64)


def owner_day_codes(owner: pd.Series, taken_at: pd.Series, utc_offset_hours: float) -> np.ndarray:
    """Code per (owner, local calendar day); -1 where the owner or the time is unknown."""
    local = pd.to_datetime(taken_at, utc=True) + pd.Timedelta(hours=utc_offset_hours)
    day = local.dt.floor("D")
    who = key_codes(owner)
    ok = (who >= 0) & day.notna().to_numpy()
    return _row_codes(np.column_stack([who, day.to_numpy("datetime64[s]").astype(np.int64)]), ok)


def _row_codes(keys: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Code per distinct row of ``keys`` (2-D) where ``ok``; -1 elsewhere. Hash-based, O(n)."""
    out = np.full(len(keys), -1, dtype=np.int64)
    if ok.any():
        k = keys[ok]
        code = pd.factorize(k[:, 0])[0].astype(np.int64)
        for col in k.T[1:]:
            c, uniq = pd.factorize(col)
            code = pd.factorize(code * len(uniq) + c)[0].astype(np.int64)
        out[ok] = code
    return out


def code_pairs(codes: np.ndarray) -> np.ndarray:
    """Edges joining every row to the first row with the same code (codes < 0 join nothing)."""
    rows = np.flatnonzero(codes >= 0)
    if len(rows) == 0:
        return np.empty((0, 2), dtype=np.int64)
    _, first = np.unique(codes[rows], return_index=True)
    first_row = np.empty(codes.max() + 1, dtype=np.int64)
    first_row[codes[rows][first]] = rows[first]
    return np.column_stack([rows, first_row[codes[rows]]])


def _mode_per_group(groups: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Most common value per group (ties → the smallest value)."""
    frame = pd.DataFrame({"g": groups, "v": values})
    counts = frame.groupby(["g", "v"]).size().reset_index(name="n")
    counts = counts.sort_values(["g", "n", "v"], ascending=[True, False, True], kind="stable")
    return counts.drop_duplicates("g").set_index("g")["v"].reindex(np.arange(groups.max() + 1)).to_numpy()


def location_groups(df: pd.DataFrame, cfg: SplitConfig) -> tuple[np.ndarray, dict]:
    """Group id per row (rows in the given order): proximity ∪ place ∪ owner-day, giant groups cut into tiles."""
    n = len(df)
    lat, lon = df["lat"].to_numpy(float), df["lon"].to_numpy(float)
    near = close_pairs(lat, lon, cfg.min_distance_km)
    place = code_pairs(key_codes(df["place_id"]))
    owner_day = owner_day_codes(df["owner"], df["taken_at"], cfg.utc_offset_hours)
    first = _components(n, [near, place, code_pairs(owner_day)])
    sizes = np.bincount(first)
    prov = df["province_id"].to_numpy(np.int64)
    per_province = pd.Series(prov).value_counts()
    group_prov = _mode_per_group(first, prov)
    limit = np.maximum(cfg.min_group_to_tile, cfg.max_group_share * per_province.reindex(group_prov).to_numpy())
    giant = sizes > limit
    info = {"proximity_groups": int(len(sizes)), "largest_group": int(sizes.max(initial=0)),
            "groups_cut_into_tiles": int(giant.sum()), "images_in_cut_groups": int(sizes[giant].sum())}
    if not giant.any():
        return first, info
    in_giant = giant[first]
    keep = ~in_giant[near[:, 0]]  # both ends share a component, so one end tells
    xy = Projector.centred_on(lat, lon).xy(lat, lon)
    tile = _row_codes(np.column_stack([first, np.floor(xy / cfg.tile_km).astype(np.int64)]), in_giant)
    # inside a cut group an owner's day links images of one tile only (a day trip must not re-join the city)
    # (tile is -1 outside cut groups, and an owner-day never spans a cut and an uncut group)
    owner_day = _row_codes(np.column_stack([owner_day, tile]), owner_day >= 0)
    return _components(n, [near[keep], code_pairs(tile), place, code_pairs(owner_day)]), info


def assign_groups(groups: np.ndarray, province_id: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per group, stratified by the group's province, seeded."""
    sizes = np.bincount(groups)
    group_prov = _mode_per_group(groups, province_id)
    out = np.zeros(len(sizes), dtype=np.int64)
    fr = cfg.fractions
    for pid in np.unique(group_prov):
        gs = np.flatnonzero(group_prov == pid)
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, int(pid), 0x5B11]))
        counts = np.zeros(3)
        total = 0.0
        for g in gs[rng.permutation(len(gs))]:
            total += sizes[g]
            k = int(np.argmax(fr * total - counts))
            counts[k] += sizes[g]
            out[g] = k
    return out


def leakage_count(lat: np.ndarray, lon: np.ndarray, split: np.ndarray, km: float = 1.0) -> int:
    """How many val/test images lie within ``km`` of a train image (great circle)."""
    split = np.asarray(split)
    train = split == TRAIN
    held = np.isin(split, [VAL, TEST])
    if not train.any() or not held.any():
        return 0
    u = unit_vectors(lat, lon)
    chord, _ = cKDTree(u[train]).query(u[held], k=1, distance_upper_bound=km_to_chord(km) * (1 + 1e-9))
    return int(np.sum(arc_km(np.where(np.isfinite(chord), chord, 4.0)) <= km))


def naive_split(province_id: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """GEOPAK's kind of split, for comparison: random per image, stratified by province."""
    province_id = np.asarray(province_id)
    out = np.empty(len(province_id), dtype=object)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x4A1E]))
    for pid in np.unique(province_id):
        rows = np.flatnonzero(province_id == pid)
        rows = rows[rng.permutation(len(rows))]
        n_train = int(round(cfg.train * len(rows)))
        n_val = int(round(cfg.val * len(rows)))
        out[rows[:n_train]] = TRAIN
        out[rows[n_train : n_train + n_val]] = VAL
        out[rows[n_train + n_val :]] = TEST
    return out


def make_splits(df: pd.DataFrame, cfg: SplitConfig = SplitConfig()) -> SplitResult:
    """Location-disjoint splits for ``df`` (image_id, lat, lon, province_id, place_id, owner, taken_at)."""
    missing = [c for c in ("image_id", "lat", "lon", "province_id", "place_id", "owner", "taken_at") if c not in df]
    if missing:
        raise ValueError(f"make_splits needs columns {missing}")
    if df["image_id"].duplicated().any():
        raise ValueError("image_id must be unique")
    order = np.argsort(df["image_id"].to_numpy().astype(str), kind="stable")
    d = df.iloc[order].reset_index(drop=True)
    n = len(d)
    if n == 0:
        empty = pd.DataFrame({"image_id": pd.Series(dtype=str), "split": pd.Series(dtype=str),
                              "group_id": pd.Series(dtype="int64")})
        return SplitResult(empty, pd.DataFrame(), {"images": 0})
    lat, lon, prov = d["lat"].to_numpy(float), d["lon"].to_numpy(float), d["province_id"].to_numpy(np.int64)
    groups, info = location_groups(d, cfg)
    split = np.array(SPLITS, dtype=object)[assign_groups(groups, prov, cfg)[groups]]
    held = np.isin(split, [VAL, TEST])
    train = np.flatnonzero(split == TRAIN)
    if held.any() and len(train):
        u = unit_vectors(lat, lon)
        chord, _ = cKDTree(u[held]).query(u[train], k=1, distance_upper_bound=km_to_chord(cfg.min_distance_km) * 1.001)
        near = np.isfinite(chord) & (arc_km(np.where(np.isfinite(chord), chord, 0.0)) <= cfg.min_distance_km)
        split[train[near]] = BUFFER
    naive = naive_split(prov, cfg)
    table = pd.DataFrame({"image_id": d["image_id"].to_numpy(), "split": split, "group_id": groups})
    back = np.empty(n, dtype=np.int64)
    back[order] = np.arange(n)
    table = table.iloc[back].reset_index(drop=True)
    per_province = (
        pd.crosstab(prov, split).reindex(columns=[*SPLITS, BUFFER], fill_value=0).rename_axis(index=None, columns=None)
    )
    per_province.insert(0, "groups", pd.Series(groups).groupby(prov).nunique())
    per_province.insert(0, "images", per_province[[*SPLITS, BUFFER]].sum(axis=1))
    for s in SPLITS:
        per_province[f"{s}_share"] = per_province[s] / per_province["images"]
    per_province.insert(0, "province", [BY_ID[int(p)].key if int(p) in BY_ID else str(p) for p in per_province.index])
    summary = {
        "images": n,
        "groups": int(groups.max() + 1),
        **info,
        "buffer_images": int((split == BUFFER).sum()),
        **{f"{s}_images": int((split == s).sum()) for s in SPLITS},
        "leaks_within_km": leakage_count(lat, lon, split, cfg.min_distance_km),
        "naive_random_split_leaks_within_km": leakage_count(lat, lon, naive, cfg.min_distance_km),
        "naive_random_split_held_out": int(np.isin(naive, [VAL, TEST]).sum()),
    }
    return SplitResult(table, per_province.reset_index(drop=True), summary)
