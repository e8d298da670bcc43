"""Square search tiles for the Places crawls (legacy and New): seed a province, split a tile whose search is capped.

A Places search returns at most a fixed number of places (legacy nearby: 60; Nearby Search (New): 20; Text Search
(New): 60), so a search that returns the cap is no proof that the tile holds no more: such a tile is split into
quarters (those that touch the province) until every search is under the cap, or the tile reaches ``min_tile_deg``,
where it is recorded as saturated. A circle that covers a square tile reaches into its neighbours; places found twice
are stored once (items are keyed by place id).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from pipeline.core.gazetteer import EARTH_RADIUS_KM, unit_vectors
from pipeline.sources.crawl import CrawlContext
from pipeline.sources.crawl_state import Unit

MAX_RADIUS_M = 50_000  # both APIs: a search circle's radius is at most 50 km
PREFIX = "tile:"


def _distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    a, b = unit_vectors(np.array([lat1, lat2]), np.array([lon1, lon2]))
    chord = float(np.linalg.norm(a - b))
    return 2.0 * math.asin(min(1.0, chord / 2.0)) * EARTH_RADIUS_KM * 1000.0


@dataclass(frozen=True)
class Tile:
    bbox: tuple[float, float, float, float]  # min_lon, min_lat, max_lon, max_lat

    @property
    def unit_id(self) -> str:
        return PREFIX + ",".join(f"{v:.6f}" for v in self.bbox)

    def payload(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def size_deg(self) -> float:
        return max(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1])

    def circle(self) -> tuple[tuple[float, float], int]:
        """(lat, lon) centre and the radius in metres that covers the whole tile."""
        x0, y0, x1, y1 = self.bbox
        lat, lon = (y0 + y1) / 2, (x0 + x1) / 2
        radius = max(_distance_m(lat, lon, y, x) for x in (x0, x1) for y in (y0, y1))
        return (lat, lon), int(math.ceil(radius))

    def quarters(self) -> list["Tile"]:
        x0, y0, x1, y1 = self.bbox
        xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
        return [Tile(b) for b in ((x0, y0, xm, ym), (xm, y0, x1, ym), (x0, ym, xm, y1), (xm, ym, x1, y1))]


def grid(bbox: tuple[float, float, float, float], tile_deg: float) -> list[Tile]:
    x0, y0, x1, y1 = bbox
    nx, ny = max(1, math.ceil((x1 - x0) / tile_deg)), max(1, math.ceil((y1 - y0) / tile_deg))
    return [Tile((x0 + i * tile_deg, y0 + j * tile_deg, x0 + (i + 1) * tile_deg, y0 + (j + 1) * tile_deg))
            for j in range(ny) for i in range(nx)]


def check_tile_deg(tile_deg: float, min_tile_deg: float) -> None:
    """Bad tile sizes fail at construction, naming the limit, instead of as a 400 from Google mid-crawl."""
    if not 0 < min_tile_deg <= tile_deg:
        raise ValueError(f"need 0 < min_tile_deg ({min_tile_deg}) <= tile_deg ({tile_deg})")
    if Tile((0.0, 30.0, tile_deg, 30.0 + tile_deg)).circle()[1] > MAX_RADIUS_M:
        raise ValueError(f"tile_deg={tile_deg} needs a search radius over {MAX_RADIUS_M} m; use ≤ 0.6")


def unit_tile(unit: Unit) -> Tile:
    x0, y0, x1, y1 = (float(v) for v in unit.payload["bbox"])
    return Tile((x0, y0, x1, y1))


def seed_tiles(ctx: CrawlContext, tile_deg: float) -> None:
    """The province's first tiles (those touching its polygon), once per discovery; deferred tiles are retried."""
    reopened = ctx.state.reopen_deferred(PREFIX)
    if reopened:
        ctx.info(f"{ctx.province.key}: {reopened} tiles left incomplete last run are searched again")
    if not ctx.state.has_units(PREFIX):
        tiles = [t for t in grid(ctx.bbox, tile_deg) if ctx.intersects(t.bbox)]
        ctx.state.add_units([Unit(t.unit_id, t.payload()) for t in tiles])


def split_capped(ctx: CrawlContext, tile: Tile, found: int, cap: int, min_tile_deg: float) -> tuple[list[Unit], bool]:
    """(child tiles to search, saturated) for a search that found ``found`` places under a cap of ``cap``."""
    if found < cap:
        return [], False
    if tile.size_deg / 2 < min_tile_deg:
        return [], True
    return [Unit(c.unit_id, c.payload()) for c in tile.quarters() if ctx.intersects(c.bbox)], False
