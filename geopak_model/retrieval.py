"""Retrieval: the training images as a gallery in the model's fused embedding space.

Two uses, both without extra training:

- **Refinement** (GeoCLIP's GPS gallery, PIGEON's refinement within the predicted region): the classifier says
  *which region*; the gallery says *where in it*. Among the training images within ``refine_radius_km`` of the
  classifier's point estimate, the ``refine_neighbours`` nearest to the query (cosine in the fused space) vote
  with weight softmax(cos / T) · P(their cell); the answer is the weighted mean of the densest cluster of voters
  (``mode_radius_km``), so a photo lands where its look-alikes were taken, not between them.
- **kNN baseline** (``nearest_neighbour``): the location of the single nearest training image, no classifier.

The gallery is built once after training from the final model (``build_gallery``) and saved beside the checkpoint
(``gallery.npz``), tagged with the checkpoint's sha256 so a gallery never serves another model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from geopak_model.geo import haversine_km
from geopak_model.inference import Prediction, densest_cluster
from pipeline.core.store import atomic_path

GALLERY_FILE = "gallery.npz"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Gallery:
    """Training images sorted by cell: L2-normalised fused embeddings (float16) and their coordinates."""

    emb: torch.Tensor  # (N, d) float16, unit rows
    lat: torch.Tensor  # (N,) float64
    lon: torch.Tensor
    cell_id: torch.Tensor  # (N,) int64, ascending
    cell_start: torch.Tensor  # (n_cells + 1,) row offsets: cell c is rows cell_start[c]:cell_start[c + 1]
    model_sha256: str = ""

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

    def rows_of_cells(self, cells: list[int]) -> torch.Tensor:
        parts = [torch.arange(int(self.cell_start[c]), int(self.cell_start[c + 1])) for c in cells if c >= 0]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def load_gallery_for(checkpoint: str | Path) -> Gallery | None:
    """The gallery saved beside ``checkpoint`` if it was built from exactly that file; None when there is none.
    A gallery of another checkpoint is an error (it would refine with the wrong embedding space)."""
    path = Path(checkpoint).with_name(GALLERY_FILE)
    if not path.exists():
        return None
    gallery = Gallery.load(path)
    sha = file_sha256(checkpoint)
    if gallery.model_sha256 != sha:
        raise ValueError(f"{path} was built for another checkpoint (sha256 {gallery.model_sha256[:12]}…, "
                         f"{Path(checkpoint).name} is {sha[:12]}…); rebuild it with python -m geopak_model.train "
                         "or delete it")
    return gallery


@torch.no_grad()
def refine(pred: Prediction, e: torch.Tensor, gallery: Gallery, radius_km: float = 100.0, neighbours: int = 16,
           temperature: float = 0.1, cluster_km: float = 25.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Refined (lat, lon) per query: see the module docstring. Candidates are the gallery images within
    ``radius_km`` of the classifier's point estimate, so refinement moves a photo to its look-alikes in the
    region the classifier chose and never jumps across the country to a look-alike elsewhere (which the cells'
    probabilities would not back). A query without candidates keeps the classifier's estimate."""
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


@torch.no_grad()
def nearest_neighbour(query: torch.Tensor, gallery_feats: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Index of the most cosine-similar gallery row for each query row (kNN baseline, k = 1), in blocks so the
    similarity matrix never exceeds ``batch`` × N."""
    g = F.normalize(gallery_feats.float(), dim=1)
    q = F.normalize(query.float(), dim=1)
    return torch.cat([(q[i:i + batch] @ g.T).argmax(1) for i in range(0, q.shape[0], batch)])

