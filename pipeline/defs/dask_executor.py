"""The Dask executor's definition (name, config schema): cheap to import, since every load of the code location
does; the executor itself (a subclass of dagster-dask's, and why) is ``pipeline.defs.dask_run``, imported when a
run starts on it.

    execution: {config: {cluster: {existing: {address: "tcp://10.0.0.5:8786"}}}}   # a running scheduler
    execution: {config: {cluster: {local: {n_workers: 2}}}}                         # a LocalCluster in the launcher
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:
    from pipeline.defs.dask_run import GeopakDaskExecutor


@dg.executor(
    name="dask",
    requirements=dg.multiple_process_executor_requirements(),
    config_schema={
        "cluster": dg.Field(dg.Selector({
            "existing": dg.Field({"address": dg.StringSource}, description="Connect to a running scheduler."),
            "local": dg.Field(dg.Permissive(), is_required=False,
                              description="Start a distributed.LocalCluster (its keyword arguments)."),
        }))
    },
)
def geopak_dask_executor(init_context: dg.InitExecutorContext) -> "GeopakDaskExecutor":
    """Each step of the run as a task on a dask.distributed cluster (``pipeline.defs.dask_run`` says how)."""
    from pipeline.defs.dask_run import GeopakDaskExecutor

    ((cluster_type, cluster_configuration),) = init_context.executor_config["cluster"].items()
    return GeopakDaskExecutor(cluster_type, cluster_configuration)
