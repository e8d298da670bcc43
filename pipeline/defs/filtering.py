"""Catalog → filtered catalog: every image kept or rejected with a reason (domain code in ``pipeline.filters``).

Filtering runs before labelling: decoding and quality checks are per image and labels are cheap, but dropping
broken and duplicate images first means no row is labelled only to leave, and the geotag checks need nothing but
catalog columns (they use the same province polygons as the labeller, so the labeller rarely rejects anything).
"""

from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field, field_validator

from pipeline.core import reasons
from pipeline.core.copies import COPIES_DIR
from pipeline.core.provinces import PROVINCES
from pipeline.core.report import bar_chart_png, counts_table
from pipeline.core.schema import CATALOG_SCHEMA, FILTERED_FILE_SCHEMA, REJECTIONS_SCHEMA, read_table, write_table
from pipeline.defs.config import config_class, to_dataclass
from pipeline.defs.ingest import image_catalog
from pipeline.defs.metadata import (
    LINEAGE, PREVIEW_MAX_WIDTH, breakable, data_file, md_table, plot, progress_logger, schema_metadata, settings_table,
    synthetic_note, table_metadata,
)
from pipeline.defs.resources import BoundariesResource, ComputeResource, DataRootResource, writes_stage
from pipeline.filters.examples import contact_sheet_png
from pipeline.filters.stage import KEPT, STAGE, FilterConfig, FilterResult, filter_catalog

# workers is the compute resource's (one knob for every stage's local processes), so it is not a filter setting here
class FilterParams(config_class(FilterConfig, exclude=("workers",))):  # type: ignore[misc]
    """Thresholds of the filtering stage (their reasons: ``pipeline.filters.stage.FilterConfig``)."""

    examples_per_reason: int = Field(default=4, ge=0, description="rejected images shown per reason in the "
                                     "contact sheet (≥ 0)")

    @field_validator("allowed_formats")
    @classmethod
    def _upper(cls, formats: list[str]) -> list[str]:
        return [f.upper() for f in formats]

    def to_config(self, workers: int = FilterConfig.workers) -> FilterConfig:
        """The domain config; ``workers`` comes from the compute resource."""
        return to_dataclass(self, FilterConfig, workers=workers)


DISJOINT = dg.AssetCheckSpec("filtered_disjoint_from_rejections", asset="filtered_catalog", blocking=True,
                            description="No image is both kept and rejected.")
HAVE_REASONS = dg.AssetCheckSpec("filter_rejections_have_reasons", asset="filtered_catalog", blocking=True,
                                description="Every rejection has a known reason code (and stage 'filter').")
INDOOR_EVALUATED = dg.AssetCheckSpec("indoor_filter_evaluated", asset="filtered_catalog",
                                    description="The CLIP indoor filter ran; WARNs when it was skipped and every "
                                    "image passed through unchecked (no pretrained weights).")


@dg.asset(
    pool="filter",  # one writer of filter/ at a time, across runs (dagster_home/dagster.yaml)
    group_name="filter",
    kinds={"python", "parquet"},
    deps=[image_catalog],
    description="Catalog rows that pass decoding, quality, duplicate, geotag, licence and indoor checks; "
    "every other row is in filter/rejections.parquet with one reason.",
    metadata=schema_metadata(FILTERED_FILE_SCHEMA),
    # config-less checks run in the asset's own step (no empty check op in the Launchpad); the configurable
    # province-loss check below stays its own op
    check_specs=[DISJOINT, HAVE_REASONS, INDOOR_EVALUATED],
)
@writes_stage("filter")
def filtered_catalog(
    context: dg.AssetExecutionContext,
    config: FilterParams,
    data_root: DataRootResource,
    boundaries: BoundariesResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    paths = data_root.paths
    cfg = config.to_config(workers=compute.workers)
    catalog = read_table(paths.catalog, CATALOG_SCHEMA)
    locator = boundaries.locator()
    res = filter_catalog(
        catalog, data_root.store, locator, cfg, paths.filter_cache, paths.filter_indoor_cache,
        progress=progress_logger(context, "measured"), log=context.log.info, scheduler_address=compute.address(),
        copy_dir=paths.root / COPIES_DIR,
    )
    context.log.info(f"indoor filter: {res.indoor_note}")
    write_table(res.kept, paths.filtered, CATALOG_SCHEMA)
    write_table(res.rejections, paths.filter_rejections, REJECTIONS_SCHEMA)
    return dg.MaterializeResult(
        check_results=[disjoint_check(paths.filtered, paths.filter_rejections),
                       reasons_check(paths.filter_rejections), indoor_check(res)],
        metadata=_metadata(paths, res, cfg, config.examples_per_reason, locator.source),
    )


def indoor_check(res: FilterResult) -> dg.AssetCheckResult:
    """``indoor_filter_evaluated``: a WARN, not a silent note, when indoor photos could not be looked for."""
    return dg.AssetCheckResult(check_name=INDOOR_EVALUATED.name, passed=res.indoor_evaluated,
                               severity=dg.AssetCheckSeverity.WARN, metadata={"indoor_filter": res.indoor_note})


def _outcome_order(outcomes: pd.Series) -> list[str]:
    present = set(outcomes)
    return [KEPT] + [r for r in reasons.DESCRIPTIONS if r in present] + sorted(present - {KEPT, *reasons.DESCRIPTIONS})


def _metadata(paths, res: FilterResult, cfg: FilterConfig, per_reason: int, province_source: str) -> dict:
    o = res.outcomes
    order = _outcome_order(o["outcome"])
    by_prov_src = pd.crosstab([o["province_key"], o["source"]], o["outcome"]).reindex(columns=order, fill_value=0)
    by_prov_src["total"] = by_prov_src.sum(axis=1)
    by_prov_src.loc[("total", ""), :] = by_prov_src.sum(axis=0)
    rejected = o[o["outcome"] != KEPT]
    chart = counts_table(rejected.rename(columns={"outcome": "reason"}), "reason", "province_key", total=False)
    meta = {
        **synthetic_note(o["source"]),
        **table_metadata(paths.filtered, FILTERED_FILE_SCHEMA, LINEAGE["filtered_catalog"]),
        "rejection_examples": dg.MetadataValue.md(_examples_md(paths, rejected, per_reason, cfg)),
        "input_rows": len(o),
        # a percentage, charted run by run on the Plots tab
        "rejected_pct": round(100 * len(res.rejections) / len(o), 1) if len(o) else 0.0,
        "kept": len(res.kept),
        "rejected": len(res.rejections),
        "indoor_filter": breakable(res.indoor_note),
        "per_province_and_source": md_table(by_prov_src.astype(int).reset_index(), max_rows=60),
        "per_reason_and_province": md_table(counts_table(o, "outcome", "province_key")),
        "province_source": breakable(province_source),
        "metrics_decoded": res.metrics_computed,
        "metrics_from_cache": res.metrics_reused,
        "metrics_reread_changed": res.metrics_rechecked,  # cached, but the file's size/mtime changed since
        # training copies made by the metrics decode for image_shards (pipeline.core.copies)
        "copies_of_kept_images": res.copies_kept,
        "copies_dropped_rejected": res.copies_dropped,
        "near_duplicate_groups": res.duplicate_groups,
        "thresholds": settings_table(cfg, "parameter"),
        "filtered_catalog": data_file(paths, paths.filtered),
        "rejections": data_file(paths, paths.filter_rejections),
    }
    if len(rejected):
        meta["rejections_chart"] = plot(
            paths, "filter_rejections.png",
            bar_chart_png(chart, "reason", "rejected images per reason and province"),
            "rejected images per reason (stacked by province)",
        )
    return meta


def _examples_md(paths, rejected: pd.DataFrame, per_reason: int, cfg: FilterConfig) -> str:
    if rejected.empty or per_reason <= 0:
        return "_(no rejections)_"
    examples = {
        reason: [(paths.root / p if isinstance(p, str) else None, str(sid))
                 for p, sid in grp[["path", "source_id"]].head(per_reason).itertuples(index=False)]
        for reason, grp in rejected.groupby("outcome", sort=False)
    }
    # 66 px thumbnails, three to a line: the sheet fits the preview at its own size, so labels stay legible
    png = contact_sheet_png(dict(sorted(examples.items())), thumb=66, max_pixels=cfg.max_pixels,
                            max_width=PREVIEW_MAX_WIDTH)
    return plot(paths, "filter_rejection_examples.png", png, "example rejected images per reason").value


def _province_counts(boundaries: BoundariesResource, df: pd.DataFrame) -> pd.Series:
    ids = boundaries.locator().locate(df["lat"].to_numpy(float), df["lon"].to_numpy(float))
    return pd.Series(ids).value_counts()


class ProvinceLossParams(dg.Config):
    """When the filter's losses in a province block the run: a meaningful number of images, most of them lost."""

    min_images: int = Field(default=20, ge=0, description="provinces with fewer catalog images only WARN, whatever "
                            "they lose (≥ 0)")
    max_lost_fraction: float = Field(default=0.5, ge=0.0, le=1.0, description="losing at least this share of a "
                                     "province's images is a real loss (≥ 0.0, ≤ 1.0)")


def _province_loss_table(before: pd.Series, after: pd.Series) -> pd.DataFrame:
    table = pd.DataFrame(
        [(p.key, int(before.get(p.id, 0)), int(after.get(p.id, 0))) for p in PROVINCES],
        columns=["province_key", "catalog", "kept"],
    )
    table["lost_fraction"] = (1 - table["kept"] / table["catalog"].where(table["catalog"] > 0)).fillna(0.0).round(3)
    return table


@dg.asset_check(
    asset=filtered_catalog, blocking=True,
    description="Blocking (ERROR) when a province with at least `min_images` (20) catalog images loses at least "
    "`max_lost_fraction` (50 %) of them to the filter; WARN when a smaller province loses that share or is emptied "
    "(e.g. its only image rejected). The numbers are the check's config.",
)
def filtered_nonempty_per_province(
    config: ProvinceLossParams, data_root: DataRootResource, boundaries: BoundariesResource
) -> dg.AssetCheckResult:
    paths = data_root.paths
    before = _province_counts(boundaries, pd.read_parquet(paths.catalog, columns=["lat", "lon"]))
    after = _province_counts(boundaries, pd.read_parquet(paths.filtered, columns=["lat", "lon"]))
    table = _province_loss_table(before, after)
    lossy = (table["catalog"] > 0) & ((table["lost_fraction"] >= config.max_lost_fraction) | (table["kept"] == 0))
    severe = lossy & (table["catalog"] >= config.min_images)
    minor = lossy & ~severe
    return dg.AssetCheckResult(
        passed=not lossy.any(),
        severity=dg.AssetCheckSeverity.ERROR if severe.any() else dg.AssetCheckSeverity.WARN,
        metadata={
            "blocking_losses": ", ".join(table.loc[severe, "province_key"]) or "none",
            "warned_losses": ", ".join(table.loc[minor, "province_key"]) or "none",
            "emptied_provinces": ", ".join(table.loc[(table["catalog"] > 0) & (table["kept"] == 0), "province_key"])
            or "none",
            "rule": f"ERROR: >= {config.min_images} images and >= {config.max_lost_fraction:.0%} lost; else WARN",
            "per_province": md_table(table),
        },
    )


def disjoint_check(filtered: Path, rejections: Path) -> dg.AssetCheckResult:
    """Blocking ``filtered_disjoint_from_rejections``, on the written files."""
    kept = pd.read_parquet(filtered, columns=["image_id", "source", "source_id"])
    rej = pd.read_parquet(rejections, columns=["image_id", "source", "source_id", "reason"])
    same_row = kept.merge(rej, on=["source", "source_id"])
    # a defensive duplicate_bytes rejection shares its image_id with the kept copy by design
    same_image = set(kept["image_id"]) & set(rej.loc[rej["reason"] != reasons.DUPLICATE_BYTES, "image_id"].dropna())
    return dg.AssetCheckResult(
        check_name=DISJOINT.name,
        passed=same_row.empty and not same_image,
        metadata={"rows_kept_and_rejected": len(same_row), "images_kept_and_rejected": len(same_image)},
    )


def reasons_check(rejections: Path) -> dg.AssetCheckResult:
    """Blocking ``filter_rejections_have_reasons``, on the written rejections file."""
    rej = pd.read_parquet(rejections, columns=["stage", "reason"])
    reason = rej["reason"].fillna("").astype(str)
    missing = int((reason.str.strip() == "").sum())
    unknown = sorted(set(reason[reason != ""]) - set(reasons.DESCRIPTIONS))
    wrong_stage = int((rej["stage"] != STAGE).sum())
    return dg.AssetCheckResult(
        check_name=HAVE_REASONS.name,
        passed=missing == 0 and not unknown and wrong_stage == 0,
        metadata={"rejections": len(rej), "without_reason": missing, "unknown_reasons": ", ".join(unknown) or "none",
                  "wrong_stage": wrong_stage},
    )
