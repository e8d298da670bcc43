"""Google Places API (New) crawler over its REST wire format: tiles → searchNearby / searchText → photo media.

OPT-IN ONLY (Google's terms restrict storing and redistributing Places content; ``places_terms`` says what is
kept for how long). Since 1 March 2025 a new Google Cloud project can only enable this API ("Places API (New)",
``places.googleapis.com``); the legacy source (``google_places``) stays for keys that still have the old one.

Why REST through our own ``requests`` session and not Google's ``google-maps-places`` client: the session is paced by
the key's token bucket shared by every province's process, retried per call with our backoff, timed out, and its
errors are scrubbed of the key; the API key travels only in the ``X-Goog-Api-Key`` header of requests to the API
host, never in a URL and never to the photo content host (redirects are not followed with the key). The client
(0.9.1) cannot page Text Search, sends the key to the content host when it follows the media redirect, sets no
timeout, and surfaces cut bodies as non-``google.api_core`` errors.

Requests, each with a field mask naming only what is used (a request is billed at the highest SKU its mask touches):

- ``POST /v1/places:searchNearby``, ``locationRestriction.circle`` (the tile's circumcircle, ≤ 50 km), at most
  20 places, no paging; mask ``places.id,places.location,places.photos``: Nearby Search Pro.
- ``POST /v1/places:searchText`` (``search: text``), ``locationRestriction.rectangle`` = the tile, ``pageSize`` 20,
  up to 60 places through ``nextPageToken`` (returned only when the mask names it): Text Search Pro.
- ``GET /v1/places/{id}``, mask ``id,location``: coordinate refresh under the terms, Place Details Essentials;
  mask ``photos``: fresh photo names when a stored one expired, Place Details Essentials (IDs Only).
- ``GET /v1/{photo name}/media?maxWidthPx=…&skipHttpRedirect=true`` → JSON ``{name, photoUri}``: Place Details
  Photos; then ``photoUri`` is downloaded from the content host without the key.

A search that returns its cap (20, or 60) is split into quarters (``places_tiles``). Search results carry up to 10
photos a place with their ``authorAttributions``, so no Place Details call is needed per place. Photo names cannot
be cached: they are dropped from the state once the photo is final, and a stored name that has expired (400
INVALID_ARGUMENT from the media endpoint) is replaced from Place Details, never taken for a broken photo.

Errors are ``google.rpc.Status`` JSON: 403 PERMISSION_DENIED (API not enabled, key restricted or missing, billing)
and 400 API_KEY_INVALID fail the crawl naming the fix (``CredentialsRejected``), never the key; 429
RESOURCE_EXHAUSTED is retried as a rate limit unless it names a daily quota, which stops the crawl cleanly
(``QuotaExhausted``: the remaining work stays in the crawl state, the next run resumes), as does a photo 403 that is
not a JSON refusal (Google's documented quota answer); 5xx, timeouts and cut or invalid bodies are retried.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import requests

from pipeline.sources.crawl import CrawlContext, to_float
from pipeline.sources.crawl_state import DEFERRED, DONE, Unit
from pipeline.sources.downloads import Fetched, read_capped
from pipeline.sources.http import (
    CredentialsRejected,
    HttpSettings,
    HttpStats,
    PermanentHTTPError,
    QuotaExhausted,
    Redactor,
    RetryableStatus,
    StopCrawl,
    TransientError,
    api_session,
    download_session,
)
from pipeline.sources.places_source import PlacesSource
from pipeline.sources.places_terms import iso, utcnow
from pipeline.sources.places_tiles import Tile, split_capped, unit_tile

DEFAULT_BASE_URL = "https://places.googleapis.com"
NEARBY_CAP = 20  # searchNearby: maxResultCount 1-20, no paging
TEXT_PAGE = 20  # searchText: pageSize 1-20 ...
TEXT_CAP = 60  # ... and at most 60 results across its pages
MAX_PHOTOS = 10  # a search returns up to 10 photos a place
MAX_WIDTH = 4800  # Place Photos (New): maxWidthPx 1-4800
SEARCHES = ("nearby", "text")
FORGET_WHEN_FINAL = ("photo_name",)
PHOTO_URI_EXPIRED = "photo_uri_expired"  # retry cause: the content host refused a (short-lived) photoUri
PLACE_MASK = "places.id,places.location,places.photos"
_PHOTO_NAME = re.compile(r"^places/[^/?#]+/photos/[^/?#]+$")
_PLACE_ID = re.compile(r"^[\w-]+$")  # it goes into a URL path: nothing that could leave /v1/places/{id}
_DAILY = re.compile(r"(?i)per[ _-]?day|daily")


@dataclass(frozen=True)
class Sku:
    """A Google Maps Platform SKU: list price per 1,000 billable requests in the first paid tier (up to 100,000 a
    month, after the SKU's free monthly cap), USD, as published in the core services pricing list (2025 model)."""

    name: str
    usd_per_1000: float
    free_per_month: int | None  # None: unlimited


# request kind -> SKU (Places API Usage and Billing; Nearby/Text Search and Place Details field lists)
SKUS: dict[str, Sku] = {
    "searchNearby": Sku("Places API Nearby Search Pro", 32.0, 5_000),  # places.location / places.photos are Pro
    "searchText": Sku("Places API Text Search Pro", 32.0, 5_000),
    "placeDetails:location": Sku("Places API Place Details Essentials", 5.0, 10_000),
    "placeDetails:photos": Sku("Places API Place Details Essentials (IDs Only)", 0.0, None),
    "photoMedia": Sku("Places API Place Details Photos", 7.0, 1_000),
}
BILLABLE = "billable:"  # HttpStats prefix: successful requests per kind


@dataclass(frozen=True)
class PlacesV1Config:
    api_key: str
    base_url: str = DEFAULT_BASE_URL
    queries_per_second: float = 10.0
    search: str = "nearby"  # nearby (circle, ≤ 20 a search) or text (rectangle, ≤ 60 through pages)
    text_query: str = ""  # search: text needs one, e.g. "tourist attraction"
    place_type: str = ""  # a Table A type, e.g. "tourist_attraction"; empty: any
    tile_deg: float = 0.25
    min_tile_deg: float = 0.002  # ~200 m: a nearby search holds 20 places, a city centre has more per km²
    max_photos_per_place: int = MAX_PHOTOS
    max_width: int = 1600
    refresh_after_days: float = 27.0  # re-fetch coordinates this old (< 30: the terms' limit)


class ApiFailure(Exception):
    """A ``google.rpc.Status`` error answer (or a non-JSON error page), already scrubbed of the key."""

    def __init__(self, http_status: int, status: str, reason: str, message: str, metadata: dict | None = None,
                 is_json: bool = True):
        super().__init__(f"HTTP {http_status} {status or '?'}{' ' + reason if reason else ''}: {message}")
        self.http_status, self.status, self.reason, self.message = http_status, status, reason, message
        self.metadata = metadata or {}
        self.is_json = is_json

    @property
    def daily_quota(self) -> bool:
        """A per-day quota (not a per-minute rate limit): ErrorInfo metadata or the message name the day."""
        return bool(_DAILY.search(" ".join([self.message, self.reason, *map(str, self.metadata.values())])))


class PhotoWithdrawn(PermanentHTTPError):
    """The place no longer offers the photo (or the place is gone): a final failure, not a transient one."""

    def __init__(self, detail: str):
        super().__init__(404)
        self.args = (detail,)


def rpc_failure(resp: requests.Response, redact: Redactor) -> ApiFailure:
    """The ``{"error": {code, message, status, details: [ErrorInfo, ...]}}`` body of an error answer."""
    try:
        error = resp.json().get("error")
        if not isinstance(error, dict):
            raise ValueError("no error object")
    except (ValueError, AttributeError):
        text = re.sub(r"<[^>]+>|\s+", " ", resp.text or "").strip()[:200]
        return ApiFailure(resp.status_code, "", "", redact(text or "no body"), is_json=False)
    info = next((d for d in error.get("details") or [] if isinstance(d, dict) and d.get("reason")), {})
    metadata = info.get("metadata") if isinstance(info.get("metadata"), dict) else {}
    return ApiFailure(resp.status_code, str(error.get("status") or ""), str(info.get("reason") or ""),
                      redact(str(error.get("message") or "")), {k: redact(str(v)) for k, v in metadata.items()})


_REFUSAL_FIX = {
    "API_KEY_INVALID": "the key is invalid: check GOOGLE_MAPS_API_KEY (a key of the Google Cloud project, "
                       "APIs & Services > Credentials)",
    "SERVICE_DISABLED": 'enable "Places API (New)" (places.googleapis.com) in the key\'s Google Cloud project',
    "BILLING_DISABLED": "enable billing on the key's Google Cloud project",
    "API_KEY_SERVICE_BLOCKED": "the key's API restrictions block it: allow \"Places API (New)\" "
                               "(places.googleapis.com) for the key",
}


def refusal(failure: ApiFailure, what: str) -> CredentialsRejected | None:
    """The crawl-ending meaning of a refused key (403/401, or 400 API_KEY_INVALID), naming the fix."""
    if not failure.is_json or (failure.http_status not in (401, 403) and failure.reason != "API_KEY_INVALID"):
        return None  # a 403 without a google.rpc.Status (a photo's quota answer) is for the caller to read
    fix = _REFUSAL_FIX.get(failure.reason, 'enable "Places API (New)" (places.googleapis.com) for the key\'s '
                                           "project, allow it in the key's API restrictions, and enable billing")
    return CredentialsRejected(f"Google Places API (New) refused the API key during {what} ({failure}): {fix}")


class PlacesV1Api:
    """The REST calls: one rate-limited session for the API host (key in a header), one for the content host."""

    def __init__(self, cfg: PlacesV1Config, http: HttpSettings, stats: HttpStats, redact: Redactor):
        self.base = cfg.base_url.rstrip("/")
        self.key = cfg.api_key
        self.http, self.stats, self.redact = http, stats, redact
        self.session = api_session(http, stats, cfg.api_key, cfg.queries_per_second)
        self.content = download_session(http, stats)  # no key: the content host never sees it

    def call(self, method: str, path: str, kind: str, mask: str | None, what: str,
             params: dict | None = None, body: dict | None = None) -> dict:
        """One request → its JSON object. Raises ``RetryableStatus``/transport errors (retried by the caller),
        ``QuotaExhausted`` (daily quota), ``CredentialsRejected`` (refused key) or ``ApiFailure`` (other errors)."""
        headers = {"X-Goog-Api-Key": self.key}
        if mask is not None:
            headers["X-Goog-FieldMask"] = mask
        try:
            resp = self.session.request(method, self.base + path, params=params, json=body, headers=headers,
                                        allow_redirects=False)  # a redirect must not carry the key elsewhere
        except RetryableStatus as exc:
            last = self.session.last_response
            if exc.status == 429 and last is not None and (failure := rpc_failure(last, self.redact)).daily_quota:
                raise QuotaExhausted(f"Google Places API (New) daily quota exhausted during {what} ({failure}); the "
                                     "remaining work is kept in the crawl state and the next run (after the quota "
                                     "resets) finishes it") from None
            raise
        if resp.is_redirect and kind == "photoMedia":  # skipHttpRedirect ignored: take the target, not the hop
            self.stats.add(BILLABLE + kind)
            return {"photoUri": resp.headers.get("Location", "")}
        if resp.status_code != 200:
            failure = rpc_failure(resp, self.redact)
            raise refusal(failure, what) or failure
        data = resp.json()  # a cut or garbled body: JSONDecodeError, retried as invalid_json
        if not isinstance(data, dict):
            raise TransientError("invalid_json", f"{what}: expected a JSON object, got {type(data).__name__}")
        self.stats.add(BILLABLE + kind)
        return data

    def search_nearby(self, tile: Tile, place_type: str) -> list[dict]:
        (lat, lon), radius = tile.circle()
        body: dict = {"maxResultCount": NEARBY_CAP, "locationRestriction": {
            "circle": {"center": {"latitude": lat, "longitude": lon}, "radius": float(radius)}}}
        if place_type:
            body["includedTypes"] = [place_type]
        return places_of(self.call("POST", "/v1/places:searchNearby", "searchNearby", PLACE_MASK, "a nearby search",
                                   body=body))

    def search_text(self, tile: Tile, query: str, place_type: str, token: str = "") -> tuple[list[dict], str]:
        """One page of a text search restricted to the tile: (places, next page token or '')."""
        x0, y0, x1, y1 = tile.bbox
        body: dict = {"textQuery": query, "pageSize": TEXT_PAGE, "locationRestriction": {"rectangle": {
            "low": {"latitude": y0, "longitude": x0}, "high": {"latitude": y1, "longitude": x1}}}}
        if place_type:
            body["includedType"] = place_type
        if token:
            body["pageToken"] = token  # every other parameter must be the same as the first page's
        reply = self.call("POST", "/v1/places:searchText", "searchText", PLACE_MASK + ",nextPageToken",
                          "a text search", body=body)
        token = reply.get("nextPageToken")
        return places_of(reply), token if isinstance(token, str) else ""

    def details(self, place_id: str, mask: str, kind: str, what: str) -> dict:
        return self.call("GET", f"/v1/places/{place_id}", kind, mask, what)

    def photo_uri(self, name: str, max_width: int) -> str:
        """The short-lived ``photoUri`` of a photo (``skipHttpRedirect``: JSON instead of a redirect)."""
        reply = self.call("GET", f"/v1/{name}/media", "photoMedia", None, "a photo media request",
                          params={"maxWidthPx": max_width, "skipHttpRedirect": "true"})
        uri = reply.get("photoUri")
        if not isinstance(uri, str) or not uri:
            raise TransientError("invalid_json", "photo media answer without photoUri")
        return "https:" + uri if uri.startswith("//") else uri

    def download(self, uri: str) -> Fetched:
        """The photo bytes from the content host, without the key. A 403 there is the short-lived URI expiring:
        retried (a retry asks for a fresh one); 404/410 are final."""
        if not uri.startswith(("https://", "http://")):
            raise PhotoWithdrawn(f"photoUri is not an http(s) URL: {uri[:80]!r}")
        with self.content.get(uri, stream=True) as resp:
            if resp.status_code == 403:
                raise TransientError(PHOTO_URI_EXPIRED, "the content host refused the photoUri (expired)")
            if resp.status_code != 200:
                raise PermanentHTTPError(resp.status_code)
            return Fetched(read_capped(resp, self.http.max_image_bytes, self.http.body_deadline_s), resp.headers.get("Content-Type"))


def places_of(reply: dict) -> list[dict]:
    places = reply.get("places") or []
    if not isinstance(places, list):
        raise TransientError("invalid_json", "places is not a list")
    return [p for p in places if isinstance(p, dict)]


def location_of(place: dict) -> tuple[float, float]:
    """(lat, lon) of a ``Place.location`` (``google.type.LatLng``); NaN when missing."""
    loc = place.get("location") if isinstance(place.get("location"), dict) else {}
    return to_float(loc.get("latitude")), to_float(loc.get("longitude"))


def authors_of(photo: dict) -> list[dict]:
    """A photo's ``authorAttributions`` as stored: only displayName, uri and photoUri (strings)."""
    out = []
    for a in photo.get("authorAttributions") or []:
        if isinstance(a, dict):
            out.append({k: str(a[k]) for k in ("displayName", "uri", "photoUri") if a.get(k) is not None})
    return out


def photo_records(place: dict, lat: float, lon: float, fetched_at: str,
                  limit: int) -> tuple[list[str], list[dict], int]:
    """(item ids ``<place_id>:<n>``, records, photos skipped for a malformed name) of one search result."""
    place_id = place["id"]
    ids, records, bad = [], [], 0
    for n, photo in enumerate((place.get("photos") or [])[:limit]):
        name = photo.get("name") if isinstance(photo, dict) else None
        if not isinstance(name, str) or not _PHOTO_NAME.match(name) or not name.startswith(f"places/{place_id}/"):
            bad += 1
            continue
        ids.append(f"{place_id}:{n}")
        records.append({"place_id": place_id, "index": n, "lat": lat, "lon": lon, "fetched_at": fetched_at,
                        "photo_name": name, "width": photo.get("widthPx"), "height": photo.get("heightPx"),
                        "attribution": authors_of(photo)})
    return ids, records, bad


def billing_table(stats: dict[str, int]) -> pd.DataFrame:
    """Successful requests per kind this run, their SKU and their cost at list price (before free caps); empty
    when the run made no Places (New) request."""
    rows = [{"request": kind, "sku": sku.name, "requests": stats.get(BILLABLE + kind, 0),
             "usd_per_1000": sku.usd_per_1000, "free_per_month": sku.free_per_month,
             "list_cost_usd": round(stats.get(BILLABLE + kind, 0) * sku.usd_per_1000 / 1000, 4)}
            for kind, sku in SKUS.items()]
    table = pd.DataFrame(rows)
    return table if table["requests"].any() else table.iloc[:0]


class PlacesV1Source(PlacesSource):
    forget_when_final = FORGET_WHEN_FINAL
    api_label = "Google Places API (New)"
    deferred_tiles = "tiles left for the next run (text page refused)"

    def __init__(self, cfg: PlacesV1Config, http: HttpSettings, stats: HttpStats,
                 clock: Callable[[], dt.datetime] = utcnow):
        super().__init__(cfg, MAX_WIDTH, clock)
        if cfg.search not in SEARCHES:
            raise ValueError(f"search={cfg.search!r}: use one of {', '.join(SEARCHES)}")
        if cfg.search == "text" and not cfg.text_query.strip():
            raise ValueError("search=text needs a text_query (e.g. \"tourist attraction\")")
        if not 0 <= cfg.max_photos_per_place <= MAX_PHOTOS:
            raise ValueError(f"max_photos_per_place={cfg.max_photos_per_place}: a search returns 0 to {MAX_PHOTOS}")
        self.http, self.stats = http, stats
        self.api = PlacesV1Api(cfg, http, stats, self.redact)
        self._known: set[str] = set()  # places whose photos are in the state: found again, stored once
        self._stop: StopCrawl | None = None  # quota spent or key refused: later downloads do not ask again
        self._lock = threading.Lock()
        self._fresh: dict[str, list[str] | None] = {}  # place_id -> photo names from Place Details, this run
        self._place_locks: dict[str, threading.Lock] = {}

    def params(self) -> dict:
        c = self.cfg
        return {"api": "new", "search": c.search, "text_query": c.text_query if c.search == "text" else "",
                "place_type": c.place_type, "tile_deg": c.tile_deg, "min_tile_deg": c.min_tile_deg,
                "max_photos_per_place": c.max_photos_per_place, "max_width": c.max_width}

    def _call(self, ctx: CrawlContext, fn: Callable[[], object]):
        """A discovery request with the crawl's retries; a rate limit that outlasts them stops the crawl cleanly."""
        try:
            return ctx.retry(fn, self.classify)
        except RetryableStatus as exc:
            if exc.status != 429:
                raise
            raise QuotaExhausted("Google Places API (New) kept answering 429 RESOURCE_EXHAUSTED after the retries; "
                                 "the remaining work is kept in the crawl state for the next run") from None

    # ------------------------------------------------------------------------------------------------ discovery
    def start(self, ctx: CrawlContext) -> None:
        self._known = {item_id.rsplit(":", 1)[0] for item_id in ctx.state.item_ids()}
        # photos the legacy source found and did not fetch: their position is in the item id, for _fresh_name
        ctx.state.update_records({item_id: {"index": int(item_id.rsplit(":", 1)[1])}
                                  for item_id, record in ctx.state.pending_items() if "index" not in record})

    def work_pending(self, ctx: CrawlContext) -> bool:
        tiles = ctx.state.pending_units("tile:")
        if tiles:
            ctx.info(f"{self.name}/{ctx.province.key}: {len(tiles)} tiles to search ({self.cfg.search}, Places API "
                     "(New))")
        for unit in tiles:
            self._search_tile(ctx, unit)
        return bool(tiles)

    def _search(self, ctx: CrawlContext, tile: Tile) -> tuple[list[dict], int, bool]:
        """(places, the search's cap, complete): complete is False when a later text page was refused."""
        c = self.cfg
        if c.search == "nearby":
            return self._call(ctx, lambda: self.api.search_nearby(tile, c.place_type)), NEARBY_CAP, True
        places, token = self._call(ctx, lambda: self.api.search_text(tile, c.text_query, c.place_type))
        while token and len(places) < TEXT_CAP:
            try:
                page, token = self._call(ctx, lambda t=token: self.api.search_text(tile, c.text_query,
                                                                                    c.place_type, t))
            except ApiFailure as exc:
                if exc.status != "INVALID_ARGUMENT":
                    raise
                ctx.stats.add("places:page_token_refused")
                return places, TEXT_CAP, False
            places += page
        return places, TEXT_CAP, True

    def _search_tile(self, ctx: CrawlContext, unit: Unit) -> None:
        tile = unit_tile(unit)
        places, cap, complete = self._search(ctx, tile)
        fetched_at = iso(self.now())
        with_id = {p["id"]: location_of(p) for p in places if isinstance(p.get("id"), str) and _PLACE_ID.match(p["id"])}
        located = {i: ll for i, ll in with_id.items() if not (math.isnan(ll[0]) or math.isnan(ll[1]))}
        ids = list(located)
        where = ctx.location_reasons([located[i][0] for i in ids], [located[i][1] for i in ids]) if ids else []
        by_id = {p.get("id"): p for p in places}
        item_ids, records, bad, new = [], [], 0, []
        for place_id, verdict in zip(ids, where):
            if verdict is not None or place_id in self._known:  # another province's, or found before
                continue
            new.append(place_id)
            lat, lon = located[place_id]
            got = photo_records(by_id[place_id], lat, lon, fetched_at, self.cfg.max_photos_per_place)
            item_ids += got[0]
            records += got[1]
            bad += got[2]
        keep, rejected = self.sort_items(item_ids, records, ctx)
        children, saturated = split_capped(ctx, tile, len(places) if complete else 0, cap, self.cfg.min_tile_deg)
        reasons_seen = [w for w in where if w is not None]
        ctx.state.complete_unit(unit.unit_id, keep, rejected, new_units=children,
                                status=DONE if complete else DEFERRED, result={
            "results": len(places), "places_in_province": sum(w is None for w in where), "new_places": len(new),
            "places_other_province": reasons_seen.count("other_province"),
            "places_outside_pakistan": reasons_seen.count("outside_pakistan"),
            "places_without_id": len(places) - len(with_id), "places_without_location": len(with_id) - len(ids),
            "photos_found": len(item_ids),
            "photos_with_malformed_name": bad, "split": len(children), "saturated_at_min_size": saturated,
            "incomplete": not complete})
        self._known.update(new)

    def locate(self, ctx: CrawlContext, place_id: str) -> tuple[float, float] | None:
        """Coordinates from Place Details (mask ``id,location``); None when the place is gone (404)."""
        try:
            reply = self._call(ctx, lambda: self.api.details(place_id, "id,location", "placeDetails:location",
                                                             "a coordinate refresh"))
        except ApiFailure as exc:
            if exc.http_status != 404:
                raise
            return None
        return location_of(reply)

    # ------------------------------------------------------------------------------------------------ download
    def fetcher(self, record: dict) -> Callable[[], Fetched]:
        uri: str | None = None  # kept across the retries of this download: each media request is billed

        def fetch() -> Fetched:
            nonlocal uri
            if self._stop is not None:
                raise self._stop
            try:
                uri = uri or self._photo_uri(record)
                return self.api.download(uri)
            except TransientError as exc:
                if exc.cause == PHOTO_URI_EXPIRED:
                    uri = None
                raise
            except StopCrawl as exc:
                with self._lock:
                    self._stop = self._stop or exc
                raise

        return fetch

    def _photo_uri(self, record: dict) -> str:
        """The stored photo name's ``photoUri``; an expired name (400) or none at all (a record written by the
        legacy source) is replaced from Place Details (mask ``photos``) by the photo's position."""
        name = record.get("photo_name")
        if name:
            try:
                return self._media(name)
            except ApiFailure as exc:
                if exc.http_status != 400:
                    raise PhotoWithdrawn(f"photo media answered {exc}") from None
                self.stats.add("places:photo_name_expired")
        return self._media(self._fresh_name(record))

    def _media(self, name: str) -> str:
        try:
            return self.api.photo_uri(name, self.cfg.max_width)
        except ApiFailure as exc:
            if exc.http_status == 403 and not exc.is_json:  # documented: the photo quota is spent
                raise QuotaExhausted(f"Place Photos (New) answered HTTP 403 without a JSON refusal: the photo quota "
                                     f"is exhausted; the remaining photos are kept for the next run ({exc})") from None
            raise

    def _fresh_name(self, record: dict) -> str:
        place_id, index = record["place_id"], int(record.get("index", 0))
        with self._lock:  # one Place Details a place, however many of its photos the workers hold
            place_lock = self._place_locks.setdefault(place_id, threading.Lock())
        with place_lock:
            if place_id not in self._fresh:
                try:
                    reply = self.api.details(place_id, "photos", "placeDetails:photos", "a photo name refresh")
                    self._fresh[place_id] = [p.get("name") for p in reply.get("photos") or [] if isinstance(p, dict)]
                    self.stats.add("places:photo_names_refreshed")
                except ApiFailure as exc:
                    if exc.http_status != 404:
                        raise
                    self._fresh[place_id] = None
            names = self._fresh[place_id]
        if names is None:
            raise PhotoWithdrawn(f"place {place_id} is gone (Place Details 404)")
        if index >= len(names) or not isinstance(names[index], str) or not _PHOTO_NAME.match(names[index]):
            raise PhotoWithdrawn(f"place {place_id} no longer offers photo {index}")
        return names[index]
