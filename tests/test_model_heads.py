"""Heads (fusion, gating, offsets clamped by the cell radius) and the mixture-of-hypotheses inference."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from geopak_model.cells import CellTable
from geopak_model.config import ModelConfig
from geopak_model.geo import KM_PER_DEG_LAT, haversine_km, unit_xyz, xyz_to_latlon
from geopak_model.inference import fit_calibration, mixture_predict, point_estimate
from geopak_model.model import GeopakHeads


def cell_table(counts: dict[int, int], radius: float = 20.0) -> CellTable:
    rows = []
    for pid, n in counts.items():
        for local in range(n):
            rows.append({"province_id": pid, "local_id": local, "center_lat": 25.0 + pid + 0.1 * local,
                         "center_lon": 67.0 + 0.1 * local, "radius_km": radius})
    df = pd.DataFrame(rows)
    df.insert(0, "cell_id", range(len(df)))
    return CellTable.from_frames(df)


SMALL = ModelConfig(proj_dim=16, province_hidden=8, cell_head_small=8, cell_head_large=12, cell_head_threshold=3,
                    cell_emb_dim=4, province_emb_dim=4, offset_hidden=8, dropout=0.0, mvmf_head=True)


def test_architecture_follows_geopak():
    cells = cell_table({0: 40, 1: 10, 2: 0})
    heads = GeopakHeads(cells, 768, 2048, ModelConfig())
    assert heads.gate.bias.item() == pytest.approx(-0.4)
    assert heads.gate.weight.std().item() == pytest.approx(0.01, rel=0.3)
    assert heads.cell_heads[0][0].out_features == 512 and heads.cell_heads[0][-1].out_features == 40
    assert heads.cell_heads[1][0].out_features == 256 and heads.cell_heads[1][-1].out_features == 10
    assert isinstance(heads.cell_heads[2], torch.nn.Identity)
    assert heads.cell_emb.weight.shape == (50, 96) and heads.province_emb.weight.shape == (7, 32)
    assert heads.proj_clip[0].in_features == 768 and heads.proj_scene[0].in_features == 2048
    sd = heads.state_dict()
    assert float(sd["temperature"]) == pytest.approx(1.2)  # travels with the weights
    assert sd["local_to_global"].shape == (7, 40) and int(sd["local_to_global"][1, 9]) == 49
    assert int(sd["local_to_global"][2, 0]) == -1


def test_province_logits_divided_by_temperature():
    torch.manual_seed(0)
    heads = GeopakHeads(cell_table({0: 2}), 8, 8, SMALL).eval()
    e = torch.randn(3, 16)
    raw = heads.province_head(e)
    assert torch.allclose(heads.province_logits(e), raw / 1.2)


def test_true_province_head_in_training_and_all_heads_at_inference():
    torch.manual_seed(0)
    heads = GeopakHeads(cell_table({0: 2, 1: 3}), 8, 8, SMALL).eval()
    c, s = torch.randn(4, 8), torch.randn(4, 8)
    pids = torch.tensor([0, 1, 1, 0])
    out = heads(c, s, pids, torch.tensor([0, 2, 3, 1]))
    assert out["cell_mask"].tolist() == [[True, True, False], [True] * 3, [True] * 3, [True, True, False]]
    e = out["embedding"]
    assert torch.allclose(out["cell_logits"][1], heads.cell_heads[1](e[1]))
    assert torch.allclose(out["cell_logits"][0, :2], heads.cell_heads[0](e[0]))
    with torch.no_grad():  # changing province 1's head changes only province-1 samples
        heads.cell_heads[1][-1].bias += 5.0
    out2 = heads(c, s, pids, torch.tensor([0, 2, 3, 1]))
    assert torch.allclose(out2["cell_logits"][[0, 3]], out["cell_logits"][[0, 3]])
    assert torch.allclose(out2["cell_logits"][[1, 2]], out["cell_logits"][[1, 2]] + 5.0)
    full = heads(c, s)
    assert full["cell_logits_all"].shape == (4, 7, 3) and "cell_logits" not in full


def test_offsets_bounded_by_cell_radius_train_and_inference():
    torch.manual_seed(0)
    cells = cell_table({0: 2, 5: 1}, radius=30.0)
    heads = GeopakHeads(cells, 8, 8, SMALL)
    with torch.no_grad():
        heads.offset_head.out[-1].bias.copy_(torch.tensor([1e3, -1e3]))  # saturate tanh
    c, s = torch.randn(5, 8), torch.randn(5, 8)
    for mode in ("train", "eval"):
        getattr(heads, mode)()
        out = heads(c, s, torch.zeros(5, dtype=torch.long), torch.tensor([0, 1, 0, 1, 0]))
        lat_c = heads.cell_lat[torch.tensor([0, 1, 0, 1, 0])]
        lon_c = heads.cell_lon[torch.tensor([0, 1, 0, 1, 0])]
        dlat = (out["offset_lat"] - lat_c).abs()
        dlon = (out["offset_lon"] - lon_c).abs()
        assert torch.allclose(dlat, torch.full_like(dlat, 30.0 / KM_PER_DEG_LAT), rtol=1e-4)
        assert torch.allclose(dlon, 30.0 / (KM_PER_DEG_LAT * torch.cos(torch.deg2rad(lat_c))), rtol=1e-4)
    pred = mixture_predict(heads.eval(), heads.fuse(c, s)[0])
    valid = pred.hyp_cell >= 0
    lat_c = heads.cell_lat[pred.hyp_cell.clamp(min=0)]
    assert ((pred.hyp_lat - lat_c).abs()[valid] <= 30.0 / KM_PER_DEG_LAT * (1 + 1e-4)).all()


def test_mixture_of_hypotheses_by_hand():
    cells = cell_table({0: 3, 1: 2, 4: 0, 6: 1})
    heads = GeopakHeads(cells, 8, 8, SMALL).eval()
    with torch.no_grad():
        heads.offset_head.out[-1].weight.zero_()  # offsets 0: hypotheses are the cell centres
        heads.offset_head.out[-1].bias.zero_()
        heads.province_head[-1].weight.zero_()
        # province 4 has no cells: highest probability but never a hypothesis
        heads.province_head[-1].bias.copy_(torch.log(torch.tensor([0.3, 0.2, 1e-6, 1e-6, 0.45, 1e-6, 0.05])) * 1.2)
        for p, probs in ((0, [0.5, 0.3, 0.2]), (1, [0.9, 0.1]), (6, [1.0])):
            heads.cell_heads[p][-1].weight.zero_()
            heads.cell_heads[p][-1].bias.copy_(torch.log(torch.tensor(probs)))
    e = torch.randn(2, 16)
    pred = mixture_predict(heads, e, top_provinces=2, top_cells=2, prior_correction=False, point="mean")
    # top-2 provinces with cells: 0 (0.3) and 1 (0.2); top-2 cells each
    w = np.array([0.3 * 0.5, 0.3 * 0.3, 0.2 * 0.9, 0.2 * 0.1])
    w /= w.sum()
    gids = [0, 1, 3, 4]
    assert pred.hyp_cell[0].tolist() == gids
    np.testing.assert_allclose(pred.hyp_weight[0].numpy(), w, rtol=1e-5)
    xyz = (torch.tensor(w)[:, None] * unit_xyz(heads.cell_lat[gids].double(), heads.cell_lon[gids].double())).sum(0)
    lat, lon = xyz_to_latlon(xyz)
    assert float(pred.lat[0]) == pytest.approx(float(lat), abs=1e-4)
    assert float(pred.lon[0]) == pytest.approx(float(lon), abs=1e-4)
    assert float(pred.mean_lat[0]) == pytest.approx(float(lat), abs=1e-4)  # always reported beside the estimate
    assert pred.top_cell.tolist() == [3, 3]  # 0.18 beats 0.15
    assert int(pred.province_id[0]) == 4  # the province answer itself is still the argmax
    # top-5 cells of a 2-cell province: the missing hypotheses weigh nothing
    pred5 = mixture_predict(heads, e, top_provinces=2, top_cells=5, prior_correction=False)
    assert (pred5.hyp_weight[pred5.hyp_cell < 0] == 0).all()
    assert float(pred5.hyp_weight[0].sum()) == pytest.approx(1.0)


def _two_cities(share_a: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hypotheses around Karachi (three, 2 km apart) and Lahore (two), Karachi holding ``share_a``."""
    lat = torch.tensor([[24.86, 24.88, 24.84, 31.55, 31.57]], dtype=torch.float64)
    lon = torch.tensor([[67.00, 67.01, 67.02, 74.34, 74.35]], dtype=torch.float64)
    w = torch.tensor([[share_a / 3] * 3 + [(1 - share_a) / 2] * 2], dtype=torch.float64)
    return lat, lon, w


def test_point_estimates_seek_a_mode_instead_of_landing_between_cities():
    """Defect 8: the weighted mean of two cities lies in neither; the geometric median and the densest cluster
    land in the city holding most of the mass."""
    lat, lon, w = _two_cities(0.6)
    karachi = (24.86, 67.01)
    mean = point_estimate(lat, lon, w, "mean")
    assert haversine_km(torch.tensor(karachi[0]), torch.tensor(karachi[1]), mean[0].float(), mean[1].float()) > 300
    for method in ("geomedian", "mode"):
        la, lo = point_estimate(lat, lon, w, method, radius_km=25.0)
        d = float(haversine_km(torch.tensor(karachi[0]), torch.tensor(karachi[1]), la.float(), lo.float()))
        assert d < 5.0, (method, d)
    # the densest cluster wins on mass, not on the single heaviest hypothesis
    lat, lon, _ = _two_cities(0.5)
    w = torch.tensor([[0.2, 0.2, 0.2, 0.4, 0.0]], dtype=torch.float64)
    la, _ = point_estimate(lat, lon, w, "mode", radius_km=25.0)
    assert float(la) == pytest.approx(24.86, abs=0.05)
    with pytest.raises(ValueError):
        point_estimate(lat, lon, w, "centroid")


def test_geometric_median_minimises_expected_distance():
    torch.manual_seed(0)
    lat = 24 + 8 * torch.rand(1, 40, dtype=torch.float64)
    lon = 62 + 12 * torch.rand(1, 40, dtype=torch.float64)
    w = torch.rand(1, 40, dtype=torch.float64)
    w /= w.sum()
    la, lo = point_estimate(lat, lon, w, "geomedian")

    def cost(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((w * haversine_km(a, b, lat, lon)).sum())

    best = cost(la, lo)
    for dla, dlo in ((0.05, 0), (-0.05, 0), (0, 0.05), (0, -0.05)):
        assert best <= cost(la + dla, lo + dlo) + 1e-6


def test_calibration_fits_temperatures_that_lower_the_nll():
    """Over-confident heads (logits ×4 of the truth) get a cell temperature > 1 and a lower NLL."""
    cells = cell_table({0: 4, 1: 3})
    heads = GeopakHeads(cells, 8, 8, SMALL).eval()
    torch.manual_seed(0)
    e = torch.randn(400, 16)
    logits, _ = heads.cell_logits_all(e)
    true_p = torch.softmax(logits[:, 0, :4] / 4.0, -1)  # truth: much flatter than the heads say
    cell_ids = torch.multinomial(true_p, 1).squeeze(1)  # province 0's local ids are global ids 0..3
    with torch.no_grad():
        heads.province_head[-1].weight.zero_()
        heads.province_head[-1].bias.copy_(torch.tensor([5.0, -5, -5, -5, -5, -5, -5]))
    got = fit_calibration(heads, e, cell_ids, prior_correction=False)
    assert got["cell_temperature"] >= 2.0
    assert got["val_cell_nll_calibrated"] < got["val_cell_nll_uncalibrated"]
    assert float(heads.cell_calibration) == pytest.approx(got["cell_temperature"])


def test_prior_correction_shifts_province_probabilities():
    heads = GeopakHeads(cell_table({0: 1, 1: 1}), 8, 8, SMALL).eval()
    with torch.no_grad():
        heads.province_head[-1].weight.zero_()
        heads.province_head[-1].bias.zero_()
        heads.province_prior_shift.copy_(torch.tensor([math.log(4.0), 0, 0, 0, 0, 0, 0]))
    e = torch.randn(1, 16)
    plain = mixture_predict(heads, e, prior_correction=False).province_probs[0]
    corr = mixture_predict(heads, e, prior_correction=True).province_probs[0]
    assert float(plain[0]) == pytest.approx(1 / 7, rel=1e-5)
    assert float(corr[0] / corr[1]) == pytest.approx(4.0, rel=1e-5)


def test_mvmf_head_buffers_and_clamped_kappa():
    cells = cell_table({0: 2})
    heads = GeopakHeads(cells, 8, 8, SMALL)
    assert torch.allclose(heads.mvmf_centres[:, 0], heads.cell_lat)
    with torch.no_grad():
        heads.mvmf_log_kappa.fill_(100.0)
    out = heads(torch.randn(2, 8), torch.randn(2, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert float(out["mvmf_log_kappa"].detach().max()) == SMALL.log_kappa_max
    assert out["mvmf_logits"].shape == (2, 2)


def test_validation_runs_each_head_once_per_batch_with_the_same_metrics():
    """``evaluate_features`` reuses the forward's logits for the inference and both NLLs (it ran the province
    and cell heads three more times per batch before); the metrics equal those from separate head calls."""
    from geopak_model.config import InferenceConfig, LossConfig
    from geopak_model.data import FeatureData
    from geopak_model.evaluate import evaluate_features
    from geopak_model.inference import province_log_probs, true_cell_log_probs
    from geopak_model.losses import LossContext

    torch.manual_seed(0)
    cells = cell_table({0: 3, 1: 2, 4: 1})
    heads = GeopakHeads(cells, 8, 8, SMALL).eval()
    n = 10
    cell_id = torch.randint(0, cells.n_cells, (n,))
    labels = {"province_id": torch.as_tensor(cells.province_id)[cell_id].long(), "cell_id": cell_id,
              "lat": torch.as_tensor(cells.center_lat)[cell_id].float(),
              "lon": torch.as_tensor(cells.center_lon)[cell_id].float(), "koppen_id": torch.full((n,), 3),
              "doy_sin": torch.zeros(n), "doy_cos": torch.ones(n)}
    data = FeatureData(torch.randn(n, 8), torch.randn(n, 8), labels)
    calls = {"province": 0, "cell": 0}
    heads.province_head.register_forward_hook(lambda *_: calls.__setitem__("province", calls["province"] + 1))
    heads.cell_heads[0].register_forward_hook(lambda *_: calls.__setitem__("cell", calls["cell"] + 1))
    inf = InferenceConfig()
    got = evaluate_features(heads, data, LossContext.build(cells, None, LossConfig()), LossConfig(), inf,
                            torch.device("cpu"), batch_size=4)
    assert calls == {"province": 3, "cell": 3}  # 3 batches, each head once per batch
    with torch.no_grad():
        e = heads.fuse(data.clip, data.scene)[0]
        joint = -true_cell_log_probs(heads, e, cell_id, inf.prior_correction)
        prov = -province_log_probs(heads, e, inf.prior_correction).gather(1, labels["province_id"][:, None])
    assert got["val_joint_nll"] == pytest.approx(float(joint.mean()), rel=1e-5)
    assert got["val_province_nll"] == pytest.approx(float(prov.clamp(min=-50.0).mean()), rel=1e-5)
