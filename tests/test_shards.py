"""Issue 22 items 1-2: the image shards (written once, resumable, checked by sha256) and the dataset export they are,
read back with our reader, the real ``webdataset`` library and Hugging Face ``datasets`` (offline), every sample's
licence and attribution checked against the catalog."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.core.paths import DataPaths
from pipeline.core.processes import HOST_TAG
from pipeline.core.shards import (
    DATASHEET,
    MANIFEST,
    ShardCorrupt,
    ShardSet,
    ShardsIncomplete,
    ShardsStale,
    read_stats,
    stats_path,
)
from pipeline.core.store import ImageStore
from pipeline.export import datasheet
from pipeline.export.build import ShardConfig, build_shards, plan_shards, shard_copy
from pipeline.filters.licenses import license_url
from tests.shard_world import FLICKR_OWNER, PLACES_ATTRIBUTION, build_shard_world
from pipeline.defs.metadata import metadata_text

CFG = ShardConfig(shard_size=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    paths = build_shard_world(tmp_path_factory.mktemp("shards"))
    build = build_shards(paths, CFG, None, datasheet.documents)
    return paths, build


def _expected(paths: DataPaths) -> pd.DataFrame:
    labelled = pd.read_parquet(paths.labelled).merge(pd.read_parquet(paths.splits), on="image_id")
    return labelled[labelled["split"].isin(["train", "val", "test"])].set_index("image_id")


def _check_record(rec: dict, want: pd.Series) -> None:
    """The licence and attribution of one sample are the catalog's, with the licence's URL."""
    assert rec["source"] == want["source"] and rec["split"] == want["split"]
    assert rec["license"] == want["license"] and rec["license_url"] == license_url(want["license"])
    if want["source"] == "flickr":
        assert rec["owner"] == FLICKR_OWNER and rec["license_url"] == "https://creativecommons.org/licenses/by-sa/4.0/"
        assert rec["source_url"].startswith(f"https://www.flickr.com/photos/{FLICKR_OWNER}/")
        assert FLICKR_OWNER in rec["credit"] and rec["redistributable"]
    elif want["source"] == "google_places":
        assert rec["attribution"] == PLACES_ATTRIBUTION and "Ayesha Khan" in rec["credit"]
        assert rec["redistributable"] is False
    else:
        assert rec["attribution"] is None and rec["license_url"] == "https://creativecommons.org/publicdomain/zero/1.0/"
    assert rec["province"] == want["province_key"] and rec["koppen"] == want["koppen_code"]
    assert rec["lat"] == pytest.approx(want["lat"]) and rec["day_of_year"] == want["day_of_year"]


def test_layout_manifest_and_copies(world):
    paths, build = world
    root = paths.root / "shards"
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["preprocess"] == CFG.preprocess and manifest["config"]["short_side"] == 320
    expected = _expected(paths)
    shards = ShardSet.find(paths.root)
    assert shards is not None
    index = shards.index()
    assert sorted(index["key"]) == sorted(expected.index)  # every train/val/test image once, no buffer image
    for split in ("train", "val", "test"):
        for info in shards.shards(split):
            tar = root / split / f"{info.shard}.tar"
            assert (root / split / f"{info.shard}.parquet").exists() and stats_path(root / split, info.shard).exists()
            assert hashlib.sha256(tar.read_bytes()).hexdigest() == info.sha256 and info.samples <= CFG.shard_size
            with tarfile.open(tar) as tf:
                names = tf.getnames()
            assert names[0::2] == [f"{k}.jpg" for k in index.query("split == @split and shard == @info.shard")["key"]]
            assert names[1::2] == [n.replace(".jpg", ".json") for n in names[0::2]]
    where = shards.locate(index["key"])
    for i, row in index.reset_index(drop=True).iterrows():
        data = where.read(i)
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        if not row["resized"]:  # a small upright JPEG is stored byte for byte
            assert hashlib.sha256(data).hexdigest() == row["key"]
        else:
            with Image.open(io.BytesIO(data)) as im:
                assert im.format == "JPEG" and im.size == (row["width"], row["height"])
                assert min(im.size) <= 320 and im.getexif().get(0x0112) is None  # upright, no EXIF
    big = index[index["original_width"] == 1200].iloc[0]
    assert (big["width"], big["height"]) == (427, 320)  # short side 320, aspect kept
    rotated = index[(index["original_width"] == 80) & (index["original_height"] == 120)].iloc[0]
    assert rotated["resized"] and (rotated["width"], rotated["height"]) == (80, 120)  # turned upright


def test_real_webdataset_reads_every_licence_and_attribution(world):
    import webdataset as wds

    paths, _ = world
    shards = ShardSet.find(paths.root)
    expected = _expected(paths)
    seen = []
    for split in ("train", "val", "test"):
        for sample in wds.WebDataset(shards.urls(split), shardshuffle=False, empty_check=False).decode("pil"):
            rec = sample["json"]
            assert sample["__key__"] == rec["image_id"] and rec["split"] == split
            assert isinstance(sample["jpg"], Image.Image) and sample["jpg"].size == (rec["width"], rec["height"])
            _check_record(rec, expected.loc[rec["image_id"]])
            seen.append(rec["image_id"])
    assert sorted(seen) == sorted(expected.index)


def test_hugging_face_datasets_reads_them_offline(world, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths, _ = world
    shards = ShardSet.find(paths.root)
    expected = _expected(paths)
    card = (shards.root / datasheet.CARD).read_text()
    meta = yaml.safe_load(card.split("---")[1])
    features = datasets.Features._from_yaml_list(meta["dataset_info"]["features"])
    seen = []
    for split in ("train", "val", "test"):
        ds = datasets.load_dataset("webdataset", data_files={split: shards.urls(split)}, split=split,
                                   features=features, cache_dir=str(tmp_path / "hf"))
        for row in ds:
            assert isinstance(row["jpg"], Image.Image)
            _check_record(row["json"], expected.loc[row["__key__"]])
            seen.append(row["__key__"])
    assert sorted(seen) == sorted(expected.index)
    # the folder as a dataset: the card's configs and typed features (a title null in the first samples and set
    # in a later one would otherwise fail type inference)
    test = datasets.load_dataset(str(shards.root), split="test", cache_dir=str(tmp_path / "hf2"))
    assert len(test) == int((expected["split"] == "test").sum())
    assert test.features["json"]["title"] == datasets.Value("string")


def test_datasheet_has_the_real_counts_and_says_synthetic(world):
    paths, build = world
    text = (paths.root / "shards" / DATASHEET).read_text()
    expected = _expected(paths)
    for heading in ("## Motivation", "## Composition", "## Collection process", "## Preprocessing", "## Uses",
                    "## Distribution", "## Licences and attribution", "## Maintenance"):
        assert heading in text
    n, n_synth = len(expected), int((expected["source"] == "sample_world").sum())
    assert f"**Instances**: {n:,} images" in text
    assert f"synthetic sample world** for {n_synth:,} of its {n:,} images" in text
    assert "| google_places |" in text and "CC BY-SA 4.0" in text
    assert "not exported): 1." in text  # the buffer image
    assert f"{3:,} images were resized, {n - 3:,} were already that small" in text
    places = int((expected["source"] == "google_places").sum())
    assert f"- {places:,} images may not be redistributed" in text


def test_the_model_reads_the_shards(world):
    from geopak_model.data import FileImages, ImageDataset, ShardImages, eval_view, load_image

    paths, _ = world
    table = _expected(paths).reset_index()[["image_id", "path"]]
    ds = ImageDataset(table, paths.root, 64, with_labels=False)
    assert isinstance(ds.images, ShardImages) and ds.images.kind == f"shards:{CFG.preprocess}"
    files = FileImages(table, paths.root)
    index = ShardSet.find(paths.root).index().set_index("key")
    for i, image_id in enumerate(table["image_id"]):
        x = ds[i]["image"]
        if not index.loc[image_id, "resized"]:  # the same bytes: the same view as from the original file
            assert bool((x == eval_view(load_image(io.BytesIO(files.read(i)), 64), 64)).all())


def test_corrupt_shard_is_a_clear_error_naming_it(tmp_path):
    paths = build_shard_world(tmp_path)
    build_shards(paths, CFG)
    shards = ShardSet.find(paths.root)
    tar = shards.root / "train" / "00001.tar"
    ids = shards.index("train")["key"]
    where = shards.locate(ids)  # checked and fine
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # inside the first member's bytes: same size, other content
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardCorrupt, match=r"shard .*train/00001\.tar is corrupt"):
        ShardSet.find(paths.root).locate(ids)
    from geopak_model.data import ImageDataset

    with pytest.raises(ShardCorrupt, match="00001.tar"):
        ImageDataset(pd.DataFrame({"image_id": ids, "path": "x"}), paths.root, 32, with_labels=False)
    first = int(np.flatnonzero(where.shard == where.shard.max())[0])
    os.utime(tar, ns=(1, 1))  # a reader located before the change notices it when it opens the shard
    with pytest.raises(ShardCorrupt, match="changed since its sha256 was checked"):
        where.read(first) if where.shard[first] == 1 else where.read(int(np.flatnonzero(where.shard == 1)[0]))
    with pytest.raises(ShardsStale, match="not in the shards"):
        shards.locate(["0" * 64])


def test_resume_redoes_only_unfinished_shards(tmp_path):
    paths = build_shard_world(tmp_path)
    root = paths.root / "shards"

    def dies_after_two(fn, jobs):
        for job in jobs[:2]:
            fn(job)
        raise KeyboardInterrupt("killed")  # what a kill leaves: two shards committed, no manifest

    with pytest.raises(KeyboardInterrupt):
        build_shards(paths, CFG, dies_after_two)
    assert not (root / MANIFEST).exists()
    with pytest.raises(ShardsIncomplete, match="did not finish"):
        ShardSet.find(paths.root)
    done = {p: p.stat().st_mtime_ns for p in sorted((root / "train").glob("0000[01].tar"))}
    assert len(done) == 2
    # a shard cut short and a killed writer's temp file (its pid is gone) are left too
    (root / "val").mkdir(parents=True, exist_ok=True)
    (root / "val" / "00000.tar").write_bytes(b"partial")
    (root / "val" / f".00000.tar.999999_{HOST_TAG}.x.tmp").write_bytes(b"half")
    build = build_shards(paths, CFG)
    assert build.kept == 2 and build.written == len(build.shards) - 2
    assert {p: p.stat().st_mtime_ns for p in done} == done  # committed shards untouched
    assert not list(root.rglob("*.tmp"))
    ShardSet.find(paths.root).locate(ShardSet.find(paths.root).index()["key"])  # all check out
    again = build_shards(paths, CFG)
    assert again.written == 0 and again.kept == len(build.shards)


def test_new_images_rewrite_only_the_last_shard_and_reuse_its_copies(tmp_path):
    paths = build_shard_world(tmp_path)
    cfg = ShardConfig(shard_size=7)
    first = build_shards(paths, cfg)
    train = [i for i in first.shards if i.split == "train"]
    assert train[-1].samples < cfg.shard_size  # a partial last shard
    # two new training images, and a label fix on a val image (metadata only: its copy is reused, not decoded)
    labelled, splits = pd.read_parquet(paths.labelled), pd.read_parquet(paths.splits)
    store = ImageStore(paths.root)
    new = labelled.iloc[[5, 6]].copy()
    for k in range(2):
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 56, 3), 60 + 40 * k, np.uint8)).save(buf, "JPEG")
        new.iloc[k, new.columns.get_loc("image_id")], new.iloc[k, new.columns.get_loc("path")] = store.put(
            buf.getvalue())
    val_id = splits.loc[splits["split"] == "val", "image_id"].iloc[0]
    labelled.loc[labelled["image_id"] == val_id, "title"] = "Fixed title"
    from pipeline.core.schema import LABELLED_SCHEMA, SPLITS_SCHEMA, write_table

    write_table(pd.concat([labelled, new]), paths.labelled, LABELLED_SCHEMA)
    add = pd.DataFrame({"image_id": new["image_id"], "split": "train", "group_id": [10_001, 10_002]})
    write_table(pd.concat([splits, add]), paths.splits, SPLITS_SCHEMA)
    second = build_shards(paths, cfg)
    rewritten = {(i.split, i.shard) for i in second.shards if i not in first.shards}
    val_shard = shard_of(ShardSet.find(paths.root).index("val"), val_id)
    assert rewritten == {("train", train[-1].shard), ("val", val_shard)}  # full train shards untouched
    assert second.counts["resized"] + second.counts["copied"] == 2  # only the new images were read
    assert second.counts["reused"] == train[-1].samples + sum(i.samples for i in first.shards
                                                               if (i.split, i.shard) == ("val", val_shard))
    shards = ShardSet.find(paths.root)
    rec = shards.index("val").set_index("key").loc[val_id]
    assert rec["title"] == "Fixed title"


def shard_of(index: pd.DataFrame, image_id: str) -> str:
    return str(index.set_index("key").loc[image_id, "shard"])


def test_plan_keeps_full_shards_and_fills_holes():
    ids = [f"{i:02d}" for i in range(10)]
    plan = plan_shards(ids, [], 4)
    assert plan == [ids[0:4], ids[4:8], ids[8:10]]
    # one image gone from the first shard, three new ones: shard 1 stays, shard 0 and 2 are refilled
    now = [i for i in ids if i != "01"] + ["10", "11", "12"]
    again = plan_shards(now, plan, 4)
    assert again[1] == plan[1] and sorted(sum(again, [])) == sorted(now) and all(len(s) <= 4 for s in again)


def test_copy_rules():
    small = io.BytesIO()
    Image.fromarray(np.zeros((100, 150, 3), np.uint8)).save(small, "JPEG")
    assert shard_copy(small.getvalue(), 320, 90).jpg == small.getvalue()  # kept as is
    big = io.BytesIO()
    Image.fromarray(np.zeros((1000, 700, 3), np.uint8)).save(big, "JPEG")
    c = shard_copy(big.getvalue(), 320, 90)
    assert (c.width, c.height, c.resized) == (320, 457, True)
    from pipeline.core.decode import DecodeError

    with pytest.raises(DecodeError, match="not_an_image"):
        shard_copy(b"not an image", 320, 90)


def test_unreadable_image_is_recorded_not_exported(tmp_path):
    paths = build_shard_world(tmp_path)
    labelled = pd.read_parquet(paths.labelled)
    splits = pd.read_parquet(paths.splits).set_index("image_id")["split"]
    victim = labelled[labelled["image_id"].map(splits) == "train"].iloc[0]
    (paths.root / victim["path"]).write_bytes(b"\xff\xd8\xff truncated")
    build = build_shards(paths, CFG)
    assert build.rejections.set_index("image_id").loc[victim["image_id"], "reason"] == "bytes_changed"
    shards = ShardSet.find(paths.root)
    where = shards.locate([victim["image_id"]])
    assert where.reason(0) == "bytes_changed"
    from geopak_model.data import ImageDataset, Unreadable

    ds = ImageDataset(pd.DataFrame({"image_id": [victim["image_id"]], "path": [victim["path"]]}), paths.root, 32,
                      with_labels=False)
    assert ds[0] == Unreadable(0, "bytes_changed")


def test_embedding_cache_keys_features_on_the_image_source(tmp_path):
    """Features computed from the original files are not reused once the shards exist (other pixels)."""
    import shutil

    from geopak_model.cache import EmbeddingCache, build_embedding_cache
    from geopak_model.config import preset
    from geopak_model.encoders import build_encoders

    paths = build_shard_world(tmp_path)
    table = _expected(paths).reset_index()[["image_id", "path"]].head(4)
    encoder = build_encoders(preset("test-tiny").encoder)
    cache, stats = build_embedding_cache(encoder, table, paths.root, tmp_path / "emb", batch_size=8)
    assert stats["image_source"] == "files" and cache.image_source == "files"
    build_shards(paths, CFG)
    cache, stats = build_embedding_cache(encoder, table, paths.root, tmp_path / "emb", batch_size=8)
    assert stats["discarded_other_image_source"] == f"files -> shards:{CFG.preprocess}"
    assert stats["computed"] == len(table) and EmbeddingCache(tmp_path / "emb", cache.weights_id).image_source == \
        f"shards:{CFG.preprocess}"
    _, stats = build_embedding_cache(encoder, table, paths.root, tmp_path / "emb", batch_size=8)
    assert stats["reused"] == len(table) and "discarded_other_image_source" not in stats
    shutil.rmtree(paths.root / "shards")


@pytest.mark.slow
def test_materialize_image_shards(tmp_path, boundaries_path):
    import dagster as dg

    from pipeline.defs.geocells import dataset_splits
    from pipeline.defs.labels import labelled_catalog
    from pipeline.defs.shards import image_shards
    from tests.conftest import asset_resources

    paths = build_shard_world(tmp_path)
    result = dg.materialize(
        [labelled_catalog.to_source_asset(), dataset_splits.to_source_asset(), image_shards],
        resources=asset_resources(paths.root, boundaries_path), selection=[image_shards],
        run_config={"ops": {"image_shards": {"config": {"short_side": 256, "shard_size": 16}}}})
    assert result.success
    md = result.asset_materializations_for_node("image_shards")[0].metadata
    n = len(_expected(paths))
    assert md["dagster/row_count"].value == n and md["shards"].value == len(ShardSet.find(paths.root).shards())
    assert md["images_resized"].value == 3 and "| train |" in metadata_text(md["per_split"])
    assert (md["copies_decoded_again"].value, md["copies_from_filter"].value) == (3, 0)  # no filter ran here
    assert md["copy"].value.startswith("short side ≤ 256 px") and (paths.root / "shards" / DATASHEET).exists()
    assert read_stats(stats_path(paths.root / "shards" / "train", "00000")).preprocess == "short256-q90-v2"
