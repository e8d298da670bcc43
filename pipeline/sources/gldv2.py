"""Google Landmarks v2 crawler: locate each landmark through Wikidata, keep the province's, download their images.

``train_label_to_category.csv`` maps a landmark to a Wikimedia Commons category. The category's Wikidata item is
found by its ``commonswiki`` sitelink (``wbgetentities``); its P625 coordinate is used, or — for a category item —
the P625 of its main topic (P301). Answers, including "no item" and "no coordinates", are cached on disk
(``raw/gldv2/cache.sqlite``) and shared by every province, so each category is asked once. ``train.csv`` is then
streamed in blocks (resumable) for the images of the province's landmarks; all images of one landmark share
``place_id = "gldv2:<landmark_id>"`` (the leakage-free splits keep them together). ``train_attribution.csv``, when
configured, adds author, licence and title.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import reasons
from pipeline.sources.crawl import CrawlContext, Source, read_delimited, scan_in_chunks
from pipeline.sources.crawl_state import JsonCache
from pipeline.sources.http import (
    Fetched,
    HttpSettings,
    HttpStats,
    TransientError,
    api_session,
    download_session,
    fetch_url,
    parse_retry_after,
)

DEFAULT_WIKIDATA_API = "https://www.wikidata.org/w/api.php"
EARTH = "http://www.wikidata.org/entity/Q2"


@dataclass(frozen=True)
class Gldv2Config:
    train_csv: str
    categories_csv: str
    attribution_csv: str = ""
    wikidata_api_url: str = DEFAULT_WIKIDATA_API
    wikidata_requests_per_second: float = 5.0
    batch_size: int = 50  # wbgetentities takes at most 50 titles or ids
    block_mb: float = 16
    downloads_per_second: float = 20.0  # 0: unlimited


class WikidataError(RuntimeError):
    pass


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


class Gldv2Source(Source):
    name = "gldv2"
    filter_reasons = (reasons.NO_IMAGE_URL,)

    def __init__(self, cfg: Gldv2Config, http: HttpSettings, stats: HttpStats):
        if not (cfg.train_csv and cfg.categories_csv):
            raise ValueError("GLDv2 needs train.csv and train_label_to_category.csv")
        self.cfg = cfg
        self.http = http
        self.wikidata = api_session(http, stats, cfg.wikidata_api_url, cfg.wikidata_requests_per_second)
        self.downloads = download_session(http, stats, cfg.downloads_per_second)

    def params(self) -> dict:
        c = self.cfg
        return {"train_csv": c.train_csv, "categories_csv": c.categories_csv, "attribution_csv": c.attribution_csv,
                "block_mb": c.block_mb}

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
            answers = resolve_categories(
                titles, cache, lambda p: ctx.retry(lambda: self._get_entities(p), self.classify), self.cfg.batch_size
            )
        finally:
            cache.close()
        located = cats[cats["title"].map(lambda t: t in answers and "lat" in answers[t])].copy()
        located["lat"] = [answers[t]["lat"] for t in located["title"]]
        located["lon"] = [answers[t]["lon"] for t in located["title"]]
        where = ctx.location_reasons(located["lat"], located["lon"]) if len(located) else []
        mine = located[[w is None for w in where]]
        kept = {str(r.landmark_id): {"lat": r.lat, "lon": r.lon, "qid": answers[r.title]["qid"], "category": r.title}
                for r in mine.itertuples()}
        vias = pd.Series([answers[t]["via"] for t in titles if t in answers]).value_counts().to_dict()
        ctx.state.meta_set("landmark_counts", {"landmarks": len(cats), "categories": len(titles),
                                               "located": len(located), "in_province": len(kept), "via": vias})
        ctx.state.meta_set("landmarks", kept)
        ctx.info(f"gldv2/{ctx.province.key}: {len(located)} of {len(cats)} landmarks located, {len(kept)} here")
        return kept

    def discover(self, ctx: CrawlContext) -> None:
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
            "owner": record.get("author") or None,
            "license": record.get("license") or None,
            "title": record.get("title") or None,
            "tags": record["category"].removeprefix("Category:"),
            "place_id": f"gldv2:{record['landmark_id']}",
        }
