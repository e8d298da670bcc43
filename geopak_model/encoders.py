"""The two frozen-then-partly-tuned image encoders: CLIP ViT (open_clip) and a Places365 ResNet (torchvision).

- CLIP: an open_clip model name with an open_clip pretrained tag or a local weights file, or a small custom ViT.
  Only the vision tower is built. Features are the pooled CLS token after ``ln_post`` without the projection
  (width-d: 768 for ViT-B/16), so the LayerNorm unfrozen in phase 2 is actually used.
- Scene: torchvision ResNet with a 365-class head, loaded from the official Places365 checkpoint format
  (``{"state_dict": {"module.conv1.weight": ...}}``); the head is dropped, giving 2048-d (ResNet-50) features.
- Inputs are RGB in [0, 1]; each encoder normalises inside ``forward`` (CLIP and ImageNet mean/std).
- Missing weights fail fast with a clear message: nothing is downloaded when ``HF_HUB_OFFLINE`` is set.
- CLIP's MLP activation is explicit (``EncoderConfig.clip_activation``): OpenAI weights were trained with
  QuickGELU, almost all others with GELU, and a local file does not say which; "auto" reads it from an open_clip
  tag or an "openai" in the file name, and otherwise refuses rather than guess.
- ``DualEncoder.weights_id`` (the embedding-cache key and the checkpoint fingerprint) covers every setting that
  changes features: the weights, the architecture, the resolved activation, the preprocessing version and the
  precision the features were computed in.
- BatchNorm statistics of the ResNet stay frozen even in phase 2 (GEOPAK's ``model.train()`` updated them).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from geopak_model.config import EncoderConfig
from pipeline.core.env import hf_offline

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCENE_ARCHS = ("resnet18", "resnet34", "resnet50")
CLIP_ACTIVATIONS = ("auto", "gelu", "quick_gelu")
FEATURE_PRECISIONS = ("fp32", "bf16", "fp16")  # precision.dtype_name of the autocast dtype the features came from
# Bump when the image → tensor path of the embedding cache / predictor changes (``data.load_image`` +
# ``data.eval_view``): v2 = JPEGs >= 2x the input size are DCT-scaled while decoding, then short-side
# antialiased bilinear resize + centre crop; v3 = training, its cache and the evaluation read the image shards'
# pre-resized copies (``pipeline.core.shards``; which copies is in the cache's meta.json ``image_source``).
PREPROCESS_VERSION = "image shards (pre-resized copies) or files, jpeg-draft>=2x, short-side resize + centre crop, v3"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".tar", ".safetensors", ".ckpt")


class WeightsNotFound(FileNotFoundError):
    """Configured encoder weights are not on this machine (and may not be downloaded)."""


def _looks_like_file(spec: str) -> bool:
    return spec.endswith(WEIGHT_SUFFIXES) or "/" in spec or os.sep in spec


def resolve_file(spec: str, weights_dir: Path | None, what: str) -> Path:
    """A weights file given absolute, relative to the cwd, or relative to the data root's ``weights/`` folder."""
    candidates = [Path(spec).expanduser()]
    if weights_dir is not None and not Path(spec).is_absolute():
        candidates.append(Path(weights_dir) / spec)
    for c in candidates:
        if c.is_file():
            return c
    raise WeightsNotFound(
        f"{what} weights file {spec!r} not found (looked at {', '.join(str(c) for c in candidates)}). "
        "Put the file there, or set the weights to '' for a random-initialised encoder (CPU/offline preset)."
    )


def resolve_clip_weights(model_name: str, spec: str, weights_dir: Path | None) -> Path:
    """Local file for an open_clip pretrained tag or path; downloads only when online and not cached."""
    if _looks_like_file(spec) or Path(spec).expanduser().is_file():
        return resolve_file(spec, weights_dir, "CLIP")
    import open_clip
    from open_clip import pretrained as oc_pre

    cfg = oc_pre.get_pretrained_cfg(model_name, spec)
    if not cfg:
        raise WeightsNotFound(
            f"open_clip has no pretrained tag {spec!r} for {model_name!r}; "
            f"known: {open_clip.list_pretrained_tags_by_model(model_name)}"
        )
    cached = _cached_open_clip_file(cfg)
    if cached is not None:
        return cached
    if hf_offline():
        raise WeightsNotFound(
            f"CLIP weights {model_name}/{spec} are not in the local cache and HF_HUB_OFFLINE is set, so they will "
            f"not be downloaded. Download them once online (open_clip.create_model({model_name!r}, pretrained="
            f"{spec!r})) or give a local file path as clip_pretrained."
        )
    return Path(oc_pre.download_pretrained(cfg))


def _cached_open_clip_file(cfg: dict) -> Path | None:
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            hit = try_to_load_from_cache(repo_id=repo, filename=name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
    url = cfg.get("url", "")
    if url:
        target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if target.is_file():
            return target
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a plain/wrapped checkpoint, safetensors, or an OpenAI TorchScript archive."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError as exc:
            if "TorchScript" not in str(exc) and "constants.pkl" not in str(exc):
                raise
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a state dict (got {type(sd).__name__})")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_weights(module: nn.Module, sd: dict[str, torch.Tensor], what: str, arch: str,
                 optional: tuple[str, ...] = ()) -> None:
    """Load every weight of ``module`` (only keys starting with ``optional`` may be absent), or a clear error."""
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{what} do not fit {arch}: {str(exc)[:500]}") from exc
    missing = [k for k in missing if not k.startswith(optional)] if optional else missing
    if missing or unexpected:
        raise ValueError(f"{what} do not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")


class NormalisedEncoder(nn.Module):
    """``net`` on inputs in [0, 1] normalised with the mean/std it was trained with."""

    def __init__(self, net: nn.Module, out_dim: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.out_dim = out_dim
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class ClipEncoder(NormalisedEncoder):
    def __init__(self, visual: nn.Module, width: int, activation: str = "gelu"):
        super().__init__(visual, width, CLIP_MEAN, CLIP_STD)
        self.activation = activation  # resolved: "gelu" | "quick_gelu"

    @property
    def visual(self) -> nn.Module:
        return self.net

    def blocks(self) -> list[nn.Module]:
        return list(self.visual.transformer.resblocks)


def resolve_clip_activation(cfg: EncoderConfig) -> str:
    """``cfg.clip_activation`` as "gelu" or "quick_gelu"; "auto" is resolved without guessing.

    "auto": a model name that says QuickGELU (``*-quickgelu``) or an open_clip tag whose pretrained config sets
    ``quick_gelu`` (``openai``) → "quick_gelu"; other tags and random init → "gelu"; a local file → "quick_gelu"
    when its file name contains "openai", else a ``ValueError``: a file does not record its activation, and the
    wrong one changes every feature without any error.
    """
    act = cfg.clip_activation
    if act not in CLIP_ACTIVATIONS:
        raise ValueError(f"clip_activation must be one of {CLIP_ACTIVATIONS}, got {act!r}")
    if act != "auto":
        return act
    spec = cfg.clip_pretrained
    if cfg.clip_model != "custom":
        import open_clip

        mc = open_clip.get_model_config(cfg.clip_model) or {}
        if mc.get("quick_gelu", False):
            return "quick_gelu"
    if not spec:
        return "gelu"  # random init: open_clip's default
    if cfg.clip_model == "custom" or _looks_like_file(spec) or Path(spec).expanduser().is_file():
        if "openai" in Path(spec).name.lower():
            return "quick_gelu"
        raise ValueError(
            f"clip_activation is 'auto' but CLIP weights {spec!r} are a local file, which does not record the MLP "
            "activation its model was trained with. Set encoder.clip_activation explicitly: 'quick_gelu' for "
            "OpenAI's CLIP weights, 'gelu' for LAION/DataComp/most other open_clip weights (or put 'openai' in the "
            "file name of OpenAI weights)."
        )
    from open_clip import pretrained as oc_pre

    return "quick_gelu" if oc_pre.get_pretrained_cfg(cfg.clip_model, spec).get("quick_gelu", False) else "gelu"


def clip_weights_path(cfg: EncoderConfig, weights_dir: Path | None) -> Path | None:
    if not cfg.clip_pretrained:
        return None
    if cfg.clip_model == "custom":
        return resolve_file(cfg.clip_pretrained, weights_dir, "CLIP")
    return resolve_clip_weights(cfg.clip_model, cfg.clip_pretrained, weights_dir)


def build_clip(cfg: EncoderConfig, weights_dir: Path | None = None) -> ClipEncoder:
    from open_clip.transformer import VisionTransformer

    path = clip_weights_path(cfg, weights_dir)  # before building: a missing file fails in milliseconds
    activation = resolve_clip_activation(cfg)
    quick = activation == "quick_gelu"
    if cfg.clip_model == "custom":
        from open_clip.transformer import QuickGELU

        c = cfg.clip_custom
        for key in ("width", "layers", "heads", "patch_size"):
            if key not in c:
                raise ValueError(f"custom CLIP ViT needs clip_custom[{key!r}]")
        visual = VisionTransformer(image_size=cfg.image_size, patch_size=c["patch_size"], width=c["width"],
                                   layers=c["layers"], heads=c["heads"], mlp_ratio=c.get("mlp_ratio", 4.0),
                                   output_dim=c["width"], act_layer=QuickGELU if quick else nn.GELU)
        width = c["width"]
    else:
        import open_clip
        from open_clip.model import _build_vision_tower

        mc = open_clip.get_model_config(cfg.clip_model)
        if mc is None:
            raise ValueError(f"unknown open_clip model {cfg.clip_model!r}")
        vision = dict(mc["vision_cfg"])
        if isinstance(vision.get("layers"), list | tuple) or vision.get("timm_model_name"):
            raise ValueError(f"{cfg.clip_model}: only open_clip ViT vision towers are supported")
        vision["image_size"] = cfg.image_size
        visual = _build_vision_tower(mc["embed_dim"], vision, quick_gelu=quick)
        width = vision["width"]
    visual.proj = None  # width-d pooled features, not the contrastive projection
    if path is not None:
        sd = read_state_dict(path)
        if any(k.startswith("visual.") for k in sd):  # a full CLIP checkpoint: keep the vision tower
            sd = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
        sd.pop("proj", None)
        load_weights(visual, sd, f"CLIP weights {path}", cfg.clip_model)
    return ClipEncoder(visual, width, activation)


class SceneEncoder(NormalisedEncoder):
    """``frozen_bn``: BatchNorm keeps its (pretrained) statistics in phase 2, since batches of 32-64 mixed
    provinces would shift them; a random-initialised ResNet has no statistics worth keeping and learns them."""

    def __init__(self, net: nn.Module, out_dim: int, frozen_bn: bool = True):
        super().__init__(net, out_dim, IMAGENET_MEAN, IMAGENET_STD)
        self.frozen_bn = frozen_bn

    def train(self, mode: bool = True) -> "SceneEncoder":
        super().train(mode)
        if self.frozen_bn:
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def build_scene(cfg: EncoderConfig, weights_dir: Path | None = None) -> SceneEncoder:
    import torchvision

    if cfg.scene_arch not in SCENE_ARCHS:
        raise ValueError(f"scene_arch must be one of {SCENE_ARCHS}, got {cfg.scene_arch!r}")
    path = resolve_file(cfg.scene_weights, weights_dir, "Places365 ResNet") if cfg.scene_weights else None
    net = getattr(torchvision.models, cfg.scene_arch)(weights=None, num_classes=365)
    if path is not None:
        load_weights(net, read_state_dict(path), f"Places365 weights {path}", cfg.scene_arch, optional=("fc.",))
    out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return SceneEncoder(net, out_dim, frozen_bn=not cfg.scene_batch_stats)


class DualEncoder(nn.Module):
    """Both encoders on the same [0, 1] RGB batch → (clip features, scene features)."""

    def __init__(self, clip: ClipEncoder, scene: SceneEncoder, cfg: EncoderConfig):
        super().__init__()
        self.clip = clip
        self.scene = scene
        self.cfg = cfg

    @property
    def dims(self) -> tuple[int, int]:
        return self.clip.out_dim, self.scene.out_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clip(x), self.scene(x)

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)

    def unfreeze_top(self, fraction: float) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Phase 2: the last ``fraction`` of CLIP blocks (at least one) + ``ln_post``, and ResNet ``layer4``.

        ``fraction`` ≥ 1 unfreezes both encoders whole: for random-initialised encoders (the offline presets) there
        are no pretrained features to protect, and a random stem would cap what the top layers can learn."""
        self.freeze()
        if fraction >= 1.0:
            clip_params, scene_params = list(self.clip.parameters()), list(self.scene.parameters())
            for p in clip_params + scene_params:
                p.requires_grad_(True)
            return clip_params, scene_params
        blocks = self.clip.blocks()
        n = max(1, int(len(blocks) * fraction))
        clip_mods = [*blocks[-n:], self.clip.visual.ln_post]
        scene_mods = [self.scene.net.layer4]
        clip_params = [p for m in clip_mods for p in m.parameters()]
        scene_params = [p for m in scene_mods for p in m.parameters()]
        for p in clip_params + scene_params:
            p.requires_grad_(True)
        return clip_params, scene_params

    def weights_id(self, precision: str = "fp32") -> str:
        """Hash of every setting that changes features and every weight: the embedding-cache key and the
        checkpoint fingerprint. ``precision`` is the autocast dtype the features are computed in
        (``precision.dtype_name``: "fp32" on CPU, "bf16"/"fp16" under CUDA autocast)."""
        return self.weights_ids((precision,))[precision]

    def weights_ids(self, precisions: tuple[str, ...] = FEATURE_PRECISIONS) -> dict[str, str]:
        """``weights_id`` for each precision, hashing the weights once (to find which precision an id names)."""
        w = hashlib.blake2b(digest_size=16)
        for name, t in self.state_dict().items():
            w.update(name.encode())
            w.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        digest = w.digest()
        out = {}
        for p in precisions:
            h = hashlib.blake2b(digest_size=12)
            h.update(json.dumps(_cfg_identity(self.cfg, self.clip.activation, p), sort_keys=True).encode())
            h.update(digest)
            out[p] = h.hexdigest()
        return out

    def precision_of(self, weights_id: str) -> str | None:
        """The feature precision whose ``weights_id`` is ``weights_id`` (None: other weights or settings)."""
        return next((p for p, i in self.weights_ids().items() if i == weights_id), None)


def _cfg_identity(cfg: EncoderConfig, activation: str, precision: str) -> dict:
    """The settings that change features (not where the weights came from, nor phase-2 settings)."""
    if precision not in FEATURE_PRECISIONS:
        raise ValueError(f"feature precision must be one of {FEATURE_PRECISIONS}, got {precision!r}")
    return {"clip_model": cfg.clip_model, "clip_custom": cfg.clip_custom, "clip_activation": activation,
            "scene_arch": cfg.scene_arch, "image_size": cfg.image_size, "preprocess": PREPROCESS_VERSION,
            "precision": precision}


def build_encoders(cfg: EncoderConfig, weights_dir: Path | None = None) -> DualEncoder:
    """Both encoders on CPU; random-initialised ones are seeded by ``cfg.init_seed`` (reproducible)."""
    if cfg.scene_weights:  # fail fast on both weights before any (slow) construction
        resolve_file(cfg.scene_weights, weights_dir, "Places365 ResNet")
    clip_weights_path(cfg, weights_dir)
    resolve_clip_activation(cfg)  # an unresolvable activation is a config error: before construction too
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        clip = build_clip(cfg, weights_dir)
        scene = build_scene(cfg, weights_dir)
    enc = DualEncoder(clip, scene, cfg)
    enc.eval()
    return enc
