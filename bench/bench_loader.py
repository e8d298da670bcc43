"""Image loading for training and the embedding cache on 12 MP photos: images/s per core, old path vs new path.

Usage: python bench/bench_loader.py [--images 12] [--rounds 3] [--size 224]
Writes synthetic 4000x3000 JPEGs (quality 90; gradients, blotches at several scales and per-pixel sensor noise,
~4 MB each like a phone photo) to a temp dir, then times, on one pinned core with one torch thread:
  old: full-resolution decode, then the crop/resize on the full tensor (copies of the functions before issue 11;
       augment_view given a full-resolution image runs exactly its old code: the crop on the full tensor);
  new: geopak_model.data.load_image with the view's min_side (JPEG DCT-scaled decode), then eval_view/augment_view;
for the eval view (embedding cache, validation) and the augmented training view. Rates are images per CPU second
of this process (robust to other load on the machine) with wall-clock rates alongside; old and new alternate
round by round so drift hits both. Also prints the mean |old - new| of the views (values in [0, 1]).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from geopak_model.config import AugmentConfig
from geopak_model.data import augment_min_side, augment_view, eval_view, load_image, to_tensor


# --- the path before issue 11 (baseline), copied verbatim ------------------------------------------------------
def old_load_image(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return ImageOps.exif_transpose(im).convert("RGB")


def old_crop_resize(x: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    crop = x[:, top: top + h, left: left + w]
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def old_eval_view(img: Image.Image, size: int) -> torch.Tensor:
    x = to_tensor(img)
    h, w = x.shape[-2:]
    s = min(h, w)
    return old_crop_resize(x, (h - s) // 2, (w - s) // 2, s, s, size)


# --- synthetic 12 MP photos ----------------------------------------------------------------------------------
def photo(rng: np.random.Generator, w: int = 4000, h: int = 3000) -> np.ndarray:
    """Sky-to-ground gradients, soft blotches at 3 scales (texture), and per-pixel noise: not compressible to a
    toy size, like a real photo."""
    yy = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    xx = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    top, bottom = rng.uniform(60, 220, 3).astype(np.float32), rng.uniform(30, 180, 3).astype(np.float32)
    img = top * (1 - yy) + bottom * yy + 25 * np.sin(xx * rng.uniform(3, 9) + rng.uniform(0, 6)).astype(np.float32)
    for cell, amp in ((200, 30.0), (40, 18.0), (8, 10.0)):
        small = rng.standard_normal((h // cell + 2, w // cell + 2, 3), dtype=np.float32)
        small_u8 = np.clip(128 + 40 * small, 0, 255).astype(np.uint8)
        up = np.asarray(Image.fromarray(small_u8).resize((w, h), Image.Resampling.BILINEAR), np.float32)
        img += (up - 128) * (amp / 40)
    img += rng.standard_normal((h, w, 1), dtype=np.float32) * 6
    return np.clip(img, 0, 255).astype(np.uint8)


def write_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    base = photo(rng)
    out = []
    for i in range(n):  # shifted/flipped copies of one render plus fresh noise: different bytes, fast to make
        arr = np.roll(base, shift=(int(rng.integers(0, 3000)), int(rng.integers(0, 4000))), axis=(0, 1))
        arr = arr[:, ::-1] if i % 2 else arr
        noise = rng.integers(-3, 4, size=(3000, 4000, 1), dtype=np.int16)
        arr = np.clip(arr.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        p = folder / f"photo_{i:02d}.jpg"
        Image.fromarray(arr).save(p, "JPEG", quality=90)
        out.append(p)
    return out


# --- timing ----------------------------------------------------------------------------------------------------
def timed(fn: Callable[[Path], torch.Tensor], paths: list[Path]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) to produce one view of every image."""
    c0, w0 = time.process_time(), time.perf_counter()
    for p in paths:
        fn(p)
    return time.process_time() - c0, time.perf_counter() - w0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    torch.set_num_threads(1)
    size, cfg = args.size, AugmentConfig()
    aug_side = augment_min_side(size, cfg)

    def seeded(p: Path) -> torch.Generator:
        return torch.Generator().manual_seed(hash(p.name) % 2**31)

    paths_fns: dict[str, dict[str, Callable[[Path], torch.Tensor]]] = {
        "eval": {"old": lambda p: old_eval_view(old_load_image(p), size),
                 "new": lambda p: eval_view(load_image(p, size), size)},
        "train": {"old": lambda p: augment_view(old_load_image(p), size, cfg, seeded(p)),
                  "new": lambda p: augment_view(load_image(p, aug_side), size, cfg, seeded(p))},
    }
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = write_photos(Path(tmp), args.images)
        mb = np.mean([p.stat().st_size for p in paths]) / 2**20
        print(f"{len(paths)} JPEGs of 4000x3000, quality 90, {mb:.2f} MB each (written in "
              f"{time.perf_counter() - t0:.1f} s); view {size} px, augmented view decodes >= {aug_side} px; "
              f"1 core, torch threads {torch.get_num_threads()}")
        for fns in paths_fns.values():  # warm-up (imports, allocator)
            for fn in fns.values():
                fn(paths[0])
        totals = {(v, k): [0.0, 0.0] for v in paths_fns for k in ("old", "new")}
        for _ in range(args.rounds):
            for view, fns in paths_fns.items():
                for kind, fn in fns.items():
                    cpu, wall = timed(fn, paths)
                    totals[view, kind][0] += cpu
                    totals[view, kind][1] += wall
        n = len(paths) * args.rounds
        for view in paths_fns:
            (oc, ow), (nc, nw) = totals[view, "old"], totals[view, "new"]
            print(f"{view:5s} view: old {n / oc:6.1f} images/s per core (wall {n / ow:5.1f}), "
                  f"new {n / nc:6.1f} images/s per core (wall {n / nw:5.1f}), ratio new/old {oc / nc:5.2f}x")
        diffs = [float((old_eval_view(old_load_image(p), size) - eval_view(load_image(p, size), size)).abs().mean())
                 for p in paths[:4]]
        print(f"eval view mean |old - new| over {len(diffs)} images: {np.mean(diffs):.4f} (values in [0, 1])")


if __name__ == "__main__":
    main()
