"""The filter's single decode makes the training copy (pipeline.core.copies); the shard writer uses it (issue 22)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.copies import COPIES_DIR, CopyCache, CopySpec
from pipeline.core.decode import decode, decode_grey_and_rgb, open_image
from pipeline.core.paths import DataPaths
from pipeline.core.shards import ShardSet
from pipeline.core.store import ImageStore, sha256_hex
from pipeline.export.build import ShardConfig, build_shards, shard_copy
from pipeline.filters.indoor import ClipSpec
from pipeline.filters.metrics import MetricsParams, measure_source
from pipeline.filters.stage import FilterConfig, filter_catalog
from tests.filter_corpus import Case, encode, scene
from tests.shard_world import build_shard_world
from tests.test_filters import catalog_of

SPEC = CopySpec()


def _photo(seed: int, size: tuple[int, int], **kw) -> bytes:
    return encode(scene(seed, size), quality=90, **kw)


@pytest.mark.parametrize("size, same_scale", [((1800, 1350), True), ((1350, 1800), True), ((900, 700), True),
                                              ((1600, 1200), False), ((700, 2000), False)])
def test_one_decode_gives_the_metrics_grey_and_the_shard_writers_copy(tmp_path, size, same_scale):
    """Where the draft scale is the metrics' own, the grey image is bit-identical to the 'L' decode; the copy is
    byte-identical to the one the shard writer makes from the original."""
    data = _photo(5, size)
    grey_only, _ = decode(open_image(data, 10**8), "L", 256, 10**8)
    grey, rgb, _ = decode_grey_and_rgb(open_image(data, 10**8), 256, SPEC.short_side, 10**8)
    assert min(rgb.size) >= SPEC.short_side and grey.mode == "L" and rgb.mode == "RGB"
    if same_scale:  # the draft scale the metrics ask for covers the copy too: the metrics do not move at all
        assert np.array_equal(np.asarray(grey), np.asarray(grey_only))
    else:  # the copy needs a larger draft than the metrics: same size, grey levels within a little
        assert grey.size == grey_only.size
        assert np.abs(np.asarray(grey, float) - np.asarray(grey_only, float)).mean() < 2.0
    image_id = sha256_hex(data)
    params = MetricsParams(copy_short_side=SPEC.short_side, copy_dir=str(tmp_path))
    row = measure_source(data, {"image_id": image_id}, params)
    made, why = CopyCache(tmp_path, SPEC).get(image_id)
    assert "error" not in row and why is None and made is not None
    assert made.jpg == shard_copy(data, SPEC.short_side, SPEC.quality).jpg
    assert params.key != MetricsParams().key  # the copy size can set the draft scale: another measurement
    # a copy smaller than the analysis image would come from a larger draft than the shard writer's: none is made
    assert MetricsParams(copy_short_side=128, copy_dir=str(tmp_path)).copy_spec is None


def test_small_or_rejected_images_get_no_copy_kept_ones_do(tmp_path, boundaries):
    store = ImageStore(tmp_path)
    big, small = _photo(1, (640, 480)), _photo(2, (240, 180))
    blank = encode(Image.new("RGB", (640, 480), (120, 120, 120)), quality=90)  # near_uniform
    catalog = catalog_of(store, [Case("big", big, None, (640, 480)), Case("small", small, None, (240, 180)),
                                 Case("blank", blank, "near_uniform", (640, 480))])
    empty = tmp_path / "hf-empty"
    empty.mkdir()
    cfg = FilterConfig(clip=ClipSpec(cache_dir=str(empty)), workers=1)
    res = filter_catalog(catalog, store, boundaries, cfg, tmp_path / "f" / "m.parquet", tmp_path / "f" / "i.parquet",
                         copy_dir=tmp_path / COPIES_DIR)
    assert set(res.kept["source_id"]) == {"big", "small"}
    cache = CopyCache(tmp_path / COPIES_DIR, SPEC)
    ids = dict(zip(catalog["source_id"], catalog["image_id"]))
    assert cache.has(ids["big"]) and not cache.has(ids["small"])  # small: stored as it is, no copy to make
    assert not cache.has(ids["blank"]) and (res.copies_kept, res.copies_dropped) == (1, 1)
    # without a copy cache nothing is written and the metrics keep their old key
    plain = filter_catalog(catalog, store, boundaries, cfg, tmp_path / "g" / "m.parquet", tmp_path / "g" / "i.parquet")
    assert (plain.copies_kept, plain.copies_dropped) == (0, 0) and plain.metrics_computed == 3


def _fill_cache(paths: DataPaths, cfg: ShardConfig) -> dict[str, str]:
    """Copies for every image of the shard world that needs one, as the filter makes them; id -> path."""
    labelled = pd.read_parquet(paths.labelled)
    params = MetricsParams(copy_short_side=cfg.short_side, copy_quality=cfg.quality,
                           copy_dir=str(paths.root / COPIES_DIR))
    made = {}
    for image_id, rel in zip(labelled["image_id"], labelled["path"]):
        measure_source((paths.root / rel).read_bytes(), {"image_id": image_id}, params)
        if CopyCache(paths.root / COPIES_DIR, cfg.spec).has(image_id):
            made[image_id] = rel
    return made


def _shard_bytes(paths: DataPaths) -> dict[str, bytes]:
    shards = ShardSet.find(paths.root)
    out = {}
    for info in shards.shards():
        index = pd.read_parquet(info.index_path(shards.root))
        with open(shards.root / info.split / f"{info.shard}.tar", "rb") as fh:
            for r in index.itertuples():
                fh.seek(r.offset)
                out[r.image_id] = fh.read(r.size)
    return out


def test_shard_writer_takes_the_filters_copies_and_counts_them(tmp_path):
    cfg = ShardConfig(shard_size=8, short_side=256)
    paths = build_shard_world(tmp_path / "a")
    made = _fill_cache(paths, cfg)
    assert len(made) == 3  # the large JPEG, the PNG and the rotated JPEG of the shard world
    exported = set(pd.read_parquet(paths.splits).query("split in ['train', 'val', 'test']")["image_id"])
    build = build_shards(paths, cfg)
    assert build.counts["from_filter"] == len(made.keys() & exported) > 0
    assert build.counts["resized"] == 0 and build.counts["invalid_cached"] == 0
    # handed off: the shards hold the copies now, the cache keeps only those of images in no exported split
    cache = CopyCache(paths.root / COPIES_DIR, cfg.spec)
    assert {i for i in made if cache.has(i)} == made.keys() - exported
    # the same shards, built without the cache: identical copies
    plain = build_shard_world(tmp_path / "b")
    assert build_shards(plain, cfg).counts["from_filter"] == 0
    assert _shard_bytes(paths) == _shard_bytes(plain)


@pytest.mark.parametrize("damage", ["bytes", "record", "other_settings", "truncated_jpeg"])
def test_a_stale_or_corrupt_copy_is_never_used_and_is_made_again(tmp_path, damage):
    cfg = ShardConfig(shard_size=8, short_side=256)
    paths = build_shard_world(tmp_path)
    made = _fill_cache(paths, cfg)
    victim = sorted(made)[0]
    cache = CopyCache(paths.root / COPIES_DIR, cfg.spec)
    jpg, meta = cache._paths(victim)
    good = jpg.read_bytes()
    if damage == "bytes":  # same length, other pixels: the recorded sha256 catches it
        jpg.write_bytes(good[:-10] + bytes(10))
    elif damage == "record":
        meta.write_text("{not json")
    elif damage == "other_settings":
        meta.write_text(meta.read_text().replace(cfg.preprocess, "short999-q90-v2"))
    else:
        bad = encode(Image.new("RGB", (10, 10)))[:50]
        jpg.write_bytes(bad)
        meta.write_text(meta.read_text().replace(sha256_hex(good), sha256_hex(bad)))
    copy, why = cache.get(victim)
    assert copy is None and why
    build = build_shards(paths, cfg)
    assert build.counts["invalid_cached"] == 1 and build.counts["resized"] == 1
    assert _shard_bytes(paths)[victim] == shard_copy((paths.root / made[victim]).read_bytes(), 256, 90).jpg == good
    assert not cache.has(victim)  # the refused copy is gone with the hand-off


def test_copies_of_other_settings_are_not_found(tmp_path):
    data = _photo(3, (800, 600))
    image_id = sha256_hex(data)
    CopyCache(tmp_path, CopySpec(320, 90)).put(image_id, shard_copy(data, 320, 90))
    assert CopyCache(tmp_path, CopySpec(320, 90)).get(image_id)[0] is not None
    assert CopyCache(tmp_path, CopySpec(256, 90)).get(image_id) == (None, None)
    assert CopyCache(tmp_path, CopySpec(320, 80)).get(image_id) == (None, None)
    with Image.open(io.BytesIO(CopyCache(tmp_path, SPEC).get(image_id)[0].jpg)) as im:
        assert min(im.size) == 320


def test_making_the_copy_never_changes_a_verdict(tmp_path, monkeypatch):
    """A truncated file is undecodable with or without copies (and gets none); if the combined decode fails where
    the plain one would not, the image is measured as without copies."""
    from pipeline.core.decode import DecodeError
    from pipeline.filters import metrics

    with_copies = MetricsParams(copy_short_side=SPEC.short_side, copy_dir=str(tmp_path))
    data = _photo(4, (800, 600))
    truncated = data[: len(data) // 2]
    rows = [measure_source(truncated, {"image_id": sha256_hex(truncated)}, p) for p in (MetricsParams(), with_copies)]
    assert rows[0]["error"] == rows[1]["error"] == "undecodable"
    assert not CopyCache(tmp_path, SPEC).has(sha256_hex(truncated))

    def fails(*_a, **_k):
        raise DecodeError("undecodable", "YCbCr output not possible")

    monkeypatch.setattr(metrics, "decode_grey_and_rgb", fails)
    row = measure_source(data, {"image_id": sha256_hex(data)}, with_copies)
    assert "error" not in row and row["phash"] == measure_source(data, {}, MetricsParams())["phash"]
    assert not CopyCache(tmp_path, SPEC).has(sha256_hex(data))


def test_bad_file_corpus_gets_the_same_verdicts_with_copies(tmp_path, boundaries):
    """CMYK, palette, 16-bit, rotated, corrupt-EXIF ... inputs: the same outcomes as without copies; every kept
    image that needs a copy has a valid one, identical to the shard writer's."""
    from pipeline.core.store import ImageStore as Store
    from tests.filter_corpus import bad_file_corpus

    corpus = bad_file_corpus()
    store = Store(tmp_path)
    catalog = catalog_of(store, corpus)
    empty = tmp_path / "hf-empty"
    empty.mkdir()
    cfg = FilterConfig(clip=ClipSpec(cache_dir=str(empty)), workers=1, copy_short_side=64, analysis_size=64,
                       blur_size=32)
    res = filter_catalog(catalog, store, boundaries, cfg, tmp_path / "f" / "m.parquet", tmp_path / "f" / "i.parquet",
                         copy_dir=tmp_path / COPIES_DIR)
    plain = filter_catalog(catalog, store, boundaries, cfg, tmp_path / "g" / "m.parquet",
                           tmp_path / "g" / "i.parquet")
    assert res.outcomes["outcome"].tolist() == plain.outcomes["outcome"].tolist()
    cache = CopyCache(tmp_path / COPIES_DIR, CopySpec(64, 90))
    assert res.copies_kept > 0
    for image_id, rel in zip(res.kept["image_id"], res.kept["path"]):
        copy, why = cache.get(image_id)
        expected = shard_copy(store.abspath(rel).read_bytes(), 64, 90)
        assert why is None and (copy is None) == (not expected.resized)
        assert copy is None or copy.jpg == expected.jpg
