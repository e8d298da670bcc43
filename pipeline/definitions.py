"""The GeoPak Dagster code location: one Definitions object (``dagster dev -m pipeline.definitions``)."""

from __future__ import annotations

import dagster as dg

from pipeline.defs import crawl, evaluation, filtering, geocells, ingest, labels, model
from pipeline.defs.crawl import crawl_resources
from pipeline.defs.jobs import JOBS
from pipeline.defs.resources import default_resources

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([ingest, filtering, labels, geocells, model, evaluation, crawl]),
    asset_checks=dg.load_asset_checks_from_modules([ingest, filtering, labels, geocells, model, evaluation]),
    jobs=JOBS,
    resources={**default_resources(), **crawl_resources()},
)
