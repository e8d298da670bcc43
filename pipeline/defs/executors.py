"""Executors that free what killed runs hold before any step waits on it.

Dagster claims a pool slot before it starts a step, so a sweep inside the step (its resources) comes too late: a
run killed while it held ``flickr_api`` blocks every later crawl of that pool forever. ``sweeping`` wraps an
executor so that, in the run's orchestrating process, dead runs are marked failed and their slots freed before the
first step, again each time a step reports it is blocked on a pool (with a log line naming the holders), and every
``SWEEP_INTERVAL_S`` while the run goes on, so a holder killed while this run waits is freed within that time too.

A holder that is alive is waited for, but not forever: a step that has waited for a pool slot longer than the
run's limit (``POOL_WAIT_ENV``, run tag ``POOL_WAIT_TAG``; 6 h by default, 0 = no limit) fails the run with the
pool and its holders, instead of leaving it STARTED. Dagster's executors only check for a slot (they never yield
while they wait, and the in-process one never looks at interrupts), so the bound sits on the one call both make
while waiting, the instance's ``claim_concurrency_slot``: raising there unwinds Dagster's own concurrency context,
which drops the step's pending claim, and ends the run FAILURE with the reason.

While they wait, both executors also spin: the in-process one's sleep is ``min(0, ...)`` of the time to the next
claim check (never positive), and the multiprocess one's loop has no sleep when no step runs. A run waiting on a
pool burned a full core until a slot came. ``dagster_private.patch_idle_spin`` makes the loop they share pause
``IDLE_POLL_S`` when every step left waits for a slot and none runs; claims are still checked when Dagster's
backoff says, so a freed slot is taken as soon as before.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping

import dagster as dg

from pipeline.core.processes import wait_limit
from pipeline.defs.dagster_private import (
    EngineEventData,
    patch_idle_spin,
    serializable_error_info_from_exc_info,
)
from pipeline.defs.run_hygiene import pool_holders, sweep_dead_runs, tag_current_run

_BLOCKED = "blocked by limit for pool "
SWEEP_INTERVAL_S = float(os.environ.get("GEOPAK_SWEEP_INTERVAL_S", "30"))
POOL_WAIT_ENV = "GEOPAK_POOL_WAIT_TIMEOUT_S"
POOL_WAIT_TAG = "geopak/pool_wait_timeout_s"
DEFAULT_POOL_WAIT_S = 6 * 3600.0

patch_idle_spin()  # the executors below are Dagster's own loops: make them pause instead of spin (see above)


class PoolWaitTimeout(Exception):
    """A step waited for a pool slot longer than its run allows; the message names the pool's holders."""


def pool_wait_limit(tags: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> float:
    """Seconds a step may wait for a pool slot: the run tag, else the variable, else 6 h; 0 means no limit."""
    if tags.get(POOL_WAIT_TAG, "").strip():
        return wait_limit(tags[POOL_WAIT_TAG], f"run tag {POOL_WAIT_TAG}", DEFAULT_POOL_WAIT_S)
    return wait_limit(environ.get(POOL_WAIT_ENV), POOL_WAIT_ENV, DEFAULT_POOL_WAIT_S)


@contextlib.contextmanager
def bounded_pool_waits(instance: dg.DagsterInstance, run: dg.DagsterRun, limit_s: float) -> Iterator[None]:
    """While inside: a step of ``run`` whose slot claims have been refused for ``limit_s`` raises
    ``PoolWaitTimeout``, after one last sweep of dead runs (a holder that died meanwhile still lets it go on)."""
    storage = instance.event_log_storage
    if limit_s <= 0 or not storage.supports_global_concurrency_limits:
        yield
        return
    claim_slot = storage.claim_concurrency_slot
    refused_since: dict[str, float] = {}

    def claim(concurrency_key: str, run_id: str, step_key: str, priority: int | None = None):  # noqa: ANN202
        status = claim_slot(concurrency_key, run_id, step_key, priority)
        if run_id != run.run_id or status.is_claimed:
            refused_since.pop(step_key, None)
            return status
        since = refused_since.setdefault(step_key, time.monotonic())
        waited = time.monotonic() - since
        if waited < limit_s:
            return status
        sweep_dead_runs(instance, run.run_id)
        status = claim_slot(concurrency_key, run_id, step_key, priority)
        if status.is_claimed:
            refused_since.pop(step_key, None)
            return status
        raise PoolWaitTimeout(
            f"{step_key} waited {dt.timedelta(seconds=round(waited))} for a slot of pool {concurrency_key}, longer "
            f"than this run allows ({limit_s:g} s: run tag {POOL_WAIT_TAG}, else {POOL_WAIT_ENV}; 0 = no limit), "
            f"so the run fails instead of waiting on: {pool_holders(instance, concurrency_key)}. Run it again once "
            f"the holder has finished, or raise the pool's limit (dagster instance concurrency set "
            f"{concurrency_key} N)")

    storage.claim_concurrency_slot = claim  # type: ignore[method-assign] - this process's storage object only
    try:
        yield
    finally:
        if storage.__dict__.get("claim_concurrency_slot") is claim:
            del storage.claim_concurrency_slot


class SweepingExecutor(dg.Executor):
    """``inner``, with the dead-run sweep before the first step and at every "blocked on a pool" event."""

    def __init__(self, inner: dg.Executor):
        self.inner = inner

    @property
    def retries(self):  # noqa: ANN201 - Dagster's RetryMode
        return self.inner.retries

    @property
    def step_dependency_config(self):  # noqa: ANN201
        return self.inner.step_dependency_config

    def execute(self, plan_context, execution_plan) -> Iterator[dg.DagsterEvent]:  # noqa: ANN001 - Dagster's types
        limit_s = pool_wait_limit(plan_context.dagster_run.tags)
        tag_current_run(plan_context.instance, plan_context.run_id)  # the run's own process: host and pid
        yield from self._sweep(plan_context, "before the first step")
        stop = threading.Event()
        watcher = threading.Thread(target=self._sweep_every, args=(plan_context, stop), daemon=True,
                                   name="geopak-dead-run-sweep")
        watcher.start()
        try:
            with bounded_pool_waits(plan_context.instance, plan_context.dagster_run, limit_s):
                for event in self.inner.execute(plan_context, execution_plan):
                    yield event
                    message = event.message or ""
                    if event.event_type == dg.DagsterEventType.ENGINE_EVENT and _BLOCKED in message:
                        pool = message.split(_BLOCKED, 1)[1].strip()
                        yield from self._sweep(plan_context, f"while {event.step_key} waits for pool {pool}")
                        yield dg.DagsterEvent.engine_event(plan_context, f"{event.step_key} waits: "
                                                        + pool_holders(plan_context.instance, pool),
                                                        EngineEventData())
        except PoolWaitTimeout as exc:  # the reason as its own event; Dagster then records the run's failure
            yield dg.DagsterEvent.engine_event(plan_context, str(exc), EngineEventData(
                error=serializable_error_info_from_exc_info(sys.exc_info())))
            raise
        finally:
            stop.set()
            watcher.join(10.0)

    @staticmethod
    def _sweep_every(plan_context, stop: threading.Event) -> None:  # noqa: ANN001
        """While the run goes on: free what runs killed meanwhile hold (a step of this run may be waiting on it)."""
        while not stop.wait(SWEEP_INTERVAL_S):
            try:
                _, _, text = SweepingExecutor._sweep_once(plan_context, "during the run")
                if text:
                    plan_context.log.warning(text)
            except Exception as exc:  # noqa: BLE001 - a failed sweep must not end the run; the next one retries
                plan_context.log.warning(f"Sweep of dead runs failed ({type(exc).__name__}: {exc}); retried later")

    @staticmethod
    def _sweep_once(plan_context, when: str) -> tuple[list[str], list[str], str | None]:  # noqa: ANN001
        """(runs marked failed, runs whose slots were freed, what to log, or None when there was nothing)."""
        lines: list[str] = []
        failed, freed = sweep_dead_runs(plan_context.instance, plan_context.run_id, lines.append)
        return failed, freed, f"Sweep of dead runs {when}: " + "; ".join(lines) if lines else None

    @staticmethod
    def _sweep(plan_context, when: str) -> Iterator[dg.DagsterEvent]:  # noqa: ANN001
        failed, freed, text = SweepingExecutor._sweep_once(plan_context, when)
        if failed or freed:
            yield dg.DagsterEvent.engine_event(plan_context, text, EngineEventData(
                metadata={"runs_marked_failed": len(failed), "runs_whose_slots_were_freed": len(freed)}))


def sweeping(base: dg.ExecutorDefinition) -> dg.ExecutorDefinition:
    """``base`` (same name, config and requirements) with ``SweepingExecutor`` around the executor it creates."""
    create = base.executor_creation_fn
    assert create is not None, f"{base.name} has no creation function"
    return dg.ExecutorDefinition(
        name=base.name,
        config_schema=base.config_schema,
        requirements=base._requirements_fn,  # noqa: SLF001 - the same requirements as the executor it wraps
        executor_creation_fn=lambda init_context: SweepingExecutor(create(init_context)),
        description=f"{base.description or base.name}; frees pool slots of killed runs before a step waits on them",
    )


in_process_sweeping_executor = sweeping(dg.in_process_executor)
multiprocess_sweeping_executor = sweeping(dg.multiprocess_executor)
