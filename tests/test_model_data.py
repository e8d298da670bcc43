"""Training data: joined table, images (EXIF orientation), geography-safe augmentation, balanced sampler,
spawned DataLoader workers, and the embedding cache (reuse, growth, invalidation when weights change)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from geopak_model.cache import EmbeddingCache, build_embedding_cache, prune_other_caches
from geopak_model.config import AugmentConfig, preset
from geopak_model.data import (
    ImageDataset,
    ProvinceBalancedBatchSampler,
    augment_view,
    batch_quotas,
    eval_view,
    join_training_table,
    load_image,
    load_training_table,
    make_loader,
)
from geopak_model.encoders import build_encoders
from pipeline.core import reasons
from tests.conftest import gps_exif
from tests.model_world import build_world

TINY_ENC = preset("test-tiny").encoder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"), per_cell=3, size=40)


def test_join_training_table_counts_every_row(world):
    labelled = pd.read_parquet(world.labelled)
    asg = pd.read_parquet(world.cell_assignments)
    splits = pd.read_parquet(world.splits)
    table, stats = join_training_table(labelled, asg.iloc[2:], splits.iloc[:-1])
    assert stats == {"labelled": len(labelled), "without_cell": 2, "without_split": 1, "used": len(labelled) - 3}
    assert set(table.columns) >= {"image_id", "path", "cell_id", "split", "doy_sin"}
    bad = asg.copy()
    bad.loc[0, "province_id"] = (bad.loc[0, "province_id"] + 1) % 7
    with pytest.raises(ValueError, match="another province"):
        join_training_table(labelled, bad, splits)
    full, _ = load_training_table(world)
    assert len(full) == len(labelled)


def test_load_image_applies_exif_orientation(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", exif=gps_exif(30.0, 70.0, orientation=6))
    (tmp_path / "r.jpg").write_bytes(buf.getvalue())
    img = load_image(tmp_path / "r.jpg")
    assert img.mode == "RGB" and img.size == (20, 40)  # rotated upright: portrait
    x = eval_view(img, 16)
    assert x.shape == (3, 16, 16) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_augmentation_is_seeded_and_geography_safe():
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32, 0] = 220  # red on the left
    arr[:, 32:, 2] = 220  # blue on the right
    arr[:20, :, 1] = 200  # a bright band at the top (sky)
    img = Image.fromarray(arr)
    cfg = AugmentConfig(weather_p=1.0, blur_p=1.0)
    a = augment_view(img, 32, cfg, torch.Generator().manual_seed(7))
    b = augment_view(img, 32, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    for seed in range(40):  # never mirrored, never upside down
        x = augment_view(img, 32, AugmentConfig(), torch.Generator().manual_seed(seed))
        left, right = x[:, :, :6], x[:, :, -6:]
        assert float(left[0].mean() - left[2].mean()) > 0.15 and float(right[2].mean() - right[0].mean()) > 0.15
        assert float(x[1, :4].mean()) > float(x[1, -4:].mean())


def test_sampler_quotas_fresh_epochs_and_rank_slices():
    pids = np.array([0] * 50 + [1] * 10 + [3] * 5)
    shares = {"sindh": 2.0, "punjab": 1.0, "ict": 1.0}
    q = batch_quotas(shares, [0, 1, 3], 16)
    assert q.tolist() == [8, 4, 0, 4, 0, 0, 0]
    s = ProvinceBalancedBatchSampler(pids, 16, 5, shares, seed=3)
    e0 = list(s)
    assert list(s) == e0  # the same epoch replays
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0  # a fresh epoch draws fresh batches
    for batch in e0:
        assert np.bincount(pids[batch], minlength=7).tolist() == [8, 4, 0, 4, 0, 0, 0]
    halves = []
    for rank in range(2):
        r = ProvinceBalancedBatchSampler(pids, 16, 5, shares, seed=3, rank=rank, world_size=2)
        r.set_epoch(1)
        halves.append(list(r))
    for i, batch in enumerate(e1):
        assert sorted(halves[0][i] + halves[1][i]) == sorted(batch) and len(halves[0][i]) == 8
    seeded = ProvinceBalancedBatchSampler(pids, 16, 2, shares, seed=3, with_seeds=True)
    keys = next(iter(seeded))
    assert [k[0] for k in keys] == e0[0] and all(isinstance(k[1], int) for k in keys)
    with pytest.raises(ValueError):
        ProvinceBalancedBatchSampler(pids, 15, 1, shares, world_size=2)


def test_spawned_loader_workers_match_in_process(world):
    table, _ = load_training_table(world)
    ds = ImageDataset(table.head(6), world.root, 32, AugmentConfig())
    sampler = ProvinceBalancedBatchSampler(table.head(6)["province_id"].to_numpy(), 4, 2, {}, seed=1,
                                           with_seeds=True)
    loader = make_loader(ds, sampler, num_workers=1)
    assert loader.multiprocessing_context.get_start_method() == "spawn"
    spawned = [b["image"] for b in loader]
    in_proc = [b["image"] for b in make_loader(ds, sampler, num_workers=0)]
    assert all(torch.equal(a, b) for a, b in zip(spawned, in_proc))


def test_embedding_cache_reuse_growth_and_invalidation(world, tmp_path):
    table, _ = load_training_table(world)
    enc = build_encoders(TINY_ENC)
    root = tmp_path / "emb"
    first = table.head(10)
    cache, stats = build_embedding_cache(enc, first, world.root, root, batch_size=4)
    assert stats["computed"] == 10 and stats["reused"] == 0
    clip, scene = cache.load(first["image_id"])
    assert clip.dtype == torch.float16 and clip.shape == (10, 32) and scene.shape == (10, 512)
    with torch.no_grad():
        direct_c, direct_s = enc(torch.stack([eval_view(load_image(world.root / p), 64) for p in first["path"]]))
    assert torch.allclose(clip.float(), direct_c, atol=2e-2, rtol=1e-2)
    assert torch.allclose(scene.float(), direct_s, atol=2e-2, rtol=1e-2)

    cache2, stats2 = build_embedding_cache(enc, table.head(14), world.root, root, batch_size=4)
    assert stats2["computed"] == 4 and stats2["reused"] == 10 and cache2.generation == 2
    c2, _ = cache2.load(first["image_id"].iloc[::-1])
    assert torch.equal(c2, clip.flip(0))  # old rows kept, looked up by image id
    assert sorted(p.name for p in cache2.dir.iterdir()) == ["clip-2.npy", "index-2.parquet", "meta.json", "scene-2.npy"]

    other = build_encoders(dataclasses.replace(TINY_ENC, init_seed=1))  # other weights -> other cache
    cache3, stats3 = build_embedding_cache(other, table.head(14), world.root, root, batch_size=8)
    assert cache3.weights_id != cache2.weights_id and stats3["computed"] == 14 and stats3["reused"] == 0
    assert prune_other_caches(root, keep=cache3.weights_id) == [cache2.weights_id]
    assert not cache2.dir.exists() and len(EmbeddingCache(root, cache3.weights_id)) == 14


def test_unreadable_images_are_recorded_not_fatal(world, tmp_path):
    table, _ = load_training_table(world)
    rows = table.head(5).copy()
    broken = tmp_path / "data"
    broken.mkdir()
    for p in rows["path"]:
        (broken / p).parent.mkdir(parents=True, exist_ok=True)
        (broken / p).write_bytes((world.root / p).read_bytes())
    (broken / rows["path"].iloc[1]).write_bytes(b"<html>not an image</html>")
    (broken / rows["path"].iloc[3]).unlink()
    enc = build_encoders(TINY_ENC)
    cache, stats = build_embedding_cache(enc, rows, broken, tmp_path / "emb", batch_size=2)
    assert stats["computed"] == 3 and stats["unreadable"] == 2
    rej = pd.read_parquet(cache.dir / "rejections.parquet").set_index("image_id")["reason"]
    assert rej[rows["image_id"].iloc[1]] == reasons.NOT_AN_IMAGE
    assert rej[rows["image_id"].iloc[3]] == reasons.MISSING_FILE
    _, again = build_embedding_cache(enc, rows, broken, tmp_path / "emb", batch_size=2)
    assert again["computed"] == 0 and again["unreadable"] == 0  # not retried with the same weights
