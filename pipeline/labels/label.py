"""Attach province, Köppen-Geiger class and day of year to catalog rows; reject points outside Pakistan."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.core import reasons
from pipeline.core.catalog import rejection
from pipeline.core.provinces import BY_ID
from pipeline.core.schema import REJECTIONS_SCHEMA, empty_frame
from pipeline.labels.boundaries import OUTSIDE, GazetteerProvinces, ProvinceBoundaries
from pipeline.labels.dates import MIN_PLAUSIBLE_YEAR, day_of_year, days_in_year, encode_day
from pipeline.labels.koppen import KOPPEN_CODES, NODATA, KoppenRaster, coarse_group

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
