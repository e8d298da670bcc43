"""Training data: the joined table (labels + cells + splits), images with geography-safe augmentation, a
province-balanced batch sampler that draws fresh batches every epoch, and in-memory batches of cached features.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from geopak_model.config import AugmentConfig
from pipeline.core import reasons
from pipeline.core.paths import DataPaths
from pipeline.core.shards import NotInShards, ShardSet
from pipeline.core.store import sha256_hex
from pipeline.core.decode import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, DecodeError, open_image
from pipeline.core.provinces import NUM_PROVINCES, PROVINCES

LABEL_COLUMNS = ["image_id", "path", "lat", "lon", "province_id", "koppen_id", "koppen_group", "doy_sin", "doy_cos"]
TABLE_COLUMNS = [*LABEL_COLUMNS, "cell_id", "split"]


# --- the joined table ---------------------------------------------------------------------------------------
def join_training_table(labelled: pd.DataFrame, assignments: pd.DataFrame, splits: pd.DataFrame
                        ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Labelled rows that have a cell and a split; counts of rows left out and why (never silently)."""
    lab = labelled[LABEL_COLUMNS]
    asg = assignments[["image_id", "cell_id", "province_id"]].rename(columns={"province_id": "cell_province_id"})
    table = lab.merge(asg, on="image_id", how="left").merge(splits[["image_id", "split"]], on="image_id", how="left")
    no_cell = table["cell_id"].isna()
    no_split = table["split"].isna()
    mismatch = ~no_cell & (table["cell_province_id"] != table["province_id"])
    if mismatch.any():
        raise ValueError(f"{int(mismatch.sum())} images are assigned to a cell of another province "
                         "(assignments.parquet disagrees with the labelled catalog)")
    kept = table[~no_cell & ~no_split].drop(columns=["cell_province_id"]).copy()
    kept["cell_id"] = kept["cell_id"].astype(np.int64)
    kept["province_id"] = kept["province_id"].astype(np.int64)
    stats = {"labelled": len(labelled), "without_cell": int(no_cell.sum()),
             "without_split": int((~no_cell & no_split).sum()), "used": len(kept)}
    return kept.reset_index(drop=True), stats


def load_training_table(paths: DataPaths) -> tuple[pd.DataFrame, dict[str, int]]:
    for p in (paths.labelled, paths.cell_assignments, paths.splits, paths.geocells):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: materialise the labels, geocells and splits stages first")
    return join_training_table(pd.read_parquet(paths.labelled), pd.read_parquet(paths.cell_assignments),
                               pd.read_parquet(paths.splits))


def label_tensors(table: pd.DataFrame) -> dict[str, torch.Tensor]:
    """The per-image targets every loss reads, as tensors aligned with ``table``'s rows."""
    def col(name: str, dtype) -> torch.Tensor:
        values = pd.to_numeric(table[name]).to_numpy(dtype, na_value=np.nan if dtype == np.float32 else None)
        return torch.tensor(values)

    return {"province_id": col("province_id", np.int64), "cell_id": col("cell_id", np.int64),
            "lat": col("lat", np.float32), "lon": col("lon", np.float32), "koppen_id": col("koppen_id", np.int64),
            "doy_sin": col("doy_sin", np.float32), "doy_cos": col("doy_cos", np.float32)}


# --- reading bytes, checked against their id (issue 13.4) ------------------------------------------------------
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BytesChangedError(ValueError):
    """The bytes read for an image no longer hash to its ``image_id`` (truncated, replaced or edited in place
    since the catalog stage hashed them): its cached features, labels and metrics would describe other bytes."""

    reason = reasons.BYTES_CHANGED


def read_verified(path: str | Path, image_id: str | None) -> bytes:
    """The file's bytes, checked against ``image_id`` (the sha256 the catalog gave them). Ids that are not sha256
    digests (hand-made tables) cannot be checked and are not. Raises ``BytesChangedError`` on a mismatch,
    ``OSError`` when the file cannot be read.

    A file version already verified in this process (same path, id, size, inode, mtime and ctime, all read from
    the open file) is not hashed again: a persistent loader worker hashes each image once, not once per epoch,
    while a truncated, replaced or rewritten file (a new size, inode or change time) is hashed again.
    """
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        data = fh.read()
    if image_id is None or not _SHA256.fullmatch(str(image_id)):
        return data
    version = hash((str(image_id), len(data), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
    key = str(path)
    if _VERIFIED.get(key) == version:
        return data
    got = sha256_hex(data)
    if got != image_id:
        _VERIFIED.pop(key, None)
        raise BytesChangedError(f"{path}: the {len(data)} bytes read hash to {got[:12]}…, not to the image id "
                                f"{str(image_id)[:12]}… they were catalogued under")
    if len(_VERIFIED) < VERIFIED_MEMO_MAX:
        _VERIFIED[key] = version
    return data


# path -> hash of the file version whose bytes hashed to their id in this process (read_verified); bounded so
# that a 10 M-image run keeps at most ~0.3 GB of it per process (past that, reads are hashed as before)
_VERIFIED: dict[str, int] = {}
VERIFIED_MEMO_MAX = 2_000_000


class Unreadable(NamedTuple):
    """A dataset row that could not be used, and why (a ``pipeline.core.reasons`` code)."""

    row: int
    reason: str


def read_failure_reason(path: str | Path, exc: BaseException) -> str:
    """The rejection code for a read that raised ``exc``: bytes that changed, a file that is gone, or bytes no
    decoder takes (as the embedding cache has always recorded them)."""
    if isinstance(exc, BytesChangedError):
        return reasons.BYTES_CHANGED
    return reasons.NOT_AN_IMAGE if Path(path).exists() else reasons.MISSING_FILE


# --- images ---------------------------------------------------------------------------------------------------
# Set by load_image on a JPEG decoded at reduced scale: the upright full-resolution size and the libjpeg scale
# (1/N). Views are cut in full-resolution coordinates, so a reduced decode yields (nearly) the same view.
FULL_SIZE_KEY = "geopak_full_size"
SCALE_KEY = "geopak_decode_scale"
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees (ImageOps.exif_transpose)


def load_image(path: str | Path | BinaryIO, min_side: int | None = None) -> Image.Image:
    """RGB, upright as the camera saw it (EXIF orientation applied).

    With ``min_side``, a JPEG at least twice that size is DCT-scaled while decoding (libjpeg 1/2, 1/4, 1/8) to
    the smallest scale whose short side stays >= ``min_side``: a 12 MP photo decodes several times faster and
    the views cut from it barely change. Smaller JPEGs and other formats (HEIC from iPhones included, upright as
    its decoder turns it) decode at full size, exactly as without.
    The header goes through the filter stage's ``open_image`` first, with its pixel limit and photo formats, so a
    decompression bomb or a GIF is refused here too (``DecodeError``), before any pixel is decoded.
    """
    source = path.read() if hasattr(path, "read") else path
    with open_image(source, DEFAULT_MAX_PIXELS, frozenset(DEFAULT_FORMATS)).image as im:
        full, scale = im.size, 1
        if min_side is not None and im.format == "JPEG" and min(im.size) >= 2 * min_side:
            # draft picks the largest 1/N with both sides still >= the request (N = min(W//s, H//s) rounded down
            # to 8, 4, 2, 1); a square request makes the EXIF orientation irrelevant
            drafted = im.draft("RGB", (min_side, min_side))
            if drafted is not None:
                scale = round(full[0] / drafted[1][2])
        im.load()
        orientation = im.getexif().get(0x0112, 1) if scale > 1 else 1
        out = ImageOps.exif_transpose(im).convert("RGB")
    if scale > 1:
        out.info[FULL_SIZE_KEY] = full[::-1] if orientation in _SWAPS_AXES else full
        out.info[SCALE_KEY] = scale
    return out


def augment_min_side(size: int, cfg: AugmentConfig) -> int | None:
    """Short side the source needs so that the smallest random crop of ``augment_view`` (lowest crop_scale, most
    extreme aspect ratio) still spans >= ``size`` pixels both ways; None when a crop may be arbitrarily small."""
    lo, (r0, r1) = cfg.crop_scale[0], cfg.crop_ratio
    if lo <= 0 or r0 <= 0 or r1 <= 0:
        return None
    # crop sides are base*sqrt(scale*ratio) and base*sqrt(scale/ratio) (clamping to the image only keeps them
    # >= base), so the shortest is base * sqrt(lo) * min(1, sqrt(r_min), 1/sqrt(r_max))
    shrink = math.sqrt(lo) * min(1.0, math.sqrt(min(r0, r1)), 1.0 / math.sqrt(max(r0, r1)))
    return math.ceil(size / shrink - 1e-9)


def to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def full_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the image at full resolution, whatever scale it was decoded at."""
    return img.info.get(FULL_SIZE_KEY, img.size)


def eval_view(img: Image.Image, size: int) -> torch.Tensor:
    """Short side to ``size`` then a centre crop: the view the embedding cache and validation use."""
    w, h = full_size(img)
    s = min(h, w)
    return _crop_resize(img, (h - s) // 2, (w - s) // 2, s, s, size)


def _crop_resize(img: Image.Image, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    """The crop (full-resolution pixel coordinates) resized to size x size, antialiased bilinear.

    A full-resolution image goes through torch as it always has (bit-identical views). A reduced decode maps the
    box to its own coordinates, which are fractional (pixel i covers full pixels [N*i, N*i + N)), so PIL's
    resize with a float box cuts it there instead of rounding the crop by up to N/2 full pixels.
    """
    if FULL_SIZE_KEY not in img.info:
        x = to_tensor(img)[:, top: top + h, left: left + w]
        return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    k = 1.0 / img.info[SCALE_KEY]
    box = (left * k, top * k, min((left + w) * k, img.width), min((top + h) * k, img.height))
    return to_tensor(img.resize((size, size), Image.Resampling.BILINEAR, box=box))


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch ops inside run on one intra-op thread (restored after; a no-op where it already is one, as in a
    DataLoader worker)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def augment_view(img: Image.Image, size: int, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Geography-safe training view: a mild random crop of the centred square's scale, colour jitter, one of
    fog/rain/overcast, slight blur and sensor noise. No flips (roads, traffic side, text), no rotations
    (horizon), no perspective warps.

    Runs on one intra-op thread: a 224 px view's ops are too small to split, and on a busy machine each hand-off
    between threads costs more than the op (measured 580 µs against 20 µs for one multiply at 2 threads). Loader
    workers, not threads, give the parallelism."""
    with single_thread():
        return _augment_view(img, size, cfg, g)


def _augment_view(img: Image.Image, size: int, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    w, h = full_size(img)
    base = min(h, w)
    area = _u(g, *cfg.crop_scale) * base * base
    ratio = math.exp(_u(g, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
    cw = min(w, max(8, int(round(math.sqrt(area * ratio)))))
    ch = min(h, max(8, int(round(math.sqrt(area / ratio)))))
    top = int(_u(g) * (h - ch + 1)) if h > ch else 0
    left = int(_u(g) * (w - cw + 1)) if w > cw else 0
    x = _crop_resize(img, min(top, h - ch), min(left, w - cw), ch, cw, size)
    x = colour_jitter(x, cfg, g)
    if _u(g) < cfg.weather_p:
        x = (fog, rain, overcast)[int(_u(g) * 3) % 3](x, g)
    if _u(g) < cfg.blur_p:
        sigma = _u(g, *cfg.blur_sigma)
        x = gaussian_blur(x, sigma)
    if cfg.noise_std > 0:
        x = x + torch.randn(x.shape, generator=g) * _u(g, 0.0, cfg.noise_std)
    return x.clamp_(0.0, 1.0)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


def colour_jitter(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    x = x * _u(g, 1 - cfg.brightness, 1 + cfg.brightness)
    m = _grey(x).mean()
    x = (x - m) * _u(g, 1 - cfg.contrast, 1 + cfg.contrast) + m
    gr = _grey(x)
    x = (x - gr) * _u(g, 1 - cfg.saturation, 1 + cfg.saturation) + gr
    if cfg.hue > 0:  # small hue rotation in YIQ space
        theta = _u(g, -cfg.hue, cfg.hue) * 2 * math.pi
        c, s = math.cos(theta), math.sin(theta)
        to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        rot = torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float32)
        m3 = torch.linalg.inv(to_yiq) @ rot @ to_yiq
        x = torch.einsum("ij,jhw->ihw", m3, x)
    return x.clamp(0.0, 1.0)


def fog(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Haze toward light grey, denser toward the top of the frame (farther away)."""
    h = x.shape[-2]
    strength = _u(g, 0.15, 0.45)
    ramp = torch.linspace(1.0, 0.5, h)[None, :, None]
    t = strength * ramp
    return x * (1 - t) + _u(g, 0.75, 0.9) * t


def overcast(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Flat grey light: less saturation and contrast, a little darker and bluer."""
    gr = _grey(x)
    x = gr + (x - gr) * _u(g, 0.4, 0.7)
    m = gr.mean()
    x = (x - m) * _u(g, 0.7, 0.9) + m * _u(g, 0.8, 0.95)
    return x * torch.tensor([0.97, 0.99, 1.03])[:, None, None]


def rain(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Thin slanted light streaks over a slightly darkened, softened scene.

    Each streak is a one-pixel-wide slanted line of ``length`` rows through a random drop. The line has at most one
    pixel per row, so the streak map (a 0/1 convolution of the drops with the line, clamped at 1) is the OR of the
    drop map shifted once per row: ``length`` boolean slices instead of a ``length``² kernel over every pixel
    (~0.8 ms a call at 224 px on one thread, against ~3-7 ms, and ~99 ms at 2 threads on a busy machine); the
    same random draws and the same streaks as the convolution, the rest within float rounding (1e-6).
    """
    with single_thread():
        _, h, w = x.shape
        drops = torch.rand((h, w), generator=g) < _u(g, 0.002, 0.01)
        length = max(3, h // 12)
        angle = _u(g, -0.3, 0.3)
        pad = length // 2  # the convolution's zero padding: output (y, x) reads drops[y + i - pad, x + j_i - pad]
        padded = F.pad(drops, (pad, pad, pad, pad))
        streaks = torch.zeros((h, w), dtype=torch.bool)
        for i in range(length):
            j = int(round(length / 2 + (i - length / 2) * math.tan(angle)))
            if 0 <= j < length:
                streaks |= padded[i: i + h, j: j + w]
        x = gaussian_blur(x * _u(g, 0.8, 0.95), 0.6)
        return torch.lerp(x, torch.full_like(x, 0.8), 0.35 * streaks.to(x.dtype)[None])  # x·(1 − 0.35s) + 0.28s


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (C, H, W) image, edges replicated: the 2·radius + 1 taps as shifted,
    weighted sums of the padded image (a depthwise ``conv2d`` did the same sums in another order, within 2e-7, but
    took 0.5-4 ms at 224 px on one thread against ~0.3 ms)."""
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / max(sigma, 1e-3)) ** 2)
    k = (k / k.sum()).to(x.dtype).tolist()
    h, w = x.shape[-2:]
    y = F.pad(x[None], (radius, radius, radius, radius), mode="replicate")[0]
    rows = y[:, :, :w] * k[0]
    for i in range(1, len(k)):
        rows.add_(y[:, :, i: i + w], alpha=k[i])
    out = rows[:, :h] * k[0]
    for i in range(1, len(k)):
        out.add_(rows[:, i: i + h], alpha=k[i])
    return out


# --- where an image's bytes come from (issue 22): its original file, or its copy in the image shards --------------
class FileImages:
    """Each row's original file under the data root, hashed as read and checked against its image id."""

    kind = "files"

    def __init__(self, table: pd.DataFrame, root: str | Path):
        self.paths = [str(Path(root) / p) for p in table["path"]]
        self.image_ids = table["image_id"].astype(str).tolist() if "image_id" in table else [None] * len(table)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> bytes:
        return read_verified(self.paths[i], self.image_ids[i])

    def failure_reason(self, i: int, exc: BaseException) -> str:
        return read_failure_reason(self.paths[i], exc)


class ShardImages:
    """Each row's pre-resized copy in the image shards (``pipeline.core.shards``): the shards' sha256 is checked
    once when they are located, then each image is one read (no per-image hashing, no 12 MP decode)."""

    def __init__(self, table: pd.DataFrame, shards: ShardSet):
        self.where = shards.locate(table["image_id"].astype(str))
        self.kind = f"shards:{shards.preprocess}"

    def __len__(self) -> int:
        return len(self.where)

    def read(self, i: int) -> bytes:
        return self.where.read(i)

    def failure_reason(self, i: int, exc: BaseException) -> str:
        """The reason recorded when the shard was written (a copy that does not decode: not_an_image)."""
        return exc.reason if isinstance(exc, NotInShards) else reasons.NOT_AN_IMAGE


ImageSource = FileImages | ShardImages


def image_source(table: pd.DataFrame, root: str | Path) -> ImageSource:
    """The shards' copies when the data root has shards (the ``image_shards`` asset), else the original files.
    Shards that lack some of ``table``'s images raise ``ShardsStale`` rather than mix the two; ``.kind`` says
    which was chosen (the embedding cache keys its features on it)."""
    shards = ShardSet.find(root)
    return ShardImages(table, shards) if shards is not None else FileImages(table, root)


class ImageDataset(torch.utils.data.Dataset):
    """Images of ``table`` with their targets, read from ``images`` (default ``image_source(table, root)``: the
    data root's shards, else the files at ``path`` relative to ``root``). Keys are row indices, or
    (row, seed) pairs from a seeded sampler, in which case the row gets its own augmentation stream (the same
    batches and views whatever the number of workers). ``with_labels=False``: images only (the embedding cache
    needs no targets, and embeds test images whose tables carry none of the training encodings)."""

    def __init__(self, table: pd.DataFrame, root: str | Path, size: int, augment: AugmentConfig | None = None,
                 with_labels: bool = True, images: ImageSource | None = None):
        self.images = images if images is not None else image_source(table, root)
        self.labels = label_tensors(table) if with_labels else {}
        self.size = size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor] | Unreadable:
        idx, seed = (key, idx_seed(key)) if isinstance(key, int | np.integer) else key
        need = self.size if self.augment is None else augment_min_side(self.size, self.augment)
        try:  # one read (a file hashed against its image id, or a shard member), then one decode
            img = load_image(io.BytesIO(self.images.read(idx)), need)
        # unreadable: the collate lists the row and the reason; the embedding cache records them
        except (OSError, ValueError, DecodeError) as exc:
            return Unreadable(int(idx), self.images.failure_reason(idx, exc))
        if self.augment is None:
            x = eval_view(img, self.size)
        else:
            g = torch.Generator().manual_seed(int(seed))
            x = augment_view(img, self.size, self.augment, g)
        item = {k: v[idx] for k, v in self.labels.items()}
        item["image"] = x
        item["row"] = torch.tensor(int(idx))
        return item


def idx_seed(idx: int) -> int:
    return int(idx) * 7919 + 1


def collate_drop_failed(items: list[dict[str, torch.Tensor] | Unreadable]) -> dict:
    """Stack the readable items; ``n_failed`` counts those that could not be read, ``failed_rows`` and
    ``failed_reasons`` (plain lists) say which and why. A batch with no readable item has no ``image``."""
    ok = [it for it in items if not isinstance(it, Unreadable)]
    bad = [it for it in items if isinstance(it, Unreadable)]
    out = torch.utils.data.default_collate(ok) if ok else {}
    out["n_failed"] = torch.tensor(len(bad))
    out["failed_rows"] = [b.row for b in bad]
    out["failed_reasons"] = [b.reason for b in bad]
    return out


def tensors_to(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (the failure lists stay behind)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def make_loader(dataset: torch.utils.data.Dataset, batch_sampler, num_workers: int, pin_memory: bool = False,
                prefetch_batches: int = 4) -> torch.utils.data.DataLoader:
    """Workers are spawned, never forked: a forked CUDA context (or forked Dagster process) is unsafe. They persist
    across epochs (no re-spawn, and each keeps its verified-bytes memo, so images are not hashed again every
    epoch) and each keeps ``prefetch_batches`` batches ready; ``pin_memory`` (CUDA) makes the copies to the
    device asynchronous. Build one loader per phase and iterate it every epoch: the batch sampler runs in this
    process, so ``set_epoch`` between epochs still reaches it."""
    workers = num_workers > 0
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_drop_failed,
        multiprocessing_context="spawn" if workers else None, pin_memory=pin_memory,
        persistent_workers=workers, prefetch_factor=prefetch_batches if workers else None,
    )


# --- sampler --------------------------------------------------------------------------------------------------
def batch_quotas(shares: dict[str, float], present: Sequence[int], batch_size: int) -> np.ndarray:
    """Samples per province in a batch (largest remainder), only for provinces that have training images."""
    raw = np.zeros(NUM_PROVINCES)
    for p in PROVINCES:
        if p.id in present:
            raw[p.id] = max(0.0, float(shares.get(p.key, 1.0)))
    if raw.sum() <= 0:
        raise ValueError("no province with training images has a positive sampler share")
    raw = raw / raw.sum() * batch_size
    q = np.floor(raw).astype(int)
    order = np.argsort(-(raw - q), kind="stable")
    q[order[: batch_size - q.sum()]] += 1
    return q


class ProvinceBalancedBatchSampler:
    """GEOPAK's balanced batches (fixed per-province quotas, drawn with replacement), but FRESH every epoch:
    batches are drawn from ``default_rng([seed, epoch])`` (GEOPAK replayed the same batches every epoch).

    Distributed: every rank draws the same global batches and keeps positions ``rank::world_size`` of each,
    so the union over ranks is exactly the single-process batch. With ``with_seeds`` it yields (row, seed) keys
    that give every drawn sample its own augmentation stream.
    """

    def __init__(self, province_ids: np.ndarray, batch_size: int, batches_per_epoch: int, shares: dict[str, float],
                 seed: int = 0, rank: int = 0, world_size: int = 1, with_seeds: bool = False):
        self.province_ids = np.asarray(province_ids)
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by world size {world_size}")
        present = sorted(set(self.province_ids.tolist()))
        self.quotas = batch_quotas(shares, present, batch_size)
        self.pools = [np.flatnonzero(self.province_ids == p) for p in range(NUM_PROVINCES)]
        self.batch_size = batch_size
        self.batches = batches_per_epoch or math.ceil(len(self.province_ids) / batch_size)
        self.seed, self.rank, self.world_size, self.with_seeds = seed, rank, world_size, with_seeds
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list]:
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.batches):
            parts = [rng.choice(self.pools[p], size=q, replace=True) for p, q in enumerate(self.quotas) if q]
            batch = rng.permutation(np.concatenate(parts))
            seeds = rng.integers(0, 2**31 - 1, size=len(batch))
            mine = slice(self.rank, None, self.world_size)
            rows, s = batch[mine].tolist(), seeds[mine].tolist()
            yield list(zip(rows, s)) if self.with_seeds else rows

    def sampling_prior(self) -> np.ndarray:
        """Share of each province in the batches the model is trained on."""
        return self.quotas / self.quotas.sum()


# --- cached features in memory ------------------------------------------------------------------------------
@dataclass
class FeatureData:
    """Cached encoder features (float16 in memory, float32 per batch) and targets for one split."""

    clip: torch.Tensor
    scene: torch.Tensor
    labels: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.clip.shape[0]

    def batch(self, rows: Sequence[int] | torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(rows, dtype=torch.long)
        out = {k: v[idx].to(device, non_blocking=True) for k, v in self.labels.items()}
        out["clip"] = self.clip[idx].to(device, non_blocking=True).float()
        out["scene"] = self.scene[idx].to(device, non_blocking=True).float()
        return out
