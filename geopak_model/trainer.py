"""The phase driver: a training run's data, cells, encoders and heads, and each phase's resume / epoch loop /
best checkpoint (open_clip's ``main``). Phase 0 (province pretraining) and phase 1 (all heads) run on cached
frozen-encoder features, phase 2 (top ~30% of both encoders unfrozen) on images with geography-safe augmentation.

Each phase resumes from ``phase<k>_last.pt`` when its fingerprint (config incl. the LR schedule, cells, data,
encoder weights) still matches, starts from the previous phase's best checkpoint otherwise, and keeps
``phase<k>_best.pt`` chosen on the validation negative log-likelihood of the truth under the inference
distribution (``checkpoint.SELECTION``; phase 0: of the province). Every epoch appends a row to
``metrics.jsonl``. Precision comes from ``precision.amp_dtype`` (bf16, fp16 with a GradScaler, or fp32 on CPU)
and is recorded in every checkpoint and ``summary.json``. The export and summary are ``export.py``'s; the epoch
functions ``epochs.py``'s; the collectives ``distributed.py``'s."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geopak_model.cache import CHUNK_IMAGES, CHUNK_SECONDS, EmbeddingCache, build_embedding_cache
from geopak_model.cells import CellTable
from geopak_model.checkpoint import (
    SELECTION,
    improves,
    initial_best,
    phase_checkpoint,
    read_checkpoint,
    resume_state,
    save_checkpoint,
)
from geopak_model.config import TrainConfig
from geopak_model.data import (
    FeatureData,
    ImageDataset,
    ProvinceBalancedBatchSampler,
    label_tensors,
    load_training_table,
    make_loader,
    tensors_to,
)
from geopak_model.distributed import DistEnv, setup_runtime
from geopak_model.encoders import build_encoders
from geopak_model.epochs import (
    SplitEncoder,
    TrainState,
    count_failures,
    encode_features,
    forward_batch,
    make_scaler,
    phase_parts,
    train_one_epoch,
    validate,
)
from geopak_model.export import write_summary
from geopak_model.losses import LossContext, effective_number_weights, loss_terms
from geopak_model.model import GeopakHeads, GeopakModel, count_params
from geopak_model.precision import amp_dtype, dtype_name
from geopak_model.schedule import offset_weight
from pipeline.core import reasons
from pipeline.core.paths import DataPaths
from pipeline.core.provinces import NUM_PROVINCES
from pipeline.core.store import atomic_write_bytes, stable_hash


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
        self.run_dir = self.paths.run_dir(cfg.run_name, cfg.run_dir)
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

    def ckpt_path(self, k: int, kind: str) -> Path:
        return phase_checkpoint(self.run_dir, k, kind)

    def _payload(self, k: int, epoch: int, extra: dict[str, Any]) -> dict[str, Any]:
        return {"phase": k, "epoch": epoch, "config": self.cfg.to_dict(), "cells": self.cells.to_state(),
                "encoder_weights_id": self.weights_id, "heads": self.heads.state_dict(),
                "encoder": self.encoder.state_dict() if k == 2 else None, "fingerprint": self.fingerprint(k),
                "precision": self.precision, **extra}

    def load_weights(self, ckpt: dict[str, Any]) -> None:
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
        return write_summary(self, phase_info)

    def run_phase(self, k: int) -> dict[str, Any]:
        """Resume, continue or start phase ``k``; returns its ``best`` record (metric, value, epoch, checkpoint)."""
        pc = self.cfg.phase(k)
        best_path = self.ckpt_path(k, "best")
        start = resume_state(self.run_dir, k, self.fingerprint(k), pc.epochs)
        if start.stale:
            self.log(f"phase {k}: {self.ckpt_path(k, 'last')} was trained with other settings/data; starting the phase "
                     "afresh")
        if start.status == "complete":
            assert start.last is not None
            self.log(f"phase {k}: already complete ({start.last['epoch'] + 1}/{pc.epochs} epochs); loading its best")
            self.history = list(start.last["history"])
            self.load_weights(read_checkpoint(best_path))
            return start.last["best"]
        if start.status == "fresh":
            self.history = [h for h in self.history if h["phase"] < k]
            if start.init_from is not None:
                self.load_weights(read_checkpoint(start.init_from))
                self.log(f"phase {k}: initialised from {start.init_from}")
            best = initial_best(k, best_path)
        else:
            assert start.last is not None
            self.load_weights(start.last)
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
        return TrainState(k, self.heads, net, opt, scaler, epoch, best or initial_best(k, self.ckpt_path(k, "best")),
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
        best_path, last = self.ckpt_path(k, "best"), self.ckpt_path(k, "last")
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
        self.load_weights(read_checkpoint(best_path))  # the next phase starts from this phase's best
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
        best_path, last = self.ckpt_path(k, "best"), self.ckpt_path(k, "last")
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

    def validate_now(self, k: int) -> dict[str, float]:
        """Validation of the current heads on rank 0 ({} on the others) on phase ``k``'s val features (phase 2:
        capped, re-encoded through the current encoders by every rank, so every rank must call it)."""
        data = self.val_features(k)
        if not self.env.main:
            return {}
        assert data is not None
        return validate(self.heads, data, self.loss_ctx, self.cfg, self.device, k)

    def val_features(self, k: int, full: bool = False) -> FeatureData | None:
        """The val split's features for phase ``k``: the cached ones (phases 0-1), or (phase 2) the val images
        through the current encoders, capped at ``max_val_images`` unless ``full``, each rank encoding its share
        and rank 0 gathering them (None on the other ranks)."""
        if k < 2:
            return self.val_data
        if full or self._val_encoder is None:
            return encode_features(self.encoder, self.val_table, self.paths.root, self.cfg, self.device,
                                   self.amp_dtype, 0 if full else self.cfg.max_val_images, self.read_failures,
                                   self.env)
        return self._val_encoder.encode(self.encoder, self.amp_dtype, self.read_failures)

    # --- summary ----------------------------------------------------------------------------------------------


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
