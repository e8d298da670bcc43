"""Schedules of a training phase: the learning rate per step and the offset loss's weight per epoch (open_clip's
``scheduler.py``)."""

from __future__ import annotations

import math

from geopak_model.config import TrainConfig


def cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def offset_weight(cfg: TrainConfig, phase: int, epoch: int) -> float:
    """Phase 1 ramps the offset term in over ``loss.offset_ramp_epochs``; other phases use it fully."""
    return min(1.0, (epoch + 1) / max(1, cfg.loss.offset_ramp_epochs)) if phase == 1 else 1.0
