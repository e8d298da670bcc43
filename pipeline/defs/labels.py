"""Filtered catalog → labelled catalog: province (point in polygon), Köppen-Geiger class, day of year."""

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from pipeline.core.report import curator_cell, province_map_png
from pipeline.core.schema import LABELLED_FILE_SCHEMA, LABELLED_SCHEMA, empty_frame
from pipeline.defs.filtering import filtered_catalog
from pipeline.defs.metadata import (
    LINEAGE, breakable, data_file, md_table, plot, schema_metadata, synthetic_note, table_metadata,
)
from pipeline.defs.resources import (
    BoundariesResource,
    DataRootResource,
    KoppenRasterResource,
    Locator,
    fallback_metadata,
    writes_stage,
)
from pipeline.labels.label import label_catalog_file


INSIDE_PAKISTAN = dg.AssetCheckSpec("labelled_inside_pakistan", asset="labelled_catalog", blocking=True,
                                   description="Every labelled coordinate lies in a province.")
KOPPEN_NOT_NULL = dg.AssetCheckSpec("labelled_koppen_not_null", asset="labelled_catalog", blocking=True,
                                   description="No labelled row lacks a Köppen-Geiger class.")
FROM_POLYGONS = dg.AssetCheckSpec(
    "labelled_provinces_from_polygons", asset="labelled_catalog",
    description="WARN when provinces came from the offline gazetteer fallback (82.6 % agreement with the polygons "
    "by area) because no boundary file was configured and the shipped one could not be read.",
)


@dg.asset(
    pool="labels",  # one writer of labels/ at a time, across runs (dagster_home/dagster.yaml)
    group_name="labels",
    kinds={"parquet"},
    deps=[filtered_catalog],
    description="Filtered catalog rows with province, Köppen-Geiger fine class and coarse group, and day of year.",
    metadata=schema_metadata(LABELLED_FILE_SCHEMA),
    check_specs=[INSIDE_PAKISTAN, KOPPEN_NOT_NULL, FROM_POLYGONS],  # run in this step: no empty check ops
)
@writes_stage("labels")
def labelled_catalog(
    context: dg.AssetExecutionContext,
    data_root: DataRootResource,
    boundaries: BoundariesResource,
    koppen: KoppenRasterResource,
) -> dg.MaterializeResult:
    paths = data_root.paths
    locator = boundaries.locator()
    raster = koppen.raster()
    context.log.info(f"provinces from {locator.source}; Köppen-Geiger from {raster.source}")
    fallback = fallback_metadata(locator)
    if fallback["province_fallback"]:
        context.log.warning(f"provinces from the gazetteer fallback: {fallback['province_fallback_reason']}")
    # filtering runs first (pipeline.defs.filtering); labelled batch by batch: memory O(batch), not O(catalog)
    summary = label_catalog_file(paths.filtered, paths.labelled, paths.label_rejections, locator, raster)
    raster.write_geotiff(paths.koppen_geotiff)
    outlines = getattr(locator, "polygons", None)
    points = summary.points()
    preview = summary.preview if summary.preview is not None else empty_frame(LABELLED_SCHEMA)
    return dg.MaterializeResult(
        check_results=[inside_pakistan_check(paths.labelled, locator), koppen_check(paths.labelled),
                       polygons_check(fallback)],
        metadata={
            **synthetic_note(paths.labelled),
            **table_metadata(paths.labelled, LABELLED_FILE_SCHEMA, LINEAGE["labelled_catalog"]),
            "map": plot(
                paths,
                "labelled_catalog_map.png",
                province_map_png(points["lat"], points["lon"], points["province_id"], outlines, "labelled catalog"),
                "labelled images by province" + (f" (an even sample of {len(points):,} of {summary.rows:,})"
                                                 if len(points) < summary.rows else ""),
            ),
            "rows": summary.rows,
            "rejected": summary.rejected,
            **{k: curator_cell(k, v) if isinstance(v, bool) else breakable(v) if isinstance(v, str) else v
               for k, v in fallback.items()},  # yes/no, long paths may wrap
            "koppen_source": raster.source,
            "rows_per_province_source": md_table(summary.table("province_source")),
            "koppen_classes": md_table(summary.table("koppen_province")),
            # a percentage (not a 0-1 share that reads like a count), charted run by run on the Plots tab
            "day_of_year_known_pct": round(100 * summary.day_of_year_known / summary.rows, 1) if summary.rows else 0.0,
            "capture_dates": md_table(summary.capture_table()),
            "rejections_per_reason": md_table(summary.table("rejection_source")),
            "preview": md_table(
                preview[["source", "source_id", "lat", "lon", "province_key", "koppen_code", "day_of_year"]].head(10)
            ),
            "labelled_catalog": data_file(paths, paths.labelled),
            "koppen_raster": data_file(paths, paths.koppen_geotiff),
        }
    )


def inside_pakistan_check(labelled: Path, locator: Locator) -> dg.AssetCheckResult:
    """Blocking ``labelled_inside_pakistan``: the written coordinates, located again."""
    df = pd.read_parquet(labelled, columns=["lat", "lon"])
    prov = locator.locate(df["lat"].to_numpy(), df["lon"].to_numpy())
    outside = int(np.sum(prov < 0))
    return dg.AssetCheckResult(check_name=INSIDE_PAKISTAN.name, passed=outside == 0,
                               metadata={"rows": len(df), "outside": outside})


def koppen_check(labelled: Path) -> dg.AssetCheckResult:
    """Blocking ``labelled_koppen_not_null``, on the written file."""
    df = pd.read_parquet(labelled, columns=["koppen_id", "koppen_code"])
    missing = int((df["koppen_id"].isna() | (df["koppen_id"] < 0) | df["koppen_code"].isna()).sum())
    return dg.AssetCheckResult(check_name=KOPPEN_NOT_NULL.name, passed=missing == 0,
                               metadata={"rows": len(df), "missing": missing})


def polygons_check(fallback: dict[str, str | bool]) -> dg.AssetCheckResult:
    """WARN ``labelled_provinces_from_polygons`` from the run's own ``fallback_metadata`` (the locator that labelled
    these rows, recorded beside them in the materialization)."""
    used = bool(fallback["province_fallback"])
    return dg.AssetCheckResult(
        check_name=FROM_POLYGONS.name,
        passed=not used,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"province_source": str(fallback["province_source"]), "province_fallback": used,
                  "reason": str(fallback.get("province_fallback_reason", "")) or "none"},
    )
