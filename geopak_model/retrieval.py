"""Retrieval: the training images as a gallery in the model's fused embedding space.

Two uses, both without extra training:

- **Refinement** (GeoCLIP's GPS gallery, PIGEON's refinement within the predicted region): the classifier says
  *which region*; the gallery says *where in it*. Among the training images within ``refine_radius_km`` of the
  classifier's point estimate, the ``refine_neighbours`` nearest to the query (cosine in the fused space) vote
  with weight softmax(cos / T) · P(their cell); the answer is the weighted mean of the densest cluster of voters
  (``mode_radius_km``), so a photo lands where its look-alikes were taken, not between them. A whole batch is
  refined at once on the model's device: matrix products of the queries with compact blocks of the gallery in
  bf16 find each query's best candidates (on a CPU, one compiled pass per block keeps them: numba), and the few
  a rigorous rounding bound cannot separate are scored again exactly, so the answers are the per-query loop's
  (``refine``; ``bench/bench_refine.py``).
- **kNN baseline** (``baselines.knn_neighbours``; ``nearest_neighbour`` is its k = 1): the locations of the nearest
  training images, no classifier; the gallery for it is ``KNN_GALLERY_FILE`` (the encoders' features).

The gallery is built once after training from the final model (``build_gallery``) and saved beside the checkpoint
(``gallery.npz``), tagged with the checkpoint's sha256 so a gallery never serves another model.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F

from geopak_model.geo import haversine_km, unit_xyz
from geopak_model.inference import Prediction, densest_cluster
from pipeline.core.gazetteer import EARTH_RADIUS_KM
from pipeline.core.store import atomic_path, file_sha256  # file_sha256: the gallery records its model

GALLERY_FILE = "gallery.npz"
KNN_GALLERY_FILE = "knn_gallery.npz"  # the same layout over the encoders' features: the kNN baseline's gallery


@dataclass
class Gallery:
    """Training images sorted by cell: L2-normalised fused embeddings (float16) and their coordinates."""

    emb: torch.Tensor  # (N, d) float16, unit rows
    lat: torch.Tensor  # (N,) float64
    lon: torch.Tensor
    cell_id: torch.Tensor  # (N,) int64, ascending
    cell_start: torch.Tensor  # (n_cells + 1,) row offsets: cell c is rows cell_start[c]:cell_start[c + 1]
    model_sha256: str = ""
    _indexes: dict[str, "GalleryIndex"] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.emb.shape[0]
        if not (len(self.lat) == len(self.lon) == len(self.cell_id) == n):
            raise ValueError("gallery arrays differ in length")
        if n and bool((self.cell_id[1:] < self.cell_id[:-1]).any()):
            raise ValueError("gallery rows must be sorted by cell")

    def __len__(self) -> int:
        return self.emb.shape[0]

    @classmethod
    def from_arrays(cls, emb: torch.Tensor, lat: np.ndarray, lon: np.ndarray, cell_id: np.ndarray, n_cells: int,
                    model_sha256: str = "") -> "Gallery":
        order = np.argsort(np.asarray(cell_id), kind="stable")
        cells = torch.as_tensor(np.asarray(cell_id, dtype=np.int64)[order])
        if len(cells) and (int(cells.min()) < 0 or int(cells.max()) >= n_cells):
            raise ValueError(f"gallery cell ids must lie in 0..{n_cells - 1}")
        start = torch.zeros(n_cells + 1, dtype=torch.long)
        start[1:] = torch.bincount(cells, minlength=n_cells).cumsum(0)
        idx = torch.as_tensor(order)
        return cls(F.normalize(emb.float()[idx], dim=1).half(), torch.as_tensor(np.asarray(lat, float)[order]),
                   torch.as_tensor(np.asarray(lon, float)[order]), cells, start, model_sha256)

    def save(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, emb=self.emb.numpy(), lat=self.lat.numpy(), lon=self.lon.numpy(),
                         cell_id=self.cell_id.numpy(), cell_start=self.cell_start.numpy(),
                         meta=np.frombuffer(json.dumps({"model_sha256": self.model_sha256}).encode(), np.uint8))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Gallery":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            return cls(torch.from_numpy(z["emb"]), torch.from_numpy(z["lat"]), torch.from_numpy(z["lon"]),
                       torch.from_numpy(z["cell_id"]), torch.from_numpy(z["cell_start"]), meta["model_sha256"])

    def index_on(self, device: torch.device | str) -> "GalleryIndex":
        """The gallery prepared for batched refinement on ``device``, built on first use and kept (the rows must
        not change afterwards)."""
        key = str(torch.device(device))
        if key not in self._indexes:
            self._indexes[key] = GalleryIndex.build(self, torch.device(device))
        return self._indexes[key]

    def rows_of_cells(self, cells: list[int]) -> torch.Tensor:
        parts = [torch.arange(int(self.cell_start[c]), int(self.cell_start[c + 1])) for c in cells if c >= 0]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def load_gallery_for(checkpoint: str | Path, name: str = GALLERY_FILE, sha256: str | None = None
                     ) -> Gallery | None:
    """The gallery ``name`` saved beside ``checkpoint`` if it was built from exactly that file; None when there is
    none. A gallery of another checkpoint is an error (it would refine with the wrong embedding space).
    ``sha256``: the checkpoint's, when the caller has hashed it already (hash a large file once)."""
    path = Path(checkpoint).with_name(name)
    if not path.exists():
        return None
    gallery = Gallery.load(path)
    sha = file_sha256(checkpoint) if sha256 is None else sha256
    if gallery.model_sha256 != sha:
        raise ValueError(f"{path} was built for another checkpoint (sha256 {gallery.model_sha256[:12]}…, "
                         f"{Path(checkpoint).name} is {sha[:12]}…); rebuild it with python -m geopak_model.train "
                         "or delete it")
    return gallery


# --- batched refinement (issue 22.4) ------------------------------------------------------------------------------
REFINE_BLOCK = (1024, 1 << 16)  # gallery rows per block (CPU, CUDA): small on a CPU, so a query meets few rows
# beyond its radius (each pair costs a product there); large on a GPU, where one product over many rows is fast
PREFILTER_M = 1.0  # the product of unit vectors keeps rows up to this many metres beyond the radius; the rows it
# selects are then tested with haversine_km itself, the per-query loop's test, so float64 rounding decides nothing


def _approx_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device multiplies it natively (CUDA tensor cores, AVX512-BF16/AMX CPUs), else float32."""
    if device.type == "cuda":
        return torch.bfloat16
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if native else torch.float32


def _kd_order(lat: np.ndarray, lon: np.ndarray, leaf: int) -> np.ndarray:
    """Row order that puts each run of ``leaf`` rows in a compact box: split the rows in two along the longer side
    (longitude scaled by cos latitude) at a multiple of ``leaf`` rows, recursively (a k-d tree's leaves), so that
    only the last run is short. Tighter boxes than latitude strips: ~40 % fewer rows beyond a query's radius."""
    out: list[np.ndarray] = []
    todo = [np.arange(len(lat))]
    while todo:
        idx = todo.pop()
        if len(idx) <= leaf:
            out.append(idx)
            continue
        a, o = lat[idx], lon[idx]
        wide = (o.max() - o.min()) * math.cos(math.radians(float(a.mean()))) > a.max() - a.min()
        idx = idx[np.argsort(o if wide else a, kind="stable")]
        cut = (-(-len(idx) // leaf) // 2) * leaf
        todo += [idx[cut:], idx[:cut]]  # popped left first: leaves come out left to right
    return np.concatenate(out) if out else np.zeros(0, np.int64)


@dataclass
class GalleryIndex:
    """A gallery laid out for batched refinement on one device (built once per device, ``Gallery.index_on``).

    Rows are re-ordered into compact blocks of ``block`` rows (``_kd_order``) whose bounding boxes (``boxes``: lat
    min/max, lon min/max) are known, so a block far from every query of a batch is skipped and a block is
    multiplied only with the queries near it. Each row keeps its stored float16 embedding, a copy in the fast
    multiply dtype, its unit vector, location and cell; ``max_norm`` and ``max_round`` bound |fast − exact|
    cosine (``margin``)."""

    emb: torch.Tensor  # (N, d) float16, as stored
    fast: torch.Tensor  # (N, d) in the fast dtype
    xyz: torch.Tensor  # (N, 3) float64
    lat: torch.Tensor  # (N,) float64
    lon: torch.Tensor
    cell_id: torch.Tensor  # (N,) int64
    n_cells: int
    max_norm: float  # max ‖e‖ over the rows
    max_round: float  # max ‖e − fast(e)‖ over the rows
    block: int
    boxes: np.ndarray  # (blocks, 4) lat min, lat max, lon min, lon max of each block's rows

    @classmethod
    def build(cls, gallery: "Gallery", device: torch.device) -> "GalleryIndex":
        lat_np, lon_np = gallery.lat.double().numpy(), gallery.lon.double().numpy()
        block = REFINE_BLOCK[device.type == "cuda"]
        order = _kd_order(lat_np, lon_np, block)
        starts = range(0, len(order), block)
        boxes = np.array([[lat_np[order[s:s + block]].min(), lat_np[order[s:s + block]].max(),
                           lon_np[order[s:s + block]].min(), lon_np[order[s:s + block]].max()] for s in starts]
                         ).reshape(-1, 4)
        idx = torch.from_numpy(order)
        emb = gallery.emb[idx].to(device)
        if not bool(torch.isfinite(emb).all()):
            raise ValueError("the gallery has rows with non-finite values; rebuild it from the checkpoint")
        fast = emb.to(_approx_dtype(device))
        e32 = emb.float()
        max_norm = float(e32.norm(dim=1).max()) if len(emb) else 0.0
        max_round = float((e32 - fast.float()).norm(dim=1).max()) if len(emb) else 0.0
        lat, lon = gallery.lat[idx].to(device, torch.float64), gallery.lon[idx].to(device, torch.float64)
        return cls(emb, fast, unit_xyz(lat, lon), lat, lon, gallery.cell_id[idx].to(device),
                   gallery.cell_start.shape[0] - 1, max_norm, max_round, block, boxes)

    def error_bound(self, q: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(ε (B, 1), u): |fast − exact cosine| ≤ ε + u·|fast| for each query with any row, ×1.25 to spare.

        With ẽ, q̃ the rows and queries rounded to the fast dtype, |ẽ·q̃ − e·q| ≤ ‖e − ẽ‖‖q̃‖ + ‖e‖‖q − q̃‖
        (Cauchy–Schwarz); each float32 sum of d products is off by at most d·2⁻²⁴·‖e‖‖q‖ (the fast product and
        the exact re-scoring); and the product's result is rounded to the fast dtype (relative 2⁻⁸ for bf16)."""
        qf = q.to(self.fast.dtype).float()
        d = q.shape[1]
        eps = (self.max_round * qf.norm(dim=1) + self.max_norm * (q - qf).norm(dim=1)
               + 2 * d * 2.0 ** -24 * self.max_norm * q.norm(dim=1))
        u = 2.0 ** -8 / (1 - 2.0 ** -8) if self.fast.dtype == torch.bfloat16 else 0.0
        return (1.25 * eps + 1e-7)[:, None], 1.25 * u

    def near_blocks(self, lat: torch.Tensor, lon: torch.Tensor, radius_km: float) -> np.ndarray:
        """(B, blocks) bool: the block's box meets the query's cap box (latitude ± θ, longitude ± asin(sin θ /
        cos φ): exact bounds of a spherical cap of radius θ; over a pole or the antimeridian: every block)."""
        theta = (radius_km + PREFILTER_M / 1000.0) / EARTH_RADIUS_KM
        la, lo = lat.double().cpu().numpy()[:, None], lon.double().cpu().numpy()[:, None]
        dlat = math.degrees(theta) + 1e-9
        reach = math.sin(theta) / np.maximum(np.cos(np.radians(np.minimum(np.abs(la) + dlat, 90.0))), 1e-300)
        dlon = np.degrees(np.arcsin(np.minimum(reach, 1.0))) + 1e-9
        wide = (reach >= 1) | (lo - dlon < -180) | (lo + dlon >= 180)
        box = self.boxes[None]
        meets = (box[..., 1] >= la - dlat) & (box[..., 0] <= la + dlat) & (box[..., 3] >= lo - dlon) & \
            (box[..., 2] <= lo + dlon)
        return meets | wide


@contextlib.contextmanager
def _ieee_matmul(device: torch.device) -> Iterator[None]:
    """Full float32 products and float32 sums of bf16 products on CUDA while refining (TF32 or bf16 partial sums
    would exceed the error bound the exact re-scoring relies on); the settings are restored after."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    saved = m.fp32_precision, m.allow_bf16_reduced_precision_reduction
    m.fp32_precision, m.allow_bf16_reduced_precision_reduction = "ieee", False
    try:
        yield
    finally:
        m.fp32_precision, m.allow_bf16_reduced_precision_reduction = saved


def _compiled(**options):
    """``numba.njit`` with its machine code cached on disk (beside this file, else in ``NUMBA_CACHE_DIR`` or the
    user's cache folder), so a process does not compile again; where none of them can be written (a read-only
    install), compiled once per process instead of failing at import."""
    def wrap(fn):
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            return numba.njit(cache=False, **options)(fn)
    return wrap


@_compiled(boundscheck=False, nogil=True)
def _offer_block(sims: np.ndarray, who: np.ndarray, row0: int, xyz: np.ndarray, q_xyz: np.ndarray, cos_r: float,
                 heap_v: np.ndarray, heap_r: np.ndarray) -> None:  # pragma: no cover - compiled
    """One pass over a block's products (``sims``: queries ``who`` × rows ``row0``…): a value above the smallest
    its query keeps, for a row within the query's cap, takes that one's place (``heap_v``/``heap_r``: each
    query's k best so far as a binary min-heap, −inf while fewer). Mask, fill and top-k in one read of the
    products; the test that rejects nearly every pair (not above the smallest kept) is a branch-free compare
    that vectorises. A value equal to the smallest is not taken, so every row left out is at most the final
    smallest."""
    k = heap_v.shape[1]
    above = np.empty(sims.shape[1], np.int64)
    for a in range(sims.shape[0]):
        i = who[a]
        c0, c1, c2 = q_xyz[i, 0], q_xyz[i, 1], q_xyz[i, 2]
        row = sims[a]
        floor = heap_v[i, 0]
        m = 0
        for j in range(row.shape[0]):  # the columns above the smallest kept, without a branch
            above[m] = j
            m += row[j] > floor
        for t in range(m):  # few: the smallest kept only rises
            s = row[above[t]]
            if s <= heap_v[i, 0]:
                continue
            r = row0 + above[t]
            if c0 * xyz[r, 0] + c1 * xyz[r, 1] + c2 * xyz[r, 2] < cos_r:
                continue
            z = 0  # the new value replaces the root and sinks to its place
            while True:
                c = 2 * z + 1
                if c >= k:
                    break
                if c + 1 < k and heap_v[i, c + 1] < heap_v[i, c]:
                    c += 1
                if heap_v[i, c] >= s:
                    break
                heap_v[i, z], heap_r[i, z] = heap_v[i, c], heap_r[i, c]
                z = c
            heap_v[i, z], heap_r[i, z] = s, r


@_compiled(boundscheck=False, nogil=True, fastmath={"reassoc", "contract"})
def _exact_cosines(emb_bits: np.ndarray, q: np.ndarray, rows: np.ndarray, need: np.ndarray
                   ) -> np.ndarray:  # pragma: no cover - compiled
    """Exact cosines (float16 row widened to float32 × float32 query, summed in float32: the per-query loop's
    arithmetic up to the order of the sum, which ``GalleryIndex.error_bound`` allows for) of the (query, slot)
    pairs in ``need``, −inf elsewhere. ``emb_bits``: the float16 rows as int16 bits (finite, as
    ``GalleryIndex.build`` checks), widened here; reading only the rows needed, where torch gathered and widened
    a copy of each and of its query."""
    out = np.full(rows.shape, -np.inf, np.float32)
    d = emb_bits.shape[1]
    bits = np.empty(d, np.uint32)
    row = bits.view(np.float32)
    for i in range(rows.shape[0]):
        for t in range(rows.shape[1]):
            if not need[i, t]:
                continue
            h = emb_bits[rows[i, t]]
            for c in range(d):  # float16 -> float32 bits: sign, exponent rebased (15 -> 127), mantissa
                b = np.uint32(np.uint16(h[c]))
                bits[c] = ((b & 0x8000) << 16) | ((((b >> 10) & 0x1F) + 112) << 23) | ((b & 0x3FF) << 13)
            for c in range(d):  # exponent 0: zero or subnormal, mantissa · 2⁻²⁴
                b = np.uint32(np.uint16(h[c]))
                if (b & 0x7C00) == 0:
                    v = np.float32(b & 0x3FF) * np.float32(2.0 ** -24)
                    row[c] = -v if b & 0x8000 else v
            acc = np.float32(0.0)
            for c in range(d):
                acc += row[c] * q[i, c]
            out[i, t] = acc
    return out


def _top_candidates(index: GalleryIndex, q: torch.Tensor, q_xyz: torch.Tensor, lat: torch.Tensor,
                    lon: torch.Tensor, radius_km: float, k: int, fused: bool | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) values (descending) and gallery rows of the k best fast cosines among the rows within
    ``radius_km`` (+ ``PREFILTER_M``) of each query (−inf: fewer such rows). Per gallery block ONE matrix product
    of the queries near it (``GalleryIndex.near_blocks``; on CUDA, blocks are large and most queries take part)
    with its rows; then, on a CPU (``fused``, the default there), one compiled pass over the products keeps each
    query's best among the rows in its cap (``_offer_block``), where torch would pass over every pair three
    times (a product of unit vectors for the mask, the fill, a top-k); on CUDA those three are one kernel each
    over a whole batch and the best of each block are merged at the end."""
    fused = q.device.type == "cpu" if fused is None else fused
    cos_r = math.cos((radius_km + PREFILTER_M / 1000.0) / EARTH_RADIUS_KM)
    qf = q.to(index.fast.dtype)
    near = index.near_blocks(lat, lon, radius_km)
    used = np.flatnonzero(near.any(0))
    if fused:
        best_v = np.full((q.shape[0], k), -np.inf, np.float32)
        best_r = np.zeros((q.shape[0], k), np.int64)
        xyz, qx = index.xyz.numpy(), q_xyz.double().contiguous().numpy()
        for blk in used:
            who = np.flatnonzero(near[:, blk])
            start = int(blk) * index.block
            rows = slice(start, min(len(index.fast), start + index.block))
            sims = (qf.index_select(0, torch.from_numpy(who)) @ index.fast[rows].T).float().numpy()
            _offer_block(sims, who, start, xyz, qx, cos_r, best_v, best_r)
        order = np.argsort(-best_v, axis=1, kind="stable")
        return (torch.from_numpy(np.take_along_axis(best_v, order, 1)),
                torch.from_numpy(np.take_along_axis(best_r, order, 1)))
    # each block's best go to their own columns; one top-k over all of them at the end
    all_v = q.new_full((q.shape[0], max(1, len(used)) * k), float("-inf"))
    all_i = torch.zeros(all_v.shape, dtype=torch.long, device=q.device)
    for slot, blk in enumerate(used):
        who = torch.from_numpy(np.flatnonzero(near[:, blk])).to(q.device)
        rows = slice(int(blk) * index.block, min(len(index.fast), (int(blk) + 1) * index.block))
        sims = (qf[who] @ index.fast[rows].T).float()
        sims.masked_fill_(q_xyz[who] @ index.xyz[rows].T < cos_r, float("-inf"))
        v, i = sims.topk(min(k, sims.shape[1]), dim=1)
        cols = slice(slot * k, slot * k + v.shape[1])
        all_v[who, cols], all_i[who, cols] = v, i + rows.start
    best_v, pos = all_v.topk(k, dim=1)
    return best_v, all_i.gather(1, pos)


@torch.no_grad()
def refine(pred: Prediction, e: torch.Tensor, gallery: "Gallery", radius_km: float = 100.0, neighbours: int = 16,
           temperature: float = 0.1, cluster_km: float = 25.0, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Refined (lat, lon) per query (float64, CPU): see the module docstring. Candidates are the gallery images
    within ``radius_km`` of the classifier's point estimate, so refinement moves a photo to its look-alikes in the
    region the classifier chose and never jumps across the country to a look-alike elsewhere (which the cells'
    probabilities would not back). A query without candidates keeps the classifier's estimate.

    Batched on ``e``'s device (the gallery is prepared there once, ``Gallery.index_on``), ``batch`` queries at a
    time: per block of the gallery ONE matrix product of the queries near it with its rows in a fast dtype (bf16
    where native; on CUDA blocks of 65k rows, so nearly one product per batch), masked to the candidates, keeps
    each query's best; the rows whose exact cosine the product's error bound cannot rule out of the top
    ``neighbours`` are scored again exactly (float16 rows × float32 query, as the per-query loop did), so the
    neighbours, their weights and the answer are the loop's (``tests/test_model_retrieval.py`` compares them,
    ``bench/bench_refine.py`` times them)."""
    return refine_settings(pred, e, gallery, radius_km, (neighbours,), (temperature,), cluster_km,
                           batch)[neighbours, temperature]


def refine_settings(pred: Prediction, e: torch.Tensor, gallery: "Gallery", radius_km: float,
                    neighbours: Sequence[int], temperatures: Sequence[float], cluster_km: float = 25.0,
                    batch: int = 256) -> dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]]:
    """``refine``'s answer for every (neighbours, temperature) given, at one radius, from ONE candidate search
    per batch: the largest ``neighbours`` is searched for, and each smaller one is its first columns (every row
    that could be among the exact top n is scored exactly, for any n up to it). Inference selection tries a grid
    of these; the search is what costs."""
    device = e.device
    index = gallery.index_on(device)
    lat0, lon0 = pred.lat.detach().to(device, torch.float64), pred.lon.detach().to(device, torch.float64)
    hyp_cell, hyp_w = pred.hyp_cell.to(device), pred.hyp_weight.to(device, torch.float64)
    q = F.normalize(e.float(), dim=1)
    out = {(n, t): (lat0.clone(), lon0.clone()) for n in neighbours for t in temperatures}
    with _ieee_matmul(device):
        for s in range(0, q.shape[0], batch):
            part = slice(s, min(q.shape[0], s + batch))
            top_sim, picked = _nearest(index, q[part], lat0[part], lon0[part], radius_km, max(neighbours))
            for (n, t), (la, lo) in out.items():
                la[part], lo[part] = _vote(index, top_sim[:, :n], picked[:, :n], lat0[part], lon0[part],
                                           hyp_cell[part], hyp_w[part], t, cluster_km)
    return {key: (la.cpu(), lo.cpu()) for key, (la, lo) in out.items()}


def _nearest(index: GalleryIndex, q: torch.Tensor, lat0: torch.Tensor, lon0: torch.Tensor, radius_km: float,
             neighbours: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ≤ neighbours) exact cosines, descending (−inf: fewer candidates), and the gallery rows of each query's
    nearest candidates within ``radius_km``."""
    fast_v, rows, need = _enough_candidates(index, q, unit_xyz(lat0, lon0), lat0, lon0, radius_km, neighbours)
    # exact cosines (the loop's arithmetic: float16 rows × float32 query) where the bound cannot rule a row out
    if q.device.type == "cpu":
        exact = torch.from_numpy(_exact_cosines(index.emb.view(torch.int16).numpy(), q.contiguous().numpy(),
                                                rows.numpy(), need.numpy()))
    else:
        b, j = torch.nonzero(need, as_tuple=True)
        exact = torch.full_like(fast_v, float("-inf"))
        exact[b, j] = (index.emb[rows[b, j]].float() * q[b]).sum(1)
    top_sim, pos = exact.topk(min(neighbours, exact.shape[1]), dim=1)
    return top_sim, rows.gather(1, pos)


def _vote(index: GalleryIndex, top_sim: torch.Tensor, picked: torch.Tensor, lat0: torch.Tensor,
          lon0: torch.Tensor, hyp_cell: torch.Tensor, hyp_w: torch.Tensor, temperature: float,
          cluster_km: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer from the neighbours: the densest cluster of their places, weighted softmax(cos / T) · P(cell)."""
    valid = torch.isfinite(top_sim)
    # P(cell) of the hypotheses, 0 for the others; a small floor: a look-alike in a cell outside the hypotheses
    # still counts, just less
    ok = (hyp_cell >= 0) & (hyp_cell < index.n_cells)
    cell_w = torch.zeros((top_sim.shape[0], index.n_cells), dtype=torch.float64, device=top_sim.device)
    cell_w.scatter_add_(1, hyp_cell.clamp(0, max(index.n_cells - 1, 0)), torch.where(ok, hyp_w, 0.0))
    w = torch.softmax(top_sim.double() / temperature, 1) * (cell_w.gather(1, index.cell_id[picked]) + 1e-6)
    w = torch.where(valid, w, 0.0)  # rows without candidates: softmax of −inf only
    total = w.sum(1, keepdim=True)
    w = torch.where(total > 0, w / total.clamp(min=1e-300), 0.0)
    # padding (fewer candidates than neighbours) at the South Pole with no weight: never a cluster, never a member
    lat = torch.where(valid, index.lat[picked], -90.0)
    lon = torch.where(valid, index.lon[picked], 0.0)
    la, lo = densest_cluster(lat, lon, w, cluster_km)
    has = valid.any(1)
    return torch.where(has, la, lat0), torch.where(has, lo, lon0)


def _enough_candidates(index: GalleryIndex, q: torch.Tensor, q_xyz: torch.Tensor, lat0: torch.Tensor,
                       lon0: torch.Tensor, radius_km: float, neighbours: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each query's best fast cosines among the gallery rows within ``radius_km`` (``haversine_km``, as the loop
    tests them; −inf elsewhere), their rows, and which of them need an exact score: those whose upper bound
    reaches the ``neighbours``-th best lower bound (``GalleryIndex.error_bound``). Enough rows are kept that every
    row left out is below that too (its fast value is at most the last one kept); queries short of that are
    searched again with twice as many."""
    eps, u = index.error_bound(q)

    def spread(v: torch.Tensor, who: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        return eps[who] + u * torch.where(torch.isfinite(v), v.abs(), 0.0)  # how far exact may be from v

    k = max(4 * neighbours, 64)
    todo = torch.arange(q.shape[0], device=q.device)
    fast_v = q.new_full((q.shape[0], k), float("-inf"))
    rows = torch.zeros((q.shape[0], k), dtype=torch.long, device=q.device)
    while True:
        v, r = _top_candidates(index, q[todo], q_xyz[todo], lat0[todo], lon0[todo], radius_km, k)
        last = v[:, -1:]  # every row left out has a fast value at most this
        far = haversine_km(lat0[todo, None], lon0[todo, None], index.lat[r], index.lon[r]) > radius_km
        v = v.masked_fill(far, float("-inf"))  # the prefilter's extra metre
        if k > fast_v.shape[1]:
            fast_v = F.pad(fast_v, (0, k - fast_v.shape[1]), value=float("-inf"))
            rows = F.pad(rows, (0, k - rows.shape[1]))
        fast_v[todo], rows[todo] = v, r
        low = torch.sort(v - spread(v, todo), dim=1, descending=True).values[:, neighbours - 1:neighbours]
        done = torch.isinf(last) | (last + spread(last, todo) < low)
        if bool(done.all()):
            break
        todo, k = todo[~done[:, 0]], 2 * k
    low = torch.sort(fast_v - spread(fast_v), dim=1, descending=True).values[:, neighbours - 1:neighbours]
    return fast_v, rows, torch.isfinite(fast_v) & (fast_v + spread(fast_v) >= low)


@torch.no_grad()
def nearest_neighbour(query: torch.Tensor, gallery_feats: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Index of the most cosine-similar gallery row for each query row (k = 1 of ``baselines.knn_neighbours``,
    in blocks so the similarity matrix never exceeds ``batch`` × N)."""
    from geopak_model.baselines import knn_neighbours

    return knn_neighbours(query, gallery_feats, 1, batch)[:, 0]
