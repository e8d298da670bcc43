"""Image shards (issue 22): what writing the 320 px copies costs, and how far features move when the model reads them.

    python bench/bench_shards.py decode [--images 200]   # 12 MP JPEGs, one pinned core
    python bench/bench_shards.py cache --images 24     # filter + shard stage, with and without the copy cache
    python bench/bench_shards.py drift  [--sample 300]   # feature cosine, files vs shard copies
    python bench/bench_shards.py e2e    [--images 3000 --image-size 1024]   # end-to-end metrics, both paths

decode: per image, CPU seconds of (a) the filter's own work (``measure_source``: header, draft decode to ~256 px
grey, every metric), (a0) its decode alone, (b) the shard copy as a second decode (``shard_copy``: draft decode to
>= 320 px RGB, Lanczos resize, JPEG q90), and (c) a single decode serving both: (b) + the filter's metric work
without its decode (a - a0) + the grey image taken from the RGB decode (measured). The images are the 4000x3000
quality-90 photos of ``bench_loader.py``.

cache: the filter's per-image work (``measure``: read, sha256, header, draft decode, metrics) and the shard stage's
(``_make_copy``) run on the same 12 MP JPEGs in this process, twice: today's path (the shard stage decodes the
original again) and the copy cache (the filter's decode also writes the copy; the shard stage reads it). CPU seconds
per image, one pinned core; also the filter-made copies against the shard writer's (bytes, mean abs pixel diff) and
the shard writer's copy against the copy before ``COPY_VERSION`` 2 (libjpeg's RGB). Appends to
``bench/results/shards.md``.

drift: the encoders' features of the view the predictor computes from the original file (``load_image`` +
``eval_view``) against the view computed from the shard copy, as cosine similarity, for the cpu-small encoders
(96 px) and the gpu-full architectures (224 px; random init, no weights offline), on the real photos in
tests/data/real_photos larger than the copy, a 1024 px sample world and 12 MP synthetic photos.

e2e: the main job's stages on a sample world of large images, then the model and the evaluation twice on the same
labels, splits and cells: once reading the shards, once reading the original files; prints both reports' numbers.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.export.build import ShardConfig, shard_copy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def cpu_per_image(fn, items) -> float:
    c0 = time.process_time()
    for x in items:
        fn(x)
    return (time.process_time() - c0) / len(items)


def decode_bench(n: int) -> None:
    from bench_loader import write_photos
    from PIL import Image

    from pipeline.core.decode import DEFAULT_MAX_PIXELS, decode, open_image
    from pipeline.filters.metrics import MetricsParams, _shrink, measure_source

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    params, cfg = MetricsParams(), ShardConfig()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = write_photos(Path(tmp), n)
        print(f"{n} JPEGs of 4000x3000 q90, {np.mean([p.stat().st_size for p in paths]) / 2**20:.2f} MB each "
              f"(written in {time.perf_counter() - t0:.0f} s); 1 core")
        blobs = [p.read_bytes() for p in paths]

        def filter_decode_only(data: bytes) -> None:
            decode(open_image(data, DEFAULT_MAX_PIXELS), "L", params.analysis_size, DEFAULT_MAX_PIXELS)

        def rgb_for_copy(data: bytes) -> Image.Image:
            opened = open_image(data, DEFAULT_MAX_PIXELS)
            opened.image.draft("RGB", (cfg.short_side, cfg.short_side))
            return decode(opened, "RGB", None, DEFAULT_MAX_PIXELS)[0]

        rgbs = [rgb_for_copy(b) for b in blobs[:20]]
        a = cpu_per_image(lambda d: measure_source(d, {}, params), blobs)
        a0 = cpu_per_image(filter_decode_only, blobs)
        b = cpu_per_image(lambda d: shard_copy(d, cfg.short_side, cfg.quality), blobs)
        grey = cpu_per_image(lambda im: _shrink(im.convert("L"), params.analysis_size), rgbs)
        c = b + (a - a0) + grey
        print("| per 12 MP image (CPU ms, one core) | ms |\n|---|---:|")
        for k, v in (("(a) filter: header, draft decode to ~256 px grey, all metrics", a),
                     ("(a0) of which its decode", a0),
                     ("(b) shard copy, second decode: draft to >= 320 px RGB, Lanczos, JPEG q90", b),
                     ("(a)+(b) filter, then the shard stage decodes again", a + b),
                     ("(c) one decode for both: (b) + metrics without decode (a - a0) + grey from RGB", c)):
            print(f"| {k} | {v * 1000:.1f} |")
        print(f"single decode saves {(a + b - c) * 1000:.1f} ms of {(a + b) * 1000:.1f} ms per image "
              f"({(a + b - c) / (a + b):.0%}); copy size {np.mean([len(shard_copy(d, 320, 90).jpg) for d in blobs[:10]]) / 1024:.0f} KB")


def _mean_abs_diff(a: bytes, b: bytes) -> float:
    from PIL import Image

    x, y = (np.asarray(Image.open(io.BytesIO(d)).convert("RGB"), np.float64) for d in (a, b))
    return float(np.abs(x - y).mean()) if x.shape == y.shape else float("nan")


def _v1_copy(data: bytes, cfg: ShardConfig) -> bytes:
    """The copy as ``COPY_VERSION`` 1 made it: libjpeg's RGB output at the same draft scale."""
    from pipeline.core.copies import copy_from_rgb
    from pipeline.core.decode import DEFAULT_MAX_PIXELS, decode, open_image

    opened = open_image(data, DEFAULT_MAX_PIXELS)
    opened.image.draft("RGB", (cfg.short_side, cfg.short_side))
    return copy_from_rgb(decode(opened, "RGB", None, DEFAULT_MAX_PIXELS)[0], cfg.spec).jpg


def _metrics_moved(paths: list[Path], plain, with_copies) -> str:
    """How far the filter's metrics move when the copy sets the draft scale: 1600x1200 (metrics alone: 1/4,
    with the copy: 1/2) and 2400x1800 (1/8 vs 1/4); 12 MP photos share the scale and do not move at all."""
    from dataclasses import replace

    from PIL import Image

    from pipeline.filters.metrics import measure_source

    parts = []
    with tempfile.TemporaryDirectory() as scratch:
        copies = replace(with_copies, copy_dir=scratch)
        for size in ((1600, 1200), (2400, 1800)):
            sharp, std, bits = [], [], []
            for p in paths:
                buf = io.BytesIO()
                Image.open(p).resize(size, Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)
                a, b = (measure_source(buf.getvalue(), {"image_id": "0" * 64}, q) for q in (plain, copies))
                sharp.append(abs(b["sharpness"] / a["sharpness"] - 1))
                std.append(abs(b["grey_std"] - a["grey_std"]))
                bits.append(bin(int(a["phash"], 16) ^ int(b["phash"], 16)).count("1"))
            parts.append(f"{size[0]}x{size[1]}: sharpness {np.median(sharp):.1%} median / {max(sharp):.1%} max, "
                         f"grey std {max(std):.2f} max, pHash {max(bits)} of 256 bits max")
    return "; ".join(parts) + f"; {len(paths)} photos each)."


def cache_bench(n: int) -> None:
    from dataclasses import replace

    from bench_loader import write_photos

    from pipeline.core.copies import COPIES_DIR, CopyCache
    from pipeline.core.store import sha256_hex
    from pipeline.export.build import COUNTS, _make_copy
    from pipeline.filters.metrics import MetricsParams, measure

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cfg = ShardConfig()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_photos(root, n)
        items = [(sha256_hex(p.read_bytes()), p) for p in paths]
        plain = MetricsParams(verify_bytes=True)
        with_copies = replace(plain, copy_short_side=cfg.short_side, copy_quality=cfg.quality,
                              copy_dir=str(root / COPIES_DIR))
        cache = CopyCache(root / COPIES_DIR, cfg.spec)
        # warm-up (imports, first-call costs) on both paths, its copy in a scratch folder
        measure(items[0][1], items[0][0], replace(with_copies, copy_dir=str(root / "scratch")))
        measure(items[0][1], items[0][0], plain)
        shard_copy(items[0][1].read_bytes(), cfg.short_side, cfg.quality)
        runs = {}
        for label, params in (("today: the shard stage decodes again", plain),
                              ("copy cache: one decode in the filter", with_copies)):
            counts = dict.fromkeys(COUNTS, 0)
            f = cpu_per_image(lambda it: measure(it[1], it[0], params), items)
            s = cpu_per_image(lambda it: _make_copy(root, cache, it[0], it[1].name, cfg.short_side, cfg.quality,
                                                    counts), items)
            runs[label] = (f, s, dict(counts))
        made = [cache.get(i)[0] for i, _ in items]
        shard = [shard_copy(p.read_bytes(), cfg.short_side, cfg.quality).jpg for _, p in items]
        same = sum(c is not None and c.jpg == b for c, b in zip(made, shard))
        mad = max(_mean_abs_diff(c.jpg, b) for c, b in zip(made, shard) if c is not None)
        v1 = float(np.mean([_mean_abs_diff(b, _v1_copy(p.read_bytes(), cfg)) for b, (_, p) in zip(shard, items)]))
        moved = _metrics_moved([p for _, p in items[:12]], plain, with_copies)
    (f0, s0, _), (f1, s1, c1) = runs.values()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"Copy cache bench (bench_shards.py cache --images {n}), {when}:"
             f" {n} JPEGs of 4000x3000 q90, CPU ms per image, one pinned core, both paths in one process.", "",
             "| path | filter stage | shard stage | total |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {f * 1e3:.1f} | {s * 1e3:.1f} | {(f + s) * 1e3:.1f} |" for k, (f, s, _) in runs.items()]
    lines += ["", f"Saves {(f0 + s0 - f1 - s1) * 1e3:.1f} ms of {(f0 + s0) * 1e3:.1f} ms per image "
              f"({(f0 + s0 - f1 - s1) / (f0 + s0):.0%}); the filter pays {(f1 - f0) * 1e3:.1f} ms more per image "
              f"(RGB planes, Lanczos, JPEG, two atomic writes; also for images it then rejects). Shard stage counts "
              f"with the cache: {c1}.",
              f"Filter-made copy vs the shard writer's: {same}/{n} byte-identical, max mean abs pixel diff {mad:.3f}; "
              f"copy v2 (Pillow YCbCr->RGB) vs v1 (libjpeg RGB): mean abs pixel diff {v1:.3f} levels.",
              f"Metrics where the copy needs a larger draft than the metrics (the same photos at {moved}", ""]
    text = "\n".join(lines)
    print(text)
    out = REPO / "bench" / "results" / "shards.md"
    with open(out, "a") as fh:
        fh.write(text + "\n")


def _views(paths: list[Path], size: int, cfg: ShardConfig):
    """(original-path views, shard-path views) of every image, as the predictor and the shard reader compute them."""
    import torch

    from geopak_model.data import eval_view, load_image

    orig, shard = [], []
    for p in paths:
        data = p.read_bytes()
        try:  # some real photos are broken on purpose (tests/data/real_photos/README.md): not for this bench
            orig.append(eval_view(load_image(io.BytesIO(data), size), size))
        except OSError:
            continue
        copy = shard_copy(data, cfg.short_side, cfg.quality).jpg
        shard.append(eval_view(load_image(io.BytesIO(copy), size), size))
    return torch.stack(orig), torch.stack(shard)


def _features(preset_name: str, x) -> tuple:
    import torch

    from geopak_model.config import preset
    from geopak_model.encoders import build_encoders

    random_init = {"clip_pretrained": "", "scene_weights": "", "clip_activation": "quick_gelu"}  # no weights offline
    enc = build_encoders(preset(preset_name, encoder=random_init).encoder if preset_name == "gpu-full"
                         else preset(preset_name).encoder).eval()
    with torch.no_grad():
        out = [enc(x[i: i + 32]) for i in range(0, len(x), 32)]
    return torch.cat([o[0] for o in out]).float(), torch.cat([o[1] for o in out]).float()


def drift_bench(n_sample: int, quality: int) -> None:
    import torch
    import torch.nn.functional as F

    from pipeline.core.store import ImageStore
    from pipeline.sources.sample_world.config import SampleWorldConfig
    from pipeline.sources.sample_world.generate import generate_sample_world

    torch.set_num_threads(2)
    cfg = ShardConfig(quality=quality)
    with tempfile.TemporaryDirectory() as tmp:
        real = [p for p in sorted((REPO / "tests" / "data" / "real_photos").glob("*.jp*g"))
                if _short_side(p) > cfg.short_side]
        world = Path(tmp) / "world"
        generate_sample_world(SampleWorldConfig(n_images=n_sample, image_size=1024, defect_fraction=0.0),
                              ImageStore(world))
        sample = sorted((world / "images").rglob("*.jpg"))[:n_sample]
        from bench_loader import write_photos

        big = write_photos(Path(tmp), 12)
        sets = {"real photos (tests/data/real_photos, short side > 320)": real,
                "sample world, 1024 px": [p for p in sample if _short_side(p) > cfg.short_side],
                "synthetic 12 MP (bench_loader)": big}
        print(f"copy: short side {cfg.short_side}, JPEG quality {cfg.quality}")
        print("| images | n | encoders (size) | clip cos mean / min | scene cos mean / min | view PSNR dB |")
        print("|---|---:|---|---|---|---:|")
        for name, paths in sets.items():
            for preset_name, size in (("cpu-small", 96), ("gpu-full", 224)):
                a, b = _views(paths, size, cfg)
                mse = ((a - b) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
                psnr = float((10 * torch.log10(1 / mse)).mean())
                fa, fb = _features(preset_name, a), _features(preset_name, b)
                cos = [F.cosine_similarity(u, v, dim=1) for u, v in zip(fa, fb)]
                print(f"| {name} | {len(a)} | {preset_name} ({size} px) | {float(cos[0].mean()):.4f} / "
                      f"{float(cos[0].min()):.4f} | {float(cos[1].mean()):.4f} / {float(cos[1].min()):.4f} | "
                      f"{psnr:.1f} |")


def _short_side(p: Path) -> int:
    from PIL import Image

    with Image.open(p) as im:
        return min(im.size)


def e2e_bench(n: int, image_size: int, data: Path | None) -> None:
    """Run the main job's stages once, then model + evaluation from the shards and from the files."""
    import shutil

    import dagster as dg

    from pipeline.defs import evaluation, filtering, geocells, ingest, labels, model, shards
    from tests.conftest import asset_resources

    root = data or Path(tempfile.mkdtemp(prefix="shard_e2e_"))
    boundaries = REPO / "pipeline" / "data"
    bpath = next(boundaries.glob("*.geojson"))
    mods = [ingest, filtering, labels, geocells, shards]
    from pipeline.defs.resources import TorchrunResource

    res = {**asset_resources(root, bpath), "torchrun": TorchrunResource(),
           "pipes_subprocess_client": dg.PipesSubprocessClient()}
    if not (root / "shards" / "manifest.json").exists():  # a data root given again reuses its upstream stages
        t0 = time.perf_counter()
        up = dg.materialize([*dg.load_assets_from_modules(mods), *dg.load_asset_checks_from_modules(mods)],
                            resources=res, run_config={"ops": {"sample_world_images": {"config": {
                                "n_images": n, "image_size": image_size}}}})
        assert up.success
        print(f"upstream stages + shards: {time.perf_counter() - t0:.0f} s, data root {root}")
    sources = [a.to_source_asset() for m in mods for a in dg.load_assets_from_modules([m])
               if isinstance(a, dg.AssetsDefinition)]
    targets = [model.embedding_cache, model.geopak_model, evaluation.evaluation_report]
    results = {}
    for label in ("shards", "files"):
        if label == "files":
            shutil.move(str(root / "shards"), str(root / "shards.off"))
        for d in ("embeddings", "model", "evaluation"):
            shutil.rmtree(root / d, ignore_errors=True)
        t0 = time.perf_counter()
        r = dg.materialize([*sources, *targets], resources=res, selection=targets)
        assert r.success
        md = r.asset_materializations_for_node("evaluation_report")[0].metadata
        results[label] = (md, time.perf_counter() - t0)
        print(f"--- {label}: {results[label][1]:.0f} s")
        for k in ("end_to_end_median_km", "test_images", "distance_errors", "classification"):
            if k in md:
                print(f"{k}: {md[k].value}")
    shutil.move(str(root / "shards.off"), str(root / "shards"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["decode", "cache", "drift", "e2e"])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--sample", type=int, default=300)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--data-root", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.what == "decode":
        decode_bench(args.images)
    elif args.what == "cache":
        cache_bench(args.images)
    elif args.what == "drift":
        drift_bench(args.sample, args.quality)
    else:
        e2e_bench(args.images, args.image_size, args.data_root)


if __name__ == "__main__":
    main()
