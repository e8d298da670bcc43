"""Geocells + splits → embedding cache → trained GEOPAK model. Thin wrappers: the work runs in
``python -m geopak_model.train`` as a fresh subprocess (optionally under ``torchrun``), never in a fork of this
process (no CUDA context is ever created here). Assets return paths and metadata, never models."""


import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd

from geopak_model.config import PRESETS, TrainConfig, preset
from geopak_model.report import baseline_comparison, beats_baselines
from pipeline.core.report import curves_png
from pipeline.core.store import atomic_write_bytes
from pipeline.defs.metadata import md_table, plot
from pipeline.defs.resources import DataRootResource

REPO_ROOT = Path(__file__).resolve().parents[2]
# by key: the labels stage and the geocell stage's assets (issue 4)
UPSTREAM = [dg.AssetKey("labelled_catalog"), dg.AssetKey("cell_assignments"), dg.AssetKey("dataset_splits"),
            dg.AssetKey("geocells")]
EPOCH_COLUMNS = ["phase", "epoch", "train_total", "train_province", "train_cell", "train_offset_km", "train_aux_km",
                 "val_total", "val_median_km", "val_mean_km", "val_p90_km", "val_province_acc", "val_cell_acc",
                 "oracle_val_median_km", "seconds"]


class ModelParams(dg.Config):
    """Which preset (cpu-small: offline CPU smoke; gpu-full: the seed's hyperparameters) and what to override."""

    preset: str = "cpu-small"
    overrides_json: str = ""  # a JSON object merged into the preset, e.g. {"phases": [{"epochs": 2}, {}, {}]}
    run_name: str = "geopak"
    phases: list[int] = [0, 1, 2]
    nproc: int = 1  # > 1: torchrun --standalone --nproc_per_node (DDP)
    timeout_s: int = 24 * 3600


def train_config(params: ModelParams, data_root: DataRootResource) -> TrainConfig:
    if params.preset not in PRESETS:
        raise dg.Failure(f"unknown model preset {params.preset!r}; known: {sorted(PRESETS)}")
    overrides = json.loads(params.overrides_json) if params.overrides_json.strip() else {}
    return preset(params.preset, **{**overrides, "data_root": str(data_root.paths.root),
                                    "run_name": params.run_name, "run_phases": list(params.phases)})


def run_training(context: dg.AssetExecutionContext, cfg: TrainConfig, params: ModelParams, run_dir: Path,
                 extra: list[str]) -> dict:
    """Run ``geopak_model.train`` in a new interpreter, stream its log, return its result JSON."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / ("config.json" if "--embed-only" not in extra else "embed_config.json")
    result_path = run_dir / ("result.json" if "--embed-only" not in extra else "embed_result.json")
    atomic_write_bytes(cfg_path, cfg.to_json().encode())
    result_path.unlink(missing_ok=True)
    launcher = [sys.executable]
    if params.nproc > 1 and "--embed-only" not in extra:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(params.nproc)]
    cmd = [*launcher, "-m", "geopak_model.train", "--config", str(cfg_path), "--result", str(result_path), *extra]
    env = {**os.environ, "GEOPAK_EXIT_WITH_PARENT": "1",  # the trainer dies with this step, never outlives it
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    context.log.info(f"running: {' '.join(cmd)}")
    tail: list[str] = []
    with subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip()
                tail = (tail + [line])[-40:]
                if line and "UserWarning" not in line:
                    context.log.info(line)
            code = proc.wait(timeout=params.timeout_s)
        except BaseException:  # run terminated from the UI, timeout, interrupt: never leave training orphaned
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if code != 0 or not result_path.exists():
        raise dg.Failure(f"training subprocess failed (exit {code})", metadata={"log_tail": dg.MetadataValue.md(
            "```\n" + "\n".join(tail) + "\n```")})
    return json.loads(result_path.read_text())


def _run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path(cfg.data_root) / "model" / cfg.run_name


@dg.asset(
    group_name="model",
    kinds={"pytorch", "numpy"},
    deps=UPSTREAM,
    description="Frozen-encoder features (float16 memmap + Parquet index) per image and encoder weights id.",
)
def embedding_cache(context: dg.AssetExecutionContext, config: ModelParams,
                    data_root: DataRootResource) -> dg.MaterializeResult:
    cfg = train_config(config, data_root)
    stats = run_training(context, cfg, config, _run_dir(cfg), ["--embed-only"])
    return dg.MaterializeResult(metadata={
        "cache_dir": dg.MetadataValue.path(stats["cache_dir"]),
        "weights_id": stats["weights_id"],
        "cached_images": stats["cached_images"],
        "computed_now": stats.get("computed", 0),
        "reused": stats.get("reused", 0),
        "unreadable": stats.get("unreadable", 0),
        "seconds": stats.get("seconds", 0.0),
        "train_images": stats["train_images"],
        "val_images": stats["val_images"],
        "encoders": f"{cfg.encoder.clip_model} ({cfg.encoder.clip_pretrained or 'random init'}) + "
                    f"{cfg.encoder.scene_arch} ({cfg.encoder.scene_weights or 'random init'}) at "
                    f"{cfg.encoder.image_size}px",
    })


@dg.asset(
    group_name="model",
    kinds={"pytorch"},
    deps=[embedding_cache],
    description="GEOPAK trained in phases 0-2; best checkpoint chosen on the end-to-end validation median.",
    check_specs=[dg.AssetCheckSpec("beats_majority_baselines", asset="geopak_model",
                                   description="val province and cell accuracy above the majority baselines")],
)
def geopak_model(context: dg.AssetExecutionContext, config: ModelParams,
                 data_root: DataRootResource) -> dg.MaterializeResult:
    cfg = train_config(config, data_root)
    run_dir = _run_dir(cfg)
    summary = run_training(context, cfg, config, run_dir, [])
    metrics = pd.read_json(run_dir / "metrics.jsonl", lines=True)
    paths = data_root.paths
    curves = curves_png(metrics, {
        "total loss (weighted)": ["train_total", "val_total"],
        "loss terms": ["train_province", "val_province", "train_cell", "val_cell", "train_koppen", "train_doy"],
        "km (train/val)": ["train_offset_km", "val_median_km", "val_p90_km", "oracle_val_median_km"],
        "accuracy (val)": ["val_province_acc", "val_cell_acc"],
    }, title=f"GEOPAK {cfg.preset}: all phases")
    final = summary.get("final", {})
    cols = [c for c in EPOCH_COLUMNS if c in metrics.columns]
    comparison = md_table(baseline_comparison(summary))
    check = dg.AssetCheckResult(check_name="beats_majority_baselines", passed=beats_baselines(summary),
                                severity=dg.AssetCheckSeverity.WARN, metadata={"comparison": comparison})
    return dg.MaterializeResult(check_results=[check], metadata={
        "checkpoint": dg.MetadataValue.path(summary["model"]),
        "run_dir": dg.MetadataValue.path(str(run_dir)),
        "preset": cfg.preset,
        "model_vs_baselines": comparison,
        "beats_majority_baselines": beats_baselines(summary),
        "val_median_km": float(final.get("val_median_km", float("nan"))),
        "val_province_acc": float(final.get("val_province_acc", float("nan"))),
        "val_cell_acc": float(final.get("val_cell_acc", float("nan"))),
        "metrics_per_epoch": md_table(metrics[cols], max_rows=200),
        "loss_curves": plot(paths, "geopak_training_curves.png", curves, "training curves"),
        "best_epochs": md_table(pd.DataFrame([{"phase": k, **v} for k, v in summary["phases"].items()])),
        "images": md_table(pd.DataFrame([{"train": summary["train_images"], "val": summary["val_images"],
                                          "cells": summary["cells"], **summary["table"]}])),
    })
