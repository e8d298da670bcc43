"""Frozen-encoder embedding cache: features computed once per (image_id, encoder weights id).

Layout under ``<cache_root>/<weights_id>/``: ``clip-<gen>.npy`` and ``scene-<gen>.npy`` (float16, memory-mapped),
``index-<gen>.parquet`` (image_id → row), ``rejections.parquet`` (images that could not be read), and
``meta.json`` naming the current generation (written last, atomically: readers never see half an update).
A different encoder (other weights, architecture, resolution, CLIP activation, preprocessing, or the autocast
precision the features are computed in) has another weights id, hence another folder: nothing computed with old
settings is ever reused; ``prune_other_caches`` deletes those folders. ``meta.json`` records the ``precision``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from geopak_model.data import ImageDataset, make_loader
from geopak_model.encoders import DualEncoder
from geopak_model.precision import amp_dtype as resolve_amp_dtype
from geopak_model.precision import autocast, dtype_name
from pipeline.core import reasons
from pipeline.core.store import atomic_path, atomic_write_bytes

META = "meta.json"


class EmbeddingCache:
    def __init__(self, root: str | Path, weights_id: str):
        self.dir = Path(root) / weights_id
        self.weights_id = weights_id
        self._meta = self._read_meta()
        self._index: pd.Series | None = None

    def _read_meta(self) -> dict:
        p = self.dir / META
        return json.loads(p.read_text()) if p.exists() else {"generation": 0, "rows": 0}

    @property
    def precision(self) -> str | None:
        """"fp32", "bf16" or "fp16": what the features were computed in (None: empty, or an old cache)."""
        return self._meta.get("precision")

    @property
    def generation(self) -> int:
        return int(self._meta["generation"])

    def _file(self, kind: str, gen: int | None = None) -> Path:
        gen = self.generation if gen is None else gen
        return self.dir / (f"index-{gen}.parquet" if kind == "index" else f"{kind}-{gen}.npy")

    @property
    def index(self) -> pd.Series:
        """image_id → row."""
        if self._index is None:
            if self.generation == 0:
                self._index = pd.Series(dtype=np.int64)
            else:
                df = pd.read_parquet(self._file("index"))
                self._index = pd.Series(df["row"].to_numpy(np.int64), index=df["image_id"].to_numpy())
        return self._index

    def __len__(self) -> int:
        return len(self.index)

    def missing(self, image_ids: list[str] | pd.Series) -> list[str]:
        have = self.index.index
        return [i for i in pd.unique(pd.Series(image_ids)) if i not in have]

    def rows(self, image_ids: list[str] | pd.Series) -> np.ndarray:
        ids = pd.Series(image_ids)
        found = ids.isin(self.index.index)
        if not found.all():
            raise KeyError(f"{int((~found).sum())} images are not in embedding cache {self.dir}")
        return self.index.loc[ids.to_numpy()].to_numpy()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped (clip, scene) float16 arrays of the current generation."""
        if self.generation == 0:
            raise FileNotFoundError(f"embedding cache {self.dir} is empty")
        return (np.load(self._file("clip"), mmap_mode="r"), np.load(self._file("scene"), mmap_mode="r"))

    def load(self, image_ids: list[str] | pd.Series) -> tuple[torch.Tensor, torch.Tensor]:
        """float16 feature tensors for ``image_ids`` in that order (into memory)."""
        rows = self.rows(image_ids)
        clip, scene = self.arrays()
        order = np.argsort(rows, kind="stable")  # sequential reads from the memory map
        c = np.empty((len(rows), clip.shape[1]), np.float16)
        s = np.empty((len(rows), scene.shape[1]), np.float16)
        c[order], s[order] = clip[rows[order]], scene[rows[order]]
        return torch.from_numpy(c), torch.from_numpy(s)

    def add(self, image_ids: list[str], clip: np.ndarray, scene: np.ndarray, extra_meta: dict | None = None) -> None:
        """Append rows as a new generation (old arrays + new), then switch ``meta.json`` atomically."""
        if not len(image_ids):
            return
        old_gen = self.generation
        if old_gen:
            oc, os_ = self.arrays()
            clip = np.concatenate([np.asarray(oc), clip.astype(np.float16)])
            scene = np.concatenate([np.asarray(os_), scene.astype(np.float16)])
            ids = list(self.index.sort_values().index) + list(image_ids)
        else:
            ids = list(image_ids)
        gen = old_gen + 1
        self.dir.mkdir(parents=True, exist_ok=True)
        for kind, arr in (("clip", clip), ("scene", scene)):
            with atomic_path(self._file(kind, gen)) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(arr, dtype=np.float16))
        with atomic_path(self._file("index", gen)) as tmp:
            pd.DataFrame({"image_id": ids, "row": np.arange(len(ids))}).to_parquet(tmp)
        meta = {**self._meta, **(extra_meta or {}), "generation": gen, "rows": len(ids), "weights_id": self.weights_id,
                "clip_dim": int(clip.shape[1]), "scene_dim": int(scene.shape[1]), "dtype": "float16",
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_bytes(self.dir / META, json.dumps(meta, indent=2).encode())
        self._meta, self._index = meta, None
        if old_gen:
            for kind in ("clip", "scene", "index"):
                self._file(kind, old_gen).unlink(missing_ok=True)

    def record_rejections(self, rejected: pd.DataFrame) -> None:
        p = self.dir / "rejections.parquet"
        if p.exists():
            rejected = pd.concat([pd.read_parquet(p), rejected]).drop_duplicates("image_id", keep="last")
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(p) as tmp:
            rejected.to_parquet(tmp)

    def rejected_ids(self) -> set[str]:
        p = self.dir / "rejections.parquet"
        return set(pd.read_parquet(p)["image_id"]) if p.exists() else set()


def prune_other_caches(root: str | Path, keep: str) -> list[str]:
    """Delete caches of other encoder weights (stale features); returns the removed weights ids."""
    removed = []
    for d in Path(root).glob("*"):
        if d.is_dir() and d.name != keep and (d / META).exists():
            shutil.rmtree(d)
            removed.append(d.name)
    return removed


@torch.no_grad()
def build_embedding_cache(encoder: DualEncoder, table: pd.DataFrame, data_root: str | Path, cache_root: str | Path,
                          batch_size: int = 64, device: torch.device | str = "cpu", num_workers: int = 0,
                          amp: bool = True, progress: Callable[[int, int], None] | None = None,
                          weights_id: str | None = None, amp_dtype: str = "auto"
                          ) -> tuple[EmbeddingCache, dict[str, int]]:
    """Compute features for the images of ``table`` (image_id, path) not cached yet; reuse the rest.

    Features are computed under autocast in ``precision.amp_dtype(device, amp, amp_dtype)`` (bf16, else fp16 on
    CUDA; float32 on CPU). The cache key is ``encoder.weights_id(<that precision>)``; a ``weights_id`` passed in
    is checked against it (a key without the precision would let fp32 and bf16 features share a folder).
    Images that cannot be read are recorded in the cache's ``rejections.parquet`` (``missing_file`` or
    ``not_an_image``) and not retried with the same weights.
    """
    device = torch.device(device)
    dtype = resolve_amp_dtype(device, amp, amp_dtype)
    precision = dtype_name(dtype)
    wid = encoder.weights_id(precision)
    if weights_id is not None and weights_id != wid:  # e.g. an id computed for fp32 while autocasting to bf16
        raise ValueError(f"weights_id {weights_id} does not name this encoder's {precision} features ({wid}); "
                         f"compute it as encoder.weights_id({precision!r})")
    cache = EmbeddingCache(cache_root, wid)
    table = table.drop_duplicates("image_id")
    skip = cache.rejected_ids()
    todo = table[table["image_id"].isin(cache.missing(table["image_id"])) & ~table["image_id"].isin(skip)]
    stats = {"requested": len(table), "reused": len(table) - len(todo) - len(skip & set(table["image_id"])),
             "computed": 0, "unreadable": 0}
    if len(todo):
        encoder = encoder.to(device).eval()
        ds = ImageDataset(todo.reset_index(drop=True), data_root, encoder.cfg.image_size, augment=None,
                          with_labels=False)
        batches = [list(range(i, min(i + batch_size, len(ds)))) for i in range(0, len(ds), batch_size)]
        loader = make_loader(ds, batches, num_workers, pin_memory=device.type == "cuda")
        ids = todo["image_id"].to_numpy()
        clip_parts, scene_parts, done_ids, failed = [], [], [], []
        done = 0
        for rows, batch in zip(batches, loader):
            ok_rows = batch["row"].tolist() if "row" in batch else []
            failed.extend(ids[r] for r in rows if r not in set(ok_rows))
            if ok_rows:
                x = batch["image"].to(device, non_blocking=True)
                with autocast(device, dtype):
                    c, s = encoder(x)
                clip_parts.append(c.float().cpu().numpy().astype(np.float16))
                scene_parts.append(s.float().cpu().numpy().astype(np.float16))
                done_ids.extend(ids[r] for r in ok_rows)
            done += len(rows)
            if progress is not None:
                progress(done, len(ds))
        if done_ids:
            cache.add(done_ids, np.concatenate(clip_parts), np.concatenate(scene_parts),
                      {"encoder": _enc_meta(encoder), "precision": precision})
        if failed:
            paths = dict(zip(todo["image_id"], todo["path"]))
            why = [reasons.NOT_AN_IMAGE if (Path(data_root) / paths[i]).exists() else reasons.MISSING_FILE
                   for i in failed]
            cache.record_rejections(pd.DataFrame({"image_id": failed, "path": [paths[i] for i in failed],
                                                  "reason": why}))
        stats["computed"], stats["unreadable"] = len(done_ids), len(failed)
    return cache, stats


def _enc_meta(encoder: DualEncoder) -> dict:
    e = encoder.cfg
    return {"clip_model": e.clip_model, "clip_pretrained": e.clip_pretrained,
            "clip_activation": encoder.clip.activation, "scene_arch": e.scene_arch, "scene_weights": e.scene_weights,
            "image_size": e.image_size}
