"""Images for the filter tests, built in memory: photo-like scenes and a corpus of bad and awkward files."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageFilter

from pipeline.core import reasons


def scene(seed: int, size: tuple[int, int] = (240, 180)) -> Image.Image:
    """A photo-like RGB picture: smooth colour field, a few shapes, sensor noise. Different seeds look different."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = Image.fromarray(rng.integers(30, 225, (4, 5, 3), dtype=np.uint8), "RGB").resize((w, h), Image.BICUBIC)
    arr = np.asarray(coarse, dtype=np.float32)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        arr[y0:y1, x0:x1] = rng.integers(0, 255, 3)
    arr += rng.normal(0, 4, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit RGB) with a token IDAT: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def with_corrupt_exif(jpeg: bytes) -> bytes:
    """Insert an APP1 EXIF segment whose IFD claims 50 entries but holds 20 bytes."""
    payload = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 50) + b"\xff" * 20
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def rotated_exif_pair(seed: int = 7) -> tuple[bytes, bytes, tuple[int, int]]:
    """(upright JPEG, the same picture stored rotated with EXIF Orientation=6, displayed size)."""
    upright = scene(seed, (150, 200))  # portrait as displayed
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # landscape pixels; orientation 6 rotates them back
    ex = Image.Exif()
    ex[ExifTags.Base.Orientation] = 6
    return encode(upright, quality=92), encode(stored, quality=92, exif=ex), upright.size


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expected: str | None  # reason code, or None when the image must be kept
    displayed_size: tuple[int, int] | None = None


def bad_file_corpus() -> list[Case]:
    """The awkward inputs of the issue, each with the outcome the filter must give it."""
    good = encode(scene(1), quality=90)
    rgb = scene(2, (160, 120))
    cmyk = encode(rgb.convert("CMYK"), quality=92)
    grey16 = np.asarray(scene(3, (160, 120)).convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    palette = scene(4, (160, 120)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    blank = Image.new("RGB", (200, 150), (128, 128, 128))
    _, rotated, shown = rotated_exif_pair()
    blurred = scene(5).filter(ImageFilter.GaussianBlur(8))
    return [
        Case("good_jpeg", good, None, (240, 180)),
        Case("truncated_jpeg", good[: len(good) // 2], reasons.UNDECODABLE),
        Case("zero_bytes", b"", reasons.NOT_AN_IMAGE),
        Case("html_as_jpeg", b"<!DOCTYPE html><html><body><h1>403 Forbidden</h1></body></html>", reasons.NOT_AN_IMAGE),
        Case("png_bomb_header", png_header_only(100_000, 100_000), reasons.DECOMPRESSION_BOMB),
        Case("png_over_limit", png_header_only(9_000, 8_000), reasons.DECOMPRESSION_BOMB),  # 72 MP: PIL only warns
        Case("cmyk_jpeg", cmyk, None, (160, 120)),
        Case("grey16_png", encode(Image.fromarray(grey16), "PNG"), None, (160, 120)),
        Case("palette_png_transparent", encode(palette, "PNG"), None, (160, 120)),
        Case("corrupt_exif_jpeg", with_corrupt_exif(encode(scene(10), quality=90)), None, (240, 180)),
        Case("rotated_exif_jpeg", rotated, None, shown),
        Case("gif", encode(scene(6, (120, 90)).convert("P"), "GIF"), reasons.UNSUPPORTED_FORMAT),
        Case("tiny_jpeg", encode(scene(8, (48, 36))), reasons.TOO_SMALL),
        Case("strip_jpeg", encode(scene(9, (600, 150))), reasons.BAD_ASPECT_RATIO),
        Case("blank_jpeg", encode(blank), reasons.NEAR_UNIFORM),
        Case("blurred_jpeg", encode(blurred, quality=95), reasons.BLURRED),
    ]
