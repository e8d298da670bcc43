"""GeoPak's code location for a Kubernetes deployment (issue 14.4): everything ``pipeline.definitions`` has, plus
two jobs whose steps each run in their own pod through dagster-k8s's ``k8s_job_executor``, so the training steps
alone land on GPU nodes (per-step pod settings: ``train_gpu_run_config.yaml`` beside this file).

Serve it from the image (Dockerfile, built with ``--build-arg EXTRAS=k8s``):
    dagster api grpc --host 0.0.0.0 --port 4000 --python-file deploy/k8s/definitions.py --working-directory /app
Not exercised here: no cluster, and dagster-k8s is an optional extra (``pip install '.[k8s]'``).
"""

from __future__ import annotations

import dagster as dg
from dagster_k8s import k8s_job_executor

from pipeline.defs.jobs import MAIN_SELECTION
from pipeline.definitions import defs as local_defs

run_pipeline_k8s_job = dg.define_asset_job(
    "run_pipeline_k8s_job", selection=MAIN_SELECTION, executor_def=k8s_job_executor,
    description="The main job, one pod per step (k8s_job_executor); run config: deploy/k8s/train_gpu_run_config.yaml",
)
train_k8s_job = dg.define_asset_job(
    "train_k8s_job", selection=dg.AssetSelection.groups("model", "evaluation"), executor_def=k8s_job_executor,
    description="Embedding cache, training and evaluation, one pod per step; the training step on a GPU node.",
    tags={"dagster/max_runtime": 48 * 3600, "dagster/max_retries": 0},
)

defs = dg.Definitions(
    assets=local_defs.assets,
    asset_checks=local_defs.asset_checks,
    jobs=[*(local_defs.jobs or []), run_pipeline_k8s_job, train_k8s_job],
    schedules=local_defs.schedules,
    sensors=local_defs.sensors,
    resources=local_defs.resources,
)
