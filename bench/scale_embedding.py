"""Scale bench section (issue 13.3): appending rows to the embedding cache, old layout vs shards.

The issue measured +1k rows on a 200k-row cache with the gpu-full feature sizes (CLIP ViT-B/16 width 768 +
ResNet-50 2048, float16: 5.6 KB a row) at 8.9 s and 2.98 GB, because the old ``EmbeddingCache.add`` loaded the
whole cache, concatenated and rewrote it. The cache now appends one shard per chunk (``geopak_model/cache.py``).

For each measured base size this script makes, in a temp folder it deletes, the same random float16 cache twice:
in the old single-generation layout (``clip-1.npy``, ``scene-1.npy``, ``index-1.parquet``, ``meta.json``) and in
the shard layout (built through ``EmbeddingCache.add`` in chunks of ``--chunk`` rows, which is itself measured:
the build's memory must stay O(chunk)). Then it appends ``--append`` rows both ways:

- ``old``: the previous ``EmbeddingCache.add`` reproduced below (it no longer exists in the package);
- ``new``: what ``build_embedding_cache`` does per chunk: open the cache, look the new ids up in its index,
  ``add`` one shard.

Every measurement runs in its own forked child, so each peak RSS is its own (``ru_maxrss`` right after the
step). Old and new run in the same invocation, alternating, and the ratio is printed. Base sizes above
``--max-measured`` (1 M, 10 M: 5.6 / 56 GB of features) are extrapolated: the new append from the largest
measured one (its cost does not grow with the cache beyond reading the index, ~the id column), the old one
linearly in bytes rewritten. One JSON object per line on stdout (``bench/bench_scale.py`` interface).

Usage: python bench/scale_embedding.py [--sizes 1000000,10000000] [--measure 200000] [--append 1000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from geopak_model.cache import EmbeddingCache
from pipeline.core.store import atomic_path, atomic_write_bytes

STAGE = "embedding-cache append"
CLIP_DIM, SCENE_DIM = 768, 2048  # gpu-full: open_clip ViT-B-16 width (proj removed) and ResNet-50 features
WID = "bench"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ids(start: int, n: int) -> list[str]:
    return [f"{i:064x}" for i in range(start, start + n)]


def features(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return (rng.standard_normal((n, CLIP_DIM), dtype=np.float32).astype(np.float16),
            rng.standard_normal((n, SCENE_DIM), dtype=np.float32).astype(np.float16))


# --- the layout before issue 13.3, reproduced (EmbeddingCache.add and its files, as they were) -----------------
def write_old_cache(d: Path, n: int, chunk: int, seed: int) -> None:
    """A single-generation cache of ``n`` rows in the old layout (written in chunks, not measured)."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    clip = np.lib.format.open_memmap(d / "clip-1.npy", "w+", np.float16, (n, CLIP_DIM))
    scene = np.lib.format.open_memmap(d / "scene-1.npy", "w+", np.float16, (n, SCENE_DIM))
    for s in range(0, n, chunk):
        clip[s: s + chunk], scene[s: s + chunk] = features(rng, min(chunk, n - s))
    clip.flush()
    scene.flush()
    del clip, scene
    pd.DataFrame({"image_id": ids(0, n), "row": np.arange(n)}).to_parquet(d / "index-1.parquet")
    (d / "meta.json").write_text(json.dumps({"generation": 1, "rows": n, "weights_id": WID,
                                             "clip_dim": CLIP_DIM, "scene_dim": SCENE_DIM, "dtype": "float16"}))


def old_add(d: Path, image_ids: list[str], clip: np.ndarray, scene: np.ndarray) -> None:
    """The previous ``EmbeddingCache.add``: old arrays + new rows as a new generation, then the old one deleted."""
    meta = json.loads((d / "meta.json").read_text())
    old_gen = int(meta["generation"])
    df = pd.read_parquet(d / f"index-{old_gen}.parquet")
    index = pd.Series(df["row"].to_numpy(np.int64), index=df["image_id"].to_numpy())
    oc = np.load(d / f"clip-{old_gen}.npy", mmap_mode="r")
    os_ = np.load(d / f"scene-{old_gen}.npy", mmap_mode="r")
    clip = np.concatenate([np.asarray(oc), clip.astype(np.float16)])
    scene = np.concatenate([np.asarray(os_), scene.astype(np.float16)])
    all_ids = list(index.sort_values().index) + list(image_ids)
    gen = old_gen + 1
    for kind, arr in (("clip", clip), ("scene", scene)):
        with atomic_path(d / f"{kind}-{gen}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(arr, dtype=np.float16))
    with atomic_path(d / f"index-{gen}.parquet") as tmp:
        pd.DataFrame({"image_id": all_ids, "row": np.arange(len(all_ids))}).to_parquet(tmp)
    meta = {**meta, "generation": gen, "rows": len(all_ids)}
    atomic_write_bytes(d / "meta.json", json.dumps(meta, indent=2).encode())
    for kind in ("clip", "scene"):
        (d / f"{kind}-{old_gen}.npy").unlink(missing_ok=True)
    (d / f"index-{old_gen}.parquet").unlink(missing_ok=True)


# --- measured steps, each in a forked child --------------------------------------------------------------------
def build_new(root: Path, n: int, chunk: int, seed: int) -> float:
    """The shard layout built the way ``build_embedding_cache`` grows it: one ``add`` per chunk."""
    rng = np.random.default_rng(seed)
    cache = EmbeddingCache(root, WID)
    t0 = time.perf_counter()
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        cache.add(ids(s, m), *features(rng, m), {"precision": "fp32"})
    return time.perf_counter() - t0


def append_new(root: Path, n: int, k: int) -> float:
    new_ids = ids(n, k)
    c, s = features(np.random.default_rng(1), k)
    t0 = time.perf_counter()
    cache = EmbeddingCache(root, WID)
    todo = cache.missing(new_ids)  # what build_embedding_cache asks the index before computing
    cache.add(todo, c, s)
    seconds = time.perf_counter() - t0
    assert len(EmbeddingCache(root, WID)) == n + k
    return seconds


def append_old(d: Path, n: int, k: int) -> float:
    new_ids = ids(n, k)
    c, s = features(np.random.default_rng(1), k)
    t0 = time.perf_counter()
    old_add(d, new_ids, c, s)
    return time.perf_counter() - t0


def read_new(root: Path, n: int, k: int) -> float:
    """``load`` of ``k`` random ids across the shards (memory-mapped reads)."""
    pick = np.random.default_rng(2).choice(n, size=k, replace=False)
    t0 = time.perf_counter()
    c, s = EmbeddingCache(root, WID).load([f"{i:064x}" for i in pick])
    assert c.shape == (k, CLIP_DIM) and s.shape == (k, SCENE_DIM)
    return time.perf_counter() - t0


def _child(fn: Callable[..., float], args: tuple, q: mp.Queue) -> None:
    seconds = fn(*args)
    q.put((seconds, peak_rss_mb()))


def in_child(fn: Callable[..., float], *args) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of ``fn(*args)`` run in a forked child of this (small) process. Dirty pages are
    flushed first, so neither variant pays for the other's writes (an fsync waits for them on ext4)."""
    os.sync()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    out = q.get()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} failed (exit {p.exitcode})")
    return out


def row(stage: str, size: int, seconds: float, rss: float | None, measured: bool, note: str,
        baseline: float | None = None) -> None:
    print(json.dumps({"stage": stage, "size": size, "seconds": round(seconds, 3),
                      "peak_rss_mb": None if rss is None else round(rss, 1), "measured": measured, "note": note,
                      "baseline_seconds": None if baseline is None else round(baseline, 3)}), flush=True)


def extrapolate(results: dict[int, dict[str, tuple[float, float]]], name: str, n: int) -> tuple[float, float]:
    """(seconds, peak RSS MB) at ``n`` on the line through the two largest measured sizes (one: proportional)."""
    sizes = sorted(results)[-2:]
    if len(sizes) == 1:
        sec, rss = results[sizes[0]][name]
        return sec * n / sizes[0], rss * n / sizes[0]
    (n0, n1) = sizes
    out = []
    for i in (0, 1):
        y0, y1 = results[n0][name][i], results[n1][name][i]
        slope = max(0.0, (y1 - y0) / (n1 - n0))
        out.append(y1 + slope * (n - n1))
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000,10000000", help="base cache sizes to report (extrapolated when "
                    "above --measure)")
    ap.add_argument("--measure", default="50000,200000", help="base sizes measured on this machine")
    ap.add_argument("--append", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=2000, help="rows per shard while building the base cache")
    ap.add_argument("--rounds", type=int, default=2, help="alternating old/new rounds; the best is reported")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test of the driver)")
    args = ap.parse_args()
    measure = [int(x) for x in args.measure.split(",") if x]
    report = [int(x) for x in args.sizes.split(",") if x]
    k, chunk = args.append, args.chunk
    if args.quick:
        measure, report, k, chunk, args.rounds = [4000], [], 100, 500, 1
    row_bytes = 2 * (CLIP_DIM + SCENE_DIM)
    idle = in_child(lambda: 0.0)[1]
    log(f"peak RSS of a child that does nothing: {idle:.0f} MB (this interpreter with numpy, pandas, torch)")
    tmp = Path(tempfile.mkdtemp(prefix="geopak-scale-embedding-"))
    results: dict[int, dict[str, tuple[float, float]]] = {}
    try:
        for n in sorted(measure):
            log(f"base {n:,} rows ({n * row_bytes / 1e9:.2f} GB of features), append {k:,}")
            best: dict[str, tuple[float, float]] = {}
            for r in range(args.rounds):
                new_root, old_dir = tmp / f"new-{n}-{r}", tmp / f"old-{n}-{r}" / WID
                build = in_child(build_new, new_root, n, chunk, 0)
                if r == 0:
                    row("embedding-cache build (shards)", n, build[0], build[1], True,
                        f"{n // chunk} shards of {chunk} rows; memory O(chunk)")
                write_old_cache(old_dir, n, chunk, 0)
                for name, fn, where in (("new", append_new, new_root), ("old", append_old, old_dir)):
                    sec, rss = in_child(fn, where, n, k)
                    log(f"  round {r + 1}: {name} append {sec:.3f} s, peak RSS {rss:.0f} MB")
                    if name not in best or sec < best[name][0]:
                        best[name] = (sec, max(rss, best.get(name, (0, 0))[1]))
                if r == 0:
                    sec, rss = in_child(read_new, new_root, n + k, min(10000, n))
                    row("embedding-cache read (random rows, memmap)", min(10000, n), sec, rss, True,
                        f"from {n + k:,} rows in {len(list((new_root / WID / 'shards').glob('*.index.parquet')))}"
                        " shards")
                shutil.rmtree(new_root)
                shutil.rmtree(old_dir.parent)
            results[n] = best
            (old_s, old_rss), (new_s, new_rss) = best["old"], best["new"]
            row(STAGE, n, new_s, new_rss, True, f"+{k:,} rows; vs old layout (rewrite all): "
                f"{old_s / new_s:.0f}x faster, {old_rss:.0f} -> {new_rss:.0f} MB peak RSS "
                f"({idle:.0f} MB of it the interpreter)", old_s)
        for n in report:
            if n in results:
                continue
            new_s, new_rss = extrapolate(results, "new", n)
            old_s, old_rss = extrapolate(results, "old", n)
            row(STAGE, n, new_s, new_rss, False,
                f"extrapolated linearly from the measured {', '.join(f'{m:,}' for m in sorted(results)[-2:])} rows "
                f"(new: the index read grows with the ids, the write is constant); old layout: {old_s:.0f} s, "
                f"~{old_rss / 1024:.1f} GB (rewrites {n * row_bytes / 1e9:.1f} GB)", old_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
