"""Contact sheets: a few thumbnails per rejection reason, so curators can see what a threshold actually drops.

Files that cannot be shown (bombs are never decoded; truncated or unreadable files) get a labelled grey tile
instead of a thumbnail, never an exception. Captions (source ids) are wrapped onto as many lines as they need,
never cut, so every example can be looked up.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pipeline.core import reasons
from pipeline.core.decode import DEFAULT_MAX_PIXELS, load_oriented

_NEVER_DECODE = {reasons.DECOMPRESSION_BOMB, reasons.MISSING_FILE}
_LINE_H = 12  # one caption line of PIL's default font
_BREAK_AFTER = ":/_-"  # where an id is best broken across lines
_LABEL_SIZE, _LABEL_H = 16, 24  # the reason's name: large enough to read at the sheet's own size
SHEET_MAX_WIDTH = 220  # the UI's narrowest metadata value column (pipeline.defs.metadata.VALUE_COLUMN_PX)
_BG = (255, 255, 255)
_BAND = (232, 236, 241)
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
    max_width: int = SHEET_MAX_WIDTH,
) -> bytes:
    """Per reason: its name in a large font on a band of its own, then (path, caption) thumbnails with whole
    captions, as many to a line as ``max_width`` holds (the sheet is shown at its own size in the UI's narrow
    column, so labels stay legible instead of being scaled down). Returns PNG bytes."""
    rows = [(r, list(ex)) for r, ex in examples.items() if ex]
    cell_w = thumb + 6
    per_line = max(1, min(max((len(ex) for _, ex in rows), default=1), max_width // cell_w))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    captions = {(r, c): wrap_caption(cap, thumb + 4, measure) for r, (_, ex) in enumerate(rows)
                for c, (_, cap) in enumerate(ex)}
    n_lines = max((len(lines) for lines in captions.values()), default=1)
    cell_h = thumb + n_lines * _LINE_H + 8
    label_font = ImageFont.load_default(size=_LABEL_SIZE)
    heights = [_LABEL_H + -(-len(ex) // per_line) * cell_h for _, ex in rows]
    sheet = Image.new("RGB", (per_line * cell_w, max(_LABEL_H, sum(heights))), _BG)
    draw = ImageDraw.Draw(sheet)
    if not rows:
        draw.text((6, 6), "no rejections", fill=_INK, font=label_font)
    y = 0
    for r, ((reason, ex), height) in enumerate(zip(rows, heights)):
        draw.rectangle((0, y, sheet.width, y + _LABEL_H - 4), fill=_BAND)
        draw.text((4, y + 2), reason, fill=_INK, font=label_font)
        for c, (path, _) in enumerate(ex):
            x, top = (c % per_line) * cell_w, y + _LABEL_H + (c // per_line) * cell_h
            sheet.paste(_tile(path, reason, thumb, max_pixels), (x, top))
            for i, line in enumerate(captions[(r, c)]):
                draw.text((x, top + thumb + 2 + i * _LINE_H), line, fill=_INK)
        y += height
    buf = io.BytesIO()
    sheet.save(buf, "PNG", optimize=True)
    return buf.getvalue()
