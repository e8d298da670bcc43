"""Distances and projections shared by geocells and splits.

Great-circle distances come from unit vectors (chord → arc), which is exact and lets KD-trees answer
"within r km" queries. Clustering and planar geometry (HDBSCAN, 2-means, Delaunay, Voronoi) run on an azimuthal
equidistant projection centred on the data: distances from the centre are exact and, inside one province
(≤ ~800 km from the centre), planar distances differ from great-circle ones by < 0.5 %.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyproj
import shapely

from pipeline.core.gazetteer import EARTH_RADIUS_KM, haversine_km, unit_vectors

__all__ = ["EARTH_RADIUS_KM", "Projector", "arc_km", "distance_km", "haversine_km", "km_to_chord", "unit_vectors"]


def arc_km(chord: np.ndarray | float) -> np.ndarray:
    """Great-circle km from the chord length between unit vectors."""
    return 2.0 * np.arcsin(np.clip(np.asarray(chord, float) / 2.0, 0.0, 1.0)) * EARTH_RADIUS_KM


def km_to_chord(km: float) -> float:
    """Chord length between unit vectors that are ``km`` apart on the sphere (for KD-tree radius queries)."""
    return float(2.0 * np.sin(min(km / EARTH_RADIUS_KM, np.pi) / 2.0))


def distance_km(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Great-circle km between unit vectors, row by row (``v`` may be one vector)."""
    return arc_km(np.linalg.norm(np.asarray(u) - np.asarray(v), axis=-1))


@dataclass(frozen=True)
class Projector:
    """Azimuthal equidistant projection in km, centred on (lat0, lon0)."""

    lat0: float
    lon0: float

    @classmethod
    def centred_on(cls, lat: np.ndarray, lon: np.ndarray) -> "Projector":
        """Centre on the spherical mean of the points (stable under reordering; fine across the 180° line)."""
        m = unit_vectors(lat, lon).mean(axis=0)
        norm = float(np.linalg.norm(m))
        if not np.isfinite(norm) or norm < 1e-9:  # no points, or points all over the globe
            return cls(0.0, 0.0)
        m /= norm
        return cls(float(np.degrees(np.arcsin(m[2]))), float(np.degrees(np.arctan2(m[1], m[0]))))

    def _forward(self) -> pyproj.Transformer:
        return _transformer(self.lat0, self.lon0, inverse=False)

    def xy(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """(n, 2) planar km."""
        x, y = self._forward().transform(np.asarray(lon, float), np.asarray(lat, float))
        return np.column_stack([np.asarray(x, float), np.asarray(y, float)])

    def to_lonlat(self, geoms, densify_km: float = 2.0):
        """Planar geometries (one or an array) back to lon/lat, edges densified first to follow the projection."""
        inverse = _transformer(self.lat0, self.lon0, inverse=True)
        geoms = shapely.segmentize(geoms, densify_km)
        return shapely.transform(geoms, lambda c: np.column_stack(inverse.transform(c[:, 0], c[:, 1])))

    def from_lonlat(self, geoms, densify_deg: float = 0.02):
        fwd = self._forward()
        geoms = shapely.segmentize(geoms, densify_deg)
        return shapely.transform(geoms, lambda c: np.column_stack(fwd.transform(c[:, 0], c[:, 1])))


@lru_cache(maxsize=64)
def _transformer(lat0: float, lon0: float, inverse: bool) -> pyproj.Transformer:
    crs = pyproj.CRS.from_proj4(f"+proj=aeqd +lat_0={lat0} +lon_0={lon0} +datum=WGS84 +units=km")
    return pyproj.Transformer.from_crs(crs, 4326, always_xy=True) if inverse else pyproj.Transformer.from_crs(
        4326, crs, always_xy=True
    )
