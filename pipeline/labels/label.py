"""Attach province, Köppen-Geiger class and day of year to catalog rows; reject points outside Pakistan."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import reasons
from pipeline.core.provinces import BY_ID
from pipeline.core.reasons import rejection
from pipeline.core.report import counts_table
from pipeline.core.schema import (
    CATALOG_SCHEMA,
    LABELLED_SCHEMA,
    REJECTIONS_SCHEMA,
    empty_frame,
    fill_optional,
    to_table,
)
from pipeline.core.store import atomic_path
from pipeline.labels.boundaries import OUTSIDE, GazetteerProvinces, ProvinceBoundaries
from pipeline.labels.dates import (
    MIN_PLAUSIBLE_YEAR,
    capture_date_origins,
    day_of_year,
    provenance_table,
)
from pipeline.core.day_of_year import days_in_year, encode_day
from pipeline.core.koppen_classes import KOPPEN_CODES, NODATA, coarse_group
from pipeline.labels.koppen import KoppenRaster

STAGE = "labels"


def label_catalog(
    catalog: pd.DataFrame,
    provinces: ProvinceBoundaries | GazetteerProvinces,
    koppen: KoppenRaster,
    now: pd.Timestamp | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (labelled rows, rejections). Fully vectorised: no per-row Python in the lookups."""
    lat = catalog["lat"].to_numpy(dtype=np.float64)
    lon = catalog["lon"].to_numpy(dtype=np.float64)
    prov = provinces.locate(lat, lon)
    kg = koppen.sample(lat, lon)
    out = catalog.copy()
    out["province_id"] = prov.astype(np.int8)
    out["province_key"] = [BY_ID[int(p)].key if p != OUTSIDE else None for p in prov]
    out["koppen_id"] = kg
    out["koppen_code"] = [KOPPEN_CODES[int(k)] if k != NODATA else None for k in kg]
    out["koppen_group"] = coarse_group(kg)
    doy = day_of_year(out["taken_at"], now)
    years = pd.to_datetime(out["taken_at"], utc=True).dt.tz_convert("Asia/Karachi").dt.year
    ylen = days_in_year(years.fillna(2001).astype(int).to_numpy())
    s, c = encode_day(doy.astype("float64").to_numpy(), ylen)
    out["day_of_year"] = doy
    # a date the labeller refuses (before 1990, in the future) keeps taken_at; date_note says why it has no label
    note = (out["date_note"] if "date_note" in out.columns else pd.Series(None, index=out.index)).astype(object)
    fill = (doy.isna().to_numpy() & pd.to_datetime(out["taken_at"], utc=True).notna().to_numpy()
            & note.isna().to_numpy())
    note[fill] = [f"implausible capture date for a day-of-year label: {t} (before {MIN_PLAUSIBLE_YEAR} or in the "
                  "future)" for t in out.loc[fill, "taken_at"]]
    out["date_note"] = note
    out["doy_sin"] = s.astype(np.float32)
    out["doy_cos"] = c.astype(np.float32)

    outside = prov == OUTSIDE
    no_kg = ~outside & (kg == NODATA)
    rej = [rejection(STAGE, r, reasons.OUTSIDE_PAKISTAN, f"lat={r['lat']:.5f} lon={r['lon']:.5f}")
           for r in out[outside].to_dict("records")]
    rej += [rejection(STAGE, r, reasons.NO_CLIMATE_CLASS, koppen.source) for r in out[no_kg].to_dict("records")]
    labelled = out[~outside & ~no_kg].reset_index(drop=True)
    rejections = pd.DataFrame(rej, columns=REJECTIONS_SCHEMA.names) if rej else empty_frame(REJECTIONS_SCHEMA)
    return labelled, rejections


LABEL_BATCH_ROWS = 250_000  # rows labelled at a time: memory is O(batch), not O(catalog)
MAP_POINTS = 20_000  # points drawn on the labelled-catalog map (an evenly spaced sample beyond that)


@dataclass
class LabelSummary:
    """What the labels asset reports, gathered batch by batch so no step holds the whole table."""

    rows: int = 0
    rejected: int = 0
    day_of_year_known: int = 0
    by_province_source: Counter = field(default_factory=Counter)
    by_koppen_province: Counter = field(default_factory=Counter)
    by_rejection_source: Counter = field(default_factory=Counter)
    capture_dates: Counter = field(default_factory=Counter)
    preview: pd.DataFrame | None = None
    map_points: list[pd.DataFrame] = field(default_factory=list)

    def add(self, labelled: pd.DataFrame, rejections: pd.DataFrame, map_every: int) -> None:
        self.rows += len(labelled)
        self.rejected += len(rejections)
        self.day_of_year_known += int(labelled["day_of_year"].notna().sum())
        self.by_province_source.update(_pairs(labelled, "province_key", "source"))
        self.by_koppen_province.update(_pairs(labelled, "koppen_code", "province_key"))
        self.by_rejection_source.update(_pairs(rejections, "reason", "source"))
        origins = capture_date_origins(labelled["taken_at_source"], labelled["date_note"])
        self.capture_dates.update(_pairs(origins, "capture time from", "no usable date because"))
        if self.preview is None and len(labelled):
            self.preview = labelled.head(10)
        if len(labelled):
            self.map_points.append(labelled[["lat", "lon", "province_id"]].iloc[::map_every].reset_index(drop=True))

    def table(self, which: str) -> pd.DataFrame:
        """A cross-tab (with totals) of one of the counters, laid out as ``counts_table`` lays out row counts."""
        counter, rows, cols = {"province_source": (self.by_province_source, "province_key", "source"),
                               "koppen_province": (self.by_koppen_province, "koppen_code", "province_key"),
                               "rejection_source": (self.by_rejection_source, "reason", "source")}[which]
        frame = pd.DataFrame([(a, b, n) for (a, b), n in counter.items()], columns=[rows, cols, "rows"])
        return counts_table(frame, rows, cols, weights="rows")

    def capture_table(self) -> pd.DataFrame:
        return provenance_table(pd.DataFrame([(a, b, n) for (a, b), n in self.capture_dates.items()],
                                             columns=["capture time from", "no usable date because", "rows"]))

    def points(self) -> pd.DataFrame:
        return pd.concat(self.map_points, ignore_index=True) if self.map_points else \
            pd.DataFrame({"lat": [], "lon": [], "province_id": []})


def _pairs(frame: pd.DataFrame, a: str, b: str) -> Counter:
    """Rows per (a, b) value pair; missing values counted as "(none)"."""
    if frame.empty:
        return Counter()
    sizes = frame[[a, b]].astype(object).fillna("(none)").value_counts()
    return Counter({key: int(n) for key, n in sizes.items()})


def label_catalog_file(
    filtered: str | Path,
    labelled_path: str | Path,
    rejections_path: str | Path,
    provinces: ProvinceBoundaries | GazetteerProvinces,
    koppen: KoppenRaster,
    now: pd.Timestamp | None = None,
    batch_rows: int = LABEL_BATCH_ROWS,
) -> LabelSummary:
    """Label the filtered catalog file batch by batch into ``labelled_path`` and ``rejections_path`` (both written
    atomically, validated per batch); return the figures the asset reports. Peak memory is one batch plus the
    output writers: 10 M rows label in the memory of 250,000 (``bench/scale_labels.py``)."""
    source = pq.ParquetFile(filtered)
    total = source.metadata.num_rows
    saved_index = (source.schema_arrow.pandas_metadata or {}).get("index_columns") or []
    index = {c for c in saved_index if isinstance(c, str)}  # a frame's index saved as a column (a range is not)
    extras = [f for f in source.schema_arrow if f.name not in LABELLED_SCHEMA.names and f.name not in index]
    out_schema = pa.schema(list(LABELLED_SCHEMA) + extras)
    summary = LabelSummary()
    map_every = max(1, math.ceil(total / MAP_POINTS))
    with atomic_path(labelled_path) as lab_tmp, atomic_path(rejections_path) as rej_tmp, \
            pq.ParquetWriter(lab_tmp, out_schema, compression="zstd") as lab_w, \
            pq.ParquetWriter(rej_tmp, REJECTIONS_SCHEMA, compression="zstd") as rej_w:
        for batch in source.iter_batches(batch_size=batch_rows):
            catalog = fill_optional(pa.Table.from_batches([batch]), CATALOG_SCHEMA).to_pandas().reset_index(drop=True)
            to_table(catalog, CATALOG_SCHEMA)  # the input still satisfies the contract
            labelled, rejections = label_catalog(catalog, provinces, koppen, now)
            lab_w.write_table(to_table(labelled, LABELLED_SCHEMA).select(out_schema.names).cast(out_schema))
            if len(rejections):
                rej_w.write_table(to_table(rejections, REJECTIONS_SCHEMA))
            summary.add(labelled, rejections, map_every)
    return summary
