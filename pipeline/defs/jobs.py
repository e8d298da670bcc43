"""Jobs. ``run_pipeline_job`` runs every offline stage end to end on the sample world (the CI smoke run)."""

from __future__ import annotations

import dagster as dg

MAIN_JOB = "run_pipeline_job"

run_pipeline_job = dg.define_asset_job(
    MAIN_JOB,
    selection=dg.AssetSelection.groups("sources", "catalog", "filter", "labels"),
    description="Sample world → catalog → filter → labels (grows with every stage).",
    executor_def=dg.in_process_executor,
)

JOBS = [run_pipeline_job]
