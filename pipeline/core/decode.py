"""Open and decode images safely and cheaply, the same way wherever pixels are read.

- The pixel limit is set deliberately (``Image.MAX_IMAGE_PIXELS``, not disabled): a file whose header claims more
  pixels than the limit is refused from its header, before any pixel is decoded (decompression bombs).
- JPEGs are decoded in draft mode: libjpeg's DCT scaling gives a 1/2, 1/4 or 1/8 size image for a fraction of the
  work, yet still reads the whole entropy-coded stream, so a truncated file is still detected
  (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False). Other formats have no draft mode and are decoded fully.
- HEIC/HEIF (iPhone photos) is read through the ``pillow-heif`` plugin (``pipeline.core.image_formats``), with the
  same pixel limit; its decoder applies the file's rotation itself and resets the EXIF orientation to 1.
- EXIF orientation is applied to every decoded image (a corrupt EXIF block is recorded, not fatal).
- CMYK, greyscale, palette (with transparency), 16/32-bit integer and float images become proper 8-bit RGB or L.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.core import reasons
from pipeline.core.exif import error_detail
from pipeline.core.image_formats import PHOTO_FORMATS

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_FORMATS = PHOTO_FORMATS  # JPEG, HEIF, PNG, ... (AVIF where Pillow reads it); GIF, ICO, PSD are not photos
DRAFT_FORMATS = frozenset({"JPEG", "MPO"})  # formats whose decoder can scale while decoding
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees
_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as viewers do


class DecodeError(Exception):
    """The file cannot be used; ``reason`` is a code from ``pipeline.core.reasons``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Opened:
    """A header-only opened image: format and the displayed (EXIF-oriented) full size."""

    image: Image.Image
    format: str
    mode: str
    width: int
    height: int
    orientation: int
    exif_note: str | None = None  # a corrupt EXIF block noticed while reading the header


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Set PIL's bomb limit for the duration (PIL warns above it and raises above twice it)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, never decode to grey
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _exif_note(caught: list[warnings.WarningMessage]) -> str | None:
    """PIL reports a corrupt EXIF block only as a warning: keep its text to record (the image is still used)."""
    notes = sorted({str(w.message).strip() for w in caught if "exif" in str(w.message).lower()})
    return "; ".join(notes)[:200] or None


def _size(path: str | Path) -> int | None:
    """The file's size, to say "empty file" rather than PIL's "cannot identify"; None when it cannot be read."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return None


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:  # a corrupt EXIF block: orientation unknown, treated as upright
        return 1


def open_image(source: str | Path | bytes, max_pixels: int, allowed_formats: frozenset[str] | None = None) -> Opened:
    """Read the header only. Raises ``DecodeError`` for unrecognised bytes, bombs and disallowed formats."""
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    size = len(source) if isinstance(source, bytes) else _size(source)
    with pixel_limit(max_pixels), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # above the limit: refuse, not warn
        try:
            img = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DecodeError(reasons.DECOMPRESSION_BOMB, str(exc)[:200]) from exc
        except (UnidentifiedImageError, ValueError, SyntaxError, EOFError, struct.error) as exc:
            raise DecodeError(reasons.NOT_AN_IMAGE, error_detail(exc, size)[:200]) from exc
        except OSError as exc:
            raise DecodeError(reasons.UNDECODABLE, error_detail(exc, size)[:200]) from exc
        orientation = _orientation(img)
    w, h = img.size
    if w * h > max_pixels:  # belt and braces: PIL's own check is skipped by some plugins
        img.close()
        raise DecodeError(reasons.DECOMPRESSION_BOMB, f"{w}x{h} = {w * h:,} pixels > limit {max_pixels:,}")
    fmt = img.format or "unknown"
    if allowed_formats is not None and fmt not in allowed_formats:
        img.close()
        raise DecodeError(reasons.UNSUPPORTED_FORMAT, f"format {fmt} not in {sorted(allowed_formats)}")
    if orientation in _SWAPS_AXES:
        w, h = h, w
    return Opened(img, fmt, img.mode, int(w), int(h), orientation, _exif_note(caught))


def decode(opened: Opened, mode: str, long_side: int | None, max_pixels: int) -> tuple[Image.Image, str | None]:
    """Decode (in draft mode where possible) to at most ``long_side`` px, oriented, in ``mode`` ('L' or 'RGB').

    Returns (image, exif_error). Raises ``DecodeError(undecodable)`` for truncated or corrupt pixel data.
    """
    request = _draft_request(opened.image.size, long_side) if long_side else None
    img, exif_error = _load_oriented(opened, mode, request, max_pixels)
    return _fit(to_mode(img, mode), long_side), exif_error


def decode_grey_and_rgb(opened: Opened, long_side: int, min_short_side: int,
                        max_pixels: int) -> tuple[Image.Image, Image.Image, str | None]:
    """One decode serving two consumers: a grey image of at most ``long_side`` px (the filter's metrics) and an
    RGB image whose short side is at least ``min_short_side`` where the original allows (the training copy).

    The draft scale is the smallest either needs. A YCbCr-coded JPEG is decoded to YCbCr: its Y plane is exactly
    the grey image libjpeg gives in 'L' mode, and RGB comes from it through ``ycc_to_rgb``, the conversion
    ``decode_rgb`` uses too, so a copy made here is the copy the shard writer would make. Returns
    (grey, rgb, exif_error)."""
    w, h = _draft_request(opened.image.size, long_side)
    img, exif_error = _load_oriented(opened, _draft_mode(opened), (max(w, min_short_side), max(h, min_short_side)),
                                     max_pixels)
    if img.mode == "YCbCr":
        grey, rgb = img.getchannel(0), ycc_to_rgb(img)
    else:
        grey, rgb = to_mode(img, "L"), to_mode(img, "RGB")
    return _fit(grey, long_side), rgb, exif_error


def decode_rgb(opened: Opened, min_short_side: int, max_pixels: int) -> tuple[Image.Image, str | None]:
    """RGB at the smallest draft scale whose sides stay >= ``min_short_side``, colour-converted exactly as
    ``decode_grey_and_rgb`` does (so both make identical training copies). Returns (image, exif_error)."""
    img, exif_error = _load_oriented(opened, _draft_mode(opened), (min_short_side, min_short_side), max_pixels)
    return (ycc_to_rgb(img) if img.mode == "YCbCr" else to_mode(img, "RGB")), exif_error


def ycc_to_rgb(img: Image.Image) -> Image.Image:
    """A YCbCr image to RGB (Pillow's fixed-point conversion: within 1 level of libjpeg's, mean 0.44)."""
    return img.convert("RGB")


def _draft_mode(opened: Opened) -> str | None:
    """'YCbCr' for JPEGs that libjpeg holds as YCbCr (then the Y plane is free grey); None leaves the mode as is.

    libjpeg takes a 3-component JPEG as RGB-coded (and cannot output YCbCr from it) when it has no JFIF marker and
    either an Adobe marker with transform 0 or component ids 'R', 'G', 'B'."""
    img = opened.image
    if opened.format not in DRAFT_FORMATS or img.mode != "RGB":
        return None
    if "jfif" in img.info:
        return "YCbCr"
    ids = [c[0] for c in getattr(img, "layer", [])]
    rgb_coded = img.info["adobe_transform"] == 0 if "adobe_transform" in img.info else ids == [82, 71, 66]
    return None if rgb_coded else "YCbCr"


def _draft_request(size: tuple[int, int], long_side: int | None) -> tuple[int, int]:
    """The aspect-preserving size to ask the draft for: draft keeps both sides >= the request, so not a square."""
    raw_w, raw_h = size
    f = min(1.0, (long_side or max(size)) / max(raw_w, raw_h))
    return max(1, round(raw_w * f)), max(1, round(raw_h * f))


def _load_oriented(opened: Opened, draft_mode: str | None, request: tuple[int, int] | None,
                   max_pixels: int) -> tuple[Image.Image, str | None]:
    """Load the pixels (scaled while decoding to cover ``request`` where the format allows), EXIF-oriented."""
    img = opened.image
    if request and opened.format in DRAFT_FORMATS:
        img.draft(draft_mode if img.mode in ("RGB", "L") else None, request)
    with pixel_limit(max_pixels):
        try:
            img.load()
        except Exception as exc:  # truncated stream, corrupt data, decoder errors
            raise DecodeError(reasons.UNDECODABLE, error_detail(exc)[:200]) from exc
    img, exif_error = orient(img)
    return img, exif_error or opened.exif_note


def _fit(img: Image.Image, long_side: int | None) -> Image.Image:
    """Reduce (box filter) to ``long_side`` px on the longer side; the draft only gets within 2x of it."""
    if long_side and max(img.size) > long_side:
        f = long_side / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BOX)
    return img


def orient(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Apply the EXIF orientation; a corrupt EXIF block leaves the image as stored and is reported."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = ImageOps.exif_transpose(img)
        return (out if out is not None else img), _exif_note(caught)
    except Exception as exc:
        return img, error_detail(exc)[:200]


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """8-bit ``mode`` ('L' or 'RGB') from any PIL mode: alpha on white, 16/32-bit and float rescaled, CMYK to RGB."""
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    m = img.mode
    if m.startswith("I;16") or m in ("I", "F"):
        img = Image.fromarray(_to_uint8(np.asarray(img), m), "L")
    elif m in ("P", "PA"):
        img = img.convert("RGBA")
    elif m == "1":
        img = img.convert("L")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        img = Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode not in ("L", "RGB"):  # CMYK (Adobe inversion is undone by the decoder), YCbCr, LAB, HSV
        img = img.convert("RGB")
    return img if img.mode == mode else img.convert(mode)


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Rescale high-bit-depth grey values to 0-255 (16-bit by its full range; others by their own maximum)."""
    a = arr.astype(np.float64)
    if mode.startswith("I;16"):
        a = a / 257.0
    else:
        hi = float(np.nanmax(a)) if a.size else 0.0
        if mode == "F" and 0.0 < hi <= 1.0:
            a = a * 255.0
        elif hi > 255.0:
            a = a * (255.0 / (65535.0 if hi <= 65535.0 else hi))
    return np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)


def load_oriented(
    source: str | Path | bytes, mode: str, long_side: int | None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open, check and decode in one call (for consumers that need pixels only: CLIP, thumbnails)."""
    img, _ = decode(open_image(source, max_pixels), mode, long_side, max_pixels)
    return img
