"""What the legacy and the Places API (New) sources share: one name and folder, the terms' checks on every record
(``places_terms``), the manifest row with its attribution, and the coordinate clock that the tests move forward."""

from __future__ import annotations

import datetime as dt
import json
from abc import abstractmethod
from collections.abc import Callable
from typing import ClassVar

import pandas as pd

from pipeline.sources.crawl import CrawlContext, Source
from pipeline.sources.crawl_state import DEFERRED, CrawlState
from pipeline.sources.http import Redactor
from pipeline.sources.places_terms import (
    COORDINATE_MAX_AGE_DAYS,
    NAME,
    expire_before_crawl,
    judge_within_terms,
    records_without_coordinates,
    refresh_coordinates,
)
from pipeline.sources.places_tiles import check_tile_deg, seed_tiles

LICENSE = "Google Places photo: Maps Platform terms restrict storing and redistributing it"


def attribution_of(record: dict) -> tuple[str | None, str | None]:
    """(owner, attribution) to show with a photo: Places (New) ``authorAttributions`` as the JSON list
    ``[{displayName, uri, photoUri}]`` with ``owner`` their display names joined; a legacy record's
    ``html_attributions`` joined as ``owner`` (no structured attribution)."""
    authors = record.get("attribution")
    if authors is not None:
        names = [a.get("displayName") for a in authors if a.get("displayName")]
        return ", ".join(names) or None, json.dumps(authors, ensure_ascii=False)
    return " ".join(record.get("html_attributions") or []) or None, None


def place_row(record: dict) -> dict:
    """The manifest fields of a Places photo (both APIs): the place's coordinate and who must be credited."""
    owner, attribution = attribution_of(record)
    return {
        "source_url": f"https://www.google.com/maps/place/?q=place_id:{record['place_id']}",
        "lat": record["lat"],
        "lon": record["lon"],
        "geo_accuracy": None,  # the place's coordinate, not the camera's
        "taken_at": None,
        "owner": owner,
        "license": LICENSE,
        "title": None,
        "tags": None,
        "place_id": record["place_id"],
        "attribution": attribution,
        "fetched_at": pd.Timestamp(record["fetched_at"]) if record.get("fetched_at") else pd.NaT,
    }


class PlacesSource(Source):
    """What both Places sources (legacy and New) share: one name and folder, the terms' checks on every record, the
    manifest row with its attribution, and the coordinate clock that the tests move forward."""

    name = NAME
    extra_manifest_columns = ("fetched_at",)
    api_label: ClassVar[str] = "Google Places"
    deferred_tiles: ClassVar[str] = "tiles left for the next run"  # what leaves a tile deferred, in the summary

    def __init__(self, cfg, max_width: int, clock: Callable[[], dt.datetime]):
        """Checks the settings both configs share (``api_key``, tile sizes, ``max_width``, ``refresh_after_days``)
        before any request, so a bad value fails naming its limit."""
        if not cfg.api_key:
            raise ValueError(f"{self.api_label} needs an API key")
        check_tile_deg(cfg.tile_deg, cfg.min_tile_deg)
        if not 1 <= cfg.max_width <= max_width:
            raise ValueError(f"max_width={cfg.max_width}: {self.api_label} serves photos 1 to {max_width} px wide")
        if not 0 < cfg.refresh_after_days < COORDINATE_MAX_AGE_DAYS:
            raise ValueError(f"refresh_after_days must lie in (0, {COORDINATE_MAX_AGE_DAYS:g}): Google's terms")
        self.cfg = cfg
        self.now = clock
        self.redact = Redactor([cfg.api_key])

    def secrets(self) -> list[str]:
        return [self.cfg.api_key]

    def discover(self, ctx: CrawlContext) -> None:
        """Expire what the terms no longer allow, search the province's tiles until none is pending (a capped
        search adds its quarters), then refresh coordinates that are getting old."""
        expire_before_crawl(ctx, self.now())
        self.start(ctx)
        seed_tiles(ctx, self.cfg.tile_deg)
        while self.work_pending(ctx):
            pass
        refresh_coordinates(ctx, self.now, self.cfg.refresh_after_days, lambda p: self.locate(ctx, p))

    def start(self, ctx: CrawlContext) -> None:
        """Before the searches (e.g. read what the state already holds)."""

    @abstractmethod
    def work_pending(self, ctx: CrawlContext) -> bool:
        """Do the pending units (tiles, places) once; False when there were none."""

    @abstractmethod
    def locate(self, ctx: CrawlContext, place_id: str) -> tuple[float, float] | None:
        """The place's current coordinates by ``place_id``; None when the place is gone."""

    def judge(self, records: list[dict], ctx: CrawlContext) -> list[str | None]:
        return judge_within_terms(records, ctx, self.now())

    def summary(self, state: CrawlState) -> dict[str, float]:
        deferred = sum(status == DEFERRED for _, status in state.units("tile:"))
        return {"records with coordinates deleted (terms)": records_without_coordinates(state),
                self.deferred_tiles: float(deferred)}

    def manifest_row(self, record: dict) -> dict:
        return place_row(record)  # owner / attribution must be shown with the photo
