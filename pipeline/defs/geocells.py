"""Labelled catalog → location-disjoint splits → geocells fitted on train → a cell for every labelled image.

Splits come first because they do not depend on cells; cells are fitted on training images only (GEOPAK fitted
them on all data, test included), and val/test images are then assigned to the nearest cell of their province.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.compute as pc

from pipeline.core.report import share_pct
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
from pipeline.defs.config import config_class, to_dataclass
from pipeline.defs.labels import labelled_catalog
from pipeline.defs.metadata import LINEAGE, data_file, md_table, plot, schema_metadata, synthetic_note, table_metadata
from pipeline.defs.resources import BoundariesResource, DataRootResource, writes_stage
from pipeline.geocells.cells import (
    GeocellConfig,
    assign_cells_file,
    cell_neighbours,
    cell_polygons,
    column_by_id,
    fit_geocells_file,
    province_areas_km2,
    read_with_split,
)
from pipeline.geocells.geometry import haversine_km
from pipeline.geocells.report import cells_map_png, province_cell_table, splits_map_png
from pipeline.geocells.splits import TRAIN, SplitConfig, leakage_count, make_splits, read_split_inputs


SplitParams = config_class(
    SplitConfig, name="SplitParams",
    doc="Split fractions and seed, the separation (1 km), how giant groups are tiled, owner-disjoint or owner×day.",
)
GeocellParams = config_class(
    GeocellConfig, name="GeocellParams", doc="Radius caps, the urban rule, target counts and HDBSCAN parameters."
)

_LABELLED_COLUMNS = ["image_id", "lat", "lon", "province_id", "place_id", "owner", "taken_at"]
# the split summary's long names, shortened for the UI's label column (a label is one unbreakable word: a long one
# narrows every value on the page; pipeline.defs.metadata.MAX_LABEL_WORD)
SHORT_LABELS = {"naive_random_split_leaks_within_km": "random_split_leaks_km",
                "naive_random_split_held_out": "random_split_held_out",
                "heldout_images_with_train_owner": "heldout_with_train_owner",
                "owners_in_train_and_heldout": "owners_train_and_heldout"}


def _labelled(paths: DataPaths) -> pd.DataFrame:
    return pd.read_parquet(paths.labelled, columns=_LABELLED_COLUMNS)


def _outlines(boundaries: BoundariesResource) -> dict | None:
    return getattr(boundaries.locator(), "polygons", None)


# Config-less checks are declared on their asset and evaluated in its step (no empty check op in the Launchpad).
NO_LEAK = dg.AssetCheckSpec("dataset_splits_no_leak", asset="dataset_splits", blocking=True,
                            description="No val or test image lies within min_distance_km (default 1 km) of a "
                            "train image.")
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
    description="Train/val/test, location-disjoint: no val/test image within min_distance_km of a train image.",
    metadata=schema_metadata(SPLITS_SCHEMA),
    check_specs=[NO_LEAK],
)
@writes_stage("splits")
def dataset_splits(
    config: SplitParams, data_root: DataRootResource, boundaries: BoundariesResource
) -> dg.MaterializeResult:
    paths = data_root.paths
    df = read_split_inputs(paths.labelled)  # compact: Arrow ids, categorical owner and place
    result = make_splits(df, to_dataclass(config, SplitConfig))
    write_table(result.table, paths.splits, SPLITS_SCHEMA)
    s = result.summary
    split = result.table["split"].to_numpy()
    return dg.MaterializeResult(
        check_results=[no_leak_check(paths, config.min_distance_km)],
        metadata={
            **synthetic_note(paths.labelled),
            **table_metadata(paths.splits, SPLITS_SCHEMA, LINEAGE["dataset_splits"]),
            "map": plot(
                paths, "dataset_splits_map.png",
                splits_map_png(df["lat"], df["lon"], split, _outlines(boundaries), "dataset splits"),
                "images by split",
            ),
            **{SHORT_LABELS.get(k, k): v for k, v in s.items() if isinstance(v, int)},
            "leakage": dg.MetadataValue.md(
                f"val/test images within {config.min_distance_km} km of a train image: "
                f"**{s.get('leaks_within_km', 0)}** here vs **{s.get('naive_random_split_leaks_within_km', 0)}** of "
                f"{s.get('naive_random_split_held_out', 0)} for a random per-image split of the same images "
                f"(GEOPAK's split).\n\nOwners with images in train and in val/test: "
                f"**{s.get('owners_in_train_and_heldout', 0)}**; val/test images whose owner has train images: "
                f"**{s.get('heldout_images_with_train_owner', 0)}** "
                f"({s.get('heldout_share_with_train_owner', 0.0):.1%}; owner-disjoint split: "
                f"{'yes' if config.owner_disjoint else 'no'})."
            ),
            "heldout_train_owner_pct": share_pct(s.get("heldout_share_with_train_owner", 0.0)),
            "per_province": md_table(result.per_province),
            "splits": data_file(paths, paths.splits),
        }
    )


def no_leak_check(paths: DataPaths, min_distance_km: float) -> dg.AssetCheckResult:
    """Blocking ``dataset_splits_no_leak``: the written splits against the labelled coordinates, at the distance
    the splits were made with (a fixed 1 km would fail every split made with a smaller configured distance)."""
    df = _labelled(paths).merge(read_table(paths.splits, SPLITS_SCHEMA), on="image_id", how="left")
    leaks = leakage_count(df["lat"], df["lon"], df["split"].to_numpy(), km=min_distance_km)
    missing = int(df["split"].isna().sum())
    return dg.AssetCheckResult(
        check_name=NO_LEAK.name,
        passed=leaks == 0 and missing == 0,
        metadata={"images": len(df), "min_distance_km": float(min_distance_km), "leaks_within_min_distance": leaks,
                  "labelled_images_without_split": missing},
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
    outlines = _outlines(boundaries)
    # fitted on train rows; a province whose every image is held out (tiny data) on its held-out images, said so
    built, no_train = fit_geocells_file(paths.labelled, paths.splits, cfg,
                                        province_areas_km2(outlines) if outlines else None)
    if no_train:
        context.log.warning(f"provinces {no_train} have no training images; their cells use held-out images")
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
            **synthetic_note(paths.labelled),
            **table_metadata(paths.geocells, GEOCELLS_SCHEMA, LINEAGE["geocells"]),
            "map": plot(
                paths, "geocells_map.png", cells_map_png(built.cells, polygons, outlines, "geocells (train)"),
                "geocell centres sized by images, Voronoi polygons",
            ),
            "cells": len(built.cells),
            "fitted_on_images": len(built.members),
            "provinces_fit_on_heldout": ", ".join(map(str, no_train)) or "none",
            "cells_over_cap": int((built.cells["radius_km"] > built.cells["cap_km"]).sum()),
            "max_radius_km": round(float(built.cells["radius_km"].max()), 1) if len(built.cells) else 0.0,
            "per_province": md_table(table),
            "fit_report": md_table(built.provinces),
            "cells_table": data_file(paths, paths.geocells),
            "neighbours": data_file(paths, paths.geocell_neighbours),
            "polygons": data_file(paths, paths.geocell_polygons),
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
                  "within_cap_pct": share_pct(1 - over / len(cells)) if len(cells) else 0.0},
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
    cells = read_table(paths.geocells, GEOCELLS_SCHEMA)
    by_split, cells_used = assign_cells_file(paths.labelled, paths.splits, cells, paths.cell_assignments)
    return dg.MaterializeResult(
        check_results=[assignments_complete_check(paths)],
        metadata={
            **synthetic_note(paths.labelled),
            **table_metadata(paths.cell_assignments, CELL_ASSIGNMENTS_SCHEMA, LINEAGE["cell_assignments"]),
            "images": int(by_split["images"].sum()),
            "cells_used": cells_used,
            "km_to_centre_by_split": md_table(by_split),
            "assignments": data_file(paths, paths.cell_assignments),
        }
    )


def assignments_complete_check(paths: DataPaths) -> dg.AssetCheckResult:
    """Blocking ``cell_assignments_complete``: recomputes each train image's distance to its cell's centre."""
    # column by column, matched by image_id (whole merged frames took several GB at 10 M rows)
    df = read_with_split(paths.labelled, paths.splits)
    cell_id = pc.fill_null(column_by_id(paths.labelled, paths.cell_assignments, "cell_id"), -1).to_numpy()
    cells = read_table(paths.geocells, GEOCELLS_SCHEMA)
    pos = pd.Index(cells["cell_id"]).get_indexer(cell_id)
    has_cell = pos >= 0
    cell = cells.iloc[np.where(has_cell, pos, 0)] if len(cells) else cells.reindex(range(len(pos)))
    wrong_province = int((has_cell & (cell["province_id"].to_numpy() != df["province_id"].to_numpy())).sum())
    train = pc.fill_null(pc.equal(df["split"], TRAIN), False).to_numpy() & has_cell
    d = haversine_km(df["lat"].to_numpy(), df["lon"].to_numpy(), cell["center_lat"].to_numpy(),
                     cell["center_lon"].to_numpy())  # recomputed independently of the fitting code
    train_over_cap = int(np.sum(train & ~(d <= cell["cap_km"].to_numpy() + 1e-6)))
    without = int((~has_cell).sum())
    return dg.AssetCheckResult(
        check_name=ASSIGNMENTS_COMPLETE.name,
        passed=without == 0 and wrong_province == 0 and train_over_cap == 0,
        metadata={"images": df.num_rows, "without_cell": without, "cell_in_other_province": wrong_province,
                  "train_images_beyond_cap": train_over_cap},
    )
