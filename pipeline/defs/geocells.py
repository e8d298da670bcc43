"""Labelled catalog → location-disjoint splits → geocells fitted on train → a cell for every labelled image.

Splits come first because they do not depend on cells; cells are fitted on training images only (GEOPAK fitted
them on all data, test included), and val/test images are then assigned to the nearest cell of their province.
"""

import dataclasses
import typing

import dagster as dg
import numpy as np
import pandas as pd
import pydantic

from pipeline.core.schema import (
    CELL_ASSIGNMENTS_SCHEMA,
    GEOCELL_NEIGHBOURS_SCHEMA,
    GEOCELLS_SCHEMA,
    SPLITS_SCHEMA,
    read_table,
    write_table,
)
from pipeline.core.store import atomic_path
from pipeline.defs.labels import labelled_catalog
from pipeline.defs.metadata import md_table, plot
from pipeline.defs.resources import BoundariesResource, DataRootResource
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


def _params(name: str, dc: type, doc: str) -> type[dg.Config]:
    """A Launchpad-editable Config with exactly the fields and defaults of a plain domain dataclass."""
    hints = typing.get_type_hints(dc)
    fields = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(dc)}
    return pydantic.create_model(name, __base__=dg.Config, __doc__=doc, __module__=__name__, **fields)


SplitParams = _params(
    "SplitParams", SplitConfig,
    "Split fractions and seed, the 1 km separation, how giant groups are tiled, owner-disjoint or owner×day.",
)
GeocellParams = _params(
    "GeocellParams", GeocellConfig, "Radius caps, the urban rule, target counts and HDBSCAN parameters."
)

_LABELLED_COLUMNS = ["image_id", "lat", "lon", "province_id", "place_id", "owner", "taken_at"]


def _labelled(data_root: DataRootResource) -> pd.DataFrame:
    return pd.read_parquet(data_root.paths.labelled, columns=_LABELLED_COLUMNS)


def _outlines(boundaries: BoundariesResource) -> dict | None:
    return getattr(boundaries.locator(), "polygons", None)


@dg.asset(
    group_name="geocells",
    kinds={"parquet"},
    deps=[labelled_catalog],
    description="Train/val/test, location-disjoint: no val/test image within 1 km of a train image.",
)
def dataset_splits(
    config: SplitParams, data_root: DataRootResource, boundaries: BoundariesResource
) -> dg.MaterializeResult:
    paths = data_root.paths
    df = _labelled(data_root)
    result = make_splits(df, SplitConfig(**config.model_dump()))
    write_table(result.table, paths.splits, SPLITS_SCHEMA)
    s = result.summary
    split = result.table["split"].to_numpy()
    return dg.MaterializeResult(
        metadata={
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
            "heldout_share_with_train_owner": float(s.get("heldout_share_with_train_owner", 0.0)),
            "per_province": md_table(result.per_province),
            "map": plot(
                paths, "dataset_splits_map.png",
                splits_map_png(df["lat"], df["lon"], split, _outlines(boundaries), "dataset splits"),
                "images by split",
            ),
            "splits": dg.MetadataValue.path(str(paths.splits)),
        }
    )


@dg.asset_check(
    asset=dataset_splits, blocking=True, description="No val or test image lies within 1 km of a train image."
)
def dataset_splits_no_leak(data_root: DataRootResource) -> dg.AssetCheckResult:
    df = _labelled(data_root).merge(read_table(data_root.paths.splits, SPLITS_SCHEMA), on="image_id", how="left")
    leaks = leakage_count(df["lat"], df["lon"], df["split"].to_numpy(), km=1.0)
    missing = int(df["split"].isna().sum())
    return dg.AssetCheckResult(
        passed=leaks == 0 and missing == 0,
        metadata={"images": len(df), "leaks_within_1km": leaks, "labelled_images_without_split": missing},
    )


@dg.asset(
    group_name="geocells",
    kinds={"parquet", "geoparquet"},
    deps=[dataset_splits],
    description="Per-province HDBSCAN geocells fitted on training images, radius caps enforced; neighbours; polygons.",
)
def geocells(
    context: dg.AssetExecutionContext,
    config: GeocellParams,
    data_root: DataRootResource,
    boundaries: BoundariesResource,
) -> dg.MaterializeResult:
    paths = data_root.paths
    cfg = GeocellConfig(**config.model_dump())
    df = _labelled(data_root).merge(read_table(paths.splits, SPLITS_SCHEMA), on="image_id", how="left")
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
        metadata={
            "cells": len(built.cells),
            "fitted_on_images": len(fit),
            "provinces_fitted_on_held_out_images": str(no_train),
            "cells_over_cap": int((built.cells["radius_km"] > built.cells["cap_km"]).sum()),
            "max_radius_km": float(built.cells["radius_km"].max()) if len(built.cells) else 0.0,
            "per_province": md_table(table),
            "fit_report": md_table(built.provinces),
            "map": plot(
                paths, "geocells_map.png", cells_map_png(built.cells, polygons, outlines, "geocells (train)"),
                "geocell centres sized by images, Voronoi polygons",
            ),
            "cells_table": dg.MetadataValue.path(str(paths.geocells)),
            "neighbours": dg.MetadataValue.path(str(paths.geocell_neighbours)),
            "polygons": dg.MetadataValue.path(str(paths.geocell_polygons)),
        }
    )


@dg.asset_check(asset=geocells, blocking=True, description="100% of cells hold their radius cap and have members.")
def geocells_within_cap(data_root: DataRootResource) -> dg.AssetCheckResult:
    cells = read_table(data_root.paths.geocells, GEOCELLS_SCHEMA)
    over = int((~(cells["radius_km"] <= cells["cap_km"] + 1e-9)).sum())
    empty = int((cells["count"] < 1).sum())
    return dg.AssetCheckResult(
        passed=over == 0 and empty == 0 and len(cells) > 0,
        metadata={"cells": len(cells), "over_cap": over, "empty": empty,
                  "share_within_cap": float(1 - over / len(cells)) if len(cells) else 0.0},
    )


@dg.asset(
    group_name="geocells",
    kinds={"parquet"},
    deps=[geocells],
    description="Every labelled image's cell: the nearest centre of its province within its cap, else the nearest.",
)
def cell_assignments(data_root: DataRootResource) -> dg.MaterializeResult:
    paths = data_root.paths
    df = _labelled(data_root).merge(read_table(paths.splits, SPLITS_SCHEMA), on="image_id", how="left")
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
        metadata={
            "images": len(out),
            "cells_used": int(out["cell_id"].nunique()),
            "distance_to_centre_by_split": md_table(by_split),
            "assignments": dg.MetadataValue.path(str(paths.cell_assignments)),
        }
    )


@dg.asset_check(
    asset=cell_assignments,
    blocking=True,
    description="Every labelled image has a cell of its own province; every train image lies within its cell's cap.",
)
def cell_assignments_complete(data_root: DataRootResource) -> dg.AssetCheckResult:
    paths = data_root.paths
    df = _labelled(data_root)[["image_id", "lat", "lon", "province_id"]]
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
        passed=without == 0 and wrong_province == 0 and train_over_cap == 0,
        metadata={"images": len(df), "without_cell": without, "cell_in_other_province": wrong_province,
                  "train_images_beyond_cap": train_over_cap},
    )
