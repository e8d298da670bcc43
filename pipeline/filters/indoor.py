"""Indoor scenes by zero-shot CLIP (open_clip): indoor vs outdoor prompt ensembles, evaluated only with real weights.

Randomly initialised CLIP weights give meaningless verdicts, so the filter runs only when a pretrained checkpoint
is actually available; otherwise it says why it was not evaluated and passes every image through. Availability is
decided without importing open_clip (about 6 s) whenever the answer is plainly "no":

- ``model='local-dir:/path'``: the folder must hold ``open_clip_config.json`` and a weights file;
- ``pretrained='/path/to/open_clip_pytorch_model.bin'`` (or .safetensors/.pt/.pth): the file must exist;
- ``pretrained='<tag>'`` (e.g. ``laion2b_s34b_b79k``): the tag's weights must already be in the Hugging Face cache
  (an empty cache answers at once) unless ``download`` is on and ``HF_HUB_OFFLINE`` is not set, in which case
  open_clip downloads them (a failure is reported the same way). Downloads are off by default: a run never
  fetches hundreds of megabytes, or waits on network retries, unless asked to;
- ``pretrained=''``: not configured.

Scores: each class embedding is the normalised mean of its prompts' text embeddings (CLIP's prompt ensembling);
``p_indoor`` is the softmax over the two class logits. Images are decoded with ``pipeline.core.decode`` (draft
mode, EXIF orientation, RGB) and preprocessed with the model's own transform.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.decode import DEFAULT_MAX_PIXELS, decode, open_image
from pipeline.core.env import hf_offline
from pipeline.core.fields import doc_field

INDOOR_PROMPTS: tuple[str, ...] = (
    "a photo taken indoors",
    "a photo of a room",
    "a photo of the inside of a building",
    "a photo of an office interior",
    "a photo of a living room",
    "a photo of a shop interior",
    "a photo of a restaurant interior",
    "a photo of the interior of a mosque",
)
OUTDOOR_PROMPTS: tuple[str, ...] = (
    "a photo taken outdoors",
    "a photo of a landscape",
    "a photo of a street",
    "a photo of a building from outside",
    "a photo of mountains",
    "a photo of a field",
    "a photo of a desert",
    "a photo of a river",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ClipSpec:
    """Which image encoder: an open_clip model name (or ``local-dir:``/``hf-hub:`` id) and its weights."""

    model: str = doc_field("ViT-B-32", "open_clip model name (or local-dir:/hf-hub: id) of the indoor classifier")
    pretrained: str = doc_field("laion2b_s34b_b79k", "open_clip pretrained tag, a local checkpoint file, or '' "
                                "(indoor filter off)")
    cache_dir: str | None = doc_field(None, "open_clip / Hugging Face download cache; empty: the Hugging Face "
                                      "default")
    download: bool = doc_field(False, "fetch a tag's weights when not cached (needs internet; hundreds of MB)")

    @property
    def key(self) -> str:
        """Identity of the weights for caching scores (a file is identified by path, size and mtime)."""
        if self.model.startswith("local-dir:"):
            files = _weights_in(Path(self.model[len("local-dir:"):]).expanduser())
        else:
            files = [Path(self.pretrained).expanduser()] if _looks_like_path(self.pretrained) else []
        stamp = ",".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files if f.is_file())
        prompts = hashlib.sha1("|".join(INDOOR_PROMPTS + ("/",) + OUTDOOR_PROMPTS).encode()).hexdigest()[:8]
        return f"{self.model}|{self.pretrained}|{stamp}|{prompts}"


@dataclass(frozen=True)
class Availability:
    ok: bool
    why: str  # what will be loaded, or why nothing can be


def _offline(spec: ClipSpec) -> bool:
    """Only cached weights may be used: downloads not allowed by config, or HF_HUB_OFFLINE set."""
    return hf_offline() or not spec.download


def _offline_why(spec: ClipSpec) -> str:
    return "HF_HUB_OFFLINE=1" if spec.download else "clip_download is off"


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(".") or value.lower().endswith(WEIGHT_SUFFIXES)


def _hf_cache_dir(spec: ClipSpec) -> Path:
    if spec.cache_dir:
        return Path(spec.cache_dir)
    import huggingface_hub.constants as hfc  # light: no network, no torch

    return Path(hfc.HF_HUB_CACHE)


def _weights_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []


def check_weights(spec: ClipSpec) -> Availability:
    """Can real pretrained weights be loaded? Fast (no open_clip import) whenever the answer is plainly no."""
    if spec.model.startswith("local-dir:"):
        folder = Path(spec.model[len("local-dir:"):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            return Availability(False, f"{folder}/open_clip_config.json not found")
        if not _weights_in(folder):
            return Availability(False, f"no weights file ({'/'.join(WEIGHT_SUFFIXES)}) in {folder}")
        return Availability(True, f"{spec.model} ({_weights_in(folder)[0].name})")
    if not spec.pretrained.strip():
        return Availability(False, "clip_pretrained is empty (no checkpoint file or pretrained tag configured)")
    if _looks_like_path(spec.pretrained):
        path = Path(spec.pretrained).expanduser()
        if not path.is_file():
            return Availability(False, f"checkpoint file {path} not found")
        return Availability(True, f"{spec.model} from {path}")
    if spec.model.startswith("hf-hub:"):
        return _check_hub_repo(spec, spec.model[len("hf-hub:"):], None)
    if not _offline(spec):
        return Availability(True, f"{spec.model}/{spec.pretrained} (downloaded by open_clip if not cached)")
    cache = _hf_cache_dir(spec)
    if not (cache.is_dir() and any(cache.glob("models--*"))):  # nothing cached at all: answer without open_clip
        return Availability(False, f"tag {spec.pretrained!r} of {spec.model} is not in the Hugging Face cache "
                                   f"{cache} (empty) and {_offline_why(spec)}")
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.model, spec.pretrained)
    if not cfg:
        return Availability(False, f"{spec.pretrained!r} is not a known pretrained tag of {spec.model}")
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # 'org/repo/' or 'org/repo/file.bin'
        return _check_hub_repo(spec, repo, filename or None)
    url_file = Path(spec.cache_dir or "~/.cache/clip").expanduser() / os.path.basename(cfg.get("url", "") or "none")
    if url_file.is_file():
        return Availability(True, f"{spec.model}/{spec.pretrained} from {url_file}")
    return Availability(False, f"weights of {spec.model}/{spec.pretrained} not cached ({url_file}) and "
                               f"{_offline_why(spec)}")


def _check_hub_repo(spec: ClipSpec, repo: str, filename: str | None) -> Availability:
    if not _offline(spec):
        return Availability(True, f"hf-hub:{repo} (downloaded if not cached)")
    from huggingface_hub import try_to_load_from_cache

    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in names:
        hit = try_to_load_from_cache(repo, name, cache_dir=spec.cache_dir)
        if isinstance(hit, str):
            return Availability(True, f"{spec.model}/{spec.pretrained or repo} from {hit}")
    return Availability(False, f"{repo}/{' or '.join(names)} is not in the Hugging Face cache and "
                               f"{_offline_why(spec)}")


class IndoorClassifier:
    """A loaded open_clip model with its preprocess transform and the two class text embeddings."""

    def __init__(self, spec: ClipSpec, device: str = "cpu"):
        import open_clip
        import torch

        if spec.model.startswith(("local-dir:", "hf-hub:")):
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.model, device=device, require_pretrained=True)
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.model, pretrained=str(Path(spec.pretrained).expanduser()) if _looks_like_path(spec.pretrained)
                else spec.pretrained, device=device, require_pretrained=True, cache_dir=spec.cache_dir)
        model.eval()
        self.model, self.preprocess, self.device, self.spec = model, preprocess, device, spec
        tokenizer = open_clip.get_tokenizer(spec.model)
        with torch.no_grad():
            classes = []
            for prompts in (INDOOR_PROMPTS, OUTDOOR_PROMPTS):
                t = model.encode_text(tokenizer(list(prompts)).to(device))
                t = t / t.norm(dim=-1, keepdim=True)
                m = t.mean(dim=0)
                classes.append(m / m.norm())
            self.text = torch.stack(classes)  # (2, dim): indoor, outdoor
        self.image_size = _input_size(preprocess)

    def p_indoor(self, images: Sequence[Any]) -> np.ndarray:
        """Probability of the indoor class for PIL RGB images."""
        import torch

        if not images:
            return np.zeros(0, dtype=np.float32)
        batch = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        with torch.no_grad():
            f = self.model.encode_image(batch)
            f = f / f.norm(dim=-1, keepdim=True)
            logits = self.model.logit_scale.exp() * f @ self.text.T
            return logits.softmax(dim=-1)[:, 0].float().cpu().numpy()


def _input_size(preprocess) -> int:
    for t in getattr(preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if size is not None:
            return int(size if isinstance(size, int) else max(size))
    return 224


def load_for_clip(path: str | Path, short_side: int, max_pixels: int = DEFAULT_MAX_PIXELS):
    """RGB, oriented, decoded in draft mode to just above ``short_side`` on the shorter side."""
    opened = open_image(path, max_pixels)
    try:
        long_side = math.ceil(short_side * max(opened.width, opened.height) / max(1, min(opened.width, opened.height)))
        img, _ = decode(opened, "RGB", long_side, max_pixels)
        return img
    finally:
        opened.image.close()


def indoor_scores(
    classifier: IndoorClassifier,
    paths: Sequence[str | Path],
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Progress | None = None,
) -> np.ndarray:
    """p_indoor per path (NaN where the image cannot be decoded: it would not reach here after the metrics)."""
    out = np.full(len(paths), np.nan, dtype=np.float32)
    for start in range(0, len(paths), batch_size):
        idx, images = [], []
        for k in range(start, min(len(paths), start + batch_size)):
            try:
                images.append(load_for_clip(paths[k], classifier.image_size, max_pixels))
                idx.append(k)
            except Exception:  # noqa: BLE001 - leave NaN; the stage reports how many were not scored
                continue
        out[idx] = classifier.p_indoor(images)
        if progress is not None:
            progress(min(len(paths), start + batch_size), len(paths))
    return out
