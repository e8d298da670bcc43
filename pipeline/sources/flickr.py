"""Flickr ``photos.search`` crawler (flickrapi, ``parsed-json``) that works around the 4,000-result cap.

Flickr returns at most the first 4,000 results of any search. A query (bbox × taken-date window) whose ``total`` is
at or over the cap is split — quadtree on the bbox down to ``min_tile_deg``, then bisection of the date window down
to ``min_window_s`` — until every query is under the cap, and only then paged (``walk()`` needs etree; we page
ourselves). Results are sorted by upload date ascending so new uploads append instead of shifting pages; photos found
twice (shared tile edges) are stored once by photo id. Each query page is one unit of crawl state.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass

import flickrapi
from flickrapi.exceptions import FlickrError

from pipeline.core import reasons
from pipeline.core.exif import DEFAULT_UTC_OFFSET
from pipeline.sources.crawl import CrawlContext, Source, local_datetime_to_utc, to_float
from pipeline.sources.crawl_state import CrawlState, Unit
from pipeline.sources.http import (
    Fetched,
    HttpSettings,
    HttpStats,
    TransientError,
    api_session,
    classify,
    download_session,
    fetch_url,
)

DEFAULT_REST_URL = "https://api.flickr.com/services/rest/"
RESULT_CAP = 4000
# flickr.photos.licenses.getInfo; 9 and 10 were added in 2015
LICENSES = {
    "0": "All Rights Reserved",
    "1": "CC BY-NC-SA 2.0",
    "2": "CC BY-NC 2.0",
    "3": "CC BY-NC-ND 2.0",
    "4": "CC BY 2.0",
    "5": "CC BY-SA 2.0",
    "6": "CC BY-ND 2.0",
    "7": "No known copyright restrictions",
    "8": "United States Government Work",
    "9": "CC0 1.0",
    "10": "Public Domain Mark 1.0",
}
OPEN_LICENSES = tuple(str(i) for i in range(1, 11))
# 10: search API unavailable, 105: service unavailable, 106: write operation failed
_TRANSIENT_CODES = {10, 105, 106}
_EPOCH = dt.datetime(1970, 1, 1)


@dataclass(frozen=True)
class FlickrConfig:
    api_key: str
    api_secret: str
    rest_url: str = DEFAULT_REST_URL
    queries_per_hour: float = 3600.0  # Flickr's limit per key
    min_taken_date: str = "2000-01-01"
    max_taken_date: str = ""  # empty: the moment this province's crawl first started (kept in the state)
    licenses: tuple[str, ...] = OPEN_LICENSES
    min_accuracy: int = 11  # 1 world … 11 city … 16 street
    sizes: tuple[str, ...] = ("url_l", "url_c", "url_z", "url_m")  # first one present is downloaded
    per_page: int = 250  # geo queries return at most 250 per page
    min_tile_deg: float = 0.01
    min_window_s: int = 3600
    result_cap: int = RESULT_CAP
    # incremental crawls (the weekly schedule): only photos uploaded at or after this UTC time (ISO date or
    # datetime); empty: all. Upload, not taken, time: a photo taken years ago and uploaded last week is new.
    min_upload_date: str = ""


def upload_floor_seconds(text: str) -> int | None:
    """``min_upload_date`` as Unix seconds (upload times are UTC; a naive value is read as UTC); None when empty."""
    if not text.strip():
        return None
    when = dt.datetime.fromisoformat(text.strip())
    return int((when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp())


def _naive_seconds(text: str) -> int:
    """Flickr taken dates are naive local times: keep them naive, as seconds on a naive epoch."""
    return int((dt.datetime.fromisoformat(text.strip()) - _EPOCH).total_seconds())


def _mysql(seconds: int) -> str:
    return (_EPOCH + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class Query:
    """One search: bbox (min_lon, min_lat, max_lon, max_lat) × taken-date window [t0, t1] (inclusive), one page."""

    bbox: tuple[float, float, float, float]
    t0: int
    t1: int
    page: int = 1

    @property
    def key(self) -> str:
        """The query without its page: every page of one search shares it."""
        b = ",".join(f"{v:.6f}" for v in self.bbox)
        return f"q:{b}:{self.t0}-{self.t1}"

    @property
    def unit_id(self) -> str:
        return f"{self.key}:p{self.page}"

    def payload(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_payload(cls, p: dict) -> "Query":
        return cls(tuple(p["bbox"]), int(p["t0"]), int(p["t1"]), int(p["page"]))  # type: ignore[arg-type]

    def split(self, min_tile_deg: float, min_window_s: int) -> list["Query"]:
        """Quadrants while the bbox is larger than ``min_tile_deg``, else two halves of the date window."""
        x0, y0, x1, y1 = self.bbox
        if max(x1 - x0, y1 - y0) > min_tile_deg:
            xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
            boxes = [(x0, y0, xm, ym), (xm, y0, x1, ym), (x0, ym, xm, y1), (xm, ym, x1, y1)]
            return [Query(b, self.t0, self.t1) for b in boxes]
        if self.t1 - self.t0 > min_window_s:
            mid = (self.t0 + self.t1) // 2
            return [Query(self.bbox, self.t0, mid), Query(self.bbox, mid + 1, self.t1)]
        return []


class FlickrSource(Source):
    name = "flickr"
    filter_reasons = (reasons.LICENSE_NOT_ALLOWED, reasons.LOW_GEO_ACCURACY, reasons.NO_IMAGE_URL)

    def __init__(self, cfg: FlickrConfig, http: HttpSettings, stats: HttpStats):
        if not (cfg.api_key and cfg.api_secret):
            raise ValueError("Flickr needs an API key and secret")
        self.cfg = cfg
        self.http = http
        self.upload_floor = upload_floor_seconds(cfg.min_upload_date)  # a bad date fails here, before any request
        self.api = flickrapi.FlickrAPI(
            cfg.api_key, cfg.api_secret, format="parsed-json", store_token=False, timeout=http.timeout_s
        )
        self.api.REST_URL = cfg.rest_url
        # an instance attribute: flickrapi's own session is shared by every instance in the process
        self.api.flickr_oauth.session = api_session(http, stats, cfg.api_key, cfg.queries_per_hour / 3600.0)
        self.downloads = download_session(http, stats)

    def params(self) -> dict:
        c = self.cfg
        return {"min_taken_date": c.min_taken_date, "max_taken_date": c.max_taken_date, "licenses": sorted(c.licenses),
                "min_accuracy": c.min_accuracy, "sizes": list(c.sizes), "per_page": c.per_page,
                "min_tile_deg": c.min_tile_deg, "min_window_s": c.min_window_s, "result_cap": c.result_cap,
                "min_upload_date": c.min_upload_date}

    def secrets(self) -> list[str]:
        return [self.cfg.api_key, self.cfg.api_secret]

    def summary(self, state: CrawlState) -> dict[str, float]:
        """``units: total`` counted once per search, not once per page (every page repeats the search's total).

        A search that was split is left out (its children cover it); of a paged search the largest page total counts
        (uploads during the crawl can raise it between pages). This replaces the per-page sum of the generic summary.
        """
        per_query: dict[str, float] = {}
        for r in state.unit_results("q:"):
            if "query" in r and "photos" in r:
                per_query[r["query"]] = max(per_query.get(r["query"], 0.0), float(r.get("total") or 0))
        return {"units: total": float(sum(per_query.values()))}

    def classify(self, exc: BaseException) -> tuple[str, float | None] | None:
        if isinstance(exc, FlickrError):
            return ("flickr_unavailable", None) if exc.code in _TRANSIENT_CODES else None
        return classify(exc)

    # ------------------------------------------------------------------------------------------------ discovery
    def discover(self, ctx: CrawlContext) -> None:
        if not ctx.state.has_units("q:"):
            end = self.cfg.max_taken_date or (dt.datetime.now(DEFAULT_UTC_OFFSET)).strftime(
                "%Y-%m-%d %H:%M:%S"
            )
            root = Query(ctx.bbox, _naive_seconds(self.cfg.min_taken_date), _naive_seconds(end))
            ctx.state.add_units([Unit(root.unit_id, root.payload())])
        while units := ctx.state.pending_units("q:"):
            ctx.info(f"flickr/{ctx.province.key}: {len(units)} queries pending")
            for unit in units:
                self._run_query(ctx, unit.unit_id, Query.from_payload(unit.payload))

    def _search(self, q: Query) -> dict:
        reply = self.api.photos.search(
            **({"min_upload_date": self.upload_floor} if self.upload_floor is not None else {}),
            bbox=",".join(f"{v:.6f}" for v in q.bbox),
            has_geo=1,
            min_taken_date=_mysql(q.t0),
            max_taken_date=_mysql(q.t1),
            extras="geo,date_taken,license,owner_name,tags," + ",".join(self.cfg.sizes),
            per_page=self.cfg.per_page,
            page=q.page,
            sort="date-posted-asc",
            media="photos",
        )
        photos = reply.get("photos") if isinstance(reply, dict) else None
        if not isinstance(photos, dict) or not isinstance(photos.get("photo"), list):
            raise TransientError("bad_response", "reply without a photos list")
        return photos

    def _run_query(self, ctx: CrawlContext, unit_id: str, q: Query) -> None:
        photos = ctx.retry(lambda: self._search(q), self.classify)
        total = int(photos.get("total") or 0)
        capped = False
        if q.page == 1 and total >= self.cfg.result_cap:
            children = [c for c in q.split(self.cfg.min_tile_deg, self.cfg.min_window_s) if ctx.intersects(c.bbox)]
            if children:
                ctx.state.complete_unit(unit_id, new_units=[Unit(c.unit_id, c.payload()) for c in children],
                                        result={"query": q.key, "total": total, "split": len(children)})
                return
            capped = True
            ctx.info(f"flickr/{ctx.province.key}: {total} results in a {self.cfg.min_tile_deg}° × "
                     f"{self.cfg.min_window_s} s query; only the first {self.cfg.result_cap} are reachable")
        ids, records = [], []
        for p in photos["photo"]:
            ids.append(str(p["id"]))
            records.append(self._record(p))
        keep, rejected = self.sort_items(ids, records, ctx)
        new_units = []
        if q.page == 1:
            pages = math.ceil(min(total, self.cfg.result_cap) / self.cfg.per_page)
            new_units = [Query(q.bbox, q.t0, q.t1, page) for page in range(2, pages + 1)]
        ctx.state.complete_unit(unit_id, keep, rejected, [Unit(n.unit_id, n.payload()) for n in new_units],
                                result={"query": q.key, "total": total, "photos": len(ids), "capped": capped})

    def _record(self, p: dict) -> dict:
        url = next((p[s] for s in self.cfg.sizes if p.get(s)), None)
        keys = ("id", "owner", "ownername", "title", "tags", "license", "datetaken", "datetakenunknown",
                "latitude", "longitude", "accuracy")
        return {**{k: p.get(k) for k in keys}, "url": url}

    def judge(self, records: list[dict], ctx: CrawlContext) -> list[str | None]:
        return ctx.judge_located(records, "latitude", "longitude", self._check)

    def _check(self, r: dict) -> str | None:
        if str(r.get("license")) not in self.cfg.licenses:
            return reasons.LICENSE_NOT_ALLOWED
        if not to_float(r.get("accuracy")) >= self.cfg.min_accuracy:
            return reasons.LOW_GEO_ACCURACY
        return None if r.get("url") else reasons.NO_IMAGE_URL

    # ------------------------------------------------------------------------------------------------ download
    def fetcher(self, record: dict) -> Callable[[], Fetched]:
        return lambda: fetch_url(self.downloads, record["url"], self.http.max_image_bytes)

    def manifest_row(self, record: dict) -> dict:
        unknown = str(record.get("datetakenunknown") or "0") == "1"
        return {
            "source_url": f"https://www.flickr.com/photos/{record.get('owner')}/{record['id']}",
            "lat": to_float(record["latitude"]),
            "lon": to_float(record["longitude"]),
            "geo_accuracy": to_float(record.get("accuracy")),  # Flickr level 1-16
            "taken_at": None if unknown else local_datetime_to_utc(record.get("datetaken")),
            "owner": record.get("ownername") or record.get("owner"),
            "license": LICENSES.get(str(record.get("license")), f"flickr license {record.get('license')}"),
            "title": record.get("title") or None,
            "tags": record.get("tags") or None,
            "place_id": None,
        }

