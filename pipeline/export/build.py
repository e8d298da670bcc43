"""Build the image shards (``pipeline.core.shards`` layout) from the labelled catalog and the splits.

Every train/val/test image is read once, checked against its image id, and stored as a copy whose short side is at
most ``short_side`` (320 by default: the 224 px crop at ``crop_scale`` 0.7 needs 283): a JPEG already that small
and upright is stored byte for byte (no generation loss, so its features do not move at all); anything larger, or
another format, is decoded once (JPEG DCT scaling to the smallest scale that still covers ``short_side``), turned
upright, resized with Lanczos and saved as a JPEG of ``quality`` (``pipeline.core.copies``). The filter makes that
same copy from its own decode of every image it keeps (``<data root>/copies``): a valid cached copy is used as it
is, and only images without one (filtered before copies were made, or whose copy fails its checks) are decoded here.

Resumable per shard. The plan is append-friendly: a full shard whose images are all still in its split keeps
its place, new images go into the holes and then new shards, so adding data rewrites only the last partial shard
and the new ones. A planned shard whose fingerprint (its ids, their records, the copy settings) matches its
committed ``_stats.json`` is not touched; a rewritten shard takes the copies it already held from its previous
version (each checked against its recorded sha256) and decodes only new images. The manifest is removed while a
build runs and written last, so readers never see a half-rewritten set.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from pipeline.core import reasons
from pipeline.core.paths import DataPaths
from pipeline.core.shards import (
    FORMAT_VERSION,
    MANIFEST,
    REJECTIONS,
    SHARDS_DIR,
    SPLITS,
    Sample,
    ShardInfo,
    read_stats,
    shard_name,
    stats_path,
    write_manifest,
    write_shard,
)
from pipeline.core.store import atomic_path, atomic_write_bytes, sha256_hex, sweep_orphan_temps
from pipeline.export.records import INDEX_SCHEMA, sample_records
from pipeline.core.copies import COPIES_DIR, Copy, CopyCache, CopySpec, copy_from_rgb, kept_as_is
from pipeline.core.decode import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, DecodeError, decode_rgb, open_image

Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], list]


@dataclass(frozen=True)
class ShardConfig:
    """How the copies are made and packed (``image_shards``' Launchpad settings)."""

    short_side: int = field(default=320, metadata={
        "doc": "short side of the stored copy in px, aspect kept (images already smaller are kept as they are); "
               "the 224 px training crop at crop_scale 0.7 needs 283", "ge": 32, "le": 4096})
    quality: int = field(default=90, metadata={"doc": "JPEG quality of resized copies", "ge": 50, "le": 100})
    shard_size: int = field(default=1000, metadata={
        "doc": "samples per tar shard (img2dataset writes 10,000; 1,000 copies of ~30 KB make ~30 MB shards)",
        "ge": 1})

    @property
    def spec(self) -> CopySpec:
        return CopySpec(self.short_side, self.quality)

    @property
    def preprocess(self) -> str:
        """What the copies are: features computed from them depend on it (the embedding cache records it)."""
        return self.spec.preprocess


# --- one image -----------------------------------------------------------------------------------------------
def shard_copy(data: bytes, short_side: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Copy:
    """The stored copy of one image's bytes; ``DecodeError`` (with a reason code) when they cannot be used."""
    opened = open_image(data, max_pixels, frozenset(DEFAULT_FORMATS))
    if kept_as_is(opened, short_side):
        opened.image.close()
        return Copy(data, opened.width, opened.height, False)
    rgb, _ = decode_rgb(opened, short_side, max_pixels)  # DCT scaling: the largest 1/N keeping both sides >= it
    return copy_from_rgb(rgb, CopySpec(short_side, quality))


def read_checked(path: Path, image_id: str) -> bytes:
    """The file's bytes, checked against the image id (``DecodeError`` with ``missing_file``/``bytes_changed``)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise DecodeError(reasons.MISSING_FILE, str(path)) from exc
    except OSError as exc:
        raise DecodeError(reasons.UNDECODABLE, f"cannot read {path}: {exc}"[:200]) from exc
    got = sha256_hex(data)
    if got != image_id:
        raise DecodeError(reasons.BYTES_CHANGED, f"sha256 of {path} is {got[:16]}…, its image_id {image_id[:16]}…")
    return data


# --- one shard (runs in a worker process) ----------------------------------------------------------------------
@dataclass(frozen=True)
class ShardJob:
    data_root: str
    split: str
    name: str
    fingerprint: str
    rows: tuple[tuple[str, str, dict], ...]  # (image_id, path relative to the data root, record)
    short_side: int
    quality: int
    preprocess: str


@dataclass(frozen=True)
class ShardResult:
    info: ShardInfo
    # copied (bytes as they were), resized (decoded again here), from_filter (the copy the filter's decode made),
    # invalid_cached (a cached copy failed its checks and was made again), reused (from the shard's previous version)
    counts: dict[str, int]


COUNTS = ("copied", "resized", "from_filter", "invalid_cached", "reused")


def _make_copy(root: Path, cache: CopyCache, image_id: str, rel: str, short_side: int, quality: int,
               counts: dict[str, int]) -> Copy:
    """The cached copy the filter made when it is valid, else one made from the original (an invalid cached one
    is counted and never used)."""
    cached, invalid = cache.get(image_id)
    if cached is not None:
        counts["from_filter"] += 1
        return cached
    copy = shard_copy(read_checked(root / rel, image_id), short_side, quality)
    counts["resized" if copy.resized else "copied"] += 1
    if invalid is not None:
        counts["invalid_cached"] += 1
    return copy


def _previous_copies(folder: Path, name: str, preprocess: str) -> dict[str, tuple[bytes, dict]]:
    """image_id -> (bytes, copy fields) of the copies the shard's committed version holds, each checked against
    its index sha256 (the old tar is not trusted as a whole: it is about to be replaced)."""
    old = read_stats(stats_path(folder, name))
    tar, index = folder / f"{name}.tar", folder / f"{name}.parquet"
    if old is None or old.preprocess != preprocess or not tar.exists() or not index.exists():
        return {}
    rows = pq.read_table(index, columns=["image_id", "offset", "size", "sha256", "width", "height", "resized"]
                         ).to_pylist()
    out = {}
    with open(tar, "rb") as fh:
        for r in rows:
            fh.seek(r["offset"])
            data = fh.read(r["size"])
            if sha256_hex(data) == r["sha256"]:
                out[r["image_id"]] = (data, {k: r[k] for k in ("width", "height", "resized")})
    return out


def write_shard_job(job: ShardJob) -> ShardResult:
    """Copy every image of one planned shard and commit it (module level: it runs in spawned workers)."""
    root = Path(job.data_root)
    folder = root / SHARDS_DIR / job.split
    reuse = _previous_copies(folder, job.name, job.preprocess)
    cache = CopyCache(root / COPIES_DIR, CopySpec(job.short_side, job.quality))
    samples, rejected = [], []
    counts = dict.fromkeys(COUNTS, 0)
    for image_id, rel, record in job.rows:
        if image_id in reuse:
            jpg, fields = reuse[image_id]
            counts["reused"] += 1
        else:
            try:
                copy = _make_copy(root, cache, image_id, rel, job.short_side, job.quality, counts)
            except DecodeError as exc:
                rejected.append({"image_id": image_id, "path": rel, "reason": exc.reason, "detail": exc.detail})
                continue
            jpg, fields = copy.jpg, {"width": copy.width, "height": copy.height, "resized": copy.resized}
        samples.append(Sample(image_id, jpg, {**record, **fields}))
    info = write_shard(folder, job.name, job.split, samples, job.fingerprint, rejected, job.preprocess, INDEX_SCHEMA)
    # the copy cache is a hand-off from the filter: once the shard is committed it holds these copies (a rewrite
    # of it takes them from there), so the cached ones, used or refused, would only double the disk
    cache.drop([image_id for image_id, _, _ in job.rows if image_id not in reuse])
    return ShardResult(info, counts)


# --- the plan --------------------------------------------------------------------------------------------------
def plan_shards(ids: Sequence[str], previous: Sequence[Sequence[str]], shard_size: int) -> list[list[str]]:
    """Members of each shard of one split, in shard order: a previous shard (its planned ids, in order) stays
    as it was when it is full and all its ids are still here; new ids (sorted) fill the other places in order,
    then new shards. A fresh build is ``ids`` sorted and cut into ``shard_size`` pieces."""
    remaining = set(ids)
    slots: list[list[str] | None] = []
    for members in previous:
        if len(members) == shard_size and set(members) <= remaining:
            slots.append(list(members))
            remaining -= set(members)
        else:
            slots.append(None)
    pool = sorted(remaining)
    out: list[list[str]] = []
    for members in slots:
        if members is not None:
            out.append(members)
        elif pool:
            out.append(pool[:shard_size])
            pool = pool[shard_size:]
    out += [pool[i: i + shard_size] for i in range(0, len(pool), shard_size)]
    return out


def fingerprint(split: str, rows: Sequence[tuple[str, str, dict]], preprocess: str) -> str:
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, preprocess, split]).encode())
    for image_id, _, record in rows:
        h.update(json.dumps([image_id, record], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _committed(folder: Path) -> list[tuple[ShardInfo, list[str]]]:
    """Committed shards of a split folder (numbered from 0 without a gap), with their planned ids in order."""
    out = []
    for n in range(10**5):
        info = read_stats(stats_path(folder, shard_name(n)))
        index = folder / f"{shard_name(n)}.parquet"
        if info is None or not index.exists():
            break
        ids = pq.read_table(index, columns=["image_id"]).column("image_id").to_pylist() if info.samples else []
        out.append((info, ids + [r["image_id"] for r in info.rejected]))
    return out


def _remove_from(folder: Path, first: int) -> int:
    """Delete the files of shards numbered ``first`` and above (the split has fewer shards now)."""
    removed = 0
    for p in sorted(folder.glob("[0-9][0-9][0-9][0-9][0-9]*")):
        if int(p.name[:5]) >= first:
            p.unlink(missing_ok=True)
            removed += p.suffix == ".tar"
    return removed


@dataclass
class ShardBuild:
    """What a build did: the committed shards, the work done and what could not be copied."""

    root: Path
    shards: list[ShardInfo]
    records: pd.DataFrame  # the exported samples (image_id, path, split, width, height, record)
    written: int = 0
    kept: int = 0
    removed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    rejections: pd.DataFrame = field(default_factory=pd.DataFrame)
    seconds: float = 0.0


def _local(fn: Callable[[Any], Any], jobs: Sequence[Any]) -> list:
    return [fn(j) for j in jobs]


def decode_work(records: pd.DataFrame, cfg: ShardConfig, data_root: Path | None = None) -> int:
    """How many images will need a decode (larger than the copy, or not a JPEG, and with no copy in the cache
    under ``data_root`` when given): decides whether a build is worth worker processes."""
    big = records[["width", "height"]].min(axis=1) > cfg.short_side
    not_jpeg = ~records["path"].str.lower().str.endswith((".jpg", ".jpeg"))
    need = big | not_jpeg
    if data_root is not None and need.any():
        cache = CopyCache(data_root / COPIES_DIR, cfg.spec)
        need &= ~records["image_id"].map(cache.has).astype(bool)
    return int(need.sum())


def build_shards(paths: DataPaths, cfg: ShardConfig, mapper: Mapper | None = None,
                 documents: Callable[[ShardBuild, ShardConfig], dict[str, str]] | None = None) -> ShardBuild:
    """Write (or bring up to date) ``<data root>/shards``; ``mapper(fn, jobs)`` runs the shard jobs (default: in
    this process). ``documents(build, cfg)`` gives {file name: text} written beside the manifest (the datasheet
    and the dataset card, ``pipeline.export.datasheet.documents``)."""
    t0 = time.perf_counter()
    root = paths.root / SHARDS_DIR
    for p in (paths.labelled, paths.splits):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: materialize labelled_catalog and dataset_splits first")
    records = sample_records(pd.read_parquet(paths.labelled), pd.read_parquet(paths.splits))
    root.mkdir(parents=True, exist_ok=True)
    sweep_orphan_temps(root)
    jobs: list[ShardJob] = []
    kept: list[ShardInfo] = []
    removed = 0
    for split in SPLITS:
        folder = root / split
        part = records[records["split"] == split]
        previous = _committed(folder)
        plan = plan_shards(part["image_id"].tolist(), [ids for _, ids in previous], cfg.shard_size)
        by_id = dict(zip(part["image_id"], zip(part["path"], part["record"])))
        for n, ids in enumerate(plan):
            rows = tuple((i, by_id[i][0], by_id[i][1]) for i in ids)
            fp = fingerprint(split, rows, cfg.preprocess)
            old = previous[n][0] if n < len(previous) else None
            tar = folder / f"{shard_name(n)}.tar"
            if old is not None and old.fingerprint == fp and tar.exists() and tar.stat().st_size == old.bytes:
                kept.append(old)
            else:
                jobs.append(ShardJob(str(paths.root), split, shard_name(n), fp, rows, cfg.short_side, cfg.quality,
                                     cfg.preprocess))
        removed += _remove_from(folder, len(plan)) if folder.exists() else 0
    if jobs or removed:
        (root / MANIFEST).unlink(missing_ok=True)  # readers see "incomplete", never a half-rewritten set
    results: list[ShardResult] = (mapper or _local)(write_shard_job, jobs)
    order = {s: i for i, s in enumerate(SPLITS)}
    shards = sorted(kept + [r.info for r in results], key=lambda i: (order[i.split], i.shard))
    counts = {k: sum(r.counts.get(k, 0) for r in results) for k in COUNTS}
    rejected = pd.DataFrame([{"split": s.split, "shard": s.shard, **r} for s in shards for r in s.rejected],
                            columns=["split", "shard", "image_id", "path", "reason", "detail"])
    with atomic_path(root / REJECTIONS) as tmp:
        rejected.to_parquet(tmp)
    build = ShardBuild(root, shards, records, len(results), len(kept), removed, counts, rejected)
    for name, text in (documents(build, cfg) if documents is not None else {}).items():
        atomic_write_bytes(root / name, text.encode())
    settings = {"preprocess": cfg.preprocess, "config": asdict(cfg),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_manifest(root, shards, settings)
    build.seconds = time.perf_counter() - t0
    return build
