"""Labelled catalog → location-disjoint splits → geocells fitted on train → a cell for every labelled image.

Splits come first because they do not depend on cells; cells are fitted on training images only (GEOPAK fitted
them on all data, test included), and val/test images are then assigned to the nearest cell of their province.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from pipeline.core.paths import DataPaths
from pipeline.core.schema import (
    CELL_ASSIGNMENTS_SCHEMA,
    GEOCELL_NEIGHBOURS_SCHEMA,
    GEOCELLS_SCHEMA,
    SPLITS_SCHEMA,
    read_table,
    write_table,
)
from pipeline.core.store import atomic_path
from pipeline.defs.config import config_class, register_docs, to_dataclass
from pipeline.defs.labels import labelled_catalog
from pipeline.defs.metadata import LINEAGE, md_table, plot, schema_metadata, table_metadata
from pipeline.defs.resources import BoundariesResource, DataRootResource, writes_stage
from pipeline.geocells.cells import (
    GeocellConfig,
    assign_cells,
    build_geocells,
    cell_neighbours,
    cell_polygons,
    province_areas_km2,
)
from pipeline.geocells.geometry import haversine_km
from pipeline.geocells.report import cells_map_png, province_cell_table, splits_map_png
from pipeline.geocells.splits import TRAIN, SplitConfig, leakage_count, make_splits


# SplitConfig and GeocellConfig live in pipeline.geocells (not this stage's module), so their Launchpad docs and
# bounds are registered here; the reasons behind the defaults are in those modules' docstrings.
register_docs(SplitConfig, {
    "train": {"doc": "target share of images in train (train + val + test must sum to 1)", "ge": 0.0, "le": 1.0},
    "val": {"doc": "target share of images in val", "ge": 0.0, "le": 1.0},
    "test": {"doc": "target share of images in test", "ge": 0.0, "le": 1.0},
    "seed": {"doc": "seed of the order in which groups are assigned to splits", "ge": 0},
    "min_distance_km": {"doc": "no val/test image lies within this many km of a train image", "gt": 0.0},
    "max_group_share": {"doc": "groups larger than this share of their province's images are tiled",
                        "ge": 0.0, "le": 1.0},
    "min_group_to_tile": {"doc": "groups smaller than this many images are never tiled", "ge": 1},
    "tile_km": {"doc": "side of the square tiles a giant group is cut into (km)", "gt": 0.0},
    "utc_offset_hours": {"doc": "UTC offset of the owner's local day (Pakistan Standard Time: +5)",
                         "ge": -12.0, "le": 14.0},
    "owner_disjoint": {"doc": "all of an owner's images in one split; false: only each owner's local day"},
})
register_docs(GeocellConfig, {
    "urban_cap_km": {"doc": "largest radius of an urban cell (km)", "gt": 0.0},
    "rural_cap_km": {"doc": "largest radius of a rural cell (km)", "gt": 0.0},
    "urban_min_population": {"doc": "places with at least this many people make points near them urban", "ge": 1},
    "urban_radius_km": {"doc": "urban radius of a place of urban_min_population people; grows with "
                        "sqrt(population)", "gt": 0.0},
    "urban_max_radius_km": {"doc": "largest urban radius around any place (km)", "gt": 0.0},
    "cells_scale": {"doc": "α in the target count clip(round(α·sqrt(n·area/A_ref)), min_cells, max_cells)",
                    "gt": 0.0},
    "min_cells": {"doc": "fewest cells per province", "ge": 1},
    "max_cells": {"doc": "most target cells per province (≥ min_cells)", "ge": 1},
    "reference_area_km2": {"doc": "A_ref in the target count (km²; mean area of Pakistan's ADM1 units)", "gt": 0.0},
    "cluster_size_divisor": {"doc": "HDBSCAN min_cluster_size = max(floor, round(n / (target · divisor)))",
                             "gt": 0.0},
    "min_cluster_size_floor": {"doc": "smallest HDBSCAN min_cluster_size", "ge": 2},
    "min_samples": {"doc": "HDBSCAN min_samples", "ge": 1},
    "cluster_selection_method": {"doc": "HDBSCAN cluster selection", "choices": ("eom", "leaf")},
    "min_cell_fraction": {"doc": "cells smaller than this fraction of n/target try to merge into a neighbour",
                          "ge": 0.0},
    "max_fit_points": {"doc": "HDBSCAN fits at most this many points per province (seeded sample)", "ge": 10},
    "neighbours": {"doc": "nearest cells stored per cell (the model's neighbour smoothing)", "ge": 0},
    "seed": {"doc": "seed of the fit sample", "ge": 0},
    "core_dist_n_jobs": {"doc": "HDBSCAN core-distance workers (used from 100k points on)", "ge": 1},
})
SplitParams = config_class(
    SplitConfig, name="SplitParams",
    doc="Split fractions and seed, the 1 km separation, how giant groups are tiled, owner-disjoint or owner×day.",
)
GeocellParams = config_class(
    GeocellConfig, name="GeocellParams", doc="Radius caps, the urban rule, target counts and HDBSCAN parameters."
)

_LABELLED_COLUMNS = ["image_id", "lat", "lon", "province_id", "place_id", "owner", "taken_at"]


def _labelled(paths: DataPaths) -> pd.DataFrame:
    return pd.read_parquet(paths.labelled, columns=_LABELLED_COLUMNS)


def _outlines(boundaries: BoundariesResource) -> dict | None:
    return getattr(boundaries.locator(), "polygons", None)


# Config-less checks are declared on their asset and evaluated in its step (no empty check op in the Launchpad).
NO_LEAK = dg.AssetCheckSpec("dataset_splits_no_leak", asset="dataset_splits", blocking=True,
                            description="No val or test image lies within 1 km of a train image.")
WITHIN_CAP = dg.AssetCheckSpec("geocells_within_cap", asset="geocells", blocking=True,
                               description="100% of cells hold their radius cap and have members.")
ASSIGNMENTS_COMPLETE = dg.AssetCheckSpec(
    "cell_assignments_complete", asset="cell_assignments", blocking=True,
    description="Every labelled image has a cell of its own province; every train image lies within its cell's cap.",
)


@dg.asset(
    pool="splits",  # one writer of splits/ at a time, across runs (dagster_home/dagster.yaml)
    group_name="geocells",
    kinds={"parquet"},
    deps=[labelled_catalog],
    description="Train/val/test, location-disjoint: no val/test image within 1 km of a train image.",
    metadata=schema_metadata(SPLITS_SCHEMA),
    check_specs=[NO_LEAK],
)
@writes_stage("splits")
def dataset_splits(
    config: SplitParams, data_root: DataRootResource, boundaries: BoundariesResource
) -> dg.MaterializeResult:
    paths = data_root.paths
    df = _labelled(paths)
    result = make_splits(df, to_dataclass(config, SplitConfig))
    write_table(result.table, paths.splits, SPLITS_SCHEMA)
    s = result.summary
    split = result.table["split"].to_numpy()
    return dg.MaterializeResult(
        check_results=[no_leak_check(paths)],
        metadata={
            **table_metadata(paths.splits, SPLITS_SCHEMA, LINEAGE["dataset_splits"]),
            "map": plot(
                paths, "dataset_splits_map.png",
                splits_map_png(df["lat"], df["lon"], split, _outlines(boundaries), "dataset splits"),
                "images by split",
            ),
            **{k: v for k, v in s.items() if isinstance(v, int)},
            "leakage": dg.MetadataValue.md(
                f"val/test images within {config.min_distance_km} km of a train image: "
                f"**{s.get('leaks_within_km', 0)}** here vs **{s.get('naive_random_split_leaks_within_km', 0)}** of "
                f"{s.get('naive_random_split_held_out', 0)} for a random per-image split of the same images "
                f"(GEOPAK's split).\n\nOwners with images in train and in val/test: "
                f"**{s.get('owners_in_train_and_heldout', 0)}**; val/test images whose owner has train images: "
                f"**{s.get('heldout_images_with_train_owner', 0)}** "
                f"({s.get('heldout_share_with_train_owner', 0.0):.1%}; owner-disjoint: {config.owner_disjoint})."
            ),
            "heldout_share_with_train_owner": round(float(s.get("heldout_share_with_train_owner", 0.0)), 3),
            "per_province": md_table(result.per_province),
            "splits": dg.MetadataValue.path(str(paths.splits)),
        }
    )


def no_leak_check(paths: DataPaths) -> dg.AssetCheckResult:
    """Blocking ``dataset_splits_no_leak``: the written splits against the labelled coordinates."""
    df = _labelled(paths).merge(read_table(paths.splits, SPLITS_SCHEMA), on="image_id", how="left")
    leaks = leakage_count(df["lat"], df["lon"], df["split"].to_numpy(), km=1.0)
    missing = int(df["split"].isna().sum())
    return dg.AssetCheckResult(
        check_name=NO_LEAK.name,
        passed=leaks == 0 and missing == 0,
        metadata={"images": len(df), "leaks_within_1km": leaks, "labelled_images_without_split": missing},
    )


@dg.asset(
    pool="geocells",  # one writer of geocells/ at a time, across runs (dagster_home/dagster.yaml)
    group_name="geocells",
    kinds={"parquet", "geoparquet"},
    deps=[dataset_splits],
    description="Per-province HDBSCAN geocells fitted on training images, radius caps enforced; neighbours; polygons.",
    metadata=schema_metadata(GEOCELLS_SCHEMA),
    check_specs=[WITHIN_CAP],
)
@writes_stage("geocells")
def geocells(
    context: dg.AssetExecutionContext,
    config: GeocellParams,
    data_root: DataRootResource,
    boundaries: BoundariesResource,
) -> dg.MaterializeResult:
    paths = data_root.paths
    cfg = to_dataclass(config, GeocellConfig)
    df = _labelled(paths).merge(read_table(paths.splits, SPLITS_SCHEMA), on="image_id", how="left")
    fit = df[df["split"] == TRAIN]
    # A province whose every image is held out (tiny data) would get no cells: fit it on its held-out images and
    # say so, rather than leave its images without a cell.
    no_train = sorted(set(df["province_id"]) - set(fit["province_id"]))
    if no_train:
        context.log.warning(f"provinces {no_train} have no training images; their cells use held-out images")
        fit = pd.concat([fit, df[df["province_id"].isin(no_train)]])
    fit = fit.sort_values("image_id", kind="stable")  # the same images give the same cells, whatever the row order
    outlines = _outlines(boundaries)
    built = build_geocells(
        fit["lat"].to_numpy(), fit["lon"].to_numpy(), fit["province_id"].to_numpy(), cfg,
        province_areas_km2(outlines) if outlines else None,
    )
    neighbours = cell_neighbours(built.cells, cfg.neighbours)
    polygons = cell_polygons(built.cells, outlines)
    write_table(built.cells, paths.geocells, GEOCELLS_SCHEMA)
    write_table(neighbours, paths.geocell_neighbours, GEOCELL_NEIGHBOURS_SCHEMA)
    with atomic_path(paths.geocell_polygons) as tmp:
        polygons.to_parquet(tmp)
    table = province_cell_table(built.cells, built.provinces)
    return dg.MaterializeResult(
        check_results=[within_cap_check(paths.geocells)],
        metadata={
            **table_metadata(paths.geocells, GEOCELLS_SCHEMA, LINEAGE["geocells"]),
            "map": plot(
                paths, "geocells_map.png", cells_map_png(built.cells, polygons, outlines, "geocells (train)"),
                "geocell centres sized by images, Voronoi polygons",
            ),
            "cells": len(built.cells),
            "fitted_on_images": len(fit),
            "provinces_fitted_on_held_out_images": str(no_train),
            "cells_over_cap": int((built.cells["radius_km"] > built.cells["cap_km"]).sum()),
            "max_radius_km": round(float(built.cells["radius_km"].max()), 1) if len(built.cells) else 0.0,
            "per_province": md_table(table),
            "fit_report": md_table(built.provinces),
            "cells_table": dg.MetadataValue.path(str(paths.geocells)),
            "neighbours": dg.MetadataValue.path(str(paths.geocell_neighbours)),
            "polygons": dg.MetadataValue.path(str(paths.geocell_polygons)),
        }
    )


def within_cap_check(cells_path: Path) -> dg.AssetCheckResult:
    """Blocking ``geocells_within_cap``, on the written cells table."""
    cells = read_table(cells_path, GEOCELLS_SCHEMA)
    over = int((~(cells["radius_km"] <= cells["cap_km"] + 1e-9)).sum())
    empty = int((cells["count"] < 1).sum())
    return dg.AssetCheckResult(
        check_name=WITHIN_CAP.name,
        passed=over == 0 and empty == 0 and len(cells) > 0,
        metadata={"cells": len(cells), "over_cap": over, "empty": empty,
                  "share_within_cap": float(1 - over / len(cells)) if len(cells) else 0.0},
    )


@dg.asset(
    pool="geocells",  # one writer of geocells/ at a time, across runs (dagster_home/dagster.yaml)
    group_name="geocells",
    kinds={"parquet"},
    deps=[geocells],
    description="Every labelled image's cell: the nearest centre of its province within its cap, else the nearest.",
    metadata=schema_metadata(CELL_ASSIGNMENTS_SCHEMA),
    check_specs=[ASSIGNMENTS_COMPLETE],
)
@writes_stage("geocells")
def cell_assignments(data_root: DataRootResource) -> dg.MaterializeResult:
    paths = data_root.paths
    df = _labelled(paths).merge(read_table(paths.splits, SPLITS_SCHEMA), on="image_id", how="left")
    cells = read_table(paths.geocells, GEOCELLS_SCHEMA)
    cell_id, dist, within = assign_cells(df["lat"], df["lon"], df["province_id"], cells)
    out = pd.DataFrame(
        {"image_id": df["image_id"], "cell_id": cell_id, "province_id": df["province_id"], "distance_km": dist}
    )
    write_table(out, paths.cell_assignments, CELL_ASSIGNMENTS_SCHEMA)
    by_split = (
        pd.DataFrame({"split": df["split"].fillna("(none)"), "distance_km": dist, "within_cap": within})
        .groupby("split")
        .agg(images=("distance_km", "size"), within_cap=("within_cap", "mean"),
             median_km=("distance_km", "median"), p90_km=("distance_km", lambda x: float(np.quantile(x, 0.9))),
             max_km=("distance_km", "max"))
        .reset_index()
    )
    return dg.MaterializeResult(
        check_results=[assignments_complete_check(paths)],
        metadata={
            **table_metadata(paths.cell_assignments, CELL_ASSIGNMENTS_SCHEMA, LINEAGE["cell_assignments"]),
            "images": len(out),
            "cells_used": int(out["cell_id"].nunique()),
            "distance_to_centre_by_split": md_table(by_split),
            "assignments": dg.MetadataValue.path(str(paths.cell_assignments)),
        }
    )


def assignments_complete_check(paths: DataPaths) -> dg.AssetCheckResult:
    """Blocking ``cell_assignments_complete``: recomputes each train image's distance to its cell's centre."""
    df = _labelled(paths)[["image_id", "lat", "lon", "province_id"]]
    df = df.merge(read_table(paths.splits, SPLITS_SCHEMA), on="image_id", how="left")
    df = df.merge(read_table(paths.cell_assignments, CELL_ASSIGNMENTS_SCHEMA).drop(columns="province_id"),
                  on="image_id", how="left")
    cells = read_table(paths.geocells, GEOCELLS_SCHEMA).set_index("cell_id")
    has_cell = df["cell_id"].notna() & df["cell_id"].isin(cells.index)
    cell = cells.reindex(df["cell_id"].where(has_cell, -1).astype(int))
    wrong_province = int((has_cell & (cell["province_id"].to_numpy() != df["province_id"].to_numpy())).sum())
    train = (df["split"] == TRAIN).to_numpy() & has_cell.to_numpy()
    d = haversine_km(df["lat"].to_numpy(), df["lon"].to_numpy(), cell["center_lat"].to_numpy(),
                     cell["center_lon"].to_numpy())  # recomputed independently of the fitting code
    train_over_cap = int(np.sum(train & ~(d <= cell["cap_km"].to_numpy() + 1e-6)))
    without = int((~has_cell).sum())
    return dg.AssetCheckResult(
        check_name=ASSIGNMENTS_COMPLETE.name,
        passed=without == 0 and wrong_province == 0 and train_over_cap == 0,
        metadata={"images": len(df), "without_cell": without, "cell_in_other_province": wrong_province,
                  "train_images_beyond_cap": train_over_cap},
    )
