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
    FULL_SIZE_KEY,
    ImageDataset,
    ProvinceBalancedBatchSampler,
    augment_min_side,
    augment_view,
    batch_quotas,
    eval_view,
    full_size,
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


def test_world_tables_satisfy_the_stage_schemas(world):
    """The model tests' world is what the pipeline writes: every table reads back under its real schema, the
    splits are leak-free, train images lie within their cell's cap, and cells/neighbours agree."""
    from pipeline.core.schema import (
        CATALOG_SCHEMA,
        CELL_ASSIGNMENTS_SCHEMA,
        GEOCELL_NEIGHBOURS_SCHEMA,
        GEOCELLS_SCHEMA,
        LABELLED_SCHEMA,
        SPLITS_SCHEMA,
        read_table,
    )
    from pipeline.geocells.splits import leakage_count

    catalog = read_table(world.catalog, CATALOG_SCHEMA)
    labelled = read_table(world.labelled, LABELLED_SCHEMA)
    splits = read_table(world.splits, SPLITS_SCHEMA)
    cells = read_table(world.geocells, GEOCELLS_SCHEMA)
    neighbours = read_table(world.geocell_neighbours, GEOCELL_NEIGHBOURS_SCHEMA)
    assign = read_table(world.cell_assignments, CELL_ASSIGNMENTS_SCHEMA)
    assert splits["group_id"].dtype == np.int64 and set(splits["split"]) == {"train", "val"}
    assert len(catalog) == len(labelled) == len(splits) == len(assign) == 42 and len(cells) == 14
    assert cells["cell_id"].tolist() == list(range(14)) and (cells["radius_km"] <= cells["cap_km"]).all()
    assert set(neighbours["cell_id"]) == set(cells["cell_id"])
    df = labelled.merge(splits, on="image_id").merge(assign.drop(columns="province_id"), on="image_id")
    assert leakage_count(df["lat"], df["lon"], df["split"].to_numpy()) == 0
    assert (df.groupby("group_id")["split"].nunique() == 1).all()
    cap = cells.set_index("cell_id").loc[df["cell_id"], "cap_km"].to_numpy()
    assert (df.loc[df["split"] == "train", "distance_km"] <= cap[(df["split"] == "train").to_numpy()]).all()
    assert (cells.set_index("cell_id").loc[df["cell_id"], "province_id"].to_numpy() == df["province_id"]).all()
    assert df["day_of_year"].isna().sum() == 0 and labelled["koppen_id"].min() > 0  # per_cell=3: dates all known


def test_world_water_rows_stand_on_koppen_water(tmp_path):
    paths = build_world(tmp_path, per_cell=4, size=16, water_rows=3)
    labelled = pd.read_parquet(paths.labelled)
    assert int((labelled["koppen_id"] == 0).sum()) == 3 and int(labelled["day_of_year"].isna().sum()) == 14


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


def _photo_like(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Gradients, blotches at a few scales and pixel noise: enough detail that a half-pixel crop error shows."""
    rng = np.random.default_rng(seed)
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    xx = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    img = 60 + 120 * yy + 40 * np.sin(7 * xx + 3 * yy) + np.zeros(3, np.float32)
    for cell in (150, 30, 6):
        small = np.clip(128 + 40 * rng.standard_normal((h // cell + 2, w // cell + 2, 3)), 0, 255).astype(np.uint8)
        img = img + (np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), np.float32) - 128) / 3
    img = img + 6 * rng.standard_normal((h, w, 1), dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(path, arr: np.ndarray, **kw) -> None:
    Image.fromarray(arr).save(path, "JPEG", quality=90, **kw)


def test_draft_decode_keeps_the_eval_view(tmp_path):
    """A big JPEG is DCT-scaled while decoding to the smallest 1/N scale whose short side still covers the view,
    and the eval view cut from it stays close to the one from a full decode (the crop is mapped exactly)."""
    _jpeg(tmp_path / "big.jpg", _photo_like(2400, 1800))
    full = load_image(tmp_path / "big.jpg")
    assert full.size == (2400, 1800) and FULL_SIZE_KEY not in full.info
    for size, decoded in ((64, (300, 225)), (224, (300, 225)), (300, (600, 450)), (500, (1200, 900))):
        img = load_image(tmp_path / "big.jpg", size)
        assert img.size == decoded and min(img.size) >= size and full_size(img) == (2400, 1800)
        diff = (eval_view(img, size) - eval_view(full, size)).abs()
        assert float(diff.mean()) < 0.02, (size, float(diff.mean()))
    # an odd size (not a multiple of the 8x8 block) and a portrait frame map just as well
    _jpeg(tmp_path / "odd.jpg", _photo_like(1203, 1805, seed=1))
    img = load_image(tmp_path / "odd.jpg", 150)
    assert img.size == (151, 226) and full_size(img) == (1203, 1805)
    assert float((eval_view(img, 150) - eval_view(load_image(tmp_path / "odd.jpg"), 150)).abs().mean()) < 0.02


def test_small_images_and_other_formats_decode_exactly_as_before(tmp_path):
    arr = _photo_like(300, 200)
    _jpeg(tmp_path / "small.jpg", arr)  # short side 200 < 2 x 128: no scaling
    Image.fromarray(_photo_like(1200, 900)).save(tmp_path / "big.png")
    for name, size in (("small.jpg", 128), ("big.png", 64)):
        plain, drafted = load_image(tmp_path / name), load_image(tmp_path / name, size)
        assert drafted.size == plain.size and FULL_SIZE_KEY not in drafted.info
        assert np.array_equal(np.asarray(plain), np.asarray(drafted))
        assert torch.equal(eval_view(plain, size), eval_view(drafted, size))
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        cfg = AugmentConfig()
        assert torch.equal(augment_view(plain, size, cfg, g1), augment_view(drafted, size, cfg, g2))


def test_draft_decode_applies_exif_orientation(tmp_path):
    arr = _photo_like(1600, 800)
    arr[:, :800] = 255  # left half white
    _jpeg(tmp_path / "r.jpg", arr, exif=gps_exif(30.0, 70.0, orientation=6))
    img = load_image(tmp_path / "r.jpg", 64)
    assert img.size == (100, 200) and full_size(img) == (800, 1600)  # upright: portrait, the white half on top
    full = load_image(tmp_path / "r.jpg")
    assert full.size == (800, 1600)
    top, bottom = np.asarray(img)[:90].mean(), np.asarray(img)[110:].mean()
    assert top > 250 > bottom + 50
    assert float((eval_view(img, 64) - eval_view(full, 64)).abs().mean()) < 0.02


def test_augmented_view_from_a_reduced_decode(tmp_path):
    """The decode for training keeps enough pixels for the smallest crop, and the same seed gives nearly the
    same view as from the full decode (the crop is drawn in full-resolution coordinates)."""
    cfg = AugmentConfig()
    need = augment_min_side(224, cfg)
    lo, (r0, r1) = cfg.crop_scale[0], cfg.crop_ratio
    for ratio in (r0, r1):  # the smallest crop of an image whose short side is exactly ``need``
        assert round(need * (lo * ratio) ** 0.5) >= 224 and round(need * (lo / ratio) ** 0.5) >= 224
    assert (need - 1) * (lo * r0) ** 0.5 < 224  # and not one pixel more than that (before rounding)
    assert augment_min_side(32, AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))) == 32
    assert augment_min_side(32, AugmentConfig(crop_scale=(0.0, 1.0))) is None
    _jpeg(tmp_path / "big.jpg", _photo_like(2400, 1800))
    img, full = load_image(tmp_path / "big.jpg", need), load_image(tmp_path / "big.jpg")
    assert img.size == (600, 450) and min(img.size) >= need
    for seed in range(4):
        a = augment_view(img, 224, cfg, torch.Generator().manual_seed(seed))
        b = augment_view(full, 224, cfg, torch.Generator().manual_seed(seed))
        assert a.shape == (3, 224, 224) and float((a - b).abs().mean()) < 0.02


def test_dataset_decodes_at_the_size_each_view_needs(tmp_path):
    _jpeg(tmp_path / "big.jpg", _photo_like(2400, 1800))
    table = pd.DataFrame({"path": ["big.jpg"], "province_id": [1], "cell_id": [0], "lat": [30.0], "lon": [70.0],
                          "koppen_id": [4], "doy_sin": [0.0], "doy_cos": [1.0]})
    item = ImageDataset(table, tmp_path, 64)[0]
    assert torch.equal(item["image"], eval_view(load_image(tmp_path / "big.jpg", 64), 64))
    cfg = AugmentConfig()
    aug = ImageDataset(table, tmp_path, 64, cfg)[(0, 5)]
    ref = augment_view(load_image(tmp_path / "big.jpg", augment_min_side(64, cfg)), 64, cfg,
                       torch.Generator().manual_seed(5))
    assert torch.equal(aug["image"], ref)


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
    shard_files = sorted(p.name.split("-")[0] + p.name[p.name.index("."):] for p in (cache2.dir / "shards").iterdir())
    assert shard_files == [f"00000{i}.{kind}" for i in (0, 1) for kind in ("clip.npy", "index.parquet", "scene.npy")]

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
    assert rej[rows["image_id"].iloc[1]] == reasons.BYTES_CHANGED  # catalogued bytes replaced by HTML
    assert rej[rows["image_id"].iloc[3]] == reasons.MISSING_FILE
    _, again = build_embedding_cache(enc, rows, broken, tmp_path / "emb", batch_size=2)
    assert again["computed"] == 0 and again["unreadable"] == 0  # not retried with the same weights


def test_model_loader_refuses_decompression_bombs_like_the_filter(tmp_path):
    """The model's loader shares the filter's header check: a header claiming more than the pixel limit is
    refused before decoding (the dataset then skips the row, the predictor reports it)."""
    import io

    from geopak_model.data import ImageDataset, Unreadable, load_image
    from pipeline.core.decode import DEFAULT_MAX_PIXELS, DecodeError

    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, "PNG")  # 81 MP > the 64 MP limit, a few KB on disk
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(buf.getvalue())
    assert 9000 * 9000 > DEFAULT_MAX_PIXELS
    with pytest.raises(DecodeError) as err:
        load_image(bomb)
    assert err.value.reason == "decompression_bomb"
    with pytest.raises(DecodeError):
        load_image(io.BytesIO(buf.getvalue()))
    table = pd.DataFrame({"path": ["bomb.png"]})
    assert ImageDataset(table, tmp_path, 32, with_labels=False)[0] == Unreadable(0, reasons.NOT_AN_IMAGE)


def test_model_loader_accepts_only_photo_formats(tmp_path):
    """The same photo formats as the filter: a GIF given to the predictor is refused, not decoded."""
    import io

    from geopak_model.data import load_image
    from pipeline.core.decode import DecodeError

    buf = io.BytesIO()
    Image.new("P", (64, 64)).save(buf, "GIF")
    with pytest.raises(DecodeError) as err:
        load_image(io.BytesIO(buf.getvalue()))
    assert err.value.reason == "unsupported_format"


def test_a_build_that_leaves_too_many_shards_compacts_them(world, tmp_path, monkeypatch):
    """Each build commits a shard per chunk; one that leaves more than ``MAX_SHARDS`` merges them, and what was
    cached reads the same."""
    from geopak_model import cache as cache_mod

    table, _ = load_training_table(world)
    enc = build_encoders(TINY_ENC)
    root = tmp_path / "emb"
    monkeypatch.setattr(cache_mod, "MAX_SHARDS", 3)
    cache, stats = build_embedding_cache(enc, table.head(8), world.root, root, batch_size=2, chunk_images=2)
    assert stats["shards_written"] == 4 and stats["shards_compacted"] == 3
    assert len(cache.shard_names(refresh=True)) == 1
    clip, scene = cache.load(table.head(8)["image_id"])
    again, stats2 = build_embedding_cache(enc, table.head(8), world.root, root, batch_size=2, chunk_images=2)
    assert stats2["reused"] == 8 and "shards_compacted" not in stats2
    c2, s2 = again.load(table.head(8)["image_id"])
    assert torch.equal(c2, clip) and torch.equal(s2, scene)
