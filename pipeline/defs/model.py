"""Geocells + splits → embedding cache → trained GEOPAK model. Thin wrappers: the work runs in
``python -m pipeline.train_entry`` (``geopak_model.train``, optionally under ``torchrun``), launched through Dagster
Pipes as a fresh subprocess, never in a fork of this process (no CUDA context is ever created here). Assets return paths and metadata, never models."""


import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dagster as dg
import pandas as pd
from pydantic import Field

from geopak_model.config import PRESETS, TrainConfig, preset
from geopak_model.report import baseline_comparison, beats_baselines
from pipeline.core.paths import DataPaths
from pipeline.core.processes import EXIT_WITH_PARENT_ENV
from pipeline.core.report import curves_png, round_km, share_pct
from pipeline.core.store import atomic_write_bytes
from pipeline.defs.config import config_class, overrides
from pipeline.defs.dagster_private import DagsterPipesExecutionError
from pipeline.defs.metadata import data_file, md_table, plot, rounded, settings_table, synthetic_note
from pipeline.defs.resources import DataRootResource, TorchrunResource, writes_stage
from pipeline.train_entry import EPOCH_MESSAGE, KILL_GRACE_S

REPO_ROOT = Path(__file__).resolve().parents[2]
# by key: the labels stage, the geocell stage's assets (issue 4) and the image shards (issue 22)
UPSTREAM = [dg.AssetKey("labelled_catalog"), dg.AssetKey("cell_assignments"), dg.AssetKey("dataset_splits"),
            dg.AssetKey("geocells"), dg.AssetKey("image_shards")]  # the images are read from the shards
EPOCH_COLUMNS = ["phase", "epoch", "train_total", "train_province", "train_cell", "train_offset_km", "train_aux_km",
                 "val_total", "val_median_km", "val_mean_km", "val_p90_km", "val_province_acc", "val_cell_acc",
                 "oracle_val_median_km", "seconds"]


# What a run may override on top of its preset: every TrainConfig field, typed, described and bounded (from the
# dataclass's metadata), empty by default = the preset's value. The run's own name, phases and data root are set
# by ModelRunResource and the data_root resource, so they are not overrides.
TrainOverrides = config_class(
    TrainConfig, name="TrainOverrides", optional=True, exclude=("data_root", "run_name", "run_phases", "preset"),
    doc="Settings merged into the preset by name (nested; phases index by index); empty: the preset's value.",
)


class ModelRunResource(dg.ConfigurableResource):
    """The model run: which preset (cpu-small: offline CPU smoke; gpu-full: the seed's hyperparameters), what to
    override, the run's name and phases. Set once here: the embedding cache, the training and the evaluation read
    the same run (as step config each had its own copy, and two copies could disagree)."""

    preset: Literal[tuple(sorted(PRESETS))] = Field(  # type: ignore[valid-type]
        default="cpu-small", description="cpu-small: offline CPU smoke run; gpu-full: the seed's hyperparameters; "
        "test-tiny: unit tests")
    overrides: TrainOverrides = Field(  # type: ignore[valid-type]
        default_factory=TrainOverrides, description="typed overrides merged into the preset, e.g. "
        "phases: [{epochs: 2}, {}, {}] or loss: {cell: 2.0}; anything left empty keeps the preset's value")
    run_name: str = Field(default="geopak", description="the run's folder under <data_root>/model/")
    phases: list[int] = Field(default=[0, 1, 2], description="which phases to train (0 warm-up, 1 heads, "
                              "2 fine-tuning)")
    nproc: int = Field(default=1, ge=1, description="> 1: torchrun --standalone --nproc_per_node (DDP) (≥ 1)")
    timeout_s: int = Field(default=24 * 3600, gt=0, description="the training subprocess is stopped after this "
                           "many seconds (> 0)")


def train_config(params: ModelRunResource, data_root: DataRootResource) -> TrainConfig:
    """The preset with the run's overrides merged in by name (``geopak_model.config.preset``)."""
    return preset(params.preset, **{**overrides(params.overrides), "data_root": str(data_root.paths.root),
                                    "run_name": params.run_name, "run_phases": list(params.phases)})


@dataclass
class TrainingRun:
    """What a training subprocess gave back: its result JSON (rank 0 writes it to the shared data root, so it is
    there even when rank 0 runs on another node), the metadata rank 0 reported through Pipes, and the per-epoch
    metrics rows it sent as Pipes messages."""

    result: dict
    reported: dict[str, dg.MetadataValue]
    epochs: list[dict]

    def metadata(self) -> dict[str, dg.MetadataValue | int]:
        """The Pipes-reported headline plus how many epoch rows came back through Pipes."""
        return {**self.reported, "epochs_reported_via_pipes": len(self.epochs)}


def launcher_args(params: ModelRunResource, torchrun: TorchrunResource, run_id: str, embed_only: bool) -> list[str]:
    """``pipeline.train_entry``'s own options: the time limit and (training with nproc > 1 or several nodes) the
    torchrun options. The embedding build always runs as one process (rank 0 computes, the others would wait)."""
    launch = [] if embed_only else torchrun.launch_args(params.nproc, run_id)
    return ["--timeout-s", str(params.timeout_s), *launch]


def run_training(context: dg.AssetExecutionContext, cfg: TrainConfig, run_dir: Path, extra: list[str],
                 pipes: dg.PipesSubprocessClient, launch: list[str]) -> TrainingRun:
    """Run ``python -m pipeline.train_entry <launch> -- <trainer args>`` through Dagster Pipes: the trainer's log
    lines arrive as Dagster logs while it runs, its epoch rows and headline as Pipes messages; a terminated run
    forwards SIGINT to it (torchrun then stops its workers), and ``GEOPAK_EXIT_WITH_PARENT`` ends it if this
    step's process dies. Returns its result JSON and what it reported."""
    run_dir.mkdir(parents=True, exist_ok=True)
    embed = "--embed-only" in extra
    cfg_path = run_dir / ("embed_config.json" if embed else "config.json")
    result_path = run_dir / ("embed_result.json" if embed else "result.json")
    atomic_write_bytes(cfg_path, cfg.to_json().encode())
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pipeline.train_entry", *launch, "--",
           "--config", str(cfg_path), "--result", str(result_path), *extra]
    env = {EXIT_WITH_PARENT_ENV: "1",  # the trainer dies with this step, never outlives it
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    context.log.info(f"running through Dagster Pipes: {' '.join(cmd)}")
    try:
        invocation = pipes.run(context=context, command=cmd, cwd=str(REPO_ROOT), env=env)
    except DagsterPipesExecutionError as exc:
        raise dg.Failure(f"training subprocess failed: {exc}", metadata={
            "command": " ".join(cmd), "hint": "the trainer's output is in this step's stdout/stderr; one that ran "
            f"past its time limit (timeout_s) was interrupted, and killed {KILL_GRACE_S:g} s later if it did not "
            "stop"}) from exc
    if not result_path.exists():
        raise dg.Failure(f"training subprocess exited without writing {result_path}")
    reported: dict[str, dg.MetadataValue] = {}
    for r in invocation.get_results(implicit_materializations=False):
        if isinstance(r, dg.MaterializeResult):
            reported.update(r.metadata or {})
    epochs = [m for m in invocation.get_custom_messages() if isinstance(m, dict) and m.get("kind") == EPOCH_MESSAGE]
    return TrainingRun(json.loads(result_path.read_text()), reported, epochs)


def selection_metadata(selection: dict | None) -> dict[str, dg.MetadataValue]:
    """The val selection as the UI shows it: the rule, every choice with its val score, the baselines' settings."""
    if not selection:
        return {}
    choices = pd.DataFrame(selection["choices"])
    choices["chosen"] = choices["chosen"].map({True: "← chosen", False: ""})
    return {
        "selection_rule": selection["rule"],
        "chosen_inference": settings_table(selection["inference"]),
        "val_end_to_end": settings_table(selection["val"], "metric"),
        "val_choices": md_table(choices, max_rows=len(choices)),
        "val_baselines": md_table(pd.DataFrame([{"baseline": k, **v} for k, v in selection["baselines"].items()])),
    }


def _run_dir(cfg: TrainConfig) -> Path:
    return DataPaths.at(cfg.data_root).run_dir(cfg.run_name, cfg.run_dir)


@dg.asset(
    pool="model",  # one writer of model/ at a time, across runs (dagster_home/dagster.yaml)
    group_name="model",
    kinds={"pytorch", "numpy"},
    deps=UPSTREAM,
    description="Frozen-encoder features (float16 memmap + Parquet index) per image and encoder weights id.",
)
@writes_stage("model")
def embedding_cache(context: dg.AssetExecutionContext, model_run: ModelRunResource, data_root: DataRootResource,
                    pipes_subprocess_client: dg.PipesSubprocessClient,
                    torchrun: TorchrunResource) -> dg.MaterializeResult:
    cfg = train_config(model_run, data_root)
    run = run_training(context, cfg, _run_dir(cfg), ["--embed-only"], pipes_subprocess_client,
                       launcher_args(model_run, torchrun, context.run_id, embed_only=True))
    stats = run.result
    return dg.MaterializeResult(metadata={
        **rounded(run.metadata()),
        # a sharded feature store (memmaps + index shards), not one table: its standard row count only
        "dagster/row_count": int(stats["cached_images"]),
        "cache_dir": data_file(data_root.paths, stats["cache_dir"]),
        "weights_id": stats["weights_id"],
        "cached_images": stats["cached_images"],
        "computed_now": stats.get("computed", 0),
        "reused": stats.get("reused", 0),
        "unreadable": stats.get("unreadable", 0),
        "bytes_changed": stats.get("bytes_changed", 0),
        "excluded_by_reason": settings_table(stats.get("excluded_by_reason", {}), "reason"),
        "shards_written": stats.get("shards_written", 0),
        "seconds": round(float(stats.get("seconds", 0.0)), 1),
        "train_images": stats["train_images"],
        "val_images": stats["val_images"],
        "encoders": f"{cfg.encoder.clip_model} ({cfg.encoder.clip_pretrained or 'random init'}) + "
                    f"{cfg.encoder.scene_arch} ({cfg.encoder.scene_weights or 'random init'}) at "
                    f"{cfg.encoder.image_size}px",
    })


@dg.asset(
    pool="model",  # one writer of model/ at a time, across runs (dagster_home/dagster.yaml)
    group_name="model",
    kinds={"pytorch"},
    deps=[embedding_cache],
    description="GEOPAK trained in phases 0-2; best checkpoint chosen on the end-to-end validation median.",
    check_specs=[dg.AssetCheckSpec("beats_majority_baselines", asset="geopak_model",
                                   description="val province and cell accuracy above the majority baselines")],
)
@writes_stage("model")
def geopak_model(context: dg.AssetExecutionContext, model_run: ModelRunResource, data_root: DataRootResource,
                 pipes_subprocess_client: dg.PipesSubprocessClient,
                 torchrun: TorchrunResource) -> dg.MaterializeResult:
    cfg = train_config(model_run, data_root)
    run_dir = _run_dir(cfg)
    run = run_training(context, cfg, run_dir, [], pipes_subprocess_client,
                       launcher_args(model_run, torchrun, context.run_id, embed_only=False))
    summary = run.result
    metrics = pd.read_json(run_dir / "metrics.jsonl", lines=True)
    paths = data_root.paths
    # the inline picture: the two curves a curator watches, one above the other, legible in the narrow column
    key_curves = curves_png(metrics, {"total loss (weighted)": ["train_total", "val_total"],
                                      "val median error (km)": ["val_median_km", "oracle_val_median_km"]},
                            title="", ncols=1)
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
    cache = summary.get("cache", {})
    return dg.MaterializeResult(check_results=[check], metadata={
        **synthetic_note(paths.labelled),  # first: every figure below inherits the caveat
        "loss_curves": plot(paths, "geopak_training_curves.png", key_curves, "loss and val median error"),
        "all_curves": plot(paths, "geopak_training_curves_all.png", curves, "every training curve"),
        **rounded(run.metadata()),
        "checkpoint": data_file(paths, summary["model"]),
        "run_dir": data_file(paths, run_dir),
        "preset": cfg.preset,
        "model_vs_baselines": comparison,
        "beats_majority_baselines": "yes" if beats_baselines(summary) else "no (see its check)",
        **selection_metadata(final.get("selection")),
        "val_median_km": round_km(final.get("val_median_km", float("nan"))),
        "val_province_acc_pct": share_pct(final.get("val_province_acc", float("nan"))),
        "val_cell_acc_pct": share_pct(final.get("val_cell_acc", float("nan"))),
        "metrics_per_epoch": md_table(metrics[cols], max_rows=200),
        "best_epochs": md_table(pd.DataFrame([{"phase": k, **v} for k, v in summary["phases"].items()]),
                                root=paths.root),
        "images": md_table(pd.DataFrame([{"train": summary["train_images"], "val": summary["val_images"],
                                          "cells": summary["cells"], **summary["table"]}])),
        # images left out because their bytes no longer hash to their id (issue 13.4), and any that became
        # unreadable after the cache was built (phase 2, export)
        "bytes_changed": int(cache.get("bytes_changed", 0)),
        "excluded_by_reason": settings_table(cache.get("excluded_by_reason", {}), "reason"),
        "unreadable_after_cache": settings_table(summary.get("unreadable_after_cache", {}), "image"),
    })
