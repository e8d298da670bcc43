"""Defect 4: CSAIL's ``resnet50_places365.pth.tar`` is a legacy (pre-zip) torch pickle holding
{"epoch", "arch", "state_dict" (DataParallel ``module.`` keys, no BatchNorm ``num_batches_tracked``: PyTorch 0.2),
"best_prec1"}. It must load through the production path with ``weights_only=True``: safely, not by trusting pickle."""

from __future__ import annotations

import dataclasses
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision

from geopak_model.config import EncoderConfig
from geopak_model.encoders import IMAGENET_MEAN, IMAGENET_STD, build_encoders, build_scene, read_state_dict

CFG = EncoderConfig(clip_model="custom", clip_custom={"width": 32, "layers": 1, "heads": 2, "patch_size": 16},
                    scene_arch="resnet18", image_size=64)


def _csail_like(path: Path) -> torchvision.models.ResNet:
    """Write a ResNet-18 exactly as CSAIL's 2017 script saved ResNet-50, in the legacy serialization."""
    torch.manual_seed(7)
    ref = torchvision.models.resnet18(num_classes=365)
    sd = OrderedDict((f"module.{k}", v) for k, v in ref.state_dict().items() if "num_batches_tracked" not in k)
    obj = {"epoch": 90, "arch": "resnet18", "state_dict": sd, "best_prec1": 54.74}
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return ref


def test_legacy_places365_checkpoint_loads_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "weights" / "resnet18_places365.pth.tar"
    path.parent.mkdir()
    ref = _csail_like(path)
    with open(path, "rb") as fh:
        assert fh.read(2) != b"PK"  # really the legacy format, not a zip archive
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    scene = build_scene(dataclasses.replace(CFG, scene_weights=path.name), weights_dir=path.parent)
    assert calls == [True]  # the one read of the file was a weights_only read
    for k, v in ref.state_dict().items():
        if not k.startswith("fc.") and "num_batches_tracked" not in k:
            assert torch.equal(scene.net.state_dict()[k], v), k
    ref.fc = torch.nn.Identity()
    ref.eval()
    scene.eval()
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(scene(x), ref((x - mean) / std), atol=1e-5)
    # and through build_encoders (the path training and the predictor take)
    assert build_encoders(dataclasses.replace(CFG, scene_weights=str(path))).scene.out_dim == 512


class _Payload:
    """Stands for arbitrary code in a pickle: a weights_only load must refuse to build it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_legacy_file_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    sd = {f"module.{k}": v for k, v in torchvision.models.resnet18(num_classes=365).state_dict().items()}
    torch.save({"state_dict": sd, "extra": _Payload()}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        read_state_dict(path)
