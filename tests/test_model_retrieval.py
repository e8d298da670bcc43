"""Retrieval refinement and the gallery: look-alikes in the most probable cells place the photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geopak_model.geo import haversine_km
from geopak_model.inference import Prediction
from geopak_model.retrieval import Gallery, file_sha256, load_gallery_for, nearest_neighbour, refine


def _prediction(cells: list[int], weights: list[float], lat: float = 30.0, lon: float = 70.0) -> Prediction:
    h = len(cells)
    t = torch.tensor
    return Prediction(lat=t([lat]), lon=t([lon]), mean_lat=t([lat]), mean_lon=t([lon]), province_probs=torch.ones(1, 7) / 7,
                      province_id=t([0]), top_cell=t([cells[0]]), hyp_cell=t([cells]),
                      hyp_province=torch.zeros(1, h, dtype=torch.long), hyp_weight=t([weights]),
                      hyp_lat=torch.full((1, h), lat), hyp_lon=torch.full((1, h), lon), coverage=t([1.0]))


def _gallery() -> Gallery:
    """Cell 0: a cluster of look-alikes near (25.0, 67.0) plus one stray; cell 1: different-looking images at
    (31.5, 74.3); cell 2: an exact look-alike far away, in a cell the classifier rules out."""
    emb = torch.tensor([[1.0, 0.0], [0.98, 0.2], [0.97, 0.25], [0.0, 1.0], [0.1, 1.0], [1.0, 0.0]])
    lat = np.array([25.00, 25.02, 25.01, 31.50, 31.52, 35.0])
    lon = np.array([67.00, 67.01, 67.03, 74.30, 74.31, 75.0])
    return Gallery.from_arrays(emb, lat, lon, np.array([0, 0, 0, 1, 1, 2]), n_cells=3)


def test_refinement_lands_on_lookalikes_near_the_estimate():
    g = _gallery()
    # the classifier's estimate lies 50 km from the look-alike cluster of cell 0
    pred = _prediction([0, 1], [0.6, 0.4], lat=25.45, lon=67.0)
    lat, lon = refine(pred, torch.tensor([[1.0, 0.05]]), g, radius_km=100.0, neighbours=3, temperature=0.05)
    assert float(haversine_km(lat, lon, torch.tensor([25.01]), torch.tensor([67.01]))) < 5.0
    # the perfect look-alike far away (cell 2, 35°N) is never a candidate: refinement stays in the region
    far = refine(_prediction([0, 1], [0.6, 0.4], lat=31.4, lon=74.3), torch.tensor([[1.0, 0.0]]), g, radius_km=100.0)
    assert float(far[0]) == pytest.approx(31.51, abs=0.05)
    # no gallery image near the estimate: the classifier's estimate stands
    lat2, lon2 = refine(_prediction([3], [1.0]), torch.tensor([[1.0, 0.05]]), g, radius_km=50.0)
    assert (float(lat2), float(lon2)) == (30.0, 70.0)


def test_gallery_round_trip_is_sorted_by_cell_and_tied_to_its_checkpoint(tmp_path):
    g = Gallery.from_arrays(torch.randn(5, 3), np.arange(5.0), np.arange(5.0), np.array([2, 0, 1, 0, 2]), 3)
    assert g.cell_id.tolist() == [0, 0, 1, 2, 2] and g.cell_start.tolist() == [0, 2, 3, 5]
    assert torch.allclose(g.emb.float().norm(dim=1), torch.ones(5), atol=1e-3)
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    g.model_sha256 = file_sha256(ckpt)
    g.save(tmp_path / "gallery.npz")
    back = load_gallery_for(ckpt)
    assert back is not None and torch.equal(back.emb, g.emb) and back.cell_start.tolist() == [0, 2, 3, 5]
    ckpt.write_bytes(b"other weights")  # a retrained model: the old gallery must not be used
    with pytest.raises(ValueError, match="another checkpoint"):
        load_gallery_for(ckpt)
    (tmp_path / "gallery.npz").unlink()
    assert load_gallery_for(ckpt) is None
    with pytest.raises(ValueError):
        Gallery.from_arrays(torch.randn(1, 3), np.zeros(1), np.zeros(1), np.array([5]), 3)


def test_nearest_neighbour_is_cosine_in_blocks():
    torch.manual_seed(0)
    g = torch.randn(50, 8)
    q = g[[3, 17, 42]] * 5.0 + 0.01 * torch.randn(3, 8)  # scale does not matter for cosine
    assert nearest_neighbour(q, g, batch=2).tolist() == [3, 17, 42]


# --- batched refinement against the per-query loop it replaced (issue 22.4) ---------------------------------------
def _per_query_loop():
    """The loop before issue 22, kept verbatim in bench/bench_refine.py (the bench times the two against each
    other; here they must give the same answers)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_refine", Path(__file__).parents[1] / "bench" / "bench_refine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clustered(n: int, dim: int, seed: int, dup_rows: int = 0) -> tuple[Gallery, Prediction, torch.Tensor]:
    """Photos around 40 towns in Pakistan plus a sparse scatter; queries near gallery images, one far away (no
    candidates) and one in the scatter (fewer candidates than neighbours); ``dup_rows`` near-copies of one row (a
    dense top: many cosines within the fast product's error of each other)."""
    rng = np.random.default_rng(seed)
    towns = np.column_stack([rng.uniform(24.5, 36.0, 40), rng.uniform(62.0, 76.0, 40)])
    which = rng.integers(0, 40, n)
    lat, lon = towns[which, 0] + rng.normal(0, 0.2, n), towns[which, 1] + rng.normal(0, 0.2, n)
    lat[: n // 20], lon[: n // 20] = rng.uniform(24, 37, n // 20), rng.uniform(61, 77, n // 20)
    emb = torch.from_numpy(rng.standard_normal((n, dim), dtype=np.float32))
    emb[n // 2: n // 2 + dup_rows] = emb[n // 2] + 1e-3 * torch.randn(dup_rows, dim)
    lat[n // 2: n // 2 + dup_rows], lon[n // 2: n // 2 + dup_rows] = lat[n // 2], lon[n // 2]
    bench = _per_query_loop()
    g = Gallery.from_arrays(emb, lat, lon, rng.integers(0, 300, n), 300)
    pred, e = bench.random_queries(g, 40, seed=seed + 1)
    pred.lat[0], pred.lon[0] = 5.0, 40.0  # nothing within reach
    pred.lat[1], pred.lon[1] = float(lat[0]), float(lon[0])  # in the sparse scatter
    if dup_rows:
        pred.lat[2], pred.lon[2] = float(lat[n // 2]), float(lon[n // 2])
        e[2] = g.emb[torch.nonzero(g.lat == float(lat[n // 2]))[0, 0]].float()
    return g, pred, e


@pytest.mark.parametrize("radius,neighbours,temperature", [(100.0, 16, 0.1), (50.0, 4, 0.03), (200.0, 64, 0.3)])
def test_batched_refinement_gives_the_per_query_loops_answers(radius, neighbours, temperature):
    g, pred, e = _clustered(6000, 48, seed=3, dup_rows=300)
    old = _per_query_loop().refine_per_query(pred, e, g, radius, neighbours, temperature)
    new = refine(pred, e, g, radius, neighbours, temperature)
    split = refine(pred, e, g, radius, neighbours, temperature, batch=7)  # batches of the batch
    for got in (new, split):
        # the cosines are float32 sums in another order (~1e-7), which moves a softmax(cos / T) weighted mean by
        # far less than a metre; another neighbour or cluster would move it by kilometres
        assert float((got[0] - old[0]).abs().max()) < 1e-6 and float((got[1] - old[1]).abs().max()) < 1e-6
    assert (float(new[0][0]), float(new[1][0])) == (5.0, 40.0)  # no candidate: the classifier's estimate stands
    assert got[0].dtype == torch.float64 and got[0].device.type == "cpu"


def test_fast_product_bound_holds_and_more_candidates_are_fetched_when_needed(monkeypatch):
    """The exact re-scoring is only exact if |fast − exact| stays within ``error_bound``; and near-copies (a top
    denser than that bound) make the first 4 × neighbours candidates too few, so a second pass fetches more."""
    from geopak_model import retrieval

    g, pred, e = _clustered(3000, 48, seed=5, dup_rows=400)
    index = g.index_on("cpu")
    q = torch.nn.functional.normalize(e.float(), dim=1)
    fast = (q.to(index.fast.dtype) @ index.fast.T).float()
    exact = index.emb.float() @ q.T
    eps, u = index.error_bound(q)
    assert bool(((fast - exact.T).abs() <= eps + u * fast.abs()).all())
    calls: list[int] = []
    real = retrieval._top_candidates
    monkeypatch.setattr(retrieval, "_top_candidates", lambda *a: calls.append(a[-1]) or real(*a))
    old = _per_query_loop().refine_per_query(pred, e, g, 100.0, 16, 0.1)
    new = refine(pred, e, g, 100.0, 16, 0.1)
    assert len(calls) >= 2 and calls[1] == 2 * calls[0]
    assert float((new[0] - old[0]).abs().max()) < 1e-6 and float((new[1] - old[1]).abs().max()) < 1e-6


def test_float32_products_and_the_radius_edge_match_the_loop(monkeypatch):
    """Without native bf16 the fast product is float32; gallery images 0.4 m inside and outside the radius are
    decided by the loop's own haversine test."""
    from geopak_model import retrieval
    from geopak_model.geo import KM_PER_DEG_LAT

    monkeypatch.setattr(retrieval, "_approx_dtype", lambda device: torch.float32)
    g, pred, e = _clustered(2000, 32, seed=7)
    lat0 = float(pred.lat[5])
    edge = torch.tensor([lat0 + (100.0 - 4e-4) / KM_PER_DEG_LAT, lat0 + (100.0 + 4e-4) / KM_PER_DEG_LAT],
                        dtype=torch.float64)
    emb = torch.cat((g.emb.float(), e[5:6].repeat(2, 1)))  # the query's twins: they win whenever they count
    g2 = Gallery.from_arrays(emb, torch.cat((g.lat, edge)).numpy(), torch.cat((g.lon, pred.lon[5:6].double().repeat(2))).numpy(),
                             torch.cat((g.cell_id, torch.tensor([0, 0]))).numpy(), 300)
    d = haversine_km(pred.lat[5].double(), pred.lon[5].double(), edge, pred.lon[5:6].double().repeat(2))
    assert float(d[0]) <= 100.0 < float(d[1])
    assert g2.index_on("cpu").fast.dtype == torch.float32
    old = _per_query_loop().refine_per_query(pred, e, g2)
    new = refine(pred, e, g2)
    assert float((new[0] - old[0]).abs().max()) < 1e-6 and float((new[1] - old[1]).abs().max()) < 1e-6


def test_exact_matmul_settings_on_cuda_are_restored():
    """On CUDA refinement turns TF32 and bf16 partial sums off while it runs and restores them (flags only: no
    GPU needed to check them)."""
    from geopak_model.retrieval import _ieee_matmul

    m = torch.backends.cuda.matmul
    before = m.fp32_precision, m.allow_bf16_reduced_precision_reduction
    with _ieee_matmul(torch.device("cuda")):
        assert (m.fp32_precision, m.allow_bf16_reduced_precision_reduction) == ("ieee", False)
    assert (m.fp32_precision, m.allow_bf16_reduced_precision_reduction) == before
    with _ieee_matmul(torch.device("cpu")):
        assert (m.fp32_precision, m.allow_bf16_reduced_precision_reduction) == before


def test_the_fused_pass_keeps_what_torchs_mask_fill_and_topk_keep():
    """On a CPU one compiled pass over each block's products replaces torch's mask, fill and top-k (the CUDA
    path): the same best values for every query, and the same rows wherever a value is not tied."""
    from geopak_model.geo import unit_xyz
    from geopak_model.retrieval import _top_candidates

    g, pred, e = _clustered(6000, 48, seed=3, dup_rows=300)
    index = g.index_on("cpu")
    q = torch.nn.functional.normalize(e.float(), dim=1)
    lat, lon = pred.lat.double(), pred.lon.double()
    for k in (16, 64):
        fused = _top_candidates(index, q, unit_xyz(lat, lon), lat, lon, 100.0, k, fused=True)
        ops = _top_candidates(index, q, unit_xyz(lat, lon), lat, lon, 100.0, k, fused=False)
        assert torch.equal(fused[0], ops[0])
        for b in range(q.shape[0]):
            last = fused[0][b, -1]
            above = fused[0][b] > last  # rows strictly above the k-th value: no tie decides them
            assert set(fused[1][b][above].tolist()) == set(ops[1][b][above].tolist())
    assert bool(torch.isinf(fused[0][0]).all())  # the query with nothing within reach


def test_exact_cosines_widen_float16_bits_exactly():
    """The compiled re-scoring widens float16 bits itself: zeros, subnormals, normals and the largest value
    come out as torch widens them, and a whole row's cosine matches torch's float32 sum."""
    from geopak_model.retrieval import _exact_cosines

    special = torch.tensor([0.0, -0.0, 2.0 ** -24, -3.0e-5, 6.1035e-5, 1.0, -0.5, 65504.0, 1e-3, -0.33325],
                           dtype=torch.float16)
    d = len(special)
    rows = np.zeros((d, 1), np.int64)
    need = np.ones((d, 1), bool)
    one_hot = np.eye(d, dtype=np.float32)  # query c picks coordinate c
    got = _exact_cosines(special[None].view(torch.int16).numpy(), one_hot, rows, need)[:, 0]
    assert np.array_equal(got, special.float().numpy())  # exactly (a sum of −0 and +0 terms is +0, as in torch)
    rng = np.random.default_rng(0)
    emb = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((50, 512), dtype=np.float32)), dim=1)
    emb = emb.half()
    q = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((3, 512), dtype=np.float32)), dim=1)
    rows = rng.integers(0, 50, (3, 8))
    need = rng.random((3, 8)) < 0.7
    got = _exact_cosines(emb.view(torch.int16).numpy(), q.numpy(), rows, need)
    want = (emb[torch.from_numpy(rows)].float() * q[:, None]).sum(-1).numpy()
    assert np.all(np.isneginf(got[~need]))
    assert np.abs(got[need] - want[need]).max() < 1e-6


def test_a_gallery_with_non_finite_rows_is_refused():
    g, _, _ = _clustered(300, 16, seed=9)
    g.emb[7, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        g.index_on("cpu")


def test_blocks_are_compact_groups_of_rows():
    """Rows are ordered into runs of ``leaf`` rows that each lie in one place: with two towns of 2 × 1024 photos
    each, no block mixes the towns; the order is a permutation and only the last run is short."""
    from geopak_model.retrieval import _kd_order

    rng = np.random.default_rng(1)
    lat = np.concatenate([24.86 + rng.normal(0, 0.05, 2048), 34.01 + rng.normal(0, 0.05, 2048), [30.0] * 5])
    lon = np.concatenate([67.01 + rng.normal(0, 0.05, 2048), 71.58 + rng.normal(0, 0.05, 2048), [70.0] * 5])
    order = _kd_order(lat, lon, 1024)
    assert np.array_equal(np.sort(order), np.arange(len(lat)))
    towns = (lat[order] > 29).astype(int) + (lat[order] == 30.0)
    blocks = [towns[s:s + 1024] for s in range(0, len(order), 1024)]
    assert [len(b) for b in blocks] == [1024, 1024, 1024, 1024, 5]
    assert sum(len(set(b[:-5].tolist() if len(b) == 1024 and 2 in b else b.tolist())) > 1 for b in blocks) <= 1


def test_selection_refines_the_joined_blocks_as_each_block_alone():
    """Inference selection refines all of val at once (refine's own batches are larger than its row blocks, and
    faster): the answers are those of refining each block."""
    from geopak_model.selection import _joined

    g, pred, e = _clustered(3000, 32, seed=11)
    parts = [slice(0, 13), slice(13, 29), slice(29, 40)]
    blocks = [_per_query_loop().batch_of(pred, e, p)[0] for p in parts]
    whole = refine(_joined(blocks), e, g)
    each = [refine(b, e[p], g) for b, p in zip(blocks, parts)]
    assert torch.equal(whole[0], torch.cat([x[0] for x in each]))
    assert torch.equal(whole[1], torch.cat([x[1] for x in each]))


def test_kernels_compile_without_a_writable_cache(monkeypatch):
    """Where numba finds no folder it may write its cache to (a read-only install), the kernels are compiled in
    the process instead of failing at import."""
    import numba.core.caching as caching

    from geopak_model.retrieval import _compiled

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])

    @_compiled()
    def plus_one(x):
        return x + 1

    assert plus_one(2) == 3


def test_one_search_serves_every_neighbours_and_temperature():
    """Inference selection's grid: ``refine_settings`` searches once for the most neighbours and gives, for each
    (neighbours, temperature), what ``refine`` gives for it alone."""
    from geopak_model.retrieval import refine_settings

    g, pred, e = _clustered(4000, 32, seed=13, dup_rows=200)
    got = refine_settings(pred, e, g, 100.0, (4, 16, 64), (0.03, 0.3))
    for (n, t), (la, lo) in got.items():
        want = refine(pred, e, g, 100.0, n, t)
        assert torch.equal(la, want[0]) and torch.equal(lo, want[1]), (n, t)
