"""Per-term gradient norms at the shared fusion layer (issue 11, defect 6): the auxiliary km regression dominated
the fusion layer unseen; each weighted term's gradient norm and share is now measured and logged per epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from geopak_model.diagnostics import gradient_share_metrics, term_gradient_norms
from geopak_model.config import preset
from geopak_model.trainer import Trainer
from tests.model_world import build_world


def test_norm_scales_with_weight_and_unconnected_terms_get_zero() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    other = nn.Parameter(torch.ones(2))
    y = shared(torch.randn(4, 3))
    terms = {"a": y.pow(2).mean(), "b": y.pow(2).mean(), "off": other.sum(), "unweighted": y.sum()}
    weights = {"a": 1.0, "b": 10.0, "off": 5.0, "unweighted": 0.0}
    norms = term_gradient_norms(terms, weights, shared.parameters())
    assert norms["a"] > 0 and norms["b"] == pytest.approx(10 * norms["a"], rel=1e-5)
    assert norms["off"] == 0.0 and norms["unweighted"] == 0.0
    # matches a plain backward of the weighted term; the graph survives for the training backward
    shared.zero_grad()
    (10.0 * terms["b"]).backward(retain_graph=True)
    ref = torch.sqrt(sum(p.grad.pow(2).sum() for p in shared.parameters()))
    assert norms["b"] == pytest.approx(float(ref), rel=1e-5)
    # a loss scale is undone
    scaled = term_gradient_norms(terms, weights, shared.parameters(), scale=1024.0)
    assert scaled["b"] == pytest.approx(norms["b"], rel=1e-5)


def test_shares_sum_to_one() -> None:
    m = gradient_share_metrics({"cell": 1.0, "aux_km": 3.0})
    assert m == {"grad_norm_cell": 1.0, "grad_share_cell": 0.25, "grad_norm_aux_km": 3.0, "grad_share_aux_km": 0.75}
    assert gradient_share_metrics({"x": 0.0}) == {"grad_norm_x": 0.0, "grad_share_x": 0.0}


def test_training_logs_gradient_shares(tmp_path: Path) -> None:
    """Every phase-1 epoch row of metrics.jsonl, and summary.json's best row, carries the norms and shares."""
    build_world(tmp_path, per_cell=3, size=40)
    cfg = preset("test-tiny", data_root=str(tmp_path), cpu_threads=1, run_phases=[1],
                 phases=[{}, {"epochs": 2}, {}])
    summary = Trainer(cfg).run()
    run = tmp_path / "model" / "geopak"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        norms = {k: v for k, v in r.items() if k.startswith("grad_norm_")}
        assert {"grad_norm_province", "grad_norm_cell"} <= set(norms) and len(norms) >= 4, sorted(norms)
        assert all(v > 0 for v in norms.values()), norms  # weighted terms only, all reach the fusion layer
        shares = [v for k, v in r.items() if k.startswith("grad_share_")]
        assert len(shares) == len(norms) and sum(shares) == pytest.approx(1.0)
    best = json.loads((run / "summary.json").read_text())["best_rows"]["1"]
    assert best["grad_share_cell"] == summary["best_rows"]["1"]["grad_share_cell"] > 0
