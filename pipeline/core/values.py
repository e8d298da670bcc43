"""What counts as a missing value, in one place: every stage reads rows that come from pandas, Parquet, CSV
manifests and APIs, where "no value" is spelled None, NaN, pd.NA, NaT or (in text fields) a blank string.

No pandas import: render and metrics workers use it too and stay light.
"""

from __future__ import annotations

from typing import Any


def is_missing(value: Any, blank_text: bool = False) -> bool:
    """None, NaN (Python or NumPy, any width), pd.NA, NaT (pandas or NumPy); with ``blank_text`` also an empty
    or whitespace-only string."""
    if value is None:
        return True
    if isinstance(value, str):
        return blank_text and not value.strip()
    if type(value).__name__ in ("NAType", "NaTType"):
        return True
    try:
        return bool(value != value)  # NaN and NumPy's NaT are the only scalars unequal to themselves
    except (TypeError, ValueError):  # containers and objects without a plain comparison are values
        return False
