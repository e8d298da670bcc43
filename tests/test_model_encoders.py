"""Encoders load weight files in the real formats (saved here by the tests) through the production code path;
missing weights fail fast offline; normalisation happens inside forward; phase-2 unfreezing is partial."""

from __future__ import annotations

import dataclasses
import socket
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
    loaded = build_clip(dataclasses.replace(TINY, clip_pretrained=str(tmp_path / "clip.pt"), clip_activation="gelu"))
    for (k, a), b in zip(src.visual.state_dict().items(), loaded.visual.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    loaded.eval()
    assert torch.allclose(loaded(x), loaded.visual((x - mean) / std))  # CLIP normalisation inside forward
    assert loaded(x).shape == (2, 32)


def test_open_clip_named_model_from_local_file(tmp_path):
    cfg = EncoderConfig(clip_model="ViT-S-32", scene_arch="resnet18", image_size=64, clip_activation="gelu")
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
    """Missing weights fail at once offline: no connection is attempted and nothing sleeps (a retry loop would),
    counted by patched sockets and sleep rather than by a wall-clock limit that a busy machine can break."""
    attempts: list[str] = []

    def no_connection(*args, **kwargs):
        attempts.append(f"connect {args[1:2]}")
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: no_connection(None, a[0]))
    monkeypatch.setattr(socket.socket, "connect", no_connection)
    monkeypatch.setattr(time, "sleep", lambda s: attempts.append(f"sleep {s}"))
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
        with pytest.raises(WeightsNotFound) as err:
            build_encoders(cfg, weights_dir=tmp_path)
        assert attempts == [], (cfg, attempts)
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


def test_unfreeze_everything_and_learned_batch_statistics():
    """Random-initialised encoders (the offline presets) have nothing pretrained to protect: fraction 1 tunes them
    whole, and ``scene_batch_stats`` lets BatchNorm learn statistics instead of keeping its meaningless ones."""
    enc = build_encoders(dataclasses.replace(TINY, scene_batch_stats=True))
    clip_p, scene_p = enc.unfreeze_top(1.0)
    assert all(p.requires_grad for p in enc.parameters())
    assert len(clip_p) + len(scene_p) == len(list(enc.parameters()))
    enc.train()
    bns = [m for m in enc.scene.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.training for m in bns)
    before = bns[0].running_mean.clone()
    enc(torch.rand(2, 3, 64, 64))
    assert not torch.equal(before, bns[0].running_mean)


def _clip_file(tmp_path, name: str) -> str:
    """A tiny custom-ViT CLIP checkpoint (full-model key layout) written under ``name``."""
    torch.manual_seed(5)
    src = build_clip(TINY)
    torch.save({f"visual.{k}": v for k, v in src.visual.state_dict().items()}, tmp_path / name)
    return str(tmp_path / name)


def test_clip_activation_changes_features_and_weights_id(tmp_path):
    """Defect 3: the same CLIP weights under GELU and QuickGELU are different encoders; the cache key must say so."""
    from open_clip.transformer import QuickGELU

    path = _clip_file(tmp_path, "clip.pt")
    gelu = build_encoders(dataclasses.replace(TINY, clip_pretrained=path, clip_activation="gelu"))
    quick = build_encoders(dataclasses.replace(TINY, clip_pretrained=path, clip_activation="quick_gelu"))
    assert torch.equal(gelu.clip.visual.conv1.weight, quick.clip.visual.conv1.weight)  # same weights
    assert isinstance(quick.clip.blocks()[0].mlp.gelu, QuickGELU)
    assert not isinstance(gelu.clip.blocks()[0].mlp.gelu, QuickGELU)
    assert (gelu.clip.activation, quick.clip.activation) == ("gelu", "quick_gelu")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(gelu.clip(x), quick.clip(x), atol=1e-4)
    assert gelu.weights_id() != quick.weights_id()


def test_open_clip_model_honours_activation(tmp_path):
    """Named open_clip towers take the activation from the config too (not only from a pretrained tag)."""
    from open_clip.transformer import QuickGELU

    cfg = EncoderConfig(clip_model="ViT-S-32", scene_arch="resnet18", image_size=64)
    quick = build_clip(dataclasses.replace(cfg, clip_activation="quick_gelu"))
    assert isinstance(quick.blocks()[0].mlp.gelu, QuickGELU) and quick.activation == "quick_gelu"
    assert not isinstance(build_clip(cfg).blocks()[0].mlp.gelu, QuickGELU)  # random init, auto → gelu


def test_auto_activation_resolution(tmp_path):
    """Tags decide (openai → QuickGELU); a local file needs 'openai' in its name or an explicit setting."""
    from geopak_model.encoders import resolve_clip_activation

    b16 = EncoderConfig(clip_model="ViT-B-16")
    assert resolve_clip_activation(dataclasses.replace(b16, clip_pretrained="openai")) == "quick_gelu"
    assert resolve_clip_activation(dataclasses.replace(b16, clip_pretrained="laion2b_s34b_b88k")) == "gelu"
    assert resolve_clip_activation(b16) == "gelu"
    assert resolve_clip_activation(EncoderConfig(clip_model="ViT-B-16-quickgelu")) == "quick_gelu"
    hinted = _clip_file(tmp_path, "vit-tiny-openai.pt")
    assert build_clip(dataclasses.replace(TINY, clip_pretrained=hinted)).activation == "quick_gelu"
    plain = _clip_file(tmp_path, "clip.pt")
    with pytest.raises(ValueError, match="Set encoder.clip_activation explicitly"):
        build_encoders(dataclasses.replace(TINY, clip_pretrained=plain))
    with pytest.raises(ValueError, match="clip_activation must be"):
        EncoderConfig(clip_activation="relu")


def test_old_configs_with_clip_quick_gelu_still_load():
    """Checkpoints written before clip_activation existed store clip_quick_gelu; it maps onto the new field."""
    from geopak_model.config import TrainConfig, preset

    d = preset("test-tiny").to_dict()
    del d["encoder"]["clip_activation"]
    d["encoder"]["clip_quick_gelu"] = True
    enc = TrainConfig.from_dict(d).encoder
    assert enc.clip_activation == "quick_gelu" and enc.clip_quick_gelu is None
    d["encoder"]["clip_quick_gelu"] = None
    assert TrainConfig.from_dict(d).encoder.clip_activation == "auto"
    with pytest.raises(ValueError, match="contradicts"):
        EncoderConfig(clip_quick_gelu=False, clip_activation="quick_gelu")


def test_weights_id_covers_precision_and_preprocessing(monkeypatch):
    """Features computed in bf16/fp16 or with another preprocessing are not the fp32 features: other cache keys."""
    import geopak_model.encoders as encoders

    enc = build_encoders(TINY)
    ids = enc.weights_ids()
    assert len(set(ids.values())) == 3 and ids["fp32"] == enc.weights_id()
    assert enc.precision_of(ids["bf16"]) == "bf16" and enc.precision_of("0" * 24) is None
    with pytest.raises(ValueError, match="feature precision"):
        enc.weights_id("fp8")
    monkeypatch.setattr(encoders, "PREPROCESS_VERSION", "something else")
    assert enc.weights_id() != ids["fp32"]
