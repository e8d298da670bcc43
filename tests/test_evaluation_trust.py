"""Issue 23: one selection rule on val, calibration that must earn its place, the prior shift after the
temperature, paired bootstrap intervals and the verdict they decide, baselines with val-chosen settings, the test
split read once and guarded by a ledger, and ``geopak report``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from geopak_model.baselines import densest_point, knn_locate, knn_neighbours
from geopak_model.inference import TEMPERATURE_BOUNDS, fit_calibration, province_log_probs
from geopak_model.model import GeopakHeads
from geopak_model.selection import Score, best_index
from pipeline.cli import main as cli_main
from pipeline.evaluation.bootstrap import paired_bootstrap, verdict
from pipeline.evaluation.record import append_ledger, check_ledger, ledger_entry, stable_hash
from tests.test_model_heads import SMALL, cell_table


def test_rule_median_first_then_share_within_25km_then_the_first_listed():
    a, b, c = Score(100.04, 0.10), Score(100.01, 0.20), Score(99.0, 0.0)
    assert best_index([a, b]) == 1  # equal median at 0.1 km: the larger share within 25 km
    assert best_index([a, b, c]) == 2  # a lower median wins whatever the share
    assert best_index([Score(50.0, 0.3), Score(50.0, 0.3)]) == 0  # a tie keeps the simpler (first) candidate


def test_calibration_is_fitted_continuously_inside_its_bounds():
    """Over-confident cell logits (×4 the truth's) get a temperature near 4, found continuously, not a grid edge."""
    heads = GeopakHeads(cell_table({0: 4, 1: 3}), 8, 8, SMALL).eval()
    torch.manual_seed(0)
    e = torch.randn(2000, 16)
    with torch.no_grad():
        heads.cell_heads[0][-1].weight.mul_(20.0)  # sharp logits, so the truth (÷4) is far from uniform
        logits, _ = heads.cell_logits_all(e)
        heads.province_head[-1].weight.zero_()
        heads.province_head[-1].bias.copy_(torch.tensor([5.0, -5, -5, -5, -5, -5, -5]))
    cell_ids = torch.multinomial(torch.softmax(logits[:, 0, :4] / 4.0, -1), 1, generator=torch.Generator()
                                 .manual_seed(1)).squeeze(1)
    got = fit_calibration(heads, e, cell_ids, prior_correction=False)
    assert 3.0 < got["cell_temperature"] < 5.5 and not got["cell_temperature_at_bound"]
    assert TEMPERATURE_BOUNDS[0] < got["province_temperature"] <= TEMPERATURE_BOUNDS[1]
    assert got["val_cell_nll_calibrated"] < got["val_cell_nll_uncalibrated"]
    assert float(heads.cell_calibration) == pytest.approx(got["cell_temperature"])


def test_prior_shift_is_added_after_temperature_scaling():
    heads = GeopakHeads(cell_table({0: 1, 1: 1}), 8, 8, SMALL).eval()
    e = torch.randn(3, 16)
    shift = torch.tensor([math.log(4.0), 0, 0, 0, 0, 0, 0])
    with torch.no_grad():
        heads.province_prior_shift.copy_(shift)
        heads.province_calibration.fill_(2.0)
    want = torch.log_softmax(heads.province_logits(e).float() / 2.0 + shift, -1)
    assert torch.allclose(province_log_probs(heads, e), want, atol=1e-6)


def test_paired_bootstrap_is_seeded_and_paired():
    rng = np.random.default_rng(0)
    a = rng.exponential(100, 300)
    errors = {"model": a, "same": a.copy(), "worse": a + 30.0}
    b1, b2 = paired_bootstrap(errors, 500, seed=3), paired_bootstrap(errors, 500, seed=3)
    assert b1.interval("model", "median_km") == b2.interval("model", "median_km")
    lo, hi = b1.interval("model", "median_km")
    assert lo < float(np.median(a)) < hi
    assert b1.difference("model", "same", "median_km") == (0.0, 0.0)  # paired: identical errors never differ
    assert verdict(*b1.difference("model", "same", "median_km"), "lower") == "not distinguishable"
    assert b1.difference("model", "worse", "median_km") == pytest.approx((-30.0, -30.0))
    assert verdict(*b1.difference("model", "worse", "median_km"), "lower") == "better"
    assert verdict(*b1.difference("worse", "model", "acc_25km"), "higher") in ("worse", "not distinguishable")


def test_ledger_refuses_a_second_look_at_test_with_other_settings(tmp_path):
    s1, s2 = {"top_cells": 64}, {"top_cells": 5}
    assert check_ledger(tmp_path, "m", "test", "ids", s1, force=False).allowed
    append_ledger(tmp_path, ledger_entry("m", "test", "ids", s1, "run1", "t1", False, tmp_path / "a"))
    same = check_ledger(tmp_path, "m", "test", "ids", s1, force=False)
    assert same.allowed and len(same.repeats) == 1
    other = check_ledger(tmp_path, "m", "test", "ids", s2, force=False)
    assert not other.allowed and "other settings" in other.message()
    assert check_ledger(tmp_path, "m", "test", "ids", s2, force=True).allowed
    assert check_ledger(tmp_path, "m", "val", "ids", s2, force=False).allowed  # val is where settings are chosen
    assert check_ledger(tmp_path, "m2", "test", "ids", s2, force=False).allowed  # another model
    assert stable_hash(s1) == stable_hash({"top_cells": 64})


def test_knn_and_densest_cluster_baselines():
    g = torch.eye(4)  # four training images, one per axis
    lat, lon = np.array([30.0, 30.0, 30.1, 35.0]), np.array([70.0, 70.05, 70.0, 75.0])
    q = torch.tensor([[1.0, 0.9, 0.8, 0.0]])
    nn = knn_neighbours(q, g, 3)
    assert nn.tolist() == [[0, 1, 2]]
    la, lo = knn_locate(nn, lat, lon, 1, "nearest")
    assert (la[0], lo[0]) == (30.0, 70.0)
    la, lo = knn_locate(nn, lat, lon, 3, "mode")
    assert abs(la[0] - 30.033) < 0.01 and abs(lo[0] - 70.017) < 0.01  # the three near points' mean
    d_lat, d_lon = densest_point(lat, lon, 25.0)
    assert abs(d_lat - 30.033) < 0.01 and abs(d_lon - 70.017) < 0.01


# --- end to end on a tiny trained model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from geopak_model.config import preset
    from geopak_model.trainer import Trainer
    from tests.model_world import build_world, with_test_split

    root = tmp_path_factory.mktemp("world")
    paths = with_test_split(build_world(root, per_cell=4, size=40))
    summary = Trainer(preset("test-tiny", data_root=str(root), cpu_threads=1, run_phases=[0, 1])).run()
    return paths, summary


def _evaluate(paths, **over):
    from pipeline.defs.evaluation import _split_table
    from pipeline.evaluation.run import EvaluationRequest, evaluate_model

    test = _split_table(paths, "test")
    return evaluate_model(EvaluationRequest(bootstrap_samples=300, **over), paths.model_dir / "geopak" / "model.pt",
                          paths.evaluation_dir, test, _split_table(paths, "train"),
                          lambda rel: (paths.root / rel).read_bytes())


def test_selection_is_recorded_and_every_choice_has_its_val_score(trained):
    from geopak_model.checkpoint import read_checkpoint
    from geopak_model.selection import GRID, setting_scores

    paths, summary = trained
    sel = read_checkpoint(paths.model_dir / "geopak" / "model.pt")["selection"]
    assert summary["final"]["selection"]["inference"] == sel["inference"]
    classifier = [r for r in sel["candidates"] if r["stage"] == "classifier"]
    assert len(classifier) == (len(GRID["calibration"]) * len(GRID["top_provinces"]) * len(GRID["top_cells"])
                               * len(GRID["point"]))
    best = classifier[best_index([Score(r["val_median_km"], r["val_acc_25km"]) for r in classifier])]
    assert best["chosen"] and best["point"] == sel["inference"]["point"]
    assert sel["calibration"]["kept"] == (best["calibration"] == "fitted")
    scores = setting_scores(sel["candidates"])
    assert {r["setting"] for r in scores} >= {"calibration", "top_cells", "point", "refine"}
    assert all(sum(r["chosen"] for r in scores if r["setting"] == s) <= 1 for s in {r["setting"] for r in scores})
    knn = sel["baselines"]["chosen"]["knn"]
    assert knn["k"] in GRID["knn_k"] and "val_median_km" in knn


def test_evaluation_reads_test_once_is_deterministic_and_guarded(trained, capsys):
    from pipeline.evaluation.run import TestReuseRefused

    paths, _ = trained
    first = _evaluate(paths)
    assert first.reads == len(first.predictions) == first.report.n_images  # one read per test image
    assert "knn" in first.report.errors  # from the predictor's features, with the val-chosen k
    md1 = (first.out_dir / "report.md").read_text()
    assert "[" in md1 and "beats_every_baseline: " in md1 and "code: commit " in md1
    assert not first.banner
    again = _evaluate(paths)  # the same settings: allowed, and the same numbers
    body = lambda text: [ln for ln in text.splitlines() if not ln.startswith(("- evaluated:", "- this model was"))]  # noqa: E731
    assert body((again.out_dir / "report.md").read_text()) == body(md1)
    with pytest.raises(TestReuseRefused, match="other settings"):
        _evaluate(paths, top_cells=2)
    forced = _evaluate(paths, top_cells=2, force=True)
    text = (forced.out_dir / "report.md").read_text()
    assert text.splitlines()[2].startswith("**FORCED RE-EVALUATION")
    assert cli_main(["report", "--data-root", str(paths.root)]) == 0
    out = capsys.readouterr().out
    assert "FORCED RE-EVALUATION" in out and "code: commit " in out and "evaluated: " in out


def test_evaluation_hashes_and_reads_the_checkpoint_once(trained, monkeypatch):
    import geopak_model.retrieval as retrieval

    paths, _ = trained
    model = paths.model_dir / "geopak" / "model.pt"
    hashed, loaded = [], []
    real_hash, real_load = retrieval.file_sha256, torch.load
    monkeypatch.setattr(retrieval, "file_sha256", lambda p: hashed.append(Path(p)) or real_hash(p))
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loaded.append(Path(f)) or real_load(f, *a, **k))
    result = _evaluate(paths, force=True)  # force: the test above evaluated with other settings too
    assert (model.with_name("gallery.npz").exists() and model.with_name("knn_gallery.npz").exists()
            and "knn" in result.report.errors)  # both galleries were checked against the model's sha256
    assert hashed == [model] and loaded.count(model) == 1


def test_resume_fingerprint_covers_the_lr_schedule_and_one_rebalancing(tmp_path):
    """With a cosine schedule a changed epoch count starts the phase afresh (its LR curve changed); class weights
    on top of the balanced sampler are refused."""
    import json

    from geopak_model.config import preset
    from geopak_model.trainer import Trainer
    from tests.model_world import build_world

    build_world(tmp_path, per_cell=3, size=40)

    def cfg(epochs: int, **over):
        return preset("test-tiny", data_root=str(tmp_path), cpu_threads=1, run_phases=[1],
                      phases=[{}, {"epochs": epochs, "schedule": "cosine"}, {}], **over)

    Trainer(cfg(2)).run()
    metrics = tmp_path / "model" / "geopak" / "metrics.jsonl"
    first = [json.loads(line) for line in metrics.read_text().splitlines()]
    Trainer(cfg(3)).run()
    again = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(again) == 3 and again[0]["lr"] != first[0]["lr"]  # retrained from epoch 1 on the new schedule
    with pytest.raises(ValueError, match="rebalancing twice"):
        Trainer(cfg(3, loss={"class_weight_beta": 0.9995})).run()
