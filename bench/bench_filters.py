"""Filter metrics throughput: one-pass draft-mode metrics in 2 processes vs a plain baseline, same process.

The baseline is what a straightforward implementation does: one full decode per check (integrity and size, blur,
uniformity, perceptual hash), in a single process, computing the same metric definitions. Ours: one draft-mode
decode per image, every metric from it, ``--workers`` spawned processes (their start-up is included in the time).

Usage: python bench/bench_filters.py [--images 400] [--size 1024] [--workers 2]
Prints both rates, the ratio (goal >= 3x), the single-process rate of ours (how much is draft mode alone), how far
the draft-mode metrics are from the full-decode ones, and the near-duplicate grouping time for 10k hashes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def make_jpegs(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth colour field, shapes, sensor noise), 4:3, long side ``size``, quality 90."""
    rng = np.random.default_rng(seed)
    w, h = size, size * 3 // 4
    noise = rng.normal(0, 6, (h + 64, w + 64, 3)).astype(np.float32)  # one bank, read at random offsets
    paths = []
    for i in range(n):
        coarse = rng.integers(20, 235, (6, 8, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC), np.float32)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            arr[y0 : y0 + int(rng.integers(20, h // 2)), x0 : x0 + int(rng.integers(20, w // 2))] = rng.uniform(0, 255, 3)
        oy, ox = int(rng.integers(0, 64)), int(rng.integers(0, 64))
        arr += noise[oy : oy + h, ox : ox + w]
        p = folder / f"img{i:04d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p, "JPEG", quality=90)
        paths.append(p)
    return paths


def baseline_metrics(path: Path, analysis_size: int, blur_size: int) -> dict:
    """One full decode per check, single process: the plain way."""
    import imagehash

    from pipeline.filters.metrics import PHASH_SIZE, laplacian_variance

    def grey_small(size: int) -> Image.Image:
        with Image.open(path) as im:
            g = ImageOps.exif_transpose(im).convert("L")
        g.thumbnail((size, size), Image.Resampling.BOX)
        return g

    with Image.open(path) as im:  # check 1: decodes completely, size
        im.load()
        width, height = im.size
    sharpness = laplacian_variance(np.asarray(grey_small(blur_size), np.float32))  # check 2: blur
    grey = np.asarray(grey_small(analysis_size), np.float32)  # check 3: uniformity
    lo, hi = np.percentile(grey, [1, 99])
    with Image.open(path) as im:  # check 4: perceptual hash
        h = imagehash.phash(ImageOps.exif_transpose(im), hash_size=PHASH_SIZE)
    return {"width": width, "height": height, "sharpness": sharpness, "grey_std": float(grey.std()),
            "grey_range": float(hi - lo), "phash": np.packbits(h.hash.ravel()).tobytes().hex()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from pipeline.filters.dedup import hash_matrix, near_pairs
    from pipeline.filters.metrics import MetricsParams, measure_many

    params = MetricsParams()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = make_jpegs(Path(tmp), args.images, args.size)
        print(f"made {len(paths)} JPEGs of {args.size}x{args.size * 3 // 4} px in {time.perf_counter() - t0:.1f} s")
        items = [(f"{i:064x}", str(p)) for i, p in enumerate(paths)]
        measure_many(items[:1], params, workers=1)  # imports (imagehash, scipy) warm in this process for all runs
        baseline_metrics(paths[0], params.analysis_size, params.blur_size)

        t0 = time.perf_counter()
        ours = measure_many(items, params, workers=args.workers, chunk_size=16)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        measure_many(items, params, workers=1)
        t_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        base = [baseline_metrics(p, params.analysis_size, params.blur_size) for p in paths]
        t_base = time.perf_counter() - t0

    n = len(paths)
    assert all(o.get("error") is None for o in ours)
    print(f"ours (one draft-mode decode, all metrics, {args.workers} processes incl. this one): {n / t_ours:,.1f} images/s "
          f"({t_ours:.2f} s, process start-up included)")
    print(f"ours, 1 process: {n / t_one:,.1f} images/s ({t_one:.2f} s)")
    print(f"baseline (full decode per check x 4, 1 process): {n / t_base:,.1f} images/s ({t_base:.2f} s)")
    print(f"speed ratio: {t_base / t_ours:.1f}x (1-process ratio: {t_base / t_one:.1f}x)")

    rel = [abs(o["sharpness"] - b["sharpness"]) / max(b["sharpness"], 1e-9) for o, b in zip(ours, base)]
    dstd = [abs(o["grey_std"] - b["grey_std"]) for o, b in zip(ours, base)]
    hd = [
        int(np.bitwise_count(hash_matrix([o["phash"]]) ^ hash_matrix([b["phash"]])).sum()) for o, b in zip(ours, base)
    ]
    print(f"draft vs full decode: sharpness median relative difference {np.median(rel):.1%}, "
          f"grey std median abs difference {np.median(dstd):.2f}, pHash distance median {np.median(hd):.0f} / max "
          f"{max(hd)} of 256 bits (near-duplicate threshold 24)")

    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**63, (10_000, 4), dtype=np.int64).view(np.uint64)
    t0 = time.perf_counter()
    near_pairs(hashes, 24)
    print(f"near-duplicate pair search: 10,000 hashes in {time.perf_counter() - t0:.2f} s (O(N^2), vectorised)")


if __name__ == "__main__":
    main()
