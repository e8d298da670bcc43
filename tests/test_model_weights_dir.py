"""Defect 2: encoder weights files that a config names relative to ``<data root>/weights/`` (as the gpu-full
preset does) are found by evaluation and ``geopak predict`` as training finds them, from any working directory."""

from __future__ import annotations

import json
from collections import OrderedDict

import pandas as pd
import pytest
import torch
import torchvision

from geopak_model.cells import CellTable
from geopak_model.checkpoint import save_checkpoint
from geopak_model.config import preset
from geopak_model.encoders import WeightsNotFound, build_clip, build_encoders
from geopak_model.model import GeopakHeads
from geopak_model.predictor import GeopakPredictor
from pipeline.cli import main as cli_main
from tests.model_world import build_world

CLIP_FILE = "vit_tiny_openai.pt"  # "openai" in the name: clip_activation "auto" resolves to QuickGELU
PLACES_FILE = "resnet18_places365.pth.tar"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data root with real-format weights files in weights/ and a checkpoint whose config names them relatively."""
    root = tmp_path_factory.mktemp("world")
    paths = build_world(root, per_cell=2, size=40)
    splits = pd.read_parquet(paths.splits)
    splits.loc[splits["split"] == "val", "split"] = "test"
    splits.to_parquet(paths.splits)
    paths.weights_dir.mkdir()
    torch.manual_seed(11)
    places = torchvision.models.resnet18(num_classes=365)
    sd = OrderedDict((f"module.{k}", v) for k, v in places.state_dict().items())
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": sd, "best_prec1": 54.7},
               paths.weights_dir / PLACES_FILE, _use_new_zipfile_serialization=False)
    cfg = preset("test-tiny", data_root=str(root),
                 encoder={"clip_pretrained": CLIP_FILE, "scene_weights": PLACES_FILE})
    torch.manual_seed(12)
    clip = build_clip(preset("test-tiny").encoder)
    torch.save({f"visual.{k}": v for k, v in clip.visual.state_dict().items()}, paths.weights_dir / CLIP_FILE)
    encoder = build_encoders(cfg.encoder, paths.weights_dir)  # what training builds (Trainer.weights_dir)
    cells = CellTable.from_frames(pd.read_parquet(paths.geocells), pd.read_parquet(paths.geocell_neighbours))
    heads = GeopakHeads(cells, *encoder.dims, cfg.model)
    ckpt = save_checkpoint(paths.model_dir / "geopak" / "model.pt", {
        "config": cfg.to_dict(), "cells": cells.to_state(), "heads": heads.state_dict(), "encoder": None,
        "encoder_weights_id": encoder.weights_id()})
    return paths, ckpt, places, clip


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from a working directory that is not the data root (nor its weights/)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GEOPAK_DATA_ROOT", raising=False)
    return tmp_path


def test_predictor_needs_the_weights_dir(world, elsewhere):
    paths, ckpt, places, clip = world
    with pytest.raises(WeightsNotFound):  # the defect: only the working directory was searched
        GeopakPredictor.from_checkpoint(ckpt, device="cpu")
    pred = GeopakPredictor.from_checkpoint(ckpt, device="cpu", weights_dir=paths.weights_dir)
    enc = pred.model.encoder
    assert torch.equal(enc.scene.net.conv1.weight, places.conv1.weight)
    assert torch.equal(enc.clip.visual.conv1.weight, clip.visual.conv1.weight)
    assert enc.clip.activation == "quick_gelu"


def test_cli_predict_finds_weights_under_the_data_root(world, elsewhere, capsys, monkeypatch):
    paths, ckpt, _, _ = world
    image = str(paths.root / pd.read_parquet(paths.labelled)["path"].iloc[0])
    assert cli_main(["predict", image, "--data-root", str(paths.root)]) == 0  # checkpoint and weights by default
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["image"] == image and "lat" in line
    monkeypatch.setenv("GEOPAK_DATA_ROOT", str(paths.root))
    assert cli_main(["predict", image]) == 0
    capsys.readouterr()
    # a checkpoint outside any data root, its weights given explicitly
    moved = elsewhere / "model.pt"
    moved.write_bytes(ckpt.read_bytes())
    monkeypatch.setenv("GEOPAK_DATA_ROOT", str(elsewhere / "empty"))
    assert cli_main(["predict", image, "--checkpoint", str(moved)]) == 2
    assert "weights file" in capsys.readouterr().err
    assert cli_main(["predict", image, "--checkpoint", str(moved), "--weights-dir", str(paths.weights_dir)]) == 0


def test_evaluation_asset_finds_weights(world, elsewhere, boundaries_path):
    paths, _, _, _ = world
    from tests.conftest import materialize_evaluation

    md = materialize_evaluation(paths.root, boundaries_path)
    assert md["test_images"].value == 14 and md["unreadable_images"].value == 0
