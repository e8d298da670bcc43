"""Checkpoints: plain dicts of tensors, numbers, strings and lists, so ``torch.load(weights_only=True)`` reads them.

Contents: ``config`` (``TrainConfig.to_dict()``), ``cells`` (the cell table as tensors), ``heads`` (state dict),
``encoder`` (state dict once phase 2 changed the encoders, else None) with ``encoder_weights_id`` (the frozen
encoders are rebuilt from the config and checked against it), ``precision`` (the autocast dtype trained in:
"fp32", "bf16" or "fp16"), plus training state for resuming (``optimizer``, ``scaler``, ``best``, ``history``).

Which checkpoint a phase resumes from (``resume_state``), when an epoch is a new best (``improves``) and which best
checkpoint becomes ``model.pt`` (``final_candidates``, ``select_final``) are decided here, from files and metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from geopak_model.cells import CellTable
from geopak_model.config import TrainConfig
from geopak_model.encoders import build_encoders
from geopak_model.model import GeopakHeads, GeopakModel
from pipeline.core.store import atomic_path

FORMAT = "geopak-checkpoint-v1"
# per phase: the validation metric its best checkpoint is chosen on, and whether lower or higher is better. Negative
# log-likelihoods of the truth (evaluate.py), not the median km: on a few hundred val images the median swung by
# 20 km between epochs whose loss was flat, so choosing on it chose noise.
SELECTION: dict[int, tuple[str, str]] = {0: ("val_province_nll", "min"), 1: ("val_joint_nll", "min"),
                                         2: ("val_joint_nll", "min")}


# torch's zip container adds per-tensor records and alignment padding; pickled numbers and strings are small
_CONTAINER_OVERHEAD = 1 << 20
_PER_TENSOR_OVERHEAD = 512


def payload_bytes(obj: Any) -> int:
    """An estimate of the bytes ``torch.save`` writes for ``obj`` (tensor storage plus container overhead), so a
    checkpoint that cannot fit fails before writing with the size it needs."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes() + _PER_TENSOR_OVERHEAD
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values()) + 64 * len(obj)
    if isinstance(obj, list | tuple):
        return sum(payload_bytes(v) for v in obj) + 16 * len(obj)
    if isinstance(obj, str | bytes):
        return len(obj) + 16
    return 16


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically; raises ``pipeline.core.store.DiskFullError`` (ENOSPC) when it does not fit."""
    data = {"format": FORMAT, **payload}
    with atomic_path(path, need_bytes=payload_bytes(data) + _CONTAINER_OVERHEAD) as tmp:
        torch.save(data, tmp)
    return Path(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint")
    return ckpt


def load_model(path: str | Path, weights_dir: str | Path | None = None, ckpt: dict[str, Any] | None = None
               ) -> tuple[GeopakModel, TrainConfig]:
    """Rebuild encoders + heads from a checkpoint (CPU, eval mode); ``ckpt``: ``read_checkpoint(path)`` when the
    caller has read it already (a checkpoint with its encoders is large: read it once)."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    cfg = TrainConfig.from_dict(ckpt["config"])
    cells = CellTable.from_state(ckpt["cells"])
    encoder = build_encoders(cfg.encoder, Path(weights_dir) if weights_dir else None)
    if ckpt.get("encoder") is not None:
        encoder.load_state_dict(ckpt["encoder"])
    elif _weights_mismatch(encoder, ckpt["encoder_weights_id"]):
        raise ValueError(
            f"{path}: the encoder built from the config has weights id {encoder.weights_id()}, but the heads were "
            f"trained on {ckpt['encoder_weights_id']}; supply the same encoder weights"
        )
    heads = GeopakHeads(cells, *encoder.dims, cfg.model)
    heads.load_state_dict(ckpt["heads"])
    model = GeopakModel(encoder, heads).eval()
    return model, cfg


def save_untrained(path: str | Path, cfg: TrainConfig, cells: CellTable) -> Path:
    """A checkpoint of freshly initialised heads over ``cells``: for benchmarks and tests of the loading path."""
    encoder = build_encoders(cfg.encoder)
    heads = GeopakHeads(cells, *encoder.dims, cfg.model)
    return save_checkpoint(path, {"config": cfg.to_dict(), "cells": cells.to_state(), "heads": heads.state_dict(),
                                  "encoder": None, "encoder_weights_id": encoder.weights_id()})


def _weights_mismatch(encoder: Any, weights_id: str) -> bool:
    """True unless ``weights_id`` names these encoder weights (in any feature precision: a checkpoint trained on
    bf16 features is still these weights)."""
    precision_of = getattr(encoder, "precision_of", None)
    if precision_of is not None:
        return precision_of(weights_id) is None
    return encoder.weights_id() != weights_id


# --- resuming and selection -------------------------------------------------------------------------------------
def phase_checkpoint(run_dir: str | Path, phase: int, kind: str) -> Path:
    """``<run_dir>/phase<k>_<kind>.pt``; ``kind`` is "last" (every epoch, for resuming) or "best"."""
    return Path(run_dir) / f"phase{phase}_{kind}.pt"


@dataclass
class PhaseStart:
    """Where a phase starts. ``status``: "fresh" (from ``init_from``, the previous phase's best, when it exists),
    "resume" (from ``last``, at epoch ``last["epoch"] + 1``) or "complete" (nothing to train: load the best).
    ``stale``: a last checkpoint existed but was trained with other settings or data, and is ignored."""

    status: str
    last: dict[str, Any] | None = None
    init_from: Path | None = None
    stale: bool = False

    @property
    def start_epoch(self) -> int:
        return int(self.last["epoch"]) + 1 if self.last is not None and self.status == "resume" else 0


def resume_state(run_dir: str | Path, phase: int, fingerprint: str, epochs: int) -> PhaseStart:
    """How phase ``phase`` of ``epochs`` epochs starts, given the checkpoints in ``run_dir``: resume from its last
    checkpoint when the fingerprint (config, cells, data, encoder weights) still matches, else start afresh."""
    last_path, best_path = phase_checkpoint(run_dir, phase, "last"), phase_checkpoint(run_dir, phase, "best")
    last = read_checkpoint(last_path) if last_path.exists() else None
    stale = last is not None and last.get("fingerprint") != fingerprint
    if last is not None and not stale:
        if int(last["epoch"]) + 1 >= epochs and best_path.exists():
            return PhaseStart("complete", last)
        return PhaseStart("resume", last)
    prev = phase_checkpoint(run_dir, phase - 1, "best") if phase > 0 else None
    return PhaseStart("fresh", None, prev if prev is not None and prev.exists() else None, stale)


def initial_best(phase: int, best_path: str | Path) -> dict[str, Any]:
    """The ``best`` record before any epoch of ``phase`` was validated."""
    return {"metric": SELECTION[phase][0], "value": None, "epoch": -1, "checkpoint": str(best_path)}


def improves(value: Any, best_value: float | None, mode: str) -> bool:
    """Whether a validation ``value`` beats ``best_value`` ("min": lower is better, "max": higher); a missing or
    NaN value never does, the first real value always does."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return best_value is None or (value < best_value if mode == "min" else value > best_value)


def final_candidates(run_dir: str | Path, run_phases: list[int]) -> list[int]:
    """Phases whose best checkpoint may become ``model.pt``: the location phases (1, 2) of this run that have a
    best checkpoint; the last phase run when there is none (e.g. phase 0 alone)."""
    top = max(run_phases)
    return [k for k in (1, 2) if k <= top and phase_checkpoint(run_dir, k, "best").exists()] or [top]


def select_final(results: dict[int, dict[str, float]], run_phases: list[int]) -> int:
    """The exported phase: the lowest ``val_joint_nll`` (the phases' own criterion) on the whole validation
    split among the candidates ``results``, each validated the same way — uncalibrated, with the run's default
    inference settings — so like is compared with like (phase-2 epochs may have been validated on a subset, and
    a short phase 2 can be worse than where it started); phase 0 when only it ran. Ties keep the earlier phase."""
    top = max(run_phases)
    if top == 0:
        return top
    return min(sorted(results), key=lambda k: results[k].get("val_joint_nll", math.inf))
