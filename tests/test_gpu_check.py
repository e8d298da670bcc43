"""``bench/gpu_check.py`` runs its whole control flow on CPU (issue 22.5), so no branch first runs on a GPU: started
with plain ``python`` it re-launches itself under ``torchrun --nproc_per_node=1``, starts a gloo process group at
world size 1, and runs every step (the full-model step with FLOPs and MFU, the encoders in every mode including
``torch.compile``, the shard loader, one DDP step) into JSON and Markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def _gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_table_matches_the_device_names_torch_reports() -> None:
    gc = _gpu_check()
    assert gc.peak_for("NVIDIA H100 80GB HBM3")[:2] == ("H100 SXM", 989.4)
    assert gc.peak_for("NVIDIA H100 PCIe")[:2] == ("H100 PCIe", 756.5)
    assert gc.peak_for("NVIDIA H100 NVL")[0] == "H100 NVL"
    assert gc.peak_for("NVIDIA H200")[:2] == ("H200 SXM", 989.5)
    assert gc.peak_for("NVIDIA H200 NVL")[0] == "H200 NVL"
    assert gc.peak_for("NVIDIA A100-SXM4-80GB")[1] == 312.0 and gc.peak_for("NVIDIA A100 80GB PCIe")[1] == 312.0
    assert gc.peak_for("NVIDIA L4")[1] == 121.0 and gc.peak_for("NVIDIA L40S") is None
    assert all(source for *_, source in gc.PEAKS)  # every figure says where it comes from


@pytest.mark.slow
def test_cpu_dry_run_exercises_every_step_under_torchrun_with_gloo(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, str(SCRIPT), "--cpu-dry-run", "--compile", "--compile-backend", "aot_eager",
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "not a torchrun rank" in proc.stderr  # plain python re-launched itself under torchrun
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    steps = report["steps"]
    assert set(steps) == {"build", "model_step", "encoders", "ddp_step", "loader"}
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert report["device"]["process_group"] == "gloo" and report["device"]["world_size"] == 1
    m = steps["model_step"]
    assert m["flops_per_step"] > 0 and m["step_ms"] > 0 and m["mfu"] is not None and m["mfu"] > 0
    e = steps["encoders"]
    assert e["batch"] >= 256 and e["memory_format"] == "channels_last"
    assert {"bf16_autocast_images_per_s", "fp32_tf32_images_per_s", "bf16_compiled_aot_eager_images_per_s"} <= set(e)
    d = steps["ddp_step"]
    assert d["backend"] == "gloo" and d["world_size"] == 1 and d["parameters_with_gradients"] > 0
    lo = steps["loader"]
    assert lo["persistent_workers"] and lo["workers"] == 2 and lo["steady_images_per_s"] > 0
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert all(f"| {name} | ok |" in md for name in steps) and "H100 PCIe" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
