"""Encoders load weight files in the real formats (saved here by the tests) through the production code path;
missing weights fail fast offline; normalisation happens inside forward; phase-2 unfreezing is partial."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from geopak_model.config import EncoderConfig
from geopak_model.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WeightsNotFound,
    build_clip,
    build_encoders,
    build_scene,
)

TINY = EncoderConfig(clip_model="custom", clip_custom={"width": 32, "layers": 4, "heads": 2, "patch_size": 16},
                     scene_arch="resnet18", image_size=64)


def test_places365_official_checkpoint_format(tmp_path):
    import torchvision

    torch.manual_seed(3)
    ref = torchvision.models.resnet18(num_classes=365)
    ckpt = {"epoch": 90, "arch": "resnet18", "best_prec1": 54.7,
            "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}
    (tmp_path / "weights").mkdir()
    torch.save(ckpt, tmp_path / "weights" / "resnet18_places365.pth.tar")
    cfg = dataclasses.replace(TINY, scene_weights="resnet18_places365.pth.tar")
    scene = build_scene(cfg, weights_dir=tmp_path / "weights")  # resolved relative to the data root's weights/
    assert torch.equal(scene.net.conv1.weight, ref.conv1.weight)
    assert isinstance(scene.net.fc, torch.nn.Identity) and scene.out_dim == 512
    x = torch.rand(2, 3, 64, 64)
    ref.fc = torch.nn.Identity()
    ref.eval()
    scene.eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(scene(x), ref((x - mean) / std), atol=1e-5)  # ImageNet normalisation inside forward


def test_wrong_places_checkpoint_is_a_clear_error(tmp_path):
    import torchvision

    torch.save({"state_dict": torchvision.models.resnet18(num_classes=365).state_dict()}, tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="do not fit resnet50"):
        build_scene(dataclasses.replace(TINY, scene_arch="resnet50", scene_weights=str(tmp_path / "r18.pth")))


def test_clip_full_checkpoint_file_custom_vit(tmp_path):
    torch.manual_seed(5)
    src = build_clip(TINY)
    full = {f"visual.{k}": v for k, v in src.visual.state_dict().items()}
    full["text_projection"] = torch.zeros(3)  # a full CLIP checkpoint also has the text tower: ignored
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.items()}}, tmp_path / "clip.pt")
    torch.manual_seed(99)
    loaded = build_clip(dataclasses.replace(TINY, clip_pretrained=str(tmp_path / "clip.pt")))
    for (k, a), b in zip(src.visual.state_dict().items(), loaded.visual.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    loaded.eval()
    assert torch.allclose(loaded(x), loaded.visual((x - mean) / std))  # CLIP normalisation inside forward
    assert loaded(x).shape == (2, 32)


def test_open_clip_named_model_from_local_file(tmp_path):
    cfg = EncoderConfig(clip_model="ViT-S-32", scene_arch="resnet18", image_size=64)
    torch.manual_seed(0)
    src = build_clip(cfg)
    assert src.out_dim == 384 and src.visual.proj is None
    torch.save({f"visual.{k}": v for k, v in src.visual.state_dict().items()}, tmp_path / "open_clip_model.bin")
    torch.manual_seed(1)
    loaded = build_clip(dataclasses.replace(cfg, clip_pretrained=str(tmp_path / "open_clip_model.bin")))
    assert torch.equal(loaded.visual.conv1.weight, src.visual.conv1.weight)
    bad = {k: v for k, v in src.visual.state_dict().items() if "resblocks.11" not in k}
    torch.save(bad, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="do not fit"):
        build_clip(dataclasses.replace(cfg, clip_pretrained=str(tmp_path / "partial.pt")))


def test_missing_weights_fail_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache, whatever this machine holds
    monkeypatch.setenv("HOME", str(tmp_path))
    cases = [
        EncoderConfig(clip_model="ViT-B-16", clip_pretrained="openai", scene_arch="resnet50"),
        EncoderConfig(clip_model="ViT-B-16", clip_pretrained="laion2b_s34b_b88k", scene_arch="resnet50"),
        EncoderConfig(clip_model="ViT-B-16", scene_weights="resnet50_places365.pth.tar"),
        dataclasses.replace(TINY, clip_pretrained=str(tmp_path / "nope.pt")),
    ]
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    for cfg in cases:
        t0 = time.perf_counter()
        with pytest.raises(WeightsNotFound) as err:
            build_encoders(cfg, weights_dir=tmp_path)
        assert time.perf_counter() - t0 < 1.0
        assert "not" in str(err.value)
    with pytest.raises(WeightsNotFound, match="no pretrained tag"):
        build_encoders(EncoderConfig(clip_pretrained="no-such-tag"))


def test_seeded_random_init_and_weights_id():
    a, b = build_encoders(TINY), build_encoders(TINY)
    assert a.weights_id() == b.weights_id()
    c = build_encoders(dataclasses.replace(TINY, init_seed=1))
    assert c.weights_id() != a.weights_id()
    d = build_encoders(dataclasses.replace(TINY, image_size=96))
    assert d.weights_id() != a.weights_id()  # resolution changes the features too
    with torch.no_grad():
        b.scene.net.layer4[0].conv1.weight[0, 0, 0, 0] += 1e-3
    assert b.weights_id() != a.weights_id()


def test_unfreeze_top_and_frozen_batchnorm():
    enc = build_encoders(TINY)
    enc.freeze()
    assert not any(p.requires_grad for p in enc.parameters())
    clip_p, scene_p = enc.unfreeze_top(0.3)  # int(4 * 0.3) = 1 block, + ln_post
    blocks = enc.clip.blocks()
    assert all(p.requires_grad for p in blocks[-1].parameters())
    assert not any(p.requires_grad for b in blocks[:-1] for p in b.parameters())
    assert all(p.requires_grad for p in enc.clip.visual.ln_post.parameters())
    assert all(p.requires_grad for p in enc.scene.net.layer4.parameters())
    assert not any(p.requires_grad for p in enc.scene.net.layer3.parameters())
    assert len(clip_p) == len(list(blocks[-1].parameters())) + 2
    enc.train()
    assert enc.clip.training and enc.scene.training
    bns = [m for m in enc.scene.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = bns[0].running_mean.clone()
    enc(torch.rand(2, 3, 64, 64))
    assert torch.equal(before, bns[0].running_mean)
