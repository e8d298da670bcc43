"""Retrieval refinement on a 100k-image gallery: the per-query loop before issue 22 against the batched refinement.

Usage: python bench/bench_refine.py [--gallery 100000] [--batch 32] [--dim 512] [--rounds 3] [--threads 0,1]
The gallery's locations are a planned sample world (``plan_sample_world``: photos clustered around real places
by population, so a query has ~7k gallery images within 100 km, as in real data), with random unit embeddings
and ~2,000 cells; queries are gallery embeddings plus noise at the gallery's locations plus ~30 km, with 448
hypotheses of random cells and weights, as ``InferenceConfig``'s defaults give (7 provinces × 64 cells).
Old and new alternate batch by batch in one process, for each torch thread count in ``--threads`` (0: torch's
default), so load on the machine hits both alike. Prints ms per batch, the ratios of wall-clock and of process
CPU time (robust to other load with one thread; with several it also counts threads spinning), and the largest
difference of the answers in degrees (the cosines are float32 sums in another order; the neighbours and
clusters are the same: tests/test_model_retrieval.py).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from geopak_model.geo import haversine_km
from geopak_model.inference import Prediction, densest_cluster
from geopak_model.retrieval import Gallery, refine


# --- the per-query loop before issue 22 (baseline; tests/test_model_retrieval.py checks refine against it) -------
@torch.no_grad()
def refine_per_query(pred: Prediction, e: torch.Tensor, gallery: Gallery, radius_km: float = 100.0,
                     neighbours: int = 16, temperature: float = 0.1, cluster_km: float = 25.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    q = F.normalize(e.float(), dim=1).cpu()
    lat_out, lon_out = pred.lat.detach().double().cpu().clone(), pred.lon.detach().double().cpu().clone()
    hyp_cell, hyp_w = pred.hyp_cell.cpu(), pred.hyp_weight.double().cpu()
    n_cells = gallery.cell_start.shape[0] - 1
    for b in range(q.shape[0]):  # one query at a time: memory O(gallery), not O(batch × gallery)
        d = haversine_km(lat_out[b], lon_out[b], gallery.lat, gallery.lon)
        cand = torch.nonzero(d <= radius_km).squeeze(1)
        if not len(cand):
            continue
        cell_w = torch.zeros(n_cells, dtype=torch.float64)  # P(cell) of the hypotheses, 0 for the others
        ok = (hyp_cell[b] >= 0) & (hyp_cell[b] < n_cells)
        cell_w.index_add_(0, hyp_cell[b][ok], hyp_w[b][ok])
        sims = gallery.emb[cand].float() @ q[b]
        top_sim, top_i = sims.topk(min(neighbours, len(cand)))
        picked = cand[top_i]
        # a small floor: a look-alike in a cell outside the hypotheses still counts, just less
        w = torch.softmax(top_sim.double() / temperature, 0) * (cell_w[gallery.cell_id[picked]] + 1e-6)
        la, lo = densest_cluster(gallery.lat[picked][None], gallery.lon[picked][None], (w / w.sum())[None],
                                 cluster_km)
        lat_out[b], lon_out[b] = la[0], lo[0]
    return lat_out, lon_out


# --- synthetic gallery and queries ----------------------------------------------------------------------------
def random_gallery(lat: np.ndarray, lon: np.ndarray, dim: int, n_cells: int, seed: int = 0) -> Gallery:
    """Random unit embeddings at the given locations, cells at random."""
    rng = np.random.default_rng(seed)
    emb = torch.from_numpy(rng.standard_normal((len(lat), dim), dtype=np.float32))
    return Gallery.from_arrays(emb, lat, lon, rng.integers(0, n_cells, len(lat)), n_cells)


def random_queries(gallery: Gallery, n: int, seed: int = 1, hypotheses: int = 7 * 64
                   ) -> tuple[Prediction, torch.Tensor]:
    """``n`` queries: noisy copies of gallery embeddings near their gallery image's place, random hypotheses."""
    rng = np.random.default_rng(seed)
    rows = torch.from_numpy(rng.integers(0, len(gallery), n))
    d = gallery.emb.shape[1]
    e = gallery.emb[rows].float() + 0.3 * torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32)) / d ** 0.5
    lat = (gallery.lat[rows] + torch.from_numpy(rng.normal(0, 0.3, n))).float()
    lon = (gallery.lon[rows] + torch.from_numpy(rng.normal(0, 0.3, n))).float()
    n_cells = gallery.cell_start.shape[0] - 1
    cells = torch.from_numpy(rng.integers(-1, n_cells, (n, hypotheses)))
    weights = torch.softmax(torch.from_numpy(rng.standard_normal((n, hypotheses))), 1).float()
    z = torch.zeros(n)
    pred = Prediction(lat=lat, lon=lon, mean_lat=z, mean_lon=z, province_probs=torch.full((n, 7), 1 / 7),
                      province_id=z.long(), top_cell=cells[:, 0].clamp(min=0), hyp_cell=cells,
                      hyp_province=torch.zeros_like(cells), hyp_weight=weights,
                      hyp_lat=torch.zeros((n, hypotheses)), hyp_lon=torch.zeros((n, hypotheses)), coverage=z + 1)
    return pred, e


def batch_of(pred: Prediction, e: torch.Tensor, part: slice) -> tuple[Prediction, torch.Tensor]:
    fields = {k: v[part] for k, v in pred.__dict__.items()}
    return Prediction(**fields), e[part]


def floors(gallery: Gallery, pred: Prediction, e: torch.Tensor, batch: int, radius_km: float = 100.0
           ) -> dict[str, float]:
    """What no implementation on this CPU can beat for one batch of ``batch`` queries (ms, this thread count):
    the bf16 products of each query with only the gallery rows within ``radius_km`` of it (at the rate one
    dense (batch x 512) @ (512 x 4096) bf16 product reaches here), and one read of the union of those rows (at
    the rate a bf16 sum of the whole gallery streams memory). Both assume a perfect spatial index."""
    fast = gallery.emb.bfloat16()
    q = F.normalize(e[:batch].float(), dim=1).bfloat16()
    block = fast[:4096]

    def best_ms(fn, n: int = 5) -> float:
        fn()
        times = []
        for _ in range(n):
            c0 = time.process_time()
            fn()
            times.append(time.process_time() - c0)
        return 1000 * min(times)

    gemm_ms = best_ms(lambda: q @ block.T)
    flop_rate = 2 * q.shape[0] * block.shape[0] * fast.shape[1] / gemm_ms  # FLOP per ms
    read_rate = fast.numel() * fast.element_size() / best_ms(lambda: fast.sum())  # bytes per ms
    within = torch.zeros(len(gallery), dtype=torch.bool)
    pairs = 0
    for i in range(q.shape[0]):
        near = haversine_km(pred.lat[i].double(), pred.lon[i].double(), gallery.lat, gallery.lon) <= radius_km
        pairs += int(near.sum())
        within |= near
    return {"flop_ms": 2 * pairs * fast.shape[1] / flop_rate, "read_ms": int(within.sum()) * fast.shape[1] * 2 /
            read_rate, "rows_per_query": pairs / q.shape[0], "union_rows": int(within.sum()),
            "gflops": flop_rate / 1e6, "gbps": read_rate / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=32, help="queries per call (the predictor's default batch)")
    ap.add_argument("--dim", type=int, default=512, help="fused embedding width (gpu-full: 512)")
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3, help="batches timed per method and thread count")
    ap.add_argument("--threads", default="0,1", help="torch thread counts to time (0: torch's default)")
    args = ap.parse_args()
    from pipeline.sources.sample_world import SampleWorldConfig, plan_sample_world

    t0 = time.perf_counter()
    plan = plan_sample_world(SampleWorldConfig(n_images=args.gallery, defect_fraction=0.0))
    gallery = random_gallery(plan["lat"].to_numpy(float), plan["lon"].to_numpy(float), args.dim, args.cells)
    pred, e = random_queries(gallery, args.batch * args.rounds)
    n_cand = [int((haversine_km(pred.lat[i].double(), pred.lon[i].double(), gallery.lat, gallery.lon) <= 100).sum())
              for i in range(min(64, len(e)))]
    print(f"gallery {len(gallery):,} images x {args.dim} (sample-world places, {args.cells} cells, built in "
          f"{time.perf_counter() - t0:.1f} s); median {int(np.median(n_cand)):,} gallery images within 100 km of a "
          f"query; batches of {args.batch}")
    default_threads = torch.get_num_threads()
    for threads in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(threads or default_threads)
        first = batch_of(pred, e, slice(0, args.batch))
        refine(*first, gallery)  # warm-up: builds the gallery's index (once per device)
        wall = {"old": 0.0, "new": 0.0}
        cpu = {"old": 0.0, "new": 0.0}
        worst = 0.0
        for r in range(args.rounds):
            p, x = batch_of(pred, e, slice(r * args.batch, (r + 1) * args.batch))
            answers = {}
            for kind, fn in (("old", refine_per_query), ("new", refine)):
                c0, w0 = time.process_time(), time.perf_counter()
                answers[kind] = fn(p, x, gallery)
                cpu[kind] += time.process_time() - c0
                wall[kind] += time.perf_counter() - w0
            (a, b), (c, d) = answers["old"], answers["new"]
            worst = max(worst, float((a - c).abs().max()), float((b - d).abs().max()))
        per = {k: 1000 * v / args.rounds for k, v in wall.items()}
        print(f"torch threads {torch.get_num_threads()}: per-query loop {per['old']:7.1f} ms per batch of {args.batch} "
              f"(wall), batched {per['new']:6.1f} ms: {wall['old'] / wall['new']:5.1f}x wall, "
              f"{cpu['old'] / cpu['new']:5.1f}x CPU time ({1000 * cpu['old'] / args.rounds:.0f} vs "
              f"{1000 * cpu['new'] / args.rounds:.1f} ms); largest |old - new| {worst:.1e} degrees")
        f = floors(gallery, pred, e, args.batch)
        floor = max(f["flop_ms"], f["read_ms"])
        print(f"  floor per batch (perfect spatial index): bf16 products with only the {f['rows_per_query']:,.0f} "
              f"rows within 100 km of each query {f['flop_ms']:.1f} ms at {f['gflops']:.0f} GFLOP/s, one read of "
              f"their union ({f['union_rows']:,} rows) {f['read_ms']:.1f} ms at {f['gbps']:.1f} GB/s: at most "
              f"{1000 * cpu['old'] / args.rounds / floor:.0f}x the per-query loop's CPU time")
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
