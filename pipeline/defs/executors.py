"""Executors that free what killed runs hold before any step waits on it.

Dagster claims a pool slot before it starts a step, so a sweep inside the step (its resources) comes too late: a
run killed while it held ``flickr_api`` blocks every later crawl of that pool forever. ``sweeping`` wraps an
executor so that, in the run's orchestrating process, dead runs are marked failed and their slots freed before the
first step, again each time a step reports it is blocked on a pool (with a log line naming the holders), and every
``SWEEP_INTERVAL_S`` while the run goes on, so a holder killed while this run waits is freed within that time too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import dagster as dg
from dagster._core.definitions.executor_definition import ExecutorDefinition
from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData
from dagster._core.executor.base import Executor

from pipeline.defs.run_hygiene import pool_holders, sweep_dead_runs

_BLOCKED = "blocked by limit for pool "
SWEEP_INTERVAL_S = float(os.environ.get("GEOPAK_SWEEP_INTERVAL_S", "30"))


class SweepingExecutor(Executor):
    """``inner``, with the dead-run sweep before the first step and at every "blocked on a pool" event."""

    def __init__(self, inner: Executor):
        self.inner = inner

    @property
    def retries(self):  # noqa: ANN201 - Dagster's RetryMode
        return self.inner.retries

    @property
    def step_dependency_config(self):  # noqa: ANN201
        return self.inner.step_dependency_config

    def execute(self, plan_context, execution_plan) -> Iterator[DagsterEvent]:  # noqa: ANN001 - Dagster's types
        yield from self._sweep(plan_context, "before the first step")
        stop = threading.Event()
        watcher = threading.Thread(target=self._sweep_every, args=(plan_context, stop), daemon=True,
                                   name="geopak-dead-run-sweep")
        watcher.start()
        try:
            for event in self.inner.execute(plan_context, execution_plan):
                yield event
                message = event.message or ""
                if event.event_type == DagsterEventType.ENGINE_EVENT and _BLOCKED in message:
                    pool = message.split(_BLOCKED, 1)[1].strip()
                    yield from self._sweep(plan_context, f"while {event.step_key} waits for pool {pool}")
                    yield DagsterEvent.engine_event(plan_context, f"{event.step_key} waits: "
                                                    + pool_holders(plan_context.instance, pool), EngineEventData())
        finally:
            stop.set()
            watcher.join(10.0)

    @staticmethod
    def _sweep_every(plan_context, stop: threading.Event) -> None:  # noqa: ANN001
        """While the run goes on: free what runs killed meanwhile hold (a step of this run may be waiting on it)."""
        while not stop.wait(SWEEP_INTERVAL_S):
            try:
                lines: list[str] = []
                sweep_dead_runs(plan_context.instance, plan_context.run_id, lines.append)
                if lines:
                    plan_context.log.warning("Sweep of dead runs during the run: " + "; ".join(lines))
            except Exception as exc:  # noqa: BLE001 - a failed sweep must not end the run; the next one retries
                plan_context.log.warning(f"Sweep of dead runs failed ({type(exc).__name__}: {exc}); retried later")

    @staticmethod
    def _sweep(plan_context, when: str) -> Iterator[DagsterEvent]:  # noqa: ANN001
        lines: list[str] = []
        failed, freed = sweep_dead_runs(plan_context.instance, plan_context.run_id, lines.append)
        if failed or freed:
            yield DagsterEvent.engine_event(plan_context, f"Sweep of dead runs {when}: " + "; ".join(lines),
                                            EngineEventData(metadata={"runs_marked_failed": len(failed),
                                                                      "runs_whose_slots_were_freed": len(freed)}))


def sweeping(base: ExecutorDefinition) -> ExecutorDefinition:
    """``base`` (same name, config and requirements) with ``SweepingExecutor`` around the executor it creates."""
    create = base.executor_creation_fn
    assert create is not None, f"{base.name} has no creation function"
    return ExecutorDefinition(
        name=base.name,
        config_schema=base.config_schema,
        requirements=base._requirements_fn,  # noqa: SLF001 - the same requirements as the executor it wraps
        executor_creation_fn=lambda init_context: SweepingExecutor(create(init_context)),
        description=f"{base.description or base.name}; frees pool slots of killed runs before a step waits on them",
    )


in_process_sweeping_executor = sweeping(dg.in_process_executor)
multiprocess_sweeping_executor = sweeping(dg.multiprocess_executor)
