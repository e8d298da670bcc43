"""The training copy of an image (short side at most 320 px by default, aspect kept, JPEG) and the cache of copies.

The shard writer (``pipeline.export.build``) stores one copy of every train/val/test image. The filter decodes every
image anyway, so it makes the copy from that decode (``pipeline.filters.metrics``) and leaves it in the cache; the
shard writer takes it from there and decodes the original only when the cache has no valid copy. Both make the copy
with ``copy_from_rgb`` from the same draft-scale pixels (``pipeline.core.decode``), so the bytes are identical.

The cache lives under the data root (``copies/<preprocess>/ab/<image_id>.jpg`` beside a ``.json``) and is
content-addressed by the original's sha256 (its image id) and the copy settings: a copy made with other settings
is never found. The JSON records the copy's own sha256 and size; a copy whose bytes do not match, or that does not
open as a JPEG of that size, is reported invalid and never used.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.core.decode import Opened
from pipeline.core.store import atomic_write_bytes, sha256_hex

COPY_VERSION = 2  # bump when a copy's pixels change for the same settings (2: RGB from the YCbCr draft decode)
COPIES_DIR = "copies"


@dataclass(frozen=True)
class CopySpec:
    """What a copy is: its short side (px, aspect kept) and the JPEG quality of resized copies."""

    short_side: int = 320
    quality: int = 90

    @property
    def preprocess(self) -> str:
        """Names the copies: features computed from them depend on it (the embedding cache records it)."""
        return f"short{self.short_side}-q{self.quality}-v{COPY_VERSION}"


@dataclass(frozen=True)
class Copy:
    jpg: bytes
    width: int
    height: int
    resized: bool  # False: the original bytes, stored as they are


def kept_as_is(opened: Opened, short_side: int) -> bool:
    """An upright RGB/grey JPEG already that small is its own copy (no decode, no generation loss)."""
    return (opened.format == "JPEG" and opened.orientation == 1 and opened.mode in ("RGB", "L")
            and min(opened.width, opened.height) <= short_side)


def copy_from_rgb(rgb: Image.Image, spec: CopySpec) -> Copy:
    """The copy of decoded, upright RGB pixels: Lanczos to ``spec.short_side`` when larger, then JPEG."""
    s = min(rgb.size)
    if s > spec.short_side:
        f = spec.short_side / s
        size = ((spec.short_side, max(1, round(rgb.height * f))) if rgb.width == s
                else (max(1, round(rgb.width * f)), spec.short_side))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=spec.quality)
    return Copy(buf.getvalue(), rgb.width, rgb.height, True)


class CopyCache:
    """Copies by (image id, copy settings) under ``<data root>/copies``; writes are atomic (temp, then rename)."""

    def __init__(self, root: str | Path, spec: CopySpec):
        self.folder = Path(root) / spec.preprocess
        self.spec = spec

    def _paths(self, image_id: str) -> tuple[Path, Path]:
        base = self.folder / image_id[:2] / image_id
        return base.with_suffix(".jpg"), base.with_suffix(".json")

    def put(self, image_id: str, copy: Copy) -> None:
        """Store a copy: the JPEG first, then its JSON, which is what makes it visible to ``get``."""
        jpg, meta = self._paths(image_id)
        atomic_write_bytes(jpg, copy.jpg)
        atomic_write_bytes(meta, json.dumps({
            "image_id": image_id, "preprocess": self.spec.preprocess, "sha256": sha256_hex(copy.jpg),
            "width": copy.width, "height": copy.height}).encode())

    def has(self, image_id: str) -> bool:
        """Whether a copy is recorded (not checked: ``get`` checks it)."""
        return self._paths(image_id)[1].exists()

    def get(self, image_id: str) -> tuple[Copy | None, str | None]:
        """(the copy, None), (None, None) when there is none, or (None, why) when the stored one is not valid."""
        jpg, meta = self._paths(image_id)
        try:
            m = json.loads(meta.read_bytes())
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as exc:
            return None, f"unreadable record: {exc}"[:200]
        try:
            data = jpg.read_bytes()
        except OSError as exc:
            return None, f"unreadable copy: {exc}"[:200]
        if not isinstance(m, dict) or m.get("image_id") != image_id or m.get("preprocess") != self.spec.preprocess:
            return None, "record of another image or other settings"
        if sha256_hex(data) != m.get("sha256"):
            return None, "sha256 of the copy does not match its record"
        try:
            with Image.open(io.BytesIO(data)) as im:
                ok = im.format == "JPEG" and im.size == (m.get("width"), m.get("height"))
        except Exception as exc:  # noqa: BLE001 - any failure to read the header makes the copy unusable
            return None, f"copy does not open: {exc}"[:200]
        if not ok:
            return None, "copy is not a JPEG of its recorded size"
        return Copy(data, int(m["width"]), int(m["height"]), True), None

    def drop(self, image_ids: list[str] | set[str]) -> int:
        """Remove the copies of these images (rejected by the filter after their copy was made); how many were."""
        n = 0
        for image_id in image_ids:
            jpg, meta = self._paths(image_id)
            if meta.exists():
                n += 1
            meta.unlink(missing_ok=True)  # the record first: a copy without one is never used
            jpg.unlink(missing_ok=True)
        return n
