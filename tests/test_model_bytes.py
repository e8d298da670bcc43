"""Bytes are verified where the model reads them (issue 13.4). A stored train image and a stored test image are
truncated after the catalog hashed them; training and evaluation then run on the tiny model world: the train
image is rejected by the embedding build with ``bytes_changed`` (recorded, excluded, reported in the result),
and the test image is reported as unreadable with ``bytes_changed`` instead of being scored."""

from __future__ import annotations

import pandas as pd
import pytest

from geopak_model.cache import EmbeddingCache
from geopak_model.config import preset
from geopak_model.data import BytesChangedError, ImageDataset, Unreadable, read_verified
from geopak_model.trainer import Trainer
from pipeline.core import reasons
from tests.conftest import materialize_evaluation
from tests.model_world import build_world
from pipeline.defs.metadata import metadata_text


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_reads_are_checked_against_the_image_id(tmp_path):
    paths = build_world(tmp_path, per_cell=2, size=40)
    row = pd.read_parquet(paths.labelled).iloc[0]
    f = paths.root / row["path"]
    assert read_verified(f, row["image_id"]) == f.read_bytes()
    table = pd.DataFrame([row])[["image_id", "path"]]
    assert "image" in ImageDataset(table, paths.root, 32, with_labels=False)[0]
    _truncate(f)
    with pytest.raises(BytesChangedError, match="not to the image id"):
        read_verified(f, row["image_id"])
    assert ImageDataset(table, paths.root, 32, with_labels=False)[0] == Unreadable(0, reasons.BYTES_CHANGED)
    f.unlink()
    assert ImageDataset(table, paths.root, 32, with_labels=False)[0] == Unreadable(0, reasons.MISSING_FILE)


@pytest.mark.slow
def test_truncated_train_and_test_images_are_caught_with_the_reason(tmp_path, boundaries_path):
    paths = build_world(tmp_path, per_cell=5, size=40)
    # a test split: in every cell, one training image (the largest id) becomes a test image
    splits = pd.read_parquet(paths.splits)
    cells = pd.read_parquet(paths.cell_assignments)[["image_id", "cell_id"]]
    train = splits.merge(cells, on="image_id").query("split == 'train'")
    to_test = train.sort_values("image_id").groupby("cell_id")["image_id"].last()
    splits.loc[splits["image_id"].isin(to_test), "split"] = "test"
    splits.to_parquet(paths.splits)
    labelled = pd.read_parquet(paths.labelled).set_index("image_id")
    split_of = splits.set_index("image_id")["split"]
    train_victim = sorted(split_of[split_of == "train"].index)[3]
    test_victim = sorted(split_of[split_of == "test"].index)[2]
    for victim in (train_victim, test_victim):  # after filtering: the files the catalog hashed
        _truncate(paths.root / labelled.loc[victim, "path"])

    cfg = preset("test-tiny", data_root=str(paths.root), cpu_threads=1, run_phases=[0, 1],
                 phases=[{"epochs": 1}, {"epochs": 1}, {"epochs": 1}])
    trainer = Trainer(cfg, log=lambda m: None)
    summary = trainer.run()
    n_train = int((split_of == "train").sum())
    assert summary["cache"]["bytes_changed"] == 1 and summary["cache"]["bytes_changed_ids"] == [train_victim]
    assert summary["cache"]["excluded_by_reason"] == {reasons.BYTES_CHANGED: 1}
    assert summary["train_images"] == n_train - 1 and train_victim not in set(trainer.train_table["image_id"])
    rejected = EmbeddingCache(paths.embeddings_dir, trainer.weights_id).rejections().set_index("image_id")
    assert rejected.loc[train_victim, "reason"] == reasons.BYTES_CHANGED

    md = materialize_evaluation(paths.root, boundaries_path)
    n_test = int((split_of == "test").sum())
    assert md["test_images"].value == n_test - 1  # the changed test image is not scored
    assert md["unreadable_images"].value == 1 and md["bytes_changed_images"].value == 1
    detail = metadata_text(md["unreadable_detail"])
    assert test_victim in detail and reasons.BYTES_CHANGED in detail
    predictions = pd.read_parquet(next(paths.evaluation_dir.glob("*/predictions.parquet")))
    assert test_victim not in set(predictions["image_id"]) and len(predictions) == n_test - 1
