"""Jobs. ``run_pipeline_job`` runs every offline stage end to end on the sample world (the CI smoke run)."""

from __future__ import annotations

import dagster as dg

MAIN_JOB = "run_pipeline_job"

run_pipeline_job = dg.define_asset_job(
    MAIN_JOB,
    selection=dg.AssetSelection.groups("sources", "catalog", "filter", "labels", "geocells", "model", "evaluation"),
    description="Sample world → catalog → filter → labels → splits and geocells → model → evaluation report.",
    executor_def=dg.in_process_executor,
)

CRAWL_JOB = "crawl_job"

# Partitioned by province, so kept out of the unpartitioned main job. One run per province:
#   dagster job execute -m pipeline.definitions -j crawl_job --tags '{"dagster/partition": "sindh"}'
crawl_job = dg.define_asset_job(
    CRAWL_JOB,
    selection=dg.AssetSelection.groups("crawl"),
    description="Crawl every enabled real source (Flickr, Google Places, YFCC100M, GLDv2) for one province.",
)

JOBS = [run_pipeline_job, crawl_job]
