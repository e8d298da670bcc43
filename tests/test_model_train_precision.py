"""Training precision: fp16 autocast trains through a GradScaler (unscaled before clipping, overflowing steps
skipped, its state resumed) and the precision used is recorded; bf16 was hard-wired before and raised on GPUs
without it. The GPU paths are exercised on CPU with CPU autocast and a CPU GradScaler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from geopak_model import cache as cache_module
from geopak_model import trainer as train
from geopak_model.checkpoint import read_checkpoint, save_checkpoint
from geopak_model.config import TrainConfig, preset
from geopak_model.epochs import make_scaler, optimiser_step
from geopak_model.trainer import Trainer
from tests.model_world import build_world


def _model_and_loss() -> tuple[torch.nn.Linear, torch.optim.SGD]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _loss(model: torch.nn.Module) -> torch.Tensor:
    x = torch.linspace(-2, 2, 20).reshape(5, 4)
    return (model(x) * 30.0).pow(2).mean()  # gradients far above the clip threshold


def test_scaled_step_equals_plain_step_with_clipping() -> None:
    """With the scaler enabled (scale 1024) the step equals the unscaled one: clipping sees true gradients."""
    plain, opt_p = _model_and_loss()
    scaled, opt_s = _model_and_loss()
    off = torch.amp.GradScaler("cpu", enabled=False)
    on = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        optimiser_step(_loss(plain), opt_p, off, grad_clip=0.5)
        optimiser_step(_loss(scaled), opt_s, on, grad_clip=0.5)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert on.get_scale() == 1024.0
    # clipping happened (the clip bound matters), so the test can tell scaled from unscaled clipping
    free, opt_f = _model_and_loss()
    optimiser_step(_loss(free), opt_f, off, grad_clip=0.0)
    ref, opt_r = _model_and_loss()
    optimiser_step(_loss(ref), opt_r, off, grad_clip=0.5)
    assert not torch.allclose(free.weight, ref.weight)


def test_overflowing_step_is_skipped_and_scale_backs_off() -> None:
    model, opt = _model_and_loss()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimiser_step(model.weight.sum() * float("inf"), opt, scaler, grad_clip=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() == 512.0


def test_scaler_enabled_only_for_fp16() -> None:
    assert make_scaler(torch.device("cpu"), torch.float16).is_enabled()
    assert not make_scaler(torch.device("cpu"), torch.bfloat16).is_enabled()
    assert not make_scaler(torch.device("cpu"), None).is_enabled()


def _tiny(root: Path, epochs: int) -> TrainConfig:
    return preset("test-tiny", data_root=str(root), cpu_threads=1, run_phases=[1], amp=True, amp_dtype="fp16",
                  phases=[{}, {"epochs": epochs}, {}])


def test_fp16_training_uses_scaler_records_precision_and_resumes_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer asks precision.amp_dtype for its dtype (fp16 forced here: CPU autocast in fp16), trains
    through an enabled scaler, saves its state in phase<k>_last.pt, restores it on resume, and records fp16."""
    asked: list[tuple[str, bool, str]] = []

    def fake_amp_dtype(device: torch.device | str, amp: bool, requested: str = "auto") -> torch.dtype | None:
        asked.append((torch.device(device).type, amp, requested))
        return torch.float16

    monkeypatch.setattr(train, "amp_dtype", fake_amp_dtype)
    # the embedding cache resolves the same setting for its features (and checks the weights id against it)
    monkeypatch.setattr(cache_module, "resolve_amp_dtype", fake_amp_dtype, raising=False)
    build_world(tmp_path, per_cell=3, size=40)
    summary = Trainer(_tiny(tmp_path, 1)).run()
    assert asked and asked[0] == ("cpu", True, "fp16")
    run = tmp_path / "model" / "geopak"
    assert summary["precision"] == "fp16"
    assert json.loads((run / "summary.json").read_text())["precision"] == "fp16"
    last = read_checkpoint(run / "phase1_last.pt")
    assert last["precision"] == "fp16" and read_checkpoint(run / "phase1_best.pt")["precision"] == "fp16"
    assert last["scaler"]["scale"] > 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[-1]["train_total"])  # not NaN, not inf
    last["scaler"]["scale"] = 8.0  # a scale training itself would not reach in 2 steps
    save_checkpoint(run / "phase1_last.pt", {k: v for k, v in last.items() if k != "format"})
    Trainer(_tiny(tmp_path, 2)).run()  # resumes epoch 2 with the saved scaler
    resumed = read_checkpoint(run / "phase1_last.pt")
    assert resumed["epoch"] == 1 and resumed["scaler"]["scale"] == 8.0


def test_heads_trained_on_bf16_features_load(tmp_path: Path) -> None:
    """A checkpoint records the weights id of the features it trained on, which includes their precision (bf16
    on a GPU); ``load_model`` must accept these encoder weights in any precision, and still reject other weights."""
    from geopak_model.cells import CellTable
    from geopak_model.checkpoint import load_model, save_untrained
    from geopak_model.encoders import build_encoders

    paths = build_world(tmp_path, per_cell=2, size=32)
    cfg = preset("test-tiny", data_root=str(tmp_path))
    cells = CellTable.from_parquet(paths.geocells, paths.geocell_neighbours, cfg.loss.n_neighbours)
    path = save_untrained(tmp_path / "u.pt", cfg, cells)
    ck = read_checkpoint(path)
    ck["encoder_weights_id"] = build_encoders(cfg.encoder).weights_id("bf16")
    ck["precision"] = "bf16"
    save_checkpoint(path, {k: v for k, v in ck.items() if k != "format"})
    load_model(path)
    ck["encoder_weights_id"] = "0" * 24
    save_checkpoint(path, {k: v for k, v in ck.items() if k != "format"})
    with pytest.raises(ValueError, match="weights id"):
        load_model(path)
