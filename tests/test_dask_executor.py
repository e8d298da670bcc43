"""The project's Dask executor on a real dask.distributed cluster (a scheduler and two workers, separate processes
talking TCP on 127.0.0.1, started here). Wiring, not the pipeline: two real assets (sample world → catalog, from
``tests/wiring_defs.py``) whose steps must run in the worker processes and write the same files as in-process. A
cluster that cannot start FAILS the test with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from tests.cluster_support import REPO, dask_cluster, required
from tests.wiring_defs import RUN_CONFIG, STEPS, WIRING_DASK_JOB


@pytest.mark.slow
def test_job_on_dask_cluster(tmp_path):
    import dagster as dg

    home = tmp_path / "dagster_home"  # the dask executor needs a persistent instance
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    data = tmp_path / "data"
    config = tmp_path / "run.yaml"
    # workers read the data root from their own environment, as on a real cluster
    worker_env = {"GEOPAK_DATA_ROOT": str(data), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    with required("the Dask cluster"), dask_cluster(workers=2, env=worker_env, log_dir=tmp_path / "dask") as cluster:
        run_config = {**RUN_CONFIG, "execution": {"config": {"cluster": {"existing": {"address": cluster.address}}}}}
        config.write_text(yaml.safe_dump(run_config))
        env = {**os.environ, **worker_env, "DAGSTER_HOME": str(home)}
        dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
        proc = subprocess.run([dagster, "job", "execute", "-f", str(REPO / "tests" / "wiring_defs.py"), "-j",
                               WIRING_DASK_JOB, "-c", str(config)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        from distributed import Client

        with Client(cluster.address, timeout=10, set_as_default=False) as client:
            worker_pids = set(client.run(os.getpid).values())

    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        assert run.job_name == WIRING_DASK_JOB and run.status == dg.DagsterRunStatus.SUCCESS
        starts = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
        step_pids = {e.dagster_event.pid for e in starts}
        step_keys = {e.step_key for e in starts}  # one step per asset (checks without settings run inside them)
        assert step_keys == STEPS
        assert len(worker_pids) == 2
        # every step ran in a Dask worker process (which of the two is Dask's choice), none in the launcher
        assert step_pids and step_pids <= worker_pids, (step_pids, worker_pids)
    catalog = pd.read_parquet(data / "catalog" / "image_catalog.parquet")
    assert len(catalog) > 40 and set(catalog["source"]) == {"sample_world"}


def test_a_local_cluster_started_for_a_run_is_closed_with_it(monkeypatch):
    """``cluster: {local: ...}`` starts a LocalCluster in the launcher; it is closed when the run ends, failed
    runs included (it used to be left running)."""
    from types import SimpleNamespace

    import dask.distributed

    from pipeline.defs.dask_run import GeopakDaskExecutor

    events: list[str] = []

    class FakeCluster:
        def __init__(self, **kwargs):
            events.append("started")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            events.append("closed")

    def a_step_fails(cluster, plan_context, execution_plan):
        assert isinstance(cluster, FakeCluster) and events == ["started"]
        raise RuntimeError("a step failed")
        yield

    monkeypatch.setattr(dask.distributed, "LocalCluster", FakeCluster)
    monkeypatch.setattr(GeopakDaskExecutor, "_run_on", staticmethod(a_step_fails))
    context = SimpleNamespace(instance=SimpleNamespace(is_persistent=True), job_name="job")
    with pytest.raises(RuntimeError, match="a step failed"):
        list(GeopakDaskExecutor("local", {"n_workers": 1}).execute(context, None))
    assert events == ["started", "closed"]
