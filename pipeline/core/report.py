"""Readable summaries for people: Markdown tables and PNG plots (matplotlib, headless), no Dagster here."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline.core.provinces import PROVINCES

PROVINCE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#17becf", "#ff7f0e", "#8c564b")


def markdown_table(df: pd.DataFrame, max_rows: int = 30, floatfmt: str = "{:.3f}") -> str:
    """A GitHub-style Markdown table (first ``max_rows`` rows, saying how many more), readable in the Dagster UI.

    Numbers are rounded to what they mean: columns named ``*km*`` to 0.1 km, other floats by ``floatfmt``
    (fractions and scores: 3 digits). Cells are never cut: a long value is shown whole.
    """
    if df.empty:
        return "_(no rows)_"
    shown = df.head(max_rows)
    fmts = [column_floatfmt(c, floatfmt) for c in shown.columns]
    cells = [[_fmt(v, f) for v, f in zip(row, fmts)] for row in shown.itertuples(index=False)]
    header = "| " + " | ".join(_fmt(c, floatfmt) or " " for c in shown.columns) + " |"
    sep = "|" + "|".join(" ---: " if pd.api.types.is_numeric_dtype(shown[c]) else " --- " for c in shown.columns) + "|"
    body = ["| " + " | ".join(r) + " |" for r in cells]
    more = [f"\n_{len(df) - max_rows} more rows not shown_"] if len(df) > max_rows else []
    return "\n".join([header, sep, *body, *more])


def is_distance_km(name) -> bool:
    """A name for a distance in km ends in ``km`` as a word (``median_km``, ``baseline median km``); a share such
    as ``acc_25km`` does not."""
    return re.search(r"(^|[_ ])km$", str(name).strip().lower()) is not None


def column_floatfmt(column, default: str = "{:.3f}") -> str:
    """Distances (``is_distance_km``) to 0.1 km, percentages (a ``%`` in the name) to 0.1 %; everything else,
    shares such as ``acc_25km`` included, ``default``."""
    return "{:.1f}" if is_distance_km(column) or "%" in str(column) else default


SHARE_NAME = re.compile(r"(^|[_ ])(acc|accuracy|share|fraction|rate|known|precision|recall)([_ ]|$)|^acc_\d")


def is_share(name) -> bool:
    """A name for a fraction of 1 (``acc_25km``, ``val_province_acc``, ``day_of_year_known``, ``share``), shown
    to people as a percentage; a name that already says ``%`` or ``pct`` is a percentage, not a fraction."""
    text = str(name).strip().lower()
    return "%" not in text and "pct" not in text and SHARE_NAME.search(text) is not None


def curator_cell(column, value) -> str | int:
    """One value as a curator reads it, by the one rounding rule: distances (``is_distance_km``) to 0.1 km,
    shares (``is_share``) as percentages to 0.1 %, percentages to 0.1 %, other fractional numbers to 3 decimals;
    whole numbers stay numbers, booleans become yes/no, missing values stay empty."""
    if value is None or value is pd.NaT or (isinstance(value, float | np.floating) and np.isnan(value)):
        return ""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        if is_share(column) and 0.0 <= value <= 1.0:
            return f"{100 * float(value):.1f} %"
        return column_floatfmt(column).format(float(value))
    return str(value).replace("\n", " ")


def settings_rows(value, name: str = "") -> list[tuple[str, str]]:
    """A settings object as (dotted name, plain text) rows for people: dataclasses and mappings are opened up
    (``accuracy_rules.flickr.min_level``, ``clip.model``), lists joined, booleans yes/no, None "unset"; never a
    Python repr such as ``AccuracyRule(min_level=11.0, ...)``."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        rows = [r for k, v in value.items() for r in settings_rows(v, f"{name}.{k}" if name else str(k))]
        return rows or [(name, "none")]
    if value is None:
        return [(name, "unset")]
    if isinstance(value, list | tuple | set | frozenset):
        return [(name, ", ".join(str(curator_cell(name, v)) for v in value) or "none")]
    return [(name, str(curator_cell(name, value)))]


def round_km(value: float) -> float:
    """A distance in km as a metadata number: 0.1 km is what a geolocation error means."""
    return round(float(value), 1)


def share_pct(value: float) -> float:
    """A fraction (share, accuracy) as the metadata number people read: a percentage to 0.1 (the one rule);
    its key ends in ``_pct``."""
    return round(100 * float(value), 1)


def _fmt(v, floatfmt: str) -> str:
    if isinstance(v, float | np.floating):
        return "" if np.isnan(v) else floatfmt.format(v)
    if v is None or v is pd.NaT:
        return ""
    return str(v).replace("|", "\\|").replace("\n", " ")


def counts_table(df: pd.DataFrame, rows: str, cols: str, total: bool = True, weights: str | None = None
                 ) -> pd.DataFrame:
    """Cross-tab of row counts (e.g. province × source) with totals, rows in canonical province order.
    ``weights``: a column of counts to add up instead of counting rows (tables gathered batch by batch)."""
    if df.empty:
        return pd.DataFrame({rows: []})
    if weights is None:
        tab = pd.crosstab(df[rows].fillna("(none)"), df[cols].fillna("(none)"))
    else:
        tab = pd.crosstab(df[rows].fillna("(none)"), df[cols].fillna("(none)"), values=df[weights],
                          aggfunc="sum").fillna(0).astype(np.int64)
    order = [p.key for p in PROVINCES if p.key in tab.index] + [i for i in tab.index if i not in {p.key for p in PROVINCES}]
    tab = tab.loc[order]
    if total:
        tab["total"] = tab.sum(axis=1)
        tab.loc["total"] = tab.sum(axis=0)
    return tab.reset_index().rename(columns={rows: rows})


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def png_markdown(png: bytes, alt: str) -> str:
    """Inline PNG for Dagster's Markdown metadata (the UI renders data: URIs)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def draw_outlines(ax, outlines: dict | None, colour: str = "#555555") -> None:
    """Province (or cell) polygon outlines on a matplotlib axis."""
    for geom in (outlines or {}).values():
        for poly in getattr(geom, "geoms", [geom]):
            x, y = poly.exterior.xy
            ax.plot(x, y, color=colour, linewidth=0.6)


def province_map_png(
    lat: Sequence[float],
    lon: Sequence[float],
    province_ids: Sequence[int] | None,
    outlines: dict | None = None,
    title: str = "",
) -> bytes:
    """Scatter of points coloured by province over the province outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.4, 3.3))
    draw_outlines(ax, outlines)
    lat = np.asarray(lat, float)
    lon = np.asarray(lon, float)
    pid = np.full(len(lat), -1) if province_ids is None else np.asarray(province_ids)
    for p in PROVINCES:
        m = pid == p.id
        if m.any():
            ax.scatter(lon[m], lat[m], s=3, color=PROVINCE_COLOURS[p.id], label=f"{p.name} ({m.sum()})")
    m = pid < 0
    if m.any():
        ax.scatter(lon[m], lat[m], s=3, color="#888888", label=f"unlabelled ({m.sum()})")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_aspect(1 / np.cos(np.radians(30)))
    ax.set_title(title)
    # below the map, two columns: inside it the legend would hide the points of the south-east
    ax.legend(fontsize=8, markerscale=3, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return png_bytes(fig)


def bar_chart_png(table: pd.DataFrame, index: str, title: str, stacked: bool = True) -> bytes:
    """Bar chart of a counts table (one bar group per ``index`` value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    table.set_index(index).plot.bar(ax=ax, stacked=stacked)
    ax.set_title(title)
    ax.set_ylabel("images")
    fig.autofmt_xdate(rotation=30)
    return png_bytes(fig)


def curves_png(df: pd.DataFrame, panels: dict[str, Sequence[str]], title: str = "", x: str | None = None,
               ncols: int = 2) -> bytes:
    """One line panel per entry of ``panels`` (panel title -> columns of ``df``), against ``x`` or the row index;
    ``ncols`` 1 for a picture shown in a narrow column (fonts stay legible when it is scaled down)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {k: [c for c in cols if c in df.columns and df[c].notna().any()] for k, cols in panels.items()}
    panels = {k: v for k, v in panels.items() if v}
    # at most two panels a row: the picture stays about as wide as tall, so it fits a page when scaled down
    n = max(1, len(panels))
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    xs = df[x] if x else np.arange(1, len(df) + 1)
    for ax, (name, cols) in zip(axes.ravel(), panels.items()):
        for c in cols:
            ax.plot(xs, df[c], marker="o", markersize=2.5, linewidth=1.2, label=c)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel(x or "epoch (all phases)", fontsize=9)
        ax.tick_params(labelsize=9)
        ax.legend(fontsize=8.5)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return png_bytes(fig)
