"""What Google's terms let a Places crawl keep, for how long: shared by the legacy and the Places API (New) source.

Google Maps Platform Service Specific Terms: ``place_id`` may be kept indefinitely; latitude/longitude may be cached
"for up to 30 consecutive calendar days, after which Customer must delete" them. Photo references (legacy) and photo
names (New) may not be cached at all. So every record carries ``fetched_at`` (UTC) of its coordinates:

- ``refresh_coordinates``: coordinates older than ``refresh_after_days`` (< 30) are fetched again by ``place_id``
  (each source says how: legacy Place Details, or Place Details (New) with the mask ``id,location``);
- ``expire_coordinates``: coordinates 30 days old are deleted from the crawl state, ``place_id`` stays;
- ``expire_stored_places``: the manifest rows of such records move to the rejections (``coordinates_expired``)
  until a refresh brings them back; run on every materialization, crawling or not (no key, no request).

Nothing here calls an API, so the expiry holds even when the source is switched off or its key is gone. What both
Places sources share besides the terms (their base class, the manifest row) is ``places_source``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from pipeline.core import reasons
from pipeline.core.paths import DataPaths
from pipeline.core.processes import exclusive_lock
from pipeline.core.reasons import rejection
from pipeline.core.schema import RAW_MANIFEST_SCHEMA, REJECTIONS_SCHEMA, read_table, write_table
from pipeline.sources.crawl import STAGE, CrawlContext
from pipeline.sources.crawl_state import DONE, REJECTED, CrawlState

NAME = "google_places"  # both APIs write raw/google_places/<province>/ (one asset, one crawl state)
COORDINATE_MAX_AGE_DAYS = 30.0  # Service Specific Terms: lat/lng cached for up to 30 consecutive calendar days

Locate = Callable[[str], "tuple[float, float] | None"]  # place_id -> fresh (lat, lon), None when the place is gone


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).isoformat(timespec="seconds")


def coordinate_age_days(record: dict, now: dt.datetime) -> float:
    """Days since the record's coordinates were fetched; infinite when unknown (a record from before fetched_at)."""
    when = record.get("fetched_at")
    if not when:
        return math.inf
    return (now - dt.datetime.fromisoformat(when)).total_seconds() / 86400.0


def has_coordinates(record: dict) -> bool:
    return record.get("lat") is not None or record.get("lon") is not None


def expire_coordinates(state: CrawlState, now: dt.datetime | None = None,
                       max_age_days: float = COORDINATE_MAX_AGE_DAYS) -> int:
    """Delete (set to null) every cached latitude/longitude older than ``max_age_days``, items and place units
    alike; ``place_id`` stays, so a refresh can bring them back. Returns how many items lost their coordinates."""
    now = now or utcnow()
    items = state.items()
    updates = {
        item_id: {"lat": None, "lon": None, "coordinates_expired_at": iso(now)}
        for item_id, record in zip(items["item_id"], items["record"])
        if has_coordinates(record) and coordinate_age_days(record, now) >= max_age_days
    }
    state.update_records(updates)
    # a finished place unit needs no coordinates; a pending one keeps the search's until they age out
    payloads = {unit.unit_id: {} for unit, status in state.units("place:")
                if "lat" in unit.payload and (status == DONE or coordinate_age_days(unit.payload, now) >= max_age_days)}
    state.set_unit_payloads(payloads)
    return len(updates)


def expired_rows(manifest: pd.DataFrame, now: dt.datetime, max_age_days: float = COORDINATE_MAX_AGE_DAYS) -> pd.Series:
    """Manifest rows whose coordinates are older than the terms allow (or carry no ``fetched_at`` at all)."""
    if "fetched_at" not in manifest.columns:
        return pd.Series(True, index=manifest.index)
    fetched = pd.to_datetime(manifest["fetched_at"], utc=True)
    age = (pd.Timestamp(now) - fetched).dt.total_seconds() / 86400.0
    return fetched.isna() | (age >= max_age_days)


def expire_stored_places(paths: DataPaths, province_key: str, now: dt.datetime | None = None,
                         lock_wait_s: float = 30.0) -> int:
    """Apply the 30-day limit to one province's stored Places data without crawling (no key, no request).

    Deletes expired coordinates from the crawl state and moves expired rows from the manifest to the rejections
    (``coordinates_expired``). Run by the ``google_places_photos`` asset on every materialization, crawling or not,
    so coordinates never outlive the terms on disk just because the source was switched off. Returns rows removed.
    """
    now = now or utcnow()
    state_path = paths.crawl_state(NAME, province_key)
    manifest_path = paths.raw_manifest(NAME, province_key)
    if not state_path.exists() and not manifest_path.exists():
        return 0
    with exclusive_lock(state_path.with_name("crawl.lock"), f"the {NAME}/{province_key} crawl", lock_wait_s):
        if state_path.exists():
            with CrawlState(state_path) as state:
                expire_coordinates(state, now)
        if not manifest_path.exists():
            return 0
        manifest = read_table(manifest_path)
        old = expired_rows(manifest, now)
        if not old.any():
            return 0
        rejections_path = paths.source_rejections(NAME, province_key)
        rejections = read_table(rejections_path) if rejections_path.exists() else None
        new = [rejection(STAGE, row, reasons.COORDINATES_EXPIRED, "coordinates older than 30 days (Google terms)")
               for row in manifest[old].to_dict("records")]
        frames = [f for f in (rejections, pd.DataFrame(new, columns=REJECTIONS_SCHEMA.names)) if f is not None]
        write_table(pd.concat(frames, ignore_index=True), rejections_path, REJECTIONS_SCHEMA)
        write_table(manifest[~old].reset_index(drop=True), manifest_path, RAW_MANIFEST_SCHEMA)
        return int(old.sum())


def terms_report(manifest_path: Path, now: dt.datetime | None = None) -> dict:
    """What the retention check looks at: rows, rows past the 30-day limit, the oldest coordinate's age in days."""
    now = now or utcnow()
    if not Path(manifest_path).exists():
        return {"rows": 0, "expired_rows": 0, "oldest_days": 0.0}
    manifest = read_table(manifest_path)
    old = expired_rows(manifest, now)
    oldest = 0.0
    if len(manifest) and "fetched_at" in manifest.columns and manifest["fetched_at"].notna().any():
        fetched = pd.to_datetime(manifest["fetched_at"], utc=True).min()
        oldest = round((pd.Timestamp(now) - fetched).total_seconds() / 86400.0, 2)
    return {"rows": len(manifest), "expired_rows": int(old.sum()), "oldest_days": oldest}


def judge_within_terms(records: list[dict], ctx: CrawlContext, now: dt.datetime) -> list[str | None]:
    """Location first (missing, another province, outside Pakistan), then ``coordinates_expired`` for records whose
    coordinates are past the 30 days or were deleted for it."""
    located = ctx.judge_located(records, "lat", "lon", lambda r: None)
    return [reasons.COORDINATES_EXPIRED if coordinate_age_days(r, now) >= COORDINATE_MAX_AGE_DAYS
            or r.get("coordinates_expired_at") else v for r, v in zip(records, located)]


def refresh_coordinates(ctx: CrawlContext, now: Callable[[], dt.datetime], refresh_after_days: float,
                        locate: Locate) -> int:
    """Fetch coordinates again, one request per place, for kept items whose coordinates are older than
    ``refresh_after_days`` or were deleted at 30 days; a place that is gone leaves its items without any.
    Returns the places asked for."""
    start = now()
    items = ctx.state.items()
    stale: dict[str, list[str]] = {}
    for item_id, record, status in zip(items["item_id"], items["record"], items["status"]):
        if status != REJECTED and record.get("place_id") and \
                coordinate_age_days(record, start) >= refresh_after_days:
            stale.setdefault(record["place_id"], []).append(item_id)
    if stale:
        ctx.info(f"{NAME}/{ctx.province.key}: refreshing the coordinates of {len(stale)} places")
    for place_id, item_ids in stale.items():
        found = locate(place_id)
        if found is None:
            ctx.state.update_records({i: {"lat": None, "lon": None, "coordinates_expired_at": iso(start)}
                                      for i in item_ids})
            continue
        fresh = {"lat": found[0], "lon": found[1], "fetched_at": iso(now()), "coordinates_expired_at": None}
        ctx.state.update_records({i: fresh for i in item_ids})
        ctx.stats.add("places:coordinates_refreshed")
    return len(stale)


def records_without_coordinates(state: CrawlState) -> float:
    """Kept records whose coordinates were deleted under the terms (for the asset's summary)."""
    items = state.items()
    kept = items[items["status"] != REJECTED]
    return float(sum(not has_coordinates(r) for r in kept["record"]))


def expire_before_crawl(ctx: CrawlContext, now: dt.datetime) -> None:
    """First step of every Places discovery: coordinates past the terms go before anything else is asked."""
    expired = expire_coordinates(ctx.state, now)
    if expired:
        ctx.info(f"{NAME}/{ctx.province.key}: deleted coordinates older than 30 days from {expired} records "
                 "(Google terms); refreshing them by place_id")
