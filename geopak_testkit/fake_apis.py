"""Local fake HTTP APIs for the crawler tests and ``bench/bench_crawl.py``.

One threaded server on 127.0.0.1 hosts routes that speak each API's real wire format (Flickr REST JSON, Places
nearby/details/photo, Wikidata ``wbgetentities``, image bytes). It logs every request, can add latency, enforce a
rate limit (429 + Retry-After) and inject faults: 429, 500, 503, timeouts (a reply slower than the client waits),
bodies cut short (with and without Content-Length) and garbage (invalid JSON, or an HTML page instead of an image).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit
from xml.etree import ElementTree

import numpy as np

FAULTS = ("429", "500", "503", "timeout", "truncated", "truncated_close", "garbage")


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""  # the raw request body (JSON APIs read it themselves)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(obj, status: int = 200) -> Reply:
    return Reply(status, json.dumps(obj).encode())


@dataclass
class Logged:
    method: str
    path: str
    params: dict[str, str]
    status: int
    fault: str | None
    t: float
    tag: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased request headers (who sent which key)


Handler = Callable[[Request], Reply]


class FakeServer:
    """A threaded HTTP server with routes, a request log, optional latency, a rate limit and fault injection."""

    def __init__(
        self,
        fault_rate: float = 0.0,
        faults: tuple[str, ...] = FAULTS,
        seed: int = 0,
        latency_s: float = 0.0,
        timeout_sleep_s: float = 0.6,
        retry_after: str = "0",
        rate_limit_per_s: float | None = None,
    ):
        self.fault_rate = fault_rate
        self.faults = faults
        self.latency_s = latency_s
        self.timeout_sleep_s = timeout_sleep_s
        self.retry_after = retry_after
        self.rate_limit_per_s = rate_limit_per_s
        self.tag = ""  # stamped on log entries (e.g. which run of a kill test)
        self.log: list[Logged] = []
        self.on_request: Callable[[Logged], None] | None = None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._routes: list[tuple[str, str, Handler]] = []
        self._bucket = (2.0, time.monotonic())
        self._httpd: ThreadingHTTPServer | None = None

    # ----------------------------------------------------------------------------------------------- lifecycle
    def route(self, method: str, prefix: str, handler: Handler) -> None:
        self._routes.append((method, prefix, handler))
        self._routes.sort(key=lambda r: -len(r[1]))

    def start(self) -> "FakeServer":
        fake = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in separate writes

            def do_GET(self):  # noqa: N802
                fake._dispatch(self, "GET")

            def do_POST(self):  # noqa: N802
                fake._dispatch(self, "POST")

            def log_message(self, *args):
                pass

        class _Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # clients that gave up (timeouts) are expected
                pass

        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> "FakeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # ------------------------------------------------------------------------------------------------- queries
    def requests(self, path_prefix: str = "", ok_only: bool = False, tag: str | None = None) -> list[Logged]:
        with self._lock:
            entries = list(self.log)
        return [e for e in entries if e.path.startswith(path_prefix)
                and (not ok_only or (e.fault is None and e.status < 400)) and (tag is None or e.tag == tag)]

    def fault_counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for e in self.log:
                if e.fault:
                    out[e.fault] = out.get(e.fault, 0) + 1
            return out

    # ------------------------------------------------------------------------------------------------ dispatch
    def _take_token(self) -> bool:
        if not self.rate_limit_per_s:
            return True
        with self._lock:
            tokens, last = self._bucket
            now = time.monotonic()
            tokens = min(2.0, tokens + (now - last) * self.rate_limit_per_s)
            ok = tokens >= 1.0
            self._bucket = (tokens - 1.0 if ok else tokens, now)
            return ok

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if body and "x-www-form-urlencoded" in (h.headers.get("Content-Type") or ""):
            params.update(parse_qsl(body.decode(), keep_blank_values=True))
        req = Request(method, parts.path, params, {k.lower(): v for k, v in h.headers.items()}, body)
        if self.latency_s:
            time.sleep(self.latency_s)
        handler = next((fn for m, p, fn in self._routes if m == method and parts.path.startswith(p)), None)
        with self._lock:
            fault = self._rng.choice(self.faults) if self.fault_rate and self._rng.random() < self.fault_rate else None
        if not self._take_token():
            fault, reply = "rate_limited", Reply(429, b'{"error": "rate limited"}', headers={"Retry-After": "1"})
        elif handler is None:
            reply = Reply(404, b"<html>not found</html>", "text/html")
        elif fault in ("429", "500", "503"):
            code = int(fault)
            headers = {"Retry-After": self.retry_after} if code == 429 else {}
            reply = Reply(code, b"<html><body>temporarily unavailable</body></html>", "text/html", headers)
        else:
            reply = handler(req)
        entry = Logged(method, parts.path, params, reply.status, fault, time.monotonic(), self.tag, req.headers)
        with self._lock:
            self.log.append(entry)
        if self.on_request is not None:
            self.on_request(entry)
        try:
            self._send(h, reply, fault)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, h: BaseHTTPRequestHandler, reply: Reply, fault: str | None) -> None:
        body, ctype = reply.body, reply.content_type
        if fault == "timeout":
            time.sleep(self.timeout_sleep_s)
        if fault == "garbage" and reply.status == 200:
            if ctype.startswith("image/"):
                body, ctype = b"<!DOCTYPE html><html><body>Service error, try later</body></html>", "text/html"
            else:
                body = body[: max(1, len(body) // 3)] + b"<html>"
        h.send_response(reply.status)
        h.send_header("Content-Type", ctype)
        for k, v in reply.headers.items():
            h.send_header(k, v)
        if fault == "truncated_close" and reply.status == 200:
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.close_connection = True
            return
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if fault == "truncated" and reply.status == 200:
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)


# ------------------------------------------------------------------------------------------------------ images

_JPEG_CACHE: dict[str, bytes] = {}


def unique_jpeg(name: str, size: int = 24) -> bytes:
    """A small valid JPEG whose bytes differ for every name (the name is its JPEG comment)."""
    data = _JPEG_CACHE.get(name)
    if data is None:
        from PIL import Image

        h = hashlib.sha256(name.encode()).digest()
        img = Image.new("RGB", (size, size), tuple(h[:3]))
        img.putpixel((h[3] % size, h[4] % size), tuple(h[5:8]))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90, comment=name.encode())
        data = _JPEG_CACHE[name] = buf.getvalue()
    return data


def image_routes(server: FakeServer, prefix: str = "/img/", missing: set[str] = frozenset(),
                 jpeg: Callable[[str], bytes] = unique_jpeg) -> None:
    """``GET <prefix><name>`` → ``jpeg(name)``, by default a tiny unique JPEG (404 for names in ``missing``)."""

    def handle(req: Request) -> Reply:
        name = req.path[len(prefix):]
        if name in missing:
            return Reply(404, b"<html>gone</html>", "text/html")
        return Reply(200, jpeg(name), "image/jpeg")

    server.route("GET", prefix, handle)


# ------------------------------------------------------------------------------------------------------ Flickr

@dataclass
class FlickrPhoto:
    id: str
    lat: float
    lon: float
    taken: str  # "YYYY-MM-DD HH:MM:SS", naive local
    license: str = "4"
    accuracy: int = 16
    owner: str = "12345678@N00"
    granularity: int = 0  # datetakengranularity: 0 exact, 4 month, 6 year, 8 circa
    taken_unknown: bool = False  # datetakenunknown: Flickr filled datetaken from the upload time


RECORDED = Path(__file__).resolve().parents[1] / "tests" / "data" / "recorded"  # the services' own answers


def recorded_flickr_licenses() -> list[dict]:
    """The licence list Flickr served on 19 June 2025 (recorded XML), typed as its JSON format types it: ``id`` a
    number, ``name`` and ``url`` text (tests/data/recorded/flickr/licenses.getInfo.flickr-net.json)."""
    root = ElementTree.parse(RECORDED / "flickr" / "licenses.getInfo.2025-06-19.xml").getroot()
    return [{"id": int(e.get("id")), "name": e.get("name"), "url": e.get("url")} for e in root.iter("license")]


def flickr_searches(server: "FakeServer", tag: str | None = None) -> list[Logged]:
    """The logged ``flickr.photos.search`` calls (the REST endpoint also answers licenses.getInfo)."""
    return [e for e in server.requests("/services/rest/", tag=tag) if e.params.get("method") == "flickr.photos.search"]


def _naive(text: str) -> float:
    import datetime as dt

    return (dt.datetime.fromisoformat(text) - dt.datetime(1970, 1, 1)).total_seconds()


def flickr_routes(server: FakeServer, photos: list[FlickrPhoto], api_key: str, cap: int = 4000,
                  getinfo: bool = True, jpeg: Callable[[str], bytes] = unique_jpeg) -> None:
    """``POST /services/rest/`` flickr.photos.search (bbox, taken dates, paging, ``total``, the 4,000 cap) and
    flickr.photos.licenses.getInfo (the recorded 2025 list), and ``GET /flickr-img/<id>.jpg``. Checks the OAuth
    consumer key flickrapi puts in the Authorization header. Keys and value types follow the recordings in
    tests/data/recorded/flickr (tests/test_recorded_flickr.py checks it): the envelope's numbers and ``farm``,
    ``ispublic``... as numbers (Flickr's JSON), every other attribute as text (Flickr's JSON format page: "Element
    attributes are represented by an object member with a string value"). ``getinfo=False``: licenses.getInfo
    answers "method not found", as a service without it would. ``jpeg(name)``: the image bytes served."""
    ids = np.array([p.id for p in photos])
    lat = np.array([p.lat for p in photos])
    lon = np.array([p.lon for p in photos])
    taken = np.array([_naive(p.taken) for p in photos])

    def search(req: Request) -> Reply:
        if f'oauth_consumer_key="{api_key}"' not in req.headers.get("authorization", ""):
            return json_reply({"stat": "fail", "code": 100, "message": "Invalid API Key (Key has invalid format)"})
        p = req.params
        if p.get("method") == "flickr.photos.licenses.getInfo" and p.get("format") == "json" and getinfo:
            return json_reply({"licenses": {"license": recorded_flickr_licenses()}, "stat": "ok"})
        if p.get("method") != "flickr.photos.search" or p.get("format") != "json":
            return json_reply({"stat": "fail", "code": 112, "message": "Method not found"})
        x0, y0, x1, y1 = (float(v) for v in p["bbox"].split(","))
        t0, t1 = _naive(p["min_taken_date"]), _naive(p["max_taken_date"])
        hit = (lon >= x0) & (lon <= x1) & (lat >= y0) & (lat <= y1) & (taken >= t0) & (taken <= t1)
        idx = np.flatnonzero(hit)  # photos are in upload order: date-posted-asc
        per_page, page = min(int(p.get("per_page", 100)), 250), int(p.get("page", 1))
        total = len(idx)
        start = (page - 1) * per_page
        shown = idx[start : min(start + per_page, cap)] if start < cap else idx[:0]
        sizes = [s for s in p.get("extras", "").split(",") if s.startswith("url_")]
        out = []
        for i in shown:
            ph = photos[i]
            rec = {"id": ph.id, "owner": ph.owner, "secret": "abc", "server": "1", "farm": 1, "title": f"photo {ph.id}",
                   "ispublic": 1, "isfriend": 0, "isfamily": 0, "license": ph.license, "datetaken": ph.taken,
                   "datetakengranularity": str(ph.granularity), "datetakenunknown": str(int(ph.taken_unknown)),
                   "ownername": "someone", "tags": "pakistan", "latitude": f"{ph.lat:.6f}",
                   "longitude": f"{ph.lon:.6f}", "accuracy": str(ph.accuracy), "context": "0"}
            if sizes:
                suffix = sizes[0].removeprefix("url_")
                rec.update({sizes[0]: f"{server.url}/flickr-img/{ph.id}.jpg", f"height_{suffix}": "24",
                            f"width_{suffix}": "24"})
            out.append(rec)
        pages = math.ceil(total / per_page) if total else 0
        return json_reply({"photos": {"page": page, "pages": pages, "perpage": per_page, "total": total,
                                      "photo": out}, "stat": "ok"})

    server.route("POST", "/services/rest/", search)
    image_routes(server, "/flickr-img/", jpeg=jpeg)
    assert len(set(ids.tolist())) == len(ids), "photo ids must be unique"


# ----------------------------------------------------------------------------------------------- Google Places

@dataclass
class FakePlace:
    place_id: str
    lat: float
    lon: float
    n_photos: int = 3
    prominence: float = 0.0


def haversine_m(lat1, lon1, lat2, lon2):
    r = 6_371_000.0
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dphi, dl = p2 - p1, np.radians(np.asarray(lon2) - lon1)
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * r * np.arcsin(np.sqrt(a))


@dataclass
class PlacesControl:
    """Knobs of the fake Places service a test turns while it runs, and what it counted.

    ``photo_quota``: Place Photo requests answered before the quota runs out (then HTTP 403, as Google documents);
    ``json_quota``: JSON requests (search, details) answered before ``OVER_QUERY_LIMIT`` with Google's daily-quota
    message; ``token_ttl_s``: a page token older than this is ``INVALID_REQUEST`` (expired); ``image_faults``:
    photo_reference → ``"html"`` (an HTML error page with status 200) or ``"cut"`` (the JPEG's first half, with a
    matching Content-Length) served by the image host, until the test removes the entry."""

    photo_quota: int | None = None
    json_quota: int | None = None
    token_ttl_s: float | None = None
    image_faults: dict[str, str] = field(default_factory=dict)
    photo_requests: int = 0
    json_requests: int = 0
    details_ids: list[str] = field(default_factory=list)  # place ids asked for in Place Details, in order
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _over(self, kind: str) -> bool:
        with self.lock:
            n = getattr(self, f"{kind}_requests") + 1
            setattr(self, f"{kind}_requests", n)
            quota = getattr(self, f"{kind}_quota")
            return quota is not None and n > quota


QUOTA_MESSAGE = ("You have exceeded your daily request quota for this API. If you did not set a custom daily request "
                 "quota, verify your project has an active billing account: http://g.co/dev/maps-no-account")


def places_routes(server: FakeServer, places: list[FakePlace], api_key: str, token_delay_s: float = 0.05,
                  control: PlacesControl | None = None) -> PlacesControl:
    """Legacy Places web service: nearbysearch (20 per page, ≤ 60, page tokens valid after a delay), details
    (≤ 10 photos with html_attributions), photo (302 redirect to the bytes, like the real service); quotas, page
    token expiry and bad image bytes as ``PlacesControl`` says (returned, to be changed while the server runs)."""
    ctl = control or PlacesControl()
    lat = np.array([p.lat for p in places])
    lon = np.array([p.lon for p in places])
    by_id = {p.place_id: p for p in places}
    tokens: dict[str, tuple[float, list[int], int]] = {}
    lock = threading.Lock()

    def denied(req: Request) -> Reply | None:
        if req.params.get("key") != api_key:
            return json_reply({"status": "REQUEST_DENIED", "error_message": "The provided API key is invalid.",
                               "results": [], "html_attributions": []})
        if ctl._over("json"):
            return json_reply({"status": "OVER_QUERY_LIMIT", "error_message": QUOTA_MESSAGE, "results": [],
                               "html_attributions": []})
        return None

    def result(p: FakePlace) -> dict:
        return {"place_id": p.place_id, "name": f"Place {p.place_id}", "types": ["point_of_interest"],
                "geometry": {"location": {"lat": p.lat, "lng": p.lon}}, "photos": _photos(p)[:1]}

    def page(hits: list[int], offset: int) -> Reply:
        body = {"status": "OK" if hits else "ZERO_RESULTS", "html_attributions": [],
                "results": [result(places[i]) for i in hits[offset : offset + 20]]}
        if offset + 20 < len(hits):
            token = hashlib.sha256(f"{id(hits)}:{offset}:{time.monotonic()}".encode()).hexdigest()
            with lock:
                tokens[token] = (time.monotonic(), hits, offset + 20)
            body["next_page_token"] = token
        return json_reply(body)

    def nearby(req: Request) -> Reply:
        if (bad := denied(req)) is not None:
            return bad
        if "pagetoken" in req.params:
            with lock:
                entry = tokens.get(req.params["pagetoken"])
            age = time.monotonic() - entry[0] if entry is not None else None
            if age is None or age < token_delay_s or (ctl.token_ttl_s is not None and age > ctl.token_ttl_s):
                return json_reply({"status": "INVALID_REQUEST", "results": [], "html_attributions": []})
            return page(entry[1], entry[2])
        la, lo = (float(v) for v in req.params["location"].split(","))
        radius = float(req.params["radius"])
        if radius > 50_000:
            return json_reply({"status": "INVALID_REQUEST", "results": [], "html_attributions": []})
        d = haversine_m(la, lo, lat, lon)
        inside = np.flatnonzero(d <= radius)
        hits = sorted(inside.tolist(), key=lambda i: -places[i].prominence)[:60]
        return page(hits, 0)

    def details(req: Request) -> Reply:
        if (bad := denied(req)) is not None:
            return bad
        with ctl.lock:
            ctl.details_ids.append(req.params.get("placeid", ""))
        p = by_id.get(req.params.get("placeid", ""))
        if p is None:
            return json_reply({"status": "NOT_FOUND", "html_attributions": []})
        return json_reply({"status": "OK", "html_attributions": [],
                           "result": {"place_id": p.place_id, "geometry": {"location": {"lat": p.lat, "lng": p.lon}},
                                      "photos": _photos(p)}})

    def photo(req: Request) -> Reply:
        if req.params.get("key") != api_key:
            return Reply(403, b"<html>forbidden</html>", "text/html")
        if not (req.params.get("maxwidth") or req.params.get("maxheight")):
            return Reply(400, b"<html>bad request</html>", "text/html")
        if ctl._over("photo"):  # Google: "HTTP 403 status to indicate that the quota has been exceeded"
            return Reply(403, QUOTA_PNG, "image/png")
        return Reply(302, b"", "text/html", {"Location": f"{server.url}/places-photo/{req.params['photoreference']}"})

    def image(req: Request) -> Reply:
        ref = req.path[len("/places-photo/"):]
        data = unique_jpeg(ref)
        fault = ctl.image_faults.get(ref)
        if fault == "html":
            return Reply(200, b"<!DOCTYPE html><html><body>Error 502 (Server Error)</body></html>", "text/html")
        if fault == "cut":
            return Reply(200, data[: len(data) // 2], "image/jpeg")
        return Reply(200, data, "image/jpeg")

    server.route("GET", "/maps/api/place/nearbysearch/json", nearby)
    server.route("GET", "/maps/api/place/details/json", details)
    server.route("GET", "/maps/api/place/photo", photo)
    server.route("GET", "/places-photo/", image)
    return ctl


def _png(width: int = 8, height: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


QUOTA_PNG = _png()  # the real service answers a quota 403 with an image saying so


def _photos(p: FakePlace) -> list[dict]:
    return [{"photo_reference": f"ref-{p.place_id}-{i}", "width": 800, "height": 600,
             "html_attributions": [f'<a href="https://maps.google.com/maps/contrib/{i}">Contributor {i}</a>']}
            for i in range(min(p.n_photos, 10))]


# ---------------------------------------------------------------------------------------------------- Wikidata

def wd_entity(qid: str, commons_title: str | None = None, coord: tuple[float, float] | None = None,
              main_topic: str | None = None, category_item: bool = False) -> dict:
    """A Wikidata entity as ``wbgetentities`` returns it (claims and the commonswiki sitelink)."""
    claims: dict[str, list] = {}

    def snak(prop: str, datatype: str, value) -> dict:
        return {"mainsnak": {"snaktype": "value", "property": prop, "datatype": datatype,
                             "datavalue": {"value": value, "type": datatype}}, "type": "statement", "rank": "normal"}

    if category_item:
        claims["P31"] = [snak("P31", "wikibase-item", {"entity-type": "item", "id": "Q4167836"})]
    if coord is not None:
        claims["P625"] = [snak("P625", "globecoordinate", {"latitude": coord[0], "longitude": coord[1],
                                                            "precision": 0.0001,
                                                            "globe": "http://www.wikidata.org/entity/Q2"})]
    if main_topic is not None:
        claims["P301"] = [snak("P301", "wikibase-item", {"entity-type": "item", "id": main_topic})]
    ent = {"type": "item", "id": qid, "claims": claims, "sitelinks": {}}
    if commons_title:
        ent["sitelinks"]["commonswiki"] = {"site": "commonswiki", "title": commons_title, "badges": []}
    return ent


def wikidata_routes(server: FakeServer, entities: list[dict]) -> None:
    """``GET /w/api.php?action=wbgetentities`` by ``sites=commonswiki&titles=...`` or by ``ids=...``."""
    by_id = {e["id"]: e for e in entities}
    by_title = {e["sitelinks"]["commonswiki"]["title"]: e for e in entities if "commonswiki" in e["sitelinks"]}

    def handle(req: Request) -> Reply:
        p = req.params
        if p.get("action") != "wbgetentities" or p.get("format") != "json":
            return json_reply({"error": {"code": "badvalue", "info": "unsupported"}})
        out: dict[str, dict] = {}
        normalized = []
        if "titles" in p:
            if p.get("sites") != "commonswiki":
                return json_reply({"error": {"code": "param-missing", "info": "sites"}})
            for n, raw in enumerate(p["titles"].split("|"), start=1):
                title = raw.replace("_", " ")
                if title != raw:
                    normalized.append({"from": raw, "to": title})
                e = by_title.get(title)
                if e is None:
                    out[str(-n)] = {"site": "commonswiki", "title": title, "missing": ""}
                else:
                    out[e["id"]] = e
        for qid in p.get("ids", "").split("|") if p.get("ids") else []:
            out[qid] = by_id.get(qid, {"id": qid, "missing": ""})
        body: dict = {"entities": out, "success": 1}
        if normalized:
            body["normalized"] = {"n": normalized}
        return json_reply(body)

    server.route("GET", "/w/api.php", handle)

