"""One evaluation of a trained model on a split, start to end, without Dagster (the asset is a thin wrapper).

Order matters for trust: the ledger is consulted BEFORE any test image is read (a refused evaluation reads
nothing); the test images are then read once each; every setting comes from the checkpoint's val selection
(an override is "other settings" for the ledger); the report records the code commit and date it came from, and
a forced re-evaluation says so at its top.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.evaluation.record import (
    append_ledger,
    check_ledger,
    code_commit,
    ledger_entry,
    stable_hash,
)
from pipeline.evaluation.report import (
    METHODS,
    EvaluationReport,
    baseline_verdict,
    evaluate,
    make_plots,
    selection_tables,
    test_predictions,
    write_report,
)

SAMPLE_WORLD_WARNING = ("SAMPLE WORLD: these test images are synthetic renderings made by the pipeline, not "
                        "photographs; the figures check the pipeline and say nothing about accuracy on real photos")


class TestReuseRefused(RuntimeError):
    """A second evaluation of the same model on the same test split with other settings, not forced."""


@dataclass
class EvaluationRequest:
    """What to evaluate and how; ``top_provinces``/``top_cells`` 0 = the checkpoint's val-chosen values."""

    run_name: str = "geopak"
    split: str = "test"
    top_provinces: int = 0
    top_cells: int = 0
    knn_baseline: bool = True
    batch_size: int = 32
    bootstrap_samples: int = 2000
    bootstrap_seed: int = 0
    force: bool = False


@dataclass
class EvaluationResult:
    report: EvaluationReport
    predictions: pd.DataFrame
    failed: list[dict]
    verdict: dict[str, Any]
    written: dict[str, Path]
    out_dir: Path
    banner: str
    notes: list[str]
    reads: int
    settings: dict[str, str] = field(default_factory=dict)


def _inference_line(inf: Any, calibration: dict | None, refine_available: bool, with_refinement: bool) -> str:
    cal = "no calibration record"
    if calibration:
        tp = calibration.get("province_temperature_used", calibration["province_temperature"])
        tc = calibration.get("cell_temperature_used", calibration["cell_temperature"])
        cal = (f"calibration {'kept' if calibration.get('kept', True) else 'fitted, not kept'} (temperatures "
               f"province {tp:.3g}, cell {tc:.3g})")
    line = f"top {inf.top_provinces} provinces × top {inf.top_cells} cells, point '{inf.point}', {cal}"
    if not with_refinement:
        return line
    if not refine_available:
        return line + ", refinement: no gallery beside the checkpoint"
    if not inf.refine:
        return line + ", refinement off"
    return (line + f", refinement on ({inf.refine_neighbours} look-alikes within {inf.refine_radius_km:g} km, "
                   f"temperature {inf.refine_temperature:g})")


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to the data root when it lies there: a report reads the same from any data root."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def evaluate_model(req: EvaluationRequest, checkpoint: Path, evaluation_dir: Path, test: pd.DataFrame,
                   train: pd.DataFrame, read_bytes: Callable[[str], bytes], weights_dir: Path | None = None,
                   run_id: str = "", outlines: dict | None = None, data: pd.DataFrame | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   log: Callable[[str], None] = lambda m: None) -> EvaluationResult:
    """Evaluate ``checkpoint`` on ``test`` (the split's rows) and write the report under ``evaluation_dir``;
    ``data``: the images per province and split and the cells (``report.data_table``), shown last. Raises
    ``TestReuseRefused`` before reading any image when the ledger refuses."""
    import dataclasses

    from geopak_model.checkpoint import read_checkpoint
    from geopak_model.predictor import GeopakPredictor
    from geopak_model.retrieval import KNN_GALLERY_FILE, file_sha256, load_gallery_for

    model_sha = file_sha256(checkpoint)  # hashed once and read once: the predictor and galleries reuse both
    ckpt = read_checkpoint(checkpoint)
    selection = ckpt.get("selection")
    predictor = GeopakPredictor.from_checkpoint(checkpoint, weights_dir=weights_dir, ckpt=ckpt, sha256=model_sha)
    inf = dataclasses.replace(predictor.cfg.inference, top_provinces=req.top_provinces or
                              predictor.cfg.inference.top_provinces,
                              top_cells=req.top_cells or predictor.cfg.inference.top_cells)
    settings = {"inference": dataclasses.asdict(inf), "calibration": [float(predictor.model.heads.province_calibration),
                                                                      float(predictor.model.heads.cell_calibration)],
                "baselines": (selection or {}).get("baselines", {}).get("chosen") and {
                    k: {kk: vv for kk, vv in v.items() if kk in ("k", "estimator", "radius_km")}
                    for k, v in selection["baselines"]["chosen"].items()},
                "knn_baseline": req.knn_baseline, "bootstrap": [req.bootstrap_samples, req.bootstrap_seed]}
    split_hash = stable_hash(sorted(test["image_id"]))
    ledger = check_ledger(evaluation_dir, model_sha, req.split, split_hash, settings, req.force)
    if not ledger.allowed:
        raise TestReuseRefused(ledger.message() + "; set force: true in the evaluation config to run it anyway "
                               "(its report will say so at the top)")
    banner = ""
    if ledger.conflicts:  # allowed because forced (or not the test split)
        banner = ("FORCED RE-EVALUATION: " if req.split == "test" else "RE-EVALUATION: ") + ledger.message() + \
            "; these figures are a second look at the same images, no longer an unbiased estimate"
    predictor.cfg.inference = inf  # the overrides, if any, for every prediction below

    reads = 0

    def read_once(rel: str) -> bytes:
        nonlocal reads
        reads += 1
        return read_bytes(rel)

    knn_gallery = load_gallery_for(checkpoint, KNN_GALLERY_FILE, model_sha) if req.knn_baseline else None
    log(f"evaluating {checkpoint} (sha256 {model_sha[:12]}) on {len(test)} {req.split} images")
    df, failed, method_settings = test_predictions(
        predictor, test, train, read_once, batch_size=req.batch_size, progress=progress,
        chosen_baselines=(selection or {}).get("baselines", {}).get("chosen"), knn_gallery=knn_gallery)
    calibration = ckpt.get("calibration")
    method_settings["pred"] = _inference_line(inf, calibration, predictor.gallery is not None, True)
    method_settings["classifier"] = _inference_line(inf, calibration, False, False)
    rep = evaluate(df, req.bootstrap_samples, req.bootstrap_seed)
    verdict = baseline_verdict(rep)
    chosen_on_val = selection_tables(selection, rep, method_settings)
    gap = [k for k in chosen_on_val if k.startswith("Validation")]
    rep.sections = {  # right after the headline: the verdict, then where every number's settings came from
        f"GeoPak against each baseline: {verdict['decision']}": verdict["frame"],
        **{k: chosen_on_val.pop(k) for k in gap},
        "Settings of every method": pd.DataFrame([{"method": METHODS[k], "settings": method_settings[k]}
                                                  for k in METHODS if k in method_settings]),
        **chosen_on_val,
        **({"Data: images per province and split, and geocells": data} if data is not None else {}),
    }
    make_plots(rep, df, outlines)

    now = dt.datetime.now(dt.timezone.utc)
    code = code_commit()
    out_dir = evaluation_dir / f"{req.run_name}-{now.strftime('%Y%m%dT%H%M%SZ')}"
    sources = test["source"].value_counts().sort_index() if "source" in test.columns else pd.Series(dtype=int)
    notes = [
        f"code: commit {code['commit']}" + (" + uncommitted changes" if code["dirty"] else ""),
        f"evaluated: {now.strftime('%Y-%m-%d %H:%M:%S')} UTC (run {run_id or 'outside Dagster'})",
        f"model: {_shown(checkpoint, evaluation_dir.parent)} (sha256 {model_sha[:12]}…, phase {ckpt.get('phase')}, "
        f"preset {predictor.cfg.preset})",
        f"{req.split} images by source: " + (", ".join(f"{k} {v}" for k, v in sources.items()) or "unknown"),
        *([SAMPLE_WORLD_WARNING] if "sample_world" in sources.index else []),
        f"GeoPak end to end: {method_settings['pred']}",
        f"beats_every_baseline: {verdict['decision']}",
        f"every figure carries a 95 % paired bootstrap interval ({req.bootstrap_samples} resamples, seed "
        f"{req.bootstrap_seed}); every setting was chosen on the val split (tables below), never on this split",
        f"each {req.split} image was read once ({reads} reads for {len(test)} images); the kNN baseline reuses the "
        "predictor's features of that read; every baseline is computed from the training split only",
        "the ORACLE row is given the true province and cell; it is what GEOPAK reported and is not achievable",
    ]
    if ledger.repeats:
        notes.append(f"this model was evaluated on this split with the same settings {len(ledger.repeats)} time(s) "
                     "before (the same numbers)")
    if failed:
        why = pd.Series([f["error"].split(":")[0] for f in failed]).value_counts().sort_index()
        notes.append(f"{len(failed)} {req.split} images could not be read and were not scored ("
                     + ", ".join(f"{k} {v}" for k, v in why.items()) + ")")
    record = {"run_name": req.run_name, "split": req.split, "evaluated_at": now.isoformat(), "run_id": run_id,
              "code": code, "model": {"path": str(checkpoint), "sha256": model_sha, "phase": ckpt.get("phase"),
                                      "preset": predictor.cfg.preset},
              "forced": bool(banner), "settings": settings,
              "verdict": {k: v for k, v in verdict.items() if k not in ("table", "frame")}}
    written = write_report(rep, out_dir, f"GeoPak evaluation ({req.split} split)", notes, banner, record)
    append_ledger(evaluation_dir, ledger_entry(model_sha, req.split, split_hash, settings, run_id, now.isoformat(),
                                               bool(banner), out_dir))
    return EvaluationResult(rep, df, failed, verdict, written, out_dir, banner, notes, reads, method_settings)
