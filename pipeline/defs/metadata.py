"""Turn tables and plots into Dagster metadata, and save the plots beside the data for people without the UI.

Tables get Dagster's standard entries (``dagster/row_count``, ``dagster/column_schema`` with the descriptions that
``pipeline.core.schema`` declares, ``dagster/column_lineage``), so the UI shows a row count and a Columns tab.

What a curator reads (issue 24): every value must fit the narrow Value column of an asset page without scrolling
sideways. Summary tables become Dagster table values (``md_table``: inline at any length, one rounding rule, one row
per item when too wide); long words get break points (``breakable``); files are shown relative to the data root
(``data_file``); figures drawn from the sample world carry a synthetic-data note as their first entry
(``synthetic_note``). ``docs/ui/screenshots.py`` checks the result in a browser at 1,280 and 1,400 px.

Pictures: the UI renders a Markdown metadata value inline (no "[Show Markdown]" click) only when it is shorter than
1,000 characters, and draws images at their natural pixel size (its Markdown has no width control and no raw HTML).
A base64 PNG is never that short, so each picture is written twice under ``<data root>/reports/``: full size, and a
preview small enough for the metadata column. The metadata is a short Markdown image of the preview, linked to the
picture's viewer page (a back link returns to the UI), all served by ``python -m pipeline.report_server`` (``geopak
ui`` / ``make ui`` start it beside ``dagster dev`` at ``GEOPAK_REPORTS_URL``); the file's path under the data root
is the picture's tooltip, and its alt text (shown when no server runs) names the file.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.paths import DataPaths
from pipeline.core.report import curator_cell, is_distance_km, is_share, round_km, settings_rows, share_pct
from pipeline.core.schema import description
from pipeline.core.store import atomic_write_bytes
from pipeline.report_server import VIEW, reports_url



# Room for one value in an asset page's metadata table: the Value column that docs/ui/screenshots.py measured at
# 1,280 px with ordinary scrollbars (label | updated | value, a right sidebar) beside a MAX_LABEL_WORD label: about
# 225 px. Dagster's table font takes about 7.8 px a character; a cell adds its padding. A table estimated wider is
# shown one row per item (``md_table``).
VALUE_COLUMN_PX = 220
# A label is one unbreakable word per underscore-joined name: the label column is as wide as the longest and the
# Value column gets the rest, so longer labels are shortened where they are made (tests/test_ui_metadata.py).
MAX_LABEL_WORD = 25
CHAR_PX, CELL_PAD_PX = 7.8, 18
MORE_ROWS = "more rows"
# A preview is as wide as a value may be (docs/ui/screenshots.py fails on a cut picture); the height limit keeps
# a tall contact sheet within one 1,000 px high window.
PREVIEW_MAX_WIDTH = VALUE_COLUMN_PX
PREVIEW_MAX_HEIGHT = 760
SYNTHETIC_KEY = "synthetic_data"
SAMPLE_WORLD_SOURCE = "sample_world"


def table_width_px(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> float:
    """Least width a browser gives an HTML table: each column as wide as its header (Dagster's headers do not
    wrap) or its longest unbreakable word (zero-width spaces are break points)."""
    def word(text: object) -> int:
        return max((len(w) for w in str(text).replace(BREAK, " ").split()), default=0)

    return sum(max([len(str(c)), *(word(r[i]) for r in rows)]) * CHAR_PX + CELL_PAD_PX
               for i, c in enumerate(columns))


LONG_WORD = 12  # characters (about 95 px in the UI's monospace font): a longer word gets break points
PATH_FITS = 28  # characters of a file path that fit the Value column unbroken beside a MAX_LABEL_WORD label
BREAK = "\u200b"  # zero-width space: a place where the browser may wrap, invisible otherwise
_SEPARATORS = re.compile(r"([/:+_.\-,=])")
_RUN = re.compile(r"[^/:+_.\-,=\s]{12}(?=[^/:+_.\-,=\s])")


def breakable(text: object) -> str:
    """``text`` with break points after the separators of its long words (paths, hashes, ``exif:A+B`` tags) and
    every 12 characters of a long unseparated run: one such word would widen the whole metadata table past the
    window; with them it wraps inside its cell."""
    def fix(word: str) -> str:
        if len(word) <= LONG_WORD:
            return word
        return _RUN.sub(lambda m: m.group(0) + BREAK, _SEPARATORS.sub(lambda m: m.group(1) + BREAK, word))

    return " ".join(fix(w) for w in str(text).split(" "))


def _header(column: object) -> str:
    """A column name as a header that may wrap (``per_province`` -> ``per province``)."""
    return str(column).replace("_", " ")


def _cell(column: object, value: object, root: Path | None) -> str | int:
    """One table cell: ``curator_cell``'s text, paths under ``root`` made relative, long words breakable."""
    cell = curator_cell(column, value)
    if isinstance(cell, int):
        return cell
    return breakable(cell.replace(f"{root}/", "") if root is not None else cell)


def md_table(df: pd.DataFrame, max_rows: int = 30, root: Path | None = None) -> dg.MetadataValue:
    """A table for the asset page, readable in the Value column without scrolling sideways.

    Dagster's table value renders inline at any length (Markdown over 1,000 characters hides behind "[Show
    Markdown]"). Cells follow ``curator_cell`` (one rounding rule, shares as %, yes/no), paths under ``root`` are
    shown relative to it, long words may wrap (``breakable``). When the columns would not
    fit ``VALUE_COLUMN_PX``, the table turns to one row per item: the first column, then the others as wrapping
    "name: value" pairs (in one column when even that is too wide), so no number sits off-screen.
    """
    shown = df.head(max_rows)
    headers = [_header(c) for c in shown.columns]
    rows = [[_cell(c, v, root) for c, v in zip(shown.columns, row)] for row in shown.itertuples(index=False)]
    if len(headers) > 2 and table_width_px(headers, rows) > VALUE_COLUMN_PX:
        pairs = [" · ".join(f"{h}: {v}" for h, v in zip(headers[1:], r[1:]) if v != "") for r in rows]
        headers, rows = [headers[0], "values"], [[r[0], p] for r, p in zip(rows, pairs)]
        if table_width_px(headers, rows) > VALUE_COLUMN_PX:  # a long first header (headers never wrap): one column
            headers, rows = headers[:1], [[f"{r[0]} — {r[1]}"] for r in rows]
    if len(df) > max_rows:
        rows.append([f"{len(df) - max_rows} {MORE_ROWS}", *[""] * (len(headers) - 1)])
    if not headers:
        headers, rows = ["rows"], [[0]]
    types = ["int" if rows and all(isinstance(r[i], int) for r in rows) else "string" for i in range(len(headers))]
    return dg.MetadataValue.table(
        records=[dg.TableRecord(dict(zip(headers, r))) for r in rows],
        schema=dg.TableSchema(columns=[dg.TableColumn(h, t) for h, t in zip(headers, types)]),
    )


def settings_table(settings: object, name: str = "setting") -> dg.MetadataValue:
    """Settings or counts (a dataclass, a mapping) as a name/value table, never a Python or JSON repr."""
    return md_table(pd.DataFrame(settings_rows(settings), columns=[name, "value"]), max_rows=200)


def metadata_text(value: object) -> str:
    """A metadata value as text without its break points: a table value as ``| a | b |`` lines (header first),
    anything else its value; what tests and logs read."""
    if isinstance(value, dg.TableMetadataValue):
        names = [c.name for c in value.schema.columns]
        text = "\n".join(["| " + " | ".join(names) + " |",
                          *("| " + " | ".join(str(r.data.get(n, "")) for n in names) + " |" for r in value.records)])
    else:
        text = str(getattr(value, "value", value))
    return text.replace(BREAK, "")


def data_file(paths: DataPaths, file: str | Path) -> dg.MetadataValue:
    """A file's path relative to the data root, as people compare it across machines (absolute if outside)."""
    full = Path(file).resolve()
    try:
        rel = full.relative_to(paths.root.resolve()).as_posix()
    except ValueError:
        rel = str(full)
    # a path is one word: a longer one is shown as text that may wrap (copy it without the break points)
    return dg.MetadataValue.path(rel) if len(rel) <= PATH_FITS else dg.MetadataValue.text(breakable(rel))


def synthetic_note(sources: pd.Series | str | Path | None) -> dict[str, dg.MetadataValue]:
    """The caveat for figures drawn from the generated sample world, meant as the FIRST metadata entry (dict order
    is the UI's order): ``{**synthetic_note(...), ...}``. ``sources``: the ``source`` column, or a Parquet file that
    has one; empty when no row is synthetic, so real data carries no warning."""
    if sources is None:
        return {}
    if not isinstance(sources, pd.Series):
        if not Path(sources).exists():
            return {}
        sources = pq.read_table(sources, columns=["source"]).column("source").to_pandas()
    share = float((sources == SAMPLE_WORLD_SOURCE).mean()) if len(sources) else 0.0
    if share == 0.0:
        return {}
    return {SYNTHETIC_KEY: dg.MetadataValue.md(
        f"⚠️ **Synthetic data.** {curator_cell('share', share)} of these images are the generated sample world "
        "(drawn tiles, not photographs): every figure here checks the pipeline, not real-world accuracy.")}


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
    """Plain float values by the one rounding rule (distances, ``is_distance_km``: 0.1 km; shares, ``is_share``
    such as ``acc_25km``: a percentage to 0.1 under ``<key>_pct``; others: 3 digits), e.g. numbers a subprocess
    reported through Pipes; everything else unchanged."""
    out: dict[str, object] = {}
    for key, value in metadata.items():
        raw = value.value if isinstance(value, dg.FloatMetadataValue) else value
        if isinstance(raw, float) and not isinstance(raw, bool):
            if is_distance_km(key):
                value = round_km(raw)
            elif is_share(key):
                key, value = f"{key}_pct", share_pct(raw)
            else:
                value = round(raw, 3)
        out[key] = value
    return out


def schema_metadata(schema: pa.Schema) -> dict[str, dg.TableSchema]:
    """Definition metadata for ``@dg.asset(metadata=...)``: the Columns tab shows before the first run."""
    return {"dagster/column_schema": column_schema(schema)}


# -------------------------------------------------------------------------------------------------- pictures
def report_link(paths: DataPaths, file: str | Path, view: bool = False) -> str:
    """The report server's URL of a file under the data root (a URL the browser may open from the UI); ``view``:
    its page with a link back, for a picture opened from the UI."""
    rel = quote(Path(file).resolve().relative_to(paths.root.resolve()).as_posix())
    return f"{reports_url()}/{VIEW}/{rel}" if view else f"{reports_url()}/{rel}"


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
    title = f"reports/{name} - click for full size".replace('"', "'").replace(")", "]")
    alt = f"{alt}: reports/{name}"  # what a browser shows when the report server is not running
    md = f'[![{alt}]({report_link(paths, small)} "{title}")]({report_link(paths, full, view=True)})'
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
