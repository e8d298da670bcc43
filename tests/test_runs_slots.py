"""A killed run's pool slot does not block the next run (issue 21.1).

A real ``dagster job execute`` runs a step in pool ``test_pool`` (limit 1) that never ends and is SIGKILLed: nothing
frees its slot. Before the fix the next run's step logged "Step blocked by limit for pool test_pool" forever. Now
the executor sweeps dead runs before the first step: the next run finishes with no manual step, and says what it
freed; while the first run lived, ``pool_holders`` named it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from pipeline.cli import main as geopak
from pipeline.defs.executors import POOL_WAIT_ENV, in_process_sweeping_executor, multiprocess_sweeping_executor
from pipeline.defs.run_hygiene import pool_holders
from tests.process_support import live_processes, wait_until

REPO = Path(__file__).resolve().parents[1]
READY_ENV = "GEOPAK_TEST_SLOT_READY"
INSTANCE_YAML = "telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 1\n"


@dg.op(pool="test_pool")
def hold_forever() -> None:
    Path(os.environ[READY_ENV]).write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)


@dg.op(pool="test_pool")
def quick() -> None:
    return None


@dg.job(executor_def=in_process_sweeping_executor)
def holder_job() -> None:
    hold_forever()


@dg.job(executor_def=in_process_sweeping_executor)
def next_job() -> None:
    quick()


@dg.job(executor_def=multiprocess_sweeping_executor)
def next_job_multiprocess() -> None:
    quick()


defs = dg.Definitions(jobs=[holder_job, next_job, next_job_multiprocess])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _execute(job: str, env: dict, **kw) -> subprocess.Popen:
    dagster_cli = Path(sys.executable).with_name("dagster")
    return subprocess.Popen([str(dagster_cli), "job", "execute", "-f", __file__, "-j", job], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw)


def _instance_home(tmp_path: Path, **extra: str) -> tuple[Path, Path, dict]:
    """(dagster home, readiness file, environment) for runs against a fresh instance with pool limit 1."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    ready = tmp_path / "ready"
    return home, ready, {**os.environ, "DAGSTER_HOME": str(home), READY_ENV: str(ready), **extra}


def _finish(proc: subprocess.Popen, what: str, timeout: float = 120) -> str:
    """Wait for ``proc`` to end and return its output; kill it and fail saying ``what`` when it outlives the limit."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{what}:\n" + out.decode()[-3000:]) from None
    return out.decode()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()  # type: ignore[union-attr]


def test_killed_run_frees_its_pool_slot_for_the_next_run(tmp_path, capsys):
    home, ready, env = _instance_home(tmp_path)
    holder = _execute("holder_job", env)
    try:
        assert wait_until(lambda: ready.exists() or holder.poll() is not None, 90), "the holder never started"
        assert holder.poll() is None, holder.stdout.read().decode()[-2000:]  # type: ignore[union-attr]
        instance = dg.DagsterInstance.from_config(str(home))
        (run,) = instance.get_runs()
        held = pool_holders(instance, "test_pool")
        assert run.run_id in held and "holder_job" in held and "STARTED since" in held and f"pid {holder.pid}" in held
    finally:
        _kill(holder)
    assert instance.event_log_storage.get_concurrency_info("test_pool").claimed_slots, "the dead run holds the slot"

    nxt = _execute("next_job", env)
    out = _finish(nxt, "the next run waited on the dead run's slot")
    assert nxt.returncode == 0, out[-3000:]
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    (latest,) = [r for r in instance.get_runs() if r.job_name == "next_job"]
    assert latest.status == dg.DagsterRunStatus.SUCCESS
    messages = " ".join(e.message or "" for e in instance.all_logs(latest.run_id))
    assert "Sweep of dead runs before the first step" in messages and run.run_id in messages
    assert not instance.event_log_storage.get_concurrency_info("test_pool").claimed_slots

    assert geopak(["runs", "sweep", "--dagster-home", str(home)]) == 0
    printed = capsys.readouterr().out
    assert "0 runs marked failed, pool slots of 0 runs freed" in printed
    assert "pool test_pool (limit 1): no slot is claimed now" in printed


def test_a_waiting_run_names_the_holder_and_goes_on_once_the_holder_is_killed(tmp_path):
    """The holder is alive when the next run starts, so the next run waits (without spinning: Dagster's loop used
    a full core) and says who it waits for; once the holder is killed, the periodic sweep frees its slot and the
    waiting run finishes."""
    home, ready, env = _instance_home(tmp_path, GEOPAK_SWEEP_INTERVAL_S="1")
    holder = _execute("holder_job", env)
    nxt = None
    try:
        assert wait_until(lambda: ready.exists() or holder.poll() is not None, 90), "the holder never started"
        instance = dg.DagsterInstance.from_config(str(home))
        (run,) = instance.get_runs()
        nxt = _execute("next_job", env)
        waiting = lambda: any(run.run_id in (e.message or "") and "waits: pool test_pool" in (e.message or "")  # noqa: E731
                              for r in instance.get_runs() if r.job_name == "next_job"
                              for e in instance.all_logs(r.run_id))
        assert wait_until(waiting, 90), "the waiting run never named the holder"
        assert nxt.poll() is None, "the next run must wait while the holder lives"
        used = _cpu_seconds(nxt.pid)
        time.sleep(3.0)
        assert _cpu_seconds(nxt.pid) - used < 0.5, "the waiting run spins instead of waiting"
    finally:
        _kill(holder)
    out = _finish(nxt, "the waiting run never got the killed holder's slot")
    assert nxt.returncode == 0, out[-3000:]
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE


def test_a_run_that_waits_on_a_live_holder_past_its_limit_fails_naming_it(tmp_path):
    """No slot for 5 s (GEOPAK_POOL_WAIT_TIMEOUT_S): the waiting run ends FAILURE, in-process and multiprocess
    alike, its event log names the pool and the run that holds it, and it leaves no process and no claim."""
    home, ready, env = _instance_home(tmp_path)
    holder = _execute("holder_job", env)
    waiters: list[subprocess.Popen] = []
    try:
        assert wait_until(lambda: ready.exists() or holder.poll() is not None, 90), "the holder never started"
        instance = dg.DagsterInstance.from_config(str(home))
        (held,) = instance.get_runs()
        waiters = [_execute(job, {**env, POOL_WAIT_ENV: "5"}) for job in ("next_job", "next_job_multiprocess")]
        for waiter in waiters:
            out = _finish(waiter, "a run waited past its pool-wait limit")
            assert waiter.returncode != 0, out[-3000:]
            assert wait_until(lambda: not live_processes(group=waiter.pid), 10), "a failed run left processes"
        assert holder.poll() is None, "the holder is alive: nothing may have freed its slot"
        for job in ("next_job", "next_job_multiprocess"):
            (run,) = [r for r in instance.get_runs() if r.job_name == job]
            assert run.status == dg.DagsterRunStatus.FAILURE
            logs = instance.all_logs(run.run_id)
            reason = [e.message for e in logs if "longer than this run allows" in (e.message or "")]
            assert reason and "quick waited" in reason[0] and "pool test_pool" in reason[0], reason
            assert held.run_id in reason[0] and "holder_job" in reason[0] and POOL_WAIT_ENV in reason[0]
            (failure,) = [e for e in logs if e.dagster_event_type == dg.DagsterEventType.RUN_FAILURE]
            error = failure.dagster_event.event_specific_data.error  # type: ignore[union-attr]
            assert error is not None and held.run_id in error.message, failure
        info = instance.event_log_storage.get_concurrency_info("test_pool")
        assert [slot.run_id for slot in info.claimed_slots] == [held.run_id], "only the live holder holds it"
        assert {step.run_id for step in info.pending_steps} == {held.run_id}, "a failed run left a pending claim"
    finally:
        for proc in [holder, *waiters]:
            _kill(proc)
