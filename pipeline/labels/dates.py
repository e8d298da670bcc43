"""Day of year (1-based, leap-year aware) and its circular encoding, after the Phileo geographic expert.

Phileo used a 0-based day over a fixed 365-day year that decodes 1 January as 365; here day 1 is 1 January,
the angle is 2π(d − 1)/len(year), and decoding with the same year length returns the same day for every day of
leap and non-leap years. Missing or implausible dates (future, before ``MIN_PLAUSIBLE_YEAR``) give null.
"""

from __future__ import annotations

import pandas as pd

MIN_PLAUSIBLE_YEAR = 1990


def plausible_dates(taken_at: pd.Series, now: pd.Timestamp | None = None) -> pd.Series:
    """Dates taken as UTC timestamps with implausible ones (future, before 1990) set to NaT."""
    ts = pd.to_datetime(taken_at, utc=True)
    now = pd.Timestamp.now(tz="UTC") if now is None else now
    bad = (ts > now) | (ts.dt.year < MIN_PLAUSIBLE_YEAR)
    return ts.mask(bad)


def day_of_year(taken_at: pd.Series, now: pd.Timestamp | None = None) -> pd.Series:
    """1-based day of year (nullable Int16) of plausible dates. Local calendar day in Pakistan (UTC+5)."""
    ts = plausible_dates(taken_at, now).dt.tz_convert("Asia/Karachi")
    return ts.dt.dayofyear.astype("Int16")


def capture_date_origins(taken_at_source: pd.Series, date_note: pd.Series) -> pd.DataFrame:
    """Per row: where its capture time came from, and why it has no usable date (a note's text before its first
    ': '), the two columns ``capture_date_provenance`` counts."""
    return pd.DataFrame({
        "capture time from": taken_at_source.astype("string").fillna("(no capture time)"),
        "no usable date because": date_note.astype("string").str.split(": ", n=1).str[0].fillna(""),
    })


def provenance_table(counts: pd.DataFrame) -> pd.DataFrame:
    """(origin, reason, rows) counts, most rows first."""
    return counts.sort_values("rows", ascending=False, kind="stable").reset_index(drop=True)


def capture_date_provenance(taken_at_source: pd.Series, date_note: pd.Series) -> pd.DataFrame:
    """Rows per capture-time origin, and per reason a row has none.

    What a curator checks before trusting day-of-year labels: how many dates came from DateTimeOriginal with an
    offset, how many assumed Pakistan time, how many sources gave no day-precise date and why.
    """
    out = capture_date_origins(taken_at_source, date_note)
    return provenance_table(out.groupby(["capture time from", "no usable date because"]).size().rename("rows")
                            .reset_index())
