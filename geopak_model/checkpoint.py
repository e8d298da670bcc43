"""Checkpoints: plain dicts of tensors, numbers, strings and lists, so ``torch.load(weights_only=True)`` reads them.

Contents: ``config`` (``TrainConfig.to_dict()``), ``cells`` (the cell table as tensors), ``heads`` (state dict),
``encoder`` (state dict once phase 2 changed the encoders, else None) with ``encoder_weights_id`` (the frozen
encoders are rebuilt from the config and checked against it), plus training state for resuming.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from geopak_model.cells import CellTable
from geopak_model.config import TrainConfig
from geopak_model.encoders import build_encoders
from geopak_model.model import GeopakHeads, GeopakModel
from pipeline.core.store import atomic_path

FORMAT = "geopak-checkpoint-v1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)
    return Path(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint")
    return ckpt


def load_model(path: str | Path, weights_dir: str | Path | None = None) -> tuple[GeopakModel, TrainConfig]:
    """Rebuild encoders + heads from a checkpoint (CPU, eval mode)."""
    ckpt = read_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    cells = CellTable.from_state(ckpt["cells"])
    encoder = build_encoders(cfg.encoder, Path(weights_dir) if weights_dir else None)
    if ckpt.get("encoder") is not None:
        encoder.load_state_dict(ckpt["encoder"])
    elif encoder.weights_id() != ckpt["encoder_weights_id"]:
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
