"""Jobs. ``run_pipeline_job`` runs every offline stage end to end on the sample world (the CI smoke run)."""

from __future__ import annotations

import dagster as dg

MAIN_JOB = "run_pipeline_job"

run_pipeline_job = dg.define_asset_job(
    MAIN_JOB,
    # the "model" group joins once the geocell assets (issue 4) are merged (see README, "The GEOPAK model")
    selection=dg.AssetSelection.groups("sources", "catalog", "labels"),
    description="Sample world → catalog → labels (grows with every stage).",
    executor_def=dg.in_process_executor,
)

JOBS = [run_pipeline_job]
