"""Build the catalog: the union of every source's raw manifest, checked row by row against the image store.

Coordinates and dates come from the source when it reports them (the source is the authority for its own
metadata), otherwise from the image's EXIF. Every row either enters the catalog or leaves with one reason code.

Why it is incremental and streaming (issue 13): a rebuild used to re-read every stored file's bytes in one Python
loop and hold everything in one pandas frame (~53 s per 100k rows, out of memory past ~6 M). Now:

* **Per-manifest state.** Each manifest's rows are *resolved* once (file stat, header facts, source-vs-EXIF merge,
  the reasons that do not depend on other rows or on the clock) into a shard under ``state_dir/manifests``; the
  index (``state_dir/index.json``) holds each manifest's fingerprint (size, mtime_ns, row count). A rebuild
  re-resolves only manifests whose fingerprint changed, drops the rows of removed ones, and for the others only
  re-stats the files: a row whose stored file changed (deleted, truncated, replaced) re-resolves its manifest.
* **Header cache.** Header facts (size, orientation, EXIF GPS and date) are appended to Parquet shards under
  ``state_dir/headers`` keyed by ``image_id`` and the file's (size, mtime_ns): a known file is never read again;
  new files are read in parallel processes (``read_headers``); small shards are merged when a build starts.
* **Arrow in chunks.** The last pass applies the two reasons that depend on the clock or on other rows (future
  date, duplicate bytes: the first row with given bytes wins) with ``now`` and 8 bytes per row of memory, and
  streams catalog and rejections through ``ParquetWriter`` to temp files renamed into place.

The result equals a from-scratch build (same rows, order and rejections): ``tests/test_catalog_incremental.py``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import shutil
import stat as stat_mod
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.core import reasons
from pipeline.core.exif import (
    DEFAULT_UTC_OFFSET,
    DecompressionBomb,
    ImageHeader,
    NotAnImage,
    fast_jpeg_header,
    read_header,
)
from pipeline.core.parallel import map_chunks, map_in_pool
from pipeline.core.processes import exclusive_lock, spawn_pool, stop_pool
from pipeline.core.schema import (
    CATALOG_SCHEMA,
    RAW_MANIFEST_SCHEMA,
    REJECTIONS_SCHEMA,
    UTC_TS,
    SchemaError,
    check_image_ids,
    empty_frame,
    fill_optional,
    is_optional,
    to_table,
)
from pipeline.core.shard_log import ShardLog
from pipeline.core.store import ImageStore, atomic_path, atomic_write_bytes
from pipeline.core.values import is_missing

Progress = Callable[[int, int], None]
STAGE = "catalog"
# bump when the resolution logic or a state file's layout changes: every manifest is then resolved again
ENGINE_VERSION = 2  # 2: capture time never from IFD0 DateTime; offsets from the GPS clock; HEIC/AVIF headers
BATCH_ROWS = 65_536
POOL_MIN_FILES = 2_000  # below this many new files, starting worker processes costs more than it saves
HEADER_SHARD_ROWS = 500_000
HEADER_MAX_SHARDS = 32  # more header shards than this are compacted when a build starts
STAT_POOL_MIN_ROWS = 500_000  # re-stat unchanged manifests' files in parallel from this many rows

# header facts of one stored file, as cached (one row per image_id and file size/mtime)
HEADER_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("mtime_ns", pa.int64(), nullable=False),
        pa.field("error", pa.string()),  # NOT_AN_IMAGE / DECOMPRESSION_BOMB, or null when the header was read
        pa.field("error_detail", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("lat", pa.float64()),
        pa.field("lon", pa.float64()),
        pa.field("accuracy_m", pa.float64()),
        pa.field("taken_at", UTC_TS),
        pa.field("gps_error", pa.string()),
        pa.field("offset_s", pa.int32()),  # the camera's offset of taken_at (tagged or GPS); null: +05:00 assumed
        pa.field("taken_at_source", pa.string()),  # which EXIF tags gave taken_at
        pa.field("date_note", pa.string()),  # why EXIF gives no usable capture time
    ]
)
_HEADER_FACTS = HEADER_SCHEMA.names[3:]
HEADER_PREFIX_BYTES = 1 << 17  # what a header read takes of a stored file first (``_header_facts``)
_NO_FACTS = (None,) * (len(_HEADER_FACTS) - 2)  # everything after (error, error_detail) of an unreadable file

# one resolved manifest row: the raw columns the catalog keeps, then what the file and the merge gave
RESOLVED_SCHEMA = pa.schema(
    [f.with_nullable(True) for f in CATALOG_SCHEMA]
    + [
        pa.field("file_size", pa.int64(), nullable=False),  # -1: no regular file at path
        pa.field("file_mtime_ns", pa.int64(), nullable=False),
        pa.field("reason", pa.string()),  # a rejection that depends on this row alone; null when it passes
        pa.field("detail", pa.string()),
        pa.field("offset_s", pa.int32()),  # the camera's offset when the date is the EXIF one (future-date text)
        pa.field("key64", pa.uint64(), nullable=False),  # hash of image_id: duplicates are found on 8 bytes/row
    ]
)


def _present(v) -> bool:
    return not is_missing(v)


def future_date_detail(taken_utc: dt.datetime | pd.Timestamp, offset: dt.timezone | None) -> str:
    """The date as the camera showed it: local time with its offset, Pakistan time when the photo has none.

    The run's own clock is left out so identical runs write identical rejection files.
    """
    local = pd.Timestamp(taken_utc).tz_convert(offset or DEFAULT_UTC_OFFSET)
    where = "camera local time" if offset is not None else "Pakistan time, no offset recorded"
    return f"taken {local.isoformat(sep=' ')} ({where}) lies in the future"


# ------------------------------------------------------------------------------------------------ file access
def stat_files(root: str, rels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(size, mtime_ns) of each stored file; size -1 where there is no regular file (missing, a folder)."""
    size = np.full(len(rels), -1, dtype=np.int64)
    mtime = np.zeros(len(rels), dtype=np.int64)
    prefix = root.rstrip("/") + "/"
    for i, rel in enumerate(rels):
        try:
            st = os.stat(rel if rel.startswith("/") else prefix + rel)
        except (OSError, ValueError):
            continue
        if stat_mod.S_ISREG(st.st_mode):
            size[i], mtime[i] = st.st_size, st.st_mtime_ns
    return size, mtime


# ------------------------------------------------------------------------------------------------ header facts
def _facts(h: ImageHeader) -> tuple:
    """A read header as facts in HEADER_SCHEMA order (after the key columns)."""
    offset = int(h.utc_offset.utcoffset(None).total_seconds()) if h.utc_offset is not None else None
    return (None, None, h.width, h.height, h.lat, h.lon, h.accuracy_m, h.taken_at, h.gps_error, offset,
            h.taken_at_source, h.date_note)


def fast_jpeg_facts(data: bytes) -> tuple | None:
    """Header facts of a well-formed JPEG read without PIL (``pipeline.core.exif.fast_jpeg_header``), or None."""
    header = fast_jpeg_header(data)
    return None if header is None else _facts(header)


def header_facts(source: bytes | Path, fast: bool = True) -> tuple:
    """One file's header facts in HEADER_SCHEMA order (after the key columns); read errors become facts too.
    ``source``: the file's bytes, or its path (PIL then reads no further into the file than the header)."""
    try:
        return _facts(read_header(source, fast=fast))
    except NotAnImage as exc:
        code = reasons.DECOMPRESSION_BOMB if isinstance(exc, DecompressionBomb) else reasons.NOT_AN_IMAGE
        return (code, str(exc)[:200]) + _NO_FACTS


def _unreadable(exc: OSError) -> tuple:
    return (reasons.NOT_AN_IMAGE, f"{type(exc).__name__}: {exc.strerror or exc}"[:200]) + _NO_FACTS


def _header_facts(path: str) -> tuple:
    """A stored file's header facts from its first ``HEADER_PREFIX_BYTES``: a camera JPEG's markers up to its scan
    fit, and the fast reader needs no more (a whole photo is MBs: reading it all made a first build read ~30x the
    bytes). Where they do not fit, or PIL must read the file (another format, XMP, MPF), PIL opens the path and
    reads what it needs; a file smaller than the prefix is read whole, as before."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(HEADER_PREFIX_BYTES)
    except OSError as exc:  # unreadable although stat saw it (permissions, removed meanwhile)
        return _unreadable(exc)
    if len(data) < HEADER_PREFIX_BYTES:
        return header_facts(data)
    facts = fast_jpeg_facts(data)
    if facts is not None:
        return facts
    try:
        return header_facts(Path(path), fast=False)
    except OSError as exc:
        return _unreadable(exc)


def _read_header_chunk(task: tuple[str, list[str]]) -> list[tuple]:
    root, rels = task
    prefix = root.rstrip("/") + "/"
    return [_header_facts(rel if rel.startswith("/") else prefix + rel) for rel in rels]


def read_headers(root: str, rels: list[str], workers: int, scheduler_address: str | None = None,
                 pool: Executor | None = None) -> list[tuple]:
    """Header facts of many files, in order: on the Dask cluster at ``scheduler_address`` (see
    ``pipeline.core.parallel``), else in ``pool`` (a build keeps one: spawning workers per call costs seconds) or in
    ``workers`` new local processes, when there are enough files to pay for it."""
    if (workers <= 1 and not scheduler_address) or len(rels) < POOL_MIN_FILES:
        return _read_header_chunk((root, rels))
    step = max(200, math.ceil(len(rels) / (max(workers, 1) * 8)))
    chunks = [(root, rels[i : i + step]) for i in range(0, len(rels), step)]
    if pool is not None and not scheduler_address:
        parts = map_in_pool(pool, _read_header_chunk, chunks)
    else:
        parts = map_chunks(_read_header_chunk, chunks, workers=workers, scheduler_address=scheduler_address)
    return [facts for part in parts for facts in part]


def _shard_files_unchanged(task: tuple[str, str]) -> bool:
    """Whether every row of a resolved shard still finds its stored file with the size and mtime it had."""
    root, shard = task
    pf = pq.ParquetFile(shard)
    for batch in pf.iter_batches(batch_size=BATCH_ROWS * 4, columns=["path", "file_size", "file_mtime_ns"]):
        size, mtime = stat_files(root, batch.column(0).to_pylist())
        if not (np.array_equal(size, batch.column(1).to_numpy()) and np.array_equal(mtime, batch.column(2).to_numpy())):
            return False
    return True


# ------------------------------------------------------------------------------------------------ header cache
def header_dir(state_dir: Path) -> Path:
    """Header facts cached by this ENGINE_VERSION: a new engine (say, a fixed header reader) reads every file again
    instead of trusting what the old one cached."""
    return state_dir / "headers" / f"v{ENGINE_VERSION}"


class HeaderCache:
    """Append-only Parquet shards of header facts (``pipeline.core.shard_log``). A manifest's resolution consults the
    shards written before it started (earlier builds, earlier manifests of this build), loading only the rows of its
    ids; ``compact`` merges small shards (a build makes one per resolved manifest) so lookups open few files."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.log = ShardLog(folder, (".parquet",))
        self.existing = [self.log.commit_path(name) for name in self.log.names()]
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def snapshot(self, image_ids: pa.Array) -> pa.Table:
        """Every cached fingerprint of the ids given (e.g. one manifest's), as a table."""
        if not self.existing or not len(image_ids):
            return HEADER_SCHEMA.empty_table()
        dataset = pads.dataset(self.existing, schema=HEADER_SCHEMA)
        return dataset.to_table(filter=pc.field("image_id").isin(pc.unique(image_ids)))

    @staticmethod
    def match(snapshot: pa.Table, image_ids: pa.Array) -> dict[tuple[str, int, int], tuple]:
        """{(image_id, size, mtime_ns): facts} of the snapshot's rows for these ids."""
        if not len(snapshot):
            return {}
        rows = snapshot.filter(pc.is_in(snapshot["image_id"], value_set=pc.unique(image_ids)))
        cols = [rows[n].to_pylist() for n in HEADER_SCHEMA.names]
        return {(r[0], r[1], r[2]): r[3:] for r in zip(*cols)}

    def add(self, table: pa.Table) -> None:
        if len(table):
            self._pending.append(table)
            self._pending_rows += len(table)
        if self._pending_rows >= HEADER_SHARD_ROWS:
            self.flush()

    @staticmethod
    def _writers(table: pa.Table) -> dict:
        return {".parquet": lambda tmp: pq.write_table(table, tmp, compression="zstd")}

    def flush(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        name = self.log.commit(self._writers(table), need_bytes={".parquet": table.nbytes})
        self.existing.append(self.log.commit_path(name))  # the next manifest of this build finds these too
        self._pending, self._pending_rows = [], 0

    def compact(self, max_shards: int = HEADER_MAX_SHARDS) -> int:
        """Merge runs of small shards into shards of up to ``HEADER_SHARD_ROWS`` rows once there are more than
        ``max_shards``, keeping one row per (image_id, size, mtime_ns); returns how many shards went. Only while no
        other build writes (``build_catalog_files`` holds the build lock)."""
        if len(self.existing) <= max_shards:
            return 0

        def merge(members: list[str]) -> dict:
            table = pa.concat_tables(pq.read_table(self.log.commit_path(n), schema=HEADER_SCHEMA) for n in members)
            keys = table.select(["image_id", "size", "mtime_ns"]).to_pandas()
            keep = ~keys.duplicated(keep="last").to_numpy()
            return self._writers(table.filter(pa.array(keep)))

        removed = self.log.compact(lambda n: pq.ParquetFile(self.log.commit_path(n)).metadata.num_rows, merge,
                                   HEADER_SHARD_ROWS)
        self.existing = [self.log.commit_path(name) for name in self.log.names()]
        return removed


# ------------------------------------------------------------------------------------------------ resolving rows
def _key64(image_ids: list[str]) -> np.ndarray:
    return pd.util.hash_array(np.asarray(image_ids, dtype=object), categorize=False).astype(np.uint64)


def _resolve_rows(raw: dict[str, list], size: np.ndarray, mtime: np.ndarray, facts: list[tuple | None]) -> pa.Table:
    """Merge source and header for one batch; the reasons of today's row loop, in its order (missing file, not an
    image, no coordinates, invalid coordinates); the clock and duplicates are judged later."""
    n = len(size)
    out: dict[str, list] = {k: [None] * n for k in ("lat", "lon", "geo_accuracy", "taken_at", "width", "height",
                                                   "reason", "detail", "offset_s", "taken_at_source", "date_note")}
    src_lat, src_lon, src_acc = raw["lat"], raw["lon"], raw["geo_accuracy"]
    for i in range(n):
        if size[i] < 0:
            out["reason"][i], out["detail"][i] = reasons.MISSING_FILE, str(raw["path"][i])
            continue
        error, error_detail, width, height, h_lat, h_lon, h_acc, h_taken, gps_error, h_offset, h_from, h_note = facts[i]
        if error is not None:
            out["reason"][i], out["detail"][i] = error, error_detail
            continue
        lat, lon = src_lat[i], src_lon[i]
        if not (_present(lat) and _present(lon)):
            lat, lon = h_lat, h_lon
        if lat is None or lon is None:
            out["reason"][i] = reasons.NO_COORDINATES
            out["detail"][i] = gps_error or "no GPS in source metadata or EXIF"
            continue
        lat, lon = float(lat), float(lon)
        if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180):
            out["reason"][i], out["detail"][i] = reasons.INVALID_COORDINATES, f"lat={lat} lon={lon}"
            continue
        taken, out["taken_at_source"][i], out["date_note"][i] = _capture_date(raw, i, h_taken, h_from, h_note)
        out["lat"][i], out["lon"][i], out["taken_at"][i] = lat, lon, taken
        out["geo_accuracy"][i] = float(src_acc[i]) if _present(src_acc[i]) else h_acc
        out["width"][i], out["height"][i] = width, height
        if taken is not None and h_taken is not None and pd.Timestamp(h_taken) == pd.Timestamp(taken):
            out["offset_s"][i] = h_offset
    cols = {}
    for f in RESOLVED_SCHEMA:
        if f.name in out:
            cols[f.name] = pa.array(out[f.name], type=f.type)
        elif f.name == "file_size":
            cols[f.name] = pa.array(size, type=pa.int64())
        elif f.name == "file_mtime_ns":
            cols[f.name] = pa.array(mtime, type=pa.int64())
        elif f.name == "key64":
            cols[f.name] = pa.array(_key64(raw["image_id"]), type=pa.uint64())
        else:
            cols[f.name] = pa.array(raw[f.name], type=f.type)
    return pa.table(cols, schema=RESOLVED_SCHEMA)


def _capture_date(raw: dict[str, list], i: int, h_taken, h_from: str | None, h_note: str | None) -> tuple:
    """(taken_at, taken_at_source, date_note) of a resolved row. The source's date wins (its origin named after the
    source when it did not say); a source that says why it has no date (a year-only or unknown Flickr date) is not
    overruled by EXIF, whose date may be the very one the owner corrected; otherwise EXIF's, or why it has none."""
    if _present(raw["taken_at"][i]):
        given = raw["taken_at_source"][i]
        return raw["taken_at"][i], (given if _present(given) else f"{raw['source'][i]}:taken_at"), None
    if _present(raw["date_note"][i]):
        return None, None, raw["date_note"][i]
    return h_taken, h_from, (h_note if h_taken is None else None)


def _raw_batches(manifest: Path) -> Iterator[pa.Table]:
    """A manifest in batches with the raw columns and types; a manifest with wrong columns/types fails loudly."""
    pf = pq.ParquetFile(manifest)
    names = set(pf.schema_arrow.names)
    missing = [f.name for f in RAW_MANIFEST_SCHEMA if f.name not in names and not is_optional(f)]
    if missing:
        raise SchemaError(f"{manifest}: missing columns {missing}")
    present = [n for n in RAW_MANIFEST_SCHEMA.names if n in names]
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=present):
        try:
            table = fill_optional(pa.Table.from_batches([batch]), RAW_MANIFEST_SCHEMA)
            table = table.select(RAW_MANIFEST_SCHEMA.names).cast(RAW_MANIFEST_SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError) as exc:
            raise SchemaError(f"{manifest}: {exc}") from exc
        yield table


@dataclass
class CatalogStats:
    """What a build did: how much it could reuse, and what it wrote."""

    rows: int = 0
    rejected: int = 0
    manifest_rows: int = 0
    manifests: int = 0
    manifests_resolved: int = 0  # new or changed manifests (or ones whose stored files changed)
    manifests_removed: int = 0
    headers_read: int = 0  # files whose header was read in this build
    headers_cached: int = 0  # files whose header came from the cache
    seconds: dict[str, float] = field(default_factory=dict)

    def as_metadata(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "seconds"} | {
            f"seconds_{k}": round(v, 3) for k, v in self.seconds.items()}


class _Builder:
    def __init__(self, store: ImageStore, state_dir: Path, workers: int, progress: Progress | None,
                 scheduler_address: str | None = None):
        self.root = str(store.root)
        self.scheduler_address = scheduler_address
        self._pool: Executor | None = None
        self.state_dir = state_dir
        self.headers = HeaderCache(header_dir(state_dir))
        self.workers = workers
        self.progress = progress
        self.stats = CatalogStats()
        self.index_path = state_dir / "index.json"

    # ---- index of resolved manifests
    def load_index(self) -> dict:
        if self.index_path.exists():
            index = json.loads(self.index_path.read_text())
            if index.get("engine") == ENGINE_VERSION and index.get("root") == self.root:
                return index
        return {"engine": ENGINE_VERSION, "root": self.root, "manifests": {}}

    def save_index(self, index: dict) -> None:
        atomic_write_bytes(self.index_path, json.dumps(index, indent=1, sort_keys=True).encode())

    @staticmethod
    def fingerprint(manifest: Path) -> dict:
        st = manifest.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "rows": pq.ParquetFile(manifest).metadata.num_rows}

    def shard_path(self, key: str) -> Path:
        return self.state_dir / "manifests" / f"{hashlib.sha1(key.encode()).hexdigest()}.parquet"

    def files_unchanged(self, shards: list[Path]) -> list[bool]:
        """Per shard: whether every row's stored file still has the size and mtime it had when it was resolved
        (one stat per row; shards are checked in parallel when there are enough rows)."""
        rows = sum(pq.ParquetFile(s).metadata.num_rows for s in shards)
        tasks = [(self.root, str(s)) for s in shards]
        if rows < STAT_POOL_MIN_ROWS or len(shards) < 2 or (self.workers <= 1 and not self.scheduler_address):
            return [_shard_files_unchanged(t) for t in tasks]
        if self.scheduler_address:
            return map_chunks(_shard_files_unchanged, tasks, workers=self.workers,
                              scheduler_address=self.scheduler_address)
        return map_in_pool(self.pool(), _shard_files_unchanged, tasks)

    def pool(self) -> Executor:
        """One set of worker processes for the whole build, started on first use."""
        if self._pool is None:
            self._pool = spawn_pool(self.workers)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            stop_pool(self._pool, grace_s=30.0)
            self._pool = None

    # ---- resolving one manifest
    def resolve(self, manifest: Path, shard: Path, done: int, total: int) -> int:
        rows = 0
        snapshot = HEADER_SCHEMA.empty_table()
        if self.headers.existing:
            snapshot = self.headers.snapshot(pq.read_table(manifest, columns=["image_id"])["image_id"])
        with atomic_path(shard) as tmp, pq.ParquetWriter(tmp, RESOLVED_SCHEMA, compression="zstd") as writer:
            for table in _raw_batches(manifest):
                writer.write_table(self.resolve_batch(table, snapshot))
                rows += len(table)
                if self.progress:
                    self.progress(done + rows, total)
        return rows

    def resolve_batch(self, table: pa.Table, snapshot: pa.Table) -> pa.Table:
        raw = {n: table[n].to_pylist() for n in RAW_MANIFEST_SCHEMA.names}
        size, mtime = stat_files(self.root, raw["path"])
        known = self.headers.match(snapshot, table["image_id"])
        facts: list[tuple | None] = [None] * len(size)
        to_read: dict[tuple[str, int, int], list[int]] = {}
        for i, (image_id, rel) in enumerate(zip(raw["image_id"], raw["path"])):
            if size[i] < 0:
                continue
            key = (image_id, int(size[i]), int(mtime[i]))
            if key in known:
                facts[i] = known[key]
                self.stats.headers_cached += 1
            else:
                to_read.setdefault(key, []).append(i)
        if to_read:
            keys = list(to_read)
            rels = [raw["path"][to_read[k][0]] for k in keys]
            big = len(rels) >= POOL_MIN_FILES and self.workers > 1 and not self.scheduler_address
            read = read_headers(self.root, rels, self.workers, self.scheduler_address,
                                pool=self.pool() if big else None)
            self.stats.headers_read += len(keys)
            for key, got in zip(keys, read):
                for i in to_read[key]:
                    facts[i] = got
            columns = list(zip(*[k + v for k, v in zip(keys, read)]))
            self.headers.add(pa.table({f.name: pa.array(c, type=f.type) for f, c in zip(HEADER_SCHEMA, columns)},
                                      schema=HEADER_SCHEMA))
        return _resolve_rows(raw, size, mtime, facts)

    # ---- the whole build
    def update_state(self, manifests: Sequence[Path], data_root: Path) -> list[Path]:
        """Bring every manifest's shard up to date; return the shards in manifest order."""
        index = self.load_index()
        entries: dict = index["manifests"]
        keys = [str(m.resolve().relative_to(data_root)) if m.resolve().is_relative_to(data_root) else str(m.resolve())
                for m in manifests]
        for gone in sorted(set(entries) - set(keys)):
            del entries[gone]
            self.save_index(index)  # the index forgets the manifest before its shard goes
            self.shard_path(gone).unlink(missing_ok=True)
            self.stats.manifests_removed += 1
        fingerprints = [self.fingerprint(m) for m in manifests]
        total = sum(f["rows"] for f in fingerprints)
        same = [k in entries and entries[k]["fingerprint"] == fp and self.shard_path(k).exists()
                for k, fp in zip(keys, fingerprints)]
        unchanged = iter(self.files_unchanged([self.shard_path(k) for k, ok in zip(keys, same) if ok]))
        done = 0
        for manifest, key, fp, ok in zip(manifests, keys, fingerprints, same):
            shard = self.shard_path(key)
            if not (ok and next(unchanged)):
                entries.pop(key, None)
                self.resolve(manifest, shard, done, total)
                self.headers.flush()  # the shard's header facts are on disk before the index trusts the shard
                entries[key] = {"fingerprint": fp}
                self.save_index(index)
                self.stats.manifests_resolved += 1
            done += fp["rows"]
            if self.progress:
                self.progress(done, total)
        self.stats.manifests = len(manifests)
        self.stats.manifest_rows = total
        return [self.shard_path(k) for k in keys]


def _ambiguous_keys(shards: Sequence[Path], now_us: int) -> np.ndarray:
    """Hashes of image ids held by more than one row that passes every other check (sorted): only those rows are
    compared by full id, in order, in the final pass."""
    parts = []
    for shard in shards:
        for b in pq.ParquetFile(shard).iter_batches(batch_size=BATCH_ROWS * 4, columns=["reason", "taken_at", "key64"]):
            ok = _passes(b, now_us)
            parts.append(b.column(2).to_numpy()[ok])
    if not parts:
        return np.zeros(0, dtype=np.uint64)
    keys = np.sort(np.concatenate(parts))
    if len(keys) < 2:
        return keys[:0]
    dup = keys[1:] == keys[:-1]
    return np.unique(keys[1:][dup])


def _passes(batch: pa.RecordBatch | pa.Table, now_us: int) -> np.ndarray:
    """Rows with no reason so far and no date in the future."""
    no_reason = batch.column("reason").is_null().to_numpy(zero_copy_only=False)
    taken = batch.column("taken_at").cast(pa.int64()).fill_null(np.iinfo(np.int64).min).to_numpy()
    return no_reason & (taken <= now_us)


def _rejections(table: pa.Table, rejected: np.ndarray, judged: dict[int, tuple[str, str]]) -> pa.Table:
    """The rejected rows of a batch as REJECTIONS_SCHEMA: their resolved reason, or the one this pass judged."""
    rows = table.filter(pa.array(rejected))
    reason, detail = rows["reason"], rows["detail"]
    if judged:
        reason, detail = reason.to_pylist(), detail.to_pylist()
        for j, i in enumerate(np.flatnonzero(rejected)):
            if i in judged:
                reason[j], detail[j] = judged[i]
    n = len(rows)
    return pa.table({
        "stage": pa.array([STAGE] * n, pa.string()),
        "source": rows["source"],
        "source_id": rows["source_id"],
        "image_id": rows["image_id"],
        "path": rows["path"],
        "reason": pa.array(reason, pa.string()) if isinstance(reason, list) else reason,
        "detail": pa.array(detail, pa.string()) if isinstance(detail, list) else detail,
    }, schema=REJECTIONS_SCHEMA)


def _final_pass(shards: Sequence[Path], now: dt.datetime, catalog_path: Path, rejections_path: Path) -> tuple[int, int]:
    """Judge the clock and duplicates, then stream catalog and rejections to their files."""
    now_us = int(pd.Timestamp(now).tz_convert("UTC").value // 1000)
    ambiguous = _ambiguous_keys(shards, now_us)
    kept_by_id: dict[str, str] = {}  # full ids of kept rows whose hash is shared by another row
    n_rows = n_rej = 0
    with atomic_path(catalog_path) as cat_tmp, atomic_path(rejections_path) as rej_tmp, \
            pq.ParquetWriter(cat_tmp, CATALOG_SCHEMA, compression="zstd") as cat_w, \
            pq.ParquetWriter(rej_tmp, REJECTIONS_SCHEMA, compression="zstd") as rej_w:
        for shard in shards:
            for batch in pq.ParquetFile(shard).iter_batches(batch_size=BATCH_ROWS):
                keep = _passes(batch, now_us)
                judged: dict[int, tuple[str, str]] = {}  # row -> (reason, detail) decided in this pass
                no_reason = batch.column("reason").is_null().to_numpy(zero_copy_only=False)
                for i in np.flatnonzero(no_reason & ~keep):
                    taken = batch.column("taken_at")[i].as_py()
                    off = batch.column("offset_s")[i].as_py()
                    tz = dt.timezone(dt.timedelta(seconds=off)) if off is not None else None
                    judged[i] = (reasons.FUTURE_DATE, future_date_detail(taken, tz))
                check = keep & np.isin(batch.column("key64").to_numpy(), ambiguous)
                if check.any():
                    ids, srcs, sids = (batch.column(n).to_pylist() for n in ("image_id", "source", "source_id"))
                    for i in np.flatnonzero(check):
                        if ids[i] in kept_by_id:
                            keep[i] = False
                            judged[i] = (reasons.DUPLICATE_BYTES, f"kept {kept_by_id[ids[i]]}")
                        else:
                            kept_by_id[ids[i]] = f"{srcs[i]}:{sids[i]}"
                table = pa.Table.from_batches([batch])
                kept = table.filter(pa.array(keep)).select(CATALOG_SCHEMA.names).cast(CATALOG_SCHEMA)
                if len(kept):
                    check_image_ids(kept["image_id"], "catalog")
                    cat_w.write_table(kept)
                    n_rows += len(kept)
                if not keep.all():
                    out = _rejections(table, ~keep, judged)
                    check_image_ids(out["image_id"], "catalog rejections")
                    rej_w.write_table(out)
                    n_rej += len(out)
    return n_rows, n_rej


def build_catalog_files(
    manifests: Sequence[Path],
    store: ImageStore,
    catalog_path: Path,
    rejections_path: Path,
    state_dir: Path,
    now: dt.datetime | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    scheduler_address: str | None = None,
) -> CatalogStats:
    """Write the catalog and its rejections from manifest files, reusing ``state_dir`` from the last build.

    Sources are taken in the order given; the first row with given bytes wins. New files' headers are read in
    ``workers`` local processes, or on the Dask scheduler at ``scheduler_address`` (workers see the same root)."""
    import time

    now = now or dt.datetime.now(dt.timezone.utc)
    state_dir = Path(state_dir)
    for folder in (state_dir / "manifests", header_dir(state_dir)):
        folder.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(state_dir / "build.lock", "a catalog build on this data root"):
        for old in (state_dir / "headers").iterdir():  # what an earlier engine cached is never read again
            if old.is_dir() and old != header_dir(state_dir):
                shutil.rmtree(old)
            elif old.is_file():
                old.unlink()
        builder = _Builder(store, state_dir, workers or os.cpu_count() or 1, progress, scheduler_address)
        t0 = time.perf_counter()
        builder.headers.compact()
        try:
            shards = builder.update_state([Path(m) for m in manifests], Path(store.root).resolve())
        finally:
            builder.close()
        t1 = time.perf_counter()
        builder.stats.rows, builder.stats.rejected = _final_pass(shards, now, Path(catalog_path), Path(rejections_path))
        builder.stats.seconds = {"resolve": t1 - t0, "write": time.perf_counter() - t1}
    return builder.stats


def build_catalog(
    manifests: Iterable[pd.DataFrame],
    store: ImageStore,
    now: dt.datetime | None = None,
    progress: Progress | None = None,
    workers: int | None = 1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (catalog, rejections) for in-memory manifests (tests, benches, small worlds): the same engine as
    ``build_catalog_files``, with throw-away state."""
    with tempfile.TemporaryDirectory(prefix="geopak-catalog-") as tmp:
        folder = Path(tmp)
        paths = []
        for i, m in enumerate(manifests):
            if len(m):
                table = to_table(m, RAW_MANIFEST_SCHEMA, check_values=False)  # wrong columns/types fail loudly
                paths.append(folder / f"{i:06d}.parquet")
                pq.write_table(table, paths[-1])
        cat, rej = folder / "catalog.parquet", folder / "rejections.parquet"
        build_catalog_files(paths, store, cat, rej, folder / "state", now=now, progress=progress, workers=workers)
        catalog = pq.read_table(cat).to_pandas() if paths else empty_frame(CATALOG_SCHEMA)
        rejections = pq.read_table(rej).to_pandas() if paths else empty_frame(REJECTIONS_SCHEMA)
    return catalog, rejections
