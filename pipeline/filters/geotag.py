"""Geotag sanity on catalog columns only (no pixels): null island, outside Pakistan, source accuracy.

Accuracy units differ by source, so each source has its own rule (``AccuracyRule``):
- Flickr reports an accuracy *level* from 1 (world) to 16 (street); higher is better -> ``min_level``.
- Every other source (EXIF GPSHPositioningError, Google, Mapillary, ...) reports metres; lower is better
  -> ``max_metres``.
The rule for a source is ``rules[source]``, else ``rules["*"]``. A missing accuracy passes: an unknown accuracy is
not evidence of a bad geotag (most EXIF GPS blocks omit it), and the coordinate checks still apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.core import reasons
from pipeline.core.fields import check_fields, doc_field
from pipeline.core.provinces import PAKISTAN_BBOX

DEFAULT_SOURCE = "*"
NULL_ISLAND_TOLERANCE_DEG = 1e-4  # ~11 m: (0, 0) written by software, not a real photo in the Gulf of Guinea


@dataclass(frozen=True)
class AccuracyRule:
    """Exactly one of ``min_level`` (Flickr-style levels, higher is better) or ``max_metres`` (lower is better)."""

    min_level: float | None = doc_field(None, "minimum Flickr-style accuracy level (1 world … 11 city … 16 street; "
                                        "higher is better); set exactly one of min_level / max_metres", ge=0)
    max_metres: float | None = doc_field(None, "maximum position error in metres (lower is better); set exactly one "
                                         "of min_level / max_metres", ge=0)

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.min_level is None) == (self.max_metres is None):
            raise ValueError("an accuracy rule needs exactly one of min_level or max_metres")

    def inaccurate(self, accuracy: np.ndarray) -> np.ndarray:
        acc = np.asarray(accuracy, dtype=np.float64)
        known = np.isfinite(acc)
        bad = acc < self.min_level if self.min_level is not None else acc > self.max_metres
        return known & bad

    def describe(self, value: float) -> str:
        if self.min_level is not None:
            return f"accuracy level {value:g} < minimum {self.min_level:g} (levels: 1 world .. 16 street)"
        return f"accuracy {value:g} m > maximum {self.max_metres:g} m"


DEFAULT_ACCURACY_RULES: dict[str, AccuracyRule] = {
    "flickr": AccuracyRule(min_level=11),  # city level or better
    DEFAULT_SOURCE: AccuracyRule(max_metres=1000.0),
}


def geotag_reasons(
    catalog: pd.DataFrame,
    province_ids: np.ndarray,
    rules: Mapping[str, AccuracyRule] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(reason, detail) per row ('' when the geotag is fine). ``province_ids`` come from the boundaries locator
    (-1 outside every polygon); the bounding box is checked too, so a locator fallback cannot let a far-away point
    through."""
    rules = dict(DEFAULT_ACCURACY_RULES if rules is None else rules)
    n = len(catalog)
    reason = np.full(n, "", dtype=object)
    detail = np.full(n, "", dtype=object)
    lat = catalog["lat"].to_numpy(dtype=np.float64)
    lon = catalog["lon"].to_numpy(dtype=np.float64)

    def mark(mask: np.ndarray, code: str, text) -> None:
        todo = mask & (reason == "")
        reason[todo] = code
        detail[todo] = [text(k) for k in np.flatnonzero(todo)]

    null = (np.abs(lat) <= NULL_ISLAND_TOLERANCE_DEG) & (np.abs(lon) <= NULL_ISLAND_TOLERANCE_DEG)
    mark(null, reasons.NULL_ISLAND, lambda k: f"lat={lat[k]:.6f} lon={lon[k]:.6f}")
    min_lon, min_lat, max_lon, max_lat = PAKISTAN_BBOX
    in_box = (lat >= min_lat) & (lat <= max_lat) & (lon >= min_lon) & (lon <= max_lon)
    outside = ~in_box | (np.asarray(province_ids) < 0)
    mark(
        outside,
        reasons.OUTSIDE_PAKISTAN,
        lambda k: f"lat={lat[k]:.5f} lon={lon[k]:.5f} ({'outside bbox' if not in_box[k] else 'in no province'})",
    )
    acc = pd.to_numeric(catalog["geo_accuracy"], errors="coerce").to_numpy(dtype=np.float64)
    sources = catalog["source"].astype(str).to_numpy()
    for src in np.unique(sources):
        rule = rules.get(src, rules.get(DEFAULT_SOURCE))
        if rule is None:
            continue
        rows = sources == src
        bad = np.zeros(n, dtype=bool)
        bad[rows] = rule.inaccurate(acc[rows])
        mark(bad, reasons.INACCURATE_GEOTAG, lambda k, r=rule: f"{src}: {r.describe(acc[k])}")
    return reason, detail
