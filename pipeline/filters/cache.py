"""A cache of per-image values keyed by ``image_id`` and a ``key`` (what the values depend on), kept as a folder of
Parquet shards so that work is committed as it is done and a killed run loses at most its last chunk.

- Growth appends: ``add`` writes one new shard (temp file + rename, so a shard is whole or absent) and never
  rewrites what exists; memory for a write is O(that chunk), not O(cache).
- Lookups read only what they need: the ``image_id`` and ``key`` columns of each shard, then the other columns of
  the matching rows only, one shard at a time (memory O(largest shard + hits)).
- Later shards win: shards are ordered by their sequence number, and a row for the same (image_id, key) in a later
  shard replaces an earlier one (a re-measured file).
- Compaction, when there are many small shards, merges consecutive small ones into one (``pipeline.core.shard_log``,
  the shard mechanism every cache shares: written atomically before the merged ones are removed; a kill in between
  leaves duplicate rows with equal values, which lookups resolve). Correctness never depends on it.
- A shard that cannot be read (disk damage, an older layout) is set aside under a hidden name and its rows are
  recomputed: a cache only ever costs recomputation, never a failed stage. A cache written by the older one-file
  layout at the same path becomes the first shard.

``commit_in_chunks`` drives a computation in chunks of at most ``max_rows`` rows or about ``max_seconds`` of work,
committing each chunk as a shard before the next starts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.shard_log import ShardLog

T = TypeVar("T")
SHARD_PREFIX, SHARD_SUFFIX = "part-", ".parquet"
LEGACY_SUFFIX = ".legacy"  # a one-file cache being moved into its folder


class ImageValueCache:
    def __init__(self, path: str | Path, columns: Mapping[str, str], max_shards: int = 64,
                 compact_rows: int = 200_000):
        if list(columns)[:2] != ["image_id", "key"]:
            raise ValueError("cache columns must start with image_id, key")
        self.path = Path(path)  # a folder of shards (pd.read_parquet reads it whole)
        self.columns = dict(columns)
        self.max_shards = max_shards
        self.compact_rows = compact_rows
        self.log = ShardLog(self.path, (SHARD_SUFFIX,), prefix=SHARD_PREFIX)

    def frame(self, rows: Sequence[Mapping] | pd.DataFrame = ()) -> pd.DataFrame:
        """Rows as a typed frame with every cache column (absent values null)."""
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=list(self.columns))
        return df.reindex(columns=list(self.columns)).astype(self.columns)

    # ------------------------------------------------------------------------------------------------ layout
    def _migrate(self) -> None:
        """Move a one-file cache (the older layout) into the folder as its first shard; each step is a rename, so
        a kill between them is finished by the next call."""
        legacy = self.path.with_name(self.path.name + LEGACY_SUFFIX)
        if self.path.is_file():
            os.replace(self.path, legacy)
        if legacy.is_file():
            self.path.mkdir(parents=True, exist_ok=True)
            os.replace(legacy, self.path / f"part-{0:012d}-legacy.parquet")

    def shards(self) -> list[Path]:
        """Committed shards, oldest first (listed afresh: another process may have added some)."""
        self._migrate()
        return [self.log.commit_path(name) for name in self.log.names(refresh=True)]

    def _set_aside(self, shard: Path) -> None:
        """A shard that cannot be read: hidden (readers skip dot-files), so its rows are recomputed once."""
        try:
            os.replace(shard, shard.with_name(f".unreadable-{shard.name}"))
        except OSError:
            pass

    def _open(self, shard: Path) -> pq.ParquetFile | None:
        try:
            pf = pq.ParquetFile(shard)
            if not {"image_id", "key"} <= set(pf.schema_arrow.names):
                raise ValueError("no image_id/key columns")
            return pf
        except Exception:  # noqa: BLE001 - unreadable or foreign: recompute its rows
            self._set_aside(shard)
            return None

    # ------------------------------------------------------------------------------------------------ reads
    def load(self) -> pd.DataFrame:
        """Every row (later shards win). For small caches and tests; lookups never load the whole cache."""
        parts = []
        for shard in self.shards():
            pf = self._open(shard)
            if pf is not None:
                parts.append(self.frame(pf.read(columns=self._present(pf)).to_pandas()))
        if not parts:
            return self.frame()
        return pd.concat(parts, ignore_index=True).drop_duplicates(["image_id", "key"], keep="last") \
            .reset_index(drop=True)

    def _present(self, pf: pq.ParquetFile, columns: Sequence[str] | None = None) -> list[str]:
        names = set(pf.schema_arrow.names)
        return [c for c in (columns or self.columns) if c in names]

    def lookup(self, image_ids: Sequence[str], key: str,
               columns: Sequence[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
        """(cached rows for ``image_ids`` under ``key``, ids still to compute in first-seen order).

        ``columns`` limits what is read besides image_id and key (default: every cache column)."""
        wanted_ids = list(dict.fromkeys(image_ids))
        wanted = pd.Index(wanted_ids, dtype=object)  # one hash table, probed by every shard
        rest = [c for c in (columns or self.columns) if c not in ("image_id", "key")]
        parts = []
        for shard in self.shards() if wanted_ids else []:
            pf = self._open(shard)
            if pf is None:
                continue
            try:
                idk = pf.read(columns=["image_id", "key"])
                ids = idk.column("image_id").to_numpy(zero_copy_only=False)
                hit = (wanted.get_indexer(ids) >= 0) & (idk.column("key").to_numpy(zero_copy_only=False) == key)
                if not hit.any():
                    continue
                mask = pa.array(hit)
                part = idk.filter(mask).to_pandas()
                cols = self._present(pf, rest)
                if cols:
                    part = pd.concat([part, pf.read(columns=cols).filter(mask).to_pandas()], axis=1)
            except Exception:  # noqa: BLE001 - a damaged shard: set aside, its rows are recomputed
                self._set_aside(shard)
                continue
            parts.append(part)
        cols = ["image_id", "key", *rest]
        valid = (pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols))
        valid = self.frame(valid.drop_duplicates("image_id", keep="last").reset_index(drop=True))[cols]
        have = set(valid["image_id"])
        return valid, [i for i in wanted_ids if i not in have]

    # ------------------------------------------------------------------------------------------------ writes
    def _writers(self, rows: pd.DataFrame) -> dict:
        return {SHARD_SUFFIX: lambda tmp: self.frame(rows).to_parquet(tmp, index=False, compression="zstd")}

    def add(self, new: pd.DataFrame) -> Path | None:
        """Append ``new`` as one shard (atomic); rows here replace older rows of the same image_id and key."""
        if new.empty:
            return None
        count = len(self.shards())
        target = self.log.commit_path(self.log.commit(self._writers(new)))
        if count + 1 > self.max_shards:
            self.compact()
        return target

    def compact(self) -> int:
        """Merge runs of consecutive small shards (each under a quarter of ``compact_rows``) into shards of up to
        ``compact_rows`` rows. Returns the number of shards removed. Memory O(compact_rows)."""
        self._migrate()

        def rows(name: str) -> int | None:
            pf = self._open(self.log.commit_path(name))
            return None if pf is None else pf.metadata.num_rows

        def merge(members: list[str]) -> dict:
            paths = [self.log.commit_path(name) for name in members]
            merged = pd.concat([self.frame(pd.read_parquet(p, columns=self._present(pq.ParquetFile(p))))
                                for p in paths], ignore_index=True)
            return self._writers(merged.drop_duplicates(["image_id", "key"], keep="last"))

        return self.log.compact(rows, merge, self.compact_rows, later_wins=True)

    @staticmethod
    def in_order(parts: Sequence[pd.DataFrame], image_ids: Sequence[str]) -> pd.DataFrame:
        """One row per requested id, in request order (duplicates repeated), from cached + new parts."""
        table = pd.concat(parts, ignore_index=True).drop_duplicates("image_id", keep="last").set_index("image_id")
        return table.loc[list(image_ids)].reset_index()


def commit_in_chunks(
    cache: ImageValueCache,
    todo: Sequence[T],
    compute: Callable[[Sequence[T], int], pd.DataFrame],
    max_rows: int = 2000,
    max_seconds: float = 60.0,
    first_rows: int = 256,
) -> list[pd.DataFrame]:
    """Run ``compute(chunk, offset)`` over ``todo`` in chunks and add each result to ``cache`` before the next.

    A chunk holds at most ``max_rows`` items and, after the first (``first_rows``, which measures the rate), about
    ``max_seconds`` of work at the rate seen so far, so a kill loses at most one chunk of work. Returns the frames
    computed, in order."""
    parts: list[pd.DataFrame] = []
    done = 0
    size = max(1, min(max_rows, first_rows))
    while done < len(todo):
        chunk = todo[done : done + size]
        t0 = time.monotonic()
        part = compute(chunk, done)
        cache.add(part)
        parts.append(part)
        done += len(chunk)
        rate = len(chunk) / max(time.monotonic() - t0, 1e-6)
        size = max(1, min(max_rows, int(rate * max_seconds)))
    return parts
