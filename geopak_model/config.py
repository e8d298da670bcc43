"""Configuration of the GEOPAK model and its training: plain dataclasses that round-trip through JSON.

A checkpoint stores ``TrainConfig.to_dict()`` so it can be rebuilt without this file's defaults; ``from_dict``
rejects unknown keys (a typo in a config file is an error, not a silently ignored setting).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.fields import doc_field as _f  # the one way settings carry their doc and bounds
from pipeline.core.provinces import PROVINCES

# GEOPAK's per-province smoothing temperatures for the geocell target exp(-d/tau), in km.
DEFAULT_TAU_KM: dict[str, float] = {
    "sindh": 30.0, "punjab": 60.0, "kpk": 50.0, "ict": 10.0, "gb": 100.0, "balochistan": 100.0, "ajk": 40.0,
}
# GEOPAK's batch shares: Sindh 16 and every other province 8 of 64.
DEFAULT_SAMPLER_SHARES: dict[str, float] = {p.key: (2.0 if p.key == "sindh" else 1.0) for p in PROVINCES}


@dataclass
class EncoderConfig:
    """Which encoders, at which resolution, with which weights (``""`` = random init, seeded by ``init_seed``)."""

    clip_model: str = _f("ViT-B-16", 'an open_clip model name, or "custom" (then clip_custom gives the ViT shape)')
    clip_pretrained: str = _f("", '"" (random init) | an open_clip pretrained tag ("openai", '
                              '"laion2b_s34b_b88k") | a local weights file')
    clip_custom: dict[str, int] = _f(doc="custom ViT only: width, layers, heads, patch_size", factory=dict)
    clip_activation: str = _f("auto", 'MLP activation of the CLIP ViT: "gelu" | "quick_gelu" (OpenAI\'s weights) | '
                              '"auto": from the open_clip tag or model name; a local file needs "openai" in its '
                              'name or an explicit setting (encoders.resolve_clip_activation)',
                              choices=("auto", "gelu", "quick_gelu"))
    # _build rejects unknown keys, so the old key has to stay a field
    clip_quick_gelu: bool | None = _f(None, "deprecated, read only from old configs: true/false become "
                                      'clip_activation "quick_gelu"/"gelu"; always empty after construction')
    scene_arch: str = _f("resnet50", "torchvision ResNet with a 365-class Places head",
                         choices=("resnet50", "resnet18", "resnet34"))
    scene_weights: str = _f("", '"" (random init) | the official Places365 checkpoint '
                            "(resnet50_places365.pth.tar) | a state dict file")
    image_size: int = _f(224, "square input size of both encoders (px)", ge=16)
    init_seed: int = _f(0, "seed of the random initialisation of encoders without weights", ge=0)
    unfreeze_fraction: float = _f(0.3, "phase 2: top share of CLIP blocks trained (+ ln_post; ResNet layer4 "
                                  "always); ≥ 1: all", ge=0.0)
    scene_batch_stats: bool = _f(False, "phase 2 learns BatchNorm statistics (random-init ResNets have none to keep)")

    def __post_init__(self) -> None:
        if self.clip_activation not in ("auto", "gelu", "quick_gelu"):
            raise ValueError(f"encoder.clip_activation must be 'auto', 'gelu' or 'quick_gelu', "
                             f"got {self.clip_activation!r}")
        if self.clip_quick_gelu is None:
            return
        mapped = "quick_gelu" if self.clip_quick_gelu else "gelu"
        if self.clip_activation not in ("auto", mapped):
            raise ValueError(f"encoder: clip_quick_gelu={self.clip_quick_gelu} (deprecated) contradicts "
                             f"clip_activation={self.clip_activation!r}; keep only clip_activation")
        self.clip_activation, self.clip_quick_gelu = mapped, None


@dataclass
class ModelConfig:
    """Widths of the heads and embeddings (GEOPAK's province -> geocell -> offset hierarchy)."""

    proj_dim: int = _f(512, "width of the fused image embedding", ge=1)
    province_hidden: int = _f(256, "hidden width of the province head", ge=1)
    temperature: float = _f(1.2, "province logits are divided by it (GEOPAK's ProvinceHead)", gt=0.0)
    cell_head_small: int = _f(256, "hidden width of a province's geocell head with < cell_head_threshold cells",
                              ge=1)
    cell_head_large: int = _f(512, "hidden width of a province's geocell head with ≥ cell_head_threshold cells",
                              ge=1)
    cell_head_threshold: int = _f(30, "cell count from which a province gets the large geocell head", ge=1)
    cell_emb_dim: int = _f(96, "width of the geocell embedding fed to the offset head", ge=1)
    province_emb_dim: int = _f(32, "width of the province embedding fed to the offset head", ge=1)
    offset_hidden: int = _f(256, "hidden width of the offset head", ge=1)
    dropout: float = _f(0.1, "dropout in the heads", ge=0.0, lt=1.0)
    offset_radius_scale: float = _f(1.0, "the offset may move at most radius × scale from the cell centre", gt=0.0)
    min_offset_radius_km: float = _f(1.0, "cells of one point still get this much room for the offset (km)",
                                     ge=0.0)
    koppen_head: bool = _f(True, "auxiliary Köppen-Geiger climate head")
    doy_head: bool = _f(True, "auxiliary day-of-year head")
    mvmf_head: bool = _f(False, "mixture of von Mises-Fisher over the cell centres (Phileo's coordinate head)")
    log_kappa_min: float = _f(0.0, "lower clamp of the mvMF log concentrations")
    log_kappa_max: float = _f(16.0, "upper clamp of the mvMF log concentrations")


@dataclass
class LossConfig:
    """Weights of the loss terms and how the geocell target is smoothed."""

    province: float = _f(0.5, "weight of the province cross-entropy", ge=0.0)
    cell: float = _f(1.0, "weight of the (smoothed) geocell cross-entropy", ge=0.0)
    offset: float = _f(1.0, "weight of offset error / true cell radius", ge=0.0)
    aux: float = _f(0.1, "weight of aux error / aux_scale_km", ge=0.0)
    koppen: float = _f(0.2, "weight of the Köppen-Geiger loss", ge=0.0)
    doy: float = _f(0.1, "weight of the day-of-year loss", ge=0.0)
    mvmf: float = _f(0.05, "weight of the mvMF negative log-likelihood", ge=0.0)
    class_weight_beta: float = _f(0.0, "must be 0 to train: the province-balanced sampler is the one rebalancing "
                                  "mechanism (trainer.Trainer._setup_loss says why); > 0 (GEOPAK's 0.9995: "
                                  "effective-number class weights on top) is refused, kept so older configs load",
                                  ge=0.0, lt=1.0)
    tau_km: dict[str, float] = _f(doc="upper bound of the smoothing τ per province (km), replaced whole",
                                  factory=lambda: dict(DEFAULT_TAU_KM))
    smooth_radius_factor: float = _f(0.5, "smoothing τ = factor × true cell radius (PIGEON-style, tied to cell "
                                     "size)", ge=0.0)
    smooth_min_km: float = _f(1.0, "smallest smoothing τ (km)", gt=0.0)
    offset_min_radius_km: float = _f(1.0, "the offset error is divided by max(radius, this) (km)", gt=0.0)
    aux_scale_km: float = _f(100.0, "the aux error is divided by this (km)", gt=0.0)
    n_neighbours: int = _f(8, "neighbouring cells considered by the smoothed target", ge=0)
    offset_ramp_epochs: int = _f(5, "phase 1: offset weight min(1, (epoch + 1) / ramp)", ge=1)
    koppen_fine_weight: float = _f(0.5, "share of the Köppen loss on the fine classes", ge=0.0)
    koppen_coarse_weight: float = _f(0.5, "share of the Köppen loss on the coarse (main) classes", ge=0.0)


@dataclass
class PhaseConfig:
    """One training phase: 0 warms the heads, 1 trains the heads, 2 fine-tunes the encoders."""

    epochs: int = _f(1, "epochs of this phase", ge=0)
    lr: float = _f(1e-3, "learning rate of the heads, embeddings and fusion", ge=0.0)
    lr_clip: float = _f(0.0, "learning rate of the CLIP encoder (phase 2 only)", ge=0.0)
    lr_scene: float = _f(0.0, "learning rate of the scene encoder (phase 2 only)", ge=0.0)
    weight_decay: float = _f(1e-5, "AdamW weight decay", ge=0.0)
    batch_size: int = _f(64, "images per batch", ge=1)
    batches_per_epoch: int = _f(0, "0: ceil(train images / batch size)", ge=0)
    schedule: str = _f("none", "learning-rate schedule, per step after warmup_steps", choices=("none", "cosine"))
    warmup_steps: int = _f(0, "linear warm-up steps", ge=0)
    val_every: int = _f(1, "validate every this many epochs (and after the last)", ge=1)


@dataclass
class AugmentConfig:
    """Geography-safe augmentation: nothing that mirrors the scene or tilts the horizon much."""

    crop_scale: tuple[float, float] = _f((0.7, 1.0), "random resized crop: [min, max] share of the image area")
    crop_ratio: tuple[float, float] = _f((0.9, 1.1), "random resized crop: [min, max] aspect ratio")
    brightness: float = _f(0.2, "colour jitter: brightness", ge=0.0)
    contrast: float = _f(0.2, "colour jitter: contrast", ge=0.0)
    saturation: float = _f(0.2, "colour jitter: saturation", ge=0.0)
    hue: float = _f(0.02, "colour jitter: hue", ge=0.0, le=0.5)
    weather_p: float = _f(0.3, "probability of one of fog / rain / overcast", ge=0.0, le=1.0)
    blur_p: float = _f(0.2, "probability of a Gaussian blur", ge=0.0, le=1.0)
    blur_sigma: tuple[float, float] = _f((0.1, 1.0), "[min, max] sigma of the blur (px)")
    noise_std: float = _f(0.02, "standard deviation of added Gaussian noise", ge=0.0)


@dataclass
class InferenceConfig:
    """How the predicted distribution becomes one point. These defaults are what training validates each epoch
    with; ``model.pt`` holds the values chosen on val when it was exported (``selection.py``), which the
    predictor and the evaluation use."""

    # hypotheses: the top provinces × top cells of each (the geometric median wants the whole distribution; the
    # cap bounds the work where provinces have thousands of cells)
    top_provinces: int = _f(7, "hypotheses: the top provinces …", ge=1)
    top_cells: int = _f(64, "… × the top cells of each", ge=1)
    prior_correction: bool = _f(True, "undo the balanced sampler's and class weights' prior at inference: "
                                "logit += log(true prior / trained prior)")
    point: str = _f("geomedian", "how the hypotheses become one point (inference.py)",
                    choices=("geomedian", "mode", "mean"))
    mode_radius_km: float = _f(25.0, 'cluster radius of the "mode" point and of retrieval refinement (km)', gt=0.0)
    refine: bool = _f(True, "refine the estimate by retrieval when the checkpoint has a gallery (chosen on val)")
    refine_radius_km: float = _f(100.0, "retrieval refinement: gallery images this close to the estimate … (km)",
                                 gt=0.0)
    refine_neighbours: int = _f(16, "… the nearest n of them in the fused embedding space …", ge=1)
    refine_temperature: float = _f(0.1, "… weighted softmax(cosine / T) · P(cell)", gt=0.0)


@dataclass
class TrainConfig:
    """Everything one training run needs; a checkpoint stores it."""

    data_root: str = _f("data", "root folder of the pipeline's files")
    run_dir: str = _f("", 'the run\'s folder; "" -> <data_root>/model/<run_name>')
    cache_dir: str = _f("", 'embedding cache folder; "" -> <data_root>/embeddings')
    run_name: str = _f("geopak", "name of the run (its folder under model/)")
    preset: str = _f("gpu-full", "the preset this config was built from (set by preset())")
    encoder: EncoderConfig = _f(doc="the image encoders", factory=EncoderConfig)
    model: ModelConfig = _f(doc="the heads", factory=ModelConfig)
    loss: LossConfig = _f(doc="the loss terms", factory=LossConfig)
    phases: list[PhaseConfig] = _f(doc="phases 0 (warm-up), 1 (heads), 2 (fine-tuning); overrides are merged "
                                   "index by index", factory=list)
    augment: AugmentConfig = _f(doc="training augmentation", factory=AugmentConfig)
    inference: InferenceConfig = _f(doc="prediction from the distribution", factory=InferenceConfig)
    sampler_shares: dict[str, float] = _f(doc="province -> relative share of each batch (balanced sampler), "
                                          "replaced whole", factory=lambda: dict(DEFAULT_SAMPLER_SHARES))
    run_phases: list[int] = _f(doc="which phases this run trains", factory=lambda: [0, 1, 2])
    device: str = _f("auto", "where to train", choices=("auto", "cpu", "cuda"))
    # 0: torch's default, except that the heads-only phases (0-1) on CPU run on one thread: their small matmuls
    # are faster there than split over busy cores.
    cpu_threads: int = _f(0, "> 0: torch.set_num_threads for the whole run; 0: torch's default (heads-only "
                          "phases on CPU: one thread)", ge=0)
    amp: bool = _f(True, "autocast on CUDA (never on CPU)")
    amp_dtype: str = _f("auto", "auto (bf16 where supported, else fp16) | bf16 | fp16 (trains with a GradScaler)",
                        choices=("auto", "bf16", "fp16"))
    grad_clip: float = _f(1.0, "gradient-norm clip (0: off)", ge=0.0)
    seed: int = _f(0, "seed of sampling, augmentation and initialisation", ge=0)
    num_workers: int = _f(2, "image DataLoader workers (spawned), phase 2 and the embedding cache", ge=0)
    embed_batch_size: int = _f(64, "images per batch when filling the embedding cache", ge=1)
    max_val_images: int = _f(0, "0 = all; caps per-epoch validation cost in phase 2 (images through the encoders)",
                             ge=0)
    train_split: str = _f("train", "split trained on")
    val_split: str = _f("val", "split validated on")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return _build(cls, d)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def phase(self, k: int) -> PhaseConfig:
        if not 0 <= k < len(self.phases):
            raise ValueError(f"config has {len(self.phases)} phases; phase {k} is not configured")
        return self.phases[k]


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _build(cls: type, d: dict[str, Any]) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        default = getattr(cls(), name) if name != "phases" else None
        if name == "phases":
            kwargs[name] = [_build(PhaseConfig, v) for v in value]
        elif dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value)
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


_REPLACED_WHOLE = ("tau_km", "sampler_shares", "clip_custom")  # mappings that are values, not sub-configs


def _deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Nested override; ``phases`` may be a list of per-phase overrides merged index by index."""
    out = dict(base)
    for k, v in over.items():
        if k == "phases" and isinstance(v, list) and isinstance(out.get(k), list) and len(out[k]) == len(v):
            out[k] = [_deep_update(b, o) for b, o in zip(out[k], v)]
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _REPLACED_WHOLE:
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


def _gpu_full() -> dict[str, Any]:
    """The seed's hyperparameters: CLIP ViT-B/16 (OpenAI) + ResNet50-Places365, batch 64, 8/30/30 epochs."""
    return {
        "encoder": {"clip_model": "ViT-B-16", "clip_pretrained": "openai", "scene_arch": "resnet50",
                    "scene_weights": "resnet50_places365.pth.tar", "image_size": 224},
        "phases": [
            {"epochs": 8, "lr": 1e-4, "weight_decay": 1e-5, "batch_size": 64},
            {"epochs": 30, "lr": 1e-3, "weight_decay": 1e-5, "batch_size": 64},
            {"epochs": 30, "lr": 5e-4, "lr_clip": 1e-5, "lr_scene": 5e-6, "weight_decay": 1e-5, "batch_size": 64,
             "schedule": "cosine"},
        ],
        "num_workers": 8,
        "embed_batch_size": 256,
    }


def _cpu_small() -> dict[str, Any]:
    """Offline CPU preset: random-init small ViT (6 blocks, width 192, 16-px patches) + ResNet-18 at 96 px.

    About 0.5 GFLOP per image through both encoders: the 3,000-image sample world is cached in a few minutes on
    2 cores, the CI smoke world (200 images) in seconds. Phase 2 is a short taste (4 batches) of fine-tuning.
    """
    return {
        "encoder": {"clip_model": "custom", "clip_custom": {"width": 192, "layers": 6, "heads": 3, "patch_size": 16},
                    "clip_pretrained": "", "scene_arch": "resnet18", "scene_weights": "", "image_size": 96},
        "model": {"proj_dim": 256, "province_hidden": 128, "cell_head_small": 128, "cell_head_large": 256,
                  "offset_hidden": 128},
        "phases": [
            {"epochs": 4, "lr": 1e-3, "batch_size": 64},
            {"epochs": 20, "lr": 1e-3, "batch_size": 64, "schedule": "cosine"},
            {"epochs": 1, "lr": 1e-4, "lr_clip": 1e-5, "lr_scene": 1e-5, "batch_size": 32, "batches_per_epoch": 4,
             "schedule": "cosine"},
        ],
        "loss": {"offset_ramp_epochs": 3},
        "num_workers": 0,
        "embed_batch_size": 64,
        "max_val_images": 128,
        "amp": False,
    }


def _test_tiny() -> dict[str, Any]:
    """Unit tests: a 2-block ViT and ResNet-18 at 64 px, tiny heads, one short epoch per phase."""
    return {
        "encoder": {"clip_model": "custom", "clip_custom": {"width": 32, "layers": 2, "heads": 2, "patch_size": 16},
                    "scene_arch": "resnet18", "image_size": 64},
        "model": {"proj_dim": 32, "province_hidden": 16, "cell_head_small": 16, "cell_head_large": 32,
                  "cell_head_threshold": 30, "cell_emb_dim": 8, "province_emb_dim": 4, "offset_hidden": 16},
        "phases": [
            {"epochs": 1, "lr": 1e-3, "batch_size": 16, "batches_per_epoch": 2},
            {"epochs": 2, "lr": 1e-3, "batch_size": 16, "batches_per_epoch": 2},
            {"epochs": 1, "lr": 1e-3, "lr_clip": 1e-4, "lr_scene": 1e-4, "batch_size": 8, "batches_per_epoch": 1,
             "schedule": "cosine"},
        ],
        "num_workers": 0,
        "embed_batch_size": 16,
        "amp": False,
    }


PRESETS = {"gpu-full": _gpu_full, "cpu-small": _cpu_small, "test-tiny": _test_tiny}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A named preset with (nested) overrides, e.g. ``preset("cpu-small", data_root=..., loss={"cell": 2.0})``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    d = _deep_update(TrainConfig().to_dict(), PRESETS[name]())
    d["preset"] = name
    return TrainConfig.from_dict(_deep_update(d, overrides))
