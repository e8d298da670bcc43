"""The catalog data contract: one schema shared by every source and stage, validated on every write.

Stages add columns (labels, cells, splits) on top of ``CATALOG_SCHEMA``; ``write_table`` checks the declared
columns' presence, types, nullability and value ranges, keeps extra columns, and writes Parquet atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.store import atomic_path

UTC_TS = pa.timestamp("us", tz="UTC")

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # sha256 of the image bytes
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("source_url", pa.string()),
        pa.field("path", pa.string(), nullable=False),  # relative to the data root
        pa.field("lat", pa.float64(), nullable=False),
        pa.field("lon", pa.float64(), nullable=False),
        pa.field("geo_accuracy", pa.float64()),  # source-reported: metres, or Flickr's 1-16 level (see source)
        pa.field("taken_at", UTC_TS),
        pa.field("owner", pa.string()),
        pa.field("license", pa.string()),
        pa.field("title", pa.string()),
        pa.field("tags", pa.string()),
        pa.field("place_id", pa.string()),  # shared place identity from the source (Google place, landmark)
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)

# What a source hands to the catalog: coordinates and dates may be missing (read from EXIF), sizes are unknown.
RAW_MANIFEST_SCHEMA = pa.schema(
    [f.with_nullable(True) if f.name in ("lat", "lon") else f for f in CATALOG_SCHEMA if f.name not in ("width", "height")]
)

LABEL_FIELDS = [
    pa.field("province_id", pa.int8(), nullable=False),
    pa.field("province_key", pa.string(), nullable=False),
    pa.field("koppen_id", pa.int8(), nullable=False),  # 0 water, 1-30 Beck ids
    pa.field("koppen_code", pa.string(), nullable=False),
    pa.field("koppen_group", pa.int8(), nullable=False),  # 0 water, 1 A, 2 B, 3 C, 4 D, 5 E
    pa.field("day_of_year", pa.int16()),  # 1-based; null when the date is missing or implausible
    pa.field("doy_sin", pa.float32()),
    pa.field("doy_cos", pa.float32()),
]
LABELLED_SCHEMA = pa.schema(list(CATALOG_SCHEMA) + LABEL_FIELDS)

REJECTIONS_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
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
    missing = [n for n in schema.names if n not in df.columns]
    if missing:
        raise SchemaError(f"missing columns {missing}")
    extra = [c for c in df.columns if c not in schema.names]
    arrays, fields = [], []
    for f in schema:
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


def _check_values(table: pa.Table) -> None:
    names = set(table.column_names)
    if "image_id" in names:
        ids = table["image_id"].drop_null().to_numpy(zero_copy_only=False).astype(str)
        bad = [i for i in ids if len(i) != 64 or not all(ch in "0123456789abcdef" for ch in i)]
        if bad:
            raise SchemaError(f"image_id must be a lowercase sha256 hex digest, got {bad[:3]}")
    for name, lo, hi in (("lat", -90.0, 90.0), ("lon", -180.0, 180.0)):
        if name in names:
            vals = table[name].to_numpy(zero_copy_only=False).astype(float)
            vals = vals[~np.isnan(vals)] if table.schema.field(name).nullable else vals
            if not np.all(np.isfinite(vals) & (vals >= lo) & (vals <= hi)):
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
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # train | val | test | buffer (in no split)
        pa.field("group_id", pa.int64(), nullable=False),  # images of one group share a split
    ]
)
GEOCELLS_SCHEMA = pa.schema(
    [
        pa.field("cell_id", pa.int64(), nullable=False),  # global, contiguous in province order
        pa.field("province_id", pa.int8(), nullable=False),
        pa.field("local_id", pa.int64(), nullable=False),  # index within the province's cell head
        pa.field("center_lat", pa.float64(), nullable=False),  # a member image's coordinate
        pa.field("center_lon", pa.float64(), nullable=False),
        pa.field("radius_km", pa.float64(), nullable=False),  # largest member distance to the centre
        pa.field("count", pa.int64(), nullable=False),  # member (training) images
        pa.field("cap_km", pa.float64(), nullable=False),
        pa.field("urban", pa.bool_(), nullable=False),
    ]
)
GEOCELL_NEIGHBOURS_SCHEMA = pa.schema(
    [
        pa.field("cell_id", pa.int64(), nullable=False),
        pa.field("neighbour_id", pa.int64(), nullable=False),  # same province, nearest first
        pa.field("distance_km", pa.float64(), nullable=False),
    ]
)
CELL_ASSIGNMENTS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("cell_id", pa.int64(), nullable=False),
        pa.field("province_id", pa.int8(), nullable=False),
        pa.field("distance_km", pa.float64(), nullable=False),  # to the cell centre (may exceed the cap off train)
    ]
)
