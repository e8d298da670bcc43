"""Google Landmarks v2 crawler: locate each landmark through Wikidata, keep the province's, download their images.

``train_label_to_category.csv`` maps a landmark to a Wikimedia Commons category. The category's Wikidata item is
found by its ``commonswiki`` sitelink (``wbgetentities``); its P625 coordinate is used, or — for a category item —
the P625 of its main topic (P301). Answers, including "no item" and "no coordinates", are cached on disk
(``raw/gldv2/cache.sqlite``) and shared by every province, so each category is asked once. ``train.csv`` is then
streamed in blocks (resumable) for the images of the province's landmarks; all images of one landmark share
``place_id = "gldv2:<landmark_id>"`` (the leakage-free splits keep them together). ``train_attribution.csv``, when
configured, adds author, licence and title.

Offline: a local landmark-coordinates file (``coordinates_path``, CSV or Parquet; for example an extract of a
Wikidata dump) replaces the Wikidata requests, which number in the thousands on a first run. Its rows give ``lat``
and ``lon`` for a ``landmark_id`` and/or a ``wikidata_id`` (``category``, a Commons category, ties a Wikidata id to
the landmarks of that category; otherwise the category's item comes from earlier cached answers). With such a file
Wikidata is never asked; landmarks it does not cover are counted, not located.

Every request here goes to Wikimedia (Wikidata, upload.wikimedia.org), so its published rules bind the crawl: a
User-Agent with a contact (GEOPAK_CONTACT; the crawl refuses to start without one), at most 2 concurrent media
downloads and 25 Mbps (wikitech.wikimedia.org/wiki/Robot_policy, April 2025; we default to 20 Mbps, shared by every
process), serial API requests (mediawiki.org/wiki/API:Etiquette) with ``maxlag``, 429 Retry-After honoured.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import reasons
from pipeline.sources.crawl import CrawlContext, Source, read_delimited, scan_in_chunks
from pipeline.sources.crawl_state import JsonCache
from pipeline.sources.downloads import Fetched, fetch_url
from pipeline.sources.http import (
    CrawlError,
    HttpSettings,
    HttpStats,
    StopCrawl,
    TransientError,
    WikimediaPolicyError,
    api_session,
    download_session,
    has_contact,
    is_wikimedia,
    parse_retry_after,
)

DEFAULT_WIKIDATA_API = "https://www.wikidata.org/w/api.php"
EARTH = "http://www.wikidata.org/entity/Q2"
# upload.wikimedia.org, Robot policy (wikitech.wikimedia.org/wiki/Robot_policy, April 2025): "Always keep a total
# concurrency of at most 2, and limit your total download speed to 25 Mbps (as measured over 10 second intervals)"
WIKIMEDIA_MAX_CONNECTIONS = 2
WIKIMEDIA_MAX_MBPS = 25.0


@dataclass(frozen=True)
class Gldv2Config:
    train_csv: str
    categories_csv: str
    attribution_csv: str = ""
    wikidata_api_url: str = DEFAULT_WIKIDATA_API
    # serial, and low: Wikimedia's 2026 API limits for unauthenticated clients are "in the hundreds per hour"
    wikidata_requests_per_second: float = 0.1
    batch_size: int = 50  # wbgetentities takes at most 50 titles or ids
    block_mb: float = 16
    downloads_per_second: float = 20.0  # 0: unlimited
    download_mbps: float = 20.0  # every process together; Wikimedia allows 25 (measured over 10 s)
    coordinates_path: str = ""  # a local landmark-coordinates file: no Wikidata requests at all


class WikidataError(RuntimeError):
    pass


_ALIASES = {"lat": ("lat", "latitude"), "lon": ("lon", "lng", "longitude"), "landmark_id": ("landmark_id",),
            "wikidata_id": ("wikidata_id", "qid", "item", "wikidata"), "category": ("category", "commons_category")}


@dataclass(frozen=True)
class LocalCoordinates:
    """A landmark-coordinates file, indexed for lookups: by landmark id, by Wikidata id, and category → Wikidata id."""

    by_landmark: dict[str, tuple[float, float]] = field(default_factory=dict)
    by_qid: dict[str, tuple[float, float]] = field(default_factory=dict)
    qid_by_category: dict[str, str] = field(default_factory=dict)
    skipped_rows: int = 0


def _qid(value: object) -> str:
    """'Q123', 'q123' or 'http://www.wikidata.org/entity/Q123' → 'Q123' ('' when it is none of these)."""
    text = str(value or "").strip().rsplit("/", 1)[-1].upper()
    return text if text[:1] == "Q" and text[1:].isdigit() else ""


def read_coordinates(path: str) -> LocalCoordinates:
    """Read a CSV/Parquet of ``landmark_id`` and/or ``wikidata_id`` (aliases: qid, item) → ``lat``, ``lon``.

    Rows without a usable id or coordinate are skipped and counted; a file without the needed columns is an error
    that names them, so a wrong file fails the run instead of locating nothing.
    """
    p = Path(path)
    if not p.is_file():
        raise CrawlError(f"gldv2: the landmark-coordinates file {path} does not exist")
    raw = pd.read_parquet(p) if p.suffix.lower() in {".parquet", ".pq"} else \
        pd.read_csv(p, dtype=str, keep_default_na=False, compression="infer")
    lower = {str(c).strip().lower(): c for c in raw.columns}
    cols = {name: next((lower[a] for a in aliases if a in lower), None) for name, aliases in _ALIASES.items()}
    if cols["lat"] is None or cols["lon"] is None or (cols["landmark_id"] is None and cols["wikidata_id"] is None):
        raise CrawlError(f"gldv2: the landmark-coordinates file {p.name} needs lat, lon and landmark_id or "
                         f"wikidata_id columns; it has {', '.join(map(str, raw.columns[:10]))}")
    lat = pd.to_numeric(raw[cols["lat"]], errors="coerce")
    lon = pd.to_numeric(raw[cols["lon"]], errors="coerce")
    out = LocalCoordinates()
    skipped = 0
    for i in range(len(raw)):
        la, lo = float(lat.iat[i]), float(lon.iat[i])
        landmark = str(raw[cols["landmark_id"]].iat[i]).strip() if cols["landmark_id"] is not None else ""
        qid = _qid(raw[cols["wikidata_id"]].iat[i]) if cols["wikidata_id"] is not None else ""
        if math.isnan(la) or math.isnan(lo) or abs(la) > 90 or abs(lo) > 180 or not (landmark or qid):
            skipped += 1
            continue
        if landmark:
            out.by_landmark[landmark] = (la, lo)
        if qid:
            out.by_qid[qid] = (la, lo)
            if cols["category"] is not None and (cat := _category_key(raw[cols["category"]].iat[i])):
                out.qid_by_category[cat] = qid
    return dataclasses.replace(out, skipped_rows=skipped)


def _category_key(value: object) -> str | None:
    """A Commons category as a URL, 'Category:Name' or 'Name' → the canonical 'Category:Name' (None when empty)."""
    text = str(value or "").strip()
    if not text:
        return None
    title = category_title(text) if "/wiki/" in text else text if text.startswith("Category:") else f"Category:{text}"
    return _canon(title) if title else None


def category_title(url: str) -> str | None:
    """'http://commons.wikimedia.org/wiki/Category:Badshahi_Mosque' → 'Category:Badshahi Mosque'."""
    if "/wiki/" not in str(url):
        return None
    title = unquote(str(url).split("/wiki/", 1)[1]).replace("_", " ").strip()
    return title if title.startswith("Category:") and len(title) > len("Category:") else None


def _canon(title: str) -> str:
    """MediaWiki title equality: spaces for underscores, first letter after the namespace upper-case."""
    ns, _, rest = title.replace("_", " ").strip().partition(":")
    return f"{ns}:{rest[:1].upper()}{rest[1:]}"


def _claim_value(entity: dict, prop: str):
    claims = [c for c in (entity.get("claims") or {}).get(prop, []) if c.get("rank") != "deprecated"]
    claims.sort(key=lambda c: c.get("rank") != "preferred")
    for c in claims:
        snak = c.get("mainsnak") or {}
        if snak.get("snaktype") == "value":
            return (snak.get("datavalue") or {}).get("value")
    return None


def coordinate(entity: dict | None) -> tuple[float, float] | None:
    """P625 (on Earth) as (lat, lon)."""
    v = _claim_value(entity or {}, "P625")
    if not isinstance(v, dict) or v.get("globe", EARTH) != EARTH:
        return None
    try:
        return float(v["latitude"]), float(v["longitude"])
    except (KeyError, TypeError, ValueError):
        return None


def main_topic(entity: dict) -> str | None:
    v = _claim_value(entity, "P301")
    return v.get("id") if isinstance(v, dict) else None


def resolve_categories(
    titles: list[str], cache: JsonCache, get_entities: Callable[[dict], dict], batch_size: int = 50
) -> dict[str, dict]:
    """Title → {qid, lat, lon, via}; ``via`` is P625, P301>P625, no_item or no_coordinates. Cached answers first."""
    keys = {t: f"category:{t}" for t in titles}
    cached = cache.get_many(keys.values())
    todo = [t for t in titles if keys[t] not in cached]
    answers: dict[str, dict] = {t: cached[keys[t]] for t in titles if keys[t] in cached}  # type: ignore[misc]
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        entities = get_entities({"sites": "commonswiki", "titles": "|".join(chunk), "props": "claims|sitelinks",
                                 "sitefilter": "commonswiki"})
        by_title: dict[str, dict | None] = {}
        for ent in entities.values():
            if "missing" in ent:
                by_title[_canon(ent.get("title", ""))] = None
            elif title := ((ent.get("sitelinks") or {}).get("commonswiki") or {}).get("title"):
                by_title[_canon(title)] = ent
        new: dict[str, dict] = {}
        topics: dict[str, tuple[str, str]] = {}
        for t in chunk:
            ent = by_title.get(_canon(t))
            if ent is None:
                new[t] = {"qid": None, "via": "no_item"}
            elif (c := coordinate(ent)) is not None:
                new[t] = {"qid": ent["id"], "lat": c[0], "lon": c[1], "via": "P625"}
            elif topic := main_topic(ent):
                topics[t] = (ent["id"], topic)
            else:
                new[t] = {"qid": ent["id"], "via": "no_coordinates"}
        if topics:
            found = get_entities({"ids": "|".join(sorted({q for _, q in topics.values()})), "props": "claims"})
            for t, (cat_qid, topic) in topics.items():
                c = coordinate(found.get(topic))
                new[t] = ({"qid": topic, "category_qid": cat_qid, "lat": c[0], "lon": c[1], "via": "P301>P625"}
                          if c else {"qid": topic, "category_qid": cat_qid, "via": "no_coordinates"})
        cache.put_many({keys[t]: a for t, a in new.items()})
        answers.update(new)
    return answers


def local_answers(titles: list[str], cache: JsonCache, local: LocalCoordinates) -> dict[str, dict]:
    """Title → answer from the coordinates file alone (no requests): by the file's category column, else by the
    Wikidata id of an earlier cached answer; a cached answer with coordinates is the fallback."""
    cached = cache.get_many(f"category:{t}" for t in titles)
    answers: dict[str, dict] = {}
    for t in titles:
        c: dict = cached.get(f"category:{t}") or {}  # type: ignore[assignment]
        by_cat = local.qid_by_category.get(_canon(t))
        by_item = next((q for q in (c.get("qid"), c.get("category_qid")) if q and q in local.by_qid), None)
        if by_cat and by_cat in local.by_qid:
            answers[t] = {"qid": by_cat, "lat": local.by_qid[by_cat][0], "lon": local.by_qid[by_cat][1],
                          "via": "coordinates file (category)"}
        elif by_item:
            answers[t] = {"qid": by_item, "lat": local.by_qid[by_item][0], "lon": local.by_qid[by_item][1],
                          "via": "coordinates file (wikidata_id)"}
        elif "lat" in c:
            answers[t] = c
        else:
            answers[t] = {"qid": c.get("qid"), "via": "not in the coordinates file"}
    return answers


class Gldv2Source(Source):
    name = "gldv2"
    filter_reasons = (reasons.NO_IMAGE_URL,)
    max_download_workers = WIKIMEDIA_MAX_CONNECTIONS

    def __init__(self, cfg: Gldv2Config, http: HttpSettings, stats: HttpStats):
        if not (cfg.train_csv and cfg.categories_csv):
            raise ValueError("GLDv2 needs train.csv and train_label_to_category.csv")
        if not 0 < cfg.download_mbps <= WIKIMEDIA_MAX_MBPS:
            raise ValueError(f"download_mbps must be in (0, {WIKIMEDIA_MAX_MBPS:g}] (Wikimedia's robot policy)")
        self.cfg = cfg
        self.http = http
        self.wikidata = api_session(http, stats, cfg.wikidata_api_url, cfg.wikidata_requests_per_second)
        self.downloads = download_session(http, stats, cfg.downloads_per_second,
                                          bytes_per_s=cfg.download_mbps * 1e6 / 8, host="upload.wikimedia.org")

    def _require_contact(self, urls: Iterable[str]) -> None:
        """Refuse to start Wikimedia requests whose User-Agent gives no contact: one clear error, nothing sent."""
        if not has_contact(self.http.user_agent):
            first = next((u for u in urls if is_wikimedia(u)), None)
            if first is not None:
                raise WikimediaPolicyError.missing_contact(first)

    def params(self) -> dict:
        c = self.cfg
        return {"train_csv": c.train_csv, "categories_csv": c.categories_csv, "attribution_csv": c.attribution_csv,
                "block_mb": c.block_mb,
                # only when set, so that crawls from before the option keep their state
                **({"coordinates_path": c.coordinates_path} if c.coordinates_path else {})}

    # ------------------------------------------------------------------------------------------------ discovery
    def _get_entities(self, params: dict) -> dict:
        resp = self.wikidata.get(self.cfg.wikidata_api_url,
                                 params={"action": "wbgetentities", "format": "json", "maxlag": 5, **params})
        body = resp.json()
        if "error" in body:
            code = body["error"].get("code")
            if code == "maxlag":  # Wikidata is lagging: back off as it asks
                wait = parse_retry_after(resp.headers.get("Retry-After")) or 5.0
                raise TransientError("maxlag", "Wikidata maxlag", wait)
            raise WikidataError(f"Wikidata error {code}: {body['error'].get('info')}")
        return body.get("entities") or {}

    def landmarks(self, ctx: CrawlContext) -> dict[str, dict]:
        """landmark_id → {lat, lon, qid, category} for the landmarks in this province (fixed once computed)."""
        kept = ctx.state.meta_get("landmarks")
        if kept is not None:
            return kept
        cats = pd.read_csv(self.cfg.categories_csv, dtype=str, keep_default_na=False)
        cats["title"] = cats["category"].map(category_title)
        titles = sorted(set(cats["title"].dropna()))
        cache = JsonCache(ctx.paths.crawl_cache(self.name))
        try:
            if self.cfg.coordinates_path:
                local = read_coordinates(self.cfg.coordinates_path)
                answers = local_answers(titles, cache, local)
            else:
                local = LocalCoordinates()
                answers = self._ask_wikidata(titles, cache, ctx)
        finally:
            cache.close()
        lat, lon, qid = [], [], []
        for landmark, title in zip(cats["landmark_id"], cats["title"]):
            a = (answers.get(title) or {}) if isinstance(title, str) else {}
            la, lo = local.by_landmark.get(str(landmark)) or (a.get("lat", math.nan), a.get("lon", math.nan))
            lat.append(la)
            lon.append(lo)
            qid.append(a.get("qid"))
        cats = cats.assign(lat=lat, lon=lon, qid=qid)
        located = cats[cats["lat"].notna() & cats["lon"].notna()]
        where = ctx.location_reasons(located["lat"], located["lon"]) if len(located) else []
        mine = located[[w is None for w in where]]
        kept = {str(r.landmark_id): {"lat": float(r.lat), "lon": float(r.lon), "qid": r.qid,
                                     "category": r.title if isinstance(r.title, str) else ""}
                for r in mine.itertuples()}
        vias = pd.Series([answers[t]["via"] for t in titles if t in answers]).value_counts().to_dict()
        counts = {"landmarks": len(cats), "categories": len(titles), "located": len(located), "in_province": len(kept),
                  "via": vias}
        if self.cfg.coordinates_path:
            counts.update({"located by landmark_id in the coordinates file":
                           int(cats["landmark_id"].astype(str).isin(local.by_landmark).sum()),
                           "coordinates file rows skipped": local.skipped_rows})
        ctx.state.meta_set("landmark_counts", counts)
        ctx.state.meta_set("landmarks", kept)
        ctx.info(f"gldv2/{ctx.province.key}: {len(located)} of {len(cats)} landmarks located, {len(kept)} here")
        return kept

    def _ask_wikidata(self, titles: list[str], cache: JsonCache, ctx: CrawlContext) -> dict[str, dict]:
        """Resolve through Wikidata; when it cannot be reached, fail with a short message (how many requests failed,
        one host/path, how many categories are left: never a full URL, whose query string lists 50 titles) that
        points to the offline alternative."""
        failures = 0

        def ask(params: dict) -> dict:
            def once() -> dict:
                nonlocal failures
                try:
                    return self._get_entities(params)
                except Exception:
                    failures += 1
                    raise

            return ctx.retry(once, self.classify)

        try:
            return resolve_categories(titles, cache, ask, self.cfg.batch_size)
        except StopCrawl:  # Wikimedia's policy refusal says itself what to fix
            raise
        except Exception as exc:
            left = len(titles) - len(cache.get_many(f"category:{t}" for t in titles))
            url = urlsplit(self.cfg.wikidata_api_url)
            host = f"{url.hostname}{f':{url.port}' if url.port else ''}{url.path}"
            raise CrawlError(
                f"gldv2/{ctx.province.key}: Wikidata lookups failed ({failures} failed requests, the last: "
                f"{type(exc).__name__} from {host}); {left} of {len(titles)} categories are unresolved (answers so far "
                "are cached). To run without the network, set GEOPAK_GLDV2_COORDINATES to a landmark-coordinates "
                "file (CSV/Parquet: landmark_id or wikidata_id, lat, lon)."
            ) from None

    def discover(self, ctx: CrawlContext) -> None:
        if not self.cfg.coordinates_path:
            self._require_contact([self.cfg.wikidata_api_url])
        kept = self.landmarks(ctx)
        wanted = pa.array(sorted(kept), pa.string())

        def handle(batch: pa.RecordBatch):
            rows = batch.filter(pc.is_in(batch.column("landmark_id"), value_set=wanted)).to_pylist()
            records = [{"id": r["id"], "url": r["url"], "landmark_id": r["landmark_id"], **kept[r["landmark_id"]]}
                       for r in rows]
            keep, rejected = self.sort_items([r["id"] for r in records], records, ctx)
            return keep, rejected, {"images": len(records)}

        cols = ("id", "url", "landmark_id")
        scan_in_chunks(ctx, "train", read_delimited(self.cfg.train_csv, cols, cols, block_mb=self.cfg.block_mb), handle)
        if self.cfg.attribution_csv and not ctx.state.meta_get("attribution_complete"):
            self._attribution(ctx)
        self._require_contact(str(record.get("url") or "") for _, record in ctx.state.pending_items())

    def _attribution(self, ctx: CrawlContext) -> None:
        ids = pa.array(ctx.state.item_ids(), pa.string())
        cols = ("id", "author", "license", "title")
        for batch in read_delimited(self.cfg.attribution_csv, cols, cols, block_mb=self.cfg.block_mb):
            rows = batch.filter(pc.is_in(batch.column("id"), value_set=ids)).to_pylist()
            ctx.state.update_records({r["id"]: {k: r[k] for k in cols[1:]} for r in rows})
        ctx.state.meta_set("attribution_complete", True)

    def summary(self, state) -> dict[str, float]:
        counts = state.meta_get("landmark_counts") or {}
        out = {f"landmarks: {k}": float(v) for k, v in counts.items() if k != "via"}
        out.update({f"categories resolved via {k}": float(v) for k, v in (counts.get("via") or {}).items()})
        return out

    def judge(self, records: list[dict], ctx: CrawlContext) -> list[str | None]:
        return ctx.judge_located(records, "lat", "lon", lambda r: None if r.get("url") else reasons.NO_IMAGE_URL)

    # ------------------------------------------------------------------------------------------------ download
    def fetcher(self, record: dict) -> Callable[[], Fetched]:
        return lambda: fetch_url(self.downloads, record["url"], self.http.max_image_bytes)

    def manifest_row(self, record: dict) -> dict:
        return {
            "source_url": record["url"],
            "lat": record["lat"],
            "lon": record["lon"],
            "geo_accuracy": None,  # the landmark's coordinate, not the camera's
            "taken_at": None,  # from EXIF in the catalog, when present
            "taken_at_source": None,
            "date_note": "gldv2 has no capture date",
            "owner": record.get("author") or None,
            "license": record.get("license") or None,
            "title": record.get("title") or None,
            "tags": str(record.get("category") or "").removeprefix("Category:") or None,
            "place_id": f"gldv2:{record['landmark_id']}",
        }
