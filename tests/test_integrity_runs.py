"""A run whose ``dagster job execute`` process was killed is marked failed at the next launch (issue 12.5).

A real ``dagster job execute`` runs a job that never ends; it is SIGKILLed, so nothing reports the end and the run
stays STARTED. The next launch (any job: the project's executors sweep before the first step) must report it failed, saying
that its process is gone. A run whose process still runs is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from pipeline.defs.executors import in_process_sweeping_executor
from pipeline.defs.run_hygiene import HOST_TAG, PID_TAG, fail_orphaned_runs, orphan_reason
from tests.process_support import wait_until

REPO = Path(__file__).resolve().parents[1]
READY_ENV = "GEOPAK_TEST_HANG_READY"


@dg.op
def hang() -> None:
    """Say it started, then work forever (until killed)."""
    Path(os.environ[READY_ENV]).write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)


@dg.job(executor_def=dg.in_process_executor)
def hang_job() -> None:
    hang()


@dg.op
def noop() -> None:
    return None


@dg.job(executor_def=in_process_sweeping_executor)
def next_job() -> None:
    noop()


defs = dg.Definitions(jobs=[hang_job, next_job])


def _failure_message(instance: dg.DagsterInstance, run_id: str) -> str:
    entries = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    return " ".join(e.message or "" for e in entries)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="checks processes through /proc")
def test_killed_job_execute_run_is_marked_failed_at_next_launch(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    ready = tmp_path / "ready"
    env = {**os.environ, "DAGSTER_HOME": str(home), READY_ENV: str(ready)}
    dagster_cli = Path(sys.executable).with_name("dagster")
    proc = subprocess.Popen([str(dagster_cli), "job", "execute", "-f", __file__, "-j", "hang_job"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert wait_until(lambda: ready.exists() or proc.poll() is not None, 90), "the job never started"
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        instance = dg.DagsterInstance.from_config(str(home))
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.STARTED
        assert orphan_reason(instance, run) is None and fail_orphaned_runs(instance) == [], "a live run is kept"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stderr.close()  # type: ignore[union-attr]
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED, "nobody reported the kill"

    # the next launch of any job: the project's executors sweep before the first step
    result = dg.execute_job(dg.reconstructable(next_job), instance=instance)
    assert result.success
    killed = instance.get_run_by_id(run.run_id)
    assert killed.status == dg.DagsterRunStatus.FAILURE
    message = _failure_message(instance, run.run_id)
    assert f"pid {proc.pid}" in message and "gone" in message and result.run_id in message
    assert fail_orphaned_runs(instance) == [], "reported once"
    assert instance.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS
    tags = instance.get_run_by_id(result.run_id).tags
    assert tags[PID_TAG] == str(os.getpid()) and HOST_TAG in tags, "the executor tags its run once"
