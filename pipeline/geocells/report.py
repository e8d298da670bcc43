"""Tables and maps of geocells and splits for people (Dagster metadata, the bench, the README). No Dagster here."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.core.provinces import BY_ID
from pipeline.core.report import PROVINCE_COLOURS, draw_outlines, png_bytes
from pipeline.geocells.splits import BUFFER, TEST, TRAIN, VAL


def province_cell_table(cells: pd.DataFrame, fit_report: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per province: cells (urban), target, median/max radius, images per cell (median, min, max)."""
    g = cells.groupby("province_id", sort=True)
    table = pd.DataFrame(
        {
            "cells": g.size(),
            "urban_cells": g["urban"].sum().astype(int),
            "median_radius_km": g["radius_km"].median(),
            "max_radius_km": g["radius_km"].max(),
            "max_cap_km": g["cap_km"].max(),
            "images": g["count"].sum(),
            "median_images_per_cell": g["count"].median(),
            "min_images_per_cell": g["count"].min(),
            "max_images_per_cell": g["count"].max(),
        }
    )
    if fit_report is not None and len(fit_report):
        table.insert(1, "target", fit_report.set_index("province_id")["target"].reindex(table.index))
    table.insert(0, "province", [BY_ID[int(p)].key if int(p) in BY_ID else str(p) for p in table.index])
    return table.reset_index()


def _map_axes(outlines: dict | None, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.4, 3.3))
    draw_outlines(ax, outlines, "#444444")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_aspect(1 / np.cos(np.radians(30)))
    ax.set_title(title)
    return fig, ax


def cells_map_png(cells: pd.DataFrame, polygons=None, outlines: dict | None = None, title: str = "geocells") -> bytes:
    """Cell polygons outlined, centres sized by member count and coloured by province (urban cells ringed)."""
    fig, ax = _map_axes(outlines, title)
    if polygons is not None and len(polygons):
        for geom in polygons.geometry:
            for poly in getattr(geom, "geoms", [geom]):
                if hasattr(poly, "exterior") and not poly.is_empty:
                    ax.plot(*poly.exterior.xy, color="#9a9a9a", linewidth=0.3)
    if len(cells):
        size = 4 + 60 * np.sqrt(cells["count"].to_numpy(float) / max(cells["count"].max(), 1))
        colour = [PROVINCE_COLOURS[int(p) % len(PROVINCE_COLOURS)] for p in cells["province_id"]]
        edge = np.where(cells["urban"].to_numpy(bool), "black", "none")
        ax.scatter(cells["center_lon"], cells["center_lat"], s=size, c=colour, edgecolors=edge, linewidths=0.5,
                   alpha=0.8)
    ax.text(0.01, 0.01, f"{len(cells)} cells; dot area ∝ images; ringed = urban", transform=ax.transAxes, fontsize=8)
    return png_bytes(fig)


SPLIT_STYLE = {TRAIN: ("#b0b0b0", 2), VAL: ("#1f77b4", 6), TEST: ("#d62728", 6), BUFFER: ("#ff7f0e", 4)}


def splits_map_png(lat, lon, split, outlines: dict | None = None, title: str = "splits") -> bytes:
    """Images coloured by split (buffer = train images dropped next to a held-out tile)."""
    fig, ax = _map_axes(outlines, title)
    lat, lon, split = np.asarray(lat), np.asarray(lon), np.asarray(split)
    for name, (colour, size) in SPLIT_STYLE.items():
        m = split == name
        if m.any():
            ax.scatter(lon[m], lat[m], s=size, color=colour, label=f"{name} ({m.sum()})")
    ax.legend(fontsize=9, markerscale=2, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return png_bytes(fig)
