"""The job ``tests/test_soak_kill_rerun.py`` kills and runs again: the project's Flickr crawl, catalog, filter and
labels assets with the project's resources, as one job partitioned by province.

A module of its own, importing only those four stages, because every step process of a multiprocess run imports
it again (the whole code location would cost each of them seconds more). The executor is the project's sweeping
one around Dagster's default, so run config picks multiprocess (the crawl job's and the UI's) or in-process (the
main job's).
"""

from __future__ import annotations

import dagster as dg

from pipeline.defs.crawl import PROVINCE_PARTITIONS, crawl_resources, flickr_photos
from pipeline.defs.executors import sweeping
from pipeline.defs.filtering import filtered_catalog
from pipeline.defs.ingest import image_catalog
from pipeline.defs.labels import labelled_catalog
from pipeline.defs.resources import default_resources

SOAK_JOB = "soak_job"
ASSETS = [flickr_photos, image_catalog, filtered_catalog, labelled_catalog]

soak_job = dg.define_asset_job(
    SOAK_JOB, selection=dg.AssetSelection.assets(*ASSETS), partitions_def=PROVINCE_PARTITIONS,
    executor_def=sweeping(dg.multi_or_in_process_executor))
defs = dg.Definitions(assets=ASSETS, jobs=[soak_job], resources={**default_resources(), **crawl_resources()})
