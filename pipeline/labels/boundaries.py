"""Province labels by point in polygon (geoBoundaries PAK ADM1), with an offline gazetteer fallback.

The polygons come from a configurable file path or URL (GeoJSON, Shapefile, GeoPackage — anything GDAL reads);
the default is the copy of geoBoundaries' simplified ADM1 file shipped in ``pipeline/data`` (public domain).
A configured file that cannot be read is an error (``BoundaryFileError``, with the reason): the fallback is never
silent. Only when no file is configured and the shipped one cannot be read does ``GazetteerProvinces`` assign the
province of the nearest GeoNames place within a distance cap; its agreement with the polygons is measured by the
tests and stated in the README, and its ``reason`` says why it is in use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import shapely

from pipeline.core.gazetteer import nearest_places, pakistan_places
from pipeline.core.provinces import PROVINCES, lookup

OUTSIDE = -1
_MAX_REASON_CHARS = 400
DEFAULT_BOUNDARIES = "geoBoundaries-PAK-ADM1_simplified.geojson"


def default_boundaries_path() -> Path:
    return Path(str(resources.files("pipeline") / "data" / DEFAULT_BOUNDARIES))


class BoundaryFileError(RuntimeError):
    """A boundary file that must be used could not be read; raised instead of silently labelling by gazetteer."""


def _why(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 1] + "…"


def boundaries_cache_key(path_or_url: str | Path | None) -> tuple[str, int | None, int | None]:
    """Identity of a boundary source for caching: path, mtime and size (a URL or a missing file: the path only)."""
    src = str(path_or_url or default_boundaries_path())
    try:
        st = Path(src).stat()
    except (OSError, ValueError):  # a URL, or a file that is not there (yet)
        return src, None, None
    return src, st.st_mtime_ns, st.st_size


@dataclass
class ProvinceBoundaries:
    """Province polygons keyed by canonical province id; vectorised point-in-polygon lookup."""

    polygons: dict[int, shapely.Geometry]
    source: str
    _prepared: bool = field(default=False, repr=False)

    @classmethod
    def load(cls, path_or_url: str | Path | None = None) -> "ProvinceBoundaries":
        """Read ADM1 polygons; each feature's name (shapeName/shapeISO/NAME_1...) must resolve to a province."""
        import geopandas as gpd

        src = str(path_or_url or default_boundaries_path())
        gdf = gpd.read_file(src)
        if gdf.crs is not None and gdf.crs.to_epsg() != 4326:
            gdf = gdf.to_crs(4326)
        name_col = next((c for c in ("shapeISO", "shapeName", "ISO_1", "NAME_1", "name") if c in gdf.columns), None)
        if name_col is None:
            raise ValueError(f"{src}: no province name column (shapeName, shapeISO, NAME_1 or name)")
        polygons: dict[int, list] = {}
        for name, geom in zip(gdf[name_col], gdf.geometry):
            polygons.setdefault(lookup(str(name)).id, []).append(shapely.make_valid(geom))
        missing = [p.key for p in PROVINCES if p.id not in polygons]
        if missing:
            raise ValueError(f"{src}: no polygon for provinces {missing}")
        # the shipped file is named as the package names it, not by this machine's absolute path
        label = f"{Path(src).name} (shipped with geopak)" if path_or_url is None else src
        return cls({pid: shapely.union_all(geoms) for pid, geoms in polygons.items()}, label)

    def locate(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """Canonical province id per point, ``OUTSIDE`` (-1) for points in no polygon or with NaN coordinates."""
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        if not self._prepared:
            for geom in self.polygons.values():
                shapely.prepare(geom)
            self._prepared = True
        out = np.full(lat.shape, OUTSIDE, dtype=np.int16)
        finite = np.isfinite(lat) & np.isfinite(lon)
        points = shapely.points(lon[finite], lat[finite])
        sub = out[finite]
        for pid, geom in self.polygons.items():
            hit = (sub == OUTSIDE) & shapely.covers(geom, points)
            sub[hit] = pid
        out[finite] = sub
        return out

    def union(self) -> shapely.Geometry:
        return shapely.union_all(list(self.polygons.values()))


@dataclass(frozen=True)
class GazetteerProvinces:
    """Offline fallback: province of the nearest GeoNames place, if it is within ``max_km``; else outside."""

    max_km: float = 60.0
    source: str = "gazetteer fallback (nearest GeoNames place)"
    reason: str = ""  # why the polygons are not in use

    def locate(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        out = np.full(lat.shape, OUTSIDE, dtype=np.int16)
        finite = np.isfinite(lat) & np.isfinite(lon)
        if finite.any():
            idx, dist = nearest_places(lat[finite], lon[finite])
            prov = pakistan_places()["province_id"].to_numpy()[idx].astype(np.int16)
            prov[dist > self.max_km] = OUTSIDE
            out[finite] = prov
        return out


def load_province_locator(
    path_or_url: str | Path | None = None, allow_fallback: bool = True
) -> ProvinceBoundaries | GazetteerProvinces:
    """The configured file's polygons, or ``BoundaryFileError`` with the reason: a configured file is never replaced.

    With none configured, the shipped geoBoundaries file; only if that cannot be read (and ``allow_fallback``) the
    gazetteer fallback, whose ``reason`` the caller records in metadata and a WARN check.
    """
    if path_or_url:
        try:
            return ProvinceBoundaries.load(path_or_url)
        except Exception as err:  # unreadable, missing or malformed file, or an unreachable URL
            reason = f"configured boundary file {str(path_or_url)!r} could not be read: {_why(err)}"
            raise BoundaryFileError(reason) from err
    try:
        return ProvinceBoundaries.load(None)
    except Exception as err:
        shipped = default_boundaries_path()
        reason = f"no boundary file configured and the shipped {shipped} could not be read: {_why(err)}"
        if not allow_fallback:
            raise BoundaryFileError(reason) from err
        return GazetteerProvinces(reason=reason)
