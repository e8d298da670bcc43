"""A local fake of Google Places API (New) over its v1 REST wire format, and of the photo content host.

Routes on the API server (``FakeServer``: request log, fault injection): ``POST /v1/places:searchNearby`` (circle
≤ 50 km, ``maxResultCount`` 1-20, no paging), ``POST /v1/places:searchText`` (``textQuery``, rectangle,
``pageSize`` ≤ 20, at most 60 results, ``nextPageToken`` only when the field mask names it, a page token only with
the first page's other parameters), ``GET /v1/places/{id}`` (Place Details) and
``GET /v1/places/{id}/photos/{ref}/media`` (``maxWidthPx``/``maxHeightPx`` 1-4800; ``skipHttpRedirect=true`` →
JSON ``{name, photoUri}``, else a 302 to the content host). Every JSON method requires a field mask and answers only
the fields it names. The key is read from ``X-Goog-Api-Key`` (or ``?key=``, which Google also accepts; tests check
that the crawler never uses it). Errors are ``google.rpc.Status`` JSON shaped like the recordings in
``tests/data/recorded/places_v1``: a missing key 403 PERMISSION_DENIED, a wrong key 400 INVALID_ARGUMENT
(``API_KEY_INVALID``), the API not enabled 403 PERMISSION_DENIED (``SERVICE_DISABLED``), a spent daily quota or a
per-minute limit 429 RESOURCE_EXHAUSTED (``RATE_LIMIT_EXCEEDED``), an expired photo name 400 INVALID_ARGUMENT, a
spent photo quota HTTP 403 with an image (as Place Photos (New) documents). Photo names carry a generation a test
can bump (``V1Control.expire_photo_names``), after which the old names answer 400.
"""

from __future__ import annotations

import json
import random
import secrets
import threading
from dataclasses import dataclass, field
from urllib.parse import unquote

import numpy as np

from geopak_testkit.fake_apis import QUOTA_PNG, FakeServer, Reply, Request, haversine_m, json_reply, unique_jpeg

SERVICE = "places.googleapis.com"
PLACE_FIELDS = ("name", "id", "location", "displayName", "types", "photos")
NEARBY_MAX, TEXT_PAGE_MAX, TEXT_TOTAL_MAX, PHOTOS_MAX = 20, 20, 60, 10


@dataclass
class V1Place:
    place_id: str
    lat: float
    lon: float
    n_photos: int = 3
    prominence: float = 0.0
    place_type: str = "tourist_attraction"


@dataclass
class V1Control:
    """What a test turns while the fake runs, and what it counted.

    ``daily_quota``: JSON requests (searches, details) answered before 429 with a per-day quota; ``photo_quota``:
    media requests answered before HTTP 403 with an image; ``minute_limited``: share of JSON requests answered 429
    with a per-minute limit; ``service_enabled`` False: 403 SERVICE_DISABLED; ``ignore_skip_redirect``: the media
    endpoint redirects even when asked for JSON."""

    daily_quota: int | None = None
    photo_quota: int | None = None
    minute_limited: float = 0.0
    service_enabled: bool = True
    ignore_skip_redirect: bool = False
    json_requests: int = 0
    media_requests: int = 0
    generation: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    rng: random.Random = field(default_factory=lambda: random.Random(7), repr=False)

    def expire_photo_names(self, place_ids) -> None:
        """Every photo name handed out so far for these places answers 400 INVALID_ARGUMENT from now on."""
        with self.lock:
            for p in place_ids:
                self.generation[p] = self.generation.get(p, 0) + 1

    def photo_ref(self, place_id: str, index: int) -> str:
        return f"AUac{place_id}x{index}g{self.generation.get(place_id, 0)}"


def rpc_error(code: int, status: str, message: str, reason: str = "", **metadata: str) -> Reply:
    """A google.rpc.Status error body (with an ErrorInfo when there is a reason)."""
    error: dict = {"code": code, "message": message, "status": status}
    if reason:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                             "domain": "googleapis.com", "metadata": {"service": SERVICE, **metadata}}]
    return json_reply({"error": error}, code)


def invalid(message: str) -> Reply:
    return rpc_error(400, "INVALID_ARGUMENT", message)


def quota_error(method: str, per: str) -> Reply:
    return rpc_error(429, "RESOURCE_EXHAUSTED",
                     f"Quota exceeded for quota metric '{method} requests' and limit '{method} requests per {per}' "
                     f"of service '{SERVICE}' for consumer 'project_number:123456789'.", "RATE_LIMIT_EXCEEDED",
                     quota_limit=f"{method}RequestsPer{per.title()}PerProject", consumer="projects/123456789")


def places_v1_routes(api: FakeServer, content: FakeServer, places: list[V1Place], api_key: str,
                     control: V1Control | None = None) -> V1Control:
    """Install the v1 routes on ``api`` and the photo bytes on ``content``; returns the control to turn."""
    ctl = control or V1Control()
    lat = np.array([p.lat for p in places])
    lon = np.array([p.lon for p in places])
    by_id = {p.place_id: p for p in places}
    order = sorted(range(len(places)), key=lambda i: -places[i].prominence)
    tokens: dict[str, tuple[str, int]] = {}
    tokens_lock = threading.Lock()

    def refused(req: Request) -> Reply | None:
        key = req.headers.get("x-goog-api-key") or req.params.get("key")
        if not key:
            return rpc_error(403, "PERMISSION_DENIED", "The request is missing a valid API key.")
        if key != api_key:
            return rpc_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
                             "API_KEY_INVALID")
        if not ctl.service_enabled:
            return rpc_error(403, "PERMISSION_DENIED", "Places API (New) has not been used in project 123456789 "
                             "before or it is disabled. Enable it by visiting https://console.developers.google.com/"
                             "apis/api/places.googleapis.com/overview?project=123456789 then retry.",
                             "SERVICE_DISABLED", consumer="projects/123456789")
        return None

    def metered(req: Request, method: str) -> Reply | None:
        """Key, then the daily quota and the per-minute limit of a JSON method."""
        if (bad := refused(req)) is not None:
            return bad
        with ctl.lock:
            ctl.json_requests += 1
            over = ctl.daily_quota is not None and ctl.json_requests > ctl.daily_quota
            limited = ctl.minute_limited and ctl.rng.random() < ctl.minute_limited
        if over:
            return quota_error(method, "day")
        if limited:
            return quota_error(method, "minute")
        return None

    def mask_of(req: Request, prefix: str, extra: tuple[str, ...] = ()) -> set[str] | Reply:
        raw = req.headers.get("x-goog-fieldmask") or req.params.get("fields") or req.params.get("$fields")
        if not raw:
            return invalid("FieldMask is a required parameter. See https://cloud.google.com/apis/docs/system-"
                           "parameters on how to provide it. As an example, you can set the header "
                           "'X-Goog-FieldMask' to value 'places.displayName'.")
        paths = raw.split(",")
        allowed = {prefix + f for f in PLACE_FIELDS} | {"*", prefix.rstrip(".") or "*", *extra}
        unknown = [p for p in paths if p not in allowed]
        if unknown or " " in raw:
            return invalid(f"Invalid field: {(unknown or [raw])[0]}")
        if "*" in paths or (prefix and prefix.rstrip(".") in paths):
            return {*PLACE_FIELDS, *extra}
        return {p[len(prefix):] if p.startswith(prefix) else p for p in paths}

    def photo(p: V1Place, i: int) -> dict:
        authors = [] if i % 7 == 6 else [{  # authorAttributions is always present, and may be empty
            "displayName": f"Contributor {i} of {p.place_id}", "uri": f"//maps.google.com/maps/contrib/{10000 + i}",
            "photoUri": f"//lh3.googleusercontent.com/a-/contrib{i}=s100-p-k-no-mo"}]
        return {"name": f"places/{p.place_id}/photos/{ctl.photo_ref(p.place_id, i)}", "widthPx": 4032,
                "heightPx": 3024, "authorAttributions": authors}

    def place_json(p: V1Place, fields: set[str]) -> dict:
        full = {"name": f"places/{p.place_id}", "id": p.place_id,
                "location": {"latitude": p.lat, "longitude": p.lon},
                "displayName": {"text": f"Place {p.place_id}", "languageCode": "en"},
                "types": [p.place_type, "point_of_interest", "establishment"],
                "photos": [photo(p, i) for i in range(min(p.n_photos, PHOTOS_MAX))]}
        if not full["photos"]:
            del full["photos"]  # a place without photos has no photos field
        return {k: v for k, v in full.items() if k in fields}

    def body_of(req: Request) -> dict | Reply:
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            return invalid("Invalid JSON payload received.")
        return body if isinstance(body, dict) else invalid("Invalid JSON payload received.")

    def of_type(i: int, wanted: list[str]) -> bool:
        return not wanted or places[i].place_type in wanted

    def search_nearby(req: Request) -> Reply:
        if (bad := metered(req, "SearchNearby")) is not None:
            return bad
        fields, body = mask_of(req, "places."), body_of(req)
        if isinstance(fields, Reply) or isinstance(body, Reply):
            return fields if isinstance(fields, Reply) else body  # type: ignore[return-value]
        circle = (body.get("locationRestriction") or {}).get("circle")
        if not circle:
            return invalid("locationRestriction is required.")
        centre, radius = circle.get("center") or {}, float(circle.get("radius") or 0.0)
        count = int(body.get("maxResultCount") or NEARBY_MAX)
        if not 0 < radius <= 50_000:
            return invalid("locationRestriction.circle.radius must be greater than 0 and at most 50000.")
        if not 1 <= count <= NEARBY_MAX:
            return invalid("maxResultCount must be between 1 and 20.")
        d = haversine_m(float(centre.get("latitude")), float(centre.get("longitude")), lat, lon)
        hits = [i for i in order if d[i] <= radius and of_type(i, body.get("includedTypes") or [])][:count]
        return json_reply({"places": [place_json(places[i], fields) for i in hits]} if hits else {})

    def search_text(req: Request) -> Reply:
        if (bad := metered(req, "SearchText")) is not None:
            return bad
        fields, body = mask_of(req, "places.", ("nextPageToken",)), body_of(req)
        if isinstance(fields, Reply) or isinstance(body, Reply):
            return fields if isinstance(fields, Reply) else body  # type: ignore[return-value]
        if not body.get("textQuery"):
            return invalid("textQuery is required.")
        size = min(int(body.get("pageSize") or TEXT_PAGE_MAX), TEXT_PAGE_MAX)
        same = json.dumps({k: v for k, v in body.items() if k not in ("pageSize", "pageToken", "maxResultCount")},
                          sort_keys=True)
        offset = 0
        if body.get("pageToken"):
            with tokens_lock:
                entry = tokens.get(body["pageToken"])
            if entry is None or entry[0] != same:
                return invalid("The page token is invalid, or the request parameters differ from the first page's.")
            offset = entry[1]
        rect = (body.get("locationRestriction") or {}).get("rectangle") or {}
        low, high = rect.get("low") or {}, rect.get("high") or {}
        inside = (lat >= low.get("latitude", -90)) & (lat <= high.get("latitude", 90)) & \
                 (lon >= low.get("longitude", -180)) & (lon <= high.get("longitude", 180))
        wanted = [body["includedType"]] if body.get("includedType") else []
        hits = [i for i in order if inside[i] and of_type(i, wanted)][:TEXT_TOTAL_MAX]
        out: dict = {"places": [place_json(places[i], fields) for i in hits[offset:offset + size]]}
        if offset + size < len(hits) and "nextPageToken" in fields:  # only when the mask names it
            token = secrets.token_urlsafe(48)
            with tokens_lock:
                tokens[token] = (same, offset + size)
            out["nextPageToken"] = token
        return json_reply(out if out["places"] else {k: v for k, v in out.items() if k != "places"})

    def place_or_media(req: Request) -> Reply:
        parts = unquote(req.path).split("/")  # ['', 'v1', 'places', id] or [..., id, 'photos', ref, 'media']
        if len(parts) == 7 and parts[4] == "photos" and parts[6] == "media":
            return media(req, parts[3], parts[5])
        if len(parts) != 4:
            return rpc_error(404, "NOT_FOUND", "Method not found.")
        if (bad := metered(req, "GetPlace")) is not None:
            return bad
        fields = mask_of(req, "")
        if isinstance(fields, Reply):
            return fields
        p = by_id.get(parts[3])
        if p is None:
            return rpc_error(404, "NOT_FOUND", "Requested entity was not found.")
        return json_reply(place_json(p, fields))

    def media(req: Request, place_id: str, ref: str) -> Reply:
        if (bad := refused(req)) is not None:
            return bad
        sizes = [req.params.get(k) for k in ("maxWidthPx", "maxHeightPx") if req.params.get(k) is not None]
        if not sizes or not all(s.isdigit() and 1 <= int(s) <= 4800 for s in sizes):
            return invalid("maxWidthPx or maxHeightPx must be specified, between 1 and 4800.")
        with ctl.lock:
            ctl.media_requests += 1
            over = ctl.photo_quota is not None and ctl.media_requests > ctl.photo_quota
        if over:  # Place Photos (New): "the server returns an HTTP 403 status and displays the following image"
            return Reply(403, QUOTA_PNG, "image/png")
        p = by_id.get(place_id)
        index = next((i for i in range(min(p.n_photos, PHOTOS_MAX)) if ctl.photo_ref(place_id, i) == ref), None) \
            if p is not None else None
        if index is None:  # unknown or expired name: "If name expires, make a request to Place Details (New) ..."
            return invalid("The photo resource in the request is invalid or has expired.")
        uri = f"{content.url}/p/{place_id}/{index}=w{sizes[0]}"
        if req.params.get("skipHttpRedirect") == "true" and not ctl.ignore_skip_redirect:
            return json_reply({"name": f"places/{place_id}/photos/{ref}/media", "photoUri": uri})
        return Reply(302, b"", "text/html", {"Location": uri})

    def image(req: Request) -> Reply:
        place_id, rest = req.path[len("/p/"):].split("/", 1)
        return Reply(200, unique_jpeg(f"{place_id}-{rest.split('=')[0]}"), "image/jpeg")

    api.route("POST", "/v1/places:searchNearby", search_nearby)
    api.route("POST", "/v1/places:searchText", search_text)
    api.route("GET", "/v1/places/", place_or_media)
    content.route("GET", "/p/", image)
    return ctl


def dense_city(n: int = 320, seed: int = 11, centre=(33.700, 73.050), spread: float = 0.01) -> list[V1Place]:
    """``n`` places in a ~2 km square of Islamabad (ICT) with 0-12 photos each (Google returns at most 10), a
    sparse scatter around it, and a few places across the border in Punjab (another partition's)."""
    rng = random.Random(seed)
    out = [V1Place(f"ChIJcity{i:04d}", centre[0] + rng.uniform(-spread, spread),
                   centre[1] + rng.uniform(-spread, spread), rng.choice([0, 1, 2, 3, 4, 6, 12]), rng.random())
           for i in range(n)]
    out += [V1Place(f"ChIJsparse{i:03d}", 33.62 + rng.uniform(0, 0.12), 72.98 + rng.uniform(0, 0.2),
                    rng.randrange(0, 4), rng.random()) for i in range(15)]
    out += [V1Place(f"ChIJpunjab{i:02d}", 33.60 + rng.uniform(-0.01, 0.01), 73.06 + rng.uniform(-0.01, 0.01), 2,
                    rng.random()) for i in range(5)]  # Rawalpindi
    return out


def expected_items(places: list[V1Place], boundaries, province: str = "ict") -> set[str]:
    """Item ids (``<place_id>:<n>``) a complete crawl of ``province`` stores."""
    from pipeline.core.provinces import BY_KEY

    where = boundaries.locate(np.array([p.lat for p in places]), np.array([p.lon for p in places]))
    return {f"{p.place_id}:{i}" for p, w in zip(places, where) if w == BY_KEY[province].id
            for i in range(min(p.n_photos, PHOTOS_MAX))}
