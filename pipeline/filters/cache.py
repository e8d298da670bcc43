"""A Parquet cache of per-image values keyed by ``image_id`` and a ``key`` (what the values depend on).

A run asks for the ids it needs under the current key, computes only the missing ones, and adds them; rows for
other ids or keys stay (a later run over an older catalog reuses them). A cache that cannot be read is started
afresh rather than failing the stage: it only ever costs recomputation. Writes are atomic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from pipeline.core.store import atomic_path


class ImageValueCache:
    def __init__(self, path: str | Path, columns: Mapping[str, str]):
        if list(columns)[:2] != ["image_id", "key"]:
            raise ValueError("cache columns must start with image_id, key")
        self.path = Path(path)
        self.columns = dict(columns)

    def frame(self, rows: Sequence[Mapping] | pd.DataFrame = ()) -> pd.DataFrame:
        """Rows as a typed frame with every cache column (absent values null)."""
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=list(self.columns))
        return df.reindex(columns=list(self.columns)).astype(self.columns)

    def load(self) -> pd.DataFrame:
        if not self.path.exists():
            return self.frame()
        try:
            return self.frame(pd.read_parquet(self.path))
        except Exception:  # unreadable, or written by an older layout: recompute
            return self.frame()

    def lookup(self, image_ids: Sequence[str], key: str) -> tuple[pd.DataFrame, list[str]]:
        """(cached rows for ``image_ids`` under ``key``, ids still to compute in first-seen order)."""
        old = self.load()
        valid = old[(old["key"] == key) & old["image_id"].isin(set(image_ids))].drop_duplicates("image_id", keep="last")
        have = set(valid["image_id"])
        missing = [i for i in dict.fromkeys(image_ids) if i not in have]
        return valid, missing

    def add(self, new: pd.DataFrame) -> None:
        """Merge ``new`` (replacing older rows of the same image_id and key) and write atomically."""
        if new.empty:
            return
        old = self.load()
        stale = old.set_index(["image_id", "key"]).index.isin(new.set_index(["image_id", "key"]).index)
        merged = pd.concat([old[~stale], self.frame(new)], ignore_index=True)
        with atomic_path(self.path) as tmp:
            merged.to_parquet(tmp, index=False, compression="zstd")

    @staticmethod
    def in_order(parts: Sequence[pd.DataFrame], image_ids: Sequence[str]) -> pd.DataFrame:
        """One row per requested id, in request order (duplicates repeated), from cached + new parts."""
        table = pd.concat(parts, ignore_index=True).drop_duplicates("image_id", keep="last").set_index("image_id")
        return table.loc[list(image_ids)].reset_index()
