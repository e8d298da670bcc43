"""The GeoPak Dagster code location: one Definitions object (``dagster dev -m pipeline.definitions``).

On top of the stages' assets: owners, tags and code versions (``defs.ownership``), each source's configuration
status as seen at load (``defs.source_status``), automation conditions, schedules, sensors and crawl freshness
checks (``defs.automation``; every schedule and sensor is STOPPED until turned on in the UI).
"""

from __future__ import annotations

import dagster as dg

from pipeline.defs import automation, crawl, evaluation, filtering, geocells, ingest, labels, model, shards
from pipeline.defs.crawl import SOURCE_OF_ASSET, crawl_resources
from pipeline.defs.executors import multiprocess_sweeping_executor
from pipeline.defs.jobs import JOBS
from pipeline.defs.ownership import with_ownership
from pipeline.defs.resources import default_resources
from pipeline.defs.source_status import with_source_status

resources = {**default_resources(), **crawl_resources()}


def source_reasons() -> dict[str, str | None]:
    """Asset name -> why its source would be skipped now (None: it runs), from the run's own resource logic."""
    reasons: dict[str, str | None] = {name: resources[source].skip_reason() for name, source in SOURCE_OF_ASSET.items()}
    reasons["sample_world_images"] = None  # always available; a run config may set enabled: false
    local = resources["local_source"].config()
    reasons["local_images"] = None if local.enabled else (
        "not configured: set GEOPAK_LOCAL_FOLDER and/or GEOPAK_LOCAL_MANIFEST")
    return reasons


assets = dg.load_assets_from_modules([ingest, filtering, labels, geocells, shards, model, evaluation, crawl])
assets = automation.with_automation_conditions(with_source_status(with_ownership(assets), source_reasons()))

defs = dg.Definitions(
    assets=assets,
    asset_checks=[*dg.load_asset_checks_from_modules([ingest, filtering, labels, geocells, model, evaluation]),
                  *automation.FRESHNESS_CHECKS],
    jobs=[*JOBS, *automation.CRAWL_JOBS.values()],
    schedules=automation.SCHEDULES,
    sensors=automation.SENSORS,
    resources=resources,
    # materializations from the UI and the automation jobs: a killed run's pool slots are freed before steps wait
    executor=multiprocess_sweeping_executor,
)
