"""Train / val / test splits that keep places and photographers apart (GEOPAK split images at random and leaked
places).

Groups go to one split whole. **Owner-disjoint** (default, ``owner_disjoint=True``): groups are the connected
components of the same ``owner`` ∪ the same ``place_id``, so no photographer has images in two splits (a model
must not meet a val/test photographer's style or haunts in training); images of no known owner are grouped as in
owner×day mode. **Owner×day** (``owner_disjoint=False``, the former behaviour): components of

- **proximity**: two images within ``min_distance_km`` (1 km) of each other. Components come from the Delaunay
  triangulation on an azimuthal equidistant plane (the Euclidean minimum spanning tree is a subgraph of it), so
  dense cities cost O(n log n), not the millions of pairs a radius query would return;
- **place**: the same ``place_id`` (a Google place, a landmark);
- **owner-day**: the same ``owner`` on the same local day (``taken_at`` + ``utc_offset_hours``).

A dense city is one giant component at 1 km. Putting it whole into train would leave val and test without the
most photographed places, so groups larger than ``max(min_group_to_tile, max_group_share · n_province)`` are cut
into ``tile_km`` square tiles (still joined by place; an owner's day then joins images within one tile only, so a
day trip across town does not re-join the city). Owner×day groups are assigned per province (a group's
province is its members' most common one) in a seeded random order, each to the split furthest below its target
fraction; owner groups, which span provinces, by the same rule weighted over the provinces they touch. Finally
the 1 km rule is enforced by ``buffer`` (in no split; :func:`separate`): train images within 1 km of a val or
test image — and, owner-disjoint, val/test images crowded by train images — so no val/test image lies within
1 km of a train image. Deterministic for a given set of images and seed (rows are processed in ``image_id``
order). No Dagster here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import Delaunay, QhullError, cKDTree

from pipeline.core.fields import check_fields, doc_field
from pipeline.core.provinces import BY_ID, PAKISTAN_UTC_OFFSET_HOURS
from pipeline.core.schema import SPLITS_SCHEMA
from pipeline.geocells.geometry import EARTH_RADIUS_KM, Projector, arc_km, km_to_chord, unit_vectors

TRAIN, VAL, TEST, BUFFER = "train", "val", "test", "buffer"
SPLITS = (TRAIN, VAL, TEST)
SPLIT_COLUMNS = tuple(SPLITS_SCHEMA.names)  # the schema is the one definition of the table's columns
SPLIT_INPUTS = ("image_id", "lat", "lon", "province_id", "place_id", "owner", "taken_at")  # make_splits reads these
MAX_CROWD = 32  # owner-disjoint: the most train neighbours a val/test image may keep (see separate)
QUERY_ROWS = 1 << 20  # neighbour slots per KD-tree query chunk (8 MB of distances): bounds memory at 10 M rows


@dataclass(frozen=True)
class SplitConfig:
    # Each field's doc and bounds are what the Launchpad shows and what __post_init__ checks (pipeline.core.fields).
    train: float = doc_field(0.8, "target share of images in train (train + val + test must sum to 1)", ge=0.0, le=1.0)
    val: float = doc_field(0.1, "target share of images in val", ge=0.0, le=1.0)
    test: float = doc_field(0.1, "target share of images in test", ge=0.0, le=1.0)
    seed: int = doc_field(0, "seed of the order in which groups are assigned to splits", ge=0)
    min_distance_km: float = doc_field(1.0, "no val/test image lies within this many km of a train image", gt=0.0)
    max_group_share: float = doc_field(0.05, "groups larger than this share of their province's images are tiled",
                                       ge=0.0, le=1.0)
    min_group_to_tile: int = doc_field(50, "groups smaller than this many images are never tiled", ge=1)
    tile_km: float = doc_field(10.0, "side of the square tiles a giant group is cut into (km)", gt=0.0)
    utc_offset_hours: float = doc_field(PAKISTAN_UTC_OFFSET_HOURS, "UTC offset of the owner's local day (Pakistan "
                                        "Standard Time: +5)", ge=-12.0, le=14.0)
    owner_disjoint: bool = doc_field(True, "all of an owner's images in one split; false: only each owner's local "
                                     "day")

    def __post_init__(self) -> None:
        check_fields(self)
        fr = (self.train, self.val, self.test)
        if abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {fr}")

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
    """Integer code per row for a shared identity (place id); -1 where it is null or empty. Codes count from 0 in
    order of first appearance, whether ``keys`` holds strings or categories (:func:`read_split_inputs`)."""
    if isinstance(keys.dtype, pd.CategoricalDtype):  # the codes already tell identities apart: no strings made
        codes = keys.cat.codes.to_numpy().astype(np.int64)
        empty = np.flatnonzero(keys.cat.categories.astype("string").str.len().to_numpy() == 0)
        codes[np.isin(codes, empty)] = -1
        out = np.full(len(codes), -1, dtype=np.int64)
        valid = codes >= 0
        out[valid] = pd.factorize(codes[valid])[0]
        return out
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
    """Group id per row (rows in the given order): proximity ∪ place ∪ owner-day, giant groups cut into tiles.

    With ``cfg.owner_disjoint`` the owner relation replaces owner-day (see :func:`owner_groups`).
    """
    if cfg.owner_disjoint:
        return owner_groups(df, cfg)
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


def owner_groups(df: pd.DataFrame, cfg: SplitConfig) -> tuple[np.ndarray, dict]:
    """Group id per row: owner ∪ place, so no owner spans two splits (a model must not meet a val/test
    photographer's style or haunts in training).

    Proximity does not join owners — with it, a few owners who shoot in several cities would chain the whole
    country into one group; the 1 km rule is enforced afterwards by buffering (:func:`separate`). Images of no
    known owner are grouped as in owner×day mode (proximity ∪ place, giant groups tiled), then joined to owners
    by place.
    """
    n = len(df)
    who = key_codes(df["owner"])
    anon = np.flatnonzero(who < 0)
    edges = [code_pairs(who), code_pairs(key_codes(df["place_id"]))]
    info = {"proximity_groups": 0, "largest_group": 0, "groups_cut_into_tiles": 0, "images_in_cut_groups": 0}
    if len(anon):
        sub = df.iloc[anon].reset_index(drop=True)
        sub_groups, info = location_groups(sub, replace(cfg, owner_disjoint=False))
        codes = np.full(n, -1, dtype=np.int64)
        codes[anon] = sub_groups
        edges.append(code_pairs(codes))
    groups = _components(n, edges)
    owner_sizes = np.bincount(groups[who >= 0], minlength=groups.max() + 1)
    info = {**info, "owners": int(who.max() + 1), "images_without_owner": int(len(anon)),
            "largest_owner_group": int(owner_sizes.max(initial=0))}
    return groups, info


def assign_groups(groups: np.ndarray, province_id: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per group, stratified by the group's province, seeded."""
    if cfg.owner_disjoint:
        return assign_spread_groups(groups, province_id, cfg)
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


def assign_spread_groups(groups: np.ndarray, province_id: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """Split index per group for groups that span provinces (an owner travels), stratified per province, seeded.

    Groups come in one seeded random order; each goes to the split whose shortfall against its target fraction,
    summed over the provinces the group touches and weighted by its images there, is largest. For a group in one
    province this is :func:`assign_groups`' rule; a group's minority provinces count too, so a province where no
    owner has most of their photos still gets its val and test images.
    """
    n_groups = int(groups.max()) + 1
    pcode, _ = pd.factorize(np.asarray(province_id), sort=True)
    n_prov = int(pcode.max()) + 1
    keys, cnt = np.unique(groups.astype(np.int64) * n_prov + pcode, return_counts=True)
    start = np.searchsorted(keys // n_prov, np.arange(n_groups + 1)).tolist()
    prov_of, cnt_l = (keys % n_prov).tolist(), cnt.tolist()
    fr = cfg.fractions.tolist()
    total = [0.0] * n_prov
    counts = [[0.0, 0.0, 0.0] for _ in range(n_prov)]
    out = np.zeros(n_groups, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x0A11]))
    for g in rng.permutation(n_groups).tolist():
        members = list(zip(prov_of[start[g] : start[g + 1]], cnt_l[start[g] : start[g + 1]]))
        score = [0.0, 0.0, 0.0]
        for p, c in members:
            total[p] += c
            for k in range(3):
                score[k] += c * (fr[k] * total[p] - counts[p][k])
        k = max(range(3), key=score.__getitem__)
        for p, c in members:
            counts[p][k] += c
        out[g] = k
    return out


def _near_counts(u_from: np.ndarray, u_to: np.ndarray, km: float, cap: int) -> np.ndarray:
    """Per row of ``u_from``: how many rows of ``u_to`` lie within ``km`` (great circle), counted up to ``cap``."""
    out = np.zeros(len(u_from), dtype=np.int64)
    if len(u_to) == 0 or len(u_from) == 0 or cap < 1:
        return out
    k = min(cap, len(u_to))
    tree = cKDTree(u_to)
    step = max(1, QUERY_ROWS // k)  # k neighbours a row: chunks keep the (rows, k) arrays small at 10 M rows
    for lo in range(0, len(u_from), step):
        chord, _ = tree.query(u_from[lo : lo + step], k=k, distance_upper_bound=km_to_chord(km) * 1.001)
        chord = np.asarray(chord).reshape(-1, k)
        ok = np.isfinite(chord)
        out[lo : lo + step] = (ok & (arc_km(np.where(ok, chord, 0.0)) <= km)).sum(axis=1)
    return out


def separate(
    lat: np.ndarray, lon: np.ndarray, province_id: np.ndarray, split: np.ndarray, cfg: SplitConfig
) -> np.ndarray:
    """Enforce the 1 km rule: a copy of ``split`` where no val/test image lies within ``min_distance_km`` of train.

    Owner×day mode: train images within reach of a val/test image become ``buffer`` (groups are spatial, so this
    happens only at the tiles of a cut city). Owner-disjoint mode: groups are not spatial, so in a dense city a
    held-out owner's photo sits among dozens of other owners' train photos, and buffering only train would lose
    most of a city's training images. There a val/test image with more than ``t`` train images of its province
    within reach becomes ``buffer`` itself instead; per province, ``t`` is chosen (binary search, neighbours
    counted up to ``MAX_CROWD``) so that the larger of the two relative losses — train images lost / train,
    val+test images lost / val+test — is smallest: neither side pays for the rule much more than the other.
    """
    split = split.copy()
    held = np.isin(split, [VAL, TEST])
    train = split == TRAIN
    if not held.any() or not train.any():
        return split
    u = unit_vectors(lat, lon)
    km = cfg.min_distance_km
    if cfg.owner_disjoint:
        province_id = np.asarray(province_id)
        for pid in np.unique(province_id):
            h = np.flatnonzero(held & (province_id == pid))
            t = np.flatnonzero(train & (province_id == pid))
            if len(h) and len(t):
                keep = _balanced_keep(u[h], u[t], km)
                split[h[~keep]] = BUFFER
        held = np.isin(split, [VAL, TEST])
    t = np.flatnonzero(train)
    split[t[_near_counts(u[t], u[held], km, 1) > 0]] = BUFFER
    return split


def _balanced_keep(u_held: np.ndarray, u_train: np.ndarray, km: float) -> np.ndarray:
    """Which val/test images to keep: those with at most ``t`` train images within ``km``, ``t`` minimising the
    larger relative loss (train buffered for the kept ones / train, val+test dropped / val+test)."""
    crowd = _near_counts(u_held, u_train, km, MAX_CROWD + 1)
    thresholds = [*range(MAX_CROWD + 1), MAX_CROWD + 1]  # the last keeps every val/test image
    memo: dict[int, tuple[float, float]] = {}

    def cost(i: int) -> tuple[float, float]:
        if i not in memo:
            keep = crowd <= thresholds[i]
            lost = float((_near_counts(u_train, u_held[keep], km, 1) > 0).sum())
            memo[i] = (lost / len(u_train), 1.0 - float(keep.sum()) / len(u_held))
        return memo[i]

    lo, hi = 0, len(thresholds) - 1  # first threshold at which the train loss reaches the val/test loss
    while lo < hi:
        mid = (lo + hi) // 2
        train_loss, held_loss = cost(mid)
        lo, hi = (lo, mid) if train_loss >= held_loss else (mid + 1, hi)
    best = min({lo, max(lo - 1, 0)}, key=lambda i: (max(cost(i)), sum(cost(i)), i))
    return crowd <= thresholds[best]


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


def owner_overlap(owner: pd.Series | np.ndarray, split: np.ndarray) -> tuple[int, int, int]:
    """(owners with images in train and in val/test, val/test images whose owner has train images, val/test
    images with a known owner) — how much a model could learn a held-out photographer in training."""
    who = key_codes(owner if isinstance(owner, pd.Series) else pd.Series(np.asarray(owner, dtype=object)))
    split = np.asarray(split)
    held = np.isin(split, [VAL, TEST]) & (who >= 0)
    in_train = np.zeros(int(who.max()) + 2, dtype=bool)  # index -1 (unknown) lands on the spare last slot
    in_train[who[(split == TRAIN) & (who >= 0)]] = True
    shared = np.intersect1d(np.flatnonzero(in_train[:-1]), who[held])
    return int(len(shared)), int(in_train[who[held]].sum()), int(held.sum())


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


def id_order(image_id: pd.Series | pa.Array | pa.ChunkedArray, check_unique: bool = True) -> np.ndarray:
    """Row order by ``image_id`` (code point order, as sorting Python strings), sorted in Arrow: at 10 M rows a
    NumPy unicode copy of the ids alone would take 2.6 GB. Raises ValueError for null ids, and for repeated ids
    with ``check_unique`` (a hash table of every id: skip it where the ids are known unique)."""
    if isinstance(image_id, pa.ChunkedArray):
        image_id = image_id.combine_chunks()
    ids = image_id if isinstance(image_id, pa.Array) else pa.array(image_id, from_pandas=True)
    if not pa.types.is_string(ids.type) and not pa.types.is_large_string(ids.type):
        ids = pc.cast(ids, pa.string())
    if ids.null_count:
        raise ValueError(f"image_id must not be null ({ids.null_count} nulls)")
    if check_unique and pc.count_distinct(ids).as_py() != len(ids):
        raise ValueError("image_id must be unique")
    order = pc.sort_indices(ids).to_numpy().astype(np.int64)  # UTF-8 byte order is code point order
    pa.default_memory_pool().release_unused()  # the hash table and sort buffers, held by mimalloc otherwise
    return order


def read_split_inputs(path: str | Path) -> pd.DataFrame:
    """The labelled table's columns :func:`make_splits` reads, compact: ids stay Arrow strings, owner and place
    become categories (4 bytes a row instead of a string each), province int8 (about 110 bytes a row in all)."""
    table = pq.read_table(path, columns=list(SPLIT_INPUTS))
    for name in ("owner", "place_id"):
        col = table[name]
        if pa.types.is_null(col.type):  # a column written all-null by pandas: no category may be null
            col = col.cast(pa.string())
        table = table.set_column(table.schema.get_field_index(name), name, pc.dictionary_encode(col))
    df = table.to_pandas(types_mapper={pa.string(): pd.ArrowDtype(pa.string()),
                                       pa.large_string(): pd.ArrowDtype(pa.large_string())}.get)
    df["province_id"] = df["province_id"].astype(np.int8)
    del table
    pa.default_memory_pool().release_unused()  # decoding buffers: mimalloc keeps them otherwise (~1 GB at 10 M)
    return df


def make_splits(df: pd.DataFrame, cfg: SplitConfig = SplitConfig()) -> SplitResult:
    """Location-disjoint splits for ``df`` (image_id, lat, lon, province_id, place_id, owner, taken_at)."""
    needed = SPLIT_INPUTS
    missing = [c for c in needed if c not in df]
    if missing:
        raise ValueError(f"make_splits needs columns {missing}")
    order = id_order(df["image_id"])
    # the ids themselves are not copied: the table gets them back in the input's order
    d = df[list(needed[1:])].iloc[order].reset_index(drop=True)
    n = len(d)
    if n == 0:
        empty = pd.DataFrame({"image_id": pd.Series(dtype=str), "split": pd.Series(dtype=str),
                              "group_id": pd.Series(dtype="int64")})
        return SplitResult(empty, pd.DataFrame(), {"images": 0})
    lat, lon, prov = d["lat"].to_numpy(float), d["lon"].to_numpy(float), d["province_id"].to_numpy(np.int64)
    groups, info = location_groups(d, cfg)
    split = np.array(SPLITS, dtype=object)[assign_groups(groups, prov, cfg)[groups]]
    split = separate(lat, lon, prov, split, cfg)
    naive = naive_split(prov, cfg)
    split_out, groups_out = np.empty(n, dtype=object), np.empty(n, dtype=np.int64)
    split_out[order], groups_out[order] = split, groups  # back to the input's row order
    table = pd.DataFrame({"image_id": df["image_id"].reset_index(drop=True), "split": split_out,
                          "group_id": groups_out})
    per_province = (
        pd.crosstab(prov, split).reindex(columns=[*SPLITS, BUFFER], fill_value=0).rename_axis(index=None, columns=None)
    )
    per_province.insert(0, "groups", pd.Series(groups).groupby(prov).nunique())
    per_province.insert(0, "images", per_province[[*SPLITS, BUFFER]].sum(axis=1))
    for s in SPLITS:
        per_province[f"{s}_share"] = per_province[s] / per_province["images"]
    per_province.insert(0, "province", [BY_ID[int(p)].key if int(p) in BY_ID else str(p) for p in per_province.index])
    shared_owners, held_with_train_owner, held_with_owner = owner_overlap(d["owner"], split)
    summary = {
        "images": n,
        "groups": int(groups.max() + 1),
        **info,
        "buffer_images": int((split == BUFFER).sum()),
        **{f"{s}_images": int((split == s).sum()) for s in SPLITS},
        "leaks_within_km": leakage_count(lat, lon, split, cfg.min_distance_km),
        "owners_in_train_and_heldout": shared_owners,
        "heldout_images_with_train_owner": held_with_train_owner,
        "heldout_share_with_train_owner": held_with_train_owner / max(held_with_owner, 1),
        "naive_random_split_leaks_within_km": leakage_count(lat, lon, naive, cfg.min_distance_km),
        "naive_random_split_held_out": int(np.isin(naive, [VAL, TEST]).sum()),
    }
    return SplitResult(table, per_province.reset_index(drop=True), summary)
