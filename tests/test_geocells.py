"""Geocells: caps hold on adversarial inputs, merges respect caps, noise and tiny provinces, polygons, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import shapely

from pipeline.geocells.cells import (
    CELL_COLUMNS,
    GeocellConfig,
    _ProvinceFit,
    assign_cells,
    build_geocells,
    cell_neighbours,
    cell_polygons,
    province_areas_km2,
    province_target,
    urban_mask,
)
from pipeline.geocells.geometry import Projector, haversine_km, unit_vectors

KARACHI = (24.86, 67.01)
DESERT = (27.0, 64.0)  # central Balochistan, far from any town of 100k


def _offsets(lat0, lon0, dx_km, dy_km):
    """Points dx/dy km east/north of (lat0, lon0) (small-distance approximation, fine for tests)."""
    lat = lat0 + np.asarray(dy_km) / 111.32
    lon = lon0 + np.asarray(dx_km) / (111.32 * np.cos(np.radians(lat0)))
    return lat, lon


def _assert_caps(lat, lon, built, n):
    """Every point is in a cell, within that cell's cap by an independent haversine; radii match members."""
    cells = built.cells.set_index("cell_id")
    assert (built.members >= 0).all() and len(built.members) == n
    c = cells.loc[built.members]
    d = haversine_km(lat, lon, c["center_lat"].to_numpy(), c["center_lon"].to_numpy())
    assert np.all(d <= c["cap_km"].to_numpy() + 1e-6)
    assert (cells["radius_km"] <= cells["cap_km"] + 1e-9).all()
    radius = pd.Series(d).groupby(built.members).max()
    np.testing.assert_allclose(radius.to_numpy(), cells.loc[radius.index, "radius_km"].to_numpy(), atol=1e-6)
    counts = np.bincount(built.members, minlength=len(cells))
    assert (counts[cells.index] == cells["count"].to_numpy()).all() and counts.sum() == n
    # the centre is one of the members
    for cid, grp in pd.DataFrame({"lat": lat, "lon": lon, "cell": built.members}).groupby("cell"):
        row = cells.loc[cid]
        assert ((grp["lat"] == row["center_lat"]) & (grp["lon"] == row["center_lon"])).any()


def test_caps_hold_on_one_long_line():
    rng = np.random.default_rng(0)
    dx = np.sort(rng.uniform(0, 700, 3000))  # a 700 km road, rural
    lat, lon = _offsets(*DESERT, dx, rng.normal(0, 0.05, 3000))
    built = build_geocells(lat, lon, np.full(3000, 5), GeocellConfig())
    _assert_caps(lat, lon, built, 3000)
    assert len(built.cells) >= 700 / 100  # 50 km radius: at least one cell per 100 km of road
    assert not built.cells["urban"].any()


def test_caps_hold_for_dense_city_and_sparse_desert():
    rng = np.random.default_rng(1)
    c_lat, c_lon = _offsets(*KARACHI, rng.normal(0, 8, 4000), rng.normal(0, 8, 4000))
    d_lat, d_lon = _offsets(*DESERT, rng.uniform(-300, 300, 300), rng.uniform(-300, 300, 300))
    lat, lon = np.concatenate([c_lat, d_lat]), np.concatenate([c_lon, d_lon])
    built = build_geocells(lat, lon, np.zeros(len(lat), dtype=int), GeocellConfig())
    _assert_caps(lat, lon, built, len(lat))
    cells = built.cells
    assert cells["urban"].any() and (~cells["urban"]).any()
    assert (cells.loc[cells["urban"], "radius_km"] <= 5.0 + 1e-9).all()
    # the city is not hundreds of near-empty cells
    assert cells.loc[cells["urban"], "count"].median() >= 20


def test_caps_hold_with_duplicates_and_identical_points():
    rng = np.random.default_rng(2)
    lat, lon = _offsets(*DESERT, rng.uniform(-200, 200, 400), rng.uniform(-200, 200, 400))
    lat = np.concatenate([lat, np.full(600, DESERT[0]), lat[:100]])  # 600 copies of one point, 100 exact repeats
    lon = np.concatenate([lon, np.full(600, DESERT[1]), lon[:100]])
    built = build_geocells(lat, lon, np.full(len(lat), 5), GeocellConfig())
    _assert_caps(lat, lon, built, len(lat))
    same = build_geocells(np.full(50, 30.0), np.full(50, 70.0), np.full(50, 1), GeocellConfig())
    assert len(same.cells) == 1 and same.cells["radius_km"].iloc[0] == 0.0 and same.cells["count"].iloc[0] == 50


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_tiny_provinces_get_cells_without_crashing(n):
    rng = np.random.default_rng(n)
    lat, lon = _offsets(*DESERT, rng.uniform(-150, 150, n), rng.uniform(-150, 150, n))
    built = build_geocells(lat, lon, np.full(n, 6), GeocellConfig())
    _assert_caps(lat, lon, built, n)
    assert 1 <= len(built.cells) <= n
    assert list(built.cells.columns) == list(CELL_COLUMNS)


def test_empty_input_gives_empty_table():
    built = build_geocells(np.array([]), np.array([]), np.array([], dtype=int))
    assert built.cells.empty and list(built.cells.columns) == list(CELL_COLUMNS)


def test_deterministic_and_seeded_subsample():
    rng = np.random.default_rng(3)
    lat, lon = _offsets(*KARACHI, rng.normal(0, 10, 3000), rng.normal(0, 10, 3000))
    prov = np.zeros(3000, dtype=int)
    cfg = GeocellConfig(max_fit_points=500)  # forces HDBSCAN on a seeded sample + nearest-label propagation
    a = build_geocells(lat, lon, prov, cfg)
    b = build_geocells(lat, lon, prov, cfg)
    pd.testing.assert_frame_equal(a.cells, b.cells)
    assert np.array_equal(a.members, b.members)
    assert "fitted on 500 of 3000" in a.provinces["notes"].iloc[0]
    _assert_caps(lat, lon, a, 3000)


def _fit_for(lat, lon, urban, cfg=GeocellConfig()):
    xy = Projector.centred_on(lat, lon).xy(lat, lon)
    return _ProvinceFit(xy, unit_vectors(lat, lon), np.asarray(urban, bool), cfg)


@pytest.mark.parametrize("urban", [False, True])
def test_min_size_merge_only_when_the_cap_still_holds(urban):
    rng = np.random.default_rng(4)
    a = _offsets(*DESERT, rng.normal(0, 0.3, 30), rng.normal(0, 0.3, 30))  # big cell
    b = _offsets(*DESERT, 3 + rng.normal(0, 0.1, 2), rng.normal(0, 0.1, 2))  # small, 3 km away
    c = _offsets(*DESERT, 30 + rng.normal(0, 0.1, 2), rng.normal(0, 0.1, 2))  # small, 30 km away
    lat, lon = np.concatenate([a[0], b[0], c[0]]), np.concatenate([a[1], b[1], c[1]])
    fit = _fit_for(lat, lon, np.full(34, urban))
    cells = [fit.stats(np.arange(30)), fit.stats(np.arange(30, 32)), fit.stats(np.arange(32, 34))]
    merged = fit.merge_small(cells, min_cell=5)
    assert all(cl.radius <= cl.cap for cl in merged)
    sizes = sorted(len(cl.idx) for cl in merged)
    if urban:  # 5 km cap: the near one merges, the far one stays on its own
        assert sizes == [2, 32]
    else:  # 50 km cap: both merge
        assert sizes == [34]


def test_noise_joins_a_cell_within_cap_or_forms_new_cells():
    rng = np.random.default_rng(5)
    core = _offsets(*DESERT, rng.normal(0, 0.5, 40), rng.normal(0, 0.5, 40))
    near = _offsets(*DESERT, [10.0], [0.0])
    far = _offsets(*DESERT, [200.0, 201.0], [0.0, 0.0])
    lat = np.concatenate([core[0], near[0], far[0]])
    lon = np.concatenate([core[1], near[1], far[1]])
    fit = _fit_for(lat, lon, np.zeros(43))
    cells = fit.absorb_noise([fit.stats(np.arange(40))], np.array([40, 41, 42]))
    assert sorted(len(cl.idx) for cl in cells) == [2, 41]
    assert all(cl.radius <= cl.cap for cl in cells)


def test_province_target_formula():
    cfg = GeocellConfig()
    sindh = province_target(65_000, 137_700, cfg)
    assert sindh.target == round(np.sqrt(65_000 * 137_700 / 125_000))
    assert province_target(3_600, 352_500, cfg).target > province_target(3_600, 900, cfg).target
    assert province_target(4_700, 900, cfg).target == 6  # Islamabad: few cells despite many images
    assert province_target(2, 10_000, cfg).target <= 2
    assert province_target(10**7, 10**6, cfg).target == cfg.max_cells


def test_urban_rule():
    lat = np.array([KARACHI[0], DESERT[0], 24.86 + 30 / 111.32])
    lon = np.array([KARACHI[1], DESERT[1], 67.01])
    assert urban_mask(lat, lon).tolist() == [True, False, False]


def test_assignment_neighbours_and_polygons(boundaries):
    from pipeline.sources.sample_world import SampleWorldConfig, plan_sample_world

    plan = plan_sample_world(SampleWorldConfig(n_images=600, defect_fraction=0.0))
    lat, lon, prov = plan["lat"].to_numpy(), plan["lon"].to_numpy(), plan["province_id"].to_numpy()
    built = build_geocells(lat, lon, prov, GeocellConfig(), province_areas_km2(boundaries.polygons))
    _assert_caps(lat, lon, built, len(lat))
    cells = built.cells
    assert (cells["cell_id"] == np.arange(len(cells))).all()
    assert cells["province_id"].is_monotonic_increasing
    assert (cells.groupby("province_id")["local_id"].apply(lambda s: (s == np.arange(len(s))).all())).all()
    assert set(cells["province_id"]) == set(range(7))

    # every fitted point assigned to its own cell again; a far point gets the nearest cell, flagged beyond cap
    cid, dist, within = assign_cells(lat, lon, prov, cells)
    assert np.array_equal(cid, built.members) and within.all()
    far_cid, far_d, far_in = assign_cells([29.0], [61.5], [5], cells)
    assert cells.set_index("cell_id").loc[far_cid[0], "province_id"] == 5 and far_d[0] > 0
    with pytest.raises(ValueError, match="no geocells"):
        assign_cells([30.0], [70.0], [9], cells)

    nb = cell_neighbours(cells, k=8)
    prov_of = cells.set_index("cell_id")["province_id"]
    assert (prov_of.loc[nb["cell_id"]].to_numpy() == prov_of.loc[nb["neighbour_id"]].to_numpy()).all()
    assert (nb["cell_id"] != nb["neighbour_id"]).all()
    assert nb.groupby("cell_id")["distance_km"].apply(lambda s: s.is_monotonic_increasing).all()
    sizes = cells.groupby("province_id").size()
    assert (nb.groupby("cell_id").size() == np.minimum(8, sizes.loc[prov_of.loc[nb["cell_id"].unique()]] - 1)
            .to_numpy()).all()

    polys = cell_polygons(cells, boundaries.polygons)
    assert len(polys) == len(cells) and polys.crs.to_epsg() == 4326
    assert polys.geometry.is_valid.all() and not polys.geometry.is_empty.any()
    for row in polys.itertuples():
        assert boundaries.polygons[row.province_id].buffer(1e-7).covers(row.geometry)
    centres = shapely.points(cells["center_lon"], cells["center_lat"])
    assert all(g.buffer(1e-7).covers(p) for g, p in zip(polys.geometry, centres))
    for pid, grp in polys.groupby("province_id"):  # the cells tile their province
        assert shapely.union_all(grp.geometry.to_numpy()).area == pytest.approx(boundaries.polygons[pid].area,
                                                                                rel=1e-6)
    no_boundary = cell_polygons(cells, None)
    assert no_boundary.geometry.is_valid.all()


@pytest.mark.parametrize("bad", [{"urban_cap_km": 0}, {"min_cells": 0}, {"cluster_selection_method": "x"},
                                 {"cells_scale": 0}, {"max_cells": 0}])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        GeocellConfig(**bad)
