"""Geocells: per-province HDBSCAN on projected coordinates, with radius caps that always hold.

A geocell is a set of (training) images with a centre that is one of them and a radius — the largest
great-circle distance from the centre to a member. GEOPAK promised 5 km urban / 50 km rural radii but kept cells
up to 1,319 km wide; here the caps are an invariant checked on every cell.

Per province (the model has one cell head per province), on an azimuthal equidistant projection centred on the
province's points:

1. **Target count.** ``target_p = clip(round(α · sqrt(n_p · area_p / A_ref)), min_cells, max_cells)`` with
   ``n_p`` the province's points, ``area_p`` its polygon area (convex hull of its points when no polygon is
   given), ``A_ref`` = 125,000 km² (the mean area of Pakistan's seven ADM1 units). Cells grow with the square root
   of both data and area: dense small Islamabad gets few, sparse vast Balochistan gets many more than its image
   share alone would give. HDBSCAN's ``min_cluster_size = max(floor, round(n_p / (target_p · divisor)))``; cells
   smaller than ``min_cell_size = round(min_cell_fraction · n_p / target_p)`` try to merge (step 5).
2. **HDBSCAN** (``hdbscan``, ``boruvka_kdtree``, Euclidean on km) — on at most ``max_fit_points`` points drawn
   at random (seeded); the other points take the label of their nearest fitted point. HDBSCAN only proposes the
   initial partition; caps, noise and merges below act on every point. A province with fewer points than
   ``min_cluster_size`` is one initial cluster. ``core_dist_n_jobs`` workers are used for fits of ≥ 100k points
   (below that, starting the worker pool costs more than it saves).
3. **Caps.** Urban cells ≤ ``urban_cap_km``, rural ≤ ``rural_cap_km``. A point is *urban* if it lies within
   ``r(pop) = min(urban_radius_km · sqrt(pop / urban_min_population), urban_max_radius_km)`` of a GeoNames place
   with at least ``urban_min_population`` people (``pakistan_places()``): 2 km for a town of 100k, ~22 km for
   Karachi or Lahore, i.e. a built-up area at ~8,000 people/km². A cell is urban if more than half of its members
   are. A cell over its cap is bisected by 2-means (farthest-pair start) on the projected coordinates, recursively,
   until every cell holds its cap (identical points have radius 0, so this ends).
4. **Noise** joins the nearest cell whose centre is within that cell's cap; the rest is bisected into new cells
   the same way. If a province has fewer cells than its target, its most populous cells are bisected until it
   has (caps are re-enforced on the halves).
5. **Small cells** merge into one of their nearest cells only if the merged cell still holds its cap.
6. **Final membership.** Every point goes to the nearest centre that is within that cell's cap (its own cell
   always qualifies), so labels agree with the Voronoi polygons wherever caps allow; ``count`` and ``radius_km``
   are computed from this membership, and ``urban``/``cap_km`` keep the values the cell was fitted with.

Deterministic for a given input (order included) and seed. No Dagster here.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely
from scipy.spatial import cKDTree

from pipeline.core.fields import check_fields, doc_field
from pipeline.core.gazetteer import pakistan_places
from pipeline.core.provinces import BY_ID
from pipeline.core.schema import CELL_ASSIGNMENTS_SCHEMA, GEOCELL_NEIGHBOURS_SCHEMA, GEOCELLS_SCHEMA, write_table
from pipeline.geocells.geometry import Projector, arc_km, distance_km, km_to_chord, unit_vectors
from pipeline.geocells.splits import TRAIN, id_order

if TYPE_CHECKING:
    import geopandas as gpd

CELL_COLUMNS = tuple(GEOCELLS_SCHEMA.names)  # the schema is the one definition of the tables' columns
NEIGHBOUR_COLUMNS = tuple(GEOCELL_NEIGHBOURS_SCHEMA.names)
_EPS_KM = 1e-9
# Parallel core distances (``core_dist_n_jobs``) start a joblib worker pool, which costs more than it saves below
# this many points (measured on 2 cores: 50k points, first fit 13.5 s with 2 jobs vs 5.6 s with 1).
_PARALLEL_MIN_POINTS = 100_000
QUERY_ROWS = 1 << 20  # points per KD-tree query chunk: bounds the temporaries of a 10 M-point pass to ~100 MB


@dataclass(frozen=True)
class GeocellConfig:
    """Caps, the urban rule, target counts and HDBSCAN parameters (see the module docstring)."""

    # Each field's doc and bounds are what the Launchpad shows and what __post_init__ checks (pipeline.core.fields).
    urban_cap_km: float = doc_field(5.0, "largest radius of an urban cell (km)", gt=0.0)
    rural_cap_km: float = doc_field(50.0, "largest radius of a rural cell (km)", gt=0.0)
    urban_min_population: int = doc_field(100_000, "places with at least this many people make points near them "
                                          "urban", ge=1)
    urban_radius_km: float = doc_field(2.0, "urban radius of a place of urban_min_population people; grows with "
                                       "sqrt(population)", gt=0.0)
    urban_max_radius_km: float = doc_field(25.0, "largest urban radius around any place (km)", gt=0.0)
    cells_scale: float = doc_field(1.0, "α in the target count clip(round(α·sqrt(n·area/A_ref)), min_cells, "
                                   "max_cells)", gt=0.0)
    min_cells: int = doc_field(1, "fewest cells per province", ge=1)
    max_cells: int = doc_field(2000, "most target cells per province (≥ min_cells)", ge=1)
    reference_area_km2: float = doc_field(125_000.0, "A_ref in the target count (km²; mean area of Pakistan's ADM1 "
                                          "units)", gt=0.0)
    cluster_size_divisor: float = doc_field(4.0, "HDBSCAN min_cluster_size = max(floor, round(n / (target · "
                                            "divisor)))", gt=0.0)
    min_cluster_size_floor: int = doc_field(5, "smallest HDBSCAN min_cluster_size", ge=2)
    min_samples: int = doc_field(5, "HDBSCAN min_samples", ge=1)
    cluster_selection_method: str = doc_field("eom", "HDBSCAN cluster selection", choices=("eom", "leaf"))
    min_cell_fraction: float = doc_field(0.25, "cells smaller than this fraction of n/target try to merge into a "
                                         "neighbour", ge=0.0)
    max_fit_points: int = doc_field(50_000, "HDBSCAN fits at most this many points per province (seeded sample)",
                                    ge=10)
    neighbours: int = doc_field(8, "nearest cells stored per cell (the model's neighbour smoothing)", ge=0)
    seed: int = doc_field(0, "seed of the fit sample", ge=0)
    core_dist_n_jobs: int = doc_field(2, "HDBSCAN core-distance workers (used from 100k points on)", ge=1)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.max_cells < self.min_cells:
            raise ValueError("need min_cells ≤ max_cells")


@dataclass(frozen=True)
class ProvinceTarget:
    n: int
    area_km2: float
    target: int
    min_cluster_size: int
    min_cell_size: int


def province_target(n: int, area_km2: float, cfg: GeocellConfig) -> ProvinceTarget:
    """Target cell count and the HDBSCAN / merge sizes derived from it (formula in the module docstring)."""
    if n <= 0:
        return ProvinceTarget(0, area_km2, 0, cfg.min_cluster_size_floor, 1)
    raw = cfg.cells_scale * np.sqrt(n * max(area_km2, 0.0) / cfg.reference_area_km2)
    target = int(min(np.clip(round(raw), cfg.min_cells, cfg.max_cells), n))
    mcs = max(cfg.min_cluster_size_floor, int(round(n / (target * cfg.cluster_size_divisor))))
    min_cell = max(1, int(round(cfg.min_cell_fraction * n / target)))
    return ProvinceTarget(n, float(area_km2), target, mcs, min_cell)


def urban_mask(lat: np.ndarray, lon: np.ndarray, cfg: GeocellConfig = GeocellConfig()) -> np.ndarray:
    """True where a point lies within r(pop) of a place with ≥ ``urban_min_population`` people (see docstring)."""
    lat = np.asarray(lat, float)
    out = np.zeros(lat.shape, dtype=bool)
    places = pakistan_places()
    big = places[places["population"] >= cfg.urban_min_population]
    if len(lat) == 0 or big.empty:
        return out
    radius = np.minimum(
        cfg.urban_radius_km * np.sqrt(big["population"].to_numpy(float) / cfg.urban_min_population),
        cfg.urban_max_radius_km,
    )
    centres = unit_vectors(big["lat"].to_numpy(), big["lon"].to_numpy())
    tree = cKDTree(centres)
    k = min(4, len(big))
    lon = np.asarray(lon, float)
    for lo in range(0, len(lat), QUERY_ROWS):  # chunks: the (rows, k) arrays stay small at 10 M points
        q = unit_vectors(lat[lo : lo + QUERY_ROWS], lon[lo : lo + QUERY_ROWS])
        chord, j = tree.query(q, k=k, distance_upper_bound=km_to_chord(cfg.urban_max_radius_km) * 1.001)
        chord, j = chord.reshape(len(q), k), j.reshape(len(q), k)
        found = j < len(big)
        d = np.where(found, arc_km(np.where(found, chord, 0.0)), np.inf)
        hit = (d <= radius[np.where(found, j, 0)]).any(axis=1)
        crowded = np.flatnonzero(found[:, -1])  # k places within reach: check every place for these few points
        if len(crowded):
            d_all = arc_km(np.linalg.norm(q[crowded, None, :] - centres[None, :, :], axis=2))
            hit[crowded] = (d_all <= radius[None, :]).any(axis=1)
        out[lo : lo + QUERY_ROWS] = hit
    return out


def nearest_within_cap(q: np.ndarray, centres: np.ndarray, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For unit vectors ``q``: index of the nearest centre within its own cap (-1 if none) and the distance (km).

    One KD-tree per distinct cap value: the nearest centre of a cap class is that class's only candidate.
    """
    best = np.full(len(q), -1, dtype=np.int64)
    best_d = np.full(len(q), np.inf)
    if len(q) == 0 or len(centres) == 0:
        return best, best_d
    for cap in np.unique(caps):
        sub = np.flatnonzero(caps == cap)
        tree = cKDTree(centres[sub])
        for lo in range(0, len(q), QUERY_ROWS):  # chunks: bounded temporaries at 10 M points
            part = slice(lo, lo + QUERY_ROWS)
            chord, j = tree.query(q[part], k=1, distance_upper_bound=km_to_chord(cap) * (1 + 1e-9))
            found = j < len(sub)
            d = np.full(len(chord), np.inf)
            d[found] = arc_km(chord[found])
            better = found & (d <= cap + _EPS_KM) & (d < best_d[part])
            best[part][better] = sub[j[better]]
            best_d[part][better] = d[better]
    return best, best_d


def nearest_centre(q: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    chord, j = cKDTree(centres).query(q, k=1)
    return np.asarray(j, dtype=np.int64), arc_km(chord)


def _far_pair(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A far-apart pair: the point farthest from the mean, and the point farthest from it."""
    a = p[np.argmax(((p - p.mean(axis=0)) ** 2).sum(axis=1))]
    return a, p[np.argmax(((p - a) ** 2).sum(axis=1))]


def _closer_to(p: np.ndarray, b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """True where a point is strictly closer to ``b`` than to ``a`` (planar)."""
    return ((p - b) ** 2).sum(axis=1) < ((p - a) ** 2).sum(axis=1)


@dataclass
class _Cell:
    idx: np.ndarray  # member indices into the province's arrays
    centre: int  # index of the member nearest the members' mean (planar)
    radius: float  # km, great-circle
    urban: bool
    cap: float


@dataclass
class _ProvinceFit:
    """Steps 2-6 of the module docstring for one province's points."""

    xy: np.ndarray
    u: np.ndarray
    urban: np.ndarray
    cfg: GeocellConfig
    notes: list[str] = field(default_factory=list)

    # -- cell primitives ---------------------------------------------------------------------------------------
    def stats(self, idx: np.ndarray) -> _Cell:
        p = self.xy[idx]
        centre = int(idx[np.argmin(((p - p.mean(axis=0)) ** 2).sum(axis=1))])
        radius = float(arc_km(np.sqrt(((self.u[idx] - self.u[centre]) ** 2).sum(axis=1).max())))
        urb = bool(self.urban[idx].mean() > 0.5)
        return _Cell(idx, centre, radius, urb, self.cfg.urban_cap_km if urb else self.cfg.rural_cap_km)

    def bisect(
        self, idx: np.ndarray, iterations: int = 12, fit_points: int = 2048
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """2-means on the projected coordinates from the farthest pair; None when all points coincide.

        The means are fitted on an evenly strided subset of large cells (deterministic); every point is then
        split once by the nearer mean.
        """
        p = self.xy[idx]
        sub = p[:: max(1, len(p) // fit_points)]
        a, b = _far_pair(sub)
        if not np.any(a != b):
            if len(sub) == len(p):
                return None  # all points coincide
            a, b = _far_pair(p)
            if not np.any(a != b):
                return None
            sub = p
        side = _closer_to(sub, b, a)
        for _ in range(iterations):
            a, b = sub[~side].mean(axis=0), sub[side].mean(axis=0)
            new = _closer_to(sub, b, a)
            if new.all() or not new.any() or np.array_equal(new, side):
                break
            side = new
        side = _closer_to(p, b, a)
        if side.all() or not side.any():  # the subset's means put every point on one side
            a, b = _far_pair(p)
            side = _closer_to(p, b, a)
        return idx[~side], idx[side]

    def enforce(self, groups: list[np.ndarray]) -> list[_Cell]:
        """Bisect recursively until every cell holds its cap."""
        out: list[_Cell] = []
        stack = list(reversed([g for g in groups if len(g)]))
        while stack:
            cell = self.stats(stack.pop())
            if cell.radius <= cell.cap + _EPS_KM:
                out.append(cell)
                continue
            halves = self.bisect(cell.idx)
            if halves is None:  # impossible: a positive radius means two distinct points
                raise RuntimeError("cell over its cap with coincident points")
            stack.extend(reversed(halves))
        return out

    def _centres(self, cells: list[_Cell]) -> tuple[np.ndarray, np.ndarray]:
        return self.u[[c.centre for c in cells]], np.array([c.cap for c in cells])

    # -- steps -------------------------------------------------------------------------------------------------
    def initial_clusters(self, target: ProvinceTarget, rng: np.random.Generator) -> np.ndarray:
        """HDBSCAN labels (-1 = noise) for every point; on a seeded sample when there are many points."""
        n = len(self.xy)
        if n < max(target.min_cluster_size, 3):
            self.notes.append(f"{n} points < min_cluster_size {target.min_cluster_size}: one initial cluster")
            return np.zeros(n, dtype=np.int64)
        fit = np.arange(n) if n <= self.cfg.max_fit_points else np.sort(
            rng.choice(n, self.cfg.max_fit_points, replace=False)
        )
        mcs = max(2, int(round(target.min_cluster_size * len(fit) / n)))
        min_samples = max(1, min(self.cfg.min_samples, mcs, len(fit) - 1))
        import hdbscan

        try:
            labels = hdbscan.HDBSCAN(
                min_cluster_size=mcs,
                min_samples=min_samples,
                algorithm="boruvka_kdtree",
                core_dist_n_jobs=self.cfg.core_dist_n_jobs if len(fit) >= _PARALLEL_MIN_POINTS else 1,
                cluster_selection_method=self.cfg.cluster_selection_method,
            ).fit_predict(self.xy[fit])
        except (ValueError, IndexError, ZeroDivisionError) as exc:  # degenerate input (e.g. all points equal)
            self.notes.append(f"HDBSCAN failed ({type(exc).__name__}: {exc}); one initial cluster")
            return np.zeros(n, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        if len(fit) < n:
            self.notes.append(f"HDBSCAN fitted on {len(fit)} of {n} points (min_cluster_size {mcs})")
            _, nn = cKDTree(self.xy[fit]).query(self.xy, k=1)
            labels = labels[nn]
        return labels

    def absorb_noise(self, cells: list[_Cell], noise: np.ndarray) -> list[_Cell]:
        """Noise → nearest cell whose centre is within its cap; the rest becomes new cells (bisected to caps)."""
        if len(noise) == 0:
            return cells
        if cells:
            centres, caps = self._centres(cells)
            hit, _ = nearest_within_cap(self.u[noise], centres, caps)
        else:
            hit = np.full(len(noise), -1, dtype=np.int64)
        changed = sorted(set(hit[hit >= 0].tolist()))
        groups = [np.concatenate([cells[j].idx, noise[hit == j]]) for j in changed]
        kept = [c for j, c in enumerate(cells) if j not in frozenset(changed)]
        return kept + self.enforce(groups + [noise[hit < 0]])

    def top_up(self, cells: list[_Cell], target: int, min_cell: int) -> list[_Cell]:
        """Bisect the most populous splittable cells (≥ 2·min_cell members) until the province has ``target``."""
        done: list[_Cell] = []
        heap: list[tuple[int, int, int, _Cell]] = []
        seq = 0
        for cell in cells:
            if len(cell.idx) >= 2 * min_cell and cell.radius > 0:
                heapq.heappush(heap, (-len(cell.idx), cell.centre, seq, cell))
                seq += 1
            else:
                done.append(cell)
        while len(done) + len(heap) < target and heap:
            cell = heapq.heappop(heap)[3]
            halves = self.bisect(cell.idx)
            if halves is None:
                done.append(cell)
                continue
            for child in self.enforce(list(halves)):
                if len(child.idx) >= 2 * min_cell and child.radius > 0:
                    heapq.heappush(heap, (-len(child.idx), child.centre, seq, child))
                    seq += 1
                else:
                    done.append(child)
        return done + [h[3] for h in sorted(heap, key=lambda h: h[2])]

    def merge_small(self, cells: list[_Cell], min_cell: int, candidates: int = 8) -> list[_Cell]:
        """Merge cells under ``min_cell`` members into a near cell, only when the merged cell holds its cap."""
        if len(cells) < 2 or min_cell <= 1:
            return cells
        live: dict[int, _Cell] = dict(enumerate(cells))
        parent = list(range(len(cells)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        centres, _ = self._centres(cells)
        k = min(candidates + 1, len(cells))
        _, near = cKDTree(centres).query(centres, k=k)
        near = np.asarray(near).reshape(len(cells), k)
        order = sorted(range(len(cells)), key=lambda i: (len(cells[i].idx), cells[i].centre))
        for i in order:
            if i not in live or len(live[i].idx) >= min_cell:
                continue
            for j in dict.fromkeys(find(int(c)) for c in near[i]):
                if j == i or j not in live:
                    continue
                merged = self.stats(np.concatenate([live[j].idx, live[i].idx]))
                if merged.radius <= merged.cap + _EPS_KM:
                    live[j] = merged
                    del live[i]
                    parent[i] = j
                    break
        return [live[i] for i in sorted(live)]

    def fit(self, target: ProvinceTarget, rng: np.random.Generator) -> tuple[list[_Cell], dict]:
        clock = _Clock()
        labels = self.initial_clusters(target, rng)
        clock.lap("s_hdbscan")
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(labels.max() + 2))
        clusters = [order[bounds[k] : bounds[k + 1]] for k in range(labels.max() + 1)]
        noise = order[: bounds[0]]
        cells = self.enforce(clusters)
        after_caps = len(cells)
        clock.lap("s_caps")
        cells = self.absorb_noise(cells, noise)
        clock.lap("s_noise")
        cells = self.top_up(cells, target.target, target.min_cell_size)
        clock.lap("s_top_up")
        before_merge = len(cells)
        cells = self.merge_small(cells, target.min_cell_size)
        clock.lap("s_merge")
        return cells, {
            "hdbscan_clusters": int(labels.max() + 1),
            "noise_points": int(len(noise)),
            "cells_after_caps": after_caps,
            "merged_away": before_merge - len(cells),
            **clock.laps,
        }


class _Clock:
    """Wall seconds per step, for the per-province report (where the time goes)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 3)
        self._t = now


@dataclass
class Geocells:
    """The cell table (``CELL_COLUMNS``), each input point's cell and distance, and a per-province report."""

    cells: pd.DataFrame
    members: np.ndarray  # cell_id per input point
    distance_km: np.ndarray  # great-circle km from each point to its cell centre
    provinces: pd.DataFrame


def _area_km2(xy: np.ndarray, cfg: GeocellConfig) -> float:
    hull = shapely.MultiPoint(xy).convex_hull if len(xy) else shapely.Point()
    return max(float(hull.area), np.pi * cfg.urban_cap_km**2)


def build_geocells(
    lat: np.ndarray,
    lon: np.ndarray,
    province_id: np.ndarray,
    cfg: GeocellConfig = GeocellConfig(),
    areas_km2: Mapping[int, float] | None = None,
) -> Geocells:
    """Fit cells per province on these points (training images); see the module docstring for the algorithm."""
    lat = np.asarray(lat, float)
    lon = np.asarray(lon, float)
    province_id = np.asarray(province_id, dtype=np.int64)
    if not (len(lat) == len(lon) == len(province_id)):
        raise ValueError("lat, lon and province_id must have the same length")
    if len(lat) and not (np.all(np.isfinite(lat)) and np.all(np.isfinite(lon))):
        raise ValueError("coordinates must be finite")
    urban = urban_mask(lat, lon, cfg)
    u_all = unit_vectors(lat, lon)
    members = np.full(len(lat), -1, dtype=np.int64)
    dist = np.full(len(lat), np.nan)
    tables, reports = [], []
    next_id = 0
    for pid in np.unique(province_id).tolist():  # sorted, as Python ints, without a 10 M-item list
        t0 = time.perf_counter()
        rows = np.flatnonzero(province_id == pid)
        proj = Projector.centred_on(lat[rows], lon[rows])
        xy = proj.xy(lat[rows], lon[rows])
        area = float(areas_km2[pid]) if areas_km2 and pid in areas_km2 else _area_km2(xy, cfg)
        target = province_target(len(rows), area, cfg)
        fitter = _ProvinceFit(xy, u_all[rows], urban[rows], cfg)
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, pid]))
        cells, info = fitter.fit(target, rng)
        table, local_member, local_dist = _finalise(fitter, cells, lat[rows], lon[rows])
        table.insert(0, "cell_id", np.arange(next_id, next_id + len(table), dtype=np.int64))
        members[rows] = local_member + next_id
        dist[rows] = local_dist
        next_id += len(table)
        table.insert(1, "province_id", pid)
        tables.append(table)
        reports.append(
            {
                "province_id": pid,
                "province": BY_ID[pid].key if pid in BY_ID else str(pid),
                "points": len(rows),
                "urban_points": int(urban[rows].sum()),
                "area_km2": round(area, 1),
                "target": target.target,
                "min_cluster_size": target.min_cluster_size,
                "min_cell_size": target.min_cell_size,
                **info,
                "cells": len(table),
                "seconds": round(time.perf_counter() - t0, 3),
                "notes": "; ".join(fitter.notes),
            }
        )
    cells = pd.concat(tables, ignore_index=True) if tables else _empty_cells()
    cells = cells[list(CELL_COLUMNS)]
    return Geocells(cells, members, dist, pd.DataFrame(reports))


def same_ids(a: str | Path, b: str | Path, batch_rows: int = 1 << 16) -> bool:
    """Whether two tables list the same ``image_id`` values in the same order, read batch by batch (the splits
    stage writes the labelled rows' order: then rows match by position and no join is needed)."""
    fa, fb = pq.ParquetFile(a), pq.ParquetFile(b)
    if fa.metadata.num_rows != fb.metadata.num_rows:
        return False
    rest = fb.iter_batches(batch_size=batch_rows, columns=["image_id"])
    pending = pa.array([], pa.string())
    for batch in fa.iter_batches(batch_size=batch_rows, columns=["image_id"]):
        x = batch.column(0)
        while len(x):
            if not len(pending):
                pending = next(rest).column(0)
            k = min(len(x), len(pending))
            if not pc.all(pc.equal(x.slice(0, k), pending.slice(0, k)), skip_nulls=False).as_py():
                return False
            x, pending = x.slice(k), pending.slice(k)
    return True


def read_with_split(labelled: str | Path, splits: str | Path,
                    columns: tuple[str, ...] = ("lat", "lon", "province_id")) -> pa.Table:
    """The labelled rows' ``columns`` plus each row's ``split`` (null where the splits table has none), in Arrow:
    a pandas merge of the two tables holds both frames and a join index, several GB at 10 M rows."""
    lab = pq.read_table(labelled, columns=list(columns))
    return lab.append_column("split", column_by_id(labelled, splits, "split"))


def column_by_id(labelled: str | Path, other: str | Path, column: str) -> pa.ChunkedArray:
    """``other``'s ``column`` for each row of ``labelled``, matched by ``image_id`` (null where ``other`` has no
    row): by position when the rows line up (:func:`same_ids`), else by a join that holds both id columns."""
    if same_ids(labelled, other):
        out = pq.read_table(other, columns=[column])[column]
    else:
        ids = pq.read_table(labelled, columns=["image_id"])["image_id"]
        tab = pq.read_table(other, columns=["image_id", column])
        out = tab[column].take(pc.index_in(ids, value_set=tab["image_id"].combine_chunks()))
        del ids, tab
    pa.default_memory_pool().release_unused()  # read buffers: mimalloc keeps them otherwise
    return out


def training_rows(split: pa.ChunkedArray, province_id: np.ndarray,
                  image_id: pa.ChunkedArray) -> tuple[np.ndarray, list[int]]:
    """Rows to fit cells on, in ``image_id`` order (the same images give the same cells, whatever the row order):
    the train rows, plus every row of a province that has none (listed second: tiny data would leave it without
    cells otherwise)."""
    train = pc.fill_null(pc.equal(split, TRAIN), False).to_numpy()
    no_train = np.setdiff1d(np.unique(province_id), np.unique(province_id[train])).tolist()
    rows = np.flatnonzero(train | np.isin(province_id, no_train))
    return rows[id_order(image_id.take(rows), check_unique=False)], no_train


def fit_geocells_file(labelled: str | Path, splits: str | Path, cfg: GeocellConfig = GeocellConfig(),
                      areas_km2: Mapping[int, float] | None = None) -> tuple[Geocells, list[int]]:
    """``build_geocells`` on the training rows of the labelled table (:func:`training_rows`), read column by column
    in compact types; also returns the provinces fitted on held-out rows."""
    table = read_with_split(labelled, splits)
    prov = table["province_id"].to_numpy()
    rows, no_train = training_rows(table["split"], prov, pq.read_table(labelled, columns=["image_id"])["image_id"])
    lat, lon, prov = table["lat"].to_numpy()[rows], table["lon"].to_numpy()[rows], prov[rows]
    del table
    pa.default_memory_pool().release_unused()
    return build_geocells(lat, lon, prov, cfg, areas_km2), no_train


def assign_cells_file(labelled: str | Path, splits: str | Path, cells: pd.DataFrame,
                      out: str | Path) -> tuple[pd.DataFrame, int]:
    """:func:`assign_cells` for every labelled row, written to ``out`` (``CELL_ASSIGNMENTS_SCHEMA``); returns the
    distance to the cell centre by split and how many cells got images. Ids stay in Arrow (no 10 M Python
    strings)."""
    table = read_with_split(labelled, splits, ("image_id", "lat", "lon", "province_id"))
    cell_id, dist, within = assign_cells(table["lat"].to_numpy(), table["lon"].to_numpy(),
                                         table["province_id"].to_numpy(), cells)
    frame = pd.DataFrame({"image_id": table["image_id"].to_pandas(types_mapper=pd.ArrowDtype), "cell_id": cell_id,
                          "province_id": table["province_id"].to_numpy(), "distance_km": dist})
    write_table(frame, out, CELL_ASSIGNMENTS_SCHEMA)
    split = pc.dictionary_encode(pc.fill_null(table["split"], "(none)").combine_chunks())  # no 10 M str objects
    split = pd.Categorical.from_codes(split.indices.to_numpy(), split.dictionary.to_pylist())
    return distance_by_split(split, dist, within), int(len(np.unique(cell_id)))


def distance_by_split(split: np.ndarray | pd.Categorical, dist: np.ndarray, within: np.ndarray) -> pd.DataFrame:
    """Images, share within the cap, median / p90 / max distance to the cell centre, per split (in name order)."""
    if isinstance(split, pd.Categorical):
        split = split.reorder_categories(sorted(split.categories))
    return (
        pd.DataFrame({"split": split, "distance_km": dist, "within_cap": within})
        .groupby("split", observed=True)
        .agg(images=("distance_km", "size"), within_cap=("within_cap", "mean"),
             median_km=("distance_km", "median"), p90_km=("distance_km", lambda x: float(np.quantile(x, 0.9))),
             max_km=("distance_km", "max"))
        .reset_index()
        .astype({"split": str})
    )


def _empty_cells() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c in ("center_lat", "center_lon", "radius_km", "cap_km")
                                      else "bool" if c == "urban" else "int64") for c in CELL_COLUMNS})


def _finalise(
    fit: _ProvinceFit, cells: list[_Cell], lat: np.ndarray, lon: np.ndarray
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Step 6: order cells by centre (local ids), nearest centre within cap (own cell as fallback), count/radius.

    Cells are ordered before the nearest-centre pass so ties resolve exactly as ``assign_cells`` resolves them.
    """
    centre_idx = np.array([c.centre for c in cells], dtype=np.int64)
    order = np.lexsort((lon[centre_idx], lat[centre_idx]))
    cells = [cells[k] for k in order]
    fitted = np.empty(len(lat), dtype=np.int64)
    for k, c in enumerate(cells):
        fitted[c.idx] = k
    centres, caps = fit._centres(cells)
    member, d = nearest_within_cap(fit.u, centres, caps)
    fallback = np.flatnonzero(member < 0)  # only when a coincident centre of a smaller-cap cell took precedence
    member[fallback] = fitted[fallback]
    d[fallback] = distance_km(fit.u[fallback], centres[fitted[fallback]])
    counts = np.bincount(member, minlength=len(cells))
    radius = np.zeros(len(cells))
    np.maximum.at(radius, member, d)
    keep = np.flatnonzero(counts > 0)
    local = np.full(len(cells), -1, dtype=np.int64)
    local[keep] = np.arange(len(keep))
    centre_idx = np.array([cells[k].centre for k in keep], dtype=np.int64)
    table = pd.DataFrame(
        {
            "local_id": np.arange(len(keep), dtype=np.int64),
            "center_lat": lat[centre_idx],
            "center_lon": lon[centre_idx],
            "radius_km": radius[keep],
            "count": counts[keep].astype(np.int64),
            "cap_km": np.array([cells[k].cap for k in keep], dtype=float),
            "urban": np.array([cells[k].urban for k in keep], dtype=bool),
        }
    )
    return table, local[member], d


def cell_neighbours(cells: pd.DataFrame, k: int = 8) -> pd.DataFrame:
    """The ``k`` nearest other cells of the same province per cell, by centre distance (km), nearest first."""
    out = []
    for _, grp in cells.groupby("province_id", sort=True):
        m = len(grp)
        kk = min(k, m - 1)
        if kk <= 0:
            continue
        u = unit_vectors(grp["center_lat"].to_numpy(), grp["center_lon"].to_numpy())
        chord, j = cKDTree(u).query(u, k=kk + 1)
        ids = grp["cell_id"].to_numpy()
        rows = np.repeat(np.arange(m), kk + 1).reshape(m, kk + 1)
        not_self = j != rows
        # keep the first kk non-self neighbours per row (coincident centres may put self anywhere)
        keep = not_self & (np.cumsum(not_self, axis=1) <= kk)
        out.append(
            pd.DataFrame(
                {
                    "cell_id": ids[rows[keep]],
                    "neighbour_id": ids[j[keep]],
                    "distance_km": arc_km(chord[keep]),
                }
            )
        )
    if not out:
        return pd.DataFrame({"cell_id": pd.Series(dtype="int64"), "neighbour_id": pd.Series(dtype="int64"),
                             "distance_km": pd.Series(dtype="float64")})
    return pd.concat(out, ignore_index=True)[list(NEIGHBOUR_COLUMNS)]


def assign_cells(
    lat: np.ndarray, lon: np.ndarray, province_id: np.ndarray, cells: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell per image: the nearest centre of its province within that cell's cap, else the nearest centre.

    Returns (cell_id, distance_km, within_cap). Raises ValueError for a province that has no cells.
    """
    lat = np.asarray(lat, float)
    lon = np.asarray(lon, float)
    province_id = np.asarray(province_id, dtype=np.int64)
    cell_id = np.full(len(lat), -1, dtype=np.int64)
    dist = np.full(len(lat), np.nan)
    within = np.zeros(len(lat), dtype=bool)
    heads = {}  # per province: centres (unit vectors), caps, global ids
    for pid in np.unique(province_id).tolist():
        grp = cells[cells["province_id"] == pid]
        if grp.empty:
            raise ValueError(f"province {pid} has images but no geocells")
        heads[pid] = (unit_vectors(grp["center_lat"].to_numpy(), grp["center_lon"].to_numpy()),
                      grp["cap_km"].to_numpy(float), grp["cell_id"].to_numpy())
    for lo in range(0, len(lat), QUERY_ROWS):  # rows are independent: chunks bound memory at 10 M images
        prov = province_id[lo : lo + QUERY_ROWS]
        u = unit_vectors(lat[lo : lo + QUERY_ROWS], lon[lo : lo + QUERY_ROWS])
        for pid in np.unique(prov).tolist():
            rows = np.flatnonzero(prov == pid)
            cu, caps, ids = heads[pid]
            j, d = nearest_within_cap(u[rows], cu, caps)
            ok = j >= 0
            if not ok.all():
                j[~ok], d[~ok] = nearest_centre(u[rows[~ok]], cu)
            cell_id[lo + rows] = ids[j]
            dist[lo + rows] = d
            within[lo + rows] = ok
    return cell_id, dist, within


def cell_polygons(
    cells: pd.DataFrame, province_polygons: Mapping[int, shapely.Geometry] | None = None
) -> "gpd.GeoDataFrame":
    """Voronoi polygons of the cell centres, per province, clipped to the province polygon (EPSG:4326).

    The diagram is built on the province's azimuthal equidistant plane, its edges densified and projected back
    to lon/lat, then clipped in lon/lat so every polygon lies inside its province. Without a polygon for a
    province, the clip is the convex hull of its centres buffered by the largest cap. Cells with coincident
    centres share one region.
    """
    import geopandas as gpd

    records = []
    for pid, grp in cells.groupby("province_id", sort=True):
        lat, lon = grp["center_lat"].to_numpy(), grp["center_lon"].to_numpy()
        proj = Projector.centred_on(lat, lon)
        xy = proj.xy(lat, lon)
        uniq, first, inverse = np.unique(xy, axis=0, return_index=True, return_inverse=True)
        clip = (province_polygons or {}).get(int(pid))
        if clip is None:
            hull = shapely.MultiPoint(xy).convex_hull.buffer(float(grp["cap_km"].max()))
            clip = proj.to_lonlat(hull)
        clip = shapely.make_valid(clip)
        if len(uniq) == 1:
            regions_lonlat = [clip]
        else:
            x0, y0, x1, y1 = proj.from_lonlat(clip).bounds
            frame = shapely.box(min(x0, *uniq[:, 0]) - 50, min(y0, *uniq[:, 1]) - 50,
                                max(x1, *uniq[:, 0]) + 50, max(y1, *uniq[:, 1]) + 50)
            regions = shapely.get_parts(
                shapely.voronoi_polygons(shapely.MultiPoint(uniq), extend_to=frame, ordered=True)
            )
            planar = shapely.intersection(regions, frame)
            regions_lonlat = list(shapely.intersection(shapely.make_valid(proj.to_lonlat(planar)), clip))
        for row, k in zip(grp.itertuples(index=False), np.asarray(inverse).ravel()):
            records.append(
                {
                    "cell_id": int(row.cell_id),
                    "province_id": int(row.province_id),
                    "local_id": int(row.local_id),
                    "count": int(row.count),
                    "radius_km": float(row.radius_km),
                    "cap_km": float(row.cap_km),
                    "urban": bool(row.urban),
                    "geometry": regions_lonlat[int(k)],
                }
            )
    if not records:
        return gpd.GeoDataFrame({"cell_id": []}, geometry=[], crs="EPSG:4326")
    return gpd.GeoDataFrame(records, geometry="geometry", crs="EPSG:4326")


def province_areas_km2(polygons: Mapping[int, shapely.Geometry]) -> dict[int, float]:
    """Geodesic area (WGS84 ellipsoid) of each province polygon, km²."""
    import pyproj

    geod = pyproj.Geod(ellps="WGS84")
    return {int(pid): abs(geod.geometry_area_perimeter(g)[0]) / 1e6 for pid, g in polygons.items()}
