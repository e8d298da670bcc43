"""Runs whose process was killed are marked failed at the next launch, instead of staying STARTED forever.

A run launched with ``dagster job execute`` has no daemon watching it: when its process is killed (SIGKILL, OOM,
a closed terminal) nothing reports the end, and the run stays STARTED. The daemon's run monitoring does not help
either: the default run launcher cannot check a run worker's health, so monitoring only times out runs stuck in
STARTING and enforces ``dagster/max_runtime`` tags.

So each launch looks at the instance's STARTED runs, takes the pid of the process that started each (the RUN_START
event records it: the ``job execute`` process, or the run worker a launcher started) and, when that process no
longer runs on this host (or its pid now belongs to a younger process), reports the run failed with the reason.
Runs tagged with another host are left alone. The run's executor tags it and sweeps once per run, before the
first step (``pipeline.defs.executors``); no resource does it (a resource is set up once per step).

A killed run also keeps the pool slots its steps claimed, and the next run's step would wait for them forever (its
resources, where the sweep used to run, start only once it has the slot). So ``sweep_dead_runs`` also frees the slots
of every run that is no longer running, and it runs where nothing waits yet: in the executor, before the first step
(``pipeline.defs.executors``), again whenever a step reports "blocked by limit for pool", and on demand
(``geopak runs sweep``). ``pool_holders`` says which runs hold a pool and since when.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from pipeline.core.processes import exclusive_lock, launcher_pid, pid_running, process_started_at

HOST_TAG = "geopak/host"
PID_TAG = "geopak/launcher_pid"
PID_SLACK_S = 2.0  # /proc start times are whole clock ticks after a whole-second boot time


def _run_pid(instance: dg.DagsterInstance, run: dg.DagsterRun) -> int | None:
    """The pid that emitted the run's RUN_START event; else the one tagged by ``tag_current_run``."""
    for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_START):
        if entry.dagster_event is not None and entry.dagster_event.pid is not None:
            return int(entry.dagster_event.pid)
    tagged = run.tags.get(PID_TAG, "")
    return int(tagged) if tagged.isdigit() else None


def orphan_reason(instance: dg.DagsterInstance, run: dg.DagsterRun, host: str | None = None) -> str | None:
    """Why ``run`` (STARTED) can no longer be running, or None when its process may still be at work."""
    host = host or socket.gethostname()
    if run.tags.get(HOST_TAG, host) != host:
        return None  # launched on another machine: its process cannot be checked from here
    pid = _run_pid(instance, run)
    if pid is None:
        return None
    if not pid_running(pid):
        return f"its process (pid {pid} on {host}) is gone: it was killed before it could report the end of the run"
    record = instance.get_run_record_by_id(run.run_id)
    started = record.start_time if record is not None else None
    proc_start = process_started_at(pid)
    if started is not None and proc_start is not None and proc_start > started + PID_SLACK_S:
        return (f"its process (pid {pid} on {host}) is gone: that pid now belongs to a process started after the "
                f"run began")
    return None


def tag_current_run(instance: dg.DagsterInstance, run_id: str) -> None:
    """Record this host and the run's launcher pid on the run (the step's parent when it runs in a step worker)."""
    pid = launcher_pid() or os.getpid()
    instance.add_run_tags(run_id, {HOST_TAG: socket.gethostname(), PID_TAG: str(pid)})


def fail_orphaned_runs(
    instance: dg.DagsterInstance, current_run_id: str | None = None, log: Callable[[str], None] | None = None
) -> list[str]:
    """Report every STARTED run of ``instance`` whose process is gone as failed; return their run ids.

    Safe to call from several steps at once: one sweep at a time (a lock in the instance folder), and a run is
    re-read just before it is reported."""
    host = socket.gethostname()
    failed: list[str] = []
    lock = Path(instance.root_directory) / ".geopak-run-sweep.lock"
    with exclusive_lock(lock, "the sweep of killed runs", wait_s=60.0):
        started = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        for run in started:
            if run.run_id == current_run_id:
                continue
            reason = orphan_reason(instance, run, host)
            fresh = instance.get_run_by_id(run.run_id) if reason else None
            if reason is None or fresh is None or fresh.status != dg.DagsterRunStatus.STARTED:
                continue
            by = f" by run {current_run_id}" if current_run_id else ""
            instance.report_run_failed(fresh, f"Marked failed at a later launch{by}: {reason}.")
            failed.append(run.run_id)
            if log is not None:
                log(f"run {run.run_id} ({run.job_name}) was still STARTED but {reason}; marked it failed")
    return failed


def free_slots_of_finished_runs(instance: dg.DagsterInstance, log: Callable[[str], None] | None = None) -> list[str]:
    """Free the pool slots still claimed by runs that are no longer running (killed and since marked failed, or
    ended without freeing them: without a daemon nobody else does). Returns those run ids."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    freed = []
    for run_id in sorted(storage.get_concurrency_run_ids()):
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            continue
        storage.free_concurrency_slots_for_run(run_id)
        freed.append(run_id)
        if log is not None:
            state = run.status.value if run is not None else "deleted"
            log(f"freed the pool slots still held by run {run_id} ({state})")
    return freed


def sweep_dead_runs(
    instance: dg.DagsterInstance, current_run_id: str | None = None, log: Callable[[str], None] | None = None
) -> tuple[list[str], list[str]]:
    """Mark runs whose process is gone failed, then free every finished run's pool slots: (failed, freed)."""
    failed = fail_orphaned_runs(instance, current_run_id, log)
    return failed, free_slots_of_finished_runs(instance, log)


def pool_holders(instance: dg.DagsterInstance, pool: str) -> str:
    """Who holds ``pool``'s slots, for the log of a step waiting on it: run, job, step, status, since when, pid."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    if not info.claimed_slots:
        return f"pool {pool} (limit {info.limit}): no slot is claimed now"
    parts = []
    for slot in info.claimed_slots:
        record = instance.get_run_record_by_id(slot.run_id)
        if record is None:
            parts.append(f"run {slot.run_id} (deleted), step {slot.step_key}")
            continue
        run = record.dagster_run
        since = dt.datetime.fromtimestamp(record.start_time, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") \
            if record.start_time else "not started"
        pid = _run_pid(instance, run)
        where = f", pid {pid} on {run.tags.get(HOST_TAG, 'this host')}" if pid is not None else ""
        parts.append(f"run {slot.run_id} ({run.job_name}, step {slot.step_key}, {run.status.value} since {since}"
                     f"{where})")
    return (f"pool {pool} (limit {info.limit}) is held by " + "; ".join(parts)
            + ". A run whose process is gone is freed automatically; `geopak runs sweep` does it now, "
            "`dagster run delete <run id>` removes a run you know is dead on another host")


def dagster_instance(home: str | Path) -> dg.DagsterInstance:
    """The instance whose folder (``dagster.yaml``) is ``home``."""
    return dg.DagsterInstance.from_config(str(home))
