"""Issue 14.2: the main job with dagster-dask's executor on a real dask.distributed cluster (a scheduler and two
workers, separate processes talking TCP on 127.0.0.1, started here). Steps run in the worker processes; the job
must succeed with the same files as the in-process run. A cluster that cannot start FAILS the test with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from pipeline.defs.jobs import DASK_JOB
from tests.cluster_support import REPO, dask_cluster, required, small_main_job_config


@pytest.mark.slow
def test_main_job_on_dask_cluster(tmp_path):
    import dagster as dg

    home = tmp_path / "dagster_home"  # the dask executor needs a persistent instance
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    data = tmp_path / "data"
    config = tmp_path / "run.yaml"
    # workers read the data root from their own environment, as on a real cluster
    worker_env = {"GEOPAK_DATA_ROOT": str(data), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    with required("the Dask cluster"), dask_cluster(workers=2, env=worker_env, log_dir=tmp_path / "dask") as cluster:
        run_config = {**small_main_job_config(),
                      "execution": {"config": {"cluster": {"existing": {"address": cluster.address}}}}}
        config.write_text(yaml.safe_dump(run_config))
        env = {**os.environ, **worker_env, "DAGSTER_HOME": str(home)}
        dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
        proc = subprocess.run([dagster, "job", "execute", "-m", "pipeline.definitions", "-j", DASK_JOB, "-c",
                               str(config)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        from distributed import Client

        with Client(cluster.address, timeout=10, set_as_default=False) as client:
            worker_pids = set(client.run(os.getpid).values())

    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        assert run.job_name == DASK_JOB and run.status == dg.DagsterRunStatus.SUCCESS
        starts = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
        step_pids = {e.dagster_event.pid for e in starts}
        step_keys = {e.step_key for e in starts}  # one step per asset (checks without settings run inside them)
        assert {"sample_world_images", "image_catalog", "filtered_catalog", "labelled_catalog", "dataset_splits",
                "geocells", "cell_assignments", "embedding_cache", "geopak_model", "evaluation_report"} <= step_keys
        assert len(worker_pids) == 2
        # every step ran in a Dask worker process (which of the two is Dask's choice), none in the launcher
        assert step_pids and step_pids <= worker_pids, (step_pids, worker_pids)
    labelled = pd.read_parquet(data / "labels" / "labelled_catalog.parquet")
    assert len(labelled) > 150 and labelled["province_key"].nunique() == 7
    assert (data / "model" / "geopak" / "model.pt").is_file()
    assert len(list((data / "evaluation").glob("*/report.html"))) == 1
