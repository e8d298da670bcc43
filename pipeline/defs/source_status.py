"""Whether each image source is configured, shown before anything runs, and one way to record a skipped source.

Why: a crawl source without keys looked like any never-run asset, its skipped partitions stayed "Missing" with the
reason hidden under historical events, while a disabled ``local_images`` showed a green materialization. One rule
for every source now:

- **Before a run**: each source asset carries ``source_status`` metadata computed when the code location loads
  (from the same resource logic the run uses, reading the environment then; reload the code location after
  changing it). It names the environment variables that are missing, never their values.
- **A run that skips a source** (disabled, or not configured) *materializes* it with ``status: skipped``, the
  ``reason`` and ``dagster/row_count`` = the rows the catalog will read from it (0, or what an earlier crawl left
  and is kept), so the partitions view shows a materialized partition whose latest event says why. Nothing is
  failed and no data is deleted beyond what each source already did (a disabled local source removes its
  manifest; a crawl source keeps an earlier crawl's manifest, so removing a key never drops crawled images).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

SKIPPED = "skipped"
STATUS_KEY = "source_status"


def manifest_rows(path: Path) -> int:
    """Rows in a source's manifest (0 when there is none); reads the Parquet footer only."""
    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


def skipped_result(reason: str, manifest: Path | None = None) -> dg.MaterializeResult:
    """The materialization of a skipped source (or source partition): why, and what the catalog still reads."""
    rows = manifest_rows(manifest) if manifest is not None else 0
    meta: dict = {"status": SKIPPED, "reason": reason, "images": rows, "new_images_this_run": 0,
                  "dagster/row_count": rows}
    if rows:
        meta["kept_from_earlier_run"] = dg.MetadataValue.path(str(manifest))
    return dg.MaterializeResult(metadata=meta)


def status_text(reason: str | None) -> str:
    """What the asset's ``source_status`` metadata says: configured, or not and why."""
    return "configured: it runs" if reason is None else f"skipped when run: {reason}"


def with_source_status(assets: list, reasons: dict[str, str | None]) -> list:
    """``assets`` with ``source_status`` definition metadata for those named in ``reasons`` (asset name -> skip
    reason, None when configured)."""

    def add(spec: dg.AssetSpec) -> dg.AssetSpec:
        name = spec.key.path[-1]
        if name not in reasons:
            return spec
        spec = spec.merge_attributes(metadata={STATUS_KEY: status_text(reasons[name])})
        if spec.partitions_def is None:
            return spec
        # the partitions view shows the description, not the Overview's metadata: say there why a province is
        # "Missing" (never run; a skipped run materializes it with its reason)
        return spec.replace_attributes(description=f"{spec.description or ''} A province shows Missing until a "
                                       f"crawl of it has run; this source is {status_text(reasons[name])}.".strip())

    return dg.map_asset_specs(add, assets)
