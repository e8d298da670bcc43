"""The Dask executor itself: a subclass of dagster-dask's, fixed for what GeoPak runs on: each step of a run as a
task on a dask.distributed cluster. Imported only when a run uses it (``pipeline.defs.dask_executor`` defines the
executor and its config; dagster-dask and dask.dataframe cost ~0.6 s of every code-location load otherwise).

``dagster_dask.dask_executor`` (0.29.27) does not work as shipped with the dask/distributed of its own release line:

* ``Client.submit`` walks its arguments (dask's task spec parser iterates every tuple), and Dagster's ``@record``
  objects in the step arguments refuse iteration ("Iteration is not allowed on `@record` RunOpConcurrency"), so
  no run starts. Here the step arguments travel in an opaque box; only the upstream futures stay visible to dask,
  which is what sequences the steps.
* Task keys are ``<job>.<step>``, the same for every run of a job, so a second run of the same job on the same
  cluster got the first run's results instead of running (dagster-io/dagster#21418). Here keys carry the run id.

Everything else is dagster-dask's: the per-step worker function (``query_on_dask_worker``), the
``dagster-dask/resource_requirements`` tag, and the run config shape for the two cluster kinds GeoPak supports
(``pipeline.defs.dask_executor`` shows it).

Steps claim no concurrency-pool slots on this executor (Dagster's pool accounting lives in its own executors);
the data root's stage locks (``DataRootResource.stage_lock``) still keep two runs from writing one stage at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import dagster as dg
from dagster_dask.executor import DaskExecutor, get_dask_resource_requirements, query_on_dask_worker

from pipeline.core.parallel import DASK_CONNECT_TIMEOUT_S
from pipeline.defs.dagster_private import iterate_with_context, raise_execution_interrupts


class _Boxed:
    """Hides a step's arguments from dask's argument parser (it would iterate Dagster's records)."""

    __slots__ = ("args",)

    def __init__(self, args: tuple[Any, ...]):
        self.args = args


def run_step_on_worker(dependencies: list[Any], boxed: _Boxed) -> list[dg.DagsterEvent]:
    """The Dask task: dagster-dask's step runner; ``dependencies`` (upstream results) only order the tasks."""
    return list(query_on_dask_worker(dependencies, *boxed.args))


class GeopakDaskExecutor(DaskExecutor):
    """A subclass of dagster-dask's ``DaskExecutor`` that overrides only ``execute`` (the module docstring says
    why); the cluster configuration, ``build_dict`` and the worker-side step runner are dagster-dask's."""

    def execute(self, plan_context, execution_plan) -> Iterator[dg.DagsterEvent]:  # noqa: ANN001 - Dagster's types
        import dask.distributed

        if not plan_context.instance.is_persistent:
            raise dg.DagsterInvariantViolationError(
                "the Dask executor needs a persistent Dagster instance: set DAGSTER_HOME (Postgres for workers on "
                "other machines, deploy/dagster-postgres.yaml)")
        with contextlib.ExitStack() as owned:
            if self.cluster_type == "existing":
                cluster: Any = self.cluster_configuration["address"]
            else:  # started for this run, so closed with it (its workers and scheduler go too)
                cluster = owned.enter_context(dask.distributed.LocalCluster(**self.build_dict(plan_context.job_name)))
            yield from self._run_on(cluster, plan_context, execution_plan)

    @staticmethod
    def _run_on(cluster: Any, plan_context, execution_plan) -> Iterator[dg.DagsterEvent]:  # noqa: ANN001
        """Submit every step of the plan to ``cluster`` (an address or a LocalCluster) and relay their events."""
        import dask.distributed

        run = plan_context.dagster_run
        instance_ref = plan_context.instance.get_ref()
        try:
            client = dask.distributed.Client(cluster, timeout=DASK_CONNECT_TIMEOUT_S)
        except OSError as exc:  # dask's own says only "Timed out trying to connect"
            raise dg.DagsterInvariantViolationError(
                f"cannot reach the Dask scheduler at {cluster} within {DASK_CONNECT_TIMEOUT_S:g} s (run config "
                f"execution.config.cluster.existing.address): {exc}. Start it, or check the address and that this "
                "machine can reach it") from exc
        with client:
            futures: dict[str, Any] = {}
            for level in execution_plan.get_steps_to_execute_by_level():
                for step in level:
                    upstream = [futures[key] for step_input in step.step_inputs for key in step_input.dependency_keys]
                    args = (plan_context.reconstructable_job, run, plan_context.run_config, [step.key], instance_ref,
                            execution_plan.known_state)
                    futures[step.key] = client.submit(
                        run_step_on_worker, upstream, _Boxed(args),
                        key=f"{plan_context.job_name}.{step.key}.{run.run_id}",  # unique per run (#21418)
                        resources=get_dask_resource_requirements(step.tags),
                    )
            done = dask.distributed.as_completed(list(futures.values()), with_results=True)
            for _future, events in iterate_with_context(raise_execution_interrupts, done):
                yield from events
