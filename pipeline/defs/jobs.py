"""Jobs. ``run_pipeline_job`` runs every offline stage end to end on the sample world (the CI smoke run)."""

from __future__ import annotations

import dagster as dg

from pipeline.defs.dask_executor import geopak_dask_executor
from pipeline.defs.executors import in_process_sweeping_executor, multiprocess_sweeping_executor

MAIN_JOB = "run_pipeline_job"
MAIN_SELECTION = dg.AssetSelection.groups("sources", "catalog", "filter", "labels", "geocells", "model", "evaluation")

run_pipeline_job = dg.define_asset_job(
    MAIN_JOB,
    selection=MAIN_SELECTION,
    description="Sample world → catalog → filter → labels → splits and geocells → model → evaluation report.",
    executor_def=in_process_sweeping_executor,  # killed runs' pool slots are freed before a step waits on them
)

CRAWL_JOB = "crawl_job"

YFCC_DISCOVERY_JOB = "yfcc100m_discovery_job"
YFCC_DISCOVERY = dg.AssetSelection.assets("yfcc100m_candidates")

# Partitioned by province, so kept out of the unpartitioned main job. One run per province:
#   dagster job execute -m pipeline.definitions -j crawl_job --tags '{"dagster/partition": "sindh"}'
# The unpartitioned YFCC100M discovery is not in it: inside a partitioned job a backfill of the seven provinces
# ran it seven times (six of them waiting on its lock). It runs once, in its own job, before the crawl; the
# yfcc100m_photos partitions fail with that instruction while its output is missing or stale.
crawl_job = dg.define_asset_job(
    CRAWL_JOB,
    selection=dg.AssetSelection.groups("crawl") - YFCC_DISCOVERY,
    description="Crawl every enabled real source (Flickr, Google Places, YFCC100M, GLDv2) for one province "
    f"(YFCC100M after {YFCC_DISCOVERY_JOB}).",
    executor_def=multiprocess_sweeping_executor,
)

yfcc100m_discovery_job = dg.define_asset_job(
    YFCC_DISCOVERY_JOB,
    selection=YFCC_DISCOVERY,
    description="One pass over the YFCC100M metadata file: every province's candidates, for crawl_job's "
    "yfcc100m_photos partitions. Run it once before a crawl (again when the file changes).",
    executor_def=in_process_sweeping_executor,
)

DASK_JOB = "run_pipeline_dask_job"

# The main job with each step on a dask.distributed cluster. Name the scheduler in the run config:
#   execution: {config: {cluster: {existing: {address: "tcp://10.0.0.5:8786"}}}}
# (not an {env: ...} value: dagster-dask re-reads the run config on every worker, so the variable would have to be
# set there too). Needs a persistent instance (DAGSTER_HOME; Postgres when workers are on other machines) and workers
# that import this project and see GEOPAK_DATA_ROOT at the same path (deploy/README.md).
run_pipeline_dask_job = dg.define_asset_job(
    DASK_JOB,
    selection=MAIN_SELECTION,
    description="The main job, each step on a Dask cluster (execution.config.cluster.existing.address).",
    executor_def=geopak_dask_executor,  # dagster-dask's, fixed for dask 2026 and concurrent runs
)

JOBS = [run_pipeline_job, crawl_job, yfcc100m_discovery_job, run_pipeline_dask_job]
