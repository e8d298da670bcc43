"""Owners, tags and code versions of every asset, in one table (applied in ``pipeline.definitions``).

Why: the UI marks an asset and everything downstream *stale* when its code version changes, shows owners on each
asset page, and filters the graph by tag. One table keeps every stage's values side by side.

**Bumping a code version.** When a stage's code changes what it writes (not a refactor), raise its number in
``STAGE_VERSIONS``; the UI then marks that stage and everything downstream stale. Stages whose domain module has
its own version constant (catalog ``ENGINE_VERSION``, filter ``METRICS_VERSION``, sample world
``RENDER_VERSION`` and ``PLAN_VERSION``, YFCC100M ``DISCOVERY_VERSION``) include it, so bumping that constant
marks them stale too.
"""

from __future__ import annotations

import dagster as dg

from pipeline.catalog.build import ENGINE_VERSION
from pipeline.core.shards import FORMAT_VERSION as SHARD_FORMAT_VERSION
from pipeline.defs.crawl import SOURCE_OF_ASSET
from pipeline.core.copies import COPY_VERSION
from pipeline.filters.metrics import METRICS_VERSION
from pipeline.sources.sample_world.config import PLAN_VERSION, RENDER_VERSION
from pipeline.sources.yfcc100m import DISCOVERY_VERSION

DATA_TEAM = "team:geopak-data"
ML_TEAM = "team:geopak-ml"
# group -> (owner, code version). Bump the first number when the stage's own code changes its output.
STAGE_VERSIONS: dict[str, tuple[str, str]] = {
    "sources": (DATA_TEAM, "2"),  # 2: local source reads HEIC and records where each capture time came from
    "crawl": (DATA_TEAM, "2"),  # 2: Places (New), Flickr licences 0-16 and date granularity, YFCC tags and parts
    "catalog": (DATA_TEAM, f"1.engine{ENGINE_VERSION}"),
    "filter": (DATA_TEAM, f"2.metrics{METRICS_VERSION}"),  # 2: a near duplicate lies within the threshold of its kept copy
    "labels": (DATA_TEAM, "2"),  # 2: date_note says why a date has no day-of-year label
    "geocells": (ML_TEAM, "1"),
    # 2: inference settings chosen on val, NLL checkpoint selection, one rebalancing; 3: images read from the shards
    "model": (ML_TEAM, "3"),
    "evaluation": (ML_TEAM, "2"),  # 2: bootstrap intervals, val-chosen baselines, test read once, ledger
}
# assets whose own domain version joins their stage's (bump either to mark them stale)
ASSET_VERSIONS = {
    "sample_world_images": f"render{RENDER_VERSION}.plan{PLAN_VERSION}",
    "yfcc100m_photos": f"discovery{DISCOVERY_VERSION}",
    "yfcc100m_candidates": f"discovery{DISCOVERY_VERSION}",
    "image_shards": f"copy{COPY_VERSION}.format{SHARD_FORMAT_VERSION}",
}
# assets that are one image source: their "source" tag (crawl assets: their crawler's name)
SOURCE_TAGS = {"sample_world_images": "sample_world", "local_images": "local", **SOURCE_OF_ASSET}


def with_ownership(assets: list) -> list:
    """``assets`` with owners, ``stage``/``source`` tags and their stage's code version (province is the
    partition, not a tag)."""

    def add(spec: dg.AssetSpec) -> dg.AssetSpec:
        group = spec.group_name or "default"
        if group not in STAGE_VERSIONS:
            raise KeyError(f"asset {spec.key.to_user_string()} is in group {group!r}, which has no owner and code "
                           f"version in pipeline.defs.ownership.STAGE_VERSIONS")
        owner, version = STAGE_VERSIONS[group]
        name = spec.key.path[-1]
        if name in ASSET_VERSIONS:
            version = f"{version}.{ASSET_VERSIONS[name]}"
        tags = {"stage": group}
        if name in SOURCE_TAGS:
            tags["source"] = SOURCE_TAGS[name]
        return spec.replace_attributes(owners=[owner], code_version=version).merge_attributes(tags=tags)

    return dg.map_asset_specs(add, assets)
