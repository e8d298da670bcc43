"""GPU readiness check: what one GPU does with the gpu-full model (CLIP ViT-B/16 + ResNet-50 Places365 + heads,
random weights: nothing is downloaded), measured the way a first, short GPU loan can afford.

    python bench/gpu_check.py --quick --out bench/results/gpu_check        # on a CUDA machine, < 8 min on an H100
    torchrun --standalone --nproc_per_node=1 bench/gpu_check.py --quick --out DIR   # the same (it re-launches
                                                                           # itself under torchrun when needed)
    python bench/gpu_check.py --cpu-dry-run --out DIR   # every step on CPU (gloo, test-tiny sizes): proves the
                                                        # script, not the GPU; tests/test_gpu_check.py runs it

It always runs as a torchrun rank, so ``geopak_model.distributed.setup_runtime`` starts a process group at world size 1
(NCCL on CUDA, gloo on CPU), exactly as training under ``torchrun --nproc_per_node=1`` does. Steps (one failing is
reported and the others still run):

1. ``model_step``: a resident batch through the full model, bf16 autocast, forward + backward of phase 2's
   trainable set (top 30 % of CLIP, ResNet layer4, all heads) with the real loss, timed with CUDA events after
   warm-up (``perf_counter`` on CPU); FLOPs from ``torch.utils.flop_counter.FlopCounterMode``, MFU against the
   card's dense bf16 peak (``PEAKS``), peak memory.
2. ``encoders``: both encoders at batch >= 256, channels_last, in bf16 autocast and in fp32 with TF32 (and
   ``torch.compile``d with ``--compile``): images/s, as the embedding cache computes features.
3. ``loader``: augmented 224 px training batches from a WebDataset shard of short-side-320 copies through
   ``make_loader`` with N persistent workers and pinned memory, copied to the device: steady images/s and the
   workers' start-up.
4. ``ddp_step``: the model wrapped in DistributedDataParallel on the process group, one forward + backward + AdamW
   step (the gradient all-reduce runs on NCCL), plus a timed all_reduce on the collective device.

It writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``. Exit code 0 when every step passed, 1 when one
failed, 2 when CUDA is absent (without ``--cpu-dry-run``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# Dense (no 2:4 sparsity) bf16 Tensor Core peaks in TFLOPS; NVIDIA quotes them "with sparsity", i.e. twice these.
# (device-name pattern, card, dense bf16 TFLOPS, source). First match wins, so NVL and PCIe come before the rest.
PEAKS: list[tuple[str, str, float, str]] = [
    (r"H200.*NVL", "H200 NVL", 835.5, "NVIDIA H200 datasheet: BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    (r"H200", "H200 SXM", 989.5, "NVIDIA H200 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity (the H100 SXM's "
                                 "compute; dense 989.4 in NVIDIA's Hopper whitepaper)"),
    (r"H100.*NVL", "H100 NVL", 835.5, "NVIDIA H100 datasheet: H100 NVL BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    (r"H100.*PCIe", "H100 PCIe", 756.5, "NVIDIA H100 datasheet: H100 PCIe BF16 Tensor Core 1,513 TFLOPS with "
                                        "sparsity ('specifications 1/2 lower without sparsity')"),
    (r"H100", "H100 SXM", 989.4, "NVIDIA H100 datasheet: H100 SXM BF16 Tensor Core 1,979 TFLOPS with sparsity; "
                                 "NVIDIA Hopper whitepaper: 989.4 dense"),
    (r"A100", "A100 (SXM4 or PCIe)", 312.0, "NVIDIA A100 datasheet: BFLOAT16 Tensor Core 312 TFLOPS (624 with "
                                            "sparsity)"),
    (r"\bL4\b", "L4", 121.0, "NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity"),
]
NOMINAL_CPU_PEAK = 1.0  # TFLOPS: --cpu-dry-run computes an MFU against it only so that the arithmetic runs
PREFETCH = 4  # batches each loader worker keeps ready (make_loader's default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--quick", action="store_true", help="fewer timed iterations and images (< 8 min on an H100)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="every step on CPU with test-tiny sizes and gloo")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd encoders")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (the test: aot_eager)")
    ap.add_argument("--batch", type=int, default=0, help="model-step batch (default 64; dry run 8)")
    ap.add_argument("--encoder-batch", type=int, default=256, help="encoder-throughput batch (>= 256)")
    ap.add_argument("--workers", type=int, default=0, help="loader workers (default min(8, CPUs - 2); dry run 2)")
    ap.add_argument("--cells", type=int, default=0, help="geocells of the synthetic cell table (default 1946: "
                                                         "the 1M-image sample world's; dry run 28)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak to use instead of PEAKS")
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def peak_for(name: str) -> tuple[str, float, str] | None:
    """(card, dense bf16 TFLOPS, source) of the first ``PEAKS`` entry whose pattern is in ``name``."""
    for pattern, card, tflops, source in PEAKS:
        if re.search(pattern, name):
            return card, tflops, source
    return None


# --- timing -----------------------------------------------------------------------------------------------------
class Timer:
    """Seconds of GPU work between ``start`` and ``stop`` with CUDA events (what the device did, not what the host
    queued), or of wall clock on CPU."""

    def __init__(self, device: Any):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self.cuda \
            else None
        self._t0 = 0.0

    def start(self) -> None:
        if self._events:
            self._events[0].record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self._events:
            import torch

            self._events[1].record()
            torch.cuda.synchronize()
            return self._events[0].elapsed_time(self._events[1]) / 1000.0
        return time.perf_counter() - self._t0


def timed(fn: Callable[[], Any], device: Any, warmup: int, iters: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls (cuDNN autotuning, allocator, lazy init)."""
    for _ in range(warmup):
        fn()
    timer = Timer(device)
    timer.start()
    for _ in range(iters):
        fn()
    return timer.stop() / iters


# --- the model ----------------------------------------------------------------------------------------------------
def config(args: argparse.Namespace) -> Any:
    """gpu-full with random-initialised encoders (test-tiny for the dry run)."""
    from geopak_model.config import preset

    name = "test-tiny" if args.cpu_dry_run else "gpu-full"
    return preset(name, encoder={"clip_pretrained": "", "scene_weights": ""})


def synthetic_cells(n: int) -> Any:
    """A cell table with ``n`` cells spread over the 7 provinces (heads as wide as a real run's)."""
    import numpy as np
    import pandas as pd

    from geopak_model.cells import CellTable

    rng = np.random.default_rng(0)
    province = np.sort(rng.integers(0, 7, n))
    local = np.concatenate([np.arange((province == p).sum()) for p in range(7)])
    df = pd.DataFrame({"cell_id": np.arange(n), "province_id": province, "local_id": local,
                       "center_lat": rng.uniform(24.5, 36.5, n), "center_lon": rng.uniform(61.5, 76.5, n),
                       "radius_km": rng.uniform(2.0, 50.0, n)})
    return CellTable.from_frames(df)


def build(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """The phase-2 model (encoders + heads, phase 2's trainable set), its loss context and a resident batch."""
    import torch

    from geopak_model.encoders import build_encoders
    from geopak_model.losses import LossContext
    from geopak_model.model import GeopakHeads, GeopakModel

    cfg = config(args)
    cells = synthetic_cells(args.cells or (28 if args.cpu_dry_run else 1946))
    t0 = time.perf_counter()
    encoder = build_encoders(cfg.encoder)
    torch.manual_seed(0)
    heads = GeopakHeads(cells, *encoder.dims, cfg.model)
    model = GeopakModel(encoder, heads)
    encoder.unfreeze_top(cfg.encoder.unfreeze_fraction)  # phase 2's trainable set, as training runs it
    model = model.to(device, memory_format=torch.channels_last)
    ctx = LossContext.build(cells, None, cfg.loss).to(device)
    b = args.batch or (8 if args.cpu_dry_run else 64)
    g = torch.Generator().manual_seed(1)
    cell = torch.randint(0, cells.n_cells, (b,), generator=g)
    batch = {"image": torch.rand((b, 3, cfg.encoder.image_size, cfg.encoder.image_size), generator=g),
             "province_id": torch.from_numpy(cells.province_id[cell.numpy()]).long(), "cell_id": cell,
             "lat": torch.from_numpy(cells.center_lat[cell.numpy()]).float(),
             "lon": torch.from_numpy(cells.center_lon[cell.numpy()]).float(),
             "koppen_id": torch.randint(1, 30, (b,), generator=g),
             "doy_sin": torch.rand(b, generator=g) * 2 - 1, "doy_cos": torch.rand(b, generator=g) * 2 - 1}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    return {"cfg": cfg, "cells": cells, "model": model, "ctx": ctx, "batch": batch,
            "build_seconds": round(time.perf_counter() - t0, 2)}


def train_step_fn(parts: dict[str, Any], device: Any, net: Any = None) -> Callable[[], Any]:
    """One bf16 forward + backward of the real loss on the resident batch (gradients dropped before each)."""
    from geopak_model.losses import loss_terms
    from geopak_model.precision import autocast

    import torch

    net = net or parts["model"]
    b, ctx, cfg = parts["batch"], parts["ctx"], parts["cfg"]
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else None

    def step() -> Any:
        net.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            out = net(b["image"], b["province_id"], b["cell_id"])
            loss, _ = loss_terms(out, b, ctx, cfg.loss)
        loss.backward()
        return loss

    return step


def step_model(args: argparse.Namespace, device: Any, parts: dict[str, Any], peak: tuple[str, float, str] | None
               ) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from geopak_model.model import count_params

    parts["model"].train()  # the scene encoder keeps its BatchNorm statistics frozen, as in phase 2
    step = train_step_fn(parts, device)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    quick = args.quick or args.cpu_dry_run
    seconds = timed(step, device, warmup=3 if quick else 5, iters=(3 if args.cpu_dry_run else 10) if quick else 30)
    b = parts["batch"]["image"].shape[0]
    achieved = flops / seconds / 1e12
    out: dict[str, Any] = {
        "batch": b, "image_size": parts["cfg"].encoder.image_size, "precision": "bf16 autocast" if cuda else "fp32",
        "trainable_parameters": count_params(parts["model"], True), "parameters": count_params(parts["model"]),
        "cells": parts["cells"].n_cells, "flops_per_step": flops, "gflops_per_image": round(flops / b / 1e9, 2),
        "step_ms": round(seconds * 1000, 2), "images_per_s": round(b / seconds, 1),
        "achieved_tflops": round(achieved, 4), "build_seconds": parts["build_seconds"],
        "timing": "CUDA events after warm-up" if cuda else "perf_counter after warm-up"}
    if peak is not None:
        out.update({"peak_tflops": peak[1], "peak_card": peak[0], "mfu": round(achieved / peak[1], 4)})
    else:
        out.update({"peak_tflops": None, "mfu": None, "note": "no dense bf16 peak known for this card"})
    if cuda:
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


@contextlib.contextmanager
def tf32() -> Iterator[None]:
    """TF32 for float32 matmuls and convolutions (the new ``fp32_precision`` API only: mixing it with the legacy
    ``allow_tf32`` flags is an error in this torch), restored after."""
    import torch

    m, c = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = m.fp32_precision, c.fp32_precision
    m.fp32_precision, c.fp32_precision = "tf32", "tf32"
    try:
        yield
    finally:
        m.fp32_precision, c.fp32_precision = saved


def step_encoders(args: argparse.Namespace, device: Any, parts: dict[str, Any]) -> dict[str, Any]:
    import torch

    from geopak_model.precision import autocast

    encoder = parts["model"].encoder.eval()
    size = parts["cfg"].encoder.image_size
    bs = max(256, args.encoder_batch)
    x = torch.rand((bs, 3, size, size), device=device).contiguous(memory_format=torch.channels_last)
    cuda = torch.device(device).type == "cuda"
    bf16 = torch.bfloat16 if cuda else None
    quick = args.quick or args.cpu_dry_run
    warmup, iters = (1, 2) if args.cpu_dry_run else ((2, 5) if quick else (3, 20))
    modes: dict[str, tuple[Any, torch.dtype | None]] = {"bf16_autocast": (encoder, bf16), "fp32_tf32": (encoder, None)}
    compile_s = None
    if args.compile:
        t0 = time.perf_counter()
        compiled = torch.compile(encoder, backend=args.compile_backend)
        with torch.no_grad(), autocast(device, bf16):
            compiled(x)  # compiles
        if cuda:
            torch.cuda.synchronize()
        compile_s = round(time.perf_counter() - t0, 1)
        modes[f"bf16_compiled_{args.compile_backend}"] = (compiled, bf16)
    out: dict[str, Any] = {"batch": bs, "image_size": size, "memory_format": "channels_last"}
    if not cuda:
        out["note"] = "CPU: no autocast and no TF32, every mode runs in float32"
    for name, (fn, dtype) in modes.items():
        with torch.no_grad(), (tf32() if name == "fp32_tf32" else contextlib.nullcontext()):
            def forward() -> Any:
                with autocast(device, dtype):
                    return fn(x)

            seconds = timed(forward, device, warmup, iters)
        out[f"{name}_images_per_s"] = round(bs / seconds, 1)
    if compile_s is not None:
        out["compile_seconds"] = compile_s
    return out


def step_loader(args: argparse.Namespace, device: Any, work: Path) -> dict[str, Any]:
    """``make_loader`` over a shard of short-side-320 copies, batches copied to the device."""
    import numpy as np
    import torch
    from PIL import Image

    from bench_loader import EpochKeys, datasets, photo
    from geopak_model.data import make_loader, tensors_to

    workers = args.workers or (2 if args.cpu_dry_run else max(1, min(8, (os.cpu_count() or 2) - 2)))
    n_files = 16 if args.cpu_dry_run else 64
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n_files):  # 640x480 camera-like JPEGs; the shard holds their 427x320 copies
        p = work / f"photo_{i:03d}.jpg"
        Image.fromarray(photo(rng, 640, 480)).save(p, "JPEG", quality=90)
        paths.append(p)
    copies = 16 if args.cpu_dry_run else (50 if args.quick else 100)
    _, ds = datasets(paths, work / "root", 224, copies=copies)
    batch_size = 32 if args.cpu_dry_run else 64
    keys = EpochKeys(len(ds), batch_size)
    cuda = torch.device(device).type == "cuda"
    # the first workers x prefetch batches may have been made while the workers started: the steady rate counts
    # only the batches after them
    skip = workers * PREFETCH
    t0 = time.perf_counter()
    loader = make_loader(ds, keys, workers, pin_memory=cuda, prefetch_batches=PREFETCH)
    first, seen, n, t_steady = None, 0, 0, 0.0
    epochs = 3 if args.cpu_dry_run else 2
    for epoch in range(epochs):
        keys.set_epoch(epoch)
        for batch in loader:
            tensors_to(batch, torch.device(device))
            seen += 1
            if first is None:
                first = time.perf_counter() - t0
            if seen == skip:
                if cuda:
                    torch.cuda.synchronize()
                t_steady = time.perf_counter()
            elif seen > skip:
                n += int(batch["image"].shape[0])
    if cuda:
        torch.cuda.synchronize()
    steady = n / (time.perf_counter() - t_steady) if n else None
    del loader
    return {"workers": workers, "persistent_workers": True, "prefetch_batches_per_worker": PREFETCH,
            "pin_memory": cuda, "batch": batch_size, "batches": seen, "timed_batches": max(0, seen - skip),
            "steady_images_per_s": None if steady is None else round(steady, 1),
            "first_batch_seconds": round(float(first or 0.0), 2),
            "view": "augmented 224 px from 320 px shard copies, copied to the device"}


def step_ddp(device: Any, parts: dict[str, Any], env: Any) -> dict[str, Any]:
    """One DDP training step on the process group, and one timed all_reduce on its collective device."""
    import torch
    import torch.distributed as dist
    from torch import nn

    model = parts["model"].train()
    net = nn.parallel.DistributedDataParallel(model, device_ids=[torch.device(device).index or 0]
                                              if torch.device(device).type == "cuda" else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    probe = next(p for p in model.heads.parameters() if p.requires_grad)
    before = probe.detach().clone()
    step = train_step_fn(parts, device, net)
    timer = Timer(device)
    timer.start()
    loss = step()
    opt.step()
    seconds = timer.stop()
    grads = sum(1 for p in model.parameters() if p.requires_grad and p.grad is not None)
    t = torch.ones(1 << 20, device=env.device)
    timer.start()
    dist.all_reduce(t)
    reduce_s = timer.stop()
    if not torch.isfinite(loss) or torch.equal(before, probe.detach()):
        raise RuntimeError("the DDP step did not update the model (loss or parameters unchanged)")
    return {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "step_ms": round(seconds * 1000, 1),
            "loss": round(float(loss.detach()), 4), "parameters_with_gradients": grads,
            "all_reduce_4mb_ms": round(reduce_s * 1000, 3), "collective_device": str(env.device)}


# --- report -------------------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check: {report['device']['name']}", "",
             f"{report['when']}, torch {report['device']['torch']}, CUDA {report['device']['cuda']}, "
             f"{'quick' if report['quick'] else 'full'}{', CPU dry run' if report['cpu_dry_run'] else ''}; "
             f"{report['seconds']} s in all.", "",
             "| step | status | seconds | figures |", "|---|---|---:|---|"]
    for name, step in report["steps"].items():
        figures = ", ".join(f"{k} {v}" for k, v in step.items() if k not in ("status", "seconds", "error"))
        status = step["status"] if step["status"] == "ok" else f"FAILED: {step.get('error', '')}"
        lines.append(f"| {name} | {status} | {step.get('seconds', '')} | {figures} |")
    lines += ["", "Dense bf16 peaks used for MFU (NVIDIA quotes them with 2:4 sparsity, i.e. doubled):", "",
              "| card | dense bf16 TFLOPS | source |", "|---|---:|---|"]
    lines += [f"| {card} | {tflops} | {source} |" for _, card, tflops, source in PEAKS]
    return "\n".join(lines) + "\n"


def relaunch_under_torchrun(argv: list[str]) -> int:
    """This script as rank 0 of ``torchrun --standalone --nproc_per_node=1`` (a process group at world size 1,
    as a one-GPU training run has); its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__, *argv]
    log("not a torchrun rank: " + " ".join(cmd[1:]))
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine (torch.cuda.is_available() is False); this check "
              "needs a GPU. Use --cpu-dry-run to exercise the script on CPU.", file=sys.stderr)
        return 2
    if "LOCAL_RANK" not in os.environ:
        return relaunch_under_torchrun(argv)
    from geopak_model.distributed import setup_runtime

    t_start = time.perf_counter()
    env, device = setup_runtime("cpu" if args.cpu_dry_run else "cuda")
    import torch.distributed as dist

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        info = {"name": name, "capability": f"{props.major}.{props.minor}", "memory_gb": round(props.total_memory / 2**30, 1),
                "bf16": torch.cuda.is_bf16_supported(including_emulation=False)}
    else:
        name = "CPU (dry run: test-tiny sizes, fp32, gloo)"
        info = {"name": name}
    info.update({"torch": torch.__version__, "cuda": torch.version.cuda, "process_group": dist.get_backend(),
                 "world_size": dist.get_world_size(), "rank": dist.get_rank()})
    peak = (("nominal (--peak-tflops)", args.peak_tflops, "given on the command line") if args.peak_tflops else
            ("nominal CPU figure", NOMINAL_CPU_PEAK, "not a real peak: the dry run only exercises the arithmetic")
            if args.cpu_dry_run else peak_for(name))
    log(f"{name}: process group {dist.get_backend()} at world size {dist.get_world_size()}; peak {peak}")
    steps: dict[str, dict[str, Any]] = {}
    parts: dict[str, Any] = {}
    tmp = tempfile.TemporaryDirectory(prefix="gpu_check_")

    def run(step_name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            steps[step_name] = {"status": "ok", **fn()}
        except Exception as exc:  # report and go on: one broken step must not hide the others' figures
            steps[step_name] = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(traceback.format_exc())
        steps[step_name]["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"{step_name}: {steps[step_name]}")

    def build_step() -> dict[str, Any]:
        parts.update(build(args, device))
        return {"build_seconds": parts["build_seconds"], "cells": parts["cells"].n_cells}

    try:
        run("build", build_step)
        if "model" in parts:
            run("model_step", lambda: step_model(args, device, parts, peak))
            run("encoders", lambda: step_encoders(args, device, parts))
            run("ddp_step", lambda: step_ddp(device, parts, env))
        run("loader", lambda: step_loader(args, device, Path(tmp.name)))
        if device.type == "cuda":
            steps["memory"] = {"status": "ok", "max_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                               "max_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
    finally:
        tmp.cleanup()
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": args.quick, "cpu_dry_run": args.cpu_dry_run,
              "device": info, "peak": None if peak is None else {"card": peak[0], "dense_bf16_tflops": peak[1],
                                                                  "source": peak[2]},
              "steps": steps, "seconds": round(time.perf_counter() - t_start, 1)}
    failed = [k for k, v in steps.items() if v["status"] != "ok"]
    if env.main:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "gpu_check.md").write_text(markdown(report))
        print(json.dumps(report, indent=2, default=str), flush=True)
        print(f"gpu_check: {'all steps passed' if not failed else f'FAILED: {failed}'} in {report['seconds']} s; "
              f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
