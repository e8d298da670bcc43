"""Frozen-encoder embedding cache: features computed once per (image_id, encoder weights id), grown by shards.

Layout under ``<cache_root>/<weights_id>/``::

    meta.json                       weights id, dims, dtype, precision, encoder (written when the folder is made)
    shards/<s>.clip.npy             float16 (rows, clip_dim), memory-mapped on read
    shards/<s>.scene.npy            float16 (rows, scene_dim)
    shards/<s>.index.parquet        image_id, row (within the shard): written LAST, so it commits the shard
                                    (<s> = <sequence>-<writer pid>-<random>: writers never share a name)
    rejections.parquet              images that could not be read (image_id, path, reason)

The shards are a ``pipeline.core.shard_log.ShardLog`` (the mechanism every shard cache shares) whose commit file
is the index: the listing of ``shards/*.index.parquet`` is the source of truth, a shard exists once its index has
been renamed into place (every file is written to a temp name and renamed), so a reader never sees half a
shard, and a writer killed at any instant leaves at most feature files without an index, which the next append
removes (once their writer's pid is gone). ``compact`` merges small shards (the first copy of an id still wins).
Adding rows writes one new shard and touches nothing that exists: the cost and the
memory of an append are O(rows added), not O(cache) (the old layout rewrote every row on every append: 8.9 s and
2.98 GB to add 1k rows to 200k). ``build_embedding_cache`` commits a shard every ``chunk_images`` images or
``chunk_seconds`` of work, so a killed build resumes losing at most one chunk.

A different encoder (other weights, architecture, resolution, CLIP activation, preprocessing, or the autocast
precision the features are computed in) has another weights id, hence another folder: nothing computed with old
settings is ever reused; ``prune_other_caches`` deletes those folders. ``meta.json`` records the ``precision``
and the ``image_source`` (original files, or the image shards' copies with their settings): a cache whose images
came from another source is emptied and computed again, since its features describe other pixels.
A cache written by the previous layout (``clip-<gen>.npy``, ``index-<gen>.parquet`` named by ``meta.json``'s
``generation``) is read as one more shard, never rewritten.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from geopak_model.data import ImageDataset, image_source, make_loader
from geopak_model.encoders import DualEncoder
from geopak_model.precision import amp_dtype as resolve_amp_dtype
from geopak_model.precision import autocast, dtype_name
from pipeline.core.shard_log import ShardLog
from pipeline.core.store import atomic_path, atomic_write_bytes

META = "meta.json"
SHARDS = "shards"
REJECTIONS = "rejections.parquet"
INDEX_SUFFIX = ".index.parquet"
SHARD_SUFFIXES = (".clip.npy", ".scene.npy", INDEX_SUFFIX)  # the index last: it commits the shard
COMPACT_ROWS = 200_000  # ``compact`` merges shards under a quarter of this into shards of up to this many rows
MAX_SHARDS = 64  # a build that leaves more shards than this compacts them (each lookup opens every shard's index)
# issue 13.3: a build commits its progress at least this often (a kill loses at most one chunk)
CHUNK_IMAGES = 2000
CHUNK_SECONDS = 60.0


class EmbeddingCache:
    """Read and append the shards of one weights id's cache (see the module docstring for the layout)."""

    def __init__(self, root: str | Path, weights_id: str):
        self.dir = Path(root) / weights_id
        self.weights_id = weights_id
        self._meta = self._read_meta()
        self._index: pd.DataFrame | None = None  # image_id (index) -> shard, row
        self._names: list[str] = []  # the shards ``_index`` was read from (its ``shard`` numbers index this)
        self.log = ShardLog(self.dir / SHARDS, SHARD_SUFFIXES, digits=6, first_seq=0)

    def _read_meta(self) -> dict:
        p = self.dir / META
        return json.loads(p.read_text()) if p.exists() else {}

    @property
    def image_source(self) -> str | None:
        """Where the features' images were read from: "files", or "shards:<copy settings>" (None: empty cache;
        caches written before the shards existed read files)."""
        return self._meta.get("image_source", "files") if self._meta else None

    @property
    def precision(self) -> str | None:
        """"fp32", "bf16" or "fp16": what the features were computed in (None: empty, or an old cache)."""
        return self._meta.get("precision")

    # --- shards -------------------------------------------------------------------------------------------------
    def _shard_files(self, name: str) -> tuple[Path, Path, Path]:
        """(clip, scene, index) of shard ``name``; ``legacy-<gen>`` is the previous layout's single generation."""
        if name.startswith("legacy-"):
            gen = name.removeprefix("legacy-")
            return (self.dir / f"clip-{gen}.npy", self.dir / f"scene-{gen}.npy", self.dir / f"index-{gen}.parquet")
        clip, scene, index = self.log.files(name)  # SHARD_SUFFIXES' order
        return clip, scene, index

    def shard_names(self, refresh: bool = False) -> list[str]:
        """Committed shards, oldest first (a shard is committed once its index file exists); the folder is listed
        once per instance, or again with ``refresh``."""
        names = self.log.names(refresh)
        gen = int(self._meta.get("generation", 0) or 0)
        if gen and (self.dir / f"index-{gen}.parquet").exists():
            names.insert(0, f"legacy-{gen}")
        return names

    @property
    def generation(self) -> int:
        """How many shards are committed (each append adds one)."""
        return len(self.shard_names())

    @property
    def index(self) -> pd.DataFrame:
        """image_id (index) → ``shard`` (position in ``shard_names()`` when read) and ``row`` within it; the first
        copy of an id wins."""
        if self._index is None:
            self._names = self.shard_names(refresh=True)  # the one listing of this lookup
            tables = [pq.read_table(self._shard_files(name)[2], columns=["image_id", "row"])
                      for name in self._names]
            shard = np.repeat(np.arange(len(tables), dtype=np.int32), [t.num_rows for t in tables])
            ids = pa.concat_arrays([c for t in tables for c in t.column("image_id").chunks]) if tables else []
            rows = np.concatenate([t.column("row").to_numpy() for t in tables]) if tables else np.empty(0, np.int64)
            idx = pd.DataFrame({"shard": shard, "row": rows.astype(np.int64)},
                               index=pd.Index(ids.to_pandas() if tables else [], dtype=object))
            self._index = idx[~idx.index.duplicated(keep="first")]
        return self._index

    def __len__(self) -> int:
        return len(self.index)

    def missing(self, image_ids: list[str] | pd.Series) -> list[str]:
        ids = pd.Index(pd.unique(pd.Series(image_ids, dtype=object)))
        return ids[self.index.index.get_indexer(ids) < 0].tolist()  # the index's cached hash table

    def _locate(self, image_ids: list[str] | pd.Series) -> pd.DataFrame:
        pos = self.index.index.get_indexer(pd.Index(pd.Series(image_ids, dtype=object)))
        if (pos < 0).any():
            raise KeyError(f"{int((pos < 0).sum())} images are not in embedding cache {self.dir}")
        return self.index.iloc[pos]

    def shard_arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped (clip, scene) float16 arrays of shard ``shard`` (its number in ``index``)."""
        _ = self.index
        clip, scene, _ = self._shard_files(self._names[shard])
        return np.load(clip, mmap_mode="r"), np.load(scene, mmap_mode="r")

    def load(self, image_ids: list[str] | pd.Series) -> tuple[torch.Tensor, torch.Tensor]:
        """float16 feature tensors for ``image_ids`` in that order (into memory), read shard by shard from the
        memory maps in row order (sequential reads). A shard merged away since the index was read (``compact``
        in another process) makes it read the index again, once."""
        try:
            return self._load(image_ids)
        except FileNotFoundError:
            self._index = None
            return self._load(image_ids)

    def _load(self, image_ids: list[str] | pd.Series) -> tuple[torch.Tensor, torch.Tensor]:
        where = self._locate(image_ids)
        shard, rows = where["shard"].to_numpy(), where["row"].to_numpy()
        c = s = None
        for k in np.unique(shard):
            clip, scene = self.shard_arrays(int(k))
            if c is None:
                c = np.empty((len(rows), clip.shape[1]), np.float16)
                s = np.empty((len(rows), scene.shape[1]), np.float16)
            pos = np.flatnonzero(shard == k)
            pos = pos[np.argsort(rows[pos], kind="stable")]
            c[pos], s[pos] = clip[rows[pos]], scene[rows[pos]]
        if c is None:  # no ids asked for
            dims = (int(self._meta.get("clip_dim", 0)), int(self._meta.get("scene_dim", 0)))
            c, s = np.empty((0, dims[0]), np.float16), np.empty((0, dims[1]), np.float16)
        return torch.from_numpy(c), torch.from_numpy(s)

    def add(self, image_ids: list[str], clip: np.ndarray, scene: np.ndarray, extra_meta: dict | None = None) -> None:
        """Commit rows as one new shard: features first, the index last (each by temp file + rename). Existing
        shards are never read or rewritten; ``meta.json`` is written once, when the cache gets its first shard."""
        if not len(image_ids):
            return
        if len(image_ids) != len(clip) or len(image_ids) != len(scene):
            raise ValueError(f"{len(image_ids)} image ids for {len(clip)} clip and {len(scene)} scene rows")
        (self.dir / SHARDS).mkdir(parents=True, exist_ok=True)
        if not (self.dir / META).exists():
            meta = {**(extra_meta or {}), "weights_id": self.weights_id, "layout": "shards",
                    "clip_dim": int(clip.shape[1]), "scene_dim": int(scene.shape[1]), "dtype": "float16",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write_bytes(self.dir / META, json.dumps(meta, indent=2).encode())
            self._meta = meta
        elif (int(clip.shape[1]), int(scene.shape[1])) != (self._meta.get("clip_dim"), self._meta.get("scene_dim")):
            raise ValueError(f"feature dims {clip.shape[1]}/{scene.shape[1]} differ from the cache's "
                             f"{self._meta.get('clip_dim')}/{self._meta.get('scene_dim')} ({self.dir})")
        clip = np.ascontiguousarray(clip, dtype=np.float16)
        scene = np.ascontiguousarray(scene, dtype=np.float16)
        self.log.commit(self._writers(list(image_ids), clip, scene),
                        need_bytes={".clip.npy": clip.nbytes + 128, ".scene.npy": scene.nbytes + 128})
        self._index = None

    @staticmethod
    def _writers(image_ids: list[str], clip: np.ndarray, scene: np.ndarray) -> dict:
        """One shard's files: features, then the index that commits them (``SHARD_SUFFIXES``)."""
        def save(arr: np.ndarray):
            def write(tmp: Path) -> None:
                with open(tmp, "wb") as fh:
                    np.save(fh, arr)
            return write

        index = pd.DataFrame({"image_id": image_ids, "row": np.arange(len(image_ids), dtype=np.int64)})
        return {".clip.npy": save(clip), ".scene.npy": save(scene), INDEX_SUFFIX: index.to_parquet}

    def compact(self, max_rows: int = COMPACT_ROWS) -> int:
        """Merge runs of small shards into one each (the first copy of an id wins, as in ``index``); returns how
        many shards went. A reader holding the old index reads it again (``load``); one that has a shard mapped
        keeps it (an unlinked file stays readable while open)."""
        def rows(name: str) -> int:
            return pq.ParquetFile(self._shard_files(name)[2]).metadata.num_rows

        def merge(members: list[str]) -> dict:
            ids, clips, scenes = [], [], []
            for name in members:
                clip, scene, index = self._shard_files(name)
                ids.extend(pq.read_table(index, columns=["image_id"]).column("image_id").to_pylist())
                order = pq.read_table(index, columns=["row"]).column("row").to_numpy()
                clips.append(np.load(clip)[order])
                scenes.append(np.load(scene)[order])
            first = ~pd.Index(ids, dtype=object).duplicated(keep="first")
            return self._writers([i for i, k in zip(ids, first) if k], np.concatenate(clips)[first],
                                 np.concatenate(scenes)[first])

        removed = self.log.compact(rows, merge, max_rows, later_wins=False)
        self._index = None
        return removed

    def record_rejections(self, rejected: pd.DataFrame) -> None:
        p = self.dir / REJECTIONS
        if p.exists():
            rejected = pd.concat([pd.read_parquet(p), rejected]).drop_duplicates("image_id", keep="last")
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(p) as tmp:
            rejected.to_parquet(tmp)

    def rejections(self) -> pd.DataFrame:
        """image_id, path, reason of every image this cache could not use."""
        p = self.dir / REJECTIONS
        return pd.read_parquet(p) if p.exists() else pd.DataFrame({"image_id": [], "path": [], "reason": []})

    def rejected_ids(self) -> set[str]:
        return set(self.rejections()["image_id"])


def prune_other_caches(root: str | Path, keep: str) -> list[str]:
    """Delete caches of other encoder weights (stale features); returns the removed weights ids."""
    removed = []
    for d in Path(root).glob("*"):
        if d.is_dir() and d.name != keep and (d / META).exists():
            shutil.rmtree(d)
            removed.append(d.name)
    return removed


class _Chunk:
    """The rows computed since the last commit; ``due`` says when to commit them (size or age)."""

    def __init__(self, images: int, seconds: float):
        self.images, self.seconds = max(1, images), seconds
        self.reset()

    def reset(self) -> None:
        self.clip: list[np.ndarray] = []
        self.scene: list[np.ndarray] = []
        self.ids: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.started = time.monotonic()

    def due(self) -> bool:
        n = len(self.ids) + len(self.failed)
        return n >= self.images or (n > 0 and time.monotonic() - self.started >= self.seconds)


@torch.no_grad()
def build_embedding_cache(encoder: DualEncoder, table: pd.DataFrame, data_root: str | Path, cache_root: str | Path,
                          batch_size: int = 64, device: torch.device | str = "cpu", num_workers: int = 0,
                          amp: bool = True, progress: Callable[[int, int], None] | None = None,
                          weights_id: str | None = None, amp_dtype: str = "auto",
                          chunk_images: int = CHUNK_IMAGES, chunk_seconds: float = CHUNK_SECONDS,
                          ) -> tuple[EmbeddingCache, dict[str, int]]:
    """Compute features for the images of ``table`` (image_id, path) not cached yet; reuse the rest.

    Features are computed under autocast in ``precision.amp_dtype(device, amp, amp_dtype)`` (bf16, else fp16 on
    CUDA; float32 on CPU). The cache key is ``encoder.weights_id(<that precision>)``; a ``weights_id`` passed in
    is checked against it (a key without the precision would let fp32 and bf16 features share a folder).
    Every ``chunk_images`` images or ``chunk_seconds`` the computed rows are committed as a shard (with that
    chunk's rejections), so memory is O(chunk) and a killed build loses at most one chunk. Images that cannot be
    used are recorded in the cache's ``rejections.parquet`` with the loader's reason (``missing_file``,
    ``not_an_image``, ``bytes_changed`` when the bytes read no longer hash to the image id) and not retried with
    the same weights. ``stats["reasons"]`` counts this build's rejections by reason.
    """
    device = torch.device(device)
    dtype = resolve_amp_dtype(device, amp, amp_dtype)
    precision = dtype_name(dtype)
    wid = encoder.weights_id(precision)
    if weights_id is not None and weights_id != wid:  # e.g. an id computed for fp32 while autocasting to bf16
        raise ValueError(f"weights_id {weights_id} does not name this encoder's {precision} features ({wid}); "
                         f"compute it as encoder.weights_id({precision!r})")
    table = table.drop_duplicates("image_id")
    source = image_source(table, data_root).kind  # the shards' copies when the data root has them (issue 22)
    cache = EmbeddingCache(cache_root, wid)
    discarded = None
    if cache.image_source not in (None, source):  # features of other pixels: never reused
        discarded = f"{cache.image_source or 'unknown'} -> {source}"
        shutil.rmtree(cache.dir)
        cache = EmbeddingCache(cache_root, wid)
    skip = cache.rejected_ids()
    todo = table[table["image_id"].isin(cache.missing(table["image_id"])) & ~table["image_id"].isin(skip)]
    stats: dict = {"requested": len(table), "reused": len(table) - len(todo) - len(skip & set(table["image_id"])),
                   "computed": 0, "unreadable": 0, "shards_written": 0, "reasons": {}, "image_source": source}
    if discarded:
        stats["discarded_other_image_source"] = discarded
    if not len(todo):
        return cache, stats
    encoder = encoder.to(device).eval()
    todo = todo.reset_index(drop=True)
    ds = ImageDataset(todo, data_root, encoder.cfg.image_size, augment=None, with_labels=False)
    batches = [list(range(i, min(i + batch_size, len(ds)))) for i in range(0, len(ds), batch_size)]
    loader = make_loader(ds, batches, num_workers, pin_memory=device.type == "cuda")
    ids, paths = todo["image_id"].to_numpy(), todo["path"].to_numpy()
    meta = {"encoder": _enc_meta(encoder), "precision": precision, "image_source": source}
    chunk = _Chunk(chunk_images, chunk_seconds)

    def commit() -> None:
        if chunk.failed:  # rejections first: a kill before the shard only recomputes the readable rows
            cache.record_rejections(pd.DataFrame({"image_id": [ids[int(r)] for r, _ in chunk.failed],
                                                  "path": [paths[int(r)] for r, _ in chunk.failed],
                                                  "reason": [why for _, why in chunk.failed]}))
        if chunk.ids:
            cache.add(chunk.ids, np.concatenate(chunk.clip), np.concatenate(chunk.scene), meta)
            stats["shards_written"] += 1
        stats["computed"] += len(chunk.ids)
        stats["unreadable"] += len(chunk.failed)
        for _, why in chunk.failed:
            stats["reasons"][why] = stats["reasons"].get(why, 0) + 1
        chunk.reset()

    done = 0
    for rows, batch in zip(batches, loader):
        chunk.failed.extend(zip(batch["failed_rows"], batch["failed_reasons"]))
        if "image" in batch:
            x = batch["image"].to(device, non_blocking=True)
            with autocast(device, dtype):
                c, s = encoder(x)
            chunk.clip.append(c.float().cpu().numpy().astype(np.float16))
            chunk.scene.append(s.float().cpu().numpy().astype(np.float16))
            chunk.ids.extend(ids[r] for r in batch["row"].tolist())
        done += len(rows)
        if chunk.due():
            commit()
        if progress is not None:
            progress(done, len(ds))
    commit()
    if len(cache.shard_names(refresh=True)) > MAX_SHARDS:
        stats["shards_compacted"] = cache.compact()
    return cache, stats


def _enc_meta(encoder: DualEncoder) -> dict:
    e = encoder.cfg
    return {"clip_model": e.clip_model, "clip_pretrained": e.clip_pretrained,
            "clip_activation": encoder.clip.activation, "scene_arch": e.scene_arch, "scene_weights": e.scene_weights,
            "image_size": e.image_size}
