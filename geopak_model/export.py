"""The end of a run: the exported model chosen on val, its inference settings, calibration and galleries
(``model.pt``, ``gallery.npz``, ``knn_gallery.npz``) and ``summary.json``. Functions of the ``Trainer`` whose
phases have run; every rank calls them (phase 2's features are encoded by all ranks), rank 0 writes."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from geopak_model.baselines import knn_features
from geopak_model.checkpoint import SELECTION, final_candidates, read_checkpoint, save_checkpoint, select_final
from geopak_model.data import FeatureData
from geopak_model.epochs import encode_features, fused_embeddings, validate
from geopak_model.evaluate import majority_baselines
from geopak_model.model import count_params
from geopak_model.retrieval import GALLERY_FILE, KNN_GALLERY_FILE, Gallery
from geopak_model.selection import select_baselines, select_inference, setting_scores
from pipeline.core.store import atomic_write_bytes, file_sha256

if TYPE_CHECKING:
    from geopak_model.trainer import Trainer


def choose_final(trainer: "Trainer") -> tuple[int, dict[int, dict[str, float]], FeatureData | None]:
    """The exported model: see ``checkpoint.select_final``. Each candidate is re-validated on the WHOLE split
    the same way (uncalibrated, the run's default inference settings), so like is compared with like. Also
    returns the chosen phase's val features (rank 0; None elsewhere), so the export does not encode val again
    (phase 2: the whole split through its best encoders, encoded here once, every rank its share)."""
    results, features = {}, {}
    for k in final_candidates(trainer.run_dir, trainer.cfg.run_phases):
        trainer.load_weights(read_checkpoint(trainer.ckpt_path(k, "best")))
        trainer.heads.province_calibration.fill_(1.0)
        trainer.heads.cell_calibration.fill_(1.0)
        with trainer.phase_threads(k):
            features[k] = trainer.val_features(k, full=True)
            if trainer.env.main:
                assert features[k] is not None
                results[k] = validate(trainer.heads, features[k], trainer.loss_ctx, trainer.cfg, trainer.device, k)
    # rank 0 decides (only it has the metrics); every rank validated so phase 2's encoding was shared
    choice = trainer.env.broadcast_int(select_final(results, trainer.cfg.run_phases) if trainer.env.main else 0)
    trainer.load_weights(read_checkpoint(trainer.ckpt_path(choice, "best")))
    return choice, results, features[choice]


def export_model(trainer: "Trainer", choice: int, candidates: dict[int, dict[str, float]],
                 val: FeatureData | None) -> dict[str, Any]:
    """``model.pt``: the chosen phase's best weights with every inference setting chosen on the whole validation
    split (``selection.select_inference``: the calibration — kept only if it improves the selection metric —,
    the hypotheses, the point estimator, the refinement) and the baselines' settings
    (``selection.select_baselines``), all with their val scores in ``ckpt["selection"]`` and the chosen values
    in its config's ``inference``; beside it ``gallery.npz`` (the training images in the model's fused space,
    for refinement) and ``knn_gallery.npz`` (their encoder features, for the kNN baseline), both tied to
    model.pt's sha256. ``val``: the chosen phase's val features (``_choose_final``'s; None on ranks > 0).
    Returns the selection record and the classifier's val metrics at the chosen settings."""
    model_path = trainer.run_dir / "model.pt"
    ckpt = read_checkpoint(trainer.ckpt_path(choice, "best"))
    train = trainer.train_data if choice < 2 else encode_features(
        trainer.encoder, trainer.train_table, trainer.paths.root, trainer.cfg, trainer.device, trainer.amp_dtype,
        failures=trainer.read_failures, env=trainer.env)
    if not trainer.env.main:
        return {}
    assert val is not None and train is not None
    trainer.heads.eval()
    t_lat, t_lon = train.labels["lat"].double().numpy(), train.labels["lon"].double().numpy()
    v_lat, v_lon = val.labels["lat"].double().numpy(), val.labels["lon"].double().numpy()
    gallery = Gallery.from_arrays(fused_embeddings(trainer.heads, train, trainer.device).cpu(), t_lat, t_lon,
                                  train.labels["cell_id"].numpy(), trainer.cells.n_cells)
    inf = trainer.cfg.inference
    record = select_inference(trainer.heads, fused_embeddings(trainer.heads, val, trainer.device),
                              val.labels["cell_id"].to(trainer.device), v_lat, v_lon, gallery, inf.mode_radius_km,
                              inf.prior_correction)
    train_knn, val_knn = knn_features(train.clip, train.scene), knn_features(val.clip, val.scene)
    record["baselines"] = select_baselines(t_lat, t_lon, train.labels["province_id"].numpy(), train_knn, val_knn,
                                           v_lat, v_lon, record.pop("val_pred_province"))
    record["checkpoint"] = {"criterion": SELECTION[max(choice, 1)][0], "phase": choice, "candidates": {
        str(k): {m: v.get(m) for m in ("val_joint_nll", "val_median_km", "val_acc_25km")}
        for k, v in sorted(candidates.items())}}
    cfg = dataclasses.replace(trainer.cfg, inference=dataclasses.replace(inf, **record["inference"]))
    ckpt["heads"] = {k: v.detach().cpu() for k, v in trainer.heads.state_dict().items()}  # chosen temperatures
    ckpt["calibration"] = record["calibration"]
    ckpt["selection"] = record
    ckpt["config"] = cfg.to_dict()  # the val-chosen inference settings (not part of a phase's fingerprint)
    save_checkpoint(model_path, ckpt)
    sha = file_sha256(model_path)
    gallery.model_sha256 = sha
    gallery.save(trainer.run_dir / GALLERY_FILE)
    Gallery.from_arrays(train_knn, t_lat, t_lon, train.labels["cell_id"].numpy(), trainer.cells.n_cells,
                        sha).save(trainer.run_dir / KNN_GALLERY_FILE)
    with trainer.phase_threads(choice):
        metrics = validate(trainer.heads, val, trainer.loss_ctx, cfg, trainer.device, choice)
    trainer.log(f"exported {model_path} (phase {choice}): chosen on val by '{record['rule']}': "
             f"{record['inference']}, calibration kept: {record['calibration']['kept']}; val median "
             f"{record['val']['median_km']:.1f} km, within 25 km {record['val']['acc_25km']:.3f}; gallery of "
             f"{len(gallery)} training images")
    return {"calibration": record["calibration"],
            "selection": {**{k: record[k] for k in ("rule", "inference", "classifier_val", "val", "checkpoint")},
                          "choices": setting_scores(record["candidates"]),
                          "baselines": {k: {kk: vv for kk, vv in v.items() if kk not in ("points", "point")}
                                        for k, v in record["baselines"]["chosen"].items()}},
            **metrics}


def write_summary(trainer: "Trainer", phase_info: dict[str, Any]) -> dict[str, Any]:
    model_path = trainer.run_dir / "model.pt"
    choice, results, val = choose_final(trainer)  # every rank: phase 2's candidates encode val together
    final: dict[str, Any] = {"phase": choice}
    final.update(export_model(trainer, choice, results, val))  # every rank encodes train; rank 0 writes ({} elsewhere)
    best_rows = {}
    for k, info in phase_info.items():
        rows = [h for h in trainer.history if h["phase"] == int(k) and h["epoch"] == info["epoch"]]
        best_rows[k] = rows[-1] if rows else {}
    summary = {
        "model": str(model_path), "run_dir": str(trainer.run_dir), "preset": trainer.cfg.preset,
        "device": str(trainer.device), "world_size": trainer.env.world, "precision": trainer.precision,
        "table": trainer.table_stats, "cache": trainer.cache_stats,
        "unreadable_after_cache": dict(trainer.read_failures),
        "train_images": len(trainer.train_table), "val_images": len(trainer.val_table),
        "cells": trainer.cells.n_cells, "cells_per_province": trainer.cells.counts_per_province,
        "class_weights": [round(float(x), 4) for x in trainer.class_weights],
        "baselines": majority_baselines(trainer.train_table, trainer.val_table, trainer.cells.center_lat,
                                        trainer.cells.center_lon),
        "phases": phase_info, "best_rows": best_rows, "final": final,
        # like with like: every candidate uncalibrated, default inference settings, the whole val split
        "final_candidates": {str(k): v.get(SELECTION[max(k, 1)][0]) for k, v in sorted(results.items())},
        "parameters": {"heads": count_params(trainer.heads), "encoders": count_params(trainer.encoder)},
    }
    if trainer.env.main:
        atomic_write_bytes(trainer.run_dir / "summary.json", json.dumps(summary, indent=2, default=float).encode())
    return summary
