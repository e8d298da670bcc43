"""Configuration of the GEOPAK model and its training: plain dataclasses that round-trip through JSON.

A checkpoint stores ``TrainConfig.to_dict()`` so it can be rebuilt without this file's defaults; ``from_dict``
rejects unknown keys (a typo in a config file is an error, not a silently ignored setting).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    clip_model: str = "ViT-B-16"  # an open_clip model name, or "custom" (then ``clip_custom`` gives the ViT shape)
    clip_pretrained: str = ""  # "" | an open_clip pretrained tag ("openai", "laion2b_s34b_b88k") | a local file
    clip_custom: dict[str, int] = field(default_factory=dict)  # width, layers, heads, patch_size (custom ViT only)
    # MLP activation of the CLIP ViT: "gelu" | "quick_gelu" (OpenAI's weights) | "auto": from the open_clip tag or
    # model name; a local file needs "openai" in its name or an explicit setting (see encoders.resolve_clip_activation)
    clip_activation: str = "auto"
    # Deprecated, read only from old configs: True/False become clip_activation "quick_gelu"/"gelu"; always None
    # after construction (``_build`` rejects unknown keys, so the old key has to stay a field).
    clip_quick_gelu: bool | None = None
    scene_arch: str = "resnet50"  # torchvision resnet50 | resnet18 | resnet34 with a 365-class Places head
    scene_weights: str = ""  # "" | official Places365 checkpoint (``resnet50_places365.pth.tar``) | a state dict
    image_size: int = 224
    init_seed: int = 0
    unfreeze_fraction: float = 0.3  # phase 2: top share of CLIP blocks (+ ln_post); ResNet layer4 always; ≥1: all
    scene_batch_stats: bool = False  # phase 2 learns BatchNorm statistics (random-init ResNets have none to keep)

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
    proj_dim: int = 512
    province_hidden: int = 256
    temperature: float = 1.2  # province logits are divided by it (GEOPAK's ProvinceHead)
    cell_head_small: int = 256  # hidden width of a province's geocell head with < ``cell_head_threshold`` cells
    cell_head_large: int = 512
    cell_head_threshold: int = 30
    cell_emb_dim: int = 96
    province_emb_dim: int = 32
    offset_hidden: int = 256
    dropout: float = 0.1
    offset_radius_scale: float = 1.0  # the offset may move at most radius·scale from the cell centre
    min_offset_radius_km: float = 1.0  # cells of one point still get a little room
    koppen_head: bool = True
    doy_head: bool = True
    mvmf_head: bool = False  # mixture of von Mises-Fisher over the cell centres (Phileo's coordinate head)
    log_kappa_min: float = 0.0
    log_kappa_max: float = 16.0


@dataclass
class LossConfig:
    province: float = 0.5
    cell: float = 1.0
    offset: float = 1.0  # × offset error / true cell radius
    aux: float = 0.1  # × aux error / aux_scale_km
    koppen: float = 0.2
    doy: float = 0.1
    mvmf: float = 0.05
    class_weight_beta: float = 0.9995  # effective-number class weights (GEOPAK's logged weights match 0.9995)
    tau_km: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TAU_KM))  # upper bound of τ per province
    smooth_radius_factor: float = 0.5  # smoothing τ = factor × true cell radius (PIGEON-style, tied to cell size)
    smooth_min_km: float = 1.0
    offset_min_radius_km: float = 1.0  # the offset error is divided by max(radius, this)
    aux_scale_km: float = 100.0  # the aux error is divided by this
    n_neighbours: int = 8
    offset_ramp_epochs: int = 5  # phase 1: offset weight min(1, (epoch + 1) / ramp)
    koppen_fine_weight: float = 0.5
    koppen_coarse_weight: float = 0.5


@dataclass
class PhaseConfig:
    epochs: int = 1
    lr: float = 1e-3  # heads, embeddings, fusion
    lr_clip: float = 0.0  # phase 2 only
    lr_scene: float = 0.0  # phase 2 only
    weight_decay: float = 1e-5
    batch_size: int = 64
    batches_per_epoch: int = 0  # 0: ceil(train images / batch size)
    schedule: str = "none"  # none | cosine (per step, after ``warmup_steps``)
    warmup_steps: int = 0
    val_every: int = 1


@dataclass
class AugmentConfig:
    """Geography-safe augmentation: nothing that mirrors the scene or tilts the horizon much."""

    crop_scale: tuple[float, float] = (0.7, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    weather_p: float = 0.3  # one of fog / rain / overcast
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    noise_std: float = 0.02


@dataclass
class InferenceConfig:
    # hypotheses: the top provinces × top cells of each (the geometric median wants the whole distribution; the
    # cap bounds the work where provinces have thousands of cells)
    top_provinces: int = 7
    top_cells: int = 64
    # Undo the balanced sampler's and class weights' prior at inference: logit += log(true prior / trained prior).
    prior_correction: bool = True
    point: str = "geomedian"  # geomedian | mode | mean: how the hypotheses become one point (inference.py)
    mode_radius_km: float = 25.0  # cluster radius of the "mode" point and of retrieval refinement
    refine: bool = True  # the estimate is refined by retrieval when the checkpoint has a gallery (chosen on val)
    refine_radius_km: float = 100.0  # retrieval refinement: gallery images this close to the estimate ...
    refine_neighbours: int = 16  # ... the nearest n of them in the fused embedding space ...
    refine_temperature: float = 0.1  # ... weighted softmax(cosine / T) · P(cell)


@dataclass
class TrainConfig:
    data_root: str = "data"
    run_dir: str = ""  # "" -> <data_root>/model/<run_name>
    cache_dir: str = ""  # "" -> <data_root>/embeddings
    run_name: str = "geopak"
    preset: str = "gpu-full"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    sampler_shares: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SAMPLER_SHARES))
    run_phases: list[int] = field(default_factory=lambda: [0, 1, 2])
    device: str = "auto"  # auto | cpu | cuda
    # >0: torch.set_num_threads for the whole run. 0: torch's default, except that the heads-only phases (0-1)
    # on CPU run on one thread: their small matmuls are faster there than split over busy cores.
    cpu_threads: int = 0
    amp: bool = True  # autocast on CUDA (never on CPU)
    amp_dtype: str = "auto"  # auto (bf16 where supported, else fp16) | bf16 | fp16 (trains with a GradScaler)
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 2  # image DataLoader workers (spawned), phase 2 and the embedding cache
    embed_batch_size: int = 64
    max_val_images: int = 0  # 0 = all; caps per-epoch validation cost in phase 2 (images through the encoders)
    train_split: str = "train"
    val_split: str = "val"

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
