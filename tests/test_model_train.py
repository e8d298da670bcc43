"""Training end to end on a tiny synthetic world: phases 0-2, metrics, honest model selection, checkpoints
loadable with weights_only=True, resuming, the CLI, and DDP (2 gloo processes) against one process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from geopak_model.checkpoint import load_model, read_checkpoint
from geopak_model.config import TrainConfig, preset
from geopak_model.data import eval_view, load_image
from geopak_model.inference import mixture_predict
from geopak_model.trainer import Trainer
from geopak_model.predictor import GeopakPredictor
from geopak_model.retrieval import load_gallery_for
from tests.model_world import build_world

REPO = Path(__file__).resolve().parents[1]


def tiny(root: Path, **over) -> TrainConfig:
    return preset("test-tiny", data_root=str(root), cpu_threads=1, **over)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    build_world(root, per_cell=4, size=48, water_rows=3)
    cfg = tiny(root, model={"mvmf_head": True}, loss={"offset_ramp_epochs": 3},
               phases=[{"epochs": 2}, {"epochs": 3}, {"epochs": 1}])
    trainer = Trainer(cfg)
    with pytest.MonkeyPatch.context() as mp:  # which tables the final choice and the export encode
        import geopak_model.epochs as epochs_mod
        import geopak_model.trainer as trainer_mod

        real_encode, real_summary = epochs_mod.SplitEncoder.encode, trainer_mod.write_summary
        ENDING_ENCODES.clear()
        ending = []
        mp.setattr(trainer_mod, "write_summary", lambda *a: ending.append(1) or real_summary(*a))
        mp.setattr(epochs_mod.SplitEncoder, "encode", lambda self, *a, **k: (
            ENDING_ENCODES.append("val" if self.table is trainer.val_table else "train") if ending else None
        ) or real_encode(self, *a, **k))
        summary = trainer.run()
    return root, cfg, summary


ENDING_ENCODES: list[str] = []  # the tables encoded after the phases (final choice and export), in order


def test_the_end_of_a_run_encodes_val_once(trained):
    """Phase 2's candidate is validated on the whole val split through its encoders; the export reuses those
    features (it encoded val a second time before) and encodes train only when phase 2's model is exported."""
    _, _, summary = trained
    assert ENDING_ENCODES.count("val") == 1
    assert ENDING_ENCODES.count("train") == (summary["final"]["phase"] == 2)


def test_all_phases_metrics_and_selection(trained):
    root, cfg, summary = trained
    run = root / "model" / "geopak"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0)]
    for r in rows[2:]:
        for key in ("train_cell", "train_offset_km", "train_aux_km", "train_koppen", "train_doy", "train_mvmf",
                    "val_median_km", "val_mean_km", "val_p90_km", "val_province_acc", "val_cell_acc",
                    "oracle_val_median_km", "val_top1_median_km"):
            assert key in r and math.isfinite(r[key]), key  # present, a finite number
    assert rows[2]["offset_weight"] == pytest.approx(1 / 3) and rows[4]["offset_weight"] == 1.0
    # best phase-1 epoch: the lowest val NLL of the true cell under the inference distribution (not the noisy
    # median, never the oracle error)
    p1 = [r for r in rows if r["phase"] == 1]
    best = min(p1, key=lambda r: r["val_joint_nll"])
    assert summary["phases"]["1"]["epoch"] == best["epoch"] and summary["phases"]["1"]["metric"] == "val_joint_nll"
    assert summary["phases"]["0"]["metric"] == "val_province_nll"
    assert summary["class_weights"] == [1.0] * 7  # one rebalancing mechanism: the sampler, no class weights
    b = summary["baselines"]
    assert 0 < b["majority_province_acc"] < 1 and "majority_cell_acc" in b and "majority_cell_centre_median_km" in b
    assert summary["train_images"] + summary["val_images"] == 56 and summary["cells"] == 14
    assert json.loads((run / "summary.json").read_text())["model"] == str(run / "model.pt")
    assert summary["precision"] == "fp32" and read_checkpoint(run / "model.pt")["precision"] == "fp32"  # CPU


def test_checkpoints_load_weights_only_and_predict(trained):
    root, cfg, summary = trained
    run = root / "model" / "geopak"
    for name in ("phase0_best", "phase1_last", "phase2_best", "model"):
        ckpt = torch.load(run / f"{name}.pt", map_location="cpu", weights_only=True)
        assert isinstance(ckpt["config"], dict) and "center_lat" in ckpt["cells"]
    assert read_checkpoint(run / "phase1_best.pt")["encoder"] is None  # frozen: rebuilt and checked by id
    assert read_checkpoint(run / "phase2_best.pt")["encoder"] is not None  # phase 2 tuned the encoders
    # model.pt: the better of the phase-1 and phase-2 bests on the whole val split, both uncalibrated, on val NLL
    cands = {int(k): v for k, v in summary["final_candidates"].items()}
    assert set(cands) == {1, 2} and summary["final"]["phase"] == min(cands, key=cands.get)
    assert read_checkpoint(run / "model.pt")["phase"] == summary["final"]["phase"]
    assert summary["final"]["val_images"] == summary["val_images"]
    model, cfg2 = load_model(run / "model.pt")
    chosen = read_checkpoint(run / "model.pt")["selection"]["inference"]
    assert {k: v for k, v in cfg2.to_dict().items() if k != "inference"} == \
        {k: v for k, v in cfg.to_dict().items() if k != "inference"}
    assert {k: getattr(cfg2.inference, k) for k in chosen} == chosen  # the val-chosen settings are the config's
    labelled = __import__("pandas").read_parquet(root / "labels" / "labelled_catalog.parquet").head(3)
    x = torch.stack([eval_view(load_image(root / p), cfg.encoder.image_size) for p in labelled["path"]])
    with torch.no_grad():
        c, s = model.encoder(x)
        pred = mixture_predict(model.heads, model.heads.fuse(c, s)[0])
    assert pred.lat.shape == (3,) and torch.isfinite(pred.lat).all()
    assert ((pred.lat > 20) & (pred.lat < 40)).all()
    # model.pt carries temperatures fitted on val, used only if they won on val; the galleries beside it are tied
    # to its bytes
    final = read_checkpoint(run / "model.pt")
    cal = final["calibration"]
    assert cal["val_cell_nll_calibrated"] <= cal["val_cell_nll_uncalibrated"] + 1e-9
    used = cal["cell_temperature"] if cal["kept"] else 1.0
    assert float(final["heads"]["cell_calibration"]) == pytest.approx(used) == cal["cell_temperature_used"]
    sel = final["selection"]
    assert all("val_median_km" in r and "val_acc_25km" in r for r in sel["candidates"])
    assert sum(r["chosen"] for r in sel["candidates"]) == 2  # one classifier setting, one refinement setting
    assert {"knn", "province_median", "province_cluster", "global_median"} <= set(sel["baselines"]["chosen"])
    assert sel["checkpoint"]["criterion"] == "val_joint_nll" and set(sel["checkpoint"]["candidates"]) == {"1", "2"}
    gallery = load_gallery_for(run / "model.pt")
    assert gallery is not None and len(gallery) == summary["train_images"]
    knn = load_gallery_for(run / "model.pt", "knn_gallery.npz")
    assert knn is not None and len(knn) == summary["train_images"]
    predictor = GeopakPredictor.from_checkpoint(run / "model.pt", device="cpu")
    out = predictor.predict(root / labelled["path"].iloc[0])
    assert predictor.gallery is not None and 20 < out["refined_lat"] < 40
    load_model(run / "phase2_best.pt")
    load_model(run / "phase1_best.pt")  # heads-only checkpoint: encoder weights id verified
    ck = read_checkpoint(run / "phase1_best.pt")
    ck["encoder_weights_id"] = "0" * 24
    torch.save(ck, run / "tampered.pt")
    with pytest.raises(ValueError, match="weights id"):
        load_model(run / "tampered.pt")


def test_resume_and_skip(tmp_path):
    build_world(tmp_path, per_cell=3, size=40)
    cfg = tiny(tmp_path, run_phases=[1], phases=[{}, {"epochs": 2}, {}])
    Trainer(cfg).run()
    run = tmp_path / "model" / "geopak"
    rows2 = (run / "metrics.jsonl").read_text().splitlines()
    cfg3 = tiny(tmp_path, run_phases=[1], phases=[{}, {"epochs": 3}, {}])
    Trainer(cfg3).run()  # resumes at epoch 3 from phase1_last.pt
    rows3 = (run / "metrics.jsonl").read_text().splitlines()
    assert rows3[:2] == rows2 and len(rows3) == 3
    assert read_checkpoint(run / "phase1_last.pt")["epoch"] == 2
    Trainer(cfg3).run()  # complete: nothing retrained
    assert (run / "metrics.jsonl").read_text().splitlines() == rows3
    other = tiny(tmp_path, run_phases=[1], phases=[{}, {"epochs": 1, "lr": 5e-4}, {}])
    Trainer(other).run()  # other settings: the phase starts afresh
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def _torchrun(cfg: TrainConfig, path: Path, nproc: int) -> list[dict]:
    path.write_text(cfg.to_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "geopak_model.train", "--config", str(path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = Path(cfg.run_dir)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) trains to the same losses as one process on the same batches."""
    build_world(tmp_path, per_cell=4, size=40)
    base = dict(run_phases=[1], model={"dropout": 0.0, "koppen_head": True, "doy_head": True},
                phases=[{}, {"epochs": 2, "batch_size": 16, "batches_per_epoch": 3}, {}])
    Trainer(tiny(tmp_path, run_dir=str(tmp_path / "one"), **base)).run()  # one process (the CLI: asset tests)
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = _torchrun(tiny(tmp_path, run_dir=str(tmp_path / "two"), **base), tmp_path / "two.json", 2)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in ("train_total", "train_province", "train_cell", "train_offset_km", "val_total", "val_median_km"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    ck = read_checkpoint(tmp_path / "two" / "phase1_last.pt")
    ref = read_checkpoint(tmp_path / "one" / "phase1_last.pt")
    # Adam turns the ~1e-7 reduction-order differences of near-zero gradients into steps of up to lr: weights
    # agree to a few lr (1e-3), the losses above to 1e-4 relative
    for k, v in ref["heads"].items():
        assert torch.allclose(ck["heads"][k].float(), v.float(), atol=5e-3), k


def test_a_province_without_training_images(tmp_path):
    """All of one province's images held out (a tiny province under owner-disjoint splits): training runs, the
    province gets no class weight and is never predicted (its prior shift is −20), and its held-out images are
    still evaluated end to end rather than dropped."""
    import pandas as pd

    paths = build_world(tmp_path, per_cell=3, size=40)
    labelled = pd.read_parquet(paths.labelled)
    splits = pd.read_parquet(paths.splits)
    ajk = set(labelled.loc[labelled["province_id"] == 6, "image_id"])  # AJK
    assert ajk
    splits.loc[splits["image_id"].isin(ajk) & (splits["split"] == "train"), "split"] = "val"
    splits.to_parquet(paths.splits)
    summary = Trainer(tiny(tmp_path, run_phases=[0, 1])).run()
    assert summary["class_weights"][6] == 0.0
    model, _ = load_model(tmp_path / "model" / "geopak" / "model.pt")
    assert float(model.heads.province_prior_shift[6]) == pytest.approx(-20.0, abs=1.0)
    assert summary["final"]["val_images"] == summary["val_images"] >= len(ajk)
    assert math.isfinite(summary["final"]["val_median_km"])
