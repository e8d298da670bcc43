"""Google Places crawler (legacy web service through ``googlemaps``): tiles → nearby search → details → photos.

OPT-IN ONLY. Google's Places policies forbid pre-fetching, caching, storing and redistributing Places content
(only ``place_id`` may be kept indefinitely); storing Places photos in a training set needs legal review first.

A province's bbox is cut into square tiles (those touching the province polygon); each tile is one circular nearby
search (radius = the tile's half-diagonal, ≤ 50 km) paged with ``next_page_token`` (valid ~2 s after it is issued).
A search returns at most 60 places, so a tile that returns 60 is split into quarters. Each place in the province whose
search result shows a photo gets one details call for up to 10 photo references; each photo is fetched with
``places_photo`` at ``max_width``.

What the terms limit, and how (Service Specific Terms: latitude/longitude may be cached "for up to 30 consecutive
calendar days, after which Customer must delete" them; ``place_id`` may be kept):
- every record carries ``fetched_at`` (UTC) of its coordinates; coordinates older than ``refresh_after_days``
  (27) are fetched again from Place Details by ``place_id`` at the start of each run; any still older than 30 days
  are deleted from the crawl state (``expire_coordinates``) and their rows leave the manifest
  (``coordinates_expired``) until a refresh brings them back;
- ``photo_reference`` is dropped from the state once the photo is stored (or rejected for good).

Quota and keys: ``OVER_QUERY_LIMIT`` that outlasts the retries (or names the daily quota) and a Place Photo HTTP 403
(Google's answer when the quota is spent) stop the crawl cleanly (``QuotaExhausted``: the remaining searches,
places and photos stay in the state for the next run); ``REQUEST_DENIED``, or a 403 while Place Details refuses
the key too, fails it naming the problem (``CredentialsRejected``), never the key.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import googlemaps
import numpy as np
import pandas as pd

from pipeline.core import reasons
from pipeline.core.catalog import rejection
from pipeline.core.gazetteer import EARTH_RADIUS_KM, unit_vectors
from pipeline.core.paths import DataPaths
from pipeline.core.processes import exclusive_lock
from pipeline.core.schema import RAW_MANIFEST_SCHEMA, REJECTIONS_SCHEMA, read_table, write_table
from pipeline.sources.crawl import STAGE, CrawlContext, Source, to_float
from pipeline.sources.crawl_state import DEFERRED, DONE, REJECTED, CrawlState, Unit
from pipeline.sources.http import (
    CredentialsRejected,
    Fetched,
    HttpSettings,
    HttpStats,
    PermanentHTTPError,
    QuotaExhausted,
    Redactor,
    StopCrawl,
    api_session,
    call_with_retries,
    classify,
    read_capped,
)

DEFAULT_BASE_URL = "https://maps.googleapis.com"
MAX_RADIUS_M = 50_000
MAX_RESULTS = 60  # 3 pages of 20
LICENSE = "Google Places photo: Maps Platform terms restrict storing and redistributing it"
_TRANSIENT_STATUSES = {"OVER_QUERY_LIMIT", "UNKNOWN_ERROR"}
# OVER_QUERY_LIMIT is both "slow down" (rate limit: retried) and "the day's quota or the billing cap is spent"
# (Google's error_message says which): the latter is not retried, the crawl stops for the day
_QUOTA_MESSAGE = re.compile(r"(?i)daily|quota|billing|credit|usage cap")
NAME = "google_places"
COORDINATE_MAX_AGE_DAYS = 30.0  # Service Specific Terms: lat/lng cached for up to 30 consecutive calendar days
FORGET_WHEN_FINAL = ("photo_reference",)


@dataclass(frozen=True)
class PlacesConfig:
    api_key: str
    base_url: str = DEFAULT_BASE_URL
    queries_per_second: float = 10.0
    tile_deg: float = 0.25
    min_tile_deg: float = 0.01
    place_type: str = ""  # e.g. "tourist_attraction"; empty: any
    keyword: str = ""
    max_photos_per_place: int = 10  # details return at most 10
    max_width: int = 1600  # legacy photo maximum
    page_token_delay_s: float = 2.0
    page_token_tries: int = 3  # tries of one page token answered INVALID_REQUEST (not ready, or expired)
    search_restarts: int = 1  # a tile whose page token never works is searched again from page 1 this often
    refresh_after_days: float = 27.0  # re-fetch coordinates this old (< 30: the terms' limit) from Place Details


def _distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    a, b = unit_vectors(np.array([lat1, lat2]), np.array([lon1, lon2]))
    chord = float(np.linalg.norm(a - b))
    return 2.0 * math.asin(min(1.0, chord / 2.0)) * EARTH_RADIUS_KM * 1000.0


@dataclass(frozen=True)
class Tile:
    bbox: tuple[float, float, float, float]  # min_lon, min_lat, max_lon, max_lat

    @property
    def unit_id(self) -> str:
        return "tile:" + ",".join(f"{v:.6f}" for v in self.bbox)

    def payload(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def size_deg(self) -> float:
        return max(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1])

    def circle(self) -> tuple[tuple[float, float], int]:
        """(lat, lon) centre and the radius in metres that covers the whole tile."""
        x0, y0, x1, y1 = self.bbox
        lat, lon = (y0 + y1) / 2, (x0 + x1) / 2
        radius = max(_distance_m(lat, lon, y, x) for x in (x0, x1) for y in (y0, y1))
        return (lat, lon), int(math.ceil(radius))

    def quarters(self) -> list["Tile"]:
        x0, y0, x1, y1 = self.bbox
        xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
        return [Tile(b) for b in ((x0, y0, xm, ym), (xm, y0, x1, ym), (x0, ym, xm, y1), (xm, ym, x1, y1))]


def grid(bbox: tuple[float, float, float, float], tile_deg: float) -> list[Tile]:
    x0, y0, x1, y1 = bbox
    nx, ny = max(1, math.ceil((x1 - x0) / tile_deg)), max(1, math.ceil((y1 - y0) / tile_deg))
    return [Tile((x0 + i * tile_deg, y0 + j * tile_deg, x0 + (i + 1) * tile_deg, y0 + (j + 1) * tile_deg))
            for j in range(ny) for i in range(nx)]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).isoformat(timespec="seconds")


def coordinate_age_days(record: dict, now: dt.datetime) -> float:
    """Days since the record's coordinates were fetched; infinite when unknown (a record from before fetched_at)."""
    when = record.get("fetched_at")
    if not when:
        return math.inf
    return (now - dt.datetime.fromisoformat(when)).total_seconds() / 86400.0


def _has_coordinates(record: dict) -> bool:
    return record.get("lat") is not None or record.get("lon") is not None


def expire_coordinates(state: CrawlState, now: dt.datetime | None = None,
                       max_age_days: float = COORDINATE_MAX_AGE_DAYS) -> int:
    """Delete (set to null) every cached latitude/longitude older than ``max_age_days``, items and place units
    alike; ``place_id`` stays, so a refresh can bring them back. Returns how many items lost their coordinates.

    No API call: this runs even when the source is switched off or its key is gone."""
    now = now or _utcnow()
    items = state.items()
    updates = {
        item_id: {"lat": None, "lon": None, "coordinates_expired_at": _iso(now)}
        for item_id, record in zip(items["item_id"], items["record"])
        if _has_coordinates(record) and coordinate_age_days(record, now) >= max_age_days
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
    now = now or _utcnow()
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
    now = now or _utcnow()
    if not Path(manifest_path).exists():
        return {"rows": 0, "expired_rows": 0, "oldest_days": 0.0}
    manifest = read_table(manifest_path)
    old = expired_rows(manifest, now)
    oldest = 0.0
    if len(manifest) and "fetched_at" in manifest.columns and manifest["fetched_at"].notna().any():
        fetched = pd.to_datetime(manifest["fetched_at"], utc=True).min()
        oldest = round((pd.Timestamp(now) - fetched).total_seconds() / 86400.0, 2)
    return {"rows": len(manifest), "expired_rows": int(old.sum()), "oldest_days": oldest}


class GooglePlacesSource(Source):
    name = NAME
    extra_manifest_columns = ("fetched_at",)
    forget_when_final = FORGET_WHEN_FINAL

    def __init__(self, cfg: PlacesConfig, http: HttpSettings, stats: HttpStats,
                 clock: Callable[[], dt.datetime] = _utcnow):
        if not cfg.api_key:
            raise ValueError("Google Places needs an API key")
        if Tile((0.0, 30.0, cfg.tile_deg, 30.0 + cfg.tile_deg)).circle()[1] > MAX_RADIUS_M:
            raise ValueError(f"tile_deg={cfg.tile_deg} needs a search radius over {MAX_RADIUS_M} m; use ≤ 0.6")
        if not 0 < cfg.refresh_after_days < COORDINATE_MAX_AGE_DAYS:
            raise ValueError(f"refresh_after_days must lie in (0, {COORDINATE_MAX_AGE_DAYS:g}): Google's terms")
        self.cfg = cfg
        self.http = http
        self.now = clock
        self.redact = Redactor([cfg.api_key])
        self.session = api_session(http, stats, cfg.api_key, cfg.queries_per_second)
        # the client's own limiter is switched off (huge quota): the session's token bucket paces requests
        self.client = googlemaps.Client(
            key=cfg.api_key,
            base_url=cfg.base_url.rstrip("/"),
            requests_session=self.session,
            timeout=http.timeout_s,
            queries_per_second=1_000_000,
            queries_per_minute=60_000_000,
            retry_over_query_limit=False,
        )
        self._stop: StopCrawl | None = None  # set by the first photo 403: later downloads do not ask again
        self._stop_lock = threading.Lock()

    def params(self) -> dict:
        c = self.cfg
        return {"tile_deg": c.tile_deg, "min_tile_deg": c.min_tile_deg, "place_type": c.place_type,
                "keyword": c.keyword, "max_photos_per_place": c.max_photos_per_place, "max_width": c.max_width}

    def secrets(self) -> list[str]:
        return [self.cfg.api_key]

    def classify(self, exc: BaseException) -> tuple[str, float | None] | None:
        if isinstance(exc, googlemaps.exceptions.Timeout):
            return "timeout", None
        if isinstance(exc, googlemaps.exceptions.ApiError) and exc.status in _TRANSIENT_STATUSES:
            if exc.status == "OVER_QUERY_LIMIT" and _QUOTA_MESSAGE.search(exc.message or ""):
                return None  # the day's quota: retrying burns time, not quota; _call stops the crawl
            return f"api_{exc.status.lower()}", None
        return classify(exc)

    def _api_failure(self, exc: googlemaps.exceptions.ApiError, what: str) -> StopCrawl | None:
        """The crawl-ending meaning of an API status (quota, refused key), or None for the caller to handle."""
        text = self.redact(f"{exc.status}: {exc.message or 'no error_message'}")
        if exc.status == "OVER_QUERY_LIMIT":
            return QuotaExhausted(f"Google Places quota exhausted during {what} ({text}); the remaining work is "
                                  "kept in the crawl state and the next run (after the quota resets) finishes it")
        if exc.status == "REQUEST_DENIED":
            return CredentialsRejected(f"Google Places refused the API key during {what} ({text}): check "
                                       "GOOGLE_MAPS_API_KEY, that the Places API is enabled for it, and billing")
        return None

    def _call(self, ctx: CrawlContext, fn: Callable, what: str):
        """One API call with the crawl's retries; quota and refused keys become ``StopCrawl``."""
        try:
            return ctx.retry(fn, self.classify)
        except googlemaps.exceptions.ApiError as exc:
            stop = self._api_failure(exc, what)
            if stop is not None:
                raise stop from None
            raise

    # ------------------------------------------------------------------------------------------------ discovery
    def discover(self, ctx: CrawlContext) -> None:
        expired = expire_coordinates(ctx.state, self.now())
        if expired:
            ctx.info(f"google_places/{ctx.province.key}: deleted coordinates older than 30 days from {expired} "
                     "records (Google terms); refreshing them from Place Details")
        reopened = ctx.state.reopen_deferred("tile:")
        if reopened:
            ctx.info(f"google_places/{ctx.province.key}: {reopened} tiles left incomplete last run are searched again")
        if not ctx.state.has_units("tile:"):
            tiles = [t for t in grid(ctx.bbox, self.cfg.tile_deg) if ctx.intersects(t.bbox)]
            ctx.state.add_units([Unit(t.unit_id, t.payload()) for t in tiles])
        while True:
            tiles, places = ctx.state.pending_units("tile:"), ctx.state.pending_units("place:")
            if not (tiles or places):
                break
            ctx.info(f"google_places/{ctx.province.key}: {len(tiles)} tiles and {len(places)} places pending")
            for unit in tiles:
                self._search_tile(ctx, unit.unit_id, Tile(tuple(unit.payload["bbox"])))  # type: ignore[arg-type]
            for unit in places:
                self._place_photos(ctx, unit)
        self._refresh_coordinates(ctx)

    def _search_tile(self, ctx: CrawlContext, unit_id: str, tile: Tile) -> None:
        location, radius = tile.circle()
        results: list[dict] = []
        complete = False
        for _ in range(1 + max(0, self.cfg.search_restarts)):
            reply = self._call(ctx, lambda: self.client.places_nearby(
                location=location, radius=radius, type=self.cfg.place_type or None, keyword=self.cfg.keyword or None
            ), "a nearby search")
            results = list(reply.get("results", []))
            complete = self._follow_pages(ctx, reply, results)
            if complete:
                break
            ctx.stats.add("places:paging_failed")
        now = _iso(self.now())
        found: dict[str, tuple[float, float]] = {}
        with_photos: set[str] = set()
        for r in results:
            loc = (r.get("geometry") or {}).get("location") or {}
            if r.get("place_id"):
                found[r["place_id"]] = (to_float(loc.get("lat")), to_float(loc.get("lng")))
                if r.get("photos"):  # a search result shows a photo when the place has any: no details otherwise
                    with_photos.add(r["place_id"])
        ids = list(found)
        where = ctx.location_reasons([found[i][0] for i in ids], [found[i][1] for i in ids]) if ids else []
        mine = [i for i, w in zip(ids, where) if w is None]
        children = []
        if complete and len(results) >= MAX_RESULTS and tile.size_deg / 2 >= self.cfg.min_tile_deg:
            children = [c for c in tile.quarters() if ctx.intersects(c.bbox)]
        new_units = [Unit(c.unit_id, c.payload()) for c in children]
        new_units += [Unit(f"place:{i}", {"lat": found[i][0], "lon": found[i][1], "fetched_at": now})
                      for i in mine if i in with_photos]
        ctx.state.complete_unit(unit_id, new_units=new_units, status=DONE if complete else DEFERRED, result={
            "results": len(results), "places_in_province": len(mine),
            "places_without_photos": sum(1 for i in mine if i not in with_photos), "split": len(children),
            "saturated_at_min_size": complete and len(results) >= MAX_RESULTS and not children,
            "incomplete": not complete})
        if not complete:
            ctx.info(f"google_places/{ctx.province.key}: a page token stayed invalid; tile {unit_id} is left for "
                     "the next run")

    def _follow_pages(self, ctx: CrawlContext, reply: dict, results: list[dict]) -> bool:
        """Append the next pages' results; False when a page token stayed INVALID_REQUEST (expired or never valid).

        A fresh token is INVALID_REQUEST for about 2 s, so each try waits ``page_token_delay_s`` first; after
        ``page_token_tries`` the token is taken for expired and the caller searches again (or defers the tile)."""
        token = reply.get("next_page_token")
        while token and len(results) < MAX_RESULTS:
            page = None
            for _ in range(max(1, self.cfg.page_token_tries)):
                time.sleep(self.cfg.page_token_delay_s)
                try:
                    page = self._call(ctx, lambda t=token: self.client.places_nearby(page_token=t), "paging")
                    break
                except googlemaps.exceptions.ApiError as exc:
                    if exc.status != "INVALID_REQUEST":
                        raise
                    ctx.stats.add("retry:page_token_not_ready")
            if page is None:
                return False
            results += page.get("results", [])
            token = page.get("next_page_token")
        return True

    def _place_photos(self, ctx: CrawlContext, unit: Unit) -> None:
        place_id = unit.unit_id[len("place:"):]
        try:
            reply = self._call(ctx, lambda: self.client.place(
                place_id, fields=["photo", "geometry/location", "place_id"]), "Place Details")
        except googlemaps.exceptions.ApiError as exc:
            if exc.status in ("NOT_FOUND", "ZERO_RESULTS"):  # the place closed or moved since the search
                ctx.state.complete_unit(unit.unit_id, result={"status": exc.status}, payload={})
                return
            raise
        fetched_at = _iso(self.now())
        result = reply.get("result") or {}
        loc = (result.get("geometry") or {}).get("location") or {}
        lat, lon = to_float(loc.get("lat", unit.payload.get("lat"))), to_float(loc.get("lng", unit.payload.get("lon")))
        photos = (result.get("photos") or [])[: self.cfg.max_photos_per_place]
        ids, records = [], []
        for n, p in enumerate(photos):
            if not p.get("photo_reference"):
                continue
            ids.append(f"{place_id}:{n}")
            records.append({"place_id": place_id, "lat": lat, "lon": lon, "fetched_at": fetched_at,
                            "photo_reference": p["photo_reference"], "width": p.get("width"),
                            "height": p.get("height"), "html_attributions": list(p.get("html_attributions") or [])})
        keep, rejected = self.sort_items(ids, records, ctx)
        ctx.state.complete_unit(unit.unit_id, keep, rejected, result={"photos": len(ids)}, payload={})

    def _refresh_coordinates(self, ctx: CrawlContext) -> None:
        """Fetch coordinates again (Place Details by place_id) for kept items whose coordinates are older than
        ``refresh_after_days`` or were deleted at 30 days; a place that is gone leaves its items without any."""
        now = self.now()
        items = ctx.state.items()
        stale: dict[str, list[str]] = {}
        for item_id, record, status in zip(items["item_id"], items["record"], items["status"]):
            if status != REJECTED and record.get("place_id") and \
                    coordinate_age_days(record, now) >= self.cfg.refresh_after_days:
                stale.setdefault(record["place_id"], []).append(item_id)
        if stale:
            ctx.info(f"google_places/{ctx.province.key}: refreshing the coordinates of {len(stale)} places")
        for place_id, item_ids in stale.items():
            try:
                reply = self._call(ctx, lambda p=place_id: self.client.place(
                    p, fields=["geometry/location", "place_id"]), "a coordinate refresh")
            except googlemaps.exceptions.ApiError as exc:
                if exc.status not in ("NOT_FOUND", "ZERO_RESULTS"):
                    raise
                gone = {i: {"lat": None, "lon": None, "coordinates_expired_at": _iso(now)} for i in item_ids}
                ctx.state.update_records(gone)
                continue
            loc = ((reply.get("result") or {}).get("geometry") or {}).get("location") or {}
            fresh = {"lat": to_float(loc.get("lat")), "lon": to_float(loc.get("lng")), "fetched_at": _iso(self.now()),
                     "coordinates_expired_at": None}
            ctx.state.update_records({i: fresh for i in item_ids})
            ctx.stats.add("places:coordinates_refreshed")

    def judge(self, records: list[dict], ctx: CrawlContext) -> list[str | None]:
        now = self.now()
        located = ctx.judge_located(records, "lat", "lon", lambda r: None)
        return [reasons.COORDINATES_EXPIRED if coordinate_age_days(r, now) >= COORDINATE_MAX_AGE_DAYS
                or r.get("coordinates_expired_at") else v for r, v in zip(records, located)]

    def summary(self, state: CrawlState) -> dict[str, float]:
        items = state.items()
        kept = items[items["status"] != REJECTED]
        deferred = sum(status == DEFERRED for _, status in state.units("tile:"))
        return {"records with coordinates deleted (terms)": float(sum(not _has_coordinates(r)
                                                                      for r in kept["record"])),
                "tiles left for the next run (page token expired)": float(deferred)}

    # ------------------------------------------------------------------------------------------------ download
    def fetcher(self, record: dict) -> Callable[[], Fetched]:
        def fetch() -> Fetched:
            if self._stop is not None:  # quota spent or key refused: do not spend another request
                raise self._stop
            self.client.places_photo(record["photo_reference"], max_width=self.cfg.max_width)
            resp = self.session.last_response  # places_photo only hands out a 1-byte-chunk iterator
            assert resp is not None
            try:
                if resp.status_code == 403:
                    raise self._diagnose_403(record["place_id"])
                if resp.status_code != 200:
                    raise PermanentHTTPError(resp.status_code)
                return Fetched(read_capped(resp, self.http.max_image_bytes), resp.headers.get("Content-Type"))
            finally:
                resp.close()

        return fetch

    def _diagnose_403(self, place_id: str) -> StopCrawl:
        """Place Photo answers 403 both when its quota is spent (documented) and when the key is refused: one
        cheap Place Details call (field place_id only) tells them apart. Asked once per run; later 403s reuse it."""
        with self._stop_lock:
            if self._stop is not None:
                return self._stop
            try:
                call_with_retries(lambda: self.client.place(place_id, fields=["place_id"]), self.http.retry,
                                  self.classify)
                stop: StopCrawl = QuotaExhausted(
                    "Place Photo answered HTTP 403 while Place Details still accepts the key: the Place Photo quota "
                    "is exhausted; the remaining photos are kept in the crawl state for the next run")
            except googlemaps.exceptions.ApiError as exc:
                stop = self._api_failure(exc, "a Place Photo 403 check") or QuotaExhausted(
                    self.redact(f"Place Photo answered HTTP 403 (quota exhausted, per Google); Place Details: {exc}"))
            except Exception as exc:  # the check itself failed: take Google's documented meaning of 403
                stop = QuotaExhausted(self.redact(f"Place Photo answered HTTP 403 (quota exhausted, per Google); "
                                                  f"the key check failed too: {type(exc).__name__}"))
            self._stop = stop
            return stop

    def manifest_row(self, record: dict) -> dict:
        return {
            "source_url": f"https://www.google.com/maps/place/?q=place_id:{record['place_id']}",
            "lat": record["lat"],
            "lon": record["lon"],
            "geo_accuracy": None,  # the place's coordinate, not the camera's
            "taken_at": None,
            "owner": " ".join(record.get("html_attributions") or []) or None,  # must be shown with the photo
            "license": LICENSE,
            "title": None,
            "tags": None,
            "place_id": record["place_id"],
            "fetched_at": pd.Timestamp(record["fetched_at"]) if record.get("fetched_at") else pd.NaT,
        }
