"""Image loading for training and the embedding cache: images/s, today's 12 MP path against the new paths.

Usage: python bench/bench_loader.py [--images 12] [--rounds 3] [--size 224] [--sections views,items,loader,rain]
Writes synthetic 4000x3000 JPEGs (quality 90; gradients, blotches at several scales and per-pixel sensor noise,
~4 MB each like a phone photo) to a temp dir, then:

views (one pinned core, one torch thread; images per CPU second): for the eval view (embedding cache, validation)
  and the augmented training view, the full-resolution decode before issue 11 against ``load_image``'s JPEG
  DCT-scaled decode (issue 11), then the views; prints the mean |old - new| of the eval views too.
items (the same core): one training item (``ImageDataset[(row, seed)]``: read, verify, decode, the augmented
  224 px view) as it was before issue 22 (a 12 MP file hashed on every read, draft decode, the convolutions of
  ``rain`` and the blur) against the issue 22 path (the image's short-side-320 copy in a WebDataset shard, ``ShardImages``:
  the shard's sha256 checked once, then one read; the new ``rain``).
loader (2 spawned workers, the machine's 2 cores, wall clock): the augmented training batches of several epochs,
  through today's loader (workers spawned again every epoch, no prefetch beyond 2, every image hashed every
  epoch, 12 MP files) and through ``make_loader`` (persistent workers, prefetch 4) over the shards: steady
  images/s (from each epoch's first batch, what a long epoch sees) and with the workers' start-up. Wall clock on
  a shared machine understates both; the items section's per-core rates are the load-independent figures.
rain: ``rain`` on a 224 px view before and after issue 22: CPU ms a call on one torch thread (a loader worker),
  and wall ms at torch's default thread count (the main process with ``num_workers: 0``).
Old and new alternate round by round so drift in the machine's load hits both.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import geopak_model.data as gdata
from geopak_model.config import AugmentConfig
from geopak_model.data import (
    FileImages,
    ImageDataset,
    ShardImages,
    augment_min_side,
    augment_view,
    eval_view,
    load_image,
    make_loader,
    to_tensor,
    _u,
)
from pipeline.core.shards import Sample, ShardSet, write_manifest, write_shard
from pipeline.export.build import ShardConfig, shard_copy


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


def old_gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``gaussian_blur`` before issue 22 (two depthwise convolutions)."""
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / max(sigma, 1e-3)) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[0]
    y = F.pad(x[None], (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


def old_rain(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``rain`` before issue 22 (a ``length``² convolution over every pixel); tests/test_model_throughput.py checks
    that the new one draws the same numbers and paints the same streaks."""
    _, h, w = x.shape
    drops = (torch.rand((1, 1, h, w), generator=g) < _u(g, 0.002, 0.01)).float()
    length = max(3, h // 12)
    angle = _u(g, -0.3, 0.3)
    k = torch.zeros((length, length))
    for i in range(length):
        j = int(round(length / 2 + (i - length / 2) * math.tan(angle)))
        if 0 <= j < length:
            k[i, j] = 1.0
    streaks = F.conv2d(drops, k[None, None], padding=length // 2)[0, :, :h, :w].clamp(max=1.0)
    x = old_gaussian_blur(x * _u(g, 0.8, 0.95), 0.6)
    return x * (1 - 0.35 * streaks) + 0.8 * 0.35 * streaks


def as_before_issue_22() -> None:
    """This process reads and augments as before issue 22: every read hashed again, the old ``rain`` and blur."""
    gdata.VERIFIED_MEMO_MAX = 0
    gdata._VERIFIED.clear()
    gdata.rain, gdata.gaussian_blur = old_rain, old_gaussian_blur


def old_worker_init(_: int) -> None:
    as_before_issue_22()


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


def views(paths: list[Path], size: int, rounds: int) -> None:
    """Per core: the eval and augmented views from 12 MP JPEGs, full decode (before issue 11) vs draft decode."""
    cfg = AugmentConfig()
    aug_side = augment_min_side(size, cfg)

    def seeded(p: Path) -> torch.Generator:
        return torch.Generator().manual_seed(hash(p.name) % 2**31)

    paths_fns: dict[str, dict[str, Callable[[Path], torch.Tensor]]] = {
        "eval": {"old": lambda p: old_eval_view(old_load_image(p), size),
                 "new": lambda p: eval_view(load_image(p, size), size)},
        "train": {"old": lambda p: augment_view(old_load_image(p), size, cfg, seeded(p)),
                  "new": lambda p: augment_view(load_image(p, aug_side), size, cfg, seeded(p))},
    }
    for fns in paths_fns.values():  # warm-up (imports, allocator)
        for fn in fns.values():
            fn(paths[0])
    totals = {(v, k): [0.0, 0.0] for v in paths_fns for k in ("old", "new")}
    for _ in range(rounds):
        for view, fns in paths_fns.items():
            for kind, fn in fns.items():
                cpu, wall = timed(fn, paths)
                totals[view, kind][0] += cpu
                totals[view, kind][1] += wall
    n = len(paths) * rounds
    for view in paths_fns:
        (oc, ow), (nc, nw) = totals[view, "old"], totals[view, "new"]
        print(f"{view:5s} view: old {n / oc:6.1f} images/s per core (wall {n / ow:5.1f}), "
              f"new {n / nc:6.1f} images/s per core (wall {n / nw:5.1f}), ratio new/old {oc / nc:5.2f}x")
    diffs = [float((old_eval_view(old_load_image(p), size) - eval_view(load_image(p, size), size)).abs().mean())
             for p in paths[:4]]
    print(f"eval view mean |old - new| over {len(diffs)} images: {np.mean(diffs):.4f} (values in [0, 1])")


def datasets(paths: list[Path], folder: Path, size: int, copies: int = 1, old_copies: int = 1
             ) -> tuple[ImageDataset, ImageDataset]:
    """The same photos as today's training items (the 12 MP files, each listed ``old_copies`` times) and as issue
    22's (their short-side-320 copies in one WebDataset shard under ``folder/new``, each listed ``copies`` times)."""
    import pandas as pd

    ids = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    old = pd.DataFrame({"image_id": ids * old_copies, "path": [str(p) for p in paths] * old_copies})
    cfg = ShardConfig()
    samples = [Sample(i, shard_copy(p.read_bytes(), cfg.short_side, cfg.quality).jpg, {"image_id": i})
               for i, p in zip(ids, paths)]
    root = folder / "new" / "shards"
    info = write_shard(root / "train", "00000", "train", samples, "bench", preprocess=cfg.preprocess)
    write_manifest(root, [info], {"preprocess": cfg.preprocess})
    new = pd.DataFrame({"image_id": ids * copies, "path": [""] * (len(ids) * copies)})
    shards = ShardSet.find(folder / "new")
    assert shards is not None
    aug = AugmentConfig()
    return (ImageDataset(old, "/", size, aug, with_labels=False, images=FileImages(old, "/")),
            ImageDataset(new, folder / "new", size, aug, with_labels=False, images=ShardImages(new, shards)))


class EpochKeys:
    """Batches of (row, seed) keys over every row, shuffled afresh each epoch (``set_epoch``), like the trainer's
    seeded sampler."""

    def __init__(self, n: int, batch: int):
        self.n, self.batch, self.epoch = n, batch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([7, self.epoch])
        order, seeds = rng.permutation(self.n), rng.integers(0, 2**31 - 1, self.n)
        for s in range(0, self.n, self.batch):
            yield [(int(i), int(seeds[i])) for i in order[s: s + self.batch]]


def items(old: ImageDataset, new: ImageDataset, rounds: int) -> None:
    """Per core: one augmented training item, today's (12 MP file, hashed, convolution rain) vs issue 22's."""
    n = min(len(old), 12)
    keys = [(i, 1000 + i) for i in range(n)]
    rates: dict[str, float] = {"old": 0.0, "new": 0.0}
    saved = gdata.VERIFIED_MEMO_MAX, gdata.rain, gdata.gaussian_blur
    for ds in (old, new):  # warm-up
        ds[keys[0]]
    for _ in range(rounds):
        for kind, ds in (("old", old), ("new", new)):
            if kind == "old":
                as_before_issue_22()
            t = time.process_time()
            for k in keys:
                ds[k]
            rates[kind] += time.process_time() - t
            gdata.VERIFIED_MEMO_MAX, gdata.rain, gdata.gaussian_blur = saved
    o, w = n * rounds / rates["old"], n * rounds / rates["new"]
    print(f"train item: before issue 22 {o:6.1f} images/s per core (12 MP file: sha256, draft decode, augment), "
          f"issue 22 {w:6.1f} images/s per core (320 px shard copy), ratio {w / o:5.1f}x")


def rain_calls(rounds: int, default_threads: int) -> None:
    """``rain`` on a 224 px view: CPU ms a call on one torch thread (a loader worker), and wall ms at torch's
    default thread count (the main process with ``num_workers: 0``), old and new alternating."""
    x = torch.rand(3, 224, 224)
    for threads, clock, what in ((1, time.process_time, "CPU"), (default_threads, time.perf_counter, "wall")):
        torch.set_num_threads(threads)
        per = {"old": 0.0, "new": 0.0}
        n = 20 * rounds
        for r in range(n):
            for kind, fn in (("old", old_rain), ("new", gdata.rain)):
                g = torch.Generator().manual_seed(r)
                t = clock()
                fn(x, g)
                per[kind] += clock() - t
        print(f"rain, 224 px, torch threads {threads}: before issue 22 {1000 * per['old'] / n:6.2f} {what} ms a call, "
              f"issue 22 {1000 * per['new'] / n:5.2f} ms, ratio {per['old'] / per['new']:5.1f}x")
    torch.set_num_threads(1)


def loader_rate(loader: torch.utils.data.DataLoader, keys: EpochKeys, epochs: int) -> tuple[float, float]:
    """(steady images/s, images/s including start-up) over ``epochs`` epochs, wall clock. Steady: from each
    epoch's first batch to its end (what a long epoch sees); including start-up: from the first request."""
    t0 = time.perf_counter()
    steady_t, steady_n, total_n = 0.0, 0, 0
    for epoch in range(epochs):
        keys.set_epoch(epoch)
        first = None
        for batch in loader:
            n = int(batch["image"].shape[0])
            total_n += n
            if first is None:
                first = time.perf_counter()
            else:
                steady_n += n
        steady_t += time.perf_counter() - (first or time.perf_counter())
    return steady_n / max(steady_t, 1e-9), total_n / (time.perf_counter() - t0)


def loaders(paths: list[Path], folder: Path, size: int, workers: int, batch: int, rounds: int,
            copies: tuple[int, int]) -> None:
    """Wall clock through ``workers`` spawned workers: today's loader on the 12 MP files (each listed
    ``copies[0]`` times) against ``make_loader`` on the shards (each copy listed ``copies[1]`` times)."""
    old, _ = datasets(paths, folder / "a", size, 1, copies[0])
    _, new = datasets(paths, folder / "b", size, copies[1], 1)
    got: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    for _ in range(rounds):
        keys = EpochKeys(len(old), batch)
        dl = torch.utils.data.DataLoader(old, batch_sampler=keys, num_workers=workers,
                                         collate_fn=gdata.collate_drop_failed, multiprocessing_context="spawn",
                                         persistent_workers=False, worker_init_fn=old_worker_init)
        got["old"].append(loader_rate(dl, keys, 2))
        keys = EpochKeys(len(new), batch)
        got["new"].append(loader_rate(make_loader(new, keys, workers), keys, 3))
    (os_, ot), (ns, nt) = (np.mean(got[k], axis=0) for k in ("old", "new"))
    print(f"loader, {workers} workers, batches of {batch}, wall clock: today (12 MP files, workers spawned every "
          f"epoch) {os_:6.1f} images/s steady, {ot:5.1f} with start-up; issue 22 (shards, persistent workers) "
          f"{ns:6.1f} images/s steady, {nt:5.1f} with start-up; ratio {ns / os_:5.1f}x steady, {nt / ot:5.1f}x "
          f"with start-up")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--sections", default="views,items,loader,rain")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--copies", default="8,80", help="rows per 12 MP file and per shard copy in the loaders' tables")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = write_photos(Path(tmp), args.images)
        mb = np.mean([p.stat().st_size for p in paths]) / 2**20
        print(f"{len(paths)} JPEGs of 4000x3000, quality 90, {mb:.2f} MB each (written in "
              f"{time.perf_counter() - t0:.1f} s); view {args.size} px; torch {torch.__version__}")
        if "loader" in sections:  # first: the per-core sections pin this process to one core
            copies = tuple(int(c) for c in args.copies.split(","))
            loaders(paths, Path(tmp) / "loader", args.size, args.workers, args.batch, args.rounds, copies)
        old, new = datasets(paths, Path(tmp) / "items", args.size)
        default_threads = torch.get_num_threads()
        if "rain" in sections:  # before pinning: the default threads use every core
            rain_calls(args.rounds, default_threads)
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
        torch.set_num_threads(1)
        if "views" in sections:
            views(paths, args.size, args.rounds)
        if "items" in sections:
            items(old, new, args.rounds)


if __name__ == "__main__":
    main()
