"""One phase's state and the functions of an epoch (open_clip's ``train_one_epoch`` / ``evaluate``): the
optimiser step through a loss scaler, one training epoch, validation, and the features of a split through the
current encoders, encoded by every rank together.

They are functions of their arguments; ``trainer.Trainer`` owns the run and calls them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from geopak_model.config import TrainConfig
from geopak_model.data import FeatureData, ImageDataset, label_tensors, make_loader
from geopak_model.diagnostics import fusion_parameters, gradient_share_metrics, term_gradient_norms
from geopak_model.distributed import DistEnv
from geopak_model.encoders import DualEncoder
from geopak_model.evaluate import evaluate_features
from geopak_model.losses import LossContext, loss_terms, weighted_terms
from geopak_model.model import GeopakHeads
from geopak_model.precision import autocast
from geopak_model.schedule import cosine_lr, offset_weight


def make_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 autocast (its gradients underflow; bf16 and fp32 need none)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16)


def optimiser_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   grad_clip: float) -> None:
    """Backward and step through ``scaler``: gradients are unscaled before clipping (the clip threshold is in
    true units), and a step whose gradients overflowed is skipped. A disabled scaler is a plain step."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    scaler.step(opt)
    scaler.update()


@dataclass
class TrainState:
    """What a phase's epochs change and its ``phase<k>_last.pt`` holds: the module the batches run through
    (``net``: the heads, or encoders + heads in phase 2, DDP-wrapped on several ranks) around ``heads``, the
    optimiser and loss scaler, the next epoch to train, the best validation record, and the epoch rows so far
    (every phase of the run)."""

    phase: int
    heads: GeopakHeads
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    epoch: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def phase_parts(phase: int) -> tuple[str, ...]:
    """The outputs a phase trains and validates: phase 0 only the province head, later phases every head."""
    return ("province",) if phase == 0 else ()


def forward_batch(net: nn.Module, b: dict[str, torch.Tensor], parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Images through encoders + heads (phase 2) or cached features through the heads (phases 0-1)."""
    if "image" in b:
        return net(b["image"], b["province_id"], b["cell_id"], parts)
    return net(b["clip"], b["scene"], b["province_id"], b["cell_id"], parts)


def train_one_epoch(state: TrainState, batches: Iterable[dict[str, torch.Tensor]], steps_per_epoch: int,
                    cfg: TrainConfig, ctx: LossContext, device: torch.device, dtype: torch.dtype | None,
                    env: DistEnv) -> dict[str, float]:
    """One epoch of ``state.phase`` at ``state.epoch`` over ``batches`` (dicts on ``device``): per-step learning
    rate, autocast in ``dtype``, scaled step with clipping. Returns the epoch's mean losses over ranks, the last
    learning rate, the offset weight and (phases >= 1) each weighted term's gradient norm and share at the fusion
    layer, measured on the epoch's first batch.

    The losses are summed on the device and read once, after the last step (with the all_reduce over ranks): no
    step waits for the device to report a number, so the host queues the next batch while the GPU computes. The
    first batch's gradient diagnostics are the only other read."""
    k, epoch = state.phase, state.epoch
    pc = cfg.phase(k)
    opt, scaler = state.optimizer, state.scaler
    state.net.train()
    parts = phase_parts(k)
    offset_w = offset_weight(cfg, k, epoch)
    sums: dict[str, torch.Tensor] = {}
    diag: dict[str, float] = {}
    steps = 0
    total_steps = pc.epochs * steps_per_epoch
    for i, b in enumerate(batches):
        step = epoch * steps_per_epoch + i
        for g in opt.param_groups:
            g["lr"] = cosine_lr(g["base_lr"], step, total_steps, pc.warmup_steps) if pc.schedule == "cosine" \
                else g["base_lr"]
        with autocast(device, dtype):
            out = forward_batch(state.net, b, parts)
            loss, logged = loss_terms(out, b, ctx, cfg.loss, offset_w)
            if i == 0 and k >= 1:  # once per epoch: each weighted term's pull on the shared fusion layer
                terms, weights = weighted_terms(out, b, ctx, cfg.loss, offset_w)
        if i == 0 and k >= 1:  # the optimised terms only (weight 0: a monitor such as the error in km)
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            weighted = {name: t for name, t in terms.items() if weights.get(name)}
            diag = gradient_share_metrics(term_gradient_norms(weighted, weights, fusion_parameters(state.heads),
                                                              scale))
        optimiser_step(loss, opt, scaler, cfg.grad_clip)
        logged["gate"] = out["gate"].detach().float().mean()
        for kk, v in logged.items():
            sums[kk] = sums[kk] + v.double() if kk in sums else v.double()
        steps += 1
    means = {f"train_{kk}": v / max(steps, 1) for kk, v in sums.items()}
    means = env.mean({**means, **diag})  # the epoch's one host read (and one all_reduce)
    means["lr"] = opt.param_groups[0]["lr"]
    means["offset_weight"] = offset_w
    return means


def validate(heads: GeopakHeads, data: FeatureData, ctx: LossContext, cfg: TrainConfig, device: torch.device,
             phase: int) -> dict[str, float]:
    """``val_*`` metrics of ``heads`` on ``data`` (end-to-end mixture inference; phase 0: the province head)."""
    return evaluate_features(heads, data, ctx, cfg.loss, cfg.inference, device, amp=cfg.amp,
                              amp_dtype=cfg.amp_dtype, parts=phase_parts(phase))


@torch.no_grad()
def fused_embeddings(heads: GeopakHeads, data: FeatureData, device: torch.device, batch: int = 1024) -> torch.Tensor:
    """The fused embedding ``e`` of every row of ``data`` (what the cell heads and the gallery work in)."""
    out = []
    for start in range(0, len(data), batch):
        b = data.batch(torch.arange(start, min(len(data), start + batch)), device)
        out.append(heads.fuse(b["clip"], b["scene"])[0].float())
    return torch.cat(out) if out else torch.empty(0)


class SplitEncoder:
    """Features of one table's images through the current encoders (phase 2 changed them): validation in phase 2
    (every epoch) and the export. At most ``cap`` images (a fixed random subset: the table may be ordered by
    province; 0 = all). Each rank encodes its share (rows rank, rank + world, …) and rank 0 gathers them, so the
    split is encoded once by all ranks together, not by rank 0 while the others wait at a barrier (an NCCL
    timeout risk with gpu-full). The DataLoader is built once and iterated at every ``encode`` (persistent
    workers, each image's bytes verified once per worker)."""

    def __init__(self, table: pd.DataFrame, root: Path, cfg: TrainConfig, device: torch.device, env: DistEnv,
                 cap: int = 0):
        if cap and len(table) > cap:
            table = table.sample(n=cap, random_state=cfg.seed).sort_index()
        self.table, self.device, self.env = table, device, env
        ds = ImageDataset(table, root, cfg.encoder.image_size, augment=None)
        mine = list(range(env.rank, len(ds), env.world))
        bs = cfg.embed_batch_size
        batches = [mine[i: i + bs] for i in range(0, len(mine), bs)]
        self.loader: torch.utils.data.DataLoader | None = make_loader(
            ds, batches, cfg.num_workers if batches else 0, pin_memory=device.type == "cuda")

    @torch.no_grad()
    def encode(self, encoder: DualEncoder, dtype: torch.dtype | None, failures: dict[str, int] | None = None
               ) -> FeatureData | None:
        """The features in table order on rank 0 (None on the other ranks). Images that cannot be read now (their
        bytes changed since the cache was built) are left out and counted by reason in ``failures``."""
        assert self.loader is not None, "encode after close"
        encoder.eval()
        clip, scene, rows = [], [], []
        mine: dict[str, int] = {}
        for batch in self.loader:
            count_failures(batch, mine)
            if "image" not in batch:
                continue
            with autocast(self.device, dtype):
                c, s = encoder(batch["image"].to(self.device, non_blocking=True))
            clip.append(c.float().cpu())  # float32: tuned encoders can leave float16's range
            scene.append(s.float().cpu())
            rows.append(batch["row"])
        dc, ds = encoder.dims
        got = self.env.gather_rows({"clip": torch.cat(clip) if clip else torch.zeros(0, dc),
                                    "scene": torch.cat(scene) if scene else torch.zeros(0, ds),
                                    "row": torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)},
                                   keep=self.env.main)
        every = self.env.sum_counts(mine)
        if failures is not None:
            for why, n in every.items():
                failures[why] = failures.get(why, 0) + n
        if not self.env.main:
            return None
        if not len(got["row"]):
            raise RuntimeError(f"none of the {len(self.table)} images could be read ({every})")
        order = torch.argsort(got["row"])
        kept = self.table.iloc[got["row"][order].numpy()].reset_index(drop=True)
        return FeatureData(got["clip"][order], got["scene"][order], label_tensors(kept))

    def close(self) -> None:
        """Stop the loader's workers (they persist until the loader goes)."""
        self.loader = None


def encode_features(encoder: DualEncoder, table: pd.DataFrame, root: Path, cfg: TrainConfig, device: torch.device,
                    dtype: torch.dtype | None, cap: int = 0, failures: dict[str, int] | None = None,
                    env: DistEnv | None = None) -> FeatureData | None:
    """One ``SplitEncoder.encode`` of ``table`` (a single process when ``env`` is None)."""
    enc = SplitEncoder(table, root, cfg, device, env or DistEnv(), cap)
    try:
        return enc.encode(encoder, dtype, failures)
    finally:
        enc.close()


def count_failures(batch: dict, failures: dict[str, int] | None) -> None:
    """Add a loader batch's unreadable rows to ``failures`` (reason -> count)."""
    if failures is not None:
        for why in batch.get("failed_reasons", []):
            failures[why] = failures.get(why, 0) + 1
