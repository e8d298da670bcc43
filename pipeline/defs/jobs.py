"""Jobs. ``run_pipeline_job`` runs every offline stage end to end on the sample world (the CI smoke run)."""

from __future__ import annotations

import dagster as dg

MAIN_JOB = "run_pipeline_job"

run_pipeline_job = dg.define_asset_job(
    MAIN_JOB,
    selection=dg.AssetSelection.groups("sources", "catalog", "labels", "geocells"),
    description="Sample world → catalog → labels → splits and geocells (grows with every stage).",
    executor_def=dg.in_process_executor,
)

JOBS = [run_pipeline_job]
