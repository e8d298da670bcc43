"""Losses against hand-computed values; gradients finite; masking of water-only samples and unknown dates."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from geopak_model.cells import CellTable
from geopak_model.config import LossConfig
from geopak_model.geo import KM_PER_DEG_LAT, haversine_km
from geopak_model.losses import (
    LossContext,
    doy_loss,
    effective_number_weights,
    geocell_kl,
    koppen_loss,
    log_vmf_density,
    masked_mean,
    mvmf_nll,
    province_loss,
    smoothed_cell_target,
    total_loss,
)
from geopak_model.geo import haversine_term


def test_effective_number_weights_by_hand():
    w = effective_number_weights(np.array([100, 10, 0]), beta=0.9)
    e = np.array([(1 - 0.9**100) / 0.1, (1 - 0.9**10) / 0.1])
    raw = 1 / e
    assert w[2] == 0.0
    np.testing.assert_allclose(w[:2], raw / raw.mean())
    assert w[:2].mean() == pytest.approx(1.0)
    assert w[1] > w[0]  # rarer class weighs more
    # β = 0: every present class counts once -> uniform weights
    np.testing.assert_allclose(effective_number_weights(np.array([5, 500]), 0.0), [1.0, 1.0])
    with pytest.raises(ValueError):
        effective_number_weights(np.array([1]), 1.0)


def test_province_loss_is_per_sample_weighted_mean():
    logits = torch.zeros(3, 7, requires_grad=True)
    target = torch.tensor([0, 1, 1])
    w = torch.tensor([2.0, 0.5, 1, 1, 1, 1, 1])
    loss = province_loss(logits, target, w)
    assert float(loss.detach()) == pytest.approx(math.log(7) * (2.0 + 0.5 + 0.5) / 3)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_masked_mean_ignores_nan_outside_mask_and_empty_is_zero():
    v = torch.tensor([1.0, float("nan"), 3.0, float("inf")], requires_grad=True)
    m = torch.tensor([True, False, True, False])
    out = masked_mean(v, m)
    assert float(out) == 2.0
    out.backward()
    assert torch.isfinite(v.grad).all() and v.grad.tolist() == [0.5, 0.0, 0.5, 0.0]
    empty = masked_mean(v, torch.zeros(4, dtype=torch.bool))
    assert float(empty) == 0.0


def test_geocell_kl_by_hand_with_padding():
    logits = torch.tensor([[0.0, math.log(3.0), 7.0]], requires_grad=True)  # third column is padding
    mask = torch.tensor([[True, True, False]])
    q = torch.tensor([[0.5, 0.5, 0.0]])
    kl = geocell_kl(logits, mask, q, torch.tensor([True]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(kl) == pytest.approx(expected, rel=1e-6)
    kl.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 2] == 0


def test_geocell_kl_averages_over_all_samples_not_per_province():
    # samples 0,1 from a province with 2 cells, sample 2 from one with 3 cells (padded logits)
    logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, False], [True, True, True]])
    q = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    per = [math.log(2), -math.log(math.e / (math.e + 1)), math.log(3)]
    got = geocell_kl(logits, mask, q, torch.ones(3, dtype=torch.bool))
    assert float(got) == pytest.approx(sum(per) / 3, rel=1e-6)
    # GEOPAK's sum of per-province batch means would be (per0 + per1)/2 + per2: different
    assert float(got) != pytest.approx((per[0] + per[1]) / 2 + per[2])
    masked = geocell_kl(logits, mask, q, torch.tensor([True, True, False]))
    assert float(masked) == pytest.approx((per[0] + per[1]) / 2, rel=1e-6)


def _line_cells(radius_km: float, spacing_km: float, n: int = 9) -> CellTable:
    """``n`` cells of one province on a meridian, ``spacing_km`` apart, and one cell of another province."""
    lat = 25.0 + np.arange(n) * spacing_km / KM_PER_DEG_LAT
    return CellTable.from_frames(pd.DataFrame({
        "cell_id": np.arange(n + 1), "province_id": [0] * n + [1], "local_id": [*range(n), 0],
        "center_lat": [*lat, 31.0], "center_lon": [67.0] * n + [74.0], "radius_km": [radius_km] * (n + 1)}))


def test_haversine_smoothing_by_hand():
    cells = _line_cells(radius_km=10.0, spacing_km=20.0)
    cfg = LossConfig(smooth_radius_factor=0.5, smooth_min_km=1.0)  # τ = 5 km for 10 km cells
    ctx = LossContext.build(cells, None, cfg)
    # the true point lies 4 km north of cell 4's centre (inside it)
    lat = torch.tensor([float(cells.center_lat[4]) + 4.0 / KM_PER_DEG_LAT], dtype=torch.float64)
    q, true_mass = smoothed_cell_target(lat, torch.tensor([67.0]), torch.tensor([4]), torch.tensor([0]), ctx, cfg)
    d = np.abs((np.arange(9) - 4) * 20.0 - 4.0)  # distance of the point to each centre
    raw = np.exp(-(d - 4.0) / 5.0)
    np.testing.assert_allclose(q[0, :9].numpy(), raw / raw.sum(), rtol=1e-5, atol=1e-6)
    assert float(true_mass[0]) == pytest.approx(raw[4] / raw.sum(), rel=1e-5)
    # the other province's cell is never a target; padding width is the widest province's
    assert q.shape == (1, 9)
    np.testing.assert_allclose(float(q.sum()), 1.0, rtol=1e-6)


def test_smoothing_keeps_small_cells_mostly_their_own():
    """GEOPAK's fixed τ (30-100 km) on 5 km urban cells left the true cell ~0.15 of the mass: tied to the cell
    size the true cell keeps most of it, and large rural cells still share with their neighbours."""
    rng = np.random.default_rng(0)
    for radius, spacing, fixed_tau in ((5.0, 8.0, 60.0), (40.0, 70.0, 100.0)):
        cells = _line_cells(radius_km=radius, spacing_km=spacing)
        n = 200
        true = torch.from_numpy(rng.integers(1, 8, n))
        offs = rng.uniform(-radius, radius, n) / KM_PER_DEG_LAT
        lat = torch.from_numpy(cells.center_lat[true.numpy()] + offs)
        prov = torch.zeros(n, dtype=torch.long)
        tied = LossConfig()
        _, mass = smoothed_cell_target(lat, torch.full((n,), 67.0), true, prov, LossContext.build(cells, None, tied),
                                       tied)
        old = LossConfig(smooth_radius_factor=1e6, tau_km={"sindh": fixed_tau})  # τ = the province's fixed τ
        _, old_mass = smoothed_cell_target(lat, torch.full((n,), 67.0), true, prov,
                                           LossContext.build(cells, None, old), old)
        assert float(mass.median()) > 0.5
        assert float(old_mass.median()) < 0.4  # a fixed τ spreads a small cell over its neighbours
        if radius > 20:
            assert float(mass.median()) < 0.95  # neighbours still get some mass


def test_haversine_by_hand_and_gradient_at_zero():
    f64 = torch.float64
    d = haversine_km(torch.tensor([30.0], dtype=f64), torch.tensor([70.0], dtype=f64),
                     torch.tensor([31.0], dtype=f64), torch.tensor([70.0], dtype=f64))
    assert float(d) == pytest.approx(KM_PER_DEG_LAT, rel=1e-9)
    # equator, 90° of longitude: a quarter of the circumference
    d = haversine_km(torch.tensor([0.0], dtype=f64), torch.tensor([0.0], dtype=f64), torch.tensor([0.0], dtype=f64),
                     torch.tensor([90.0], dtype=f64))
    assert float(d) == pytest.approx(math.pi / 2 * 6371.0088, rel=1e-6)
    lat = torch.tensor([30.0], requires_grad=True)
    haversine_km(lat, torch.tensor([70.0]), torch.tensor([30.0]), torch.tensor([70.0])).sum().backward()
    assert torch.isfinite(lat.grad).all()


def test_koppen_coarse_is_logsumexp_and_sum_of_targets():
    logits = torch.zeros(1, 31, requires_grad=True)
    target = torch.tensor([14])  # Cfa: group C has 9 members
    total, coarse = koppen_loss(logits, target, 0.5, 0.5)
    assert float(coarse) == pytest.approx(-math.log(9 / 31), rel=1e-6)
    assert float(total) == pytest.approx(0.5 * math.log(31) + 0.5 * -math.log(9 / 31), rel=1e-6)
    total.backward()
    assert torch.isfinite(logits.grad).all()
    # softmax over coarse logits equals the summed fine probabilities; soft targets sum within a group
    torch.manual_seed(0)
    lg = torch.randn(2, 31)
    soft = torch.zeros(2, 31)
    soft[0, 4], soft[0, 5], soft[1, 29] = 0.25, 0.75, 1.0  # BWh + BWk (both arid) -> coarse target 1 on B
    _, coarse = koppen_loss(lg, soft, 0.5, 0.5)
    p = torch.softmax(lg, -1)
    p_arid = p[:, 4:8].sum(-1)
    p_polar = p[:, 29:31].sum(-1)
    assert float(coarse) == pytest.approx(float(-(torch.log(p_arid[0]) + torch.log(p_polar[1])) / 2), rel=1e-5)


def test_doy_loss_circular():
    ang = torch.tensor([0.0, math.pi, math.pi / 2, 0.0])
    pred = torch.stack((torch.sin(torch.tensor([0.0, 0.0, 0.0, 1.0])),
                        torch.cos(torch.tensor([0.0, 0.0, 0.0, 1.0]))), -1) * 3.0  # scale does not matter
    s, c = torch.sin(ang), torch.cos(ang)
    s[3] = float("nan")
    per = []
    for i in range(3):
        per.append(float(doy_loss(pred[i:i + 1], s[i:i + 1], c[i:i + 1], torch.tensor([True]))))
    assert per == pytest.approx([0.0, 2.0, 1.0], abs=1e-6)
    p = pred.clone().requires_grad_(True)
    out = doy_loss(p, s, c, torch.isfinite(s))
    assert float(out) == pytest.approx(3.0 / 4, abs=1e-6)  # (0 + 2 + 1 + unknown 0) / whole batch of 4
    # a per-sample mean: two halves' mean equals the whole's (what DDP ranks average), however dates split
    halves = (doy_loss(pred[:1], s[:1], c[:1], torch.tensor([True])) +
              doy_loss(pred[1:2], s[1:2], c[1:2], torch.tensor([True]))) / 2
    assert float(halves) == pytest.approx(float(doy_loss(pred[:2], s[:2], c[:2], torch.tensor([True, True]))))
    out.backward()
    assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("kappa", [0.5, 5.0, 50.0, 400.0])
def test_vmf_log_density_exact(kappa):
    theta = torch.tensor([0.0, 0.01, 0.3, 1.0], dtype=torch.float64)
    lat = 90.0 - torch.rad2deg(theta)  # angle from the north pole
    hav = haversine_term(lat, torch.zeros(4, dtype=torch.float64), torch.full((4,), 90.0, dtype=torch.float64),
                         torch.zeros(4, dtype=torch.float64))
    got = log_vmf_density(torch.tensor(math.log(kappa), dtype=torch.float64), hav)
    expected = math.log(kappa / (4 * math.pi * math.sinh(kappa))) + kappa * torch.cos(theta)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-9, atol=1e-9)


def test_vmf_density_integrates_to_one():
    kappa = 5.0
    n = 2000
    theta = (torch.arange(n, dtype=torch.float64) + 0.5) * math.pi / n  # polar angle; symmetric in longitude
    hav = torch.sin(theta / 2) ** 2
    f = torch.exp(log_vmf_density(torch.tensor(math.log(kappa), dtype=torch.float64), hav))
    integral = float((f * 2 * math.pi * torch.sin(theta) * math.pi / n).sum())
    assert integral == pytest.approx(1.0, rel=1e-4)


def test_mvmf_nll_single_component_and_extremes_are_finite():
    centres = torch.tensor([[30.0, 70.0], [25.0, 67.0]])
    lat, lon = torch.tensor([30.1, 24.0]), torch.tensor([70.0, 66.0])
    logits = torch.tensor([[0.0, -1e4], [0.0, -1e4]], requires_grad=True)  # ~all weight on component 0
    log_kappa = torch.tensor([math.log(200.0), 16.0], requires_grad=True)  # κ ≈ 8.9e6 for component 1
    nll = mvmf_nll(logits, log_kappa, centres, lat, lon, torch.ones(2, dtype=torch.bool))
    hav0 = haversine_term(lat, lon, centres[:1, 0].expand(2), centres[:1, 1].expand(2))
    expected = -log_vmf_density(log_kappa[0].detach(), hav0).mean()
    assert float(nll) == pytest.approx(float(expected), rel=1e-4)
    nll.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(log_kappa.grad).all()


def _batch(water: list[bool]):
    n = len(water)
    torch.manual_seed(1)
    cells = CellTable.from_frames(pd.DataFrame({
        "cell_id": [0, 1], "province_id": [0, 0], "local_id": [0, 1], "center_lat": [25.0, 26.0],
        "center_lon": [67.0, 68.0], "radius_km": [20.0, 20.0]}))
    ctx = LossContext.build(cells, None, LossConfig())
    out = {"province_logits": torch.randn(n, 7, requires_grad=True),
           "cell_logits": torch.randn(n, 2, requires_grad=True), "cell_mask": torch.ones(n, 2, dtype=torch.bool),
           "offset_lat": torch.full((n,), 25.0, requires_grad=True), "offset_lon": torch.full((n,), 67.0),
           "aux_lat": torch.full((n,), 26.0, requires_grad=True), "aux_lon": torch.full((n,), 67.0),
           "koppen_logits": torch.randn(n, 31, requires_grad=True), "doy": torch.randn(n, 2, requires_grad=True)}
    batch = {"province_id": torch.zeros(n, dtype=torch.long), "cell_id": torch.zeros(n, dtype=torch.long),
             "lat": torch.full((n,), 25.1), "lon": torch.full((n,), 67.0),
             "koppen_id": torch.tensor([0 if wt else 4 for wt in water]),
             "doy_sin": torch.full((n,), 0.5), "doy_cos": torch.full((n,), math.sqrt(0.75))}
    return out, batch, ctx


def test_water_photos_are_located_like_any_other():
    """The water rule came from satellite patches; a ground photo at a lake keeps every location term."""
    out, batch, ctx = _batch([False, False, True])
    _, logged = total_loss(out, batch, ctx, LossConfig())
    out_w, batch_w, _ = _batch([True, True, True])
    _, logged_w = total_loss(out_w, batch_w, ctx, LossConfig())
    for term in ("cell", "offset", "aux", "doy"):
        assert logged_w[term] == pytest.approx(logged[term], rel=1e-6) and logged_w[term] > 0


def test_location_terms_are_normalised():
    """Offset error in cell radii, aux error in ``aux_scale_km``: the km figures stay as zero-weight monitors."""
    out, batch, ctx = _batch([False, False])
    cfg = LossConfig(aux_scale_km=100.0)
    total, logged = total_loss(out, batch, ctx, cfg)
    assert logged["offset_km"] == pytest.approx(0.1 * KM_PER_DEG_LAT, rel=1e-3)
    assert logged["offset"] == pytest.approx(0.1 * KM_PER_DEG_LAT / 20.0, rel=1e-3)  # cell radius 20 km
    assert logged["aux"] == pytest.approx(logged["aux_km"] / 100.0, rel=1e-6)
    expected = sum(getattr(cfg, k) * logged[k] for k in ("province", "cell", "offset", "aux", "koppen", "doy"))
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_unknown_dates_are_masked_and_gradients_finite():
    out, batch, ctx = _batch([False, False])
    batch["doy_sin"][:] = float("nan")
    total, logged = total_loss(out, batch, ctx, LossConfig())
    assert math.isfinite(float(total)) and logged["doy"] == 0.0
    total.backward()
    for k in ("province_logits", "cell_logits", "offset_lat", "koppen_logits", "doy"):
        assert torch.isfinite(out[k].grad).all(), k
