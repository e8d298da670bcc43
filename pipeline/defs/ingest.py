"""Sources → catalog: the offline sample world and the catalog that unions every source's manifest."""

from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field
import pyarrow.parquet as pq

from pipeline.catalog.build import build_catalog_files
from pipeline.labels.dates import capture_date_provenance
from pipeline.core.report import counts_table, province_map_png
from pipeline.core.schema import (
    CATALOG_SCHEMA,
    RAW_MANIFEST_SCHEMA,
    REJECTIONS_SCHEMA,
    empty_frame,
    read_table,
    write_table,
)
from pipeline.defs import crawl
from pipeline.defs.config import config_class, to_dataclass
from pipeline.defs.source_status import skipped_result
from pipeline.defs.metadata import (
    LINEAGE, breakable, data_file, md_table, plot, progress_logger, schema_metadata, synthetic_note, table_metadata,
)
from pipeline.defs.resources import (
    BoundariesResource,
    ComputeResource,
    DataRootResource,
    KoppenRasterResource,
    LocalSourceResource,
    writes_stage,
)
from pipeline.sources.local import SOURCE as LOCAL_SOURCE
from pipeline.sources.local import LocalSource
from pipeline.sources.sample_world import SampleWorldConfig, generate_sample_world


class SampleWorldParams(config_class(SampleWorldConfig)):  # type: ignore[misc]
    """Size and seed of the synthetic sample world (images rendered from real geodata, not photographs)."""

    enabled: bool = Field(default=True, description="turn off when you bring your own images and want no synthetic "
                          "ones in the catalog")


@dg.asset(
    pool="sample_world",  # one writer of raw/sample_world/ at a time, across runs (dagster_home/dagster.yaml)
    group_name="sources",
    kinds={"python", "parquet"},
    description="Deterministic SYNTHETIC geotagged JPEGs placed at real Pakistani places (offline default source).",
    metadata=schema_metadata(RAW_MANIFEST_SCHEMA),
)
@writes_stage("raw/sample_world")
def sample_world_images(
    context: dg.AssetExecutionContext,
    config: SampleWorldParams,
    data_root: DataRootResource,
    boundaries: BoundariesResource,
    koppen: KoppenRasterResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    cfg = to_dataclass(config, SampleWorldConfig)
    paths = data_root.paths
    if not config.enabled:
        paths.raw_manifest("sample_world").unlink(missing_ok=True)
        context.log.info("sample world disabled: its manifest is removed from the catalog's inputs")
        return skipped_result("disabled in its run config (enabled: false); its manifest is removed")
    polygons, raster = boundaries.polygons(), koppen.raster()  # the configured ones, as the labeller uses them
    manifest, truth = generate_sample_world(
        cfg, data_root.store, progress=progress_logger(context, "rendered"), workers=compute.workers,
        boundaries=polygons, koppen=raster,
    )
    write_table(manifest, paths.raw_manifest("sample_world"), RAW_MANIFEST_SCHEMA, check_values=False)
    truth.to_parquet(paths.sample_world_truth)
    ok = truth[truth["defect"] == ""]
    defects = truth.assign(defect=truth["defect"].replace("", "none (clean)"))  # no blank label row or column
    outlines = polygons.polygons
    return dg.MaterializeResult(
        metadata={
            **synthetic_note(manifest["source"]),
            "how_made": "rendered from real geodata (GeoNames places, a Köppen map), not photographs",
            "koppen_source": raster.source,
            "province_source": breakable(polygons.source),
            **table_metadata(paths.raw_manifest("sample_world"), RAW_MANIFEST_SCHEMA),
            "map": plot(
                paths,
                "sample_world_map.png",
                province_map_png(ok["lat"], ok["lon"], ok["province_key"].map(_key_to_id), outlines, "sample world"),
                "sample world points by intended province",
            ),
            "images": len(manifest),
            "distinct_image_ids": int(manifest["image_id"].nunique()),
            "deliberate_defects": md_table(defects.groupby("defect").size().rename("rows").reset_index()),
            "planned_per_province": md_table(counts_table(defects, "province_key", "defect")),
            "manifest": data_file(paths, paths.raw_manifest("sample_world")),
        }
    )


def _key_to_id(key: str) -> int:
    from pipeline.core.provinces import BY_KEY

    return BY_KEY[key].id if key in BY_KEY else -1


@dg.asset(
    pool="local_source",  # one writer of raw/local/ at a time, across runs (dagster_home/dagster.yaml)
    group_name="sources",
    kinds={"python", "parquet"},
    description="Your own geotagged images from a local folder (EXIF GPS) and/or a CSV/Parquet manifest. Off by default.",
    metadata=schema_metadata(RAW_MANIFEST_SCHEMA),
)
@writes_stage("raw/local")
def local_images(
    context: dg.AssetExecutionContext,
    data_root: DataRootResource,
    boundaries: BoundariesResource,
    local_source: LocalSourceResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    paths = data_root.paths
    manifest_path = paths.raw_manifest(LOCAL_SOURCE)
    cfg = local_source.config()  # settings resolved from the environment at run start
    if not cfg.enabled:
        # the catalog unions whatever manifests exist: a disabled source must not leave a stale one behind
        manifest_path.unlink(missing_ok=True)
        msg = "local source disabled: set GEOPAK_LOCAL_FOLDER and/or GEOPAK_LOCAL_MANIFEST to bring your own images"
        context.log.info(msg)
        return skipped_result(msg)
    previous = read_table(manifest_path) if manifest_path.exists() else None
    locator = boundaries.locator()
    result = LocalSource(
        cfg, data_root.store, lambda la, lo: locator.locate(la, lo) >= 0, previous=previous,
        workers=compute.workers, scheduler_address=compute.address(),  # file reads and hashes fan out
    ).run(progress=progress_logger(context, "local files inspected"))
    write_table(result.manifest, manifest_path, RAW_MANIFEST_SCHEMA, check_values=False)
    write_table(result.rejections, paths.source_rejections(LOCAL_SOURCE), REJECTIONS_SCHEMA)
    return dg.MaterializeResult(
        metadata={
            "enabled": "yes",
            **table_metadata(manifest_path, RAW_MANIFEST_SCHEMA),
            **{k: int(v) for k, v in result.stats.items()},
            "rejections_per_reason": md_table(result.rejections.groupby("reason").size().rename("rows").reset_index()),
            "preview": md_table(result.manifest[["source_id", "lat", "lon", "taken_at", "license"]].head(10)),
            "manifest": data_file(paths, manifest_path),
            "rejections": data_file(paths, paths.source_rejections(LOCAL_SOURCE)),
        }
    )


UNIQUE_IDS = dg.AssetCheckSpec("image_catalog_unique_ids", asset="image_catalog", blocking=True,
                              description="Every image_id occurs once.")


@dg.asset(
    pool="catalog",  # one writer of catalog/ at a time, across runs (dagster_home/dagster.yaml)
    group_name="catalog",
    kinds={"parquet"},
    # lineage only (keys, so the crawl assets are not pulled into this module's asset list); the catalog reads
    # whatever crawl partitions exist and works with none
    deps=[sample_world_images, local_images, *(a.key for a in crawl.CRAWL_ASSETS)],
    description="Union of every source's raw manifest, one schema, unique by image bytes; bad rows rejected.",
    metadata=schema_metadata(CATALOG_SCHEMA),
    check_specs=[UNIQUE_IDS],  # evaluated in the asset's own step: no empty check op in the Launchpad
)
@writes_stage("catalog")
def image_catalog(context: dg.AssetExecutionContext, data_root: DataRootResource) -> dg.MaterializeResult:
    paths = data_root.paths
    manifests = paths.raw_manifests()
    context.log.info(f"reading {len(manifests)} raw manifests: {[str(p) for p in manifests]}")
    # incremental: only new/changed manifests are resolved, only unseen files' headers are read (state beside it)
    stats = build_catalog_files(manifests, data_root.store, paths.catalog, paths.catalog_rejections,
                                paths.catalog_state, progress=progress_logger(context, "catalogued"))
    context.log.info(f"catalog: {stats.manifests_resolved}/{stats.manifests} manifests resolved, "
                     f"{stats.headers_read} headers read, {stats.headers_cached} from the cache")
    sources = pq.read_table(paths.catalog, columns=["source", "taken_at_source", "date_note"]).to_pandas()
    rejections = pq.read_table(paths.catalog_rejections, columns=["reason", "source"]).to_pandas()
    head = next(pq.ParquetFile(paths.catalog).iter_batches(batch_size=10), None)
    preview = head.to_pandas() if head is not None else empty_frame(CATALOG_SCHEMA)
    return dg.MaterializeResult(
        check_results=[unique_ids_check(paths.catalog)],
        metadata={
            **synthetic_note(sources["source"]),
            **table_metadata(paths.catalog, CATALOG_SCHEMA, LINEAGE["image_catalog"]),
            "rows": stats.rows,
            "rejected": stats.rejected,
            "build": md_table(pd.DataFrame(sorted(stats.as_metadata().items()), columns=["fact", "value"])),
            "rows_per_source": md_table(sources.groupby("source").size().rename("rows").reset_index()),
            "rejections_per_reason": md_table(counts_table(rejections, "reason", "source")),
            "capture_dates": md_table(capture_date_provenance(sources["taken_at_source"], sources["date_note"])),
            "preview": md_table(preview.drop(columns=["image_id"])),
            "catalog": data_file(paths, paths.catalog),
            "rejections": data_file(paths, paths.catalog_rejections),
        }
    )


def unique_ids_check(catalog: Path) -> dg.AssetCheckResult:
    """Blocking ``image_catalog_unique_ids``: read back from the written file, so it checks what downstream reads."""
    ids = pd.read_parquet(catalog, columns=["image_id"])["image_id"]
    dupes = int(ids.duplicated().sum())
    return dg.AssetCheckResult(check_name=UNIQUE_IDS.name, passed=dupes == 0,
                               metadata={"rows": len(ids), "duplicated_ids": dupes})
