"""Google Places crawler (legacy web service through ``googlemaps``): tiles → nearby search → details → photos.

Kept for keys whose project still has the legacy Places API (``api: legacy``); since 1 March 2025 a new project can
only enable Places API (New), which ``places_v1`` crawls and which is the default. OPT-IN ONLY. Google's Places policies forbid pre-fetching, caching, storing and redistributing Places content
(only ``place_id`` may be kept indefinitely); storing Places photos in a training set needs legal review first.

A province's bbox is cut into square tiles (those touching the province polygon); each tile is one circular nearby
search (radius = the tile's half-diagonal, ≤ 50 km) paged with ``next_page_token`` (valid ~2 s after it is issued).
A search returns at most 60 places, so a tile that returns 60 is split into quarters. Each place in the province whose
search result shows a photo gets one details call for up to 10 photo references; each photo is fetched with
``places_photo`` at ``max_width``.

What the terms limit, and how, is shared with the Places API (New) source (``places_terms``): coordinates are
refreshed from Place Details before 30 days and deleted at 30; ``photo_reference`` is dropped from the state once
the photo is stored (or rejected for good). Tiling and the cap split are shared too (``places_tiles``).

Quota and keys: ``OVER_QUERY_LIMIT`` that outlasts the retries (or names the daily quota) and a Place Photo HTTP 403
(Google's answer when the quota is spent) stop the crawl cleanly (``QuotaExhausted``: the remaining searches,
places and photos stay in the state for the next run); ``REQUEST_DENIED``, or a 403 while Place Details refuses
the key too, fails it naming the problem (``CredentialsRejected``), never the key.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import googlemaps

from pipeline.sources.crawl import CrawlContext, to_float
from pipeline.sources.crawl_state import DEFERRED, DONE, Unit
from pipeline.sources.downloads import Fetched, read_capped
from pipeline.sources.http import (
    CredentialsRejected,
    HttpSettings,
    HttpStats,
    PermanentHTTPError,
    QuotaExhausted,
    StopCrawl,
    api_session,
    call_with_retries,
    classify,
)
from pipeline.sources.places_source import PlacesSource
from pipeline.sources.places_terms import iso, utcnow
from pipeline.sources.places_tiles import Tile, split_capped, unit_tile

DEFAULT_BASE_URL = "https://maps.googleapis.com"
MAX_RESULTS = 60  # 3 pages of 20
MAX_WIDTH = 1600  # the legacy photo maximum
_TRANSIENT_STATUSES = {"OVER_QUERY_LIMIT", "UNKNOWN_ERROR"}
# OVER_QUERY_LIMIT is both "slow down" (rate limit: retried) and "the day's quota or the billing cap is spent"
# (Google's error_message says which): the latter is not retried, the crawl stops for the day
_QUOTA_MESSAGE = re.compile(r"(?i)daily|quota|billing|credit|usage cap")
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
    max_width: int = MAX_WIDTH
    page_token_delay_s: float = 2.0
    page_token_tries: int = 3  # tries of one page token answered INVALID_REQUEST (not ready, or expired)
    search_restarts: int = 1  # a tile whose page token never works is searched again from page 1 this often
    refresh_after_days: float = 27.0  # re-fetch coordinates this old (< 30: the terms' limit) from Place Details


class GooglePlacesSource(PlacesSource):
    forget_when_final = FORGET_WHEN_FINAL
    api_label = "Google Places (legacy)"
    deferred_tiles = "tiles left for the next run (page token expired)"

    def __init__(self, cfg: PlacesConfig, http: HttpSettings, stats: HttpStats,
                 clock: Callable[[], dt.datetime] = utcnow):
        super().__init__(cfg, MAX_WIDTH, clock)
        self.http = http
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
    def work_pending(self, ctx: CrawlContext) -> bool:
        tiles, places = ctx.state.pending_units("tile:"), ctx.state.pending_units("place:")
        if tiles or places:
            ctx.info(f"{self.name}/{ctx.province.key}: {len(tiles)} tiles and {len(places)} places pending")
        for unit in tiles:
            self._search_tile(ctx, unit.unit_id, unit_tile(unit))
        for unit in places:
            self._place_photos(ctx, unit)
        return bool(tiles or places)

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
        now = iso(self.now())
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
        children, saturated = split_capped(ctx, tile, len(results) if complete else 0, MAX_RESULTS,
                                           self.cfg.min_tile_deg)
        new_units = children + [Unit(f"place:{i}", {"lat": found[i][0], "lon": found[i][1], "fetched_at": now})
                      for i in mine if i in with_photos]
        ctx.state.complete_unit(unit_id, new_units=new_units, status=DONE if complete else DEFERRED, result={
            "results": len(results), "places_in_province": len(mine),
            "places_without_photos": sum(1 for i in mine if i not in with_photos), "split": len(children),
            "saturated_at_min_size": saturated,
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
        fetched_at = iso(self.now())
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

    def locate(self, ctx: CrawlContext, place_id: str) -> tuple[float, float] | None:
        """The place's coordinates from Place Details (None when it is gone), for the terms' refresh."""
        try:
            reply = self._call(ctx, lambda: self.client.place(place_id, fields=["geometry/location", "place_id"]),
                               "a coordinate refresh")
        except googlemaps.exceptions.ApiError as exc:
            if exc.status not in ("NOT_FOUND", "ZERO_RESULTS"):
                raise
            return None
        loc = ((reply.get("result") or {}).get("geometry") or {}).get("location") or {}
        return to_float(loc.get("lat")), to_float(loc.get("lng"))

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
                return Fetched(read_capped(resp, self.http.max_image_bytes, self.http.body_deadline_s), resp.headers.get("Content-Type"))
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
