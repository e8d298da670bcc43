"""Day of year on the year circle: the (sin, cos) encoding of a 1-based, leap-year-aware day and its inverse.

In the kernel because the labels write the encoding and the model's predictor decodes it; neither should depend
on the other (``pipeline.labels.dates`` keeps the date parsing, ``geopak_model`` imports ``pipeline.core`` only).
"""

from __future__ import annotations

import numpy as np


def days_in_year(year: np.ndarray) -> np.ndarray:
    year = np.asarray(year)
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    return np.where(leap, 366, 365)


def encode_day(doy: np.ndarray, year_length: np.ndarray | int = 365) -> tuple[np.ndarray, np.ndarray]:
    """(sin, cos) of the day's angle on the year circle; NaN in, NaN out."""
    angle = 2.0 * np.pi * (np.asarray(doy, dtype=np.float64) - 1.0) / np.asarray(year_length, dtype=np.float64)
    return np.sin(angle), np.cos(angle)


def decode_day(sin: np.ndarray, cos: np.ndarray, year_length: np.ndarray | int = 365) -> np.ndarray:
    """Inverse of ``encode_day``: the nearest whole day, 1..year_length."""
    n = np.asarray(year_length, dtype=np.float64)
    angle = np.mod(np.arctan2(np.asarray(sin, float), np.asarray(cos, float)), 2.0 * np.pi)
    day = np.rint(angle * n / (2.0 * np.pi))
    return (np.mod(day, n) + 1).astype(np.int64)


def circular_day_difference(a: np.ndarray, b: np.ndarray, year_length: float = 365.25) -> np.ndarray:
    """Absolute difference in days on the year circle (31 Dec vs 1 Jan is 1 day)."""
    d = np.abs(np.asarray(a, float) - np.asarray(b, float)) % year_length
    return np.minimum(d, year_length - d)
