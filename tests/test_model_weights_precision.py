"""Defect 5 (cache and predictor half): features are computed under ``precision.amp_dtype``'s autocast, the
embedding cache records that precision and keys on it, and the predictor runs in the precision the checkpoint's
config trained with. CPU autocast to bf16 stands in for a GPU here (``amp_dtype`` gives None on CPU)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import geopak_model.cache as cache_mod
import geopak_model.predictor as predictor_mod
from geopak_model.cache import EmbeddingCache, build_embedding_cache
from geopak_model.cells import CellTable
from geopak_model.checkpoint import save_untrained
from geopak_model.config import preset
from geopak_model.data import ImageDataset
from geopak_model.encoders import build_encoders
from geopak_model.predictor import GeopakPredictor
from tests.model_world import build_world


def _images(root, n: int = 4, size: int = 160) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size + 20, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        (root / f"{i}.jpg").write_bytes(buf.getvalue())
        rows.append({"image_id": f"img{i}", "path": f"{i}.jpg"})
    labels = ("province_id", "cell_id", "lat", "lon", "koppen_id", "doy_sin", "doy_cos")  # ImageDataset reads them
    return pd.DataFrame(rows).assign(**{c: 0 for c in labels})


def test_cache_records_and_keys_on_precision(tmp_path, monkeypatch):
    enc = build_encoders(preset("test-tiny").encoder)
    table = _images(tmp_path)
    fp32, _ = build_embedding_cache(enc, table, tmp_path, tmp_path / "emb", batch_size=2)
    assert fp32.precision == "fp32" and fp32.weights_id == enc.weights_id("fp32")
    monkeypatch.setattr(cache_mod, "resolve_amp_dtype", lambda device, amp, requested: torch.bfloat16)
    bf16, stats = build_embedding_cache(enc, table, tmp_path, tmp_path / "emb", batch_size=2)
    assert stats["computed"] == 4 and stats["reused"] == 0  # fp32 features are not bf16 features
    assert bf16.weights_id == enc.weights_id("bf16") != fp32.weights_id and bf16.dir != fp32.dir
    assert EmbeddingCache(tmp_path / "emb", bf16.weights_id).precision == "bf16"  # in meta.json
    c32, _ = fp32.load(table["image_id"])
    c16, _ = bf16.load(table["image_id"])
    assert not torch.equal(c32, c16)  # computed under autocast
    with pytest.raises(ValueError, match="does not name this encoder's bf16 features"):
        build_embedding_cache(enc, table, tmp_path, tmp_path / "emb", weights_id=enc.weights_id())


def test_cache_asks_for_the_configured_dtype(tmp_path, monkeypatch):
    seen = []

    def spy(device, amp, requested):
        seen.append((torch.device(device).type, amp, requested))
        return None

    monkeypatch.setattr(cache_mod, "resolve_amp_dtype", spy)
    enc = build_encoders(preset("test-tiny").encoder)
    build_embedding_cache(enc, _images(tmp_path, 1), tmp_path, tmp_path / "emb", amp=True, amp_dtype="fp16")
    assert seen == [("cpu", True, "fp16")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    paths = build_world(root, per_cell=2, size=40)
    cells = CellTable.from_frames(pd.read_parquet(paths.geocells), pd.read_parquet(paths.geocell_neighbours))
    cfg = preset("test-tiny", data_root=str(root), amp=True)
    return save_untrained(root / "model.pt", cfg, cells), root / pd.read_parquet(paths.labelled)["path"].iloc[0]


def test_predictor_uses_the_checkpoints_precision(checkpoint, monkeypatch):
    ckpt, image = checkpoint
    assert GeopakPredictor.from_checkpoint(ckpt, device="cpu").precision == "fp32"  # CPU: float32 (see docstring)
    seen = []

    def bf16(device, amp, requested="auto"):
        seen.append((torch.device(device).type, amp, requested))
        return torch.bfloat16

    monkeypatch.setattr(predictor_mod, "amp_dtype", bf16)
    pred = GeopakPredictor.from_checkpoint(ckpt, device="cpu")
    assert seen == [("cpu", True, getattr(pred.cfg, "amp_dtype", "auto"))]  # from the checkpoint's config
    assert pred.precision == "bf16" and pred.dtype is torch.bfloat16
    fp32 = GeopakPredictor(pred.model, pred.cfg, torch.device("cpu"), None)
    a, b = pred.predict(image), fp32.predict(image)
    assert a["province_probs"] != b["province_probs"]  # really computed under bf16 autocast
    assert a["lat"] == pytest.approx(b["lat"], abs=1.0)


def test_predictor_view_matches_the_cache(checkpoint, tmp_path):
    """A large JPEG is decoded as the cache decodes it (DCT-scaled), so prediction sees the cached view."""
    ckpt, _ = checkpoint
    pred = GeopakPredictor.from_checkpoint(ckpt, device="cpu")
    table = _images(tmp_path, 1, size=400)  # >= 2x the 64 px input: decoded at a reduced scale
    cached = ImageDataset(table, tmp_path, 64)[0]["image"]
    path = tmp_path / table["path"].iloc[0]
    assert torch.equal(pred.view(path), cached)
    assert torch.equal(pred.view(path.read_bytes()), cached)
