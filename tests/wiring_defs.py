"""Two real assets (sample world → catalog) with the project's resources, for the tests that prove wiring (the
Postgres instance, the Dask executor), not the pipeline: the one full run of the main job is
``tests/test_ui_metadata.py``'s. A module of its own so ``dagster job execute -f`` and every Dask worker import
only these two stages."""

from __future__ import annotations

import dagster as dg

from pipeline.defs.dask_executor import geopak_dask_executor
from pipeline.defs.executors import in_process_sweeping_executor
from pipeline.defs.ingest import image_catalog, sample_world_images
from pipeline.defs.resources import default_resources

WIRING_JOB, WIRING_DASK_JOB = "wiring_job", "wiring_dask_job"
ASSETS = [sample_world_images, image_catalog]
STEPS = {"sample_world_images", "image_catalog"}
RUN_CONFIG = {"ops": {"sample_world_images": {"config": {"n_images": 60, "image_size": 96}}},
              "resources": {"compute": {"config": {"workers": 1}}}}

wiring_job = dg.define_asset_job(WIRING_JOB, selection=dg.AssetSelection.assets(*ASSETS),
                                 executor_def=in_process_sweeping_executor)  # the main job's executor
wiring_dask_job = dg.define_asset_job(WIRING_DASK_JOB, selection=dg.AssetSelection.assets(*ASSETS),
                                      executor_def=geopak_dask_executor)
defs = dg.Definitions(assets=ASSETS, jobs=[wiring_job, wiring_dask_job], resources=default_resources())
