"""A run against a real PostgreSQL 15 server started here, with the shipped deploy/dagster-postgres.yaml
(connection from environment variables); runs and materializations are read back from Postgres through the
instance. Wiring, not the pipeline: two real assets (sample world → catalog, ``tests/wiring_defs.py``) on the main
job's executor. No server: the test FAILS with the reason (CI must install postgresql-15)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.cluster_support import REPO, postgres_server, required
from tests.wiring_defs import RUN_CONFIG, STEPS, WIRING_JOB


@pytest.mark.slow
def test_job_on_postgres_instance(tmp_path, monkeypatch):
    import dagster as dg
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster-postgres.yaml", home / "dagster.yaml")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(RUN_CONFIG))
    data = tmp_path / "data"
    with required("PostgreSQL 15"), postgres_server() as pg:
        env = {**os.environ, **pg.env(), "DAGSTER_HOME": str(home), "GEOPAK_DATA_ROOT": str(data),
               "HF_HUB_OFFLINE": "1"}
        dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
        proc = subprocess.run([dagster, "job", "execute", "-f", str(REPO / "tests" / "wiring_defs.py"), "-j",
                               WIRING_JOB, "-c", str(config)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        assert not list(home.glob("**/*.db")), "no SQLite file: the instance lives in Postgres"

        for key, value in pg.env().items():
            monkeypatch.setenv(key, value)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert isinstance(instance.run_storage, PostgresRunStorage)
            assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
            runs = instance.get_runs()
            assert [r.job_name for r in runs] == [WIRING_JOB]
            assert runs[0].status == dg.DagsterRunStatus.SUCCESS
            keys = instance.get_asset_keys()
            assert {dg.AssetKey(k) for k in STEPS} <= set(keys)
            for key in STEPS:
                event = instance.get_latest_materialization_event(dg.AssetKey(key))
                assert event is not None and event.run_id == runs[0].run_id, key
            records = instance.fetch_materializations(dg.AssetKey("image_catalog"), limit=10).records
            assert len(records) == 1
