"""GeopakPredictor, `geopak predict`, and the evaluation report (with a checkpoint the test builds itself)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geopak_model.cells import CellTable
from geopak_model.checkpoint import save_untrained
from geopak_model.config import preset
from geopak_model.predictor import GeopakPredictor, ImageLoadError
from pipeline.cli import main as cli_main
from pipeline.core.gazetteer import haversine_km
from pipeline.evaluation.report import ACC_KM, baseline_verdict, evaluate
from tests.model_world import build_world, with_test_split
from pipeline.defs.metadata import metadata_text


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    paths = with_test_split(build_world(root, per_cell=4, size=40))  # one image per cell goes to test
    labelled = pd.read_parquet(paths.labelled)
    cells = CellTable.from_frames(pd.read_parquet(paths.geocells), pd.read_parquet(paths.geocell_neighbours))
    ckpt = save_untrained(paths.model_dir / "geopak" / "model.pt", preset("test-tiny", data_root=str(root)), cells)
    return paths, ckpt, labelled


def test_predict_inputs_and_fields(world):
    paths, ckpt, labelled = world
    pred = GeopakPredictor.from_checkpoint(ckpt, device="cpu")
    files = [paths.root / p for p in labelled["path"].head(5)]
    one = pred.predict(files[0])
    assert {"lat", "lon", "province", "province_probs", "confidence", "hypotheses", "top_cells"} <= set(one)
    assert sum(one["province_probs"].values()) == pytest.approx(1.0, abs=1e-4)
    assert 0.0 <= one["confidence"] <= 1.0 + 1e-6
    assert 1 <= len(one["hypotheses"]) <= 10  # the ten most probable are listed, in order
    weights = [h["weight"] for h in one["hypotheses"]]
    assert weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1.0 + 1e-6
    few = pred.predict(files[0], top_provinces=2, top_cells=5)  # all 10 hypotheses listed: weights sum to 1
    assert sum(h["weight"] for h in few["hypotheses"]) == pytest.approx(1.0, abs=1e-4)
    # path, bytes and PIL image give the same answer; a list is batched
    same = [pred.predict(files[0].read_bytes()), pred.predict(Image.open(files[0]))]
    assert all(s["lat"] == pytest.approx(one["lat"], abs=1e-5) for s in same)
    batch = pred.predict(files, batch_size=2)
    assert len(batch) == 5 and batch[0]["lat"] == pytest.approx(one["lat"], abs=1e-4)


def test_single_hypothesis_is_centre_plus_clamped_offset(world):
    paths, ckpt, labelled = world
    pred = GeopakPredictor.from_checkpoint(ckpt, device="cpu")
    out = pred.predict(paths.root / labelled["path"].iloc[0], top_provinces=1, top_cells=1)
    (h,) = out["hypotheses"]
    assert (out["lat"], out["lon"]) == pytest.approx((h["lat"], h["lon"]), abs=1e-4)
    cells = pd.read_parquet(paths.geocells).set_index("cell_id")
    r = cells.loc[h["cell_id"], "radius_km"]
    assert haversine_km(h["center_lat"], h["center_lon"], h["lat"], h["lon"]) <= 1.5 * r + 1e-6


def test_bad_inputs(world, tmp_path):
    _, ckpt, _ = world
    pred = GeopakPredictor.from_checkpoint(ckpt, device="cpu")
    (tmp_path / "page.jpg").write_bytes(b"<html>nope</html>")
    for bad in (tmp_path / "missing.jpg", tmp_path / "page.jpg", b"\x00\x01", 42):
        with pytest.raises(ImageLoadError):
            pred.predict(bad)
    with pytest.raises(FileNotFoundError):
        GeopakPredictor.from_checkpoint(tmp_path / "none.pt")


def test_cli_predict(world, tmp_path, capsys):
    paths, ckpt, labelled = world
    good = str(paths.root / labelled["path"].iloc[0])
    (tmp_path / "notes.txt").write_text("hello")
    code = cli_main(["predict", good, str(tmp_path / "notes.txt"), str(tmp_path / "gone.jpg"), good,
                     "--checkpoint", str(ckpt), "--top-cells", "2"])
    out, err = capsys.readouterr()
    lines = [json.loads(x) for x in out.splitlines()]
    assert code == 1 and len(lines) == 2 and lines[0]["image"] == good
    assert len(lines[0]["hypotheses"]) <= 10  # at most 2 cells of each of the 7 provinces, 10 listed
    assert len(err.strip().splitlines()) == 2 and all(e.startswith("error: ") for e in err.strip().splitlines())
    assert cli_main(["predict", good, "--checkpoint", str(tmp_path / "none.pt")]) == 2


def test_evaluate_metrics_by_hand():
    n = 10
    lat = np.full(n, 30.0)
    lon = np.full(n, 70.0)
    off = np.where(np.arange(n) < 5, 0.0, 1.0)  # half exact, half 1° of latitude (≈ 111 km) off
    df = pd.DataFrame({
        "image_id": [f"{i}" for i in range(n)], "lat": lat, "lon": lon, "province_id": [0] * 6 + [1] * 4,
        "cell_id": list(range(n)), "koppen_id": [4] * n, "koppen_group": [2] * n, "day_of_year": [10] * 9 + [None],
        "pred_lat": lat + off, "pred_lon": lon, "top1_lat": lat, "top1_lon": lon, "aux_lat": lat + 2, "aux_lon": lon,
        "majority_lat": lat + 3, "majority_lon": lon, "oracle_lat": lat, "oracle_lon": lon,
        "pred_province_id": [0] * 6 + [0, 0, 1, 1], "pred_cell_top5": [[i, 99] if i % 2 else [99, i] for i in range(n)],
        "pred_koppen_id": [4] * 8 + [5, 5], "pred_koppen_group": [2] * n, "pred_day_of_year": [360] * n,
        "pred_province_uncorrected_id": [0] * n, "majority_province_id": [0] * n,
        "majority_cells_top5": [[0, 1, 2, 3, 4]] * n, "majority_koppen_id": [5] * n, "majority_koppen_group": [2] * n,
        "majority_day_of_year": [20] * n, "province_median_lat": lat + 0.1, "province_median_lon": lon,
        "knn_lat": lat + 0.5, "knn_lon": lon,
    })
    rep = evaluate(df)
    assert rep.metric("pred", "median_km") == pytest.approx(111.19 / 2, rel=1e-3)
    assert rep.metric("pred", "acc_1km") == 0.5 and rep.metric("pred", "acc_200km") == 1.0
    assert rep.metric("oracle", "median_km") == 0.0
    assert rep.metric("majority", "median_km") == pytest.approx(333.6, rel=1e-3)
    other = dict(zip(rep.other["metric"], rep.other["GeoPak"]))
    base = dict(zip(rep.other["metric"], rep.other["majority baseline"]))
    assert other["province accuracy (prior correction on)"] == 0.8
    assert other["province accuracy (prior correction off)"] == 0.6 == base["province accuracy (prior correction on)"]
    assert other["province accuracy, macro average over provinces (correction on)"] == pytest.approx((1.0 + 0.5) / 2)
    assert base["province accuracy, macro average over provinces (correction on)"] == pytest.approx(0.5)
    assert other["cell top-1 accuracy"] == 0.5 and other["cell top-5 accuracy"] == 1.0
    assert base["cell top-1 accuracy"] == 0.1 and base["cell top-5 accuracy"] == 0.5
    assert other["Köppen fine class accuracy"] == 0.8 and other["Köppen coarse group accuracy"] == 1.0
    assert base["Köppen fine class accuracy"] == 0.0
    doy = "day of year, mean absolute error (days, circular; lower is better)"
    assert other[doy] == pytest.approx(15.25) and base[doy] == pytest.approx(10.0)  # 10 vs 360; 10 vs 20
    # the verdict decides on paired bootstrap intervals of the differences: the kNN is 0.5° off for everyone
    # (55.6 km) and pred's median is the mean of 0 and 111 km = 55.6, so resamples put the difference on both
    # sides of zero: not distinguishable, and named
    verdict = baseline_verdict(rep)
    assert not verdict["passed"] and "kNN" in verdict["decision"] and "not distinguishable" in verdict["decision"]
    df2 = df.assign(knn_lat=lat + 2.0)
    v2 = baseline_verdict(evaluate(df2))
    assert v2["passed"] is False and "worse than: predicted province" in v2["decision"]  # 11 km for everyone
    df3 = df2.assign(province_median_lat=lat + 2.0)
    assert baseline_verdict(evaluate(df3))["passed"] is True  # 222 km for every baseline: every interval < 0
    again = evaluate(df3)  # seeded: the same predictions give the same intervals
    assert again.boot.interval("pred", "median_km") == evaluate(df3).boot.interval("pred", "median_km")
    assert int(rep.confusion.loc["punjab", "sindh"]) == 2
    assert set(rep.headline.columns) >= {f"acc_{k}km" for k in ACC_KM}


def test_evaluation_asset(world, boundaries_path):
    paths, _, _ = world
    from tests.conftest import materialize_evaluation

    md = materialize_evaluation(paths.root, boundaries_path)
    assert md["test_images"].value == 14 and md["unreadable_images"].value == 0
    table = metadata_text(md["distance_errors"])
    assert "ORACLE" in table and "majority cell centre" in table and "predicted province" in table
    assert "densest cluster" in table and "all training points" in table
    assert "[" in table  # every figure with its interval
    # an untrained checkpoint has no val selection and no kNN gallery: the report says so, it does not guess
    assert "no val selection record" in metadata_text(md["val: Settings chosen on val"])
    assert "kNN" not in table and "no knn_gallery.npz" in metadata_text(md["val: Settings of every method"])
    assert "baseline_comparison" in md and md["beats_every_baseline"].value.split()[0] in ("yes", "no")
    assert md["test_image_reads"].value == md["test_images"].value  # each test image read once
    assert "evaluation_error_cdf.preview.png" in md["error_cdf"].value
    html_path = paths.root / md["report_html"].value.replace("\u200b", "")  # relative to the data root
    text = open(html_path).read()
    assert "<img" in text and "ORACLE" in text
    assert (paths.evaluation_dir).is_dir() and list(paths.evaluation_dir.glob("*/report.md"))
