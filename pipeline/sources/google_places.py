"""Google Places crawler (legacy web service through ``googlemaps``): tiles → nearby search → details → photos.

OPT-IN ONLY. Google's Places policies forbid pre-fetching, caching, storing and redistributing Places content
(only ``place_id`` may be kept indefinitely); storing Places photos in a training set needs legal review first.

A province's bbox is cut into square tiles (those touching the province polygon); each tile is one circular nearby
search (radius = the tile's half-diagonal, ≤ 50 km) paged with ``next_page_token`` (valid ~2 s after it is issued).
A search returns at most 60 places, so a tile that returns 60 is split into quarters. Each place in the province gets
one details call for up to 10 photo references; each photo is fetched with ``places_photo`` at ``max_width``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import googlemaps
import numpy as np

from pipeline.core.gazetteer import EARTH_RADIUS_KM, unit_vectors
from pipeline.sources.crawl import CrawlContext, Source, to_float
from pipeline.sources.crawl_state import Unit
from pipeline.sources.http import (
    Fetched,
    HttpSettings,
    HttpStats,
    PermanentHTTPError,
    api_session,
    classify,
    read_capped,
)

DEFAULT_BASE_URL = "https://maps.googleapis.com"
MAX_RADIUS_M = 50_000
MAX_RESULTS = 60  # 3 pages of 20
LICENSE = "Google Places photo: Maps Platform terms restrict storing and redistributing it"
_TRANSIENT_STATUSES = {"OVER_QUERY_LIMIT", "UNKNOWN_ERROR"}


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


class GooglePlacesSource(Source):
    name = "google_places"

    def __init__(self, cfg: PlacesConfig, http: HttpSettings, stats: HttpStats):
        if not cfg.api_key:
            raise ValueError("Google Places needs an API key")
        if Tile((0.0, 30.0, cfg.tile_deg, 30.0 + cfg.tile_deg)).circle()[1] > MAX_RADIUS_M:
            raise ValueError(f"tile_deg={cfg.tile_deg} needs a search radius over {MAX_RADIUS_M} m; use ≤ 0.6")
        self.cfg = cfg
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
            return f"api_{exc.status.lower()}", None
        return classify(exc)

    # ------------------------------------------------------------------------------------------------ discovery
    def discover(self, ctx: CrawlContext) -> None:
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

    def _search_tile(self, ctx: CrawlContext, unit_id: str, tile: Tile) -> None:
        location, radius = tile.circle()
        reply = ctx.retry(
            lambda: self.client.places_nearby(
                location=location, radius=radius, type=self.cfg.place_type or None, keyword=self.cfg.keyword or None
            ),
            self.classify,
        )
        results = list(reply.get("results", []))
        token = reply.get("next_page_token")
        while token and len(results) < MAX_RESULTS:
            time.sleep(self.cfg.page_token_delay_s)  # a fresh token is INVALID_REQUEST for about 2 s
            reply = ctx.retry(lambda t=token: self.client.places_nearby(page_token=t), self._classify_page)
            results += reply.get("results", [])
            token = reply.get("next_page_token")
        found: dict[str, tuple[float, float]] = {}
        for r in results:
            loc = (r.get("geometry") or {}).get("location") or {}
            if r.get("place_id"):
                found[r["place_id"]] = (to_float(loc.get("lat")), to_float(loc.get("lng")))
        ids = list(found)
        where = ctx.location_reasons([found[i][0] for i in ids], [found[i][1] for i in ids]) if ids else []
        mine = [i for i, w in zip(ids, where) if w is None]
        children = []
        if len(results) >= MAX_RESULTS and tile.size_deg / 2 >= self.cfg.min_tile_deg:
            children = [c for c in tile.quarters() if ctx.intersects(c.bbox)]
        new_units = [Unit(c.unit_id, c.payload()) for c in children]
        new_units += [Unit(f"place:{i}", {"lat": found[i][0], "lon": found[i][1]}) for i in mine]
        ctx.state.complete_unit(unit_id, new_units=new_units, result={
            "results": len(results), "places_in_province": len(mine), "split": len(children),
            "saturated_at_min_size": len(results) >= MAX_RESULTS and not children})

    def _classify_page(self, exc: BaseException) -> tuple[str, float | None] | None:
        if isinstance(exc, googlemaps.exceptions.ApiError) and exc.status == "INVALID_REQUEST":
            return "page_token_not_ready", self.cfg.page_token_delay_s
        return self.classify(exc)

    def _place_photos(self, ctx: CrawlContext, unit: Unit) -> None:
        place_id = unit.unit_id[len("place:"):]
        try:
            reply = ctx.retry(
                lambda: self.client.place(place_id, fields=["photo", "geometry/location", "place_id"]), self.classify
            )
        except googlemaps.exceptions.ApiError as exc:
            if exc.status in ("NOT_FOUND", "ZERO_RESULTS"):  # the place closed or moved since the search
                ctx.state.complete_unit(unit.unit_id, result={"status": exc.status})
                return
            raise
        result = reply.get("result") or {}
        loc = (result.get("geometry") or {}).get("location") or {}
        lat, lon = to_float(loc.get("lat", unit.payload["lat"])), to_float(loc.get("lng", unit.payload["lon"]))
        photos = (result.get("photos") or [])[: self.cfg.max_photos_per_place]
        ids, records = [], []
        for n, p in enumerate(photos):
            if not p.get("photo_reference"):
                continue
            ids.append(f"{place_id}:{n}")
            records.append({"place_id": place_id, "lat": lat, "lon": lon, "photo_reference": p["photo_reference"],
                            "width": p.get("width"), "height": p.get("height"),
                            "html_attributions": list(p.get("html_attributions") or [])})
        keep, rejected = self.sort_items(ids, records, ctx)
        ctx.state.complete_unit(unit.unit_id, keep, rejected, result={"photos": len(ids)})

    def judge(self, records: list[dict], ctx: CrawlContext) -> list[str | None]:
        return ctx.judge_located(records, "lat", "lon", lambda r: None)

    # ------------------------------------------------------------------------------------------------ download
    def fetcher(self, record: dict) -> Callable[[], Fetched]:
        def fetch() -> Fetched:
            self.client.places_photo(record["photo_reference"], max_width=self.cfg.max_width)
            resp = self.session.last_response  # places_photo only hands out a 1-byte-chunk iterator
            assert resp is not None
            try:
                if resp.status_code != 200:
                    raise PermanentHTTPError(resp.status_code)
                return Fetched(read_capped(resp, self.http.max_image_bytes), resp.headers.get("Content-Type"))
            finally:
                resp.close()

        return fetch

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
        }

