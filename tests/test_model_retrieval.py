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
