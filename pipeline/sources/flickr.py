"""Flickr ``photos.search`` crawler (flickrapi, ``parsed-json``) that works around the 4,000-result cap.

Flickr returns at most the first 4,000 results of any search. A query (bbox × taken-date window) whose ``total`` is
at or over the cap is split — quadtree on the bbox down to ``min_tile_deg``, then bisection of the date window down
to ``min_window_s`` — until every query is under the cap, and only then paged (``walk()`` needs etree; we page
ourselves). Results are sorted by upload date ascending so new uploads append instead of shifting pages; photos found
twice (shared tile edges) are stored once by photo id. Each query page is one unit of crawl state.

Licences are the service's own: ``flickr.photos.licenses.getInfo`` is read once per crawl (its names go to the
manifest's ``license`` column), with the list Flickr served in June 2025 (ids 0-16, the CC 4.0 family included) as
the offline default. The allowlist takes ids, names, families and patterns (``pipeline.filters.licenses``).
Dates: ``datetaken`` comes with ``datetakengranularity`` (0 exact, 4 month, 6 year, 8 circa) and
``datetakenunknown`` (1: Flickr filled it from the upload time); only a day-exact, known date becomes ``taken_at``,
any other keeps its coordinates with a ``date_note`` saying why.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import flickrapi
from flickrapi.exceptions import FlickrError

from pipeline.core import reasons
from pipeline.core.exif import DEFAULT_UTC_OFFSET
from pipeline.filters.licenses import DEFAULT_ALLOWED, DEFAULT_SOURCE, check_selector, license_selected
from pipeline.sources.crawl import CrawlContext, Source, capture_time, to_float
from pipeline.sources.crawl_state import CrawlState, Unit
from pipeline.sources.downloads import Fetched, fetch_url
from pipeline.sources.http import (
    HttpSettings,
    HttpStats,
    TransientError,
    api_session,
    call_with_retries,
    classify,
    download_session,
)

DEFAULT_REST_URL = "https://api.flickr.com/services/rest/"
RESULT_CAP = 4000


@dataclass(frozen=True)
class FlickrLicense:
    """One entry of ``flickr.photos.licenses.getInfo``: the id photos carry, the name and URL Flickr gives it."""

    id: str
    name: str
    url: str = ""


def _cc(license_id: str, kind: str, version: str) -> FlickrLicense:
    return FlickrLicense(license_id, f"CC {kind.upper()} {version}",
                         f"https://creativecommons.org/licenses/{kind}/{version}/")


# flickr.photos.licenses.getInfo as Flickr answered it on 19 June 2025 (recorded by the Flickr Foundation:
# tests/data/recorded/flickr/). The offline default; every crawl reads the service's list again.
LICENSE_TABLE: tuple[FlickrLicense, ...] = (
    FlickrLicense("0", "All Rights Reserved", "https://www.flickrhelp.com/hc/en-us/articles/"
                  "10710266545556-Using-Flickr-images-shared-by-other-members"),
    *(_cc(i, kind, "2.0") for i, kind in (("1", "by-nc-sa"), ("2", "by-nc"), ("3", "by-nc-nd"), ("4", "by"),
                                         ("5", "by-sa"), ("6", "by-nd"))),
    FlickrLicense("7", "No known copyright restrictions", "https://www.flickr.com/commons/usage/"),
    FlickrLicense("8", "United States Government Work", "https://www.usa.gov/government-copyright"),
    FlickrLicense("9", "Public Domain Dedication (CC0)", "https://creativecommons.org/publicdomain/zero/1.0/"),
    FlickrLicense("10", "Public Domain Mark", "https://creativecommons.org/publicdomain/mark/1.0/"),
    *(_cc(i, kind, "4.0") for i, kind in (("11", "by"), ("12", "by-sa"), ("13", "by-nd"), ("14", "by-nc"),
                                         ("15", "by-nc-sa"), ("16", "by-nc-nd"))),
)
# the filter stage's default: every family but "all rights reserved" (ids 1-16 today)
OPEN_LICENSES: tuple[str, ...] = DEFAULT_ALLOWED[DEFAULT_SOURCE]
# flickr.com/services/api/misc.dates.html. Only 0 is exact to the day; Flickr may add values (it says to accept
# 0-10), and an unknown one is not trusted as day-exact either.
GRANULARITY = {0: "second", 4: "month", 6: "year", 8: "circa"}
DATE_ORIGIN = "flickr:datetaken"
DATE_FIELDS = ("datetaken", "datetakengranularity", "datetakenunknown")


def parse_licenses(entries: Iterable[Mapping]) -> tuple[FlickrLicense, ...]:
    """``licenses.getInfo``'s entries (JSON objects, or the XML elements' attributes) as a table.

    JSON types ``id`` as a number, XML as text: ids are kept as text, as photos carry them."""
    table = tuple(FlickrLicense(str(e["id"]).strip(), str(e.get("name") or "").strip(), str(e.get("url") or ""))
                  for e in entries)
    if not table or any(not lic.id.isdigit() or not lic.name for lic in table):
        raise ValueError(f"not a licence list: {list(entries)[:3]}")
    return table


def select_licenses(selectors: Iterable[str], table: Iterable[FlickrLicense]) -> frozenset[str]:
    """The ids an allowlist takes: ids as given ("4"), and every licence in ``table`` whose name an entry selects
    (a name, a family such as "cc0", a pattern such as "CC BY*" or "all CC BY")."""
    table = tuple(table)
    ids: set[str] = set()
    for selector in selectors:
        text = str(selector).strip()
        ids |= {str(int(text))} if text.isdigit() else {lic.id for lic in table if license_selected(text, lic.name)}
    return frozenset(ids)


def check_license_selectors(selectors: Iterable[str], table: Iterable[FlickrLicense] = LICENSE_TABLE) -> None:
    """Refuse, before any request, an allowlist entry that selects none of Flickr's licences (a typo)."""
    table = tuple(table)
    for selector in selectors:
        text = str(selector).strip()
        if not text.isdigit() and not select_licenses([check_selector(text)], table):
            raise ValueError(f"Flickr licence {text!r} matches none of Flickr's licences: "
                             f"{', '.join(lic.name for lic in table)}")


def _granularity(value: object) -> int | None:
    """``datetakengranularity`` (JSON gives 0 or "0"); None when absent (records crawled before it was kept)."""
    if value is None or str(value).strip() == "":
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return -1


def flickr_capture_time(record: Mapping) -> dict[str, object]:
    """``taken_at`` only for a known, day-exact ``datetaken``; otherwise null with the reason in ``date_note``."""
    taken = record.get("datetaken")
    if str(record.get("datetakenunknown") or "0").strip() not in ("0", "", "False"):
        return capture_time(taken, DATE_ORIGIN, "flickr datetakenunknown=1")
    g = _granularity(record.get("datetakengranularity"))
    if g not in (None, 0):
        what = GRANULARITY.get(g, "not day-exact")
        return capture_time(taken, DATE_ORIGIN, f"flickr datetakengranularity={g} ({what}): {str(taken)[:19]}")
    return capture_time(taken, DATE_ORIGIN)


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
    # ids ("4"), names as getInfo lists them ("CC BY 4.0"), families ("cc0") or patterns ("CC BY*", "all CC BY")
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
        self.stats = stats
        self.upload_floor = upload_floor_seconds(cfg.min_upload_date)  # a bad date fails here, before any request
        check_license_selectors(cfg.licenses)  # so does a licence that names nothing
        self._licenses: tuple[dict[str, FlickrLicense], frozenset[str], str] | None = None
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
                # what the allowlist selects from the service's current list: a new licence is judged again
                "license_ids": sorted(self.licenses()[1], key=int),
                "min_accuracy": c.min_accuracy, "sizes": list(c.sizes), "per_page": c.per_page,
                "min_tile_deg": c.min_tile_deg, "min_window_s": c.min_window_s, "result_cap": c.result_cap,
                "min_upload_date": c.min_upload_date}

    def licenses(self) -> tuple[dict[str, FlickrLicense], frozenset[str], str]:
        """(id -> licence, allowed ids, where the table came from), read from the service once per source (run).

        A failure (transient errors outlasting the retries, an error answer) falls back to ``LICENSE_TABLE``; the
        search that follows reports a refused key on its own."""
        if self._licenses is None:
            try:
                table = call_with_retries(self._get_licenses, self.http.retry, self.classify, self.stats)
                origin = "flickr.photos.licenses.getInfo"
            except Exception as exc:  # any failure leaves the offline list, which is today's
                table = LICENSE_TABLE
                origin = f"the built-in list of June 2025 (getInfo failed: {type(exc).__name__})"
            self._licenses = ({lic.id: lic for lic in table}, select_licenses(self.cfg.licenses, table), origin)
        return self._licenses

    def _get_licenses(self) -> tuple[FlickrLicense, ...]:
        reply = self.api.photos.licenses.getInfo()
        try:
            return parse_licenses(reply["licenses"]["license"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TransientError("bad_response", f"licenses.getInfo: {exc}") from None

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
        table, allowed, origin = self.licenses()
        ctx.info(f"flickr/{ctx.province.key}: licences from {origin}; kept: "
                 f"{', '.join(table[i].name if i in table else i for i in sorted(allowed, key=int))}")
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
            # date_taken brings datetaken, datetakengranularity and datetakenunknown (there is no extra of their own)
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
        # photos stored by an earlier crawl keep their first record: refresh its date fields (crawls before the
        # granularity was kept have none), so a year-only date found again loses its day of year
        ctx.state.update_records({i: {k: r.get(k) for k in DATE_FIELDS} for i, r in zip(ids, records)})
        new_units = []
        if q.page == 1:
            pages = math.ceil(min(total, self.cfg.result_cap) / self.cfg.per_page)
            new_units = [Query(q.bbox, q.t0, q.t1, page) for page in range(2, pages + 1)]
        ctx.state.complete_unit(unit_id, keep, rejected, [Unit(n.unit_id, n.payload()) for n in new_units],
                                result={"query": q.key, "total": total, "photos": len(ids), "capped": capped})

    def _record(self, p: dict) -> dict:
        url = next((p[s] for s in self.cfg.sizes if p.get(s)), None)
        keys = ("id", "owner", "ownername", "title", "tags", "license", *DATE_FIELDS, "latitude", "longitude",
                "accuracy")
        return {**{k: p.get(k) for k in keys}, "url": url}

    def judge(self, records: list[dict], ctx: CrawlContext) -> list[str | None]:
        return ctx.judge_located(records, "latitude", "longitude", self._check)

    def _check(self, r: dict) -> str | None:
        if str(r.get("license")) not in self.licenses()[1]:
            return reasons.LICENSE_NOT_ALLOWED
        if not to_float(r.get("accuracy")) >= self.cfg.min_accuracy:
            return reasons.LOW_GEO_ACCURACY
        return None if r.get("url") else reasons.NO_IMAGE_URL

    # ------------------------------------------------------------------------------------------------ download
    def fetcher(self, record: dict) -> Callable[[], Fetched]:
        return lambda: fetch_url(self.downloads, record["url"], self.http.max_image_bytes)

    def manifest_row(self, record: dict) -> dict:
        lic = self.licenses()[0].get(str(record.get("license")))
        return {
            "source_url": f"https://www.flickr.com/photos/{record.get('owner')}/{record['id']}",
            "lat": to_float(record["latitude"]),
            "lon": to_float(record["longitude"]),
            "geo_accuracy": to_float(record.get("accuracy")),  # Flickr level 1-16
            **flickr_capture_time(record),
            "owner": record.get("ownername") or record.get("owner"),
            "license": lic.name if lic else f"flickr license {record.get('license')}",
            "title": record.get("title") or None,
            "tags": record.get("tags") or None,
            "place_id": None,
        }
