"""The only module that imports Dagster's private ``dagster._*`` names; everything else uses ``import dagster``.

Why one place: private names move between Dagster releases, so an upgrade breaks here or nowhere. Each import
below has no public counterpart in Dagster 1.13 (checked against ``dagster.__all__``); the comment says what it is
for. Where a public API exists (``dg.DagsterEvent``, ``dg.Executor``, ``dg.DagsterInstance`` …) callers use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

# Executors (pipeline.defs.executors, pipeline.defs.dask_executor): an engine event with an error or metadata
# attached, and how Dagster's own executors honour a run's termination while they wait on tasks.
from dagster._core.events import EngineEventData  # noqa: F401 - re-exported
from dagster._core.errors import raise_execution_interrupts  # noqa: F401 - re-exported
from dagster._core.execution.plan.active import ActiveExecution
from dagster._utils import iterate_with_context  # noqa: F401 - re-exported
from dagster._utils.error import serializable_error_info_from_exc_info  # noqa: F401 - re-exported

# The type dg.define_asset_job returns (pipeline.defs.automation annotates with it; not exported by dagster).
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition  # noqa: F401

# The kinds of a run config schema's types (the Launchpad test walks the schema by them; not exported by dagster).
from dagster._config import ConfigTypeKind  # noqa: F401 - re-exported

# The error PipesSubprocessClient.run raises when the subprocess exits non-zero (not exported by dagster).
from dagster._core.errors import DagsterPipesExecutionError  # noqa: F401 - re-exported

IDLE_POLL_S = 0.25


def _pause_when_only_waiting(events: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """``ActiveExecution.concurrency_event_iterator`` (called once per loop of both executors), pausing
    ``IDLE_POLL_S`` after it when steps wait for pool slots and no step is in flight: then the loop has nothing else
    to do and would otherwise spin."""

    def iterate(self: ActiveExecution, plan_context) -> Iterator:  # noqa: ANN001
        yield from events(self, plan_context)
        claims = getattr(self, "_instance_concurrency_context", None)
        if claims is not None and claims.has_pending_claims() and not self.has_in_flight_steps:
            time.sleep(IDLE_POLL_S)

    iterate.geopak_paused = True  # type: ignore[attr-defined] - patched once, however often this module loads
    return iterate


def patch_idle_spin() -> None:
    """Make Dagster's in-process and multiprocess executors pause instead of spinning while every step left waits
    for a pool slot (``pipeline.defs.executors``'s docstring). Dagster offers no hook into that loop, so this
    patches the one method both call per loop; guarded, so it applies once and only while the method exists."""
    current = getattr(ActiveExecution, "concurrency_event_iterator", None)
    if current is None or getattr(current, "geopak_paused", False):
        return
    ActiveExecution.concurrency_event_iterator = _pause_when_only_waiting(current)  # type: ignore[method-assign]
