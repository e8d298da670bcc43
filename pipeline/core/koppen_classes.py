"""The Köppen-Geiger class vocabulary (Beck et al. 2018/2023 ids and their six coarse groups).

It lives in the kernel because the model's heads and the predictor need the vocabulary, not the raster code of
``pipeline.labels.koppen``: ``geopak_model`` depends on ``pipeline.core`` only.
"""

from __future__ import annotations

import numpy as np

# Beck et al. ids 1–30 (and water 0): (code, description).
KOPPEN_CLASSES: tuple[tuple[str, str], ...] = (
    ("Water", "Ocean and inland water"),
    ("Af", "Tropical, rainforest"),
    ("Am", "Tropical, monsoon"),
    ("Aw", "Tropical, savannah"),
    ("BWh", "Arid, desert, hot"),
    ("BWk", "Arid, desert, cold"),
    ("BSh", "Arid, steppe, hot"),
    ("BSk", "Arid, steppe, cold"),
    ("Csa", "Temperate, dry summer, hot summer"),
    ("Csb", "Temperate, dry summer, warm summer"),
    ("Csc", "Temperate, dry summer, cold summer"),
    ("Cwa", "Temperate, dry winter, hot summer"),
    ("Cwb", "Temperate, dry winter, warm summer"),
    ("Cwc", "Temperate, dry winter, cold summer"),
    ("Cfa", "Temperate, no dry season, hot summer"),
    ("Cfb", "Temperate, no dry season, warm summer"),
    ("Cfc", "Temperate, no dry season, cold summer"),
    ("Dsa", "Cold, dry summer, hot summer"),
    ("Dsb", "Cold, dry summer, warm summer"),
    ("Dsc", "Cold, dry summer, cold summer"),
    ("Dsd", "Cold, dry summer, very cold winter"),
    ("Dwa", "Cold, dry winter, hot summer"),
    ("Dwb", "Cold, dry winter, warm summer"),
    ("Dwc", "Cold, dry winter, cold summer"),
    ("Dwd", "Cold, dry winter, very cold winter"),
    ("Dfa", "Cold, no dry season, hot summer"),
    ("Dfb", "Cold, no dry season, warm summer"),
    ("Dfc", "Cold, no dry season, cold summer"),
    ("Dfd", "Cold, no dry season, very cold winter"),
    ("ET", "Polar, tundra"),
    ("EF", "Polar, frost"),
)
NUM_KOPPEN_CLASSES = len(KOPPEN_CLASSES)  # 31: water + 30
KOPPEN_CODES = tuple(c for c, _ in KOPPEN_CLASSES)
CODE_TO_ID = {c: i for i, c in enumerate(KOPPEN_CODES)}
COARSE_GROUPS: tuple[str, ...] = ("Water", "A", "B", "C", "D", "E")
NUM_COARSE_GROUPS = len(COARSE_GROUPS)
# coarse group of each fine id: water 0; A 1–3; B 4–7; C 8–16; D 17–28; E 29–30
FINE_TO_COARSE = np.array([0] + [1] * 3 + [2] * 4 + [3] * 9 + [4] * 12 + [5] * 2, dtype=np.int8)
NODATA = -1  # a point outside the raster


def coarse_group(fine_ids: np.ndarray) -> np.ndarray:
    """Coarse group id (0–5) for fine ids (0–30); NODATA stays NODATA."""
    fine = np.asarray(fine_ids)
    out = np.full(fine.shape, NODATA, dtype=np.int8)
    ok = (fine >= 0) & (fine < NUM_KOPPEN_CLASSES)
    out[ok] = FINE_TO_COARSE[fine[ok]]
    return out
