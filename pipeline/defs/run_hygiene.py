"""Runs whose process was killed are marked failed at the next launch, instead of staying STARTED forever.

A run launched with ``dagster job execute`` has no daemon watching it: when its process is killed (SIGKILL, OOM,
a closed terminal) nothing reports the end, and the run stays STARTED. The daemon's run monitoring does not help
either: the default run launcher cannot check a run worker's health, so monitoring only times out runs stuck in
STARTING and enforces ``dagster/max_runtime`` tags.

So each launch looks at the instance's STARTED runs, takes the pid of the process that started each (the RUN_START
event records it: the ``job execute`` process, or the run worker a launcher started) and, when that process no
longer runs on this host (or its pid now belongs to a younger process), reports the run failed with the reason.
Runs tagged with another host are left alone. Crawl steps call ``fail_orphaned_runs`` before they start.
"""

from __future__ import annotations

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
