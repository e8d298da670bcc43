"""Contact sheets: a few thumbnails per rejection reason, so curators can see what a threshold actually drops.

Files that cannot be shown (bombs are never decoded; truncated or unreadable files) get a labelled grey tile
instead of a thumbnail, never an exception. Captions (source ids) are wrapped onto as many lines as they need,
never cut, so every example can be looked up.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.core import reasons
from pipeline.filters.decode import DEFAULT_MAX_PIXELS, load_oriented

_NEVER_DECODE = {reasons.DECOMPRESSION_BOMB, reasons.MISSING_FILE}
_LINE_H = 12  # one caption line of PIL's default font
_BREAK_AFTER = ":/_-"  # where an id is best broken across lines
_ROW_LABEL_W = 150
_BG = (255, 255, 255)
_INK = (20, 20, 20)


def _tile(path: Path | None, reason: str, size: int, max_pixels: int) -> Image.Image:
    tile = Image.new("RGB", (size, size), (215, 215, 215))
    if path is not None and reason not in _NEVER_DECODE:
        try:
            img = load_oriented(path, "RGB", size, max_pixels)
            tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
            return tile
        except Exception:  # noqa: BLE001 - an undecodable file is exactly what some rows are
            pass
    ImageDraw.Draw(tile).text((6, size // 2 - 6), "not shown", fill=(90, 90, 90))
    return tile


def wrap_caption(text: str, width_px: float, measure: Callable[[str], float]) -> list[str]:
    """Lines no wider than ``width_px`` that together are exactly ``text``: ids have no spaces, so break after a
    separator where one is on the line, else at the last character that fits (at least one per line)."""
    lines: list[str] = []
    rest = text
    while rest:
        n = 1
        while n < len(rest) and measure(rest[: n + 1]) <= width_px:
            n += 1
        if n < len(rest):
            cut = max(rest.rfind(sep, 0, n) for sep in _BREAK_AFTER) + 1
            n = cut if cut > 0 else n
        lines.append(rest[:n])
        rest = rest[n:]
    return lines or [""]


def contact_sheet_png(
    examples: Mapping[str, Sequence[tuple[Path | None, str]]],
    thumb: int = 96,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> bytes:
    """One row per reason: its name, then (path, caption) thumbnails with whole captions. Returns PNG bytes."""
    rows = [(r, list(ex)) for r, ex in examples.items() if ex]
    cols = max((len(ex) for _, ex in rows), default=1)
    cell_w = thumb + 6
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    captions = {(r, c): wrap_caption(cap, thumb + 4, measure) for r, (_, ex) in enumerate(rows)
                for c, (_, cap) in enumerate(ex)}
    n_lines = max((len(lines) for lines in captions.values()), default=1)
    cell_h = thumb + n_lines * _LINE_H + 8
    sheet = Image.new("RGB", (_ROW_LABEL_W + cols * cell_w, max(1, len(rows)) * cell_h), _BG)
    draw = ImageDraw.Draw(sheet)
    if not rows:
        draw.text((6, 6), "no rejections", fill=_INK)
    for r, (reason, ex) in enumerate(rows):
        y = r * cell_h
        draw.text((6, y + thumb // 2), reason, fill=_INK)
        for c, (path, _) in enumerate(ex):
            x = _ROW_LABEL_W + c * cell_w
            sheet.paste(_tile(path, reason, thumb, max_pixels), (x, y + 3))
            for i, line in enumerate(captions[(r, c)]):
                draw.text((x, y + thumb + 4 + i * _LINE_H), line, fill=_INK)
    buf = io.BytesIO()
    sheet.save(buf, "PNG", optimize=True)
    return buf.getvalue()
