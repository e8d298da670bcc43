"""Turn tables and plots into Dagster metadata, and save the plots beside the data for people without the UI.

Tables get Dagster's standard entries (``dagster/row_count``, ``dagster/column_schema`` with the descriptions that
``pipeline.core.schema`` declares, ``dagster/column_lineage``), so the UI shows a row count and a Columns tab.

Pictures: the UI renders a Markdown metadata value inline (no "[Show Markdown]" click) only when it is shorter than
1,000 characters, and draws images at their natural pixel size (its Markdown has no width control and no raw HTML).
A base64 PNG is never that short, so each picture is written twice under ``<data root>/reports/``: full size, and a
preview small enough for the metadata column. The metadata is a short Markdown image of the preview, linked to the
full picture, both served by ``python -m pipeline.report_server`` (``make ui`` starts it beside ``dagster dev``);
the file's path is the picture's tooltip, and its alt text (shown when no server runs) names the file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.paths import DataPaths
from pipeline.core.report import is_distance_km, markdown_table, round_km, round_share
from pipeline.core.schema import description
from pipeline.core.store import atomic_write_bytes

REPORTS_URL_ENV = "GEOPAK_REPORTS_URL"
DEFAULT_REPORTS_URL = "http://127.0.0.1:3001"
# Width of a preview: what the value column of an asset's Overview metadata table leaves in a 1,400 px window
# (measured in headless Chromium by docs/ui/screenshots.py: 298-410 px, narrowest where a metadata key is long;
# the Events tab leaves ~520 px); the height limit keeps a tall contact sheet on one screen.
PREVIEW_MAX_WIDTH = 296
PREVIEW_MAX_HEIGHT = 480


def md_table(df: pd.DataFrame, max_rows: int = 30) -> dg.MetadataValue:
    return dg.MetadataValue.md(markdown_table(df, max_rows=max_rows))


# ---------------------------------------------------------------------------------------------------- tables
def column_schema(schema: pa.Schema, columns: Iterable[str] | None = None) -> dg.TableSchema:
    """Dagster's column schema for ``schema`` (the declared columns, or those of ``columns`` in their order).

    A column the schema does not declare gets an empty description, which ``tests/test_ui_metadata.py`` rejects:
    every written column is declared, with its meaning, in ``pipeline.core.schema``.
    """
    names = list(columns) if columns is not None else schema.names
    cols = []
    for name in names:
        field = schema.field(name) if name in schema.names else None
        cols.append(dg.TableColumn(
            name=name,
            type=str(field.type) if field is not None else "unknown",
            description=description(field) if field is not None else "",
            constraints=dg.TableColumnConstraints(nullable=field.nullable) if field is not None else None,
        ))
    return dg.TableSchema(columns=cols)


def column_lineage(deps: Mapping[str, Sequence[tuple[str, str]]]) -> dg.TableColumnLineage:
    """``{"province_id": [("filtered_catalog", "lat"), ...]}`` -> Dagster's column lineage."""
    return dg.TableColumnLineage({
        column: [dg.TableColumnDep(asset_key=dg.AssetKey(asset), column_name=src) for asset, src in sources]
        for column, sources in deps.items()
    })


def passthrough(asset: str, columns: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """Lineage of columns copied unchanged from ``asset``."""
    return {c: [(asset, c)] for c in columns}


def table_metadata(
    table: str | Path | pd.DataFrame,
    schema: pa.Schema,
    lineage: Mapping[str, Sequence[tuple[str, str]]] | None = None,
) -> dict[str, dg.MetadataValue]:
    """The standard entries for a written Parquet file (or a frame): row count, its columns described, lineage.

    The row count and column list come from the file itself (its footer; no data read), so they are what was
    written, not what the code meant to write.
    """
    if isinstance(table, pd.DataFrame):
        rows, names = len(table), list(table.columns)
    else:
        meta = pq.read_metadata(table)
        rows, names = meta.num_rows, meta.schema.to_arrow_schema().names
    out: dict[str, dg.MetadataValue] = {
        "dagster/row_count": dg.MetadataValue.int(int(rows)),
        "dagster/column_schema": dg.MetadataValue.table_schema(column_schema(schema, names)),
    }
    if lineage:
        out["dagster/column_lineage"] = dg.MetadataValue.column_lineage(
            column_lineage({c: deps for c, deps in lineage.items() if c in names})
        )
    return out


def rounded(metadata: Mapping[str, object]) -> dict[str, object]:
    """Plain float values rounded to what they mean (distances, ``is_distance_km``: 0.1 km; others, shares such as
    ``acc_25km`` included: 3 digits), e.g. numbers a subprocess reported through Pipes; everything else unchanged."""
    out: dict[str, object] = {}
    for key, value in metadata.items():
        raw = value.value if isinstance(value, dg.FloatMetadataValue) else value
        if isinstance(raw, float) and not isinstance(raw, bool):
            value = round_km(raw) if is_distance_km(key) else round_share(raw)
        out[key] = value
    return out


def schema_metadata(schema: pa.Schema) -> dict[str, dg.TableSchema]:
    """Definition metadata for ``@dg.asset(metadata=...)``: the Columns tab shows before the first run."""
    return {"dagster/column_schema": column_schema(schema)}


# -------------------------------------------------------------------------------------------------- pictures
def reports_url() -> str:
    """Where ``python -m pipeline.report_server`` serves the data root's reports (``GEOPAK_REPORTS_URL``)."""
    return os.environ.get(REPORTS_URL_ENV, DEFAULT_REPORTS_URL).rstrip("/")


def report_link(paths: DataPaths, file: str | Path) -> str:
    """The report server's URL of a file under the data root (a URL the browser may open from the UI)."""
    rel = Path(file).resolve().relative_to(paths.root)
    return f"{reports_url()}/{quote(rel.as_posix())}"


def preview_png(png: bytes, max_width: int = PREVIEW_MAX_WIDTH, max_height: int = PREVIEW_MAX_HEIGHT) -> bytes:
    """The picture scaled down (never up) to fit ``max_width`` × ``max_height`` pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        scale = min(1.0, max_width / im.width, max_height / im.height)
        if scale >= 1.0:
            return png
        small = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB").resize(
            (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS
        )
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def preview_name(name: str) -> str:
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.preview.{ext}" if dot else f"{name}.preview"


def plot(paths: DataPaths, name: str, png: bytes, alt: str) -> dg.MetadataValue:
    """Write ``reports/<name>`` and its preview; return Markdown the asset page shows inline (< 1,000 chars)."""
    full, small = paths.report(name), paths.report(preview_name(name))
    atomic_write_bytes(full, png)
    atomic_write_bytes(small, preview_png(png))
    alt = alt.replace("[", "(").replace("]", ")")
    # the file's place goes in the tooltip: a path line under the picture would be clipped by the narrow column
    title = f"{full} - click for full size".replace('"', "'").replace(")", "]")
    alt = f"{alt}: reports/{name}"  # what a browser shows when the report server is not running
    md = f'[![{alt}]({report_link(paths, small)} "{title}")]({report_link(paths, full)})'
    return dg.MetadataValue.md(md)


def progress_logger(context: dg.AssetExecutionContext, what: str, every: int = 1000):
    """A progress callback for long loops: logs at the start, each time ``every`` more items (or 10 %) are done,
    and at the end, however often the loop calls it."""
    last = [-1]

    def report(done: int, total: int) -> None:
        step = max(1, min(every, total // 10 or 1))
        if done == total or last[0] < 0 or done - last[0] >= step:
            last[0] = done
            context.log.info(f"{what}: {done}/{total}")

    return report


# ----------------------------------------------------------------------------------------------- column lineage
# Which input columns each stage's columns come from (asset key, column). Kept here, beside one another, so the
# chain sources -> catalog -> filter -> labels -> splits -> cells reads in one place; each asset passes its entry
# to ``table_metadata``.
def _lineage() -> dict[str, dict[str, list[tuple[str, str]]]]:
    from pipeline.core.schema import CATALOG_SCHEMA, FILTER_METRIC_FIELDS, LABEL_FIELDS

    sources = ["sample_world_images", "local_images", "flickr_photos", "google_places_photos", "yfcc100m_photos",
               "gldv2_photos"]
    catalog_cols = CATALOG_SCHEMA.names
    metric_cols = [f.name for f in FILTER_METRIC_FIELDS]  # measured on the image at ``path``
    from_sources = {c: [(s, c) for s in sources] for c in catalog_cols if c not in ("width", "height", "image_id")}
    # image_id is the hash of the bytes at ``path``; width and height are read from the same image
    from_sources.update({c: [(s, "path") for s in sources] for c in ("image_id", "width", "height")})
    location = [("labelled_catalog", "lat"), ("labelled_catalog", "lon")]
    labels = {f.name: [("filtered_catalog", "lat"), ("filtered_catalog", "lon")] for f in LABEL_FIELDS}
    labels.update({c: [("filtered_catalog", "taken_at")] for c in ("day_of_year", "doy_sin", "doy_cos")})
    split_inputs = [*location, ("labelled_catalog", "owner"), ("labelled_catalog", "taken_at"),
                    ("labelled_catalog", "place_id")]
    cell_inputs = [*location, ("labelled_catalog", "province_id"), ("dataset_splits", "split")]
    centre = [("geocells", "cell_id"), ("geocells", "center_lat"), ("geocells", "center_lon")]
    return {
        "image_catalog": from_sources,
        "filtered_catalog": {**passthrough("image_catalog", catalog_cols),
                             **{c: [("image_catalog", "path")] for c in metric_cols}},
        "labelled_catalog": {**passthrough("filtered_catalog", [*catalog_cols, *metric_cols]), **labels},
        "dataset_splits": {"image_id": [("labelled_catalog", "image_id")], "split": split_inputs,
                           "group_id": split_inputs},
        "geocells": {
            **{c: cell_inputs for c in ("cell_id", "local_id", "center_lat", "center_lon", "radius_km", "count")},
            "province_id": [("labelled_catalog", "province_id")],
            "cap_km": cell_inputs, "urban": cell_inputs,
        },
        "cell_assignments": {
            "image_id": [("labelled_catalog", "image_id")],
            "cell_id": [*location, ("labelled_catalog", "province_id"), *centre, ("geocells", "cap_km")],
            "province_id": [("labelled_catalog", "province_id")],
            "distance_km": [*location, *centre],
        },
    }


LINEAGE = _lineage()
