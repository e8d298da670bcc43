"""Filtered catalog → labelled catalog: province (point in polygon), Köppen-Geiger class, day of year."""


import dagster as dg
import numpy as np
import pandas as pd

from pipeline.core.report import counts_table, province_map_png
from pipeline.core.schema import (
    CATALOG_SCHEMA,
    LABELLED_FILE_SCHEMA,
    LABELLED_SCHEMA,
    REJECTIONS_SCHEMA,
    read_table,
    write_table,
)
from pipeline.defs.filtering import filtered_catalog
from pipeline.defs.metadata import LINEAGE, md_table, plot, schema_metadata, table_metadata
from pipeline.defs.resources import (
    BoundariesResource,
    DataRootResource,
    KoppenRasterResource,
    fallback_metadata,
    writes_stage,
)
from pipeline.labels.label import label_catalog


@dg.asset(
    pool="labels",  # one writer of labels/ at a time, across runs (dagster_home/dagster.yaml)
    group_name="labels",
    kinds={"parquet"},
    deps=[filtered_catalog],
    description="Filtered catalog rows with province, Köppen-Geiger fine class and coarse group, and day of year.",
    metadata=schema_metadata(LABELLED_FILE_SCHEMA),
)
@writes_stage("labels")
def labelled_catalog(
    context: dg.AssetExecutionContext,
    data_root: DataRootResource,
    boundaries: BoundariesResource,
    koppen: KoppenRasterResource,
) -> dg.MaterializeResult:
    paths = data_root.paths
    catalog = read_table(paths.filtered, CATALOG_SCHEMA)  # filtering runs first: see pipeline.defs.filtering
    locator = boundaries.locator()
    raster = koppen.raster()
    context.log.info(f"provinces from {locator.source}; Köppen-Geiger from {raster.source}")
    fallback = fallback_metadata(locator)
    if fallback["province_fallback"]:
        context.log.warning(f"provinces from the gazetteer fallback: {fallback['province_fallback_reason']}")
    labelled, rejections = label_catalog(catalog, locator, raster)
    write_table(labelled, paths.labelled, LABELLED_SCHEMA)
    write_table(rejections, paths.label_rejections, REJECTIONS_SCHEMA)
    raster.write_geotiff(paths.koppen_geotiff)
    outlines = getattr(locator, "polygons", None)
    return dg.MaterializeResult(
        metadata={
            **table_metadata(paths.labelled, LABELLED_FILE_SCHEMA, LINEAGE["labelled_catalog"]),
            "map": plot(
                paths,
                "labelled_catalog_map.png",
                province_map_png(labelled["lat"], labelled["lon"], labelled["province_id"], outlines, "labelled catalog"),
                "labelled images by province",
            ),
            "rows": len(labelled),
            "rejected": len(rejections),
            **fallback,
            "koppen_source": raster.source,
            "rows_per_province_and_source": md_table(counts_table(labelled, "province_key", "source")),
            "koppen_classes": md_table(counts_table(labelled, "koppen_code", "province_key")),
            "day_of_year_known": round(float(labelled["day_of_year"].notna().mean()), 3) if len(labelled) else 0.0,
            "rejections_per_reason": md_table(counts_table(rejections, "reason", "source")),
            "preview": md_table(
                labelled[["source", "source_id", "lat", "lon", "province_key", "koppen_code", "day_of_year"]].head(10)
            ),
            "labelled_catalog": dg.MetadataValue.path(str(paths.labelled)),
            "koppen_raster": dg.MetadataValue.path(str(paths.koppen_geotiff)),
        }
    )


def _labelled(data_root: DataRootResource, columns: list[str]) -> pd.DataFrame:
    return pd.read_parquet(data_root.paths.labelled, columns=columns)


@dg.asset_check(asset=labelled_catalog, blocking=True, description="Every labelled coordinate lies in a province.")
def labelled_inside_pakistan(data_root: DataRootResource, boundaries: BoundariesResource) -> dg.AssetCheckResult:
    df = _labelled(data_root, ["lat", "lon"])
    prov = boundaries.locator().locate(df["lat"].to_numpy(), df["lon"].to_numpy())
    outside = int(np.sum(prov < 0))
    return dg.AssetCheckResult(passed=outside == 0, metadata={"rows": len(df), "outside": outside})


@dg.asset_check(asset=labelled_catalog, blocking=True, description="No labelled row lacks a Köppen-Geiger class.")
def labelled_koppen_not_null(data_root: DataRootResource) -> dg.AssetCheckResult:
    df = _labelled(data_root, ["koppen_id", "koppen_code"])
    missing = int((df["koppen_id"].isna() | (df["koppen_id"] < 0) | df["koppen_code"].isna()).sum())
    return dg.AssetCheckResult(passed=missing == 0, metadata={"rows": len(df), "missing": missing})


@dg.asset_check(
    asset=labelled_catalog,
    description="WARN when provinces came from the offline gazetteer fallback (82.6 % agreement with the polygons "
    "by area) because no boundary file was configured and the shipped one could not be read.",
)
def labelled_provinces_from_polygons(
    context: dg.AssetCheckExecutionContext, boundaries: BoundariesResource
) -> dg.AssetCheckResult:
    """Reads what the materialization recorded, so a check run later reports on the rows as they were labelled."""
    event = context.instance.get_latest_materialization_event(labelled_catalog.key)
    recorded = event.asset_materialization.metadata if event and event.asset_materialization else {}
    if "province_fallback" in recorded:
        fallback = bool(recorded["province_fallback"].value)
        reason = recorded["province_fallback_reason"].value if "province_fallback_reason" in recorded else ""
        source = recorded["province_source"].value
    else:  # a materialization from before this metadata existed: judge by this run's locator
        meta = fallback_metadata(boundaries.locator())
        fallback, source = bool(meta["province_fallback"]), meta["province_source"]
        reason = meta.get("province_fallback_reason", "")
    return dg.AssetCheckResult(
        passed=not fallback,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"province_source": str(source), "province_fallback": fallback, "reason": str(reason) or "none"},
    )
