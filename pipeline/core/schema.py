"""The catalog data contract: one schema shared by every source and stage, validated on every write.

Stages add columns (labels, cells, splits) on top of ``CATALOG_SCHEMA``; ``write_table`` checks the declared
columns' presence, types, nullability and value ranges, keeps extra columns, and writes Parquet atomically.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.store import atomic_path

UTC_TS = pa.timestamp("us", tz="UTC")


def col(name: str, type_: pa.DataType, description: str, nullable: bool = True, optional: bool = False) -> pa.Field:
    """A field whose description travels with it (Parquet field metadata; the Dagster UI's Columns tab).

    ``optional`` columns (always nullable) may be left out by a writer or be absent from an older file: they are
    filled with nulls, so adding one does not break every source's manifest or a table written before it existed.
    """
    meta = {"description": description}
    if optional:
        if not nullable:
            raise ValueError(f"optional column {name!r} must be nullable")
        meta["optional"] = "1"
    return pa.field(name, type_, nullable=nullable, metadata=meta)


def is_optional(field: pa.Field) -> bool:
    return (field.metadata or {}).get(b"optional") == b"1"


def fill_optional(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with every optional column of ``schema`` it lacks appended as nulls."""
    for f in schema:
        if is_optional(f) and f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(len(table), f.type))
    return table


def description(field: pa.Field) -> str:
    return (field.metadata or {}).get(b"description", b"").decode()


CATALOG_SCHEMA = pa.schema(
    [
        col("image_id", pa.string(), "sha256 of the image bytes (lowercase hex): one row per distinct image", False),
        col("source", pa.string(), "where the image came from: sample_world, local, flickr, google_places, ...", False),
        col("source_id", pa.string(), "the image's id at its source (photo id, file name, ...)", False),
        col("source_url", pa.string(), "page or download URL at the source, when it has one"),
        col("path", pa.string(), "the image file, relative to the data root", False),
        col("lat", pa.float64(), "latitude in degrees (WGS84)", False),
        col("lon", pa.float64(), "longitude in degrees (WGS84)", False),
        col("geo_accuracy", pa.float64(), "source-reported accuracy: metres, or Flickr's 1-16 level (see source)"),
        col("taken_at", UTC_TS, "when the photo was taken (UTC); null when unknown"),
        col("owner", pa.string(), "photographer or uploader id at the source (splits keep owners apart)"),
        col("license", pa.string(), "licence name or id at the source"),
        col("title", pa.string(), "title at the source"),
        col("tags", pa.string(), "the source's tags, space separated"),
        col("place_id", pa.string(), "shared place identity from the source (Google place, landmark)"),
        col("width", pa.int32(), "image width in pixels (after EXIF orientation)", False),
        col("height", pa.int32(), "image height in pixels (after EXIF orientation)", False),
        col("taken_at_source", pa.string(),
            "where taken_at came from, e.g. exif:DateTimeOriginal+OffsetTimeOriginal, flickr:datetaken; null: no date",
            optional=True),
        col("date_note", pa.string(),
            "why the photo has no usable capture date (coarse or unknown at the source, unreadable EXIF date)",
            optional=True),
        col("attribution", pa.string(),
            "attribution the source requires shown with the image (JSON list, e.g. Places authorAttributions)",
            optional=True),
    ]
)

# What a source hands to the catalog: coordinates and dates may be missing (read from EXIF), sizes are unknown.
RAW_MANIFEST_SCHEMA = pa.schema(
    [f.with_nullable(True) if f.name in ("lat", "lon") else f for f in CATALOG_SCHEMA if f.name not in ("width", "height")]
)

LABEL_FIELDS = [
    col("province_id", pa.int8(), "province index 0-6 (point in the province polygons)", False),
    col("province_key", pa.string(), "province short name: ajk, balochistan, gb, ict, kpk, punjab, sindh", False),
    col("koppen_id", pa.int8(), "Köppen-Geiger class at the coordinate: 0 water, 1-30 Beck ids", False),
    col("koppen_code", pa.string(), "Köppen-Geiger class code, e.g. BWh, Cfa", False),
    col("koppen_group", pa.int8(), "coarse Köppen group: 0 water, 1 A, 2 B, 3 C, 4 D, 5 E", False),
    col("day_of_year", pa.int16(),
        "1-based day of year taken (Pakistan time); null when the date is missing or implausible"),
    col("doy_sin", pa.float32(), "sin(2π·day_of_year / days in that year): the season as a point on a circle"),
    col("doy_cos", pa.float32(), "cos(2π·day_of_year / days in that year)"),
]
LABELLED_SCHEMA = pa.schema(list(CATALOG_SCHEMA) + LABEL_FIELDS)

# Measurements the filter stage adds to the rows it keeps (the labelled catalog carries them on). Written as extra
# columns, so not required by the schemas above; declared here for their types and descriptions (Dagster UI).
FILTER_METRIC_FIELDS = [
    col("sharpness", pa.float64(), "Laplacian variance of the grey image at blur_size px: low means blurred"),
    col("phash", pa.string(), "perceptual hash (hex) that near-duplicate detection compares"),
    col("indoor_score", pa.float64(), "CLIP indoor probability (0-1); null or NaN when the indoor filter did not run"),
]
FILTERED_FILE_SCHEMA = pa.schema(list(CATALOG_SCHEMA) + FILTER_METRIC_FIELDS)
LABELLED_FILE_SCHEMA = pa.schema(list(LABELLED_SCHEMA) + FILTER_METRIC_FIELDS)

REJECTIONS_SCHEMA = pa.schema(
    [
        col("stage", pa.string(), "the stage that rejected the row: source, crawl, catalog, filter or labels", False),
        col("source", pa.string(), "the row's source", False),
        col("source_id", pa.string(), "the row's id at its source", False),
        col("image_id", pa.string(), "sha256 of the image bytes, when they were read"),
        col("path", pa.string(), "the image file relative to the data root, when there is one"),
        col("reason", pa.string(), "one reason code (pipeline.core.reasons)", False),
        col("detail", pa.string(), "the measured value or error behind the reason"),
    ]
)


class SchemaError(ValueError):
    """A table does not satisfy its declared schema."""


def empty_frame(schema: pa.Schema) -> pd.DataFrame:
    return schema.empty_table().to_pandas()


def to_table(df: pd.DataFrame, schema: pa.Schema, check_values: bool = True) -> pa.Table:
    """Validate ``df`` against ``schema`` and convert; declared columns first, extra columns kept after them.

    ``check_values=False`` checks structure only (raw source manifests, whose bad values become rejections).
    """
    missing = [n for n in schema.names if n not in df.columns and not is_optional(schema.field(n))]
    if missing:
        raise SchemaError(f"missing columns {missing}")
    extra = [c for c in df.columns if c not in schema.names]
    arrays, fields = [], []
    for f in schema:
        if f.name not in df.columns:  # an optional column the writer left out
            arrays.append(pa.nulls(len(df), f.type))
            fields.append(f)
            continue
        col = df[f.name]
        if pa.types.is_timestamp(f.type):
            col = pd.to_datetime(col, utc=True)
        try:
            arr = pa.array(col, type=f.type, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise SchemaError(f"column {f.name!r} cannot be {f.type}: {exc}") from exc
        if not f.nullable and arr.null_count:
            raise SchemaError(f"column {f.name!r} has {arr.null_count} nulls but is required")
        arrays.append(arr)
        fields.append(f)
    for name in extra:
        arr = pa.array(df[name], from_pandas=True)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    if check_values:
        _check_values(table)
    return table


def check_image_ids(ids: pa.Array | pa.ChunkedArray, what: str | None = None) -> None:
    """Every non-null id is a lowercase sha256 hex digest (nulls are for the nullability rule to judge)."""
    ok = pc.match_substring_regex(ids, "^[0-9a-f]{64}$")
    if not pc.all(ok, skip_nulls=True, min_count=0).as_py():
        bad = ids.filter(pc.invert(pc.fill_null(ok, True)))
        raise SchemaError(f"{what + ': ' if what else ''}image_id must be a lowercase sha256 hex digest, "
                          f"got {bad.slice(0, 3).to_pylist()}")


def _check_values(table: pa.Table) -> None:
    """Value rules, one pyarrow.compute pass per column (no per-row Python: 1 M rows in well under a second)."""
    names = set(table.column_names)
    if "image_id" in names:
        check_image_ids(table["image_id"])
    for name, lo, hi in (("lat", -90.0, 90.0), ("lon", -180.0, 180.0)):
        if name in names:
            vals = pc.cast(table[name], pa.float64())
            ok = pc.and_(pc.is_finite(vals), pc.and_(pc.greater_equal(vals, lo), pc.less_equal(vals, hi)))
            # nulls are skipped where the field may be null; a required field's nulls were refused before this
            if not pc.all(ok, skip_nulls=table.schema.field(name).nullable, min_count=0).as_py():
                raise SchemaError(f"{name} values outside [{lo}, {hi}] or not finite")
    for name in ("width", "height"):
        if name in names and table[name].null_count == 0 and len(table):
            if int(pc.min(table[name]).as_py()) <= 0:
                raise SchemaError(f"{name} must be positive")


def write_table(df: pd.DataFrame, path: str | Path, schema: pa.Schema, check_values: bool = True) -> Path:
    """Validate and write Parquet atomically (temp file + rename)."""
    table = to_table(df, schema, check_values)
    with atomic_path(path, need_bytes=table.nbytes) as tmp:  # uncompressed size: a generous bound
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def read_table(path: str | Path, schema: pa.Schema | None = None) -> pd.DataFrame:
    """Read a Parquet table; with ``schema``, check it still satisfies the contract."""
    df = pq.read_table(path).to_pandas()
    if schema is not None:
        to_table(df, schema)
    return df

# Geocells and splits (issue 4). The model reads exactly these columns.
SPLITS_SCHEMA = pa.schema(
    [
        col("image_id", pa.string(), "sha256 of the image bytes (the labelled catalog's key)", False),
        col("split", pa.string(), "train | val | test | buffer (in no split: too close to another split)", False),
        col("group_id", pa.int64(), "location group: images of one group (within 1 km, same owner) share a split",
            False),
    ]
)
GEOCELLS_SCHEMA = pa.schema(
    [
        col("cell_id", pa.int64(), "global cell id, contiguous in province order (the model's cell class)", False),
        col("province_id", pa.int8(), "province index 0-6 the cell belongs to", False),
        col("local_id", pa.int64(), "index within the province's cell head", False),
        col("center_lat", pa.float64(), "latitude of the cell centre (a member image's coordinate)", False),
        col("center_lon", pa.float64(), "longitude of the cell centre", False),
        col("radius_km", pa.float64(), "largest member distance to the centre, km", False),
        col("count", pa.int64(), "member (training) images", False),
        col("cap_km", pa.float64(), "the radius cap this cell must hold, km (urban or rural)", False),
        col("urban", pa.bool_(), "whether the urban (smaller) cap applies", False),
    ]
)
GEOCELL_NEIGHBOURS_SCHEMA = pa.schema(
    [
        col("cell_id", pa.int64(), "the cell", False),
        col("neighbour_id", pa.int64(), "a neighbouring cell of the same province, nearest first", False),
        col("distance_km", pa.float64(), "centre-to-centre distance, km", False),
    ]
)
CELL_ASSIGNMENTS_SCHEMA = pa.schema(
    [
        col("image_id", pa.string(), "sha256 of the image bytes (the labelled catalog's key)", False),
        col("cell_id", pa.int64(), "the image's cell: nearest centre of its province within the cap, else nearest",
            False),
        col("province_id", pa.int8(), "province index 0-6 of the image (and of its cell)", False),
        col("distance_km", pa.float64(), "distance to the cell centre, km (may exceed the cap off train)", False),
    ]
)
