"""Training: phase 0 (province pretraining) and phase 1 (all heads) on cached frozen-encoder features, phase 2
(top ~30% of both encoders unfrozen, images in the loop with geography-safe augmentation).

Each phase resumes from ``phase<k>_last.pt`` when its fingerprint (config incl. the LR schedule, cells, data,
encoder weights) still matches, starts from the previous phase's best checkpoint otherwise, and keeps
``phase<k>_best.pt`` chosen on the validation negative log-likelihood of the truth under the inference
distribution (``checkpoint.SELECTION``; phase 0: of the province). Every epoch appends a row to
``metrics.jsonl``. ``model.pt`` is the better of the phase-1 and phase-2 best checkpoints on the whole validation
split (same criterion, both uncalibrated), with every inference setting then chosen on val by one rule
(``selection``); ``summary.json`` holds its metrics, the selection, the majority baselines and the best epochs.

Layout (after open_clip's ``main`` / ``train_one_epoch`` / ``evaluate``): ``TrainState`` is one phase's module,
optimiser, loss scaler, epoch, best record and history; ``train_one_epoch`` and ``validate`` are functions of
their arguments; resuming and best/final selection are in ``checkpoint.py``; ``Trainer`` owns the run's data and
models and drives the phases. Precision comes from ``precision.amp_dtype`` (bf16, fp16 with a GradScaler, or
fp32 on CPU) and is recorded in every checkpoint and ``summary.json``. Once per epoch (phases >= 1) each weighted
loss term's gradient norm and share at the fusion layer goes into the epoch row (``grad_norm_*``,
``grad_share_*``).

    python -m geopak_model.train --config cfg.json
    python -m geopak_model.train --preset cpu-small --data-root data
    torchrun --nproc_per_node=2 -m geopak_model.train --config cfg.json     # DDP (gloo on CPU, NCCL on GPU)

The pipeline's model steps launch it as ``python -m pipeline.train_entry [torchrun options] -- <these arguments>``
through Dagster Pipes; ``run_cli``'s ``log`` / ``on_epoch`` callbacks are how that entry point reports (this
package never imports Dagster). ``--embed-chunk-images`` / ``--embed-chunk-seconds``: how often the embedding
build commits a shard (a killed build loses at most one chunk).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from geopak_model.baselines import knn_features
from geopak_model.cache import CHUNK_IMAGES, CHUNK_SECONDS, EmbeddingCache, build_embedding_cache
from geopak_model.cells import CellTable
from geopak_model.checkpoint import (
    SELECTION,
    final_candidates,
    improves,
    initial_best,
    phase_checkpoint,
    read_checkpoint,
    resume_state,
    save_checkpoint,
    select_final,
)
from geopak_model.config import TrainConfig, preset
from geopak_model.data import (
    FeatureData,
    ImageDataset,
    ProvinceBalancedBatchSampler,
    label_tensors,
    load_training_table,
    make_loader,
    tensors_to,
)
from geopak_model.encoders import DualEncoder, build_encoders
from geopak_model.diagnostics import fusion_parameters, gradient_share_metrics, term_gradient_norms
from geopak_model.evaluate import evaluate_features, majority_baselines
from geopak_model.losses import LossContext, effective_number_weights, loss_terms, weighted_terms
from geopak_model.model import GeopakHeads, GeopakModel, count_params
from geopak_model.precision import amp_dtype, autocast, dtype_name
from geopak_model.retrieval import GALLERY_FILE, KNN_GALLERY_FILE, Gallery
from pipeline.core.store import file_sha256, stable_hash
from geopak_model.selection import select_baselines, select_inference, setting_scores
from pipeline.core import reasons
from pipeline.core.paths import DataPaths
from pipeline.core.processes import exit_with_parent
from pipeline.core.provinces import NUM_PROVINCES
from pipeline.core.store import atomic_write_bytes

__all__ = ["SELECTION", "DistEnv", "SplitEncoder", "TrainState", "Trainer", "collective_device", "cosine_lr",
           "embed_only", "encode_features", "main", "optimiser_step", "run_cli", "setup_runtime", "train_one_epoch",
           "validate"]


def collective_device(backend: str, local_rank: int = 0) -> torch.device:
    """Where a process group's collectives need their tensors: NCCL only reduces CUDA tensors (a CPU tensor
    raises "No backend type associated with device type cpu"), gloo reduces CPU tensors."""
    return torch.device("cuda", local_rank) if str(backend).lower() == "nccl" else torch.device("cpu")


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # the collectives' device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def mean(self, values: dict[str, float | torch.Tensor]) -> dict[str, float]:
        """Average over ranks (identical keys on every rank) of floats or 0-dim tensors still on the device they
        were summed on: one all_reduce on the group's device and ONE host read for all of them."""
        if not values:
            return {}
        keys = sorted(values)
        where = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), self.device)
        t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=where).reshape(()) for k in keys])
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
            t = t / self.world
        return dict(zip(keys, t.cpu().tolist()))

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (a decision only rank 0 could make, e.g. from its validation)."""
        if self.world == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def sum_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """Per-key sums over ranks of small integer counts (e.g. unreadable images by reason)."""
        if self.world == 1:
            return dict(counts)
        every: list[dict[str, int]] = [{} for _ in range(self.world)]
        dist.all_gather_object(every, counts)
        out: dict[str, int] = {}
        for d in every:
            for k, v in d.items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def gather_rows(self, parts: dict[str, torch.Tensor], keep: bool = True, block: int = 4096
                    ) -> dict[str, torch.Tensor]:
        """Every rank's rows of ``parts`` (same keys, dtypes and trailing shapes on every rank, any row count),
        concatenated in rank order on the CPU of the ranks with ``keep`` (the others get empty tensors).

        All-gathers of at most ``block`` zero-padded rows per rank at a time on the group's device, so device
        memory stays bounded whatever the table's size (gloo and NCCL alike)."""
        if self.world == 1:
            return {k: v.cpu() for k, v in parts.items()} if keep else {k: v[:0].cpu() for k, v in parts.items()}
        n = torch.tensor([len(next(iter(parts.values())))], dtype=torch.int64, device=self.device)
        counts_t = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(counts_t, n)
        counts = [int(c.item()) for c in counts_t]
        got: dict[str, list[list[torch.Tensor]]] = {k: [[] for _ in range(self.world)] for k in parts}
        for start in range(0, max(counts), block):
            size = min(block, max(counts) - start)
            for k, v in parts.items():
                mine = v[start: start + size].to(self.device)
                buf = torch.zeros((size, *v.shape[1:]), dtype=v.dtype, device=self.device)
                buf[: len(mine)] = mine
                bufs = [torch.empty_like(buf) for _ in range(self.world)]
                dist.all_gather(bufs, buf)
                if keep:
                    for r, b in enumerate(bufs):
                        got[k][r].append(b[: max(0, min(size, counts[r] - start))].cpu())
        return {k: torch.cat([t for per_rank in got[k] for t in per_rank]) if keep else v[:0].cpu()
                for k, v in parts.items()}


def setup_runtime(pref: str) -> tuple[DistEnv, torch.device]:
    """Single process, or one rank of ``torchrun`` (NCCL with one GPU per rank, gloo on CPU).

    Under torchrun (``LOCAL_RANK`` set) a process group is started at world size 1 too: whatever needs one (DDP,
    collectives, ``bench/gpu_check.py``'s DDP step) then runs on one GPU exactly as on eight, and NCCL is
    initialised by the first one-GPU run rather than the first multi-GPU one. ``DistEnv`` still skips every
    collective at world size 1, and the trainer wraps its module in DDP only when there are several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = pref == "cuda" or (pref == "auto" and torch.cuda.is_available())
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if world > 1 or "LOCAL_RANK" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        env = DistEnv(dist.get_rank(), dist.get_world_size(), collective_device(dist.get_backend(), local))
        return env, torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return DistEnv(), torch.device("cuda" if use_cuda else "cpu")


def cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


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


# --- one phase's state and the pure epoch functions (open_clip's train_one_epoch / evaluate split) ------------
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


def offset_weight(cfg: TrainConfig, phase: int, epoch: int) -> float:
    """Phase 1 ramps the offset term in over ``loss.offset_ramp_epochs``; other phases use it fully."""
    return min(1.0, (epoch + 1) / max(1, cfg.loss.offset_ramp_epochs)) if phase == 1 else 1.0


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


# --- the run: data, phases, checkpoints, summary ------------------------------------------------------------------
class Trainer:
    """A training run: the data, cells, encoders and heads it shares across phases, each phase's resume / epoch
    loop / best checkpoint, and the final model selection and summary."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] | None = None,
                 runtime: tuple[DistEnv, torch.device] | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 embed_chunk: tuple[int, float] = (CHUNK_IMAGES, CHUNK_SECONDS)):
        """``log``: where rank 0's progress lines go (default: stdout). ``on_epoch``: called on rank 0 with every
        epoch's metrics row (the Pipes entry point reports them to Dagster). ``embed_chunk``: the embedding
        build commits a shard every that many images or seconds."""
        self.cfg = cfg
        self._on_epoch = on_epoch
        self.embed_chunk = embed_chunk
        self.read_failures: dict[str, int] = {}  # images unreadable after the cache was built (phase 2, export)
        if cfg.cpu_threads > 0:
            torch.set_num_threads(cfg.cpu_threads)
        self.env, self.device = runtime or setup_runtime(cfg.device)
        self._log = log or (lambda m: print(m, flush=True))
        self.paths = DataPaths.at(cfg.data_root)
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else self.paths.model_dir / cfg.run_name
        self.cache_root = Path(cfg.cache_dir) if cfg.cache_dir else self.paths.embeddings_dir
        self.weights_dir = self.paths.weights_dir
        self.amp_dtype = amp_dtype(self.device, cfg.amp, cfg.amp_dtype)  # None: float32
        self.precision = dtype_name(self.amp_dtype)

        table, self.table_stats = load_training_table(self.paths)
        self.cells = CellTable.from_parquet(self.paths.geocells, self.paths.geocell_neighbours, cfg.loss.n_neighbours)
        if int(table["cell_id"].max()) >= self.cells.n_cells:
            raise ValueError("assignments name cells that are not in cells.parquet")
        self.encoder = build_encoders(cfg.encoder, self.weights_dir)
        self.weights_id = self.encoder.weights_id(self.precision)  # the cache key of features in this precision
        self._encoder_tuned = False  # True once phase 2 changed (or a checkpoint replaced) the encoder weights
        self.table = table
        torch.manual_seed(cfg.seed)
        self.heads = GeopakHeads(self.cells, *self.encoder.dims, cfg.model)
        self.history: list[dict[str, Any]] = []
        self.cache_stats: dict[str, Any] = {}
        self.train_data: FeatureData | None = None
        self.val_data: FeatureData | None = None
        self._val_encoder: SplitEncoder | None = None  # phase 2's val loader, built once per phase

    def log(self, msg: str) -> None:
        if self.env.main:
            self._log(msg)

    # --- data -------------------------------------------------------------------------------------------------
    def prepare_cache(self) -> dict[str, Any]:
        """Embeddings for every train/val image (rank 0 computes, the others wait), then the split tables."""
        need = self.table[self.table["split"].isin([self.cfg.train_split, self.cfg.val_split])]
        stats: dict[str, Any] = {}
        if self.env.main:
            t0 = time.perf_counter()
            cache, stats = build_embedding_cache(
                self.encoder, need, self.paths.root, self.cache_root, self.cfg.embed_batch_size, self.device,
                self.cfg.num_workers, self.cfg.amp, weights_id=self.weights_id, amp_dtype=self.cfg.amp_dtype,
                progress=lambda d, n: self.log(f"embedding cache: {d}/{n}") if d == n or d % 1024 < 64 else None,
                chunk_images=self.embed_chunk[0], chunk_seconds=self.embed_chunk[1])
            stats["seconds"] = round(time.perf_counter() - t0, 2)
            self.log(f"embedding cache {cache.dir}: {stats}")
        self.env.barrier()
        cache = EmbeddingCache(self.cache_root, self.weights_id)
        rejections = cache.rejections()
        bad = set(rejections["image_id"])
        usable = need[~need["image_id"].isin(bad)]
        # this run's images the cache could not use, by reason (bytes_changed: excluded, never trained on)
        mine = rejections[rejections["image_id"].isin(need["image_id"])]
        by_reason = {str(k): int(v) for k, v in mine["reason"].value_counts().sort_index().items()}
        self.cache_stats = {"weights_id": self.weights_id, "cached_images": len(cache), "unreadable": len(bad),
                            **stats, "excluded_by_reason": by_reason,
                            "bytes_changed": by_reason.get(reasons.BYTES_CHANGED, 0),
                            "bytes_changed_ids": sorted(mine.loc[mine["reason"] == reasons.BYTES_CHANGED,
                                                                 "image_id"])[:100]}
        if by_reason:
            self.log(f"excluded from training and validation: {by_reason}")
        train = usable[usable["split"] == self.cfg.train_split].reset_index(drop=True)
        val = usable[usable["split"] == self.cfg.val_split].reset_index(drop=True)
        if not len(train) or not len(val):
            raise ValueError(f"need train and val images; have {len(train)} train and {len(val)} val "
                             f"(splits {self.cfg.train_split!r}/{self.cfg.val_split!r})")
        self.train_table, self.val_table = train, val
        self.train_data = FeatureData(*cache.load(train["image_id"]), label_tensors(train))
        self.val_data = FeatureData(*cache.load(val["image_id"]), label_tensors(val))
        self._setup_loss()
        return self.cache_stats

    def _setup_loss(self) -> None:
        """Loss context and prior shift. ONE rebalancing mechanism: the province-balanced sampler. It puts every
        province in every batch, so each province's own geocell head and the offset head learn from its images
        at every step; class weights reweight only the province cross-entropy (a rare province's cell head would
        still see a handful of images an epoch), and on top of the sampler they rebalanced twice and needed a
        ~7-nat prior shift to undo. So the province CE is unweighted (``loss.class_weight_beta`` must be 0) and
        the prior shift undoes exactly the sampler's prior."""
        if self.cfg.loss.class_weight_beta > 0:
            raise ValueError("loss.class_weight_beta > 0 adds class weights on top of the province-balanced sampler "
                             "(rebalancing twice); the sampler is the one rebalancing mechanism: set it to 0")
        counts = np.bincount(self.train_table["province_id"].to_numpy(), minlength=NUM_PROVINCES)
        w = effective_number_weights(counts, self.cfg.loss.class_weight_beta)  # β = 0: 1 per present province
        self.loss_ctx = LossContext.build(self.cells, w, self.cfg.loss).to(self.device)
        self.class_weights = w
        # what the model is trained to believe (the balanced batches' prior) vs the true training prior
        sampler = self.sampler(0)
        trained = sampler.sampling_prior() * w
        true = counts / counts.sum()
        shift = np.where((trained > 0) & (true > 0), np.log(np.maximum(true, 1e-12)) - np.log(np.maximum(trained,
                                                                                                       1e-12)), -20.0)
        self.prior_shift = torch.tensor(shift - shift[true > 0].mean(), dtype=torch.float32)
        self.heads.province_prior_shift.copy_(self.prior_shift)

    def sampler(self, k: int, with_seeds: bool = False) -> ProvinceBalancedBatchSampler:
        pc = self.cfg.phase(k)
        return ProvinceBalancedBatchSampler(
            self.train_table["province_id"].to_numpy(), pc.batch_size, pc.batches_per_epoch, self.cfg.sampler_shares,
            seed=self.cfg.seed + 101 * k, rank=self.env.rank, world_size=self.env.world, with_seeds=with_seeds)

    def image_loader(self, sampler: ProvinceBalancedBatchSampler) -> torch.utils.data.DataLoader:
        """Phase 2's augmented training images: one loader for the whole phase (workers persist across epochs;
        ``sampler.set_epoch`` still draws each epoch's batches, in this process)."""
        ds = ImageDataset(self.train_table, self.paths.root, self.cfg.encoder.image_size, self.cfg.augment)
        return make_loader(ds, sampler, self.cfg.num_workers, pin_memory=self.device.type == "cuda")

    def batches(self, k: int, sampler: ProvinceBalancedBatchSampler,
                loader: torch.utils.data.DataLoader | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The training batches of one epoch on the device: cached features (phases 0-1) or augmented images from
        ``loader`` (phase 2, ``image_loader``)."""
        if k < 2:
            assert self.train_data is not None
            for rows in sampler:
                yield self.train_data.batch(rows, self.device)
            return
        assert loader is not None
        for item in loader:
            if item["failed_rows"]:  # read after the cache was built: the bytes changed or the file went away
                count_failures(item, self.read_failures)
                self.log(f"phase {k}: {len(item['failed_rows'])} training images unreadable now "
                         f"({', '.join(item['failed_reasons'])}); left out of the batch")
            if "image" not in item:
                raise RuntimeError("a training batch had no readable image")
            yield tensors_to(item, self.device)

    # --- checkpoints ------------------------------------------------------------------------------------------
    def fingerprint(self, k: int) -> str:
        """What phase ``k``'s checkpoints depend on. The epoch count is left out where it changes nothing already
        trained (a constant learning rate: more epochs resume), but kept where it sets the learning-rate schedule
        (cosine: the LR of every step depends on the total), so a changed count never makes the schedule jump;
        the selection criterion is in too (a best kept on another metric is not this phase's best)."""
        c = self.cfg.to_dict()
        phases = [{kk: v for kk, v in p.items() if kk != "val_every" and (kk != "epochs" or p["schedule"] != "none")}
                  for p in c["phases"][: k + 1]]
        return stable_hash({"encoder": c["encoder"], "model": c["model"], "loss": c["loss"], "phases": phases,
                      "selection": list(SELECTION[k]),
                      "augment": c["augment"] if k == 2 else None, "shares": c["sampler_shares"], "seed": c["seed"],
                      "cells": self.cells.fingerprint(), "weights": self.weights_id,
                      "train": stable_hash(sorted(self.train_table["image_id"])), "val": stable_hash(sorted(self.val_table["image_id"])),
                      "max_val": c["max_val_images"] if k == 2 else None})

    def _ckpt(self, k: int, kind: str) -> Path:
        return phase_checkpoint(self.run_dir, k, kind)

    def _payload(self, k: int, epoch: int, extra: dict[str, Any]) -> dict[str, Any]:
        return {"phase": k, "epoch": epoch, "config": self.cfg.to_dict(), "cells": self.cells.to_state(),
                "encoder_weights_id": self.weights_id, "heads": self.heads.state_dict(),
                "encoder": self.encoder.state_dict() if k == 2 else None, "fingerprint": self.fingerprint(k),
                "precision": self.precision, **extra}

    def _load_weights(self, ckpt: dict[str, Any]) -> None:
        self.heads.load_state_dict(ckpt["heads"])
        if ckpt.get("encoder") is not None:
            self.encoder.load_state_dict(ckpt["encoder"])
            self._encoder_tuned = True
        elif self._encoder_tuned:  # a heads-only checkpoint goes with the original frozen encoders
            self.encoder.load_state_dict(build_encoders(self.cfg.encoder, self.weights_dir).state_dict())
            self._encoder_tuned = False

    def _write_metrics(self, history: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in history)
        atomic_write_bytes(self.run_dir / "metrics.jsonl", lines.encode())

    # --- phases -----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.train_data is None:
            self.prepare_cache()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        phase_info: dict[str, Any] = {}
        for k in sorted(self.cfg.run_phases):
            phase_info[str(k)] = self.run_phase(k)
        return self._summary(phase_info)

    def run_phase(self, k: int) -> dict[str, Any]:
        """Resume, continue or start phase ``k``; returns its ``best`` record (metric, value, epoch, checkpoint)."""
        pc = self.cfg.phase(k)
        best_path = self._ckpt(k, "best")
        start = resume_state(self.run_dir, k, self.fingerprint(k), pc.epochs)
        if start.stale:
            self.log(f"phase {k}: {self._ckpt(k, 'last')} was trained with other settings/data; starting the phase "
                     "afresh")
        if start.status == "complete":
            assert start.last is not None
            self.log(f"phase {k}: already complete ({start.last['epoch'] + 1}/{pc.epochs} epochs); loading its best")
            self.history = list(start.last["history"])
            self._load_weights(read_checkpoint(best_path))
            return start.last["best"]
        if start.status == "fresh":
            self.history = [h for h in self.history if h["phase"] < k]
            if start.init_from is not None:
                self._load_weights(read_checkpoint(start.init_from))
                self.log(f"phase {k}: initialised from {start.init_from}")
            best = initial_best(k, best_path)
        else:
            assert start.last is not None
            self._load_weights(start.last)
            self.history = list(start.last["history"])
            best = start.last["best"]
            self.log(f"phase {k}: resuming at epoch {start.start_epoch + 1}/{pc.epochs}")
        self.heads.province_prior_shift.copy_(self.prior_shift)

        with self.phase_threads(k):
            state = self.new_state(k, start.last, start.start_epoch, best)
            best = self._run_epochs(state)
        self.history = state.history
        return best

    @contextlib.contextmanager
    def phase_threads(self, k: int) -> Iterator[None]:
        """Heads-only phases on CPU run on one thread (unless ``cpu_threads`` says otherwise): their small matmuls
        lose more to thread hand-offs on a busy 2-core machine than they gain (measured ~3x faster)."""
        threads = torch.get_num_threads()
        if self.cfg.cpu_threads == 0 and self.device.type == "cpu" and k < 2:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def new_state(self, k: int, last: dict[str, Any] | None = None, epoch: int = 0,
                  best: dict[str, Any] | None = None) -> TrainState:
        """Phase ``k``'s trainable parameters, module (DDP on several ranks), optimiser and scaler; the optimiser
        and scaler states from ``last`` (a ``phase<k>_last.pt`` payload) when resuming."""
        pc = self.cfg.phase(k)
        for p in self.heads.parameters():
            p.requires_grad_(False)
        for p in self.heads.param_groups(k):
            p.requires_grad_(True)
        self.encoder.freeze()
        groups = [{"params": [p for p in self.heads.parameters() if p.requires_grad], "lr": pc.lr, "name": "heads"}]
        if k == 2:
            self._encoder_tuned = True
            clip_p, scene_p = self.encoder.unfreeze_top(self.cfg.encoder.unfreeze_fraction)
            for params, lr, name in ((clip_p, pc.lr_clip, "clip"), (scene_p, pc.lr_scene, "scene")):
                if lr > 0:
                    groups.append({"params": params, "lr": lr, "name": name})
                else:
                    for p in params:
                        p.requires_grad_(False)
            module: nn.Module = GeopakModel(self.encoder, self.heads)
        else:
            module = self.heads
        module.to(self.device)
        self.heads.to(self.device)
        for g in groups:
            g["base_lr"] = g["lr"]
        opt = torch.optim.AdamW(groups, lr=pc.lr, weight_decay=pc.weight_decay, foreach=True)
        scaler = make_scaler(self.device, self.amp_dtype)
        if last is not None and last.get("optimizer"):
            opt.load_state_dict(last["optimizer"])
        if last is not None and last.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(last["scaler"])
        net = module
        if self.env.world > 1:
            unused = self.unused_parameters(k, module)
            if unused:
                self.log(f"phase {k}: {len(unused)} trainable parameters get no gradient ({', '.join(unused[:4])}"
                         f"{', …' if len(unused) > 4 else ''}): DDP searches for unused parameters every step")
            net = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(unused))
        return TrainState(k, self.heads, net, opt, scaler, epoch, best or initial_best(k, self._ckpt(k, "best")),
                          list(self.history))

    def unused_parameters(self, k: int, module: nn.Module) -> list[str]:
        """Names of ``module``'s trainable parameters that phase ``k``'s loss never reaches (e.g. a head whose loss
        weight is 0), found by one forward and backward on a few training rows (their cached features; random
        pixels through phase 2's encoders) before DDP wraps the module: only then does DDP need
        ``find_unused_parameters``, which walks the autograd graph after every step. Every cell head runs on
        every row, so a province missing from a rank's share of a batch leaves nothing unused. The same on every
        rank (same rows, fixed pixels); BatchNorm statistics are restored afterwards."""
        assert self.train_data is not None
        rows = torch.arange(min(len(self.train_data), 8))
        b = self.train_data.batch(rows, self.device)
        if k == 2:
            size = self.cfg.encoder.image_size
            b["image"] = torch.rand((len(rows), 3, size, size), generator=torch.Generator().manual_seed(0)
                                    ).to(self.device)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        saved = {n: t.clone() for n, t in module.named_buffers()}
        was_training = module.training
        module.train()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                out = forward_batch(module, b, phase_parts(k))
                loss, _ = loss_terms(out, b, self.loss_ctx, self.cfg.loss, offset_weight(self.cfg, k, 0))
                grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        finally:
            module.train(was_training)
            with torch.no_grad():
                for n, t in module.named_buffers():
                    t.copy_(saved[n])
        return [n for (n, _), g in zip(named, grads) if g is None]

    def _run_epochs(self, state: TrainState) -> dict[str, Any]:
        k = state.phase
        pc = self.cfg.phase(k)
        best_path, last = self._ckpt(k, "best"), self._ckpt(k, "last")
        sampler = self.sampler(k, with_seeds=k == 2)
        steps_per_epoch = len(sampler)
        self.log(f"phase {k}: {count_params(self.heads, True) + count_params(self.encoder, True):,} trainable "
                 f"parameters, {steps_per_epoch} batches of {pc.batch_size} per epoch, {pc.epochs} epochs, "
                 f"{self.precision}")
        # phase 2's loaders are built once for the phase (workers persist across its epochs)
        loader = self.image_loader(sampler) if k == 2 and state.epoch < pc.epochs else None
        if loader is not None:
            self._val_encoder = SplitEncoder(self.val_table, self.paths.root, self.cfg, self.device, self.env,
                                             self.cfg.max_val_images)
        try:
            self._epochs(state, sampler, loader)
        finally:
            loader = None  # its persistent workers stop with it
            if self._val_encoder is not None:
                self._val_encoder.close()
                self._val_encoder = None
        self.env.barrier()
        self._load_weights(read_checkpoint(best_path))  # the next phase starts from this phase's best
        if not self.env.main:
            state.best = read_checkpoint(last)["best"]
        return state.best

    def _epochs(self, state: TrainState, sampler: ProvinceBalancedBatchSampler,
                loader: torch.utils.data.DataLoader | None) -> None:
        """The phase's remaining epochs: train, validate (every rank: phase 2 encodes val together), keep the
        best and last checkpoints (rank 0)."""
        k = state.phase
        pc = self.cfg.phase(k)
        metric, mode = SELECTION[k]
        best_path, last = self._ckpt(k, "best"), self._ckpt(k, "last")
        steps_per_epoch = len(sampler)
        while state.epoch < pc.epochs:
            epoch = state.epoch
            t0 = time.perf_counter()
            torch.manual_seed(self.cfg.seed + 1000 * k + epoch)  # dropout stream: the same on resume
            sampler.set_epoch(epoch)
            train_m = train_one_epoch(state, self.batches(k, sampler, loader), steps_per_epoch, self.cfg,
                                      self.loss_ctx, self.device, self.amp_dtype, self.env)
            row: dict[str, Any] = {"phase": k, "epoch": epoch, **train_m}
            if (epoch + 1) % max(1, pc.val_every) == 0 or epoch + 1 == pc.epochs:
                row.update(self.validate_now(k))  # {} on ranks > 0
            row["seconds"] = round(time.perf_counter() - t0, 2)
            state.history.append(row)
            if self.env.main:
                value = row.get(metric)
                if improves(value, state.best["value"], mode):
                    state.best = {"metric": metric, "value": float(value), "epoch": epoch,
                                  "checkpoint": str(best_path)}
                    save_checkpoint(best_path, self._payload(k, epoch, {"best": state.best,
                                                                        "history": state.history}))
                save_checkpoint(last, self._payload(k, epoch, {"best": state.best, "history": state.history,
                                                               "optimizer": state.optimizer.state_dict(),
                                                               "scaler": state.scaler.state_dict()}))
                self._write_metrics(state.history)
                self.log(_epoch_line(row))
                if self._on_epoch is not None:
                    self._on_epoch(row)
            self.env.barrier()
            state.epoch += 1

    def validate_now(self, k: int, full: bool = False) -> dict[str, float]:
        """Validation of the current heads on rank 0 ({} on the others); phase 2 first re-encodes the val images
        through the current encoders (capped unless ``full``), every rank encoding its share, so every rank must
        call it."""
        data = self.val_data
        if k == 2:
            if full or self._val_encoder is None:
                data = encode_features(self.encoder, self.val_table, self.paths.root, self.cfg, self.device,
                                       self.amp_dtype, 0 if full else self.cfg.max_val_images, self.read_failures,
                                       self.env)
            else:
                data = self._val_encoder.encode(self.encoder, self.amp_dtype, self.read_failures)
        if not self.env.main:
            return {}
        assert data is not None
        return validate(self.heads, data, self.loss_ctx, self.cfg, self.device, k)

    # --- summary ----------------------------------------------------------------------------------------------
    def _choose_final(self) -> tuple[int, dict[int, dict[str, float]]]:
        """The exported model: see ``checkpoint.select_final``. Each candidate is re-validated on the WHOLE split
        the same way (uncalibrated, the run's default inference settings), so like is compared with like."""
        results = {}
        for k in final_candidates(self.run_dir, self.cfg.run_phases):
            self._load_weights(read_checkpoint(self._ckpt(k, "best")))
            self.heads.province_calibration.fill_(1.0)
            self.heads.cell_calibration.fill_(1.0)
            with self.phase_threads(k):
                results[k] = self.validate_now(k, full=True)
        # rank 0 decides (only it has the metrics); every rank validated so phase 2's encoding was shared
        choice = self.env.broadcast_int(select_final(results, self.cfg.run_phases) if self.env.main else 0)
        self._load_weights(read_checkpoint(self._ckpt(choice, "best")))
        return choice, results

    def _export(self, choice: int, candidates: dict[int, dict[str, float]]) -> dict[str, Any]:
        """``model.pt``: the chosen phase's best weights with every inference setting chosen on the whole validation
        split (``selection.select_inference``: the calibration — kept only if it improves the selection metric —,
        the hypotheses, the point estimator, the refinement) and the baselines' settings
        (``selection.select_baselines``), all with their val scores in ``ckpt["selection"]`` and the chosen values
        in its config's ``inference``; beside it ``gallery.npz`` (the training images in the model's fused space,
        for refinement) and ``knn_gallery.npz`` (their encoder features, for the kNN baseline), both tied to
        model.pt's sha256. Returns the selection record and the classifier's val metrics at the chosen settings."""
        model_path = self.run_dir / "model.pt"
        ckpt = read_checkpoint(self._ckpt(choice, "best"))
        val = self.val_data if choice < 2 else encode_features(  # phase 2: every rank encodes its share
            self.encoder, self.val_table, self.paths.root, self.cfg, self.device, self.amp_dtype,
            failures=self.read_failures, env=self.env)
        train = self.train_data if choice < 2 else encode_features(
            self.encoder, self.train_table, self.paths.root, self.cfg, self.device, self.amp_dtype,
            failures=self.read_failures, env=self.env)
        if not self.env.main:
            return {}
        assert val is not None and train is not None
        self.heads.eval()
        t_lat, t_lon = train.labels["lat"].double().numpy(), train.labels["lon"].double().numpy()
        v_lat, v_lon = val.labels["lat"].double().numpy(), val.labels["lon"].double().numpy()
        gallery = Gallery.from_arrays(fused_embeddings(self.heads, train, self.device).cpu(), t_lat, t_lon,
                                      train.labels["cell_id"].numpy(), self.cells.n_cells)
        inf = self.cfg.inference
        record = select_inference(self.heads, fused_embeddings(self.heads, val, self.device),
                                  val.labels["cell_id"].to(self.device), v_lat, v_lon, gallery, inf.mode_radius_km,
                                  inf.prior_correction)
        train_knn, val_knn = knn_features(train.clip, train.scene), knn_features(val.clip, val.scene)
        record["baselines"] = select_baselines(t_lat, t_lon, train.labels["province_id"].numpy(), train_knn, val_knn,
                                               v_lat, v_lon, record.pop("val_pred_province"))
        record["checkpoint"] = {"criterion": SELECTION[max(choice, 1)][0], "phase": choice, "candidates": {
            str(k): {m: v.get(m) for m in ("val_joint_nll", "val_median_km", "val_acc_25km")}
            for k, v in sorted(candidates.items())}}
        cfg = dataclasses.replace(self.cfg, inference=dataclasses.replace(inf, **record["inference"]))
        ckpt["heads"] = {k: v.detach().cpu() for k, v in self.heads.state_dict().items()}  # chosen temperatures
        ckpt["calibration"] = record["calibration"]
        ckpt["selection"] = record
        ckpt["config"] = cfg.to_dict()  # the val-chosen inference settings (not part of a phase's fingerprint)
        save_checkpoint(model_path, ckpt)
        sha = file_sha256(model_path)
        gallery.model_sha256 = sha
        gallery.save(self.run_dir / GALLERY_FILE)
        Gallery.from_arrays(train_knn, t_lat, t_lon, train.labels["cell_id"].numpy(), self.cells.n_cells,
                            sha).save(self.run_dir / KNN_GALLERY_FILE)
        with self.phase_threads(choice):
            metrics = validate(self.heads, val, self.loss_ctx, cfg, self.device, choice)
        self.log(f"exported {model_path} (phase {choice}): chosen on val by '{record['rule']}': "
                 f"{record['inference']}, calibration kept: {record['calibration']['kept']}; val median "
                 f"{record['val']['median_km']:.1f} km, within 25 km {record['val']['acc_25km']:.3f}; gallery of "
                 f"{len(gallery)} training images")
        return {"calibration": record["calibration"],
                "selection": {**{k: record[k] for k in ("rule", "inference", "classifier_val", "val", "checkpoint")},
                              "choices": setting_scores(record["candidates"]),
                              "baselines": {k: {kk: vv for kk, vv in v.items() if kk not in ("points", "point")}
                                            for k, v in record["baselines"]["chosen"].items()}},
                **metrics}

    def _summary(self, phase_info: dict[str, Any]) -> dict[str, Any]:
        model_path = self.run_dir / "model.pt"
        choice, results = self._choose_final()  # every rank: phase 2's candidates encode val together
        final: dict[str, Any] = {"phase": choice}
        final.update(self._export(choice, results))  # every rank encodes; rank 0 writes ({} elsewhere)
        best_rows = {}
        for k, info in phase_info.items():
            rows = [h for h in self.history if h["phase"] == int(k) and h["epoch"] == info["epoch"]]
            best_rows[k] = rows[-1] if rows else {}
        summary = {
            "model": str(model_path), "run_dir": str(self.run_dir), "preset": self.cfg.preset,
            "device": str(self.device), "world_size": self.env.world, "precision": self.precision,
            "table": self.table_stats, "cache": self.cache_stats,
            "unreadable_after_cache": dict(self.read_failures),
            "train_images": len(self.train_table), "val_images": len(self.val_table),
            "cells": self.cells.n_cells, "cells_per_province": self.cells.counts_per_province,
            "class_weights": [round(float(x), 4) for x in self.class_weights],
            "baselines": majority_baselines(self.train_table, self.val_table, self.cells.center_lat,
                                            self.cells.center_lon),
            "phases": phase_info, "best_rows": best_rows, "final": final,
            # like with like: every candidate uncalibrated, default inference settings, the whole val split
            "final_candidates": {str(k): v.get(SELECTION[max(k, 1)][0]) for k, v in sorted(results.items())},
            "parameters": {"heads": count_params(self.heads), "encoders": count_params(self.encoder)},
        }
        if self.env.main:
            atomic_write_bytes(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=float).encode())
        return summary


def _epoch_line(row: dict[str, Any]) -> str:
    keys = ["train_total", "train_province", "train_cell", "train_offset_km", "val_median_km", "val_mean_km",
            "val_p90_km", "val_province_acc", "val_cell_acc", "oracle_val_median_km"]
    parts = [f"{k}={row[k]:.4g}" for k in keys if k in row]
    return f"phase {row['phase']} epoch {row['epoch'] + 1}: " + " ".join(parts) + f" ({row.get('seconds', 0)} s)"


def embed_only(cfg: TrainConfig, log: Callable[[str], None] | None = None,
               embed_chunk: tuple[int, float] = (CHUNK_IMAGES, CHUNK_SECONDS)) -> dict[str, Any]:
    """Build/refresh the embedding cache for the train and val images (the ``embedding_cache`` asset)."""
    trainer = Trainer(cfg, log, embed_chunk=embed_chunk)
    stats = trainer.prepare_cache()
    return {**stats, "cache_dir": str(trainer.cache_root / trainer.weights_id),
            "train_images": len(trainer.train_table), "val_images": len(trainer.val_table)}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m geopak_model.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="TrainConfig JSON (see geopak_model/config.py)")
    ap.add_argument("--preset", help="cpu-small | gpu-full | test-tiny (used when --config is not given)")
    ap.add_argument("--data-root", help="override data_root")
    ap.add_argument("--phases", help="comma-separated phases to run, e.g. 1,2")
    ap.add_argument("--embed-only", action="store_true", help="only build the embedding cache")
    ap.add_argument("--embed-chunk-images", type=int, default=CHUNK_IMAGES,
                    help="the embedding build commits a shard every this many images (a kill loses at most one)")
    ap.add_argument("--embed-chunk-seconds", type=float, default=CHUNK_SECONDS,
                    help="... or every this many seconds of work, whichever comes first")
    ap.add_argument("--result", help="write the run summary (or cache stats) JSON here")
    return ap


def run_cli(argv: list[str] | None = None, log: Callable[[str], None] | None = None,
            on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Parse ``argv``, train (or only embed), write ``--result`` on rank 0. Returns the result on rank 0, None on
    the other ranks. ``log`` / ``on_epoch`` as for ``Trainer`` (the Pipes entry point passes its own)."""
    args = parser().parse_args(argv)
    if os.environ.get("GEOPAK_EXIT_WITH_PARENT") == "1":  # launched by a pipeline step: never outlive it
        exit_with_parent(os.getppid())
    if args.config:
        cfg = TrainConfig.from_json_file(args.config)
    else:
        cfg = preset(args.preset or "cpu-small")
    if args.data_root:
        cfg.data_root = args.data_root
    if args.phases:
        cfg.run_phases = [int(p) for p in args.phases.split(",")]
    chunk = (args.embed_chunk_images, args.embed_chunk_seconds)
    result = embed_only(cfg, log, chunk) if args.embed_only else Trainer(cfg, log, on_epoch=on_epoch,
                                                                          embed_chunk=chunk).run()
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    if args.result and main_rank:
        atomic_write_bytes(args.result, json.dumps(result, indent=2, default=float).encode())
    if dist.is_initialized():
        dist.destroy_process_group()
    return result if main_rank else None


def main(argv: list[str] | None = None) -> int:
    run_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
