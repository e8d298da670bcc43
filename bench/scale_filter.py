"""Scale bench section (issue 13): filter throughput on 12 MP JPEGs (4000 x 3000), old paths vs the new one.

Makes ``--images`` synthetic photos (gradient sky and ground, colour field, shapes, fine texture and sensor noise;
quality 90; every fourth stored rotated with EXIF orientation 6) in a temp folder it deletes, then measures, in this
process and on ``--workers`` spawned processes (started and warmed before timing, so start-up is not counted):

- ``full decode``: one full-size decode per image, then reduced (the path the issue assumed);
- ``today``: the path before this change: PIL reads the file itself, draft-mode decode, no hash;
- ``new``: one read of the file into memory, sha256 against the image_id, header and draft-mode decode from that
  buffer (``pipeline.filters.metrics.measure`` as ``cached_metrics`` runs it);
- ``new via measure_many``: the stage's own fan-out (this process + spawned workers, their start-up included).

Rounds alternate the variants (the machine is shared, so each variant's best round is reported) and the rows of
the three are compared: draft vs full decode within tolerance, today vs new identical.
Rates are given twice: wall clock on this (shared) machine, and from the CPU seconds the workers spent, i.e. what
``--workers`` cores of one's own would do. Prints one JSON object per line on stdout (the ``bench/bench_scale.py``
interface): measured rows for the images made, and rows for ``--sizes`` extrapolated from the new path's CPU-time
rate. Everything else goes to stderr.

Usage: python bench/scale_filter.py [--images 96] [--workers 2] [--rounds 3] [--sizes 1000000,10000000] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageDraw

from pipeline.filters.metrics import MetricsParams, measure, measure_many, measure_source


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def photo(rng: np.random.Generator, w: int, h: int, texture: np.ndarray) -> Image.Image:
    """A photo-like RGB picture: sky-to-ground gradient, a coarse colour field, filled shapes at low resolution,
    upscaled, then fine texture and sensor noise at full resolution."""
    lw, lh = w // 4, h // 4
    y = np.linspace(0.0, 1.0, lh, dtype=np.float32)[:, None, None]
    base = rng.uniform(60, 230, 3).astype(np.float32) * (1 - y) + rng.uniform(20, 200, 3).astype(np.float32) * y
    field = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((lw, lh), Image.Resampling.BICUBIC)
    small = Image.fromarray(np.clip(0.6 * base + 0.4 * np.asarray(field, np.float32), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(small)
    for _ in range(int(rng.integers(8, 20))):
        x0, y0 = int(rng.integers(0, lw)), int(rng.integers(0, lh))
        box = [x0, y0, x0 + int(rng.integers(20, lw // 3)), y0 + int(rng.integers(20, lh // 3))]
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=colour)
    big = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), np.int16)
    oy, ox = int(rng.integers(0, texture.shape[0] - h + 1)), int(rng.integers(0, texture.shape[1] - w + 1))
    big = big + texture[oy : oy + h, ox : ox + w, None]
    return Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))


def make_jpegs(folder: Path, n: int, w: int, h: int, seed: int = 0) -> list[tuple[str, str]]:
    """(image_id, path) of ``n`` quality-90 JPEGs; every fourth is stored rotated with EXIF orientation 6."""
    rng = np.random.default_rng(seed)
    tex = np.asarray(Image.fromarray(rng.normal(0, 1, (h // 2 + 32, w // 2 + 32)).astype(np.float32), "F")
                     .resize((w + 64, h + 64), Image.Resampling.BILINEAR))
    texture = np.clip(6 * tex + rng.normal(0, 2.5, tex.shape), -40, 40).astype(np.int16)
    items = []
    for i in range(n):
        img = photo(rng, w, h, texture)
        kw = {}
        if i % 4 == 3:
            img = img.transpose(Image.Transpose.ROTATE_90)  # stored on its side; orientation 6 turns it upright
            exif = Image.Exif()
            exif[ExifTags.Base.Orientation] = 6
            kw["exif"] = exif
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90, **kw)
        data = buf.getvalue()
        path = folder / f"img{i:05d}.jpg"
        path.write_bytes(data)
        items.append((hashlib.sha256(data).hexdigest(), str(path)))
    return items


# ------------------------------------------------------------------- the variants (top level: spawned workers call them)
def run_full(chunk: list[tuple[str, str]], params: MetricsParams) -> list[dict]:
    return [measure_source(p, {"image_id": i, "key": params.key}, params, draft=False) for i, p in chunk]


def run_today(chunk: list[tuple[str, str]], params: MetricsParams) -> list[dict]:
    return [measure_source(p, {"image_id": i, "key": params.key}, params) for i, p in chunk]


def run_new(chunk: list[tuple[str, str]], params: MetricsParams) -> list[dict]:
    return [measure(p, i, params) for i, p in chunk]


VARIANTS = {"full decode": run_full, "today": run_today, "new": run_new}


def run_variant(name: str, chunk: list[tuple[str, str]], params: MetricsParams) -> tuple[list[dict], float]:
    """Worker task: the rows and the CPU seconds this process spent on them."""
    t0 = time.process_time()
    rows = VARIANTS[name](chunk, params)
    return rows, time.process_time() - t0


def timed_pool(pool, name: str, items: list[tuple[str, str]], params: MetricsParams,
               chunk: int) -> tuple[float, float, list[dict]]:
    """(wall seconds, CPU seconds summed over the workers, rows) for one variant over every item."""
    chunks = [items[k : k + chunk] for k in range(0, len(items), chunk)]
    t0 = time.perf_counter()
    parts = list(pool.map(run_variant, [name] * len(chunks), chunks, [params] * len(chunks)))
    wall = time.perf_counter() - t0
    return wall, sum(c for _, c in parts), [r for rows, _ in parts for r in rows]


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # largest finished child (pools shut down)
    return round(max(own, kids) / 1024, 1)


def compare(today: list[dict], new: list[dict], full: list[dict]) -> str:
    keys = ("width", "height", "orientation", "analysis_width", "analysis_height", "sharpness", "grey_std",
            "grey_range", "phash", "error")
    same = all(all(a.get(k) == b.get(k) for k in keys) for a, b in zip(today, new))
    from pipeline.filters.dedup import hash_matrix

    rel = [abs(a["sharpness"] - b["sharpness"]) / max(b["sharpness"], 1e-9) for a, b in zip(new, full)]
    dstd = [abs(a["grey_std"] - b["grey_std"]) for a, b in zip(new, full)]
    hd = [int(np.bitwise_count(hash_matrix([a["phash"]]) ^ hash_matrix([b["phash"]])).sum()) for a, b in zip(new, full)]
    return (f"new vs today: metrics {'identical' if same else 'DIFFERENT'}; draft vs full decode: sharpness median "
            f"rel. diff {np.median(rel):.1%}, grey std median abs diff {np.median(dstd):.2f}, pHash distance median "
            f"{np.median(hd):.0f} / max {max(hd)} of 256 bits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="1000000,10000000", help="image counts to extrapolate to")
    ap.add_argument("--quick", action="store_true", help="8 images of 2000 x 1500, one round (smoke test)")
    args = ap.parse_args()
    n, (w, h), rounds = (8, (2000, 1500), 1) if args.quick else (args.images, (4000, 3000), args.rounds)
    label = "12 MP" if (w, h) == (4000, 3000) else f"{w * h / 1e6:.0f} MP (quick)"
    stage = f"filter, {label} JPEG"

    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    params = MetricsParams()
    verified = MetricsParams(verify_bytes=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        items = make_jpegs(Path(tmp), n, w, h)
        mb = sum(Path(p).stat().st_size for _, p in items) / n / 1e6
        log(f"made {n} JPEGs of {w}x{h} (q90, mean {mb:.2f} MB) in {time.perf_counter() - t0:.1f} s")
        best: dict[str, float] = {}
        cpu: dict[str, float] = {}
        rows: dict[str, list[dict]] = {}
        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            for name in VARIANTS:  # start and warm every worker (imports) before any timing
                list(pool.map(run_variant, [name] * args.workers, [items[:1]] * args.workers,
                              [verified] * args.workers))
            for r in range(rounds):
                for name in VARIANTS:
                    t, c, out = timed_pool(pool, name, items, verified if name == "new" else params, 4)
                    best[name] = min(best.get(name, t), t)
                    cpu[name] = min(cpu.get(name, c), c)
                    rows[name] = out
                    log(f"round {r + 1} {name}: {n / t:.1f} images/s wall, {n / c:.1f} images per CPU-second")
        rss = peak_rss_mb()
        measure_many(items[:1], verified, workers=1)  # warm this process
        t0 = time.perf_counter()
        via = measure_many(items, verified, workers=args.workers, chunk_size=4, min_pool_items=0)
        t_via = time.perf_counter() - t0
    assert all(r.get("error") is None for r in via + rows["new"]), "a synthetic image failed to measure"
    note_cmp = compare(rows["today"], rows["new"], rows["full decode"])
    log(note_cmp)
    rate = {k: n / v for k, v in best.items()}
    # the machine is shared: CPU seconds per image say what `workers` cores of our own would do
    core_rate = {k: args.workers * n / v for k, v in cpu.items()}
    load = os.getloadavg()[0]
    where = (f"{args.workers} worker processes, {label} q90 JPEGs of {mb:.2f} MB, load average {load:.1f} on "
             f"{os.cpu_count()} cores")

    def rates(k: str) -> str:
        return f"{rate[k]:.1f} images/s wall; {core_rate[k]:.1f} images/s on {args.workers} free cores (from CPU time)"
    out = [
        {"stage": f"{stage}: full-size decode (reference)", "size": n, "seconds": round(best["full decode"], 3),
         "peak_rss_mb": rss, "measured": True, "note": f"{rates('full decode')}; {where}",
         "baseline_seconds": None},
        {"stage": f"{stage}: today (draft decode, PIL reads the file)", "size": n, "seconds": round(best["today"], 3),
         "peak_rss_mb": rss, "measured": True, "note": f"{rates('today')}; {where}",
         "baseline_seconds": None},
        {"stage": f"{stage}: new (one read, sha256 check, draft decode)", "size": n, "seconds": round(best["new"], 3),
         "peak_rss_mb": rss, "measured": True,
         "note": f"{rates('new')}; {where}; {best['today'] / best['new']:.2f}x today, "
                 f"{best['full decode'] / best['new']:.2f}x full decode (CPU: {cpu['today'] / cpu['new']:.2f}x, "
                 f"{cpu['full decode'] / cpu['new']:.2f}x); {note_cmp}",
         "baseline_seconds": round(best["today"], 3)},
        {"stage": f"{stage}: new via measure_many (start-up included)", "size": n, "seconds": round(t_via, 3),
         "peak_rss_mb": peak_rss_mb(), "measured": True,
         "note": f"{n / t_via:.1f} images/s, this process + {args.workers - 1} spawned", "baseline_seconds": None},
    ]
    for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
        out.append({"stage": f"{stage}: new", "size": size, "seconds": round(size / core_rate["new"], 1),
                    "peak_rss_mb": None, "measured": False,
                    "note": f"extrapolated from {core_rate['new']:.1f} images/s on {args.workers} free cores (CPU "
                            f"time on {n} images): {size / core_rate['new'] / 3600:.1f} h; today's path "
                            f"{size / core_rate['today'] / 3600:.1f} h, full decode "
                            f"{size / core_rate['full decode'] / 3600:.1f} h",
                    "baseline_seconds": round(size / core_rate["today"], 1)})
    for row in out:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
