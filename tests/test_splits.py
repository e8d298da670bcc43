"""Splits: no val/test image within 1 km of train, owners (or owner-days) and places kept whole, stratified, seeded."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from pipeline.geocells.geometry import km_to_chord, unit_vectors
from pipeline.geocells.splits import (
    BUFFER,
    SplitConfig,
    close_pairs,
    leakage_count,
    make_splits,
    naive_split,
    owner_overlap,
)

# (lat, lon) of a few towns per province id, for clustered synthetic data
TOWNS = {
    0: [(24.86, 67.01), (25.39, 68.37), (27.70, 68.86), (26.24, 68.40)],
    1: [(31.55, 74.34), (30.20, 71.47), (31.42, 73.08), (32.16, 74.19)],
    5: [(30.18, 66.99), (26.01, 63.06), (28.88, 64.41), (29.60, 66.20)],
}


def _ids(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def _clustered(n_per_town: int = 150, sigma_km: float = 1.5, seed: int = 0) -> pd.DataFrame:
    """Photos scattered around towns (sparse enough that most are not within 1 km of each other)."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid, towns in TOWNS.items():
        for lat0, lon0 in towns:
            dy, dx = rng.normal(0, sigma_km, (2, n_per_town))
            rows.append(pd.DataFrame({"lat": lat0 + dy / 111.32, "lon": lon0 + dx / (111.32 * np.cos(np.radians(lat0))),
                                      "province_id": pid}))
    df = pd.concat(rows, ignore_index=True)
    n = len(df)
    df["image_id"] = _ids(n, f"s{seed}")
    df["place_id"] = None
    df["owner"] = [f"owner{i % 40}" for i in range(n)]
    df["taken_at"] = pd.Timestamp("2015-01-01", tz="UTC") + pd.to_timedelta(rng.integers(0, 3000, n), unit="D")
    return df


def test_no_leak_within_1km_and_naive_split_leaks():
    df = _clustered(sigma_km=3.0)
    res = make_splits(df, SplitConfig())
    split = df[["image_id"]].merge(res.table, on="image_id")["split"].to_numpy()
    assert leakage_count(df["lat"], df["lon"], split, 1.0) == 0 == res.summary["leaks_within_km"]
    # brute-force check of the guarantee
    u = unit_vectors(df["lat"], df["lon"])
    train, held = split == "train", np.isin(split, ["val", "test"])
    assert held.sum() > 0.1 * len(df)
    pairs = cKDTree(u[train]).query_ball_point(u[held], km_to_chord(1.0))
    assert sum(len(p) for p in pairs) == 0
    naive = naive_split(df["province_id"].to_numpy(), SplitConfig())
    assert leakage_count(df["lat"], df["lon"], naive, 1.0) > 0
    assert res.summary["naive_random_split_leaks_within_km"] > 0


def test_place_and_owner_day_groups_are_kept_whole_with_the_switch_off():
    df = _clustered(n_per_town=60, sigma_km=20.0, seed=1)  # sparse: proximity rarely joins anything
    n = len(df)
    df["owner"] = [f"o{i}" for i in range(n)]  # everybody distinct ...
    df.loc[0:9, "place_id"] = "ChIJ-same-place"  # ... except a place shared by 10 images far apart
    df.loc[20:29, "owner"] = "traveller"  # one owner, one local day (UTC+5), far-apart places
    df.loc[20:24, "taken_at"] = pd.Timestamp("2020-05-01 10:00", tz="UTC")
    df.loc[25:29, "taken_at"] = pd.Timestamp("2020-05-01 18:30", tz="UTC")  # 23:30 local, same day
    df.loc[30:34, "owner"] = "night-owl"
    df.loc[30:34, "taken_at"] = pd.Timestamp("2020-05-01 10:00", tz="UTC")
    df.loc[35:39, "owner"] = "night-owl"
    df.loc[35:39, "taken_at"] = pd.Timestamp("2020-05-01 19:30", tz="UTC")  # 00:30 local: the next day
    owner_groups = make_splits(df, SplitConfig()).table.set_index("image_id")["group_id"]
    assert owner_groups.loc[df.loc[30:39, "image_id"]].nunique() == 1  # default: the owner's days are one group
    res = make_splits(df, SplitConfig(owner_disjoint=False))  # the switch: only an owner's local day is kept whole
    t = df[["image_id"]].merge(res.table, on="image_id")
    assert t.loc[0:9, "group_id"].nunique() == 1 and t.loc[0:9, "split"].nunique() == 1
    assert t.loc[20:29, "group_id"].nunique() == 1 and t.loc[20:29, "split"].nunique() == 1
    assert t.loc[30:34, "group_id"].nunique() == 1
    assert t.loc[30:34, "group_id"].iloc[0] != t.loc[35:39, "group_id"].iloc[0]
    # images of different groups that are > 1 km apart are free to differ
    assert res.summary["groups"] > 0.8 * n


def test_stratified_per_province_within_tolerance():
    df = _clustered(n_per_town=400, sigma_km=15.0, seed=2)
    res = make_splits(df, SplitConfig(train=0.7, val=0.15, test=0.15, owner_disjoint=False))
    pp = res.per_province.set_index("province")
    assert (pp["buffer"] == 0).all()
    for share, target in (("train_share", 0.7), ("val_share", 0.15), ("test_share", 0.15)):
        assert (pp[share] - target).abs().max() < 0.02, pp


@pytest.mark.parametrize("owner_disjoint", [True, False])
def test_deterministic_and_independent_of_row_order(owner_disjoint):
    df = _clustered(seed=3)
    df["owner"] = [f"owner{i % 200}" for i in range(len(df))]
    a = make_splits(df, SplitConfig(seed=7, owner_disjoint=owner_disjoint)).table
    b = make_splits(df.sample(frac=1.0, random_state=1), SplitConfig(seed=7, owner_disjoint=owner_disjoint)).table
    m = a.merge(b, on="image_id", suffixes=("_a", "_b"))
    assert len(m) == len(df) and (m["split_a"] == m["split_b"]).all() and (m["group_id_a"] == m["group_id_b"]).all()
    c = make_splits(df, SplitConfig(seed=8, owner_disjoint=owner_disjoint)).table
    assert not (c["split"] == a["split"]).all()
    assert (a["image_id"] == df["image_id"]).all()  # output follows the input's row order


def test_giant_city_is_cut_into_tiles_with_a_buffer():
    rng = np.random.default_rng(4)
    n = 3000  # one dense city: a single 1 km component
    dy, dx = rng.normal(0, 8, (2, n))
    df = pd.DataFrame({"lat": 24.86 + dy / 111.32, "lon": 67.01 + dx / 101.0, "province_id": 0,
                       "image_id": _ids(n, "city"), "place_id": None, "owner": None, "taken_at": pd.NaT})
    res = make_splits(df, SplitConfig())  # no owners known: grouped as in owner×day mode
    s = res.summary
    assert s["images_without_owner"] == n and s["groups_cut_into_tiles"] == 1 and s["largest_group"] > 0.8 * n
    assert s["val_images"] > 0.05 * n and s["test_images"] > 0.05 * n
    assert 0 < s["buffer_images"] < 0.3 * n and s["leaks_within_km"] == 0
    split = df[["image_id"]].merge(res.table, on="image_id")["split"].to_numpy()
    assert leakage_count(df["lat"], df["lon"], split, 1.0) == 0
    assert (split == BUFFER).sum() == s["buffer_images"]


def _brute_components(lat, lon, km):
    u = unit_vectors(lat, lon)
    p = cKDTree(u).query_pairs(km_to_chord(km), output_type="ndarray")
    g = coo_matrix((np.ones(len(p)), (p[:, 0], p[:, 1])), shape=(len(lat), len(lat)))
    return connected_components(g, directed=False)[1]


@pytest.mark.parametrize("shape", ["scatter", "line", "duplicates"])
def test_close_pairs_match_a_brute_force_radius_query(shape):
    rng = np.random.default_rng(5)
    if shape == "scatter":
        lat, lon = 30 + rng.uniform(0, 0.5, 4000), 70 + rng.uniform(0, 0.5, 4000)
    elif shape == "line":  # collinear: Delaunay is degenerate, the radius-query fallback runs
        x = np.sort(rng.uniform(0, 0.5, 500))
        lat, lon = 30 + x, 70 + x
    else:
        lat, lon = np.repeat(30 + rng.uniform(0, 0.2, 300), 3), np.repeat(70 + rng.uniform(0, 0.2, 300), 3)
    e = close_pairs(lat, lon, 1.0)
    g = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(len(lat), len(lat)))
    ours = connected_components(g, directed=False)[1]
    exact, loose = _brute_components(lat, lon, 1.0), _brute_components(lat, lon, 1.01)
    # exact components ⊆ ours ⊆ components at 1.01 km (the projection margin)
    assert pd.Series(ours).groupby(exact).nunique().max() == 1
    assert pd.Series(loose).groupby(ours).nunique().max() == 1


def test_config_validation_and_empty_input():
    with pytest.raises(ValueError):
        SplitConfig(train=0.8, val=0.3, test=0.1)
    with pytest.raises(ValueError):
        SplitConfig(min_distance_km=0)
    empty = pd.DataFrame({c: [] for c in ("image_id", "lat", "lon", "province_id", "place_id", "owner", "taken_at")})
    assert make_splits(empty).table.empty
    with pytest.raises(ValueError, match="columns"):
        make_splits(empty.drop(columns="owner"))


def _owner_splits(df: pd.DataFrame, table: pd.DataFrame) -> pd.Series:
    """Number of distinct splits (buffer excluded) per known owner."""
    t = df[["image_id", "owner"]].merge(table, on="image_id")
    t = t[(t["split"] != BUFFER) & t["owner"].notna()]
    return t.groupby("owner")["split"].nunique()


def _assert_no_leak(df: pd.DataFrame, table: pd.DataFrame) -> np.ndarray:
    split = df[["image_id"]].merge(table, on="image_id")["split"].to_numpy()
    u = unit_vectors(df["lat"], df["lon"])
    train, held = split == "train", np.isin(split, ["val", "test"])
    assert sum(len(p) for p in cKDTree(u[train]).query_ball_point(u[held], km_to_chord(1.0))) == 0
    return split


def test_owner_disjoint_by_default_and_switch_restores_owner_day():
    df = _clustered(sigma_km=3.0, seed=6)
    rng = np.random.default_rng(6)
    df["owner"] = [f"owner{i}" for i in rng.integers(0, 150, len(df))]  # owners shoot across towns and provinces
    df.loc[rng.choice(len(df), 100, replace=False), "owner"] = None  # unknown owners: unconstrained
    res = make_splits(df, SplitConfig())
    s = res.summary
    assert s["owners_in_train_and_heldout"] == 0 == s["heldout_images_with_train_owner"]
    assert s["heldout_share_with_train_owner"] == 0.0 and s["owners"] == 150 and s["images_without_owner"] == 100
    assert _owner_splits(df, res.table).max() == 1
    split = _assert_no_leak(df, res.table)
    assert s["leaks_within_km"] == 0 and np.isin(split, ["val", "test"]).mean() > 0.12
    anon = df["owner"].isna().to_numpy()
    assert len(set(split[anon]) - {BUFFER}) > 1  # images of no known owner still go to several splits
    old = make_splits(df, SplitConfig(owner_disjoint=False))
    assert old.summary["owners_in_train_and_heldout"] > 100 and old.summary["heldout_share_with_train_owner"] > 0.9
    assert _owner_splits(df, old.table).max() > 1
    _assert_no_leak(df, old.table)
    assert "owners" not in old.summary  # owner×day grouping, as before the switch existed


def test_dense_city_of_many_owners_shares_the_buffer_loss():
    """100 owners all over one dense city: buffering only train would lose most of it; both sides lose alike."""
    rng = np.random.default_rng(4)
    n = 3000
    dy, dx = rng.normal(0, 8, (2, n))
    df = pd.DataFrame({"lat": 24.86 + dy / 111.32, "lon": 67.01 + dx / 101.0, "province_id": 0,
                       "image_id": _ids(n, "owners"), "place_id": None,
                       "owner": [f"o{i}" for i in rng.integers(0, 100, n)],
                       "taken_at": pd.Timestamp("2020-01-01", tz="UTC")})
    res = make_splits(df, SplitConfig())
    s = res.summary
    _assert_no_leak(df, res.table)
    assert s["owners_in_train_and_heldout"] == 0 and _owner_splits(df, res.table).max() == 1
    assert s["groups"] == 100  # one group per owner
    train_kept = s["train_images"] / (0.8 * n)
    held_kept = (s["val_images"] + s["test_images"]) / (0.2 * n)
    assert train_kept > 0.45 and held_kept > 0.45 and abs(train_kept - held_kept) < 0.2, s


def test_default_sample_world_is_owner_disjoint_and_keeps_most_images():
    from pipeline.sources.sample_world import SampleWorldConfig, plan_sample_world

    plan = plan_sample_world(SampleWorldConfig())
    df = plan[["lat", "lon", "province_id", "owner", "taken_at"]].assign(image_id=_ids(len(plan), "sw"), place_id=None)
    res = make_splits(df, SplitConfig())
    s = res.summary
    assert s["owners_in_train_and_heldout"] == 0 and s["leaks_within_km"] == 0
    assert s["buffer_images"] < 0.08 * len(df)
    assert s["val_images"] > 0.08 * len(df) and s["test_images"] > 0.08 * len(df)
    pp = res.per_province.set_index("province")
    assert ((pp["val_share"] + pp["test_share"]) > 0.05).all(), pp
    old = make_splits(df, SplitConfig(owner_disjoint=False)).summary
    assert old["heldout_share_with_train_owner"] > 0.9


def test_owner_overlap_counts():
    split = np.array(["train", "val", "test", "val", "buffer", "test", "train"])
    owner = np.array(["a", "a", "b", "c", "c", None, ""], dtype=object)
    # a: train + val (shared); b: test only; c: val + buffer; None / "": unknown
    assert owner_overlap(owner, split) == (1, 1, 3)
