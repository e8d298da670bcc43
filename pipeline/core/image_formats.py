"""The image formats GeoPak reads as photos, and the one place Pillow learns to open HEIC/HEIF.

iPhones (and many Android phones and cameras) save HEIC/HEIF; Pillow reads it only through the ``pillow-heif``
plugin, registered here when this module is imported (``pipeline.core`` imports it, so every process that opens an
image through GeoPak's code has it). AVIF is read by Pillow itself where its wheel ships libavif
(``features.check("avif")``); without it AVIF stays an unsupported container. The decompression-bomb guard is
Pillow's own check in ``Image.open``, which applies to plugin formats too: nothing here changes it.
"""

from __future__ import annotations

import pillow_heif
from PIL import features

pillow_heif.register_heif_opener()

AVIF_READABLE: bool = bool(features.check("avif"))
# Pillow format names accepted as photos (the filter's default allowlist); GIF, ICO, PSD, ... are never photos
PHOTO_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "TIFF", "BMP", "HEIF") + (
    ("AVIF",) if AVIF_READABLE else ())
# file names a folder of photos may hold (the content decides what a file is; this only skips other files)
PHOTO_SUFFIXES: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".jpe", ".mpo", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif", ".heic", ".heif", ".hif",
    ".avif"})
# store extensions (``pipeline.core.store.sniff_extension``) of containers this installation cannot decode
UNREADABLE_EXTENSIONS: frozenset[str] = frozenset() if AVIF_READABLE else frozenset({".avif"})
