"""Sources → catalog: the offline sample world and the catalog that unions every source's manifest."""


import dagster as dg
import pandas as pd

from pipeline.core.catalog import build_catalog
from pipeline.core.report import counts_table, province_map_png
from pipeline.core.schema import (
    CATALOG_SCHEMA,
    RAW_MANIFEST_SCHEMA,
    REJECTIONS_SCHEMA,
    read_table,
    write_table,
)
from pipeline.defs import crawl
from pipeline.defs.metadata import md_table, plot, progress_logger
from pipeline.defs.resources import BoundariesResource, DataRootResource, KoppenRasterResource, LocalSourceResource
from pipeline.sources.local import SOURCE as LOCAL_SOURCE
from pipeline.sources.local import LocalSource
from pipeline.sources.sample_world import SampleWorldConfig, generate_sample_world


class SampleWorldParams(dg.Config):
    """Size and seed of the synthetic sample world (images rendered from real geodata, not photographs)."""

    enabled: bool = True  # turn off when you bring your own images and want no synthetic ones in the catalog
    n_images: int = 3000
    seed: int = 0
    image_size: int = 256
    rural_fraction: float = 0.15
    defect_fraction: float = 0.05
    workers: int = 2


@dg.asset(
    group_name="sources",
    kinds={"python", "parquet"},
    description="Deterministic SYNTHETIC geotagged JPEGs placed at real Pakistani places (offline default source).",
)
def sample_world_images(
    context: dg.AssetExecutionContext,
    config: SampleWorldParams,
    data_root: DataRootResource,
    boundaries: BoundariesResource,
    koppen: KoppenRasterResource,
) -> dg.MaterializeResult:
    cfg = SampleWorldConfig(
        n_images=config.n_images,
        seed=config.seed,
        image_size=config.image_size,
        rural_fraction=config.rural_fraction,
        defect_fraction=config.defect_fraction,
    )
    paths = data_root.paths
    if not config.enabled:
        paths.raw_manifest("sample_world").unlink(missing_ok=True)
        context.log.info("sample world disabled: its manifest is removed from the catalog's inputs")
        return dg.MaterializeResult(metadata={"enabled": False})
    polygons, raster = boundaries.polygons(), koppen.raster()  # the configured ones, as the labeller uses them
    manifest, truth = generate_sample_world(
        cfg, data_root.store, progress=progress_logger(context, "rendered"), workers=config.workers,
        boundaries=polygons, koppen=raster,
    )
    write_table(manifest, paths.raw_manifest("sample_world"), RAW_MANIFEST_SCHEMA, check_values=False)
    truth.to_parquet(paths.sample_world_truth)
    ok = truth[truth["defect"] == ""]
    outlines = polygons.polygons
    return dg.MaterializeResult(
        metadata={
            "synthetic": "yes: images rendered from real geodata (GeoNames places, a Köppen map), not photos",
            "koppen_source": raster.source,
            "province_source": polygons.source,
            "images": len(manifest),
            "distinct_image_ids": int(manifest["image_id"].nunique()),
            "deliberate_defects": md_table(truth.groupby("defect").size().rename("rows").reset_index()),
            "planned_per_province": md_table(counts_table(truth, "province_key", "defect")),
            "manifest": dg.MetadataValue.path(str(paths.raw_manifest("sample_world"))),
            "map": plot(
                paths,
                "sample_world_map.png",
                province_map_png(ok["lat"], ok["lon"], ok["province_key"].map(_key_to_id), outlines, "sample world"),
                "sample world points by intended province",
            ),
        }
    )


def _key_to_id(key: str) -> int:
    from pipeline.core.provinces import BY_KEY

    return BY_KEY[key].id if key in BY_KEY else -1


@dg.asset(
    group_name="sources",
    kinds={"python", "parquet"},
    description="Your own geotagged images from a local folder (EXIF GPS) and/or a CSV/Parquet manifest. Off by default.",
)
def local_images(
    context: dg.AssetExecutionContext,
    data_root: DataRootResource,
    boundaries: BoundariesResource,
    local_source: LocalSourceResource,
) -> dg.MaterializeResult:
    paths = data_root.paths
    manifest_path = paths.raw_manifest(LOCAL_SOURCE)
    cfg = local_source.config()  # settings resolved from the environment at run start
    if not cfg.enabled:
        # the catalog unions whatever manifests exist: a disabled source must not leave a stale one behind
        manifest_path.unlink(missing_ok=True)
        msg = "local source disabled: set GEOPAK_LOCAL_FOLDER and/or GEOPAK_LOCAL_MANIFEST to bring your own images"
        context.log.info(msg)
        return dg.MaterializeResult(metadata={"enabled": False, "status": msg})
    previous = read_table(manifest_path) if manifest_path.exists() else None
    locator = boundaries.locator()
    result = LocalSource(
        cfg, data_root.store, lambda la, lo: locator.locate(la, lo) >= 0, previous=previous
    ).run(progress=progress_logger(context, "local files/rows"))
    write_table(result.manifest, manifest_path, RAW_MANIFEST_SCHEMA, check_values=False)
    write_table(result.rejections, paths.source_rejections(LOCAL_SOURCE), REJECTIONS_SCHEMA)
    return dg.MaterializeResult(
        metadata={
            "enabled": True,
            **{k: int(v) for k, v in result.stats.items()},
            "rejections_per_reason": md_table(result.rejections.groupby("reason").size().rename("rows").reset_index()),
            "preview": md_table(result.manifest[["source_id", "lat", "lon", "taken_at", "license"]].head(10)),
            "manifest": dg.MetadataValue.path(str(manifest_path)),
            "rejections": dg.MetadataValue.path(str(paths.source_rejections(LOCAL_SOURCE))),
        }
    )


@dg.asset(
    group_name="catalog",
    kinds={"parquet"},
    # lineage only (keys, so the crawl assets are not pulled into this module's asset list); the catalog reads
    # whatever crawl partitions exist and works with none
    deps=[sample_world_images, local_images, *(a.key for a in crawl.CRAWL_ASSETS)],
    description="Union of every source's raw manifest, one schema, unique by image bytes; bad rows rejected.",
)
def image_catalog(context: dg.AssetExecutionContext, data_root: DataRootResource) -> dg.MaterializeResult:
    paths = data_root.paths
    manifests = [read_table(p) for p in paths.raw_manifests()]
    context.log.info(f"reading {len(manifests)} raw manifests: {[str(p) for p in paths.raw_manifests()]}")
    catalog, rejections = build_catalog(manifests, data_root.store, progress=progress_logger(context, "catalogued"))
    write_table(catalog, paths.catalog, CATALOG_SCHEMA)
    write_table(rejections, paths.catalog_rejections, REJECTIONS_SCHEMA)
    return dg.MaterializeResult(
        metadata={
            "rows": len(catalog),
            "rejected": len(rejections),
            "rows_per_source": md_table(catalog.groupby("source").size().rename("rows").reset_index()),
            "rejections_per_reason": md_table(counts_table(rejections, "reason", "source")),
            "preview": md_table(catalog.drop(columns=["image_id"]).head(10)),
            "catalog": dg.MetadataValue.path(str(paths.catalog)),
            "rejections": dg.MetadataValue.path(str(paths.catalog_rejections)),
        }
    )


@dg.asset_check(asset=image_catalog, blocking=True, description="Every image_id occurs once.")
def image_catalog_unique_ids(data_root: DataRootResource) -> dg.AssetCheckResult:
    ids = pd.read_parquet(data_root.paths.catalog, columns=["image_id"])["image_id"]
    dupes = int(ids.duplicated().sum())
    return dg.AssetCheckResult(passed=dupes == 0, metadata={"rows": len(ids), "duplicated_ids": dupes})
