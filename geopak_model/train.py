"""Training: phase 0 (province pretraining) and phase 1 (all heads) on cached frozen-encoder features, phase 2
(top ~30% of both encoders unfrozen, images in the loop with geography-safe augmentation).

Each phase resumes from ``phase<k>_last.pt`` when its fingerprint (config, cells, data, encoder weights) still
matches, starts from the previous phase's best checkpoint otherwise, and keeps ``phase<k>_best.pt`` chosen on
the END-TO-END validation median (mixture inference; phase 0: validation province accuracy). Every epoch
appends a row to ``metrics.jsonl``. ``model.pt`` is the better of the phase-1 and phase-2 best checkpoints on the
whole validation split; ``summary.json`` holds its metrics, the majority baselines and the best epochs.

    python -m geopak_model.train --config cfg.json
    python -m geopak_model.train --preset cpu-small --data-root data
    torchrun --nproc_per_node=2 -m geopak_model.train --config cfg.json     # DDP (gloo on CPU, NCCL on GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from geopak_model.cache import EmbeddingCache, build_embedding_cache
from geopak_model.cells import CellTable
from geopak_model.checkpoint import read_checkpoint, save_checkpoint
from geopak_model.config import TrainConfig, preset
from geopak_model.data import (
    FeatureData,
    ImageDataset,
    ProvinceBalancedBatchSampler,
    label_tensors,
    load_training_table,
    make_loader,
)
from geopak_model.encoders import build_encoders
from geopak_model.evaluate import evaluate_features, majority_baselines
from geopak_model.losses import LossContext, effective_number_weights, total_loss
from geopak_model.model import GeopakHeads, GeopakModel, count_params
from pipeline.core.paths import DataPaths
from pipeline.core.provinces import NUM_PROVINCES
from pipeline.core.store import atomic_path, atomic_write_bytes

SELECTION = {0: ("val_province_acc", "max"), 1: ("val_median_km", "min"), 2: ("val_median_km", "min")}


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average a dict of floats over ranks (identical key order on every rank)."""
        if self.world == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t)}


def setup_runtime(pref: str) -> tuple[DistEnv, torch.device]:
    """Single process, or one rank of ``torchrun`` (NCCL with one GPU per rank, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = pref == "cuda" or (pref == "auto" and torch.cuda.is_available())
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        env = DistEnv(dist.get_rank(), dist.get_world_size())
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return env, torch.device("cuda", local)
        return env, torch.device("cpu")
    return DistEnv(), torch.device("cuda" if use_cuda else "cpu")


def cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Trainer:
    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] | None = None, runtime=None):
        self.cfg = cfg
        if cfg.cpu_threads > 0:
            torch.set_num_threads(cfg.cpu_threads)
        self.env, self.device = runtime or setup_runtime(cfg.device)
        self._log = log or (lambda m: print(m, flush=True))
        self.paths = DataPaths.at(cfg.data_root)
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else self.paths.model_dir / cfg.run_name
        self.cache_root = Path(cfg.cache_dir) if cfg.cache_dir else self.paths.embeddings_dir
        self.weights_dir = self.paths.root / "weights"
        self.amp = cfg.amp and self.device.type == "cuda"

        table, self.table_stats = load_training_table(self.paths)
        self.cells = CellTable.from_parquet(self.paths.geocells, self.paths.geocell_neighbours, cfg.loss.n_neighbours)
        if int(table["cell_id"].max()) >= self.cells.n_cells:
            raise ValueError("assignments name cells that are not in cells.parquet")
        self.encoder = build_encoders(cfg.encoder, self.weights_dir)
        self.weights_id = self.encoder.weights_id()
        self._encoder_tuned = False  # True once phase 2 changed (or a checkpoint replaced) the encoder weights
        self.table = table
        torch.manual_seed(cfg.seed)
        self.heads = GeopakHeads(self.cells, *self.encoder.dims, cfg.model)
        self.history: list[dict[str, Any]] = []
        self.cache_stats: dict[str, int] = {}
        self.train_data: FeatureData | None = None
        self.val_data: FeatureData | None = None

    def log(self, msg: str) -> None:
        if self.env.main:
            self._log(msg)

    # --- data -------------------------------------------------------------------------------------------------
    def prepare_cache(self) -> dict[str, int]:
        """Embeddings for every train/val image (rank 0 computes, the others wait), then the split tables."""
        need = self.table[self.table["split"].isin([self.cfg.train_split, self.cfg.val_split])]
        if self.env.main:
            t0 = time.perf_counter()
            cache, stats = build_embedding_cache(
                self.encoder, need, self.paths.root, self.cache_root, self.cfg.embed_batch_size, self.device,
                self.cfg.num_workers, self.cfg.amp, weights_id=self.weights_id,
                progress=lambda d, n: self.log(f"embedding cache: {d}/{n}") if d == n or d % 1024 < 64 else None)
            stats["seconds"] = round(time.perf_counter() - t0, 2)
            self.log(f"embedding cache {cache.dir}: {stats}")
        self.env.barrier()
        cache = EmbeddingCache(self.cache_root, self.weights_id)
        bad = cache.rejected_ids()
        usable = need[~need["image_id"].isin(bad)]
        self.cache_stats = {"weights_id": self.weights_id, "cached_images": len(cache), "unreadable": len(bad),
                            **(stats if self.env.main else {})}
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
        counts = np.bincount(self.train_table["province_id"].to_numpy(), minlength=NUM_PROVINCES)
        w = effective_number_weights(counts, self.cfg.loss.class_weight_beta)
        idx, tw = self.cells.smoothed_targets(self.cfg.loss.tau_km)
        self.loss_ctx = LossContext(torch.tensor(w, dtype=torch.float32), torch.from_numpy(idx),
                                    torch.from_numpy(tw).float()).to(self.device)
        self.class_weights = w
        # what the model is trained to believe (balanced batches × class weights) vs the true training prior
        sampler = self._sampler(0)
        trained = sampler.sampling_prior() * w
        true = counts / counts.sum()
        shift = np.where((trained > 0) & (true > 0), np.log(np.maximum(true, 1e-12)) - np.log(np.maximum(trained,
                                                                                                       1e-12)), -20.0)
        self.prior_shift = torch.tensor(shift - shift[true > 0].mean(), dtype=torch.float32)
        self.heads.province_prior_shift.copy_(self.prior_shift)

    def _sampler(self, k: int, with_seeds: bool = False) -> ProvinceBalancedBatchSampler:
        pc = self.cfg.phase(k)
        return ProvinceBalancedBatchSampler(
            self.train_table["province_id"].to_numpy(), pc.batch_size, pc.batches_per_epoch, self.cfg.sampler_shares,
            seed=self.cfg.seed + 101 * k, rank=self.env.rank, world_size=self.env.world, with_seeds=with_seeds)

    # --- checkpoints ------------------------------------------------------------------------------------------
    def fingerprint(self, k: int) -> str:
        c = self.cfg.to_dict()
        phases = [{kk: v for kk, v in p.items() if kk not in ("epochs", "val_every")} for p in c["phases"][: k + 1]]
        return _hash({"encoder": c["encoder"], "model": c["model"], "loss": c["loss"], "phases": phases,
                      "augment": c["augment"] if k == 2 else None, "shares": c["sampler_shares"], "seed": c["seed"],
                      "cells": self.cells.fingerprint(), "weights": self.weights_id,
                      "train": _hash(sorted(self.train_table["image_id"])), "val": _hash(sorted(self.val_table["image_id"])),
                      "max_val": c["max_val_images"] if k == 2 else None})

    def _ckpt(self, k: int, kind: str) -> Path:
        return self.run_dir / f"phase{k}_{kind}.pt"

    def _payload(self, k: int, epoch: int, extra: dict[str, Any]) -> dict[str, Any]:
        return {"phase": k, "epoch": epoch, "config": self.cfg.to_dict(), "cells": self.cells.to_state(),
                "encoder_weights_id": self.weights_id, "heads": self.heads.state_dict(),
                "encoder": self.encoder.state_dict() if k == 2 else None, "fingerprint": self.fingerprint(k),
                **extra}

    def _load_weights(self, ckpt: dict[str, Any]) -> None:
        self.heads.load_state_dict(ckpt["heads"])
        if ckpt.get("encoder") is not None:
            self.encoder.load_state_dict(ckpt["encoder"])
            self._encoder_tuned = True
        elif self._encoder_tuned:  # a heads-only checkpoint goes with the original frozen encoders
            self.encoder.load_state_dict(build_encoders(self.cfg.encoder, self.weights_dir).state_dict())
            self._encoder_tuned = False

    def _write_metrics(self) -> None:
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history)
        atomic_write_bytes(self.run_dir / "metrics.jsonl", lines.encode())

    # --- phases -----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.train_data is None:
            self.prepare_cache()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        phase_info: dict[str, Any] = {}
        for k in sorted(self.cfg.run_phases):
            phase_info[str(k)] = self.run_phase(k)
        summary = self._summary(phase_info)
        return summary

    def run_phase(self, k: int) -> dict[str, Any]:
        pc = self.cfg.phase(k)
        metric, mode = SELECTION[k]
        fp = self.fingerprint(k)
        last, best_path = self._ckpt(k, "last"), self._ckpt(k, "best")
        state = read_checkpoint(last) if last.exists() else None
        if state is not None and state.get("fingerprint") != fp:
            self.log(f"phase {k}: {last} was trained with other settings/data; starting the phase afresh")
            state = None
        if state is not None and state["epoch"] + 1 >= pc.epochs and best_path.exists():
            self.log(f"phase {k}: already complete ({state['epoch'] + 1}/{pc.epochs} epochs); loading its best")
            self.history = list(state["history"])
            self._load_weights(read_checkpoint(best_path))
            return state["best"]
        if state is None:
            self.history = [h for h in self.history if h["phase"] < k]
            prev = self._ckpt(k - 1, "best") if k > 0 else None
            if prev is not None and prev.exists():
                self._load_weights(read_checkpoint(prev))
                self.log(f"phase {k}: initialised from {prev}")
            start, best = 0, {"metric": metric, "value": None, "epoch": -1, "checkpoint": str(best_path)}
        else:
            self._load_weights(state)
            self.history = list(state["history"])
            start, best = state["epoch"] + 1, state["best"]
            self.log(f"phase {k}: resuming at epoch {start + 1}/{pc.epochs}")
        self.heads.province_prior_shift.copy_(self.prior_shift)

        with self.phase_threads(k):
            return self._run_epochs(k, state, start, best, best_path, last)

    @contextlib.contextmanager
    def phase_threads(self, k: int):
        """Heads-only phases on CPU run on one thread (unless ``cpu_threads`` says otherwise): their small matmuls
        lose more to thread hand-offs on a busy 2-core machine than they gain (measured ~3x faster)."""
        threads = torch.get_num_threads()
        if self.cfg.cpu_threads == 0 and self.device.type == "cpu" and k < 2:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _run_epochs(self, k: int, state: dict[str, Any] | None, start: int, best: dict[str, Any], best_path: Path,
                    last: Path) -> dict[str, Any]:
        pc = self.cfg.phase(k)
        metric, mode = SELECTION[k]
        net, opt, groups = self._build_optimiser(k)
        if state is not None and state.get("optimizer"):
            opt.load_state_dict(state["optimizer"])
        sampler = self._sampler(k, with_seeds=k == 2)
        steps_per_epoch = len(sampler)
        self.log(f"phase {k}: {count_params(self.heads, True) + count_params(self.encoder, True):,} trainable "
                 f"parameters, {steps_per_epoch} batches of {pc.batch_size} per epoch, {pc.epochs} epochs")
        for epoch in range(start, pc.epochs):
            t0 = time.perf_counter()
            torch.manual_seed(self.cfg.seed + 1000 * k + epoch)  # dropout stream: the same on resume
            sampler.set_epoch(epoch)
            train_m = self._train_epoch(k, epoch, net, opt, groups, sampler, steps_per_epoch)
            row: dict[str, Any] = {"phase": k, "epoch": epoch, **train_m}
            if self.env.main and ((epoch + 1) % max(1, pc.val_every) == 0 or epoch + 1 == pc.epochs):
                row.update(self._validate(k))
            row["seconds"] = round(time.perf_counter() - t0, 2)
            self.history.append(row)
            if self.env.main:
                value = row.get(metric)
                better = value is not None and not (isinstance(value, float) and math.isnan(value)) and (
                    best["value"] is None or (value < best["value"] if mode == "min" else value > best["value"]))
                if better:
                    best = {"metric": metric, "value": float(value), "epoch": epoch, "checkpoint": str(best_path)}
                    save_checkpoint(best_path, self._payload(k, epoch, {"best": best, "history": self.history}))
                save_checkpoint(last, self._payload(k, epoch, {"best": best, "history": self.history,
                                                               "optimizer": opt.state_dict()}))
                self._write_metrics()
                self.log(_epoch_line(row))
            self.env.barrier()
        self.env.barrier()
        self._load_weights(read_checkpoint(best_path))  # the next phase starts from this phase's best
        if not self.env.main:
            best = read_checkpoint(last)["best"]
        return best

    def _build_optimiser(self, k: int):
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
        net = module
        if self.env.world > 1:
            net = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)  # a rank's batch half may lack a province: its head is unused
        return net, opt, groups

    def _train_epoch(self, k: int, epoch: int, net: nn.Module, opt: torch.optim.Optimizer, groups, sampler,
                     steps_per_epoch: int) -> dict[str, float]:
        pc = self.cfg.phase(k)
        net.train()
        parts = ("province",) if k == 0 else ()
        offset_w = min(1.0, (epoch + 1) / max(1, self.cfg.loss.offset_ramp_epochs)) if k == 1 else 1.0
        sums: dict[str, float] = {}
        steps = 0
        total_steps = pc.epochs * steps_per_epoch
        if k == 2:
            ds = ImageDataset(self.train_table, self.paths.root, self.cfg.encoder.image_size, self.cfg.augment)
            batches = make_loader(ds, sampler, self.cfg.num_workers, pin_memory=self.device.type == "cuda")
        else:
            batches = sampler
        for i, item in enumerate(batches):
            step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = cosine_lr(g["base_lr"], step, total_steps, pc.warmup_steps) if pc.schedule == "cosine" \
                    else g["base_lr"]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                if k == 2:
                    if "image" not in item:
                        raise RuntimeError("a training batch had no readable image")
                    b = {kk: v.to(self.device, non_blocking=True) for kk, v in item.items()}
                    out = net(b["image"], b["province_id"], b["cell_id"], parts)
                else:
                    b = self.train_data.batch(item, self.device)
                    out = net(b["clip"], b["scene"], b["province_id"], b["cell_id"], parts)
                loss, logged = total_loss(out, b, self.loss_ctx, self.cfg.loss, offset_w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], self.cfg.grad_clip)
            opt.step()
            for kk, v in logged.items():
                sums[kk] = sums.get(kk, 0.0) + v
            sums["gate"] = sums.get("gate", 0.0) + float(out["gate"].detach().float().mean())
            steps += 1
        means = {f"train_{kk}": v / max(steps, 1) for kk, v in sums.items()}
        means = self.env.mean(means)
        means["lr"] = opt.param_groups[0]["lr"]
        means["offset_weight"] = offset_w
        return means

    def _validate(self, k: int, full: bool = False) -> dict[str, float]:
        data = self.val_data
        if k == 2:  # the encoders changed: features through the current encoders (capped for cost)
            data = self._features_now(self.val_table, 0 if full else self.cfg.max_val_images)
        parts = ("province",) if k == 0 else ()
        return evaluate_features(self.heads, data, self.loss_ctx, self.cfg.loss, self.cfg.inference, self.device,
                                 amp=self.amp, parts=parts)

    @torch.no_grad()
    def _features_now(self, table: pd.DataFrame, cap: int) -> FeatureData:
        if cap and len(table) > cap:  # a fixed random subset (the table may be ordered by province)
            table = table.sample(n=cap, random_state=self.cfg.seed).sort_index()
        self.encoder.eval()
        ds = ImageDataset(table, self.paths.root, self.cfg.encoder.image_size, augment=None)
        bs = self.cfg.embed_batch_size
        batches = [list(range(i, min(i + bs, len(ds)))) for i in range(0, len(ds), bs)]
        clip, scene, rows = [], [], []
        for batch in make_loader(ds, batches, self.cfg.num_workers, pin_memory=self.device.type == "cuda"):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                c, s = self.encoder(batch["image"].to(self.device))
            clip.append(c.float().cpu().half())
            scene.append(s.float().cpu().half())
            rows.extend(batch["row"].tolist())
        kept = table.iloc[rows].reset_index(drop=True)
        return FeatureData(torch.cat(clip), torch.cat(scene), label_tensors(kept))

    # --- summary ----------------------------------------------------------------------------------------------
    def _choose_final(self) -> tuple[int, dict[int, dict[str, float]]]:
        """The exported model: among the best checkpoints of the location phases (1, 2) of this run, the lowest
        end-to-end median on the WHOLE validation split (phase-2 epochs may have used a subset, and a short
        phase 2 can be worse than where it started). Phase 0 only when nothing else ran."""
        top = max(self.cfg.run_phases)
        cands = [k for k in (1, 2) if k <= top and self._ckpt(k, "best").exists()] or [top]
        results = {}
        for k in cands:
            self._load_weights(read_checkpoint(self._ckpt(k, "best")))
            with self.phase_threads(k):
                results[k] = self._validate(k, full=True)
        choice = min(cands, key=lambda k: results[k].get("val_median_km", math.inf)) if top > 0 else top
        self._load_weights(read_checkpoint(self._ckpt(choice, "best")))
        return choice, results

    def _summary(self, phase_info: dict[str, Any]) -> dict[str, Any]:
        model_path = self.run_dir / "model.pt"
        choice, results = self._choose_final() if self.env.main else (max(self.cfg.run_phases), {})
        if self.env.main:
            with atomic_path(model_path) as tmp:
                shutil.copyfile(self._ckpt(choice, "best"), tmp)
        best_rows = {}
        for k, info in phase_info.items():
            rows = [h for h in self.history if h["phase"] == int(k) and h["epoch"] == info["epoch"]]
            best_rows[k] = rows[-1] if rows else {}
        final = {"phase": choice, **results.get(choice, {})}
        summary = {
            "model": str(model_path), "run_dir": str(self.run_dir), "preset": self.cfg.preset,
            "device": str(self.device), "world_size": self.env.world,
            "table": self.table_stats, "cache": self.cache_stats,
            "train_images": len(self.train_table), "val_images": len(self.val_table),
            "cells": self.cells.n_cells, "cells_per_province": self.cells.counts_per_province,
            "class_weights": [round(float(x), 4) for x in self.class_weights],
            "baselines": majority_baselines(self.train_table, self.val_table, self.cells.center_lat,
                                            self.cells.center_lon),
            "phases": phase_info, "best_rows": best_rows, "final": final,
            "final_candidates": {str(k): v.get("val_median_km") for k, v in results.items()},
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


def embed_only(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build/refresh the embedding cache for the train and val images (the ``embedding_cache`` asset)."""
    trainer = Trainer(cfg, log)
    stats = trainer.prepare_cache()
    return {**stats, "cache_dir": str(trainer.cache_root / trainer.weights_id),
            "train_images": len(trainer.train_table), "val_images": len(trainer.val_table)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m geopak_model.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="TrainConfig JSON (see geopak_model/config.py)")
    ap.add_argument("--preset", help="cpu-small | gpu-full | test-tiny (used when --config is not given)")
    ap.add_argument("--data-root", help="override data_root")
    ap.add_argument("--phases", help="comma-separated phases to run, e.g. 1,2")
    ap.add_argument("--embed-only", action="store_true", help="only build the embedding cache")
    ap.add_argument("--result", help="write the run summary (or cache stats) JSON here")
    args = ap.parse_args(argv)
    if args.config:
        cfg = TrainConfig.from_json_file(args.config)
    else:
        cfg = preset(args.preset or "cpu-small")
    if args.data_root:
        cfg.data_root = args.data_root
    if args.phases:
        cfg.run_phases = [int(p) for p in args.phases.split(",")]
    result = embed_only(cfg) if args.embed_only else Trainer(cfg).run()
    if args.result and (not dist.is_initialized() or dist.get_rank() == 0):
        atomic_write_bytes(args.result, json.dumps(result, indent=2, default=float).encode())
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
